"""``evaluate``, ``train``, ``backtest`` and ``train-default``: the fraud model offline, through the job's own code.

Every transaction — from a Fraud Detector-format CSV or from the POS generator — goes through the
steps the streaming job runs: Avro bytes -> :meth:`Scorer.parse` (validation, dead letters) ->
:meth:`Scorer.observe` on a :class:`ScoringState` in event-time order (receipts, stores, customer
and linked-identity profiles). The model's features are computed from what ``observe`` returns,
exactly as the job hands them to the predictor, so training and serving share one feature path.

Evaluation: rolling-origin cross-validation over *all* labelled rows in event-time order
(:func:`jobs.model.fraud_model.cross_validate`, 5 folds by default): each fold trains only on
labelled rows strictly before its window, and every figure is shown beside that of ``order_price``
alone. Settings (features, regularisation, rounds) are chosen by it (``evaluate --grid``); nothing is
tuned on a hold-out. ``train`` runs the same cross-validation, then fits on every labelled row and
calibrates the 0-1000 score on the legitimate rows' out-of-fold probabilities; the report goes into
the artifact. Unlabelled rows are never trained on but still pass through ``observe``: they build
history.

Run: ``python -m jobs.model.train evaluate CSV``, ``python -m jobs.model.train train CSV``,
``python -m jobs.model.train backtest CSV --model DIR``, ``python -m jobs.model.train train-default``
(``make train``, ``make backtest``, ``make train-default``).
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import typer

from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from jobs.model.drift import reference_profile
from jobs.model.fraud_model import (
    CATEGORICAL_FEATURES,
    FEATURE_GROUPS,
    FEATURE_NAMES,
    FPR_ANCHORS,
    LEARNER_SWITCH_MARGIN,
    LGB_SMALL_DATA_ROUNDS,
    SMALL_DATA_ROWS,
    Calibration,
    CrossValidation,
    DamagedArtifactError,
    Learner,
    LocalModel,
    ModelArtifactError,
    classification_metrics,
    cross_validate,
    cross_validate_learners,
    feature_matrix,
    fit,
    format_evaluation,
    format_metrics,
    lgb_params,
    ranking_metrics,
    roc_auc,
)
from jobs.model.predictors import LocalPredictor
from jobs.model.registry import CURRENT, PointersChanged, champion_change, read_pointer, read_pointers, swap_pointers
from jobs.scoring.claims import IdClaims
from jobs.scoring.features import receipt_key
from jobs.scoring.scorer import Scorer, ScoringState
from schemas.afd_csv import file_sha256, read_rows, replay_order, row_to_transaction
from schemas.codec import codec, json_safe
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import shown_id
from schemas.model_artifact import MODEL_META_FILE, id_digest
from schemas.records import PosTransaction

HISTORY_TOPIC = "history"
DEFAULT_FOLDS = 5


@dataclass
class History:
    """Transactions after ``observe``: ``items[i] = (tx, indicators)`` in event-time order."""

    items: list[tuple[dict[str, Any], dict[str, float]]] = field(default_factory=list)
    source_ids: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(event id or line, reason) of input that could not be used."""
    rejected_unlisted: int = 0
    """Input rejected beyond ``rejected``: a topic's undecodable records past the first ones it lists
    (:data:`jobs.model.labels.MAX_REJECTED`), counted but not named."""
    duplicates: int = 0
    relabelled: list[str] = field(default_factory=list)
    """Ids whose label a later copy changed (a corrected label appended, as a chargeback corrects a verdict)."""

    @property
    def rejected_count(self) -> int:
        """Input rows or records rejected, listed or not."""
        return len(self.rejected) + self.rejected_unlisted


def observe_all(
    records: Iterable[PosTransaction | tuple[str, str]],
    settings: Settings,
    state: ScoringState | None = None,
    scorer: Scorer | None = None,
) -> History:
    """Run records (event-time order) through the job's parse + observe; rejects are kept with reasons, named by
    their transaction id where it is an id (else by its length: :func:`schemas.identifiers.shown_id`).

    A ``(id, reason)`` tuple in ``records`` is input that failed before it became a transaction. A copy of a
    transaction (same id and content) is counted once, as the job counts it, but its label is not part of that
    content: the last labelled copy gives the transaction its label (a corrected label appended to a file), and
    an unlabelled copy leaves it as it was. Copies share their event time, so their order here is the input's."""
    scorer = scorer or Scorer(settings)
    state = state if state is not None else ScoringState()
    claims = IdClaims(settings.rules.receipt_retention_days * 86_400_000)  # as the job: an id names one transaction
    dead_letter = codec("DeadLetter")
    out = History()
    kept: dict[str, int] = {}  # transaction id -> its index in out.items
    first_label: dict[str, int | None] = {}  # of each id a copy relabelled: the label its first row gave
    for n, rec in enumerate(records):
        if isinstance(rec, tuple):
            out.rejected.append(rec)
            continue
        env = scorer.parse(rec.encode(), None, HISTORY_TOPIC, 0, n, rec.event_time)
        if isinstance(env[0], str):  # a dead letter row: (topic, key, value)
            out.rejected.append((shown_id(rec.transaction_id), dead_letter.decode(env[2])["reason"]))
            continue
        try:
            observed, _ = scorer.observe(env, state)
            if observed is not None:
                claims.claim(observed[0], receipt_key(observed[0]))
        except InvalidRecord as err:
            out.rejected.append((shown_id(rec.transaction_id), err.reason))
            continue
        if observed is None:
            out.duplicates += 1
            k = kept.get(rec.transaction_id)
            if k is not None and rec.label is not None:
                tx, ind = out.items[k]
                first_label.setdefault(rec.transaction_id, tx.get("label"))
                out.items[k] = ({**tx, "label": rec.label}, ind)
            continue
        kept[rec.transaction_id] = len(out.items)
        out.items.append((observed[0], dict(observed[1])))
        out.source_ids.append(rec.transaction_id)
    out.relabelled = [i for i, label in first_label.items() if out.items[kept[i]][0].get("label") != label]
    return out


def rejected_line(history: History) -> str | None:
    """One line for the rows left out, with the first and why, or None when none was: said before any figure."""
    if not history.rejected:
        return None
    ident, reason = history.rejected[0]
    return f"{history.rejected_count} row(s) rejected and left out (first: {ident}: {reason})"


def relabelled_line(history: History) -> str | None:
    """One line for the transactions whose label came from a later copy of them, or None when none did."""
    if not history.relabelled:
        return None
    ids = history.relabelled
    more = f" and {len(ids) - 3:,} more" if len(ids) > 3 else ""
    return (
        f"{len(ids):,} transaction id(s) take their label from a later row with the same id and content (a corrected "
        f"label: the last one given counts): {', '.join(ids[:3])}{more}"
    )


def csv_transactions(path: Path) -> list[PosTransaction | tuple[str, str]]:
    """A Fraud Detector CSV as transactions in event-time order; unmappable rows as (id, reason), the id being the
    row's ``EVENT_ID`` where it is an id, else its line."""
    out: list[PosTransaction | tuple[str, str]] = []
    for row in replay_order(read_rows(path)):
        try:
            out.append(row_to_transaction(row.data))
        except ValueError as exc:
            out.append((shown_id(str(row.data.get("EVENT_ID") or "").strip(), f"line {row.line}"), str(exc)))
    return out


def synthetic_transactions(n: int, seed: int) -> list[PosTransaction]:
    """Seeded POS history with labelled fraud patterns: days of traffic for a few thousand customers,
    so customers build a habit (z-scores) and returns find their receipts."""
    gen = PosGenerator(seed=seed, stores=8, customers=2000, fraud_share=0.03, tx_per_second=1.0)
    return [next(gen) for _ in range(n)]


@dataclass
class Labelled:
    """The labelled rows of a history in event-time order: features, labels, times and amounts."""

    rows: list[int]
    """Indexes into ``History.items``."""
    x: np.ndarray
    y: np.ndarray
    times: np.ndarray
    amounts: np.ndarray


def labelled(history: History) -> Labelled:
    """The labelled rows (event-time order, stable for equal times); unlabelled rows only built history."""
    rows = [i for i, (tx, _) in enumerate(history.items) if tx.get("label") is not None]
    rows.sort(key=lambda i: history.items[i][0]["event_time"])
    items = [history.items[i] for i in rows]
    return Labelled(
        rows,
        feature_matrix(items),
        np.array([tx["label"] for tx, _ in items], dtype=np.int64),
        np.array([tx["event_time"] for tx, _ in items], dtype=np.int64),
        np.array([tx["amount"] for tx, _ in items], dtype=np.float64),
    )


def evaluate_history(
    history: History,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 7,
    rounds: int | None = None,
    params: dict[str, Any] | None = None,
    drop: Sequence[str] = (),
    learner: Learner | None = None,
) -> tuple[Labelled, CrossValidation]:
    """Rolling-origin cross-validation of the model over the history's labelled rows.

    ``learner`` None: chosen on these folds (:func:`cross_validate_learners`), unless settings are
    overridden (``rounds``, ``params``, ``drop``): they belong to one learner, :func:`learner_for`'s."""
    data = labelled(history)
    if len(set(data.y.tolist())) < 2:  # the data, not the command line: one Error: line, exit 1
        fraud = int(data.y.sum())
        raise CheckoutGuardError(
            f"need labelled fraud and legitimate rows (EVENT_LABEL fraud / legit): {fraud} fraud and "
            f"{len(data.y) - fraud} legitimate"
        )
    if len(data.y) < 2 * (folds + 1):  # the data again: one Error: line, exit 1
        raise CheckoutGuardError(
            f"{len(data.y)} labelled rows are too few for {folds} folds (at least {2 * (folds + 1)}; fewer --folds?)"
        )
    if learner is None and rounds is None and not params and not drop:
        cv = cross_validate_learners(data.x, data.y, data.times, data.amounts, folds=folds, seed=seed)
    else:
        cv = cross_validate(
            data.x,
            data.y,
            data.times,
            data.amounts,
            folds=folds,
            seed=seed,
            rounds=rounds,
            params=params,
            drop=drop,
            learner=learner,
        )
    if not cv.windows:  # the data once more: a report of no figure at all must not pass for an evaluation
        raise CheckoutGuardError(_no_fold_scored(data, cv))
    return data, cv


def _no_fold_scored(data: Labelled, cv: CrossValidation) -> str:
    """Why every fold was skipped: each fold's training rows (those before its window) hold one class, because the
    other class's rows all come later, within the last fold's window."""
    first = int(np.flatnonzero(data.y != data.y[0])[0])
    kind = "fraud" if data.y[first] == 1 else "legitimate"
    trained = cv.report["folds"][-1]["train_rows"]
    return (
        f"no fold could be scored: every fold's training rows hold one class (the first {kind} row in event-time "
        f"order is labelled row {first + 1} of {len(data.y)}, at {_iso(int(data.times[first]))}; the last fold "
        f"trains on the first {trained}): the labelled rows need both classes before the last fold's window"
    )


def seed_stability(
    history: History,
    *,
    folds: int,
    seeds: Iterable[int],
    learner: Learner,
    rounds: int | None = None,
) -> dict[str, Any]:
    """The evaluation repeated with other seeds (bagging and feature sampling draw differently): per fold
    the range of the model's ROC-AUC and in how many seeds it beat the floor; the pooled figure's range.

    With a handful of fraud rows per fold, whether a model "beats the floor in every fold" can hinge on
    the seed; a claim that holds in one seed only is luck, and this says so."""
    runs = [evaluate_history(history, folds=folds, seed=s, rounds=rounds, learner=learner)[1].report for s in seeds]
    per_fold = []
    for k, entry in enumerate(runs[0]["folds"]):
        if "model" not in entry:
            continue
        aucs = [r["folds"][k]["model"]["roc_auc"] for r in runs]
        floor = entry["floor"]["roc_auc"]
        per_fold.append(
            {
                "fold": k + 1,
                "roc_auc_min": min(aucs),
                "roc_auc_mean": float(np.mean(aucs)),
                "roc_auc_max": max(aucs),
                "floor": floor,
                "seeds_above_floor": sum(a > floor for a in aucs),
            }
        )
    pooled = [r["pooled"]["model"]["roc_auc"] for r in runs]
    return {
        "seeds": len(runs),
        "folds": per_fold,
        "pooled_roc_auc": {"min": min(pooled), "mean": float(np.mean(pooled)), "max": max(pooled)},
        "seeds_above_floor_in_every_fold": sum(bool(r["beats_floor_every_fold"]) for r in runs),
    }


def format_stability(stability: dict[str, Any]) -> str:
    n = stability["seeds"]
    lines = [f"the same over {n} seeds: model ROC-AUC min / mean / max per fold, and seeds above the floor"]
    for f in stability["folds"]:
        lines.append(
            f"  fold {f['fold']}: {f['roc_auc_min']:.3f} / {f['roc_auc_mean']:.3f} / {f['roc_auc_max']:.3f}"
            f"   floor {f['floor']:.3f}   above it in {f['seeds_above_floor']} of {n}"
        )
    p = stability["pooled_roc_auc"]
    lines.append(
        f"  pooled: {p['min']:.3f} / {p['mean']:.3f} / {p['max']:.3f}; above the floor in every fold in "
        f"{stability['seeds_above_floor_in_every_fold']} of {n} seeds"
    )
    return "\n".join(lines)


def train_on(
    history: History,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 7,
    rounds: int | None = None,
    source: str,
    sha256: str,
    labels: dict[str, Any] | None = None,
    learner: Learner | None = None,
    drift_bins: int = 10,
) -> LocalModel:
    """Cross-validate, then fit on every labelled row with the learner the evaluation used (chosen on the
    folds when ``learner`` is None); calibrate on the out-of-fold legitimate rows. ``drift_bins``: the drift
    reference's bins per feature (``model.drift_bins``)."""
    data, cv = evaluate_history(history, folds=folds, seed=seed, rounds=rounds, learner=learner)
    rows = cv.calibration_rows(data.y)
    legit_oof = cv.oof[rows][data.y[rows] == 0]
    if legit_oof.size == 0:
        raise CheckoutGuardError("no legitimate row was scored out of fold: nothing to calibrate on")
    calibration = Calibration.fit(legit_oof)
    scored = ~np.isnan(cv.oof)
    info = {
        "data": {
            "source": source,
            "sha256": sha256,
            "rows": len(history.items) + history.rejected_count + history.duplicates,
            "used": len(history.items),
            "labelled": len(data.rows),
            "rejected": history.rejected_count,
            "duplicates": history.duplicates,
            "from": _iso(int(data.times[0])),
            "to": _iso(int(data.times[-1])),
            **({"field_labels": labels} if labels else {}),
        },
        "evaluation": cv.report,
        "metrics": {"latest_folds_out_of_fold": classification_metrics(data.y[rows], cv.oof[rows], calibration)},
        "reference": reference_profile(
            FEATURE_NAMES,
            data.x[scored],
            calibration.score(cv.oof[scored]),
            drift_bins,
            categorical=CATEGORICAL_FEATURES,
        ),
    }
    ids = [history.source_ids[i] for i in data.rows]
    chosen = cv.report["settings"]["learner"]
    return fit(data.x, data.y, calibration, seed=seed, rounds=rounds, info=info, ids=ids, learner=chosen).model


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the default model ------------------------------------------------------------------------

DEFAULT_SYNTHETIC_ROWS = 60_000
SYNTHETIC_SOURCE_PREFIX = "synthetic:"
"""How ``model.json``'s ``data.source`` names a model trained on generated traffic (:func:`train_default`)."""
DEFAULT_SEED = 20251122
DEFAULT_SYNTHETIC_FOLDS = 3
"""Fewer folds for the synthetic default model: it trains on every fresh machine, and 60k rows give
each fold thousands of rows to judge by."""


def train_default(
    settings: Settings,
    rows: int = DEFAULT_SYNTHETIC_ROWS,
    seed: int = DEFAULT_SEED,
    folds: int = DEFAULT_SYNTHETIC_FOLDS,
    learner: Learner | None = None,
) -> LocalModel:
    txs = synthetic_transactions(rows, seed)
    digest = hashlib.sha256(f"PosGenerator(seed={seed}, rows={rows})".encode()).hexdigest()
    history = observe_all(txs, settings)
    return train_on(
        history,
        folds=folds,
        seed=7,
        source=f"{SYNTHETIC_SOURCE_PREFIX}PosGenerator(seed={seed})",
        sha256=digest,
        learner=learner,
        drift_bins=settings.model.drift_bins,
    )


def _is_synthetic_default(version_dir: Path) -> bool:
    """Whether the version folder holds a model :func:`train_default` made (its ``model.json`` says so): never an
    operator's model, so one this code cannot load may be replaced by the default of this code's features."""
    try:
        meta = json.loads((version_dir / MODEL_META_FILE).read_text())
    except (OSError, ValueError):
        return False
    data = meta.get("data") if isinstance(meta, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    return isinstance(source, str) and source.startswith(SYNTHETIC_SOURCE_PREFIX)


def ensure_default_model(
    settings: Settings, force: bool = False, *, audit: bool = True, reason: str | None = None
) -> Path:
    """The model in use (``CURRENT``); trains the synthetic default first when there is none.

    A file lock makes concurrent callers (``make run`` and a job starting) train it once. A champion is never replaced
    unasked: one this code cannot load (trained on other features, or damaged) is an error naming it, and so the job
    stops with the reason (before, one of other features was replaced by the default with no audit event, a change
    of champion ``promote`` alone makes). The exception is an earlier synthetic default of other features (a demo's
    models after an upgrade of the code): it is replaced as ``force`` replaces one, audited. ``force`` retrains it
    even so, and a champion it replaces is replaced as
    ``promote`` replaces one: compare-and-swap of the pointers it read before training, under the pointer lock, after
    the ``MODEL_PROMOTE`` audit event (unless not ``audit``); :class:`PointersChanged` (a command moved them
    meanwhile) or ``AuditNotDelivered`` leave the pointers as they were, the new version saved beside them. The first
    champion is set the same way, with no audit (there is no champion to replace): unforced, a champion set while it
    trained is kept and returned."""
    root = settings.models_root
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".train.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seen = read_pointers(root)
        if not force:
            try:
                return LocalModel.load(root).path  # type: ignore[return-value]
            except DamagedArtifactError:
                raise  # a champion that is there but damaged (mid-copy?) is not replaced unasked
            except ModelArtifactError as exc:
                # a champion of other features: replacing it is a change of champion, made unasked only where it
                # is itself an earlier synthetic default (a demo's, after an upgrade of the code), audited
                if seen[0] is not None and not _is_synthetic_default(root / seen[0]):
                    raise ModelArtifactError(
                        f"{exc} (the default model does not replace the champion {seen[0]} unasked: "
                        "`train-default --force` does, audited as a promotion; or `train`, then `promote`)"
                    ) from None
                reason = reason or f"the synthetic default model {seen[0]} retrained for this code's features"
        model = train_default(settings)
        path = model.save(root, make_current=False)
        if path.name == seen[0]:
            return path
        kept = None if seen[1] == path.name else seen[1]
        record = None if seen[0] is None else champion_change(settings, seen[0], path.name, audit=audit, reason=reason)
        try:
            swap_pointers(root, seen, (path.name, kept), record)
        except PointersChanged:
            if force:
                raise
            # a champion set while it trained (a `train --current`): it stays, the default saved beside it
            return LocalModel.load(root).path  # type: ignore[return-value]
        return path


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


def backtest_metrics(decisions: Sequence[dict[str, Any]], in_training: Sequence[bool] | None = None) -> dict[str, Any]:
    """Model and rule metrics over the labelled decisions; given which decisions are the model's
    training rows (:func:`training_flags`), the same for those (in sample, optimistic) and for the rows
    whose labels it never saw, each with ``order_price`` alone as the floor."""

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
            **(
                {
                    "model": ranking_metrics(y, s),
                    "floor": ranking_metrics(y, np.array([r["amount"] for r in rows], dtype=np.float64)),
                }
                if len(set(y.tolist())) == 2
                else {}
            ),
            **({"calibration": calibration_check(rows)} if legit.any() else {}),
        }

    out = {"all_labelled": part(list(decisions))}
    if in_training is not None:
        out["in_training"] = part([d for d, s in zip(decisions, in_training, strict=True) if s])
        out["unseen"] = part([d for d, s in zip(decisions, in_training, strict=True) if not s])
    return out


CHECKED_SCORES: tuple[int, ...] = (600, 800, 900, 950)
"""Scores whose promise :func:`calibration_check` checks: the default rule set's model bands, where the
score starts to add risk points (10, 25, 45, 60)."""
_PROMISED_FPR: dict[int, float] = dict(FPR_ANCHORS)


def calibration_check(decisions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether the 0-1000 score keeps its promise on these labelled decisions: the share of the
    legitimate ones at or above each of :data:`CHECKED_SCORES` beside the anchor's false-positive rate,
    over all of them and per calendar month (UTC).

    Why per month: the calibration was fitted on the latest folds' out-of-fold rows, so it promises
    the rates of traffic like the newest the model learned from. A period whose customers are newer
    (the first weeks after a job starts with empty state, or of a file) can run well above it, while
    the overall share hides which period does."""

    def shares(scores: list[int]) -> dict[str, Any]:
        a = np.asarray(scores, dtype=np.int64)
        return {
            "legit_rows": int(a.size),
            "share_at_or_above": {str(s): float(np.mean(a >= s)) for s in CHECKED_SCORES},
        }

    legit = [d for d in decisions if d["label"] == 0 and d["model_score"] is not None]
    by_month: dict[str, list[int]] = {}
    for d in sorted(legit, key=lambda d: d["event_time"]):
        by_month.setdefault(datetime.fromtimestamp(d["event_time"] / 1000, UTC).strftime("%Y-%m"), []).append(
            d["model_score"]
        )
    return {
        "promised_fpr": {str(s): _PROMISED_FPR[s] for s in CHECKED_SCORES},
        **shares([d["model_score"] for d in legit]),
        "by_month": {month: shares(scores) for month, scores in by_month.items()},
    }


def format_calibration(check: dict[str, Any], what: str) -> str:
    """:func:`calibration_check` as a table: one line for the promise, one for all rows, one per month."""
    head = "".join(f"  >={s:<4}" for s in CHECKED_SCORES)
    lines = [
        f"score calibration on {what}: share of the legitimate ones at or above each score",
        f"  {'':9} {'legit':>6}{head}",
        f"  {'promised':9} {'':>6}" + "".join(f"  {check['promised_fpr'][str(s)]:<6.2f}" for s in CHECKED_SCORES),
    ]
    for name, part in (("all", check), *check["by_month"].items()):
        cells = "".join(f"  {part['share_at_or_above'][str(s)]:<6.2f}" for s in CHECKED_SCORES)
        lines.append(f"  {name:9} {part['legit_rows']:>6}{cells}")
    return "\n".join(line.rstrip() for line in lines)


def training_flags(decisions: Sequence[dict[str, Any]], trained: frozenset[str] | None) -> list[bool] | None:
    """Which decisions are labelled training rows of the model (by transaction id), or None when the
    artifact did not record them. A row unlabelled at training time is not one, labelled since or not."""
    if trained is None:
        return None
    return [id_digest(d["transaction_id"]) in trained for d in decisions]


def format_unseen(metrics: dict[str, Any]) -> str:
    """One line for the labelled rows the model never saw: its ROC-AUC beside the order-price floor."""
    unseen = metrics.get("unseen") or {}
    if "model" not in unseen:
        rows, fraud = unseen.get("rows", 0), unseen.get("fraud", 0)
        return f"labelled rows the model never saw: {rows} ({fraud} fraud): one class only, no ROC-AUC"
    m, f = unseen["model"], unseen["floor"]
    lo, hi = m["roc_auc_ci95"]
    flo, fhi = f["roc_auc_ci95"]
    tpr = " ".join(f"{v['tpr']:.2f}" for v in m["at_fpr"].values())
    return (
        f"labelled rows the model never saw: {m['rows']} ({m['fraud']} fraud): model ROC-AUC {m['roc_auc']:.3f} "
        f"({lo:.2f}-{hi:.2f}), TPR at {'/'.join(m['at_fpr'])} FPR {tpr}; "
        f"order_price alone {f['roc_auc']:.3f} ({flo:.2f}-{fhi:.2f})"
    )


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else float("nan")


# --- CLI --------------------------------------------------------------------------------------

app = typer.Typer(
    add_completion=False, help="Evaluate, train and backtest the fraud model through the job's feature path."
)

_SMALL_LGB: dict[str, Any] = {k: v for k, v in lgb_params(0, 0).items() if k not in ("seed", "monotone_constraints")}
"""LightGBM's small-data settings, pinned: the grid's LightGBM rows mean these on a history of any size."""

GRID: tuple[tuple[str, Learner | None, dict[str, Any], int | None, tuple[str, ...]], ...] = (
    ("chosen settings", None, {}, None, ()),
    ("CatBoost depth 3", "catboost", {"depth": 3}, None, ()),
    ("CatBoost depth 4", "catboost", {"depth": 4}, None, ()),
    ("CatBoost depth 6", "catboost", {"depth": 6}, None, ()),
    ("CatBoost L2 10", "catboost", {"l2_leaf_reg": 10.0}, None, ()),
    ("CatBoost random strength 1 (its default)", "catboost", {"random_strength": 1.0}, None, ()),
    ("CatBoost random strength 10", "catboost", {"random_strength": 10.0}, None, ()),
    ("CatBoost 300 rounds", "catboost", {}, 300, ()),
    ("CatBoost 1000 rounds", "catboost", {}, 1000, ()),
    ("CatBoost, categoricals one-hot (no target stats)", "catboost", {"one_hot_max_size": 255}, None, ()),
    ("CatBoost, classes unweighted", "catboost", {"auto_class_weights": None}, None, ()),
    (
        "CatBoost depth 4, unweighted, random strength 1 (shipped before)",
        "catboost",
        {"depth": 4, "auto_class_weights": None, "random_strength": 1.0},
        None,
        (),
    ),
    ("LightGBM (4 leaves, L2 5, 200 rounds)", "lightgbm", _SMALL_LGB, LGB_SMALL_DATA_ROUNDS, ()),
    ("LightGBM, classes balanced", "lightgbm", {**_SMALL_LGB, "is_unbalance": True}, LGB_SMALL_DATA_ROUNDS, ()),
    ("LightGBM, 100 rounds", "lightgbm", _SMALL_LGB, 100, ()),
    ("LightGBM, 400 rounds", "lightgbm", _SMALL_LGB, 400, ()),
    (
        "LightGBM, looser (7 leaves, 5 per leaf, L2 1)",
        "lightgbm",
        {**_SMALL_LGB, "num_leaves": 7, "min_data_in_leaf": 5, "lambda_l2": 1.0},
        LGB_SMALL_DATA_ROUNDS,
        (),
    ),
    (
        "LightGBM, stricter (3 leaves, 20 per leaf)",
        "lightgbm",
        {**_SMALL_LGB, "num_leaves": 3, "min_data_in_leaf": 20},
        LGB_SMALL_DATA_ROUNDS,
        (),
    ),
    ("no monotone constraints", None, {"monotone_constraints": [0] * len(FEATURE_NAMES)}, None, ()),
    *((f"without {group}", None, {}, None, (group,)) for group in FEATURE_GROUPS),
    ("without customer-profile and linked-identities", None, {}, None, ("customer-profile", "linked-identities")),
)
"""The settings ``evaluate --grid`` compares: (label, learner (None: the one chosen on the rows, by
:func:`cross_validate_learners` at the first seed, as ``train`` chooses), parameter overrides, rounds,
groups of :data:`FEATURE_GROUPS` left out). The first is what ``train`` uses; ``--seeds N`` adds each
one's pooled ROC-AUC averaged over N seeds (the figure the settings were chosen by: one seed's
differences are mostly luck at this size)."""


@dataclass
class Source:
    """Where a training or evaluation history came from: its records, name, digest and label join."""

    history: History
    name: str
    sha256: str
    labels: dict[str, Any] | None = None
    """The field labels joined in (``--labels-from-topic``): counts, and the digest of the verdicts."""


def _check_output(path: Path | None, option: str) -> None:
    """A file to write at the end, checked before the work: an ``evaluate --grid --seeds 5`` runs for many
    minutes, and a mistyped folder then threw its figures away at the last step."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder, not a file", param_hint=option)
    if not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not a folder", param_hint=option)


def _require_file(path: Path) -> None:
    """A bad data file, as the model commands' other bad files: one ``Error:`` line, exit 1."""
    if not path.is_file():
        raise CheckoutGuardError(f"{path}: " + ("not a file" if path.exists() else "no such file"))


def _source(csv_path: Path | None, settings: Settings, from_topic: bool = False, field_labels: bool = False) -> Source:
    """The records of a CSV or of the ``transactions`` topic, with the ``labels`` topic's verdicts joined
    in when asked (they override the data's own labels: what analysts confirmed is what the model learns)."""
    from jobs.model.labels import apply_labels, read_labels, transactions_from_topic
    from schemas.topics import TRANSACTIONS

    records: list[PosTransaction | tuple[str, str]]
    unlisted = 0  # rejected records the topic's reader counted but did not list (past its first MAX_REJECTED)
    if from_topic == (csv_path is not None):
        raise typer.BadParameter("give a CSV or --from-topic (one of them)")
    if csv_path is not None:
        _require_file(csv_path)
        records, name, sha = csv_transactions(csv_path), csv_path.name, file_sha256(csv_path)
    else:
        stream = transactions_from_topic(settings)
        typer.echo(stream.summary())
        if gone := stream.warning():
            typer.echo(f"Warning: {gone}", err=True)
        records = [*stream.rejected, *stream.transactions]
        unlisted = stream.undecodable - len(stream.rejected)
        name = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
        sha = stream.digest  # the records read: the end offsets alone named other data alike after retention
    history = observe_all(records, settings)
    history.rejected_unlisted = unlisted
    if line := rejected_line(history):  # said before any figure: evaluate and train leave these rows out
        typer.echo(line)
    if line := relabelled_line(history):
        typer.echo(line)
    joined = None
    if field_labels:  # after the copies' labels are settled: a field verdict overrides the data's final label
        verdicts = read_labels(settings)
        txs, stats = apply_labels([tx for tx, _ in history.items], verdicts)
        history.items = [(tx, ind) for tx, (_, ind) in zip(txs, history.items, strict=True)]
        typer.echo(verdicts.summary())
        if gone := verdicts.warning():
            typer.echo(f"Warning: {gone}", err=True)
        typer.echo(stats.summary())
        name += "+labels"
        sha = hashlib.sha256(f"{sha}:{verdicts.digest()}".encode()).hexdigest()
        joined = {
            "digest": verdicts.digest(),
            "in_force": len(verdicts.by_transaction),
            "joined": stats.joined,
            "fraud": stats.fraud,
            "legit": stats.legit,
            "newly_labelled": stats.newly_labelled,
            "changed": stats.changed,
            "unmatched": len(stats.unmatched),
        }
    return Source(history, name, sha, joined)


CsvArg = Annotated[
    Path | None,
    typer.Argument(metavar="[CSV]", help="Fraud Detector-format CSV (or --from-topic).", show_default=False),
]
FromTopic = Annotated[bool, typer.Option("--from-topic", help="Read the transactions topic instead of a CSV.")]


class LearnerChoice(StrEnum):
    auto = "auto"
    catboost = "catboost"
    lightgbm = "lightgbm"


LearnerOption = Annotated[
    LearnerChoice,
    typer.Option(
        help=f"auto: below {SMALL_DATA_ROWS:,} labelled rows CatBoost, unless LightGBM cross-validates better on your"
        f" rows by more than {LEARNER_SWITCH_MARGIN}; LightGBM above. evaluate --grid compares their settings.",
    ),
]


def _learner(choice: LearnerChoice) -> Learner | None:
    return None if choice == LearnerChoice.auto else cast(Learner, choice.value)


LabelsFromTopic = Annotated[
    bool,
    typer.Option("--labels-from-topic", help="Join the labels topic's verdicts (they override the data's labels)."),
]


@app.command()
def evaluate(
    csv_path: CsvArg = None,
    from_topic: FromTopic = False,
    labels_from_topic: LabelsFromTopic = False,
    folds: Annotated[
        int, typer.Option(min=1, help="Rolling-origin folds (the labelled rows make folds + 1 blocks).")
    ] = DEFAULT_FOLDS,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Boosting rounds (default: the learner's own; given, auto picks by size alone)."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 7,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
    grid: Annotated[
        bool,
        typer.Option(
            help="Compare the candidate settings (GRID) instead: each its own learner and rounds (so not "
            "with --learner or --rounds)."
        ),
    ] = False,
    seeds: Annotated[
        int,
        typer.Option(min=1, help="Also repeat the evaluation with this many seeds: how much of each figure is luck."),
    ] = 1,
    learner: LearnerOption = LearnerChoice.auto,
) -> None:
    """Rolling-origin cross-validation over all labelled rows: per fold and pooled, beside order_price alone."""
    if grid and (rounds is not None or learner != LearnerChoice.auto):
        # each row of the grid names its own learner and rounds: these were taken and then ignored, without a word
        given = "--rounds" if rounds is not None else "--learner"
        raise typer.BadParameter(
            "--grid compares its own settings (each row's learner and rounds, the first as train chooses): "
            f"leave {given} out, or run evaluate without --grid",
            param_hint=given,
        )
    _check_output(json_path, "--json")
    source = _source(csv_path, get_settings(), from_topic, labels_from_topic)
    history = source.history
    if grid:
        _grid(history, folds, seed, json_path, seeds)
        return
    data, cv = evaluate_history(history, folds=folds, seed=seed, rounds=rounds, learner=_learner(learner))
    fraud = int(data.y.sum())
    typer.echo(f"{source.name}: {len(history.items)} transactions, {len(data.rows)} labelled ({fraud} fraud)")
    typer.echo(format_evaluation(cv.report))
    if seeds > 1:
        stability = seed_stability(  # the learner chosen above, judged over the seeds
            history,
            folds=folds,
            seeds=range(seed, seed + seeds),
            rounds=rounds,
            learner=cv.report["settings"]["learner"],
        )
        cv.report["seed_stability"] = stability
        typer.echo(format_stability(stability))
    if json_path:
        json_path.write_text(json.dumps(json_safe(cv.report), indent=2, default=str))
        typer.echo(f"report: {json_path}")


def _grid(history: History, folds: int, seed: int, json_path: Path | None, seeds: int = 1) -> None:
    results = []
    typer.echo(
        f"{'settings':48s} pooled ROC-AUC (95% CI)  PR-AUC  mean fold  worst fold - floor  folds"
        + (f"  | pooled, mean of {seeds} seeds" if seeds > 1 else "")
    )
    chosen = evaluate_history(history, folds=folds, seed=seed)[1].report["settings"]["learner"]
    typer.echo(f"learner chosen on these folds (rows without one use it): {chosen}")
    for label, grid_learner, params, rounds, groups in GRID:
        learner = grid_learner or chosen  # every seed of a row judges the same learner
        drop = tuple(name for group in groups for name in FEATURE_GROUPS[group])
        runs = [
            evaluate_history(history, folds=folds, seed=s, rounds=rounds, params=params, drop=drop, learner=learner)[1]
            for s in range(seed, seed + max(1, seeds))
        ]
        r = runs[0].report
        mean = float(np.mean([run.report["pooled"]["model"]["roc_auc"] for run in runs]))
        pooled = r["pooled"]["model"]
        margins = [e["model"]["roc_auc"] - e["floor"]["roc_auc"] for e in r["folds"] if "model" in e]
        lo, hi = pooled["roc_auc_ci95"]
        typer.echo(
            f"{label:48s} {pooled['roc_auc']:.3f} ({lo:.2f}-{hi:.2f})       {pooled['pr_auc']:.3f}   "
            f"{r['mean_fold_roc_auc']:.3f}      {min(margins, default=math.nan):+.3f}            "
            + " ".join(f"{e['model']['roc_auc']:.2f}" for e in r["folds"] if "model" in e)
            + (f"  | {mean:.3f}" if seeds > 1 else "")
        )
        results.append({"settings": label, "report": r, "pooled_roc_auc_mean_of_seeds": mean, "seeds": seeds})
    if json_path:
        json_path.write_text(json.dumps(json_safe(results), indent=2, default=str))
        typer.echo(f"report: {json_path}")


def makes_current(root: Path, job_root: Path, asked: bool | None) -> bool:
    """Whether ``train`` points CURRENT at its model: as asked, else yes unless ``root`` is the job's own
    models folder with a champion (a plain ``train`` must not swap it without ``promote``'s audit event)."""
    if asked is not None:
        return asked
    return root.resolve() != job_root.resolve() or read_pointer(root, CURRENT) is None


@app.command()
def train(
    csv_path: CsvArg = None,
    from_topic: FromTopic = False,
    labels_from_topic: LabelsFromTopic = False,
    out: Annotated[Path | None, typer.Option(help="Models root (default <stack dir>/models).")] = None,
    folds: Annotated[int, typer.Option(min=1, help="Rolling-origin folds of the evaluation and calibration.")] = (
        DEFAULT_FOLDS
    ),
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Boosting rounds (default: the learner's own; given, auto picks by size alone)."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 7,
    current: Annotated[
        bool | None,
        typer.Option(
            help="Make it the model the job uses (CURRENT). Default: yes, except in the job's own models folder "
            "once it has a champion: there only `jobs.model.registry promote` (audited) changes it.",
            show_default=False,
        ),
    ] = None,
    learner: LearnerOption = LearnerChoice.auto,
) -> None:
    """Evaluate by cross-validation, train on every labelled row; write the artifact and its report."""
    settings = get_settings()
    if out is not None and out.exists() and not out.is_dir():  # said before the training, not after it
        raise typer.BadParameter(f"{out} is not a folder", param_hint="--out")
    source = _source(csv_path, settings, from_topic, labels_from_topic)
    history = source.history
    model = train_on(
        history,
        folds=folds,
        seed=seed,
        rounds=rounds,
        source=source.name,
        sha256=source.sha256,
        labels=source.labels,
        learner=_learner(learner),
        drift_bins=settings.model.drift_bins,
    )
    root = out or settings.models_root
    current = makes_current(root, settings.models_root, current)
    path = model.save(root, make_current=current)
    typer.echo(format_metrics(model.meta))
    for ident, reason in history.rejected[1:10]:  # the first was named in the summary before the figures
        typer.echo(f"also rejected {ident}: {reason}")
    typer.echo(f"artifact: {path}")
    if not current and read_pointer(root, CURRENT) == path.name:
        typer.echo("this is the champion already (the same data and settings make the same version)")
    elif not current:
        typer.echo(f"not the champion yet: score it beside it with `challenger {path.name}`, then `promote`")


@app.command("train-default")
def train_default_cmd(
    force: Annotated[
        bool, typer.Option(help="Retrain even if a model exists; it replaces the champion as promote does.")
    ] = False,
    audit: Annotated[
        bool,
        typer.Option(
            help="When it replaces the champion (--force, or an earlier synthetic default): record the change of "
            "champion on the audit topic first."
        ),
    ] = True,
    reason: Annotated[
        str | None,
        typer.Option(
            help="When it replaces the champion: why (recorded in the audit event; default: --force's, or that an "
            "earlier synthetic default was retrained)."
        ),
    ] = None,
) -> None:
    """Make sure a model exists: train the default one from seeded synthetic POS history if not."""
    settings = get_settings()
    t0 = time.perf_counter()
    was = read_pointer(settings.models_root, CURRENT)
    # Unforced, the champion replaced is an earlier synthetic default, and the audit event says so: not "--force".
    why = reason or ("train-default --force" if force else None)
    try:
        path = ensure_default_model(settings, force=force, audit=audit, reason=why)
    except PointersChanged as exc:  # as promote: the operator looks at status and re-runs knowingly
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"model: {path} ({time.perf_counter() - t0:.1f}s)")
    if was is not None and was != path.name and read_pointer(settings.models_root, CURRENT) == path.name:
        typer.echo(f"champion: {path.name} (was {was})")


def with_rules_file(settings: Settings, rules: Path | None) -> Settings:
    """The settings deciding by the rule set in ``rules`` alone (None: as they are), checked first.

    The file is the rule set on trial: the job's ``CG_RULES__VERSION`` / ``BLOCK_AT`` / ``REVIEW_AT``, meant for
    the live rule set, would otherwise change its thresholds unseen, as ``backtest-stream --rules`` leaves them
    out too."""
    if rules is None:
        return settings
    from jobs.scoring.rules import RuleSet

    RuleSet.load(rules)  # a bad file is told before the model loads: one Error: line, exit 1
    update = {"ruleset_file": rules, "version": None, "block_at": None, "review_at": None}
    return settings.model_copy(update={"rules": settings.rules.model_copy(update=update)})


def _no_decisions(csv_path: Path, history: History, warmed: int) -> str:
    """Why a backtest decided nothing: an empty file, every row rejected, or every event before the warm-up cut."""
    if warmed:
        rejected = f" ({len(history.rejected)} other rows rejected)" if history.rejected else ""
        return f"{csv_path.name}: all {warmed} events are before --decide-from{rejected}; nothing to decide"
    if history.rejected:
        ident, reason = history.rejected[0]
        return f"{csv_path.name}: all {len(history.rejected)} rows rejected (first, {ident}: {reason})"
    return f"{csv_path.name} holds no transactions"


@app.command()
def backtest(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="Fraud Detector-format CSV to replay.")],
    model: Annotated[Path | None, typer.Option(help="Model version folder or models root (default: CURRENT).")] = None,
    output: Annotated[Path | None, typer.Option(help="Decisions CSV (default <CSV stem>.backtest.csv here).")] = None,
    decide_from: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"],
            help="Warm-up, as the job's CG_JOB__DECIDE_FROM (which backtest ignores): earlier events only "
            "build state; decide and measure from this time (UTC).",
        ),
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(
            help="Rule set file to decide with (as `backtest-stream --rules`): the settings' CG_RULES__RULESET_FILE, "
            "VERSION, BLOCK_AT and REVIEW_AT do not apply. Default: the settings' rule set, as the job's.",
        ),
    ] = None,
) -> None:
    """Replay a CSV in event-time order through features, model and rules: one decision row per event."""
    _require_file(csv_path)  # before the model: the file named is the first thing to put right
    if output is not None and output.resolve() == csv_path.resolve():
        raise typer.BadParameter("--output would overwrite the CSV being replayed")
    _check_output(output, "--output")
    settings = with_rules_file(get_settings(), rules)
    # Only the option warms up: a CG_JOB__DECIDE_FROM meant for the job must not cut a backtest short.
    ms = int(decide_from.replace(tzinfo=UTC).timestamp() * 1000) if decide_from is not None else 0
    settings = settings.model_copy(update={"job": settings.job.model_copy(update={"decide_from": ms})})
    local = LocalModel.load(model) if model else LocalModel.from_settings(settings)
    scorer = Scorer(settings, predictor=LocalPredictor(local))
    history = observe_all(csv_transactions(csv_path), settings, scorer=scorer)
    if history.items and (line := rejected_line(history)):  # as evaluate and train say it (all rejected: an error)
        typer.echo(line)
    if line := relabelled_line(history):
        typer.echo(line)
    decisions = backtest_rows(history, scorer)
    if not decisions:
        raise CheckoutGuardError(_no_decisions(csv_path, history, scorer.stats.observed_only["warm_up"]))
    in_training = training_flags(decisions, local.trained_ids())
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
                "in_training",
            ]
        )
        for n, d in enumerate(decisions):
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
                    "" if in_training is None else int(in_training[n]),
                ]
            )
        for ident, reason in history.rejected:
            w.writerow([ident, "", "", "", "REJECTED", "", reason, "", "", ""])
    metrics = backtest_metrics(decisions, in_training)
    typer.echo(
        f"model {local.version}, rules {scorer.rule_set.version}: {len(decisions)} decisions, "
        f"{len(history.rejected)} rejected, {history.duplicates} duplicates -> {output}"
        + (
            f"; {warmed} earlier events only built state (warm-up)"
            if (warmed := scorer.stats.observed_only["warm_up"])
            else ""
        )
    )
    typer.echo(json.dumps(json_safe(metrics), indent=2))
    if in_training is not None:
        if seen := metrics["in_training"].get("rows", 0):
            typer.echo(
                f"note: {seen} labelled rows are the model's training rows (in sample, optimistic); "
                "their out-of-fold figures are in the model's evaluation report (metrics.txt)"
            )
        if metrics["unseen"].get("rows", 0):
            typer.echo(format_unseen(metrics))
            if "calibration" in metrics["unseen"]:
                typer.echo(
                    format_calibration(metrics["unseen"]["calibration"], "the labelled rows the model never saw")
                )
    elif (local.meta.get("data") or {}).get("sha256") == file_sha256(csv_path):
        typer.echo(
            "note: this CSV is the model's training data, so its labelled rows are in sample; "
            "the out-of-fold figures are in the model's evaluation report (metrics.txt)"
        )
    else:
        typer.echo(
            "note: this model did not record its training rows; any labelled row of this CSV that it was "
            "trained on is in sample"
        )


def main() -> None:
    """The commands, with a bad file, folder or artifact answered by one line and exit 1 (not a traceback)."""
    from infra.cli import run_tool

    run_tool(app)


if __name__ == "__main__":
    main()
