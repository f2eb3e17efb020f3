"""``make bench`` stage: the scoring job's throughput with its metrics on against off, measured in one run.

Two fresh jobs are started together on their own topics (``benchm<run>{off,on}.``), one with metrics off and
one on, and warmed up. Then they drain backlogs of the same transactions one job at a time, in the order
off, on, on, off (repeated for more drains): each job's start-up is paid once, the drift of this shared
2-core machine falls on both sides alike (ABBA), and while one drains the other idles beside it, as the
other did. Per drain: decisions/s from its first decision to its last (as the end-to-end stage measures)
and CPU per decision of the draining job's whole process tree (its JVM, the embedded Python, every
thread). Figures: the median over each two drains in a row (one off, one on) of on / off, for the
throughput (goal >= 0.97) and for the capacity (decisions per CPU-second). Even so, on this machine shared
with other work single drains of one job move by +-15 %: a run's figure is good to a few per cent only.

Why not two jobs draining side by side: they fight over the two cores, which doubled each one's CPU per
decision and moved their throughputs by up to 35 % apart with identical jobs (metrics off in both).

The job with metrics on is scraped every ``CG_METRICS__SCRAPE_INTERVAL_S`` throughout (Flink's Prometheus
reporter with our counters), as the stack's Prometheus would, so the scrapes' cost is in its figures; its
port is a free one, so nothing else scrapes it.

Alone: ``python -m tests.bench.metrics_overhead --records 30000 --drains 8`` (about 2 minutes here).
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Annotated

import httpx
import psutil
import typer
from confluent_kafka import KafkaException, Producer

from infra.clients import kafka as kafka_clients
from infra.launcher import Child, start_scoring_job
from infra.local.pos_generator import PosGenerator
from infra.local.webex import free_port
from infra.metrics import port_of
from infra.processes import stop_child
from infra.settings import Settings, get_settings
from infra.stack import ensure_topics, up
from schemas.topics import ALL_TOPICS, SCORED_TRANSACTIONS, TRANSACTIONS
from tests.bench.run import _consumer, _producer, bench_processes, console

DECISIONS = "flink_taskmanager_job_task_operator_checkout_guard_outcome_decisions"
WARMUP = 10_000
"""Transactions each job decides before the first measured drain: running, model loaded, code compiled."""
ORDER = ("off", "on", "on", "off")
"""One block of drains; more drains repeat it."""

Records = list[tuple[bytes, bytes, bytes]]
"""(Kafka key, value, transaction id: the key of its decision)."""


class Scraper(threading.Thread):
    """GET ``url`` every ``interval_s`` until stopped, as Prometheus would; keeps the last good answer."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval_s = url, interval_s
        self.scrapes = 0
        self.last = ""
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.scrape()

    def scrape(self) -> str:
        try:
            self.last = httpx.get(self.url, timeout=10).text
            self.scrapes += 1
        except httpx.HTTPError:
            pass
        return self.last

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:  # started
            self.join(15)


def decisions_served(text: str) -> float:
    """The sum of the job's decision counters in a ``/metrics`` answer."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(DECISIONS + "{"))


class Decisions(threading.Thread):
    """Reads one job's decisions: when each transaction was first seen decided (``perf_counter``)."""

    def __init__(self, settings: Settings, halt: threading.Event) -> None:
        super().__init__(daemon=True)
        self.settings, self.halt = settings, halt
        self.seen: dict[bytes, float] = {}

    def run(self) -> None:
        topic = SCORED_TRANSACTIONS.full_name(self.settings.kafka.topic_prefix)
        consumer = _consumer(self.settings, topic, f"bench-metrics-{uuid.uuid4().hex[:6]}")
        try:
            while not self.halt.is_set():
                for msg in consumer.consume(10_000, timeout=0.2):
                    key = msg.key()
                    if msg.error() is None and key is not None:
                        self.seen.setdefault(key, time.perf_counter())
        finally:
            consumer.close()

    def times(self, keys: set[bytes]) -> list[float]:
        return [t for k, t in self.seen.copy().items() if k in keys]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and everything under it (the job: Python client, JVM, workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _delete_topics(settings: Settings) -> None:
    """This job's topics, waited for: an admin client dropped at once can lose its pending deletions."""
    admin = kafka_clients.admin(settings)
    topics = [t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]
    for pending in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(KafkaException):
            pending.result(60)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _produce(producer: Producer, topics: Iterable[str], records: Records) -> set[bytes]:
    """Each record to every topic; the transaction ids."""
    topics = list(topics)
    for key, value, _ in records:
        for topic in topics:
            kafka_clients.produce(producer, topic, key, value)
        producer.poll(0)
    producer.flush(60)
    return {tx_id for _, _, tx_id in records}


def _transactions(gen: PosGenerator, n: int) -> Records:
    return [
        (f"{t.store_id}/{t.lane_id}".encode(), t.encode(), t.transaction_id.encode())
        for t in (next(gen) for _ in range(n))
    ]


def _sides(base: Settings, name: str) -> dict[str, Settings]:
    """The two jobs' settings: own topics, group and checkpoints; metrics off, or on at a free port."""
    sides = {}
    for side, enabled in (("off", False), ("on", True)):
        s = base.isolated(
            f"{name}{side}", base.stack_dir / "bench" / f"{name}{side}" / "checkpoints", face_deadline_ms=0
        )
        metrics = s.metrics.model_copy(update={"enabled": enabled, "base_port": free_port(s.bind_host)})
        sides[side] = s.model_copy(update={"metrics": metrics})
        ensure_topics(sides[side])
    return sides


def _drain(job: Child, reader: Decisions, producer: Producer, topic: str, records: Records) -> dict:
    """One job drains ``records``: decisions/s from its first decision to its last, CPU per decision."""
    cpu_before = cpu_seconds(job.proc.pid)
    keys = _produce(producer, [topic], records)
    _wait(lambda: len(reader.times(keys)) == len(keys), 900, f"{len(keys)} decisions")
    cpu = cpu_seconds(job.proc.pid) - cpu_before
    times = reader.times(keys)
    return {"per_s": len(keys) / (max(times) - min(times)), "cpu_ms_per_decision": 1000 * cpu / len(keys)}


def metrics_overhead(base: Settings, records: int = 30_000, drains: int = 8) -> dict:
    """``drains`` backlogs of ``records`` (off, on, on, off, ...); the ratios of the medians of each side."""
    up(base)
    gen = PosGenerator(seed=23, stores=8, customers=50_000, fraud_share=0.03, tx_per_second=200)
    name = f"benchm{time.strftime('%H%M%S')}{uuid.uuid4().hex[:4]}"
    sides = _sides(base, name)
    on = sides["on"]
    scraper = Scraper(f"http://{on.bind_host}:{port_of(on, 'scoring-job')}/metrics", on.metrics.scrape_interval_s)
    halt = threading.Event()
    readers = {side: Decisions(s, halt) for side, s in sides.items()}
    topics = {side: TRANSACTIONS.full_name(s.kafka.topic_prefix) for side, s in sides.items()}
    producer = _producer(base)
    jobs: dict[str, Child] = {}
    runs: list[dict] = []
    try:
        for side, s in sides.items():
            jobs[side] = start_scoring_job(s, name=f"bench-metrics-{name}{side}")
            readers[side].start()
        scraper.start()
        warm = _produce(producer, topics.values(), _transactions(gen, WARMUP))
        _wait(lambda: all(len(r.times(warm)) == len(warm) for r in readers.values()), 300, "both jobs warm")
        for i in range(drains):
            side = ORDER[i % len(ORDER)]
            backlog = _transactions(gen, records)
            run = {"metrics": side, **_drain(jobs[side], readers[side], producer, topics[side], backlog)}
            console.print(
                f"  drain {i + 1}/{drains}: metrics {side:>3}, {run['per_s']:,.0f} tx/s, "
                f"{run['cpu_ms_per_decision']:.3f} ms CPU per decision"
            )
            runs.append(run)
        time.sleep(1.5)  # the job reports its counters after each batch: let the last one land
        served = decisions_served(scraper.scrape())
    finally:
        scraper.stop()
        halt.set()
        for job in jobs.values():
            stop_child(job)
        for side, s in sides.items():
            _delete_topics(s)  # the jobs write no index: nothing in OpenSearch
            shutil.rmtree(base.stack_dir / "bench" / f"{name}{side}", ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["metrics"] == side)

    pairs = pair_ratios(runs)
    return {
        "records": records,
        "drains": runs,
        "median_per_s": {side: median(side, "per_s") for side in ("off", "on")},
        "median_cpu_ms_per_decision": {side: median(side, "cpu_ms_per_decision") for side in ("off", "on")},
        "pairs": pairs,
        "throughput_ratio": statistics.median(p["throughput"] for p in pairs),
        "capacity_ratio": statistics.median(p["capacity"] for p in pairs),
        "scrapes": scraper.scrapes,
        "served_all_decisions": served >= WARMUP + records * sum(r["metrics"] == "on" for r in runs),
    }


def pair_ratios(runs: list[dict]) -> list[dict[str, float]]:
    """On against off for each two drains in a row (1-2, 3-4, ...: one of each in the off-on-on-off order):
    neighbours share the machine's conditions best, so the median of these ratios drifts least."""
    out = []
    for first, second in zip(runs[::2], runs[1::2], strict=False):
        by = {first["metrics"]: first, second["metrics"]: second}
        if set(by) == {"off", "on"}:
            out.append(
                {
                    "throughput": by["on"]["per_s"] / by["off"]["per_s"],
                    "capacity": by["off"]["cpu_ms_per_decision"] / by["on"]["cpu_ms_per_decision"],
                }
            )
    return out


def report_rows(results: dict) -> list[tuple[str, str, str]]:
    n = len(results["drains"])
    per_s, cpu = results["median_per_s"], results["median_cpu_ms_per_decision"]
    return [
        (
            f"scored, metrics on / off (median of {n // 2} neighbouring drain pairs)",
            f"{results['throughput_ratio']:.3f}",
            ">= 0.97",
        ),
        ("  scored tx/s, metrics off / on (medians)", f"{per_s['off']:,.0f} / {per_s['on']:,.0f}", ""),
        ("  capacity (decisions per CPU-s), metrics on / off", f"{results['capacity_ratio']:.3f}", ">= 0.97"),
        ("  CPU per decision, metrics off / on (ms, medians)", f"{cpu['off']:.3f} / {cpu['on']:.3f}", ""),
    ]


def main(
    records: Annotated[int, typer.Option(help="Backlog of each drain.")] = 30_000,
    drains: Annotated[int, typer.Option(help="Drains, in the order off, on, on, off, ... (at least 2).")] = 8,
) -> None:
    """Only the metrics stage of ``make bench``: prints JSON and the report rows."""
    import json

    result = metrics_overhead(get_settings(), records=records, drains=max(2, drains))
    print(json.dumps(result, indent=2))
    for row in report_rows(result):
        print(" | ".join(row))


if __name__ == "__main__":
    with bench_processes():
        typer.run(main)
