"""``make run``'s supervision (infra/demo.py) with real processes: what a crashed process left in its process group
is stopped before the process is started again."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from infra import demo
from infra.launcher import Child
from infra.processes import EXIT_MARGIN_S, Reaper
from infra.settings import Settings, SupervisorSettings
from tests.process_trees import STUBBORN, start_left_counter, start_stubborn

_LEAVER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)  # in its group, as a JVM
worker.stdout.readline()  # it ignores SIGTERM now
print(worker.pid, flush=True)
time.sleep(60)
"""


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _quick_stop(timeout_s: float) -> Settings:
    """A short stop timeout, with the bridge's, the shoppers' and the alert sender's graces within it (else
    refused)."""
    spare = timeout_s - EXIT_MARGIN_S  # the alert sender's last commit ends that long before the SIGKILL
    return Settings(
        supervisor=SupervisorSettings(stop_timeout_s=timeout_s),
        cameras={"bridge_stop_grace_s": timeout_s / 2},
        kafka={"stop_flush_s": spare / 4},
        alerts={"stop_wait_s": spare / 2},
    )


def test_make_run_stops_what_a_crashed_process_left_in_its_group_before_restarting_it(tmp_path: Path) -> None:
    """The demo restarted a crashed scoring job beside its predecessor's JVM, which was stopped only at the end."""
    settings = _quick_stop(1.5)
    watch = demo._supervision(settings, True, logging.getLogger("test.demo"))
    spawned: list[tuple[Child, psutil.Process]] = []
    left_at_restart: list[bool] = []

    def start() -> Child:
        left_at_restart.append(any(_running(worker) for _, worker in spawned))
        proc = subprocess.Popen(
            [sys.executable, "-c", _LEAVER, STUBBORN], start_new_session=True, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        worker = psutil.Process(int(proc.stdout.readline()))
        proc.stdout.close()
        spawned.append((Child("scoring-job", proc, tmp_path / "job.log"), worker))
        return spawned[-1][0]

    try:
        watch.supervisor.add("scoring-job", start)
        job, worker = spawned[0]
        job.proc.kill()  # a crash: its worker runs on in its group
        job.proc.wait(5)
        deadline = time.monotonic() + 20
        while len(spawned) == 1 and time.monotonic() < deadline:
            watch.check()
            time.sleep(0.1)
        assert len(spawned) == 2 and spawned[1][0].alive, "restarted"
        assert left_at_restart == [False, False], "what the crashed process left was stopped before its restart"
    finally:
        watch.close()
        for child, left in spawned:
            child.kill()
            with contextlib.suppress(psutil.Error):
                left.kill()


def test_make_run_restarts_with_the_supervisor_settings(tmp_path: Path) -> None:
    """make run's supervisor took its own defaults (1 s backoff, 5 restarts in 10 minutes) whatever the
    CG_SUPERVISOR__* settings said: here a process that exits is to stay down, and it was restarted after 1 s."""
    settings = Settings(supervisor=SupervisorSettings(backoff_s=0.2, max_backoff_s=0.2, max_restarts=1))
    watch = demo._supervision(settings, True, logging.getLogger("test.demo"))
    started: list[Child] = []

    def start() -> Child:
        started.append(Child("shoppers", subprocess.Popen([sys.executable, "-c", "pass"]), tmp_path / "s.log"))
        return started[-1]

    try:
        watch.supervisor.add("shoppers", start)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            watch.check()
            time.sleep(0.05)
        assert len(started) == 2, f"{len(started)} starts: one restart (CG_SUPERVISOR__MAX_RESTARTS=1)"
        assert "DOWN" in watch.supervisor.describe()
    finally:
        watch.close()


def test_make_run_stops_its_processes_at_the_supervisor_stop_timeout(tmp_path: Path) -> None:
    """make run's shutdown waited 20 s for a process that ignores SIGTERM, whatever CG_SUPERVISOR__STOP_TIMEOUT_S."""
    settings = _quick_stop(1.5)
    watch = demo._supervision(settings, True, logging.getLogger("test.demo"))
    child = start_stubborn("local-camera", tmp_path / "camera.log")
    try:
        watch.supervisor.add("local-camera", lambda: child)
        started = time.monotonic()
        demo._stop(settings, watch, Reaper(marker=None, value=None))
        took = time.monotonic() - started
    finally:
        child.kill()
    assert child.proc.returncode == -signal.SIGKILL and took < 5.0, f"{took:.1f} s"


def test_make_run_shutdown_waits_for_the_stop_of_what_a_crashed_process_left_instead_of_signalling_it_again(
    tmp_path: Path,
) -> None:
    """The stop of what a crashed process left, begun beside the loop before its restart, ran on at Ctrl-C beside the
    shutdown's own stop of the same process, so its process group got SIGTERM from both."""
    settings = _quick_stop(2.0)
    watch = demo._supervision(settings, True, logging.getLogger("test.demo"))
    reaper = Reaper(marker=None, value=None)
    child, worker = start_left_counter(tmp_path / "said")  # crashed: its worker runs on in its group
    try:
        watch.supervisor.add("scoring-job", lambda: child)
        watch.check()  # the exit is noticed: what it left is being stopped beside the loop
        started = time.monotonic()
        demo._stop(settings, watch, reaper)
        took = time.monotonic() - started
        psutil.wait_procs([worker], timeout=5)
        assert (tmp_path / "said").read_text() == "TERM\n", "one SIGTERM to what it left"
        assert not _running(worker) and took < 5.0, f"{took:.1f} s"
    finally:
        with contextlib.suppress(psutil.Error):
            worker.kill()


def test_make_run_gives_what_its_processes_left_running_the_supervisor_stop_timeout_before_sigkill() -> None:
    """What make run's processes left outside their process groups got SIGKILL 10 s after its SIGTERM, whatever
    ``CG_SUPERVISOR__STOP_TIMEOUT_S`` (supervise's shutdown gave it the stop timeout)."""
    settings = _quick_stop(1.5)
    watch = demo._supervision(settings, True, logging.getLogger("test.demo"))
    reaped: list[float] = []

    class Reaping(Reaper):
        def finish(self, timeout: float = 10.0) -> list[str]:
            reaped.append(timeout)
            return []

    assert demo._stop(settings, watch, Reaping(marker=None, value=None)) == []
    assert reaped == [1.5]
