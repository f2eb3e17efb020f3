"""The page scripts put indexed values into HTML escaped: a currency code or a series name that is markup shows
as text and runs nothing. Runs common.js in Node with a minimal DOM (skipped where Node is not installed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.dashboard_pages import NODE, run_page

HOSTILE = '<img src=x onerror="alert(1)">'

LEGEND = """
legend({ appendChild() {} }, [%s]);
return { money: fmtMoney({ [%s]: 5, USD: 7 }), legend: h.created.map((e) => e.innerHTML || "") };
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_currency_codes_and_series_names_are_escaped_before_they_reach_html() -> None:
    hostile = json.dumps(HOSTILE)
    shown = run_page("common.js", scenario=LEGEND % (hostile, hostile))
    for html in (shown["money"], *shown["legend"]):
        assert "<img" not in html, html
    assert "&lt;img" in shown["money"] and "USD" in shown["money"]
    assert any("&lt;img" in html for html in shown["legend"])


MONEY = """
return {
  money: fmtMoney({ USD: 0.4, JPY: 1200, KWD: 0.125, EUR: 0 }),
  unknown: fmtAmount(0.4, "<b>"),
  none: fmtMoney({}),
};
"""


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_money_is_shown_in_its_currencys_minor_units_not_rounded_to_whole_units() -> None:
    """0.40 USD showed as "0 USD": every figure was rounded to whole units."""
    shown = run_page("common.js", scenario=MONEY)  # in the en_US locale
    assert shown["money"] == "0.40 USD · 1,200 JPY · 0.125 KWD"
    assert shown["unknown"] == "0.40"  # not a currency code: two decimals, no error
    assert shown["none"] == "0"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
@pytest.mark.parametrize(("page", "path"), [("alert.js", "/alerts/a-50%zz"), ("case.js", "/cases/c-1%E0%A4%A")])
def test_a_page_whose_address_has_a_malformed_escape_says_so_instead_of_sitting_at_loading(
    page: str, path: str
) -> None:
    """decodeURIComponent threw on the id and the page stayed at "loading…" with no message."""
    ran = run_page(page, [None], path=path)  # fails on anything the page threw
    shown = {"status": ran["status"], "fetched": [r["url"] for r in ran["requests"]], "disabled": ran["disabled"]}
    assert shown["status"]["className"] == "status error", shown
    assert "malformed % escape" in shown["status"]["textContent"]
    assert shown["fetched"] == []
    if page == "case.js":
        assert shown["disabled"], "no verdict for a case the page cannot name"


# The case page's render of a case, its own read of it never answered.
RENDER = """
render({ case: %s, transaction: null, you: null });
return { facts: h.nodes["#case-facts tbody"].innerHTML, trail: h.nodes.trail.innerHTML };
"""


def _rendered(case: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = run_page(
        "case.js", ["held"], path="/cases/case-0123456789ab", scenario=RENDER % json.dumps(case)
    )
    return shown


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
    shown = _rendered(case)
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
    shown = _rendered(case)
    assert '<td data-field="opened">100000000000000000000</td>' in shown["facts"], shown
    assert '<td data-field="expires">&lt;img src=x' in shown["facts"] and "<img" not in shown["facts"]
    assert "<time>100000000000000000000</time>" in shown["trail"]
    assert "<time>2027-01-15 08:00:00 UTC</time> <b>guard@example.com</b> seen" in shown["trail"]
