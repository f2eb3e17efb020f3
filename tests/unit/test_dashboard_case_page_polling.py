"""When the case page asks for its case again: the page's scripts run in Node against canned answers and a clock of
their own (skipped without Node). A 4xx is the request's own fault and asked again gets the same answer; only a 5xx
or no answer at all is worth another try, and those come further apart each time."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.dashboard_pages import NODE, run_page

CASE = {
    "case_id": "case-0123456789ab",
    "state": "open",
    "kind": "WATCHLIST_MATCH",
    "version": 1,
    "opened_at": 1,
    "notes": [],
    "images": {},
}


def _run(answers: list[Any], page: str = "case.js", path: str = "/cases/case-0123456789ab") -> dict[str, Any]:
    """How ``page`` at ``path`` asks for its JSON given ``answers``: the waits it sets, what it says between tries."""
    shown: dict[str, Any] = run_page(page, answers, path=path)
    return shown


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, "no such case: a case id is case- and twelve hex digits"),
        (403, "this login may not read cases"),
        (401, "log in"),
        (404, "no such case (yet)"),
    ],
)
def test_a_case_answered_4xx_is_asked_no_more_and_the_page_shows_why(status: int, error: str) -> None:
    """Every answer but a 404 was asked again every 3 s, for ever, though a wrong request gets the same answer; a 401
    or 403 (the login expired) was then shown as a plain 4xx, with no word of logging in again."""
    shown = _run([[status, {"error": error}], [200, {"case": CASE, "transaction": None, "you": None}]])
    assert shown["fetched"] == 1 and shown["waits"] == [], shown
    says = ": log in again (reload the page)" if status in (401, 403) else " until the page is reloaded"
    assert shown["status"]["textContent"] == f"case-0123456789ab: {error} — not refreshed again{says}"
    assert shown["status"]["className"] == "status error"
    assert shown["disabled"] and not shown["loaded"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_case_answered_5xx_or_not_at_all_is_asked_again_further_apart_up_to_30_s() -> None:
    """A 5xx was asked again every 3 s however long OpenSearch was away; no answer at all (the network down) or a
    proxy's page that is not JSON stopped the page with no word and no further try."""
    unavailable = [503, {"error": "OpenSearch unavailable (ConnectionError)"}]
    answers = [unavailable, None, [502, "<html>bad gateway</html>"], *[unavailable] * 4]
    shown = _run([*answers, [200, {"case": CASE, "transaction": None, "you": None}]])
    # then, the case read and still open, every 10 s
    assert shown["waits"][:9] == [3000, 6000, 12000, 24000, 30000, 30000, 30000, 10000, 10000], shown
    assert shown["seen"][len(answers)].startswith("loaded") and shown["loaded"], shown
    assert "OpenSearch unavailable" in shown["seen"][0] and "asking again in 3 s" in shown["seen"][0]
    assert "did not answer (Failed to fetch)" in shown["seen"][1] and "asking again in 6 s" in shown["seen"][1]
    assert "HTTP 502 Bad Gateway" in shown["seen"][2]
    assert shown["status"]["className"] == "status" and shown["status"]["textContent"].startswith("loaded")


def _clocked(answers: list[Any], until_ms: int) -> dict[str, Any]:
    """When the case page asks for its case over its first ``until_ms``, given ``answers`` that take their time."""
    shown = run_page("case.js", answers, path="/cases/case-0123456789ab", runs=1000, until_ms=until_ms)
    return {**shown, "asked": [request["at"] for request in shown["requests"]]}


READ = [200, {"case": CASE, "transaction": None, "you": None}]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_undecided_case_is_read_again_every_10_s_and_a_decided_one_is_not() -> None:
    assert _clocked([READ], 35_000)["asked"] == [0, 10_000, 20_000, 30_000]
    decided = [200, {"case": {**CASE, "state": "confirmed"}, "transaction": None, "you": None}]
    assert _clocked([decided], 35_000)["asked"] == [0]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_undecided_case_read_again_after_a_slow_5xx_waits_its_growing_wait_and_asks_once_at_a_time() -> None:
    """The 10 s re-read went on beside the growing wait: while a read took long to fail (a proxy's gateway timeout
    after 15 s) the next 10 s tick asked again, reads piled up on the failing server and each failure started a
    wait of its own."""
    timeout = [504, "<html>gateway timeout</html>", 15_000]
    shown = _clocked([READ, timeout], 210_000)
    assert shown["mostWaiting"] == 1, shown
    # each failure 15 s after its ask, and the next ask 3, 6, 12, 24, then 30 s after the failure
    assert shown["asked"] == [0, 10_000, 28_000, 49_000, 76_000, 115_000, 160_000, 205_000], shown
    assert shown["status"]["textContent"].endswith("HTTP 504 Gateway Timeout; asking again in 30 s")


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_undecided_case_answered_4xx_on_a_later_read_is_asked_no_more() -> None:
    shown = _clocked([READ, [403, {"error": "this login may not read cases"}]], 120_000)
    assert shown["asked"] == [0, 10_000], shown
    assert shown["status"]["textContent"].endswith("— not refreshed again: log in again (reload the page)")


# Confirm pressed once per answer of the verdict's endpoint, after each what the page says and whether it may be
# pressed again; the case's own reads always answer.
VERDICTS = """
const [confirm] = h.buttons;
const shown = [];
for (let i = 0; i < %d; i++) {
  h.nodes.verdict.handlers.click({ target: { closest: () => confirm } });
  await h.flush();
  const result = h.nodes["v-result"];
  shown.push({ result: result.textContent, className: result.className, enabled: !confirm.disabled });
}
const sent = h.requests.filter((r) => r.method === "POST").map((r) => JSON.parse(r.body).request_id);
return { shown, sent };
"""


def _verdicts(answers: list[Any]) -> dict[str, Any]:
    """What the case page says after each press of Confirm, the verdict endpoint answering ``answers`` in turn."""
    path = "/cases/case-0123456789ab"
    read = [200, {"case": CASE, "transaction": None, "you": "guard@example.com"}]
    verdicts = {"/api/cases/case-0123456789ab": [read], "POST /api/cases/case-0123456789ab/verdict": answers}
    shown: dict[str, Any] = run_page("case.js", verdicts, path=path, scenario=VERDICTS % len(answers))
    return shown


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_verdict_answered_by_a_page_that_is_not_json_says_so_and_is_sent_again_as_the_same_submission() -> None:
    """A proxy's 502 page left "sending confirm…" on screen with no word (the page threw reading it as JSON)."""
    shown = _verdicts([[502, "<html>bad gateway</html>"], [400, {"error": "this case is already decided"}]])
    first, second = shown["shown"]
    # (run_page fails the test on anything the page threw reading it)
    assert first["className"] == "status error" and "HTTP 502 Bad Gateway" in first["result"], shown
    assert "press it again, it will not be recorded twice" in first["result"] and first["enabled"]
    assert shown["sent"][0] == shown["sent"][1], "the retry of the same submission keeps its request_id"
    assert second["result"] == "this case is already decided" and second["enabled"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize("status", [401, 403])
def test_a_verdict_refused_for_the_login_says_it_was_not_recorded_and_to_log_in_again(status: int) -> None:
    """A verdict answered 401 or 403 (the login expired or was changed) showed only the answer's error, as a 400's,
    with no word that logging in again is what helps."""
    shown = _verdicts([[status, {"error": "log in"}]])
    (first,) = shown["shown"]
    assert first["className"] == "status error", shown
    assert first["result"] == "log in — confirm was not recorded: log in again (reload the page)"


# Confirm pressed, the verdict recorded, and the next 31 s of the page's clock run (its outcome, asked by its command
# id, never answered: the case's next version is then the only sign).
WAITING = """
h.nodes.verdict.handlers.click({ target: { closest: () => h.buttons[0] } });
await h.run({ until: 31000 });
const reads = h.requests.filter((r) => r.method === "GET" && !r.url.includes("/commands/")).map((r) => r.at);
return { reads, result: h.nodes["v-result"] };
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_recorded_verdict_waits_for_the_case_by_the_growing_wait_once_a_read_of_it_fails() -> None:
    """Waiting for the case's next version, the page read the case every second for 30 s however the reads failed
    (OpenSearch away): 30 failed reads, each one cutting short the growing wait the last had set."""
    read = [200, {"case": CASE, "transaction": None, "you": "guard@example.com"}]
    answers = {
        "/api/cases/case-0123456789ab": [read, [503, {"error": "OpenSearch unavailable (ConnectionError)"}]],
        "POST /api/cases/case-0123456789ab/verdict": [[202, {"command_id": "cmd-1"}]],
    }
    shown = run_page("case.js", answers, path="/cases/case-0123456789ab", scenario=WAITING)
    # the page's own read, then the wait's first read a second after the verdict, then 3, 6 and 12 s after each failure
    assert shown["reads"] == [0, 1000, 4000, 10_000, 22_000], shown
    assert shown["result"]["className"] == "status error"
    assert shown["result"]["textContent"].startswith("confirm was sent, but the case service has not answered in 30 s")


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_recorded_verdict_shows_the_cases_new_state_once_a_read_shows_its_next_version() -> None:
    decided = {**CASE, "state": "confirmed", "version": 2}
    answers = {
        "/api/cases/case-0123456789ab": [
            [200, {"case": CASE, "transaction": None, "you": "guard@example.com"}],
            [503, {"error": "OpenSearch unavailable (ConnectionError)"}],
            [200, {"case": decided, "transaction": None, "you": "guard@example.com"}],
        ],
        "POST /api/cases/case-0123456789ab/verdict": [[202, {"command_id": "cmd-1"}]],
    }
    shown = run_page("case.js", answers, path="/cases/case-0123456789ab", scenario=WAITING)
    assert shown["reads"] == [0, 1000, 4000], shown
    assert shown["result"]["textContent"] == "confirm: the case is now confirmed (version 2)."


# Confirm pressed, the verdict sent, the page's clock run to `until`; what it said at each second asked for.
OUTCOME = """
h.nodes.verdict.handlers.click({ target: { closest: () => h.buttons[0] } });
const said = {};
for (const at of %s) {
  await h.run({ until: at });
  said[at] = { text: h.nodes["v-result"].textContent, html: h.nodes["v-result"].innerHTML,
               className: h.nodes["v-result"].className, enabled: !h.buttons[0].disabled,
               decided: document.body.dataset.decided ?? null, state: document.body.dataset.state };
}
const asked = h.requests.filter((r) => r.url.includes("/commands/")).map((r) => [r.at, r.url]);
return { said, asked, body: { ...document.body.dataset } };
"""
COMMAND_ID = "dashboard-0123456789abcdef0123456789abcdef"
OUTCOME_PATH = f"/api/cases/case-0123456789ab/commands/{COMMAND_ID}"
PENDING = [200, {"command_id": COMMAND_ID, "outcome": "pending"}]


def _outcome(case_reads: list[Any], outcomes: list[Any], at: list[int]) -> dict[str, Any]:
    """The case page's verdict line at each of ``at`` (ms) after Confirm, the case read ``case_reads`` and the
    verdict's outcome ``outcomes`` in turn."""
    answers = {
        "/api/cases/case-0123456789ab": case_reads,
        "POST /api/cases/case-0123456789ab/verdict": [[202, {"command_id": COMMAND_ID, "verb": "confirm"}]],
        OUTCOME_PATH: outcomes,
    }
    shown: dict[str, Any] = run_page("case.js", answers, path="/cases/case-0123456789ab", scenario=OUTCOME % at)
    return shown


def _refused(reason: str) -> list[Any]:
    return [200, {"command_id": COMMAND_ID, "outcome": "refused", "verb": "confirm", "reason": reason}]


MINE = [200, {"case": CASE, "transaction": None, "you": "guard@example.com"}]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_verdict_the_case_service_refuses_is_said_refused_with_its_reason_as_text_within_seconds() -> None:
    """A refusal other than a race (too old, off the service's allow-list, a malformed command, an unknown case) left
    the page at "has not changed in 30 s … the audit says why", without the reason."""
    reason = 'you are not on the case service\'s allow-list <img src=x onerror="alert(1)">'
    shown = _outcome([MINE], [PENDING, _refused(reason)], [1500, 2500, 31_000])
    assert shown["said"]["1500"]["text"] == f"confirm sent ({COMMAND_ID}); waiting for the case service's answer…"
    said = shown["said"]["2500"]
    assert said["text"] == f"confirm was refused: {reason}", shown
    assert said["html"] == "" and said["className"] == "status error" and said["enabled"]  # text, never markup
    assert [at for at, _ in shown["asked"]] == [1000, 2000], "asked by its command id until it answered, no more"
    assert shown["asked"][0][1] == OUTCOME_PATH and shown["body"].get("refused") == "confirm"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_verdict_refused_in_a_race_says_refused_and_who_decided_not_that_the_case_is_now_decided() -> None:
    """Someone else's verdict came first: the case's next version (the refusal's note) read as this verdict's doing,
    "confirm: the case is now dismissed"."""
    decided = {**CASE, "state": "dismissed", "version": 3, "decided_by": "lead@example.com"}
    reason = "case-0123456789ab is already dismissed: cannot confirm it (dismissed by lead@example.com at 2027-01-15"
    reads = [MINE, [200, {"case": decided, "transaction": None, "you": "guard@example.com"}]]
    shown = _outcome(reads, [PENDING, PENDING, _refused(reason)], [1500, 3500])
    assert shown["said"]["1500"]["text"].startswith("confirm sent"), shown
    assert shown["said"]["3500"]["text"] == f"confirm was refused: {reason}"
    assert "decided" not in shown["body"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_applied_verdict_is_said_applied_once_the_cases_new_version_is_shown() -> None:
    applied = [200, {"command_id": COMMAND_ID, "outcome": "applied", "verb": "confirm"}]
    decided = [200, {"case": {**CASE, "state": "confirmed", "version": 2}, "transaction": None, "you": None}]
    shown = _outcome([MINE, MINE, decided], [applied], [1500, 2500])
    assert shown["said"]["1500"]["text"] == "confirm applied; waiting for the case's new version…", shown
    assert shown["said"]["2500"]["text"] == "confirm applied: the case is now confirmed (version 2)."
    assert shown["body"]["decided"] == "confirm" and len(shown["asked"]) == 1


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_verdict_unanswered_for_30_s_frees_the_buttons_and_is_still_told_when_the_service_answers() -> None:
    """The case service down for a while: its answer (here: the verdict came too late) is shown when it comes."""
    reason = "it reached the case service too late (issued 1200 s ago, outside the accepted window)"
    shown = _outcome([MINE], [*[PENDING] * 31, _refused(reason)], [31_000, 45_000, 80_000])
    waiting = shown["said"]["31000"]
    assert waiting["text"].startswith("confirm was sent, but the case service has not answered in 30 s"), shown
    assert waiting["enabled"] and waiting["className"] == "status error"
    assert shown["said"]["45000"]["text"].startswith("confirm was sent, but the case service has not answered")
    assert shown["said"]["80000"]["text"] == f"confirm was refused: {reason}"
    assert [at for at, _ in shown["asked"]][29:] == [30_000, 40_000, 50_000], "every 10 s after the first 30 s"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_an_applied_verdict_whose_case_version_comes_after_30_s_is_told_and_marked_decided_when_it_comes() -> None:
    """A verdict applied whose new case version was not on screen within 30 s (the OpenSearch sink behind) stayed at
    "applied, but the case's new version is not shown yet … it shows once it is" for good, and the page's
    ``data-decided`` marker (what the end-to-end test and people wait on) was never set, though the page's own reads
    showed the new version later. Its next read that shows it now says so and sets the marker."""
    applied = [200, {"command_id": COMMAND_ID, "outcome": "applied", "verb": "confirm"}]
    confirmed = {**CASE, "state": "confirmed", "version": 2}
    decided = [200, {"case": confirmed, "transaction": None, "you": "guard@example.com"}]
    # the case read at 0 and each second of the first 30 s, then every 10 s: the fourth of those (60 s) is version 2
    shown = _outcome([*[MINE] * 33, decided], [applied], [31_000, 55_000, 65_000])
    waiting = "confirm applied, but the case's new version is not shown yet (is the OpenSearch sink running?): it shows"
    for at in ("31000", "55000"):
        assert shown["said"][at]["text"].startswith(waiting), shown
        assert shown["said"][at]["decided"] is None and shown["said"][at]["state"] == "open"
    later = shown["said"]["65000"]
    assert later["text"] == "confirm applied: the case is now confirmed (version 2).", shown
    assert later["decided"] == "confirm" and later["state"] == "confirmed" and later["className"] == "status"
    assert len(shown["asked"]) == 1, "its outcome was known: asked once"
