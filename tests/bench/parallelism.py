"""``make bench`` stage: what scoring at parallelism 2 costs per transaction against parallelism 1.

Three fresh jobs side by side (:mod:`tests.bench.drains`), each on its own mini-cluster, topics and
checkpoints: the partitioned layout (:mod:`jobs.scoring.partitioned`) at p = 1 and at p = 2, and the
single-state layout (p = 1 only) for reference. They drain backlogs of the same kind of transactions one
job at a time, in the order p1, p2, p2, p1, single, p1, p1, single (repeated for more drains). Per drain:
decisions/s and CPU per decision of the job's whole process tree. Figures: the median over neighbouring
drain pairs of p2 against p1 (goal: CPU per decision at p = 2 <= 1.3x p = 1, i.e. the work does not grow
with the parallelism, so it would spread over more cores), and of the partitioned p1 against the single
layout.

On one mini-cluster the p = 2 job's two slots share one JVM and, in the default thread mode, one embedded
Python interpreter, and this machine has two cores: its decisions/s here say what the per-transaction cost
allows, not what two TaskManagers on their own cores give. Decisions wait for the watermark
(``CG_JOB__EVENT_ORDER_MS``) and the newest ones for the lull (``CG_JOB__EVENT_IDLE_MS``) in the partitioned
layout; that wait is inside its decisions/s (from a drain's first decision to its last), and the job's
background CPU while it waits is inside its CPU per decision (a small bias against the partitioned layout).

Alone: ``python -m tests.bench.parallelism --records 20000 --drains 8`` (about 10 minutes here).
"""

from __future__ import annotations

import statistics
from typing import Annotated

import typer

from infra.settings import Settings, get_settings
from tests.bench.drains import SideBySide, medians, pair_ratios, print_result, variant
from tests.bench.run import bench_processes

WARMUP = 5_000
ORDER = ("p1", "p2", "p2", "p1", "single", "p1", "p1", "single")
"""One block of drains: two p1/p2 pairs, then two single/p1 pairs; more drains repeat it."""


def parallel_scoring(base: Settings, records: int = 20_000, drains: int = 8) -> dict:
    """``drains`` backlogs of ``records`` in :data:`ORDER`; medians per side and of neighbouring pairs."""
    variants = {
        "single": variant("job", layout="single", parallelism=1),
        "p1": variant("job", layout="partitioned", parallelism=1),
        "p2": variant("job", layout="partitioned", parallelism=2),
    }
    with SideBySide(base, "benchp", variants, seed=29, warmup=WARMUP) as bench:
        runs = bench.drains(ORDER, drains, records)
    sides = {side: medians(runs, side) for side in variants if any(r["side"] == side for r in runs)}
    p2_p1, p1_single = pair_ratios(runs, "p2", "p1"), pair_ratios(runs, "p1", "single")

    def median(pairs: list[dict[str, float]], key: str) -> float | None:
        return statistics.median(p[key] for p in pairs) if pairs else None

    return {
        "records": records,
        "drains": runs,
        "per_side": sides,
        "cpu_per_100k_s": {side: m["cpu_ms_per_decision"] * 100 for side, m in sides.items()},
        "p2_over_p1": {"pairs": len(p2_p1), "cpu": median(p2_p1, "cpu"), "throughput": median(p2_p1, "throughput")},
        "p1_over_single": {
            "pairs": len(p1_single),
            "cpu": median(p1_single, "cpu"),
            "throughput": median(p1_single, "throughput"),
        },
    }


def report_rows(results: dict) -> list[tuple[str, str, str]]:
    cpu, sides = results["cpu_per_100k_s"], results["per_side"]
    p2, p1 = results["p2_over_p1"], results["p1_over_single"]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    rows = [
        (f"CPU per decision, partitioned p=2 / p=1 (median of {p2['pairs']} drain pairs)", fmt(p2["cpu"]), "<= 1.3"),
        ("  scored tx/s, p=2 / p=1 (same pairs; one JVM, 2 cores)", fmt(p2["throughput"]), ""),
        (f"  CPU per decision, partitioned p=1 / single layout ({p1['pairs']} pairs)", fmt(p1["cpu"]), ""),
    ]
    for side in ("single", "p1", "p2"):
        if side in sides:
            rows.append(
                (
                    f"  {side}: CPU-s per 100k / scored tx/s (medians)",
                    f"{cpu[side]:.1f} / {sides[side]['per_s']:,.0f}",
                    "",
                )
            )
    return rows


def main(
    records: Annotated[int, typer.Option(help="Backlog of each drain.")] = 20_000,
    drains: Annotated[int, typer.Option(help="Drains, in the order p1, p2, p2, p1, single, p1, p1, single, ...")] = 8,
) -> None:
    """Only the parallelism stage of ``make bench``: prints JSON and the report rows."""
    print_result(parallel_scoring(get_settings(), records=records, drains=max(2, drains)), report_rows)


if __name__ == "__main__":
    with bench_processes():
        typer.run(main)
