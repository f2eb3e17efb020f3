"""PyFlink scoring job: ``transactions`` -> ``processed_transactions`` + ``alerts`` + ``dead_letters``.

Inputs: Avro ``PosTransaction`` records on the transactions topic (any bytes, really: bad ones are
dead-lettered with their topic/partition/offset and the reason).
Outputs: one ``ScoredTransaction`` per transaction (key = transaction id), an ``Alert`` per block
(key = alert id), ``DeadLetter`` records (key = ``topic:partition:offset``).

Only wiring lives here; the logic is in :mod:`jobs.scoring` (pure). Delivery: checkpoints every
``job.checkpoint_interval_ms`` (state + source offsets); the Kafka sink is at-least-once and every
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

from pyflink.common import Configuration, Row, Time
from pyflink.common.typeinfo import Types
from pyflink.datastream import (
    DataStream,
    KeyedProcessFunction,
    OutputTag,
    ProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from infra.settings import Settings, get_settings
from jobs.features import receipt_key
from jobs.scoring import Scorer
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
ENVELOPE = Types.PICKLED_BYTE_ARRAY()
DLQ_TAG = OutputTag("dead-letters", OUT_ROW)

RECEIPT_TTL_DAYS = 400
STORE_TTL_DAYS = 2
CUSTOMER_TTL_DAYS = 400


def _ttl(days: int) -> StateTtlConfig:
    return (
        StateTtlConfig.new_builder(Time.days(days))
        .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
        .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
        .build()
    )


class ParseStep(ProcessFunction):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        self.scorer = Scorer(self.settings)

    def process_element(self, row: Row, ctx: ProcessFunction.Context):
        ts = row[5]
        ingest_ms = ts.to_epoch_milli() if hasattr(ts, "to_epoch_milli") else int(ts or 0)
        out = self.scorer.parse(row[1], row[0], row[2], row[3], row[4], ingest_ms)
        if isinstance(out[0], str):
            yield DLQ_TAG, Row(*out)
        else:
            yield out


class _StatefulStep(KeyedProcessFunction):
    """A step whose per-key state is one Python object kept in a ValueState."""

    state_name = ""
    ttl_days = 0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def open(self, runtime_context: RuntimeContext) -> None:
        self.scorer = Scorer(self.settings)
        desc = ValueStateDescriptor(self.state_name, Types.PICKLED_BYTE_ARRAY())
        desc.enable_time_to_live(_ttl(self.ttl_days))
        self.state = runtime_context.get_state(desc)


class ReceiptStep(_StatefulStep):
    state_name, ttl_days = "receipt", RECEIPT_TTL_DAYS

    def process_element(self, env: Any, ctx: KeyedProcessFunction.Context):
        state, out = self.scorer.by_receipt(self.state.value(), env)
        self.state.update(state)
        if out is not None:
            yield out


class StoreStep(_StatefulStep):
    state_name, ttl_days = "store", STORE_TTL_DAYS

    def process_element(self, env: Any, ctx: KeyedProcessFunction.Context):
        state, out = self.scorer.by_store(self.state.value(), env)
        self.state.update(state)
        yield out


class CustomerStep(_StatefulStep):
    state_name, ttl_days = "customer", CUSTOMER_TTL_DAYS

    def process_element(self, env: Any, ctx: KeyedProcessFunction.Context):
        state, rows = self.scorer.by_customer(self.state.value(), env)
        self.state.update(state)
        for row in rows:
            yield Row(*row)


def _receipt_of(env: Any) -> str:
    return receipt_key(env[0])


def _store_of(env: Any) -> str:
    return env[0]["store_id"]


def _customer_of(env: Any) -> str:
    from jobs.features import customer_key

    return customer_key(env[0])


def build_pipeline(source: DataStream, settings: Settings) -> DataStream:
    """Source rows (``SOURCE_ROW``) -> output rows (``OUT_ROW``): decisions, alerts, dead letters."""
    parsed = source.process(ParseStep(settings), output_type=ENVELOPE).name("parse and validate").uid("parse")
    scored = (
        parsed.key_by(_receipt_of, key_type=Types.STRING())
        .process(ReceiptStep(settings), output_type=ENVELOPE).name("match returns to receipts").uid("receipts")
        .key_by(_store_of, key_type=Types.STRING())
        .process(StoreStep(settings), output_type=ENVELOPE).name("track store activity").uid("stores")
        .key_by(_customer_of, key_type=Types.STRING())
        .process(CustomerStep(settings), output_type=OUT_ROW).name("score customer and decide").uid("customers")
    )
    return scored.union(parsed.get_side_output(DLQ_TAG))


# --- wiring to Kafka -------------------------------------------------------------------------

def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete retained checkpoint (a ``chk-N`` folder with ``_metadata``)."""
    best: tuple[float, Path] | None = None
    for meta in checkpoint_dir.glob("*/chk-*/_metadata"):
        stamp = meta.stat().st_mtime
        if best is None or stamp > best[0]:
            best = (stamp, meta.parent)
    return best[1] if best else None


def connector_jars(settings: Settings) -> list[Path]:
    """The Kafka connector jar(s) that ``make setup`` put under the stack's lib folder."""
    jars = sorted((settings.stack_dir / "lib" / "flink").glob("flink-sql-connector-kafka-*.jar"))
    if not jars:
        raise FileNotFoundError("flink-sql-connector-kafka jar missing: run `make setup` first")
    return jars


def flink_configuration(settings: Settings, restore_from: Path | None) -> Configuration:
    job = settings.job
    conf = Configuration()
    values = {
        "pipeline.jars": ";".join(jar.resolve().as_uri() for jar in connector_jars(settings)),
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
        "state.backend.type": "hashmap",
        "restart-strategy.type": "exponential-delay",
        "taskmanager.memory.process.size": job.taskmanager_process_memory,
        "taskmanager.memory.managed.size": "256m",
        "taskmanager.numberOfTaskSlots": str(max(1, job.parallelism)),
        "rest.bind-address": "127.0.0.1",
        "rest.address": "127.0.0.1",
    }
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
