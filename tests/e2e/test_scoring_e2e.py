"""The walking skeleton on the real stack: producer -> Kafka -> PyFlink job -> Kafka -> OpenSearch.

Valid transactions must end as exactly one OpenSearch document each (with outcome and reasons),
malformed ones as exactly the dead letters that name them, also when the job is SIGKILLed
mid-stream and restarted from its checkpoint.
"""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass, field, replace

import pytest
from confluent_kafka import Consumer, Producer

from infra.clients.opensearch import make_client
from infra.launcher import Child, start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.flink.job import latest_checkpoint
from schemas.codec import MAGIC, codec
from schemas.indices import index_name
from schemas.topics import DEAD_LETTERS, TRANSACTIONS
from tests.e2e.sink_helpers import sink_running

pytestmark = pytest.mark.e2e


def _malformed(valid) -> list[tuple[str, bytes]]:
    """One of each kind of bad input, with the dead-letter kind the job must give it."""
    good = valid.encode()
    return [
        ("not_avro", b'{"transaction_id": "json-is-not-our-format"}'),
        ("unknown_schema", MAGIC + bytes(range(8)) + good[10:]),
        ("missing_field", replace(valid, transaction_id="bad-missing", store_id="").encode()),
        ("invalid_amount", replace(valid, transaction_id="bad-negative", amount=-12.5).encode()),
        ("oversized", MAGIC + b"\x00" * 300_000),
        ("corrupt", good[:-7]),
    ]


@dataclass
class Traffic:
    """What was produced: valid transaction ids, and bad inputs by where they landed."""

    valid: set[str] = field(default_factory=set)
    bad: dict[str, str] = field(default_factory=dict)  # "topic:partition:offset" -> expected kind
    lock: threading.Lock = field(default_factory=threading.Lock)


def _settings(stack: Settings, tmp_path) -> Settings:
    # No face stage runs here: decide at once rather than wait for faces that never come.
    return stack.isolated(
        f"e2e{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=0
    )


def _produce(settings: Settings, traffic: Traffic, txs, bad_every: int, bad_kinds) -> None:
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "linger.ms": 5})
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    errors: list[str] = []

    def delivered(expected_kind):
        def callback(err, msg):
            if err is not None:
                errors.append(str(err))
            elif expected_kind is not None:
                with traffic.lock:
                    traffic.bad[f"{msg.topic()}:{msg.partition()}:{msg.offset()}"] = expected_kind

        return callback

    bad = iter(bad_kinds)
    for i, tx in enumerate(txs):
        producer.produce(topic, key=f"{tx.store_id}/{tx.lane_id}", value=tx.encode(), on_delivery=delivered(None))
        traffic.valid.add(tx.transaction_id)
        if i % bad_every == bad_every - 1:
            kind, data = next(bad, (None, None))
            if kind:
                producer.produce(topic, key=b"lane-x", value=data, on_delivery=delivered(kind))
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors


def _dead_letters(settings: Settings, expected: int) -> dict[str, dict]:
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([DEAD_LETTERS.full_name(settings.kafka.topic_prefix)])
    seen: dict[str, dict] = {}

    def read(timeout: float) -> bool:
        for msg in consumer.consume(500, timeout=timeout):
            if msg.error() is None:
                record = codec("DeadLetter").decode(msg.value())
                assert msg.key().decode() == record["dead_letter_id"]
                seen[record["dead_letter_id"]] = record
        return len(seen) >= expected

    try:
        wait_for(lambda: read(0.5), timeout=120, what=f"{expected} dead letters")
        read(2.0)  # anything more still on its way must show up too
    finally:
        consumer.close()
    return seen


def _documents(settings: Settings, expected: int) -> dict[str, dict]:
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")

    def arrived():
        client.indices.refresh(index=index)
        return client.count(index=index)["count"] >= expected

    wait_for(arrived, timeout=180, interval=1.0, what=f"{expected} documents in {index}")
    docs: dict[str, dict] = {}
    page = client.search(index=index, body={"query": {"match_all": {}}, "size": 10_000})
    for hit in page["hits"]["hits"]:
        docs[hit["_id"]] = hit["_source"]
    assert client.count(index=index)["count"] == len(docs)
    return docs


def _check(settings: Settings, traffic: Traffic) -> None:
    docs = _documents(settings, len(traffic.valid))
    assert set(docs) == traffic.valid, "exactly one document per valid transaction, nothing else"
    for tx_id, doc in docs.items():
        assert doc["transaction_id"] == tx_id
        assert doc["outcome"] in ("APPROVE", "REVIEW", "BLOCK")
        assert isinstance(doc["reasons"], list)
        if doc["outcome"] != "APPROVE":
            assert doc["reasons"], f"{tx_id} was {doc['outcome']} without a reason"
    dead = _dead_letters(settings, len(traffic.bad))
    assert set(dead) == set(traffic.bad), "every malformed message dead-lettered, nothing else"
    for dl_id, kind in traffic.bad.items():
        assert dead[dl_id]["error_kind"] == kind, dead[dl_id]["reason"]
        assert dead[dl_id]["reason"]


@pytest.fixture
def pipeline(stack: Settings, tmp_path):
    settings = _settings(stack, tmp_path)
    ensure_topics(settings)
    with sink_running(settings, timeout_s=30):
        children: list[Child] = []
        yield settings, children
        for child in children:
            child.stop()


def _transactions(n: int, seed: int):
    gen = PosGenerator(seed=seed, stores=4, customers=2000, fraud_share=0.05, tx_per_second=50)
    return [next(gen) for _ in range(n)]


def test_every_valid_transaction_is_indexed_once_and_every_bad_one_dead_lettered(pipeline):
    settings, children = pipeline
    txs = _transactions(1500, seed=11)
    traffic = Traffic()
    children.append(start_scoring_job(settings))
    _produce(settings, traffic, txs, bad_every=200, bad_kinds=_malformed(txs[0]))
    assert len(traffic.bad) == 6
    _check(settings, traffic)


def test_nothing_is_lost_or_doubled_when_the_job_is_killed_mid_stream(pipeline):
    settings, children = pipeline
    txs = _transactions(6000, seed=12)
    traffic = Traffic()
    job = start_scoring_job(settings)
    children.append(job)
    bad = _malformed(txs[0])
    random.Random(5).shuffle(bad)
    producing = threading.Thread(target=_produce, args=(settings, traffic, txs[:3000], 500, bad[:3]))
    producing.start()
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")

    def some_scored():
        client.indices.refresh(index=index)
        return client.count(index=index)["count"] >= 300

    wait_for(some_scored, timeout=120, interval=0.5, what="the job to score some transactions")
    # Kill once a checkpoint holds some of that progress, so the restart really restores state.
    wait_for(lambda: latest_checkpoint(settings.checkpoint_dir), timeout=60, what="a completed checkpoint")
    job.kill()  # SIGKILL, whole process group: client, JVM and Python workers
    job.proc.wait(30)
    producing.join()
    _produce(settings, traffic, txs[3000:], bad_every=500, bad_kinds=bad[3:])
    children.append(start_scoring_job(settings, name=f"{settings.consumer_group}-restarted"))
    _check(settings, traffic)
    assert "restoring" in children[-1].log_path.read_text(), "the restarted job resumes from its checkpoint"
