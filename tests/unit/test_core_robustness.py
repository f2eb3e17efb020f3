"""No single record stops the scoring job (issue 12): bad embeddings, exceptions, huge inputs, clocks.

Each test feeds :class:`DecisionCore` what once stopped the job, or made it wrong for everyone after it,
and checks that the record ends as a dead letter with its reason while the rest is still decided.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from jobs.scoring.claims import CLAIMS
from jobs.scoring.core import MAX_ERROR_TEXT, DecisionCore, SourceRecord, Step
from jobs.scoring.face_join import DECIDED, EARLY_FACES, PENDING
from jobs.scoring.features import PROFILE_KEY
from jobs.scoring.partitioned import PartitionedCore
from jobs.scoring.rules import ModelResult
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, STORES, Predictor
from jobs.scoring.watchlist import Watchlist
from producers.redrive import Selection, plan_redrive
from schemas.codec import codec
from schemas.records import MAX_DEAD_LETTER_PAYLOAD, DeadLetter, WatchlistEntry
from tests.builders import FACE_LEN, OTHER_FACE_LEN, T0, face_vector, return_of, sale
from tests.unit import test_partitioned_scoring as partitioned
from tests.unit.test_decision_core import (
    BUYER_FACE,
    DEADLINE,
    DLQ,
    NOW,
    RULES_TOPIC,
    SUSPECT_FACE,
    TX,
    WATCH_TOPIC,
    alerts,
    clock,
    dead_letters,
    face_record,
    make_core,
    persist,
    rules_update,
    scored,
    settings,
    tx_record,
    watch_entry,
)

NAN_FACE = [math.nan] * FACE_LEN


def kinds(outputs) -> list[str]:
    return [dl["error_kind"] for dl in dead_letters(outputs)]


def assert_persisted_equals_memory(maps: dict[str, dict], core: DecisionCore) -> None:
    def dump(d):
        """Entries by value (the dataclasses' field equality): pickled bytes would also differ in a set's
        iteration order, which depends on its history and the hash seed, not on the state."""
        return dict(d)

    state = core.state
    assert state is not None
    assert dump(maps.get(RECEIPTS, {})) == dump(state.receipts)
    assert dump(maps.get(STORES, {})) == dump(state.stores)
    assert dump(maps.get(CUSTOMERS, {})) == dump(state.customers)
    assert dump(maps.get(PENDING, {})) == dump(core.join.pending)
    assert dump(maps.get(EARLY_FACES, {})) == dump(core.join.early)
    assert dump(maps.get(DECIDED, {})) == dump(core.join.decided)
    assert dump(maps.get(CLAIMS, {})) == dump(core.claims.claimed)


# --- identifiers ----------------------------------------------------------------------------------------


def test_a_store_id_that_is_a_url_path_is_dead_lettered_as_invalid_id_and_never_waits_for_a_face():
    core = make_core()
    hostile = replace(sale("t-evil"), store_id="x/../Q2XX-VICTIM-0001/reboot?")
    step = core.on_records([tx_record(hostile, 1), tx_record(sale("t-ok", card="card-B"), 2)], NOW)
    [dl] = dead_letters(step.outputs)
    assert (dl["dead_letter_id"], dl["error_kind"]) == ("cg.transactions:0:1", "invalid_id")
    assert "store_id" in dl["reason"] and "VICTIM" not in dl["reason"]
    assert set(core.join.pending) == {"t-ok"}


def test_a_face_observation_whose_transaction_id_is_a_path_is_dead_lettered():
    core = make_core()
    step = core.on_records([face_record("../../etc/passwd", offset=3)], NOW)
    assert kinds(step.outputs) == ["invalid_id"] and core.join.early == {}


def test_a_face_observation_whose_lane_could_add_a_mail_header_is_dead_lettered():
    """The lane goes into alerts (an entrance alert's mail Subject) as the store does."""
    core = make_core()
    record = face_record(None, trigger="ENTRANCE", offset=7)
    obs = codec("FaceObservation").decode(record.value)
    hostile = codec("FaceObservation").encode({**obs, "lane_id": "ENT\r\nBcc: leak@evil.example"})
    step = core.on_records([record._replace(value=hostile)], NOW)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "invalid_id" and "lane_id" in dl["reason"] and "evil" not in dl["reason"]


def test_an_observation_of_zeros_an_unknown_trigger_or_over_the_size_limit_is_dead_lettered():
    """A body of zero bytes decodes as an observation with empty ids: it must not pass as an entrance."""
    core = make_core()
    zeros = face_record("t1", offset=4)
    zeros = zeros._replace(value=zeros.value[:10] + b"\x00" * 200)
    huge = face_record("t2", offset=5)
    huge = huge._replace(value=huge.value + b"\x00" * settings().job.max_message_bytes)
    step = core.on_records([zeros, face_record("t3", trigger="SOMETHING", offset=6), huge], NOW)
    assert kinds(step.outputs) == ["invalid_id", "invalid_field", "oversized"]


# --- embeddings -----------------------------------------------------------------------------------------


def test_an_observation_with_a_3_value_embedding_is_dead_lettered_and_the_batch_is_still_scored():
    core = make_core(face_deadline_ms=DEADLINE)
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records(
        [
            tx_record(sale("t1"), 1),
            face_record("t1", embedding=[0.1, 0.2, 0.3], offset=7),
            tx_record(sale("t2", card="card-B"), 2),
            face_record("t2", embedding=BUYER_FACE, offset=8),
        ],
        NOW,
    )
    [dl] = dead_letters(step.outputs)
    assert (dl["dead_letter_id"], dl["error_kind"]) == ("cg.face_observations:1:7", "invalid_embedding")
    assert f"{FACE_LEN} values, got 3" in dl["reason"]
    assert list(scored(step)) == ["t2"] and set(core.join.pending) == {"t1"}  # t1 waits for a usable face


def test_an_observation_with_a_nan_embedding_matches_nobody_and_is_dead_lettered():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=NAN_FACE)], NOW)
    assert kinds(step.outputs) == ["invalid_embedding"] and alerts(step) == []
    entrance = face_record(None, embedding=NAN_FACE, trigger="ENTRANCE", observation_id="entrance:x:1")
    step = core.on_records([entrance], NOW)
    assert kinds(step.outputs) == ["invalid_embedding"] and alerts(step) == []


def test_a_watchlist_entry_with_a_nan_embedding_is_dead_lettered_and_matches_nobody():
    core = make_core()
    control = core.on_control(WATCH_TOPIC, b"subj-nan", watch_entry("subj-nan", NAN_FACE), 0, 4)
    assert control.update is None, "nothing unusable is kept in broadcast state"
    [dl] = dead_letters(control.outputs)
    assert (dl["error_kind"], dl["dead_letter_id"]) == ("invalid_update", "cg.watchlist:0:4")
    assert "NaN" in dl["reason"]
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], NOW)
    assert scored(step)["t1"]["face_status"] == "NO_MATCH" and alerts(step) == []


def test_a_bad_watchlist_entry_is_not_kept_even_when_the_start_up_read_already_passed_its_offset():
    core = DecisionCore(settings(bootstrap_control=True), watchlist=Watchlist(), clock=clock)

    def read(s, apply):
        apply(WATCH_TOPIC, b"subj-nan", watch_entry("subj-nan", NAN_FACE))  # skipped at start
        return {(WATCH_TOPIC, 0): 0}

    core.bootstrap(read)
    replay = core.on_control(WATCH_TOPIC, b"subj-nan", watch_entry("subj-nan", NAN_FACE), 0, 0)
    assert replay.update is None and kinds(replay.outputs) == ["invalid_update"]
    assert "subj-nan" not in core.watchlist


def test_a_bad_rule_set_is_not_kept_even_when_the_start_up_read_already_passed_its_offset():
    """The broadcast stream meets what the start-up read applied again, not applied; a rule set the read skipped
    must not become the broadcast state's, or a restore that cannot read the topic runs without the good one."""
    core = DecisionCore(settings(bootstrap_control=True), watchlist=Watchlist(), clock=clock)
    good = rules_update("2099.1")
    record = codec("RuleSetUpdate").decode(rules_update("2099.2"))
    bad = codec("RuleSetUpdate").encode(record | {"yaml": record["yaml"].replace("block_at: 85", "block_at: lots")})

    def read(s, apply):
        apply(RULES_TOPIC, b"active", good)
        apply(RULES_TOPIC, b"active", bad)  # skipped at start: the good one stays in force
        return {(RULES_TOPIC, 0): 1}

    core.bootstrap(read)
    assert core.rule_set.version == "2099.1"
    kept = core.on_control(RULES_TOPIC, b"active", good, 0, 0)
    replay = core.on_control(RULES_TOPIC, b"active", bad, 0, 1)
    assert kept.update is not None and kept.update.value["version"] == "2099.1"
    assert replay.update is None and kinds(replay.outputs) == ["invalid_update"]
    restored = DecisionCore(settings(), watchlist=Watchlist(), clock=clock)
    restored.restore({}, {kept.update.key: kept.update.value})
    assert restored.rule_set.version == "2099.1"


def test_a_watchlist_entry_with_a_path_subject_or_another_key_is_dead_lettered():
    core = make_core()
    path = core.on_control(WATCH_TOPIC, b"../../x", watch_entry("../../x", SUSPECT_FACE), 0, 1)
    other = core.on_control(WATCH_TOPIC, b"subj-a", watch_entry("subj-b", SUSPECT_FACE), 0, 2)
    assert path.update is None and other.update is None
    assert kinds(path.outputs + other.outputs) == ["invalid_update", "invalid_update"]


def test_a_watchlist_entry_without_embeddings_is_kept_for_other_backends():
    core = make_core()
    empty = WatchlistEntry(
        subject_id="subj-r", category="SUSPECT", embeddings=[], reason="r", flagged_by="lp", flagged_at=T0
    )
    control = core.on_control(WATCH_TOPIC, b"subj-r", empty.encode(), 0, 3)
    assert control.outputs == [] and control.update.key == "wl:subj-r" and "subj-r" in core.watchlist


def test_a_nan_entry_restored_from_broadcast_state_is_left_out_and_the_job_starts():
    entry = codec("WatchlistEntry").decode(watch_entry("subj-9", SUSPECT_FACE))
    bad = {**entry, "subject_id": "subj-nan", "embeddings": [NAN_FACE]}
    core = make_core()
    core.restore({}, {"wl:subj-nan": bad, "wl:subj-9": entry})
    assert "subj-9" in core.watchlist and "subj-nan" not in core.watchlist
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], NOW)
    assert scored(step)["t1"]["face_status"] == "NO_MATCH"


def test_a_buyer_face_kept_before_faces_were_checked_is_no_evidence_at_a_return():
    core = make_core()
    core.on_records([tx_record(sale("t1", amount=40)), face_record("t1", embedding=BUYER_FACE)], NOW)
    core.state.receipts["t1"].sale_face = tuple(NAN_FACE)  # as a checkpoint from before may hold it
    step = core.on_records(
        [tx_record(return_of("r1", "t1", at_s=60, amount=40), 1), face_record("r1", embedding=BUYER_FACE)], NOW
    )
    out = scored(step)["r1"]
    assert "buyer_face_similarity" not in out["indicators"] and "buyer_face_mismatch" not in out["reasons"]


def test_a_buyer_face_of_another_embedder_is_no_evidence_at_a_return():
    core = make_core()
    core.on_records([tx_record(sale("t1", amount=40)), face_record("t1", embedding=BUYER_FACE)], NOW)
    core.state.receipts["t1"].sale_face = (0.01,) * OTHER_FACE_LEN  # kept before CG_FACES__EMBEDDER changed
    step = core.on_records(
        [tx_record(return_of("r1", "t1", at_s=60, amount=40), 1), face_record("r1", embedding=BUYER_FACE)], NOW
    )
    out = scored(step)["r1"]
    assert "buyer_face_similarity" not in out["indicators"] and "buyer_face_mismatch" not in out["reasons"]


# --- any exception is the record's dead letter ----------------------------------------------------------


class FailsFor(Predictor):
    """A model that raises whenever a batch holds one given transaction."""

    def __init__(self, bad_tx: str, error: Exception | None = None) -> None:
        self.bad_tx = bad_tx
        self.error = error or RuntimeError("model exploded on " + bad_tx)
        self.calls: list[list[str]] = []

    def predict_batch(self, items):
        ids = [tx["transaction_id"] for tx, _ in items]
        self.calls.append(ids)
        if self.bad_tx in ids:
            raise self.error
        return [ModelResult(score=100, version="fake-1") for _ in items]


def test_a_model_that_raises_for_one_transaction_dead_letters_only_that_one():
    predictor = FailsFor("t1")
    core = make_core(predictor=predictor, face_deadline_ms=0)
    maps: dict[str, dict] = {}
    step = core.on_records([tx_record(sale(f"t{i}", card=f"card-{i}"), i) for i in range(4)], NOW)
    persist(maps, step)
    assert sorted(scored(step)) == ["t0", "t2", "t3"]
    [dl] = dead_letters(step.outputs)
    assert (dl["error_kind"], dl["dead_letter_id"]) == ("internal_error", "cg.transactions:decision:t1")
    assert dl["reason"].startswith("RuntimeError in predict_batch (test_core_robustness.py:") and dl["key"] == b"t1"
    assert codec("PosTransaction").decode(dl["payload"])["transaction_id"] == "t1"
    assert predictor.calls[0] == ["t0", "t1", "t2", "t3"]  # one batch call first, then one by one
    assert_persisted_equals_memory(maps, core)
    nxt = core.on_records([tx_record(sale("t9", card="card-9"), 9)], NOW)
    assert list(scored(nxt)) == ["t9"], "the job goes on"


def test_a_model_that_raises_at_the_face_deadline_dead_letters_only_that_transaction():
    core = make_core(predictor=FailsFor("t1"))
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t0"), 0), tx_record(sale("t1", card="card-B"), 1)], NOW))
    step = core.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    persist(maps, step)
    assert list(scored(step)) == ["t0"] and kinds(step.outputs) == ["internal_error"]
    assert core.join.pending == {} and maps.get(PENDING, {}) == {}  # decided or dead-lettered: not waiting
    assert_persisted_equals_memory(maps, core)


def test_a_face_after_a_failed_deadline_decision_raises_no_late_alert():
    """A transaction dead-lettered at its face deadline was never decided: it is not remembered for a late face,
    in memory or in state, so its face (a watch-list match) raises no alert for a sale with no scored record."""
    core = make_core(predictor=FailsFor("t1"))
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t0"), 0), tx_record(sale("t1", card="card-B"), 1)], NOW))
    step = core.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    persist(maps, step)
    assert list(scored(step)) == ["t0"] and kinds(step.outputs) == ["internal_error"]
    assert set(core.join.decided) == {"t0"} and set(maps.get(DECIDED, {})) == {"t0"}
    assert_persisted_equals_memory(maps, core)
    restored = make_core(predictor=FailsFor("none"))
    restored.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    restored.restore(maps)
    late = restored.on_records([face_record("t1", embedding=SUSPECT_FACE)], NOW + DEADLINE + 30_000)
    assert alerts(late) == [] and restored.stats.late_faces == {}


def test_an_observation_that_makes_the_watchlist_raise_is_dead_lettered_and_the_rest_is_scored():
    class Broken(Watchlist):
        def search(self, embedding, at_ms=None):
            raise KeyError("index out of step")

    core = make_core(Broken(settings()))
    step = core.on_records(
        [
            tx_record(sale("t1"), 1),
            face_record("t1", embedding=BUYER_FACE, offset=5),
            tx_record(sale("t2", card="card-B"), 2),
            face_record("t2", "NO_FACE", offset=6),
        ],
        NOW,
    )
    [dl] = dead_letters(step.outputs)
    assert (dl["dead_letter_id"], dl["error_kind"]) == ("cg.face_observations:1:5", "internal_error")
    assert dl["reason"].startswith("KeyError in search (test_core_robustness.py:")  # not the key: it may be a value
    assert list(scored(step)) == ["t2"]


def test_an_internal_error_reason_is_capped():
    error = ValueError("x" * 100_000)
    error.schema_path = ("field_name",) * 1000  # type: ignore[attr-defined]
    core = make_core(predictor=FailsFor("t1", error), face_deadline_ms=0)
    [dl] = dead_letters(core.on_records([tx_record(sale("t1"))], NOW).outputs)
    assert len(dl["reason"]) == MAX_ERROR_TEXT and dl["reason"].startswith("ValueError at field field_name.field_name")
    assert "xxx" not in dl["reason"]


def test_an_encode_error_quoting_a_value_names_its_class_and_field_never_the_value(caplog):
    class EmailAsScore(Predictor):  # a model answer the scored record cannot hold: its encode error quotes it
        def predict_batch(self, items):
            return [ModelResult(score=100, challenger_score=tx["customer_email"]) for tx, _ in items]

    core = make_core(predictor=EmailAsScore(), face_deadline_ms=0)
    with caplog.at_level("WARNING", logger="checkout_guard.scoring_job"):
        step = core.on_records([tx_record(sale("t1", customer_email="bob@example.com"))], NOW)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "internal_error"
    assert dl["reason"].startswith("InvalidValue at field challenger_score in ")
    assert "example.com" not in dl["reason"]
    assert caplog.records and "example.com" not in caplog.text
    assert "challenger_score" in caplog.text and "Traceback" in caplog.text  # where it failed is still logged


def test_a_failure_part_way_through_the_state_update_leaves_memory_and_persisted_state_equal():
    core = make_core(face_deadline_ms=0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t1", amount=30), 1)], NOW))
    real = core.scorer.by_store

    def by_store(state, env):  # fails after the receipt was updated in memory
        if env[0]["transaction_id"] == "r1":
            raise ZeroDivisionError("division by zero")
        return real(state, env)

    core.scorer.by_store = by_store  # type: ignore[method-assign]
    step = core.on_records(
        [tx_record(return_of("r1", "t1", at_s=60, amount=30), 2), tx_record(sale("t2", card="card-B"), 3)], NOW
    )
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error"] and list(scored(step)) == ["t2"]
    assert "r1" in core.state.receipts["t1"].seen  # what the failed step did in memory ...
    assert_persisted_equals_memory(maps, core)  # ... is what is persisted


# --- dead letters always fit ----------------------------------------------------------------------------


def test_a_transaction_near_the_broker_size_limit_gives_a_dead_letter_far_under_1_mib():
    data = b"\xc3\x01" + bytes(1_048_500 - 2)
    core = make_core()
    step = core.on_records([SourceRecord(b"k", data, TX, 0, 1, NOW), tx_record(sale("t1"), 2)], NOW)
    [(topic, _, value)] = [row for row in step.outputs if row[0] == DLQ]
    assert len(value) < 2 * MAX_DEAD_LETTER_PAYLOAD < (1 << 20)
    [dl] = dead_letters(step.outputs)
    assert (dl["error_kind"], dl["payload_size"], dl["payload_truncated"]) == ("oversized", 1_048_500, True)


# --- event time is bounded by the wall clock ------------------------------------------------------------


def test_a_transaction_stamped_far_in_the_future_is_dead_lettered_and_later_ones_are_still_scored():
    core = make_core(face_deadline_ms=0)
    future = T0 + 10 * 365 * 86_400_000
    # The broker timestamp is the producer's clock too (CreateTime): it says the same far future.
    step = core.on_records([tx_record(sale("t-future", at_s=(future - T0) / 1000), 1, ingest_ms=future)], NOW)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "invalid_timestamp" and "after the wall clock" in dl["reason"]
    step = core.on_records([tx_record(sale("t-now", card="card-B"), 2)], NOW)
    assert list(scored(step)) == ["t-now"], "not too_late"


def test_the_newest_event_time_never_moves_past_the_wall_clock():
    core = make_core(face_deadline_ms=0)
    ahead = NOW + core.settings.job.max_future_skew_ms  # allowed: clock drift
    step = core.on_records([tx_record(sale("t-ahead", at_s=(ahead - T0) / 1000), 1)], NOW)
    assert list(scored(step)) == ["t-ahead"]
    assert core.state.newest_event_ms == NOW


def test_a_restored_receipt_from_the_far_future_does_not_make_every_transaction_too_late():
    maps: dict[str, dict] = {}
    first = make_core(face_deadline_ms=0)
    persist(maps, first.on_records([tx_record(sale("t0"), 0)], NOW))
    maps[RECEIPTS]["t0"].event_time = T0 + 10 * 365 * 86_400_000  # kept by a job before the bound
    restarted = make_core(face_deadline_ms=0)
    restarted.restore(maps)
    step = restarted.on_records([tx_record(sale("t1", card="card-B"), 1)], NOW)
    assert list(scored(step)) == ["t1"] and restarted.state.newest_event_ms <= NOW


def test_a_fused3_job_matches_768_value_faces_and_dead_letters_a_face_of_another_embedder():
    s = settings()
    s = s.model_copy(update={"faces": s.faces.model_copy(update={"embedder": "fused3"})})
    core = DecisionCore(s, predictor=None, watchlist=Watchlist(s), clock=clock)
    suspect = face_vector(np.random.default_rng(5), 0.02, 768)
    sface = face_vector(np.random.default_rng(6), 0.1, 128)
    assert core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", suspect), 0, 0).outputs == []
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=suspect)], NOW)
    assert (scored(step)["t1"]["face_status"], scored(step)["t1"]["face_subject_id"]) == ("MATCHED", "subj-9")
    step = core.on_records([face_record("t2", embedding=sface, offset=7)], NOW)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "invalid_embedding" and "768 values, got 128" in dl["reason"]
    refused = core.on_control(WATCH_TOPIC, b"subj-8", watch_entry("subj-8", sface), 0, 1)
    [dl] = dead_letters(refused.outputs)
    assert "subj-8" not in core.watchlist and "768 values, got 128" in dl["reason"]
    started = DecisionCore(
        s.model_copy(update={"job": s.job.model_copy(update={"bootstrap_control": True})}),
        watchlist=Watchlist(s),
        clock=clock,
    )

    def read(_settings, apply):
        apply(WATCH_TOPIC, b"subj-8", watch_entry("subj-8", sface))  # refused at start
        return {(WATCH_TOPIC, 0): 0}

    started.bootstrap(read)  # the broadcast stream then meets the same entry, not applied: still checked by length
    replay = started.on_control(WATCH_TOPIC, b"subj-8", watch_entry("subj-8", sface), 0, 0)
    assert replay.update is None and kinds(replay.outputs) == ["invalid_update"]


def test_a_failure_after_an_expiry_still_persists_the_expired_receipts_removal():
    """Receipts expired at a transaction's own time are gone from memory before it is matched: a failure later in
    that record must not leave them in the persisted state, where a restore would bring them (and their buyer
    faces) back past their retention."""
    day_s = 86_400
    later_s = (settings().rules.receipt_retention_days + 1) * day_s
    now = NOW + later_s * 1000
    core = make_core(face_deadline_ms=0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("old", amount=30), 1)], NOW))
    core.state.receipts["old"].sale_face = tuple(BUYER_FACE)
    persist(maps, Step([], {RECEIPTS: {"old": core.state.receipts["old"]}}, None))  # a buyer face kept
    real = core.scorer.by_store

    def by_store(state, env):  # fails after the receipts past the window were expired
        if env[0]["transaction_id"] == "new":
            raise ZeroDivisionError("division by zero")
        return real(state, env)

    core.scorer.by_store = by_store  # type: ignore[method-assign]
    step = core.on_records([tx_record(sale("new", at_s=later_s, card="card-B"), 2)], now)
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error"]
    assert "old" not in core.state.receipts  # expired in memory ...
    assert_persisted_equals_memory(maps, core)  # ... and in the persisted state
    restored = make_core(face_deadline_ms=0)
    restored.restore(maps)
    assert "old" not in restored.state.receipts, "a restore brought back an expired receipt"


def test_a_transaction_failing_after_its_claim_and_face_join_saves_them_as_a_restore_would_rebuild_them():
    core = make_core()
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([face_record("t2", offset=7)], NOW))  # t2's face came first
    claim, on_transaction = core.claims.claim, core.join.on_transaction

    def claim_then_fail(tx, receipt):  # the claim is made in memory, its write never returned
        claim(tx, receipt)
        raise RuntimeError("after the claim")

    def join_then_fail(env, now_ms):  # held for its face (t2: its early face taken) in memory, then a failure
        on_transaction(env, now_ms)
        raise RuntimeError("after the face join")

    core.claims.claim = claim_then_fail  # type: ignore[method-assign]
    persist(maps, core.on_records([tx_record(sale("t1"), 1)], NOW))
    core.claims.claim = claim  # type: ignore[method-assign]
    core.join.on_transaction = join_then_fail  # type: ignore[method-assign]
    step = core.on_records([tx_record(sale("t2", card="card-B"), 2), tx_record(sale("t3", card="card-C"), 3)], NOW)
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error", "internal_error"]
    assert {"t1", "t2", "t3"} <= set(core.claims.claimed) and "t3" in core.join.pending and not core.join.early
    assert_persisted_equals_memory(maps, core)
    restored = make_core()
    restored.restore(maps)
    assert restored.claims.claimed == core.claims.claimed and restored.join.pending.keys() == core.join.pending.keys()


# --- a re-drive of an internal_error dead letter is decided ----------------------------------------------


def test_a_transaction_whose_decision_failed_is_decided_when_its_dead_letter_is_re_driven():
    predictor = FailsFor("r1")
    core = make_core(predictor=predictor, face_deadline_ms=0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t1", amount=30), 1)], NOW))
    step = core.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 2)], NOW)
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error"] and not scored(step)
    assert_persisted_equals_memory(maps, core)  # the failure mark is saved with the receipt
    restored = make_core(predictor=predictor, face_deadline_ms=0)
    restored.restore(maps)
    predictor.bad_tx = "none"  # the cause is fixed; the dead letter's record comes back, unchanged
    other = restored.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=29), 3)], NOW)
    assert kinds(other.outputs) == ["conflicting_transaction"], "other content under the id is still no copy"
    again = restored.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 4)], NOW)
    [decision] = scored(again).values()
    assert decision["transaction_id"] == "r1" and not dead_letters(again.outputs)
    assert "return_exceeds_sale" not in decision["indicators"], "its amount is counted on the receipt once"
    copy = restored.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 5)], NOW)
    assert not copy.outputs, "once decided, a further copy is a redelivery again"


class Remembers(FailsFor):
    """:class:`FailsFor` that also keeps the profile features each transaction was scored with."""

    def __init__(self, bad_tx: str) -> None:
        super().__init__(bad_tx)
        self.features: dict[str, tuple] = {}

    def predict_batch(self, items):
        for tx, _ in items:
            self.features[tx["transaction_id"]] = tx[PROFILE_KEY]
        return super().predict_batch(items)


def test_a_re_driven_transaction_whose_decision_failed_is_counted_once_in_its_history_and_scored_as_first_seen():
    """Its store, customer and linked identities counted it before the decision failed: the re-drive takes back
    what that history gave it (indicators and model features) instead of counting it a second time."""
    predictor = Remembers("t1")
    core = make_core(predictor=predictor, face_deadline_ms=0)
    maps: dict[str, dict] = {}
    step = core.on_records([tx_record(sale("t1", amount=30, card="card-A"), 1)], NOW)
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error"]
    first = predictor.features["t1"]
    assert_persisted_equals_memory(maps, core)
    restored = make_core(predictor=predictor, face_deadline_ms=0)
    restored.restore(maps)
    predictor.bad_tx = "none"  # the cause is fixed; the dead letter's record comes back
    again = restored.on_records([tx_record(sale("t1", amount=30, card="card-A"), 2)], NOW)
    [decision] = scored(again).values()
    assert decision["indicators"]["velocity"] == 1.0 and decision["indicators"].get("first_seen") == 1.0
    assert predictor.features["t1"] == first, "scored with the features its first delivery had"
    [profile] = [p for k, p in restored.state.customers.items() if not k.startswith("ent:")]
    assert profile.count == 1 and profile.c24h == 1.0 and len(profile.recent) == 1, "counted once"
    assert not restored.state.receipts["t1"].counted, "what the history gave it is forgotten once taken back"
    later = restored.on_records([tx_record(sale("t2", amount=30, card="card-A", at_s=60), 3)], NOW)
    assert scored(later)["t2"]["indicators"]["velocity"] == 2.0, "the next sale sees one earlier sale, not two"


def test_a_transaction_failing_in_its_state_update_is_decided_when_re_driven_and_a_redelivery_is_not():
    core = make_core(face_deadline_ms=0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t1", amount=30), 1)], NOW))
    real = core.scorer.by_store

    def by_store(state, env):  # fails after the receipt took the id
        if env[0]["transaction_id"] == "r1":
            raise ZeroDivisionError("division by zero")
        return real(state, env)

    core.scorer.by_store = by_store  # type: ignore[method-assign]
    step = core.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 2)], NOW)
    persist(maps, step)
    assert kinds(step.outputs) == ["internal_error"]
    assert_persisted_equals_memory(maps, core)
    core.scorer.by_store = real  # type: ignore[method-assign]
    again = core.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 3)], NOW)
    assert list(scored(again)) == ["r1"]
    core.scorer.by_store = by_store  # type: ignore[method-assign]
    redelivered = core.on_records([tx_record(return_of("r1", "t1", at_s=60, amount=30), 4)], NOW)
    assert not redelivered.outputs and core.state.receipts["t1"].holds("r1"), "a decided one stays decided"


def test_a_late_face_that_fails_dead_letters_the_face_leaves_the_sale_decided_and_its_re_drive_alerts_once():
    """A face coming after its sale was decided without it, whose late result raises: the face observation is the
    dead letter (its re-drive raises the late alert, once), and the decided sale's receipt still counts it as
    processed, so a copy of the sale (a replay) is not decided a second time."""
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    maps: dict[str, dict] = {}
    persist(maps, core.on_records([tx_record(sale("t1"), 1)], NOW))
    decided = core.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    persist(maps, decided)
    assert list(scored(decided)) == ["t1"]
    real = core.scorer.late_face

    def late_face(env, face, camera):
        raise ZeroDivisionError("division by zero")

    core.scorer.late_face = late_face  # type: ignore[method-assign]
    face = face_record("t1", embedding=SUSPECT_FACE)
    step = core.on_records([face], NOW + DEADLINE + 1_000)
    persist(maps, step)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "internal_error" and dl["payload"] == face.value
    assert (dl["partition"], dl["offset"]) == (face.partition, face.offset), "the face observation, re-drivable"
    assert core.state.receipts["t1"].holds("t1"), "the sale stays decided"
    assert_persisted_equals_memory(maps, core)
    core.scorer.late_face = real  # type: ignore[method-assign]
    copy = core.on_records([tx_record(sale("t1"), 5)], NOW + DEADLINE + 2_000)
    assert not scored(copy) and not copy.outputs, "a copy of the decided sale is not decided again"
    redriven = core.on_records([face], NOW + DEADLINE + 3_000)
    assert len(alerts(redriven)) == 1 and not scored(redriven)
    again = core.on_records([face], NOW + DEADLINE + 4_000)
    assert alerts(again) == [], "the late alert is raised once"


def test_a_failed_decisions_dead_letter_is_its_record_as_sent_and_its_re_drive_is_decided_once():
    """The letter is the record as it was on the topic (the fields the job normalizes too), at its partition and
    offset with its key, so ``redrive`` sends it back; the copy is decided once, a second copy dropped."""
    predictor = FailsFor("t2")
    core = make_core(predictor=predictor, face_deadline_ms=0)
    sent = sale("t2", card=" card-B ", customer_email=" Mule@Example.COM", ip_address="unknown, [2001:db8::9]:443 ")
    record = SourceRecord(b"store-001/lane-01", sent.encode(), TX, 2, 41, NOW)
    step = core.on_records([record], NOW)
    [raw] = [value for topic, _, value in step.outputs if topic == DLQ]
    letter = DeadLetter.decode(raw)
    assert (letter.dead_letter_id, letter.error_kind) == (f"{TX}:decision:t2", "internal_error")
    assert (letter.source_topic, letter.partition, letter.offset, letter.key) == (TX, 2, 41, record.key)
    assert letter.payload == record.value, "every field as sent, not as the job normalized it"
    plan = plan_redrive([letter], Selection(stages=frozenset({"scoring-job"})), {TX: 3}, transactions=TX)
    [send] = plan.sends
    assert (send.topic, send.partition, send.key, send.payload) == (TX, 2, record.key, record.value)
    predictor.bad_tx = "none"  # the cause is fixed
    again = core.on_records([SourceRecord(send.key, send.payload, send.topic, 2, 90, NOW)], NOW)
    assert list(scored(again)) == ["t2"] and not dead_letters(again.outputs)
    twice = core.on_records([SourceRecord(send.key, send.payload, send.topic, 2, 91, NOW)], NOW)
    assert not twice.outputs, "a second re-drive is a redelivered copy"


@pytest.mark.parametrize("layout", ["single", "partitioned"])
@pytest.mark.parametrize("event_time", [0, -1, NOW + 10 * 365 * 86_400_000, 2**63 - 1, -(2**63)])
def test_a_suspect_seen_at_the_entrance_at_an_impossible_time_is_dead_lettered_not_alerted(layout, event_time):
    """As a transaction so dated is: taken, its alert carried the time on, and the alert sender and the sink each
    dead-lettered the alert (which a re-drive could never fix), not the observation that was wrong."""
    record = face_record(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:x:7")
    obs = codec("FaceObservation").decode(record.value)
    record = record._replace(value=codec("FaceObservation").encode({**obs, "event_time": event_time}))
    if layout == "single":
        core = make_core(Watchlist(settings()))
        core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
        outputs = core.on_records([record], NOW).outputs
    else:
        s = partitioned.settings()
        watchlist = Watchlist(s)
        watchlist.upsert(codec("WatchlistEntry").decode(watch_entry("subj-9", SUSPECT_FACE)))
        part = PartitionedCore(s, 2, predictor=partitioned.FeaturePredictor(), watchlist=watchlist, clock=clock)
        outputs = part.on_records([record], NOW)
    assert kinds(outputs) == ["invalid_timestamp"]
    assert [row for row in outputs if row[0] != DLQ] == []
