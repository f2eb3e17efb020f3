"""Start the pipeline's Python processes (the Flink job, the sinks) as children with given settings.

Used by ``make run``, the end-to-end tests and the benchmark. Each child runs in its own process
group, so killing it also ends the JVM and the Python workers PyFlink starts underneath.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.settings import REPO_ROOT, Settings


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the job's JVM and Python workers too)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not go in time; returns the exit code."""
        self.kill(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            return self.proc.wait(10)


def spawn(module: str, settings: Settings, *args: str, name: str | None = None) -> Child:
    """Run ``python -m <module> [args]`` with ``settings`` passed down as ``CG_*`` variables."""
    name = name or module.rsplit(".", 1)[-1]
    log_dir = settings.stack_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    # Not our settings (they come from ``settings``), nor PyFlink's internal markers: a process that
    # ran a job in-process (a test) has PYFLINK_GATEWAY_DISABLED set, which would stop the child.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CG_", "PYFLINK_", "_PYFLINK"))}
    env.update(settings.to_env())
    # The Flink JVM's own log (task failures, restarts) beside the child's, not inside the venv.
    env["FLINK_LOG_DIR"] = str(log_dir / f"{name}.flink")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def start_scoring_job(settings: Settings, name: str = "scoring-job") -> Child:
    return spawn("jobs.flink.job", settings, name=name)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
