"""Re-driving dead letters: which letters are chosen and where each payload goes (pure), the thin Kafka
edges with stand-ins, and that re-driving an alert twice still delivers it once per channel."""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, TopicPartition
from pydantic import SecretStr
from typer.testing import CliRunner

import producers.redrive as redrive
from infra.clients import topic_replay
from infra.clients.topic_replay import PartitionRange
from infra.command_auth import SIGNATURE_HEADER, authenticate_command, sign_command
from infra.settings import AlertSettings, Settings, WebexSettings
from producers.redrive import (
    DUPLICATE,
    NO_TOPIC,
    NOT_KAFKA,
    OVER_LIMIT,
    PERMANENT,
    REDRIVE,
    REDRIVEN_HEADER,
    STATE_RECORD,
    TRUNCATED,
    WATCHLIST_ENTRY,
    Selection,
    Send,
    plan_redrive,
    selection_from_options,
    source_is_kafka,
)
from schemas.errors import RETRYABLE_KINDS, InvalidRecord, is_retryable
from schemas.records import (
    INPUT_HEADER_PREFIX,
    MAX_DEAD_LETTER_HEADERS,
    Alert,
    BotCommand,
    DeadLetter,
    dead_letter,
    dead_letter_headers,
    input_headers,
)
from sinks.alerts.sender import AlertSender, Ledger, dead_letter_for
from tests.builders import partitions_led

TOPICS = {"alerts": 3, "transactions": 3, "processed_transactions": 1}


def letter(
    offset: int,
    *,
    topic: str = "alerts",
    partition: int = 1,
    stage: str = "alert-sender",
    kind: str = "delivery_failed",
    failed_at: int = 1_000,
    payload: bytes | None = None,
    dead_letter_id: str | None = None,
) -> DeadLetter:
    return dead_letter(
        topic=topic,
        partition=partition,
        offset=offset,
        key=f"key-{offset}".encode(),
        value=payload if payload is not None else f"payload-{offset}".encode(),
        error=InvalidRecord(kind, "email failed 8 times"),
        stage=stage,
        failed_at=failed_at,
        dead_letter_id=dead_letter_id,
    )


@dataclass(frozen=True, slots=True)
class CutLetter(DeadLetter):
    """A letter whose payload was cut to fit (the fields newer dead letters carry)."""

    payload_truncated: bool = True
    payload_size: int | None = 2_000_000


ALERT_SENDER = Selection(stages=frozenset({"alert-sender"}))


def outcomes(plan: redrive.RedrivePlan) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, _, outcome), n in plan.counts.items():
        if n:
            out[outcome] = out.get(outcome, 0) + n
    return out


def test_only_letters_of_the_chosen_stage_kind_time_and_topic_are_re_driven() -> None:
    letters = [
        letter(1, failed_at=1_000),
        letter(2, failed_at=2_000),
        letter(3, failed_at=3_000),
        letter(4, kind="not_avro", failed_at=2_000),
        letter(5, stage="opensearch-sink", topic="processed_transactions", partition=0, failed_at=2_000),
        letter(6, topic="transactions", failed_at=2_000),
    ]
    selection = Selection(
        stages=frozenset({"alert-sender"}),
        kinds=frozenset({"delivery_failed"}),
        since_ms=2_000,
        until_ms=3_000,
        source_topics=frozenset({"alerts"}),
    )
    plan = plan_redrive(letters, selection, TOPICS)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:2"]
    assert plan.read == 6 and dict(plan.counts) == {("alert-sender", "delivery_failed", REDRIVE): 1}
    every_stage = Selection(stages=frozenset({"alert-sender", "opensearch-sink"}), include_permanent=True)
    assert len(plan_redrive(letters, every_stage, TOPICS).sends) == 6


def test_permanent_failures_are_skipped_and_counted_unless_included() -> None:
    """An invalid record or a schema error fails again on the same bytes: re-driving it only made a second dead
    letter and inflated the counts. Transient kinds (a delivery that failed, a bug since fixed) go back."""
    letters = [
        letter(1, kind="delivery_failed"),
        letter(2, kind="not_avro"),
        letter(3, kind="invalid_amount"),
        letter(4, topic="transactions", stage="scoring-job", kind="internal_error"),
        letter(5, topic="transactions", stage="scoring-job", kind="missing_field"),
        letter(6, kind="unknown_schema"),
    ]
    stages = frozenset({"alert-sender", "scoring-job"})
    plan = plan_redrive(letters, Selection(stages=stages), TOPICS)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:1", "alerts:1:6", "transactions:1:4"]
    assert outcomes(plan) == {REDRIVE: 3, PERMANENT: 3} and plan.outcome_total(PERMANENT) == 3
    assert plan.counts[("alert-sender", "not_avro", PERMANENT)] == 1
    everything = plan_redrive(letters, Selection(stages=stages, include_permanent=True), TOPICS)
    assert len(everything.sends) == 6 and outcomes(everything) == {REDRIVE: 6}
    narrowed = plan_redrive(letters, Selection(stages=stages, kinds=frozenset({"not_avro"})), TOPICS)
    assert narrowed.sends == [] and outcomes(narrowed) == {PERMANENT: 1}  # --kind alone does not include them


def test_the_kinds_a_re_drive_can_cure_are_the_ones_their_writers_use() -> None:
    """One list classifies the kinds; the processes that write the transient ones take their names from it."""
    from jobs.faces.stage import STAGE_ERROR
    from jobs.scoring.core import INTERNAL_ERROR as SCORING_INTERNAL_ERROR

    assert {SCORING_INTERNAL_ERROR, STAGE_ERROR, "delivery_failed", "unknown_schema"} <= RETRYABLE_KINDS
    assert not any(is_retryable(kind) for kind in ("not_avro", "invalid", "missing_field", "oversized", "unauthorized"))


def test_a_dry_run_reports_the_permanent_failures_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", lambda _settings: dict(TOPICS))
    monkeypatch.setattr(redrive, "read_dead_letters", lambda *_a, **_k: iter([letter(1), letter(2, kind="not_avro")]))
    result = CliRunner().invoke(redrive.cli, ["--stage", "alert-sender", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "1 to re-drive" in result.output and "1 permanent failure(s) skipped" in result.output
    assert "--include-permanent" in result.output
    result = CliRunner().invoke(redrive.cli, ["--stage", "alert-sender", "--dry-run", "--include-permanent"])
    assert result.exit_code == 0 and "2 to re-drive" in result.output and "permanent" not in result.output


def test_a_stage_is_found_by_its_process_name_whether_its_letters_spell_it_with_dash_or_underscore() -> None:
    """The face stage's letters say ``face_stage``; the process, its metrics and the CLI say ``face-stage``."""
    letters = [
        letter(1, topic="transactions", stage="face_stage", kind="internal_error"),
        letter(2, stage="alert-sender"),
    ]
    for stage in ("face-stage", "face_stage", "Face-Stage"):
        plan = plan_redrive(letters, Selection(stages=frozenset({stage})), TOPICS)
        assert [s.dead_letter_id for s in plan.sends] == ["transactions:1:1"], stage
    plan = plan_redrive(letters, Selection(stages=frozenset({"alert_sender"})), TOPICS)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:2"]
    assert dict(plan.stages) == {"face_stage": 1, "alert-sender": 1}  # named when nothing matched


def test_each_payload_goes_back_with_its_key_to_the_partition_it_came_from() -> None:
    plan = plan_redrive(
        [letter(7, partition=2), letter(8, topic="processed_transactions", partition=2, stage="alert-sender")],
        ALERT_SENDER,
        TOPICS,
    )
    first, second = plan.sends
    assert (first.topic, first.partition, first.key, first.payload) == ("alerts", 2, b"key-7", b"payload-7")
    assert (second.topic, second.partition) == ("processed_transactions", None)  # fewer partitions now: by key


def test_a_watchlist_entry_is_never_sent_back() -> None:
    """A copy re-driven after its subject was forgotten enrolled the face again (behind the tombstone)."""
    scoring = Selection(stages=frozenset({"scoring"}))
    entry = letter(9, topic="e2e.watchlist", partition=0, stage="scoring", kind="invalid_update")
    plan = plan_redrive([entry], scoring, {"e2e.watchlist": 1}, watchlist="e2e.watchlist")
    assert plan.sends == [] and dict(plan.counts) == {("scoring", "invalid_update", WATCHLIST_ENTRY): 1}


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("live.cases", "opensearch_rejected"),  # an older version of a case: a decided case open again
        ("live.labels", "opensearch_rejected"),  # an older verdict in force again, a withdrawn one back
        ("live.rules", "invalid_rules"),  # an older rule set in force again
        ("live.audit", "forget_incomplete"),  # a forget published again for every reader of audit
    ],
)
def test_a_state_topics_record_is_never_sent_back_where_its_last_record_is_in_force(topic: str, kind: str) -> None:
    """The sink's letter of a case version OpenSearch refused went back to ``cases`` as its newest record, over the
    versions written since: the case service and the index took the old version for the case."""
    sink = Selection(stages=frozenset({"opensearch-sink"}), include_permanent=True)
    old = letter(4, topic=topic, partition=0, stage="opensearch-sink", kind=kind)
    topics = {topic: 1, "live.alerts": 1}
    alert = letter(5, topic="live.alerts", partition=0, stage="opensearch-sink", kind=kind)
    plan = plan_redrive([old, alert], sink, topics, watchlist="live.watchlist", topic_prefix="live.")
    assert [send.topic for send in plan.sends] == ["live.alerts"]
    assert plan.counts[("opensearch-sink", kind, STATE_RECORD)] == 1


def test_redrive_says_what_to_do_instead_of_sending_a_state_topics_record_back(monkeypatch: pytest.MonkeyPatch) -> None:
    case = letter(4, topic="cases", partition=0, stage="opensearch-sink", kind="opensearch_rejected")
    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", lambda _s: {"cases": 1})
    monkeypatch.setattr(redrive, "read_dead_letters", lambda *_a, **_k: iter([case]))
    monkeypatch.setattr(redrive, "send_all", lambda *_a: pytest.fail("nothing is to be sent"))
    result = CliRunner().invoke(redrive.cli, ["--stage", "opensearch-sink"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "0 to re-drive" in output and "1 record(s) of rules, labels, cases, audit skipped" in output
    assert "the OpenSearch sink on a fresh consumer group indexes what labels and cases hold now" in output


def test_truncated_payloads_and_inputs_that_were_not_kafka_records_are_skipped_and_counted() -> None:
    mqtt = dead_letter(
        topic="checkout-guard/cameras/Q2MV-S001-L01/zone",
        partition=-1,
        offset=-1,
        key=None,
        value=b"{}",
        error=InvalidRecord("invalid", "bad"),
        stage="alert-sender",
        failed_at=1_000,
        dead_letter_id="mqtt:checkout-guard/cameras/Q2MV-S001-L01/zone:abcdef",
    )
    csv_row = letter(9, topic="transactions", dead_letter_id="file:data/afd.csv:9")
    base = letter(10)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(DeadLetter)}
    fields.pop("payload_truncated", None)
    fields.pop("payload_size", None)
    cut = CutLetter(**fields)
    resized = CutLetter(**fields, payload_truncated=False)  # only its recorded size differs from the bytes
    gone = letter(11, topic="deleted_topic")
    plan = plan_redrive([mqtt, csv_row, cut, resized, gone, letter(12)], ALERT_SENDER, TOPICS)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:12"]
    assert outcomes(plan) == {NOT_KAFKA: 2, TRUNCATED: 2, NO_TOPIC: 1, REDRIVE: 1}
    assert not source_is_kafka(mqtt) and not source_is_kafka(csv_row) and source_is_kafka(base)


@pytest.mark.skipif(
    "max_payload_bytes" not in inspect.signature(dead_letter).parameters, reason="dead letters are never cut yet"
)
def test_a_letter_the_builder_cut_to_fit_is_not_re_driven() -> None:
    cut = dead_letter(
        topic="alerts",
        partition=0,
        offset=1,
        key=b"k",
        value=b"x" * 100,
        error=InvalidRecord("oversized", "too big"),
        stage="alert-sender",
        failed_at=1,
        max_payload_bytes=10,  # type: ignore[call-arg]
    )
    plan = plan_redrive([DeadLetter.decode(cut.encode())], ALERT_SENDER, TOPICS)
    assert plan.sends == [] and outcomes(plan) == {TRUNCATED: 1}


def test_the_same_input_dead_lettered_twice_is_re_driven_once() -> None:
    again = letter(1, failed_at=5_000)  # a replay of the sender dead-lettered the same offset again
    copy = dead_letter(  # ... or the same alert (key and bytes) at another offset
        topic="alerts",
        partition=1,
        offset=2,
        key=b"key-1",
        value=b"payload-1",
        error=InvalidRecord("delivery_failed", "x"),
        stage="alert-sender",
        failed_at=6_000,
    )
    plan = plan_redrive([letter(1), again, copy], ALERT_SENDER, TOPICS)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:1"]
    assert outcomes(plan) == {REDRIVE: 1, DUPLICATE: 2}


def test_limit_re_drives_the_oldest_and_counts_the_rest() -> None:
    letters = [letter(i, failed_at=10_000 - i) for i in range(5)]
    plan = plan_redrive(letters, ALERT_SENDER, TOPICS, limit=2)
    assert [s.dead_letter_id for s in plan.sends] == ["alerts:1:4", "alerts:1:3"]
    assert outcomes(plan) == {REDRIVE: 2, OVER_LIMIT: 3}


def test_undecodable_dead_letters_are_counted_not_fatal() -> None:
    plan = plan_redrive([InvalidRecord("not_avro", "x"), letter(1)], ALERT_SENDER, TOPICS)
    assert plan.undecodable == 1 and len(plan.sends) == 1


def test_options_become_a_selection_with_prefixed_topics_and_times() -> None:
    selection = selection_from_options(
        ["alert-sender"], ["delivery_failed"], "2026-01-01T00:00:00Z", "1767225601000", ["alerts", "x.y"], "t1-"
    )
    assert selection.source_topics == {"t1-alerts", "x.y"}
    assert (selection.since_ms, selection.until_ms) == (1_767_225_600_000, 1_767_225_601_000)
    assert selection_from_options(["s"], None, None, None, None, "").kinds == frozenset()


def test_a_since_later_than_until_is_refused_before_any_broker_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """It matched no letter and said only "0 to re-drive" (and named the stages the topic holds, as if the stage were
    wrong): a script took the swapped options for nothing left to re-drive. ``replay run`` refuses the same way."""
    with pytest.raises(topic_replay.RangeError, match="later than"):
        selection_from_options(["alert-sender"], None, "2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z", None, "")
    assert selection_from_options(["s"], None, "1767225600000", "1767225600000", None, "").since_ms == 1_767_225_600_000

    def no_broker(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("asked the broker")

    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", no_broker)
    monkeypatch.setattr(redrive, "read_dead_letters", no_broker)
    args = ["--stage", "alert-sender", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"]
    result = CliRunner().invoke(redrive.cli, args)
    assert result.exit_code == 2 and "later than" in result.output, result.output


def test_reading_stops_at_each_partitions_end_and_keeps_undecodable_letters(monkeypatch: pytest.MonkeyPatch) -> None:
    good = letter(3)
    monkeypatch.setattr(
        redrive, "plan_ranges", lambda *_args: [PartitionRange(0, 3, 10, 3, 10), PartitionRange(1, 0, 10, 0, 10)]
    )
    consumer = ScriptedConsumer(
        [
            Message(topic="dl", partition=0, offset=3, value=good.encode()),
            Message(topic="dl", partition=0, offset=4, value=b"junk"),
            Message(topic="dl", partition=0, offset=10, value=good.encode()),  # past the end at the call
            Message(topic="dl", partition=1, offset=7, error=KafkaError(KafkaError._PARTITION_EOF)),
        ]
    )
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: consumer)
    read = list(redrive.read_dead_letters(Settings(), "dl", idle_timeout_s=5))
    assert read[0] == good and isinstance(read[1], InvalidRecord) and len(read) == 2


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.callbacks: list[Any] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.sent.append({"topic": topic, **kwargs})
        self.callbacks.append(kwargs["on_delivery"])

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        for callback in self.callbacks:
            callback(None, None)
        self.callbacks.clear()
        return 0


def test_sends_carry_key_partition_and_the_dead_letter_id_through_an_idempotent_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    producer, presets = RecordingProducer(), []

    def make(_settings: Any, *given: Any, **_overrides: Any) -> RecordingProducer:
        presets.extend(given)
        return producer

    monkeypatch.setattr(redrive.kafka_clients, "producer", make)
    sends = [Send("alerts:1:5", "alerts", 1, b"k", b"v", 1, "alert-sender", "delivery_failed")]
    stats = redrive.send_all(Settings(), sends)
    assert stats.acked == 1 and stats.failed == 0
    assert any(p.get("enable.idempotence") for p in presets)
    [sent] = producer.sent
    assert (sent["topic"], sent["key"], sent["value"], sent["partition"]) == ("alerts", b"k", b"v", 1)
    assert sent["headers"] == [(REDRIVEN_HEADER, b"alerts:1:5")]


# --------------------------------------------------------------------------- re-driving twice


class CountingChannel:
    name, can_check_sent = "email", False

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.lock = threading.Lock()

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        with self.lock:
            self.sent.append(alert["alert_id"])
        return None

    def close(self) -> None:
        pass


def test_an_alert_re_driven_twice_is_delivered_once_per_channel_by_the_senders_ledger(tmp_path: Path) -> None:
    channel = CountingChannel()
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(concurrency=2))
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    sender = AlertSender(settings, channels=[channel], ledger=ledger, image_loader=lambda ref: b"")
    alert = Alert(
        alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION", severity="high", event_time=0, store_id="S1", summary="x"
    )
    with closing(sender):
        sender.start_workers()
        for offset in (5, 9, 14):  # the original, then two re-driven copies at later offsets
            sender._accept_batch([Message(topic="alerts", partition=0, offset=offset, value=alert.encode())])
            deadline = time.monotonic() + 10
            while ledger.state(alert.alert_id, "email") != "sent" and time.monotonic() < deadline:
                time.sleep(0.01)
            sender._drain_outcomes()
        assert channel.sent == ["blocked:tx-1"]
        assert sender.stats.skipped_channels == 2 and sender.stats.alerts_done == 3


def test_the_alert_senders_dead_letter_of_a_delivery_failure_is_re_drivable() -> None:
    alert = Alert(
        alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION", severity="high", event_time=0, store_id="S1", summary="x"
    )
    message = Message(topic="alerts", partition=2, offset=40, key=b"blocked:tx-1", value=alert.encode())
    letter_ = dead_letter_for(message, "delivery_failed", "email still unavailable at the deadline")
    [send] = plan_redrive([DeadLetter.decode(letter_.encode())], ALERT_SENDER, TOPICS).sends
    assert (send.topic, send.partition, send.key) == ("alerts", 2, b"blocked:tx-1")
    assert Alert.decode(send.payload) == alert


class ScriptedConsumer:
    """Hands out the given messages in one batch, then nothing; position = the offset after the last one."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages, self.assigned, self.closed = messages, [], False
        self.read: dict[int, int] = {}

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = [(tp.partition, tp.offset) for tp in partitions]

    def consume(self, _n: int, timeout: float) -> list[Message]:
        batch, self.messages = self.messages, []
        for m in batch:
            if m.error() is None:
                self.read[m.partition()] = m.offset() + 1
        return batch

    def position(self, partitions: list[Any]) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, self.read.get(tp.partition, -1001)) for tp in partitions]

    def unassign(self) -> None:
        self.assigned_at_end = self.assigned

    def close(self) -> None:
        self.closed = True


def test_dead_letters_are_read_from_the_start_to_the_end_at_the_time_of_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ranges = [PartitionRange(0, 2, 4, 2, 4), PartitionRange(1, 0, 0, 0, 0), PartitionRange(2, 0, 1, 0, 1)]
    monkeypatch.setattr(redrive, "plan_ranges", lambda *_args: ranges)
    consumer = ScriptedConsumer(
        [
            Message(topic="dl", partition=0, offset=2, value=letter(2).encode()),
            Message(topic="dl", partition=2, offset=0, value=letter(0).encode()),
            Message(topic="dl", partition=0, offset=3, value=letter(3).encode()),
        ]
    )
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: consumer)
    read = list(redrive.read_dead_letters(Settings(), "dl", idle_timeout_s=5))
    assert read == [letter(2), letter(0), letter(3)]
    assert consumer.assigned == [(0, 2), (2, 0)] and consumer.closed  # the empty partition is not read


class RetentionDuringReadConsumer(ScriptedConsumer):
    """Reads partition 0 from offset 2; retention deletes offsets up to 6 after the first letter, so the next
    fetch is out of range (``auto.offset.reset=error``), and the read goes on from the earliest kept offset."""

    def __init__(self) -> None:
        super().__init__([])
        self.batches = [
            [Message(topic="dl", partition=0, offset=2, value=letter(2).encode())],
            [Message(topic="dl", partition=0, offset=3, error=KafkaError(KafkaError._AUTO_OFFSET_RESET))],
        ]

    def incremental_unassign(self, partitions: list[Any]) -> None:
        self.assigned = [a for a in self.assigned if a[0] not in {tp.partition for tp in partitions}]

    def incremental_assign(self, partitions: list[Any]) -> None:
        self.assigned += [(tp.partition, tp.offset) for tp in partitions]
        kept = [Message(topic="dl", partition=0, offset=o, value=letter(o).encode()) for o in range(6, 8)]
        self.batches.append(kept)

    def get_watermark_offsets(self, _tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 6, 8

    def consume(self, _n: int, timeout: float) -> list[Message]:
        batch = self.batches.pop(0) if self.batches else []
        for m in batch:
            if m.error() is None:
                self.read[m.partition()] = m.offset() + 1
        return batch


def test_letters_retention_deletes_while_they_are_read_are_counted_not_skipped_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With auto_offset_reset=earliest a position below the log start jumped to the earliest kept letter: the
    letters in between were neither counted nor re-driven, and nothing said so."""
    monkeypatch.setattr(redrive, "plan_ranges", lambda *_args: [PartitionRange(0, 2, 8, 2, 8)])
    consumer, resets = RetentionDuringReadConsumer(), []

    def assigned_consumer(_kafka: Any, _purpose: str, auto_offset_reset: str = "earliest") -> Any:
        resets.append(auto_offset_reset)
        return consumer

    monkeypatch.setattr(topic_replay, "assigned_consumer", assigned_consumer)
    deleted: dict[int, int] = {}
    read = list(redrive.read_dead_letters(Settings(), "dl", idle_timeout_s=5, deleted=deleted))
    assert resets == ["error"] and read == [letter(2), letter(6), letter(7)]
    assert deleted == {0: 3}  # offsets 3, 4 and 5
    assert redrive.deleted_warning(deleted) == (
        "3 dead letter(s) were deleted by retention while being read (partition 0: 3) and are not counted nor"
        " re-driven: their payloads are gone"
    )
    assert redrive.deleted_warning({0: 0}) is None


@pytest.mark.parametrize("dry_run", [True, False])
def test_redrive_warns_and_exits_1_when_retention_deleted_letters_while_it_read(
    monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    def read_dead_letters(*_a: Any, deleted: dict[int, int], **_k: Any) -> Any:
        deleted[2] = 40
        yield letter(5)

    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", lambda _s: TOPICS)
    monkeypatch.setattr(redrive, "read_dead_letters", read_dead_letters)
    monkeypatch.setattr(redrive, "send_all", lambda _s, sends: redrive.SendStats(sent=len(sends), acked=len(sends)))
    args = ["--stage", "alert-sender"] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(redrive.cli, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert "Warning: 40 dead letter(s) were deleted by retention while being read (partition 2: 40)" in output


# --------------------------------------------------------------------------- the input's headers


def _signed_command_letter(headers: tuple[tuple[str, Any], ...] | None = None) -> tuple[Any, Message, BotCommand]:
    """A signed ``confirm`` the case service dead-lettered (a retryable failure), as its Kafka record."""
    from infra.clients.transactional import Source
    from jobs.cases.service import CaseCore

    cmd = BotCommand("cmd-1", 1_700_000_000_000, "CONFIRM", "guard@example.com", "case-1", None, "webex")
    signed = ((SIGNATURE_HEADER, sign_command(cmd, "k" * 32)),) if headers is None else headers
    src = Source("commands", 0, 7, b"cmd-1", cmd.encode(), signed)
    out = CaseCore._dead_letter(src, InvalidRecord("internal_error", "boom"), 1_700_000_001_000)
    return out, Message(topic="dl", partition=0, offset=0, value=out.value, headers=list(out.headers)), cmd


def _plan_of(monkeypatch: pytest.MonkeyPatch, message: Message) -> redrive.RedrivePlan:
    monkeypatch.setattr(redrive, "plan_ranges", lambda *_args: [PartitionRange(0, 0, 1, 0, 1)])
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: ScriptedConsumer([message]))
    kept: dict[str, Any] = {}
    letters = list(redrive.read_dead_letters(Settings(), "dl", idle_timeout_s=5, headers=kept))
    return plan_redrive(letters, Selection(stages=frozenset({"case_service"})), {"commands": 1}, headers=kept)


def test_a_re_driven_signed_command_keeps_its_signature_and_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead letters kept none of the input's headers: a re-driven signed command came back unsigned and was
    refused as ``unauthorized``. The letter keeps them as prefixed headers (its schema is unchanged) and the copy
    gets them back."""
    out, message, cmd = _signed_command_letter()
    assert [name for name, _ in out.headers] == [f"{INPUT_HEADER_PREFIX}{SIGNATURE_HEADER}"]
    [send] = _plan_of(monkeypatch, message).sends
    producer = RecordingProducer()
    monkeypatch.setattr(redrive.kafka_clients, "producer", lambda *_a, **_k: producer)
    assert redrive.send_all(Settings(), [send]).acked == 1
    [sent] = producer.sent
    assert sent["headers"] == [(SIGNATURE_HEADER, sign_command(cmd, "k" * 32)), (REDRIVEN_HEADER, b"commands:0:7")]
    webex = WebexSettings(command_signing_key=SecretStr("k" * 32), allowed_people="guard@example.com")
    authenticate_command(BotCommand.decode(sent["value"]), sent["headers"], webex, cmd.issued_at, fresh=False)


def test_a_dead_letter_without_input_headers_re_drives_as_before_and_one_whose_headers_were_cut_is_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, old, _ = _signed_command_letter(headers=())
    [send] = _plan_of(monkeypatch, old).sends
    assert send.headers == ()
    _, cut, _ = _signed_command_letter(headers=(("big", b"x" * (MAX_DEAD_LETTER_HEADERS + 1)),))
    plan = _plan_of(monkeypatch, cut)
    assert plan.sends == [] and plan.outcome_total(redrive.HEADERS_CUT) == 1


def test_an_earlier_re_drives_mark_is_not_sent_twice() -> None:
    kept = dead_letter_headers([("trace", b"t1"), (REDRIVEN_HEADER, b"commands:0:3"), ("empty", None)])
    assert input_headers(kept) == (("trace", b"t1"), (REDRIVEN_HEADER, b"commands:0:3"), ("empty", None))
    assert redrive.restored(input_headers(kept) or ()) == (("trace", b"t1"), ("empty", None))


def test_a_whole_transaction_without_its_position_goes_back_keyed_by_lane_and_only_that() -> None:
    """A scoring-job ``internal_error`` of the transactions topic with partition/offset -1 (a transaction held in
    state from before the job kept its record's position) is re-driven when its payload is one whole transaction,
    keyed ``store/lane`` as the POS producers key it, once per run; other letters without a position are not."""
    from tests.builders import sale

    whole = sale("t1", store="store-007", lane="lane-03").encode()

    def unplaced(payload: bytes, kind: str = "internal_error", topic: str = "transactions") -> DeadLetter:
        return letter(-1, topic=topic, partition=-1, stage="scoring-job", kind=kind, payload=payload)

    letters = [
        unplaced(whole),
        unplaced(whole),  # the same transaction dead-lettered twice: sent once
        unplaced(whole + b"\x00"),  # not the record: something was added
        unplaced(whole[:-3]),  # cut off
        unplaced(whole, kind="delivery_failed"),
        unplaced(whole, topic="alerts"),
    ]
    plan = plan_redrive(letters, Selection(frozenset({"scoring-job"}), include_permanent=True), TOPICS)
    [send] = plan.sends
    assert (send.topic, send.partition, send.key, send.payload) == ("transactions", None, b"store-007/lane-03", whole)
    assert outcomes(plan) == {REDRIVE: 1, DUPLICATE: 1, NOT_KAFKA: 4}


@pytest.mark.parametrize("option", ["--since", "--until"])
def test_a_time_before_1970_is_refused_with_one_error_line_before_any_broker_is_asked(
    monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    """Negative milliseconds compared with every letter's failed_at: a --since before 1970 matched all of them."""

    def no_broker(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("asked the broker")

    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", no_broker)
    monkeypatch.setattr(redrive, "read_dead_letters", no_broker)
    result = CliRunner().invoke(redrive.cli, ["--stage", "alert-sender", option, "1969-12-31T23:59:59Z"])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {option}: ") and "before 1970-01-01T00:00:00Z" in line, line


def _metadata(monkeypatch: pytest.MonkeyPatch, topics: dict[str, Any]) -> None:
    """The cluster's answer to a list of its topics, as :func:`topic_replay.plan` asks for it."""

    class NoConsumer:
        def close(self) -> None:
            pass

    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: NoConsumer())
    metadata = SimpleNamespace(topics=topics)
    monkeypatch.setattr(topic_replay.kafka_clients, "cluster_metadata", lambda *_a, **_k: metadata)


def test_a_missing_dead_letters_topic_is_an_operational_failure_exit_1_not_a_bad_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It exited 2, the code of a bad command line, though every option was right."""
    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", lambda _s: dict(TOPICS))
    _metadata(monkeypatch, {})
    result = CliRunner().invoke(redrive.cli, ["--stage", "alert-sender"])
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: topic dead_letters does not exist"), line


def test_a_dead_letters_topic_the_broker_will_not_serve_is_named_with_the_brokers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redrive, "get_settings", lambda: Settings())
    monkeypatch.setattr(redrive, "cluster_topics", lambda _s: dict(TOPICS))
    denied = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    _metadata(monkeypatch, {"dead_letters": SimpleNamespace(error=denied, partitions={})})
    result = CliRunner().invoke(redrive.cli, ["--stage", "alert-sender"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"Error: topic dead_letters: the broker answered {denied.str()} ({denied.name()})"


def test_letters_of_a_topic_with_a_partition_without_a_leader_are_skipped_not_sent_to_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the topic's own error counted: a topic with a leaderless partition was taken with its partitions, and the
    copies sent to that partition timed out minutes later."""
    leaderless = partitions_led(3)
    leaderless[2].leader = -1
    refused = partitions_led(2)
    refused[0].error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    listed = {
        "alerts": SimpleNamespace(error=None, partitions=partitions_led(2)),
        "led": SimpleNamespace(error=None, partitions=leaderless),
        "refused": SimpleNamespace(error=None, partitions=refused),
        "down": SimpleNamespace(error=KafkaError(KafkaError.LEADER_NOT_AVAILABLE), partitions={}),
    }
    monkeypatch.setattr(redrive.kafka_clients, "admin_session", lambda _s: nullcontext(object()))
    monkeypatch.setattr(redrive.kafka_clients, "cluster_metadata", lambda *_a, **_k: SimpleNamespace(topics=listed))
    assert redrive.cluster_topics(Settings()) == {"alerts": 2}
