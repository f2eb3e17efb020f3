"""The cases list page escapes indexed values with the dashboard's one ``escapeHtml`` (``common.js``), as the alert
and case pages do: it kept a copy of its own, which a fix to the shared one would not have reached. Runs the page's
scripts in Node, each as a separate classic script in one global scope as the browser does (skipped without Node)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.dashboard.app import create_app

STATIC = Path(__file__).resolve().parents[2] / "sinks" / "dashboard" / "static"
NODE = shutil.which("node") or shutil.which("nodejs")
HOSTILE = '<img src=x onerror="alert(1)">'

HARNESS = """
const vm = require("vm");
const nodes = {};
const node = (key) => (nodes[key] ||= {
  options: [], add(o) { this.options.push(o); }, value: "", textContent: "", className: "", hidden: false,
  innerHTML: "", addEventListener() {},
});
const answers = %s;
const context = vm.createContext({
  document: { getElementById: node, querySelector: node, body: { dataset: {} } },
  location: { search: "" }, history: { replaceState() {} },
  Option: function (text, value) { this.text = text; this.value = value; },
  URLSearchParams, console, setTimeout, setInterval: () => 0,
  fetch: async (url) => ({ ok: true, status: 200, json: async () => answers[url.split("?")[0]] }),
});
const SHARED = ["escapeHtml", "getJson", "fmtPrice"];
const shared = () => SHARED.map((name) => vm.runInContext(`typeof ${name} === "function" ? ${name} : null`, context));
const scripts = %s;
const before = [];
for (const [name, text] of scripts) {
  vm.runInContext(text, context, { filename: name });
  if (name === "common.js") before.push(...shared());
}
setTimeout(() => console.log(JSON.stringify({
  queue: nodes["#queue-table tbody"].innerHTML,
  ages: nodes["#age-table tbody"].innerHTML,
  kinds: nodes["#kind-table tbody"].innerHTML,
  sharedLoaded: before.length > 0 && before.every(Boolean),
  sharedKept: shared().every((f, i) => f === before[i]),
})), 50);
"""


def _page_scripts(html: str) -> list[str]:
    return re.findall(r'<script src="([^"]+)"></script>', html)


def test_the_cases_page_loads_the_shared_script_first() -> None:
    client = TestClient(create_app(Settings()), base_url="http://127.0.0.1:8050")  # no login: loopback only
    answer = client.get("/cases")
    assert answer.status_code == 200
    assert _page_scripts(answer.text) == ["/static/common.js", "/static/cases.js"]


def _shown(answers: dict[str, Any]) -> dict[str, Any]:
    """What the cases page draws from ``answers`` (per API path), with the scripts its HTML loads, in that order."""
    html = (STATIC / "cases.html").read_text()
    scripts = [
        (src.removeprefix("/static/"), (STATIC / src.removeprefix("/static/")).read_text())
        for src in _page_scripts(html)
    ]
    script = HARNESS % (json.dumps(answers), json.dumps(scripts))
    run = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


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
