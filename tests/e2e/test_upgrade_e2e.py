"""Upgrading the job: stop with a savepoint, start a new version from it, keyed state carries over."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import pytest
from confluent_kafka import Consumer, Producer

from infra.launcher import start_scoring_job, wait_for
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.flink.job import control_file, running_job
from jobs.flink.upgrade import stop_with_savepoint
from schemas.codec import codec
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from tests.builders import sale

pytestmark = pytest.mark.e2e


def test_velocity_counts_continue_across_a_savepoint_upgrade(stack: Settings, tmp_path):
    settings = stack.isolated(f"e2eu{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", face_deadline_ms=0)
    ensure_topics(settings)
    prefix = settings.kafka.topic_prefix
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"t{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([SCORED_TRANSACTIONS.full_name(prefix)])
    scored: dict[str, dict] = {}

    def buy(n: int) -> None:
        tx = replace(sale(f"u{n}", card="card-upgrade", amount=20.0 + n), event_time=int(time.time() * 1000))
        producer.produce(TRANSACTIONS.full_name(prefix), key=b"store-001/lane-01", value=tx.encode())
        producer.flush(10)

    def scored_up_to(n: int):
        def check() -> bool:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                scored[msg.key().decode()] = codec("ScoredTransaction").decode(msg.value())
            return all(f"u{i}" in scored for i in range(1, n + 1))

        return check

    v1 = start_scoring_job(settings, name=f"{settings.consumer_group}-v1")
    try:
        for n in range(1, 4):
            buy(n)
        wait_for(scored_up_to(3), timeout=180, what="v1 to score three sales")
        assert scored["u3"]["indicators"]["velocity"] == 3.0
        wait_for(lambda: running_job(control_file(settings)), timeout=30, what="the job's control file")
        savepoint = stop_with_savepoint(control_file(settings), settings.checkpoint_dir)
        assert (savepoint / "_metadata").exists()
        assert v1.proc.wait(60) == 0, "the job ends cleanly after its savepoint"
    finally:
        v1.stop()

    # "The new version": here a new rule-set version; the keyed state must come along unchanged.
    upgraded = settings.model_copy(update={"rules": settings.rules.model_copy(update={"version": "upgrade-v2"})})
    v2 = start_scoring_job(upgraded, name=f"{settings.consumer_group}-v2")
    try:
        for n in range(4, 7):
            buy(n)
        wait_for(scored_up_to(6), timeout=180, what="v2 to score three more sales")
    finally:
        v2.stop()
    assert scored["u6"]["rules_version"] == "upgrade-v2"
    assert scored["u6"]["indicators"]["velocity"] == 6.0, "velocity counted the sales made before the upgrade"
    assert "first_seen" not in scored["u4"]["indicators"], "the customer was known from before the upgrade"
