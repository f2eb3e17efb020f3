"""Scored transactions, alerts, face observations, field labels and model drift from Kafka into
OpenSearch: one document per business key.

Inputs (``schemas.indices.ROUTES``): ``processed_transactions`` (ScoredTransaction, with the challenger
model's score beside the champion's), ``alerts`` (Alert), ``face_observations`` (FaceObservation),
``labels`` (Label, compacted, keyed by transaction id) and ``model_drift`` (ModelDrift), read_committed.
Outputs: one index per period (day or month, ``indices.period``) of each document's time field
(``event_time``; a drift report's ``hour_start``), e.g. ``<index_prefix>-transactions-2026.11.22``, read
through the alias ``<index_prefix>-transactions`` (likewise ``-alerts``, ``-face_observations`` and
``-model_drift``; composable templates in ``schemas/index_templates/``, installed on start, carry the alias
so every new period index joins it); labels go to the one index ``<index_prefix>-labels-all`` (alias
``<index_prefix>-labels``), one document per transaction whatever day its verdict was decided; and
``dead_letters`` for messages that cannot be decoded or that OpenSearch rejects for good (stage
``opensearch-sink``). Every index it creates (by template, and its own) has ``opensearch.replicas`` replicas, and at
start the prefix's existing indices are given that count where they have another (:func:`set_replicas`).
Retention drops whole period indices (``sinks/opensearch/retention.py``, applied
at start and every ``indices.retention_interval_s``); the labels index is kept, like its compacted topic.
Face embeddings are left out of the documents unless ``indices.include_face_embeddings`` is set; a customer
known only by e-mail address is indexed as ``email-hmac:<keyed hash>`` (``indices.customer_key_secret``), never
by the address (``sinks/opensearch/pseudonymise.py`` rewrites documents indexed before that).

Forget: the sink also reads ``audit`` for the watchlist service's ``FORGET`` / ``EXPIRE`` events and deletes the
subject's face observations (its enrolment sale's, and the sightings the job matched to it) and the image refs of
its alerts and cases, before the
batch's offsets are committed; every forgotten subject is remembered (``audit`` is read from its start when the
sink starts), so its faces are never indexed again (:mod:`sinks.opensearch.forget`), and for two days what names the
sightings the job matched to it (image refs, transactions, observation ids), whose observations name nobody: one
read late is left out, or deleted once the alert or decision naming its subject comes. That memory is kept in the
sink's own index too (``<index_prefix>-forgotten_sightings-all``, digests only), so a restart does not lose it.

Why nothing is lost or doubled: the document ``_id`` is the business key (``transaction_id`` /
``alert_id`` / ``observation_id``) with op ``index``, and the period index follows from the record's own
``event_time``, so a replay overwrites the same document in the same index. An ``UNAVAILABLE`` face observation
goes in with op ``create`` instead (:func:`never_replaces`): a transaction sent again after the face stage's lag
limit gets one under the id of its real observation, which it must not replace; OpenSearch's 409 for it is the
write done (``kept``), and a real observation still replaces an ``UNAVAILABLE`` one. Likewise a scored
transaction decided again without a face (``face_status`` ``UNAVAILABLE``: a job started without state) keeps
the face fields of its indexed document (:func:`keep_faces`, one ``mget`` per batch that holds one). A scored
transaction is written with its ``decided_at`` as external version (:data:`VERSIONED_BY`): a batch finished late by
a sink that lost its partitions cannot put an older decision over a newer one (409, counted ``stale``).
Offsets are committed (last offset + 1 per partition) only after OpenSearch acknowledged every document of the batch and
its dead letters are flushed, so a crash replays from the last commit. While OpenSearch is down or
overloaded (connection errors, 429, 5xx) the batch is kept and retried forever with bounded,
jittered exponential backoff; the partitions are paused meanwhile so the consumer stays in its group. A
request refused as a whole for what it holds (400, 413) is halved until the document it is refused for is
alone, and that one is dead-lettered: a document never holds the batch for ever.

Labels follow the topic's own rule, the one ``train`` reads them by: the verdict published last for a
transaction is in force, and a tombstone withdraws it (the document is deleted). Each label write
carries the message's Kafka offset as an external version (``external_gte``), so a write older than the
document -- a replay, a consumer that lost its partition finishing its batch late -- is refused by
OpenSearch (409, counted as ``stale``, nothing to retry). A re-created ``labels`` topic starts its offsets again at 0,
so its verdicts for transactions already indexed are refused as stale until the labels index is rebuilt (delete
``<index_prefix>-labels-all`` and read the topic again from its start); a label keyed by anything but its transaction
id is dead-lettered (``invalid_key``), as is a verdict other than 1 or 0 (``invalid_field``). The
latest ``decided_at`` does not decide: a chargeback dated before an analyst's verdict but published after
it is the correction (``jobs.model.labels`` explains why compaction forces that rule).

Mappings are ``dynamic: strict``: a field the template does not know is rejected and dead-lettered instead of being
guessed into a type dashboards then depend on; a unit test keeps the templates and the Avro schemas in step. The maps
of named numbers (``indicators``, ``feature_psi``) map the names the code defines as double and keep any other in
``_source`` unmapped (``dynamic: false``), and a record whose keys are not names, or too many, is dead-lettered
``invalid_field`` (:data:`NAMED_VALUES`): mapped as they came, they could fill an index's 1,000 fields. A keyword
field has ``ignore_above`` (a longer value stays in ``_source``, unindexed, where one over Lucene's term limit made
OpenSearch refuse the document), but a document id, an enum and a field a forget finds documents by, which is indexed
whole: a record with one over the limit is dead-lettered ``invalid_field`` (:data:`SEARCHED_FIELDS`).

Only ids, counts and error types are logged: documents can hold personal data.

Metrics (``infra.metrics``, stage ``opensearch-sink``): records in by topic kind (``transactions``,
``alerts``, ``face_observations``, ``labels``, ``model_drift``, ``cases``, ``audit``; ``unknown``), documents
written by the same kinds (a label tombstone's delete included, a stale label and a kept ``UNAVAILABLE``
observation not) and ``forgotten_<kind>`` (deleted or stripped by a forget),
``cg_skipped_total{reason=forgotten_subject}`` (dropped or stripped at write time),
``cg_skipped_total{reason=stale_<kind>}`` (versioned writes refused as stale, :data:`STALE_REASON`; each batch that
had some logs one warning with the counts), dead letters by error kind, and
``cg_processing_seconds`` per batch (consume to commit, retries included). ``/healthz`` turns 503 while
OpenSearch or the dead-letter topic does not answer ("OpenSearch unreachable" / "Kafka unreachable").

Run: ``python -m sinks.opensearch.sink [--index-prefix PREFIX] [--group-id GROUP]``
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from opensearchpy import OpenSearch
from opensearchpy.exceptions import NotFoundError, RequestError, TransportError
from opensearchpy.helpers import ScanError, scan, streaming_bulk

from infra import clock, metrics
from infra.clients import kafka as kafka_clients
from infra.clients.opensearch import is_retriable, make_client
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import StopRequest, done_by, exit_deadline, stop_asked_at, stop_on_signals, time_left
from infra.retry import Backoff, call_with_retries
from infra.settings import IndicesSettings, Settings, get_settings
from schemas.codec import DecodeError, codec, json_safe
from schemas.errors import FORGET_INCOMPLETE, OPENSEARCH_REJECTED, UNKNOWN_TOPIC, CheckoutGuardError, InvalidRecord
from schemas.identifiers import ALERT_ID_RE
from schemas.identifiers import check as check_id
from schemas.indices import (
    DEFAULT_GROUP_ID,
    FORGOTTEN_SIGHTINGS_KIND,
    HASHED_KIND_SUFFIX,
    MAX_TERM_BYTES,
    PSEUDONYMOUS_KEY_KINDS,
    ROUTES,
    Route,
    default_group_id,
    index_name,
    indexed_customer_key,
    is_indexed_customer_key,
    load_template,
    period_kind,
    period_of,
    single_index_name,
)
from schemas.records import FRAUD, LEGITIMATE, DeadLetter, case_text
from schemas.topics import AUDIT, DEAD_LETTERS
from sinks.opensearch.forget import (
    EraseReport,
    Forget,
    Forgotten,
    enrolment_of,
    erase_forgotten,
    erase_sightings,
    forget_of,
    load_sightings,
    matched_sightings,
    prune_saved_sightings,
    save_sightings,
    searched_fields,
)

log = logging.getLogger(__name__)

AUDIT_READ_TIMEOUT_S = 20.0
"""The start-up read of ``audit``: how long Kafka's metadata may take, and how long the read may go without a
record before it is tried again; below the heartbeat's 60 s, so ``/healthz`` stays alive while it waits."""

STAGE = "opensearch-sink"
MAX_ID_BYTES = 512
"""OpenSearch's limit on a document ``_id`` (UTF-8 bytes). A longer one fails the whole bulk request (400
``action_request_validation_exception``), not its own item, so it must be refused before the request is sent:
otherwise the batch is retried for ever and nothing after it is indexed."""


# --------------------------------------------------------------------------- templates and period indices


def install_templates(
    client: OpenSearch,
    index_prefix: str,
    period: str = "day",
    now_ms: int | None = None,
    customer_key_secret: str | None = None,
    replicas: int | None = None,
) -> list[str]:
    """Install the templates and make sure each alias resolves with the current mapping; safe to repeat.

    The current period's index is created up front so the alias, counts and dashboards work before
    the first document; existing period indices get fields added since they were created (put_mapping
    accepts additive changes). A concrete index left by the single-index layout under the alias's name
    is first moved into period indices (:func:`migrate_legacy_index`, customer keys pseudonymised with
    ``customer_key_secret`` on the way). Raises :class:`IndexPeriodConflict`,
    before changing anything, when the prefix holds period indices of another ``period`` (:func:`check_period`).
    The templates give new indices ``replicas`` replicas (``CG_OPENSEARCH__REPLICAS``), and the prefix's existing
    indices (the sink's own too) that have another count are given it (:func:`set_replicas`); ``None`` leaves both
    to the cluster.
    """
    check_period(client, index_prefix, period)
    now = now_ms if now_ms is not None else clock.now_ms()
    names, every_index = [], list[str]()
    for route in ROUTES:
        alias = route.index(index_prefix)
        body = load_template(route.kind, index_prefix, replicas)
        if client.indices.exists(index=alias) and not client.indices.exists_alias(name=alias):
            # An index may not be created with an alias named like an existing index: copy first.
            client.indices.put_index_template(
                name=alias, body={**body, "template": {k: v for k, v in body["template"].items() if k != "aliases"}}
            )
            migrate_legacy_index(client, route, index_prefix, period, customer_key_secret)
        client.indices.put_index_template(name=alias, body=body)
        create_indices(client, [route.write_index(index_prefix, now, period)])
        existing = sorted(family_indices(client, index_prefix, route))
        if existing:
            client.indices.update_aliases(body={"actions": [{"add": {"indices": existing, "alias": alias}}]})
        for chunk in range(0, len(existing), 50):  # index names go in the URL: keep it short
            put_mappings(client, existing[chunk : chunk + 50], body["template"]["mappings"])
        names.append(alias)
        every_index += existing
    if replicas is not None:
        own = single_index_name(index_prefix, FORGOTTEN_SIGHTINGS_KIND)
        every_index += [own] if client.indices.exists(index=own) else []
        try:
            changed = set_replicas(client, every_index, replicas)
        except TransportError as exc:
            if is_retriable(exc.status_code, str(exc.error)):
                raise  # the cluster's trouble: the start tries again
            # Refused for good (a user without the right, the cluster's shard limit): the old indices keep their
            # count, and the sink still indexes, rather than not starting at all.
            log.warning(
                "OpenSearch refused to give the existing indices of %s %d replicas (%s); new indices get them. Let "
                "the sink's user update their settings, or set index.number_of_replicas on them by hand",
                index_prefix,
                replicas,
                _short(exc),
            )
        else:
            if changed:
                log.info("index.number_of_replicas set to %d on %d existing index(es)", replicas, len(changed))
    return names


FIELD_LIMIT_REFUSAL = "Limit of total fields"
"""How OpenSearch's refusal of a mapping past ``index.mapping.total_fields.limit`` begins (its reason)."""


def put_mappings(client: OpenSearch, names: Sequence[str], mappings: dict[str, Any]) -> None:
    """``mappings`` added to the existing indices ``names`` (put_mapping takes additive changes, and a keyword field's
    ``ignore_above``). An index whose
    mapping already reached OpenSearch's field limit (its :data:`NAMED_VALUES` mapped as they came, before they were
    mapped by name) refuses the named fields it lacks, and the sink would never start: it is given the rest of the
    mapping (``ignore_above`` too) with only ``dynamic: false`` on those maps instead (only that, where it lacks other
    fields too), which adds no named field, so it stops refusing each document with a new name, with a
    WARNING naming it (the names it lacks stay unmapped there: in ``_source``, not searchable)."""
    try:
        client.indices.put_mapping(index=",".join(names), body=mappings)
    except RequestError as exc:
        if FIELD_LIMIT_REFUSAL not in str(exc):
            raise
        if len(names) > 1:  # which of them is full: each on its own
            for name in names:
                put_mappings(client, [name], mappings)
            return
        closed = {n: {"type": "object", "dynamic": False} for n in NAMED_VALUES.values() if n in mappings["properties"]}
        if not closed:
            raise
        try:
            client.indices.put_mapping(
                index=names[0], body={**mappings, "properties": {**mappings["properties"], **closed}}
            )
        except RequestError as again:
            if FIELD_LIMIT_REFUSAL not in str(again):
                raise
            client.indices.put_mapping(index=names[0], body={"properties": closed})  # it lacks other fields too
        log.warning(
            "%s reached OpenSearch's limit of fields (index.mapping.total_fields.limit): its %s no longer map new "
            "names, and the names the code defines that it lacks stay unmapped there (kept in each document, not "
            "searchable) until its period ends",
            names[0],
            " and ".join(sorted(closed)),
        )


def set_replicas(client: OpenSearch, names: Sequence[str], replicas: int) -> list[str]:
    """Give each of ``names`` ``replicas`` replicas where it has another count; the names changed.

    The templates give new indices the count, but an index created before (under the old templates' 0, or another
    ``CG_OPENSEARCH__REPLICAS``) kept its own, and a production domain that lost a node lost its data and went red:
    ``index.number_of_replicas`` is dynamic, so it is changed in place, without a reindex (OpenSearch copies the
    shards in the background). Only indices with another count are asked, so a repeated start changes nothing.
    """
    changed: list[str] = []
    options = {"ignore_unavailable": "true", "expand_wildcards": "open,closed"}  # one deleted meanwhile is no error
    for chunk in range(0, len(names), 50):  # index names go in the URL: keep it short
        answer = client.indices.get_settings(
            index=",".join(names[chunk : chunk + 50]), name="index.number_of_replicas", params=options
        )
        other = sorted(
            name
            for name, body in answer.items()
            if str(body.get("settings", {}).get("index", {}).get("number_of_replicas")) != str(replicas)
        )
        if other:
            client.indices.put_settings(
                index=",".join(other), body={"index": {"number_of_replicas": replicas}}, params=options
            )
            changed += other
    return changed


class IndexPeriodConflict(CheckoutGuardError):
    """The prefix holds period indices of another ``indices.period`` than the one configured."""


def other_period_indices(names: Iterable[str], index_prefix: str, kind: str, period: str) -> dict[str, list[str]]:
    """The period indices of ``kind`` among ``names`` that another period than ``period`` wrote, by period."""
    out: dict[str, list[str]] = {}
    for name in sorted(names):
        found = period_kind(name, index_prefix, kind)
        if found is not None and found != period:
            out.setdefault(found, []).append(name)
    return out


def check_period(client: OpenSearch, index_prefix: str, period: str) -> None:
    """Refuse a period other than the one the prefix's indices were written under.

    A document's index follows from its time *and* the period, and ``_id`` is unique per index only: with
    ``day`` indices there, a ``month`` sink would write every replayed transaction, alert and face observation
    a second time into the month index, and the alias would count it twice. So a prefix keeps one period
    for good; a different one needs a fresh prefix (a backtest copy's) or the old indices deleted first.
    """
    found: dict[str, list[str]] = {}
    for route in ROUTES:
        if route.single_index:
            continue
        for other, names in other_period_indices(
            period_indices(client, index_prefix, route.kind), index_prefix, route.kind, period
        ).items():
            found.setdefault(other, []).extend(names)
    if not found:
        return
    other = sorted(found)[0]
    names = found[other]
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    raise IndexPeriodConflict(
        f"CG_INDICES__PERIOD is {period!r}, but the prefix {index_prefix!r} already holds {other!r} indices "
        f"({names[0]}{more}): a document indexed under both periods would be counted twice under the alias. "
        f"Set CG_INDICES__PERIOD={other} again, or write {period!r} indices under a fresh prefix "
        f"(CG_OPENSEARCH__INDEX_PREFIX, as a backtest copy does), or delete the {other!r} indices first "
        f"(their documents are then indexed again only if their topics still hold them)."
    )


def create_indices(client: OpenSearch, names: Iterable[str]) -> None:
    """Create the indices that do not exist yet; their template supplies settings, mapping and alias."""
    for name in names:
        if client.indices.exists(index=name):
            continue
        try:
            client.indices.create(index=name)
        except RequestError as exc:
            if exc.error != "resource_already_exists_exception":  # another sink created it meanwhile
                raise


def period_indices(client: OpenSearch, index_prefix: str, kind: str) -> dict[str, int]:
    """The period indices of one kind and prefix with their creation time (epoch ms)."""
    answer = client.indices.get_settings(
        index=f"{index_name(index_prefix, kind)}-*",
        name="index.creation_date",
        params={"allow_no_indices": "true", "expand_wildcards": "open,closed"},
    )
    return {
        name: int(body["settings"]["index"]["creation_date"])
        for name, body in answer.items()
        if period_of(name, index_prefix, kind) is not None
    }


def family_indices(client: OpenSearch, index_prefix: str, route: Route) -> list[str]:
    """Every concrete index of one route: its period indices, or its single index where it exists."""
    if route.single_index:
        name = single_index_name(index_prefix, route.kind)
        return [name] if client.indices.exists(index=name) else []
    return list(period_indices(client, index_prefix, route.kind))


def migrate_legacy_index(
    client: OpenSearch, route: Route, index_prefix: str, period: str, customer_key_secret: str | None = None
) -> int:
    """Copy a pre-alias concrete index ``<prefix>-<kind>`` into period indices, then delete it.

    Client-side (scroll + bulk): the integ-test server has no reindex module. Same ids, so an
    interrupted migration is simply repeated; the old index goes only after every copy is acknowledged or
    refused for good. A document OpenSearch refuses for good (a 400: a field today's mapping does not take) was
    a ``BulkIndexError`` that stopped the sink's start for ever: it is now logged (ids only) and counted, and
    the rest goes on (the topic still holds it for a replay, within its retention). The cluster's own trouble
    (429, 5xx, a write block) raises ``TransportError`` before the old index is deleted, so the start retries it.
    Customer keys are copied as the sink writes them now (:func:`pseudonymise`): an index that old
    predates the keyed hash and may hold e-mail addresses.
    """
    legacy = route.index(index_prefix)

    def actions() -> Iterable[dict[str, Any]]:
        for hit in scan(client, index=legacy, query={"query": {"match_all": {}}}, size=1000):
            source = hit["_source"]
            pseudonymise(source, route, customer_key_secret)
            yield {
                "_op_type": "index",
                "_id": hit["_id"],
                "_source": source,
                "_index": route.write_index(index_prefix, int(source.get(route.time_field) or 0), period),
            }

    copied, refused, retry = 0, list[str](), list[str]()
    for ok, item in streaming_bulk(
        client, actions(), chunk_size=1000, max_retries=3, raise_on_error=False, raise_on_exception=True
    ):
        if ok:
            copied += 1
            continue
        answer: dict[str, Any] = next(iter(item.values()), {}) if isinstance(item, dict) else {}
        error = answer.get("error")
        error_type = error.get("type") if isinstance(error, dict) else (str(error) if error else None)
        failure = f"{answer.get('_id')} ({answer.get('status')} {error_type})"
        (retry if is_retriable(answer.get("status"), error_type) else refused).append(failure)
    if retry:  # the cluster's trouble: the whole (idempotent) migration is repeated, the old index kept
        raise TransportError(
            503, f"moving {legacy} into period indices: {len(retry)} document(s) to retry, e.g. {retry[0]}"
        )
    if refused:  # ids only: documents hold personal data
        shown = ", ".join(refused[:20]) + (f" and {len(refused) - 20} more" if len(refused) > 20 else "")
        log.warning(
            "moving %s into period indices: OpenSearch refused %d document(s) for good, not copied: %s",
            legacy,
            len(refused),
            shown,
        )
    client.indices.refresh(index=f"{legacy}-*")
    with contextlib.suppress(NotFoundError):  # another sink finished the same migration first
        client.indices.delete(index=legacy)
    log.info("moved %d document(s) of the single index %s into its period indices", copied, legacy)
    return copied


@dataclass
class PseudonymiseReport:
    """What :func:`pseudonymise_indexed_keys` found and did, per concrete index."""

    found: Counter[str] = field(default_factory=Counter)
    """Documents whose customer key was not in its indexed form."""
    rewritten: Counter[str] = field(default_factory=Counter)
    """Of those, written back with the keyed hash (with a secret) or without the key (without one)."""
    changed_meanwhile: Counter[str] = field(default_factory=Counter)
    """Written by the sink between read and write (409): the sink wrote them pseudonymised; a new run checks."""
    failed: Counter[str] = field(default_factory=Counter)
    """Refused for another reason; running the command again retries them."""


def pseudonymise_hit(hit: dict[str, Any], route: Route, secret: str | None) -> dict[str, Any] | None:
    """The bulk action that rewrites one scanned document with its customer keys pseudonymised, or ``None``
    when they already are. The whole source is indexed again (removing a field takes a script otherwise,
    and the integ-test server has no scripting), guarded by the hit's sequence number, so a document the
    sink wrote since it was read is refused (409) instead of being overwritten with the older copy."""
    source = dict(hit["_source"])
    if not pseudonymise(source, route, secret):
        return None
    action = {"_op_type": "index", "_index": hit["_index"], "_id": hit["_id"], "_source": source}
    if "_seq_no" in hit and "_primary_term" in hit:
        action |= {"if_seq_no": hit["_seq_no"], "if_primary_term": hit["_primary_term"]}
    return action


def raw_customer_key_query(route: Route) -> dict[str, Any]:
    """Documents with a customer key that is neither a pseudonymous kind nor a keyed hash (a superset of what
    :func:`pseudonymise_hit` rewrites, which decides per document)."""
    keep = [
        {"prefix": {name: f"{kind}:"}} for name in route.pseudonymised_fields for kind in sorted(PSEUDONYMOUS_KEY_KINDS)
    ]
    keep += [{"wildcard": {name: f"*{HASHED_KIND_SUFFIX}:*"}} for name in route.pseudonymised_fields]
    present = [{"exists": {"field": name}} for name in route.pseudonymised_fields]
    return {"query": {"bool": {"should": present, "minimum_should_match": 1, "must_not": keep}}}


def pseudonymise_indexed_keys(
    client: OpenSearch, index_prefix: str, secret: str | None, dry_run: bool = False
) -> PseudonymiseReport:
    """Rewrite every document of the prefix whose customer key is not in its indexed form (an ``email:``
    address indexed before the sink hashed it) to the form the sink writes now (:func:`pseudonymise`).

    Client-side scan + bulk, per concrete index (period indices, and a legacy single index not yet moved).
    Idempotent: a rewritten document no longer matches, so an interrupted run is finished by running again.
    """
    report = PseudonymiseReport()
    for route in ROUTES:
        if not route.pseudonymised_fields:
            continue
        names = sorted(family_indices(client, index_prefix, route))
        legacy = route.index(index_prefix)
        if client.indices.exists(index=legacy) and not client.indices.exists_alias(name=legacy):
            names.append(legacy)
        for name in names:
            _pseudonymise_index(client, name, route, secret, dry_run, report)
    return report


def _pseudonymise_index(
    client: OpenSearch, index: str, route: Route, secret: str | None, dry_run: bool, report: PseudonymiseReport
) -> None:
    hits = scan(client, index=index, query=raw_customer_key_query(route), size=1000, seq_no_primary_term=True)

    def actions() -> Iterable[dict[str, Any]]:
        for hit in hits:
            action = pseudonymise_hit(hit, route, secret)
            if action is not None:
                report.found[index] += 1
                yield action

    if dry_run:
        for _ in actions():
            pass
        return
    for ok, item in streaming_bulk(
        client, actions(), chunk_size=500, max_retries=3, raise_on_error=False, raise_on_exception=True
    ):
        answer: dict[str, Any] = next(iter(item.values()), {}) if isinstance(item, dict) else {}
        if ok:
            report.rewritten[index] += 1
        elif answer.get("status") == 409:
            report.changed_meanwhile[index] += 1
        else:
            report.failed[index] += 1
    client.indices.refresh(index=index)


# --------------------------------------------------------------------------- retention

DAY_MS = 24 * 3600 * 1000


def retention_days(indices: IndicesSettings, kind: str) -> int:
    """Days one index family is kept (``indices.<kind>_retention_days``, else the route's default); 0 = forever.
    A family kept in one index (labels) is never dropped."""
    route = next((r for r in ROUTES if r.kind == kind), None)
    if route is not None and route.single_index:
        return 0
    setting = getattr(indices, f"{kind}_retention_days", None)
    if setting is None and route is None:
        raise ValueError(f"no retention for index kind {kind!r}")
    return int(setting if setting is not None else route.retention_days)  # type: ignore[union-attr]


def expired_indices(
    created: dict[str, int],
    index_prefix: str,
    kind: str,
    keep_days: int,
    now_ms: int,
) -> list[str]:
    """The period indices to drop: their period ended, and they were created, over ``keep_days`` ago.

    Both, because the period alone would drop a replay of old history at once, and the creation time
    alone would drop a month index while it still holds recent days. Names that are not exactly
    ``<prefix>-<kind>-<period>`` are never returned.
    """
    if keep_days <= 0:
        return []
    cutoff = now_ms - keep_days * DAY_MS
    out = []
    for name, created_ms in sorted(created.items()):
        span = period_of(name, index_prefix, kind)
        if span is not None and span[1].timestamp() * 1000 <= cutoff and created_ms <= cutoff:
            out.append(name)
    return out


def apply_retention(
    client: OpenSearch,
    index_prefix: str,
    indices: IndicesSettings,
    now_ms: int | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete the expired period indices of every kind (the integ-test OpenSearch has no ISM plugin);
    return their names. Never deletes the current period's index (its period has not ended)."""
    now = now_ms if now_ms is not None else clock.now_ms()
    doomed: list[str] = []
    for route in ROUTES:
        keep = retention_days(indices, route.kind)
        if keep > 0:
            doomed += expired_indices(
                period_indices(client, index_prefix, route.kind), index_prefix, route.kind, keep, now
            )
    if doomed and not dry_run:
        for chunk in range(0, len(doomed), 50):  # keep the URL short
            # One index of the list gone meanwhile (another sink, the retention command from cron) must not
            # fail the whole request: without ignore_unavailable none of the chunk's other indices went.
            client.indices.delete(index=",".join(doomed[chunk : chunk + 50]), ignore_unavailable=True)
        log.info("retention: deleted %d index(es): %s", len(doomed), ", ".join(doomed))
    return doomed


# --------------------------------------------------------------------------- pure pieces


@dataclass(frozen=True)
class IndexAction:
    """One bulk ``index`` action and the message it came from (for a dead letter if it is rejected)."""

    op: dict[str, Any]
    message: Message
    kind: str = ""
    """The route's kind (``transactions``, ``labels``...): the metric label of the written document."""

    @property
    def doc_id(self) -> str:
        return self.op["_id"]


def dead_letter_for(message: Message, error_kind: str, reason: str, failed_at: int) -> DeadLetter:
    return kafka_clients.message_dead_letter(message, error_kind, reason, stage=STAGE, failed_at=failed_at)


def to_document(record: dict[str, Any], drop: Iterable[str] = ()) -> dict[str, Any]:
    """The Avro dict as an OpenSearch document without the ``drop`` fields; NaN/inf become null
    because JSON cannot carry them."""
    dropped = set(drop)
    return {name: json_safe(value) for name, value in record.items() if name not in dropped}


def to_actions(
    batch: Iterable[Message],
    *,
    index_prefix: str,
    topic_prefix: str = "",
    now_ms: int | None = None,
    period: str = "day",
    include_private: bool = False,
    customer_key_secret: str | None = None,
    forgotten: Forgotten | None = None,
) -> tuple[list[IndexAction], list[DeadLetter]]:
    """Decode a batch into bulk actions keyed by business id, and dead letters for what cannot be used.

    Each document goes to the index of its own time field (:meth:`Route.write_index`); private fields
    (face embeddings) are left out unless ``include_private``; customer keys are indexed as
    :func:`~schemas.indices.indexed_customer_key` makes them with ``customer_key_secret``, never an e-mail
    address in clear. A forgotten subject's face observation is left out, and its alerts and cases go in
    without their face fields (``forgotten``, :mod:`sinks.opensearch.forget`). On a keyed route (labels) a tombstone
    becomes a ``delete`` of the key's document and every action carries the message offset as its
    external version.

    A later message for the same document supersedes an earlier one in the batch: one bulk request
    applies them in order anyway, and keeping only the last means a partial retry can never write an
    older version last. A ``create`` (:func:`never_replaces`) supersedes nothing: it would not have replaced
    the earlier one either, and neither does a write of a lower version (:data:`VERSIONED_BY`).
    """
    routes = {route.topic.full_name(topic_prefix): route for route in ROUTES}
    now = now_ms if now_ms is not None else clock.now_ms()
    actions: dict[tuple[str, str], IndexAction] = {}
    dead: list[DeadLetter] = []
    for message in batch:
        route = routes.get(message.topic() or "")
        if route is None:
            dead.append(dead_letter_for(message, UNKNOWN_TOPIC, f"no index for topic {message.topic()!r}", now))
            continue
        try:
            op = _operation(message, route, index_prefix, period, include_private, customer_key_secret, forgotten, now)
        except _Unusable as exc:
            dead.append(dead_letter_for(message, exc.kind, exc.reason, now))
            continue
        if op is None:
            continue
        key = (op["_index"], op["_id"])
        if op["_op_type"] == "create" and key in actions:
            continue  # written after the earlier one, it would be refused (409): the earlier one stands
        if key in actions and op.get("version", 0) < actions[key].op.get("version", 0):
            continue  # an older decision sent again later (a redrive): OpenSearch would refuse it too
        previous = actions.pop(key, None)  # re-insert so the order is that of the last occurrence
        if previous is not None and route.kind == FACE_KEEPING_KIND:
            with_kept_face(op, previous.op.get("_source") or {})  # the earlier decision's face, as in the index
        actions[key] = IndexAction(op=op, message=message, kind=route.kind)
    return list(actions.values()), dead


class _Unusable(CheckoutGuardError):
    """A message that cannot become a document; ``kind`` and ``reason`` go into its dead letter."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


def _operation(
    message: Message,
    route: Route,
    index_prefix: str,
    period: str,
    include_private: bool,
    customer_key_secret: str | None = None,
    forgotten: Forgotten | None = None,
    now_ms: int = 0,
) -> dict[str, Any] | None:
    """The bulk operation for one message of ``route``, ``None`` for a forgotten subject's face; raises
    :class:`_Unusable` with the dead letter's reason. An alert or decision of a forgotten subject teaches
    ``forgotten`` its sighting (:meth:`~sinks.opensearch.forget.Forgotten.note_sighting`, at ``now_ms``)."""
    versioned = {"version": message.offset() or 0, "version_type": "external_gte"} if route.keyed else {}
    if route.keyed and message.value() is None:  # a tombstone: the key's document goes
        index = route.write_index(index_prefix, 0, period)
        return {
            "_op_type": "delete",
            "_index": index,
            "_id": _checked_id(_key_text(message), "the message key"),
            **versioned,
        }
    try:
        record = codec(route.topic.record_type).decode(message.value())
    except DecodeError as exc:
        raise _Unusable(exc.kind, exc.reason) from None
    doc_id = record.get(route.id_field)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise _Unusable("missing_field", f"{route.id_field} is empty")
    _checked_id(doc_id, route.id_field)
    if (pattern := ID_PATTERNS.get(route.kind)) is not None:
        try:
            check_id(doc_id, route.id_field, pattern)
        except InvalidRecord as exc:
            raise _Unusable(exc.kind, exc.reason) from None
    if route.keyed and _key_text(message) != doc_id:
        raise _Unusable("invalid_key", f"the message key is not the record's {route.id_field}")
    check = RECORD_CHECKS.get(route.kind)
    if check is not None:
        check(record)
    _check_searched(route, record)
    if forgotten is not None and forgotten.drops(route, record, now_ms):  # before the scrub: an image ref names it
        return None
    if (version_field := VERSIONED_BY.get(route.kind)) is not None:
        versioned = {"version": _record_version(record, version_field), "version_type": "external_gte"}
    try:
        index = route.write_index(index_prefix, int(record[route.time_field]), period)
    except (ValueError, OverflowError, OSError) as exc:
        raise _Unusable("invalid_field", f"{route.time_field}: {exc}") from None
    drop = () if include_private else route.private_fields
    source = to_document(record, drop)
    cut_text(source, route)
    pseudonymise(source, route, customer_key_secret)
    if forgotten is not None and forgotten.scrub(route, source):
        forgotten.stripped += 1
    op_type = "create" if never_replaces(route, record) else "index"
    return {"_op_type": op_type, "_index": index, "_id": doc_id, "_source": source, **versioned}


CUT_TEXT = {"alerts": ("summary",)}
"""Per route kind, the free text its index keeps as a case keeps a note (:func:`cut_text`)."""


def cut_text(source: dict[str, Any], route: Route) -> None:
    """The :data:`CUT_TEXT` fields of one document of ``route`` as a case keeps its alert's summary, in place
    (:func:`~schemas.records.case_text`: no control characters or direction overrides, at most
    :data:`~schemas.records.MAX_CASE_TEXT` characters; empty when nothing is left). The dashboard's alert page and
    latest-alerts list show an alert's summary from its index: the jobs write a line of a few hundred characters, and
    one up to the record limit (256 KiB), or holding a terminal escape or a direction override, was indexed whole. Only
    the index's copy: the alert on its topic is as it was written."""
    for name in CUT_TEXT.get(route.kind, ()):
        value = source.get(name)
        if isinstance(value, str):
            source[name] = case_text(value) or ""


VERSIONED_BY = {"transactions": "decided_at"}
"""Per route kind, the record field whose value is each write's external version (``external_gte``): a scored
transaction's ``decided_at``. A batch of a sink that lost its partitions (a rebalance while its bulk request was in
flight, a process stalled while another took over) could finish late and put an older decision over the newer one
the new owner wrote; refused instead (409, ``stale``). Not the Kafka offset as on the keyed routes: offsets start
again at 0 in a re-created topic, so every later decision would be refused, and a record sent to the topic again (a
redrive) gets a higher offset than the newer decision. The same record written again has the same version and goes
in (a replay stays idempotent); a re-decision is decided later, so it still replaces the document."""


def _record_version(record: dict[str, Any], name: str) -> int:
    """``record[name]`` as an external version (OpenSearch takes 0 up to 2^63 - 1); :class:`_Unusable` otherwise."""
    value = record.get(name)
    if not isinstance(value, int) or value < 0:
        raise _Unusable("invalid_field", f"{name} must be a time in ms since the epoch, not below 0")
    return value


NEVER_REPLACING = {"face_observations": ("status", frozenset({"UNAVAILABLE"}))}
"""Per route kind, the field and values of records that say only that nothing is known: they are written only
where their document is not there yet (:func:`never_replaces`)."""


def never_replaces(route: Route, record: dict[str, Any]) -> bool:
    """Whether ``record`` goes in with op ``create`` rather than ``index``: an ``UNAVAILABLE`` face observation.

    The face stage gives a trigger the same id whenever it comes (``checkout:<tx>``), and a transaction sent again
    after its lag limit (the replay tool, a redelivery) is answered ``UNAVAILABLE`` "not snapshotted: late": indexed,
    that replaced the real observation (its image ref, match and similarity). Created instead, it only fills an
    id nothing was indexed under, and a real observation (op ``index``) still replaces it."""
    rule = NEVER_REPLACING.get(route.kind)
    return rule is not None and record.get(rule[0]) in rule[1]


FACE_KEEPING_KIND = "transactions"
TRANSACTION_FACE_FIELDS = ("face_status", "face_subject_id", "face_category", "face_similarity", "face_matcher")
"""A scored transaction's face evidence: what the face stage found for it (status, watch-list subject, category,
similarity, engine). A forget leaves them (``schemas.indices.SCORED_ROUTE``: the decision, no image)."""
NO_FACE_STATUSES = frozenset({None, "UNAVAILABLE"})
"""``face_status`` of a decision made without a face: the scoring job had none for the transaction."""


REDECIDED_AFTER_MS = 60_000
"""A decision made more than this after its sale (``decided_at - event_time``) may be a second one (a job started
without state decides history again) and is read against the indexed document. A live decision comes within the
face deadline (``CG_JOB__FACE_DEADLINE_MS``, 4 s) and the job's lag: it is not read, so live traffic pays no read
(``make bench`` measured the read at half the sink's bulk rate on batches where half the transactions were
re-decided without a face). A job catching up a backlog over a minute old reads too: slower, never wrong."""


def lacks_face(op: dict[str, Any]) -> bool:
    """Whether ``op`` (of a scored transaction) indexes a decision made without a face, long enough after its sale
    (:data:`REDECIDED_AFTER_MS`) to be a re-decision."""
    source = op.get("_source")
    if (
        op.get("_op_type") != "index"
        or not isinstance(source, dict)
        or source.get("face_status") not in NO_FACE_STATUSES
    ):
        return False
    decided, event = source.get("decided_at"), source.get("event_time")
    if isinstance(decided, int) and isinstance(event, int):
        return decided - event > REDECIDED_AFTER_MS
    return True  # no times to tell by: read, as before


def with_kept_face(op: dict[str, Any], existing: dict[str, Any]) -> bool:
    """Put the face fields of ``existing`` (the transaction's indexed document) into ``op``'s source, in place,
    where ``op`` has no face and ``existing`` has one; whether it did.

    A job started without state (``CG_JOB__DECIDE_FROM``, a replay into a fresh job) decides a transaction again
    with ``face_status`` ``UNAVAILABLE``: indexed as it is, it replaced the first decision's face match (status,
    subject, similarity) the analyst relies on. Everything else is the new decision's. Doing it twice gives the
    same document."""
    source = op.get("_source")
    if not isinstance(source, dict) or source.get("face_status") not in NO_FACE_STATUSES:
        return False
    if existing.get("face_status") in NO_FACE_STATUSES:
        return False
    for name in TRANSACTION_FACE_FIELDS:
        source[name] = existing.get(name)
    return True


def keep_faces(client: OpenSearch, pending: Sequence[IndexAction]) -> int:
    """Give the scored transactions of ``pending`` decided without a face (:func:`lacks_face`) the face of
    their indexed document (:func:`with_kept_face`); how many got one.

    One ``mget`` of the face fields per batch, only when it holds such a transaction (no script: the local
    OpenSearch has no scripting, and a partial ``update`` would merge the old ``indicators`` into the new).
    Raises ``TransportError`` when the documents cannot be read (the caller backs off and tries again): written
    without, the face would be lost for good. An answer that does not hold one document per request, in request
    order (:func:`read_answers`), is such a failed read too, not an error that stops the sink."""
    wanted = [action for action in pending if action.kind == FACE_KEEPING_KIND and lacks_face(action.op)]
    if not wanted:
        return 0
    fields = list(TRANSACTION_FACE_FIELDS)
    docs = [{"_index": a.op["_index"], "_id": a.doc_id, "_source": fields} for a in wanted]
    answer = client.mget(body={"docs": docs})
    kept = 0
    for action, doc in zip(wanted, read_answers(answer, [a.doc_id for a in wanted]), strict=True):
        error = doc.get("error")
        if error is not None:
            error_type = error.get("type") if isinstance(error, dict) else str(error)
            if error_type == "index_not_found_exception":  # a new period index: nothing there yet
                continue
            raise TransportError(503, f"reading {action.op['_index']}/{action.doc_id}: {error_type}")
        if doc.get("found") and with_kept_face(action.op, doc.get("_source") or {}):
            kept += 1
    return kept


def read_answers(answer: Any, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The documents of an ``mget`` answer for ``ids``, one per id in request order; raises ``TransportError`` when
    the answer is not that (a proxy's or a broken node's reply): paired by position, a short answer raised
    ``ValueError``, which no retry loop catches, and stopped the sink, and a misordered one would give one
    transaction another's face."""
    docs = answer.get("docs") if isinstance(answer, dict) else None
    if (
        not isinstance(docs, list)
        or len(docs) != len(ids)
        or not all(isinstance(doc, dict) and doc.get("_id") == doc_id for doc, doc_id in zip(docs, ids, strict=True))
    ):
        got = f"{len(docs)} document(s)" if isinstance(docs, list) else f"no docs list ({type(answer).__name__})"
        raise TransportError(
            502, f"malformed mget answer: {len(ids)} document(s) asked for, in order; the answer held {got}"
        )
    return docs


def pseudonymise(source: dict[str, Any], route: Route, secret: str | None) -> bool:
    """Put the customer keys of one document of ``route`` into their indexed form, in place
    (:func:`~schemas.indices.indexed_customer_key`: hashed under ``secret``, or left out without one);
    whether anything changed. A key already in that form is kept, so doing it twice changes nothing."""
    changed = False
    for name in route.pseudonymised_fields:
        value = source.get(name)
        if not isinstance(value, str) or is_indexed_customer_key(value):
            continue
        indexed = indexed_customer_key(value, secret)
        if indexed is None:
            del source[name]
        else:
            source[name] = indexed
        changed = True
    return changed


def _checked_id(doc_id: str, what: str) -> str:
    """``doc_id`` if OpenSearch takes it as a document id; else :class:`_Unusable` ``invalid_id`` (the size, not
    the id: it may be a hostile payload, and dead-letter reasons are logged)."""
    size = len(doc_id.encode())
    if size > MAX_ID_BYTES:
        raise _Unusable(
            "invalid_id", f"{what} is {size} bytes; OpenSearch takes at most {MAX_ID_BYTES} as a document id"
        )
    return doc_id


def _key_text(message: Message) -> str:
    key = message.key()
    if not key:
        raise _Unusable("invalid_key", "no message key (the document id of this topic)")
    try:
        return key.decode("utf-8") if isinstance(key, bytes) else str(key)
    except UnicodeDecodeError:
        raise _Unusable("invalid_key", "the message key is not UTF-8") from None


def _check_label(record: dict[str, Any]) -> None:
    if record.get("label") not in (FRAUD, LEGITIMATE):
        raise _Unusable("invalid_field", "label must be 1 (fraud) or 0 (legitimate)")


SEARCHED_FIELDS = {route.kind: sorted(searched_fields(route)) for route in ROUTES}
"""Per route kind, the fields a forget finds its documents by: indexed whole (no ``ignore_above``)."""


def _check_searched(route: Route, record: dict[str, Any]) -> None:
    """:class:`_Unusable` ``invalid_field`` for a record with a field a forget finds documents by
    (:data:`SEARCHED_FIELDS`) over Lucene's term limit (:data:`~schemas.indices.MAX_TERM_BYTES`), naming the field and
    its size, never the value. OpenSearch would refuse the document for it; indexed without it (as ``ignore_above``
    does), the forget of its subject would not find the document, or not remove its image ref."""
    for name in SEARCHED_FIELDS.get(route.kind, ()):
        value = record.get(name)
        if isinstance(value, str) and (size := len(value.encode())) > MAX_TERM_BYTES:
            raise _Unusable(
                "invalid_field",
                f"{name} is {size} bytes; a forget finds documents by it, so it is indexed whole, and OpenSearch "
                f"indexes at most {MAX_TERM_BYTES}",
            )


ID_PATTERNS = {"alerts": ALERT_ID_RE}
"""Per route kind, the shape its document id must have beyond OpenSearch's size limit: an alert id the alert sender
refuses (``schemas.identifiers``: control characters, a header injection, spaces) is dead-lettered ``invalid_id`` here
too, so the dashboard never shows, nor links to, an alert no channel sent and no case was opened for."""


NAMED_VALUES = {"transactions": "indicators", "model_drift": "feature_psi"}
"""Per route kind, its map of named numbers (a decision's indicators, a drift report's PSI per feature). Every key
OpenSearch maps is a field of the index, and an index takes 1,000 (``index.mapping.total_fields.limit``): mapped as they
came, a writer with many distinct keys (a bug, or a compromised one) filled an index's mapping, after which every
document with a new key was refused until the index's period ended. So the templates map the names the code defines
(``dynamic: false``: another name stays in ``_source``, unmapped, where the dashboard reads these maps), and the sink
refuses a record whose keys no code writes (:func:`_check_names`): not names, or more than :data:`MAX_NAMES`. Not a
dynamic template that maps only well-formed names: every new well-formed name would still be a field, and a name it
did not match would fall to OpenSearch's own dynamic mapping; only a closed map keeps the fields bounded."""
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
"""What an indicator or feature name looks like (``fullmatch``): ``velocity``, ``cust_count_24h``."""
MAX_NAMES = 128
"""Most keys a record's :data:`NAMED_VALUES` map may hold: the scoring job writes at most 21 indicators, a model has
46 features; a few times that leaves room for the names of models and rule sets to come."""


def _check_names(field_name: str) -> Callable[[dict[str, Any]], None]:
    """The check of a record's ``field_name`` map: :class:`_Unusable` ``invalid_field`` naming how many keys it holds
    or how many are not a :data:`NAME_RE` name, never a key (it may be a hostile payload, and reasons are logged)."""

    def check(record: dict[str, Any]) -> None:
        names = record.get(field_name) or {}
        if len(names) > MAX_NAMES:
            raise _Unusable("invalid_field", f"{field_name} holds {len(names)} names; at most {MAX_NAMES} are indexed")
        if bad := sum(1 for name in names if not NAME_RE.fullmatch(name)):
            raise _Unusable(
                "invalid_field",
                f"{field_name} holds {bad} of {len(names)} names that are not a name: a-z first, then a-z, 0-9 or _, "
                "at most 64 characters",
            )

    return check


RECORD_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "labels": _check_label,
    **{kind: _check_names(field_name) for kind, field_name in NAMED_VALUES.items()},
}
"""What a kind's records must satisfy beyond their schema before they are indexed (what ``train``
would refuse must not be counted on the dashboard either; names that would fill an index's mapping)."""


def offsets_to_commit(messages: Iterable[Message]) -> list[TopicPartition]:
    """The next offset to read per partition (last message + 1), which is what a Kafka commit states."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        key = (message.topic() or "", message.partition() or 0)
        last[key] = max(last.get(key, -1), message.offset() or 0)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in sorted(last.items())]


@dataclass
class BulkAttempt:
    """The outcome of one bulk round: acknowledged count, actions to retry, dead letters for rejects."""

    acknowledged: int = 0
    stale: int = 0
    """Of ``acknowledged``: versioned writes OpenSearch refused because the document is newer (409)."""
    stale_kinds: Counter[str] = field(default_factory=Counter)
    """``stale`` per route kind, for the metric and the batch's warning (:data:`STALE_REASON`)."""
    kept: int = 0
    """Of ``acknowledged``: creates (:func:`never_replaces`) OpenSearch refused because the document is there (409)."""
    retry: list[IndexAction] = field(default_factory=list)
    rejected: list[DeadLetter] = field(default_factory=list)
    problem: str | None = None
    """Why something must be retried, for the log line (status and error type, no document)."""
    reinstall: bool = False
    written: Counter[str] = field(default_factory=Counter)
    """Of ``acknowledged``, less ``stale`` and ``kept``: documents written (or deleted) per route kind, for the
    metrics."""


STALE_REASON = "stale_{kind}"
"""``cg_skipped_total`` reason of versioned writes refused as stale, per route kind (``stale_labels``,
``stale_transactions``, ``stale_cases``): refused, not written, so not ``cg_records_out_total``. A steady count shows
what the summary line's ``stale`` alone hid from alerting: a scoring worker whose clock runs ahead (its
``decided_at`` outranks later decisions), or a re-created ``labels`` topic whose offsets restarted at 0."""


MAX_CHUNK_BYTES = 50 * 1024 * 1024
"""Most bytes of one bulk request (OpenSearch's ``http.max_content_length`` is 100 MB; a smaller domain's may be
10 MiB: its 413 halves the chunks, :func:`bulk_once`)."""
REFUSED_REQUEST_STATUSES = frozenset({400, 413})
"""Statuses of a bulk request refused as a whole for what it holds (a document OpenSearch's request validation
refuses, a body over its size limit), not for the cluster's state: sent again unchanged, it is refused again."""


def bulk_once(client: OpenSearch, pending: Sequence[IndexAction], chunk_size: int = 2000) -> BulkAttempt:
    """One bulk round over ``pending``; never raises for OpenSearch trouble, it reports it.

    Bulk answers come back in request order (``yield_ok``, no helper retries), so the position maps
    each answer to its action; a request that fails outright leaves the rest of the batch to retry, unless it
    was refused for what it holds (:data:`REFUSED_REQUEST_STATUSES`): then its chunk is halved until the request
    goes through or holds one document, which is dead-lettered, so one document cannot hold the batch for ever.
    """
    result = BulkAttempt()
    _bulk_into(result, client, pending, chunk_size, chunk_size)
    return result


def _bulk_into(
    result: BulkAttempt, client: OpenSearch, pending: Sequence[IndexAction], chunk_size: int, full_size: int
) -> None:
    position = 0
    try:
        for ok, item in streaming_bulk(
            client,
            (action.op for action in pending),
            chunk_size=chunk_size,
            max_chunk_bytes=MAX_CHUNK_BYTES,
            raise_on_error=False,
            raise_on_exception=True,
            max_retries=0,
            yield_ok=True,
        ):
            action = pending[position]
            position += 1
            info = next(iter(item.values()))
            if info.get("_id") != action.doc_id:
                raise RuntimeError(f"bulk answer for {info.get('_id')!r} where {action.doc_id!r} was expected")
            if ok or _nothing_to_delete(action, info):
                result.acknowledged += 1
                result.written[action.kind] += 1
                continue
            status, error = info.get("status"), info.get("error")
            error_type = error.get("type") if isinstance(error, dict) else str(error)
            conflict = status == 409 and error_type == "version_conflict_engine_exception"
            if conflict and action.op["_op_type"] == "create":
                result.acknowledged += 1  # the document is there, and this one must not replace it: done
                result.kept += 1
            elif conflict and "version" in action.op:
                result.acknowledged += 1  # the document already holds a later message: this one is done
                result.stale += 1
                result.stale_kinds[action.kind] += 1
            elif is_retriable(status, error_type):
                result.retry.append(action)
                result.problem = f"{status} {error_type}"
                result.reinstall |= error_type == "index_not_found_exception"
            else:
                result.rejected.append(rejected_dead_letter(action, status, error))
    except TransportError as exc:
        rest = pending[position:]
        if exc.status_code not in REFUSED_REQUEST_STATUSES or not rest:
            result.retry += rest
            result.problem = _short(exc)
        elif chunk_size > 1 and len(rest) > 1:  # some document of the chunk: find it by halves
            _bulk_into(result, client, rest, min(chunk_size, len(rest)) // 2, full_size)
        else:  # refused alone: it will be refused again, however often it is sent
            result.rejected.append(rejected_dead_letter(rest[0], exc.status_code, _request_error(exc)))
            _bulk_into(result, client, rest[1:], full_size, full_size)


def _request_error(exc: TransportError) -> dict[str, Any]:
    """A whole request's refusal in the shape of a bulk item's ``error``, for :func:`rejected_dead_letter`."""
    info = exc.info.get("error") if isinstance(exc.info, dict) else None
    if isinstance(info, dict):
        return {
            "type": info.get("type", exc.error),
            "reason": info.get("reason", ""),
            "caused_by": info.get("caused_by"),
        }
    return {"type": str(exc.error), "reason": "the bulk request holding this document alone was refused"}


def _nothing_to_delete(action: IndexAction, info: dict[str, Any]) -> bool:
    """A delete of a document that is not there (a tombstone for a verdict never indexed, or a replay)."""
    return action.op["_op_type"] == "delete" and info.get("status") == 404 and info.get("result") == "not_found"


def rejected_dead_letter(action: IndexAction, status: Any, error: Any, now_ms: int | None = None) -> DeadLetter:
    """The dead letter of a document OpenSearch refused for good; the reason is OpenSearch's own."""
    error_type = error.get("type") if isinstance(error, dict) else "error"
    reason = error.get("reason") if isinstance(error, dict) else str(error)
    caused = (error.get("caused_by") or {}).get("reason") if isinstance(error, dict) else None
    log.warning("OpenSearch rejected %s/%s: %s %s", action.op["_index"], action.doc_id, status, error_type)
    text = f"OpenSearch {status} {error_type}: {reason}" + (f" (caused by: {caused})" if caused else "")
    now = now_ms if now_ms is not None else clock.now_ms()
    return dead_letter_for(action.message, OPENSEARCH_REJECTED, text, now)


# --------------------------------------------------------------------------- the sink


@dataclass
class SinkStats:
    """Counters of one sink run, read by the periodic summary and by tests."""

    indexed: int = 0
    dead_lettered: int = 0
    retries: int = 0
    batches: int = 0
    commits: int = 0
    superseded: int = 0
    """Messages made redundant by a later one for the same document in the same batch."""
    stale: int = 0
    """Versioned writes OpenSearch refused because the document already holds a later message (labels, cases) or a
    later decision (scored transactions, :data:`VERSIONED_BY`)."""
    kept: int = 0
    """``UNAVAILABLE`` face observations not written because their id already holds an observation."""
    faces_kept: int = 0
    """Scored transactions decided again without a face that kept their document's face (:func:`keep_faces`)."""
    forgets: int = 0
    """Forgets read on ``audit`` and carried out in the indices."""
    erased: int = 0
    """Documents a forget deleted (face observations) or removed the face fields of (alerts, cases)."""
    forgotten_on_write: int = 0
    """Records of a forgotten subject that came after its forget: not indexed, or indexed without their face."""
    forgets_incomplete: int = 0
    """Forgets some of whose write-backs OpenSearch refused for good (dead-lettered ``forget_incomplete``)."""

    def line(self) -> str:
        return (
            f"indexed={self.indexed} dead_lettered={self.dead_lettered} retries={self.retries} "
            f"batches={self.batches} commits={self.commits} superseded={self.superseded} stale={self.stale} "
            f"kept={self.kept} faces_kept={self.faces_kept} forgets={self.forgets} "
            f"forgets_incomplete={self.forgets_incomplete} erased={self.erased} "
            f"forgotten_on_write={self.forgotten_on_write}"
        )


class _Stopped(CheckoutGuardError):
    """Raised inside a wait when the stop event is set; the batch in flight stays uncommitted."""


class OpenSearchSink:
    """The consumer loop: batch -> bulk index (retry forever) -> dead letters -> commit."""

    def __init__(
        self,
        settings: Settings,
        *,
        index_prefix: str | None = None,
        group_id: str | None = None,
        client: OpenSearch | None = None,
        backoff: Backoff | None = None,
        batch_timeout_s: float = 0.2,
        summary_interval_s: float = 30.0,
        rng: random.Random | None = None,
        heartbeat: metrics.Heartbeat | None = None,
    ) -> None:
        self.settings = settings
        self.heartbeat = heartbeat or metrics.Heartbeat()
        """Beaten every loop turn and every wait, with what OpenSearch or Kafka are doing (``/healthz``)."""
        self.index_prefix = index_prefix or settings.opensearch.index_prefix
        self.topic_prefix = settings.kafka.topic_prefix
        self.indices = settings.indices
        self.group_id = group_id or default_group_id(self.topic_prefix)
        self.client = client or make_client(settings.opensearch)
        self.backoff = backoff or Backoff()
        self.batch_timeout_s = batch_timeout_s
        self.max_docs = settings.opensearch.bulk_max_docs
        self.summary_interval_s = summary_interval_s
        self.stats = SinkStats()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._paused = False
        self._carry: list[Message] = []
        self._last_error_log: dict[tuple[int, str | None], float] = {}
        self._problem: str | None = None
        """Why the batch in hand cannot be finished yet (OpenSearch or the dead-letter topic away)."""
        self._kinds = {route.topic.full_name(self.topic_prefix): route.kind for route in ROUTES}
        self._audit_topic = AUDIT.full_name(self.topic_prefix)
        self._kinds[self._audit_topic] = "audit"
        self.forgotten = Forgotten()
        """Every subject forgotten so far (``audit``): its faces are never indexed again."""
        secret = self.indices.customer_key_secret
        self._customer_key_secret = secret.get_secret_value() if secret else None
        self._batch_seconds = metrics.PROCESSING_SECONDS.labels(STAGE)

    # ------------------------------------------------------------------ wiring

    @property
    def topics(self) -> list[str]:
        """The routes' topics, and ``audit`` for the forgets (:mod:`sinks.opensearch.forget`)."""
        return [route.topic.full_name(self.topic_prefix) for route in ROUTES] + [self._audit_topic]

    def run(self, stop_event: threading.Event | None = None) -> SinkStats:
        """Consume until ``stop_event`` is set; a batch in flight at that moment is left uncommitted."""
        self._stop = stop_event or threading.Event()
        self._consumer = kafka_clients.consumer(
            self.settings, self.group_id, kafka_clients.READ_COMMITTED, auto_offset_reset="earliest"
        )
        self._producer = kafka_clients.producer(self.settings, kafka_clients.IDEMPOTENT, linger_ms=5)
        log.info(
            "opensearch sink: topics %s -> indices %s-*, group %s",
            ", ".join(self.topics),
            self.index_prefix,
            self.group_id,
        )
        if self._customer_key_secret is None:
            log.info("CG_INDICES__CUSTOMER_KEY_SECRET is not set: customers known only by e-mail get no customer_key")
        try:
            self._retry_until_done("install index templates", self._install_templates)
            self._load_forgotten()
            self._recall_sightings()
            self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
            last_summary, last_indexed = time.monotonic(), 0
            self._apply_retention()
            last_retention = time.monotonic()
            while not self._stop.is_set():
                batch = self._next_batch()
                if batch:
                    self._process(batch)
                self.heartbeat.beat()
                now = time.monotonic()
                if now - last_retention >= self.indices.retention_interval_s:
                    self._apply_retention()
                    last_retention = now
                if now - last_summary >= self.summary_interval_s:
                    rate = (self.stats.indexed - last_indexed) / (now - last_summary)
                    log.info("opensearch sink: %s (%.0f docs/s)", self.stats.line(), rate)
                    last_summary, last_indexed = now, self.stats.indexed
        except _Stopped:
            log.info("opensearch sink stopped during a retry; the uncommitted batch will be replayed")
        finally:
            # No offset is committed here: a batch's are committed once OpenSearch took it, before the next is read.
            # 1 s before the supervisor's SIGKILL, which counts from the SIGTERM: a commit in the loop that hung after
            # it (Kafka down) took from the stop's time, which counted from here before
            deadline = exit_deadline(self.settings.supervisor.stop_timeout_s, stop_asked_at(self._stop))
            try:
                left = self._producer.flush(time_left(deadline, self.settings.kafka.stop_flush_s))
                if left:
                    log.warning("opensearch sink: %d dead letter(s) not confirmed at shutdown", left)
            finally:
                self._close(deadline)
            log.info("opensearch sink closed: %s", self.stats.line())
        return self.stats

    def _close(self, deadline: float) -> None:
        """The consumer's close (it leaves the group), given up at ``deadline``: with the brokers down it waited on
        Kafka as long as it took, past the supervisor's stop timeout into its SIGKILL. Nothing is lost: what was not
        committed is read again into the same documents."""
        assert self._consumer is not None
        if not done_by(self._consumer.close, deadline, "opensearch-sink-close"):
            log.warning(
                "opensearch sink: Kafka did not take the consumer's close before the supervisor's stop timeout; the "
                "batches since the last commit will be read again into the same documents"
            )

    def _install_templates(self) -> None:
        names = install_templates(
            self.client,
            self.index_prefix,
            self.indices.period,
            customer_key_secret=self._customer_key_secret,
            replicas=self.settings.opensearch.replicas,
        )
        log.info("index templates installed for %s", ", ".join(names))

    def _load_forgotten(self, read: Callable[..., object] | None = None) -> None:
        """Read every forget on ``audit`` before indexing anything, so that no face of a subject forgotten
        before this start is indexed again (the group's offsets are past those forgets); retried while Kafka
        does not answer. A deployment without the topic (a sink on a bare test prefix) has forgotten nobody.

        ``audit`` holds a year of every service's audit events: the read goes on as long as records keep coming
        (``stall_s``), not for a fixed time, and every record read beats the heartbeat, so a long read is
        neither given up and started again from the beginning for ever nor taken for a hung sink by ``/healthz``
        (whose supervisor would restart it, as often). The metadata calls' timeout stays below the heartbeat's."""
        from infra.clients.control_topics import ControlTopicMissing

        if read is None:
            from infra.clients.control_topics import read_control_topics

            read = read_control_topics

        def apply(_topic: str, _key: bytes | None, value: bytes | None) -> None:
            self.heartbeat.beat()  # reading is progress
            if (forget := forget_of(value)) is not None:
                self.forgotten.add(forget)
            elif (enrolment := enrolment_of(value)) is not None:
                self.forgotten.enrol(*enrolment)

        attempt = 0
        while True:
            self.heartbeat.beat()
            try:
                read(
                    self.settings,
                    apply,
                    timeout_s=AUDIT_READ_TIMEOUT_S,
                    specs=(AUDIT,),
                    stall_s=AUDIT_READ_TIMEOUT_S,
                    beat=self.heartbeat.beat,  # each metadata call too: a few slow ones outlast the heartbeat
                )
                break
            except (RuntimeError, TimeoutError, KafkaException) as exc:
                if isinstance(exc, ControlTopicMissing):  # by its type: not listed, or deleted since
                    log.warning("no %s topic: no forget to apply yet", self._audit_topic)
                    break
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                self.stats.retries += 1
                log.warning(
                    "reading the forgets on %s failed (%s); retry %d in %.1fs", self._audit_topic, exc, attempt, delay
                )
                deadline = time.monotonic() + delay
                while (left := deadline - time.monotonic()) > 0:
                    self.heartbeat.beat("Kafka unreachable")  # waiting on purpose is progress
                    if self._stop.wait(min(left, 1.0)):
                        raise _Stopped from None
        log.info("forgotten subjects: %d (from %s)", len(self.forgotten), self._audit_topic)

    def _apply_retention(self) -> None:
        """Retention must never stop indexing: a failure is logged and tried again next interval. What the memory of
        forgotten subjects' sightings no longer needs goes from the sink's index too."""
        try:
            apply_retention(self.client, self.index_prefix, self.indices)
            prune_saved_sightings(self.client, self.index_prefix, clock.now_ms())
        except (TransportError, ScanError) as exc:
            log.warning("retention failed (%s); next try in %.0fs", _short(exc), self.indices.retention_interval_s)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Assign ourselves so the pause state can be set on the new partitions: librdkafka keeps a
        # partition's pause flag across rebalances, and a partition revoked while paused must not stay so.
        consumer.assign(partitions)
        if partitions:
            (consumer.pause if self._paused else consumer.resume)(partitions)
        log.info("assigned %s", _describe(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _describe(partitions))

    # ------------------------------------------------------------------ the loop

    def _next_batch(self) -> list[Message]:
        """Up to ``bulk_max_docs`` messages, or fewer after ``batch_timeout_s`` so latency stays low."""
        assert self._consumer is not None
        wanted = self.max_docs - len(self._carry)
        received = self._consumer.consume(num_messages=wanted, timeout=self.batch_timeout_s) if wanted > 0 else []
        messages, self._carry = self._carry + self._usable(received), []
        return messages

    def _usable(self, messages: Sequence[Message]) -> list[Message]:
        out = []
        for message in messages:
            error = message.error()
            if error is None:
                out.append(message)
                continue
            if error.fatal():
                raise KafkaException(error)
            now = time.monotonic()
            key = (error.code(), message.topic())
            if now - self._last_error_log.get(key, 0.0) > 30.0:  # once per 30 s, not per poll
                self._last_error_log[key] = now
                log.warning(
                    "consumer error on %s: %s", message.topic(), kafka_clients.error_named(error)
                )  # never its words
        return out

    def _process(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        for kind, count in Counter(self._kinds.get(m.topic() or "", "unknown") for m in batch).items():
            metrics.RECORDS_IN.labels(STAGE, kind).inc(count)
        self.forgotten.prune_sightings(clock.now_ms())
        audit = [m for m in batch if m.topic() == self._audit_topic]
        records = [m for m in batch if m.topic() != self._audit_topic] if audit else batch
        carrying = [(m, f) for m, f in ((m, forget_of(m.value())) for m in audit) if f is not None]
        forgets = [f for _, f in carrying]
        for message in audit:  # in order, before the batch's documents: none of the subject's faces goes in
            if (forget := forget_of(message.value())) is not None:
                self.forgotten.add(forget)
            elif (enrolment := enrolment_of(message.value())) is not None:
                self.forgotten.enrol(*enrolment)  # enrolled again: its new entry's documents go in
        actions, dead = to_actions(
            records,
            index_prefix=self.index_prefix,
            topic_prefix=self.topic_prefix,
            period=self.indices.period,
            include_private=self.indices.include_face_embeddings,
            customer_key_secret=self._customer_key_secret,
            forgotten=self.forgotten,
        )
        dropped, stripped = self.forgotten.take_counts()
        if dropped + stripped:
            self.stats.forgotten_on_write += dropped + stripped
            metrics.SKIPPED.labels(STAGE, "forgotten_subject").inc(dropped + stripped)
        self.stats.superseded += len(records) - len(actions) - len(dead) - dropped
        dead += self._index_until_acknowledged(actions)
        if learnt := self.forgotten.take_learnt():  # sightings of forgotten subjects indexed before their alert came
            self._erase_sightings_until_done(learnt)
        if forgets:
            dead += self._erase_until_done(forgets, [m for m, _ in carrying])
        self._save_sightings_until_done()  # what the batch taught: a restart after its commit finds it again
        if dead:
            self._publish_dead_letters(dead)
        self._commit(batch)
        if self._paused:
            self._paused = False
            assert self._consumer is not None
            self._consumer.resume(self._consumer.assignment())
        self.stats.batches += 1
        self._problem = None
        self.heartbeat.beat()  # the batch is done: whatever held it up answers again
        self._batch_seconds.observe(time.perf_counter() - started)

    def _index_until_acknowledged(self, actions: list[IndexAction]) -> list[DeadLetter]:
        """Bulk-index until every action is acknowledged or permanently rejected; return the rejected."""
        pending, rejected, attempt, started = actions, [], 0, time.monotonic()
        stale: Counter[str] = Counter()
        while pending:
            try:
                self.stats.faces_kept += keep_faces(self.client, pending)
            except TransportError as exc:
                attempt = self._back_off(
                    f"OpenSearch unreachable: {_short(exc)}",
                    attempt,
                    "reading the indexed faces of re-decided transactions failed (%s): keeping %d document(s)",
                    _short(exc),
                    len(pending),
                )
                continue
            result = bulk_once(self.client, pending, self.max_docs)
            self.stats.indexed += result.acknowledged - result.stale - result.kept
            self.stats.stale += result.stale
            self.stats.kept += result.kept
            for kind, count in result.written.items():
                metrics.RECORDS_OUT.labels(STAGE, kind).inc(count)
            for kind, count in result.stale_kinds.items():
                metrics.SKIPPED.labels(STAGE, STALE_REASON.format(kind=kind)).inc(count)
            stale += result.stale_kinds
            rejected += result.rejected
            pending = result.retry
            if not pending:
                break
            attempt = self._back_off(
                f"OpenSearch unreachable: {result.problem}",
                attempt,
                "OpenSearch unavailable (%s): keeping %d document(s), offsets not committed",
                result.problem,
                len(pending),
            )
            if result.reinstall:
                try:
                    self._install_templates()
                    # Where the cluster does not auto-create indices, the period indices the batch
                    # needs are created here (the templates give them mapping and alias).
                    create_indices(self.client, sorted({action.op["_index"] for action in pending}))
                except TransportError as exc:
                    log.warning("reinstalling index templates failed: %s", _short(exc))
        if stale:  # one line per batch, counts only: the ids could name a customer's transaction
            log.warning(
                "OpenSearch refused writes as stale (their document holds a later version), not written: %s",
                " ".join(f"{kind}={count}" for kind, count in sorted(stale.items())),
            )
        if attempt:
            log.info(
                "OpenSearch acknowledged the batch after %d retr%s (%.1fs)",
                attempt,
                "y" if attempt == 1 else "ies",
                time.monotonic() - started,
            )
        return rejected

    def _erase_until_done(self, forgets: list[Forget], messages: Sequence[Message] = ()) -> list[DeadLetter]:
        """Carry out the batch's forgets in the indices (:func:`~sinks.opensearch.forget.erase_forgotten`) until
        OpenSearch has done all of it; the batch's offsets, the forgets' among them, are committed only then, so
        a crash or an outage repeats the forget instead of losing it (a repeat changes nothing).

        Write-backs OpenSearch refuses for good (400 per document) cannot be retried into success: the forget is
        then reported incomplete, and each audit record of ``messages`` (the forgets') is dead-lettered
        ``forget_incomplete`` with the refused documents' ids and OpenSearch's reasons; those are returned."""
        attempt, subjects = 0, sorted({f.subject_id for f in forgets})
        failed, refusals = 0, []
        while True:
            try:
                report = erase_forgotten(
                    self.client,
                    self.index_prefix,
                    forgets,
                    lifted=self.forgotten.enrolled_at,
                    keep=self._keep_sightings,  # read after the forget, not indexed; after a restart neither
                )
                problem = report.problem
            except TransportError as exc:
                report, problem = None, _short(exc)
            if report is not None:
                self._count_erased(report)
                failed, refusals = report.failed, report.refusals
            if problem is None:
                break
            attempt = self._back_off(
                f"OpenSearch unreachable: {problem}",
                attempt,
                "forget of %d subject(s) not done in OpenSearch (%s), offsets not committed",
                len(subjects),
                problem,
            )
        self.stats.forgets += len(forgets)
        if not failed:
            log.info("forget carried out in the indices for %s", ", ".join(subjects))
            return []
        self.stats.forgets_incomplete += len(forgets)
        log.warning(
            "forget NOT complete in the indices for %s: OpenSearch refused %d write-back(s) for good",
            ", ".join(subjects),
            failed,
        )
        more = f" (and {failed - len(refusals)} more)" if failed > len(refusals) else ""
        reason = f"OpenSearch refused {failed} write-back(s) of this forget for good: " + "; ".join(refusals) + more
        now = clock.now_ms()
        return [dead_letter_for(message, FORGET_INCOMPLETE, reason, now) for message in messages]

    def _count_erased(self, report: EraseReport) -> None:
        for kind, count in (report.deleted + report.stripped).items():
            metrics.RECORDS_OUT.labels(STAGE, f"forgotten_{kind}").inc(count)
        self.stats.erased += report.total()

    def _erase_sightings_until_done(self, sightings: dict[str, list[str]]) -> None:
        """Delete the face observations of forgotten subjects' sightings that were indexed before the alert or decision
        naming their subject came (:meth:`~sinks.opensearch.forget.Forgotten.note_sighting`), until OpenSearch has
        done it; the batch's offsets are committed only then. A delete refused for good is logged (its id) by the
        erase and the next forget of the subject, or its retention, takes the observation."""
        attempt = 0
        while True:
            try:
                report = erase_sightings(self.client, self.index_prefix, sightings)
                problem = report.problem
            except TransportError as exc:
                report, problem = None, _short(exc)
            if report is not None:
                self._count_erased(report)
            if problem is None:
                return
            attempt = self._back_off(
                f"OpenSearch unreachable: {problem}",
                attempt,
                "face observations of forgotten subjects not deleted yet (%s), offsets not committed",
                problem,
            )

    def _keep_sightings(self, found: Mapping[str, Sequence[str]]) -> str | None:
        """Remember the sightings a forget found (:func:`~sinks.opensearch.forget.erase_forgotten`'s ``keep``), in
        memory and in the sink's index, before the strip takes the alerts' image refs; why to repeat the round."""
        self.forgotten.remember(found, clock.now_ms())
        return self._save_sightings()

    def _save_sightings(self) -> str | None:
        """Write what the memory learnt or renewed since the last write
        (:func:`~sinks.opensearch.forget.save_sightings`); why it must be repeated, ``None`` when written."""
        unsaved = self.forgotten.take_unsaved()
        try:
            problem = save_sightings(self.client, self.index_prefix, unsaved, self.settings.opensearch.replicas)
        except TransportError as exc:
            problem = _short(exc)
        if problem is not None:
            self.forgotten.keep_unsaved(unsaved)
        return problem

    def _save_sightings_until_done(self) -> None:
        """:meth:`_save_sightings` until written, before the batch's offsets are committed: a restart after the
        commit must find what the batch taught, since its records are not read again."""
        attempt = 0
        while (problem := self._save_sightings()) is not None:
            attempt = self._back_off(
                f"OpenSearch unreachable: {problem}",
                attempt,
                "what names the sightings of forgotten subjects not written yet (%s), offsets not committed",
                problem,
            )

    def _recall_sightings(self) -> None:
        """After a start: what the sink remembered before it (its own index,
        :func:`~sinks.opensearch.forget.load_sightings`: the image refs of entrance and lane-view sightings too, which
        the strip removed from the alerts), and what names the sightings of the subjects forgotten in the last two
        :data:`~sinks.opensearch.forget.SIGHTING_MEMORY_MS` (one for a copy of their observations to be read, one for
        the job to have matched them before it read the forget), found again in the indices (the transactions and
        observation ids of its alerts, and the transactions decided with its face): for a forget made before the sink
        kept its memory in its index, or one whose write was refused."""
        now = clock.now_ms()
        saved: dict[str, int] = {}

        def load() -> None:
            saved.update(load_sightings(self.client, self.index_prefix, now))

        self._retry_until_done("reading the sightings of forgotten subjects", load)
        self.forgotten.restore(saved, now)
        recent = self.forgotten.recent(now - 2 * self.forgotten.sighting_ms)
        found: dict[str, list[str]] = {}

        def find() -> None:
            found.update(matched_sightings(self.client, self.index_prefix, recent, self.forgotten.enrolled_at))

        if recent:
            self._retry_until_done("finding the sightings of recent forgets", find)
            self.forgotten.remember(found, now)
        count = sum(map(len, found.values()))
        log.info(
            "sightings of forgotten subjects remembered: %d from the sink's index, %d found for %d recent forget(s)",
            len(saved),
            count,
            len(recent),
        )

    def _publish_dead_letters(self, dead: list[DeadLetter]) -> None:
        """Produce and confirm every dead letter before the batch counts as done; re-produce failures."""
        assert self._producer is not None
        topic = DEAD_LETTERS.full_name(self.topic_prefix)
        outstanding, attempt = dead, 0
        while outstanding:
            failed: list[DeadLetter] = []
            for letter in outstanding:
                self._produce(topic, letter, failed)
            while self._producer.flush(0.5) > 0:
                self._wait(0.5)
            if not failed:
                break
            attempt = self._back_off(
                "Kafka unreachable",
                attempt,
                "dead-letter topic unavailable: %d dead letter(s) not delivered",
                len(failed),
            )
            outstanding = failed
        shown = ", ".join(f"{d.dead_letter_id} ({d.error_kind})" for d in dead[:10])
        more = f" and {len(dead) - 10} more" if len(dead) > 10 else ""
        log.warning("dead-lettered %d message(s) to %s: %s%s", len(dead), topic, shown, more)
        self.stats.dead_lettered += len(dead)
        for kind, count in Counter(d.error_kind for d in dead).items():
            metrics.DEAD_LETTERS.labels(STAGE, kind).inc(count)

    def _produce(self, topic: str, letter: DeadLetter, failed: list[DeadLetter]) -> None:
        assert self._producer is not None

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(letter)

        try:  # at a stop, room in a full queue is waited for no longer: the batch is left uncommitted, as a retry's
            kafka_clients.produce(
                self._producer,
                topic,
                letter.dead_letter_id.encode(),
                letter.encode(),
                on_delivery,
                poll_s=0.5,
                stop=self._stop,
            )
        except kafka_clients.ProduceGivenUp:
            raise _Stopped from None

    def _commit(self, batch: list[Message]) -> None:
        """Commit synchronously what this consumer still owns; a failure only means a harmless replay."""
        assert self._consumer is not None
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        offsets = [tp for tp in offsets_to_commit(batch) if (tp.topic, tp.partition) in owned]
        if not offsets:
            return
        offsets = self._past_markers(offsets)
        try:
            committed = self._consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            log.warning("offset commit failed (%s); the batch will be replayed into the same documents", exc)
            return
        errors = [tp for tp in committed if tp.error is not None]
        if errors:
            log.warning("offset commit failed for %s; those messages will be replayed", _describe(errors))
        else:
            self.stats.commits += 1

    def _past_markers(self, offsets: list[TopicPartition]) -> list[TopicPartition]:
        """The consumer's position where it is past the batch's last message + 1 and none of the partition's
        messages waits in ``_carry``: ``audit`` is written in Kafka transactions, and each ends with a commit
        marker the consumer steps over but never hands out, so committing the last message + 1 left the group
        one behind on it for good (a lag that never reaches 0). Only markers (or compaction gaps) lie between."""
        assert self._consumer is not None
        carried = {(m.topic(), m.partition()) for m in self._carry}
        try:
            positions = self._consumer.position([TopicPartition(tp.topic, tp.partition) for tp in offsets])
        except KafkaException:
            return offsets
        ahead = {(tp.topic, tp.partition): tp.offset for tp in positions if tp.error is None}
        return [
            TopicPartition(tp.topic, tp.partition, ahead[key])
            if (key := (tp.topic, tp.partition)) not in carried and ahead.get(key, -1) > tp.offset
            else tp
            for tp in offsets
        ]

    def _back_off(self, problem: str, attempt: int, message: str, *args: object) -> int:
        """One wait of a loop that must finish the batch before it is committed (bulk, forget, dead letters):
        ``problem`` for ``/healthz``, the attempt's backoff, counted and logged (``message`` % ``args``, then
        which retry and how long); the next attempt's number."""
        self._problem = problem
        delay = self.backoff.delay(attempt, self._rng)
        attempt += 1
        self.stats.retries += 1
        log.warning(message + "; retry %d in %.1fs", *args, attempt, delay)
        self._wait(delay)
        return attempt

    def _wait(self, delay_s: float) -> None:
        """Sleep while staying in the group: partitions are paused and ``consume`` is still polled.

        Pausing drops prefetched messages and resuming continues after the last message handed to us,
        so nothing is skipped. Messages of partitions assigned during the wait are kept for the next batch.
        """
        assert self._consumer is not None
        deadline = time.monotonic() + delay_s
        while True:
            self.heartbeat.beat(self._problem)  # waiting on purpose is progress; the problem says on what
            if self._stop.is_set():
                raise _Stopped
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            assignment = self._consumer.assignment()
            if assignment:
                self._consumer.pause(assignment)
            self._paused = True
            self._carry += self._usable(self._consumer.consume(num_messages=self.max_docs, timeout=min(remaining, 0.5)))

    def _retry_until_done(self, what: str, step: Callable[[], None]) -> None:
        """Run ``step`` until it succeeds, backing off on OpenSearch errors and scans some shard did not answer
        (used before subscribing)."""

        def failed(exc: BaseException, attempt: int, delay: float) -> None:
            self.stats.retries += 1
            self.heartbeat.beat(f"OpenSearch unreachable: {_short(exc)}")
            log.warning("%s failed (%s); retry %d in %.1fs", what, _short(exc), attempt, delay)

        def wait(delay: float) -> None:
            if self._stop.wait(delay):
                raise _Stopped from None

        call_with_retries(
            step,
            retriable=lambda exc: isinstance(exc, TransportError | ScanError),
            wait=lambda n: self.backoff.delay(n, self._rng),
            sleep=wait,
            before_sleep=failed,
        )


def _describe(partitions: Iterable[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _short(exc: BaseException) -> str:
    """An exception for a log line: type and status, a bounded message, never a request body."""
    status = getattr(exc, "status_code", None)
    text = str(getattr(exc, "error", "") or exc)
    return f"{type(exc).__name__} {status or ''} {text}".replace("  ", " ").strip()[:200]


def run_sink(
    settings: Settings,
    stop_event: threading.Event | None = None,
    index_prefix: str | None = None,
    group_id: str | None = None,
) -> SinkStats:
    """Run the sink until ``stop_event`` is set (forever without one); return its counters.

    ``group_id`` defaults to :func:`default_group_id` of the settings' topic prefix.
    """
    return OpenSearchSink(settings, index_prefix=index_prefix, group_id=group_id).run(stop_event)


app = typer.Typer(
    add_completion=False,
    help="Index scored transactions, alerts, face observations, labels and model drift from Kafka into OpenSearch.",
)


@app.command()
def main(
    index_prefix: Annotated[str | None, typer.Option(help="Index prefix; defaults to the settings'.")] = None,
    group_id: Annotated[
        str | None, typer.Option(help=f"Kafka consumer group; defaults to <topic prefix>{DEFAULT_GROUP_ID}.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    """Run until SIGINT/SIGTERM, then close the consumer cleanly."""
    settings = get_settings()
    setup_logging(settings, log_level, "sink")
    # The client's own logger repeats every failed request (and logs request bodies at DEBUG): the
    # sink logs one line per backoff round instead, with ids only.
    logging.getLogger("opensearch").setLevel(logging.ERROR)
    logging.getLogger("opensearchpy.trace").setLevel(logging.ERROR)
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGINT, signal.SIGTERM))  # the stop's deadline counts from the signal's arrival
    sink = OpenSearchSink(settings, index_prefix=index_prefix, group_id=group_id)
    endpoint = metrics.serve(settings, STAGE, health=sink.heartbeat)
    try:
        sink.run(stop)
    except IndexPeriodConflict as exc:  # a setting to fix, not a crash to restart
        log.error("%s", exc)
        raise typer.Exit(2) from None
    finally:
        endpoint.close()


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(app)
