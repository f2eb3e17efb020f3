"""The scoring job on a standalone Flink cluster from the wheel (``python -m infra.stack flink up``): a JobManager
and two TaskManagers of one slot each, the job submitted unchanged with ``flink run -d -p 2 -pym jobs.flink.job``.

Transactions end as exactly one OpenSearch document each, also when a TaskManager is SIGKILLed mid-stream and
started again (the job restores its last checkpoint); ``down`` leaves no process of the cluster behind. A savepoint
taken on the cluster (p = 2) restores on the local mini-cluster (p = 1), and the mini-cluster's back on the cluster,
keyed state and all.

Isolated like the other end-to-end tests: its own topic and index prefix, consumer group and checkpoints on the
session's Kafka and OpenSearch, and a cluster of its own (own dir, free ports)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest
from confluent_kafka import Consumer, Producer

from infra import flink_cluster as fc
from infra.clients.opensearch import make_client
from infra.launcher import start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.settings import FlinkClusterSettings, Settings
from infra.stack import StackPaths, ensure_topics, find_java_home
from jobs.flink.job import control_file, running_job
from jobs.flink.upgrade import stop_with_savepoint
from schemas.codec import codec
from schemas.indices import index_name
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from tests.builders import sale
from tests.e2e.camera_helpers import delete_topics
from tests.e2e.sink_helpers import sink_running
from tests.ports import free_port_block

pytestmark = pytest.mark.e2e

RUNNING_S = 300.0
"""From ``flink run`` to every task running: ~60 s on an idle 2-core machine (the client builds the job in
Python, the TaskManagers start their embedded interpreters); minutes when other tests load the machine."""
SCORED_S = 240.0


@pytest.fixture
def cluster(stack: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Path, Path]]:
    """Isolated settings with a cluster of their own (not started yet); the cluster is brought down and the
    topics deleted afterwards, whatever happened."""
    name = f"e2efc{uuid.uuid4().hex[:6]}"
    ports, reporters = free_port_block(7), free_port_block(10)
    flink = FlinkClusterSettings(
        rest_port=ports,
        rpc_port=ports + 1,
        blob_port=ports + 2,
        taskmanager_base_port=ports + 3,  # 2 TaskManagers x (rpc, data)
        metrics_ports=f"{reporters}-{reporters + 9}",
        cluster_dir=tmp_path / "cluster",
    )
    settings = stack.isolated(name, tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=0)
    settings = settings.model_copy(update={"flink": flink})
    ensure_topics(settings)
    try:
        yield settings, find_java_home(settings), StackPaths.of(settings).flink_plugins
    finally:
        fc.down(settings)
        delete_topics(settings)


def _produce(settings: Settings, txs, per_second: float | None = None) -> set[str]:
    """Produce ``txs`` (at ``per_second`` when given) and return their ids once all are acknowledged."""
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "linger.ms": 5})
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    errors: list[str] = []
    t0 = time.monotonic()
    for i, tx in enumerate(txs):
        producer.produce(
            topic,
            key=f"{tx.store_id}/{tx.lane_id}",
            value=tx.encode(),
            on_delivery=lambda err, _msg: errors.append(str(err)) if err else None,
        )
        producer.poll(0)
        if per_second:
            time.sleep(max(0.0, t0 + (i + 1) / per_second - time.monotonic()))
    assert producer.flush(30) == 0
    assert not errors, errors
    return {tx.transaction_id for tx in txs}


def _document_ids(settings: Settings, expected: set[str], timeout_s: float) -> set[str]:
    """The ids of the transactions index once it holds at least ``len(expected)`` documents; also asserts
    that each document has its own id (no id twice: the count equals the distinct ids)."""
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")

    def arrived() -> bool:
        client.indices.refresh(index=index)
        return client.count(index=index)["count"] >= len(expected)

    wait_for(arrived, timeout=timeout_s, interval=1.0, what=f"{len(expected)} documents in {index}")
    page = client.search(index=index, body={"query": {"match_all": {}}, "size": 10_000, "_source": False})
    ids = {hit["_id"] for hit in page["hits"]["hits"]}
    assert client.count(index=index)["count"] == len(ids)
    return ids


def _rest(settings: Settings, path: str) -> dict:
    return httpx.get(fc.rest_url(settings) + path, timeout=10).json()


def _running_job(settings: Settings) -> str | None:
    """The one job of the cluster once every one of its tasks runs."""
    for job in fc.jobs(settings):
        if job["state"] == "RUNNING" and job["tasks"]["running"] == job["tasks"]["total"] > 0:
            return str(job["jid"])
    return None


def _wait_running(settings: Settings, what: str) -> str:
    """The running job's id; on time-out an error that says what the cluster saw (its jobs, their last failure)."""
    try:
        return str(wait_for(lambda: _running_job(settings), timeout=RUNNING_S, interval=2.0, what=what))
    except TimeoutError as exc:
        seen = fc.jobs(settings)
        history = [_rest(settings, f"/jobs/{job['jid']}/exceptions")["exceptionHistory"] for job in seen]
        failures = [h["entries"][:1] for h in history]
        raise AssertionError(f"{exc}; jobs: {seen}; last failures: {failures}"[:8000]) from exc


def _checkpoints(settings: Settings, job_id: str) -> dict:
    return _rest(settings, f"/jobs/{job_id}/checkpoints")["counts"]


def _cluster_processes(settings: Settings) -> list[str]:
    """Any process whose command line names this cluster's config dir (JVMs, start scripts)."""
    conf = str(fc.ClusterPaths.of(settings).conf)
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if conf in " ".join(proc.cmdline()):
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
    return left


def _check_scrape_targets(settings: Settings) -> None:
    """Prometheus's file of the members' reporters names each running member once, and each serves Flink's
    metrics there (the TaskManagers' with the job's own operator metrics)."""
    groups = json.loads(fc.ClusterPaths.of(settings).scrape_targets.read_text())
    by_member = {g["labels"]["process"]: g["targets"] for g in groups}
    assert sorted(by_member) == ["flink-jobmanager", "flink-taskmanager-0", "flink-taskmanager-1"], groups
    for member, [target] in by_member.items():
        text = httpx.get(f"http://{target}/metrics", timeout=10).text
        assert ("flink_jobmanager_" if member == "flink-jobmanager" else "flink_taskmanager_") in text, member


def test_the_job_on_a_two_taskmanager_cluster_keeps_one_document_per_transaction_when_a_taskmanager_is_killed(
    cluster: tuple[Settings, Path, Path],
) -> None:
    settings, java, plugins = cluster
    st = fc.up(settings, java, plugins)
    assert st["healthy"], st
    view = fc.overview(settings)
    assert view is not None and view["taskmanagers"] == 2 and view["slots-total"] == 2, view
    assert sorted(st["taskmanagers"]) == ["taskmanager-0", "taskmanager-1"]

    gen = PosGenerator(seed=21, stores=4, customers=2000, fraud_share=0.05, tx_per_second=50)
    txs = [next(gen) for _ in range(2500)]
    with sink_running(settings, timeout_s=60):
        t0 = time.monotonic()
        out = fc.submit(settings, java, parallelism=2)
        assert "Job has been submitted" in out.stdout, out.stdout[-2000:]
        job_id = _wait_running(settings, "the job running")
        vertices = _rest(settings, f"/jobs/{job_id}")["vertices"]
        assert max(v["parallelism"] for v in vertices) == 2, [(v["name"], v["parallelism"]) for v in vertices]
        print(f"submitted and running after {time.monotonic() - t0:.0f} s")
        _check_scrape_targets(settings)

        first = _produce(settings, txs[:500])
        assert _document_ids(settings, first, SCORED_S) == first, "one document per transaction"
        done = _checkpoints(settings, job_id)["completed"]
        wait_for(lambda: _checkpoints(settings, job_id)["completed"] > done, timeout=60, what="a checkpoint after")

        rest = txs[500:]
        producing = threading.Thread(target=_produce, args=(settings, rest, 100.0))  # ~20 s of traffic
        producing.start()
        time.sleep(5)  # mid-stream
        victim = fc.member_process(fc.ClusterPaths.of(settings), fc.members(settings)[1])
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        fc.up(settings, java, plugins, only="taskmanager-0")
        producing.join()
        everything = {tx.transaction_id for tx in txs}
        assert _document_ids(settings, everything, SCORED_S) == everything, "one document per transaction"
        counts = _checkpoints(settings, job_id)
        assert counts["restored"] >= 1, f"the job restored a checkpoint after the TaskManager's loss: {counts}"
        print(f"checkpoints after the kill: {counts}; all {len(everything)} documents {time.monotonic() - t0:.0f} s")

    assert sorted(fc.down(settings)) == ["jobmanager", "taskmanager-0", "taskmanager-1"]
    assert _cluster_processes(settings) == [], "no process of the cluster is left"
    assert json.loads(fc.ClusterPaths.of(settings).scrape_targets.read_text()) == [], "no target left for Prometheus"
    assert not fc.status(settings)["healthy"]


def test_a_savepoint_taken_on_the_cluster_restores_on_the_mini_cluster_and_back(
    cluster: tuple[Settings, Path, Path],
) -> None:
    settings, java, plugins = cluster
    prefix = settings.kafka.topic_prefix
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"t{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([SCORED_TRANSACTIONS.full_name(prefix)])
    scored: dict[str, dict] = {}

    def buy(*numbers: int) -> None:
        """Sales with one card: its velocity counts every earlier one, whichever engine held the state."""
        for n in numbers:
            tx = replace(sale(f"sp{n}", card="card-savepoint", amount=20.0 + n), event_time=int(time.time() * 1000))
            producer.produce(TRANSACTIONS.full_name(prefix), key=b"store-001/lane-01", value=tx.encode())
        producer.flush(10)

    def velocity(n: int) -> float | None:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            scored[msg.key().decode()] = codec("ScoredTransaction").decode(msg.value())
        return scored[f"sp{n}"]["indicators"]["velocity"] if f"sp{n}" in scored else None

    try:
        fc.up(settings, java, plugins)
        fc.submit(settings, java, parallelism=2)
        _wait_running(settings, "the job on the cluster")
        buy(1, 2, 3)
        assert wait_for(lambda: velocity(3), timeout=SCORED_S, what="the cluster to score three sales") == 3.0
        (on_cluster,) = fc.stop_with_savepoint(settings, java)

        local = start_scoring_job(settings, name=f"{settings.consumer_group}-local")
        try:
            buy(4, 5)
            assert wait_for(lambda: velocity(5), timeout=SCORED_S, what="the mini-cluster to score") == 5.0
            assert f"restoring savepoints/{on_cluster.rsplit('/', 1)[-1]}" in local.log_path.read_text()
            wait_for(lambda: running_job(control_file(settings)), timeout=30, what="the job's control file")
            on_local = stop_with_savepoint(control_file(settings), settings.checkpoint_dir)
            assert local.proc.wait(60) == 0, "the mini-cluster's job ends cleanly after its savepoint"
        finally:
            local.stop()

        fc.submit(settings, java, parallelism=2)
        job_id = _wait_running(settings, "the job on the cluster again")
        buy(6)
        assert wait_for(lambda: velocity(6), timeout=SCORED_S, what="the cluster to score again") == 6.0
        latest = _rest(settings, f"/jobs/{job_id}/checkpoints")["latest"]["restored"]
        assert latest["is_savepoint"] and latest["external_path"].endswith(on_local.name), latest
    finally:
        consumer.close()
    assert sorted(fc.down(settings)) == ["jobmanager", "taskmanager-0", "taskmanager-1"]
    assert _cluster_processes(settings) == []


def _read_all(settings: Settings, spec, quiet_s: float = 5.0) -> dict[bytes, bytes]:
    """Every record of one of ``settings``' topics (by key), read until nothing new came for ``quiet_s``."""
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"t{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([spec.full_name(settings.kafka.topic_prefix)])
    out: dict[bytes, bytes] = {}
    last = time.monotonic()
    try:
        while time.monotonic() - last < quiet_s:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                out[msg.key()] = msg.value()
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def _seeded_stream(n: int) -> list[bytes]:
    """Transactions with returns across stores, a few of them twice, some pairs out of order, and junk."""
    import random

    gen = PosGenerator(
        seed=16, stores=4, customers=150, fraud_share=0.1, tx_per_second=2, return_share=0.25,
        min_return_age_ms=60_000, diurnal=False,
    )  # fmt: skip
    rnd = random.Random(16)
    txs = [next(gen) for _ in range(n)]
    for i in range(0, n - 1, 5):  # neighbours of one store less than 400 ms apart swapped: within the bound
        a, b = txs[i], txs[i + 1]
        if a.store_id == b.store_id and b.event_time - a.event_time < 400:
            txs[i], txs[i + 1] = b, a
    out: list[bytes] = []
    for v in (tx.encode() for tx in txs):
        out.append(v)
        if rnd.random() < 0.03:
            out.append(v)  # delivered twice
        if rnd.random() < 0.004:
            out.append(b"\x00not a transaction")
    return out


def _produce_raw(settings: Settings, values: list[bytes]) -> None:
    """Keyed by store, as the POS producer does (a swapped pair of one store stays in one partition)."""
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "linger.ms": 5})
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    for value in values:
        store = codec("PosTransaction").decode(value)["store_id"] if not value.startswith(b"\x00") else "junk"
        producer.produce(topic, key=store.encode(), value=value)
    assert producer.flush(30) == 0


def _decisions(settings: Settings, expected: set[str]) -> list[dict]:
    from jobs.flink.backtest_stream import candidate_documents

    assert _document_ids(settings, expected, SCORED_S) == expected
    return list(candidate_documents(make_client(settings.opensearch), settings.opensearch.index_prefix))


def _progress(settings: Settings, job_id: str) -> list:
    """Per vertex: records in and out per subtask, and its input watermark (why a stream may be held)."""
    out = []
    for vertex in _rest(settings, f"/jobs/{job_id}")["vertices"]:
        detail = _rest(settings, f"/jobs/{job_id}/vertices/{vertex['id']}")
        marks = _rest(settings, f"/jobs/{job_id}/vertices/{vertex['id']}/watermarks")
        io = [(s["metrics"]["read-records"], s["metrics"]["write-records"]) for s in detail["subtasks"]]
        out.append((vertex["name"][:50], io, [m["value"] for m in marks]))
    return out


def _event_time_notes(settings: Settings) -> list[str]:
    """The cluster's lines from the job's event-time operators (idle at the start, lull releases, late
    messages): why a run at p = 2 took messages out of event-time order, when it did."""
    lines: list[str] = []
    for log_file in sorted(fc.ClusterPaths.of(settings).logs.glob("*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if "checkoutguard.flink.StepEventTime" in line or "checkoutguard.flink.EventTimeBatcher" in line:
                lines.append(f"{log_file.name}: {line[:300]}")
    return lines


def _outputs(settings: Settings) -> tuple[set[str], set[tuple[str, int, int]]]:
    """Alert ids, and dead letters as (kind, source partition, source offset): the same on both runs."""
    from schemas.topics import ALERTS, DEAD_LETTERS

    alerts = {k.decode() for k in _read_all(settings, ALERTS)}
    dead = set()
    for value in _read_all(settings, DEAD_LETTERS).values():
        record = codec("DeadLetter").decode(value)
        dead.add((record["error_kind"], record["partition"], record["offset"]))
    return alerts, dead


def test_the_partitioned_layout_at_p2_on_the_cluster_decides_exactly_as_at_p1_on_the_mini_cluster(
    cluster: tuple[Settings, Path, Path], stack: Settings, tmp_path: Path
) -> None:
    """The issue's equivalence: the same seeded stream (returns across stores, duplicates, out-of-order pairs,
    junk) decided by the partitioned layout at p = 2 on the cluster and at p = 1 on the mini-cluster: zero
    differences in outcome, risk, reasons, indicators, model inputs (the stream backtest's comparison), alert ids
    and dead letters; and the scoring steps busy on both TaskManagers."""
    from jobs.flink.backtest_stream import compare

    on_cluster, java, plugins = cluster
    # A quiet spell inside a busy 2-core machine must not pass for a lull (which releases everything held).
    partitioned = {"layout": "partitioned", "event_idle_ms": 10_000}
    on_cluster = on_cluster.model_copy(update={"job": on_cluster.job.model_copy(update=partitioned)})
    local = stack.isolated(
        f"e2epl{uuid.uuid4().hex[:6]}", tmp_path / "local", checkpoint_interval_ms=1000, face_deadline_ms=0
    )
    local = local.model_copy(update={"job": local.job.model_copy(update=partitioned)})
    ensure_topics(local)
    stream = _seeded_stream(1200)
    expected = {codec("PosTransaction").decode(v)["transaction_id"] for v in stream if not v.startswith(b"\x00")}
    try:
        for settings in (on_cluster, local):
            _produce_raw(settings, stream)  # a backlog: read at full speed, partitions interleaved as they come

        fc.up(on_cluster, java, plugins)
        with sink_running(on_cluster, timeout_s=60):
            fc.submit(on_cluster, java, parallelism=2)
            job_id = _wait_running(on_cluster, "the partitioned job on the cluster")
            try:
                cluster_docs = _decisions(on_cluster, expected)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {_progress(on_cluster, job_id)}") from exc
            cluster_out = _outputs(on_cluster)

            def busy() -> list[tuple[str, list[int]]]:
                """Records read by each subtask of each scoring step (REST metrics lag by ~10 s)."""
                out = []
                for vertex in _rest(on_cluster, f"/jobs/{job_id}")["vertices"]:
                    if vertex["name"].startswith(("receipt", "store", "identity", "gather", "decide")):
                        detail = _rest(on_cluster, f"/jobs/{job_id}/vertices/{vertex['id']}")
                        out.append((vertex["name"][:24], [s["metrics"]["read-records"] for s in detail["subtasks"]]))
                return out

            def both_busy() -> list[tuple[str, list[int]]] | None:
                steps = busy()
                return steps if len(steps) == 5 and all(len(r) == 2 and min(r) > 0 for _, r in steps) else None

            try:
                read = wait_for(
                    both_busy, timeout=60, interval=2.0, what="every scoring step busy on both TaskManagers"
                )
            except TimeoutError as exc:
                raise AssertionError(f"{exc}: {busy()}") from exc
            print(f"batches read per subtask by the scoring steps on the cluster: {read}")
        fc.down(on_cluster)

        with sink_running(local, timeout_s=60):
            job = start_scoring_job(local, name=f"{local.consumer_group}-job")
            try:
                local_docs = _decisions(local, expected)
                local_out = _outputs(local)
            finally:
                job.stop()
    finally:
        delete_topics(local)

    report = compare(local_docs, cluster_docs, "p1-mini-cluster", "p2-cluster")
    notes = _event_time_notes(on_cluster)
    print("the cluster's event-time notes:", *notes, sep="\n")
    assert report.compared == len(expected) and report.only_baseline == report.only_candidate == 0
    assert (report.changed, report.risk_changed, report.inputs_differ) == (0, 0, 0), (
        "\n".join(notes[-20:]) + "\n" + report.to_json()[:4000]
    )
    by_id = {d["transaction_id"]: d for d in cluster_docs}
    assert [d["reasons"] for d in local_docs] == [by_id[d["transaction_id"]]["reasons"] for d in local_docs]
    assert report.outcomes["baseline"].get("BLOCK", 0) > 0, "the stream blocks something"
    assert local_out == cluster_out and len(local_out[1]) > 0
