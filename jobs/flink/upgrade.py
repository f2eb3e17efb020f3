"""Upgrade the running scoring job without losing state: stop it with a savepoint, start the new code.

Steps:
    python -m jobs.flink.upgrade savepoint   # stop the running job with a savepoint, print its path
    python -m jobs.flink.job                 # the new version: starts from the newest savepoint/checkpoint

Every stateful operator has a stable uid (score; the Kafka source/sink uids come from the SQL
plan, which an upgrade of the Python logic leaves unchanged), so receipts, store and customer
history, pending transactions, the watchlist and the active rule set all carry over. On the Flink
cluster (``flink submit``'s job, which ``savepoint`` cannot signal and names) the same is
``python -m infra.stack flink stop``, then ``flink submit``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from infra.flink_cluster import FlinkClusterError, cluster_scoring_jobs, named_jobs, rest_url
from infra.settings import Settings, get_settings
from jobs.flink.job import (
    RestoreError,
    chosen_restore,
    control_file,
    latest_checkpoint,
    restore_point,
    running_job,
)
from schemas.errors import CheckoutGuardError

app = typer.Typer(add_completion=False, help=__doc__)  # reflowed: its examples keep their lines


class UpgradeError(CheckoutGuardError, RuntimeError):
    """No savepoint: no job is running, or it stopped without one."""


class NoRunningJob(UpgradeError):
    """No mini-cluster scoring job of this checkpoint dir runs (its ``job.json`` is missing or stale)."""


FLINK_STOP = "python -m infra.stack flink stop"
"""What stops the scoring job on the Flink cluster with a savepoint (``flink submit``'s job writes no
``job.json``, so this module cannot signal it)."""


def stop_with_savepoint(control: Path, checkpoint_dir: Path, timeout: float = 120.0) -> Path:
    """Ask the job named in ``control`` to stop with a savepoint; wait until it has and return it.

    Only the very process that wrote ``control`` (same pid, same start time) is signalled: a killed job
    leaves its file behind, and SIGUSR1 would end whatever process has its pid now."""
    job = running_job(control)
    if job is None:
        state = "stale: its process is gone" if control.exists() else "missing"
        raise NoRunningJob(f"no running scoring job found ({control.name} in the checkpoint dir is {state})")
    before = time.time()
    os.kill(int(job["pid"]), signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        newest = latest_checkpoint(checkpoint_dir)
        done = running_job(control) is None
        if (
            done
            and newest is not None
            and newest.name.startswith("savepoint-")
            and (newest / "_metadata").stat().st_mtime >= before
        ):
            return newest
        if done:
            raise UpgradeError("the job stopped without writing a savepoint (see its log)")
        time.sleep(0.5)
    raise TimeoutError(f"no savepoint after {timeout:.0f}s")


@app.command()
def savepoint(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the savepoint.", min=1)] = 120.0,
) -> None:
    """Stop the running scoring job with a savepoint; the next start resumes from it."""
    settings = get_settings()
    try:
        path = stop_with_savepoint(control_file(settings), settings.checkpoint_dir, timeout)
    except NoRunningJob as exc:
        raise NoRunningJob(no_job_here(settings, str(exc))) from None
    typer.echo(str(path))


def no_job_here(settings: Settings, why: str) -> str:
    """What ``savepoint`` says when no mini-cluster job runs (``why``): a scoring job on the Flink cluster the
    settings name writes no ``job.json``, and "no running scoring job found" beside it read as nothing to stop,
    so it names that job and :data:`FLINK_STOP`, which takes the savepoint on the cluster."""
    url = rest_url(settings)
    try:
        live = cluster_scoring_jobs(settings)
    except FlinkClusterError as exc:
        return f"{why}; whether the Flink cluster runs it is unknown ({exc}): if it does, `{FLINK_STOP}` stops it"
    if not live:
        return why
    named = named_jobs(live)
    savepoints = settings.checkpoint_dir / "savepoints"
    return (
        f"the scoring job runs on the Flink cluster at {url}: {named}, not on a mini-cluster here (a cluster job "
        f"writes no job.json to signal); `{FLINK_STOP}` stops it with a savepoint under {savepoints}, which the "
        "next start resumes from"
    )


def cluster_status(settings: Settings) -> str:
    """The scoring job on the Flink cluster the settings name (``flink submit``'s), which writes no control file:
    ``status`` said "running: no" beside it."""
    url = rest_url(settings)
    try:
        live = cluster_scoring_jobs(settings)
    except FlinkClusterError as exc:
        return f"unknown ({exc})"
    if not live:
        return f"no (none at {url})"
    named = named_jobs(live)
    return f"{named} at {url}; `{FLINK_STOP}` stops it with a savepoint"


@app.command()
def status() -> None:
    """Which job runs, and the state a (re)start would resume from."""
    settings = get_settings()
    control = control_file(settings)
    job = running_job(control)
    stale = " (a stale control file of a killed job is left)" if job is None and control.exists() else ""
    typer.echo(f"running: {job or 'no'}{stale}")
    typer.echo(f"on the Flink cluster: {cluster_status(settings)}")
    where = settings.checkpoint_dir
    try:
        chosen = chosen_restore(settings)
    except RestoreError as err:
        typer.echo(f"resumes from: nothing, a start is refused: {err}")
        return
    if chosen is not None:
        typer.echo(f"resumes from: {chosen} (CG_JOB__RESTORE_FROM: every start while it is set, a restart too)")
        return
    found = restore_point(settings)
    # Name the folder looked in: a wrong CG_STACK_DIR reads as a fresh start otherwise.
    empty = "does not exist" if not where.is_dir() else "holds no complete checkpoint or savepoint"
    typer.echo(f"resumes from: {found or f'nothing (fresh start: {where} {empty})'}")


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
