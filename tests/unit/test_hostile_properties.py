"""Every consumer's per-record handler, fed schema-valid hostile records (``tests/strategies.py``) through the real
codec: it takes the record or refuses it with its dead letter and a reason, never raises anything else (the
consumer would restart on the same record for ever), and what it sends on (a document, a message, a card) holds
no NaN or infinity and no huge string.

The corpus of ``tests/e2e/hostile.py`` names the hostile inputs one knows of; these draw the ones nobody thought
of: a valid record of each input with a few fields spoiled (what gets past the first checks), or one hostile in
every field. Deterministic (``derandomize``, 100 examples a test) so CI runs the same examples every time: about
half a minute for the file on two cores.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from infra.command_auth import SIGNATURE_HEADER, sign_command
from infra.settings import CameraSettings, CasesSettings, Settings, WebexSettings
from jobs.bot.webex_bot import recorded_checkout, watchlist_text
from jobs.cases.service import CaseCore, Source
from jobs.faces.stage import FaceStage
from jobs.faces.watchlist_service import WatchlistCore
from jobs.model.labels import decode_transactions, latest_labels
from jobs.model.predictors import AFD_VARIABLES, FraudDetectorPredictor
from jobs.model.train import observe_all
from jobs.scoring.core import SourceRecord
from jobs.scoring.partitioned import PartitionedCore
from jobs.scoring.rules import INDICATOR_NAMES
from jobs.scoring.validation import parse_transaction
from jobs.scoring.watchlist import Watchlist
from producers.camera_bridge import Ignored, convert
from schemas.codec import codec, json_safe
from schemas.errors import INTERNAL_ERROR, InvalidRecord
from schemas.identifiers import check_image_ref, check_name, check_text
from schemas.records import (
    MAX_CASE_TEXT,
    Alert,
    AuditEvent,
    BotCommand,
    CameraEvent,
    DeadLetter,
    DetectedObject,
    Label,
    ModelDrift,
    WatchlistEntry,
)
from schemas.topics import DEAD_LETTERS
from sinks.alerts.mail import build_email
from sinks.alerts.message import case_card, describe
from sinks.alerts.sender import decode_alert
from sinks.opensearch.sink import MAX_NAMES, NAME_RE, NAMED_VALUES, to_actions
from tests.builders import FACE_LEN, checkout_face, sale
from tests.strategies import hostile_doubles, hostile_longs, hostile_records, hostile_text
from tests.unit import test_decision_core as single
from tests.unit import test_partitioned_scoring as partitioned
from tests.unit.test_opensearch_sink import PREFIX as SINK_PREFIX
from tests.unit.test_opensearch_sink import message

FAST = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
NOW = single.NOW
KEY = "unit-test-command-signing-key"
GUARD = "guard@example.com"
TEXT_SENT_MAX = 4096
"""The longest string a handler may send on (a document's field, a message's row): ids and labels are checked far
below it, and free text (a summary, a reason) is cut or refused before it; never a huge string."""


def finite_and_bounded(value: Any, where: str = "", limit: int = TEXT_SENT_MAX) -> None:
    """Every float in ``value`` finite, every string at most ``limit`` characters."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{where}: {value}"
    elif isinstance(value, str):
        assert len(value) <= limit, f"{where}: a {len(value)}-character string"
    elif isinstance(value, dict):
        for k, v in value.items():
            finite_and_bounded(k, f"{where}.<key>", limit)
            finite_and_bounded(v, f"{where}.{k}", limit)
    elif isinstance(value, list | tuple):
        for v in value:
            finite_and_bounded(v, f"{where}[]", limit)


def refused(letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """``letters``, each checked: a kind, a reason, and not ``internal_error`` (the stage's own failure)."""
    out = list(letters)
    for letter in out:
        assert letter.error_kind and letter.reason, letter
        assert letter.error_kind != INTERNAL_ERROR, letter.reason
    return out


def encoded(record_type: str, record: dict[str, Any]) -> bytes:
    return codec(record_type).encode(record)


# --- what valid records look like, for the strategies to spoil -------------------------------------------------


def _sale(at: int) -> dict[str, Any]:
    tx = sale("tx-1", customer_email="mule@example.com", ip_address="203.0.113.7", product_category="Home & Garden")
    return {**tx.to_avro(), "event_time": at}


def _face(at: int) -> dict[str, Any]:
    """The face stage's Rekognition match of the buyer of ``tx-1`` (a subject the job's watchlist holds)."""
    obs = checkout_face("tx-1", at=at, status="MATCHED", embedding=[0.01] * FACE_LEN).to_avro()
    return {**obs, "subject_id": "subj-a", "similarity": 99.5, "matcher": "rekognition", "quality": 0.8}


def _valid_faces(at: int = single.NOW - 500) -> list[dict[str, Any]]:
    """:func:`_face`, and the face without a match that the job searches its watchlist with (and matches)."""
    unmatched = {**_face(at), "status": "NO_MATCH", "subject_id": None, "similarity": None, "matcher": None}
    return [_face(at), unmatched]


def _valid_sales(at: int = single.NOW - 1000) -> list[dict[str, Any]]:
    """A sale, and the return of ``tx-0`` (a sale the job has decided before it)."""
    refund = {**_sale(at), "transaction_id": "tx-1", "kind": "RETURN", "original_transaction_id": "tx-0"}
    return [_sale(at), refund]


def _alert(at: int) -> dict[str, Any]:
    return Alert(
        alert_id="watchlist:tx-1:subj-a",
        kind="WATCHLIST_MATCH",
        severity="high",
        event_time=at,
        store_id="store-001",
        summary="Possible suspect at lane-01",
        lane_id="lane-01",
        transaction_id="tx-1",
        amount=25.0,
        currency="EUR",
        outcome="BLOCK",
        risk_score=90,
        reasons=("watchlist_suspect",),
        subject_id="subj-a",
        category="SUSPECT",
        similarity=91.5,
        snapshot_ref="file:checkout/tx-1.jpg",
        match_threshold=50.9,
    ).to_avro()


def _scored(at: int) -> dict[str, Any]:
    from tests.unit.test_opensearch_sink import scored

    return {**scored("tx-1").to_avro(), "event_time": at, "decided_at": at + 10}


def _watch_entry(at: int) -> dict[str, Any]:
    return WatchlistEntry("subj-a", "SUSPECT", [[0.01] * FACE_LEN], "fraud", GUARD, at).to_avro()


def _command(at: int) -> dict[str, Any]:
    cmd = BotCommand(command_id="cmd-1", issued_at=at - 1000, verb="CONFIRM", actor=GUARD, argument="case-0123456789ab")
    return {**cmd.to_avro(), "room_id": "room-1"}


def _case(at: int) -> dict[str, Any]:
    return {
        "case_id": "case-0123456789ab",
        "version": 1,
        "state": "OPEN",
        "kind": "WATCHLIST_MATCH",
        "store_id": "store-001",
        "alert_id": "watchlist:tx-1:subj-a",
        "summary": "Possible suspect at lane-01",
        "opened_at": at,
        "updated_at": at,
        "expires_at": at + 600_000,
        "updated_by": "case-service",
        "decided_at": None,
        "owner": None,
        "verdict": None,
        "verdict_reason": None,
        "notes": [{"at": at, "actor": GUARD, "text": "looking"}],
        "lane_id": "lane-01",
        "transaction_id": "tx-1",
        "subject_id": "subj-a",
        "category": "SUSPECT",
        "similarity": 91.5,
        "snapshot_ref": "file:checkout/tx-1.jpg",
        "reference_image_ref": None,
        "subject_false_matches": 0,
        "fraud_label": None,
        "decided_by": None,
    }


def _rules(at: int) -> dict[str, Any]:
    return {**codec("RuleSetUpdate").decode(single.rules_update("v-hostile")), "published_at": at}


def _label(at: int) -> dict[str, Any]:
    return Label("label-1", "tx-1", 1, "case", at, GUARD, "confirmed", "case-0123456789ab").to_avro()


def _drift(at: int) -> dict[str, Any]:
    return ModelDrift(
        "drift:model-v1:1", "model-v1", at, 500, 0, 0.1, {"amount_log": 0.2}, 0.2, False, 8000, at, "amount_log"
    ).to_avro()


def _audit(at: int) -> dict[str, Any]:
    return AuditEvent("command:cmd-1", at, "FORGET", "DONE", GUARD, subject_id="subj-a").to_avro()


def _camera_event(at: int) -> dict[str, Any]:
    serial = "Q2MV-store-001-ENTRANCE"
    person = DetectedObject(42, "person", 0.1, 0.1, 0.5, 0.9, frame=1)
    event = CameraEvent(serial, at, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=(person,))
    return event.to_avro()


def hostile(
    record_type: str,
    valid: dict[str, Any] | st.SearchStrategy[dict[str, Any]],
    now_ms: int = NOW,
    focus: tuple[str, ...] = (),
) -> st.SearchStrategy[dict[str, Any]]:
    return hostile_records(record_type, valid, now_ms, focus=focus)


# --- the scoring job, both layouts -----------------------------------------------------------------------------


def _earlier_sale(topic: str, now: int) -> SourceRecord:
    """``tx-0``, a sale an hour before: what a hostile return refers to, and a receipt and profiles to meet."""
    tx = sale("tx-0", at_s=(now - 3_600_000 - single.T0) / 1000, customer_email="mule@example.com")
    return SourceRecord(b"store-001/lane-01", tx.encode(), topic, 0, 0, now - 3_600_000)


def _single_core(now: int):
    """The single layout, with ``subj-a`` on its watchlist and ``tx-0`` decided."""
    core = single.make_core()
    core.on_control(single.WATCH_TOPIC, b"subj-a", encoded("WatchlistEntry", _watch_entry(now - 10**6)), 0, 0)
    earlier = core.on_records([_earlier_sale(single.TX, now)], now).outputs
    assert [t for t, _, _ in earlier if t == single.DLQ] == []
    return core


def _single_rows(records: list[SourceRecord], now: int, core=None) -> list[tuple[str, bytes, bytes]]:
    """What the single layout (:func:`_single_core`, unless given) makes of ``records``, then of a valid refund by the
    same customer (``tx-2``, of ``tx-1``): what a hostile record left in the state must not fail it."""
    core = core or _single_core(now)
    rows = core.on_records(records, now).outputs + core.on_timer(now + 10**7, now + 10**7).outputs
    later = now + 10**7 + 1000
    return (
        rows
        + core.on_records([_follow_up(single.TX, later)], later).outputs
        + core.on_timer(later + 10**7, later + 10**7).outputs
    )


def _follow_up(topic: str, at: int) -> SourceRecord:
    refund = {**_sale(at - 1000), "transaction_id": "tx-2", "kind": "RETURN", "original_transaction_id": "tx-1"}
    return SourceRecord(b"store-001/lane-01", encoded("PosTransaction", refund), topic, 0, 99, at)


def _partitioned_rows(records: list[SourceRecord], now: int) -> list:
    s = partitioned.settings()
    core = PartitionedCore(
        s, 2, predictor=partitioned.FeaturePredictor(), watchlist=Watchlist(s), clock=partitioned._clock
    )
    topic = f"{partitioned.PREFIX}transactions"
    core.on_records([_earlier_sale(topic, now)], now)
    rows = core.on_records(records, now) + core.on_timer(now + 10**7)
    return rows + core.on_records([_follow_up(topic, now + 2000)], now + 2000) + core.on_timer(now + 2 * 10**7)


def _job_outputs(rows, prefix: str) -> None:
    """Dead letters refused with a reason; every decision and alert finite and bounded; the valid refund that came
    after decided."""
    refused(DeadLetter.decode(value) for topic, _, value in rows if topic == f"{prefix}dead_letters")
    for topic, _, value in rows:
        if topic == f"{prefix}processed_transactions":
            decision = codec("ScoredTransaction").decode(value)
            finite_and_bounded(decision, "decision")
            assert set(decision["indicators"]) <= INDICATOR_NAMES, decision["indicators"]  # what the index maps
        elif topic == f"{prefix}alerts":
            finite_and_bounded(codec("Alert").decode(value), "alert")
    assert b"tx-2" in [key for topic, key, _ in rows if topic == f"{prefix}processed_transactions"]


@FAST
@given(tx=hostile("PosTransaction", st.sampled_from(_valid_sales())))
def test_the_single_layout_decides_or_dead_letters_any_hostile_transaction(tx) -> None:
    record = SourceRecord(b"store-001/lane-01", encoded("PosTransaction", tx), single.TX, 0, 0, single.NOW)
    _job_outputs(_single_rows([record], single.NOW), single.PREFIX)


@FAST
@given(tx=hostile("PosTransaction", st.sampled_from(_valid_sales(partitioned.NOW - 1000)), partitioned.NOW))
def test_the_partitioned_layout_decides_or_dead_letters_any_hostile_transaction(tx) -> None:
    topic = f"{partitioned.PREFIX}transactions"
    record = SourceRecord(b"store-001/lane-01", encoded("PosTransaction", tx), topic, 0, 0, partitioned.NOW)
    _job_outputs(_partitioned_rows([record], partitioned.NOW), partitioned.PREFIX)


@FAST
@given(obs=hostile("FaceObservation", st.sampled_from(_valid_faces())))
def test_the_scoring_job_joins_or_dead_letters_any_hostile_face_observation(obs) -> None:
    """The observation, then its sale: the sale is still decided whatever became of the face."""
    face = SourceRecord(b"Q2MV-store-001-lane-01", encoded("FaceObservation", obs), single.FACES, 1, 0, single.NOW)
    tx = SourceRecord(b"store-001/lane-01", sale("tx-1", at_s=3599).encode(), single.TX, 0, 1, single.NOW)
    rows = _single_rows([face, tx], single.NOW)
    _job_outputs(rows, single.PREFIX)
    assert b"tx-1" in [key for topic, key, _ in rows if topic == single.SCORED]


@FAST
@given(entry=hostile("WatchlistEntry", _watch_entry(single.NOW)))
def test_the_scoring_job_applies_or_refuses_any_hostile_watchlist_entry(entry) -> None:
    core = _single_core(single.NOW)
    step = core.on_control(single.WATCH_TOPIC, entry["subject_id"].encode(), encoded("WatchlistEntry", entry), 0, 1)
    letters = refused(DeadLetter.decode(v) for t, _, v in step.outputs if t == single.DLQ)
    assert step.update is None or not letters
    face = SourceRecord(b"k", encoded("FaceObservation", _valid_faces()[1]), single.FACES, 1, 0, single.NOW)
    tx = SourceRecord(b"store-001/lane-01", encoded("PosTransaction", _sale(single.NOW - 1000)), single.TX, 0, 1, 0)
    _job_outputs(_single_rows([face, tx], single.NOW, core), single.PREFIX)


@FAST
@given(update=hostile("RuleSetUpdate", _rules(NOW)))
def test_the_scoring_job_applies_or_refuses_any_hostile_rule_set(update) -> None:
    core = _single_core(single.NOW)
    step = core.on_control(single.RULES_TOPIC, b"active", encoded("RuleSetUpdate", update), 0, 0)
    letters = refused(DeadLetter.decode(v) for t, _, v in step.outputs if t == single.DLQ)
    assert step.update is None or not letters
    tx = SourceRecord(b"store-001/lane-01", encoded("PosTransaction", _sale(single.NOW - 1000)), single.TX, 0, 1, 0)
    _job_outputs(_single_rows([tx], single.NOW, core), single.PREFIX)


# --- the face stage ------------------------------------------------------------------------------------------


def _face_stage() -> FaceStage:
    def no_snapshot(serial: str, at: int | None):
        raise AssertionError("planning takes no snapshot")

    return FaceStage(Settings(cameras=CameraSettings(entrance_oid_window_s=60)), no_snapshot, None, None)  # type: ignore[arg-type]


STAGE_NOW = int(time.time() * 1000)


@FAST
@given(tx=hostile("PosTransaction", _sale(STAGE_NOW - 1000), STAGE_NOW))
def test_the_face_stage_plans_a_snapshot_or_nothing_for_any_hostile_transaction(tx) -> None:
    triggers = _face_stage().plan_transaction(encoded("PosTransaction", tx), STAGE_NOW, STAGE_NOW)
    assert len(triggers) <= 1


@FAST
@given(event=hostile("CameraEvent", _camera_event(STAGE_NOW - 1000), STAGE_NOW))
def test_the_face_stage_plans_or_refuses_any_hostile_camera_event(event) -> None:
    stage = _face_stage()
    try:
        triggers = stage.plan_camera_event(encoded("CameraEvent", event), STAGE_NOW, STAGE_NOW)
    except InvalidRecord as exc:
        assert exc.kind and exc.reason
        return
    assert len(triggers) <= stage.settings.cameras.entrance_max_new_people


# --- the OpenSearch sink ---------------------------------------------------------------------------------------

INDEXED_TEXT_MAX = Settings().job.max_message_bytes
"""The longest string (characters) the sink indexes of a record within the stages' record limit: it copies a record's
fields, never makes them longer."""

SINK_ROUTES = {
    "processed_transactions": ("ScoredTransaction", _scored, "transaction_id"),
    "alerts": ("Alert", _alert, "alert_id"),
    "face_observations": ("FaceObservation", _face, "observation_id"),
    "labels": ("Label", _label, "transaction_id"),
    "model_drift": ("ModelDrift", _drift, "report_id"),
    "cases": ("Case", _case, "case_id"),
}


@pytest.mark.parametrize("topic", sorted(SINK_ROUTES))
def test_the_opensearch_sink_indexes_or_dead_letters_any_hostile_record(topic) -> None:
    record_type, valid, id_field = SINK_ROUTES[topic]

    @FAST
    @given(record=hostile(record_type, valid(NOW - 1000)))
    def check(record) -> None:
        key = record[id_field].encode() if isinstance(record[id_field], str) else None
        batch = [message(f"{SINK_PREFIX}{topic}", encoded(record_type, record), offset=7, key=key)]
        actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=SINK_PREFIX, now_ms=NOW)
        assert len(actions) + len(refused(dead)) == 1
        for action in actions:
            json.dumps(action.op, allow_nan=False)  # what the bulk request sends: NaN is no JSON
            finite_and_bounded(action.op.get("_source"), topic, INDEXED_TEXT_MAX)
            names = action.op.get("_source", {}).get(NAMED_VALUES.get(action.kind, ""), {})
            assert len(names) <= MAX_NAMES and all(NAME_RE.fullmatch(n) for n in names), len(names)  # no 1,000 fields

    check()


# --- the alert sender --------------------------------------------------------------------------------------------


SHOWN_FIELDS = ("store_id", "lane_id", "amount", "currency", "risk_score", "reasons", "similarity", "match_threshold")
"""The fields of an alert its messages show, a few of which each example spoils."""
NUMBER_ROWS = frozenset({"Amount", "Refund", "Face match", "Outcome"})
"""The rows of a message that show a number of the alert's (an amount, a similarity, a risk score)."""
NOT_A_NUMBER = re.compile(r"(?<![A-Za-z])(nan|-?inf)(?![A-Za-z])", re.IGNORECASE)


@FAST
@given(alert=hostile("Alert", _alert(NOW - 1000), focus=SHOWN_FIELDS))
def test_the_alert_sender_refuses_or_writes_a_finite_bounded_message_for_any_hostile_alert(alert) -> None:
    """What every channel makes of it: the e-mail, the Webex markdown (within its limit) and the case card."""
    alerts = Settings().alerts
    try:
        decoded = decode_alert(encoded("Alert", alert), alerts)
    except InvalidRecord as exc:
        assert exc.kind and exc.reason
        return
    text = describe(decoded, alerts)
    for label, value in text.lines:
        finite_and_bounded(value, label)
        if label in NUMBER_ROWS:
            assert not NOT_A_NUMBER.search(value), (label, value)
    finite_and_bounded(text.headline, "headline")
    mail = build_email(decoded["alert_id"], text, "cg@example.com", [GUARD])
    assert len(mail.data) < 64 * 1024
    assert len(text.markdown(7000).encode()) <= 7000
    card = case_card(decoded, alerts, NOW / 1000)
    assert len(json.dumps(card)) < 20_000


# --- the watch-list and case services --------------------------------------------------------------------------


def _webex() -> WebexSettings:
    return WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=GUARD)


def _letters(outs) -> list[DeadLetter]:
    return refused(DeadLetter.decode(o.value) for o in outs if o.topic == DEAD_LETTERS)


def _signed(record: dict[str, Any], sign: bool) -> tuple[tuple[str, bytes], ...]:
    return ((SIGNATURE_HEADER, sign_command(BotCommand.from_avro(record), KEY)),) if sign else ()


@FAST
@given(cmd=hostile("BotCommand", _command(NOW)), sign=st.booleans())
def test_the_case_service_applies_or_refuses_any_hostile_command(cmd, sign) -> None:
    core = CaseCore(Settings(webex=_webex(), cases=CasesSettings(expire_after_s=600)))
    core.marked_at = NOW
    src = Source("commands", 0, 1, b"cmd-1", encoded("BotCommand", cmd), _signed(cmd, sign), NOW)
    _letters(core.on_command(src, NOW))
    _letters(core.expire(NOW + 10**9))


CASE_RECORD_MAX = 1024 * 1024
"""Kafka's default largest record: a case, an audit event or a label over it would fail every publish."""


def _verdict(case_id: str, verb: str, rest: str, n: int) -> Source:
    cmd = BotCommand(f"cmd-{n}", NOW - 1000, verb, GUARD, f"{case_id} {rest}".strip(), "room-1")
    value = cmd.encode()
    return Source("commands", 0, 10 + n, cmd.command_id.encode(), value, _signed(cmd.to_avro(), True), NOW)


VERDICTS = (("NOTE", "seen it"), ("ASSIGN", GUARD), ("ESCALATE", ""), ("CONFIRM", "fraud"), ("DISMISS", "no"))


@FAST
@given(alert=hostile("Alert", _alert(NOW - 1000)), verdict=st.sampled_from(VERDICTS))
def test_the_case_service_opens_a_case_or_refuses_any_hostile_alert_and_takes_the_verdicts_on_it(alert, verdict):
    """The case opened, then a person's signed verdicts on it (what a case's fields become: a label, a LEARN
    command, an audit event), then the expiry: a hostile field that failed there would stop the service at every
    restart (the command read again)."""
    core = CaseCore(Settings(webex=_webex(), cases=CasesSettings(expire_after_s=600)))
    core.marked_at = NOW
    outs = core.on_alert(Source("alerts", 0, 1, b"a", encoded("Alert", alert), (), NOW), NOW)
    _letters(outs)
    for n, (verb, rest) in enumerate((verdict, ("NOTE", "again"), ("CONFIRM", ""))):
        for case_id in list(core.book.cases):
            outs += core.on_command(_verdict(case_id, verb, rest, n), NOW)
    outs += core.expire(NOW + 10**9)
    _letters(outs)
    for out in outs:  # what it publishes fits a Kafka record (a case copies an alert's fields and more)
        assert out.value is None or len(out.value) <= CASE_RECORD_MAX, (out.topic.name, len(out.value))
        if out.topic.name == "cases" and out.value is not None:  # indexed and shown on the case page
            case = codec("Case").decode(out.value)
            finite_and_bounded(case, "case", CASE_RECORD_MAX)  # every number finite: a NaN similarity is refused
            assert len(case["summary"]) <= MAX_CASE_TEXT, len(case["summary"])  # cut as a note is
            check_name(case["store_id"], "store_id")  # the alert's own ids, as the pipeline writes them, or no case
            for field, check_field in (("category", check_text), ("snapshot_ref", check_image_ref)):
                if case[field] is not None:
                    check_field(case[field], field)


@FAST
@given(entry=hostile("WatchlistEntry", _watch_entry(NOW)), audit=hostile("AuditEvent", _audit(NOW)))
def test_the_case_service_takes_any_hostile_watchlist_entry_and_audit_event(entry, audit) -> None:
    core = CaseCore(Settings(webex=_webex(), cases=CasesSettings(expire_after_s=600)))
    core.load_audit(b"command:cmd-1", encoded("AuditEvent", audit))
    core.on_watchlist(Source("watchlist", 0, 1, b"subj-a", encoded("WatchlistEntry", entry), (), NOW), NOW)
    core.on_watchlist(Source("watchlist", 0, 2, b"subj-a", None, (), NOW), NOW)
    core.load_case(b"case-0123456789ab", encoded("Case", _case(NOW)))


@FAST
@given(cmd=hostile("BotCommand", {**_command(NOW), "verb": "FORGET", "argument": "subj-a"}), sign=st.booleans())
def test_the_watchlist_service_applies_or_refuses_any_hostile_command(cmd, sign, tmp_path_factory) -> None:
    core = WatchlistCore(Settings(stack_dir=tmp_path_factory.mktemp("wl"), webex=_webex()), engine=object())  # type: ignore[arg-type]
    src = Source("commands", 0, 1, b"cmd-1", encoded("BotCommand", cmd), _signed(cmd, sign), NOW)
    _letters(core.on_command(src, NOW))


@FAST
@given(alert=hostile("Alert", _alert(NOW - 1000)), entry=hostile("WatchlistEntry", _watch_entry(NOW)))
def test_the_watchlist_service_takes_or_refuses_any_hostile_alert_and_watchlist_entry(
    alert, entry, tmp_path_factory
) -> None:
    core = WatchlistCore(Settings(stack_dir=tmp_path_factory.mktemp("wl"), webex=_webex()), engine=object())  # type: ignore[arg-type]
    core.load(b"subj-a", encoded("WatchlistEntry", entry))
    _letters(core.on_alert(Source("alerts", 0, 1, b"a", encoded("Alert", alert), (), NOW), NOW))


# --- the Webex bot and the camera bridge ------------------------------------------------------------------------


@FAST
@given(entries=st.lists(hostile("WatchlistEntry", {**_watch_entry(NOW), "expires_at": NOW + 86_400_000}), max_size=3))
def test_the_webex_bot_shows_any_hostile_watchlist_in_a_short_message_that_mentions_nobody(entries) -> None:
    """``status``: the watchlist as the bot reads it from its topic, in one Webex message."""
    decoded = [WatchlistEntry.decode(encoded("WatchlistEntry", entry)) for entry in entries]
    text = watchlist_text(decoded, NOW, 365.0).replace("`renew <subject>`", "")
    assert len(text.encode()) <= TEXT_SENT_MAX and "<" not in text, text[:300]


@FAST
@given(decision=hostile("ScoredTransaction", {**_scored(NOW - 1000), "face_status": "MATCHED", "face_subject_id": "s"}))
def test_the_webex_bot_answers_checkout_from_any_hostile_indexed_decision_in_a_short_message_mentioning_nobody(
    decision,
) -> None:
    """``checkout <tx>``: the decision as the sink indexed it (NaN as null), in the bot's reply."""
    doc = json_safe(codec("ScoredTransaction").decode(encoded("ScoredTransaction", decision)))
    text = recorded_checkout(lambda tx_id: doc)("tx-1")
    assert len(text.encode()) <= TEXT_SENT_MAX and "<" not in text, text[:300]


PERSON = {"frame": 1, "oid": 42, "type": "person", "x0": 0.1, "y0": 0.1, "x1": 0.5, "y1": 0.9}
MV_SENSE = {"ts": STAGE_NOW, "objects": [PERSON]}
"""An MV Sense ``raw_detections`` message the camera bridge forwards."""
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    hostile_longs(STAGE_NOW),
    hostile_doubles(),
    hostile_text(4097),
    st.just([]),
    st.just({}),
)


@FAST
@given(
    payload=st.one_of(
        st.fixed_dictionaries(
            {
                "ts": JSON_VALUES,
                "objects": st.lists(st.dictionaries(st.sampled_from(list(PERSON)), JSON_VALUES)) | JSON_VALUES,
            }
        ),
        st.builds(lambda field, value: {**MV_SENSE, field: value}, st.sampled_from(["ts", "objects"]), JSON_VALUES),
        st.builds(
            lambda field, value: {**MV_SENSE, "objects": [{**PERSON, field: value}]},
            st.sampled_from(list(PERSON)),
            JSON_VALUES,
        ),
    ),
    sub=st.sampled_from(["raw_detections", "0", "1234"]),
)
def test_the_camera_bridge_forwards_or_dead_letters_any_hostile_mv_sense_message(payload, sub) -> None:
    body = json.dumps(payload).encode()  # NaN and Infinity as JavaScript writes them: not JSON
    out = convert(f"/merakimv/Q2MV-store-001-ENTRANCE/{sub}", body, "", Settings().job.max_message_bytes, STAGE_NOW)
    assert not isinstance(out, Ignored)
    if out.dead:
        assert out.kind and DeadLetter.decode(out.value).reason
    else:
        event = CameraEvent.decode(out.value)
        finite_and_bounded(event.to_avro(), "camera event")


AFD_NUMBERS = ("amount", "billing_latitude", "billing_longitude")
"""The fields Fraud Detector is sent as numbers (its other variables are text)."""


@functools.cache
def _fraud_detector() -> FraudDetectorPredictor:
    base = Settings()
    model = base.model.model_copy(update={"backend": "frauddetector", "aws_region": "us-east-1"})
    return FraudDetectorPredictor(base.model_copy(update={"model": model}), None)


@FAST
@given(tx=hostile("PosTransaction", _sale(STAGE_NOW - 1000), STAGE_NOW, focus=AFD_NUMBERS))
def test_the_scoring_job_asks_fraud_detector_with_finite_values_only(tx) -> None:
    """The job's remote model: what it sends Amazon Fraud Detector for a transaction it took."""
    try:
        parsed = parse_transaction(encoded("PosTransaction", tx), STAGE_NOW, Settings().job.max_message_bytes)
    except InvalidRecord:
        return
    variables = _fraud_detector().request(parsed)["eventVariables"]
    numbers = {afd for afd, field in AFD_VARIABLES if isinstance(parsed.get(field), float)}  # the price, coordinates
    for name in numbers & set(variables):
        assert math.isfinite(float(variables[name])), (name, variables[name])


# --- model training and labels -------------------------------------------------------------------------------------


@FAST
@given(txs=st.lists(hostile("PosTransaction", _sale(NOW - 1000)), min_size=1, max_size=2))
def test_train_from_the_topic_takes_or_rejects_any_hostile_transaction_with_a_reason(txs) -> None:
    found = decode_transactions(("t", 0, i, encoded("PosTransaction", tx), NOW) for i, tx in enumerate(txs))
    history = observe_all(found.transactions, single.settings())
    assert len(history.items) + len(history.rejected) + history.duplicates + found.undecodable == len(txs)
    assert all(reason for _, reason in [*found.rejected, *history.rejected])


@FAST
@given(label=hostile("Label", _label(NOW)))
def test_the_labels_reader_keeps_or_counts_any_hostile_label(label) -> None:
    key = label["transaction_id"].encode() if isinstance(label["transaction_id"], str) else None
    labels = latest_labels([(key, encoded("Label", label))])
    assert len(labels.by_transaction) + labels.undecodable + labels.wrong_key == 1


def test_the_valid_records_behind_the_strategies_are_taken() -> None:
    """Each base record is one its consumer takes: else the mutations would test refusals only."""
    assert decode_alert(encoded("Alert", _alert(NOW - 1000)), Settings().alerts)["alert_id"]
    for tx in _valid_sales():
        value = encoded("PosTransaction", tx)
        rows = _single_rows([SourceRecord(b"k", value, single.TX, 0, 1, single.NOW)], single.NOW)
        assert b"tx-1" in [k for t, k, _ in rows if t == single.SCORED] and single.DLQ not in {t for t, _, _ in rows}
    for obs in _valid_faces():
        face = SourceRecord(b"k", encoded("FaceObservation", obs), single.FACES, 1, 0, single.NOW)
        tx = SourceRecord(b"k", sale("tx-1", at_s=3599).encode(), single.TX, 0, 1, single.NOW)
        rows = _single_rows([face, tx], single.NOW)
        (decision,) = [codec("ScoredTransaction").decode(v) for t, k, v in rows if t == single.SCORED and k == b"tx-1"]
        assert decision["face_status"] == "MATCHED" and single.DLQ not in {t for t, _, _ in rows}
    for topic, (record_type, valid, id_field) in SINK_ROUTES.items():
        record = valid(NOW - 1000)
        batch = [message(f"{SINK_PREFIX}{topic}", encoded(record_type, record), key=record[id_field].encode())]
        actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=SINK_PREFIX, now_ms=NOW)
        assert len(actions) == 1 and not dead, (topic, dead)
