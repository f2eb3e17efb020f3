"""Checkpoints of earlier runs and old savepoints are purged at start, where what the job restores from stays, and
hourly while it runs, where only the newest complete one stays."""

from __future__ import annotations

import os
from pathlib import Path

from jobs.flink.job import purge_stale_state

HOUR = 3600.0
NOW = 1_800_000_000.0


def _checkpoint(root: Path, name: str, age_h: float) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    meta = folder / "_metadata"
    meta.write_bytes(b"state with buyers' faces")
    os.utime(meta, (NOW - age_h * HOUR, NOW - age_h * HOUR))
    return folder


def test_old_checkpoints_of_earlier_runs_and_old_savepoints_go_and_the_restored_one_stays(tmp_path: Path) -> None:
    killed = _checkpoint(tmp_path, "job-a/chk-7", age_h=100)
    restored = _checkpoint(tmp_path, "job-b/chk-3", age_h=200)  # old, but this run starts from it
    recent = _checkpoint(tmp_path, "job-c/chk-9", age_h=1)
    old_savepoint = _checkpoint(tmp_path, "savepoints/savepoint-1", age_h=80)
    new_savepoint = _checkpoint(tmp_path, "savepoints/savepoint-2", age_h=2)

    gone = purge_stale_state(tmp_path, restored, older_than_s=72 * HOUR, now=NOW)

    assert sorted(p.name for p in gone) == ["job-a", "savepoint-1"]
    assert not killed.exists() and not old_savepoint.exists()
    assert restored.exists() and recent.exists() and new_savepoint.exists()


def test_a_restored_savepoint_stays_and_zero_keeps_everything(tmp_path: Path) -> None:
    savepoint = _checkpoint(tmp_path, "savepoints/savepoint-9", age_h=500)
    old = _checkpoint(tmp_path, "job-a/chk-1", age_h=500)
    assert purge_stale_state(tmp_path, savepoint, older_than_s=0, now=NOW) == []
    assert [p.name for p in purge_stale_state(tmp_path, savepoint, older_than_s=HOUR, now=NOW)] == ["job-a"]
    assert savepoint.exists() and not old.exists()


def test_a_running_job_purges_the_checkpoint_it_restored_from_once_it_has_its_own(tmp_path: Path) -> None:
    """Only at start: the folder a job restored from (every buyer's face of that time) stayed while the job ran."""
    from infra.settings import Settings
    from jobs.flink.job import sweep_stale_state

    settings = Settings(stack_dir=tmp_path)
    settings = settings.model_copy(update={"job": settings.job.model_copy(update={"checkpoint_dir": tmp_path})})
    restored = _checkpoint(tmp_path, "job-b/chk-3", age_h=200)
    assert sweep_stale_state(settings, NOW) == [] and restored.exists(), "before its own checkpoint: still needed"
    own = _checkpoint(tmp_path, "job-c/chk-9", age_h=0)
    assert [p.name for p in sweep_stale_state(settings, NOW)] == ["job-b"]
    assert not restored.exists() and own.exists()


def _restoring(tmp_path: Path, restore_from: Path):
    from infra.settings import Settings

    settings = Settings(stack_dir=tmp_path)
    job = settings.job.model_copy(update={"checkpoint_dir": tmp_path, "restore_from": restore_from})
    return settings.model_copy(update={"job": job})


def test_a_restore_setting_naming_a_checkpoints_metadata_file_keeps_that_checkpoint_at_start(tmp_path: Path) -> None:
    """Flink takes a checkpoint's ``_metadata`` file as its path too; the start-up purge then deleted the old
    checkpoint's job folder before Flink could restore it (only the file and its folder counted as kept)."""
    from jobs.flink.job import restore_point

    restored = _checkpoint(tmp_path, "job-b/chk-3", age_h=200)
    start = restore_point(_restoring(tmp_path, restored / "_metadata"))
    assert start == restored
    assert purge_stale_state(tmp_path, start, older_than_s=72 * HOUR, now=NOW) == []
    assert restored.exists()


def test_a_restore_setting_naming_no_complete_savepoint_refuses_the_start_naming_the_setting(tmp_path: Path) -> None:
    """A savepoint the sweep has deleted (or a job folder, not its chk-N) failed in Flink at every restart."""
    import pytest

    from jobs.flink.job import RestoreError, restore_point

    _checkpoint(tmp_path, "job-b/chk-3", age_h=1)
    for wrong in (tmp_path / "savepoints" / "savepoint-gone", tmp_path / "job-b"):
        with pytest.raises(RestoreError, match=r"CG_JOB__RESTORE_FROM=.*no _metadata.*unset it"):
            restore_point(_restoring(tmp_path, wrong))


def test_a_savepoint_named_with_flink_run_s_wins_over_the_newest_state_in_the_checkpoint_dir(tmp_path: Path) -> None:
    """The program's options override the CLI's: the newest checkpoint the job set replaced ``flink run -s``."""
    from jobs.flink.job import start_point

    older = _checkpoint(tmp_path, "savepoints/savepoint-old", age_h=5)
    newest = _checkpoint(tmp_path, "job-c/chk-9", age_h=0)
    settings = _restoring(tmp_path, None)
    assert start_point(settings, None) == newest
    assert start_point(settings, older.as_uri()) == older
    assert start_point(settings, f"file:{older}/_metadata") == older
    assert start_point(settings, str(older)) == older
    assert start_point(settings, "s3://bucket/savepoint-1") is None, "elsewhere: the CLI's own setting stands"
