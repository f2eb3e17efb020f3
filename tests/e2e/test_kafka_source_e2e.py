"""The scoring job's Kafka source against the real broker: what of a record's headers reaches Python."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.settings import Settings
from schemas.records import REDRIVEN_HEADER
from tests.builders import java_bytes


@pytest.fixture
def topic(stack: Settings):
    name = f"src{uuid.uuid4().hex[:8]}.transactions"
    admin = AdminClient(stack.kafka.client_config())
    for fut in admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)]).values():
        fut.result()
    yield name
    for fut in admin.delete_topics([name]).values():
        fut.result()


def test_the_jobs_kafka_source_hands_python_a_re_driven_copys_dead_letter_id_and_no_other_header(
    stack: Settings, topic: str, tmp_path
):
    """The job reads ``REDRIVEN_HEADER`` (the partitioned layout's receipt takes a re-drive of a later step's
    failure by it): the Kafka table's ``headers`` column, through the Java batcher, to the record Python parses."""
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.java_gateway import get_gateway
    from pyflink.table import StreamTableEnvironment

    from jobs.flink.frames import unpack_records
    from jobs.flink.job import _batched, _source_table, _with_ext_jar, flink_configuration

    producer = Producer(stack.kafka.client_config())
    producer.produce(topic, key=b"k1", value=b"plain", headers=[("trace", b"t")])
    producer.produce(topic, key=b"k2", value=b"copy", headers=[("trace", b"u"), (REDRIVEN_HEADER, b"letter-1")])
    assert producer.flush(30) == 0
    settings = stack.isolated(f"test-{uuid.uuid4().hex[:8]}", tmp_path)
    settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"enabled": False})})
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(settings, None))
    env.set_parallelism(1)
    t_env = StreamTableEnvironment.create(env)
    _with_ext_jar(env, settings)
    source = _source_table(
        t_env, "src", topic, settings.consumer_group, {"scan.startup.mode": "earliest-offset"}, settings
    )
    got = []
    with _batched(source, get_gateway().jvm.checkoutguard.flink, settings).execute_and_collect() as batches:
        for batch in batches:
            got += unpack_records(java_bytes(batch))
            if len(got) >= 2:
                break
    assert [(r.key, r.value, r.topic, r.offset, r.redriven) for r in got] == [
        (b"k1", b"plain", topic, 0, None),
        (b"k2", b"copy", topic, 1, b"letter-1"),
    ]
