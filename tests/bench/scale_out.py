"""Bench section: the scoring job's cost per transaction at parallelism 1 and 2 (the scale-out issue).

The job's own pipeline (``build_pipeline``) on an in-process mini-cluster, fed a collection of encoded
POS transactions (no Kafka: the cost measured is the job's), with the default model: the partitioned
layout at p = 1 and p = 2, and the single layout at p = 1 for reference. Each configuration runs twice, a
short and a long stream, and the figures are the long run less the short one: the start of a Flink job
(JVM, Python workers, the model's load) drops out. CPU is the whole process tree's (this process, the
JVM it starts, any Python worker), so work on another core counts; p = 2 costing <= 1.3x p = 1 per
transaction says the job would scale on more cores. ``python -m tests.bench.scale_out`` runs it alone;
``make bench`` includes it.
"""

from __future__ import annotations

import contextlib
import sys
import time

import psutil

from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from jobs.model.train import ensure_default_model
from schemas.topics import SCORED_TRANSACTIONS, TRANSACTIONS


def _cpu_s() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it just ended
            total += sum(child.cpu_times()[:2])
    return total


def _run(settings: Settings, values: list[bytes], parallelism: int) -> tuple[float, float, int]:
    """(CPU-seconds, wall seconds, scored) for one run of the job over ``values``."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    from jobs.flink.job import SOURCE_ROW, build_pipeline

    conf = Configuration()
    conf.set_string("python.executable", sys.executable)
    conf.set_string("python.execution-mode", settings.job.python_execution_mode)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(parallelism)
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    scored_topic = SCORED_TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    rows = [(None, v, topic, i % 3, i // 3, 0) for i, v in enumerate(values)]
    out = build_pipeline(env.from_collection(rows, type_info=SOURCE_ROW), settings)
    cpu0, t0 = _cpu_s(), time.perf_counter()
    scored = 0
    with out.execute_and_collect() as results:
        for row in results:
            scored += row[0] == scored_topic
    return _cpu_s() - cpu0, time.perf_counter() - t0, scored


def scale_out(settings: Settings, short: int = 2_000, long: int = 22_000) -> dict:
    ensure_default_model(settings)
    gen = PosGenerator(seed=5, stores=8, customers=5_000, fraud_share=0.03, tx_per_second=50, diurnal=False)
    values = [next(gen).encode() for _ in range(long)]
    base = settings.job.model_copy(update={"face_deadline_ms": 0, "bootstrap_control": False})
    configs = {
        "single_p1": (settings.model_copy(update={"job": base}), 1),
        "partitioned_p1": (settings.model_copy(update={"job": base.model_copy(update={"layout": "partitioned"})}), 1),
        "partitioned_p2": (settings.model_copy(update={"job": base.model_copy(update={"layout": "partitioned"})}), 2),
    }
    result: dict = {"transactions": long - short}
    for name, (s, p) in configs.items():
        cpu_a, wall_a, n_a = _run(s, values[:short], p)
        cpu_b, wall_b, n_b = _run(s, values, p)
        n = n_b - n_a
        result[name] = {
            "cpu_s_per_100k": (cpu_b - cpu_a) * 100_000 / n,
            "scored_per_s": n / max(1e-9, wall_b - wall_a),
            "scored": n_b,
        }
    result["ratio_p2_to_p1"] = result["partitioned_p2"]["cpu_s_per_100k"] / result["partitioned_p1"]["cpu_s_per_100k"]
    result["ratio_partitioned_to_single"] = (
        result["partitioned_p1"]["cpu_s_per_100k"] / result["single_p1"]["cpu_s_per_100k"]
    )
    return result


def report_rows(r: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, label in (
        ("single_p1", "job, single layout, p = 1"),
        ("partitioned_p1", "job, partitioned layout, p = 1"),
        ("partitioned_p2", "job, partitioned layout, p = 2"),
    ):
        x = r[name]
        rows.append(
            (f"{label}: CPU-s per 100k tx / scored tx/s", f"{x['cpu_s_per_100k']:.0f} / {x['scored_per_s']:,.0f}", "")
        )
    rows.append(("  partitioned p = 2 / p = 1, CPU per transaction", f"{r['ratio_p2_to_p1']:.2f}x", "<= 1.3x"))
    rows.append(
        ("  partitioned / single at p = 1, CPU per transaction", f"{r['ratio_partitioned_to_single']:.2f}x", "")
    )
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    result = scale_out(get_settings())
    table = Table(title=f"scale-out ({result['transactions']:,} transactions, long run less short run)")
    for col in ("measure", "value", "goal"):
        table.add_column(col)
    for row in report_rows(result):
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
