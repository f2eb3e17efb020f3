"""Typed records, one per Avro schema in ``avro/`` (a test keeps the two in step).

Records are frozen dataclasses; ``to_avro`` gives the dict the codec writes and ``from_avro`` the
reverse. Timestamps are epoch milliseconds (UTC) everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self, TypedDict

from schemas.codec import codec
from schemas.errors import InvalidRecord

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
    face_status: str = "UNAVAILABLE"
    face_subject_id: str | None = None
    face_category: str | None = None
    face_similarity: float | None = None
    label: int | None = None


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
    face_status: str
    face_subject_id: str | None
    face_category: str | None
    face_similarity: float | None
    label: int | None


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


OUTCOME_WORDS = {"BLOCK": "blocked", "REVIEW": "held for review", "APPROVE": "approved"}
"""How people read a decision's outcome (alert texts, the bot's answers)."""


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
) -> DeadLetter:
    """The dead letter for an input record: ``error``'s kind and reason, the record's bytes as payload.

    Its id is ``topic:partition:offset``, stable across replays of the same offset; a source without
    offsets (MQTT) passes its own stable ``dead_letter_id``.
    """
    return DeadLetter(
        dead_letter_id=dead_letter_id if dead_letter_id is not None else f"{topic}:{partition}:{offset}",
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        payload=value or b"",
        error_kind=error.kind,
        reason=error.reason,
        stage=stage,
        failed_at=failed_at,
    )


@dataclass(frozen=True, slots=True)
class RuleSetUpdate(Record):
    AVRO_NAME: ClassVar[str] = "RuleSetUpdate"
    version: str
    yaml: str
    published_at: int
    published_by: str


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
)
