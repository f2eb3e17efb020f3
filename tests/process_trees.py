"""A child process that, like the scoring job, still needs its worker (its JVM) while it handles SIGTERM:
for tests of how services are stopped."""

from __future__ import annotations

import subprocess
import sys
import time
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
