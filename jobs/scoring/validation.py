"""Turn raw Kafka bytes into a valid transaction dict, or a dead letter saying why.

Pure: no Kafka, no Flink. The job calls :func:`parse_transaction` on every input record; anything it
raises becomes a ``DeadLetter`` on the dead-letter topic and the pipeline goes on.

Identifiers are checked here, at the edge, with the strict patterns of :mod:`schemas.identifiers`:
store and lane ids become camera serials in Meraki API paths, so a hostile one must be a dead letter
before any stage uses it. Event time is bounded by the reader's wall clock, one rule for every
reader (see :func:`parse_transaction`).
"""

from __future__ import annotations

from typing import Any

from infra.settings import JobSettings
from schemas.codec import codec
from schemas.errors import InvalidRecord
from schemas.identifiers import check, check_card_token, check_email, check_ip_address, check_name, check_text
from schemas.records import COORDINATE_BOUNDS, CURRENCY_RE, MAX_AMOUNT

MAX_FUTURE_SKEW_MS = JobSettings().max_future_skew_ms
"""Default of ``max_future_skew_ms``: see ``JobSettings.max_future_skew_ms``."""
REQUIRED_TEXT = ("transaction_id", "store_id", "lane_id")
NAMES = ("store_id", "lane_id", "cashier_id")
"""Name-shaped fields (:data:`schemas.identifiers.NAME_RE`); ``cashier_id`` only when set (non-empty)."""
IDS = ("transaction_id", "original_transaction_id", "customer_id")
"""Id-shaped fields (:data:`schemas.identifiers.ID_RE`); the optional ones only when set (non-empty)."""
LABELS = ("product_category", "card_bin", "billing_state", "billing_country")
"""Free text the scored transaction carries on to OpenSearch (and dashboards' terms): labels
(:func:`schemas.identifiers.check_text`, 1 to 128 printable characters) when set; none means none (a product category:
the first item's, the scorer's). Unchecked, a 200 000-character billing state was scored and sent on, and OpenSearch
refuses a keyword over 32 766 bytes."""
FREE_IDENTITIES = ("card_token", "customer_email", "ip_address")
"""Identities kept as given (no id pattern) that key a customer's or an identity's history: stripped, and
blank means none -- a lone space would otherwise be one shared profile for every shopper who sent one. An e-mail
is lower-cased too: mail providers deliver ``Mule@Example.com`` to ``mule@example.com``, and keyed as written,
alternating capitals split one shopper into two histories (half the velocity of a burst). An IP address list (an
X-Forwarded-For header's, the client first), or one address with a port or brackets, is its client's address alone:
the one the profiles, the model and Fraud Detector see, the same for a sale sent so or with that address alone."""
IDENTITY_CHECKS = {"card_token": check_card_token, "customer_email": check_email, "ip_address": check_ip_address}
"""The bound on each of :data:`FREE_IDENTITIES` once normalized (``invalid_id``, naming the field and its length),
returning the value kept (an IP list's first address, without a port or brackets): each keys a profile in state, and
a card token is the customer key OpenSearch indexes (a term over 32 766 bytes is refused there): unbounded, a
500 000-character one was kept and sent on. Shapes only, loose enough for every real value: an address up to RFC
5321's 254 characters, IPv4 or IPv6 (with a port, or an X-Forwarded-For list of them), a token of any processor's
format."""


def check_size(value: bytes | None, max_bytes: int) -> None:
    """``oversized`` for an input record over ``max_bytes`` (``JobSettings.max_message_bytes``)."""
    if value is not None and len(value) > max_bytes:
        raise InvalidRecord("oversized", f"message of {len(value)} bytes exceeds the {max_bytes}-byte limit")


def parse_transaction(
    value: bytes | None,
    now_ms: int,
    max_bytes: int,
    max_future_skew_ms: int = MAX_FUTURE_SKEW_MS,
    as_sent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode and check one ``PosTransaction``; raise :class:`InvalidRecord` when unusable.

    ``now_ms`` is the reader's wall clock: an ``event_time`` more than ``max_future_skew_ms`` after it
    is ``invalid_timestamp`` (the producer's clock cannot be trusted, and neither can the broker
    timestamp, which the producer sets too). ``0`` checks no bound: offline history has no "now".
    ``as_sent``: receives the value as sent of each field normalized here (:data:`FREE_IDENTITIES`), so the
    record can be encoded again as it was (:func:`as_recorded`), for a dead letter that can be re-driven.
    """
    check_size(value, max_bytes)
    tx = codec("PosTransaction").decode(value)  # raises DecodeError, an InvalidRecord
    missing = [name for name in REQUIRED_TEXT if not tx[name] or not tx[name].strip()]
    if missing:
        raise InvalidRecord("missing_field", f"required field(s) empty: {', '.join(missing)}")
    _check_ids(tx)
    amount = tx["amount"]
    if not 0 < amount <= MAX_AMOUNT:  # NaN fails it too
        raise InvalidRecord(
            "invalid_amount", f"amount must be a positive number up to {MAX_AMOUNT:.0e}, got {amount!r}"
        )
    _check_coordinates(tx)
    _normalize_identities(tx, as_sent)
    if not CURRENCY_RE.fullmatch(tx["currency"]):
        raise InvalidRecord("invalid_currency", f"currency must be an ISO 4217 code, got {tx['currency'][:16]!r}")
    check_event_time(tx["event_time"], now_ms, max_future_skew_ms)
    for at, item in enumerate(tx["items"]):
        _check_item_text(item, at)
        if item["quantity"] <= 0 or not 0 <= item["unit_price"] <= MAX_AMOUNT:
            raise InvalidRecord("invalid_item", f"line item {item['sku']!r} has a bad quantity or price")
    if tx["kind"] == "SALE" and tx["original_transaction_id"]:
        raise InvalidRecord("invalid_reference", "a sale cannot refer to an original transaction")
    return tx


SOURCE_KEY = "@source"
"""Where :meth:`jobs.scoring.scorer.Scorer.parse` keeps, on the transaction dict, where the record came from:
``(key, partition, offset, as_sent, redriven)`` (``as_sent``: the normalized fields' values as sent, as pairs;
``redriven``: the id of the dead letter a re-driven copy was sent from, or ``None``; state saved before 2026-12-07
holds the first four only: :func:`redriven_from`). Not a field of the record: encoding ignores it. A transaction
restored from state saved before it existed has none."""


def redriven_from(tx: dict[str, Any]) -> str | None:
    """The id of the dead letter ``tx``'s record was re-driven from (its ``REDRIVEN_HEADER``), or ``None``."""
    source = tx.get(SOURCE_KEY)
    return source[4] if source is not None and len(source) > 4 else None


def as_recorded(tx: dict[str, Any]) -> dict[str, Any]:
    """The transaction as it was on the transactions topic: the fields :func:`parse_transaction` normalized put
    back as sent (from :data:`SOURCE_KEY`; without it, as parsed, which parses to the same transaction). Every
    other field is the decoded record's own, so the codec encodes the record it decoded."""
    source = tx.get(SOURCE_KEY)
    return {**tx, **dict(source[3])} if source else dict(tx)


def _check_ids(tx: dict[str, Any]) -> None:
    """Every identifier a stage may put in a path, a key or a message: strict patterns, or ``invalid_id``."""
    for name in NAMES:
        if name in REQUIRED_TEXT or tx[name]:  # an empty optional id means none, as everywhere downstream
            check_name(tx[name], name)
    for name in IDS:
        if name in REQUIRED_TEXT or tx[name]:
            check(tx[name], name)
    for name in LABELS:
        if tx[name]:
            check_text(tx[name], name)


def _check_coordinates(tx: dict[str, Any]) -> None:
    """``invalid_field`` for a billing coordinate that is set and not a number of degrees within
    :data:`~schemas.records.COORDINATE_BOUNDS` (NaN and the infinities included), naming the field, never the value.
    The bound a Fraud Detector CSV row has: unchecked, a NaN or infinite one was sent to Fraud Detector as ``nan`` or
    ``inf`` and kept in ``train``'s history."""
    for name, bound in COORDINATE_BOUNDS.items():
        value = tx[name]
        if value is not None and not -bound <= value <= bound:  # NaN fails it too
            raise InvalidRecord("invalid_field", f"{name} is not a number from -{bound:g} to {bound:g} (degrees)")


def _normalize_identities(tx: dict[str, Any], as_sent: dict[str, Any] | None) -> None:
    """:data:`FREE_IDENTITIES` normalized in ``tx`` and bounded (:data:`IDENTITY_CHECKS`), their values as sent
    into ``as_sent``."""
    sent = {name: tx[name] for name in FREE_IDENTITIES}
    for name in FREE_IDENTITIES:
        if tx[name] is not None:
            tx[name] = tx[name].strip() or None
    if tx["customer_email"] is not None:  # one mailbox, however its capitals are written: one history
        tx["customer_email"] = tx["customer_email"].lower()
    for name, check_identity in IDENTITY_CHECKS.items():
        if tx[name] is not None:
            tx[name] = check_identity(tx[name], name)
    if as_sent is not None:
        as_sent.update((name, was) for name, was in sent.items() if tx[name] != was)


def _check_item_text(item: dict[str, Any], at: int) -> None:
    """A line item's ``sku`` and ``category`` as labels (:func:`schemas.identifiers.check_text`: 1 to 128 printable
    characters, spaces allowed), else ``invalid_item`` naming the field and its length, never the text. Unchecked, a
    200 000-character category went into the scored transaction, the model's features and OpenSearch (which refuses
    a keyword over 32 766 bytes), and a sku with a terminal escape into the dead letter's reason."""
    for name in ("sku", "category"):
        try:
            check_text(item[name], f"items[{at}].{name}")
        except InvalidRecord as exc:
            raise InvalidRecord("invalid_item", exc.reason) from None


def check_event_time(event_time: int, now_ms: int, max_future_skew_ms: int) -> None:
    """``invalid_timestamp`` for an event at or before 1970 (not epoch milliseconds) or ahead of the wall clock
    (:func:`check_not_ahead`): one rule for every reader of an event time."""
    if event_time <= 0:
        raise InvalidRecord("invalid_timestamp", f"event_time must be epoch milliseconds, got {event_time}")
    check_not_ahead(event_time, now_ms, max_future_skew_ms)


def check_not_ahead(event_time: int, now_ms: int, max_future_skew_ms: int) -> None:
    """``invalid_timestamp`` for an event dated more than ``max_future_skew_ms`` after ``now_ms`` (the reader's wall
    clock; 0: none): a clock far ahead, whose events would outlast everything state keeps by event time."""
    if now_ms and event_time - now_ms > max_future_skew_ms:
        ahead_s = (event_time - now_ms) / 1000
        raise InvalidRecord(
            "invalid_timestamp",
            f"event_time is {ahead_s:.0f} s after the wall clock (at most {max_future_skew_ms / 1000:.0f} s allowed)",
        )
