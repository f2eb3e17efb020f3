"""The live dashboard's query bodies and answer shaping, without a cluster."""

from __future__ import annotations

import io

from PIL import Image

from infra.settings import AlertSettings
from sinks.dashboard.app import thumbnail
from sinks.dashboard.queries import (
    STORE_PICKER_SIZE,
    STORES_SHOWN,
    Window,
    alerts_query,
    faces_query,
    overview_query,
    shape_alerts,
    shape_faces,
    shape_overview,
)

HOUR_MS = 3_600_000


def test_bucket_width_keeps_charts_at_about_sixty_bars_whatever_the_window() -> None:
    assert Window(0, 15 * 60_000).interval_s == 30
    assert Window(0, HOUR_MS).interval_s == 60
    assert Window(0, 24 * HOUR_MS).interval_s == 1800
    assert Window(0, 30 * 24 * HOUR_MS).interval_s == 43200
    for minutes in (1, 15, 60, 360, 1440, 10080, 43200):
        window = Window(0, minutes * 60_000)
        assert window.end_ms / 1000 / window.interval_s <= 60


def test_store_focus_filters_every_query_on_the_store() -> None:
    window = Window(1_000, 2_000, store="S7")
    for body in (overview_query(window), alerts_query(window, 5)):
        filters = body["query"]["bool"]["filter"]
        assert {"term": {"store_id": "S7"}} in filters
        assert filters[0]["range"]["event_time"]["gte"] == 1_000
        assert filters[0]["range"]["event_time"]["lt"] == 2_000
    assert all("store_id" not in str(f) for f in overview_query(Window(1_000, 2_000))["query"]["bool"]["filter"])


def test_time_series_covers_the_whole_window_including_empty_buckets() -> None:
    histogram = overview_query(Window(HOUR_MS + 30_000, 2 * HOUR_MS))["aggs"]["series"]["date_histogram"]
    assert histogram["min_doc_count"] == 0
    assert histogram["fixed_interval"] == "60s"
    assert histogram["extended_bounds"] == {"min": HOUR_MS + 30_000, "max": 2 * HOUR_MS - 1}  # OpenSearch rounds them
    assert "time_zone" not in histogram  # no zone: UTC's hours


def test_chart_buckets_start_on_the_windows_zone_not_on_utcs() -> None:
    """A 6 h bucket started at 19:00 in New York (UTC's 00:00) and 05:30 in Kolkata: OpenSearch now starts them on the
    zone's own clock (``time_zone``: 00, 06, 12, 18 there), and rounds the window's start into its bucket by the same
    rule (a UTC rounding here could put the first bucket, empty, a whole interval before the window)."""
    start = 11 * HOUR_MS + 30 * 60_000  # 06:30 in New York: its bucket starts at 06:00 there, 11:00 UTC
    for zone in ("America/New_York", "Asia/Kolkata"):
        window = Window(start, start + 10 * 24 * HOUR_MS, store="S1", zone=zone)
        for body in (overview_query(window), faces_query(window)):
            histogram = body["aggs"]["series"]["date_histogram"]
            assert histogram["time_zone"] == zone and histogram["fixed_interval"] == "21600s"
            assert histogram["extended_bounds"]["min"] == start


def outcome_buckets(**counts: int) -> dict:
    return {"buckets": [{"key": k, "doc_count": v} for k, v in counts.items()]}


def money(**amounts: float) -> dict:
    """A money aggregation's answer: the amounts summed per currency."""
    return {"currencies": {"buckets": [{"key": c, "doc_count": 1, "amount": {"value": v}} for c, v in amounts.items()]}}


def test_money_is_summed_per_currency_never_across_currencies() -> None:
    body = overview_query(Window(0, HOUR_MS))["aggs"]
    for agg in (body["sales"], body["prevented"], body["series"]["aggs"]["sales"], body["stores"]["aggs"]["prevented"]):
        assert "sum" not in agg["aggs"].get("amount", {}), "an amount summed over every currency"
        per_currency = agg["aggs"]["currencies"]
        assert per_currency["terms"]["field"] == "currency"
        assert per_currency["aggs"]["amount"] == {"sum": {"field": "amount"}}
    answer = {
        "hits": {"total": {"value": 3}},
        "aggregations": {
            "currencies": outcome_buckets(USD=2, EUR=1),
            "sales": money(USD=100.0, EUR=100.0),
            "prevented": money(EUR=40.0),
        },
    }
    page = shape_overview(answer, Window(0, HOUR_MS))
    assert page["currencies"] == ["USD", "EUR"]  # the most transactions first
    assert page["totals"]["revenue"] == {"USD": 100.0, "EUR": 100.0}  # not 200
    assert page["totals"]["value_prevented"] == {"USD": 0.0, "EUR": 40.0}


def test_money_keeps_the_smallest_unit_of_every_currency_and_drops_float_noise() -> None:
    answer = {
        "hits": {"total": {"value": 3}},
        "aggregations": {
            "currencies": outcome_buckets(KWD=2, USD=1),
            "sales": money(KWD=12.345, USD=0.1 + 0.2),  # a fils is a thousandth of a dinar
            "prevented": money(KWD=0.005),
        },
    }
    totals = shape_overview(answer, Window(0, HOUR_MS))["totals"]
    assert totals["revenue"] == {"KWD": 12.345, "USD": 0.3}
    assert totals["value_prevented"] == {"KWD": 0.005, "USD": 0.0}


def test_overview_answer_becomes_totals_rates_series_and_store_rows() -> None:
    window = Window(0, HOUR_MS)
    answer = {
        "hits": {"total": {"value": 100, "relation": "eq"}},
        "aggregations": {
            "outcomes": outcome_buckets(APPROVE=90, BLOCK=10),
            "currencies": outcome_buckets(USD=95, EUR=5),
            "sales": money(USD=1234.567, EUR=20.0),
            "prevented": money(USD=500.0),
            "recent": {"doc_count": 20, "outcomes": outcome_buckets(APPROVE=15, REVIEW=3, BLOCK=2)},
            "latency_ttdf_ms": {"values": {"50.0": 40.0, "95.0": 90.0, "99.0": 150.04}},
            "latency_proc_time_ms": {"values": {"50.0": None, "95.0": None, "99.0": None}},
            "latency_model_time_ms": {"values": {"50.0": 3.0, "95.0": 5.0, "99.0": 6.0}},
            "series": {
                "buckets": [
                    {
                        "key": 0,
                        "doc_count": 0,
                        "outcomes": outcome_buckets(),
                        "sales": money(),
                        "prevented": money(),
                        "ttdf": {"values": {"50.0": None}},
                    },
                    {
                        "key": 60_000,
                        "doc_count": 3,
                        "outcomes": outcome_buckets(APPROVE=2, BLOCK=1),
                        "sales": money(USD=20.0),
                        "prevented": money(EUR=9.5),
                        "ttdf": {"values": {"50.0": 30.0, "95.0": 60.0, "99.0": 61.0}},
                    },
                ]
            },
            "stores": {
                "buckets": [
                    {
                        "key": "S1",
                        "doc_count": 3,
                        "outcomes": outcome_buckets(APPROVE=3),
                        "sales": money(USD=30.0),
                        "prevented": money(),
                        "ttdf": {"values": {"99.0": 70.0}},
                    }
                ]
            },
            "stores_all": {"doc_count": 100, "ids": outcome_buckets(S2=50, S1=50)},
        },
    }
    page = shape_overview(answer, window)
    assert page["totals"] == {
        "transactions": 100,
        "revenue": {"USD": 1234.567, "EUR": 20.0},
        "value_prevented": {"USD": 500.0, "EUR": 0.0},
        "approve": 90,
        "review": 0,
        "block": 10,
    }
    assert page["rates"] == {"per_minute": 4.0, "block_rate": 0.1, "review_rate": 0.15, "minutes": 5.0}
    assert page["outcomes"] == {"APPROVE": 90, "REVIEW": 0, "BLOCK": 10}
    assert page["latency"]["ttdf_ms"] == {"p50": 40.0, "p95": 90.0, "p99": 150.0}
    assert page["latency"]["proc_time_ms"] == {"p50": None, "p95": None, "p99": None}
    assert page["series"][0] == {
        "t": 0,
        "count": 0,
        "APPROVE": 0,
        "REVIEW": 0,
        "BLOCK": 0,
        "revenue": {"USD": 0.0, "EUR": 0.0},
        "prevented": {"USD": 0.0, "EUR": 0.0},
        "p50": None,
        "p95": None,
        "p99": None,
    }
    assert page["series"][1]["BLOCK"] == 1 and page["series"][1]["prevented"] == {"USD": 0.0, "EUR": 9.5}
    assert page["stores"] == [
        {
            "store_id": "S1",
            "count": 3,
            "APPROVE": 3,
            "REVIEW": 0,
            "BLOCK": 0,
            "revenue": {"USD": 30.0, "EUR": 0.0},
            "prevented": {"USD": 0.0, "EUR": 0.0},
            "ttdf_p99": 70.0,
        }
    ]
    assert page["all_stores"] == ["S1", "S2"]


def test_stores_past_the_rows_shown_are_counted_not_silently_dropped() -> None:
    body = overview_query(Window(0, HOUR_MS))["aggs"]
    assert body["stores"]["terms"]["size"] == STORES_SHOWN
    assert body["stores"]["terms"]["order"][0] == {"_count": "desc"}  # the busiest stores, not the first by name
    assert body["stores_all"]["aggs"]["ids"]["terms"]["size"] == STORE_PICKER_SIZE
    row = {"outcomes": outcome_buckets(APPROVE=5), "sales": money(), "prevented": money()}
    answer = {
        "hits": {"total": {"value": 250}},
        "aggregations": {
            "store_count": {"value": 104},
            "stores": {
                "sum_other_doc_count": 40,
                "buckets": [{"key": f"store-{n:03d}", "doc_count": 5, **row} for n in range(100, 0, -1)],
            },
            "stores_all": {
                "doc_count": 9000,
                "ids": {"sum_other_doc_count": 7, "buckets": [{"key": "store-001", "doc_count": 9}]},
                "count": {"value": 1300},
            },
        },
    }
    page = shape_overview(answer, Window(0, HOUR_MS))
    assert [s["store_id"] for s in page["stores"]][:2] == ["store-001", "store-002"]  # rows by store id
    assert page["stores_more"] == {"stores": 4, "transactions": 40}
    assert page["all_stores"] == ["store-001"] and page["all_stores_more"] == 1299


def test_empty_indices_give_zeros_not_errors() -> None:
    page = shape_overview({"hits": {"total": {"value": 0}}, "aggregations": {}}, Window(0, HOUR_MS))
    assert page["totals"]["transactions"] == 0
    assert page["rates"]["block_rate"] == 0.0
    assert page["series"] == [] and page["stores"] == []
    assert page["stores_more"] == {"stores": 0, "transactions": 0} and page["all_stores_more"] == 0
    assert shape_faces({})["statuses"] == {"MATCHED": 0, "NO_MATCH": 0, "NO_FACE": 0, "UNAVAILABLE": 0}


def test_alerts_carry_a_thumbnail_url_instead_of_the_image_ref() -> None:
    answer = {
        "hits": {
            "total": {"value": 2},
            "hits": [
                {"_source": {"alert_id": "a-1", "kind": "WATCHLIST_MATCH", "snapshot_ref": "file:checkout/tx-1"}},
                {"_source": {"alert_id": "a-2", "kind": "BLOCKED_TRANSACTION", "snapshot_ref": None}},
            ],
        },
        "aggregations": {"kinds": outcome_buckets(WATCHLIST_MATCH=1, BLOCKED_TRANSACTION=1)},
    }
    page = shape_alerts(answer, AlertSettings())
    assert [(a["alert_id"], a["thumbnail"]) for a in page["alerts"]] == [
        ("a-1", "/api/alerts/a-1/snapshot"),
        ("a-2", None),
    ]
    assert all("snapshot_ref" not in a for a in page["alerts"])
    assert page["total"] == 2


def test_thumbnail_is_a_small_jpeg() -> None:
    out = io.BytesIO()
    Image.new("RGB", (1920, 1080), (10, 20, 30)).save(out, format="PNG")
    small = Image.open(io.BytesIO(thumbnail(out.getvalue())))
    assert small.format == "JPEG"
    assert small.size == (240, 135)
