"""PyFlink scoring job: ``transactions`` -> ``processed_transactions`` + ``alerts`` + ``dead_letters``.

Inputs: Avro ``PosTransaction`` records on the transactions topic (any bytes, really: bad ones are
dead-lettered with their topic/partition/offset and the reason).
Outputs: one ``ScoredTransaction`` per transaction (key = transaction id), an ``Alert`` per block
(key = alert id), ``DeadLetter`` records (key = ``topic:partition:offset``).

Only wiring lives here; the logic is in :mod:`jobs.scoring` (pure). Delivery: incremental RocksDB
checkpoints every ``job.checkpoint_interval_ms`` (state + source offsets); the Kafka sink is at-least-once and every
output carries a deterministic key, so consumers are idempotent by key (OpenSearch ``_id``, alert
dedup key) and a crash doubles nothing downstream. On start the job resumes from the newest retained
checkpoint, so its keyed state (receipts, store activity, customer history) survives ``SIGKILL``.

Run it: ``python -m jobs.scoring_job`` (needs the stack: ``make up``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Row
from pyflink.common.typeinfo import Types
from pyflink.datastream import (
    DataStream,
    KeyedProcessFunction,
    OutputTag,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import MapStateDescriptor
from pyflink.table import StreamTableEnvironment

from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack import flink_connector_jars
from jobs.scoring import CUSTOMERS, RECEIPTS, STORES, Scorer, ScoringState
from schemas.topics import ALERTS, DEAD_LETTERS, SCORED_TRANSACTIONS, TRANSACTIONS

log = logging.getLogger("checkout_guard.scoring_job")

SOURCE_ROW = Types.ROW_NAMED(
    ["k", "v", "topic", "partition", "offset", "ts"],
    [Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.STRING(), Types.INT(),
     Types.LONG(), Types.LONG()],
)
"""One Kafka record as the job sees it: key, value, where it came from, broker timestamp (ms, or the
Kafka table's TIMESTAMP_LTZ as a pyflink ``Instant``)."""
OUT_ROW = Types.ROW_NAMED(
    ["topic", "k", "v"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE())]
)
"""One output record: target topic, key, value."""
DLQ_TAG = OutputTag("dead-letters", OUT_ROW)

STATE_KEY = "all"
"""Every transaction is scored under one key, see :class:`ScoreStep`."""


def _epoch_ms(ts: Any) -> int:
    """The Kafka timestamp: a pyflink Instant (process mode), a Java Instant (thread mode) or ms."""
    if hasattr(ts, "to_epoch_milli"):
        return ts.to_epoch_milli()
    if hasattr(ts, "toEpochMilli"):
        return int(ts.toEpochMilli())
    return int(ts or 0)


class ScoreStep(KeyedProcessFunction):
    """Parse, match receipts, track stores and customers, decide — in one operator.

    Why one operator, with its state in Flink MapState read through a Python cache: in PyFlink
    every state read that misses the Python worker's cache is a round trip to the JVM (~2-3 ms on a
    2-core machine), and most reads are of new keys (every sale opens a receipt), so per-key state
    in separate keyed steps capped the job at ~150 tx/s. Here the three maps are loaded from
    MapState once, after start or restore, and are then authoritative; every change is written back
    to MapState (buffered, no round trip), which Flink checkpoints with the source offsets.
    Cross-key lookups (a return at store B against a sale at store A, by another card) need no
    shuffle, and parsing here saves a hop between Python operators. The price: scoring runs in one
    slot — enough for a store chain's POS traffic on this machine (``make bench``); sharding by
    region is the way to scale out.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        self.scorer = Scorer(self.settings)
        self.maps = {
            name: runtime_context.get_map_state(MapStateDescriptor(name, Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
            for name in (RECEIPTS, STORES, CUSTOMERS)
        }
        self.state: ScoringState | None = None

    def process_element(self, row: Row, ctx: KeyedProcessFunction.Context):
        env = self.scorer.parse(row[1], row[0], row[2], row[3], row[4], _epoch_ms(row[5]))
        if isinstance(env[0], str):
            yield DLQ_TAG, Row(*env)
            return
        if self.state is None:
            self.state = ScoringState.restore(**{name: dict(m.items()) for name, m in self.maps.items()})
        rows, writes = self.scorer.score(env, self.state)
        for name, key, value in writes:
            if value is None:
                self.maps[name].remove(key)
            else:
                self.maps[name].put(key, value)
        for out in rows:
            yield Row(*out)


def _state_key(row: Row) -> str:
    return STATE_KEY


def build_pipeline(source: DataStream, settings: Settings) -> DataStream:
    """Source rows (``SOURCE_ROW``) -> output rows (``OUT_ROW``): decisions, alerts, dead letters."""
    scored = (
        source.key_by(_state_key, key_type=Types.STRING())
        .process(ScoreStep(settings), output_type=OUT_ROW)
        .name("parse, match receipts, track stores and customers, decide")
        .uid("score")
    )
    return scored.union(scored.get_side_output(DLQ_TAG))


# --- wiring to Kafka -------------------------------------------------------------------------

def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete retained checkpoint (a ``chk-N`` folder with ``_metadata``)."""
    best: tuple[float, Path] | None = None
    for meta in checkpoint_dir.glob("*/chk-*/_metadata"):
        stamp = meta.stat().st_mtime
        if best is None or stamp > best[0]:
            best = (stamp, meta.parent)
    return best[1] if best else None


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


def kafka_source(t_env: StreamTableEnvironment, settings: Settings) -> DataStream:
    prefix = settings.kafka.topic_prefix
    t_env.execute_sql(f"""
        CREATE TEMPORARY TABLE pos_in (
          k BYTES, v BYTES,
          `topic` STRING METADATA VIRTUAL,
          `partition` INT METADATA VIRTUAL,
          `offset` BIGINT METADATA VIRTUAL,
          `timestamp` TIMESTAMP_LTZ(3) METADATA VIRTUAL
        ) WITH (
          'connector' = 'kafka', 'topic' = '{TRANSACTIONS.full_name(prefix)}',
          'properties.group.id' = '{settings.job.consumer_group}',
          'properties.isolation.level' = 'read_committed',
          {_startup(settings)},
          'key.format' = 'raw', 'key.fields' = 'k',
          'value.format' = 'raw', 'value.fields-include' = 'EXCEPT_KEY',
          {_kafka_options(settings)}
        )""")
    return t_env.to_data_stream(t_env.from_path("pos_in"))


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
    restore = latest_checkpoint(settings.checkpoint_dir)
    log.info("starting scoring job%s", f", restoring {restore.parent.name}/{restore.name}" if restore else "")
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(settings, restore))
    env.set_buffer_timeout(settings.job.buffer_timeout_ms)
    t_env = StreamTableEnvironment.create(env)
    out = build_pipeline(kafka_source(t_env, settings), settings)
    kafka_sink(t_env, out, settings)
    env.execute("checkout-guard-scoring")


if __name__ == "__main__":
    main()
