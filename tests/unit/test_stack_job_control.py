"""The job's control file names its process by pid and start time; a stale one is "not running"."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from jobs.flink.job import running_job, write_control
from jobs.flink.upgrade import stop_with_savepoint


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen]:
    """An unrelated process that a SIGUSR1 would end (the signal's default action)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_control_file_written_by_this_process_names_a_running_job(tmp_path: Path) -> None:
    control = tmp_path / "job.json"
    write_control(control, "job-1")
    info = running_job(control)
    assert info is not None
    assert info["pid"] == psutil.Process().pid and info["job_id"] == "job-1"


def test_a_reused_pid_is_not_the_job_and_is_never_signalled(tmp_path: Path, bystander: subprocess.Popen) -> None:
    control = tmp_path / "job.json"
    started = psutil.Process(bystander.pid).create_time()
    control.write_text(json.dumps({"pid": bystander.pid, "started": started - 3600, "job_id": "killed"}))
    assert running_job(control) is None
    with pytest.raises(RuntimeError, match="stale"):
        stop_with_savepoint(control, tmp_path, timeout=1)
    assert bystander.poll() is None, "the process that now has the old pid got SIGUSR1"


def test_a_control_file_without_a_start_time_is_stale(tmp_path: Path, bystander: subprocess.Popen) -> None:
    control = tmp_path / "job.json"
    control.write_text(json.dumps({"pid": bystander.pid, "job_id": "written-by-an-older-version"}))
    assert running_job(control) is None
    with pytest.raises(RuntimeError, match="stale"):
        stop_with_savepoint(control, tmp_path, timeout=1)
    assert bystander.poll() is None


def test_the_file_of_a_process_that_is_gone_means_not_running(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    control = tmp_path / "job.json"
    control.write_text(json.dumps({"pid": gone.pid, "started": 0.0, "job_id": "killed"}))
    assert running_job(control) is None
    with pytest.raises(RuntimeError, match="stale"):
        stop_with_savepoint(control, tmp_path, timeout=1)


def test_no_control_file_means_not_running(tmp_path: Path) -> None:
    assert running_job(tmp_path / "job.json") is None
    with pytest.raises(RuntimeError, match="missing"):
        stop_with_savepoint(tmp_path / "job.json", tmp_path, timeout=1)


def _on(tmp_path: Path, **job: object):
    from infra.settings import Settings

    settings = Settings(stack_dir=tmp_path)
    return settings.model_copy(update={"job": settings.job.model_copy(update={"checkpoint_dir": tmp_path, **job})})


def test_a_second_job_on_the_checkpoint_dir_of_a_running_one_is_refused(
    tmp_path: Path, bystander: subprocess.Popen
) -> None:
    """A job started beside the live one (a layout switch "from a time") resumed from the live job's newest
    checkpoint, with its offsets, and overwrote its control file, so `upgrade savepoint` stopped the new one."""
    from jobs.flink.job import control_file, shared_checkpoint_dir

    settings = _on(tmp_path)
    live = psutil.Process(bystander.pid)
    control_file(settings).write_text(json.dumps({"pid": live.pid, "started": live.create_time(), "job_id": "j"}))
    problem = shared_checkpoint_dir(settings)
    assert problem is not None and f"pid {live.pid}" in problem and "CG_JOB__CHECKPOINT_DIR" in problem


def test_a_job_may_start_on_a_checkpoint_dir_whose_control_file_is_stale_or_its_own(tmp_path: Path) -> None:
    from jobs.flink.job import control_file, shared_checkpoint_dir

    settings = _on(tmp_path)
    assert shared_checkpoint_dir(settings) is None  # none
    control_file(settings).write_text(json.dumps({"pid": 2**22 + 7, "started": 1.0, "job_id": "killed"}))
    assert shared_checkpoint_dir(settings) is None  # a killed job's
    write_control(control_file(settings), "me")
    assert shared_checkpoint_dir(settings) is None  # this process's own


def test_a_start_time_is_named_as_ignored_when_the_job_restores_state(tmp_path: Path) -> None:
    from jobs.flink.job import ignored_start

    restored = tmp_path / "savepoints" / "savepoint-1"
    at_time = _on(tmp_path, starting_offsets="1764000000000")
    warning = ignored_start(at_time, restored)
    assert warning is not None and "CG_JOB__STARTING_OFFSETS=1764000000000 is ignored" in warning
    assert "CG_JOB__CHECKPOINT_DIR" in warning
    assert ignored_start(at_time, None) is None, "no state to restore: the time is where it starts"
    assert ignored_start(_on(tmp_path), restored) is None, "the default start says nothing"


def test_a_sigterm_cancels_the_job_but_gives_the_cancel_up_before_the_supervisors_sigkill(tmp_path: Path) -> None:
    """On SIGTERM the job waited for Flink's cancel as long as it took (a task that does not end: Flink waits minutes
    for it), past the supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM). The cancel is given
    up with a WARNING 1 s before it; the next start resumes from the last checkpoint."""
    import subprocess
    import sys

    from infra.settings import REPO_ROOT

    code = f"""
import logging, os, signal, threading, time
from infra.settings import Settings
from jobs.flink import job

logging.basicConfig(level=logging.INFO)
settings = Settings(
    stack_dir={str(tmp_path)!r}, supervisor={{"stop_timeout_s": 2.5}}, cameras={{"bridge_stop_grace_s": 1.0}},
    kafka={{"stop_flush_s": 0.5}}, alerts={{"stop_wait_s": 0.2}},
)
settings.checkpoint_dir.mkdir(parents=True)

class Answer:
    def __init__(self, value, hang=0.0):
        self.value, self.hang = value, hang
    def result(self):
        time.sleep(self.hang)  # the JVM does not answer
        return self.value

class Client:
    def get_job_id(self):
        return "job-1"
    def get_job_status(self):
        return Answer("RUNNING")
    def cancel(self):
        return Answer(None, hang=8.0)

sent = []
def sigterm():
    time.sleep(0.3)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=sigterm, daemon=True).start()
job.run_until_done(Client(), settings)
print(round(time.monotonic() - sent[0], 2))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    took = float(out.stdout.split()[-1])
    assert took < 1.7, f"the job stopped {took}s after its SIGTERM; the SIGKILL comes at 2.5 s"
    assert "its cancel was not done before the supervisor's stop timeout" in out.stderr
