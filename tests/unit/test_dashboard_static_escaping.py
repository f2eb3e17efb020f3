"""The page scripts put indexed values into HTML escaped: a currency code or a series name that is markup shows
as text and runs nothing. Runs common.js in Node with a minimal DOM (skipped where Node is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

COMMON_JS = Path(__file__).resolve().parents[2] / "sinks" / "dashboard" / "static" / "common.js"
HOSTILE = '<img src=x onerror="alert(1)">'
NODE = shutil.which("node") or shutil.which("nodejs")

HARNESS = """
const made = [];
globalThis.document = { createElement: () => { const e = { appendChild() {} }; made.push(e); return e; } };
%s
const container = { appendChild() {} };
legend(container, [%s]);
console.log(JSON.stringify({ money: fmtMoney({ [%s]: 5, USD: 7 }), legend: made.map((e) => e.innerHTML || "") }));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_currency_codes_and_series_names_are_escaped_before_they_reach_html() -> None:
    hostile = json.dumps(HOSTILE)
    script = HARNESS % (COMMON_JS.read_text(), hostile, hostile)
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    shown = json.loads(out)
    for html in (shown["money"], *shown["legend"]):
        assert "<img" not in html, html
    assert "&lt;img" in shown["money"] and "USD" in shown["money"]
    assert any("&lt;img" in html for html in shown["legend"])


MONEY_HARNESS = """
%s
console.log(JSON.stringify({
  money: fmtMoney({ USD: 0.4, JPY: 1200, KWD: 0.125, EUR: 0 }),
  unknown: fmtAmount(0.4, "<b>"),
  none: fmtMoney({}),
}));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_money_is_shown_in_its_currencys_minor_units_not_rounded_to_whole_units() -> None:
    """0.40 USD showed as "0 USD": every figure was rounded to whole units."""
    script = MONEY_HARNESS % COMMON_JS.read_text()
    env = {"LC_ALL": "en_US.UTF-8", "LANG": "en_US.UTF-8", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30, check=True, env=env)
    shown = json.loads(run.stdout)
    assert shown["money"] == "0.40 USD · 1,200 JPY · 0.125 KWD"
    assert shown["unknown"] == "0.40"  # not a currency code: two decimals, no error
    assert shown["none"] == "0"


PAGE_HARNESS = """
const nodes = {};
const node = (id) => (nodes[id] ||= { id, className: "", textContent: "", disabled: false, addEventListener() {} });
const buttons = [node("b1"), node("b2")];
globalThis.document = {
  getElementById: node, querySelector: node, querySelectorAll: () => buttons, body: { dataset: {} },
};
globalThis.location = { pathname: %s };
const fetched = [];
globalThis.fetch = async (url) => { fetched.push(url); throw new Error("no server here"); };
globalThis.setInterval = () => 0;
process.on("unhandledRejection", (e) => { console.log(JSON.stringify({ thrown: String(e) })); process.exit(0); });
try { %s } catch (e) { console.log(JSON.stringify({ thrown: String(e) })); process.exit(0); }
const shown = () => ({ status: nodes.status, fetched, disabled: buttons.every((b) => b.disabled) });
setTimeout(() => console.log(JSON.stringify(shown())), 50);
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(("page", "path"), [("alert.js", "/alerts/a-50%zz"), ("case.js", "/cases/c-1%E0%A4%A")])
def test_a_page_whose_address_has_a_malformed_escape_says_so_instead_of_sitting_at_loading(
    page: str, path: str
) -> None:
    """decodeURIComponent threw on the id and the page stayed at "loading…" with no message."""
    scripts = COMMON_JS.read_text() + (COMMON_JS.parent / page).read_text()  # as the page's HTML loads them
    script = PAGE_HARNESS % (json.dumps(path), scripts)
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    shown = json.loads(out.strip().splitlines()[-1])
    assert "thrown" not in shown, shown
    assert shown["status"]["className"] == "status error", shown
    assert "malformed % escape" in shown["status"]["textContent"]
    assert shown["fetched"] == []
    if page == "case.js":
        assert shown["disabled"], "no verdict for a case the page cannot name"


RENDER_HARNESS = """
const nodes = {};
const node = (id) => (nodes[id] ||= {
  id, className: "", textContent: "", innerHTML: "", disabled: false, dataset: {}, addEventListener() {},
  insertAdjacentHTML(_where, html) { this.innerHTML += html; },
});
globalThis.document = {
  getElementById: node, querySelector: node, querySelectorAll: () => [], body: { dataset: {} }, title: "",
};
globalThis.location = { pathname: "/cases/case-0123456789ab" };
globalThis.fetch = () => new Promise(() => {});
globalThis.setInterval = () => 0;
%s
render({ case: %s, transaction: null, you: null });
console.log(JSON.stringify({ facts: nodes["#case-facts tbody"].innerHTML, trail: nodes.trail.innerHTML }));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_case_page_shows_a_notes_and_a_reasons_line_breaks_with_the_text_still_escaped() -> None:
    """A note written on several lines showed as one: HTML runs a line break into a space."""
    case = {
        "case_id": "case-0123456789ab",
        "state": "dismissed",
        "kind": "WATCHLIST_MATCH",
        "version": 3,
        "opened_at": 1,
        "decided_at": 3,
        "decided_by": "guard@example.com",
        "verdict": "dismissed",
        "verdict_reason": f"not him:\n{HOSTILE}",
        "notes": [{"at": 2, "actor": "guard@example.com", "text": "first line\r\nsecond line"}],
        "images": {},
    }
    scripts = COMMON_JS.read_text() + (COMMON_JS.parent / "case.js").read_text()
    script = RENDER_HARNESS % (scripts, json.dumps(case))
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    shown = json.loads(out.strip().splitlines()[-1])
    assert "first line<br>second line" in shown["trail"]
    assert "not him:<br>&lt;img src=x" in shown["trail"] and "not him:<br>&lt;img src=x" in shown["facts"]
    assert "<img" not in shown["trail"] + shown["facts"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_case_page_shows_an_out_of_range_time_as_it_came_in_its_row_only() -> None:
    """An opened_at no date can hold made toISOString throw, and nothing of the case was drawn."""
    case = {
        "case_id": "case-0123456789ab",
        "state": "open",
        "kind": "WATCHLIST_MATCH",
        "version": 1,
        "opened_at": 1e20,
        "expires_at": HOSTILE,
        "notes": [{"at": 1_800_000_000_000, "actor": "guard@example.com", "text": "seen"}],
        "images": {},
    }
    scripts = COMMON_JS.read_text() + (COMMON_JS.parent / "case.js").read_text()
    script = RENDER_HARNESS % (scripts, json.dumps(case))
    out = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    shown = json.loads(out.stdout.strip().splitlines()[-1])
    assert '<td data-field="opened">100000000000000000000</td>' in shown["facts"], shown
    assert '<td data-field="expires">&lt;img src=x' in shown["facts"] and "<img" not in shown["facts"]
    assert "<time>100000000000000000000</time>" in shown["trail"]
    assert "<time>2027-01-15 08:00:00 UTC</time> <b>guard@example.com</b> seen" in shown["trail"]
