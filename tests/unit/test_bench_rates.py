"""``make bench``'s end-to-end stage: the sink's documents/s leave its start-up out, as the job's decisions/s do."""

from __future__ import annotations

import pytest

from tests.bench.run import drain_rate


class FakeSink:
    """A sink that needs ``startup_s`` before its first document, then indexes ``per_s`` documents a second."""

    def __init__(self, startup_s: float, per_s: float, total: int) -> None:
        self.now, self.startup_s, self.per_s, self.total = 0.0, startup_s, per_s, total

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def count(self) -> int:
        return min(self.total, max(0, int((self.now - self.startup_s) * self.per_s)))


def test_the_indexing_rate_leaves_the_sinks_start_up_out() -> None:
    sink = FakeSink(startup_s=5.0, per_s=10_000, total=100_000)  # 10 s of indexing after 5 s of start-up
    per_s, startup_s = drain_rate(
        sink.count, 100_000, 0.0, timeout=60, interval=0.1, clock=sink.clock, sleep=sink.sleep
    )
    assert per_s == pytest.approx(10_000, rel=0.02)  # counting from the launch gave 100k / 15 s = 6,667
    assert startup_s == pytest.approx(5.0, abs=0.15)


def test_a_backlog_indexed_whole_at_the_first_look_counts_from_the_launch() -> None:
    sink = FakeSink(startup_s=0.5, per_s=1_000_000, total=1_000)
    per_s, _ = drain_rate(sink.count, 1_000, 0.0, timeout=60, interval=1.0, clock=sink.clock, sleep=sink.sleep)
    assert per_s == pytest.approx(1_000 / 1.0)


def test_a_sink_that_never_finishes_times_out_with_its_count() -> None:
    sink = FakeSink(startup_s=0.0, per_s=10, total=50)
    with pytest.raises(TimeoutError, match="50/100"):
        drain_rate(sink.count, 100, 0.0, timeout=10, interval=1.0, clock=sink.clock, sleep=sink.sleep)
