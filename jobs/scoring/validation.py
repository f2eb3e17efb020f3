"""Turn raw Kafka bytes into a valid transaction dict, or a dead letter saying why.

Pure: no Kafka, no Flink. The job calls :func:`parse_transaction` on every input record; anything it
raises becomes a ``DeadLetter`` on the dead-letter topic and the pipeline goes on.
"""

from __future__ import annotations

import math
import re
from typing import Any

from schemas.codec import codec
from schemas.errors import InvalidRecord

CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000
"""An event stamped more than this after the broker received it is a clock or data error."""
REQUIRED_TEXT = ("transaction_id", "store_id", "lane_id")


def parse_transaction(value: bytes | None, ingest_time_ms: int, max_bytes: int) -> dict[str, Any]:
    """Decode and check one ``PosTransaction``; raise :class:`InvalidRecord` when unusable."""
    if value is not None and len(value) > max_bytes:
        raise InvalidRecord("oversized", f"message of {len(value)} bytes exceeds the {max_bytes}-byte limit")
    tx = codec("PosTransaction").decode(value)  # raises DecodeError, an InvalidRecord
    missing = [name for name in REQUIRED_TEXT if not tx[name] or not tx[name].strip()]
    if missing:
        raise InvalidRecord("missing_field", f"required field(s) empty: {', '.join(missing)}")
    amount = tx["amount"]
    if not math.isfinite(amount) or amount <= 0:
        raise InvalidRecord("invalid_amount", f"amount must be a positive number, got {amount!r}")
    if not CURRENCY_RE.match(tx["currency"]):
        raise InvalidRecord("invalid_currency", f"currency must be an ISO 4217 code, got {tx['currency']!r}")
    if tx["event_time"] <= 0:
        raise InvalidRecord("invalid_timestamp", f"event_time must be epoch milliseconds, got {tx['event_time']}")
    if ingest_time_ms and tx["event_time"] - ingest_time_ms > MAX_FUTURE_SKEW_MS:
        raise InvalidRecord("invalid_timestamp", "event_time is more than a day after the broker received it")
    for item in tx["items"]:
        if item["quantity"] <= 0 or not math.isfinite(item["unit_price"]) or item["unit_price"] < 0:
            raise InvalidRecord("invalid_item", f"line item {item['sku']!r} has a bad quantity or price")
    if tx["kind"] == "SALE" and tx["original_transaction_id"]:
        raise InvalidRecord("invalid_reference", "a sale cannot refer to an original transaction")
    return tx
