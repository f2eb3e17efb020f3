"""The project's exceptions: one base, and the one for records the pipeline cannot use.

Every error the project raises on purpose derives from :class:`CheckoutGuardError`, so a caller can
tell ours from a library's. :class:`InvalidRecord` carries the dead-letter ``kind`` and ``reason``:
whatever stage meets a bad record raises it, and :func:`schemas.records.dead_letter` turns it into
the dead letter.
"""

from __future__ import annotations


class CheckoutGuardError(Exception):
    """Base of every exception the project raises on purpose."""


class InvalidRecord(CheckoutGuardError, ValueError):
    """A record the pipeline cannot use; ``kind`` is the dead-letter error kind."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# Dead-letter kinds whose cause lies outside the record, so the same bytes can succeed once it is fixed.
DELIVERY_FAILED = "delivery_failed"
"""The alert sender gave up on a channel (SMTP or Webex down, a bad setting)."""
INTERNAL_ERROR = "internal_error"
"""A per-record failure in the scoring job's own code (a bug, fixed by a new release)."""
FACE_STAGE_ERROR = "face_stage_error"
"""The face stage could not plan or finish an observation (the image store or the face backend failing)."""
UNKNOWN_SCHEMA = "unknown_schema"
"""A writer schema the reader does not have yet (a producer upgraded before its consumers)."""
UNKNOWN_TOPIC = "unknown_topic"
"""The OpenSearch sink had no index for the topic (a sink older than the topic)."""
OPENSEARCH_REJECTED = "opensearch_rejected"
"""OpenSearch refused the document (a mapping or template that was missing or wrong)."""

FORGET_INCOMPLETE = "forget_incomplete"
"""The OpenSearch sink carried out a forget (an ``audit`` record) but OpenSearch refused some of its write-backs
for good (400 per document): image refs of the subject stayed. Permanent: a re-drive would publish the audit
event again, which the other readers of ``audit`` would take for a second forget."""

RETRYABLE_KINDS: frozenset[str] = frozenset(
    {DELIVERY_FAILED, INTERNAL_ERROR, FACE_STAGE_ERROR, UNKNOWN_SCHEMA, UNKNOWN_TOPIC, OPENSEARCH_REJECTED}
)
"""The dead-letter kinds a re-drive can cure. Every other kind is permanent: the record itself is wrong
(``not_avro``, ``invalid*``, ``missing_field``, ``oversized``, ``too_late``, ``unauthorized``,
``duplicate_transaction_id``, ``conflicting_transaction``, ...) and comes
back as the same dead letter; so is a command the watchlist service failed (``rekognition_unavailable``,
``command_error``): it audited the command id, and skips a re-driven copy. An unlisted kind counts as permanent,
so a new way of refusing a record is never re-driven in a loop by default."""


def is_retryable(kind: str) -> bool:
    """Whether a dead letter of ``kind`` can succeed when its input is consumed again (:data:`RETRYABLE_KINDS`)."""
    return kind in RETRYABLE_KINDS
