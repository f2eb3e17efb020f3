"""Amazon Fraud Detector's training CSV (``EVENT_TIMESTAMP``, ``EVENT_LABEL``, variables) as ``PosTransaction``.

The format contract, pure: the CSV replay producer publishes these rows, the model's ``train``,
``evaluate`` and ``backtest`` read them. Rows are taken in ``EVENT_TIMESTAMP`` order (a stable sort,
so rows with equal timestamps keep their file order; rows whose timestamp cannot be parsed sort last
and are then reported as unmappable).

One bad row never stops a file: a row that cannot even be read (bytes that are not UTF-8, more than
:data:`MAX_ROW_CHARS`, a field longer than :data:`MAX_FIELD_CHARS`, anything ``csv`` refuses) is kept
in its place as an :class:`UnreadableRow`, and :func:`row_to_transaction` raises its
:class:`InvalidRecord` like that of any unmappable row (a wrong number, NaN or infinite amounts, an id
with path characters: ``invalid_id``), so each caller dead-letters or reports that row and goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import check, check_name
from schemas.records import COORDINATE_BOUNDS, CURRENCY_RE, LABEL_WORDS, LineItem, PosTransaction

REQUIRED_COLUMNS = ("EVENT_TIMESTAMP", "EVENT_ID", "order_price", "payment_currency", "merchant")
"""Without these no row could be mapped, so a header lacking one is rejected up front."""


ONLINE_LANE = "online"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_MS = timedelta(milliseconds=1)


MAX_EVENT_TIME_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z: a later ``EVENT_TIMESTAMP`` is a typo or an attack on event time."""


MAX_ROW_CHARS = 64 * 1024
"""A longer row (all its physical lines) is dead-lettered as ``oversized``; Fraud Detector rows are ~500."""


MAX_ROW_LINES = 8
"""A row may span this many physical lines (inside quoted fields); past that it is an unclosed quote."""


MAX_FIELD_CHARS = 4096
"""A longer field is ``oversized`` (the longest in the AWS sample is 146)."""


AFD_ENTITY_ID_RE = re.compile(r"[0-9A-Za-z_.@+-]{1,256}")
"""What Fraud Detector takes as an entity id (``ENTITY_ID`` of its training data, ``entityId`` of
``GetEventPrediction``): ``^[0-9A-Za-z_.@+-]+$``, at most 256. Our ids (``schemas.identifiers.ID_RE``) also allow
``:`` (``loyalty:42``), so such an id goes through :func:`afd_entity_id`."""


AFD_MAX_VARIABLE_CHARS = 8192
"""Fraud Detector refuses an event variable's value longer than this (a whole call, ``ValidationException``)."""


def afd_entity_id(customer_id: str) -> str:
    """``customer_id`` as Fraud Detector takes it: unchanged when it already matches :data:`AFD_ENTITY_ID_RE`, else
    ``h_`` and the first 32 hex digits (128 bits) of its SHA-256. Deterministic, so the entity a detector was trained
    on is the one it is asked about, wherever the id is written for it; two of our ids meet only on a SHA-256
    collision (or an id that is itself ``h_`` and 32 hex digits)."""
    if AFD_ENTITY_ID_RE.fullmatch(customer_id):
        return customer_id
    return "h_" + hashlib.sha256(customer_id.encode()).hexdigest()[:32]


_MAX_SLUG = 64
"""A store id is a name (``schemas.identifiers.NAME_RE``): at most 64 characters."""


_NOISE_PREFIX = re.compile(r"^fraud_", re.IGNORECASE)


_LABELS: dict[str, int | None] = {**LABEL_WORDS, "": None}


_TEXT_FIELDS = (
    "customer_email",
    "customer_name",
    "customer_job",
    "billing_phone",
    "ip_address",
    "user_agent",
    "billing_street",
    "billing_city",
    "billing_state",
    "billing_zip",
    "billing_country",
)


class CsvFormatError(CheckoutGuardError, ValueError):
    """The file as a whole cannot be replayed (e.g. a required column is missing)."""


def _shown(value: object) -> str:
    """``value`` for a reason: short (a row may be hostile, and reasons are printed and stored)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def parse_event_timestamp(value: str) -> int:
    """ISO 8601 -> epoch milliseconds after 1970-01-01T00:00:00Z and before 2100; a timestamp without offset is
    taken as UTC (Fraud Detector's). ``invalid_timestamp`` raised otherwise. The epoch itself is refused, as the
    scoring job refuses an ``event_time`` of 0 (a null date exported as the epoch): taken, it sorted first and
    ``replay-csv --time-scale`` paced every later row from 1970, waiting decades divided by the scale."""
    text = value.strip()
    if not text:
        raise InvalidRecord("invalid_timestamp", "EVENT_TIMESTAMP is empty")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRecord("invalid_timestamp", f"EVENT_TIMESTAMP {_shown(value)} is not ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    millis = (parsed - _EPOCH) // _MS
    if not 0 < millis < MAX_EVENT_TIME_MS:
        raise InvalidRecord(
            "invalid_timestamp", f"EVENT_TIMESTAMP {_shown(value)} is not after 1970-01-01T00:00:00Z and before 2100"
        )
    return millis


def _other_script(char: str) -> bool:
    """A letter or digit of a script other than Latin, which the ASCII slug loses (``東``, ``Д``, ``١``); not a
    Latin letter with no ASCII form (``ß``), a modifier letter (``ʻ``), nor a sign or symbol read as a letter
    (``µ``, ``ℵ``): those dropped out of every id before, as they still do."""
    if unicodedata.category(char) not in ("Lu", "Ll", "Lt", "Lo", "Nd"):
        return False
    if any(c.isascii() and c.isalnum() for c in unicodedata.normalize("NFKD", char)):
        return False  # an accented or full-width form of an ASCII letter or digit
    label = unicodedata.name(char, "")
    return not label.startswith("LATIN ") and "SIGN" not in label and "SYMBOL" not in label


def _hashed_words(name: str) -> str:
    """The letters, digits and marks of an NFKD ``name``, casefolded, words joined by ``-``: a mark on another
    script's letter counts (``दाल`` is not ``दिल``), one on a Latin letter does not (``Kafé`` is ``Kafe``)."""
    out: list[str] = []
    latin = True
    for char in name:
        kind = unicodedata.category(char)[0]
        if kind == "M":
            if not latin:
                out.append(char)
            continue
        if kind in "LN":
            latin = char.isascii() or unicodedata.name(char, "").startswith("LATIN ")
            out.append(char)
        else:
            latin = True
            out.append(" ")
    return "-".join("".join(out).casefold().split())


def merchant_slug(merchant: str) -> str:
    """Stable store id from a merchant name: ``"fraud_Lowe, Dietrich and Erdman"`` ->
    ``"lowe-dietrich-and-erdman"``. The ``fraud_`` prefix of the AWS sample data is on every row and
    means nothing, so it is dropped. Case, punctuation and accents fold away (``"Café Zoë & Co."`` ->
    ``"cafe-zoe-co"``).

    A letter or digit of another script (``東京``, ``Москва``) would vanish from the slug, and different stores
    would share one id (``東京ストア 1`` and ``大阪ストア 1`` were both ``1``), so such a name's id is its ASCII
    slug, if any, then a hash of all its letters and digits (folded the same way): ``"1-<12 hex digits>"``.
    Latin letters with no ASCII form (``ß``, ``ø``) drop out as before, and marks and symbols (an emoji's
    variation selector) count for nothing, so that no id of a name read before changes. A name with none of
    those still gives no id."""
    given = _NOISE_PREFIX.sub("", merchant.strip())
    name = unicodedata.normalize("NFKD", given)
    slug = re.sub(r"[^a-z0-9]+", "-", name.encode("ascii", "ignore").decode().lower()).strip("-")
    if any(map(_other_script, given)):  # a letter or digit the slug lost: 12 hex digits keep even slug-less names apart
        digest = hashlib.sha256(_hashed_words(name).encode()).hexdigest()[:12]
        slug = f"{slug[: _MAX_SLUG - 13].rstrip('-')}-{digest}" if slug else digest
    if not slug:
        raise InvalidRecord("invalid_id", f"merchant {_shown(merchant)} gives no usable store id")
    if len(slug) > _MAX_SLUG:  # still a valid store name, still distinct: a cut plus a hash of the whole
        slug = f"{slug[: _MAX_SLUG - 9].rstrip('-')}-{hashlib.sha256(slug.encode()).hexdigest()[:8]}"
    return check_name(slug, "merchant")


def parse_label(value: str) -> int | None:
    """``EVENT_LABEL``: 1/fraud -> 1, 0/legit/legitimate -> 0, empty -> None (unlabelled)."""
    try:
        return _LABELS[value.strip().lower()]
    except KeyError:
        raise InvalidRecord("invalid", f"EVENT_LABEL {_shown(value)} is not 1/0/fraud/legit/legitimate/empty") from None


def _float(row: Mapping[str | None, object], name: str, bound: float = math.inf, kind: str = "invalid") -> float | None:
    """A finite number within ``[-bound, bound]`` (else ``kind``), or None when empty."""
    text = _text(row, name)
    if text is None:
        return None
    if not text.isascii() or "_" in text:  # float() also reads 1_000 and other scripts' digits (١٠٠, full-width)
        raise InvalidRecord(kind, f"{name} {_shown(text)} is not a number")
    try:
        value = float(text)
    except ValueError:
        raise InvalidRecord(kind, f"{name} {_shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise InvalidRecord(kind, f"{name} {_shown(text)} is not a finite number")
    if abs(value) > bound:
        raise InvalidRecord(kind, f"{name} {_shown(text)} is outside [-{bound:g}, {bound:g}]")
    return value


def _text(row: Mapping[str | None, object], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def row_to_transaction(row: Mapping[str | None, object]) -> PosTransaction:
    """One Fraud Detector CSV row (as from :class:`csv.DictReader` or :func:`read_rows`) as an online SALE.

    Raises :class:`InvalidRecord` (a ValueError) naming the offending column when the row cannot be
    mapped, and an :class:`UnreadableRow`'s own error. A row with more or fewer fields than the header
    (surplus under the ``None`` key, a missing one as ``None``, as ``csv.DictReader`` gives them) is
    refused: which column a field belongs to is then a guess.
    """
    if isinstance(row, UnreadableRow):
        raise row.error
    extra = row.get(None)
    if extra:
        raise InvalidRecord("invalid", f"{len(extra)} more field(s) than the header")  # type: ignore[arg-type]
    missing = [name for name, value in row.items() if name is not None and value is None]
    if any(missing):  # read as empty, a row one field short lost its last column: a trailing EVENT_LABEL, unlabelled
        raise InvalidRecord(
            "invalid", f"{len(missing)} fewer field(s) than the header: the row ends before {_shown(missing[0])}"
        )
    event_id = _text(row, "EVENT_ID")
    if event_id is None:
        raise InvalidRecord("missing_field", "EVENT_ID is empty")
    check(event_id, "EVENT_ID")
    event_time = parse_event_timestamp(_text(row, "EVENT_TIMESTAMP") or "")
    price = _float(row, "order_price", kind="invalid_amount")
    if price is None:
        raise InvalidRecord("missing_field", "order_price is empty")
    if price < 0:  # zero passes: the job rejects a non-positive amount with its own reason
        raise InvalidRecord("invalid_amount", f"order_price {price} is negative")
    given = _text(row, "payment_currency") or ""
    currency = given.upper()
    if not (given.isascii() and CURRENCY_RE.fullmatch(currency)):  # "ſek".upper() is "SEK": a garbled code
        raise InvalidRecord(
            "invalid_currency", f"payment_currency {_shown(row.get('payment_currency'))} is not an ISO 4217 code"
        )
    store_id = merchant_slug(_text(row, "merchant") or "")
    customer_id = _text(row, "ENTITY_ID")
    if customer_id is not None:
        check(customer_id, "ENTITY_ID")
    category = _text(row, "product_category")
    card_bin = _text(row, "card_bin")
    if card_bin and card_bin.endswith(".0") and card_bin[:-2].isdigit():
        card_bin = card_bin[:-2]  # spreadsheet round-trips turn 404409 into 404409.0
    text = {name: _text(row, name) for name in _TEXT_FIELDS}
    return PosTransaction(
        transaction_id=event_id,
        event_time=event_time,
        store_id=store_id,
        lane_id=ONLINE_LANE,
        kind="SALE",
        amount=price,
        currency=currency,
        items=(
            LineItem(sku=f"afd-{category or 'unknown'}", category=category or "unknown", quantity=1, unit_price=price),
        ),
        customer_id=customer_id,
        card_bin=card_bin,
        billing_latitude=_float(row, "billing_latitude", COORDINATE_BOUNDS["billing_latitude"]),
        billing_longitude=_float(row, "billing_longitude", COORDINATE_BOUNDS["billing_longitude"]),
        product_category=category,
        label=parse_label(_text(row, "EVENT_LABEL") or ""),
        **text,  # type: ignore[arg-type]
    )


class UnreadableRow(dict[str | None, object]):
    """A row's data when the row could not be read at all: no fields, and the reason."""

    def __init__(self, error: InvalidRecord) -> None:
        super().__init__()
        self.error = error


@dataclass(frozen=True, slots=True)
class CsvRow:
    line: int
    """Physical line (1-based) where the row starts, for error reports."""
    data: dict[str | None, object]
    raw: bytes = b""
    """The row's bytes as in the file, kept only for an :class:`UnreadableRow` (whose fields are gone);
    :func:`source_bytes` gives any row's."""

    @property
    def error(self) -> InvalidRecord | None:
        """Why the row could not be read (None when it was)."""
        return self.data.error if isinstance(self.data, UnreadableRow) else None


def _ends_line(text: str) -> bool:
    return text.endswith(("\n", "\r"))


def undecodable(text: str) -> bool:
    """Whether ``text`` held bytes its file's encoding could not read (kept as lone surrogates by
    ``surrogateescape``): the one check, for this CSV and for ``labels import``'s files."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _Lines:
    """The file's physical lines for :func:`csv.reader`, remembering the current row's text and what is
    wrong with it (not UTF-8, too long, an unclosed quote).

    A row can span lines only inside a quoted field. One that runs on past :data:`MAX_ROW_LINES` lines
    or :data:`MAX_ROW_CHARS` characters is ended at once (the end of a quoted field and of a record are
    handed to ``csv`` instead of the line), the row is its first line, and the lines after it are read
    again as rows of their own (:meth:`hand_back`): an unclosed quote costs its row, not the rest of the
    file. A single line longer than the limit is skipped to its end and is part of the row it ends.
    """

    def __init__(self, f: TextIO, max_chars: int) -> None:
        self._f, self._max = f, max_chars
        self.count = 0
        """Physical lines handed out so far (less those handed back)."""
        self._parts: list[str] = []
        self._size = 0
        self._error: InvalidRecord | None = None
        self._again: list[str] = []
        """Lines handed back, to be read again (last first)."""

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._again:
            line = self._again.pop()
            size = len(line)
        else:
            line = self._f.readline(self._max + 1)
            if not line:
                raise StopIteration
            size = len(line)
            if size > self._max and not _ends_line(line):
                size += self._rest_of_line()
        self.count += 1
        if size > self._max:  # this line alone is too long: the row ends with it
            self.fail("oversized", f"line {self.count} has more than {self._max:,} characters")
            ended = '"\n' if self._parts else "\n"
            self._parts.append(line[: self._max])
            return ended
        if self._parts and (self._size + size > self._max or len(self._parts) >= MAX_ROW_LINES):
            self._parts.append(line)
            self.hand_back()
            return '"\n'
        self._size += size
        self._parts.append(line)
        if undecodable(line):
            self.fail("not_utf8", f"line {self.count} is not UTF-8")
        return line

    def _rest_of_line(self) -> int:
        skipped = 0
        while chunk := self._f.readline(1 << 16):
            skipped += len(chunk)
            if _ends_line(chunk):
                break
        return skipped

    @property
    def spanned(self) -> int:
        """Physical lines of the current row so far."""
        return len(self._parts)

    def hand_back(self) -> None:
        """The current row opened a quote it did not close: it is its first line, unreadable, and the
        lines after it are handed out again."""
        self._error = InvalidRecord(
            "invalid", f"an unclosed quote in the row of line {self.count - len(self._parts) + 1}"
        )
        self._again.extend(reversed(self._parts[1:]))
        self.count -= len(self._parts) - 1
        del self._parts[1:]

    def fail(self, kind: str, reason: str) -> None:
        """The current row is unreadable (the first reason found is kept)."""
        if self._error is None:
            self._error = InvalidRecord(kind, reason)

    def take(self) -> tuple[InvalidRecord | None, str]:
        """The finished row's error and text; the next row starts afresh."""
        taken = self._error, "".join(self._parts)
        self._parts, self._size, self._error = [], 0, None
        return taken


def _header(reader: Iterator[list[str]], lines: _Lines, name: str) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise CsvFormatError(f"{name} is empty") from None
    except csv.Error as exc:
        raise CsvFormatError(f"{name}: the header cannot be read: {exc}") from None
    error, _ = lines.take()
    if error is not None:
        raise CsvFormatError(f"{name}: the header cannot be read: {error.reason}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CsvFormatError(f"{name} lacks required column(s) {', '.join(missing)}")
    twice = sorted({c for c in header if c and header.count(c) > 1})
    if twice:  # which copy counts would be a guess (the last one did, silently: a second order_price of 1)
        raise CsvFormatError(f"{name} names column(s) {', '.join(twice)} more than once")
    return header


def _row(header: list[str], values: list[str], line: int, error: InvalidRecord | None, text: str) -> CsvRow | None:
    """One record as a row (None for a blank line)."""
    if error is None:
        if not values:
            return None
        if max(map(len, values)) <= MAX_FIELD_CHARS:
            width = len(header)
            data: dict[str | None, object] = dict(zip(header, values, strict=False))
            if len(values) < width:
                data.update(dict.fromkeys(header[len(values) :]))
            elif len(values) > width:
                data[None] = values[width:]
            return CsvRow(line, data)
        long = next(i for i, v in enumerate(values) if len(v) > MAX_FIELD_CHARS)
        column = header[long] if long < len(header) else f"field {long + 1}"
        error = InvalidRecord(
            "oversized", f"{column} has {len(values[long]):,} characters, more than {MAX_FIELD_CHARS:,}"
        )
    return CsvRow(line, UnreadableRow(error), text.encode("utf-8", "surrogateescape"))


def read_rows(path: Path, max_row_chars: int = MAX_ROW_CHARS) -> list[CsvRow]:
    """All data rows in file order, with their line numbers; blank lines are ignored.

    Missing trailing fields read as None and surplus ones land under the ``None`` key, as with
    :class:`csv.DictReader`, so that :func:`row_to_transaction` can report them. A row that cannot be
    read is an :class:`UnreadableRow` in its place; only a file without a readable header (or without
    the :data:`REQUIRED_COLUMNS`) raises :class:`CsvFormatError`.
    """
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        lines = _Lines(f, max_row_chars)
        reader = csv.reader(lines)
        header = _header(reader, lines, path.name)
        rows: list[CsvRow] = []
        while True:
            start = lines.count + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. a field past csv's own field_size_limit
                lines.fail("oversized" if "field limit" in str(exc) else "invalid", f"line {lines.count}: {exc}")
                values = []
            if values and len(values) != len(header) and lines.spanned > 1:
                lines.hand_back()  # a quote opened in this row was closed in a later one: the row ends at its line
            row = _row(header, values, start, *lines.take())
            if row is not None:
                rows.append(row)
    return rows


def source_bytes(row: CsvRow) -> bytes:
    """The row's bytes for its dead letter: as read for an unreadable row, else its fields written back
    as one CSV line (the same values; quoting may differ from the file's). A row short of fields stays
    short: written back as empty fields, it would read as a complete row."""
    if row.raw or isinstance(row.data, UnreadableRow):
        return row.raw
    values = [str(v) for k, v in row.data.items() if k is not None and v is not None]
    extra = row.data.get(None)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([*values, *(extra if isinstance(extra, list) else [])])
    return out.getvalue().encode("utf-8", "surrogateescape")


def replay_order(rows: Sequence[CsvRow]) -> list[CsvRow]:
    """Rows by event time, stable; rows without a parseable timestamp last (they will be skipped)."""

    def key(row: CsvRow) -> float:
        try:
            return parse_event_timestamp(str(row.data.get("EVENT_TIMESTAMP") or ""))
        except ValueError:
            return math.inf

    return sorted(rows, key=key)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
