"""When the case page asks for its case again: the page's scripts run in Node against canned answers and a clock of
their own (skipped without Node). A 4xx is the request's own fault and asked again gets the same answer; only a 5xx
or no answer at all is worth another try, and those come further apart each time."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

STATIC = Path(__file__).resolve().parents[2] / "sinks" / "dashboard" / "static"
NODE = shutil.which("node") or shutil.which("nodejs")
CASE = {
    "case_id": "case-0123456789ab",
    "state": "open",
    "kind": "WATCHLIST_MATCH",
    "version": 1,
    "opened_at": 1,
    "notes": [],
    "images": {},
}

HARNESS = """
const nodes = {};
const node = (id) => (nodes[id] ||= {
  id, className: "", textContent: "", innerHTML: "", disabled: false, dataset: {}, addEventListener() {},
  insertAdjacentHTML(_where, html) { this.innerHTML += html; }, querySelector: () => null, getAttribute: () => "",
});
const buttons = [node("b1"), node("b2")];
globalThis.document = {
  getElementById: node, querySelector: node, querySelectorAll: () => buttons, body: { dataset: {} }, title: "",
};
globalThis.location = { pathname: %s };
// The answers, in order: [status, body] (a string body is not JSON), or null for a request with no answer.
const answers = %s;
let fetched = 0;
globalThis.fetch = async () => {
  const answer = answers[Math.min(fetched++, answers.length - 1)];
  if (answer === null) throw new TypeError("Failed to fetch");
  const [status, body] = answer;
  return {
    ok: status < 300, status, statusText: status >= 500 ? "Bad Gateway" : "",
    json: async () => (typeof body === "string" ? JSON.parse(body) : body),
  };
};
const timers = [];  // the page's own waits, run here one by one instead of in real time
globalThis.setTimeout = (fn, ms) => { timers.push({ fn, ms }); return timers.length; };
globalThis.clearTimeout = (id) => { if (id) timers[id - 1].fn = null; };
globalThis.setInterval = () => 0;
const flush = () => new Promise((done) => setImmediate(done));
const waits = [];
const seen = [];
(async () => {
  %s
  await flush();
  for (let run = 0; run < timers.length && run < 20; run++) {
    seen.push(nodes.status.textContent);
    if (!timers[run].fn) continue;
    waits.push(timers[run].ms);
    timers[run].fn();
    await flush();
  }
  seen.push(nodes.status.textContent);
  console.log(JSON.stringify({
    fetched, waits, seen, status: nodes.status, loaded: document.body.dataset.loaded === "1",
    disabled: buttons.every((b) => b.disabled),
  }));
})();
"""


def _run(answers: list[Any], page: str = "case.js", path: str = "/cases/case-0123456789ab") -> dict[str, Any]:
    """How ``page`` at ``path`` asks for its JSON given ``answers``: the waits it sets, what it says between tries."""
    scripts = (STATIC / "common.js").read_text() + (STATIC / page).read_text()  # as the page's HTML loads them
    script = HARNESS % (json.dumps(path), json.dumps(answers), scripts)
    run = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


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


CLOCK_HARNESS = """
const nodes = {};
const node = (id) => (nodes[id] ||= {
  id, className: "", textContent: "", innerHTML: "", disabled: false, dataset: {}, addEventListener() {},
  insertAdjacentHTML(_where, html) { this.innerHTML += html; }, querySelector: () => null, getAttribute: () => "",
});
globalThis.document = {
  getElementById: node, querySelector: node, querySelectorAll: () => [], body: { dataset: {} }, title: "",
};
globalThis.location = { pathname: "/cases/case-0123456789ab" };
// A clock of the page's own: its waits (and its intervals) run in the order they fall due, the clock set to each.
let now = 0, ids = 0;
const timers = new Map();
globalThis.setTimeout = (fn, ms) => { timers.set(++ids, { fn, due: now + (ms || 0) }); return ids; };
globalThis.setInterval = (fn, ms) => { timers.set(++ids, { fn, due: now + ms, every: ms }); return ids; };
globalThis.clearTimeout = globalThis.clearInterval = (id) => timers.delete(id);
// The answers, in order (the last one repeated): [status, body, ms it takes to come], or null for no answer.
const answers = %s;
const asked = [];
let fetched = 0, waiting = 0, mostWaiting = 0;
globalThis.fetch = (url) => {
  const answer = answers[Math.min(fetched++, answers.length - 1)];
  asked.push(now);
  mostWaiting = Math.max(mostWaiting, ++waiting);
  return new Promise((resolve, reject) => setTimeout(() => {
    waiting -= 1;
    if (answer === null) return reject(new TypeError("Failed to fetch"));
    const [status, body] = answer;
    resolve({
      ok: status < 300, status, statusText: status >= 500 ? "Gateway Timeout" : "",
      json: async () => (typeof body === "string" ? JSON.parse(body) : body),
    });
  }, (answer && answer[2]) || 0));
};
const flush = () => new Promise((done) => setImmediate(done));
(async () => {
  %s
  await flush();
  while (timers.size) {
    const [id, next] = [...timers].reduce((a, b) => (b[1].due < a[1].due ? b : a));
    if (next.due > %d) break;
    now = next.due;
    if (next.every) next.due += next.every; else timers.delete(id);
    next.fn();
    await flush(); await flush();
  }
  console.log(JSON.stringify({ asked, mostWaiting, status: nodes.status }));
})();
"""


def _clocked(answers: list[Any], until_ms: int) -> dict[str, Any]:
    """When the case page asks for its case over its first ``until_ms``, given ``answers`` that take their time."""
    scripts = (STATIC / "common.js").read_text() + (STATIC / "case.js").read_text()
    script = CLOCK_HARNESS % (json.dumps(answers), scripts, until_ms)
    run = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


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


VERDICT_HARNESS = """
const nodes = {};
const node = (id) => (nodes[id] ||= {
  id, className: "", textContent: "", innerHTML: "", value: "", disabled: false, dataset: {}, handlers: {},
  addEventListener(name, fn) { this.handlers[name] = fn; },
  insertAdjacentHTML(_where, html) { this.innerHTML += html; }, querySelector: () => null,
});
const buttons = [node("confirm"), node("dismiss")];
buttons[0].dataset.verb = "confirm";
buttons[1].dataset.verb = "dismiss";
globalThis.document = {
  getElementById: node, querySelector: node, querySelectorAll: () => buttons, body: { dataset: {} }, title: "",
};
globalThis.location = { pathname: "/cases/case-0123456789ab" };
// The case's own reads always answer; the verdict's answers come in order: [status, body] (a string is not JSON).
const verdicts = %s;
const sent = [];
globalThis.fetch = async (url, init = {}) => {
  const [status, body] = init.method === "POST"
    ? verdicts[sent.push(JSON.parse(init.body).request_id) - 1]
    : [200, { case: %s, transaction: null, you: "guard@example.com" }];
  return {
    ok: status < 300, status, statusText: status >= 500 ? "Bad Gateway" : "",
    json: async () => (typeof body === "string" ? JSON.parse(body) : body),
  };
};
globalThis.setInterval = () => 0;
const thrown = [];
process.on("unhandledRejection", (e) => thrown.push(String(e)));
const flush = () => new Promise((done) => setTimeout(done, 20));
const press = () => nodes.verdict.handlers.click({ target: { closest: () => buttons[0] } });
(async () => {
  %s
  await flush();
  const shown = [];
  for (let i = 0; i < verdicts.length; i++) {
    press();
    await flush();
    shown.push({ result: nodes["v-result"].textContent, className: nodes["v-result"].className,
      enabled: !buttons[0].disabled });
  }
  console.log(JSON.stringify({ shown, sent, thrown }));
  process.exit(0);
})();
"""


def _verdicts(answers: list[Any]) -> dict[str, Any]:
    """What the case page says after each press of Confirm, the verdict endpoint answering ``answers`` in turn."""
    scripts = (STATIC / "common.js").read_text() + (STATIC / "case.js").read_text()
    script = VERDICT_HARNESS % (json.dumps(answers), json.dumps(CASE), scripts)
    run = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_verdict_answered_by_a_page_that_is_not_json_says_so_and_is_sent_again_as_the_same_submission() -> None:
    """A proxy's 502 page left "sending confirm…" on screen with no word (the page threw reading it as JSON)."""
    shown = _verdicts([[502, "<html>bad gateway</html>"], [400, {"error": "this case is already decided"}]])
    first, second = shown["shown"]
    assert shown["thrown"] == [], shown
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
