"""Stateful indicators, as plain objects the streaming job keeps in keyed state.

Three keys, three kinds of memory:

* :class:`Receipt` — keyed by receipt (the sale's transaction id; a return is routed to the sale it
  refers to). Knows who bought what where, so a return can be checked against its sale across
  stores, and de-duplicates transactions delivered twice.
* :class:`StoreActivity` — keyed by store: recent returns, for bursts of refunds at one store.
* :class:`CustomerProfile` — keyed by customer (card token, loyalty id or e-mail, across stores):
  velocity in a time window and the customer's usual amount.

Each ``observe`` method is deterministic in (state, transaction): replaying the same input after a
restore from a checkpoint yields the same indicators. The very same classes serve the ``train``
command (offline history) and the job (Flink state), so features cannot drift between the two.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from typing import Any

import pycountry

from infra.settings import RulesSettings

Tx = dict[str, Any]
ISO_4217: frozenset[str] = frozenset(c.alpha_3 for c in pycountry.currencies)
"""Current ISO 4217 currency codes. Another well-formed code (a withdrawn one such as ``HRK``, a
local token such as ``JEP``) is usable but raises ``unknown_currency``: its amount cannot be
converted or compared with other stores'."""


def customer_key(tx: Tx) -> str:
    """The identity a customer's history is kept under; anonymous cash buyers get no history."""
    for name in ("card_token", "customer_id", "customer_email"):
        value = tx.get(name)
        if value:
            return f"{name.split('_')[-1]}:{value}"
    return f"anon:{tx['transaction_id']}"


def receipt_key(tx: Tx) -> str:
    """Sales are filed under their own id; a return under the sale it refers to."""
    return tx.get("original_transaction_id") or tx["transaction_id"]


@dataclass(slots=True)
class Receipt:
    """What a sale's receipt knows, and which returns have been made against it."""

    sale_id: str | None = None
    store_id: str | None = None
    customer_key: str | None = None
    amount: float = 0.0
    event_time: int = 0
    returned: float = 0.0
    seen: set[str] = field(default_factory=set)
    """Transaction ids already processed under this receipt, for de-duplication."""
    sale_face: tuple[float, ...] | None = None
    """The buyer's face embedding from the checkout snapshot (biometric: dropped after
    ``rules.receipt_face_retention_hours``, or by ``forget``)."""

    def observe(self, tx: Tx, cust_key: str, rules: RulesSettings) -> dict[str, float] | None:
        """Indicators for ``tx``; ``None`` if this exact transaction was already seen (a duplicate)."""
        tx_id = tx["transaction_id"]
        if tx_id in self.seen:
            return None
        self.seen.add(tx_id)
        ind: dict[str, float] = {}
        if tx["kind"] == "SALE":
            self.sale_id, self.store_id, self.customer_key = tx_id, tx["store_id"], cust_key
            self.amount, self.event_time = tx["amount"], tx["event_time"]
            return ind
        # A return.
        if not tx.get("original_transaction_id"):
            ind["return_without_receipt"] = 1.0
            return ind
        if self.sale_id is None:
            ind["return_unknown_receipt"] = 1.0
            return ind
        self.returned += tx["amount"]
        if self.returned > self.amount + 0.005:
            ind["return_exceeds_sale"] = 1.0
        if tx["store_id"] != self.store_id:
            ind["cross_store_return"] = 1.0
        if cust_key != self.customer_key:
            ind["customer_mismatch"] = 1.0
        elapsed_s = max(0, tx["event_time"] - self.event_time) / 1000.0
        ind["seconds_since_sale"] = elapsed_s
        if elapsed_s < rules.suspicious_timing_s and tx["store_id"] != self.store_id:
            ind["suspicious_timing"] = 1.0
        return ind


@dataclass(slots=True)
class StoreActivity:
    """Recent return times at one store (event time, ms, sorted)."""

    return_times: list[int] = field(default_factory=list)

    def observe(self, tx: Tx, rules: RulesSettings) -> dict[str, float]:
        if tx["kind"] != "RETURN":
            return {}
        now = tx["event_time"]
        insort(self.return_times, now)
        horizon = now - rules.store_return_window_s * 1000
        drop = 0
        while drop < len(self.return_times) and self.return_times[drop] < horizon:
            drop += 1
        if drop:
            del self.return_times[:drop]
        recent = sum(1 for t in self.return_times if t <= now)
        ind = {"store_returns_in_window": float(recent)}
        if recent > rules.store_return_limit:
            ind["store_return_burst"] = 1.0
        return ind


@dataclass(slots=True)
class CustomerProfile:
    """A customer's recent activity and spending habit (Welford running mean/variance of sales)."""

    recent: list[int] = field(default_factory=list)
    """Event times (ms, sorted) of the customer's transactions inside the velocity window."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    stores: set[str] = field(default_factory=set)

    def idle_since(self, cutoff_ms: int) -> bool:
        """No transaction at or after ``cutoff_ms`` (event time): the profile is past its retention."""
        return not self.recent or self.recent[-1] < cutoff_ms

    def observe(self, tx: Tx, rules: RulesSettings) -> dict[str, float]:
        now = tx["event_time"]
        ind: dict[str, float] = {}
        recent = self.recent
        insort(recent, now)
        horizon = now - rules.velocity_window_s * 1000
        # The newest time always stays: it dates the profile for its expiry (see ``idle_since``).
        keep_from = max(bisect_left(recent, horizon), len(recent) - max(1, rules.velocity_limit * 4))
        if keep_from > 0:
            del recent[:keep_from]
        in_window = bisect_right(recent, now)
        ind["velocity"] = float(in_window)
        if in_window > rules.velocity_limit:
            ind["velocity_exceeded"] = 1.0
        if tx["store_id"] not in self.stores and self.stores:
            ind["new_store_for_customer"] = 1.0
        if len(self.stores) < 16:
            self.stores.add(tx["store_id"])
        amount = tx["amount"]
        if self.count >= 5:
            std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0
            z = (amount - self.mean) / max(std, 0.25 * self.mean, 1.0)
            ind["amount_zscore"] = round(z, 3)
            if z > rules.amount_zscore:
                ind["amount_above_norm"] = 1.0
        elif self.count == 0:
            ind["first_seen"] = 1.0
        if tx["kind"] == "SALE":
            self.count += 1
            delta = amount - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (amount - self.mean)
        return ind


def transaction_indicators(tx: Tx, rules: RulesSettings) -> dict[str, float]:
    """Indicators that need no state."""
    ind: dict[str, float] = {}
    top_price = max((i["unit_price"] for i in tx["items"]), default=tx["amount"])
    if top_price >= rules.high_value_amount:
        ind["high_value_item"] = 1.0
    if tx["currency"] not in ISO_4217:
        ind["unknown_currency"] = 1.0
    return ind
