"""The live page (app.js) run in Node with a fake DOM, canned answers per endpoint and a clock of its own (skipped
without Node): what it draws and when it asks again."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.dashboard_pages import NODE, run_page

HOSTILE = '<img src=x onerror="alert(1)">'
LATENCY = {"p50": 10, "p95": 20, "p99": 30}
OVERVIEW = {
    "window": {"interval_s": 60, "end": 1_800_000_000_000, "store": ""},
    "totals": {"transactions": 1, "revenue": {"USD": 10}, "value_prevented": {}},
    "rates": {"per_minute": 1.0, "block_rate": 0.0, "review_rate": 0.0},
    "currencies": ["USD"],
    "latency": {"ttdf_ms": LATENCY, "proc_time_ms": LATENCY, "model_time_ms": LATENCY},
    "series": [{"t": 1e20, "APPROVE": 1, "revenue": {"USD": 10}, "prevented": {}, "p50": 10, "p95": 20, "p99": 30}],
    "outcomes": {"APPROVE": 1},
    "stores": [],
    "stores_more": {"stores": 0, "transactions": 0},
    "all_stores": [],
    "all_stores_more": 0,
}
ALERT = {
    "alert_id": "a-1",
    "kind": "BLOCKED",
    "severity": "high",
    "store_id": "s-1",
    "lane_id": "",
    "summary": "blocked",
    "event_time": 1_800_000_000_000,
}
FACES = {"statuses": {}, "series": []}


def _live(answers: dict[str, list[Any]], runs: int = 8, page: str = "app.js", then: str = "") -> dict[str, Any]:
    """The live page (or another of common.js's window pages, ``page``) given ``answers`` per path: its status line,
    waits and what it drew. ``then``: script run once the page has started, before its waits are run (a resize)."""
    shown = run_page(page, answers, then=then, runs=runs)
    nodes = shown["nodes"]
    return {
        **shown,
        "alerts": nodes["alerts"]["children"] if "alerts" in nodes else [],
        "drift": nodes["#drift-table tbody"]["children"] if "#drift-table tbody" in nodes else [],
        "minutes": nodes["window"]["value"] if "window" in nodes else None,
    }


def _answers(alerts: list[dict[str, Any]], **overrides: list[Any]) -> dict[str, list[Any]]:
    return {
        "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
        "/api/overview": [[200, OVERVIEW]],
        "/api/alerts": [[200, {"total": len(alerts), "alerts": alerts}]],
        "/api/faces": [[200, FACES]],
        **overrides,
    }


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_page_shows_an_out_of_range_time_as_it_came_in_its_row_only() -> None:
    """An alert's event_time or a chart point's t no date can hold made toISOString throw: nothing was drawn, and
    the page said "Invalid time value — retrying" at every refresh."""
    bad = {**ALERT, "alert_id": "a-2", "event_time": HOSTILE}
    shown = _live(_answers([{**ALERT, "event_time": 1e20}, bad, ALERT]), runs=0)
    assert shown["renders"] == "1" and shown["status"]["className"] == "status", shown
    first, second, third = shown["alerts"]
    assert '"meta">100000000000000000000 · ' in first  # as it came, not called a UTC time
    assert '"meta">&lt;img src=x onerror=&quot;alert(1)&quot;&gt; · ' in second and "<img src=x" not in second
    assert "2027-01-15 08:00:00 UTC" in third


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_time_past_the_year_9999_or_before_the_year_0_is_shown_as_it_came() -> None:
    """toISOString writes those years with six digits and a sign: the pages showed "+010000-01-01 00:00:" for a
    stored 253402300800000 instead of the value."""
    times = [253_402_300_799_999, 253_402_300_800_000, -62_167_219_200_000, -62_167_219_200_001, 8.64e15]
    shown = run_page("common.js", scenario=f"return {json.dumps(times)}.map(isoUtc);")
    assert shown == ["9999-12-31 23:59:59", None, "0000-01-01 00:00:00", None, None]
    shown = _live(_answers([{**ALERT, "event_time": 253_402_300_800_000}]), runs=0)
    assert '"meta">253402300800000 · ' in shown["alerts"][0] and "+0100" not in shown["alerts"][0], shown


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, "Unauthorized", "/api/overview: HTTP 401 — not refreshed again: log in again (reload the page)"),
        (
            403,
            {"error": "this login may not read it"},
            "this login may not read it — not refreshed again: log in again",
        ),
        (
            400,
            {"error": "minutes: 15 to 43200"},
            "minutes: 15 to 43200 — not refreshed again until the window or store",
        ),
    ],
)
def test_the_live_page_stops_refreshing_after_a_4xx_and_says_why(status: int, body: Any, says: str) -> None:
    """Every failure was asked again every 3 s for ever: a 401 once the login expired too, with "— retrying" and
    no word of logging in again."""
    shown = _live(_answers([], **{"/api/overview": [[status, body], [200, OVERVIEW]]}))
    assert shown["asked"]["/api/overview"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error" and shown["status"]["textContent"].startswith(says)
    assert shown["renders"] == "0"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_page_asks_again_after_a_5xx_or_no_answer_further_apart_up_to_30_s() -> None:
    """A 5xx or no answer was asked again every 3 s however long the dashboard or OpenSearch was away."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    failing = [unavailable, None, [502, "<html>bad gateway</html>"], unavailable, unavailable, unavailable]
    shown = _live(_answers([], **{"/api/overview": [*failing, [200, OVERVIEW]]}))
    assert shown["waits"] == [3000, 6000, 12000, 24000, 30000, 30000, 3000, 3000], shown
    assert shown["seen"][0] == "OpenSearch unavailable (ConnectionError); asking again in 3 s"
    assert shown["seen"][1] == "/api/overview: the dashboard did not answer (Failed to fetch); asking again in 6 s"
    assert shown["seen"][2] == "/api/overview: HTTP 502 Bad Gateway; asking again in 12 s"
    assert shown["status"]["className"] == "status" and shown["renders"] == "3"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(("status", "body"), [(401, "Unauthorized"), (403, "Forbidden")])
def test_the_live_page_says_to_log_in_again_when_its_settings_are_refused(status: int, body: Any) -> None:
    """/api/config was read with a bare fetch and any failure, a 401 once the login expired too, quietly left the
    defaults in place."""
    shown = _live(_answers([], **{"/api/config": [[status, body]]}))
    assert "/api/overview" not in shown["asked"] and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error"
    assert shown["status"]["textContent"] == (
        f"/api/config: HTTP {status} — not refreshed again: log in again (reload the page)"
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ([502, "<html>bad gateway</html>"], "HTTP 502 Bad Gateway"),
        (None, "the dashboard did not answer (Failed to fetch)"),
    ],
)
def test_the_live_page_keeps_its_defaults_and_says_so_when_its_settings_cannot_be_read(
    answer: Any, reason: str
) -> None:
    """Any failure reading /api/config left the defaults in place without a word."""
    shown = _live(_answers([], **{"/api/config": [answer]}), runs=2)
    assert shown["waits"] == [3000, 3000] and shown["renders"] == "3", shown
    assert shown["status"]["className"] == "status"
    assert shown["status"]["textContent"].endswith(
        f" · settings not read (/api/config: {reason}): default refresh and window"
    )


# The window resized, and the 200 ms the page waits for the resizing to end passed.
RESIZE = "window.handlers.resize(); await h.advance(200);"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(("status", "body"), [(400, {"error": "minutes: 15 to 43200"}), (401, "Unauthorized")])
def test_a_page_stopped_by_a_4xx_asks_nothing_again_when_the_window_is_resized(status: int, body: Any) -> None:
    """A resize read the page again whatever had stopped it: a 401 once the login expired was asked again at every
    resize, and a read that then passed replaced the reason on the status line, the page still not refreshing."""
    shown = _live(_answers([], **{"/api/overview": [[status, body], [200, OVERVIEW]]}), then=RESIZE)
    assert shown["asked"]["/api/overview"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error" and "not refreshed again" in shown["status"]["textContent"]
    assert shown["renders"] == "0"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_resize_while_the_page_waits_after_a_5xx_asks_nothing_ahead_of_the_wait() -> None:
    """A resize read the page again at once, cutting short the growing wait after a 5xx."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    shown = _live(_answers([], **{"/api/overview": [unavailable, [200, OVERVIEW]]}), runs=2, then=RESIZE)
    assert shown["asked"]["/api/overview"] == 3 and shown["waits"] == [3000, 3000], shown
    assert shown["seen"][0] == "OpenSearch unavailable (ConnectionError); asking again in 3 s"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_resize_while_the_page_refreshes_as_usual_redraws_it() -> None:
    shown = _live(_answers([]), runs=1, then=RESIZE)
    assert shown["asked"]["/api/overview"] == 3 and shown["renders"] == "3" and shown["waits"] == [3000], shown


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize("config", [{}, {"refresh_ms": "fast", "window_minutes": None}, {"refresh_ms": 0}])
def test_the_live_page_keeps_its_default_refresh_and_window_when_its_settings_lack_them(config: Any) -> None:
    """A 200 from /api/config without a refresh_ms that is a number made the interval NaN, and the page asked again at
    once, over and over; without window_minutes it asked for a window of NaN minutes."""
    shown = _live(_answers([], **{"/api/config": [[200, config]]}), runs=2)
    assert shown["waits"] == [3000, 3000] and shown["minutes"] == "60" and shown["renders"] == "3", shown
