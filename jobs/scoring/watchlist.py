"""The in-memory watchlist: every enrolled embedding of every subject, searched in one numpy pass.

Pure (no Kafka): the Flink job keeps one as broadcast state fed from the compacted WATCHLIST topic
(``upsert`` per entry, ``remove`` per tombstone); the watchlist service and the CLI use it too.
A subject may have several embeddings; a probe matches the subject of its nearest embedding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infra.settings import FaceSettings, Settings
from jobs.scoring.face_similarity import distance_to_similarity

DIM = 128


@dataclass(frozen=True)
class Match:
    subject_id: str
    category: str
    similarity: float


class Watchlist:
    """Subjects by id; the search matrix is rebuilt lazily after changes, under a lock.

    Searches after a change pay one rebuild (O(total embeddings)); steady-state searches are one
    matrix-vector product: ``|e - p|^2 = |e|^2 - 2 e.p + |p|^2`` with ``|e|^2`` precomputed.
    """

    def __init__(self, settings: FaceSettings | Settings | None = None, *, threshold: float | None = None) -> None:
        faces = settings.faces if isinstance(settings, Settings) else settings or FaceSettings()
        self.threshold = threshold if threshold is not None else faces.match_threshold
        self._reset()

    def _reset(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.RLock()
        self._matrix = np.zeros((0, DIM), dtype=np.float32)
        self._norms = np.zeros(0, dtype=np.float32)
        self._buf = np.zeros(0, dtype=np.float32)
        self._owners: list[str] = []
        self._dirty = False

    def upsert(self, entry: dict[str, Any]) -> None:
        """Add or replace a subject from a WatchlistEntry dict (Avro shape)."""
        embeddings = np.asarray(entry["embeddings"], dtype=np.float32).reshape(-1, DIM)
        with self._lock:
            self._entries[entry["subject_id"]] = {
                "category": entry["category"],
                "embeddings": embeddings,
                "entry": {k: v for k, v in entry.items() if k != "embeddings"},
            }
            self._dirty = True

    def remove(self, subject_id: str) -> None:
        """Forget a subject (tombstone); unknown ids are ignored so replays are harmless."""
        with self._lock:
            if self._entries.pop(subject_id, None) is not None:
                self._dirty = True

    def search(self, embedding: Sequence[float]) -> Match | None:
        """Best-matching subject at or above the threshold, else ``None``."""
        probe = np.asarray(embedding, dtype=np.float32).reshape(DIM)
        with self._lock:
            if self._dirty:
                self._rebuild()
            if not self._owners:
                return None
            buf = self._buf  # in place: the matrix-vector product is the cost, temporaries add ~20 %
            np.dot(self._matrix, probe, out=buf)
            buf *= -2.0
            buf += self._norms
            i = int(np.argmin(buf))
            sim = float(distance_to_similarity(float(np.sqrt(max(0.0, float(buf[i]) + float(probe @ probe))))))
            if sim < self.threshold:
                return None
            subject = self._owners[i]
            return Match(subject, self._entries[subject]["category"], round(sim, 2))

    def get(self, subject_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self._entries.get(subject_id)
            return {**item["entry"], "embeddings": item["embeddings"].tolist()} if item else None

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
        for subject, item in self._entries.items():
            owners.extend([subject] * len(item["embeddings"]))
            blocks.append(item["embeddings"])
        self._matrix = np.ascontiguousarray(np.vstack(blocks)) if blocks else np.zeros((0, DIM), np.float32)
        self._norms = np.einsum("ij,ij->i", self._matrix, self._matrix)
        self._buf = np.empty(len(owners), dtype=np.float32)
        self._owners = owners
        self._dirty = False

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (Flink may serialise operator state): the lock is recreated on load."""
        with self._lock:
            entries = [{**i["entry"], "embeddings": i["embeddings"]} for i in self._entries.values()]
        return {"threshold": self.threshold, "entries": entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.threshold = state["threshold"]
        self._reset()
        for entry in state["entries"]:
            self.upsert(entry)
