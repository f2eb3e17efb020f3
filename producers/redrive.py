"""``python -m producers.redrive``: send dead letters back to the Kafka topic they came from.

A dead letter keeps its input's bytes, key and source (``<topic>:<partition>:<offset>``), so once the
cause is gone -- an SMTP server back after an outage, a fixed rule, a mapping that now exists -- the
input can simply be consumed again. This command reads ``<prefix>dead_letters`` from its beginning up to
its end at the moment it starts, keeps the letters of the chosen stage(s) (and kinds, time range of
``failed_at``, source topics), and produces each payload with its key back to its source topic, to the
partition it came from, with an idempotent producer (``acks=all``: a retried send is not doubled). Each
copy carries the input's own headers where its letter kept them (a signed command's signature:
:func:`schemas.records.dead_letter_headers`) and a ``checkout-guard-redriven-from`` header naming its dead letter.

Skipped and counted: letters whose payload was cut to fit (``payload_truncated``: the bytes are not
the input any more), letters whose source is not a Kafka topic (the MQTT bridge's ``mqtt:`` ids, CSV
rows' ``file:`` ids, and letters without a partition and offset, but for a whole transaction: see
:func:`whole_transaction`) or a topic the cluster does not have or cannot take records for now (an error, a
partition without a leader: :func:`cluster_topics`), and copies of an input already planned in
this run (the same source record dead-lettered twice by a replay). Permanent failures are skipped and counted
unless ``--include-permanent``: only the kinds in :data:`schemas.errors.RETRYABLE_KINDS` (a delivery that failed,
a bug since fixed, a schema or index the reader lacked) can succeed again; an invalid record would only come back
as the same dead letter, counted twice. Never re-driven: watchlist entries (the
job refuses one of another embedder's length, say). Only the watchlist service writes that topic; a copy
sent back after the subject was forgotten would enrol the face again; a new ``fraud``/``vip`` does it right.
Nor the records of the other state topics (:data:`STATE_TOPICS`: rules, labels, cases, audit): the copy would be
the newest record of its key, over the versions written since.

Re-driving is at-least-once, like any replay: running it twice sends the records twice. That is safe
because every consumer is idempotent by key -- for alerts, the sender's ledger records each ``(alert_id,
channel)`` once it was delivered and skips it on every later copy, so a re-driven alert reaches only
the channels that did not have it yet, and Webex is searched for the alert before posting when an
earlier attempt may have got through.

Run: ``python -m producers.redrive --stage alert-sender --kind delivery_failed [--since ISO] [--until
ISO] [--source-topic alerts] [--limit N] [--include-permanent] [--dry-run]``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.clients import kafka as kafka_clients
from infra.clients import topic_replay
from infra.clients.topic_replay import Bound, NoSuchTopic, RangeError, option_time_ms, read_range_records
from infra.clients.topic_replay import plan as plan_ranges
from infra.settings import Settings, get_settings
from producers.pos import message_key
from schemas.errors import INTERNAL_ERROR, RETRYABLE_KINDS, InvalidRecord, is_retryable
from schemas.records import REDRIVEN_HEADER, DeadLetter, Headers, PosTransaction, input_headers
from schemas.topics import ALL_TOPICS, AUDIT, CASES, DEAD_LETTERS, LABELS, RULES, TRANSACTIONS, WATCHLIST, TopicSpec

console = Console()
errors = Console(stderr=True)

KAFKA_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""What Kafka accepts as a topic name; an MQTT topic (``/``) or a file path never matches."""
NOT_KAFKA_PREFIXES = ("mqtt:", "file:")
"""Dead-letter ids of inputs that did not come from a Kafka topic (the bridge's MQTT messages, CSV rows)."""

REDRIVE = "re-driven"
TRUNCATED = "skipped: payload truncated"
NOT_KAFKA = "skipped: not from a Kafka topic"
NO_TOPIC = "skipped: no such topic, or unavailable"
DUPLICATE = "skipped: duplicate"
OVER_LIMIT = "skipped: over --limit"
WATCHLIST_ENTRY = "skipped: a watchlist entry (enrol again with fraud/vip)"
STATE_RECORD = "skipped: a state topic's record (would roll it back)"
PERMANENT = "skipped: permanent (--include-permanent)"
HEADERS_CUT = "skipped: input headers too big to keep"
OUTCOMES = (
    REDRIVE,
    PERMANENT,
    TRUNCATED,
    HEADERS_CUT,
    NOT_KAFKA,
    NO_TOPIC,
    DUPLICATE,
    OVER_LIMIT,
    WATCHLIST_ENTRY,
    STATE_RECORD,
)
STATE_TOPICS: tuple[TopicSpec, ...] = (RULES, LABELS, CASES, AUDIT)
"""Topics whose letters are never sent back (besides the watchlist): where the last record of a key is in force
(rules, labels, cases), a copy of an older record goes in after the versions written since and is taken for the
newest (an older rule set in force, a withdrawn verdict back, a decided case open again, in the index too); and
``audit``, whose readers act on every event (a forget published again). ``replay`` refuses these topics likewise."""


# ---------------------------------------------------------------------------- pure: choosing and planning


def stage_key(name: str) -> str:
    """A stage name as compared: case, ``_`` and ``-`` fold away. Dead letters name some stages with ``_``
    (``face_stage``, ``camera_bridge``) and others with ``-`` (``alert-sender``, ``scoring-job``), while the
    processes, their metrics and ``checkout-guard`` subcommands use ``-``: ``--stage face-stage`` selected
    nothing and said only "0 to re-drive"."""
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class Selection:
    """Which dead letters to re-drive: stage(s), and optionally kinds, ``failed_at`` in [since, until)
    (epoch ms) and source topics (full names). ``include_permanent``: re-drive the kinds that cannot succeed
    again too (:func:`schemas.errors.is_retryable`); otherwise they are matched, counted and skipped."""

    stages: frozenset[str]
    kinds: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None
    source_topics: frozenset[str] = frozenset()
    include_permanent: bool = False

    def matches(self, letter: DeadLetter) -> bool:
        return (
            stage_key(letter.stage) in {stage_key(stage) for stage in self.stages}
            and (not self.kinds or letter.error_kind in self.kinds)
            and (self.since_ms is None or letter.failed_at >= self.since_ms)
            and (self.until_ms is None or letter.failed_at < self.until_ms)
            and (not self.source_topics or letter.source_topic in self.source_topics)
        )


def source_is_kafka(letter: DeadLetter) -> bool:
    """Whether the letter's input was a Kafka record (it has a topic, a partition and an offset)."""
    return (
        not letter.dead_letter_id.startswith(NOT_KAFKA_PREFIXES)
        and letter.partition >= 0
        and letter.offset >= 0
        and KAFKA_TOPIC.fullmatch(letter.source_topic) is not None
    )


def whole_transaction(letter: DeadLetter, transactions: str) -> PosTransaction | None:
    """The transaction of a letter whose source position is unknown (partition/offset -1) that may go back all
    the same: an ``internal_error`` of the ``transactions`` topic (the scoring job's letter of a transaction it
    held in state written before it kept the record's position) whose payload is one whole ``PosTransaction``
    (it decodes, and encodes to the same bytes: nothing cut off or added). ``None`` for any other letter."""
    if letter.source_topic != transactions or letter.error_kind != INTERNAL_ERROR or not letter.payload:
        return None
    try:
        tx = PosTransaction.decode(letter.payload)
        whole = tx.encode() == letter.payload
    except Exception:  # noqa: BLE001 - not a transaction: the letter is not re-driven
        return None
    return tx if whole else None


def is_truncated(letter: DeadLetter) -> bool:
    """Whether the payload was cut to fit the dead-letters topic: ``payload_truncated``, or a recorded
    whole size (``payload_size``, -1 = unknown) other than the bytes kept. Letters written before those
    fields existed carry whole payloads."""
    size = getattr(letter, "payload_size", -1)
    cut = isinstance(size, int) and size >= 0 and size != len(letter.payload)
    return bool(getattr(letter, "payload_truncated", False)) or cut


@dataclass(frozen=True)
class Send:
    """One payload to produce again."""

    dead_letter_id: str
    topic: str
    partition: int | None
    """The partition it came from; None (by key) when the topic no longer has it."""
    key: bytes | None
    payload: bytes
    failed_at: int
    stage: str
    kind: str
    headers: Headers = ()
    """The input record's Kafka headers the letter kept (a signed command's signature), restored on the copy."""


@dataclass
class RedrivePlan:
    sends: list[Send] = field(default_factory=list)
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    """``(stage, kind, outcome) -> letters``; outcome one of :data:`OUTCOMES`."""
    read: int = 0
    undecodable: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    """Every stage found in the topic and its letters (selected or not): named when nothing matched."""

    def outcome_total(self, outcome: str) -> int:
        """Letters with ``outcome``, every stage and kind together."""
        return sum(n for (_, _, out), n in self.counts.items() if out == outcome)


def plan_redrive(
    letters: Iterable[DeadLetter | InvalidRecord],
    selection: Selection,
    topics: Mapping[str, int],
    limit: int | None = None,
    watchlist: str = WATCHLIST.name,
    headers: Mapping[str, Headers | None] | None = None,
    transactions: str = TRANSACTIONS.name,
    topic_prefix: str = "",
) -> RedrivePlan:
    """The sends for the selected letters, oldest (``failed_at``) first, at most ``limit``; every selected
    letter counted by stage, kind and outcome. ``topics``: the cluster's topics and their partition counts;
    ``watchlist``: the watchlist topic's full name (never re-driven); ``headers``: per dead-letter id, the input's
    headers its letter kept (:func:`schemas.records.input_headers`; ``None``: too big to keep, so the input cannot
    be sent as it was; a letter not named kept none); ``transactions``: the transactions topic's full name (a whole
    transaction of it goes back without a known position: :func:`whole_transaction`); ``topic_prefix``: the topics'
    prefix, which names the :data:`STATE_TOPICS` (never sent back)."""
    kept = headers or {}
    state_topics = frozenset(spec.full_name(topic_prefix) for spec in STATE_TOPICS)
    plan = RedrivePlan()
    planned: dict[tuple[str, bytes | None, str], Send] = {}
    for letter in letters:
        plan.read += 1
        if isinstance(letter, InvalidRecord):
            plan.undecodable += 1
            continue
        plan.stages[letter.stage] += 1
        if not selection.matches(letter):
            continue
        unplaced = None if source_is_kafka(letter) else whole_transaction(letter, transactions)
        outcome = _outcome(letter, topics, watchlist, selection.include_permanent, unplaced is not None)
        if letter.source_topic in state_topics:
            outcome = STATE_RECORD
        letter_headers = kept.get(letter.dead_letter_id, ())
        if outcome == REDRIVE and letter_headers is None:
            outcome = HEADERS_CUT
        if outcome == REDRIVE and letter_headers is not None:
            content = (letter.source_topic, letter.key, hashlib.sha256(letter.payload).hexdigest())
            if content in planned:
                outcome = DUPLICATE
            else:
                planned[content] = _send(letter, topics[letter.source_topic], letter_headers, unplaced)
        plan.counts[(letter.stage, letter.error_kind, outcome)] += 1
    ordered = sorted(planned.values(), key=lambda s: (s.failed_at, s.dead_letter_id))
    plan.sends = ordered if limit is None else ordered[: max(0, limit)]
    for send in ordered[len(plan.sends) :]:
        plan.counts[(send.stage, send.kind, REDRIVE)] -= 1
        plan.counts[(send.stage, send.kind, OVER_LIMIT)] += 1
    return plan


def _outcome(
    letter: DeadLetter, topics: Mapping[str, int], watchlist: str, include_permanent: bool, unplaced: bool = False
) -> str:
    if letter.source_topic == watchlist:
        return WATCHLIST_ENTRY
    if is_truncated(letter):
        return TRUNCATED
    if not source_is_kafka(letter) and not unplaced:
        return NOT_KAFKA
    if letter.source_topic not in topics:
        return NO_TOPIC
    if not include_permanent and not is_retryable(letter.error_kind):
        return PERMANENT
    return REDRIVE


def _send(letter: DeadLetter, partitions: int, headers: Headers = (), unplaced: PosTransaction | None = None) -> Send:
    """The letter's send; a transaction without a known position goes keyed as the POS producers key it
    (:func:`producers.pos.message_key`), to the partition that key picks."""
    return Send(
        dead_letter_id=letter.dead_letter_id,
        topic=letter.source_topic,
        partition=letter.partition if 0 <= letter.partition < partitions else None,
        key=message_key(unplaced) if unplaced is not None else letter.key,
        payload=letter.payload,
        failed_at=letter.failed_at,
        stage=letter.stage,
        kind=letter.error_kind,
        headers=headers,
    )


def selection_from_options(
    stages: list[str],
    kinds: list[str] | None,
    since: str | None,
    until: str | None,
    source_topics: list[str] | None,
    topic_prefix: str,
    include_permanent: bool = False,
) -> Selection:
    """CLI options -> a :class:`Selection`; a logical topic name (``alerts``) gets the topic prefix.
    :class:`RangeError` for a bad time or a ``since`` later than ``until``: it would match no letter, and "0 to
    re-drive" reads as nothing left to re-drive."""
    logical = {spec.name for spec in ALL_TOPICS}
    since_ms = option_time_ms("--since", since) if since else None
    until_ms = option_time_ms("--until", until) if until else None
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        raise RangeError(f"--since {since} is later than --until {until}: no letter could match (swapped?)")
    return Selection(
        stages=frozenset(stages),
        kinds=frozenset(kinds or ()),
        since_ms=since_ms,
        until_ms=until_ms,
        source_topics=frozenset(f"{topic_prefix}{t}" if t in logical else t for t in source_topics or ()),
        include_permanent=include_permanent,
    )


def deleted_warning(deleted: Mapping[int, int]) -> str | None:
    """The warning for letters retention deleted while they were being read, or ``None``: they are neither counted
    nor re-driven, and without a word the counts read as every letter of the topic."""
    return topic_replay.deleted_warning(
        deleted, "dead letter(s)", "are not counted nor re-driven: their payloads are gone"
    )


def counts_table(plan: RedrivePlan, dry_run: bool) -> Table:
    """One row per stage and kind, one column per outcome that occurred."""
    outcomes = [o for o in OUTCOMES if any(n for (_, _, out), n in plan.counts.items() if out == o)]
    rows = sorted({(stage, kind) for stage, kind, _ in plan.counts})
    table = Table(title="dead letters selected" + (" (dry run: nothing sent)" if dry_run else ""), show_edge=False)
    table.add_column("stage")
    table.add_column("kind")
    for outcome in outcomes:
        table.add_column("would re-drive" if dry_run and outcome == REDRIVE else outcome, justify="right")
    for stage, kind in rows:
        table.add_row(stage, kind, *(f"{plan.counts[(stage, kind, o)]:,}" for o in outcomes))
    return table


# ---------------------------------------------------------------------------- Kafka


def read_dead_letters(
    settings: Settings,
    topic: str,
    idle_timeout_s: float = 30.0,
    deleted: dict[int, int] | None = None,
    headers: dict[str, Headers | None] | None = None,
) -> Iterator[DeadLetter | InvalidRecord]:
    """Every dead letter in ``topic`` from the beginning to its end when called (committed records only),
    decoded; one that cannot be decoded comes as its :class:`InvalidRecord`. Letters retention deletes while they
    are read (the topic keeps them days) are counted per partition in ``deleted``: an ``earliest`` reset skipped
    them without a word. The input headers each letter kept go into ``headers`` by its id (for :func:`plan_redrive`)."""
    ranges = plan_ranges(settings.kafka, topic, Bound(), Bound())
    read = read_range_records(
        settings.kafka,
        topic,
        ranges,
        "redrive",
        idle_timeout_s=idle_timeout_s,
        deleted={} if deleted is None else deleted,
    )
    for message in read:
        try:
            letter = DeadLetter.decode(message.value() or b"")
        except InvalidRecord as exc:  # a DecodeError too
            yield exc
            continue
        raw = message.headers()
        kept = input_headers(raw.items() if isinstance(raw, dict) else raw)
        if headers is not None and (kept is None or kept):
            headers[letter.dead_letter_id] = kept
        yield letter


def cluster_topics(settings: Settings) -> dict[str, int]:
    """The cluster's topics and their partition counts, less those not usable now (:func:`kafka_clients.topic_unusable`:
    an error of the topic or of a partition, or a partition without a leader), whose letters are skipped as
    :data:`NO_TOPIC`: each letter is sent to the partition it came from (or the one its key picks), that partition's
    leader, and judged by the topic's own error only, a send to a leaderless partition timed out minutes later."""
    with kafka_clients.admin_session(settings) as admin:
        metadata = kafka_clients.cluster_metadata(admin, settings)
    return {
        name: len(t.partitions) for name, t in metadata.topics.items() if kafka_clients.topic_unusable(name, t) is None
    }


def restored(headers: Headers) -> Headers:
    """The input's headers to send again, less an earlier re-drive's mark (the copy gets its own, and one only)."""
    return tuple((name, value) for name, value in headers if name != REDRIVEN_HEADER)


class SendStats(kafka_clients.DeliveryTally):
    """Re-driven records and their acknowledgements."""


def send_all(settings: Settings, sends: list[Send], timeout_s: float = 60.0) -> SendStats:
    """Produce every planned send with an idempotent producer and wait for the acknowledgements."""
    stats = SendStats()
    producer = kafka_clients.producer(
        settings, kafka_clients.RELIABLE, client_id="checkout-guard-redrive", partitioner="murmur2_random"
    )
    for send in sends:
        kafka_clients.produce(
            producer,
            send.topic,
            send.key,
            send.payload,
            stats.delivered,
            headers=[*restored(send.headers), (REDRIVEN_HEADER, send.dead_letter_id.encode())],
            partition=send.partition,
        )
        stats.sent += 1
        producer.poll(0)
    stats.flushed(producer.flush(timeout_s), timeout_s)
    return stats


# ---------------------------------------------------------------------------- CLI

cli = typer.Typer(add_completion=False, help="Re-drive dead letters back to the Kafka topic they came from.")


@cli.command()
def main(
    stage: Annotated[
        list[str], typer.Option(help="Stage whose dead letters to re-drive (repeatable), e.g. alert-sender.")
    ],
    kind: Annotated[
        list[str] | None, typer.Option(help="Only these error kinds (repeatable), e.g. delivery_failed.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only letters dead-lettered at/after this time (ISO-8601, epoch ms, now).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only letters dead-lettered before this time.")] = None,
    source_topic: Annotated[
        list[str] | None, typer.Option(help="Only letters from these topics (repeatable; logical or full names).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Re-drive at most this many (the oldest first).", min=0)] = None,
    include_permanent: Annotated[
        bool,
        typer.Option(
            "--include-permanent",
            help="Also re-drive kinds that fail again on the same bytes (invalid records, schema errors); by default"
            " only " + ", ".join(sorted(RETRYABLE_KINDS)) + " are re-driven, the others counted.",
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be re-driven; send nothing.")] = False,
) -> None:
    """Read the dead letters up to now, choose, and produce the chosen payloads back to their source topics."""
    settings = get_settings()
    prefix = settings.kafka.topic_prefix
    dead_topic = DEAD_LETTERS.full_name(prefix)
    try:
        selection = selection_from_options(stage, kind, since, until, source_topic, prefix, include_permanent)
        topics = cluster_topics(settings)
        watchlist = WATCHLIST.full_name(prefix)
        deleted: dict[int, int] = {}
        kept: dict[str, Headers | None] = {}
        letters = read_dead_letters(settings, dead_topic, deleted=deleted, headers=kept)
        transactions = TRANSACTIONS.full_name(prefix)
        plan = plan_redrive(letters, selection, topics, limit, watchlist, kept, transactions, prefix)
    except NoSuchTopic as exc:  # the dead-letters topic missing: the cluster's state, not a bad option
        typer.echo(f"Error: {exc} (the wrong cluster, or another CG_KAFKA__TOPIC_PREFIX?)", err=True)
        raise typer.Exit(1) from None
    except RangeError as exc:  # a bad option
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (TimeoutError, RuntimeError) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(counts_table(plan, dry_run))
    console.print(
        f"{plan.read:,} dead letter(s) read from {dead_topic}"
        + (f", {plan.undecodable:,} undecodable" if plan.undecodable else "")
        + f"; {len(plan.sends):,} to re-drive",
        markup=False,
        highlight=False,
    )
    permanent = plan.outcome_total(PERMANENT)
    if permanent:
        console.print(
            f"{permanent:,} permanent failure(s) skipped (their kind fails again on the same bytes);"
            " --include-permanent re-drives them too",
            markup=False,
            highlight=False,
        )
    state = plan.outcome_total(STATE_RECORD)
    if state:
        console.print(
            f"{state:,} record(s) of {', '.join(spec.name for spec in STATE_TOPICS)} skipped: sent back, each would be"
            " taken for the newest of its key. Instead, publish a rule set again with `checkout-guard rules publish`;"
            " once OpenSearch takes the documents, the OpenSearch sink on a fresh consumer group indexes what labels"
            " and cases hold now and repeats every forget",
            markup=False,
            highlight=False,
        )
    if not plan.counts and plan.stages:
        found = ", ".join(f"{name} ({n:,})" for name, n in sorted(plan.stages.items()))
        errors.print(f"no dead letter matched; stages in {dead_topic}: {found}", markup=False, highlight=False)
    gone = deleted_warning(deleted)
    if gone is not None:
        errors.print(f"Warning: {gone}", style="yellow", markup=False, highlight=False)
    if dry_run or not plan.sends:
        raise typer.Exit(0 if gone is None else 1)
    stats = send_all(settings, plan.sends)
    console.print(
        f"re-driven {stats.acked:,} of {len(plan.sends):,} ({stats.failed:,} failed)",
        style="green" if stats.failed == 0 else "red",
        markup=False,
        highlight=False,
    )
    for error in stats.errors:
        errors.print(f"delivery error: {error}", style="red", markup=False, highlight=False)
    raise typer.Exit(0 if stats.failed == 0 and gone is None else 1)


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(cli)
