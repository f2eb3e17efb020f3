"""The scoring job's Kafka source against the real broker: what of a record's headers reaches Python.

The Flink part runs in a child process (``python -m tests.e2e.test_kafka_source_e2e``), as every other end-to-end
test runs its jobs: the test session's own process starts no PyFlink gateway before the pipeline tests do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.settings import REPO_ROOT, Settings, get_settings
from schemas.records import REDRIVEN_HEADER


@pytest.fixture
def topic(stack: Settings):
    name = f"src{uuid.uuid4().hex[:8]}.transactions"
    admin = AdminClient(stack.kafka.client_config())
    for fut in admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)]).values():
        fut.result()
    yield name
    for fut in admin.delete_topics([name]).values():
        fut.result()


def read_through_the_job_source(settings: Settings, topic: str, count: int) -> list[list]:
    """The first ``count`` records of ``topic`` as the job's Python step gets them: through the job's Kafka source
    table (bounded at the topic's end) and the Java batcher."""
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.java_gateway import get_gateway
    from pyflink.table import StreamTableEnvironment

    from jobs.flink.frames import unpack_records
    from jobs.flink.job import _batched, _source_table, _with_ext_jar, flink_configuration
    from tests.builders import java_bytes

    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(settings, None))
    env.set_parallelism(1)
    t_env = StreamTableEnvironment.create(env)
    _with_ext_jar(env, settings)
    startup = {"scan.startup.mode": "earliest-offset", "scan.bounded.mode": "latest-offset"}
    source = _source_table(t_env, "src", topic, settings.consumer_group, startup, settings)
    got = []
    with _batched(source, get_gateway().jvm.checkoutguard.flink, settings).execute_and_collect() as batches:
        for batch in batches:
            got += unpack_records(java_bytes(batch))
    return [[r.key.hex(), r.value.hex(), r.topic, r.offset, r.redriven and r.redriven.hex()] for r in got[:count]]


def test_the_jobs_kafka_source_hands_python_a_re_driven_copys_dead_letter_id_and_no_other_header(
    stack: Settings, topic: str, tmp_path
):
    """The job reads ``REDRIVEN_HEADER`` (the partitioned layout's receipt takes a re-drive of a later step's
    failure by it): the Kafka table's ``headers`` column, through the Java batcher, to the record Python parses."""
    producer = Producer(stack.kafka.client_config())
    producer.produce(topic, key=b"k1", value=b"plain", headers=[("trace", b"t")])
    producer.produce(topic, key=b"k2", value=b"copy", headers=[("trace", b"u"), (REDRIVEN_HEADER, b"letter-1")])
    assert producer.flush(30) == 0
    settings = stack.isolated(f"test-{uuid.uuid4().hex[:8]}", tmp_path)
    settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"enabled": False})})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CG_", "PYFLINK_", "_PYFLINK"))}
    env.update(settings.to_env(), CG_ENV_FILE="")
    child = subprocess.run(
        [sys.executable, "-m", "tests.e2e.test_kafka_source_e2e", topic, "2"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got == [
        [b"k1".hex(), b"plain".hex(), topic, 0, None],
        [b"k2".hex(), b"copy".hex(), topic, 1, b"letter-1".hex()],
    ]


if __name__ == "__main__":
    print(json.dumps(read_through_the_job_source(get_settings(), sys.argv[1], int(sys.argv[2]))))
