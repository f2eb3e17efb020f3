"""The synthetic POS generator (pure) and the Kafka-facing ``produce`` loop (with a fake producer)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from itertools import islice
from typing import Any

import pytest
from typer.testing import CliRunner

from infra.local.pos_generator import (
    AMOUNT_ANOMALY,
    CARD_TESTING,
    CROSS_STORE_RETURN_MISMATCH,
    FRAUD_PATTERNS,
    LEGIT,
    NEW_CARD_HIGH_VALUE,
    RETURN_WITHOUT_RECEIPT,
    UNKNOWN_RECEIPT_RETURN,
    PosGenerator,
    catalogue,
)
from infra.settings import REPO_ROOT, Settings
from producers import pos
from schemas.records import PosTransaction

N = 30_000


@pytest.fixture(scope="module")
def stream() -> list[tuple[PosTransaction, str]]:
    """One long stream shared by the read-only tests (generation is the slow part)."""
    gen = PosGenerator(seed=7, customers=3000, tx_per_second=2.0)  # ~4 h: returns start after 1 h
    return [gen.next_with_pattern() for _ in range(N)]


def by_pattern(stream: list[tuple[PosTransaction, str]], pattern: str) -> list[PosTransaction]:
    return [tx for tx, p in stream if p == pattern]


# ---------------------------------------------------------------------------- determinism, ids


def test_same_seed_gives_same_transactions() -> None:
    a = list(islice(PosGenerator(seed=42), 3000))
    b = list(islice(PosGenerator(seed=42), 3000))
    assert a == b


def test_same_seed_gives_same_transactions_in_another_process() -> None:
    """Nothing may depend on string hashing (PYTHONHASHSEED) or other per-process state."""
    code = (
        "import hashlib; from itertools import islice; from infra.local.pos_generator import PosGenerator; "
        "print(hashlib.sha256(repr(list(islice(PosGenerator(seed=3), 3000))).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            cwd=REPO_ROOT,
        ).stdout
        for h in (1, 2)
    }
    assert len(digests) == 1


@pytest.mark.parametrize(
    "kwargs", [{"stores": 0}, {"customers": 1}, {"fraud_share": 1.5}, {"tx_per_second": 0}, {"return_share": -0.1}]
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PosGenerator(**kwargs)


def test_different_seeds_give_different_transactions() -> None:
    a = list(islice(PosGenerator(seed=1), 200))
    b = list(islice(PosGenerator(seed=2), 200))
    assert [t.amount for t in a] != [t.amount for t in b]


def test_transaction_ids_are_unique_and_carry_the_seed(stream: list[tuple[PosTransaction, str]]) -> None:
    ids = [tx.transaction_id for tx, _ in stream]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("tx-7-") for i in ids)


def test_event_time_never_goes_backwards_and_follows_the_rate() -> None:
    gen = PosGenerator(seed=3, tx_per_second=10.0, diurnal=False, fraud_share=0.0)
    times = [tx.event_time for tx in islice(gen, 20_000)]
    assert times == sorted(times)
    mean_gap_ms = (times[-1] - times[0]) / (len(times) - 1)
    assert mean_gap_ms == pytest.approx(100.0, rel=0.05)


def test_traffic_follows_the_time_of_day() -> None:
    gen = PosGenerator(seed=3, tx_per_second=0.2, fraud_share=0.0)  # ~2 days of traffic
    hours = Counter((tx.event_time // 3_600_000 - 5) % 24 for tx in islice(gen, 30_000))
    assert hours[18] > 10 * hours[3]


# ---------------------------------------------------------------------------- shape of the traffic


def test_amount_equals_sum_of_line_items(stream: list[tuple[PosTransaction, str]]) -> None:
    for tx, _ in stream:
        assert tx.items, tx
        assert tx.amount == pytest.approx(sum(i.quantity * i.unit_price for i in tx.items), abs=0.005)
        assert tx.amount > 0


def test_sales_have_one_to_six_line_items(stream: list[tuple[PosTransaction, str]]) -> None:
    sizes = Counter(len(tx.items) for tx, p in stream if p == LEGIT and tx.kind == "SALE")
    assert set(sizes) == {1, 2, 3, 4, 5, 6}


def test_stores_lanes_and_cashiers_are_named_consistently() -> None:
    gen = PosGenerator(seed=1, stores=3, lanes_per_store=4)
    txs = list(islice(gen, 2000))
    assert {t.store_id for t in txs} == {"store-001", "store-002", "store-003"}
    assert {t.lane_id for t in txs} == {"lane-01", "lane-02", "lane-03", "lane-04"}
    assert all(t.cashier_id and t.cashier_id.startswith(f"cashier-{t.store_id[6:]}-") for t in txs)


def test_customer_identity_is_stable(stream: list[tuple[PosTransaction, str]]) -> None:
    seen: dict[str, tuple] = {}
    for tx in by_pattern(stream, LEGIT):
        if tx.payment_method == "cash":
            continue
        identity = (
            tx.card_token,
            tx.card_bin,
            tx.customer_email,
            tx.customer_name,
            tx.billing_street,
            tx.billing_state,
            tx.billing_country,
            tx.billing_latitude,
            tx.ip_address,
            tx.user_agent,
        )
        assert all(v is not None for v in identity)
        assert seen.setdefault(tx.customer_id, identity) == identity  # type: ignore[arg-type]


def test_currency_is_mostly_usd_with_some_eur_and_gbp(stream: list[tuple[PosTransaction, str]]) -> None:
    currencies = Counter(tx.currency for tx, _ in stream)
    assert set(currencies) == {"USD", "EUR", "GBP"}
    assert currencies["USD"] > 0.85 * len(stream)
    assert currencies["EUR"] > 0.01 * len(stream) and currencies["GBP"] > 0.005 * len(stream)


def test_catalogue_has_high_value_electronics() -> None:
    electronics = [p.unit_price for p in catalogue().products if p.category == "electronics"]
    assert max(electronics) > 1000 and min(electronics) < 50
    assert len({p.category for p in catalogue().products}) >= 8


def test_return_refers_to_an_earlier_sale_of_the_same_customer(stream: list[tuple[PosTransaction, str]]) -> None:
    sales: dict[str, PosTransaction] = {}
    returns = 0
    for tx, pattern in stream:
        if tx.kind == "SALE":
            sales[tx.transaction_id] = tx
        elif pattern == LEGIT:
            returns += 1
            sale = sales[tx.original_transaction_id]  # type: ignore[index]
            assert sale.customer_id == tx.customer_id
            assert sale.event_time + 3_600_000 <= tx.event_time
            assert set(tx.items) <= set(sale.items)
            assert tx.currency == sale.currency and tx.label == 0
    after_first_hour = sum(tx.event_time >= stream[0][0].event_time + 3_600_000 for tx, _ in stream)
    assert returns == pytest.approx(0.06 * after_first_hour, rel=0.25)


def test_a_sale_is_returned_at_most_once(stream: list[tuple[PosTransaction, str]]) -> None:
    originals = [tx.original_transaction_id for tx, p in stream if p == LEGIT and tx.kind == "RETURN"]
    assert len(originals) == len(set(originals))


def test_some_legit_returns_happen_at_another_store(stream: list[tuple[PosTransaction, str]]) -> None:
    store_of = {tx.transaction_id: tx.store_id for tx, _ in stream}
    returns = [tx for tx, p in stream if p == LEGIT and tx.kind == "RETURN"]
    elsewhere = sum(store_of[tx.original_transaction_id] != tx.store_id for tx in returns)  # type: ignore[index]
    assert 0.05 * len(returns) < elsewhere < 0.3 * len(returns)


# ---------------------------------------------------------------------------- fraud


@pytest.mark.parametrize(("share", "count"), [(0.03, 60_000), (0.2, 30_000)])
def test_fraud_share_is_respected_within_tolerance(share: float, count: int) -> None:
    # Card-testing bursts make fraud lumpy; these counts keep the sampling error near 5 %.
    gen = PosGenerator(seed=11, fraud_share=share, customers=500)
    fraud = sum(tx.label for tx in islice(gen, count))  # type: ignore[misc]
    assert fraud / count == pytest.approx(share, rel=0.15)


def test_no_fraud_when_share_is_zero() -> None:
    assert all(tx.label == 0 for tx in islice(PosGenerator(seed=11, fraud_share=0.0), 5000))


def test_every_fraud_pattern_occurs_and_is_labelled(stream: list[tuple[PosTransaction, str]]) -> None:
    patterns = Counter(p for _, p in stream)
    assert set(patterns) == {LEGIT, *FRAUD_PATTERNS}
    assert all(tx.label == (0 if p == LEGIT else 1) for tx, p in stream)


def test_card_testing_burst_is_many_small_transactions_on_one_card_within_minutes(
    stream: list[tuple[PosTransaction, str]],
) -> None:
    bursts: dict[str, list[PosTransaction]] = defaultdict(list)
    for tx in by_pattern(stream, CARD_TESTING):
        bursts[tx.card_token].append(tx)  # type: ignore[index]
    assert bursts
    for txs in bursts.values():
        if txs[-1].transaction_id == stream[-1][0].transaction_id:
            continue
        assert len(txs) >= 5
        assert all(tx.amount <= 5.0 and tx.kind == "SALE" for tx in txs)
        assert len({tx.store_id for tx in txs}) == 1 and len({tx.customer_id for tx in txs}) == 1
    complete = [txs for txs in bursts.values() if len(txs) >= 5]
    spans_min = [(txs[-1].event_time - txs[0].event_time) / 60_000 for txs in complete]
    assert statistics.median(spans_min) < 10


def test_amount_anomaly_is_far_above_the_customers_norm(stream: list[tuple[PosTransaction, str]]) -> None:
    legit_amounts: dict[str, list[float]] = defaultdict(list)
    for tx in by_pattern(stream, LEGIT):
        if tx.kind == "SALE":
            legit_amounts[tx.customer_id].append(tx.amount)  # type: ignore[index]
    checked = 0
    for tx in by_pattern(stream, AMOUNT_ANOMALY):
        history = legit_amounts.get(tx.customer_id)  # type: ignore[arg-type]
        if history and len(history) >= 5:
            checked += 1
            assert tx.amount > 4 * statistics.median(history)
    assert checked >= 5


def test_new_card_high_value_uses_a_card_never_seen_before(stream: list[tuple[PosTransaction, str]]) -> None:
    seen_cards: set[str | None] = set()
    checked = 0
    for tx, pattern in stream:
        if pattern == NEW_CARD_HIGH_VALUE:
            checked += 1
            assert tx.card_token not in seen_cards
            assert all(i.category == "electronics" and i.unit_price > 1000 for i in tx.items)
        seen_cards.add(tx.card_token)
    assert checked > 0


def test_return_without_receipt_has_no_original(stream: list[tuple[PosTransaction, str]]) -> None:
    txs = by_pattern(stream, RETURN_WITHOUT_RECEIPT)
    assert txs and all(tx.kind == "RETURN" and tx.original_transaction_id is None for tx in txs)
    assert any(tx.payment_method == "cash" for tx in txs)


def test_cross_store_return_is_of_another_customers_sale_at_another_store(
    stream: list[tuple[PosTransaction, str]],
) -> None:
    sales = {tx.transaction_id: tx for tx, _ in stream if tx.kind == "SALE"}
    txs = by_pattern(stream, CROSS_STORE_RETURN_MISMATCH)
    assert txs
    for tx in txs:
        if tx.original_transaction_id is None:  # fallback before any sale exists
            continue
        sale = sales[tx.original_transaction_id]
        assert sale.event_time <= tx.event_time
        assert sale.store_id != tx.store_id
        assert sale.customer_id != tx.customer_id
        assert set(tx.items) <= set(sale.items)


def test_unknown_receipt_return_quotes_an_id_never_issued(stream: list[tuple[PosTransaction, str]]) -> None:
    issued = {tx.transaction_id for tx, _ in stream}
    txs = by_pattern(stream, UNKNOWN_RECEIPT_RETURN)
    assert txs
    for tx in txs:
        assert tx.kind == "RETURN" and tx.original_transaction_id not in issued
        assert tx.original_transaction_id.startswith("tx-7-")  # type: ignore[union-attr]  # looks genuine


def test_every_generated_transaction_round_trips_through_avro(stream: list[tuple[PosTransaction, str]]) -> None:
    for tx, _ in stream[:5000]:
        assert PosTransaction.decode(tx.encode()) == tx
    for pattern in FRAUD_PATTERNS:
        for tx in by_pattern(stream, pattern)[:50]:
            assert PosTransaction.decode(tx.encode()) == tx


# ---------------------------------------------------------------------------- produce()


class FakeProducer:
    """Stands in for confluent_kafka.Producer: queues messages and reports them on poll (if
    ``deliver_on_poll`` says so for that timeout) and always on flush."""

    def __init__(
        self,
        fail: Callable[[int], bool] = lambda n: False,
        queue_limit: int | None = None,
        deliver_on_poll: Callable[[float], bool] = lambda timeout: True,
    ) -> None:
        self.fail, self.queue_limit, self.deliver_on_poll = fail, queue_limit, deliver_on_poll
        self.sent: list[tuple[str, bytes, bytes]] = []
        self._pending: list[tuple[int, Callable[[Any, Any], None]]] = []
        self.buffer_errors = 0

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        if self.queue_limit is not None and len(self._pending) >= self.queue_limit:
            self.buffer_errors += 1
            raise BufferError("Local: Queue full")
        self._pending.append((len(self.sent), on_delivery))
        self.sent.append((topic, key, value))

    def _deliver(self) -> int:
        pending, self._pending = self._pending, []
        for n, callback in pending:
            callback("broker down" if self.fail(n) else None, None)
        return len(pending)

    def poll(self, timeout: float = 0) -> int:
        return self._deliver() if self.deliver_on_poll(timeout) else 0

    def flush(self, timeout: float = 0) -> int:
        self._deliver()
        return 0


def test_produce_keys_by_store_and_lane_and_counts_acks() -> None:
    settings = Settings(kafka={"topic_prefix": "t1."})
    txs = list(islice(PosGenerator(seed=5), 500))
    fake = FakeProducer()
    stats = pos.produce(settings, txs, progress=False, producer=fake)
    assert (stats.sent, stats.acked, stats.failed, stats.unconfirmed) == (500, 500, 0, 0)
    assert {topic for topic, _, _ in fake.sent} == {"t1.transactions"}
    assert [key for _, key, _ in fake.sent] == [f"{t.store_id}/{t.lane_id}".encode() for t in txs]
    assert [PosTransaction.decode(v) for _, _, v in fake.sent] == txs


def test_failed_deliveries_are_counted_and_reported_to_the_caller() -> None:
    outcomes: dict[int, bool] = {}
    fake = FakeProducer(fail=lambda n: n % 10 == 3)
    stats = pos.produce(
        Settings(), islice(PosGenerator(seed=5), 100), progress=False, producer=fake, on_delivery=outcomes.__setitem__
    )
    assert (stats.acked, stats.failed) == (90, 10) and not stats.ok
    assert stats.errors == ["broker down"]
    assert [n for n, ok in sorted(outcomes.items()) if not ok] == list(range(3, 100, 10))


def test_full_local_queue_waits_instead_of_dropping() -> None:
    fake = FakeProducer(queue_limit=1, deliver_on_poll=lambda timeout: timeout > 0)
    stats = pos.produce(Settings(), islice(PosGenerator(seed=5), 50), progress=False, producer=fake)
    assert fake.buffer_errors > 0
    assert (stats.sent, stats.acked) == (50, 50)


def test_ctrl_c_stops_sending_but_flushes_what_was_sent() -> None:
    def interrupted() -> Any:
        yield from islice(PosGenerator(seed=5), 20)
        raise KeyboardInterrupt

    fake = FakeProducer(deliver_on_poll=lambda timeout: False)  # deliveries only come with flush
    stats = pos.produce(Settings(), interrupted(), progress=False, producer=fake)
    assert stats.interrupted
    assert (stats.sent, stats.acked, stats.unconfirmed) == (20, 20, 0)


def test_token_bucket_does_not_drift_when_sleeps_overshoot() -> None:
    bucket = pos.TokenBucket(rate=100)
    now = 0.0
    for _ in range(1000):
        now += bucket.reserve(now) + 0.003  # every sleep wakes 3 ms late, then sending takes no time
    assert now == pytest.approx(10.0, abs=0.02)  # 1000 tokens at 100/s, not 1000 * 13 ms


def test_token_bucket_catches_up_only_a_small_burst_after_a_stall() -> None:
    bucket = pos.TokenBucket(rate=100, burst=5)
    now = 0.0
    bucket.reserve(now)
    now = 10.0  # stalled for 10 s
    immediate = 0
    while bucket.reserve(now) == 0.0:
        immediate += 1
    assert immediate <= 6


def test_produce_paces_to_the_rate() -> None:
    start = time.monotonic()
    stats = pos.produce(Settings(), islice(PosGenerator(seed=5), 30), rate=100, progress=False, producer=FakeProducer())
    assert stats.acked == 30
    assert 0.25 <= time.monotonic() - start < 1.5


def test_generate_command_sends_count_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *_topics: fake)
    result = CliRunner().invoke(
        pos.app,
        [
            "generate",
            "--count",
            "300",
            "--rate",
            "0",
            "--seed",
            "9",
            "--customers",
            "500",
            "--no-progress",
            "--no-realtime",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(fake.sent) == 300
    first = PosTransaction.decode(fake.sent[0][2])
    assert first == next(PosGenerator(seed=9, customers=500, tx_per_second=20.0))


@pytest.mark.parametrize("event_rate", ["-1", "0", "inf"])
def test_generate_refuses_an_event_rate_that_is_not_above_zero_with_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, event_rate: str
) -> None:
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *_topics: fake)
    result = CliRunner().invoke(pos.app, ["generate", "--count", "1", "--event-rate", event_rate, "--no-progress"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "--event-rate" in result.output and "above 0" in result.output and fake.sent == []


@pytest.mark.parametrize("rate", ["inf", "1e999"])
def test_generate_refuses_an_infinite_rate_with_a_usage_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, rate: str
) -> None:
    """It was taken as the event rate too: every transaction got the same event time."""
    fake = FakeProducer()
    monkeypatch.setattr(pos, "make_producer", lambda _settings, *_topics: fake)
    result = CliRunner().invoke(
        pos.app, ["generate", "--count", "3", "--rate", rate, "--no-progress", "--no-realtime"], terminal_width=200
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "--rate" in result.output and "must be a finite number" in result.output and fake.sent == []


def test_realtime_stamps_event_time_with_the_wall_clock_at_send() -> None:
    txs = list(islice(PosGenerator(seed=5), 20))
    fake = FakeProducer()
    before = time.time_ns() // 1_000_000
    pos.produce(Settings(), txs, rate=200, progress=False, producer=fake, realtime=True)
    after = time.time_ns() // 1_000_000
    sent = [PosTransaction.decode(v) for _, _, v in fake.sent]
    stamps = [tx.event_time for tx in sent]
    assert before <= stamps[0] and stamps[-1] <= after and stamps == sorted(stamps)
    assert stamps[-1] - stamps[0] >= 80  # paced at 200/s: the stamps follow the pacing
    assert [dataclasses.replace(tx, event_time=0) for tx in sent] == [
        dataclasses.replace(tx, event_time=0) for tx in txs
    ]


def test_a_stop_between_the_hand_over_and_its_count_leaves_no_negative_in_flight_count() -> None:
    """SIGTERM landing just after Kafka took a record, before it was counted: it was acknowledged like every other,
    yet the in-flight count ended at -1 and the command exited 1."""

    class InterruptedAfterHandOver(FakeProducer):
        def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
            super().produce(topic, value, key, on_delivery)
            if len(self.sent) == 7:
                raise KeyboardInterrupt  # Kafka has the record; the loop never counted it

    fake = InterruptedAfterHandOver(deliver_on_poll=lambda timeout: False)
    outcomes: dict[int, bool] = {}
    stats = pos.produce(
        Settings(), islice(PosGenerator(seed=5), 20), progress=False, producer=fake, on_delivery=outcomes.__setitem__
    )
    assert stats.interrupted and (stats.sent, stats.acked, stats.unconfirmed) == (7, 7, 0)
    assert stats.ok and pos._exit_code(stats) == 130 and sorted(outcomes) == list(range(7))
