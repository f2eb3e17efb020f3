"""The face stage: a snapshot and a face for every checkout, and for every new person at an entrance.

Inputs: ``transactions`` (each valid one: the lane camera at the transaction time) and
``camera_events`` (an entrance camera reporting an ``oid`` it has not seen within
``entrance_oid_window_s``: that camera now, if the event is at most ``entrance_max_lag_s`` old when the snapshot
is asked for; entrances have their own snapshot workers, and each input topic is paused only on its own
unfinished records, so checkouts do not age entrances and a stream of people does not hold checkouts back).
Output:
one ``FaceObservation`` per trigger on ``face_observations`` (key = camera serial), with a deterministic
id (``checkout:<tx>``, ``entrance:<serial>:<oid>:<event time>``) so a replay is idempotent downstream. The
scoring job joins them to transactions by transaction id (with a deadline) and does the watchlist match;
this stage stays stateless apart from the entrance ``oid`` memory (with the Rekognition backend the collection
is searched here, the job names the subject's category).

Statuses: ``NO_MATCH`` (a usable face: embedding + quality), ``NO_FACE`` (none, or none passed the
quality gate; the reason says which), ``UNAVAILABLE`` (no snapshot, or bytes that are no image; the
reason says why). With the Rekognition backend (``faces.backend``) the stage also searches each usable face in
the collection (:func:`jobs.faces.rekognition.search_faces`) and says so (``matcher: rekognition``): ``MATCHED``
with the subject id and Rekognition's similarity, ``NO_MATCH`` when no face matched at the threshold, or
``UNAVAILABLE`` with the error when the search failed (the face's embedding, quality and image are kept); the
scoring job takes that as the match.

A checkout picture the camera could only take "now" (no footage of the sale yet) is flagged ``snapshot_of_now``
and stored under :func:`checkout_image_key` ``(tx, False)``: it is no picture of the buyer, so the scoring job
does not join it as the transaction's face and ``fraud <tx>`` cannot enroll it. Snapshots are kept in the
ImageStore (``checkout``/``entrance``, purged by retention unless a match retains them).

Why a separate consumer and not Flink async I/O: snapshots take seconds (the footage must be stored
first) and face analysis is CPU; a thread pool keeps one slow camera from holding up the others, and
offsets are committed only up to the first record whose observations Kafka has not acknowledged yet
(:class:`OffsetTracker`), so a crash replays, never skips. Bad camera events become dead letters; bad
transactions are dead-lettered by the scoring job (one dead letter per bad input), so here they are
only skipped -- that includes ids that are no names (a store id like ``x/../Q2XX-VICTIM-0001/reboot?``
never becomes a camera serial, let alone a request).

No single record stops the stage: any other exception while planning or observing a record becomes a
dead letter (kind ``face_stage_error``; for a transaction its id is prefixed with the stage, so it never
replaces the scoring job's own dead letter of that record), and a failed Kafka delivery -- a broker down
longer than the producer's ``message.timeout.ms`` -- is produced again with backoff until it is
acknowledged, so the record's offset is committed only after its output is durable and reading resumes
once the broker is back (a retried observation may land twice; every consumer is idempotent by its id).

Metrics (``infra.metrics``, stage ``face-stage``): records in by kind (``transaction``, ``camera_event``),
observations out by status (``no_match``, ``no_face``, ``unavailable``) once Kafka acknowledged them, dead
letters by kind, ``cg_processing_seconds`` per trigger (snapshot, store, analysis), ``cg_face_analysis_seconds``
per analysis, ``cg_skipped{reason=entrance_late|checkout_late}`` (triggers too old to snapshot),
``cg_skipped{reason=entrance_over_cap}`` (new people of an entrance event past ``entrance_max_new_people``, left
for its next event: :meth:`EntranceTracker.new_oids`),
``cg_skipped{reason=replayed}`` (triggers answered already: :class:`RecentAnswers`) and the queue
depths ``snapshots`` (triggers in the pools), ``delivery_retries`` and
``unacknowledged`` (records whose outputs Kafka has not acknowledged). ``/healthz`` turns 503 when the loop
stops turning, or when triggers are in flight and none has finished for :func:`stall_limit_s` (every snapshot
worker stuck: back-pressure pauses the consumer, the loop turns and does nothing: "no snapshot finished for ...");
``/readyz`` also while deliveries are failing ("Kafka unreachable").

A trigger read again (a restart before its offset was committed, a topic replay, a redelivered camera event) is not
snapshotted and searched again while this process remembers it (:class:`RecentAnswers`): one Kafka acknowledged an
answer of (``MATCHED``, ``NO_MATCH``, ``NO_FACE``; not ``UNAVAILABLE``, an outage) is skipped (counted ``replayed``; the
scoring job has its answer), one still being observed waits for that observation and one still being delivered gets the
same record, so its offset is committed only once an answer is in Kafka. A restart (and a partition assignment: another
stage's partitions) does not forget it: before reading, the stage reads back the ids of the observations published over
that window (:func:`recall_from_kafka`, at most :data:`RECALL_TIMEOUT_S`), so a record read again from the last commit
is skipped too. If that read fails or takes longer, a WARNING says so and the stage goes on without (those triggers are
snapshotted again).

Run: ``python -m jobs.faces.stage``.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

import typer
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, Message, TopicPartition

from infra import clock, metrics
from infra.clients import kafka as kafka_clients
from infra.clients.image_store import call_limit_s as store_call_limit_s
from infra.clients.meraki import MerakiClient, Snapshot, SnapshotError, camera_for_lane, camera_location
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import DaemonPool, StopRequest, done_by, exit_deadline, stop_asked_at, stop_on_signals, time_left
from infra.retry import Backoff
from infra.settings import Settings, face_deadline_problem, get_settings
from jobs.faces.rekognition import search_limit_s
from jobs.scoring.validation import check_event_time, check_size, parse_transaction
from schemas.codec import DecodeError, Projection, codec
from schemas.errors import FACE_STAGE_ERROR, InvalidRecord
from schemas.identifiers import check_serial
from schemas.records import REKOGNITION_MATCHER, CameraEvent, FaceObservation, dead_letter
from schemas.topics import CAMERA_EVENTS, DEAD_LETTERS, FACE_OBSERVATIONS, TRANSACTIONS

log = logging.getLogger("jobs.faces.stage")

STAGE = "face_stage"
PROCESS = "face-stage"
"""The ``stage`` label of this process's metrics (its name in ``infra.metrics.PROCESSES``)."""
CHECKOUT, ENTRANCE = "CHECKOUT", "ENTRANCE"
STAGE_ERROR = FACE_STAGE_ERROR
"""Dead-letter kind of a record the stage failed on for a reason other than the record being invalid."""


NOT_OF_THE_SALE = "%now"
"""Suffix of the image key of a lane picture taken at request time instead of the sale time (the fallback to
"now"). ``%`` is no character of a transaction id (:data:`schemas.identifiers.ID_RE`), so no ``fraud <tx>``
names such an image as a transaction's checkout snapshot."""


def checkout_image_key(transaction_id: str, of_the_sale: bool = True) -> str:
    """The image-store key (kind ``checkout``) of a transaction's lane picture. Only footage of the sale is
    the buyer's face and may be enrolled (``fraud``/``vip <tx>`` look up ``checkout_image_key(tx)``); a
    picture of "now" (``of_the_sale=False``) shows whoever stood at the lane when it was asked for, so it
    is kept under a key no enrollment finds."""
    return transaction_id if of_the_sale else f"{transaction_id}{NOT_OF_THE_SALE}"


INSPECTION = "%inspect"
"""Suffix of the image key of the lane picture ``checkout <tx>`` takes (:func:`inspection_image_key`)."""
LEGACY_INSPECTION = "-inspect"
"""The suffix such pictures had before: ``<tx>-inspect`` is a transaction id too, so ``fraud <tx>-inspect`` enrolled
the sale's face again from it, after ``forget subj-<tx>`` as well; still deleted by that forget."""


def inspection_image_key(transaction_id: str, of_the_sale: bool = True) -> str:
    """The image-store key (kind ``checkout``) of the picture the bot's ``checkout <tx>`` takes of that sale's lane.
    Footage of the sale shows the buyer like the face stage's snapshot: ``forget subj-<tx>`` deletes it too, and
    ``%`` (no character of a transaction id) keeps it out of every ``fraud``/``vip`` enrolment."""
    return checkout_image_key(f"{transaction_id}{INSPECTION}", of_the_sale)


STALL_MARGIN_S = 30.0
"""Beyond a trigger's snapshot, S3 write and Rekognition searches: the local image store's write, the wait for the
analysis worker and the analysis itself (about 1 s an image)."""


def stall_limit_s(settings: Settings) -> float:
    """How long triggers may be in flight with none finished before the stage counts as hung (``/healthz`` stale): the
    longest one trigger may take, i.e. its snapshot (``CG_CAMERAS__DEADLINE_S``, every retry included), with the S3
    image store its write (:func:`infra.clients.image_store.call_limit_s`), with the Rekognition backend its searches
    (:func:`jobs.faces.rekognition.search_limit_s`: one call per usable face, up to
    :data:`~jobs.faces.rekognition.MAX_SEARCHED_FACES`), each call's tries timing out connecting and reading plus
    botocore's waits between them, as the watchlist service's ``/healthz`` counts a call, plus :data:`STALL_MARGIN_S`.
    Before, the S3 write was left to the margin, and one that did not answer (62 s at the default 5 s a try) took the
    stage for hung; and one search was counted, so a snapshot of several faces whose searches each answered late took
    it for hung too. Any finished trigger is progress, so a slow camera among working ones never trips it."""
    faces = settings.faces
    limit = settings.cameras.deadline_s + STALL_MARGIN_S
    if faces.image_store == "s3":
        limit += store_call_limit_s(faces.image_store_timeout_s)
    if faces.backend == REKOGNITION_MATCHER:
        limit += search_limit_s(faces.rekognition_search_timeout_s)
    return limit


ANSWERS = frozenset({"MATCHED", "NO_MATCH", "NO_FACE"})
"""The statuses that answer a trigger, remembered by :class:`RecentAnswers`. Not ``UNAVAILABLE``: an outage (the
camera, the image, a Rekognition search) is no answer, and a trigger sent again once it is over must be snapshotted.
One past its lag limit is answered ``UNAVAILABLE`` again without a snapshot, by the lag rule."""

REMEMBERED_ANSWERS = 100_000
"""At most this many answered triggers are remembered (:class:`RecentAnswers`): an id and a time each, a few MB."""


class RecentAnswers:
    """Observation ids whose answer (:data:`ANSWERS`) Kafka acknowledged, each until its trigger is older than
    ``window_ms`` (by event time: past its lag limit a trigger is no longer snapshotted anyway), at most ``limit`` (the
    oldest remembered go first). A trigger read again within it costs no second snapshot and Rekognition search (money,
    and a picture of a later moment than the sale). Filled at start from Kafka too (:func:`recall_from_kafka`)."""

    def __init__(self, window_ms: int, limit: int = REMEMBERED_ANSWERS) -> None:
        self.window_ms, self.limit = window_ms, limit
        self._at: dict[str, int] = {}
        """Event time by observation id, in the order remembered."""
        self._pruned_at = 0

    def add(self, observation_id: str, event_time: int, now_ms: int) -> None:
        self._at.pop(observation_id, None)
        self._at[observation_id] = event_time
        if now_ms - self._pruned_at > self.window_ms:
            self._at = {k: t for k, t in self._at.items() if now_ms - t <= self.window_ms}
            self._pruned_at = now_ms
        while len(self._at) > self.limit:
            del self._at[next(iter(self._at))]

    def answered(self, observation_id: str, now_ms: int) -> bool:
        """Whether ``observation_id`` was answered and its trigger is still within the window."""
        at = self._at.get(observation_id)
        return at is not None and now_ms - at <= self.window_ms

    def __len__(self) -> int:
        return len(self._at)


RECALL_TIMEOUT_S = 5.0
"""How long the stage waits, at start and on each partition assignment, for the ids of the observations it published
within :class:`RecentAnswers`' window; past it the stage reads on without them (a WARNING) and the read, bound by the
same time, ends with its consumer closed. A few seconds: the read covers minutes of observations, and checkouts wait
meanwhile."""

Recall = Callable[[Settings, int, float, threading.Event], Iterable[tuple[str, int]]]
"""``recall(settings, since_ms, timeout_s, given_up)``: (observation id, event time) of every answer among the face
observations written at or after ``since_ms``, stopping (raising) once ``given_up`` is set (:func:`recall_from_kafka`;
tests pass their own)."""


_OBSERVATION_IDS = functools.partial(Projection, "FaceObservation", ("observation_id", "event_time", "status"))
"""A face observation's id, event time and status only (every schema version has them): the embedding is never
decoded or held."""


def recall_from_kafka(
    settings: Settings, since_ms: int, timeout_s: float, given_up: threading.Event | None = None
) -> list[tuple[str, int]]:
    """The ids and event times of the answers (:data:`ANSWERS`) among the face observations written at or after
    ``since_ms`` (broker timestamps, ``offsets_for_times``), up to the topic's end when the read starts; raises on a
    failure, after ``timeout_s`` in all or once ``given_up`` is set. ``timeout_s`` bounds the whole read: each metadata
    call (the topic's partitions, each one's end, the offsets by time) and each poll waits at most the time left, so a
    read given up ends by then and closes its consumer (before, each call had ``timeout_s`` of its own, and a read
    given up ran on to the end of the call it was in: with a slow broker, up to ``timeout_s`` more)."""
    from infra.clients.control_topics import read_control_topics

    deadline = time.monotonic() + timeout_s
    ids, found = _OBSERVATION_IDS(), []

    def apply(_topic: str, _key: bytes | None, value: bytes | None) -> None:
        try:
            read = ids.decode(value)
        except DecodeError:  # a corrupt record is no answer
            return
        if read["status"] in ANSWERS:
            found.append((str(read["observation_id"]), int(read["event_time"])))

    read_control_topics(
        settings,
        apply,
        timeout_s=timeout_s,
        specs=(FACE_OBSERVATIONS,),
        since_ms=since_ms,
        deadline=deadline,
        stop=given_up,
    )
    return found


class EngineLike(Protocol):
    def analyse(self, image: bytes, max_embedded: int | None = None) -> list: ...


class StoreLike(Protocol):
    def put(self, kind: str, key: str, data: bytes) -> str: ...


class CollectionLike(Protocol):
    def search(self, image: bytes | str, subjects: tuple[str, ...] = ()) -> Any: ...


@dataclass(frozen=True, slots=True)
class Trigger:
    """One snapshot to take: who asked, which camera, for when."""

    kind: str
    serial: str
    store_id: str
    lane_id: str | None
    event_time: int
    at_ms: int | None
    """Snapshot timestamp; None = now."""
    transaction_id: str | None = None
    oid: int | None = None
    seen_by: int | None = None
    """The latest the event can have happened by clocks of ours: when Kafka took its record, or when the stage read
    it. An entrance's or a checkout's freshness is measured from it where it is before ``event_time`` (a camera or
    POS clock ahead, up to ``max_future_skew_ms``), which otherwise made the lag negative: the event looked fresh that
    much longer. A checkout's snapshot is still of ``at_ms``, the transaction's own time."""

    @property
    def since_ms(self) -> int:
        """What the lag is measured from: the event time, or :attr:`seen_by` if earlier."""
        return self.event_time if self.seen_by is None else min(self.event_time, self.seen_by)

    @property
    def observation_id(self) -> str:
        """Deterministic (a replay of the record gives the same id). An entrance sighting's carries its event
        time: the tracker reports an ``oid`` unseen for ``entrance_oid_window_s`` as a new person, whose
        observation, image and alert must not overwrite the earlier sighting's. (Records written before keep
        ``entrance:<serial>:<oid>``; nothing parses these ids.)"""
        if self.kind == CHECKOUT:
            return f"checkout:{self.transaction_id}"
        return f"entrance:{self.serial}:{self.oid}:{self.event_time}"

    def image_key(self, of_the_event: bool = True) -> tuple[str, str]:
        """Where its picture goes; ``of_the_event=False``: the camera had no footage of the event time and
        the picture shows "now" (:func:`checkout_image_key`)."""
        if self.kind == CHECKOUT:
            return "checkout", checkout_image_key(str(self.transaction_id), of_the_event)
        return "entrance", f"{self.serial}:{self.oid}:{self.event_time}"


class EntranceTracker:
    """Which ``oid`` each entrance camera saw last when; a new (or long unseen) one is a new person."""

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self._last: dict[tuple[str, int], int] = {}
        self._pruned_at = 0

    def new_oids(
        self, serial: str, event_time: int, oids: list[int], limit: int | None = None
    ) -> tuple[list[int], int]:
        """The new ``oids`` (the first ``limit`` of them) and how many more new ones were left for a later event.

        A new one past ``limit`` is not remembered as seen: it stays new, so the next event that still shows the
        person photographs them. Dead-lettering the event instead would photograph none of a real crowd, in this
        event or the next ones, which name it too; and the people left out are in the snapshots taken (each is of
        the whole door, "now"), so capping loses no evidence, only repeats of one picture."""
        new: list[int] = []
        left = 0
        for oid in oids:
            last = self._last.get((serial, oid))
            if last is None or event_time - last > self.window_ms:
                if limit is not None and len(new) >= limit:
                    left += 1
                    continue
                new.append(oid)
            self._last[(serial, oid)] = max(event_time, last or 0)
        if event_time - self._pruned_at > self.window_ms:
            self._last = {k: t for k, t in self._last.items() if event_time - t <= self.window_ms}
            self._pruned_at = event_time
        return new, left


class OffsetTracker:
    """Per partition: offsets handed out and which are finished; the commit point is the first unfinished."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], dict[int, int]] = {}
        self._high: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}

    def add(self, tp: tuple[str, int], offset: int, parts: int) -> None:
        """``parts`` outputs must be acknowledged before ``offset`` is done (0 = done now)."""
        self._high[tp] = max(self._high.get(tp, -1), offset)
        if parts > 0:
            self._pending.setdefault(tp, {})[offset] = parts

    def done(self, tp: tuple[str, int], offset: int) -> None:
        pending = self._pending.get(tp)
        if pending is None or offset not in pending:
            return
        pending[offset] -= 1
        if pending[offset] <= 0:
            del pending[offset]

    def commit_point(self, tp: tuple[str, int]) -> int | None:
        """The next offset to read after everything finished (Kafka commit semantics)."""
        if tp not in self._high:
            return None
        pending = self._pending.get(tp)
        return min(pending) if pending else self._high[tp] + 1

    def to_commit(self) -> dict[tuple[str, int], int]:
        """Commit points that moved since the last call."""
        out = {}
        for tp in self._high:
            point = self.commit_point(tp)
            if point is not None and point != self._committed.get(tp):
                out[tp] = point
                self._committed[tp] = point
        return out

    def commit_failed(self, points: dict[tuple[str, int], int]) -> None:
        """The commit of ``points`` (from :meth:`to_commit`) failed: the next :meth:`to_commit` gives them again. Marked
        committed, a quiet partition's last records were never committed, and a restart read them again."""
        for tp, point in points.items():
            if self._committed.get(tp) == point:
                del self._committed[tp]

    def forget(self, tps: list[tuple[str, int]]) -> None:
        for tp in tps:
            self._pending.pop(tp, None)
            self._high.pop(tp, None)
            self._committed.pop(tp, None)

    @property
    def in_flight(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def in_flight_of(self, topic: str) -> int:
        """Unfinished records of ``topic``'s partitions."""
        return sum(len(p) for tp, p in self._pending.items() if tp[0] == topic)


class FaceStage:
    """The pure core: what to snapshot for an input record, and the observation for a trigger."""

    def __init__(
        self,
        settings: Settings,
        snapshot: Callable[[str, int | None], Snapshot],
        engine: EngineLike,
        store: StoreLike,
        analysis_slots: int | None = None,
        collection: CollectionLike | None = None,
    ) -> None:
        """``collection``: the Rekognition collection to search each usable face in (the Rekognition backend);
        ``None``: the scoring job matches the embedding."""
        self.settings = settings
        self.snapshot = snapshot
        self.engine = engine
        self.store = store
        self.collection = collection
        self.entrances = EntranceTracker(int(settings.cameras.entrance_oid_window_s * 1000))
        self._analysis = threading.BoundedSemaphore(analysis_slots or settings.cameras.analysis_workers)
        self._max_lag_ms = int(settings.cameras.max_lag_s * 1000)
        self._entrance_max_lag_ms = int(settings.cameras.entrance_max_lag_s * 1000)
        self._processing = metrics.PROCESSING_SECONDS.labels(PROCESS)
        self._face_analysis = metrics.FACE_ANALYSIS_SECONDS.labels(PROCESS)
        self._late = {kind: metrics.SKIPPED.labels(PROCESS, f"{kind.lower()}_late") for kind in (CHECKOUT, ENTRANCE)}
        self._over_cap = metrics.SKIPPED.labels(PROCESS, "entrance_over_cap")

    def plan_transaction(self, value: bytes | None, now_ms: int, record_ms: int | None = None) -> list[Trigger]:
        """The lane snapshot of a valid transaction; nothing for an invalid one (see module doc), including
        one whose store or lane id is no name (``camera_for_lane`` refuses to build a serial from it). ``record_ms``:
        when Kafka took the record, if known; with ``now_ms`` it bounds when the sale happened (:attr:`Trigger.seen_by`:
        a POS clock ahead made the lag negative, and a late transaction was snapshotted as fresh)."""
        try:
            job = self.settings.job
            tx = parse_transaction(value, now_ms, job.max_message_bytes, job.max_future_skew_ms)
            serial = camera_for_lane(self.settings, tx["store_id"], tx["lane_id"])
        except InvalidRecord:
            return []
        return [
            Trigger(
                CHECKOUT,
                serial,
                tx["store_id"],
                tx["lane_id"],
                tx["event_time"],
                tx["event_time"],
                transaction_id=tx["transaction_id"],
                seen_by=_seen_by(now_ms, record_ms),
            )
        ]

    def plan_camera_event(
        self, value: bytes | None, now_ms: int | None = None, record_ms: int | None = None
    ) -> list[Trigger]:
        """A snapshot "now" per new person on an entrance camera; raises InvalidRecord for bad bytes, a
        camera serial that is no valid serial (it would go into the Dashboard API's path), or an entrance event
        dated more than ``job.max_future_skew_ms`` after ``now_ms`` (``invalid_timestamp``): the oid memory runs on
        event time, and one such event stopped it forgetting (it grew with every person for good) and kept that oid
        from being a new person until then; one dated at or before 1970 is ``invalid_timestamp`` too. ``record_ms``:
        when Kafka took the record, if known; with ``now_ms`` it bounds when the event happened
        (:attr:`Trigger.seen_by`). One over ``job.max_message_bytes`` is ``oversized``: written to Kafka past the
        bridge, thousands of people in one event were as many snapshots of the door."""
        check_size(value, self.settings.job.max_message_bytes)
        event = CameraEvent.from_avro(codec("CameraEvent").decode(value))  # DecodeError is an InvalidRecord
        check_serial(event.camera_serial, "camera_serial")
        if event.kind != "RAW_DETECTIONS":
            return []
        where = camera_location(self.settings, event.camera_serial)
        if where is None or where[1] is not None:
            return []  # unknown camera, or a lane camera (checkouts trigger those)
        now_ms = clock.now_ms() if now_ms is None else now_ms
        check_event_time(event.event_time, now_ms, self.settings.job.max_future_skew_ms)
        oids = [o.oid for o in event.objects if o.type == "person"]
        cap = self.settings.cameras.entrance_max_new_people
        new, left = self.entrances.new_oids(event.camera_serial, event.event_time, oids, cap)
        if left:
            self._over_cap.inc(left)
            log.warning(
                "camera %s event at %d names %d new people: %d photographed (CG_CAMERAS__ENTRANCE_MAX_NEW_PEOPLE), "
                "%d left for its next event",
                event.camera_serial,
                event.event_time,
                len(new) + left,
                len(new),
                left,
            )
        seen_by = _seen_by(now_ms, record_ms)
        return [
            Trigger(ENTRANCE, event.camera_serial, where[0], None, event.event_time, None, oid=oid, seen_by=seen_by)
            for oid in new
        ]

    def observe(self, trigger: Trigger, now_ms: int | None = None) -> FaceObservation:
        """Snapshot, store, analyse. Never raises for a failure of those: every one is an observation with a
        reason, an unexpected one (a bug in the engine, a malformed face) ``UNAVAILABLE`` naming its type."""
        try:
            with metrics.timed(self._processing):
                return self._observe(trigger, clock.now_ms() if now_ms is None else now_ms)
        except Exception as exc:
            log.exception("observing %s failed", trigger.observation_id)
            return _observation(trigger, "UNAVAILABLE", f"face analysis failed: {type(exc).__name__}")

    def _observe(self, trigger: Trigger, now_ms: int) -> FaceObservation:
        of_now = False  # set once the snapshot is there; obs() reads it when called

        def obs(status: str, reason: str | None = None, **extra: object) -> FaceObservation:
            return _observation(trigger, status, reason, snapshot_of_now=of_now, **extra)

        # Lag from the event to now, when the snapshot is asked for: an entrance is photographed "now" (at_ms None),
        # which shows the person of the event only while the event is fresh. The event time is the one clock that
        # sees every backlog (the bridge's MQTT session, Kafka, this stage); a queue inside the stage does not add
        # to it, as entrances have their own workers (FaceStageRunner).
        limit = self._max_lag_ms if trigger.kind == CHECKOUT else self._entrance_max_lag_ms
        lag = now_ms - trigger.since_ms
        if lag > limit:
            self._late[trigger.kind].inc()
            return obs("UNAVAILABLE", f"not snapshotted: {lag // 1000} s late (limit {limit // 1000} s)")
        try:
            snap = self.snapshot(trigger.serial, trigger.at_ms)
        except SnapshotError as exc:
            return obs("UNAVAILABLE", f"snapshot {exc.kind}: {exc.reason}")
        except Exception as exc:  # a client bug must not stop the stage; the reason names it
            log.exception("snapshot of %s failed", trigger.serial)
            return obs("UNAVAILABLE", f"snapshot failed: {type(exc).__name__}")
        of_now = snap.fell_back_to_now
        notes = ["snapshot of now: no video at the transaction time"] if of_now else []
        image_ref = None
        try:
            image_ref = self.store.put(*trigger.image_key(not of_now), snap.image)
        except Exception as exc:  # storage trouble must not hide the face result
            log.warning("storing the snapshot of %s failed: %s", trigger.observation_id, type(exc).__name__)
            notes.append(f"image not stored ({type(exc).__name__})")
        try:
            with self._analysis, metrics.timed(self._face_analysis):  # the analysis, not the wait
                # one embedding goes out (the largest usable face's); Rekognition searches the others by box
                faces = self.engine.analyse(snap.image, max_embedded=1)
        except Exception as exc:  # ImageError (corrupt, too big, wrong format) and anything dlib raises
            return obs("UNAVAILABLE", "; ".join([f"image unusable: {exc}", *notes]), image_ref=image_ref)
        passing = [f for f in faces if f.passed]
        if not passing:
            why = f"face rejected: {faces[0].reject_reason}" if faces else "no face in the snapshot"
            return obs("NO_FACE", "; ".join([why, *notes]), image_ref=image_ref)
        best = max(passing, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        face = {"image_ref": image_ref, "quality": float(best.quality), "embedding": [float(x) for x in best.embedding]}
        if self.collection is None:
            return obs("NO_MATCH", "; ".join(notes) or None, **face)
        from jobs.faces.rekognition import search_faces

        found = search_faces(self.collection, snap.image, passing)
        if found.match is not None:
            match = {"subject_id": found.match.subject_id, "similarity": round(float(found.match.similarity), 2)}
            return obs("MATCHED", "; ".join(notes) or None, matcher=REKOGNITION_MATCHER, **match, **face)
        if found.failed is not None:  # not "no match": nobody knows whether the face is on the watchlist
            why = f"Rekognition search failed: {found.failed}"
            return obs("UNAVAILABLE", "; ".join([why, *notes]), matcher=REKOGNITION_MATCHER, **face)
        return obs("NO_MATCH", "; ".join(notes) or None, matcher=REKOGNITION_MATCHER, **face)


def _seen_by(now_ms: int, record_ms: int | None) -> int:
    """The latest an input happened by our clocks (:attr:`Trigger.seen_by`): when Kafka took its record, if known, or
    when the stage read it (``now_ms``), whichever is earlier."""
    return now_ms if record_ms is None else min(now_ms, record_ms)


def _record_ms(msg: Message) -> int | None:
    """When Kafka took the record (its timestamp), None when it carries none."""
    kind, ms = msg.timestamp()
    return ms if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else None


def _observation(trigger: Trigger, status: str, reason: str | None = None, **extra: Any) -> FaceObservation:
    return FaceObservation(
        observation_id=trigger.observation_id,
        event_time=trigger.event_time,
        camera_serial=trigger.serial,
        store_id=trigger.store_id,
        trigger=trigger.kind,
        status=status,
        lane_id=trigger.lane_id,
        transaction_id=trigger.transaction_id,
        reason=reason,
        **extra,
    )


# --------------------------------------------------------------------------------------------------
# Kafka wiring


def consumer_group(settings: Settings) -> str:
    return f"{settings.consumer_group}.face-stage"


@dataclass(slots=True)
class Outgoing:
    """One record to produce for input ``tp``/``offset``; kept until Kafka acknowledged it."""

    topic: str
    key: bytes
    value: bytes
    tp: tuple[str, int]
    offset: int
    stat: str
    attempt: int = 0
    kind: str = ""
    """Metric label once delivered: the observation's status, or the dead letter's error kind."""
    observation_id: str = ""
    """An observation's id (none for a dead letter)."""
    event_time: int = 0
    answer: bool = False
    """An observation whose status answers its trigger (:data:`ANSWERS`): remembered once Kafka acknowledged it."""


class FaceStageRunner:
    """Consumes, fans triggers out to a thread pool, produces observations, commits finished offsets.

    ``producer``/``consumer`` default to the configured Kafka clients (tests pass their own);
    ``backoff`` spaces the re-sends of a failed delivery; ``heartbeat`` (the process's ``/healthz``) is beaten every
    loop turn while the stage makes progress: nothing in flight, or a trigger finished within :func:`stall_limit_s`
    (``clock`` measures that). A loop that only turns while every snapshot worker is stuck is not progress.
    ``recall`` reads back the observations published before (:data:`Recall`, default :func:`recall_from_kafka`),
    waiting at most ``recall_timeout_s``.
    """

    def __init__(
        self,
        settings: Settings,
        stage: FaceStage,
        *,
        producer: Any = None,
        consumer: Any = None,
        backoff: Backoff | None = None,
        heartbeat: metrics.Heartbeat | None = None,
        clock: Callable[[], float] = time.monotonic,
        recall: Recall = recall_from_kafka,
        recall_timeout_s: float = RECALL_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self._recall, self._recall_timeout_s = recall, recall_timeout_s
        self._reader: threading.Thread | None = None
        """The read back of the observations published before, while it runs (at most one: :meth:`recall`)."""
        self.stage = stage
        self.heartbeat = heartbeat or metrics.Heartbeat()
        self._clock = clock
        self._stall_s = stall_limit_s(settings)
        self._progress_at = clock()
        """When a trigger last finished, or the stage last had none in flight."""
        self._stalled = False
        prefix = settings.kafka.topic_prefix
        self.tx_topic = TRANSACTIONS.full_name(prefix)
        self.cam_topic = CAMERA_EVENTS.full_name(prefix)
        self.obs_topic = FACE_OBSERVATIONS.full_name(prefix)
        self.dlq_topic = DEAD_LETTERS.full_name(prefix)
        self.offsets = OffsetTracker()
        self.assigned = threading.Event()
        self.stats = {
            "transactions": 0,
            "camera_events": 0,
            "observations": 0,
            "dead_letters": 0,
            "failed": 0,
            "retried": 0,
            "errors": 0,
            "replayed": 0,
        }
        self._done: queue.Queue[tuple[Message, str, object]] = queue.Queue()
        self._pool = DaemonPool(max_workers=settings.cameras.snapshot_workers, thread_name_prefix="snapshot")
        self._entrance_pool = DaemonPool(
            max_workers=settings.cameras.entrance_snapshot_workers, thread_name_prefix="entrance"
        )
        """Entrances apart: behind a few dozen checkouts (seconds each) a picture of the door "now" comes too late."""
        self._paused: dict[str, bool] = {}
        """Per input topic: transactions and camera events are paused apart, each on its own unfinished records."""
        self._backoff = backoff or Backoff(0.5, 30.0)
        self._retries: list[tuple[float, int, Outgoing]] = []
        """Failed deliveries by when to send them again; touched only by the polling thread."""
        self._seq = itertools.count()
        self._fatal: KafkaError | None = None
        self._exit_by: float | None = None
        """At a stop, when (``time.monotonic()``) its last Kafka calls are given up, 1 s before the supervisor's
        SIGKILL; None while running, when an observation waits for room in a full queue as long as it takes."""
        self._observing = 0
        """Triggers handed to the pool whose result the polling thread has not drained yet."""
        cameras = settings.cameras
        self.answers = RecentAnswers(int(max(cameras.max_lag_s, cameras.entrance_max_lag_s) * 1000))
        """Triggers whose observation Kafka acknowledged: read again, they are skipped (module doc)."""
        self._waiting: dict[str, list[Message]] = {}
        """Per trigger being observed: the records that asked for it again meanwhile, answered with its observation."""
        self._delivering: dict[str, Outgoing] = {}
        """Per trigger observed and not acknowledged yet: its observation, sent again for a record that asks again."""
        self._replayed = metrics.SKIPPED.labels(PROCESS, "replayed")
        self._in = {kind: metrics.RECORDS_IN.labels(PROCESS, kind) for kind in ("transaction", "camera_event")}
        self._depth = {
            name: metrics.QUEUE_DEPTH.labels(PROCESS, name)
            for name in ("snapshots", "delivery_retries", "unacknowledged")
        }
        if producer is None:  # not ``or``: a Producer with an empty queue is falsy (``len``)
            producer = kafka_clients.producer(settings, kafka_clients.RELIABLE, client_id="checkout-guard-face-stage")
        if consumer is None:
            consumer = kafka_clients.consumer(
                settings,
                consumer_group(settings),
                kafka_clients.MANUAL_COMMIT,
                auto_offset_reset=settings.cameras.face_stage_offset_reset,
                partition_assignment_strategy="cooperative-sticky",
                # A crashed stage's partitions move to its replacement after this, not the 45 s default:
                # checkouts are waiting on their faces.
                session_timeout_ms=10_000,
                heartbeat_interval_ms=2_000,
            )
        self._producer, self._consumer = producer, consumer

    def _on_assign(self, _c: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:  # before their first record: it may have been answered before a restart, or by another stage
            self.recall()
        self.assigned.set()

    def recall(self) -> int:
        """Remember the triggers answered within :class:`RecentAnswers`' window, from Kafka; return how many were
        read back. In a thread waited on for at most ``recall_timeout_s``: a slow or failing read never blocks the
        stage, it costs the snapshots it would have saved (a WARNING). A read given up is told to stop, and ends by the
        same ``recall_timeout_s`` (:func:`recall_from_kafka`), closing its consumer; while it has not, an assignment
        reads nothing back (a WARNING), so rebalances under a slow broker never stack readers, each with its own
        consumer."""
        if self._reader is not None and self._reader.is_alive():
            log.warning(
                "the read back of the face observations published before, given up earlier, is still stopping: not "
                "read again for this assignment, triggers read again are snapshotted again"
            )
            return 0
        now_ms = clock.now_ms()
        # A transaction may be dated up to the future skew ahead of its observation's broker timestamp.
        since_ms = now_ms - self.answers.window_ms - self.settings.job.max_future_skew_ms
        found: list[tuple[str, int]] = []
        failed: list[Exception] = []
        given_up = threading.Event()

        def read() -> None:
            try:
                found.extend(self._recall(self.settings, since_ms, self._recall_timeout_s, given_up))
            except Exception as exc:  # noqa: BLE001 - reported by the waiting thread
                failed.append(exc)

        reader = self._reader = threading.Thread(target=read, name="recall", daemon=True)
        reader.start()
        reader.join(self._recall_timeout_s)
        if running := reader.is_alive():
            given_up.set()  # it ends by its own deadline (about now) at the latest, closing its consumer
        if running or failed:
            why = f"not done in {self._recall_timeout_s} s" if running else f"{type(failed[0]).__name__}: {failed[0]}"
            log.warning(
                "reading back the face observations published before failed (%s): triggers read again are "
                "snapshotted again",
                why,
            )
            return 0
        for observation_id, event_time in found:
            self.answers.add(observation_id, event_time, now_ms)
        log.info(
            "%d face observations published before read back: their triggers are not snapshotted again", len(found)
        )
        return len(found)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit(consumer)
        gone = {(p.topic, p.partition) for p in partitions}
        self.offsets.forget(list(gone))
        self._delivering = {k: out for k, out in self._delivering.items() if out.tp not in gone}
        # Their new owner reads them again from the committed offset; no need to keep re-sending here.
        self._retries = [r for r in self._retries if r[2].tp not in gone]
        heapq.heapify(self._retries)

    def _commit(self, consumer: Consumer) -> None:
        points = self.offsets.to_commit()
        if points:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in points.items()], asynchronous=False)
            except Exception as exc:  # e.g. a rebalance in progress: the next commit carries the same points
                self.offsets.commit_failed(points)
                log.warning("offset commit failed: %s", exc)

    def _handle(self, msg: Message) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        assert topic is not None and partition is not None and offset is not None, "a record has all three"
        tp = (topic, partition)
        value = msg.value()
        try:
            if tp[0] == self.tx_topic:
                self.stats["transactions"] += 1
                self._in["transaction"].inc()  # one record per loop turn: poll() hands out one at a time
                triggers = self.stage.plan_transaction(value, clock.now_ms(), _record_ms(msg))
            else:
                self.stats["camera_events"] += 1
                self._in["camera_event"].inc()
                triggers = self.stage.plan_camera_event(value, clock.now_ms(), _record_ms(msg))
        except InvalidRecord as exc:
            self.offsets.add(tp, offset, 1)
            self._dead_letter(msg, exc)
            return
        except Exception as exc:  # a bug must cost one record, not the stage
            log.exception("planning %s:%s:%s failed", tp[0], tp[1], offset)
            self.offsets.add(tp, offset, 1)
            self._dead_letter(msg, InvalidRecord(STAGE_ERROR, f"planning failed: {type(exc).__name__}"))
            return
        now_ms = clock.now_ms()
        answered = [t for t in triggers if self.answers.answered(t.observation_id, now_ms)]
        self.offsets.add(tp, offset, len(triggers) - len(answered))
        for trigger in triggers:
            oid = trigger.observation_id
            if trigger in answered:  # its observation is in Kafka: the scoring job has its answer
                self.stats["replayed"] += 1
                self._replayed.inc()
            elif oid in self._waiting:  # being observed: answered with that observation
                self._waiting[oid].append(msg)
            elif (sent := self._delivering.get(oid)) is not None:  # observed, not acknowledged: the same record
                self._send(replace(sent, tp=tp, offset=offset, attempt=0))
            else:
                self._waiting[oid] = []
                self._observing += 1
                pool = self._entrance_pool if trigger.kind == ENTRANCE else self._pool
                future = pool.submit(self.stage.observe, trigger)
                future.add_done_callback(functools.partial(self._finished, msg, oid))

    def _finished(self, msg: Message, observation_id: str, future: Future) -> None:
        """In the pool: hand the trigger's outcome to the polling thread (never raise here, where it would vanish).
        A trigger cancelled at a stop (:meth:`_stop_snapshots`) has no outcome: its records stay uncommitted."""
        if future.cancelled():
            return
        self._done.put((msg, observation_id, _outcome(future)))

    def _dead_letter(self, msg: Message, error: InvalidRecord) -> None:
        """Dead-letter the input ``msg`` (one of its pending parts). A transaction's dead letter gets the
        stage in its id: the scoring job owns ``topic:partition:offset`` of every transaction."""
        if error.kind == STAGE_ERROR:
            self.stats["errors"] += 1
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        dl = dead_letter(
            topic=topic,
            partition=partition,
            offset=offset,
            key=msg.key(),
            value=msg.value(),
            error=error,
            stage=STAGE,
            failed_at=clock.now_ms(),
            dead_letter_id=f"{STAGE}:{topic}:{partition}:{offset}" if topic == self.tx_topic else None,
        )
        self._send(
            Outgoing(
                self.dlq_topic,
                dl.dead_letter_id.encode(),
                dl.encode(),
                (topic, partition),
                offset,
                "dead_letters",
                kind=error.kind,
            )
        )

    def _send(self, out: Outgoing) -> None:
        def delivered(err: KafkaError | None, _m: object) -> None:
            if err is None:
                self.stats[out.stat] += 1
                self.offsets.done(out.tp, out.offset)
                if out.observation_id:
                    self._delivering.pop(out.observation_id, None)
                    if out.answer:  # an outage is no answer: sent again, the trigger is snapshotted again
                        self.answers.add(out.observation_id, out.event_time, clock.now_ms())
                if out.stat == "dead_letters":
                    metrics.DEAD_LETTERS.labels(PROCESS, out.kind).inc()
                else:
                    metrics.RECORDS_OUT.labels(PROCESS, out.kind).inc()
                return
            self.stats["failed"] += 1
            if err.fatal():  # the producer is unusable: stop, a restart redoes the uncommitted records
                self._fatal = err
                return
            delay = self._backoff.delay(out.attempt)
            out.attempt += 1
            log.warning("delivery to %s failed (%s), sending again in %.1f s", out.topic, err, delay)
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._seq), out))

        try:
            kafka_clients.produce(self._producer, out.topic, out.key, out.value, delivered, deadline=self._exit_by)
        except kafka_clients.ProduceGivenUp as exc:  # at a stop: not acknowledged, so its record is not committed
            log.warning("face stage: %s; its record will be read again at the next start", exc)

    def _resend_due(self) -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, _, out = heapq.heappop(self._retries)
            self.stats["retried"] += 1
            self._send(out)

    def run(self, stop: threading.Event, on_tick: Callable[[dict], None] | None = None) -> dict:
        consumer = self._consumer
        consumer.subscribe([self.tx_topic, self.cam_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                msg = consumer.poll(0.05)
                if msg is not None:
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", kafka_clients.error_named(msg.error()))  # never its words
                    else:
                        self._handle(msg)
                self._drain()
                self._resend_due()
                self._producer.poll(0)
                if self._fatal is not None:
                    raise RuntimeError(f"Kafka producer failed for good: {self._fatal}")
                self._backpressure(consumer)
                if time.monotonic() - last_commit >= 0.5:
                    self._commit(consumer)
                    self._report_queues()
                    last_commit = time.monotonic()
                self._beat()
                if on_tick:
                    on_tick(self.stats)
        finally:
            # 1 s before the supervisor's SIGKILL, which counts from the SIGTERM: a commit in the loop that hung after
            # it (Kafka down) took from the stop's time, which counted from here before
            deadline = exit_deadline(self.settings.supervisor.stop_timeout_s, stop_asked_at(stop))
            self._exit_by = deadline  # the observations produced from here on wait for room no longer
            self._stop_snapshots(deadline - self.settings.kafka.stop_flush_s)  # the flush keeps its time after them
            self._drain()
            self._producer.flush(time_left(deadline, self.settings.kafka.stop_flush_s))
            self._last_commit(consumer, deadline)
            self._report_queues()
        return self.stats

    def _stop_snapshots(self, deadline: float) -> None:
        """Wait for the snapshots under way (and those queued) until ``deadline``, then give up the rest: a camera
        slower than the stop timeout (``CG_CAMERAS__DEADLINE_S`` may be longer) kept the stage past the supervisor's
        SIGKILL, before its last commit. Nothing is lost: the records of a snapshot given up are not committed (their
        observation was never sent) and are read again at the next start."""
        given_up = self._pool.stop(deadline) + self._entrance_pool.stop(deadline)
        if given_up:
            log.warning(
                "face stage: %d snapshots not done before the supervisor's stop timeout were given up; their records "
                "are not committed and will be read again",
                given_up,
            )

    def _last_commit(self, consumer: Consumer, deadline: float) -> None:
        """The last offset commit (up to the first record whose observations Kafka has not acknowledged) and the
        consumer's close, given up at ``deadline``: with the brokers down both waited on Kafka as long as it took, past
        the supervisor's stop timeout into its SIGKILL. What is not committed is read again at the next start, and its
        triggers answered before are skipped as replayed."""

        def commit_and_close() -> None:
            self._commit(consumer)
            consumer.close()

        if not done_by(commit_and_close, deadline, "face-stage-last-commit"):
            log.warning(
                "face stage: Kafka took neither the last offset commit nor the consumer's close before the "
                "supervisor's stop timeout; the records since the last commit will be read again"
            )

    def _beat(self) -> None:
        """Beat the heartbeat, or with triggers in flight and none finished for ``stall_limit_s`` report a stall
        (``/healthz`` 503): back-pressure pauses the consumer when every snapshot worker is stuck, and the loop turning
        then is no progress."""
        now = self._clock()
        if self._observing == 0:
            self._progress_at = now
        idle_s = now - self._progress_at
        if idle_s > self._stall_s:
            reason = f"no snapshot finished for {idle_s:.0f} s, {self._observing} in flight"
            if not self._stalled:
                log.error("%s: /healthz is 503", reason)
            self._stalled = True
            self.heartbeat.stall(reason)
            return
        if self._stalled:
            log.info("snapshots finish again")
        self._stalled = False
        # Failed deliveries waiting to be sent again: the broker is not taking our records.
        self.heartbeat.beat("Kafka unreachable" if self._retries else None)

    def _report_queues(self) -> None:
        """Queue depths, set twice a second (with the commit), not per record."""
        self._depth["snapshots"].set(self._observing)
        self._depth["delivery_retries"].set(len(self._retries))
        self._depth["unacknowledged"].set(self.offsets.in_flight)

    def _drain(self) -> None:
        while True:
            try:
                first, oid, result = self._done.get_nowait()
            except queue.Empty:
                return
            self._observing -= 1
            self._progress_at = self._clock()
            asking = [first, *self._waiting.pop(oid, [])]  # records read again while it was observed get it too
            if isinstance(result, FaceObservation):
                try:
                    key, value = result.camera_serial.encode(), result.encode()
                except Exception as exc:  # noqa: BLE001 - an observation Avro refuses: dead-letter its input
                    result = exc
                else:
                    for msg in asking:
                        tp = (msg.topic() or "", msg.partition() or 0)
                        out = Outgoing(
                            self.obs_topic,
                            key,
                            value,
                            tp,
                            msg.offset() or 0,
                            "observations",
                            kind=result.status.lower(),
                            observation_id=oid,
                            event_time=result.event_time,
                            answer=result.status in ANSWERS,
                        )
                        self._delivering.setdefault(oid, out)
                        self._send(out)
                    continue
            for msg in asking:
                log.error(
                    "observing %s:%s:%s failed: %s", msg.topic(), msg.partition(), msg.offset(), type(result).__name__
                )
                self._dead_letter(msg, InvalidRecord(STAGE_ERROR, f"observation failed: {type(result).__name__}"))

    def _backpressure(self, consumer: Consumer) -> None:
        """Pause each input topic while ``max_in_flight`` of its own records are unfinished. Apart: an entrance
        waiting in Kafka behind checkouts would be too old for its picture of "now", and a stream of people at
        the doors must not hold the checkouts back (an entrance past its lag limit is answered at once, so the
        camera events' count drains fast); each count also bounds what waits for a failed delivery's resend."""
        for topic in {tp.topic for tp in consumer.assignment()}:
            busy = self.offsets.in_flight_of(topic) >= self.settings.cameras.max_in_flight
            if busy != self._paused.get(topic, False):
                (consumer.pause if busy else consumer.resume)([tp for tp in consumer.assignment() if tp.topic == topic])
                self._paused[topic] = busy


def _outcome(future: Future) -> object:
    """The observation, or the exception that took its place (never raised in the pool's callback, where
    it would vanish and leave its record pending for good)."""
    try:
        return future.result()
    except BaseException as exc:  # noqa: BLE001 - handed to the polling thread, which dead-letters it
        return exc


def build_stage(settings: Settings) -> tuple[FaceStage, MerakiClient]:
    """The stage with its real parts: the Meraki client, the face engine and the image store."""
    from infra.clients.image_store import ImageStore
    from jobs.faces.engine import FaceEngine

    client = MerakiClient.from_settings(settings)
    stage = FaceStage(
        settings,
        lambda serial, at: client.snapshot(serial, at),
        FaceEngine(settings.faces),
        ImageStore.from_settings(settings),
        collection=collection_of(settings),
    )
    return stage, client


def collection_of(settings: Settings) -> CollectionLike | None:
    """The Rekognition collection faces are searched in with ``faces.backend=rekognition``, else ``None``. Its
    calls time out after ``faces.rekognition_search_timeout_s`` (each of botocore's 4 tries)."""
    if settings.faces.backend != REKOGNITION_MATCHER:
        return None
    from jobs.faces.rekognition import RekognitionFaces

    log.info(
        "Rekognition backend: each usable face is searched in collection %s at similarity %.1f",
        settings.faces.rekognition_collection,
        settings.faces.rekognition_match_threshold,
    )
    return RekognitionFaces(settings.faces, timeout_s=settings.faces.rekognition_search_timeout_s)


def run_face_stage(
    settings: Settings,
    stop: threading.Event,
    on_tick: Callable[[dict], None] | None = None,
    heartbeat: metrics.Heartbeat | None = None,
) -> dict:
    stage, client = build_stage(settings)
    try:
        return FaceStageRunner(settings, stage, heartbeat=heartbeat).run(stop, on_tick)
    finally:
        client.close()


def main(log_level: str | None = None) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, "face-stage")
    if (problem := face_deadline_problem(settings)) is not None:  # the job's setting: the job refuses, not the stage
        log.warning("the scoring job would refuse to start: %s", problem)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGTERM,))  # the stop's deadline counts from the signal's arrival
    last = [time.monotonic()]

    def report(stats: dict) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            log.info("%s", stats)

    heartbeat = metrics.Heartbeat()
    endpoint = metrics.serve(settings, PROCESS, health=heartbeat)
    try:
        run_face_stage(settings, stop, report, heartbeat)
    except KeyboardInterrupt:
        stop.set()
    finally:
        endpoint.close()


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Snapshot the lane camera for every transaction (and the entrance camera for every new person) and
    publish face observations, until SIGTERM/Ctrl-C."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
