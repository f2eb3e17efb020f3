"""A small fraud model trained once per test session, through the real training code."""

from __future__ import annotations

import os
from functools import lru_cache

from infra.settings import Settings
from jobs.model.fraud_model import LocalModel
from jobs.model.train import train_default

SMALL_HISTORY_ROWS = 8000


def clean_settings() -> Settings:
    """Settings with every default, whatever ``CG_*`` variables the environment (CI) holds."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("CG_")}
    try:
        return Settings()
    finally:
        os.environ.update(saved)


@lru_cache(maxsize=1)
def small_model() -> LocalModel:
    """The default model's recipe (seeded synthetic POS history) on fewer rows, so tests stay fast."""
    return train_default(clean_settings(), rows=SMALL_HISTORY_ROWS)


@lru_cache(maxsize=1)
def challenger_model() -> LocalModel:
    """A second, different model (other seed, fewer rows, the other learner: CatBoost): the challenger of
    the champion/challenger tests."""
    return train_default(clean_settings(), rows=4000, seed=99, learner="catboost")
