"""``make bench`` fails when it left processes running (tests/bench/run.py), without hiding a failure of its own."""

from __future__ import annotations

import pytest

from infra.processes import MARKER
from tests.bench import run
from tests.bench.run import LEFT_RUNNING_EXIT, bench_processes, exit_status


def test_a_bench_that_succeeded_but_left_processes_exits_non_zero() -> None:
    assert exit_status(None, ["4242 java -cp flink"]) == LEFT_RUNNING_EXIT
    assert exit_status(SystemExit(0), ["4242 java"]) == LEFT_RUNNING_EXIT
    assert exit_status(SystemExit(None), ["4242 java"]) == LEFT_RUNNING_EXIT


def test_nothing_left_keeps_the_exit_as_it_was() -> None:
    assert exit_status(None, []) is None
    assert exit_status(SystemExit(0), []) is None


def test_a_bench_that_failed_keeps_its_own_failure() -> None:
    assert exit_status(SystemExit(1), ["4242 java"]) is None
    assert exit_status(RuntimeError("stage failed"), ["4242 java"]) is None
    assert exit_status(KeyboardInterrupt(), ["4242 java"]) is None


class FakeReaper:
    left: list[str] = []

    def __init__(self, **_: object) -> None:
        pass

    def finish(self) -> list[str]:
        return self.left


@pytest.mark.parametrize(("left", "code"), [(["4242 java"], LEFT_RUNNING_EXIT), ([], 0)])
def test_the_bench_exits_with_the_status_for_what_it_left(monkeypatch, left: list[str], code: int) -> None:
    monkeypatch.setenv(MARKER, "unit-test")  # restored afterwards: the bench sets its own
    monkeypatch.setattr(run, "Reaper", FakeReaper)
    monkeypatch.setattr(FakeReaper, "left", left)
    with pytest.raises(SystemExit) as exc, bench_processes():
        raise SystemExit(0)  # as Typer ends a run that succeeded
    assert exc.value.code == code


def test_an_error_in_the_bench_propagates_even_with_processes_left(monkeypatch) -> None:
    monkeypatch.setenv(MARKER, "unit-test")
    monkeypatch.setattr(run, "Reaper", FakeReaper)
    monkeypatch.setattr(FakeReaper, "left", ["4242 java"])
    with pytest.raises(RuntimeError, match="stage failed"), bench_processes():
        raise RuntimeError("stage failed")
