"""The demo's shoppers: who pays which transaction, so the officer's enrolments list offenders only."""

from __future__ import annotations

import itertools

from infra.local.pos_generator import PosGenerator
from producers.shoppers import LANE_GAP_MS, cast, person_for, shopper_transactions
from tests.builders import sale

PEOPLE = [f"person-{i:02d}" for i in range(18)]


def test_fraud_is_paid_by_offenders_and_everything_else_by_regulars() -> None:
    """Were any shopper a candidate, the officer's first enrolments would put every customer who shares the
    face on the watchlist (with a bare machine's two people: all traffic after two)."""
    offenders, regulars = cast(PEOPLE)
    assert len(offenders) == 3 and set(offenders).isdisjoint(regulars) and sorted(offenders + regulars) == PEOPLE
    txs = list(itertools.islice(PosGenerator(seed=5, stores=2, fraud_share=0.1, diurnal=False), 2000))
    fraud = [tx for tx in txs if tx.label == 1]
    assert 50 < len(fraud) < len(txs) - 50
    assert {person_for(tx, PEOPLE) for tx in fraud} <= set(offenders)
    assert {person_for(tx, PEOPLE) for tx in txs if tx.label != 1} == set(regulars), "every regular shops"


def test_the_same_customer_is_the_same_regular_person() -> None:
    a, b = sale("t1", card="card-X"), sale("t2", card="card-X", at_s=60)
    assert person_for(a, PEOPLE) == person_for(b, PEOPLE) == person_for(b, list(reversed(PEOPLE)))


def test_two_people_are_one_offender_and_one_regular_and_one_person_is_everyone() -> None:
    assert cast(["obama", "biden"]) == (["biden"], ["obama"])
    assert person_for(sale("t1", label=1), ["obama", "biden"]) == "biden"
    assert person_for(sale("t2", label=0), ["obama", "biden"]) == "obama"
    assert cast(["solo"]) == ([], ["solo"]) and person_for(sale("t3", label=1), ["solo"]) == "solo"


class _Camera:
    """Records the visits the shoppers register (the local camera's control API)."""

    def __init__(self) -> None:
        self.visits: list[tuple[str, str, str, int]] = []

    def add_visit(self, person, store_id, lane_id, enter_ms, pay_ms, leave_ms, visit_id=None) -> None:
        self.visits.append((person, store_id, lane_id, pay_ms))


def _gaps(txs: list) -> list[int]:
    last: dict[tuple[str, str], int] = {}
    gaps = []
    for tx in txs:
        key = (tx.store_id, tx.lane_id)
        if key in last:
            gaps.append(tx.event_time - last[key])
        last[key] = tx.event_time
    return gaps


def test_payers_at_one_lane_are_seconds_apart_so_the_snapshot_shows_the_one_paying() -> None:
    """Snapshot times are whole seconds: a lane's payers a second apart put the previous payer at the counter
    in the picture of the next one's sale (whose face the officer then enrolled)."""
    camera = _Camera()
    generator = PosGenerator(seed=3, stores=2, lanes_per_store=4, fraud_share=0.1, diurnal=False)
    lanes = {store.store_id: store.lanes for store in generator.stores}
    args = {"count": 600, "rate": 2.0, "shop_s": 8.0, "start_ms": 1_796_000_000_000}
    txs = list(shopper_transactions(generator, camera, PEOPLE, lanes=lanes, **args))
    gaps = _gaps(txs)
    # two seconds suffice for the whole-second snapshot: the idlest of four lanes at 2/s is never closer
    assert min(gaps) >= 2000 and sorted(gaps)[len(gaps) // 2] >= LANE_GAP_MS
    assert [(tx.store_id, tx.lane_id, tx.event_time) for tx in txs] == [v[1:] for v in camera.visits]
    assert {tx.lane_id for tx in txs} <= {lane for ls in lanes.values() for lane in ls}
    unspread = PosGenerator(seed=3, stores=2, lanes_per_store=4, fraud_share=0.1, diurnal=False)
    assert min(_gaps(list(shopper_transactions(unspread, _Camera(), PEOPLE, **args)))) < 2000, "as before"
