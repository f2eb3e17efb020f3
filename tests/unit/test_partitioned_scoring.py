"""The partitioned steps decide as the single-state core does, on one shard or many.

A seeded stream with cross-store returns, returns ahead of their sale in two currencies, refunds in another
currency, duplicates (same bytes), the same id with other content (at once or later), anonymous buyers, shared
cards / e-mails / IPs, faces early, late and missing, a buyer who is not the returner, a suspect, and bad records:
:class:`PartitionedCore` on 1 and on 4 shards gives exactly the rows :class:`DecisionCore` gives, and the model
sees exactly the same features.
"""

from __future__ import annotations

import pickle
import random
import zlib
from dataclasses import replace

import numpy as np
import pytest

from infra.settings import Settings
from jobs.scoring.core import DecisionCore, SourceRecord
from jobs.scoring.features import PROFILE_KEY
from jobs.scoring.partitioned import PartitionedCore, ReceiptStep, order, shard_of
from jobs.scoring.rules import ModelResult
from jobs.scoring.scorer import Predictor
from jobs.scoring.watchlist import Watchlist
from schemas.codec import codec
from schemas.records import PosTransaction, WatchlistEntry
from schemas.topics import DEAD_LETTERS, FACE_OBSERVATIONS, SCORED_TRANSACTIONS, TRANSACTIONS
from tests.builders import FACE_LEN, OTHER_FACE_LEN, T0, checkout_face, face_vector, return_of, sale

PREFIX = "cg."
TX, FACES = TRANSACTIONS.full_name(PREFIX), FACE_OBSERVATIONS.full_name(PREFIX)
DUP = "duplicate_transaction_id"
CONFLICT = "conflicting_transaction"
SCORED, DLQ = SCORED_TRANSACTIONS.full_name(PREFIX), DEAD_LETTERS.full_name(PREFIX)
NOW = T0 + 86_400_000
"""Processing time: a day after the first event."""


def settings(decide_from: int = 0) -> Settings:
    base = Settings()
    job = {"bootstrap_control": False, "face_deadline_ms": 4000, "batch_size": 16, "decide_from": decide_from}
    return base.model_copy(
        update={"kafka": base.kafka.model_copy(update={"topic_prefix": PREFIX}), "job": base.job.model_copy(update=job)}
    )


class FeaturePredictor(Predictor):
    """A score that changes with every feature the model gets: any difference in them shows in the rows."""

    def predict_batch(self, items):
        return [ModelResult(score=_digest(tx, ind), version="features-1") for tx, ind in items]


class FailsOnBatches(FeaturePredictor):
    """Fails on any call of more than one transaction: every batch is decided again one by one."""

    def predict_batch(self, items):
        if len(items) > 1:
            raise RuntimeError("model backend failed")
        return super().predict_batch(items)


def _digest(tx, ind) -> int:
    text = repr((tx.get(PROFILE_KEY), sorted(ind.items()), tx["transaction_id"]))
    return sum(ord(c) * (i % 97 + 1) for i, c in enumerate(text)) % 1000


def _face(rng: np.random.Generator) -> list[float]:
    return face_vector(rng)


def _obs(tx_id: str, at: int, embedding, n: int) -> SourceRecord:
    obs = checkout_face(tx_id, at=at, embedding=embedding, observation_id=f"checkout:{tx_id}:{n}")
    return SourceRecord(b"cam", obs.encode(), FACES, 1, n, NOW)


def _other_content(rnd: random.Random, tx: PosTransaction, at: int, stores: list[str]) -> list:
    """Records reusing ``tx``'s id under its receipt with other content (conflicts), as ``(time, record)``: one at
    once (whichever of the two comes first stands) and one later, from another store."""
    out = []
    if rnd.random() < 0.02:
        out.append((at, replace(tx, amount=tx.amount + 1)))
    if rnd.random() < 0.03:
        out.append((at + 20_000, replace(tx, store_id=rnd.choice(stores), event_time=at + 20_000)))
    return out


def _ahead_of_sale(rnd: random.Random, i: int, at: int, store: str) -> list:
    """Returns of a sale still to come (the id of one of the next few transactions), in two currencies, as
    ``(time, record)``: a receipt opened by returns, which its sale (if that id turns out a sale) fills later."""
    if rnd.random() >= 0.05:
        return []
    ahead = f"t{i + rnd.randrange(1, 4):04d}"
    out = []
    for n, currency in enumerate(rnd.sample(["USD", "EUR", "JPY"], 2)):
        early = return_of(f"e{i:04d}-{n}", ahead, store=store, amount=round(rnd.uniform(5, 500), 2))
        out.append((at + 1 + n, replace(early, currency=currency, event_time=at + 1 + n)))  # no tie with ``at``
    return out


def seeded_stream(seed: int, n: int = 360) -> tuple[list[list[SourceRecord]], list[float]]:
    """Batches of records in event-time order, and the suspect's face."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    people = [_face(rng) for _ in range(12)]
    suspect = _face(rng)
    stores = [f"store-{i:03d}" for i in range(1, 6)]
    sales: list[tuple[str, int]] = []
    events: list[tuple[int, int, SourceRecord]] = []  # (time, tiebreak, record)
    offset = 0

    def add(at: int, record: SourceRecord) -> None:
        """Records at one time in the steps' own order (:func:`order`): the single core takes them as they come."""
        nonlocal offset
        offset += 1
        events.append((at, zlib.crc32(record.value or b""), record))

    for i in range(n):
        at = T0 + i * 9_000 + rnd.randrange(0, 8_000)
        buyer = rnd.randrange(12)
        extra = {
            "customer_email": f"p{buyer}@example.com" if rnd.random() < 0.7 else None,
            "ip_address": f"10.0.0.{buyer % 5}" if rnd.random() < 0.6 else None,
        }
        card = None if rnd.random() < 0.1 else f"card-{buyer % 9}"
        store = rnd.choice(stores)
        amount = round(rnd.uniform(5, 900), 2)
        tx_id = f"t{i:04d}"
        if rnd.random() < 0.03:  # a return of a sale nobody saw (a receipt with no sale), or of no receipt
            original = rnd.choice([f"unknown-{i % 5}", None])
            tx = return_of(tx_id, original, at_s=(at - T0) / 1000, store=store, amount=amount, card=card, **extra)
        elif sales and rnd.random() < 0.3:
            original, _ = rnd.choice(sales)
            tx = return_of(tx_id, original, at_s=(at - T0) / 1000, store=store, amount=amount, card=card, **extra)
            tx = replace(tx, currency="EUR" if rnd.random() < 0.1 else "USD")  # a few in another currency
        else:
            tx = sale(tx_id, at_s=(at - T0) / 1000, store=store, amount=amount, card=card, **extra)
            sales.append((tx_id, buyer))
        value = tx.encode()
        add(at, SourceRecord(tx_id.encode(), value, TX, 0, offset, NOW))
        if rnd.random() < 0.06:  # the same record again
            add(at, SourceRecord(tx_id.encode(), value, TX, 0, offset, NOW))
        for when, other in [*_other_content(rnd, tx, at, stores), *_ahead_of_sale(rnd, i, at, store)]:
            add(when, SourceRecord(other.transaction_id.encode(), other.encode(), TX, 0, offset, NOW))
        if rnd.random() < 0.03:  # the id under another receipt (a dead letter), now or later
            later = rnd.choice([0, 30_000])
            other = return_of(tx_id, f"unknown-{i % 7}", at_s=(at + later - T0) / 1000, store=store)
            add(at + later, SourceRecord(tx_id.encode(), other.encode(), TX, 0, offset, NOW))
        r = rnd.random()
        face = suspect if r < 0.03 else people[buyer if r < 0.8 else rnd.randrange(12)]
        if rnd.random() < 0.85:  # most faces come, a few seconds after their transaction
            add(at + rnd.randrange(1, 3_000), _obs(tx_id, at, face if rnd.random() < 0.9 else None, offset))
        if rnd.random() < 0.02:
            add(at, SourceRecord(b"x", b"\x00not avro", TX, 0, offset, NOW))
    events.sort(key=lambda e: (e[0], e[1]))
    records = [e[2] for e in events]
    batches = [records[i : i + 25] for i in range(0, len(records), 25)]
    return batches, suspect


def _watchlist(s: Settings, suspect: list[float], expires_at: int | None = None) -> Watchlist:
    wl = Watchlist(s)
    wl.upsert(
        WatchlistEntry(
            subject_id="subj-1",
            category="SUSPECT",
            embeddings=[suspect],
            reason="test",
            flagged_by="lp@example.com",
            flagged_at=T0,
            expires_at=expires_at,
        ).to_avro()
    )
    return wl


def _clock() -> float:
    return NOW / 1000


def _run_single(batches, suspect, decide_from: int = 0, stats: list | None = None, predictor=None) -> list:
    s = settings(decide_from)
    predictor = predictor or FeaturePredictor()
    core = DecisionCore(s, predictor=predictor, watchlist=_watchlist(s, suspect), clock=_clock)
    rows: list = []
    for i, batch in enumerate(batches):
        rows += core.on_records(batch, NOW + i * 1000).outputs
    rows += core.on_timer(NOW + 10**7, NOW + 10**7).outputs
    if stats is not None:
        stats.append(core.scorer.stats)
    return rows


def _run_partitioned(
    batches, suspect, shards: int, shuffle: int | None = None, decide_from: int = 0, stats: list | None = None
) -> list:
    s = settings(decide_from)
    core = PartitionedCore(s, shards, predictor=FeaturePredictor(), watchlist=_watchlist(s, suspect), clock=_clock)
    rnd = random.Random(shuffle)
    rows: list = []
    for i, batch in enumerate(batches):
        if shuffle is not None:  # another arrival order within the batch: the steps order it
            batch = rnd.sample(batch, len(batch))
        rows += core.on_records(batch, NOW + i * 1000)
    rows += core.on_timer(NOW + 10**7)
    if stats is not None:
        stats.append(core.scorer.stats)
    return rows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_partitioned_steps_decide_exactly_as_the_single_state_core_on_one_shard_and_on_four(seed):
    batches, suspect = seeded_stream(seed)
    single = _run_single(batches, suspect)
    one = _run_partitioned(batches, suspect, 1)
    four = _run_partitioned(batches, suspect, 4, shuffle=seed)
    assert len(single) > 300
    assert sorted(one) == sorted(single)
    assert sorted(four) == sorted(single)


def _tx_time(record: SourceRecord) -> int | None:
    """A transaction record's event time; None for other records and for undecodable bytes."""
    if record.topic != TX:
        return None
    try:
        return codec("PosTransaction").decode(record.value)["event_time"]
    except Exception:  # noqa: BLE001 - the stream's deliberately broken records
        return None


def test_a_warm_up_builds_state_from_earlier_transactions_and_decides_only_the_later_ones_on_either_layout():
    batches, suspect = seeded_stream(2)
    cut = T0 + 180 * 9_000  # the stream's middle
    full = _run_single(batches, suspect)
    stats: list = []
    warm = _run_single(batches, suspect, decide_from=cut, stats=stats)

    scored_full, scored_warm = _scored(full), _scored(warm)
    later = {k: v for k, v in scored_full.items() if v["event_time"] >= cut}
    assert 100 < len(later) < len(scored_full) - 100
    assert scored_warm == later, "the later transactions decided exactly as with the whole stream decided"
    assert set(warm) <= set(full), "nothing else either: no alert or row of its own for the earlier ones"
    assert any(t == DLQ for t, _, _ in warm), "earlier bad records are still dead-lettered"
    warmed = len(scored_full) - len(later)
    assert sorted(_run_partitioned(batches, suspect, 1, decide_from=cut)) == sorted(warm)
    assert sorted(_run_partitioned(batches, suspect, 4, shuffle=2, decide_from=cut, stats=stats)) == sorted(warm)
    # Counted once each, also when a model call fails and its batch is decided again one by one.
    failing = _run_single(batches, suspect, decide_from=cut, stats=stats, predictor=FailsOnBatches())
    assert _scored(failing) == later
    assert [s.observed_only["warm_up"] for s in stats] == [warmed] * 3

    # It is the history that makes them so: started cold at the same time, the same transactions are
    # decided on other features.
    cold_batches = [[r for r in b if (_tx_time(r) or cut) >= cut] for b in batches]
    cold = _scored(_run_single(cold_batches, suspect))
    assert set(cold) == set(later)
    assert sum(cold[k] != later[k] for k in later) > len(later) // 2


def test_seeded_stream_holds_what_the_equivalence_must_cover():
    """Not vacuous: returns across stores, duplicates, mismatched buyers, suspects, dead letters, missing faces."""

    batches, suspect = seeded_stream(1)
    rows = _run_single(batches, suspect)
    scored = [codec("ScoredTransaction").decode(v) for t, _, v in rows if t == SCORED]
    reasons = {r for s in scored for r in s["reasons"]} | {k for s in scored for k in s["indicators"]}
    assert {"cross_store_return", "customer_mismatch", "buyer_face_mismatch", "buyer_face_similarity"} <= reasons
    assert {"return_unknown_receipt", "return_without_receipt", "return_currency_mismatch"} <= reasons
    assert "return_exceeds_sale" in reasons
    assert {s["face_status"] for s in scored} >= {"MATCHED", "NO_MATCH", "UNAVAILABLE"}
    kinds = [codec("DeadLetter").decode(v)["error_kind"] for t, _, v in rows if t == DLQ]
    assert kinds.count("duplicate_transaction_id") >= 3 and kinds.count(CONFLICT) >= 3 and len(set(kinds)) >= 3


def test_order_and_shards_are_stable_across_processes():
    tx = {"event_time": 5, "transaction_id": "t1"}
    assert order(tx, b"abc") == (5, "t1", 891568578)
    assert (shard_of("card:card-1", 4), shard_of("t1", 8)) == (2, 7)  # CRC-32, no salt


def _scored(rows) -> dict[str, dict]:

    return {k.decode(): codec("ScoredTransaction").decode(v) for t, k, v in rows if t == SCORED}


def _tx(tx) -> SourceRecord:
    return SourceRecord(tx.transaction_id.encode(), tx.encode(), TX, 0, 0, NOW)


def test_a_return_past_the_return_window_meets_no_receipt_on_any_number_of_shards():
    """Decided by the two transactions' own times, not by how far other receipts' traffic moved a clock."""
    s = settings()
    days = s.rules.receipt_retention_days
    for shards in (1, 3):
        core = PartitionedCore(s, shards, clock=_clock)
        core.on_records([_tx(sale("s1", amount=50))], NOW)
        returns = [_tx(return_of("r1", "s1", at_s=days * 86_400 - 1, amount=20))]
        returns.append(_tx(return_of("r2", "s1", at_s=days * 86_400 + 1, amount=20)))
        later = T0 + days * 86_400_000 + 10_000
        rows = core.on_records(returns, later) + core.on_timer(later + 10_000)
        assert "return_unknown_receipt" not in _scored(rows)["r1"]["indicators"]
        assert _scored(rows)["r2"]["indicators"].get("return_unknown_receipt") == 1.0


def test_a_refund_in_another_currency_is_flagged_and_not_added_up_on_any_number_of_shards():
    s = settings()
    for shards in (1, 3):
        core = PartitionedCore(s, shards, clock=_clock)
        core.on_records([_tx(sale("s1", amount=100))], NOW)
        returns = [_tx(replace(return_of("r1", "s1", at_s=100, amount=10_000), currency="JPY"))]
        returns.append(_tx(return_of("r2", "s1", at_s=200, amount=90)))
        rows = core.on_records(returns, NOW) + core.on_timer(NOW + 600_000)
        assert _scored(rows)["r1"]["indicators"].get("return_currency_mismatch") == 1.0
        assert "return_exceeds_sale" not in _scored(rows)["r1"]["indicators"]
        assert "return_exceeds_sale" not in _scored(rows)["r2"]["indicators"]


def test_returns_made_before_their_sale_in_two_currencies_add_up_in_the_sales_currency_on_either_layout():
    s = settings().model_copy(update={"job": settings().job.model_copy(update={"face_deadline_ms": 0})})
    for first, second in (("JPY", "USD"), ("USD", "JPY")):
        for run in _layouts(s):
            amounts = {"JPY": 5_000, "USD": 80}
            early = [_tx(replace(return_of("r1", "s1", at_s=10, amount=amounts[first]), currency=first))]
            early.append(_tx(replace(return_of("r2", "s1", at_s=20, amount=amounts[second]), currency=second)))
            run(early, NOW)
            run([_tx(sale("s1", at_s=30, amount=100))], NOW + 1000)
            rows = run([_tx(return_of("r3", "s1", at_s=60, amount=30))], NOW + 2000)  # 80 + 30 USD of 100
            assert _scored(rows)["r3"]["indicators"].get("return_exceeds_sale") == 1.0, first


def test_a_redelivered_return_past_the_window_is_decided_once_on_any_number_of_shards():
    """The return replaced its sale's receipt; the sale's old entry, expired later, dropped the one in its place."""
    s = settings()
    days = s.rules.receipt_retention_days
    for shards in (1, 3):
        core = PartitionedCore(s, shards, clock=_clock)
        core.on_records([_tx(sale("s1", amount=50))], NOW)
        later = T0 + days * 86_400_000 + 10_000
        late = _tx(return_of("r1", "s1", at_s=days * 86_400 + 1, amount=20))
        first = core.on_records([late], later) + core.on_timer(later + 10_000)
        again = core.on_records([late], later + 20_000) + core.on_timer(later + 40_000)
        assert "r1" in _scored(first) and _scored(again) == {}


def _reused(rows) -> list[dict]:
    return [d for d in (codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ) if d["error_kind"] == DUP]


def _layouts(s: Settings) -> list:
    """The single-state core and the partitioned steps on 1 and 3 shards, each as ``(records, now) -> rows``."""
    single = DecisionCore(s, clock=_clock)
    runs = [lambda records, now, core=single: core.on_records(records, now).outputs]
    for shards in (1, 3):
        part = PartitionedCore(s, shards, clock=_clock)
        runs.append(lambda records, now, core=part: core.on_records(records, now))
    return runs


def test_a_later_transaction_reusing_an_id_under_another_receipt_is_a_dead_letter_on_either_layout():
    """The sale keeps its decision (the return's scored record would have replaced it: both are filed by id)."""
    s = settings().model_copy(update={"job": settings().job.model_copy(update={"face_deadline_ms": 0})})
    for run in _layouts(s):
        first = run([_tx(sale("s1", amount=50))], NOW)
        reuse = _tx(return_of("s1", "s0", at_s=3_600, amount=50))
        rows = run([reuse], NOW + 1000)
        assert set(_scored(first)) == {"s1"} and _scored(rows) == {}
        [dead] = _reused(rows)
        assert "taken by an earlier transaction on receipt 's1'" in dead["reason"]
        assert dead["dead_letter_id"] == f"{TX}:{DUP}:s1:{zlib.crc32(reuse.value)}"
        assert codec("PosTransaction").decode(dead["payload"])["original_transaction_id"] == "s0"
        assert run([reuse], NOW + 2000) == []  # a copy: dropped at its receipt (one dead letter per record)


def test_a_record_reusing_an_id_on_its_receipt_with_other_content_is_a_dead_letter_on_either_layout():
    """An identical copy is a redelivery (dropped without a word); one with other content is not: the first stands."""
    s = settings().model_copy(update={"job": settings().job.model_copy(update={"face_deadline_ms": 0})})
    for run in _layouts(s):
        first = _tx(return_of("r1", "s1", at_s=60, amount=20))
        assert set(_scored(run([first], NOW))) == {"r1"}
        assert run([first], NOW + 1000) == []
        other = _tx(replace(return_of("r1", "s1", at_s=90, amount=20), currency="EUR"))
        rows = run([other], NOW + 2000)
        assert _scored(rows) == {}
        [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]
        assert (
            dead["error_kind"] == CONFLICT and dead["dead_letter_id"] == f"{TX}:{CONFLICT}:r1:{zlib.crc32(other.value)}"
        )
        assert "another currency, event_time;" in dead["reason"]
        assert codec("PosTransaction").decode(dead["payload"])["currency"] == "EUR"
        again = [codec("DeadLetter").decode(v)["dead_letter_id"] for t, _, v in run([other], NOW + 3000)]
        assert again == [dead["dead_letter_id"]], "the same record again: the same dead letter"
        assert run([first], NOW + 4000) == []


def test_two_records_under_one_id_waiting_for_their_faces_together_lose_neither():
    """The face join holds transactions by id: the second used to replace the first, which was never decided."""
    s = settings()
    for shards in (None, 1, 3):
        core = DecisionCore(s, clock=_clock) if shards is None else PartitionedCore(s, shards, clock=_clock)
        both = [_tx(sale("x1", amount=20)), _tx(return_of("x1", "s7", amount=20))]
        if shards is None:
            rows = core.on_records(both, NOW).outputs + core.on_timer(NOW + 10**7, NOW + 10**7).outputs
        else:
            rows = core.on_records(both, NOW) + core.on_timer(NOW + 10**7)
        [scored] = _scored(rows).values()
        [dead] = _reused(rows)
        kinds = {scored["kind"], codec("PosTransaction").decode(dead["payload"])["kind"]}
        assert kinds == {"SALE", "RETURN"}, shards


def test_an_id_is_free_again_after_the_receipt_retention():
    s = settings().model_copy(update={"job": settings().job.model_copy(update={"face_deadline_ms": 0})})
    days = s.rules.receipt_retention_days
    for run in _layouts(s):
        run([_tx(sale("s1", amount=50))], NOW)
        later = _tx(return_of("s1", "s0", at_s=days * 86_400 + 60, amount=5))
        rows = run([later], T0 + days * 86_400_000 + 120_000)
        assert set(_scored(rows)) == {"s1"} and not _reused(rows)


def _decoded(tx) -> dict:
    return codec("PosTransaction").decode(tx.encode())


def test_a_sale_that_comes_after_its_return_and_is_stamped_later_still_expires_on_the_receipt_step():
    s = settings()
    step = ReceiptStep(s)
    step.on("s1", (_decoded(return_of("r1", "s1", at_s=100, amount=20)), {}, 0), (0, "r1", 0))
    step.on("s1", (_decoded(sale("s1", at_s=200, amount=50)), {}, 0), (0, "s1", 0))
    days = s.rules.receipt_retention_days
    step.expire(T0 + days * 86_400_000 + 150_000)  # the return's entry is due, the sale is not
    assert "s1" in step.receipts
    step.expire(T0 + 2 * days * 86_400_000)
    assert "s1" not in step.receipts


def test_forget_drops_the_buyer_face_so_a_later_return_is_not_compared():
    s = settings()
    rng = np.random.default_rng(5)
    buyer, other = _face(rng), _face(rng)
    core = PartitionedCore(s, 2, clock=_clock)
    core.on_records([_tx(sale("s1")), _obs("s1", T0, buyer, 1)], NOW)
    assert core.forget("subj-s1")
    rows = core.on_records([_tx(return_of("r1", "s1", at_s=60)), _obs("r1", T0 + 60_000, other, 2)], NOW + 1000)
    assert "buyer_face_similarity" not in _scored(rows)["r1"]["indicators"]


def test_forget_drops_the_subjects_face_matched_at_a_later_sale_in_another_shard():
    """The subject's later sale is filed under its own receipt's shard: before, the forget went to the enrolment
    sale's shard only, and the later face stayed until its retention."""
    s = settings()
    rng = np.random.default_rng(6)
    buyer = _face(rng)
    shards = 4
    later = next(f"s{i}" for i in range(2, 99) if shard_of(f"s{i}", shards) != shard_of("s1", shards))
    core = PartitionedCore(s, shards, watchlist=_watchlist(s, buyer), clock=_clock)  # subj-1: this buyer
    core.on_records([_tx(sale("s1")), _obs("s1", T0, buyer, 1)], NOW)
    core.on_records([_tx(sale(later, at_s=60, card="card-B")), _obs(later, T0 + 60_000, buyer, 2)], NOW + 1000)
    holder = core.slots[shard_of(later, shards)].decide.faces.receipts
    assert holder[later].sale_face == tuple(buyer)
    assert core.forget("subj-1")
    assert later not in holder


def test_an_entry_expired_at_the_sales_time_matches_nobody_on_any_number_of_shards():
    """As in the single-state layout: a lapsed listing the watchlist service has not tombstoned (it is down) is no
    match at a sale after its ``expires_at``, and still one at a sale before it, whenever the job decides."""
    s = settings()
    rng = np.random.default_rng(7)
    suspect = _face(rng)
    for shards in (1, 3):
        core = PartitionedCore(s, shards, watchlist=_watchlist(s, suspect, expires_at=T0 + 60_000), clock=_clock)
        rows = core.on_records([_tx(sale("s1", at_s=59)), _obs("s1", T0 + 59_000, suspect, 1)], NOW)
        rows += core.on_records([_tx(sale("s2", at_s=60, card="card-B")), _obs("s2", T0 + 60_000, suspect, 2)], NOW)
        out = _scored(rows)
        assert (out["s1"]["face_status"], out["s1"]["face_subject_id"]) == ("MATCHED", "subj-1")
        assert (out["s2"]["face_status"], out["s2"]["face_subject_id"], out["s2"]["outcome"]) == (
            "NO_MATCH",
            None,
            "APPROVE",
        )


def test_steps_restored_from_their_written_changes_after_every_batch_decide_as_if_never_stopped():
    """What the Flink operator relies on: each step's flushed changes, written to MapState and read back at a
    restore, are its whole state (a restart after any batch changes no decision)."""
    from jobs.scoring.partitioned import DecideStep, GatherStep, IdentityStep, ReceiptStep, StoreStep

    batches, suspect = seeded_stream(5, n=240)
    expected = _run_partitioned(batches, suspect, 2)
    s = settings()
    core = PartitionedCore(s, 2, predictor=FeaturePredictor(), watchlist=_watchlist(s, suspect), clock=_clock)
    stored: dict[tuple[int, str], dict[str, dict]] = {}
    rows: list = []
    for i, batch in enumerate(batches):
        rows += core.on_records(batch, NOW + i * 1000)
        for n, slot in enumerate(core.slots):
            for name in ("receipt", "store", "identity", "gather", "decide"):
                maps = stored.setdefault((n, name), {})
                for map_name, changes in getattr(slot, name).flush().items():
                    target = maps.setdefault(map_name, {})
                    for key, value in changes.items():
                        if value is None:
                            target.pop(key, None)
                        else:
                            target[key] = pickle.loads(pickle.dumps(value))  # as MapState holds it
            fresh = {
                "receipt": ReceiptStep(s),
                "store": StoreStep(s),
                "identity": IdentityStep(s),
                "gather": GatherStep(s),
                "decide": DecideStep(core.scorer),
            }
            for name, step in fresh.items():
                step.restore(stored.get((n, name), {}))
                setattr(slot, name, step)
    rows += core.on_timer(NOW + 10**7)
    assert sorted(rows) == sorted(expected)


def test_a_return_of_an_unseen_sale_delivered_twice_is_decided_once():
    s = settings()
    core = PartitionedCore(s, 2, clock=_clock)
    twice = _tx(return_of("r1", "never-sold", amount=20))
    rows = core.on_records([twice], NOW) + core.on_records([twice], NOW + 1000) + core.on_timer(NOW + 10**7)
    assert [k for t, k, _ in rows if t == SCORED] == [b"r1"]


def test_a_profile_that_raises_makes_its_transaction_a_re_drivable_dead_letter_at_once_and_the_rest_are_decided(
    monkeypatch,
):
    """No record stops the job (as in the single-state core): a profile's failure is answered to the gather, so
    the transaction's letter (its record, at its position) comes as soon as its answers are in, not after an hour
    of waiting for an answer that never comes; the profile's state is re-written as it is; the others go on."""
    from jobs.scoring.partitioned import IdentityStep

    real = IdentityStep.on

    def flaky(self, key, part, order_):
        if part[1] == "t2":
            raise RuntimeError("boom")
        return real(self, key, part, order_)

    monkeypatch.setattr(IdentityStep, "on", flaky)
    s = settings()
    core = PartitionedCore(s, 2, clock=_clock)
    records = [SourceRecord(b"store-001/lane-01", sale(f"t{i}", at_s=i).encode(), TX, 0, i, NOW) for i in (1, 2, 3)]
    rows = core.on_records(records, NOW)
    assert _letters(rows) and not core.slots[shard_of("t2", 2)].gather.gathering  # at once, not an hour later
    rows += core.on_timer(NOW + 10**7)
    assert sorted(_scored(rows)) == ["t1", "t3"]
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]  # one, after all of t2's answers
    assert dead["dead_letter_id"] == f"{TX}:identity:t2@0:2" and dead["error_kind"] == "internal_error"
    assert dead["reason"].startswith("RuntimeError in flaky (test_partitioned_scoring.py:")
    assert (dead["payload"], dead["partition"], dead["offset"]) == (records[1].value, 0, 2)
    monkeypatch.setattr(IdentityStep, "on", real)
    letter = next(dl for dl in _letters(rows).values())
    again = core.on_records([_redriven(letter, 50)], NOW + 1000) + core.on_timer(NOW + 10**7)
    assert list(_scored(again)) == ["t2"]


def test_a_decision_batch_that_raises_is_decided_one_by_one_and_only_the_failing_one_dead_lettered(monkeypatch):
    class Picky(Predictor):
        def predict_batch(self, items):
            if any(tx["transaction_id"] == "t2" for tx, _ in items):
                raise ValueError("bad row")
            return [ModelResult(score=1, version="p") for _ in items]

    s = settings()
    core = PartitionedCore(s, 1, predictor=Picky(), clock=_clock)
    rows = core.on_records([_tx(sale(f"t{i}", at_s=i)) for i in range(1, 4)], NOW)
    rows += core.on_timer(NOW + 10**7)
    assert sorted(_scored(rows)) == ["t1", "t3"]
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]
    assert dead["dead_letter_id"] == f"{TX}:decide:t2@0:0"


def test_a_sale_whose_decision_raises_leaves_no_faceless_buyer_receipt_in_memory_or_in_state():
    from jobs.scoring.partitioned import BUYER_FACES

    class Fails(Predictor):
        def predict_batch(self, items):
            raise ValueError("model down")

    s = settings()
    core = PartitionedCore(s, 1, predictor=Fails(), clock=_clock)
    rows = core.on_records([_tx(sale("t1")), _obs("t1", T0, _face(np.random.default_rng(1)), 1)], NOW)
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]
    assert dead["dead_letter_id"] == f"{TX}:decide:t1@0:0"
    decide = core.slots[0].decide
    assert decide.faces.receipts == {}  # nothing would ever expire a receipt without a face
    assert decide.flush().get(BUYER_FACES, {}).get("t1") is None  # not saved either (a removal, or nothing)


def test_an_observation_of_another_embedders_length_is_dead_lettered_on_the_partitioned_layout_too():
    s = settings()
    core = PartitionedCore(s, 2, clock=_clock)  # the configured embedder: FACE_LEN values
    rows = core.on_records([_tx(sale("t1")), _obs("t1", T0, [0.01] * OTHER_FACE_LEN, 7)], NOW)
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]
    assert dead["error_kind"] == "invalid_embedding" and f"{FACE_LEN} values, got {OTHER_FACE_LEN}" in dead["reason"]


class RecordingPredictor(FeaturePredictor):
    """Keeps each transaction's profile features, by transaction id."""

    def __init__(self) -> None:
        self.profiles: dict[str, tuple] = {}

    def predict_batch(self, items):
        self.profiles.update((tx["transaction_id"], tx[PROFILE_KEY]) for tx, _ in items)
        return super().predict_batch(items)


@pytest.mark.parametrize("shards", [0, 1, 3], ids=["single", "partitioned-1", "partitioned-3"])
def test_an_identity_keeps_its_whole_history_when_it_stops_being_the_customer_key(shards):
    """A loyalty customer's cash sales are keyed by the loyalty id; the first card payment is keyed by the card
    and carries the id and e-mail as linked identities. Their histories must hold the cash sales: they read as
    new (``link_new``), the very mark of a known customer paying with a stolen card."""
    from jobs.scoring.features import PROFILE_FEATURES

    who = {"customer_id": "cust-000042", "customer_email": "ann@x.com"}
    txs = [
        sale("c1", at_s=-172_800, card=None, **who),
        sale("c2", at_s=-86_400, card=None, **who),
        sale("c3", at_s=0, card="tok_1", **who),
    ]
    s, suspect = settings(), face_vector(np.random.default_rng(0))
    recorder = RecordingPredictor()
    if shards:
        core = PartitionedCore(s, shards, predictor=recorder, watchlist=_watchlist(s, suspect), clock=_clock)
        for i, tx in enumerate(txs):
            core.on_records([_tx(tx)], NOW + i * 1000)
        core.on_timer(NOW + 10**7)
    else:
        _run_single([[_tx(tx)] for tx in txs], suspect, predictor=recorder)
    card = dict(zip(PROFILE_FEATURES, recorder.profiles["c3"], strict=True))
    assert card["cust_tx_before"] == 0 and card["link_identities"] == 2  # a new card, with the id and e-mail
    assert card["link_new"] == 0 and card["link_tx_before_max"] == 2 and card["link_since_prev_s_min"] == 86_400


def test_a_failed_count_in_of_the_customer_keys_own_identity_leaves_its_transaction_decided(monkeypatch, caplog):
    """The gather does not wait for it: the transaction is decided, so no dead letter names it."""
    from jobs.scoring.partitioned import IdentityStep

    real = IdentityStep.on

    def flaky(self, key, part, order_):
        if part[:2] == ("own", "t2"):
            raise RuntimeError("boom")
        return real(self, key, part, order_)

    monkeypatch.setattr(IdentityStep, "on", flaky)
    core = PartitionedCore(settings(), 2, clock=_clock)
    rows = core.on_records([_tx(sale(f"t{i}", at_s=i, card=f"card-{i}")) for i in range(1, 4)], NOW)
    rows += core.on_timer(NOW + 10**7)
    assert sorted(_scored(rows)) == ["t1", "t2", "t3"] and not [r for r in rows if r[0] == DLQ]
    assert "count-in failed" in caplog.text


def test_a_suspects_face_after_the_deadline_raises_the_same_late_alert_on_either_layout():
    """The sale was decided without its face; the face comes later (real footage is slow): its match alerts."""
    suspect = _face(np.random.default_rng(5))
    s = settings()
    single = DecisionCore(s, predictor=FeaturePredictor(), watchlist=_watchlist(s, suspect), clock=_clock)
    parted = PartitionedCore(s, 4, predictor=FeaturePredictor(), watchlist=_watchlist(s, suspect), clock=_clock)
    tx, face = _tx(sale("late-1")), _obs("late-1", T0 + 20_000, suspect, 1)
    first = single.on_records([tx], NOW).outputs + single.on_timer(NOW + 4000, NOW + 4000).outputs
    assert parted.on_records([tx], NOW) == [] and sorted(parted.on_timer(NOW + 4000)) == sorted(first)
    late_single, late_parted = single.on_records([face], NOW + 20_000).outputs, parted.on_records([face], NOW + 20_000)
    assert late_single == late_parted
    [(topic, key, value)] = late_single
    alert = codec("Alert").decode(value)
    assert key == b"watchlist:checkout:late-1:subj-1" and alert["transaction_id"] == "late-1"
    assert "face_seen_after_the_sale_was_decided" in alert["reasons"] and alert["amount"] == 25.0
    assert single.scorer.stats.late_faces == parted.scorer.stats.late_faces == {"matched": 1}


def _fail_receipt_write_once(monkeypatch, tx_id: str) -> None:
    """The receipt step takes ``tx_id`` in memory, then its state write raises, once."""
    real = ReceiptStep._put
    fail = {tx_id}

    def flaky(self, name, key, value):
        if value is not None and fail & set(value.seen):
            fail.clear()
            raise RuntimeError("boom")
        return real(self, name, key, value)

    monkeypatch.setattr(ReceiptStep, "_put", flaky)


def test_a_transaction_failing_at_its_receipt_is_decided_when_its_dead_letter_is_re_driven(monkeypatch):
    _fail_receipt_write_once(monkeypatch, "r1")
    core = PartitionedCore(settings(), 2, clock=_clock)
    rows = core.on_records([_tx(sale("t1", amount=30, at_s=1)), _tx(return_of("r1", "t1", at_s=60, amount=30))], NOW)
    rows += core.on_timer(NOW + 10**7)
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in rows if t == DLQ]
    assert dead["dead_letter_id"] == f"{TX}:receipt:r1@0:0" and list(_scored(rows)) == ["t1"]
    step = core.slots[shard_of("t1", 2)].receipt
    assert step.flush()["receipts"]["t1"] == step.receipts["t1"]  # saved as held, the failure mark too
    other = core.on_records([_tx(return_of("r1", "t1", at_s=60, amount=29))], NOW + 1000)
    assert [codec("DeadLetter").decode(v)["error_kind"] for t, _, v in other if t == DLQ] == [CONFLICT]
    again = core.on_records([_tx(return_of("r1", "t1", at_s=60, amount=30))], NOW + 2000)
    again += core.on_timer(NOW + 2 * 10**7)
    assert list(_scored(again)) == ["r1"]
    assert "return_exceeds_sale" not in _scored(again)["r1"]["indicators"]
    copy = core.on_records([_tx(return_of("r1", "t1", at_s=60, amount=30))], NOW + 3000)
    assert not copy + core.on_timer(NOW + 3 * 10**7)


def test_a_failed_transactions_dead_letter_is_its_record_as_sent_and_its_re_drive_is_decided_once(monkeypatch):
    """Both letters of a transaction (a failed receipt step, a failed decision) are the record as it was on the
    topic, at its partition and offset with its key, so ``redrive`` sends them back; the receipt's is decided once."""
    from producers.redrive import Selection, plan_redrive
    from schemas.records import DeadLetter

    class Picky(Predictor):
        def predict_batch(self, items):
            if any(tx["transaction_id"] == "t2" for tx, _ in items):
                raise ValueError("bad row")
            return [ModelResult(score=1, version="p") for _ in items]

    _fail_receipt_write_once(monkeypatch, "r1")
    core = PartitionedCore(settings(), 2, predictor=Picky(), clock=_clock)
    returned = return_of("r1", "t1", at_s=60, amount=30, customer_email="Mule@Example.COM ")
    records = [
        SourceRecord(b"store-001/lane-01", sale("t1", amount=30, at_s=1).encode(), TX, 0, 10, NOW),
        SourceRecord(b"store-001/lane-01", returned.encode(), TX, 1, 20, NOW),
        SourceRecord(b"store-001/lane-02", sale("t2", card=" card-B", at_s=2).encode(), TX, 2, 30, NOW),
    ]
    rows = core.on_records(records, NOW) + core.on_timer(NOW + 10**7)
    letters = {dl.dead_letter_id: dl for dl in (DeadLetter.decode(v) for t, _, v in rows if t == DLQ)}
    assert set(letters) == {f"{TX}:receipt:r1@1:20", f"{TX}:decide:t2@2:30"} and list(_scored(rows)) == ["t1"]
    for letter, record in (
        (letters[f"{TX}:receipt:r1@1:20"], records[1]),
        (letters[f"{TX}:decide:t2@2:30"], records[2]),
    ):
        assert (letter.partition, letter.offset, letter.key, letter.payload) == (*record[3:5], record.key, record.value)
    plan = plan_redrive(
        [letters[f"{TX}:receipt:r1@1:20"]], Selection(frozenset({"scoring-job"})), {TX: 3}, transactions=TX
    )
    [send] = plan.sends
    assert (send.partition, send.key, send.payload) == (1, records[1].key, records[1].value)
    again = core.on_records([SourceRecord(send.key, send.payload, TX, 1, 99, NOW)], NOW + 1000)
    again += core.on_timer(NOW + 2 * 10**7)
    assert list(_scored(again)) == ["r1"]
    copy = core.on_records([SourceRecord(send.key, send.payload, TX, 1, 100, NOW)], NOW + 2000)
    assert not copy + core.on_timer(NOW + 3 * 10**7), "a second re-drive is a redelivered copy"


class _FailsOnce(Predictor):
    """A model that raises on the batches holding one of ``ids`` until each has been dead-lettered ``times`` times
    (a batch that fails is decided again one by one: that try counts)."""

    def __init__(self, ids: set[str], times: int = 1) -> None:
        self.left = dict.fromkeys(ids, times)

    def predict_batch(self, items):
        hit = [tx["transaction_id"] for tx, _ in items if self.left.get(tx["transaction_id"], 0) > 0]
        if hit:
            if len(items) == 1:
                self.left[hit[0]] -= 1
            raise ValueError("model hiccup")
        return [ModelResult(score=1, version="p") for _ in items]


def _redriven(letter, offset: int) -> SourceRecord:
    """The copy ``redrive`` sends of ``letter``, read back at ``offset``: its record, key and header."""
    from producers.redrive import Selection, plan_redrive

    [send] = plan_redrive([letter], Selection(frozenset({"scoring-job"})), {TX: 3}, transactions=TX).sends
    return SourceRecord(send.key, send.payload, TX, send.partition, offset, NOW, send.dead_letter_id.encode())


def _letters(rows) -> dict:
    from schemas.records import DeadLetter

    return {dl.dead_letter_id: dl for dl in (DeadLetter.decode(v) for t, _, v in rows if t == DLQ)}


def test_a_transaction_whose_decision_failed_is_decided_once_when_its_dead_letter_is_re_driven():
    """The decide step cannot mark the id failed on the receipt (another step, another slot): the re-driven copy's
    header names its letter, which the receipt takes once; a second re-drive of it, or a plain copy, is dropped."""
    core = PartitionedCore(settings(), 2, predictor=_FailsOnce({"t2"}), clock=_clock)
    records = [
        SourceRecord(b"store-001/lane-01", sale("t1", amount=30, at_s=1).encode(), TX, 0, 10, NOW),
        SourceRecord(b"store-001/lane-02", sale("t2", card="card-B", at_s=2).encode(), TX, 2, 30, NOW),
    ]
    rows = core.on_records(records, NOW) + core.on_timer(NOW + 10**7)
    letters = _letters(rows)
    assert set(letters) == {f"{TX}:decide:t2@2:30"} and list(_scored(rows)) == ["t1"]
    copy = _redriven(letters[f"{TX}:decide:t2@2:30"], 99)
    again = core.on_records([copy], NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert list(_scored(again)) == ["t2"] and not _letters(again)
    twice = core.on_records([copy._replace(offset=100)], NOW + 2000) + core.on_timer(NOW + 3 * 10**7)
    plain = core.on_records([copy._replace(offset=101, redriven=None)], NOW + 3000) + core.on_timer(NOW + 4 * 10**7)
    assert not twice and not plain, "the same letter's second re-drive and a plain copy are copies"


def _profiles(core: PartitionedCore) -> dict:
    return {k: p for slot in core.slots for k, p in slot.identity.profiles.items()}


@pytest.mark.parametrize("step", ["decide", "gather"])
def test_a_re_driven_transaction_that_failed_after_its_profiles_counted_it_is_not_counted_again(step, monkeypatch):
    """Its store and every profile had counted it before the failure: the re-drive reads them without counting it a
    second time, so the customer's next sale sees one earlier sale, not two."""
    from jobs.scoring.partitioned import GatherStep

    if step == "gather":
        real = GatherStep._complete
        left = [1]

        def flaky(self, env, customer, linked):
            if env[0]["transaction_id"] == "t2" and left:
                left.pop()
                raise ZeroDivisionError("division by zero")
            return real(self, env, customer, linked)

        monkeypatch.setattr(GatherStep, "_complete", flaky)
    predictor = _FailsOnce({"t2"} if step == "decide" else set(), times=2)  # a lone one is tried twice
    core = PartitionedCore(settings(), 2, predictor=predictor, clock=_clock)
    first = SourceRecord(b"store-001/lane-02", sale("t2", card="card-B", at_s=2).encode(), TX, 2, 30, NOW)
    rows = core.on_records([first], NOW) + core.on_timer(NOW + 10**7)
    [letter] = _letters(rows).values()
    assert letter.dead_letter_id == f"{TX}:{step}:t2@2:30"
    before = {k: (p.count, tuple(p.recent), p.c24h) for k, p in _profiles(core).items()}
    assert before and all(count == 1 for count, _, _ in before.values())
    again = core.on_records([_redriven(letter, 99)], NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert list(_scored(again)) == ["t2"]
    after = {k: (p.count, tuple(p.recent), p.c24h) for k, p in _profiles(core).items()}
    assert after == before, "every profile counts it once"
    later = SourceRecord(b"store-001/lane-02", sale("t3", card="card-B", at_s=60).encode(), TX, 2, 31, NOW)
    rows = core.on_records([later], NOW + 3000) + core.on_timer(NOW + 3 * 10**7)
    assert _scored(rows)["t3"]["indicators"]["velocity"] == 2.0, "one earlier sale, not two"


def test_a_re_driven_transaction_that_fails_again_has_a_new_letter_whose_re_drive_is_decided():
    # a lone transaction is tried twice a delivery (its batch, then alone): it fails on two deliveries
    core = PartitionedCore(settings(), 1, predictor=_FailsOnce({"t2"}, times=4), clock=_clock)
    first = SourceRecord(b"store-001/lane-02", sale("t2", at_s=2).encode(), TX, 2, 30, NOW)
    rows = core.on_records([first], NOW) + core.on_timer(NOW + 10**7)
    [letter] = _letters(rows).values()
    rows = core.on_records([_redriven(letter, 99)], NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert set(_letters(rows)) == {f"{TX}:decide:t2@2:99"} and not _scored(rows)
    [letter] = _letters(rows).values()
    rows = core.on_records([_redriven(letter, 120)], NOW + 2000) + core.on_timer(NOW + 3 * 10**7)
    assert list(_scored(rows)) == ["t2"]


def test_a_copy_whose_redrive_header_names_no_later_failure_of_its_own_transaction_is_dropped():
    core = PartitionedCore(settings(), 2, clock=_clock)
    record = SourceRecord(b"store-001/lane-01", sale("t1", amount=30, at_s=1).encode(), TX, 0, 10, NOW)
    assert list(_scored(core.on_records([record], NOW) + core.on_timer(NOW + 10**7))) == ["t1"]
    for n, header in enumerate(
        (f"{TX}:decide:t2@0:10", f"{TX}:receipt:t1@0:10", f"{TX}:decide:t1@0:10x", "cg.alerts:decide:t1@0:10", "")
    ):
        copy = record._replace(offset=20 + n, redriven=header.encode())
        assert not core.on_records([copy], NOW + 1000 * n) + core.on_timer(NOW + (2 + n) * 10**7), header


def test_a_transaction_failing_at_its_store_or_gather_step_has_a_re_drivable_letter_decided_once(monkeypatch):
    from jobs.scoring.partitioned import GatherStep, StoreStep

    failing = {"t2": StoreStep, "t3": GatherStep}
    for tx_id, step in failing.items():
        real = step.on

        def flaky(self, key, part, *rest, _real=real, _id=tx_id):
            env = part[1] if isinstance(part, tuple) and part[0] == "tx" else part
            mine = isinstance(env, tuple) and isinstance(env[0], dict) and env[0]["transaction_id"] == _id
            if mine and failing.pop(_id, None) is not None:
                raise RuntimeError("boom")
            return _real(self, key, part, *rest)

        monkeypatch.setattr(step, "on", flaky)
    core = PartitionedCore(settings(), 2, clock=_clock)
    records = [
        SourceRecord(b"store-001/lane-01", sale("t1", at_s=1).encode(), TX, 0, 10, NOW),
        SourceRecord(b"store-001/lane-02", sale("t2", card="card-B", at_s=2).encode(), TX, 1, 30, NOW),
        SourceRecord(b"store-001/lane-03", sale("t3", card="card-C", at_s=3).encode(), TX, 2, 40, NOW),
    ]
    rows = core.on_records(records, NOW) + core.on_timer(NOW + 10**7)
    letters = _letters(rows)
    assert set(letters) == {f"{TX}:store:t2@1:30", f"{TX}:gather:t3@2:40"} and list(_scored(rows)) == ["t1"]
    copies = [_redriven(letter, 90 + n) for n, letter in enumerate(letters.values())]
    again = core.on_records(copies, NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert sorted(_scored(again)) == ["t2", "t3"] and not _letters(again)
    twice = core.on_records([c._replace(offset=c.offset + 10) for c in copies], NOW + 2000)
    assert not twice + core.on_timer(NOW + 3 * 10**7)


def test_a_late_face_whose_alert_fails_is_dead_lettered_as_the_face_and_its_decided_sale_is_never_re_driven(
    monkeypatch,
):
    """The late face's decision raises: its letter names the face (no record to send back), not the sale, whose
    re-drive the receipt would take as a later step's failure and decide a second time."""
    from jobs.scoring.scorer import Scorer
    from producers.redrive import Selection, plan_redrive

    real = Scorer.decide_batch

    def flaky(self, envs, *args, late=None, **kwargs):
        if late and any(late):
            raise RuntimeError("alert failed")
        return real(self, envs, *args, late=late, **kwargs)

    monkeypatch.setattr(Scorer, "decide_batch", flaky)
    core = PartitionedCore(settings(), 2, clock=_clock)
    tx = sale("t1", amount=30, at_s=1)
    rows = core.on_records([SourceRecord(b"store-001/lane-01", tx.encode(), TX, 0, 10, NOW)], NOW)
    rows += core.on_timer(NOW + 10**7)  # decided without its face
    assert list(_scored(rows)) == ["t1"]
    late = core.on_records([_obs("t1", tx.event_time, _face(np.random.default_rng(1)), 1)], NOW + 10**7 + 1000)
    [letter] = _letters(late).values()
    assert letter.dead_letter_id == f"{FACES}:late:t1" and letter.source_topic == FACES and not letter.payload
    plan = plan_redrive([letter], Selection(frozenset({"scoring-job"})), {TX: 3, FACES: 3}, transactions=TX)
    assert not plan.sends


def test_a_transaction_whose_gather_fails_on_its_last_answer_has_a_re_drivable_letter_decided_once(monkeypatch):
    """A transaction with profiles is completed at the gather by whichever of its messages comes last, usually a
    profile's answer: a failure there is the transaction's letter, with its record, not the answer's."""
    from jobs.scoring.partitioned import GatherStep

    real = GatherStep._complete
    fail = {"t2"}

    def flaky(self, env, customer, linked):
        if env[0]["transaction_id"] in fail:
            fail.clear()
            raise RuntimeError("boom")
        return real(self, env, customer, linked)

    monkeypatch.setattr(GatherStep, "_complete", flaky)
    core = PartitionedCore(settings(), 2, clock=_clock)
    records = [
        SourceRecord(b"store-001/lane-01", sale("t1", at_s=1).encode(), TX, 0, 10, NOW),
        SourceRecord(b"store-001/lane-02", sale("t2", card="card-B", at_s=2).encode(), TX, 1, 30, NOW),
    ]
    rows = core.on_records(records, NOW) + core.on_timer(NOW + 10**7)
    letters = _letters(rows)
    assert set(letters) == {f"{TX}:gather:t2@1:30"} and list(_scored(rows)) == ["t1"]
    assert letters[f"{TX}:gather:t2@1:30"].payload == records[1].value
    assert not core.slots[shard_of("t2", 2)].gather.gathering
    copy = _redriven(letters[f"{TX}:gather:t2@1:30"], 90)
    again = core.on_records([copy], NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert list(_scored(again)) == ["t2"] and not _letters(again)


def test_a_re_driven_copy_failing_at_its_receipt_is_decided_when_that_letter_is_re_driven(monkeypatch):
    """The receipt took the copy of a later step's letter (a retake), then failed: it marks the id failed as for a
    first delivery, so the receipt letter's re-drive is decided, not dropped as a copy."""
    core = PartitionedCore(settings(), 2, predictor=_FailsOnce({"t2"}), clock=_clock)
    first = SourceRecord(b"store-001/lane-02", return_of("t2", "t1", amount=20, at_s=2).encode(), TX, 2, 30, NOW)
    rows = core.on_records([_tx(sale("t1", amount=30, at_s=1)), first], NOW) + core.on_timer(NOW + 10**7)
    [letter] = _letters(rows).values()
    _fail_receipt_write_once(monkeypatch, "t2")
    rows = core.on_records([_redriven(letter, 99)], NOW + 1000) + core.on_timer(NOW + 2 * 10**7)
    assert set(_letters(rows)) == {f"{TX}:receipt:t2@2:99"} and not _scored(rows)
    [letter] = _letters(rows).values()
    rows = core.on_records([_redriven(letter, 120)], NOW + 2000) + core.on_timer(NOW + 3 * 10**7)
    assert list(_scored(rows)) == ["t2"]
    assert "return_exceeds_sale" not in _scored(rows)["t2"]["indicators"], "its amount is added up once"


def test_an_older_jobs_letter_of_a_late_face_named_after_its_decided_cash_sale_is_not_decided_again():
    """Before the late face's letter named the face, an older job wrote it as the sale (``<topic>:decide:<id>``, no
    position, the sale trimmed to what a late face keeps): re-driven after an upgrade, it is dropped as a copy."""
    from jobs.scoring.face_join import LATE_FIELDS
    from jobs.scoring.partitioned import failed_after_receipt, failure_letter_id
    from schemas.errors import INTERNAL_ERROR, InvalidRecord
    from schemas.records import DeadLetter

    core = PartitionedCore(settings(), 2, clock=_clock)
    cash = sale("t1", amount=30, at_s=1, card=None)
    rows = core.on_records([SourceRecord(b"store-001/lane-01", cash.encode(), TX, 0, 10, NOW)], NOW)
    assert list(_scored(rows + core.on_timer(NOW + 10**7))) == ["t1"]
    trimmed = {k: _decoded(cash).get(k) for k in LATE_FIELDS}
    error = InvalidRecord(INTERNAL_ERROR, "RuntimeError: alert failed")
    _, _, value = core.scorer.transaction_dead_letter(trimmed, error, f"{TX}:decide:t1")
    copy = _redriven(DeadLetter.decode(value), 90)
    assert not _scored(core.on_records([copy], NOW + 10**7 + 1000) + core.on_timer(NOW + 2 * 10**7))
    # this job's letter of a transaction of unknown position says so, and is taken; an older store letter too
    unknown = failure_letter_id(TX, "decide", trimmed)
    assert unknown == f"{TX}:decide:t1@-1:-1" and failed_after_receipt(unknown, TX, "t1")
    assert failed_after_receipt(f"{TX}:store:t1", TX, "t1")


def test_a_forget_queued_for_shards_another_slot_owns_is_dropped_after_the_face_retention():
    """A slot sees only its own shards: the entries for the others were never taken, one more per shard at
    every forget, for as long as the job ran."""
    from jobs.scoring.partitioned import ForgetQueue

    now = [0.0]
    queue = ForgetQueue(4, keep_s=3600, clock=lambda: now[0])
    queue.add("subj-a")
    now[0] = 10.0
    queue.add("subj-b")
    assert queue.take("1") == ["subj-a", "subj-b"]  # this slot's shard: applied
    now[0] = 3605.0
    assert queue.take("2") == ["subj-b"]  # subj-a is past the retention: its face is gone anyway
    now[0] = 3700.0
    assert queue.take("1") == []
    assert queue.queued == {}  # the shards of other slots (0, 3) hold nothing any more


def test_a_decision_held_in_a_savepoint_of_a_job_before_late_faces_is_decided_after_the_upgrade(monkeypatch):
    """The message to the decide step (a ``Ready``) waits in the event-time batcher's state until the watermark passes
    it, so a savepoint holds some. One pickled by a job before ``Ready.late`` (its values in field order, one fewer)
    came back without that slot, and the decide step's batch failed on it: each such transaction was dead-lettered
    ``internal_error`` instead of decided."""
    from jobs.scoring.face_join import Ready
    from jobs.scoring.partitioned import DecideStep

    def pickled_by_an_older_job(item: Ready) -> Ready:
        with monkeypatch.context() as older:
            older.setattr(Ready, "__getstate__", lambda self: [self.env, self.seen, self.waited_ms])
            data = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        return pickle.loads(data)

    real = DecideStep.on_batch
    monkeypatch.setattr(
        DecideStep, "on_batch", lambda self, items: real(self, [(k, pickled_by_an_older_job(i)) for k, i in items])
    )
    core = PartitionedCore(settings(), 2, clock=_clock)
    rows = core.on_records([_tx(sale("s1"))], NOW) + core.on_timer(NOW + 10**7)
    assert [k for t, k, _ in rows if t == SCORED] == [b"s1"]
    assert not [k for t, k, _ in rows if t == DLQ]
