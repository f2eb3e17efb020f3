"""Amazon Fraud Detector's training CSV (``EVENT_TIMESTAMP``, ``EVENT_LABEL``, variables) as ``PosTransaction``.

The format contract, pure: the CSV replay producer publishes these rows, the model's ``train``,
``evaluate`` and ``backtest`` read them. Rows are taken in ``EVENT_TIMESTAMP`` order (a stable sort,
so rows with equal timestamps keep their file order; rows whose timestamp cannot be parsed sort last
and are then reported as unmappable).
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.errors import CheckoutGuardError
from schemas.records import LineItem, PosTransaction

REQUIRED_COLUMNS = ("EVENT_TIMESTAMP", "EVENT_ID", "order_price", "payment_currency", "merchant")
"""Without these no row could be mapped, so a header lacking one is rejected up front."""


ONLINE_LANE = "online"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_MS = timedelta(milliseconds=1)


_CURRENCY = re.compile(r"[A-Z]{3}")


_NOISE_PREFIX = re.compile(r"^fraud_", re.IGNORECASE)


_LABELS = {"1": 1, "fraud": 1, "0": 0, "legit": 0, "": None}


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


def parse_event_timestamp(value: str) -> int:
    """ISO 8601 -> epoch milliseconds; a timestamp without offset is taken as UTC (Fraud Detector's)."""
    text = value.strip()
    if not text:
        raise ValueError("EVENT_TIMESTAMP is empty")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"EVENT_TIMESTAMP {value!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _MS


def merchant_slug(merchant: str) -> str:
    """Stable store id from a merchant name: ``"fraud_Lowe, Dietrich and Erdman"`` ->
    ``"lowe-dietrich-and-erdman"``. The ``fraud_`` prefix of the AWS sample data is on every row and
    means nothing, so it is dropped."""
    ascii_name = unicodedata.normalize("NFKD", _NOISE_PREFIX.sub("", merchant.strip()))
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.encode("ascii", "ignore").decode().lower()).strip("-")
    if not slug:
        raise ValueError(f"merchant {merchant!r} gives no usable store id")
    return slug


def parse_label(value: str) -> int | None:
    """``EVENT_LABEL``: 1/fraud -> 1, 0/legit -> 0, empty -> None (unlabelled)."""
    try:
        return _LABELS[value.strip().lower()]
    except KeyError:
        raise ValueError(f"EVENT_LABEL {value!r} is not 1/0/fraud/legit/empty") from None


def _float(row: Mapping[str | None, object], name: str) -> float | None:
    text = _text(row, name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} {text!r} is not a finite number")
    return value


def _text(row: Mapping[str | None, object], name: str) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def row_to_transaction(row: Mapping[str | None, object]) -> PosTransaction:
    """One Fraud Detector CSV row (as from :class:`csv.DictReader`) as an online SALE.

    Raises ValueError naming the offending column when the row cannot be mapped.
    """
    extra = row.get(None)
    if extra:
        raise ValueError(f"{len(extra)} more field(s) than the header")  # type: ignore[arg-type]
    event_id = _text(row, "EVENT_ID")
    if event_id is None:
        raise ValueError("EVENT_ID is empty")
    event_time = parse_event_timestamp(_text(row, "EVENT_TIMESTAMP") or "")
    price = _float(row, "order_price")
    if price is None:
        raise ValueError("order_price is empty")
    if price < 0:
        raise ValueError(f"order_price {price} is negative")
    currency = (_text(row, "payment_currency") or "").upper()
    if not _CURRENCY.fullmatch(currency):
        raise ValueError(f"payment_currency {row.get('payment_currency')!r} is not an ISO 4217 code")
    store_id = merchant_slug(_text(row, "merchant") or "")
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
        customer_id=_text(row, "ENTITY_ID"),
        card_bin=card_bin,
        billing_latitude=_float(row, "billing_latitude"),
        billing_longitude=_float(row, "billing_longitude"),
        product_category=category,
        label=parse_label(_text(row, "EVENT_LABEL") or ""),
        **text,  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class CsvRow:
    line: int
    """Physical line (1-based) where the row starts, for error reports."""
    data: dict[str | None, object]


def read_rows(path: Path) -> list[CsvRow]:
    """All data rows in file order, with their line numbers; blank lines are ignored.

    Missing trailing fields read as None and surplus ones land under the ``None`` key, as with
    :class:`csv.DictReader`, so that :func:`row_to_transaction` can report them.
    """
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise CsvFormatError(f"{path.name} is empty") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CsvFormatError(f"{path.name} lacks required column(s) {', '.join(missing)}")
        width = len(header)
        rows: list[CsvRow] = []
        line = reader.line_num + 1
        for values in reader:
            if values:
                data: dict[str | None, object] = dict(zip(header, values, strict=False))
                if len(values) < width:
                    data.update(dict.fromkeys(header[len(values) :]))
                elif len(values) > width:
                    data[None] = values[width:]
                rows.append(CsvRow(line, data))
            line = reader.line_num + 1
    return rows


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
