"""The live dashboard app serves its page and assets itself and says so when OpenSearch is unreachable."""

from __future__ import annotations

import re
import socket

from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.dashboard.app import create_app


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def app_without_opensearch() -> TestClient:
    settings = Settings().model_copy(
        update={"opensearch": Settings().opensearch.model_copy(update={"url": f"http://127.0.0.1:{closed_port()}"})}
    )
    return TestClient(create_app(settings), base_url="http://127.0.0.1:8050")  # no login: loopback names only


def test_page_and_its_assets_come_from_the_app_not_a_cdn() -> None:
    client = app_without_opensearch()
    for path in ("/", "/models", "/pipeline", "/cases"):
        page = client.get(path)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        sources = re.findall(r'(?:src|<link[^>]*href)="([^"]+)"', page.text)
        assert sources and all(s.startswith("/static/") for s in sources)
        for source in sources:
            assert client.get(source).status_code == 200
        links = re.findall(r'<a [^>]*href="([^"]+)"', page.text)
        assert set(links) == {"/", "/cases", "/models", "/pipeline"}  # the pages link each other, nothing outside
    for script in ("common.js", "app.js", "models.js", "alert.js", "pipeline.js", "cases.js", "case.js"):
        text = client.get(f"/static/{script}").text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_unreachable_opensearch_is_a_503_with_a_reason_the_page_shows() -> None:
    client = app_without_opensearch()
    for path in ("/api/overview", "/api/alerts", "/api/faces", "/api/models", "/api/drift"):
        answer = client.get(path, params={"minutes": 15})
        assert answer.status_code == 503
        assert answer.json()["error"].startswith("OpenSearch unavailable")
    assert client.get("/api/alerts/a-1/snapshot").status_code == 503


def test_config_tells_the_page_how_often_to_poll() -> None:
    settings = Settings()
    assert app_without_opensearch().get("/api/config").json() == {
        "refresh_ms": settings.dashboard.refresh_ms,
        "window_minutes": settings.dashboard.window_minutes,
        "index_prefix": settings.opensearch.index_prefix,
    }
