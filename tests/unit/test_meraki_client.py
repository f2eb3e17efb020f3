"""The Meraki snapshot client against the local camera, a real HTTP server speaking the Dashboard API.

The local camera reproduces the API's awkward parts (URL not ready at once, "No video for specified
timestamp", 429 with Retry-After, 5xx); the client must get through each of them inside its deadline.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from contextlib import closing

import pytest
from PIL import Image
from pydantic import SecretStr

from infra.clients.meraki import (
    MerakiClient,
    SnapshotError,
    api_base_url,
    camera_for_lane,
    camera_location,
    entrance_camera,
    iso_timestamp,
)
from infra.local.camera import LocalCameraControl, LocalCameraServer
from infra.retry import parse_retry_after
from infra.settings import CameraSettings, Settings
from tests.unit.faces_data import people_or_skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def camera_settings(**cameras: object) -> Settings:
    base = {
        "local_port": free_port(),
        "poll_interval_s": 0.02,
        "no_video_backoff_s": 0.05,
        "local_no_video_ms": 0,
        "local_not_ready_polls": 2,
        "local_rate_limit_per_s": 1000.0,
        "deadline_s": 5.0,
    }
    return Settings(cameras=CameraSettings(**{**base, **cameras}))


@pytest.fixture
def people() -> dict:
    return people_or_skip()


def running(settings: Settings, people: dict) -> LocalCameraServer:
    return LocalCameraServer(settings, publish=False, people=people).start()


class Sleeps:
    """Records the client's waits (and really waits, the server's clock is real)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def cam(people: dict) -> Iterator[tuple[Settings, LocalCameraServer]]:
    settings = camera_settings()
    server = running(settings, people)
    try:
        yield settings, server
    finally:
        server.stop()


def test_snapshot_polls_the_url_until_the_image_is_ready(cam) -> None:
    settings, server = cam
    with MerakiClient.from_settings(settings) as client:
        snap = client.snapshot("Q2MV-store-001-lane-01")
    assert snap.polls == 3  # two "not ready" answers, then the JPEG
    assert snap.content_type == "image/jpeg" and not snap.fell_back_to_now
    assert Image.open(io.BytesIO(snap.image)).size == (640, 480)


def test_snapshot_at_a_timestamp_shows_who_stood_at_the_lane_then(cam) -> None:
    settings, server = cam
    person = sorted(server.camera.scene.people)[0]
    now = int(time.time() * 1000)
    serial = camera_for_lane(settings, "store-001", "lane-02")
    with closing(LocalCameraControl(server.base_url)) as control:
        control.add_visit(person, "store-001", "lane-02", now - 60_000, now - 30_000, now - 20_000)
        truth = [p for p in control.ground_truth(serial) if p["person"] == person]
    assert truth and truth[0]["start_ms"] <= now - 30_000 < truth[0]["end_ms"]
    with MerakiClient.from_settings(settings) as client:
        during = client.snapshot(serial, now - 30_000).image
        after = client.snapshot(serial, now - 5_000).image
    assert during != after  # the paying person is in the first frame only (the face engine tests check who)


def test_recent_timestamp_is_retried_until_footage_exists(people) -> None:
    settings = camera_settings(local_no_video_ms=2500, no_video_backoff_s=0.5, no_video_max_tries=10)
    with running(settings, people):
        sleeps = Sleeps()
        with MerakiClient.from_settings(settings, sleep=sleeps) as client:
            snap = client.snapshot("Q2MV-store-001-lane-01", int(time.time() * 1000))
    assert snap.api_calls >= 2 and not snap.fell_back_to_now
    assert sleeps.waits[:2] == [0.5, 1.0]  # backoff doubles
    assert snap.image.startswith(b"\xff\xd8")


def test_no_video_falls_back_to_now_after_the_configured_tries_and_says_so(people) -> None:
    settings = camera_settings(local_no_video_ms=60_000, no_video_max_tries=2)
    with running(settings, people), MerakiClient.from_settings(settings) as client:
        snap = client.snapshot("Q2MV-store-001-lane-01", int(time.time() * 1000))
    assert snap.fell_back_to_now and snap.api_calls == 3


def test_no_video_without_fallback_is_an_error(people) -> None:
    settings = camera_settings(local_no_video_ms=60_000, no_video_max_tries=2, fallback_to_now=False)
    with running(settings, people), MerakiClient.from_settings(settings) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01", int(time.time() * 1000))
    assert err.value.kind == "no_video"


def test_429_retry_after_is_honoured(people) -> None:
    settings = camera_settings(local_rate_limit_per_s=1.0)
    with running(settings, people):
        sleeps = Sleeps()
        with MerakiClient.from_settings(settings, sleep=sleeps) as client:
            client.snapshot("Q2MV-store-001-lane-01")  # takes the only token
            started = time.monotonic()
            client.snapshot("Q2MV-store-001-lane-01")
    assert 1.0 in sleeps.waits  # Retry-After: 1
    assert time.monotonic() - started >= 0.9


def test_server_errors_are_retried(cam) -> None:
    settings, server = cam
    with closing(LocalCameraControl(server.base_url)) as control:
        control.set_fault("Q2MV-store-001-lane-01", "server_error", count=2)
    with MerakiClient.from_settings(settings) as client:
        snap = client.snapshot("Q2MV-store-001-lane-01")
    assert snap.image.startswith(b"\xff\xd8")


def test_persistent_server_errors_end_as_server_error(cam) -> None:
    settings, server = cam
    with closing(LocalCameraControl(server.base_url)) as control:
        control.set_fault("Q2MV-store-001-lane-01", "server_error")
    with MerakiClient.from_settings(settings) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "server_error"


def test_a_url_that_never_becomes_ready_ends_at_the_deadline(cam) -> None:
    settings, server = cam
    with closing(LocalCameraControl(server.base_url)) as control:
        control.set_fault("Q2MV-store-001-lane-01", "never_ready")
    with MerakiClient.from_settings(settings) as client:
        started = time.monotonic()
        with pytest.raises(SnapshotError) as err:
            client.snapshot("Q2MV-store-001-lane-01", deadline_s=0.5)
    assert err.value.kind in ("deadline", "not_ready")
    assert time.monotonic() - started < 1.0


def test_a_slow_image_ends_at_the_deadline_not_later(cam) -> None:
    settings, server = cam
    with closing(LocalCameraControl(server.base_url)) as control:
        control.set_fault("Q2MV-store-001-lane-01", "slow", delay_s=3)
    with MerakiClient.from_settings(settings) as client:
        started = time.monotonic()
        with pytest.raises(SnapshotError) as err:
            client.snapshot("Q2MV-store-001-lane-01", deadline_s=0.6)
    assert err.value.kind in ("deadline", "transport")
    assert time.monotonic() - started < 1.2


@pytest.mark.parametrize(("fault", "kind"), [("empty", "empty"), ("wrong_type", "wrong_type"), ("huge", "too_large")])
def test_bad_images_are_refused_with_a_reason(cam, fault: str, kind: str) -> None:
    settings, server = cam
    with closing(LocalCameraControl(server.base_url)) as control:
        control.set_fault("Q2MV-store-001-lane-01", fault)
    with MerakiClient.from_settings(settings) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == kind


def test_wrong_api_key_and_unknown_camera_are_errors(cam) -> None:
    settings, _ = cam
    wrong = settings.model_copy(update={"cameras": settings.cameras.model_copy(update={"api_key": SecretStr("nope")})})
    with MerakiClient.from_settings(wrong) as client, pytest.raises(SnapshotError, match="401"):
        client.snapshot("Q2MV-store-001-lane-01")
    with MerakiClient.from_settings(settings) as client, pytest.raises(SnapshotError, match="404"):
        client.snapshot("NOT-A-CAMERA")


def test_camera_map_defaults_and_explicit_entries() -> None:
    s = Settings()
    assert camera_for_lane(s, "store-001", "lane-03") == "Q2MV-store-001-lane-03"
    assert camera_location(s, "Q2MV-store-001-lane-03") == ("store-001", "lane-03")
    assert camera_location(s, entrance_camera(s, "store-007")) == ("store-007", None)
    assert camera_location(s, "Q2XX-0000-0000") is None
    explicit = Settings(
        cameras=CameraSettings(
            lane_cameras="store-001/lane-01=Q2AB-0001-0001", entrance_cameras="store-001=Q2AB-0001-0100"
        )
    )
    assert camera_for_lane(explicit, "store-001", "lane-01") == "Q2AB-0001-0001"
    assert camera_location(explicit, "Q2AB-0001-0001") == ("store-001", "lane-01")
    assert camera_location(explicit, "Q2AB-0001-0100") == ("store-001", None)
    assert api_base_url(s) == f"http://127.0.0.1:{s.cameras.local_port}/api/v1"


def test_timestamps_and_retry_after_parse_as_meraki_sends_them() -> None:
    assert iso_timestamp(1_795_000_000_123) == "2026-11-18T11:06:40Z"
    assert parse_retry_after("3", 1.0) == 3.0
    assert parse_retry_after(None, 1.0) == 1.0
    assert parse_retry_after("not a date", 2.0) == 2.0
