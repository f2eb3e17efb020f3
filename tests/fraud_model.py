"""A small fraud model trained once per test session, through the real training code."""

from __future__ import annotations

from functools import lru_cache

from infra.settings import Settings
from jobs.model.fraud_model import LocalModel
from jobs.model.train import train_default

SMALL_HISTORY_ROWS = 8000


@lru_cache(maxsize=1)
def small_model() -> LocalModel:
    """The default model's recipe (seeded synthetic POS history) on fewer rows, so tests stay fast."""
    return train_default(Settings(), rows=SMALL_HISTORY_ROWS)
