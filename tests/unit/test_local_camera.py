"""The local camera's scene: who is where when, which photos make a person, what MV Sense says."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from infra.local.camera import ENTRANCE_DWELL_MS, Scene, load_people, raw_detections_payload, render
from infra.settings import Settings
from producers.camera_bridge import parse_message
from schemas.records import CameraEvent


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_people_are_subfolders_or_file_stems_without_digits(tmp_path) -> None:
    nested = tmp_path / "nested"
    _touch(nested / "alice" / "a.jpg")
    _touch(nested / "alice" / "b.png")
    _touch(nested / "loose.jpg")  # ignored: this folder is organised by person
    flat = tmp_path / "flat"
    for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "obama_partial_face.jpg", "32bit.png", "notes.txt"):
        _touch(flat / name)
    people = load_people([nested, flat])
    assert sorted(people) == ["alice", "biden", "obama"]
    assert [p.name for p in people["obama"]] == ["obama.jpg", "obama2.jpg"]


def _scene() -> Scene:
    return Scene(Settings(), {"ann": (Path("/a1.jpg"), Path("/a2.jpg")), "bob": (Path("/b1.jpg"),)})


def test_a_visit_puts_the_person_at_the_entrance_then_at_the_lane_until_they_leave() -> None:
    scene = _scene()
    v = scene.add_visit("ann", "store-001", "lane-02", enter_ms=100_000, pay_ms=160_000, leave_ms=170_000)
    door, lane = "Q2MV-store-001-ENTRANCE", "Q2MV-store-001-lane-02"
    assert [p.person for p in scene.at(door, 100_000)] == ["ann"]
    assert scene.at(door, 100_000 + ENTRANCE_DWELL_MS) == []
    assert scene.at(lane, 140_000) == []  # still shopping
    assert [p.person for p in scene.at(lane, 160_000)] == ["ann"]
    assert scene.at(lane, 170_001) == []
    truth = scene.ground_truth(lane)
    assert len(truth) == 1 and truth[0].visit_id == v.visit_id and truth[0].photo in ("/a1.jpg", "/a2.jpg")
    assert scene.ground_truth(door)[0].oid != truth[0].oid  # each camera tracks with its own oid


def test_the_person_paying_is_in_front_of_the_lane_camera() -> None:
    scene = _scene()
    scene.add_visit("ann", "s", "lane-01", 0, 20_000, 40_000)
    scene.add_visit("bob", "s", "lane-01", 10_000, 30_000, 50_000)
    assert [p.person for p in scene.at("Q2MV-s-lane-01", 20_000)] == ["ann", "bob"]
    assert [p.person for p in scene.at("Q2MV-s-lane-01", 30_000)] == ["bob", "ann"]


def test_at_a_whole_second_the_one_paying_within_it_is_in_front_not_the_one_a_second_before() -> None:
    """The API's snapshot times have no milliseconds: a sale at 21.954 s is snapshotted at 21 s, where ann,
    who paid at 20.954 s, was nearer its start -- and the officer enrolled her face for bob's fraud."""
    scene = Scene(Settings(), {name: (Path(f"/{name}.jpg"),) for name in ("ann", "bob", "cyd", "dan")})
    scene.add_visit("ann", "s", "lane-01", 0, 20_954, 40_000)
    scene.add_visit("bob", "s", "lane-01", 10_000, 21_954, 50_000)
    scene.add_visit("cyd", "s", "lane-01", 10_000, 23_000, 50_000)
    scene.add_visit("dan", "s", "lane-01", 10_000, 24_000, 50_000)
    lane = "Q2MV-s-lane-01"
    assert [p.person for p in scene.at(lane, 21_000, second=True)][:2] == ["bob", "ann"]
    assert [p.person for p in scene.at(lane, 20_000, second=True)][:2] == ["ann", "bob"]
    # paying on the second itself: as far from the middle as the next payer, and still the one in front
    assert [p.person for p in scene.at(lane, 23_000, second=True)][:2] == ["cyd", "dan"]
    # a time of "now" (milliseconds, even a whole second of them) is as it is
    assert [p.person for p in scene.at(lane, 21_000)][:2] == ["ann", "bob"]


def test_visits_are_validated_and_idempotent_by_id() -> None:
    scene = _scene()
    with pytest.raises(ValueError, match="unknown person"):
        scene.add_visit("zed", "s", "lane-01", 0, 1, 2)
    with pytest.raises(ValueError, match="enter_ms <= pay_ms"):
        scene.add_visit("ann", "s", "lane-01", 5, 1, 2)
    a = scene.add_visit("ann", "s", "lane-01", 0, 1, 2, visit_id="tx-1")
    assert scene.add_visit("ann", "s", "lane-01", 0, 1, 2, visit_id="tx-1") == a
    assert len(scene.ground_truth()) == 2


def test_mv_sense_payload_is_what_the_bridge_reads() -> None:
    scene, t0 = _scene(), 1_795_000_000_000  # the bridge takes epoch milliseconds from 2000 on
    scene.add_visit("ann", "s", "lane-01", t0 + 1_000, t0 + 20_000, t0 + 30_000)
    payload = raw_detections_payload(t0 + 1_500, scene.at("Q2MV-s-ENTRANCE", t0 + 1_500), frame=3)
    event = parse_message("/merakimv/Q2MV-s-ENTRANCE/raw_detections", json.dumps(payload).encode())
    assert isinstance(event, CameraEvent) and [o.oid for o in event.objects] == [scene.ground_truth()[0].oid]


def test_frames_are_640x480_jpegs_with_or_without_people(tmp_path) -> None:
    photo = tmp_path / "face.png"
    Image.new("RGB", (150, 150), (200, 170, 150)).save(photo)
    scene = Scene(Settings(), {"ann": (photo,)})
    scene.add_visit("ann", "s", "lane-01", 0, 1_000, 2_000)
    empty = render("Q2MV-s-lane-01", 1_000, [])
    full = render("Q2MV-s-lane-01", 1_000, scene.at("Q2MV-s-lane-01", 1_000))
    for data in (empty, full):
        assert Image.open(io.BytesIO(data)).format == "JPEG"
        assert Image.open(io.BytesIO(data)).size == (640, 480)
    assert empty != full


@pytest.mark.parametrize("body", [b"[]", b'"now"', b"3", b"null", b'[{"timestamp": "2026-01-01T00:00:00Z"}]'])
def test_a_snapshot_request_whose_body_is_json_but_no_object_is_a_400_as_meraki_answers(body: bytes) -> None:
    """Not a 500: a client retries a server error, where Meraki refuses the request for good."""
    from starlette.testclient import TestClient

    from infra.clients.meraki import API_KEY_HEADER
    from infra.local.camera import LocalCameraApp

    settings = Settings()
    app = LocalCameraApp(settings, people={})
    url = "/api/v1/devices/Q2MV-store-001-lane-01/camera/generateSnapshot"
    headers = {API_KEY_HEADER: settings.cameras.api_key.get_secret_value(), "Content-Type": "application/json"}
    with TestClient(app.app) as http:
        assert http.post(url, content=b"{}", headers=headers).status_code == 202, "an object is taken"
        answer = http.post(url, content=body, headers=headers)
    assert answer.status_code == 400
    errors = answer.json()["errors"]
    assert isinstance(errors, list) and errors and all(isinstance(e, str) for e in errors)


def _snapshot_api():
    from infra.clients.meraki import API_KEY_HEADER
    from infra.local.camera import LocalCameraApp

    settings = Settings()
    app = LocalCameraApp(settings, people={})
    url = "/api/v1/devices/Q2MV-store-001-lane-01/camera/generateSnapshot"
    headers = {API_KEY_HEADER: settings.cameras.api_key.get_secret_value(), "Content-Type": "application/json"}
    return app, url, headers


@pytest.mark.parametrize("stamp", ["2026-01-01T00:00:00", "2026-01-01 00:00:00", "2026-01-01"])
def test_a_snapshot_timestamp_without_a_time_zone_is_refused_as_the_dashboard_api_does(stamp: str) -> None:
    """The Dashboard API takes ISO 8601 with a zone (``Z`` or an offset); the stand-in read a bare timestamp as UTC,
    so a client sending local time passed here and asked Meraki for footage hours off, or was refused there."""
    from starlette.testclient import TestClient

    app, url, headers = _snapshot_api()
    with TestClient(app.app) as http:
        for zoned in ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00+01:00"):
            assert http.post(url, json={"timestamp": zoned}, headers=headers).status_code == 202, zoned
        answer = http.post(url, json={"timestamp": stamp}, headers=headers)
    assert answer.status_code == 400 and answer.json()["errors"]


def test_the_snapshot_answers_expiry_is_worded_as_the_dashboard_api_words_it() -> None:
    """Meraki answers ``"expiry": "Access to the image will expire at 2018-12-11T03:12:39Z."`` (ISO 8601, UTC); the
    stand-in wrote ``2018-12-11 03:12:39 UTC.``, so a client reading the time passed here and failed at Meraki."""
    import re
    from datetime import UTC, datetime

    from starlette.testclient import TestClient

    app, url, headers = _snapshot_api()
    with TestClient(app.app) as http:
        answer = http.post(url, json={}, headers=headers)
    assert answer.status_code == 202
    expiry = answer.json()["expiry"]
    found = re.fullmatch(r"Access to the image will expire at (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\.", expiry)
    assert found, expiry
    assert datetime.fromisoformat(found.group(1)) > datetime.now(UTC)


def test_the_snapshot_api_compares_the_api_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``!=`` stops at the first differing character, so a guesser could learn the key from the answer's timing."""
    import hmac

    from starlette.testclient import TestClient

    from infra.clients.meraki import API_KEY_HEADER

    app, url, headers = _snapshot_api()
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    key = headers[API_KEY_HEADER]
    with TestClient(app.app) as http:
        assert http.post(url, content=b"{}", headers=headers).status_code == 202
        assert http.post(url, content=b"{}", headers={**headers, API_KEY_HEADER: key[:-1] + "x"}).status_code == 401
        beyond_ascii = {**headers, API_KEY_HEADER: "kéy".encode("latin-1")}
        assert http.post(url, content=b"{}", headers=beyond_ascii).status_code == 401, "not a 500"
    assert len(compared) == 3
