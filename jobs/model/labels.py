"""Labels from the field for training: the ``labels`` topic's verdicts joined to the transaction history.

:func:`read_labels` reads the compacted ``labels`` topic from its beginning to its end at the moment of the
call and keeps, per transaction, the verdict in force: the **last one published** (a tombstone withdraws
it). That is the rule compaction applies -- the topic is keyed by transaction id, so the broker keeps the
latest record of each key -- so the answer is the same before and after the log cleaner ran. (Picking the
latest ``decided_at`` instead would flip once compaction removed a record published earlier with a later
``decided_at``.) A correction is a new verdict published after the old one.

:func:`transactions_from_topic` reads the raw ``transactions`` topic the same way (optionally only records
whose Kafka timestamp lies in ``[since, until)``), decodes each record with the codec (one that cannot be
decoded is counted and left out) and orders them by event time, ready for ``train``'s ``observe_all``.

:func:`apply_labels` sets each field verdict on its transaction (over the label the data carried, e.g. a
CSV's ``EVENT_LABEL``) and counts what was joined and which verdicts found no transaction.

Neither reader commits offsets: each uses a fresh consumer group and assigns the partitions itself. Records that
retention deletes while they are read (the read starts at the earliest kept offset, and the oldest segment can go
before the read reaches it) are counted per partition in ``deleted`` and named in a warning: an ``earliest`` reset
skipped them without a word, and training went on as if the topic held nothing more.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import Message

from infra.clients.kafka import written_at_ms
from infra.clients.topic_replay import Bound, deleted_warning, plan, read_range_records
from infra.settings import Settings
from jobs.scoring.validation import MAX_FUTURE_SKEW_MS, check_not_ahead
from schemas.errors import InvalidRecord
from schemas.identifiers import check
from schemas.records import FRAUD, LEGITIMATE, Label, PosTransaction
from schemas.topics import LABELS, TRANSACTIONS

MAX_REJECTED = 1000
"""Undecodable transactions listed with their reason (all of them are counted)."""

# ---------------------------------------------------------------------------- pure: the verdicts in force


@dataclass
class FieldLabels:
    """The verdict in force per transaction, and what reading the topic met on the way."""

    by_transaction: dict[str, Label] = field(default_factory=dict)
    read: int = 0
    """Records read (verdicts and tombstones)."""
    replaced: int = 0
    """Verdicts replaced by a later record for the same transaction: a verdict, a withdrawal or an unusable one."""
    withdrawn: set[str] = field(default_factory=set)
    """Transactions whose last record is a tombstone (no verdict in force). This counts a ``withdraw`` of an id
    that never had a verdict too: once compaction has removed a verdict and kept its tombstone, the two look
    the same, and the count must not depend on when compaction ran."""
    undecodable: int = 0
    """Records that are not a Label, or a Label with an invalid transaction id or verdict."""
    wrong_key: int = 0
    """Labels whose message key is not their transaction id (not ordered with that transaction's others)."""
    end_offsets: dict[int, int] = field(default_factory=dict)
    """Per partition, the end (exclusive) read up to."""
    deleted: dict[int, int] = field(default_factory=dict)
    """Per partition, records retention deleted while the topic was being read: not read, so not in force here."""

    def warning(self) -> str | None:
        """What retention deleted before it was read, or ``None``: without it the verdicts read as all there are."""
        return deleted_warning(self.deleted, "label record(s)", "were not read")

    def digest(self) -> str:
        """SHA-256 of the verdicts in force (transaction and verdict, sorted): what a model's metadata can
        record as the labels it was trained with, equal whatever the topic's offsets or compaction."""
        lines = "".join(f"{tx}\t{label.label}\n" for tx, label in sorted(self.by_transaction.items()))
        return hashlib.sha256(lines.encode()).hexdigest()

    def summary(self) -> str:
        total = len(self.by_transaction)
        fraud = sum(1 for label in self.by_transaction.values() if label.label == FRAUD)
        parts = [
            f"{total:,} field label(s) in force ({fraud:,} fraud, {total - fraud:,} legit)",
            f"{self.read:,} record(s) read",
        ]
        if self.replaced:
            parts.append(f"{self.replaced:,} replaced by a later record")
        if self.withdrawn:
            parts.append(f"{len(self.withdrawn):,} withdrawn")
        if self.undecodable or self.wrong_key:
            parts.append(f"{self.undecodable + self.wrong_key:,} unusable")
        return ", ".join(parts)


def latest_labels(messages: Iterable[tuple[bytes | None, bytes | None]]) -> FieldLabels:
    """The verdict in force per transaction from ``(key, value)`` messages of the labels topic, each
    partition's in offset order: the last verdict wins; a tombstone (value None) withdraws. An unusable
    record (undecodable, or keyed by another transaction) ends its key's earlier verdict, as compaction,
    which keeps only the latest record per key, would: the answer must not depend on when it ran."""
    out = FieldLabels()

    def unusable(key: bytes | None) -> None:
        if key is not None and out.by_transaction.pop(key.decode("utf-8", "replace"), None) is not None:
            out.replaced += 1

    for key, value in messages:
        out.read += 1
        if value is None:
            if key is None:
                out.wrong_key += 1
                continue
            tx = key.decode("utf-8", "replace")
            if out.by_transaction.pop(tx, None) is not None:
                out.replaced += 1
            out.withdrawn.add(tx)
            continue
        try:
            label = Label.decode(value)
            check(label.transaction_id, "transaction_id")
            if label.label not in (FRAUD, LEGITIMATE):
                raise InvalidRecord("invalid", "label must be 1 or 0")
        except (InvalidRecord, TypeError, ValueError):
            out.undecodable += 1
            unusable(key)
            continue
        if key != label.transaction_id.encode():
            out.wrong_key += 1
            unusable(key)
            continue
        if label.transaction_id in out.by_transaction:
            out.replaced += 1
        out.by_transaction[label.transaction_id] = label
        out.withdrawn.discard(label.transaction_id)
    return out


# ---------------------------------------------------------------------------- pure: transactions, the join


@dataclass
class TopicTransactions:
    """Transactions read from the topic, in event-time order, and what could not be used."""

    transactions: list[PosTransaction] = field(default_factory=list)
    read: int = 0
    undecodable: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    """Undecodable records by kind (``not_avro``, ``corrupt``, ...)."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``("<topic>:<partition>:<offset>", reason)`` of the first :data:`MAX_REJECTED` undecodable records,
    in the shape ``observe_all`` reports rejects."""
    end_offsets: dict[int, int] = field(default_factory=dict)
    deleted: dict[int, int] = field(default_factory=dict)
    """Per partition, records retention deleted while the topic was being read: not in the history."""
    digest: str = ""
    """SHA-256 of the records read (per partition: each record's offset and value, in offset order), undecodable
    ones too: the training data's fingerprint. The end offsets alone named different data alike once retention
    had removed the oldest records; this is equal only for the very same records."""

    def warning(self) -> str | None:
        """What retention deleted before it was read, or ``None``: without it the history reads as complete."""
        return deleted_warning(self.deleted, "transaction record(s)", "are not in the history")

    def summary(self) -> str:
        text = f"{len(self.transactions):,} transaction(s) from {self.read:,} record(s)"
        if self.undecodable:
            kinds = ", ".join(f"{kind} {n:,}" for kind, n in self.reasons.most_common())
            text += f", {self.undecodable:,} undecodable ({kinds})"
        return text


def decode_transactions(
    messages: Iterable[tuple[str, int, int, bytes | None, int | None]],
    max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
) -> TopicTransactions:
    """``(topic, partition, offset, value, written_at)`` as transactions ordered by event time (ties: partition,
    offset); a value that does not decode as a PosTransaction is counted and left out, and so is one dated more than
    ``max_future_skew_ms`` after ``written_at`` (its Kafka timestamp, ms; ``None``: unknown), which the job dead-letters
    ``invalid_timestamp`` at once (it reads it by then). Each partition's messages come in offset order (their
    interleaving does not change :attr:`TopicTransactions.digest`)."""
    out = TopicTransactions()
    keyed: list[tuple[int, int, int, PosTransaction]] = []
    hashes: dict[int, Any] = {}
    for topic, partition, offset, value, written_at in messages:
        out.read += 1
        h = hashes.setdefault(partition, hashlib.sha256())
        h.update(struct.pack(">qq", offset, -1 if value is None else len(value)))  # lengths: no two splits alike
        h.update(value or b"")
        try:
            tx = PosTransaction.decode(value or b"")
        except InvalidRecord as exc:  # DecodeError too
            _reject(out, f"{topic}:{partition}:{offset}", exc.kind, exc.reason)
            continue
        except (TypeError, ValueError) as exc:  # decoded, but not a PosTransaction the dataclass takes
            _reject(out, f"{topic}:{partition}:{offset}", "invalid", str(exc)[:200])
            continue
        if written_at is not None:  # offline rows have no "now"; a record has the time Kafka took it
            try:
                check_not_ahead(tx.event_time, written_at, max_future_skew_ms)
            except InvalidRecord as exc:
                _reject(out, f"{topic}:{partition}:{offset}", exc.kind, exc.reason)
                continue
        keyed.append((tx.event_time, partition, offset, tx))
    keyed.sort(key=lambda item: item[:3])
    out.transactions = [tx for *_, tx in keyed]
    out.digest = hashlib.sha256(
        "".join(f"{p}:{h.hexdigest()}\n" for p, h in sorted(hashes.items())).encode()
    ).hexdigest()
    return out


def _reject(out: TopicTransactions, where: str, kind: str, reason: str) -> None:
    out.undecodable += 1
    out.reasons[kind] += 1
    if len(out.rejected) < MAX_REJECTED:
        out.rejected.append((where, reason))


@dataclass
class JoinStats:
    """How field labels met the transactions."""

    labels: int = 0
    """Field labels offered."""
    joined: int = 0
    """Transactions (distinct ids) that got a field label."""
    fraud: int = 0
    legit: int = 0
    newly_labelled: int = 0
    """Joined transactions that carried no label before."""
    changed: int = 0
    """Joined transactions whose own label (e.g. the CSV's) the field verdict overturned."""
    unmatched: list[str] = field(default_factory=list)
    """Transaction ids of field labels with no transaction among the records (sorted)."""

    def summary(self) -> str:
        return (
            f"field labels: {self.labels:,} offered, {self.joined:,} joined ({self.fraud:,} fraud, {self.legit:,} "
            f"legit; {self.newly_labelled:,} newly labelled, {self.changed:,} overturned the data's label), "
            f"{len(self.unmatched):,} without a transaction in the history{_first(self.unmatched)}"
        )


def _first(ids: list[str], n: int = 5) -> str:
    """The first ``n`` ids, so a mistyped one can be found (``: a, b, ... and 3 more``)."""
    if not ids:
        return ""
    more = f" and {len(ids) - n:,} more" if len(ids) > n else ""
    return ": " + ", ".join(ids[:n]) + more


Item = Any
"""A ``PosTransaction``, a transaction dict (``History.items``' shape) or an ``(id, reason)`` reject."""


def apply_labels(records: Iterable[Item], labels: Mapping[str, Label] | FieldLabels) -> tuple[list[Item], JoinStats]:
    """``records`` with each field verdict set as its transaction's ``label`` (order kept; every copy of a
    repeated transaction id is labelled), and the join's counts. ``(id, reason)`` rejects pass through."""
    verdicts = labels.by_transaction if isinstance(labels, FieldLabels) else labels
    stats = JoinStats(labels=len(verdicts))
    out: list[Item] = []
    joined: set[str] = set()
    for record in records:
        tx_id, before = _id_and_label(record)
        verdict = verdicts.get(tx_id) if tx_id is not None else None
        if tx_id is None or verdict is None:
            out.append(record)
            continue
        if isinstance(record, PosTransaction):
            out.append(replace(record, label=verdict.label))
        else:
            out.append({**record, "label": verdict.label})
        if tx_id in joined:
            continue
        joined.add(tx_id)
        stats.joined += 1
        stats.fraud += verdict.label == FRAUD
        stats.legit += verdict.label == LEGITIMATE
        stats.newly_labelled += before is None
        stats.changed += before is not None and before != verdict.label
    stats.unmatched = sorted(set(verdicts) - joined)
    return out, stats


def _id_and_label(record: Item) -> tuple[str | None, int | None]:
    if isinstance(record, PosTransaction):
        return record.transaction_id, record.label
    if isinstance(record, Mapping):
        return record.get("transaction_id"), record.get("label")
    return None, None  # a reject


# ---------------------------------------------------------------------------- Kafka


def read_labels(settings: Settings, timeout_s: float = 30.0) -> FieldLabels:
    """The verdicts in force on the labels topic now (see :func:`latest_labels`). Raises
    ``RangeError`` when the topic does not exist, ``TimeoutError`` when no record comes for ``timeout_s``
    before the end is reached."""
    topic = LABELS.full_name(settings.kafka.topic_prefix)
    ends: dict[int, int] = {}
    deleted: dict[int, int] = {}
    messages = read_topic(settings, topic, timeout_s=timeout_s, ends=ends, deleted=deleted)
    found = latest_labels((m.key(), m.value()) for m in messages)
    found.end_offsets, found.deleted = ends, deleted
    return found


def transactions_from_topic(
    settings: Settings,
    since_ms: int | None = None,
    until_ms: int | None = None,
    timeout_s: float = 30.0,
) -> TopicTransactions:
    """The transactions topic (records with a Kafka timestamp in ``[since_ms, until_ms)``; default all) up to
    its end now, decoded and in event-time order (see :func:`decode_transactions`)."""
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    ends: dict[int, int] = {}
    deleted: dict[int, int] = {}
    messages = read_topic(
        settings, topic, since_ms=since_ms, until_ms=until_ms, timeout_s=timeout_s, ends=ends, deleted=deleted
    )
    found = decode_transactions(
        ((topic, m.partition() or 0, m.offset() or 0, m.value(), written_at_ms(m)) for m in messages),
        settings.job.max_future_skew_ms,
    )
    found.end_offsets, found.deleted = ends, deleted
    return found


def read_topic(
    settings: Settings,
    topic: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    timeout_s: float = 30.0,
    ends: dict[int, int] | None = None,
    deleted: dict[int, int] | None = None,
) -> Iterator[Message]:
    """Every committed record of ``topic`` (full name) from the beginning (or ``since_ms``) to its end at the
    call (or the first record at/after ``until_ms``), each partition in offset order. ``ends`` is filled
    with the end offsets used, ``deleted`` with what retention deleted before it was read, per partition (the
    read goes on from the earliest kept record). ``TimeoutError`` after ``timeout_s`` without a record before
    the end."""
    start = Bound(time_ms=since_ms) if since_ms is not None else Bound()
    end = Bound(time_ms=until_ms) if until_ms is not None else Bound()
    ranges = plan(settings.kafka, topic, start, end)
    if ends is not None:
        ends.update({r.partition: r.end for r in ranges})
    gone: dict[int, int] = {} if deleted is None else deleted  # always counted: never an ``earliest`` reset
    yield from read_range_records(settings.kafka, topic, ranges, "labels-read", idle_timeout_s=timeout_s, deleted=gone)
