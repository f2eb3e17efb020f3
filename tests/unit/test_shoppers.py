"""The demo's shoppers: who pays which transaction, so the officer's enrolments list offenders only."""

from __future__ import annotations

import itertools
import os
import signal
import time

import httpx
import pytest
import typer
from typer.testing import CliRunner

import producers.shoppers as shoppers
from infra.local.camera import LocalCameraControl
from infra.local.pos_generator import PosGenerator
from producers.pos import ProduceStats
from producers.shoppers import LANE_GAP_MS, SEND_LAG_MS, cast, person_for
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
    """Records the visits the shoppers register (the local camera's control API) and when."""

    def __init__(self, now: list[int] | None = None) -> None:
        self.now = now
        self.visits: list[tuple[str, str, int, int, int | None]] = []

    def add_visit(self, person, store_id, lane_id, enter_ms, pay_ms, leave_ms, visit_id=None) -> None:
        self.visits.append((store_id, lane_id, enter_ms, pay_ms, self.now[0] if self.now else None))


def _gaps(txs: list) -> list[int]:
    last: dict[tuple[str, str], int] = {}
    gaps = []
    for tx in txs:
        key = (tx.store_id, tx.lane_id)
        if key in last:
            gaps.append(tx.event_time - last[key])
        last[key] = tx.event_time
    return gaps


def test_payers_at_one_lane_are_seconds_apart_so_each_sale_gets_its_own_picture() -> None:
    """Snapshot times are whole seconds: two sales at one lane within a second got the same picture, one of
    them the wrong face (which the officer could then enroll)."""
    camera = _Camera()
    generator = PosGenerator(seed=3, stores=2, lanes_per_store=4, fraud_share=0.1, diurnal=False)
    lanes = {store.store_id: store.lanes for store in generator.stores}
    args = {"count": 600, "rate": 2.0, "shop_s": 8.0, "start_ms": 1_796_000_000_000}
    txs = list(shoppers.shopper_transactions(generator, camera, PEOPLE, lanes=lanes, **args))
    gaps = _gaps(txs)
    # the idlest of four lanes at two sales a second is two seconds behind at least
    assert min(gaps) >= 2000 and sorted(gaps)[len(gaps) // 2] >= LANE_GAP_MS
    assert [(tx.store_id, tx.lane_id, tx.event_time) for tx in txs] == [(v[0], v[1], v[3]) for v in camera.visits]
    unspread = PosGenerator(seed=3, stores=2, lanes_per_store=4, fraud_share=0.1, diurnal=False)
    assert min(_gaps(list(shoppers.shopper_transactions(unspread, _Camera(), PEOPLE, **args)))) < 1000, "as before"


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
    assert [at - paid for paid, at in sent] == [1000] * 5
    assert slept[0] == 1.5 and slept[1:] == [0.5] * 4


def test_a_shopper_is_registered_before_entering_despite_the_send_lag(monkeypatch) -> None:
    """The visits ahead are registered when a sale is yielded, which the send lag delays: they must reach
    far enough ahead that every shopper is registered before their entrance time (the MQTT detections)."""
    now = [1_796_000_000_000]
    monkeypatch.setattr(shoppers, "now_ms", lambda: now[0])

    def sleep(seconds: float) -> None:
        now[0] += round(seconds * 1000)

    for rate in (1.0, 2.0, 4.0):
        camera = _Camera(now)
        generator = PosGenerator(seed=3, stores=2, fraud_share=0.1, diurnal=False)
        t0 = now[0]  # the first few entered before the start: registered at once, as before
        args = {"count": 80, "rate": rate, "shop_s": 8.0, "start_ms": t0 + 500, "send_lag_ms": SEND_LAG_MS}
        list(shoppers.shopper_transactions(generator, camera, PEOPLE, sleep=sleep, **args))
        later = [(registered, entered) for _, _, entered, _, registered in camera.visits if registered > t0]
        assert len(later) > 20 and all(registered <= entered for registered, entered in later), rate


def test_a_rate_of_zero_is_refused_up_front_not_a_division_by_zero() -> None:
    generator = PosGenerator(seed=1, stores=1, lanes_per_store=2, diurnal=False)
    for rate in (0.0, -1.0):
        with pytest.raises(ValueError, match="rate must be above 0"):
            list(shoppers.shopper_transactions(generator, _Camera(), PEOPLE, count=2, rate=rate, shop_s=8, start_ms=0))


def test_sigterm_stops_the_shoppers_like_ctrl_c_so_what_is_in_flight_is_flushed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's supervisor stops the shoppers with SIGTERM; killed outright, the sales librdkafka still held
    were lost. It now takes produce()'s Ctrl-C path: stop sending, wait for what is in flight."""
    seen: list[str] = []

    def drive(*_a: object, **_k: object) -> ProduceStats:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
            seen.append("kept running")
        except KeyboardInterrupt:
            seen.append("interrupted")
        return ProduceStats(interrupted=True)

    before = signal.signal(signal.SIGTERM, lambda *_: seen.append("default handler"))
    try:
        monkeypatch.setattr(shoppers, "drive_shoppers", drive)
        with pytest.raises(typer.Exit) as done:
            shoppers.main(count=1, progress=False)
        assert seen == ["interrupted"] and done.value.exit_code == 0
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("shop_s", ["0.5", "nan"])
def test_a_shop_time_under_a_second_is_a_usage_error_not_a_traceback_after_the_start(
    monkeypatch: pytest.MonkeyPatch, shop_s: str
) -> None:
    driven: list[object] = []
    monkeypatch.setattr(shoppers, "drive_shoppers", lambda *a, **k: driven.append(k) or ProduceStats())
    app = typer.Typer()
    app.command()(shoppers.main)
    result = CliRunner().invoke(app, ["--shop-s", shop_s, "--count", "1", "--no-progress"])
    assert result.exit_code == 2 and "--shop-s" in result.output and driven == []


@pytest.mark.parametrize(
    ("option", "value"), [("--stores", "0"), ("--lanes", "-1"), ("--fraud-share", "2"), ("--fraud-share", "-0.1")]
)
def test_no_store_no_lane_or_a_fraud_share_outside_0_to_1_is_a_usage_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, option: str, value: str
) -> None:
    driven: list[object] = []
    monkeypatch.setattr(shoppers, "drive_shoppers", lambda *a, **k: driven.append(k) or ProduceStats())
    app = typer.Typer()
    app.command()(shoppers.main)
    result = CliRunner().invoke(app, [option, value, "--count", "1", "--no-progress"])
    assert result.exit_code == 2 and option in result.output and driven == [], result.output


def test_the_local_camera_not_running_is_one_error_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    camera = LocalCameraControl("http://127.0.0.1:8765", http=httpx.Client(transport=httpx.MockTransport(refused)))
    monkeypatch.setattr(LocalCameraControl, "from_settings", classmethod(lambda cls, settings: camera))
    app = typer.Typer()
    app.command()(shoppers.main)
    result = CliRunner().invoke(app, ["--count", "1", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.output.strip().splitlines() == [
        "Error: the local camera at http://127.0.0.1:8765 did not answer ([Errno 111] Connection refused); "
        "start it first: python -m infra.local.camera"
    ]
