"""Labels from the field: the record and its deterministic id, chargeback files in both shapes (bad rows
with their lines), publishing with a stand-in producer, the verdict in force per transaction (last
published wins, tombstones withdraw), and the join to the transaction history."""

from __future__ import annotations

import codecs
import io
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, TopicPartition
from typer.testing import CliRunner

import jobs.model.labels as reader
import producers.labels as labels_cli
from infra.cli import main
from infra.clients import topic_replay
from infra.clients.topic_replay import PartitionRange
from infra.settings import KafkaSettings, Settings
from jobs.model.labels import FieldLabels, apply_labels, decode_transactions, latest_labels
from producers.labels import (
    FRAUD_DETECTOR,
    SIMPLE,
    Defaults,
    LabelFileError,
    file_encoding,
    labels_from_csv,
    parse_decided_at,
    parse_verdict,
    publish_labels,
)
from schemas.codec import MAGIC
from schemas.errors import InvalidRecord
from schemas.records import MAX_LABEL_TEXT, Label, make_label
from schemas.topics import ALL_TOPICS, LABELS
from tests.builders import T0, partitions_led, sale

NOW = T0 + 30 * 86_400_000
DEFAULTS = Defaults(source="chargeback", decided_at=NOW - 1000, now_ms=NOW, decided_by="issuer", reason="chargeback")


def verdict(tx: str, label: int = 1, *, at: int = NOW, source: str = "cli", **kw: Any) -> Label:
    return make_label(transaction_id=tx, label=label, source=source, decided_at=at, **kw)


def csv_labels(text: str, defaults: Defaults = DEFAULTS):
    return labels_from_csv(io.StringIO(text), defaults)


# ---------------------------------------------------------------------------- the record


def test_a_label_round_trips_and_its_id_is_deterministic() -> None:
    first = verdict("tx-1", 1, reason="card reported stolen", case_id="case-7", decided_by="ana@store.test")
    again = verdict("tx-1", 1, reason="card reported stolen", case_id="case-7", decided_by="ana@store.test")
    assert first.label_id == again.label_id == f"cli:{NOW}:tx-1"
    assert first.encode() == again.encode(), "publishing the same verdict again writes the very same record"
    assert Label.decode(first.encode()) == first
    assert verdict("tx-1", at=NOW + 1).label_id != first.label_id
    assert verdict("tx-1", source="case").label_id != first.label_id


@pytest.mark.parametrize(
    "kw,kind",
    [
        ({"transaction_id": "a/../b"}, "invalid_id"),
        ({"transaction_id": ""}, "invalid_id"),
        ({"label": 2}, "invalid"),
        ({"label": True}, "invalid"),
        ({"label": "1"}, "invalid"),
        ({"source": "rumour"}, "invalid"),
        ({"decided_at": -1}, "invalid"),
        ({"decided_at": 4_102_444_800_000}, "invalid"),
        ({"case_id": "case 7?"}, "invalid_id"),
    ],
)
def test_an_invalid_label_is_refused_with_a_kind(kw: dict[str, Any], kind: str) -> None:
    args: dict[str, Any] = {"transaction_id": "tx-1", "label": 1, "source": "cli", "decided_at": NOW, **kw}
    with pytest.raises(InvalidRecord) as err:
        make_label(**args)
    assert err.value.kind == kind


def test_label_text_is_trimmed_and_capped() -> None:
    label = verdict("tx-1", decided_by="  ", reason="x" * 5000)
    assert label.decided_by is None
    assert label.reason is not None and len(label.reason.encode()) <= MAX_LABEL_TEXT and "cut" in label.reason


def test_the_labels_topic_is_declared_compacted_and_keyed_by_transaction() -> None:
    assert LABELS in ALL_TOPICS and LABELS.record_type == "Label" and LABELS.partitions == 3
    assert LABELS.config["cleanup.policy"] == "compact" and "retention.ms" not in LABELS.config
    assert LABELS.key.startswith("transaction_id")


@pytest.mark.parametrize(
    "text,value", [("fraud", 1), ("FRAUD", 1), ("1", 1), (" legit ", 0), ("Legitimate", 0), ("0", 0)]
)
def test_verdict_words(text: str, value: int) -> None:
    assert parse_verdict(text) == value


@pytest.mark.parametrize("text", ["", "maybe", "2", None, "yes"])
def test_a_verdict_that_is_no_verdict(text: object) -> None:
    with pytest.raises(InvalidRecord):
        parse_verdict(text)


# ---------------------------------------------------------------------------- files


SIMPLE_CSV = """transaction_id,label,reason,decided_at
tx-1,fraud,stolen card,2026-01-20T10:00:00Z
tx-2,legit,,
tx-3,1,,1768903200000

tx-4,0,friendly fraud refuted,
"""


def test_a_simple_file_gives_a_verdict_per_row_with_the_defaults_where_a_row_says_nothing() -> None:
    found = csv_labels(SIMPLE_CSV)
    assert found.format == SIMPLE and not found.bad and found.rows == 4
    by_tx = {label.transaction_id: label for label in found.labels}
    assert [by_tx[t].label for t in ("tx-1", "tx-2", "tx-3", "tx-4")] == [1, 0, 1, 0]
    assert by_tx["tx-1"].decided_at == 1_768_903_200_000 == by_tx["tx-3"].decided_at
    assert by_tx["tx-1"].reason == "stolen card" and by_tx["tx-2"].reason == "chargeback"
    assert by_tx["tx-2"].decided_at == DEFAULTS.decided_at and by_tx["tx-2"].decided_by == "issuer"
    assert {label.source for label in found.labels} == {"chargeback"}
    assert (found.fraud, found.legit) == (2, 2)


def test_importing_the_same_file_twice_gives_the_same_records() -> None:
    first, again = csv_labels(SIMPLE_CSV), csv_labels(SIMPLE_CSV)
    assert [label.encode() for label in first.labels] == [label.encode() for label in again.labels]


def test_bad_rows_are_reported_with_their_line_and_reason_and_left_out() -> None:
    text = (
        "transaction_id,label,decided_at\n"  # line 1
        "tx-ok,fraud,\n"  # 2
        "tx/../etc,fraud,\n"  # 3: not a plain id
        ",legit,\n"  # 4: no id
        "tx-5,maybe,\n"  # 5: no verdict
        "tx-6,,\n"  # 6: empty verdict
        "tx-7,fraud,2099-01-01T00:00:00Z\n"  # 7: in the future
        "tx-8,fraud,yesterday\n"  # 8: not a time
        "tx-9,fraud,,surplus\n"  # 9: more fields than the header
        '"tx-10\nstill the id",fraud,\n'  # 10-11: a quoted id over two lines
        "tx-12,legit,\n"  # 12
    )
    found = csv_labels(text)
    assert [label.transaction_id for label in found.labels] == ["tx-ok", "tx-12"]
    bad = {b.line: b.reason for b in found.bad}
    assert sorted(bad) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "transaction_id is not a valid identifier" in bad[3] and "tx/" not in bad[3]
    assert bad[4] == "transaction_id is empty" and "verdict" in bad[5] and bad[6] == "label is empty"
    assert "future" in bad[7] and "ISO-8601" in bad[8] and "more field" in bad[9]
    assert found.rows == 10


@pytest.mark.parametrize(
    ("when", "said"),
    [("1969-12-31T23:59:59Z", "before 1970"), ("9999-12-31T23:00:00-05:00", "after 9999-12-31")],
    ids=["before-1970", "past-9999"],
)
def test_a_decided_at_out_of_range_says_which_bound_it_crossed_not_that_it_is_no_time(when, said) -> None:
    """A well-formed time before 1970 was refused as "not ISO-8601 or epoch milliseconds"."""
    found = csv_labels(f"transaction_id,label,decided_at\ntx-1,fraud,{when}\n")
    [bad] = found.bad
    assert said in bad.reason and "ISO-8601" not in bad.reason
    with pytest.raises(InvalidRecord, match=said):
        parse_decided_at(when, NOW)


def test_a_trailing_separator_after_the_last_column_is_not_a_bad_row() -> None:
    """A spreadsheet's export ends rows with a separator: ``tx-1,fraud,`` under a two-column header."""
    found = csv_labels("transaction_id,label\ntx-1,fraud,\ntx-2,legit,,\ntx-3,fraud,x\n")
    assert [label.transaction_id for label in found.labels] == ["tx-1", "tx-2"]
    assert [(b.line, b.reason) for b in found.bad] == [(4, "1 more field(s) than the header")]


@pytest.mark.parametrize(
    "when", ["\u00b2", "\u0663\u0663", "1" * 5000], ids=["superscript", "arabic-indic", "5000 digits"]
)
def test_a_time_of_digits_python_reads_but_int_refuses_is_one_bad_row_not_a_stopped_import(when) -> None:
    """``str.isdigit`` takes superscripts and other scripts' digits, and ``int`` refuses them (or 5,000 digits)
    with a ValueError: the import stopped with a traceback instead of leaving that row out."""
    found = csv_labels(
        f"transaction_id,label,decided_at\ntx-1,fraud,2026-01-01T00:00:00Z\ntx-2,fraud,{when}\ntx-3,legit,\n"
    )
    assert [label.transaction_id for label in found.labels] == ["tx-1", "tx-3"]
    assert [b.line for b in found.bad] == [3] and "ISO-8601" in found.bad[0].reason
    with pytest.raises(topic_replay.RangeError):
        topic_replay.parse_time_ms(when)
    with pytest.raises(topic_replay.RangeError):
        topic_replay.parse_offsets(when)


def test_conflicting_verdicts_for_one_transaction_are_bad_on_every_line_and_repeats_count_once() -> None:
    text = "transaction_id,label\ntx-1,fraud\ntx-2,legit\ntx-1,legit\ntx-2,0\ntx-2,legit\n"
    found = csv_labels(text)
    assert [label.transaction_id for label in found.labels] == ["tx-2"]
    assert found.duplicates == 2
    assert [(b.line, b.reason) for b in found.bad] == [
        (2, "conflicting verdicts for this transaction on lines 2, 4"),
        (4, "conflicting verdicts for this transaction on lines 2, 4"),
    ]


def test_of_one_transactions_repeated_verdict_the_one_decided_last_is_published_the_lower_row_on_a_tie() -> None:
    """Analysts expect the verdict in force to be the latest decision (its time, reason and who decided), as
    the topic keeps the last one published; the first row was published whatever its ``decided_at``."""
    text = (
        "transaction_id,label,reason,decided_at,decided_by\n"
        "tx-1,fraud,disputed,2026-01-05T00:00:00Z,issuer\n"
        "tx-1,fraud,chargeback confirmed,2026-01-20T00:00:00Z,ana\n"
        "tx-1,fraud,first call,2026-01-01T00:00:00Z,bo\n"
        "tx-2,legit,looked fine,2026-01-07T00:00:00Z,ana\n"
        "tx-2,legit,checked the receipt,2026-01-07T00:00:00Z,bo\n"
    )
    found = csv_labels(text)
    published = {label.transaction_id: (label.reason, label.decided_by) for label in found.labels}
    assert published == {"tx-1": ("chargeback confirmed", "ana"), "tx-2": ("checked the receipt", "bo")}
    assert [label.decided_at for label in found.labels if label.transaction_id == "tx-1"] == [
        parse_decided_at("2026-01-20T00:00:00Z", NOW)
    ]
    assert [(row.line, row.by) for row in found.superseded] == [(2, 3), (4, 3), (5, 6)]
    assert not found.bad and found.duplicates == 3
    no_times = csv_labels("transaction_id,label,reason\ntx-1,fraud,first\ntx-1,fraud,second\n")
    assert [label.reason for label in no_times.labels] == ["second"]  # one time for all: the lower row


def test_a_repeated_verdict_with_its_own_decided_at_beats_rows_without_one() -> None:
    """A row with an empty ``decided_at`` takes the import's time: it beat every row with a real, earlier time,
    though nothing says it was decided later. A row with its own time wins now; of rows without one, the lower
    row; the published time of a row without one is still the import's."""
    text = (
        "transaction_id,label,reason,decided_at\n"
        "tx-1,fraud,chargeback confirmed,2026-01-20T00:00:00Z\n"
        "tx-1,fraud,no date,\n"
        "tx-1,fraud,disputed,2026-01-05T00:00:00Z\n"
        "tx-2,legit,first,\n"
        "tx-2,legit,second,\n"
    )
    found = csv_labels(text)
    published = {label.transaction_id: (label.reason, label.decided_at) for label in found.labels}
    assert published == {
        "tx-1": ("chargeback confirmed", parse_decided_at("2026-01-20T00:00:00Z", NOW)),
        "tx-2": ("second", DEFAULTS.decided_at),
    }
    assert [(row.line, row.by) for row in found.superseded] == [(3, 2), (4, 2), (5, 6)]


def test_a_fraud_detector_file_takes_event_id_and_label_and_skips_unlabelled_rows() -> None:
    text = (
        "EVENT_TIMESTAMP,EVENT_ID,ENTITY_ID,order_price,EVENT_LABEL\n"
        "2026-01-01T00:00:00Z,ev-1,c1,10.0,1\n"
        "2026-01-01T00:01:00Z,ev-2,c1,11.0,\n"
        "2026-01-01T00:02:00Z,ev-3,c2,12.0,legit\n"
        "2026-01-01T00:03:00Z,ev 4,c2,12.0,fraud\n"
    )
    found = csv_labels(text)
    assert found.format == FRAUD_DETECTOR
    assert [(label.transaction_id, label.label) for label in found.labels] == [("ev-1", 1), ("ev-3", 0)]
    assert found.unlabelled == 1
    assert [b.line for b in found.bad] == [5] and "EVENT_ID" in found.bad[0].reason
    assert all(label.decided_at == DEFAULTS.decided_at for label in found.labels), "EVENT_TIMESTAMP is not the verdict"


@pytest.mark.parametrize("delimiter", ["\t", ";"])
def test_tab_or_semicolon_separated_files_read_as_comma_separated_ones(delimiter: str) -> None:
    text = 'transaction_id,label,reason\ntx-1,fraud,"stolen, then used"\ntx-2,legit,\n'
    found = csv_labels(text.replace(",", delimiter).replace(f"stolen{delimiter} then", "stolen, then"))
    assert found.format == SIMPLE and not found.bad
    assert [(x.transaction_id, x.label, x.reason) for x in found.labels] == [
        ("tx-1", 1, "stolen, then used"),
        ("tx-2", 0, DEFAULTS.reason),
    ]


@pytest.mark.parametrize("delimiter", [",", "\t", ";"])
def test_blank_lines_before_the_header_are_skipped_and_lines_keep_their_numbers(delimiter: str) -> None:
    """An export or hand edit that starts with blank lines was refused whole: the first, blank, line was taken for
    the header ("the header needs the columns transaction_id,label")."""
    text = "\n \r\n\ntransaction_id,label\ntx-1,fraud\n\ntx-2,maybe\n".replace(",", delimiter)
    found = csv_labels(text)
    assert found.format == SIMPLE and [x.transaction_id for x in found.labels] == ["tx-1"]
    assert [b.line for b in found.bad] == [7], "the physical line, blank ones counted"


@pytest.mark.parametrize(
    "opened",
    ['tx-1,fraud,"card stolen\n', 'tx-1,fraud,"card stolen\r\n', 'tx-1,"fraud\n', "EOF"],
    ids=["reason", "crlf", "verdict", "fraud-detector"],
)
def test_a_quote_left_open_costs_its_row_not_every_later_verdict_of_the_file(opened: str) -> None:
    """csv ran the quoted field on to the end of the file (or to the next quote): the later verdicts became one
    row's reason, none published and none reported, and the import exited 0 with the rows before it published."""
    if opened == "EOF":  # Fraud Detector's shape: EVENT_ID, then EVENT_LABEL
        text = 'EVENT_ID,EVENT_LABEL,note\ntx-1,fraud,"card stolen\ntx-2,legit,ok\ntx-3,fraud,"x"\n'
    else:
        text = "transaction_id,label,reason\n" + opened + 'tx-2,legit,ok\ntx-3,fraud,"x"\n'
    found = csv_labels(text)
    assert [(x.transaction_id, x.label) for x in found.labels] == [("tx-2", 0), ("tx-3", 1)]
    assert [(b.line, b.reason) for b in found.bad] == [(2, "a quote opened on this line is not closed before line 3")]


def test_a_reason_quoted_over_several_lines_is_still_one_row() -> None:
    text = 'transaction_id,label,reason\ntx-1,fraud,"card stolen,\nsays the issuer\n0, fraud"\ntx-2,legit,ok\n'
    found = csv_labels(text)
    assert [(x.transaction_id, x.reason) for x in found.labels] == [
        ("tx-1", "card stolen,\nsays the issuer\n0, fraud"),
        ("tx-2", "ok"),
    ]
    assert not found.bad


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-8"])
def test_a_utf16_export_reads_as_its_utf8_copy(tmp_path, encoding: str) -> None:
    """Excel's "Unicode text" is UTF-16 with a byte-order mark, tab-separated: it was a header error."""
    path = tmp_path / "chargebacks.txt"
    data = "transaction_id\tlabel\treason\ntx-1\tfraud\tcarte volée\n"
    path.write_bytes((codecs.BOM_UTF16_BE if encoding == "utf-16-be" else b"") + data.encode(encoding))
    with path.open(newline="", encoding=file_encoding(path), errors="replace") as f:
        found = labels_from_csv(f, DEFAULTS)
    assert [(x.transaction_id, x.label, x.reason) for x in found.labels] == [("tx-1", 1, "carte volée")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "id,verdict\ntx-1,fraud\n",
        "EVENT_ID,order_price\nev-1,1\n",
        "transaction_id,label,Label\ntx-1,fraud,legit\n",  # which verdict? (the first copy was taken, silently)
    ],
)
def test_a_file_without_a_usable_header_is_refused_whole(text: str) -> None:
    with pytest.raises(LabelFileError):
        csv_labels(text)


# ---------------------------------------------------------------------------- publishing


class FakeProducer:
    def __init__(self, fail: set[bytes] | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.pending: list[tuple[Any, bytes | None]] = []
        self.fail = fail or set()
        self.timeout: set[bytes] = set()
        self.down = False
        self.no_topics = False

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: broker transport failure"))
        return SimpleNamespace(
            topics={} if self.no_topics else {"unit.labels": SimpleNamespace(error=None, partitions=partitions_led(1))}
        )

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None, on_delivery: Any = None):
        self.sent.append((topic, key, value))
        self.pending.append((on_delivery, key))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        for callback, key in self.pending:
            error = _Error() if key in self.fail else _Error(KafkaError._MSG_TIMED_OUT) if key in self.timeout else None
            callback(error, None)
        self.pending.clear()
        return 0


class _Error:
    def __init__(self, code: int = KafkaError.MSG_SIZE_TOO_LARGE) -> None:
        self._code = code

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return "timed out" if self._code == KafkaError._MSG_TIMED_OUT else "broker says no"


SETTINGS = Settings(kafka=KafkaSettings(topic_prefix="unit."))


def test_labels_are_published_keyed_by_transaction_and_withdrawals_are_tombstones() -> None:
    producer = FakeProducer()
    labels = [verdict("tx-1", 1), verdict("tx-2", 0)]
    stats = publish_labels(SETTINGS, labels, withdraw=["tx-3"], producer=producer)
    assert stats.ok and (stats.sent, stats.acked) == (3, 3)
    assert [(t, k) for t, k, _ in producer.sent] == [
        ("unit.labels", b"tx-1"),
        ("unit.labels", b"tx-2"),
        ("unit.labels", b"tx-3"),
    ]
    assert Label.decode(producer.sent[0][2] or b"") == labels[0] and producer.sent[2][2] is None


def test_a_failed_delivery_is_counted() -> None:
    stats = publish_labels(SETTINGS, [verdict("tx-1"), verdict("tx-2")], producer=FakeProducer(fail={b"tx-2"}))
    assert not stats.ok and (stats.acked, stats.failed) == (1, 1) and stats.errors == ["broker says no"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    producer = FakeProducer()
    monkeypatch.setattr(labels_cli, "get_settings", lambda: SETTINGS)
    monkeypatch.setattr(labels_cli, "make_producer", lambda _settings: producer)
    monkeypatch.setattr(labels_cli, "cli_user", lambda: "tester")
    return producer


def test_cli_publish_one_verdict(cli: FakeProducer) -> None:
    result = CliRunner().invoke(
        labels_cli.app, ["publish", "tx-9", "fraud", "--reason", "caught on camera", "--case", "case-1"]
    )
    assert result.exit_code == 0, result.output
    [(topic, key, value)] = cli.sent
    label = Label.decode(value or b"")
    assert (topic, key) == ("unit.labels", b"tx-9")
    assert (label.label, label.source, label.decided_by, label.case_id) == (1, "cli", "tester", "case-1")


def test_a_cli_verdict_by_a_user_the_system_cannot_name_is_decided_by_the_user_id(
    monkeypatch: pytest.MonkeyPatch, user_without_name: str
) -> None:
    """It was decided by nobody (``None``), where rules publish and models promote record the user id."""
    producer = FakeProducer()
    monkeypatch.setattr(labels_cli, "get_settings", lambda: SETTINGS)
    monkeypatch.setattr(labels_cli, "make_producer", lambda _settings: producer)
    result = CliRunner().invoke(labels_cli.app, ["publish", "tx-9", "fraud"])
    assert result.exit_code == 0, result.output
    assert Label.decode(producer.sent[0][2] or b"").decided_by == user_without_name


def test_cli_with_kafka_down_says_so_in_one_line_and_sends_nothing(cli: FakeProducer, capsys) -> None:
    """It used to wait a minute for acknowledgements, printing librdkafka's reconnect failures (600 lines)."""
    cli.down = True
    for args in (["publish", "tx-9", "fraud"], ["withdraw", "tx-9"]):
        with pytest.raises(SystemExit) as exit_:
            main(["labels", *args])  # the console, as python -m runs it too (infra.cli.run_tool)
        out, err = capsys.readouterr()
        assert exit_.value.code == 1 and err.count("\n") == 1, err
        assert out == "", out  # no verdict line that reads as if it had been sent
        assert err.startswith(f"Error: Kafka at {SETTINGS.kafka.bootstrap} did not answer within 10 s"), err
    assert not cli.sent


def test_cli_publish_to_a_cluster_without_the_labels_topic_names_it_and_creates_nothing(cli: FakeProducer, capsys):
    """It failed with "Broker: Unknown topic or partition" per record; a tool creates no topics."""
    cli.no_topics = True
    with pytest.raises(SystemExit) as exit_:
        main(["labels", "publish", "tx-9", "fraud"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("Error: no topic unit.labels on Kafka at "), err
    assert "created by an admin" in err and not cli.sent


def test_cli_publish_a_refused_verdict_says_it_was_not_published(cli: FakeProducer) -> None:
    cli.fail = {b"tx-9"}
    result = CliRunner().invoke(labels_cli.app, ["publish", "tx-9", "fraud"])
    assert result.exit_code == 1 and "tx-9: fraud" in result.output, result.output
    assert ": not published" in result.output and "published 0 of 1" in result.output, result.output


def test_cli_publish_a_verdict_that_timed_out_says_it_is_not_confirmed(cli: FakeProducer) -> None:
    """A timed-out record may have been written all the same: "not published" could be false."""
    cli.timeout = {b"tx-9"}
    result = CliRunner().invoke(labels_cli.app, ["publish", "tx-9", "fraud"])
    assert result.exit_code == 1 and ": not confirmed (publish it again)" in result.output, result.output


def test_cli_publish_dry_run_says_nothing_was_sent(cli: FakeProducer) -> None:
    result = CliRunner().invoke(labels_cli.app, ["publish", "tx-9", "fraud", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "tx-9: fraud" in result.output and "not sent" in result.output, result.output
    assert not cli.sent


def test_cli_publish_refuses_a_bad_id_or_verdict(cli: FakeProducer) -> None:
    for args in (
        ["publish", "tx/9", "fraud"],
        ["publish", "tx-9", "perhaps"],
        ["publish", "tx-9", "1", "--source", "x"],
    ):
        result = CliRunner().invoke(labels_cli.app, args)
        assert result.exit_code == 2, (args, result.output)
    assert not cli.sent


def test_cli_import_publishes_the_good_rows_and_lists_the_bad(cli: FakeProducer, tmp_path) -> None:
    path = tmp_path / "chargebacks.csv"
    path.write_text("\ufefftransaction_id,label\ntx-1,fraud\ntx 2,fraud\ntx-3,legit\n", encoding="utf-8")
    dry = CliRunner().invoke(labels_cli.app, ["import", str(path), "--dry-run"])
    assert dry.exit_code == 0 and not cli.sent
    strict = CliRunner().invoke(labels_cli.app, ["import", str(path), "--strict"])
    assert strict.exit_code == 2 and not cli.sent
    result = CliRunner().invoke(labels_cli.app, ["import", str(path), "--decided-at", "2026-01-20T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert "line 3:" in result.output and "2 verdict(s)" in result.output
    assert [key for _, key, _ in cli.sent] == [b"tx-1", b"tx-3"]
    assert {Label.decode(v or b"").source for _, _, v in cli.sent} == {"chargeback"}


def test_cli_import_names_the_superseded_rows_in_its_summary(cli: FakeProducer, tmp_path) -> None:
    path = tmp_path / "chargebacks.csv"
    path.write_text(
        "transaction_id,label,decided_at\ntx-1,fraud,2026-01-20T00:00:00Z\ntx-1,fraud,2026-01-05T00:00:00Z\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(labels_cli.app, ["import", str(path)])
    assert result.exit_code == 0, result.output
    assert "1 verdict(s)" in result.output and "1 superseded" in result.output
    assert "line 3: superseded by line 2" in result.output
    [(_, _, value)] = cli.sent
    assert Label.decode(value or b"").decided_at == parse_decided_at("2026-01-20T00:00:00Z", NOW)


def test_cli_import_of_a_windows_1252_export_refuses_its_rows_that_are_not_utf8_instead_of_garbling_them(
    cli: FakeProducer, tmp_path
) -> None:
    """Excel's plain "CSV" is Windows-1252: read with replacement characters, ``Rückbuchung`` was published as
    ``R\ufffdckbuchung`` (and ``Müller`` as the deciding person) on the labels topic, where it stays in force."""
    path = tmp_path / "chargebacks.csv"
    path.write_bytes(
        "transaction_id;label;reason;decided_by\ntx-1;fraud;Rückbuchung;Müller\ntx-2;legit;ok;ana\n".encode("cp1252")
    )
    result = CliRunner().invoke(labels_cli.app, ["import", str(path), "--decided-at", "2026-01-20T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert "line 2: the row is not UTF-8" in result.output and "1 verdict(s)" in result.output
    assert [(Label.decode(v or b"").transaction_id, Label.decode(v or b"").reason) for _, _, v in cli.sent] == [
        ("tx-2", "ok")
    ]


@pytest.mark.parametrize("text", ["transaction_id,label\n", "transaction_id,label\ntx 1,fraud\ntx-2,perhaps\n"])
def test_cli_import_of_a_file_without_one_good_verdict_exits_1(cli: FakeProducer, tmp_path, text) -> None:
    path = tmp_path / "chargebacks.csv"
    path.write_text(text, encoding="utf-8")
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(labels_cli.app, ["import", str(path), *extra])
        assert result.exit_code == 1 and "no verdicts to publish" in result.output, result.output
    assert not cli.sent


def test_cli_import_refuses_a_verdict_time_in_epoch_seconds(cli: FakeProducer, tmp_path) -> None:
    path = tmp_path / "chargebacks.csv"
    path.write_text("transaction_id,label\ntx-1,fraud\n", encoding="utf-8")
    result = CliRunner().invoke(labels_cli.app, ["import", str(path), "--decided-at", "1672876800"])
    assert result.exit_code == 2 and not cli.sent, result.output


def test_cli_withdraw(cli: FakeProducer) -> None:
    result = CliRunner().invoke(labels_cli.app, ["withdraw", "tx-1", "tx-2"])
    assert result.exit_code == 0, result.output
    assert [(key, value) for _, key, value in cli.sent] == [(b"tx-1", None), (b"tx-2", None)]


# ---------------------------------------------------------------------------- the verdict in force


def message(label: Label, key: bytes | None = None) -> tuple[bytes | None, bytes | None]:
    return (label.transaction_id.encode() if key is None else key), label.encode()


def test_the_last_published_verdict_wins_even_with_an_earlier_decided_at() -> None:
    """The rule compaction applies (latest record per key), so the answer does not change once it ran."""
    found = latest_labels(
        [
            message(verdict("tx-1", 1, at=NOW)),
            message(verdict("tx-2", 0, at=NOW)),
            message(verdict("tx-1", 0, at=NOW + 5000, source="case")),
            message(verdict("tx-1", 1, at=NOW - 5000, source="chargeback")),
        ]
    )
    assert {tx: label.label for tx, label in found.by_transaction.items()} == {"tx-1": 1, "tx-2": 0}
    assert found.by_transaction["tx-1"].source == "chargeback"
    assert (found.read, found.replaced) == (4, 2)


def test_a_tombstone_withdraws_and_a_later_verdict_restores() -> None:
    found = latest_labels([message(verdict("tx-1")), (b"tx-1", None), message(verdict("tx-2")), (b"tx-2", None)])
    assert found.by_transaction == {} and found.withdrawn == {"tx-1", "tx-2"}
    again = latest_labels([message(verdict("tx-1")), (b"tx-1", None), message(verdict("tx-1", 0))])
    assert again.by_transaction["tx-1"].label == 0 and not again.withdrawn


def test_withdrawals_count_the_same_before_and_after_compaction() -> None:
    """Compaction keeps a tombstone (for a while) and drops the verdict it withdrew."""
    before = latest_labels([message(verdict("tx-1")), (b"tx-1", None), (b"tx-typo", None)])
    after = latest_labels([(b"tx-1", None), (b"tx-typo", None)])
    assert before.withdrawn == after.withdrawn == {"tx-1", "tx-typo"} and before.digest() == after.digest()
    assert "2 withdrawn" in after.summary()


def test_unusable_records_are_counted_not_used() -> None:
    good = verdict("tx-1")
    bad_label = replace(good, label=7)
    bad_id = replace(good, transaction_id="a/b")
    found = latest_labels(
        [
            (b"tx-1", b"not avro"),
            (b"tx-1", MAGIC + b"\x00" * 8),
            (b"tx-1", sale("tx-1").encode()),  # another record type
            (b"tx-1", bad_label.encode()),
            (b"a/b", bad_id.encode()),
            message(good, key=b"store-1/lane-1"),  # not keyed by its transaction
            (None, None),
        ]
    )
    assert found.by_transaction == {} and found.undecodable == 5 and found.wrong_key == 2
    assert "7 record(s) read" in found.summary()


@pytest.mark.parametrize("later", ["not avro", "label 2", "another transaction's"])
def test_an_unusable_later_record_ends_the_earlier_verdict_as_compaction_would(later) -> None:
    """Compaction keeps only the latest record per key: reading before or after it must give one answer."""
    good = verdict("tx-1")
    bad = {
        "not avro": b"not avro",
        "label 2": replace(good, label=2).encode(),
        "another transaction's": verdict("tx-2").encode(),
    }[later]
    before = latest_labels([message(good), message(verdict("tx-3")), (b"tx-1", bad)])
    after = latest_labels([message(verdict("tx-3")), (b"tx-1", bad)])
    assert before.by_transaction == after.by_transaction == {"tx-3": verdict("tx-3")}
    assert before.digest() == after.digest() and before.replaced == 1


# ---------------------------------------------------------------------------- transactions and the join


def test_transactions_from_the_topic_come_in_event_time_order_and_undecodable_ones_are_counted() -> None:
    late, early, same = sale("tx-late", at_s=60), sale("tx-early", at_s=0), sale("tx-same", at_s=0)
    found = decode_transactions(
        [
            ("t", 0, 5, late.encode(), None),
            ("t", 1, 3, same.encode(), None),
            ("t", 0, 6, b"garbage", None),
            ("t", 0, 7, early.encode(), None),
            ("t", 2, 1, None, None),
        ]
    )
    assert [tx.transaction_id for tx in found.transactions] == ["tx-early", "tx-same", "tx-late"]
    assert found.transactions[2] == late
    assert (found.read, found.undecodable) == (5, 2)
    assert found.reasons == {"not_avro": 1, "empty": 1}
    assert [where for where, _ in found.rejected] == ["t:0:6", "t:2:1"]


def test_a_transaction_dated_past_the_skew_after_kafka_took_it_is_rejected_as_the_job_dead_letters_it() -> None:
    """``train --from-topic`` learnt from transactions stamped years ahead (the job's dead letters) as its last rows."""
    written = T0 + 3_600_000
    ahead, now, year_ahead = sale("tx-ahead", at_s=3_900), sale("tx-now", at_s=3_600), sale("tx-year", at_s=3_600)
    year_ahead = replace(year_ahead, event_time=written + 365 * 86_400_000)
    found = decode_transactions(
        [
            ("t", 0, 1, ahead.encode(), written),
            ("t", 0, 2, now.encode(), written),
            ("t", 0, 3, year_ahead.encode(), written),
        ],
        max_future_skew_ms=300_000,
    )
    assert [tx.transaction_id for tx in found.transactions] == ["tx-now", "tx-ahead"]  # 300 s ahead: at the bound
    assert found.reasons == {"invalid_timestamp": 1} and [where for where, _ in found.rejected] == ["t:0:3"]


def test_apply_labels_sets_field_verdicts_and_counts_the_join() -> None:
    records: list[Any] = [
        sale("tx-1"),  # unlabelled -> fraud
        sale("tx-2", label=0),  # the data said legit -> fraud (overturned)
        ("ev-9", "order_price is empty"),  # a reject passes through
        {"transaction_id": "tx-3", "label": 1},  # a History dict, already fraud -> fraud
        sale("tx-4", label=1),  # no field label: unchanged
        sale("tx-1", at_s=5),  # a replayed copy of tx-1: labelled too, counted once
    ]
    field_labels = {t: verdict(t, 1) for t in ("tx-1", "tx-2", "tx-3")} | {"tx-missing": verdict("tx-missing", 0)}
    out, stats = apply_labels(records, field_labels)
    assert out[0].label == 1 and out[1].label == 1 and out[2] == records[2]
    assert out[3] == {"transaction_id": "tx-3", "label": 1} and out[4] is records[4] and out[5].label == 1
    assert records[0].label is None, "the input is not modified"
    assert (stats.labels, stats.joined, stats.fraud, stats.legit) == (4, 3, 3, 0)
    assert (stats.newly_labelled, stats.changed) == (1, 1)
    assert stats.unmatched == ["tx-missing"]
    assert "3 joined" in stats.summary()
    assert stats.summary().endswith("1 without a transaction in the history: tx-missing"), "named, to find a typo"
    stats.unmatched = [f"tx-{i}" for i in range(8)]
    assert stats.summary().endswith(": tx-0, tx-1, tx-2, tx-3, tx-4 and 3 more")


def test_the_digest_names_the_verdicts_in_force_not_how_they_got_there() -> None:
    direct = latest_labels([message(verdict("tx-1", 1)), message(verdict("tx-2", 0))])
    corrected = latest_labels([message(verdict("tx-2", 1)), message(verdict("tx-1", 1)), message(verdict("tx-2", 0))])
    assert direct.digest() == corrected.digest()
    assert latest_labels([message(verdict("tx-1", 0)), message(verdict("tx-2", 0))]).digest() != direct.digest()


def test_apply_labels_takes_what_read_labels_returns() -> None:
    found = FieldLabels(by_transaction={"tx-1": verdict("tx-1", 0)})
    out, stats = apply_labels([sale("tx-1", label=1)], found)
    assert out[0].label == 0 and stats.changed == 1 and not stats.unmatched


# ---------------------------------------------------------------------------- the Kafka read, with stand-ins


class FakeMessage:
    def __init__(self, partition: int, offset: int, key: bytes | None, value: bytes | None, eof: bool = False) -> None:
        self._p, self._o, self._k, self._v, self._eof = partition, offset, key, value, eof

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_NOT_AVAILABLE, -1

    def topic(self) -> str:
        return "unit.labels"

    def error(self) -> Any:
        return _Eof() if self._eof else None


class _Eof:
    def code(self) -> int:
        return KafkaError._PARTITION_EOF


class FakeConsumer:
    def __init__(self, messages: list[FakeMessage]) -> None:
        self.messages, self.assigned, self.closed = messages, [], False
        self.positions: dict[int, int] = {}

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = [(tp.partition, tp.offset) for tp in partitions]

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        batch, self.messages = self.messages[:n], self.messages[n:]
        for m in batch:
            if not m._eof:
                self.positions[m.partition()] = m.offset() + 1
        return batch

    def position(self, partitions: list[Any]) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, -1001)) for tp in partitions]

    def unassign(self) -> None:
        self.assigned_at_end = self.assigned

    def close(self) -> None:
        self.closed = True


def test_read_labels_reads_each_partition_to_the_end_it_found_and_no_further(monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = [PartitionRange(0, 0, 2, 0, 2), PartitionRange(1, 4, 6, 4, 6), PartitionRange(2, 0, 0, 0, 0)]
    first, second, third = verdict("tx-1", 1), verdict("tx-1", 0), verdict("tx-2", 1)
    consumer = FakeConsumer(
        [
            FakeMessage(0, 0, b"tx-1", first.encode()),
            FakeMessage(1, 4, b"tx-2", third.encode()),
            FakeMessage(0, 1, b"tx-1", second.encode()),
            FakeMessage(0, 2, b"tx-9", verdict("tx-9").encode()),  # published after the read began: not read
            FakeMessage(1, 5, None, None, eof=True),  # partition 1 ends early (a compaction gap)
        ]
    )
    monkeypatch.setattr(reader, "plan", lambda *_a, **_k: ranges)
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: consumer)
    found = reader.read_labels(SETTINGS, timeout_s=1)
    assert consumer.assigned == [(0, 0), (1, 4)] and consumer.closed
    assert {tx: label.label for tx, label in found.by_transaction.items()} == {"tx-1": 0, "tx-2": 1}
    assert found.end_offsets == {0: 2, 1: 6, 2: 0} and found.read == 3


def test_a_read_that_stalls_before_the_end_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = FakeConsumer([])
    monkeypatch.setattr(reader, "plan", lambda *_a, **_k: [PartitionRange(0, 0, 3, 0, 3)])
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: consumer)
    with pytest.raises(TimeoutError):
        reader.read_labels(SETTINGS, timeout_s=0.2)
    assert consumer.closed


class RetentionDuringReadConsumer(FakeConsumer):
    """Partition 0 is read from offset 0; after the first record retention deletes offsets 1-3, so the next fetch
    is out of range (``auto.offset.reset=error``) and the read goes on from the earliest kept offset, 4."""

    def __init__(self) -> None:
        super().__init__([])
        self.batches = [
            [FakeMessage(0, 0, b"tx-1", verdict("tx-1", 1).encode())],
            [_ResetMessage(0, 1)],
        ]

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self.assigned = [a for a in self.assigned if a[0] not in {tp.partition for tp in partitions}]

    def incremental_assign(self, partitions: list[Any]) -> None:
        self.assigned += [(tp.partition, tp.offset) for tp in partitions]
        self.batches.append([FakeMessage(0, 4, b"tx-4", verdict("tx-4", 0).encode())])

    def get_watermark_offsets(self, _tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 4, 5

    def consume(self, n: int, timeout: float) -> list[Any]:
        self.messages = self.batches.pop(0) if self.batches else []
        return super().consume(n, timeout)


class _ResetMessage(FakeMessage):
    def __init__(self, partition: int, offset: int) -> None:
        super().__init__(partition, offset, None, None, eof=True)  # not a record: the position does not move

    def error(self) -> Any:
        return KafkaError(KafkaError._AUTO_OFFSET_RESET)


def test_labels_retention_deletes_while_they_are_read_are_counted_and_warned_about_not_skipped_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With auto.offset.reset=earliest a position below the log start jumped to the earliest kept record: the
    verdicts in between were neither read nor counted, and training went on as if they never existed."""
    resets: list[str] = []

    def assigned_consumer(_kafka: Any, _purpose: str, auto_offset_reset: str = "earliest") -> Any:
        resets.append(auto_offset_reset)
        return RetentionDuringReadConsumer()

    monkeypatch.setattr(reader, "plan", lambda *_a, **_k: [PartitionRange(0, 0, 5, 0, 5)])
    monkeypatch.setattr(topic_replay, "assigned_consumer", assigned_consumer)
    found = reader.read_labels(SETTINGS, timeout_s=5)
    assert resets == ["error"]
    assert sorted(found.by_transaction) == ["tx-1", "tx-4"] and found.deleted == {0: 3}
    assert found.warning() == (
        "3 label record(s) were deleted by retention while being read (partition 0: 3) and were not read"
    )
    stream = reader.transactions_from_topic(SETTINGS, timeout_s=5)  # the transactions topic the same way
    assert stream.deleted == {0: 3} and stream.warning() is not None and "are not in the history" in stream.warning()
    assert FieldLabels().warning() is None


def test_train_from_the_topics_prints_a_warning_for_what_retention_deleted_while_it_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jobs.model import train

    stream = reader.TopicTransactions(transactions=[sale("tx-1")], read=1, deleted={1: 7})
    verdicts = FieldLabels(by_transaction={"tx-1": verdict("tx-1", 1)}, read=1, deleted={0: 2})
    monkeypatch.setattr(reader, "transactions_from_topic", lambda _s: stream)
    monkeypatch.setattr(reader, "read_labels", lambda _s: verdicts)
    monkeypatch.setattr(train, "observe_all", lambda records, _s: train.History())
    echoed: list[str] = []
    monkeypatch.setattr(train.typer, "echo", lambda text, err=False: echoed.append(text))
    train._source(None, SETTINGS, from_topic=True, field_labels=True)
    assert "Warning: 7 transaction record(s) were deleted by retention while being read (partition 1: 7)" in " ".join(
        echoed
    )
    assert "Warning: 2 label record(s) were deleted by retention while being read (partition 0: 2)" in " ".join(echoed)


def test_train_from_the_topic_counts_every_undecodable_record_as_rejected_not_only_those_it_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The topic's reader lists the first MAX_REJECTED undecodable records (all are counted), and training counted
    only the listed ones: 1,200 undecodable records were "1000 row(s) rejected", in model.json's data too."""
    from jobs.model import train

    junk = [("t", 0, i, b"junk", None) for i in range(reader.MAX_REJECTED + 200)]
    stream = decode_transactions([*junk, *(("t", 1, i, sale(f"tx-{i}", at_s=i).encode(), None) for i in range(3))])
    assert stream.undecodable == reader.MAX_REJECTED + 200 and len(stream.rejected) == reader.MAX_REJECTED
    monkeypatch.setattr(reader, "transactions_from_topic", lambda _s: stream)
    echoed: list[str] = []
    monkeypatch.setattr(train.typer, "echo", lambda text, err=False: echoed.append(text))
    history = train._source(None, SETTINGS, from_topic=True).history
    assert any(line.startswith(f"{reader.MAX_REJECTED + 200} row(s) rejected and left out") for line in echoed)
    assert len(history.items) == 3 and history.rejected_count == reader.MAX_REJECTED + 200


def test_the_training_fingerprint_of_the_topic_differs_once_retention_removed_records_with_the_same_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It hashed the end offsets alone: offsets 0-2 and, after retention, offsets 1-2 got one fingerprint."""
    from jobs.model import train

    records = [sale(f"tx-{i}", at_s=i).encode() for i in range(3)]

    def fingerprint(start: int) -> str:
        consumer = FakeConsumer([FakeMessage(0, i, None, records[i]) for i in range(start, 3)])
        monkeypatch.setattr(reader, "plan", lambda *_a, **_k: [PartitionRange(0, start, 3, start, 3)])
        monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: consumer)
        return train._source(None, SETTINGS, from_topic=True).sha256

    whole, after_retention = fingerprint(0), fingerprint(1)
    assert whole != after_retention
    assert fingerprint(0) == whole, "the same records read again: the same fingerprint (the same model version)"


def test_the_topic_digest_covers_each_records_offset_and_bytes_not_the_partitions_interleaving() -> None:
    a, b, c = (sale(t).encode() for t in ("tx-a", "tx-b", "tx-c"))
    digest = decode_transactions([("t", 0, 0, a, None), ("t", 1, 0, b, None), ("t", 0, 1, c, None)]).digest
    assert decode_transactions([("t", 1, 0, b, None), ("t", 0, 0, a, None), ("t", 0, 1, c, None)]).digest == digest
    others = [
        [("t", 0, 0, a, None), ("t", 1, 0, c, None), ("t", 0, 1, b, None)],  # other bytes at the same offsets
        [("t", 0, 5, a, None), ("t", 1, 0, b, None), ("t", 0, 6, c, None)],  # the same bytes at other offsets
        [("t", 0, 0, a, None), ("t", 1, 0, b, None)],  # a record fewer
        [("t", 0, 0, a, None), ("t", 1, 0, b, None), ("t", 0, 1, None, None)],  # a record without a value
        [("t", 0, 0, a, None), ("t", 1, 0, b, None), ("t", 0, 1, b"", None)],  # one with an empty value: not the same
    ]
    assert len({decode_transactions(m).digest for m in others} | {digest}) == len(others) + 1


def test_a_conflict_makes_every_verdict_line_of_the_transaction_bad_the_repeated_one_too() -> None:
    found = csv_labels("transaction_id,label\ntx-1,fraud\ntx-1,fraud\ntx-1,legit\n")
    assert not found.labels and found.duplicates == 0
    assert [b.line for b in found.bad] == [2, 3, 4]
    assert {b.reason for b in found.bad} == {"conflicting verdicts for this transaction on lines 2, 3, 4"}


def test_a_verdict_before_its_transaction_is_unmatched_then_joined_by_a_later_train() -> None:
    labels = FieldLabels(by_transaction={"tx-late": verdict("tx-late", 1)})
    _, first = apply_labels([sale("tx-1")], labels)
    assert first.unmatched == ["tx-late"] and "1 without a transaction in the history: tx-late" in first.summary()
    out, later = apply_labels([sale("tx-1"), sale("tx-late")], labels)
    assert later.joined == 1 and not later.unmatched and out[1].label == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00",  # a binary file given by mistake
        "transaction_id;label;raison;décidé_par\ntx-1;fraud;x;ana\n".encode("cp1252"),  # a header in another encoding
    ],
)
def test_cli_import_of_a_file_that_is_not_utf8_text_says_so_not_that_columns_are_missing(
    cli: FakeProducer, tmp_path, capsys, data: bytes
) -> None:
    path = tmp_path / "chargebacks.csv"
    path.write_bytes(data)
    with pytest.raises(SystemExit) as exit_:
        main(["labels", "import", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err  # a bad file, as one without the columns
    assert "the header cannot be read: line 1 is not UTF-8" in err and "needs the columns" not in err, err
    assert not cli.sent
