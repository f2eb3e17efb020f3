"""The models page (models.js) run in Node with the live page's fake DOM, canned answers per endpoint and a clock of
its own (skipped without Node): what it draws from an out-of-range time and when it asks again after a failure."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_dashboard_live_page import HOSTILE, NODE, RESIZE, _live

ROLE = {"version": "m-1", "versions": {"m-1": 2}, "counts": [1, 1], "rows": 2, "fallback_rows": 0, "mean": 500.0}
SCORES = {
    "champion": ROLE,
    "challenger": {**ROLE, "version": None, "versions": {}, "counts": [0, 0], "rows": 0, "mean": None},
    "scored": 2,
    "bins": [0, 500],
    "bin_width": 500,
    "all_stores": [],
    "all_stores_more": 0,
}
AUC = {"version": "m-1", "rows": 0, "fallback_rows": 0, "fraud": 0, "in_training": 0, "auc": None}
PAIRED = {"rows": 0, "fraud": 0, "champion_auc": None, "challenger_auc": None}
EVALUATION = {"labelled": 0, "fraud": 0, "champion": AUC, "challenger": {**AUC, "version": None}, "paired": PAIRED}
LABELS = {"total": 0, "fraud": 0, "sources": {}, "truncated": False, "read": 0}


def _models(end: Any = 1_800_000_000_000) -> dict[str, Any]:
    return {
        "window": {"end": end, "store": ""},
        "distributions": SCORES,
        "evaluation": EVALUATION,
        "labels": LABELS,
    }


def _drift(*hours: Any) -> dict[str, Any]:
    row = {
        "model_version": "m-1",
        "rows": 5,
        "late_rows": 0,
        "score_band": "stable",
        "score_psi": 0.01,
        "worst": [],
        "alert": False,
        "alerts_in_window": 0,
        "hours_in_window": 1,
        "reference_rows": 10,
    }
    return {"models": [{**row, "hour_start": hour} for hour in hours]}


def _answers(**overrides: list[Any]) -> dict[str, list[Any]]:
    return {
        "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
        "/api/models": [[200, _models()]],
        "/api/drift": [[200, _drift(1_800_000_000_000)]],
        **overrides,
    }


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_shows_an_out_of_range_time_as_it_came_in_its_row_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drift report's hour_start or the window's end no date can hold made toISOString throw: nothing was drawn,
    and every refresh said "Invalid time value — retrying"."""
    monkeypatch.setenv("TZ", "UTC")  # no store clock in these answers: the viewer's own
    drift = _drift(1e20, HOSTILE, 253_402_300_800_000, 1_800_000_000_000)
    shown = _live(_answers(**{"/api/models": [[200, _models(end=1e20)]], "/api/drift": [[200, drift]]}), 0, "models.js")
    assert shown["renders"] == "1" and shown["status"]["className"] == "status", shown
    assert shown["status"]["textContent"].startswith("window ends 100000000000000000000 · updated")
    out_of_range, hostile, past_9999, fine = shown["drift"]
    assert "<td>100000000000000000000</td>" in out_of_range
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in hostile and "<img src=x" not in hostile
    assert "<td>253402300800000</td>" in past_9999
    assert "<td>2027-01-15 08:00</td>" in fine


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, "Unauthorized", "/api/models: HTTP 401 — not refreshed again: log in again (reload the page)"),
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
def test_the_models_page_stops_refreshing_after_a_4xx_and_says_why(status: int, body: Any, says: str) -> None:
    """Every failure was asked again every refresh interval for ever: a 401 once the login expired too, with
    "— retrying" and no word of logging in again."""
    shown = _live(_answers(**{"/api/models": [[status, body], [200, _models()]]}), page="models.js")
    assert shown["asked"]["/api/models"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["className"] == "status error" and shown["status"]["textContent"].startswith(says)
    assert shown["renders"] == "0"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_asks_again_after_a_5xx_or_no_answer_further_apart_up_to_30_s() -> None:
    """A 5xx or no answer was asked again every 10 s however long the dashboard or OpenSearch was away."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    failing = [unavailable, None, [502, "<html>bad gateway</html>"], unavailable]
    shown = _live(_answers(**{"/api/models": [*failing, [200, _models()]]}), page="models.js")
    assert shown["waits"] == [10000, 20000, 30000, 30000, 10000, 10000, 10000, 10000], shown
    assert shown["seen"][0] == "OpenSearch unavailable (ConnectionError); asking again in 10 s"
    assert shown["seen"][1] == "/api/models: the dashboard did not answer (Failed to fetch); asking again in 20 s"
    assert shown["seen"][2] == "/api/models: HTTP 502 Bad Gateway; asking again in 30 s"
    assert shown["status"]["className"] == "status" and shown["renders"] == "5"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_says_to_log_in_again_when_its_settings_are_refused() -> None:
    """/api/config was read with a bare fetch and a 401 (the login expired) quietly left the defaults in place."""
    shown = _live(_answers(**{"/api/config": [[401, "Unauthorized"]]}), page="models.js")
    assert "/api/models" not in shown["asked"] and shown["waits"] == [], shown
    assert (
        shown["status"]["textContent"] == "/api/config: HTTP 401 — not refreshed again: log in again (reload the page)"
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_keeps_its_defaults_and_says_so_when_its_settings_cannot_be_read() -> None:
    """A failed /api/config was passed over without a word, and left the page refreshing every 3 s, under its
    10 s floor."""
    shown = _live(_answers(**{"/api/config": [[502, "<html>bad gateway</html>"]]}), runs=2, page="models.js")
    assert shown["waits"] == [10000, 10000] and shown["renders"] == "3", shown
    assert shown["status"]["textContent"].endswith(
        " · settings not read (/api/config: HTTP 502 Bad Gateway): default refresh and window"
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_stopped_by_a_4xx_asks_nothing_again_when_the_window_is_resized() -> None:
    """A resize read the page again whatever had stopped it: a 403 was asked again at every resize."""
    refused = [403, {"error": "this login may not read it"}]
    shown = _live(_answers(**{"/api/models": [refused, [200, _models()]]}), page="models.js", then=RESIZE)
    assert shown["asked"]["/api/models"] == 1 and shown["waits"] == [], shown
    assert shown["status"]["textContent"].startswith("this login may not read it — not refreshed again")
