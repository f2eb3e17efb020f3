"""The fault-injection corpus (tests/e2e/hostile.py) builds, and every consumer of Kafka input that the corpus names
dead-letters each item with a reason, at the level of its pure core (no Kafka, no stack).

Who reads what: the scoring job (both layouts) transactions and face observations, and rules and watch-list
updates as control records; the face stage transactions (a hostile one is ignored: the job dead-letters it) and
camera events; the OpenSearch sink scored transactions, face observations and alerts; the alert sender, the
watch-list service and the case service alerts; the watch-list and case services commands; the camera bridge MQTT
payloads; ``train --from-topic`` and the labels reader the transactions and labels topics (their rejects).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from infra.settings import CameraSettings, CasesSettings, Settings, WebexSettings
from jobs.cases.service import CaseCore, Source
from jobs.faces.stage import FaceStage
from jobs.faces.watchlist_service import WatchlistCore
from jobs.model.labels import decode_transactions, latest_labels
from jobs.model.train import observe_all
from jobs.scoring.core import SourceRecord
from jobs.scoring.partitioned import PartitionedCore
from jobs.scoring.watchlist import Watchlist
from producers.camera_bridge import Ignored, convert
from schemas.codec import DecodeError
from schemas.errors import InvalidRecord
from schemas.records import Alert, BotCommand, DeadLetter
from schemas.topics import DEAD_LETTERS
from sinks.alerts.sender import decode_alert
from sinks.opensearch.sink import to_actions
from tests.e2e import hostile
from tests.unit import test_decision_core as single
from tests.unit import test_partitioned_scoring as partitioned
from tests.unit.test_opensearch_sink import PREFIX as SINK_PREFIX
from tests.unit.test_opensearch_sink import message

GENERATORS = (
    hostile.transactions,
    hostile.face_observations,
    hostile.camera_events,
    hostile.watchlist_entries,
    hostile.rule_sets,
    hostile.commands,
    hostile.alerts,
    hostile.scored_transactions,
)
NOW = single.NOW
ALERT_ID_ITEMS = {"alert_id_header_injection", "alert_id_empty", "alert_id_over_512"}
"""Alerts whose id the alert sender refuses: the watch-list and case services refuse them too (no stage of theirs is
named in the corpus: the fault-injection suite runs no case service)."""


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_every_corpus_builds_with_unique_labels_and_a_stage_to_reject_each_item(make) -> None:
    items = make("run1")
    labels = [item.label for item in items]
    assert items and len(labels) == len(set(labels))
    assert all(item.stages for item in items)
    assert all(item.value is not None and len(item.value) <= hostile.OVERSIZED for item in items)


def test_the_mqtt_corpus_covers_the_issues_payloads() -> None:
    labels = {label for label, _, _ in hostile.mqtt_payloads()}
    assert {"ts_1e20", "deeply_nested", "not_json", "serial_path", "ts_int64_max", "serial_controls"} <= labels


def _for(stage: str, items: list[hostile.Hostile]) -> list[hostile.Hostile]:
    mine = [item for item in items if stage in item.stages]
    assert mine, f"the corpus names {stage} for none of these"
    return mine


def _kinds(rows, topic: str) -> list[str]:
    return [DeadLetter.decode(value).error_kind for t, _, value in rows if t == topic]


def _one_letter(kinds: list[str], item: hostile.Hostile) -> None:
    assert len(kinds) == 1 and kinds[0], f"{item.label}: dead letters {kinds}"


# --- the scoring job, both layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "partitioned"])
@pytest.mark.parametrize("make", [hostile.transactions, hostile.face_observations], ids=lambda f: f.__name__)
def test_the_scoring_job_dead_letters_every_hostile_transaction_and_observation_in_either_layout(make, layout):
    """Each on its own, then all in one batch with a valid sale after them: that sale is still decided."""
    topic = single.TX if make is hostile.transactions else single.FACES
    now = single.NOW if layout == "single" else partitioned.NOW
    items = _for(hostile.JOB, make("h", now))
    records = [SourceRecord(item.key, item.value, topic, 0, i, now) for i, item in enumerate(items)]

    def run(batch: list[SourceRecord]) -> list:
        if layout == "single":
            core = single.make_core()
            return core.on_records(batch, now).outputs + core.on_timer(now + 10**7, now + 10**7).outputs
        s = partitioned.settings()
        core = PartitionedCore(
            s, 2, predictor=partitioned.FeaturePredictor(), watchlist=Watchlist(s), clock=partitioned._clock
        )
        return core.on_records(batch, now) + core.on_timer(now + 10**7)

    for item, record in zip(items, records, strict=True):
        _one_letter(_kinds(run([record]), single.DLQ), item)
    after = SourceRecord(b"k", hostile.transaction("h-after", now).encode(), single.TX, 0, len(items), now)
    rows = run([*records, after])
    assert len(_kinds(rows, single.DLQ)) == len(items)
    assert [k for t, k, _ in rows if t == single.SCORED] == [b"h-after"]


@pytest.mark.parametrize("make", [hostile.watchlist_entries, hostile.rule_sets], ids=lambda f: f.__name__)
def test_the_scoring_job_dead_letters_every_hostile_control_record_and_keeps_what_was_in_force(make) -> None:
    topic = single.WATCH_TOPIC if make is hostile.watchlist_entries else single.RULES_TOPIC
    core = single.make_core()
    version = core.rule_set.version
    for i, item in enumerate(_for(hostile.JOB, make("h", NOW))):
        step = core.on_control(topic, item.key, item.value, 0, i)
        assert step.update is None and _kinds(step.outputs, single.DLQ) == ["invalid_update"], item.label
    assert core.rule_set.version == version


# --- the face stage --------------------------------------------------------------------------------------------


def _face_stage() -> FaceStage:
    def no_snapshot(serial: str, at: int | None):
        raise AssertionError("a hostile record must never reach a camera")

    settings = Settings(cameras=CameraSettings(entrance_oid_window_s=60))
    return FaceStage(settings, no_snapshot, None, None)  # type: ignore[arg-type]


def test_the_face_stage_dead_letters_every_hostile_camera_event() -> None:
    now = int(time.time() * 1000)
    stage = _face_stage()
    for item in _for(hostile.FACE_STAGE, hostile.camera_events("h", now)):
        with pytest.raises(InvalidRecord) as err:
            stage.plan_camera_event(item.value, now, now)
        assert err.value.kind and err.value.reason, item.label


def test_the_face_stage_plans_no_snapshot_for_any_hostile_transaction() -> None:
    """The job dead-letters them (the corpus names it); the stage ignores them rather than photograph a lane."""
    now = int(time.time() * 1000)
    stage = _face_stage()
    for item in hostile.transactions("h", now):
        assert stage.plan_transaction(item.value, now, now) == [], item.label


# --- the OpenSearch sink and the alert sender --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "topic"),
    [
        (hostile.scored_transactions, "processed_transactions"),
        (hostile.face_observations, "face_observations"),
        (hostile.alerts, "alerts"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_the_opensearch_sink_dead_letters_every_hostile_record_and_indexes_the_rest_of_its_batch(make, topic) -> None:
    items = _for(hostile.SINK, make("h", NOW))
    batch = [message(f"{SINK_PREFIX}{topic}", item.value, offset=i, key=item.key) for i, item in enumerate(items)]
    for item, one in zip(items, batch, strict=True):
        actions, dead = to_actions([one], index_prefix="cg", topic_prefix=SINK_PREFIX, now_ms=NOW)
        assert actions == [] and len(dead) == 1 and dead[0].error_kind, item.label
    _, dead = to_actions(batch, index_prefix="cg", topic_prefix=SINK_PREFIX, now_ms=NOW)
    assert len(dead) == len(items)


def test_the_opensearch_sink_dead_letters_a_keyed_record_without_a_usable_key() -> None:
    """Labels and cases are keyed by their id: no key, or one that is not UTF-8, is no document id."""
    for key, value in ((None, b"x"), (None, None), (b"\xff\xfe", None)):
        batch = [message(f"{SINK_PREFIX}labels", value, key=key)]
        actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=SINK_PREFIX, now_ms=NOW)
        assert actions == [] and len(dead) == 1 and dead[0].error_kind in {"invalid_key", "not_avro"}, (key, value)


def test_the_alert_sender_refuses_every_hostile_alert_before_any_channel_sees_it() -> None:
    settings = Settings().alerts
    for item in _for(hostile.SENDER, hostile.alerts("h", NOW)):
        with pytest.raises(InvalidRecord) as err:
            decode_alert(item.value, settings)
        assert err.value.kind and err.value.reason, item.label
    valid = Alert("a-1", "BLOCKED_TRANSACTION", "high", NOW, "store-001", "blocked")
    assert decode_alert(valid.encode(), settings)["alert_id"] == "a-1"


# --- the watch-list and case services -----------------------------------------------------------------------------

KEY = "unit-test-command-signing-key"
GUARD = "guard@example.com"


def _watchlist_service(tmp_path) -> WatchlistCore:
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=GUARD)
    return WatchlistCore(Settings(stack_dir=tmp_path, webex=webex), engine=object())  # type: ignore[arg-type]


def _case_service() -> CaseCore:
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=GUARD)
    core = CaseCore(Settings(webex=webex, cases=CasesSettings(expire_after_s=600)))
    core.marked_at = NOW
    return core


def _letters(outs) -> list[DeadLetter]:
    return [DeadLetter.decode(o.value) for o in outs if o.topic == DEAD_LETTERS]


def _undecodable(item: hostile.Hostile, decode: Callable[[bytes], object]) -> bool:
    try:
        decode(item.value or b"")
    except DecodeError:
        return True
    return False


def test_the_watchlist_service_dead_letters_every_hostile_command_and_changes_nothing(tmp_path) -> None:
    core = _watchlist_service(tmp_path)
    for i, item in enumerate(_for(hostile.WATCHLIST_SERVICE, hostile.commands("h", NOW))):
        outs = core.on_command(Source("commands", 0, i, item.key, item.value, (), NOW), NOW)
        assert [o.topic for o in outs if o.topic.name == "watchlist"] == [] and len(_letters(outs)) == 1, item.label
    assert core.entries == {}


def test_the_watchlist_and_case_services_dead_letter_alerts_they_cannot_use(tmp_path) -> None:
    """What does not decode, and an id the alert sender refuses (a record of zeros decodes with an empty one); each
    service goes on with the next alert. The watch-list service retains a snapshot whatever the alert's time; the case
    service refuses an alert dated at or before 1970 (its case opens then) and opens one dated ahead now."""
    theirs = [item for item in hostile.alerts("h", NOW) if not item.label.startswith("event_time_")]
    assert {item.label for item in theirs} >= ALERT_ID_ITEMS | {"truncated", "empty", "oversized"}
    watchlist, cases = _watchlist_service(tmp_path), _case_service()
    for i, item in enumerate(theirs):
        src = Source("alerts", 0, i, item.key, item.value, (), NOW)
        assert len(_letters(watchlist.on_alert(src, NOW))) == 1, item.label
        outs = cases.on_alert(src, NOW)
        assert len(_letters(outs)) == 1 and [o for o in outs if o.topic.name == "cases"] == [], item.label
    assert cases.book.cases == {}
    (early,) = (item for item in hostile.alerts("h", NOW) if item.label == "event_time_int64_min")
    outs = cases.on_alert(Source("alerts", 0, 99, early.key, early.value, (), NOW), NOW)
    assert [letter.error_kind for letter in _letters(outs)] == ["invalid_timestamp"] and cases.book.cases == {}


def test_the_case_service_dead_letters_every_command_that_does_not_decode() -> None:
    core = _case_service()
    items = [item for item in hostile.commands("h", NOW) if _undecodable(item, BotCommand.decode)]
    assert len(items) >= 6
    for i, item in enumerate(items):
        assert len(_letters(core.on_command(Source("commands", 0, i, item.key, item.value, (), NOW), NOW))) == 1


def test_a_huge_header_set_is_cut_in_the_dead_letter_not_copied() -> None:
    """A hostile record's headers go into its dead letter: past the cap, only the mark that they were cut."""
    core = _case_service()
    headers = tuple((f"h{i}", b"v" * 1000) for i in range(2000))
    item = hostile.alerts("h", NOW)[0]
    (out,) = core.on_alert(Source("alerts", 0, 1, item.key, item.value, headers, NOW), NOW)
    assert len(out.value) < 10_000 and len(out.headers or ()) == 1


# --- the camera bridge, train --from-topic and the labels reader ------------------------------------------------------


def test_the_camera_bridge_dead_letters_every_hostile_payload() -> None:
    for label, topic, payload in hostile.mqtt_payloads():
        out = convert(topic, payload, "", Settings().job.max_message_bytes, NOW)
        assert not isinstance(out, Ignored) and out.dead and out.kind, label
        assert DeadLetter.decode(out.value).reason, label


def test_train_from_the_topic_rejects_every_hostile_transaction_with_a_reason() -> None:
    """Counted undecodable by the topic reader (one dated years after Kafka took it too), or rejected by the job's own
    parse in ``observe_all``: none becomes a training row."""
    items = _for(hostile.JOB, hostile.transactions("h", NOW))
    found = decode_transactions(("t", 0, i, item.value, NOW) for i, item in enumerate(items))
    history = observe_all(found.transactions, single.settings())
    assert history.items == [] and found.undecodable + len(history.rejected) == len(items)
    assert all(reason for _, reason in [*found.rejected, *history.rejected])


def test_the_labels_reader_counts_every_hostile_record_and_keeps_no_verdict() -> None:
    items = [*hostile.transactions("h", NOW), *hostile.alerts("h", NOW)]
    labels = latest_labels([(item.key, item.value) for item in items] + [(None, None), (b"\xff", None)])
    assert labels.by_transaction == {} and labels.read == len(items) + 2
    assert labels.undecodable + labels.wrong_key == len(items) + 1
