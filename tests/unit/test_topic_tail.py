"""``checkout-guard topics tail``'s pure part: topic names, ``--from``, the offsets it reads, and decoding."""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Iterator, Mapping

import pytest
from confluent_kafka import KafkaError, Message, TopicPartition
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


# ---------------------------------------------------------------------------- retention while reading


class RetentionDuringReadConsumer:
    """One partition holding offsets 0-9 when the tail starts; once it is assigned, retention deletes 0-4 (and,
    while following, 10-11 before they are read), so a fetch below the log start is an error (``auto.offset.reset
    =error``), where an ``earliest`` reset jumped to the first kept record without a word."""

    def __init__(self) -> None:
        self.low, self.high, self.assigned, self.at = 0, 10, {}, {}
        self.resets: list[str] = []
        self.follow_deletes = False

    def get_watermark_offsets(self, _tp, timeout: float, cached: bool) -> tuple[int, int]:
        return self.low, self.high

    def offsets_for_times(self, tps, timeout: float):
        return tps

    def assign(self, tps) -> None:
        self.assigned = {tp.partition: tp.offset for tp in tps}
        self.low = max(self.low, 5)

    def incremental_assign(self, tps) -> None:
        self.assigned.update({tp.partition: tp.offset for tp in tps})

    def incremental_unassign(self, tps) -> None:
        for tp in tps:
            self.assigned.pop(tp.partition, None)

    def unassign(self) -> None:
        self.assigned = {}

    def consume(self, _n: int, timeout: float):
        out = []
        for p, offset in list(self.assigned.items()):
            if offset < self.low:
                self.assigned[p] = 2**62  # no fetch until assigned again
                out.append(
                    Message(topic="t", partition=p, offset=offset, error=KafkaError(KafkaError._AUTO_OFFSET_RESET))
                )
                continue
            for o in range(offset, self.high):
                out.append(
                    Message(
                        topic="t",
                        partition=p,
                        offset=o,
                        key=b"k",
                        value=sale(f"t{o}").encode(),
                        timestamp=(1, 1_700_000_000_000 + o),
                    )
                )
            self.assigned[p] = self.at[p] = max(offset, self.high)
            if self.follow_deletes and self.high == 10 and not out:
                self.high, self.low = 14, 12  # 10 and 11 written and deleted before they are read
        return out

    def position(self, tps):
        return [TopicPartition(tp.topic, tp.partition, self.at.get(tp.partition, -1001)) for tp in tps]

    def close(self) -> None:
        pass


def _retention_consumer(monkeypatch: pytest.MonkeyPatch) -> RetentionDuringReadConsumer:
    from infra.clients import topic_tail

    consumer = RetentionDuringReadConsumer()

    def assigned_consumer(_kafka, _purpose: str, auto_offset_reset: str = "earliest"):
        consumer.resets.append(auto_offset_reset)
        return consumer

    monkeypatch.setattr(topic_tail, "assigned_consumer", assigned_consumer)
    monkeypatch.setattr(topic_tail, "partition_count", lambda *_a: 1)
    return consumer


def test_records_retention_deletes_while_the_tail_reads_are_counted_not_skipped_silently(monkeypatch):
    from infra.clients.topic_tail import tail
    from infra.settings import KafkaSettings

    consumer = _retention_consumer(monkeypatch)
    lines: list[dict] = []
    deleted: dict[int, int] = {}
    assert tail(KafkaSettings(), "t", lines.append, n=10, start=Start("earliest"), deleted=deleted) == 5
    assert consumer.resets == ["error"] and [line["offset"] for line in lines] == [5, 6, 7, 8, 9]
    assert deleted == {0: 5}  # offsets 0-4


def test_records_retention_deletes_while_the_tail_follows_are_counted(monkeypatch):
    import threading

    from infra.clients.topic_tail import tail
    from infra.settings import KafkaSettings

    consumer = _retention_consumer(monkeypatch)
    consumer.follow_deletes = True
    stop, lines, deleted = threading.Event(), [], {}

    def emit(line: dict) -> None:
        lines.append(line)
        if line["offset"] == 13:
            stop.set()

    tail(KafkaSettings(), "t", emit, start=Start("earliest"), follow=True, stop=stop, deleted=deleted)
    assert [line["offset"] for line in lines] == [5, 6, 7, 8, 9, 12, 13]
    assert deleted == {0: 7}  # 0-4 before the first read, 10-11 while following


def test_topics_tail_warns_with_a_count_and_exits_1_when_retention_deleted_records_while_it_read(monkeypatch, capsys):
    from infra.cli import main
    from infra.settings import get_settings

    _retention_consumer(monkeypatch)
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as exit_:
        main(["topics", "tail", "transactions", "--from", "earliest"])
    get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert exit_.value.code == 1, err
    assert [json.loads(line)["offset"] for line in out.splitlines()] == [5, 6, 7, 8, 9]
    assert err.strip() == (
        "Warning: 5 record(s) were deleted by retention while being read (partition 0: 5) and are not printed"
    )


@pytest.mark.parametrize("code", [KafkaError.LEADER_NOT_AVAILABLE, KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_topics_tail_names_a_topic_the_broker_answers_with_an_error_by_that_error_not_as_missing(
    monkeypatch, capsys, code: int
):
    """A topic without a leader, or one this login may not read, was reported as "does not exist on the cluster"."""
    from types import SimpleNamespace

    from infra.cli import main
    from infra.clients import topic_replay, topic_tail
    from infra.settings import get_settings

    class NoReads:
        def close(self) -> None:
            pass

    get_settings.cache_clear()
    name = SCORED_TRANSACTIONS.full_name(get_settings().kafka.topic_prefix)
    error = KafkaError(code)
    topics = {name: SimpleNamespace(error=error, partitions={})}
    monkeypatch.setattr(topic_tail, "assigned_consumer", lambda *_a, **_kw: NoReads())
    monkeypatch.setattr(topic_replay.kafka_clients, "cluster_metadata", lambda *_a: SimpleNamespace(topics=topics))
    with pytest.raises(SystemExit) as exit_:
        main(["topics", "tail", "processed_transactions"])
    get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and not out, err
    assert err.strip() == f"Error: topic {name}: the broker answered {error.str()} ({error.name()})"


@pytest.mark.parametrize("code", [KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.NOT_LEADER_FOR_PARTITION])
def test_topics_tail_follow_names_a_read_error_by_the_brokers_words_and_exits_1(monkeypatch, capsys, code: int):
    """While following, a read the broker refused was printed as the client's error object
    (``KafkaError{code=...,val=...,str="..."}``), where the first N records' read and ``replay`` give its words."""
    from infra.cli import main
    from infra.clients import topic_tail
    from infra.settings import get_settings

    error = KafkaError(code)

    class RefusedFollow:
        def get_watermark_offsets(self, _tp, timeout: float, cached: bool) -> tuple[int, int]:
            return 0, 3

        def assign(self, _tps) -> None:
            pass

        def consume(self, _n: int, timeout: float) -> list[Message]:
            return [Message(topic="t", partition=0, offset=3, error=error)]

        def close(self) -> None:
            pass

    get_settings.cache_clear()
    name = SCORED_TRANSACTIONS.full_name(get_settings().kafka.topic_prefix)
    monkeypatch.setattr(topic_tail, "assigned_consumer", lambda *_a, **_kw: RefusedFollow())
    monkeypatch.setattr(topic_tail, "partition_count", lambda *_a: 1)
    with pytest.raises(SystemExit) as exit_:
        main(["topics", "tail", "processed_transactions", "--from", "latest", "--follow"])
    get_settings.cache_clear()
    out, err = capsys.readouterr()
    assert exit_.value.code == 1 and not out, err
    assert err.strip() == f"Error: topic {name} partition 0: the broker answered {error.str()} ({error.name()})"
