"""Replaying a topic range on the real stack changes nothing downstream.

Transactions are scored and indexed, then the same range is replayed twice into the transactions
topic (once chosen by offsets, once by a start time) while the job and the sink run: OpenSearch must
still hold exactly one document per transaction with the very same decision, and the job must have
scored nothing twice. And a new job started from a time (``CG_JOB__STARTING_OFFSETS=<epoch ms>``)
scores what arrived after it and nothing before, and one warming up (``CG_JOB__DECIDE_FROM``) decides
only from its time, with the earlier traffic in its state (the partitioned layout also from one backlog of
both). The replay itself copies key, value, headers and
timestamp, keeps partitions (or goes by key), merges partitions by timestamp and keeps to its rate.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opensearchpy.exceptions import NotFoundError

from infra.clients.opensearch import make_client
from infra.clients.topic_replay import Bound, caught_up, high_watermarks, plan, replay
from infra.launcher import start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.scoring.features import customer_key
from producers.pos import produce
from schemas.indices import default_group_id, index_name, indexed_customer_key
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from sinks.opensearch.sink import run_sink

pytestmark = pytest.mark.e2e


def indexed(settings: Settings) -> dict[str, dict]:
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")
    client.indices.refresh(index=index)
    page = client.search(index=index, body={"query": {"match_all": {}}, "size": 10_000, "version": True})
    return {hit["_id"]: {**hit["_source"], "_version": hit["_version"]} for hit in page["hits"]["hits"]}


@pytest.fixture
def pipeline(stack: Settings, tmp_path):
    """An isolated prefix with its OpenSearch sink running; the test starts the job (into ``jobs``)."""
    settings = stack.isolated(
        f"rp{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=0
    )
    ensure_topics(settings)
    stop = threading.Event()
    sink = threading.Thread(target=run_sink, args=(settings, stop), daemon=True)
    sink.start()
    jobs: list = []
    yield settings, jobs
    for job in jobs:
        job.stop()
    stop.set()
    sink.join(30)
    make_client(settings.opensearch).indices.delete(
        index=f"{settings.opensearch.index_prefix}-*", ignore_unavailable=True
    )


def count_indexed(settings: Settings) -> int:
    """Documents indexed so far; 0 before the first one creates the index."""
    try:
        return len(indexed(settings))
    except NotFoundError:
        return 0


def settled(settings: Settings) -> None:
    """Wait until the job has committed all its input and the sink has indexed all the job wrote."""
    prefix = settings.kafka.topic_prefix
    wait_for(
        lambda: caught_up(settings.kafka, settings.consumer_group, TRANSACTIONS.full_name(prefix)),
        timeout=120,
        interval=1.0,
        what="the job to commit its input",
    )
    time.sleep(3 * settings.job.checkpoint_interval_ms / 1000)
    wait_for(
        lambda: caught_up(settings.kafka, default_group_id(prefix), SCORED_TRANSACTIONS.full_name(prefix)),
        timeout=120,
        interval=1.0,
        what="the sink to index what the job wrote",
    )


def indexed_keys(settings, transactions) -> set[str | None]:
    """The customer keys of ``transactions`` as the index holds them (an e-mail key only as its keyed hash)."""
    secret = settings.indices.customer_key_secret
    plain = secret.get_secret_value() if secret else None
    return {indexed_customer_key(customer_key(asdict(tx)), plain) for tx in transactions} - {None}


def test_replaying_a_range_twice_changes_nothing_in_opensearch(pipeline):
    settings, jobs = pipeline
    jobs.append(start_scoring_job(settings, name=f"{settings.consumer_group}-job"))
    n = 1500
    prefix = settings.kafka.topic_prefix
    tx_topic, scored_topic = TRANSACTIONS.full_name(prefix), SCORED_TRANSACTIONS.full_name(prefix)
    gen = PosGenerator(seed=21, stores=4, customers=1500, fraud_share=0.08, tx_per_second=50)
    txs = [next(gen) for _ in range(n)]
    before = int(time.time() * 1000) - 1
    stats = produce(settings, txs, progress=False)
    assert stats.ok and stats.acked == n
    original_end = high_watermarks(settings.kafka, tx_topic)

    wait_for(lambda: count_indexed(settings) >= n, timeout=240, interval=1.0, what=f"{n} documents")
    first = indexed(settings)
    assert set(first) == {tx.transaction_id for tx in txs}

    # Once chosen by offsets (all partitions from 0), once by time up to the original end offsets.
    by_offsets = plan(settings.kafka, tx_topic, Bound(offsets=0), Bound(offsets=original_end))
    by_time = plan(settings.kafka, tx_topic, Bound(time_ms=before), Bound(offsets=original_end))
    assert sum(r.size for r in by_offsets) == n and sum(r.size for r in by_time) == n
    for ranges in (by_offsets, by_time):
        replayed = replay(settings.kafka, tx_topic, settings.kafka, tx_topic, ranges, rate=3000, progress=False)
        assert replayed.ok and replayed.acked == n, replayed.errors
    assert sum(high_watermarks(settings.kafka, tx_topic).values()) == 3 * n

    # The job has read (and checkpointed) all three copies, and the sink everything the job wrote.
    wait_for(
        lambda: caught_up(settings.kafka, settings.consumer_group, tx_topic),
        timeout=180,
        interval=1.0,
        what="the job to read the replays",
    )
    time.sleep(3 * settings.job.checkpoint_interval_ms / 1000)  # anything still batched is written by now
    wait_for(
        lambda: caught_up(settings.kafka, default_group_id(prefix), scored_topic),
        timeout=120,
        interval=1.0,
        what="the sink to index what the job wrote",
    )

    assert sum(high_watermarks(settings.kafka, scored_topic).values()) == n, "the job scored no transaction twice"
    after = indexed(settings)
    assert set(after) == set(first), "still exactly one document per transaction"
    assert after == first, "same decisions, never even re-written (same _version)"
    assert {doc["outcome"] for doc in after.values()} >= {"APPROVE", "BLOCK"}


def test_a_new_job_started_from_a_time_scores_only_what_came_after_it(pipeline):
    settings, jobs = pipeline
    gen = PosGenerator(seed=22, stores=3, customers=500, fraud_share=0.05, tx_per_second=50)
    earlier, later = [next(gen) for _ in range(300)], [next(gen) for _ in range(300)]
    assert produce(settings, earlier, progress=False).ok
    time.sleep(0.05)
    start_ms = int(time.time() * 1000)
    time.sleep(0.05)
    assert produce(settings, later, progress=False).ok

    # What the README documents: CG_JOB__STARTING_OFFSETS=<epoch ms> for a job without a checkpoint.
    from_time = settings.model_copy(update={"job": settings.job.model_copy(update={"starting_offsets": str(start_ms)})})
    jobs.append(start_scoring_job(from_time, name=f"{settings.consumer_group}-from-time"))
    wait_for(lambda: count_indexed(settings) >= len(later), timeout=240, interval=1.0, what="the later documents")
    settled(settings)
    assert set(indexed(settings)) == {tx.transaction_id for tx in later}


def test_a_job_warming_up_decides_from_its_time_with_the_earlier_traffic_in_its_state(pipeline):
    """``CG_JOB__DECIDE_FROM``: started from the earliest offsets, the job builds its state from the earlier
    transactions and decides only the later ones -- whose returning customers are not new to it."""
    settings, jobs = pipeline
    prefix = settings.kafka.topic_prefix
    gen = PosGenerator(seed=23, stores=3, customers=200, fraud_share=0.05, tx_per_second=50)
    earlier, later = [next(gen) for _ in range(300)], [next(gen) for _ in range(300)]
    decide_from = min(tx.event_time for tx in later)
    assert max(tx.event_time for tx in earlier) < decide_from
    assert produce(settings, earlier, progress=False).ok

    warm = settings.model_copy(update={"job": settings.job.model_copy(update={"decide_from": decide_from})})
    jobs.append(start_scoring_job(warm, name=f"{settings.consumer_group}-warm-up"))
    # History first, then the live traffic (the single layout takes the topic's partitions as they come, so
    # a later transaction read ahead of an earlier one of another partition would meet a profile not built yet)
    wait_for(
        lambda: caught_up(settings.kafka, settings.consumer_group, TRANSACTIONS.full_name(prefix)),
        timeout=240,
        interval=1.0,
        what="the job to take the earlier traffic",
    )
    assert produce(settings, later, progress=False).ok
    wait_for(lambda: count_indexed(settings) >= len(later), timeout=240, interval=1.0, what="the later documents")
    settled(settings)
    docs = indexed(settings)
    assert set(docs) == {tx.transaction_id for tx in later}
    known = indexed_keys(settings, [tx for tx in earlier if tx.kind == "SALE"])  # a profile counts sales
    returning = [d for d in docs.values() if d.get("customer_key") in known]
    assert len(returning) > 100
    assert not any("first_seen" in d["indicators"] for d in returning), "the earlier traffic is in the state"


def test_the_partitioned_layout_warms_up_in_event_time_order_from_one_backlog(pipeline):
    """The partitioned layout orders its input by the watermark across partitions, so history and live traffic
    may sit in one backlog, interleaved however the partitions are read: only the later transactions are
    indexed, and none of their returning customers meets a profile without the earlier traffic."""
    settings, jobs = pipeline
    gen = PosGenerator(seed=24, stores=3, customers=200, fraud_share=0.05, tx_per_second=50)
    earlier, later = [next(gen) for _ in range(300)], [next(gen) for _ in range(300)]
    decide_from = min(tx.event_time for tx in later)
    assert max(tx.event_time for tx in earlier) < decide_from
    assert produce(settings, earlier + later, progress=False).ok  # one backlog before the job starts

    job = settings.job.model_copy(update={"decide_from": decide_from, "layout": "partitioned"})
    warm = settings.model_copy(update={"job": job})
    jobs.append(start_scoring_job(warm, name=f"{settings.consumer_group}-warm-up-partitioned"))
    wait_for(lambda: count_indexed(settings) >= len(later), timeout=240, interval=1.0, what="the later documents")
    settled(settings)
    docs = indexed(settings)
    assert set(docs) == {tx.transaction_id for tx in later}
    known = indexed_keys(settings, [tx for tx in earlier if tx.kind == "SALE"])
    returning = [d for d in docs.values() if d.get("customer_key") in known]
    assert len(returning) > 100
    assert not any("first_seen" in d["indicators"] for d in returning), "the earlier traffic is in the state"


@pytest.fixture
def raw_topics(stack: Settings):
    """Plain topics under a fresh prefix: a 3-partition source and targets of 3, 2 and 1 partitions."""
    prefix = f"rpm{uuid.uuid4().hex[:8]}."
    admin = AdminClient(stack.kafka.client_config())
    layout = {"src": 3, "same": 3, "two": 2, "one": 1, "restamped": 1}
    names = {k: f"{prefix}{k}" for k in layout}
    for fut in admin.create_topics(
        [NewTopic(names[k], num_partitions=n, replication_factor=1) for k, n in layout.items()]
    ).values():
        fut.result()
    yield names
    for fut in admin.delete_topics(list(names.values())).values():
        fut.result()


def _read(settings: Settings, topic: str) -> dict[int, list[tuple]]:
    """Every record of ``topic`` per partition: (key, value, headers, timestamp)."""
    ends = high_watermarks(settings.kafka, topic)
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"rd-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    out: dict[int, list[tuple]] = {p: [] for p in ends}
    try:

        def more() -> bool:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out[msg.partition()].append((msg.key(), msg.value(), msg.headers(), msg.timestamp()[1]))
            return all(len(out[p]) >= end for p, end in ends.items())

        wait_for(more, timeout=60, what=f"all of {topic}")
    finally:
        consumer.close()
    return out


def test_replay_keeps_keys_values_headers_timestamps_and_order_at_the_set_rate(stack: Settings, raw_topics):
    settings, n, base_ts = stack, 600, int(time.time() * 1000) - 60_000
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    for i in range(n):  # round robin over partitions, timestamps rising across all: merged order = i
        producer.produce(
            raw_topics["src"],
            partition=i % 3,
            key=f"k{i % 7}".encode(),
            value=f"v{i}".encode(),
            headers=[("seq", str(i).encode()), ("origin", b"test")],
            timestamp=base_ts + 10 * i,
        )
    assert producer.flush(30) == 0
    source = _read(settings, raw_topics["src"])
    everything = plan(settings.kafka, raw_topics["src"], Bound(), Bound())

    # Same partition count: the same partition, byte for byte, timestamps included.
    assert (
        replay(settings.kafka, raw_topics["src"], settings.kafka, raw_topics["same"], everything, progress=False).acked
        == n
    )
    assert _read(settings, raw_topics["same"]) == source

    # One partition, rate-limited: merged by timestamp, i.e. the order the records were first written.
    started = time.monotonic()
    stats = replay(
        settings.kafka, raw_topics["src"], settings.kafka, raw_topics["one"], everything, rate=400, progress=False
    )
    elapsed = time.monotonic() - started
    assert stats.ok and stats.acked == n
    assert elapsed >= (n - 40) / 400, f"{n} records at 400/s (a burst of 40) took only {elapsed:.2f}s"
    merged = _read(settings, raw_topics["one"])[0]
    assert [value for _, value, _, _ in merged] == [f"v{i}".encode() for i in range(n)]
    assert [ts for *_, ts in merged] == [base_ts + 10 * i for i in range(n)]

    # Another partition count: by key, so a key's records share a partition and keep their order.
    replay(settings.kafka, raw_topics["src"], settings.kafka, raw_topics["two"], everything, progress=False)
    by_key: dict[bytes, set[int]] = {}
    for p, records in _read(settings, raw_topics["two"]).items():
        for key, *_ in records:
            by_key.setdefault(key, set()).add(p)
        for key in {k for k, *_ in records}:
            seqs = [int(v[1:]) for k, v, _, _ in records if k == key]
            assert seqs == sorted(seqs), f"key {key!r} reordered"
    assert all(len(parts) == 1 for parts in by_key.values()) and len(by_key) == 7

    # Part of one partition by offsets, restamped with the replay time.
    before = int(time.time() * 1000)
    part = plan(settings.kafka, raw_topics["src"], Bound(offsets={0: 10}), Bound(offsets={0: 20}), partitions=[0])
    assert [(r.partition, r.start, r.end) for r in part] == [(0, 10, 20)]
    replay(
        settings.kafka, raw_topics["src"], settings.kafka, raw_topics["restamped"], part, restamp=True, progress=False
    )
    restamped = _read(settings, raw_topics["restamped"])[0]
    assert [value for _, value, _, _ in restamped] == [value for _, value, _, _ in source[0][10:20]]
    assert all(ts >= before for *_, ts in restamped)
