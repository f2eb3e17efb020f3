"""The case service: every alert becomes a case a person decides; the verdicts teach the watchlist and the model.

Inputs (one consumer group): ``alerts`` (each alert opens one case, a redelivered alert none), ``commands``
(the case verbs ``CONFIRM``, ``DISMISS``, ``ESCALATE``, ``ASSIGN``, ``NOTE``; other verbs are not ours) and
``watchlist`` (each subject's enrolled reference image, shown beside the live snapshot; a tombstone, a forget,
strips the image refs from the subject's cases). Outputs, all in
one Kafka transaction per input: every case version on the compacted ``cases`` topic (the OpenSearch sink
indexes it, one document per case), an ``AuditEvent`` per verdict or refused command on ``audit``, and the
verdicts' effects:

- a confirmed face match (:data:`~schemas.records.FACE_ALERT_KINDS`: ``WATCHLIST_MATCH``, the entrance and
  lane kinds) sends the watchlist service a signed ``LEARN <subject> <snapshot ref>``: the sighting becomes
  another template of the subject, up to ``CG_CASES__MAX_TEMPLATES``;
- a dismissed face match counts against its subject (``subject_false_matches`` on the case and its audit
  event); every ``CG_CASES__FLAG_DISMISSALS``-th dismissal flags the subject for review (``FLAG_SUBJECT``);
- a confirmed or dismissed ``BLOCKED_TRANSACTION``, or ``confirm <case> fraud``, publishes a label for the
  transaction to ``labels`` (source ``case``); a face-match confirmation publishes none unless asked. Fraud wins
  between the cases of one sale: a dismissal labels nothing over another case's confirmed fraud (the topic keeps
  the last label per transaction), and a fraud label published after another case's legitimate one replaces it.

A case opens at its alert's time, so one read late (the service was down, or lost its offsets and read the
alerts topic's 30 days again) is as old as its alert, and one older than the expiry opens expired. Cases that
nobody decides expire ``CG_CASES__EXPIRE_AFTER_S`` after they opened (checked every
``CG_CASES__EXPIRY_INTERVAL_S``); a confirm or dismiss that reached Kafka before that still decides a case
expired before it was read (the check runs first at start, before the backlog). Commands apply only when
signed by the bot, fresh and from an allow-listed issuer (:func:`infra.command_auth.authenticate_command`, as
the watchlist service checks them); anything else
is audited ``FAILED`` under its offset and dead-lettered (``unauthorized``), as is an undecodable input or a
command the case refuses (``illegal_transition``, ``unknown_case``, ``bad_command``); the audit event of a refused
verdict the bot signed names the Webex room and person it came from, and the alert sender tells them it did not count
(sinks/alerts/notices.py: the bot had answered "Sent"); the verdict a case has
already, again from the person who gave it (a double press), is audited ``UNCHANGED`` and changes nothing. The
consumer offset is committed after the outputs' transaction; state (cases, dismissals per subject, commands
already applied, forgotten subjects, reference images) is rebuilt at start from ``cases``, ``audit`` and
``watchlist``, so a replay repeats nothing and shows no forgotten face again.

Metrics (``infra.metrics``, stage ``case-service``): inputs by kind (``alert``, a verb, ``watchlist``,
``invalid``), records out by topic once committed, dead letters by kind, ``cg_processing_seconds`` per input (the
handler alone), ``cg_input_wait_seconds`` per alert and command (its record's time to its outcome committed);
``/healthz`` as the watchlist service's.

Run: ``python -m jobs.cases.service`` (SIGTERM stops after the current record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from infra import clock, metrics
from infra.clients import transactional
from infra.clients.transactional import Out, Source
from infra.command_auth import (
    SIGNATURE_HEADER,
    authenticate_command,
    claimed_details,
    sign_command,
    signed_by_bot,
)
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import StopRequest, exit_deadline, stop_on_signals
from infra.settings import Settings, get_settings
from jobs.cases.core import (
    DISMISSED,
    EXPIRED,
    FRAUD_KINDS,
    CaseBook,
    Refused,
    parse_case_command,
    repeats,
    without_images,
)
from jobs.cases.core import expire as expire_case
from jobs.scoring.validation import check_event_time, check_size
from schemas.codec import DecodeError
from schemas.errors import InvalidRecord
from schemas.forgets import Forgets
from schemas.identifiers import ALERT_ID_RE, TEXT_MAX, check, check_image_ref, check_name
from schemas.indices import enrolment_transaction
from schemas.records import (
    CASE_VERBS,
    FACE_ALERT_KINDS,
    FRAUD,
    LEGITIMATE,
    Alert,
    AuditEvent,
    BotCommand,
    Case,
    WatchlistEntry,
    case_text,
    check_alert_numbers,
    dead_letter,
    dead_letter_headers,
    make_label,
    webex_reply_details,
)
from schemas.topics import (
    ALERTS,
    AUDIT,
    CASES,
    COMMANDS,
    COMPACTION_MARKER,
    DEAD_LETTERS,
    LABELS,
    WATCHLIST,
    TopicSpec,
    marker_due,
)

log = logging.getLogger("jobs.cases.service")

BATCH = 500
"""Inputs decided per Kafka transaction at most: one transaction per input held the service to ~70 cases/s
(``python -m tests.bench.alerts cases``); the outputs of a batch are still all or none, then its offsets."""
STAGE = "case_service"
PROCESS = "case-service"
DAY_MS = 86_400_000
PRUNE_AT = 10_000
"""Audit ids held before old ones are dropped (pruning walks them all, so not at every sweep)."""
"""The ``stage`` label of this process's metrics (its name in ``infra.metrics.PROCESSES``)."""
SERVICE_ACTOR = "case-service"
UNVERIFIED_ACTOR = "unverified"


class CaseCore:
    """Decisions per input; returns the records to publish (no Kafka here)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.book = CaseBook()
        self.references: dict[str, str] = {}
        """Subject id -> its enrolled reference image ref (from the watchlist topic)."""
        self.enrolment_sales: dict[str, str] = {}
        """Subject id -> the sale its buyer was enrolled from (the entry's ``source_transaction_id``)."""
        self.forgets = Forgets()
        """Subjects whose entry was removed (a forget or an expiry), with when, their enrolment sales, and their
        enrolments again after it: an alert the forget reaches, read only after it (the service was behind, or
        restarted), opens its case without image refs. Read from ``audit`` at start (the tombstone is compacted
        away a day after the forget), then kept up from the ``watchlist`` tombstones and entries."""
        self.done: dict[str, int] = {}
        """Audit ids already published, with their time: a command replayed after an offset reset is skipped.
        Only ids newer than the retention horizon are kept (older inputs are skipped anyway)."""
        self.marked_at = 0
        """When this service last appended the compaction marker (:func:`schemas.topics.marker_due`)."""
        self.settled: list[tuple[str, int]] = []
        """``(kind, record time ms)`` of each input (``alert``, ``command``) whose outcome the outputs since the last
        :meth:`take_settled` carry: how long it waited is known once they are committed (``cg_input_wait_seconds``).
        A verdict held for its alert settles when it is applied or refused, not when it is read."""
        self.waiting: dict[str, list[tuple[Source, int]]] = {}
        """Verified commands for a case whose alert has not been read yet (alerts and commands are separate
        topics, read in no fixed order), with when they arrived: applied when the case opens, refused
        ``unknown_case`` once older than ``webex.command_max_age_s``. Their offsets are not committed while
        they wait (:meth:`oldest_waiting`), so a restart reads them again (and waits anew); the commands after
        them, read again too, are skipped by their audit ids."""

    # --- state -------------------------------------------------------------------------------------
    def load_case(self, key: bytes | None, value: bytes | None) -> None:
        """A record of ``cases`` (the start-up read): one that does not decode is logged and skipped, since an
        exception stops that read and with it every start of the service."""
        if value is not None:
            try:
                case = Case.decode(value)
            except (InvalidRecord, TypeError, ValueError) as exc:
                _undecodable_state(CASES, key, exc)
                return
            self.book.load(case)
        elif key is not None:  # a case removed by retention, not yet compacted away
            self.book.forget(key.decode("utf-8", "replace"))

    def load_watchlist(self, key: bytes | None, value: bytes | None) -> None:
        """A record of ``watchlist`` (at start and while running): one that does not decode is logged and skipped."""
        if key is None:
            return
        if value is None:
            self.references.pop(key.decode("utf-8", "replace"), None)
            self.enrolment_sales.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            entry = WatchlistEntry.decode(value)
        except (InvalidRecord, TypeError, ValueError) as exc:
            _undecodable_state(WATCHLIST, key, exc)
            return
        if entry.source_transaction_id:
            self.enrolment_sales[entry.subject_id] = entry.source_transaction_id
        if entry.reference_image_ref:
            self.references[entry.subject_id] = entry.reference_image_ref
        else:
            self.references.pop(entry.subject_id, None)

    def load_audit(self, key: bytes | None, value: bytes | None = None) -> None:
        """Remember this service's own audit ids (all ``case``-prefixed; the others' are not ours to skip), and the
        watchlist service's forgets and enrolments (:class:`~schemas.forgets.Forgets`): before, a subject forgotten
        before a restart was forgotten no more, and its alerts read after the restart opened with its images."""
        if self.forgets.read(value):
            return
        if key is not None and value is not None and key.startswith(b"case"):
            with contextlib.suppress(DecodeError):
                self.done[key.decode()] = AuditEvent.decode(value).event_time

    def _settle(self, kind: str, src: Source, outs: list[Out]) -> list[Out]:
        """``outs``, the outcome of ``src``: noted in :attr:`settled` when there is one (a redelivery, a held verdict
        has none)."""
        if outs and src.written_at is not None:
            self.settled.append((kind, src.written_at))
        return outs

    def take_settled(self) -> list[tuple[str, int]]:
        """:attr:`settled`, emptied: the service times them once their outputs are committed."""
        settled, self.settled = self.settled, []
        return settled

    def horizon(self, now_ms: int) -> int:
        """Inputs written before this (ms) are past retention: their decided cases are removed, so an alert
        or a command re-read from that far back (a consumer-offset reset) is skipped, not acted on again."""
        return now_ms - int(self.settings.cases.retain_decided_days * DAY_MS)

    @staticmethod
    def _displayable(alert: Alert) -> Alert:
        """``alert`` with what its case copies onto its index, page and a LEARN command in a shape they take: its
        category a label (no control characters or direction overrides, at most 128 characters: ``check_text``'s), its
        snapshot ref one the image store writes (:func:`~schemas.identifiers.check_image_ref`), else none (a WARNING
        names the alert and the ref's length, never the ref). Both were copied as they came (200 000 characters, a
        terminal escape); refusing the alert instead would leave a watch-list hit or a block without its case."""
        category, ref = alert.category, alert.snapshot_ref
        if category is not None:
            category = " ".join((case_text(category) or "").split())[:TEXT_MAX] or None
        if ref is not None:
            try:
                check_image_ref(ref, "snapshot_ref")
            except InvalidRecord:
                log.warning(
                    "alert %s: its snapshot_ref (%d characters) is no image ref: its case opens without it",
                    alert.alert_id,
                    len(ref),
                )
                ref = None
        if (category, ref) == (alert.category, alert.snapshot_ref):
            return alert
        return dataclasses.replace(alert, category=category, snapshot_ref=ref)

    def past_horizon(self, src: Source, now_ms: int) -> bool:
        if src.written_at is None or src.written_at >= self.horizon(now_ms):
            return False
        metrics.RECORDS_IN.labels(PROCESS, "past_retention").inc()
        return True

    # --- inputs ------------------------------------------------------------------------------------
    def on_watchlist(self, src: Source, now_ms: int) -> list[Out]:
        """An entry (its reference image), or a tombstone: the subject was forgotten (``forget``, or its entry
        expired), its images deleted. Its cases, and those of the sale its buyer was enrolled from, lose their image
        refs in a new version, so the ``cases`` topic stops carrying them and a later confirm asks for no ``LEARN``
        of a deleted sighting."""
        metrics.RECORDS_IN.labels(PROCESS, "watchlist").inc()
        forgotten = src.key is not None and src.value is None and src.key != COMPACTION_MARKER
        subject = src.key.decode() if forgotten and src.key is not None else ""
        sale = enrolment_transaction(subject, self.enrolment_sales.get(subject)) if forgotten else None
        with contextlib.suppress(DecodeError):  # the watchlist service's output: nothing to dead-letter here
            self.load_watchlist(src.key, src.value)
        at = src.written_at if src.written_at is not None else now_ms
        if not forgotten:
            name = src.key.decode() if src.key is not None and src.value is not None else ""
            if name in self.forgets.forgotten_at:  # an entry after its forget: enrolled again, a new entry
                self.forgets.enrol(name, at)
            return []
        self.forgets.forget(subject, sale, at)
        stripped = self.book.forget_images(subject, sale, at, now_ms, SERVICE_ACTOR)
        for case in stripped:
            log.info("%s: image refs removed (its subject or enrolment sale was forgotten)", case.case_id)
        return [self._case(case) for case in stripped]

    def forget_held(self, now_ms: int) -> list[Out]:
        """After the start-up reads: strip the image refs of every held case a forget read back from ``audit``
        reaches (:meth:`on_watchlist` does it for a tombstone read while running). A forget made while the service
        was down, whose tombstone was compacted away or lay before the group's offsets, left those cases with the
        refs, written again with every later version, and a confirm asked the watchlist service to learn from a
        deleted sighting."""
        outs = []
        for case in list(self.book.cases.values()):
            if not self.forgets.reaches(case.subject_id, case.transaction_id, case.opened_at):
                continue
            new = without_images(case, SERVICE_ACTOR, now_ms)
            if new is not None:
                self.book.load(new)
                log.info("%s: image refs removed (its subject or enrolment sale was forgotten)", case.case_id)
                outs.append(self._case(new))
        return outs

    def on_alert(self, src: Source, now_ms: int) -> list[Out]:
        try:
            # its case carries its fields and more: one past Kafka's producer limit failed every publish, and the
            # service, restarted, read the same alert again (the job's and face stage's limit keeps it well below)
            check_size(src.value, self.settings.job.max_message_bytes)
            alert = Alert.decode(src.value or b"")
            # the case's own id is made from it: an empty one (a record of zeros) or one the alert sender refuses (a
            # header injection, over 512) would open a case that no card links to, every empty one the same case
            check(alert.alert_id, "alert_id", ALERT_ID_RE)
            # its case opens at the earlier of its time and now: at the far end of a long the sink indexes no case
            check_event_time(alert.event_time, 0, self.settings.job.max_future_skew_ms)  # 0: a time ahead opens now
            # ids a verdict writes into a label or a LEARN command: one that is not an id would fail there, after
            # the verdict, and stop the service at every restart (the command read again); refused here instead
            for value, field in ((alert.transaction_id, "transaction_id"), (alert.subject_id, "subject_id")):
                if value is not None:
                    check(value, field)
            # what the case is filed under, in the shape the scoring job takes store names (``kind`` is the schema's
            # enum already): cut, a store id would file the case under another store
            check_name(alert.store_id, "store_id")
            # a number the alert sender refuses to show (a NaN similarity, an infinite amount) is refused here too:
            # copied, the case page and the cases index showed it, for an alert no channel sent
            check_alert_numbers(alert.to_avro())
        except InvalidRecord as exc:  # oversized, undecodable, an id that is not one, a number out of range
            metrics.RECORDS_IN.labels(PROCESS, "invalid").inc()
            return self._settle("alert", src, [self._dead_letter(src, exc, now_ms)])
        if self.past_horizon(src, now_ms):
            return []
        metrics.RECORDS_IN.labels(PROCESS, "alert").inc()
        alert = self._displayable(alert)
        reference = self.references.get(alert.subject_id or "") if alert.kind in FACE_ALERT_KINDS else None
        if self.forgets.reaches(alert.subject_id, alert.transaction_id, alert.event_time):  # images went with it
            alert, reference = dataclasses.replace(alert, snapshot_ref=None), None
        expire_ms = int(self.settings.cases.expire_after_s * 1000)
        case = self.book.open(alert, now_ms, expire_ms, reference)
        if case is None:
            return []  # this alert has its case already
        log.info("opened %s for alert %s (%s, store %s)", case.case_id, alert.alert_id, alert.kind, alert.store_id)
        outs = [self._case(case)]
        expired = expire_case(case, now_ms)
        if expired is not None:  # an alert older than the expiry (read late): its case opens expired, not fresh
            self.book.load(expired)
            log.info("expired %s at once: its alert is older than the expiry", case.case_id)
            outs.append(self._case(expired))
            outs.append(self._service_audit(expired, "EXPIRE", "the alert was older than the expiry when read", now_ms))
        self._settle("alert", src, outs)
        for waiting, _since in self.waiting.pop(case.case_id, []):
            outs += self._taken_up(waiting, now_ms)
        return outs

    def on_command(self, src: Source, now_ms: int) -> list[Out]:
        """A command read from ``commands``: counted, then applied, refused or held (:meth:`_command`)."""
        try:
            cmd = BotCommand.decode(src.value or b"")
        except DecodeError as exc:
            metrics.RECORDS_IN.labels(PROCESS, "invalid").inc()
            return self._settle("command", src, self._undecodable(src, exc, now_ms))
        if cmd.verb not in CASE_VERBS:
            return []  # the watchlist service's or the bot's business
        if self.past_horizon(src, now_ms):
            return []
        metrics.RECORDS_IN.labels(PROCESS, cmd.verb.lower()).inc()
        return self._command(src, cmd, now_ms)

    def _taken_up(self, src: Source, now_ms: int, *, wait: bool = True) -> list[Out]:
        """A held command taken up (its case opened, or it is too old to wait): applied or refused, not counted again.
        Before, it went through :meth:`on_command` once more, and one verdict showed as two commands."""
        return self._command(src, BotCommand.decode(src.value or b""), now_ms, wait=wait)

    def _command(self, src: Source, cmd: BotCommand, now_ms: int, *, wait: bool = True) -> list[Out]:
        """A case command: applied, refused, or (``wait``, a verified command for a case not opened yet) held; settled
        (:meth:`_settle`) unless held or done already."""
        return self._settle("command", src, self._decide(src, cmd, now_ms, wait=wait))

    def _decide(self, src: Source, cmd: BotCommand, now_ms: int, *, wait: bool = True) -> list[Out]:
        audit_id = f"case:{cmd.command_id}"
        if audit_id in self.done:
            return []
        try:
            authenticate_command(cmd, src.headers, self.settings.webex, src.written_at or now_ms)
        except InvalidRecord as refused:
            return self._refuse(src, cmd, refused, now_ms)
        audit: dict[str, Any] = {
            "audit_id": audit_id,
            "event_time": now_ms,
            "action": cmd.verb,
            "actor": cmd.actor,
            "command_id": cmd.command_id,
        }
        try:
            command = parse_case_command(cmd.verb, cmd.argument)
        except InvalidRecord as refused:  # bad_command, or an invalid case id (never copied into the audit)
            return self._failed(src, cmd, audit, refused, now_ms)
        held = self.book.cases.get(command.case_id)
        if held is not None:
            audit.update(subject_id=held.subject_id, category=held.category, transaction_id=held.transaction_id)
        audit["details"] = {"case_id": command.case_id}
        if wait and command.case_id not in self.book.cases:
            log.info("command %s waits for the alert of %s", cmd.command_id, command.case_id)
            self.waiting.setdefault(command.case_id, []).append((src, now_ms))
            return []
        if held is not None and repeats(held, command.verb, command.fraud, cmd.actor):  # a double press
            log.info("%s %s by command %s: already so, unchanged", cmd.verb, held.case_id, cmd.command_id)
            reason = f"{held.case_id} is already {held.verdict} by {cmd.actor}: nothing to change"
            return [self._audit(**audit, outcome="UNCHANGED", reason=reason)]
        try:  # judged by when it reached Kafka: a verdict given before the expiry counts, read however late
            case = self.book.apply(
                command, cmd.actor, now_ms, given_at=src.written_at, unlisted=self.settings.webex.unlisted_owner
            )
        except Refused as refused:
            return [
                *self._noted(command.case_id, cmd, refused, now_ms),
                *self._failed(src, cmd, audit, refused, now_ms),
            ]
        log.info("%s %s by command %s: now %s (v%d)", cmd.verb, case.case_id, cmd.command_id, case.state, case.version)
        late = held is not None and held.state == EXPIRED and cmd.verb in ("CONFIRM", "DISMISS")
        if late:
            log.info("%s: a verdict given before it expired, read after, replaces the expiry", case.case_id)
        return [self._case(case), *self._effects(case, cmd, audit, now_ms, replaced_expiry=late)]

    def _noted(self, case_id: str, cmd: BotCommand, refused: Refused, now_ms: int) -> list[Out]:
        """The case changed since the verdict was sent (decided by someone else, expired): its new version with a
        note saying so, where the person looks. Not for a bad command: the bot and the page refuse that at once."""
        if refused.kind != "illegal_transition":
            return []
        noted = self.book.refused(case_id, cmd.verb, cmd.actor, refused.reason, now_ms)
        return [self._case(noted)] if noted is not None else []

    def _failed(
        self, src: Source, cmd: BotCommand, audit: dict[str, Any], refused: InvalidRecord, now_ms: int
    ) -> list[Out]:
        """A signed command the case refuses: audited ``FAILED`` with the reason, and the room and person of one given
        in Webex (:func:`~schemas.records.webex_reply_details`: the alert sender tells them), and dead-lettered."""
        log.info("command %s %s refused: %s", cmd.command_id, cmd.verb, refused.reason)
        details = {**audit.get("details", {}), **webex_reply_details(cmd)}
        return [
            self._audit(**{**audit, "details": details}, outcome="FAILED", reason=f"{refused.kind}: {refused.reason}"),
            self._dead_letter(src, refused, now_ms),
        ]

    def oldest_waiting(self, topic: str, partition: int) -> int | None:
        """The offset of the oldest command still waiting on ``topic``/``partition`` (the commit stops there)."""
        offsets = [
            src.offset
            for held in self.waiting.values()
            for src, _ in held
            if (src.topic, src.partition) == (topic, partition)
        ]
        return min(offsets, default=None)

    def expire(self, now_ms: int) -> list[Out]:
        """Every undecided case past its time, expired and audited; every command that waited longer than a
        command may be old for a case that never opened, refused ``unknown_case``."""
        outs: list[Out] = []
        max_wait_ms = self.settings.webex.command_max_age_s * 1000
        for case_id, held in list(self.waiting.items()):
            stale = [src for src, since in held if now_ms - since > max_wait_ms]
            if stale:
                self.waiting[case_id] = [(src, since) for src, since in held if now_ms - since <= max_wait_ms]
                if not self.waiting[case_id]:
                    del self.waiting[case_id]
                for src in stale:
                    outs += self._taken_up(src, now_ms, wait=False)
        for case in self.book.due(now_ms):
            log.info("expired %s (nobody decided within the expiry)", case.case_id)
            outs.append(self._case(case))
            outs.append(self._service_audit(case, "EXPIRE", "no verdict before the case expired", now_ms))
        if marker_due(CASES, self.marked_at, now_ms):  # a retired case is compacted away only then
            self.marked_at = now_ms
            outs.append(Out(CASES, COMPACTION_MARKER, None))
        return outs + self.retire(now_ms)

    def retire(self, now_ms: int) -> list[Out]:
        """Decided cases past ``CG_CASES__RETAIN_DECIDED_DAYS``: a tombstone on ``cases`` (compaction drops the
        record, the OpenSearch sink deletes the document, and with it the case's image refs) and an audit
        event; their dismissals stop counting against the subject. Audit ids older than the horizon are
        forgotten (inputs that old are skipped)."""
        horizon = self.horizon(now_ms)
        outs: list[Out] = []
        for case in self.book.past_retention(horizon):
            self.book.forget(case.case_id)
            log.info("removed %s (%s, decided over the retention period ago)", case.case_id, case.state)
            outs.append(Out(CASES, case.case_id.encode(), None))
            outs.append(self._service_audit(case, "RETIRE", "decided case past its retention period", now_ms))
        self.forgets.prune(horizon)  # alerts from before then are skipped
        keep_from = horizon - int(self.settings.webex.command_max_age_s * 1000)
        if len(self.done) > PRUNE_AT and any(at < keep_from for at in self.done.values()):
            self.done = {audit_id: at for audit_id, at in self.done.items() if at >= keep_from}
        return outs

    # --- verdicts ----------------------------------------------------------------------------------
    def _effects(
        self, case: Case, cmd: BotCommand, audit: dict[str, Any], now_ms: int, replaced_expiry: bool = False
    ) -> list[Out]:
        details = self._case_details(case)
        if replaced_expiry:  # the trail shows EXPIRE, then this verdict given before it
            details["replaced_expiry"] = "true"
        outs: list[Out] = []
        face = case.kind in FACE_ALERT_KINDS and case.subject_id is not None
        if cmd.verb == "CONFIRM" and face and case.snapshot_ref:
            outs.append(self._learn(case, cmd, now_ms))
            details["template_requested"] = "true"
        if cmd.verb == "DISMISS" and face:
            details["subject_false_matches"] = str(case.subject_false_matches)
            every = max(1, self.settings.cases.flag_dismissals)
            if case.subject_false_matches % every == 0:  # flagged at N dismissals, and again at 2N, 3N...
                outs.append(self._flag(case, now_ms))
        verdict = cmd.verb in ("CONFIRM", "DISMISS")
        if verdict and case.transaction_id and case.kind in FRAUD_KINDS and case.state == DISMISSED:
            fraud_cases = self.book.labelled(case, FRAUD)
            if fraud_cases and case.fraud_label is None:  # the sale stays fraud: no legitimate label over it
                log.warning(
                    "%s dismissed: no legitimate label, %s confirmed the sale as fraud", case.case_id, fraud_cases[0]
                )
                details["label_withheld"] = f"{LEGITIMATE}: {fraud_cases[0]} confirmed {case.transaction_id} as fraud"
        if case.fraud_label == FRAUD and case.transaction_id and verdict:
            legitimate = self.book.labelled(case, LEGITIMATE)
            if legitimate:  # published after theirs, so it is the verdict in force, whichever came first
                log.warning("%s: fraud label replaces the legitimate one of %s", case.case_id, ", ".join(legitimate))
                details["label_replaces"] = ", ".join(legitimate)
        if case.fraud_label is not None and case.transaction_id and verdict:
            label = make_label(
                transaction_id=case.transaction_id,
                label=case.fraud_label,
                source="case",
                decided_at=now_ms,
                decided_by=cmd.actor,
                reason=case.verdict_reason or case.verdict,
                case_id=case.case_id,
            )
            outs.append(Out(LABELS, label.transaction_id.encode(), label.encode()))
            details["label"] = str(case.fraud_label)
        reason = case.verdict_reason or case.verdict or f"{cmd.verb.lower()} {case.case_id}"
        audit["details"] = details
        return [self._audit(**audit, outcome="DONE", reason=reason), *outs]

    def _learn(self, case: Case, cmd: BotCommand, now_ms: int) -> Out:
        """The signed command that asks the watchlist service to add the confirmed sighting as a template.
        Issued in the confirming person's name (the watchlist service checks them against its allow-list)."""
        learn = BotCommand(
            command_id=f"learn:{case.case_id}",
            issued_at=now_ms,
            verb="LEARN",
            actor=cmd.actor,
            argument=f"{case.subject_id} {case.snapshot_ref}",
            room_id=cmd.room_id,
            source=SERVICE_ACTOR,
        )
        key = self.settings.webex.command_signing_key
        headers = ((SIGNATURE_HEADER, sign_command(learn, key.get_secret_value())),) if key else ()
        return Out(COMMANDS, learn.command_id.encode(), learn.encode(), headers)

    def _flag(self, case: Case, now_ms: int) -> Out:
        """The ``FLAG_SUBJECT`` event, under the id of the dismissal that made it: retention lowers the count
        (a retired case's dismissal stops counting), so the same count comes again and cannot name the event."""
        log.warning("subject %s flagged for review: %d dismissed matches", case.subject_id, case.subject_false_matches)
        return self._audit(
            audit_id=f"case-flag:{case.subject_id}:{case.case_id}",
            event_time=now_ms,
            action="FLAG_SUBJECT",
            outcome="DONE",
            actor=SERVICE_ACTOR,
            subject_id=case.subject_id,
            category=case.category,
            reason=f"{case.subject_false_matches} dismissed face matches: review this watchlist entry",
            details={"case_id": case.case_id, "subject_false_matches": str(case.subject_false_matches)},
        )

    def _refuse(self, src: Source, cmd: BotCommand, error: InvalidRecord, now_ms: int) -> list[Out]:
        """An unauthenticated or unauthorised command: audited under its offset (its id is only a claim)."""
        audit_id = f"case-refused:{src.topic}:{src.partition}:{src.offset}"
        if audit_id in self.done:
            return []
        log.warning("command at %s:%d:%d refused: %s", src.topic, src.partition, src.offset, error.reason)
        details = claimed_details(cmd)
        if error.kind == "unauthorized" and signed_by_bot(cmd, src.headers, self.settings.webex):
            # the bot's own verdict, refused for its age or the allow-list: the person read "Sent" and is told
            details.update(webex_reply_details(cmd))
            with contextlib.suppress(InvalidRecord):
                details["case_id"] = parse_case_command(cmd.verb, cmd.argument).case_id
        return [
            self._audit(
                audit_id=audit_id,
                event_time=now_ms,
                action=cmd.verb,
                outcome="FAILED",
                actor=UNVERIFIED_ACTOR,
                reason=f"{error.kind}: {error.reason}",
                details=details,
            ),
            self._dead_letter(src, error, now_ms),
        ]

    def _undecodable(self, src: Source, error: DecodeError, now_ms: int) -> list[Out]:
        """A command that does not decode: audited ``FAILED`` under its offset, and dead-lettered, once. A waiting
        command holds the ``commands`` offset back (:meth:`oldest_waiting`), so a restart reads the commands after
        it again; those applied or refused are skipped by their audit ids, and this one now is too (before, every
        restart during a wait dead-lettered it once more)."""
        audit_id = f"case-invalid:{src.topic}:{src.partition}:{src.offset}"
        if audit_id in self.done:
            return []
        audit = self._audit(
            audit_id=audit_id,
            event_time=now_ms,
            action="INVALID",
            outcome="FAILED",
            actor=UNVERIFIED_ACTOR,
            reason=f"{error.kind}: the command does not decode",
        )
        return [audit, self._dead_letter(src, error, now_ms)]

    # --- records -----------------------------------------------------------------------------------
    @staticmethod
    def _case_details(case: Case) -> dict[str, str]:
        details = {"case_id": case.case_id, "state": case.state, "version": str(case.version), "kind": case.kind}
        if case.owner:
            details["owner"] = case.owner
        return details

    @staticmethod
    def _case(case: Case) -> Out:
        return Out(CASES, case.case_id.encode(), case.encode())

    def _service_audit(self, case: Case, action: str, reason: str, now_ms: int) -> Out:
        """The audit event of something this service did to ``case`` on its own (``case-<action>:<case id>``)."""
        return self._audit(
            audit_id=f"case-{action.lower()}:{case.case_id}",
            event_time=now_ms,
            action=action,
            outcome="DONE",
            actor=SERVICE_ACTOR,
            subject_id=case.subject_id,
            category=case.category,
            transaction_id=case.transaction_id,
            reason=reason,
            details=self._case_details(case),
        )

    def _audit(self, **fields: Any) -> Out:
        event = AuditEvent(**fields)
        self.done[event.audit_id] = event.event_time
        return Out(AUDIT, event.audit_id.encode(), event.encode())

    @staticmethod
    def _dead_letter(src: Source, error: InvalidRecord, now_ms: int) -> Out:
        dl = dead_letter(
            topic=src.topic,
            partition=src.partition,
            offset=src.offset,
            key=src.key,
            value=src.value,
            error=error,
            stage=STAGE,
            failed_at=now_ms,
        )
        # the input's headers (a command's signature) ride along, so a re-driven command is still the bot's
        headers = dead_letter_headers(src.headers)
        return Out(DEAD_LETTERS, dl.dead_letter_id.encode(), dl.encode(), headers, reason=error.kind)


def _undecodable_state(topic: TopicSpec, key: bytes | None, exc: Exception) -> None:
    """Say which record of a state topic was skipped (its key: a case or subject id), never its bytes."""
    kind = exc.kind if isinstance(exc, InvalidRecord) else type(exc).__name__
    name = key.decode("utf-8", "replace")[:128] if key is not None else "-"
    log.warning("%s record %s skipped: it does not decode (%s)", topic.name, name, kind)


class CaseService:
    """Kafka wiring around :class:`CaseCore`: startup replay, consume, one transaction per input, commit."""

    def __init__(self, settings: Settings, core: CaseCore | None = None) -> None:
        from infra.clients import kafka as kafka_clients

        self.settings = settings
        self.prefix = settings.kafka.topic_prefix
        self.group = settings.kafka.group(settings.cases.service_group)
        self.core = core or CaseCore(settings)
        key = settings.webex.command_signing_key
        if not (key and key.get_secret_value()):
            log.error("CG_WEBEX__COMMAND_SIGNING_KEY is not set: every case command is refused")
        self.consumer = kafka_clients.consumer(
            settings, self.group, kafka_clients.READ_COMMITTED, auto_offset_reset="earliest"
        )
        # labels are keyed by transaction and partitioned as every other labels producer does
        self.producer = kafka_clients.producer(
            settings, transactional_id=f"{self.group}-tx", linger_ms=5, partitioner="murmur2_random"
        )
        self.topics: dict[str, Callable[[Source, int], list[Out]]] = {
            WATCHLIST.full_name(self.prefix): self.core.on_watchlist,
            ALERTS.full_name(self.prefix): self.core.on_alert,
            COMMANDS.full_name(self.prefix): self.core.on_command,
        }
        self._stop = StopRequest()
        """Set by SIGTERM/SIGINT (:meth:`stop`), timed at the signal's arrival (``stop_on_signals`` in :func:`main`)."""
        self._next_expiry = 0.0
        self.heartbeat = metrics.Heartbeat()
        self._processing = metrics.PROCESSING_SECONDS.labels(PROCESS)

    def stop(self, *_: object) -> None:
        self._stop.set()

    def _exit_by(self) -> float | None:
        """Once the stop is asked, when its last Kafka calls are given up (a transaction's commit hanging on Kafka
        after the SIGTERM, or the consumer's close, ran past the supervisor's SIGKILL); None before."""
        return self._stop.exit_by(self.settings.supervisor.stop_timeout_s)

    def replay(
        self, spec: TopicSpec, apply: Callable[[bytes | None, bytes | None], None], since_ms: int | None = None
    ) -> None:
        """Read a topic from ``since_ms`` (None: its start) to its end into ``apply(key, value)``: on while records
        keep coming, failing only after ``STARTUP_READ_STALL_S`` without one (``cases`` and ``audit`` grow with the
        deployment's age: a fixed deadline would fail every start once they are long enough), each record beating
        the heartbeat so ``/healthz`` does not call a long read a hung service; so does each metadata call before
        the first record (a topic's partitions, end offsets and start offsets: up to ``STARTUP_READ_STALL_S`` each,
        which before added up past the heartbeat's 60 s when Kafka was slow to answer)."""
        from infra.clients.control_topics import STARTUP_READ_STALL_S, read_control_topics

        def one(_topic: str, key: bytes | None, value: bytes | None) -> None:
            self.heartbeat.beat(None)  # reading is progress
            apply(key, value)

        read_control_topics(
            self.settings,
            one,
            timeout_s=STARTUP_READ_STALL_S,
            specs=(spec,),
            since_ms=since_ms,
            stall_s=STARTUP_READ_STALL_S,
            beat=lambda: self.heartbeat.beat(None),
            stop=self._stop,  # ends the read at its next call once the stop is asked
        )
        self.heartbeat.beat(None)

    def run(self) -> None:
        from confluent_kafka import TopicPartition

        # only the audit ids of inputs this service may still read: those written after the retention horizon
        command_max_age_ms = int(self.settings.webex.command_max_age_s * 1000)
        since_ms = self.core.horizon(clock.now_ms()) - command_max_age_ms
        try:
            # each start-up call ends by the stop's deadline, as the loop's Kafka calls do
            for spec, apply, since in (
                (CASES, self.core.load_case, None),
                (WATCHLIST, self.core.load_watchlist, None),
                (AUDIT, self.core.load_audit, since_ms),
            ):
                read = functools.partial(self.replay, spec, apply, since_ms=since)
                transactional.bounded(read, f"the start-up read of {spec.name}", self._exit_by, "case-service-replay")
            log.info("replayed %d cases, %d reference images", len(self.core.book.cases), len(self.core.references))
            transactional.init_transactions(self.producer, self._exit_by)
            stripped = self.core.forget_held(clock.now_ms())  # forgets made while this service was away
            if stripped:
                self._publish(stripped, [])
            self.consumer.subscribe(list(self.topics))
            while not self._stop.is_set():
                self.heartbeat.beat(None)
                self.producer.poll(0)  # serves the producer's callbacks, an MSK IAM token refresh among them
                self._maybe_expire()
                outs: list[Out] = []
                offsets: dict[tuple[str, int], int] = {}
                for msg in self.consumer.consume(BATCH, 0.5):
                    if (error := msg.error()) is not None:
                        log.warning("consumer error: %s", transactional.error_named(error))  # never its words
                        continue
                    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                    assert topic is not None and partition is not None and offset is not None, "a record has all three"
                    src = transactional.source_of(msg)
                    with metrics.timed(self._processing):
                        outs += self.topics[topic](src, clock.now_ms())
                    offsets[(topic, partition)] = offset + 1
                for (topic, partition), offset in offsets.items():
                    oldest = self.core.oldest_waiting(topic, partition)
                    offsets[(topic, partition)] = offset if oldest is None else min(offset, oldest)
                if offsets:
                    self._publish(outs, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])
        except transactional.STOP_ERRORS as exc:
            if not self._stop.is_set():
                raise
            transactional.given_up_at_stop("case service", exc)
        finally:
            self._close(sys.exc_info()[1])  # the loop's own error, if one ends it, is what is raised

    def _close(self, ended_by: BaseException | None = None) -> None:
        """The consumer's close (it leaves the group), given up at the stop's deadline: with Kafka down it waited on
        the brokers as long as it took, past the supervisor's SIGKILL. No offset is committed by it (the inputs' are
        committed after their transaction), so nothing is lost. Its error once the stop is asked, or
        after the loop's own error (``ended_by``, which is raised instead), is a WARNING."""
        deadline = self._exit_by() or exit_deadline(self.settings.supervisor.stop_timeout_s)
        transactional.close_consumer(
            "case service", self.consumer, deadline, self._stop.is_set, ended_by, "case-service-close"
        )

    def _maybe_expire(self) -> None:
        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + self.settings.cases.expiry_interval_s
        outs = self.core.expire(clock.now_ms())
        if outs:
            self._publish(outs, [])

    def _publish(self, outs: list[Out], offsets: list) -> None:
        """The outputs in one Kafka transaction, then the inputs' offsets (see :mod:`infra.clients.transactional`)."""
        transactional.publish(
            self.producer,
            self.consumer,
            self.prefix,
            PROCESS,
            outs,
            offsets,
            beat=self.heartbeat.beat,
            stopping=self._stop.is_set,
            exit_by=self._exit_by,
        )
        self._time_waits(clock.now_ms())

    def _time_waits(self, committed_ms: int) -> None:
        """``cg_input_wait_seconds`` of the inputs whose outcome just committed: from the record's time on Kafka (a
        command's is the broker's append, ``LogAppendTime``) to now. ``cg_processing_seconds`` times the handler
        only, microseconds, while a verdict waits on the batch's transaction, a backlog, its alert or an outage."""
        for kind, written_at in self.core.take_settled():
            metrics.INPUT_WAIT_SECONDS.labels(PROCESS, kind).observe(max(0, committed_ms - written_at) / 1000)


def main(log_level: str | None = None) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, PROCESS)
    service = CaseService(settings)
    # the stop's deadline counts from the signal's arrival, even with the loop blocked in a Kafka call
    stop_on_signals(service._stop, (signal.SIGTERM, signal.SIGINT))
    endpoint = metrics.serve(settings, PROCESS, health=service.heartbeat)
    try:
        service.run()
    finally:
        endpoint.close()


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Open a case for every alert, apply the signed case verdicts (confirm, dismiss, escalate, assign, note)
    and their effects, expire undecided cases, until SIGTERM/Ctrl-C."""
    if log_level is None:
        main()
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
