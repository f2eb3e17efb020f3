"""Every listening TCP socket of the running stack and of the scoring job is on the configured host.

The issue this guards against: the job's Python process served PyFlink's Beam worker pool (whose
``StartWorker`` call writes the caller's values into ``os.environ``/``sys.path``) on ``*`` and the
Flink BLOB server listened on 0.0.0.0, while everything was meant to be reachable from this machine only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import psutil
import pytest
from confluent_kafka import Consumer, Producer

from infra.launcher import start_scoring_job, wait_for
from infra.settings import Settings
from infra.stack import SERVICES, StackPaths, ensure_topics, service_process
from jobs.flink.job import control_file
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from tests.builders import sale

pytestmark = pytest.mark.e2e

MAPPED_V4 = "::ffff:"


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listeners(procs: dict[str, list[psutil.Process]]) -> list[tuple[str, int, str, str, int]]:
    """(owner, pid, process name, address, port) of every listening TCP socket of these processes."""
    found = []
    for owner, members in procs.items():
        for proc in members:
            try:
                conns, name = proc.net_connections(kind="tcp"), proc.name()
            except psutil.NoSuchProcess:
                continue
            for conn in conns:
                if conn.status == psutil.CONN_LISTEN:
                    found.append((owner, proc.pid, name, conn.laddr.ip, conn.laddr.port))
    return sorted(found)


def _score_one(settings: Settings) -> None:
    """Run one transaction through the job, so every operator (and any Python worker) is up."""
    prefix = settings.kafka.topic_prefix
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    tx = replace(sale(f"bind-{uuid.uuid4().hex[:8]}"), event_time=int(time.time() * 1000))
    producer.produce(TRANSACTIONS.full_name(prefix), key=b"store-001/lane-01", value=tx.encode())
    assert producer.flush(15) == 0
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"t{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([SCORED_TRANSACTIONS.full_name(prefix)])
    try:

        def scored() -> bool:
            msg = consumer.poll(0.5)
            return msg is not None and not msg.error() and msg.key().decode() == tx.transaction_id

        wait_for(scored, timeout=150, what="the job to score a transaction")
    finally:
        consumer.close()


def test_every_listener_of_the_stack_and_the_job_is_on_the_configured_host(stack: Settings, tmp_path) -> None:
    """The job in its default (``thread``) mode; ``process`` mode refuses to start on a non-wildcard host."""
    settings = stack.isolated(f"e2eb{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", face_deadline_ms=0)
    ensure_topics(settings)
    paths = StackPaths.of(settings)
    procs: dict[str, list[psutil.Process]] = {}
    for svc in SERVICES:
        proc = service_process(svc, paths)
        assert proc is not None, f"{svc} is not running from {paths.root}"
        procs[svc] = _tree(proc)
    job = start_scoring_job(settings, name=f"{settings.consumer_group}-job")
    try:
        wait_for(control_file(settings).exists, timeout=150, what="the job to start")
        _score_one(settings)
        procs["scoring-job"] = _tree(psutil.Process(job.proc.pid))
        listeners = _listeners(procs)
    finally:
        job.stop()
    table = "\n".join(f"  {owner:<12} pid {pid:<7} {name:<16} {ip}:{port}" for owner, pid, name, ip, port in listeners)
    print(f"\nlistening TCP sockets (configured host {settings.bind_host}):\n{table}")
    assert {owner for owner, *_ in listeners} >= {*SERVICES, "scoring-job"}, table
    wrong = [row for row in listeners if row[3].removeprefix(MAPPED_V4) != settings.bind_host]
    assert not wrong, f"listening beyond {settings.bind_host}:\n{table}"
