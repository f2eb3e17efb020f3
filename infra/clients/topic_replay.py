"""Re-publish a range of a Kafka topic into a target topic: backfills, re-scoring, backtests.

Input: a source topic (``<source prefix><topic>``), a range chosen by offsets (one offset for every
partition, or per partition) or by timestamps (``offsets_for_times``), end exclusive and fixed when the
replay starts, so replaying a topic into itself ends. Output: the same records -- key, value, headers
and (unless ``--restamp``) the original timestamp -- in the target topic (``<target prefix><topic>``,
on the same cluster or another one).

Order: each source partition is read in offset order and the partitions are merged by record
timestamp (ties by partition, offset), so one partition's records are never reordered and a target
with fewer partitions still gets them in the order they first arrived. A record goes to the same
partition number when the target has as many partitions as the source, else by its key (murmur2, the
Java client's choice, so a key lands where a Java producer would put it).

Delivery: an idempotent producer (``acks=all``), so a retried send neither doubles nor reorders. A
replay is at-least-once by nature -- running it twice sends the records twice -- which is safe here
because every consumer is idempotent by key: the scoring job drops a transaction id it has seen
(receipt state) and the OpenSearch sink writes one document per business key.

CLI: ``python -m producers.replay run transactions --from-time 2026-11-22T06:00:00Z --to-time ...``
(``--dry-run`` prints the range sizes only); ``python -m producers.replay --help``.
"""

from __future__ import annotations

import heapq
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.kafka import TopicUnavailable as TopicUnavailable  # re-exported: every reader raises it
from infra.clients.kafka import topic_unavailable
from infra.clients.kafka import topic_unusable as topic_unusable
from infra.pacing import TokenBucket
from infra.settings import KafkaSettings
from schemas.errors import CheckoutGuardError

console = Console(stderr=True)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)

LATEST_MS = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - _EPOCH) // _MS
"""The last millisecond a time can name (9999-12-31T23:59:59.999Z): one later cannot be written as a date."""

OFFSET_END = -1
"""What ``offsets_for_times`` answers for a partition with no record at or after the time."""


class RangeError(CheckoutGuardError, ValueError):
    """A range that cannot be resolved (bad syntax, unknown partition); the message says which."""


class TimeOutOfRange(RangeError):
    """A well-formed time before 1970 (``early``) or past 9999 in UTC: callers that word their own reasons say which
    bound it crossed, not that it is no time."""

    def __init__(self, message: str, early: bool) -> None:
        super().__init__(message)
        self.early = early


class NoSuchTopic(RangeError):
    """The topic to read is not on the cluster: a wrong name given (a usage error) or a topic the tool relies on
    that is missing (an operational failure); the caller tells which."""


# ---------------------------------------------------------------------------- pure: ranges


def parse_time_ms(text: str, now_ms: int | None = None) -> int:
    """``now``, epoch milliseconds (all digits) or ISO-8601 (``2026-11-22T06:00:00Z``; no zone = UTC). A time
    before 1970 is refused: Kafka takes negative milliseconds as positions (-1 latest, -2 earliest), so a start a
    millisecond before 1970 read nothing; so is one past 9999 in UTC (a zone can push it there), which no date
    names."""
    text = text.strip()
    if text == "now":
        return now_ms if now_ms is not None else clock.now_ms()
    if clock.ascii_digits(text):
        if not clock.is_epoch_ms_text(text):
            raise RangeError(f"not epoch milliseconds (13 digits): {text!r}; seconds? give {text}000 or ISO-8601")
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RangeError(f"not a time: {text!r} (ISO-8601 like 2026-11-22T06:00:00Z, epoch ms, or now)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # whole milliseconds by integer arithmetic: timestamp() * 1000 is a float and came out one short for some times
    # (2004-01-26T23:51:08.353Z -> ...352), moving a range's bound onto the millisecond before
    ms = (moment - _EPOCH) // _MS
    if ms < 0:
        raise TimeOutOfRange(
            f"{text!r} is before 1970-01-01T00:00:00Z: Kafka takes times as milliseconds since then (and -1, -2 as"
            " latest, earliest)",
            early=True,
        )
    if ms > LATEST_MS:
        raise TimeOutOfRange(f"{text!r} is after 9999-12-31T23:59:59.999Z in UTC: no date names it", early=False)
    return ms


def parse_offsets(text: str) -> dict[int, int] | int:
    """``100`` (every partition) or ``0:100,2:50`` (per partition; others unbounded). A partition named twice is
    refused: which offset was meant cannot be told (the last one used to win, so ``0:1500,0:150`` replayed to 150)."""
    text = text.strip()
    if clock.ascii_digits(text) and len(text) <= 19 and int(text) < 2**63:  # Kafka offsets are int64
        return int(text)
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        p, sep, o = (x.strip() for x in part.partition(":"))
        if not (
            sep and clock.ascii_digits(p) and clock.ascii_digits(o) and len(p) <= 10 and len(o) <= 19 and int(o) < 2**63
        ):
            raise RangeError(f"bad offsets {text!r}: use N or PARTITION:OFFSET,... (e.g. 0:100,2:50)")
        if int(p) in out:
            raise RangeError(f"bad offsets {text!r}: partition {int(p)} is named twice")
        out[int(p)] = int(o)
    if not out:
        raise RangeError("empty offsets")
    return out


@dataclass(frozen=True)
class Bound:
    """One end of the range: an offset for every partition, offsets per partition, or a time."""

    offsets: dict[int, int] | int | None = None
    time_ms: int | None = None

    def __post_init__(self) -> None:
        if self.offsets is not None and self.time_ms is not None:
            raise RangeError("give an offset or a time for one end of the range, not both")


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    start: int
    end: int
    """Exclusive."""
    low: int
    high: int
    """The partition's watermarks when the range was resolved."""
    gone: int = 0
    """Offsets asked for that lie below ``low``: deleted by retention, so not in ``[start, end)``."""
    unwritten: int = 0
    """Offsets asked for at or above ``high`` (an end offset past the partition's end): not written yet."""
    time_cut: bool = False
    """A start time earlier than the earliest kept record (at ``low``), with records below ``low`` deleted by
    retention: some of the window may have been among them; how many cannot be told."""

    @property
    def size(self) -> int:
        """Records in the range (at most: a compacted topic has gaps)."""
        return max(0, self.end - self.start)


def gone_warning(ranges: Iterable[PartitionRange]) -> str | None:
    """The warning for a range that retention already cut, or ``None`` when every offset asked for is kept: the
    start is moved up to the earliest kept offset, and without a word the operator took the range as copied whole."""
    cut = [r for r in ranges if r.gone > 0]
    if not cut:
        return None
    where = "; ".join(f"partition {r.partition}: {r.gone:,} before {r.low:,}, the earliest kept" for r in cut)
    return (
        f"{sum(r.gone for r in cut):,} offset(s) of the range are gone (deleted by retention) and cannot be"
        f" replayed ({where}); only what is kept is copied"
    )


def unwritten_warning(ranges: Iterable[PartitionRange]) -> str | None:
    """The warning for an end offset past the partition's end, or ``None``: the end is cut back to the end of the
    partition, and without a word the operator took the offsets up to the one given as copied."""
    cut = [r for r in ranges if r.unwritten > 0]
    if not cut:
        return None
    where = "; ".join(f"partition {r.partition}: {r.unwritten:,} from {r.high:,}, its end" for r in cut)
    return (
        f"{sum(r.unwritten for r in cut):,} offset(s) of the range are not written yet (the end offset is past the"
        f" end of the partition) and cannot be replayed ({where}); only what is there is copied"
    )


def time_cut_warning(ranges: Iterable[PartitionRange]) -> str | None:
    """The warning for a start time before what retention kept, or ``None``: the start moves to the earliest kept
    record, and without a word the operator took the window as copied from its start."""
    cut = [r for r in ranges if r.time_cut]
    if not cut:
        return None
    where = "; ".join(f"partition {r.partition}: offsets before {r.low:,} deleted" for r in cut)
    return (
        "the start time is earlier than the earliest record retention kept, so part of the window may be gone"
        f" ({where}); only what is kept is copied"
    )


def range_warnings(ranges: Iterable[PartitionRange]) -> list[str]:
    """Every way the resolved range falls short of the one asked for (each a sentence for a ``Warning:`` line):
    replay and the stream backtest show the same ones."""
    ranges = list(ranges)
    warnings = (gone_warning(ranges), time_cut_warning(ranges), unwritten_warning(ranges))
    return [w for w in warnings if w is not None]


def check_order(start: Bound, end: Bound) -> None:
    """Refuse a range whose end was given before its start: it would resolve to nothing and the copy would end
    with exit 0 as if it had replayed what was asked. Only ends given the same way are compared (a time with
    a time, offsets with offsets); an end that falls before the start once clipped to what retention kept is
    an empty range, not an error."""
    if start.time_ms is not None and end.time_ms is not None and start.time_ms > end.time_ms:
        raise RangeError(
            f"the start {_iso(start.time_ms)} is later than the end {_iso(end.time_ms)}: the range would be empty"
            " (swap --from-time and --to-time?)"
        )
    if start.offsets is None or end.offsets is None:
        return
    if isinstance(start.offsets, int) and isinstance(end.offsets, int):
        pairs = {"every partition": (start.offsets, end.offsets)}
    else:
        named = [set(o) for o in (start.offsets, end.offsets) if isinstance(o, dict)]
        pairs = {
            f"partition {p}": (_offset(start.offsets, p), _offset(end.offsets, p))
            for p in sorted(set.intersection(*named))
        }
    after = [f"{where}: {s} > {e}" for where, (s, e) in pairs.items() if s > e]
    if after:
        raise RangeError(
            f"the start offset is past the end offset ({'; '.join(after)}): the range would be empty"
            " (swap --from-offsets and --to-offsets?)"
        )


def _offset(offsets: dict[int, int] | int, partition: int) -> int:
    return offsets if isinstance(offsets, int) else offsets[partition]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resolve_ranges(
    watermarks: Mapping[int, tuple[int, int]],
    start: Bound,
    end: Bound,
    offsets_for_time: Callable[[int], Mapping[int, int]],
    partitions: Iterable[int] | None = None,
) -> list[PartitionRange]:
    """Concrete ``[start, end)`` offsets per partition, clipped to the watermarks; what a start offset below the
    low watermark asked for and retention deleted is counted in ``gone`` (:func:`gone_warning`), what an end offset
    past the high watermark asked for in ``unwritten`` (:func:`unwritten_warning`); a start time before the earliest
    record retention kept marks ``time_cut`` (:func:`time_cut_warning`).

    Defaults: from the low watermark (earliest) to the high watermark at this moment. A time resolves
    to the first offset whose timestamp is at or after it (``offsets_for_time(ms) -> {partition:
    offset}``, -1 = none, i.e. the high watermark). Per-partition offsets leave unnamed partitions at
    their default; offsets for a partition that ``partitions`` leaves out are refused. Raises
    :class:`RangeError` for a partition the topic does not have, a range that ends before it starts
    (:func:`check_order`), or a start offset past the partition's end (the range would be empty).
    """
    check_order(start, end)
    wanted = sorted(watermarks) if partitions is None else sorted(set(partitions))
    unknown = [p for p in wanted if p not in watermarks]
    if unknown:
        raise RangeError(f"no partition(s) {unknown}; the topic has {sorted(watermarks)}")

    def pick(bound: Bound, default_end: bool) -> dict[int, int]:
        out = {p: watermarks[p][1] if default_end else watermarks[p][0] for p in wanted}
        if bound.time_ms is not None:
            found = offsets_for_time(bound.time_ms)
            for p in wanted:
                offset = found.get(p, OFFSET_END)
                out[p] = watermarks[p][1] if offset is None or offset < 0 else offset
        elif isinstance(bound.offsets, int):
            out = dict.fromkeys(wanted, bound.offsets)
        elif bound.offsets is not None:
            bad = sorted(set(bound.offsets) - set(watermarks))
            if bad:
                raise RangeError(f"no partition(s) {bad}; the topic has {sorted(watermarks)}")
            left_out = sorted(set(bound.offsets) - set(wanted))
            if left_out:  # the offsets were meant for a partition: silently replaying the others misleads
                raise RangeError(f"offsets given for partition(s) {left_out}, which --partitions {wanted} leaves out")
            out.update({p: o for p, o in bound.offsets.items() if p in out})
        return out

    starts, ends = pick(start, default_end=False), pick(end, default_end=True)
    past = [f"partition {p}: {starts[p]:,} > {watermarks[p][1]:,}" for p in wanted if starts[p] > watermarks[p][1]]
    if past:  # cut back to the end it was an empty range: nothing replayed, exit 0
        raise RangeError(
            f"the start offset is past the end of the partition ({'; '.join(past)}, its end now): nothing there to"
            " replay (--dry-run without a start shows each partition's end; --partitions leaves one out)"
        )
    time_cut = _time_cut(watermarks, start, starts, offsets_for_time)
    ranges = []
    for p in wanted:
        low, high = watermarks[p]
        s = min(max(starts[p], low), high)
        e = min(max(ends[p], s), high)
        gone = max(0, min(ends[p], low) - starts[p])  # asked for, below what retention kept
        unwritten = max(0, ends[p] - max(starts[p], high))  # asked for, past the end of the partition
        ranges.append(PartitionRange(p, s, e, low, high, gone, unwritten, p in time_cut))
    return ranges


def _time_cut(
    watermarks: Mapping[int, tuple[int, int]],
    start: Bound,
    starts: Mapping[int, int],
    offsets_for_time: Callable[[int], Mapping[int, int]],
) -> set[int]:
    """The partitions where a start time lies before what retention kept: the time resolved to the earliest kept
    offset, which retention moved above 0, and that record is later than the time (the first offset at or after
    the time plus 1 ms is still it). A record exactly at the time is the window's start: nothing is missing."""
    if start.time_ms is None:
        return set()
    at_low = {p for p, offset in starts.items() if offset == watermarks[p][0] > 0 and offset < watermarks[p][1]}
    if not at_low:
        return set()
    later = offsets_for_time(start.time_ms + 1)
    return {p for p in at_low if later.get(p) == watermarks[p][0]}


def target_partition(source_partition: int, source_partitions: int, target_partitions: int) -> int | None:
    """The same partition number when the target has as many partitions, else ``None`` (by key)."""
    return source_partition if source_partitions == target_partitions else None


# ---------------------------------------------------------------------------- pure: merge

T = TypeVar("T")


@dataclass
class TimestampMerge(Generic[T]):
    """Merge per-partition streams (each in offset order) into one, by (timestamp, partition, offset).

    A record is released only when every partition still being read has a record waiting, so the
    merge never releases a record that an unseen earlier one should have preceded. Per-partition order
    is kept whatever the timestamps are (a partition contributes only its head).
    """

    open_partitions: set[int]
    buffers: dict[int, deque[tuple[tuple[int, int], T]]] = field(default_factory=dict)

    def add(self, partition: int, sort_key: tuple[int, int], item: T) -> None:
        self.buffers.setdefault(partition, deque()).append((sort_key, item))

    def close(self, partition: int) -> None:
        """No more records will come from ``partition``."""
        self.open_partitions.discard(partition)

    def buffered(self, partition: int) -> int:
        return len(self.buffers.get(partition, ()))

    def ready(self) -> Iterable[T]:
        """Release what can be released now, in merged order."""
        heads = [(buf[0][0][0], p, buf[0][0][1]) for p, buf in self.buffers.items() if buf]
        heapq.heapify(heads)
        while heads:
            if any(not self.buffers.get(p) for p in self.open_partitions):
                return
            _, p, _ = heapq.heappop(heads)
            _, item = self.buffers[p].popleft()
            yield item
            if self.buffers[p]:
                key = self.buffers[p][0][0]
                heapq.heappush(heads, (key[0], p, key[1]))

    @property
    def empty(self) -> bool:
        return not any(self.buffers.values())


# ---------------------------------------------------------------------------- Kafka


@dataclass
class ReplayStats:
    planned: int = 0
    read: int = 0
    sent: int = 0
    acked: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    per_partition: dict[int, int] = field(default_factory=dict)
    """Records read per source partition."""
    deleted: dict[int, int] = field(default_factory=dict)
    """Offsets of the range retention deleted from the source while it was being copied, per partition (the gap
    between where the partition was and the earliest kept offset): not copied."""
    resume: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Of a replay that stopped (:class:`ReplayStopped`): per source partition not copied whole, the first offset
    not acknowledged (sent, or not sent yet) and the range's end (exclusive)."""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.acked == self.sent


class ReplayStopped(CheckoutGuardError, RuntimeError):
    """A replay that could not go on (a partition that yields nothing before its range's end, a record the producer
    refuses): the message says why; ``stats`` holds what was sent and acknowledged and where to resume."""

    def __init__(self, message: str, stats: ReplayStats) -> None:
        super().__init__(message)
        self.stats = stats


def resume_options(resume: Mapping[int, tuple[int, int]]) -> str:
    """The options that replay exactly what a stopped replay left (its partitions, from their first offset not
    acknowledged, to the same ends): without ``--partitions``, the others would be replayed whole again."""
    parts = sorted(resume)
    return (
        f"--partitions {','.join(map(str, parts))}"
        f" --from-offsets {','.join(f'{p}:{resume[p][0]}' for p in parts)}"
        f" --to-offsets {','.join(f'{p}:{resume[p][1]}' for p in parts)}"
    )


def assigned_consumer(kafka: KafkaSettings, purpose: str, auto_offset_reset: str = "earliest") -> Consumer:
    """A consumer for reading assigned ranges: committed records only, an event at each partition's end,
    a throwaway group that never commits (``checkout-guard-<purpose>-<random>``)."""
    return kafka_clients.consumer(
        kafka,
        f"checkout-guard-{purpose}-{uuid.uuid4().hex[:12]}",
        kafka_clients.READ_COMMITTED,
        enable_partition_eof=True,
        auto_offset_reset=auto_offset_reset,
    )


def _consumer(kafka: KafkaSettings) -> Consumer:
    return assigned_consumer(kafka, "replay", auto_offset_reset="error")


TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
"""What a broker answers for a record (or the batch holding it) over the target topic's ``max.message.bytes``."""

RETENTION_RESETS = frozenset({KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE})
"""What a consumer with ``auto.offset.reset=error`` reports when its position fell below the log start."""


def read_assigned(
    consumer: Consumer,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    idle_timeout_s: float = 30.0,
    deleted: dict[int, int] | None = None,
) -> Iterator[Message]:
    """The records of ``[start, end)`` per partition of ``topic``, each partition in offset order (fewer than
    ``end - start`` where offsets are compaction gaps or transaction markers). A partition is done at its
    end of partition, at a record at/after ``end``, or when the consumer's position passed ``end`` (a gap or
    marker at the end); ``TimeoutError`` when nothing arrives for ``idle_timeout_s`` before all are done.
    With ``deleted`` (and a consumer with ``auto.offset.reset=error``), records retention deletes before they are
    read are counted there per partition and the read goes on from the earliest kept one; without it that error
    raises. A partition the broker answers with another error (not authorised, say) raises :class:`TopicUnavailable`
    with its words. Leaves the consumer unassigned, not closed (a follow-up read may reuse it)."""
    todo = {p: r for p, r in ranges.items() if r[0] < r[1]}
    if not todo:
        return
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
    after = {p: start for p, (start, _) in todo.items()}  # the next offset each partition is to read
    last = time.monotonic()
    try:
        while todo:
            messages = consumer.consume(500, 0.5)
            if messages:
                last = time.monotonic()
            elif time.monotonic() - last > idle_timeout_s:
                raise TimeoutError(f"{topic}: nothing read for {idle_timeout_s:.0f}s from partitions {sorted(todo)}")
            for message in messages:
                error, p = message.error(), message.partition()
                if deleted is not None and error is not None and error.code() in RETENTION_RESETS and p in todo:
                    _skip_deleted(consumer, topic, p, todo, after, deleted)
                elif p is not None and _in_range(message, topic, todo):  # (a record of the range has one)
                    after[p] = (message.offset() or 0) + 1
                    yield message
            for p, tp in zip(list(todo), consumer.position([TopicPartition(topic, p) for p in todo]), strict=True):
                if tp.offset >= todo[p][1]:
                    del todo[p]
    finally:
        consumer.unassign()


def _skip_deleted(
    consumer: Consumer,
    topic: str,
    p: int,
    todo: dict[int, tuple[int, int]],
    after: dict[int, int],
    deleted: dict[int, int],
) -> None:
    """Retention deleted partition ``p`` from ``after[p]`` on before it was read: count what of the range went and read
    on from the earliest kept offset, or end the partition when all of it went."""
    gone, low = skip_deleted(consumer, topic, p, after[p], todo[p][1])
    deleted[p] = deleted.get(p, 0) + gone
    if low >= todo[p][1]:
        del todo[p]
    else:
        after[p] = low


def skip_deleted(consumer: Consumer, topic: str, p: int, at: int, end: int | None = None) -> tuple[int, int]:
    """Partition ``p``'s next offset to read, ``at``, is below what retention keeps now (a consumer with
    ``auto.offset.reset=error`` reported it, :data:`RETENTION_RESETS`): move the partition on to the earliest kept
    offset, or unassign it when nothing of ``[at, end)`` is kept (``end`` None: no end, as when following).
    Returns how many offsets of ``[at, end)`` retention deleted (the gap: an ``earliest`` reset skipped them
    without a word) and that earliest kept offset. Every reader of a range counts its losses this way."""
    low = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[0]
    stop = low if end is None else min(low, end)
    consumer.incremental_unassign([TopicPartition(topic, p)])
    if end is None or low < end:
        consumer.incremental_assign([TopicPartition(topic, p, low)])
    return max(0, stop - at), low


def deleted_warning(deleted: Mapping[int, int], what: str = "record(s)", lost: str = "were not read") -> str | None:
    """The warning for ``deleted`` (per partition, what retention deleted while it was being read), or ``None`` when
    nothing was: without a word the output reads as everything the topic held."""
    gone = {p: n for p, n in sorted(deleted.items()) if n > 0}
    if not gone:
        return None
    where = ", ".join(f"partition {p}: {n:,}" for p, n in gone.items())
    return f"{sum(gone.values()):,} {what} were deleted by retention while being read ({where}) and {lost}"


def _in_range(message: Message, topic: str, todo: dict[int, tuple[int, int]]) -> bool:
    """Whether ``message`` is a record to yield; closes its partition when it ends the range."""
    p = message.partition()
    if p not in todo:
        return False
    error = message.error()
    if error is not None:
        if error.code() != KafkaError._PARTITION_EOF:  # the broker's words: not the client's error object
            raise topic_unavailable(topic, error, p)
        del todo[p]
        return False
    start, end = todo[p]
    offset = message.offset()
    if offset is None or offset < start:
        return False  # fetched before this assignment
    if offset >= end:
        del todo[p]
        return False
    if offset >= end - 1:
        del todo[p]
    return True


def read_range_records(
    kafka: KafkaSettings,
    topic: str,
    ranges: Iterable[PartitionRange],
    purpose: str,
    idle_timeout_s: float = 30.0,
    deleted: dict[int, int] | None = None,
) -> Iterator[Message]:
    """:func:`read_assigned` with a consumer of its own, closed at the end. With ``deleted``, what retention deletes
    before it is read is counted there (the consumer errs instead of skipping to the earliest kept record)."""
    consumer = assigned_consumer(kafka, purpose, "earliest" if deleted is None else "error")
    try:
        spans = {r.partition: (r.start, r.end) for r in ranges}
        yield from read_assigned(consumer, topic, spans, idle_timeout_s, deleted)
    finally:
        consumer.close()


def _producer(kafka: KafkaSettings) -> Producer:
    """Idempotent, ``acks=all``: a retried send is neither lost, nor doubled, nor reordered."""
    return kafka_clients.producer(
        kafka,
        kafka_clients.RELIABLE,
        client_id="checkout-guard-replay",
        compression_type="lz4",
        partitioner="murmur2_random",
    )


def partition_count(client: Consumer | Producer, topic: str, kafka: KafkaSettings | None = None) -> int:
    """Partitions of ``topic`` (0 when it does not exist); :class:`TopicUnavailable` when the broker answers for it
    with an error (no leader, not authorised): taken for no partitions, the tail said such a topic did not exist and
    a caller waiting for it to be read found nothing left to read; ``KafkaUnavailable`` when no broker answers. From
    the list of all topics: a producer asking for one by name could make a broker create it.

    A partition listed without a leader, or with an error, is :class:`TopicUnavailable` too (:func:`topic_unusable`),
    though the count is known: each caller next asks every partition's leader (its ends: the tail, the watermarks,
    ``caught_up``; its records: the replay's source), which for that one failed (after up to a 10 s timeout) with the
    client's error object, the partition unnamed."""
    md = kafka_clients.listed_topic(kafka_clients.cluster_metadata(client, kafka), topic)
    if md is None:
        return 0
    if (why := topic_unusable(topic, md)) is not None:
        raise why
    return len(md.partitions)


def high_watermarks(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """Per partition, the offset the next record will get (empty when the topic does not exist;
    :class:`TopicUnavailable` when the broker answers for it with an error)."""
    consumer = _consumer(kafka)
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in range(partition_count(consumer, topic, kafka))
        }
    finally:
        consumer.close()


def committed_offsets(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    """A consumer group's committed offsets on ``topic`` (negative = nothing committed yet; empty when the topic does
    not exist; :class:`TopicUnavailable` when the broker answers for it with an error)."""
    consumer = kafka_clients.consumer(kafka, group, kafka_clients.MANUAL_COMMIT)
    try:
        parts = [TopicPartition(topic, p) for p in range(partition_count(consumer, topic, kafka))]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()


def caught_up(kafka: KafkaSettings, group: str, topic: str) -> bool:
    """Has ``group`` committed everything ``topic`` holds now? (Flink commits on each checkpoint.) Never "yes" for a
    topic that does not exist: it has no partitions, and a caller waiting on it compared at once, as if all was read;
    :class:`TopicUnavailable` when the broker answers for the topic with an error."""
    ends = high_watermarks(kafka, topic)
    if not ends:
        return False
    done = committed_offsets(kafka, group, topic)
    return all(done.get(p, -1) >= end or end == 0 for p, end in ends.items())


def plan(
    kafka: KafkaSettings,
    topic: str,
    start: Bound,
    end: Bound,
    partitions: Iterable[int] | None = None,
) -> list[PartitionRange]:
    """Resolve the range of ``topic`` (full name) against the broker, now: :class:`NoSuchTopic` when the cluster
    has no such topic, :class:`TopicUnavailable` when the broker answers for it with an error, or for one of its
    partitions, or lists one without a leader (:func:`topic_unusable`, as :func:`partition_count`): every
    partition's watermarks are asked of its leader next, and judged by the topic's own error only, a leaderless
    partition failed there after the 10 s timeout with the client's error object, the partition unnamed."""
    consumer = _consumer(kafka)
    try:
        md = kafka_clients.listed_topic(kafka_clients.cluster_metadata(consumer, kafka), topic)
        if md is None:
            raise NoSuchTopic(f"topic {topic} does not exist")
        if (why := topic_unusable(topic, md)) is not None:
            raise why
        count = len(md.partitions)
        watermarks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False) for p in range(count)
        }

        def offsets_for_time(ms: int) -> dict[int, int]:
            found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in range(count)], timeout=10)
            return {tp.partition: tp.offset for tp in found}

        return resolve_ranges(watermarks, start, end, offsets_for_time, partitions)
    finally:
        consumer.close()


def replay(
    source: KafkaSettings,
    source_topic: str,
    target: KafkaSettings,
    target_topic: str,
    ranges: list[PartitionRange],
    rate: float = 0,
    restamp: bool = False,
    progress: bool = True,
    max_buffered: int = 20_000,
    idle_timeout_s: float = 60.0,
) -> ReplayStats:
    """Copy the records of ``ranges`` from ``source_topic`` to ``target_topic``; wait for every ack.

    ``rate`` caps records per second (0 = no cap). ``restamp`` gives the copies the time of the replay
    instead of their original timestamps. Raises :class:`ReplayStopped` (with what was sent and acknowledged, and
    where to resume) when the source yields no record for ``idle_timeout_s`` of reading before its range is read (a
    transaction left open holds a committed-only reader back; records out of reach), time spent sending, however
    long ``rate`` makes it, not counting; when the producer refuses a record (larger than its size limit), or the
    broker does for being too large for the target topic (every later send would go on past a hole); or when the
    source reports an error.
    """
    stats = ReplayStats(planned=sum(r.size for r in ranges))
    todo = {r.partition: r for r in ranges if r.size > 0}
    if not todo:
        return stats
    producer = _producer(target)
    target_count = len(kafka_clients.require_topics(producer, target, target_topic).topics[target_topic].partitions)
    consumer = _consumer(source)
    try:
        source_count = partition_count(consumer, source_topic, source)
    except BaseException:  # TopicUnavailable, KafkaUnavailable: nothing read yet, the consumer is not needed
        consumer.close()
        raise
    copy = _Replay(
        stats,
        todo,
        consumer,
        source_topic,
        source_count,
        producer,
        target_topic,
        target_count,
        rate=rate,
        restamp=restamp,
        max_buffered=max_buffered,
        idle_timeout_s=idle_timeout_s,
    )
    return copy.run(progress)


class _Replay:
    """One :func:`replay` under way: reads the source partitions into the merge, sends what the merge
    releases (paced by ``rate``), pauses the partitions that ran ahead, then waits for the acks."""

    def __init__(
        self,
        stats: ReplayStats,
        todo: dict[int, PartitionRange],
        consumer: Consumer,
        source_topic: str,
        source_count: int,
        producer: Producer,
        target_topic: str,
        target_count: int,
        *,
        rate: float,
        restamp: bool,
        max_buffered: int,
        idle_timeout_s: float,
    ) -> None:
        self.stats = stats
        self.todo = todo
        """The partitions still being read (their range not read to the end yet)."""
        self.consumer = consumer
        self.source_topic = source_topic
        self.source_count = source_count
        self.producer = producer
        self.target_topic = target_topic
        self.target_count = target_count
        self.restamp = restamp
        self.max_buffered = max_buffered
        self.idle_timeout_s = idle_timeout_s
        self.bucket = TokenBucket(rate) if rate > 0 else None
        self.merge: TimestampMerge[Message] = TimestampMerge(open_partitions=set(todo))
        self.paused: set[int] = set()
        self.after = {p: r.start for p, r in todo.items()}
        """The next offset each partition is to read: where a gap retention left starts."""
        self.ranges = dict(todo)
        self.unacked: dict[int, set[int]] = {p: set() for p in todo}
        """Per source partition, the offsets sent and not acknowledged yet (or refused)."""
        self.sent_next = {p: r.start for p, r in todo.items()}
        """Per source partition, the offset after the last record sent (or the range's start)."""
        self.refused: ReplayStopped | None = None
        """The first record the broker refused as too large: the copy stops at the next send or wait for acks."""
        self.started = 0.0
        self.waited_s = 0.0
        """Seconds spent in ``consume`` since the last record: sending a backlog at a capped rate can take
        minutes between two reads, and a source that had records waiting all along is not idle."""

    def run(self, progress: bool) -> ReplayStats:
        stats = self.stats
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
        )
        self.started = time.monotonic()
        self.consumer.assign([TopicPartition(self.source_topic, r.partition, r.start) for r in self.todo.values()])
        stopped: ReplayStopped | None = None
        try:
            with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
                task = bar.add_task(f"{self.source_topic} -> {self.target_topic}", total=stats.planned, rate="")
                while self.todo or not self.merge.empty:
                    self._read()
                    self._send_ready(bar, task)
                    self._check_refused()
                    _flow_control(
                        self.consumer, self.source_topic, self.merge, self.todo, self.paused, self.max_buffered
                    )
                    self._check_idle()
                self._wait_for_acks(bar, task)
        except ReplayStopped as exc:
            stopped = exc
        finally:
            self.consumer.close()
            self.producer.flush(30)
            stats.elapsed_s = time.monotonic() - self.started
        if stopped is not None:
            stats.resume = self._resume()
            raise stopped
        return stats

    def _resume(self) -> dict[int, tuple[int, int]]:
        """Per partition not copied whole: its first offset not acknowledged (a record refused or unanswered, else
        the one after the last sent) and its range's end. A partition read to its end, all of it sent and
        acknowledged, is whole."""
        out = {}
        for p, r in sorted(self.ranges.items()):
            if self.unacked[p]:
                out[p] = (min(self.unacked[p]), r.end)
            elif p in self.todo or self.merge.buffered(p):
                out[p] = (self.sent_next[p], r.end)
        return out

    # reading and merging

    def _read(self) -> None:
        """One batch from the source into the merge; closes the partitions whose range is read."""
        began = time.monotonic()
        messages = self.consumer.consume(1000, timeout=0.2) if self.todo else []
        self.waited_s += time.monotonic() - began
        for msg in messages:
            self._take(msg)
        for p in list(self.todo):  # control records (transactions) can hide the last offsets
            position = self.consumer.position([TopicPartition(self.source_topic, p)])[0].offset
            if position >= self.todo[p].end:
                self._finish(p)

    def _take(self, msg: Message) -> None:
        """One consumed message: into the merge when in range; an end-of-partition or the range's end closes
        the partition; any other error raises."""
        todo, stats = self.todo, self.stats
        p = msg.partition()
        if p is None or p not in todo:
            return
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                eof_at = msg.offset()
                assert eof_at is not None, "an end-of-partition event carries the end offset"
                if eof_at >= todo[p].end:
                    self._finish(p)
                return
            if err.code() in RETENTION_RESETS:
                self._skip_deleted(p)
                return
            raise ReplayStopped(f"reading {self.source_topic}[{p}]: {err.str()}", self.stats)
        self.waited_s = 0.0
        offset = msg.offset()
        assert offset is not None, "a consumed record has an offset"
        self.after[p] = offset + 1
        if offset >= todo[p].end:
            self._finish(p)
            return
        ts_type, ts = msg.timestamp()
        self.merge.add(p, (ts if ts_type != TIMESTAMP_NOT_AVAILABLE else 0, offset), msg)
        stats.read += 1
        stats.per_partition[p] = stats.per_partition.get(p, 0) + 1
        if offset >= todo[p].end - 1:
            self._finish(p)

    def _skip_deleted(self, p: int) -> None:
        """Retention deleted partition ``p`` from where it was before it was read: count the gap (a bare error
        ended the copy without saying how much was lost) and copy on from the earliest kept record."""
        end = self.todo[p].end
        gone, low = skip_deleted(self.consumer, self.source_topic, p, self.after[p], end)
        self.stats.deleted[p] = self.stats.deleted.get(p, 0) + gone
        if low >= end:
            self._finish(p, assigned=False)
        else:
            self.after[p] = low

    def _finish(self, partition: int, assigned: bool = True) -> None:
        if partition in self.todo:
            del self.todo[partition]
            self.merge.close(partition)
            if assigned:
                self.consumer.incremental_unassign([TopicPartition(self.source_topic, partition)])

    def _check_idle(self) -> None:
        if self.todo and self.waited_s > self.idle_timeout_s:
            where = ", ".join(f"{p} at offset {self.after[p]:,}" for p in sorted(self.todo))
            raise ReplayStopped(
                f"no records from {self.source_topic} partitions {sorted(self.todo)} for "
                f"{self.idle_timeout_s:.0f}s of reading before the end of the range ({where}): a transaction left"
                " open holds committed-only reads back until it is committed or aborted (the broker aborts it after"
                " its transaction timeout), or the records cannot be reached",
                self.stats,
            )

    # sending

    def _send_ready(self, bar: Progress, task: TaskID) -> None:
        """Send what the merge releases now, in merged order."""
        stats = self.stats
        for msg in self.merge.ready():
            self._send(msg)
            bar.update(
                task, completed=stats.sent, rate=f"{stats.sent / max(1e-9, time.monotonic() - self.started):,.0f} msg/s"
            )

    def _send(self, msg: Message) -> None:
        producer = self.producer
        if self.bucket is not None:
            until = time.monotonic() + self.bucket.reserve(time.monotonic())
            while (left := until - time.monotonic()) > 0:
                producer.poll(min(left, 0.1))
        self._check_refused()
        ts_type, ts = msg.timestamp()
        source_partition, offset = msg.partition(), msg.offset()
        assert source_partition is not None and offset is not None, "the merge holds consumed records only"
        size = len(msg.key() or b"") + len(msg.value() or b"")

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            self._delivered(err, source_partition, offset, size)

        try:
            kafka_clients.produce(
                producer,
                self.target_topic,
                msg.key(),
                msg.value(),
                delivered,
                headers=msg.headers() or None,
                partition=target_partition(source_partition, self.source_count, self.target_count),
                timestamp=ts if not self.restamp and ts_type != TIMESTAMP_NOT_AVAILABLE else None,
            )
        except KafkaException as exc:  # refused before it was queued: nothing later may overtake it
            self.unacked[source_partition].add(offset)
            error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            too_large = error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE
            why = f"is larger than the producer's size limit ({size:,} bytes of key and value)" if too_large else ""
            raise ReplayStopped(
                f"the record at {self.source_topic}[{source_partition}] offset {offset:,} "
                + (why or f"was refused by the producer: {error.str() if error is not None else exc}"),
                self.stats,
            ) from None
        self.unacked[source_partition].add(offset)
        self.sent_next[source_partition] = offset + 1
        self.stats.sent += 1
        producer.poll(0)

    # waiting for acks

    def _delivered(self, err: KafkaError | None, partition: int, offset: int, size: int) -> None:
        """One acknowledgement; a record the broker refused as too large stops the copy, as one the producer refuses
        does: copying on would leave a hole that only a count of failures told of, and no way to resume at it."""
        stats = self.stats
        if err is None:
            stats.acked += 1
            self.unacked[partition].discard(offset)
            return
        stats.failed += 1
        if len(stats.errors) < 5 and err.str() not in stats.errors:  # the broker's words, not the error object
            stats.errors.append(err.str())
        if err.code() in TOO_LARGE and self.refused is None:
            self.refused = ReplayStopped(
                f"the record at {self.source_topic}[{partition}] offset {offset:,} is larger than the broker accepts "
                f"for {self.target_topic} ({size:,} bytes of key and value; it answered {err.str()} ({err.name()}))",
                stats,
            )

    def _check_refused(self) -> None:
        if self.refused is not None:
            raise self.refused

    def _wait_for_acks(self, bar: Progress, task: TaskID) -> None:
        while self.producer.flush(0.25) > 0:
            bar.update(task, completed=self.stats.sent)
            self._check_refused()
        self._check_refused()


def _flow_control(
    consumer: Consumer,
    topic: str,
    merge: TimestampMerge,
    todo: dict[int, PartitionRange],
    paused: set[int],
    max_buffered: int,
) -> None:
    """Pause partitions that ran ahead of the merge; resume them once it caught up."""
    for p in list(todo):
        n = merge.buffered(p)
        if p not in paused and n >= max_buffered:
            consumer.pause([TopicPartition(topic, p)])
            paused.add(p)
        elif p in paused and n < max_buffered // 2:
            consumer.resume([TopicPartition(topic, p)])
            paused.discard(p)
    paused.intersection_update(todo)


def bounds(
    from_offsets: str | None,
    to_offsets: str | None,
    from_time: str | None,
    to_time: str | None,
    now_ms: int | None = None,
) -> tuple[Bound, Bound]:
    """CLI options -> the two ends of the range; :class:`RangeError` for a bad option (named) or a range that ends
    before it starts (before anything asks a broker)."""
    start = Bound(
        offsets=parse_offsets(from_offsets) if from_offsets else None,
        time_ms=option_time_ms("--from-time", from_time, now_ms) if from_time else None,
    )
    end = Bound(
        offsets=parse_offsets(to_offsets) if to_offsets else None,
        time_ms=option_time_ms("--to-time", to_time, now_ms) if to_time else None,
    )
    check_order(start, end)
    return start, end


def option_time_ms(option: str, text: str, now_ms: int | None = None) -> int:
    """:func:`parse_time_ms` of a command-line option; its :class:`RangeError` names the option."""
    try:
        return parse_time_ms(text, now_ms)
    except RangeError as exc:
        raise RangeError(f"{option}: {exc}") from None
