"""The demo's shoppers: who pays which transaction, so the officer's enrolments list offenders only."""

from __future__ import annotations

import itertools

import producers.shoppers as shoppers
from infra.local.pos_generator import PosGenerator
from producers.shoppers import SEND_LAG_MS, cast, person_for
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
    def add_visit(self, *args, **kwargs) -> None:
        pass


def test_each_sale_is_sent_a_second_after_its_pay_time_by_the_wall_clock(monkeypatch) -> None:
    """Sent before the camera stored that second, the face stage waited out its "no video" backoff and the
    face missed the job's deadline (in half the demo runs nearly every checkout)."""
    now = [1_796_000_000_000]
    slept: list[float] = []
    monkeypatch.setattr(shoppers, "now_ms", lambda: now[0])

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += round(seconds * 1000)

    generator = PosGenerator(seed=3, stores=2, fraud_share=0.1, diurnal=False)
    args = {"count": 5, "rate": 2.0, "shop_s": 8.0, "start_ms": now[0] + 500}
    sent = []
    for tx in shoppers.shopper_transactions(generator, _Camera(), PEOPLE, send_lag_ms=1000, sleep=sleep, **args):
        sent.append((tx.event_time, now[0]))
    assert [at - paid for paid, at in sent] == [SEND_LAG_MS] * 5 and SEND_LAG_MS == 1000
    assert slept[0] == 1.5 and slept[1:] == [0.5] * 4
