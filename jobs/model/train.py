"""``train``, ``backtest`` and ``train-default``: the fraud model offline, through the job's own code.

Every transaction — from a Fraud Detector-format CSV or from the POS generator — goes through the
steps the streaming job runs: Avro bytes -> :meth:`Scorer.parse` (validation, dead letters) ->
:meth:`Scorer.observe` on a :class:`ScoringState` in event-time order (receipts, stores, customer
history). The model's features are computed from what ``observe`` returns, exactly as the job hands
them to the predictor, so training and serving share one feature path.

Split: the *labelled* rows in event-time order; the first ``--train-frac`` (70 %) train the model,
the later rest validates it (metrics) and calibrates the 0-1000 score by false-positive rate.
Unlabelled rows are not trained on but still pass through ``observe``, so they build history.

Run: ``python -m jobs.model.train train CSV``, ``python -m jobs.model.train backtest CSV --model DIR``,
``python -m jobs.model.train train-default`` (``make train``, ``make backtest``, ``make train-default``).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from jobs.model.fraud_model import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    LocalModel,
    ModelArtifactError,
    artifact_root,
    feature_matrix,
    fit,
    format_metrics,
    lgb_params,
    roc_auc,
)
from jobs.model.predictors import LocalPredictor
from jobs.scoring.scorer import Scorer, ScoringState
from schemas.afd_csv import file_sha256, read_rows, replay_order, row_to_transaction
from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.records import PosTransaction

HISTORY_TOPIC = "history"


@dataclass
class History:
    """Transactions after ``observe``: ``items[i] = (tx, indicators)`` in event-time order."""

    items: list[tuple[dict[str, Any], dict[str, float]]] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(event id or line, reason) of input that could not be used."""
    duplicates: int = 0


def observe_all(
    records: Iterable[PosTransaction | tuple[str, str]],
    settings: Settings,
    state: ScoringState | None = None,
    scorer: Scorer | None = None,
) -> History:
    """Run records (event-time order) through the job's parse + observe; rejects are kept with reasons.

    A ``(id, reason)`` tuple in ``records`` is input that failed before it became a transaction."""
    scorer = scorer or Scorer(settings)
    state = state if state is not None else ScoringState()
    dead_letter = codec("DeadLetter")
    out = History()
    for n, rec in enumerate(records):
        if isinstance(rec, tuple):
            out.rejected.append(rec)
            continue
        env = scorer.parse(rec.encode(), None, HISTORY_TOPIC, 0, n, rec.event_time)
        if isinstance(env[0], str):  # a dead letter row: (topic, key, value)
            out.rejected.append((rec.transaction_id, dead_letter.decode(env[2])["reason"]))
            continue
        try:
            observed, _ = scorer.observe(env, state)
        except InvalidRecord as err:
            out.rejected.append((rec.transaction_id, err.reason))
            continue
        if observed is None:
            out.duplicates += 1
            continue
        out.items.append((observed[0], dict(observed[1])))
        out.source_ids.append(rec.transaction_id)
    return out


def csv_transactions(path: Path) -> list[PosTransaction | tuple[str, str]]:
    """A Fraud Detector CSV as transactions in event-time order; unmappable rows as (id, reason)."""
    out: list[PosTransaction | tuple[str, str]] = []
    for row in replay_order(read_rows(path)):
        try:
            out.append(row_to_transaction(row.data))
        except ValueError as exc:
            out.append((str(row.data.get("EVENT_ID") or f"line {row.line}"), str(exc)))
    return out


def synthetic_transactions(n: int, seed: int) -> list[PosTransaction]:
    """Seeded POS history with labelled fraud patterns: days of traffic for a few thousand customers,
    so customers build a habit (z-scores) and returns find their receipts."""
    gen = PosGenerator(seed=seed, stores=8, customers=2000, fraud_share=0.03, tx_per_second=1.0)
    return [next(gen) for _ in range(n)]


def time_split(history: History, train_frac: float) -> tuple[list[int], list[int]]:
    """Indexes of labelled rows: the first ``train_frac`` of them (event-time order) and the rest."""
    labelled = [i for i, (tx, _) in enumerate(history.items) if tx.get("label") is not None]
    cut = int(round(len(labelled) * train_frac))
    return labelled[:cut], labelled[cut:]


def train_on(
    history: History,
    *,
    train_frac: float,
    seed: int,
    rounds: int | None,
    source: str,
    sha256: str,
) -> LocalModel:
    train_idx, val_idx = time_split(history, train_frac)
    if not train_idx or not val_idx:
        raise typer.BadParameter("need labelled rows on both sides of the split")
    x = feature_matrix(history.items)
    y = np.array([history.items[i][0].get("label") or 0 for i in range(len(history.items))], dtype=np.int64)
    for name, idx in (("training", train_idx), ("validation", val_idx)):
        if len(set(y[idx].tolist())) < 2:
            raise typer.BadParameter(f"the {name} part has only one class")
    t_train, t_val = (history.items[train_idx[-1]][0]["event_time"], history.items[val_idx[0]][0]["event_time"])
    info = {
        "data": {
            "source": source,
            "sha256": sha256,
            "rows": len(history.items) + len(history.rejected) + history.duplicates,
            "used": len(history.items),
            "labelled": len(train_idx) + len(val_idx),
            "rejected": len(history.rejected),
            "duplicates": history.duplicates,
            "split": (
                f"labelled rows by event time: first {train_frac:.0%} train ({len(train_idx)} rows, up to "
                f"{_iso(t_train)}), last {1 - train_frac:.0%} validate ({len(val_idx)} rows, from {_iso(t_val)})"
            ),
            "validation_from_ms": t_val,
        }
    }
    result = fit(x[train_idx], y[train_idx], x[val_idx], y[val_idx], seed=seed, rounds=rounds, info=info)
    return result.model


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the default model ------------------------------------------------------------------------

DEFAULT_SYNTHETIC_ROWS = 60_000
DEFAULT_SEED = 20251122


def train_default(settings: Settings, rows: int = DEFAULT_SYNTHETIC_ROWS, seed: int = DEFAULT_SEED) -> LocalModel:
    txs = synthetic_transactions(rows, seed)
    digest = hashlib.sha256(f"PosGenerator(seed={seed}, rows={rows})".encode()).hexdigest()
    history = observe_all(txs, settings)
    return train_on(
        history, train_frac=0.7, seed=7, rounds=None, source=f"synthetic:PosGenerator(seed={seed})", sha256=digest
    )


def ensure_default_model(settings: Settings, force: bool = False) -> Path:
    """The model in use (``CURRENT``); trains the synthetic default first when there is none.

    A file lock makes concurrent callers (``make run`` and a job starting) train it once."""
    root = artifact_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".train.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            try:
                return LocalModel.load(root).path  # type: ignore[return-value]
            except ModelArtifactError:
                pass
        model = train_default(settings)
        return model.save(root)


# --- backtest ---------------------------------------------------------------------------------


def backtest_rows(history: History, scorer: Scorer, batch: int = 500) -> list[dict[str, Any]]:
    """Decisions for every observed transaction, through ``Scorer.decide_batch`` (model + rules)."""
    scored = codec("ScoredTransaction")
    out: list[dict[str, Any]] = []
    for start in range(0, len(history.items), batch):
        envs = [(tx, dict(ind), tx["event_time"]) for tx, ind in history.items[start : start + batch]]
        result = scorer.decide_batch(envs)
        rows = result[0] if isinstance(result, tuple) else result
        out.extend(scored.decode(v) for topic, _, v in rows if topic == scorer.scored_topic)
    return out


def backtest_metrics(decisions: Sequence[dict[str, Any]], validation_from_ms: int | None) -> dict[str, Any]:
    """Model and rule metrics over the labelled decisions (and the held-out later part alone)."""

    def part(rows: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [r for r in rows if r["label"] is not None and r["model_score"] is not None]
        if not rows:
            return {"rows": 0}
        y = np.array([r["label"] for r in rows])
        s = np.array([r["model_score"] for r in rows], dtype=np.float64)
        flagged = np.array([r["outcome"] != "APPROVE" for r in rows])
        blocked = np.array([r["outcome"] == "BLOCK" for r in rows])
        legit, fraud = y == 0, y == 1
        return {
            "rows": len(rows),
            "fraud": int(fraud.sum()),
            "roc_auc_model_score": roc_auc(y, s),
            "outcomes": {
                f"{o}/{'fraud' if lab else 'legit'}": c
                for (o, lab), c in sorted(Counter((r["outcome"], r["label"]) for r in rows).items())
            },
            "review_or_block": {"tpr": _mean(flagged[fraud]), "fpr": _mean(flagged[legit])},
            "block": {"tpr": _mean(blocked[fraud]), "fpr": _mean(blocked[legit])},
        }

    out = {"all_labelled": part(list(decisions))}
    if validation_from_ms is not None:
        out["held_out_later_part"] = part([d for d in decisions if d["event_time"] >= validation_from_ms])
    return out


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else float("nan")


# --- CLI --------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help="Train and backtest the fraud model through the job's feature path.")


@app.command()
def train(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="Fraud Detector-format training CSV.")],
    out: Annotated[Path | None, typer.Option(help="Models root (default <stack dir>/models).")] = None,
    train_frac: Annotated[float, typer.Option(help="Share of labelled rows (earliest first) to train on.")] = 0.7,
    rounds: Annotated[int | None, typer.Option(help="Boosting rounds (default 100).")] = None,
    seed: Annotated[int, typer.Option()] = 7,
    current: Annotated[bool, typer.Option(help="Make it the model the job uses (CURRENT).")] = True,
) -> None:
    """Train on a CSV; write the versioned artifact and its metrics report beside it."""
    settings = get_settings()
    history = observe_all(csv_transactions(csv_path), settings)
    model = train_on(
        history, train_frac=train_frac, seed=seed, rounds=rounds, source=csv_path.name, sha256=file_sha256(csv_path)
    )
    path = model.save(out or artifact_root(settings), make_current=current)
    typer.echo(format_metrics(model.meta))
    for ident, reason in history.rejected[:10]:
        typer.echo(f"rejected {ident}: {reason}")
    typer.echo(f"artifact: {path}")


HIGH_CARDINALITY: tuple[str, ...] = (
    "ip_prefix",
    "email_domain",
    "user_agent_family",
    "card_bin_prefix",
    "billing_state",
)
"""Hashed categoricals with many values: few rows per value in a small labelled set."""


def rolling_origin_auc(
    x: np.ndarray, y: np.ndarray, *, rounds: int, drop: Sequence[str] = (), folds: int = 4, seed: int = 7
) -> list[float]:
    """ROC-AUC of each fold of rolling-origin validation over time-ordered rows: fold k trains on
    everything before its window and validates on the window, so no fold sees its own future."""
    import lightgbm as lgb

    x = x.copy()
    for name in drop:  # a column of NaN is never split on: the same as dropping it
        x[:, FEATURE_NAMES.index(name)] = np.nan
    n, window = len(y), len(y) // (folds + 2)
    out = []
    for k in range(folds):
        cut = n - (folds - k) * window
        train_rows, val_rows = slice(0, cut), slice(cut, cut + window)
        if len(set(y[val_rows].tolist())) < 2:
            continue
        data = lgb.Dataset(
            x[train_rows],
            label=y[train_rows],
            feature_name=list(FEATURE_NAMES),
            categorical_feature=list(CATEGORICAL_FEATURES),
        )
        booster = lgb.train(lgb_params(cut, seed), data, num_boost_round=rounds)
        out.append(roc_auc(y[val_rows], booster.predict(x[val_rows], num_threads=1)))
    return out


@app.command()
def select(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="Fraud Detector-format training CSV.")],
    train_frac: Annotated[float, typer.Option(help="Share of labelled rows (earliest first) `train` trains on.")] = 0.7,
    folds: Annotated[int, typer.Option(help="Rolling-origin folds inside that share.")] = 4,
) -> None:
    """Compare model settings by rolling-origin validation inside the training part only.

    The held-out later part is never read here, so choosing by these figures does not fit the
    model to the rows its reported ROC-AUC comes from."""
    history = observe_all(csv_transactions(csv_path), get_settings())
    train_idx, _ = time_split(history, train_frac)
    x = feature_matrix([history.items[i] for i in train_idx])
    y = np.array([history.items[i][0]["label"] for i in train_idx], dtype=np.int64)
    typer.echo(f"{len(train_idx)} training rows ({int(y.sum())} fraud), {folds} rolling-origin folds")
    for features, drop in (("all", ()), ("without high-cardinality", HIGH_CARDINALITY)):
        for rounds in (50, 100, 200):
            aucs = rolling_origin_auc(x, y, rounds=rounds, drop=drop, folds=folds)
            typer.echo(
                f"  {features:24s} rounds {rounds:3d}: mean ROC-AUC {_mean(np.array(aucs)):.3f}  "
                f"folds {' '.join(f'{a:.3f}' for a in aucs)}"
            )


@app.command("train-default")
def train_default_cmd(force: Annotated[bool, typer.Option(help="Retrain even if a model exists.")] = False) -> None:
    """Make sure a model exists: train the default one from seeded synthetic POS history if not."""
    settings = get_settings()
    t0 = time.perf_counter()
    path = ensure_default_model(settings, force=force)
    typer.echo(f"model: {path} ({time.perf_counter() - t0:.1f}s)")


@app.command()
def backtest(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="Fraud Detector-format CSV to replay.")],
    model: Annotated[Path | None, typer.Option(help="Model version folder or models root (default: CURRENT).")] = None,
    output: Annotated[Path | None, typer.Option(help="Decisions CSV (default <CSV stem>.backtest.csv here).")] = None,
) -> None:
    """Replay a CSV in event-time order through features, model and rules: one decision row per event."""
    settings = get_settings()
    local = LocalModel.load(model) if model else LocalModel.from_settings(settings)
    scorer = Scorer(settings, predictor=LocalPredictor(local))
    history = observe_all(csv_transactions(csv_path), settings, scorer=scorer)
    decisions = backtest_rows(history, scorer)
    output = output or Path(f"{csv_path.stem}.backtest.csv")
    with output.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "EVENT_ID",
                "EVENT_TIMESTAMP",
                "EVENT_LABEL",
                "score",
                "outcome",
                "risk_score",
                "reasons",
                "model_version",
                "rules_version",
            ]
        )
        for d in decisions:
            w.writerow(
                [
                    d["transaction_id"],
                    _iso(d["event_time"]),
                    "" if d["label"] is None else d["label"],
                    d["model_score"],
                    d["outcome"],
                    d["risk_score"],
                    "|".join(d["reasons"]),
                    d["model_version"],
                    d["rules_version"],
                ]
            )
        for ident, reason in history.rejected:
            w.writerow([ident, "", "", "", "REJECTED", "", reason, "", ""])
    cut = (local.meta.get("data") or {}).get("validation_from_ms")
    same_data = (local.meta.get("data") or {}).get("sha256") == file_sha256(csv_path)
    metrics = backtest_metrics(decisions, cut if same_data else None)
    typer.echo(
        f"model {local.version}, rules {scorer.rule_set.version}: {len(decisions)} decisions, "
        f"{len(history.rejected)} rejected, {history.duplicates} duplicates -> {output}"
    )
    typer.echo(json.dumps(metrics, indent=2))
    if not same_data:
        typer.echo("note: this CSV is not the model's training data, so every labelled row is out of sample")


if __name__ == "__main__":
    app()
