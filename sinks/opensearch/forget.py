"""``forget`` reaches OpenSearch: a forgotten subject's faces leave the indices, and do not come back.

The watchlist service forgets a subject (``forget <subject>``, or the entry's expiry) in Kafka, the image store
and Rekognition, and records it on ``audit`` (``FORGET`` / ``EXPIRE``, in the same Kafka transaction as the
watchlist tombstone). The OpenSearch sink reads those audit events (:func:`forget_of`) and, per forget:

- deletes the subject's face observations (``subject_id``) and those of its enrolment sale (``transaction_id``
  = the ``<tx>`` of ``subj-<tx>``: the buyer whose face was enrolled) from every period index
  (:attr:`~schemas.indices.Route.erased_with_subject`), and the sightings the scoring job matched to the subject
  (:func:`matched_sightings`: with the local backend, the default, the face stage reports ``NO_MATCH`` without a
  subject and the job does the match, so those observations name no subject; they are found by the image of the
  subject's alerts, by the observation ids they name and by the transactions the job decided with the subject's
  face);
- removes the face-derived fields (image refs, :attr:`~schemas.indices.Route.face_fields`) from the subject's
  alerts and cases, and from those of its enrolment sale (``transaction_id``: the snapshot of the buyer
  enrolled), keeping the decision (subject id, category, similarity, verdict): the forget itself is an audit
  record, the pictures are not;
- remembers the subject (:class:`Forgotten`), so that a face observation of it written later (a replay, a
  lagging partition, a case updated after the forget) is dropped or stripped at write time instead of
  bringing it back; an ``ENROLL`` of the same subject id after the forget lifts it for what comes from then on
  (:func:`enrolment_of`: a new entry, as the Webex eraser reads it);
- remembers, for :data:`SIGHTING_MEMORY_MS`, the image refs, transaction ids and observation ids of the sightings
  the job matched to the subject (found by the forget, or named by an alert or decision of the subject the sink reads
  after it): such an observation names nobody, so one read after the forget was indexed until its retention; it is
  now dropped at write time, and one indexed before the alert or decision that names its subject came is deleted
  then. What it remembers (digests: :func:`sighting_key`) is also written to the sink's own index
  (:func:`save_sightings`), before the strip takes the alerts' image refs and before the offsets are committed, so a
  restarted sink finds it again (:func:`load_sightings`): an entrance or lane-view sighting has no transaction, and
  only its image ref and its observation id (the alert's ``observation_id``, which the strip keeps) name it.

Why ``audit`` rather than the ``watchlist`` tombstones: the tombstone is compacted away about a day after the
forget (``delete.retention.ms``), while ``face_observations`` segments and the 30-day ``alerts`` and compacted
``cases`` topics can be read again long after (a consumer-group reset, a new index prefix); the audit topic
keeps every forget for 365 days, says which sale the subject was enrolled from, and tells a forget apart from
anything else. A sink starting on a fresh group reads it from its start and so also cleans indices written
before it knew how to.

Client-side (scan + bulk), as the local OpenSearch has no reindex module (no ``_delete_by_query``) and no
scripting: the alias is refreshed first, so a document indexed a moment ago is found too; a stripped document
is written back guarded by its sequence number (its external version on a keyed index), so a newer write in
between (409) is left as it is: the sink wrote it already stripped. Doing a forget twice changes nothing. A closed
index is not searched (it would fail the whole search): it is named in a WARNING, and what it holds stays until
it is opened and the forget repeated, or retention drops it.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opensearchpy import OpenSearch
from opensearchpy.exceptions import NotFoundError, RequestError
from opensearchpy.helpers import ScanError, scan, streaming_bulk

from infra.clients.opensearch import is_retriable
from schemas.forgets import audit_event, is_forget
from schemas.indices import (
    FORGOTTEN_SIGHTINGS_KIND,
    ROUTES,
    Route,
    enrolment_transaction,
    index_name,
    single_index_name,
    with_replicas,
)
from schemas.topics import FACE_OBSERVATIONS, readable_for_ms

log = logging.getLogger(__name__)

TERMS_PER_QUERY = 1000
"""Subject ids (and sale ids) per scan query: a sink reading a year of forgets on a fresh group stays far
below OpenSearch's ``index.max_terms_count`` (65,536)."""

MAX_REFUSALS_KEPT = 20
"""Refused write-backs a report names (its dead letter's reason); the count covers the rest."""

OBSERVATION_READABLE_MS = readable_for_ms(FACE_OBSERVATIONS)
"""How long after it was written a face observation can still be read from ``face_observations``: its retention and
its hour's segment, both set on the topic (and enforced on an existing one)."""

SIGHTING_MEMORY_MS = 2 * OBSERVATION_READABLE_MS
"""How long, from when it learnt them or last left out an observation they name, the sink remembers what names a
forgotten subject's matched sighting (an image ref, a transaction id, an observation id): as long as a copy of the
observation can still be read. A sighting's observation is on the topic before the alert and the decision that name
its subject (the job matches the observation) and is read at most :data:`OBSERVATION_READABLE_MS` after it was
written; but a replay (``producers.replay``) can copy it into the topic again until then, and that copy is read for as
long again. Before, the memory lasted one :data:`OBSERVATION_READABLE_MS`, and a copy replayed late in it was indexed
after the memory went. A copy left out renews it (a copy of that copy)."""


def sighting_key(field_name: str, value: str) -> str:
    """What the memory holds of a value naming a forgotten subject's sighting (an observation's ``field_name``): a
    SHA-256 of the field and the value, never the value itself (an image ref says where and when the subject was
    seen), in memory as in the sink's index (:func:`save_sightings`)."""
    return hashlib.sha256(f"{field_name}\x00{value}".encode()).hexdigest()


@dataclass(frozen=True)
class Forget:
    """One forget as the audit topic states it: the subject, and the sale its face was enrolled from."""

    subject_id: str
    transaction_id: str | None = None
    audit_id: str = ""
    at_ms: int = field(default=0, compare=False)
    """When it was made (the audit event's time): it applies to what came before it."""


def forget_of(value: bytes | None) -> Forget | None:
    """The forget an ``audit`` record states (:func:`schemas.forgets.is_forget`); ``None`` for any other action, a
    ``FAILED`` forget (the subject stays enrolled), the case service's ``EXPIRE`` of an undecided case (before, it
    erased the subject's face observations from the indices as if the subject had been forgotten), a record without
    a subject, or one that does not decode (not this sink's to dead-letter)."""
    event = audit_event(value)
    if event is None or not is_forget(event) or not event.subject_id:  # (is_forget checks it; told for the type)
        return None
    return Forget(
        event.subject_id,
        enrolment_transaction(event.subject_id, event.transaction_id),
        event.audit_id,
        event.event_time,
    )


def enrolment_of(value: bytes | None) -> tuple[str, int] | None:
    """``(subject, enrolled at ms)`` of an ``ENROLL`` done on ``audit``, as the Webex eraser reads it; else
    ``None``. A subject enrolled again after its forget is a new entry: the forget does not reach it."""
    event = audit_event(value)
    if event is None or event.action != "ENROLL" or event.outcome != "DONE" or not event.subject_id:
        return None
    return event.subject_id, event.event_time


@dataclass
class Forgotten:
    """The subjects forgotten so far (and their enrolment sales), for write-time checks.

    A forget applies to what came before it; an enrolment of the same subject id after it lifts it: a record
    whose time (the route's time field) is at or after that enrolment belongs to the new entry and is indexed
    as any other (before, a subject enrolled again stayed forgotten for good: its new face observations were
    never indexed and its alerts lost their image refs). A later forget applies again to everything before it."""

    subjects: set[str] = field(default_factory=set)
    transactions: set[str] = field(default_factory=set)
    forgotten_at: dict[str, int] = field(default_factory=dict)
    """Subject -> when its latest forget was made."""
    enrolments: dict[str, list[int]] = field(default_factory=dict)
    """Subject -> its ``ENROLL``s read so far (ms, sorted), in whatever order they came: a forget and the enrolment
    after it may sit on different ``audit`` partitions, the enrolment read first (before, it was then ignored and
    the subject stayed forgotten)."""
    sale_subject: dict[str, str] = field(default_factory=dict)
    """Enrolment sale -> the subject enrolled from it."""
    sightings: dict[str, int] = field(default_factory=dict)
    """:func:`sighting_key` of a face observation's field (``image_ref``, ``transaction_id``, ``observation_id``) and a
    value naming a forgotten subject's matched sighting -> until when it is remembered (ms): :data:`SIGHTING_MEMORY_MS`
    after it was learnt, or after an observation it names was last left out."""
    unsaved: dict[str, int] = field(default_factory=dict)
    """Those of :attr:`sightings` learnt or renewed since the last :meth:`take_unsaved`: to be written to the sink's
    index (:func:`save_sightings`) before the offsets of the batch that taught them are committed."""
    learnt: dict[str, set[str]] = field(default_factory=dict)
    """Such values first named by an alert or decision read since the last :meth:`take_learnt`: an observation of
    theirs indexed before it (read earlier, or earlier in its batch) is to be deleted."""
    sighting_ms: int = SIGHTING_MEMORY_MS
    sightings_due: float = field(default=float("inf"), repr=False)
    """The earliest ``until`` of :attr:`sightings`: :meth:`prune_sightings` looks only from then."""
    dropped: int = 0
    """Documents not indexed since the last :meth:`take_counts` (a forgotten subject's face observations)."""
    stripped: int = 0
    """Documents indexed without their face fields since the last :meth:`take_counts`."""

    def add(self, forget: Forget) -> None:
        subject = forget.subject_id
        self.subjects.add(subject)
        self.forgotten_at[subject] = max(self.forgotten_at.get(subject, forget.at_ms), forget.at_ms)
        if forget.transaction_id:
            self.transactions.add(forget.transaction_id)
            self.sale_subject[forget.transaction_id] = subject

    def enrol(self, subject: str, at_ms: int) -> None:
        """An ``ENROLL`` of ``subject`` (:func:`enrolment_of`): after its latest forget, it lifts it from ``at_ms``
        on, whether the forget was read before or after it."""
        times = self.enrolments.setdefault(subject, [])
        if at_ms not in times:
            bisect.insort(times, at_ms)

    def lifted_at(self, subject: str) -> int | None:
        """When a forgotten ``subject`` was enrolled again after its latest forget (its new entry's start)."""
        if subject not in self.forgotten_at:
            return None
        times = self.enrolments.get(subject, [])
        i = bisect.bisect_right(times, self.forgotten_at[subject])
        return times[i] if i < len(times) else None

    @property
    def enrolled_at(self) -> dict[str, int]:
        """Subject -> :meth:`lifted_at`, for the forgotten subjects enrolled again."""
        return {subject: at for subject in self.forgotten_at if (at := self.lifted_at(subject)) is not None}

    def __len__(self) -> int:
        return len(self.subjects)

    def _reaches(self, route: Route, record: dict[str, Any]) -> bool:
        """Whether a forget reaches ``record``: its subject's, or its enrolment sale's, and not of a new entry."""
        assert route.subject_field is not None
        subject = record.get(route.subject_field)
        if subject not in self.subjects:
            subject = self.sale_subject.get(str(record.get("transaction_id")))
            if subject is None:
                return False
        lifted = self.lifted_at(str(subject))
        time = record.get(route.time_field)
        return lifted is None or not isinstance(time, int) or time < lifted

    def _known_sightings(self, record: dict[str, Any]) -> list[str]:
        """The keys of :attr:`sightings` that a face observation's fields name."""
        keys = (
            sighting_key(name, value)
            for name in SIGHTING_FIELDS.values()
            if isinstance(value := record.get(name), str) and value
        )
        return [key for key in keys if key in self.sightings]

    def erases(self, route: Route, record: dict[str, Any]) -> bool:
        """Whether ``record`` of ``route`` is a forgotten subject's face, never to be indexed: its subject's or its
        enrolment sale's, or a sighting the job matched to a forgotten subject (:attr:`sightings`)."""
        if not route.erased_with_subject or route.subject_field is None:
            return False
        return self._reaches(route, record) or bool(self._known_sightings(record))

    def drops(self, route: Route, record: dict[str, Any], now_ms: int) -> bool:
        """At write time: whether ``record`` is left out (:meth:`erases`, counted in :attr:`dropped`); a sighting left
        out renews what names it (a replay may copy this copy); an alert or decision kept teaches its sighting
        (:meth:`note_sighting`)."""
        if self.erases(route, record):
            self.dropped += 1
            self._remember_keys(self._known_sightings(record), now_ms)
            return True
        self.note_sighting(route, record, now_ms)
        return False

    def remember(self, sightings: Mapping[str, Iterable[str]], now_ms: int) -> None:
        """Remember values (observation field -> values, as :func:`matched_sightings` gives them) that name forgotten
        subjects' matched sightings until :attr:`sighting_ms` after ``now_ms``."""
        keys = [sighting_key(name, value) for name, values in sightings.items() for value in values]
        self._remember_keys(keys, now_ms)

    def _remember_keys(self, keys: Iterable[str], now_ms: int) -> None:
        until = now_ms + self.sighting_ms
        for key in keys:
            if until > self.sightings.get(key, -1):
                self.sightings[key] = self.unsaved[key] = until
                self.sightings_due = min(self.sightings_due, until)

    def restore(self, saved: Mapping[str, int], now_ms: int) -> None:
        """What a sink remembered before this start (:func:`load_sightings`): each key until its time, if still due."""
        for key, until in saved.items():
            if until > now_ms and until > self.sightings.get(key, -1):
                self.sightings[key] = until
                self.sightings_due = min(self.sightings_due, until)

    def take_unsaved(self) -> dict[str, int]:
        """:attr:`unsaved` since the last call (key -> until), for :func:`save_sightings`; give them back with
        :meth:`keep_unsaved` when the write failed."""
        unsaved, self.unsaved = self.unsaved, {}
        return unsaved

    def keep_unsaved(self, keys: Mapping[str, int]) -> None:
        """Keys :meth:`take_unsaved` gave that were not written: written with the next ones (the later time wins)."""
        for key, until in keys.items():
            self.unsaved[key] = max(until, self.unsaved.get(key, until))

    def note_sighting(self, route: Route, record: dict[str, Any], now_ms: int) -> bool:
        """Whether ``record``, an alert or decision of ``route`` (:data:`SIGHTING_LINKS`), names a forgotten subject's
        matched sighting that the forget reaches (not one of a new entry): its image ref, transaction id and
        observation id are remembered, and those not known yet listed for :meth:`take_learnt`."""
        link = SIGHTING_SOURCES.get(route.kind)
        subject = record.get(link[0]) if link is not None else None
        if link is None or not isinstance(subject, str) or subject not in self.forgotten_at:
            return False
        lifted, time = self.lifted_at(subject), record.get("event_time")
        if lifted is not None and isinstance(time, int) and time >= lifted:
            return False  # a sighting of the new entry
        found = {
            SIGHTING_FIELDS[name]: value for name in link[1] if isinstance(value := record.get(name), str) and value
        }
        for name, value in found.items():
            if sighting_key(name, value) not in self.sightings:
                self.learnt.setdefault(name, set()).add(value)
        self.remember({name: [value] for name, value in found.items()}, now_ms)
        return bool(found)

    def take_learnt(self) -> dict[str, list[str]]:
        """The values :meth:`note_sighting` learnt since the last call (observation field -> values)."""
        learnt, self.learnt = self.learnt, {}
        return {name: sorted(values) for name, values in learnt.items() if values}

    def prune_sightings(self, now_ms: int) -> None:
        """Forget the sighting values remembered until ``now_ms`` or before: no observation of theirs is left."""
        if now_ms < self.sightings_due:
            return
        for key in [key for key, until in self.sightings.items() if until <= now_ms]:
            del self.sightings[key]
            self.unsaved.pop(key, None)
        self.sightings_due = min(self.sightings.values(), default=float("inf"))

    def recent(self, since_ms: int) -> list[Forget]:
        """The subjects forgotten at ``since_ms`` or later, as forgets (for :func:`matched_sightings`)."""
        return [Forget(subject, None, "", at) for subject, at in sorted(self.forgotten_at.items()) if at >= since_ms]

    def scrub(self, route: Route, source: dict[str, Any]) -> bool:
        """Remove the face fields of a forgotten subject's document, or of one about its enrolment sale (the
        buyer's snapshot), in place; whether any was there."""
        if route.subject_field is None or not self._reaches(route, source):
            return False
        removed = [name for name in route.face_fields if source.pop(name, None) is not None]
        return bool(removed)

    def take_counts(self) -> tuple[int, int]:
        """``(dropped, stripped)`` since the last call, for the metrics."""
        counts, self.dropped, self.stripped = (self.dropped, self.stripped), 0, 0
        return counts


# --------------------------------------------------------------------------- erasing what is indexed


def erase_query(
    route: Route, forgets: Sequence[Forget], lifted: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """The documents of ``route`` a forget of ``forgets`` reaches (``None``: the route holds no face): the
    subjects' and enrolment sales' face observations; the subjects' and enrolment sales' alerts and cases that
    still carry a face field (the sale's alert shows the buyer enrolled, as the Webex eraser knows). A subject
    enrolled again since (``lifted``: subject -> enrolled at ms, :attr:`Forgotten.enrolled_at`) is reached only
    before that enrolment: what its new entry indexed stays."""
    if route.subject_field is None:
        return None
    lifted = lifted or {}
    whose: list[dict[str, Any]] = []
    for field_name, pairs in (
        (route.subject_field, {(f.subject_id, f.subject_id) for f in forgets}),
        # the enrolment sale's documents show the buyer whose face was enrolled
        ("transaction_id", {(f.transaction_id, f.subject_id) for f in forgets if f.transaction_id}),
    ):
        whole = sorted(value for value, subject in pairs if subject not in lifted)
        if whole:
            whose.append({"terms": {field_name: whole}})
        for value, subject in sorted(pairs):
            if subject in lifted:
                before = {"range": {route.time_field: {"lt": lifted[subject]}}}
                whose.append({"bool": {"filter": [{"term": {field_name: value}}, before]}})
    if route.erased_with_subject:
        return {"query": {"bool": {"should": whose, "minimum_should_match": 1}}}
    if not route.face_fields:
        return None
    present = [{"exists": {"field": name}} for name in route.face_fields]
    return {
        "query": {
            "bool": {
                "filter": [{"bool": {"should": whose, "minimum_should_match": 1}}],
                "should": present,
                "minimum_should_match": 1,
            }
        }
    }


def erase_action(hit: dict[str, Any], route: Route) -> dict[str, Any] | None:
    """The bulk action that forgets one scanned document: a delete of a face observation; the document
    written back without its face fields, guarded so that a newer write in between is not overwritten
    (``None`` when it has none left)."""
    if route.erased_with_subject:
        return {"_op_type": "delete", "_index": hit["_index"], "_id": hit["_id"]}
    source = {k: v for k, v in hit["_source"].items() if k not in route.face_fields}
    if len(source) == len(hit["_source"]):
        return None
    action: dict[str, Any] = {"_op_type": "index", "_index": hit["_index"], "_id": hit["_id"], "_source": source}
    if route.keyed:  # its writes carry the Kafka offset: keep it, so the topic's next record still wins
        action.update(version=hit["_version"], version_type="external_gte")
    else:
        action.update(if_seq_no=hit["_seq_no"], if_primary_term=hit["_primary_term"])
    return action


@dataclass
class EraseReport:
    """What one :func:`erase_forgotten` round did, per route kind."""

    deleted: Counter[str] = field(default_factory=Counter)
    """Face observations deleted."""
    stripped: Counter[str] = field(default_factory=Counter)
    """Alerts and cases written back without their face fields."""
    changed_meanwhile: int = 0
    """Documents written between scan and write (409): written by the sink, stripped already."""
    failed: int = 0
    """Refused for good by OpenSearch (logged with their ids): the forget is not complete; the next forget of the
    subject (or a sink on a fresh group) tries again."""
    refusals: list[str] = field(default_factory=list)
    """``<index>/<id>: <status> <error type>: <reason>`` of the first refusals (ids only, no document)."""
    problem: str | None = None
    """Why this round must be repeated (429 / 5xx on some document); ``None`` when it is done."""
    sightings: dict[str, list[str]] = field(default_factory=dict)
    """What names the sightings the job matched to the forgotten subjects (:func:`matched_sightings`), for
    :meth:`Forgotten.remember`: their observations may still be read after the forget."""

    def total(self) -> int:
        return sum(self.deleted.values()) + sum(self.stripped.values())


def erase_forgotten(
    client: OpenSearch,
    index_prefix: str,
    forgets: Sequence[Forget],
    routes: Sequence[Route] = ROUTES,
    lifted: Mapping[str, int] | None = None,
    keep: Callable[[Mapping[str, Sequence[str]]], str | None] | None = None,
) -> EraseReport:
    """Delete and strip what ``forgets`` reach in every index of the prefix (read aliases: every period index).

    ``keep`` is given the matched sightings found (:func:`matched_sightings`) before anything is stripped, to
    remember them where a restart finds them (the strip takes the alerts' image refs that name them, and a
    repeated round would not find them again); what it returns is a problem, as below.

    Raises the client's ``TransportError`` when OpenSearch cannot be reached or the scroll was lost mid-scan
    (404 ``search_context_missing_exception``: only a missing index means nothing to forget); a retriable refusal
    of some document, or a scan some shard failed, sets :attr:`EraseReport.problem`. Either way the caller
    repeats the round (it is idempotent) before committing the offsets of the forgets.
    """
    report = EraseReport()
    if not forgets:
        return report
    # The face observations first, and nothing stripped while some are left: the alerts' image refs are what find
    # the sightings the job matched (matched_sightings), and a repeated round must find them again.
    erased = [route for route in routes if route.erased_with_subject]
    for route in erased:
        _erase_route(client, route, index_prefix, forgets, lifted, report)
    if erased:
        try:
            report.sightings = matched_sightings(client, index_prefix, forgets, lifted)
        except ScanError as exc:  # some shard did not answer: a sighting it holds was not found
            report.problem = f"scan incomplete: {exc}"
            return report
        erase_sightings(client, index_prefix, report.sightings, erased, report)
        if keep is not None and report.sightings:
            report.problem = keep(report.sightings) or report.problem
    if report.problem:
        return report  # the caller repeats the round
    for route in routes:
        if not route.erased_with_subject:
            _erase_route(client, route, index_prefix, forgets, lifted, report)
    return report


def erase_sightings(
    client: OpenSearch,
    index_prefix: str,
    sightings: Mapping[str, Sequence[str]],
    routes: Sequence[Route] = ROUTES,
    report: EraseReport | None = None,
) -> EraseReport:
    """Delete the face observations ``sightings`` name (observation field -> values, :func:`matched_sightings`) in
    every index of the prefix; raises and reports as :func:`erase_forgotten` does."""
    report = report if report is not None else EraseReport()
    for route in routes:
        if not route.erased_with_subject:
            continue
        for field_name, values in sightings.items():
            for start in range(0, len(values), TERMS_PER_QUERY):
                query = {"query": {"terms": {field_name: list(values[start : start + TERMS_PER_QUERY])}}}
                _erase_in(client, route, route.index(index_prefix), query, report)
    return report


def _erase_route(
    client: OpenSearch,
    route: Route,
    index_prefix: str,
    forgets: Sequence[Forget],
    lifted: Mapping[str, int] | None,
    report: EraseReport,
) -> None:
    """What ``forgets`` reach by subject and enrolment sale in ``route``'s indices (:func:`erase_query`)."""
    for start in range(0, len(forgets), TERMS_PER_QUERY):
        query = erase_query(route, forgets[start : start + TERMS_PER_QUERY], lifted)
        if query is not None:
            _erase_in(client, route, route.index(index_prefix), query, report)


SIGHTING_LINKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("alerts", "subject_id", ("snapshot_ref", "transaction_id", "observation_id")),
    ("transactions", "face_subject_id", ("transaction_id",)),
)
"""Where the scoring job recorded its watch-list matches: ``(index kind, subject field, fields that name the matched
face observation)``. An alert of the subject names the matched observation (``observation_id``, Alert v6), shows its
image (``snapshot_ref`` = its ``image_ref``) and, at a checkout, its transaction; a decided transaction names the
subject its face matched. Before ``observation_id``, an entrance or lane-view sighting whose snapshot could not be
stored (no image ref, no transaction) had nothing naming it, and stayed indexed until its retention; an alert written
before v6 still names its sighting by image ref only."""
SIGHTING_FIELDS = {"snapshot_ref": "image_ref", "transaction_id": "transaction_id", "observation_id": "observation_id"}
"""A link's field -> the face observation's field holding the same value."""
SIGHTING_SOURCES = {kind: (subject_field, fields) for kind, subject_field, fields in SIGHTING_LINKS}
"""Index kind -> (its subject field, the fields that name the matched face observation)."""


def searched_fields(route: Route) -> frozenset[str]:
    """The fields a forget finds ``route``'s documents by (term, terms and exists queries: :func:`erase_query`,
    :func:`matched_sightings`, :func:`erase_sightings`). Each is indexed whole, with no ``ignore_above`` in its
    template: a value over it is not indexed, so the forget would miss its document, or the image ref it must remove.
    The sink refuses a record with one over Lucene's term limit instead (:data:`~schemas.indices.MAX_TERM_BYTES`)."""
    fields = {subject_field for kind, subject_field, _ in SIGHTING_LINKS if kind == route.kind}
    if route.subject_field is not None:
        fields |= {route.subject_field, "transaction_id", *route.face_fields}
    if route.erased_with_subject:
        fields |= set(SIGHTING_FIELDS.values())
    return frozenset(fields)


def matched_sightings(
    client: OpenSearch, index_prefix: str, forgets: Sequence[Forget], lifted: Mapping[str, int] | None = None
) -> dict[str, list[str]]:
    """The face observations the scoring job matched to the subjects of ``forgets``, as values of their fields
    (``image_ref``, ``transaction_id``, ``observation_id``). With the local backend (the default) the face stage
    reports every usable face ``NO_MATCH`` without a subject and the job searches its watchlist: the observation of a
    sighting names nobody, so a forget by ``subject_id`` left it, image ref and
    (``CG_INDICES__INCLUDE_FACE_EMBEDDINGS``) embedding, until the index's retention. A subject enrolled again
    (``lifted``) is reached only before that enrolment."""
    lifted = lifted or {}
    found: dict[str, set[str]] = {name: set() for name in SIGHTING_FIELDS.values()}
    for kind, subject_field, fields in SIGHTING_LINKS:
        for start in range(0, len(forgets), TERMS_PER_QUERY):
            chunk = forgets[start : start + TERMS_PER_QUERY]
            whole = sorted({f.subject_id for f in chunk if f.subject_id not in lifted})
            whose: list[dict[str, Any]] = [{"terms": {subject_field: whole}}] if whole else []
            for subject in sorted({f.subject_id for f in chunk if f.subject_id in lifted}):
                before = {"range": {"event_time": {"lt": lifted[subject]}}}
                whose.append({"bool": {"filter": [{"term": {subject_field: subject}}, before]}})
            query = {"query": {"bool": {"should": whose, "minimum_should_match": 1}}, "_source": list(fields)}
            try:
                for hit in scan(
                    client,
                    index=index_name(index_prefix, kind),
                    query=query,
                    size=1000,
                    ignore_unavailable=True,
                    expand_wildcards="open",
                ):
                    source = hit.get("_source") or {}
                    for name in fields:
                        if isinstance(value := source.get(name), str) and value:
                            found[SIGHTING_FIELDS[name]].add(value)
            except NotFoundError as exc:
                if exc.error != "index_not_found_exception":
                    raise
    return {name: sorted(values) for name, values in found.items() if values}


# --------------------------------------------------------------------------- the memory, past a restart

SIGHTINGS_INDEX_BODY: dict[str, Any] = {
    "settings": {"index": {"number_of_shards": 1, "refresh_interval": "1s"}},
    "mappings": {"dynamic": "strict", "properties": {"until": {"type": "date", "format": "epoch_millis"}}},
}
"""The sink's index of :attr:`Forgotten.sightings` (``<prefix>-forgotten_sightings-all``, read alias
``<prefix>-forgotten_sightings``): one document per :func:`sighting_key` (its id; a digest, no image ref,
transaction id or observation id), with until when it is remembered. Its replica count is the deployment's
(:func:`~schemas.indices.with_replicas`), given where it is created."""


def save_sightings(
    client: OpenSearch, index_prefix: str, until: Mapping[str, int], replicas: int | None = None
) -> str | None:
    """Write ``until`` (:func:`sighting_key` -> until when, ms) to the sink's index, so that a restart finds it
    again (:func:`load_sightings`): before, what named an entrance or lane-view sighting (its image ref) went with the
    restart, and its observation read after it was indexed until its retention. Returns why it must be repeated
    (OpenSearch busy or away for a document), ``None`` once written; raises the client's ``TransportError`` when
    OpenSearch cannot be reached. A write refused for good is logged (its key) and left: the key stays in memory.
    The index is created on the first write, with ``replicas`` replicas (``CG_OPENSEARCH__REPLICAS``: before, always
    none, so a production domain that lost a node lost it)."""
    if not until:
        return None
    alias = index_name(index_prefix, FORGOTTEN_SIGHTINGS_KIND)
    index = single_index_name(index_prefix, FORGOTTEN_SIGHTINGS_KIND)
    if not client.indices.exists(index=index):
        try:
            settings = with_replicas(SIGHTINGS_INDEX_BODY["settings"], replicas)
            body = {**SIGHTINGS_INDEX_BODY, "settings": settings, "aliases": {alias: {}}}
            client.indices.create(index=index, body=body)
        except RequestError as exc:
            if exc.error != "resource_already_exists_exception":
                raise
    actions = ({"_op_type": "index", "_index": index, "_id": key, "_source": {"until": t}} for key, t in until.items())
    problem = None
    for ok, item in streaming_bulk(
        client, actions, chunk_size=500, max_retries=3, raise_on_error=False, raise_on_exception=True
    ):
        if ok:
            continue
        answer = next(iter(item.values())) if isinstance(item, dict) and item else {}
        status, error = answer.get("status"), answer.get("error")
        error_type = error.get("type") if isinstance(error, dict) else error
        if is_retriable(status, error_type if isinstance(error_type, str) else None):
            problem = f"{status} {error_type}"
        else:
            log.warning("forget: OpenSearch refused %s/%s: %s %s", index, answer.get("_id"), status, error_type)
    return problem


def load_sightings(client: OpenSearch, index_prefix: str, now_ms: int) -> dict[str, int]:
    """What :func:`save_sightings` wrote that is still to be remembered after ``now_ms`` (key -> until); empty when
    the index does not exist yet. Raises the client's ``TransportError`` and ``ScanError`` (to be retried)."""
    query = {"query": {"range": {"until": {"gt": now_ms}}}}
    found: dict[str, int] = {}
    try:
        for hit in scan(client, index=index_name(index_prefix, FORGOTTEN_SIGHTINGS_KIND), query=query, size=1000):
            until = (hit.get("_source") or {}).get("until")
            if isinstance(until, int) and until > now_ms:
                found[str(hit["_id"])] = until
    except NotFoundError as exc:
        if exc.error != "index_not_found_exception":
            raise
    return found


def prune_saved_sightings(client: OpenSearch, index_prefix: str, now_ms: int) -> int:
    """Delete what :func:`save_sightings` wrote that is remembered no longer (until ``now_ms`` or before); how many.
    Raises the client's errors: the caller tries again at its next round."""
    query = {"query": {"range": {"until": {"lte": now_ms}}}}
    alias = index_name(index_prefix, FORGOTTEN_SIGHTINGS_KIND)
    try:
        hits = list(scan(client, index=alias, query=query, size=1000))
    except NotFoundError as exc:
        if exc.error != "index_not_found_exception":
            raise
        return 0
    actions = ({"_op_type": "delete", "_index": hit["_index"], "_id": hit["_id"]} for hit in hits)
    return sum(ok for ok, _ in streaming_bulk(client, actions, chunk_size=500, raise_on_error=False))


def _erase_in(client: OpenSearch, route: Route, alias: str, query: dict[str, Any], report: EraseReport) -> None:
    # Documents indexed within the last refresh interval are not searchable yet: make them so first.
    client.indices.refresh(index=alias, ignore_unavailable=True, allow_no_indices=True)
    _warn_closed(client, alias)
    # A closed index under the alias fails the whole search (400 index_closed_exception) without
    # ignore_unavailable: the forget was retried for ever. It is skipped instead (and named above).
    hits = scan(
        client,
        index=alias,
        query=query,
        size=1000,
        seq_no_primary_term=True,
        version=route.keyed,
        ignore_unavailable=True,
        expand_wildcards="open",
    )

    def actions() -> Iterable[dict[str, Any]]:
        for hit in hits:
            action = erase_action(hit, route)
            if action is not None:
                yield action

    done: list[str] = []
    try:
        for ok, item in streaming_bulk(
            client, actions(), chunk_size=500, max_retries=3, raise_on_error=False, raise_on_exception=True
        ):
            _count(ok, item, route, alias, report, done)
    except NotFoundError as exc:
        if exc.error != "index_not_found_exception":  # e.g. the scroll lost mid-scan: not done, the round is repeated
            raise
        # no index of this kind yet: nothing to forget in it
    except ScanError as exc:  # some shard did not answer: what it holds was not reached
        report.problem = f"scan incomplete: {exc}"
    if done:  # ids only: documents hold faces
        shown = ", ".join(done[:20]) + (f" and {len(done) - 20} more" if len(done) > 20 else "")
        verb = "deleted" if route.erased_with_subject else "removed the face fields of"
        log.info("forget: %s %d %s document(s): %s", verb, len(done), route.kind, shown)


def closed_indices(client: OpenSearch, alias: str) -> list[str]:
    """The closed indices of the family behind ``alias`` (``<alias>-*``): a search skips them."""
    try:
        rows = client.cat.indices(index=f"{alias}-*", format="json", h="index,status", expand_wildcards="closed")
    except NotFoundError:
        return []
    return sorted(str(row["index"]) for row in rows or () if row.get("status") == "close")


def _warn_closed(client: OpenSearch, alias: str) -> None:
    """A closed index is not searched, so a forget cannot reach what it holds: name it (never the subject)."""
    for name in closed_indices(client, alias):
        log.warning(
            "forget: index %s is closed and was not searched: documents of the forgotten subject it may hold keep "
            "their image refs until it is opened and the forget is repeated, or retention drops it",
            name,
        )


def _count(ok: bool, item: Any, route: Route, alias: str, report: EraseReport, done: list[str]) -> None:
    """One bulk answer into ``report`` (and ``done``, the ids written)."""
    op, answer = next(iter(item.items())) if isinstance(item, dict) and item else ("", {})
    status, error = answer.get("status"), answer.get("error")
    error_type = error.get("type") if isinstance(error, dict) else error
    if ok:
        (report.deleted if op == "delete" else report.stripped)[route.kind] += 1
        done.append(str(answer.get("_id")))
    elif op == "delete" and status == 404:
        return  # gone already (another sink, a retention drop)
    elif status == 409:
        report.changed_meanwhile += 1
    elif is_retriable(status, error_type if isinstance(error_type, str) else None):
        report.problem = f"{status} {error_type}"
    else:
        report.failed += 1
        index = answer.get("_index") or alias
        log.warning("forget: OpenSearch refused %s/%s: %s %s", index, answer.get("_id"), status, error_type)
        if len(report.refusals) < MAX_REFUSALS_KEPT:
            reason = error.get("reason") if isinstance(error, dict) else None
            report.refusals.append(
                f"{index}/{answer.get('_id')}: {status} {error_type}" + (f": {reason}" if reason else "")
            )
