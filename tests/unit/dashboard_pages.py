"""The dashboard's page scripts run in Node as a browser runs them, over a fake DOM, canned answers and a clock of
their own (``dashboard_pages.js``): one harness for every page test, which each test file kept a copy of before, each
a little different. Tests using it are skipped without Node."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATIC = Path(__file__).resolve().parents[2] / "sinks" / "dashboard" / "static"
HARNESS = Path(__file__).with_name("dashboard_pages.js")
NODE = shutil.which("node") or shutil.which("nodejs")
PAGES = {"app.js": "index.html", "alert.js": "alert.html", "case.js": "case.html", "cases.js": "cases.html"}
PAGES |= {"models.js": "models.html", "pipeline.js": "pipeline.html"}


def script_sources(html: str) -> list[str]:
    """The scripts an HTML page loads, in its order (``/static/common.js``, ...)."""
    return re.findall(r'<script src="([^"]+)"></script>', html)


def page_scripts(page: str) -> list[tuple[str, str]]:
    """``page``'s scripts (``case.js``: those ``case.html`` loads, common.js first) as (name, text), or ``common.js``
    alone."""
    if page == "common.js":
        return [(page, (STATIC / page).read_text())]
    names = [src.removeprefix("/static/") for src in script_sources((STATIC / PAGES[page]).read_text())]
    return [(name, (STATIC / name).read_text()) for name in names]


def run_page(
    page: str,
    answers: Sequence[Any] | Mapping[str, Any] = (),
    *,
    path: str = "/",
    search: str = "",
    then: str = "",
    runs: int = 20,
    until_ms: int | None = None,
    scenario: str | None = None,
    buttons: Sequence[str] = ("confirm", "dismiss"),
) -> Any:
    """What ``page`` does given ``answers`` (one list for every request, or a list per path; each ``[status, body,
    ms to come]``, ``None`` for no answer, ``"held"`` until the scenario releases it) at ``path`` and ``search``.

    By default the page starts, ``then`` (script with ``h``, the harness, at hand) runs, and at most ``runs`` of its
    waits, none after ``until_ms``; the result is the harness's summary (asked, waits, seen, status, nodes, ...).
    ``scenario``, the body of an async function of ``h``, does instead what it says and returns the result. Whatever
    the page threw fails the test."""
    until = "Infinity" if until_ms is None else str(until_ms)
    body = scenario or f"{then}\nawait h.run({{ runs: {runs}, until: {until} }});\nreturn h.summary();"
    settings = {
        "scripts": page_scripts(page),
        "answers": dict(answers) if isinstance(answers, Mapping) else list(answers),
        "path": path,
        "search": search,
        "scenario": body,
        "buttons": list(buttons),
    }
    env = {**os.environ, "LC_ALL": "en_US.UTF-8", "LANG": "en_US.UTF-8"}  # numbers formatted as the tests expect
    run = subprocess.run(
        [NODE or "node", str(HARNESS)], input=json.dumps(settings), capture_output=True, text=True, timeout=30, env=env
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["thrown"] == [], out["thrown"]
    return out["result"]


FACT_TABLES = {"alert": "#alert-facts tbody", "case": "#case-facts tbody", "tx": "#tx-facts tbody"}


def facts(shown: dict[str, Any]) -> dict[str, str]:
    """The alert and case pages' fact rows as the page filled them: {"alert:store": cell's HTML, "tx:amount": ...}."""
    found = {}
    for table, selector in FACT_TABLES.items():
        html = (shown["nodes"].get(selector) or {}).get("innerHTML", "")
        for label, cell in re.findall(r'<tr><th>(.*?)</th><td data-field="[^"]*">(.*?)</td></tr>', html):
            found[f"{table}:{label}"] = cell
    return found
