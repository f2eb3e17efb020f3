"""Topic replay without Kafka: ranges, merge order, the copy on a virtual clock, the topics it will not write into."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, KafkaException, Message, TopicPartition
from typer.testing import CliRunner

import producers.replay as replay_cli
from infra.clients import topic_replay
from infra.clients.topic_replay import (
    Bound,
    PartitionRange,
    RangeError,
    ReplayStats,
    TimestampMerge,
    bounds,
    parse_offsets,
    parse_time_ms,
    replay,
    resolve_ranges,
    target_partition,
)
from infra.settings import KafkaSettings, Settings
from schemas.topics import ALL_TOPICS
from tests.builders import ReadToEndConsumer, fake_cluster, partitions_led

WATERMARKS = {0: (10, 100), 1: (0, 50), 2: (5, 5)}


def _never(_ms: int) -> dict[int, int]:
    raise AssertionError("no time lookup expected")


def _spans(ranges) -> dict[int, tuple[int, int]]:
    return {r.partition: (r.start, r.end) for r in ranges}


def test_times_parse_from_iso_epoch_ms_and_now():
    assert parse_time_ms("2026-11-22T06:00:00Z") == 1_795_327_200_000
    assert parse_time_ms("2026-11-22T07:00:00+01:00") == 1_795_327_200_000
    assert parse_time_ms("2026-11-22T06:00:00") == 1_795_327_200_000  # no zone = UTC
    assert parse_time_ms("1795327200000") == 1_795_327_200_000


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2004-01-26T23:51:08.353Z", 1_075_161_068_353),
        ("2039-02-24T19:17:35.107Z", 2_182_187_855_107),
        ("2038-09-26T20:34:20.523+00:00", 2_169_146_060_523),
        ("2026-11-22T06:00:00.0009Z", 1_795_327_200_000),  # below a millisecond: the millisecond it falls in
    ],
)
def test_a_time_with_milliseconds_parses_to_exactly_that_millisecond(text: str, ms: int) -> None:
    """A bound one millisecond short takes in a record stamped just before --from-time and leaves out one stamped
    just before --to-time; the CSV replay stamps the same text exactly, so a range cut by it must too."""
    assert parse_time_ms(text) == ms


@pytest.mark.parametrize("text", ["1795327200", "20230105", "0"])
def test_digits_that_are_not_epoch_milliseconds_are_refused(text):
    """Epoch seconds, or a date without dashes, would otherwise be read as a moment in January 1970."""
    with pytest.raises(RangeError, match="not epoch milliseconds"):
        parse_time_ms(text)
    assert parse_time_ms("now", now_ms=42) == 42
    with pytest.raises(RangeError, match="not a time"):
        parse_time_ms("yesterday-ish")


def test_offsets_parse_for_every_partition_or_per_partition():
    assert parse_offsets("100") == 100
    assert parse_offsets("0:100, 2:50") == {0: 100, 2: 50}
    for bad in ("0=100", "a:1", "1:", ","):
        with pytest.raises(RangeError):
            parse_offsets(bad)


def test_a_partition_named_twice_in_offsets_is_refused_not_read_as_its_last_offset():
    """``--to-offsets 0:1500,0:150`` replayed partition 0 up to 150: the last copy won without a word."""
    with pytest.raises(RangeError, match="partition 0 is named twice"):
        parse_offsets("0:1500, 2:10, 0:150")
    with pytest.raises(RangeError, match="named twice"):
        bounds(None, "0:1500,0:150", None, None)


def test_offsets_for_a_partition_that_partitions_leaves_out_are_refused_not_ignored():
    """``--partitions 0,2 --from-offsets 1:50`` replayed partitions 0 and 2 whole, the offset for 1 unused."""
    watermarks = {0: (0, 100), 1: (0, 100), 2: (0, 100)}
    with pytest.raises(RangeError, match=r"partition\(s\) \[1\], which --partitions \[0, 2\] leaves out"):
        resolve_ranges(watermarks, Bound(offsets={1: 50}), Bound(), dict, partitions=[0, 2])
    with pytest.raises(RangeError, match="leaves out"):
        resolve_ranges(watermarks, Bound(), Bound(offsets={0: 60, 1: 50}), dict, partitions=[0])
    ranges = resolve_ranges(watermarks, Bound(offsets={2: 50}), Bound(), dict, partitions=[0, 2])
    assert [(r.partition, r.start, r.end) for r in ranges] == [(0, 0, 100), (2, 50, 100)]


def test_one_end_is_an_offset_or_a_time_not_both():
    with pytest.raises(RangeError, match="not both"):
        bounds("5", None, "now", None)


def test_the_default_range_is_everything_up_to_the_high_watermark_now():
    ranges = resolve_ranges(WATERMARKS, Bound(), Bound(), _never)
    assert _spans(ranges) == {0: (10, 100), 1: (0, 50), 2: (5, 5)}
    assert [r.size for r in ranges] == [90, 50, 0]


def test_offsets_are_clipped_to_what_the_partition_still_holds():
    ranges = resolve_ranges(WATERMARKS, Bound(offsets=0), Bound(offsets=80), _never)
    assert _spans(ranges) == {0: (10, 80), 1: (0, 50), 2: (5, 5)}
    ranges = resolve_ranges(WATERMARKS, Bound(), Bound(offsets={0: 5}), _never)
    assert _spans(ranges)[0] == (10, 10), "an end before what retention kept is an empty range, not a negative one"


def test_offsets_that_retention_deleted_are_counted_as_gone_and_warned_about():
    """A start below the low watermark was moved up to it without a word: the operator took the range as copied."""
    ranges = resolve_ranges(WATERMARKS, Bound(offsets={0: 4, 1: 0}), Bound(offsets={0: 80}), _never)
    assert [(r.partition, r.start, r.gone) for r in ranges] == [(0, 10, 6), (1, 0, 0), (2, 5, 0)]
    assert topic_replay.gone_warning(ranges) == (
        "6 offset(s) of the range are gone (deleted by retention) and cannot be replayed (partition 0: 6 before 10,"
        " the earliest kept); only what is kept is copied"
    )
    whole = resolve_ranges(WATERMARKS, Bound(offsets=1), Bound(offsets={0: 5}), _never)
    assert [r.gone for r in whole] == [4, 0, 4]  # an end below the low watermark too: all of it gone
    for start in (Bound(), Bound(offsets={0: 10}), Bound(time_ms=1)):  # partition 2 ends at 5
        kept = resolve_ranges(WATERMARKS, start, Bound(), lambda _ms: {0: 10, 1: 0, 2: -1})
        assert topic_replay.gone_warning(kept) is None and not any(r.gone for r in kept)


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_range_cut_by_retention_is_warned_about_and_exits_1_after_copying_what_is_kept(
    monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    cut = [PartitionRange(0, 10, 80, 10, 100, gone=6), PartitionRange(1, 0, 50, 0, 50)]
    copied: list[list[PartitionRange]] = []

    def fake_replay(*args: Any, **_k: Any) -> ReplayStats:
        copied.append(args[4])
        return ReplayStats(planned=120, read=120, sent=120, acked=120)

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", lambda *_a: cut)
    monkeypatch.setattr(replay_cli, "replay", fake_replay)
    args = ["run", "transactions", "--from-offsets", "0:4", "--no-progress"] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(replay_cli.app, args)
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1, output
    assert "Warning: 6 offset(s) of the range are gone (deleted by retention)" in output
    assert copied == ([] if dry_run else [cut])
    if not dry_run:
        assert "replayed 120 of 120 planned record(s)" in output
        assert "6 offset(s) of the range were gone before the start (retention)" in output


def test_a_start_offset_past_the_end_of_a_partition_is_refused_not_replayed_as_nothing():
    """``--from-offsets 5000`` on a partition ending at 100 was cut back to 100: nothing replayed, exit 0."""
    with pytest.raises(RangeError, match=r"start offset is past the end of the partition \(partition 0: 5,000 > 100"):
        resolve_ranges(WATERMARKS, Bound(offsets={0: 5000}), Bound(), _never)
    with pytest.raises(RangeError, match=r"partition 1: 60 > 50; partition 2: 60 > 5"):
        resolve_ranges(WATERMARKS, Bound(offsets=60), Bound(), _never)
    assert _spans(resolve_ranges(WATERMARKS, Bound(offsets=50), Bound(), _never, partitions=[0, 1]))[1] == (50, 50)


def test_an_end_offset_past_the_end_of_a_partition_is_counted_as_not_written_and_warned_about():
    ranges = resolve_ranges(WATERMARKS, Bound(offsets={0: 40}), Bound(offsets={0: 130, 1: 20}), _never)
    assert [(r.partition, r.end, r.unwritten) for r in ranges] == [(0, 100, 30), (1, 20, 0), (2, 5, 0)]
    assert topic_replay.range_warnings(ranges) == [
        "30 offset(s) of the range are not written yet (the end offset is past the end of the partition) and cannot"
        " be replayed (partition 0: 30 from 100, its end); only what is there is copied"
    ]
    kept = resolve_ranges(WATERMARKS, Bound(offsets={0: 40}), Bound(offsets={0: 100, 1: 50}), _never)
    assert topic_replay.range_warnings(kept) == [] and not any(r.unwritten for r in kept)


@pytest.mark.parametrize("dry_run", [True, False])
def test_replay_refuses_a_start_past_the_end_with_exit_2_and_warns_of_an_end_past_it_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    watermarks = {0: (0, 3000)}
    copied: list[list[PartitionRange]] = []

    def fake_plan(_kafka: Any, _topic: str, start: Bound, end: Bound, partitions: Any) -> list[PartitionRange]:
        return resolve_ranges(watermarks, start, end, _never, partitions)

    def fake_replay(*args: Any, **_k: Any) -> ReplayStats:
        copied.append(args[4])
        return ReplayStats(planned=1000, read=1000, sent=1000, acked=1000)

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", fake_plan)
    monkeypatch.setattr(replay_cli, "replay", fake_replay)
    extra = ["--no-progress"] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions", "--from-offsets", "5000", *extra])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "start offset is past the end of the partition" in output, output
    assert copied == []
    args = ["run", "transactions", "--from-offsets", "2000", "--to-offsets", "5000", *extra]
    result = CliRunner().invoke(replay_cli.app, args)
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    assert "Warning: 2,000 offset(s) of the range are not written yet" in output and "not written" in output
    assert len(copied) == (0 if dry_run else 1)
    if not dry_run:
        assert "2,000 offset(s) of the range were past the end (not written yet)" in output


def test_a_start_time_before_what_retention_kept_warns_that_part_of_the_window_may_be_gone():
    """A --from-time older than the oldest kept record quietly started at it, as if the window were there whole."""
    stamps = {0: [(10, 5_000)], 1: [(0, 500), (20, 1_500)], 3: [(40, 1_000)]}  # partition: (offset, timestamp)
    watermarks = {0: (10, 100), 1: (0, 50), 2: (5, 5), 3: (40, 60)}

    def lookup(ms: int) -> dict[int, int]:  # the first offset at or after the time, -1: none
        return {p: next((o for o, ts in records if ts >= ms), -1) for p, records in stamps.items()} | {2: -1}

    ranges = resolve_ranges(watermarks, Bound(time_ms=1_000), Bound(), lookup)
    assert [(r.partition, r.start, r.time_cut) for r in ranges] == [(0, 10, True), (1, 20, False), (2, 5, False)] + [
        (3, 40, False)  # its earliest kept record is exactly at the time: the window starts there
    ]
    assert topic_replay.range_warnings(ranges) == [
        "the start time is earlier than the earliest record retention kept, so part of the window may be gone"
        " (partition 0: offsets before 10 deleted); only what is kept is copied"
    ]
    later = resolve_ranges(watermarks, Bound(time_ms=5_000), Bound(), lookup)
    assert topic_replay.range_warnings(later) == [] and not any(r.time_cut for r in later)
    nothing_deleted = resolve_ranges({1: (0, 50)}, Bound(time_ms=100), Bound(), lookup)
    assert not nothing_deleted[0].time_cut  # low 0: the partition holds everything it ever had


def test_replay_from_a_time_before_what_retention_kept_warns_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_plan(_kafka: Any, _topic: str, start: Bound, end: Bound, partitions: Any) -> list[PartitionRange]:
        return resolve_ranges({0: (300, 900)}, start, end, lambda ms: {0: 300}, partitions)

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", fake_plan)
    monkeypatch.setattr(replay_cli, "replay", lambda *_a, **_k: ReplayStats(planned=600, read=600, sent=600, acked=600))
    for extra in (["--dry-run"], []):
        args = ["run", "transactions", "--from-time", "2026-11-22T06:00:00Z", "--no-progress", *extra]
        result = CliRunner().invoke(replay_cli.app, args)
        output = " ".join(result.output.split())
        assert result.exit_code == 1, output
        assert "Warning: the start time is earlier than the earliest record retention kept" in output
    assert "part of the window may have been gone before the start (retention)" in output


def test_a_start_time_later_than_the_end_time_is_refused_before_any_broker_is_asked():
    """An inverted range resolved to nothing, and the replay ended with exit 0 as if it had copied the hour."""
    with pytest.raises(RangeError, match=r"start 2026-11-22T07:00:00.000Z is later than the end 2026-11-22T06:00:00"):
        bounds(None, None, "2026-11-22T07:00:00Z", "2026-11-22T06:00:00Z")
    with pytest.raises(RangeError, match="later than the end"):
        resolve_ranges(WATERMARKS, Bound(time_ms=2000), Bound(time_ms=1000), _never)
    assert bounds(None, None, "2026-11-22T06:00:00Z", "2026-11-22T06:00:00Z")[0].time_ms == 1_795_327_200_000


@pytest.mark.parametrize(
    ("from_offsets", "to_offsets", "where"),
    [
        ("60", "20", "every partition: 60 > 20"),
        ("0:5,1:30", "1:20", "partition 1: 30 > 20"),
        ("9", "0:3", "partition 0"),
    ],
)
def test_a_start_offset_past_the_end_offset_is_refused(from_offsets, to_offsets, where):
    with pytest.raises(RangeError, match=f"start offset is past the end offset \\({where}"):
        bounds(from_offsets, to_offsets, None, None)


def test_offsets_of_different_partitions_or_a_time_against_an_offset_are_not_compared():
    """Partition 0 from 50, partition 1 up to 20: each partition's own range is fine."""
    assert _spans(resolve_ranges(WATERMARKS, Bound(offsets={0: 50}), Bound(offsets={1: 20}), _never))[0] == (50, 100)
    start, end = bounds(None, "5", "2026-11-22T06:00:00Z", None)
    assert (start.time_ms, end.offsets) == (1_795_327_200_000, 5)


def test_replay_refuses_an_inverted_range_as_a_bad_option_without_asking_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay_cli, "plan", _never)
    result = CliRunner().invoke(
        replay_cli.app, ["run", "transactions", "--from-time", "2026-11-22T07:00Z", "--to-time", "2026-11-22T06:00Z"]
    )
    assert result.exit_code == 2, result.output
    assert "is later than the end" in result.output and "Traceback" not in result.output


def test_per_partition_offsets_leave_other_partitions_at_their_defaults():
    ranges = resolve_ranges(WATERMARKS, Bound(offsets={0: 40}), Bound(offsets={1: 7}), _never)
    assert _spans(ranges) == {0: (40, 100), 1: (0, 7), 2: (5, 5)}


def test_a_time_resolves_per_partition_and_no_record_after_it_means_the_end():
    def lookup(ms: int) -> dict[int, int]:
        return {1000: {0: 30, 1: 12, 2: -1}, 2000: {0: 70, 1: -1, 2: -1}}[ms]

    ranges = resolve_ranges(WATERMARKS, Bound(time_ms=1000), Bound(time_ms=2000), lookup)
    assert _spans(ranges) == {0: (30, 70), 1: (12, 50), 2: (5, 5)}


@pytest.mark.parametrize("given", ["", ",", " , "])
def test_partitions_that_name_no_partition_are_refused_not_read_as_all_or_none(
    monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """``--partitions ""`` (a script's empty variable) replayed the whole topic; ``--partitions ,`` replayed nothing
    with exit 0."""
    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", lambda *_a: pytest.fail("asked the broker"))
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions", "--partitions", given, "--dry-run"])
    assert result.exit_code == 2 and "--partitions takes partition numbers" in result.output, result.output


def test_only_the_chosen_partitions_and_only_existing_ones():
    ranges = resolve_ranges(WATERMARKS, Bound(), Bound(), _never, partitions=[1])
    assert _spans(ranges) == {1: (0, 50)}
    with pytest.raises(RangeError, match="no partition"):
        resolve_ranges(WATERMARKS, Bound(), Bound(), _never, partitions=[3])
    with pytest.raises(RangeError, match="no partition"):
        resolve_ranges(WATERMARKS, Bound(offsets={7: 1}), Bound(), _never)


def test_same_partition_only_when_the_partition_counts_match():
    assert target_partition(2, 3, 3) == 2
    assert target_partition(2, 3, 1) is None
    assert target_partition(0, 3, 6) is None


def test_merge_orders_by_timestamp_and_never_reorders_a_partition():
    rng = random.Random(3)
    merge = TimestampMerge(open_partitions={0, 1, 2})
    streams = {}
    for p in range(3):
        # Timestamps mostly rising, with a few out-of-order ones inside a partition.
        ts = sorted(rng.randrange(10_000) for _ in range(200))
        ts[50], ts[51] = ts[51] + 5, ts[50]
        streams[p] = [(t, off) for off, t in enumerate(ts)]
    out = []
    cursors = dict.fromkeys(streams, 0)
    while any(cursors[p] < len(streams[p]) for p in streams):  # feed in uneven chunks, like fetches
        p = rng.randrange(3)
        for t, off in streams[p][cursors[p] : cursors[p] + rng.randrange(1, 40)]:
            merge.add(p, (t, off), (p, off, t))
            cursors[p] += 1
        if cursors[p] >= len(streams[p]):
            merge.close(p)
        out.extend(merge.ready())
    out.extend(merge.ready())
    assert merge.empty and len(out) == 600
    for p in streams:
        assert [off for q, off, _ in out if q == p] == list(range(200)), "per-partition order kept"
    inversions = sum(1 for a, b in zip(out, out[1:], strict=False) if a[2] > b[2])
    assert inversions <= 6, "across partitions the output follows the timestamps"


def test_merge_waits_for_a_partition_that_has_nothing_yet():
    merge = TimestampMerge(open_partitions={0, 1})
    merge.add(0, (5, 0), "a")
    assert list(merge.ready()) == [], "partition 1 may still bring an earlier record"
    merge.add(1, (3, 0), "b")
    assert list(merge.ready()) == ["b"]
    merge.close(1)
    assert list(merge.ready()) == ["a"]


# ---------------------------------------------------------------------------- the copy, on a virtual clock


class VirtualClock:
    """Stands in for the ``time`` module of the replay: the fakes' waits advance it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class SourceConsumer:
    """Partitions of records (``stamps[p][offset]`` is the timestamp). A batch shares ``num`` among the partitions
    not paused and takes a millisecond; a consume that finds nothing waits its whole timeout."""

    def __init__(self, clock: VirtualClock, stamps: dict[int, list[int]]) -> None:
        self.clock, self.stamps = clock, stamps
        self.positions: dict[int, int] = {}
        self.paused: set[int] = set()

    def assign(self, partitions: list[Any]) -> None:
        self.positions.update({tp.partition: tp.offset for tp in partitions})

    def incremental_unassign(self, partitions: list[Any]) -> None:
        for tp in partitions:
            self.positions.pop(tp.partition, None)

    def pause(self, partitions: list[Any]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[Any]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def consume(self, num: int, timeout: float) -> list[Message]:
        live = [p for p in sorted(self.positions) if p not in self.paused]
        batch = []
        for p in live:
            start = self.positions[p]
            stop = min(len(self.stamps[p]), start + num // len(live))
            batch += [
                Message(topic="src", partition=p, offset=o, key=b"k", value=b"v", timestamp=(TIMESTAMP_CREATE_TIME, ts))
                for o, ts in enumerate(self.stamps[p][start:stop], start)
            ]
            self.positions[p] = stop
        self.clock.now += 0.001 if batch else timeout
        return batch

    def position(self, partitions: list[Any]) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, -1001)) for tp in partitions]

    def close(self) -> None:
        pass


class TargetProducer:
    """Acknowledges every send at the next poll; a poll takes its whole timeout."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.timestamps: list[int] = []
        self.unacked: list[Any] = []

    def produce(self, _topic: str, **kwargs: Any) -> None:
        self.timestamps.append(kwargs["timestamp"])
        self.unacked.append(kwargs["on_delivery"])

    def poll(self, timeout: float = 0) -> int:
        self.clock.now += timeout
        acked, self.unacked = self.unacked, []
        for on_delivery in acked:
            on_delivery(None, None)
        return len(acked)

    def flush(self, _timeout: float = 0) -> int:
        self.poll(0)
        return 0


KAFKA = KafkaSettings()


def _fake_clients(monkeypatch: pytest.MonkeyPatch, stamps: dict[int, list[int]]) -> tuple[TargetProducer, VirtualClock]:
    """:func:`replay` reads ``stamps`` and writes to a target ``dst`` with as many partitions, on a virtual clock."""
    clock = VirtualClock()
    consumer, producer = SourceConsumer(clock, stamps), TargetProducer(clock)
    metadata = SimpleNamespace(topics={"dst": SimpleNamespace(partitions=dict.fromkeys(stamps))})
    monkeypatch.setattr(topic_replay, "time", clock)
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: consumer)
    monkeypatch.setattr(topic_replay, "_producer", lambda _kafka: producer)
    monkeypatch.setattr(topic_replay, "partition_count", lambda *_a: len(stamps))
    monkeypatch.setattr(topic_replay.kafka_clients, "require_topics", lambda *_a: metadata)
    return producer, clock


def _whole(stamps: dict[int, list[int]]) -> list[PartitionRange]:
    return [PartitionRange(p, 0, len(records), 0, len(records)) for p, records in stamps.items()]


def test_a_rate_too_slow_to_send_a_batch_within_the_idle_timeout_still_copies_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 10 records/s a batch of 1000 takes 100 s to send: time spent sending is not the source being idle."""
    stamps = {0: list(range(3000))}
    producer, clock = _fake_clients(monkeypatch, stamps)
    stats = replay(KAFKA, "src", KAFKA, "dst", _whole(stamps), rate=10, progress=False, idle_timeout_s=60)
    assert stats.ok and stats.acked == 3000
    assert producer.timestamps == stamps[0]
    assert clock.now - 1000 >= 299, "the rate was kept"


def test_a_backlog_released_at_once_is_sent_in_full_however_long_it_takes_at_the_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Partition 1 holds the later hour: it is buffered (up to ``max_buffered``) while partition 0 is merged and
    released in one go when partition 0 ends -- longer to send at the rate than the idle timeout."""
    stamps = {0: list(range(2000)), 1: [10**9 + o for o in range(2000)]}
    producer, _ = _fake_clients(monkeypatch, stamps)
    stats = replay(
        KAFKA, "src", KAFKA, "dst", _whole(stamps), rate=400, progress=False, max_buffered=1500, idle_timeout_s=3
    )
    assert stats.ok and stats.acked == 4000
    assert producer.timestamps == stamps[0] + stamps[1], "merged by timestamp"


def test_a_source_that_stops_before_the_end_of_its_range_still_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records deleted by retention after the range was resolved: the replay must not wait for them forever."""
    producer, clock = _fake_clients(monkeypatch, {0: list(range(5))})
    with pytest.raises(topic_replay.ReplayStopped, match=r"no records from src partitions \[0\] for 5s"):
        replay(
            KAFKA, "src", KAFKA, "dst", [PartitionRange(0, 0, 10, 0, 10)], rate=100, progress=False, idle_timeout_s=5
        )
    assert producer.timestamps == list(range(5)), "what was read was sent"
    assert 5 < clock.now - 1000 < 6, "given up after 5 s without a record"


def test_a_partition_held_back_by_an_open_transaction_stops_with_what_was_acknowledged_and_where_to_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transaction never committed holds a committed-only reader back: the copy ended in a TimeoutError with
    nothing said of the records already copied, nor where to go on from."""
    stamps = {0: list(range(5)), 1: list(range(4))}
    _fake_clients(monkeypatch, stamps)
    ranges = [PartitionRange(0, 0, 10, 0, 10), PartitionRange(1, 0, 4, 0, 4)]
    with pytest.raises(
        topic_replay.ReplayStopped, match=r"partitions \[0\] for 5s .*\(0 at offset 5\): a transaction"
    ) as e:
        replay(KAFKA, "src", KAFKA, "dst", ranges, progress=False, idle_timeout_s=5)
    stats = e.value.stats
    assert (stats.sent, stats.acked) == (9, 9)
    assert stats.resume == {0: (5, 10)}, "partition 1 was copied whole"
    assert topic_replay.resume_options(stats.resume) == "--partitions 0 --from-offsets 0:5 --to-offsets 0:10"


class TooLargeProducer(TargetProducer):
    """Refuses the record whose value is ``big`` as the client does one over ``message.max.bytes``."""

    def produce(self, topic: str, **kwargs: Any) -> None:
        if kwargs["value"] == b"big":
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "Message size too large"))
        super().produce(topic, **kwargs)


def test_a_record_over_the_producers_size_limit_stops_the_copy_naming_its_offset_not_its_content(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stamps = {0: list(range(6))}
    _, clock = _fake_clients(monkeypatch, stamps)
    consumer = SourceConsumer(clock, stamps)
    real_consume = consumer.consume

    def consume(num: int, timeout: float) -> list[Message]:
        return [
            Message(
                topic="src", partition=m.partition(), offset=m.offset(), key=b"k", value=b"big", timestamp=m.timestamp()
            )
            if m.offset() == 3
            else m
            for m in real_consume(num, timeout)
        ]

    consumer.consume = consume  # type: ignore[method-assign]
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: consumer)
    monkeypatch.setattr(topic_replay, "_producer", lambda _kafka: TooLargeProducer(clock))
    with pytest.raises(topic_replay.ReplayStopped) as e:
        replay(KAFKA, "src", KAFKA, "dst", _whole(stamps), progress=False, idle_timeout_s=5)
    assert (
        str(e.value)
        == "the record at src[0] offset 3 is larger than the producer's size limit (4 bytes of key and value)"
    )
    assert (e.value.stats.sent, e.value.stats.acked) == (3, 3)
    assert e.value.stats.resume == {0: (3, 6)}


class BrokerTooLargeProducer(TargetProducer):
    """Takes every record, but the broker refuses the one whose value is ``big`` with ``code`` at its delivery, as it
    does a record (or the batch holding it) over the target topic's ``max.message.bytes``."""

    def __init__(self, clock: VirtualClock, code: int) -> None:
        super().__init__(clock)
        self.code = code

    def produce(self, topic: str, **kwargs: Any) -> None:
        super().produce(topic, **kwargs)
        if kwargs["value"] == b"big":
            on_delivery = self.unacked.pop()
            self.unacked.append(lambda _err, msg: on_delivery(KafkaError(self.code), msg))


@pytest.mark.parametrize("code", [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE])
def test_a_record_the_broker_refuses_as_too_large_stops_the_copy_as_the_producers_own_limit_does(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """It was counted as failed and the copy went on past it to the end: a hole in the target, a red count, and no
    way to resume at the record (the producer's own size check stops the copy there)."""
    stamps = {0: list(range(6))}
    _, clock = _fake_clients(monkeypatch, stamps)
    consumer = SourceConsumer(clock, stamps)
    real_consume = consumer.consume

    def consume(num: int, timeout: float) -> list[Message]:
        return [
            Message(
                topic="src", partition=m.partition(), offset=m.offset(), key=b"k", value=b"big", timestamp=m.timestamp()
            )
            if m.offset() == 3
            else m
            for m in real_consume(num, timeout)
        ]

    consumer.consume = consume  # type: ignore[method-assign]
    producer = BrokerTooLargeProducer(clock, code)
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: consumer)
    monkeypatch.setattr(topic_replay, "_producer", lambda _kafka: producer)
    with pytest.raises(topic_replay.ReplayStopped) as e:
        replay(KAFKA, "src", KAFKA, "dst", _whole(stamps), progress=False, idle_timeout_s=5)
    error = KafkaError(code)
    assert str(e.value) == (
        "the record at src[0] offset 3 is larger than the broker accepts for dst (4 bytes of key and value; it"
        f" answered {error.str()} ({error.name()}))"
    )
    stats = e.value.stats
    assert (stats.sent, stats.acked, stats.failed) == (4, 3, 1), "nothing sent after the refusal was known"
    assert stats.errors == [error.str()] and producer.timestamps == [0, 1, 2, 3]
    assert stats.resume == {0: (3, 6)}


def test_replay_that_stops_part_way_prints_one_error_line_the_summary_and_where_to_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def stopped(*_a: Any, **_k: Any) -> ReplayStats:
        stats = ReplayStats(planned=30, read=12, sent=12, acked=12, resume={0: (7, 10), 2: (3, 10)})
        raise topic_replay.ReplayStopped("the record at t[0] offset 7 is larger than the producer's size limit", stats)

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", lambda *_a: [PartitionRange(p, 0, 10, 0, 10) for p in range(3)])
    monkeypatch.setattr(replay_cli, "replay", stopped)
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions", "--no-progress"])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1 and "Traceback" not in output, output
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        "Error: the record at t[0] offset 7 is larger than the producer's size limit"
    ]
    assert "replayed 12 of 30 planned record(s) (acknowledged; 12 read, 12 sent, 0 failed)" in output
    assert (
        "to resume, run the same command with --partitions 0,2 --from-offsets 0:7,2:3 --to-offsets 0:10,2:10" in output
    )


class RetentionDuringCopyConsumer(SourceConsumer):
    """Hands out partition 0's first 5 records; then retention deletes offsets up to 12, so the next fetch is out
    of range (``auto.offset.reset=error``)."""

    def __init__(self, clock: VirtualClock, stamps: dict[int, list[int]]) -> None:
        super().__init__(clock, stamps)
        self.low = 0

    def consume(self, num: int, timeout: float) -> list[Message]:
        if self.low == 0 and self.positions.get(0) == 5:
            self.low, self.positions[0] = 12, 10**9  # no fetch until assigned again
            return [Message(topic="src", partition=0, offset=5, error=KafkaError(KafkaError._AUTO_OFFSET_RESET))]
        return super().consume(5 if self.low == 0 else num, timeout)

    def get_watermark_offsets(self, _tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return self.low, len(self.stamps[0])

    def incremental_assign(self, partitions: list[Any]) -> None:
        self.assign(partitions)


def test_records_retention_deletes_while_replay_copies_them_are_counted_and_the_rest_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The copy stopped with a bare "Offset out of range" error that did not say how much of the range was lost."""
    stamps = {0: list(range(20))}
    producer, clock = _fake_clients(monkeypatch, stamps)
    consumer = RetentionDuringCopyConsumer(clock, stamps)
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: consumer)
    stats = replay(KAFKA, "src", KAFKA, "dst", _whole(stamps), progress=False, idle_timeout_s=5)
    assert stats.deleted == {0: 7}, "offsets 5 to 11"
    assert producer.timestamps == list(range(5)) + list(range(12, 20)) and stats.ok and stats.acked == 13


def test_replay_warns_with_the_count_retention_deleted_mid_copy_and_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_replay(*_a: Any, **_k: Any) -> ReplayStats:
        return ReplayStats(planned=100, read=93, sent=93, acked=93, deleted={0: 7})

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", lambda *_a: [PartitionRange(0, 0, 100, 0, 100)])
    monkeypatch.setattr(replay_cli, "replay", fake_replay)
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions", "--no-progress"])
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 1, output
    assert (
        "Warning: 7 offset(s) of the range were deleted by retention while being read (partition 0: 7) and were"
        " not copied"
    ) in output
    assert "replayed 93 of 100 planned record(s)" in output
    assert "7 offset(s) of the range were deleted while being copied (retention)" in output


# ---------------------------------------------------------------------------- state and control topics


def test_every_compacted_topic_is_a_state_topic_that_replay_does_not_write_into_where_it_is_read():
    """A compacted topic's last record per key is in force: a new one must say why and what to do instead."""
    compacted = {t.name for t in ALL_TOPICS if "compact" in t.config.get("cleanup.policy", "")}
    assert compacted == {"rules", "watchlist", "labels", "cases"}
    assert compacted <= set(replay_cli.STATE_TOPICS)


@pytest.fixture
def live_cli(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``replay run`` with ``live.`` as the settings' prefix, on an empty range: the (source, target) of each
    replay it starts."""
    started: list[tuple[str, str]] = []

    def fake_replay(_kafka: Any, source: str, _target_kafka: Any, target: str, *_a: Any, **_k: Any) -> ReplayStats:
        started.append((source, target))
        return ReplayStats()

    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings(kafka=KafkaSettings(topic_prefix="live.")))
    monkeypatch.setattr(replay_cli, "plan", lambda *_a: [])
    monkeypatch.setattr(replay_cli, "replay", fake_replay)
    clusters = {"dr:9092": "cluster-dr"}  # any other address reaches the live cluster (an alias of its brokers)
    monkeypatch.setattr(replay_cli, "cluster_id", lambda kafka: clusters.get(kafka.bootstrap_servers, "cluster-live"))
    return started


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["rules"], "live.rules into live.rules: it would roll live state back: the job applies the last rules"),
        (["watchlist", "--from-time", "2026-11-22T06:00Z"], "live.watchlist into live.watchlist: it would roll live"),
        (["labels", "--source-prefix", "bt-1.", "--target-prefix", "live."], "bt-1.labels into live.labels"),
        (["cases", "--source-prefix", "bt-1."], "bt-1.cases into bt-1.cases: it would roll live state back"),
        (["transactions", "--target-topic", "commands"], "live.transactions into live.commands: the services"),
        (["audit", "--dry-run"], "live.audit into live.audit: it is the record of who did what"),
    ],
)
def test_a_state_or_control_topic_is_not_replayed_into_itself_nor_into_the_live_prefix(live_cli, args, refused):
    """Replaying an older range into ``rules`` put an older rule set back in force, and so on for each."""
    result = CliRunner().invoke(replay_cli.app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: not replaying {refused}"), result.output
    assert "Instead, " in result.output and len(result.output.strip().splitlines()) == 1
    assert live_cli == []


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["rules", "--source-prefix", "bt-1.", "--target-prefix", "", "--target-topic", "live.rules"], "bt-1.rules"),
        (["rules", "--source-prefix", "bt-1.", "--target-prefix", "live", "--target-topic", ".rules"], "bt-1.rules"),
        (["transactions", "--target-prefix", "", "--target-topic", "live.watchlist"], "live.transactions"),
        (["cases", "--source-prefix", "bt-1.", "--target-prefix", "bt-1", "--target-topic", ".cases"], "bt-1.cases"),
    ],
)
def test_a_state_topic_named_whole_in_target_topic_is_refused_as_when_named_by_prefix_and_topic(
    live_cli, args, refused
) -> None:
    """The refusal looked at ``--target-topic`` as a logical name only: the live ``rules`` written out whole
    (``--target-topic live.rules`` with an empty target prefix) took a backtest's rule set into the live one."""
    result = CliRunner().invoke(replay_cli.app, ["run", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: not replaying {refused} into "), result.output
    assert live_cli == []


@pytest.mark.parametrize("bootstrap", ["127.0.0.1:9092", "localhost:9092", "broker-1:9092,broker-2:9092"])
def test_a_target_bootstrap_that_reaches_the_same_cluster_is_refused_as_the_same_cluster(live_cli, bootstrap) -> None:
    """``--target-bootstrap`` skipped the check whatever it named: the live cluster's own brokers (its address, or
    another name for them) replayed an older range into the live ``watchlist``, a forgotten face enrolled again."""
    result = CliRunner().invoke(replay_cli.app, ["run", "watchlist", "--target-bootstrap", bootstrap])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: not replaying live.watchlist into live.watchlist"), result.output
    assert live_cli == []


def test_without_a_cluster_id_the_same_bootstrap_list_is_the_same_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_cli, "cluster_id", lambda _kafka: None)
    live = KafkaSettings(bootstrap_servers="k1:9092")
    assert replay_cli.same_cluster(live, live.model_copy(update={"bootstrap_servers": "k1:9092"}))
    assert not replay_cli.same_cluster(live, live.model_copy(update={"bootstrap_servers": "dr:9092"}))


@pytest.mark.parametrize(
    ("args", "copy"),
    [
        (["rules", "--target-prefix", "bt-1."], ("live.rules", "bt-1.rules")),  # a backtest copy's rule set
        (["watchlist", "--target-bootstrap", "dr:9092"], ("live.watchlist", "live.watchlist")),  # another cluster
        (["transactions"], ("live.transactions", "live.transactions")),  # re-scoring: the job drops what it saw
    ],
)
def test_a_copy_into_another_prefix_or_cluster_and_other_topics_into_themselves_are_replayed(live_cli, args, copy):
    result = CliRunner().invoke(replay_cli.app, ["run", *args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert live_cli == [copy]


# ---------------------------------------------------------------------------- times Kafka cannot take


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1969-12-31T23:59:59.999Z", "before 1970-01-01T00:00:00Z"),
        ("1969-12-31T23:59:59.998Z", "before 1970-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00+01:00", "before 1970-01-01T00:00:00Z"),
        ("9999-12-31T23:00:00-05:00", "after 9999-12-31T23:59:59.999Z"),
    ],
)
def test_a_time_before_1970_or_past_year_9999_is_refused_not_read_as_latest_or_earliest(text: str, says: str) -> None:
    """-1 ms is what Kafka's offsets_for_times reads as "latest", -2 as "earliest": a --from-time a millisecond
    before 1970 replayed nothing; a zone that moved a time past 9999 failed later with "year 10000 is out of range"."""
    with pytest.raises(RangeError, match=says):
        parse_time_ms(text)
    with pytest.raises(RangeError, match=says):
        bounds(None, None, text, None)
    with pytest.raises(RangeError, match=says):
        bounds(None, None, None, text)
    assert parse_time_ms("1970-01-01T00:00:00Z") == 0
    assert parse_time_ms("9999-12-31T23:59:59.999Z") == 253_402_300_799_999


@pytest.mark.parametrize(
    "option",
    [["--from-time", "1969-12-31T23:59:59.999Z"], ["--to-time", "9999-12-31T23:30:00-05:00"]],
)
def test_replay_refuses_a_time_kafka_cannot_take_with_one_error_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, option: list[str]
) -> None:
    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    monkeypatch.setattr(replay_cli, "plan", _never)
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions", *option])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {option[0]}: "), line
    result = CliRunner().invoke(replay_cli.app, ["epoch-ms", option[1]])
    assert result.exit_code == 2 and result.output.startswith("Error: "), result.output


@pytest.mark.parametrize(
    ("code", "exit_code"), [(KafkaError.LEADER_NOT_AVAILABLE, 1), (KafkaError.TOPIC_AUTHORIZATION_FAILED, 1)]
)
def test_a_topic_the_broker_answers_for_with_an_error_is_named_with_that_error_not_as_missing(
    monkeypatch: pytest.MonkeyPatch, code: int, exit_code: int
) -> None:
    """A topic without a leader, or one this principal may not read, was reported as "does not exist"."""
    error = KafkaError(code)
    fake_cluster(monkeypatch, {"transactions": SimpleNamespace(error=error, partitions={})})
    with pytest.raises(topic_replay.TopicUnavailable) as raised:
        topic_replay.plan(KAFKA, "transactions", Bound(), Bound())
    assert str(raised.value) == f"topic transactions: the broker answered {error.str()} ({error.name()})"
    assert "does not exist" not in str(raised.value)
    with pytest.raises(topic_replay.NoSuchTopic, match="topic other does not exist"):
        topic_replay.plan(KAFKA, "other", Bound(), Bound())
    monkeypatch.setattr(replay_cli, "get_settings", lambda: Settings())
    result = CliRunner().invoke(replay_cli.app, ["run", "transactions"])
    assert result.exit_code == exit_code, result.output
    assert result.output.strip() == f"Error: {raised.value}"


@pytest.mark.parametrize("code", [KafkaError.LEADER_NOT_AVAILABLE, KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_watermarks_and_committed_offsets_of_a_topic_the_broker_answers_with_an_error_raise_that_error(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Such a topic was taken for one without partitions: ``caught_up`` said "yes", as if all was read."""
    error = KafkaError(code)
    topics = {
        "scored": SimpleNamespace(error=error, partitions={}),
        "ok": SimpleNamespace(error=None, partitions=partitions_led(1)),
    }
    fake_cluster(monkeypatch, topics)
    said = f"topic scored: the broker answered {error.str()} ({error.name()})"
    for read in (
        lambda: topic_replay.high_watermarks(KAFKA, "scored"),
        lambda: topic_replay.committed_offsets(KAFKA, "g", "scored"),
        lambda: topic_replay.caught_up(KAFKA, "g", "scored"),
    ):
        with pytest.raises(topic_replay.TopicUnavailable) as raised:
            read()
        assert str(raised.value) == said
    assert topic_replay.high_watermarks(KAFKA, "missing") == {}, "a topic that does not exist has nothing"
    assert topic_replay.high_watermarks(KAFKA, "ok") == {0: 5} and topic_replay.caught_up(KAFKA, "g", "ok")


@pytest.mark.parametrize("code", [KafkaError.LEADER_NOT_AVAILABLE, KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_a_source_topic_the_broker_answers_with_an_error_stops_the_replay_with_that_error(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Its partitions were counted as 0, as for a topic that does not exist, and the copy went on regardless."""

    class Source:
        closed = False

        def close(self) -> None:
            self.closed = True

    error = KafkaError(code)
    topics = {
        "src": SimpleNamespace(error=error, partitions={}),
        "dst": SimpleNamespace(error=None, partitions=partitions_led(1)),
    }
    source = Source()
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: source)
    monkeypatch.setattr(topic_replay, "_producer", lambda _kafka: object())
    monkeypatch.setattr(topic_replay.kafka_clients, "require_topics", lambda *_a: SimpleNamespace(topics=topics))
    monkeypatch.setattr(topic_replay.kafka_clients, "cluster_metadata", lambda *_a: SimpleNamespace(topics=topics))
    with pytest.raises(topic_replay.TopicUnavailable) as raised:
        replay(KAFKA, "src", KAFKA, "dst", [PartitionRange(0, 0, 5, 0, 5)], progress=False)
    assert str(raised.value) == f"topic src: the broker answered {error.str()} ({error.name()})"
    assert source.closed, "the consumer is given back"
    assert topic_replay.partition_count(Source(), "dst") == 1
    assert topic_replay.partition_count(Source(), "missing") == 0, "a topic that does not exist has no partitions"


def test_a_topic_listed_as_unknown_is_missing_for_the_readers_as_for_the_writers(monkeypatch: pytest.MonkeyPatch):
    """A topic listed with UNKNOWN_TOPIC_OR_PART was "unavailable" to ``partition_count`` (the tail, the backtest's
    wait) and ``plan`` (replay), while ``require_topics`` said it does not exist: the readers now say so too."""
    unknown = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
    fake_cluster(monkeypatch, {"gone": SimpleNamespace(error=unknown, partitions={})})
    with pytest.raises(topic_replay.kafka_clients.TopicMissing):
        topic_replay.kafka_clients.require_topics(ReadToEndConsumer(), KAFKA, "gone")
    assert topic_replay.partition_count(ReadToEndConsumer(), "gone") == 0
    assert topic_replay.high_watermarks(KAFKA, "gone") == {} and not topic_replay.caught_up(KAFKA, "g", "gone")
    with pytest.raises(topic_replay.NoSuchTopic, match="^topic gone does not exist$"):
        topic_replay.plan(KAFKA, "gone", Bound(), Bound())


def test_the_readers_name_a_partition_without_a_leader_before_asking_its_end(monkeypatch: pytest.MonkeyPatch):
    """``partition_count`` looked only at the topic's own error: a topic with a leaderless partition was counted, and
    the tail, the watermarks and ``caught_up`` then asked that partition's end, failing with the client's error object
    (after its timeout) instead of naming the topic and partition."""
    leaderless = partitions_led(3)
    leaderless[2].leader = -1
    refused = partitions_led(2)
    refused[0].error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    fake_cluster(
        monkeypatch,
        {
            "led": SimpleNamespace(error=None, partitions=leaderless),
            "refused": SimpleNamespace(error=None, partitions=refused),
        },
    )
    for ask in (
        lambda: topic_replay.partition_count(ReadToEndConsumer(), "led"),
        lambda: topic_replay.high_watermarks(KAFKA, "led"),
        lambda: topic_replay.caught_up(KAFKA, "g", "led"),
    ):
        with pytest.raises(topic_replay.TopicUnavailable, match=r"^topic led partition 2: no leader"):
            ask()
    with pytest.raises(topic_replay.TopicUnavailable, match=r"^topic refused partition 0: the broker answered .*AUTH"):
        topic_replay.partition_count(ReadToEndConsumer(), "refused")


def test_the_replay_plan_names_a_partition_without_a_leader_before_asking_its_watermarks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``plan`` looked only at the topic's own error: a topic with a leaderless partition (or one the broker answers
    with an error) was planned, and that partition's watermarks then failed after a timeout, the partition unnamed."""
    leaderless = partitions_led(3)
    leaderless[1].leader = -1
    refused = partitions_led(2)
    refused[1].error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    fake_cluster(
        monkeypatch,
        {
            "led": SimpleNamespace(error=None, partitions=leaderless),
            "refused": SimpleNamespace(error=None, partitions=refused),
        },
    )
    with pytest.raises(topic_replay.TopicUnavailable, match=r"^topic led partition 1: no leader"):
        topic_replay.plan(KAFKA, "led", Bound(), Bound())
    with pytest.raises(topic_replay.TopicUnavailable, match=r"^topic refused partition 1: the broker answered .*AUTH"):
        topic_replay.plan(KAFKA, "refused", Bound(), Bound())
