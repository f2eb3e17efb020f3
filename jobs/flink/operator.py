"""The scoring job's one keyed operator: Flink state, timers and batches around :class:`DecisionCore`.

Every decision is :class:`jobs.scoring.core.DecisionCore`'s (tested without Flink); this module only
opens the MapState and the broadcast state, hands records, timers and control records to the core,
writes back the state changes it reports (once per call), registers the timer it asks for and packs
its outputs for the Java ``OutputUnbatcher``. ``DecideStep`` stays at module level: PyFlink pickles the
function and loads it in the worker by module path.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from pyflink.common import Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedBroadcastProcessFunction, RuntimeContext
from pyflink.datastream.state import MapStateDescriptor

from infra.clock import now_ms
from infra.settings import Settings
from jobs.flink.frames import OutputBatch, unpack_records
from jobs.flink.job_metrics import JobMetrics
from jobs.flink.worker_logs import mask_worker_logs
from jobs.scoring.core import LEGACY_BATCH, MAPS, DecisionCore, OutRow, Step, Writes

__all__ = ["BROADCAST", "LEGACY_BATCH", "DecideStep", "FrozenState", "commit"]

BROADCAST = MapStateDescriptor("broadcast", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
"""Rules (key ``rules``) and watchlist entries (key ``wl:<subject>``), the same in every instance."""


class DecideStep(KeyedBroadcastProcessFunction):
    """Parse, match receipts, track stores and customers, join the face, decide — in one operator.

    Keyed input: batches of transactions and face observations (one Kafka source over both topics,
    packed by the Java ``RecordBatcher``: one Python call per batch instead of per record, which
    costs more than the scoring). Broadcast input: the rule set and the watchlist, from their
    compacted topics, so a rules update or a ``forget`` takes effect at once without a restart.

    Why one operator, with its state in Flink MapState read through a Python cache: in PyFlink
    every state read that misses the Python worker's cache is a round trip to the JVM, and most
    reads are of new keys (every sale opens a receipt), so per-key state in separate keyed steps
    capped the job at ~150 tx/s. Here the maps are loaded from MapState once, after start or
    restore, and are then authoritative (in the :class:`DecisionCore`); the changes of a batch are
    written back to MapState at its end (one ``put_all`` per map), which Flink checkpoints with the
    source offsets. Cross-key lookups (a return at store B against a sale at store A, by another
    card) need no shuffle. Transactions waiting for their face are state too, so a crash between
    reading a transaction and deciding it loses nothing. Every transaction released by a batch is
    decided in one model call. The price: scoring runs in one slot; sharding by region is the way
    to scale out.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        mask_worker_logs(self.settings)
        self.core = DecisionCore(
            self.settings, predictor=_predictor(self.settings), watchlist=_watchlist(self.settings)
        )
        self.maps = {
            name: runtime_context.get_map_state(MapStateDescriptor(name, Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            for name in MAPS
        }
        self.loaded = False
        self.heap = FrozenState()
        self.metrics: JobMetrics | None = None
        if self.settings.metrics.enabled:
            thread_mode = self.settings.job.python_execution_mode == "thread"
            self.metrics = JobMetrics(runtime_context.get_metrics_group(), thread_mode=thread_mode)
        self.core.bootstrap()

    def _load(self, ctx) -> None:
        """The state maps (and, if the control topics could not be read at start, the broadcast
        state) into the core, once: keyed state is only readable with a key, i.e. in a call."""
        if self.loaded:
            return
        maps = {name: dict(state.items()) for name, state in self.maps.items()}
        broadcast = dict(ctx.get_broadcast_state(BROADCAST).items()) if self.core.bootstrapped is None else None
        self._register(ctx, self.core.restore(maps, broadcast))
        self.loaded = True

    @staticmethod
    def _register(ctx, timer: int | None) -> None:
        if timer is not None:
            ctx.timer_service().register_processing_time_timer(timer)

    def _finish(self, step: Step, ctx) -> bytes | None:
        """Write the step's state changes, register its timer, report the metrics; its outputs as one batch, if any."""
        commit(self.maps, step.writes)
        self._register(ctx, step.timer)
        self._report()
        return _pack(step.outputs)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.report(self.core.stats)

    # --- inputs --------------------------------------------------------------------------------
    def process_element(self, batch: Any, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        self._load(ctx)
        step = self.core.on_records(unpack_records(_as_bytes(batch)), now_ms())
        out = self._finish(step, ctx)
        self.heap.settle()
        if out is not None:
            yield out

    def on_timer(self, timestamp: int, ctx: KeyedBroadcastProcessFunction.OnTimerContext):
        self._load(ctx)
        out = self._finish(self.core.on_timer(timestamp, now_ms()), ctx)
        if out is not None:
            yield out

    def process_broadcast_element(self, row: Row, ctx: KeyedBroadcastProcessFunction.Context):
        """Rules and watchlist changes: applied now, kept in broadcast state for restores."""
        key = bytes(row[0]) if row[0] is not None else None
        value = bytes(row[1]) if row[1] is not None else None
        outputs, update = self.core.on_control(row[2], key, value, row[3], row[4])
        if outputs:
            self._report()  # a rejected update's dead letter
        out = _pack(outputs)
        if out is not None:
            yield out
        keep_in_broadcast(self.core, ctx.get_broadcast_state(BROADCAST), update)


def keep_in_broadcast(core: DecisionCore, broadcast: Any, update: Any) -> None:
    """A control update into the broadcast state (kept for restores); at the first one after a start-up read, the
    restored watchlist entries the topic no longer holds go (:meth:`DecisionCore.stale_broadcast`). Only the
    broadcast state's ``items()`` is read: in thread mode PyFlink's has no working ``keys()`` (its Java state has
    no such method), and calling it failed the operator at every control record, restarting the job in a loop."""
    if update is not None:
        if update.value is None:
            broadcast.remove(update.key)
        else:
            broadcast.put(update.key, update.value)
    if core.broadcast_check_due():
        for stale in core.stale_broadcast([key for key, _ in broadcast.items()]):  # a forgotten subject: out
            broadcast.remove(stale)


def commit(maps: dict[str, Any], writes: Writes) -> None:
    """One call's state changes into MapState: removals one by one, the rest in one ``put_all`` per map."""
    for name, changes in writes.items():
        state = maps[name]
        puts = _Entries()
        for key, value in changes.items():
            if value is None:
                state.remove(key)
            else:
                puts[key] = value
        if puts:
            state.put_all(puts)


class _Entries(dict):
    """A dict that iterates as (key, value) pairs: MapState.put_all takes a dict in thread mode but
    iterates its argument as pairs in process mode (PyFlink 2.2), so this one serves both."""

    def __iter__(self):
        return iter(self.items())


class FrozenState:
    """Keeps Python's cycle collector off the job's long-lived state.

    Why: the state (receipts, customers, ... : hundreds of thousands of objects, growing with the
    retention window) is what the collector's full passes would walk, over and over, while the
    thread holds every record: we measured 80-220 ms pauses at 0.2-0.5 M objects, the whole
    event->decision tail. Once a second the objects that survived are collected over (only those
    made since the last time: frozen ones are skipped) and frozen. State objects hold no reference
    cycles and are freed by reference counting when the job drops them, so freezing them leaks nothing.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0

    def settle(self) -> None:
        now = time.monotonic()
        if now >= self.next_at:
            gc.collect()
            gc.freeze()
            self.next_at = now + self.interval_s


def _pack(outputs: list[OutRow]) -> bytes | None:
    """The core's output rows as one batch for the Java ``OutputUnbatcher``; ``None`` when there are none."""
    if not outputs:
        return None
    out = OutputBatch()
    for topic, key, value in outputs:
        out.add(topic, key, value)
    return out.to_bytes()


def _as_bytes(data: Any) -> bytes:
    """A byte[] from the JVM: ``bytes`` in thread mode; in process mode too, but be lenient."""
    return data if isinstance(data, bytes) else bytes(b & 0xFF for b in data)


def _predictor(settings: Settings, *, tally_drift: bool = False):
    """The configured fraud model. Imported here, not at the top, so the client process that only
    builds the job graph does not load LightGBM; a broken install fails the job at start, loudly."""
    from jobs.model.predictors import make_predictor

    return make_predictor(settings, tally_drift=tally_drift)


def _watchlist(settings: Settings):
    from infra.threads import one_blas_thread
    from jobs.scoring.watchlist import Watchlist

    one_blas_thread()  # the worker's slot is one core: no spinning BLAS threads beside it (infra/threads.py)
    return Watchlist(settings)
