"""The alert page (alert.js) over the app's own ``/api/alerts/<id>`` answer: each fact the page has a row for is
fetched from the index, so the row shows. Runs alert.js in Node with a minimal DOM (skipped without Node)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.dashboard.app import Dashboard, create_app
from tests.unit.dashboard_pages import NODE, STATIC, facts, run_page
from tests.unit.test_dashboard_case_page_polling import _run as polled

STORED = {
    "alert_id": "watchlist:tx-1",
    "kind": "WATCHLIST_MATCH",
    "severity": "high",
    "event_time": 1_800_000_000_000,
    "store_id": "S1",
    "subject_id": "subj-tx-0",
    "category": "suspect",
    "similarity": 97.5,
    "match_threshold": 80.0,
    "face_embedding_never_shown": [0.1, 0.2],
}


class IndexedAlert:
    """An alerts index holding one alert; a search returns only the ``_source`` fields it asks for, as OpenSearch
    does."""

    def __init__(self, stored: dict[str, Any] = STORED) -> None:
        self.stored = stored

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        if "alerts" not in index:
            return {"hits": {"total": {"value": 0}, "hits": []}}
        source = {k: v for k, v in self.stored.items() if k in body.get("_source", self.stored)}
        return {"hits": {"total": {"value": 1}, "hits": [{"_source": source}]}}


def alert_answer() -> dict[str, Any]:
    settings = Settings()
    board = Dashboard(settings, client=IndexedAlert())  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    answer = client.get("/api/alerts/watchlist:tx-1")
    assert answer.status_code == 200
    return answer.json()


def test_an_alerts_subject_id_is_fetched_and_its_embedding_is_not() -> None:
    alert = alert_answer()["alert"]
    assert alert["subject_id"] == "subj-tx-0" and alert["similarity"] == 97.5
    assert "face_embedding_never_shown" not in alert


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_page_shows_the_subject_row() -> None:
    shown = facts(run_page("alert.js", [[200, alert_answer()]], path="/alerts/watchlist%3Atx-1", runs=0))
    assert shown["alert:subject"] == "subj-tx-0"
    assert shown["alert:category"] == "suspect" and shown["alert:store"] == "S1"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_page_shows_the_threshold_the_face_was_matched_at_beside_its_similarity() -> None:
    """The message and the case card give "97.5% similar (the match threshold is 80.0)"; the page they link to gave
    the similarity alone, with nothing to weigh it against."""
    shown = facts(run_page("alert.js", [[200, alert_answer()]], path="/alerts/watchlist%3Atx-1", runs=0))
    assert (shown["alert:similarity"], shown["alert:match threshold"]) == ("97.5", "80")


ALERT_PATH = "/alerts/watchlist%3Atx-1"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "error"), [(400, "bad alert id"), (401, "log in"), (403, "may not read"), (404, "no such alert")]
)
def test_an_alert_answered_4xx_is_asked_no_more_and_the_page_shows_why(status: int, error: str) -> None:
    """Every answer but a 404 (a 400, 401 or 403 too) was asked again every 3 s, for ever; a 401 or 403 (the login
    expired) was then shown as a plain 4xx, with no word of logging in again."""
    shown = polled([[status, {"error": error}], [200, alert_answer()]], "alert.js", ALERT_PATH)
    assert shown["fetched"] == 1 and shown["waits"] == [], shown
    says = ": log in again (reload the page)" if status in (401, 403) else " until the page is reloaded"
    assert shown["status"]["textContent"] == f"watchlist:tx-1: {error} — not refreshed again{says}"
    assert shown["status"]["className"] == "status error"
    assert not shown["loaded"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_alert_answered_5xx_or_not_at_all_is_asked_again_further_apart_up_to_30_s() -> None:
    """A 5xx was asked again every 3 s however long OpenSearch was away; no answer at all (the network down) or a
    proxy's page that is not JSON stopped the page with no word and no further try."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    answers = [unavailable, None, [502, "<html>bad gateway</html>"], *[unavailable] * 4]
    shown = polled([*answers, [200, alert_answer()]], "alert.js", ALERT_PATH)
    assert shown["waits"] == [3000, 6000, 12000, 24000, 30000, 30000, 30000], shown
    assert shown["fetched"] == len(answers) + 1 and shown["loaded"], shown
    assert "OpenSearch unavailable" in shown["seen"][0] and "asking again in 3 s" in shown["seen"][0]
    assert "did not answer (Failed to fetch)" in shown["seen"][1] and "asking again in 6 s" in shown["seen"][1]
    assert "HTTP 502 Bad Gateway" in shown["seen"][2] and "asking again in 12 s" in shown["seen"][2]
    assert shown["status"]["className"] == "status" and shown["status"]["textContent"].startswith("loaded")


def test_the_alert_page_has_a_caveat_for_a_face_match() -> None:
    html = (STATIC / "alert.html").read_text()
    assert 'id="face-caveat" hidden>A face match is evidence for you to weigh, not a verdict' in html


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_page_shows_its_caveat_with_a_face_match_and_not_without() -> None:
    """The page an alert links to showed a subject and a similarity with no word that a match is evidence to weigh,
    which the alert message and the case page say."""
    matched = run_page("alert.js", [[200, alert_answer()]], path="/alerts/watchlist%3Atx-1", runs=0)
    assert matched["nodes"]["face-caveat"]["hidden"] is False
    blocked = {"alert": {"alert_id": "blocked:tx-2", "kind": "BLOCKED_TRANSACTION", "severity": "high"}}
    plain = run_page(
        "alert.js", [[200, {**blocked, "transaction": {"face_status": "NO_MATCH"}}]], path="/alerts/b", runs=0
    )
    assert plain["nodes"]["face-caveat"]["hidden"] is True


def zoned_alert_answer(store_id: str) -> dict[str, Any]:
    """``/api/alerts/<id>`` of an alert of ``store_id``, with a chain zone and one store in a zone of its own."""
    settings = Settings(alerts={"timezone": "Europe/Berlin", "store_timezones": {"S-NYC": "America/New_York"}})
    board = Dashboard(settings, client=IndexedAlert({**STORED, "store_id": store_id}))  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    return client.get("/api/alerts/watchlist:tx-1").json()


def test_an_alerts_time_is_given_in_its_stores_zone_as_its_message_gives_it() -> None:
    """The message says "When: 2027-01-15 03:00:00 EST" (the store's zone); the page it links to said 08:00:00 UTC."""
    assert zoned_alert_answer("S-NYC")["alert"]["local_time"] == "2027-01-15 03:00:00 EST"
    assert zoned_alert_answer("S1")["alert"]["local_time"] == "2027-01-15 09:00:00 CET"  # the chain's zone


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_page_shows_the_time_in_the_stores_zone_and_utc_without_one() -> None:
    shown = facts(run_page("alert.js", [[200, zoned_alert_answer("S-NYC")]], path=ALERT_PATH, runs=0))
    assert shown["alert:time"] == "2027-01-15 03:00:00 EST"
    unzoned = alert_answer()
    unzoned["alert"].pop("local_time", None)  # an answer without it: the time as UTC text, as before
    assert facts(run_page("alert.js", [[200, unzoned]], path=ALERT_PATH, runs=0))["alert:time"] == (
        "2027-01-15 08:00:00 UTC"
    )
