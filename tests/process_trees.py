"""A child process that, like the scoring job, still needs its worker (its JVM) while it handles SIGTERM:
for tests of how services are stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from infra.launcher import Child

_LEADER = """
import os, signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def on_term(*_):  # as the scoring job: on SIGTERM it still needs its JVM, to cancel the Flink job
    time.sleep(0.3)
    open(sys.argv[1], "w").write("worker alive" if worker.poll() is None else "worker gone")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1], "w").write("ready")
time.sleep(60)
"""


def start_leader(said: Path) -> tuple[Child, psutil.Process]:
    """A child that, like the scoring job, still needs its worker (the JVM) while it handles SIGTERM; it
    writes to ``said`` whether the worker was alive then."""
    proc = subprocess.Popen([sys.executable, "-c", _LEADER, str(said)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (said.exists() and said.read_text() == "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    [worker] = psutil.Process(proc.pid).children()
    return Child("leader", proc, said.with_suffix(".log")), worker


STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
"""A process that ignores SIGTERM: its stop takes the whole stop timeout."""


def start_stubborn(name: str, log: Path) -> Child:
    """A child in its own session that ignores SIGTERM (returns once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    return Child(name, proc, log)


def stop_three_stubborn(tmp_path: Path, stop: Callable[[list[Child]], object]) -> None:
    """Start three children that ignore SIGTERM, ``stop`` them (a 2 s timeout is the caller's), and check they were
    killed at one shared deadline: one after another would take at least 6 s."""
    children = [start_stubborn(f"stubborn-{n}", tmp_path / f"{n}.log") for n in range(3)]
    started = time.monotonic()
    try:
        stop(children)
        took = time.monotonic() - started
    finally:
        for child in children:
            child.kill()
    assert all(child.proc.returncode == -signal.SIGKILL for child in children), "killed at the deadline"
    assert took < 5.0, f"{took:.1f} s: one after another takes at least 6 s"


_COUNTER = """
import signal, sys, time
said, end = open(sys.argv[1], "a", buffering=1), []
def on_term(*_):  # counts each SIGTERM; stops half a second after the first (a service finishing its work)
    said.write("TERM\\n")
    end.append(time.monotonic() + 0.5)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while not end or time.monotonic() < end[0]:
    time.sleep(0.02)
"""


def start_counter(said: Path) -> Child:
    """A child in its own session that writes a line to ``said`` for each SIGTERM it gets and exits half a second
    after the first one (returns once it listens)."""
    proc = subprocess.Popen([sys.executable, "-c", _COUNTER, str(said)], start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    proc.stdout.close()
    return Child(said.stem, proc, said.with_suffix(".log"))


_LEFT_COUNTER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE)  # its group
worker.stdout.readline()
print(worker.pid, flush=True)
time.sleep(60)
"""


def start_left_counter(said: Path) -> tuple[Child, psutil.Process]:
    """A child whose worker (in its process group, as a JVM) counts its SIGTERMs in ``said`` as :func:`start_counter`'s
    child does; the child is killed, so the worker is what it left running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEFT_COUNTER, _COUNTER, str(said)], start_new_session=True, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    worker = psutil.Process(int(proc.stdout.readline()))
    proc.stdout.close()
    proc.kill()
    proc.wait(5)
    return Child(said.stem, proc, said.with_suffix(".log")), worker
