"""Decisions: indicators + model score + face result -> approve / review / block, with reasons.

Seed 001's scheme: weighted indicators add up to a 0-100 risk; block at >= ``block_at`` (85),
review at >= ``review_at``. The reasons are the indicators that contributed, heaviest first, so an
analyst (and the alert e-mail) can say *why*. The rule set carries a version that is stamped on
every decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from infra.settings import RulesSettings

DEFAULT_WEIGHTS: dict[str, int] = {
    "return_exceeds_sale": 60,
    "return_unknown_receipt": 45,
    "customer_mismatch": 40,
    "velocity_exceeded": 40,
    "return_without_receipt": 35,
    "amount_above_norm": 30,
    "suspicious_timing": 25,
    "no_photo_verification": 20,
    "high_value_item": 15,
    "cross_store_return": 15,
    "store_return_burst": 15,
    "new_store_for_customer": 5,
}
"""Points per indicator that fired (value 1.0). Numeric indicators (velocity, z-score) only inform."""

MODEL_BANDS: tuple[tuple[int, int], ...] = ((950, 60), (900, 45), (800, 25), (600, 10))
"""(model score at least, points): 900 ~ 2 % false-positive rate in Fraud Detector's calibration."""

WATCHLIST_SUSPECT_POINTS = 90


@dataclass(frozen=True)
class FaceResult:
    """What the face stage found for a transaction; ``UNAVAILABLE`` until that stage exists/answers."""

    status: str = "UNAVAILABLE"
    subject_id: str | None = None
    category: str | None = None
    similarity: float | None = None


@dataclass(frozen=True)
class ModelResult:
    score: int | None = None
    version: str | None = None
    time_ms: int = 0


@dataclass(frozen=True)
class RuleSet:
    version: str
    block_at: int
    review_at: int
    weights: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    @classmethod
    def from_settings(cls, rules: RulesSettings) -> RuleSet:
        return cls(version=rules.version, block_at=rules.block_at, review_at=rules.review_at)


@dataclass(frozen=True)
class Decision:
    outcome: str
    risk_score: int
    reasons: tuple[str, ...]


def decide(
    tx: dict[str, Any], indicators: dict[str, float], model: ModelResult, face: FaceResult, rules: RuleSet
) -> Decision:
    """Combine everything known about a transaction into one outcome with its reasons."""
    if tx["kind"] == "RETURN" and face.status in ("UNAVAILABLE", "NO_FACE"):
        indicators["no_photo_verification"] = 1.0
    points: list[tuple[int, str]] = []
    for name, value in indicators.items():
        weight = rules.weights.get(name)
        if weight and value >= 1.0:
            points.append((weight, name))
    if model.score is not None:
        for at_least, pts in MODEL_BANDS:
            if model.score >= at_least:
                points.append((pts, f"model_score>={at_least}"))
                break
    if face.status == "MATCHED" and face.category == "SUSPECT":
        points.append((WATCHLIST_SUSPECT_POINTS, "watchlist_suspect"))
    points.sort(key=lambda p: (-p[0], p[1]))
    risk = min(100, sum(p for p, _ in points))
    if risk >= rules.block_at:
        outcome = "BLOCK"
    elif risk >= rules.review_at:
        outcome = "REVIEW"
    else:
        outcome = "APPROVE"
    return Decision(outcome=outcome, risk_score=risk, reasons=tuple(name for _, name in points))
