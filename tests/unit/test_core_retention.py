"""What the scoring job keeps is bounded by settings (issue 12, defect 10): customer profiles and the
buyer faces on receipts expire, and each expiry is a state write, so MapState forgets them too."""

from __future__ import annotations

from jobs.scoring.features import CustomerProfile
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, ScoringState
from tests.builders import T0, return_of, sale
from tests.unit.test_core_robustness import assert_persisted_equals_memory
from tests.unit.test_decision_core import BUYER_FACE, DEADLINE, face_record, persist, scored, settings, tx_record
from tests.unit.test_decision_core import make_core as _make_core

DAY_S = 86_400
HOUR_MS = 3_600_000


def make_core(customer_days: int = 180, face_hours: float = 72.0, **job):
    core = _make_core(**job)
    rules = core.settings.rules.model_copy(
        update={"customer_retention_days": customer_days, "receipt_face_retention_hours": face_hours}
    )
    core.settings = core.settings.model_copy(update={"rules": rules})
    core.scorer.rules = rules
    core.scorer.settings = core.settings
    return core


def at(days: float) -> int:
    """Processing time ``days`` after T0 (the transactions of that day are stamped then too)."""
    return T0 + int(days * 86_400_000) + HOUR_MS


def test_default_retentions_are_settings():
    rules = settings().rules
    assert rules.customer_retention_days == 180 and rules.receipt_face_retention_hours == 72.0


# --- customer profiles ----------------------------------------------------------------------------------


def test_a_customer_idle_past_the_retention_is_a_new_customer_again():
    core = make_core(customer_days=30, face_deadline_ms=0)
    first = scored(core.on_records([tx_record(sale("t1", card="card-A"), 1)], at(0)))["t1"]
    soon = scored(core.on_records([tx_record(sale("t2", at_s=10 * DAY_S, card="card-A"), 2)], at(10)))["t2"]
    late = scored(core.on_records([tx_record(sale("t3", at_s=50 * DAY_S, card="card-A"), 3)], at(50)))["t3"]
    assert first["indicators"].get("first_seen") == 1.0
    assert "first_seen" not in soon["indicators"]
    assert late["indicators"].get("first_seen") == 1.0, "40 days idle: forgotten"


def test_idle_customer_profiles_are_swept_and_their_removal_persisted():
    core = make_core(customer_days=30, face_deadline_ms=0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale(f"old{i}", card=f"card-{i}"), i) for i in range(5)], at(0)))
    assert len(maps[CUSTOMERS]) == 10  # each customer and its card (``ent:card:``)
    step = core.on_records([tx_record(sale("new", at_s=40 * DAY_S, card="card-new"), 9)], at(40))
    persist(maps, step)
    assert set(core.state.customers) == {"token:card-new", "ent:card:card-new"} == set(maps[CUSTOMERS])
    assert all(step.writes[CUSTOMERS][f"token:card-{i}"] is None for i in range(5))
    assert all(step.writes[CUSTOMERS][f"ent:card:card-{i}"] is None for i in range(5))
    assert_persisted_equals_memory(maps, core)


def test_the_customer_sweep_does_a_bounded_amount_of_work_per_call():
    state = ScoringState(customers={f"c{i}": CustomerProfile(recent=[T0]) for i in range(10)}, newest_event_ms=T0)
    state.newest_event_ms = T0 + 31 * 86_400_000
    first = state.expire_customers(30 * 86_400_000, budget=4)
    assert len(first) == 4 and len(state.customers) == 6
    while state.customer_sweep:
        state.expire_customers(30 * 86_400_000, budget=4)
    assert state.customers == {}


def test_a_customer_seen_within_the_retention_is_kept_by_the_sweep():
    state = ScoringState(customers={"c1": CustomerProfile(recent=[T0 + 5 * 86_400_000])})
    state.newest_event_ms = T0 + 31 * 86_400_000
    assert state.expire_customers(30 * 86_400_000) == [] and set(state.customers) == {"c1"}


# --- buyer faces on receipts ----------------------------------------------------------------------------


def test_a_buyer_face_is_dropped_after_its_retention_and_the_receipt_is_kept():
    core = make_core(face_hours=24)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], at(0)))
    assert maps[RECEIPTS]["t1"].sale_face == tuple(BUYER_FACE)
    step = core.on_records([tx_record(sale("t2", at_s=2 * DAY_S, card="card-B"), 2)], at(2))
    persist(maps, step)
    assert step.writes[RECEIPTS]["t1"].sale_face is None
    assert "t1" in core.state.receipts and core.state.receipts["t1"].sale_face is None
    assert_persisted_equals_memory(maps, core)


def test_a_return_after_the_face_retention_is_not_compared_with_the_buyer_face():
    core = make_core(face_hours=24)
    core.on_records([tx_record(sale("t1", amount=40)), face_record("t1", embedding=BUYER_FACE)], at(0))
    other_face = [-x for x in BUYER_FACE]
    step = core.on_records(
        [
            tx_record(return_of("r1", "t1", at_s=2 * DAY_S, amount=40), 1),
            face_record("r1", embedding=other_face, offset=1),
        ],
        at(2),
    )
    assert "buyer_face_similarity" not in scored(step)["r1"]["indicators"]


def test_a_return_within_the_face_retention_is_still_compared_with_the_buyer_face():
    core = make_core(face_hours=24)
    core.on_records([tx_record(sale("t1", amount=40)), face_record("t1", embedding=BUYER_FACE)], at(0))
    other_face = [-x for x in BUYER_FACE]
    step = core.on_records(
        [tx_record(return_of("r1", "t1", at_s=3600, amount=40), 1), face_record("r1", embedding=other_face, offset=1)],
        at(0) + HOUR_MS,
    )
    out = scored(step)["r1"]
    assert out["indicators"]["buyer_face_similarity"] < 52 and "buyer_face_mismatch" in out["reasons"]


def test_a_restored_state_still_drops_buyer_faces_after_their_retention():
    maps: dict[str, dict] = {}
    first = make_core(face_hours=24)
    persist(maps, first.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], at(0)))
    restarted = make_core(face_hours=24)
    restarted.restore(maps)
    step = restarted.on_records([tx_record(sale("t2", at_s=2 * DAY_S, card="card-B"), 2)], at(2))
    assert step.writes[RECEIPTS]["t1"].sale_face is None


def test_a_sale_decided_after_its_face_retention_keeps_no_face():
    core = make_core(face_hours=24, face_deadline_ms=DEADLINE)
    core.on_records([tx_record(sale("t2", at_s=3 * DAY_S, card="card-B"), 2)], at(3))  # time moves on
    core.on_records([tx_record(sale("t1"), 1)], at(3))  # a sale from 3 days ago, replayed
    step = core.on_records([face_record("t1", embedding=BUYER_FACE)], at(3))
    assert core.state.receipts["t1"].sale_face is None
    assert "t1" not in step.writes.get(RECEIPTS, {})


def test_a_far_future_receipt_restored_from_an_old_checkpoint_does_not_sweep_every_customer():
    maps: dict[str, dict] = {}
    first = make_core(customer_days=30, face_deadline_ms=0)
    persist(maps, first.on_records([tx_record(sale("t0", card="card-A"), 0)], at(0)))
    maps[RECEIPTS]["t0"].event_time = T0 + 10 * 365 * 86_400_000  # kept by a job before event time was bounded
    restarted = make_core(customer_days=30, face_deadline_ms=0)
    restarted.restore(maps)
    step = restarted.on_records([face_record("t-other", "NO_FACE")], at(0))  # a call without transactions
    assert CUSTOMERS not in step.writes and set(restarted.state.customers) == {"token:card-A", "ent:card:card-A"}
