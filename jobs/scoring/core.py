"""Every decision of the scoring job, without Flink: records and the clock in, outputs and state writes out.

The Flink operator (:class:`jobs.flink.operator.DecideStep`) only moves data: it loads the state maps
once and hands them to :meth:`DecisionCore.restore`, passes each batch of records to
:meth:`DecisionCore.on_records`, each timer to :meth:`DecisionCore.on_timer` and each rules/watchlist
record to :meth:`DecisionCore.on_control`; it writes the returned :attr:`Step.writes` to MapState,
registers :attr:`Step.timer` and sends :attr:`Step.outputs` to Kafka. Everything in between —
parsing, dead letters, receipts/stores/customers, the face join and its deadline, the watchlist,
``forget``, rule-set updates, the model and the rules — happens here and is tested with plain pytest.

The state lives in this object (the maps are authoritative once restored); a :class:`Step` says which
entries changed, so the operator persists exactly those, once per call.

No single record may stop the job: an exception the job replays after every restore is an endless
restart with nothing scored. So whatever one record raises becomes its dead letter (``internal_error``
with the exception's type and field, never its message, for anything that is not an :class:`InvalidRecord`), a batch of
decisions that raises is decided again one by one so only the failing transactions are dead-lettered,
and after a failure the state writes the record made before it (receipts it expired, too) are kept and
the state entries it touched are written as they now are, so MapState never differs from what this object holds.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from infra.settings import Settings
from jobs.scoring.claims import CLAIMS, ConflictingTransaction, DuplicateTransaction, IdClaims, IdConflict
from jobs.scoring.face_join import (
    DECIDED,
    EARLY_FACES,
    PENDING,
    Ready,
    checkout_seen,
    decode_observation,
    face_join,
    observation_result,
)
from jobs.scoring.face_similarity import EMBEDDING_LENGTHS
from jobs.scoring.features import HISTORY_KEY, PROFILE_KEY, customer_key, identity_keys, receipt_key
from jobs.scoring.rules import RuleSet
from jobs.scoring.scorer import (
    CUSTOMERS,
    DRIFT_EPISODES,
    RECEIPTS,
    STORES,
    Predictor,
    Scorer,
    ScoringState,
    Write,
)
from jobs.scoring.watchlist import check_entry
from schemas.codec import codec
from schemas.errors import INTERNAL_ERROR, InvalidRecord
from schemas.topics import RULES, TRANSACTIONS

log = logging.getLogger("checkout_guard.scoring_job")

LEGACY_BATCH = "batch"
"""Where the job kept transactions waiting for a model batch before batching moved into the JVM: what a
restored checkpoint still holds there is decided at the first call."""
MAPS = (RECEIPTS, STORES, CUSTOMERS, PENDING, EARLY_FACES, LEGACY_BATCH, DECIDED, CLAIMS, DRIFT_EPISODES)
"""The keyed state maps, in the order their writes are committed (also their MapState names)."""
RULES_KEY = "rules"
"""Broadcast state key of the rule set in force; watchlist entries are under ``wl:<subject>``."""
MAX_ERROR_TEXT = 500
"""Most characters of an ``internal_error`` reason (see :func:`_describe`)."""
LOGGED_TRACEBACKS = 20
"""Internal errors logged with their traceback per process; later ones in one line (no log flood)."""

OutRow = tuple[str, bytes | None, bytes | None]
"""(topic, key, value): one output record (the scorer's rows are plain tuples, dead letters too)."""
Writes = dict[str, dict[str, Any]]
"""Map name -> key -> new value, or ``None`` for a removal: the last write of each key, in the order
the keys were first written; maps in :data:`MAPS` order, only those that changed."""
ControlReader = Callable[[Settings, Callable[[str, bytes | None, bytes | None], object]], dict[tuple[str, int], int]]
"""``read_control_topics``'s shape: call ``apply(topic, key, value)`` per record, return the last
offset read per (topic, partition)."""


class SourceRecord(NamedTuple):
    """One Kafka record as the job sees it (a tuple: unpacking it costs what a plain one does).

    What :func:`jobs.flink.frames.unpack_records` yields for each record of a batch from the JVM."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    ts: int
    """Broker timestamp, ms."""
    redriven: bytes | None = None
    """Its :data:`schemas.records.REDRIVEN_HEADER` header: the dead letter a re-driven copy was sent from."""


class Step(NamedTuple):
    """What one call produced."""

    outputs: list[OutRow]
    """Records for Kafka, in order."""
    writes: Writes
    """State changes to persist (see :data:`Writes`)."""
    timer: int | None
    """A processing-time timer to register (ms), or ``None``: one is already due no later."""


class ControlUpdate(NamedTuple):
    """A change of broadcast state: ``value`` ``None`` removes ``key`` (a watchlist tombstone)."""

    key: str
    value: Any


class ControlStep(NamedTuple):
    """What one rules/watchlist record produced."""

    outputs: list[OutRow]
    """A dead letter for a bad update, else nothing."""
    update: ControlUpdate | None
    """The broadcast state change to keep for restores, or ``None`` (nothing to keep)."""


class WatchlistLike(Protocol):
    def search(self, embedding: Any, at_ms: int | None = None) -> Any: ...

    def category(self, subject_id: str, at_ms: int | None = None) -> str | None: ...

    def upsert(self, entry: dict[str, Any]) -> None: ...

    def remove(self, subject_id: str) -> None: ...


class DecisionCore:
    """Parse, match receipts, track stores and customers, join the face, decide: the job's logic.

    ``predictor`` is the fraud model (``jobs.model.predictors.make_predictor``; ``None``: no model),
    ``watchlist`` the suspect/VIP watchlist (``jobs.scoring.watchlist.Watchlist``; ``None``: no
    matching). ``clock`` (seconds, like ``time.time``) stamps dead letters and the decisions' latency
    fields; the face join's "now" is the ``now_ms`` each call is given.
    """

    def __init__(
        self,
        settings: Settings,
        predictor: Predictor | None = None,
        watchlist: WatchlistLike | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.scorer = Scorer(settings, predictor=predictor, clock=clock)
        self.stats = self.scorer.stats
        """Counts and timings for the job's metrics (:mod:`jobs.scoring.stats`), shared with the scorer: it counts
        decisions, dead letters and model calls, this object the records taken and the face waits."""
        self.join = face_join(settings)
        self.claims = IdClaims(settings.rules.receipt_retention_days * 86_400_000)
        self.watchlist = watchlist
        self.state: ScoringState | None = None
        self.restored_ready: list[Ready] = []
        self.forgotten: list[str] = []
        self._broadcast_checked = False
        """Whether :meth:`stale_broadcast` has compared the restored broadcast state with the start-up read."""
        self.deadline_at: int | None = None
        """The earliest timer registered and not yet fired."""
        self.bootstrapped: dict[tuple[str, int], int] | None = None
        """Last control-topic offset applied at start per (topic, partition); ``None``: not read."""
        self._changes: dict[str, dict[str, Any]] = {name: {} for name in MAPS}
        self._late_faces: dict[str, tuple[SourceRecord, tuple[Any, int]]] = {}
        """Transaction id -> the face record released as its late result in this call, and the late-face memory
        entry it took: what a failure of that late result dead-letters and puts back (:meth:`_late_face_failed`)."""
        self._tracebacks = LOGGED_TRACEBACKS
        prefix = settings.kafka.topic_prefix
        self.tx_topic = TRANSACTIONS.full_name(prefix)
        self.rules_topic = RULES.full_name(prefix)
        self.watch_codec = codec("WatchlistEntry")
        self.rules_codec = codec("RuleSetUpdate")

    @property
    def rule_set(self) -> RuleSet:
        return self.scorer.rule_set

    # --- start-up --------------------------------------------------------------------------------
    def bootstrap(self, read: ControlReader | None = None) -> dict[tuple[str, int], int] | None:
        """Read the rule set and the watchlist from their compacted topics before the first decision.

        The broadcast stream alone would race the transactions at a fresh start (a known suspect
        could pass while the watchlist is still streaming in). Returns (and keeps) the last offset
        applied per partition, so :meth:`on_control` skips what is already in force; ``None`` if
        Kafka could not be read, and the broadcast state given to :meth:`restore` is used instead.
        ``read`` defaults to :func:`infra.clients.control_topics.read_control_topics`.
        """
        self.bootstrapped = None
        if not self.settings.job.bootstrap_control:
            return None
        if read is None:
            from infra.clients.control_topics import read_control_topics

            read = read_control_topics
        try:
            self.bootstrapped = read(self.settings, self.apply_control)
        except Exception as err:  # noqa: BLE001 - degrade to the broadcast stream, loudly
            log.warning("could not read the rules/watchlist topics at start (%s); using broadcast state", err)
        return self.bootstrapped

    def apply_control(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """One record of the start-up read: applied; a bad one is skipped (the broadcast stream dead-letters it)."""
        try:
            self._control_record(topic, key, value)
        except Exception as err:  # noqa: BLE001 - the broadcast stream dead-letters it
            log.warning("skipping a bad %s record at start: %s", topic, _control_reason(err))

    def restore(self, maps: dict[str, dict[str, Any]], broadcast: dict[str, Any] | None = None) -> int | None:
        """Load the state maps (by name, see :data:`MAPS`; missing ones are empty) and, unless the
        control topics were read at start, the broadcast state. Returns the timer to register.

        Transactions a checkpoint still holds in the legacy batch map are decided at the next call,
        and their entries removed with that call's writes.
        """
        self.state = ScoringState.restore(
            **{name: dict(maps.get(name) or {}) for name in (RECEIPTS, STORES, CUSTOMERS)}
        )
        self.join.restore(
            dict(maps.get(PENDING) or {}), dict(maps.get(EARLY_FACES) or {}), dict(maps.get(DECIDED) or {})
        )
        self.claims.restore(dict(maps.get(CLAIMS) or {}))
        self.scorer.predictor.restore_drift(dict(maps.get(DRIFT_EPISODES) or {}))
        for tx_id, (env, seen) in (maps.get(LEGACY_BATCH) or {}).items():
            self.restored_ready.append(Ready(env, seen))
            self._changes[LEGACY_BATCH][tx_id] = None
        if self.bootstrapped is None and broadcast:
            for key, value in broadcast.items():
                try:
                    self._check_broadcast(key, value)
                    self._apply_broadcast(key, value)
                except Exception as err:  # noqa: BLE001 - kept before it was checked: leave it out, start
                    log.warning("leaving out broadcast state %s on restore: %s", key[:80], _describe(err))
        return self._arm()

    def _loaded(self) -> ScoringState:
        if self.state is None:
            self.restore({})
        return self.state  # type: ignore[return-value]

    # --- inputs ----------------------------------------------------------------------------------
    def on_records(self, records: Iterable[SourceRecord], now_ms: int) -> Step:
        """A batch of transactions and face observations (any bytes): outputs, writes, timer."""
        state = self._loaded()
        if self.forgotten:
            self._forget_faces()
        outputs: list[OutRow] = []
        ready = self.restored_ready
        self.restored_ready = []
        taken = transactions = 0
        tx_topic = self.tx_topic
        for record in records:
            taken += 1
            transactions += record.topic == tx_topic
            item = self._take(record, state, now_ms, outputs)
            if item is not None:
                ready.append(item)
        self.stats.count_records(taken, transactions)
        self._decide(ready, outputs)
        state.bound_newest(now_ms)  # the sweep's "now" too, even in a call without transactions
        self._persist(state.expire_customers(self.settings.rules.customer_retention_days * 86_400_000))
        self._persist(self.claims.expire(state.newest_event_ms))
        return Step(outputs, self._flush(), self._arm())

    def on_timer(self, fired_at: int, now_ms: int) -> Step:
        """The timer registered for ``fired_at`` fired: transactions past their face deadline go
        ahead with ``face: UNAVAILABLE``, stale early faces are dropped."""
        self._loaded()
        if self.deadline_at is not None and fired_at >= self.deadline_at:
            self.deadline_at = None
        due, writes = self.join.due(now_ms)
        self._persist(writes)
        if self.join.evicted:
            self.stats.face_memory_evicted[DECIDED] = self.join.evicted
        outputs: list[OutRow] = []
        self._decide([*self.restored_ready, *due], outputs)
        self.restored_ready = []
        return Step(outputs, self._flush(), self._arm())

    def on_control(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int
    ) -> ControlStep:
        """A rules or watchlist record from the broadcast stream: applied now (unless the start-up
        read applied it already), and the broadcast state change to keep; a bad one is dead-lettered."""
        done = self.bootstrapped.get((topic, partition), -1) if self.bootstrapped else -1
        try:
            update = self._control_record(topic, key, value, apply=offset > done)
        except Exception as err:  # noqa: BLE001 - a bad update must not stop scoring: dead-letter it
            reason = _control_reason(err)
            log.warning("rejected %s update at offset %s: %s", topic, offset, reason)
            record = SourceRecord(key, value, topic, partition, offset, 0)
            return ControlStep([self._dead_letter(record, "invalid_update", reason)], None)
        return ControlStep([], update)

    def _take(self, record: SourceRecord, state: ScoringState, now: int, out: list[OutRow]) -> Ready | None:
        """One transaction or face observation: state updated, outputs added; what is ready to decide.

        Whatever the record raises is its dead letter (see the module doc); outputs are added only
        when it went through, so a failure leaves none of its own behind.
        """
        parsed: list[dict[str, Any]] = []  # the transaction, once decoded: its state is resynced on failure
        try:
            if record.topic == self.tx_topic:
                return self._take_transaction(record, state, now, out, parsed)
            return self._take_observation(record, now, out)
        except InvalidRecord as err:
            out.append(self._dead_letter(record, err.kind, err.reason))
        except Exception as err:  # noqa: BLE001 - one record must not stop the job: dead-letter it
            self._log_internal(err, f"{record.topic}:{record.partition}:{record.offset}")
            if parsed:
                self._resync(parsed[0])
            out.append(self._dead_letter(record, INTERNAL_ERROR, _describe(err)))
        return None

    def _take_transaction(
        self, record: SourceRecord, state: ScoringState, now: int, out: list[OutRow], parsed: list[dict[str, Any]]
    ) -> Ready | None:
        key, value, topic, partition, offset, ts, redriven = record
        env = self.scorer.parse(value, key, topic, partition, offset, ts, now_ms=now, redriven=redriven)
        if isinstance(env[0], str):  # the dead letter's row
            out.append(env)
            return None
        tx = env[0]
        parsed.append(tx)
        before = state.receipts.get(receipt_key(tx))
        held = before is not None and before.holds(tx["transaction_id"])  # a copy of a processed one, if it goes on
        try:
            return self._observe_and_join(env, state, now, out, zlib.crc32(value or b""))
        except InvalidRecord:
            raise
        except Exception:
            receipt = state.receipts.get(receipt_key(tx))
            if receipt is not None and (receipt is not before or not held):  # this record was seen as processed
                receipt.mark_failed(tx["transaction_id"], tx)
            raise

    def _observe_and_join(self, env: Any, state: ScoringState, now: int, out: list[OutRow], crc: int) -> Ready | None:
        """Steps 2-4 for a parsed transaction, its claim and the face join: what is ready to decide."""
        made: list[Write] = []  # persisted however observe ends: what it expired before a failure stays expired
        try:
            observed, _ = self.scorer.observe(env, state, now_ms=now, writes=made)
        except ConflictingTransaction as err:  # the id's first record under this receipt stands
            out.append(reused_id_dead_letter(self.scorer, err, crc))
            return None
        finally:
            self._persist(made)
        if observed is None:
            return None
        try:
            self._persist(self.claims.claim(observed[0], receipt_key(observed[0])))
        except DuplicateTransaction as err:
            out.append(reused_id_dead_letter(self.scorer, err, crc))
            return None
        ready, writes = self.join.on_transaction(observed, now)
        self._persist(writes)
        return ready

    def _take_observation(self, record: SourceRecord, now: int, out: list[OutRow]) -> Ready | None:
        job = self.settings.job
        length = EMBEDDING_LENGTHS.get(self.settings.faces.embedder)
        obs = decode_observation(record.value, job.max_message_bytes, length, now, job.max_future_skew_ms)
        face = observation_result(obs, self.watchlist)
        if obs["trigger"] == "ENTRANCE" or not obs.get("transaction_id"):
            out.extend(self.scorer.entrance(obs, face))
            return None
        out.extend(self.scorer.lane_sighting(obs, face))
        tx_id = obs["transaction_id"]
        remembered = self.join.decided.get(tx_id)
        ready, writes = self.join.on_observation(tx_id, checkout_seen(obs, face, now))
        self._persist(writes)
        if ready is not None and ready.late and remembered is not None:
            self._late_faces[tx_id] = (record, remembered)
        return ready

    # --- rules and watchlist ---------------------------------------------------------------------
    def _control_record(
        self, topic: str, key: bytes | None, value: bytes | None, apply: bool = True
    ) -> ControlUpdate | None:
        """A rules or watchlist record as a broadcast state change, applied unless ``apply`` is false;
        ``None`` for a rules tombstone (ignored)."""
        if topic == self.rules_topic:
            if value is None:
                return None
            update = ControlUpdate(RULES_KEY, self.rules_codec.decode(value))
            # Parsed even where not applied (the start-up read passed it), so a rule set the job refuses never
            # enters the broadcast state over the one in force: a restore without the read would lose that one.
            rule_set = RuleSet.from_yaml(update.value["yaml"], published=True)
            if apply:
                self._use_rules(rule_set)
            return update
        subject = (key or b"").decode()
        entry = self.watch_codec.decode(value) if value is not None else None
        update = ControlUpdate(f"wl:{subject}", entry)
        self._check_broadcast(*update)
        if apply:
            self._apply_broadcast(*update)
        return update

    def broadcast_check_due(self) -> bool:
        """Whether :meth:`stale_broadcast` has a comparison to make (once per start, after a start-up read): the
        operator reads the broadcast state's keys only then."""
        return not self._broadcast_checked and self.bootstrapped is not None and self.watchlist is not None

    def stale_broadcast(self, keys: Iterable[str]) -> list[str]:
        """Once per start, after a start-up read of the watchlist topic: the watchlist keys of the restored
        broadcast state that the topic no longer holds, for the operator to remove. A checkpoint or savepoint
        taken before a ``forget`` and restored after compaction took the tombstone away (about a day) carried
        the forgotten subject's entry, embeddings and all, into every later checkpoint, and a start whose read
        failed matched the subject again from it. Such a subject was forgotten while the job was away: the buyer
        face on its enrolment receipt goes too, as for a tombstone read. ``[]`` without a read (the broadcast state
        is then in force) and after the first call."""
        if not self.broadcast_check_due():
            return []
        self._broadcast_checked = True
        watchlist = self.watchlist
        assert watchlist is not None  # broadcast_check_due
        stale = [key for key in keys if key.startswith("wl:") and watchlist.category(key[3:]) is None]
        self.forgotten.extend(key[3:] for key in stale)
        return stale

    def _check_broadcast(self, key: str, value: Any) -> None:
        """A watchlist entry the job can use under its key (see :func:`check_entry`), or :class:`InvalidRecord`:
        checked even where it is not applied, so no unusable entry enters the broadcast state."""
        if not key.startswith("wl:") or value is None:
            return
        check_entry(value, EMBEDDING_LENGTHS.get(self.settings.faces.embedder))
        if value["subject_id"] != key[3:]:
            raise InvalidRecord("invalid_entry", "the record key differs from the entry's subject_id")

    def _apply_broadcast(self, key: str, value: Any) -> None:
        if key == RULES_KEY:
            self._use_rules(RuleSet.from_yaml(value["yaml"], published=True))
        elif key.startswith("wl:") and self.watchlist is not None:
            if value is None:
                self.watchlist.remove(key[3:])
                self.forgotten.append(key[3:])
            else:
                self.watchlist.upsert(value)

    def _use_rules(self, rule_set: RuleSet) -> None:
        self.scorer.rule_set = rule_set
        log.info("rule set %s active", rule_set.version)

    def _forget_faces(self) -> None:
        """``forget subj-<tx>`` also drops the subject's buyer faces: that transaction's, and those matched to the
        subject at later sales (keyed state is only reachable on the keyed side, hence the queue)."""
        while self.forgotten:
            subject = self.forgotten.pop()
            if self.state is not None:
                self._persist(self.state.forget_subject(subject))

    # --- decisions -------------------------------------------------------------------------------
    def count_face_waits(self, ready: Iterable[Ready]) -> None:
        """How long released transactions waited in the face join (for the job's timings)."""
        if self.join.enabled:
            self.stats.face_wait_ms.extend(item.waited_ms for item in ready if item.waited_ms is not None)

    def _decide(self, ready: list[Ready], out: list[OutRow]) -> None:
        """Model, rules and outputs for every released transaction, in model calls of ``batch_size``.

        A call that raises is made again per transaction: the others are decided, the failing ones
        dead-lettered (deciding again is safe: it only sets what the first try set).
        """
        self.count_face_waits(ready)
        size = max(1, self.settings.job.batch_size)
        try:
            for start in range(0, len(ready), size):
                chunk = ready[start : start + size]
                try:
                    rows, writes = self._decide_chunk(chunk)
                except Exception as err:  # noqa: BLE001 - find the transaction(s) that fail, decide the rest
                    log.warning("a decision batch of %d failed (%s); deciding one by one", len(chunk), _describe(err))
                    rows, writes = self._decide_each(chunk)
                self._persist(writes)
                out.extend(rows)
        finally:
            self._late_faces.clear()

    def _decide_chunk(self, chunk: list[Ready]) -> tuple[Sequence[OutRow], list[Write]]:
        return self.scorer.decide_batch(
            [item.env for item in chunk],
            seen=[item.seen for item in chunk],
            state=self.state,
            late=[item.late for item in chunk],
        )

    def _decide_each(self, chunk: list[Ready]) -> tuple[Sequence[OutRow], list[Write]]:
        rows: list[OutRow] = []
        writes: list[Write] = []
        for item in chunk:
            tx = item.env[0]
            try:
                more_rows, more_writes = self._decide_chunk([item])
            except Exception as err:  # noqa: BLE001 - this one fails: its dead letter, and on
                tx_id = str(tx.get("transaction_id"))
                if item.late:
                    rows.append(self._late_face_failed(tx, err))
                    continue
                self._log_internal(err, f"decision of {tx_id[:128]}")
                self._unprocessed(tx)
                self._persist(self.join.undecided(tx_id))
                self._resync(tx)
                rows.append(self._decision_dead_letter(tx, err))
                continue
            rows.extend(more_rows)
            writes.extend(more_writes)
        return rows, writes

    def _late_face_failed(self, tx: dict[str, Any], err: Exception) -> OutRow:
        """A late face (its transaction decided without it) whose handling raised. The transaction *was* decided: its
        receipt keeps it as processed (a copy of it is still a redelivery, never decided again). The face observation
        is the dead letter, and the transaction is remembered again for it, so the face's re-drive raises its late
        alert, once."""
        tx_id = str(tx.get("transaction_id"))
        self._log_internal(err, f"late face of {tx_id[:128]}")
        try:  # what the failed try changed on the receipt (a sale's buyer face) is saved as it now is
            rk = receipt_key(tx)
            self._persist([(RECEIPTS, rk, self.state.receipts.get(rk) if self.state is not None else None)])
        except Exception:  # noqa: BLE001 - a transaction without its keys has no receipt
            pass
        late = self._late_faces.pop(tx_id, None)
        if late is None:  # no face record known (cannot happen: a late result comes from one in this call)
            return self._decision_dead_letter(tx, err)
        record, remembered = late
        self._persist(self.join.remember(tx_id, remembered))
        return self._dead_letter(record, INTERNAL_ERROR, _describe(err))

    def _decision_dead_letter(self, tx: dict[str, Any], err: Exception) -> OutRow:
        """A transaction whose decision raised: its id is ``<topic>:decision:<transaction id>`` (stable across
        replays), its payload the record as it was on the topic, with its key, partition and offset, so ``redrive``
        sends it back (:meth:`jobs.scoring.scorer.Scorer.transaction_dead_letter`)."""
        tx_id = str(tx.get("transaction_id"))
        error = InvalidRecord(INTERNAL_ERROR, _describe(err))
        return self.scorer.transaction_dead_letter(tx, error, f"{self.tx_topic}:decision:{tx_id}")

    def _unprocessed(self, tx: dict[str, Any]) -> None:
        """A transaction whose decision failed is not decided: its receipt no longer counts its id as processed, so
        the re-drive of its dead letter is decided (:meth:`jobs.scoring.features.Receipt.mark_failed`), not dropped
        as a redelivered copy. Saved by :meth:`_resync`, with the receipt."""
        try:
            receipt = self.state.receipts.get(receipt_key(tx)) if self.state is not None else None
        except Exception:  # noqa: BLE001 - a transaction without its keys was never filed under a receipt
            return
        if receipt is not None:
            receipt.mark_failed(tx["transaction_id"], tx)

    def _resync(self, tx: dict[str, Any]) -> None:
        """After a failure part-way: write the transaction's state entries as they now are in memory,
        so MapState holds what this object holds (whatever the failed step had changed): its receipt, store and
        profiles, and the entries under its id (its claim, its place in the face join), which a restore rebuilds
        the claims and the face join from."""
        state = self.state
        if state is None:
            return
        try:
            tx_id = tx["transaction_id"]
            keys = ((RECEIPTS, receipt_key(tx), state.receipts), (STORES, tx["store_id"], state.stores))
            ck = customer_key(tx)
            linked, own = identity_keys(tx)
            profiles = ([] if ck.startswith("anon:") else [ck]) + linked + ([] if own is None else [own])
        except Exception:  # noqa: BLE001 - a transaction without its keys changed no state
            return
        self._persist((name, key, entries.get(key)) for name, key, entries in keys)
        self._persist([(CUSTOMERS, key, state.customers.get(key)) for key in profiles])
        join = self.join
        by_id = (
            (CLAIMS, self.claims.claimed),
            (PENDING, join.pending),
            (EARLY_FACES, join.early),
            (DECIDED, join.decided),
        )
        self._persist([(name, tx_id, entries.get(tx_id)) for name, entries in by_id])

    def _log_internal(self, err: Exception, where: str) -> None:
        """The error's :func:`_describe` (no message: it may quote a record's value), with the stack's frames for
        the first :data:`LOGGED_TRACEBACKS` of them."""
        if self._tracebacks > 0:
            self._tracebacks -= 1
            log.warning("dead-lettering %s after an internal error: %s\n%s", where, _describe(err), _stack(err))
        else:
            log.warning("dead-lettering %s after an internal error: %s", where, _describe(err))

    def _dead_letter(self, record: SourceRecord, kind: str, reason: str) -> OutRow:
        key, value, topic, partition, offset = record[:5]
        return self.scorer.dead_letter_row(topic, partition, offset, key, value, InvalidRecord(kind, reason))

    # --- state and timer -------------------------------------------------------------------------
    def _persist(self, writes: Iterable[Write]) -> None:
        """Note changes; the call's :class:`Step` carries the last value of each key."""
        changes = self._changes
        for name, key, value in writes:
            changes[name][key] = value

    def _flush(self) -> Writes:
        out: Writes = {}
        for name, changes in self._changes.items():
            if changes:
                out[name] = changes
                self._changes[name] = {}
        return out

    def _arm(self) -> int | None:
        """Keep one timer, for the earliest face deadline: the one to register, if it is earlier."""
        deadline = self.join.next_deadline()
        if deadline is not None and (self.deadline_at is None or deadline < self.deadline_at):
            self.deadline_at = deadline
            return deadline
        return None


def reused_id_dead_letter(scorer: Scorer, err: IdConflict, crc: int) -> tuple[str, bytes, bytes]:
    """The dead letter of a transaction whose id names another transaction (another receipt's, or one with other
    content under its own), the same on both layouts (the partitioned one finds it at the receipt or the gather
    step, where no source offset is known): one per record (``crc``, its bytes' CRC-32), with the transaction as
    parsed."""
    tx = {k: v for k, v in err.tx.items() if k not in (PROFILE_KEY, HISTORY_KEY)}
    tx_id = str(tx.get("transaction_id"))
    try:
        value: bytes | None = _TX_CODEC.encode(tx)
    except Exception:  # noqa: BLE001 - the reason still names the transaction
        value = None
    topic = TRANSACTIONS.full_name(scorer.settings.kafka.topic_prefix)
    return scorer.dead_letter_row(
        topic, -1, -1, tx_id.encode(), value, err, dead_letter_id=f"{topic}:{err.kind}:{tx_id}:{crc}"
    )


_TX_CODEC = codec("PosTransaction")


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A field name in an Avro schema path (a map key there could be a value: it is left out)."""


def _describe(err: BaseException) -> str:
    """An exception as a dead letter's reason and log text: its type, the record field it is about where the error
    says (an Avro encode error's schema path), and the function that raised it; at most :data:`MAX_ERROR_TEXT`
    characters. Never its message: an encode error's quotes the field's value (an e-mail, a card token), a
    ``KeyError``'s the key (a customer key), and the reason is stored in the dead letter and logged."""
    text = type(err).__name__
    path = _field_path(err)
    if path:
        text += f" at field {path}"
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        text += f" in {frames[-1].name} ({frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})"
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _control_reason(err: Exception) -> str:
    """A refused rules or watchlist record's reason and log text: an :class:`InvalidRecord`'s own (the job's checks
    word it without values), else :func:`_describe`: a decode error's or a rule set error's message may quote the
    record (a watchlist entry's name, the rules' YAML)."""
    return err.reason if isinstance(err, InvalidRecord) else _describe(err)


def _field_path(err: BaseException) -> str:
    """The field an error is about, as ``items[0].sku``, from the schema path an Avro (cavro) error carries on
    itself or on its cause; ``""`` when it carries none."""
    seen: BaseException | None = err
    for _ in range(4):  # the error and a few of its causes
        if seen is None:
            return ""
        path = getattr(seen, "schema_path", None)
        if isinstance(path, tuple | list):
            parts = []
            for part in path:
                if isinstance(part, int):
                    parts.append(f"[{part}]")
                elif isinstance(part, str) and _NAME.fullmatch(part):
                    parts.append(f".{part}" if parts else part)
                else:
                    parts.append("[?]")
            return "".join(parts)
        seen = seen.__cause__ or seen.__context__
    return ""


def _stack(err: BaseException) -> str:
    """An exception's traceback without its message (the frames: file, line, function and source line)."""
    return "Traceback (most recent call last):\n" + "".join(traceback.format_tb(err.__traceback__)).rstrip("\n")
