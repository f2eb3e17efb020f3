"""Pure scoring logic: validation, stateful indicators and decisions, without Kafka or Flink."""

from dataclasses import replace
from typing import Any

import pytest

from infra.local.pos_generator import PosGenerator
from infra.settings import Settings
from jobs.model.fraud_model import FEATURE_NAMES, feature_row
from jobs.model.train import observe_all
from jobs.scoring.claims import ConflictingTransaction
from jobs.scoring.features import CustomerProfile, Receipt, StoreActivity, customer_key
from jobs.scoring.rules import Decision, FaceResult, ModelResult, RuleSet, decide
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, STORES, Scorer, ScoringState
from jobs.scoring.validation import parse_transaction
from schemas.codec import codec
from schemas.errors import InvalidRecord, is_retryable
from schemas.identifiers import canonical_ip, check_ip_address
from tests.builders import T0, return_of, sale

SETTINGS = Settings()
RULES = SETTINGS.rules
RULE_SET = RuleSet.from_settings(RULES)


class Pipeline:
    """Runs the scorer's steps in order with dict-held state, like the job does with Flink state."""

    def __init__(self, settings: Settings = SETTINGS) -> None:
        self.scorer = Scorer(settings, clock=lambda: T0 / 1000 + 3600)
        self.state = ScoringState()
        self.persisted: dict[tuple[str, str], object] = {}
        self.offset = 0

    def feed(self, data: bytes) -> list[tuple[str, bytes, bytes]]:
        self.offset += 1
        env = self.scorer.parse(data, None, "transactions", 0, self.offset, T0 + 30 * 86_400_000)
        if isinstance(env[0], str):
            return [env]
        rows, writes = self.scorer.score(env, self.state)
        for name, key, value in writes:
            if value is None:
                self.persisted.pop((name, key), None)
            else:
                self.persisted[(name, key)] = value
        return rows

    def decision(self, tx) -> dict:
        rows = self.feed(tx.encode())
        return codec("ScoredTransaction").decode(rows[0][2])


def test_ordinary_sale_is_approved_with_latency_fields():
    scored = Pipeline().decision(sale("t1"))
    assert scored["outcome"] == "APPROVE"
    assert scored["rules_version"] == RULE_SET.version
    assert scored["ttdf_ms"] == 3600 * 1000
    assert scored["face_status"] == "UNAVAILABLE"


def test_return_at_other_store_by_another_customer_is_blocked_with_reasons():
    p = Pipeline()
    p.decision(sale("t1", store="store-A", card="card-A", amount=300))
    scored = p.decision(return_of("r1", "t1", at_s=600, store="store-B", card="card-Z", amount=300))
    assert scored["outcome"] == "BLOCK"
    assert {"customer_mismatch", "cross_store_return", "suspicious_timing"} <= set(scored["reasons"])


def test_block_raises_one_alert_with_a_deterministic_id():
    p = Pipeline()
    p.feed(sale("t1", store="store-A", amount=300).encode())
    rows = p.feed(return_of("r1", "t1", store="store-B", card="card-Z", amount=300).encode())
    alerts = [r for r in rows if r[0] == "alerts"]
    assert len(alerts) == 1 and alerts[0][1] == b"blocked:r1"
    alert = codec("Alert").decode(alerts[0][2])
    assert "store-B" in alert["summary"] and alert["risk_score"] >= RULE_SET.block_at


def test_return_of_a_never_seen_receipt_is_flagged():
    scored = Pipeline().decision(return_of("r1", "ghost"))
    assert "return_unknown_receipt" in scored["reasons"]
    assert scored["outcome"] in ("REVIEW", "BLOCK")


def test_return_without_receipt_needs_review():
    scored = Pipeline().decision(return_of("r1", None))
    assert scored["outcome"] == "REVIEW"
    assert scored["reasons"][0] == "return_without_receipt"


def test_same_store_return_by_the_buyer_is_approved():
    p = Pipeline()
    p.decision(sale("t1", amount=40))
    scored = p.decision(return_of("r1", "t1", at_s=86400, amount=40))
    assert scored["outcome"] == "APPROVE"


def test_returning_more_than_was_bought_is_blocked():
    p = Pipeline()
    p.decision(sale("t1", amount=40))
    p.decision(return_of("r1", "t1", at_s=100, amount=30))
    scored = p.decision(return_of("r2", "t1", at_s=200, amount=30))
    assert "return_exceeds_sale" in scored["reasons"]


def test_a_return_delivered_before_its_sale_still_counts_towards_returning_more_than_was_bought():
    p = Pipeline()
    first = p.decision(return_of("r1", "t1", at_s=100, amount=30))  # its sale is still on its way
    assert "return_unknown_receipt" in first["reasons"]
    p.decision(sale("t1", amount=40))
    scored = p.decision(return_of("r2", "t1", at_s=200, amount=30))
    assert "return_exceeds_sale" in scored["reasons"]


def test_a_refund_in_another_currency_than_the_sale_is_flagged_and_not_compared_with_it():
    p = Pipeline()
    p.decision(sale("t1", amount=100))  # USD
    small = p.decision(replace(return_of("r1", "t1", at_s=100, amount=90), currency="JPY"))
    assert small["indicators"].get("return_currency_mismatch") == 1.0
    large = p.decision(replace(return_of("r2", "t1", at_s=200, amount=10_000), currency="JPY"))
    assert large["indicators"].get("return_currency_mismatch") == 1.0
    assert "return_exceeds_sale" not in large["indicators"]  # 10,000 JPY is not more than 100 USD
    same = p.decision(return_of("r3", "t1", at_s=300, amount=90))  # the JPY refunds did not count in USD
    assert "return_exceeds_sale" not in same["indicators"] and "return_currency_mismatch" not in same["indicators"]
    over = p.decision(return_of("r4", "t1", at_s=400, amount=20))
    assert over["indicators"].get("return_exceeds_sale") == 1.0


def test_returns_made_before_their_sale_in_another_currency_are_not_added_to_the_sale():
    p = Pipeline()
    p.decision(replace(return_of("r1", "t1", at_s=100, amount=5_000), currency="JPY"))  # its sale is on its way
    p.decision(sale("t1", amount=100))
    scored = p.decision(return_of("r2", "t1", at_s=200, amount=60))
    assert "return_exceeds_sale" not in scored["indicators"]


def test_returns_made_before_their_sale_in_two_currencies_add_up_in_the_sales_currency_whichever_came_first():
    for first, second in (("JPY", "USD"), ("USD", "JPY")):
        p = Pipeline()
        amounts = {"JPY": 5_000, "USD": 80}
        p.decision(replace(return_of("r1", "t1", at_s=100, amount=amounts[first]), currency=first))
        p.decision(replace(return_of("r2", "t1", at_s=110, amount=amounts[second]), currency=second))
        p.decision(sale("t1", amount=100))  # USD, delivered after its returns
        scored = p.decision(return_of("r3", "t1", at_s=200, amount=30))  # 80 + 30 USD returned of 100
        assert scored["indicators"].get("return_exceeds_sale") == 1.0, first
        assert "return_currency_mismatch" not in scored["indicators"]


def test_a_receipt_restored_from_an_older_job_compares_refunds_raw_as_before():
    import pickle

    receipt = Receipt()
    receipt.observe(sale("t1", amount=100).to_avro(), "card:A", RULES)
    slots = {name: getattr(receipt, name) for name in Receipt.__slots__ if name != "currency"}
    slots["returned"] = 0.0  # what a savepoint written before the currency fields holds
    old = Receipt.__new__(Receipt)
    old.__setstate__((None, slots))
    assert old.currency is None and old.returned == {}
    found = old.observe(replace(return_of("r1", "t1", amount=150), currency="JPY").to_avro(), "card:A", RULES)
    assert found is not None and found.get("return_exceeds_sale") == 1.0 and "return_currency_mismatch" not in found
    assert pickle.loads(pickle.dumps(old)) == old


@pytest.mark.parametrize(
    ("currency", "returned", "exceeds"),
    [("USD", {"USD": 30.0}, True), ("JPY", {"JPY": 30.0}, False), (None, {"": 30.0}, True)],
)
def test_a_receipt_restored_with_one_returned_sum_keeps_it_under_its_currency(currency, returned, exceeds):
    """A savepoint written before per-currency sums holds ``returned`` as one float and ``returned_currency``."""
    import pickle

    slots = {name: getattr(Receipt(), name) for name in Receipt.__slots__}
    slots.update(seen={"r1"}, returned=30.0, returned_currency=currency, opened=T0)  # a return came before its sale
    old = Receipt.__new__(Receipt)
    old.__setstate__((None, slots))
    assert old.returned == returned and pickle.loads(pickle.dumps(old)) == old
    old.observe(sale("t1", amount=40).to_avro(), "token:card-A", RULES)
    found = old.observe(return_of("r2", "t1", at_s=60, amount=20).to_avro(), "token:card-A", RULES)
    assert found is not None and ("return_exceeds_sale" in found) is exceeds


def test_card_velocity_burst_is_flagged():
    p = Pipeline()
    outcomes = [p.decision(sale(f"t{i}", at_s=i * 10, amount=2.0)) for i in range(RULES.velocity_limit + 2)]
    assert "velocity_exceeded" not in outcomes[RULES.velocity_limit - 1]["reasons"]
    assert "velocity_exceeded" in outcomes[-1]["reasons"]


def test_velocity_window_forgets_old_transactions():
    p = Pipeline()
    for i in range(RULES.velocity_limit):
        p.decision(sale(f"t{i}", at_s=i))
    later = p.decision(sale("late", at_s=RULES.velocity_window_s + 100))
    assert later["indicators"]["velocity"] == 1.0


def test_a_late_transaction_behind_more_than_the_kept_velocity_times_still_counts_itself():
    p = Pipeline()
    newer = RULES.velocity_limit * 4 + 5
    for i in range(newer):
        p.decision(sale(f"t{i}", at_s=100 + i))
    late = p.decision(sale("late", at_s=90))  # out of order: older than every kept time
    assert late["indicators"]["velocity"] == 1.0


def test_amount_far_above_customer_habit_is_flagged():
    p = Pipeline()
    for i in range(8):
        p.decision(sale(f"t{i}", at_s=i * 86400, amount=20 + i))
    scored = p.decision(sale("big", at_s=9 * 86400, amount=900))
    assert "amount_above_norm" in scored["reasons"]


def test_duplicate_transaction_is_scored_once():
    p = Pipeline()
    assert p.feed(sale("t1").encode())
    assert p.feed(sale("t1").encode()) == []


def test_a_record_reusing_an_id_on_its_receipt_with_other_content_is_refused_naming_the_fields_but_a_copy_is_dropped():
    receipt = Receipt()
    first = return_of("r1", "t1", at_s=100, amount=30, card="card-SECRET")
    assert receipt.observe(first.to_avro(), "token:card-SECRET", RULES) is not None
    assert receipt.observe(first.to_avro(), "token:card-SECRET", RULES) is None  # a redelivered copy
    other = replace(first, amount=31.0, currency="EUR")
    with pytest.raises(ConflictingTransaction) as err:
        receipt.observe(other.to_avro(), "token:card-SECRET", RULES)
    assert err.value.kind == "conflicting_transaction" and not is_retryable(err.value.kind)
    assert "'r1'" in err.value.reason and "receipt 't1'" in err.value.reason
    assert "another amount, currency;" in err.value.reason and "card-SECRET" not in err.value.reason
    assert err.value.tx["amount"] == 31.0
    assert receipt.returned == {"USD": 30} and list(receipt.seen) == ["r1"], "the conflict changed nothing"
    moved = replace(first, store_id="store-009", event_time=first.event_time + 1)
    with pytest.raises(ConflictingTransaction, match="another store_id, event_time;"):
        receipt.observe(moved.to_avro(), "token:card-SECRET", RULES)
    with pytest.raises(ConflictingTransaction, match="another customer;"):
        receipt.observe(first.to_avro(), "token:card-OTHER", RULES)


def test_a_receipt_restored_from_a_job_that_kept_ids_only_drops_any_later_copy_as_before():
    import pickle

    receipt = Receipt()
    receipt.observe(sale("t1", amount=100).to_avro(), "token:card-A", RULES)
    slots = {name: getattr(receipt, name) for name in Receipt.__slots__}
    slots["seen"] = {"t1"}  # what a savepoint written before the digests holds
    old = Receipt.__new__(Receipt)
    old.__setstate__((None, slots))
    assert old.seen == {"t1": None}
    assert old.observe(sale("t1", amount=999).to_avro(), "token:card-A", RULES) is None  # content unknown: dropped
    found = old.observe(return_of("r1", "t1", at_s=60, amount=40).to_avro(), "token:card-A", RULES)
    assert found is not None and "return_exceeds_sale" not in found
    with pytest.raises(ConflictingTransaction):  # a new id has its digest
        old.observe(return_of("r1", "t1", at_s=60, amount=41).to_avro(), "token:card-A", RULES)
    assert pickle.loads(pickle.dumps(old)) == old


def _amounts_alike_in_16_bits() -> tuple[float, float]:
    """Two amounts whose digest fields agree in their low 16 bits (what a receipt kept before 2026-12-07)."""
    import zlib

    first: dict[int, float] = {}
    for cents in range(1, 1_000_000):
        amount = cents / 100
        low = zlib.crc32(repr(amount).encode()) & 0xFFFF
        if low in first:
            return first[low], amount
        first[low] = amount
    raise AssertionError("no two amounts alike")


def test_a_record_with_other_content_that_16_bit_digests_took_for_a_copy_is_a_conflict():
    a, b = _amounts_alike_in_16_bits()
    receipt = Receipt()
    assert receipt.observe(sale("t1", amount=a).to_avro(), "token:card-A", RULES) is not None
    with pytest.raises(ConflictingTransaction, match="another amount;"):
        receipt.observe(sale("t1", amount=b).to_avro(), "token:card-A", RULES)


def test_a_receipt_saved_with_16_bit_digests_still_drops_copies_and_refuses_other_content():
    """A checkpoint of the job before 32-bit digests: its ids' digests hold 16 bits a field (here a pickled receipt
    as that job wrote it, the old digest computed as it did)."""
    import pickle
    import zlib

    tx = sale("t1", amount=25.0).to_avro()
    fields = (25.0, "USD", "SALE", "store-001", "token:card-A", tx["event_time"], None)
    old_digest = 0
    for i, value in enumerate(fields):
        old_digest |= (zlib.crc32(repr(value).encode()) & 0xFFFF) << (16 * i)
    kept = Receipt()
    kept.observe(tx, "token:card-A", RULES)
    slots = {name: getattr(kept, name) for name in Receipt.__slots__}
    slots["seen"] = {"t1": old_digest}
    written = pickle.dumps((None, slots))
    old = Receipt.__new__(Receipt)
    old.__setstate__(pickle.loads(written))
    assert old.seen == {"t1": old_digest}
    assert old.observe(tx, "token:card-A", RULES) is None  # a redelivered copy: dropped, as before
    with pytest.raises(ConflictingTransaction, match="another amount;"):
        old.observe(sale("t1", amount=26.0).to_avro(), "token:card-A", RULES)
    with pytest.raises(ConflictingTransaction, match="another store_id, customer;"):
        old.observe(sale("t1", store="store-002").to_avro(), "token:card-B", RULES)
    assert old.seen == {"t1": old_digest}, "a copy or a conflict changes nothing"


def test_store_return_burst_is_flagged():
    settings = Settings(rules={"store_return_limit": 3})
    p = Pipeline(settings)
    last = None
    for i in range(5):
        last = p.decision(return_of(f"r{i}", None, at_s=i, card=f"card-{i}"))
    assert "store_return_burst" in last["reasons"]


def test_high_value_item_is_an_indicator():
    scored = Pipeline().decision(sale("t1", amount=1500, category="electronics"))
    assert "high_value_item" in scored["reasons"]


def test_anonymous_buyers_do_not_share_history():
    a = sale("t1", card=None)
    b = sale("t2", card=None)
    assert customer_key(a.to_avro()) != customer_key(b.to_avro())


@pytest.mark.parametrize(
    "change,kind",
    [
        ({"amount": -5.0}, "invalid_amount"),
        ({"amount": float("nan")}, "invalid_amount"),
        ({"amount": 1e308}, "invalid_amount"),  # finite, but two would overflow a profile's sums to inf
        ({"currency": "usd"}, "invalid_currency"),
        ({"currency": "USD\n"}, "invalid_currency"),  # ``$`` of a pattern matches before a final newline
        ({"transaction_id": ""}, "missing_field"),
        ({"store_id": " "}, "missing_field"),
        ({"event_time": 0}, "invalid_timestamp"),
        ({"original_transaction_id": "x"}, "invalid_reference"),
    ],
)
def test_invalid_transactions_are_rejected_with_a_reason(change, kind):
    data = replace(sale("t1"), **change).encode()
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(data, T0, 1 << 20)
    assert err.value.kind == kind and err.value.reason


@pytest.mark.parametrize(
    "change",
    [
        {"billing_latitude": float("nan")},
        {"billing_longitude": float("inf")},
        {"billing_latitude": -90.5},
        {"billing_longitude": 1e308},
    ],
)
def test_a_billing_coordinate_that_is_no_place_on_earth_is_dead_lettered_not_sent_to_fraud_detector(change):
    """Taken, a NaN latitude went to Fraud Detector as the text ``nan`` and into ``train``'s history; a Fraud Detector
    CSV row with it was refused all along."""
    (name,) = change
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(replace(sale("t1"), **change).encode(), T0, 1 << 20)
    assert err.value.kind == "invalid_field" and name in err.value.reason and str(change[name]) not in err.value.reason
    edge = parse_transaction(replace(sale("t2"), billing_latitude=-90.0, billing_longitude=180.0).encode(), T0, 1 << 20)
    assert (edge["billing_latitude"], edge["billing_longitude"]) == (-90.0, 180.0)
    assert parse_transaction(sale("t3").encode(), T0, 1 << 20)["billing_latitude"] is None


@pytest.mark.parametrize(
    "field,text",
    [
        ("category", "c" * 200_000),
        ("category", "grocery\x1b[2J"),
        ("sku", "sku-1\r\nBcc: x@evil.test"),
        ("sku", ""),
        ("product_category", "p" * 200_000),
    ],
)
def test_line_item_text_that_is_no_id_is_dead_lettered_naming_the_field_not_the_text(field, text):
    tx = sale("t1")
    if field == "product_category":
        tx = replace(tx, product_category=text)
    else:
        tx = replace(tx, items=(replace(tx.items[0], **{field: text}), *tx.items[1:]))
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(tx.encode(), T0, 1 << 20)
    assert err.value.kind == ("invalid_id" if field == "product_category" else "invalid_item")
    assert field in err.value.reason and err.value.reason.isprintable() and len(err.value.reason) < 200
    ok = replace(sale("t2"), product_category="Home & Garden")
    ok = replace(ok, items=(replace(ok.items[0], sku="ABC/123 blue", category="Home & Garden"), *ok.items[1:]))
    assert parse_transaction(ok.encode(), T0, 1 << 20)["items"] == [  # a real shop's labels pass
        {"sku": i.sku, "category": i.category, "quantity": i.quantity, "unit_price": i.unit_price} for i in ok.items
    ]


@pytest.mark.parametrize("field", ["card_bin", "billing_state", "billing_country"])
def test_a_scored_field_of_free_text_over_128_characters_is_dead_lettered_and_a_real_one_passes(field):
    """They are written on the scored transaction and indexed: unbounded, a 200 000-character one was sent on."""
    for text in ("s" * 200_000, "CA\x1b[2J"):
        bad: dict[str, Any] = {field: text}
        with pytest.raises(InvalidRecord) as err:
            parse_transaction(replace(sale("t1"), **bad).encode(), T0, 1 << 20)
        assert err.value.kind == "invalid_id" and field in err.value.reason and len(err.value.reason) < 200
    for text in ("404409", "New South Wales", "United Kingdom of Great Britain and Northern Ireland", "CÔTE D'IVOIRE"):
        real: dict[str, Any] = {field: text}
        assert parse_transaction(replace(sale("t2"), **real).encode(), T0, 1 << 20)[field] == text


@pytest.mark.parametrize(
    "field,text",
    [
        ("card_token", "t" * 500_000),
        ("card_token", "tok_1\x1b[2J"),
        ("customer_email", "m" * 300 + "@example.com"),
        ("customer_email", "no-at-sign.example.com"),
        ("customer_email", "ann@x.com\r\nBcc: x@evil.test"),
        ("ip_address", "1" * 200_000),
        ("ip_address", "256.1.1.1"),
        ("ip_address", "fe80::1%\x1b[2J"),
        ("ip_address", "10.0.0.1, not-an-address"),
        ("ip_address", "10.0.0.1,,10.0.0.2"),
        ("ip_address", "10.0.0.1, "),
        ("ip_address", ", ".join(["10.0.0.1"] * 17)),
        ("ip_address", "1.2.3.4:65536"),
        ("ip_address", "1.2.3.4:5:6"),
        ("ip_address", "[1.2.3.4]:80"),
        ("ip_address", "2001:db8::1]:80"),
        ("ip_address", "[2001:db8::1]443"),
        ("ip_address", "2001:db8::1::80"),
        ("ip_address", "unknownx, 10.0.0.1"),
        ("ip_address", "_hidden id, 10.0.0.1"),
        ("ip_address", ", ".join(["unknown"] * 16 + ["10.0.0.1"])),
    ],
)
def test_a_card_token_email_or_ip_past_any_real_ones_bound_is_dead_lettered_naming_the_field_not_the_text(field, text):
    """Each keys a profile in state, and a card token is the indexed customer key: unbounded, they were kept."""
    changes: dict[str, Any] = {field: text}
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(replace(sale("t1"), **changes).encode(), T0, 1 << 20)
    assert err.value.kind == "invalid_id"
    assert field in err.value.reason and err.value.reason.isprintable() and len(err.value.reason) < 200


@pytest.mark.parametrize(
    "field,text",
    [
        ("card_token", "tok_1MqLiJ2eZvKYlo2C"),
        ("card_token", "4111110000001111"),
        ("card_token", "8ac7a4a17d0c5a0e017d0c6d0b1f0123=="),
        ("card_token", "cnon:card-nonce-ok"),
        ("card_token", "x" * 256),
        ("customer_email", "o'brien+receipts@mail.example.co.uk"),
        ("customer_email", "josé@exämple.de"),
        ("customer_email", '"john.doe"@example.com'),
        ("customer_email", "a" * 64 + "@" + "d" * 185 + ".com"),
        ("ip_address", "72.239.175.244"),
        ("ip_address", "010.001.002.003"),
        ("ip_address", "2001:db8::8a2e:370:7334"),
        ("ip_address", "::ffff:192.0.2.128"),
        ("ip_address", "fe80::1%eth0"),
        ("ip_address", "2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ],
)
def test_real_card_tokens_emails_and_ip_addresses_pass(field, text):
    changes: dict[str, Any] = {field: text}
    parsed = parse_transaction(replace(sale("t1"), **changes).encode(), T0, 1 << 20)
    if field == "ip_address":
        assert parsed[field] == canonical_ip(text)
    else:
        assert parsed[field] == (text.lower() if field == "customer_email" else text)


@pytest.mark.parametrize(
    "spellings",
    [
        ("10.1.2.3", "010.001.002.003", "10.01.2.3:8080", "::ffff:10.1.2.3", "[::FFFF:10.1.2.3]:443"),
        ("2001:db8::ff00:42:8329", "2001:0DB8:0000:0000:0000:FF00:0042:8329", "[2001:db8:0:0::ff00:42:8329]:80"),
    ],
)
def test_one_client_written_several_ways_is_one_ip_address_and_one_profile(spellings):
    """A zero-padded IPv4, an upper-case or uncompressed IPv6 and a dual-stack socket's IPv4-mapped form name the same
    host: taken as written, each keyed a profile of its own, so a client's cards were not linked across the tills or
    proxies that spell it differently. Every spelling is now the canonical one."""
    assert {check_ip_address(text) for text in spellings} == {spellings[0]}
    scorer, state = Scorer(Settings()), ScoringState()
    for n, text in enumerate(spellings):  # one card per spelling: the IP's profile links them all
        tx = replace(sale(f"w{n}", at_s=n * 60, card=f"card-w{n}"), ip_address=text)
        out, _ = scorer.observe(scorer.parse(tx.encode(), None, "transactions", 0, n, tx.event_time), state)
    row = dict(zip(FEATURE_NAMES, feature_row(out[0], dict(out[1])), strict=True))
    assert row["link_tx_before_max"] == float(len(spellings) - 1)


def test_an_x_forwarded_for_ip_list_is_scored_as_its_client_address_and_one_with_a_bad_element_is_refused():
    """A shop behind a proxy sends the header's list, the client first: refused, every such sale was dead-lettered
    and never scored. The client address is what the profiles key and the model sees, as if sent alone."""
    forwarded = ("203.0.113.7, 10.0.0.2", "203.0.113.7,10.0.0.2,  2001:db8::1", " 203.0.113.7 ")
    for n, text in enumerate(forwarded):
        as_sent: dict[str, Any] = {}
        parsed = parse_transaction(replace(sale(f"t{n}"), ip_address=text).encode(), T0, 1 << 20, as_sent=as_sent)
        assert parsed["ip_address"] == "203.0.113.7"
        assert as_sent == {"ip_address": text}, "a dead letter of it holds the record as sent"
    as_list, alone = Scorer(Settings()), Scorer(Settings())
    list_state, alone_state = ScoringState(), ScoringState()
    for n in range(4):  # four cards from one client: the IP's profile links them, whichever way the IP was sent
        tx = sale(f"v{n}", at_s=n * 60, card=f"card-{n}")
        got = []
        for scorer, state, ip in ((as_list, list_state, "203.0.113.7, 10.0.0.2"), (alone, alone_state, "203.0.113.7")):
            sent = replace(tx, ip_address=ip)
            out, _ = scorer.observe(scorer.parse(sent.encode(), None, "transactions", 0, n, sent.event_time), state)
            got.append((feature_row(out[0], dict(out[1])), sorted(out[1].items())))
        assert got[0] == got[1]
    assert dict(zip(FEATURE_NAMES, got[0][0], strict=True))["link_tx_before_max"] == 3.0
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(replace(sale("t9"), ip_address="203.0.113.7, 10.0.0.300").encode(), T0, 1 << 20)
    assert err.value.kind == "invalid_id" and err.value.reason.startswith("ip_address is not an IP address (")
    assert "203.0.113.7" not in err.value.reason


@pytest.mark.parametrize(
    "sent,client",
    [
        ("1.2.3.4:5678", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[fe80::1%eth0]:8080", "fe80::1%eth0"),
        ("203.0.113.7:51234, 10.0.0.2:80", "203.0.113.7"),
        ("unknown, 10.0.0.2", "10.0.0.2"),
        ("Unknown,10.0.0.2", "10.0.0.2"),
        ("_hidden, 10.0.0.2", "10.0.0.2"),
        ("_abc123, unknown, [2001:db8::7]:8443, 10.0.0.2", "2001:db8::7"),
    ],
)
def test_an_ip_address_with_a_port_or_brackets_or_behind_unknown_proxies_is_scored_as_the_address_alone(sent, client):
    """Proxies and POS systems write these: refused, each such sale was dead-lettered and never scored. The port and
    brackets are dropped and ``unknown`` or RFC 7239 obfuscated elements skipped: the client is the first address,
    the same profile as a sale sent with that address alone; the dead letter still holds the value as sent."""
    as_sent: dict[str, Any] = {}
    parsed = parse_transaction(replace(sale("t1"), ip_address=sent).encode(), T0, 1 << 20, as_sent=as_sent)
    assert parsed["ip_address"] == client
    assert as_sent == {"ip_address": sent}
    with_port, alone = Scorer(Settings()), Scorer(Settings())
    port_state, alone_state = ScoringState(), ScoringState()
    for n in range(3):  # three cards from one client: its profile links them, however the address was written
        tx = sale(f"v{n}", at_s=n * 60, card=f"card-{n}")
        got = []
        for scorer, state, ip in ((with_port, port_state, sent), (alone, alone_state, client)):
            record = replace(tx, ip_address=ip)
            out, _ = scorer.observe(scorer.parse(record.encode(), None, "transactions", 0, n, tx.event_time), state)
            got.append((feature_row(out[0], dict(out[1])), sorted(out[1].items())))
        assert got[0] == got[1]
    assert dict(zip(FEATURE_NAMES, got[0][0], strict=True))["link_tx_before_max"] == 2.0
    history = observe_all([replace(sale("h1"), ip_address=sent)], Settings())  # train and backtest: the same parse
    assert not history.rejected and history.items[0][0]["ip_address"] == client


def test_a_bare_ipv6_address_is_never_split_at_its_last_colon_as_a_port():
    """``2001:db8::1`` is that address, not ``2001:db8:`` and port 1: a port on an IPv6 address needs brackets."""
    assert check_ip_address("2001:db8::1") == "2001:db8::1"
    assert check_ip_address("::1:80") == "::1:80"
    assert check_ip_address("2001:db8::1, [2001:db8::2]:443") == "2001:db8::1"
    with pytest.raises(InvalidRecord):
        check_ip_address("::ffff:192.0.2.128:80")


@pytest.mark.parametrize("text", ["unknown", "_hidden", "unknown, _abc123, UNKNOWN"])
def test_an_ip_address_list_naming_no_address_is_refused_saying_so(text):
    """Nothing to key the client's profile by: the sale is dead-lettered, as before, with a reason that says why."""
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(replace(sale("t1"), ip_address=text).encode(), T0, 1 << 20)
    assert err.value.kind == "invalid_id"
    reason = err.value.reason
    assert reason.startswith("ip_address names no IP address (") and "unknown or obfuscated" in reason


def test_a_blank_identity_is_no_identity_not_one_profile_shared_by_every_shopper_who_sent_it():
    a = parse_transaction(replace(sale("t1", card=" "), customer_email=" \t").encode(), T0, 1 << 20)
    b = parse_transaction(replace(sale("t2", card=" "), customer_email=" ").encode(), T0, 1 << 20)
    assert (a["card_token"], a["customer_email"]) == (None, None)
    assert customer_key(a) != customer_key(b)
    padded = parse_transaction(replace(sale("t3"), customer_email=" ann@x.com ").encode(), T0, 1 << 20)
    assert padded["customer_email"] == "ann@x.com"


def test_an_email_written_in_other_capitals_is_the_same_customer_and_identity():
    """Mail providers do not tell ``Mule@Example.com`` from ``mule@example.com``: keyed as written, alternating the
    capitals split one shopper into two histories, halving the velocity a burst of sales reached."""
    upper = parse_transaction(replace(sale("t1"), customer_email=" Mule@Example.COM").encode(), T0, 1 << 20)
    lower = parse_transaction(replace(sale("t2"), customer_email="mule@example.com").encode(), T0, 1 << 20)
    assert upper["customer_email"] == lower["customer_email"] == "mule@example.com"
    scorer, state = Scorer(Settings()), ScoringState()
    seen = []
    for n in range(6):  # six sales in 50 s, the e-mail's capitals alternating: one customer
        email = "Mule@Example.com" if n % 2 else "mule@example.com"
        tx = replace(sale(f"v{n}", at_s=n * 10, card=None), customer_email=email)
        out, _ = scorer.observe(scorer.parse(tx.encode(), None, "transactions", 0, n, tx.event_time), state)
        seen.append(out[1]["velocity"])
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_oversized_message_is_rejected_before_decoding():
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(b"x" * 2000, T0, 1000)
    assert err.value.kind == "oversized"


def test_bad_input_becomes_a_dead_letter_with_its_origin():
    rows = Pipeline().feed(b"not avro at all")
    topic, key, value = rows[0]
    dl = codec("DeadLetter").decode(value)
    assert topic == "dead_letters" and key == b"transactions:0:1"
    assert dl["payload"] == b"not avro at all" and dl["error_kind"] == "not_avro"


def test_a_suspect_face_alone_makes_review_and_with_a_high_model_score_blocks():
    tx = sale("t1").to_avro()
    rs = RuleSet.from_settings(RULES)
    assert decide(tx, {}, ModelResult(score=960), FaceResult(), rs).outcome == "REVIEW"
    face = FaceResult(status="MATCHED", category="SUSPECT", subject_id="s1", similarity=99.0)
    assert decide(tx, {}, ModelResult(), face, rs).outcome == "REVIEW"
    assert decide(tx, {}, ModelResult(score=960), face, rs).outcome == "BLOCK"


def test_state_objects_survive_pickling():
    import pickle

    r, s, c = Receipt(), StoreActivity(), CustomerProfile()
    tx = sale("t1").to_avro()
    r.observe(tx, "card:A", RULES)
    c.observe(tx, RULES)
    for obj in (r, s, c):
        assert pickle.loads(pickle.dumps(obj)) == obj


def test_every_state_change_is_handed_over_for_persistence():
    p = Pipeline()
    p.decision(sale("t1", store="store-A", card="card-A"))
    p.decision(return_of("r1", "t1", store="store-B", card="card-B"))
    restored = ScoringState.restore(
        {k: v for (m, k), v in p.persisted.items() if m == RECEIPTS},
        {k: v for (m, k), v in p.persisted.items() if m == STORES},
        {k: v for (m, k), v in p.persisted.items() if m == CUSTOMERS},
    )
    assert restored.receipts == p.state.receipts
    assert restored.stores == p.state.stores
    assert restored.customers == p.state.customers


def test_old_receipts_expire_and_their_removal_is_persisted():
    p = Pipeline(Settings(rules={"receipt_retention_days": 1}))
    p.decision(sale("old", at_s=0))
    later = 2 * 86400
    p.decision(sale("new", at_s=later, card="card-B"))
    assert "old" not in p.state.receipts and ("receipts", "old") not in p.persisted
    assert "new" in p.state.receipts


def test_a_return_past_the_return_window_meets_no_receipt_even_when_nothing_came_in_between():
    p = Pipeline()
    p.decision(sale("t1", amount=50))
    days = RULES.receipt_retention_days
    inside = p.decision(return_of("r1", "t1", at_s=days * 86_400 - 1, amount=20))
    assert "return_unknown_receipt" not in inside["indicators"]
    past = p.decision(return_of("r2", "t1", at_s=days * 86_400 + 1, amount=20))
    assert past["indicators"].get("return_unknown_receipt") == 1.0
    assert "seconds_since_sale" not in past["indicators"]


def test_a_redelivered_return_past_the_window_is_dropped_after_its_old_sales_entry_expires():
    """The sale came out of order, so its entry sat behind a newer one and its receipt was replaced when the return
    came: that old entry, popped later, dropped the return's receipt, and the copy was decided again."""
    p = Pipeline()
    days = RULES.receipt_retention_days
    p.decision(sale("a", at_s=10 * 86_400, card="card-B"))
    p.decision(sale("s1", at_s=0, amount=50))  # delivered after a newer sale
    late = return_of("r1", "s1", at_s=(days + 1) * 86_400, amount=20)
    assert p.decision(late)["indicators"].get("return_unknown_receipt") == 1.0
    p.decision(sale("b", at_s=(days + 11) * 86_400, card="card-C"))  # pops both old entries
    assert p.feed(late.encode()) == []


def test_a_receipt_opened_by_a_return_outlives_a_restore_for_its_return_window():
    p = Pipeline()
    p.decision(return_of("r1", "s1", at_s=100, amount=20))  # its sale is still on its way
    restored = ScoringState.restore({"s1": p.state.receipts["s1"]}, {}, {})
    restored.expire_receipts(T0 + 200_000, RULES.receipt_retention_days * 86_400_000)
    assert "s1" in restored.receipts


def test_a_sale_that_comes_after_its_return_and_is_stamped_later_still_expires():
    """Delivered after its return, and stamped after it (another lane's clock): the receipt is dated by the sale."""
    p = Pipeline()
    p.decision(return_of("r1", "t1", at_s=100, amount=20))
    p.decision(sale("t1", at_s=200, amount=50))
    days = RULES.receipt_retention_days
    p.decision(sale("x1", at_s=days * 86_400 + 150, card="card-B"))  # the return's entry is due, the sale is not
    p.decision(sale("x2", at_s=2 * days * 86_400, card="card-B"))
    assert "t1" not in p.state.receipts
    assert p.persisted.get((RECEIPTS, "t1")) is None


def test_event_stamped_further_ahead_of_the_wall_clock_than_the_allowed_skew_is_rejected():
    skew = SETTINGS.job.max_future_skew_ms
    for ahead_ms in (skew + 1, 3_600_000, 2 * 86_400_000):
        with pytest.raises(InvalidRecord) as err:
            parse_transaction(sale("t1", at_s=ahead_ms / 1000).encode(), T0, 1 << 20)
        assert err.value.kind == "invalid_timestamp" and "after the wall clock" in err.value.reason
    assert parse_transaction(sale("t2", at_s=skew / 1000).encode(), T0, 1 << 20)["transaction_id"] == "t2"
    assert parse_transaction(sale("t3", at_s=3600).encode(), T0, 1 << 20, max_future_skew_ms=3_600_000)
    assert parse_transaction(sale("t4", at_s=10 * 86400).encode(), 0, 1 << 20), "no clock (offline history): no bound"


SHORT_MEMORY = SETTINGS.model_copy(update={"rules": RULES.model_copy(update={"receipt_retention_days": 10})})


def test_an_event_older_than_the_state_horizon_is_rejected_as_too_late_but_out_of_order_ones_count():
    pipeline, horizon_s = Pipeline(SHORT_MEMORY), 10 * 86_400
    pipeline.decision(sale("t-new", at_s=horizon_s + 7200))
    late = pipeline.decision(sale("t-late", at_s=7200 + 3600))  # out of order, inside the horizon
    assert late["transaction_id"] == "t-late"
    with pytest.raises(InvalidRecord) as err:
        pipeline.feed(sale("t-old", at_s=3600).encode())
    assert err.value.kind == "too_late" and "day state horizon" in err.value.reason


def test_a_restored_state_keeps_rejecting_what_is_too_late():
    pipeline = Pipeline(SHORT_MEMORY)
    pipeline.decision(sale("t1", at_s=10 * 86_400 + 7200))
    receipts = {key: value for (name, key), value in pipeline.persisted.items() if name == RECEIPTS}
    restored = ScoringState.restore(receipts, {}, {})
    env = pipeline.scorer.parse(sale("t-old", at_s=60).encode(), None, "transactions", 0, 9, T0)
    with pytest.raises(InvalidRecord):
        pipeline.scorer.observe(env, restored)


def test_a_currency_outside_iso_4217_is_scored_with_a_reason():
    assert "unknown_currency" in Pipeline().decision(replace(sale("t1"), currency="JEP"))["reasons"]
    assert "unknown_currency" not in Pipeline().decision(replace(sale("t2"), currency="EUR"))["reasons"]


# --- identifiers at the edge -------------------------------------------------------------------------

HOSTILE_IDS = (
    "x/../Q2XX-VICTIM-0001/reboot?",
    "../../etc/passwd",
    "a b",
    "id#frag",
    "%2e%2e",
    "\x00ctl",
    "é",
    "s" * 200,
)


@pytest.mark.parametrize("value", HOSTILE_IDS)
@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("store_id", "SALE"),
        ("lane_id", "SALE"),
        ("cashier_id", "SALE"),
        ("transaction_id", "SALE"),
        ("customer_id", "SALE"),
        ("original_transaction_id", "RETURN"),
    ],
)
def test_an_identifier_that_is_not_a_plain_name_or_id_is_rejected_as_invalid_id(field, kind, value):
    tx = replace(return_of("r1", "t1") if kind == "RETURN" else sale("t1"), **{field: value})
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(tx.encode(), T0, 1 << 20)
    assert err.value.kind == "invalid_id" and field in err.value.reason
    assert value not in err.value.reason, "the reason never echoes a hostile value (it is logged)"


def test_an_empty_optional_identifier_means_none_and_an_empty_required_one_is_missing():
    assert parse_transaction(replace(sale("t1"), cashier_id="", customer_id="").encode(), T0, 1 << 20)
    with pytest.raises(InvalidRecord) as err:
        parse_transaction(replace(sale("t1"), store_id="").encode(), T0, 1 << 20)
    assert err.value.kind == "missing_field"


def test_every_identifier_the_pos_generator_and_the_fraud_detector_csv_make_is_accepted():
    from schemas.afd_csv import row_to_transaction

    gen = PosGenerator(seed=3, stores=12, lanes_per_store=12, customers=300, fraud_share=0.3, start_time_ms=T0)
    txs = [next(gen) for _ in range(3000)]
    assert {tx.kind for tx in txs} == {"SALE", "RETURN"} and any(tx.customer_id for tx in txs)
    row = {
        "EVENT_ID": "1cd3831a737ea11d295bd8410a0bc67f1",
        "EVENT_TIMESTAMP": "2023-03-06T15:02:05Z",
        "ENTITY_ID": "108-24-9997",
        "order_price": "33.16",
        "payment_currency": "usd",
        "merchant": "fraud_Lesch, D'Amore and Brown",
        "EVENT_LABEL": "0",
        "customer_email": "leecatherine@miranda-buck.com",
        "ip_address": "72.239.175.244",
        "card_bin": "404409.0",
        "billing_state": "GA",
        "billing_country": "US",
        "product_category": "misc_net",
    }
    txs.append(row_to_transaction(row))
    txs.append(replace(sale("t.1:a@b+c"), customer_id="olsenmia@gmail.com", store_id="S_001", lane_id="L04"))
    for tx in txs:
        assert parse_transaction(tx.encode(), 0, 1 << 20)["transaction_id"] == tx.transaction_id


@pytest.mark.parametrize(
    ("amount", "currency", "figure"),
    [(1500.0, "JPY", "of 1,500 JPY"), (12.345, "KWD", "of 12.345 KWD"), (1234.5, "EUR", "of 1,234.50 EUR")],
)
def test_a_blocked_alerts_summary_gives_the_amount_in_its_currencys_minor_units(amount, currency, figure):
    """The summary the dashboard shows beside the amount (alert page, live list, cases) had two decimals for every
    currency: "1500.00 JPY" (the yen has none), "12.35 KWD" (a fils off the 12.345 the alert's amount row shows)."""
    tx = {"transaction_id": "t1", "event_time": T0, "store_id": "S1", "lane_id": "L1", "kind": "SALE"}
    alert = Scorer.blocked_alert(tx | {"amount": amount, "currency": currency}, Decision("BLOCK", 90, ("x",)))
    assert figure in alert["summary"]


@pytest.mark.parametrize(
    ("category", "opening"), [("SUSPECT", "Possible suspect subj-9 "), ("VIP", "Possible VIP subj-9 ")]
)
@pytest.mark.parametrize("where", ["checkout", "entrance", "lane"])
def test_a_watchlist_alerts_summary_gives_the_match_as_possible_not_as_fact(category, opening, where):
    """The summary the dashboard lists every alert by said "Suspect subj-9 entered at S1", who it is as a fact, where
    the alert's headline ("Possible suspect entered the store") and the pages say a match is a lead to check."""
    face = FaceResult("MATCHED", "subj-9", category, 91.0, matcher="local")
    tx = {"transaction_id": "t1", "amount": 10.0, "currency": "USD", "kind": "SALE"} if where == "checkout" else None
    alert = Scorer.watchlist_alert(T0, "S1", "L1", face, None, "o1", tx, at_lane=where == "lane")
    assert alert["summary"].startswith(opening), alert["summary"]


@pytest.mark.parametrize(("similarity", "figure"), [(99.96, "similarity 99.9"), (100.0, "similarity 100.0")])
def test_a_watchlist_alerts_summary_never_gives_a_near_match_as_a_perfect_one(similarity, figure):
    """The summary, which the dashboard lists the alert by, gave 99.96 as "similarity 100.0", as its message did."""
    face = FaceResult("MATCHED", "subj-9", "SUSPECT", similarity, matcher="local")
    alert = Scorer.watchlist_alert(T0, "S1", "L1", face, None, "o1", None)
    assert alert["summary"].endswith(figure), alert["summary"]
