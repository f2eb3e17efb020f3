"""The OpenSearch Dashboards export is importable and only names fields the index templates map fittingly.

The checks read the ndjson file itself (what analysts import), not the module that writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import load_schemas
from schemas.indices import ROUTES, index_name, load_template
from sinks.saved_objects.build import NDJSON, render

JSON_STRING_ATTRIBUTES = ("visState", "uiStateJSON", "panelsJSON", "optionsJSON", "fields")
NUMERIC = {"long", "integer", "short", "double", "float", "scaled_float"}
FITTING = {  # aggregation type -> mapping types it can run on
    "terms": {"keyword"},
    "sum": NUMERIC,
    "avg": NUMERIC,
    "min": NUMERIC,
    "max": NUMERIC,
    "median": NUMERIC,
    "percentiles": NUMERIC,
    "date_histogram": {"date"},
    "cardinality": {"keyword"} | NUMERIC,
}
KQL_TERM = re.compile(r"(?P<field>[A-Za-z_][\w.]*)\s*:\s*(?P<value>\"[^\"]*\"|[^\s()]+)")


def load_objects(path: Path = NDJSON) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines, "the export is empty"
    objects = []
    for number, line in enumerate(lines, 1):
        obj = json.loads(line)  # one complete JSON object per line
        assert isinstance(obj, dict), f"line {number} is not an object"
        objects.append(obj)
    return objects


def routes_by_pattern(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Index-pattern id -> the sink route of the index family its title names."""
    routes = {index_name("checkout-guard", route.kind): route for route in ROUTES}
    return {o["id"]: routes[o["attributes"]["title"]] for o in objects if o["type"] == "index-pattern"}


def mappings_by_pattern(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index-pattern id -> the template properties of the index family its title names."""
    return {
        pattern: load_template(route.kind, "checkout-guard")["template"]["mappings"]["properties"]
        for pattern, route in routes_by_pattern(objects).items()
    }


def enum_symbols(record_type: str) -> dict[str, set[str]]:
    """Avro enum field name -> its symbols, for one record type."""
    schema = next(s for s in load_schemas().values() if s.short_name == record_type)
    return {
        field["name"]: set(field["type"]["symbols"])
        for field in json.loads(schema.path.read_text())["fields"]
        if isinstance(field["type"], dict) and field["type"].get("type") == "enum"
    }


def field_problems(obj: dict[str, Any], objects: list[dict[str, Any]]) -> list[str]:
    """What in one visualization or search refers to a field that is missing or of an unfitting type."""
    attributes = obj["attributes"]
    source = json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])
    ref = next(r for r in obj["references"] if r["name"] == source["indexRefName"])
    props = mappings_by_pattern(objects)[ref["id"]]
    symbols = enum_symbols(routes_by_pattern(objects)[ref["id"]].topic.record_type)
    problems = []

    def check(field: str, allowed: set[str], why: str) -> None:
        spec = props.get(field)
        if spec is None:
            problems.append(f"{obj['id']}: {why} uses {field!r}, which the mapping lacks")
        elif spec["type"] not in allowed:
            problems.append(f"{obj['id']}: {why} needs {sorted(allowed)} but {field!r} is {spec['type']}")

    if obj["type"] == "visualization":
        for agg in json.loads(attributes["visState"])["aggs"]:
            if agg["type"] == "count":
                continue
            assert agg["type"] in FITTING, f"{obj['id']}: aggregation {agg['type']} is not covered by this test"
            check(agg["params"]["field"], FITTING[agg["type"]], agg["type"])
    else:
        for column in attributes["columns"]:
            check(column, {"keyword", "text", "date"} | NUMERIC, "column")
        for field, _ in attributes["sort"]:
            check(field, {"date"} | NUMERIC | {"keyword"}, "sort")
    for match in KQL_TERM.finditer(source["query"]["query"]):
        field, value = match["field"], match["value"].strip('"')
        check(field, {"keyword"}, "query")
        if field in symbols and value not in symbols[field]:
            problems.append(f"{obj['id']}: query value {value!r} is not one of {field}'s {sorted(symbols[field])}")
    return problems


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return load_objects()


def test_every_line_is_a_saved_object_with_type_id_attributes_and_references(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        assert obj["type"] in {"index-pattern", "visualization", "search", "dashboard"}
        assert isinstance(obj["id"], str) and obj["id"]
        assert isinstance(obj["attributes"], dict) and obj["attributes"].get("title")
        assert isinstance(obj["references"], list)
    keys = [(o["type"], o["id"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate saved object"


def test_json_encoded_attributes_are_valid_json(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        attributes = obj["attributes"]
        for name in JSON_STRING_ATTRIBUTES:
            if name in attributes:
                assert isinstance(attributes[name], str), f"{obj['id']}.{name} must be a JSON string"
                json.loads(attributes[name])
        if "kibanaSavedObjectMeta" in attributes:
            json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])


def test_every_reference_resolves_to_an_object_in_the_file(objects: list[dict[str, Any]]) -> None:
    present = {(o["type"], o["id"]) for o in objects}
    for obj in objects:
        names = {r["name"] for r in obj["references"]}
        for ref in obj["references"]:
            assert (ref["type"], ref["id"]) in present, f"{obj['id']} refers to missing {ref}"
        attributes = obj["attributes"]
        if "kibanaSavedObjectMeta" in attributes and obj["type"] != "dashboard":
            source = json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])
            assert source["indexRefName"] in names
        if obj["type"] == "dashboard":
            panels = json.loads(attributes["panelsJSON"])
            assert panels and all(p["panelRefName"] in names for p in panels)
            assert len({p["panelIndex"] for p in panels}) == len(panels)


def test_index_patterns_point_at_the_sink_aliases_with_a_date_time_field(objects: list[dict[str, Any]]) -> None:
    patterns = [o for o in objects if o["type"] == "index-pattern"]
    assert {p["attributes"]["title"] for p in patterns} == {index_name("checkout-guard", r.kind) for r in ROUTES}
    mappings = mappings_by_pattern(objects)
    for pattern in patterns:
        props = mappings[pattern["id"]]
        assert props[pattern["attributes"]["timeFieldName"]]["type"] == "date"
        cached = {f["name"] for f in json.loads(pattern["attributes"]["fields"])}
        assert cached - {"_id"} <= set(props) | {f"{n}.raw" for n in props}


def test_every_panel_field_exists_in_the_mappings_with_a_fitting_type(objects: list[dict[str, Any]]) -> None:
    problems = [p for o in objects if o["type"] in {"visualization", "search"} for p in field_problems(o, objects)]
    assert problems == []


def test_the_field_check_catches_a_wrong_field_and_a_wrong_type(objects: list[dict[str, Any]]) -> None:
    pie = next(o for o in objects if o["id"] == "cg-outcome-pie")
    vis = json.loads(pie["attributes"]["visState"])
    vis["aggs"][1]["params"]["field"] = "risk_score"  # numeric: not for a terms aggregation on keywords
    vis["aggs"].append({"id": "9", "type": "sum", "schema": "metric", "params": {"field": "no_such_field"}})
    broken = {**pie, "attributes": {**pie["attributes"], "visState": json.dumps(vis)}}
    assert len(field_problems(broken, objects)) == 2
    value = next(o for o in objects if o["id"] == "cg-value-prevented")
    source = json.loads(value["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    source["query"]["query"] = "outcome:BLOCKED"
    meta = {"searchSourceJSON": json.dumps(source)}
    assert field_problems({**value, "attributes": {**value["attributes"], "kibanaSavedObjectMeta": meta}}, objects) == [
        "cg-value-prevented: query value 'BLOCKED' is not one of outcome's ['APPROVE', 'BLOCK', 'REVIEW']"
    ]


def test_money_panels_show_one_figure_per_currency_never_a_sum_over_currencies(objects: list[dict[str, Any]]) -> None:
    money = []
    for obj in objects:
        if obj["type"] != "visualization":
            continue
        aggs = json.loads(obj["attributes"]["visState"])["aggs"]
        if any(a["type"] == "sum" and a["params"]["field"] == "amount" for a in aggs):
            money.append(obj["id"])
            split = [a for a in aggs if a["type"] == "terms" and a["params"]["field"] == "currency"]
            assert split and split[0]["schema"] == "group", f"{obj['id']} adds up amounts of different currencies"
    assert {"cg-revenue", "cg-value-prevented", "cg-sales-over-time"} <= set(money)


def panel_query(objects: list[dict[str, Any]], vis_id: str) -> str:
    obj = next(o for o in objects if o["id"] == vis_id)
    return json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])["query"]["query"]


def test_sales_over_time_leaves_blocked_sales_out_so_it_adds_up_to_revenue(objects: list[dict[str, Any]]) -> None:
    # A blocked sale took no money (its amount is value prevented): the chart sums what the Revenue figure sums.
    assert panel_query(objects, "cg-sales-over-time") == panel_query(objects, "cg-revenue")
    assert "not outcome:BLOCK" in panel_query(objects, "cg-sales-over-time")


def test_tables_show_an_amount_with_its_currency_beside_it(objects: list[dict[str, Any]]) -> None:
    tables = [o for o in objects if o["type"] == "search" and "amount" in o["attributes"]["columns"]]
    assert tables, "no table shows amounts"
    for table in tables:
        columns = table["attributes"]["columns"]
        assert columns[columns.index("amount") + 1 : columns.index("amount") + 2] == ["currency"], table["id"]


def test_store_panels_count_the_stores_past_their_size_as_other_stores(objects: list[dict[str, Any]]) -> None:
    per_store = []
    for obj in objects:
        if obj["type"] != "visualization":
            continue
        for agg in json.loads(obj["attributes"]["visState"])["aggs"]:
            if agg["type"] == "terms" and agg["params"]["field"] == "store_id":
                per_store.append(obj["id"])
                assert agg["params"]["otherBucket"] is True, f"{obj['id']} silently drops stores past its size"
    assert "cg-outcomes-per-store" in per_store


def test_dashboard_has_the_seed_panels_and_ours(objects: list[dict[str, Any]]) -> None:
    dashboard = next(o for o in objects if o["type"] == "dashboard")
    titles = {o["id"]: o["attributes"]["title"] for o in objects}
    on_board = {titles[r["id"]] for r in dashboard["references"]}
    assert {
        "Transactions",
        "Revenue",
        "Outcomes",
        "Fraud by currency",
        "Fraud by billing state",
        "Detection latency",
        "Sales over time",
        "Outcomes per store",
        "Face matches over time",
        "Latest alerts",
        "Value prevented",
    } <= on_board


def test_the_file_is_what_the_build_module_writes() -> None:
    assert NDJSON.read_text() == render(), "run `python -m sinks.saved_objects.build` and commit the result"


def test_the_drift_panel_draws_every_model_version_or_says_the_rest_are_pooled(objects: list[dict[str, Any]]) -> None:
    """It drew the top 3 versions only: with a champion, its challenger and the versions they replaced in the time
    range, a version's drift vanished from the panel without a word."""
    drift = next(o for o in objects if o["id"] == "cg-model-drift")
    [versions] = [a for a in json.loads(drift["attributes"]["visState"])["aggs"] if a["type"] == "terms"]
    assert versions["params"]["field"] == "model_version"
    assert versions["params"]["size"] >= 20
    assert versions["params"]["otherBucket"] is True
    assert versions["params"]["otherBucketLabel"] == "other versions"
