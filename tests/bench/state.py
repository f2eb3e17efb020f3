"""Bench section: the scoring job's keyed state at N transactions of history -- size and restore.

Issue 12, defect 10: measure state size and restore time at 10 M transactions of history. What is
measured, at N transactions:

- **entries** per state map (``receipts``, ``stores``, ``customers``; ``pending``/``early_faces``/``batch``);
- **serialized size**: every value pickled as the operator's MapState stores it
  (``Types.PICKLED_BYTE_ARRAY()``: PyFlink's ``pickle.dumps``, protocol 4, in thread and process mode
  alike), summed, plus the keys' UTF-8 bytes (MapState keys are ``Types.STRING()``); once **with the
  job's retention applied** (receipts older than ``receipt_retention_days`` gone, buyer faces older than
  ``receipt_face_retention_hours`` dropped, customers idle past ``customer_retention_days`` gone: what a
  checkpoint holds) and once **without retention** (every receipt and profile the history made, every
  buyer face kept: what the state held before faces and profiles expired);
- **restore**, in a fresh Python process that reads those serialized entries back: the Python side of the
  operator's ``dict(state.items())`` (one ``pickle.loads`` per value, a new key string per key), then
  :meth:`DecisionCore.restore` on the maps, each in wall seconds, and the process's resident memory
  before, after, and at its peak (``VmHWM``, reset with ``/proc/self/clear_refs`` where allowed);
  RocksDB and the JVM->Python hand-over are not part of it (no Flink here).

**Method.** Driving :meth:`DecisionCore.on_records` with 10 M encoded transactions takes hours here, so
the history is generated compactly (numpy columns: event time, store, lane, person, payment, sale or
return, the sale a return names, amount, whether the checkout snapshot had a face) and the final maps
are built directly with the job's own types (:class:`Receipt`, :class:`StoreActivity`,
:class:`CustomerProfile`) by the rules the job applies when it processes that history in event-time
order: a sale opens a receipt, a return joins its sale's receipt (or opens one under the id it names
when the sale is unknown or already expired), ``seen`` holds every transaction id of a receipt (with its
content digest), a store keeps its returns of the last ``store_return_window_s``, a profile keeps its times of the last
``velocity_window_s`` (at most ``4 * velocity_limit``), its sales' Welford mean/variance and its first 16
stores, and starts over after ``customer_retention_days`` idle; a sale keeps its buyer's face until it
is ``receipt_face_retention_hours`` old. :func:`validate` checks this builder against the job itself: it
drives a real :class:`DecisionCore` (face join on, every transaction followed by its face observation)
with the same history at a small N and requires the same keys in every map, equal values (floats
within 1e-9), the same value types and the same serialized bytes; ``make bench`` runs it at 20k before
measuring, and ``tests/unit/test_bench_state.py`` with short retentions, where receipts, faces and
profiles expire.

Generation shortcuts that change no figure: string objects (store names, customer keys) and a pool of
4,096 random float32 face embeddings are reused while building, but every entry is pickled on its own,
so sizes are those of independent values, and the restore unpickles separate objects, as the job does.
``pending``/``early_faces`` are empty: they hold only transactions within the 4 s face deadline and
faces that came first, and here each observation follows its transaction at once; ``batch`` is a legacy
map. "Without retention" is the retained state plus the dropped faces (a fixed pickled size each: 1,154 bytes for
128 values, 6,914 for the default ``fused3``'s 768)
plus the dropped receipts and profiles as built: exact while the history spans no more than the receipt
and customer retention (the default 120 days), an estimate beyond (within 0.3 % of an exact build with
no retention at 20 and 400 days).

Measured here with 128-value faces (before ``fused3`` became the default embedder; its buyer faces are 6x as
large, so the GiB of kept faces grow accordingly) (2 cores, 24 GiB, shared with another session's running stack,
load 3-5), 10 M
transactions over 120 days, 1,000 stores, 1.5 M people: 9.52 M receipts, 1.99 M customer profiles,
1,000 stores; 2.70 GiB pickled with retention (164k buyer faces kept), 9.60 GiB without (6.4 M faces);
restore 158 s to unpickle + 18.6 s ``DecisionCore.restore``, +9.7 GiB resident (~0.87 GiB per million
entries). From 1 M to 10 M, entries, bytes and memory grew 10x, the restore's time more: unpickling
13.7x, ``DecisionCore.restore`` 12.4x (a larger heap for the collector, the sort of 9.5 M receipts).

``python -m tests.bench.state --transactions 10000000`` runs it alone (``--scaling 1000000,2000000``
measures smaller N first and prints the ratios); ``make bench`` calls :func:`bench_for_make`:
``--state-transactions`` / ``CG_BENCH_STATE_TRANSACTIONS`` (default 10 M), measured at the largest N that
fits the memory available and ``--state-budget-s`` / ``CG_BENCH_STATE_BUDGET_S`` (180 s; 0 = any time),
the reason printed when that is less.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import resource
import struct
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import typer

from infra.settings import REPO_ROOT, RulesSettings, Settings
from jobs.scoring.core import LEGACY_BATCH
from jobs.scoring.face_join import EARLY_FACES, PENDING
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, STORES
from tests.builders import FACE_LEN  # values per buyer face: the configured embedder's, as the job keeps them

DEFAULT_TRANSACTIONS = 10_000_000
VALIDATE_TRANSACTIONS = 20_000
START_MS = 1_740_992_400_000  # 2025-03-03T09:00:00Z, as the POS generator's default start
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
CARD, LOYALTY, ANON = 0, 1, 2
"""How a transaction is paid: card (profile under ``token:``), cash with a loyalty id (``id:``), anonymous cash."""
NO_RECEIPT, UNKNOWN_RECEIPT = -2, -3
"""``orig`` of a return without a receipt, and of one naming a sale the job never saw."""
FACE_POOL = 4096

STATE_MAPS = (RECEIPTS, STORES, CUSTOMERS)
"""The maps that grow with history; the others are transient (see the module doc)."""
BYTES_PER_TX = 1400
"""Memory the restore needs per transaction of history (measured ~1.0-1.1 KB at 1-10 M, plus headroom): the
largest N that fits is chosen from it when N does not."""
SCALE_UP = 1.6
"""A whole measurement at 1-10 M per transaction, over :func:`calibrate`'s at 100k (see there)."""
_REC = struct.Struct("<HI")


@dataclass(frozen=True)
class HistorySpec:
    """The shape of the generated history (defaults: a mid-size chain over 120 days)."""

    transactions: int = DEFAULT_TRANSACTIONS
    days: float = 120.0
    stores: int = 1000
    lanes_per_store: int = 6
    customers: int = 0
    """People; 0 = 15 % of the transactions (1.5 M at 10 M)."""
    return_share: float = 0.06
    face_share: float = 0.7
    """Share of checkout snapshots in which the face stage found a face (the buyer's embedding)."""
    card_share: float = 0.75
    loyalty_share: float = 0.15
    """The rest pays cash anonymously (no customer profile)."""
    seed: int = 7

    @property
    def people(self) -> int:
        return self.customers or max(2, int(self.transactions * 0.15))


@dataclass
class History:
    """N transactions as numpy columns, in event-time order (row ``i`` is ``tx-<seed>-<i+1>``)."""

    spec: HistorySpec
    t: np.ndarray
    store: np.ndarray
    lane: np.ndarray
    person: np.ndarray
    pay: np.ndarray
    is_return: np.ndarray
    orig: np.ndarray
    """-1 for a sale; a return: the row of its sale, :data:`NO_RECEIPT` or :data:`UNKNOWN_RECEIPT`."""
    amount: np.ndarray
    face: np.ndarray
    tokens: np.ndarray
    """Card token (64 random bits) per person."""
    faces: list[tuple[float, ...]] = field(default_factory=list)
    """The embedding pool: row ``i``'s face is ``faces[i % FACE_POOL]``."""

    def __len__(self) -> int:
        return len(self.t)

    def tx_id(self, i: int) -> str:
        return f"tx-{self.spec.seed}-{i + 1}"

    def receipt_key(self, i: int) -> str:
        o = int(self.orig[i])
        if o >= 0:
            return self.tx_id(o)
        return f"tx-0-{i + 1}" if o == UNKNOWN_RECEIPT else self.tx_id(i)

    def key_codes(self) -> np.ndarray:
        """Customer key per row as a number (card: person, loyalty: people + person, anonymous: -1)."""
        people = self.spec.people
        return np.where(self.pay == CARD, self.person, np.where(self.pay == LOYALTY, people + self.person, -1)).astype(
            np.int64
        )

    def key_name(self, code: int) -> str:
        people = self.spec.people
        if code < people:
            return f"token:tok_{int(self.tokens[code]):016x}"
        return f"id:cust-{code - people + 1:07d}"


def store_name(s: int) -> str:
    return f"store-{s + 1:04d}"


def make_history(spec: HistorySpec) -> History:
    """A seeded history: uniform arrivals over ``days``; skewed customers who mostly shop at a home store;
    returns of an earlier sale (80 %, mostly within a week, at most 30 days), of an unknown receipt (12 %)
    or without one (8 %)."""
    rng = np.random.default_rng(spec.seed)
    n, people = spec.transactions, spec.people
    t = START_MS + np.sort(rng.integers(0, int(spec.days * DAY_MS), n, dtype=np.int64))
    weights = np.cumsum(rng.lognormal(0.0, 1.0, people))
    person = np.searchsorted(weights, rng.random(n) * weights[-1]).astype(np.int32)
    home = rng.integers(0, spec.stores, people, dtype=np.int32)
    store = np.where(rng.random(n) < 0.85, home[person], rng.integers(0, spec.stores, n, dtype=np.int32))
    u = rng.random(n)
    pay = np.where(u < spec.card_share, CARD, np.where(u < spec.card_share + spec.loyalty_share, LOYALTY, ANON))
    hist = History(
        spec=spec,
        t=t,
        store=store.astype(np.int32),
        lane=rng.integers(0, spec.lanes_per_store, n, dtype=np.int16),
        person=person,
        pay=pay.astype(np.int8),
        is_return=rng.random(n) < spec.return_share,
        orig=np.full(n, -1, dtype=np.int64),
        amount=np.round(0.5 + np.exp(rng.normal(3.3, 0.9, n)), 2),
        face=rng.random(n) < spec.face_share,
        tokens=rng.integers(0, 2**63, people, dtype=np.int64),
        faces=[tuple(row.tolist()) for row in rng.normal(0, 0.1, (FACE_POOL, FACE_LEN)).astype(np.float32)],
    )
    _link_returns(hist, rng)
    return hist


def _link_returns(hist: History, rng: np.random.Generator) -> None:
    rows = np.flatnonzero(hist.is_return)
    sales = np.flatnonzero(~hist.is_return)
    u = rng.random(len(rows))
    hist.orig[rows] = np.where(u < 0.92, UNKNOWN_RECEIPT, NO_RECEIPT)
    lag = np.minimum(rng.exponential(5 * DAY_MS, len(rows)), 30 * DAY_MS).astype(np.int64)
    last_before = np.searchsorted(sales, rows) - 1
    pos = np.minimum(np.searchsorted(hist.t[sales], hist.t[rows] - lag), last_before)
    linked = (u < 0.8) & (last_before >= 0)
    r, s = rows[linked], sales[pos[linked]]
    hist.orig[r] = s
    same = rng.random(len(r)) < 0.95
    hist.person[r[same]], hist.pay[r[same]] = hist.person[s[same]], hist.pay[s[same]]
    here = rng.random(len(r)) < 0.9
    hist.store[r[here]] = hist.store[s[here]]
    hist.amount[r] = np.maximum(0.01, np.round(hist.amount[s] * rng.uniform(0.3, 1.0, len(r)), 2))


# --- the state, built directly ---------------------------------------------------------------------------

Emit = Callable[[str, str, Any, bool], None]
"""``emit(map, key, value, kept)``: one entry the history made; ``kept``: still there with retention applied."""
COUNTS = ("faces_kept", "faces_dropped", "receipts_dropped", "customers_dropped")
SALES_PER_PART = 1_000_000


@dataclass
class Plan:
    """The history, the retention and where each return landed: all a part of the build needs."""

    hist: History
    rules: RulesSettings
    attached: dict[int, list[int]]
    """Sale row -> the rows of the returns made against its receipt while it was kept, in order."""
    orphans: dict[str, tuple[int, list[int]]]
    """Receipts a return opened (no sale known, or already expired): key -> (time opened, the rows of its returns)."""

    def parts(self) -> list[tuple[str, int, int]]:
        """Independent pieces of the build: sale rows in slices, then the rest."""
        n = int((~self.hist.is_return).sum())
        slices = [("sales", lo, min(n, lo + SALES_PER_PART)) for lo in range(0, n, SALES_PER_PART)]
        return [*slices, ("orphans", 0, 0), ("stores", 0, 0), ("customers", 0, 0)]


def plan(hist: History, rules: RulesSettings) -> Plan:
    return Plan(hist, rules, *_route_returns(hist, rules.receipt_retention_days * DAY_MS))


def build_part(p: Plan, part: tuple[str, int, int], emit: Emit, counts: dict[str, int]) -> None:
    kind, lo, hi = part
    if kind == "sales":
        _build_sale_receipts(p, lo, hi, emit, counts)
    elif kind == "orphans":
        _build_orphans(p, emit, counts)
    elif kind == "stores":
        _build_stores(p.hist, p.rules, emit)
    else:
        _build_customers(p.hist, p.rules, emit, counts)


def build_state(hist: History, rules: RulesSettings, emit: Emit) -> dict[str, int]:
    """Every entry the job's state maps get from ``hist`` (see the module doc), passed to ``emit``;
    returns counters (faces kept and dropped, receipts and profiles dropped)."""
    counts = dict.fromkeys(COUNTS, 0)
    p = plan(hist, rules)
    for part in p.parts():
        build_part(p, part, emit, counts)
    return counts


def _build_orphans(p: Plan, emit: Emit, counts: dict[str, int]) -> None:
    from jobs.scoring.features import Receipt

    end = int(p.hist.t[-1]) if len(p.hist) else 0
    keep_ms = p.rules.receipt_retention_days * DAY_MS
    hist = p.hist
    codes = hist.key_codes()
    for key, (opened, rows) in p.orphans.items():
        kept = opened >= end - keep_ms
        counts["receipts_dropped"] += not kept
        receipt = Receipt(seen={hist.tx_id(r): _digest(hist, r, codes) for r in rows}, opened=int(hist.t[rows[0]]))
        for r in rows:  # one naming a sale not known (yet) is added up all the same; one without a receipt is not
            if hist.orig[r] != NO_RECEIPT:  # in the history's one currency
                receipt.returned["USD"] = receipt.returned.get("USD", 0.0) + float(hist.amount[r])
        emit(RECEIPTS, key, receipt, kept)


def _digest(hist: History, i: int, codes: np.ndarray) -> int:
    """Row ``i``'s digest in its receipt: :func:`content_digest` of the transaction :func:`_records` sends."""
    from jobs.scoring.features import content_digest

    is_return, code = bool(hist.is_return[i]), int(codes[i])
    tx = {
        "amount": float(hist.amount[i]),
        "currency": "USD",
        "kind": "RETURN" if is_return else "SALE",
        "store_id": store_name(int(hist.store[i])),
        "event_time": int(hist.t[i]),
        "original_transaction_id": hist.receipt_key(i) if is_return and hist.orig[i] != NO_RECEIPT else None,
    }
    return content_digest(tx, f"anon:{hist.tx_id(i)}" if code < 0 else hist.key_name(code))


def _build_sale_receipts(p: Plan, lo: int, hi: int, emit: Emit, counts: dict[str, int]) -> None:
    """The receipts of sales ``lo``..``hi`` (by sale number), with the returns made against them."""
    from jobs.scoring.features import Receipt

    hist, attached = p.hist, p.attached
    end = int(hist.t[-1])
    keep_from = end - p.rules.receipt_retention_days * DAY_MS
    face_from = end - int(p.rules.receipt_face_retention_hours * HOUR_MS)
    faces, seed, amounts = hist.faces, hist.spec.seed, hist.amount
    rows = np.flatnonzero(~hist.is_return)[lo:hi]
    codes = hist.key_codes()
    cols = (hist.t[rows], hist.store[rows], amounts[rows], codes[rows], hist.face[rows])
    names: dict[int, str] = {}
    stores = [store_name(s) for s in range(hist.spec.stores)]
    kept_faces = dropped_faces = dropped = 0
    for i, t, s, amount, code, has_face in zip(rows.tolist(), *(c.tolist() for c in cols), strict=True):
        tx_id = f"tx-{seed}-{i + 1}"
        ck = f"anon:{tx_id}" if code < 0 else names.get(code) or names.setdefault(code, hist.key_name(code))
        seen = {tx_id: _digest(hist, i, codes)}
        receipt = Receipt(
            sale_id=tx_id, store_id=stores[s], customer_key=ck, amount=amount, event_time=t, seen=seen, currency="USD"
        )
        receipt.opened = t  # its returns come after it
        for r in attached.get(i, ()):
            receipt.seen[f"tx-{seed}-{r + 1}"] = _digest(hist, r, codes)
            receipt.returned["USD"] = receipt.returned.get("USD", 0.0) + float(amounts[r])
        kept = t >= keep_from
        if has_face:
            if kept and t >= face_from:
                receipt.sale_face = faces[i % FACE_POOL]
                kept_faces += 1
            else:
                dropped_faces += 1
        dropped += not kept
        emit(RECEIPTS, tx_id, receipt, kept)
    counts["faces_kept"] += kept_faces
    counts["faces_dropped"] += dropped_faces
    counts["receipts_dropped"] += dropped


def _route_returns(hist: History, keep_ms: int) -> tuple[dict[int, list[int]], dict[str, tuple[int, list[int]]]]:
    """Where each return lands: on its sale's receipt while that is kept (sale row -> return rows, in
    order), else on a receipt without a sale under the id it names (key -> (time it opened, the rows of its returns)).

    A receipt is forgotten once a transaction ``receipt_retention_days`` younger comes (``expire_receipts``
    runs before it is matched, and after), so a return finds it iff the return itself is at most that much
    younger; a return-opened receipt ages from the return that opened it.
    """
    attached: dict[int, list[int]] = {}
    orphans: dict[str, tuple[int, list[int]]] = {}
    gone: list[tuple[str, tuple[int, list[int]]]] = []
    rows = np.flatnonzero(hist.is_return)
    prev = hist.t[rows]
    orig = hist.orig[rows]
    alive = (orig >= 0) & (hist.t[np.maximum(orig, 0)] >= prev - keep_ms)
    for r, o, ok, clock in zip(rows.tolist(), orig.tolist(), alive.tolist(), prev.tolist(), strict=True):
        if ok:
            attached.setdefault(o, []).append(r)
            continue
        key = hist.receipt_key(r)
        open_ = orphans.get(key)
        if open_ is not None and open_[0] < clock - keep_ms:  # expired before this return
            gone.append((key, orphans.pop(key)))
            open_ = None
        if open_ is None:
            orphans[key] = (int(hist.t[r]), [])
        orphans[key][1].append(r)
    # Expired return-opened receipts that another replaced: dropped entries, under a unique name.
    for n, (key, entry) in enumerate(gone):
        orphans[f"{key}#gone{n}"] = (-(2**62), entry[1])
    return attached, orphans


def _build_stores(hist: History, rules: RulesSettings, emit: Emit) -> None:
    from jobs.scoring.features import StoreActivity

    window = rules.store_return_window_s * 1000
    rows = np.flatnonzero(hist.is_return)
    rows = rows[np.argsort(hist.store[rows], kind="stable")]  # by store, then event time
    returns: dict[int, list[int]] = {}
    if len(rows):
        starts = np.r_[0, np.flatnonzero(np.diff(hist.store[rows])) + 1]
        for start, times in zip(starts.tolist(), np.split(hist.t[rows], starts[1:]), strict=True):
            ts = times.tolist()
            returns[int(hist.store[rows[start]])] = ts[bisect_left(ts, ts[-1] - window) :]
    for s in np.unique(hist.store).tolist():
        emit(STORES, store_name(s), StoreActivity(return_times=returns.get(s, [])), True)


def _build_customers(hist: History, rules: RulesSettings, emit: Emit, counts: dict[str, int]) -> None:
    """One profile per non-anonymous key, over its transactions since it last started over; and one per
    identity the same way (``ent:``; every identity a transaction carries, its customer key's too): here the
    loyalty id, which card payers give too (``ent:id:<id>``), and the card (``ent:card:<token>``)."""
    _build_profiles(hist, rules, emit, counts, hist.key_codes(), hist.key_name, customer=True)
    known = np.where(hist.pay != ANON, hist.person, -1).astype(np.int64)
    _build_profiles(hist, rules, emit, counts, known, lambda c: f"ent:id:cust-{c + 1:07d}", customer=False)
    card_payers = np.where(hist.pay == CARD, hist.person, -1).astype(np.int64)
    _build_profiles(
        hist, rules, emit, counts, card_payers, lambda c: "ent:card:" + hist.key_name(c)[6:], customer=False
    )


def _build_profiles(
    hist: History,
    rules: RulesSettings,
    emit: Emit,
    counts: dict[str, int],
    codes: np.ndarray,
    name: Callable[[int], str],
    customer: bool,
) -> None:
    from jobs.scoring.features import CustomerProfile

    rows = np.flatnonzero(codes >= 0)
    rows = rows[np.argsort(codes[rows], kind="stable")]  # by key, then event time
    if not len(rows):
        return
    kc, tt = codes[rows], hist.t[rows]
    new_key = np.r_[True, kc[1:] != kc[:-1]]
    restart = new_key | np.r_[True, np.diff(tt) > rules.customer_retention_days * DAY_MS]
    seg_start = np.maximum.accumulate(np.where(restart, np.arange(len(rows)), 0))
    key_end = np.r_[np.flatnonzero(new_key)[1:], len(rows)]
    window, cap = rules.velocity_window_s * 1000, max(1, rules.velocity_limit * 4)
    cutoff = int(hist.t[-1]) - rules.customer_retention_days * DAY_MS
    times, sale = tt.tolist(), (~hist.is_return[rows]).tolist()
    amounts, stores = hist.amount[rows].tolist(), hist.store[rows].tolist()
    names = [store_name(s) for s in range(hist.spec.stores)]
    for a, b in zip(seg_start[key_end - 1].tolist(), key_end.tolist(), strict=True):
        seg = times[a:b]
        if not customer:  # a linked identity: its activity and transaction count only
            profile = CustomerProfile()
            for j in range(a, b):
                profile.observe_identity(times[j], amounts[j])
        else:
            profile = CustomerProfile(recent=seg[max(bisect_left(seg, seg[-1] - window), len(seg) - cap) :])
            for j in range(a, b):
                profile.activity(times[j], amounts[j])  # the activity windows, as the job keeps them
                profile._use_store(names[stores[j]], {})  # the most recently used stores, as the job keeps them
                if sale[j]:
                    x = amounts[j]
                    profile.count += 1
                    delta = x - profile.mean
                    profile.mean += delta / profile.count
                    profile.m2 += delta * (x - profile.mean)
        kept = seg[-1] >= cutoff
        counts["customers_dropped"] += not kept
        emit(CUSTOMERS, name(int(kc[a])), profile, kept)


# --- the job's own state, for the check ------------------------------------------------------------------


def job_settings(rules: RulesSettings | None = None) -> Settings:
    base = Settings()
    return base.model_copy(
        update={
            "job": base.job.model_copy(update={"bootstrap_control": False, "face_deadline_ms": 4000}),
            "rules": rules or base.rules,
        }
    )


def drive_core(hist: History, settings: Settings, batch: int = 256) -> dict[str, dict[str, Any]]:
    """Every transaction of ``hist`` through a real :class:`DecisionCore`, each followed by its checkout
    face observation, in batches, processing time = event time; the maps the job would hold (its writes
    replayed, as MapState gets them, with the customer sweep run to the end)."""
    from jobs.scoring.core import DecisionCore, SourceRecord

    now = [START_MS]
    core = DecisionCore(settings, clock=lambda: now[0] / 1000)
    maps: dict[str, dict[str, Any]] = {}
    for lo in range(0, len(hist), batch):
        records: list[SourceRecord] = []
        for i in range(lo, min(lo + batch, len(hist))):
            records += _records(hist, i, core.tx_topic, settings)
        now[0] = int(hist.t[min(lo + batch, len(hist)) - 1])
        _replay(maps, core.on_records(records, now[0]).writes)
    state = core.state
    assert state is not None
    retention = settings.rules.customer_retention_days * DAY_MS
    removed = state.expire_customers(retention, budget=len(state.customers) + 1)  # the pass under way ...
    removed += state.expire_customers(retention, budget=len(state.customers) + 1)  # ... and a whole one
    _replay(maps, {CUSTOMERS: {key: None for _, key, _ in removed}})
    return maps


def _replay(maps: dict[str, dict[str, Any]], writes: dict[str, dict[str, Any]]) -> None:
    for name, changes in writes.items():
        entries = maps.setdefault(name, {})
        for key, value in changes.items():
            if value is None:
                entries.pop(key, None)
            else:
                entries[key] = pickle.loads(pickle.dumps(value))  # a snapshot, as MapState holds it


def _records(hist: History, i: int, tx_topic: str, settings: Settings) -> list[Any]:
    from jobs.scoring.core import SourceRecord
    from schemas.records import FaceObservation, LineItem, PosTransaction
    from schemas.topics import FACE_OBSERVATIONS

    tx_id, t = hist.tx_id(i), int(hist.t[i])
    store, lane = store_name(int(hist.store[i])), f"lane-{int(hist.lane[i]) + 1:02d}"
    pay, person, amount = int(hist.pay[i]), int(hist.person[i]), float(hist.amount[i])
    orig = None if not hist.is_return[i] or hist.orig[i] == NO_RECEIPT else hist.receipt_key(i)
    tx = PosTransaction(
        transaction_id=tx_id,
        event_time=t,
        store_id=store,
        lane_id=lane,
        kind="RETURN" if hist.is_return[i] else "SALE",
        amount=amount,
        currency="USD",
        cashier_id=f"cashier-{int(hist.store[i]) + 1:04d}-{int(hist.lane[i]) + 1:02d}",
        original_transaction_id=orig,
        items=(LineItem(sku="sku-0001", category="grocery", quantity=1, unit_price=amount),),
        payment_method="card" if pay == CARD else "cash",
        customer_id=f"cust-{person + 1:07d}" if pay != ANON else None,
        card_token=f"tok_{int(hist.tokens[person]):016x}" if pay == CARD else None,
    )
    serial = f"Q2MV-{store}-{lane}"
    obs = FaceObservation(
        observation_id=f"checkout:{tx_id}",
        event_time=t,
        camera_serial=serial,
        store_id=store,
        lane_id=lane,
        transaction_id=tx_id,
        trigger="CHECKOUT",
        status="NO_MATCH" if hist.face[i] else "NO_FACE",
        embedding=list(hist.faces[i % FACE_POOL]) if hist.face[i] else None,
        image_ref=f"checkout/{tx_id}.jpg",
    )
    faces_topic = FACE_OBSERVATIONS.full_name(settings.kafka.topic_prefix)
    return [
        SourceRecord(f"{store}/{lane}".encode(), tx.encode(), tx_topic, 0, 2 * i, t),
        SourceRecord(serial.encode(), obs.encode(), faces_topic, 0, 2 * i + 1, t),
    ]


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def validate(
    transactions: int = VALIDATE_TRANSACTIONS, rules: RulesSettings | None = None, **spec: Any
) -> dict[str, Any]:
    """The builder against the job: the same history through :func:`drive_core` and :func:`build_state`;
    per map: entries, differing keys/values/types and serialized bytes on both sides."""
    settings = job_settings(rules)
    defaults = {"stores": 40, "days": 120.0}
    hist = make_history(HistorySpec(transactions=transactions, **{**defaults, **spec}))
    t0 = time.perf_counter()
    job = drive_core(hist, settings)
    drive_s = time.perf_counter() - t0
    built: dict[str, dict[str, Any]] = {}

    def emit(name: str, key: str, value: Any, kept: bool) -> None:
        if kept:
            built.setdefault(name, {})[key] = value

    counts = build_state(hist, settings.rules, emit)
    out: dict[str, Any] = {"transactions": transactions, "drive_s": round(drive_s, 2), "counts": counts, "maps": {}}
    for name in (RECEIPTS, STORES, CUSTOMERS, PENDING, EARLY_FACES, LEGACY_BATCH):
        a, b = job.get(name, {}), built.get(name, {})
        out["maps"][name] = {
            "job": len(a),
            "built": len(b),
            "keys_differ": len(a.keys() ^ b.keys()),
            "values_differ": sum(not _same(a[k], b[k]) for k in a.keys() & b.keys()),
            "types": sorted({type(v).__name__ for v in a.values()} ^ {type(v).__name__ for v in b.values()}),
            "job_bytes": sum(len(pickle.dumps(v)) for v in a.values()),
            "built_bytes": sum(len(pickle.dumps(v)) for v in b.values()),
        }
    out["equal"] = all(
        m["keys_differ"] == 0 and m["values_differ"] == 0 and not m["types"] and m["job_bytes"] == m["built_bytes"]
        for m in out["maps"].values()
    )
    return out


# --- measurement -----------------------------------------------------------------------------------------


SIZE_FIELDS = ("entries", "key_bytes", "value_bytes", "all_entries", "all_key_bytes", "all_value_bytes")
"""Per map: entries kept and their key and value bytes; the same for every entry made (no retention)."""


class _Writer:
    """Pickles each entry as MapState would, counts its bytes and writes the kept ones to
    ``<folder>/<map>.<part>.bin`` (records of key length, value length, key, value)."""

    def __init__(self, folder: Path, part: int) -> None:
        self.folder, self.part = folder, part
        self.sizes = {name: [0] * len(SIZE_FIELDS) for name in STATE_MAPS}
        self.files: dict[str, Any] = {}

    def emit(self, name: str, key: str, value: Any, kept: bool) -> None:
        data, k = pickle.dumps(value), key.encode()
        s = self.sizes[name]
        s[3] += 1
        s[4] += len(k)
        s[5] += len(data)
        if kept:
            s[0] += 1
            s[1] += len(k)
            s[2] += len(data)
            f = self.files.get(name)
            if f is None:
                f = self.files[name] = (self.folder / f"{name}.{self.part:03d}.bin").open("wb", buffering=8 << 20)
            f.write(_REC.pack(len(k), len(data)) + k + data)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


_PLAN: Plan | None = None
"""The plan the forked build workers inherit."""


def _serialize_part(job: tuple[int, tuple[str, int, int], Path]) -> tuple[dict[str, list[int]], dict[str, int]]:
    index, part, folder = job
    assert _PLAN is not None
    writer, counts = _Writer(folder, index), dict.fromkeys(COUNTS, 0)
    try:
        build_part(_PLAN, part, writer.emit, counts)
    finally:
        writer.close()
    return writer.sizes, counts


def serialize_state(hist: History, rules: RulesSettings, folder: Path, workers: int = 1) -> dict[str, Any]:
    """Build the state in parts (``workers`` forked processes), pickle every value as MapState does and
    write the kept entries under ``folder``; sizes per map and the build's counters.

    The garbage collector is off while building: each object is dropped once pickled (no cycles), and
    this is not what is measured (the restore is, with the collector on)."""
    global _PLAN
    _PLAN = plan(hist, rules)
    jobs = [(i, part, folder) for i, part in enumerate(_PLAN.parts())]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(workers) as pool:
                results = pool.map(_serialize_part, jobs, chunksize=1)
        else:
            results = [_serialize_part(job) for job in jobs]
    finally:
        _PLAN = None
        if gc_was:
            gc.enable()
    sizes = {name: dict.fromkeys(SIZE_FIELDS, 0) for name in STATE_MAPS}
    counts = dict.fromkeys(COUNTS, 0)
    for part_sizes, part_counts in results:
        for name, values in part_sizes.items():
            for f, v in zip(SIZE_FIELDS, values, strict=True):
                sizes[name][f] += v
        for c, v in part_counts.items():
            counts[c] += v
    face = face_pickle_bytes()
    sizes[RECEIPTS]["all_value_bytes"] += counts["faces_dropped"] * face
    return {"maps": sizes, "counts": counts, "face_pickle_bytes": face}


def face_pickle_bytes() -> int:
    """What one buyer face adds to a pickled receipt (:data:`FACE_LEN` floats: a fixed size, whatever their
    values)."""
    from jobs.scoring.features import Receipt

    fields_ = {"sale_id": "tx-1", "store_id": "store-1", "customer_key": "token:x", "amount": 1.0, "event_time": 1}
    plain = Receipt(**fields_, seen={"tx-1": 1})
    with_face = Receipt(**fields_, seen={"tx-1": 1}, sale_face=tuple(float(i) for i in range(FACE_LEN)))
    return len(pickle.dumps(with_face)) - len(pickle.dumps(plain))


def read_entries(path: Path, chunk: int = 64 << 20) -> Iterator[tuple[bytes, memoryview]]:
    """The (key, pickled value) records of one map file, streamed: each record's bytes are transient, as
    they are when the operator iterates MapState."""
    with path.open("rb", buffering=0) as f:
        rest = b""
        while True:
            data = f.read(chunk)
            if not data:
                break
            buf = rest + data
            view, pos, end = memoryview(buf), 0, len(buf)
            while pos + 6 <= end:
                klen, vlen = _REC.unpack_from(buf, pos)
                stop = pos + 6 + klen + vlen
                if stop > end:
                    break
                yield buf[pos + 6 : pos + 6 + klen], view[pos + 6 + klen : stop]
                pos = stop
            rest = buf[pos:]


def map_entries(folder: Path, name: str) -> Iterator[tuple[bytes, memoryview]]:
    for path in sorted(folder.glob(f"{name}.*.bin")):
        yield from read_entries(path)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_maps(folder: Path) -> dict[str, dict[str, Any]]:
    """The maps as the operator loads them: a new key string and one ``pickle.loads`` per entry."""
    loads = pickle.loads
    return {name: {k.decode(): loads(v) for k, v in map_entries(folder, name)} for name in STATE_MAPS}


def restore_in_this_process(folder: Path, framing_sample: int = 1_000_000) -> dict[str, Any]:
    """The restore, timed (in a fresh process: ``--restore-from``): the maps loaded as the operator loads
    them (:func:`load_maps`), then :meth:`DecisionCore.restore`, with the collector on as in the job.
    The file framing (a stand-in for MapState's iteration) is timed alone on ``framing_sample`` entries."""
    from jobs.scoring.core import DecisionCore

    core = DecisionCore(job_settings())
    t0 = time.perf_counter()
    sampled = sum(1 for _, (_k, _v) in zip(range(framing_sample), map_entries(folder, RECEIPTS), strict=False))
    framing_us = (time.perf_counter() - t0) / max(1, sampled) * 1e6
    gc.collect()
    exact_peak = _peak_reset()
    base = _rss()
    t0 = time.perf_counter()
    maps = load_maps(folder)
    load_s = time.perf_counter() - t0
    loaded = _rss()
    t0 = time.perf_counter()
    core.restore(maps)
    restore_s = time.perf_counter() - t0
    after = _rss()
    assert core.state is not None and len(core.state.receipts) == len(maps[RECEIPTS])
    return {
        "entries": sum(len(m) for m in maps.values()),
        "framing_us_per_entry": framing_us,
        "load_s": load_s,
        "restore_s": restore_s,
        "rss_before": base,
        "rss_after_load": loaded,
        "rss_after_restore": after,
        "rss_peak": _peak(),
        "peak_exact": exact_peak,
        "gc_enabled": gc.isenabled(),
    }


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def measure(
    spec: HistorySpec,
    rules: RulesSettings | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Generate, build and serialize the state of ``spec``'s history, then restore it in a fresh process."""
    rules = rules or RulesSettings()
    workers = workers or default_workers()
    t_start = time.perf_counter()
    hist = make_history(spec)
    gen_s = time.perf_counter() - t_start
    with tempfile.TemporaryDirectory(prefix="cg-state-", dir=os.environ.get("CG_BENCH_STATE_DIR")) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        built = serialize_state(hist, rules, folder, workers=workers)
        build_s = time.perf_counter() - t0
        people = spec.people
        del hist
        gc.collect()
        log(f"  built and pickled in {build_s:.0f}s ({workers} processes); restoring in a fresh process")
        done = subprocess.run(
            [sys.executable, "-m", "tests.bench.state", "--restore-from", str(folder)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"restore process failed ({done.returncode}): {done.stderr[-2000:]}")
        restored = json.loads(done.stdout.strip().splitlines()[-1])
    res = _summary(spec, people, rules, built, restored, gen_s, build_s, time.perf_counter() - t_start)
    res["build_workers"] = workers
    return res


def _summary(
    spec: HistorySpec,
    people: int,
    rules: RulesSettings,
    built: dict,
    restored: dict,
    gen_s: float,
    build_s: float,
    total_s: float,
) -> dict[str, Any]:
    maps = built["maps"]
    entries = sum(m["entries"] for m in maps.values())
    kept = sum(m["value_bytes"] + m["key_bytes"] for m in maps.values())
    unbounded = sum(m["all_value_bytes"] + m["all_key_bytes"] for m in maps.values())
    per_m = 1e6 / max(1, entries)
    rss_increase = restored["rss_peak"] - restored["rss_before"]
    return {
        "transactions": spec.transactions,
        "history": {**asdict(spec), "people": people},
        "retention": {
            "receipt_days": rules.receipt_retention_days,
            "face_hours": rules.receipt_face_retention_hours,
            "customer_days": rules.customer_retention_days,
        },
        "entries": {name: m["entries"] for name, m in maps.items()} | {PENDING: 0, EARLY_FACES: 0, LEGACY_BATCH: 0},
        "entries_total": entries,
        "maps": maps,
        "counts": built["counts"],
        "face_pickle_bytes": built["face_pickle_bytes"],
        "serialized_bytes": kept,
        "serialized_bytes_without_retention": unbounded,
        "restore": restored,
        "restore_total_s": restored["load_s"] + restored["restore_s"],
        "rss_increase_bytes": rss_increase,
        "per_million_entries": {
            "serialized_mib": kept / 2**20 * per_m,
            "load_s": restored["load_s"] * per_m,
            "restore_s": restored["restore_s"] * per_m,
            "rss_mib": rss_increase / 2**20 * per_m,
        },
        "seconds": {"generate": gen_s, "build_and_pickle": build_s, "total": total_s},
    }


def calibrate(workers: int, n: int = 100_000) -> float:
    """Estimated seconds per transaction of a whole measurement here and now, from one at ``n`` in this
    process: generation, build (shared by ``workers``), load and restore, times :data:`SCALE_UP` (what
    the larger heap adds: measured 1.45x at 1 M, 1.6x at 10 M)."""
    from jobs.scoring.core import DecisionCore

    t0 = time.perf_counter()
    hist = make_history(HistorySpec(transactions=n))
    with tempfile.TemporaryDirectory(prefix="cg-state-cal-") as tmp:
        t1 = time.perf_counter()
        serialize_state(hist, RulesSettings(), Path(tmp))
        t2 = time.perf_counter()
        DecisionCore(job_settings()).restore(load_maps(Path(tmp)))
        t3 = time.perf_counter()
    return ((t1 - t0) + (t2 - t1) / workers + (t3 - t2)) * SCALE_UP / n


def feasible(
    requested: int, budget_s: float, workers: int, available: int | None = None, per_tx_s: float | None = None
) -> tuple[int, str | None]:
    """The largest N (``requested``, else 5 M, 2 M, 1 M, 500k or 100k) whose restore fits in the memory
    available now (:data:`BYTES_PER_TX`) and whose measurement fits ``budget_s`` (0 = any time), by
    :func:`calibrate`; and why it is smaller than requested, if it is."""
    available = psutil.virtual_memory().available if available is None else available
    if budget_s and per_tx_s is None:
        per_tx_s = calibrate(workers)
    reasons = []
    for n in (requested, *(m for m in (5_000_000, 2_000_000, 1_000_000, 500_000, 100_000) if m < requested)):
        if n * BYTES_PER_TX > available:
            reasons.append(f"{n:,} need ~{n * BYTES_PER_TX / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
        elif budget_s and per_tx_s and n * per_tx_s > budget_s:
            reasons.append(f"{n:,} would take ~{n * per_tx_s:.0f}s here, over the {budget_s:.0f}s budget")
        else:
            return n, reasons[0] if reasons else None
    return min(requested, 100_000), reasons[0]


def bench_for_make(
    transactions: int = DEFAULT_TRANSACTIONS, budget_s: float = 180.0, check: int = VALIDATE_TRANSACTIONS
) -> dict:
    """``make bench``'s section: the builder checked against the job at ``check`` transactions, then the
    state at ``transactions`` -- or at the largest N that fits this machine's memory and ``budget_s``,
    saying why."""
    out: dict[str, Any] = {"requested": transactions}
    if check:
        out["validation"] = validate(check)
        if not out["validation"]["equal"]:
            raise AssertionError(f"synthetic state differs from DecisionCore's: {out['validation']['maps']}")
    workers = default_workers()
    n, reason = feasible(transactions, budget_s, workers)
    if reason:
        typer.echo(f"  state measured at {n:,} transactions instead of {transactions:,}: {reason}")
    out["reduced_because"] = reason
    out |= measure(HistorySpec(transactions=n), workers=workers, log=typer.echo)
    return out


def report_rows(res: dict) -> list[tuple[str, str, str]]:
    """Rows for the ``make bench`` table (measure, value, goal)."""
    n, e, r, pm = res["transactions"], res["entries"], res["restore"], res["per_million_entries"]
    counts, gib = res["counts"], 2**30
    rows = [
        (
            f"state at {n:,} tx of history ({res['history']['days']:.0f} d): receipts / stores / customers",
            f"{e[RECEIPTS]:,} / {e[STORES]:,} / {e[CUSTOMERS]:,}",
            "",
        ),
        (
            "  serialized (pickled as MapState), retention applied / none (GiB)",
            f"{res['serialized_bytes'] / gib:.2f} / {res['serialized_bytes_without_retention'] / gib:.2f}",
            "",
        ),
        (
            f"  buyer faces kept ({res['retention']['face_hours']:.0f} h) / dropped",
            f"{counts['faces_kept']:,} / {counts['faces_dropped']:,}",
            "",
        ),
        (
            "  restore: unpickle + DecisionCore.restore (s)",
            f"{r['load_s']:.1f} + {r['restore_s']:.1f} = {res['restore_total_s']:.1f}",
            "",
        ),
        ("  restore: peak RSS increase (GiB)", f"{res['rss_increase_bytes'] / gib:.2f}", ""),
        (
            "  per million entries: MiB serialized / s restore / MiB RSS",
            f"{pm['serialized_mib']:.0f} / {pm['load_s'] + pm['restore_s']:.2f} / {pm['rss_mib']:.0f}",
            "",
        ),
    ]
    if "validation" in res:
        v = res["validation"]
        rows.append((f"  synthetic state = DecisionCore's at {v['transactions']:,} tx", str(v["equal"]), "True"))
    if res.get("reduced_because"):
        rows.append((f"  measured at {n:,}, not {res['requested']:,}", res["reduced_because"], ""))
    return rows


def print_summary(res: dict) -> None:
    for measure_, value, _ in report_rows(res):
        typer.echo(f"{measure_}: {value}")
    typer.echo(json.dumps({k: res[k] for k in ("entries", "maps", "counts", "restore", "seconds")}, indent=1))


app = typer.Typer(add_completion=False)


@app.command()
def main(
    transactions: Annotated[int, typer.Option(help="Transactions of history.")] = DEFAULT_TRANSACTIONS,
    days: Annotated[float, typer.Option(help="Event-time span of the history.")] = 120.0,
    check: Annotated[int, typer.Option(help="Check the builder against DecisionCore at this N (0 = skip).")] = 0,
    scaling: Annotated[str, typer.Option(help="Also measure at these N first, comma-separated.")] = "",
    workers: Annotated[int, typer.Option(help="Processes that build the state (0 = up to 2).")] = 0,
    budget: Annotated[float, typer.Option(help="Measure the largest N that fits this many seconds (0 = any).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    restore_from: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Measure the scoring job's state size and restore at N transactions of history."""
    if restore_from is not None:
        print(json.dumps(restore_in_this_process(restore_from)))
        return
    results: dict[str, Any] = {}
    if check:
        results["validation"] = validate(check)
        typer.echo(f"validation at {check:,}: equal={results['validation']['equal']}")
        typer.echo(json.dumps(results["validation"]["maps"]))
    workers = workers or default_workers()
    for requested in [int(x) for x in scaling.split(",") if x.strip()] + [transactions]:
        n, reason = feasible(requested, budget, workers)
        typer.echo(f"state at {n:,} transactions over {days:g} days" + (f" ({reason})" if reason else ""))
        res = measure(HistorySpec(transactions=n, days=days), workers=workers, log=typer.echo)
        res["requested"], res["reduced_because"] = requested, reason
        results[str(n)] = res
        print_summary(res)
    sizes = [r for k, r in results.items() if k != "validation"]
    for small, big in zip(sizes, sizes[1:], strict=False):
        typer.echo(scaling_line(small, big))
    if out is not None:
        out.write_text(json.dumps(results, indent=1, default=str))


def scaling_line(small: dict, big: dict) -> str:
    """How the figures grew from one N to a larger one (1.0 per doubling of N would be 2.0)."""
    ratio = big["transactions"] / small["transactions"]

    def grew(key: Callable[[dict], float]) -> str:
        return f"{key(big) / key(small):.2f}x"

    return (
        f"{small['transactions']:,} -> {big['transactions']:,} ({ratio:.1f}x): entries "
        f"{grew(lambda r: r['entries_total'])}, serialized {grew(lambda r: r['serialized_bytes'])}, "
        f"load {grew(lambda r: r['restore']['load_s'])}, DecisionCore.restore "
        f"{grew(lambda r: r['restore']['restore_s'])}, RSS {grew(lambda r: r['rss_increase_bytes'])}"
    )


if __name__ == "__main__":
    app()
