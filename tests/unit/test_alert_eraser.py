"""Alert messages taken back from Webex (sinks/alerts/erase.py): which posts fall due on a forget or with age,
what a sweep does with each answer, and the Webex channel's own ids and deletes against the local Webex API."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import ExitStack, closing, suppress
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, KafkaError

from infra.clients.webex import WebexClient
from infra.local.webex import LocalWebexServer
from infra.settings import AlertSettings, FaceSettings, Settings
from schemas.records import AuditEvent
from sinks.alerts import erase, sender
from sinks.alerts.erase import Eraser, forget_of
from sinks.alerts.sender import DeliveryError, Ledger, Task, WebexChannel, made_at
from tests.unit import test_alert_channels as channels
from tests.unit.test_alert_channels import ROOM, alert, run_worker, settings_for, webex_channel

webex, closer = channels.webex, channels.closer
"""The fixtures of tests/unit/test_alert_channels.py."""

DAY = 86_400_000
NOW = int(time.time() * 1000)
"""Posts are stamped with the wall clock when the ledger records them."""


@pytest.fixture(autouse=True)
def _retentions_without_kafka(monkeypatch: pytest.MonkeyPatch) -> None:
    """The senders these tests run read the topics' retentions at start (their ledger prune): the code's, not Kafka."""
    monkeypatch.setattr(
        sender.kafka_clients,
        "topic_configs",
        lambda _source, topics, _keys, timeout_s=10.0: {t: {"retention.ms": str(30 * DAY)} for t in topics},
    )


def ledger_at(closer: ExitStack, tmp_path: Path) -> Ledger:
    return closer.enter_context(closing(Ledger(tmp_path / "ledger.sqlite3")))


def post(ledger: Ledger, mid: str, subject: str | None, tx: str | None, made: int | None) -> None:
    """A Webex post of an alert about ``subject`` / ``tx`` made at ``made`` (wall clock)."""
    fields = {"subject_id": subject, "transaction_id": tx}
    ledger.mark_sent(f"alert-{mid}", "webex", mid, (mid,), fields, made)


class FakeChannel:
    """Answers deletes from a script: ``True`` deleted, ``False`` gone, an exception raised."""

    name = "webex"

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers, self.deleted = answers or {}, []

    def delete(self, message_id: str) -> bool:
        answer = self.answers.get(message_id, True)
        if isinstance(answer, Exception):
            raise answer
        self.deleted.append(message_id)
        return answer


def eraser(
    ledger: Ledger,
    channel: FakeChannel,
    keep_days: float | None = None,
    now: int = NOW,
    clock: list[float] | None = None,
) -> Eraser:
    """``clock``: the eraser's monotonic clock, ``clock[0]`` seconds (default: the real one)."""
    settings = Settings(alerts=AlertSettings(webex_keep_days=keep_days), faces=FaceSettings())
    monotonic = time.monotonic if clock is None else (lambda: clock[0])
    return Eraser(settings, ledger, {"webex": channel}, "g", now_ms=lambda: now, monotonic=monotonic)


def test_a_forget_or_expiry_that_did_not_fail_is_recorded_with_its_subject_and_source_sale() -> None:
    event = {"audit_id": "a1", "action": "FORGET", "outcome": "DONE", "subject_id": "subj-tx-9"}
    assert forget_of({**event, "transaction_id": "tx-9", "event_time": 5}) == ("a1", "subj-tx-9", "tx-9", 5)
    expiry = {**event, "action": "EXPIRE", "event_time": 5}
    assert forget_of({**expiry, "actor": "watchlist-service"}) == ("a1", "subj-tx-9", None, 5)
    assert forget_of({**expiry, "actor": "case-service"}) is None  # a case nobody decided: the entry stays
    assert forget_of({**event, "outcome": "UNCHANGED", "event_time": 5}) is not None  # the room may still have some
    assert forget_of({**event, "outcome": "FAILED", "event_time": 5}) is None
    assert forget_of({**event, "action": "ENROLL", "event_time": 5}) is None
    assert forget_of({**event, "subject_id": None, "event_time": 5}) is None


def test_posts_of_a_forgotten_subject_or_its_source_sale_fall_due_but_not_later_ones(
    tmp_path: Path, closer: ExitStack
) -> None:
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-match", "subj-tx-1", "tx-7", NOW - DAY)  # a suspect's match of the subject
    post(ledger, "m-source", None, "tx-1", NOW - 30 * DAY)  # the blocked sale the subject was enrolled from
    post(ledger, "m-other", "subj-tx-2", "tx-8", NOW - DAY)
    post(ledger, "m-after", "subj-tx-1", "tx-9", NOW + DAY)  # enrolled again after the forget
    assert ledger.due_posts(NOW, None) == {}
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", NOW)])
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", NOW)])  # replayed: once
    due = ledger.due_posts(NOW, None)
    assert due == {"m-match": ("webex", "subj-tx-1"), "m-source": ("webex", "subj-tx-1")}
    assert set(ledger.due_posts(NOW, 10 * DAY)) == {"m-match", "m-source"}  # posted just now: not aged
    aged = ledger.due_posts(NOW + 2 * DAY, DAY)
    assert aged == {**due, "m-other": ("webex", None), "m-after": ("webex", None)}  # due by both: once


def test_a_posted_alert_with_no_subject_or_sale_is_due_only_with_age(tmp_path: Path, closer: ExitStack) -> None:
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-1", None, None, None)
    ledger.record_forgets([("audit-1", "subj-x", None, NOW)])
    assert ledger.due_posts(NOW, None) == {}
    assert ledger.due_posts(NOW + 2 * DAY, DAY) == {"m-1": ("webex", None)}


def test_sweep_deletes_due_posts_counts_them_and_writes_one_audit_event(
    tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-1", "subj-a", "tx-1", NOW - DAY)
    post(ledger, "m-2", "subj-a", "tx-2", NOW - DAY)
    post(ledger, "m-new", None, "tx-4", NOW - DAY)
    monkeypatch.setattr(sender, "now_ms", lambda: NOW - 100 * DAY)
    post(ledger, "m-old", None, "tx-3", NOW - 100 * DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW - 1)])
    channel = FakeChannel({"m-2": False})
    result = eraser(ledger, channel).sweep()  # keep days: the alert snapshots' 92
    assert sorted(channel.deleted) == ["m-1", "m-2", "m-old"]
    assert (result.deleted, result.gone, result.refused, result.forgotten, result.aged) == (2, 1, 0, 2, 1)
    event = AuditEvent.decode(result.audit(NOW).encode())
    assert event.action == "ERASE" and event.outcome == "DONE" and event.actor == "alert-sender"
    assert event.details["webex_messages_deleted"] == "2" and event.details["subjects"] == "subj-a"
    assert ledger.due_posts(NOW, 92 * DAY) == {}  # the ledger forgot them: the next sweep has nothing to do
    assert eraser(ledger, FakeChannel()).sweep().done == 0


def test_sweep_gives_up_a_refused_delete_and_stops_while_webex_is_down(tmp_path: Path, closer: ExitStack) -> None:
    ledger = ledger_at(closer, tmp_path)
    for mid in ("m-1", "m-2", "m-3"):
        post(ledger, mid, "subj-a", mid, NOW - DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW)])
    refused = DeliveryError("403 not yours", retriable=False)
    down = DeliveryError("503", retriable=True, down=True)
    channel = FakeChannel({"m-1": refused, "m-2": down, "m-3": down})
    result = eraser(ledger, channel).sweep()
    assert result.refused == 1 and result.stopped == "503"
    assert result.audit(NOW).outcome == "FAILED"
    assert set(ledger.due_posts(NOW, None)) == {"m-2", "m-3"}  # tried again at the next sweep
    channel.answers.clear()
    assert eraser(ledger, channel).sweep().deleted == 2


def test_keep_days_zero_keeps_messages_until_a_forget(tmp_path: Path, closer: ExitStack) -> None:
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-old", None, "tx-1", NOW)
    ledger.mark_sent("alert-mail", "email", "<mail-id>")  # a mail keeps no post: it cannot be taken back
    later = NOW + 1000 * DAY
    assert eraser(ledger, FakeChannel(), keep_days=0, now=later).sweep().done == 0
    assert eraser(ledger, FakeChannel(), keep_days=7, now=later).sweep().aged == 1


def test_webex_channel_answers_the_ids_of_the_alert_and_its_card_and_deletes_both(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    detail = channel.send(alert(), b"\xff\xd8 not really a jpeg", maybe_sent=False)
    ids = detail.split()
    assert [m["id"] for m in webex.state.bot_messages(ROOM)] == ids and len(ids) == 2
    assert webex.state.files
    assert [channel.delete(m) for m in ids] == [True, True]
    assert webex.state.bot_messages(ROOM) == [] and not webex.state.files  # the snapshot went with its message
    assert channel.delete(ids[0]) is False  # gone already
    webex.say(ROOM, "guard@example.com", "hello")
    [someone] = [m for m in webex.state.messages if m["personEmail"] == "guard@example.com"]
    with pytest.raises(DeliveryError) as refused:
        channel.delete(someone["id"])
    assert not refused.value.retriable


def test_a_worker_keeps_the_ids_an_erasable_channel_posted_with_the_alerts_subject(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, webex_cards=True)
    suspect = {**alert("suspect:tx-5"), "subject_id": "subj-tx-1", "transaction_id": "tx-5"}
    [outcome], ledger, _ = run_worker(
        closer,
        webex_channel(closer, settings),
        settings,
        [Task(suspect, "webex", time.monotonic() + 30, alert_ms=suspect["event_time"])],
    )
    assert outcome.delivered
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", suspect["event_time"])])
    due = ledger.due_posts(suspect["event_time"], None)
    assert set(due) == {m["id"] for m in webex.state.bot_messages(ROOM)} and len(due) == 2


class NoAudit:
    """A consumer of an audit topic with nothing new on it."""

    def consume(self, num_messages: int, timeout: float) -> list:
        return []

    def commit(self, asynchronous: bool) -> None:
        raise AssertionError("nothing fetched, nothing to commit")


def webex_down_on_a_forget(closer: ExitStack, tmp_path: Path, reason: str) -> tuple[Ledger, FakeChannel, Eraser]:
    """A post of a forgotten subject, due, and a Webex that answers its delete with ``reason`` (down)."""
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-1", "subj-a", "tx-1", NOW - DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW)])
    channel = FakeChannel({"m-1": DeliveryError(reason, retriable=True, down=True)})
    return ledger, channel, eraser(ledger, channel)


def test_a_sweep_webex_stopped_goes_on_within_a_minute_not_at_the_next_hourly_one(
    tmp_path: Path, closer: ExitStack
) -> None:
    ledger, channel, worker = webex_down_on_a_forget(closer, tmp_path, "503")
    last = worker._turn(NoAudit(), None, float("-inf"), threading.Event())  # type: ignore[arg-type]
    due_in = last + worker.sweep_interval_s - time.monotonic()
    assert 0 < due_in <= 60 and set(ledger.due_posts(NOW, None)) == {"m-1"}
    stopping = threading.Event()
    stopping.set()
    channel.answers.clear()
    assert worker.sweep(stopping).stopped == "the sender is stopping" and channel.deleted == []


def test_a_sweep_the_bots_rate_limit_stopped_goes_on_when_the_pause_ends_not_before_nor_a_fixed_minute_later(
    tmp_path: Path, closer: ExitStack
) -> None:
    """A delete that met the bot's 429 (or its pause, set by another room's send) stopped the sweep, and the next
    one came a fixed minute later, or at the next turn after a forget, whatever the pause asked."""
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-1", "subj-a", "tx-1", NOW - DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW)])
    channel = FakeChannel({"m-1": DeliveryError("429", retry_after=120.0, rate_limited=True)})
    worker = eraser(ledger, channel)
    last = worker._turn(NoAudit(), None, float("-inf"), threading.Event())  # type: ignore[arg-type]
    assert 119 < last + worker.sweep_interval_s - time.monotonic() <= 120
    channel.answers.clear()
    worker.wake()  # a withheld alert's copy, due now: still not one delete before the pause ends
    assert worker._turn(NoAudit(), None, last, threading.Event()) == last  # type: ignore[arg-type]
    assert channel.deleted == [] and set(ledger.due_posts(NOW, None)) == {"m-1"}


class CountingChannel(FakeChannel):
    """Counts every delete asked of it, answered or not."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        super().__init__(answers)
        self.asked = 0

    def delete(self, message_id: str) -> bool:
        self.asked += 1
        return super().delete(message_id)


@pytest.mark.parametrize(
    ("failure", "outage"),
    [(DeliveryError("HTTP 503", down=True), True), (DeliveryError("HTTP 401: token refused"), False)],
)
def test_a_sweep_webex_stopped_while_a_forget_is_fresh_waits_its_minute_not_one_turn(
    tmp_path: Path, closer: ExitStack, failure: DeliveryError, outage: bool
) -> None:
    """While a forget was fresh (minute-by-minute sweeps), a sweep Webex stopped was due again at once: the eraser
    asked a Webex that was down every second. Now it waits its minute; a new forget or wake goes sooner only when
    Webex was not down (a refused token may be mended any time)."""
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-1", "subj-a", "tx-1", NOW - DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW)])
    channel, clock = CountingChannel({"m-1": failure}), [1000.0]
    worker = eraser(ledger, channel, clock=clock)

    def turn(last: float) -> float:
        return worker._turn(NoAudit(), Client(), last, threading.Event())  # type: ignore[arg-type]

    last = turn(float("-inf"))
    assert channel.asked == 1 and worker._fresh_until > NOW  # the forget is fresh: sweeps every minute
    for _ in range(58):
        clock[0] += 1
        last = turn(last)
    assert channel.asked == 1, "a stopped sweep went on at the next turn"
    worker.wake()
    last = turn(last)
    assert channel.asked == (1 if outage else 2)
    clock[0] = (1000.0 if outage else 1059.0) + 60  # a minute after the last sweep Webex stopped
    channel.answers.clear()
    turn(last)
    assert channel.deleted == ["m-1"] and not ledger.due_posts(NOW, None)


def test_a_forget_takes_alerts_made_before_it_or_within_its_grace_but_not_later_ones(
    tmp_path: Path, closer: ExitStack
) -> None:
    """Wall clocks: the job may score a match before it reads the tombstone; a re-enrolled subject's later
    alerts stay."""
    ledger = ledger_at(closer, tmp_path)
    now = int(time.time() * 1000)  # not NOW: the post without a time is stamped with the clock of this test
    post(ledger, "m-before", "subj-a", "tx-1", now - 1)
    post(ledger, "m-just-after", "subj-a", "tx-2", now + 120_000)
    post(ledger, "m-much-later", "subj-a", "tx-3", now + 3_600_000)
    post(ledger, "m-unknown-time", "subj-a", "tx-4", None)  # posted just now, before the forget below
    ledger.record_forgets([("audit-1", "subj-a", None, now + 1000)])
    assert set(ledger.due_posts(now, None)) == {"m-before", "m-just-after", "m-unknown-time"}


def test_the_sweeps_lookups_use_indexes_not_table_scans(tmp_path: Path, closer: ExitStack) -> None:
    """Under the ledger's lock, which every send's ledger write waits for: a scan of 100k posts per forget
    stalled alert delivery for seconds."""
    ledger = ledger_at(closer, tmp_path)
    plan = " ".join(str(row) for row in ledger._db.execute("EXPLAIN QUERY PLAN " + Ledger.FORGOTTEN_SQL))
    assert "SCAN p" not in plan and "USING INDEX posts_subject_id" in plan and "posts_transaction_id" in plan


def test_a_refused_token_stops_the_sweep_and_keeps_the_messages_only_403_gives_up(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    ids = channel.send(alert(), None, maybe_sent=False).split()
    wrong = webex_channel(closer, settings_for(webex, tmp_path, token="revoked"))
    with pytest.raises(DeliveryError) as refused:
        wrong.delete(ids[0])
    assert refused.value.retriable  # a token to mend, not a message to give up
    assert len(webex.state.bot_messages(ROOM)) == 1
    webex.state.fail((400,), count=1)
    with pytest.raises(DeliveryError) as bad:
        channel.delete(ids[0])
    assert not bad.value.retriable  # this one message: given up, so it cannot hold the others up for ever
    with pytest.raises(DeliveryError) as no_id:
        channel.delete("")
    assert not no_id.value.retriable


class ThreadRoom:
    """A room where a guard answered in the alert's thread before the card was posted."""

    def __init__(self) -> None:
        self.cards: list[str] = []
        bot = "person-bot"
        marker = "_alert `blocked:tx-1`_"
        self.messages = [
            {"id": "m-guard", "parentId": "m-alert", "personId": "person-guard", "markdown": "on it"},
            {"id": "m-alert", "personId": bot, "markdown": f"**Sale blocked**\n\n{marker}"},
        ]

    def list_messages(self, room_id: str, max_items: int = 100) -> list[dict[str, Any]]:
        return list(self.messages)

    def me(self) -> dict[str, Any]:
        return {"id": "person-bot"}

    def send_card(self, room_id: str, markdown: str, card: dict, parent_id: str | None = None) -> dict[str, Any]:
        self.cards.append(parent_id or "")
        return {"id": "m-card"}


def test_a_resend_does_not_take_a_persons_thread_reply_for_the_card(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, webex={"room_id": ROOM}, alerts=AlertSettings(webex_cards=True))
    room = ThreadRoom()
    channel = WebexChannel(settings, room)  # type: ignore[arg-type]
    assert channel.send(alert(), None, maybe_sent=True) == "m-alert m-card" and room.cards == ["m-alert"]


class Record:
    """What ``made_at`` reads of a Kafka message."""

    def __init__(self, kind: int, stamp: int) -> None:
        self.stamp = (kind, stamp)

    def timestamp(self) -> tuple[int, int]:
        return self.stamp


def test_an_alert_is_made_at_the_earlier_of_its_record_time_and_its_event_time() -> None:
    assert made_at(Record(TIMESTAMP_CREATE_TIME, 2000), {"event_time": 1000}) == 1000  # a replay's historic time
    assert made_at(Record(TIMESTAMP_CREATE_TIME, 2000), {"event_time": 3000}) == 2000  # a till's clock ahead
    assert made_at(Record(TIMESTAMP_NOT_AVAILABLE, 0), {"event_time": 3000}) == 3000
    assert made_at(Record(TIMESTAMP_NOT_AVAILABLE, 0), {}) is None


def test_a_subject_enrolled_again_keeps_its_new_alerts_within_the_forgets_grace(
    tmp_path: Path, closer: ExitStack
) -> None:
    ledger = ledger_at(closer, tmp_path)
    post(ledger, "m-old", "subj-tx-9", "tx-20", NOW - DAY)
    post(ledger, "m-new", "subj-tx-9", "tx-21", NOW + 240_000)  # after `fraud tx-9` again, within the grace
    ledger.record_forgets([("audit-1", "subj-tx-9", "tx-9", NOW)], [("subj-tx-9", NOW + 30_000)])
    assert set(ledger.due_posts(NOW, None)) == {"m-old"}
    ledger.record_forgets([], [("subj-tx-9", NOW - DAY)])  # an enrolment before the forget changes nothing
    assert set(ledger.due_posts(NOW, None)) == {"m-old"}


class AuditLog:
    """A consumer that hands out audit events once."""

    def __init__(self, *events: AuditEvent) -> None:
        self.batches = [[Message(e) for e in events]] if events else []

    def consume(self, num_messages: int, timeout: float) -> list:
        return self.batches.pop(0) if self.batches else []

    def commit(self, asynchronous: bool) -> None:
        pass


class Message:
    def __init__(self, event: AuditEvent) -> None:
        self._value = event.encode()

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value


def test_while_a_forget_is_fresh_its_late_posted_alerts_go_within_a_minute(tmp_path: Path, closer: ExitStack) -> None:
    """An alert made within the grace is posted after the forget's own sweep: the next sweep must not wait an
    hour."""
    ledger = ledger_at(closer, tmp_path)
    channel = FakeChannel()
    worker = eraser(ledger, channel)
    forget = AuditEvent("f1", NOW, "FORGET", "DONE", "guard@x", subject_id="subj-a")
    audit = Client()
    last = worker._turn(AuditLog(forget), audit, float("-inf"), threading.Event())  # type: ignore[arg-type]
    post(ledger, "m-late", "subj-a", "tx-1", NOW + 60_000)  # made before the job read the tombstone
    assert worker._turn(AuditLog(), audit, last - 61, threading.Event()) != last - 61  # type: ignore[arg-type]
    assert channel.deleted == ["m-late"]
    restarted = eraser(ledger, FakeChannel())  # a restarted eraser remembers the forget is fresh
    assert restarted._fresh_until > NOW


class Client:
    """The Kafka clients ``Eraser.run`` makes, doing nothing."""

    def subscribe(self, topics: list[str]) -> None:
        pass

    def close(self) -> None:
        pass

    def flush(self, timeout: float) -> int:
        return 0

    def produce(self, topic: str, **record: Any) -> None:
        self.produced = [*getattr(self, "produced", []), topic]

    def poll(self, timeout: float) -> int:
        return 0


def scripted_turns(monkeypatch: pytest.MonkeyPatch, worker: Eraser, turn: Any) -> None:
    """``Eraser.run`` over ``turn`` instead of its own, with Kafka clients that do nothing and no pause after a
    failed turn."""
    monkeypatch.setattr(worker, "_turn", turn)
    monkeypatch.setattr(erase.kafka_clients, "consumer", lambda *a, **k: Client())
    monkeypatch.setattr(erase.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(erase, "FAILED_TURN_PAUSE_S", 0.01)


def test_a_turn_that_failed_sweeps_at_the_next_turn_not_the_next_hour(
    tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep that raised after its forgets were committed: nothing new comes to start another."""
    worker = eraser(ledger_at(closer, tmp_path), FakeChannel())
    stop = threading.Event()
    seen: list[float] = []

    def turn(consumer: Any, producer: Any, last_sweep: float, _stop: threading.Event) -> float:
        seen.append(last_sweep)
        if len(seen) == 1:
            return time.monotonic()  # a sweep now
        if len(seen) == 2:
            raise OSError("disk I/O error")  # the next one, after a forget was committed, fails
        stop.set()
        return last_sweep

    scripted_turns(monkeypatch, worker, turn)
    worker.sweep_interval_s = 3600.0
    worker.run(stop)
    assert len(seen) == 3 and time.monotonic() - seen[2] >= 3600  # due at once


def test_the_eraser_reports_a_sweep_webex_held_up_and_a_failing_turn_until_they_go_through(
    tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgotten subjects' faces staying in the room shows on the sender's health, not only in its log."""
    _, channel, worker = webex_down_on_a_forget(closer, tmp_path, "HTTP 503")
    clock = [1000.0]
    worker.monotonic = lambda: clock[0]
    assert worker.problem is None
    last = worker._turn(NoAudit(), None, float("-inf"), threading.Event())  # type: ignore[arg-type]
    assert worker.problem == "Webex deletes held up (HTTP 503)"
    channel.answers.clear()
    clock[0] += 60
    worker._turn(NoAudit(), Client(), last, threading.Event())  # type: ignore[arg-type]
    assert worker.problem is None and channel.deleted == ["m-1"]

    stop = threading.Event()
    problems: list[str | None] = []

    def turn(consumer: Any, producer: Any, last_sweep: float, _stop: threading.Event) -> float:
        problems.append(worker.problem)
        if len(problems) == 1:
            raise OSError("disk I/O error")
        stop.set()
        return last_sweep

    scripted_turns(monkeypatch, worker, turn)
    worker.run(stop)
    assert problems == [None, "alert eraser failing (OSError)"] and worker.problem is None


def test_the_senders_health_fails_when_its_eraser_thread_has_died_and_shows_the_erasers_problem(
    tmp_path: Path, webex: LocalWebexServer, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, channels="webex")
    channel = webex_channel(closer, settings)
    alerts = sender.AlertSender(settings, channels=[channel], ledger=ledger_at(closer, tmp_path))
    assert alerts.health() == (True, "ok")
    alerts._eraser = eraser(alerts.ledger, FakeChannel())
    alerts._eraser._sweep_problem = "Webex deletes held up (HTTP 503)"
    assert alerts.problem() == "Webex deletes held up (HTTP 503)"
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    alerts._eraser_thread = dead
    assert alerts.health() == (False, "alert eraser stopped")
    alerts._halt.set()  # a sender stopping ends its eraser on purpose
    assert alerts.health()[0]


class ErrorEvent:
    """What the consumer hands out while the brokers are away or the topic is missing: an event, not a record."""

    def __init__(self, code: int) -> None:
        self._error = KafkaError(code)

    def error(self) -> KafkaError:
        return self._error


def test_audit_consumer_errors_show_on_health_until_a_record_is_read(tmp_path: Path, closer: ExitStack) -> None:
    """librdkafka reports brokers away as events, so the turn goes through and nothing else would tell."""
    worker = eraser(ledger_at(closer, tmp_path), FakeChannel())
    worker.take([ErrorEvent(KafkaError._PARTITION_EOF)])
    assert worker.problem is None  # the end of a partition is no error
    worker.take([ErrorEvent(KafkaError.UNKNOWN_TOPIC_OR_PART)])
    assert worker.problem == "audit topic unreadable (UNKNOWN_TOPIC_OR_PART)"
    worker.take([Message(AuditEvent("e1", NOW, "ENROLL", "DONE", "guard@x", subject_id="subj-b"))])
    assert worker.problem is None


def test_brokers_away_reach_the_erasers_health_through_its_consumers_error_callback(
    tmp_path: Path, closer: ExitStack
) -> None:
    """consume() returns nothing while no broker answers: librdkafka tells only an error_cb. A real consumer of a
    port nothing listens on, so the callback is the one the eraser builds its consumer with."""
    from infra.clients import kafka as kafka_clients
    from infra.settings import KafkaSettings

    worker = eraser(ledger_at(closer, tmp_path), FakeChannel())
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    consumer = kafka_clients.consumer(kafka, "g", error_cb=worker.on_kafka_error, reconnect_backoff_ms=50)
    try:
        consumer.subscribe(["audit"])
        deadline = time.monotonic() + 20
        while worker.problem is None and time.monotonic() < deadline:
            assert consumer.consume(10, timeout=0.2) == []
    finally:
        consumer.close()
    assert worker.problem is not None and worker.problem.startswith("audit topic unreadable (")


class PostingChannel:
    """A Webex-like channel that records what it posted, with the face snapshot it was given."""

    name, can_check_sent, erasable = "webex", False, True

    def __init__(self) -> None:
        self.posted: list[tuple[str, bytes | None]] = []
        self.lock = threading.Lock()

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        with self.lock:
            self.posted.append((alert["alert_id"], image))
        return f"msg-{alert['alert_id']}"

    def delete(self, message_id: str) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_re_driven_alert_of_a_forgotten_subject_is_withheld_and_audited_never_posted(
    tmp_path: Path, closer: ExitStack
) -> None:
    """A re-drive after the forget posted the subject's face again, until the next hourly sweep deleted it."""
    from confluent_kafka import Message as KafkaMessage

    from schemas.records import Alert
    from tests.unit.test_process_metrics import ConfirmingProducer

    ledger = ledger_at(closer, tmp_path)
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", NOW)])
    channel, producer = PostingChannel(), ConfirmingProducer()
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="webex", concurrency=2))
    alerts = sender.AlertSender(settings, channels=[channel], ledger=ledger, image_loader=lambda ref: b"face")
    alerts._producer = producer  # type: ignore[assignment]

    def record(alert_id: str, subject: str | None, tx: str, offset: int) -> KafkaMessage:
        made = Alert(
            alert_id=alert_id,
            kind="WATCHLIST_MATCH",
            severity="high",
            event_time=NOW - 60_000,  # made before the forget: re-driven after it
            store_id="S1",
            summary="x",
            transaction_id=tx,
            subject_id=subject,
            snapshot_ref=f"checkout/{tx}.jpg",
        )
        return KafkaMessage(topic="alerts", partition=0, offset=offset, value=made.encode())

    def settle() -> None:
        deadline = time.monotonic() + 10
        while alerts._unfinished and time.monotonic() < deadline:
            alerts._drain_outcomes()
            producer.poll()
            time.sleep(0.01)

    with closing(alerts):
        alerts.start_workers()
        alerts._accept_batch(
            [
                record("suspect:tx-7", "subj-tx-1", "tx-7", 1),  # the forgotten subject, matched at another sale
                record("blocked:tx-1", None, "tx-1", 2),  # the sale the subject was enrolled from
                record("suspect:tx-8", "subj-tx-2", "tx-8", 3),  # someone else
            ]
        )
        settle()
        assert channel.posted == [("suspect:tx-8", b"face")]
        assert ledger.state("suspect:tx-7", "webex") == ledger.state("blocked:tx-1", "webex") == "withheld"
        audits = [AuditEvent.decode(v) for topic, v in producer.sent if topic == "audit"]
        assert {(a.action, a.subject_id, a.details["alert_id"], a.details["forgotten"]) for a in audits} == {
            ("WITHHOLD", None, "blocked:tx-1", "subj-tx-1"),
            ("WITHHOLD", "subj-tx-1", "suspect:tx-7", "subj-tx-1"),
        }
        assert alerts.stats.withheld == 2 and alerts.stats.alerts_done == 3
        # Re-driven again once the forget itself is no longer remembered: still withheld, by the ledger.
        ledger.drop_posts([], forgets_before_ms=NOW + 1)
        alerts._accept_batch([record("suspect:tx-7", "subj-tx-1", "tx-7", 4)])
        settle()
        assert [a for a, _ in channel.posted] == ["suspect:tx-8"]


def test_a_sweep_whose_ledger_the_shutdown_closed_ends_quietly_and_the_next_start_finishes_it(
    tmp_path: Path, closer: ExitStack
) -> None:
    """The sweep raised LedgerClosed from drop_posts: its ERASE audit was lost and the loop logged a retry."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    for mid in ("m-1", "m-2"):
        post(ledger, mid, "subj-a", None, NOW - DAY)
    ledger.record_forgets([("audit-1", "subj-a", None, NOW)])
    stop = threading.Event()

    class ShutdownMidSweep(FakeChannel):
        def delete(self, message_id: str) -> bool:
            stop.set()  # the sender stops, and its shutdown closes the ledger, while this delete is under way
            ledger.close()
            return super().delete(message_id)

    first = ShutdownMidSweep()
    result = eraser(ledger, first).sweep(stop)
    assert (result.deleted, result.stopped) == (1, "the sender is stopping")  # its audit still goes out
    with pytest.raises(sender.LedgerClosed):
        ledger.due_posts(NOW, None)  # a read too says so, not sqlite3's "closed database"
    reopened = ledger_at(closer, tmp_path)
    second = FakeChannel({first.deleted[0]: False})
    again = eraser(reopened, second).sweep()
    assert (again.deleted, again.gone) == (1, 1) and reopened.due_posts(NOW, None) == {}


def test_the_eraser_stopped_by_a_closed_ledger_at_shutdown_logs_no_failure_and_no_retry(
    tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    worker = eraser(ledger, FakeChannel())
    stop = threading.Event()

    def turn(consumer: Any, producer: Any, last_sweep: float, _stop: threading.Event) -> float:
        stop.set()
        ledger.close()
        worker.sweep(stop)
        return time.monotonic()

    scripted_turns(monkeypatch, worker, turn)
    with caplog.at_level("INFO", logger="sinks.alerts.erase"):
        worker.run(stop)
    assert not [r for r in caplog.records if r.levelname != "INFO"] and worker.problem is None
    assert "stopped with the ledger closed" in caplog.text


def test_shutdown_waits_for_the_eraser_within_the_sends_wait_not_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eraser was joined for 15 s, then each channel's sends for 15 s more: past the supervisor's 20 s."""
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.3))
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    stuck = threading.Event()

    def start_eraser(halt: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=stuck.wait, args=(5.0,), daemon=True)  # a Webex delete under way
        thread.start()
        return thread

    monkeypatch.setattr(alerts, "start_eraser", start_eraser)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    started = time.monotonic()
    alerts.run(stop)
    took = time.monotonic() - started
    stuck.set()
    assert took < 2.0


class StoppedConsumer(Client):
    """The alert sender's consumer of a run stopped before its first fetch."""

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def commit(self, **kwargs: Any) -> None:
        pass


class StuckChannel:
    """A channel whose send is still under way at shutdown (a Webex or SMTP call waiting out its timeout)."""

    can_check_sent, erasable = False, False

    def __init__(self, name: str, both_sending: threading.Barrier, release: threading.Event) -> None:
        self.name, self.both_sending, self.release = name, both_sending, release

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        with suppress(threading.BrokenBarrierError):
            self.both_sending.wait(10)
        self.release.wait(10)
        return None

    def delete(self, message_id: str) -> bool:
        return False

    def close(self) -> None:
        pass


def test_shutdown_with_every_channel_stuck_mid_send_waits_the_stop_wait_once_not_once_per_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each channel's sends were waited for 15 s one channel after the other (and again when the sender closed):
    with e-mail and Webex both stuck, 2 x 15 s and more, past the supervisor's 20 s before its SIGKILL."""
    from confluent_kafka import Message as KafkaMessage

    from schemas.records import Alert

    wait_s = 0.5
    stop, release = threading.Event(), threading.Event()
    both_sending = threading.Barrier(3)
    channels = [StuckChannel(name, both_sending, release) for name in ("email", "webex")]
    settings = Settings(
        stack_dir=tmp_path, alerts=AlertSettings(channels="email,webex", concurrency=1, stop_wait_s=wait_s)
    )
    alerts = sender.AlertSender(
        settings, channels=channels, ledger=Ledger(tmp_path / "ledger.sqlite3"), image_loader=lambda ref: b""
    )
    made = Alert(
        alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION", severity="high", event_time=NOW, store_id="S1", summary="x"
    )
    record = KafkaMessage(topic="alerts", partition=0, offset=1, value=made.encode())

    class OneAlertConsumer(StoppedConsumer):
        fetched = False

        def consume(self, num_messages: int, timeout: float) -> list:
            if self.fetched:
                time.sleep(timeout)
                return []
            self.fetched = True
            return [record]

    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: OneAlertConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    started: list[float] = []

    def sigterm_once_both_are_sending() -> None:
        both_sending.wait(10)
        started.append(time.monotonic())
        stop.set()

    signal = threading.Thread(target=sigterm_once_both_are_sending, daemon=True)
    signal.start()
    try:
        alerts.run(stop)
        took = time.monotonic() - started[0]
    finally:
        release.set()
    assert took < 1.8 * wait_s, f"shutdown took {took:.2f}s, the stop wait is {wait_s}s"


def test_an_alert_withheld_after_an_attempt_without_an_answer_has_the_copy_that_attempt_posted_recorded_for_deletion(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A post that timed out (or had a 5xx) may have gone through; when the alert's subject was forgotten before the
    retry, the alert was withheld without looking: the copy in the room, with the face, was never recorded and so
    never deleted."""
    import queue

    settings = settings_for(webex, tmp_path, webex_cards=True)  # ROOM: a group space
    channel = closer.enter_context(
        closing(WebexChannel(settings, WebexClient(webex.url, channels.TOKEN), has_reference=lambda _: False))
    )
    suspect = {**alert("suspect:tx-5"), "subject_id": "subj-tx-1", "transaction_id": "tx-5"}
    made = suspect["event_time"]
    ledger = ledger_at(closer, tmp_path)
    ledger.mark_sending("suspect:tx-5", "webex")  # the intent, then a post whose answer was lost:
    channel.send(suspect, b"face", maybe_sent=False)  # Webex posted it (and its card)
    copies = {m["id"] for m in webex.state.bot_messages(ROOM)}
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", made + 1000)])  # forgotten before the retry
    done: queue.SimpleQueue[sender.Outcome] = queue.SimpleQueue()
    worker = sender.ChannelWorker(channel, ledger, settings.alerts, done, lambda ref: b"face")
    try:
        worker.submit(Task(suspect, "webex", time.monotonic() + 30, maybe_sent=True, alert_ms=made))
        outcome = done.get(timeout=15)
    finally:
        worker.stop()
    assert outcome.withheld == "subj-tx-1" and ledger.state("suspect:tx-5", "webex") == "withheld"
    assert {m["id"] for m in webex.state.bot_messages(ROOM)} == copies and len(copies) == 2  # not posted again
    assert set(ledger.due_posts(made, None)) == copies  # the eraser deletes the copy and its card


class PostedWithoutAnswer(PostingChannel):
    """A Webex-like channel whose earlier try without an answer did post the alert and its card."""

    can_check_sent = True

    def find_sent(self, alert: dict[str, Any]) -> str | None:
        return "m-copy m-card"


def test_the_copies_a_withheld_alert_s_earlier_try_posted_are_deleted_at_once_not_at_the_next_hourly_sweep(
    tmp_path: Path, closer: ExitStack
) -> None:
    """Found and recorded long after its forget's fresh minute-by-minute sweeps, the copy with the shopper's face
    stayed in the room until the eraser's next hourly sweep."""
    ledger = ledger_at(closer, tmp_path)
    ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", NOW - 2 * DAY)])  # no longer fresh: hourly sweeps
    deleting = FakeChannel()
    worker = eraser(ledger, deleting)
    last = worker._turn(NoAudit(), Client(), float("-inf"), threading.Event())  # type: ignore[arg-type]
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="webex"))
    alerts = sender.AlertSender(settings, channels=[PostedWithoutAnswer()], ledger=ledger, image_loader=lambda r: b"")
    alerts._eraser = worker
    suspect = {**alert("suspect:tx-5"), "subject_id": "subj-tx-1", "transaction_id": "tx-5"}
    with closing(alerts):
        alerts.start_workers()
        alerts._workers["webex"].submit(
            Task(suspect, "webex", time.monotonic() + 30, maybe_sent=True, alert_ms=NOW - 3 * DAY)
        )
        outcome = alerts._done.get(timeout=10)
        assert outcome.withheld == "subj-tx-1" and set(ledger.due_posts(NOW, None)) == {"m-copy", "m-card"}
        worker._turn(NoAudit(), Client(), last, threading.Event())  # type: ignore[arg-type]  # the next turn
        assert sorted(deleting.deleted) == ["m-card", "m-copy"] and ledger.due_posts(NOW, None) == {}


class DownOnce:
    """A channel that is down for its first send (``on_down`` runs then) and takes every send after it."""

    name, can_check_sent, erasable = "email", False, False

    def __init__(self, on_down: Any) -> None:
        self.on_down, self.sent, self.tries = on_down, [], 0

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        self.tries += 1
        if self.tries == 1:
            self.on_down()
            raise DeliveryError("connection refused", down=True)
        self.sent.append(alert["alert_id"])
        return None

    def delete(self, message_id: str) -> bool:
        return False

    def close(self) -> None:
        pass


def test_an_alert_withheld_as_the_probe_of_a_channel_that_is_down_does_not_stop_the_channel(
    tmp_path: Path, closer: ExitStack
) -> None:
    """While a channel is down one task at a time goes out as its probe; a probe withheld (its subject forgotten
    during the outage) kept the probe's place for ever, and the channel sent nothing more until a restart."""
    import queue

    ledger = ledger_at(closer, tmp_path)
    forgotten = {**alert("suspect:tx-5"), "subject_id": "subj-tx-1", "transaction_id": "tx-5"}
    channel = DownOnce(lambda: ledger.record_forgets([("audit-1", "subj-tx-1", None, NOW)]))
    done: queue.SimpleQueue[sender.Outcome] = queue.SimpleQueue()
    settings = AlertSettings(concurrency=2, retry_initial_s=0.05, retry_max_s=0.1)
    worker = sender.ChannelWorker(channel, ledger, settings, done, lambda ref: b"")
    try:
        worker.submit(Task(forgotten, "email", time.monotonic() + 30, alert_ms=NOW - 1000))
        first = done.get(timeout=10)  # down, then probed again after the pause: withheld
        assert first.withheld == "subj-tx-1"
        worker.submit(Task(alert("blocked:tx-2"), "email", time.monotonic() + 30, alert_ms=NOW))
        second = done.get(timeout=5)
    finally:
        worker.stop()
    assert second.delivered and channel.sent == ["blocked:tx-2"]


def test_a_forgotten_subjects_alert_is_deleted_from_every_room_it_went_to_even_a_room_since_removed(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """With an alert posted in the alert room and its store's room, each room's copy must go on forget; a room taken
    out of CG_WEBEX__ROOM_STORES since keeps no face either (its posts were left for a channel that no longer ran)."""
    settings = channels.scoped_settings(webex, tmp_path, **{channels.NYC_ROOM: ["S-NYC"]})
    alerts = channels.routed_sender(closer, settings)
    shown = {**channels.in_store("suspect:tx-7", "S-NYC"), "subject_id": "subj-tx-1", "transaction_id": "tx-7"}
    channels.feed(alerts, shown)
    assert len(webex.state.bot_messages(ROOM)) == len(webex.state.bot_messages(channels.NYC_ROOM)) == 1
    old = WebexClient(webex.url, channels.TOKEN)
    closer.callback(old.close)
    gone_room = old.send_message("room-closed-store", "_alert `suspect:tx-6`_")["id"]
    alerts.ledger.mark_sent("suspect:tx-6", "webex:room-closed-store", gone_room, (gone_room,), shown, NOW - DAY)
    alerts.ledger.record_forgets([("audit-1", "subj-tx-1", "tx-1", NOW + 1000)])
    erasable = {c.name: c for c in alerts.channels}
    result = Eraser(settings, alerts.ledger, erasable, "g", now_ms=lambda: NOW + 1000).sweep()
    assert result.deleted == 3 and result.subjects == {"subj-tx-1"}
    assert webex.state.bot_messages(ROOM) == webex.state.bot_messages(channels.NYC_ROOM) == []
    assert webex.state.bot_messages("room-closed-store") == []


class FlushTimes(Client):
    """A producer that notes how long each flush may wait."""

    def __init__(self) -> None:
        self.flushes: list[float] = []

    def flush(self, timeout: float) -> int:
        self.flushes.append(timeout)
        return 0


def test_shutdown_waits_for_kafka_at_most_the_kafka_stop_flush_after_the_sends_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender's last flush waited a fixed 5 s after its stop wait, which alone was checked against the
    supervisor's stop timeout: the SIGKILL could come mid-flush. It is ``CG_KAFKA__STOP_FLUSH_S``, checked with it."""
    settings = Settings(
        stack_dir=tmp_path,
        kafka={"stop_flush_s": 0.7},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.3),
    )
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    producer = FlushTimes()
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: producer)
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    alerts.run(stop)
    assert producer.flushes == [0.7]


def test_shutdown_with_kafka_down_ends_within_the_stop_timeout_though_the_last_commit_and_close_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its stop wait and its Kafka flush, the sender's last offset commit and its consumer's close waited on
    Kafka for as long as it took: with the brokers down, past the supervisor's stop timeout, into its SIGKILL."""
    from confluent_kafka import Message as KafkaMessage

    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.2},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    kafka_down = threading.Event()
    committed: list[list[Any]] = []

    class HangingConsumer(StoppedConsumer):
        def commit(self, **kwargs: Any) -> None:
            committed.append(kwargs["offsets"])
            kafka_down.wait(10)

        def close(self) -> None:
            kafka_down.wait(10)

    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: HangingConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    done = sender.Pending(KafkaMessage(topic="alerts", partition=0, offset=4), None)
    done.finished = True  # sent and in the ledger: its offset may be committed
    waiting = sender.Pending(KafkaMessage(topic="alerts", partition=0, offset=5), None)  # a send still under way
    alerts._partitions[("alerts", 0)] = deque([done, waiting])
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    started = time.monotonic()
    try:
        alerts.run(stop)
        took = time.monotonic() - started
    finally:
        kafka_down.set()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    assert [[(tp.partition, tp.offset) for tp in offsets] for offsets in committed] == [[(0, 5)]], "the durable only"


def test_a_channel_whose_close_hangs_at_shutdown_is_given_up_within_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After its last commit the sender closed its channels as long as they took: an SMTP server that does not answer
    ``QUIT`` held each connection's close for the SMTP timeout (10 s), one after the other, past the supervisor's stop
    timeout into its SIGKILL. The close is given up 1 s before that SIGKILL with a WARNING, and the ledger closes."""
    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.2},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    server_gone = threading.Event()

    class QuitUnanswered(PostingChannel):
        def close(self) -> None:
            server_gone.wait(10)

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    alerts = sender.AlertSender(settings, channels=[QuitUnanswered()], ledger=ledger)
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=sender.log.name):
            alerts.run(stop)
        took = time.monotonic() - started
    finally:
        server_gone.set()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    assert any("webex channel's close was not done" in r.getMessage() for r in caplog.records)
    with pytest.raises(sender.LedgerClosed):
        ledger.counts()


def test_a_channel_that_closes_at_once_is_not_given_up_after_the_last_commit_or_another_close_used_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The channels were closed one after the other, each until the stop's deadline: once Kafka's last commit, or an
    SMTP server not answering ``QUIT``, had used up the time, a channel whose close ends at once got none and was given
    up with a WARNING all the same. They close side by side, each with a last chance: only the hanging one is named."""
    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.2},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    hung = threading.Event()

    class HangingConsumer(StoppedConsumer):
        def close(self) -> None:  # Kafka down: the last commit's close takes the time up to the deadline
            hung.wait(10)

    class QuitUnanswered(PostingChannel):
        name = "email"

        def close(self) -> None:
            hung.wait(10)

    class Closing(PostingChannel):
        def close(self) -> None:  # a few connections' sockets: done in a few milliseconds
            time.sleep(0.01)

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    alerts = sender.AlertSender(settings, channels=[QuitUnanswered(), Closing()], ledger=ledger)
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: HangingConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=sender.log.name):
            alerts.run(stop)
        took = time.monotonic() - started
    finally:
        hung.set()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    given_up = [r.getMessage() for r in caplog.records if "close was not done" in r.getMessage()]
    assert len(given_up) == 1 and "email channel's close" in given_up[0], given_up


def test_a_ledger_write_held_by_a_locked_database_at_shutdown_is_given_up_within_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger's close waited a fixed 10 s for its writer, then as long as the write under way took (a database
    another process holds locked: SQLite's 30 s busy timeout), past the supervisor's stop timeout into its SIGKILL. It
    is given up 1 s before that SIGKILL with a WARNING, the write left uncommitted as a SIGKILL would leave it."""
    import sqlite3

    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.2},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    other = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process writing: the ledger's writer waits for its lock
    released = threading.Timer(4.0, other.rollback)
    released.start()
    writing = threading.Thread(target=ledger.mark_sending, args=("a-1", "webex"), daemon=True)
    writing.start()
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=ledger)
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=sender.log.name):
            alerts.run(stop)
        took = time.monotonic() - started
    finally:
        released.cancel()
        other.rollback()
        writing.join(5)
        other.close()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    assert any("ledger" in r.getMessage() and "given up" in r.getMessage() for r in caplog.records)
    with pytest.raises(sender.LedgerClosed):
        ledger.mark_sent("a-1", "webex", None)


def test_the_stop_flush_waits_no_longer_than_the_time_left_before_the_stop_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender's flush at a stop waited ``CG_KAFKA__STOP_FLUSH_S`` whatever the stop had taken before it (a dead
    letter waiting for room in a full queue): the flush then ran past the stop timeout into the supervisor's SIGKILL.
    It waits the setting or the time left before the stop's deadline, whichever is shorter."""
    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 1.0},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    flushes: list[tuple[float, float]] = []

    class Flushing(Client):
        def flush(self, timeout: float) -> int:
            assert alerts._exit_by is not None
            flushes.append((timeout, alerts._exit_by - time.monotonic()))
            return 0

    drain = alerts._drain_outcomes

    def slow_drain() -> None:  # the stop's dead letters wait 1 s for room in the producer's queue
        drain()
        if alerts._exit_by is not None:
            time.sleep(1.0)

    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Flushing())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    monkeypatch.setattr(alerts, "_drain_outcomes", slow_drain)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch
    alerts.run(stop)
    [(timeout, left)] = flushes
    assert timeout <= left + 0.01, f"the flush may wait {timeout:.2f}s with {left:.2f}s left before the stop timeout"


class FullQueueClient(Client):
    """Kafka away with the producer's local queue full: no record is taken until ``room`` is set."""

    def __init__(self) -> None:
        self.room = threading.Event()

    def produce(self, topic: str, **record: Any) -> None:
        if not self.room.is_set():
            raise BufferError("Local: Queue full")
        super().produce(topic, **record)

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0


def test_a_dead_letter_kafka_has_no_room_for_at_a_stop_is_given_up_by_the_stops_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead letter produced at a stop (an alert whose send failed as the stop began) with Kafka away and the local
    queue full waited for room for ever, past the supervisor's SIGKILL. It is given up by the stop's deadline with a
    WARNING; its alert is not finished, so not committed, and is read again at the next start."""
    from confluent_kafka import Message as KafkaMessage

    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 1.0},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    pending = sender.Pending(KafkaMessage(topic="alerts", partition=0, offset=7, value=b"x"), {"alert_id": "a-1"})
    pending.waiting.add("webex")
    alerts._inflight[("a-1", "webex")] = [pending]
    alerts._done.put(sender.Outcome(("a-1", "webex"), delivered=False, reason="webex refused"))
    producer = FullQueueClient()
    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: StoppedConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: producer)
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    stop = threading.Event()
    stop.set()  # SIGTERM before the first fetch; the failed send's outcome is drained at the stop
    run = threading.Thread(target=alerts.run, args=(stop,), daemon=True)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger=sender.log.name):
            run.start()
            run.join(6)
            took = time.monotonic() - started
    finally:
        producer.room.set()  # without the fix: lets the stuck stop end
    assert not run.is_alive() and took < 2.5, f"the stop took {took:.1f}s (alive: {run.is_alive()}), its timeout 2.5s"
    assert pending.dead_letter is not None and not pending.finished
    assert any(
        "given up" in r.getMessage() and pending.dead_letter.dead_letter_id in r.getMessage() for r in caplog.records
    )


def test_the_stops_deadline_counts_from_when_the_stop_was_asked_not_from_when_the_loop_got_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender took its stop's deadline (1 s before the supervisor's SIGKILL) when its loop ended: a Kafka call in
    the loop that hung after SIGTERM (a synchronous commit, Kafka down) was not counted, and the stop's last calls ran
    that much past the SIGKILL. The deadline counts from when the stop was asked."""
    from infra.processes import StopRequest

    settings = Settings(
        stack_dir=tmp_path,
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 1.0},
        alerts=AlertSettings(channels="webex", concurrency=1, stop_wait_s=0.2),
    )
    alerts = sender.AlertSender(settings, channels=[PostingChannel()], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    stop = StopRequest()

    class HangingConsumer(StoppedConsumer):
        def consume(self, num_messages: int, timeout: float) -> list[Any]:
            stop.set()  # SIGTERM arrives while the loop waits on Kafka ...
            time.sleep(1.0)  # ... which answers only a second later
            return []

    monkeypatch.setattr(sender.kafka_clients, "consumer", lambda *a, **k: HangingConsumer())
    monkeypatch.setattr(sender.kafka_clients, "producer", lambda *a, **k: Client())
    monkeypatch.setattr(alerts, "start_eraser", lambda halt: None)
    alerts.run(stop)
    assert stop.asked_at is not None and alerts._exit_by is not None
    late = alerts._exit_by - (stop.asked_at + 2.5 - 1.0)
    assert abs(late) < 0.05, f"the stop's last calls end {late:.2f}s after 1 s before the SIGKILL"
