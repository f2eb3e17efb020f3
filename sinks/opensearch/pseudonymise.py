"""One-off upgrade step: pseudonymise the customer keys already in the transactions indices.

The sink hashes a customer key that names a person (``email:<address>``) only as it writes a document
(``schemas.indices.indexed_customer_key``); documents indexed by an earlier version keep the address until
retention drops their day index (400 days by default). This rewrites each of them, under the prefix's
transactions indices, to what the sink writes now: ``email-hmac:<HMAC under CG_INDICES__CUSTOMER_KEY_SECRET>``,
or no ``customer_key`` when no secret is set. Run it after the upgraded sink runs (an older sink still
writes addresses). A run that stops half-way is finished by running it again: rewritten documents no
longer match. Only counts and index names are printed, never a key.

Run: ``python -m sinks.opensearch.pseudonymise [--index-prefix PREFIX] [--dry-run]``
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from infra.clients.opensearch import make_client
from infra.logs import setup_logging
from infra.settings import get_settings
from sinks.opensearch.sink import PseudonymiseReport, pseudonymise_indexed_keys

app = typer.Typer(add_completion=False, help="Hash the e-mail customer keys indexed before the sink hashed them.")


def summary(report: PseudonymiseReport, dry_run: bool, hashed: bool) -> tuple[str, bool]:
    """The lines to print, and whether the run is complete (nothing failed or changed meanwhile)."""
    found = sum(report.found.values())
    if dry_run:
        what = "hash" if hashed else "remove (no CG_INDICES__CUSTOMER_KEY_SECRET)"
        lines = [f"would {what} the customer key of {found} document(s)"]
        lines += [f"  {index}: {count}" for index, count in sorted(report.found.items())]
        return "\n".join(lines), True
    done = "hashed" if hashed else "removed (no CG_INDICES__CUSTOMER_KEY_SECRET)"
    lines = [f"{done} the customer key of {sum(report.rewritten.values())} of {found} document(s)"]
    lines += [f"  {index}: {report.rewritten[index]} of {count}" for index, count in sorted(report.found.items())]
    meanwhile, failed = sum(report.changed_meanwhile.values()), sum(report.failed.values())
    if meanwhile:
        lines.append(f"{meanwhile} document(s) were written by the sink meanwhile: run again to check them")
    if failed:
        lines.append(f"{failed} document(s) were refused: run again to retry them")
    return "\n".join(lines), not (meanwhile or failed)


@app.command()
def main(
    index_prefix: Annotated[str | None, typer.Option(help="Index prefix; defaults to the settings'.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would change, change nothing.")] = False,
) -> None:
    """Rewrite every transactions document whose customer key is not pseudonymised yet; print the counts."""
    settings = get_settings()
    setup_logging(settings, process="pseudonymise")
    logging.getLogger("opensearch").setLevel(logging.ERROR)  # request bodies hold the documents
    prefix = index_prefix or settings.opensearch.index_prefix
    secret = settings.indices.customer_key_secret
    key = secret.get_secret_value() if secret else None
    report = pseudonymise_indexed_keys(make_client(settings.opensearch), prefix, key or None, dry_run=dry_run)
    text, complete = summary(report, dry_run, hashed=bool(key))
    typer.echo(text)
    if not complete:
        raise typer.Exit(1)


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
