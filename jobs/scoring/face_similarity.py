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
"""Values in one network's face descriptor (dlib's ResNet, SFace)."""
EMBEDDING_LENGTHS = {"dlib": DESCRIPTOR_LEN, "sface": DESCRIPTOR_LEN, "fused3": 768}
"""Values in one embedding of each embedder a watchlist can hold (``CG_FACES__EMBEDDER``): ``fused3`` is three
networks' features, weighted and concatenated (:mod:`jobs.faces.engine`)."""
LENGTHS = frozenset(EMBEDDING_LENGTHS.values())
FUSED3_PARTS = (("dlib", 128), ("sface", 128), ("faceplugin", 512))
"""The networks in a ``fused3`` embedding, in order, and their features' lengths."""
FUSED3_SLICES = tuple(
    (name, slice(sum(n for _, n in FUSED3_PARTS[:i]), sum(n for _, n in FUSED3_PARTS[: i + 1])))
    for i, (name, _) in enumerate(FUSED3_PARTS)
)
FUSED3_SCALE = 0.01541
"""``c`` in :data:`FUSED3_WEIGHTS`: puts the three networks' operating point at the target FMR on the 0-100 scale's
``match_threshold`` (as :data:`jobs.faces.engine.SFACE_SCALE` does for SFace), so one threshold means one FMR."""
FUSED3_SIGMA = {"dlib": 0.09295, "sface": 0.0372, "faceplugin": 0.03983}
"""Spread (standard deviation) of each network's distances between strangers: the 2,006,788 impostor pairs of
``python -m jobs.faces evaluate --embedder fused3`` (dlib and SFace in int8, as ``fused3`` runs them; SFace's and
FacePlugin's features at norm ``SFACE_SCALE``)."""
FUSED3_WEIGHTS = {name: FUSED3_SCALE / sigma for name, sigma in FUSED3_SIGMA.items()}
"""What each network's features are multiplied by in a ``fused3`` embedding: ``c / sigma``. The distance of two
embeddings (:func:`distance`) is the sum of the three networks' Euclidean distances between those weighted parts,
``c * sum(d_i / sigma_i)``: each network's distance in units of its spread between strangers, so no network
dominates by its scale. It ranks pairs as the mean of the three standardised similarities does, the fusion
``evaluate`` cross-validates (``fuse_scores``, with the sigmas taken from the other folds' people only); a plain
Euclidean distance of the concatenations (``sqrt(sum(...))``) was measured too and found ~0.001 TMR worse."""
PREFILTER_SIMILARITY = 46.34
"""The watchlist searches ``fused3`` embeddings in two steps: enrolled faces whose SFace features alone score at least
this (SFace's similarity, in int8 as ``fused3`` runs it, at FMR 0.01 on the evaluation's strangers), then the fused
distance on those only. The
first step reads 128 values per enrolled face instead of 768: the search costs ~1.5x a 128-value one, not ~6x. Few true
matches fall below it (``evaluate`` reports the fusion with this step, its cut chosen per fold)."""
PREFILTER_FMR = 0.01
"""The FMR at which :data:`PREFILTER_SIMILARITY` was chosen (``evaluate`` chooses it per fold at this rate)."""
MAX_NORM = 100.0
"""Largest Euclidean norm accepted: dlib's descriptors are near 1. Far larger finite values would overflow
float32 in the watchlist's squared norms (inf - inf = NaN, the everyone-matches case again)."""


def distance_to_similarity(distance: float | np.ndarray) -> float | np.ndarray:
    """The documented mapping: ``100 * (1 - d / 1.2)`` clipped to 0..100."""
    return np.clip(100.0 * (1.0 - np.asarray(distance) / DISTANCE_AT_ZERO), 0.0, 100.0)


def similarity_to_distance(similarity: float) -> float:
    return DISTANCE_AT_ZERO * (1.0 - similarity / 100.0)


def distance(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Distance of embeddings (rows of 2-d arrays, pairwise by broadcasting): Euclidean for one network's, the sum of
    the networks' Euclidean distances for ``fused3``'s (768 values; :data:`FUSED3_WEIGHTS`)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.shape[-1] != EMBEDDING_LENGTHS["fused3"]:
        return np.linalg.norm(diff, axis=-1)
    return sum(np.linalg.norm(diff[..., part], axis=-1) for _, part in FUSED3_SLICES)


def similarity(a: ArrayLike, b: ArrayLike) -> float:
    """0..100, higher = more alike (see ``distance_to_similarity``); 0 when either side is not finite.

    Raises ``ValueError`` for embeddings of different lengths (numpy would broadcast a 1-value one).
    """
    va, vb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if va.shape != vb.shape:
        raise ValueError(f"embeddings of different lengths: {va.size} and {vb.size}")
    d = float(distance(va, vb))
    if not math.isfinite(d):
        return 0.0
    return float(distance_to_similarity(d))


def embedding_problem(values: object, length: int | None = None) -> str | None:
    """Why ``values`` is not a usable face embedding, or ``None`` if it is one (cheap: every observation
    is checked on the job's hot path): ``length`` values, or, without one, the length of some embedder's."""
    if isinstance(values, str | bytes):
        return f"an embedding must be a list of numbers, got {type(values).__name__}"
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return "an embedding must be a list of numbers"
    if arr.ndim != 1 or (arr.size != length if length is not None else arr.size not in LENGTHS):
        got = arr.size if arr.ndim == 1 else f"shape {arr.shape}"
        want = length if length is not None else " or ".join(str(n) for n in sorted(LENGTHS))
        return f"an embedding has {want} values, got {got}"
    squared = float(arr @ arr)  # NaN and inf carry through: one cheap test for the usual case
    if math.isfinite(squared) and squared <= MAX_NORM * MAX_NORM:
        return None
    if not np.isfinite(arr).all():
        return "an embedding holds NaN or infinite values"
    return f"an embedding's norm is beyond {MAX_NORM:g}"


def check_embedding(values: T, field: str = "embedding", length: int | None = None) -> T:
    """``values`` if it is a usable embedding (``length`` finite numbers, by default one of :data:`LENGTHS`; norm
    at most :data:`MAX_NORM`); else :class:`InvalidRecord` ``invalid_embedding`` naming ``field``."""
    problem = embedding_problem(values, length)
    if problem is not None:
        raise InvalidRecord("invalid_embedding", f"{field}: {problem}")
    return values
