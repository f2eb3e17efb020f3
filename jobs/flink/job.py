"""PyFlink scoring job: ``transactions`` -> ``processed_transactions`` + ``alerts`` + ``dead_letters``.

Inputs: Avro ``PosTransaction`` records on the transactions topic (any bytes, really: bad ones are
dead-lettered with their topic/partition/offset and the reason).
Outputs: one ``ScoredTransaction`` per transaction (key = transaction id), an ``Alert`` per block
(key = alert id), ``DeadLetter`` records (key = ``topic:partition:offset``).

Only wiring lives here; the logic is in :mod:`jobs.scoring.scorer` (pure). Delivery: incremental RocksDB
checkpoints every ``job.checkpoint_interval_ms`` (state + source offsets); the Kafka sink is at-least-once and every
output carries a deterministic key, so consumers are idempotent by key (OpenSearch ``_id``, alert
dedup key) and a crash doubles nothing downstream. On start the job resumes from the newest retained
checkpoint, so its keyed state (receipts, store activity, customer history) survives ``SIGKILL``.

Run it: ``python -m jobs.flink.job`` (needs the stack: ``make up``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import (
    DataStream,
    KeyedBroadcastProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import MapStateDescriptor
from pyflink.table import StreamTableEnvironment

from infra.clients.control_topics import read_control_topics
from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack import flink_connector_jars, flink_ext_jar
from jobs.flink.frames import OutputBatch, OutRecord, SourceRecord, unpack_records
from jobs.scoring.face_join import EARLY_FACES, PENDING, FaceJoin, Ready, observation_result, seen_from
from jobs.scoring.rules import RuleSet
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, STORES, Scorer, ScoringState
from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.records import dead_letter
from schemas.topics import (
    ALERTS,
    DEAD_LETTERS,
    FACE_OBSERVATIONS,
    RULES,
    SCORED_TRANSACTIONS,
    TRANSACTIONS,
    WATCHLIST,
)

log = logging.getLogger("checkout_guard.scoring_job")

SOURCE_ROW = Types.ROW_NAMED(
    ["k", "v", "topic", "partition", "offset", "ts"],
    [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.STRING(), Types.INT(),
     Types.LONG(), Types.LONG()],
)
"""One Kafka record as the job sees it: key, value, where it came from, broker timestamp (ms, or the
Kafka table's TIMESTAMP_LTZ as an ``Instant``)."""
OUT_ROW = Types.ROW_NAMED(
    ["topic", "k", "v"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE())]
)
"""One output record: target topic, key, value."""
BATCH_BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
"""A batch of records in or out of the scoring step (framing in :mod:`jobs.flink.frames`)."""
STATE_KEY = "all"
"""Every transaction is scored under one key, see :class:`DecideStep`."""
BROADCAST = MapStateDescriptor("broadcast", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
"""Rules (key ``rules``) and watchlist entries (key ``wl:<subject>``), the same in every instance."""
LEGACY_BATCH = "batch"
"""Where the job kept transactions waiting for a model batch before batching moved into the JVM: what a
restored checkpoint still holds there is decided at the first call."""


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
    restore, and are then authoritative; the changes of a batch are written back to MapState at its
    end (one ``put_all`` per map), which Flink checkpoints with the source offsets. Cross-key
    lookups (a return at store B against a sale at store A, by another card) need no shuffle.
    Transactions waiting for their face are state too, so a crash between reading a transaction and
    deciding it loses nothing. Every transaction released by a batch is decided in one model call.
    The price: scoring runs in one slot; sharding by region is the way to scale out.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        job = self.settings.job
        self.scorer = Scorer(self.settings, predictor=_predictor(self.settings))
        self.join = FaceJoin(job.face_deadline_ms, job.early_face_ttl_ms)
        self.maps = {
            name: runtime_context.get_map_state(MapStateDescriptor(name, Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            for name in (RECEIPTS, STORES, CUSTOMERS, PENDING, EARLY_FACES, LEGACY_BATCH)
        }
        self.changes: dict[str, dict[str, Any]] = {name: {} for name in self.maps}
        self.state: ScoringState | None = None
        self.restored_ready: list[Ready] = []
        self.watchlist = _watchlist(self.settings)
        self.forgotten: list[str] = []
        self.deadline_at: int | None = None
        self.heap = FrozenState()
        prefix = self.settings.kafka.topic_prefix
        self.tx_topic = TRANSACTIONS.full_name(prefix)
        self.rules_topic = RULES.full_name(prefix)
        self.face_codec = codec("FaceObservation")
        self.watch_codec = codec("WatchlistEntry")
        self.rules_codec = codec("RuleSetUpdate")
        self.bootstrapped = self._bootstrap()

    def _bootstrap(self) -> dict[tuple[str, int], int] | None:
        """Read the rule set and the watchlist from their compacted topics before the first decision.

        The broadcast stream alone would race the transactions at a fresh start (a known suspect
        could pass while the watchlist is still streaming in). Returns the last offset applied per
        partition, so the broadcast stream skips what is already in force; ``None`` if Kafka could
        not be read, and the broadcast state restored from the checkpoint is used instead.
        """
        if not self.settings.job.bootstrap_control:
            return None
        try:
            return read_control_topics(self.settings, self._bootstrap_record)
        except Exception as err:  # noqa: BLE001 - degrade to the broadcast stream, loudly
            log.warning("could not read the rules/watchlist topics at start (%s); using broadcast state", err)
            return None

    def _control_record(self, topic: str, key: bytes | None, value: bytes | None,
                        apply: bool = True) -> tuple[str, Any] | None:
        """A rules or watchlist record as (broadcast state key, value or None for a tombstone),
        applied unless ``apply`` is false."""
        if topic == self.rules_topic:
            if value is None:
                return None
            update = ("rules", self.rules_codec.decode(value))
        else:
            update = (f"wl:{(key or b'').decode()}", self.watch_codec.decode(value) if value is not None else None)
        if apply:
            self._apply_broadcast(*update)
        return update

    def _bootstrap_record(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        try:
            self._control_record(topic, key, value)
        except Exception as err:  # noqa: BLE001 - the broadcast stream dead-letters it
            log.warning("skipping a bad %s record at start: %s", topic, err)

    # --- state ---------------------------------------------------------------------------------
    def _load(self, ctx) -> ScoringState:
        if self.state is None:
            self.state = ScoringState.restore(
                **{name: dict(self.maps[name].items()) for name in (RECEIPTS, STORES, CUSTOMERS)}
            )
            self.join.restore(dict(self.maps[PENDING].items()), dict(self.maps[EARLY_FACES].items()))
            for tx_id, (env, seen) in self.maps[LEGACY_BATCH].items():
                self.restored_ready.append(Ready(env, seen))
                self.changes[LEGACY_BATCH][tx_id] = None
            if self.bootstrapped is None:
                for key, value in ctx.get_broadcast_state(BROADCAST).items():
                    self._apply_broadcast(key, value)
            self._arm(ctx)
        return self.state

    def _persist(self, writes) -> None:
        """Note changes; :meth:`_commit` writes the last value of each key at the end of the call."""
        for name, key, value in writes:
            self.changes[name][key] = value

    def _commit(self) -> None:
        for name, changes in self.changes.items():
            if not changes:
                continue
            state = self.maps[name]
            puts = _Entries()
            for key, value in changes.items():
                if value is None:
                    state.remove(key)
                else:
                    puts[key] = value
            if puts:
                state.put_all(puts)
            changes.clear()

    def _arm(self, ctx) -> None:
        """Keep one timer, for the earliest face deadline."""
        deadline = self.join.next_deadline()
        if deadline is not None and (self.deadline_at is None or deadline < self.deadline_at):
            self.deadline_at = deadline
            ctx.timer_service().register_processing_time_timer(deadline)

    # --- inputs --------------------------------------------------------------------------------
    def process_element(self, batch: Any, ctx: KeyedBroadcastProcessFunction.ReadOnlyContext):
        state = self._load(ctx)
        if self.forgotten:
            self._forget_faces()
        now = _now_ms()
        out = OutputBatch()
        ready = self.restored_ready
        self.restored_ready = []
        for record in unpack_records(_as_bytes(batch)):
            item = self._take(record, state, now, out)
            if item is not None:
                ready.append(item)
        self._decide(ready, out)
        self._commit()
        self._arm(ctx)
        self.heap.settle()
        if out.count:
            yield out.to_bytes()

    def _take(self, record: SourceRecord, state: ScoringState, now: int, out: OutputBatch) -> Ready | None:
        """One transaction or face observation: state updated, outputs added; what is ready to decide."""
        key, value, topic, partition, offset, ts = record
        if topic == self.tx_topic:
            env = self.scorer.parse(value, key, topic, partition, offset, ts)
            if isinstance(env[0], str):
                out.add(*env)
                return None
            try:
                env, writes = self.scorer.observe(env, state)
            except InvalidRecord as err:
                out.add(*self._dead_letter(record, err.kind, err.reason))
                return None
            self._persist(writes)
            if env is None:
                return None
            ready, writes = self.join.on_transaction(env, now)
        else:
            try:
                obs = self.face_codec.decode(value or b"")
            except Exception as err:  # noqa: BLE001 - any undecodable observation is a dead letter
                out.add(*self._dead_letter(record, "not_avro", f"face observation: {err}"))
                return None
            face = observation_result(obs, self.watchlist)
            if obs["trigger"] == "ENTRANCE" or not obs.get("transaction_id"):
                for alert in self.scorer.entrance(obs, face):
                    out.add(*alert)
                return None
            ready, writes = self.join.on_observation(obs["transaction_id"], seen_from(obs, face, now))
        self._persist(writes)
        return ready

    def on_timer(self, timestamp: int, ctx: KeyedBroadcastProcessFunction.OnTimerContext):
        self._load(ctx)
        now = _now_ms()
        if self.deadline_at is not None and timestamp >= self.deadline_at:
            self.deadline_at = None
        due, writes = self.join.due(now)
        self._persist(writes)
        out = OutputBatch()
        self._decide([*self.restored_ready, *due], out)
        self.restored_ready = []
        self._commit()
        self._arm(ctx)
        if out.count:
            yield out.to_bytes()

    def process_broadcast_element(self, row: Row, ctx: KeyedBroadcastProcessFunction.Context):
        """Rules and watchlist changes: applied now, kept in broadcast state for restores."""
        key = bytes(row[0]) if row[0] is not None else None
        value = bytes(row[1]) if row[1] is not None else None
        done = self.bootstrapped.get((row[2], row[3]), -1) if self.bootstrapped else -1
        try:
            # Read at start already: only keep the broadcast state complete.
            update = self._control_record(row[2], key, value, apply=row[4] > done)
        except Exception as err:  # noqa: BLE001 - a bad update must not stop scoring: dead-letter it
            log.warning("rejected %s update at offset %s: %s", row[2], row[4], err)
            out = OutputBatch()
            out.add(*self._dead_letter((key, value, row[2], row[3], row[4], 0), "invalid_update", str(err)))
            yield out.to_bytes()
            return
        if update is None:
            return
        broadcast = ctx.get_broadcast_state(BROADCAST)
        if update[1] is None:
            broadcast.remove(update[0])
        else:
            broadcast.put(*update)

    def _apply_broadcast(self, key: str, value: Any) -> None:
        if key == "rules":
            self.scorer.rule_set = RuleSet.from_yaml(value["yaml"])
            log.info("rule set %s active", self.scorer.rule_set.version)
        elif key.startswith("wl:") and self.watchlist is not None:
            if value is None:
                self.watchlist.remove(key[3:])
                self.forgotten.append(key[3:])
            else:
                self.watchlist.upsert(value)

    def _forget_faces(self) -> None:
        """``forget subj-<tx>`` also drops that transaction's buyer face from its receipt (keyed
        state is only reachable here, on the keyed side, hence the queue)."""
        while self.forgotten:
            subject = self.forgotten.pop()
            tx_id = subject.removeprefix("subj-")
            receipt = self.state.receipts.get(tx_id) if self.state else None
            if receipt is not None and receipt.sale_face is not None:
                receipt.sale_face = None
                self._persist([(RECEIPTS, tx_id, receipt)])

    # --- decisions -----------------------------------------------------------------------------
    def _decide(self, ready: list[Ready], out: OutputBatch) -> None:
        """Model, rules and outputs for every released transaction, in model calls of ``batch_size``."""
        size = max(1, self.settings.job.batch_size)
        for start in range(0, len(ready), size):
            chunk = ready[start:start + size]
            rows, writes = self.scorer.decide_batch(
                [item.env for item in chunk], seen=[item.seen for item in chunk], state=self.state,
            )
            self._persist(writes)
            for row in rows:
                out.add(*row)

    def _dead_letter(self, record: SourceRecord, kind: str, reason: str) -> OutRecord:
        key, value, topic, partition, offset, _ = record
        dl = dead_letter(topic=topic, partition=partition, offset=offset, key=key, value=value,
                         error=InvalidRecord(kind, reason), stage="scoring-job", failed_at=_now_ms())
        return (self.scorer.dlq_topic, dl.dead_letter_id.encode(), dl.encode())


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


def _now_ms() -> int:
    return int(time.time() * 1000)


def _as_bytes(data: Any) -> bytes:
    """A byte[] from the JVM: ``bytes`` in thread mode; in process mode too, but be lenient."""
    return data if isinstance(data, bytes) else bytes(b & 0xFF for b in data)


def _predictor(settings: Settings):
    """The configured fraud model. Imported here, not at the top, so the client process that only
    builds the job graph does not load LightGBM; a broken install fails the job at start, loudly."""
    from jobs.model.predictors import make_predictor

    return make_predictor(settings)


def _watchlist(settings: Settings):
    from jobs.scoring.watchlist import Watchlist

    return Watchlist(settings)


def _state_key(batch: Any) -> str:
    return STATE_KEY


def _with_ext_jar(env, settings: Settings) -> None:
    """Make the job's Java operators (``RecordBatcher``, ``OutputUnbatcher``) loadable, once."""
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    uri = flink_ext_jar(settings).resolve().as_uri()
    jvm = get_gateway().jvm
    config = jvm.org.apache.flink.python.util.PythonConfigUtil.getEnvironmentConfig(env._j_stream_execution_environment)
    if uri in (config.getString(jvm.org.apache.flink.configuration.PipelineOptions.JARS.key(), None) or ""):
        add_jars_to_context_class_loader([uri])
    else:
        env.add_jars(uri)


def build_pipeline(source: DataStream, settings: Settings, broadcast: DataStream | None = None) -> DataStream:
    """Source rows (``SOURCE_ROW``: transactions, face observations) + broadcast rows (rules,
    watchlist) -> output rows (``OUT_ROW``): decisions, alerts, dead letters.

    Java batches the rows for Python (at most ``job.batch_size`` records, ``job.batch_time_ms``
    after the first, and before every checkpoint barrier) and unpacks Python's output batches."""
    from pyflink.java_gateway import get_gateway

    env = source.get_execution_environment()
    _with_ext_jar(env, settings)
    if broadcast is None:
        broadcast = env.from_collection([], type_info=SOURCE_ROW)
    ops = get_gateway().jvm.checkoutguard.flink
    job = settings.job
    batches = DataStream(source._j_data_stream.transform(
        "batch records for Python", BATCH_BYTES.get_java_type_info(),
        ops.RecordBatcher(job.batch_size, job.batch_time_ms),
    ).uid("batch-in"))
    scored = (
        batches.key_by(_state_key, key_type=Types.STRING())
        .connect(broadcast.broadcast(BROADCAST))
        .process(DecideStep(settings), output_type=BATCH_BYTES)
        .name("parse, match receipts, track stores and customers, join faces, decide")
        .uid("score")
    )
    # A chain of its own: unpacking and the Kafka sink run on the other core, not in Python's thread.
    return DataStream(scored._j_data_stream.flatMap(ops.OutputUnbatcher(), OUT_ROW.get_java_type_info())
                      .name("unpack outputs").uid("batch-out").startNewChain())


# --- wiring to Kafka -------------------------------------------------------------------------

def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete retained checkpoint (``chk-N``) or savepoint, by the time it was written."""
    best: tuple[float, Path] | None = None
    for pattern in ("*/chk-*/_metadata", "savepoints/savepoint-*/_metadata"):
        for meta in checkpoint_dir.glob(pattern):
            stamp = meta.stat().st_mtime
            if best is None or stamp > best[0]:
                best = (stamp, meta.parent)
    return best[1] if best else None


def control_file(settings: Settings) -> Path:
    """Where the running job says who it is (pid, job id), for ``jobs.flink.upgrade``."""
    return settings.checkpoint_dir / "job.json"


def flink_configuration(settings: Settings, restore_from: Path | None) -> Configuration:
    job = settings.job
    conf = Configuration()
    values = {
        "pipeline.jars": ";".join(jar.resolve().as_uri() for jar in flink_connector_jars(settings)),
        "pipeline.name": "checkout-guard-scoring",
        "parallelism.default": str(job.parallelism),
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "python.execution-mode": job.python_execution_mode,
        "python.fn-execution.bundle.size": str(job.bundle_size),
        "python.fn-execution.bundle.time": str(job.bundle_time_ms),
        "execution.checkpointing.interval": f"{job.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": settings.checkpoint_dir.resolve().as_uri(),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "3",
        "state.backend.type": job.state_backend,
        "execution.checkpointing.incremental": "true",
        "restart-strategy.type": "exponential-delay",
        "taskmanager.memory.process.size": job.taskmanager_process_memory,
        "taskmanager.memory.managed.size": "256m",
        "taskmanager.numberOfTaskSlots": str(max(1, job.parallelism)),
        "rest.bind-address": "127.0.0.1",
        "rest.address": "127.0.0.1",
    }
    if job.python_execution_mode == "thread":
        # The embedded (PEMJA) interpreter does not start from our venv: give it its packages.
        import site

        values["python.pythonpath"] = ":".join([*site.getsitepackages(), str(REPO_ROOT)])
    if settings.java_home:
        values["env.java.home"] = str(settings.java_home)
    if restore_from is not None:
        values["execution.state-recovery.path"] = restore_from.resolve().as_uri()
        # A new version may drop an operator (e.g. a source whose topic list changed: its new one
        # resumes from the group's committed offsets); its old state is then left behind, by choice.
        values["execution.state-recovery.ignore-unclaimed-state"] = str(job.ignore_unclaimed_state).lower()
    for key, value in values.items():
        conf.set_string(key, value)
    return conf


def _kafka_options(settings: Settings) -> str:
    opts = {"properties." + k: v for k, v in settings.kafka.client_config().items()}
    return ", ".join(f"'{k}' = '{v}'" for k, v in opts.items())


def _startup(settings: Settings) -> str:
    start = settings.job.starting_offsets
    if start.isdigit():
        return f"'scan.startup.mode' = 'timestamp', 'scan.startup.timestamp-millis' = '{start}'"
    if start == "latest":
        return "'scan.startup.mode' = 'latest-offset'"
    return "'scan.startup.mode' = 'group-offsets', 'properties.auto.offset.reset' = 'earliest'"


def _source_table(t_env: StreamTableEnvironment, name: str, topics: str, group: str, startup: str,
                  settings: Settings) -> DataStream:
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE {name} (
          k BYTES, v BYTES,
          `topic` STRING METADATA VIRTUAL,
          `partition` INT METADATA VIRTUAL,
          `offset` BIGINT METADATA VIRTUAL,
          `timestamp` TIMESTAMP_LTZ(3) METADATA VIRTUAL
        ) WITH (
          'connector' = 'kafka', 'topic' = '{topics}',
          'properties.group.id' = '{group}',
          'properties.isolation.level' = 'read_committed',
          'properties.fetch.max.wait.ms' = '{settings.job.fetch_max_wait_ms}',
          {startup},
          'key.format' = 'raw', 'key.fields' = 'k',
          'value.format' = 'raw', 'value.fields-include' = 'EXCEPT_KEY',
          {_kafka_options(settings)}
        )""")
    return t_env.to_data_stream(t_env.from_path(name))


def kafka_source(t_env: StreamTableEnvironment, settings: Settings) -> DataStream:
    """Transactions and face observations: the keyed input, from the configured start."""
    prefix = settings.kafka.topic_prefix
    topics = f"{TRANSACTIONS.full_name(prefix)};{FACE_OBSERVATIONS.full_name(prefix)}"
    return _source_table(t_env, "pos_in", topics, settings.job.consumer_group, _startup(settings), settings)


def broadcast_source(t_env: StreamTableEnvironment, settings: Settings) -> DataStream:
    """Rules and watchlist: compacted topics read from their beginning (they are the source of truth)."""
    prefix = settings.kafka.topic_prefix
    topics = f"{RULES.full_name(prefix)};{WATCHLIST.full_name(prefix)}"
    return _source_table(t_env, "control_in", topics, f"{settings.job.consumer_group}-control",
                         "'scan.startup.mode' = 'earliest-offset'", settings)


def kafka_sink(t_env: StreamTableEnvironment, out: DataStream, settings: Settings):
    prefix = settings.kafka.topic_prefix
    topics = ";".join(t.full_name(prefix) for t in (SCORED_TRANSACTIONS, ALERTS, DEAD_LETTERS))
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE outputs (
          `topic` STRING METADATA,
          k BYTES, v BYTES
        ) WITH (
          'connector' = 'kafka', 'topic' = '{topics}',
          'sink.delivery-guarantee' = 'at-least-once',
          'key.format' = 'raw', 'key.fields' = 'k',
          'value.format' = 'raw', 'value.fields-include' = 'EXCEPT_KEY',
          'properties.linger.ms' = '2', 'properties.compression.type' = 'lz4',
          {_kafka_options(settings)}
        )""")
    table = t_env.from_data_stream(out)
    statements = t_env.create_statement_set()
    statements.add_insert("outputs", table)
    statements.attach_as_datastream()


def main(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if settings.model.backend != "none" and settings.model.auto_train:
        # Here, before the job is built, so no Flink worker ever trains (a worker only loads).
        from jobs.model.train import ensure_default_model

        ensure_default_model(settings)
    restore = settings.job.restore_from or latest_checkpoint(settings.checkpoint_dir)
    log.info("starting scoring job%s", f", restoring {restore.parent.name}/{restore.name}" if restore else "")
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(settings, restore))
    env.set_buffer_timeout(settings.job.buffer_timeout_ms)
    t_env = StreamTableEnvironment.create(env)
    out = build_pipeline(kafka_source(t_env, settings), settings, broadcast_source(t_env, settings))
    kafka_sink(t_env, out, settings)
    client = env.execute_async("checkout-guard-scoring")
    run_until_done(client, settings)


def _stop_with_savepoint(client, target: str) -> str:
    """Flink's stop-with-savepoint (canonical format). PyFlink 2.2's wrapper still calls the
    two-argument Java method, which Flink 2 replaced by one taking the savepoint format."""
    from pyflink.common.completable_future import CompletableFuture
    from pyflink.java_gateway import get_gateway

    fmt = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    return CompletableFuture(client._j_job_client.stopWithSavepoint(False, target, fmt), str).result()


def run_until_done(client, settings: Settings) -> None:
    """Wait for the job; on SIGUSR1 stop it with a savepoint (the upgrade path), on SIGTERM cancel it.

    The savepoint lands under ``<checkpoints>/savepoints``, where the next start finds it as the
    newest state, so "stop with savepoint, deploy the new code, start" keeps every keyed state.
    """
    requests: list[int] = []
    signal.signal(signal.SIGUSR1, lambda sig, _: requests.append(sig))
    signal.signal(signal.SIGTERM, lambda sig, _: requests.append(sig))
    job_id = str(client.get_job_id())
    control = control_file(settings)
    control.write_text(json.dumps({"pid": os.getpid(), "job_id": job_id}))
    log.info("job %s running (pid %s); SIGUSR1 = stop with savepoint", job_id, os.getpid())
    try:
        while True:
            status = str(client.get_job_status().result())
            if status in ("FINISHED", "FAILED", "CANCELED"):
                log.info("job %s %s", job_id, status)
                return
            if signal.SIGUSR1 in requests:
                target = (settings.checkpoint_dir / "savepoints").resolve().as_uri()
                path = _stop_with_savepoint(client, target)
                log.info("stopped with savepoint %s", path)
                return
            if signal.SIGTERM in requests:
                client.cancel().result()
                log.info("job %s cancelled", job_id)
                return
            time.sleep(0.5)
    finally:
        control.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
