"""Production mode (``python -m infra.production``, ``checkout-guard supervise``) on the real local stack: the
OpenSearch sink and the alert sender, supervised. A child killed with SIGKILL is back (a new pid, /healthz 200)
within seconds; SIGTERM to the supervisor stops everything, exit 0, and no process of the run is left."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from infra import metrics, processes
from infra.clients.opensearch import make_client
from infra.launcher import Child, spawn, wait_for
from infra.settings import Settings
from infra.stack import ensure_topics
from tests.e2e.camera_helpers import delete_topics
from tests.ports import free_port_block

pytestmark = pytest.mark.e2e

SERVICES = {"opensearch-sink": "sinks.opensearch.sink", "alert-sender": "sinks.alerts.sender"}
BACK_WITHIN_S = 30.0


def healthz(settings: Settings, name: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{metrics.port_of(settings, name)}/healthz", timeout=2).status_code
    except httpx.HTTPError:
        return None


def child_pid(supervisor_pid: int, module: str) -> int | None:
    """The pid of the supervisor's live child running ``module`` (its direct child: spawn's process)."""
    try:
        children = psutil.Process(supervisor_pid).children()
    except psutil.Error:
        return None
    for proc in children:
        with contextlib.suppress(psutil.Error):
            if f"-m {module}" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc.pid
    return None


def alive_marked(value: str) -> list[str]:
    found = []
    for proc in processes.marked(processes.MARKER, value):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(processes.describe(proc))
    return found


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Topics, indices, group, ledger, mail recipient and metrics ports of this test only; quick restarts."""
    name = f"e2eprod{uuid.uuid4().hex[:6]}"
    s = stack.isolated(name, tmp_path / "checkpoints")
    s = s.model_copy(
        update={
            "stack_dir": tmp_path / "stack",  # the children's logs; neither process needs the stack's files
            "alerts": s.alerts.model_copy(
                update={"channels": "email", "ledger_path": tmp_path / "ledger.sqlite3", "stop_wait_s": 4.0}
            ),
            "smtp": s.smtp.model_copy(update={"to_addresses": f"{name}@checkout-guard.test"}),
            "metrics": s.metrics.model_copy(update={"base_port": free_port_block(len(metrics.PROCESSES))}),
            "supervisor": s.supervisor.model_copy(
                update={"backoff_s": 0.5, "health_interval_s": 1.0, "stop_timeout_s": 10.0}
            ),
            # the graces stay below the stop timeout, the alert sender's wait and flush together (else refused at start)
            "kafka": s.kafka.model_copy(update={"stop_flush_s": 4.0}),  # 4 + 4 below 10 less the last commit's 1 s
            "cameras": s.cameras.model_copy(update={"bridge_stop_grace_s": 5.0}),
        }
    )
    ensure_topics(s)
    yield s
    delete_topics(s)
    with contextlib.suppress(Exception):
        make_client(s.opensearch).indices.delete(index=f"{s.opensearch.index_prefix}-*", ignore_unavailable=True)


def test_a_killed_child_is_back_within_seconds_and_sigterm_stops_everything(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = f"e2e-production-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(processes.MARKER, run)  # inherited by the supervisor and everything under it
    supervisor: Child = spawn("infra.production", settings, "--only", ",".join(SERVICES), name=f"{run}-supervise")
    try:
        for name in SERVICES:
            wait_for(lambda n=name: healthz(settings, n) == 200, 120, what=f"{name} /healthz 200")
        killed = child_pid(supervisor.proc.pid, SERVICES["opensearch-sink"])
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        t0 = time.monotonic()

        def back() -> int | None:
            pid = child_pid(supervisor.proc.pid, SERVICES["opensearch-sink"])
            return pid if pid not in (None, killed) and healthz(settings, "opensearch-sink") == 200 else None

        new_pid = wait_for(back, BACK_WITHIN_S, what="the killed sink back with a new pid and /healthz 200")
        print(f"sink pid {killed} killed, pid {new_pid} healthy after {time.monotonic() - t0:.1f} s")
        assert healthz(settings, "alert-sender") == 200, "the other child was left alone"

        os.kill(supervisor.proc.pid, signal.SIGTERM)
        assert supervisor.proc.wait(60) == 0
        assert alive_marked(run) == [], "a process of the run outlived the supervisor"
        log = supervisor.log_path.read_text(errors="replace")
        port = metrics.port_of(settings, "opensearch-sink")
        assert f"health http://127.0.0.1:{port}/healthz" in log, "where each process's endpoint is"
        assert "opensearch-sink: exited with code -9; restarting" in log
    finally:
        supervisor.kill()
        processes.reap({k for p in processes.marked(processes.MARKER, run) if (k := processes.key(p))})
