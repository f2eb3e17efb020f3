"""The face join: each transaction waits for its checkout face observation, up to a deadline.

Pure (no Flink): the job feeds it transactions, face observations and the clock, persists the
entries it reports as changed, and scores whatever it releases. Both orders happen: the face stage
usually answers after the transaction arrives (it needs the snapshot), but a slow scoring job can
see the observation first, so early observations are kept for a while too.

A face that comes after its transaction was decided without it (the deadline passed: real footage can take
minutes to be stored) is not parked as an early face for a transaction that will not come again: the
transaction is remembered for ``early_ttl_ms`` after its decision (trimmed to what an alert names), and the
face is released with it as a late result (:attr:`Ready.late`): no second decision, but a watch-list match
still raises its alert and a sale still keeps its buyer's face.

Watchlist matching happens here, not in the face stage, because the watchlist is the job's
broadcast state: a ``forget`` reaches every decision at once, and the face stage stays stateless. With the
Rekognition backend the face stage searches the collection and reports the subject (``matcher: rekognition``);
the job still names the match from its watchlist (the category; a subject it does not hold, e.g. forgotten, is
no match), and does not search the embedding itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.scoring.face_similarity import check_embedding
from jobs.scoring.rules import FaceResult
from jobs.scoring.validation import check_size
from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.identifiers import check, check_name, check_serial
from schemas.records import LOCAL_MATCHER, REKOGNITION_MATCHER

Envelope = tuple[dict[str, Any], dict[str, float], int]
PENDING, EARLY_FACES, DECIDED = "pending", "early_faces", "decided_without_face"
LATE_FIELDS = (
    "transaction_id",
    "original_transaction_id",
    "event_time",
    "store_id",
    "lane_id",
    "kind",
    "amount",
    "currency",
)
"""What a transaction decided without its face keeps for a late one: its alert's fields and its receipt key."""
_FACE_CODEC = codec("FaceObservation")
Write = tuple[str, str, Any]


class WatchlistLike(Protocol):
    def search(self, embedding: Sequence[float]) -> Any: ...

    def category(self, subject_id: str) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Seen:
    """What the camera gave for one transaction: the result, and the embedding for face-vs-face checks."""

    face: FaceResult
    embedding: tuple[float, ...] | None
    image_ref: str | None
    observation_id: str
    arrived_ms: int


@dataclass(frozen=True, slots=True)
class Ready:
    env: Envelope
    seen: Seen
    waited_ms: int | None = None
    """How long the transaction waited in the join for its face (0: the face came first); ``None``: no join,
    or unknown (restored from an older checkpoint), or a late face."""
    late: bool = False
    """The face came after the transaction was decided without it: not to be decided again (``env`` holds
    only :data:`LATE_FIELDS`)."""


TRIGGERS = ("CHECKOUT", "ENTRANCE", "COMMAND")
"""What made the face stage look (the schema's ``trigger``)."""


def check_observation(obs: dict[str, Any], length: int | None = None) -> dict[str, Any]:
    """A decoded FaceObservation the job can use, or :class:`InvalidRecord`: its embedding, when it has
    one, is a usable descriptor (``invalid_embedding``), its ids are ids (``invalid_id``: the transaction
    id is a state key, the rest go into alerts and links) and its trigger is known. An empty embedding
    means none, as ``null`` does. ``length``: the configured embedder's (an embedding of another one matches
    nothing here)."""
    if obs.get("embedding"):
        check_embedding(obs["embedding"], "embedding", length)
    check(obs["observation_id"], "observation_id")
    check_serial(obs["camera_serial"], "camera_serial")
    check_name(obs["store_id"], "store_id")
    if obs.get("lane_id"):  # it goes into alerts (a mail's Subject) as the store does
        check_name(obs["lane_id"], "lane_id")
    for field in ("transaction_id", "subject_id"):
        if obs.get(field):
            check(obs[field], field)
    if obs["trigger"] not in TRIGGERS:
        raise InvalidRecord("invalid_field", f"trigger must be one of {', '.join(TRIGGERS)}")
    if obs.get("matcher") not in (None, REKOGNITION_MATCHER):
        raise InvalidRecord("invalid_field", f"matcher must be {REKOGNITION_MATCHER} or empty")
    sim = obs.get("similarity")
    if sim is not None and not (isinstance(sim, float | int) and 0.0 <= sim <= 100.0):  # NaN fails too
        raise InvalidRecord("invalid_field", "similarity must be within 0-100")
    return obs


def decode_observation(value: bytes | None, max_bytes: int, length: int | None = None) -> dict[str, Any]:
    """A face observation record's bytes as a checked observation, or :class:`InvalidRecord` (oversized,
    ``not_avro`` for anything undecodable, or what :func:`check_observation` finds)."""
    check_size(value, max_bytes)
    try:
        obs = _FACE_CODEC.decode(value or b"")
    except InvalidRecord as err:  # any undecodable observation is a dead letter
        raise InvalidRecord("not_avro", f"face observation: {err}") from None
    return check_observation(obs, length)


def observation_result(obs: dict[str, Any], watchlist: WatchlistLike | None) -> FaceResult:
    """A face observation as the decision sees it: the face stage's status, upgraded by a watchlist match. A face
    the stage searched in Rekognition (``matcher``) is taken as the stage found it: :func:`rekognition_result`."""
    status = obs["status"]
    if obs.get("matcher") == REKOGNITION_MATCHER:
        return rekognition_result(obs, watchlist)
    if status == "NO_MATCH" and obs.get("embedding") and watchlist is not None:
        match = watchlist.search(obs["embedding"])
        if match is not None:
            sim = round(float(match.similarity), 2)
            return FaceResult("MATCHED", match.subject_id, match.category, sim, LOCAL_MATCHER)
    return FaceResult(status)


def rekognition_result(obs: dict[str, Any], watchlist: WatchlistLike | None) -> FaceResult:
    """The face stage's Rekognition search as the match, never the job's own search of the embedding: ``MATCHED``
    with the subject, its category from the watchlist and Rekognition's similarity; a subject the watchlist does
    not hold (forgotten or expired, its collection faces not deleted yet) is ``NO_MATCH``, as is a match without
    a subject. ``NO_MATCH``, ``NO_FACE`` and ``UNAVAILABLE`` (the search failed) stay as they are."""
    status, subject = obs["status"], obs.get("subject_id")
    if status != "MATCHED":
        return FaceResult(status)
    category = watchlist.category(subject) if subject and watchlist is not None else None
    if category is None:
        return FaceResult("NO_MATCH")
    return FaceResult("MATCHED", subject, category, round(float(obs.get("similarity") or 0.0), 2), REKOGNITION_MATCHER)


def seen_from(obs: dict[str, Any], face: FaceResult, now_ms: int) -> Seen:
    emb = obs.get("embedding")
    return Seen(face, tuple(emb) if emb else None, obs.get("image_ref"), obs["observation_id"], now_ms)


def unavailable(reason: str, now_ms: int) -> Seen:
    return Seen(FaceResult("UNAVAILABLE"), None, None, reason, now_ms)


NOT_OF_THE_SALE = "snapshot-of-now"
"""Why a transaction has no face although its observation came: the camera had no footage of the sale."""


def checkout_seen(obs: dict[str, Any], face: FaceResult, now_ms: int) -> Seen:
    """What a checkout observation gives its transaction. A picture of "now" (``snapshot_of_now``: the camera
    had no footage of the sale) shows whoever stood at the lane when it was asked for, not the buyer: the
    transaction gets no face from it (``UNAVAILABLE``; the observation's reason says why), so it is neither
    matched as the buyer, kept as the sale's buyer face nor compared with a return's."""
    if obs.get("snapshot_of_now"):
        return unavailable(NOT_OF_THE_SALE, now_ms)
    return seen_from(obs, face, now_ms)


class FaceJoin:
    """Pending transactions by id (with their deadline) and observations that came first."""

    def __init__(self, deadline_ms: int, early_ttl_ms: int) -> None:
        self.deadline_ms = deadline_ms
        self.early_ttl_ms = early_ttl_ms
        self.pending: dict[str, tuple[Envelope, int]] = {}
        self.early: dict[str, Seen] = {}
        self.decided: dict[str, tuple[Envelope, int]] = {}
        """Transactions decided at their deadline without a face, trimmed, with when they are forgotten."""

    @property
    def enabled(self) -> bool:
        return self.deadline_ms > 0

    def restore(
        self,
        pending: dict[str, tuple[Envelope, int]],
        early: dict[str, Seen],
        decided: dict[str, tuple[Envelope, int]] | None = None,
    ) -> None:
        self.pending, self.early, self.decided = dict(pending), dict(early), dict(decided or {})

    def on_transaction(self, env: Envelope, now_ms: int) -> tuple[Ready | None, list[Write]]:
        """Released at once when the face is already known (or the join is off), else held."""
        tx_id = env[0]["transaction_id"]
        if not self.enabled:
            return Ready(env, unavailable("face-join-off", now_ms)), []
        seen = self.early.pop(tx_id, None)
        if seen is not None:
            return Ready(env, seen, 0), [(EARLY_FACES, tx_id, None)]
        entry = (env, now_ms + self.deadline_ms)
        self.pending[tx_id] = entry
        return None, [(PENDING, tx_id, entry)]

    def on_observation(self, tx_id: str, seen: Seen) -> tuple[Ready | None, list[Write]]:
        entry = self.pending.pop(tx_id, None)
        if entry is not None:
            return Ready(entry[0], seen, self._waited(entry[1], seen.arrived_ms)), [(PENDING, tx_id, None)]
        if not self.enabled:
            return None, []
        decided = self.decided.pop(tx_id, None)
        if decided is not None:  # after the deadline: a late result, not an early face
            return Ready(decided[0], seen, None, late=True), [(DECIDED, tx_id, None)]
        self.early[tx_id] = seen
        return None, [(EARLY_FACES, tx_id, seen)]

    def due(self, now_ms: int) -> tuple[list[Ready], list[Write]]:
        """Transactions whose deadline passed go ahead with ``face: UNAVAILABLE`` (and are remembered for a late
        face for ``early_ttl_ms``); stale early faces and remembered transactions go."""
        ready: list[Ready] = []
        writes: list[Write] = []
        for tx_id, (env, deadline) in list(self.pending.items()):
            if deadline <= now_ms:
                del self.pending[tx_id]
                ready.append(Ready(env, unavailable("face-deadline", now_ms), self._waited(deadline, now_ms)))
                writes.append((PENDING, tx_id, None))
                remembered = (_trimmed(env), now_ms + self.early_ttl_ms)
                self.decided[tx_id] = remembered
                writes.append((DECIDED, tx_id, remembered))
        for tx_id, seen in list(self.early.items()):
            if seen.arrived_ms + self.early_ttl_ms <= now_ms:
                del self.early[tx_id]
                writes.append((EARLY_FACES, tx_id, None))
        for tx_id, (_, until) in list(self.decided.items()):
            if until <= now_ms:
                del self.decided[tx_id]
                writes.append((DECIDED, tx_id, None))
        return ready, writes

    def _waited(self, deadline: int, released_ms: int) -> int:
        """From when the transaction was held (its deadline less the wait allowed) to its release."""
        return max(0, released_ms - (deadline - self.deadline_ms))

    def next_deadline(self) -> int | None:
        return min((d for _, d in self.pending.values()), default=None)


def _trimmed(env: Envelope) -> Envelope:
    """A decided transaction as a late face needs it: its alert's fields and receipt key, nothing else (it is
    kept for ``early_ttl_ms`` after every deadline release)."""
    tx = env[0]
    return {k: tx.get(k) for k in LATE_FIELDS}, {}, env[2]
