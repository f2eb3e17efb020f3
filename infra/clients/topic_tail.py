"""Read a topic decoded, as JSON lines: ``checkout-guard topics tail TOPIC [-n N] [--from ...] [--key K] [--follow]``.

Messages are Avro *single-object encoded* (``C3 01`` + the writer schema's 8-byte fingerprint + the body,
:mod:`schemas.codec`), not in a schema registry's wire format, so generic tools (kcat, kafka-console-consumer)
show bytes. Here each message is decoded by its fingerprint (any known version of any record, resolved into
the newest version of that record) and printed as one JSON object: where it is (topic, partition, offset,
timestamp), its key, the schema and the decoded value, with ``bytes`` fields as base64. A message that
does not decode is printed with an ``error`` field and its bytes in base64; it never stops the tail.

What is printed:

- without ``--from``: the newest ``N`` records of the topic (those whose key is ``--key``, if given),
  oldest first. Each partition is read backwards from its end in growing windows (its last ``N``
  offsets, then four times as many, ...) until no unread record can be among the newest ``N`` (every
  partition's window reaches back to the ``N``-th newest timestamp found, or to the partition's start);
  with ``--key`` that may mean reading the whole topic. "Newest" is by record timestamp, ties by
  partition and offset, assuming timestamps grow with offsets within a partition (producer or
  log-append time);
- with ``--from earliest|latest|<epoch ms>|<ISO-8601 time>``: the first ``N`` records at or after that
  point (a time resolves per partition with ``offsets_for_times``), in timestamp order, read forwards in
  the same way; the end is each partition's end when the tail starts;
- ``--follow``: then keep printing records as they arrive (arrival order) until interrupted. With
  ``--from`` and ``--follow`` every record from that point on is printed, streamed in arrival order
  (``N`` does not apply).

The pure part (decoding, offsets, windows) is tested without Kafka; :func:`tail` does the reading.
"""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from infra.clients.topic_replay import (
    RETENTION_RESETS,
    RangeError,
    assigned_consumer,
    parse_time_ms,
    partition_count,
    read_assigned,
    skip_deleted,
    topic_unavailable,
)
from infra.settings import KafkaSettings
from schemas.codec import HEADER_LEN, MAGIC, DecodeError, codec, load_schemas
from schemas.errors import UNKNOWN_SCHEMA, CheckoutGuardError
from schemas.topics import ALL_TOPICS, TopicSpec

GROWTH = 4
"""Each further window of a partition reads this many times the offsets read so far."""


class TailError(CheckoutGuardError, ValueError):
    """A tail that cannot start (unknown topic, bad ``--from``, a topic missing on the cluster)."""


# ---------------------------------------------------------------------------- pure: what to read


def resolve_topic(name: str, prefix: str = "", topics: Iterable[TopicSpec] = ALL_TOPICS) -> TopicSpec:
    """The topic named by its logical name (``processed_transactions``) or its full, prefixed name."""
    specs = list(topics)
    for spec in specs:
        if name in (spec.name, spec.full_name(prefix)):
            return spec
    known = ", ".join(spec.name for spec in specs)
    raise TailError(f"unknown topic {name!r}; one of: {known}")


@dataclass(frozen=True)
class Start:
    """Where ``--from`` starts: ``earliest``, ``latest`` or a time (epoch ms)."""

    position: str
    """``earliest``, ``latest`` or ``time``."""
    time_ms: int | None = None


def parse_start(text: str, now_ms: int | None = None) -> Start:
    """``earliest``, ``latest``, epoch milliseconds, ISO-8601 (no zone = UTC) or ``now``."""
    word = text.strip().lower()
    if word in ("earliest", "latest"):
        return Start(word)
    try:
        return Start("time", parse_time_ms(text, now_ms))
    except RangeError as exc:
        raise TailError(f"--from: {exc} (or earliest, latest)") from None


def start_offsets(
    watermarks: Mapping[int, tuple[int, int]],
    start: Start,
    offsets_for_time: Callable[[int], Mapping[int, int]],
) -> dict[int, int]:
    """Per partition, the first offset to read for ``start``, within the watermarks (``(low, high)``).

    A time resolves to the first offset whose timestamp is at or after it; none (``-1``) = the end."""
    if start.position == "earliest":
        return {p: low for p, (low, _) in watermarks.items()}
    if start.position == "latest" or start.time_ms is None:
        return {p: high for p, (_, high) in watermarks.items()}
    found = offsets_for_time(start.time_ms)
    out = {}
    for p, (low, high) in watermarks.items():
        offset = found.get(p, -1)
        out[p] = high if offset is None or offset < 0 else min(max(offset, low), high)
    return out


@dataclass
class Window:
    """What has been read of one partition: offsets ``[start, end)`` within ``[low, high)``."""

    low: int
    high: int
    start: int
    end: int
    edge_ts: int | None = None
    """Timestamp of the read record furthest from where reading began: the oldest when reading backwards
    (``start`` moves down), the newest when reading forwards (``end`` moves up). ``None``: none read yet."""

    def saw(self, timestamp: int, backwards: bool) -> None:
        if self.edge_ts is None:
            self.edge_ts = timestamp
        else:
            self.edge_ts = min(self.edge_ts, timestamp) if backwards else max(self.edge_ts, timestamp)


def first_windows(watermarks: Mapping[int, tuple[int, int]], n: int) -> dict[int, Window]:
    """Backwards (the newest ``n``): every partition's last ``n`` offsets, nothing read yet."""
    return {p: Window(low, high, max(low, high - n), high) for p, (low, high) in watermarks.items()}


def forward_windows(watermarks: Mapping[int, tuple[int, int]], starts: Mapping[int, int], n: int) -> dict[int, Window]:
    """Forwards (the first ``n`` from ``starts``): ``n`` offsets from each partition's start."""
    out = {}
    for p, (low, high) in watermarks.items():
        begin = min(max(starts.get(p, low), low), high)
        out[p] = Window(low, high, begin, min(high, begin + n))
    return out


def cutoff(timestamps: Iterable[int], n: int, backwards: bool) -> int | None:
    """The ``n``-th newest (backwards) or oldest (forwards) timestamp among the matches; ``None`` if fewer."""
    ordered = sorted(timestamps)
    if len(ordered) < n:
        return None
    return ordered[-n] if backwards else ordered[n - 1]


def next_ranges(
    windows: Mapping[int, Window], matched_ts: Iterable[int], n: int, backwards: bool
) -> dict[int, tuple[int, int]]:
    """The offsets still to read, per partition ``(start, end)``; empty when the answer is complete.

    A partition is done when it has no more offsets in the direction of reading, or when the record read
    furthest in that direction is already past the ``n``-th best match (unread records lie beyond it)."""
    limit = cutoff(matched_ts, n, backwards)
    out: dict[int, tuple[int, int]] = {}
    for p, w in windows.items():
        if (w.start <= w.low) if backwards else (w.end >= w.high):
            continue
        if limit is not None and w.edge_ts is not None and (w.edge_ts <= limit if backwards else w.edge_ts >= limit):
            continue
        grow = max(n, w.end - w.start) * (GROWTH - 1)
        out[p] = (max(w.low, w.start - grow), w.start) if backwards else (w.end, min(w.high, w.end + grow))
    return out


def extend(windows: dict[int, Window], ranges: Mapping[int, tuple[int, int]]) -> None:
    """Record that ``ranges`` were read (each adjoins its window)."""
    for p, (start, end) in ranges.items():
        w = windows[p]
        w.start, w.end = min(w.start, start), max(w.end, end)


@dataclass(frozen=True)
class RawRecord:
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def order(self) -> tuple[int, int, int]:
        return (self.timestamp, self.partition, self.offset)


def key_matches(record_key: bytes | None, wanted: str | None) -> bool:
    return wanted is None or record_key == wanted.encode()


def select(records: Iterable[RawRecord], n: int, backwards: bool) -> list[RawRecord]:
    """The newest ``n`` (backwards) or the first ``n`` (forwards), in timestamp order."""
    ordered = sorted(records, key=lambda r: r.order)
    return ordered[-n:] if backwards else ordered[:n]


def collect(
    read: Callable[[Mapping[int, tuple[int, int]]], Iterable[RawRecord]],
    windows: dict[int, Window],
    n: int,
    key: str | None,
    backwards: bool,
) -> list[RawRecord]:
    """Read ``windows`` (as first planned, nothing read yet) and widen them until the newest (backwards) or
    first (forwards) ``n`` records with ``key`` are known; return those in timestamp order. ``read(ranges)``
    yields the records of ``{partition: (start, end)}``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    matched: list[RawRecord] = []
    ranges = {p: (w.start, w.end) for p, w in windows.items()}
    for w in windows.values():  # the first ranges are the windows themselves: nothing read yet
        w.start, w.end = (w.end, w.end) if backwards else (w.start, w.start)
    while ranges:
        for record in read(ranges):
            windows[record.partition].saw(record.timestamp, backwards)
            if key_matches(record.key, key):
                matched.append(record)
        extend(windows, ranges)
        matched = select(matched, n, backwards)
        ranges = next_ranges(windows, [r.timestamp for r in matched], n, backwards)
    return matched


# ---------------------------------------------------------------------------- pure: decoding


def jsonable(value: Any) -> Any:
    """A decoded Avro value as plain JSON: bytes as base64, non-finite floats as strings."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _text_or_base64(data: bytes | None, field: str) -> dict[str, Any]:
    if data is None:
        return {field: None}
    try:
        return {field: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{field}_base64": base64.b64encode(data).decode("ascii")}


def decode_value(value: bytes | None) -> dict[str, Any]:
    """``schema``, ``version`` and ``value`` of an Avro single-object message, or ``error`` (kind, message)
    and the bytes (base64). ``None`` is a tombstone."""
    if value is None:
        return {"tombstone": True, "value": None}
    if len(value) >= HEADER_LEN and value[:2] == MAGIC:
        writer = load_schemas().get(bytes(value[2:HEADER_LEN]))
        if writer is not None:
            try:
                decoded = codec(writer.short_name).decode(value)
            except DecodeError as exc:
                return _undecodable(value, exc.kind, str(exc))
            return {"schema": writer.short_name, "version": writer.version, "value": jsonable(decoded)}
        return _undecodable(value, UNKNOWN_SCHEMA, f"unknown schema fingerprint {value[2:HEADER_LEN].hex()}")
    kind, message = ("empty", "empty message") if not value else ("not_avro", "no C3 01 single-object header")
    return _undecodable(value, kind, message)


def _undecodable(value: bytes, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message}, "value_base64": base64.b64encode(value).decode("ascii")}


def to_json(record: RawRecord, topic: str) -> dict[str, Any]:
    """One printed line: where the record is, its key, its headers (if any) and its decoded value."""
    out: dict[str, Any] = {
        "topic": topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "time": datetime.fromtimestamp(record.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
        if record.timestamp >= 0
        else None,
    }
    out.update(_text_or_base64(record.key, "key"))
    if record.headers:
        out["headers"] = {name: _text_or_base64(data, "value") for name, data in record.headers}
    out.update(decode_value(record.value))
    return out


# ---------------------------------------------------------------------------- Kafka


def _consumer(kafka: KafkaSettings) -> Consumer:
    """``auto.offset.reset=error``: a position retention deleted under the reader is reported and counted, where an
    ``earliest`` reset skipped those records without a word."""
    return assigned_consumer(kafka, "tail", auto_offset_reset="error")


def _raw(message: Any) -> RawRecord:
    _, timestamp = message.timestamp()
    headers = tuple((name, data) for name, data in (message.headers() or ()))
    return RawRecord(message.partition(), message.offset(), timestamp, message.key(), message.value(), headers)


def read_ranges(
    consumer: Consumer,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    idle_timeout_s: float = 30.0,
    deleted: dict[int, int] | None = None,
) -> Iterator[RawRecord]:
    """The records of ``[start, end)`` per partition (fewer where offsets are gaps or transaction markers); what
    retention deletes before it is read is counted per partition in ``deleted``."""
    return (_raw(message) for message in read_assigned(consumer, topic, ranges, idle_timeout_s, deleted))


def _watermarks(consumer: Consumer, topic: str, kafka: KafkaSettings) -> dict[int, tuple[int, int]]:
    count = partition_count(consumer, topic, kafka)
    if count == 0:
        raise TailError(f"topic {topic} does not exist on the cluster")
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False) for p in range(count)}


def tail(
    kafka: KafkaSettings,
    topic: str,
    emit: Callable[[dict[str, Any]], None],
    *,
    n: int = 10,
    start: Start | None = None,
    key: str | None = None,
    follow: bool = False,
    stop: threading.Event | None = None,
    deleted: dict[int, int] | None = None,
) -> int:
    """Emit the records described in the module docstring for ``topic`` (full name); returns how many. Records
    retention deletes before they are read are counted per partition in ``deleted`` (the caller warns), also
    while following (it is filled in place, so an interrupted follow has it too)."""
    consumer = _consumer(kafka)
    emitted = 0
    deleted = {} if deleted is None else deleted
    try:
        marks = _watermarks(consumer, topic, kafka)

        def read(ranges: Mapping[int, tuple[int, int]]) -> Iterator[RawRecord]:
            return read_ranges(consumer, topic, ranges, deleted=deleted)

        if start is not None and follow:
            begin = start_offsets(marks, start, lambda ms: _offsets_for_time(consumer, topic, ms, marks))
            return _follow(consumer, topic, begin, key, emit, stop, deleted)
        if start is None:
            records = collect(read, first_windows(marks, n), n, key, backwards=True)
        else:
            begin = start_offsets(marks, start, lambda ms: _offsets_for_time(consumer, topic, ms, marks))
            records = collect(read, forward_windows(marks, begin, n), n, key, backwards=False)
        for record in records:
            emit(to_json(record, topic))
            emitted += 1
        if follow:
            ends = {p: high for p, (_, high) in marks.items()}
            emitted += _follow(consumer, topic, ends, key, emit, stop, deleted)
        return emitted
    finally:
        consumer.close()


def _offsets_for_time(consumer: Consumer, topic: str, ms: int, marks: Mapping[int, tuple[int, int]]) -> dict[int, int]:
    found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in marks], timeout=10)
    return {tp.partition: tp.offset for tp in found}


def _follow(
    consumer: Consumer,
    topic: str,
    begin: Mapping[int, int],
    key: str | None,
    emit: Callable[[dict[str, Any]], None],
    stop: threading.Event | None,
    deleted: dict[int, int],
) -> int:
    """Every record from ``begin`` on, as it arrives, until ``stop`` is set (or interrupted); what retention deletes
    before it is read is counted in ``deleted`` and the partition goes on from the earliest kept record; a read the
    broker refuses is :class:`~infra.clients.topic_replay.TopicUnavailable` in its words, as in the first read."""
    consumer.assign([TopicPartition(topic, p, offset) for p, offset in begin.items()])
    after = dict(begin)  # the next offset each partition is to read
    emitted = 0
    while stop is None or not stop.is_set():
        for message in consumer.consume(500, 0.5):
            error, p = message.error(), message.partition()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.code() in RETENTION_RESETS and p in after:
                    gone, after[p] = skip_deleted(consumer, topic, p, after[p])
                    deleted[p] = deleted.get(p, 0) + gone
                    continue
                raise topic_unavailable(topic, error, p)
            record = _raw(message)
            after[record.partition] = record.offset + 1
            if key_matches(record.key, key):
                emit(to_json(record, topic))
                emitted += 1
    return emitted
