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

import statistics
import threading
import time
from typing import Annotated

import httpx
import typer

from infra.local.webex import free_port
from infra.metrics import port_of
from infra.settings import Settings, get_settings
from tests.bench.drains import SideBySide, medians, pair_ratios, print_result, variant
from tests.bench.run import bench_processes

DECISIONS = "flink_taskmanager_job_task_operator_checkout_guard_outcome_decisions"
WARMUP = 10_000
"""Transactions each job decides before the first measured drain: running, model loaded, code compiled."""
ORDER = ("off", "on", "on", "off")
"""One block of drains; more drains repeat it."""


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


def metrics_overhead(base: Settings, records: int = 30_000, drains: int = 8) -> dict:
    """``drains`` backlogs of ``records`` (off, on, on, off, ...); the ratios of the medians of each side."""
    with SideBySide(
        base,
        "benchm",
        {side: variant("metrics", enabled=side == "on", base_port=free_port(base.bind_host)) for side in ("off", "on")},
        seed=23,
        warmup=WARMUP,
    ) as bench:
        on = bench.sides["on"]
        scraper = Scraper(f"http://{on.bind_host}:{port_of(on, 'scoring-job')}/metrics", on.metrics.scrape_interval_s)
        scraper.start()
        try:
            runs = bench.drains(ORDER, drains, records, label="metrics ")
            time.sleep(1.5)  # the job reports its counters after each batch: let the last one land
            served = decisions_served(scraper.scrape())
        finally:
            scraper.stop()
    pairs = pair_ratios(runs, "on", "off")
    sides = {side: medians(runs, side) for side in ("off", "on")}
    return {
        "records": records,
        "drains": runs,
        "median_per_s": {side: m["per_s"] for side, m in sides.items()},
        "median_cpu_ms_per_decision": {side: m["cpu_ms_per_decision"] for side, m in sides.items()},
        "pairs": pairs,
        "throughput_ratio": statistics.median(p["throughput"] for p in pairs),
        "capacity_ratio": statistics.median(p["capacity"] for p in pairs),
        "scrapes": scraper.scrapes,
        "served_all_decisions": served >= WARMUP + records * sum(r["side"] == "on" for r in runs),
    }


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
    print_result(metrics_overhead(get_settings(), records=records, drains=max(2, drains)), report_rows)


if __name__ == "__main__":
    with bench_processes():
        typer.run(main)
