"""Honest match-rate figures: thresholds chosen on some identities, reported on others (pure numpy + PIL).

A face match can get a shopper stopped, so the threshold must predict the field: it is chosen, per
identity-disjoint fold, on the impostor scores of the *other* folds' identities at the target false-match
rate, and each fold's genuine and impostor pairs are scored only with the threshold it had no part in.
Pairs of two renderings of the same source photo are left out (they are the same picture, not the same
person seen twice). Intervals: Wilson (pairs taken as independent, which flatters) and a bootstrap over
identities (resampling people, which pairs of one person share): report the wider.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from jobs.scoring.face_similarity import DISTANCE_AT_ZERO, PREFILTER_FMR

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (exact-ish at 0 and n, unlike the normal interval)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def threshold_at_fmr(impostor: np.ndarray, target_fmr: float) -> float:
    """Lowest threshold (0.01 steps) at which at most ``target_fmr`` of ``impostor`` scores reach it."""
    if impostor.size == 0:
        return 0.0
    allowed = math.floor(target_fmr * impostor.size)
    ranked = np.sort(impostor)[::-1]
    if allowed >= ranked.size:
        return 0.0
    t = math.ceil(float(ranked[allowed]) * 100 + 1e-9) / 100  # strictly above the first score not allowed
    return round(t if t > ranked[allowed] else t + 0.01, 2)


def tmr_at_fmr(genuine: np.ndarray, impostor: np.ndarray, fmr: float) -> tuple[float, float]:
    """(TMR, threshold) at the threshold :func:`threshold_at_fmr` picks on these very impostors (descriptive)."""
    t = threshold_at_fmr(impostor, fmr)
    return (float((genuine >= t).mean()) if genuine.size else 0.0), t


def identity_folds(identities: list[str], k: int, seed: int = 14) -> dict[str, int]:
    """Identity -> fold (0..k-1), shuffled with a fixed seed, sizes differing by at most one."""
    names = sorted(set(identities))
    order = np.random.default_rng(seed).permutation(len(names))
    return {names[i]: rank % k for rank, i in enumerate(order)}


@dataclass(frozen=True)
class Pairs:
    """All usable pairs of a set of embeddings: similarity, both identities' indices, genuine flag."""

    score: np.ndarray
    id_a: np.ndarray
    id_b: np.ndarray
    genuine: np.ndarray
    left: np.ndarray
    right: np.ndarray
    """Item indices of each pair (to break figures down by set or condition)."""


def all_pairs(sims: np.ndarray, identity: np.ndarray, source: np.ndarray) -> Pairs:
    """Every pair i < j whose items come from different source photos; ``identity``/``source`` are int arrays."""
    i, j = np.triu_indices(len(identity), k=1)
    keep = source[i] != source[j]
    i, j = i[keep], j[keep]
    return Pairs(sims[i, j], identity[i], identity[j], identity[i] == identity[j], i, j)


@dataclass(frozen=True)
class CrossValidated:
    thresholds: list[float]
    """One per fold, each chosen without that fold's identities."""
    accepted: np.ndarray
    """Per pair: score >= the threshold of the fold it is reported in."""
    fold: np.ndarray
    """Per pair: the fold it is reported in (the lower fold of its two identities)."""


MIN_SET_FALSE_MATCHES = 10
"""A set's own impostors set a bound on the threshold only where they allow this many false matches at the
target rate (20,000 pairs at 0.0005): fewer, and its threshold is one pair's score, not an estimate."""


def cross_validate(
    pairs: Pairs, fold_of_identity: np.ndarray, k: int, target_fmr: float, pair_set: np.ndarray | None = None
) -> CrossValidated:
    """Per fold f: threshold at ``target_fmr`` on impostor pairs with neither identity in f; applied to the pairs
    reported in f (genuine pairs of f's identities, impostor pairs whose lower fold is f).

    ``pair_set`` (per pair: the index of the set both its photos come from, -1 across sets): the threshold must
    also hold ``target_fmr`` within every set large enough to say (:data:`MIN_SET_FALSE_MATCHES`), so one
    population whose strangers look alike to the embedder cannot hide behind the pooled rate of the others."""
    return cross_validate_fused(pairs, [pairs.score], fold_of_identity, k, target_fmr, pair_set)


def fold_threshold(score: np.ndarray, choose: np.ndarray, target_fmr: float, pair_set: np.ndarray | None) -> float:
    """Threshold at ``target_fmr`` on the ``choose`` impostor pairs, pooled and within every set large enough."""
    t = threshold_at_fmr(score[choose], target_fmr)
    if pair_set is not None:
        for s in np.unique(pair_set[pair_set >= 0]):
            own = choose & (pair_set == s)
            if int(own.sum()) * target_fmr >= MIN_SET_FALSE_MATCHES:
                t = max(t, threshold_at_fmr(score[own], target_fmr))
    return t


def fuse_scores(parts: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """Score-level fusion of several embedders' scores of the same pairs: each part standardised by the mean and
    spread of its scores on the ``reference`` pairs (impostors: strangers' scores are what a threshold is set
    against), averaged, and put back on the first part's scale (so a fused threshold reads like its similarity).
    One part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    z = sum((p - p[reference].mean()) / max(float(p[reference].std()), 1e-9) for p in parts) / len(parts)
    return z * float(parts[0][reference].std()) + float(parts[0][reference].mean())


def concatenate_scores(parts: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """The fusion one embedding can carry: each network's features weighted by ``1 / sigma`` (the spread of its
    distances on the ``reference`` pairs, strangers) and concatenated, so that a plain Euclidean distance, as the
    watchlist computes, gives ``sqrt(sum((d_i / sigma_i) ** 2))``; mapped back onto the first part's scale like
    :func:`fuse_scores`. ``parts`` are similarities; their distances come back through the 0..100 mapping (exact
    below distance 1.2: SFace-scaled features never reach it, dlib's strangers rarely). One part: as it is."""
    if len(parts) == 1:
        return parts[0]
    dists = [DISTANCE_AT_ZERO * (1.0 - p / 100.0) for p in parts]
    fused = -np.sqrt(sum((d / max(float(d[reference].std()), 1e-9)) ** 2 for d in dists))
    z = (fused - fused[reference].mean()) / max(float(fused[reference].std()), 1e-9)
    return z * float(parts[0][reference].std()) + float(parts[0][reference].mean())


def prefiltered_scores(parts: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """:func:`fuse_scores` as the watchlist searches ``fused3`` embeddings (the sum of the networks' standardised
    distances ranks pairs as the mean of their standardised similarities does; :data:`~jobs.scoring.face_similarity.
    PREFILTER_SIMILARITY`): pairs whose first part (SFace) scores below its own threshold at
    :data:`~jobs.scoring.face_similarity.PREFILTER_FMR` on the ``reference`` pairs never match (they score below
    every other pair)."""
    fused = fuse_scores(parts, reference)
    cut = threshold_at_fmr(parts[0][reference], PREFILTER_FMR)
    return np.where(parts[0] >= cut, fused, float(fused.min()) - 100.0)


Fusion = Callable[[list[np.ndarray], np.ndarray], np.ndarray]


def cross_validate_fused(
    pairs: Pairs,
    parts: list[np.ndarray],
    fold_of_identity: np.ndarray,
    k: int,
    target_fmr: float,
    pair_set: np.ndarray | None = None,
    fuse: Fusion = fuse_scores,
    skip: int | None = None,
) -> CrossValidated:
    """:func:`cross_validate` of the ``fuse`` (:func:`fuse_scores`, :func:`concatenate_scores`) of ``parts`` (per
    pair, one score array per embedder): each fold's scaling, like its threshold, comes only from the impostor pairs
    of the other folds' identities. ``thresholds`` are on the first part's scale, as fused in each fold. ``skip``: a
    fold with no pairs here (left out by :func:`cross_validate_selected`), given threshold 0."""
    fa, fb = fold_of_identity[pairs.id_a], fold_of_identity[pairs.id_b]
    report_fold = np.minimum(fa, fb)
    accepted = np.zeros(pairs.score.size, dtype=bool)
    thresholds = []
    for f in range(k):
        if f == skip:
            thresholds.append(0.0)
            continue
        choose = ~pairs.genuine & (fa != f) & (fb != f)
        score = fuse(parts, choose)
        t = fold_threshold(score, choose, target_fmr, pair_set)
        thresholds.append(t)
        mine = report_fold == f
        accepted[mine] = score[mine] >= t
    return CrossValidated(thresholds, accepted, report_fold)


SELECTION_FMR_SLACK = 2.0
"""In :func:`cross_validate_selected`, a candidate whose thresholds let more than this many times the target rate of
unseen strangers match is not chosen for its match rate (a threshold that does not hold on new people buys its
matches with false ones); the held-out rate of a few false matches is noisy, hence not 1."""

Candidate = tuple[list[np.ndarray], Fusion]
"""One way of scoring pairs that was tried: the networks' scores per pair, and how they are fused."""


def cross_validate_selected(
    pairs: Pairs,
    candidates: dict[str, Candidate],
    fold_of_identity: np.ndarray,
    k: int,
    target_fmr: float,
    pair_set: np.ndarray | None = None,
) -> tuple[CrossValidated, list[str]]:
    """Nested cross-validation of *choosing* among ``candidates`` (the networks and fusions tried), so that the
    choice, like the threshold, is made without the people it is reported on.

    For each fold f: every candidate is cross-validated (:func:`cross_validate_fused`) on the pairs of the other
    folds' people alone, over those k-1 folds; of those whose held-out false-match rate there stays within
    :data:`SELECTION_FMR_SLACK` times ``target_fmr``, the one with the highest true-match rate (ties: the earlier in
    ``candidates``; none within: the lowest false-match rate) judges f's pairs, with its scaling and threshold from
    the other folds' strangers, exactly as :func:`cross_validate_fused` judges them. Returns the pooled outcome and
    the candidate chosen per fold."""
    fa, fb = fold_of_identity[pairs.id_a], fold_of_identity[pairs.id_b]
    chosen = []
    for f in range(k):
        keep = (fa != f) & (fb != f)
        inner = Pairs(*(getattr(pairs, name)[keep] for name in ("score", "id_a", "id_b", "genuine", "left", "right")))
        inner_set = None if pair_set is None else pair_set[keep]
        rates = {}
        for name, (parts, fuse) in candidates.items():
            cv = cross_validate_fused(
                inner, [p[keep] for p in parts], fold_of_identity, k, target_fmr, inner_set, fuse, skip=f
            )
            g = inner.genuine
            rates[name] = (
                float(cv.accepted[g].mean()) if g.any() else 0.0,
                float(cv.accepted[~g].mean()) if (~g).any() else 0.0,
            )
        held = [name for name, (_, fmr) in rates.items() if fmr <= SELECTION_FMR_SLACK * target_fmr]
        # max and min keep the first of equals
        best = max(held, key=lambda n: rates[n][0]) if held else min(rates, key=lambda n: rates[n][1])
        chosen.append(best)
    # each chosen candidate judged on all pairs once; fold f takes its chosen one's outcome
    outer = {}
    for name in dict.fromkeys(chosen):
        parts, fuse = candidates[name]
        outer[name] = cross_validate_fused(pairs, parts, fold_of_identity, k, target_fmr, pair_set, fuse)
    report_fold = np.minimum(fa, fb)
    accepted = np.zeros(pairs.score.size, dtype=bool)
    for f, name in enumerate(chosen):
        mine = report_fold == f
        accepted[mine] = outer[name].accepted[mine]
    return CrossValidated([outer[name].thresholds[f] for f, name in enumerate(chosen)], accepted, report_fold), chosen


def bootstrap_rates(
    pairs: Pairs, accepted: np.ndarray, n_identities: int, reps: int = 300, seed: int = 14
) -> dict[str, tuple[float, float]]:
    """95 % intervals of TMR and FMR when the people are resampled with replacement (a pair weighs the product
    of its identities' draw counts)."""
    rng = np.random.default_rng(seed)
    tmr, fmr = [], []
    g, acc = pairs.genuine, accepted.astype(np.float64)
    for _ in range(reps):
        w = rng.multinomial(n_identities, np.full(n_identities, 1.0 / n_identities)).astype(np.float64)
        pw = w[pairs.id_a] * w[pairs.id_b]
        # a genuine pair weighs its person's count (not its square): one draw of a person brings their pairs once
        pw[g] = w[pairs.id_a[g]]
        gw, iw = pw[g].sum(), pw[~g].sum()
        if gw > 0:
            tmr.append(float((pw[g] * acc[g]).sum() / gw))
        if iw > 0:
            fmr.append(float((pw[~g] * acc[~g]).sum() / iw))
    return {"tmr": _interval95(tmr, 4), "fmr": _interval95(fmr, 5)}


def _interval95(rates: list[float], digits: int) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of ``rates``, rounded; (0, 1) (nothing known) when there are none."""
    if not rates:
        return (0.0, 1.0)
    low, high = np.percentile(rates, [2.5, 97.5])
    return (round(float(low), digits), round(float(high), digits))


@dataclass(frozen=True)
class Condition:
    """How a camera sees a face: its size in a 640x480 frame, blur, JPEG quality, lighting."""

    name: str
    face_px: int | None
    """Face width in the frame (``None``: the photo as it is, no frame)."""
    blur: float = 0.0
    """Gaussian radius in frame pixels."""
    jpeg: int = 85
    gain: float = 1.0
    """Brightness factor (< 1 darker)."""
    contrast: float = 1.0


CONDITIONS = (
    Condition("photo", None),
    Condition("far_56px", 56),
    Condition("mid_96px", 96),
    Condition("near_160px", 160),
    Condition("blur_1.2", 96, blur=1.2),
    Condition("jpeg_30", 96, jpeg=30),
    Condition("dark_0.45", 96, gain=0.45),
    Condition("washed_out", 96, gain=1.35, contrast=0.6),
)


def render_frame(photo: Image.Image, face_width: float, cond: Condition, background: tuple[int, int, int]) -> bytes:
    """The photo scaled so its face is ``cond.face_px`` wide, centred in a 640x480 frame, then blurred, relit and
    JPEG-encoded as a camera snapshot would be. ``face_width`` is the face's width in the photo."""
    img = photo.convert("RGB")
    if cond.face_px is not None:
        s = cond.face_px / max(face_width, 1.0)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)
        frame = Image.new("RGB", (640, 480), background)
        frame.paste(img, ((640 - img.width) // 2, (480 - img.height) // 2))
        img = frame
    if cond.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(cond.blur))
    if cond.contrast != 1.0:
        img = ImageEnhance.Contrast(img).enhance(cond.contrast)
    if cond.gain != 1.0:
        img = ImageEnhance.Brightness(img).enhance(cond.gain)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=cond.jpeg)
    return out.getvalue()


def quality_offset(quality: np.ndarray | float, slope: float, knee: float) -> np.ndarray:
    """Similarity points a probe of ``quality`` (0..1; the weaker of the gate's quality and the detector's
    score) must score above the threshold: ``slope * (knee - quality)`` below ``knee``, nothing above it.
    A poor probe (small, blurred, turned, doubtful detection) must look more alike to match."""
    return slope * np.maximum(0.0, knee - np.asarray(quality, dtype=np.float64))


QUALITY_GRID = tuple((slope, knee) for slope in (0.0, 5.0, 10.0, 20.0, 40.0) for knee in (0.6, 0.75, 0.9, 1.0))
"""(slope, knee) candidates the cross-validation chooses from per fold; (0, *) is the plain threshold."""


@dataclass(frozen=True)
class QualityCrossValidated(CrossValidated):
    params: list[tuple[float, float]]
    """Per fold: the (slope, knee) chosen on the other folds' identities."""


def cross_validate_quality(
    pairs: Pairs,
    pair_quality: np.ndarray,
    fold_of_identity: np.ndarray,
    k: int,
    target_fmr: float,
    grid: tuple[tuple[float, float], ...] = QUALITY_GRID,
    min_gain: float = 0.002,
) -> QualityCrossValidated:
    """:func:`cross_validate` with a quality-aware threshold: per fold, every (slope, knee) of ``grid`` gets its
    threshold at ``target_fmr`` on the training identities' impostor pairs (scores less the offset); the one with
    the highest training TMR (ties: the smaller offset) is applied to the fold, an offset only when it beats the
    plain threshold's training TMR by ``min_gain`` (a grid search finds small gains in noise alone).
    ``pair_quality``: per pair, the quality of its poorer side (the probe)."""
    fa, fb = fold_of_identity[pairs.id_a], fold_of_identity[pairs.id_b]
    report_fold = np.minimum(fa, fb)
    accepted = np.zeros(pairs.score.size, dtype=bool)
    thresholds, params = [], []
    for f in range(k):
        train = (fa != f) & (fb != f)
        gen_train, imp_train = train & pairs.genuine, train & ~pairs.genuine
        best: tuple[float, float, float, float] | None = None  # (tmr, -slope, threshold, knee)
        for slope, knee in grid:
            adjusted = pairs.score - quality_offset(pair_quality, slope, knee)
            t = threshold_at_fmr(adjusted[imp_train], target_fmr)
            tmr = float((adjusted[gen_train] >= t).mean()) if gen_train.any() else 0.0
            if slope > 0 and best is not None and best[1] == 0 and tmr < best[0] + min_gain:
                continue
            if best is None or (tmr, -slope) > best[:2]:
                best = (tmr, -slope, t, knee)
        assert best is not None
        slope, t, knee = -best[1], best[2], best[3]
        thresholds.append(t)
        params.append((slope, knee))
        mine = report_fold == f
        accepted[mine] = (pairs.score - quality_offset(pair_quality, slope, knee))[mine] >= t
    return QualityCrossValidated(thresholds, accepted, report_fold, params)


def template_scores(
    sims: np.ndarray, quality: np.ndarray, templates: np.ndarray, probes: np.ndarray, fusion: str
) -> np.ndarray:
    """Probe-vs-subject scores: ``templates`` is (subjects, n) item indices of each subject's enrolled templates
    (-1: none), ``probes`` item indices. ``fusion``: ``max`` (nearest template, the watchlist's rule) or
    ``quality_mean`` (mean of the template similarities weighted by template quality)."""
    valid = templates >= 0
    s = sims[np.ix_(probes, np.where(valid, templates, 0).ravel())].reshape(len(probes), *templates.shape)
    if fusion == "max":
        return np.where(valid[None], s, -np.inf).max(axis=2)
    w = np.where(valid, quality[np.where(valid, templates, 0)], 0.0)[None]
    return (s * w).sum(axis=2) / np.maximum(w.sum(axis=2), 1e-12)


def template_pairs(
    sims: np.ndarray,
    identity: np.ndarray,
    source: np.ndarray,
    quality: np.ndarray,
    enrolment: np.ndarray,
    n: int,
    fusion: str,
    enrol: int = 3,
    seed: int = 14,
) -> Pairs:
    """Probe-vs-subject pairs for a watchlist holding ``n`` templates per subject. Subjects: identities with more
    than ``enrol`` source photos; each enrols the ``enrolment`` item (the photo as taken) of the first ``n`` of
    ``enrol`` seeded-random source photos, so the probes (every item of the subjects' other photos, in every
    condition) are the same whatever ``n``. ``id_a``: the probe's identity, ``id_b``: the subject's."""
    rng = np.random.default_rng(seed)
    subjects, rows, probe_list = [], [], []
    for ident in np.unique(identity):
        srcs = np.unique(source[identity == ident])
        if srcs.size <= enrol:
            continue
        chosen = rng.permutation(srcs)[:enrol]
        picks = []
        for src in chosen[:n]:
            cand = np.where((source == src) & enrolment)[0]
            if cand.size:
                picks.append(int(cand[0]))
        if not picks:
            continue
        subjects.append(int(ident))
        rows.append(picks + [-1] * (n - len(picks)))
        probe_list.extend(np.where((identity == ident) & ~np.isin(source, chosen))[0].tolist())
    templates = np.array(rows, dtype=np.int64).reshape(len(rows), n)
    probes = np.array(probe_list, dtype=np.int64)
    scores = template_scores(sims, quality, templates, probes, fusion)
    id_a = np.repeat(identity[probes], len(subjects))
    id_b = np.tile(np.array(subjects), len(probes))
    left = np.repeat(probes, len(subjects))
    right = np.tile(templates[:, 0], len(probes))
    return Pairs(scores.ravel(), id_a, id_b, id_a == id_b, left, right)
