"""Index retention for OpenSearch without the ISM plugin: drop whole period indices past their age.

The OpenSearch sink applies this at start and every ``indices.retention_interval_s``; this command
runs it once, e.g. from cron where no sink runs, or with ``--dry-run`` to see what would go.

An index ``<prefix>-<kind>-<period>`` is deleted when its period ended more than
``indices.<kind>_retention_days`` days ago and it was created that long ago too (0 = keep forever; a
kind without such a setting, e.g. ``model_drift``, keeps its route's default, 400 days). The labels
index is one index for all time and is never dropped: its topic is compacted, verdicts stay until replaced.

Run: ``python -m sinks.opensearch.retention [--index-prefix PREFIX] [--dry-run]``
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from infra.clients.opensearch import make_client
from infra.logs import setup_logging
from infra.settings import get_settings
from sinks.opensearch.sink import apply_retention

app = typer.Typer(add_completion=False, help="Delete expired period indices (retention without ISM).")


@app.command()
def main(
    index_prefix: Annotated[str | None, typer.Option(help="Index prefix; defaults to the settings'.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted, delete nothing.")] = False,
) -> None:
    """Apply the retention of every index family once and list the indices it dropped."""
    settings = get_settings()
    setup_logging(settings, process="retention")
    # Its failed requests are WARNINGs with a traceback; the one-line error says the same.
    logging.getLogger("opensearch").setLevel(logging.ERROR)
    prefix = index_prefix or settings.opensearch.index_prefix
    doomed = apply_retention(make_client(settings.opensearch), prefix, settings.indices, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {len(doomed)} index(es)" + "".join(f"\n  {name}" for name in doomed))


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
