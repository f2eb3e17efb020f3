"""Shoppers: POS traffic whose customers are also *seen* by the local cameras.

Each transaction of the POS generator (``infra.local.pos_generator``) becomes a visit at the local camera:
its customer (a stable identity: customer id, card or e-mail) is a person from the photo sets (a fraud
pattern's, an offender: :func:`cast`), who
enters the store ``shop_s`` before paying (the entrance camera sees a new ``oid``, over MQTT), stands
at the transaction's lane while paying, and leaves. The transaction is sent :data:`SEND_LAG_MS` after they
pay, with ``event_time`` = the pay time, so the lane camera's snapshot at the transaction time shows them.

Used by the demo and tests; run alone with ``python -m producers.shoppers --rate 2 --count 50``
(needs ``python -m infra.local.camera`` running).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Annotated

import httpx
import typer

from infra.clock import now_ms
from infra.local.camera import LocalCameraControl
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from producers.pos import ProducerLike, ProduceStats, produce, sigterm_as_interrupt
from schemas.records import PosTransaction

LEAVE_S = 5.0
"""How long a shopper stays at the lane after paying."""
LANE_GAP_MS = 3000
"""Payers at one lane this far apart where the store has a lane free (else the longest-idle lane: at two
sales a second over four lanes a store, two seconds at least; fewer lanes or a faster rate, less). Snapshot
times are whole seconds: two sales at one lane within one second get the same picture, one of them the
wrong face, which the officer could then enroll."""
SEND_LAG_MS = 1000
"""A sale reaches Kafka this long after its pay time (by the wall clock), as a POS sends it once the
receipt prints. Sent earlier, the face stage asked for footage not stored yet, waited out the camera's
"no video" with a doubling backoff, and its face came after the job's deadline: in half the demo runs
(depending on how long the producer took to start) nearly every checkout face was ``UNAVAILABLE``."""


def customer_key(tx: PosTransaction) -> str:
    return tx.customer_id or tx.card_token or tx.customer_email or tx.transaction_id


OFFENDER_SHARE = 6
"""One person in this many (at least one, once there are two) is an offender: see :func:`cast`."""


def cast(people: list[str]) -> tuple[list[str], list[str]]:
    """``(offenders, regulars)`` of the photo sets' people. A transaction of a fraud pattern (label 1) is
    paid by an offender -- someone other than the card's owner -- and every other by a regular. The demo's
    officer confirms only fraud, so only offenders' faces reach the watchlist; were every shopper a
    candidate, each enrolment would list everyone who shares that face (with the two people of a bare
    machine, all traffic within two enrolments). One person: no offender to set apart."""
    ordered = sorted(people)
    if len(ordered) < 2:
        return [], ordered
    n = max(1, len(ordered) // OFFENDER_SHARE)
    return ordered[:n], ordered[n:]


def person_for(tx: PosTransaction, people: list[str]) -> str:
    """The person paying: for a fraud pattern's transaction an offender (:func:`cast`), else a regular; the
    same customer is always the same regular, and the same offender (a stable hash, not Python's salted
    ``hash``)."""
    offenders, regulars = cast(people)
    pool = offenders if tx.label == 1 and offenders else regulars
    return pool[zlib.crc32(customer_key(tx).encode()) % len(pool)]


def shopper_transactions(
    generator: Iterator[PosTransaction],
    control: LocalCameraControl,
    people: list[str],
    *,
    count: int,
    rate: float,
    shop_s: float,
    start_ms: int,
    send_lag_ms: int | None = None,
    sleep: Callable[[float], object] = time.sleep,
    lanes: dict[str, tuple[str, ...]] | None = None,
) -> Iterator[PosTransaction]:
    """Transactions stamped with their pay time (``start_ms + k / rate``), each visit registered about
    ``shop_s`` before it is due, so the shopper is at the entrance now and pays later. ``send_lag_ms``:
    each is yielded that long after its pay time by the wall clock (None: at once). ``lanes`` (store -> its
    lanes): a transaction due at a lane paid at less than :data:`LANE_GAP_MS` ago goes to the store's
    longest-idle lane instead."""
    if not people:
        raise ValueError("the local camera has no people (face photos): run `make setup`")
    if not rate > 0:  # pay times are k / rate seconds apart (0 was a ZeroDivisionError after the first visit)
        raise ValueError(f"rate must be above 0 transactions per second, got {rate}")
    if shop_s < 1:
        raise ValueError("shop_s must be >= 1: snapshot timestamps have whole-second precision")
    # registered this many sales ahead: shop_s before the pay time, and the send lag on top (a sale is
    # yielded that long after its pay time, and the next visits are registered only then)
    ahead = max(1, math.ceil((shop_s + (send_lag_ms or 0) / 1000) * rate))
    last_pay: dict[tuple[str, str], int] = {}
    pending: deque[PosTransaction] = deque()
    registered = 0
    for k in range(count):
        while registered < count and registered <= k + ahead:
            tx = next(generator)
            pay_ms = start_ms + round(registered * 1000 / rate)
            tx = _free_lane(tx, pay_ms, last_pay, (lanes or {}).get(tx.store_id, ()))
            last_pay[tx.store_id, tx.lane_id] = pay_ms
            enter_ms = pay_ms - round(shop_s * 1000)  # the first few entered before we started: no MQTT for them
            control.add_visit(
                person_for(tx, people),
                tx.store_id,
                tx.lane_id,
                enter_ms,
                pay_ms,
                pay_ms + round(LEAVE_S * 1000),
                visit_id=tx.transaction_id,
            )
            pending.append(dataclasses.replace(tx, event_time=pay_ms))
            registered += 1
        tx = pending.popleft()
        if send_lag_ms is not None and (wait_ms := tx.event_time + send_lag_ms - now_ms()) > 0:
            sleep(wait_ms / 1000)
        yield tx


def _free_lane(
    tx: PosTransaction, pay_ms: int, last_pay: dict[tuple[str, str], int], lanes: tuple[str, ...]
) -> PosTransaction:
    """``tx`` at its own lane if that lane's last payer is :data:`LANE_GAP_MS` behind, else at the store's
    longest-idle lane (its own when none is idler)."""
    if pay_ms - last_pay.get((tx.store_id, tx.lane_id), -LANE_GAP_MS) >= LANE_GAP_MS or not lanes:
        return tx
    idle = min(lanes, key=lambda lane: last_pay.get((tx.store_id, lane), -LANE_GAP_MS))
    if last_pay.get((tx.store_id, idle), -LANE_GAP_MS) >= last_pay[tx.store_id, tx.lane_id]:
        return tx
    return dataclasses.replace(tx, lane_id=idle)


def drive_shoppers(
    settings: Settings,
    generator: PosGenerator,
    *,
    count: int,
    rate: float = 2.0,
    shop_s: float = 8.0,
    control: LocalCameraControl | None = None,
    producer: ProducerLike | None = None,
    progress: bool = False,
) -> ProduceStats:
    """Send ``count`` transactions at ``rate``/s, each paid by a shopper the cameras saw come in."""
    control = control or LocalCameraControl.from_settings(settings)
    people = sorted(control.people())
    start_ms = now_ms() + 500
    txs = shopper_transactions(
        generator,
        control,
        people,
        count=count,
        rate=rate,
        shop_s=shop_s,
        start_ms=start_ms,
        # the sale is sent once the camera has stored its second (a local camera set slower: that much later)
        send_lag_ms=max(SEND_LAG_MS, settings.cameras.local_no_video_ms),
        lanes={store.store_id: store.lanes for store in generator.stores},
    )
    return produce(
        settings,
        txs,
        progress=progress,
        producer=producer,
        label="shoppers",  # paced by the shoppers themselves: each sale SEND_LAG_MS after its pay time
    )


def main(
    rate: Annotated[float, typer.Option(help="transactions per second", min=0.01)] = 2.0,
    count: Annotated[int, typer.Option(help="transactions to send", min=0)] = 100,
    shop_s: Annotated[
        float, typer.Option(help="seconds from entering the store to paying (snapshots are whole seconds)", min=1.0)
    ] = 8.0,
    seed: Annotated[int, typer.Option()] = 0,
    stores: Annotated[int, typer.Option(min=1)] = 2,
    lanes: Annotated[int, typer.Option(help="lanes per store", min=1)] = 4,
    fraud_share: Annotated[
        float, typer.Option(help="share of the generator's fraud patterns", min=0.0, max=1.0)
    ] = 0.03,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """POS transactions paid by shoppers the local cameras see (entrance, then the lane)."""
    settings = get_settings()
    gen = PosGenerator(seed=seed, stores=stores, lanes_per_store=lanes, fraud_share=fraud_share, diurnal=False)
    # The demo's supervisor stops us with SIGTERM: flush what Kafka has not acknowledged (the sale of a shopper
    # the cameras saw pay), as on Ctrl-C, instead of dying with it in librdkafka's queue.
    control = LocalCameraControl.from_settings(settings)
    try:
        with sigterm_as_interrupt():
            stats = drive_shoppers(
                settings, gen, count=count, rate=rate, shop_s=shop_s, control=control, progress=progress
            )
    except httpx.TransportError as exc:  # the local camera not running (or stopped while we run)
        typer.echo(
            f"Error: the local camera at {control.base_url} did not answer ({exc}); "
            "start it first: python -m infra.local.camera",
            err=True,
        )
        raise typer.Exit(1) from None
    raise typer.Exit(0 if stats.ok else 1)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(main)
