"""Typed records, one per Avro schema in ``avro/`` (a test keeps the two in step).

Records are frozen dataclasses; ``to_avro`` gives the dict the codec writes and ``from_avro`` the
reverse. Timestamps are epoch milliseconds (UTC) everywhere.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypedDict

from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.identifiers import check

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """Field names per record class, computed once (``dataclasses.fields`` is slow per call)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


class Record:
    """Mixin: Avro dict conversion and bytes through the shared codec."""

    AVRO_NAME: ClassVar[str]
    _NESTED: ClassVar[dict[str, type[Record]]] = {}

    def to_avro(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _field_names(type(self))}
        for name in self._NESTED:
            out[name] = [v.to_avro() for v in out[name]]
        return out

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        kwargs = dict(data)
        for name, typ in cls._NESTED.items():
            kwargs[name] = tuple(typ.from_avro(v) for v in kwargs.get(name) or ())
        for name in ("reasons",):
            if name in kwargs and isinstance(kwargs[name], list):
                kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)

    def encode(self) -> bytes:
        return codec(self.AVRO_NAME).encode(self.to_avro())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls.from_avro(codec(cls.AVRO_NAME).decode(data))


@dataclass(frozen=True, slots=True)
class LineItem(Record):
    AVRO_NAME: ClassVar[str] = "LineItem"
    sku: str
    category: str
    quantity: int
    unit_price: float


CURRENCY_RE = re.compile(r"[A-Z]{3}")
"""An ISO 4217 code as a transaction carries it (``fullmatch``: ``SEK`` and nothing after it, a newline neither)."""
MAX_AMOUNT = 1e12
"""Above any real basket in any currency (a billion rupiah is about 60,000 USD): a larger amount, finite as it
may be, would overflow the profiles' decayed sums to inf, and inf times a decay of 0 to NaN, kept for months."""
COORDINATE_BOUNDS = {"billing_latitude": 90.0, "billing_longitude": 180.0}
"""The largest magnitude of a transaction's billing coordinates (degrees): a Fraud Detector CSV row's and a Kafka
record's alike."""


@dataclass(frozen=True, slots=True)
class PosTransaction(Record):
    AVRO_NAME: ClassVar[str] = "PosTransaction"
    _NESTED: ClassVar[dict[str, type]] = {"items": LineItem}
    transaction_id: str
    event_time: int
    store_id: str
    lane_id: str
    kind: str
    amount: float
    currency: str
    cashier_id: str | None = None
    original_transaction_id: str | None = None
    items: tuple[LineItem, ...] = ()
    payment_method: str = "card"
    customer_id: str | None = None
    card_bin: str | None = None
    card_token: str | None = None
    customer_email: str | None = None
    customer_name: str | None = None
    customer_job: str | None = None
    billing_phone: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    billing_street: str | None = None
    billing_city: str | None = None
    billing_state: str | None = None
    billing_zip: str | None = None
    billing_country: str | None = None
    billing_latitude: float | None = None
    billing_longitude: float | None = None
    product_category: str | None = None
    label: int | None = None


@dataclass(frozen=True, slots=True)
class DetectedObject(Record):
    AVRO_NAME: ClassVar[str] = "DetectedObject"
    oid: int
    type: str
    x0: float
    y0: float
    x1: float
    y1: float
    frame: int | None = None


@dataclass(frozen=True, slots=True)
class CameraEvent(Record):
    AVRO_NAME: ClassVar[str] = "CameraEvent"
    _NESTED: ClassVar[dict[str, type]] = {"objects": DetectedObject}
    camera_serial: str
    event_time: int
    mqtt_topic: str
    kind: str
    zone_id: str | None = None
    objects: tuple[DetectedObject, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FaceObservation(Record):
    AVRO_NAME: ClassVar[str] = "FaceObservation"
    observation_id: str
    event_time: int
    camera_serial: str
    store_id: str
    trigger: str
    status: str
    lane_id: str | None = None
    transaction_id: str | None = None
    subject_id: str | None = None
    category: str | None = None
    similarity: float | None = None
    quality: float | None = None
    image_ref: str | None = None
    reason: str | None = None
    embedding: list[float] | None = None
    snapshot_of_now: bool = False
    """The camera had no footage of ``event_time``: the image shows when it was asked for (not a checkout's buyer)."""
    matcher: str | None = None
    """``rekognition``: the face stage searched the Rekognition collection for this face (``MATCHED`` with
    ``subject_id`` and Rekognition's ``similarity``, ``NO_MATCH``, or ``UNAVAILABLE`` when the search failed);
    ``None``: the scoring job matches ``embedding`` against its watchlist."""


@dataclass(frozen=True, slots=True)
class ScoredTransaction(Record):
    AVRO_NAME: ClassVar[str] = "ScoredTransaction"
    transaction_id: str
    event_time: int
    store_id: str
    lane_id: str
    kind: str
    amount: float
    currency: str
    item_count: int
    customer_key: str
    outcome: str
    risk_score: int
    reasons: tuple[str, ...]
    rules_version: str
    ingest_time: int
    decided_at: int
    proc_time_ms: int
    model_time_ms: int
    ttdf_ms: int
    cashier_id: str | None = None
    original_transaction_id: str | None = None
    product_category: str | None = None
    customer_id: str | None = None
    card_bin: str | None = None
    billing_state: str | None = None
    billing_country: str | None = None
    indicators: dict[str, float] = field(default_factory=dict)
    model_score: int | None = None
    model_version: str | None = None
    challenger_score: int | None = None
    challenger_version: str | None = None
    face_status: str = "UNAVAILABLE"
    face_subject_id: str | None = None
    face_category: str | None = None
    face_similarity: float | None = None
    label: int | None = None
    face_matcher: str | None = None
    """``local`` or ``rekognition`` for a ``MATCHED`` face: the scale ``face_similarity`` is on."""


class ScoredTransactionAvro(TypedDict):
    """:class:`ScoredTransaction` as the dict the codec writes (its ``to_avro`` shape).

    The scoring job builds this dict directly instead of a dataclass + ``to_avro`` (its hot path encodes
    ~10k records/s); a unit test keeps its keys equal to the dataclass fields and the Avro schema's.
    """

    transaction_id: str
    event_time: int
    store_id: str
    lane_id: str
    kind: str
    amount: float
    currency: str
    item_count: int
    customer_key: str
    outcome: str
    risk_score: int
    reasons: list[str]
    rules_version: str
    ingest_time: int
    decided_at: int
    proc_time_ms: int
    model_time_ms: int
    ttdf_ms: int
    cashier_id: str | None
    original_transaction_id: str | None
    product_category: str | None
    customer_id: str | None
    card_bin: str | None
    billing_state: str | None
    billing_country: str | None
    indicators: dict[str, float]
    model_score: int | None
    model_version: str | None
    challenger_score: int | None
    challenger_version: str | None
    face_status: str
    face_subject_id: str | None
    face_category: str | None
    face_similarity: float | None
    label: int | None
    face_matcher: str | None


@dataclass(frozen=True, slots=True)
class Alert(Record):
    AVRO_NAME: ClassVar[str] = "Alert"
    alert_id: str
    kind: str
    severity: str
    event_time: int
    store_id: str
    summary: str
    lane_id: str | None = None
    transaction_id: str | None = None
    amount: float | None = None
    currency: str | None = None
    outcome: str | None = None
    risk_score: int | None = None
    reasons: tuple[str, ...] = ()
    subject_id: str | None = None
    category: str | None = None
    similarity: float | None = None
    snapshot_ref: str | None = None
    transaction_kind: str | None = None
    matcher: str | None = None
    """``local`` or ``rekognition`` for a face match: the scale ``similarity`` is on."""
    match_threshold: float | None = None
    """The similarity at or above which ``matcher`` took the face for a match (on its scale), for a face match: the
    messages give it beside the similarity, as ``checkout <tx>`` does (Alert v6; ``None`` before)."""
    observation_id: str | None = None
    """The face observation a face match was made on (its ``observation_id``; Alert v6, ``None`` before and for no
    match): what names that sighting once its subject is forgotten, also when its snapshot could not be stored and
    the alert has no ``snapshot_ref`` (the OpenSearch sink's forget, ``sinks.opensearch.forget``)."""


ALERT_NUMBER_BOUNDS = {"amount": (0.0, MAX_AMOUNT), "similarity": (0.0, 100.0), "match_threshold": (0.0, 100.0)}
"""The numbers of an alert that people are shown and the range each is made in: an amount as the scoring job takes
one, a similarity and the threshold it was matched at on the engines' 0-100 scale. Unchecked, a NaN similarity was
sent as "nan% similar", an infinite amount as "inf EUR" and 1e308 as a figure of over 400 digits, by mail and to
Webex, and a case copied the similarity onto the case page. The alert sender and the case service refuse by it."""


def check_alert_numbers(alert: dict[str, Any]) -> None:
    """:class:`InvalidRecord` ``invalid_field`` naming the first of :data:`ALERT_NUMBER_BOUNDS` that is set and outside
    its range (NaN and the infinities included); never the value. ``alert``: an Alert Avro dict."""
    for name, (low, high) in ALERT_NUMBER_BOUNDS.items():
        value = alert.get(name)
        if value is not None and not low <= value <= high:  # NaN fails it too
            raise InvalidRecord("invalid_field", f"{name} is not a number from {low:g} to {high:g}")


class AlertAvro(TypedDict):
    """:class:`Alert` as the dict the codec writes; built directly by the scoring job (see
    :class:`ScoredTransactionAvro`), kept equal to the dataclass and the Avro schema by a unit test."""

    alert_id: str
    kind: str
    severity: str
    event_time: int
    store_id: str
    summary: str
    lane_id: str | None
    transaction_id: str | None
    amount: float | None
    currency: str | None
    outcome: str | None
    risk_score: int | None
    reasons: list[str]
    subject_id: str | None
    category: str | None
    similarity: float | None
    snapshot_ref: str | None
    transaction_kind: str | None
    matcher: str | None
    match_threshold: float | None
    observation_id: str | None


LOCAL_MATCHER, REKOGNITION_MATCHER = "local", "rekognition"
"""Who matched a face (``matcher`` of observations, alerts; ``face_matcher`` of decisions): the scoring job's
search of its watchlist (similarity on the engine's 0-100 scale, threshold ``CG_FACES__MATCH_THRESHOLD``), or the
face stage's search of the Rekognition collection (Rekognition's scale, ``CG_FACES__REKOGNITION_MATCH_THRESHOLD``)."""


OUTCOME_WORDS = {"BLOCK": "blocked", "REVIEW": "held for review", "APPROVE": "approved"}
"""How people read a decision's outcome (alert texts, the bot's answers)."""


ALL_STORES = "all"
"""The ``store_id`` of an alert about every store at once (a ``MODEL_DRIFT`` alert): messages say "all stores"."""


FACE_ALERT_KINDS = frozenset({"WATCHLIST_MATCH", "SUSPECT_ENTERED", "VIP_ARRIVED", "SUSPECT_AT_LANE", "VIP_AT_LANE"})
"""Alert kinds raised by a face match: their case shows the live snapshot beside the enrolled reference image,
and a verdict on one teaches the watchlist (a template, or a false match against the subject)."""
CASE_VERBS = frozenset({"CONFIRM", "DISMISS", "ESCALATE", "ASSIGN", "NOTE"})
"""The :class:`BotCommand` verbs that decide or annotate a case (the case service applies them)."""
MAX_CASE_TEXT = 1000
"""Most characters of a case note or dismissal reason: the case service cuts longer text (a typed Webex command), the
case page's box takes no more and the dashboard refuses more. One limit, so a note the page accepts is kept whole."""
_LINE_BREAKS = {"\r\n": "\n", "\r": "\n", "\u2028": "\n", "\u2029": "\n", "\x85": "\n"}
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
"""Characters that reorder the text shown after them: a note could read as something else than what it says."""


def well_formed(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate as U+FFFD. JSON can carry one (``"\\ud800"``, a string cut inside an
    emoji), no UTF-8 holds one: a command with one in its argument failed to encode when published, so the case page
    answered 500 and the bot "could not record that right now" at every try. A whole pair is read as its character."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def case_text(text: str, cut: bool = True) -> str | None:
    """A note or dismissal reason as a case keeps it: without control characters (terminal escapes, NUL, C1) or
    direction overrides, line breaks as ``\n`` (tabs stay), stripped and cut to :data:`MAX_CASE_TEXT` (unless not
    ``cut``: the bot tells the sender of a longer one); None when
    nothing is left. A case's notes and reason are shown on the case page, in OpenSearch and in the audit; the bot
    and the dashboard ask it too, so a note that would keep nothing is refused where it is written."""
    for old, new in _LINE_BREAKS.items():
        text = text.replace(old, new)
    kept = "".join(c for c in text if c in "\n\t" or (unicodedata.category(c) != "Cc" and c not in _BIDI_CONTROLS))
    kept = kept.strip()
    return (kept[:MAX_CASE_TEXT] if cut else kept) if kept else None


@dataclass(frozen=True, slots=True)
class BotCommand(Record):
    AVRO_NAME: ClassVar[str] = "BotCommand"
    command_id: str
    issued_at: int
    verb: str
    actor: str
    argument: str | None = None
    room_id: str | None = None
    source: str = "webex"


@dataclass(frozen=True, slots=True)
class WatchlistEntry(Record):
    AVRO_NAME: ClassVar[str] = "WatchlistEntry"
    subject_id: str
    category: str
    embeddings: list[list[float]]
    reason: str
    flagged_by: str
    flagged_at: int
    reference_image_ref: str | None = None
    source_transaction_id: str | None = None
    expires_at: int | None = None
    """When the entry is forgotten unless renewed; None (written before v2): ``flagged_at`` + the setting."""
    case_id: str | None = None

    def expiry(self, lifetime_ms: int) -> int:
        """When this entry is forgotten unless renewed, ``lifetime_ms`` being the configured period."""
        return self.expires_at if self.expires_at is not None else self.flagged_at + lifetime_ms


@dataclass(frozen=True, slots=True)
class DeadLetter(Record):
    AVRO_NAME: ClassVar[str] = "DeadLetter"
    dead_letter_id: str
    source_topic: str
    partition: int
    offset: int
    payload: bytes
    error_kind: str
    reason: str
    stage: str
    failed_at: int
    key: bytes | None = None
    payload_size: int = -1
    """Bytes in the whole input (``payload`` may hold only the first ones); filled in from the payload
    for a dead letter written before this field (``-1``), whose payload is always whole."""
    payload_sha256: str = ""
    """Hex SHA-256 of the whole input; filled in like ``payload_size``."""
    payload_truncated: bool = False

    def __post_init__(self) -> None:
        if self.payload_size < 0 and not self.payload_truncated:
            object.__setattr__(self, "payload_size", len(self.payload))
            object.__setattr__(self, "payload_sha256", hashlib.sha256(self.payload).hexdigest())


MAX_DEAD_LETTER_PAYLOAD = 64 * 1024
"""Most payload bytes a dead letter carries: every dead letter must fit the producers' 1 MiB
``max.request.size``, whatever it carries (a 1,048,500-byte input is accepted by the broker, and its
dead letter with the whole payload was not: the job restarted on it forever)."""
MAX_DEAD_LETTER_KEY = 1024
"""Most key bytes a dead letter carries."""
MAX_DEAD_LETTER_REASON = 2048
"""Most UTF-8 bytes of a dead letter's reason."""
MAX_DEAD_LETTER_NAME = 1024
"""Most UTF-8 bytes of its id, source topic, error kind and stage (ids are cut with a hash kept: still unique)."""


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: InvalidRecord,
    stage: str,
    failed_at: int,
    dead_letter_id: str | None = None,
    max_payload_bytes: int = MAX_DEAD_LETTER_PAYLOAD,
) -> DeadLetter:
    """The dead letter for an input record: ``error``'s kind and reason, the record's bytes as payload.

    Its id is ``topic:partition:offset``, stable across replays of the same offset; a source without
    offsets (MQTT) passes its own stable ``dead_letter_id``. It always fits a Kafka record: the payload
    is cut to ``max_payload_bytes`` (its whole size and SHA-256 are kept), the key, reason and names to
    the caps above; ``payload_truncated`` says the payload or the key was cut (not re-drivable as it was).
    """
    payload = value or b""
    return DeadLetter(
        dead_letter_id=_cap_name(dead_letter_id if dead_letter_id is not None else f"{topic}:{partition}:{offset}"),
        source_topic=_cap_name(topic),
        partition=partition,
        offset=offset,
        key=key[:MAX_DEAD_LETTER_KEY] if key is not None else None,
        payload=payload[: max(0, max_payload_bytes)],
        error_kind=_cap_name(error.kind),
        reason=_cap_text(error.reason, MAX_DEAD_LETTER_REASON),
        stage=_cap_name(stage),
        failed_at=failed_at,
        payload_size=len(payload),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_truncated=len(payload) > max_payload_bytes or (key is not None and len(key) > MAX_DEAD_LETTER_KEY),
    )


INPUT_HEADER_PREFIX = "checkout-guard-input:"
"""Prefix of a dead letter's Kafka headers that keep its input record's headers (``checkout-guard-input:cg-signature``
for a signed command's signature): headers, not schema fields, so every dead letter written before decodes as it was,
and prefixed so none is taken for the dead letter's own."""
INPUT_HEADERS_CUT = "checkout-guard-input-headers-cut"
"""Header of a dead letter whose input's headers were too big to keep: the input cannot be re-driven as it was."""
MAX_DEAD_LETTER_HEADERS = 16 * 1024
"""Most bytes (names and values) of an input's headers a dead letter keeps: it must still fit a Kafka record."""


Headers = tuple[tuple[str, bytes | None], ...]
"""Kafka headers as confluent-kafka gives them: ``(name, value)`` pairs, a value may be ``None``."""

REDRIVEN_HEADER = "checkout-guard-redriven-from"
"""The Kafka header a re-driven copy carries (``producers.redrive``): the id of the dead letter it was sent from. The
scoring job reads it so a copy of a transaction whose processing failed after its receipt took its id, on the
partitioned layout, is decided once (:meth:`jobs.scoring.features.Receipt.observe`)."""


def _header_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def dead_letter_headers(headers: Iterable[tuple[str, bytes | str | None]] | None) -> Headers:
    """The Kafka headers of the dead letter of an input with ``headers``: each under :data:`INPUT_HEADER_PREFIX`, all
    or none (past :data:`MAX_DEAD_LETTER_HEADERS`: only :data:`INPUT_HEADERS_CUT`), so re-driving restores them (a
    signed command's signature; without it the re-driven command was refused as unsigned). Never logged: a value
    may be a secret's proof."""
    kept = tuple((f"{INPUT_HEADER_PREFIX}{name}", _header_bytes(value)) for name, value in headers or ())
    if sum(len(name.encode()) + len(value or b"") for name, value in kept) > MAX_DEAD_LETTER_HEADERS:
        return ((INPUT_HEADERS_CUT, b""),)
    return kept


def input_headers(headers: Iterable[tuple[str, bytes | str | None]] | None) -> Headers | None:
    """The input record's headers that a dead letter with Kafka ``headers`` kept (:func:`dead_letter_headers`), in
    their order; ``()`` for a letter that kept none (written before they were kept); ``None`` when they were cut."""
    out = []
    for name, value in headers or ():
        if name == INPUT_HEADERS_CUT:
            return None
        if name.startswith(INPUT_HEADER_PREFIX):
            out.append((name[len(INPUT_HEADER_PREFIX) :], _header_bytes(value)))
    return tuple(out)


def _cap_text(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes: cut at a character boundary, saying how much went."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    note = f"... [{len(data)} bytes, cut]"
    return data[: max(0, limit - len(note))].decode("utf-8", "ignore") + note


def _cap_name(text: str) -> str:
    """An id or name in at most :data:`MAX_DEAD_LETTER_NAME` bytes; a long one keeps a hash of the whole,
    so two ids that differ only past the cut stay apart and a replay gives the same id."""
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_DEAD_LETTER_NAME:
        return text
    suffix = f"...sha256:{hashlib.sha256(data).hexdigest()[:32]}"
    return data[: MAX_DEAD_LETTER_NAME - len(suffix)].decode("utf-8", "ignore") + suffix


@dataclass(frozen=True, slots=True)
class RuleSetUpdate(Record):
    AVRO_NAME: ClassVar[str] = "RuleSetUpdate"
    version: str
    yaml: str
    published_at: int
    published_by: str


WATCHLIST_SERVICE_ACTOR = "watchlist-service"
"""The ``actor`` of the watchlist service's own audit events (``EXPIRE`` of an entry, ``PURGE``): the case
service audits a case's expiry as ``EXPIRE`` too, under its own name."""


WEBEX_REPLY_ROOM = "webex_room_id"
WEBEX_REPLY_PERSON = "webex_person"
"""``details`` keys of the case service's audit event of a verdict given in Webex that it refused (``FAILED``): the
room the bot took it in and the person who gave it (an e-mail address or a Webex person id), where the alert sender
tells them it did not count (sinks/alerts/notices.py). Set only for a command the bot signed."""


def webex_reply_details(cmd: BotCommand) -> dict[str, str]:
    """:data:`WEBEX_REPLY_ROOM` and :data:`WEBEX_REPLY_PERSON` of a command given in Webex (none for another source,
    the dashboard's: its page shows the refusal itself)."""
    if cmd.source != "webex" or not cmd.room_id:
        return {}
    return {WEBEX_REPLY_ROOM: cmd.room_id, WEBEX_REPLY_PERSON: cmd.actor}


@dataclass(frozen=True, slots=True)
class AuditEvent(Record):
    AVRO_NAME: ClassVar[str] = "AuditEvent"
    audit_id: str
    event_time: int
    action: str
    outcome: str
    actor: str
    subject_id: str | None = None
    category: str | None = None
    transaction_id: str | None = None
    command_id: str | None = None
    reason: str | None = None
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelDrift(Record):
    """One event-time hour of the fraud model's inputs and scores against its training data (PSI);
    made by ``jobs.model.drift.DriftMonitor``."""

    AVRO_NAME: ClassVar[str] = "ModelDrift"
    report_id: str
    model_version: str
    hour_start: int
    rows: int
    late_rows: int
    score_psi: float
    feature_psi: dict[str, float]
    worst_psi: float
    alert: bool
    reference_rows: int
    created_at: int
    worst_feature: str | None = None


class ModelDriftAvro(TypedDict):
    """:class:`ModelDrift` as the dict the codec writes; built directly by the drift monitor, kept equal
    to the dataclass and the Avro schema by a unit test."""

    report_id: str
    model_version: str
    hour_start: int
    rows: int
    late_rows: int
    score_psi: float
    feature_psi: dict[str, float]
    worst_feature: str | None
    worst_psi: float
    alert: bool
    reference_rows: int
    created_at: int


LABEL_SOURCES: tuple[str, ...] = ("case", "chargeback", "cli")
"""Where a field label comes from: the human-verification case workflow, a chargeback file, the CLI."""
FRAUD, LEGITIMATE = 1, 0
"""The two verdicts a :class:`Label` carries (as ``PosTransaction.label``)."""
LABEL_WORDS: dict[str, int] = {
    "fraud": FRAUD,
    "1": FRAUD,
    "legit": LEGITIMATE,
    "legitimate": LEGITIMATE,
    "0": LEGITIMATE,
}
"""How a verdict may be written (lower case) in a label file, on the command line and in a CSV's EVENT_LABEL."""
MAX_LABEL_TEXT = 1024
"""Most UTF-8 bytes of a label's ``decided_by`` and ``reason`` (longer text is cut, saying so)."""
_MAX_DECIDED_AT = 4_102_444_800_000
"""2100-01-01T00:00:00Z: a later verdict time is a typo."""


@dataclass(frozen=True, slots=True)
class Label(Record):
    """A confirmed fraud / legitimate verdict on one transaction; build one with :func:`make_label`."""

    AVRO_NAME: ClassVar[str] = "Label"
    label_id: str
    transaction_id: str
    label: int
    source: str
    decided_at: int
    decided_by: str | None = None
    reason: str | None = None
    case_id: str | None = None


def label_id(transaction_id: str, source: str, decided_at: int) -> str:
    """A verdict's id: the same transaction, source and time give the same id (re-publishing repeats)."""
    return f"{source}:{decided_at}:{transaction_id}"


def make_label(
    *,
    transaction_id: object,
    label: object,
    source: str,
    decided_at: int,
    decided_by: str | None = None,
    reason: str | None = None,
    case_id: object = None,
) -> Label:
    """A validated :class:`Label` with its deterministic id; :class:`InvalidRecord` says what is wrong.

    Transaction and case ids must be plain ids (``invalid_id``), the label 1 or 0, the source one of
    :data:`LABEL_SOURCES` and ``decided_at`` between 1970 and 2100 (``invalid``); empty text is None
    and long text is cut to :data:`MAX_LABEL_TEXT` bytes."""
    tx = check(transaction_id, "transaction_id")
    if isinstance(label, bool) or not isinstance(label, int) or label not in (FRAUD, LEGITIMATE):
        raise InvalidRecord("invalid", "label must be 1 (fraud) or 0 (legitimate)")
    if source not in LABEL_SOURCES:
        raise InvalidRecord("invalid", f"source must be one of {', '.join(LABEL_SOURCES)}")
    if isinstance(decided_at, bool) or not isinstance(decided_at, int) or not 0 <= decided_at < _MAX_DECIDED_AT:
        raise InvalidRecord("invalid", "decided_at must be epoch milliseconds between 1970 and 2100")
    return Label(
        label_id=label_id(tx, source, decided_at),
        transaction_id=tx,
        label=label,
        source=source,
        decided_at=decided_at,
        decided_by=_label_text(decided_by),
        reason=_label_text(reason),
        case_id=None if case_id is None or case_id == "" else check(case_id, "case_id"),
    )


def _label_text(text: str | None) -> str | None:
    text = (text or "").strip()
    return _cap_text(text, MAX_LABEL_TEXT) if text else None


CASE_STATES: tuple[str, ...] = ("open", "confirmed", "dismissed", "escalated", "expired")
"""The states of a :class:`Case`; ``open`` and ``escalated`` wait for a verdict, the others are final."""


def case_id_for(alert_id: str) -> str:
    """The case of an alert: ``case-`` + 12 hex of the alert id's SHA-256 (one case per alert, short enough to
    type in Webex); the alert sender links it, the case service opens it."""
    return "case-" + hashlib.sha256(alert_id.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class CaseNote(Record):
    AVRO_NAME: ClassVar[str] = "CaseNote"
    at: int
    actor: str
    text: str


@dataclass(frozen=True, slots=True)
class Case(Record):
    """One alert a person verifies (``jobs.cases``); every change is a new record with ``version`` + 1."""

    AVRO_NAME: ClassVar[str] = "Case"
    _NESTED: ClassVar[dict[str, type]] = {"notes": CaseNote}
    case_id: str
    version: int
    state: str
    kind: str
    store_id: str
    alert_id: str
    summary: str
    opened_at: int
    updated_at: int
    expires_at: int
    updated_by: str
    decided_at: int | None = None
    owner: str | None = None
    verdict: str | None = None
    verdict_reason: str | None = None
    notes: tuple[CaseNote, ...] = ()
    lane_id: str | None = None
    transaction_id: str | None = None
    subject_id: str | None = None
    category: str | None = None
    similarity: float | None = None
    snapshot_ref: str | None = None
    reference_image_ref: str | None = None
    subject_false_matches: int = 0
    fraud_label: int | None = None
    decided_by: str | None = None


TOP_LEVEL_RECORDS: tuple[type[Record], ...] = (
    PosTransaction,
    CameraEvent,
    FaceObservation,
    ScoredTransaction,
    Alert,
    BotCommand,
    WatchlistEntry,
    DeadLetter,
    AuditEvent,
    RuleSetUpdate,
    Label,
    ModelDrift,
    Case,
)
