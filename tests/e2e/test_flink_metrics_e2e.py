"""The scoring job serves its metrics through Flink's Prometheus reporter, on its own port and host only.

Checked on the real stack: a few transactions (and one bad record) through the job, then its ``/metrics``
shows our decision, record and dead-letter counters, Flink's Kafka source metrics beside them, and the
port listens on ``CG_BIND_HOST`` only (Flink's own reporter would listen on every interface).
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from dataclasses import replace

import httpx
import psutil
import pytest
from confluent_kafka import Producer

from infra.launcher import start_scoring_job, wait_for
from infra.metrics import port_of
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.flink.job import control_file
from schemas.topics import TRANSACTIONS
from tests.builders import sale
from tests.e2e.camera_helpers import delete_topics

pytestmark = pytest.mark.e2e

OURS = "flink_taskmanager_job_task_operator_checkout_guard_"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
            out.append((match["name"], labels, float(match["value"])))
    return out


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


@pytest.mark.parametrize("layout", ["single", "partitioned"])
def test_the_job_serves_its_decision_counters_and_flinks_kafka_metrics_on_its_port_only(
    stack: Settings, tmp_path, layout: str
) -> None:
    """In both layouts (the partitioned one counts records at route, decisions and face waits at decide).
    No face stage runs: each transaction waits its 1 s face deadline, which the face-wait timing shows."""
    base = stack.isolated(f"e2em{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", face_deadline_ms=1000)
    settings = base.model_copy(
        update={
            "metrics": base.metrics.model_copy(update={"enabled": True, "base_port": _free_port(base.bind_host)}),
            "job": base.job.model_copy(update={"layout": layout}),
        }
    )
    port = port_of(settings, "scoring-job")
    url = f"http://{settings.bind_host}:{port}/metrics"
    ensure_topics(settings)
    job = start_scoring_job(settings, name=f"{settings.consumer_group}-job")
    try:
        wait_for(control_file(settings).exists, timeout=150, what="the job to start")
        producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
        topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
        now = int(time.time() * 1000)
        for i in range(5):
            tx = replace(sale(f"m{uuid.uuid4().hex[:8]}-{i}"), event_time=now)
            producer.produce(topic, key=b"store-001/lane-01", value=tx.encode())
        producer.produce(topic, key=b"lane-x", value=b"not avro")
        assert producer.flush(15) == 0

        def scraped() -> list | None:
            try:
                samples = _samples(httpx.get(url, timeout=5).text)
            except httpx.HTTPError:
                return None
            done = _total(samples, OURS + "outcome_decisions") >= 5 and _total(samples, OURS + "reason_dead_letters")
            return samples if done else None

        samples = wait_for(scraped, timeout=150, interval=1.0, what=f"5 decisions and a dead letter on {url}")
        root = psutil.Process(job.proc.pid)
        listening = [
            conn.laddr.ip
            for proc in [root, *root.children(recursive=True)]
            for conn in proc.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
        ]
    finally:
        job.stop()
        delete_topics(settings)
    assert _total(samples, OURS + "outcome_decisions") == 5
    assert {lab["outcome"] for n, lab, _ in samples if n == OURS + "outcome_decisions"} == {
        "APPROVE",
        "REVIEW",
        "BLOCK",
    }
    assert _total(samples, OURS + "kind_records_in", kind="transaction") == 6
    assert _total(samples, OURS + "reason_dead_letters", reason="not_avro") == 1
    assert _total(samples, OURS + "model_call_us_p99") > 0
    assert _total(samples, OURS + "face_wait_ms_p99") >= 500  # the 1 s deadline, less the time before the join
    kafka = [n for n, _, v in samples if "KafkaSourceReader" in n and "records_consumed" in n and v > 0]
    assert kafka, "Flink's Kafka source metrics are served beside ours"
    assert listening and {ip.removeprefix("::ffff:") for ip in listening} == {settings.bind_host}, listening
