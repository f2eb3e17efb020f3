"""The OpenSearch sink's pure pieces: actions, dead letters, offsets, backoff, templates, bulk answers."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka import Message
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import TransportError
from opensearchpy.serializer import JSONSerializer

from infra.retry import Backoff
from infra.settings import IndicesSettings, OpenSearchSettings, Settings
from schemas.codec import latest_versions
from schemas.indices import (
    MAX_TERM_BYTES,
    ROUTES,
    default_group_id,
    indexed_customer_key,
    load_template,
    period_index_name,
    period_kind,
    period_of,
)
from schemas.records import (
    MAX_CASE_TEXT,
    Alert,
    Case,
    DeadLetter,
    FaceObservation,
    Label,
    ModelDrift,
    ScoredTransaction,
    case_text,
    make_label,
)
from sinks.opensearch.forget import SIGHTING_FIELDS, SIGHTING_LINKS, Forget, erase_query, searched_fields
from sinks.opensearch.sink import (
    DAY_MS,
    TRANSACTION_FACE_FIELDS,
    IndexAction,
    IndexPeriodConflict,
    OpenSearchSink,
    apply_retention,
    bulk_once,
    check_period,
    expired_indices,
    install_templates,
    is_retriable,
    keep_faces,
    offsets_to_commit,
    other_period_indices,
    retention_days,
    to_actions,
)

PREFIX = "bt."


def scored(transaction_id: str = "tx-1", **overrides: Any) -> ScoredTransaction:
    values: dict[str, Any] = dict(
        transaction_id=transaction_id,
        event_time=1_700_000_000_000,
        store_id="S1",
        lane_id="L2",
        kind="SALE",
        amount=12.5,
        currency="USD",
        item_count=2,
        customer_key="card:abc",
        outcome="APPROVE",
        risk_score=10,
        reasons=("velocity",),
        rules_version="builtin-v1",
        ingest_time=1_700_000_000_050,
        decided_at=1_700_000_000_080,
        proc_time_ms=20,
        model_time_ms=5,
        ttdf_ms=80,
        indicators={"velocity": 1.0},
    )
    values.update(overrides)
    return ScoredTransaction(**values)


def alert(alert_id: str = "alert-1") -> Alert:
    return Alert(
        alert_id=alert_id,
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=1_700_000_000_000,
        store_id="S1",
        summary="blocked",
        transaction_id="tx-1",
        reasons=("velocity",),
    )


def message(topic: str, value: bytes | None, partition: int = 0, offset: int = 0, key: bytes | None = None) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=key, value=value)


def tx_topic() -> str:
    return f"{PREFIX}processed_transactions"


def test_actions_use_the_business_key_as_id_and_the_prefixed_index() -> None:
    batch = [
        message(tx_topic(), scored("tx-42").encode(), offset=1),
        message(f"{PREFIX}alerts", alert("alert-7").encode(), offset=2),
    ]
    actions, dead = to_actions(batch, index_prefix="backtest", topic_prefix=PREFIX)
    assert dead == []
    assert [(a.op["_op_type"], a.op["_index"], a.op["_id"]) for a in actions] == [
        ("index", "backtest-transactions-2023.11.14", "tx-42"),  # 1_700_000_000_000 ms = 2023-11-14T22:13Z
        ("index", "backtest-alerts-2023.11.14", "alert-7"),
    ]
    assert actions[0].op["_source"]["reasons"] == ["velocity"]
    assert actions[0].op["_source"]["indicators"] == {"velocity": 1.0}


def test_undecodable_message_becomes_a_dead_letter_with_the_reason() -> None:
    bad = message(tx_topic(), b"not avro at all", partition=1, offset=7, key=b"k1")
    actions, dead = to_actions([bad], index_prefix="cg", topic_prefix=PREFIX, now_ms=123)
    assert actions == []
    assert dead == [
        DeadLetter(
            dead_letter_id=f"{tx_topic()}:1:7",
            source_topic=tx_topic(),
            partition=1,
            offset=7,
            payload=b"not avro at all",
            key=b"k1",
            error_kind="not_avro",
            reason="not an Avro single-object message (missing C3 01 header)",
            stage="opensearch-sink",
            failed_at=123,
        )
    ]


def test_record_of_the_wrong_type_and_empty_message_are_dead_lettered() -> None:
    batch = [message(tx_topic(), alert().encode(), offset=0), message(tx_topic(), None, offset=1)]
    _, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [d.error_kind for d in dead] == ["wrong_type", "empty"]


def test_empty_business_key_is_dead_lettered_instead_of_indexed() -> None:
    _, dead = to_actions([message(tx_topic(), scored(" ").encode())], index_prefix="cg", topic_prefix=PREFIX)
    assert [(d.error_kind, d.reason) for d in dead] == [("missing_field", "transaction_id is empty")]


def test_an_alert_id_the_alert_sender_refuses_is_dead_lettered_and_the_rest_indexed() -> None:
    """Control characters (a mail header injection), a space: no channel sends it, so no document shows it."""
    bad = [alert(f"a-1{tail}") for tail in ("\r\nBcc: x@evil.test", "\x00", "\x1b[2J", " two")]
    batch = [message(f"{PREFIX}alerts", a.encode(), offset=i) for i, a in enumerate([*bad, alert("watchlist:e:1")])]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [a.doc_id for a in actions] == ["watchlist:e:1"]
    assert [d.error_kind for d in dead] == ["invalid_id"] * len(bad)
    assert all("alert_id" in d.reason and "\x00" not in d.reason for d in dead)


def test_an_alerts_summary_is_indexed_as_a_case_keeps_it_cut_and_without_controls() -> None:
    """The dashboard's alert page and latest-alerts list show the indexed summary: one of 200,000 characters (up to the
    record limit), a terminal escape or a direction override was indexed whole. Now as its case keeps it (1,000
    characters at most); the alert on its topic is not the sink's to change."""
    text = "Possible suspect\x1b[2J \u202eentered\x00 store S1\r\n" + "x" * 200_000
    record = replace(alert("a-1"), summary=text)
    batch = [message(f"{PREFIX}alerts", record.encode()), message(f"{PREFIX}alerts", alert("a-2").encode(), offset=1)]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    summary = actions[0].op["_source"]["summary"]
    assert summary == case_text(text) and len(summary) == MAX_CASE_TEXT
    assert summary.startswith("Possible suspect[2J entered store S1\nxxx")
    assert actions[1].op["_source"]["summary"] == "blocked"  # a usual one as it was
    only_controls = message(f"{PREFIX}alerts", replace(alert("a-3"), summary="\x1b\u202e\x07").encode())
    actions, _ = to_actions([only_controls], index_prefix="cg", topic_prefix=PREFIX)
    assert actions[0].op["_source"]["summary"] == ""


def test_replay_within_one_batch_keeps_one_action_with_the_latest_version() -> None:
    batch = [
        message(tx_topic(), scored("tx-1", risk_score=10).encode(), offset=0),
        message(tx_topic(), scored("tx-2").encode(), offset=1),
        message(tx_topic(), scored("tx-1", risk_score=90).encode(), offset=2),
    ]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [(a.doc_id, a.op["_source"]["risk_score"]) for a in actions] == [("tx-2", 10), ("tx-1", 90)]


def test_non_finite_numbers_are_indexed_as_null_because_json_cannot_carry_them() -> None:
    record = scored(amount=float("nan"), indicators={"zscore": float("inf"), "velocity": 2.0})
    actions, _ = to_actions([message(tx_topic(), record.encode())], index_prefix="cg", topic_prefix=PREFIX)
    source = actions[0].op["_source"]
    assert source["amount"] is None
    assert source["indicators"] == {"zscore": None, "velocity": 2.0}
    json.dumps(source, allow_nan=False)


@pytest.mark.parametrize("include_private", [False, True])
def test_no_float_field_of_any_indexed_kind_reaches_the_bulk_body_as_nan_or_infinity(include_private: bool) -> None:
    """Every double the schemas carry (an alert's amount and similarity, an observation's similarity, quality and
    embedding, a scored sale's amount, face similarity and indicators): serialized as the client sends it, bare
    ``NaN`` would not be JSON, and OpenSearch may refuse the whole bulk request for it."""
    nan, inf = float("nan"), float("inf")
    records = {
        "alerts": replace(alert("a-1"), amount=-inf, similarity=nan),
        "face_observations": replace(face_observation([nan, inf, *[0.1] * 126]), similarity=inf, quality=nan),
        "processed_transactions": scored(amount=nan, face_similarity=inf, indicators={"z": -inf}),
    }
    batch = [message(f"{PREFIX}{topic}", r.encode(), offset=i) for i, (topic, r) in enumerate(records.items())]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX, include_private=include_private)
    assert dead == [] and len(actions) == 3
    for action in actions:
        body = JSONSerializer().dumps(action.op["_source"])
        assert "NaN" not in body and "Infinity" not in body, action.kind


def test_commit_offsets_are_the_last_offset_plus_one_per_partition() -> None:
    batch = [
        message("a", b"", partition=0, offset=5),
        message("a", b"", partition=1, offset=9),
        message("a", b"", partition=0, offset=7),
        message("b", b"", partition=0, offset=0),
        message("a", b"", partition=0, offset=6),
    ]
    assert [(tp.topic, tp.partition, tp.offset) for tp in offsets_to_commit(batch)] == [
        ("a", 0, 8),
        ("a", 1, 10),
        ("b", 0, 1),
    ]


def test_sinks_of_different_topic_prefixes_get_different_consumer_groups() -> None:
    assert default_group_id("") == "checkout-guard-opensearch"
    assert default_group_id("backtest.") == "backtest.checkout-guard-opensearch"


def test_backoff_doubles_and_stays_within_its_bound() -> None:
    backoff, rng = Backoff(initial_s=0.5, maximum_s=30.0), random.Random(7)
    for attempt in range(200):
        cap = min(30.0, 0.5 * 2 ** min(attempt, 30))
        delay = backoff.delay(attempt, rng)
        assert cap / 2 <= delay <= cap
    assert backoff.delay(10_000, rng) <= 30.0


def test_backoff_is_jittered_so_sinks_do_not_retry_in_step() -> None:
    delays = {round(Backoff(1.0, 60.0).delay(4, random.Random(seed)), 6) for seed in range(20)}
    assert len(delays) > 10


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.kind)
def test_template_maps_every_schema_field_strictly(route: Any) -> None:
    template = load_template(route.kind, "backtest")
    assert template["index_patterns"] == [f"backtest-{route.kind}-*"]
    assert template["template"]["aliases"] == {f"backtest-{route.kind}": {}}
    settings = template["template"]["settings"]["index"]
    assert (settings["number_of_shards"], settings["refresh_interval"]) == (1, "1s")
    assert "number_of_replicas" not in settings  # the deployment's (CG_OPENSEARCH__REPLICAS), not the schema's
    mappings = template["template"]["mappings"]
    assert mappings["dynamic"] == "strict"
    schema = latest_versions()[route.topic.record_type]
    avro_fields = {f["name"] for f in json.loads(schema.path.read_text())["fields"]}
    assert set(mappings["properties"]) == avro_fields
    assert mappings["properties"][route.id_field] == {"type": "keyword"}
    for name in ("event_time", "decided_at", "ingest_time", "hour_start", "created_at", route.time_field):
        if name in avro_fields:
            assert mappings["properties"][name] == {"type": "date", "format": "epoch_millis"}


FREE_TEXT_KEYWORDS = {
    "transactions": {
        "product_category": 128,
        "card_bin": 128,
        "billing_state": 128,
        "billing_country": 128,
        "customer_key": len("token:") + 256,
    },
    "face_observations": {"reason": 0},
    "labels": {"source": 0},
}
"""Keyword fields whose values a record's writer chooses: kind -> field -> the longest value the scoring job lets
through (0: text it does not bound)."""
LUCENE_MAX_TERM_BYTES = 32_766
assert MAX_TERM_BYTES == LUCENE_MAX_TERM_BYTES


def keyword_fields(properties: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every keyword field of a mapping's ``properties``, by dotted path: an object's, a text field's ``raw`` too."""
    found: dict[str, dict[str, Any]] = {}
    for name, spec in properties.items():
        if spec.get("type") == "keyword":
            found[prefix + name] = spec
        for sub, sub_spec in spec.get("fields", {}).items():
            if sub_spec.get("type") == "keyword":
                found[f"{prefix}{name}.{sub}"] = sub_spec
        found |= keyword_fields(spec.get("properties", {}), f"{prefix}{name}.")
    return found


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.kind)
def test_every_keyword_field_past_lucenes_term_limit_is_kept_unindexed_unless_bounded_or_searched_by_a_forget(route):
    """A 40,000-character ``cashier_id`` (or any keyword without ``ignore_above``) made OpenSearch refuse the whole
    document: dead-lettered, the decision missing from the dashboard. Each has ``ignore_above`` now, at most 8191
    characters (4 UTF-8 bytes each stay under the limit), but the document id (the sink refuses one over 512 bytes), an
    enum (the schema's symbols only) and a field a forget finds documents by: not indexed, the forget would miss it."""
    schema = json.loads(latest_versions()[route.topic.record_type].path.read_text())
    enums = {f["name"] for f in schema["fields"] if isinstance(f["type"], dict) and f["type"]["type"] == "enum"}
    searched = searched_fields(route)
    fields = keyword_fields(load_template(route.kind, "cg")["template"]["mappings"]["properties"])
    for name, spec in fields.items():
        if name in searched:
            assert "ignore_above" not in spec, name  # indexed whole: the sink bounds it (below)
        elif name != route.id_field and name not in enums:
            assert 0 < spec.get("ignore_above", 0) <= LUCENE_MAX_TERM_BYTES // 4, name
    assert searched <= set(fields)


def _fields_named(query: Any) -> set[str]:
    """The fields a query's ``term``, ``terms`` and ``exists`` clauses name."""
    if isinstance(query, list):
        return set().union(*map(_fields_named, query)) if query else set()
    if not isinstance(query, dict):
        return set()
    named = {field for kind in ("term", "terms") for field in query.get(kind, {})}
    named |= {query["exists"]["field"]} if "exists" in query else set()
    return named.union(*(_fields_named(v) for k, v in query.items() if k not in ("term", "terms", "exists")))


def test_the_fields_a_forget_finds_documents_by_are_those_its_queries_name() -> None:
    forgets = [Forget("subj-tx-1", "tx-1"), Forget("subj-tx-2", "tx-2")]
    kinds = {route.kind: route for route in ROUTES}
    for route in ROUTES:
        query = erase_query(route, forgets, lifted={"subj-tx-2": 1})
        assert _fields_named(query) <= searched_fields(route), route.kind
    for kind, subject_field, _ in SIGHTING_LINKS:
        assert subject_field in searched_fields(kinds[kind])
    assert set(SIGHTING_FIELDS.values()) <= searched_fields(kinds["face_observations"])


@pytest.mark.parametrize(
    ("topic", "field", "value"),
    [
        ("alerts", "subject_id", "s" * (LUCENE_MAX_TERM_BYTES + 1)),
        ("alerts", "snapshot_ref", "é" * (LUCENE_MAX_TERM_BYTES // 2 + 1)),  # fewer characters, more bytes
        ("processed_transactions", "face_subject_id", "s" * 40_000),
        ("face_observations", "image_ref", "i" * 40_000),
        ("cases", "reference_image_ref", "r" * 40_000),
    ],
)
def test_a_field_a_forget_finds_documents_by_past_lucenes_term_limit_is_dead_lettered_naming_it(topic, field, value):
    """Unindexed (``ignore_above``), the forget of the document's subject would not find it, or not remove its image
    ref; so it stays indexed whole, and the record OpenSearch would refuse is refused here, with its field and size."""
    records = {
        "alerts": (alert("a-1"), None),
        "processed_transactions": (scored("tx-1"), None),
        "face_observations": (face_observation([0.1] * 128), None),
        "cases": (
            Case(
                case_id="case-0123456789ab",
                version=1,
                state="open",
                kind="WATCHLIST_MATCH",
                store_id="S1",
                alert_id="a-1",
                summary="match",
                opened_at=1_700_000_000_000,
                updated_at=1_700_000_000_000,
                expires_at=1_700_000_900_000,
                updated_by="case-service",
                subject_id="subj-tx-9",
            ),
            b"case-0123456789ab",
        ),
    }
    record, key = records[topic]

    def indexed(text: str) -> tuple[list[IndexAction], list[DeadLetter]]:
        spoilt = replace(record, **{field: text})  # type: ignore[type-var]
        batch = [message(f"{PREFIX}{topic}", spoilt.encode(), key=key)]
        return to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)

    actions, dead = indexed("x" * LUCENE_MAX_TERM_BYTES)  # the longest OpenSearch indexes
    assert (len(actions), dead) == (1, [])
    actions, dead = indexed(value)
    assert actions == [] and [d.error_kind for d in dead] == ["invalid_field"]
    assert dead[0].reason.startswith(f"{field} is {len(value.encode())} bytes") and value[:50] not in dead[0].reason


@pytest.mark.parametrize("kind", sorted(FREE_TEXT_KEYWORDS))
def test_a_keyword_of_free_text_past_lucenes_term_limit_is_kept_unindexed_not_refused(kind: str) -> None:
    """Without ``ignore_above`` OpenSearch refused the whole document for one keyword over 32 766 bytes (it was
    dead-lettered and missing from the index); now the value stays in ``_source``, unsearchable, and the document
    goes in. Every value the pipeline makes is still indexed, however its characters are encoded (4 bytes at most)."""
    props = load_template(kind, "cg")["template"]["mappings"]["properties"]
    for name, longest in FREE_TEXT_KEYWORDS[kind].items():
        assert props[name]["type"] == "keyword"
        assert longest <= props[name]["ignore_above"] <= LUCENE_MAX_TERM_BYTES // 4, name


def test_indicators_map_to_doubles_so_dashboards_can_aggregate_them() -> None:
    """Each name the scoring job writes, and no other: a new key is kept in ``_source``, not added to the mapping."""
    from jobs.scoring.rules import INDICATOR_NAMES

    mappings = load_template("transactions", "cg")["template"]["mappings"]
    assert "dynamic_templates" not in mappings
    indicators = mappings["properties"]["indicators"]
    assert (indicators["type"], indicators["dynamic"]) == ("object", False)
    assert indicators["properties"] == {name: {"type": "double"} for name in INDICATOR_NAMES}


def test_drift_reports_map_the_psi_of_the_models_features_and_no_other_name() -> None:
    from jobs.model.drift import TIME_FEATURES
    from jobs.model.fraud_model import FEATURE_NAMES

    mappings = load_template("model_drift", "cg")["template"]["mappings"]
    assert "dynamic_templates" not in mappings
    feature_psi = mappings["properties"]["feature_psi"]
    assert (feature_psi["type"], feature_psi["dynamic"]) == ("object", False)
    named = set(FEATURE_NAMES) - set(TIME_FEATURES)  # the features a drift reference has
    assert feature_psi["properties"] == {name: {"type": "double"} for name in named}


@pytest.mark.parametrize(
    ("kind", "field", "names"),
    [
        ("transactions", "indicators", {f"ind_{n}": 1.0 for n in range(129)}),
        ("transactions", "indicators", {"velocity": 1.0, "Velocity": 1.0, "": 1.0, "a.b": 1.0, "<script>": 1.0}),
        ("transactions", "indicators", {"x" * 65: 1.0}),
        ("model_drift", "feature_psi", {f"f{n}": 0.1 for n in range(5000)}),
        ("model_drift", "feature_psi", {"amount_log": 0.1, "amount log": 0.2}),
    ],
)
def test_a_record_whose_named_numbers_would_fill_the_index_mapping_is_dead_lettered_by_count(kind, field, names):
    """Mapped as they came, every distinct key became a field, until the index's 1,000-field limit refused every
    document with a new key for the rest of its period. The reason gives counts, never a key (it may be a payload)."""
    if kind == "transactions":
        record, topic, key = scored(indicators={"velocity": 2.0}), "processed_transactions", b"tx-1"
    else:
        record, topic, key = drift_report(), "model_drift", None
    good = message(f"{PREFIX}{topic}", record.encode(), key=key)
    actions, dead = to_actions([good], index_prefix="cg", topic_prefix=PREFIX)
    assert (len(actions), dead) == (1, [])
    bad = message(f"{PREFIX}{topic}", replace(record, **{field: names}).encode(), key=key)
    actions, dead = to_actions([bad], index_prefix="cg", topic_prefix=PREFIX)
    assert actions == [] and [d.error_kind for d in dead] == ["invalid_field"]
    reason = dead[0].reason
    assert reason.startswith(f"{field} holds ") and str(len(names)) in reason
    assert not any(name in reason for name in names if len(name) > 2), reason


@pytest.mark.parametrize(
    ("status", "error_type", "retriable"),
    [
        (429, "es_rejected_execution_exception", True),
        (503, "unavailable_shards_exception", True),
        (500, "internal_server_error", True),
        (403, "cluster_block_exception", True),
        (400, "mapper_parsing_exception", False),
        (400, "strict_dynamic_mapping_exception", False),
        ("N/A", None, True),
    ],
)
def test_only_cluster_trouble_is_retried(status: Any, error_type: str | None, retriable: bool) -> None:
    assert is_retriable(status, error_type) is retriable


class FakeBulkClient:
    """Answers bulk requests from a script; enough of the client surface for ``streaming_bulk``."""

    class _Transport:
        serializer = JSONSerializer()

    transport = _Transport()

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[list[dict[str, Any]]] = []

    def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line]
        self.requests.append(lines)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        ops, lines = [], list(lines)  # (op type, id): an index op is followed by its source line, a delete is not
        while lines:
            op_type, meta = next(iter(lines.pop(0).items()))
            ops.append((op_type, meta["_id"]))
            if op_type != "delete":
                lines.pop(0)
        return {
            "errors": True,
            "items": [{op: {"_id": i, **answer.get(i, {"status": 201})}} for op, i in ops],
        }

    def mget(self, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Nothing indexed yet: every document asked for (a re-decided transaction's face) is not found."""
        return {"docs": [{"_index": d["_index"], "_id": d["_id"], "found": False} for d in body["docs"]]}


def actions_for(*ids: str) -> list[IndexAction]:
    batch = [message(tx_topic(), scored(i).encode(), offset=n) for n, i in enumerate(ids)]
    return to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)[0]


def test_bulk_round_retries_throttled_documents_and_dead_letters_rejected_ones() -> None:
    client = FakeBulkClient(
        {
            "tx-2": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}},
            "tx-3": {
                "status": 400,
                "error": {"type": "mapper_parsing_exception", "reason": "bad field", "caused_by": {"reason": "detail"}},
            },
        }
    )
    pending = actions_for("tx-1", "tx-2", "tx-3")
    result = bulk_once(client, pending)  # type: ignore[arg-type]
    assert result.acknowledged == 1
    assert [a.doc_id for a in result.retry] == ["tx-2"]
    assert [(d.dead_letter_id, d.error_kind) for d in result.rejected] == [
        (f"{tx_topic()}:0:2", "opensearch_rejected"),
    ]
    assert result.rejected[0].reason == "OpenSearch 400 mapper_parsing_exception: bad field (caused by: detail)"
    assert result.problem == "429 es_rejected_execution_exception"


def test_bulk_round_keeps_the_whole_batch_when_opensearch_is_unreachable() -> None:
    client = FakeBulkClient(OpenSearchConnectionError("N/A", "connection refused", OSError("refused")))
    pending = actions_for("tx-1", "tx-2")
    result = bulk_once(client, pending)  # type: ignore[arg-type]
    assert result.acknowledged == 0
    assert result.retry == pending
    assert result.rejected == []
    assert result.problem is not None and "ConnectionError" in result.problem


def test_bulk_round_keeps_only_unsent_chunks_when_a_later_chunk_fails() -> None:
    client = FakeBulkClient({}, OpenSearchConnectionError("N/A", "reset", OSError("reset")))
    pending = actions_for("tx-1", "tx-2", "tx-3")
    result = bulk_once(client, pending, chunk_size=2)  # type: ignore[arg-type]
    assert result.acknowledged == 2
    assert [a.doc_id for a in result.retry] == ["tx-3"]


def face_observation(embedding: list[float] | None = None) -> FaceObservation:
    return FaceObservation(
        observation_id="checkout:tx-1",
        event_time=1_700_000_000_000,
        camera_serial="Q2MV-S1-L2",
        store_id="S1",
        lane_id="L2",
        transaction_id="tx-1",
        trigger="CHECKOUT",
        status="NO_MATCH",
        quality=0.9,
        image_ref="checkout/tx-1.jpg",
        embedding=[0.1, 0.2] if embedding is None else embedding,
    )


def test_face_observations_are_indexed_by_observation_id_without_the_embedding() -> None:
    batch = [message(f"{PREFIX}face_observations", face_observation().encode())]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    assert (actions[0].op["_index"], actions[0].doc_id) == ("cg-face_observations-2023.11.14", "checkout:tx-1")
    assert "embedding" not in actions[0].op["_source"]
    assert actions[0].op["_source"]["image_ref"] == "checkout/tx-1.jpg"


def test_face_embedding_is_indexed_only_when_configured() -> None:
    batch = [message(f"{PREFIX}face_observations", face_observation().encode())]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX, include_private=True)
    assert actions[0].op["_source"]["embedding"] == pytest.approx([0.1, 0.2])
    assert IndicesSettings().include_face_embeddings is False


def test_period_index_follows_the_event_time_so_a_replay_hits_the_same_document() -> None:
    late_evening = 1_700_006_399_999  # 2023-11-14T23:59:59.999Z
    assert period_index_name("cg", "transactions", late_evening) == "cg-transactions-2023.11.14"
    assert period_index_name("cg", "transactions", late_evening + 1) == "cg-transactions-2023.11.15"
    assert period_index_name("cg", "alerts", late_evening, "month") == "cg-alerts-2023.11"
    with pytest.raises(ValueError, match="period"):
        period_index_name("cg", "alerts", late_evening, "week")
    batch = [
        message(tx_topic(), scored("tx-1", event_time=late_evening).encode()),
        message(tx_topic(), scored("tx-1", event_time=late_evening).encode(), offset=1),
    ]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [(a.op["_index"], a.doc_id) for a in actions] == [("cg-transactions-2023.11.14", "tx-1")]


def test_event_time_outside_the_calendar_is_dead_lettered() -> None:
    batch = [message(tx_topic(), scored("tx-1", event_time=2**62).encode(), offset=3)]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert actions == []
    assert [d.error_kind for d in dead] == ["invalid_field"]
    assert dead[0].reason.startswith("event_time:")


def test_period_of_only_accepts_exact_period_indices_of_the_prefix_and_kind() -> None:
    assert period_of("cg-transactions-2026.02.28", "cg", "transactions") is not None
    start, end = period_of("cg-transactions-2026.12", "cg", "transactions")  # type: ignore[misc]
    assert (start.isoformat(), end.isoformat()) == ("2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")
    start, end = period_of("cg-alerts-2026.02.28", "cg", "alerts")  # type: ignore[misc]
    assert end.isoformat() == "2026-03-01T00:00:00+00:00"
    for other in (
        "cg-transactions",
        "cg-transactions-x-transactions-2026.02.28",
        "cg-transactions-2026.2.28",
        "cgx-transactions-2026.02.28",
        "cg-alerts-2026.02.28",
    ):
        assert period_of(other, "cg", "transactions") is None, other


def test_an_email_customer_key_is_indexed_as_a_keyed_hash_never_in_clear() -> None:
    def indexed(key: str, secret: str | None = "s3cret") -> dict[str, Any]:
        batch = [message(tx_topic(), scored("tx-1", customer_key=key).encode())]
        actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX, customer_key_secret=secret)
        assert dead == []
        return actions[0].op["_source"]

    alice = indexed("email:alice.smith@example.com")
    assert alice["customer_key"].startswith("email-hmac:") and len(alice["customer_key"]) == len("email-hmac:") + 32
    assert "alice" not in json.dumps(alice) and "example.com" not in json.dumps(alice)
    # the same customer keeps one key (the "same customer" pivot), another customer or another secret does not
    assert indexed("email:alice.smith@example.com")["customer_key"] == alice["customer_key"]
    assert indexed("email:bob@example.com")["customer_key"] != alice["customer_key"]
    assert indexed("email:alice.smith@example.com", "other")["customer_key"] != alice["customer_key"]
    assert "customer_key" not in indexed("email:alice.smith@example.com", None)  # no secret: left out
    for pseudonymous in ("token:tok_9f8e", "id:cust-42", "anon:tx-7"):  # issued ids name nobody: kept
        assert indexed(pseudonymous, None)["customer_key"] == pseudonymous
    assert indexed_customer_key("phone:+1-555", "s3cret").startswith("phone-hmac:")  # any other kind is hashed


class PeriodIndices:
    """A cluster that answers only which indices a pattern matches (all a period check may ask)."""

    def __init__(self, names: list[str]) -> None:
        self.indices = self
        self.names = names

    def get_settings(self, index: str, **_: Any) -> dict[str, Any]:
        head = index.rstrip("*")
        return {n: {"settings": {"index": {"creation_date": "0"}}} for n in self.names if n.startswith(head)}


def test_a_sink_refuses_a_period_other_than_the_one_the_prefixs_indices_were_written_with() -> None:
    cluster = PeriodIndices(["cg-transactions-2026.11.21", "cg-transactions-2026.11.22", "cg-alerts-2026.11.22"])
    with pytest.raises(IndexPeriodConflict) as refused:
        install_templates(cluster, "cg", "month")  # type: ignore[arg-type]  # refused before anything is created
    text = str(refused.value)
    assert "'month'" in text and "'day' indices" in text and "(cg-transactions-2026.11.21 and 2 more)" in text
    assert "CG_INDICES__PERIOD=day" in text and "fresh prefix" in text
    check_period(cluster, "cg", "day")  # type: ignore[arg-type]  # the period they were written with
    check_period(cluster, "other", "month")  # type: ignore[arg-type]  # another prefix is another layout
    check_period(PeriodIndices(["cg-transactions-2026.11", "cg-labels-all"]), "cg", "month")  # type: ignore[arg-type]
    assert other_period_indices(cluster.names, "cg", "transactions", "month") == {
        "day": ["cg-transactions-2026.11.21", "cg-transactions-2026.11.22"]
    }
    assert period_kind("cg-transactions-2026.11", "cg", "transactions") == "month"
    assert period_kind("cg-labels-all", "cg", "labels") is None


class ReplicaCluster:
    """Indices with their replica counts and templates that give new ones theirs: what installing templates asks."""

    def __init__(self, names: list[str]) -> None:
        self.indices = self
        self.replicas = dict.fromkeys(names, "0")  # OpenSearch answers settings as strings
        self.templates: dict[str, dict[str, Any]] = {}
        self.updated: list[str] = []
        """The ``index`` of each settings update."""

    def get_settings(self, index: str, **_: Any) -> dict[str, Any]:
        if index.endswith("*"):
            names = [n for n in self.replicas if n.startswith(index[:-1])]
        else:
            names = [n for n in index.split(",") if n in self.replicas]
        return {
            n: {"settings": {"index": {"creation_date": "0", "number_of_replicas": self.replicas[n]}}} for n in names
        }

    def exists(self, index: str, **_: Any) -> bool:
        return index in self.replicas

    def put_index_template(self, name: str, body: dict[str, Any]) -> None:
        self.templates[name] = body

    def create(self, index: str, **_: Any) -> None:
        (template,) = (t for t in self.templates.values() if index.startswith(t["index_patterns"][0][:-1]))
        self.replicas[index] = str(template["template"]["settings"]["index"].get("number_of_replicas", 0))

    def update_aliases(self, **_: Any) -> None:
        pass

    def put_mapping(self, **_: Any) -> None:
        pass

    def put_settings(self, index: str, body: dict[str, Any], **_: Any) -> None:
        self.updated.append(index)
        for name in index.split(","):
            self.replicas[name] = str(body["index"]["number_of_replicas"])


NOV_22 = 1_795_305_600_000  # 2026-11-22T00:00Z
OLD_INDICES = [
    "cg-transactions-2026.11.21",
    "cg-alerts-2026.11.21",
    "cg-labels-all",
    "cg-forgotten_sightings-all",
    "cgx-transactions-2026.11.21",  # another prefix's
]


def test_every_index_template_gives_its_indices_the_configured_replicas() -> None:
    """The templates said 0 replicas whatever the cluster: on a production domain of several nodes, one node lost
    lost the analysts' history and turned the indices red, stopping the sink's writes."""
    cluster = ReplicaCluster([])
    install_templates(cluster, "cg", now_ms=NOV_22, replicas=2)  # type: ignore[arg-type]
    assert set(cluster.templates) == {route.index("cg") for route in ROUTES}
    for body in cluster.templates.values():
        assert body["template"]["settings"]["index"]["number_of_replicas"] == 2
    assert cluster.replicas and set(cluster.replicas.values()) == {"2"}  # today's indices, created by template
    assert load_template("transactions", "cg", 0)["template"]["settings"]["index"]["number_of_replicas"] == 0


def test_existing_indices_of_the_prefix_are_given_the_replicas_once_in_place() -> None:
    """``index.number_of_replicas`` is dynamic: indices created under the old templates take the count at the sink's
    start, without a reindex; a start that finds them with it changes nothing, and another prefix is left alone."""
    cluster = ReplicaCluster(OLD_INDICES)
    install_templates(cluster, "cg", now_ms=NOV_22, replicas=1)  # type: ignore[arg-type]
    assert cluster.updated == [
        "cg-alerts-2026.11.21,cg-forgotten_sightings-all,cg-labels-all,cg-transactions-2026.11.21"
    ]
    assert {n: r for n, r in cluster.replicas.items() if r != "1"} == {"cgx-transactions-2026.11.21": "0"}
    install_templates(cluster, "cg", now_ms=NOV_22, replicas=1)  # type: ignore[arg-type]
    assert len(cluster.updated) == 1  # nothing to change the second time
    install_templates(cluster, "cg", now_ms=NOV_22, replicas=0)  # type: ignore[arg-type]  # a changed setting
    assert len(cluster.updated) == 2 and cluster.replicas["cg-labels-all"] == "0"


def test_replicas_refused_for_good_leave_the_old_indices_as_they_are_and_cluster_trouble_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sink user without the right to update index settings (or a cluster at its shard limit) must not keep the
    sink from indexing; 429 and 5xx raise, so the start tries again."""

    class Refuses(ReplicaCluster):
        def __init__(self, error: TransportError) -> None:
            super().__init__(OLD_INDICES)
            self.error = error

        def put_settings(self, index: str, body: dict[str, Any], **_: Any) -> None:
            raise self.error

    forbidden = Refuses(TransportError(403, "security_exception", {}))
    install_templates(forbidden, "cg", now_ms=NOV_22, replicas=1)  # type: ignore[arg-type]
    assert set(forbidden.templates) == {route.index("cg") for route in ROUTES}
    assert "refused to give the existing indices of cg 1 replicas" in caplog.text
    with pytest.raises(TransportError):
        install_templates(Refuses(TransportError(503, "unavailable", {})), "cg", now_ms=NOV_22, replicas=1)  # type: ignore[arg-type]


class MappedCluster(ReplicaCluster):
    """Records each mapping put on existing indices: ``(index names, body)``."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.mapped: list[tuple[str, dict[str, Any]]] = []

    def put_mapping(self, index: str, body: dict[str, Any], **_: Any) -> None:
        self.mapped.append((index, body))


def test_existing_indices_are_given_ignore_above_at_the_sinks_start_in_place() -> None:
    """``ignore_above`` is a setting put_mapping changes on an existing keyword field: today's index and those made
    under the old templates stop refusing a document for one long keyword, without a reindex."""
    cluster = MappedCluster(OLD_INDICES)
    install_templates(cluster, "cg", now_ms=NOV_22)  # type: ignore[arg-type]
    put = {name: body for index, body in cluster.mapped for name in index.split(",")}
    wanted = {"type": "keyword", "ignore_above": LUCENE_MAX_TERM_BYTES // 4}
    assert put["cg-transactions-2026.11.21"]["properties"]["cashier_id"] == wanted
    assert put["cg-alerts-2026.11.21"]["properties"]["store_id"] == wanted
    assert put["cg-labels-all"]["properties"]["case_id"] == wanted
    assert "cgx-transactions-2026.11.21" not in put  # another prefix's


@pytest.mark.parametrize("lacks_other_fields", [False, True], ids=["made-by-v5", "made-by-v1"])
def test_an_index_whose_mapping_is_full_of_named_numbers_stops_mapping_new_names_and_the_sink_starts(
    caplog, lacks_other_fields: bool
) -> None:
    """Before the templates mapped indicators by name, a writer of many distinct names filled an index's 1,000 fields;
    the new template's named fields, put on it at the start, were refused too (and the start retried for ever). It is
    given the rest of the mapping, ``ignore_above`` included, or only the closed maps where it lacks other fields."""
    from opensearchpy.exceptions import RequestError

    full = "cg-transactions-2026.11.21"

    class FullIndex(MappedCluster):
        def put_mapping(self, index: str, body: dict[str, Any], **_: Any) -> None:
            adds_fields = any("properties" in spec for spec in body["properties"].values())
            adds_fields |= lacks_other_fields and "challenger_score" in body["properties"]  # added by v2
            if full in index.split(",") and adds_fields:
                reason = "Limit of total fields [1000] has been exceeded"
                raise RequestError(400, "illegal_argument_exception", {"error": {"root_cause": [{"reason": reason}]}})
            super().put_mapping(index, body)

    cluster = FullIndex(OLD_INDICES)
    install_templates(cluster, "cg", now_ms=NOV_22)  # type: ignore[arg-type]
    closed = {"type": "object", "dynamic": False}
    (put,) = [body for index, body in cluster.mapped if index == full]
    if lacks_other_fields:
        assert put == {"properties": {"indicators": closed}}
    else:
        assert put["properties"]["indicators"] == closed
        assert put["properties"]["cashier_id"] == {"type": "keyword", "ignore_above": LUCENE_MAX_TERM_BYTES // 4}
    mapped = {name for index, _ in cluster.mapped for name in index.split(",")}
    assert mapped >= {"cg-alerts-2026.11.21", "cg-transactions-2026.11.22"}  # the others as ever
    assert f"{full} reached OpenSearch's limit of fields" in caplog.text


def test_the_sink_applies_its_replicas_setting_and_the_local_default_changes_nothing() -> None:
    local = Settings(opensearch=OpenSearchSettings())
    assert local.opensearch.replicas == 0  # the local stack's one node can hold no replica
    cluster = ReplicaCluster(OLD_INDICES)
    OpenSearchSink(local, index_prefix="cg", client=cluster)._install_templates()  # type: ignore[arg-type]
    assert cluster.updated == [] and set(cluster.replicas.values()) == {"0"}
    production = Settings(opensearch=OpenSearchSettings(replicas=1))  # CG_OPENSEARCH__REPLICAS=1
    OpenSearchSink(production, index_prefix="cg", client=cluster)._install_templates()  # type: ignore[arg-type]
    assert {n for n, r in cluster.replicas.items() if r != "1"} == {"cgx-transactions-2026.11.21"}


def test_retention_drops_indices_whose_period_ended_and_that_were_created_long_enough_ago() -> None:
    now = 1_795_305_600_000  # 2026-11-22T00:00Z
    old = now - 100 * DAY_MS
    created = {
        "cg-face_observations-2026.10.21": old,  # ended 31 days ago, created long ago: dropped
        "cg-face_observations-2026.10.22": old,  # ended exactly 30 days ago: dropped
        "cg-face_observations-2026.10.23": old,  # ended 29 days ago: kept
        "cg-face_observations-2022.11.08": now - DAY_MS,  # a replay of old history indexed yesterday: kept
        "cg-face_observations-2026.11": old,  # the current month: kept
        "other-face_observations-2020.01.01": old,  # another prefix: never touched
    }
    assert expired_indices(created, "cg", "face_observations", 30, now) == [
        "cg-face_observations-2026.10.21",
        "cg-face_observations-2026.10.22",
    ]
    assert expired_indices(created, "cg", "face_observations", 0, now) == []


def test_face_observations_are_kept_shorter_than_transactions_by_default() -> None:
    defaults = IndicesSettings()
    assert 0 < retention_days(defaults, "face_observations") < retention_days(defaults, "transactions")
    kinds = {"transactions", "alerts", "face_observations", "labels", "model_drift", "cases"}
    assert {route.kind for route in ROUTES} == kinds
    for route in ROUTES:
        retention_days(defaults, route.kind)  # every kind has a setting or a default


# --------------------------------------------------------------------------- champion/challenger, labels, drift


def test_challenger_score_and_version_are_indexed_beside_the_champion() -> None:
    record = scored(model_score=640, model_version="gbm-a", challenger_score=910, challenger_version="gbm-b")
    actions, dead = to_actions([message(tx_topic(), record.encode())], index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    source = actions[0].op["_source"]
    assert (source["model_score"], source["model_version"]) == (640, "gbm-a")
    assert (source["challenger_score"], source["challenger_version"]) == (910, "gbm-b")
    props = load_template("transactions", "cg")["template"]["mappings"]["properties"]
    assert props["challenger_score"] == {"type": "integer"}
    assert props["challenger_version"] == {"type": "keyword", "ignore_above": 8191}
    alone, _ = to_actions([message(tx_topic(), scored().encode())], index_prefix="cg", topic_prefix=PREFIX)
    assert alone[0].op["_source"]["challenger_score"] is None  # no challenger loaded


def labels_topic() -> str:
    return f"{PREFIX}labels"


def verdict(tx: str = "tx-1", label: int = 1, decided_at: int = 1_700_000_000_000, **more: Any) -> Label:
    return make_label(transaction_id=tx, label=label, source="case", decided_at=decided_at, **more)


def label_message(record: Label | None, offset: int, key: str | None = None, partition: int = 0) -> Message:
    key_ = key if key is not None else (record.transaction_id if record else "tx-1")
    return message(
        labels_topic(), record.encode() if record else None, partition=partition, offset=offset, key=key_.encode()
    )


def test_label_is_one_document_per_transaction_in_one_index_versioned_by_its_offset() -> None:
    batch = [label_message(verdict("tx-1", decided_at=1_600_000_000_000, reason="chargeback 4837"), offset=41)]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    op = actions[0].op
    assert (op["_op_type"], op["_index"], op["_id"]) == ("index", "cg-labels-all", "tx-1")
    assert (op["version"], op["version_type"]) == (41, "external_gte")
    assert op["_source"]["label"] == 1 and op["_source"]["reason"] == "chargeback 4837"
    assert op["_source"]["decided_at"] == 1_600_000_000_000
    # whatever day it was decided: the same index, so a correction overwrites the same document
    other_day, _ = to_actions(
        [label_message(verdict("tx-1", label=0, decided_at=1_700_000_000_000), offset=42)],
        index_prefix="cg",
        topic_prefix=PREFIX,
    )
    assert (other_day[0].op["_index"], other_day[0].doc_id) == ("cg-labels-all", "tx-1")


def test_the_verdict_published_last_wins_within_a_batch_even_with_an_earlier_decided_at() -> None:
    batch = [
        label_message(verdict("tx-1", label=0, decided_at=1_700_000_900_000), offset=5),
        label_message(verdict("tx-2", label=1), offset=6),
        label_message(verdict("tx-1", label=1, decided_at=1_700_000_000_000), offset=7),  # the correction
    ]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [(a.doc_id, a.op["_source"]["label"], a.op["version"]) for a in actions] == [("tx-2", 1, 6), ("tx-1", 1, 7)]


def test_a_label_tombstone_deletes_the_verdict_with_its_offset_as_version() -> None:
    batch = [label_message(verdict("tx-9"), offset=3), label_message(None, offset=4, key="tx-9")]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    assert [a.op for a in actions] == [
        {"_op_type": "delete", "_index": "cg-labels-all", "_id": "tx-9", "version": 4, "version_type": "external_gte"}
    ]


def test_labels_keyed_otherwise_or_with_another_verdict_are_dead_lettered() -> None:
    bad_label = Label(label_id="cli:1:tx-3", transaction_id="tx-3", label=7, source="cli", decided_at=1)
    batch = [
        label_message(verdict("tx-1"), offset=0, key="tx-other"),
        label_message(None, offset=1, key=""),
        label_message(bad_label, offset=2),
        message(labels_topic(), b"\xc3\x01garbage", offset=3, key=b"tx-4"),
    ]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert actions == []
    assert [(d.offset, d.error_kind) for d in dead] == [
        (0, "invalid_key"),
        (1, "invalid_key"),
        (2, "invalid_field"),
        (3, dead[3].error_kind),
    ]
    assert dead[3].error_kind != "invalid_key" and dead[3].stage == "opensearch-sink"


def test_a_tombstone_on_another_topic_is_still_an_empty_message() -> None:
    _, dead = to_actions([message(f"{PREFIX}alerts", None, key=b"alert-1")], index_prefix="cg", topic_prefix=PREFIX)
    assert [d.error_kind for d in dead] == ["empty"]


def drift_report(model_version: str = "gbm-a", hour_start: int = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000):
    return ModelDrift(
        report_id=f"drift:{model_version}:{hour_start}",
        model_version=model_version,
        hour_start=hour_start,
        rows=812,
        late_rows=3,
        score_psi=0.31,
        feature_psi={"amount": 0.42, "items": 0.02, "velocity_1h": 0.11},
        worst_feature="amount",
        worst_psi=0.42,
        alert=True,
        reference_rows=340,
        created_at=hour_start + 3_900_000,
    )


def test_drift_reports_go_to_the_period_index_of_their_hour_by_report_id() -> None:
    report = drift_report()
    batch = [message(f"{PREFIX}model_drift", report.encode(), key=report.report_id.encode())]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    op = actions[0].op
    assert (op["_op_type"], op["_index"], op["_id"]) == ("index", "cg-model_drift-2023.11.14", report.report_id)
    assert "version" not in op  # a re-emitted report of the same hour simply overwrites
    assert op["_source"]["feature_psi"] == {"amount": 0.42, "items": 0.02, "velocity_1h": 0.11}
    assert op["_source"]["alert"] is True
    json.dumps(op["_source"], allow_nan=False)


def test_labels_are_kept_forever_and_drift_reports_by_default_as_long_as_transactions() -> None:
    defaults = IndicesSettings()
    assert retention_days(defaults, "labels") == 0
    assert retention_days(defaults, "model_drift") == 400
    with pytest.raises(ValueError, match="no retention"):
        retention_days(defaults, "nonsense")
    # the labels index is not a period index, so no age ever makes it expire
    assert period_of("cg-labels-all", "cg", "labels") is None
    assert expired_indices({"cg-labels-all": 0}, "cg", "labels", 1, 10**13) == []


def test_bulk_round_counts_a_refused_older_label_as_done_and_a_delete_of_nothing_as_done() -> None:
    batch = [
        label_message(verdict("tx-1"), offset=10),
        label_message(None, offset=11, key="tx-2"),
        label_message(verdict("tx-3"), offset=12),
    ]
    pending, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    client = FakeBulkClient(
        {
            "tx-1": {"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "current [12]"}},
            "tx-2": {"status": 404, "result": "not_found"},
        }
    )
    result = bulk_once(client, pending)  # type: ignore[arg-type]
    assert (result.acknowledged, result.stale, result.retry, result.rejected) == (3, 1, [], [])
    sent = client.requests[0]
    assert sent[0] == {
        "index": {"_index": "cg-labels-all", "_id": "tx-1", "version": 10, "version_type": "external_gte"}
    }
    assert sent[2] == {
        "delete": {"_index": "cg-labels-all", "_id": "tx-2", "version": 11, "version_type": "external_gte"}
    }


def test_a_version_conflict_on_an_unversioned_document_is_not_swallowed() -> None:
    client = FakeBulkClient({"alert-1": {"status": 409, "error": {"type": "version_conflict_engine_exception"}}})
    actions, _ = to_actions([message(f"{PREFIX}alerts", alert().encode())], index_prefix="cg", topic_prefix=PREFIX)
    result = bulk_once(client, actions)  # type: ignore[arg-type]
    assert (result.acknowledged, result.stale, len(result.rejected)) == (0, 0, 1)


def test_a_document_id_opensearch_cannot_take_is_dead_lettered_instead_of_blocking_the_batch() -> None:
    """OpenSearch refuses an ``_id`` over 512 bytes for the whole bulk request (400), not for its item: sent, it
    kept the batch, and every message after it, retried for ever."""
    longest, too_long = "t" * 512, "é" * 257  # 514 bytes in UTF-8, 257 characters
    batch = [
        message(tx_topic(), scored(longest).encode(), offset=0),
        message(tx_topic(), scored(too_long).encode(), offset=1),
        label_message(None, offset=2, key="x" * 513),  # a tombstone deletes by its key
    ]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [a.doc_id for a in actions] == [longest]
    assert [(d.offset, d.error_kind) for d in dead] == [(1, "invalid_id"), (2, "invalid_id")]
    assert dead[0].reason == "transaction_id is 514 bytes; OpenSearch takes at most 512 as a document id"
    assert too_long not in dead[0].reason


class RetentionCluster(PeriodIndices):
    """Period indices that a delete request removes as OpenSearch does: a name that is not there fails the whole
    request (404) unless ``ignore_unavailable``."""

    def __init__(self, names: list[str], gone_meanwhile: set[str]) -> None:
        super().__init__(names)
        self.gone_meanwhile = gone_meanwhile

    def delete(self, index: str, **params: Any) -> dict[str, Any]:
        from opensearchpy.exceptions import NotFoundError

        names = index.split(",")
        self.names = [n for n in self.names if n not in self.gone_meanwhile]  # deleted between listing and delete
        missing = [n for n in names if n not in self.names]
        if missing and not params.get("ignore_unavailable"):
            raise NotFoundError(404, "index_not_found_exception", {"error": {"index": missing[0]}})
        self.names = [n for n in self.names if n not in names]
        return {"acknowledged": True}


def test_retention_deletes_the_expired_indices_even_when_another_sink_deleted_one_of_them_first() -> None:
    """One expired index gone between listing and delete (another sink, the retention command run from cron)
    failed the whole delete request: the others stayed, while the command reported them deleted."""
    expired = ["cg-face_observations-2020.01.01", "cg-face_observations-2020.01.02", "cg-face_observations-2020.01.03"]
    cluster = RetentionCluster([*expired, "cg-face_observations-2026.11.22"], gone_meanwhile={expired[0]})
    doomed = apply_retention(cluster, "cg", IndicesSettings(), now_ms=1_795_305_600_000)  # type: ignore[arg-type]
    assert doomed == expired
    assert cluster.names == ["cg-face_observations-2026.11.22"]


class RefusesRequests(FakeBulkClient):
    """Refuses a whole bulk request, as OpenSearch does, when it holds the document ``bad`` (400, its request
    validation) or more than ``max_docs`` documents (413, a body over the domain's size limit)."""

    def __init__(self, bad: str, max_docs: int = 1000) -> None:
        super().__init__()
        self.bad, self.max_docs = bad, max_docs

    def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        from opensearchpy.exceptions import RequestError, TransportError

        lines = [json.loads(line) for line in body.splitlines() if line]
        ids = [meta["_id"] for line in lines for op, meta in line.items() if op in ("index", "delete")]
        if len(ids) > self.max_docs or self.bad in ids:
            self.requests.append(lines)  # the answered ones are kept by the base class
        if len(ids) > self.max_docs:
            raise TransportError(413, "Request Entity Too Large", "")
        if self.bad in ids:
            error = {"type": "action_request_validation_exception", "reason": "Validation Failed: 1: bad document;"}
            raise RequestError(400, error["type"], {"error": error, "status": 400})
        self.answers.append({})
        return super().bulk(body, *args, **kwargs)


def test_a_bulk_request_refused_as_a_whole_for_one_document_dead_letters_that_document_alone() -> None:
    """OpenSearch refuses some documents for the whole request (400: its request validation; 413: the body over
    the domain's size limit): the batch was kept and retried unchanged for ever, and nothing after it indexed."""
    ids = [f"tx-{n}" for n in range(10)]
    client = RefusesRequests(bad="tx-6")
    result = bulk_once(client, actions_for(*ids), chunk_size=4)  # type: ignore[arg-type]
    assert result.retry == [] and result.problem is None
    assert result.acknowledged == 9
    assert [(d.dead_letter_id, d.error_kind) for d in result.rejected] == [(f"{tx_topic()}:0:6", "opensearch_rejected")]
    assert (
        result.rejected[0].reason
        == "OpenSearch 400 action_request_validation_exception: Validation Failed: 1: bad document;"
    )
    assert [len(r) // 2 for r in client.requests] == [4, 4, 2, 2, 1, 3]  # halved to the culprit, then on as before

    too_big = RefusesRequests(bad="none", max_docs=3)  # a smaller domain's request size limit
    result = bulk_once(too_big, actions_for(*ids), chunk_size=8)  # type: ignore[arg-type]
    assert (result.acknowledged, result.rejected, result.retry) == (10, [], [])


def test_a_bulk_request_refused_for_the_clusters_reasons_keeps_the_batch() -> None:
    from opensearchpy.exceptions import AuthorizationException

    client = FakeBulkClient(AuthorizationException(403, "security_exception", {}))
    pending = actions_for("tx-1", "tx-2")
    result = bulk_once(client, pending)  # type: ignore[arg-type]
    assert result.retry == pending and result.rejected == []


class DocumentStore(FakeBulkClient):
    """Documents by (index, id), written as OpenSearch writes them: ``index`` replaces, ``create`` of an id that
    is there is refused with a 409 version conflict, ``delete`` removes."""

    keeps_versions = False
    """Whether external versions are kept (:class:`VersionedStore`)."""

    def __init__(self) -> None:
        super().__init__()
        self.docs: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[tuple[str, str], int] = {}

    def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.splitlines() if line]
        self.requests.append(list(lines))
        items = []
        while lines:
            op, meta = next(iter(lines.pop(0).items()))
            key = (meta["_index"], meta["_id"])
            if op == "delete":
                items.append({op: {"_id": meta["_id"], "status": 200 if self.docs.pop(key, None) else 404}})
                continue
            source = lines.pop(0)
            version = meta.get("version", self.versions.get(key, 0) + 1)
            if op == "create" and key in self.docs:
                conflict = {"type": "version_conflict_engine_exception", "reason": "document already exists"}
                items.append({op: {"_id": meta["_id"], "status": 409, "error": conflict}})
                continue
            stale = meta.get("version_type") == "external_gte" and version < self.versions.get(key, 0)
            if self.keeps_versions and stale:
                conflict = {"type": "version_conflict_engine_exception", "reason": "current version is higher"}
                items.append({op: {"_id": meta["_id"], "status": 409, "error": conflict}})
                continue
            items.append({op: {"_id": meta["_id"], "status": 200 if key in self.docs else 201}})
            self.docs[key], self.versions[key] = source, version
        return {"errors": True, "items": items}


def observed(status: str, tx: str = "tx-1", **overrides: Any) -> FaceObservation:
    """A checkout observation of ``tx`` as the face stage sends it: a real one with its image and match, or an
    ``UNAVAILABLE`` one (the transaction came again too late to be snapshotted) with its reason alone."""
    real = status != "UNAVAILABLE"
    values: dict[str, Any] = dict(
        observation_id=f"checkout:{tx}",
        event_time=1_700_000_000_000,
        camera_serial="Q2MV-S1-L2",
        store_id="S1",
        lane_id="L2",
        transaction_id=tx,
        trigger="CHECKOUT",
        status=status,
        subject_id="subj-tx-9" if status == "MATCHED" else None,
        similarity=97.5 if status == "MATCHED" else None,
        quality=0.8 if real else None,
        image_ref=f"checkout/{tx}" if real else None,
        reason=None if real else "not snapshotted: 700 s late (limit 600 s)",
    )
    values.update(overrides)
    return FaceObservation(**values)


def index_into(store: DocumentStore, *records: FaceObservation) -> Any:
    """One batch of face observations through the sink's actions and one bulk round."""
    batch = [message(f"{PREFIX}face_observations", r.encode(), offset=n) for n, r in enumerate(records)]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    return bulk_once(store, actions)  # type: ignore[arg-type]


def test_a_late_unavailable_observation_never_replaces_the_real_one_of_the_same_id() -> None:
    """A transaction sent again after the face stage's lag limit (a replay, a redelivery) gets an ``UNAVAILABLE``
    observation under the same id: indexed over the real one, the analysts lost its image ref and match."""
    store, doc = DocumentStore(), ("cg-face_observations-2023.11.14", "checkout:tx-1")
    index_into(store, observed("MATCHED"))
    result = index_into(store, observed("UNAVAILABLE"))
    assert (result.acknowledged, result.kept, result.retry, result.rejected) == (1, 1, [], [])
    assert result.written == {}  # nothing was written: the metrics count no document
    kept = store.docs[doc]
    assert (kept["status"], kept["image_ref"], kept["subject_id"], kept["similarity"]) == (
        "MATCHED",
        "checkout/tx-1",
        "subj-tx-9",
        97.5,
    )
    again = index_into(store, observed("UNAVAILABLE"))  # replayed once more: still done, still kept
    assert (again.acknowledged, again.kept, again.rejected) == (1, 1, [])
    assert store.docs[doc]["status"] == "MATCHED"


def test_an_unavailable_observation_is_indexed_until_a_real_one_of_the_same_id_replaces_it() -> None:
    store, doc = DocumentStore(), ("cg-face_observations-2023.11.14", "checkout:tx-1")
    first = index_into(store, observed("UNAVAILABLE", reason="snapshot no_video: no footage"))
    assert (first.acknowledged, first.kept, dict(first.written)) == (1, 0, {"face_observations": 1})
    assert store.docs[doc]["status"] == "UNAVAILABLE"
    index_into(store, observed("NO_MATCH"))
    assert (store.docs[doc]["status"], store.docs[doc]["image_ref"]) == ("NO_MATCH", "checkout/tx-1")
    sent = [line for line in store.requests[0] + store.requests[1] if "_index" in next(iter(line.values()))]
    assert [next(iter(line)) for line in sent] == ["create", "index"]


def test_a_late_unavailable_observation_in_the_same_batch_does_not_supersede_the_real_one() -> None:
    store = DocumentStore()
    result = index_into(store, observed("NO_MATCH"), observed("UNAVAILABLE"), observed("UNAVAILABLE", tx="tx-2"))
    assert result.acknowledged == 2
    docs = {key[1]: source["status"] for key, source in store.docs.items()}
    assert docs == {"checkout:tx-1": "NO_MATCH", "checkout:tx-2": "UNAVAILABLE"}
    # and the other way round: the real observation after an UNAVAILABLE one of the batch wins
    store = DocumentStore()
    index_into(store, observed("UNAVAILABLE"), observed("MATCHED"))
    assert [source["status"] for source in store.docs.values()] == ["MATCHED"]


def test_a_version_conflict_is_taken_as_done_only_for_a_create_of_an_unavailable_observation() -> None:
    conflict = {"status": 409, "error": {"type": "version_conflict_engine_exception", "reason": "exists"}}
    client = FakeBulkClient({"checkout:tx-1": conflict})
    batch = [message(f"{PREFIX}face_observations", observed("NO_MATCH").encode())]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    result = bulk_once(client, actions)  # type: ignore[arg-type]
    assert (result.acknowledged, result.kept, len(result.rejected)) == (0, 0, 1)


class FaceStore(DocumentStore):
    """A :class:`DocumentStore` that also answers ``mget`` as OpenSearch does (source filtered to the fields
    asked for; an index that does not exist is an error of its document, not of the request)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[list[dict[str, Any]]] = []

    def mget(self, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        self.reads.append(body["docs"])
        out = []
        for doc in body["docs"]:
            key = (doc["_index"], doc["_id"])
            if not any(index == doc["_index"] for index, _ in self.docs):
                out.append({"_index": doc["_index"], "_id": doc["_id"], "error": {"type": "index_not_found_exception"}})
            elif key in self.docs:
                source = {k: v for k, v in self.docs[key].items() if k in doc["_source"]}
                out.append({"_index": doc["_index"], "_id": doc["_id"], "found": True, "_source": source})
            else:
                out.append({"_index": doc["_index"], "_id": doc["_id"], "found": False})
        return {"docs": out}


MATCHED_FACE = dict(
    face_status="MATCHED",
    face_subject_id="subj-tx-9",
    face_category="SUSPECT",
    face_similarity=97.5,
    face_matcher="local",
)
TX_DOC = ("cg-transactions-2023.11.14", "tx-1")


def decide_into(store: FaceStore, *records: ScoredTransaction) -> Any:
    """One batch of scored transactions through the sink's actions, its face read and one bulk round."""
    batch = [message(tx_topic(), r.encode(), offset=n) for n, r in enumerate(records)]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert dead == []
    keep_faces(store, actions)  # type: ignore[arg-type]
    return bulk_once(store, actions)  # type: ignore[arg-type]


REDECIDED_AT = 1_700_000_000_000 + 3_600_000
"""An hour after the sale: a job started without state decides it again."""


def test_a_transaction_decided_again_without_a_face_keeps_the_face_match_of_its_document() -> None:
    """A job started without state decides a transaction again with ``face_status`` ``UNAVAILABLE``: indexed as it
    is, the document lost the first decision's face match (status, watch-list subject, similarity)."""
    store = FaceStore()
    decide_into(store, scored(**MATCHED_FACE, risk_score=90, outcome="BLOCK", indicators={"velocity": 3.0}))
    again = scored(
        risk_score=40, outcome="REVIEW", indicators={"amount": 1.0}, rules_version="v2", decided_at=REDECIDED_AT
    )
    result = decide_into(store, again)
    assert (result.acknowledged, result.retry, result.rejected) == (1, [], [])
    doc = store.docs[TX_DOC]
    assert {name: doc[name] for name in MATCHED_FACE} == MATCHED_FACE
    # everything else is the new decision's, the old indicators included
    assert (doc["risk_score"], doc["outcome"], doc["indicators"], doc["rules_version"]) == (
        40,
        "REVIEW",
        {"amount": 1.0},
        "v2",
    )
    assert [next(iter(line)) for line in store.requests[1] if "_index" in next(iter(line.values()))] == ["index"]
    decide_into(store, again)  # replayed: the same document
    assert store.docs[TX_DOC] == doc


def test_a_live_faceless_decision_is_not_read_for_so_live_traffic_pays_no_face_read() -> None:
    """The read halved the sink's bulk rate in ``make bench``; a decision within a minute of its sale is a first one."""
    store = FaceStore()
    decide_into(store, scored(**MATCHED_FACE))
    decide_into(store, scored(transaction_id="tx-2"))  # live, faceless: written as it is, nothing read
    assert store.reads == []
    decide_into(store, scored(decided_at=REDECIDED_AT))  # an hour later: a re-decision, read
    assert len(store.reads) == 1 and store.docs[TX_DOC]["face_status"] == "MATCHED"


def test_a_new_face_result_still_replaces_the_old_one_and_a_faceless_first_decision_is_indexed_as_it_is() -> None:
    store = FaceStore()
    decide_into(store, scored(decided_at=REDECIDED_AT))  # a new index: its read answers index_not_found
    assert store.docs[TX_DOC]["face_status"] == "UNAVAILABLE"
    decide_into(store, scored(**MATCHED_FACE))
    decide_into(store, scored(face_status="NO_MATCH"))
    doc = store.docs[TX_DOC]
    assert (doc["face_status"], doc["face_subject_id"], doc["face_similarity"]) == ("NO_MATCH", None, None)
    assert len(store.reads) == 1  # only a decision without a face is read for


def test_a_faceless_decision_after_a_face_match_in_the_same_batch_keeps_that_match() -> None:
    store = FaceStore()
    decide_into(store, scored(**MATCHED_FACE), scored(risk_score=5, decided_at=REDECIDED_AT))
    doc = store.docs[TX_DOC]
    assert (doc["face_status"], doc["face_subject_id"], doc["risk_score"]) == ("MATCHED", "subj-tx-9", 5)


def test_a_failed_face_read_raises_so_the_batch_is_kept_instead_of_written_without_the_face() -> None:
    class Unreadable(FaceStore):
        def mget(self, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {
                "docs": [
                    {"_id": d["_id"], "error": {"type": "no_shard_available_action_exception"}} for d in body["docs"]
                ]
            }

    batch = [message(tx_topic(), scored(decided_at=REDECIDED_AT).encode())]
    actions = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)[0]
    with pytest.raises(TransportError):
        keep_faces(Unreadable(), actions)  # type: ignore[arg-type]


class VersionedStore(FaceStore):
    """A :class:`FaceStore` that keeps external versions as OpenSearch does: a write with ``version_type``
    ``external_gte`` below the document's version is refused (409); an unversioned one adds 1 to it."""

    keeps_versions = True


def test_a_late_batch_of_a_sink_that_lost_its_partition_does_not_put_an_older_decision_over_a_newer_one() -> None:
    """A rebalance while a bulk request is in flight (or a stalled sink resuming after another took over): the old
    owner's batch lands after the new owner's newer decision. Refused (409), counted stale, neither retried nor
    dead-lettered."""
    store = VersionedStore()
    older = scored(risk_score=90, outcome="BLOCK", decided_at=1_700_000_001_000)
    newer = scored(risk_score=10, outcome="APPROVE", decided_at=REDECIDED_AT)
    decide_into(store, newer)  # the new owner
    result = decide_into(store, older)  # the old owner's batch, late
    assert (result.acknowledged, result.stale, result.retry, result.rejected) == (1, 1, [], [])
    assert store.docs[TX_DOC]["outcome"] == "APPROVE" and store.versions[TX_DOC] == REDECIDED_AT


def test_writes_refused_as_stale_are_counted_by_route_kind_in_a_metric_and_warned_once_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 409 on a versioned write is the write done but not written: ``cg_skipped_total{reason=stale_<kind>}`` grows
    (not ``cg_records_out_total``), so an operator can alert on a clock running ahead or a re-created labels topic;
    the batch's one warning names kinds and counts, never an id."""
    from prometheus_client import REGISTRY

    from tests.unit.test_process_metrics import ConfirmingProducer, SinkConsumer  # it imports this module

    def read(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"stage": "opensearch-sink", **labels}) or 0.0

    series = [
        ("cg_skipped_total", {"reason": "stale_transactions"}),
        ("cg_skipped_total", {"reason": "stale_labels"}),
        ("cg_records_out_total", {"kind": "transactions"}),
        ("cg_records_out_total", {"kind": "labels"}),
    ]
    store = VersionedStore()
    sink = OpenSearchSink(Settings(), index_prefix="cg", client=store, backoff=Backoff(0.001, 0.002))  # type: ignore[arg-type]
    sink._consumer, sink._producer = SinkConsumer(), ConfirmingProducer()  # type: ignore[assignment]
    topic = {route.kind: route.topic.full_name("") for route in ROUTES}
    sink._process(
        [
            message(topic["transactions"], scored(decided_at=REDECIDED_AT).encode(), offset=0),
            message(topic["labels"], verdict("tx-9").encode(), offset=10, key=b"tx-9"),
        ]
    )
    before = [read(name, **labels) for name, labels in series]
    caplog.set_level("WARNING", logger="sinks.opensearch.sink")
    sink._process(  # the old owner's decision, late; a verdict of a re-created topic, its offset back near 0
        [
            message(topic["transactions"], scored(decided_at=1_700_000_001_000).encode(), offset=1),
            message(topic["labels"], verdict("tx-9", label=0).encode(), offset=3, key=b"tx-9"),
        ]
    )
    grown = [read(name, **labels) - b for (name, labels), b in zip(series, before, strict=True)]
    assert grown == [1, 1, 0, 0] and sink.stats.stale == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "OpenSearch refused writes as stale (their document holds a later version), not written: "
        "labels=1 transactions=1"
    ]
    assert "tx-" not in warnings[0]


def test_a_scored_transaction_replayed_or_decided_again_still_goes_in_with_its_decision_time_as_version() -> None:
    """Replays stay idempotent (the same record, the same version), from a re-created topic too (offsets are not
    the version); a later decision replaces the document; a pseudonymising write-back (unversioned) in between does
    not make the next decision stale."""
    store = VersionedStore()
    first = scored(risk_score=90, outcome="BLOCK", decided_at=1_700_000_001_000)
    assert decide_into(store, first).stale == 0
    assert decide_into(store, first).stale == 0  # replayed, at offset 0 again
    store.versions[TX_DOC] += 1  # an unversioned write-back (customer keys pseudonymised)
    result = decide_into(store, scored(risk_score=10, outcome="APPROVE", decided_at=REDECIDED_AT))
    assert (result.acknowledged, result.stale) == (1, 0) and store.docs[TX_DOC]["outcome"] == "APPROVE"
    sent = next(iter(store.requests[-1][0].values()))
    assert (sent["version"], sent["version_type"]) == (REDECIDED_AT, "external_gte")


def test_an_older_decision_later_in_the_same_batch_does_not_supersede_the_newer_one() -> None:
    """A redrive may send an old decision to the topic after a newer one: keeping the last of the batch would send
    only the old one, refused, and the newer one would never be written."""
    newer = scored(outcome="APPROVE", decided_at=REDECIDED_AT)
    older = scored(outcome="BLOCK", decided_at=1_700_000_001_000)
    batch = [message(tx_topic(), r.encode(), offset=n) for n, r in enumerate([newer, older])]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert [(a.op["_source"]["outcome"], a.op["version"]) for a in actions] == [("APPROVE", REDECIDED_AT)]


def test_a_scored_transaction_with_a_decision_time_before_1970_is_dead_lettered_not_sent() -> None:
    """OpenSearch refuses a negative version for the whole bulk request; it is dead-lettered before."""
    batch = [message(tx_topic(), scored(decided_at=-1).encode())]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert actions == [] and [d.error_kind for d in dead] == ["invalid_field"]


MALFORMED_READS = {
    "a document short": lambda docs: {"docs": docs[:-1]},
    "a document over": lambda docs: {"docs": [*docs, docs[0]]},
    "not a document": lambda docs: {"docs": ["oops" for _ in docs]},
    "not in request order": lambda docs: {"docs": docs[::-1]},
    "no docs": lambda docs: {"error": "proxy"},
    "not an object": lambda docs: ["oops"],
}


class GarbledReads(FaceStore):
    """Answers its first ``mget`` calls as ``garble`` says (what a proxy or a broken node may send), then right."""

    def __init__(self, *garble: Any) -> None:
        super().__init__()
        self.garble = list(garble)

    def mget(self, body: dict[str, Any], **kwargs: Any) -> Any:
        answer = super().mget(body, **kwargs)
        return self.garble.pop(0)(answer["docs"]) if self.garble else answer


@pytest.mark.parametrize("garble", MALFORMED_READS.values(), ids=MALFORMED_READS.keys())
def test_a_malformed_face_read_answer_is_a_failed_read_not_an_error_that_stops_the_sink(garble: Any) -> None:
    store = GarbledReads(garble)
    decide_into(store, scored(**MATCHED_FACE), scored("tx-2", **MATCHED_FACE))
    batch = [
        message(tx_topic(), scored(i, decided_at=REDECIDED_AT).encode(), offset=n)
        for n, i in enumerate(["tx-1", "tx-2"])
    ]
    actions = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)[0]
    with pytest.raises(TransportError):
        keep_faces(store, actions)  # type: ignore[arg-type]
    assert keep_faces(store, actions) == 2  # type: ignore[arg-type]


def test_the_sink_keeps_and_retries_a_batch_whose_face_read_answered_short_then_writes_it_with_the_face() -> None:
    from tests.unit.test_process_metrics import ConfirmingProducer, SinkConsumer  # it imports this module

    store = GarbledReads(MALFORMED_READS["a document short"])
    sink = OpenSearchSink(Settings(), index_prefix="cg", client=store, backoff=Backoff(0.001, 0.002))  # type: ignore[arg-type]
    consumer = SinkConsumer()
    sink._consumer, sink._producer = consumer, ConfirmingProducer()  # type: ignore[assignment]
    topic = next(route for route in ROUTES if route.kind == "transactions").topic.full_name("")
    sink._process([message(topic, scored(**MATCHED_FACE).encode(), offset=0)])
    sink._process([message(topic, scored(decided_at=REDECIDED_AT).encode(), offset=1)])
    assert (sink.stats.retries, sink.stats.faces_kept, sink.stats.batches) == (1, 1, 2)
    assert store.docs[TX_DOC]["face_status"] == "MATCHED"
    assert [(tp.topic, tp.offset) for tp in consumer.commits[-1]] == [(topic, 2)]


def test_face_keeping_never_touches_alerts_or_cases_so_a_forgotten_subjects_image_refs_stay_erased() -> None:
    """Only a transaction's decision fields are kept (a forget leaves them); the image refs a forget strips from
    alerts and cases are never read back into a newer write."""
    store = FaceStore()
    batch = [message(f"{PREFIX}alerts", alert().encode())]
    actions, _ = to_actions(batch, index_prefix="cg", topic_prefix=PREFIX)
    assert keep_faces(store, actions) == 0  # type: ignore[arg-type]
    assert store.reads == []
    assert not any(name in TRANSACTION_FACE_FIELDS for route in ROUTES for name in route.face_fields)


def test_shutdown_with_kafka_down_ends_within_the_stop_timeout_though_the_flush_and_the_close_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a stop the sink waited a fixed 5 s for Kafka to take its dead letters, then for its consumer's close as long
    as Kafka took: with the brokers down, past the supervisor's stop timeout, into its SIGKILL."""
    import threading
    import time

    from sinks.opensearch import sink as sink_module

    kafka_down = threading.Event()
    flushes: list[float] = []

    class DownProducer:
        def flush(self, timeout: float) -> int:
            flushes.append(timeout)
            kafka_down.wait(timeout)
            return 1

    class DownConsumer:
        def close(self) -> None:
            kafka_down.wait(10)

    def stopped(*_args: Any) -> None:
        raise sink_module._Stopped("stopped")  # SIGTERM while the templates were being installed

    settings = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 1.2},
        alerts={"stop_wait_s": 0.2},
    )
    monkeypatch.setattr(sink_module.kafka_clients, "consumer", lambda *a, **k: DownConsumer())
    monkeypatch.setattr(sink_module.kafka_clients, "producer", lambda *a, **k: DownProducer())
    sink = OpenSearchSink(settings, index_prefix="cg", client=object())  # type: ignore[arg-type]
    monkeypatch.setattr(sink, "_retry_until_done", stopped)
    started = time.monotonic()
    try:
        sink.run(threading.Event())
        took = time.monotonic() - started
    finally:
        kafka_down.set()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    assert flushes == [1.2], "Kafka gets CG_KAFKA__STOP_FLUSH_S for the dead letters, not a fixed 5 s"


def test_the_stops_deadline_counts_from_when_the_stop_was_asked_not_from_when_the_loop_got_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sink took its stop's deadline (1 s before the supervisor's SIGKILL) when its loop ended: a Kafka call in the
    loop that hung after SIGTERM (a synchronous commit, Kafka down) was not counted, and the flush and the close ran
    that much past the SIGKILL. The deadline counts from when the stop was asked."""
    import time

    from infra.processes import StopRequest
    from sinks.opensearch import sink as sink_module

    flushes: list[float] = []
    stop = StopRequest()

    class Producer:
        def flush(self, timeout: float) -> int:
            flushes.append(timeout)
            return 0

    class Consumer:
        def close(self) -> None:
            pass

    def hung(*_args: Any) -> None:
        stop.set()  # SIGTERM arrives while the loop waits on Kafka ...
        time.sleep(1.0)  # ... which answers only a second later
        raise sink_module._Stopped("stopped")

    settings = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 1.2},
        alerts={"stop_wait_s": 0.2},
    )
    monkeypatch.setattr(sink_module.kafka_clients, "consumer", lambda *a, **k: Consumer())
    monkeypatch.setattr(sink_module.kafka_clients, "producer", lambda *a, **k: Producer())
    sink = OpenSearchSink(settings, index_prefix="cg", client=object())  # type: ignore[arg-type]
    monkeypatch.setattr(sink, "_retry_until_done", hung)
    sink.run(stop)
    [flush] = flushes
    assert flush < 0.55, f"the flush may wait {flush:.2f}s; 0.5 s were left before 1 s before the SIGKILL"


def test_dead_letters_kafka_has_no_room_for_are_given_up_once_the_stop_is_asked_and_the_batch_left_uncommitted() -> (
    None
):
    """A batch's dead letters waited for room in the producer's full local queue (Kafka away) for ever, through the
    stop: SIGTERM then never ended the sink, and the supervisor's SIGKILL did. The wait ends once the stop is asked,
    as a retry's wait does (the batch is not committed, and is read again)."""
    import threading
    import time

    from infra.clients import kafka as kafka_clients
    from sinks.opensearch import sink as sink_module

    room = threading.Event()

    class FullProducer:
        def produce(self, topic: str, **record: Any) -> None:
            if not room.is_set():
                raise BufferError("Local: Queue full")

        def poll(self, timeout: float) -> int:
            time.sleep(timeout)
            return 0

        def flush(self, timeout: float) -> int:
            return 0

    sink = OpenSearchSink(Settings(), index_prefix="cg", client=object())  # type: ignore[arg-type]
    sink._producer = FullProducer()  # type: ignore[assignment]
    sink._stop = threading.Event()
    letter = kafka_clients.message_dead_letter(
        Message(topic="transactions", partition=0, offset=1, value=b"x"), "not_avro", "bad", stage="sink", failed_at=0
    )
    raised: list[BaseException] = []

    def publish() -> None:
        try:
            sink._publish_dead_letters([letter])
        except BaseException as exc:  # noqa: BLE001 - what ended it, checked below
            raised.append(exc)

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    time.sleep(0.3)
    sink._stop.set()  # SIGTERM while the dead letter waits for room
    worker.join(3)
    room.set()  # without the fix: lets the stuck publish end
    assert not worker.is_alive(), "the dead letter still waited for room after the stop"
    assert [type(e) for e in raised] == [sink_module._Stopped]


def test_a_consumer_error_is_logged_by_its_kafka_code_never_its_words(caplog) -> None:
    """The warning held the error's whole text, which a broker may fill with a value it refused."""
    from confluent_kafka import KafkaError

    sink = OpenSearchSink(Settings(), index_prefix="cg", client=object())  # type: ignore[arg-type]
    error = KafkaError(KafkaError._TRANSPORT, "refused shopper@example.com")
    with caplog.at_level("WARNING"):
        assert sink._usable([Message(topic="scored", partition=0, offset=1, error=error)]) == []
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["consumer error on scored: KafkaError _TRANSPORT"], said
