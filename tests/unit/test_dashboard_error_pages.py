"""The live, models and pipeline pages read their JSON through common.js: an answer that is not JSON (a proxy's
HTML error page) is shown as its status, not as a JSON parse error. Runs the scripts in Node against canned answers
(skipped without Node)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_dashboard_case_page_polling import _run as polled

STATIC = Path(__file__).resolve().parents[2] / "sinks" / "dashboard" / "static"
NODE = shutil.which("node") or shutil.which("nodejs")
PROXY_PAGE = "<html><body>502 Bad Gateway</body></html>"

GET_JSON = """
%s
globalThis.fetch = async () => ({
  ok: false, status: 502, statusText: "Bad Gateway", json: async () => JSON.parse(%s),
});
getJson({ minutes: 60, anchor: false, store: "" }, "/api/overview").then(
  () => console.log(JSON.stringify({ thrown: null })),
  (e) => console.log(JSON.stringify({ thrown: e.message })),
);
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_and_models_pages_show_a_proxys_error_page_as_its_status() -> None:
    """getJson read every answer as JSON: a proxy's 502 page was shown as "Unexpected token '<' … is not valid
    JSON"."""
    script = GET_JSON % ((STATIC / "common.js").read_text(), json.dumps(PROXY_PAGE))
    run = subprocess.run([NODE or "node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    thrown = json.loads(run.stdout.strip().splitlines()[-1])["thrown"]
    assert thrown == "/api/overview: HTTP 502 Bad Gateway"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_pipeline_page_shows_a_proxys_error_page_as_its_status_and_asks_again() -> None:
    """pipeline.js read the answer as JSON: a proxy's 502 page was shown as a JSON parse error."""
    shown = polled([[200, {"refresh_ms": 5000}], [502, PROXY_PAGE]], "pipeline.js", "/pipeline")
    assert shown["seen"][0] == "/api/pipeline: HTTP 502 Bad Gateway — retrying", shown
    assert shown["status"]["className"] == "status error" and shown["waits"][0] == 5000
