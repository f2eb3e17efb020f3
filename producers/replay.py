"""``python -m producers.replay``: re-publish a range of a Kafka topic into a target topic.

The range logic and the copy live in :mod:`infra.clients.topic_replay` (the stream backtest uses
them too); this module is the command line.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import clock
from infra.clients.topic_replay import PartitionRange, RangeError, bounds, parse_time_ms, plan, replay
from infra.settings import get_settings

console = Console(stderr=True)

# ---------------------------------------------------------------------------- CLI


def _partitions(text: str) -> list[int]:
    """``--partitions 0,2`` as numbers; anything else is a ``RangeError`` that names the option."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(clock.ascii_digits(part) for part in parts):
        raise RangeError(f"--partitions takes partition numbers separated by commas (e.g. 0,2), not {text!r}")
    return [int(part) for part in parts]


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Re-publish a topic range (by offsets or timestamps) into a target topic.",
)


def ranges_table(title: str, ranges: list[PartitionRange]) -> Table:
    table = Table(title=title, show_edge=False)
    for column in ("partition", "start", "end (excl.)", "records", "low", "high"):
        table.add_column(column, justify="right")
    for r in ranges:
        table.add_row(str(r.partition), f"{r.start:,}", f"{r.end:,}", f"{r.size:,}", f"{r.low:,}", f"{r.high:,}")
    table.add_row("all", "", "", f"{sum(r.size for r in ranges):,}", "", "", style="bold")
    return table


@app.command("run")
def run_command(
    topic: Annotated[str, typer.Argument(help="Logical topic name, e.g. transactions (prefixes are added).")],
    from_offsets: Annotated[str | None, typer.Option(help="Start offset: N for every partition or P:N,P:N.")] = None,
    to_offsets: Annotated[str | None, typer.Option(help="End offset (exclusive): N or P:N,P:N.")] = None,
    from_time: Annotated[
        str | None, typer.Option(help="Start at the first record at/after this time (ISO-8601, epoch ms or now).")
    ] = None,
    to_time: Annotated[str | None, typer.Option(help="End before the first record at/after this time.")] = None,
    partitions: Annotated[str | None, typer.Option(help="Only these source partitions, e.g. 0,2.")] = None,
    source_prefix: Annotated[
        str | None, typer.Option(help="Topic prefix of the source; default the settings' (CG_KAFKA__TOPIC_PREFIX).")
    ] = None,
    target_prefix: Annotated[str | None, typer.Option(help="Topic prefix of the target; default the source's.")] = None,
    target_topic: Annotated[str | None, typer.Option(help="Logical target topic; default the same as TOPIC.")] = None,
    target_bootstrap: Annotated[
        str | None,
        typer.Option(help="Bootstrap servers of another cluster (same security settings); default the same cluster."),
    ] = None,
    rate: Annotated[float, typer.Option(help="Max records per second; 0 = no cap.", min=0)] = 0.0,
    restamp: Annotated[
        bool, typer.Option("--restamp", help="Stamp copies with the replay time instead of their original timestamps.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the range sizes and stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Replay TOPIC's range into the target; end offsets are fixed at the start (replaying into itself ends)."""
    settings = get_settings()
    src_prefix = settings.kafka.topic_prefix if source_prefix is None else source_prefix
    dst_prefix = src_prefix if target_prefix is None else target_prefix
    source_name, target_name = f"{src_prefix}{topic}", f"{dst_prefix}{target_topic or topic}"
    target_kafka = (
        settings.kafka
        if target_bootstrap is None
        else settings.kafka.model_copy(update={"bootstrap_servers": target_bootstrap})
    )
    try:
        start, end = bounds(from_offsets, to_offsets, from_time, to_time)
        only = _partitions(partitions) if partitions else None
        ranges = plan(settings.kafka, source_name, start, end, only)
    except (RangeError, ValueError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    console.print(ranges_table(f"{source_name} -> {target_name}", ranges))
    if dry_run:
        raise typer.Exit(0)
    try:
        stats = replay(
            settings.kafka,
            source_name,
            target_kafka,
            target_name,
            ranges,
            rate=rate,
            restamp=restamp,
            progress=progress,
        )
    except (RangeError, TimeoutError, RuntimeError) as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    colour = "green" if stats.ok else "red"
    console.print(
        f"replayed {stats.acked:,} of {stats.planned:,} planned record(s) ({stats.read:,} read, "
        f"{stats.failed:,} failed) in {stats.elapsed_s:,.1f} s",
        style=colour,
        markup=False,
        highlight=False,
    )
    for err in stats.errors:
        console.print(f"delivery error: {err}", style="red", markup=False, highlight=False)
    raise typer.Exit(0 if stats.ok else 1)


@app.command("epoch-ms")
def epoch_ms_command(when: Annotated[str, typer.Argument(help="ISO-8601 time, epoch ms or now.")]) -> None:
    """Print a time as epoch milliseconds, e.g. for CG_JOB__STARTING_OFFSETS (start a new job from a time)."""
    try:
        typer.echo(parse_time_ms(when))
    except RangeError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
