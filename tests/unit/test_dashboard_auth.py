"""The dashboard behind a login: with a user/password or a token configured, every page, JSON, image and
static endpoint answers 401 with a challenge to anyone without them; with neither, it refuses to serve
anywhere but loopback (its snapshots are faces, found by guessable alert ids)."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import pytest
import uvicorn
from PIL import Image
from pydantic import SecretStr
from starlette.testclient import TestClient
from typer.testing import CliRunner

import sinks.dashboard.__main__ as dashboard_main
from infra.metrics import ConsumerLagCollector, Endpoint
from infra.settings import DashboardSettings, Settings
from sinks.dashboard.app import Dashboard, DashboardConfigError, check_exposure, create_app, is_loopback

PATHS = (
    "/",
    "/alerts/blocked:tx-1",
    "/static/app.js",
    "/static/common.js",
    "/static/models.js",
    "/models",
    "/api/config",
    "/api/overview",
    "/api/alerts",
    "/api/faces",
    "/api/models",
    "/api/drift",
    "/api/alerts/blocked:tx-1",
    "/api/alerts/blocked:tx-1/snapshot",
    "/pipeline",
    "/api/pipeline",
    "/static/pipeline.js",
    "/cases",
    "/cases/case-0123456789ab",
    "/cases/case-0123456789ab/images/live",
    "/api/cases",
    "/api/cases/figures",
    "/api/cases/case-0123456789ab",
    "/static/cases.js",
    "/static/case.js",
)


def unserved(settings: Settings) -> tuple[ConsumerLagCollector, Endpoint]:
    """The dashboard's metrics, neither started nor served: no Kafka read, no port, no global registry."""
    return ConsumerLagCollector(settings), Endpoint("dashboard", 0, None)


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


class FakeSearch:
    """Answers every search with one alert that has a snapshot, and empty aggregations."""

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        source = {"alert_id": "blocked:tx-1", "snapshot_ref": "checkout/tx-1.jpg", "store_id": "S1"}
        return {"hits": {"total": {"value": 1}, "hits": [{"_source": source}]}, "aggregations": {}}


class Images:
    def __init__(self, image: bytes | None = None) -> None:
        self.image = image

    def get(self, ref: str) -> bytes:
        return jpeg() if self.image is None else self.image


def served(host: str = "127.0.0.1", image: bytes | None = None, **login: Any) -> TestClient:
    settings = Settings().model_copy(update={"dashboard": DashboardSettings(host=host, **login)})
    board = Dashboard(settings, client=FakeSearch(), images=Images(image))  # type: ignore[arg-type]
    return TestClient(create_app(settings, board), base_url="http://127.0.0.1:8050", raise_server_exceptions=False)


LOGIN = {"username": "manager", "password": SecretStr("s3cret pass"), "token": SecretStr("tok-123")}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("path", PATHS)
def test_anonymous_requests_get_a_401_with_a_challenge_on_every_endpoint(path: str) -> None:
    client = served(**LOGIN)
    answer = client.get(path)
    assert answer.status_code == 401
    challenges = answer.headers.get_list("www-authenticate")
    assert challenges == ['Basic realm="Checkout Guard", charset="UTF-8"', 'Bearer realm="Checkout Guard"']
    assert "image" not in answer.headers.get("content-type", "")


@pytest.mark.parametrize(
    "headers",
    [
        basic("manager", "wrong"),
        basic("someone", "s3cret pass"),
        basic("manager", "s3cret pas"),
        {"Authorization": "Bearer tok-1234"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic not-base64!"},
        {"Authorization": "Digest manager"},
    ],
)
def test_wrong_credentials_get_a_401(headers: dict[str, str]) -> None:
    client = served(**LOGIN)
    assert client.get("/api/alerts/blocked:tx-1/snapshot", headers=headers).status_code == 401


def test_the_login_or_the_token_opens_pages_json_and_snapshots() -> None:
    client = served(**LOGIN)
    for headers in (basic("manager", "s3cret pass"), {"Authorization": "Bearer tok-123"}):
        assert client.get("/", headers=headers).status_code == 200
        assert client.get("/api/config", headers=headers).status_code == 200
        assert client.get("/api/alerts/blocked:tx-1", headers=headers).status_code == 200
        for path in ("/models", "/api/models", "/api/drift"):
            assert client.get(path, headers=headers).status_code == 200, path
        snapshot = client.get("/api/alerts/blocked:tx-1/snapshot", headers=headers)
        assert snapshot.status_code == 200 and snapshot.headers["content-type"] == "image/jpeg"


def test_a_token_alone_is_enough_and_then_basic_is_not_offered() -> None:
    client = served(host="0.0.0.0", token=SecretStr("tok-123"))
    answer = client.get("/api/overview")
    assert answer.status_code == 401 and answer.headers.get_list("www-authenticate") == [
        'Bearer realm="Checkout Guard"'
    ]
    assert client.get("/api/config", headers={"Authorization": "Bearer tok-123"}).status_code == 200
    assert client.get("/api/config", headers=basic("x", "tok-123")).status_code == 401


def test_without_a_login_the_dashboard_serves_on_loopback_only() -> None:
    for host in ("0.0.0.0", "::", "192.168.1.20", "dashboard.example.com"):
        with pytest.raises(DashboardConfigError, match="without a login"):
            served(host=host)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert served(host=host).get("/api/config").status_code == 200  # open, as before, on loopback
    assert is_loopback("[::1]") and not is_loopback("0.0.0.0")
    with pytest.raises(DashboardConfigError, match="both"):
        check_exposure(DashboardSettings(username="manager"), "127.0.0.1")  # half a login is a mistake
    with pytest.raises(DashboardConfigError):
        check_exposure(DashboardSettings(token=SecretStr("")), "0.0.0.0")  # an empty token is no token


def test_the_command_refuses_to_start_on_all_interfaces_without_a_login(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(dashboard_main.web_server, "serve", lambda *a, **k: started.append((a, k)))
    monkeypatch.setattr(dashboard_main, "export_metrics", unserved)  # no port, no global registry
    monkeypatch.delenv("CG_DASHBOARD__USERNAME", raising=False)
    monkeypatch.delenv("CG_DASHBOARD__PASSWORD", raising=False)
    monkeypatch.delenv("CG_DASHBOARD__TOKEN", raising=False)
    dashboard_main.get_settings.cache_clear()
    try:
        result = CliRunner().invoke(dashboard_main.cli, ["--host", "0.0.0.0"])
        assert result.exit_code == 2 and "without a login" in result.output
        assert started == []
        monkeypatch.setenv("CG_DASHBOARD__TOKEN", "tok-123")
        dashboard_main.get_settings.cache_clear()
        result = CliRunner().invoke(dashboard_main.cli, ["--host", "0.0.0.0"])
        assert result.exit_code == 0, result.output
        [(_, kwargs)] = started
        assert kwargs["host"] == "0.0.0.0"
    finally:
        dashboard_main.get_settings.cache_clear()


def test_the_servers_own_lines_go_through_the_log_handler_with_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's own logging set-up gave its lines (an exception in a request, with its traceback) handlers of
    their own, past the masking of secrets and the project's line format."""
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers[1:]:  # as in a fresh process: an in-process uvicorn of an earlier test may have set them up
        lg.handlers[:], lg.propagate, lg.level = [], True, logging.NOTSET

    class Server:  # built once uvicorn.Config set logging up, as it does before it serves
        def __init__(self, config: uvicorn.Config) -> None:
            pass

        def run(self) -> None:
            logging.getLogger("uvicorn.error").error("Exception in ASGI application: Authorization: Bearer sekrit-1234")

    monkeypatch.setattr(dashboard_main.web_server.uvicorn, "Server", Server)
    monkeypatch.setattr(dashboard_main.web_server, "stop_on_signals", lambda stop, _signals: stop.set())
    monkeypatch.setattr(dashboard_main, "export_metrics", unserved)
    monkeypatch.setenv("CG_DASHBOARD__TOKEN", "tok-123")
    dashboard_main.get_settings.cache_clear()
    try:
        result = CliRunner().invoke(dashboard_main.cli, ["--host", "127.0.0.1"])
    finally:
        dashboard_main.get_settings.cache_clear()
        for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level
    assert result.exit_code == 0, result.output
    assert "sekrit-1234" not in result.output
    assert "ERROR dashboard[" in result.output and "uvicorn.error: Exception in ASGI application" in result.output


@pytest.mark.parametrize("path", PATHS)
def test_every_answer_forbids_framing_foreign_scripts_and_type_sniffing(path: str) -> None:
    client = served(**LOGIN)
    answers = [client.get(path)]  # the 401 too
    if path != "/api/pipeline":  # that one would ask a Prometheus
        answers.append(client.get(path, headers=basic("manager", "s3cret pass")))
    for answer in answers:
        csp = answer.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "object-src 'none'" in csp
        assert answer.headers.get("x-frame-options") == "DENY"
        assert answer.headers.get("x-content-type-options") == "nosniff"
        assert answer.headers.get("referrer-policy") == "no-referrer"


class BrokenSearch:
    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        raise RuntimeError("a bug, not an OpenSearch outage")


def test_an_answer_that_fails_with_a_500_carries_the_security_headers_too() -> None:
    settings = Settings().model_copy(update={"dashboard": DashboardSettings(host="127.0.0.1", **LOGIN)})
    board = Dashboard(settings, client=BrokenSearch(), images=Images())  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board), raise_server_exceptions=False)
    answer = client.get("/api/overview", headers=basic("manager", "s3cret pass"))
    assert answer.status_code == 500 and "RuntimeError" not in answer.text
    assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "")
    assert answer.headers.get("x-frame-options") == "DENY"
    assert answer.headers.get("x-content-type-options") == "nosniff"
    assert answer.headers.get("referrer-policy") == "no-referrer"


def test_face_images_are_never_kept_in_the_browser_cache() -> None:
    client = served(**LOGIN)
    for path in ("/api/alerts/blocked:tx-1/snapshot", "/cases/case-0123456789ab/images/live"):
        image = client.get(path, headers=basic("manager", "s3cret pass"))
        assert image.headers["content-type"] == "image/jpeg" and image.headers["cache-control"] == "no-store", path


def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


FACE_IMAGES = ("/api/alerts/blocked:tx-1/snapshot", "/cases/case-0123456789ab/images/live")


@pytest.mark.parametrize("path", FACE_IMAGES)
def test_face_images_under_the_login_cannot_be_embedded_by_another_site(path: str) -> None:
    """Another site's ``<img>`` in a logged-in analyst's browser would otherwise learn whether an alert or case
    exists (the image loads, or fails)."""
    for client, headers in (
        (served(**LOGIN), basic("manager", "s3cret pass")),
        (served(**LOGIN), {"Authorization": "Bearer tok-123"}),
        (served(), {}),  # no login, on loopback
    ):
        image = client.get(path, headers=headers)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.headers["cross-origin-resource-policy"] == "same-origin"


def test_a_png_snapshot_is_shown_as_the_jpeg_it_is_downscaled_to() -> None:
    client = served(image=encoded("PNG"), **LOGIN)
    for path in FACE_IMAGES:
        image = client.get(path, headers=basic("manager", "s3cret pass"))
        assert image.headers["content-type"] == "image/jpeg" and image.content.startswith(b"\xff\xd8\xff"), path


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "EPS"])
def test_a_stored_image_that_is_neither_jpeg_nor_png_is_not_decoded_or_shown(fmt: str) -> None:
    client = served(image=encoded(fmt), **LOGIN)
    for path in FACE_IMAGES:
        assert client.get(path, headers=basic("manager", "s3cret pass")).status_code == 404, path


@pytest.mark.parametrize("side", [9_000, 14_000])  # 81 and 196 megapixels, a few kB each as PNG
def test_a_stored_image_of_too_many_pixels_is_not_decoded_and_shows_as_no_image(side: int) -> None:
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")
    client = served(image=out.getvalue(), **LOGIN)
    for path in FACE_IMAGES:
        assert client.get(path, headers=basic("manager", "s3cret pass")).status_code == 404, path


def test_without_a_login_only_requests_addressed_to_loopback_are_answered() -> None:
    """A page elsewhere that re-points its own name at 127.0.0.1 (DNS rebinding) must not read faces or JSON."""
    client = served()
    for host in ("127.0.0.1:8050", "localhost:8050", "[::1]:8050", "localhost"):
        assert client.get("/api/alerts/blocked:tx-1/snapshot", headers={"host": host}).status_code == 200, host
    for host in ("attacker.example:8050", "attacker.example", "127.0.0.1.attacker.example:8050", ""):
        for path in ("/", "/api/alerts", "/api/alerts/blocked:tx-1/snapshot", "/static/app.js"):
            assert client.get(path, headers={"host": host}).status_code == 403, (host, path)
    with_login = served(**LOGIN)  # a login protects wherever it is addressed (a proxy may pass its own name)
    headers = {"host": "dashboard.example.com", **basic("manager", "s3cret pass")}
    assert with_login.get("/api/config", headers=headers).status_code == 200


def test_without_a_login_a_loopback_name_written_with_the_roots_dot_or_in_capitals_is_answered() -> None:
    """``http://localhost.:8050`` is the same name as ``localhost`` (a browser sends it as typed): it got a 403."""
    client = served()
    for host in ("localhost.:8050", "localhost.", "LOCALHOST:8050"):
        assert client.get("/api/alerts/blocked:tx-1/snapshot", headers={"host": host}).status_code == 200, host
