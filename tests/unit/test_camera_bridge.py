"""MV Sense MQTT messages -> CameraEvents, ignored topics and dead letters (pure parsing)."""

from __future__ import annotations

import json
import time

import pytest

from producers import camera_bridge
from producers.camera_bridge import Ignored, Outgoing, convert, json_too_deep, mqtt_dead_letter, parse_message
from schemas.errors import InvalidRecord
from schemas.records import CameraEvent, DeadLetter

NOW = 1_795_000_000_000


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
        (json.dumps({"ts": NOW, "objects": "x"}).encode(), "invalid", "'objects'"),
        (json.dumps({"ts": NOW, "objects": [{"oid": "a", "type": "person"}]}).encode(), "invalid", "'oid'"),
        (json.dumps({"ts": NOW, "objects": [{"oid": 1, "type": "person", "x0": "left"}]}).encode(), "invalid", "'x0'"),
        (b"{" + b" " * 300_000 + b"}", "oversized", "exceeds"),
    ],
)
def test_malformed_payloads_raise_with_a_reason(payload: bytes, kind: str, words: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message("/merakimv/Q2MV-A/raw_detections", payload)
    assert err.value.kind == kind and words in err.value.reason


def test_bad_zone_counts_are_invalid() -> None:
    with pytest.raises(InvalidRecord, match="non-negative"):
        parse_message("/merakimv/Q2MV-A/0", json.dumps({"ts": NOW, "counts": {"person": -1}}).encode())


def test_dead_letter_of_an_mqtt_message_is_stable_for_a_redelivery() -> None:
    err = InvalidRecord("not_json", "payload is not JSON")
    a = mqtt_dead_letter("/merakimv/Q2MV-A/raw_detections", b"garbage", err, 1)
    b = mqtt_dead_letter("/merakimv/Q2MV-A/raw_detections", b"garbage", err, 2)
    assert a.dead_letter_id == b.dead_letter_id and a.dead_letter_id.startswith("mqtt:/merakimv/Q2MV-A/")
    assert DeadLetter.decode(a.encode()).payload == b"garbage"


# ------------------------------------------------------------------ hostile messages (issue 12, defect 4)

RAW = "/merakimv/Q2MV-A/raw_detections"


def _person(**fields: object) -> dict[str, object]:
    return {"frame": 7, "oid": 1, "type": "person", "x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.9, **fields}


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"ts": 1e20, "objects": []}).encode(),  # encoding it overflowed Avro long
        b'{"ts": 100000000000000000000000, "objects": []}',
        json.dumps({"ts": -5, "objects": []}).encode(),
        json.dumps({"ts": 5_000_000_000_000, "objects": []}).encode(),  # the year 2128
    ],
)
def test_a_ts_outside_epoch_milliseconds_is_an_invalid_timestamp(payload: bytes) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(RAW, payload)
    assert err.value.kind == "invalid_timestamp" and "'ts'" in err.value.reason


@pytest.mark.parametrize("ts", [1_795_000_000, 1_795_000_000.0, 1])
def test_a_ts_in_epoch_seconds_is_an_invalid_timestamp_not_an_event_of_1970(ts: float) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(RAW, json.dumps({"ts": ts, "objects": []}).encode())
    assert err.value.kind == "invalid_timestamp"
    assert ("epoch seconds" in err.value.reason) == (ts != 1)


def test_the_earliest_and_latest_ts_taken_are_2000_and_2100() -> None:
    assert parse_message(RAW, json.dumps({"ts": 946_684_800_000, "objects": []}).encode()).event_time == 946_684_800_000
    assert (
        parse_message(RAW, json.dumps({"ts": 4_102_444_800_000, "objects": []}).encode()).event_time
        == 4_102_444_800_000
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ts": 1, "objects": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"ts": 1, "objects": [], "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    ],
)
def test_deeply_nested_json_is_refused_before_it_is_parsed(payload: bytes) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(RAW, payload)
    assert err.value.kind == "not_json" and "nested" in err.value.reason


def test_brackets_inside_strings_are_not_nesting() -> None:
    payload = json.dumps({"ts": NOW, "objects": [_person(type="[" * 30 + '"{' * 10)]}).encode()
    assert not json_too_deep(payload.decode())
    event = parse_message(RAW, payload)
    assert isinstance(event, CameraEvent) and event.objects[0].type.startswith("[[[")


def test_the_depth_scan_stays_fast_on_hostile_strings() -> None:
    start = time.perf_counter()
    assert not json_too_deep('["' + '\\"' * 80_000 + "[" * 20)  # escaped quotes, never closed
    assert json_too_deep("[" * 200_000)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b'{"ts": NaN, "objects": []}', "NaN"),
        (b'{"ts": 1795000000000, "objects": [], "x": Infinity}', "Infinity"),
    ],
)
def test_nan_and_infinity_are_not_json(payload: bytes, words: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(RAW, payload)
    assert err.value.kind == "not_json" and words in err.value.reason


@pytest.mark.parametrize(
    ("objects", "words"),
    [
        ([_person(oid=-1)], "'oid'"),
        ([_person(oid=2**63)], "'oid'"),
        ([_person(oid=True)], "'oid'"),
        ([_person(oid=1.5)], "'oid'"),
        ([_person(frame=-3)], "'frame'"),
        ([_person(x0=1.5)], "'x0'"),
        ([_person(y1=-0.1)], "'y1'"),
        ([_person(x1=True)], "'x1'"),
        ([_person(type="p" * 65)], "'type'"),
        ([_person(type=7)], "'type'"),
    ],
)
def test_out_of_range_or_mistyped_detections_are_invalid(objects: list[object], words: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(RAW, json.dumps({"ts": NOW, "objects": objects}).encode())
    assert err.value.kind == "invalid" and words in err.value.reason


@pytest.mark.parametrize(
    "counts",
    [
        {"person": 100_001},
        {"person": 2**40},  # past Avro int
        {"person": 1.0},
        {"person": True},
        {"person": None},
        {"p" * 65: 1},
    ],
)
def test_out_of_range_or_mistyped_zone_counts_are_invalid(counts: dict[str, object]) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message("/merakimv/Q2MV-A/0", json.dumps({"ts": NOW, "counts": counts}).encode())
    assert err.value.kind == "invalid"


@pytest.mark.parametrize("serial", ["..%2F..%2Fx", "..", "a b", "x?reboot", "é", "Q" * 129])
def test_a_serial_in_the_topic_that_is_no_identifier_is_invalid_id(serial: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(f"/merakimv/{serial}/raw_detections", json.dumps({"ts": NOW, "objects": []}).encode())
    assert err.value.kind == "invalid_id" and serial not in err.value.reason


@pytest.mark.parametrize("zone", ["0\n", "٣", "1" * 21])
def test_a_zone_id_must_be_ascii_digits(zone: str) -> None:
    assert isinstance(parse_message(f"/merakimv/Q2MV-A/{zone}", b"{}"), Ignored)


HOSTILE = [
    ("/merakimv/Q2MV-A/raw_detections", json.dumps({"ts": 1e20, "objects": []}).encode()),
    ("/merakimv/Q2MV-A/raw_detections", b"[" * 100_000 + b"]" * 100_000),
    ("/merakimv/Q2MV-A/raw_detections", b'{"ts": NaN, "objects": []}'),
    ("/merakimv/Q2MV-A/raw_detections", b"\xff\xfe not json"),
    (
        "/merakimv/Q2MV-A/raw_detections",
        b'{"ts": 1, "objects": [' + b'{"oid": 1, "type": "person"},' * 40_000 + b"{}]}",
    ),
    ("/merakimv/Q2MV-A/0", b'{"ts": 1700000000000, "counts": {"person": NaN}}'),
    ("/merakimv/..%2F..%2Fx/raw_detections", json.dumps({"ts": 1, "objects": []}).encode()),
]


@pytest.mark.parametrize(("topic", "payload"), HOSTILE)
def test_every_hostile_message_converts_to_a_dead_letter(topic: str, payload: bytes) -> None:
    out = convert(topic, payload, "", 256 * 1024, NOW)
    assert isinstance(out, Outgoing) and out.dead
    dl = DeadLetter.decode(out.value)
    assert dl.payload and payload.startswith(dl.payload)  # the original bytes (the builder may cut them)
    assert dl.source_topic == topic and dl.stage == "camera_bridge"
    assert out.key == dl.dead_letter_id.encode()


def test_an_exception_no_parser_anticipated_still_becomes_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> CameraEvent:
        raise KeyError("surprise")

    monkeypatch.setattr(camera_bridge, "parse_message", broken)
    out = convert(RAW, _raw(), "", 256 * 1024, NOW)
    assert isinstance(out, Outgoing) and out.dead
    dl = DeadLetter.decode(out.value)
    assert dl.error_kind == "invalid" and "KeyError" in dl.reason


def test_a_good_message_converts_to_its_event_keyed_by_serial() -> None:
    out = convert(RAW, _raw(), "", 256 * 1024, NOW)
    assert isinstance(out, Outgoing) and not out.dead and out.key == b"Q2MV-A"
    assert CameraEvent.decode(out.value).objects[0].oid == 123456789012


@pytest.mark.parametrize("payload", [_raw(), b"not json at all"])
def test_a_retained_message_is_stale_state_and_is_ignored_not_forwarded(payload: bytes) -> None:
    """The broker sends retained messages again on every resubscribe: none becomes an event again, and a
    stale broken one is no new dead letter either (it was dead-lettered when it was live)."""
    assert convert(RAW, payload, "", 256 * 1024, NOW, retained=True) == Ignored("retained")
    assert isinstance(convert(RAW, _raw(), "", 256 * 1024, NOW, retained=False), Outgoing)


@pytest.mark.parametrize(
    ("topic", "payload", "name"),
    [
        (RAW, b'{"ts": 1795000000000, "objects": [{"oid": 1, "type": "person"}], "objects": []}', "objects"),
        (RAW, b'{"ts": 1795000000000, "ts": 1795000009000, "objects": []}', "ts"),
        (RAW, b'{"ts": 1795000000000, "objects": [{"oid": 1, "oid": 2, "type": "person"}]}', "oid"),
        ("/merakimv/Q2MV-A/0", b'{"ts": 1795000000000, "counts": {"person": 3, "person": 0}}', "person"),
    ],
)
def test_a_field_named_twice_is_invalid_not_silently_the_last_one(topic: str, payload: bytes, name: str) -> None:
    with pytest.raises(InvalidRecord) as err:
        parse_message(topic, payload)
    assert err.value.kind == "invalid" and f"{name!r} more than once" in err.value.reason
    out = convert(topic, payload, "", 256 * 1024, NOW)
    assert isinstance(out, Outgoing) and out.dead and DeadLetter.decode(out.value).payload == payload
