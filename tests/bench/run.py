"""``make bench``: the pipeline's speed on this machine, as ratios measured in one run.

Stages, each on fresh topics (``bench<run>.`` prefix) of the running local stack:

1. **raw Kafka** — the same pre-encoded transactions produced and consumed with no processing: the
   ceiling every other figure is compared with.
2. **end-to-end throughput** — the scoring job drains that backlog to ``processed_transactions``
   while the OpenSearch sink indexes the decisions: scored tx/s and indexed docs/s.
3. **latency at a fixed rate** — live transactions (event time = now) at ``--rate`` tx/s for
   ``--seconds``: event -> decision (``decided_at - event_time``) and event -> searchable (first
   seen by an OpenSearch search) percentiles.
4. **memory** — peak resident memory of the whole stack (Kafka, OpenSearch, Mosquitto, the job
   with its JVM and Python workers, the sink) sampled throughout.

Then the job's **metrics overhead** (``tests/bench/metrics_overhead.py``: its throughput with its Prometheus
metrics on against off, alternating drains off-on-on-off in one run; ``--metrics-drains 0`` skips it), its
**parallelism** (``tests/bench/parallelism.py``: CPU per decision and decisions/s of the partitioned layout at
p = 1 and p = 2 and of the single layout, alternating drains; ``--parallel-drains 0`` skips it), the OpenSearch sink's
**face read** (``tests/bench/sink.py``: bulk writes of 500 scored transactions without and with ``keep_faces``'s
``mget``, A-B-B-A; ``--sink-rounds 0`` skips it) and, in-process: faces, model scoring, the partitioned scoring
steps (``tests/bench/partitioned.py``), alerts, and the scoring job's **state** at N transactions of history
(``tests/bench/state.py``: entries, pickled size with and without retention, restore time and memory;
``--state-transactions`` / ``CG_BENCH_STATE_TRANSACTIONS``, default 10 M: about 5 minutes and 10 GiB here;
``--state-budget-s`` / ``CG_BENCH_STATE_BUDGET_S`` measures the largest N that fits that many seconds instead, with
the reason printed).

Results are printed and written to ``bench-results/<stage>-<time>.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated

import psutil
import typer
from confluent_kafka import Consumer, Producer, TopicPartition
from opensearchpy import OpenSearch
from rich.console import Console
from rich.table import Table

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.opensearch import make_client
from infra.launcher import Child, spawn, start_scoring_job
from infra.local.pos_generator import PosGenerator
from infra.processes import MARKER, Reaper, stop_children
from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack import ensure_topics, status, up
from schemas.codec import codec
from schemas.indices import index_name
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS
from tests.bench.model import model_scoring
from tests.bench.sink import delete_prefix

console = Console()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class MemorySampler(threading.Thread):
    """Peak summed RSS of the stack's processes and of the children the bench started."""

    def __init__(self, settings: Settings, children: list[Child]) -> None:
        super().__init__(daemon=True)
        self.settings, self.children = settings, children
        self.peak_bytes = 0
        self.peak_by_part: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        # Service pids once (a health check per sample would load the services being measured).
        services = {svc: info["pid"] for svc, info in status(self.settings)["services"].items() if info["pid"]}
        while not self._halt.wait(0.5):
            parts: dict[str, int] = {}
            roots = {**services, **{c.name: c.proc.pid for c in self.children if c.alive}}
            for name, pid in roots.items():
                try:
                    root = psutil.Process(pid)
                    procs = [root, *root.children(recursive=True)]
                    parts[name] = sum(p.memory_info().rss for p in procs if p.is_running())
                except psutil.Error:
                    continue
            total = sum(parts.values())
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_by_part = total, parts

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _producer(settings: Settings) -> Producer:
    return kafka_clients.producer(
        settings,
        kafka_clients.IDEMPOTENT,
        linger_ms=5,
        compression_type="lz4",
        batch_num_messages=10000,
        queue_buffering_max_messages=1_000_000,
    )


def _consumer(settings: Settings, topic: str, group: str) -> Consumer:
    consumer = kafka_clients.consumer(
        settings, group, kafka_clients.READ_COMMITTED, auto_offset_reset="earliest", fetch_wait_max_ms=10
    )
    consumer.subscribe([topic])
    return consumer


def _produce_all(producer: Producer, topic: str, records: Iterable[tuple[bytes, bytes]]) -> None:
    for key, value in records:
        kafka_clients.produce(producer, topic, key, value)
        producer.poll(0)
    producer.flush(60)


def raw_kafka(settings: Settings, records: list[tuple[bytes, bytes]], topic: str) -> dict:
    """Produce ``records`` while a consumer reads them back; the time until the last arrives."""
    consumer = _consumer(settings, topic, f"bench-raw-{uuid.uuid4().hex[:6]}")
    got = 0
    done = threading.Event()

    def consume() -> None:
        nonlocal got
        while got < len(records):
            for msg in consumer.consume(10_000, timeout=0.2):
                if msg.error() is None:
                    got += 1
        done.set()

    # Join the group before the clock starts, so the rebalance is not measured.
    consumer.consume(1, timeout=3)
    reader = threading.Thread(target=consume, daemon=True)
    t0 = time.perf_counter()
    reader.start()
    _produce_all(_producer(settings), topic, records)
    produced_s = time.perf_counter() - t0
    done.wait(300)
    total_s = time.perf_counter() - t0
    consumer.close()
    return {
        "records": len(records),
        "produce_per_s": len(records) / produced_s,
        "produce_consume_per_s": got / total_s,
        "seconds": total_s,
    }


def _count_scored(settings: Settings, expected: int, timeout: float, first_seen: list[float]) -> float:
    """Read the scored topic until ``expected`` distinct decisions; returns the time of the last."""
    topic = SCORED_TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    consumer = _consumer(settings, topic, f"bench-out-{uuid.uuid4().hex[:6]}")
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)}/{expected} decisions after {timeout:.0f}s")
            for msg in consumer.consume(10_000, timeout=0.2):
                if msg.error() is None:
                    if not first_seen:
                        first_seen.append(time.perf_counter())
                    seen.add(msg.key())
        return time.perf_counter()
    finally:
        consumer.close()


def drain_rate(
    count: Callable[[], int],
    expected: int,
    started: float,
    *,
    timeout: float,
    interval: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[float, float]:
    """Poll ``count`` until it reaches ``expected``; (items/s from the first item seen to the last, seconds from
    ``started`` to the first item).

    Why from the first item: the process draining was started at ``started``, and its interpreter, imports,
    Kafka group join and index templates are its start-up, not its throughput (the scored rate leaves the
    job's start-up out the same way). A backlog that showed up whole at the first look has no second point:
    its rate is then counted from ``started``, start-up included (a lower bound)."""
    deadline = clock() + timeout
    first: tuple[float, int] | None = None
    while True:
        n, now = count(), clock()
        if n > 0 and first is None:
            first = (now, n)
        if n >= expected:
            break
        if now > deadline:
            raise TimeoutError(f"only {n}/{expected} after {timeout:.0f}s")
        sleep(interval)
    assert first is not None
    t_first, n_first = first
    if n_first >= expected or now <= t_first:
        return expected / max(now - started, 1e-9), t_first - started
    return (n - n_first) / (now - t_first), t_first - started


def end_to_end(settings: Settings, expected: int, children: list[Child]) -> dict:
    """The job drains the preloaded backlog (decisions/s), then the sink indexes them (documents/s).

    One after the other, so each figure is that component's own on this 2-core machine; the
    latency stage then runs both at once on live traffic. Both rates run from the first output to the
    last: each process's start-up is reported apart (``startup_s``, ``sink_startup_s``)."""
    job = start_scoring_job(settings, name=f"bench-job-{settings.kafka.topic_prefix[:-1]}")
    children.append(job)
    first: list[float] = []
    t_launch = time.perf_counter()
    t_last = _count_scored(settings, expected, timeout=900, first_seen=first)
    scored_per_s = expected / (t_last - first[0])

    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")
    t_sink = time.perf_counter()
    children.append(spawn("sinks.opensearch.sink", settings, name=f"bench-sink-{settings.kafka.topic_prefix[:-1]}"))

    def indexed() -> int:
        if not client.indices.exists(index=index):
            return 0
        client.indices.refresh(index=index)
        return int(client.count(index=index)["count"])

    indexed_per_s, sink_startup_s = drain_rate(indexed, expected, t_sink, timeout=900)
    return {
        "records": expected,
        "startup_s": first[0] - t_launch,
        "scored_per_s": scored_per_s,
        "sink_startup_s": sink_startup_s,
        "indexed_per_s": indexed_per_s,
    }


@dataclass
class _LiveTraffic:
    """What the fixed-rate stage's sender and its two reader threads share."""

    sent: dict[str, int] = field(default_factory=dict)
    """Counted transactions (after the warm-up): id -> event time (ms)."""
    probes: dict[str, int] = field(default_factory=dict)
    """Every 20th counted transaction, until a search finds it: id -> event time (ms)."""
    decision_ms: list[float] = field(default_factory=list)
    searchable_ms: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def fixed_rate_latency(settings: Settings, rate: int, seconds: int, warmup: int = 5) -> dict:
    """Live traffic at ``rate`` tx/s; event->decision and event->searchable percentiles (ms).

    The first ``warmup`` seconds of traffic are sent but not counted: the bench producer's first
    connection and the job's idle-to-busy transition after the previous stage are not the
    pipeline's steady state."""
    gen = PosGenerator(seed=99, stores=8, customers=20_000, tx_per_second=rate, diurnal=False)
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    out_topic = SCORED_TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    consumer = _consumer(settings, out_topic, f"bench-lat-{uuid.uuid4().hex[:6]}")
    _seek_to_end(consumer)
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")
    producer = _producer(settings)
    traffic = _LiveTraffic()
    readers = [
        threading.Thread(target=_read_decisions, args=(consumer, traffic), daemon=True),
        threading.Thread(target=_probe_search, args=(client, index, traffic), daemon=True),
    ]
    for t in readers:
        t.start()
    achieved = _send_at_rate(producer, topic, gen, rate, seconds, warmup, traffic)
    deadline = time.monotonic() + 60
    while (len(traffic.decision_ms) < len(traffic.sent) or traffic.probes) and time.monotonic() < deadline:
        time.sleep(0.2)
    traffic.stop.set()
    for t in readers:
        t.join(10)
    consumer.close()
    return {
        "rate_target": rate,
        "rate_achieved": achieved,
        "seconds": seconds,
        "warmup_seconds": warmup,
        **_latency_report(traffic.decision_ms, traffic.searchable_ms),
    }


def _seek_to_end(consumer: Consumer) -> None:
    """Join the group, then start reading at the end: only this stage's decisions count."""
    consumer.consume(1, timeout=3)
    for tp in consumer.assignment():
        _, high = consumer.get_watermark_offsets(tp, timeout=5)
        consumer.seek(TopicPartition(tp.topic, tp.partition, high))


def _send_at_rate(
    producer: Producer, topic: str, gen: PosGenerator, rate: int, seconds: int, warmup: int, traffic: _LiveTraffic
) -> float:
    """Send ``rate`` tx/s (event time = now) for ``warmup`` + ``seconds``; returns the rate achieved after
    the warm-up."""
    interval = 1.0 / rate
    n_warm, n_total = rate * warmup, rate * (warmup + seconds)
    t0 = time.perf_counter()
    for n in range(n_total):
        target = t0 + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if n == n_warm:
            t_measured = time.perf_counter()
        now_ms = clock.now_ms()
        tx = replace(next(gen), event_time=now_ms)
        producer.produce(topic, key=f"{tx.store_id}/{tx.lane_id}", value=tx.encode())
        if n >= n_warm:
            traffic.sent[tx.transaction_id] = now_ms
            if n % 20 == 0:
                traffic.probes[tx.transaction_id] = now_ms
        producer.poll(0)
    producer.flush(30)
    return (n_total - n_warm) / (time.perf_counter() - t_measured)


def _read_decisions(consumer: Consumer, traffic: _LiveTraffic) -> None:
    """Event -> decision of each counted transaction, until stopped and drained."""
    scored = codec("ScoredTransaction")
    while not traffic.stop.is_set() or len(traffic.decision_ms) < len(traffic.sent):
        msgs = consumer.consume(5000, timeout=0.2)
        for msg in msgs:
            if msg.error() is None:
                rec = scored.decode(msg.value())
                if rec["transaction_id"] in traffic.sent:
                    traffic.decision_ms.append(rec["decided_at"] - rec["event_time"])
        if traffic.stop.is_set() and not msgs:
            break


def _probe_search(client: OpenSearch, index: str, traffic: _LiveTraffic) -> None:
    """Event -> searchable of each probe: searched by id until found, or until stopped."""
    probes = traffic.probes
    while not traffic.stop.is_set() or probes:
        pending = list(probes)[:200]
        if pending:
            res = client.search(
                index=index, body={"query": {"ids": {"values": pending}}, "size": len(pending), "_source": False}
            )
            now = time.time() * 1000
            for hit in res["hits"]["hits"]:
                traffic.searchable_ms.append(now - probes.pop(hit["_id"]))
        elif traffic.stop.is_set():
            break
        time.sleep(0.05)


def _latency_report(decision_ms: list[float], searchable_ms: list[float]) -> dict:
    """Counts and percentiles (ms) of the two latencies."""
    return {
        "decisions": len(decision_ms),
        "decision_p50_ms": percentile(decision_ms, 50),
        "decision_p95_ms": percentile(decision_ms, 95),
        "decision_p99_ms": percentile(decision_ms, 99),
        "decision_max_ms": max(decision_ms, default=float("nan")),
        "searchable_samples": len(searchable_ms),
        "searchable_p50_ms": percentile(searchable_ms, 50),
        "searchable_p95_ms": percentile(searchable_ms, 95),
        "searchable_p99_ms": percentile(searchable_ms, 99),
    }


def _cleanup(settings: Settings) -> None:
    from schemas.topics import ALL_TOPICS

    admin = kafka_clients.admin(settings)
    admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS])
    delete_prefix(make_client(settings.opensearch), settings.opensearch.index_prefix)


def run(records: int, rate: int, seconds: int, keep: bool, settings: Settings | None = None) -> dict:
    base = settings or get_settings()
    up(base)
    run_id = time.strftime("%H%M%S") + uuid.uuid4().hex[:4]
    # The scoring job alone (no face stage in this run): decide without waiting for faces.
    settings = base.isolated(f"bench{run_id}", base.stack_dir / "bench" / run_id / "checkpoints", face_deadline_ms=0)
    ensure_topics(settings)
    gen = PosGenerator(seed=7, stores=8, customers=50_000, fraud_share=0.03, tx_per_second=200)
    txs = [next(gen) for _ in range(records)]
    encoded = [(f"{t.store_id}/{t.lane_id}".encode(), t.encode()) for t in txs]
    del txs
    children: list[Child] = []
    sampler = MemorySampler(base, children)
    sampler.start()
    results: dict = {
        "run": run_id,
        "machine": {"cpus": psutil.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)},
    }
    try:
        console.print(f"[bold]1/3 raw Kafka[/]: {records} records produced and consumed, no processing")
        results["raw_kafka"] = raw_kafka(settings, encoded, TRANSACTIONS.full_name(settings.kafka.topic_prefix))
        console.print(f"[bold]2/3 end to end[/]: the scoring job and the OpenSearch sink drain {records} records")
        results["end_to_end"] = end_to_end(settings, records, children)
        console.print(f"[bold]3/3 latency[/]: {rate} tx/s for {seconds}s of live traffic")
        results["latency"] = fixed_rate_latency(settings, rate, seconds)
    finally:
        sampler.stop()
        stop_children(children)
        if not keep:
            _cleanup(settings)
    results["memory"] = {
        "peak_gib": sampler.peak_bytes / 2**30,
        "by_part_mib": {k: round(v / 2**20) for k, v in sampler.peak_by_part.items()},
    }
    raw, e2e = results["raw_kafka"]["produce_consume_per_s"], results["end_to_end"]["scored_per_s"]
    results["ratio_scored_to_raw_kafka"] = e2e / raw
    return results


SECTION_ROWS: dict[str, tuple[str, str]] = {
    "model_scoring": ("tests.bench.model", "report_rows"),
    "partitioned": ("tests.bench.partitioned", "report_rows"),
    "metrics_overhead": ("tests.bench.metrics_overhead", "report_rows"),
    "parallelism": ("tests.bench.parallelism", "report_rows"),
    "sink": ("tests.bench.sink", "report_rows"),
    "alerts": ("tests.bench.alerts", "report_rows"),
    "state": ("tests.bench.state", "report_rows"),
    "faces": ("jobs.faces.cli", "bench_report_rows"),
}
"""Each optional section's result key and the function that turns it into table rows (imported when present)."""


def report(results: dict) -> None:
    t = Table(title=f"checkout-guard bench {results['run']}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("goal", justify="right")
    raw, e2e, lat, mem = results["raw_kafka"], results["end_to_end"], results["latency"], results["memory"]
    t.add_row("raw Kafka produce+consume (rec/s)", f"{raw['produce_consume_per_s']:,.0f}", "")
    t.add_row("end-to-end scored (tx/s)", f"{e2e['scored_per_s']:,.0f}", ">= 5,000")
    t.add_row("end-to-end indexed in OpenSearch (docs/s)", f"{e2e['indexed_per_s']:,.0f}", "")
    t.add_row("scored / raw Kafka", f"{results['ratio_scored_to_raw_kafka']:.3f}", "")
    t.add_row(
        f"event->decision p50/p95/p99 at {lat['rate_target']} tx/s (ms)",
        f"{lat['decision_p50_ms']:.0f} / {lat['decision_p95_ms']:.0f} / {lat['decision_p99_ms']:.0f}",
        "p99 <= 250",
    )
    t.add_row(
        "event->searchable p50/p95/p99 (ms)",
        f"{lat['searchable_p50_ms']:.0f} / {lat['searchable_p95_ms']:.0f} / {lat['searchable_p99_ms']:.0f}",
        "",
    )
    t.add_row("achieved rate (tx/s)", f"{lat['rate_achieved']:,.0f}", "")
    t.add_row("peak memory, whole stack (GiB)", f"{mem['peak_gib']:.2f}", "<= 6")
    for key, (module, function) in SECTION_ROWS.items():
        if key in results:
            for row in getattr(importlib.import_module(module), function)(results[key]):
                t.add_row(*row)
    console.print(t)
    console.print(f"peak memory by part (MiB): {mem['by_part_mib']}")


def _stack_pids() -> list[int]:
    """The local stack's services: started by the bench when down, but meant to outlive it."""
    try:
        return [info["pid"] for info in status(get_settings())["services"].values() if info["pid"]]
    except Exception:  # a stack that does not answer has nothing to spare
        return []


LEFT_RUNNING_EXIT = 3
"""Exit status of a bench that otherwise succeeded but left processes running (listed, then stopped): a
leak the next run would measure as load, so ``make bench`` fails on it."""


def exit_status(ended: BaseException | None, left: Sequence[str]) -> int | None:
    """The status to end the bench with: :data:`LEFT_RUNNING_EXIT` when processes were left and it otherwise
    succeeded (no exception, or Typer's ``SystemExit(0)``); None keeps how it ended (its own failure says more)."""
    succeeded = ended is None or (isinstance(ended, SystemExit) and ended.code in (0, None))
    return LEFT_RUNNING_EXIT if left and succeeded else None


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # so that every stage's finally stops what it started


@contextlib.contextmanager
def bench_processes() -> Iterator[None]:
    """The whole bench: every process it starts carries :data:`infra.processes.MARKER` (passed down to
    children and theirs); at the end, any of them still running is listed, stopped and reported, and the
    bench exits non-zero (:func:`exit_status`). SIGTERM and SIGHUP end the bench through its ``finally``
    blocks rather than at once."""
    os.environ[MARKER] = f"bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    reaper = Reaper(keep=_stack_pids)
    ended: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        ended = exc
        raise
    finally:
        left = reaper.finish()
        if left:
            console.print(f"[bold red]bench: {len(left)} processes it started were still running; stopped:[/]")
            for line in left:
                console.print(f"  {line}")
        else:
            console.print("bench: no process it started is left running")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        code = exit_status(ended, left)
        if code is not None:
            raise SystemExit(code)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    records: Annotated[int, typer.Option(help="Backlog size for the throughput stages.")] = 100_000,
    rate: Annotated[int, typer.Option(help="Fixed rate for the latency stage (tx/s).")] = 1000,
    seconds: Annotated[int, typer.Option(help="Duration of the latency stage.")] = 30,
    keep: Annotated[bool, typer.Option(help="Keep the bench topics and indices.")] = False,
    model_records: Annotated[int, typer.Option(help="Transactions for the model-scoring stage (0 = skip).")] = 20_000,
    metrics_drains: Annotated[
        int, typer.Option(help="Backlogs drained, metrics off-on-on-off, for the overhead stage (0 = skip).")
    ] = 8,
    metrics_records: Annotated[int, typer.Option(help="Backlog of each drain of the metrics stage.")] = 30_000,
    parallel_drains: Annotated[
        int, typer.Option(help="Backlogs drained by the partitioned job at p=1 / p=2 and the single layout (0 = skip).")
    ] = 8,
    parallel_records: Annotated[int, typer.Option(help="Backlog of each drain of the parallelism stage.")] = 20_000,
    sink_rounds: Annotated[
        int, typer.Option(help="Rounds of 500-document batches written without / with the sink's face read (0 = skip).")
    ] = 8,
    state_transactions: Annotated[
        int,
        typer.Option(
            envvar="CG_BENCH_STATE_TRANSACTIONS",
            help="Transactions of history for the state stage: state size and restore (0 = skip).",
        ),
    ] = 10_000_000,
    state_budget_s: Annotated[
        float,
        typer.Option(
            envvar="CG_BENCH_STATE_BUDGET_S",
            help="The state stage measures the largest N that fits this many seconds here (0 = the N asked for).",
        ),
    ] = 0.0,
) -> None:
    """Measure raw Kafka, end-to-end throughput, latency at a fixed rate and peak memory."""
    results = run(records, rate, seconds, keep)
    if metrics_drains:
        from tests.bench.metrics_overhead import metrics_overhead

        console.print(f"[bold]metrics overhead[/]: {metrics_drains} backlogs, a job with metrics off, one with on")
        results["metrics_overhead"] = metrics_overhead(get_settings(), records=metrics_records, drains=metrics_drains)
    if parallel_drains:
        from tests.bench.parallelism import parallel_scoring

        console.print(
            f"[bold]parallelism[/]: {parallel_drains} backlogs, the partitioned job at p=1 and p=2, the single"
        )
        results["parallelism"] = parallel_scoring(get_settings(), records=parallel_records, drains=parallel_drains)
    if sink_rounds:
        from tests.bench.sink import sink_face_read

        console.print(f"[bold]sink face read[/]: {sink_rounds} rounds of bulk writes without, with, with, without it")
        results["sink"] = sink_face_read(get_settings(), rounds=sink_rounds)
    from jobs.faces.cli import bench_for_make

    console.print("[bold]faces[/]: JPEG -> face -> watchlist match on a 640x480 frame; probe with 100k enrolled")
    results["faces"] = bench_for_make(get_settings())
    if model_records:
        console.print("[bold]model scoring[/]: model + rules + state in-process, batched vs one call per record")
        results["model_scoring"] = model_scoring(get_settings(), records=model_records)
        from tests.bench.partitioned import partitioned_scoring

        console.print("[bold]partitioned scoring[/]: the keyed steps against the single-state core, CPU per 100k")
        results["partitioned"] = partitioned_scoring(get_settings())
    from tests.bench.alerts import bench_for_make as alerts_bench

    console.print("[bold]alerts[/]: delivery with both channels answering in 50 ms; transaction -> e-mail, live")
    results["alerts"] = alerts_bench(get_settings())
    if state_transactions:
        from tests.bench.state import bench_for_make as state_bench

        console.print(
            f"[bold]state[/]: the scoring job's keyed state at {state_transactions:,} transactions of history: "
            "entries, pickled size with and without retention, restore time and memory"
        )
        results["state"] = state_bench(state_transactions, budget_s=state_budget_s)
    report(results)
    out = REPO_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"walking-skeleton-{results['run']}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"results written to {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    with bench_processes():
        app()
