"""``checkout-guard topics tail``'s pure part: topic names, ``--from``, the offsets it reads, and decoding."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator, Mapping

import pytest
from fastavro import schemaless_writer
from fastavro.utils import generate_many

from infra.clients.topic_tail import (
    RawRecord,
    Start,
    TailError,
    Window,
    collect,
    decode_value,
    first_windows,
    forward_windows,
    jsonable,
    next_ranges,
    parse_start,
    resolve_topic,
    start_offsets,
    to_json,
)
from schemas.codec import MAGIC, load_schemas
from schemas.errors import InvalidRecord
from schemas.records import dead_letter
from schemas.topics import SCORED_TRANSACTIONS
from tests.builders import sale

# ---------------------------------------------------------------------------- names and --from


def test_a_topic_is_named_by_its_logical_or_its_full_name():
    assert resolve_topic("processed_transactions") is SCORED_TRANSACTIONS
    assert resolve_topic("run7.processed_transactions", "run7.") is SCORED_TRANSACTIONS
    assert resolve_topic("processed_transactions", "run7.") is SCORED_TRANSACTIONS
    with pytest.raises(TailError, match="one of: transactions"):
        resolve_topic("nope")


def test_from_accepts_earliest_latest_epoch_ms_and_iso_times():
    assert parse_start("earliest") == Start("earliest")
    assert parse_start("LATEST") == Start("latest")
    assert parse_start("1700000000000") == Start("time", 1_700_000_000_000)
    assert parse_start("2023-11-14T22:13:20Z") == Start("time", 1_700_000_000_000)
    assert parse_start("2023-11-14T22:13:20") == Start("time", 1_700_000_000_000)  # no zone = UTC
    with pytest.raises(TailError, match="--from"):
        parse_start("yesterday")


def test_start_offsets_per_partition():
    marks = {0: (5, 50), 1: (0, 0), 2: (10, 20)}
    assert start_offsets(marks, Start("earliest"), lambda _: {}) == {0: 5, 1: 0, 2: 10}
    assert start_offsets(marks, Start("latest"), lambda _: {}) == {0: 50, 1: 0, 2: 20}
    found = {0: 30, 1: -1, 2: 3}  # -1: no record at or after the time; 3: below the low watermark now
    assert start_offsets(marks, Start("time", 1), lambda ms: found) == {0: 30, 1: 0, 2: 10}


# ---------------------------------------------------------------------------- which offsets are read


def test_the_last_n_start_with_each_partitions_last_n_offsets():
    windows = first_windows({0: (0, 100), 1: (95, 98), 2: (0, 0)}, 5)
    assert {p: (w.start, w.end) for p, w in windows.items()} == {0: (95, 100), 1: (95, 98), 2: (0, 0)}
    windows = forward_windows({0: (0, 100), 1: (95, 98)}, {0: 40, 1: 0}, 5)
    assert {p: (w.start, w.end) for p, w in windows.items()} == {0: (40, 45), 1: (95, 98)}


def test_a_partition_is_widened_only_while_it_may_hold_one_of_the_newest():
    windows = {
        0: Window(0, 100, 95, 100, edge_ts=1000),  # its oldest read record is older than the 3rd newest match
        1: Window(0, 100, 95, 100, edge_ts=7000),  # everything read is newer: older offsets may still count
        2: Window(0, 100, 0, 100, edge_ts=9000),  # read to its start
        3: Window(0, 100, 98, 100, edge_ts=None),  # nothing read (gaps, transaction markers)
    }
    ranges = next_ranges(windows, [2000, 6000, 7000, 9000], 3, backwards=True)
    assert ranges == {1: (80, 95), 3: (89, 98)}  # 4x the window read so far (at least n)
    assert next_ranges(windows, [2000, 6000, 7000, 9000], 5, backwards=True) == {
        0: (80, 95),
        1: (80, 95),
        3: (83, 98),
    }  # fewer matches than n: every partition not read to its start


def _topic(seed: int) -> dict[int, list[RawRecord]]:
    """A random topic: per partition, offsets with gaps and timestamps growing with the offsets."""
    rng = random.Random(seed)
    parts: dict[int, list[RawRecord]] = {}
    for p in range(rng.randint(1, 4)):
        offset, ts, records = rng.randint(0, 20), rng.randint(0, 1000), []
        for _ in range(rng.choice([0, 1, 3, 40, 200])):
            offset += rng.choice([1, 1, 1, 2, 5])  # compaction and transaction markers leave gaps
            ts += rng.choice([0, 1, 7, 50, 300]) * (1 + p)  # partitions at different paces
            records.append(RawRecord(p, offset, ts, rng.choice([b"a", b"b", b"c", None]), b"v"))
        parts[p] = records
    return parts


def _marks(parts: Mapping[int, list[RawRecord]]) -> dict[int, tuple[int, int]]:
    return {p: (rs[0].offset, rs[-1].offset + 1) if rs else (7, 7) for p, rs in parts.items()}


class _Reader:
    def __init__(self, parts: Mapping[int, list[RawRecord]]) -> None:
        self.parts, self.read = parts, 0

    def __call__(self, ranges: Mapping[int, tuple[int, int]]) -> Iterator[RawRecord]:
        for p, (start, end) in ranges.items():
            for r in self.parts[p]:
                if start <= r.offset < end:
                    self.read += 1
                    yield r


@pytest.mark.parametrize("seed", range(150))
def test_the_newest_n_are_the_newest_n_of_the_whole_topic(seed: int):
    parts = _topic(seed)
    every = sorted((r for rs in parts.values() for r in rs), key=lambda r: r.order)
    for n in (1, 5, 30):
        for key in (None, "a"):
            wanted = [r for r in every if key is None or r.key == key.encode()]
            marks = _marks(parts)
            assert collect(_Reader(parts), first_windows(marks, n), n, key, backwards=True) == wanted[-n:]
            begin = start_offsets(marks, Start("earliest"), lambda _: {})
            forwards = collect(_Reader(parts), forward_windows(marks, begin, n), n, key, backwards=False)
            assert forwards == wanted[:n]


def test_without_a_key_the_last_n_read_little_more_than_n_per_partition():
    parts = {p: [RawRecord(p, o, o * 10 + p, b"k", b"v") for o in range(10_000)] for p in range(3)}
    reader = _Reader(parts)
    got = collect(reader, first_windows(_marks(parts), 5), 5, None, backwards=True)
    assert got == sorted((r for rs in parts.values() for r in rs), key=lambda r: r.order)[-5:]
    assert reader.read <= 3 * 5 * 4


# ---------------------------------------------------------------------------- decoding


def test_a_record_decodes_with_its_schema_and_version():
    out = decode_value(sale("t1").encode())
    assert out["schema"] == "PosTransaction"
    assert out["value"]["transaction_id"] == "t1"
    assert out["version"] == max(sv.version for sv in load_schemas().values() if sv.short_name == "PosTransaction")
    json.dumps(out, allow_nan=False)


def test_bytes_fields_are_base64():
    letter = dead_letter(
        topic="transactions",
        partition=1,
        offset=7,
        key=b"k",
        value=b"\x00\xffnot avro",
        error=InvalidRecord("not_avro", "no header"),
        stage="scoring-job",
        failed_at=1_700_000_000_000,
    )
    out = decode_value(letter.encode())
    assert out["schema"] == "DeadLetter"
    assert base64.b64decode(out["value"]["payload"]) == b"\x00\xffnot avro"
    json.dumps(out, allow_nan=False)


def test_an_older_schema_version_decodes_by_its_fingerprint():
    v1 = next(sv for sv in load_schemas().values() if sv.short_name == "DeadLetter" and sv.version == 1)
    buf = io.BytesIO()
    schemaless_writer(buf, v1.parsed, next(iter(generate_many(v1.parsed, 1))))
    out = decode_value(MAGIC + v1.fingerprint + buf.getvalue())
    assert (out["schema"], out["version"]) == ("DeadLetter", 1)
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    "data,kind",
    [
        (b"", "empty"),
        (b'{"transaction_id": "x"}', "not_avro"),
        (MAGIC + b"\x00" * 8 + b"\x02", "unknown_schema"),
        (sale("t1").encode()[:14], "corrupt"),
    ],
)
def test_an_undecodable_message_is_a_line_with_an_error(data: bytes, kind: str):
    out = decode_value(data)
    assert out["error"]["kind"] == kind
    assert base64.b64decode(out["value_base64"]) == data
    assert "value" not in out


def test_a_tombstone_is_a_null_value():
    assert decode_value(None) == {"tombstone": True, "value": None}


def test_a_line_says_where_the_record_is_and_its_key():
    record = RawRecord(2, 41, 1_700_000_000_123, b"t1", sale("t1").encode(), (("trace", b"abc"), ("bin", b"\xff")))
    line = to_json(record, "run7.transactions")
    assert line["topic"] == "run7.transactions"
    assert (line["partition"], line["offset"], line["key"]) == (2, 41, "t1")
    assert line["time"] == "2023-11-14T22:13:20.123+00:00"
    assert line["headers"] == {"trace": {"value": "abc"}, "bin": {"value_base64": "/w=="}}
    assert to_json(RawRecord(0, 0, 0, b"\xfe", None), "t")["key_base64"] == "/g=="
    json.dumps(line, allow_nan=False)


def test_jsonable_handles_what_avro_decodes_to():
    assert jsonable({"a": [b"\x01", float("nan"), 1.5, None, True]}) == {"a": ["AQ==", "nan", 1.5, None, True]}
