"""Bench section: the scoring steps partitioned by key against the single-state core, in-process.

The same encoded transactions (and a face observation for most of them) go through
:class:`jobs.scoring.core.DecisionCore` and through :class:`jobs.scoring.partitioned.PartitionedCore`
on 1 and 4 shards, with the default model; the partitioned runs once more with every message between
steps pickled, as a hop through the JVM would. CPU-seconds per 100k transactions (process time, so
other load on a shared machine does not count) and their ratios, best of interleaved rounds.
``python -m tests.bench.partitioned`` runs it alone; ``make bench`` includes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from jobs.model.fraud_model import LocalModel
from jobs.model.predictors import LocalPredictor
from jobs.model.train import ensure_default_model
from jobs.scoring.core import DecisionCore, SourceRecord
from jobs.scoring.partitioned import PartitionedCore
from schemas.topics import FACE_OBSERVATIONS, TRANSACTIONS
from tests.builders import checkout_face, face_vector


def _records(settings: Settings, count: int, batch: int) -> list[list[SourceRecord]]:
    prefix = settings.kafka.topic_prefix
    tx_topic, face_topic = TRANSACTIONS.full_name(prefix), FACE_OBSERVATIONS.full_name(prefix)
    gen = PosGenerator(seed=7, stores=8, customers=5_000, fraud_share=0.03, tx_per_second=200, diurnal=False)
    rng = np.random.default_rng(7)
    faces = [face_vector(rng) for _ in range(50)]
    out: list[SourceRecord] = []
    for n in range(count):
        tx = next(gen)
        out.append(SourceRecord(tx.transaction_id.encode(), tx.encode(), tx_topic, 0, n, 0))
        obs = checkout_face(
            tx.transaction_id, at=tx.event_time, embedding=faces[n % len(faces)], store=tx.store_id, lane=tx.lane_id
        )
        out.append(SourceRecord(b"cam", obs.encode(), face_topic, 0, n, 0))
    return [out[i : i + batch] for i in range(0, len(out), batch)]


def _cpu_per_100k(run: Callable[[], None], transactions: int) -> float:
    started = time.process_time()
    run()
    return (time.process_time() - started) * 100_000 / transactions


def partitioned_scoring(settings: Settings, transactions: int = 10_000, batch: int = 1000, rounds: int = 3) -> dict:
    settings = settings.model_copy(update={"job": settings.job.model_copy(update={"bootstrap_control": False})})
    model = LocalModel.load(ensure_default_model(settings))
    batches = _records(settings, transactions, batch)
    now = int(time.time() * 1000)

    def single() -> None:
        core = DecisionCore(settings, predictor=LocalPredictor(model))
        for b in batches:
            core.on_records(b, now)

    def partitioned(shards: int, wire: bool) -> Callable[[], None]:
        def run() -> None:
            core = PartitionedCore(settings, shards, predictor=LocalPredictor(model), wire=wire)
            for b in batches:
                core.on_records(b, now)

        return run

    runs = {"single": single, "p1": partitioned(1, False), "p4": partitioned(4, False), "p4_wire": partitioned(4, True)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], _cpu_per_100k(run, transactions))
    return {
        "transactions": transactions,
        "rounds": rounds,
        **{f"cpu_s_per_100k_{k}": v for k, v in best.items()},
        "ratio_p1": best["p1"] / best["single"],
        "ratio_p4": best["p4"] / best["single"],
        "ratio_p4_wire": best["p4_wire"] / best["single"],
    }


def report_rows(r: dict) -> list[tuple[str, str, str]]:
    return [
        ("single-state core, CPU-s per 100k tx (in-process)", f"{r['cpu_s_per_100k_single']:.2f}", ""),
        (
            "partitioned steps, 1 shard",
            f"{r['cpu_s_per_100k_p1']:.2f} = {r['ratio_p1']:.2f}x",
            "",
        ),
        ("partitioned steps, 4 shards", f"{r['cpu_s_per_100k_p4']:.2f} = {r['ratio_p4']:.2f}x", ""),
        (
            "  same, every message between steps pickled (a JVM hop)",
            f"{r['cpu_s_per_100k_p4_wire']:.2f} = {r['ratio_p4_wire']:.2f}x",
            "",
        ),
    ]


def main() -> None:
    """The partitioned scoring steps against the single-state core, in-process: CPU-s per 100k transactions."""
    from tests.bench.table import print_rows

    result = partitioned_scoring(get_settings())
    print_rows(
        f"partitioned scoring ({result['transactions']:,} tx + faces, best of {result['rounds']})", report_rows(result)
    )


if __name__ == "__main__":
    import typer

    typer.run(main)
