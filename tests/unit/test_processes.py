"""infra/processes.py: which processes a run started, found and reaped (real ``sleep`` trees)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from infra.launcher import Child
from infra.processes import (
    EXIT_MARGIN_S,
    KILL_WAIT_S,
    MARKER,
    Reaper,
    StopRequest,
    new_processes,
    port_open,
    reap,
    reap_orphans,
    reaping,
    stop_child,
    stop_children,
)
from infra.settings import Settings
from tests.process_trees import start_counter, start_leader, start_left_counter, stop_three_stubborn


def test_new_processes_are_those_not_seen_before_and_not_kept() -> None:
    before = {(10, 1.0), (11, 1.0)}
    after = [(10, 1.0), (11, 2.0), (12, 3.0), (13, 3.0)]  # 11 is a recycled pid: a new process
    assert new_processes(before, after) == [(11, 2.0), (12, 3.0), (13, 3.0)]
    assert new_processes(before, after, keep={12}) == [(11, 2.0), (13, 3.0)]
    assert new_processes(before, before) == []


def _start(script: str, value: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", script], env={**os.environ, MARKER: value}, **kw)


def _wait_for_sleeps(value: str, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sleeps = [p for p in psutil.process_iter(["name", "environ"]) if (p.info["environ"] or {}).get(MARKER) == value]
        sleeps = [p for p in sleeps if p.info["name"] == "sleep"]
        if len(sleeps) >= n:
            return sleeps
        time.sleep(0.05)
    pytest.fail(f"{n} sleep processes did not start")


def test_a_child_tree_is_found_and_reaped() -> None:
    value = uuid.uuid4().hex
    reaper = Reaper(value=value)
    proc = _start("sleep 30 & sleep 30 & wait", value)
    try:
        sleeps = _wait_for_sleeps(value, 2)
        left = {pid for pid, _ in reaper.leftovers()}
        assert {proc.pid, *(p.pid for p in sleeps)} <= left
        lines = reaper.finish(timeout=5)
        assert any("sleep 30" in line for line in lines) and any(str(proc.pid) in line for line in lines)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sleeps)
        assert reaper.leftovers() == []
    finally:
        proc.kill()
        proc.wait(5)


def test_an_orphan_is_found_by_its_marker_and_reaped() -> None:
    value = uuid.uuid4().hex
    reaper = Reaper(value=value)
    proc = _start("sleep 30 >/dev/null 2>&1 & exit 0", value)  # the parent exits: sleep is re-parented
    proc.wait(5)
    (orphan,) = _wait_for_sleeps(value, 1)
    assert orphan.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
    assert [pid for pid, _ in reaper.leftovers()] == [orphan.pid]
    assert len(reaper.finish(timeout=5)) == 1
    assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE


def test_reaping_gives_what_the_block_left_running_the_stop_timeout_before_sigkill_not_a_fixed_10_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``reaping`` SIGKILLed what ignored its SIGTERM after a fixed 10 s, whatever the supervisor's stop timeout: too
    long for a short one, too short for a JVM saving its state within a long one."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    reported: list[str] = []
    with reaping(reported.extend, timeout_s=1.5):
        proc = _start("trap '' TERM; sleep 30 & wait", value)  # SIGTERM ignored, by its sleep too
        (sleep,) = _wait_for_sleeps(value, 1)
        started = time.monotonic()
    took = time.monotonic() - started
    try:
        assert 1.5 <= took < 5, f"SIGKILL came {took:.1f} s after SIGTERM, the stop timeout is 1.5 s"
        assert any("sleep 30" in line for line in reported)
        assert not sleep.is_running() or sleep.status() == psutil.STATUS_ZOMBIE
    finally:
        proc.kill()
        proc.wait(5)


def test_kept_processes_are_spared() -> None:
    value = uuid.uuid4().hex
    proc = _start("sleep 30 & wait", value)
    try:
        (sleep,) = _wait_for_sleeps(value, 1)
        reaper = Reaper(value=value)
        reaper.before = set()
        assert reaper.leftovers()
        kept = Reaper(value=value, keep=lambda: [proc.pid])
        kept.before = set()
        assert kept.leftovers() == []  # the kept pid and its descendants
        assert sleep.is_running()
    finally:
        proc.kill()
        proc.wait(5)
        sleep.kill()


def test_stop_child_ends_the_group_left_behind_by_a_child_that_exited(tmp_path: Path) -> None:
    value = uuid.uuid4().hex
    proc = _start("sleep 30 >/dev/null 2>&1 & exit 0", value, start_new_session=True)
    proc.wait(5)  # the child is gone, its sleep still runs in the child's process group
    (sleep,) = _wait_for_sleeps(value, 1)
    stop_child(Child("sleeper", proc, tmp_path / "sleeper.log"), timeout=5)
    psutil.wait_procs([sleep], timeout=5)
    assert not sleep.is_running() or sleep.status() == psutil.STATUS_ZOMBIE


def test_stop_signals_the_child_before_its_group_and_then_ends_the_group(tmp_path: Path) -> None:
    """A SIGTERM to the whole group killed the scoring job's JVM while the job still used it to cancel."""
    child, worker = start_leader(tmp_path / "said")
    try:
        assert child.stop(timeout=10) == 0
        assert (tmp_path / "said").read_text() == "worker alive"  # it handled SIGTERM with its worker there
        psutil.wait_procs([worker], timeout=5)
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE  # then the group went too
    finally:
        child.kill()


def test_stop_children_signals_them_all_first_and_waits_with_one_deadline(tmp_path: Path) -> None:
    """``make run``'s stop (Ctrl-C) stopped its children one after another: N children that ignore SIGTERM took N
    times the stop timeout."""
    stop_three_stubborn(tmp_path, lambda children: stop_children(children, timeout=2.0))


def test_stop_children_sends_each_child_one_sigterm(tmp_path: Path) -> None:
    """Every child got SIGTERM from the shutdown's first round and again from its own stop."""
    children = [start_counter(tmp_path / f"{n}.said") for n in range(2)]
    try:
        assert stop_children(children, timeout=10) == []
        assert [(tmp_path / f"{n}.said").read_text() for n in range(2)] == ["TERM\n", "TERM\n"]
        assert all(child.proc.returncode == 0 for child in children), "each ended on its own, not killed"
    finally:
        for child in children:
            child.kill()


def test_what_an_exited_child_left_in_its_group_gets_one_sigterm(tmp_path: Path) -> None:
    """The group of a child that had exited got SIGTERM from stop_child and again from the child's stop."""
    child, worker = start_left_counter(tmp_path / "said")
    try:
        stop_child(child, timeout=10)
        psutil.wait_procs([worker], timeout=5)
        assert (tmp_path / "said").read_text() == "TERM\n"
    finally:
        with contextlib.suppress(psutil.Error):
            worker.kill()


def test_a_port_check_on_a_host_name_whose_lookup_hangs_answers_within_its_time_out(
    hanging_resolver: Callable[[str], None],
) -> None:
    """The socket's time-out leaves the host name's lookup out: with a resolver that did not answer, each port check
    of `flink up` and `make up` on a host-name CG_BIND_HOST took as long as the lookup, not 0.5 s."""
    import socket

    hanging_resolver("stack.example.internal")
    started = time.monotonic()
    assert port_open("stack.example.internal", 9092, timeout=0.3) is False
    assert time.monotonic() - started < 2.0
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert port_open("127.0.0.1", listening.getsockname()[1], timeout=0.3) is True


class LongExited:
    """The ``Popen`` of a child that exited long ago and was waited for: its pid is free for another process."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def send_signal(self, sig: int) -> None:
        raise AssertionError("an exited child is not signalled")


def _stranger(script: str) -> subprocess.Popen:
    """A process leading a group of its own, not ours to stop: it got the pid a child of ours had before."""
    return subprocess.Popen(["bash", "-c", script], start_new_session=True)


def _child_that_had(pid: int, tmp_path: Path) -> Child:
    child = Child("exited-long-ago", LongExited(pid), tmp_path / "exited.log")  # type: ignore[arg-type]
    child.created = psutil.Process(pid).create_time() - 3600.0  # the child that had the pid started an hour before
    return child


def test_stopping_a_child_whose_pid_was_reused_leaves_the_new_processes_group_alone(tmp_path: Path) -> None:
    """The stop of a child that had exited long ago signalled the process group named after its pid: once that pid
    was another process's, the stop ended that process's group."""
    stranger = _stranger("sleep 30")
    try:
        assert _child_that_had(stranger.pid, tmp_path).stop(timeout=0.5) == 0
        time.sleep(0.3)
        assert stranger.poll() is None, "the stranger's group was signalled"
    finally:
        stranger.kill()
        stranger.wait(5)


def test_stop_child_of_a_child_whose_pid_was_reused_reaps_none_of_the_new_processes_children(tmp_path: Path) -> None:
    """``stop_child`` reaped the descendants of whatever process had the child's pid now."""
    stranger = _stranger("sleep 30 & wait")
    deadline = time.monotonic() + 10
    while not psutil.Process(stranger.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    [sleep] = psutil.Process(stranger.pid).children()
    try:
        assert stop_child(_child_that_had(stranger.pid, tmp_path), timeout=0.5) == []
        time.sleep(0.3)
        assert stranger.poll() is None and sleep.is_running() and sleep.status() != psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(psutil.Error):
            sleep.kill()
        stranger.kill()
        stranger.wait(5)


def test_a_child_records_when_it_started_and_its_pid_is_not_taken_for_reused_while_it_is_the_childs(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        child = Child("sleeper", proc, tmp_path / "sleeper.log")
        assert child.created == psutil.Process(proc.pid).create_time()
        assert not child.pid_reused()
    finally:
        proc.kill()
        proc.wait(5)
    assert not child.pid_reused(), "a pid no process has is not another process's"


def test_a_child_whose_stop_failed_is_logged_at_error_with_its_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop that raised (a child still there 10 s after its SIGKILL) was swallowed without a word: supervise's and
    make run's shutdown went on as if the child had stopped."""

    class Unstoppable(Child):
        def stop(self, timeout: float = 20.0) -> int | None:
            raise subprocess.TimeoutExpired(["sleep"], 10)

    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with caplog.at_level(logging.INFO, logger="infra.supervisor"):
            stop_child(Unstoppable("face-stage", proc, tmp_path / "face-stage.log"), timeout=0.1)
    finally:
        proc.kill()
        proc.wait(5)
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage().startswith(f"face-stage: did not stop (pid {proc.pid}): ")


def test_a_daemon_pools_task_stuck_past_its_stop_keeps_neither_the_stop_nor_the_process_waiting() -> None:
    """ThreadPoolExecutor's shutdown waits without a limit and its workers are joined at the interpreter's exit: a
    task stuck in one kept the process running past the stop timeout, into the supervisor's SIGKILL. A fresh process
    stops its pool with a stuck task and a queued one, and exits at once: the queued one is cancelled."""
    code = (
        "import threading, time\n"
        "from infra.processes import DaemonPool\n"
        "pool = DaemonPool(1, 'stuck')\n"
        "stuck = pool.submit(threading.Event().wait, 20)\n"
        "queued = pool.submit(time.sleep, 0)\n"
        "began = time.monotonic()\n"
        "left = pool.stop(began + 0.3)\n"
        "print(left, stuck.running(), queued.cancelled(), time.monotonic() - began < 1)\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=40, check=True)
    assert out.stdout.split() == ["2", "True", "True", "True"]
    assert time.monotonic() - started < 15, "the process waited for its stuck task"


def test_a_reap_without_a_timeout_gives_sigterm_the_supervisors_stop_timeout_not_a_fixed_10_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Reaper.finish()`` and ``reap()`` without a timeout sent SIGKILL a fixed 10 s after SIGTERM, whatever
    ``CG_SUPERVISOR__STOP_TIMEOUT_S``: a longer one cut short a process saving its state, a shorter one kept the caller
    waiting. They now take that stop timeout (here 1.5 s) from the settings."""
    import infra.processes

    configured = Settings(
        supervisor={"stop_timeout_s": 1.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.2},
        alerts={"stop_wait_s": 0.2},
    )
    monkeypatch.setattr(infra.processes, "get_settings", lambda: configured)
    value = uuid.uuid4().hex
    reaper = Reaper(value=value)
    proc = _start("trap '' TERM; sleep 30", value)  # ignores SIGTERM: only the SIGKILL ends it
    try:
        _wait_for_sleeps(value, 1)
        started = time.monotonic()
        lines = reaper.finish()
        took = time.monotonic() - started
        assert any("sleep 30" in line for line in lines)
        assert 1.4 < took < 5, f"SIGKILL came {took:.1f}s after SIGTERM, the stop timeout is 1.5s"
        assert reaper.leftovers() == []
    finally:
        proc.kill()
        proc.wait(5)


def test_what_a_child_left_outside_its_group_is_killed_by_the_stops_deadline_not_5_s_after_it(tmp_path: Path) -> None:
    """``stop_child`` gave the child's descendants outside its process group (here one in a session of its own) a
    fixed 5 s after the child's stop: with both ignoring SIGTERM, the stop took the whole stop timeout and 5 s more,
    past the shutdown's own budget. They get SIGKILL by the stop's deadline."""
    value = uuid.uuid4().hex
    script = "trap '' TERM; setsid bash -c \"trap '' TERM; sleep 30\" & wait"  # both ignore SIGTERM
    proc = _start(script, value, start_new_session=True)
    try:
        (sleep,) = _wait_for_sleeps(value, 1)
        assert os.getpgid(sleep.pid) != os.getpgid(proc.pid), "the grandchild left the child's group"
        started = time.monotonic()
        lines = stop_child(Child("stubborn", proc, tmp_path / "stubborn.log"), timeout=1.0)
        took = time.monotonic() - started
        assert any("sleep 30" in line for line in lines)
        psutil.wait_procs([sleep], timeout=2)
        assert not sleep.is_running() or sleep.status() == psutil.STATUS_ZOMBIE
        assert took < 5, f"the stop took {took:.1f}s, its timeout is 1s (5 s more: at least 6 s)"
    finally:
        proc.kill()
        proc.wait(5)
        with contextlib.suppress(psutil.Error):
            sleep.kill()


def test_what_orphans_left_under_them_is_killed_by_the_same_deadline_not_5_s_after_it() -> None:
    """``reap_orphans`` gave what ran under the orphans it stopped (a service's JVM) a fixed 5 s more after their
    SIGKILL: with both ignoring SIGTERM it took the timeout and 5 s more. Both are killed by the one deadline."""
    value = uuid.uuid4().hex
    proc = _start("trap '' TERM; sleep 30 & wait", value)  # both ignore SIGTERM
    try:
        (sleep,) = _wait_for_sleeps(value, 1)
        top = psutil.Process(proc.pid)
        started = time.monotonic()
        lines = reap_orphans([top, sleep], timeout=1.0)
        took = time.monotonic() - started
        assert len(lines) == 2
        psutil.wait_procs([sleep], timeout=2)
        assert not sleep.is_running() or sleep.status() == psutil.STATUS_ZOMBIE
        assert took < 5, f"the reap took {took:.1f}s, its timeout is 1s (5 s more: at least 6 s)"
    finally:
        proc.kill()
        proc.wait(5)
        with contextlib.suppress(psutil.Error):
            sleep.kill()


def test_a_childs_group_left_after_it_stopped_gets_sigkill_by_the_stops_deadline_not_5_s_after_it(
    tmp_path: Path,
) -> None:
    """``Child.stop`` gave what was left of the child's process group at least 5 s after the child had gone: a child
    that stopped just before its deadline, leaving a member that ignores SIGTERM, ran 5 s past the stop timeout."""
    value = uuid.uuid4().hex
    script = "trap 'sleep 0.6; exit 0' TERM; (trap '' TERM; exec sleep 30) & wait"  # its member ignores SIGTERM
    proc = _start(script, value, start_new_session=True)
    try:
        (sleep,) = _wait_for_sleeps(value, 1)
        assert os.getpgid(sleep.pid) == os.getpgid(proc.pid)
        started = time.monotonic()
        assert Child("late", proc, tmp_path / "late.log").stop(timeout=1.0) == 0
        took = time.monotonic() - started
        psutil.wait_procs([sleep], timeout=2)
        assert not sleep.is_running() or sleep.status() == psutil.STATUS_ZOMBIE
        assert took < 3, f"the stop took {took:.1f}s, its timeout is 1s (5 s more for the group: at least 5.6 s)"
    finally:
        proc.kill()
        proc.wait(5)
        with contextlib.suppress(psutil.Error):
            sleep.kill()


def test_a_killed_child_and_reaped_processes_are_waited_for_a_short_bounded_time_after_sigkill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After SIGKILL ``Child.stop`` waited 10 s for the child and ``reap`` 5 s for what it killed: a process stuck in an
    uninterruptible call kept the stop that long past its timeout. They wait :data:`KILL_WAIT_S`, and reap the child
    (no zombie is left)."""
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 30"], start_new_session=True)
    waits: list[float | None] = []
    real_wait = proc.wait

    def wait(timeout: float | None = None) -> int:
        waits.append(timeout)
        return real_wait(timeout)

    monkeypatch.setattr(proc, "wait", wait)
    try:
        time.sleep(0.2)
        assert Child("stubborn", proc, tmp_path / "stubborn.log").stop(timeout=0.3) == -9
        assert waits[1:] == [KILL_WAIT_S] and KILL_WAIT_S <= 1.0
        assert proc.returncode == -9  # waited for: no zombie
    finally:
        proc.kill()
        real_wait(5)

    import infra.processes

    kill_waits: list[float | None] = []
    real_wait_procs = psutil.wait_procs

    def wait_procs(procs, timeout=None):  # type: ignore[no-untyped-def]
        kill_waits.append(timeout)
        return real_wait_procs(procs, timeout=timeout)

    monkeypatch.setattr(infra.processes.psutil, "wait_procs", wait_procs)
    value = uuid.uuid4().hex
    left = _start("trap '' TERM; exec sleep 30", value)
    try:
        (sleep,) = _wait_for_sleeps(value, 1)
        assert reap([(sleep.pid, sleep.create_time())], timeout=0.3)
        assert kill_waits == [0.3, KILL_WAIT_S]
        assert left.poll() is not None  # the reaped child was waited for: no zombie
    finally:
        left.kill()
        left.wait(5)


def test_a_stop_asked_by_sigterm_is_timed_at_its_arrival_though_the_main_thread_is_blocked_in_a_c_call() -> None:
    """A service's loop blocked in a C call that outlives signals (librdkafka's synchronous commit waits on a lock,
    here a pthread mutex another thread holds for 1.5 s) runs a Python signal handler only once the call returns: the
    stop's deadline, taken then, did not count the wait. :func:`stop_on_signals` times the stop at the signal."""
    code = """
import ctypes, os, signal, threading, time
from infra.processes import StopRequest, stop_asked_at, stop_on_signals
libc = ctypes.CDLL(None)
mutex = ctypes.create_string_buffer(128)
libc.pthread_mutex_init(mutex, None)
stop = StopRequest()
stop_on_signals(stop, (signal.SIGTERM,))
held, sent = threading.Event(), []
def hold():
    libc.pthread_mutex_lock(mutex)
    held.set()
    time.sleep(0.3)  # the main thread is blocked by now
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.2)
    libc.pthread_mutex_unlock(mutex)
threading.Thread(target=hold).start()
held.wait()
libc.pthread_mutex_lock(mutex)  # blocked in C (the GIL released) until the holder lets go
time.sleep(0.1)  # Python again: the handler has run
print(stop.is_set(), round(stop_asked_at(stop) - sent[0], 2))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    is_set, after = out.stdout.split()
    assert is_set == "True"
    assert float(after) < 0.5, f"the stop was timed {after}s after its SIGTERM, when the blocked call returned"


def test_a_stop_requests_exit_deadline_counts_from_its_asking_and_is_none_before() -> None:
    """The services' last Kafka calls at a stop are given up 1 s before the SIGKILL, which counts from the stop's
    asking, not from when the service looks; while running there is no limit."""
    stop = StopRequest()
    assert stop.exit_by(20.0) is None
    stop.set()
    asked = stop.asked_at
    assert asked is not None
    time.sleep(0.05)
    stop.set()  # asked again: the first asking counts
    assert stop.exit_by(20.0) == asked + 20.0 - EXIT_MARGIN_S
