"""Bench section: model + rules + state scoring, batched (our job) vs per record (seed 004's design).

In-process, no Kafka: the same encoded transactions go through the job's pure steps —
``Scorer.parse`` -> ``Scorer.observe`` (keyed state) -> ``Scorer.decide_batch`` (model, rules, Avro
output) — once with one model call per batch of ``batch`` records, once with one call per record.
Also measured: the model stage alone both ways, and seed 004's per-record loop against a local
server speaking Fraud Detector's protocol (a lower bound for the real service: no network, no
service time). Called by ``make bench`` (``tests/bench/run.py``); ``python -m tests.bench.model`` runs it
alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import SecretStr

from infra.local.aws_models import LocalModelServer
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from jobs.model.fraud_model import LocalModel
from jobs.model.predictors import FraudDetectorPredictor, LocalPredictor, ScoringModels, drift_monitors
from jobs.model.registry import ModelRegistry
from jobs.model.train import ensure_default_model, train_default
from jobs.scoring.scorer import Predictor, Scorer, ScoringState

CHALLENGER_SEED = 4242
"""The bench's challenger: the default recipe on another seed and fewer rows (a different model)."""


def _drive(settings: Settings, predictor: Predictor, data: list[bytes], batch: int) -> float:
    """Score every record; returns records per second. ``batch=1`` is the per-record loop."""
    scorer, state = Scorer(settings, predictor=predictor), ScoringState()
    pending: list = []
    t0 = time.perf_counter()
    for n, value in enumerate(data):
        env = scorer.parse(value, None, "transactions", 0, n, 0)
        if isinstance(env[0], str):
            continue
        out, _ = scorer.observe(env, state)
        if out is None:
            continue
        pending.append(out)
        if len(pending) >= batch:
            scorer.decide_batch(pending)
            pending = []
    if pending:
        scorer.decide_batch(pending)
    return len(data) / (time.perf_counter() - t0)


def _rate(fn: Callable[[], Any], count: int) -> float:
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def _best(fn: Callable[[], float], repeats: int) -> float:
    """Best of ``repeats`` runs: on a shared 2-core machine the other load only ever slows a run down."""
    return max(fn() for _ in range(repeats))


def _best_interleaved(fns: Sequence[Callable[[], float]], repeats: int) -> list[float]:
    """Best of ``repeats`` rounds of each, run in turn round after round (a ratio of two of them is fair)."""
    best = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = max(best[i], fn())
    return best


def model_scoring(
    settings: Settings, records: int = 20_000, batch: int | None = None, afd_records: int = 300, repeats: int = 3
) -> dict:
    batch = batch or getattr(settings.job, "batch_size", 500)
    model = LocalModel.load(ensure_default_model(settings))
    gen = PosGenerator(seed=11, stores=8, customers=20_000, fraud_share=0.03, tx_per_second=200)
    data = [next(gen).encode() for _ in range(records)]
    local = LocalPredictor(model)
    # champion + challenger: every transaction scored by both, the champion deciding (goal >= 0.8x);
    # and the job's own configuration: the champion with the hourly drift monitor on. Interleaved, so
    # the three share the machine's load alike and their ratios hold on a busy machine.
    challenger = train_default(settings, rows=20_000, seed=CHALLENGER_SEED)
    both = LocalPredictor(model, challenger=challenger)
    # a small-data CatBoost model (what train picks on the Fraud Detector sample): as challenger, and deciding alone
    small = train_default(settings, rows=4_000, seed=CHALLENGER_SEED, learner="catboost")
    assert small.booster.learner == "catboost", small.booster.learner
    both_catboost = LocalPredictor(model, challenger=small)
    catboost_alone = LocalPredictor(small)
    monitored = ScoringModels(ModelRegistry.fixed(model), drift=drift_monitors(settings))
    batched, with_challenger, with_catboost, catboost_only, with_drift = _best_interleaved(
        [lambda p=p: _drive(settings, p, data, batch) for p in (local, both, both_catboost, catboost_alone, monitored)],
        repeats + 2,
    )
    per_record = _best(lambda: _drive(settings, local, data, 1), repeats)
    # the model stage alone, on the indicators the job would hand it
    scorer, state = Scorer(settings), ScoringState()
    items = []
    for n, value in enumerate(data):
        out, _ = scorer.observe(scorer.parse(value, None, "transactions", 0, n, 0), state)
        if out is not None:
            items.append((out[0], out[1]))
    model_batched = _best(
        lambda: _rate(
            lambda: [model.predict_batch(items[i : i + batch]) for i in range(0, len(items), batch)], len(items)
        ),
        repeats,
    )
    model_single = _best(
        lambda: _rate(lambda: [model.predict_batch([it]) for it in items[:5000]], min(5000, len(items))), repeats
    )
    server = LocalModelServer()
    try:
        afd_settings = settings.model_copy(
            update={
                "model": settings.model.model_copy(
                    update={
                        "backend": "frauddetector",
                        "aws_endpoint_url": server.url,
                        "aws_region": "us-east-1",
                        "aws_access_key_id": SecretStr("bench"),
                        "aws_secret_access_key": SecretStr("bench"),
                    }
                )
            }
        )
        afd = FraudDetectorPredictor(afd_settings, model)
        afd_per_record = _best(lambda: _drive(settings, afd, data[:afd_records], 1), repeats)
    finally:
        server.close()
    return {
        "records": records,
        "batch": batch,
        "model": model.version,
        "best_of": repeats,
        "scored_batched_per_s": batched,
        "scored_with_challenger_per_s": with_challenger,
        "ratio_with_challenger": with_challenger / batched,
        "scored_with_catboost_challenger_per_s": with_catboost,
        "ratio_with_catboost_challenger": with_catboost / batched,
        "scored_catboost_champion_per_s": catboost_only,
        "ratio_catboost_champion": catboost_only / batched,
        "scored_with_drift_per_s": with_drift,
        "ratio_with_drift": with_drift / batched,
        "scored_per_record_per_s": per_record,
        "ratio_batched_to_per_record": batched / per_record,
        "model_only_batched_per_s": model_batched,
        "model_only_per_record_per_s": model_single,
        "ratio_model_only": model_batched / model_single,
        "afd_local_server_per_record_per_s": afd_per_record,
        "ratio_batched_to_afd_per_record": batched / afd_per_record,
    }


def report_rows(r: dict) -> list[tuple[str, str, str]]:
    """(measure, value, goal) rows for the bench table."""
    return [
        (
            f"model+rules+state, batches of {r['batch']} (tx/s, in-process)",
            f"{r['scored_batched_per_s']:,.0f}",
            ">= 20,000",
        ),
        (
            "same, with a challenger model scoring beside the champion (tx/s)",
            f"{r['scored_with_challenger_per_s']:,.0f} = {r['ratio_with_challenger']:.2f}x",
            ">= 0.8x",
        ),
        (
            "same, with a CatBoost challenger (a small-data model)",
            f"{r['scored_with_catboost_challenger_per_s']:,.0f} = {r['ratio_with_catboost_challenger']:.2f}x",
            ">= 0.8x",
        ),
        (
            "same, the CatBoost model deciding alone (no challenger)",
            f"{r['scored_catboost_champion_per_s']:,.0f} = {r['ratio_catboost_champion']:.2f}x",
            "",
        ),
        (
            "same, with the hourly drift monitor (the job's default)",
            f"{r['scored_with_drift_per_s']:,.0f} = {r['ratio_with_drift']:.2f}x",
            "",
        ),
        ("same, one local model call per record (tx/s)", f"{r['scored_per_record_per_s']:,.0f}", ""),
        ("  ratio batched / per record, local model", f"{r['ratio_batched_to_per_record']:.1f}x", ""),
        (
            "model stage alone: batched / per-record call",
            f"{r['model_only_batched_per_s']:,.0f} / "
            f"{r['model_only_per_record_per_s']:,.0f} tx/s = {r['ratio_model_only']:.1f}x",
            "",
        ),
        (
            "seed 004 loop: per-record GetEventPrediction, local server (tx/s)",
            f"{r['afd_local_server_per_record_per_s']:,.0f}",
            "",
        ),
        (
            "  ratio batched local model / seed 004 loop (the issue's ratio)",
            f"{r['ratio_batched_to_afd_per_record']:.0f}x",
            ">= 20x",
        ),
    ]


def main() -> None:
    """Model + rules + state scoring: batched (the job) vs per record (seed 004's design); prints a table."""
    from tests.bench.table import print_rows

    result = model_scoring(get_settings())
    title = f"model scoring ({result['records']} transactions, best of {result['best_of']}, model {result['model']})"
    print_rows(title, report_rows(result))


if __name__ == "__main__":
    import typer

    typer.run(main)
