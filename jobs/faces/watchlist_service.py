"""The watchlist service: enrolls and forgets faces on bot commands, keeps alert snapshots, purges the rest.

Inputs (one consumer group): ``commands`` (``FRAUD <tx>`` / ``VIP <tx>`` enroll the face of that
transaction's checkout snapshot as ``subj-<tx>``; ``FORGET <subject>`` removes it everywhere; ``LEARN <subject>
<image ref>``, from the case service on a confirmed match, adds that sighting as another template of the
subject, up to ``CG_CASES__MAX_TEMPLATES``; ``RENEW <subject>`` keeps an entry another
``CG_FACES__WATCHLIST_EXPIRE_DAYS``; the case verbs are the case service's) and
``alerts`` (the ``snapshot_ref`` of every alert is retained, exempt from the purge). Outputs:
``WatchlistEntry`` records / tombstones on the compacted ``watchlist`` topic (the source of truth the
Flink job broadcasts), one ``AuditEvent`` per change or refused change on ``audit`` (and per ``CHECKOUT <tx>``
the bot recorded: its fresh picture and watchlist search, ``INSPECT``), dead letters for
commands that could not be carried out. Every ``faces.retention_purge_interval_s`` the entries past their
``expires_at`` (enrollment or last renewal + ``faces.watchlist_expire_days``) are forgotten everywhere, like a
``forget`` (audited ``EXPIRE``), and the snapshots that matched nobody and are older than
``faces.snapshot_retention_hours`` are deleted (and audited).

Only authenticated commands change anything: each must carry the HMAC-SHA256 signature of its sender, the bot or,
for ``LEARN``, the case service (:func:`infra.command_auth.sign_command`, key ``CG_WEBEX__COMMAND_SIGNING_KEY``) in
the :data:`SIGNATURE_HEADER` Kafka header, be issued within ``webex.command_max_age_s`` and come from a room or
person on the same allow-list the bot applies (``CG_WEBEX__ALLOWED_ROOMS`` / ``…_PEOPLE``: configure the processes
alike).
Anything else -- unsigned, badly signed, stale, not allowed, or no key configured here -- is audited as
``FAILED`` and dead-lettered as ``unauthorized``, never applied: ``commands`` may be writable by more
than the bot. Transaction and subject ids are checked (``schemas.identifiers``; ``invalid_id``).

Once on Kafka: each input's outputs commit in one Kafka transaction (all of them or none), and its
consumer offset is committed after that transaction; a crash in between replays the input, which the
audit ledger below makes a no-op. (The offset is not sent inside the transaction: librdkafka's
``send_offsets_to_transaction`` ignores its timeout and can block for good when the group coordinator
restarts, librdkafka issues 5456 and 5511; a broker SIGKILL froze the service that way.)
Side effects outside Kafka (image store, Rekognition) are idempotent: same
subject id, same keys, an indexed subject is not indexed twice (a ``LEARN`` replayed after a crash before
its commit may index its sighting again: the same subject's face, deleted with it). Re-issuing a command that is already
in effect changes nothing (audited as ``UNCHANGED``); a command or alert already audited (e.g. replayed
after a consumer-group offset reset; the audit topic is read at startup) is skipped. Logs carry ids and
outcomes, never images or embeddings.

Metrics (``infra.metrics``, stage ``watchlist-service``): inputs by kind (the command verb: ``fraud``,
``vip``, ``forget``, ``learn``, ``renew``, ``checkout``, ``status``, ``help``, the case verbs ``confirm``, ``dismiss``,
``escalate``, ``assign``, ``note``, and ``unknown`` for a verb newer than this service; ``alert``; ``invalid`` when
undecodable), records out
once their transaction committed (``watchlist``, ``watchlist_tombstone``, ``audit``), dead letters by error
kind (``unauthorized`` for a refused command, ``no_face``, ``invalid_id``...) and ``cg_processing_seconds``
per input. ``/healthz`` turns 503 when the loop stalls or while a transaction is being retried because
Kafka is away ("Kafka unreachable"); an alert whose snapshot the image store cannot retain now is read again after a
backoff (:class:`StoreAway`, "image store unreachable"), never raised out of the service. With the Rekognition
backend the collection is created at the start, tried again while Rekognition is away ("Rekognition unreachable").

Run: ``python -m jobs.faces.watchlist_service`` (SIGTERM stops after the current record).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any

import numpy as np
import typer

from infra import clock, metrics
from infra.clients import transactional
from infra.clients.control_topics import STARTUP_READ_STALL_S
from infra.clients.image_store import (
    ImageStore,
    ImageStoreUnavailable,
    LocalImageStore,
    S3ImageStore,
    former_stores,
    local_former_store,
    missing_bucket,
    store_holding,
    store_outage,
)
from infra.clients.image_store import call_limit_s as store_call_limit_s
from infra.clients.transactional import Out, Source
from infra.command_auth import authenticate_command, claimed_details
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import StopRequest, exit_deadline, stop_on_signals
from infra.retry import Backoff
from infra.settings import Settings, get_settings
from jobs.faces.engine import DetectedFace, FaceEngine, ImageError, embedder_of
from jobs.faces.rekognition import MAX_BYTES as REKOGNITION_MAX_BYTES
from jobs.faces.rekognition import RekognitionError, RekognitionFaces, call_limit_s, face_crop
from jobs.faces.stage import LEGACY_INSPECTION, checkout_image_key, inspection_image_key
from jobs.scoring.face_similarity import similarity
from jobs.scoring.validation import check_size
from schemas.codec import DecodeError
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import ALERT_ID_RE, check
from schemas.records import (
    CASE_VERBS,
    WATCHLIST_SERVICE_ACTOR,
    Alert,
    AuditEvent,
    BotCommand,
    WatchlistEntry,
    dead_letter,
    dead_letter_headers,
)
from schemas.topics import ALERTS, AUDIT, COMMANDS, COMPACTION_MARKER, DEAD_LETTERS, WATCHLIST, TopicSpec, marker_due

log = logging.getLogger("jobs.faces.watchlist_service")

STAGE = "watchlist_service"
PROCESS = "watchlist-service"
"""The ``stage`` label of this process's metrics (its name in ``infra.metrics.PROCESSES``)."""
SERVICE_ACTOR = WATCHLIST_SERVICE_ACTOR
CATEGORY = {"FRAUD": "SUSPECT", "VIP": "VIP"}
AWS_CALL_MARGIN_S = 10.0
"""Beyond one Rekognition or S3 call's longest (:func:`health_limit_s`), for the work around it, in ``/healthz``'s
limit."""
UNVERIFIED_ACTOR = "unverified"
"""The audit actor of a refused command: who it claims to come from is only in its details."""
INSPECT = "INSPECT"
"""The audit action of the bot's ``checkout <tx>``: a fresh picture of that sale's lane, kept as a checkout snapshot
and searched against the watchlist (biometric processing, as an enrolment is; the bot does it, this service audits
it from the command the bot records first)."""


class Failed(InvalidRecord):
    """A command that cannot be carried out (audited as ``FAILED`` and dead-lettered); ``kind`` says why."""


class StoreAway(CheckoutGuardError, RuntimeError):
    """The image store is away (:func:`store_outage`) while an alert's snapshot is retained or deleted: the alert is
    read again after a backoff, its offset not committed. Raised out of the service it stopped it, and the
    supervisor's restarts crash-looped on the same alert for as long as S3 was away; dead-lettered, the snapshot
    would have been purged as if no alert named it. ``ref`` is that snapshot: the purge keeps it meanwhile."""

    def __init__(self, message: str, ref: str) -> None:
        super().__init__(message)
        self.ref = ref


def rekognition_failed(exc: RekognitionError) -> Failed:
    """A Rekognition error as a failed command. Raising it out of the service instead would stop the service,
    and the command, replayed at every restart, would fail again and hold up every command behind it (a
    ``forget`` among them): an error that persists (validation, access, a missing collection) fails the
    command for good; a transient one (throttling, 5xx, no connection) did after botocore's bounded retries,
    and the command can be issued again."""
    if exc.transient:
        return Failed("rekognition_unavailable", f"{exc.code} after retries; nothing changed, issue the command again")
    return Failed("rekognition_refused", exc.code)


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of ``exc``, if any (a botocore timeout has a ``response`` too: None)."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def retain_reason(alert_id: str, subject_id: str | None) -> str:
    """Retention marker text; ``forget`` and the purge find a snapshot's subject by its ``subject=`` token,
    which comes first: an S3 tag keeps 256 characters, and a long alert id first cut the subject off."""
    return f"subject={subject_id or '-'} alert={alert_id}"


def retained_subject(reason: str) -> str | None:
    """The subject of a retention marker (:func:`retain_reason`), None when it names none."""
    for token in reason.split():
        if token.startswith("subject=") and token != "subject=-":
            return token.removeprefix("subject=")
    return None


def health_limit_s(settings: Settings, default_s: float) -> float:
    """How long the service may make no progress before ``/healthz`` says so: ``default_s``, or at least the longest
    of one call to AWS it makes, plus :data:`AWS_CALL_MARGIN_S`, so a call that waits out its timeouts never gets the
    service restarted: a Rekognition call with the Rekognition backend (:func:`jobs.faces.rekognition.call_limit_s`),
    an S3 call with the S3 image store (:func:`infra.clients.image_store.call_limit_s`, whatever the face backend:
    before, only Rekognition's counted, and with the local backend one S3 call that did not answer, 62 s at the
    default 5 s a try, outlasted the 60 s)."""
    faces, calls = settings.faces, []
    if faces.backend == "rekognition":
        calls.append(call_limit_s(faces.rekognition_search_timeout_s))
    if faces.image_store == "s3":
        calls.append(store_call_limit_s(faces.image_store_timeout_s))
    return max([default_s, *(call + AWS_CALL_MARGIN_S for call in calls)])


def purge_missing_bucket(exc: BaseException, store: ImageStore) -> str | None:
    """Why the purge of ``store`` will fail at every sweep when ``exc`` is S3's ``NoSuchBucket`` for its bucket, naming
    the bucket and the setting to fix; else None. The current store's is :func:`missing_bucket`'s; a former bucket's
    store (one bucket, listed in ``CG_FACES__EXTRA_IMAGE_BUCKETS``, :func:`former_stores`) names that setting."""
    if (missing := missing_bucket(exc, store)) is not None:
        return str(missing)
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    if error.get("Code") != "NoSuchBucket" or not isinstance(store, S3ImageStore) or store.settings_of:
        return None
    bucket = store.buckets["checkout"]  # a former bucket's store keeps every kind there; named in the settings
    return (
        f"S3 bucket {bucket} does not exist (NoSuchBucket): set its right name in CG_FACES__EXTRA_IMAGE_BUCKETS, or "
        "take it off once its images are known to be gone"
    )


class WatchlistCore:
    """Decisions and side effects per input; returns the records to publish (no Kafka here)."""

    def __init__(
        self,
        settings: Settings,
        engine: FaceEngine | None = None,
        store: ImageStore | None = None,
        rekognition: RekognitionFaces | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine or FaceEngine(settings.faces)
        self._owned: list[ImageStore] = []
        """The stores this core built, closed by :meth:`close` (an injected store stays its owner's)."""
        self.progress: Callable[[], None] | None = None
        """Called after each S3 call of any store this core uses ends (:attr:`ImageStore.progress`): the service beats
        its ``/healthz`` there (:meth:`WatchlistService._watch_image_stores`)."""
        self.give_up_by: Callable[[], float | None] | None = None
        """The :attr:`ImageStore.give_up_by` of every store this core uses, set by :meth:`give_up_store_calls_by`."""
        if store is None:
            store = ImageStore.from_settings(settings)
            self._owned.append(store)
        self.store = self._watched(store)
        self.collection_pending = False
        """The collection is still to be created (:meth:`ensure_collection`): the service does it at its start."""
        if rekognition is None and settings.faces.backend == "rekognition":
            rekognition = RekognitionFaces(settings.faces, timeout_s=settings.faces.rekognition_search_timeout_s)
            self.collection_pending = True
        self.rekognition = rekognition
        self.entries: dict[str, dict[str, Any]] = {}
        """The watchlist as this service last wrote/read it (subject id -> entry without embeddings)."""
        self.records: dict[str, WatchlistEntry] = {}
        """The same entries whole (their templates): a confirmed sighting adds one (``LEARN``)."""
        self.done: set[str] = set()
        """Audit ids already published: an input replayed after an offset reset is skipped entirely."""
        self.marked_at = 0
        """When this service last appended the compaction marker (:func:`schemas.topics.marker_due`)."""
        self.other_stores: list[ImageStore] = []
        """Stores besides ``store`` that refs named (:meth:`store_of`), each built once."""
        self._former: list[ImageStore] | None = None
        """:func:`former_stores`, built once (:meth:`former`): each S3 one holds a client and its connections."""
        self.purge_missing: dict[str, str] = {}
        """The missing bucket the purge last logged as an ERROR, by store (:meth:`ImageStore.where`): logged again only
        when it changes or after a sweep of that store worked."""

    def _watched(self, store: ImageStore) -> ImageStore:
        """``store``, its calls' ends told to :attr:`progress` (whenever that is set): each of the stores a command may
        reach (the current one, a former bucket, the one a ref names), so that several slow S3 calls in one command
        are each progress, not together a hang. Its calls are given up as :attr:`give_up_by` says."""
        store.progress = self._call_ended
        store.give_up_by = self.give_up_by
        return store

    def give_up_store_calls_by(self, exit_by: Callable[[], float | None]) -> None:
        """Give up an S3 call or a local file operation of any store this core uses (those it reaches later too, and
        its looks for the local image folder) that is still under way at ``exit_by()``, the stop's deadline once the
        stop is asked (:attr:`ImageStore.give_up_by`): raised as ``TransactionGivenUp``, its command is not committed
        and is read again at the next start."""
        self.give_up_by = exit_by
        for store in (self.store, *self.other_stores, *(self._former or ())):
            store.give_up_by = exit_by

    def _call_ended(self) -> None:
        if self.progress is not None:
            self.progress()

    def ensure_collection(self) -> None:
        """Create the Rekognition collection this core built the client of, once it works; a
        :class:`RekognitionError` as the call gives it (the service decides whether to try again). Called here in
        ``__init__`` a throttled or failed CreateCollection stopped the service before it could say why."""
        if not self.collection_pending or self.rekognition is None:
            return
        self.rekognition.ensure_collection()
        self.collection_pending = False
        log.info(
            "Rekognition backend: enrolled faces are indexed in collection %s and deleted from it on forget; "
            "the face stage matches there",
            self.rekognition.collection,
        )

    def former(self) -> list[ImageStore]:
        """The stores besides ``store`` that may hold images written before a switch (:func:`former_stores`), built
        on first use and kept: the purge sweeps them every ``retention_purge_interval_s`` and a new S3 client per
        bucket per sweep, never closed, kept its connection pool open until the garbage collector found it. The local
        image folder is looked for again at each call while it is not among them (a few ``stat`` calls): one made after
        the start (a local stage run on this machine) was otherwise neither swept nor searched by ``forget`` until a
        restart. The buckets come from the settings, which do not change while the service runs."""
        if self._former is None:
            self._former = [self._watched(store) for store in former_stores(self.settings, self.store, self.give_up_by)]
            self._owned += self._former
        elif not any(isinstance(store, LocalImageStore) for store in self._former) and (
            local := local_former_store(self.settings, self.store, self.give_up_by)
        ):
            self._former.append(self._watched(local))
            self._owned.append(local)
        return self._former

    def close(self) -> None:
        """Close the stores this core built (their S3 clients); one failing to close does not keep the others open."""
        owned, self._owned = self._owned, []
        self._former, self.other_stores = None, []
        for store in owned:
            try:
                store.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: the others are closed all the same
                log.warning("closing %s failed (%s)", store.where(), type(exc).__name__)

    # --- state -------------------------------------------------------------------------------------
    def load(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one record of the watchlist topic (startup replay). A record that does not decode (or a key that is
        no text) is left out with a WARNING naming its key, and what was read before for that key stays: raised, it
        stopped every start of the service, the supervisor's restarts read it again, and no command was carried out."""
        if key is None:
            return
        try:
            subject = key.decode()
            entry = None if value is None else WatchlistEntry.decode(value)
        except (UnicodeDecodeError, DecodeError) as exc:
            log.warning(
                "watchlist record %s left out: it does not decode (%s)",
                key.decode(errors="replace")[:80],
                type(exc).__name__,
            )
            return
        if entry is None:
            self.entries.pop(subject, None)
            self.records.pop(subject, None)
            return
        self.records[entry.subject_id] = entry
        self.entries[entry.subject_id] = {
            "category": entry.category,
            "source_transaction_id": entry.source_transaction_id,
        }

    def load_audit(self, key: bytes | None) -> None:
        """Apply one record of the audit topic (startup replay): remember what was already done."""
        if key is not None:
            self.done.add(key.decode())

    # --- inputs ------------------------------------------------------------------------------------
    def on_command(self, src: Source, now_ms: int) -> list[Out]:
        try:
            cmd = BotCommand.decode(src.value or b"")
        except DecodeError as exc:
            metrics.RECORDS_IN.labels(PROCESS, "invalid").inc()
            return [self._dead_letter(src, exc, now_ms)]
        metrics.RECORDS_IN.labels(PROCESS, cmd.verb.lower()).inc()  # an Avro enum: a few values
        if cmd.verb in CASE_VERBS:
            return []  # the case service's: it checks them (and dead-letters forged ones) itself
        if cmd.verb not in ("FRAUD", "VIP", "FORGET", "LEARN", "RENEW"):
            return self._not_ours(src, cmd, now_ms)
        if f"command:{cmd.command_id}" in self.done:
            return []  # a replayed command changes nothing
        action = {"FORGET": "FORGET", "LEARN": "LEARN", "RENEW": "RENEW"}.get(cmd.verb, "ENROLL")
        try:
            authenticate_command(cmd, src.headers, self.settings.webex, src.written_at or now_ms)
        except InvalidRecord as refused:
            return self._refuse(src, cmd, action, refused, now_ms)
        audit = {
            "audit_id": f"command:{cmd.command_id}",
            "event_time": now_ms,
            "action": action,
            "actor": cmd.actor,
            "command_id": cmd.command_id,
        }
        try:
            arg = (cmd.argument or "").strip()
            if not arg:
                raise Failed("missing_argument", f"{cmd.verb.lower()} needs an argument")
            if cmd.verb == "FORGET":
                return self._forget(check(arg, "subject id"), audit)
            if cmd.verb == "LEARN":
                return self._learn(cmd, arg, audit)
            if cmd.verb == "RENEW":
                return self._renew(cmd, check(arg, "subject id"), audit, now_ms)
            check(f"subj-{check(arg, 'transaction id')}", "subject id")  # the id it would be enrolled as
            return self._enroll(cmd, arg, audit)
        except InvalidRecord as f:  # Failed, or an invalid id (never copied into the audit event)
            log.info("command %s %s failed: %s", cmd.command_id, cmd.verb, f.kind)
            failed = f
        except Exception as exc:  # noqa: BLE001 - the image store, a bug: this command fails, the next ones go on
            failed = self._unexpected(cmd, exc)
        return [
            self._audit(**audit, outcome="FAILED", reason=f"{failed.kind}: {failed.reason}"),
            self._dead_letter(src, failed, now_ms),
        ]

    def _unexpected(self, cmd: BotCommand, exc: Exception) -> Failed:
        """A command's failure that no step turned into a :class:`Failed`: a bucket of the current image store that
        does not exist is ``image_store_missing`` naming the bucket and its setting (it was a bare ``command_error``),
        anything else ``command_error`` with the error's type only. A Rekognition call given up at the stop's deadline
        (``TransactionGivenUp``) is no failure: raised again, the command is not committed and is read again."""
        if isinstance(exc, transactional.TransactionGivenUp):
            raise exc
        if (missing := missing_bucket(exc, self.store)) is not None:  # a setting to fix, not a passing error
            log.error("command %s %s failed: %s", cmd.command_id, cmd.verb, missing)
            return Failed("image_store_missing", f"{missing}; then issue the command again")
        log.error("command %s %s failed: %s", cmd.command_id, cmd.verb, type(exc).__name__)
        return Failed("command_error", f"{type(exc).__name__}; issue the command again")

    def _inspected(self, src: Source, cmd: BotCommand, now_ms: int) -> list[Out]:
        """``CHECKOUT <tx>``: the bot records it, then takes a picture of that sale's lane, keeps it (as a checkout
        snapshot) and searches the watchlist with its face. That biometric processing is audited here as an enrolment
        is, :data:`INSPECT` under ``command:<id>`` (a replay is skipped), its actor and transaction; before, only the
        ``commands`` record (7 d) said it happened. One the bot did not sign (forged, unsigned) is dead-lettered and
        not audited: the bot took no picture for it. Without a key nothing can be verified (the bot still runs
        ``checkout``): audited under its offset, the actor :data:`UNVERIFIED_ACTOR` and who it claims in the details,
        as a refusal is."""
        if self.settings.webex.command_signing_key is None:
            audit: dict[str, Any] = {
                "audit_id": f"unverified:{src.topic}:{src.partition}:{src.offset}",
                "actor": UNVERIFIED_ACTOR,
                "details": claimed_details(cmd),
            }
        else:
            try:
                authenticate_command(cmd, src.headers, self.settings.webex, now_ms, fresh=False)
            except InvalidRecord as refused:
                return [self._dead_letter(src, refused, now_ms)]
            audit = {"audit_id": f"command:{cmd.command_id}", "actor": cmd.actor, "command_id": cmd.command_id}
        if audit["audit_id"] in self.done:
            return []
        audit.update(event_time=now_ms, action=INSPECT)
        try:
            tx = check((cmd.argument or "").strip(), "transaction id")
        except InvalidRecord as bad:  # the bot sends none such: not copied into the audit event
            return [
                self._audit(**audit, outcome="FAILED", reason=f"{bad.kind}: {bad.reason}"),
                self._dead_letter(src, bad, now_ms),
            ]
        why = "checkout: the bot's picture of the sale's lane, kept as a checkout snapshot, searched in the watchlist"
        return [self._audit(**audit, outcome="DONE", transaction_id=tx, reason=why)]

    def _not_ours(self, src: Source, cmd: BotCommand, now_ms: int) -> list[Out]:
        """CHECKOUT / STATUS / HELP are the bot's business, recorded on ``commands`` for the record: nothing
        to do, but one that is not the bot's (unsigned, forged, malformed) is a dead letter. Without a key
        there is nothing to check them against. A CHECKOUT is audited (:meth:`_inspected`)."""
        if cmd.verb == "CHECKOUT":
            return self._inspected(src, cmd, now_ms)
        if self.settings.webex.command_signing_key is None:
            return []
        try:
            authenticate_command(cmd, src.headers, self.settings.webex, now_ms, fresh=False)
        except InvalidRecord as refused:
            return [self._dead_letter(src, refused, now_ms)]
        return []

    def _refuse(self, src: Source, cmd: BotCommand, action: str, error: InvalidRecord, now_ms: int) -> list[Out]:
        """An unauthenticated or unauthorised command: audited under its offset (its command id is only a
        claim, and must not mark a real command with that id as done) and dead-lettered."""
        audit_id = f"refused:{src.topic}:{src.partition}:{src.offset}"
        if audit_id in self.done:
            return []
        log.warning("command at %s:%d:%d refused: %s", src.topic, src.partition, src.offset, error.reason)
        return [
            self._audit(
                audit_id=audit_id,
                event_time=now_ms,
                action=action,
                outcome="FAILED",
                actor=UNVERIFIED_ACTOR,
                reason=f"{error.kind}: {error.reason}",
                details=claimed_details(cmd),
            ),
            self._dead_letter(src, error, now_ms),
        ]

    def on_alert(self, src: Source, now_ms: int) -> list[Out]:
        try:
            # its audit event copies its ids: one past Kafka's producer limit failed every publish, and the service,
            # restarted, read the same alert again (the job's and face stage's limit keeps it well below)
            check_size(src.value, self.settings.job.max_message_bytes)
            alert = Alert.decode(src.value or b"")
            # its audit id is made from it: every empty one (a record of zeros) was the same, skipped after the first
            check(alert.alert_id, "alert_id", ALERT_ID_RE)
        except InvalidRecord as exc:  # oversized, undecodable (DecodeError), or an id the alert sender refuses too
            metrics.RECORDS_IN.labels(PROCESS, "invalid").inc()
            return [self._dead_letter(src, exc, now_ms)]
        # counted once done: with the image store away (StoreAway) it is read again, and each read counted as another
        outs = self._retain_snapshot(src, alert, now_ms)
        metrics.RECORDS_IN.labels(PROCESS, "alert").inc()
        return outs

    def _retain_snapshot(self, src: Source, alert: Alert, now_ms: int) -> list[Out]:
        """Retain a valid alert's snapshot (or delete it when its subject is forgotten), audited once;
        :class:`StoreAway` while the image store does not answer."""
        if not alert.snapshot_ref or f"retain:{alert.alert_id}" in self.done:
            return []
        audit = {
            "audit_id": f"retain:{alert.alert_id}",
            "event_time": now_ms,
            "action": "RETAIN",
            "actor": SERVICE_ACTOR,
            "subject_id": alert.subject_id,
            "category": alert.category,
            "transaction_id": alert.transaction_id,
        }
        if alert.subject_id and alert.subject_id not in self.entries:
            return self._drop_snapshot_of_forgotten(alert, audit)
        try:  # where the ref says: a snapshot taken before a switch of the image store or its bucket is still there
            store = self.store_of(alert.snapshot_ref)
            store.retain(alert.snapshot_ref, retain_reason(alert.alert_id, alert.subject_id))
        except transactional.TransactionGivenUp:  # at the stop: the alert is read again at the next start
            raise
        except Exception as exc:  # noqa: BLE001 - no ref of ours, its store not here, the image gone, or S3 failing
            if store_outage(exc):  # before OSError: a botocore timeout is one
                why = f"retaining the snapshot of alert {alert.alert_id}: {type(exc).__name__}"
                raise StoreAway(why, alert.snapshot_ref) from None
            kind, why = "image_store_error", type(exc).__name__  # an error S3 gives again (access, no such bucket)
            if missing := missing_bucket(exc, self.store):
                kind, why = "image_store_missing", str(missing)
            elif isinstance(exc, ImageStoreUnavailable):
                kind, why = "image_store_unavailable", str(exc)
            elif isinstance(exc, ValueError | OSError):
                kind = "missing_image" if isinstance(exc, FileNotFoundError) else "bad_ref"
            return [
                self._audit(**audit, outcome="FAILED", reason=f"{kind}: {why}"),
                self._dead_letter(src, InvalidRecord(kind, f"cannot retain snapshot: {why}"), now_ms),
            ]
        return [
            self._audit(
                **audit, outcome="DONE", reason=f"alert {alert.kind}", details={"image_ref": alert.snapshot_ref}
            )
        ]

    def _drop_snapshot_of_forgotten(self, alert: Alert, audit: dict[str, Any]) -> list[Out]:
        """An alert naming a subject no longer on the watchlist: forgotten or expired (the job alerts only on
        enrolled subjects), the alert made before that or scored before the job read the tombstone, and read
        here after it (``commands`` and ``alerts`` are separate topics, read in no fixed order). Its snapshot
        is deleted where its ref says (:meth:`store_of`), as ``forget`` deleted the subject's other alert snapshots;
        retained, it stayed for ``alert_snapshot_retention_days``. Audited ``PURGE`` under the alert's retain id (a
        replay skips it)."""
        ref = str(alert.snapshot_ref)
        try:
            self.store_of(ref).delete(ref)  # the current store, or the one it was taken in before a switch
        except ImageStoreUnavailable as exc:  # its store is not reachable from here: the image stays, and says where
            log.warning("alert %s: the snapshot of forgotten %s not deleted: %s", alert.alert_id, alert.subject_id, exc)
            return [
                self._audit(
                    **{**audit, "action": "PURGE"},
                    outcome="FAILED",
                    reason=f"image_store_unavailable: {exc}",
                    details={"image_ref": ref, "alert_id": alert.alert_id},
                )
            ]
        except transactional.TransactionGivenUp:  # at the stop: the alert is read again at the next start
            raise
        except Exception as exc:  # noqa: BLE001 - a ref of no store (nothing of ours to delete), or S3 failing
            if store_outage(exc):  # before OSError: a botocore timeout is one
                raise StoreAway(f"deleting the snapshot of alert {alert.alert_id}: {type(exc).__name__}", ref) from None
            kind = "bad_ref" if isinstance(exc, ValueError | OSError) else "image_store_error"
            return [
                self._audit(**{**audit, "action": "PURGE"}, outcome="FAILED", reason=f"{kind}: {type(exc).__name__}")
            ]
        log.info(
            "alert %s names %s, no longer on the watchlist: its snapshot deleted", alert.alert_id, alert.subject_id
        )
        return [
            self._audit(
                **{**audit, "action": "PURGE"},
                outcome="DONE",
                reason="alert of a subject no longer on the watchlist (forgotten or expired): snapshot deleted",
                details={"image_ref": ref, "alert_id": alert.alert_id},
            )
        ]

    def purge(self, now_ms: int, keep: frozenset[str] = frozenset()) -> list[Out]:
        """Expired watchlist entries forgotten, entries of another embedder enrolled again, then the snapshots past
        their retention deleted: in the current store and in each of :func:`former_stores` (those ``forget`` searches),
        since the snapshots taken before a switch of the image store or its buckets stay where they were written. A
        store that fails is logged and left for the next sweep (named in the audit's ``not_swept`` when the others
        deleted something); the others are swept. The snapshots in ``keep`` (of alerts waiting for the image store to
        retain them, :class:`StoreAway`) are not deleted, however old: their alerts still need them."""
        expired = self.expire(now_ms) + self.reembed(now_ms)
        if marker_due(WATCHLIST, self.marked_at, now_ms):  # a forgotten entry is compacted away only then
            self.marked_at = now_ms
            expired.append(Out(WATCHLIST, COMPACTION_MARKER, None))
        faces = self.settings.faces
        cutoff = now_ms - int(faces.snapshot_retention_hours * 3600 * 1000)
        alert_cutoff = now_ms - int(faces.alert_snapshot_retention_days * 86_400_000)
        deleted = released = 0
        not_swept: list[str] = []
        for store in [self.store, *self.former()]:
            try:
                deleted += store.purge(cutoff, keep)
                released += store.purge_retained(alert_cutoff)
            except transactional.TransactionGivenUp:  # at the stop: swept at the next start
                raise
            except Exception as exc:  # noqa: BLE001 - S3 or disk: the other stores are swept, this one next time
                self._purge_failed(store, exc)
                not_swept.append(store.where())
            else:
                self.purge_missing.pop(store.where(), None)
        if not deleted and not released:  # a store that failed is in the log at every sweep, not on audit
            return expired
        log.info("purged %d unretained snapshots and %d alert snapshots past their retention", deleted, released)
        details = {
            "deleted": str(deleted),
            "older_than_ms": str(cutoff),
            "alert_snapshots_deleted": str(released),
            "alert_snapshots_older_than_ms": str(alert_cutoff),
        }
        if not_swept:
            details["not_swept"] = "; ".join(not_swept)
        return [
            *expired,
            self._audit(
                audit_id=f"purge:{now_ms}",
                event_time=now_ms,
                action="PURGE",
                outcome="DONE",
                actor=SERVICE_ACTOR,
                reason="retention period over (no match and no alert, or the alert's longer period)",
                details=details,
            ),
        ]

    def _purge_failed(self, store: ImageStore, exc: Exception) -> None:
        """Log a store the purge could not sweep. A bucket that does not exist (:func:`purge_missing_bucket`: the
        current store's or a former one of ``CG_FACES__EXTRA_IMAGE_BUCKETS``) fails every sweep until its setting is
        fixed: an ERROR naming the bucket and the setting, once until that changes (it was a WARNING with the error's
        type alone, at every sweep); the rest a WARNING."""
        where = store.where()
        if (missing := purge_missing_bucket(exc, store)) is None:
            log.warning("purging %s failed (%s): trying again at the next purge", where, type(exc).__name__)
        elif self.purge_missing.get(where) != missing:
            self.purge_missing[where] = missing
            log.error("purging %s failed, and will at every sweep: %s (logged once, until it changes)", where, missing)
        else:
            log.debug("purging %s failed: %s", where, missing)

    # --- commands ----------------------------------------------------------------------------------
    def _enroll(self, cmd: BotCommand, tx: str, audit: dict[str, Any]) -> list[Out]:
        subject = f"subj-{tx}"
        category = CATEGORY[cmd.verb]
        audit.update(subject_id=subject, category=category, transaction_id=tx)
        current = self.entries.get(subject)
        if current and current["category"] == category:
            return [self._audit(**audit, outcome="UNCHANGED", reason=f"already on the watchlist as {category}")]
        data = self._sale_snapshot(tx)
        try:
            face = self.engine.best_face(data)
        except ImageError as exc:
            raise Failed("bad_image", f"checkout snapshot unusable ({exc.kind})") from None
        if face is None:
            raise Failed("no_face", "no face passed the quality gate in the checkout snapshot")
        assert face.embedding is not None, "the face best_face gives passed the gate, so it is embedded"
        previous = self._previous_reference(subject)
        reference = self.store.put("reference", subject, data)
        details = {"image_ref": reference, "quality": f"{face.quality:.3f}"}
        if self.rekognition is not None:
            try:
                details["rekognition_faces"] = str(
                    len(self.rekognition.index(subject, self._indexable(reference, data, face)))
                )
            except transactional.TransactionGivenUp:  # at the stop: the command is read again, and puts it again
                raise
            except Exception as exc:  # any failure: no reference image that no entry names stays behind
                left = ""
                if previous is None or previous[0] != reference:  # a new subject, or its image is in a former store
                    left = self._drop_unnamed_reference(subject, reference)
                if isinstance(exc, RekognitionError):
                    failed = rekognition_failed(exc)
                    raise Failed(failed.kind, f"{failed.reason}{left}") from None
                if left:
                    raise Failed("command_error", f"{type(exc).__name__}{left}; issue the command again") from None
                raise
        if current:
            details["previous_category"] = current["category"]
        if previous is not None and previous[0] != reference:
            self._delete_previous_reference(*previous, replacement=reference)
            details["previous_image_ref_deleted"] = previous[0]
        entry = WatchlistEntry(
            subject_id=subject,
            category=category,
            embeddings=[[float(v) for v in face.embedding]],
            reason=f"{cmd.verb.lower()} at transaction {tx}",
            flagged_by=cmd.actor,
            flagged_at=cmd.issued_at,
            reference_image_ref=reference,
            source_transaction_id=tx,
            expires_at=cmd.issued_at + self._lifetime_ms(),
        )
        self.entries[subject] = {"category": category, "source_transaction_id": tx}
        self.records[subject] = entry
        log.info("enrolled %s as %s (command %s)", subject, category, cmd.command_id)
        return [
            Out(WATCHLIST, subject.encode(), entry.encode()),
            self._audit(**audit, outcome="DONE", reason=entry.reason, details=details),
        ]

    def _sale_snapshot(self, tx: str) -> bytes:
        """The checkout snapshot of sale ``tx`` (footage of the sale only, never "now"): in the current store, else in
        each of :func:`former_stores`, where a sale taken before a switch of the image store or its bucket still is.
        A former store that cannot be searched fails the command ``image_store_unavailable`` when no store has it."""
        key = checkout_image_key(tx)
        if snapshot := self.store.find("checkout", key):
            return self._read_snapshot(self.store, snapshot, tx)
        unsearched: list[str] = []
        for store in self.former():
            try:
                snapshot = store.find("checkout", key)
            except transactional.TransactionGivenUp:  # at the stop: the command is read again
                raise
            except Exception as exc:  # noqa: BLE001 - S3 or disk: the snapshot may be there, or in the next one
                log.warning("looking for sale %s in %s failed (%s)", tx, store.where(), type(exc).__name__)
                unsearched.append(f"{store.where()} ({type(exc).__name__})")
                continue
            if snapshot:
                return self._read_snapshot(store, snapshot, tx)
        if unsearched:
            raise Failed(
                "image_store_unavailable",
                f"no checkout snapshot for transaction {tx} found; not searched: {'; '.join(unsearched)}; "
                "issue the command again",
            )
        raise Failed("unknown_transaction", f"no checkout snapshot for transaction {tx}")

    def _drop_unnamed_reference(self, subject: str, reference: str) -> str:
        """Delete the reference image a failed enrolment wrote; ``""`` when done, else what stays, for the failure's
        reason. Its own failure does not replace the enrolment's (the audit and dead letter name the cause)."""
        try:
            self.store.delete(reference)
        except transactional.TransactionGivenUp:  # at the stop: the command is read again
            raise
        except Exception as exc:  # noqa: BLE001 - S3 or disk: a forget finds it under the subject's key
            log.warning(
                "the reference image of %s written for a failed enrolment was not deleted (%s)",
                subject,
                type(exc).__name__,
            )
            return f"; the new reference image {reference} was not deleted ({type(exc).__name__}) and stays"
        return ""

    @staticmethod
    def _read_snapshot(store: ImageStore, ref: str, tx: str) -> bytes:
        """The found snapshot's bytes; gone meanwhile (purged between the lookup and the read) it is ``missing_image``
        with either store, as ``LEARN`` says of a sighting that is gone."""
        try:
            return store.get(ref)
        except FileNotFoundError:
            raise Failed("missing_image", f"the checkout snapshot of transaction {tx} is gone") from None

    def _previous_reference(self, subject: str) -> tuple[str, ImageStore] | None:
        """The reference image a change of category replaces, with the store that holds it: after a switch of the
        image store or its bucket it is not where the new one is written, and the entry that named it is replaced,
        so it would stay for ever. A store that cannot be reached fails the command before anything is written."""
        entry = self.records.get(subject)
        if entry is None or not entry.reference_image_ref:
            return None
        try:
            return entry.reference_image_ref, self.store_of(entry.reference_image_ref)
        except ImageStoreUnavailable as exc:
            raise Failed("image_store_unavailable", f"the former reference image cannot be deleted: {exc}") from None
        except InvalidRecord:  # no ref of any store: no image of ours
            return None

    def _delete_previous_reference(self, ref: str, store: ImageStore, replacement: str) -> None:
        """Delete the reference image a change of category replaced. Failing, the command fails, the entry keeps
        naming the old image, and ``replacement`` (the new one, just written in the current store) is deleted too: no
        entry names it, and it would stay a second biometric image of the subject. The audit says what is left."""
        try:
            store.delete(ref)
        except transactional.TransactionGivenUp:  # at the stop: the command is read again
            raise
        except Exception as exc:  # noqa: BLE001 - S3 or disk
            why = f"the former reference image {ref} was not deleted from {store.where()} ({type(exc).__name__})"
            try:
                self.store.delete(replacement)
            except transactional.TransactionGivenUp:
                raise
            except Exception as again:  # noqa: BLE001 - the same outage: a forget finds it under the subject's key
                left = f"the new one {replacement} was not deleted either ({type(again).__name__}) and stays"
            else:
                left = f"the new one {replacement} was deleted"
            raise Failed(
                "image_store_unavailable", f"{why}; {left}; the entry is unchanged, issue the command again"
            ) from None

    @staticmethod
    def _indexable(reference: str, data: bytes, face: DetectedFace) -> bytes | str:
        """What IndexFaces is given for an enrolment: the S3 object, else the bytes, or the enrolled face cropped
        when the picture is over Rekognition's 5 MB for bytes (a camera may send 8 MB: every such enrolment failed)."""
        if reference.startswith("s3://"):
            return reference
        return data if len(data) <= REKOGNITION_MAX_BYTES else face_crop(data, face.box, face.scale)

    def _learn(self, cmd: BotCommand, arg: str, audit: dict[str, Any]) -> list[Out]:
        """``LEARN <subject> <image ref>`` (the case service, on a confirmed face match): the best face of that
        sighting becomes another template of the subject, up to ``cases.max_templates``."""
        words = arg.split()
        if len(words) != 2:
            raise Failed("bad_argument", "learn needs a subject id and an image ref")
        subject, ref = check(words[0], "subject id"), words[1]
        audit["subject_id"] = subject
        entry = self.records.get(subject)
        if entry is None:
            raise Failed("unknown_subject", "the subject is not on the watchlist (forgotten meanwhile?)")
        audit.update(category=entry.category, transaction_id=entry.source_transaction_id)
        cap = self.settings.cases.max_templates
        if len(entry.embeddings) >= cap:
            return [self._audit(**audit, outcome="UNCHANGED", reason=f"the subject has {cap} templates already")]
        try:  # where the ref says: a sighting taken before a switch of the image store or its bucket is still there
            data = self.store_of(ref).get(ref)
        except ImageStoreUnavailable as exc:  # its store is not reachable from here: the message says what to set
            raise Failed("image_store_unavailable", f"sighting unavailable: {exc}") from None
        except (ValueError, OSError) as exc:  # not a ref of any store, or the image is gone
            if store_outage(exc):  # a botocore timeout is an OSError: S3 away, the image may well be there
                raise
            raise Failed("missing_image", f"sighting unavailable: {type(exc).__name__}") from None
        try:
            face = self._sighted_face(entry, self.engine.analyse(data))
        except ImageError as exc:
            raise Failed("bad_image", f"sighting unusable ({exc.kind})") from None
        if face is None:
            raise Failed("no_face", "no face passed the quality gate in the sighting")
        assert face.embedding is not None, "_sighted_face gives an embedded face"
        if self.rekognition is not None:  # that face alone: indexing the picture adds its largest face, anyone's
            try:
                self.rekognition.index(subject, face_crop(data, face.box, face.scale), another=True)
            except RekognitionError as exc:
                raise rekognition_failed(exc) from None
        learned = replace(entry, embeddings=[*entry.embeddings, [float(v) for v in face.embedding]])
        self.records[subject] = learned
        log.info("learned a template of %s (%d now, command %s)", subject, len(learned.embeddings), cmd.command_id)
        return [
            Out(WATCHLIST, subject.encode(), learned.encode()),
            self._audit(
                **audit,
                outcome="DONE",
                reason="confirmed sighting added as a template",
                details={"image_ref": ref, "templates": str(len(learned.embeddings)), "quality": f"{face.quality:.3f}"},
            ),
        ]

    @staticmethod
    def _sighted_face(entry: WatchlistEntry, faces: list[DetectedFace]) -> DetectedFace | None:
        """The face of a confirmed sighting that is the subject: of the faces that passed the gate, the one nearest
        the subject's templates (the largest when none can be compared). The Rekognition backend matches each face
        of a snapshot, not only the largest, so a sighting's largest face may be a bystander's."""
        passing = [(f, f.embedding) for f in faces if f.passed and f.embedding is not None]
        templates = [t for t in entry.embeddings if passing and len(t) == len(passing[0][1])]
        if len(passing) < 2 or not templates:
            return passing[0][0] if passing else None  # analyse lists the largest first
        return max(passing, key=lambda fe: max(similarity(fe[1], t) for t in templates))[0]

    def _lifetime_ms(self) -> int:
        return int(self.settings.faces.watchlist_expire_days * 86_400_000)

    def expires_at(self, entry: WatchlistEntry) -> int:
        """When ``entry`` is forgotten unless renewed (an entry written before expiry existed: from its
        enrollment)."""
        return entry.expiry(self._lifetime_ms())

    def _renew(self, cmd: BotCommand, subject: str, audit: dict[str, Any], now_ms: int) -> list[Out]:
        """``RENEW <subject>``: the entry stays another ``faces.watchlist_expire_days`` from now."""
        audit["subject_id"] = subject
        entry = self.records.get(subject)
        if entry is None:
            raise Failed("unknown_subject", "the subject is not on the watchlist")
        audit.update(category=entry.category, transaction_id=entry.source_transaction_id)
        renewed = replace(entry, expires_at=now_ms + self._lifetime_ms())
        self.records[subject] = renewed
        log.info("renewed %s until %d (command %s)", subject, renewed.expires_at, cmd.command_id)
        return [
            Out(WATCHLIST, subject.encode(), renewed.encode()),
            self._audit(
                **audit,
                outcome="DONE",
                reason="watchlist entry renewed",
                details={"previous_expires_at": str(self.expires_at(entry)), "expires_at": str(renewed.expires_at)},
            ),
        ]

    def reembed(self, now_ms: int) -> list[Out]:
        """Entries enrolled by another embedder than the configured one (``CG_FACES__EMBEDDER`` changed, or its
        default did), and entries without embeddings (a subject known only to a Rekognition collection: ``LEARN``
        adds templates to it, yet it never matched with the local backend), never match a probe: each is enrolled
        again from its reference image, audited ``REEMBED``
        (templates learned from sightings are dropped: their images are not kept). One that cannot be (no
        reference image, no face in it) is audited ``FAILED`` once and logged: it needs a new ``suspect``. With the
        Rekognition backend too (it matches in its collection, which keeps its own faces), so that the entries still
        match when the backend is set back to local."""
        wanted = self.engine.embedder
        outs: list[Out] = []
        for subject, entry in list(self.records.items()):
            if entry.embeddings and embedder_of(np.asarray(entry.embeddings[0])) == wanted:
                continue
            dropped = max(len(entry.embeddings) - 1, 0)
            audit = {
                "event_time": now_ms,
                "action": "REEMBED",
                "actor": SERVICE_ACTOR,
                "subject_id": subject,
                "category": entry.category,
                "transaction_id": entry.source_transaction_id,
            }
            failed_id = f"reembed-failed:{subject}:{wanted}"
            if failed_id in self.done:
                continue  # it could not be done; a new `suspect` replaces the entry
            try:
                if not entry.reference_image_ref:
                    raise Failed("no_reference", "the entry has no reference image")
                try:
                    store = self.store_of(entry.reference_image_ref)
                except ImageStoreUnavailable as exc:  # a setting to fix (the message says which): not gone
                    log.warning("re-enrolling %s waits for its reference image: %s", subject, exc)
                    continue
                except ValueError:  # a ref of no store
                    raise Failed("missing_image", "the reference image ref names no image store") from None
                try:
                    face = self.engine.best_face(store.get(entry.reference_image_ref))
                except transactional.TransactionGivenUp:  # at the stop: enrolled again at the next start
                    raise
                except Exception as exc:  # noqa: BLE001 - S3 or network: gone for good, or retried next sweep
                    if (failed := self._reference_unreadable(exc)) is None:
                        why = _s3_code(exc) or type(exc).__name__
                        log.warning("re-enrolling %s failed (%s): trying again at the next purge", subject, why)
                        continue
                    raise failed from None
                if face is None:
                    raise Failed("no_face", "no face passed the quality gate in the reference image")
                assert face.embedding is not None, "the face best_face gives passed the gate, so it is embedded"
            except Failed as failed:
                was = "was enrolled by another embedder" if entry.embeddings else "has no embeddings"
                log.error("%s %s and cannot be enrolled again: %s", subject, was, failed.reason)
                reason = f"{failed.kind}: {failed.reason}"
                outs.append(self._audit(**audit, audit_id=failed_id, outcome="FAILED", reason=reason))
                continue
            again = replace(entry, embeddings=[[float(v) for v in face.embedding]])
            self.records[subject] = again
            log.info("%s enrolled again with %s (%d templates dropped)", subject, wanted, dropped)
            outs.append(Out(WATCHLIST, subject.encode(), again.encode()))
            outs.append(
                self._audit(
                    **audit,
                    audit_id=f"reembed:{subject}:{wanted}:{now_ms}",
                    outcome="DONE",
                    reason=f"enrolled again from the reference image with {wanted}",
                    details={"templates_dropped": str(dropped), "quality": f"{face.quality:.3f}"},
                )
            )
        return outs

    @staticmethod
    def _reference_unreadable(exc: Exception) -> Failed | None:
        """Why a reference image that could not be read cannot be enrolled again, or None when it is worth trying at
        the next sweep: the store away (a botocore timeout is an OSError, and was taken for a missing image: the
        entry failed for good and never matched again), or an S3 error other than a missing object."""
        if store_outage(exc):
            return None
        if isinstance(exc, ValueError | OSError | ImageError):
            return Failed("missing_image", f"reference image unusable ({type(exc).__name__})")
        if _s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return Failed("missing_image", "reference image gone from the image store")
        return None

    def store_of(self, ref: str) -> ImageStore:
        """The store that holds ``ref`` (:func:`store_holding`): an entry's reference image stays where it was written
        when ``CG_FACES__IMAGE_STORE`` or the suspects bucket changes, and read in the current store it is missing."""
        for store in (self.store, *self.other_stores, *self.former()):
            if store.holds(ref):
                return store
        store = self._watched(store_holding(ref, self.settings, self.store, self.give_up_by))
        self.other_stores.append(store)
        self._owned.append(store)
        return store

    def expire(self, now_ms: int) -> list[Out]:
        """Forget every entry past its expiry, everywhere (as ``forget`` does), audited as ``EXPIRE``."""
        outs: list[Out] = []
        for subject, entry in list(self.records.items()):
            until = self.expires_at(entry)
            if until > now_ms:
                continue
            log.info("watchlist entry %s expired (not renewed)", subject)
            audit = {"audit_id": f"expire:{subject}:{until}", "event_time": now_ms, "action": "EXPIRE"}
            current = self.entries.get(subject)
            try:
                outs += self._forget(subject, {**audit, "actor": SERVICE_ACTOR})
            except transactional.TransactionGivenUp:  # given up at the stop: expired again at the next start
                raise
            except Exception as exc:  # noqa: BLE001 - S3, Rekognition, disk: retried at the next purge, never fatal
                log.warning("expiring %s failed (%s): trying again at the next purge", subject, type(exc).__name__)
                self.records[subject] = entry
                if current is not None:
                    self.entries[subject] = current
                outs.append(
                    self._audit(
                        **{**audit, "audit_id": f"expire-failed:{subject}:{now_ms}"},
                        outcome="FAILED",
                        actor=SERVICE_ACTOR,
                        subject_id=subject,
                        reason=f"could not remove every trace yet ({self._why(exc)}); retried",
                    )
                )
        return outs

    def _forget(self, subject: str, audit: dict[str, Any]) -> list[Out]:
        """The images first, then Rekognition's faces, then the entry: a failure on the way leaves the subject
        enrolled and matched by both indexes (never by one while forgotten by the other), the audit says what is
        left, and a new ``forget`` finishes it (deleting an image already gone changes nothing)."""
        audit["subject_id"] = subject
        recorded = self.records.get(subject)
        current = self.entries.get(subject)
        tx = (current or {}).get("source_transaction_id") or (subject[5:] if subject.startswith("subj-") else None)
        images = self._images_of(subject, recorded.reference_image_ref if recorded else None, tx)
        removed: list[str] = []
        for ref, store in images:
            try:
                store.delete(ref)
            except transactional.TransactionGivenUp:  # at the stop: the forget is read again, not failed
                raise
            except Exception as exc:  # noqa: BLE001 - S3 or disk: the image stays, so the forget is not done
                left = self._left_after(removed, [r for r, _ in images[len(removed) :]], current is not None)
                raise Failed(
                    "image_store_unavailable",
                    f"{ref} was not deleted from {store.where()} ({type(exc).__name__}); {left}; "
                    "issue the command again",
                ) from None
            removed.append(ref)
        try:
            faces = self.rekognition.forget(subject) if self.rekognition is not None else 0
        except RekognitionError as exc:
            failed = rekognition_failed(exc)
            if not removed:
                raise failed from None
            left = self._left_after(removed, [], current is not None)
            raise Failed(failed.kind, f"{exc.code}; {left}; issue the command again") from None
        self.records.pop(subject, None)
        self.entries.pop(subject, None)
        existed = bool(current or removed or faces)
        audit.update(category=(current or {}).get("category"), transaction_id=tx)
        log.info("forgot %s (%d images, %d indexed faces)", subject, len(removed), faces)
        return [
            Out(WATCHLIST, subject.encode(), None),
            self._audit(
                **audit,
                outcome="DONE" if existed else "UNCHANGED",
                reason="forgotten" if existed else "nothing known about this subject",
                details={
                    "images_deleted": str(len(removed)),
                    "rekognition_faces_deleted": str(faces),
                    "was_enrolled": str(current is not None).lower(),
                },
            ),
        ]

    def _left_after(self, removed: list[str], images: list[str], enrolled: bool) -> str:
        """What a failed forget did and left, for its audit: the images deleted, those still there, the Rekognition
        faces and the entry (both still there: they go after the images)."""
        left = [*images]
        if self.rekognition is not None:
            left.append("its Rekognition faces")
        if enrolled:
            left.append("its watchlist entry")
        return f"{len(removed)} images deleted, left: {', '.join(left) or 'nothing'}"

    @staticmethod
    def _why(exc: Exception) -> str:
        """What an audit says of a failure: a refusal's kind and reason, else only the error's type."""
        return f"{exc.kind}: {exc.reason}" if isinstance(exc, InvalidRecord) else type(exc).__name__

    def _images_of(self, subject: str, recorded: str | None, tx: str | None) -> list[tuple[str, ImageStore]]:
        """Every image of ``subject`` with the store that holds it, found before anything is deleted: its reference
        image where its entry recorded it, and in the current store and each of :func:`former_stores` (the image
        store or its bucket may have changed since they were written) the one under its key, the sale's snapshot
        and the bot's ``checkout <tx>`` pictures of it (the buyer's face), and the alert snapshots retained for it.
        A store that cannot be reached or searched fails the forget ``image_store_unavailable`` with nothing
        changed, never reported done with an image left behind."""
        found: dict[str, ImageStore] = {}
        if recorded:
            try:
                found[recorded] = self.store_of(recorded)
            except ImageStoreUnavailable as exc:
                raise Failed("image_store_unavailable", f"reference image not deleted: {exc}") from None
            except InvalidRecord:  # no ref of any store (file: or s3://): no image of ours to delete
                log.warning("the entry of %s records a reference image ref of no store: not deleted", subject)
        keys = (
            (checkout_image_key(tx), inspection_image_key(tx), checkout_image_key(f"{tx}{LEGACY_INSPECTION}"))
            if tx
            else ()
        )
        for store in [self.store, *self.former()]:
            try:
                for ref in self._images_in(store, subject, keys):
                    found.setdefault(ref, store)
            except transactional.TransactionGivenUp:  # at the stop: the forget is read again, not failed
                raise
            except Exception as exc:  # noqa: BLE001 - S3 or disk: an image may be there, so nothing is deleted
                if missing := missing_bucket(exc, store):
                    raise Failed(
                        "image_store_missing", f"{missing}; nothing deleted, issue the command again"
                    ) from None
                raise Failed(
                    "image_store_unavailable",
                    f"the subject's images could not be looked for in {store.where()} ({type(exc).__name__}); "
                    "nothing deleted, issue the command again",
                ) from None
        return list(found.items())

    @staticmethod
    def _images_in(store: ImageStore, subject: str, keys: tuple[str, ...]) -> list[str]:
        """The refs of ``subject``'s images in ``store``: its reference image under its key, the snapshots under
        ``keys``, and the alert snapshots retained for it."""
        found = [store.find("reference", subject), *(store.find("checkout", key) for key in keys)]
        retained = [ref for ref, reason in store.retained().items() if retained_subject(reason) == subject]
        return [ref for ref in found if ref] + retained

    # --- records -----------------------------------------------------------------------------------
    def _audit(self, **fields: Any) -> Out:
        event = AuditEvent(**fields)
        self.done.add(event.audit_id)
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


class WatchlistService:
    """Kafka wiring around ``WatchlistCore``: startup replay, transactional consume-process-produce."""

    heartbeat: metrics.Heartbeat | None = None
    """Beaten every loop turn and while a transaction is retried (``/healthz``); set by ``__init__``."""
    STORE_BACKOFF = Backoff(initial_s=1.0, maximum_s=30.0)
    """Between reads of an alert whose snapshot the image store could not retain or delete (:class:`StoreAway`):
    at most 30 s, well inside the consumer's poll interval."""
    COLLECTION_BACKOFF = Backoff(initial_s=1.0, maximum_s=60.0)
    """Between tries to create the Rekognition collection at the start while Rekognition is away or throttling."""
    _store_tries = 0
    """Reads of the alert in hand that met the image store away, since one went through."""
    _store_problem: str | None = None
    """What ``/readyz`` says while an alert waits for the image store."""
    _rekognition_problem: str | None = None
    """What ``/readyz`` says while the collection is not created yet: cleared only once CreateCollection worked, so the
    beat after each failed call (:meth:`_watch_rekognition`) keeps saying it between the backoff's beats."""
    _held: dict[tuple[str, int], str] = {}
    """The snapshot of each alert waiting for the image store, by its partition: the purge keeps them (set by
    ``__init__``; one past its retention was otherwise deleted by a sweep due meanwhile, and its alert then failed
    ``missing_image`` once S3 was back)."""

    def __init__(self, settings: Settings, core: WatchlistCore | None = None) -> None:
        from infra.clients import kafka as kafka_clients

        self.settings = settings
        self.prefix = settings.kafka.topic_prefix
        self.group = settings.kafka.group(settings.faces.service_group)
        self.core = core or WatchlistCore(settings)
        key = settings.webex.command_signing_key
        if not (key and key.get_secret_value()):
            log.error("CG_WEBEX__COMMAND_SIGNING_KEY is not set: every watchlist command is refused")
        self.consumer = kafka_clients.consumer(
            settings, self.group, kafka_clients.READ_COMMITTED, auto_offset_reset="earliest"
        )
        self.producer = kafka_clients.producer(settings, transactional_id=f"{self.group}-tx", linger_ms=5)
        self.topics = {
            COMMANDS.full_name(self.prefix): self.core.on_command,
            ALERTS.full_name(self.prefix): self.core.on_alert,
        }
        self._stop = StopRequest()
        """Set by SIGTERM/SIGINT (:meth:`stop`), timed at the signal's arrival (``stop_on_signals`` in :func:`main`)."""
        self._next_purge = 0.0
        self._held = {}
        self.heartbeat = metrics.Heartbeat()
        self.heartbeat.stale_s = health_limit_s(settings, self.heartbeat.stale_s)
        self._watch_rekognition()
        self._watch_image_stores()
        self._processing = metrics.PROCESSING_SECONDS.labels(PROCESS)

    def _watch_rekognition(self) -> None:
        """Beat ``/healthz`` after each Rekognition call that ends, answered or failed: each is bounded
        (:func:`health_limit_s`), and a command of several (ListFaces pages, then IndexFaces or DeleteFaces) was taken
        for a hang, the service restarted by the supervisor and the command read again. Once the stop is asked, a call
        under way is given up at the stop's deadline (``TransactionGivenUp``), its command not committed, read again at
        the next start: a call with botocore's retries (up to about a minute) ran on past the supervisor's SIGKILL."""
        if self.core.rekognition is not None:
            self.core.rekognition.progress = self._aws_call_ended
            self.core.rekognition.give_up_by = self._exit_by

    def _watch_image_stores(self) -> None:
        """Beat ``/healthz`` after each S3 call of the image stores that ends, answered or failed, as after each
        Rekognition call: ``/healthz``'s limit outlasts one call (:func:`health_limit_s`), and before, a command of
        several slow ones (a ``forget`` searching the current and former buckets, deleting and untagging) outlasted it
        together and the supervisor restarted a service only waiting for S3. Once the stop is asked, a call under way
        is given up at the stop's deadline as a Rekognition call is (:meth:`WatchlistCore.give_up_store_calls_by`):
        one call (up to 62 s by default) ran on past the supervisor's SIGKILL, which killed the service mid-command."""
        self.core.progress = self._aws_call_ended
        self.core.give_up_store_calls_by(self._exit_by)

    def _aws_call_ended(self) -> None:
        """Progress, saying what ``/readyz`` says meanwhile (the collection not created yet, the image store away)."""
        self._beat(self._rekognition_problem or self._store_problem)

    def stop(self, *_: object) -> None:
        self._stop.set()

    def _exit_by(self) -> float | None:
        """Once the stop is asked, when its last Kafka calls are given up (a transaction's commit hanging on Kafka
        after the SIGTERM, or the consumer's close, ran past the supervisor's SIGKILL); None before."""
        return self._stop.exit_by(self.settings.supervisor.stop_timeout_s)

    def replay(self, spec: TopicSpec, apply, stall_s: float = STARTUP_READ_STALL_S) -> int:
        """Read a topic from its start to its end (committed records only) into ``apply(key, value)``;
        how many records were read.

        ``audit`` holds a year of events: the read goes on while records keep coming and fails only after
        ``stall_s`` without one (a fixed deadline would fail every start once the topic is long enough, and
        the supervisor's restarts would read it again from the start), and each record beats the heartbeat,
        so ``/healthz`` does not call a long read a hung service."""
        from infra.clients.control_topics import read_control_topics

        count = 0

        def one(_topic: str, key: bytes | None, value: bytes | None) -> None:
            nonlocal count
            self._beat(None)  # reading is progress
            apply(key, value)
            count += 1

        # each metadata call before the first record beats too: a few slow ones outlast the heartbeat
        read_control_topics(
            self.settings,
            one,
            timeout_s=stall_s,
            specs=(spec,),
            stall_s=stall_s,
            beat=lambda: self._beat(None),
            stop=self._stop,  # ends the read at its next call once the stop is asked
        )
        return count

    def run(self) -> None:
        from confluent_kafka import TopicPartition

        try:
            self._ensure_collection()
            if self._stop.is_set():
                return
            # each start-up call ends by the stop's deadline, as the loop's Kafka calls do
            loaded = transactional.bounded(
                lambda: self.replay(WATCHLIST, self.core.load),
                "the start-up read of watchlist",
                self._exit_by,
                "watchlist-replay",
            )
            log.info("watchlist replayed: %d records, %d subjects", loaded, len(self.core.entries))
            self._beat(None)
            audited = transactional.bounded(
                lambda: self.replay(AUDIT, lambda key, _value: self.core.load_audit(key)),
                "the start-up read of audit",
                self._exit_by,
                "watchlist-replay",
            )
            log.info("audit replayed: %d records", audited)
            self._beat(None)
            transactional.init_transactions(self.producer, self._exit_by)
            self.consumer.subscribe(list(self.topics), on_revoke=self._on_revoke)
            while not self._stop.is_set():
                self._beat(self._store_problem)
                self.producer.poll(0)  # serves the producer's callbacks, an MSK IAM token refresh among them
                self._maybe_purge()
                msg = self.consumer.poll(0.5)
                if msg is None:
                    continue
                if (error := msg.error()) is not None:
                    log.warning("consumer error: %s", transactional.error_named(error))  # never its words
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                assert topic is not None and partition is not None and offset is not None, "a record has all three"
                src = transactional.source_of(msg)
                started = time.perf_counter()
                try:
                    outs = self.topics[topic](src, clock.now_ms())
                except StoreAway as away:  # nothing done: read again after a backoff, the offset not committed
                    # not timed: the input is timed once, by the read that does it (the backoff was timed as work)
                    self._held = {**self._held, (topic, partition): away.ref}
                    self._wait_for_store(TopicPartition(topic, partition, offset), away)
                    continue
                if topic == ALERTS.full_name(self.prefix):
                    self._held = {tp: ref for tp, ref in self._held.items() if tp != (topic, partition)}
                    if not self._held:  # an alert of another partition may still wait for the image store
                        self._store_tries, self._store_problem = 0, None
                self._publish(outs, [TopicPartition(topic, partition, offset + 1)])
                self._processing.observe(time.perf_counter() - started)
        except transactional.STOP_ERRORS as exc:
            if not self._stop.is_set():
                raise
            transactional.given_up_at_stop("watchlist service", exc)
        finally:
            self._close(sys.exc_info()[1])  # the loop's own error, if one ends it, is what is raised

    def _close(self, ended_by: BaseException | None = None) -> None:
        """The consumer's close (it leaves the group), given up at the stop's deadline: with Kafka down it waited on
        the brokers as long as it took, past the supervisor's SIGKILL. No offset is committed by it (each input's is
        committed after its transaction), so nothing is lost. Its error once the stop is asked, or
        after the loop's own error (``ended_by``, which is raised instead), is a WARNING."""
        deadline = self._exit_by() or exit_deadline(self.settings.supervisor.stop_timeout_s)
        try:
            transactional.close_consumer(
                "watchlist service", self.consumer, deadline, self._stop.is_set, ended_by, "watchlist-service-close"
            )
        finally:
            self.core.close()

    def _ensure_collection(self) -> None:
        """Create the Rekognition collection before anything is read (with that backend). Throttling, a 5xx or no
        connection is waited out: tried again after :attr:`COLLECTION_BACKOFF`, ``/readyz`` saying "Rekognition
        unreachable" meanwhile; the service stopped for good at its start before. An error of the setup that no
        wait heals (access denied, credentials, a parameter refused) stops it, logged with what to fix."""
        tries = 0
        while not self._stop.is_set():
            try:
                self.core.ensure_collection()
            except RekognitionError as exc:
                if not exc.transient:
                    log.error("the Rekognition collection cannot be created, stopping: %s", exc)
                    raise
                self._rekognition_problem = "Rekognition unreachable"
                delay = self.COLLECTION_BACKOFF.delay(tries)
                tries += 1
                log.warning(
                    "creating the Rekognition collection failed (%s, try %d): trying again in %.1f s",
                    exc.code,
                    tries,
                    delay,
                )
                self._pause(delay, self._rekognition_problem)
            else:
                self._rekognition_problem = None
                self._beat(None)
                return

    def _pause(self, delay: float, problem: str | None) -> None:
        """Wait ``delay`` seconds (or until stopped), beating ``/healthz`` with ``problem`` for ``/readyz``."""
        end = time.monotonic() + delay
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            self._beat(problem)
            time.sleep(min(1.0, left))

    def _on_revoke(self, _consumer: Any, partitions: list) -> None:
        """A partition taken by a rebalance takes its waiting alert along (its new owner reads it): with no alert left
        waiting, ``/readyz`` no longer says "image store unreachable" (it stayed 503 until another alert came) and the
        purge no longer keeps that snapshot for this instance."""
        gone = {(p.topic, p.partition) for p in partitions}
        self._held = {tp: ref for tp, ref in self._held.items() if tp not in gone}
        if not self._held:
            self._store_tries, self._store_problem = 0, None
            self._beat(None)

    def _wait_for_store(self, where: Any, away: StoreAway) -> None:
        """Rewind the alert's partition to it and wait a backoff (beating ``/healthz``, ``/readyz`` saying why), so the
        next poll reads it again; commands on the other topic go on meanwhile. A partition taken away by a rebalance
        is read from its committed offset by its new owner, this alert included."""
        from confluent_kafka import KafkaException

        try:
            self.consumer.seek(where)
        except KafkaException as exc:
            log.warning("rewinding to the alert at offset %d failed (%s): its new owner reads it", where.offset, exc)
            self._on_revoke(self.consumer, [where])  # not ours any more: nothing of ours waits on it
            return
        delay = self.STORE_BACKOFF.delay(self._store_tries)
        self._store_tries += 1
        self._store_problem = "image store unreachable"
        log.warning("%s; the alert is read again in %.1f s (try %d)", away, delay, self._store_tries)
        self._pause(delay, self._store_problem)

    def _maybe_purge(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + self.settings.faces.retention_purge_interval_s
        outs = self.core.purge(clock.now_ms(), keep=frozenset(self._held.values()))
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
            beat=self._beat,
            stopping=self._stop.is_set,
            exit_by=self._exit_by,
        )

    def _beat(self, problem: str | None) -> None:
        if self.heartbeat is not None:  # None only for a service built without __init__ (tests)
            self.heartbeat.beat(problem)


def main(log_level: str | None = None) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, "watchlist")
    service = WatchlistService(settings)
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
    """Apply the signed watchlist commands (the bot's enroll, forget, renew; the case service's learn), keep alert
    snapshots and purge the rest, until SIGTERM/Ctrl-C."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
