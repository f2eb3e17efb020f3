"""The live, models and pipeline pages read their JSON through common.js: an answer that is not JSON (a proxy's
HTML error page) is shown as its status, not as a JSON parse error. Runs the scripts in Node against canned answers
(skipped without Node)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.dashboard_pages import NODE, run_page
from tests.unit.test_dashboard_case_page_polling import _run as polled

PROXY_PAGE = "<html><body>502 Bad Gateway</body></html>"

GET_JSON = """
try {
  await getJson({ minutes: 60, anchor: false, store: "" }, "/api/overview");
  return { thrown: null };
} catch (e) {
  return { thrown: e.message };
}
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_and_models_pages_show_a_proxys_error_page_as_its_status() -> None:
    """getJson read every answer as JSON: a proxy's 502 page was shown as "Unexpected token '<' … is not valid
    JSON"."""
    thrown = run_page("common.js", [[502, PROXY_PAGE]], scenario=GET_JSON)["thrown"]
    assert thrown == "/api/overview: HTTP 502 Bad Gateway"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_pipeline_page_shows_a_proxys_error_page_as_its_status_and_asks_again() -> None:
    """pipeline.js read the answer as JSON: a proxy's 502 page was shown as a JSON parse error."""
    shown = polled([[200, {"refresh_ms": 5000}], [502, PROXY_PAGE]], "pipeline.js", "/pipeline")
    assert shown["seen"][0] == "/api/pipeline: HTTP 502 Bad Gateway; asking again in 5 s", shown
    assert shown["status"]["className"] == "status error" and shown["waits"][0] == 5000


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, "Unauthorized", "/api/pipeline: HTTP 401 — not refreshed again: log in again (reload the page)"),
        (
            403,
            {"error": "this login may not read it"},
            "this login may not read it — not refreshed again: log in again",
        ),
        (400, {"error": "no such window"}, "no such window — not refreshed again until the page is reloaded"),
    ],
)
def test_the_pipeline_page_stops_refreshing_after_a_4xx_and_says_why(status: int, body: Any, says: str) -> None:
    """Every failure was asked again every refresh interval for ever: a 401 once the login expired too, with
    "— retrying" and no word of logging in again."""
    shown = polled([[200, {"refresh_ms": 5000}], [status, body], [200, {}]], "pipeline.js", "/pipeline")
    assert shown["fetched"] == 2 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error" and shown["status"]["textContent"].startswith(says)


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_pipeline_page_asks_again_after_a_5xx_or_no_answer_further_apart_up_to_30_s() -> None:
    """A 5xx or no answer was asked again every 5 s however long the dashboard was away."""
    shown = polled(
        [[200, {"refresh_ms": 5000}], [503, {"error": "busy"}], None, [502, PROXY_PAGE]], "pipeline.js", "/pipeline"
    )
    assert shown["waits"][:6] == [5000, 10000, 20000, 30000, 30000, 30000], shown
    assert shown["seen"][0] == "busy; asking again in 5 s"
    assert shown["seen"][1] == "/api/pipeline: the dashboard did not answer (Failed to fetch); asking again in 10 s"


PIPELINE = {
    "summary": {"targets": 1, "targets_up": 1, "records_in_per_s": 0, "decisions_per_s": 0, "lag": 0},
    "targets": [],
    "throughput": [],
    "lag": [],
    "latency": [],
    "dead_letters": [],
    "deliveries": [],
    "window": "5m",
    "source": "http://prometheus",
    "error": None,
}


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize("status", [401, 403])
def test_the_pipeline_page_says_to_log_in_again_when_its_settings_are_refused(status: int) -> None:
    """/api/config was read with a bare fetch and a 401 (the login expired) quietly left the defaults in place."""
    shown = polled([[status, "Unauthorized"], [200, PIPELINE]], "pipeline.js", "/pipeline")
    assert shown["fetched"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error"
    assert shown["status"]["textContent"] == (
        f"/api/config: HTTP {status} — not refreshed again: log in again (reload the page)"
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_pipeline_page_keeps_its_default_and_says_so_when_its_settings_cannot_be_read() -> None:
    """Any failure reading /api/config left the default refresh in place without a word."""
    shown = polled([[502, PROXY_PAGE], [200, PIPELINE]], "pipeline.js", "/pipeline")
    assert shown["waits"][:2] == [5000, 5000] and shown["status"]["className"] == "status", shown
    assert shown["status"]["textContent"].startswith("updated ")
    assert shown["status"]["textContent"].endswith(
        " · settings not read (/api/config: HTTP 502 Bad Gateway): default refresh and window"
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize("config", [{}, {"refresh_ms": "5 s"}])
def test_the_pipeline_page_keeps_its_default_refresh_when_its_settings_lack_one(config: Any) -> None:
    """A 200 from /api/config without a refresh_ms that is a number made the interval NaN: the page asked again at
    once, over and over."""
    shown = polled([[200, config], [200, PIPELINE]], "pipeline.js", "/pipeline")
    assert shown["waits"][:3] == [5000, 5000, 5000] and shown["status"]["className"] == "status", shown
