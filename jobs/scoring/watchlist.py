"""The in-memory watchlist: every enrolled embedding of every subject, searched in one numpy pass (``fused3``: two).

Pure (no Kafka): the Flink job keeps one as broadcast state fed from the compacted WATCHLIST topic
(``upsert`` per entry, ``remove`` per tombstone); the watchlist service and the CLI use it too.
A subject may have several embeddings (templates: the enrolment photo, then confirmed sightings), at most
``cases.max_templates`` of them, the newest kept (an entry lists them oldest first); a probe matches the subject of
its nearest embedding.

An entry past its expiry (``expires_at``; an entry written before it, ``flagged_at`` + ``faces.watchlist_expire_days``)
matches nothing at a time given to :meth:`Watchlist.search` / :meth:`Watchlist.category` (the job gives the event
time): the watchlist service tombstones it then, but while that service is down the entry stays here and a lapsed
listing raised alerts.

Entries and probes are checked (:func:`check_entry`, :func:`jobs.scoring.face_similarity.check_embedding`):
a NaN in one enrolled embedding made every probe "match" it. An entry with no embeddings is valid and
matches nothing here (a subject known only to another backend, e.g. a Rekognition collection).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.settings import CasesSettings, FaceSettings, Settings
from jobs.scoring.face_similarity import (
    EMBEDDING_LENGTHS,
    FUSED3_SLICES,
    FUSED3_WEIGHTS,
    PREFILTER_SIMILARITY,
    check_embedding,
    distance,
    distance_to_similarity,
    similarity_to_distance,
)
from jobs.scoring.int8_rows import Int8Rows
from schemas.errors import InvalidRecord
from schemas.identifiers import check

log = logging.getLogger("checkout_guard.watchlist")

CATEGORIES = frozenset({"SUSPECT", "VIP"})
INT8_FROM_ROWS = 4096
"""Enrolled embeddings (templates, not subjects) from which a search first reads an int8 copy of its matrix
(:class:`Int8Rows`, then float32 on the rows it leaves): below, the float32 matrix (2 MB at 128 values) stays in
cache and one product is as fast."""


def check_entry(entry: Any, length: int | None = None) -> dict[str, Any]:
    """``entry`` if it is a usable WatchlistEntry dict: a valid subject id, a known category and only
    usable embeddings (possibly none; ``length`` values each, when given); else :class:`InvalidRecord`
    (``invalid_id``/``invalid_embedding``/...)."""
    if not isinstance(entry, dict):
        raise InvalidRecord("invalid_entry", f"a watchlist entry must be a record, got {type(entry).__name__}")
    check(entry.get("subject_id"), "subject_id")
    if entry.get("category") not in CATEGORIES:
        raise InvalidRecord("invalid_entry", f"category must be one of {sorted(CATEGORIES)}")
    embeddings = entry.get("embeddings")
    if not isinstance(embeddings, list | tuple | np.ndarray):
        raise InvalidRecord("invalid_embedding", "embeddings must be a list of embeddings")
    for i, embedding in enumerate(embeddings):
        check_embedding(embedding, f"embeddings[{i}]", length)
    return entry


def prefilter(embedder: str) -> tuple[int, int, float] | None:
    """Where a two-step search looks first (:data:`jobs.scoring.face_similarity.PREFILTER_SIMILARITY`): the first
    and end index of the SFace features in a ``fused3`` embedding, and the largest distance there that can still be
    a match; ``None`` for the single-network embedders (one step)."""
    if embedder != "fused3":
        return None
    part = dict(FUSED3_SLICES)["sface"]
    return part.start, part.stop, FUSED3_WEIGHTS["sface"] * similarity_to_distance(PREFILTER_SIMILARITY)


def _rest_parts(steps: tuple[int, int, float] | None) -> list[slice]:
    """The other networks' columns in a two-step watchlist's second matrix (the first step's columns taken out)."""
    if steps is None:
        return []
    start, end, _ = steps
    width = end - start
    parts = [part for _, part in FUSED3_SLICES if part.stop <= start or part.start >= end]
    return [part if part.stop <= start else slice(part.start - width, part.stop - width) for part in parts]


@dataclass(frozen=True)
class Match:
    subject_id: str
    category: str
    similarity: float


class Watchlist:
    """Subjects by id; the search matrix is rebuilt lazily after changes, under a lock.

    Searches after a change pay one rebuild (O(total embeddings)); steady-state searches are one
    matrix-vector product: ``|e - p|^2 = |e|^2 - 2 e.p + |p|^2`` with ``|e|^2`` precomputed. ``fused3``
    embeddings (768 values) search in two steps (:func:`prefilter`): 768 values per enrolled face would cost
    six times the memory traffic of 128, and that traffic is the search's cost. From ``int8_from_rows`` enrolled
    embeddings the product reads an int8 copy (:class:`jobs.scoring.int8_rows.Int8Rows`, a quarter of the bytes) and
    measures again in float32 only the rows that can be within the radius that matters (the first step's, or the match
    threshold's): no row within it is missed, and the winner's distance is measured in float64 either way.

    It holds embeddings of the configured embedder only (``faces.embedder``; their length is checked).
    """

    def __init__(
        self,
        settings: FaceSettings | Settings | None = None,
        *,
        threshold: float | None = None,
        max_templates: int | None = None,
        int8_from_rows: int | None = None,
    ) -> None:
        faces = settings.faces if isinstance(settings, Settings) else settings or FaceSettings()
        if faces.embedder not in EMBEDDING_LENGTHS:
            raise ValueError(f"CG_FACES__EMBEDDER={faces.embedder} is for `jobs.faces evaluate` only: no watchlist")
        self._configure(faces.embedder)
        self.threshold = threshold if threshold is not None else faces.match_threshold
        cases = settings.cases if isinstance(settings, Settings) else CasesSettings()
        self.max_templates = max(1, max_templates if max_templates is not None else cases.max_templates)
        """Templates kept per subject (the newest, the last ones of an entry's list)."""
        self.int8_from_rows = INT8_FROM_ROWS if int8_from_rows is None else int8_from_rows
        """Enrolled embeddings from which searches read an int8 copy first (default :data:`INT8_FROM_ROWS`)."""
        self.lifetime_ms = int(faces.watchlist_expire_days * 86_400_000)
        """An entry's life without ``expires_at`` (written before it), from ``flagged_at``: the service's."""
        self._reset()

    def _configure(self, embedder: str) -> None:
        """What the embedder decides: the embeddings' length and, for ``fused3``, the two-step search's columns."""
        self.embedder = embedder
        self.dim = EMBEDDING_LENGTHS[embedder]
        self._prefilter = prefilter(embedder)
        self._rest_parts = _rest_parts(self._prefilter)

    def _reset(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float32)
        self._first = self._matrix  # the prefilter's columns, contiguous (two-step search only)
        self._first_norms = self._norms
        self._part_norms = np.zeros((0, len(self._rest_parts)), dtype=np.float32)
        self._buf = np.zeros(0, dtype=np.float32)
        self._owners: list[str] = []
        self._until = np.zeros(0, dtype=np.float64)  # per row: when its subject's entry expires
        self._earliest = math.inf  # the earliest of them
        self._coarse: Int8Rows | None = None
        self._dirty = False

    def upsert(self, entry: dict[str, Any]) -> None:
        """Add or replace a subject from a WatchlistEntry dict (Avro shape); an unusable one raises
        :class:`InvalidRecord` and changes nothing (see :func:`check_entry`)."""
        check_entry(entry, self.dim)
        embeddings = np.asarray(entry["embeddings"], dtype=np.float32).reshape(-1, self.dim)[-self.max_templates :]
        with self._lock:
            self._entries[entry["subject_id"]] = {
                "category": entry["category"],
                "embeddings": embeddings,
                "until": self._expiry(entry),
                "entry": {k: v for k, v in entry.items() if k != "embeddings"},
            }
            self._dirty = True

    def _expiry(self, entry: dict[str, Any]) -> float:
        """When ``entry`` lapses (:meth:`schemas.records.WatchlistEntry.expiry`, as the watchlist service reckons it);
        never for a dict with neither time (an entry made in code)."""
        if entry.get("expires_at") is not None:
            return float(entry["expires_at"])
        flagged = entry.get("flagged_at")
        return float(flagged + self.lifetime_ms) if flagged is not None else math.inf

    def remove(self, subject_id: str) -> None:
        """Forget a subject (tombstone); unknown ids are ignored so replays are harmless."""
        with self._lock:
            if self._entries.pop(subject_id, None) is not None:
                self._dirty = True

    def search(self, embedding: Sequence[float] | np.ndarray, at_ms: int | None = None) -> Match | None:
        """Best-matching subject at or above the threshold, else ``None``; a probe that is not a usable
        descriptor raises :class:`InvalidRecord` ``invalid_embedding``. ``at_ms``: when the face was seen; the
        entries expired by then are left out (``None``: none is)."""
        probe = np.asarray(check_embedding(embedding, "probe", self.dim), dtype=np.float32).reshape(self.dim)
        with self._lock:
            if self._dirty:
                self._rebuild()
            if not self._owners:
                return None
            alive = None if at_ms is None or at_ms < self._earliest else self._until > at_ms
            if alive is not None and not alive.any():
                return None
            nearest = self._nearest(probe, alive)
            if nearest is None:
                return None
            i, d = nearest
            if not math.isfinite(d):  # never a match from arithmetic gone wrong (checked input cannot)
                return None
            sim = float(distance_to_similarity(d))
            if sim < self.threshold:
                return None
            subject = self._owners[i]
            return Match(subject, self._entries[subject]["category"], round(sim, 2))

    def _nearest(self, probe: np.ndarray, alive: np.ndarray | None = None) -> tuple[int, float] | None:
        """Row and distance (:func:`jobs.scoring.face_similarity.distance`; NaN when the arithmetic went wrong) of the
        enrolled embedding nearest ``probe`` among the rows ``alive`` marks (all when ``None``; at least one when
        given); ``None`` when the two-step search's first step leaves none, or (int8 copy) when none can be within the
        match threshold. The distance is the winner's, measured again in float64 (:meth:`_exact`)."""
        buf = self._buf  # in place: the matrix-vector product is the cost, temporaries add ~20 %
        coarse = self._coarse
        if self._prefilter is None:
            if coarse is not None and self.threshold > 0:  # at a threshold <= 0 every row is within reach
                radius = similarity_to_distance(self.threshold)
                rows = coarse.candidates(probe, radius * radius)
                if alive is not None:
                    rows = rows[alive[rows]]
                if rows.size == 0:
                    return None
                less = self._norms[rows] - 2.0 * (self._matrix[rows] @ probe)  # |e - p|^2 less |p|^2
                i = int(rows[int(np.argmin(less))])
            else:
                np.dot(self._matrix, probe, out=buf)
                buf *= -2.0
                buf += self._norms
                if alive is not None:
                    buf[~alive] = np.inf
                i = int(np.argmin(buf))
            return i, self._exact(i, probe)
        start, end, radius = self._prefilter
        first = probe[start:end]
        first_squared = float(first @ first)
        cut = radius * radius - first_squared
        if coarse is not None:
            maybe = coarse.candidates(first, radius * radius)
            less = self._first_norms[maybe] - 2.0 * (self._first[maybe] @ first)
            inside = less <= cut
            rows, less = maybe[inside], less[inside]
        else:
            np.dot(self._first, first, out=buf)
            buf *= -2.0
            buf += self._first_norms  # squared distance on the SFace features, less |first|^2
            rows = np.flatnonzero(buf <= cut)
            less = buf[rows]
        if alive is not None:
            keep = alive[rows]
            rows, less = rows[keep], less[keep]
        if rows.size == 0:
            return None
        rest = np.concatenate((probe[:start], probe[end:]))  # the other networks' features: _matrix's columns
        near = self._matrix[rows]
        dist = np.sqrt(np.maximum(less + first_squared, 0.0))
        for j, part in enumerate(self._rest_parts):  # the fused distance: the sum of the networks' distances
            q = rest[part]
            squared = self._part_norms[rows, j] - 2.0 * (near[:, part] @ q) + float(q @ q)
            dist += np.sqrt(np.maximum(squared, 0.0))
        i = int(rows[int(np.argmin(dist))])
        return i, self._exact(i, probe)

    def _exact(self, i: int, probe: np.ndarray) -> float:
        """Row ``i``'s distance to ``probe`` in float64 (:func:`jobs.scoring.face_similarity.distance`; NaN for a
        non-finite row): the similarity reported does not depend on the float32 sums that ranked the rows, which
        differ in the last bits between a product over the whole matrix and one over the rows the int8 copy left
        (an identical face is 100, not 99.97)."""
        row = self._matrix[i]
        if self._prefilter is not None:
            start = self._prefilter[0]
            row = np.concatenate((row[:start], self._first[i], row[start:]))
        return float(distance(row, probe))

    def get(self, subject_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._entries.get(subject_id)
            return {**item["entry"], "embeddings": item["embeddings"].tolist()} if item else None

    def category(self, subject_id: str, at_ms: int | None = None) -> str | None:
        """The category of an enrolled subject, ``None`` for one not (or no longer) on the watchlist, or whose entry
        had expired at ``at_ms`` when given: what a match the face stage found in the Rekognition collection is named
        by."""
        with self._lock:
            item = self._entries.get(subject_id)
            if item is None or (at_ms is not None and item["until"] <= at_ms):
                return None
            return str(item["category"])

    def subjects(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, subject_id: object) -> bool:
        return subject_id in self._entries

    def _rebuild(self) -> None:
        owners: list[str] = []
        blocks: list[np.ndarray] = []
        until: list[float] = []
        for subject, item in self._entries.items():
            owners.extend([subject] * len(item["embeddings"]))
            blocks.append(item["embeddings"])
            until.extend([item["until"]] * len(item["embeddings"]))
        matrix = np.vstack(blocks) if blocks else np.zeros((0, self.dim), np.float32)
        if self._prefilter is not None:  # two steps: the first step's columns, and the rest in _matrix
            start, end, _ = self._prefilter
            self._first = np.ascontiguousarray(matrix[:, start:end])
            self._first_norms = np.einsum("ij,ij->i", self._first, self._first)
            matrix = np.delete(matrix, np.s_[start:end], axis=1)
        self._matrix = np.ascontiguousarray(matrix)
        if self._rest_parts:  # two steps: per row, each other network's squared norm
            self._part_norms = np.stack(
                [np.einsum("ij,ij->i", self._matrix[:, part], self._matrix[:, part]) for part in self._rest_parts],
                axis=1,
            )
        else:  # one step: the rows' squared norms
            self._norms = np.einsum("ij,ij->i", self._matrix, self._matrix)
        self._coarse = None
        if len(owners) >= self.int8_from_rows:
            first, norms = (self._matrix, self._norms) if self._prefilter is None else (self._first, self._first_norms)
            self._coarse = Int8Rows(first, norms)
        self._buf = np.empty(len(owners), dtype=np.float32)
        self._until = np.asarray(until, dtype=np.float64)
        self._earliest = min(until, default=math.inf)
        self._owners = owners
        self._dirty = False

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Flink may serialise operator state): the lock is recreated on load."""
        with self._lock:
            entries = [{**i["entry"], "embeddings": i["embeddings"]} for i in self._entries.values()]
        return {
            "threshold": self.threshold,
            "max_templates": self.max_templates,
            "int8_from_rows": None if self.int8_from_rows == INT8_FROM_ROWS else self.int8_from_rows,
            "embedder": self.embedder,
            "lifetime_ms": self.lifetime_ms,
            "entries": entries,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.threshold = state["threshold"]
        self.max_templates = state.get("max_templates", CasesSettings().max_templates)
        stored = state.get("int8_from_rows")  # None: the default of the code that loads it
        self.int8_from_rows = INT8_FROM_ROWS if stored is None else stored
        self._configure(state.get("embedder", "sface"))  # pickled before other lengths: 128-value embeddings
        self.lifetime_ms = state.get("lifetime_ms", int(FaceSettings().watchlist_expire_days * 86_400_000))
        self._reset()
        for entry in state["entries"]:
            try:
                self.upsert(entry)
            except InvalidRecord as err:  # pickled before entries were checked: leave it out, go on
                log.warning("dropping unusable watchlist entry on load: %s", err.reason)
