"""Replay ranges and ordering (producers/replay.py), without Kafka."""

from __future__ import annotations

import random

import pytest

from infra.clients.topic_replay import (
    Bound,
    RangeError,
    TimestampMerge,
    bounds,
    parse_offsets,
    parse_time_ms,
    resolve_ranges,
    target_partition,
)

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
    ranges = resolve_ranges(WATERMARKS, Bound(offsets=60), Bound(offsets=20), _never)
    assert _spans(ranges)[0] == (60, 60), "an end before the start is an empty range, not a negative one"


def test_per_partition_offsets_leave_other_partitions_at_their_defaults():
    ranges = resolve_ranges(WATERMARKS, Bound(offsets={0: 40}), Bound(offsets={1: 7}), _never)
    assert _spans(ranges) == {0: (40, 100), 1: (0, 7), 2: (5, 5)}


def test_a_time_resolves_per_partition_and_no_record_after_it_means_the_end():
    def lookup(ms: int) -> dict[int, int]:
        return {1000: {0: 30, 1: 12, 2: -1}, 2000: {0: 70, 1: -1, 2: -1}}[ms]

    ranges = resolve_ranges(WATERMARKS, Bound(time_ms=1000), Bound(time_ms=2000), lookup)
    assert _spans(ranges) == {0: (30, 70), 1: (12, 50), 2: (5, 5)}


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
