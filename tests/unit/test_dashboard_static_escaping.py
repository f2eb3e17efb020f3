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
