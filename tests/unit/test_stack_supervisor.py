"""``make run``'s supervisor: a child that dies is started again with backoff, a bounded number of
times per window; stopping ends every child and restarts none."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.launcher import Child, Supervisor
from tests.process_trees import start_counter, stop_three_stubborn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProc:
    pids = iter(range(100, 10_000))

    def __init__(self) -> None:
        self.pid, self.returncode = next(self.pids), None

    def poll(self) -> int | None:
        return self.returncode


class FakeChild(Child):
    """A child whose death the test decides; ``stop`` is recorded instead of signalling anything."""

    def __init__(self, name: str) -> None:
        super().__init__(name, FakeProc(), Path(f"/nonexistent/{name}.log"))  # type: ignore[arg-type]
        self.stopped = self.terminated = False

    def die(self, code: int = 1) -> None:
        self.proc.returncode = code

    def terminate(self) -> None:
        self.terminated = True

    def stop(self, timeout: float = 20.0) -> int | None:
        self.stopped = True
        self.die(-15)
        return -15


class Starter:
    def __init__(self, name: str) -> None:
        self.name, self.started = name, []

    def __call__(self) -> FakeChild:
        self.started.append(FakeChild(self.name))
        return self.started[-1]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_child_that_dies_is_restarted_after_a_doubling_backoff(clock: Clock) -> None:
    sup = Supervisor(backoff_s=1.0, max_backoff_s=60.0, clock=clock)
    sink = Starter("sink")
    sup.add("sink", sink)
    sink.started[-1].die(1)
    sup.check()
    assert len(sink.started) == 1, "not at once: after the backoff"
    clock.now += 1.0
    sup.check()
    assert len(sink.started) == 2 and sup.children[0].alive
    sink.started[-1].die(-9)  # SIGKILL
    sup.check()
    clock.now += 1.5
    sup.check()
    assert len(sink.started) == 2, "the second wait is twice the first"
    clock.now += 0.5
    sup.check()
    assert len(sink.started) == 3
    assert "sink running, 2 restarts" in sup.describe()


def test_restarts_are_bounded_per_window_and_the_give_up_is_logged(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    sup = Supervisor(backoff_s=1.0, max_backoff_s=4.0, max_restarts=3, window_s=600.0, clock=clock)
    job = Starter("job")
    sup.add("job", job)
    caplog.set_level(logging.INFO, logger="infra.supervisor")
    for _ in range(10):
        job.started[-1].die(2)
        sup.check()
        clock.now += 10
        sup.check()
    assert len(job.started) == 4, "the first start and three restarts"
    assert "DOWN (exit 2)" in sup.describe()
    assert any("giving up" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert sum("restarting in" in r.getMessage() for r in caplog.records) == 3


def test_a_restart_the_system_refuses_is_tried_again_and_the_other_children_keep_running(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A fork refused for memory, or a log folder gone read-only, raised out of the check: the supervisor ended and
    stopped every service over one that could not be started again at that moment."""
    sup = Supervisor(backoff_s=1.0, max_backoff_s=60.0, max_restarts=3, window_s=600.0, clock=clock)
    sink, bot = Starter("sink"), Starter("bot")
    refusals = [OSError(12, "Cannot allocate memory")] * 2

    def start_sink() -> FakeChild:
        if len(sink.started) and refusals:
            raise refusals.pop()
        return sink()

    sup.add("sink", start_sink)
    sup.add("bot", bot)
    caplog.set_level(logging.INFO, logger="infra.supervisor")
    sink.started[-1].die(1)
    for _ in range(10):
        sup.check()
        clock.now += 1.0
    assert len(sink.started) == 2 and sup.children[0].alive, "started once the system let it"
    assert bot.started[-1].alive and not bot.started[-1].stopped
    assert "sink running, 3 restarts" in sup.describe(), "each try counts against the bound"
    failures = [r.getMessage() for r in caplog.records if "could not be started" in r.getMessage()]
    assert len(failures) == 2 and "Cannot allocate memory" in failures[0] and "restarting in 2.0 s" in failures[0]


def test_a_child_the_system_never_lets_start_is_given_up_like_a_crash(clock: Clock) -> None:
    sup = Supervisor(backoff_s=1.0, max_backoff_s=4.0, max_restarts=3, window_s=600.0, clock=clock)
    sink = Starter("sink")

    def start_once() -> FakeChild:
        if sink.started:
            raise PermissionError(13, "Permission denied")
        return sink()

    sup.add("sink", start_once)
    sink.started[-1].die(1)
    for _ in range(60):
        sup.check()
        clock.now += 1.0
    assert sup.describe() == "sink DOWN (exit 1), 3 restarts"


def test_a_first_start_the_system_refuses_is_tried_after_the_backoff_and_the_others_start(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A fork refused for memory, or a log folder it cannot write, at the supervisor's start raised out of ``add``:
    the supervisor ended and stopped every service it had already started."""
    sup = Supervisor(backoff_s=1.0, max_backoff_s=60.0, max_restarts=3, window_s=600.0, clock=clock)
    sink, bot = Starter("sink"), Starter("bot")
    refusals = [OSError(12, "Cannot allocate memory")]

    def start_sink() -> FakeChild:
        if refusals:
            raise refusals.pop()
        return sink()

    caplog.set_level(logging.INFO, logger="infra.supervisor")
    assert sup.add("sink", start_sink) is None
    assert sup.add("bot", bot) is bot.started[-1]
    assert (
        sup.children == [bot.started[-1]]
        and sup.describe() == "sink restarting (never started), 1 restarts, bot running"
    )
    [failure] = [r for r in caplog.records if "could not be started" in r.getMessage()]
    assert failure.levelno == logging.ERROR and "Cannot allocate memory" in failure.getMessage()
    assert "restarting in 2.0 s" in failure.getMessage(), "counted as a restart"
    for _ in range(3):
        sup.check()
        clock.now += 1.0
    assert len(sink.started) == 1 and sup.children == [sink.started[-1], bot.started[-1]]
    assert "sink running, 2 restarts" in sup.describe()
    sup.stop()
    assert sink.started[-1].stopped and bot.started[-1].stopped


def test_a_child_that_never_starts_is_given_up_and_stop_passes_over_it(clock: Clock) -> None:
    sup = Supervisor(backoff_s=1.0, max_backoff_s=4.0, max_restarts=2, window_s=600.0, clock=clock)

    def refused() -> FakeChild:
        raise PermissionError(13, "Permission denied")

    sup.add("sink", refused)
    for _ in range(20):
        sup.check()
        clock.now += 1.0
    assert sup.describe() == "sink DOWN (never started), 2 restarts" and sup.children == []
    sup.stop()


def test_the_window_forgets_old_restarts(clock: Clock) -> None:
    sup = Supervisor(backoff_s=1.0, max_restarts=2, window_s=60.0, clock=clock)
    bridge = Starter("bridge")
    sup.add("bridge", bridge)
    for _ in range(5):  # one death every two minutes: never two within the window
        bridge.started[-1].die(1)
        sup.check()
        clock.now += 1
        sup.check()
        clock.now += 120
    assert len(bridge.started) == 6 and sup.children[0].alive


def test_stop_ends_every_child_and_restarts_none(clock: Clock) -> None:
    sup = Supervisor(clock=clock)
    starters = [Starter(n) for n in ("a", "b")]
    for s in starters:
        sup.add(s.name, s)
    sup.stop()
    assert all(s.started[0].stopped for s in starters)
    clock.now += 3600
    sup.check()
    assert [len(s.started) for s in starters] == [1, 1]


def test_unsupervised_a_dead_child_stays_down(clock: Clock) -> None:
    sup = Supervisor(restart=False, clock=clock)
    stage = Starter("stage")
    sup.add("stage", stage)
    stage.started[-1].die(3)
    clock.now += 3600
    sup.check()
    assert len(stage.started) == 1 and "stage DOWN (exit 3)" in sup.describe()


def test_a_real_process_that_exits_is_started_again(tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def start() -> Child:
        script = f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(7)"
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
        return Child("crasher", proc, tmp_path / "crasher.log")

    sup = Supervisor(backoff_s=0.05, max_restarts=2, window_s=60.0)
    sup.add("crasher", start)
    deadline = time.monotonic() + 30
    while "DOWN" not in sup.describe() and time.monotonic() < deadline:
        sup.check()
        time.sleep(0.02)
    assert runs.read_text() == "xxx", "the first run and two restarts, then it stays down"
    assert "crasher DOWN (exit 7), 2 restarts" in sup.describe()


def test_a_thousand_restarts_in_one_window_keep_the_backoff_a_number(clock: Clock) -> None:
    """2 ** restarts overflowed a float after 1,024 restarts in a long window and ended the supervisor."""
    sup = Supervisor(backoff_s=1.0, max_backoff_s=60.0, max_restarts=100_000, window_s=1e9, clock=clock)
    sink = Starter("sink")
    sup.add("sink", sink)
    for _ in range(1_100):
        sink.started[-1].die(1)
        sup.check()
        clock.now += 60.0
        sup.check()
    assert len(sink.started) == 1_101


def test_stop_signals_every_child_first_and_waits_for_them_all_with_one_deadline(tmp_path: Path) -> None:
    """``make run`` stopped its children one after another, each with the whole stop timeout: N children that
    ignore SIGTERM took N times it."""

    def stop(children: list[Child]) -> None:
        sup = Supervisor()
        for child in children:
            sup.add(child.name, lambda child=child: child)
        sup.stop(timeout=2.0)

    stop_three_stubborn(tmp_path, stop)


def test_stop_sends_each_child_one_sigterm(tmp_path: Path) -> None:
    """``make run``'s stop signalled every child, and then each child's stop signalled it again."""
    sup = Supervisor()
    children = [start_counter(tmp_path / f"{n}.said") for n in range(2)]
    try:
        for child in children:
            sup.add(child.name, lambda child=child: child)
        sup.stop(timeout=10)
        assert [(tmp_path / f"{n}.said").read_text() for n in range(2)] == ["TERM\n", "TERM\n"]
    finally:
        for child in children:
            child.kill()


class Unkillable(FakeChild):
    """A child still there 10 s after its SIGKILL (stuck in the kernel): its stop raises."""

    def stop(self, timeout: float = 20.0) -> int | None:
        self.stopped = True
        raise subprocess.TimeoutExpired(["sink"], 10)

    def kill(self, sig: int = 9) -> None:
        self.killed = True


def test_a_child_whose_stop_fails_does_not_keep_stop_from_the_others_and_is_reported(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The TimeoutExpired of a child still there after its SIGKILL came out of ``Supervisor.stop``: the stop ended
    there, said nothing of the other children, and its caller's cleanup never ran."""
    sup = Supervisor(clock=clock)
    stuck = Unkillable("sink")
    others = [FakeChild("bot"), FakeChild("dashboard")]
    sup.add("sink", lambda: stuck)
    for child in others:
        sup.add(child.name, lambda child=child: child)
    with caplog.at_level(logging.INFO, logger="infra.supervisor"):
        assert sup.stop(timeout=1.0) == ["sink"]
    assert stuck.stopped and stuck.killed and all(child.stopped for child in others)
    [failed] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed.getMessage().startswith("sink: did not stop (pid ")
    assert "bot: stopped" in caplog.text and "dashboard: stopped" in caplog.text
