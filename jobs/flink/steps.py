"""The partitioned layout's Flink operators: Flink state, timers and batches around the keyed steps of
:mod:`jobs.scoring.partitioned` (every decision is theirs, tested without Flink).

Messages between steps travel as output rows ``("@<step>", shard, head + pickle)`` (head: event time and
source partition, :data:`_HEAD`): the Java ``StepEventTime`` reads the head for the watermark, the Java
``EventTimeBatcher`` holds each message until the watermark passes it and sends one batch per shard, and the
step (keyed by shard) takes the batch in the steps' order. A shard's maps are read from MapState at its first
batch and are then authoritative; each call writes back what changed (one ``put_all`` per map), as
``DecideStep`` does.
"""

from __future__ import annotations

import logging
import pickle
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import (
    BroadcastProcessFunction,
    KeyedBroadcastProcessFunction,
    KeyedProcessFunction,
    RuntimeContext,
)
from pyflink.datastream.state import MapStateDescriptor

from infra.clock import now_ms
from infra.settings import Settings
from jobs.flink.frames import OutputBatch, unpack_records
from jobs.flink.job_metrics import JobMetrics
from jobs.flink.operator import BROADCAST, FrozenState, _as_bytes, _predictor, _watchlist, commit, keep_in_broadcast
from jobs.flink.worker_logs import mask_worker_logs
from jobs.scoring.core import DecisionCore
from jobs.scoring.face_join import DECIDED
from jobs.scoring.partitioned import (
    DECIDE,
    DRIFT,
    GATHER,
    IDENTITY,
    RECEIPT,
    STEP_MAPS,
    STORE,
    DecideStep,
    Emit,
    ForgetQueue,
    GatherStep,
    IdentityStep,
    ReceiptStep,
    RouteStep,
    StoreStep,
    decide_chunk,
    message_rank,
    shard_of,
    take,
)
from jobs.scoring.scorer import DRIFT_EPISODES, Scorer

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">qi")
"""A message's head for the JVM: its event time (ms) and the source partition it came from (``StepEventTime``)."""


def source_id(topic: str, partition: int) -> int:
    """A source partition as a signed 32-bit id (the watermark is kept per source partition)."""
    return zlib.crc32(f"{topic}:{partition}".encode()) - (1 << 31)


def pack_emits(emits: Iterable[Emit], shards: int, out: OutputBatch, source: int = 0) -> None:
    for e in emits:
        value = _HEAD.pack(e.order[0], source) + pickle.dumps((e.key, e.order, e.payload), pickle.HIGHEST_PROTOCOL)
        out.add("@" + e.step, str(shard_of(e.key, shards)).encode(), value)


def unpack_batch(batch: bytes) -> tuple[str, list[Emit]]:
    """An ``EventTimeBatcher`` batch: its shard, and its messages in the steps' order."""
    size = int.from_bytes(batch[:2], "big")
    shard = batch[2 : 2 + size].decode()
    pos = 2 + size
    messages = []
    while pos < len(batch):
        length = int.from_bytes(batch[pos : pos + 4], "big")
        key, order_, payload = pickle.loads(batch[pos + 4 + _HEAD.size : pos + 4 + length])
        messages.append(Emit("", key, order_, payload))
        pos += 4 + length
    messages.sort(key=message_rank)
    return shard, messages


def shard_of_batch(batch: Any) -> str:
    """The Flink key of a batch (its shard), read from the batch's head."""
    data = _as_bytes(batch)
    return data[2 : 2 + int.from_bytes(data[:2], "big")].decode()


def _pack(out: OutputBatch) -> bytes | None:
    return out.to_bytes() if out.count else None


class RouteFunction(BroadcastProcessFunction):
    """Parse and route (no keyed state): transactions to their receipt, faces to their transaction; dead
    letters and entrance alerts straight out. The watchlist (for the match) and rules come by broadcast."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        mask_worker_logs(self.settings)
        self.core = DecisionCore(self.settings, watchlist=_watchlist(self.settings))
        self.core.bootstrap()
        self.route = RouteStep(self.core.scorer, self.core.watchlist)
        self.shards = self.settings.job.state_shards
        self.newest = 0
        self.restored = self.core.bootstrapped is not None
        self.metrics = _metrics(self.settings, runtime_context)

    def process_element(self, batch: Any, ctx: BroadcastProcessFunction.ReadOnlyContext):
        if not self.restored:
            self.core.restore({}, dict(ctx.get_broadcast_state(BROADCAST).items()))
            self.restored = True
        now = now_ms()
        out = OutputBatch()
        taken = transactions = 0
        for record in unpack_records(_as_bytes(batch)):
            taken += 1
            transactions += record.topic == self.core.tx_topic
            emits, rows = self.route.on_record(record, now, self.newest)
            for topic, key, value in rows:
                out.add(topic, key, value)
            for e in emits:
                if e.step == RECEIPT and e.order[0] > self.newest:
                    self.newest = min(e.order[0], now)
            pack_emits(emits, self.shards, out, source_id(record.topic, record.partition))
        self.core.stats.count_records(taken, transactions)
        if self.metrics is not None:
            self.metrics.report(self.core.stats)
        packed = _pack(out)
        if packed is not None:
            yield packed

    def process_broadcast_element(self, row: Row, ctx: BroadcastProcessFunction.Context):
        yield from _control(self.core, row, ctx)
        self.core.forgotten.clear()  # a forget is decide's business (buyer faces); route keeps no faces


def _metrics(settings: Settings, runtime_context: RuntimeContext) -> JobMetrics | None:
    """The job's metrics (records taken and dead letters from route; decisions, model times and face waits
    from decide; the dead letters of the messages a keyed step raised on from that step: each reports what
    its own scorer counted, so nothing is counted twice)."""
    if not settings.metrics.enabled:
        return None
    return JobMetrics(runtime_context.get_metrics_group(), thread_mode=settings.job.python_execution_mode == "thread")


def _control(core: DecisionCore, row: Row, ctx) -> Iterator[bytes]:
    """A rules or watchlist record: applied, kept in broadcast state; a bad one's dead letter."""
    key = bytes(row[0]) if row[0] is not None else None
    value = bytes(row[1]) if row[1] is not None else None
    outputs, update = core.on_control(row[2], key, value, row[3], row[4])
    out = OutputBatch()
    for topic, k, v in outputs:
        out.add(topic, k, v)
    packed = _pack(out)
    if packed is not None:
        yield packed
    keep_in_broadcast(core, ctx.get_broadcast_state(BROADCAST), update)


class _Shards:
    """The steps of one kind in this slot, one per shard, loaded from MapState at the shard's first call."""

    def __init__(self, step: str, make, runtime_context: RuntimeContext) -> None:
        self.step = step
        self.make = make
        self.maps = {
            name: runtime_context.get_map_state(MapStateDescriptor(name, Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            for name in STEP_MAPS[step]
        }
        self.by_shard: dict[str, Any] = {}

    def current(self, shard: str):
        """The current key's step (Flink has set the key to ``shard`` for this call)."""
        step = self.by_shard.get(shard)
        if step is None:
            step = self.by_shard[shard] = self.make()
            step.restore({name: dict(state.items()) for name, state in self.maps.items()})
        return step

    def commit(self, step) -> None:
        commit(self.maps, step.flush())


class ShardStep(KeyedProcessFunction):
    """One keyed step (receipt, store, identity or gather) of the partitioned layout, keyed by shard."""

    def __init__(self, settings: Settings, step: str) -> None:
        self.settings = settings
        self.step = step

    def open(self, runtime_context: RuntimeContext) -> None:
        mask_worker_logs(self.settings)
        makers = {RECEIPT: ReceiptStep, STORE: StoreStep, IDENTITY: IdentityStep, GATHER: GatherStep}
        self.shards = _Shards(self.step, lambda: makers[self.step](self.settings), runtime_context)
        self.count = self.settings.job.state_shards
        self.heap = FrozenState()
        self.scorer = Scorer(self.settings)  # the dead letters of messages that raise
        self.metrics = _metrics(self.settings, runtime_context)  # those dead letters' count (internal_error)

    def process_element(self, batch: Any, ctx: KeyedProcessFunction.Context):
        shard, messages = unpack_batch(_as_bytes(batch))
        step = self.shards.current(shard)
        emits, failed = take(step, self.step, messages, now_ms(), self.scorer)
        if self.step in (RECEIPT, IDENTITY):
            step.expire(ctx.timer_service().current_watermark())
        elif self.step == GATHER:
            step.expire(now_ms())
        yield from self._finish(step, emits, ctx, failed)
        self.heap.settle()

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        step = self.shards.current(ctx.get_current_key())
        emits = step.due(now_ms())
        evicted = sum(shard.join.evicted for shard in self.shards.by_shard.values()) if self.step == GATHER else 0
        if evicted > self.scorer.stats.face_memory_evicted[DECIDED]:  # the late-face memory was full
            self.scorer.stats.face_memory_evicted[DECIDED] = evicted
            if self.metrics is not None:
                self.metrics.report(self.scorer.stats)
        yield from self._finish(step, emits, ctx)

    def _finish(self, step, emits: list[Emit], ctx, rows: Sequence[tuple] = ()) -> Iterator[bytes]:
        self.shards.commit(step)
        if self.step == GATHER:
            deadline = step.join.next_deadline()
            if deadline is not None:
                ctx.timer_service().register_processing_time_timer(deadline)
        out = OutputBatch()
        for topic, key, value in rows:
            out.add(topic, key, value)
        pack_emits(emits, self.count, out)
        if rows and self.metrics is not None:  # only dead letters are counted here: a call without any has none
            self.metrics.report(self.scorer.stats)
        packed = _pack(out)
        if packed is not None:
            yield packed


class DecideShards(KeyedBroadcastProcessFunction):
    """The decide step, keyed by shard: buyer faces, model, rules, outputs; rules and ``forget`` by broadcast."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        mask_worker_logs(self.settings)
        predictor = _predictor(self.settings, tally_drift=True)  # the drift step reports, from every slot's tallies
        self.core = DecisionCore(self.settings, predictor=predictor, watchlist=_watchlist(self.settings))
        self.core.bootstrap()
        self.shards = _Shards(DECIDE, lambda: DecideStep(self.core.scorer), runtime_context)
        self.count = self.settings.job.state_shards
        self.batch_size = max(1, self.settings.job.batch_size)
        self.restored = self.core.bootstrapped is not None
        self.heap = FrozenState()
        self.forgets = ForgetQueue(self.count, self.settings.rules.receipt_face_retention_hours * 3600)
        """Kept in memory: after a restart the start-up read of the watchlist topic no longer has the subject,
        and the faces go with their retention."""
        self.metrics = _metrics(self.settings, runtime_context)

    def process_element(self, batch: Any, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        if not self.restored:
            self.core.restore({}, dict(ctx.get_broadcast_state(BROADCAST).items()))
            self.restored = True
        shard, messages = unpack_batch(_as_bytes(batch))
        self.core.count_face_waits(m.payload for m in messages)  # measured by gather's join, reported here
        step = self.shards.current(shard)
        for subject in self.core.forgotten:
            self.forgets.add(subject)
        self.core.forgotten = []
        for subject in self.forgets.take(shard):
            step.forget(subject)
        out = OutputBatch()
        for start in range(0, len(messages), self.batch_size):
            for topic, key, value in decide_chunk(step, messages[start : start + self.batch_size], self.core.scorer):
                out.add(topic, key, value)
        for tally in self.core.scorer.predictor.drain_tallies():
            out.add(DRIFT, None, pickle.dumps(tally, pickle.HIGHEST_PROTOCOL))
        step.expire()
        self.shards.commit(step)
        if self.metrics is not None:
            self.metrics.report(self.core.stats)
        self.heap.settle()
        packed = _pack(out)
        if packed is not None:
            yield packed

    def process_broadcast_element(self, row: Row, ctx: KeyedBroadcastProcessFunction.Context):
        for _ in _control(self.core, row, ctx):
            pass  # the route step sends a bad update's dead letter; one is enough


class DriftMergeFunction(KeyedProcessFunction):
    """The one subtask (one key) where the decide slots' drift tallies (rows of ``@drift``) become hourly
    reports (:class:`jobs.model.drift.DriftMerge`): hours close by the watermark, on the next tally
    or at an event-time timer (a lull, the end of a replay). In memory, as the single layout's monitor; the open
    drift episodes are keyed state; a version's leave it the drift reminder's interval of tallies after its last
    (``DriftMerge.idle_ms``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        mask_worker_logs(self.settings)
        from jobs.model.drift import DriftMerge
        from jobs.model.predictors import drift_episodes, drift_monitors
        from jobs.model.registry import load_version

        factory = drift_monitors(self.settings)
        root = self.settings.models_root

        def monitor_of(version: str) -> Any:
            if factory is None:
                return None
            try:
                return factory(load_version(root, version))  # the folder may have another name
            except Exception as err:  # noqa: BLE001 - no drift reports for that model, rather than a stopped job
                log.warning("no drift reports for model %s: its artifact cannot be loaded (%s)", version, err)
                return None

        self.merge = DriftMerge(monitor_of, drift_episodes(self.settings))
        self.scorer = Scorer(self.settings)
        self.episodes = runtime_context.get_map_state(
            MapStateDescriptor(DRIFT_EPISODES, Types.STRING(), Types.PICKLED_BYTE_ARRAY())
        )
        """The open drift episodes (by model version), checkpointed: a restart does not alert them again."""
        self.loaded = False

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context):
        self._load()
        tally = pickle.loads(_as_bytes(value[2]))
        yield from self._out(self.merge.on_tallies([tally], ctx.timer_service().current_watermark()), ctx)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        self._load()
        yield from self._out(self.merge.on_watermark(max(timestamp, ctx.timer_service().current_watermark())), ctx)

    def _load(self) -> None:
        """The episodes from keyed state, once (readable only in a call: it has the key)."""
        if not self.loaded:
            self.merge.episodes.restore(dict(self.episodes.items()))
            self.loaded = True

    def _out(self, reports: list, ctx) -> Iterator[Row]:
        for due in self.merge.due():
            ctx.timer_service().register_event_time_timer(due)  # one timer per time and key
        commit({DRIFT_EPISODES: self.episodes}, {DRIFT_EPISODES: self.merge.episodes.drain_changes()})
        for topic, key, encoded in self.scorer.drift_rows(reports):
            yield Row(topic, key, encoded)
