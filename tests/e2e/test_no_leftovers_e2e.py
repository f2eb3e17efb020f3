"""``make run`` reports every process to Prometheus and leaves nothing behind: started as a subprocess in its own
process group (CG_* settings of the environment passed through, so CI's ports apply), given time to start all
its processes, then Ctrl-C (SIGINT to the group, as a terminal sends it). While it runs, every metrics
endpoint answers and the dashboard's pipeline-health answer (the stack's Prometheus, reloaded with the run's
ports) has all targets up, records per second and consumer lag; afterwards no process carrying the run's
marker (:data:`infra.processes.MARKER`, inherited by every process it starts, orphans included) is running.

The run is isolated like the other end-to-end tests: its own topic prefix, index prefix, consumer groups,
checkpoints, alert ledger, mail recipient, MQTT topic prefix and listening ports; the stack itself is the
session's (``make -o setup``: the session already runs with an installed environment)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from infra import metrics, processes
from infra.clients.opensearch import make_client
from infra.local.smtp import mail_dir
from infra.settings import REPO_ROOT, Settings
from tests.e2e.camera_helpers import delete_topics
from tests.e2e.test_production_e2e import alive_marked
from tests.ports import free_port, free_port_block

pytestmark = pytest.mark.e2e

MODULES = (
    "infra.local.webex",
    "infra.local.camera",
    "producers.camera_bridge",
    "jobs.faces.stage",
    "jobs.flink.job",
    "sinks.opensearch.sink",
    "jobs.faces.watchlist_service",
    "jobs.cases.service",
    "sinks.alerts.sender",
    "jobs.bot.webex_bot",
    "sinks.dashboard",
    "producers.shoppers",
)
"""Every process ``make run`` starts (python -m ...); the scoring job's JVM comes on top."""
START_S = 150.0
"""~60-90 s on an idle 2-core machine; more when other tests load it."""
HEALTH_S = 90.0
"""From everything started to Prometheus's rates showing it (1 s scrapes; the job's first decisions)."""


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running(run: str) -> set[str]:
    """What of :data:`MODULES` (and ``java``, the job's JVM) runs with the run's marker."""
    seen = set()
    for proc in processes.marked(processes.MARKER, run):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            seen |= {m for m in MODULES if f"-m {m}" in " ".join(cmd)}
            if cmd and Path(cmd[0]).name == "java":
                seen.add("java")
    return seen


@pytest.fixture
def isolated_env(stack: Settings, tmp_path: Path) -> Iterator[tuple[dict[str, str], Settings]]:
    name = f"e2eleft{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,  # CI's CG_* ports and anything else of the session's environment
        "CG_KAFKA__TOPIC_PREFIX": f"{name}.",
        "CG_OPENSEARCH__INDEX_PREFIX": name,
        "CG_JOB__CONSUMER_GROUP": name,
        "CG_JOB__CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "CG_ALERTS__LEDGER_PATH": str(tmp_path / "ledger.sqlite3"),
        "CG_SMTP__TO_ADDRESSES": f"{name}@checkout-guard.test",
        "CG_CAMERAS__MQTT_TOPIC_PREFIX": name,
        "CG_CAMERAS__LOCAL_PORT": str(free_port()),
        "CG_WEBEX__LOCAL_PORT": str(free_port()),
        "CG_WEBEX__BOT_PORT": str(free_port()),
        "CG_DASHBOARD__PORT": str(free_port()),
        "CG_METRICS__BASE_PORT": str(free_port_block(len(metrics.PROCESSES))),
        "CG_METRICS__SCRAPE_INTERVAL_S": "1",  # the stack's Prometheus follows (reloaded by make run's `up`)
        "COLUMNS": "120",
    }
    settings = stack.isolated(name, tmp_path / "checkpoints")
    yield env, settings
    delete_topics(settings)
    with contextlib.suppress(Exception):
        make_client(settings.opensearch).indices.delete(index=f"{name}-*", ignore_unavailable=True)
    for path in mail_dir(settings.stack_dir).glob("*.eml"):  # the stack's mailbox is the demo's too
        with contextlib.suppress(OSError), path.open("rb") as fh:
            if f"{name}@checkout-guard.test".encode() in fh.read(4096):
                path.unlink()


def pipeline_health(dashboard_port: int) -> dict | None:
    """The dashboard's pipeline-health answer (from the stack's Prometheus), ``None`` while it is not there."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{dashboard_port}/api/pipeline", timeout=5)
        return answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def everything_reported(health: dict | None) -> bool:
    """Every process a Prometheus target that is up, records flowing in and decisions coming out of the
    job, and a lag figure for the consumer groups."""
    if not health or health.get("error"):
        return False
    summary = health["summary"]
    return (
        {t["process"] for t in health["targets"] if t["up"]} == set(metrics.PROCESSES)
        and (summary["records_in_per_s"] or 0) > 0
        and (summary["decisions_per_s"] or 0) > 0
        and len(health["lag"]) > 0
    )


def test_make_run_reports_every_process_to_prometheus_and_ctrl_c_leaves_none_running(
    isolated_env: tuple[dict[str, str], Settings], tmp_path: Path
) -> None:
    env, _ = isolated_env
    run = f"e2e-make-run-{uuid.uuid4().hex[:8]}"
    env[processes.MARKER] = run
    output = tmp_path / "make-run.out"
    with output.open("wb") as out:
        make = subprocess.Popen(
            ["make", "-s", "-o", "setup", "run"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the SIGINT a terminal's Ctrl-C sends to it
        )
    try:
        deadline = time.monotonic() + START_S
        job_port = int(env["CG_METRICS__BASE_PORT"]) + metrics.PROCESSES["scoring-job"]
        # Up: every process there and the job's mini-cluster running (its Prometheus reporter answers).
        while not ((seen := running(run)) == {*MODULES, "java"} and answers(job_port)) and time.monotonic() < deadline:
            assert make.poll() is None, f"make run ended early:\n{output.read_text(errors='replace')[-4000:]}"
            time.sleep(2)
        started_s = START_S - (deadline - time.monotonic())
        # Running: every metrics endpoint answers and the pipeline-health page (Prometheus behind it) shows
        # all targets up, throughput and lag. Asked only when everything started (else the last assert says so).
        health = None
        if seen == {*MODULES, "java"}:
            base = int(env["CG_METRICS__BASE_PORT"])
            silent = [p for p, offset in metrics.PROCESSES.items() if not answers(base + offset)]
            assert silent == [], f"metrics endpoints not answering: {silent}"
            until = time.monotonic() + HEALTH_S
            while not everything_reported(health := pipeline_health(int(env["CG_DASHBOARD__PORT"]))):
                assert time.monotonic() < until, f"pipeline health after {HEALTH_S:.0f} s: {health}"
                time.sleep(2)
            print(f"pipeline health: {health['summary']}")
        os.killpg(make.pid, signal.SIGINT)
        make.wait(240)
        text = output.read_text(errors="replace")
        print(f"make run: {len(seen)} processes up after {started_s:.0f} s; exit {make.returncode}\n{text[-1500:]}")
        left = alive_marked(run)
        assert left == [], f"make run left processes running after Ctrl-C: {left}\n{text[-3000:]}"
        assert "Stopped." in text and "Traceback" not in text, text[-4000:]
        assert seen == {*MODULES, "java"}, f"not started within {START_S:.0f} s: {sorted({*MODULES, 'java'} - seen)}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)
        make.wait(30)
        processes.reap({k for p in processes.marked(processes.MARKER, run) if (k := processes.key(p))})
