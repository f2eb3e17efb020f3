"""The scoring path as pure functions: bytes in, (topic, key, value) rows out.

:class:`jobs.scoring.core.DecisionCore` feeds records through these steps (the Flink operator in
``jobs/flink/operator.py`` keeps their state objects in Flink state); everything here runs and is
tested without Flink.

Steps, in order:
1. :meth:`Scorer.parse` — bytes -> transaction, or a dead letter.
2. :meth:`Scorer.by_receipt` — keyed by receipt: duplicate drop, sale/return matching.
3. :meth:`Scorer.by_store` — keyed by store: return bursts.
4. :meth:`Scorer.observe` — keyed by customer: velocity, habit; completes the indicators.
5. :meth:`Scorer.decide_batch` — model (batched), face result and rules -> scored rows and alerts.

:meth:`Scorer.observe` runs 2-4 against a :class:`ScoringState` (the three keyed maps) and says which
entries changed, so the job can persist exactly those; :meth:`Scorer.score` is 2-5 for one record.
Between steps a transaction travels as an :data:`Envelope`: ``(tx, indicators, ingest_time_ms)``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infra.settings import Settings
from jobs.scoring.claims import ConflictingTransaction
from jobs.scoring.face_join import Seen, match_threshold, matched_observation
from jobs.scoring.face_similarity import embedding_problem, similarity
from jobs.scoring.features import (
    HISTORY_KEY,
    PROFILE_KEY,
    CustomerProfile,
    Receipt,
    StoreActivity,
    customer_key,
    observe_linked,
    receipt_key,
    transaction_indicators,
)
from jobs.scoring.rules import Decision, FaceResult, ModelResult, RuleSet, decide
from jobs.scoring.stats import JobStats
from jobs.scoring.validation import SOURCE_KEY, as_recorded, parse_transaction
from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.money import money
from schemas.records import REKOGNITION_MATCHER, AlertAvro, ModelDriftAvro, ScoredTransactionAvro, dead_letter
from schemas.similarity import similarity_text
from schemas.topics import ALERTS, DEAD_LETTERS, MODEL_DRIFT, SCORED_TRANSACTIONS, TRANSACTIONS

Envelope = tuple[dict[str, Any], dict[str, float], int]
OutRow = tuple[str, bytes, bytes]
STAGE = "scoring-job"
LANE_VIEW_REASON = "lane_view_after_the_sale_not_its_buyer"
"""Reason code of a watch-list alert from a checkout picture of "now" (an alert message shows it in words)."""
LATE_FACE_REASON = "face_seen_after_the_sale_was_decided"
"""Reason code of a buyer's watch-list match that arrived after its sale was decided without a face."""


RECEIPTS, STORES, CUSTOMERS = "receipts", "stores", "customers"
DRIFT_EPISODES = "drift_episodes"
"""State map of the drift episodes open per model version (see :meth:`Predictor.restore_drift`)."""
Write = tuple[str, str, Any]
"""(map name, key, new value or ``None`` for a removal): one change to persist."""


CUSTOMER_SWEEP_BUDGET = 1024
"""Most customer profiles :meth:`ScoringState.expire_customers` looks at per call: bounded work per batch."""


@dataclass
class ScoringState:
    """The job's keyed state as three maps, with receipts kept in event-time order for expiry.

    What is kept is bounded by settings, in event time: receipts ``receipt_retention_days``, their buyer
    faces ``receipt_face_retention_hours`` (biometric data: shorter), customer profiles
    ``customer_retention_days`` after their last transaction.
    """

    receipts: dict[str, Receipt] = field(default_factory=dict)
    stores: dict[str, StoreActivity] = field(default_factory=dict)
    customers: dict[str, CustomerProfile] = field(default_factory=dict)
    receipt_order: deque[tuple[int, str]] = field(default_factory=deque)
    newest_event_ms: int = 0
    """The latest event time seen (never past the wall clock): the job's event-time "now"."""
    face_order: deque[tuple[int, str]] = field(default_factory=deque)
    """(sale event time, receipt key) of receipts given a buyer face, oldest first, for the face expiry."""
    customer_sweep: list[str] = field(default_factory=list)
    """Customer keys still to look at in the current expiry pass (see :meth:`expire_customers`)."""

    @classmethod
    def restore(cls, receipts: dict, stores: dict, customers: dict) -> ScoringState:
        # A receipt only returns were made against is dated by its first return (by the newest sale restored when
        # it comes from a job older than that field): dated 0, the first expiry after a restore dropped it.
        newest = max((r.event_time for r in receipts.values()), default=0)
        order = deque(sorted((r.event_time or r.opened or newest, k) for k, r in receipts.items()))
        faces = deque(sorted((r.event_time, k) for k, r in receipts.items() if r.sale_face is not None))
        # The newest receipt is a lower bound of the newest event: a restore never rejects more.
        return cls(dict(receipts), dict(stores), dict(customers), order, order[-1][0] if order else 0, faces)

    def bound_newest(self, now_ms: int) -> None:
        """Never let the newest event time be past the wall clock: it is the producers' clock, and a
        state restored from before this bound may hold a receipt stamped far in the future."""
        if self.newest_event_ms > now_ms:
            self.newest_event_ms = now_ms

    def expire_receipts(self, now_ms: int, retention_ms: int, into: list[Write] | None = None) -> list[Write]:
        """Forget receipts older than the return window (bounded memory, like a state TTL): their removals,
        added to ``into`` (and returned) as they are made."""
        removed: list[Write] = [] if into is None else into
        while self.receipt_order and self.receipt_order[0][0] < now_ms - retention_ms:
            _, key = self.receipt_order.popleft()
            receipt = self.receipts.get(key)
            # dated by its sale, else by its first return: an entry left by a receipt replaced since (its sale past
            # the window when a return came) must not drop the one in its place
            if receipt is not None and (receipt.event_time or receipt.opened) < now_ms - retention_ms:
                del self.receipts[key]
                removed.append((RECEIPTS, key, None))
        return removed

    def expire_faces(self, now_ms: int, retention_ms: int, into: list[Write] | None = None) -> list[Write]:
        """Drop buyer faces from receipts whose sale is older than ``retention_ms``; the receipts stay. The changed
        receipts' writes, added to ``into`` (and returned) as they are made."""
        changed: list[Write] = [] if into is None else into
        while self.face_order and self.face_order[0][0] < now_ms - retention_ms:
            _, key = self.face_order.popleft()
            receipt = self.receipts.get(key)
            if receipt is not None and receipt.sale_face is not None and receipt.event_time < now_ms - retention_ms:
                receipt.sale_face = None
                receipt.face_subject = None
                changed.append((RECEIPTS, key, receipt))
        return changed

    def forget_subject(self, subject_id: str) -> list[Write]:
        """Drop every buyer face of a forgotten subject: the one on its enrolment sale's receipt (``subj-<tx>``) and
        those matched to it at later sales (:attr:`Receipt.face_subject`); the receipts stay. Looks only at the
        receipts that still hold a face (:attr:`face_order`, bounded by the face retention): a forget is rare. The
        changed receipts' writes."""
        changed: list[Write] = []
        enrolled = subject_id.removeprefix("subj-")
        for key in dict.fromkeys([enrolled, *(key for _, key in self.face_order)]):
            receipt = self.receipts.get(key)
            if receipt is None or receipt.sale_face is None:
                continue
            if key == enrolled or receipt.face_subject == subject_id:
                receipt.sale_face = None
                receipt.face_subject = None
                changed.append((RECEIPTS, key, receipt))
        return changed

    def expire_customers(self, retention_ms: int, budget: int = CUSTOMER_SWEEP_BUDGET) -> list[Write]:
        """Forget profiles idle for ``retention_ms`` before the newest event, looking at ``budget`` of them.

        A pass walks a snapshot of the keys, ``budget`` per call, then starts over: bounded work per
        batch and no index to keep. :meth:`Scorer.observe` applies the same rule when it meets an idle
        profile, so features never depend on how far a pass has got.
        """
        if not self.customer_sweep:
            if not self.customers:
                return []
            self.customer_sweep = list(self.customers)
        cutoff = self.newest_event_ms - retention_ms
        removed: list[Write] = []
        for _ in range(min(budget, len(self.customer_sweep))):
            key = self.customer_sweep.pop()
            profile = self.customers.get(key)
            if profile is not None and profile.idle_since(cutoff):
                del self.customers[key]
                removed.append((CUSTOMERS, key, None))
        return removed


class Predictor:
    """Seam for the fraud model: scores 0-1000 for a batch of (transaction, indicators).

    Batched because a model call has a fixed cost (a vectorised tree walk, a network round trip)
    that a per-record loop pays once per transaction. This base class means "no model".
    """

    def predict_batch(self, items: Sequence[tuple[dict[str, Any], dict[str, float]]]) -> list[ModelResult]:
        return [ModelResult() for _ in items]

    def settle(self) -> None:
        """The last :meth:`predict_batch`'s transactions were decided: its drift observations count now. A batch
        that fails is decided again one by one, so counted at once they were counted twice."""

    def drain_reports(self) -> list[tuple[ModelDriftAvro, AlertAvro | None]]:
        """Model-drift reports finished since the last call, each with its alert when it crossed the
        setting: the scorer publishes them with the batch's decisions."""
        return []

    def drain_tallies(self) -> list[Any]:
        """A slot of a parallel job: its drift counters since the last call, for the merging monitor."""
        return []

    def restore_drift(self, episodes: dict[str, Any]) -> None:
        """The drift episodes (figures past the alert setting, by model version) a checkpoint kept in
        :data:`DRIFT_EPISODES`: a drift still under way after a restart does not alert again."""

    def drain_drift_changes(self) -> dict[str, Any]:
        """The drift episodes changed by the reports drained since the last call (``None``: a version's ended)."""
        return {}


class Scorer:
    def __init__(
        self,
        settings: Settings,
        predictor: Predictor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.stats = JobStats()
        """Decisions by outcome, dead letters by kind, model call times: the job's metrics report them."""
        self.rules = settings.rules
        self.rule_set = RuleSet.from_settings(settings.rules)
        self.predictor = predictor or Predictor()
        self.clock = clock
        self.decide_from = settings.job.decide_from
        """Transactions before this event time only build state (warm-up; ``job.decide_from``)."""
        prefix = settings.kafka.topic_prefix
        self.scored_topic = SCORED_TRANSACTIONS.full_name(prefix)
        self.alerts_topic = ALERTS.full_name(prefix)
        self.dlq_topic = DEAD_LETTERS.full_name(prefix)
        self.drift_topic = MODEL_DRIFT.full_name(prefix)
        self._scored = codec("ScoredTransaction")
        self._alert = codec("Alert")
        self._drift = codec("ModelDrift")
        self._tx = codec("PosTransaction")

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # 1 ---------------------------------------------------------------------------------------
    def parse(
        self,
        value: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        ingest_ms: int,
        now_ms: int = 0,
        redriven: bytes | None = None,
    ) -> Envelope | OutRow:
        """An envelope for a good record, or the dead-letter output row for a bad one.

        ``now_ms`` is the wall clock that bounds event time (``job.max_future_skew_ms``); 0 = none, for
        offline history (``train``/``backtest``), where "now" is the history's own time. ``redriven``: the
        record's :data:`schemas.records.REDRIVEN_HEADER`, kept with its position (:data:`SOURCE_KEY`).
        """
        job = self.settings.job
        as_sent: dict[str, Any] = {}
        try:
            tx = parse_transaction(value, now_ms, job.max_message_bytes, job.max_future_skew_ms, as_sent)
        except InvalidRecord as err:
            return self.dead_letter_row(topic, partition, offset, key, value, err)
        letter = redriven.decode("utf-8", "replace") if redriven else None
        tx[SOURCE_KEY] = (key, partition, offset, tuple(as_sent.items()), letter)
        return (tx, transaction_indicators(tx, self.rules), ingest_ms)

    def dead_letter_row(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: InvalidRecord,
        dead_letter_id: str | None = None,
    ) -> OutRow:
        """The dead-letter output row for an input record the job cannot use, stamped by this scorer's clock."""
        self.stats.dead_letters[error.kind] += 1
        dl = dead_letter(
            dead_letter_id=dead_letter_id,
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            error=error,
            stage=STAGE,
            failed_at=self._now_ms(),
        )
        return (self.dlq_topic, dl.dead_letter_id.encode(), dl.encode())

    def transaction_dead_letter(self, tx: dict[str, Any], error: InvalidRecord, dead_letter_id: str) -> OutRow:
        """The dead letter of a parsed transaction that failed after its record was left behind (its decision, a
        keyed step): the record as it was on the topic (:func:`jobs.scoring.validation.as_recorded`), with its
        Kafka key, partition and offset, so ``redrive`` sends it back like any other input. A transaction restored
        from state older than :data:`SOURCE_KEY` has no position (-1) and the producers' key, ``store/lane``."""
        source = tx.get(SOURCE_KEY)
        key, partition, offset = (
            source[:3] if source else (f"{tx.get('store_id')}/{tx.get('lane_id')}".encode(), -1, -1)
        )
        try:
            value: bytes | None = self._tx.encode(as_recorded(tx))
        except Exception:  # noqa: BLE001 - the reason still names the transaction
            value = None
        topic = TRANSACTIONS.full_name(self.settings.kafka.topic_prefix)
        return self.dead_letter_row(topic, partition, offset, key, value, error, dead_letter_id=dead_letter_id)

    def observe(
        self, env: Envelope, state: ScoringState, now_ms: int | None = None, writes: list[Write] | None = None
    ) -> tuple[Envelope | None, list[Write]]:
        """Steps 2-4's state part for one transaction: update the keyed state, complete its indicators.

        ``None`` for a duplicate. This is the one feature path: the job runs it on Flink state, the
        ``train``/``backtest`` commands run it on a :class:`ScoringState` built from history.
        Raises :class:`InvalidRecord` (``too_late``) for an event older than the state keeps: its
        sale is forgotten and its history expired, so its indicators would be wrong. Events that are
        merely out of order, within that horizon, are placed where they belong in time. Raises
        :class:`ConflictingTransaction` for a record with a seen id and other content (its receipt says so), with
        the writes made before it on the error.

        ``now_ms`` (the job's wall clock) caps the newest event time: a record stamped ahead of it
        (within the allowed skew) cannot make later transactions too late; ``None``: offline history.

        ``writes``: a list the state writes are added to as they are made (it is the one returned). A caller that
        passes its own keeps them when this raises part-way: receipts expired before the failure are gone from
        ``state``, and their removals must still reach the persisted state, or a restore brings them back.
        """
        tx = env[0]
        event_time = tx["event_time"]
        if now_ms is not None:
            state.bound_newest(now_ms)
        self.check_horizon(event_time, state.newest_event_ms)
        if event_time > state.newest_event_ms:
            state.newest_event_ms = event_time if now_ms is None else min(event_time, now_ms)
        rk = receipt_key(tx)
        ck = customer_key(tx)
        # Receipts past the return window at this transaction's own time are forgotten before it is matched, as
        # if a transaction had come in between (and as the partitioned layout decides): the expiry after it
        # came too late for the first transaction past the window.
        writes = state.expire_receipts(event_time, self.receipt_retention_ms, [] if writes is None else writes)
        receipt = state.receipts.get(rk)
        if receipt is not None and 0 < receipt.event_time < event_time - self.receipt_retention_ms:
            del state.receipts[rk]  # one the expiry's arrival order has not reached yet
            receipt = None
        known = receipt is not None
        unsold = receipt is None or receipt.sale_id is None
        try:
            receipt, out = self.by_receipt(receipt, env, ck)
        except ConflictingTransaction as err:
            err.writes = writes  # the receipts expired before it stay expired
            raise
        if out is None:
            return None, writes
        state.receipts[rk] = receipt
        if not known or (unsold and receipt.sale_id is not None):
            # A sale that fills a receipt its return opened is dated again: the return's entry is popped when the
            # return is old, and a later sale would stay in state for good without an entry of its own.
            state.receipt_order.append((receipt.event_time or tx["event_time"], rk))
        writes.append((RECEIPTS, rk, receipt))
        counted = receipt.take_counted(tx["transaction_id"])
        if counted is None:
            self._count_in_history(tx, out, ck, state, writes)
        else:  # a failed transaction's re-drive: its history counted it before the failure
            _, history, tx[PROFILE_KEY] = counted
            out[1].update(history)
            tx[HISTORY_KEY] = history
        state.expire_faces(state.newest_event_ms, self.face_retention_ms, writes)
        return out, writes

    def _count_in_history(
        self, tx: dict[str, Any], out: Envelope, ck: str, state: ScoringState, writes: list[Write]
    ) -> None:
        """Steps 3-4: the transaction counted in its store's, customer's and linked identities' history, and what
        that history gives it (indicators; the model's profile features under :data:`PROFILE_KEY`)."""
        sk = tx["store_id"]
        new_store = sk not in state.stores
        state.stores[sk], _ = self.by_store(state.stores.get(sk), out)
        if new_store or tx["kind"] == "RETURN":  # sales leave a known store's activity as it was
            writes.append((STORES, sk, state.stores[sk]))
        idle_before = state.newest_event_ms - self.rules.customer_retention_days * 86_400_000
        profile = state.customers.get(ck)
        if profile is None or profile.idle_since(idle_before):
            profile = CustomerProfile()  # unknown, or idle past its retention: a new customer
        found, customer = profile.observe_profile(tx, self.rules)
        out[1].update(found)
        # what the history gave it, kept by a failure after this point (``Receipt.mark_failed``)
        tx[HISTORY_KEY] += tuple(found.items())
        if not ck.startswith("anon:"):
            state.customers[ck] = profile
            writes.append((CUSTOMERS, ck, profile))
        # The other identities on the transaction (card, id, e-mail, IP, device), in the same map.
        linked, changed = observe_linked(tx, state.customers, idle_before, CUSTOMERS)
        writes += changed
        tx[PROFILE_KEY] = customer + linked  # the model's profile features (not written on the record)

    def check_horizon(self, event_time: int, newest_ms: int) -> None:
        """:class:`InvalidRecord` (``too_late``) for an event older than the state keeps before ``newest_ms``."""
        if event_time < newest_ms - self.rules.receipt_retention_days * 86_400_000:
            behind_days = (newest_ms - event_time) / 86_400_000
            raise InvalidRecord(
                "too_late",
                f"event_time is {behind_days:.0f} days behind the newest event seen, "
                f"beyond the {self.rules.receipt_retention_days}-day state horizon",
            )

    @property
    def receipt_retention_ms(self) -> int:
        return self.rules.receipt_retention_days * 86_400_000

    @property
    def face_retention_ms(self) -> int:
        return int(self.rules.receipt_face_retention_hours * 3_600_000)

    def decide_batch(
        self,
        envs: Sequence[Envelope],
        faces: Sequence[FaceResult] | None = None,
        seen: Sequence[Seen | None] | None = None,
        state: ScoringState | None = None,
        own_time: bool = False,
        late: Sequence[bool] | None = None,
    ) -> tuple[list[OutRow], list[Write]]:
        """Model (one vectorised call for the batch), face result and rules -> scored rows and alerts.

        With ``seen`` (what the camera gave) and ``state``, a sale remembers its buyer's face and a
        return is checked against it (seed 001's customer mismatch by photo: ``buyer_face_mismatch``).
        ``own_time``: a face's retention is counted back from the transaction's own event time, not the
        state's newest event (the partitioned steps: a decision that does not depend on other receipts'
        traffic). ``late``: per transaction, whether it was decided already and this is its face coming after
        the deadline (:attr:`jobs.scoring.face_join.Ready.late`): not decided again, see :meth:`late_face`.
        """
        if not envs:
            return [], []
        seen = seen or [None] * len(envs)
        faces = faces or [camera.face if camera else FaceResult() for camera in seen]
        lates = late or [False] * len(envs)
        decide_from = self.decide_from
        due = [env for env, is_late in zip(envs, lates, strict=True) if not is_late]
        live = due if not decide_from else [env for env in due if env[0]["event_time"] >= decide_from]
        rows: list[OutRow] = []
        writes: list[Write] = []
        models: list[ModelResult] = []
        before_model = self._now_ms()
        if live:
            started = time.perf_counter()
            models = self.predictor.predict_batch([(env[0], env[1]) for env in live])
            self.stats.model_ms.add((time.perf_counter() - started) * 1000)
        # In a warm-up (``job.decide_from``) the earlier transactions are not decided, but keep their buyer's
        # face all the same (a later return is compared with it, as after a decision), in the batch's order.
        results = iter(models)
        outcomes: list[str] = []
        late_statuses: list[str] = []
        for env, face, camera, is_late in zip(envs, faces, seen, lates, strict=True):
            if camera is not None and state is not None:
                writes.extend(self.compare_faces(env, camera, state, env[0]["event_time"] if own_time else None))
            if is_late:
                late_statuses.append(face.status.lower())
                rows.extend(self.late_face(env, face, camera))
            elif not decide_from or env[0]["event_time"] >= decide_from:
                rows.extend(self.decide(env, next(results), face, before_model, camera, outcomes))
        # Counted once the whole batch is decided: a failure makes the caller decide it again one by one. So do
        # the drift monitor's observations, and its reports are drained only now (a failed try's were lost).
        if live:
            self.predictor.settle()
            rows[:0] = self.drift_rows(self.predictor.drain_reports())
            writes.extend(
                (DRIFT_EPISODES, version, entry) for version, entry in self.predictor.drain_drift_changes().items()
            )
        self.stats.outcomes.update(outcomes)
        self.stats.late_faces.update(late_statuses)
        if decide_from:
            self.stats.observed_only["warm_up"] += len(due) - len(live)
        return rows, writes

    def late_face(self, env: Envelope, face: FaceResult, camera: Seen | None) -> list[OutRow]:
        """A buyer's face that came after the sale was decided without it (the face deadline passed): the
        decision stands, but a watch-list match still raises its alert, marked as seen after the decision
        (``LATE_FACE_REASON``; same alert id as an in-time one). None before ``job.decide_from``."""
        tx = env[0]
        if face.status != "MATCHED" or tx["event_time"] < self.decide_from:
            return []
        alert = self.watchlist_alert(
            tx["event_time"],
            tx["store_id"],
            tx["lane_id"],
            face,
            camera.image_ref if camera else None,
            f"checkout:{tx['transaction_id']}",
            tx,
            how=f"at checkout ({tx['transaction_id']}), seen after the sale was decided without a face",
            reason=LATE_FACE_REASON,
            threshold=self.match_threshold(face),
            observation_id=matched_observation(face, camera),
        )
        return [self.alert_row(alert)]

    def match_threshold(self, face: FaceResult) -> float | None:
        """The threshold a ``MATCHED`` face was taken at (:func:`~jobs.scoring.face_join.match_threshold`), for its
        alerts; ``None`` for any other face."""
        return match_threshold(self.settings.faces, face.matcher) if face.status == "MATCHED" else None

    def alert_row(self, alert: AlertAvro) -> OutRow:
        """An alert's row on the alerts topic, keyed by its id (one per id, however often it is raised)."""
        return (self.alerts_topic, alert["alert_id"].encode(), self._alert.encode(alert))

    def drift_rows(self, reports: Sequence[tuple[ModelDriftAvro, AlertAvro | None]]) -> list[OutRow]:
        """Each finished hour's drift report, and its alert where it crossed ``model.drift_psi_alert``."""
        rows: list[OutRow] = []
        for report, alert in reports:
            rows.append((self.drift_topic, report["report_id"].encode(), self._drift.encode(report)))
            if alert is not None:
                rows.append(self.alert_row(alert))
        return rows

    def compare_faces(self, env: Envelope, camera: Seen, state: ScoringState, now_ms: int | None = None) -> list[Write]:
        """Sale: keep the buyer's face on the receipt. Return: flag a returner who is not the buyer.

        A face is kept ``receipt_face_retention_hours`` before ``now_ms`` (default: the newest event seen)."""
        tx, ind, _ = env
        if camera.embedding is None:
            return []
        rk = receipt_key(tx)
        receipt = state.receipts.get(rk)
        if receipt is None:
            return []
        kept_since = (state.newest_event_ms if now_ms is None else now_ms) - self.face_retention_ms
        if tx["kind"] == "SALE" and receipt.sale_id == tx["transaction_id"]:
            if receipt.event_time < kept_since:  # decided after its face's retention: keep none
                return []
            if receipt.sale_face is None:
                state.face_order.append((receipt.event_time, rk))
            receipt.sale_face = camera.embedding
            receipt.face_subject = camera.face.subject_id if camera.face.status == "MATCHED" else None
            return [(RECEIPTS, rk, receipt)]
        face = receipt.sale_face
        if tx["kind"] == "RETURN" and face is not None and receipt.event_time >= kept_since:
            if embedding_problem(face) is not None or embedding_problem(camera.embedding) is not None:
                return []  # kept before faces were checked: no evidence either way
            if len(face) != len(camera.embedding):
                return []  # made by different embedders (the setting changed in between): not comparable
            sim = float(similarity(face, camera.embedding))
            ind["buyer_face_similarity"] = round(sim, 2)
            if sim < self.settings.faces.match_threshold:
                ind["buyer_face_mismatch"] = 1.0  # not customer_mismatch: face evidence, weighed as such
        return []

    def decide(
        self,
        env: Envelope,
        model: ModelResult,
        face: FaceResult,
        before_model: int,
        camera: Seen | None,
        outcomes: list[str],
    ) -> list[OutRow]:
        """One transaction's scored record and alerts; its outcome is appended to ``outcomes`` (the caller counts
        them once its batch is through)."""
        tx, ind, ingest = env
        decision = decide(tx, ind, model, face, self.rule_set)
        outcomes.append(decision.outcome)
        decided_at = self._now_ms()
        scored = self.scored_record(tx, ind, model, face, decision, ingest, before_model, decided_at)
        rows: list[OutRow] = [(self.scored_topic, tx["transaction_id"].encode(), self._scored.encode(scored))]
        snapshot = camera.image_ref if camera else None
        threshold, observation_id = self.match_threshold(face), matched_observation(face, camera)
        if decision.outcome == "BLOCK":
            alert = self.blocked_alert(tx, decision, face, snapshot, threshold, observation_id)
            rows.append(self.alert_row(alert))
        if face.status == "MATCHED":
            seen_as = f"checkout:{tx['transaction_id']}"
            alert = self.watchlist_alert(
                tx["event_time"],
                tx["store_id"],
                tx["lane_id"],
                face,
                snapshot,
                seen_as,
                tx,
                threshold=threshold,
                observation_id=observation_id,
            )
            rows.append(self.alert_row(alert))
        return rows

    def entrance(self, obs: dict[str, Any], face: FaceResult) -> list[OutRow]:
        """A watch-listed face at a store's entrance: "suspect entered store S" before any checkout. No alert
        for an entrance before ``job.decide_from``: a warm-up replays history, not who is in a store now."""
        if face.status != "MATCHED" or obs["event_time"] < self.decide_from:
            return []
        alert = self.watchlist_alert(
            obs["event_time"],
            obs["store_id"],
            obs.get("lane_id"),
            face,
            obs.get("image_ref"),
            obs["observation_id"],
            None,
            threshold=self.match_threshold(face),
            observation_id=obs["observation_id"],
        )
        return [self.alert_row(alert)]

    def lane_sighting(self, obs: dict[str, Any], face: FaceResult) -> list[OutRow]:
        """A watch-listed face in a checkout picture of "now" (``snapshot_of_now``: no footage of the sale): a
        sighting at that lane when the picture was asked for, not the buyer, so an alert like an entrance's,
        without the transaction (no verdict on it may label the sale). None before ``job.decide_from``."""
        if not obs.get("snapshot_of_now") or face.status != "MATCHED" or obs["event_time"] < self.decide_from:
            return []
        alert = self.watchlist_alert(
            obs["event_time"],
            obs["store_id"],
            obs.get("lane_id"),
            face,
            obs.get("image_ref"),
            f"{obs['observation_id']}:now",
            None,
            how=f"seen at the lane after sale {obs.get('transaction_id')} (a live view: not its buyer)",
            reason=LANE_VIEW_REASON,
            at_lane=True,
            threshold=self.match_threshold(face),
            observation_id=obs["observation_id"],
        )
        return [self.alert_row(alert)]

    def score(self, env: Envelope, state: ScoringState) -> tuple[list[OutRow], list[Write]]:
        """Steps 2-4 for one transaction: output rows, and the state entries to persist."""
        out, writes = self.observe(env, state)
        if out is None:
            return [], writes
        rows, more = self.decide_batch([out], state=state)
        return rows, writes + more

    # 2 ---------------------------------------------------------------------------------------
    def by_receipt(self, state: Receipt | None, env: Envelope, cust_key: str) -> tuple[Receipt, Envelope | None]:
        """Match a return with its sale; ``None`` envelope when the transaction is a duplicate."""
        state = state or Receipt()
        tx, ind, ingest = env
        found = state.observe(tx, cust_key, self.rules)
        if found is None:
            return state, None
        ind.update(found)
        return state, (tx, ind, ingest)

    # 3 ---------------------------------------------------------------------------------------
    def by_store(self, state: StoreActivity | None, env: Envelope) -> tuple[StoreActivity, Envelope]:
        state = state or StoreActivity()
        found = state.observe(env[0], self.rules)
        env[1].update(found)
        env[0][HISTORY_KEY] = tuple(found.items())
        return state, env

    def scored_record(
        self,
        tx: dict[str, Any],
        ind: dict[str, float],
        model: ModelResult,
        face: FaceResult,
        decision: Decision,
        ingest: int,
        before_model: int,
        decided_at: int,
    ) -> ScoredTransactionAvro:
        """The decision as the ``ScoredTransaction`` dict the codec writes (a literal: the hot path)."""
        event_time = tx["event_time"]
        return {
            "transaction_id": tx["transaction_id"],
            "event_time": event_time,
            "store_id": tx["store_id"],
            "lane_id": tx["lane_id"],
            "cashier_id": tx["cashier_id"],
            "kind": tx["kind"],
            "original_transaction_id": tx["original_transaction_id"],
            "amount": tx["amount"],
            "currency": tx["currency"],
            "item_count": sum(i["quantity"] for i in tx["items"]),
            "product_category": tx["product_category"] or (tx["items"][0]["category"] if tx["items"] else None),
            "customer_id": tx["customer_id"],
            "customer_key": customer_key(tx),
            "card_bin": tx["card_bin"],
            "billing_state": tx["billing_state"],
            "billing_country": tx["billing_country"],
            "outcome": decision.outcome,
            "risk_score": decision.risk_score,
            "reasons": list(decision.reasons),
            "indicators": ind,
            "model_score": model.score,
            "model_version": model.version,
            "challenger_score": model.challenger_score,
            "challenger_version": model.challenger_version,
            "rules_version": self.rule_set.version,
            "face_status": face.status,
            "face_subject_id": face.subject_id,
            "face_category": face.category,
            "face_similarity": face.similarity,
            "face_matcher": face.matcher if face.status == "MATCHED" else None,
            "label": tx["label"],
            "ingest_time": ingest,
            "decided_at": decided_at,
            "proc_time_ms": max(0, before_model - event_time),
            "model_time_ms": model.time_ms,
            "ttdf_ms": max(0, decided_at - event_time),
        }

    @staticmethod
    def blocked_alert(
        tx: dict[str, Any],
        decision: Decision,
        face: FaceResult | None = None,
        snapshot_ref: str | None = None,
        threshold: float | None = None,
        observation_id: str | None = None,
    ) -> AlertAvro:
        """A blocked sale or refund; ``threshold``: what its face was matched at, and ``observation_id`` the face
        observation it was matched on (:func:`matched_observation`), when it names a match."""
        reasons = ", ".join(decision.reasons) or "risk"
        face = face or FaceResult()
        return {
            "alert_id": f"blocked:{tx['transaction_id']}",
            "kind": "BLOCKED_TRANSACTION",
            "severity": "high",
            "event_time": tx["event_time"],
            "store_id": tx["store_id"],
            "lane_id": tx["lane_id"],
            "transaction_id": tx["transaction_id"],
            "amount": tx["amount"],
            "currency": tx["currency"],
            "outcome": decision.outcome,
            "risk_score": decision.risk_score,
            "reasons": list(decision.reasons),
            "subject_id": face.subject_id,
            "category": face.category,
            "similarity": face.similarity,
            "snapshot_ref": snapshot_ref,
            "transaction_kind": tx["kind"],
            "matcher": face.matcher if face.status == "MATCHED" else None,
            "match_threshold": threshold if face.status == "MATCHED" else None,
            "observation_id": observation_id if face.status == "MATCHED" else None,
            "summary": (
                f"Blocked {tx['kind'].lower()} {tx['transaction_id']} of "
                f"{money(tx['amount'], tx['currency'])} {tx['currency']} "
                f"at {tx['store_id']} {tx['lane_id']}: risk {decision.risk_score} ({reasons})"
            ),
        }

    @staticmethod
    def watchlist_alert(
        event_time: int,
        store_id: str,
        lane_id: str | None,
        face: FaceResult,
        snapshot_ref: str | None,
        seen_as: str,
        tx: dict[str, Any] | None,
        how: str | None = None,
        reason: str | None = None,
        at_lane: bool = False,
        threshold: float | None = None,
        observation_id: str | None = None,
    ) -> AlertAvro:
        """Suspect or VIP recognised at a checkout (``seen_as`` = ``checkout:<tx>``), an entrance, or (``at_lane``,
        without ``tx``) in a lane's live view after a sale: ``SUSPECT_AT_LANE`` / ``VIP_AT_LANE``, not the entrance
        kinds, so its headline and per-kind counts do not say "entered". ``how`` replaces the summary's
        "entered"/"at checkout (<tx>)"; ``reason`` is a reason code added to the match's; ``threshold`` the similarity
        the match was taken at (:meth:`match_threshold`), which the messages give beside the similarity;
        ``observation_id`` the face observation it was made on, which names the sighting when its subject is
        forgotten (an observation whose snapshot could not be stored has no image ref to name it). The summary says
        "Possible suspect ...", as the alert's headline does: a match is a lead for a person to check, not a fact."""
        suspect = face.category == "SUSPECT"
        if at_lane:
            kind = "SUSPECT_AT_LANE" if suspect else "VIP_AT_LANE"
        else:
            kind = ("SUSPECT_ENTERED" if tx is None else "WATCHLIST_MATCH") if suspect else "VIP_ARRIVED"
        where = f"{store_id}" + (f" {lane_id}" if lane_id else "")
        what = "Possible suspect" if suspect else "Possible VIP"
        how = how or ("entered" if tx is None else f"at checkout ({tx['transaction_id']})")
        by = " (Rekognition)" if face.matcher == REKOGNITION_MATCHER else ""
        return {
            "alert_id": f"watchlist:{seen_as}:{face.subject_id}",
            "kind": kind,
            "severity": "high" if suspect else "info",
            "event_time": event_time,
            "store_id": store_id,
            "lane_id": lane_id,
            "transaction_id": tx["transaction_id"] if tx else None,
            "amount": tx["amount"] if tx else None,
            "currency": tx["currency"] if tx else None,
            "outcome": None,
            "risk_score": None,
            "reasons": [f"watchlist_{(face.category or '').lower()}", *([reason] if reason else [])],
            "subject_id": face.subject_id,
            "category": face.category,
            "similarity": face.similarity,
            "snapshot_ref": snapshot_ref,
            "transaction_kind": tx["kind"] if tx else None,
            "matcher": face.matcher,
            "match_threshold": threshold,
            "observation_id": observation_id,
            "summary": (
                f"{what} {face.subject_id} {how} at {where}, similarity {similarity_text(face.similarity or 0)}{by}"
            ),
        }
