"""Every Kafka topic of the design, declared once: name, record type, key, layout and config.

``infra`` creates them from this list; producers, the job and the sinks import the names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000

FORGET_WITHIN_A_DAY = {"segment.ms": str(HOUR_MS), "max.compaction.lag.ms": str(DAY_MS)}
"""For a compacted topic whose tombstones erase personal data: Kafka never compacts the segment it writes to,
which rolled only after 7 days (``segment.ms``' default), and then compacts only once the log is dirty enough;
a forgotten subject's embeddings stayed readable from offset 0 meanwhile. With segments of an hour and a
compaction lag of at most a day, a superseded record is gone within about a day, provided the topic is written
to: a segment rolls only on a write, so the service that owns the topic appends :data:`COMPACTION_MARKER`."""

GONE_WITHIN_RETENTION = {"segment.ms": str(HOUR_MS)}
"""For a topic deleted by age whose records hold face embeddings: Kafka deletes a segment only once its newest record
is past ``retention.ms``, so with the default ``segment.ms`` (7 days) a segment written to every day (a store open
daily) kept each embedding in it for up to 7 days past its retention. With segments of an hour a record goes at most
about an hour after its retention. Enforced on an existing topic with its ``retention.ms``."""

COMPACTION_MARKER = b"compaction-marker"
"""Key of the tombstone the owner of a :data:`FORGET_WITHIN_A_DAY` topic appends once per ``segment.ms``
(:func:`marker_due`): on a quiet topic the forget's own tombstone sat in the open segment, so the forgotten
record waited for the next enrolment. Readers take it as a tombstone of a key that never had a record."""


def marker_due(spec: TopicSpec, last_ms: int, now_ms: int) -> bool:
    """Whether the owner of ``spec`` should append :data:`COMPACTION_MARKER` now (last appended at ``last_ms``)."""
    segment_ms = spec.config.get("segment.ms")
    return segment_ms is not None and now_ms - last_ms >= int(segment_ms)


DEFAULT_SEGMENT_MS = 7 * DAY_MS
"""Kafka's ``segment.ms`` where a topic sets none."""


def readable_for_ms(spec: TopicSpec, retention_ms: int | None = None, segment_ms: int | None = None) -> int:
    """How long after it was written a record of ``spec`` may still be read: its retention (``retention_ms`` where a
    setting or the topic as Kafka has it decides it, else the spec's ``retention.ms``) plus its ``segment.ms``
    (``segment_ms``, else the spec's), since Kafka deletes a segment only once its newest record is past the
    retention. A topic with neither keeps its records for ever: ``ValueError``."""
    if retention_ms is None:
        if "retention.ms" not in spec.config:
            raise ValueError(f"topic {spec.name} sets no retention: its records are kept for ever")
        retention_ms = int(spec.config["retention.ms"])
    if segment_ms is None:
        segment_ms = int(spec.config.get("segment.ms", DEFAULT_SEGMENT_MS))
    return retention_ms + segment_ms


@dataclass(frozen=True)
class TopicSpec:
    name: str
    record_type: str
    key: str
    """What the message key is; it decides ordering and, for compacted topics, identity."""
    partitions: int = 3
    config: dict[str, str] = field(default_factory=dict)
    enforced: tuple[str, ...] = ()
    """Keys of ``config`` set on the topic even when it exists already (the others are left as an operator
    may have tuned them): what erasure depends on."""

    def full_name(self, prefix: str = "") -> str:
        return f"{prefix}{self.name}"


TRANSACTIONS = TopicSpec(
    "transactions",
    "PosTransaction",
    key="store_id/lane_id (per-lane order)",
    config={"retention.ms": str(7 * DAY_MS)},
)
CAMERA_EVENTS = TopicSpec(
    "camera_events",
    "CameraEvent",
    key="camera serial",
    config={"retention.ms": str(1 * DAY_MS)},
)
FACE_OBSERVATIONS = TopicSpec(
    "face_observations",
    "FaceObservation",
    key="camera serial",
    config={"retention.ms": str(1 * DAY_MS), **GONE_WITHIN_RETENTION},
    enforced=("retention.ms", *GONE_WITHIN_RETENTION),
)
SCORED_TRANSACTIONS = TopicSpec(
    "processed_transactions",
    "ScoredTransaction",
    key="transaction_id",
    config={"retention.ms": str(30 * DAY_MS)},
)
ALERTS = TopicSpec("alerts", "Alert", key="alert_id", config={"retention.ms": str(30 * DAY_MS)})
COMMANDS = TopicSpec(
    "commands",
    "BotCommand",
    key="command_id",
    partitions=1,
    # The services judge a signed command's freshness by its record's time: the broker's, so that whoever may write
    # the topic cannot replay an old signed command stamped as new (a producer sets its own CreateTime).
    config={"message.timestamp.type": "LogAppendTime"},
    enforced=("message.timestamp.type",),
)
WATCHLIST = TopicSpec(
    "watchlist",
    "WatchlistEntry",
    key="subject_id (null value = forgotten)",
    partitions=1,
    config={
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(DAY_MS),
        **FORGET_WITHIN_A_DAY,
    },
    enforced=tuple(FORGET_WITHIN_A_DAY),
)
RULES = TopicSpec(
    "rules",
    "RuleSetUpdate",
    key='"active" (the latest record is the rule set in force)',
    partitions=1,
    config={"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
)
AUDIT = TopicSpec(
    "audit",
    "AuditEvent",
    key="audit_id",
    partitions=1,
    config={"retention.ms": str(365 * DAY_MS)},
)
DEAD_LETTERS = TopicSpec(
    "dead_letters",
    "DeadLetter",
    key="<topic>:<partition>:<offset> of the bad input",
    config=dict(GONE_WITHIN_RETENTION),
    enforced=tuple(GONE_WITHIN_RETENTION),
)
"""Its retention is a setting (``KafkaSettings.dead_letter_retention_days``): the bad inputs' bytes hold
names, e-mails and addresses, and a refused face observation's or watchlist entry's face embeddings (``forget``
does not reach them: this retention does)."""

LABELS = TopicSpec(
    "labels",
    "Label",
    key="transaction_id (the last verdict published for a transaction is in force; null value = withdrawn)",
    config={
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(30 * DAY_MS),
    },
)
"""Confirmed fraud / legitimate verdicts from the field (``producers.labels``), read by the model's ``train``.
Compacted, never deleted by age: a verdict stays until a later one for the same transaction replaces it; a
withdrawal (tombstone) is kept 30 days so that a reader that was away meanwhile still sees it."""

MODEL_DRIFT = TopicSpec(
    "model_drift",
    "ModelDrift",
    key="report_id (drift:<model_version>:<hour_start>; a re-emitted report overwrites)",
    partitions=1,
    config={"retention.ms": str(90 * DAY_MS)},
)
"""Hourly population stability of the fraud model's features and score against its training data."""

CASES = TopicSpec(
    "cases",
    "Case",
    key="case_id (the latest record is the case; null value = removed by retention)",
    partitions=1,
    config={
        "cleanup.policy": "compact",
        "min.compaction.lag.ms": "0",
        "delete.retention.ms": str(30 * DAY_MS),
        **FORGET_WITHIN_A_DAY,
    },
    enforced=("delete.retention.ms", *FORGET_WITHIN_A_DAY),
)
"""Alerts a person verifies and their verdicts (``jobs.cases.service``); compacted: a case's latest version. A
retention tombstone is kept 30 days, so the OpenSearch sink deletes the case's document even after a long outage;
enforced, as a topic made before that setting (2026-12-03) kept Kafka's 1 day."""

ALL_TOPICS: tuple[TopicSpec, ...] = (
    TRANSACTIONS,
    CAMERA_EVENTS,
    FACE_OBSERVATIONS,
    SCORED_TRANSACTIONS,
    ALERTS,
    COMMANDS,
    WATCHLIST,
    DEAD_LETTERS,
    AUDIT,
    RULES,
    LABELS,
    MODEL_DRIFT,
    CASES,
)
