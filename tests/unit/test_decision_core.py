"""Every decision of the scoring job, through :class:`DecisionCore`, without Flink.

The Flink operator (``jobs/flink/operator.py``) only moves what these calls return: outputs to
Kafka, state writes to MapState, the timer to Flink's timer service.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from infra.settings import JobSettings, Settings
from jobs.scoring.claims import CLAIMS
from jobs.scoring.core import LEGACY_BATCH, ControlUpdate, DecisionCore, SourceRecord, Step
from jobs.scoring.face_join import DECIDED, EARLY_FACES, PENDING, matched_observation, unavailable
from jobs.scoring.rules import DEFAULT_RULESET, FaceResult, ModelResult, RuleSet, update_record
from jobs.scoring.scorer import CUSTOMERS, RECEIPTS, STORES, Predictor, Scorer
from jobs.scoring.watchlist import Watchlist
from schemas.codec import codec
from schemas.records import MAX_DEAD_LETTER_PAYLOAD, PosTransaction, WatchlistEntry
from schemas.topics import ALERTS, DEAD_LETTERS, FACE_OBSERVATIONS, RULES, SCORED_TRANSACTIONS, TRANSACTIONS, WATCHLIST
from tests.builders import T0, checkout_face, face_vector, return_of, sale

PREFIX = "cg."
TX, FACES = TRANSACTIONS.full_name(PREFIX), FACE_OBSERVATIONS.full_name(PREFIX)
RULES_TOPIC, WATCH_TOPIC = RULES.full_name(PREFIX), WATCHLIST.full_name(PREFIX)
SCORED, ALERT_TOPIC, DLQ = (t.full_name(PREFIX) for t in (SCORED_TRANSACTIONS, ALERTS, DEAD_LETTERS))
NOW = T0 + 3_600_000
"""Processing time of the tests: an hour after the transactions' event time."""
DEADLINE = 4000
RULESET_FILE = DEFAULT_RULESET

rng = np.random.default_rng(11)
SUSPECT_FACE = face_vector(rng)  # the configured embedder's length, exact in Avro floats
BUYER_FACE = face_vector(rng)


def settings(**job) -> Settings:
    base = Settings()
    return base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update={"topic_prefix": PREFIX}),
            "job": base.job.model_copy(update={"bootstrap_control": False, "face_deadline_ms": DEADLINE, **job}),
        }
    )


def clock() -> float:
    return NOW / 1000


def make_core(watchlist: Watchlist | None = None, predictor=None, **job) -> DecisionCore:
    s = settings(**job)
    return DecisionCore(
        s, predictor=predictor, watchlist=watchlist if watchlist is not None else Watchlist(s), clock=clock
    )


def tx_record(tx, offset: int = 0, ingest_ms: int = NOW) -> SourceRecord:
    return SourceRecord(tx.transaction_id.encode(), tx.encode(), TX, 0, offset, ingest_ms)


def face_record(
    tx_id: str | None,
    status: str = "NO_MATCH",
    embedding=None,
    trigger: str = "CHECKOUT",
    offset: int = 0,
    observation_id: str | None = None,
) -> SourceRecord:
    obs = checkout_face(tx_id, status=status, embedding=embedding, trigger=trigger, observation_id=observation_id)
    return SourceRecord(b"Q2MV-store-001-lane-01", obs.encode(), FACES, 1, offset, NOW)


def watch_entry(subject: str, embedding, category: str = "SUSPECT", expires_at: int | None = None) -> bytes:
    return WatchlistEntry(
        subject_id=subject,
        category=category,
        embeddings=[embedding],
        reason="test",
        flagged_by="lp@example.com",
        flagged_at=T0,
        expires_at=expires_at,
    ).encode()


def rules_update(version: str) -> bytes:
    text = re.sub(r"^version: .*$", f'version: "{version}"', RULESET_FILE.read_text(), count=1, flags=re.M)
    return update_record(RuleSet.from_yaml(text), text, "tester", published_at=T0).encode()


def scored(step: Step) -> dict[str, dict]:
    return {k.decode(): codec("ScoredTransaction").decode(v) for t, k, v in step.outputs if t == SCORED}


def alerts(step: Step) -> list[dict]:
    return [codec("Alert").decode(v) for t, _, v in step.outputs if t == ALERT_TOPIC]


def dead_letters(step_outputs) -> list[dict]:
    return [codec("DeadLetter").decode(v) for t, _, v in step_outputs if t == DLQ]


class FakePredictor(Predictor):
    """Scores every transaction 100 and records the size of each model call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def predict_batch(self, items):
        self.calls.append([tx["transaction_id"] for tx, _ in items])
        return [ModelResult(score=100, version="fake-1") for _ in items]


# --- transactions and faces ----------------------------------------------------------------------


def test_sale_is_approved_at_once_when_the_face_stage_is_off():
    core = make_core(face_deadline_ms=0)
    step = core.on_records([tx_record(sale("t1"))], NOW)
    [(topic, key, _)] = step.outputs
    assert (topic, key) == (SCORED, b"t1")
    out = scored(step)["t1"]
    assert out["outcome"] == "APPROVE" and out["face_status"] == "UNAVAILABLE"
    assert out["decided_at"] == NOW and out["rules_version"] == core.rule_set.version
    assert step.timer is None
    assert PENDING not in step.writes and set(step.writes) == {RECEIPTS, STORES, CUSTOMERS, CLAIMS}


def test_sale_waits_for_its_face_and_is_approved_when_the_observation_arrives():
    core = make_core()
    step = core.on_records([tx_record(sale("t1"))], NOW)
    assert step.outputs == []
    assert step.timer == NOW + DEADLINE
    [(key, (env, deadline))] = step.writes[PENDING].items()
    assert key == "t1" and env[0]["transaction_id"] == "t1" and deadline == NOW + DEADLINE

    step = core.on_records([face_record("t1", "NO_MATCH", BUYER_FACE)], NOW + 500)
    out = scored(step)["t1"]
    assert out["outcome"] == "APPROVE" and out["face_status"] == "NO_MATCH"
    assert step.writes[PENDING] == {"t1": None}
    assert step.writes[RECEIPTS]["t1"].sale_face == tuple(BUYER_FACE)  # the buyer's face, for returns
    assert step.timer is None


def test_sale_without_its_face_goes_ahead_with_face_unavailable_at_the_deadline():
    core = make_core()
    step = core.on_records([tx_record(sale("t1"))], NOW)
    assert core.on_timer(NOW + 1000, NOW + 1000) == Step([], {}, None)  # a stale timer: nothing due
    step = core.on_timer(step.timer, NOW + DEADLINE)
    out = scored(step)["t1"]
    assert out["face_status"] == "UNAVAILABLE" and out["outcome"] == "APPROVE"
    assert step.writes.keys() == {PENDING, DECIDED} and step.writes[PENDING] == {"t1": None}
    assert step.writes[DECIDED]["t1"][1] == NOW + DEADLINE + Settings().job.early_face_ttl_ms  # kept for a late face
    assert step.timer == step.writes[DECIDED]["t1"][1]  # and forgotten then, traffic or not
    assert core.join.pending == {}


def test_only_an_earlier_deadline_asks_for_a_new_timer():
    core = make_core()
    assert core.on_records([tx_record(sale("t1"))], NOW).timer == NOW + DEADLINE
    assert core.on_records([tx_record(sale("t2", card="card-B"))], NOW + 100).timer is None  # t1's timer comes first
    step = core.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    assert list(scored(step)) == ["t1"]
    assert step.timer == NOW + 100 + DEADLINE  # t2's deadline, now the earliest


def test_observation_before_its_transaction_is_kept_and_joined_when_the_transaction_comes():
    core = make_core()
    step = core.on_records([face_record("t1", "NO_FACE")], NOW)
    assert step.outputs == [] and step.timer == NOW + Settings().job.early_face_ttl_ms  # when it is forgotten
    [(key, seen)] = step.writes[EARLY_FACES].items()
    assert key == "t1" and seen.face.status == "NO_FACE" and seen.arrived_ms == NOW

    step = core.on_records([tx_record(sale("t1"))], NOW + 10)
    assert scored(step)["t1"]["face_status"] == "NO_FACE"
    assert step.writes[EARLY_FACES] == {"t1": None}
    assert PENDING not in step.writes and step.timer is None


def test_early_face_without_its_transaction_expires_at_a_timer():
    core = make_core(early_face_ttl_ms=60_000)
    core.on_records([face_record("t1")], NOW)
    core.on_records([tx_record(sale("t2"))], NOW)
    step = core.on_timer(NOW + DEADLINE, NOW + 60_000)
    assert list(scored(step)) == ["t2"]
    assert step.writes[PENDING] == {"t2": None} and step.writes[EARLY_FACES] == {"t1": None}


def test_duplicate_transaction_is_dropped():
    core = make_core(face_deadline_ms=0)
    first = core.on_records([tx_record(sale("t1"), 1)], NOW)
    again = core.on_records([tx_record(sale("t1"), 2)], NOW)
    assert list(scored(first)) == ["t1"]
    assert again == Step([], {}, None)


def test_transactions_released_together_are_decided_in_model_calls_of_batch_size():
    predictor = FakePredictor()
    core = make_core(predictor=predictor, face_deadline_ms=0, batch_size=2)
    step = core.on_records([tx_record(sale(f"t{i}", card=f"card-{i}"), i) for i in range(3)], NOW)
    assert predictor.calls == [["t0", "t1"], ["t2"]]
    assert [k for _, k, _ in step.outputs] == [b"t0", b"t1", b"t2"]
    assert {out["model_version"] for out in scored(step).values()} == {"fake-1"}


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\x00garbage", "not_avro"),
        (b"x" * (Settings().job.max_message_bytes + 1), "oversized"),
        (sale("t1").encode().replace(b"USD", b"usd"), "invalid_currency"),
    ],
)
def test_unusable_transaction_becomes_a_dead_letter_with_its_kind_and_stage(data, kind):
    core = make_core()
    step = core.on_records([SourceRecord(b"k", data, TX, 2, 17, NOW)], NOW)
    [(topic, key, _)] = step.outputs
    assert (topic, key) == (DLQ, b"cg.transactions:2:17")
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == kind and dl["stage"] == "scoring-job"
    assert dl["payload"] == data[:MAX_DEAD_LETTER_PAYLOAD] and dl["payload_size"] == len(data)
    assert dl["payload_truncated"] == (len(data) > MAX_DEAD_LETTER_PAYLOAD)
    assert dl["key"] == b"k" and dl["failed_at"] == NOW
    assert step.writes == {} and step.timer is None


def test_transaction_older_than_the_state_keeps_is_dead_lettered_too_late():
    core = make_core(face_deadline_ms=0)
    later = T0 + 201 * 86_400_000
    assert core.on_records([tx_record(sale("new", at_s=200 * 86_400), 1, later)], later).outputs[0][0] == SCORED
    step = core.on_records([tx_record(sale("old", card="card-B"), 2, later)], later)
    [dl] = dead_letters(step.outputs)
    assert len(step.outputs) == 1
    assert (dl["dead_letter_id"], dl["error_kind"], dl["stage"]) == ("cg.transactions:0:2", "too_late", "scoring-job")
    assert "state horizon" in dl["reason"]
    assert step.writes == {}


def test_undecodable_face_observation_is_dead_lettered():
    core = make_core()
    step = core.on_records([SourceRecord(b"cam", b"junk", FACES, 1, 5, NOW)], NOW)
    [dl] = dead_letters(step.outputs)
    assert (dl["dead_letter_id"], dl["source_topic"]) == ("cg.face_observations:1:5", FACES)
    assert dl["error_kind"] == "not_avro"
    assert dl["reason"].startswith("face observation: ") and dl["stage"] == "scoring-job"
    assert dl["payload"] == b"junk"


def test_bad_record_does_not_stop_the_rest_of_its_batch():
    core = make_core(face_deadline_ms=0)
    step = core.on_records([SourceRecord(None, b"bad", TX, 0, 1, NOW), tx_record(sale("t1"), 2)], NOW)
    assert [(t, k) for t, k, _ in step.outputs] == [(DLQ, b"cg.transactions:0:1"), (SCORED, b"t1")]


# --- watchlist -------------------------------------------------------------------------------------


def test_suspect_at_the_entrance_raises_suspect_entered():
    watchlist = Watchlist(settings())
    core = make_core(watchlist)
    assert core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0).outputs == []
    step = core.on_records(
        [
            face_record(
                None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:Q2MV-store-001-ENTRANCE:7"
            )
        ],
        NOW,
    )
    [alert] = alerts(step)
    assert alert["kind"] == "SUSPECT_ENTERED" and alert["subject_id"] == "subj-9"
    assert alert["alert_id"] == "watchlist:entrance:Q2MV-store-001-ENTRANCE:7:subj-9"
    assert step.writes == {} and step.timer is None


def test_a_suspect_at_the_entrance_during_a_warm_up_raises_nothing():
    """A warm-up replays history: an old entrance says nothing about who is in the store now."""
    entrance = face_record(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:x:3")
    for decide_from, expected in ((T0 + 1, 0), (T0, 1)):  # the observation is at T0
        watchlist = Watchlist(settings())
        core = make_core(watchlist, decide_from=decide_from)
        core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
        assert len(alerts(core.on_records([entrance], NOW))) == expected


def test_a_batch_decided_again_one_by_one_counts_each_decision_once():
    """A bad model result for one transaction makes the batch be decided again one by one; the decisions of the
    first try were counted as well (APPROVE: 2 for one scored transaction)."""

    class OneBadScore(Predictor):
        def predict_batch(self, items):
            return [ModelResult(score="bad" if tx["transaction_id"] == "t2" else 1, version="x") for tx, _ in items]

    core = make_core(face_deadline_ms=0, predictor=OneBadScore())
    step = core.on_records([tx_record(sale("t1"), 0), tx_record(sale("t2"), 1)], NOW)
    assert set(scored(step)) == {"t1"} and len(dead_letters(step.outputs)) == 1
    assert sum(core.stats.outcomes.values()) == 1


def test_a_batch_decided_again_one_by_one_observes_drift_once_and_keeps_its_reports():
    """The drift monitor saw the failed try's transactions too (t1 counted twice), and the reports drained in that
    try were thrown away with its rows (an hourly model_drift record and its alert lost)."""
    events: list[str] = []

    class Recording(Predictor):
        def predict_batch(self, items):
            events.append("predict " + " ".join(tx["transaction_id"] for tx, _ in items))
            return [ModelResult(score="bad" if tx["transaction_id"] == "t2" else 1, version="x") for tx, _ in items]

        def settle(self):
            events.append("settle")

        def drain_reports(self):
            events.append("drain")
            return []

    core = make_core(face_deadline_ms=0, predictor=Recording())
    core.on_records([tx_record(sale("t1"), 0), tx_record(sale("t2"), 1)], NOW)
    assert events == ["predict t1 t2", "predict t1", "settle", "drain", "predict t2"]


def test_a_warm_up_time_in_seconds_is_refused_rather_than_read_as_1970():
    assert JobSettings(decide_from=1_764_547_200_000).decide_from == 1_764_547_200_000  # 2025-12-01, in ms
    assert JobSettings().decide_from == 0
    with pytest.raises(ValidationError, match="epoch milliseconds"):
        JobSettings(decide_from=1_764_547_200)  # the same time in seconds


def test_entrance_observation_is_never_joined_to_a_transaction():
    core = make_core()
    core.on_records([tx_record(sale("t1"))], NOW)
    step = core.on_records(
        [face_record("t1", embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:x:2")], NOW + 10
    )
    assert step == Step([], {}, None)
    assert set(core.join.pending) == {"t1"} and core.join.early == {}


def test_entrance_face_of_nobody_on_the_watchlist_raises_nothing():
    core = make_core()
    step = core.on_records(
        [face_record(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:x:1")], NOW
    )
    assert step == Step([], {}, None)


def test_suspect_at_checkout_is_matched_and_sent_for_review_with_a_watchlist_alert_not_blocked():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=SUSPECT_FACE)], NOW)
    out = scored(step)["t1"]
    assert (out["face_status"], out["face_subject_id"], out["outcome"]) == ("MATCHED", "subj-9", "REVIEW")
    assert {a["kind"] for a in alerts(step)} == {"WATCHLIST_MATCH"}


def rekognition_face(
    tx_id: str | None, status: str = "MATCHED", subject: str | None = "subj-9", **extra
) -> SourceRecord:
    """A face the stage searched in Rekognition (the Rekognition backend): its own embedding matches nobody here."""
    obs = dataclasses.replace(
        checkout_face(tx_id or "t-none", embedding=BUYER_FACE),
        transaction_id=tx_id,
        status=status,
        matcher="rekognition",
        subject_id=subject if status == "MATCHED" else None,
        similarity=99.62 if status == "MATCHED" else None,
        **extra,
    )
    return SourceRecord(b"Q2MV-store-001-lane-01", obs.encode(), FACES, 1, 0, NOW)


def test_a_rekognition_match_reported_by_the_face_stage_is_the_decisions_match_with_its_similarity_and_engine():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records([tx_record(sale("t1")), rekognition_face("t1")], NOW)
    out = scored(step)["t1"]
    assert (out["face_status"], out["face_subject_id"], out["face_category"]) == ("MATCHED", "subj-9", "SUSPECT")
    assert (out["face_similarity"], out["face_matcher"], out["outcome"]) == (99.62, "rekognition", "REVIEW")
    [alert] = alerts(step)
    assert (alert["kind"], alert["subject_id"], alert["similarity"]) == ("WATCHLIST_MATCH", "subj-9", 99.62)
    assert alert["matcher"] == "rekognition" and alert["summary"].endswith("similarity 99.6 (Rekognition)")


def test_a_matched_observation_no_matcher_made_is_a_dead_letter_not_an_alert_naming_nobody():
    """No face stage writes ``MATCHED`` without ``matcher: rekognition`` (the job matches the others itself). Such a
    record was taken as a match of nobody: a decision MATCHED to no subject and a "VIP None ..., similarity 0.0"
    alert to security."""
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    forged = dataclasses.replace(
        checkout_face("t1", embedding=BUYER_FACE), status="MATCHED", subject_id="subj-9", similarity=99.0
    )
    step = core.on_records([SourceRecord(b"Q2MV-store-001-lane-01", forged.encode(), FACES, 1, 0, NOW)], NOW)
    [dl] = dead_letters(step.outputs)
    assert dl["error_kind"] == "invalid_field" and "matcher" in dl["reason"]
    assert alerts(step) == []


def test_a_local_match_says_the_local_engine_matched():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=SUSPECT_FACE)], NOW)
    assert scored(step)["t1"]["face_matcher"] == "local"
    [alert] = alerts(step)
    assert alert["matcher"] == "local" and "(Rekognition)" not in alert["summary"]


def test_the_alerts_of_a_match_give_the_threshold_it_was_taken_at_on_its_engines_scale():
    """Security weighs a similarity against the threshold the engine took the face at (68.8 is a clear local match,
    99.1 a bare Rekognition one); the alerts gave the similarity alone. Alert v6 carries the threshold."""
    faces = settings().faces
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    checkout = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=SUSPECT_FACE)], NOW)
    entrance = face_record(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:cam:7:2")
    rekognition = core.on_records([tx_record(sale("t2")), rekognition_face("t2")], NOW)
    found = [(a["kind"], a["matcher"], a["match_threshold"]) for a in alerts(checkout) + alerts(rekognition)]
    found += [(a["kind"], a["matcher"], a["match_threshold"]) for a in alerts(core.on_records([entrance], NOW))]
    assert found == [
        ("WATCHLIST_MATCH", "local", faces.match_threshold),
        ("WATCHLIST_MATCH", "rekognition", faces.rekognition_match_threshold),
        ("SUSPECT_ENTERED", "local", faces.match_threshold),
    ]


def test_the_alerts_of_a_match_name_the_face_observation_it_was_made_on_with_or_without_a_stored_snapshot():
    """A sighting whose snapshot could not be stored has no image ref, so its alert no ``snapshot_ref``, and an
    entrance or a lane's live view no transaction: nothing named the observation the job matched, and a forget of its
    subject left it indexed until its retention. Alert v6 names it (``observation_id``); a face of no match, none."""
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    checkout = core.on_records([tx_record(sale("t1")), face_record("t1", embedding=SUSPECT_FACE)], NOW)
    entrance = checkout_face(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:cam:7:2")
    at_entrance = core.on_records([_face(dataclasses.replace(entrance, image_ref=None), 1)], NOW)
    core.on_records([tx_record(sale("t2", card="c2"), 2)], NOW)
    lane_view = dataclasses.replace(checkout_face("t2", embedding=SUSPECT_FACE), snapshot_of_now=True, image_ref=None)
    at_lane = core.on_records([_face(lane_view, 2)], NOW + 100)
    steps = (checkout, at_entrance, at_lane)
    found = [(a["kind"], a["observation_id"], a["snapshot_ref"]) for step in steps for a in alerts(step)]
    assert found == [
        ("WATCHLIST_MATCH", "checkout:t1", "checkout/t1.jpg"),
        ("SUSPECT_ENTERED", "entrance:cam:7:2", None),
        ("SUSPECT_AT_LANE", "checkout:t2", None),
    ]
    # a face the deadline replaced holds its reason where an observation id goes: never taken for one
    assert matched_observation(FaceResult("UNAVAILABLE"), unavailable("face-deadline", NOW)) is None


def _face(obs, offset: int) -> SourceRecord:
    return SourceRecord(b"Q2MV-store-001-lane-01", obs.encode(), FACES, 1, offset, NOW)


def test_a_rekognition_match_of_a_subject_the_watchlist_no_longer_holds_is_no_match():
    core = make_core()  # subj-9 forgotten (or never enrolled): its collection face outlived the entry
    step = core.on_records([tx_record(sale("t1")), rekognition_face("t1")], NOW)
    out = scored(step)["t1"]
    assert (out["face_status"], out["face_subject_id"], out["face_matcher"], out["outcome"]) == (
        "NO_MATCH",
        None,
        None,
        "APPROVE",
    )
    assert alerts(step) == []


def test_a_rekognition_no_match_is_not_searched_again_by_the_job():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-t1", watch_entry("subj-t1", BUYER_FACE), 0, 0)  # the local search would match
    step = core.on_records([tx_record(sale("t1")), rekognition_face("t1", "NO_MATCH")], NOW)
    assert scored(step)["t1"]["face_status"] == "NO_MATCH" and alerts(step) == []


def test_a_failed_rekognition_search_is_unavailable_but_the_buyers_face_is_kept():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-t1", watch_entry("subj-t1", BUYER_FACE), 0, 0)
    failed = rekognition_face("t1", "UNAVAILABLE", reason="Rekognition search failed: ThrottlingException")
    step = core.on_records([tx_record(sale("t1")), failed], NOW)
    assert scored(step)["t1"]["face_status"] == "UNAVAILABLE" and alerts(step) == []
    [receipt] = core.state.receipts.values()
    assert receipt.sale_face is not None  # a return is still compared with the buyer's face


def test_a_rekognition_match_at_an_entrance_raises_the_entrance_alert():
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    step = core.on_records([rekognition_face(None, trigger="ENTRANCE", observation_id="entrance:cam:7:1")], NOW)
    [alert] = alerts(step)
    assert (alert["kind"], alert["subject_id"], alert["matcher"]) == ("SUSPECT_ENTERED", "subj-9", "rekognition")


def test_an_entry_expired_at_the_sales_time_matches_nobody_though_the_service_has_not_tombstoned_it():
    """Expiry was the watchlist service's tombstone alone: while that service was down, a lapsed listing still
    matched buyers and raised alerts. The job now checks ``expires_at`` at the face's event time (the sale's), not
    when it decides: an entry that lapsed after the sale (subj-8) still matches it."""
    core = make_core()
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE, expires_at=T0), 0, 0)
    core.on_control(WATCH_TOPIC, b"subj-8", watch_entry("subj-8", BUYER_FACE, "VIP", expires_at=T0 + 1), 0, 0)
    step = core.on_records(
        [
            tx_record(sale("t1")),
            face_record("t1", embedding=SUSPECT_FACE),
            tx_record(sale("t2", card="card-B"), 1),
            rekognition_face("t2"),
            tx_record(sale("t3", card="card-C"), 2),
            face_record("t3", embedding=BUYER_FACE, offset=1),
            face_record(None, embedding=SUSPECT_FACE, trigger="ENTRANCE", observation_id="entrance:x:1", offset=2),
        ],
        NOW,
    )
    out = scored(step)
    for tx_id in ("t1", "t2"):
        assert (out[tx_id]["face_status"], out[tx_id]["face_subject_id"], out[tx_id]["outcome"]) == (
            "NO_MATCH",
            None,
            "APPROVE",
        )
    assert (out["t3"]["face_status"], out["t3"]["face_subject_id"]) == ("MATCHED", "subj-8")
    assert [a["subject_id"] for a in alerts(step)] == ["subj-8"]
    assert "subj-9" in core.watchlist  # the tombstone still removes it (and its buyer faces)


def test_watchlist_tombstone_forgets_the_subject_and_the_buyer_face_on_that_receipt():
    watchlist = Watchlist(settings())
    core = make_core(watchlist)
    core.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], NOW)
    assert core.state.receipts["t1"].sale_face == tuple(BUYER_FACE)
    core.on_control(WATCH_TOPIC, b"subj-t1", watch_entry("subj-t1", BUYER_FACE), 0, 1)
    assert "subj-t1" in watchlist

    control = core.on_control(WATCH_TOPIC, b"subj-t1", None, 0, 2)
    assert control == ([], ControlUpdate("wl:subj-t1", None))
    assert "subj-t1" not in watchlist
    step = core.on_records([], NOW + 1000)  # keyed state changes at the next keyed call
    [(key, receipt)] = step.writes[RECEIPTS].items()
    assert key == "t1" and receipt.sale_face is None
    assert core.state.receipts["t1"].sale_face is None


def test_a_forget_drops_the_subjects_faces_matched_at_later_sales_and_keeps_other_buyers_faces():
    """subj-t1 enrolled from sale t1, then seen buying t2 (matched) beside a stranger's sale t3: before, the forget
    dropped the face on t1 only, and t2's kept the forgotten person's face until the 72 h face retention."""
    watchlist = Watchlist(settings())
    core = make_core(watchlist)
    core.on_records([tx_record(sale("t1")), face_record("t1", embedding=BUYER_FACE)], NOW)
    core.on_control(WATCH_TOPIC, b"subj-t1", watch_entry("subj-t1", BUYER_FACE), 0, 1)
    later = [tx_record(sale("t2", at_s=60, card="card-B")), face_record("t2", embedding=BUYER_FACE)]
    stranger = [tx_record(sale("t3", at_s=90, card="card-C")), face_record("t3", embedding=SUSPECT_FACE)]
    core.on_records([*later, *stranger], NOW + 500)
    assert core.state.receipts["t2"].sale_face == tuple(BUYER_FACE)

    core.on_control(WATCH_TOPIC, b"subj-t1", None, 0, 2)
    step = core.on_records([], NOW + 1000)
    assert {key for key, r in step.writes[RECEIPTS].items() if r.sale_face is None} == {"t1", "t2"}
    assert core.state.receipts["t2"].sale_face is None and core.state.receipts["t1"].sale_face is None
    assert core.state.receipts["t3"].sale_face == tuple(SUSPECT_FACE)


def test_watchlist_entry_is_kept_in_broadcast_state_for_restores():
    core = make_core()
    control = core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    assert control.outputs == []
    assert control.update.key == "wl:subj-9" and control.update.value["subject_id"] == "subj-9"


# --- rules -------------------------------------------------------------------------------------------


def test_rules_update_applies_to_the_next_decision():
    core = make_core(face_deadline_ms=0)
    started_with = core.rule_set.version
    before = scored(core.on_records([tx_record(sale("t1"))], NOW))["t1"]["rules_version"]
    control = core.on_control(RULES_TOPIC, b"active", rules_update("2099.1"), 0, 3)
    assert control.outputs == [] and control.update.key == "rules" and control.update.value["version"] == "2099.1"
    after = scored(core.on_records([tx_record(sale("t2", card="card-B"))], NOW))["t2"]["rules_version"]
    assert before == started_with != "2099.1"
    assert after == "2099.1"


def test_bad_rules_update_is_dead_lettered_as_invalid_update_and_the_old_rules_stay():
    core = make_core()
    version = core.rule_set.version
    bad = rules_update("2099.1").replace(b"block_at: 85", b"block_at: lots")
    control = core.on_control(RULES_TOPIC, b"active", bad, 0, 4)
    assert control.update is None
    [dl] = dead_letters(control.outputs)
    assert (dl["dead_letter_id"], dl["error_kind"], dl["stage"]) == ("cg.rules:0:4", "invalid_update", "scoring-job")
    assert dl["payload"] == bad and dl["key"] == b"active"
    assert core.rule_set.version == version


def test_a_refused_rules_update_is_described_without_quoting_the_record(caplog):
    core = make_core()
    update = codec("RuleSetUpdate").decode(rules_update("2099.1"))
    update["yaml"] = update["yaml"].replace("block_at: 85", 'block_at: "secret-value-7')  # the YAML error quotes it
    bad = codec("RuleSetUpdate").encode(update)
    control = core.on_control(RULES_TOPIC, b"active", bad, 0, 4)
    [dl] = dead_letters(control.outputs)
    assert dl["error_kind"] == "invalid_update" and dl["reason"].startswith("RuleSetError in from_yaml (rules.py:")
    assert "secret-value-7" not in dl["reason"] and "secret-value-7" not in caplog.text
    assert "RuleSetError" in caplog.text


def test_rules_tombstone_is_ignored():
    core = make_core()
    assert core.on_control(RULES_TOPIC, b"active", None, 0, 5) == ([], None)


# --- start-up -------------------------------------------------------------------------------------


def test_control_topics_read_at_start_apply_before_the_first_decision_and_are_not_applied_twice():
    core = DecisionCore(settings(bootstrap_control=True, face_deadline_ms=0), watchlist=Watchlist(), clock=clock)

    def read(s, apply):
        apply(RULES_TOPIC, b"active", rules_update("2099.1"))
        apply(WATCH_TOPIC, b"subj-x", b"not avro")  # skipped here; the broadcast stream dead-letters it
        apply(RULES_TOPIC, b"active", rules_update("2099.2"))
        return {(RULES_TOPIC, 0): 1, (WATCH_TOPIC, 0): 0}

    assert core.bootstrap(read) == {(RULES_TOPIC, 0): 1, (WATCH_TOPIC, 0): 0}
    assert core.rule_set.version == "2099.2"
    # The broadcast stream replays the topic: what the start-up read applied is only kept.
    replay = core.on_control(RULES_TOPIC, b"active", rules_update("2099.1"), 0, 0)
    assert replay.update.value["version"] == "2099.1" and core.rule_set.version == "2099.2"
    assert (
        dead_letters(core.on_control(WATCH_TOPIC, b"subj-x", b"not avro", 0, 0).outputs)[0]["error_kind"]
        == "invalid_update"
    )
    core.on_control(RULES_TOPIC, b"active", rules_update("2099.3"), 0, 2)
    assert core.rule_set.version == "2099.3"
    # Read at start: the restored broadcast state is not applied over it.
    core.restore({}, {"rules": {"yaml": RULESET_FILE.read_text()}})
    assert scored(core.on_records([tx_record(sale("t1"))], NOW))["t1"]["rules_version"] == "2099.3"


def test_unreadable_control_topics_fall_back_to_the_restored_broadcast_state():
    core = DecisionCore(settings(bootstrap_control=True, face_deadline_ms=0), watchlist=Watchlist(), clock=clock)

    def read(s, apply):
        raise TimeoutError("no broker")

    assert core.bootstrap(read) is None
    update = core.on_control(RULES_TOPIC, b"active", rules_update("2099.5"), 0, 0).update
    fresh = DecisionCore(settings(bootstrap_control=True), watchlist=Watchlist(), clock=clock)
    fresh.bootstrap(read)
    fresh.restore(
        {}, {update.key: update.value, "wl:subj-9": codec("WatchlistEntry").decode(watch_entry("subj-9", SUSPECT_FACE))}
    )
    assert fresh.rule_set.version == "2099.5"
    assert "subj-9" in fresh.watchlist


def test_control_topics_are_not_read_when_bootstrap_is_off():
    core = make_core()

    def read(s, apply):
        raise AssertionError("read")

    assert core.bootstrap(read) is None


# --- restore and persisted state -------------------------------------------------------------------


def persist(maps: dict[str, dict], step: Step) -> None:
    """What the operator does with a step's writes (MapState put_all/remove), on dicts."""
    for name, changes in step.writes.items():
        for key, value in changes.items():
            if value is None:
                maps.setdefault(name, {}).pop(key, None)
            else:
                maps.setdefault(name, {})[key] = pickle.loads(pickle.dumps(value))  # as MapState keeps it


def test_restored_pending_transaction_is_decided_by_the_next_timer():
    maps: dict[str, dict] = {}
    first = make_core()
    persist(maps, first.on_records([tx_record(sale("t1"))], NOW))
    assert set(maps[PENDING]) == {"t1"}

    restarted = make_core()
    assert restarted.restore(maps, None) == NOW + DEADLINE  # the timer to register again
    step = restarted.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    assert scored(step)["t1"]["face_status"] == "UNAVAILABLE"
    assert step.writes[PENDING] == {"t1": None} and set(step.writes[DECIDED]) == {"t1"}


def test_restored_receipts_still_match_returns_and_drop_duplicates():
    maps: dict[str, dict] = {}
    first = make_core(face_deadline_ms=0)
    persist(maps, first.on_records([tx_record(sale("t1", store="store-A", amount=300))], NOW))

    restarted = make_core(face_deadline_ms=0)
    assert restarted.restore(maps) is None
    assert restarted.on_records([tx_record(sale("t1", store="store-A", amount=300))], NOW).outputs == []
    step = restarted.on_records(
        [tx_record(return_of("r1", "t1", at_s=600, store="store-B", card="card-Z", amount=300))], NOW
    )
    out = scored(step)["r1"]
    assert out["outcome"] == "BLOCK" and "cross_store_return" in out["reasons"]


def test_legacy_batch_entries_are_decided_at_the_first_call():
    env = Scorer(settings()).parse(sale("legacy-1").encode(), None, TX, 0, 9, NOW)
    core = make_core()
    assert core.restore({LEGACY_BATCH: {"legacy-1": (env, unavailable("restored", NOW))}}) is None
    step = core.on_records([], NOW)
    assert scored(step)["legacy-1"]["face_status"] == "UNAVAILABLE"
    assert step.writes == {LEGACY_BATCH: {"legacy-1": None}}
    assert core.on_records([], NOW) == Step([], {}, None)


def test_legacy_batch_entries_are_decided_by_a_timer_that_comes_first():
    env = Scorer(settings()).parse(sale("legacy-1").encode(), None, TX, 0, 9, NOW)
    core = make_core()
    core.restore({LEGACY_BATCH: {"legacy-1": (env, unavailable("restored", NOW))}})
    step = core.on_timer(NOW, NOW)
    assert list(scored(step)) == ["legacy-1"] and step.writes == {LEGACY_BATCH: {"legacy-1": None}}


def test_state_writes_returned_are_exactly_the_state_to_persist():
    watchlist = Watchlist(settings())
    core = make_core(watchlist, early_face_ttl_ms=60_000)
    maps: dict[str, dict] = {}
    steps = [
        core.on_records(
            [
                tx_record(sale("t1", store="store-A", amount=300), 1),
                face_record("t2", "NO_FACE", offset=1),
                tx_record(sale("t3", card="card-C"), 2),
                tx_record(sale("anon", card=None), 3),
            ],
            NOW,
        ),
        core.on_records(
            [
                face_record("t1", embedding=BUYER_FACE, offset=2),
                tx_record(sale("t2", card="card-B"), 4),
                tx_record(return_of("r1", "t1", at_s=60, store="store-B", card="card-Z", amount=300), 5),
            ],
            NOW + 100,
        ),
        core.on_timer(NOW + DEADLINE, NOW + DEADLINE + 1),
    ]
    core.on_control(WATCH_TOPIC, b"subj-t1", None, 0, 0)
    steps.append(core.on_records([], NOW + 70_000))
    steps.append(core.on_timer(NOW + 70_000, NOW + 70_000))
    for step in steps:
        persist(maps, step)

    def dump(d):
        """Entries by value (the dataclasses' field equality): pickled bytes would also differ in a set's
        iteration order, which depends on its history and the hash seed, not on the state."""
        return dict(d)

    state = core.state
    assert dump(maps.get(RECEIPTS, {})) == dump(state.receipts)
    assert dump(maps.get(STORES, {})) == dump(state.stores)
    assert dump(maps.get(CUSTOMERS, {})) == dump(state.customers)
    assert dump(maps.get(PENDING, {})) == dump(core.join.pending) == {}
    assert dump(maps.get(EARLY_FACES, {})) == dump(core.join.early) == {}
    assert set(maps[RECEIPTS]) == {"t1", "t2", "t3", "anon"} and maps[RECEIPTS]["t1"].sale_face is None
    assert "anon:" not in "".join(maps[CUSTOMERS])  # anonymous buyers keep no history

    # A core restored from what was persisted decides the next record as the running one does.
    restarted = make_core(Watchlist(settings()), early_face_ttl_ms=60_000)
    restarted.restore(maps)
    nxt = [tx_record(return_of("r2", "t3", at_s=120, card="card-C"), 6)]
    a, b = core.on_records(nxt, NOW + 80_000), restarted.on_records(nxt, NOW + 80_000)
    assert a.timer == b.timer == NOW + 80_000 + DEADLINE
    assert {k: dump(v) for k, v in a.writes.items()} == {k: dump(v) for k, v in b.writes.items()}


def test_decision_core_imports_no_flink():
    code = "import sys, jobs.scoring.core; sys.exit(any(m.split('.')[0] == 'pyflink' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2]).returncode == 0


def test_operator_writes_each_change_once_removals_first_then_one_put_all():
    pytest.importorskip("pyflink")
    from jobs.flink.operator import commit

    class FakeMapState:
        def __init__(self) -> None:
            self.calls: list = []

        def remove(self, key):
            self.calls.append(("remove", key))

        def put_all(self, entries):
            self.calls.append(("put_all", list(entries)))  # iterated as pairs (process mode)

    maps = {RECEIPTS: FakeMapState(), PENDING: FakeMapState(), STORES: FakeMapState()}
    commit(maps, {RECEIPTS: {"a": 1, "b": None, "c": 3}, PENDING: {"t1": None}})
    assert maps[RECEIPTS].calls == [("remove", "b"), ("put_all", [("a", 1), ("c", 3)])]
    assert maps[PENDING].calls == [("remove", "t1")]
    assert maps[STORES].calls == []


@pytest.mark.parametrize("value", ["earliest", "latest", " latest ", "1764547200000"])
def test_a_job_starts_from_earliest_latest_or_a_time_in_milliseconds(value: str) -> None:
    assert JobSettings(starting_offsets=value).starting_offsets == value.strip()


@pytest.mark.parametrize("value", ["abc", "Latest", "1764547200", "", "-1", "１７６４５４７２０００００", "9" * 400])
def test_any_other_start_is_refused_rather_than_read_as_earliest_or_1970(value: str) -> None:
    """A typo started the job from the earliest offsets; a time in seconds from January 1970."""
    with pytest.raises(ValidationError, match="earliest, latest or epoch milliseconds"):
        JobSettings(starting_offsets=value)


# --- a checkout picture of "now" ----------------------------------------------------------------


def _of_now(tx_id: str, embedding) -> SourceRecord:
    obs = dataclasses.replace(checkout_face(tx_id, embedding=embedding), snapshot_of_now=True)
    return SourceRecord(b"Q2MV-store-001-lane-01", obs.encode(), FACES, 1, 0, NOW)


def test_a_picture_of_now_is_not_the_buyers_face_but_a_suspect_in_it_is_a_sighting_at_the_lane():
    """No footage of the sale: whoever stood at the lane when the camera was asked is not the buyer."""
    watchlist = Watchlist(settings())
    core = make_core(watchlist)
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    core.on_records([tx_record(sale("t1"))], NOW)
    step = core.on_records([_of_now("t1", SUSPECT_FACE)], NOW + 100)
    assert scored(step)["t1"]["face_status"] == "UNAVAILABLE"  # released at once: no face for the sale
    [alert] = alerts(step)
    # its own kind: not "entered the store" (the entrance's), and not the buyer's WATCHLIST_MATCH
    assert alert["kind"] == "SUSPECT_AT_LANE" and alert["transaction_id"] is None and alert["amount"] is None
    assert alert["alert_id"] == "watchlist:checkout:t1:now:subj-9" and alert["lane_id"] == "lane-01"
    assert "lane_view_after_the_sale_not_its_buyer" in alert["reasons"] and "not its buyer" in alert["summary"]
    assert core.state.receipts["t1"].sale_face is None  # never compared with a later return


def test_a_picture_of_now_of_nobody_on_the_watchlist_raises_nothing_and_keeps_no_buyer_face():
    core = make_core()
    core.on_records([tx_record(sale("t1"))], NOW)
    step = core.on_records([_of_now("t1", BUYER_FACE)], NOW + 100)
    assert scored(step)["t1"]["face_status"] == "UNAVAILABLE" and alerts(step) == []
    assert core.state.receipts["t1"].sale_face is None


# --- a face after the deadline --------------------------------------------------------------------


def test_a_suspects_face_after_the_deadline_still_raises_the_watchlist_alert_marked_late():
    watchlist = Watchlist(settings())
    core = make_core(watchlist)
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)
    core.on_records([tx_record(sale("t1"))], NOW)
    decided = core.on_timer(NOW + DEADLINE, NOW + DEADLINE)
    assert scored(decided)["t1"]["face_status"] == "UNAVAILABLE" and alerts(decided) == []
    step = core.on_records([face_record("t1", embedding=SUSPECT_FACE)], NOW + 30_000)
    assert scored(step) == {}  # the decision stands
    [alert] = alerts(step)
    assert (alert["kind"], alert["transaction_id"], alert["subject_id"]) == ("WATCHLIST_MATCH", "t1", "subj-9")
    assert alert["alert_id"] == "watchlist:checkout:t1:subj-9"  # what an in-time match would have had
    assert "face_seen_after_the_sale_was_decided" in alert["reasons"] and "decided without a face" in alert["summary"]
    assert core.join.early == {} and core.stats.late_faces == {"matched": 1}
    assert core.state.receipts["t1"].sale_face is not None  # still the buyer's face for a later return


def test_a_late_face_through_the_local_camera_with_a_realistic_footage_delay(tmp_path):
    """The local camera stores footage ``local_no_video_ms`` after it was recorded; with more than the job's
    face deadline, the face stage's observation (footage of the sale, after No-video retries) comes after the
    decision, and the suspect in it is still alerted."""
    import socket
    import time

    from infra.clients.image_store import LocalImageStore
    from infra.clients.meraki import MerakiClient
    from infra.local.camera import LocalCameraServer
    from infra.settings import CameraSettings
    from jobs.faces.stage import FaceStage

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    footage_delay_ms, deadline_ms = 1500, 500
    cameras = CameraSettings(
        local_port=port,
        local_no_video_ms=footage_delay_ms,
        local_not_ready_polls=1,
        local_rate_limit_per_s=1000.0,
        poll_interval_s=0.02,
        no_video_backoff_s=0.25,
        no_video_max_tries=20,
        deadline_s=10.0,
    )
    s = settings(face_deadline_ms=deadline_ms).model_copy(update={"cameras": cameras})
    watchlist = Watchlist(s)
    core = DecisionCore(s, watchlist=watchlist, clock=clock)
    core.on_control(WATCH_TOPIC, b"subj-9", watch_entry("subj-9", SUSPECT_FACE), 0, 0)

    class SuspectAtTheLane:
        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            face = {"passed": True, "box": (0, 0, 10, 10), "quality": 0.9, "embedding": SUSPECT_FACE}
            return [type("Face", (), face)()]

    server = LocalCameraServer(s, publish=False, people={}).start()
    try:
        with MerakiClient.from_settings(s) as client:
            stage = FaceStage(s, client.snapshot, SuspectAtTheLane(), LocalImageStore(tmp_path / "images"))
            paid = int(time.time()) * 1000  # Meraki asks in whole seconds: footage of a later ms would come early
            tx = PosTransaction("t-cam", paid, "store-001", "lane-01", "SALE", 12.5, "USD")
            core.on_records([tx_record(tx, ingest_ms=paid)], paid)
            decided = core.on_timer(paid + deadline_ms, paid + deadline_ms)
            obs = stage.observe(stage.plan_transaction(tx.encode(), paid)[0])
    finally:
        server.stop()
    assert scored(decided)["t-cam"]["face_status"] == "UNAVAILABLE"
    arrived = int(time.time() * 1000)
    assert arrived - paid >= footage_delay_ms and not obs.snapshot_of_now and obs.status == "NO_MATCH"
    step = core.on_records([SourceRecord(obs.camera_serial.encode(), obs.encode(), FACES, 1, 0, arrived)], arrived)
    [alert] = alerts(step)
    assert alert["transaction_id"] == "t-cam" and "face_seen_after_the_sale_was_decided" in alert["reasons"]
    assert alert["snapshot_ref"] == obs.image_ref


def test_a_subject_forgotten_while_a_restored_checkpoint_held_it_leaves_the_broadcast_state_after_the_start_up_read():
    """A savepoint taken before ``forget subj-x``, restored once compaction had removed the tombstone (about a day):
    the start-up read no longer has subj-x, so the operator removes its entry from the broadcast state; kept,
    every later checkpoint carried its embeddings, and a start whose read failed matched subj-x again."""
    restored = {
        "wl:subj-x": codec("WatchlistEntry").decode(watch_entry("subj-x", SUSPECT_FACE)),
        "wl:subj-y": codec("WatchlistEntry").decode(watch_entry("subj-y", BUYER_FACE)),
        "rules": {"yaml": RULESET_FILE.read_text()},
    }
    core = DecisionCore(settings(bootstrap_control=True, face_deadline_ms=0), watchlist=Watchlist(), clock=clock)

    def read(s, apply):  # the compacted topic: subj-y only, subj-x's record and tombstone are gone
        apply(WATCH_TOPIC, b"subj-y", watch_entry("subj-y", BUYER_FACE))
        return {(WATCH_TOPIC, 0): 7}

    core.bootstrap(read)
    core.restore({}, restored)
    assert core.stale_broadcast(list(restored)) == ["wl:subj-x"]
    assert core.stale_broadcast(list(restored)) == [], "once per start"
    for key in ["wl:subj-x"]:
        restored.pop(key)
    failed = DecisionCore(settings(bootstrap_control=True, face_deadline_ms=0), watchlist=Watchlist(), clock=clock)
    failed.bootstrap(lambda s, apply: (_ for _ in ()).throw(TimeoutError("no broker")))
    failed.restore({}, restored)
    assert "subj-x" not in failed.watchlist and "subj-y" in failed.watchlist
    assert failed.stale_broadcast(list(restored)) == [], "without a start-up read the broadcast state is in force"


def test_a_subject_forgotten_while_the_job_was_away_loses_the_buyer_face_on_its_enrolment_receipt():
    """``forget subj-x`` made while the job was stopped, restored once compaction had removed the tombstone: the
    start-up read no longer has subj-x and its entry left the broadcast state, but the buyer face on receipt ``x``
    (the face enrolled) stayed in the keyed state until its retention, as if nobody had been forgotten."""
    restored = {"wl:subj-x": codec("WatchlistEntry").decode(watch_entry("subj-x", BUYER_FACE))}
    core = DecisionCore(settings(bootstrap_control=True), watchlist=Watchlist(), clock=clock)
    core.bootstrap(lambda s, apply: {(WATCH_TOPIC, 0): 7})  # the compacted topic: subj-x's records are gone
    core.restore({}, restored)
    core.on_records([tx_record(sale("x")), face_record("x", embedding=BUYER_FACE)], NOW)
    assert core.state.receipts["x"].sale_face == tuple(BUYER_FACE)
    assert core.stale_broadcast(list(restored)) == ["wl:subj-x"]
    step = core.on_records([], NOW + 1000)  # keyed state changes at the next keyed call
    assert core.state.receipts["x"].sale_face is None
    assert step.writes[RECEIPTS]["x"].sale_face is None


def test_the_broadcast_step_removes_a_restored_entry_the_start_up_read_no_longer_has():
    """The operators' wiring (``jobs.flink.steps._control``, as ``DecideStep`` does): the first rules or watchlist
    record after the start (the watchlist service's hourly compaction marker at least) takes it out."""
    from jobs.flink.steps import _control

    class Ctx:
        def __init__(self, state: dict) -> None:
            self.state = state

        def get_broadcast_state(self, _descriptor):
            return self

        def items(self):  # as PyFlink's broadcast state in thread mode: items() works, keys() does not
            return iter(list(self.state.items()))

        def keys(self):
            raise AttributeError("'pemja.PyJObject' object has no attribute 'keys'")

        def put(self, key, value):
            self.state[key] = value

        def remove(self, key):
            self.state.pop(key, None)

    ctx = Ctx({"wl:subj-x": codec("WatchlistEntry").decode(watch_entry("subj-x", SUSPECT_FACE))})
    core = DecisionCore(settings(bootstrap_control=True, face_deadline_ms=0), watchlist=Watchlist(), clock=clock)
    core.bootstrap(lambda s, apply: {(WATCH_TOPIC, 0): 7})
    list(_control(core, (b"compaction-marker", None, WATCH_TOPIC, 0, 8), ctx))
    assert ctx.state == {}
