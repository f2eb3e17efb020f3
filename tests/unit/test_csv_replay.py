"""Fraud Detector CSV replay: row mapping, event-time order and resumable progress (fake producer)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from typer.testing import CliRunner

from infra.settings import Settings
from producers import csv_replay, pos
from producers.csv_replay import AckWatermark, ReplayStateError, load_state, row_dead_letter, transaction_of
from schemas.afd_csv import (
    CsvFormatError,
    CsvRow,
    merchant_slug,
    parse_label,
    read_rows,
    replay_order,
    row_to_transaction,
)
from schemas.errors import InvalidRecord
from schemas.identifiers import NAME_RE
from schemas.records import DeadLetter, LineItem, PosTransaction
from schemas.topics import DEAD_LETTERS, TRANSACTIONS
from tests.unit.durability import DiskOrder

SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fraud" / "afd_transactions_sample.csv"
needs_sample = pytest.mark.skipif(
    not SAMPLE.exists(), reason="shared fraud sample ../shared/data/fraud/afd_transactions_sample.csv is absent"
)


HEADER = [
    "EVENT_LABEL",
    "EVENT_TIMESTAMP",
    "LABEL_TIMESTAMP",
    "EVENT_ID",
    "ENTITY_TYPE",
    "ENTITY_ID",
    "card_bin",
    "customer_name",
    "billing_street",
    "billing_city",
    "billing_state",
    "billing_zip",
    "billing_latitude",
    "billing_longitude",
    "billing_country",
    "customer_job",
    "ip_address",
    "customer_email",
    "billing_phone",
    "user_agent",
    "product_category",
    "order_price",
    "payment_currency",
    "merchant",
]


def afd_row(event_id: str, timestamp: str = "2022-11-07T15:51:48Z", **overrides: str) -> dict[str, str]:
    row = {
        "EVENT_LABEL": "0",
        "EVENT_TIMESTAMP": timestamp,
        "LABEL_TIMESTAMP": "",
        "EVENT_ID": event_id,
        "ENTITY_TYPE": "customer",
        "ENTITY_ID": "398-20-6447",
        "card_bin": "404409",
        "customer_name": "Christina",
        "billing_street": "4410 Johnson Way",
        "billing_city": "Warner Robins",
        "billing_state": "GA",
        "billing_zip": "31098",
        "billing_latitude": "32.6181",
        "billing_longitude": "-83.5739",
        "billing_country": "US",
        "customer_job": "Conservator, museum/gallery",
        "ip_address": "72.239.175.244",
        "customer_email": "lee@example.com",
        "billing_phone": "+1-099-994-5728",
        "user_agent": "Opera/8.42.(X11; Linux i686; lg-UG) Presto/2.9.173 Version/12.00",
        "product_category": "misc_net",
        "order_price": "810.3",
        "payment_currency": "USD",
        "merchant": "fraud_Hamill-Daugherty",
    }
    row.update(overrides)
    return row


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


class FakeProducer:
    """Stands in for confluent_kafka.Producer. ``ack(n)`` decides the fate of the n-th message sent:
    True (acknowledged), False (failed) or None (never answered, as when the process dies)."""

    def __init__(
        self, ack: Callable[[int], bool | None] = lambda n: True, on_produce: Callable[[int], None] | None = None
    ) -> None:
        self.ack, self.on_produce = ack, on_produce
        self.values: list[bytes] = []
        self.topics: list[str] = []
        self._pending: list[tuple[int, Callable[[Any, Any], None]]] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        if self.on_produce is not None:
            self.on_produce(len(self.values))
        self._pending.append((len(self.values), on_delivery))
        self.values.append(value)
        self.topics.append(topic)

    def poll(self, timeout: float = 0) -> int:
        # Acknowledge in reverse order of sending, as several partitions may.
        pending, self._pending = self._pending, []
        answered = 0
        for n, callback in reversed(pending):
            outcome = self.ack(n)
            if outcome is None:
                continue
            callback(None if outcome else "delivery failed", None)
            answered += 1
        return answered

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    @property
    def ids(self) -> list[str]:
        """Transaction ids sent, in order (dead letters left out)."""
        return [
            PosTransaction.decode(v).transaction_id
            for t, v in zip(self.topics, self.values, strict=True)
            if t.endswith(TRANSACTIONS.name)
        ]

    def dead_letters(self) -> list[DeadLetter]:
        return [
            DeadLetter.decode(v) for t, v in zip(self.topics, self.values, strict=True) if t.endswith(DEAD_LETTERS.name)
        ]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(stack_dir=tmp_path / "stack")


def replay(settings: Settings, path: Path, producer: FakeProducer, **kwargs: Any) -> pos.ReplayResult:
    return pos.replay_csv(settings, path, producer=producer, progress=False, **kwargs)


# ---------------------------------------------------------------------------- mapping


def test_row_maps_fraud_detector_fields_onto_a_transaction() -> None:
    tx = row_to_transaction(afd_row("ev-1", EVENT_LABEL="1"))
    assert tx == PosTransaction(
        transaction_id="ev-1",
        event_time=1667836308000,
        store_id="hamill-daugherty",
        lane_id="online",
        kind="SALE",
        amount=810.3,
        currency="USD",
        items=(LineItem(sku="afd-misc_net", category="misc_net", quantity=1, unit_price=810.3),),
        customer_id="398-20-6447",
        card_bin="404409",
        customer_email="lee@example.com",
        customer_name="Christina",
        customer_job="Conservator, museum/gallery",
        billing_phone="+1-099-994-5728",
        ip_address="72.239.175.244",
        user_agent="Opera/8.42.(X11; Linux i686; lg-UG) Presto/2.9.173 Version/12.00",
        billing_street="4410 Johnson Way",
        billing_city="Warner Robins",
        billing_state="GA",
        billing_zip="31098",
        billing_country="US",
        billing_latitude=32.6181,
        billing_longitude=-83.5739,
        product_category="misc_net",
        label=1,
    )
    assert PosTransaction.decode(tx.encode()) == tx


@pytest.mark.parametrize(
    ("text", "label"), [("1", 1), ("0", 0), ("fraud", 1), ("Legit", 0), ("legitimate", 0), ("", None)]
)
def test_label_is_read_from_1_0_fraud_legit_legitimate_or_empty(text: str, label: int | None) -> None:
    assert parse_label(text) == label
    assert row_to_transaction(afd_row("ev", EVENT_LABEL=text)).label == label


def test_store_id_is_a_stable_slug_of_the_merchant() -> None:
    assert merchant_slug("fraud_Lowe, Dietrich and Erdman") == "lowe-dietrich-and-erdman"
    assert merchant_slug("Café Zoë & Co.") == "cafe-zoe-co"
    assert merchant_slug("fraud_Lowe, Dietrich and Erdman") == merchant_slug("Lowe Dietrich  and Erdman")


def test_optional_fields_may_be_empty() -> None:
    tx = row_to_transaction(afd_row("ev", ENTITY_ID="", billing_latitude="", product_category="", card_bin=""))
    assert (tx.customer_id, tx.billing_latitude, tx.product_category, tx.card_bin) == (None, None, None, None)
    assert tx.items[0].category == "unknown"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"EVENT_TIMESTAMP": "07/11/2022 15:51"}, "EVENT_TIMESTAMP"),
        ({"EVENT_TIMESTAMP": ""}, "EVENT_TIMESTAMP"),
        ({"order_price": "12,50"}, "order_price"),
        ({"order_price": "nan"}, "order_price"),
        ({"order_price": "-3"}, "order_price"),
        ({"payment_currency": "dollars"}, "payment_currency"),
        ({"EVENT_ID": " "}, "EVENT_ID"),
        ({"EVENT_LABEL": "maybe"}, "EVENT_LABEL"),
        ({"billing_latitude": "north"}, "billing_latitude"),
        ({"merchant": "???"}, "merchant"),
    ],
)
def test_unmappable_row_raises_a_value_error_naming_the_column(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_to_transaction(afd_row("ev", **overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"order_price": "1_000"}, "order_price"),
        ({"order_price": "\u0661\u0660\u0660"}, "order_price"),  # Arabic-Indic 100
        ({"order_price": "\uff11\uff10"}, "order_price"),  # full-width 10
        ({"billing_latitude": "4_5"}, "billing_latitude"),
        ({"payment_currency": "\u017fek"}, "payment_currency"),  # long s: upper() is "SEK"
        ({"payment_currency": "\u0131dr"}, "payment_currency"),  # dotless i: upper() is "IDR"
    ],
)
def test_a_number_or_currency_python_reads_but_no_csv_writes_is_unmappable(
    overrides: dict[str, str], message: str
) -> None:
    """float() takes underscores and other scripts' digits, and upper() turns some non-ASCII letters into ASCII
    ones: such a field is a garbled value, not the amount or currency it happens to read as."""
    with pytest.raises(InvalidRecord, match=message) as err:
        row_to_transaction(afd_row("ev", **overrides))
    assert err.value.kind in ("invalid_amount", "invalid", "invalid_currency")


def test_row_with_more_fields_than_the_header_is_unmappable(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", [afd_row("ev-1")])
    path.write_text(path.read_text().rstrip("\r\n") + ",surplus\r\n")
    (row,) = read_rows(path)
    with pytest.raises(ValueError, match="more field"):
        row_to_transaction(row.data)


def test_row_with_fewer_fields_than_the_header_is_unmappable_not_unlabelled(tmp_path: Path, settings: Settings) -> None:
    """With EVENT_LABEL last, a row one field short was replayed and trained on as unlabelled."""
    path = tmp_path / "x.csv"
    columns = [c for c in HEADER if c != "EVENT_LABEL"] + ["EVENT_LABEL"]
    full = [afd_row("ok", EVENT_LABEL="1")[c] for c in columns]
    short = [afd_row("short", "2022-11-07T15:51:49Z", EVENT_LABEL="1")[c] for c in columns][:-1]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([columns, full, short])
    ok, cut = read_rows(path)
    assert row_to_transaction(ok.data).label == 1
    with pytest.raises(InvalidRecord) as err:
        row_to_transaction(cut.data)
    assert (err.value.kind, err.value.reason) == (
        "invalid",
        "1 fewer field(s) than the header: the row ends before 'EVENT_LABEL'",
    )
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["ok"] and [line for line, _ in result.skipped] == [3]
    (dead,) = fake.dead_letters()
    assert next(csv.reader(io.StringIO(dead.payload.decode()))) == short, "the dead letter keeps the row's fields"


def test_missing_required_column_is_rejected_up_front(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "x.csv"
    path.write_text("EVENT_ID,EVENT_TIMESTAMP\nev-1,2022-11-07T15:51:48Z\n")
    with pytest.raises(CsvFormatError, match="order_price"):
        replay(settings, path, FakeProducer())


# ---------------------------------------------------------------------------- order and errors


def test_csv_rows_are_replayed_in_event_timestamp_order(tmp_path: Path, settings: Settings) -> None:
    path = write_csv(
        tmp_path / "events.csv",
        [
            afd_row("c", "2022-11-08T00:00:00Z"),
            afd_row("a", "2022-11-07T00:00:00Z"),
            afd_row("d1", "2022-11-09T00:00:00Z"),
            afd_row("b", "2022-11-07T12:00:00+00:00"),
            afd_row("d2", "2022-11-09T00:00:00.000Z"),  # same instant as d1: file order kept
            afd_row("e", "2022-11-09T01:00:00+01:00"),  # = 00:00Z, after d2 by the stable sort
        ],
    )
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["a", "b", "c", "d1", "d2", "e"]
    assert result.complete and result.stats.acked == 6


def test_unmappable_row_is_reported_not_fatal(tmp_path: Path, settings: Settings) -> None:
    path = write_csv(
        tmp_path / "events.csv",
        [
            afd_row("ok-1", "2022-11-07T00:00:00Z", user_agent="two\nlines"),  # lines 2-3
            afd_row("bad-price", "2022-11-07T01:00:00Z", order_price="12,50"),  # line 4
            afd_row("bad-time", "yesterday"),  # line 5
            afd_row("ok-2", "2022-11-07T02:00:00Z"),  # line 6
        ],
    )
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["ok-1", "ok-2"]
    assert [line for line, _ in result.skipped] == [4, 5]
    assert "order_price" in result.skipped[0][1] and "EVENT_TIMESTAMP" in result.skipped[1][1]
    assert result.complete and result.stats.ok
    assert load_state(result.state_file).last_acked_index == 3  # type: ignore[union-attr]


def test_time_scale_keeps_the_original_spacing_compressed(tmp_path: Path, settings: Settings) -> None:
    path = write_csv(
        tmp_path / "events.csv",
        [
            afd_row("a", "2022-11-07T00:00:00Z"),
            afd_row("b", "2022-11-07T00:00:01Z"),
            afd_row("c", "2022-11-07T00:00:03Z"),
        ],
    )
    start = time.monotonic()
    replay(settings, path, FakeProducer(), time_scale=10)
    assert 0.28 <= time.monotonic() - start < 2.0  # 3 s of events at 10x


def test_a_row_dated_in_the_future_is_dead_lettered_at_once_not_waited_for(tmp_path: Path, settings: Settings) -> None:
    """A typo year (2099 for 2019) sorts last; paced by event time, the replay waited decades / time scale for
    it, and the scoring job then refused it as ahead of the wall clock anyway."""
    path = write_csv(
        tmp_path / "events.csv",
        [
            afd_row("a", "2022-11-07T00:00:00Z"),
            afd_row("typo", "2099-11-07T00:00:01Z"),
            afd_row("b", "2022-11-07T00:00:01Z"),
        ],
    )
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["a", "b"] and result.complete and result.ok
    (dl,) = fake.dead_letters()
    assert dl.dead_letter_id == "events.csv:3" and dl.error_kind == "invalid_timestamp"
    assert "after the wall clock" in dl.reason


def test_a_row_dated_at_the_epoch_is_dead_lettered_at_once_and_does_not_set_the_pace(
    tmp_path: Path, settings: Settings
) -> None:
    """1970-01-01T00:00:00Z (a null date exported as the epoch) is an event_time of 0, which the scoring job
    refuses; taken, it sorted first and every later row was paced from 1970: decades / time scale."""
    path = write_csv(
        tmp_path / "events.csv",
        [
            afd_row("a", "2022-11-07T00:00:00Z"),
            afd_row("null-date", "1970-01-01T00:00:00Z"),
            afd_row("b", "2022-11-07T00:00:01Z"),
        ],
    )
    fake = FakeProducer()
    start = time.monotonic()
    result = replay(settings, path, fake, time_scale=1e9)  # 53 years at 1e9x: 1.7 s
    assert time.monotonic() - start < 1.0
    assert fake.ids == ["a", "b"] and result.complete and result.ok
    (dl,) = fake.dead_letters()
    assert dl.dead_letter_id == "events.csv:3" and dl.error_kind == "invalid_timestamp"


# ---------------------------------------------------------------------------- resume


def test_ack_watermark_advances_only_over_a_contiguous_prefix() -> None:
    mark = AckWatermark(start=5)
    assert mark.last == 4
    for index in (7, 6, 9):
        mark.settle(index)
    assert mark.last == 4  # 5 still outstanding
    mark.settle(5)
    assert mark.last == 7  # 8 still outstanding
    mark.settle(8)
    assert mark.last == 9


def ten_rows(tmp_path: Path) -> Path:
    # File order differs from event order, so indices are positions in replay order.
    rows = [afd_row(f"ev-{i}", f"2022-11-07T00:00:{i:02d}Z") for i in range(10)]
    return write_csv(tmp_path / "ten.csv", rows[5:] + rows[:5])


def test_replay_resumes_after_last_acknowledged_row(tmp_path: Path, settings: Settings) -> None:
    path = ten_rows(tmp_path)
    first = FakeProducer(ack=lambda n: n != 4)  # message 4 fails; 5.. are acknowledged anyway
    result = replay(settings, path, first)
    assert (result.stats.acked, result.stats.failed) == (9, 1)
    assert result.last_acked_index == 3 and not result.complete
    assert load_state(result.state_file).last_acked_index == 3  # type: ignore[union-attr]

    second = FakeProducer()
    result = replay(settings, path, second)
    assert second.ids == [f"ev-{i}" for i in range(4, 10)]  # from the failed row on, nothing skipped
    assert result.start_index == 4 and result.complete


def test_killed_replay_restarts_with_no_row_skipped(tmp_path: Path, settings: Settings) -> None:
    """Whatever instant the process dies, the state on disk claims only acknowledged rows."""
    path = ten_rows(tmp_path)
    state_file = csv_replay.default_state_file(settings.stack_dir, path)
    on_disk_at_kill: list[str] = []

    class Killed(BaseException):
        pass

    def kill_at_7(n: int) -> None:
        if n == 7:
            on_disk_at_kill.append(state_file.read_text())
            raise Killed

    first = FakeProducer(ack=lambda n: None if n % 3 == 2 else True, on_produce=kill_at_7)  # 2, 5 unanswered
    with pytest.raises(Killed):
        replay(settings, path, first, checkpoint_interval_s=0)
    state_file.write_text(on_disk_at_kill[0])  # the process died here: no final save
    assert json.loads(on_disk_at_kill[0])["last_acked_index"] == 1  # 0 and 1 acked, 2 never was

    second = FakeProducer()
    replay(settings, path, second)
    assert second.ids == [f"ev-{i}" for i in range(2, 10)]


def test_from_start_ignores_saved_progress(tmp_path: Path, settings: Settings) -> None:
    path = ten_rows(tmp_path)
    replay(settings, path, FakeProducer())
    again = FakeProducer()
    assert replay(settings, path, again).stats.sent == 0  # already complete
    result = replay(settings, path, again, from_start=True)
    assert again.ids == [f"ev-{i}" for i in range(10)] and result.complete


def test_state_of_a_changed_file_is_refused(tmp_path: Path, settings: Settings) -> None:
    path = ten_rows(tmp_path)
    replay(settings, path, FakeProducer(ack=lambda n: n < 5))
    write_csv(path, [afd_row("other")])
    with pytest.raises(ReplayStateError, match="--from-start"):
        replay(settings, path, FakeProducer())


def test_csvs_of_the_same_name_in_different_folders_keep_their_own_progress(tmp_path: Path, settings: Settings) -> None:
    """Keyed by the name alone, the second was refused as "another version" of the first, and --from-start wiped
    the first one's progress."""
    (tmp_path / "monday").mkdir()
    (tmp_path / "tuesday").mkdir()
    first = ten_rows(tmp_path / "monday")
    other = write_csv(tmp_path / "tuesday" / "ten.csv", [afd_row(f"tue-{i}") for i in range(3)])
    replay(settings, first, FakeProducer(ack=lambda n: n < 5))
    assert replay(settings, other, FakeProducer()).complete
    assert replay(settings, other, FakeProducer(), from_start=True).complete
    resumed = FakeProducer()
    result = replay(settings, first, resumed)
    assert resumed.ids == [f"ev-{i}" for i in range(5, 10)] and result.complete
    assert result.state_file.name.startswith("ten-") and result.state_file.name.endswith(".state.json")


def test_a_state_saved_by_name_alone_still_resumes_the_file_whose_content_it_records(
    tmp_path: Path, settings: Settings
) -> None:
    """A replay stopped before the state was keyed by path resumes where it stopped, in that same state file."""
    path = ten_rows(tmp_path)
    by_name = settings.stack_dir / "replay" / "ten.state.json"
    replay(settings, path, FakeProducer(ack=lambda n: n < 4), state_file=by_name)
    resumed = FakeProducer()
    result = replay(settings, path, resumed)
    assert resumed.ids == [f"ev-{i}" for i in range(4, 10)] and result.state_file == by_name


def test_a_state_saved_by_name_alone_for_other_content_is_left_to_its_file(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "old").mkdir()
    old = write_csv(tmp_path / "old" / "ten.csv", [afd_row("old-0")])
    by_name = settings.stack_dir / "replay" / "ten.state.json"
    replay(settings, old, FakeProducer(), state_file=by_name)
    kept = by_name.read_text()
    fresh = FakeProducer()
    result = replay(settings, ten_rows(tmp_path), fresh)
    assert len(fresh.ids) == 10 and result.complete and result.state_file != by_name
    assert by_name.read_text() == kept


def test_state_file_is_written_atomically_where_configured(tmp_path: Path, settings: Settings) -> None:
    path = ten_rows(tmp_path)
    state_file = tmp_path / "elsewhere" / "progress.json"
    replay(settings, path, FakeProducer(), state_file=state_file)
    assert [p.name for p in state_file.parent.iterdir()] == ["progress.json"]  # no temp file left over
    state = json.loads(state_file.read_text())
    assert state["csv"] == "ten.csv" and state["total_rows"] == 10 and state["last_acked_index"] == 9
    assert len(state["sha256"]) == 64
    assert not (settings.stack_dir / "replay").exists()


def test_saved_progress_survives_a_power_cut_its_folder_synced_after_each_rename(
    tmp_path: Path, settings: Settings, disk_order: DiskOrder
) -> None:
    """Renamed with no fsync of its folder, the state's rename could be lost in a power cut: the replay then resumed
    from older progress (or from the start), sending again rows Kafka had long acknowledged."""
    state_file = tmp_path / "progress.json"
    replay(settings, ten_rows(tmp_path), FakeProducer(), state_file=state_file)
    assert disk_order.replaced_durably(state_file), disk_order.calls
    assert json.loads(state_file.read_text())["last_acked_index"] == 9


def test_the_first_progress_saved_survives_a_power_cut_with_the_new_replay_folder(
    tmp_path: Path, settings: Settings, disk_order: DiskOrder
) -> None:
    """``.stack/replay/`` was made without syncing the stack folder: a power cut could take the new folder, and the
    first progress saved in it, and the replay started again from the first row."""
    replay(settings, ten_rows(tmp_path), FakeProducer())
    assert disk_order.made_durably(settings.stack_dir / "replay"), disk_order.calls


def test_replay_csv_command_reports_progress_and_exit_code(
    tmp_path: Path,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = ten_rows(tmp_path)
    fake = FakeProducer()
    checked: list[tuple] = []
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: checked.append(topics) or fake)
    args = ["replay-csv", str(path), "--state-file", str(tmp_path / "s.json"), "--no-progress"]
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 0, result.output
    assert len(fake.ids) == 10
    assert checked == [(DEAD_LETTERS,)]  # its bad rows go there: that topic must exist too
    path.write_text("EVENT_ID\nx\n")
    assert CliRunner().invoke(pos.app, args).exit_code == 2


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        ({"sha256": 5}, "sha256 must be 64 hex digits, not 5"),
        ({"last_acked_index": "3"}, "last_acked_index must be a whole number from -1 to total_rows - 1 (9), not '3'"),
        ({"last_acked_index": -5}, "last_acked_index must be a whole number from -1 to total_rows - 1 (9), not -5"),
        ({"total_rows": None}, "total_rows must be a whole number of at least 0, not None"),
        ({"csv": ["ten.csv"]}, "csv must be a string, not ['ten.csv']"),
        ({"extra": 1}, "expected the fields csv, sha256, total_rows, last_acked_index, updated_at, not "),
    ],
)
def test_a_hand_edited_state_file_is_one_error_line_naming_the_file_and_what_is_wrong_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: dict, said: str
) -> None:
    """Such a state crashed the replay with a traceback (a number for the sha256, a text index), or resumed at the
    wrong row (a negative index counts from the end)."""
    path = ten_rows(tmp_path)
    fake = FakeProducer(ack=lambda n: n < 4)
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    state_file = tmp_path / "s.json"
    args = ["replay-csv", str(path), "--state-file", str(state_file), "--no-progress"]
    CliRunner().invoke(pos.app, args)
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | edit))
    sent = len(fake.values)
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"Error: invalid replay state {state_file}: {said}")
    assert len(fake.values) == sent, "nothing sent"


def test_a_state_file_that_is_no_json_object_is_one_error_line_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ten_rows(tmp_path)
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: FakeProducer())
    state_file = tmp_path / "s.json"
    args = ["replay-csv", str(path), "--state-file", str(state_file), "--no-progress"]
    for text, said in (("[1, 2]", "invalid replay state"), ("{", "cannot read replay state")):
        state_file.write_text(text)
        result = CliRunner().invoke(pos.app, args)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        [line] = result.output.splitlines()
        assert line.startswith(f"Error: {said} {state_file}: ")
    state_file.unlink()
    state_file.mkdir()  # not a file: it was an IsADirectoryError traceback
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 2 and result.output.startswith(f"Error: cannot read replay state {state_file}: ")


def test_a_csv_with_only_a_header_says_it_has_no_rows_not_that_they_were_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_csv(tmp_path / "empty.csv", [])
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    args = ["replay-csv", str(path), "--state-file", str(tmp_path / "s.json"), "--no-progress"]
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 0, result.output
    assert "empty.csv has a header but no data rows" in result.output
    assert "already replayed" not in result.output and fake.values == []


def test_a_file_with_nothing_to_send_says_so_without_asking_kafka(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header-only or finished file with Kafka down waited 10 s for it and ended with its error."""
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    done = ten_rows(tmp_path)
    done_args = ["replay-csv", str(done), "--state-file", str(tmp_path / "done.json"), "--no-progress"]
    assert CliRunner().invoke(pos.app, done_args).exit_code == 0 and len(fake.ids) == 10

    def kafka_down(_settings: Settings, *_topics: object) -> FakeProducer:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Kafka did not answer within 10 s"))

    monkeypatch.setattr(pos, "make_producer", kafka_down)
    empty = write_csv(tmp_path / "empty.csv", [])
    for args, says in (
        (["replay-csv", str(empty), "--state-file", str(tmp_path / "s.json"), "--no-progress"], "no data rows"),
        (done_args, "all 10 rows were already replayed"),
    ):
        result = CliRunner().invoke(pos.app, args)
        assert result.exit_code == 0 and "nothing to do: " in result.output and says in result.output, result.output
    assert json.loads((tmp_path / "s.json").read_text())["total_rows"] == 0  # its state is still written


# ---------------------------------------------------------------------------- the shared sample


@needs_sample
def test_every_sample_row_maps_and_labels_match_the_data_readme() -> None:
    rows = read_rows(SAMPLE)
    txs = [row_to_transaction(r.data) for r in rows]
    assert len(txs) == 1287
    assert Counter(tx.label for tx in txs) == {None: 801, 0: 429, 1: 57}
    assert len({tx.transaction_id for tx in txs}) == len(txs)
    assert not any(tx.store_id.startswith("fraud") for tx in txs)


@needs_sample
def test_sample_replays_in_event_time_order_once(settings: Settings) -> None:
    fake = FakeProducer()
    result = replay(settings, SAMPLE, fake)
    times = [PosTransaction.decode(v).event_time for v in fake.values]
    assert len(times) == 1287 and times == sorted(times)
    assert result.complete and not result.skipped
    assert [r.data["EVENT_ID"] for r in replay_order(read_rows(SAMPLE))] == fake.ids


# ---------------------------------------------------------------------------- bad rows (issue 12, defect 11)


def _with_bytes(path: Path, marker: str, replacement: bytes) -> Path:
    path.write_bytes(path.read_bytes().replace(marker.encode(), replacement))
    return path


def test_a_non_utf8_row_is_unreadable_and_the_rows_around_it_are_read(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "x.csv",
        [afd_row("ok-1"), afd_row("bad", customer_name="MARK"), afd_row("ok-2")],
    )
    _with_bytes(path, "MARK", b"\xff\xfeBob")
    rows = read_rows(path)
    assert [r.line for r in rows] == [2, 3, 4]
    bad = rows[1]
    assert bad.error is not None and bad.error.kind == "not_utf8" and b"\xff\xfeBob" in bad.raw
    with pytest.raises(InvalidRecord) as err:
        row_to_transaction(bad.data)
    assert err.value.kind == "not_utf8"
    assert [row_to_transaction(r.data).transaction_id for r in (rows[0], rows[2])] == ["ok-1", "ok-2"]


def test_replay_goes_on_past_a_non_utf8_row(tmp_path: Path, settings: Settings) -> None:
    path = write_csv(tmp_path / "x.csv", [afd_row("ok-1"), afd_row("bad", customer_name="MARK"), afd_row("ok-2")])
    _with_bytes(path, "MARK", b"Caf\xe9")  # Latin-1
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["ok-1", "ok-2"] and result.complete
    assert [line for line, _ in result.skipped] == [3] and "UTF-8" in result.skipped[0][1]


@pytest.mark.parametrize(
    ("field", "size", "words"),
    [
        ("user_agent", 200_000, "more than"),  # past csv's own field limit (131,072): it aborted the file
        ("user_agent", 5_000, "user_agent has 5,000 characters"),
        ("customer_name", 70_000, "more than"),
    ],
)
def test_an_oversized_field_or_row_costs_only_that_row(
    tmp_path: Path, settings: Settings, field: str, size: int, words: str
) -> None:
    path = write_csv(tmp_path / "x.csv", [afd_row("ok-1"), afd_row("big", **{field: "x" * size}), afd_row("ok-2")])
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["ok-1", "ok-2"] and result.complete
    ((line, reason),) = result.skipped
    assert line == 3 and words in reason


def test_a_field_past_the_csv_modules_limit_is_an_oversized_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", [afd_row("big", user_agent="y" * 140_000), afd_row("ok")])
    rows = read_rows(path, max_row_chars=1_000_000)  # let the row through to csv, which refuses the field
    assert rows[0].error is not None and rows[0].error.kind == "oversized" and "field limit" in rows[0].error.reason
    assert row_to_transaction(rows[1].data).transaction_id == "ok"


@pytest.mark.parametrize("closed_at", [None, 4, 12])
def test_an_unclosed_quote_costs_its_row_not_the_rest_of_the_file(
    tmp_path: Path, settings: Settings, closed_at: int | None
) -> None:
    """A field opens a quote that no later line closes, or one a later row's quoted field closes."""
    good = [
        afd_row(f"ok-{i}", f"2022-11-07T00:00:{i:02d}Z", customer_job="Conservator", user_agent="Opera/8.42")
        for i in range(20)
    ]
    if closed_at is not None:
        good[closed_at]["user_agent"] = "Mozilla/5.0 (X11, Linux)"  # written quoted: its quote closes ours
    path = write_csv(tmp_path / "x.csv", [good[0], afd_row("open", customer_name="MARK", customer_job="C"), *good[1:]])
    _with_bytes(path, "MARK", b'"Bob')
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == [f"ok-{i}" for i in range(20)] and result.complete
    ((line, reason),) = result.skipped
    assert line == 3 and "unclosed quote" in reason
    assert [r.line for r in read_rows(path)] == list(range(2, 23))


def test_a_quoted_field_over_a_few_lines_is_still_one_row(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "x.csv", [afd_row("ok-1", billing_street="1 Main St\nFlat 2\nBack door"), afd_row("ok-2")]
    )
    rows = read_rows(path)
    assert [r.line for r in rows] == [2, 5] and all(r.error is None for r in rows)
    assert row_to_transaction(rows[0].data).billing_street == "1 Main St\nFlat 2\nBack door"


@pytest.mark.parametrize(
    ("overrides", "column"),
    [
        ({"EVENT_ID": "x/../Q2XX-VICTIM-0001/reboot?"}, "EVENT_ID"),
        ({"EVENT_ID": "ev 1"}, "EVENT_ID"),
        ({"EVENT_ID": "../etc"}, "EVENT_ID"),
        ({"ENTITY_ID": "c/../../admin"}, "ENTITY_ID"),
        ({"ENTITY_ID": "c%2F1"}, "ENTITY_ID"),
    ],
)
def test_ids_with_path_characters_are_invalid_id(overrides: dict[str, str], column: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        row_to_transaction(afd_row("ev", **overrides))
    assert err.value.kind == "invalid_id" and column in err.value.reason and "../" not in err.value.reason


@pytest.mark.parametrize("price", ["nan", "NaN", "inf", "-Infinity", "1e400", "-3"])
def test_nan_infinite_and_negative_amounts_are_invalid_amount(price: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        row_to_transaction(afd_row("ev", order_price=price))
    assert err.value.kind == "invalid_amount" and "order_price" in err.value.reason


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ({"billing_latitude": "91"}, "invalid"),
        ({"billing_longitude": "-180.5"}, "invalid"),
        ({"billing_latitude": "inf"}, "invalid"),
        ({"EVENT_TIMESTAMP": "9999-12-31T00:00:00Z"}, "invalid_timestamp"),
        ({"EVENT_TIMESTAMP": "0001-01-01T00:00:00Z"}, "invalid_timestamp"),
        ({"payment_currency": "US"}, "invalid_currency"),
        ({"EVENT_ID": ""}, "missing_field"),
    ],
)
def test_out_of_range_values_are_dead_letter_kinds(overrides: dict[str, str], kind: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        row_to_transaction(afd_row("ev", **overrides))
    assert err.value.kind == kind


def test_a_long_merchant_name_still_maps_to_a_valid_distinct_store_id() -> None:
    a = merchant_slug("fraud_" + "Very Long Merchant Name " * 10 + "A")
    b = merchant_slug("fraud_" + "Very Long Merchant Name " * 10 + "B")
    assert len(a) <= 64 and NAME_RE.fullmatch(a) and a != b
    assert a == merchant_slug("fraud_" + "Very Long Merchant Name " * 10 + "A")


@pytest.mark.parametrize(
    ("one", "other", "start"),
    [
        ("東京ストア 1", "大阪ストア 1", "1-"),
        ("Москва Store", "Санкт-Петербург Store", "store-"),
        ("商店", "百貨店", ""),
        ("दाल भंडार 1", "दिल भंडार 1", "1-"),  # a vowel sign tells them apart
        ("パン屋 1", "バン屋 1", "1-"),
    ],
    ids=["japanese", "cyrillic", "chinese, no ascii at all", "devanagari marks", "kana voicing mark"],
)
def test_merchant_names_with_letters_that_have_no_ascii_form_get_distinct_stable_store_ids(
    one: str, other: str, start: str
) -> None:
    """The slug dropped what has no ASCII form: '東京ストア 1' and '大阪ストア 1' were one store, '1'; '商店' none."""
    a, b = merchant_slug(one), merchant_slug(other)
    assert a != b and all(NAME_RE.fullmatch(s) for s in (a, b))
    assert a.startswith(start) and re.fullmatch(r"[0-9a-f]{12}", a.removeprefix(start)), "readable part, then a hash"
    assert merchant_slug(f"  {one.upper()}  ") == a == merchant_slug(one), "case and spacing fold as in the slug"


@pytest.mark.parametrize(
    ("name", "store"),
    [
        ("Łódź Market", "odz-market"),
        ("Bäckerei Straße", "backerei-strae"),
        ("Joe's ❤️ Cafe", "joe-s-cafe"),  # an emoji's variation selector is no letter
        ("Café 1️⃣", "cafe-1"),
        ("１２３ Shop", "123-shop"),
        ("Hawaiʻi Market", "hawaii-market"),  # a modifier letter
        ("Micro µ Tech", "micro-tech"),  # a sign NFKD reads as Greek
        ("ℵ Books", "books"),
    ],
)
def test_latin_names_and_symbols_keep_the_store_ids_they_had(name: str, store: str) -> None:
    """A changed id splits one store's history in two on a replay across the upgrade."""
    assert merchant_slug(name) == store


def test_an_accent_on_a_latin_letter_beside_another_script_does_not_make_another_store() -> None:
    assert merchant_slug("Kafé 東京") == merchant_slug("Kafe 東京") != merchant_slug("Kafe 大阪")


def test_a_long_merchant_name_with_letters_the_slug_loses_stays_a_valid_store_id() -> None:
    a = merchant_slug("東京" * 40 + " Very Long Store Name" * 5)
    b = merchant_slug("大阪" * 40 + " Very Long Store Name" * 5)
    assert len(a) == 64 and NAME_RE.fullmatch(a) and a.startswith("very-long-store-name-") and a != b


def test_a_header_that_is_not_utf8_rejects_the_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", [afd_row("ok")])
    _with_bytes(path, "merchant", b"merch\xffant")
    with pytest.raises(CsvFormatError, match="header"):
        read_rows(path)


def test_a_column_named_twice_rejects_the_file(tmp_path: Path) -> None:
    """The last copy won silently (a second order_price of 1 made every row cost 1); the labels reader took the
    first: the two disagreed on the same file."""
    path = tmp_path / "x.csv"
    write_csv(path, [afd_row("ok")])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",order_price", *(line + ",1" for line in lines[1:])]) + "\n")
    with pytest.raises(CsvFormatError, match="names column.s. order_price more than once"):
        read_rows(path)


def test_dead_letter_of_a_row_is_named_by_file_and_line_and_carries_its_bytes(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "x.csv", [afd_row("bad-utf8", customer_name="MARK"), afd_row("bad-price", order_price="nan")]
    )
    _with_bytes(path, "MARK", b"\xff")
    unreadable, unmappable = read_rows(path)
    assert unreadable.error is not None
    dl = row_dead_letter("x.csv", unreadable, unreadable.error, failed_at=5)
    assert (dl.dead_letter_id, dl.source_topic, dl.offset, dl.stage) == ("x.csv:2", "x.csv", 2, "csv_replay")
    assert dl.error_kind == "not_utf8" and dl.payload == unreadable.raw and b"\xff" in dl.payload
    with pytest.raises(InvalidRecord) as err:
        transaction_of(unmappable)
    dl = row_dead_letter("x.csv", unmappable, err.value, failed_at=5)
    assert dl.dead_letter_id == "x.csv:3" and dl.key == b"bad-price" and dl.error_kind == "invalid_amount"
    (values,) = csv.reader(io.StringIO(dl.payload.decode()))
    assert values == list(afd_row("bad-price", order_price="nan").values())
    assert DeadLetter.decode(dl.encode()) == dl


def test_an_exception_the_mapping_did_not_anticipate_costs_only_the_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_row: object) -> PosTransaction:
        raise TypeError("unexpected")

    monkeypatch.setattr(csv_replay, "row_to_transaction", broken)
    with pytest.raises(InvalidRecord) as err:
        transaction_of(CsvRow(2, dict(afd_row("ev"))))
    assert err.value.kind == "invalid" and "TypeError" in err.value.reason


def test_each_bad_row_is_a_dead_letter_with_its_reason_and_the_rest_is_replayed(
    tmp_path: Path, settings: Settings
) -> None:
    path = write_csv(
        tmp_path / "x.csv",
        [
            afd_row("ok-1", "2022-11-07T00:00:01Z"),
            afd_row("latin1", "2022-11-07T00:00:02Z", customer_name="MARK"),  # line 3
            afd_row("huge", "2022-11-07T00:00:03Z", user_agent="x" * 200_000),  # line 4
            afd_row("x/../reboot", "2022-11-07T00:00:04Z"),  # line 5
            afd_row("nan", "2022-11-07T00:00:05Z", order_price="nan"),  # line 6
            afd_row("ok-2", "2022-11-07T00:00:06Z"),
        ],
    )
    _with_bytes(path, "MARK", b"Caf\xe9")
    fake = FakeProducer()
    result = replay(settings, path, fake)
    assert fake.ids == ["ok-1", "ok-2"] and result.complete
    dead = {dl.dead_letter_id: dl for dl in fake.dead_letters()}
    assert {k: dl.error_kind for k, dl in dead.items()} == {
        "x.csv:3": "not_utf8",
        "x.csv:4": "oversized",
        "x.csv:5": "invalid_id",
        "x.csv:6": "invalid_amount",
    }
    assert b"Caf\xe9" in dead["x.csv:3"].payload and all(dl.stage == "csv_replay" for dl in dead.values())
    assert sorted(line for line, _ in result.skipped) == [3, 4, 5, 6]  # unreadable rows come last


def test_a_bad_row_is_done_only_once_its_dead_letter_is_delivered(tmp_path: Path, settings: Settings) -> None:
    path = write_csv(
        tmp_path / "x.csv",
        [afd_row("ok-1", "2022-11-07T00:00:01Z"), afd_row("bad", "2022-11-07T00:00:02Z", order_price="nan")],
    )
    first = FakeProducer(ack=lambda n: n != 1)  # the dead letter (message 1) fails
    result = replay(settings, path, first)
    assert result.last_acked_index == 0 and not result.complete
    second = FakeProducer()
    result = replay(settings, path, second)
    assert second.ids == [] and [dl.dead_letter_id for dl in second.dead_letters()] == ["x.csv:3"]
    assert result.complete


def test_replay_csv_exits_1_when_a_bad_rows_dead_letter_is_not_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every transaction acknowledged but a dead letter refused: the row is not done, so no exit 0."""
    path = write_csv(
        tmp_path / "x.csv",
        [afd_row("ok-1", "2022-11-07T00:00:01Z"), afd_row("bad", "2022-11-07T00:00:02Z", order_price="nan")],
    )
    fake = FakeProducer(ack=lambda n: n != 1)  # message 1 is the dead letter
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    args = ["replay-csv", str(path), "--state-file", str(tmp_path / "s.json"), "--no-progress"]
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 1, result.output
    assert "1 dead letter(s) of bad rows not delivered" in result.output
    assert "dead letter delivery error: delivery failed" in result.output
    fake.ack = lambda n: True
    assert CliRunner().invoke(pos.app, args).exit_code == 0  # the rerun delivers it and completes


def test_a_csv_that_changes_while_it_is_read_is_refused_not_resumed_as_the_new_content(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file still being copied or exported when the replay starts: the rows read are the partial file's, and the
    state must not record the finished file's sha256, or the rerun on the finished file resumes past rows it never
    sent (here the row the partial file cut short, dead-lettered, and the rows stamped before the resume point)."""
    path = tmp_path / "growing.csv"
    whole = [afd_row(f"ev-{i}", f"2022-11-07T00:00:{i:02d}Z") for i in range(6)]
    write_csv(path, whole[3:5])
    partial = path.read_bytes()
    finished = write_csv(tmp_path / "finished.csv", whole).read_bytes()
    path.write_bytes(partial)
    real_read_rows = pos.read_rows

    def read_then_the_copy_finishes(p: Path) -> list[Any]:
        rows = real_read_rows(p)
        path.write_bytes(finished)
        return rows

    monkeypatch.setattr(pos, "read_rows", read_then_the_copy_finishes)
    with pytest.raises(CsvFormatError, match="changed while"):
        replay(settings, path, FakeProducer())
    monkeypatch.setattr(pos, "read_rows", real_read_rows)
    again = FakeProducer()
    assert replay(settings, path, again).complete
    assert again.ids == [f"ev-{i}" for i in range(6)]


def test_a_csv_whose_file_name_is_not_utf8_is_replayed_and_its_bad_rows_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name with bytes that are not UTF-8 (a Latin-1 ``café``) crashed at the first bad row's dead letter."""
    name = os.fsdecode(b"caf\xe9.csv")
    path = write_csv(
        tmp_path / name,
        [afd_row("ok-1", "2022-11-07T00:00:01Z"), afd_row("bad", "2022-11-07T00:00:02Z", order_price="nan")],
    )
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    args = ["replay-csv", str(path), "--state-file", str(tmp_path / "s.json"), "--no-progress"]
    result = CliRunner().invoke(pos.app, args)
    assert result.exit_code == 0, result.output
    assert fake.ids == ["ok-1"] and [dl.dead_letter_id for dl in fake.dead_letters()] == ["caf\\xe9.csv:3"]
    assert "replay caf\\xe9.csv" in result.output


class KafkaDown(FakeProducer):
    """Answers the first ``answered`` messages, then nothing; ``flush`` waits its timeout out, as librdkafka's
    does while a broker is away, and fails the test once it has waited ``limit_s`` in all."""

    def __init__(self, answered: int, stop_at: int, limit_s: float = 3.0) -> None:
        super().__init__(ack=lambda n: True if n < answered else None, on_produce=self._stop_at)
        self.stop, self.limit_s, self.flushed_s = stop_at, limit_s, 0.0

    def _stop_at(self, n: int) -> None:
        if n == self.stop:
            raise KeyboardInterrupt  # SIGTERM, as sigterm_as_interrupt turns it

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        time.sleep(timeout)
        self.flushed_s += timeout
        assert self.flushed_s < self.limit_s, "the final flush waited past its limit"
        return sum(1 for n in range(len(self.values)) if self.ack(n) is None)


def test_a_stop_while_kafka_is_down_waits_at_most_the_stop_flush_time_and_the_state_counts_no_unacked_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM with Kafka down: the flush waited out librdkafka's five-minute message timeout. Now it stops after
    CG_KAFKA__STOP_FLUSH_S, says how many rows Kafka did not acknowledge, and the state stops before them."""
    path = ten_rows(tmp_path)
    fake = KafkaDown(answered=2, stop_at=6)
    stack = tmp_path / "stack"
    monkeypatch.setattr(pos, "get_settings", lambda: Settings(stack_dir=stack, kafka={"stop_flush_s": 0.5}))
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *topics: fake)
    args = ["replay-csv", str(path), "--state-file", str(tmp_path / "s.json"), "--no-progress"]
    started = time.monotonic()
    result = CliRunner().invoke(pos.app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert 0.4 <= time.monotonic() - started < 2.5
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 1, said
    assert "4 row(s) sent but not acknowledged by Kafka" in said and "the saved progress does not count them" in said
    state = load_state(tmp_path / "s.json")
    assert state is not None and state.last_acked_index == 1  # rows 0 and 1 only: acknowledged
