"""``python -m producers.labels``: publish confirmed fraud / legitimate verdicts to the ``labels`` topic.

A verdict from the field -- an analyst closing a case, a chargeback from the card issuer, a person at the
command line -- becomes a :class:`~schemas.records.Label` keyed by its transaction id on the compacted
``labels`` topic, where the last verdict published for a transaction is the one in force (a ``withdraw``
tombstone removes it). The model's ``train`` reads the topic (``jobs.model.labels``) and joins the
verdicts to the transaction history, so the next model learns from what people confirmed.

``import`` takes a CSV of chargebacks in one of two shapes (the header decides):

- simple: ``transaction_id,label`` and optionally ``reason``, ``decided_at`` (ISO-8601 or epoch ms),
  ``decided_by``, ``case_id``; ``label`` is fraud / legit (legitimate) / 1 / 0;
- Amazon Fraud Detector's: ``EVENT_ID`` is the transaction, ``EVENT_LABEL`` the verdict; rows without a
  label are skipped (other columns are ignored).

Every row is checked first; a bad row (an id that is not a plain id, no verdict, a time in the future,
a quote left open, two different verdicts for one transaction in the file) is reported with its line and reason and not
published, the others are (``--strict``: nothing is published when any row is bad; ``--dry-run``:
nothing at all). Of rows giving one transaction the same verdict, the one decided last (``decided_at``; the
lower row when two say the same time) is published, as the topic would keep it; a row without a ``decided_at``
loses to every row with one (of several without, the lower row is published); the others are superseded,
listed by line in the summary.

Delivery: an idempotent producer (``acks=all``), keys partitioned like the Java client (murmur2), so every
producer of the topic -- this CLI, the case workflow -- puts one transaction's verdicts in one partition
and compaction keeps its latest. Each verdict's ``label_id`` is ``<source>:<decided_at>:<transaction>``,
so publishing the same verdict again repeats it rather than adding one; give ``--decided-at`` to make a
re-import of a file without a ``decided_at`` column produce the very same records.

Run: ``python -m producers.labels publish TX fraud|legit [--by NAME] [--reason TEXT] [--case ID]``,
``python -m producers.labels import CHARGEBACKS.csv [--source chargeback] [--dry-run] [--strict]``,
``python -m producers.labels withdraw TX`` (``make labels ARGS="..."``).
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, TextIO

import typer
from confluent_kafka import Producer
from rich.console import Console

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.topic_replay import RangeError, TimeOutOfRange, parse_time_ms
from infra.os_user import os_user
from infra.settings import Settings, get_settings
from schemas.afd_csv import undecodable
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import check
from schemas.records import FRAUD, LABEL_SOURCES, LABEL_WORDS, Label, make_label
from schemas.topics import LABELS

console = Console()
errors = Console(stderr=True)

VERDICTS = LABEL_WORDS
"""What a verdict may be written as (any case)."""
MAX_FUTURE_MS = 5 * 60 * 1000
"""A verdict time further ahead of now than this is a typo (it would look newer than any real one)."""
SIMPLE = "simple"
FRAUD_DETECTOR = "fraud-detector"
SHOWN_BAD_ROWS = 50
"""Bad rows (and superseded ones) listed one by one; the rest are counted."""


class LabelFileError(CheckoutGuardError, ValueError):
    """The file as a whole cannot be imported (empty, no usable header)."""


# ---------------------------------------------------------------------------- pure: verdicts from rows


def parse_verdict(text: object) -> int:
    """``fraud`` / ``1`` -> 1, ``legit`` / ``legitimate`` / ``0`` -> 0 (any case); else ``InvalidRecord``."""
    verdict = VERDICTS.get(str(text).strip().lower()) if text is not None else None
    if verdict is None:
        raise InvalidRecord("invalid", "the verdict is not fraud, legit, legitimate, 1 or 0")
    return verdict


def parse_decided_at(text: str, now_ms: int) -> int:
    """A verdict time (ISO-8601, epoch ms or ``now``) that is not in the future; else ``InvalidRecord``."""
    try:
        moment = parse_time_ms(text, now_ms)
    except TimeOutOfRange as exc:
        bound = "before 1970-01-01 (times are milliseconds since then)" if exc.early else "after 9999-12-31 in UTC"
        raise InvalidRecord("invalid_timestamp", f"decided_at is {bound}") from None
    except RangeError:
        raise InvalidRecord("invalid_timestamp", "decided_at is not ISO-8601 or epoch milliseconds") from None
    if moment > now_ms + MAX_FUTURE_MS:
        raise InvalidRecord("invalid_timestamp", "decided_at is in the future")
    return moment


@dataclass(frozen=True)
class BadRow:
    line: int
    """Physical line (1-based) where the row starts."""
    reason: str


@dataclass(frozen=True)
class Superseded:
    """A row not published: another row gives its transaction the same verdict, decided later (as late: further
    on), or with its own ``decided_at`` where this row gives none."""

    line: int
    by: int
    """The line of the row published instead."""


@dataclass
class LabelImport:
    """What a label file holds: the verdicts to publish and what was left out, and why."""

    format: str
    labels: list[Label] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    unlabelled: int = 0
    """Fraud Detector rows without an ``EVENT_LABEL`` (not verdicts, skipped)."""
    superseded: list[Superseded] = field(default_factory=list)
    """Rows giving a transaction the verdict another row of the file gives it with a later ``decided_at`` (or the
    same, further down; or any, where the row gives none): only that row is published."""
    rows: int = 0

    @property
    def duplicates(self) -> int:
        return len(self.superseded)

    @property
    def fraud(self) -> int:
        return sum(1 for label in self.labels if label.label == FRAUD)

    @property
    def legit(self) -> int:
        return len(self.labels) - self.fraud


def detect_format(header: Sequence[str]) -> str:
    """:data:`SIMPLE` (``transaction_id``, ``label``) or :data:`FRAUD_DETECTOR` (``EVENT_ID``, ``EVENT_LABEL``)."""
    listed = [name.strip().lower() for name in header if name.strip()]
    if twice := sorted({name for name in listed if listed.count(name) > 1}):  # as the model's CSV reader
        raise LabelFileError(f"the header names column(s) {', '.join(twice)} more than once")
    names = set(listed)
    if {"transaction_id", "label"} <= names:
        return SIMPLE
    if {"event_id", "event_label"} <= names:
        return FRAUD_DETECTOR
    raise LabelFileError(
        "the header needs the columns transaction_id,label (optionally reason, decided_at, decided_by, case_id) "
        "or Fraud Detector's EVENT_ID,EVENT_LABEL"
    )


@dataclass(frozen=True)
class Defaults:
    """What a row does not say: the source, the verdict time and who decided, a reason."""

    source: str
    decided_at: int
    now_ms: int
    decided_by: str | None = None
    reason: str | None = None


def labels_from_rows(
    header: Sequence[str], rows: Iterable[tuple[int, Sequence[str] | InvalidRecord]], defaults: Defaults
) -> LabelImport:
    """The verdicts of a label file's rows (``(line, values)``; an unreadable row as its ``InvalidRecord``).

    Raises :class:`LabelFileError` for a header of neither format; every row problem is a :class:`BadRow`.
    A transaction given two different verdicts in the file is bad on each of its lines. Of the rows repeating one
    verdict, the one with the latest ``decided_at`` is published (a tie: the lower row, read last): the verdict
    in force on the topic is the one decided last, with that row's time, reason and who decided; the others
    are :class:`Superseded`. A row without its own ``decided_at`` (it takes the import's time, or
    ``--decided-at``) says nothing of when it was decided, so it loses to any row that gives one: the import
    time would otherwise beat every real time; among rows without one, the lower row wins."""
    fmt = detect_format(header)
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    out = LabelImport(format=fmt)
    seen: dict[str, list[tuple[int, Label]]] = {}
    dated: set[int] = set()  # lines with their own decided_at
    for line, values in rows:
        out.rows += 1
        try:
            row = _row_label(fmt, columns, len(header), values, defaults)
        except InvalidRecord as exc:
            out.bad.append(BadRow(line, exc.reason))
            continue
        if row is None:
            out.unlabelled += 1
            continue
        label, own_time = row
        if own_time:
            dated.add(line)
        seen.setdefault(label.transaction_id, []).append((line, label))
    for entries in seen.values():
        if len({label.label for _, label in entries}) > 1:
            lines = ", ".join(str(line) for line, _ in entries)
            out.bad.extend(
                BadRow(line, f"conflicting verdicts for this transaction on lines {lines}") for line, _ in entries
            )
            continue
        kept_line, kept = max(
            entries, key=lambda entry: (entry[0] in dated, entry[1].decided_at if entry[0] in dated else 0, entry[0])
        )
        out.labels.append(kept)
        out.superseded.extend(Superseded(line, kept_line) for line, _ in entries if line != kept_line)
    out.bad.sort(key=lambda bad: bad.line)
    out.superseded.sort(key=lambda row: row.line)
    return out


def _row_label(
    fmt: str, columns: dict[str, int], width: int, values: Sequence[str] | InvalidRecord, defaults: Defaults
) -> tuple[Label, bool] | None:
    """One row's verdict and whether the row gave its ``decided_at`` (None: a Fraud Detector row without a
    label); ``InvalidRecord`` when it is bad."""
    if isinstance(values, InvalidRecord):
        raise values
    if any(undecodable(value) for value in values):
        raise InvalidRecord(
            "not_utf8",
            "the row is not UTF-8 (saved in another encoding, as Excel's plain CSV is: save it as CSV UTF-8)",
        )
    if len(values) > width and any(value.strip() for value in values[width:]):
        # empty ones past the header are a spreadsheet's trailing separator (``tx-1,fraud,``), not data
        raise InvalidRecord("invalid", f"{len(values) - width} more field(s) than the header")

    def cell(name: str) -> str | None:
        i = columns.get(name)
        text = values[i].strip() if i is not None and i < len(values) else ""
        return text or None

    tx_column, label_column = ("transaction_id", "label") if fmt == SIMPLE else ("event_id", "event_label")
    transaction_id = cell(tx_column)
    if transaction_id is None:
        raise InvalidRecord("missing_field", f"{header_name(fmt, tx_column)} is empty")
    check(transaction_id, header_name(fmt, tx_column))
    verdict = cell(label_column)
    if verdict is None:
        if fmt == FRAUD_DETECTOR:
            return None
        raise InvalidRecord("missing_field", "label is empty")
    decided_at_text = cell("decided_at") if fmt == SIMPLE else None
    label = make_label(
        transaction_id=transaction_id,
        label=parse_verdict(verdict),
        source=defaults.source,
        decided_at=defaults.decided_at
        if decided_at_text is None
        else parse_decided_at(decided_at_text, defaults.now_ms),
        decided_by=(cell("decided_by") if fmt == SIMPLE else None) or defaults.decided_by,
        reason=(cell("reason") if fmt == SIMPLE else None) or defaults.reason,
        case_id=cell("case_id") if fmt == SIMPLE else None,
    )
    return label, decided_at_text is not None


def header_name(fmt: str, column: str) -> str:
    """A column as the file's format spells it (Fraud Detector's are upper case)."""
    return column.upper() if fmt == FRAUD_DETECTOR else column


DELIMITERS = (",", "\t", ";")
"""Separators a label file may use: commas, tabs (Excel's "Unicode text"), semicolons (Excel where the decimal
sign is a comma). The header line's most frequent one is the file's."""


class _Lines:
    """A file's physical lines for :func:`csv.reader`, numbered, remembering those of the row being read, and
    able to hand lines back to be read again (:meth:`again`)."""

    def __init__(self, f: TextIO) -> None:
        self._f = f
        self._read = 0
        self._again: list[tuple[int, str]] = []
        self._taken: list[tuple[int, str]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.pop()
        else:
            line = self._f.readline()
            if not line:
                raise StopIteration
            self._read += 1
            number = self._read
        self._taken.append((number, line))
        return line

    def take(self) -> list[tuple[int, str]]:
        """The lines handed out since the last call (the row just read), with their numbers."""
        taken, self._taken = self._taken, []
        return taken

    def again(self, lines: Sequence[tuple[int, str]]) -> None:
        """Hand ``lines`` out again, in their order, before the rest of the file."""
        self._again.extend(reversed(lines))


def _verdict_line(header: Sequence[str], delimiter: str) -> Callable[[str], bool]:
    """Whether one physical line, read alone, is a row giving a transaction a verdict (a transaction id and a
    verdict word in their columns); always false for a header of neither format."""
    try:
        fmt = detect_format(header)
    except LabelFileError:
        return lambda _line: False
    names = [name.strip().lower() for name in header]
    tx_column, label_column = ("transaction_id", "label") if fmt == SIMPLE else ("event_id", "event_label")
    tx, verdict = names.index(tx_column), names.index(label_column)

    def test(line: str) -> bool:
        values = next(csv.reader([line], delimiter=delimiter), [])
        return (
            len(values) > max(tx, verdict) and bool(values[tx].strip()) and values[verdict].strip().lower() in VERDICTS
        )

    return test


def _inside_quote(taken: Sequence[tuple[int, str]], delimiter: str) -> Sequence[tuple[int, str]]:
    """The lines after the first of a row that spans several, which lie wholly inside its open quoted field: all of
    them when the quote is never closed as ``csv`` wants it closed (at the end of the file, or followed by more
    text), else all but the last, which closes the field and holds the rest of the row's fields."""
    try:
        for _ in csv.reader([line for _, line in taken], delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return taken[1:]
    return taken[1:-1]


def read_label_csv(f: TextIO) -> tuple[list[str], list[tuple[int, list[str] | InvalidRecord]]]:
    """The header and the data rows (``(line, values)``) of a CSV; blank lines are skipped (before the header too:
    exports and hand edits leave some, and the file was refused as having no header) and a row that ``csv``
    refuses is kept as its ``InvalidRecord``. :class:`LabelFileError` when there is no header.

    A field that opens a quote runs on over the next lines until one closes it (a reason written on two lines).
    Where one of those lines is a verdict row of its own, the quote was never closed: that row is bad on its
    first line and the lines after it are read again as rows. Taken as one field, an unclosed quote put every
    later verdict of the file into one reason, none of them published and none reported."""
    lines = _Lines(f)
    first = next(lines, "")
    while first and not first.strip():
        lines.take()
        first = next(lines, "")
    delimiter = max(DELIMITERS, key=first.count)
    lines.again(lines.take())  # the header line, for the reader
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise LabelFileError("the file is empty") from None
    except csv.Error as exc:
        raise LabelFileError(f"the header cannot be read: {exc}") from None
    if any(undecodable(name) for name in header):  # a binary file, another encoding: not "columns missing"
        raise LabelFileError(
            f"the header cannot be read: line {lines.take()[0][0]} is not UTF-8 (a binary file, or text saved in "
            "another encoding, as Excel's plain CSV is: save it as CSV UTF-8)"
        )
    lines.take()
    own_row = _verdict_line(header, delimiter)
    rows: list[tuple[int, list[str] | InvalidRecord]] = []
    while True:
        error: InvalidRecord | None = None
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            values, error = [], InvalidRecord("invalid", f"the row cannot be read: {exc}")
        taken = lines.take()
        if not taken:
            break
        start = taken[0][0]
        if len(taken) > 1 and any(own_row(line) for _, line in _inside_quote(taken, delimiter)):
            lines.again(taken[1:])
            rows.append(
                (
                    start,
                    InvalidRecord("invalid", f"a quote opened on this line is not closed before line {taken[1][0]}"),
                )
            )
        elif error is not None:
            rows.append((start, error))
        elif any(value.strip() for value in values):
            rows.append((start, values))
    return header, rows


def file_encoding(path: Path) -> str:
    """UTF-16 where the file starts with its byte-order mark (Excel's "Unicode text" export), else UTF-8 (with or
    without a BOM)."""
    with path.open("rb") as f:
        start = f.read(2)
    return "utf-16" if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"


def decode_errors(encoding: str) -> str:
    """How to read bytes that are not text in ``encoding``: kept (``surrogateescape``) in a UTF-8 file, so that its
    row is refused (:func:`schemas.afd_csv.undecodable`); replaced with U+FFFD took a Windows-1252 export's
    ``Rückbuchung`` as ``R\ufffdckbuchung`` and published it. UTF-16 keeps ``replace``: a broken pair's bytes below
    0x80 cannot be kept."""
    return "replace" if encoding == "utf-16" else "surrogateescape"


def labels_from_csv(f: TextIO, defaults: Defaults) -> LabelImport:
    """:func:`read_label_csv` then :func:`labels_from_rows`."""
    header, rows = read_label_csv(f)
    return labels_from_rows(header, rows, defaults)


# ---------------------------------------------------------------------------- Kafka


class _Producer(Protocol):
    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float) -> int: ...
    def flush(self, timeout: float) -> int: ...


class PublishStats(kafka_clients.DeliveryTally):
    """Labels and tombstones sent to the labels topic, and their acknowledgements."""


def make_producer(settings: Settings) -> Producer:
    """Idempotent, ``acks=all``, keys partitioned as the Java client does (one transaction, one partition,
    whichever client published)."""
    return kafka_clients.producer(
        settings, kafka_clients.RELIABLE, client_id="checkout-guard-labels", partitioner="murmur2_random"
    )


def publish_labels(
    settings: Settings,
    labels: Sequence[Label],
    *,
    withdraw: Sequence[str] = (),
    producer: _Producer | None = None,
    timeout_s: float = 60.0,
) -> PublishStats:
    """Produce each label keyed by its transaction id (and a tombstone for each id in ``withdraw``) to the
    labels topic; wait for every acknowledgement. ``KafkaUnavailable`` (nothing sent) when no broker answers."""
    stats = PublishStats()

    topic = LABELS.full_name(settings.kafka.topic_prefix)
    if producer is None:
        producer = make_producer(settings)
        kafka_clients.require_topics(producer, settings, topic)  # Kafka down: one error now, not a minute's wait
    records: list[tuple[str, bytes | None]] = [(label.transaction_id, label.encode()) for label in labels]
    records += [(check(tx, "transaction_id"), None) for tx in withdraw]
    for key, value in records:
        kafka_clients.produce(producer, topic, key.encode(), value, stats.delivered)
        stats.sent += 1
        producer.poll(0)
    stats.flushed(producer.flush(timeout_s), timeout_s)
    return stats


# ---------------------------------------------------------------------------- CLI

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Publish confirmed fraud / legitimate verdicts for transactions to the labels topic.",
)

SourceOption = Annotated[str, typer.Option(help=f"Where the verdict comes from: {', '.join(LABEL_SOURCES)}.")]
DecidedAtOption = Annotated[
    str | None, typer.Option(help="When the verdict was reached (ISO-8601, epoch ms or now; default now).")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    errors.print(message, style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _source(source: str) -> str:
    if source not in LABEL_SOURCES:
        raise _fail(f"--source must be one of {', '.join(LABEL_SOURCES)}")
    return source


def _decided_at(text: str | None, now_ms: int) -> int:
    try:
        return now_ms if text is None else parse_decided_at(text, now_ms)
    except InvalidRecord as exc:
        raise _fail(f"--decided-at: {exc.reason}") from None


def cli_user() -> str:
    """Who runs the command (the login name, else ``uid:<n>``), as ``decided_by`` of a CLI verdict."""
    return os_user()


def _report(stats: PublishStats, topic: str) -> None:
    console.print(
        f"published {stats.acked:,} of {stats.sent:,} to {topic} ({stats.failed:,} failed)",
        style="green" if stats.ok else "red",
        markup=False,
        highlight=False,
    )
    for error in stats.errors:
        errors.print(f"delivery error: {error}", style="red", markup=False, highlight=False)


@app.command("publish")
def publish_command(
    transaction_id: Annotated[str, typer.Argument(metavar="TX_ID", help="The transaction the verdict is about.")],
    verdict: Annotated[str, typer.Argument(metavar="fraud|legit", help="fraud, legit (legitimate), 1 or 0.")],
    by: Annotated[str | None, typer.Option(help="Who decided (default: your login name).")] = None,
    reason: Annotated[str | None, typer.Option(help="Why, in a few words.")] = None,
    case: Annotated[str | None, typer.Option(help="The case id the verdict closes.")] = None,
    source: SourceOption = "cli",
    decided_at: DecidedAtOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and show the verdict; send nothing.")] = False,
) -> None:
    """Publish one verdict for one transaction."""
    settings = get_settings()
    now = clock.now_ms()
    try:
        label = make_label(
            transaction_id=transaction_id,
            label=parse_verdict(verdict),
            source=_source(source),
            decided_at=_decided_at(decided_at, now),
            decided_by=by if by is not None else cli_user(),
            reason=reason,
            case_id=case,
        )
    except InvalidRecord as exc:
        raise _fail(exc.reason) from None
    word = "fraud" if label.label == FRAUD else "legitimate"
    line = f"{label.transaction_id}: {word} ({label.label_id})"
    if dry_run:
        console.print(f"{line}: checked, not sent (--dry-run)", markup=False, highlight=False)
        raise typer.Exit(0)
    stats = publish_labels(settings, [label])  # first: with Kafka down, only the error is shown
    # A timeout may still have been written: "not published" would be a lie then (publishing again is harmless).
    outcome = "" if stats.ok else ": not confirmed (publish it again)" if stats.unconfirmed else ": not published"
    console.print(f"{line}{outcome}", markup=False, highlight=False)
    _report(stats, LABELS.full_name(settings.kafka.topic_prefix))
    raise typer.Exit(0 if stats.ok else 1)


@app.command("withdraw")
def withdraw_command(
    transaction_ids: Annotated[list[str], typer.Argument(metavar="TX_ID...", help="Transactions to un-label.")],
) -> None:
    """Withdraw the field verdicts on transactions (a tombstone each): training no longer uses them, and a
    transaction keeps the label its own data carries, if any (a CSV's EVENT_LABEL)."""
    settings = get_settings()
    try:
        ids = [check(tx, "transaction_id") for tx in transaction_ids]
    except InvalidRecord as exc:
        raise _fail(exc.reason) from None
    stats = publish_labels(settings, [], withdraw=ids)
    _report(stats, LABELS.full_name(settings.kafka.topic_prefix))
    raise typer.Exit(0 if stats.ok else 1)


@app.command("import")
def import_command(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="transaction_id,label[,...] or Fraud Detector CSV.")],
    source: SourceOption = "chargeback",
    by: Annotated[str | None, typer.Option(help="Who decided, for rows that do not say (e.g. the issuer).")] = None,
    reason: Annotated[str | None, typer.Option(help="Reason for rows that do not give one.")] = None,
    decided_at: DecidedAtOption = None,
    strict: Annotated[bool, typer.Option("--strict", help="Publish nothing when any row is bad.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file and count; send nothing.")] = False,
) -> None:
    """Check every row of a chargeback / verdict CSV, report the bad ones, publish the others."""
    settings = get_settings()
    now = clock.now_ms()
    defaults = Defaults(
        source=_source(source), decided_at=_decided_at(decided_at, now), now_ms=now, decided_by=by, reason=reason
    )
    try:
        encoding = file_encoding(csv_path)
        with csv_path.open(newline="", encoding=encoding, errors=decode_errors(encoding)) as f:
            found = labels_from_csv(f, defaults)
    except OSError as exc:
        raise _fail(f"{csv_path}: {exc.strerror or exc}") from None
    except LabelFileError as exc:
        raise _fail(f"{csv_path}: {exc}") from None
    for bad in found.bad[:SHOWN_BAD_ROWS]:
        errors.print(f"line {bad.line}: {bad.reason}", style="red", markup=False, highlight=False, soft_wrap=True)
    if len(found.bad) > SHOWN_BAD_ROWS:
        errors.print(f"... and {len(found.bad) - SHOWN_BAD_ROWS:,} more bad row(s)", style="red")
    console.print(
        f"{found.rows:,} row(s) in {csv_path.name} ({found.format}): {len(found.labels):,} verdict(s) "
        f"({found.fraud:,} fraud, {found.legit:,} legit), {len(found.bad):,} bad, "
        f"{found.unlabelled:,} unlabelled, {len(found.superseded):,} superseded",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for row in found.superseded[:SHOWN_BAD_ROWS]:
        console.print(
            f"line {row.line}: superseded by line {row.by} (the same verdict for the transaction, decided as late "
            "or later): not published",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    if len(found.superseded) > SHOWN_BAD_ROWS:
        console.print(f"... and {len(found.superseded) - SHOWN_BAD_ROWS:,} more superseded row(s)", markup=False)
    if strict and found.bad:
        raise _fail("--strict: bad rows, nothing published")
    if not found.labels:  # a script must not take a file of bad rows (or none) for a published batch
        raise _fail(f"{csv_path.name}: no verdicts to publish", 1)
    if dry_run:
        raise typer.Exit(0)
    stats = publish_labels(settings, found.labels)
    _report(stats, LABELS.full_name(settings.kafka.topic_prefix))
    raise typer.Exit(0 if stats.ok else 1)


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
