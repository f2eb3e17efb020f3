"""POS transactions into Kafka: live synthetic traffic (``generate``) or a Fraud Detector CSV
(``replay-csv``).

Run ``python -m producers.pos --help``. Both commands go through :func:`produce`: an idempotent
producer (``acks=all``), keyed by ``store_id/lane_id`` so each lane's transactions stay in order, that
paces with a drift-free token bucket, counts acknowledgements and failures, and flushes on the way out
(also on Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from confluent_kafka import KafkaError, Producer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from infra.clients import kafka as kafka_clients
from infra.clock import now_ms
from infra.local.pos_generator import DEFAULT_START_MS, PosGenerator
from infra.pacing import TokenBucket
from infra.settings import Settings, get_settings
from producers.csv_replay import (
    AckWatermark,
    Checkpoint,
    DeadLetterRows,
    ReplayStateError,
    default_state_file,
    file_label,
    load_state,
    resume_index,
    transaction_of,
)
from schemas.afd_csv import CsvFormatError, file_sha256, read_rows, replay_order
from schemas.errors import InvalidRecord
from schemas.records import PosTransaction
from schemas.topics import DEAD_LETTERS, TRANSACTIONS, TopicSpec

console = Console(stderr=True)
_REFRESH_S = 0.25
_MAX_REPORTED_ERRORS = 20


class ProducerLike(Protocol):
    """The part of :class:`confluent_kafka.Producer` we use; tests inject a fake through it."""

    def produce(self, topic: str, *, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


def make_producer(settings: Settings, *topics: TopicSpec) -> Producer:
    """Idempotent, ``acks=all``: a retried send can neither be lost nor duplicated nor reordered.
    ``KafkaUnavailable`` when no broker answers: sends would wait out librdkafka's five-minute timeout;
    ``TopicMissing`` when the transactions topic or one of ``topics`` is missing (tools create none)."""
    producer = kafka_clients.producer(
        settings, kafka_clients.RELIABLE, client_id="checkout-guard-pos", compression_type="lz4"
    )
    names = [spec.full_name(settings.kafka.topic_prefix) for spec in (TRANSACTIONS, *topics)]
    kafka_clients.require_topics(producer, settings, *names)
    return producer


def message_key(tx: PosTransaction) -> bytes:
    """Per-lane key: one lane's transactions land in one partition, in order."""
    return f"{tx.store_id}/{tx.lane_id}".encode()


@dataclass
class ProduceStats:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    """The first few distinct delivery errors."""

    @property
    def unconfirmed(self) -> int:
        """Sent but neither acknowledged nor failed when we stopped waiting."""
        return self.sent - self.acked - self.failed

    @property
    def rate(self) -> float:
        return self.acked / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.unconfirmed == 0


class _Progress:
    """One live status line on stderr (or nothing when disabled)."""

    def __init__(self, stats: ProduceStats, enabled: bool, label: str) -> None:
        self.stats, self.enabled, self.label = stats, enabled, label
        self._live: Live | None = None
        self._start = time.monotonic()
        self._last = (self._start, 0)
        self._rate = 0.0
        self.next_refresh = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self.refresh(time.monotonic(), force=True)
            self._live.__exit__(None, None, None)
            if not console.is_terminal:
                console.line()  # a non-terminal Live leaves its last line unterminated

    def refresh(self, now: float, force: bool = False) -> None:
        if self._live is None or (now < self.next_refresh and not force):
            return
        self.next_refresh = now + _REFRESH_S
        t0, acked0 = self._last
        if now - t0 >= 1.0:
            self._rate = (self.stats.acked - acked0) / (now - t0)
            self._last = (now, self.stats.acked)
        self._live.update(self._render())

    def _render(self) -> Text:
        s = self.stats
        line = Text(f"{self.label}  sent {s.sent:,}  acked {s.acked:,}  ")
        line.append(f"failed {s.failed:,}", style="bold red" if s.failed else "")
        line.append(
            f"  in flight {s.unconfirmed:,}  rate {self._rate:,.0f} tx/s"
            f"  elapsed {time.monotonic() - self._start:,.1f} s"
        )
        return line


def produce(
    settings: Settings,
    transactions: Iterable[PosTransaction],
    rate: float = 0,
    progress: bool = True,
    *,
    producer: ProducerLike | None = None,
    on_delivery: Callable[[int, bool], None] | None = None,
    due: Callable[[PosTransaction], float] | None = None,
    realtime: bool = False,
    flush_timeout_s: float | None = None,
    label: str = "transactions",
) -> ProduceStats:
    """Send ``transactions`` to the transactions topic and wait for every acknowledgement.

    ``rate`` caps messages per second (0 = as fast as possible). ``due(tx)`` may hold a message back
    until that many seconds after the start (event-time pacing). ``on_delivery(seq, ok)`` is told
    the outcome of the ``seq``-th transaction (0-based) -- after Kafka acknowledged it, never
    before. ``realtime`` stamps ``event_time`` with the wall clock at the moment of sending (after
    any pacing wait, so measured detection latency does not include our own pacing). Ctrl-C stops
    sending, still waits for what is in flight, at most ``CG_KAFKA__STOP_FLUSH_S`` (and ``flush_timeout_s``;
    a second Ctrl-C stops waiting at once), and returns with ``interrupted`` set; what is left unanswered
    is ``unconfirmed``, and ``on_delivery`` is never told of it. ``producer`` is for tests; by default one is
    made from ``settings`` (see :func:`make_producer`).
    """
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    kafka: ProducerLike = producer if producer is not None else make_producer(settings)
    stats = ProduceStats()
    bucket = TokenBucket(rate) if rate > 0 else None

    def delivered(seq: int, err: KafkaError | None, _msg: object) -> None:
        # A report proves Kafka had the record: counted here too, since a Ctrl-C or SIGTERM landing between
        # the hand-over and the loop's count left it uncounted, and the in-flight count ended at -1.
        stats.sent = max(stats.sent, seq + 1)
        if err is None:
            stats.acked += 1
        else:
            stats.failed += 1
            text = str(err)
            if len(stats.errors) < 5 and text not in stats.errors:
                stats.errors.append(text)
        if on_delivery is not None:
            on_delivery(seq, err is None)

    start = time.monotonic()
    with _Progress(stats, progress, label) as bar:
        try:
            for seq, tx in enumerate(transactions):
                now = time.monotonic()
                wait = bucket.reserve(now) if bucket is not None else 0.0
                if due is not None:
                    wait = max(wait, start + due(tx) - now)
                if wait > 0.0005:
                    _wait(kafka, now + wait, bar)
                if realtime:
                    tx = dataclasses.replace(tx, event_time=now_ms())
                value, key = tx.encode(), message_key(tx)
                kafka_clients.produce(kafka, topic, key, value, partial(delivered, seq))
                stats.sent = max(stats.sent, seq + 1)  # records are handed over in order
                kafka.poll(0)
                if progress:
                    bar.refresh(time.monotonic())
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            _drain(kafka, stats, bar, _flush_limit(flush_timeout_s, stats.interrupted, settings))
            stats.elapsed_s = time.monotonic() - start
    return stats


def _wait(kafka: ProducerLike, until: float, bar: _Progress) -> None:
    """Sleep until ``until`` while still serving delivery callbacks and the progress line."""
    while (left := until - time.monotonic()) > 0:
        kafka.poll(min(left, 0.1))
        bar.refresh(time.monotonic())


def _flush_limit(timeout_s: float | None, interrupted: bool, settings: Settings) -> float | None:
    """How long the final flush may wait: stopped by Ctrl-C or SIGTERM, ``CG_KAFKA__STOP_FLUSH_S`` at most (with
    Kafka down it waited out librdkafka's five-minute message timeout); otherwise ``timeout_s`` (None: until every
    record is answered, as librdkafka's timeout ends it)."""
    if not interrupted:
        return timeout_s
    return settings.kafka.stop_flush_s if timeout_s is None else min(timeout_s, settings.kafka.stop_flush_s)


def _drain(kafka: ProducerLike, stats: ProduceStats, bar: _Progress, timeout_s: float | None) -> None:
    deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
    try:
        while kafka.flush(min(0.25, max(0.0, deadline - time.monotonic()))) > 0:
            bar.refresh(time.monotonic())
            if time.monotonic() >= deadline:
                break
    except KeyboardInterrupt:
        stats.interrupted = True


# ---------------------------------------------------------------------------- CSV replay


@dataclass
class ReplayResult:
    stats: ProduceStats
    total_rows: int
    start_index: int
    last_acked_index: int
    """Replay-order index of the last row of the acknowledged (or skipped) prefix; what was saved."""
    skipped: list[tuple[int, str]]
    """Rows that could not be read or mapped, each sent to the dead letters: (line number, reason)."""
    state_file: Path
    dead_letters_failed: int = 0
    """Bad rows whose dead letter Kafka did not take: not done, so the replay is not complete either."""
    dead_letter_errors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.last_acked_index == self.total_rows - 1

    @property
    def ok(self) -> bool:
        """Every send (transactions and dead letters) acknowledged; an interrupted run may still be ok."""
        return self.stats.ok and self.dead_letters_failed == 0


def replay_csv(
    settings: Settings,
    path: Path,
    *,
    state_file: Path | None = None,
    from_start: bool = False,
    rate: float = 0,
    time_scale: float = 0,
    progress: bool = True,
    producer: ProducerLike | None = None,
    checkpoint_interval_s: float = 0.5,
) -> ReplayResult:
    """Replay a Fraud Detector CSV into the transactions topic in event-time order, resumably.

    Progress is checkpointed in ``state_file`` (default ``<stack_dir>/replay/<stem>-<path hash>.state.json``)
    only up to the last row acknowledged with all before it; a rerun continues after it, so no row is
    ever skipped. Rows acknowledged after the last checkpoint are sent again after a crash -- at
    least once, which is fine because downstream is idempotent by transaction id. A row that cannot
    be read or mapped becomes a dead letter (id ``<file>:<line>``) and is done once Kafka has that.
    ``time_scale`` N replays N times faster than the original spacing of events (0 = no pacing).
    Raises :class:`CsvFormatError` / :class:`ReplayStateError` for a bad file or a foreign state, and
    :class:`CsvFormatError` for a file that changed while it was read (a copy still under way): a state
    recording the finished file's sha256 with the partial file's rows would resume past rows never sent.
    """
    state_path = state_file or default_state_file(settings.stack_dir, path)
    name = file_label(path)
    sha256 = file_sha256(path)
    rows = replay_order(read_rows(path))
    if file_sha256(path) != sha256:  # the state must record the content whose rows its indices count
        raise CsvFormatError(
            f"{name} changed while it was read (still being copied or written?); run again once it is complete"
        )
    start = 0 if from_start else resume_index(load_state(state_path), sha256)
    watermark = AckWatermark(start)
    checkpoint = Checkpoint(state_path, name, sha256, len(rows), watermark, checkpoint_interval_s)
    if start >= len(rows):  # a header alone, or every row done: Kafka is not asked (down, it cost 10 s and an error)
        checkpoint.save()
        return ReplayResult(ProduceStats(), len(rows), start, watermark.last, [], state_path)
    # Kafka down or a topic missing: no state written, nothing sent
    kafka: ProducerLike = producer if producer is not None else make_producer(settings, DEAD_LETTERS)
    checkpoint.save()  # records the fresh start (and resets an old state on --from-start)
    skipped: list[tuple[int, str]] = []
    row_of_seq: dict[int, int] = {}  # produce()'s sequence number -> row index, until delivered
    dead_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
    bad_rows = DeadLetterRows(name, watermark, checkpoint, partial(kafka_clients.produce, kafka, dead_topic))

    def transactions() -> Iterator[PosTransaction]:
        seq = 0
        for index in range(start, len(rows)):
            row = rows[index]
            try:
                tx = transaction_of(row, now_ms(), settings.job.max_future_skew_ms)
            except InvalidRecord as exc:
                skipped.append((row.line, exc.reason))
                if len(skipped) <= _MAX_REPORTED_ERRORS:
                    text = f"line {row.line}: dead-lettered ({exc.kind}), {exc.reason}"
                    console.print(text, style="yellow", markup=False, highlight=False)
                bad_rows.send(index, row, exc)
                continue
            row_of_seq[seq] = index
            seq += 1
            yield tx

    def on_delivery(seq: int, ok: bool) -> None:
        index = row_of_seq.pop(seq)
        if ok:
            watermark.settle(index)
            checkpoint.maybe_save()

    first_event: list[int] = []

    def event_time_due(tx: PosTransaction) -> float:
        """Seconds after the start at which ``tx`` is due: its original spacing / ``time_scale``."""
        if not first_event:
            first_event.append(tx.event_time)
        return (tx.event_time - first_event[0]) / 1000.0 / time_scale

    try:
        stats = produce(
            settings,
            transactions(),
            rate,
            progress,
            producer=kafka,
            on_delivery=on_delivery,
            due=event_time_due if time_scale > 0 else None,
            label=name,
        )
    finally:
        checkpoint.save()
    if len(skipped) > _MAX_REPORTED_ERRORS:
        console.print(f"... and {len(skipped) - _MAX_REPORTED_ERRORS} more dead-lettered rows", style="yellow")
    return ReplayResult(
        stats, len(rows), start, watermark.last, skipped, state_path, bad_rows.failed, list(bad_rows.errors)
    )


# ---------------------------------------------------------------------------- CLI

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="POS transactions into Kafka: live synthetic traffic or a Fraud Detector CSV replay.",
)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """``kill`` (SIGTERM) takes the same path as Ctrl-C: stop, flush, save progress."""

    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(stats: ProduceStats, what: str) -> None:
    colour = "green" if stats.ok and not stats.interrupted else "yellow" if stats.ok else "red"
    console.print(
        f"{what}: sent {stats.sent:,}, acked {stats.acked:,}, failed {stats.failed:,}, "
        f"unconfirmed {stats.unconfirmed:,} in {stats.elapsed_s:,.1f} s ({stats.rate:,.0f} tx/s)",
        style=colour,
        markup=False,
        highlight=False,
    )
    for err in stats.errors:
        console.print(f"delivery error: {err}", style="red", markup=False, highlight=False)


def _exit_code(stats: ProduceStats) -> int:
    if not stats.ok:
        return 1
    return 130 if stats.interrupted else 0


def _above_zero(value: float | None) -> float | None:
    """A rate that must be a finite number above 0 (the generator refused others with a traceback)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a number above 0, got {value:g}")
    return value


def _finite(value: float) -> float:
    """A rate that must be finite: ``--rate inf`` was taken as the event rate too, and every generated
    transaction got the same event time (a gap of 1/inf)."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number (0 = as fast as possible), got {value:g}")
    return value


@app.command()
def generate(
    rate: Annotated[float, typer.Option(help="Target tx/s; 0 = as fast as possible.", min=0, callback=_finite)] = 50.0,
    count: Annotated[int, typer.Option(help="Transactions to send; 0 = until stopped.", min=0)] = 0,
    seed: Annotated[
        int | None, typer.Option(help="Seed; same seed, same transactions and ids. Default: a new one, printed.")
    ] = None,
    stores: Annotated[int, typer.Option(help="Number of stores.", min=1)] = 8,
    lanes: Annotated[int, typer.Option(help="Lanes per store.", min=1)] = 6,
    customers: Annotated[int, typer.Option(help="Size of the customer population.", min=2)] = 20_000,
    fraud_share: Annotated[
        float, typer.Option(help="Share of fraudulent transactions (label 1).", min=0.0, max=1.0)
    ] = 0.03,
    event_rate: Annotated[
        float | None,
        typer.Option(
            help="Arrivals per second of generator event time, above 0; default --rate (20 when --rate is 0).",
            callback=_above_zero,
        ),
    ] = None,
    realtime: Annotated[
        bool, typer.Option(help="Stamp event_time with the wall clock when sent, instead of generator time.")
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show the live status line.")] = True,
) -> None:
    """Send realistic synthetic POS traffic (sales, returns, labelled fraud patterns)."""
    settings = get_settings()
    if seed is None:
        seed = random.SystemRandom().randrange(1, 1_000_000)
    gen = PosGenerator(
        seed=seed,
        stores=stores,
        lanes_per_store=lanes,
        customers=customers,
        fraud_share=fraud_share,
        tx_per_second=event_rate or rate or 20.0,
        start_time_ms=now_ms() if realtime else DEFAULT_START_MS,
    )
    txs: Iterator[PosTransaction] = islice(gen, count) if count else gen
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    console.print(
        f"generating into [bold]{topic}[/] at {settings.kafka.bootstrap_servers}: seed {seed}, "
        f"{stores} stores x {lanes} lanes, {customers:,} customers, fraud share {fraud_share:.1%}, "
        f"rate {'max' if not rate else f'{rate:g}/s'}",
        highlight=False,
    )
    with sigterm_as_interrupt():
        stats = produce(settings, txs, rate, progress, realtime=realtime, label=f"seed {seed}")
    _finish(stats, "generate")
    raise typer.Exit(_exit_code(stats))


@app.command("replay-csv")
def replay_csv_command(
    path: Annotated[Path, typer.Argument(help="Fraud Detector training CSV.", exists=True, dir_okay=False)],
    state_file: Annotated[
        Path | None,
        typer.Option(
            help="Resume checkpoint; default <stack_dir>/replay/<csv-stem>-<path hash>.state.json (one per CSV path)."
        ),
    ] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Ignore (and reset) saved progress.")] = False,
    rate: Annotated[float, typer.Option(help="Max tx/s; 0 = no cap.", min=0)] = 0.0,
    time_scale: Annotated[
        float, typer.Option(help="Replay N times faster than the original event spacing; 0 = no pacing.", min=0)
    ] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show the live status line.")] = True,
) -> None:
    """Replay a Fraud Detector CSV in EVENT_TIMESTAMP order; rerun to resume after a stop."""
    settings = get_settings()
    with sigterm_as_interrupt():
        try:
            result = replay_csv(
                settings,
                path,
                state_file=state_file,
                from_start=from_start,
                rate=rate,
                time_scale=time_scale,
                progress=progress,
            )
        except (CsvFormatError, ReplayStateError) as exc:  # one line, however narrow the terminal
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(2) from None
    name = file_label(path)
    _finish(result.stats, f"replay {name}")
    if result.dead_letters_failed:
        console.print(
            f"{result.dead_letters_failed:,} dead letter(s) of bad rows not delivered: those rows are not done",
            style="red",
            markup=False,
            highlight=False,
        )
    for err in result.dead_letter_errors:
        console.print(f"dead letter delivery error: {err}", style="red", markup=False, highlight=False)
    if result.stats.unconfirmed:
        console.print(
            f"{result.stats.unconfirmed:,} row(s) sent but not acknowledged by Kafka when the command stopped waiting "
            f"(at most CG_KAFKA__STOP_FLUSH_S, {settings.kafka.stop_flush_s:g} s, after a stop): the saved progress "
            "does not count them, and a rerun sends them again",
            style="red",
            markup=False,
            highlight=False,
        )
    done = result.last_acked_index + 1
    if result.total_rows == 0:  # not "all 0 rows were already replayed": this file never had any to replay
        console.print(
            f"nothing to do: {name} has a header but no data rows", style="yellow", markup=False, highlight=False
        )
    elif result.start_index >= result.total_rows:
        console.print(
            f"nothing to do: all {result.total_rows:,} rows were already replayed "
            f"(--from-start to replay again; state in {result.state_file})",
            markup=False,
            highlight=False,
        )
    else:
        console.print(
            f"{done:,} of {result.total_rows:,} rows done (this run started at row "
            f"{result.start_index:,}; {len(result.skipped):,} dead-lettered); state in "
            f"{result.state_file}" + ("" if result.complete else "; run again to resume"),
            markup=False,
            highlight=False,
        )
    raise typer.Exit(1 if not result.ok else _exit_code(result.stats))


@app.command()
def bench(
    count: Annotated[int, typer.Option(help="Transactions per measurement.", min=1)] = 200_000,
    seed: int = 1,
) -> None:
    """Measure generation speed (and generation + Avro encoding), without Kafka."""
    for what, encode in (("generate", False), ("generate+encode", True)):
        gen = PosGenerator(seed=seed)
        wall, cpu = time.perf_counter(), time.process_time()
        for tx in islice(gen, count):
            if encode:
                tx.encode()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        console.print(
            f"{what:16} {count:,} tx: {count / wall:,.0f} tx/s wall, {count / cpu:,.0f} tx/s cpu", highlight=False
        )


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
