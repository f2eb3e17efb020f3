"""Alert messages taken back from Webex: those of a forgotten subject at once, the rest after their retention.

An alert's Webex message carries the checkout snapshot (a shopper's face) and its case card links to the two
images; the image store deletes its copies on ``forget`` of the subject and after
``CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS``, but the room kept them for ever. The alert sender's ledger keeps
the id of every message an erasable channel posted (the alert message and its card) with the alert's subject,
transaction and time (:meth:`sinks.alerts.sender.Ledger.mark_sent`), in every room it went to (each room is a
channel of its own: ``webex``, ``webex:<room id>``); this eraser, a thread of the sender:

- reads the ``audit`` topic (its own consumer group) and records each ``FORGET`` and ``EXPIRE`` of an entry
  the watchlist service made (the subject and the transaction its entry was enrolled from), before
  committing;
- deletes every message whose alert names a forgotten subject, or shows the sale that subject was enrolled
  from, and was made before the forget or up to ``FORGET_GRACE_MS`` after it (wall clocks; an alert whose send
  was under way when the forget came is deleted once posted; one still queued, or re-driven, is not sent at all:
  the sender's channels withhold it, ``ChannelWorker._withhold``, and a copy an earlier try without an answer
  posted is recorded and deleted at once: the channel wakes the eraser, :meth:`Eraser.wake`);
  and every message posted more than ``CG_ALERTS__WEBEX_KEEP_DAYS`` ago;
- writes one ``ERASE`` audit event per sweep that deleted or was refused something (counts and subjects).

A message Webex no longer has counts as deleted; one Webex refuses for good (403: no longer the bot's to
delete) is given up, counted as refused in the audit; while Webex is down or refuses the token, the sweep stops
and goes on a minute later, even while a forget is fresh (a new forget or wake sweeps sooner only after a refused
token, not while Webex is down). The deletes share the bot's rate limit with its sends (``RateLimit`` of
sinks/alerts/sender.py): a 429 here pauses every room's channel, and while a 429 of any of them pauses the bot the
sweep stops and goes on when the pause ends. Messages posted before the ledger kept their ids (before this
eraser) are not known to it. E-mail cannot be taken back: a forgotten subject's alert mails stay in the
mailboxes (README, "Faces").
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer

from infra import metrics
from infra.clients import kafka as kafka_clients
from infra.settings import Settings
from schemas.codec import codec
from schemas.errors import CheckoutGuardError
from schemas.indices import FORGETTING_ACTIONS
from schemas.records import WATCHLIST_SERVICE_ACTOR, AuditEvent
from schemas.topics import AUDIT

log = logging.getLogger(__name__)

STAGE = ACTOR = "alert-sender"
SWEEP_INTERVAL_S = 3600.0
"""How often the retention sweep runs when no forget comes (a forget sweeps at once)."""
FORGET_GRACE_MS = 300_000
"""A forget also takes the alerts made up to this long after it (wall clocks), unless the subject is enrolled
again sooner: the job may score a match of the subject before it has read the tombstone, and the clocks of two
hosts differ a little."""
FORGETS_KEPT_DAYS = 30
"""How long a forget is remembered, for alerts of its subject that are posted late (a sender down for days)."""
FAILED_TURN_PAUSE_S = 30.0
STOPPED_SWEEP_RETRY_S = 60.0
"""When a sweep that Webex stopped (down, a refused token; a 429 asks its own wait) goes on; and how often the
eraser sweeps while a forget is fresh (its subject's alerts may still be posted)."""
AUDIT_ERROR_FRESH_S = 120.0
"""How long an error event of the audit consumer shows on the sender's health without a record read since
(librdkafka repeats them while the brokers stay away)."""
MAX_SUBJECTS_NAMED = 20
"""Subjects named in one ``ERASE`` audit event; the count covers the rest."""


class LedgerClosed(CheckoutGuardError):
    """A write to the ledger after :meth:`sinks.alerts.sender.Ledger.close` (a send or a sweep that ended after the
    shutdown's wait): not recorded. Here, below the ledger, so that the eraser can tell it from a failing disk."""


Forget = tuple[str, str | None, str | None, int]
"""``(audit id, subject, source transaction, forgotten at ms)``."""


def forget_of(event: Mapping[str, Any]) -> Forget | None:
    """The forget an audit event records, if it is one: a ``FORGET``, or the watchlist service's ``EXPIRE`` of
    an entry (not the case service's of a case nobody decided), that did not fail (an ``UNCHANGED`` forget knew
    nothing of the subject, but the room may still have its alerts)."""
    action = event.get("action")
    if action == "EXPIRE" and event.get("actor") != WATCHLIST_SERVICE_ACTOR:
        return None
    if action not in FORGETTING_ACTIONS or event.get("outcome") == "FAILED":
        return None
    subject, tx = event.get("subject_id"), event.get("transaction_id")
    if not subject and not tx:
        return None
    return str(event["audit_id"]), subject, tx, int(event["event_time"])


@dataclass
class Sweep:
    """What one sweep did."""

    deleted: int = 0
    gone: int = 0
    refused: int = 0
    forgotten: int = 0
    aged: int = 0
    subjects: set[str] = field(default_factory=set)
    stopped: str | None = None
    """Why it stopped early (Webex down or rate limiting): the rest is tried at the next sweep."""
    retry_after: float | None = None
    """Seconds the bot's rate limit asked to be left alone, when that stopped it: the next sweep waits that long."""
    down: bool = False
    """Webex was down when it stopped (no answer, 5xx): a new forget or wake does not try it again sooner."""

    @property
    def done(self) -> int:
        return self.deleted + self.gone + self.refused

    def audit(self, now_ms: int) -> AuditEvent:
        named = sorted(self.subjects)
        return AuditEvent(
            audit_id=f"erase:{now_ms}",
            event_time=now_ms,
            action="ERASE",
            outcome="FAILED" if self.refused else "DONE",
            actor=ACTOR,
            reason="alert messages of forgotten subjects and past their retention deleted from Webex",
            details={
                "webex_messages_deleted": str(self.deleted),
                "already_gone": str(self.gone),
                "refused": str(self.refused),
                "of_forgotten_subjects": str(self.forgotten),
                "past_retention": str(self.aged),
                "subjects": ",".join(named[:MAX_SUBJECTS_NAMED]),
                "subjects_count": str(len(named)),
            },
        )


class Eraser:
    """Deletes due posts through their channels; ``run`` is the thread's loop over the ``audit`` topic."""

    def __init__(
        self,
        settings: Settings,
        ledger: Any,
        channels: Mapping[str, Any],
        group_id: str,
        *,
        now_ms: Callable[[], int] | None = None,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
        on_events: Callable[[list[dict[str, Any]]], object] | None = None,
    ) -> None:
        self.settings, self.ledger, self.channels, self.group_id = settings, ledger, dict(channels), group_id
        self.on_events = on_events
        """Also given every audit event fetched, before their offsets are committed (the refusal replies of
        sinks/alerts/notices.py record theirs): one that raises keeps the batch uncommitted, read again."""
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.monotonic = monotonic
        """The clock the sweeps are paced by (a test's fake one runs an outage's minutes at once)."""
        self.sweep_interval_s = sweep_interval_s
        keep_days = settings.alerts.webex_keep_days
        if keep_days is None:
            keep_days = settings.faces.alert_snapshot_retention_days
        self.keep_ms: int | None = int(keep_days * 86_400_000) if keep_days > 0 else None
        self._codec = codec("AuditEvent")
        self.audit_topic = AUDIT.full_name(settings.kafka.topic_prefix)
        self._fresh_ms = FORGET_GRACE_MS + int(settings.alerts.deadline_s * 1000)
        """How long after a forget its alerts may still be posted: made within the grace, then queued up to the
        alerts' deadline. Until then the eraser sweeps every minute, not hourly."""
        latest = ledger.latest_forget_ms()
        self._fresh_until = latest + self._fresh_ms if latest is not None else 0
        self._turn_problem: str | None = None
        self._sweep_problem: str | None = None
        self._audit_error: tuple[float, str] | None = None
        """When the audit consumer last reported an error (brokers away through its ``error_cb``, the topic missing
        as an event) and which, until a record comes: neither raises, so the turn itself goes through."""
        self._rate_limited_until = 0.0
        """No sweep before this (monotonic): a delete met the bot's rate limit (its own 429 or another call's)."""
        self._stopped_until = 0.0
        """No sweep before this (monotonic): Webex stopped the last one (:data:`STOPPED_SWEEP_RETRY_S`). While a
        forget is fresh the eraser sweeps every minute, and the stopped sweep's retry counted from its own start
        fell due at once: the sweep went on every second against a Webex that was down."""
        self._stopped_by_outage = False
        """Webex was down (not a refused token or a timeout of one delete): a new forget or wake waits too."""
        self._woken = threading.Event()
        """Set by :meth:`wake`: posts fell due outside a forget (a withheld alert's copy found); sweep next turn."""

    @property
    def problem(self) -> str | None:
        """What keeps forgotten subjects' messages in the room now (the sender's ``/healthz`` shows it): the audit
        topic or the ledger failing, or the last sweep stopped by Webex; ``None`` once a turn and a sweep went
        through."""
        audit = None
        if self._audit_error is not None and time.monotonic() - self._audit_error[0] < AUDIT_ERROR_FRESH_S:
            audit = f"audit topic unreadable ({self._audit_error[1]})"
        parts = [p for p in (self._turn_problem, audit, self._sweep_problem) if p]
        return "; ".join(parts) or None

    def wake(self) -> None:
        """Sweep at the next turn (within a second): a sender's channel recorded posts that are due already, the
        copies of a forgotten subject's alert that an earlier try without an answer posted
        (``ChannelWorker._withhold``). Their forget may be long past its fresh minute-by-minute sweeps: they waited
        for the hourly one, face and all."""
        self._woken.set()

    def _channel(self, name: str) -> Any:
        """The channel that deletes a post of channel ``name``: that one (the room's own), else one of its kind. A
        Webex message is deleted by its id with the bot's token, whatever the room: the copies of a room since taken
        out of ``CG_WEBEX__ROOM_STORES`` (or of a former ``CG_WEBEX__ROOM_ID``) still go, not kept for ever."""
        channel = self.channels.get(name)
        if channel is None:
            kind = name.split(":", 1)[0]
            channel = next((c for n, c in sorted(self.channels.items()) if n.split(":", 1)[0] == kind), None)
        return channel

    def sweep(self, stop: threading.Event | None = None) -> Sweep:
        """Delete every due post (see the module); the ledger forgets each one deleted, gone or refused.
        ``stop``: the sender is stopping; the rest waits for the next run (it must not outlive the ledger)."""
        now = self.now_ms()
        result = Sweep()
        finished: list[str] = []
        for message_id, (channel_name, subject) in self.ledger.due_posts(now, self.keep_ms).items():
            if stop is not None and stop.is_set():
                result.stopped = "the sender is stopping"
                break
            channel = self._channel(channel_name)
            if channel is None:  # posted by a kind of channel this sender does not run: left for one that does
                continue
            try:
                existed = channel.delete(message_id)
            except CheckoutGuardError as exc:
                if getattr(exc, "retriable", True):
                    result.stopped = str(getattr(exc, "reason", exc))
                    result.retry_after = getattr(exc, "retry_after", None)
                    result.down = bool(getattr(exc, "down", False))
                    break
                log.warning("%s refused to delete an alert message: %s", channel_name, getattr(exc, "reason", exc))
                result.refused += 1
            else:
                result.deleted += existed
                result.gone += not existed
            finished.append(message_id)
            if subject is None:
                result.aged += 1
            else:
                result.forgotten += 1
                result.subjects.add(subject)
        try:
            self.ledger.drop_posts(finished, forgets_before_ms=now - FORGETS_KEPT_DAYS * 86_400_000)
        except LedgerClosed:  # the sender's shutdown closed it under this sweep: the next start finds them gone
            log.warning(
                "alert eraser: the ledger closed at shutdown before %d deleted messages were recorded; the next start "
                "deletes what is left and counts them as already gone",
                len(finished),
            )
            result.stopped = "the sender is stopping"
        if result.done or result.stopped:
            log.info(
                "erased alert messages: %d deleted, %d already gone, %d refused (%d of forgotten subjects, %d past "
                "their retention)%s",
                result.deleted,
                result.gone,
                result.refused,
                result.forgotten,
                result.aged,
                f"; stopped: {result.stopped}" if result.stopped else "",
            )
        return result

    def on_kafka_error(self, error: KafkaError) -> None:
        """The audit consumer's ``error_cb`` (brokers away come only there: ``consume`` returns nothing then) and
        what it does with an error event it fetches (the topic missing)."""
        self._audit_error = (time.monotonic(), error.name())

    def take(self, messages: list[Message]) -> int:
        """Record the forgets among fetched audit events (durably, before their offsets are committed), and hand every
        event to :attr:`on_events`."""
        forgets: list[Forget] = []
        enrolments: list[tuple[str, int]] = []
        events: list[dict[str, Any]] = []
        for message in messages:
            if not kafka_clients.is_record(message, log, "audit consumer", on_error=self.on_kafka_error):
                continue
            self._audit_error = None
            try:
                event = self._codec.decode(message.value())
            except CheckoutGuardError as exc:  # the watchlist service's own topic: not ours to dead-letter
                log.warning("audit record %d:%d unreadable (%s); skipped", message.partition(), message.offset(), exc)
                continue
            events.append(event)
            if (forget := forget_of(event)) is not None:
                forgets.append(forget)
            elif event.get("action") == "ENROLL" and event.get("outcome") == "DONE" and event.get("subject_id"):
                enrolments.append((str(event["subject_id"]), int(event["event_time"])))
        self.ledger.record_forgets(forgets, enrolments)
        if events and self.on_events is not None:
            self.on_events(events)
        if forgets:
            self._fresh_until = max(self._fresh_until, max(f[3] for f in forgets) + self._fresh_ms)
        return len(forgets)

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: record forgets from ``audit``, sweep after them and every ``sweep_interval_s``. A turn
        that fails (Kafka, the disk) is tried again with a new consumer, which starts from the last commit: a
        batch whose forgets were not recorded is read again, never committed past."""
        consumer: Consumer | None = None
        producer: Producer | None = None
        last_sweep = float("-inf")
        try:
            while not stop.is_set():
                try:
                    if producer is None:
                        producer = kafka_clients.producer(self.settings, kafka_clients.RELIABLE)
                    if consumer is None:
                        consumer = kafka_clients.consumer(
                            self.settings,
                            self.group_id,
                            kafka_clients.READ_COMMITTED,
                            auto_offset_reset="earliest",
                            error_cb=self.on_kafka_error,
                        )
                        consumer.subscribe([self.audit_topic])
                    last_sweep = self._turn(consumer, producer, last_sweep, stop)
                    self._turn_problem = None
                except LedgerClosed:
                    if not stop.is_set():
                        raise  # only the sender's shutdown closes the ledger: anything else is a bug
                    log.info("alert eraser: stopped with the ledger closed; the next start goes on from its ledger")
                    break
                except Exception as exc:  # noqa: BLE001 - Kafka or the disk failing: the alerts go on, tried again
                    log.warning("alert eraser: %s; trying again in %.0fs", exc, FAILED_TURN_PAUSE_S)
                    self._turn_problem = f"alert eraser failing ({type(exc).__name__})"
                    last_sweep = min(last_sweep, self.monotonic() - self.sweep_interval_s)  # sweep at the next turn
                    if consumer is not None:
                        with contextlib.suppress(Exception):
                            consumer.close()
                        consumer = None
                    stop.wait(FAILED_TURN_PAUSE_S)
        finally:
            if producer is not None:
                producer.flush(10)
            if consumer is not None:
                consumer.close()

    def _turn(self, consumer: Consumer, producer: Producer, last_sweep: float, stop: threading.Event) -> float:
        """One fetch of audit events, and a sweep when a forget came or the interval is over; the last sweep's
        start (monotonic)."""
        messages = consumer.consume(num_messages=500, timeout=1.0)
        forgets = self.take(messages) if messages else 0
        if messages:
            consumer.commit(asynchronous=False)  # after the forgets are in the ledger: none is lost
        interval = STOPPED_SWEEP_RETRY_S if self.now_ms() < self._fresh_until else self.sweep_interval_s
        now = self.monotonic()
        if now < self._rate_limited_until:  # the forgets and wakes are kept: swept when it ends
            return last_sweep
        news = bool(forgets) or self._woken.is_set()
        if now < self._stopped_until and (self._stopped_by_outage or not news):  # kept too: swept when it ends
            return last_sweep
        if not news and now - last_sweep < interval:
            return last_sweep
        self._woken.clear()  # before the sweep: a wake during it sweeps again
        started = self.monotonic()
        result = self.sweep(stop)
        if not stop.is_set():
            self._sweep_problem = f"Webex deletes held up ({result.stopped})" if result.stopped else None
        if result.done:
            metrics.RECORDS_OUT.labels(STAGE, "erased_message").inc(result.done)
            self._publish(producer, result.audit(self.now_ms()))
        self._stopped_until = 0.0
        if result.retry_after is not None:  # the bot's rate limit: not one delete before it ends, then at once
            self._rate_limited_until = started + result.retry_after
            return started - self.sweep_interval_s + result.retry_after
        if result.stopped:  # Webex down: the rest soon, not at the next hourly sweep, nor at every turn
            self._stopped_until, self._stopped_by_outage = started + STOPPED_SWEEP_RETRY_S, result.down
            return started - self.sweep_interval_s + STOPPED_SWEEP_RETRY_S
        return started

    def _publish(self, producer: Producer, event: AuditEvent) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.warning("erase audit %s not delivered: %s", event.audit_id, err.str())

        kafka_clients.produce(producer, self.audit_topic, event.audit_id.encode(), event.encode(), on_delivery)
        producer.flush(10)
