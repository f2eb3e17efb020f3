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


def test_a_stop_gives_up_a_request_still_under_way_before_the_sigkill_and_exits_cleanly() -> None:
    """On SIGTERM uvicorn waited for every request under way as long as it took (a verdict's Kafka publish with Kafka
    down, a slow OpenSearch query), past the supervisor's SIGKILL, then died of its own SIGTERM. A request still under
    way is given up 2 s before the SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM) and the dashboard
    exits 0."""
    import subprocess
    import sys

    from infra.settings import REPO_ROOT

    code = """
import os, signal, socket, threading, time, urllib.request
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from infra.settings import Settings
import sinks.dashboard.__main__ as dashboard_main

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
settings = Settings(
    supervisor={"stop_timeout_s": 2.5}, cameras={"bridge_stop_grace_s": 1.0}, kafka={"stop_flush_s": 0.5},
    alerts={"stop_wait_s": 0.2},
)

def hang(_request):  # a sync route, in a thread: a verdict's publish waiting on Kafka
    time.sleep(8)
    return JSONResponse({})

dashboard_main.get_settings = lambda: settings
dashboard_main.create_app = lambda *a, **k: Starlette(routes=[Route("/hang", hang)])
dashboard_main.export_metrics = lambda s: (  # not started: no Kafka read, no port
    dashboard_main.ConsumerLagCollector(s), dashboard_main.Endpoint("dashboard", 0, None)
)
sent = []

def client():
    threading.Thread(target=lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/hang", timeout=20)).start()
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.5)  # the request is under way
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=client, daemon=True).start()
dashboard_main.cli(["--host", "127.0.0.1", "--port", str(port)], standalone_mode=False)
print(round(time.monotonic() - sent[0], 2))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, f"the dashboard died of its SIGTERM (exit {out.returncode}): {out.stderr[-2000:]}"
    assert float(out.stdout.split()[-1]) < 1.7, f"stopped {out.stdout.split()[-1]}s after SIGTERM; SIGKILL at 2.5 s"
