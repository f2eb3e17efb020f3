"""The alert and case pages show a transaction's amount in its currency's minor units, with the dashboard's shared
formatter: they did not load ``common.js`` and showed the stored number as it came (``0.4 USD``). Runs the pages'
scripts in Node with a minimal DOM (skipped without Node). Their rows escape indexed values with the shared
``escapeHtml`` as well."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.dashboard.app import create_app
from sinks.dashboard.headers import CONTENT_SECURITY_POLICY
from tests.unit.dashboard_pages import NODE, facts, run_page, script_sources


@pytest.mark.parametrize(("path", "page"), [("/alerts/a-1", "alert.js"), ("/cases/case-0123456789ab", "case.js")])
def test_the_alert_and_case_pages_load_the_shared_script_first_under_the_same_policy(path: str, page: str) -> None:
    client = TestClient(create_app(Settings()), base_url="http://127.0.0.1:8050")  # no login: loopback only
    answer = client.get(path)
    assert answer.status_code == 200 and answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY, "only the dashboard's own scripts run"
    assert script_sources(answer.text) == ["/static/common.js", f"/static/{page}"]


def _shown(path: str, answer: dict[str, Any], page: str) -> dict[str, str]:
    """The rows ``page`` fills for ``answer``, with the scripts its HTML page loads, in that order."""
    return facts(run_page(page, [[200, answer]], path=path, runs=0))


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_page_shows_the_amount_in_its_currencys_minor_units() -> None:
    alert = {"alert_id": "a-1", "kind": "BLOCKED_TRANSACTION", "severity": "high", "amount": 0.4, "currency": "USD"}
    shown = _shown("/alerts/a-1", {"alert": alert, "transaction": None}, "alert.js")
    assert shown["alert:amount"] == "0.40 USD"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_case_page_shows_the_transactions_amount_in_its_currencys_minor_units() -> None:
    case = {
        "case_id": "case-1",
        "kind": "watchlist_match",
        "state": "open",
        "version": 1,
        "opened_at": 1_800_000_000_000,
        "images": {"live": None, "reference": None},
        "notes": [],
    }
    answer = {"case": case, "transaction": {"outcome": "REVIEW", "amount": 1200, "currency": "JPY"}, "you": None}
    assert _shown("/cases/case-1", answer, "case.js")["tx:amount"] == "1,200 JPY"
    answer["transaction"] = {"outcome": "REVIEW", "amount": 0.4, "currency": "USD"}
    assert _shown("/cases/case-1", answer, "case.js")["tx:amount"] == "0.40 USD"


HOSTILE = '<img src=x onerror="alert(1)">'


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_alert_and_case_pages_show_indexed_markup_as_text() -> None:
    alert = {
        "alert_id": "a-1",
        "kind": "BLOCKED_TRANSACTION",
        "severity": "high",
        "summary": HOSTILE,
        "currency": "USD",
    }
    alert_rows = _shown("/alerts/a-1", {"alert": alert, "transaction": None}, "alert.js")
    case = {
        "case_id": "case-1",
        "kind": "watchlist_match",
        "summary": HOSTILE,
        "state": "open",
        "version": 1,
        "opened_at": 1_800_000_000_000,
        "images": {"live": None, "reference": None},
        "notes": [],
    }
    answer = {"case": case, "transaction": {"outcome": "REVIEW", "reasons": [HOSTILE]}, "you": None}
    case_rows = _shown("/cases/case-1", answer, "case.js")
    escaped = "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;"
    assert alert_rows["alert:summary"] == escaped and case_rows["case:summary"] == escaped
    assert case_rows["tx:reasons"] == escaped
    assert not any("<img" in cell for cell in [*alert_rows.values(), *case_rows.values()])
