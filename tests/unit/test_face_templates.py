"""A watch-list subject holds at most ``cases.max_templates`` templates, the newest ones."""

from __future__ import annotations

import pickle

import numpy as np

from infra.settings import CasesSettings, Settings
from jobs.scoring.watchlist import Watchlist
from tests.builders import FACE_LEN


def _entry(vectors: np.ndarray) -> dict:
    return {"subject_id": "s-1", "category": "SUSPECT", "embeddings": vectors.tolist()}


def _templates(n: int) -> np.ndarray:
    """``n`` far-apart embeddings (one axis each): template i matches only a probe near it."""
    out = np.zeros((n, FACE_LEN), dtype=np.float32)
    out[np.arange(n), np.arange(n)] = 0.6
    return out


def test_a_subject_keeps_only_its_newest_templates_up_to_the_cap():
    watch = Watchlist(threshold=90.0, max_templates=3)
    vectors = _templates(5)
    watch.upsert(_entry(vectors))
    assert len(watch.get("s-1")["embeddings"]) == 3
    assert watch.search(vectors[0]) is None and watch.search(vectors[1]) is None  # the two oldest are gone
    for v in vectors[2:]:
        assert watch.search(v).subject_id == "s-1"


def test_the_cap_comes_from_the_cases_settings_and_survives_pickling():
    settings = Settings().model_copy(update={"cases": CasesSettings(max_templates=2)})
    watch = Watchlist(settings)
    assert watch.max_templates == 2
    assert Watchlist().max_templates == CasesSettings().max_templates
    watch.upsert(_entry(_templates(4)))
    restored = pickle.loads(pickle.dumps(watch))
    assert restored.max_templates == 2 and len(restored.get("s-1")["embeddings"]) == 2
