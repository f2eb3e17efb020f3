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
