"""The local fraud model: feature vectors, a LightGBM booster and a Fraud Detector-style score.

Why these pieces:

* **Features** come from ``(tx, indicators)`` — the transaction dict and the indicators that
  :meth:`jobs.scoring.scorer.Scorer.observe` computed from the job's keyed state. Training builds them by
  running the very same ``observe`` over the history, so training and serving cannot drift.
  :data:`FEATURE_NAMES` is the one list of columns; the artifact records it and refuses to load
  against another list.
* **Score 0-1000 by false-positive rate**, as Amazon Fraud Detector does: a score ``s`` means "a
  fraction ``FPR(s)`` of legitimate transactions score at least this" (600 ~ 10 %, 900 ~ 2 %). The
  map from raw probability to score is monotone and piecewise linear through the anchor points of
  :data:`FPR_ANCHORS`, fitted on the legitimate rows of the (later, held-out) validation part and
  stored in the artifact. Rules then read score bands, whatever model is behind them.
* **Artifact**: one folder per version (``gbm-<date>-<hash8>``) with ``model.txt`` (LightGBM's
  text format) and ``model.json`` (feature names, calibration, metrics, training data hash, split),
  plus a ``CURRENT`` file naming the version in use. Written to a temp folder and renamed, so a
  reader never sees half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from infra.settings import Settings
from jobs.scoring.rules import ModelResult
from schemas.errors import CheckoutGuardError

Item = tuple[dict[str, Any], dict[str, float]]
NAN = float("nan")

INDICATOR_FEATURES: tuple[str, ...] = (
    "velocity",
    "velocity_exceeded",
    "amount_zscore",
    "amount_above_norm",
    "first_seen",
    "new_store_for_customer",
    "seconds_since_sale",
    "cross_store_return",
    "customer_mismatch",
    "suspicious_timing",
    "return_without_receipt",
    "return_unknown_receipt",
    "return_exceeds_sale",
    "store_returns_in_window",
    "store_return_burst",
    "high_value_item",
)
"""Indicators from the job's state, as model inputs (missing = NaN for numeric ones, else 0)."""
_NUMERIC_INDICATORS = frozenset({"velocity", "amount_zscore", "seconds_since_sale", "store_returns_in_window"})

CATEGORICAL_FEATURES: tuple[str, ...] = (
    "product_category",
    "currency",
    "payment_method",
    "billing_state",
    "billing_country",
    "card_bin_prefix",
    "email_domain",
    "ip_prefix",
    "user_agent_family",
)
"""Categoricals, hashed to stable integer codes (crc32) and handled by LightGBM's categorical splits."""

TX_FEATURES: tuple[str, ...] = (
    "amount_log",
    "item_count",
    "line_count",
    "max_unit_price_log",
    "is_return",
    "has_receipt_ref",
    "hour_utc",
    "day_of_week",
    "has_card",
    "has_email",
    "has_customer_id",
)

FEATURE_NAMES: tuple[str, ...] = TX_FEATURES + INDICATOR_FEATURES + CATEGORICAL_FEATURES
"""The model's columns, in order: defined here once; the artifact stores and checks them."""
CATEGORICAL_INDEX: tuple[int, ...] = tuple(FEATURE_NAMES.index(c) for c in CATEGORICAL_FEATURES)

FPR_ANCHORS: tuple[tuple[int, float], ...] = (
    (0, 1.0),
    (200, 0.6),
    (400, 0.3),
    (500, 0.2),
    (600, 0.10),
    (700, 0.06),
    (800, 0.04),
    (850, 0.03),
    (900, 0.02),
    (950, 0.01),
    (980, 0.005),
)
"""(score, false-positive rate on legitimate transactions at or above that score), Fraud Detector's
scale: 600 ~ 10 %, 900 ~ 2 %. Score 1000 is pinned to probability 1."""

_HASH_MOD = 1 << 20


def _cat(value: Any) -> float:
    if not value:
        return NAN
    return _code(value)


@lru_cache(maxsize=1 << 16)
def _code(value: str) -> float:
    """Stable across processes and runs (unlike ``hash``): the artifact's splits refer to these codes."""
    return float(zlib.crc32(value.strip().lower().encode("utf-8", "replace")) % _HASH_MOD)


_INDICATOR_DEFAULTS: tuple[float, ...] = tuple(
    NAN if name in _NUMERIC_INDICATORS else 0.0 for name in INDICATOR_FEATURES
)
_INDICATOR_COLUMN: dict[str, int] = {name: len(TX_FEATURES) + i for i, name in enumerate(INDICATOR_FEATURES)}


def feature_row(tx: dict[str, Any], ind: dict[str, float]) -> list[float]:
    """One transaction's feature vector, in :data:`FEATURE_NAMES` order.

    Written for speed (the job calls it for every transaction): one pass over the line items,
    cached category codes, no intermediate objects."""
    amount = float(tx["amount"])
    count, max_price = 0, -1.0
    items = tx.get("items") or ()
    for it in items:
        count += it["quantity"]
        if it["unit_price"] > max_price:
            max_price = it["unit_price"]
    if max_price < 0:
        max_price = amount
    event_s = tx["event_time"] // 1000
    get = tx.get
    email = get("customer_email") or ""
    ip = get("ip_address") or ""
    ua = get("user_agent") or ""
    card_bin = get("card_bin") or ""
    row = [
        math.log1p(amount),
        float(count),
        float(len(items)),
        math.log1p(max_price),
        1.0 if tx["kind"] == "RETURN" else 0.0,
        1.0 if get("original_transaction_id") else 0.0,
        float(event_s // 3600 % 24),
        float((event_s // 86400 + 3) % 7),  # 1970-01-01 was a Thursday: Monday = 0
        1.0 if (get("card_token") or card_bin) else 0.0,
        1.0 if email else 0.0,
        1.0 if get("customer_id") else 0.0,
    ]
    row += _INDICATOR_DEFAULTS
    for name, value in ind.items():  # a handful per transaction: cheaper than a pass over all columns
        column = _INDICATOR_COLUMN.get(name)
        if column is not None:
            row[column] = value
    row += [
        _cat(get("product_category") or (items[0]["category"] if items else None)),
        _cat(get("currency")),
        _cat(get("payment_method")),
        _cat(get("billing_state")),
        _cat(get("billing_country")),
        _cat(card_bin[:2]),
        _cat(email.partition("@")[2]),
        _cat(ip.partition(".")[0]),
        _cat(ua.partition("/")[0]),
    ]
    return row


def feature_matrix(items: Sequence[Item]) -> np.ndarray:
    """The batch as one float64 matrix (rows = transactions), ready for one vectorised predict."""
    if not items:
        return np.empty((0, len(FEATURE_NAMES)))
    return np.asarray([feature_row(tx, ind) for tx, ind in items], dtype=np.float64)


# --- calibration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Monotone piecewise-linear map raw probability -> score 0-1000 through FPR anchor points."""

    probs: tuple[float, ...]
    scores: tuple[float, ...]
    legit_rows: int = 0

    @classmethod
    def fit(cls, legit_probs: np.ndarray, anchors: Sequence[tuple[int, float]] = FPR_ANCHORS) -> Calibration:
        """Thresholds at which the legitimate rows' false-positive rate equals each anchor's."""
        legit = np.sort(np.asarray(legit_probs, dtype=np.float64))
        if legit.size == 0:
            raise ValueError("calibration needs legitimate rows")
        xs, ss = [], []
        for score, fpr in anchors:
            # the probability that a fraction ``fpr`` of legitimate rows reach or exceed
            xs.append(0.0 if fpr >= 1.0 else float(np.quantile(legit, 1.0 - fpr)))
            ss.append(float(score))
        xs.append(1.0)
        ss.append(1000.0)
        x = np.maximum.accumulate(np.asarray(xs))
        for i in range(1, len(x)):  # strictly increasing, so np.interp is a function
            if x[i] <= x[i - 1]:
                x[i] = np.nextafter(x[i - 1], 2.0)
        if x[-1] < 1.0:
            x[-1] = 1.0
        return cls(tuple(float(v) for v in x), tuple(ss), int(legit.size))

    def score(self, probs: np.ndarray) -> np.ndarray:
        return np.rint(np.interp(probs, self.probs, self.scores)).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "probs": list(self.probs),
            "scores": list(self.scores),
            "legit_rows": self.legit_rows,
            "anchors": [list(a) for a in FPR_ANCHORS],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(tuple(data["probs"]), tuple(data["scores"]), int(data.get("legit_rows", 0)))


# --- metrics ------------------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney ROC-AUC with tied scores counted half; NaN when one class is absent."""
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]  # average rank (1-based) over ties
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, n: int = 500, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of the ROC-AUC: with a handful of fraud rows the point value alone misleads."""
    y, s = np.asarray(labels), np.asarray(scores)
    if y.sum() == 0 or y.sum() == len(y):
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    n = n if len(y) <= 5000 else 100
    aucs = [roc_auc(y[i], s[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    lo, hi = np.nanpercentile(aucs, [2.5, 97.5])
    return [float(lo), float(hi)]


def classification_metrics(labels: np.ndarray, probs: np.ndarray, calibration: Calibration | None) -> dict[str, Any]:
    """ROC-AUC, TPR at 1/2/5 % FPR (with the score threshold that gives it), and the score table."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    legit, fraud = np.sort(p[y == 0])[::-1], p[y == 1]
    out: dict[str, Any] = {
        "rows": int(len(y)),
        "fraud": int(y.sum()),
        "legit": int(len(y) - y.sum()),
        "roc_auc": roc_auc(y, p),
        "roc_auc_ci95": bootstrap_auc_ci(y, p),
    }
    at_fpr = {}
    for fpr in (0.01, 0.02, 0.05):
        if legit.size == 0 or fraud.size == 0:
            continue
        k = int(math.floor(fpr * legit.size))  # at most k legitimate rows strictly above the threshold
        threshold = legit[k] if k < legit.size else -math.inf
        entry = {
            "tpr": float(np.mean(fraud > threshold)),
            "fpr": float(np.mean(legit > threshold)),
            "prob_threshold": float(threshold),
        }
        if calibration is not None and math.isfinite(threshold):
            entry["score_above"] = int(calibration.score(np.array([threshold]))[0])
        at_fpr[f"{fpr:.0%}"] = entry
    out["at_fpr"] = at_fpr
    if calibration is not None and legit.size and fraud.size:
        scores = calibration.score(p)
        out["by_score"] = {
            str(s): {"fpr": float(np.mean(scores[y == 0] >= s)), "tpr": float(np.mean(scores[y == 1] >= s))}
            for s in (500, 600, 700, 800, 850, 900, 950)
        }
    return out


# --- training and the artifact --------------------------------------------------------------


def lgb_params(rows: int, seed: int) -> dict[str, Any]:
    """Small trees for small data (a few hundred labelled rows overfit anything bigger)."""
    small = rows < 5000
    return {
        "objective": "binary",
        "learning_rate": 0.05 if small else 0.1,
        "num_leaves": 7 if small else 15,
        "min_data_in_leaf": 8 if small else 20,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "max_cat_to_onehot": 8,
        "min_data_per_group": 5 if small else 50,
        "cat_smooth": 10.0,
        "cat_l2": 10.0,
        "max_bin": 63 if small else 255,
        "verbose": -1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
    }


@dataclass
class TrainResult:
    model: LocalModel
    metrics: dict[str, Any]


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 7,
    rounds: int | None = None,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train on the earlier part, calibrate and measure on the later (validation) part.

    ``rounds`` defaults to 100 for small data (chosen by rolling-origin validation *inside* the
    training part of the Fraud Detector sample, never on the held-out rows) and 100 otherwise: the
    job scores every transaction with it, and tree count is what a prediction costs."""
    params = lgb_params(len(y_train), seed)
    rounds = rounds or 100
    data = lgb.Dataset(
        x_train,
        label=y_train,
        feature_name=list(FEATURE_NAMES),
        categorical_feature=list(CATEGORICAL_FEATURES),
        free_raw_data=False,
    )
    booster = lgb.train(params, data, num_boost_round=rounds)
    val_probs = booster.predict(x_val, num_threads=1)
    calibration = Calibration.fit(val_probs[np.asarray(y_val) == 0])
    metrics = {
        "validation": classification_metrics(y_val, val_probs, calibration),
        "train": classification_metrics(y_train, booster.predict(x_train, num_threads=1), calibration),
    }
    meta = {
        "feature_names": list(FEATURE_NAMES),
        "categorical": list(CATEGORICAL_FEATURES),
        "calibration": calibration.to_json(),
        "metrics": metrics,
        "params": params,
        "rounds": rounds,
        **(info or {}),
    }
    model_text = booster.model_to_string()
    digest = hashlib.sha256(model_text.encode() + json.dumps(meta.get("data", {}), sort_keys=True).encode())
    meta["version"] = f"gbm-{datetime.now(UTC):%Y%m%d}-{digest.hexdigest()[:8]}"
    meta["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return TrainResult(LocalModel(booster, meta), metrics)


class ModelArtifactError(CheckoutGuardError, RuntimeError):
    """No usable model artifact where one was expected."""


def artifact_root(settings: Settings) -> Path:
    return settings.model.artifact_dir or settings.stack_dir / "models"


class LocalModel:
    """A trained booster with its calibration: ``predict_batch`` scores a whole batch in one call."""

    def __init__(self, booster: lgb.Booster, meta: dict[str, Any], path: Path | None = None) -> None:
        if list(meta.get("feature_names", [])) != list(FEATURE_NAMES):
            raise ModelArtifactError(
                f"model {meta.get('version')} was trained on other features than this code computes; retrain it"
            )
        self.booster = booster
        self.meta = meta
        self.path = path
        self.version: str = meta["version"]
        self.calibration = Calibration.from_json(meta["calibration"])
        self.label = f"local:{self.version}"

    # scoring ---------------------------------------------------------------------------------
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.empty(0)
        return self.booster.predict(x, num_threads=1)

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.calibration.score(self.probabilities(x))

    def predict_batch(self, items: Sequence[Item], label: str | None = None) -> list[ModelResult]:
        if not items:
            return []
        t0 = time.perf_counter()
        scores = self.scores(feature_matrix(items))
        elapsed = int(round((time.perf_counter() - t0) * 1000))
        version = label or self.label
        shared: dict[int, ModelResult] = {}  # results are immutable: one object per distinct score
        out = []
        for s in scores.tolist():
            r = shared.get(s)
            if r is None:
                r = shared[s] = ModelResult(score=s, version=version, time_ms=elapsed)
            out.append(r)
        return out

    # persistence -----------------------------------------------------------------------------
    def save(self, root: Path, make_current: bool = True) -> Path:
        """Write ``root/<version>/`` atomically; point ``root/CURRENT`` at it."""
        root.mkdir(parents=True, exist_ok=True)
        final = root / self.version
        tmp = root / f".{self.version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "model.txt").write_text(self.booster.model_to_string())
        (tmp / "model.json").write_text(json.dumps(self.meta, indent=2, default=str))
        (tmp / "metrics.txt").write_text(format_metrics(self.meta) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if make_current:
            pointer = root / f".CURRENT.tmp-{os.getpid()}"
            pointer.write_text(self.version + "\n")
            os.replace(pointer, root / "CURRENT")
        self.path = final
        return final

    @classmethod
    def load(cls, path: Path) -> LocalModel:
        """``path`` is a version folder, or a models root whose ``CURRENT`` names one."""
        path = Path(path)
        if (path / "CURRENT").exists():
            path = path / (path / "CURRENT").read_text().strip()
        meta_file, model_file = path / "model.json", path / "model.txt"
        if not meta_file.exists() or not model_file.exists():
            raise ModelArtifactError(f"no model artifact at {path} (train one: make train / make train-default)")
        meta = json.loads(meta_file.read_text())
        booster = lgb.Booster(model_str=model_file.read_text())
        return cls(booster, meta, path)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalModel:
        root = artifact_root(settings)
        return cls.load(root / settings.model.artifact if settings.model.artifact else root)


def format_metrics(meta: dict[str, Any]) -> str:
    """The metrics report as text (printed by ``train``, written beside the artifact)."""
    lines = [f"model {meta.get('version')}  created {meta.get('created_at')}"]
    data = meta.get("data") or {}
    if data:
        lines.append(
            f"data: {data.get('source')}  sha256 {str(data.get('sha256'))[:16]}  rows {data.get('rows')}"
            f"  labelled {data.get('labelled')}"
        )
        lines.append(f"split: {data.get('split')}")
    for part in ("validation", "train"):
        m = (meta.get("metrics") or {}).get(part)
        if not m:
            continue
        lo, hi = m.get("roc_auc_ci95") or (float("nan"), float("nan"))
        lines.append(
            f"{part}: {m['rows']} rows ({m['fraud']} fraud)  ROC-AUC {m['roc_auc']:.3f}"
            f"  (95 % bootstrap CI {lo:.2f}-{hi:.2f})"
        )
        for fpr, e in m.get("at_fpr", {}).items():
            lines.append(
                f"  TPR at {fpr:>3} FPR: {e['tpr']:.3f}  (prob > {e['prob_threshold']:.4f}"
                + (f", score > {e['score_above']}" if "score_above" in e else "")
                + ")"
            )
        if part == "validation" and m.get("by_score"):
            lines.append("  score >= s   FPR     TPR")
            for s, e in m["by_score"].items():
                lines.append(f"  {s:>9}   {e['fpr']:.3f}   {e['tpr']:.3f}")
    return "\n".join(lines)


@dataclass
class Split:
    """Row indexes of a time-ordered split of the labelled rows."""

    train: list[int] = field(default_factory=list)
    validation: list[int] = field(default_factory=list)
    cut_time_ms: int = 0
