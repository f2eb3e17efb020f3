"""The 0-100 face similarity scale, and what a usable embedding is, in numpy only.

Kept apart from the engine (dlib) so that whatever compares embeddings -- the watchlist in the Flink
job, the buyer-face check, the local Rekognition stand-in -- needs no detector to load.

Embeddings arrive from Kafka (observations, watchlist entries), so they are checked where they are
decoded (:func:`check_embedding`): a wrong length made the watchlist raise inside the job, and a NaN
made every distance NaN, which the watchlist's ``max(0, d²)`` turned into distance 0, similarity 100:
everyone matched. :func:`similarity` still never reports a match for non-finite input.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike

from schemas.errors import InvalidRecord

T = TypeVar("T")

DISTANCE_AT_ZERO = 1.2
"""dlib distance that maps to similarity 0; 0.6 (LFW operating point) maps to 50."""
DESCRIPTOR_LEN = 128
"""Values in one face descriptor (dlib's ResNet embedding)."""
MAX_NORM = 100.0
"""Largest Euclidean norm accepted: dlib's descriptors are near 1. Far larger finite values would overflow
float32 in the watchlist's squared norms (inf - inf = NaN, the everyone-matches case again)."""


def distance_to_similarity(distance: float | np.ndarray) -> float | np.ndarray:
    """The documented mapping: ``100 * (1 - d / 1.2)`` clipped to 0..100."""
    return np.clip(100.0 * (1.0 - np.asarray(distance) / DISTANCE_AT_ZERO), 0.0, 100.0)


def similarity_to_distance(similarity: float) -> float:
    return DISTANCE_AT_ZERO * (1.0 - similarity / 100.0)


def similarity(a: ArrayLike, b: ArrayLike) -> float:
    """0..100, higher = more alike (see ``distance_to_similarity``); 0 when either side is not finite.

    Raises ``ValueError`` for embeddings of different lengths (numpy would broadcast a 1-value one).
    """
    va, vb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if va.shape != vb.shape:
        raise ValueError(f"embeddings of different lengths: {va.size} and {vb.size}")
    d = float(np.linalg.norm(va - vb))
    if not math.isfinite(d):
        return 0.0
    return float(distance_to_similarity(d))


def embedding_problem(values: object) -> str | None:
    """Why ``values`` is not a usable face descriptor, or ``None`` if it is one (cheap: every observation
    is checked on the job's hot path)."""
    if isinstance(values, str | bytes):
        return f"an embedding must be a list of numbers, got {type(values).__name__}"
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return "an embedding must be a list of numbers"
    if arr.shape != (DESCRIPTOR_LEN,):
        got = arr.size if arr.ndim == 1 else f"shape {arr.shape}"
        return f"an embedding has {DESCRIPTOR_LEN} values, got {got}"
    squared = float(arr @ arr)  # NaN and inf carry through: one cheap test for the usual case
    if math.isfinite(squared) and squared <= MAX_NORM * MAX_NORM:
        return None
    if not np.isfinite(arr).all():
        return "an embedding holds NaN or infinite values"
    return f"an embedding's norm is beyond {MAX_NORM:g}"


def check_embedding(values: T, field: str = "embedding") -> T:
    """``values`` if it is a usable descriptor (:data:`DESCRIPTOR_LEN` finite numbers, norm at most
    :data:`MAX_NORM`); else
    :class:`InvalidRecord` ``invalid_embedding`` naming ``field``."""
    problem = embedding_problem(values)
    if problem is not None:
        raise InvalidRecord("invalid_embedding", f"{field}: {problem}")
    return values
