"""``python -m producers.replay``: re-publish a range of a Kafka topic into a target topic.

The range logic and the copy live in :mod:`infra.clients.topic_replay` (the stream backtest uses
them too); this module is the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.topic_replay import (
    PartitionRange,
    RangeError,
    ReplayStats,
    ReplayStopped,
    TopicUnavailable,
    bounds,
    deleted_warning,
    parse_time_ms,
    plan,
    range_warnings,
    replay,
    resume_options,
)
from infra.settings import KafkaSettings, get_settings
from schemas.topics import AUDIT, CASES, COMMANDS, LABELS, RULES, WATCHLIST

console = Console(stderr=True)

STATE_TOPICS: dict[str, tuple[str, str]] = {
    RULES.name: (
        "it would roll live state back: the job applies the last rules record, so an older rule set would be in"
        " force again",
        "publish a rule set with `checkout-guard rules publish FILE`",
    ),
    WATCHLIST.name: (
        "it would roll live state back: the job applies the last record of each subject, so old entries would be"
        " in force again, a forgotten subject's face enrolled again",
        "enrol or forget with the bot (`fraud <tx>`, `vip <tx>`, `forget <subject>`)",
    ),
    LABELS.name: (
        "it would roll live state back: the last verdict published for a transaction is in force, so changed or"
        " withdrawn verdicts would be back",
        "publish verdicts with `checkout-guard labels publish | withdraw | import`",
    ),
    CASES.name: (
        "it would roll live state back: the last record of a case is the case, so cases would go back to an"
        " earlier version (a decided case open again)",
        "decide cases on the case page or with the bot",
    ),
    COMMANDS.name: (
        "the services would act on the commands again, or audit and dead-letter them as too old",
        "send commands with the bot",
    ),
    AUDIT.name: (
        "it is the record of who did what, and would hold every event twice",
        "leave it to the services that write it",
    ),
}
"""The state and control topics (logical name: why a replay does not write into them where their readers are, what
to do instead): every compacted topic, where the last record of a key is in force, and those whose records are acted
on or are the record of what was done."""


def refusal(topic: str, source_name: str, target_name: str, live_prefix: str) -> str | None:
    """Why replaying ``source_name`` (logical name ``topic``) into ``target_name`` (on the same cluster) is refused,
    or ``None``: a state or control topic (:data:`STATE_TOPICS`) is not replayed into itself nor into the live
    prefix, since its readers would take the older records for the latest (redrive refuses their records for the
    same reason); a copy into another prefix (a backtest's, say) is allowed. Judged by the full names, however
    ``--target-prefix`` and ``--target-topic`` split them (``--target-topic live.rules`` with an empty prefix is
    the live ``rules``). No option overrides it: each of these topics has its own tool for the changes it needs."""
    live = [name for name in STATE_TOPICS if target_name == f"{live_prefix}{name}"]
    itself = [topic] if target_name == source_name and topic in STATE_TOPICS else []
    if not live and not itself:
        return None
    why, instead = STATE_TOPICS[(live or itself)[0]]
    return (
        f"not replaying {source_name} into {target_name}: {why}. Instead, {instead}; a copy into another prefix"
        " (--target-prefix, e.g. a backtest's) is allowed"
    )


def cluster_id(kafka: KafkaSettings) -> str | None:
    """The id of the cluster ``kafka``'s brokers belong to (``None`` where the brokers do not say);
    ``KafkaUnavailable`` when none answers."""
    with kafka_clients.admin_session(kafka) as admin:
        return kafka_clients.cluster_metadata(admin, kafka).cluster_id or None


def same_cluster(source: KafkaSettings, target: KafkaSettings) -> bool:
    """Whether ``--target-bootstrap`` reaches the source's own cluster: by the id the brokers report, since an
    address says nothing (``localhost`` or another broker of the same cluster is still the live one); by the
    bootstrap list where a broker reports no id."""
    source_id, target_id = cluster_id(source), cluster_id(target)
    if source_id is None or target_id is None:
        return source.bootstrap == target.bootstrap
    return source_id == target_id


# ---------------------------------------------------------------------------- CLI


def _partitions(text: str) -> list[int]:
    """``--partitions 0,2`` as numbers; anything else is a ``RangeError`` that names the option. One that names no
    partition (``""``, ``,``: a script's empty variable) is refused too: it replayed every partition, or none."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(clock.ascii_digits(part) for part in parts):
        raise RangeError(f"--partitions takes partition numbers separated by commas (e.g. 0,2), not {text!r}")
    return [int(part) for part in parts]


SHORTFALLS: tuple[tuple[str, Callable[[PartitionRange], int]], ...] = (
    ("gone", lambda r: r.gone),
    ("not written", lambda r: r.unwritten),
)
"""The table's columns of offsets asked for that are not there to copy, shown when one is not 0."""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Re-publish a topic range (by offsets or timestamps) into a target topic.",
)


def ranges_table(title: str, ranges: list[PartitionRange]) -> Table:
    """One row per partition; a ``gone`` column when retention deleted part of the range asked for, a ``not
    written`` one when an end offset lies past the partition's end."""
    extra = [(name, count) for name, count in SHORTFALLS if any(count(r) for r in ranges)]
    table = Table(title=title, show_edge=False)
    for column in ("partition", "start", "end (excl.)", "records", "low", "high", *(name for name, _ in extra)):
        table.add_column(column, justify="right")
    for r in ranges:
        cells = [str(r.partition), f"{r.start:,}", f"{r.end:,}", f"{r.size:,}", f"{r.low:,}", f"{r.high:,}"]
        table.add_row(*cells, *(f"{count(r):,}" for _, count in extra))
    totals = ["all", "", "", f"{sum(r.size for r in ranges):,}", "", ""]
    table.add_row(*totals, *(f"{sum(count(r) for r in ranges):,}" for _, count in extra), style="bold")
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
    """Replay TOPIC's range into the target; end offsets are fixed at the start (replaying into itself ends).

    Offsets asked for that retention already deleted, or that an end offset past the partition's end asks for, are
    named in a warning and make the exit code 1 (the dry run's too): what is there is still copied, but not the
    whole range; so does a start time before the earliest record retention kept, where retention deleted records
    (part of the window may be gone). A start offset past the partition's end is refused (exit 2): nothing would
    be copied. So do records retention deletes from the source while they are being copied: counted in a warning
    and the summary, and the copy goes on from the earliest kept record.

    State and control topics (rules, watchlist, labels, cases, commands, audit) are not replayed into themselves
    nor into the live prefix on the same cluster (a --target-bootstrap that reaches it, by its cluster id, too):
    that would roll their state back."""
    settings = get_settings()
    src_prefix = settings.kafka.topic_prefix if source_prefix is None else source_prefix
    dst_prefix = src_prefix if target_prefix is None else target_prefix
    source_name, target_name = f"{src_prefix}{topic}", f"{dst_prefix}{target_topic or topic}"
    target_kafka = (
        settings.kafka
        if target_bootstrap is None
        else settings.kafka.model_copy(update={"bootstrap_servers": target_bootstrap})
    )
    refused = refusal(topic, source_name, target_name, settings.kafka.topic_prefix)
    if refused is not None and (target_bootstrap is None or same_cluster(settings.kafka, target_kafka)):
        typer.echo(f"Error: {refused}", err=True)
        raise typer.Exit(2)
    try:
        start, end = bounds(from_offsets, to_offsets, from_time, to_time)
        only = _partitions(partitions) if partitions is not None else None
        ranges = plan(settings.kafka, source_name, start, end, only)
    except (RangeError, ValueError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except TopicUnavailable as exc:  # the topic is there, the broker would not serve it: not a bad option
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(ranges_table(f"{source_name} -> {target_name}", ranges))
    warnings = range_warnings(ranges)
    for warning in warnings:
        console.print(f"Warning: {warning}", style="yellow", markup=False, highlight=False)
    if dry_run:
        raise typer.Exit(1 if warnings else 0)
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
    except ReplayStopped as exc:  # what was copied, and where to go on from, are still worth knowing
        typer.echo(f"Error: {exc}", err=True)
        _summary(ranges, exc.stats, complete=False)
        if exc.stats.resume:
            console.print(
                f"to resume, run the same command with {resume_options(exc.stats.resume)}",
                markup=False,
                highlight=False,
            )
        raise typer.Exit(1) from None
    except (RangeError, TimeoutError, RuntimeError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    complete = stats.ok and not warnings and not any(stats.deleted.values())
    _summary(ranges, stats, complete)
    raise typer.Exit(0 if complete else 1)


def _summary(ranges: list[PartitionRange], stats: ReplayStats, complete: bool) -> None:
    """What was sent and acknowledged, with what of the range was not there to copy; the delivery errors."""
    lost = deleted_warning(stats.deleted, "offset(s) of the range", "were not copied")
    if lost is not None:
        console.print(f"Warning: {lost}", style="yellow", markup=False, highlight=False)
    missing = sum(r.gone for r in ranges)
    unwritten = sum(r.unwritten for r in ranges)
    time_cut = any(r.time_cut for r in ranges)
    deleted = sum(stats.deleted.values())
    console.print(
        f"replayed {stats.acked:,} of {stats.planned:,} planned record(s) (acknowledged; {stats.read:,} read,"
        f" {stats.sent:,} sent, {stats.failed:,} failed) in {stats.elapsed_s:,.1f} s"
        + (f"; {missing:,} offset(s) of the range were gone before the start (retention)" if missing else "")
        + (f"; {deleted:,} offset(s) of the range were deleted while being copied (retention)" if deleted else "")
        + (f"; {unwritten:,} offset(s) of the range were past the end (not written yet)" if unwritten else "")
        + ("; part of the window may have been gone before the start (retention)" if time_cut else ""),
        style="green" if complete else "red",
        markup=False,
        highlight=False,
    )
    for err in stats.errors:
        console.print(f"delivery error: {err}", style="red", markup=False, highlight=False)


@app.command("epoch-ms")
def epoch_ms_command(when: Annotated[str, typer.Argument(help="ISO-8601 time, epoch ms or now.")]) -> None:
    """Print a time as epoch milliseconds, e.g. for CG_JOB__STARTING_OFFSETS (start a new job from a time)."""
    try:
        typer.echo(parse_time_ms(when))
    except RangeError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
