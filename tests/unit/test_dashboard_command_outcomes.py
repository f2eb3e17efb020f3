"""What became of a verdict given on the case page, as the case service audits it: the page only watched the case
for its next version, so a refusal in a race read "the case is now confirmed" and every other refusal "has not
changed in 30 s … the audit says why". The verdicts here are the dashboard's own commands, decided by the case
service's own core, and its audit events are what the dashboard reads."""

from __future__ import annotations

import base64
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition
from pydantic import SecretStr
from starlette.testclient import TestClient

from infra.settings import AlertSettings, DashboardSettings, Settings, WebexSettings
from jobs.cases.service import CaseCore, Source
from schemas.records import Alert, AuditEvent, BotCommand, case_id_for
from schemas.topics import AUDIT
from sinks.dashboard.app import Dashboard, create_app
from sinks.dashboard.cases import verdict_command
from sinks.dashboard.login import hash_password
from sinks.dashboard.outcome_reader import LOOKBACK_MS, AuditOutcomes
from sinks.dashboard.outcomes import (
    APPLIED,
    REFUSED,
    UNCHANGED,
    CommandOutcome,
    OutcomeBook,
    outcome_of,
    plain_reason,
)

NOW = 1_800_000_000_000
MIN = 60_000
KEY = "k" * 32
GUARD, LEAD = "guard@example.com", "lead@example.com"
ALERT = Alert("watchlist:tx-1", "WATCHLIST_MATCH", "high", NOW - MIN, "S01", "Possible match", transaction_id="tx-1")
CASE_ID = case_id_for(ALERT.alert_id)
RID = "0123456789abcdef0123456789abcdef"


def settings(*, allowed: str = f"{GUARD},{LEAD}", key: str = KEY) -> Settings:
    return Settings().model_copy(
        update={
            "dashboard": DashboardSettings(username=GUARD, password=SecretStr("pw"), token=SecretStr("tok")),
            "webex": WebexSettings(allowed_people=allowed, command_signing_key=SecretStr(key)),
            "alerts": AlertSettings(timezone="UTC"),
        }
    )


class Service:
    """The case service's core with the case of :data:`ALERT` open; what it audits is kept, as ``audit`` holds it."""

    def __init__(self, service_settings: Settings) -> None:
        self.core = CaseCore(service_settings)
        self.core.on_alert(Source("alerts", 0, 0, b"a", ALERT.encode()), NOW - MIN)
        self.audit: list[tuple[bytes, bytes]] = []
        self.offset = 0

    def send(self, command: BotCommand, key: str | None = KEY, at: int = NOW) -> None:
        from infra.command_auth import SIGNATURE_HEADER, sign_command

        self.offset += 1
        headers = ((SIGNATURE_HEADER, sign_command(command, key)),) if key else ()
        src = Source("commands", 0, self.offset, command.command_id.encode(), command.encode(), headers, at)
        for out in self.core.on_command(src, at):
            if out.topic == AUDIT and out.value is not None:
                self.audit.append((out.key, out.value))


def dashboard_verdict(verb: str, actor: str = GUARD, *, text: str | None = None, rid: str = RID, at: int = NOW):
    return verdict_command(CASE_ID, verb, actor, at, text=text, request_id=rid)


def read(service: Service) -> OutcomeBook:
    book = OutcomeBook()
    for key, value in service.audit:
        book.take(key, value, NOW)
    return book


# ------------------------------------------------------------------ pure: the audit's outcomes


def test_a_dashboard_verdict_the_case_service_applies_reads_applied_and_one_given_again_unchanged() -> None:
    service = Service(settings())
    confirm = dashboard_verdict("confirm")
    service.send(confirm)
    again = dashboard_verdict("confirm", rid="f" * 32)  # a second press of Confirm, a new submission
    service.send(again)
    book = read(service)
    applied, unchanged = book.get(confirm.command_id), book.get(again.command_id)
    assert applied is not None and (applied.outcome, applied.verb, applied.actor) == (APPLIED, "confirm", GUARD)
    assert unchanged is not None and unchanged.outcome == UNCHANGED
    assert "already confirmed" in unchanged.reason


def test_a_verdict_refused_in_a_race_names_who_decided_the_case_and_when() -> None:
    """Another person decided the case between the page's check and the service's read: the page said "the case is
    now confirmed", as if the dismissal had done it."""
    service = Service(settings())
    service.send(dashboard_verdict("confirm", LEAD, at=NOW - 1000), at=NOW - 1000)
    dismiss = dashboard_verdict("dismiss", text="not the same person")
    service.send(dismiss)
    outcome = read(service).get(dismiss.command_id)
    assert outcome is not None and (outcome.outcome, outcome.kind) == (REFUSED, "illegal_transition")
    case = {"state": "confirmed", "decided_by": LEAD, "decided_at": NOW - 1000, "store_id": "S01"}
    words = plain_reason(outcome, case, settings().alerts)
    assert words.startswith(f"{CASE_ID} is already confirmed: cannot dismiss it (confirmed by {LEAD} at 2027-01-15")
    assert "UTC" in words
    assert plain_reason(outcome, None, settings().alerts) == f"{CASE_ID} is already confirmed: cannot dismiss it"


@pytest.mark.parametrize(
    ("service_settings", "send", "kind", "says"),
    [
        # the service down past CG_WEBEX__COMMAND_MAX_AGE_S: the verdict, read on its return, is too old
        ({}, {"at": NOW + 3_600_000}, "unauthorized", "reached the case service too late (issued 3600 s ago"),
        # the service's allow-list is not the dashboard's
        ({"allowed": LEAD}, {}, "unauthorized", "you are not on the case service's allow-list"),
        # the service's signing key is not the dashboard's: its refusal names the command only as a claim
        ({"key": "other" * 8}, {}, "unauthorized", "could not verify it as the dashboard's (signature does not match)"),
    ],
)
def test_a_verdict_the_case_service_refuses_before_taking_it_reads_refused_with_the_reason_in_words(
    service_settings: dict, send: dict, kind: str, says: str
) -> None:
    service = Service(settings(**service_settings))
    note = dashboard_verdict("note", text="seen at the door")
    service.send(note, **send)
    outcome = read(service).get(note.command_id)
    assert outcome is not None and (outcome.outcome, outcome.kind, outcome.actor) == (REFUSED, kind, GUARD)
    assert says in plain_reason(outcome, None, settings().alerts)


def test_a_verdict_on_a_case_the_service_does_not_hold_reads_unknown_case_in_words() -> None:
    service = Service(settings())
    service.core.book.forget(CASE_ID)  # removed after its retention while the index still shows it
    confirm = dashboard_verdict("confirm")
    service.send(confirm)
    assert service.audit == []  # held for its alert as long as a command may be old (CG_WEBEX__COMMAND_MAX_AGE_S)
    for out in service.core.expire(NOW + 900_001):
        if out.topic == AUDIT and out.value is not None:
            service.audit.append((out.key, out.value))
    outcome = read(service).get(confirm.command_id)
    assert outcome is not None and outcome.kind == "unknown_case", service.audit
    assert "holds no such case" in plain_reason(outcome, None, settings().alerts)


def test_only_the_dashboards_commands_are_kept_and_a_claim_never_replaces_what_the_service_decided() -> None:
    service = Service(settings())
    webex = BotCommand("webex-msg-1", NOW, "NOTE", GUARD, f"{CASE_ID} seen", "room-1", "webex")
    service.send(webex)
    confirm = dashboard_verdict("confirm")
    service.send(confirm)
    service.send(confirm, key=None)  # an unsigned copy of it, refused under its offset, its id a claim
    book = read(service)
    assert len(book) == 1 and book.get("webex-msg-1") is None
    outcome = book.get(confirm.command_id)
    assert outcome is not None and outcome.outcome == APPLIED and outcome.verified


def test_outcomes_are_let_go_an_hour_after_they_were_written_and_past_the_most_kept() -> None:
    def event(n: int, at: int) -> tuple[bytes, bytes]:
        command_id = f"dashboard-{n:032x}"
        audit = AuditEvent(f"case:{command_id}", at, "NOTE", "DONE", GUARD, command_id=command_id)
        return audit.audit_id.encode(), audit.encode()

    book = OutcomeBook(max_kept=2)
    assert book.take(*event(1, NOW - 2 * 3_600_000), NOW) is None  # read after a restart: long answered
    for n in (2, 3, 4):
        book.take(*event(n, NOW), NOW)
    assert [book.get(f"dashboard-{n:032x}") is not None for n in (2, 3, 4)] == [False, True, True]
    assert outcome_of(b"case:dashboard-x", b"\x00not avro") is None


# ------------------------------------------------------------------ the endpoint


class Outcomes:
    def __init__(self, book: OutcomeBook, problem: str | None = None) -> None:
        self.book, self._problem = book, problem

    def get(self, command_id: str) -> CommandOutcome | None:
        return self.book.get(command_id)

    def problem(self) -> str | None:
        return self._problem


class CaseIndex:
    def __init__(self, case: dict[str, Any]) -> None:
        self.case = case

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        fields = body.get("_source", list(self.case))
        hits = [{"_source": {k: v for k, v in self.case.items() if k in fields}}] if index.endswith("-cases") else []
        return {"hits": {"total": {"value": len(hits)}, "hits": hits}, "aggregations": {}}


LEAD_HASH = hash_password("pw")


def login(person: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{person}:pw".encode()).decode()}


def client(book: OutcomeBook, case: dict[str, Any] | None = None, problem: str | None = None) -> TestClient:
    logins = DashboardSettings(
        username=GUARD, password=SecretStr("pw"), users={LEAD: SecretStr(LEAD_HASH)}, token=SecretStr("tok")
    )
    s = settings().model_copy(update={"dashboard": logins})
    indexed = {"case_id": CASE_ID, "state": "open", "store_id": "S01", **(case or {})}
    board = Dashboard(s, client=CaseIndex(indexed), images=None, clock=lambda: NOW / 1000)  # type: ignore[arg-type]
    app = create_app(s, board, publish=lambda *_: None, outcomes=Outcomes(book, problem))
    return TestClient(app, raise_server_exceptions=False)


def test_the_person_who_gave_a_verdict_is_told_its_outcome_and_nobody_else_is() -> None:
    service = Service(settings())
    service.send(dashboard_verdict("confirm", LEAD, at=NOW - 1000), at=NOW - 1000)
    dismiss = dashboard_verdict("dismiss", text="not the same person")
    pending = dashboard_verdict("note", text="later", rid="e" * 32)
    service.send(dismiss)
    decided = {"state": "confirmed", "decided_by": LEAD, "decided_at": NOW - 1000}
    web = client(read(service), decided)
    path = f"/api/cases/{CASE_ID}/commands/{dismiss.command_id}"
    answer = web.get(path, headers=login(GUARD))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert (body["outcome"], body["verb"]) == ("refused", "dismiss")
    assert f"(confirmed by {LEAD} at 2027-01-15" in body["reason"]
    assert set(body) == {"command_id", "outcome", "verb", "at", "local_time", "reason"}  # no details, no refs
    assert web.get(path, headers=login(LEAD)).json() == {"command_id": dismiss.command_id, "outcome": "pending"}
    assert web.get(path, headers={"Authorization": "Bearer tok"}).status_code == 403
    mine = f"/api/cases/{CASE_ID}/commands/{pending.command_id}"
    assert web.get(mine, headers=login(GUARD)).json()["outcome"] == "pending"
    assert web.get(f"/api/cases/case-ffffffffffff/commands/{dismiss.command_id}", headers=login(GUARD)).json() == {
        "command_id": dismiss.command_id,
        "outcome": "pending",
    }, "an outcome is told only under its own case"
    for bad in (f"/api/cases/{CASE_ID}/commands/dashboard-xyz", f"/api/cases/case-1/commands/{dismiss.command_id}"):
        assert web.get(bad, headers=login(GUARD)).status_code == 404


def test_an_applied_verdict_is_answered_without_a_reason_and_unreadable_answers_are_a_503() -> None:
    service = Service(settings())
    confirm = dashboard_verdict("confirm")
    service.send(confirm)
    path = f"/api/cases/{CASE_ID}/commands/{confirm.command_id}"
    body = client(read(service)).get(path, headers=login(GUARD)).json()
    assert (body["outcome"], body["local_time"]) == ("applied", "2027-01-15 08:00:00 UTC") and "reason" not in body
    away = client(OutcomeBook(), problem="checkout-guard.audit not read (Kafka unreachable)")
    answer = away.get(path, headers=login(GUARD))
    assert answer.status_code == 503 and "Kafka unreachable" in answer.json()["error"]


# ------------------------------------------------------------------ the read of audit


class Message:
    def __init__(self, key: bytes | None, value: bytes | None, error: KafkaError | None = None) -> None:
        self._key, self._value, self._error = key, value, error

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> KafkaError | None:
        return self._error


class Listed:
    def __init__(self, partitions: int) -> None:
        self.partitions = dict.fromkeys(range(partitions))
        self.error = None


class Consumer:
    """A consumer of ``audit`` answering ``batches`` in turn (a ``RuntimeError`` raised where one is an exception)."""

    def __init__(self, topic: str, batches: list[Any]) -> None:
        self.topic, self.batches = topic, batches
        self.assigned: list[TopicPartition] = []
        self.asked_since: list[int] = []
        self.closed = False
        self.emptied = threading.Event()

    def list_topics(self, topic: str, timeout: float) -> Any:
        return type("Metadata", (), {"topics": {self.topic: Listed(2)}})()

    def offsets_for_times(self, marks: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.asked_since = [tp.offset for tp in marks]
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in marks]

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if not self.batches:
            self.emptied.set()
            threading.Event().wait(0.01)
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        return batch

    def close(self) -> None:
        self.closed = True


def test_the_dashboard_reads_audit_from_an_hour_back_keeps_its_outcomes_and_reads_again_after_a_failure() -> None:
    service = Service(settings())
    confirm = dashboard_verdict("confirm")
    service.send(confirm)
    s = settings()
    topic = AUDIT.full_name(s.kafka.topic_prefix)
    eof = KafkaError(KafkaError._PARTITION_EOF)
    first = Consumer(topic, [RuntimeError("Kafka unreachable")])
    second = Consumer(topic, [[Message(None, None, eof), *(Message(k, v) for k, v in service.audit)]])
    made = [first, second]
    reader = AuditOutcomes(s, consumer=lambda: made.pop(0), now_ms=lambda: NOW, retry_s=0.01)
    assert reader.get(confirm.command_id) is None  # the first question starts the read
    assert second.emptied.wait(5), reader.problem()
    outcome = reader.get(confirm.command_id)
    reader.close(5)
    assert outcome is not None and outcome.outcome == APPLIED
    assert first.closed and second.closed and reader.problem() is None
    assert second.asked_since == [NOW - LOOKBACK_MS] * 2 and [tp.offset for tp in second.assigned] == [7, 7]
