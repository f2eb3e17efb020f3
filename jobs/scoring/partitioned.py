"""The scoring path with its state partitioned by what it is about, so it can run at parallelism N.

:class:`jobs.scoring.core.DecisionCore` keeps every map under one key: simple, but one slot. No state is
truly job-wide, though; each map belongs with one key, and each step here holds one kind:

=========  =================  ==========================================================  ==========
step       keyed by           does                                                        then
=========  =================  ==========================================================  ==========
route      (no state)         parse a transaction or face observation; dead letters;      receipt,
                              entrance alerts; the watchlist search                       gather
receipt    receipt key        duplicates, sale/return matching (a return is filed under   store
                              the sale it returns, so the two meet)
store      store id           return bursts                                               identity,
                                                                                          gather
identity   profile key        the customer's profile, and each linked identity's (card,   gather
                              id, e-mail, IP): one message per identity
gather     transaction id     the profile features put together; the face join            decide
decide     receipt key        the buyer's face kept (sale) or compared (return); model,   Kafka
                              rules, scored rows and alerts
=========  =================  ==========================================================  ==========

Every step is deterministic in the order one key's messages reach it, and each step takes a key's
messages in :func:`order` (event time, transaction id, content): where the job runs a step on several
slots, a key meets the same sequence as on one. Event time is the transaction's own: where
``DecisionCore`` asks whether a profile is idle against the newest event the whole job has seen, a step
asks it against the transaction at hand: the same answer in an event-time ordered stream, and one that
does not depend on how other keys' traffic interleaves. The logic of each step is the single-state
path's own (``Receipt``, ``StoreActivity``, ``CustomerProfile``, ``combine_linked``, ``FaceJoin``,
``Scorer.decide_batch``), so training, backtests and both layouts compute the same features.

:class:`PartitionedCore` runs the steps in one process over ``shards`` instances each (how the job's
parallel layout divides them): the reference the equivalence tests and the benchmark use.
"""

from __future__ import annotations

import copy
import heapq
import logging
import pickle
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from infra.settings import Settings
from jobs.scoring.claims import CLAIMS, IdClaims, IdConflict
from jobs.scoring.core import SourceRecord, WatchlistLike, _describe, _stack, reused_id_dead_letter
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
from jobs.scoring.features import (
    PROFILE_KEY,
    Activity,
    CustomerProfile,
    Receipt,
    StoreActivity,
    combine_linked,
    customer_key,
    identity_keys,
    receipt_key,
)
from jobs.scoring.scorer import CUSTOMER_SWEEP_BUDGET, OutRow, Predictor, Scorer, ScoringState
from jobs.scoring.validation import SOURCE_KEY, redriven_from
from schemas.errors import INTERNAL_ERROR, CheckoutGuardError, InvalidRecord
from schemas.topics import FACE_OBSERVATIONS, TRANSACTIONS

log = logging.getLogger("checkout_guard.scoring_job")

ROUTE, RECEIPT, STORE, IDENTITY, GATHER, DECIDE = "route", "receipt", "store", "identity", "gather", "decide"
KEYED_STEPS = (RECEIPT, STORE, IDENTITY, GATHER, DECIDE)
"""The keyed steps, in the order a transaction passes them."""

GATHERING, BUYER_FACES = "gathering", "buyer_faces"
"""The gather step's transactions waiting for their profiles' answers; the decide step's buyer faces."""
STEP_MAPS: dict[str, tuple[str, ...]] = {
    RECEIPT: ("receipts",),
    STORE: ("stores",),
    IDENTITY: ("profiles",),
    GATHER: (GATHERING, PENDING, EARLY_FACES, DECIDED, CLAIMS),
    DECIDE: (BUYER_FACES,),
}
"""Each keyed step's state maps (their MapState names in the job)."""

COUNTED_KEY = "_counted"
"""Key of the transaction dict (and of its profiles' messages) set by the receipt on the re-drive of a failure at a
:data:`COUNTED_STEPS` step: its store and profiles counted it before that failure, so they read it without counting
it a second time."""

FAILED_ANSWER = "failed"
"""The gather's message for a profile whose identity step raised (with the reason): the transaction does not wait
for an answer that will never come, and is dead-lettered with its record (:class:`ProfileFailed`)."""

GATHER_TIMEOUT_MS = 3_600_000
"""How long (wall clock) an incomplete gather is kept (see :meth:`GatherStep.expire`)."""

Order = tuple[int, str, int]
"""(event time, transaction id, CRC-32 of the record): the order a step takes one key's messages in. The
checksum orders two different records under one transaction id the same way on every layout."""


_RECORD_SEP = "\x1f"


def gathering_key(tx_id: str, order_: Order) -> str:
    """A transaction's entry in the gather step: its id and its record's checksum, so two records under one id
    (the second is a dead letter: :mod:`jobs.scoring.claims`) never mix their profiles' answers."""
    return f"{tx_id}{_RECORD_SEP}{order_[2]}"


class ProfileFailed(CheckoutGuardError):
    """A transaction's gather is complete but a profile's answer was a failure (its identity step raised):
    :func:`take` makes it the transaction's own dead letter, with its record, so its re-drive decides it."""

    step = IDENTITY
    """The step the letter names (:func:`failure_letter_id`)."""

    def __init__(self, env: Any, reason: str) -> None:
        super().__init__(reason)
        self.env = env
        self.reason = reason


class GatherFailed(ProfileFailed):
    """A transaction's answers were all in, and putting it together (its profile features, its claim, the face join)
    raised: whichever of its messages came last (usually a profile's answer, which does not carry the record), the
    letter is the transaction's, with its record, as for a failed profile."""

    step = GATHER


class Emit(NamedTuple):
    """A message for a keyed step."""

    step: str
    key: str
    order: Order
    payload: Any


def order(tx: dict[str, Any], value: bytes | None) -> Order:
    return (tx["event_time"], tx["transaction_id"], zlib.crc32(value or b""))


def shard_of(key: str, shards: int) -> int:
    """A key's shard: stable across processes and runs (Python's own ``hash`` of a str is salted)."""
    return zlib.crc32(key.encode()) % shards


class RouteStep:
    """Parse and route, no state: a transaction to its receipt, a face observation to its transaction."""

    def __init__(self, scorer: Scorer, watchlist: WatchlistLike | None) -> None:
        self.scorer = scorer
        self.watchlist = watchlist
        settings = scorer.settings
        self.max_bytes = settings.job.max_message_bytes
        self.embedding_length = EMBEDDING_LENGTHS.get(settings.faces.embedder)
        self.tx_topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)

    def on_record(self, record: SourceRecord, now_ms: int, newest_ms: int) -> tuple[list[Emit], list[OutRow]]:
        """``newest_ms``: the job's event-time progress (its watermark); an event older than it by more
        than the state keeps is ``too_late``, as in ``Scorer.observe``."""
        try:
            if record.topic == self.tx_topic:
                return self._transaction(record, now_ms, newest_ms)
            return self._observation(record, now_ms)
        except InvalidRecord as err:
            return [], [self._dead_letter(record, err.kind, err.reason)]
        except Exception as err:  # noqa: BLE001 - one record must not stop the job: dead-letter it
            log.warning(
                "dead-lettering %s:%s:%s after an internal error", record.topic, record.partition, record.offset
            )
            return [], [self._dead_letter(record, INTERNAL_ERROR, _describe(err))]

    def _transaction(self, record: SourceRecord, now_ms: int, newest_ms: int) -> tuple[list[Emit], list[OutRow]]:
        key, value, topic, partition, offset, ts, redriven = record
        env = self.scorer.parse(value, key, topic, partition, offset, ts, now_ms=now_ms, redriven=redriven)
        if isinstance(env[0], str):  # the dead letter's row
            return [], [env]
        tx = env[0]
        self.scorer.check_horizon(tx["event_time"], min(newest_ms, now_ms))
        return [Emit(RECEIPT, receipt_key(tx), order(tx, value), env)], []

    def _observation(self, record: SourceRecord, now_ms: int) -> tuple[list[Emit], list[OutRow]]:
        skew = self.scorer.settings.job.max_future_skew_ms
        obs = decode_observation(record.value, self.max_bytes, self.embedding_length, now_ms, skew)
        face = observation_result(obs, self.watchlist)
        if obs["trigger"] == "ENTRANCE" or not obs.get("transaction_id"):
            return [], self.scorer.entrance(obs, face)
        tx_id = obs["transaction_id"]
        seen = checkout_seen(obs, face, now_ms)
        emit = Emit(GATHER, tx_id, (obs["event_time"], tx_id, zlib.crc32(record.value or b"")), ("face", seen))
        return [emit], self.scorer.lane_sighting(obs, face)

    def _dead_letter(self, record: SourceRecord, kind: str, reason: str) -> OutRow:
        key, value, topic, partition, offset = record[:5]
        return self.scorer.dead_letter_row(topic, partition, offset, key, value, InvalidRecord(kind, reason))


class _Keyed:
    """A step's maps (name -> key -> value) and the entries changed since the last :meth:`flush`, which the
    Flink operator writes to MapState once per call (``None``: removed)."""

    MAPS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.changes: dict[str, dict[str, Any]] = {name: {} for name in self.MAPS}

    def _put(self, name: str, key: str, value: Any) -> None:
        self.changes[name][key] = value

    def flush(self) -> dict[str, dict[str, Any]]:
        out = {name: changed for name, changed in self.changes.items() if changed}
        self.changes = {name: {} for name in self.MAPS}
        return out

    def _maps(self) -> dict[str, dict[str, Any]]:
        """The step's maps by name (what :meth:`resync` re-writes)."""
        return {}

    def resync(self, key: str) -> None:
        """After a message failed part-way: write ``key``'s entries as they now are in memory, so the
        persisted state never differs from what this step holds."""
        for name, entries in self._maps().items():
            self._put(name, key, entries.get(key))


class ReceiptStep(_Keyed):
    """Keyed by receipt: a transaction seen before is dropped; a return meets its sale."""

    MAPS = STEP_MAPS[RECEIPT]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.rules = settings.rules
        self.tx_topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
        self.retention_ms = settings.rules.receipt_retention_days * 86_400_000
        self.receipts: dict[str, Receipt] = {}
        self.by_time: list[tuple[int, str]] = []
        """(sale time, receipt key), a heap: what :meth:`expire` looks at first."""

    def _maps(self) -> dict[str, dict[str, Any]]:
        return {"receipts": self.receipts}

    def restore(self, maps: dict[str, dict[str, Any]]) -> None:
        self.receipts = dict(maps.get("receipts") or {})
        # A receipt only returns were made against has no sale time: dated by the newest one restored (it
        # keeps its duplicate check for a return window from now, never less).
        newest = max((r.event_time for r in self.receipts.values()), default=0)
        self.by_time = [(r.event_time or r.opened or newest, k) for k, r in self.receipts.items()]
        heapq.heapify(self.by_time)

    def on(self, key: str, env: Any, order_: Order) -> list[Emit]:
        """The transaction matched on its receipt, sent on to its store; ``[]`` for a copy. When this raises (an
        internal error) after the receipt took its id, the id is marked failed there (``Receipt.mark_failed``), so
        the re-drive of its dead letter is taken, not dropped as a copy; so is the re-drive of a later step's
        letter (:func:`failed_after_receipt`), which that step cannot mark here."""
        tx_id = env[0]["transaction_id"]
        before = self.receipts.get(key)
        held = before is not None and before.holds(tx_id)
        retaken = before.retaken if before is not None else ()
        try:
            return self._on(key, env, order_)
        except InvalidRecord:
            raise
        except Exception:
            receipt = self.receipts.get(key)
            # taken by this call: new here, a failed one's copy, or a later step's letter retaken (it was held)
            if receipt is not None and (receipt is not before or not held or receipt.retaken != retaken):
                receipt.mark_failed(tx_id)
            raise

    def _on(self, key: str, env: Any, order_: Order) -> list[Emit]:
        tx, ind, _ = env
        receipt = self.receipts.get(key)
        if receipt is None or 0 < receipt.event_time < tx["event_time"] - self.retention_ms:
            receipt = Receipt()  # unknown, or its sale is past the return window before this transaction
        unsold = receipt.sale_id is None
        letter = redriven_from(tx)
        step = failed_step(letter, self.tx_topic, tx["transaction_id"])
        found = receipt.observe(tx, customer_key(tx), self.rules, letter if step is not None else None)
        if found is None:
            return []
        ind.update(found)
        if step in COUNTED_STEPS:
            tx[COUNTED_KEY] = True
        if self.receipts.get(key) is not receipt or (unsold and receipt.sale_id is not None):
            # a sale filling a receipt its return opened is dated again (see ``Scorer.observe``)
            heapq.heappush(self.by_time, (receipt.event_time or tx["event_time"], key))
        self.receipts[key] = receipt
        self._put("receipts", key, receipt)
        return [Emit(STORE, tx["store_id"], order_, env)]

    def expire(self, newest_ms: int) -> list[str]:
        """Receipts older than the return window before ``newest_ms`` (the step's watermark): forgotten."""
        cutoff = newest_ms - self.retention_ms
        gone = []
        while self.by_time and self.by_time[0][0] < cutoff:
            _, key = heapq.heappop(self.by_time)
            receipt = self.receipts.get(key)
            if receipt is not None and (receipt.event_time or receipt.opened) < cutoff:
                del self.receipts[key]
                self._put("receipts", key, None)
                gone.append(key)
        return gone


class StoreStep(_Keyed):
    """Keyed by store: return bursts; then one message per profile the transaction touches, and the
    transaction itself to its gather."""

    MAPS = STEP_MAPS[STORE]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.rules = settings.rules
        self.stores: dict[str, StoreActivity] = {}

    def _maps(self) -> dict[str, dict[str, Any]]:
        return {"stores": self.stores}

    def restore(self, maps: dict[str, dict[str, Any]]) -> None:
        self.stores = dict(maps.get("stores") or {})

    def on(self, key: str, env: Any, order_: Order) -> list[Emit]:
        tx, ind, _ = env
        activity = self.stores.get(key)
        recount = tx.get(COUNTED_KEY, False)
        if recount:  # counted before the failure its re-drive comes from: read as it is, not counted again
            activity = copy.deepcopy(activity or StoreActivity())
        elif activity is None or tx["kind"] == "RETURN":  # sales leave a known store's activity as it was
            activity = self.stores[key] = activity or StoreActivity()
            self._put("stores", key, activity)
        ind.update(activity.observe(tx, self.rules))
        tx_id = tx["transaction_id"]
        brief = {k: tx[k] for k in ("event_time", "amount", "store_id", "kind")}
        if recount:
            brief[COUNTED_KEY] = True
        ck = customer_key(tx)
        parts = [] if ck.startswith("anon:") else [Emit(IDENTITY, ck, order_, ("customer", tx_id, brief))]
        linked, own = identity_keys(tx)
        parts += [Emit(IDENTITY, k, order_, ("linked", tx_id, brief)) for k in linked]
        # the own identity is only counted in: it answers nothing, so the gather waits for the others
        counted = [] if own is None or recount else [Emit(IDENTITY, own, order_, ("own", tx_id, brief))]
        return [Emit(GATHER, tx_id, order_, ("tx", env, len(parts))), *parts, *counted]


class IdentityStep(_Keyed):
    """Keyed by profile (a customer key, or ``ent:<kind>:<value>`` for a linked identity)."""

    MAPS = STEP_MAPS[IDENTITY]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.rules = settings.rules
        self.retention_ms = settings.rules.customer_retention_days * 86_400_000
        self.profiles: dict[str, CustomerProfile] = {}
        self.sweep: list[str] = []

    def _maps(self) -> dict[str, dict[str, Any]]:
        return {"profiles": self.profiles}

    def restore(self, maps: dict[str, dict[str, Any]]) -> None:
        self.profiles = dict(maps.get("profiles") or {})

    def on(self, key: str, part: Any, order_: Order) -> list[Emit]:
        role, tx_id, brief = part
        now = brief["event_time"]
        idle_before = now - self.retention_ms
        profile = self.profiles.get(key)
        if profile is None or profile.idle_since(idle_before):
            profile = CustomerProfile()  # unknown, or idle past its retention
        if brief.get(COUNTED_KEY):  # counted before the failure its re-drive comes from: read, not counted again
            profile = copy.deepcopy(profile)
        else:
            self.profiles[key] = profile
            self._put("profiles", key, profile)
        if role == "customer":
            result: Any = profile.observe_profile(brief, self.rules)
        else:
            result = profile.observe_identity(now, brief["amount"])
        return [] if role == "own" else [Emit(GATHER, tx_id, order_, (role, result))]

    def expire(self, newest_ms: int, budget: int = CUSTOMER_SWEEP_BUDGET) -> list[str]:
        """Profiles idle for their retention before ``newest_ms``, looking at ``budget`` of them per call
        (as ``ScoringState.expire_customers``): a profile met idle is started over anyway."""
        if not self.sweep:
            self.sweep = list(self.profiles)
        cutoff = newest_ms - self.retention_ms
        gone = []
        for _ in range(min(budget, len(self.sweep))):
            key = self.sweep.pop()
            profile = self.profiles.get(key)
            if profile is not None and profile.idle_since(cutoff):
                del self.profiles[key]
                self._put("profiles", key, None)
                gone.append(key)
        return gone


class GatherStep(_Keyed):
    """Keyed by transaction: waits for every profile's answer, then for the face (the face join)."""

    MAPS = STEP_MAPS[GATHER]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.rules = settings.rules
        self.join = face_join(settings)
        self.gathering: dict[str, list[Any]] = {}
        """:func:`gathering_key` -> [envelope or None, answers still due, customer answer, linked activities, when
        it was opened (wall clock, ms)]."""
        self.claims = IdClaims(settings.rules.receipt_retention_days * 86_400_000)
        self.newest_ms = 0
        """The newest event time gathered: the claims' expiry."""

    def _maps(self) -> dict[str, dict[str, Any]]:
        return {
            GATHERING: self.gathering,
            PENDING: self.join.pending,
            EARLY_FACES: self.join.early,
            DECIDED: self.join.decided,
            CLAIMS: self.claims.claimed,
        }

    def restore(self, maps: dict[str, dict[str, Any]]) -> None:
        self.gathering = dict(maps.get(GATHERING) or {})
        self.join.restore(
            dict(maps.get(PENDING) or {}), dict(maps.get(EARLY_FACES) or {}), dict(maps.get(DECIDED) or {})
        )
        self.claims.restore(dict(maps.get(CLAIMS) or {}))

    def on(self, key: str, part: Any, order_: Order, now_ms: int) -> list[Emit]:
        kind = part[0]
        if kind == "face":
            ready, writes = self.join.on_observation(key, part[1])
            self._persist(writes)
            return self._released(ready, order_)
        at = gathering_key(key, order_)
        if at not in self.gathering and key in self.gathering:
            at = key  # opened by a job from before the record's checksum keyed it
        entry = self.gathering.setdefault(at, [None, 0, None, [], now_ms])
        if kind == "tx":
            entry[0] = part[1]
            entry[1] += part[2]
        elif kind == "customer":
            entry[1] -= 1
            entry[2] = part[1]
        elif kind == FAILED_ANSWER:
            entry[1] -= 1
            entry[5:] = [part[1]]  # the reason (a sixth field: only a failed gather has it)
        else:
            entry[1] -= 1
            entry[3].append(part[1])
        if entry[0] is None or entry[1] > 0:
            self._put(GATHERING, at, entry)
            return []
        del self.gathering[at]
        self._put(GATHERING, at, None)
        if len(entry) > 5:
            raise ProfileFailed(entry[0], entry[5])
        try:
            env = self._complete(entry[0], entry[2], entry[3])
            tx = env[0]
            self.newest_ms = max(self.newest_ms, tx["event_time"])
            self._persist(self.claims.claim(tx, receipt_key(tx)))
            ready, writes = self.join.on_transaction(env, now_ms)
        except IdConflict:  # the record's own fault: its dead letter as such (take)
            raise
        except Exception as err:  # the entry is gone: the letter must carry the record (GatherFailed)
            raise GatherFailed(entry[0], _describe(err)) from err
        self._persist(writes)
        return self._released(ready, order_)

    def expire(self, now_ms: int) -> list[str]:
        """Transactions that have waited an hour (wall clock) for an answer that never came (a message lost
        upstream: a profile's failure is answered, :data:`FAILED_ANSWER`), so the rest would wait for good. (Wall
        clock, not event time: a transaction an hour late is legal and is gathered like any other.)"""
        self._persist(self.claims.expire(self.newest_ms))
        cutoff = now_ms - GATHER_TIMEOUT_MS
        if not self.gathering or cutoff <= 0:
            return []
        gone = [k for k, entry in self.gathering.items() if entry[4] < cutoff]
        for key in gone:
            del self.gathering[key]
            self._put(GATHERING, key, None)
        return gone

    def _persist(self, writes: Iterable[tuple[str, str, Any]]) -> None:
        for name, key, value in writes:
            self._put(name, key, value)

    def resync(self, key: str) -> None:
        super().resync(key)
        for at in [at for at in self.gathering if at.startswith(f"{key}{_RECORD_SEP}")]:
            self._put(GATHERING, at, self.gathering[at])

    def _complete(self, env: Any, customer: Any, linked: list[Activity]) -> Any:
        tx, ind, _ = env
        if customer is None:  # an anonymous buyer: no history, a new profile each time (as DecisionCore)
            customer = CustomerProfile().observe_profile(tx, self.rules)
        found, features = customer
        ind.update(found)
        tx[PROFILE_KEY] = features + combine_linked(linked)
        return env

    def due(self, now_ms: int) -> list[Emit]:
        """Transactions past their face deadline go ahead without it."""
        ready, writes = self.join.due(now_ms)
        self._persist(writes)
        return [e for item in ready for e in self._released(item, order(item.env[0], None))]

    @staticmethod
    def _released(item: Ready | None, order_: Order) -> list[Emit]:
        if item is None:
            return []
        return [Emit(DECIDE, receipt_key(item.env[0]), order_, item)]


class DecideStep(_Keyed):
    """Keyed by receipt: the buyer's face of a sale kept, a return's face compared with it; then the
    model (one call per batch), the rules and the outputs (``Scorer.decide_batch``, unchanged)."""

    MAPS = STEP_MAPS[DECIDE]

    def __init__(self, scorer: Scorer) -> None:
        super().__init__()
        self.scorer = scorer
        self.faces = ScoringState()
        """Buyer faces by receipt key, as skeletal receipts (sale id, sale time, face) for ``decide_batch``."""

    def _maps(self) -> dict[str, dict[str, Any]]:
        return {BUYER_FACES: self.faces.receipts}

    def restore(self, maps: dict[str, dict[str, Any]]) -> None:
        self.faces = ScoringState.restore(dict(maps.get(BUYER_FACES) or {}), {}, {})

    def on_batch(self, items: list[tuple[str, Ready]]) -> list[OutRow]:
        if not items:
            return []
        faces = self.faces
        added = []
        for key, item in items:
            tx = item.env[0]
            if tx["event_time"] > faces.newest_event_ms:
                faces.newest_event_ms = tx["event_time"]
            if tx["kind"] == "SALE" and item.seen.embedding is not None and key not in faces.receipts:
                faces.receipts[key] = Receipt(sale_id=tx["transaction_id"], event_time=tx["event_time"])
                added.append(key)
        envs, seen = [i.env for _, i in items], [i.seen for _, i in items]
        late = [i.late for _, i in items]
        try:
            rows, writes = self.scorer.decide_batch(envs, seen=seen, state=faces, own_time=True, late=late)
        finally:  # a sale whose face was not kept (its decision raised, too): no placeholder is left, in memory
            for key in added:  # or, by a resync, in state, where nothing would ever expire it (it has no face)
                placeholder = faces.receipts.get(key)
                if placeholder is not None and placeholder.sale_face is None:
                    del faces.receipts[key]
        for _, key, receipt in writes:
            self._put(BUYER_FACES, key, receipt)
        return rows

    def expire(self) -> list[str]:
        """Buyer faces past their retention (biometric data) before the newest sale decided here."""
        changed = self.faces.expire_faces(self.faces.newest_event_ms, self.scorer.face_retention_ms)
        gone = [key for _, key, _ in changed]
        for key in gone:
            self.faces.receipts.pop(key, None)
            self._put(BUYER_FACES, key, None)
        return gone

    def forget(self, subject_id: str) -> bool:
        """``forget subj-<tx>``: that sale's buyer face goes, and those matched to the subject at later sales that
        this shard holds (:meth:`ScoringState.forget_subject`). Whether any went."""
        gone = [key for _, key, _ in self.faces.forget_subject(subject_id)]
        for key in gone:
            self.faces.receipts.pop(key, None)
            self._put(BUYER_FACES, key, None)
        return bool(gone)


class _Shard:
    """One instance of every keyed step: what one slot of the parallel job holds."""

    def __init__(self, settings: Settings, scorer: Scorer) -> None:
        self.receipt = ReceiptStep(settings)
        self.store = StoreStep(settings)
        self.identity = IdentityStep(settings)
        self.gather = GatherStep(settings)
        self.decide = DecideStep(scorer)


class PartitionedCore:
    """The keyed steps over ``shards`` instances each, in one process: each batch goes through route,
    then every step in turn; a step's instance takes its messages in :func:`order`.

    ``predictor`` and ``watchlist`` as for ``DecisionCore``; the scorer (parse, dead letters, decisions)
    is shared, as the model is per slot in the job.
    """

    def __init__(
        self,
        settings: Settings,
        shards: int = 1,
        predictor: Predictor | None = None,
        watchlist: WatchlistLike | None = None,
        clock: Callable[[], float] = time.time,
        wire: bool = False,
    ) -> None:
        self.settings = settings
        self.shards = shards
        self.wire = wire
        """Pickle every message between steps, as a crossing into the JVM and back would: what the
        benchmark adds to price the parallel layout's extra hops."""
        self.scorer = Scorer(settings, predictor=predictor, clock=clock)
        self.route = RouteStep(self.scorer, watchlist)
        self.slots = [_Shard(settings, self.scorer) for _ in range(shards)]
        self.newest_ms = 0
        self.batch_size = max(1, settings.job.batch_size)

    def on_records(self, records: Iterable[SourceRecord], now_ms: int) -> list[OutRow]:
        outputs: list[OutRow] = []
        emits: list[Emit] = []
        for record in records:
            more, rows = self.route.on_record(record, now_ms, self.newest_ms)
            emits += more
            outputs += rows
            for e in more:
                if e.step == RECEIPT and e.order[0] > self.newest_ms:
                    self.newest_ms = min(e.order[0], now_ms)
        self._run(emits, now_ms, outputs)
        for slot in self.slots:  # bounded memory: what no later decision may read goes
            slot.receipt.expire(self.newest_ms)
            slot.identity.expire(self.newest_ms)
            slot.gather.expire(now_ms)
            slot.decide.expire()
        return outputs

    def forget(self, subject_id: str) -> bool:
        """A watchlist tombstone for ``subj-<tx>``: the subject's buyer faces go, from every slot (a later sale
        matched to the subject is filed under its own receipt's shard)."""
        return any([slot.decide.forget(subject_id) for slot in self.slots])

    def on_timer(self, now_ms: int) -> list[OutRow]:
        outputs: list[OutRow] = []
        self._run([e for slot in self.slots for e in slot.gather.due(now_ms)], now_ms, outputs)
        return outputs

    def _run(self, emits: list[Emit], now_ms: int, outputs: list[OutRow]) -> None:
        for step in KEYED_STEPS:
            mine = sorted((e for e in emits if e.step == step), key=message_rank)
            if self.wire:  # each message crosses once, into the step that takes it
                mine = [e._replace(payload=pickle.loads(pickle.dumps(e.payload, 5))) for e in mine]
            emits = [e for e in emits if e.step != step]
            by_slot: dict[int, list[Emit]] = defaultdict(list)
            for e in mine:
                by_slot[shard_of(e.key, self.shards)].append(e)
            for index, batch in sorted(by_slot.items()):
                slot = self.slots[index]
                if step == DECIDE:
                    for start in range(0, len(batch), self.batch_size):
                        outputs += decide_chunk(slot.decide, batch[start : start + self.batch_size], self.scorer)
                    continue
                more, failed = take(getattr(slot, step), step, batch, now_ms, self.scorer)
                emits += more
                outputs += failed


class ForgetQueue:
    """Forgotten subjects waiting for each shard's next batch on this slot (only the current key's state is
    writable): every shard, since a later sale matched to the subject sits under its own receipt's shard.

    A slot sees only its own shards, and which those are Flink decides, so a forget is queued for all of them;
    the entries of shards another slot owns are dropped once older than the buyer faces' retention (the faces
    are gone by then anyway): kept for ever, they grew by one entry per shard at every forget."""

    def __init__(self, shards: int, keep_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.shards, self.keep_s, self.clock = shards, keep_s, clock
        self.queued: dict[str, dict[str, float]] = {}

    def add(self, subject: str) -> None:
        now = self.clock()
        for each in range(self.shards):
            self.queued.setdefault(str(each), {})[subject] = now

    def take(self, shard: str) -> list[str]:
        """The subjects queued for ``shard`` (now applied there), after dropping every entry past its time."""
        horizon = self.clock() - self.keep_s
        for key in list(self.queued):
            entries = self.queued[key]
            for subject in [s for s, at in entries.items() if at < horizon]:
                del entries[subject]
            if not entries:
                del self.queued[key]
        return sorted(self.queued.pop(shard, {}))


def failure_letter_id(topic: str, step: str, tx: dict[str, Any]) -> str:
    """The id of ``tx``'s dead letter when ``step`` failed on it: ``<transactions topic>:<step>:<transaction
    id>@<partition>:<offset>`` (where its record was read), stable across replays of that record; a re-driven copy
    that fails again is read elsewhere, so its letter is another one (:func:`failed_after_receipt`). Without a
    known position (a transaction held in state from an older job), ``@-1:-1``: an id without the tail is an older
    job's letter."""
    tx_id = str(tx["transaction_id"])
    source = tx.get(SOURCE_KEY)
    if source is not None and source[1] >= 0:
        return f"{topic}:{step}:{tx_id}@{source[1]}:{source[2]}"
    return f"{topic}:{step}:{tx_id}@-1:-1"


_POSITION_TAIL = re.compile(r"@-?\d+:-?\d+")
LATER_STEPS = (STORE, IDENTITY, GATHER, DECIDE)
"""The keyed steps after the receipt: one failing on a transaction cannot mark it failed on its receipt."""

COUNTED_STEPS = (GATHER, DECIDE)
"""The steps whose failure on a transaction comes after its store and every profile counted it in (the identity
steps all answer before its gather completes)."""


def failed_after_receipt(letter: str | None, topic: str, tx_id: str) -> bool:
    """Whether ``letter`` (a re-driven copy's ``REDRIVEN_HEADER``) is the dead letter of transaction ``tx_id``
    failing at a step after its receipt (:func:`failure_letter_id`): its re-drive is then taken by the receipt,
    once (:meth:`jobs.scoring.features.Receipt.observe`), where it would be dropped as a copy."""
    return failed_step(letter, topic, tx_id) is not None


def failed_step(letter: str | None, topic: str, tx_id: str) -> str | None:
    """The step after the receipt that ``letter`` says failed on transaction ``tx_id`` (:func:`failed_after_receipt`);
    ``None`` when it names no such failure.

    A decide letter without the position tail is an older job's, which also wrote a late face's failure that way,
    as its sale (decided already, and kept trimmed: for a cash sale its re-drive passes for a copy): not taken. An
    older job's store letter always named a transaction that failed before its decision: taken."""
    if not letter:
        return None
    for step in LATER_STEPS:
        head = f"{topic}:{step}:{tx_id}"
        if letter == head and step != DECIDE:
            return step
        if letter.startswith(head) and _POSITION_TAIL.fullmatch(letter, len(head)):
            return step
    return None


def failed_message(scorer: Scorer, step: str, message: Emit, err: Exception) -> OutRow:
    """The dead letter of a message a keyed step raised on (no record must stop the job, as in
    ``DecisionCore``); when the message carries the transaction (receipt, store, the gather's own message of the
    transaction, decide; a gather completed by an answer is :class:`GatherFailed`), its record as it was on the
    topic with its key, partition and offset (:meth:`jobs.scoring.scorer.Scorer.transaction_dead_letter`), which
    ``redrive`` sends back, id
    :func:`failure_letter_id`; otherwise ``<transactions topic>:<step>:<transaction id>`` without a record."""
    payload = message.payload
    tx: dict[str, Any] | None = None
    error = InvalidRecord(INTERNAL_ERROR, _describe(err))
    if step == DECIDE and payload.late:
        # A late face for a sale decided already: the letter is the face's (its record is not kept this far), never
        # the sale's, whose re-drive the receipt would take as a failure after it and decide a second time.
        faces = FACE_OBSERVATIONS.full_name(scorer.settings.kafka.topic_prefix)
        tx_id = str(payload.env[0]["transaction_id"])
        return scorer.dead_letter_row(
            faces, -1, -1, tx_id.encode(), None, error, dead_letter_id=f"{faces}:late:{tx_id}"
        )
    if step in (RECEIPT, STORE):
        tx = payload[0]
    elif step == DECIDE:
        tx = payload.env[0]
    elif step == GATHER and isinstance(payload, tuple) and payload[0] == "tx":
        tx = payload[1][0]
    topic = TRANSACTIONS.full_name(scorer.settings.kafka.topic_prefix)
    if tx is not None:
        return scorer.transaction_dead_letter(tx, error, failure_letter_id(topic, step, tx))
    tx_id = payload[1] if step == IDENTITY else message.key
    return scorer.dead_letter_row(topic, -1, -1, tx_id.encode(), None, error, dead_letter_id=f"{topic}:{step}:{tx_id}")


def take(
    step: Any, name: str, messages: Iterable[Emit], now_ms: int, scorer: Scorer
) -> tuple[list[Emit], list[OutRow]]:
    """A keyed step (not decide) over its messages, in order: what it sends on, and the dead letter of each
    message it raised on (its key's state re-written as it now is in memory; the rest go on). An identity's
    "own" count-in is only logged: its transaction is decided without it, so a dead letter would name a
    transaction that has its decision. A customer's or linked identity's profile that raises is logged and
    answered to the gather as a failure (:data:`FAILED_ANSWER`): the transaction's letter comes from there, once
    every answer is in, with its record (before, the profile's letter named the transaction without it, and the
    transaction waited an hour at the gather and was dropped: lost for good)."""
    emits: list[Emit] = []
    failed: list[OutRow] = []
    gather = name == GATHER
    for m in messages:
        try:
            emits += step.on(m.key, m.payload, m.order, now_ms) if gather else step.on(m.key, m.payload, m.order)
        except IdConflict as err:  # the record's own fault (its id names another transaction: claims, receipt)
            step.resync(m.key)
            failed.append(reused_id_dead_letter(scorer, err, m.order[2]))
        except ProfileFailed as err:  # its gather is over (written): the transaction's letter, with its record
            if isinstance(err, GatherFailed):
                step.resync(m.key)
                cause = err.__cause__ or err
                log.warning("dead-lettering a gathered transaction: %s\n%s", err.reason, _stack(cause))
            topic = TRANSACTIONS.full_name(scorer.settings.kafka.topic_prefix)
            tx = err.env[0]
            error = InvalidRecord(INTERNAL_ERROR, err.reason)
            failed.append(scorer.transaction_dead_letter(tx, error, failure_letter_id(topic, err.step, tx)))
        except Exception as err:  # noqa: BLE001 - one message must not stop the job: dead-letter it
            step.resync(m.key)
            role = m.payload[0] if name == IDENTITY and isinstance(m.payload, tuple) else None
            if role == "own":
                log.warning("an identity's count-in failed (%s); its transaction is decided", _describe(err))
                continue
            if role in ("customer", "linked"):  # the gather waits for this answer: it gets the failure instead
                log.warning("a %s profile failed (%s)\n%s", role, _describe(err), _stack(err))
                emits.append(Emit(GATHER, m.payload[1], m.order, (FAILED_ANSWER, _describe(err))))
                continue
            log.warning(
                "dead-lettering a %s message after an internal error: %s\n%s", name, _describe(err), _stack(err)
            )
            failed.append(failed_message(scorer, name, m, err))
    return emits, failed


def decide_chunk(step: DecideStep, chunk: list[Emit], scorer: Scorer) -> list[OutRow]:
    """One model call for the chunk; if it raises, one by one, the failing ones dead-lettered (as
    ``DecisionCore``: deciding again only sets what the first try set)."""
    try:
        return step.on_batch([(m.key, m.payload) for m in chunk])
    except Exception as err:  # noqa: BLE001 - find the transaction(s) that fail, decide the rest
        log.warning("a decision batch of %d failed (%s); deciding one by one", len(chunk), _describe(err))
    rows: list[OutRow] = []
    for m in chunk:
        try:
            rows += step.on_batch([(m.key, m.payload)])
        except Exception as err:  # noqa: BLE001 - this one fails: its dead letter
            step.resync(m.key)
            rows.append(failed_message(scorer, DECIDE, m, err))
    return rows


_KIND_RANK = {"tx": 0, "customer": 1, "linked": 2, "own": 2, FAILED_ANSWER: 2, "face": 3}


def message_rank(e: Emit) -> tuple[Order, str, int]:
    """The order a step takes its messages in: :func:`order`, then key, then kind (for one transaction's
    answers at gather: its own message, the customer's, the linked ones'). A face observation sorts by its
    own time and checksum, so it may come before or after its transaction: the face join takes both."""
    payload = e.payload
    kind = payload[0] if isinstance(payload, tuple) and payload and isinstance(payload[0], str) else ""
    return (e.order, e.key, _KIND_RANK.get(kind, 0))


__all__ = [
    "DECIDE",
    "GATHER",
    "IDENTITY",
    "FAILED_ANSWER",
    "KEYED_STEPS",
    "LATER_STEPS",
    "RECEIPT",
    "ROUTE",
    "STORE",
    "DecideStep",
    "Emit",
    "GatherFailed",
    "GatherStep",
    "IdentityStep",
    "PartitionedCore",
    "ProfileFailed",
    "ReceiptStep",
    "RouteStep",
    "StoreStep",
    "decide_chunk",
    "failed_after_receipt",
    "failed_step",
    "failed_message",
    "failure_letter_id",
    "message_rank",
    "order",
    "shard_of",
    "take",
]


DRIFT = "@drift"
"""The internal topic of the decide slots' drift tallies, for :class:`DriftMerge`."""
