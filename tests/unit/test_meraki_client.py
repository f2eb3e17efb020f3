"""The Meraki snapshot client against the local camera, a real HTTP server speaking the Dashboard API.

The local camera reproduces the API's awkward parts (URL not ready at once, "No video for specified
timestamp", 429 with Retry-After, 5xx); the client must get through each of them inside its deadline.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from infra.clients.meraki import (
    API_KEY_HEADER,
    MerakiClient,
    SnapshotError,
    api_base_url,
    camera_for_lane,
    camera_location,
    entrance_camera,
    iso_timestamp,
    path_segment,
    snapshot_hosts,
)
from infra.local.camera import LocalCameraControl, LocalCameraServer
from infra.retry import parse_retry_after
from infra.settings import CameraSettings, Settings
from schemas.errors import InvalidRecord
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
    settings = camera_settings(local_no_video_ms=2500, no_video_backoff_s=0.5, no_video_max_tries=10, deadline_s=10.0)
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


@pytest.mark.parametrize(
    "cameras",
    [
        {"entrance_cameras": "store-001=Q2AB-0001-0100"},
        {"lane_cameras": "store-001/lane-01=Q2AB-0001-0001"},
    ],
)
def test_a_serial_named_like_an_entrance_is_no_entrance_once_cameras_are_mapped(cameras: dict[str, str]) -> None:
    """Entrance events ask the Dashboard for snapshots by themselves: with maps set, a publisher naming a serial
    Q2MV-<store>-ENTRANCE had snapshots asked of a camera no map knows. Without maps (the demo) it still counts."""
    mapped = Settings(cameras=CameraSettings(**cameras))
    assert camera_location(mapped, "Q2MV-store-001-ENTRANCE") is None
    assert camera_location(mapped, "Q2MV-store-009-ENTRANCE") is None
    assert camera_location(mapped, "Q2MV-store-002-lane-04") == ("store-002", "lane-04")  # unmapped lanes fall back
    assert camera_location(Settings(), "Q2MV-store-001-ENTRANCE") == ("store-001", None)


@pytest.mark.parametrize(
    ("lanes", "entrances", "says"),
    [
        ("store-001:lane-01=Q2AB-0001-0001", "", "store_id/lane_id=serial"),  # ":" for "/"
        ("store-001/lane-01", "", "store_id/lane_id=serial"),  # no serial
        ("store-001/lane-01=Q2AB 0001", "", "no camera serial"),
        ("", "store-001=Q2AB-0001-0100;store-002=Q2AB-0001-0200", "no camera serial"),  # ";" for ","
        ("", "store 001=Q2AB-0001-0100", "store_id=serial"),
        ("store-001/lane-01=Q2AB-0001-0001,store-001/lane-01=Q2AB-0001-0002", "", "twice"),
    ],
)
def test_a_camera_map_typo_is_a_settings_error_at_start_not_a_failure_per_record(
    lanes: str, entrances: str, says: str
) -> None:
    """Accepted before, it dead-lettered every transaction in the face stage (ValueError per record) or silently
    mapped a store to a serial no camera has."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says) as err:
        Settings(cameras=CameraSettings(lane_cameras=lanes, entrance_cameras=entrances))
    assert err.value.errors()[0]["loc"][-1] == ("lane_cameras" if lanes else "entrance_cameras")
    ok = Settings(cameras=CameraSettings(lane_cameras=" store-001/lane-01 = Q2AB-0001-0001 ,", entrance_cameras=""))
    assert camera_for_lane(ok, "store-001", "lane-01") == "Q2AB-0001-0001"


def test_timestamps_and_retry_after_parse_as_meraki_sends_them() -> None:
    assert iso_timestamp(1_795_000_000_123) == "2026-11-18T11:06:40Z"
    assert parse_retry_after("3", 1.0) == 3.0
    assert parse_retry_after(None, 1.0) == 1.0
    assert parse_retry_after("not a date", 2.0) == 2.0


# --------------------------------------------------------------------------------------------------
# Edges: what reaches the Dashboard API, and which snapshot URLs are fetched. httpx's MockTransport
# records every request the client really makes (path as sent, host, headers).

HOSTILE_STORE = "x/../Q2XX-VICTIM-0001/reboot?"
JPEG = b"\xff\xd8\xff\xe0" + bytes(64)


class Dashboard:
    """A Dashboard API answering generateSnapshot with ``snapshot_url``; the image from any other path."""

    def __init__(self, snapshot_url: str = "http://cam.test/snapshots/t1.jpg", retry_after: str | None = None) -> None:
        self.snapshot_url, self.retry_after = snapshot_url, retry_after
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.retry_after is not None:
            return httpx.Response(429, headers={"Retry-After": self.retry_after}, json={"errors": ["rate"]})
        if request.url.raw_path.endswith(b"/generateSnapshot"):
            return httpx.Response(202, json={"url": self.snapshot_url, "expiry": "later"})
        return httpx.Response(200, headers={"Content-Type": "image/jpeg"}, content=JPEG)

    @property
    def seen(self) -> list[tuple[str, str, bytes]]:
        return [(r.method, r.url.host, r.url.raw_path) for r in self.requests]


def dashboard_client(api: Dashboard, base_url: str = "http://cam.test/api/v1", **cameras: object) -> MerakiClient:
    sleeps: list[float] = []
    client = MerakiClient(
        CameraSettings(**cameras),  # type: ignore[arg-type]
        base_url,
        http=httpx.Client(transport=httpx.MockTransport(api)),
        sleep=sleeps.append,
    )
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def test_a_store_id_that_is_no_name_never_becomes_a_camera_serial() -> None:
    s = Settings()
    with pytest.raises(InvalidRecord) as err:
        camera_for_lane(s, HOSTILE_STORE, "lane-01")
    assert err.value.kind == "invalid_id" and HOSTILE_STORE not in err.value.reason
    for store, lane in [("store-001", "lane-01/../../x"), ("store 1", "lane-01"), ("", "lane-01"), ("..", "lane")]:
        with pytest.raises(InvalidRecord):
            camera_for_lane(s, store, lane)
    with pytest.raises(InvalidRecord):
        entrance_camera(s, HOSTILE_STORE)
    assert camera_location(s, f"Q2MV-{HOSTILE_STORE}-ENTRANCE") is None
    assert camera_location(s, f"Q2MV-{HOSTILE_STORE}-lane-01") is None


@pytest.mark.parametrize(
    "serial",
    [f"Q2MV-{HOSTILE_STORE}-lane-01", "Q2XX-VICTIM-0001/reboot", "..", "Q2MV-a%2F..", "Q2MV-a b", "", "Q2MV-é"],
)
def test_an_invalid_serial_is_refused_before_any_request(serial: str) -> None:
    api = Dashboard()
    with dashboard_client(api) as client, pytest.raises(SnapshotError) as err:
        client.snapshot(serial)
    assert err.value.kind == "invalid_serial"
    assert api.requests == []


def test_the_serial_is_sent_as_one_escaped_path_segment_and_the_key_only_to_the_api() -> None:
    api = Dashboard()
    with dashboard_client(api) as client:
        snap = client.snapshot("Q2MV-store-001-lane-01")
    assert snap.image == JPEG
    assert api.seen == [
        ("POST", "cam.test", b"/api/v1/devices/Q2MV-store-001-lane-01/camera/generateSnapshot"),
        ("GET", "cam.test", b"/snapshots/t1.jpg"),
    ]
    assert API_KEY_HEADER in api.requests[0].headers and API_KEY_HEADER not in api.requests[1].headers
    assert path_segment("x/../Q2XX?a#b c") == "x%2F%2E%2E%2FQ2XX%3Fa%23b%20c"
    assert path_segment("..") == "%2E%2E"


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.test/snapshots/t1.jpg",  # another host
        "http://cam.test.evil.test/snapshots/t1.jpg",  # the allowed host as a prefix
        "http://user:pw@cam.test/snapshots/t1.jpg",  # credentials in the URL
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
    ],
)
def test_a_snapshot_url_on_a_host_not_allowed_is_never_fetched(url: str) -> None:
    api = Dashboard(snapshot_url=url)
    with dashboard_client(api) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "untrusted_url"
    assert [m for m, _, _ in api.seen] == ["POST"], "only generateSnapshot, the URL is not fetched"


def test_the_real_dashboard_allows_meraki_snapshot_hosts_over_https_only() -> None:
    base = "https://api.meraki.com/api/v1"
    api = Dashboard(snapshot_url="https://spn4.meraki.com/stream/jpeg/snapshot/b2d1")
    with dashboard_client(api, base) as client:
        assert client.snapshot("Q2GV-ABCD-1234").image == JPEG
    assert api.seen[-1] == ("GET", "spn4.meraki.com", b"/stream/jpeg/snapshot/b2d1")
    for url in ("http://spn4.meraki.com/x.jpg", "https://meraki.com.evil.test/x.jpg", "https://evilmeraki.com/x"):
        with dashboard_client(Dashboard(snapshot_url=url), base) as client, pytest.raises(SnapshotError) as err:
            client.snapshot("Q2GV-ABCD-1234")
        assert err.value.kind == "untrusted_url", url
    configured = CameraSettings(snapshot_hosts="*.cdn.example, images.example")
    assert snapshot_hosts(configured, base) == ("*.cdn.example", "images.example")
    assert snapshot_hosts(CameraSettings(), base) == ("api.meraki.com", "*.meraki.com")
    assert snapshot_hosts(CameraSettings(), "http://127.0.0.1:8765/api/v1") == ("127.0.0.1",)
    api = Dashboard(snapshot_url="https://a.cdn.example/x.jpg")
    with dashboard_client(api, base, snapshot_hosts="*.cdn.example") as client:
        assert client.snapshot("Q2GV-ABCD-1234").image == JPEG


class Sharded(Dashboard):
    """The Dashboard answering api.meraki.com with a redirect to the organisation's shard (``location``)."""

    def __init__(self, location: str, status: int = 308) -> None:
        super().__init__(snapshot_url="https://spn4.meraki.com/stream/jpeg/snapshot/b2d1")
        self.location, self.status = location, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.meraki.com" or (request.url.host == "loop.meraki.com"):
            self.requests.append(request)
            return httpx.Response(self.status, headers={"Location": self.location})
        return super().__call__(request)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_dashboard_redirect_to_the_organisations_shard_is_followed_with_the_key(status: int) -> None:
    """Meraki's own library follows the Dashboard's 3xx; an HTTP 308 used to end every snapshot as http_error."""
    path = "/api/v1/devices/Q2GV-ABCD-1234/camera/generateSnapshot"
    api = Sharded(f"https://n149.meraki.com{path}", status)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client:
        snap = client.snapshot("Q2GV-ABCD-1234", 1_795_000_000_000)
    assert snap.image == JPEG and snap.api_calls == 2
    assert api.seen == [
        ("POST", "api.meraki.com", path.encode()),
        ("POST", "n149.meraki.com", path.encode()),
        ("GET", "spn4.meraki.com", b"/stream/jpeg/snapshot/b2d1"),
    ]
    assert api.requests[1].headers[API_KEY_HEADER] == "local-camera-key"
    assert api.requests[1].content == api.requests[0].content == b'{"timestamp":"2026-11-18T11:06:40Z"}'


@pytest.mark.parametrize(
    "location",
    [
        "https://evil.test/api/v1/devices/Q2GV-ABCD-1234/camera/generateSnapshot",
        "https://meraki.com.evil.test/api/v1/x",
        "http://n149.meraki.com/api/v1/x",  # the key in clear
        "https://user:pw@n149.meraki.com/api/v1/x",
    ],
)
def test_a_dashboard_redirect_elsewhere_is_refused_and_the_key_never_sent_there(location: str) -> None:
    api = Sharded(location)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "untrusted_url" and "pw" not in str(err.value)
    assert [host for _, host, _ in api.seen] == ["api.meraki.com"]


def test_a_redirect_loop_ends_as_an_error_not_a_hang() -> None:
    api = Sharded("https://loop.meraki.com/api/v1/x")
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "http_error" and "redirected more than" in err.value.reason
    assert len(api.requests) == 4


class Flaky(Dashboard):
    """The image host times out on the first ``timeouts`` polls (a slow connect), then answers."""

    def __init__(self, timeouts: int) -> None:
        super().__init__(snapshot_url="https://spn4.meraki.com/stream/jpeg/snapshot/b2d1")
        self.timeouts = timeouts

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and self.timeouts > 0:
            self.timeouts -= 1
            self.requests.append(request)
            raise httpx.ConnectTimeout("timed out", request=request)
        return super().__call__(request)


def test_a_timeout_with_budget_left_is_retried_like_any_transport_error() -> None:
    """One slow connect to the image host ended the snapshot (``transport``) with most of its 30 s left."""
    api = Flaky(timeouts=2)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client:
        assert client.snapshot("Q2GV-ABCD-1234").image == JPEG
    assert [m for m, _, _ in api.seen] == ["POST", "GET", "GET", "GET"]
    api = Flaky(timeouts=10)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "transport" and "ConnectTimeout" in err.value.reason
    assert [m for m, _, _ in api.seen] == ["POST", "GET", "GET", "GET", "GET"], "3 retries, then it gives up"


def test_a_retry_after_beyond_the_deadline_fails_at_once_instead_of_sleeping() -> None:
    api = Dashboard(retry_after="86400")
    with dashboard_client(api, deadline_s=5.0) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "rate_limited"
    assert client.sleeps == [] and len(api.requests) == 1  # type: ignore[attr-defined]


class SlowFootage:
    """A Dashboard on a virtual clock whose footage is stored ``lag_s`` after it was recorded (protocols.md: up
    to a couple of minutes): a timestamp newer than that is ``No video``; "now" is a URL ready on poll
    ``ready_on``. Each exchange takes ``rtt_s``."""

    def __init__(self, lag_s: float, ready_on: int, rtt_s: float = 0.15, start: float = 1_800_000_000.0) -> None:
        self.now, self.lag_s, self.ready_on, self.rtt_s = start, lag_s, ready_on, rtt_s
        self.posts: list[tuple[float, bool]] = []
        """(seconds since the start, with a timestamp) of every generateSnapshot."""
        self.start = start
        self.polls = 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def __call__(self, request: httpx.Request) -> httpx.Response:
        import json
        from calendar import timegm

        self.now += self.rtt_s
        if request.method == "POST":
            body = json.loads(request.content or b"{}")
            self.posts.append((round(self.now - self.start, 1), "timestamp" in body))
            if "timestamp" in body:
                at = timegm(time.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
                if at > self.now - self.lag_s:
                    return httpx.Response(400, json={"errors": ["No video for specified timestamp"]})
            self.polls = 0
            return httpx.Response(202, json={"url": "https://spn4.meraki.com/snap/t.jpg", "expiry": "later"})
        self.polls += 1
        if self.polls < self.ready_on:
            return httpx.Response(404)
        return httpx.Response(200, headers={"Content-Type": "image/jpeg"}, content=JPEG)

    def client(self, **cameras: object) -> MerakiClient:
        return MerakiClient(
            CameraSettings(**cameras),  # type: ignore[arg-type]
            "https://api.meraki.com/api/v1",
            http=httpx.Client(transport=httpx.MockTransport(self)),
            sleep=self.sleep,
            clock=self.clock,
        )


def test_no_video_retries_leave_the_fallback_to_now_its_share_of_the_deadline() -> None:
    """Footage two minutes behind: the retries stop in time for a "now" whose URL needs ten polls."""
    api = SlowFootage(lag_s=120, ready_on=10)
    with api.client() as client:
        snap = client.snapshot("Q2MV-ABCD-0001", int(api.start * 1000))
    assert snap.fell_back_to_now and snap.image == JPEG and snap.elapsed_s <= 30
    asked = [t for t, with_timestamp in api.posts if with_timestamp]
    fallback = [t for t, with_timestamp in api.posts if not with_timestamp]
    assert len(asked) >= 3 and len(fallback) == 1 and fallback[0] <= 30 * (1 - CameraSettings().fallback_share) + 1


def test_a_longer_no_video_backoff_still_falls_back_to_now() -> None:
    api = SlowFootage(lag_s=120, ready_on=3)
    with api.client(no_video_backoff_s=10.0) as client:
        snap = client.snapshot("Q2MV-ABCD-0001", int(api.start * 1000))
    assert snap.fell_back_to_now and [with_ts for _, with_ts in api.posts] == [True, True, False]


def test_footage_stored_within_the_retries_is_the_transaction_time_not_now() -> None:
    api = SlowFootage(lag_s=10, ready_on=3)
    with api.client() as client:
        snap = client.snapshot("Q2MV-ABCD-0001", int(api.start * 1000))
    assert not snap.fell_back_to_now and all(with_ts for _, with_ts in api.posts)


class Relocating(Dashboard):
    """An image host that answers the snapshot URL with a redirect to ``location`` (where the image is stored)."""

    def __init__(self, location: str, status: int = 302) -> None:
        super().__init__(snapshot_url="https://spn4.meraki.com/stream/jpeg/snapshot/b2d1")
        self.location, self.status = location, status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.startswith("/stream/"):
            self.requests.append(request)
            return httpx.Response(self.status, headers={"Location": self.location})
        return super().__call__(request)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", ["https://spn7.meraki.com/img/b2d1.jpg", "/img/b2d1.jpg"])
def test_a_redirect_of_the_snapshot_url_is_followed_to_an_allowed_host_without_the_key(
    status: int, location: str
) -> None:
    """An image host's 3xx ended the snapshot as http_error 'snapshot URL HTTP 302' (face UNAVAILABLE)."""
    api = Relocating(location, status)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client:
        snap = client.snapshot("Q2GV-ABCD-1234")
    assert snap.image == JPEG and snap.polls == 1
    host = "spn7.meraki.com" if location.startswith("https") else "spn4.meraki.com"
    assert api.seen[1:] == [
        ("GET", "spn4.meraki.com", b"/stream/jpeg/snapshot/b2d1"),
        ("GET", host, b"/img/b2d1.jpg"),
    ]
    assert all(API_KEY_HEADER not in r.headers for r in api.requests if r.method == "GET")


@pytest.mark.parametrize(
    "location",
    [
        "https://evil.test/img/b2d1.jpg",
        "https://meraki.com.evil.test/img/b2d1.jpg",
        "http://spn7.meraki.com/img/b2d1.jpg",  # https only
        "https://user:pw@spn7.meraki.com/img/b2d1.jpg",
        "http://169.254.169.254/latest/meta-data/",
    ],
)
def test_a_redirect_of_the_snapshot_url_elsewhere_is_refused_unfetched(location: str) -> None:
    api = Relocating(location)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "untrusted_url" and "pw" not in str(err.value) and "b2d1" not in str(err.value)
    assert api.seen[1:] == [("GET", "spn4.meraki.com", b"/stream/jpeg/snapshot/b2d1")]


def test_a_redirect_loop_of_the_image_host_ends_as_an_error_not_a_hang() -> None:
    api = Relocating("https://spn4.meraki.com/stream/jpeg/snapshot/b2d1")
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "http_error" and "redirected more than 3 times" in err.value.reason
    assert [m for m, _, _ in api.seen] == ["POST", "GET", "GET", "GET", "GET"]
    api = Relocating("")
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2GV-ABCD-1234")
    assert err.value.kind == "http_error" and "without a Location" in err.value.reason


class CuttingImageHost:
    """A local HTTP server speaking generateSnapshot, whose image GETs are cut off mid-body the first ``cuts``
    times: ``short`` closes after part of its Content-Length, ``reset`` resets the connection, ``stall`` stops
    sending (a read timeout), ``trickle`` sends a byte every 50 ms for 0.8 s, then stalls for 3 s. Real sockets, so
    httpx sees what it sees from a real image host."""

    def __init__(self, mode: str, cuts: int) -> None:
        import socketserver
        import threading

        self.mode, self.cuts, self.gets = mode, cuts, 0
        host = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline()
                    if not line:
                        return
                    head += line
                length = next(
                    (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
                )
                self.rfile.read(length)
                host.answer(head.split(b" ")[0], self.connection)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: bytes, conn: socket.socket) -> None:
        import struct

        if method == b"POST":
            body = f'{{"url": "{self.base_url[: -len("/api/v1")]}/snapshots/t1.jpg"}}'.encode()
            conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nConnection: close\r\n")
            conn.sendall(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        self.gets += 1
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        conn.sendall(head % len(JPEG))
        if self.gets > self.cuts:
            conn.sendall(JPEG)
            return
        conn.sendall(JPEG[:20])
        if self.mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self.mode == "stall":
            time.sleep(0.5)
        elif self.mode == "trickle":
            for byte in JPEG[20:36]:
                time.sleep(0.05)
                conn.sendall(bytes([byte]))
            time.sleep(3.0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["short", "reset", "stall"])
def test_an_image_download_cut_off_mid_body_is_fetched_again_within_the_deadline(mode: str) -> None:
    """A read timeout or a reset after the image started ended the snapshot as transport with budget left."""
    host = CuttingImageHost(mode, cuts=2)
    waits: list[float] = []
    cameras = CameraSettings(request_timeout_s=0.2, deadline_s=5.0)
    try:
        with MerakiClient(cameras, host.base_url, sleep=waits.append) as client:
            snap = client.snapshot("Q2MV-store-001-lane-01")
        assert snap.image == JPEG and snap.polls == 3 and host.gets == 3
        assert waits == [0.2, 0.4]
        host.cuts, host.gets = 10, 0
        with MerakiClient(cameras, host.base_url, sleep=waits.append) as client, pytest.raises(SnapshotError) as err:
            client.snapshot("Q2MV-store-001-lane-01")
        assert err.value.kind == "transport" and "(4 tries)" in err.value.reason, "3 retries, then it gives up"
        assert host.gets == 4
    finally:
        host.close()


def test_an_image_download_cut_off_at_the_deadline_is_not_fetched_again() -> None:
    host = CuttingImageHost("stall", cuts=10)
    cameras = CameraSettings(request_timeout_s=5.0, deadline_s=0.4)
    try:
        with MerakiClient(cameras, host.base_url) as client, pytest.raises(SnapshotError) as err:
            started = time.monotonic()
            client.snapshot("Q2MV-store-001-lane-01")
        assert err.value.kind == "deadline" and time.monotonic() - started < 0.8
        assert host.gets == 1
    finally:
        host.close()


def test_an_image_that_trickles_in_then_stalls_ends_at_the_deadline_not_a_request_timeout_later() -> None:
    """Each read waited up to the request timeout, however little of the deadline was left: a body arriving until
    just before the deadline and then stalling held the snapshot up to ``request_timeout_s`` past it."""
    host = CuttingImageHost("trickle", cuts=10)
    cameras = CameraSettings(request_timeout_s=2.0, deadline_s=1.0)
    try:
        with MerakiClient(cameras, host.base_url) as client, pytest.raises(SnapshotError) as err:
            started = time.monotonic()
            client.snapshot("Q2MV-store-001-lane-01")
        assert err.value.kind == "deadline" and time.monotonic() - started < 1.3
        assert host.gets == 1
    finally:
        host.close()


class Imaging(Dashboard):
    """An image host answering the snapshot URL with ``body`` as ``content_type``."""

    def __init__(self, content_type: str, body: bytes) -> None:
        super().__init__()
        self.content_type, self.body = content_type, body

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            self.requests.append(request)
            return httpx.Response(200, headers={"Content-Type": self.content_type}, content=self.body)
        return super().__call__(request)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("image/gif", b"GIF89a" + bytes(64)),
        ("image/webp", b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(64)),
        ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
        ("image/png", b"GIF89a" + bytes(64)),  # a GIF labelled PNG
    ],
)
def test_an_image_the_face_stage_cannot_decode_is_refused_not_stored(content_type: str, body: bytes) -> None:
    """Any image/* was accepted: a GIF, WebP or SVG was stored, served as a JPEG and then refused by the face engine."""
    with dashboard_client(Imaging(content_type, body)) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "unsupported_image" and "not JPEG or PNG" in err.value.reason


def test_a_png_or_a_jpeg_is_accepted_and_named_by_its_bytes() -> None:
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    with dashboard_client(Imaging("image/png", png.getvalue())) as client:
        snap = client.snapshot("Q2MV-store-001-lane-01")
    assert snap.image == png.getvalue() and snap.content_type == "image/png"
    with dashboard_client(Imaging("image/jpg", JPEG)) as client:
        assert client.snapshot("Q2MV-store-001-lane-01").content_type == "image/jpeg"
    with dashboard_client(Imaging("image/x-png", png.getvalue())) as client:
        assert client.snapshot("Q2MV-store-001-lane-01").content_type == "image/png"
    with dashboard_client(Imaging("image/jpeg", png.getvalue())) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "not_jpeg"


@pytest.mark.parametrize("url", ["HTTPS://spn4.meraki.com/stream/jpeg/snapshot/b2d1", "Https://SPN4.Meraki.com/x.jpg"])
def test_a_snapshot_url_with_an_upper_case_scheme_is_fetched(url: str) -> None:
    """The scheme is case-insensitive (RFC 3986); ``HTTPS://`` ended the snapshot as 'answered an invalid url'."""
    api = Dashboard(snapshot_url=url)
    with dashboard_client(api, "https://api.meraki.com/api/v1") as client:
        assert client.snapshot("Q2GV-ABCD-1234").image == JPEG
    assert [(m, host) for m, host, _ in api.seen] == [("POST", "api.meraki.com"), ("GET", "spn4.meraki.com")]
    assert api.requests[1].url.scheme == "https"


class Mislabelled(Dashboard):
    """An image host answering the snapshot URL with the JPEG and a Content-Length of ``length``."""

    def __init__(self, length: str) -> None:
        super().__init__()
        self.length = length

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            headers = {"Content-Type": "image/jpeg", "Content-Length": self.length}
            return httpx.Response(200, headers=headers, stream=httpx.ByteStream(JPEG))
        return super().__call__(request)


@pytest.mark.parametrize("length", ["abc", "12 34", "-5", "1e3"])
def test_a_content_length_that_is_no_number_is_a_snapshot_error_not_a_crash(length: str) -> None:
    """``int()`` of it raised a bare ValueError out of the snapshot client (the face stage's record failed)."""
    with dashboard_client(Mislabelled(length)) as client, pytest.raises(SnapshotError) as err:
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "http_error" and "Content-Length" in err.value.reason
    with dashboard_client(Mislabelled(str(len(JPEG)))) as client:
        assert client.snapshot("Q2MV-store-001-lane-01").image == JPEG


class ScriptedHost:
    """A local HTTP server speaking generateSnapshot: ``post`` answers it (given the snapshot URL on this server),
    ``get`` answers the snapshot URL; each a whole raw HTTP response, so nothing normalises what is sent.
    ``heads`` keeps the request heads it got."""

    def __init__(self, post: Callable[[bytes], bytes], get: bytes = b"") -> None:
        import socketserver
        import threading

        self.post, self.get, self.heads = post, get, []
        host = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = self.rfile.readline()
                    if not line:
                        return
                    head += line
                host.heads.append(head)
                length = next(
                    (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
                )
                self.rfile.read(length)
                url = f"{host.base_url[: -len('/api/v1')]}/snapshots/t1.jpg".encode()
                answer = host.post(url) if head.startswith(b"POST") else host.get
                self.connection.sendall(answer)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> ScriptedHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_answer(status: str, content_type: str, body: bytes, encoding: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    return (head + (f"Content-Encoding: {encoding}\r\n" if encoding else "") + "\r\n").encode() + body


def URL_REPLY(url: bytes) -> bytes:  # noqa: N802 - a constant answer, but for the server's own address
    return http_answer("202 Accepted", "application/json", b'{"url": "%s"}' % url)


def test_a_compressed_image_bomb_is_refused_without_inflating_it_in_memory() -> None:
    """httpx's ``iter_bytes`` inflated each read whole before the size check: 60 kB of gzip became 60 MB at once."""
    import gzip
    import tracemalloc

    bomb = gzip.compress(JPEG + bytes(60 * 1024 * 1024), 9)
    assert len(bomb) < 100 * 1024
    cameras = CameraSettings(max_image_bytes=1024 * 1024)
    with ScriptedHost(URL_REPLY, http_answer("200 OK", "image/jpeg", bomb, "gzip")) as host:
        with MerakiClient(cameras, host.base_url) as client, pytest.raises(SnapshotError) as err:
            tracemalloc.start()
            try:
                client.snapshot("Q2MV-store-001-lane-01")
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        heads = host.heads
    assert err.value.kind == "too_large"
    assert peak < 8 * 1024 * 1024, f"{peak} bytes in memory for a 1 MiB limit"
    assert b"accept-encoding: identity" in heads[-1].lower(), "no compression is asked for"


def test_a_compressed_image_counts_its_bytes_both_as_sent_and_as_decoded() -> None:
    """A host that compresses anyway is decoded within the limit; its Content-Length counts the bytes sent, the limit
    both those and the image's; an encoding that is not decoded here is refused."""
    import gzip
    import zlib

    image = JPEG + bytes(4000)
    for encoding, body in [("gzip", gzip.compress(image)), ("deflate", zlib.compress(image)), ("", image)]:
        with ScriptedHost(URL_REPLY, http_answer("200 OK", "image/jpeg", body, encoding)) as host:
            with MerakiClient(CameraSettings(max_image_bytes=len(image)), host.base_url) as client:
                assert client.snapshot("Q2MV-store-001-lane-01").image == image, encoding
            smaller = CameraSettings(max_image_bytes=len(image) - 1)
            with MerakiClient(smaller, host.base_url) as client, pytest.raises(SnapshotError) as err:
                client.snapshot("Q2MV-store-001-lane-01")
            assert err.value.kind == "too_large", encoding
    for encoding, body, says in [("br", b"\x0b\x02\x80hi\x03", "'br'"), ("gzip", b"not gzip", "does not decode")]:
        answer = http_answer("200 OK", "image/jpeg", body, encoding)
        with (
            ScriptedHost(URL_REPLY, answer) as host,
            MerakiClient(CameraSettings(), host.base_url) as client,
            pytest.raises(SnapshotError) as err,
        ):
            client.snapshot("Q2MV-store-001-lane-01")
        assert err.value.kind == "http_error" and says in err.value.reason, encoding


@pytest.mark.parametrize("status", ["202 Accepted", "400 Bad Request"])
def test_a_generate_snapshot_reply_nested_too_deep_is_an_http_error_not_a_recursion_error(status: str) -> None:
    """json raised RecursionError for it, which no caller catches as a snapshot failure."""
    deep = b'{"url": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    with (
        ScriptedHost(lambda url: http_answer(status, "application/json", deep)) as host,
        MerakiClient(CameraSettings(), host.base_url) as client,
        pytest.raises(SnapshotError) as err,
    ):
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "http_error"
    assert b"accept-encoding: identity" in host.heads[0].lower()


def test_a_generate_snapshot_reply_longer_than_an_api_answer_is_refused_unread() -> None:
    """The reply was read whole, however long: a URL padded with 20 MB was taken."""
    pad = b'{"url": "%s", "expiry": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    with (
        ScriptedHost(lambda url: http_answer("202 Accepted", "application/json", pad.replace(b"%s", url, 1))) as host,
        MerakiClient(CameraSettings(), host.base_url) as client,
        pytest.raises(SnapshotError) as err,
    ):
        client.snapshot("Q2MV-store-001-lane-01")
    assert err.value.kind == "http_error" and "65536" in err.value.reason
    assert len(host.heads) == 1, "the snapshot URL is not fetched"
