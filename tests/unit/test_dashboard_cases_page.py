"""The cases list page escapes indexed values with the dashboard's one ``escapeHtml`` (``common.js``), as the alert
and case pages do: it kept a copy of its own, which a fix to the shared one would not have reached. Runs the page's
scripts in Node, each as a separate classic script in one global scope as the browser does (skipped without Node)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.dashboard.app import create_app
from tests.unit.dashboard_pages import NODE, run_page, script_sources

HOSTILE = '<img src=x onerror="alert(1)">'

SHARED = ["escapeHtml", "getJson", "fmtPrice"]


def test_the_cases_page_loads_the_shared_script_first() -> None:
    client = TestClient(create_app(Settings()), base_url="http://127.0.0.1:8050")  # no login: loopback only
    answer = client.get("/cases")
    assert answer.status_code == 200
    assert script_sources(answer.text) == ["/static/common.js", "/static/cases.js"]


def _shown(answers: dict[str, Any]) -> dict[str, Any]:
    """What the cases page draws from ``answers`` (per API path), with the scripts its HTML loads, in that order."""
    shown = run_page("cases.js", {path: [[200, body]] for path, body in answers.items()}, runs=0)
    return {
        "queue": shown["nodes"]["#queue-table tbody"]["innerHTML"],
        "ages": shown["nodes"]["#age-table tbody"]["innerHTML"],
        "kinds": shown["nodes"]["#kind-table tbody"]["innerHTML"],
        "sharedLoaded": set(SHARED) <= set(shown["shared"]),
        "sharedKept": not set(SHARED) & set(shown["redeclared"]),
    }


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_page_shows_indexed_markup_as_text_with_the_shared_escaping_left_as_it_is() -> None:
    """Its values are escaped by common.js's escapeHtml, and no shared function is declared again by the page (its
    JSON fetch had common.js's name, ``getJson``, and replaced the shared one for every script on the page)."""
    case = {
        "case_id": "case-1",
        "opened_at": 1_800_000_000_000,
        "state": "open",
        "kind": HOSTILE,
        "store_id": HOSTILE,
        "lane_id": "1",
        "owner": HOSTILE,
        "summary": HOSTILE,
    }
    figures = {
        "open": 1,
        "time_to_verdict_s": {"p50": None, "p95": None, "decided": 0},
        "open_by_age": [{"age": HOSTILE, "cases": 1}],
        "by_kind": [{"key": HOSTILE, "confirmed": 0, "dismissed": 0, "expired": 0, "confirmed_share": None}],
        "by_store": [],
        "truncated": False,
    }
    shown = _shown(
        {"/api/cases": {"cases": [case], "total": 1, "kinds": {}, "stores": {}}, "/api/cases/figures": figures}
    )
    assert shown["sharedLoaded"] and shown["sharedKept"], shown
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
    assert shown["queue"].count(escaped) == 4 and escaped in shown["ages"] and escaped in shown["kinds"]
    assert not any("<img" in html for html in (shown["queue"], shown["ages"], shown["kinds"]))


FIGURES = {
    "open": 0,
    "time_to_verdict_s": {"p50": None, "p95": None, "decided": 0},
    "open_by_age": [],
    "by_kind": [],
    "by_store": [],
    "truncated": False,
}
QUEUE = {"cases": [], "total": 0, "kinds": {}, "stores": {}}


def _polled(answers: list[Any], search: str = "") -> dict[str, Any]:
    """How the cases page asks for its queue given ``answers``: the waits it sets and what it says between tries."""
    shown = run_page(
        "cases.js", {"/api/cases": answers, "/api/cases/figures": [[200, FIGURES]]}, search=search, runs=12
    )
    return {**shown, "asked": shown["asked"].get("/api/cases", 0)}


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "says"),
    [
        (400, " — not refreshed again until a filter changes"),
        (401, " — not refreshed again: log in again (reload the page)"),
        (403, " — not refreshed again: log in again (reload the page)"),
    ],
)
def test_the_cases_page_answered_4xx_stops_asking_and_shows_why(status: int, says: str) -> None:
    """``/cases?state=bogus`` (a link typed or cut short) got 400 and was asked again every 5 s for as long as the page
    stayed open, though the same request gets the same answer; a 401 or 403 (the login expired) was shown as a plain
    4xx, "until a filter changes", with no word of logging in again."""
    shown = _polled([[status, {"error": "state is one of undecided, any, open"}], [200, QUEUE]], "?state=bogus")
    assert shown["asked"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error"
    assert shown["status"]["textContent"] == f"state is one of undecided, any, open{says}"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_page_answered_5xx_or_not_at_all_asks_again_further_apart_up_to_30_s() -> None:
    """A 5xx was asked again every 5 s however long OpenSearch was away, and a proxy's page that is not JSON was shown
    as a JSON parse error; after a success the queue is read every 5 s again."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    answers = [unavailable, None, [502, "<html>bad gateway</html>"], unavailable, unavailable, [200, QUEUE]]
    shown = _polled(answers)
    assert shown["waits"][:6] == [5000, 10000, 20000, 30000, 30000, 5000], shown
    assert "OpenSearch unavailable" in shown["seen"][0] and "asking again in 5 s" in shown["seen"][0]
    assert "Failed to fetch" in shown["seen"][1] and "asking again in 10 s" in shown["seen"][1]
    assert "HTTP 502 Bad Gateway" in shown["seen"][2]
    assert shown["seen"][6].startswith("updated"), shown


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_page_says_an_answer_that_is_not_json_or_none_at_all_is_what_it_is() -> None:
    """Its own fetchJson took a 200 that is not JSON (a proxy's sign-in page) for an empty answer and showed the
    TypeError of drawing it ("Cannot convert undefined or null to object"), and no answer as a bare "Failed to
    fetch"; it now reads through common.js's askJson, as the other pages do."""
    shown = _polled([[200, "<html>sign in</html>"], None, [200, QUEUE]])
    assert shown["seen"][0] == "HTTP 200: the answer is not JSON; asking again in 5 s", shown
    assert shown["seen"][1] == "the dashboard did not answer (Failed to fetch); asking again in 10 s"
    assert shown["waits"][:3] == [5000, 10000, 5000] and shown["seen"][2].startswith("updated")


# A filter changed while the first read of the queue is on its way; the newer filter's read answered first.
RACE = """
h.nodes["f-state"].handlers.change({ target: { value: "dismissed" } });
await h.flush();
h.release(1, [200, %s]);
await h.flush();
h.release(0, [200, %s]);
await h.flush();
return { asked: h.held.map((r) => r.url), queue: h.nodes["#queue-table tbody"].innerHTML,
  hint: h.nodes["queue-hint"].textContent };
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_page_keeps_the_newer_filters_results_when_an_older_refresh_answers_last() -> None:
    """A refresh asked before a filter changed and answered after the newer one drew the old filter's cases."""
    old = {**QUEUE, "cases": [{"case_id": "case-000000000001", "state": "open"}], "total": 1}
    new = {**QUEUE, "cases": [{"case_id": "case-000000000002", "state": "dismissed"}], "total": 7}
    answers = {"/api/cases": ["held"], "/api/cases/figures": [[200, FIGURES]]}
    shown = run_page("cases.js", answers, scenario=RACE % (json.dumps(new), json.dumps(old)))
    assert "state=undecided" in shown["asked"][0] and "state=dismissed" in shown["asked"][1], shown
    assert "case-000000000002" in shown["queue"] and "case-000000000001" not in shown["queue"], shown
    assert shown["hint"] == "(7 matching, newest first)"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_page_shows_an_out_of_range_opened_at_as_it_came_in_its_row_only() -> None:
    """An opened_at no date can hold made toISOString throw, and the whole queue and its figures were not drawn."""
    rows = [
        {"case_id": "case-000000000001", "opened_at": 1e20, "state": "open"},
        {"case_id": "case-000000000002", "opened_at": HOSTILE, "state": "open"},
        {"case_id": "case-000000000003", "opened_at": 1_800_000_000_000, "state": "open"},
    ]
    shown = _shown({"/api/cases": {**QUEUE, "cases": rows, "total": 3}, "/api/cases/figures": FIGURES})
    assert "<td>100000000000000000000</td>" in shown["queue"], shown
    assert "<td>&lt;img src=x onerror=&quot;alert(1)&quot;&gt;</td>" in shown["queue"] and "<img" not in shown["queue"]
    assert "<td>2027-01-15 08:00:00 UTC</td>" in shown["queue"]  # an answer without its local time: UTC, so labelled
