"""MV Sense MQTT messages -> CameraEvents, ignored topics and dead letters (pure parsing)."""

from __future__ import annotations

import json

import pytest

from producers.camera_bridge import Ignored, mqtt_dead_letter, parse_message
from schemas.errors import InvalidRecord
from schemas.records import CameraEvent, DeadLetter


def _raw(**body: object) -> bytes:
    person = {"frame": 7, "oid": 123456789012, "type": "person", "x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9}
    return json.dumps({"ts": 1_795_000_000_000, "objects": [person], **body}).encode()


def test_raw_detections_become_a_camera_event_keyed_by_the_serial_in_the_topic() -> None:
    event = parse_message("/merakimv/Q2MV-store-001-ENTRANCE/raw_detections", _raw())
    assert isinstance(event, CameraEvent)
    assert (event.camera_serial, event.kind, event.event_time) == (
        "Q2MV-store-001-ENTRANCE",
        "RAW_DETECTIONS",
        1_795_000_000_000,
    )
    assert event.objects[0].oid == 123456789012 and event.objects[0].frame == 7
    assert CameraEvent.decode(event.encode()) == event


def test_zone_counts_keep_the_zone_id() -> None:
    payload = json.dumps({"ts": 1_795_000_000_000, "counts": {"person": 2, "vehicle": 0}}).encode()
    event = parse_message("/merakimv/Q2MV-A/0", payload)
    assert isinstance(event, CameraEvent) and event.kind == "ZONE_COUNT"
    assert event.zone_id == "0" and event.counts == {"person": 2, "vehicle": 0}


@pytest.mark.parametrize(
    "topic",
    [
        "/merakimv/Q2MV-A/light",
        "/merakimv/Q2MV-A/audio_detections",
        "/merakimv/Q2MV-A/custom_analytics",
        "/other/thing",
        "/merakimv/Q2MV-A",
    ],
)
def test_other_topics_are_ignored_not_dead_lettered(topic: str) -> None:
    assert isinstance(parse_message(topic, b"whatever, not even json"), Ignored)


def test_a_topic_prefix_isolates_a_test_run_on_a_shared_broker() -> None:
    assert isinstance(parse_message("run1/merakimv/Q2MV-A/raw_detections", _raw(), prefix="run1"), CameraEvent)
    assert isinstance(parse_message("/merakimv/Q2MV-A/raw_detections", _raw(), prefix="run1"), Ignored)


@pytest.mark.parametrize(
    ("payload", "kind", "words"),
    [
        (b"\xff\xfe not json", "not_json", "not JSON"),
        (b"[1, 2]", "invalid", "JSON object"),
        (json.dumps({"objects": []}).encode(), "invalid", "'ts'"),
        (json.dumps({"ts": 1, "objects": "x"}).encode(), "invalid", "'objects'"),
        (json.dumps({"ts": 1, "objects": [{"oid": "a", "type": "person"}]}).encode(), "invalid", "'oid'"),
        (json.dumps({"ts": 1, "objects": [{"oid": 1, "type": "person", "x0": "left"}]}).encode(), "invalid", "'x0'"),
        (b"{" + b" " * 300_000 + b"}", "oversized", "exceeds"),
    ],
)
def test_malformed_payloads_raise_with_a_reason(payload: bytes, kind: str, words: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message("/merakimv/Q2MV-A/raw_detections", payload)
    assert err.value.kind == kind and words in err.value.reason


def test_bad_zone_counts_are_invalid() -> None:
    with pytest.raises(InvalidRecord, match="non-negative"):
        parse_message("/merakimv/Q2MV-A/0", json.dumps({"ts": 5, "counts": {"person": -1}}).encode())


def test_dead_letter_of_an_mqtt_message_is_stable_for_a_redelivery() -> None:
    err = InvalidRecord("not_json", "payload is not JSON")
    a = mqtt_dead_letter("/merakimv/Q2MV-A/raw_detections", b"garbage", err, 1)
    b = mqtt_dead_letter("/merakimv/Q2MV-A/raw_detections", b"garbage", err, 2)
    assert a.dead_letter_id == b.dead_letter_id and a.dead_letter_id.startswith("mqtt:/merakimv/Q2MV-A/")
    assert DeadLetter.decode(a.encode()).payload == b"garbage"
