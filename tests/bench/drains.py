"""Scoring jobs side by side, draining backlogs one at a time: the harness of the job-level benches.

Each side is a fresh job (its own topics, group and checkpoints, on its own mini-cluster) started together
with the others and warmed up. Then the sides drain backlogs of transactions one job at a time, in an order
such as A, B, B, A: each job's start-up is paid once, the drift of this shared machine falls on all sides
alike, and while one drains the others idle beside it. Per drain: decisions/s from its first decision to its
last and CPU per decision of the draining job's whole process tree (its JVM, the embedded Python, every
thread). Two jobs draining at once would fight over the cores instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import psutil
from confluent_kafka import KafkaException, Producer

from infra.clients import kafka as kafka_clients
from infra.launcher import Child, start_scoring_job
from infra.local.pos_generator import PosGenerator
from infra.processes import stop_child
from infra.settings import Settings
from infra.stack import ensure_topics, up
from schemas.topics import ALL_TOPICS, SCORED_TRANSACTIONS, TRANSACTIONS
from tests.bench.run import _consumer, _producer, console

Records = list[tuple[bytes, bytes, bytes]]
"""(Kafka key, value, transaction id: the key of its decision)."""
Variant = Callable[[Settings], Settings]
"""What makes a side's settings from its isolated base settings."""


class Decisions(threading.Thread):
    """Reads one job's decisions: when each transaction was first seen decided (``perf_counter``)."""

    def __init__(self, settings: Settings, halt: threading.Event) -> None:
        super().__init__(daemon=True)
        self.settings, self.halt = settings, halt
        self.seen: dict[bytes, float] = {}

    def run(self) -> None:
        topic = SCORED_TRANSACTIONS.full_name(self.settings.kafka.topic_prefix)
        consumer = _consumer(self.settings, topic, f"bench-drains-{uuid.uuid4().hex[:6]}")
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
    """A side's topics, waited for: an admin client dropped at once can lose its pending deletions."""
    admin = kafka_clients.admin(settings)
    topics = [t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]
    for pending in admin.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(KafkaException):
            pending.result(60)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
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


class SideBySide:
    """Jobs of several variants, started together, warmed up, then draining one at a time (a context manager:
    the jobs, their topics and their checkpoints are gone afterwards)."""

    def __init__(self, base: Settings, name: str, variants: dict[str, Variant], *, seed: int, warmup: int) -> None:
        self.base, self.name, self.warmup = base, f"{name}{time.strftime('%H%M%S')}{uuid.uuid4().hex[:4]}", warmup
        self.variants = variants
        self.gen = PosGenerator(seed=seed, stores=8, customers=50_000, fraud_share=0.03, tx_per_second=200)
        self.sides: dict[str, Settings] = {}
        self.jobs: dict[str, Child] = {}
        self._halt = threading.Event()
        self._readers: dict[str, Decisions] = {}
        self._producer: Producer | None = None

    def _dir(self, side: str):
        return self.base.stack_dir / "bench" / f"{self.name}{side}"

    def __enter__(self) -> SideBySide:
        up(self.base)
        try:
            for side, variant in self.variants.items():
                isolated = self.base.isolated(f"{self.name}{side}", self._dir(side) / "checkpoints", face_deadline_ms=0)
                self.sides[side] = variant(isolated)
                ensure_topics(self.sides[side])
            self._producer = _producer(self.base)
            for side, s in self.sides.items():
                self.jobs[side] = start_scoring_job(s, name=f"bench-{self.name}{side}")
                self._readers[side] = Decisions(s, self._halt)
                self._readers[side].start()
            warm = _produce(self._producer, [self.topic(s) for s in self.sides], self.transactions(self.warmup))
            _wait(
                lambda: all(len(r.times(warm)) == len(warm) for r in self._readers.values()),
                600,
                "every job warm",
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self._halt.set()
        for job in self.jobs.values():
            stop_child(job)
        for side, s in self.sides.items():
            _delete_topics(s)  # the jobs write no index: nothing in OpenSearch
            shutil.rmtree(self._dir(side), ignore_errors=True)

    def topic(self, side: str) -> str:
        return TRANSACTIONS.full_name(self.sides[side].kafka.topic_prefix)

    def transactions(self, n: int) -> Records:
        return [
            (f"{t.store_id}/{t.lane_id}".encode(), t.encode(), t.transaction_id.encode())
            for t in (next(self.gen) for _ in range(n))
        ]

    def drain(self, side: str, records: int) -> dict:
        """``side``'s job drains a fresh backlog: decisions/s from its first decision to its last, CPU per decision."""
        assert self._producer is not None, "use SideBySide as a context manager"
        backlog = self.transactions(records)
        job, reader = self.jobs[side], self._readers[side]
        cpu_before = cpu_seconds(job.proc.pid)
        keys = _produce(self._producer, [self.topic(side)], backlog)
        _wait(lambda: len(reader.times(keys)) == len(keys), 900, f"{len(keys)} decisions of {side}")
        cpu = cpu_seconds(job.proc.pid) - cpu_before
        times = reader.times(keys)
        return {
            "side": side,
            "per_s": len(keys) / (max(times) - min(times)),
            "cpu_ms_per_decision": 1000 * cpu / len(keys),
        }

    def drains(self, order: Sequence[str], drains: int, records: int, label: str = "") -> list[dict]:
        """``drains`` backlogs of ``records``, the sides taking turns in ``order`` (repeated); each drain printed."""
        runs = []
        for i in range(drains):
            side = order[i % len(order)]
            run = self.drain(side, records)
            console.print(
                f"  drain {i + 1}/{drains}: {label}{side:>6}, {run['per_s']:,.0f} tx/s, "
                f"{run['cpu_ms_per_decision']:.3f} ms CPU per decision"
            )
            runs.append(run)
        return runs


def variant(section: str, **update: object) -> Variant:
    """A side whose settings differ in one section (``job``, ``metrics``, ...) by ``update``."""

    def make(s: Settings) -> Settings:
        return s.model_copy(update={section: getattr(s, section).model_copy(update=update)})

    return make


def print_result(result: dict, rows: Callable[[dict], list[tuple[str, str, str]]]) -> None:
    """A stage run alone: its JSON, then its report rows."""
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print(" | ".join(row))


def pair_ratios(runs: Sequence[dict], numerator: str, denominator: str) -> list[dict[str, float]]:
    """``numerator`` against ``denominator`` for each two drains in a row (1-2, 3-4, ...: one of each in an
    A-B-B-A order): neighbours share the machine's conditions best, so the median of these drifts least.
    ``throughput``: decisions/s ratio; ``capacity``: decisions per CPU-second ratio; ``cpu``: CPU per decision."""
    out = []
    for first, second in zip(runs[::2], runs[1::2], strict=False):
        by = {first["side"]: first, second["side"]: second}
        if set(by) == {numerator, denominator}:
            num, den = by[numerator], by[denominator]
            out.append(
                {
                    "throughput": num["per_s"] / den["per_s"],
                    "capacity": den["cpu_ms_per_decision"] / num["cpu_ms_per_decision"],
                    "cpu": num["cpu_ms_per_decision"] / den["cpu_ms_per_decision"],
                }
            )
    return out


def medians(runs: Sequence[dict], side: str) -> dict[str, float]:
    mine = [r for r in runs if r["side"] == side]
    return {key: statistics.median(r[key] for r in mine) for key in ("per_s", "cpu_ms_per_decision")}
