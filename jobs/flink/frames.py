"""Record batches between the JVM and the Python scoring step (``jobs/flink/java/checkoutguard/flink``).

Why batches: entering Python from the JVM costs more per record than scoring the record, so the
Java ``RecordBatcher`` hands over many Kafka records per call and the Java ``OutputUnbatcher`` turns
the step's one output blob back into Kafka records. The frames are plain length-prefixed fields
(big-endian, as Java's ``DataOutputStream`` writes them), pure Python here so they are unit-tested
without Flink.

Input frame per record: key (int32 length, -1 = null, bytes), value (same), topic (uint16 length +
UTF-8), partition (int32), offset (int64), broker timestamp in ms (int64), the value of its
:data:`schemas.records.REDRIVEN_HEADER` header (as key: -1 when it has none).
Output frame per record: topic (uint16 length + UTF-8), key, value (as above).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from jobs.scoring.core import SourceRecord

__all__ = ["OutRecord", "OutputBatch", "SourceRecord", "pack_records", "unpack_outputs", "unpack_records"]


class OutRecord(NamedTuple):
    """One record for the Kafka sink."""

    topic: str
    key: bytes | None
    value: bytes | None


_new = tuple.__new__
"""``_new(SourceRecord, (...))`` builds the named tuple from a tuple without the keyword-handling
``__new__``: the hot path makes one per Kafka record."""

_LEN = struct.Struct(">i")
_TOPIC_LEN = struct.Struct(">H")
_POSITION = struct.Struct(">iqq")


def unpack_records(batch: bytes) -> Iterator[SourceRecord]:
    """The records of one ``RecordBatcher`` batch, in order."""
    pos, end = 0, len(batch)
    topics: dict[bytes, str] = {}
    while pos < end:
        (n,) = _LEN.unpack_from(batch, pos)
        pos += 4
        key = None if n < 0 else batch[pos : pos + n]
        pos += max(n, 0)
        (n,) = _LEN.unpack_from(batch, pos)
        pos += 4
        value = None if n < 0 else batch[pos : pos + n]
        pos += max(n, 0)
        (n,) = _TOPIC_LEN.unpack_from(batch, pos)
        raw = batch[pos + 2 : pos + 2 + n]
        pos += 2 + n
        topic = topics.get(raw)
        if topic is None:
            topic = topics[raw] = raw.decode()
        partition, offset, ts = _POSITION.unpack_from(batch, pos)
        pos += 20
        (n,) = _LEN.unpack_from(batch, pos)
        pos += 4
        redriven = None if n < 0 else batch[pos : pos + n]
        pos += max(n, 0)
        yield _new(SourceRecord, (key, value, topic, partition, offset, ts, redriven))


def pack_records(records: Iterable[SourceRecord]) -> bytes:
    """The inverse of :func:`unpack_records` (what ``RecordBatcher`` writes): for tests and tools."""
    parts: list[bytes] = []
    for record in records:
        key, value, topic, partition, offset, ts = record[:6]
        redriven = record[6] if len(record) > 6 else None
        _put_bytes(parts, key)
        _put_bytes(parts, value)
        raw = topic.encode()
        parts += (_TOPIC_LEN.pack(len(raw)), raw, _POSITION.pack(partition, offset, ts))
        _put_bytes(parts, redriven)
    return b"".join(parts)


class OutputBatch:
    """The Kafka records one call of the scoring step produces, packed for ``OutputUnbatcher``."""

    __slots__ = ("_parts", "count")
    _topics: dict[str, bytes] = {}

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.count = 0

    def add(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        head = self._topics.get(topic)
        if head is None:
            raw = topic.encode()
            head = self._topics[topic] = _TOPIC_LEN.pack(len(raw)) + raw
        self._parts.append(head)
        _put_bytes(self._parts, key)
        _put_bytes(self._parts, value)
        self.count += 1

    def to_bytes(self) -> bytes:
        return b"".join(self._parts)


def unpack_outputs(batch: bytes) -> Iterator[OutRecord]:
    """The records of one :class:`OutputBatch` (what ``OutputUnbatcher`` reads): for tests and tools."""
    pos, end = 0, len(batch)
    while pos < end:
        (n,) = _TOPIC_LEN.unpack_from(batch, pos)
        topic = batch[pos + 2 : pos + 2 + n].decode()
        pos += 2 + n
        fields: list[bytes | None] = []
        for _ in range(2):
            (n,) = _LEN.unpack_from(batch, pos)
            pos += 4
            fields.append(None if n < 0 else batch[pos : pos + n])
            pos += max(n, 0)
        yield OutRecord(topic, fields[0], fields[1])


def _put_bytes(parts: list[bytes], data: bytes | None) -> None:
    if data is None:
        parts.append(_LEN.pack(-1))
    else:
        parts += (_LEN.pack(len(data)), data)
