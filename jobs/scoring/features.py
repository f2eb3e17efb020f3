"""Stateful indicators, as plain objects the streaming job keeps in keyed state.

Three keys, three kinds of memory:

* :class:`Receipt` — keyed by receipt (the sale's transaction id; a return is routed to the sale it
  refers to). Knows who bought what where, so a return can be checked against its sale across
  stores, and de-duplicates transactions delivered twice.
* :class:`StoreActivity` — keyed by store: recent returns, for bursts of refunds at one store.
* :class:`CustomerProfile` — keyed by customer (card token, loyalty id or e-mail, across stores):
  velocity in a time window and the customer's usual amount; plus, for the fraud model, the
  customer's activity over several windows (:data:`WINDOWS`). The other identities a transaction
  carries (card, loyalty id, e-mail, IP, device: :data:`LINKED_IDENTITIES`) get a profile of the same
  class under ``ent:<kind>:<value>`` keys in the same state map (:func:`observe_linked`), so one
  expiry covers them all.

The model's profile features (:data:`PROFILE_FEATURES`) travel with the transaction dict under
:data:`PROFILE_KEY` (a tuple, not indicators: they are model inputs, not reasons, and are not written
on the scored record).

Each ``observe`` method is deterministic in (state, transaction): replaying the same input after a
restore from a checkpoint yields the same indicators. The very same classes serve the ``train``
command (offline history) and the job (Flink state), so features cannot drift between the two.
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from math import exp
from typing import Any

import pycountry

from infra.settings import RulesSettings
from jobs.scoring.claims import ConflictingTransaction

Tx = dict[str, Any]
ISO_4217: frozenset[str] = frozenset(c.alpha_3 for c in pycountry.currencies)
"""Current ISO 4217 currency codes. Another well-formed code (a withdrawn one such as ``HRK``, a
local token such as ``JEP``) is usable but raises ``unknown_currency``: its amount cannot be
converted or compared with other stores'."""


CUSTOMER_FIELDS: tuple[str, ...] = ("card_token", "customer_id", "customer_email")
"""Where a customer's identity is taken from, first present wins."""


def customer_key(tx: Tx) -> str:
    """The identity a customer's history is kept under; anonymous cash buyers get no history."""
    own = _own_field(tx)
    return f"{own.split('_')[-1]}:{tx[own]}" if own is not None else f"anon:{tx['transaction_id']}"


def _own_field(tx: Tx) -> str | None:
    """The field the customer key is taken from (:data:`CUSTOMER_FIELDS`, first present wins)."""
    get = tx.get
    for name in CUSTOMER_FIELDS:
        if get(name):
            return name
    return None


def receipt_key(tx: Tx) -> str:
    """Sales are filed under their own id; a return under the sale it refers to."""
    return tx.get("original_transaction_id") or tx["transaction_id"]


DIGEST_FIELDS: tuple[str, ...] = (
    "amount",
    "currency",
    "kind",
    "store_id",
    "customer",
    "event_time",
    "original_transaction_id",
)
"""What a receipt remembers of each transaction id, 32 bits each (:func:`content_digest`): what its checks read.
Append only: the digests in checkpoints are packed in this order (a field inserted before the end would make every
restored copy read as a conflict)."""

DIGEST_BITS = 32
"""Bits kept of each field's CRC-32: a record with other content in one field passes for a copy once in 2**32.
Receipts saved before 2026-12-07 hold 16 bits a field (once in 65,536); they are read as such, see
:func:`digest_differences`."""
_WIDE_MASK, _NARROW_MASK = (1 << DIGEST_BITS) - 1, 0xFFFF


def content_digest(tx: Tx, cust_key: str) -> int:
    """A compact digest of the transaction as its receipt sees it (:data:`DIGEST_FIELDS`, ``customer`` being its
    customer key): one int of :data:`DIGEST_BITS` per field, so a copy with other content tells which fields
    differ. CRC-32, not ``hash``: the same in every process. Kept as the bitwise complement of the packed fields (a
    negative int): the 16-bit digests in older checkpoints are never negative, so each is read in its own width."""
    values = (
        tx["amount"],
        tx["currency"],
        tx["kind"],
        tx["store_id"],
        cust_key,
        tx["event_time"],
        tx.get("original_transaction_id") or None,
    )
    packed = 0
    for i, value in enumerate(values):
        packed |= (zlib.crc32(repr(value).encode()) & _WIDE_MASK) << (DIGEST_BITS * i)
    return ~packed


def _digest_fields(digest: int, narrow: bool) -> list[int]:
    """A digest's per-field values; ``narrow``: cut to the 16 bits an older job kept (a 16-bit one is already)."""
    if digest < 0:
        packed, bits = ~digest, DIGEST_BITS
    else:  # saved by a job before 2026-12-07: 16 bits a field
        packed, bits = digest, 16
    mask = _NARROW_MASK if narrow else _WIDE_MASK
    return [(packed >> (bits * i)) & mask for i in range(len(DIGEST_FIELDS))]


def digest_differences(a: int, b: int) -> list[str]:
    """The :data:`DIGEST_FIELDS` in which two digests differ; a 16-bit digest (an older checkpoint's) is compared
    with the low 16 bits of a 32-bit one's fields, which are the ones it kept."""
    narrow = a >= 0 or b >= 0
    return [
        name
        for name, x, y in zip(DIGEST_FIELDS, _digest_fields(a, narrow), _digest_fields(b, narrow), strict=True)
        if x != y
    ]


RAW = ""
"""The key of :attr:`Receipt.returned` for an amount whose currency is unknown (restored from a job older than
currencies): added up with the sale's, whatever its currency."""


def _pickled_values(state: Any) -> dict[str, Any]:
    """The field values in a slotted dataclass's pickled state: ``(None, slots)`` or a plain dict."""
    return dict(state[1] if isinstance(state, tuple) else state)


def _restore_slots(obj: Any, values: dict[str, Any]) -> None:
    """Set every slot of ``obj`` from ``values``, a field missing there (a pickle written before the field existed,
    a savepoint of an older job) from a fresh instance's default."""
    fresh = type(obj)()
    for name in type(obj).__slots__:
        object.__setattr__(obj, name, values[name] if name in values else getattr(fresh, name))


@dataclass(slots=True)
class Receipt:
    """What a sale's receipt knows, and which returns have been made against it."""

    sale_id: str | None = None
    store_id: str | None = None
    customer_key: str | None = None
    amount: float = 0.0
    event_time: int = 0
    returned: dict[str, float] = field(default_factory=dict)
    """Returns added up per currency. Before the sale is known each counts in its own currency; once it is, only
    the sale's is kept (the others can never be compared with it: no exchange rates here), so then it holds one
    entry or none. Key :data:`RAW`: an amount of unknown currency, from a job older than currencies, compared raw
    (with whatever else the receipt holds)."""
    seen: dict[str, int | None] = field(default_factory=dict)
    """Transaction ids already processed under this receipt, each with its :func:`content_digest`: an identical
    copy is a redelivery (dropped), one with other content a conflict (dead letter). ``None``: restored from a job
    that kept ids only (a set), the content unknown: a later copy is dropped as before."""
    sale_face: tuple[float, ...] | None = None
    """The buyer's face embedding from the checkout snapshot (biometric: dropped after
    ``rules.receipt_face_retention_hours``, or by ``forget``)."""
    face_subject: str | None = None
    """The watch-listed subject :attr:`sale_face` was matched to at the sale, if any: a ``forget`` of that subject
    drops the face too (:meth:`ScoringState.forget_subject`), not only the one on its enrolment receipt."""
    currency: str | None = None
    """The sale's currency; ``None`` in a receipt restored from a job older than this field (compared raw)."""
    opened: int = 0
    """Event time (ms) of the first transaction filed under it: what a receipt with no sale yet is dated by
    (0 in a receipt restored from a job older than this field)."""
    failed: tuple[str, ...] = ()
    """Ids in :attr:`seen` whose processing failed with an internal error (:meth:`mark_failed`): not decided, so an
    identical copy (a re-drive of the dead letter) is taken as their first delivery, once; other content under them
    is still a conflict. A tuple: empty in nearly every receipt, and then it costs nothing."""
    retaken: tuple[int, ...] = ()
    """Checksums (crc32) of the dead-letter ids whose re-driven copies were taken (:meth:`observe`'s ``retake``):
    a copy of the same letter sent again (``redrive`` run twice) is a copy, dropped. Empty in nearly every
    receipt."""
    counted: tuple[Counted, ...] = ()
    """Of the :attr:`failed` ids, those whose store and profiles had counted them before the failure, with what
    that history gave them (:meth:`mark_failed`): their re-drive takes these back (:meth:`take_counted`) instead
    of being counted a second time. Empty in nearly every receipt."""

    def __setstate__(self, state: Any) -> None:
        """Restore a pickle, also one written before a field existed (a savepoint of an older job): missing
        fields take their defaults; ``seen`` as a set of ids (before digests) is those ids, digests unknown;
        ``returned`` as one sum (before per-currency sums) is that sum under its ``returned_currency``, or
        :data:`RAW` where there was none (a job older than currencies)."""
        values = _pickled_values(state)
        if isinstance(values.get("seen"), (set, frozenset)):
            values["seen"] = dict.fromkeys(values["seen"])
        returned = values.get("returned")
        if isinstance(returned, (int, float)):
            values["returned"] = {values.get("returned_currency") or RAW: float(returned)} if returned else {}
        _restore_slots(self, values)

    def observe(
        self, tx: Tx, cust_key: str, rules: RulesSettings, retake: str | None = None
    ) -> dict[str, float] | None:
        """Indicators for ``tx``; ``None`` if this exact transaction was already seen (a duplicate);
        :class:`ConflictingTransaction` for its id with other content (:meth:`_first_time`).

        ``retake``: the id of the dead letter ``tx`` was re-driven from, when that letter says its processing
        failed after this receipt took it (a later step of the partitioned layout, which cannot mark it
        :attr:`failed` here): an identical copy is then taken as its first delivery, once per letter."""
        tx_id = tx["transaction_id"]
        # counted on its receipt already, when it was first seen
        retry = tx_id in self.failed or (retake is not None and tx_id in self.seen)
        if not self._first_time(tx, cust_key, retake):
            return None
        if not self.opened:
            self.opened = tx["event_time"]
        ind: dict[str, float] = {}
        currency = tx["currency"]
        if tx["kind"] == "SALE":
            self.sale_id, self.store_id, self.customer_key = tx_id, tx["store_id"], cust_key
            self.amount, self.event_time, self.currency = tx["amount"], tx["event_time"], currency
            # the returns that came first in the sale's currency are compared with it, whichever came first
            kept = self.returned.get(currency, 0.0) + self.returned.get(RAW, 0.0)
            self.returned = {currency: kept} if kept else {}
            return ind
        # A return.
        if not tx.get("original_transaction_id"):
            ind["return_without_receipt"] = 1.0
            return ind
        foreign = self._count_return(tx["amount"], currency, add=not retry)
        if foreign:
            ind["return_currency_mismatch"] = 1.0
        if self.sale_id is None:
            ind["return_unknown_receipt"] = 1.0
            return ind
        if not foreign and sum(self.returned.values()) > self.amount + 0.005:
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

    def _first_time(self, tx: Tx, cust_key: str, retake: str | None = None) -> bool:
        """Whether ``tx``'s id is new here (now seen), or a copy of one whose processing failed (:attr:`failed`, now
        cleared; or ``retake``, a letter not taken before, now remembered in :attr:`retaken`); ``False`` for a copy
        of a record seen before.

        Raises :class:`ConflictingTransaction`, changing nothing, for a record with the id of one seen before but
        other content: it is not a copy, and which of the two is right is not for the job to guess."""
        tx_id = tx["transaction_id"]
        digest = content_digest(tx, cust_key)
        seen = self.seen
        letter = None if retake is None else zlib.crc32(retake.encode())
        if tx_id not in seen:  # (a receipt expired since, or a job without state: its letter is taken now)
            seen[tx_id] = digest
            if letter is not None:
                self.retaken += (letter,)
            return True
        known = seen[tx_id]
        differ = [] if known is None or known == digest else digest_differences(known, digest)
        if not differ:  # the same content (a 16-bit digest of an older checkpoint compares in its 16 bits)
            if tx_id in self.failed:
                self.failed = tuple(failed for failed in self.failed if failed != tx_id)
                if letter is not None and letter not in self.retaken:
                    self.retaken += (letter,)
                return True
            if letter is not None and letter not in self.retaken:
                self.retaken += (letter,)
                return True
            return False
        raise ConflictingTransaction(
            f"transaction id {tx_id[:128]!r} was taken on receipt {receipt_key(tx)[:128]!r} by a record with another"
            f" {', '.join(differ)}; this {str(tx.get('kind')).lower()} is not decided (a"
            " redelivered copy is the same record)",
            tx,
        )

    def holds(self, tx_id: str) -> bool:
        """Whether ``tx_id`` counts as processed here: seen, and its processing did not fail."""
        return tx_id in self.seen and tx_id not in self.failed

    def mark_failed(self, tx_id: str, tx: Tx | None = None) -> bool:
        """``tx_id``'s processing failed with an internal error after it was seen here: it is not decided, so its
        re-drive must not be dropped as a copy. ``True`` when this changed the receipt.

        ``tx``: the transaction as processed; when its history counted it (it carries :data:`HISTORY_KEY` and
        :data:`PROFILE_KEY`), what that history gave it is kept in :attr:`counted` for the re-drive."""
        if not self.holds(tx_id):
            return False
        self.failed += (tx_id,)
        if tx is not None and HISTORY_KEY in tx and PROFILE_KEY in tx:
            entry = (tx_id, tuple(tx[HISTORY_KEY]), tuple(tx[PROFILE_KEY]))
            self.counted = tuple(c for c in self.counted if c[0] != tx_id) + (entry,)
        return True

    def take_counted(self, tx_id: str) -> Counted | None:
        """What the history gave ``tx_id`` before its processing failed (:attr:`counted`), now forgotten here;
        ``None`` when its history did not count it. Called once the re-drive is taken as its first delivery."""
        for entry in self.counted:
            if entry[0] == tx_id:
                self.counted = tuple(c for c in self.counted if c[0] != tx_id)
                return entry
        return None

    def _count_return(self, amount: float, currency: str, add: bool = True) -> bool:
        """Add a return to ``returned``; ``True`` when it is in another currency than the sale's.

        Counted before its sale is known too, in its own currency: a return delivered ahead of its sale still adds
        up with the returns made after it, so partial returns over the sale are flagged whatever the arrival order
        (and whatever other currencies came first). A refund in another currency than the sale's cannot be compared
        with it (no rates here): it is flagged, not added up. A receipt from an older job knows no currency and
        compares raw, as before. ``add`` false: only the currency check (a failed return taken again was added up
        when it was first seen)."""
        if self.sale_id is None:
            key = currency
        elif self.currency is None:  # a sale from a job older than currencies
            key = RAW
        elif currency != self.currency:
            return True
        else:
            key = self.currency  # the same object as the sale's: pickled once
        if add:
            self.returned[key] = self.returned.get(key, 0.0) + amount
        return False


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


WINDOWS: tuple[tuple[str, int], ...] = (("1h", 3_600_000), ("24h", 86_400_000), ("7d", 604_800_000))
"""Activity windows (name, ms) of every profile. Counts and sums are *exponentially decayed* over the
window: a transaction ``w`` ago counts ``exp(-1) = 0.37``, one ``w/10`` ago ``0.9``. Fixed memory
(two numbers per window) whatever an identity's traffic (a device string shared by thousands of
shoppers costs what a loyal customer costs), O(1) per transaction, and deterministic in the order
processed (out-of-order events: :meth:`CustomerProfile.activity`)."""
_W1, _W24, _W7 = (float(ms) for _, ms in WINDOWS)

PROFILE_KEY = "_profile"
"""Key of the transaction dict under which :meth:`Scorer.observe` leaves the profile features (a tuple
in :data:`PROFILE_FEATURES` order, ``None`` for "unknown": the model reads it as NaN) for the model.
``None`` rather than NaN because the transaction is kept in state while it waits for its face, and
state is compared by value (NaN equals nothing, itself included)."""

HISTORY_KEY = "_history"
"""Key of the transaction dict under which :meth:`Scorer.observe` leaves the indicators its store's and
customer's history gave it (a tuple of (name, value) pairs). A transaction whose processing fails after its
history counted it keeps them, with its profile features, on its receipt (:meth:`Receipt.mark_failed`), so
the re-drive of its dead letter is scored as it was first seen and counted once, not twice."""

Counted = tuple[str, tuple[tuple[str, float], ...], tuple[Any, ...]]
"""A failed transaction already counted in its history (:attr:`Receipt.counted`): its id, its history's
indicators (:data:`HISTORY_KEY`) and its profile features (:data:`PROFILE_KEY`)."""

ENTITY_PREFIX = "ent:"
"""Prefix of the linked identities' profile keys in the customers map (``ent:ip:10.1.2.3``)."""

LINKED_IDENTITIES: tuple[tuple[str, str], ...] = (
    ("card", "card_token"),
    ("id", "customer_id"),
    ("email", "customer_email"),
    ("ip", "ip_address"),
)
"""(kind, transaction field) of the identities profiled besides the customer key. A card is its token:
a BIN alone names a bank, not a card. The field the customer key was taken from is left out (its
profile is the customer's). A user-agent string is not an identity: it names a browser build that
thousands of shoppers share (six strings across all of the POS generator's customers), so its
profile measured the whole chain's traffic, and made every shopper's features depend on the order in
which other shoppers' transactions arrived. A real device id would go here once a source sends one."""

CUSTOMER_FEATURES: tuple[str, ...] = (
    "cust_tx_before",
    "cust_age_days",
    "cust_since_prev_s",
    "cust_amount_ratio",
    "cust_count_1h",
    "cust_count_24h",
    "cust_count_7d",
    "cust_sum_1h",
    "cust_sum_24h",
    "cust_sum_7d",
)
"""The customer's profile before this transaction: earlier sales, days since first seen (within the
profile's retention), seconds since the previous transaction, amount / the customer's mean sale, and
the decayed count and sum of its transactions per window (:data:`WINDOWS`)."""

LINKED_FEATURES: tuple[str, ...] = (
    "link_identities",
    "link_new",
    "link_tx_before_max",
    "link_since_prev_s_min",
    "link_count_1h_max",
    "link_count_24h_max",
    "link_count_7d_max",
    "link_sum_24h_max",
)
"""Over the transaction's linked identities: how many it carries, how many are seen for the first time,
and the busiest one's history (the most earlier sales, the shortest gap, the highest counts and sum)."""

PROFILE_FEATURES: tuple[str, ...] = CUSTOMER_FEATURES + LINKED_FEATURES
Feature = float | None
"""A profile feature; ``None``: unknown (no earlier transaction, no linked identity)."""
_NO_LINKS: tuple[Feature, ...] = (0.0, 0.0) + (None,) * (len(LINKED_FEATURES) - 2)

Activity = tuple[float, float, Feature, float, float, float, float, float, float]
"""A profile before a transaction: (earlier transactions, age in days, seconds since the previous
transaction or ``None``, decayed count 1h, 24h, 7d, decayed sum 1h, 24h, 7d)."""


STORES_REMEMBERED = 16
"""How many stores a customer profile remembers for ``new_store_for_customer``: the most recently used ones."""


@dataclass(slots=True)
class CustomerProfile:
    """A customer's recent activity and spending habit (Welford running mean/variance of sales).

    The same class profiles a linked identity (``ent:`` keys, :func:`observe_linked`): those use only
    ``count`` (every transaction) and the activity fields, never ``recent``, ``stores`` or the
    running mean."""

    recent: list[int] = field(default_factory=list)
    """Event times (ms, sorted) of the customer's transactions inside the velocity window."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    stores: list[str] = field(default_factory=list)
    """The :data:`STORES_REMEMBERED` stores used most recently, the most recent last (a set in older state)."""
    first: int = 0
    """Event time (ms) of the first transaction seen; 0 = none yet."""
    last: int = 0
    """The newest event time (ms) seen: the time the decayed window sums below refer to."""
    c1h: float = 0.0
    s1h: float = 0.0
    c24h: float = 0.0
    s24h: float = 0.0
    c7d: float = 0.0
    s7d: float = 0.0

    def __setstate__(self, state: Any) -> None:
        """Restore a pickle, also one written before the activity fields existed (a savepoint of an
        older job): missing fields take their defaults, the first and newest times come from
        ``recent``, the window sums start at zero (an under-count for at most a week). Stores saved as a set
        (the first 16 used, in no order) come back sorted, as if used in that order."""
        values = _pickled_values(state)
        if isinstance(values.get("stores"), set | frozenset):
            values["stores"] = sorted(values["stores"])
        recent = values.get("recent") or []
        values.setdefault("first", recent[0] if recent else 0)
        values.setdefault("last", recent[-1] if recent else 0)
        _restore_slots(self, values)

    def idle_since(self, cutoff_ms: int) -> bool:
        """No transaction at or after ``cutoff_ms`` (event time): the profile is past its retention."""
        recent = self.recent
        return max(self.last, recent[-1] if recent else 0) < cutoff_ms

    def activity(self, now: int, amount: float) -> Activity:
        """The profile's activity before a transaction at ``now`` (ms) of ``amount``; then counts it in.

        An event older than the newest one seen (out of order) reads the windows as of the newest
        one, and is added decayed to that time: deterministic in the order processed."""
        last = self.last
        if not last and not self.first:  # a new profile
            self.first = self.last = now
            self.c1h = self.c24h = self.c7d = 1.0
            self.s1h = self.s24h = self.s7d = amount
            return (0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        dt = now - last
        if dt >= 0:
            f1, f24, f7 = exp(-dt / _W1), exp(-dt / _W24), exp(-dt / _W7)
            c1, c24, c7 = self.c1h * f1, self.c24h * f24, self.c7d * f7
            s1, s24, s7 = self.s1h * f1, self.s24h * f24, self.s7d * f7
            self.c1h, self.c24h, self.c7d = c1 + 1.0, c24 + 1.0, c7 + 1.0
            self.s1h, self.s24h, self.s7d = s1 + amount, s24 + amount, s7 + amount
            self.last = now
            return (float(self.count), (now - self.first) / 86_400_000, dt / 1000.0, c1, c24, c7, s1, s24, s7)
        if now < self.first:  # out of order, and older than the first transaction seen
            self.first = now
        c1, c24, c7 = self.c1h, self.c24h, self.c7d
        s1, s24, s7 = self.s1h, self.s24h, self.s7d
        f1, f24, f7 = exp(dt / _W1), exp(dt / _W24), exp(dt / _W7)
        self.c1h, self.c24h, self.c7d = c1 + f1, c24 + f24, c7 + f7
        self.s1h, self.s24h, self.s7d = s1 + amount * f1, s24 + amount * f24, s7 + amount * f7
        return (float(self.count), (now - self.first) / 86_400_000, 0.0, c1, c24, c7, s1, s24, s7)

    def observe(self, tx: Tx, rules: RulesSettings) -> dict[str, float]:
        """The customer's indicators for ``tx`` (and the profile updated with it)."""
        return self.observe_profile(tx, rules)[0]

    def observe_profile(self, tx: Tx, rules: RulesSettings) -> tuple[dict[str, float], tuple[Feature, ...]]:
        """:meth:`observe`, and the :data:`CUSTOMER_FEATURES` of ``tx``."""
        now = tx["event_time"]
        amount = tx["amount"]
        tx_before, age, since, c1, c24, c7, s1, s24, s7 = self.activity(now, amount)
        ratio = amount / self.mean if self.count and self.mean > 0 else None
        ind: dict[str, float] = {}
        recent = self.recent
        insort(recent, now)
        horizon = now - rules.velocity_window_s * 1000
        cap = max(1, rules.velocity_limit * 4)
        start = bisect_left(recent, horizon)
        # Counted before the cap trims: a late transaction behind ``cap`` newer ones is the oldest entry and
        # would be trimmed itself, reading 0 (less than itself). Capped, an on-time count is what it always was.
        in_window = min(bisect_right(recent, now) - start, cap)
        # The newest time always stays: it dates the profile for its expiry (see ``idle_since``).
        keep_from = max(start, len(recent) - cap)
        if keep_from > 0:
            del recent[:keep_from]
        ind["velocity"] = float(in_window)
        if in_window > rules.velocity_limit:
            ind["velocity_exceeded"] = 1.0
        self._use_store(tx["store_id"], ind)
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
        return ind, (tx_before, age, since, ratio, c1, c24, c7, s1, s24, s7)

    def _use_store(self, store: str, ind: dict[str, float]) -> None:
        """``new_store_for_customer`` unless ``store`` is among the remembered ones (never at the first
        transaction); then it is the most recent, and the least recently used beyond the cap is forgotten, so a
        customer of many stores is not flagged at every visit to a store used after the first 16."""
        stores = self.stores
        if store in stores:
            if stores[-1] != store:
                stores.remove(store)
                stores.append(store)
            return
        if stores:
            ind["new_store_for_customer"] = 1.0
        stores.append(store)
        if len(stores) > STORES_REMEMBERED:
            del stores[: len(stores) - STORES_REMEMBERED]

    def observe_identity(self, now: int, amount: float) -> Activity:
        """A linked identity's activity before a transaction; then counts it in (``count``: transactions)."""
        out = self.activity(now, amount)
        self.count += 1
        return out


_LINKED_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    (name, f"{ENTITY_PREFIX}{kind}:") for kind, name in LINKED_IDENTITIES
)


def identity_keys(tx: Tx) -> tuple[list[str], str | None]:
    """Profile keys (``ent:<kind>:<value>``) of the identities on ``tx``: those other than the one its
    customer key is (:func:`customer_key`), which the :data:`LINKED_FEATURES` come from; and that one's own,
    which every transaction also counts in (no feature reads it there: that history is the customer's). So an
    identity's history is whole when a later transaction carries it as a *linked* one: a loyalty customer's
    cash sales were missing from ``ent:id:<id>`` at the first card payment, which then read as a new identity
    (``link_new``)."""
    get = tx.get
    own = _own_field(tx)
    linked = []
    for name, prefix in _LINKED_PREFIXES:
        value = get(name)
        if value and name != own:
            linked.append(prefix + value)
    return linked, None if own is None else _ENTITY_PREFIX_OF[own] + tx[own]


_ENTITY_PREFIX_OF: dict[str, str] = dict(_LINKED_PREFIXES)
assert set(CUSTOMER_FIELDS) <= set(_ENTITY_PREFIX_OF), "every customer-key field is a linked identity"


def observe_linked(
    tx: Tx, profiles: MutableMapping[str, CustomerProfile], idle_before_ms: int, map_name: str
) -> tuple[tuple[Feature, ...], list[tuple[str, str, CustomerProfile]]]:
    """The :data:`LINKED_FEATURES` of ``tx``, and the profiles it changed as ``(map_name, key, profile)``
    writes to persist.

    ``profiles`` is the customers map; a profile idle since before ``idle_before_ms`` is started over,
    as a customer's is. Runs for every transaction: written for speed."""
    now, amount = tx["event_time"], tx["amount"]
    writes: list[tuple[str, str, CustomerProfile]] = []
    activities: list[Activity] = []
    linked, own = identity_keys(tx)
    for n, key in enumerate(linked if own is None else [*linked, own]):
        profile = profiles.get(key)
        if profile is None or (profile.last < idle_before_ms and profile.idle_since(idle_before_ms)):
            profile = profiles[key] = CustomerProfile()
        activity = profile.observe_identity(now, amount)
        if n < len(linked):  # the own identity is only counted in
            activities.append(activity)
        writes.append((map_name, key, profile))
    return combine_linked(activities), writes


def combine_linked(activities: Sequence[Activity]) -> tuple[Feature, ...]:
    """The :data:`LINKED_FEATURES` from each linked identity's activity before the transaction (any order):
    one function for the job's single state and for its identity-keyed steps (:mod:`jobs.scoring.partitioned`)."""
    if not activities:
        return _NO_LINKS
    new = 0
    tx_before = c1 = c24 = c7 = s24 = -1.0
    since = math.inf
    for a in activities:
        gap = a[2]
        if gap is None:  # no earlier transaction
            new += 1
        elif gap < since:
            since = gap
        if a[0] > tx_before:
            tx_before = a[0]
        if a[3] > c1:
            c1 = a[3]
        if a[4] > c24:
            c24 = a[4]
        if a[5] > c7:
            c7 = a[5]
        if a[7] > s24:
            s24 = a[7]
    return (float(len(activities)), float(new), tx_before, since if since != math.inf else None, c1, c24, c7, s24)


def transaction_indicators(tx: Tx, rules: RulesSettings) -> dict[str, float]:
    """Indicators that need no state."""
    ind: dict[str, float] = {}
    top_price = max((i["unit_price"] for i in tx["items"]), default=tx["amount"])
    if top_price >= rules.high_value_amount:
        ind["high_value_item"] = 1.0
    if tx["currency"] not in ISO_4217:
        ind["unknown_currency"] = 1.0
    return ind
