"""The face join: each transaction waits for its checkout face observation, up to a deadline.

Pure (no Flink): the job feeds it transactions, face observations and the clock, persists the
entries it reports as changed, and scores whatever it releases. Both orders happen: the face stage
usually answers after the transaction arrives (it needs the snapshot), but a slow scoring job can
see the observation first, so early observations are kept for a while too.

A face that comes after its transaction was decided without it (the deadline passed: real footage can take
minutes to be stored) is not parked as an early face for a transaction that will not come again: the
transaction is remembered for as long as its face can still come (:func:`late_face_ttl_ms`, at most
``late_face_memory_max`` of them; trimmed to what an alert names), and the
face is released with it as a late result (:attr:`Ready.late`): no second decision, but a watch-list match
still raises its alert and a sale still keeps its buyer's face.

Watchlist matching happens here, not in the face stage, because the watchlist is the job's
broadcast state: a ``forget`` reaches every decision at once, and the face stage stays stateless. With the
Rekognition backend the face stage searches the collection and reports the subject (``matcher: rekognition``);
the job still names the match from its watchlist (the category; a subject it does not hold, e.g. forgotten, is
no match), and does not search the embedding itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

from infra.settings import FACE_DELIVERY_MARGIN_MS, FaceSettings, Settings
from jobs.scoring.face_similarity import check_embedding
from jobs.scoring.rules import FaceResult
from jobs.scoring.validation import MAX_FUTURE_SKEW_MS, check_event_time, check_size
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
    def search(self, embedding: Sequence[float], at_ms: int | None = None) -> Any: ...

    def category(self, subject_id: str, at_ms: int | None = None) -> str | None: ...


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

    def __setstate__(self, state: Sequence[Any]) -> None:
        """Unpickle, also a ``Ready`` pickled before a field existed: the partitioned layout's message to the decide
        step, held in a savepoint until the watermark passes it, of a job older than :attr:`waited_ms` or
        :attr:`late`. A slotted dataclass's pickle is its values in field order; a missing trailing one takes its
        default. Before, the slot stayed empty, and the decide step's batch failed on it (every transaction held
        there dead-lettered ``internal_error`` instead of decided)."""
        for i, item in enumerate(fields(self)):
            object.__setattr__(self, item.name, state[i] if i < len(state) else item.default)


TRIGGERS = ("CHECKOUT", "ENTRANCE", "COMMAND")
"""What made the face stage look (the schema's ``trigger``)."""


def check_observation(obs: dict[str, Any], length: int | None = None) -> dict[str, Any]:
    """A decoded FaceObservation the job can use, or :class:`InvalidRecord`: its embedding, when it has
    one, is a usable descriptor (``invalid_embedding``), its ids are ids (``invalid_id``: the transaction
    id is a state key, the rest go into alerts and links), its trigger is known and a ``MATCHED`` one says that
    Rekognition matched it (the stage's only matches: the job matches the others). An empty embedding
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
    if obs["status"] == "MATCHED" and obs.get("matcher") != REKOGNITION_MATCHER:
        # no face stage writes one (the job matches the others itself): taken, it raised a watch-list alert naming
        # no subject ("VIP None ..., similarity 0.0") and a decision MATCHED to nobody
        raise InvalidRecord("invalid_field", f"status MATCHED comes only with matcher {REKOGNITION_MATCHER}")
    sim = obs.get("similarity")
    if sim is not None and not (isinstance(sim, float | int) and 0.0 <= sim <= 100.0):  # NaN fails too
        raise InvalidRecord("invalid_field", "similarity must be within 0-100")
    return obs


def decode_observation(
    value: bytes | None,
    max_bytes: int,
    length: int | None = None,
    now_ms: int = 0,
    max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
) -> dict[str, Any]:
    """A face observation record's bytes as a checked observation, or :class:`InvalidRecord` (oversized,
    ``not_avro`` for anything undecodable, what :func:`check_observation` finds, or ``invalid_timestamp``: dated at
    or before 1970, or more than ``max_future_skew_ms`` after ``now_ms``, the job's clock, 0: no bound, as a
    transaction is; taken, its alert carried the time on and was dead-lettered downstream instead of it)."""
    check_size(value, max_bytes)
    try:
        obs = _FACE_CODEC.decode(value or b"")
    except InvalidRecord as err:  # any undecodable observation is a dead letter
        raise InvalidRecord("not_avro", f"face observation: {err}") from None
    check_observation(obs, length)
    check_event_time(obs["event_time"], now_ms, max_future_skew_ms)
    return obs


def match_threshold(faces: FaceSettings, matcher: str | None) -> float | None:
    """The similarity at or above which ``matcher`` takes a face for a match, on that engine's own 0-100 scale: the
    job's watchlist search (``local``: ``faces.match_threshold``) or the face stage's search of the Rekognition
    collection (``rekognition``: ``faces.rekognition_match_threshold``, the stage's setting); ``None`` for another. An
    alert gives it beside the similarity (``match_threshold``): 68.8 is a clear local match, 99.1 a bare Rekognition
    one."""
    if matcher == LOCAL_MATCHER:
        return faces.match_threshold
    if matcher == REKOGNITION_MATCHER:
        return faces.rekognition_match_threshold
    return None


def matched_observation(face: FaceResult, camera: Seen | None) -> str | None:
    """The face observation a ``MATCHED`` face was matched on (its ``observation_id``), for its alerts; ``None`` for
    any other face (an unavailable face's :class:`Seen` holds a reason there, not an id). After its subject is
    forgotten, the OpenSearch sink finds the sighting by it, also when its snapshot could not be stored (no
    ``image_ref``, so no ``snapshot_ref`` on the alert) and it has no transaction (an entrance, a lane's live view)."""
    return camera.observation_id if camera is not None and face.status == "MATCHED" else None


def observation_result(obs: dict[str, Any], watchlist: WatchlistLike | None) -> FaceResult:
    """A face observation as the decision sees it: the face stage's status, upgraded by a watchlist match. A face
    the stage searched in Rekognition (``matcher``) is taken as the stage found it: :func:`rekognition_result`.
    Entries expired at the observation's ``event_time`` (a checkout's is its sale's) match nothing: the watchlist
    service's tombstone does not come while it is down, and a lapsed listing must not raise alerts meanwhile."""
    status = obs["status"]
    if obs.get("matcher") == REKOGNITION_MATCHER:
        return rekognition_result(obs, watchlist)
    if status == "NO_MATCH" and obs.get("embedding") and watchlist is not None:
        match = watchlist.search(obs["embedding"], obs.get("event_time"))
        if match is not None:
            sim = round(float(match.similarity), 2)
            return FaceResult("MATCHED", match.subject_id, match.category, sim, LOCAL_MATCHER)
    return FaceResult(status)


def rekognition_result(obs: dict[str, Any], watchlist: WatchlistLike | None) -> FaceResult:
    """The face stage's Rekognition search as the match, never the job's own search of the embedding: ``MATCHED``
    with the subject, its category from the watchlist and Rekognition's similarity; a subject the watchlist does
    not hold (forgotten or expired, its collection faces not deleted yet) or whose entry had expired at the
    observation's ``event_time`` (the service that deletes them is down) is ``NO_MATCH``, as is a match without
    a subject. ``NO_MATCH``, ``NO_FACE`` and ``UNAVAILABLE`` (the search failed) stay as they are."""
    status, subject = obs["status"], obs.get("subject_id")
    if status != "MATCHED":
        return FaceResult(status)
    category = watchlist.category(subject, obs.get("event_time")) if subject and watchlist is not None else None
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


class ExpiryOrder:
    """When the entries of one join map expire, as a heap of ``(until, key)`` beside the map (a plain dict, as
    Flink state holds it): :meth:`expired` touches only what is due (and entries removed meanwhile, once each),
    so forgetting costs what is forgotten, not the map's size. An entry set again is pushed again; the older
    heap item is stale (its ``until`` differs from the map's) and skipped when it comes up."""

    __slots__ = ("heap", "until_of")

    def __init__(self, until_of: Callable[[Any], int]) -> None:
        self.until_of = until_of
        self.heap: list[tuple[int, str]] = []

    def rebuild(self, entries: dict[str, Any]) -> None:
        """After a restore, or when stale items outnumber the live ones: one item per entry."""
        self.heap = [(self.until_of(value), key) for key, value in entries.items()]
        heapq.heapify(self.heap)

    def add(self, key: str, value: Any, entries: dict[str, Any]) -> None:
        heapq.heappush(self.heap, (self.until_of(value), key))
        if len(self.heap) > 2 * len(entries) + 64:
            self.rebuild(entries)

    def next_until(self) -> int | None:
        return self.heap[0][0] if self.heap else None

    def pop_oldest(self, entries: dict[str, Any], now_ms: int | None = None) -> str | None:
        """Remove and name the entry that expires first (only if due at ``now_ms``, when given); ``None``: none."""
        heap = self.heap
        while heap:
            until, key = heap[0]
            if now_ms is not None and until > now_ms:
                return None
            heapq.heappop(heap)
            value = entries.get(key)
            if value is not None and self.until_of(value) == until:
                del entries[key]
                return key
        return None


LATE_FACE_EXPIRY_STEP_MS = 1000
"""Forgetting needs no millisecond precision: the timer for it is rounded up to whole seconds, so a steady
stream of releases costs at most one expiry timer a second, not one per transaction."""


class FaceJoin:
    """Pending transactions by id (with their deadline), observations that came first, and transactions decided
    without their face (``decided``: the late-face memory).

    The late-face memory holds a trimmed transaction (:data:`LATE_FIELDS`, about 200 bytes pickled) for
    ``late_ttl_ms`` after its release, at most ``late_max`` of them: when full, the oldest is forgotten first
    and counted in :attr:`evicted` (its face, if it still comes, is then parked as an early face)."""

    def __init__(
        self, deadline_ms: int, early_ttl_ms: int, late_ttl_ms: int | None = None, late_max: int = 100_000
    ) -> None:
        self.deadline_ms = deadline_ms
        self.early_ttl_ms = early_ttl_ms
        self.late_ttl_ms = early_ttl_ms if late_ttl_ms is None else late_ttl_ms
        self.late_max = late_max
        self.pending: dict[str, tuple[Envelope, int]] = {}
        self.early: dict[str, Seen] = {}
        self.decided: dict[str, tuple[Envelope, int]] = {}
        """Transactions decided at their deadline without a face, trimmed, with when they are forgotten."""
        self.evicted = 0
        """Transactions forgotten before their time because the late-face memory was full."""
        self._early_order = ExpiryOrder(lambda seen: seen.arrived_ms + self.early_ttl_ms)
        self._decided_order = ExpiryOrder(lambda entry: entry[1])

    @property
    def enabled(self) -> bool:
        return self.deadline_ms > 0

    def restore(
        self,
        pending: dict[str, tuple[Envelope, int]],
        early: dict[str, Seen],
        decided: dict[str, tuple[Envelope, int]] | None = None,
    ) -> None:
        """Load the maps (``decided`` is absent in state written before the late-face memory: empty). A restored
        memory larger than ``late_max`` is cut to it at the next :meth:`due` (which reports the removals)."""
        self.pending, self.early, self.decided = dict(pending), dict(early), dict(decided or {})
        self._early_order.rebuild(self.early)
        self._decided_order.rebuild(self.decided)

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
        held = self.early.get(tx_id)
        if held is not None and seen.face.status == "UNAVAILABLE" and held.face.status != "UNAVAILABLE":
            # the stage's "late" answer to a transaction sent again (a replay) must not replace the face it
            # found the first time: the transaction would be decided without its face
            return None, []
        self.early[tx_id] = seen
        self._early_order.add(tx_id, seen, self.early)
        return None, [(EARLY_FACES, tx_id, seen)]

    def due(self, now_ms: int) -> tuple[list[Ready], list[Write]]:
        """Transactions whose deadline passed go ahead with ``face: UNAVAILABLE`` (and are remembered for a late
        face for ``late_ttl_ms``); stale early faces and remembered transactions go, and the memory is cut to
        ``late_max``. Only what expires is touched (:class:`ExpiryOrder`)."""
        ready: list[Ready] = []
        writes: list[Write] = []
        for tx_id, (env, deadline) in list(self.pending.items()):
            if deadline <= now_ms:
                del self.pending[tx_id]
                ready.append(Ready(env, unavailable("face-deadline", now_ms), self._waited(deadline, now_ms)))
                writes.append((PENDING, tx_id, None))
                if self.late_max > 0:
                    remembered = (_trimmed(env), now_ms + self.late_ttl_ms)
                    self.decided[tx_id] = remembered
                    self._decided_order.add(tx_id, remembered, self.decided)
                    writes.append((DECIDED, tx_id, remembered))
        while (gone := self._early_order.pop_oldest(self.early, now_ms)) is not None:
            writes.append((EARLY_FACES, gone, None))
        while (gone := self._decided_order.pop_oldest(self.decided, now_ms)) is not None:
            writes.append((DECIDED, gone, None))
        while len(self.decided) > self.late_max and (gone := self._decided_order.pop_oldest(self.decided)) is not None:
            self.evicted += 1
            writes.append((DECIDED, gone, None))
        return ready, writes

    def undecided(self, tx_id: str) -> list[Write]:
        """The transaction's decision failed (dead-lettered): it was never decided, so no late face may raise
        an alert for it; its face, if it comes, is parked as an early face for its re-drive."""
        if self.decided.pop(tx_id, None) is None:
            return []
        return [(DECIDED, tx_id, None)]

    def remember(self, tx_id: str, entry: tuple[Envelope, int]) -> list[Write]:
        """A late face whose handling failed (dead-lettered): its decided transaction is remembered again as it was
        (``entry``, what :attr:`decided` held), so the re-drive of the face is its late result, once."""
        self.decided[tx_id] = entry
        self._decided_order.add(tx_id, entry, self.decided)
        return [(DECIDED, tx_id, entry)]

    def _waited(self, deadline: int, released_ms: int) -> int:
        """From when the transaction was held (its deadline less the wait allowed) to its release."""
        return max(0, released_ms - (deadline - self.deadline_ms))

    def next_deadline(self) -> int | None:
        """The earliest face deadline, or the next whole second at which an early face or a remembered
        transaction is to be forgotten (so they go when traffic stops too); ``None``: nothing to wait for."""
        step = LATE_FACE_EXPIRY_STEP_MS
        forget = [
            -(-u // step) * step
            for u in (self._early_order.next_until(), self._decided_order.next_until())
            if u is not None
        ]
        return min([*(d for _, d in self.pending.values()), *forget], default=None)


def face_join(settings: Settings) -> FaceJoin:
    """The job's face join: its deadline, early-face TTL and late-face memory (:func:`late_face_ttl_ms`)."""
    job = settings.job
    return FaceJoin(job.face_deadline_ms, job.early_face_ttl_ms, late_face_ttl_ms(settings), job.late_face_memory_max)


def late_face_ttl_ms(settings: Settings) -> int:
    """How long a transaction decided without its face is remembered for it: as long as a face can still come,
    i.e. the face stage's ``max_lag_s`` (it snapshots no older transaction) plus one snapshot's ``deadline_s``
    plus :data:`~infra.settings.FACE_DELIVERY_MARGIN_MS` (analysis, Kafka) after the release, and never longer
    than ``early_face_ttl_ms``. A face later than that is parked as an early face, as before the memory."""
    cameras = settings.cameras
    can_come_ms = int((cameras.max_lag_s + cameras.deadline_s) * 1000) + FACE_DELIVERY_MARGIN_MS
    return min(settings.job.early_face_ttl_ms, can_come_ms)


def _trimmed(env: Envelope) -> Envelope:
    """A decided transaction as a late face needs it: its alert's fields and receipt key, nothing else (it is
    kept for ``late_ttl_ms`` after every deadline release)."""
    tx = env[0]
    return {k: tx.get(k) for k in LATE_FIELDS}, {}, env[2]
