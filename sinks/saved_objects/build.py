"""Writes ``checkout-guard.ndjson``: OpenSearch Dashboards saved objects for the indices the sink fills.

The file is what analysts import (Stack Management -> Saved objects -> Import, or the
``/api/saved_objects/_import`` API); this module is how it is made, so panels are declared once,
compactly, instead of hand-editing JSON-in-JSON. Index-pattern field lists come from the sink's
index templates, so the dashboards never name a field the indices do not have (a unit test checks
the written file against the templates independently).

Run: ``python -m sinks.saved_objects.build [--index-prefix checkout-guard]`` (rewrites the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from schemas.indices import ROUTES, index_name, load_template

NDJSON = Path(__file__).resolve().parent / "checkout-guard.ndjson"
DASHBOARD_ID = "checkout-guard-overview"
OSD_VERSION = "2.19.0"
NUMERIC = {"long": "number", "integer": "number", "double": "number", "float": "number"}
INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"


def pattern_id(kind: str) -> str:
    return f"checkout-guard-{kind}"


def _field_list(kind: str, index_prefix: str) -> list[dict[str, Any]]:
    """The index pattern's cached field list, derived from the template mapping."""
    props = load_template(kind, index_prefix)["template"]["mappings"]["properties"]
    fields = [
        {
            "name": name,
            "type": "string",
            "esTypes": ["_id"],
            "searchable": True,
            "aggregatable": True,
            "readFromDocValues": False,
            "count": 0,
            "scripted": False,
        }
        for name in ("_id",)
    ]
    for name, spec in sorted(props.items()):
        es_type = spec["type"]
        if es_type == "object":
            continue
        indexed = spec.get("index", True)
        kind_ = {"keyword": "string", "text": "string", "date": "date", "boolean": "boolean"}.get(es_type) or NUMERIC[
            es_type
        ]
        fields.append(
            {
                "name": name,
                "type": kind_,
                "esTypes": [es_type],
                "searchable": indexed,
                "aggregatable": es_type != "text" and spec.get("doc_values", True),
                "readFromDocValues": es_type != "text",
                "count": 0,
                "scripted": False,
            }
        )
        for sub, sub_spec in spec.get("fields", {}).items():
            fields.append(
                {
                    "name": f"{name}.{sub}",
                    "type": "string",
                    "esTypes": [sub_spec["type"]],
                    "searchable": True,
                    "aggregatable": True,
                    "readFromDocValues": True,
                    "count": 0,
                    "scripted": False,
                    "subType": {"multi": {"parent": name}},
                }
            )
    return fields


def index_pattern(kind: str, index_prefix: str, time_field: str = "event_time") -> dict[str, Any]:
    return {
        "type": "index-pattern",
        "id": pattern_id(kind),
        "attributes": {
            "title": index_name(index_prefix, kind),
            "timeFieldName": time_field,
            "fields": json.dumps(_field_list(kind, index_prefix), separators=(",", ":")),
        },
        "references": [],
        "migrationVersion": {"index-pattern": "7.6.0"},
    }


# ----------------------------------------------------------------------------- aggregations


def count(agg_id: str = "1", label: str | None = None) -> dict[str, Any]:
    return {
        "id": agg_id,
        "enabled": True,
        "type": "count",
        "schema": "metric",
        "params": {"customLabel": label} if label else {},
    }


def metric(kind: str, field: str, label: str, agg_id: str = "1", **params: Any) -> dict[str, Any]:
    return {
        "id": agg_id,
        "enabled": True,
        "type": kind,
        "schema": "metric",
        "params": {"field": field, "customLabel": label, **params},
    }


def terms(
    field: str, schema: str, agg_id: str, size: int = 10, label: str | None = None, other: str | None = None
) -> dict[str, Any]:
    """Top ``size`` values of ``field``; ``other``: the label of one more bucket with everything past them,
    so a panel that cannot list every value says so instead of silently leaving them out."""
    return {
        "id": agg_id,
        "enabled": True,
        "type": "terms",
        "schema": schema,
        "params": {
            "field": field,
            "size": size,
            "order": "desc",
            "orderBy": "1",
            "otherBucket": other is not None,
            **({"otherBucketLabel": other} if other is not None else {}),
            "missingBucket": False,
            **({"customLabel": label} if label else {}),
        },
    }


CURRENCIES_SHOWN = 20
"""Currencies a money panel shows, one figure or line each (the largest amounts first)."""


MODEL_VERSIONS_SHOWN = 20
"""Model versions the drift panel draws, one line each: the champion, its challenger and the versions they
replaced within the time range (3 let a fourth vanish, e.g. in the hour of a promotion, or after a few); any past
this many share one "other versions" line, so none is left out without a word."""


def per_currency(agg_id: str = "2") -> dict[str, Any]:
    """Splits a money panel by ``currency``: amounts in different currencies are never added up into one
    unlabelled figure (a scored transaction has no amount in one reference currency)."""
    return terms("currency", "group", agg_id, size=CURRENCIES_SHOWN, label="currency")


def over_time(agg_id: str = "2", field: str = "event_time") -> dict[str, Any]:
    return {
        "id": agg_id,
        "enabled": True,
        "type": "date_histogram",
        "schema": "segment",
        "params": {
            "field": field,
            "useNormalizedOpenSearchInterval": True,
            "interval": "auto",
            "drop_partials": False,
            "min_doc_count": 1,
            "extended_bounds": {},
        },
    }


# ----------------------------------------------------------------------------- visualizations


def _xy_params(chart: str, mode: str = "normal", horizontal: bool = False) -> dict[str, Any]:
    return {
        "type": chart,
        "addTooltip": True,
        "addLegend": True,
        "legendPosition": "right",
        "times": [],
        "addTimeMarker": False,
        "labels": {"show": False},
        "grid": {"categoryLines": False},
        "categoryAxes": [
            {
                "id": "CategoryAxis-1",
                "type": "category",
                "position": "left" if horizontal else "bottom",
                "show": True,
                "style": {},
                "scale": {"type": "linear"},
                "labels": {"show": True, "filter": True, "truncate": 100},
                "title": {},
            }
        ],
        "valueAxes": [
            {
                "id": "ValueAxis-1",
                "name": "LeftAxis-1",
                "type": "value",
                "position": "bottom" if horizontal else "left",
                "show": True,
                "style": {},
                "scale": {"type": "linear", "mode": "normal"},
                "labels": {"show": True, "rotate": 0, "filter": False, "truncate": 100},
                "title": {},
            }
        ],
        "seriesParams": [
            {
                "show": True,
                "type": "line" if chart == "line" else "histogram",
                "mode": mode,
                "data": {"label": "Value", "id": "1"},
                "valueAxis": "ValueAxis-1",
                "drawLinesBetweenPoints": True,
                "lineWidth": 2,
                "showCircles": True,
            }
        ],
        "thresholdLine": {"show": False, "value": 10, "width": 1, "style": "full", "color": "#E7664C"},
    }


def _metric_params() -> dict[str, Any]:
    return {
        "addTooltip": True,
        "addLegend": False,
        "type": "metric",
        "metric": {
            "percentageMode": False,
            "useRanges": False,
            "colorSchema": "Green to Red",
            "metricColorMode": "None",
            "colorsRange": [{"from": 0, "to": 10000}],
            "labels": {"show": True},
            "invertColors": False,
            "style": {"bgFill": "#000", "bgColor": False, "labelColor": False, "subText": "", "fontSize": 48},
        },
    }


def visualization(
    vis_id: str,
    title: str,
    kind: str,
    vis_type: str,
    aggs: list[dict[str, Any]],
    description: str,
    query: str = "",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if params is None:
        params = {
            "metric": _metric_params,
            "pie": lambda: {
                "type": "pie",
                "addTooltip": True,
                "addLegend": True,
                "legendPosition": "right",
                "isDonut": True,
                "labels": {"show": True, "values": True, "last_level": True, "truncate": 100},
            },
            "line": lambda: _xy_params("line"),
            "histogram": lambda: _xy_params("histogram", mode="stacked"),
            "horizontal_bar": lambda: _xy_params("histogram", mode="stacked", horizontal=True),
        }[vis_type]()
    search_source = {"query": {"query": query, "language": "kuery"}, "filter": [], "indexRefName": INDEX_REF}
    return {
        "type": "visualization",
        "id": vis_id,
        "attributes": {
            "title": title,
            "description": description,
            "uiStateJSON": "{}",
            "version": 1,
            "visState": json.dumps({"title": title, "type": vis_type, "aggs": aggs, "params": params}),
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(search_source)},
        },
        "references": [{"name": INDEX_REF, "type": "index-pattern", "id": pattern_id(kind)}],
        "migrationVersion": {"visualization": "7.10.0"},
    }


def saved_search(search_id: str, title: str, kind: str, columns: list[str], description: str) -> dict[str, Any]:
    search_source = {
        "query": {"query": "", "language": "kuery"},
        "filter": [],
        "highlightAll": True,
        "version": True,
        "indexRefName": INDEX_REF,
    }
    return {
        "type": "search",
        "id": search_id,
        "attributes": {
            "title": title,
            "description": description,
            "hits": 0,
            "columns": columns,
            "sort": [["event_time", "desc"]],
            "version": 1,
            "kibanaSavedObjectMeta": {"searchSourceJSON": json.dumps(search_source)},
        },
        "references": [{"name": INDEX_REF, "type": "index-pattern", "id": pattern_id(kind)}],
        "migrationVersion": {"search": "7.9.3"},
    }


REVENUE_QUERY = "kind:SALE and not outcome:BLOCK"
"""The sales that took money: Revenue and Sales over time both sum these, so the chart adds up to the figure."""

PANELS: list[tuple[dict[str, Any], int, int]] = [
    # (saved object, width, height) on a 48-column grid, laid out left to right
    (
        visualization(
            "cg-transactions-count",
            "Transactions",
            "transactions",
            "metric",
            [count(label="Transactions")],
            "Scored transactions in the time range (seed 004: count).",
        ),
        12,
        8,
    ),
    (
        visualization(
            "cg-revenue",
            "Revenue",
            "transactions",
            "metric",
            [metric("sum", "amount", "Revenue"), per_currency()],
            "Sum of sale amounts that were not blocked, one figure per currency (seed 004: revenue).",
            query=REVENUE_QUERY,
        ),
        12,
        8,
    ),
    (
        visualization(
            "cg-value-prevented",
            "Value prevented",
            "transactions",
            "metric",
            [metric("sum", "amount", "Value prevented"), per_currency()],
            "Sum of the amounts of blocked transactions, one figure per currency (seed 001: fraud value prevented).",
            query="outcome:BLOCK",
        ),
        12,
        8,
    ),
    (
        visualization(
            "cg-latency-p99",
            "Decision latency p99 (ms)",
            "transactions",
            "metric",
            [metric("percentiles", "ttdf_ms", "ttdf p99 (ms)", percents=[99])],
            "99th percentile of event time -> decision (ttdf_ms).",
        ),
        12,
        8,
    ),
    (
        visualization(
            "cg-outcome-pie",
            "Outcomes",
            "transactions",
            "pie",
            [count(), terms("outcome", "segment", "2", size=3)],
            "Share of APPROVE / REVIEW / BLOCK decisions (seed 004: outcome pie).",
        ),
        16,
        14,
    ),
    (
        visualization(
            "cg-fraud-by-currency",
            "Fraud by currency",
            "transactions",
            "histogram",
            [count(), terms("currency", "segment", "2", size=15), terms("outcome", "group", "3", size=2)],
            "Blocked and review transactions per payment currency (seed 004).",
            query="outcome:BLOCK or outcome:REVIEW",
        ),
        16,
        14,
    ),
    (
        visualization(
            "cg-fraud-by-state",
            "Fraud by billing state",
            "transactions",
            "histogram",
            [count(), terms("billing_state", "segment", "2", size=20), terms("outcome", "group", "3", size=2)],
            "Blocked and review transactions per billing state (seed 004).",
            query="outcome:BLOCK or outcome:REVIEW",
        ),
        16,
        14,
    ),
    (
        visualization(
            "cg-sales-over-time",
            "Sales over time",
            "transactions",
            "line",
            [metric("sum", "amount", "Sales"), over_time(), per_currency(agg_id="3")],
            "Sum of the amounts of sales that were not blocked per interval, one line per currency: the Revenue"
            " figure over time (a blocked sale took no money; its amount is in Value prevented) (seed 004: sales"
            " over time).",
            query=REVENUE_QUERY,
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-detection-latency",
            "Detection latency",
            "transactions",
            "line",
            [
                metric("avg", "ttdf_ms", "event -> decision (ttdf)"),
                metric("avg", "proc_time_ms", "event -> model call (proc)", agg_id="3"),
                metric("avg", "model_time_ms", "model call", agg_id="4"),
                over_time(),
            ],
            "Average latencies per interval in ms (seed 004: proc_time, frauddetector_time, ttdf).",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-outcomes-per-store",
            "Outcomes per store",
            "transactions",
            "histogram",
            [
                count(),
                terms("store_id", "segment", "2", size=30, other="other stores"),
                terms("outcome", "group", "3", size=3),
            ],
            "Decisions of the 30 busiest stores, stacked by outcome; the rest together as 'other stores'.",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-top-reasons",
            "Top decision reasons",
            "transactions",
            "horizontal_bar",
            [count(), terms("reasons", "segment", "2", size=10)],
            "Indicators behind review and block decisions.",
            query="not outcome:APPROVE",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-face-matches-over-time",
            "Face matches over time",
            "face_observations",
            "histogram",
            [count(), over_time(), terms("category", "group", "3", size=2)],
            "Watch-list matches per interval (checkout and entrance cameras), by SUSPECT / VIP.",
            query="status:MATCHED",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-alerts-by-kind",
            "Alerts by kind",
            "alerts",
            "pie",
            [count(), terms("kind", "segment", "2", size=8)],
            "Blocked transactions, watch-list matches, suspects entering, VIPs arriving, suspects and VIPs seen in a"
            " lane's live view, fraud model drift.",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-champion-challenger",
            "Champion and challenger scores",
            "transactions",
            "line",
            [
                metric("avg", "model_score", "champion (decides)"),
                metric("avg", "challenger_score", "challenger (recorded)", agg_id="3"),
                over_time(),
            ],
            "Average 0-1000 score of the champion model, which decides, and of the challenger, which is only "
            "recorded, per interval. The live dashboard's Models page compares their distributions and ROC-AUC.",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-model-drift",
            "Model drift (score PSI)",
            "model_drift",
            "line",
            [
                metric("max", "score_psi", "score PSI"),
                metric("max", "worst_psi", "worst feature PSI", agg_id="4"),
                over_time(field="hour_start"),
                terms("model_version", "group", "3", size=MODEL_VERSIONS_SHOWN, other="other versions"),
            ],
            "Population stability of the model's score and its worst feature against the training data, per "
            "hour and model version: < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant.",
        ),
        24,
        14,
    ),
    (
        visualization(
            "cg-field-labels",
            "Field labels by source",
            "labels",
            "histogram",
            [count(label="verdicts"), metric("sum", "label", "fraud", agg_id="3"), terms("source", "segment", "2")],
            "Confirmed verdicts in force per source (case, chargeback, cli): all of them, and the fraud ones "
            "(label 1; 0 is legitimate). Time field: when the verdict was reached.",
        ),
        24,
        14,
    ),
    (
        saved_search(
            "cg-alerts-table",
            "Latest alerts",
            "alerts",
            ["kind", "severity", "store_id", "lane_id", "transaction_id", "amount", "currency", "summary"],
            "Every alert, newest first; an amount is in the currency beside it.",
        ),
        48,
        16,
    ),
]


def dashboard() -> dict[str, Any]:
    panels, refs, x, y, row_h = [], [], 0, 0, 0
    for n, (obj, w, h) in enumerate(PANELS):
        if x + w > 48:
            x, y, row_h = 0, y + row_h, 0
        panels.append(
            {
                "version": OSD_VERSION,
                "gridData": {"x": x, "y": y, "w": w, "h": h, "i": str(n + 1)},
                "panelIndex": str(n + 1),
                "embeddableConfig": {},
                "panelRefName": f"panel_{n}",
            }
        )
        refs.append({"name": f"panel_{n}", "type": obj["type"], "id": obj["id"]})
        x, row_h = x + w, max(row_h, h)
    return {
        "type": "dashboard",
        "id": DASHBOARD_ID,
        "attributes": {
            "title": "Checkout Guard",
            "hits": 0,
            "version": 1,
            "timeRestore": True,
            "description": "Scored transactions, outcomes, fraud, latency, face matches and alerts.",
            "timeFrom": "now-24h",
            "timeTo": "now",
            "refreshInterval": {"pause": False, "value": 10000},
            "panelsJSON": json.dumps(panels),
            "optionsJSON": json.dumps({"useMargins": True, "hidePanelTitles": False}),
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": json.dumps({"query": {"query": "", "language": "kuery"}, "filter": []})
            },
        },
        "references": refs,
        "migrationVersion": {"dashboard": "7.9.3"},
    }


def saved_objects(index_prefix: str = "checkout-guard") -> list[dict[str, Any]]:
    """Index patterns first, then the panels, then the dashboard: the order an import resolves them in."""
    patterns = [index_pattern(route.kind, index_prefix, route.time_field) for route in ROUTES]
    return patterns + [o for o, _, _ in PANELS] + [dashboard()]


def render(index_prefix: str = "checkout-guard") -> str:
    return "".join(json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n" for obj in saved_objects(index_prefix))


app = typer.Typer(add_completion=False, help="Write the OpenSearch Dashboards saved objects (ndjson).")


@app.command()
def main(
    index_prefix: Annotated[str, typer.Option(help="Index prefix the index patterns point at.")] = "checkout-guard",
    output: Annotated[Path, typer.Option(help="Where to write the ndjson.")] = NDJSON,
) -> None:
    output.write_text(render(index_prefix))
    typer.echo(f"wrote {len(saved_objects(index_prefix))} saved objects to {output}")


if __name__ == "__main__":
    app()
