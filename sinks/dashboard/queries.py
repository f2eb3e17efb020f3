"""What the live dashboard asks OpenSearch, and how the answers become the page's JSON.

Pure functions (no client): the request bodies are built from a :class:`Window` and the answers are
reshaped into small, chart-ready structures, so both are unit-tested without a cluster. Everything is
an aggregation over the sink's read aliases; only the latest alerts are fetched as documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OUTCOMES = ("APPROVE", "REVIEW", "BLOCK")
FACE_STATUSES = ("MATCHED", "NO_MATCH", "NO_FACE", "UNAVAILABLE")
LATENCY_FIELDS = ("ttdf_ms", "proc_time_ms", "model_time_ms")
PERCENTS = (50.0, 95.0, 99.0)
RATE_WINDOW_MS = 5 * 60 * 1000
"""Current rates are measured over the last five minutes of the window."""
INTERVALS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
TARGET_BUCKETS = 60
ALERT_FIELDS = (
    "alert_id",
    "kind",
    "severity",
    "event_time",
    "store_id",
    "lane_id",
    "transaction_id",
    "amount",
    "currency",
    "outcome",
    "risk_score",
    "reasons",
    "category",
    "similarity",
    "snapshot_ref",
    "summary",
)


@dataclass(frozen=True)
class Window:
    """The event-time range ``[start_ms, end_ms)`` the page shows, optionally one store only."""

    start_ms: int
    end_ms: int
    store: str | None = None

    @property
    def interval_s(self) -> int:
        """The smallest bucket width giving at most ~60 buckets, so charts stay legible at any range."""
        span_s = max(1, (self.end_ms - self.start_ms) // 1000)
        return next((i for i in INTERVALS_S if span_s / i <= TARGET_BUCKETS), INTERVALS_S[-1])

    def filters(self, start_ms: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {
                "range": {
                    "event_time": {
                        "gte": self.start_ms if start_ms is None else start_ms,
                        "lt": self.end_ms,
                        "format": "epoch_millis",
                    }
                }
            }
        ]
        if self.store:
            out.append({"term": {"store_id": self.store}})
        return out

    def histogram(self, **sub_aggs: Any) -> dict[str, Any]:
        """A date histogram over the whole window, empty buckets included, so the x axis is continuous."""
        interval_ms = self.interval_s * 1000
        first = self.start_ms - self.start_ms % interval_ms
        return {
            "date_histogram": {
                "field": "event_time",
                "fixed_interval": f"{self.interval_s}s",
                "min_doc_count": 0,
                "extended_bounds": {"min": first, "max": self.end_ms - 1},
            },
            **({"aggs": sub_aggs} if sub_aggs else {}),
        }


def _percentiles(field: str) -> dict[str, Any]:
    return {"percentiles": {"field": field, "percents": list(PERCENTS)}}


def _outcomes() -> dict[str, Any]:
    return {"terms": {"field": "outcome", "size": len(OUTCOMES)}}


def _sales() -> dict[str, Any]:
    """Revenue = sales that were not blocked (as the saved "Revenue" panel)."""
    return {
        "filter": {"bool": {"filter": [{"term": {"kind": "SALE"}}], "must_not": [{"term": {"outcome": "BLOCK"}}]}},
        "aggs": {"amount": {"sum": {"field": "amount"}}},
    }


def _prevented() -> dict[str, Any]:
    """Value prevented = amounts of blocked transactions (seed 001)."""
    return {"filter": {"term": {"outcome": "BLOCK"}}, "aggs": {"amount": {"sum": {"field": "amount"}}}}


def latest_event_query(store: str | None = None) -> dict[str, Any]:
    """The newest event time (to anchor the window at the data, e.g. while a replay of history runs)."""
    query: dict[str, Any] = {"term": {"store_id": store}} if store else {"match_all": {}}
    return {"size": 0, "query": query, "aggs": {"latest": {"max": {"field": "event_time"}}}}


def overview_query(window: Window) -> dict[str, Any]:
    return {
        "size": 0,
        "track_total_hits": True,
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {
            "outcomes": _outcomes(),
            "sales": _sales(),
            "prevented": _prevented(),
            "recent": {
                "filter": {"range": {"event_time": {"gte": window.end_ms - RATE_WINDOW_MS}}},
                "aggs": {"outcomes": _outcomes()},
            },
            **{f"latency_{field}": _percentiles(field) for field in LATENCY_FIELDS},
            "series": window.histogram(
                outcomes=_outcomes(), sales=_sales(), prevented=_prevented(), ttdf=_percentiles("ttdf_ms")
            ),
            "stores": {
                "terms": {"field": "store_id", "size": 100, "order": {"_key": "asc"}},
                "aggs": {
                    "outcomes": _outcomes(),
                    "sales": _sales(),
                    "prevented": _prevented(),
                    "ttdf": _percentiles("ttdf_ms"),
                },
            },
            "stores_all": {"global": {}, "aggs": {"ids": {"terms": {"field": "store_id", "size": 100}}}},
        },
    }


def alerts_query(window: Window, size: int) -> dict[str, Any]:
    return {
        "size": size,
        "track_total_hits": True,
        "sort": [{"event_time": {"order": "desc"}}, {"alert_id": {"order": "desc"}}],
        "_source": list(ALERT_FIELDS),
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {"kinds": {"terms": {"field": "kind", "size": 10}}},
    }


TRANSACTION_FIELDS = (
    "transaction_id",
    "event_time",
    "store_id",
    "lane_id",
    "cashier_id",
    "kind",
    "original_transaction_id",
    "amount",
    "currency",
    "item_count",
    "product_category",
    "outcome",
    "risk_score",
    "reasons",
    "indicators",
    "model_score",
    "model_version",
    "rules_version",
    "face_status",
    "face_subject_id",
    "face_category",
    "face_similarity",
    "ttdf_ms",
)
"""What an alert's page shows of its transaction: the decision and its grounds, no card or customer keys."""


def alert_by_id_query(alert_id: str, fields: tuple[str, ...] = ("snapshot_ref",)) -> dict[str, Any]:
    return {"size": 1, "_source": list(fields), "query": {"term": {"alert_id": alert_id}}}


def transaction_by_id_query(transaction_id: str) -> dict[str, Any]:
    return {"size": 1, "_source": list(TRANSACTION_FIELDS), "query": {"term": {"transaction_id": transaction_id}}}


def faces_query(window: Window) -> dict[str, Any]:
    return {
        "size": 0,
        "track_total_hits": True,
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {
            "statuses": {"terms": {"field": "status", "size": len(FACE_STATUSES)}},
            "categories": {
                "filter": {"term": {"status": "MATCHED"}},
                "aggs": {"by": {"terms": {"field": "category", "size": 5}}},
            },
            "series": window.histogram(statuses={"terms": {"field": "status", "size": len(FACE_STATUSES)}}),
        },
    }


# ----------------------------------------------------------------------------- answers -> page JSON


def _buckets(agg: dict[str, Any] | None) -> dict[str, int]:
    return {str(b["key"]): int(b["doc_count"]) for b in (agg or {}).get("buckets", [])}


def _counts(agg: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, int]:
    found = _buckets(agg)
    return {key: found.get(key, 0) for key in keys} | {k: v for k, v in found.items() if k not in keys}


def _sum(agg: dict[str, Any] | None) -> float:
    return round(float(((agg or {}).get("amount") or {}).get("value") or 0.0), 2)


def _pcts(agg: dict[str, Any] | None) -> dict[str, float | None]:
    values = (agg or {}).get("values") or {}
    out: dict[str, float | None] = {}
    for pct in PERCENTS:
        value = values.get(str(pct), values.get(f"{pct:.1f}"))
        out[f"p{int(pct)}"] = None if value is None else round(float(value), 1)
    return out


def _total(answer: dict[str, Any]) -> int:
    total = answer.get("hits", {}).get("total", 0)
    return int(total["value"] if isinstance(total, dict) else total)


def shape_overview(answer: dict[str, Any], window: Window) -> dict[str, Any]:
    aggs = answer.get("aggregations", {})
    outcomes = _counts(aggs.get("outcomes"), OUTCOMES)
    total = _total(answer)
    recent = _counts((aggs.get("recent") or {}).get("outcomes"), OUTCOMES)
    recent_total = sum(recent.values())
    rate_minutes = min(RATE_WINDOW_MS, window.end_ms - window.start_ms) / 60_000
    return {
        "window": {
            "start": window.start_ms,
            "end": window.end_ms,
            "interval_s": window.interval_s,
            "store": window.store,
        },
        "totals": {
            "transactions": total,
            "revenue": _sum(aggs.get("sales")),
            "value_prevented": _sum(aggs.get("prevented")),
            **{outcome.lower(): outcomes[outcome] for outcome in OUTCOMES},
        },
        "rates": {
            "per_minute": round(recent_total / rate_minutes, 2) if rate_minutes > 0 else 0.0,
            "block_rate": round(recent["BLOCK"] / recent_total, 4) if recent_total else 0.0,
            "review_rate": round(recent["REVIEW"] / recent_total, 4) if recent_total else 0.0,
            "minutes": round(rate_minutes, 2),
        },
        "outcomes": outcomes,
        "latency": {field: _pcts(aggs.get(f"latency_{field}")) for field in LATENCY_FIELDS},
        "series": [
            {
                "t": int(b["key"]),
                "count": int(b["doc_count"]),
                **_counts(b.get("outcomes"), OUTCOMES),
                "revenue": _sum(b.get("sales")),
                "prevented": _sum(b.get("prevented")),
                **_pcts(b.get("ttdf")),
            }
            for b in (aggs.get("series") or {}).get("buckets", [])
        ],
        "stores": [
            {
                "store_id": str(b["key"]),
                "count": int(b["doc_count"]),
                **_counts(b.get("outcomes"), OUTCOMES),
                "revenue": _sum(b.get("sales")),
                "prevented": _sum(b.get("prevented")),
                "ttdf_p99": _pcts(b.get("ttdf"))["p99"],
            }
            for b in (aggs.get("stores") or {}).get("buckets", [])
        ],
        "all_stores": sorted(_buckets((aggs.get("stores_all") or {}).get("ids"))),
    }


SNAPSHOT_URL = "/api/alerts/{alert_id}/snapshot"


def public_alert(source: dict[str, Any]) -> dict[str, Any]:
    """An alert for the page: a thumbnail URL where it has a snapshot, never the image ref itself."""
    out = dict(source)
    ref = out.pop("snapshot_ref", None)
    out["thumbnail"] = SNAPSHOT_URL.format(alert_id=out["alert_id"]) if ref else None
    return out


def shape_alerts(answer: dict[str, Any]) -> dict[str, Any]:
    """Latest alerts, newest first."""
    rows = [public_alert(hit.get("_source", {})) for hit in answer.get("hits", {}).get("hits", [])]
    return {"total": _total(answer), "kinds": _buckets(answer.get("aggregations", {}).get("kinds")), "alerts": rows}


def shape_faces(answer: dict[str, Any]) -> dict[str, Any]:
    aggs = answer.get("aggregations", {})
    return {
        "total": _total(answer),
        "statuses": _counts(aggs.get("statuses"), FACE_STATUSES),
        "matches_by_category": _buckets((aggs.get("categories") or {}).get("by")),
        "series": [
            {"t": int(b["key"]), **_counts(b.get("statuses"), FACE_STATUSES)}
            for b in (aggs.get("series") or {}).get("buckets", [])
        ],
    }
