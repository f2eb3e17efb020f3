"""OpenSearch contract: which topic goes to which index, the index and alias names, the templates.

Every reader and writer of the indices (the sink, the dashboards, the bot, the demo, backtests) takes
names from here, so an index is spelt once. Pure: no client; the templates are ``index_templates/``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.topics import ALERTS, CASES, FACE_OBSERVATIONS, LABELS, MODEL_DRIFT, SCORED_TRANSACTIONS, TopicSpec

DEFAULT_GROUP_ID = "checkout-guard-opensearch"


TEMPLATE_DIR = Path(__file__).resolve().parent / "index_templates"


MAX_TERM_BYTES = 32_766
"""Lucene's limit on one indexed term (UTF-8 bytes): OpenSearch refuses a whole document with a keyword value over it.
The templates give each keyword field ``ignore_above`` (characters; 8191 of at most 4 bytes each stay under it), so
such a value stays in ``_source``, unindexed. None where the value is bounded already (a document id, an enum) or must
be found: a forget finds documents by theirs (``sinks.opensearch.forget.searched_fields``), and the sink refuses a
record with one over this limit instead."""


PERIOD_FORMATS = {"day": "%Y.%m.%d", "month": "%Y.%m"}
"""Suffix of a period index per ``indices.period``; dots keep the name apart from the kind's underscores."""
SINGLE_SUFFIX = "all"
"""Suffix of the one index of a family kept whole (:attr:`Route.single_index`): ``<prefix>-labels-all``."""


@dataclass(frozen=True)
class Route:
    """Where one topic's records go: the index kind (also the template file name), the business key,
    the field that picks the period index, and fields left out unless explicitly wanted."""

    topic: TopicSpec
    kind: str
    id_field: str
    time_field: str = "event_time"
    """The record's time: it picks the period index (and is the index pattern's time field)."""
    private_fields: tuple[str, ...] = ()
    pseudonymised_fields: tuple[str, ...] = ()
    """Customer keys indexed only as :func:`indexed_customer_key` makes them (no e-mail address in clear)."""
    single_index: bool = False
    """One index for all time (``<prefix>-<kind>-all``) instead of one per period: for records whose
    identity outlives any time field of theirs (a transaction's verdict may be decided, and corrected,
    on any day, and must stay one document). Retention never drops it."""
    keyed: bool = False
    """The message key is the document id, as on a compacted topic: a record keyed otherwise is
    refused (it is not ordered with that id's other records), a null value (tombstone) deletes the
    document, and every write carries the message's offset as an external version, so the record
    published last for a key wins even over an older write that reaches OpenSearch later (the key's
    records share one partition, whose offsets only grow)."""
    retention_days: int = 400
    """Days a period index is kept where ``IndicesSettings`` has no ``<kind>_retention_days``."""
    subject_field: str | None = None
    """The field naming the watch-listed subject a document is about: ``forget`` of that subject reaches the
    document (:data:`FORGETTING_ACTIONS`)."""
    face_fields: tuple[str, ...] = ()
    """Face-derived fields (image refs) a forgotten subject's documents lose; the rest (the decision, the
    subject id, the similarity) stays, as the audit keeps the forget itself."""
    erased_with_subject: bool = False
    """The document is the subject's face (a face observation): a forget deletes it, and every document of
    the subject's enrolment sale (``transaction_id``, the buyer whose face was enrolled) with it."""

    def index(self, index_prefix: str) -> str:
        """The read alias of this kind (all its period indices)."""
        return index_name(index_prefix, self.kind)

    def write_index(self, index_prefix: str, time_ms: int, period: str = "day") -> str:
        """The concrete index a record of this time goes to: its period's, or the family's one index."""
        if self.single_index:
            return single_index_name(index_prefix, self.kind)
        return period_index_name(index_prefix, self.kind, time_ms, period)


SCORED_ROUTE = Route(SCORED_TRANSACTIONS, "transactions", "transaction_id", pseudonymised_fields=("customer_key",))
"""Its ``face_subject_id`` and similarity are the decision, not a face: a forget leaves them (no image, no
embedding is indexed with a transaction)."""
LABELS_ROUTE = Route(LABELS, "labels", "transaction_id", time_field="decided_at", single_index=True, keyed=True)
"""Field verdicts, one document per transaction: the verdict in force (the last published, as the
compacted topic keeps it and ``train`` reads it), gone when withdrawn."""
DRIFT_ROUTE = Route(MODEL_DRIFT, "model_drift", "report_id", time_field="hour_start")
"""Hourly drift reports of the fraud model, one document per model version and hour."""
CASES_ROUTE = Route(
    CASES,
    "cases",
    "case_id",
    time_field="opened_at",
    single_index=True,
    keyed=True,
    subject_field="subject_id",
    face_fields=("snapshot_ref", "reference_image_ref"),
)
"""Cases of the human-verification workflow, one document per case: its latest version (a case is decided
on any day after it opened)."""

ROUTES: tuple[Route, ...] = (
    SCORED_ROUTE,
    Route(ALERTS, "alerts", "alert_id", subject_field="subject_id", face_fields=("snapshot_ref",)),
    Route(
        FACE_OBSERVATIONS,
        "face_observations",
        "observation_id",
        private_fields=("embedding",),
        subject_field="subject_id",
        erased_with_subject=True,
    ),
    LABELS_ROUTE,
    DRIFT_ROUTE,
    CASES_ROUTE,
)


FORGOTTEN_SIGHTINGS_KIND = "forgotten_sightings"
"""The OpenSearch sink's own index (``<prefix>-forgotten_sightings-all``, no topic): digests of what names the
sightings the scoring job matched to forgotten subjects, kept while a copy of their face observations can still be
read (``sinks.opensearch.forget``), so a restarted sink still leaves those observations out."""


FORGETTING_ACTIONS = frozenset({"FORGET", "EXPIRE"})
"""Audit actions (``AuditEvent.action`` on ``audit``, by the watchlist service) after which a subject's faces must
be gone from the indices too: a ``forget`` and an expiry, done or found already done (``UNCHANGED``); a ``FAILED``
one left the subject enrolled."""
FORGETTING_OUTCOMES = frozenset({"DONE", "UNCHANGED"})
ENROLLED_SUBJECT_PREFIX = "subj-"
"""``fraud <tx>`` / ``vip <tx>`` enrol the buyer of sale ``<tx>`` as ``subj-<tx>``."""


def enrolment_transaction(subject_id: str, transaction_id: str | None = None) -> str | None:
    """The sale whose buyer was enrolled as ``subject_id``: the audit event's own ``transaction_id``, else the
    one the id names (``subj-<tx>``), else none."""
    if transaction_id:
        return transaction_id
    if subject_id.startswith(ENROLLED_SUBJECT_PREFIX) and len(subject_id) > len(ENROLLED_SUBJECT_PREFIX):
        return subject_id[len(ENROLLED_SUBJECT_PREFIX) :]
    return None


PSEUDONYMOUS_KEY_KINDS = frozenset({"token", "id", "anon"})
"""Customer key kinds (``<kind>:<value>``, ``jobs.scoring.features.customer_key``) indexed as they are: a card
token, a customer id and the anonymous key (a transaction id) name nobody outside the systems that issued
them. Any other kind (``email:<address>``) is indexed only as a keyed hash."""
CUSTOMER_KEY_DIGEST_HEX = 32
"""Hex digits kept of the HMAC-SHA256 (128 bits: no two customers of any chain share one)."""
HASHED_KIND_SUFFIX = "-hmac"
"""What :func:`indexed_customer_key` appends to the kind of a key it hashed (``email-hmac:<hex>``)."""


def indexed_customer_key(key: str, secret: str | None) -> str | None:
    """What an index holds of a customer key: ``token:``, ``id:`` and ``anon:`` keys as they are; any other
    (``email:alice@example.com``) as ``email-hmac:<HMAC-SHA256 of the key under secret, 32 hex>``, the same for
    every transaction of that customer (so "this customer's other transactions" still works), but no address
    an analyst can read or a dictionary of addresses can recover without the secret. ``None`` (the field is
    left out) where there is no secret: an unkeyed hash of an e-mail address is found by hashing guesses."""
    kind = key.partition(":")[0]
    if kind in PSEUDONYMOUS_KEY_KINDS:
        return key
    if not secret:
        return None
    digest = hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:CUSTOMER_KEY_DIGEST_HEX]
    return f"{kind}{HASHED_KIND_SUFFIX}:{digest}"


def is_indexed_customer_key(key: str) -> bool:
    """Whether ``key`` is already what an index may hold (a pseudonymous kind, or a keyed hash), so that
    pseudonymising documents again leaves them as they are instead of hashing a hash."""
    kind = key.partition(":")[0]
    return kind in PSEUDONYMOUS_KEY_KINDS or kind.endswith(HASHED_KIND_SUFFIX)


def default_group_id(topic_prefix: str = "") -> str:
    """``<topic prefix>checkout-guard-opensearch``: sinks of different environments never share a group."""
    return f"{topic_prefix}{DEFAULT_GROUP_ID}"


def index_name(index_prefix: str, kind: str) -> str:
    """``<prefix>-<kind>``, the alias to read (search, count, dashboards); a backtest passes its own prefix."""
    return f"{index_prefix}-{kind}"


def period_index_name(index_prefix: str, kind: str, event_time_ms: int, period: str = "day") -> str:
    """``<prefix>-<kind>-2026.11.22`` (or ``-2026.11``): the index a document of that event time lives in.

    Derived from the record itself, never from the clock, so a replay lands on the same document.
    Raises ``ValueError`` for a time outside years 1..9999 or an unknown period.
    """
    if period not in PERIOD_FORMATS:
        raise ValueError(f"unknown index period {period!r} (day or month)")
    moment = datetime.fromtimestamp(event_time_ms / 1000, tz=UTC)
    return f"{index_name(index_prefix, kind)}-{moment.strftime(PERIOD_FORMATS[period])}"


def single_index_name(index_prefix: str, kind: str) -> str:
    """``<prefix>-<kind>-all``: the one index of a family kept whole (never a period index name)."""
    return f"{index_name(index_prefix, kind)}-{SINGLE_SUFFIX}"


def with_replicas(settings: dict[str, Any], replicas: int | None) -> dict[str, Any]:
    """An index body's ``settings`` with ``index.number_of_replicas`` set to ``replicas``
    (``CG_OPENSEARCH__REPLICAS``); ``None`` leaves it to the cluster's default. The count is the deployment's, not
    the schema's: the local single node can hold no replica, a production domain of several nodes needs one."""
    if replicas is None:
        return settings
    return {**settings, "index": {**settings.get("index", {}), "number_of_replicas": replicas}}


def load_template(kind: str, index_prefix: str, replicas: int | None = None) -> dict[str, Any]:
    """The composable index template ``templates/<kind>.json``, bound to ``<prefix>-<kind>-*`` with the
    read alias ``<prefix>-<kind>``, so an index created by a bulk request joins the alias by itself; its indices get
    ``replicas`` replicas (:func:`with_replicas`)."""
    body = json.loads((TEMPLATE_DIR / f"{kind}.json").read_text())
    alias = index_name(index_prefix, kind)
    body["index_patterns"] = [f"{alias}-*"]
    body["template"]["aliases"] = {alias: {}}
    body["template"]["settings"] = with_replicas(body["template"]["settings"], replicas)
    return body


def _parse_period(index: str, index_prefix: str, kind: str) -> tuple[str, datetime] | None:
    """The period (``day``/``month``) and start of an index named exactly ``<prefix>-<kind>-<period>``."""
    head = f"{index_name(index_prefix, kind)}-"
    if not index.startswith(head):
        return None
    suffix = index[len(head) :]
    for period, fmt in PERIOD_FORMATS.items():
        try:
            start = datetime.strptime(suffix, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if start.strftime(fmt) == suffix:  # strptime accepts "2026.1.2"; we never write that
            return period, start
    return None


def period_of(index: str, index_prefix: str, kind: str) -> tuple[datetime, datetime] | None:
    """``[start, end)`` of the period a period index covers, or ``None`` if ``index`` is not exactly
    ``<prefix>-<kind>-<period>`` (e.g. an index of another prefix that merely starts like ours)."""
    parsed = _parse_period(index, index_prefix, kind)
    if parsed is None:
        return None
    period, start = parsed
    if period == "day":
        return start, datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start, start.replace(year=year, month=month)


def period_kind(index: str, index_prefix: str, kind: str) -> str | None:
    """``day`` or ``month``: the ``indices.period`` a period index was written under; ``None`` for any other
    index. One prefix holds one period: the same document under both would be counted twice by the alias."""
    parsed = _parse_period(index, index_prefix, kind)
    return parsed[0] if parsed else None
