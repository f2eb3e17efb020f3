"""The case page, the cases list and the live page give an alert's or case's times as its alert message gives them,
in the store's zone (``CG_ALERTS__STORE_TIMEZONES``, else ``CG_ALERTS__TIMEZONE``), as the alert page does, and the
live and models pages their charts', window end's and drift hours' on that clock too: the app's own answers, then
the pages run in Node over them (skipped without Node). Before, all gave UTC, hours off the message a guard came
from."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opensearchpy.connection import Connection
from starlette.testclient import TestClient

from infra.settings import Settings
from sinks.alerts.message import describe
from sinks.dashboard import queries
from sinks.dashboard.app import Dashboard, create_app
from sinks.dashboard.queries import keeps_local_offsets, localtime_name, viewer_zone
from tests.unit.dashboard_pages import NODE, facts, run_page
from tests.unit.test_dashboard_live_page import FACES, OVERVIEW

T = 1_800_000_000_000  # 2027-01-15 08:00:00 UTC: 03:00:00 EST in New York, 09:00:00 CET in Berlin
MIN = 60_000
SETTINGS = Settings(alerts={"timezone": "Europe/Berlin", "store_timezones": {"S-NYC": "America/New_York"}})
CASE = {
    "case_id": "case-0123456789ab",
    "version": 2,
    "state": "open",
    "kind": "SUSPECT_ENTERED",
    "store_id": "S-NYC",
    "alert_id": "watchlist:entrance:1:subj-1",
    "summary": "Possible suspect subj-1 entered at S-NYC",
    "opened_at": T,
    "updated_at": T + MIN,
    "expires_at": T + 24 * 60 * MIN,
    "updated_by": "guard@example.com",
    "notes": [{"at": T + MIN, "actor": "guard@example.com", "text": "on my way"}],
}
ALERT = {
    "alert_id": "watchlist:entrance:1:subj-1",
    "kind": "SUSPECT_ENTERED",
    "severity": "high",
    "event_time": T,
    "store_id": "S-NYC",
    "summary": "Possible suspect subj-1 entered at S-NYC",
}


class Indexed:
    """The cases and alerts indexes holding one document each; a search returns only the fields it asks for."""

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        doc = CASE if "cases" in index else ALERT if "alerts" in index else None
        if doc is None:
            return {"hits": {"total": {"value": 0}, "hits": []}, "aggregations": {}}
        source = {k: v for k, v in doc.items() if k in body.get("_source", doc)}
        return {"hits": {"total": {"value": 1}, "hits": [{"_source": source}]}, "aggregations": {}}


def answers(settings: Settings = SETTINGS) -> dict[str, Any]:
    """The app's answers to the three pages, the window ending a minute after the alert."""
    board = Dashboard(settings, client=Indexed(), clock=lambda: (T + MIN) / 1000)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    paths = ("/api/cases/case-0123456789ab", "/api/cases", "/api/alerts")
    return {path: client.get(path).json() for path in paths}


def test_every_answer_gives_the_times_as_the_alert_message_gives_them_keeping_the_utc_fields() -> None:
    message_time = dict(describe(ALERT, SETTINGS.alerts).lines)["When"]
    assert message_time == "2027-01-15 03:00:00 EST"
    got = answers()
    case = got["/api/cases/case-0123456789ab"]["case"]
    assert case["local_times"] == {
        "opened_at": message_time,
        "updated_at": "2027-01-15 03:01:00 EST",
        "expires_at": "2027-01-16 03:00:00 EST",
    }
    assert case["notes"][0]["local_time"] == "2027-01-15 03:01:00 EST" and case["notes"][0]["at"] == T + MIN
    assert case["opened_at"] == T  # the epoch-ms fields stay: an older page or script reads them as before
    assert got["/api/cases"]["cases"][0]["local_times"]["opened_at"] == message_time
    [alert] = got["/api/alerts"]["alerts"]
    assert alert["local_time"] == message_time and alert["event_time"] == T
    chain = answers(Settings(alerts={"timezone": "Europe/Berlin"}))  # a store in no zone of its own: the chain's
    assert chain["/api/alerts"]["alerts"][0]["local_time"] == "2027-01-15 09:00:00 CET"


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_case_page_shows_its_times_in_the_stores_zone_and_utc_labelled_without_them() -> None:
    answer = answers()["/api/cases/case-0123456789ab"]
    shown = run_page("case.js", [[200, answer]], path="/cases/case-0123456789ab", runs=0)
    rows, trail = facts(shown), shown["nodes"]["trail"]["innerHTML"]
    assert rows["case:opened"] == "2027-01-15 03:00:00 EST" and rows["case:expires"] == "2027-01-16 03:00:00 EST"
    assert "<time>2027-01-15 03:01:00 EST</time> <b>guard@example.com</b> on my way" in trail
    assert "UTC" not in trail + rows["case:opened"]
    bare = {**answer, "case": {k: v for k, v in answer["case"].items() if k != "local_times"}}  # an older answer
    bare["case"]["notes"] = [{k: v for k, v in n.items() if k != "local_time"} for n in bare["case"]["notes"]]
    shown = run_page("case.js", [[200, bare]], path="/cases/case-0123456789ab", runs=0)
    assert facts(shown)["case:opened"] == "2027-01-15 08:00:00 UTC"
    assert "<time>2027-01-15 08:01:00 UTC</time>" in shown["nodes"]["trail"]["innerHTML"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_cases_list_shows_when_each_case_opened_in_its_stores_zone() -> None:
    figures = {"open": 1, "time_to_verdict_s": {"p50": None, "p95": None, "decided": 0}, "open_by_age": []}
    figures |= {"by_kind": [], "by_store": []}
    queue = answers()["/api/cases"]
    shown = run_page("cases.js", {"/api/cases": [[200, queue]], "/api/cases/figures": [[200, figures]]})
    assert "<td>2027-01-15 03:00:00 EST</td>" in shown["nodes"]["#queue-table tbody"]["innerHTML"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_page_shows_each_alerts_time_in_its_stores_zone() -> None:
    shown = run_page(
        "app.js",
        {
            "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
            "/api/overview": [[200, OVERVIEW]],
            "/api/alerts": [[200, answers()["/api/alerts"]]],
            "/api/faces": [[200, FACES]],
        },
        runs=0,
    )
    [card] = shown["nodes"]["alerts"]["children"]
    assert re.search(r'class="meta">2027-01-15 03:00:00 EST · store S-NYC<', card), card


class Charted:
    """Every index answers one chart bucket, starting at T."""

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        buckets = [{"key": T, "doc_count": 1}]
        return {"hits": {"total": {"value": 1}, "hits": []}, "aggregations": {"series": {"buckets": buckets}}}


def chart_answers(settings: Settings = SETTINGS, store: str = "") -> dict[str, Any]:
    """The live page's chart answers (overview, face activity) for ``store`` ("" = every store)."""
    board = Dashboard(settings, client=Charted(), clock=lambda: (T + MIN) / 1000)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    return {path: client.get(path, params={"store": store}).json() for path in ("/api/overview", "/api/faces")}


def test_the_chart_answers_give_store_times_where_the_charts_have_one_clock() -> None:
    """The live page's charts and window end were in UTC while its alert list and the case pages gave store times.
    With a store chosen, or a chain of one zone, each point (and the window's end) comes on that store's clock, as
    the alert messages give times; a chain across zones with no store chosen has no one store clock: no local times
    (the page uses the viewer's own zone, named)."""
    nyc = chart_answers(store="S-NYC")
    for path in ("/api/overview", "/api/faces"):
        assert [(p["t"], p["local"]) for p in nyc[path]["series"]] == [(T, "2027-01-15 03:00:00 EST")], path
    assert nyc["/api/overview"]["window"]["local_end"] == "2027-01-15 03:01:00 EST"
    berlin = chart_answers(store="S-BER")  # a store in no zone of its own: the chain's
    assert berlin["/api/overview"]["series"][0]["local"] == "2027-01-15 09:00:00 CET"
    one_zone = chart_answers(Settings(alerts={"timezone": "Europe/Berlin"}))
    assert one_zone["/api/faces"]["series"][0]["local"] == "2027-01-15 09:00:00 CET"
    assert one_zone["/api/overview"]["window"]["local_end"] == "2027-01-15 09:01:00 CET"
    mixed = chart_answers()
    assert "local" not in mixed["/api/overview"]["series"][0] and "local_end" not in mixed["/api/overview"]["window"]
    assert "local" not in mixed["/api/faces"]["series"][0]


CHART_TEXTS = (
    "await h.run({ runs: 0 });"
    "return { status: h.nodes.status.textContent, texts: h.created.map((e) => e.textContent) };"
)
"""The live page's status line and the text of every element it made (the charts' ticks among them)."""


def _live_charts(charts: dict[str, Any]) -> dict[str, Any]:
    return run_page(
        "app.js",
        {
            "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
            "/api/overview": [[200, charts["/api/overview"]]],
            "/api/alerts": [[200, {"total": 0, "alerts": []}]],
            "/api/faces": [[200, charts["/api/faces"]]],
        },
        scenario=CHART_TEXTS,
    )


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_pages_charts_show_the_stores_clock_else_the_viewers_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Australia/Adelaide")  # the viewer's browser: 18:30 at T
    shown = _live_charts(chart_answers(store="S-NYC"))
    assert "window ends 03:01:00 EST · " in shown["status"] and "UTC" not in shown["status"], shown["status"]
    assert "03:00" in shown["texts"] and not {"08:00", "18:30"} & set(shown["texts"]), "every chart's ticks, sales too"
    shown = _live_charts(chart_answers())  # a chain across zones, every store: the viewer's clock, named
    assert "window ends 18:31:00 your time, Australia/Adelaide · " in shown["status"], shown["status"]
    assert "18:30" in shown["texts"] and "08:00" not in shown["texts"], shown["texts"]


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_a_chart_tick_of_an_hours_bucket_keeps_its_minutes_on_a_clock_off_the_hour() -> None:
    ticks = [
        ["2027-01-15 13:30:00 IST", 3600],
        ["2027-01-15 03:00:00 EST", 3600],
        ["2027-01-15 00:00:00 CET", 86400],
        ["2027-01-15 19:00:00 EST", 86400],
        ["2027-01-15 03:00:05 EST", 5],
    ]
    script = f"return {json.dumps(ticks)}.map(([local, s]) => fmtTime(0, s, local));"
    assert run_page("common.js", scenario=script) == ["01-15 13:30", "01-15 03h", "01-15", "01-15 19h", "03:00:05"]


class Drifted:
    """The drift index holds one report, for the hour starting at T; every other index answers empty."""

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        if not index.endswith("model_drift"):
            return {"hits": {"total": {"value": 0}, "hits": []}, "aggregations": {}}
        report = {"_source": {"model_version": "m-1", "hour_start": T, "rows": 5, "score_psi": 0.01}}
        bucket = {"key": "m-1", "latest": {"hits": {"hits": [report]}}, "in_window": {"doc_count": 1}}
        return {"hits": {"total": {"value": 1}, "hits": []}, "aggregations": {"models": {"buckets": [bucket]}}}


def models_answers(settings: Settings = SETTINGS, store: str = "") -> dict[str, Any]:
    """The models page's answers (the models view, the drift rows) for ``store`` ("" = every store)."""
    board = Dashboard(settings, client=Drifted(), clock=lambda: (T + MIN) / 1000)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    return {path: client.get(path, params={"store": store}).json() for path in ("/api/models", "/api/drift")}


def test_the_models_answers_give_the_window_end_and_drift_hours_on_the_live_pages_clock() -> None:
    """The models page gave its window end and drift hours in UTC while the live page gave store times: the same rule
    now, the store chosen's clock or the chain's one zone (drift is measured over all stores, its hour is told on the
    page's clock), else none, for the viewer's own zone."""
    nyc = models_answers(store="S-NYC")
    assert nyc["/api/models"]["window"]["local_end"] == "2027-01-15 03:01:00 EST"
    assert [(m["hour_start"], m["local_hour"]) for m in nyc["/api/drift"]["models"]] == [(T, "2027-01-15 03:00:00 EST")]
    one_zone = models_answers(Settings(alerts={"timezone": "Asia/Kolkata"}))
    assert one_zone["/api/models"]["window"]["local_end"] == "2027-01-15 13:31:00 IST"
    assert one_zone["/api/drift"]["models"][0]["local_hour"] == "2027-01-15 13:30:00 IST"
    mixed = models_answers()
    assert "local_end" not in mixed["/api/models"]["window"] and "local_hour" not in mixed["/api/drift"]["models"][0]


def _models_page(models: dict[str, Any], drift: dict[str, Any]) -> dict[str, Any]:
    from tests.unit.test_dashboard_models_page import EVALUATION, LABELS, SCORES

    answers = {
        "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
        "/api/models": [[200, {**models, "distributions": SCORES, "evaluation": EVALUATION, "labels": LABELS}]],
        "/api/drift": [[200, drift]],
    }
    shown = run_page("models.js", answers, runs=0)
    return {"status": shown["status"]["textContent"], "drift": shown["nodes"]["#drift-table tbody"]["children"]}


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_models_page_shows_its_window_end_and_drift_hours_on_the_live_pages_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Australia/Adelaide")  # the viewer's browser: 18:30 at T
    nyc = models_answers(store="S-NYC")
    shown = _models_page(nyc["/api/models"], nyc["/api/drift"])
    assert "window ends 03:01:00 EST · " in shown["status"] and "UTC" not in shown["status"], shown
    assert "<td>2027-01-15 03:00 EST</td>" in shown["drift"][0], shown
    mixed = models_answers()  # a chain across zones, every store: the viewer's clock, named
    shown = _models_page(mixed["/api/models"], mixed["/api/drift"])
    assert "window ends 18:31:00 your time, Australia/Adelaide · " in shown["status"], shown
    assert "<td>2027-01-15 18:30</td>" in shown["drift"][0] and "08:00" not in shown["drift"][0], shown


class Recorded:
    """Answers every search empty and keeps the bodies it was sent, by index."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict[str, Any]] = {}

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        self.bodies[index] = body
        return {"hits": {"total": {"value": 0}, "hits": []}, "aggregations": {}}


def chart_bodies(settings: Settings, store: str, at_ms: int, viewer: str | None) -> dict[str, dict[str, Any]]:
    """The bodies of the live page's two chart queries (transactions, faces), 10 days ending at ``at_ms`` (6 h
    buckets), for ``store`` ("" = every store), the page's browser in ``viewer`` (None: the page sent no zone)."""
    recorded = Recorded()
    board = Dashboard(settings, client=recorded, clock=lambda: at_ms / 1000)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    params = {"store": store, "minutes": str(10 * 24 * 60), **({"viewer_zone": viewer} if viewer is not None else {})}
    for path in ("/api/overview", "/api/faces"):
        assert client.get(path, params=params).status_code == 200
    return recorded.bodies


def chart_zones(
    settings: Settings = SETTINGS, store: str = "", at_ms: int = T, viewer: str | None = None
) -> dict[str, str | None]:
    """The ``time_zone`` those two chart queries send OpenSearch (:func:`chart_bodies`), by index."""
    bodies = chart_bodies(settings, store, at_ms, viewer)
    histograms = {index: body["aggs"]["series"]["date_histogram"] for index, body in bodies.items()}
    assert {h["fixed_interval"] for h in histograms.values()} == {"21600s"}
    return {index.rsplit("-", 1)[-1]: h.get("time_zone") for index, h in histograms.items()}


MachineZone = Callable[..., None]


@pytest.fixture
def machine_zone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MachineZone]:
    """Sets this process's own zone (``TZ``) for a test, and the system's link naming its zone (``named``; None: a
    copied file, naming none), whatever this machine's are; puts them back after."""

    def use(zone: str, named: str | None = None) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        link = tmp_path / "localtime"
        link.unlink(missing_ok=True)
        if named is None:
            link.write_bytes(b"TZif")
        else:
            link.symlink_to(tmp_path / "share" / "zoneinfo" / named)
        monkeypatch.setattr(queries, "LOCALTIME", link)

    yield use
    monkeypatch.undo()
    time.tzset()


def test_the_chart_buckets_start_on_the_clock_the_charts_are_shown_on(machine_zone: MachineZone) -> None:
    """The charts' 3, 6 and 12 h buckets started on UTC's hours whatever clock the page showed them on: 19:00, 01:00,
    07:00 and 13:00 in New York, 05:30 and 11:30 in Kolkata. They now start on that clock, its midnight and every 6 h
    after (OpenSearch's ``time_zone``), by the live page's rule: the store chosen's zone or the chain's one zone; a
    chain across zones with no store chosen has no one clock, and keeps UTC's."""
    assert chart_zones(store="S-NYC") == {"transactions": "America/New_York", "face_observations": "America/New_York"}
    assert set(chart_zones(store="S-BER").values()) == {"Europe/Berlin"}  # a store in no zone of its own: the chain's
    assert set(chart_zones(Settings(alerts={"timezone": "Asia/Kolkata"})).values()) == {"Asia/Kolkata"}
    assert set(chart_zones().values()) == {None}
    machine_zone("America/New_York")  # no CG_ALERTS__TIMEZONE: the machine's zone, by its offset at the window's end
    assert set(chart_zones(Settings()).values()) == {"-05:00"}
    assert set(chart_zones(Settings(), at_ms=T + 180 * 24 * 3_600_000).values()) == {"-04:00"}  # July: daylight time
    machine_zone("Asia/Kathmandu")
    assert set(chart_zones(Settings()).values()) == {"+05:45"}


def test_a_chain_across_zones_starts_its_chart_buckets_on_the_viewers_zone() -> None:
    """A chain across zones with no store chosen is shown in the viewer's browser zone, but its 6 h buckets started
    on UTC's hours: 04:30, 10:30, 16:30 and 22:30 in Adelaide. The page now sends its zone and the buckets start on
    it; the store's clock still wins where the charts have one (a store chosen, a chain in one zone)."""
    assert set(chart_zones(viewer="Australia/Adelaide").values()) == {"Australia/Adelaide"}
    assert set(chart_zones(viewer="Asia/Kathmandu").values()) == {"Asia/Kathmandu"}
    assert set(chart_zones(viewer="Asia/Calcutta").values()) == {"Asia/Calcutta"}  # an old name browsers still give
    assert set(chart_zones(store="S-NYC", viewer="Australia/Adelaide").values()) == {"America/New_York"}
    one_zone = Settings(alerts={"timezone": "Asia/Kolkata"})
    assert set(chart_zones(one_zone, viewer="Australia/Adelaide").values()) == {"Asia/Kolkata"}
    assert set(chart_zones().values()) == {None}  # a page that sent no zone: UTC's hours, as before


NOT_ZONES = [
    "",
    "Etc/Unknown",  # Chrome's where the system's zone is not known
    "Mars/Olympus_Mons",
    "europe/berlin",  # zoneinfo may find it on a case-blind disk; OpenSearch does not
    "Europe/Berlin ",
    "Europe/Berlin\n",
    "Europe/Berlin\x00",
    'Europe/Berlin", "script": {"source": "x"}, "x": "',
    "../../../../etc/passwd",
    "/usr/share/zoneinfo/Europe/Berlin",
    "posix/Europe/Berlin",
    "localtime",  # the machine's own zone, by a file of the zoneinfo folder
    "Factory",
    "+05:30",
    "Europe/" + "x" * 200,
    "Ευρώπη/Αθήνα",
]


def test_a_viewer_zone_is_taken_only_as_an_iana_zone_name_and_anything_else_changes_nothing() -> None:
    """The zone is a request parameter: only a name this machine lists reaches the query, as written, and nothing
    else of it; anything else (an unknown zone, a path, a quoted fragment, control characters, an endless name)
    leaves the charts as they were (UTC's hours), answered, never refused: a 400 would stop the page refreshing."""
    assert viewer_zone("Australia/Adelaide") == "Australia/Adelaide"
    assert viewer_zone("America/Argentina/ComodRivadavia") == "America/Argentina/ComodRivadavia"
    assert viewer_zone("Etc/GMT+5") == "Etc/GMT+5" and viewer_zone("UTC") == "UTC"
    for text in NOT_ZONES:
        assert viewer_zone(text) is None, text
        bodies = chart_bodies(SETTINGS, "", T, text)
        assert {body["aggs"]["series"]["date_histogram"].get("time_zone") for body in bodies.values()} == {None}
        assert all(text not in json.dumps(body) for body in bodies.values() if text), text
    assert viewer_zone(None) is None and viewer_zone(["Europe/Berlin"]) is None


@pytest.mark.skipif(NODE is None, reason="Node.js not installed")
def test_the_live_page_sends_its_browser_zone_with_its_reads_but_not_in_its_links(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page did not say its zone, so the server could only start the buckets on UTC's hours."""
    monkeypatch.setenv("TZ", "Australia/Adelaide")  # the viewer's browser
    answers = {
        "/api/config": [[200, {"refresh_ms": 3000, "window_minutes": 60}]],
        "/api/overview": [[200, OVERVIEW]],
        "/api/alerts": [[200, {"total": 0, "alerts": []}]],
        "/api/faces": [[200, FACES]],
    }
    shown = run_page("app.js", answers, search="?store=S-NYC", runs=0)
    reads = {r["url"].split("?")[0]: r["url"].split("?")[1] for r in shown["requests"] if "/api/config" not in r["url"]}
    assert set(reads) == {"/api/overview", "/api/alerts", "/api/faces"}, shown["requests"]
    assert all(q.endswith("&store=S-NYC&viewer_zone=Australia%2FAdelaide") for q in reads.values()), reads
    links = run_page("common.js", scenario='return String(pageQuery({ minutes: 60, store: "", anchor: false }));')
    assert links == "minutes=60&anchor=now"


MARCH = 1_805_544_000_000  # 2027-03-20 12:00 UTC: a 10-day window ending then holds New York's change to EDT (03-14)
YEAR_START, YEAR_END = 1_799_928_000_000, 1_831_550_400_000  # 2027-01-14 and 2028-01-15 12:00 UTC: winter both


def test_the_machines_zone_is_named_where_the_system_names_it_so_a_window_across_dst_aligns(
    machine_zone: MachineZone,
) -> None:
    """Without ``CG_ALERTS__TIMEZONE`` the buckets took the machine's UTC offset at the window's end: in a window
    across a DST change those before it started an hour off the machine's hours (01, 07, 13 and 19 EST for a window
    ending in EDT). The zone is now named where the system's link names it, so they start on its hours on both sides;
    only where that name is the clock this process keeps all through the window, else the offset as before."""
    machine_zone("America/New_York", named="America/New_York")
    assert set(chart_zones(Settings(), at_ms=MARCH).values()) == {"America/New_York"}  # before: -04:00
    assert set(chart_zones(Settings()).values()) == {"America/New_York"}
    assert set(chart_zones(store="S-NYC").values()) == {"America/New_York"}  # a store's zone still wins
    machine_zone("America/New_York", named="Etc/UTC")  # TZ sets another zone than the link's
    assert set(chart_zones(Settings(), at_ms=MARCH).values()) == {"-04:00"}
    machine_zone("America/New_York")  # the link is a copied file: no name
    assert set(chart_zones(Settings(), at_ms=MARCH).values()) == {"-04:00"}
    machine_zone("America/Phoenix", named="America/Denver")  # the same offset in winter, not in summer
    assert queries.machine_zone(T - 10 * 24 * 3_600_000, T) == "America/Denver"  # no difference in that window
    assert not keeps_local_offsets("America/Denver", YEAR_START, YEAR_END)  # both ends in winter: the summer differs
    assert queries.machine_zone(YEAR_START, YEAR_END) == "-07:00"
    assert queries.machine_zone(MARCH - 10 * 24 * 3_600_000, MARCH) == "-07:00"
    assert queries.machine_zone(-(10**20), 10**20) == "+00:00"  # no date holds the window: UTC's, as before


def test_the_systems_link_names_a_zone_only_past_its_zoneinfo_folder(tmp_path: Path) -> None:
    def link(name: str, target: Path) -> Path:
        (path := tmp_path / name).symlink_to(target)
        return path

    release = tmp_path / "tz" / "2027a.1.0" / "zoneinfo"  # a system keeping each tzdata release in a folder of its own
    assert localtime_name(link("versioned", release / "Europe/Berlin")) == "Europe/Berlin"
    assert localtime_name(link("chained", link("hop", tmp_path / "zoneinfo" / "Asia/Kolkata"))) == "Asia/Kolkata"
    assert localtime_name(link("posix", tmp_path / "zoneinfo" / "posix/Europe/Berlin")) is None
    assert localtime_name(link("unknown", tmp_path / "zoneinfo" / "Mars/Olympus_Mons")) is None
    assert localtime_name(link("elsewhere", tmp_path / "Europe/Berlin")) is None
    assert localtime_name(tmp_path / "missing") is None
    (copied := tmp_path / "copied").write_bytes(b"TZif")
    assert localtime_name(copied) is None


JVM_ZONE = "America/Ciudad_Juarez"
"""A zone this machine lists (tzdata 2022g) but a JVM whose tzdata is older does not."""


def unknown_zone_answer(zone: str, at: int = 412) -> bytes:
    """The 400 OpenSearch 2.x answers a search whose ``date_histogram`` names a ``time_zone`` its JVM has no rules for.
    Shape taken from its code, not a capture: the aggregation's ObjectParser reads ``time_zone`` with
    ``ZoneId.of(text)``, which throws ``java.time.zone.ZoneRulesException("Unknown time-zone ID: <zone>")``; the parser
    wraps any field's failure as ``XContentParseException("[line:col] [date_histogram] failed to parse field
    [time_zone]", cause)``, an ``IllegalArgumentException`` (so the REST layer's status is 400, while the body is
    parsed, before any shard), and the REST error body gives it as ``x_content_parse_exception`` with the zone's
    exception as ``caused_by`` (``zone_rules_exception``), the root cause being the outer exception itself."""
    reason = f"[1:{at}] [date_histogram] failed to parse field [time_zone]"
    outer = {"type": "x_content_parse_exception", "reason": reason}
    error = {
        "root_cause": [outer],
        **outer,
        "caused_by": {"type": "zone_rules_exception", "reason": f"Unknown time-zone ID: {zone}"},
    }
    return json.dumps({"error": error, "status": 400}).encode()


class OlderJvm(Recorded):
    """An OpenSearch whose JVM does not know ``unknown``: a query naming it as a ``time_zone`` is refused, raised as
    opensearch-py raises that answer (its own ``Connection._raise_error`` over the body); every other is answered
    empty and kept. ``refusal``: the body of that refusal."""

    def __init__(self, unknown: str = JVM_ZONE, refusal: bytes | None = None) -> None:
        super().__init__()
        self.unknown = unknown
        self.refusal = refusal or unknown_zone_answer(unknown)
        self.zones: list[str | None] = []

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        zone = body["aggs"]["series"]["date_histogram"].get("time_zone") if "series" in body.get("aggs", {}) else None
        self.zones.append(zone)
        if zone == self.unknown:
            Connection()._raise_error(400, self.refusal, "application/json")
        return super().search(index, body, params)


def older_jvm_reads(
    jvm: OlderJvm, settings: Settings, params: dict[str, str], times: int = 1
) -> list[tuple[int, dict[str, Any]]]:
    """The live page's two chart reads, ``times`` over, at ``T`` (6 h buckets, 10 days), from an app over ``jvm``."""
    board = Dashboard(settings, client=jvm, clock=lambda: T / 1000)  # type: ignore[arg-type]
    client = TestClient(create_app(settings, board, host="127.0.0.1"), base_url="http://127.0.0.1:8050")
    params = {"minutes": str(10 * 24 * 60), **params}
    out = []
    for _ in range(times):
        for path in ("/api/overview", "/api/faces"):
            got = client.get(path, params=params)
            out.append((got.status_code, got.json()))
    return out


def test_a_zone_opensearch_does_not_know_gives_charts_on_its_offset_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Python's zone list and OpenSearch's (its JVM's tzdata) are updated apart: a zone this machine knows but
    OpenSearch does not made every chart read a 400, which the page showed as "OpenSearch unavailable" and retried
    for ever, no charts at all for that viewer or store. The read is now asked again with the zone's UTC offset at
    the window's end (-07:00 in January in Ciudad Juarez), and from then on for that name, with one WARNING per
    name, whether the zone came from the viewer's browser or from CG_ALERTS__TIMEZONE."""
    assert viewer_zone(JVM_ZONE) == JVM_ZONE
    jvm = OlderJvm()
    with caplog.at_level(logging.WARNING, logger="sinks.dashboard.app"):
        reads = older_jvm_reads(jvm, SETTINGS, {"viewer_zone": JVM_ZONE}, times=3)
    assert [status for status, _ in reads] == [200] * 6
    assert all("series" in answer and "error" not in answer for _, answer in reads)  # the charts are answered
    assert jvm.zones == [JVM_ZONE] + ["-07:00"] * 6  # refused once, then known: no 400 at each refresh
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and JVM_ZONE in r.getMessage()]
    assert len(warnings) == 1 and "OpenSearch unavailable" not in caplog.text
    assert queries.zone_offset(JVM_ZONE, T + 180 * 24 * 3_600_000) == "-06:00"  # in July: its daylight time

    chain = Settings(alerts={"timezone": JVM_ZONE})  # the chain's own zone, which this machine validated at start
    jvm = OlderJvm()
    assert [status for status, _ in older_jvm_reads(jvm, chain, {"store": "S-1"})] == [200, 200]
    assert jvm.zones == [JVM_ZONE, "-07:00", "-07:00"]


def test_only_opensearchs_refusal_of_that_very_zone_is_asked_again() -> None:
    """Any other 400 (another field it cannot parse, another zone's refusal) is still the 503 it was, asked once: a
    query OpenSearch refuses for another reason is not hidden by a second try that drops the zone."""
    other_field = json.loads(unknown_zone_answer(JVM_ZONE))
    other_field["error"]["caused_by"] = {"type": "illegal_argument_exception", "reason": "[fixed_interval] bad"}
    refusals = [
        json.dumps(other_field).encode(),
        unknown_zone_answer("America/Ciudad"),  # a refusal naming another zone than the one asked
        json.dumps({"error": {"type": "x_content_parse_exception", "reason": "Unknown time-zone ID: x"}}).encode(),
        b"Unknown time-zone ID: America/Ciudad_Juarez",  # not OpenSearch's JSON
    ]
    for refusal in refusals:
        jvm = OlderJvm(refusal=refusal)
        reads = older_jvm_reads(jvm, SETTINGS, {"viewer_zone": JVM_ZONE})
        assert [status for status, _ in reads] == [503, 503], refusal
        assert jvm.zones == [JVM_ZONE, JVM_ZONE], refusal
