"""``checkout-guard topics tail`` on the real stack prints records decoded, as JSON lines.

Scored transactions (and one message that is not Avro) go to an isolated topic prefix with known
timestamps over all partitions; ``topics tail processed_transactions -n 5`` must print the five newest,
decoded, oldest first; ``--from earliest`` prints from the first one, the bad message as a line with an
error, and ``--key`` only that key's records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.clients import kafka as kafka_clients
from infra.settings import REPO_ROOT, Settings
from infra.stack import ensure_topics
from schemas.records import ScoredTransaction
from schemas.topics import SCORED_TRANSACTIONS

pytestmark = pytest.mark.e2e


def scored(i: int) -> ScoredTransaction:
    return ScoredTransaction(
        transaction_id=f"tx-{i:04d}",
        event_time=1_700_000_000_000 + i,
        store_id=f"S{i % 3}",
        lane_id="L1",
        kind="SALE",
        amount=10.0 + i,
        currency="USD",
        item_count=1,
        customer_key=f"card:{i % 4}",
        outcome=("APPROVE", "REVIEW", "BLOCK")[i % 3],
        risk_score=i,
        reasons=(),
        rules_version="builtin-v1",
        ingest_time=1_700_000_000_010 + i,
        decided_at=1_700_000_000_030 + i,
        proc_time_ms=1,
        model_time_ms=1,
        ttdf_ms=1,
    )


def checkout_guard(settings: Settings, *args: str) -> list[dict]:
    script = Path(sys.executable).with_name("checkout-guard")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "infra.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CG_")} | settings.to_env()
    done = subprocess.run(
        [*argv, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_topics_tail_prints_the_newest_records_decoded(stack: Settings, tmp_path):
    settings = stack.isolated(f"cli{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints")
    ensure_topics(settings)
    topic = SCORED_TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    records = [scored(i) for i in range(12)]
    base = 1_700_000_000_000
    producer = kafka_clients.producer(settings, kafka_clients.RELIABLE)
    kafka_clients.produce(producer, topic, b"garbage", b"not avro at all", partition=0, timestamp=base - 1000)
    for i, record in enumerate(records):  # round robin over the partitions, one second apart
        kafka_clients.produce(
            producer,
            topic,
            record.transaction_id.encode(),
            record.encode(),
            partition=i % SCORED_TRANSACTIONS.partitions,
            timestamp=base + i * 1000,
        )
    assert producer.flush(30) == 0

    lines = checkout_guard(settings, "topics", "tail", "processed_transactions", "-n", "5")
    assert [line["value"]["transaction_id"] for line in lines] == [r.transaction_id for r in records[-5:]]
    assert all(line["schema"] == "ScoredTransaction" and line["topic"] == topic for line in lines)
    assert [line["timestamp"] for line in lines] == [base + i * 1000 for i in range(7, 12)]
    assert lines[-1]["value"]["amount"] == records[-1].amount and lines[-1]["key"] == records[-1].transaction_id

    first = checkout_guard(settings, "topics", "tail", "processed_transactions", "--from", "earliest", "-n", "3")
    assert first[0]["key"] == "garbage" and first[0]["error"]["kind"] == "not_avro" and "value" not in first[0]
    assert [line["value"]["transaction_id"] for line in first[1:]] == ["tx-0000", "tx-0001"]

    keyed = checkout_guard(settings, "topics", "tail", topic, "--key", "tx-0003", "-n", "5")
    assert [line["value"]["transaction_id"] for line in keyed] == ["tx-0003"]
