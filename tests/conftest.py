"""Every test tier: a developer's ``.env`` never changes what a test sees (CI has none).

``get_settings()`` reads ``CG_ENV_FILE`` (default: the repo's ``.env``); empty means no file. The
environment itself still applies, so CI's port variables reach the end-to-end tests and their children.

No test may leave a process running: at the end of the session every process descending from this one or
carrying its marker (:data:`infra.processes.MARKER`, inherited by whatever the tests start, so orphans count
too) that was not there at the start is stopped and the session fails naming it. Spared: the local stack's
services (shared, meant to outlive the run) and what ends with this interpreter (PyFlink's gateway JVM,
multiprocessing's helpers).
"""

from __future__ import annotations

import os
import time
import uuid

import psutil
import pytest

from infra import processes

os.environ["CG_ENV_FILE"] = ""
RUN = os.environ[processes.MARKER] = f"pytest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""This session's own marker value (never an outer run's: its other processes are not ours to stop)."""
ENDS_WITH_US = ("org.apache.flink.client.python.PythonGatewayServer", "multiprocessing.resource_tracker")
_before: set[processes.ProcKey] = set()


def _ours() -> set[processes.ProcKey]:
    return processes.snapshot() | processes.snapshot(marker=processes.MARKER, value=RUN)


def _spared() -> set[int]:
    from infra.settings import get_settings
    from infra.stack import KAFKA_NODE_NAMES, SERVICES, StackPaths, service_process

    paths = StackPaths.of(get_settings())
    services = (*SERVICES, *KAFKA_NODE_NAMES)  # with CG_KAFKA__BROKERS=3 the stack's Kafka is three processes
    pids = [proc.pid for svc in services if (proc := service_process(svc, paths)) is not None]
    for proc in processes.descendants(os.getpid()):
        try:
            if any(part in " ".join(proc.cmdline()) for part in ENDS_WITH_US):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return processes.tree(pids)


def pytest_sessionstart(session: pytest.Session) -> None:
    _before.update(_ours())


EXIT_GRACE_S = 15.0
"""How long new processes get to end by themselves before they count as left running: the Python workers of an
in-process Flink job (``beam_boot`` and its log ``tee``) go some seconds after the job, so a session whose last
test was a pipeline test found them still there."""


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    deadline = time.monotonic() + EXIT_GRACE_S
    while processes.new_processes(_before, _ours(), keep=_spared()) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes.reap(processes.new_processes(_before, _ours(), keep=_spared()))
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        write = getattr(session.config.pluginmanager.get_plugin("terminalreporter"), "write_line", print)
        write(f"\nFAILED: {len(left)} processes started by the tests were still running (now stopped):")
        for line in left:
            write(f"  {line}")
