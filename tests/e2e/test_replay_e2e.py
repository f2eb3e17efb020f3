"""Replaying a topic range on the real stack changes nothing downstream.

Transactions are scored and indexed, then the same range is replayed twice into the transactions
topic (once chosen by offsets, once by a start time) while the job and the sink run: OpenSearch must
still hold exactly one document per transaction with the very same decision, and the job must have
scored nothing twice. And a new job started from a time (``CG_JOB__STARTING_OFFSETS=<epoch ms>``)
scores what arrived after it and nothing before.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.launcher import start_scoring_job, wait_for
from producers.generator import PosGenerator
from producers.pos import produce
from producers.replay import Bound, caught_up, high_watermarks, plan, replay
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from sinks.opensearch_sink import default_group_id, index_name, make_client, run_sink

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
    settings = stack.isolated(f"rp{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", checkpoint_interval_ms=1000,
                              face_deadline_ms=0)
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
    make_client(settings.opensearch).indices.delete(index=f"{settings.opensearch.index_prefix}-*",
                                                    ignore_unavailable=True)


def test_replaying_a_range_twice_changes_nothing_in_opensearch(pipeline):
    settings, jobs = pipeline
    jobs.append(start_scoring_job(settings, name=f"{settings.job.consumer_group}-job"))
    n = 1500
    prefix = settings.kafka.topic_prefix
    tx_topic, scored_topic = TRANSACTIONS.full_name(prefix), SCORED_TRANSACTIONS.full_name(prefix)
    gen = PosGenerator(seed=21, stores=4, customers=1500, fraud_share=0.08, tx_per_second=50)
    txs = [next(gen) for _ in range(n)]
    before = int(time.time() * 1000) - 1
    stats = produce(settings, txs, progress=False)
    assert stats.ok and stats.acked == n
    original_end = high_watermarks(settings.kafka, tx_topic)

    wait_for(lambda: len(indexed(settings)) >= n, timeout=240, interval=1.0, what=f"{n} documents")
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
    wait_for(lambda: caught_up(settings.kafka, settings.job.consumer_group, tx_topic), timeout=180, interval=1.0,
             what="the job to read the replays")
    time.sleep(3 * settings.job.checkpoint_interval_ms / 1000)  # anything still batched is written by now
    wait_for(lambda: caught_up(settings.kafka, default_group_id(prefix), scored_topic), timeout=120, interval=1.0,
             what="the sink to index what the job wrote")

    assert sum(high_watermarks(settings.kafka, scored_topic).values()) == n, "the job scored no transaction twice"
    after = indexed(settings)
    assert set(after) == set(first), "still exactly one document per transaction"
    assert after == first, "same decisions, never even re-written (same _version)"
    assert {doc["outcome"] for doc in after.values()} >= {"APPROVE", "BLOCK"}


def test_a_new_job_started_from_a_time_scores_only_what_came_after_it(pipeline):
    settings, jobs = pipeline
    prefix = settings.kafka.topic_prefix
    gen = PosGenerator(seed=22, stores=3, customers=500, fraud_share=0.05, tx_per_second=50)
    earlier, later = [next(gen) for _ in range(300)], [next(gen) for _ in range(300)]
    assert produce(settings, earlier, progress=False).ok
    time.sleep(0.05)
    start_ms = int(time.time() * 1000)
    time.sleep(0.05)
    assert produce(settings, later, progress=False).ok

    # What the README documents: CG_JOB__STARTING_OFFSETS=<epoch ms> for a job without a checkpoint.
    from_time = settings.model_copy(update={"job": settings.job.model_copy(update={"starting_offsets": str(start_ms)})})
    jobs.append(start_scoring_job(from_time, name=f"{settings.job.consumer_group}-from-time"))
    wait_for(lambda: len(indexed(settings)) >= len(later), timeout=240, interval=1.0, what="the later documents")
    wait_for(lambda: caught_up(settings.kafka, settings.job.consumer_group, TRANSACTIONS.full_name(prefix)),
             timeout=120, interval=1.0, what="the job to commit its input")
    time.sleep(3 * settings.job.checkpoint_interval_ms / 1000)
    wait_for(lambda: caught_up(settings.kafka, default_group_id(prefix), SCORED_TRANSACTIONS.full_name(prefix)),
             timeout=120, interval=1.0, what="the sink to index what the job wrote")
    assert set(indexed(settings)) == {tx.transaction_id for tx in later}
