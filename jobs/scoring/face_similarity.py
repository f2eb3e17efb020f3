"""The 0-100 face similarity scale, in numpy only.

Kept apart from the engine (dlib) so that whatever compares embeddings -- the watchlist in the Flink
job, the buyer-face check, the local Rekognition stand-in -- needs no detector to load.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

DISTANCE_AT_ZERO = 1.2
"""dlib distance that maps to similarity 0; 0.6 (LFW operating point) maps to 50."""


def distance_to_similarity(distance: float | np.ndarray) -> float | np.ndarray:
    """The documented mapping: ``100 * (1 - d / 1.2)`` clipped to 0..100."""
    return np.clip(100.0 * (1.0 - np.asarray(distance) / DISTANCE_AT_ZERO), 0.0, 100.0)


def similarity_to_distance(similarity: float) -> float:
    return DISTANCE_AT_ZERO * (1.0 - similarity / 100.0)


def similarity(a: ArrayLike, b: ArrayLike) -> float:
    """0..100, higher = more alike (see ``distance_to_similarity``)."""
    d = float(np.linalg.norm(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)))
    return float(distance_to_similarity(d))
