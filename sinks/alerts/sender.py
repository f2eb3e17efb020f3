"""Alerts from Kafka to people: one e-mail and one Webex message per alert, with the snapshot attached.

Input: ``alerts`` (Alert, key = alert_id). Output: the channels of ``Settings.alerts.channels`` (``email``
by SMTP or Amazon SES, ``webex`` to the rooms that get the alert's store: every room of ``CG_WEBEX__ROOM_STORES``
that names it, and ``CG_WEBEX__ROOM_ID`` unless that map limits it to other stores, each room a channel of its own,
:func:`webex_rooms`; an alert no room gets is not sent to Webex, counted ``unrouted``) and ``dead_letters`` (stage
``alert-sender``) for alerts that cannot be decoded or used (an id that is not an alert id, an event time that is
no date) or that a channel keeps refusing.

How nothing is lost or doubled:

- **Ledger.** A SQLite file records ``(alert_id, channel)`` once the channel accepted the alert; a
  replayed or re-sent alert skips the channels already done, across restarts. Before each Webex send
  the ledger also records the *intent*: after a crash between "the channel accepted" and "the ledger
  says so", or a post without an answer (timeout, 5xx), Webex is asked whether the room already has the alert
  (its id is in every message) before posting again; a group space, which Webex lists for a bot only as the
  messages mentioning it, is searched by the bot's mention of itself that every alert message carries. SMTP
  has no such question, so that window resends the mail with the same Message-ID, which mail clients show
  once: at-least-once for mail, never lost.
- **Independent channels.** Each channel has its own scheduler and ``concurrency`` sending threads (the Webex
  rooms' channels share them, at least one each, and one client: :func:`sending_threads`): a
  slow or failing channel only delays its own sends. 429 pauses that channel for ``Retry-After`` (a Webex 429 every
  room's channel, whether a send, a case card or the eraser's delete met it: the bot is rate limited, not the room,
  :class:`RateLimit`).
  A channel that is *down* (refused or dropped connections, timeouts, DNS failures, SMTP 4xx, HTTP
  5xx) says nothing about the alert, so it spends none of the alert's attempts: the whole channel
  pauses, then one probe at a time tries again with capped exponential backoff until it answers, for
  as long as each alert's ``deadline_s`` allows (an outage of minutes delays mail, it loses none).
  Other errors back off exponentially (with jitter); after ``max_attempts`` of those, a permanent
  refusal (HTTP 4xx, SMTP 5xx) or ``deadline_s``, the alert's channel is given up and a dead letter
  says why (``python -m producers.redrive --stage alert-sender`` sends dead-lettered alerts again).
- **Offsets.** An alert's offset is committed only when every channel delivered it or its dead letter
  is confirmed by Kafka (and recorded in the ledger by the record's position), and only in offset order per
  partition; a crash replays from there and the ledger turns the replay into no-ops, a dead-lettered record's too
  (no second dead letter, no other try; a re-drive is a new record, sent again).

Replies in Webex to case verdicts the case service refused after the bot answered "Sent" go out from a thread of
their own, fed by the eraser's read of ``audit`` (sinks/alerts/notices.py; once each, through the ledger).

Metrics (``infra.metrics``, stage ``alert-sender``): alerts in (kind ``alert``, or ``invalid`` for one that
cannot be decoded), alerts out (every channel delivered or already had it; ``refusal_reply`` for those replies),
dead letters by error kind,
``cg_channel_deliveries`` by channel and result -- ``delivered``, ``failed`` (each failed send), ``retried``
(queued again after a failure), ``dead_lettered`` (given up: the alert is dead-lettered), ``already_sent``
(the ledger says so), ``already_dead_lettered`` (read again after its dead letter was confirmed, before its
offset commit: skipped, as the ledger records each confirmed dead letter by its record's position), ``withheld``
(its subject is forgotten: never sent, see ``ChannelWorker._withhold``),
``unrouted`` (channel ``webex``: no room gets the alert's store; a room's own channel is ``webex:<room id>``) -- and
the queue depth per channel plus ``unfinished`` alerts. ``/readyz`` turns 503 (and
``/healthz`` reads "degraded") while a channel is down ("email unreachable"), a dead letter cannot be delivered
("Kafka unreachable") or the eraser is held up (Webex refusing deletes, the audit topic away); ``/healthz`` turns
503 when the loop hangs or the eraser thread has died.

Run: ``python -m sinks.alerts.sender`` (settings from ``CG_*``; see README "Alerts and the Webex bot").
Only ids and counts are logged, never message bodies, images or secrets.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import random
import re
import signal
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar, get_args

import typer
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from infra import metrics
from infra.clients import kafka as kafka_clients
from infra.clients.webex import (
    MAX_MARKDOWN_BYTES,
    RETRY_AFTER_LIMIT_S,
    Attachment,
    WebexClient,
    WebexError,
    asked_wait,
)
from infra.clock import now_ms
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import (
    StopRequest,
    all_done_by,
    chance_left,
    done_by,
    exit_deadline,
    stop_asked_at,
    stop_on_signals,
    time_left,
)
from infra.retry import Backoff, call_with_retries
from infra.settings import AlertSettings, LedgerJournalMode, Settings, get_settings
from schemas.codec import codec
from schemas.errors import DELIVERY_FAILED, CheckoutGuardError, InvalidRecord
from schemas.identifiers import ALERT_ID_RE, check
from schemas.records import AuditEvent, DeadLetter, check_alert_numbers
from schemas.topics import ALERTS, AUDIT, DAY_MS, DEAD_LETTERS, TRANSACTIONS, TopicSpec, readable_for_ms
from sinks.alerts import ledger_schema
from sinks.alerts.erase import FORGET_GRACE_MS, Eraser, LedgerClosed
from sinks.alerts.mail import Mailer, MailError, SesMailer, SmtpMailer, build_email
from sinks.alerts.message import AlertText, case_card, case_url, describe, local_time
from sinks.alerts.notices import Notice, Notifier

log = logging.getLogger(__name__)

STAGE = "alert-sender"
DEFAULT_GROUP_ID = "checkout-guard-alert-sender"

ImageLoader = Callable[[str], bytes]
_T = TypeVar("_T")


CARD_REFUSED = frozenset({400, 413})
"""Webex's answers to a card it will not take as it is (its content, its size): the thread gets a note without it."""

# --------------------------------------------------------------------------- ledger

POST_FIELDS = ("subject_id", "transaction_id")
"""What a post keeps of its alert: who and which sale it shows (for ``forget``)."""

LEDGER_MARGIN_MS = DAY_MS
"""Kept past :func:`ledger_keep_ms`'s reckoning: a clock a little off, a record's time a little before ours."""
PRUNE_BATCH_ROWS = 500
"""Rows :meth:`Ledger.prune` deletes per commit: the database is locked for milliseconds, not for the whole prune."""
PRUNE_MAX_BATCHES = 20
"""Commits per table per prune; a ledger grown for years before pruning sheds its rows over a few turns."""

_WriteItem = tuple[list[tuple[str, tuple]], threading.Event, list[BaseException], list[int]]
"""A write handed to the ledger's writer: its statements, set once committed, its error, the rows each changed."""


LEDGER_TOPICS = (ALERTS, TRANSACTIONS, DEAD_LETTERS)
"""The topics whose records the ledger's rows guard (:func:`ledger_keep_ms`): their retention bounds the prune."""
RETENTION_KEYS = ("retention.ms", "segment.ms")
"""What of :data:`LEDGER_TOPICS` is read from Kafka at start (:meth:`AlertSender.topic_retentions`)."""
RETENTIONS_REREAD_S = 3600.0
"""How often the retentions read are read again (a topic changed while the sender runs)."""

TopicRetentions = dict[str, dict[str, int]]
"""Topic name (with its prefix) -> :data:`RETENTION_KEYS` -> ms, as Kafka has them."""


def ledger_keep_ms(settings: Settings, retentions: TopicRetentions | None = None) -> int | None:
    """How long a delivery or a confirmed dead letter stays in the ledger: while a record of its alert may still be
    read, so that it is not sent or dead-lettered again. The alert's record is readable for ``alerts``' retention
    plus a segment's age; a new record of the same alert may come later: a re-drive, while ``dead_letters`` keeps the
    dead letter, or the job deciding its transaction again, while ``transactions`` keeps it. Plus a margin. The
    eraser does not read these rows: it finds a forgotten subject's messages in the posts it keeps itself.

    ``retentions``: the ``retention.ms`` and ``segment.ms`` of :data:`LEDGER_TOPICS` as Kafka has them now: an
    operator who raised ``alerts``' retention past the code's 30 days made the ledger forget alerts that could still
    be read, and sent again. What it does not hold is the code's (the spec's; the dead letters' setting). ``None``:
    a topic keeps its records for ever (``retention.ms`` -1), so no row may go. Pure."""
    read = retentions or {}

    def readable(spec: TopicSpec, retention_ms: int | None = None) -> int | None:
        found = read.get(spec.full_name(settings.kafka.topic_prefix), {})
        retention_ms = found.get("retention.ms", retention_ms)
        if retention_ms is not None and retention_ms < 0:
            return None
        return readable_for_ms(spec, retention_ms, found.get("segment.ms"))

    alerts, transactions = readable(ALERTS), readable(TRANSACTIONS)
    dead_letters = readable(DEAD_LETTERS, int(settings.kafka.dead_letter_retention_days * DAY_MS))
    if alerts is None or transactions is None or dead_letters is None:
        return None
    return alerts + max(transactions, dead_letters) + LEDGER_MARGIN_MS


def kept_for(keep_ms: int | None) -> str:
    """``52.0 days``, or ``for ever`` (None: a topic keeps its records for ever), for log lines. Pure."""
    return "for ever (a topic keeps its records for ever)" if keep_ms is None else f"{keep_ms / DAY_MS:.1f} days"


def parse_retentions(configs: dict[str, dict[str, str]], topics: Sequence[str]) -> TopicRetentions:
    """:data:`RETENTION_KEYS` of ``topics`` as ms, from :func:`infra.clients.kafka.topic_configs`' answer; a topic
    without ``retention.ms`` or a value that is no whole number: ``ValueError`` (not read). Pure."""
    out: TopicRetentions = {}
    for topic in topics:
        found = configs.get(topic, {})
        if "retention.ms" not in found:
            raise ValueError(f"Kafka gave no retention.ms of {topic}")
        try:
            out[topic] = {key: int(value) for key, value in found.items() if key in RETENTION_KEYS}
        except ValueError:
            raise ValueError(f"Kafka gave a retention of {topic} that is no number of ms") from None
    return out


def ledger_path(settings: Settings) -> Path:
    """The delivery ledger's file: ``CG_ALERTS__LEDGER_PATH``, else ``<stack dir>/alerts/<prefix>ledger.sqlite3``."""
    default = Path(settings.stack_dir) / "alerts" / f"{settings.kafka.topic_prefix}ledger.sqlite3"
    return settings.alerts.ledger_path or default


class Ledger:
    """Durable ``(alert_id, channel) -> sending | sent``; every committed row survives a killed process.

    Writes are group-committed by one writer thread: a sending thread's ``mark_*`` returns only once
    its row is committed, and every row waiting at that moment shares the commit (hundreds of sends
    per second would otherwise queue on one commit each). ``journal_mode`` (``CG_ALERTS__LEDGER_JOURNAL_MODE``):
    ``wal`` on a local disk, where ``synchronous=NORMAL`` keeps every committed row across a process crash (SIGKILL)
    and only an OS crash can lose the last milliseconds of rows; a rollback journal (``delete``...) on a network file
    system, where WAL's shared-memory index is not safe, with ``synchronous=FULL``, which in that mode is what keeps
    an OS crash from corrupting the file (one more sync per group commit). The mode is set after the layout check, so
    a file refused is left as it was.
    """

    SENDING_SQL = "INSERT OR IGNORE INTO deliveries VALUES (?, ?, 'sending', ?, NULL)"
    SENT_SQL = (
        "INSERT INTO deliveries VALUES (?, ?, 'sent', ?, ?) ON CONFLICT(alert_id, channel) "
        "DO UPDATE SET state='sent', at_ms=excluded.at_ms, detail=excluded.detail"
    )
    POST_SQL = "INSERT OR IGNORE INTO posts VALUES (?, ?, ?, ?, ?, ?, ?)"
    FORGOTTEN_SQL = " UNION ALL ".join(
        "SELECT p.message_id, p.channel, f.subject_id FROM forgets f JOIN posts p "
        f"ON p.{column} = f.{column} AND coalesce(p.alert_ms, p.posted_ms) <= f.until_ms"
        for column in ("subject_id", "transaction_id")  # two indexed joins (an OR join scans both tables)
    )
    AGED_SQL = "SELECT message_id, channel FROM posts WHERE posted_ms < ?"
    WITHHELD_SQL = (
        "INSERT INTO deliveries VALUES (?, ?, 'withheld', ?, ?) ON CONFLICT(alert_id, channel) "
        "DO UPDATE SET state='withheld', at_ms=excluded.at_ms, detail=excluded.detail"
    )
    FORGOTTEN_ALERT_SQL = (
        "SELECT coalesce(subject_id, transaction_id) FROM forgets "
        "WHERE (subject_id = ? OR transaction_id = ?) AND until_ms >= ? LIMIT 1"
    )

    def __init__(self, path: Path, journal_mode: LedgerJournalMode = "wal") -> None:
        if journal_mode not in get_args(LedgerJournalMode):  # it goes into a PRAGMA
            raise ValueError(f"no journal mode for the ledger: {journal_mode!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        try:  # a file of an earlier layout: migrated; an unknown one: refused, left as it was
            ledger_schema.prepare(self._db, path)
            mode = self._db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={'NORMAL' if journal_mode == 'wal' else 'FULL'}")
        except BaseException:
            self._db.close()
            raise
        if mode != journal_mode:
            log.warning("alert sender: the delivery ledger %s kept journal mode %s, not %s", path, mode, journal_mode)
        self._lock = threading.Lock()
        self._writes: queue.SimpleQueue[_WriteItem | None] = queue.SimpleQueue()
        self._closed = False
        self._db_closed = False
        self._closing = threading.Lock()
        """Orders a write's hand-over with :meth:`close`: none is queued behind the writer's end, to wait forever."""
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> Ledger:
        return cls(ledger_path(settings), settings.alerts.ledger_journal_mode)

    def state(self, alert_id: str, channel: str) -> str | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT state FROM deliveries WHERE alert_id=? AND channel=?", (alert_id, channel)
            ).fetchone()
        return row[0] if row else None

    def states(self, alert_ids: list[str]) -> dict[tuple[str, str], str]:
        """``(alert_id, channel) -> state`` of every row of these alerts, in few queries."""
        out: dict[tuple[str, str], str] = {}
        unique = list(dict.fromkeys(alert_ids))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            with self._reading() as db:
                rows = db.execute(
                    f"SELECT alert_id, channel, state FROM deliveries WHERE alert_id IN ({marks})", chunk
                ).fetchall()
            out.update({(a, c): st for a, c, st in rows})
        return out

    def mark_sending(self, alert_id: str, channel: str) -> None:
        self._write((self.SENDING_SQL, (alert_id, channel, now_ms())))

    def mark_sent(
        self,
        alert_id: str,
        channel: str,
        detail: str | None,
        posted: tuple[str, ...] = (),
        alert: dict[str, Any] | None = None,
        alert_ms: int | None = None,
    ) -> None:
        """The alert is delivered on ``channel``; ``posted``: the ids of the messages that delivered it, kept
        (with the alert's subject, transaction and ``alert_ms``, when it was made) in the same commit so they
        can be deleted later."""
        at = now_ms()
        fields = alert or {}
        rows = [
            (self.POST_SQL, (mid, alert_id, channel, *(fields.get(k) for k in POST_FIELDS), alert_ms, at))
            for mid in posted
        ]
        self._write((self.SENT_SQL, (alert_id, channel, at, detail)), *rows)

    def mark_withheld(
        self,
        alert_id: str,
        channel: str,
        forgotten: str,
        posted: tuple[str, ...] = (),
        alert: dict[str, Any] | None = None,
        alert_ms: int | None = None,
    ) -> None:
        """The alert is not sent on ``channel``, for good: it shows ``forgotten``, a forgotten subject (or the sale
        one was enrolled from). Kept longer than the forget itself, so a re-drive in a year is not sent either.
        ``posted``: copies an earlier try without an answer posted after all, kept as :meth:`mark_sent` keeps
        its posts (in the same commit), so the forget deletes them."""
        at = now_ms()
        fields = alert or {}
        rows = [
            (self.POST_SQL, (mid, alert_id, channel, *(fields.get(k) for k in POST_FIELDS), alert_ms, at))
            for mid in posted
        ]
        self._write((self.WITHHELD_SQL, (alert_id, channel, at, forgotten)), *rows)

    def mark_dead_lettered(self, position: str, alert_id: str | None, error_kind: str) -> None:
        """The record at ``position`` (``topic:partition:offset``) is dead-lettered and Kafka confirmed it: its
        re-read is skipped (:meth:`dead_lettered`), not dead-lettered and tried again."""
        self._write(
            ("INSERT OR IGNORE INTO dead_letters VALUES (?, ?, ?, ?)", (position, alert_id, error_kind, now_ms()))
        )

    def dead_lettered(self, positions: list[str]) -> set[str]:
        """Which of ``positions`` were dead-lettered already, in few queries."""
        out: set[str] = set()
        unique = list(dict.fromkeys(positions))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            with self._reading() as db:
                rows = db.execute(f"SELECT position FROM dead_letters WHERE position IN ({marks})", chunk).fetchall()
            out.update(r[0] for r in rows)
        return out

    def forgotten(self, alert: dict[str, Any], alert_ms: int | None) -> str | None:
        """The forgotten subject (or source sale) an alert shows, if a forget covers it as it covers the alert's
        posts (:data:`FORGOTTEN_SQL`: made before the forget's ``until_ms``; not known when made: now)."""
        made = alert_ms if alert_ms is not None else now_ms()
        with self._reading() as db:
            row = db.execute(
                self.FORGOTTEN_ALERT_SQL, (alert.get("subject_id"), alert.get("transaction_id"), made)
            ).fetchone()
        return row[0] if row else None

    def record_forgets(
        self, forgets: list[tuple[str, str | None, str | None, int]], enrolments: Sequence[tuple[str, int]] = ()
    ) -> None:
        """``(audit id, subject, source transaction, forgotten at ms)`` of each forget: the posts of alerts made
        before it, or within :data:`FORGET_GRACE_MS` after, become due. ``(subject, enrolled at ms)`` of each
        enrolment: a subject enrolled again (the same ``subj-<tx>``) ends its forgets' grace there, so the new
        entry's alerts stay. One commit."""
        statements: list[tuple[str, tuple]] = [
            ("INSERT OR IGNORE INTO forgets VALUES (?, ?, ?, ?, ?)", (*f, f[3] + FORGET_GRACE_MS)) for f in forgets
        ]
        statements += [
            ("UPDATE forgets SET until_ms = min(until_ms, ?) WHERE subject_id = ? AND at_ms <= ?", (at, subject, at))
            for subject, at in enrolments
        ]
        if statements:
            self._write(*statements)

    def record_notices(self, notices: Sequence[Notice]) -> None:
        """Replies owed for refused Webex verdicts (sinks/alerts/notices.py), pending; one already recorded (its audit
        event read again) is left as it is, posted or not. One commit."""
        if notices:
            self._write(
                *(
                    (
                        "INSERT OR IGNORE INTO notices VALUES (?, ?, ?, ?, 'pending', ?, NULL)",
                        (n.notice_id, n.room_id, n.person, n.text, n.at_ms),
                    )
                    for n in notices
                )
            )

    def pending_notices(self, limit: int) -> list[Notice]:
        """The oldest ``limit`` replies not posted yet (nor under way, nor given up)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT notice_id, room_id, person, text, at_ms FROM notices WHERE state = 'pending' "
                "ORDER BY at_ms LIMIT ?",
                (limit,),
            ).fetchall()
        return [Notice(n, r, p, t, a) for n, r, p, t, a in rows]

    def mark_notice(self, notice_id: str, state: str, detail: str | None = None) -> None:
        """A reply's new state (``sending`` before its post, then ``sent``, ``unknown``, ``failed``, ``expired``, or
        ``pending`` again when Webex held it up), with the message id or why."""
        self._write(("UPDATE notices SET state = ?, detail = ? WHERE notice_id = ?", (state, detail, notice_id)))

    def latest_forget_ms(self) -> int | None:
        """When the latest forget remembered happened (a restarted eraser keeps sweeping often after it)."""
        with self._reading() as db:
            return db.execute("SELECT max(at_ms) FROM forgets").fetchone()[0]

    def due_posts(self, now_ms: int, keep_ms: int | None) -> dict[str, tuple[str, str | None]]:
        """``message id -> (channel, forgotten subject or None)`` of every post to delete: its alert names a
        forgotten subject (or the transaction that subject was enrolled from) and was made before the forget's
        ``until_ms`` (its grace, cut short by an enrolment), or it was posted more than ``keep_ms`` ago
        (``None``: kept until a forget)."""
        with self._reading() as db:
            due: dict[str, tuple[str, str | None]] = {}
            for m, c, s in db.execute(self.FORGOTTEN_SQL):
                due.setdefault(m, (c, s))
            if keep_ms is not None:
                for m, c in db.execute(self.AGED_SQL, (now_ms - keep_ms,)):
                    due.setdefault(m, (c, None))
        return due

    def drop_posts(self, message_ids: list[str], forgets_before_ms: int | None = None) -> None:
        """Forget the ids of deleted messages; and the forgets older than ``forgets_before_ms``."""
        statements: list[tuple[str, tuple]] = [("DELETE FROM posts WHERE message_id = ?", (m,)) for m in message_ids]
        if forgets_before_ms is not None:
            statements.append(("DELETE FROM forgets WHERE at_ms < ?", (forgets_before_ms,)))
        if statements:
            self._write(*statements)

    def prune(
        self,
        before_ms: int,
        batch: int = PRUNE_BATCH_ROWS,
        max_batches: int = PRUNE_MAX_BATCHES,
        stop: threading.Event | None = None,
    ) -> int:
        """Delete the deliveries and confirmed dead letters recorded before ``before_ms`` (no record they guard can
        be read again: :func:`ledger_keep_ms`), ``batch`` rows a commit so that the database is locked only briefly
        (the sends' own writes go between), at most ``max_batches`` commits a call (the rest at the next); how many
        rows went; ``stop`` set ends it between two commits. The posts and forgets are the eraser's
        (sinks/alerts/erase.py), which drops them itself. The refusal replies go too (one that old is past
        ``CG_ALERTS__DEADLINE_S``: its audit event, read again, makes none)."""
        pruned = 0
        for table in ("deliveries", "dead_letters", "notices"):
            sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE at_ms < ? LIMIT ?)"
            for _ in range(max_batches):
                if stop is not None and stop.is_set():
                    return pruned
                deleted = self._write((sql, (before_ms, batch)))
                pruned += deleted
                if deleted < batch:
                    break
        return pruned

    def _write(self, *statements: tuple[str, tuple]) -> int:
        """Run ``statements`` in one of the writer's commits; return once it is committed, with the number of rows
        they changed. :class:`LedgerClosed` once the ledger is closed: the writer has ended, and a write queued then
        waited forever."""
        done = threading.Event()
        errors: list[BaseException] = []
        changed: list[int] = []
        with self._closing:
            if self._closed:
                raise LedgerClosed(f"the delivery ledger {self.path} is closed: nothing more is recorded")
            self._writes.put((list(statements), done, errors, changed))
        done.wait()
        if errors:
            raise errors[0]
        return sum(changed)

    def _write_loop(self) -> None:
        while (first := self._writes.get()) is not None:
            batch = [first]
            while len(batch) < 1000:
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._writes.put(None)
                    break
                batch.append(item)
            try:
                with self._lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        for statements, _, _, changed in batch:
                            changed[:] = [self._db.execute(sql, params).rowcount for sql, params in statements]
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
            except Exception as exc:  # the waiting senders get it; their sends count as failed tries
                for _, _, errors, _ in batch:
                    errors.append(exc)
            for _, done, _, _ in batch:
                done.set()

    def counts(self) -> dict[tuple[str, str], int]:
        with self._reading() as db:
            rows = db.execute("SELECT channel, state, count(*) FROM deliveries GROUP BY channel, state")
            return {(c, s): n for c, s, n in rows}

    def close(self, deadline: float | None = None) -> None:
        """Commit the writes already handed over, then close; a later write raises :class:`LedgerClosed`.

        Given up at ``deadline`` (``time.monotonic()``; the alert sender's stop: 1 s before the supervisor's SIGKILL;
        without one, 10 s from now), with at least a short last chance (:func:`infra.processes.chance_left`): a write
        held by a locked database (another process's write, SQLite's 30 s busy timeout) or a slow disk kept the
        close waiting 10 s for the writer and then as long as its write took, past the stop timeout into the
        SIGKILL. A close given up leaves the writes still waiting uncommitted (as a SIGKILL would: an alert that went
        out is sent again at the next start) and the database to close with the process; a WARNING says so."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._writes.put(None)
        deadline = time.monotonic() + 10 if deadline is None else deadline
        self._writer.join(chance_left(deadline))
        if self._writer.is_alive() or not self._lock.acquire(timeout=chance_left(deadline)):
            self._db_closed = True  # no read waits on a database given up (one under way ends on its own)
            log.warning(
                "alert sender: the delivery ledger %s was not done writing before the supervisor's stop timeout; "
                "given up, the writes still waiting are not recorded (an alert that went out is sent again on restart)",
                self.path,
            )
            return
        try:
            self._db_closed = True
            self._db.close()
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The database for a read; :class:`LedgerClosed` once it is closed (sqlite3's own error said less)."""
        with self._lock:
            if self._db_closed:
                raise LedgerClosed(f"the delivery ledger {self.path} is closed: nothing more is read")
            yield self._db


# --------------------------------------------------------------------------- channels


class DeliveryError(CheckoutGuardError):
    """A send that did not go through. ``ambiguous``: it may have gone through anyway (timeout, 5xx).
    ``down``: the channel itself is unavailable (unreachable, timing out, 5xx, SMTP 4xx) -- a fact about
    the channel, not this alert, so it pauses the channel instead of spending the alert's attempts.
    ``retry_after``: the wait the answer asked for; only with ``rate_limited`` does it pause channels, otherwise (a
    Webex 409 or 423 about this message or room) this delivery alone waits it, an attempt spent."""

    def __init__(
        self,
        reason: str,
        *,
        retriable: bool = True,
        retry_after: float | None = None,
        ambiguous: bool = False,
        down: bool = False,
        rate_limited: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason, self.retriable, self.retry_after, self.ambiguous = reason, retriable, retry_after, ambiguous
        self.down = down and retriable
        self.rate_limited = rate_limited
        """A 429 of the account the channel sends with (a Webex bot's token): every channel that shares its
        :class:`RateLimit` waits ``retry_after``, not this one alone."""


class RateLimit:
    """The pause a 429 asks of one sender account, shared by its channels: Webex counts a bot's calls by its token,
    whatever the room and whatever the call (an alert message, a case card, the eraser's delete), so while one call
    waits out ``Retry-After`` the others would only meet 429s of their own. Times are on the channel workers' clock
    (:class:`Clock`; ``now`` reads it for :meth:`pause_for` and :meth:`remaining`); thread-safe."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._until = 0.0
        self._now = now

    def pause_for(self, seconds: float) -> None:
        """No channel sharing it sends for ``seconds`` from now."""
        self.pause_until(self._now() + seconds)

    def remaining(self) -> float:
        """Seconds until the pause ends (0.0: not paused)."""
        return max(0.0, self.until - self._now())

    def pause_until(self, until: float) -> None:
        """No channel sharing it sends before ``until`` (a later pause asked already stays)."""
        with self._lock:
            self._until = max(self._until, until)

    @property
    def until(self) -> float:
        """When the pause ends (0.0: never paused)."""
        with self._lock:
            return self._until


class Channel(Protocol):
    name: str
    can_check_sent: bool
    """Whether ``send(maybe_sent=True)`` can find an earlier delivery; only then is an intent row kept."""
    erasable: bool
    """Whether its messages can be deleted afterwards (``delete``): ``send`` then answers their ids, space
    separated, and the ledger keeps them for ``forget`` and the retention (sinks/alerts/erase.py)."""

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        """Deliver one alert; return a detail for the ledger (e.g. the message id). ``maybe_sent``: an
        earlier attempt may have been delivered, check before sending again when the channel can."""
        ...

    def delete(self, message_id: str) -> bool:
        """Delete a message it posted (only an ``erasable`` channel); False when it was gone already."""
        ...

    def find_sent(self, alert: dict[str, Any]) -> str | None:
        """What an earlier try may have delivered of the alert after all, as ``send`` answers it (None: nothing
        found); only a channel that ``can_check_sent``. Asked for an alert withheld after a try without an answer,
        so that a copy posted then is recorded, and deleted."""
        ...

    def close(self) -> None: ...


class EmailChannel:
    name = "email"
    can_check_sent = False  # SMTP cannot be asked what it accepted
    erasable = False  # nor can a mail be taken back

    def delete(self, message_id: str) -> bool:
        raise NotImplementedError("a mail cannot be taken back")

    def find_sent(self, alert: dict[str, Any]) -> str | None:
        return None  # SMTP cannot be asked

    def __init__(self, settings: Settings, mailer: Mailer) -> None:
        if not settings.smtp.recipients():  # else every mail went to nobody and counted as delivered
            raise ValueError("the email channel needs recipients (CG_SMTP__TO_ADDRESSES)")
        self.settings, self.mailer = settings, mailer

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        text = describe(alert, self.settings.alerts)
        smtp = self.settings.smtp
        mail = build_email(alert["alert_id"], text, smtp.from_address, smtp.recipients(), image)
        try:
            try:
                self.mailer.send(mail)
            except MailError as exc:
                if not (exc.too_large and image):
                    raise
                # The relay takes no mail this big (a snapshot of megabytes past its limit): the same mail would be
                # refused on every try and every re-drive. The alert goes without its picture, saying why.
                log.warning(
                    "email: %s refused for its size with the snapshot (%s); sending it without",
                    alert["alert_id"],
                    exc.reason,
                )
                note = f"not attached: the mail with it ({len(mail.data) / 1e6:.1f} MB) was larger than the mail "
                note += "server takes; see it from the dashboard link"
                text = replace(text, lines=(*text.lines, ("Snapshot", note)))
                mail = build_email(alert["alert_id"], text, smtp.from_address, smtp.recipients(), None)
                self.mailer.send(mail)
        except MailError as exc:
            raise DeliveryError(exc.reason, retriable=exc.retriable, down=exc.down) from exc
        return mail.message_id

    def close(self) -> None:
        self.mailer.close()


DELETE_HEALS = frozenset({401, 408, 423, 425, 429})
"""Webex answers to a delete that say nothing against the message itself (the token, a timeout, a lock, a rate
limit); 5xx and no answer heal too."""


WEBEX = "webex"


def channel_kind(name: str) -> str:
    """The kind of a channel by its name: ``webex`` for every Webex room's channel (``webex:<room id>``)."""
    return name.split(":", 1)[0]


def sending_threads(name: str, names: Sequence[str], concurrency: int) -> int:
    """The sending threads of channel ``name`` among the sender's channels ``names``: ``concurrency``; a Webex room's
    channel its share of them (at least one), as the rooms share one bot, one rate limit and one client: 32 threads
    (and connections) per room made hundreds with a few dozen rooms, all waiting on the same limit. Pure."""
    if channel_kind(name) != WEBEX:
        return max(1, concurrency)
    rooms = sum(1 for n in names if channel_kind(n) == WEBEX)
    return max(1, concurrency // max(1, rooms))


def takes(channel: Channel | Any, alert: dict[str, Any]) -> bool:
    """Whether ``channel`` sends ``alert``: a channel with ``stores`` (a Webex room limited to some stores) only
    the alerts of those stores; any other, every alert."""
    stores = getattr(channel, "stores", None)
    return stores is None or alert.get("store_id") in stores


def webex_rooms(settings: Settings) -> list[tuple[str, frozenset[str] | None]]:
    """The rooms the alerts go to, each with the stores whose alerts it gets (None: every store), as the bot scopes
    them (``CG_WEBEX__ROOM_STORES``): ``CG_WEBEX__ROOM_ID`` first (limited only if the map names it), then every room
    of the map. Pure."""
    webex = settings.webex
    rooms: list[tuple[str, frozenset[str] | None]] = []
    if webex.room_id:
        rooms.append((webex.room_id, webex.stores_of(webex.room_id)))
    rooms += [(room, frozenset(stores)) for room, stores in webex.room_stores.items() if room != webex.room_id]
    return rooms


class WebexChannel:
    """Alerts and their case cards posted to one Webex room. ``CG_WEBEX__ROOM_ID``'s channel is named ``webex`` (its
    ledger rows and posts from before the per-store rooms stay its own); another room's ``webex:<room id>``, so the
    ledger records each alert once per room and the eraser deletes each room's copies."""

    can_check_sent = True
    erasable = True
    LOOKBACK = 1000
    """Latest messages of the room searched for an alert that may already have been posted (Webex's page maximum)."""
    MENTION_LOOKBACK = 100
    """Latest messages mentioning the bot searched in a group space (Webex lists at most 100 of those)."""
    CARD_TRIES = 3
    MAX_FILE_BYTES = 100 * 1024 * 1024
    """The largest file Webex takes on a message (100 MB): a larger snapshot is left off, and the message says so."""
    """Posts of a case card while Webex answers 429 (each after its ``Retry-After``)."""

    def __init__(
        self,
        settings: Settings,
        client: WebexClient,
        has_reference: Callable[[str], bool] | None = None,
        room_id: str | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        room = room_id or settings.webex.room_id
        if not room:
            raise ValueError("the webex channel needs a room (CG_WEBEX__ROOM_ID or CG_WEBEX__ROOM_STORES)")
        self.settings, self.client, self.room_id = settings, client, room
        self.rate_limit = rate_limit or RateLimit()
        """The bot's rate limit, one for every room's channel of the same token: a 429 in one room pauses them all."""
        self.name = WEBEX if room == settings.webex.room_id else f"{WEBEX}:{room}"
        self.stores = settings.webex.stores_of(room)
        """The stores whose alerts this room gets (``CG_WEBEX__ROOM_STORES``); None: every store."""
        self.has_reference = has_reference or reference_finder_from_settings(settings)
        """Whether the image store holds a subject's reference image: the card shows it only then."""
        self._bot_id: str | None = None
        self._bot_name = "Checkout Guard"
        self._unlistable: str | None = None
        """Why the room's messages cannot be listed, once Webex said so (403): then nothing is looked up."""
        self._unlistable_lock = threading.Lock()
        self._closing = threading.Event()
        self.sleep: Callable[[float], None] = self._pause
        """The wait between a card's tries (a test replaces it)."""

    def bot_id(self) -> str:
        """The bot's own person id (``GET /people/me``, asked once): only its messages can be an alert's."""
        if self._bot_id is None:
            me = self.client.me()
            self._bot_name = str(me.get("displayName") or self._bot_name).replace(">", "").replace("|", "")
            self._bot_id = str(me.get("id") or "")
        return self._bot_id

    @staticmethod
    def marker(alert_id: str) -> str:
        return f"alert `{alert_id}`"

    @classmethod
    def carries(cls, message: dict[str, Any], alert_id: str) -> bool:
        """Whether a room message is this alert's (exactly this id: ``tx-1`` is not ``tx-10``)."""
        if cls.marker(alert_id) in (message.get("markdown") or ""):
            return True
        return re.search(rf"(?<!\S){re.escape(alert_id)}(?!\S)", message.get("text") or "") is not None

    def find_sent(self, alert: dict[str, Any]) -> str | None:
        """The ids of the alert's copies (and card) already in the room, as :meth:`send` answers them; None when
        the room holds none. Webex failing: :class:`DeliveryError`, as from :meth:`send`."""
        try:
            found = self._posted(alert["alert_id"])
        except WebexError as exc:
            raise self._delivery_error(exc) from exc
        return None if found is None else self._detail(*found)

    @staticmethod
    def _delivery_error(exc: WebexError) -> DeliveryError:
        redirected = exc.status is not None and 300 <= exc.status < 400  # refused on the way: not posted
        return DeliveryError(
            exc.reason,
            retriable=exc.retriable,
            retry_after=asked_wait(exc),  # the whole wait asked for: a shorter pause only meets another 429
            ambiguous=exc.unavailable and not redirected,
            down=exc.unavailable,
            rate_limited=exc.status == 429,  # the bot's, in every room: see RateLimit
        )

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        alert_id = alert["alert_id"]
        try:
            text = describe(alert, self.settings.alerts)
            if maybe_sent and (found := self._posted(alert_id)) is not None:
                posted, card = found
                if card is None and self.settings.alerts.webex_cards:  # the earlier try ended before its card
                    card = self._send_card(alert, text.case_id, posted[0])
                return self._detail(posted, card)
            # Kept whole: a cut marker would post the alert again (a long alert's rows are cut instead, links kept).
            # The bot's mention of itself is what lets it find its own post in a group space, which Webex lists for
            # a bot only as "messages mentioning it".
            marker = f"\n\n_{self.marker(alert_id)}_ {self.mention()}"
            limit = MAX_MARKDOWN_BYTES - len(marker.encode())
            if image and len(image) > self.MAX_FILE_BYTES:  # Webex would refuse it (413) on every try
                text, image = _without_snapshot(text, image, "is larger than Webex takes (100 MB)"), None
            attachment = Attachment.image("snapshot", image) if image else None
            try:
                sent = self.client.send_message(self.room_id, text.markdown(limit) + marker, attachment)
            except WebexError as exc:
                if exc.status != 413 or attachment is None:
                    raise
                # Refused for its size (not posted): the same post is refused again on every try and re-drive.
                log.warning("%s: %s refused for its size with the snapshot; posting it without", self.name, alert_id)
                text = _without_snapshot(text, attachment.data, "made the message larger than Webex takes")
                sent = self.client.send_message(self.room_id, text.markdown(limit) + marker, None)
        except WebexError as exc:
            raise self._delivery_error(exc) from exc
        card = self._send_card(alert, text.case_id, sent) if self.settings.alerts.webex_cards else None
        return self._detail([sent], card)

    def interrupt(self) -> None:
        """Shutdown: a card waiting out a 429 is given up at once, so its send ends (and the ledger records the
        delivered alert message) before the ledger closes."""
        self._closing.set()

    def _pause(self, seconds: float) -> None:
        if self._closing.wait(seconds):
            raise WebexError("shutting down", retriable=False)

    def mention(self) -> str:
        """Markdown mentioning the bot itself (``GET /people/me``, asked once)."""
        self.bot_id()
        return f"<@personId:{self._bot_id}|{self._bot_name}>"

    @staticmethod
    def _detail(alert_messages: list[dict[str, Any]], card: str | None) -> str | None:
        """The ledger's detail of a delivery: the alert message's id (every copy's, when earlier tries without
        an answer posted it more than once) and its card's, space separated: each is deleted on forget."""
        return " ".join(m for m in (*(a.get("id") for a in alert_messages), card) if m) or None

    def _posted(self, alert_id: str) -> tuple[list[dict[str, Any]], str | None] | None:
        """This alert's messages in the room (oldest first: a try without an answer may have posted it more than
        once) and its card's id, when the room's latest messages hold the alert. Only the bot's own messages count:
        a person who writes the alert id in the room ("seen blocked:tx-1?") has not posted the alert, and taking
        their message for it would lose the alert. In a group space only the messages mentioning the bot are
        listed (:meth:`_recent`); every alert message mentions it. None when the room holds no copy, or cannot
        be listed at all: the alert is posted (again), never lost."""
        bot = self.bot_id()
        messages = self._recent(self.LOOKBACK)
        if messages is None:
            return None
        found = [m for m in messages if m.get("personId") == bot and m.get("id") and self.carries(m, alert_id)]
        if not found:
            return None
        found.reverse()
        card = next((c for m in found if (c := self._card_in(messages, m)) is not None), None)
        return found, card

    def _recent(self, max_items: int) -> list[dict[str, Any]] | None:
        """The room's latest messages; in a group space (the plain listing refused, 403) the latest that mention
        the bot (Webex lists at most 100 of those). None when even those cannot be listed (a 4xx other than 429)."""
        if self._unlistable is None:
            try:
                return self.client.list_messages(self.room_id, max_items)
            except WebexError as exc:
                if exc.status != 403:
                    raise
                self._cannot_list(exc)
        try:
            return self.client.list_messages(self.room_id, min(max_items, self.MENTION_LOOKBACK), mentioning_me=True)
        except WebexError as exc:
            if exc.status is None or exc.status >= 500 or exc.retriable:
                raise
            log.warning("webex: the bot's mentions cannot be listed (%s): the alert is posted again", exc.reason)
            return None

    def _cannot_list(self, exc: WebexError) -> None:
        """Webex refused to list the room (403): a group space, which Webex lists for a bot only as the messages
        that mention it. Remembered (the room's type does not change) and logged once, not per alert."""
        with self._unlistable_lock:
            first, self._unlistable = self._unlistable is None, exc.reason
        if first:
            log.info(
                "webex: the room is a group space (%s): posts without an answer are looked for among the messages "
                "that mention the bot",
                exc.reason,
            )

    @staticmethod
    def _card_in(messages: list[dict[str, Any]], alert_message: dict[str, Any]) -> str | None:
        """The id of the card in the alert message's thread: a reply by the same sender, the bot (a person's
        reply in the thread is not it)."""
        return next(
            (
                m.get("id")
                for m in messages
                if m.get("parentId") == alert_message["id"] and m.get("personId") == alert_message.get("personId")
            ),
            None,
        )

    def _send_card(self, alert: dict[str, Any], case_id: str, alert_message: dict[str, Any]) -> str | None:
        """The case card (images, Confirm/Dismiss), in the alert message's thread; its id (looked up in the
        thread when the post had no answer, so a card that went through is still known). Best effort: the
        alert is delivered already, and its text says how to decide the case by command. A 429 is waited out
        (its whole ``Retry-After``, up to :data:`RETRY_AFTER_LIMIT_S`; at most :data:`CARD_TRIES` tries): the alert
        message just before it often uses up the bot's rate, and a card given up there leaves the alert without its
        buttons."""
        subject = alert.get("subject_id")
        card = case_card(alert, self.settings.alerts, has_reference=bool(subject and self.has_reference(subject)))
        try:  # the mention: a group space lists the card for the bot by it
            posted = self._waiting_out_429s(
                lambda: self.client.send_card(
                    self.room_id, f"Case `{case_id}` {self.mention()}", card, alert_message.get("id")
                )
            )
            return posted.get("id")
        except WebexError as exc:
            log.warning("case card of alert %s not posted: %s", alert["alert_id"], exc.reason)
            if exc.status in CARD_REFUSED and not self._closing.is_set():
                return self._send_card_refused(alert, case_id, alert_message)
            if self._closing.is_set() or (exc.status is not None and exc.status < 500):
                return None
        try:  # no answer: it may have been posted (the thread's few replies, not the room's latest thousand)
            thread: list[dict[str, Any]] = []
            if self._unlistable is None:
                try:
                    thread = self._waiting_out_429s(
                        lambda: self.client.list_messages(self.room_id, 10, parent_id=alert_message.get("id"))
                    )
                except WebexError as exc:
                    if exc.status != 403:
                        raise
                    self._cannot_list(exc)
            if self._unlistable is not None:  # a group space lists a thread like the room: its mentions of the bot
                thread = self._waiting_out_429s(
                    lambda: self.client.list_messages(self.room_id, self.MENTION_LOOKBACK, mentioning_me=True)
                )
            return self._card_in(thread, alert_message)
        except WebexError:
            return None

    def _send_card_refused(self, alert: dict[str, Any], case_id: str, alert_message: dict[str, Any]) -> str | None:
        """Webex refused the card itself (its content or size): the same reply without the card, in the thread, saying
        so and how to decide the case instead; its id, as the card's, so a forget deletes it. Before, the thread got
        nothing and only a warning said why. Best effort, once."""
        note = (
            f"Case `{case_id}` {self.mention()}: its card (buttons and images) was refused by Webex and is left off. "
            f"Confirm or dismiss the case on its page, {case_url(case_id, self.settings.alerts)}, or by the commands "
            "in the alert above."
        )
        try:
            posted = self._waiting_out_429s(
                lambda: self.client.send_message(self.room_id, note, parent_id=alert_message.get("id"))
            )
        except WebexError as exc:
            log.warning("case note of alert %s (its card refused) not posted: %s", alert["alert_id"], exc.reason)
            return None
        log.warning("case card of alert %s refused by Webex: posted without it", alert["alert_id"])
        return posted.get("id")

    def _waiting_out_429s(self, call: Callable[[], _T]) -> _T:
        """``call`` (a card post, or the lookup of its thread that tells whether a post without an answer went through:
        unknown, the card is never deleted on forget) under the bot's :class:`RateLimit`, tried again after a 429 (its
        whole ``Retry-After``, up to :data:`RETRY_AFTER_LIMIT_S`; at most :data:`CARD_TRIES` tries)."""
        return call_with_retries(
            lambda: self._rate_limited(call),
            retriable=lambda exc: isinstance(exc, WebexError) and exc.status == 429,  # not done: safe again
            attempts=self.CARD_TRIES,
            retry_after=asked_wait,  # the whole wait asked for: cut at 60 s, the next try met another 429
            wait=lambda n: 1.0 * 2**n,
            maximum_s=RETRY_AFTER_LIMIT_S,
            sleep=self.sleep,
        )

    def _rate_limited(self, call: Callable[[], _T]) -> _T:
        """A Webex call outside the channel worker's own pause (a card, its thread's lookup) under
        the bot's shared :class:`RateLimit`: after the pause another call's 429 asked (waited out here, the card goes
        with its alert), and a 429 of its own pauses every room's channel and the eraser."""
        while (left := self.rate_limit.remaining()) > 0:
            self.sleep(left)
        try:
            return call()
        except WebexError as exc:
            if exc.status == 429 and (wait := asked_wait(exc)) is not None:
                self.rate_limit.pause_for(wait)
            raise

    def delete(self, message_id: str) -> bool:
        """Delete a posted message. What may heal is tried again later (no answer, 5xx, 429, a refused token,
        which the bot's owner mends: the sweep stops and keeps the message); any other refusal of this one
        message (403: no longer the bot's to delete, 400: not an id Webex knows) is final, so it cannot hold
        the messages behind it up for ever. While the bot's :class:`RateLimit` pauses it nothing is asked (the
        sweep stops until the pause ends), and a 429 pauses every room's channel too."""
        if (left := self.rate_limit.remaining()) > 0:
            raise DeliveryError("the bot is rate limited", retry_after=left, rate_limited=True)
        try:
            return self.client.delete_message(message_id)
        except WebexError as exc:
            unavailable = exc.retriable if exc.status is None else exc.unavailable  # a bad id is no outage
            heals = unavailable or exc.status in DELETE_HEALS
            wait = asked_wait(exc)
            if exc.status == 429 and wait is not None:
                self.rate_limit.pause_for(wait)
            raise DeliveryError(
                exc.reason, retriable=heals, retry_after=wait, down=unavailable, rate_limited=exc.status == 429
            ) from exc

    def close(self) -> None:
        self.client.close()


def _without_snapshot(text: AlertText, image: bytes, why: str) -> AlertText:
    """``text`` with a row saying the snapshot is not attached and why (``why`` follows "it (N MB)")."""
    note = f"not attached: it ({len(image) / 1e6:.1f} MB) {why}; see it from the dashboard link"
    return replace(text, lines=(*text.lines, ("Snapshot", note)))


def channels_from_settings(settings: Settings) -> list[Channel]:
    out: list[Channel] = []
    for name in settings.alerts.channel_list():
        if name == "email":
            mailer: Mailer
            if settings.alerts.email_transport == "ses":
                mailer = SesMailer(settings.smtp, settings.alerts.ses_region, settings.alerts.ses_endpoint_url)
            else:
                mailer = SmtpMailer(settings.smtp)
            out.append(EmailChannel(settings, mailer))
        elif name == WEBEX:
            rooms = webex_rooms(settings)
            if not rooms:
                raise ValueError("the webex channel needs a room (CG_WEBEX__ROOM_ID or CG_WEBEX__ROOM_STORES)")
            rate_limit = RateLimit()  # one bot token for every room: one rate limit
            client = WebexClient.from_settings(settings.webex)  # and one client (a connection per sending thread)
            for room, _ in rooms:  # every room's channel closes it: closing twice closes nothing more
                out.append(WebexChannel(settings, client, room_id=room, rate_limit=rate_limit))
        else:
            raise ValueError(f"unknown alert channel {name!r} (known: email, webex)")
    return out


def reference_finder_from_settings(settings: Settings) -> Callable[[str], bool]:
    """Whether the image store holds the subject's reference image (``ImageStore.find``, store built on first use).
    A store that does not answer counts as none: the card then says so instead of showing a broken image."""
    store: list[Any] = []

    def has_reference(subject_id: str) -> bool:
        try:
            if not store:
                from infra.clients.image_store import ImageStore

                store.append(ImageStore.from_settings(settings))
            return store[0].find("reference", subject_id) is not None
        except Exception as exc:  # noqa: BLE001 - the card goes out either way
            log.warning("reference image of %s not looked up (%s): the card shows none", subject_id, type(exc).__name__)
            return False

    return has_reference


def image_loader_from_settings(settings: Settings) -> ImageLoader:
    """``ImageStore.get`` of infra/clients/image_store.py, built on first use."""
    store: list[Any] = []

    def load(ref: str) -> bytes:
        if not store:
            from infra.clients.image_store import ImageStore

            store.append(ImageStore.from_settings(settings))
        return store[0].get(ref)

    return load


# --------------------------------------------------------------------------- per-channel scheduling


@dataclass
class Task:
    """One alert on one channel until delivered or given up."""

    alert: dict[str, Any]
    channel: str
    deadline: float
    failures: int = 0
    maybe_sent: bool = False
    last_error: str = ""
    alert_ms: int | None = None
    """When the alert was made (:func:`made_at`): what a forget compares with its own time."""

    @property
    def key(self) -> tuple[str, str]:
        return self.alert["alert_id"], self.channel


@dataclass(frozen=True)
class Outcome:
    key: tuple[str, str]
    delivered: bool
    reason: str = ""
    withheld: str | None = None
    """Not sent (nor to be): the forgotten subject (or source sale) the alert shows."""


def made_at(message: Message, alert: dict[str, Any]) -> int | None:
    """When an alert was made, for ``forget``: the earlier of its Kafka record's timestamp (the job's clock
    when it wrote the alert; a re-driven copy's is later) and its event time (the till's clock, historic in a
    replay): the earlier errs towards deleting."""
    times = [t for t in (kafka_clients.written_at_ms(message), alert.get("event_time")) if t]
    return min(times) if times else None


def check_event_time(alert: dict[str, Any], timezone: str | None) -> None:
    """The alert's ``event_time`` (its only time field) as every message shows it (:func:`local_time`), else
    :class:`InvalidRecord` ``invalid_timestamp``: a hostile one (``10**18`` ms, far before 1970) makes datetime raise
    on every try, which the channels took for an internal error, retried with room searches and dead-lettered only
    after ``max_attempts``."""
    value = alert.get("event_time")
    try:
        local_time(int(value or 0), timezone)
    except (TypeError, ValueError, OverflowError, OSError):
        raise InvalidRecord("invalid_timestamp", f"event_time {value} ms is not a date the alert can show") from None


def decode_alert(value: bytes | None, settings: AlertSettings) -> dict[str, Any]:
    """An ``alerts`` record the channels can use, else :class:`InvalidRecord` (its dead letter's kind and reason):
    bytes that do not decode, an id that would not fit a link, a Message-ID or a ledger key, a time no message can
    show, a number no message can show (:func:`~schemas.records.check_alert_numbers`). Pure, so the hostile corpus
    drives it without Kafka."""
    alert = codec("Alert").decode(value)
    if not isinstance(alert.get("alert_id"), str) or not alert["alert_id"].strip():
        raise InvalidRecord("missing_field", "alert_id is empty")
    check(alert["alert_id"], "alert_id", ALERT_ID_RE)  # it goes into links, Message-IDs and ledger keys
    check_event_time(alert, settings.zone_of(alert.get("store_id")))
    check_alert_numbers(alert)
    return alert


def give_up_reason(task: Task, error: DeliveryError, now: float, delay: float, max_attempts: int) -> str | None:
    """Why to stop retrying this task (None = retry after ``delay``). Pure, for tests."""
    if not error.retriable:
        return f"{task.channel} refused it: {error.reason}"
    if task.failures >= max_attempts:
        return f"{task.channel} failed {task.failures} times, last: {error.reason}"
    if now + delay > task.deadline:
        if error.down:
            return down_at_deadline(task.channel, error.reason)
        return f"{task.channel} still failing at the deadline after {task.failures} tries, last: {error.reason}"
    return None


def down_at_deadline(channel: str, last_error: str) -> str:
    return f"{channel} still unavailable at the deadline, last: {last_error}"


class Clock:
    """Monotonic seconds and waiting on a condition for some of them: what the channel scheduling reads
    time through, so a test can run a minutes-long outage in milliseconds with a faster clock."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, seconds: float | None) -> None:
        condition.wait(seconds)


MONOTONIC = Clock()


class ChannelWorker:
    """A channel's own queue (a heap by due time) and ``threads`` threads sending from it (``concurrency`` unless
    given: :func:`sending_threads`).

    While the channel is down (a :class:`DeliveryError` with ``down``) it is paused and only one task
    at a time goes out, as a probe; each failed probe doubles the pause (up to ``retry_max_s``), tasks
    that cannot be tried before their deadline are given up, and the first answer from the channel
    lets every thread send again.
    """

    MAX_WAIT_S = 1.0
    """Longest a thread waits before looking at the queue again (a missed wake-up costs no more)."""

    def __init__(
        self,
        channel: Channel,
        ledger: Ledger,
        settings: AlertSettings,
        done: queue.SimpleQueue,
        image_loader: ImageLoader,
        rng: random.Random | None = None,
        clock: Clock = MONOTONIC,
        on_due_posts: Callable[[], None] | None = None,
        threads: int | None = None,
    ) -> None:
        self.channel, self.ledger, self.settings, self.done = channel, ledger, settings, done
        self.on_due_posts = on_due_posts
        """Called once posts due for deletion now are recorded (a withheld alert's copies): the eraser's wake."""
        self.image_loader = image_loader
        self.backoff = Backoff(settings.retry_initial_s, settings.retry_max_s)
        self.clock = clock
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._paused_until = 0.0
        self.rate_limit: RateLimit | None = getattr(channel, "rate_limit", None)
        """The pause the channel shares with the other channels of its account (a 429 in another Webex room)."""
        self._down_since: float | None = None
        """When the channel was found down (None = up); while down, sends go out one probe at a time."""
        self._probe: Task | None = None
        self._probes_failed = 0
        self._stop = False
        self._stop_until: float | None = None
        """When :meth:`stop`'s wait ends (monotonic), set by its first call: a later call does not wait again."""
        self._stop_reported = False
        self.sent = self.failed_tries = self.rate_limited = self.given_up = 0
        self.unavailable = 0
        """Sends that found the channel down (they spend no attempts)."""
        self.withheld = 0
        """Alerts not sent: their subject is forgotten."""
        self._deliveries = {
            result: metrics.DELIVERIES.labels(channel.name, result)
            for result in ("delivered", "failed", "retried", "dead_lettered", "withheld")
        }
        self._threads = [
            threading.Thread(target=self._run, name=f"{channel.name}-{i}", daemon=True)
            for i in range(max(1, settings.concurrency if threads is None else threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, task: Task, at: float | None = None) -> None:
        """Queue ``task`` to run at ``at`` (monotonic; now by default). A task whose earlier attempt may
        have been delivered goes first: the sooner the room is searched, the fewer newer messages hide it."""
        if at is None:
            at = 0.0 if task.maybe_sent else self.clock.now()
        with self._cv:
            heapq.heappush(self._heap, (at, next(self._seq), task))
            self._cv.notify()

    def queued(self) -> int:
        with self._cv:
            return len(self._heap)

    @property
    def down(self) -> bool:
        """Whether the channel is found down (being probed until it answers)."""
        return self._down_since is not None

    @property
    def probe(self) -> Task | None:
        """The task going out as the probe while the channel is down (None when up or between probes): sends
        begun before the channel was found down are not probes, and may still be under way beside one."""
        return self._probe

    def stop(self, until: float | None = None) -> None:
        """Take no more tasks, interrupt the channel's waits (``interrupt``, when it has one: a card waiting out a
        429) and wait for the sends under way, so that what they delivered is in the ledger before it closes
        (a send that ended after it was not recorded, and was sent again on restart). ``until``: when the wait
        ends (monotonic), one deadline the sender shares among its channels (one wait each, one channel after the
        other, took 15 s per channel stuck mid-send); by default ``CG_ALERTS__STOP_WAIT_S`` from now. Only the first
        call's deadline counts: stopping again (the sender's ``close``) waits no longer."""
        with self._cv:
            self._stop = True
            if self._stop_until is None:
                self._stop_until = until if until is not None else time.monotonic() + self.settings.stop_wait_s
            until = self._stop_until
            self._cv.notify_all()
        interrupt = getattr(self.channel, "interrupt", None)
        if interrupt is not None:
            interrupt()
        for t in self._threads:
            t.join(max(0.0, until - time.monotonic()))
        if (running := sum(t.is_alive() for t in self._threads)) and not self._stop_reported:
            self._stop_reported = True
            log.error(
                "%s: %d sends still under way after %.0fs at shutdown: if they go through, they are not recorded "
                "and are sent again on restart",
                self.channel.name,
                running,
                self.settings.stop_wait_s,
            )

    def _next(self) -> Task | None:
        with self._cv:
            while not self._stop:
                now = self.clock.now()
                paused_until = max(self._paused_until, self.rate_limit.until if self.rate_limit else 0.0)
                ready_at = max(self._heap[0][0], paused_until) if self._heap else None
                probing = self._down_since is not None and self._probe is not None
                if ready_at is not None and ready_at <= now and not probing:
                    task = heapq.heappop(self._heap)[2]
                    if self._down_since is not None:
                        self._probe = task
                    return task
                wait = None if ready_at is None else self.MAX_WAIT_S if probing else ready_at - now
                self.clock.wait(self._cv, None if wait is None else min(wait, self.MAX_WAIT_S))
            return None

    def _run(self) -> None:
        while (task := self._next()) is not None:
            try:
                self._attempt(task)
            except LedgerClosed as exc:  # shutdown's wait ended with this send under way (stop's ERROR said so)
                log.error(
                    "%s: %s: %s; if it went out, it is sent again on restart", self.channel.name, task.key[0], exc
                )
            except Exception as exc:  # a bug in a channel must not kill the thread and strand the alert
                log.exception("%s: unexpected error sending %s", self.channel.name, task.alert["alert_id"])
                self._failed(task, DeliveryError(f"internal error {type(exc).__name__}", ambiguous=True))

    def _attempt(self, task: Task) -> None:
        alert_id, name = task.key
        # Asked before every try, not at intake: a forget may come while the alert waits (a channel down).
        if (forgotten := self.ledger.forgotten(task.alert, task.alert_ms)) is not None:
            posted: tuple[str, ...] = ()
            if task.maybe_sent and self.channel.can_check_sent:
                # An earlier try without an answer (or a crash after it) may have posted the alert, with the face:
                # recorded, the eraser deletes that copy. Webex failing: retried as a send would be.
                try:
                    detail = self.channel.find_sent(task.alert)
                except DeliveryError as exc:
                    self._failed(task, exc)
                    return
                self._answered(task)
                posted = tuple(detail.split()) if detail and getattr(self.channel, "erasable", False) else ()
            self._withhold(task, forgotten, posted)
            return
        if self.channel.can_check_sent and not task.maybe_sent:
            self.ledger.mark_sending(alert_id, name)  # the intent: after a crash from here on, check first
        try:
            detail = self.channel.send(task.alert, self._image(task.alert), task.maybe_sent)
        except DeliveryError as exc:
            self._failed(task, exc)
            return
        self._answered(task)
        posted = tuple(detail.split()) if detail and getattr(self.channel, "erasable", False) else ()
        self.ledger.mark_sent(alert_id, name, detail, posted, task.alert, task.alert_ms)
        self.sent += 1
        self._deliveries["delivered"].inc()  # one network send each: nothing to batch
        self.done.put(Outcome(task.key, True))

    def _withhold(self, task: Task, forgotten: str, posted: tuple[str, ...] = ()) -> None:
        """A forgotten subject's alert (a re-drive, a late redelivery, one queued when the forget came): its snapshot
        shows the subject's face, so it is not sent, here or later (the ledger says ``withheld``). ``posted``: the
        copies an earlier try without an answer posted after all, recorded for the eraser to delete."""
        alert_id, name = task.key
        with self._cv:  # a probe of a channel that is down: the next task probes (kept, it held the channel for ever)
            if self._probe is task:
                self._probe = None
                self._cv.notify_all()
        self.ledger.mark_withheld(alert_id, name, forgotten, posted, task.alert, task.alert_ms)
        if posted and self.on_due_posts is not None:  # the face is in the room now: not until the next sweep
            self.on_due_posts()
        self.withheld += 1
        self._deliveries["withheld"].inc()
        if posted:
            log.warning(
                "%s: %s not sent: it shows %s, who is forgotten; %d copies an earlier try posted are to be deleted",
                name,
                alert_id,
                forgotten,
                len(posted),
            )
        else:
            log.warning("%s: %s not sent: it shows %s, who is forgotten", name, alert_id, forgotten)
        self.done.put(Outcome(task.key, True, withheld=forgotten))

    def _answered(self, task: Task) -> None:
        """The channel answered ``task`` (accepted it or refused it for a reason of its own): it is up."""
        with self._cv:
            if self._probe is task:
                self._probe = None
            if self._down_since is None:
                return
            down_for = self.clock.now() - self._down_since
            self._down_since, self._probes_failed = None, 0
            self._cv.notify_all()
        log.warning("%s: channel answers again after %.1fs down", self.channel.name, down_for)

    def _failed(self, task: Task, exc: DeliveryError) -> None:
        self._deliveries["failed"].inc()
        if exc.down:
            self._unavailable(task, exc)
            return
        self._answered(task)
        now = self.clock.now()
        task.maybe_sent |= exc.ambiguous
        task.last_error = exc.reason
        paused = exc.rate_limited and exc.retry_after is not None and exc.retriable
        if paused:
            # A 429: Webex's rate limit is per bot, so the whole channel waits (and every room's channel with it, the
            # shared RateLimit); this alert goes first afterwards. No attempt is spent: the alert is not at fault.
            assert exc.retry_after is not None
            self.rate_limited += 1
            delay = exc.retry_after
            with self._cv:
                self._paused_until = max(self._paused_until, now + delay)
            if self.rate_limit is not None:  # the other rooms' channels look within a second
                self.rate_limit.pause_until(now + delay)
                log.warning("%s: rate limited, pausing every channel of its account %.1fs", self.channel.name, delay)
            else:
                log.warning("%s: rate limited, pausing the channel %.1fs", self.channel.name, delay)
        else:
            # Any other answer, a Retry-After too (Webex's 408, 409, 423, 425: this message or its room is busy), is
            # about this delivery: it alone waits (at least what was asked), the channel goes on with the others, and
            # the try counts against max_attempts. Before, such a Retry-After paused the room's whole channel and
            # spent no attempt, so a message Webex kept answering 409 was retried until its deadline.
            task.failures += 1
            self.failed_tries += 1
            delay = self.backoff.delay(task.failures - 1, self._rng)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
        reason = give_up_reason(task, exc, now, delay, self.settings.max_attempts)
        if reason is not None:
            self._give_up(task, reason)
            return
        if not paused:
            log.info(
                "%s: %s failed (%s), retry %d in %.1fs%s",
                self.channel.name,
                task.alert["alert_id"],
                exc.reason,
                task.failures,
                delay,
                " (its Retry-After)" if exc.retry_after is not None and delay == exc.retry_after else "",
            )
        self._deliveries["retried"].inc()
        self.submit(task, now + delay)

    def _unavailable(self, task: Task, exc: DeliveryError) -> None:
        """The channel is down: pause it (longer after each failed probe) and put ``task`` back, unless
        the pause outlasts its deadline; no attempt is spent. Tasks whose deadline falls inside the pause
        are given up now rather than after the outage."""
        task.maybe_sent |= exc.ambiguous
        task.last_error = exc.reason
        self.unavailable += 1
        expired: list[Task] = []
        with self._cv:
            now = self.clock.now()
            first, probe = self._down_since is None, self._probe is task
            if first or probe:  # the first failure, or a probe's: (longer) pause
                if first:
                    self._down_since = now
                else:
                    self._probes_failed += 1
                self._probe = None
                backoff = self.backoff.delay(self._probes_failed, self._rng)
                pause = exc.retry_after if exc.retry_after is not None else backoff
                self._paused_until = max(self._paused_until, now + pause)
                expired = self._expire(self._paused_until)
                self._cv.notify_all()
            delay = max(0.0, self._paused_until - now)
        if first:
            log.warning("%s: channel down (%s); pausing it, probing until it answers", self.channel.name, exc.reason)
        elif probe:
            log.info("%s: still down (%s), next probe in %.1fs", self.channel.name, exc.reason, delay)
        for gone in expired:
            self._give_up(gone, down_at_deadline(self.channel.name, gone.last_error or exc.reason))
        reason = give_up_reason(task, exc, now, delay, self.settings.max_attempts)
        if reason is not None:
            self._give_up(task, reason)
            return
        self._deliveries["retried"].inc()
        self.submit(task, now)

    def _expire(self, until: float) -> list[Task]:
        """Take the queued tasks whose deadline comes before ``until`` off the queue (lock held)."""
        expired = [entry[2] for entry in self._heap if entry[2].deadline < until]
        if expired:
            self._heap = [entry for entry in self._heap if entry[2].deadline >= until]
            heapq.heapify(self._heap)
        return expired

    def _give_up(self, task: Task, reason: str) -> None:
        self.given_up += 1
        self._deliveries["dead_lettered"].inc()
        log.warning("%s: giving up on %s: %s", self.channel.name, task.alert["alert_id"], reason)
        self.done.put(Outcome(task.key, False, reason))

    def _image(self, alert: dict[str, Any]) -> bytes | None:
        ref = alert.get("snapshot_ref")
        if not ref:
            return None
        try:
            return self.image_loader(ref)
        except Exception as exc:  # the alert matters more than its picture: send it without one
            log.warning(
                "%s: snapshot of %s unavailable (%s); sending without it",
                self.channel.name,
                alert["alert_id"],
                type(exc).__name__,
            )
            return None


# --------------------------------------------------------------------------- the consumer


@dataclass
class Pending:
    """One consumed message until all its channels are done (and its dead letter confirmed)."""

    message: Message
    alert: dict[str, Any] | None
    waiting: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    dead_letter: DeadLetter | None = None
    dead_letter_sent: bool = False
    finished: bool = False
    withheld: dict[str, str] = field(default_factory=dict)
    """Channel -> the forgotten subject (or sale) for which the alert was not sent there."""


@dataclass
class SenderStats:
    consumed: int = 0
    alerts_done: int = 0
    skipped_channels: int = 0
    dead_lettered: int = 0
    already_dead_lettered: int = 0
    """Records read again whose dead letter was confirmed before: skipped."""
    commits: int = 0
    withheld: int = 0
    """Alerts not sent on some channel: their subject is forgotten."""
    unrouted: int = 0
    """Alerts not sent to Webex at all: no room gets their store's alerts."""

    def line(self) -> str:
        return (
            f"consumed={self.consumed} done={self.alerts_done} already_sent={self.skipped_channels} "
            f"dead_lettered={self.dead_lettered} already_dead_lettered={self.already_dead_lettered} "
            f"withheld={self.withheld} unrouted={self.unrouted} "
            f"commits={self.commits}"
        )


def default_group_id(settings: Settings, channels: list[str] | None = None) -> str:
    """``<topic prefix>checkout-guard-alert-sender-<channels>``: one consumer group per channel set, so a
    sender per channel (``CG_ALERTS__CHANNELS=webex``; a core each) never shares partitions with a sender
    for another set -- sharing would leave each alert on only one process's channels. By kind: the Webex rooms
    (``CG_WEBEX__ROOM_STORES``) change no group."""
    names = sorted({channel_kind(c) for c in (channels if channels is not None else settings.alerts.channel_list())})
    return settings.kafka.group(f"{DEFAULT_GROUP_ID}-{'+'.join(names)}")


def position(message: Message) -> str:
    """``topic:partition:offset``: where a record was read, the key of its dead letter in the ledger."""
    return f"{message.topic()}:{message.partition()}:{message.offset()}"


def dead_letter_for(message: Message, error_kind: str, reason: str) -> DeadLetter:
    return kafka_clients.message_dead_letter(message, error_kind, reason, stage=STAGE, failed_at=now_ms())


class AlertSender:
    """Consume alerts, fan them out to the channel workers, dead-letter, commit in offset order."""

    def __init__(
        self,
        settings: Settings,
        *,
        channels: list[Channel] | None = None,
        ledger: Ledger | None = None,
        image_loader: ImageLoader | None = None,
        group_id: str | None = None,
        commit_interval_s: float = 0.5,
        summary_interval_s: float = 30.0,
        clock: Clock = MONOTONIC,
        topic_configs: Callable[[Sequence[str]], dict[str, dict[str, str]]] | None = None,
    ) -> None:
        """``topic_configs``: how the retentions of :data:`LEDGER_TOPICS` are read (by default from Kafka,
        :func:`infra.clients.kafka.topic_configs`)."""
        self.settings = settings
        self._topic_configs = topic_configs or (
            lambda topics: kafka_clients.topic_configs(settings, topics, RETENTION_KEYS)
        )
        self._retentions: TopicRetentions | None = None
        """The retentions of :data:`LEDGER_TOPICS` last read from Kafka (None: never read, the code's)."""
        self._retentions_at: float | None = None
        self._retentions_warned = False
        self.clock = clock
        self.topic = ALERTS.full_name(settings.kafka.topic_prefix)
        self.dead_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
        self.audit_topic = AUDIT.full_name(settings.kafka.topic_prefix)
        self.channels = channels if channels is not None else channels_from_settings(settings)
        self.group_id = group_id or default_group_id(settings, [c.name for c in self.channels])
        self.ledger = ledger or Ledger.from_settings(settings)
        self.image_loader = image_loader or image_loader_from_settings(settings)
        self.commit_interval_s, self.summary_interval_s = commit_interval_s, summary_interval_s
        self.stats = SenderStats()
        self._done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self._workers: dict[str, ChannelWorker] = {}
        self._kinds = {channel_kind(c.name) for c in self.channels}
        self._unrouted_stores: set[str] = set()
        """Stores whose alerts went to no Webex room, logged once each."""
        self._inflight: dict[tuple[str, str], list[Pending]] = {}
        self._partitions: dict[tuple[str, int], deque[Pending]] = {}
        self._unfinished = 0
        self._paused = False
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.heartbeat = metrics.Heartbeat()
        """Beaten every loop turn with the channels that are down, if any (the process's ``/healthz``)."""
        self._dead_letter_failing = False
        self._out = metrics.RECORDS_OUT.labels(STAGE, "alert")
        self._eraser: Eraser | None = None
        self._eraser_thread: threading.Thread | None = None
        self._notifier: Notifier | None = None
        """Replies in Webex to verdicts the case service refused (sinks/alerts/notices.py), fed by the eraser."""
        self._notifier_thread: threading.Thread | None = None
        self._halt = threading.Event()
        """The eraser's and the ledger prune's end: the loop's, however it ends (set when ``_run`` finishes)."""
        self._pruning: threading.Thread | None = None
        self._exit_by: float | None = None
        """When (``time.monotonic()``) the stop's last Kafka calls and the channels' close are given up, 1 s before
        the supervisor's SIGKILL: set when the stop begins (``_run``'s end), counted from when the stop was asked
        (:class:`infra.processes.StopRequest`)."""

    def run(self, stop: threading.Event | None = None) -> SenderStats:
        """Send until ``stop`` is set; then the channels (their connections) and the ledger are closed,
        however the run ended."""
        try:
            return self._run(stop or threading.Event())
        finally:
            self.close()

    def close(self) -> None:
        """Stop the channel workers, close every channel and then the ledger (callbacks run last-registered
        first); one failing to close does not keep the others open."""
        # all channels together (a worker stopped keeps its own)
        until = time.monotonic() + self.settings.alerts.stop_wait_s
        deadline = (
            self._exit_by if self._exit_by is not None else exit_deadline(self.settings.supervisor.stop_timeout_s)
        )
        with contextlib.ExitStack() as closing:
            closing.callback(self.ledger.close, deadline)
            closing.callback(self._close_channels, deadline)
            for worker in self._workers.values():  # idempotent; no send is under way when its channel closes
                closing.callback(worker.stop, until)

    def _close_channels(self, deadline: float) -> None:
        """Close every channel (its connections) side by side, given up at ``deadline`` with a WARNING naming each
        one not done: an SMTP server that does not answer held each connection's ``QUIT`` for the SMTP timeout, past
        the supervisor's stop timeout into its SIGKILL. Side by side, and each with at least a short last chance
        (:func:`infra.processes.all_done_by`): one after the other, a close that ends at once was given up with a
        WARNING after a hanging one, or a last commit, had used up the time. A close given up ends on its own, or with
        the process; the first close that failed is raised once all are over or given up."""
        futures = all_done_by(((f"{c.name}-close", c.close) for c in self.channels), deadline)
        errors: list[BaseException] = []
        for channel, future in zip(self.channels, futures, strict=True):
            if not future.done():
                log.warning(
                    "alert sender: the %s channel's close was not done before the supervisor's stop timeout; given "
                    "up, its connections end with the process",
                    channel.name,
                )
            elif (error := future.exception()) is not None:
                errors.append(error)
        if errors:
            raise errors[0]  # as a close in the ExitStack did; the ledger still closes

    def start_workers(self) -> None:
        """One :class:`ChannelWorker` per channel (``run`` does this; tests that feed messages themselves too), the
        Webex rooms' sharing ``concurrency`` threads (:func:`sending_threads`)."""
        names = [c.name for c in self.channels]
        self._workers = {
            c.name: ChannelWorker(
                c,
                self.ledger,
                self.settings.alerts,
                self._done,
                self.image_loader,
                clock=self.clock,
                on_due_posts=self._wake_eraser,
                threads=sending_threads(c.name, names, self.settings.alerts.concurrency),
            )
            for c in self.channels
        }

    def _wake_eraser(self) -> None:
        """A channel recorded posts due now (a withheld alert's copies): the eraser deletes them at once."""
        if self._eraser is not None:
            self._eraser.wake()

    def start_eraser(self, stop: threading.Event) -> threading.Thread | None:
        """The thread that takes alert messages back from the erasable channels (sinks/alerts/erase.py), if any, and
        with a Webex channel the one that replies to verdicts the case service refused (sinks/alerts/notices.py)."""
        erasable = {c.name: c for c in self.channels if getattr(c, "erasable", False)}
        if not erasable:
            return None
        webex = next((c for c in erasable.values() if isinstance(c, WebexChannel)), None)
        if webex is not None:  # the bot's token and rate limit: it replies to refused verdicts (notices.py)
            self._notifier = Notifier(self.settings, self.ledger, webex.client, webex.rate_limit)
            self._notifier_thread = threading.Thread(
                target=self._notifier.run, args=(stop,), name="refusal-replies", daemon=True
            )
            self._notifier_thread.start()
        on_events = self._notifier.take if self._notifier is not None else None
        self._eraser = Eraser(self.settings, self.ledger, erasable, f"{self.group_id}-eraser", on_events=on_events)
        thread = threading.Thread(target=self._eraser.run, args=(stop,), name="alert-eraser", daemon=True)
        thread.start()
        self._eraser_thread = thread
        return thread

    def _run(self, stop: threading.Event) -> SenderStats:
        self.start_workers()
        self._consumer = kafka_clients.consumer(
            self.settings,
            self.group_id,
            kafka_clients.READ_COMMITTED,
            auto_offset_reset="earliest",
            # Static membership: a sender restarted after a crash takes its partitions back at once
            # instead of waiting out the dead member's session (45 s of undelivered alerts).
            group_instance_id=f"{self.group_id}@{socket.gethostname()}",
        )
        self._producer = kafka_clients.producer(self.settings, kafka_clients.IDEMPOTENT, linger_ms=5)
        self._consumer.subscribe([self.topic], on_revoke=self._on_revoke)
        eraser = self.start_eraser(self._halt)
        log.info(
            "alert sender: %s -> %s (group %s, ledger %s)",
            self.topic,
            ", ".join(self._workers),
            self.group_id,
            self.ledger.path,
        )
        self.prune_ledger()
        last_commit = last_summary = time.monotonic()
        try:
            while not stop.is_set():
                self._flow_control()
                self._accept_batch(self._consumer.consume(num_messages=500, timeout=0.05))
                self._drain_outcomes()
                self._producer.poll(0)
                self.heartbeat.beat(self.problem())
                now = time.monotonic()
                if now - last_commit >= self.commit_interval_s:
                    self._commit()
                    self._report_queues()
                    last_commit = now
                if now - last_summary >= self.summary_interval_s:
                    log.info(
                        "alert sender: %s; queued %s",
                        self.stats.line(),
                        {n: w.queued() for n, w in self._workers.items()},
                    )
                    self.prune_ledger()
                    last_summary = now
        finally:
            # The eraser ends with the sends under way, within the same wait (one after the other outlasted the
            # supervisor's stop timeout): the ledger closes after both, so what they did is recorded.
            # 1 s before the supervisor's SIGKILL, which counts from the SIGTERM: a commit in the loop that hung after
            # it (Kafka down) took from the stop's time, which counted from here before
            deadline = exit_deadline(self.settings.supervisor.stop_timeout_s, stop_asked_at(stop))
            self._exit_by = deadline  # the channels' close (``close``, after this) ends by it too
            until = min(time.monotonic() + self.settings.alerts.stop_wait_s, deadline)
            self._halt.set()
            for worker in self._workers.values():
                worker.stop(until)
            if self._notifier_thread is not None:  # a reply's post under way: its state recorded before the close
                self._notifier_thread.join(max(0.0, until - time.monotonic()))
            if eraser is not None:
                eraser.join(max(0.0, until - time.monotonic()))
                if eraser.is_alive():
                    log.warning(
                        "alert eraser still under way after %.0fs at shutdown: what it does not record is done at the "
                        "next start",
                        self.settings.alerts.stop_wait_s,
                    )
            self._drain_outcomes()
            # After the stop wait: both together are checked against the supervisor's stop timeout (settings), but a
            # stop that took longer (a dead letter waiting for room in a full queue) leaves the flush what is left.
            self._producer.flush(time_left(deadline, self.settings.kafka.stop_flush_s))
            self._producer.poll(0)
            self._last_commit(deadline)
            log.info("alert sender stopped: %s", self.stats.line())
        return self.stats

    def prune_ledger(self) -> threading.Thread | None:
        """Drop the ledger's rows past :func:`ledger_keep_ms` (at start and at each summary), on a thread of its own:
        a database locked by another process holds a write for up to SQLite's 30 s, which must not stop the loop's
        fetches, commits and heartbeat. Without it the ledger kept a row per alert and channel for as long as the
        stack ran. ``None``: the last prune is still under way."""
        if self._pruning is not None and self._pruning.is_alive():
            return None
        self._pruning = threading.Thread(target=self._prune, name="ledger-prune", daemon=True)
        self._pruning.start()
        return self._pruning

    def topic_retentions(self) -> TopicRetentions | None:
        """The retentions of :data:`LEDGER_TOPICS` as Kafka has them now, read at the first prune (at start) and again
        each :data:`RETENTIONS_REREAD_S`. Kafka not saying (down, a login that may not describe the topics): a
        WARNING, once until it does, and the last read (None: never read, the code's retentions) meanwhile, asked
        again at the next prune. A change of the bound they give the ledger is logged."""
        now = time.monotonic()
        if self._retentions_at is not None and now - self._retentions_at < RETENTIONS_REREAD_S:
            return self._retentions
        topics = [spec.full_name(self.settings.kafka.topic_prefix) for spec in LEDGER_TOPICS]
        try:
            read = parse_retentions(self._topic_configs(topics), topics)
        except (KafkaException, OSError, ValueError) as exc:  # a TimeoutError too
            if not self._retentions_warned and not self._halt.is_set():
                self._retentions_warned = True
                why = str(exc) if type(exc) is ValueError else kafka_clients.error_named(exc)
                log.warning(
                    "alert sender: the retention of %s could not be read from Kafka (%s); the delivery ledger keeps "
                    "its rows %s, by the %s retentions, until it can: a topic's retention.ms raised past them makes "
                    "the sender send alerts read again after that time once more",
                    ", ".join(topics),
                    why,
                    kept_for(ledger_keep_ms(self.settings, self._retentions)),
                    "code's" if self._retentions is None else "last read",
                )
            return self._retentions
        first, before = self._retentions is None, ledger_keep_ms(self.settings, self._retentions)
        self._retentions, self._retentions_at, self._retentions_warned = read, now, False
        if (keep := ledger_keep_ms(self.settings, read)) != before or first:
            log.info(
                "alert sender: the delivery ledger keeps its rows %s, by the retentions Kafka has for %s",
                kept_for(keep),
                ", ".join(topics),
            )
        return read

    def _prune(self) -> None:
        """One prune; it ends between two commits when the sender stops, and a failing one is tried next time."""
        keep = ledger_keep_ms(self.settings, self.topic_retentions())
        if keep is None:  # a topic keeps its records for ever: so must the ledger
            return
        try:
            pruned = self.ledger.prune(now_ms() - keep, stop=self._halt)
        except LedgerClosed:
            return  # the sender stopped: the rest at the next start
        except sqlite3.Error as exc:
            log.warning(
                "alert sender: pruning the delivery ledger %s failed, tried again later: %s", self.ledger.path, exc
            )
            return
        if pruned:
            log.info("alert sender: pruned %d rows older than their alerts' records from the delivery ledger", pruned)

    def _last_commit(self, deadline: float) -> None:
        """The last offset commit (of the alerts finished: delivered and in the ledger, or dead-lettered and
        acknowledged; never one whose send is still under way) and the consumer's close, given up at ``deadline``:
        with the brokers down both waited on Kafka as long as it took, past the supervisor's stop timeout into its
        SIGKILL. What is not committed is read again at the next start and skipped by the ledger."""
        consumer = self._consumer
        assert consumer is not None

        def commit_and_close() -> None:
            with contextlib.suppress(KafkaException):
                self._commit()
            consumer.close()

        if not done_by(commit_and_close, deadline, "alert-sender-last-commit"):
            log.warning(
                "alert sender: Kafka took neither the last offset commit nor the consumer's close before the "
                "supervisor's stop timeout; the alerts since the last commit will be read again and skipped by the "
                "ledger"
            )

    def problem(self) -> str | None:
        """What keeps alerts from going out now: channels found down, or the dead-letter topic away."""
        down = [f"{name} unreachable" for name, worker in self._workers.items() if worker.down]
        if self._dead_letter_failing:
            down.append("Kafka unreachable")
        if self._eraser is not None and self._eraser.problem:
            down.append(self._eraser.problem)
        return "; ".join(down) or None

    def health(self) -> tuple[bool, str]:
        """``/healthz``: the loop's heartbeat, and not alive once the eraser thread has died under a running
        sender (forgotten subjects' messages would stay in the room; a restart brings it back)."""
        thread = self._eraser_thread
        if thread is not None and not thread.is_alive() and not self._halt.is_set():
            return False, "alert eraser stopped"
        replies = self._notifier_thread
        if replies is not None and not replies.is_alive() and not self._halt.is_set():
            return False, "refusal replies stopped"
        return self.heartbeat()

    def ready(self) -> tuple[bool, str]:
        """``/readyz``: not ready while not alive (:meth:`health`: a hung loop, a dead eraser), nor while a channel
        or Kafka is away (the heartbeat's problem)."""
        alive, reason = self.health()
        return self.heartbeat.ready() if alive else (alive, reason)

    def _report_queues(self) -> None:
        """Queue depths, set with each commit (twice a second), not per alert."""
        for name, worker in self._workers.items():
            metrics.QUEUE_DEPTH.labels(STAGE, name).set(worker.queued())
        metrics.QUEUE_DEPTH.labels(STAGE, "unfinished").set(self._unfinished)

    # ------------------------------------------------------------------ intake

    def _accept_batch(self, messages: list[Message]) -> None:
        """Decode a fetched batch, look its alerts up in the ledger in one query, hand them out."""
        decoded: list[tuple[Message, dict[str, Any] | InvalidRecord]] = []
        for message in messages:
            if not kafka_clients.is_record(message, log):
                continue
            try:
                decoded.append((message, decode_alert(message.value(), self.settings.alerts)))
            except InvalidRecord as exc:  # a DecodeError too
                decoded.append((message, exc))
        if not decoded:
            return
        invalid = sum(1 for _, a in decoded if isinstance(a, InvalidRecord))
        metrics.RECORDS_IN.labels(STAGE, "alert").inc(len(decoded) - invalid)
        if invalid:
            metrics.RECORDS_IN.labels(STAGE, "invalid").inc(invalid)
        states = self.ledger.states([a["alert_id"] for _, a in decoded if isinstance(a, dict)])
        done = self.ledger.dead_lettered([position(m) for m, _ in decoded])
        for message, alert_or_error in decoded:
            if position(message) in done:
                self._already_dead_lettered(message, alert_or_error)
            else:
                self._accept(message, alert_or_error, states)

    def _already_dead_lettered(self, message: Message, alert: dict[str, Any] | InvalidRecord) -> None:
        """A record read again whose dead letter Kafka confirmed before (a crash or a stop came before its offset
        commit): finished without a second dead letter or another try, counted ``already_dead_lettered`` on the
        channels it was for."""
        self.stats.consumed += 1
        self.stats.already_dead_lettered += 1
        pending = Pending(message, alert if isinstance(alert, dict) else None)
        topic, partition = message.topic(), message.partition()
        assert topic is not None and partition is not None, "a consumed record has both"
        self._partitions.setdefault((topic, partition), deque()).append(pending)
        self._unfinished += 1
        for name, worker in self._workers.items():
            if not isinstance(alert, dict) or takes(worker.channel, alert):
                metrics.DELIVERIES.labels(name, "already_dead_lettered").inc()
        self._finish(pending)

    def _accept(
        self, message: Message, alert: dict[str, Any] | InvalidRecord, states: dict[tuple[str, str], str]
    ) -> None:
        self.stats.consumed += 1
        pending = Pending(message, None)
        topic, partition = message.topic(), message.partition()
        assert topic is not None and partition is not None, "a consumed record has both"
        self._partitions.setdefault((topic, partition), deque()).append(pending)
        self._unfinished += 1
        if isinstance(alert, InvalidRecord):
            self._dead_letter(pending, dead_letter_for(message, alert.kind, alert.reason))
            return
        pending.alert = alert
        deadline = self.clock.now() + self.settings.alerts.deadline_s
        routed: set[str] = set()
        for name, worker in self._workers.items():
            if not takes(worker.channel, alert):  # a Webex room limited to other stores
                continue
            routed.add(channel_kind(name))
            key = (alert["alert_id"], name)
            if key in self._inflight:  # the same alert again while its send is under way: wait for that one
                self._inflight[key].append(pending)
                pending.waiting.add(name)
                continue
            state = states.get(key)
            if state == "sent":
                self.stats.skipped_channels += 1
                metrics.DELIVERIES.labels(name, "already_sent").inc()
                continue
            if state == "withheld":  # a forgotten subject's: withheld for good, audited then
                metrics.DELIVERIES.labels(name, "withheld").inc()
                continue
            self._inflight[key] = [pending]
            pending.waiting.add(name)
            worker.submit(Task(alert, name, deadline, maybe_sent=state == "sending", alert_ms=made_at(message, alert)))
        for kind in self._kinds - routed:
            self._unrouted(alert, kind)
        self._maybe_finish(pending)

    def _unrouted(self, alert: dict[str, Any], kind: str) -> None:
        """No room of ``kind`` (Webex) gets the alert's store: ``CG_WEBEX__ROOM_ID`` is limited to other stores, or
        unset, and no room of ``CG_WEBEX__ROOM_STORES`` names it. Counted; logged once per store (then every alert of
        it is the same story); the other channels (e-mail) send it as ever."""
        self.stats.unrouted += 1
        metrics.DELIVERIES.labels(kind, "unrouted").inc()
        store = str(alert.get("store_id"))
        if store not in self._unrouted_stores:
            self._unrouted_stores.add(store)
            log.warning(
                "%s: the alerts of store %s go to no room (CG_WEBEX__ROOM_ID is limited to other stores or unset, and "
                "no room of CG_WEBEX__ROOM_STORES names the store): not sent there, counted as unrouted (first: %s)",
                kind,
                store[:64],
                alert["alert_id"],
            )

    def _drain_outcomes(self) -> None:
        while True:
            try:
                outcome = self._done.get_nowait()
            except queue.Empty:
                return
            for pending in self._inflight.pop(outcome.key, []):
                pending.waiting.discard(outcome.key[1])
                if outcome.withheld is not None:
                    pending.withheld[outcome.key[1]] = outcome.withheld
                if not outcome.delivered:
                    pending.failures[outcome.key[1]] = outcome.reason
                self._maybe_finish(pending)

    def _maybe_finish(self, pending: Pending) -> None:
        if pending.waiting or pending.finished or pending.dead_letter is not None:
            return
        if pending.withheld:
            self._audit_withheld(pending)
        if pending.failures:
            reason = "; ".join(f"{reason}" for _, reason in sorted(pending.failures.items()))
            self._dead_letter(pending, dead_letter_for(pending.message, DELIVERY_FAILED, reason))
            return
        self._out.inc()
        self._finish(pending)

    def _finish(self, pending: Pending) -> None:
        if pending.finished:
            return
        pending.finished = True
        self._unfinished -= 1
        self.stats.alerts_done += 1

    def _audit_withheld(self, pending: Pending) -> None:
        """One ``WITHHOLD`` audit event for an alert not sent on some channel because its subject is forgotten:
        what the forget's erasure prevented is on record beside it (best effort: the alert's offset does not wait)."""
        assert self._producer is not None and pending.alert is not None
        alert, channels = pending.alert, sorted(pending.withheld)
        self.stats.withheld += 1
        at = now_ms()
        event = AuditEvent(
            audit_id=f"withhold:{alert['alert_id']}:{at}",
            event_time=at,
            action="WITHHOLD",
            outcome="DONE",
            actor=STAGE,
            subject_id=alert.get("subject_id"),
            transaction_id=alert.get("transaction_id"),
            reason="alert of a forgotten subject not sent: its snapshot shows the subject's face",
            details={
                "alert_id": alert["alert_id"],
                "channels": ",".join(channels),
                "forgotten": ",".join(sorted(set(pending.withheld.values()))),
            },
        )

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.warning("withhold audit %s not delivered: %s", event.audit_id, err.str())

        try:
            kafka_clients.produce(
                self._producer,
                self.audit_topic,
                event.audit_id.encode(),
                event.encode(),
                on_delivery,
                poll_s=0.1,
                deadline=self._exit_by,  # while running, no limit: a full queue is back-pressure
            )
        except kafka_clients.ProduceGivenUp as exc:
            log.warning("withhold audit %s not produced: %s", event.audit_id, exc)
        pending.withheld = {}

    def _dead_letter(self, pending: Pending, letter: DeadLetter) -> None:
        """Produce the dead letter; the message is finished only when Kafka confirmed it. At a stop, one Kafka has no
        room for by the stop's deadline (``_exit_by``) is given up with a WARNING: its alert is not finished, so not
        committed, and is read again at the next start (before, the stop waited for room past the SIGKILL)."""
        assert self._producer is not None
        pending.dead_letter = letter

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self.stats.dead_lettered += 1
                self._dead_letter_failing = False
                metrics.DEAD_LETTERS.labels(STAGE, letter.error_kind).inc()
                log.warning("dead-lettered %s (%s)", letter.dead_letter_id, letter.error_kind)
                self._record_dead_letter(pending, letter)
                self._finish(pending)
            else:
                self._dead_letter_failing = True
                log.warning("dead letter %s not delivered (%s); retrying", letter.dead_letter_id, err.str())
                self._dead_letter(pending, letter)

        try:
            kafka_clients.produce(
                self._producer,
                self.dead_topic,
                letter.dead_letter_id.encode(),
                letter.encode(),
                on_delivery,
                poll_s=0.1,
                deadline=self._exit_by,  # while running, no limit: a full queue is back-pressure
            )
        except kafka_clients.ProduceGivenUp as exc:
            log.warning(
                "dead letter %s given up, its alert will be read again at the next start: %s",
                letter.dead_letter_id,
                exc,
            )

    def _record_dead_letter(self, pending: Pending, letter: DeadLetter) -> None:
        """Record the confirmed dead letter in the ledger before its offset can be committed, so a re-read (a crash
        between the two) is skipped. A ledger that fails is logged and the alert still finished: its dead letter is in
        Kafka, and only such a re-read would dead-letter it again."""
        alert_id = pending.alert.get("alert_id") if pending.alert is not None else None
        try:
            self.ledger.mark_dead_lettered(position(pending.message), alert_id, letter.error_kind)
        except (LedgerClosed, sqlite3.Error) as exc:
            log.warning(
                "dead letter %s not recorded in the delivery ledger (%s): read again before the offset commit, it "
                "would be dead-lettered again",
                letter.dead_letter_id,
                type(exc).__name__,
            )

    # ------------------------------------------------------------------ offsets and flow

    def _flow_control(self) -> None:
        """Stop fetching while too many alerts are unfinished (a channel is down); resume at half."""
        assert self._consumer is not None
        limit = self.settings.alerts.max_pending_alerts
        if not self._paused and self._unfinished >= limit:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log.warning("alert sender: %d alerts unfinished, fetching paused", self._unfinished)
        elif self._paused and self._unfinished <= limit // 2:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            log.info("alert sender: fetching resumed")

    def _committable(self, partitions: set[tuple[str, int]] | None = None) -> list[TopicPartition]:
        """Per partition, the offset after the longest finished prefix; finished messages are dropped."""
        out = []
        for tp, messages in self._partitions.items():
            if partitions is not None and tp not in partitions:
                continue
            last = None
            while messages and messages[0].finished:
                last = messages.popleft().message.offset()
            if last is not None:
                out.append(TopicPartition(tp[0], tp[1], last + 1))
        return out

    def _commit(self, partitions: set[tuple[str, int]] | None = None) -> None:
        assert self._consumer is not None
        offsets = self._committable(partitions)
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
        except KafkaException as exc:
            log.warning("offset commit failed (%s); those alerts will be replayed and skipped by the ledger", exc)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._drain_outcomes()
        with contextlib.suppress(KafkaException):
            self._commit(revoked)
        for tp in revoked:
            dropped = self._partitions.pop(tp, deque())
            self._unfinished -= sum(1 for p in dropped if not p.finished)
            for p in dropped:
                p.finished = True  # whatever its sends do now, the ledger records it for the next owner


def main(
    group_id: Annotated[str | None, typer.Option(help="Consumer group (default: per channel set).")] = None,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    """Consume alerts and send them by e-mail and Webex until SIGTERM/Ctrl-C."""
    settings = get_settings()
    setup_logging(settings, log_level, "alerts")
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGTERM, signal.SIGINT))  # the stop's deadline counts from the signal's arrival
    sender = AlertSender(settings, group_id=group_id)
    endpoint = metrics.serve(settings, STAGE, health=sender.health, ready=sender.ready)
    try:
        sender.run(stop)
    finally:
        endpoint.close()


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(main)
