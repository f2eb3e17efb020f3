"""A generated corpus of hostile records for every input of the pipeline, and valid ones to mix in.

Pure (no Kafka): the fault-injection suite (``test_chaos_e2e.py``) sends these to the real stack and
checks that each hostile record ends as a dead letter (or a 4xx) with its reason, and that no valid one
is lost or doubled. Each generator gives ``Hostile`` items naming what they are and which stages must
dead-letter them.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace

from schemas.codec import MAGIC
from schemas.records import (
    Alert,
    BotCommand,
    CameraEvent,
    DetectedObject,
    FaceObservation,
    LineItem,
    PosTransaction,
    RuleSetUpdate,
    WatchlistEntry,
)
from tests.builders import FACE_LEN

JOB, SINK, FACE_STAGE, WATCHLIST_SERVICE, SENDER = (
    "scoring-job",
    "opensearch-sink",
    "face_stage",
    "watchlist_service",
    "alert-sender",
)
OVERSIZED = 1_048_500
"""Just under the broker's default 1 MiB record limit: accepted, and its dead letter must still fit."""
NESTING = 100_000
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
"""The ends of an Avro ``long``: every time field takes them, and no clock, index name or message can show them."""
CONTROLS = "c\r\nBcc: thief@evil.test\x00\x1b[2J\u202e"
MQTT_TOPIC_CONTROLS = "c Bcc: thief@evil.test \u202e\u200b"
"""Control characters in a name: a mail header, a NUL, a terminal escape, a right-to-left override."""
PATH_IDS = ("x/../Q2XX-VICTIM-0001/reboot?", "../../etc/passwd", "a b", "id#frag", "%2e%2e", "\x00ctl", "é" * 3)


@dataclass(frozen=True)
class Hostile:
    """One hostile input: its label, bytes and the stages that must dead-letter it."""

    label: str
    key: bytes | None
    value: bytes | None
    stages: frozenset[str]


def generic(header_of: bytes, stages: set[str]) -> list[Hostile]:
    """Bytes no consumer of an Avro topic can use: wrong format, wrong schema, cut short, huge, nested."""
    body = header_of[10:] if len(header_of) > 10 else b""
    st = frozenset(stages)
    rnd = random.Random(7)
    return [
        Hostile("json_not_avro", b"k", b'{"transaction_id": "json-is-not-our-format"}', st),
        Hostile("random_bytes", b"k", bytes(rnd.randrange(256) for _ in range(512)), st),
        Hostile("empty", b"k", b"", st),
        Hostile("unknown_fingerprint", b"k", MAGIC + bytes(range(8)) + body, st),
        Hostile("truncated", b"k", header_of[: max(11, len(header_of) // 2)], st),
        Hostile("oversized", b"k", MAGIC + header_of[2:10] + b"\x00" * (OVERSIZED - 10), st),
        Hostile("deeply_nested_json", b"k", b"[" * NESTING + b"]" * NESTING, st),
        Hostile("magic_only", b"k", MAGIC, st),
    ]


def transaction(tx_id: str, now_ms: int, **changes: object) -> PosTransaction:
    base = PosTransaction(
        transaction_id=tx_id,
        event_time=now_ms,
        store_id="store-001",
        lane_id="lane-01",
        kind="SALE",
        amount=12.5,
        currency="EUR",
        cashier_id="c-1",
        items=(LineItem(sku="sku-1", category="grocery", quantity=1, unit_price=12.5),),
        customer_id="cust-1",
    )
    return replace(base, **changes)


def transactions(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile ``PosTransaction`` records: the job dead-letters them; the face stage ignores them."""
    now = now_ms or int(time.time() * 1000)
    good = transaction(f"{run}-ok", now).encode()
    out = generic(good, {JOB})
    bad: list[tuple[str, dict[str, object]]] = [
        ("amount_nan", {"amount": math.nan}),
        ("amount_inf", {"amount": math.inf}),
        ("amount_negative", {"amount": -5.0}),
        ("price_nan", {"items": (LineItem(sku="s", category="c", quantity=1, unit_price=math.nan),)}),
        ("quantity_negative", {"items": (LineItem(sku="s", category="c", quantity=-3, unit_price=1.0),)}),
        ("event_time_far_future", {"event_time": now + 10 * 365 * 86_400_000}),
        ("event_time_year_33658", {"event_time": 10**15}),
        ("event_time_negative", {"event_time": -1}),
        ("event_time_int64_max", {"event_time": INT64_MAX}),
        ("event_time_int64_min", {"event_time": INT64_MIN}),
        ("price_inf", {"items": (LineItem(sku="s", category="c", quantity=1, unit_price=math.inf),)}),
        ("quantity_zero", {"items": (LineItem(sku="s", category="c", quantity=0, unit_price=1.0),)}),
        ("store_id_controls", {"store_id": CONTROLS}),
        ("cashier_id_controls", {"cashier_id": CONTROLS}),
        ("currency_nul", {"currency": "E\x00R"}),
        ("currency_bad", {"currency": "€€€€"}),
        ("huge_store_id", {"store_id": "s" * 100_000}),
        ("sale_with_original", {"original_transaction_id": "tx-0"}),
        ("category_200k", {"items": (LineItem(sku="s", category="c" * 200_000, quantity=1, unit_price=12.5),)}),
        ("sku_controls", {"items": (LineItem(sku=CONTROLS, category="c", quantity=1, unit_price=12.5),)}),
        ("product_category_200k", {"product_category": "p" * 200_000}),
        ("card_token_500k", {"card_token": "t" * 500_000}),
        ("customer_email_300", {"customer_email": "m" * 300 + "@example.com"}),
        ("ip_address_200k", {"ip_address": "1" * 200_000}),
        ("billing_state_200k", {"billing_state": "s" * 200_000}),
    ]
    bad += [(f"store_id_path_{i}", {"store_id": v}) for i, v in enumerate(PATH_IDS)]
    bad += [(f"lane_id_path_{i}", {"lane_id": v}) for i, v in enumerate(PATH_IDS)]
    bad += [(f"tx_id_path_{i}", {"transaction_id": f"{run}-{v}"}) for i, v in enumerate(PATH_IDS)]
    bad += [("customer_id_path", {"customer_id": "../x"})]
    for i, (label, changes) in enumerate(bad):
        changes = {"transaction_id": f"{run}-bad-{i}", **changes}
        out.append(Hostile(label, b"store-001/lane-01", transaction("", now, **changes).encode(), frozenset({JOB})))
    return out


EMBEDDING = [0.01 * (i % 17) for i in range(FACE_LEN)]  # the configured embedder's length


def face_observations(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile ``FaceObservation`` records (the job joins them; the sink indexes them)."""
    now = now_ms or int(time.time() * 1000)
    good = FaceObservation(
        observation_id=f"checkout:{run}-fo",
        event_time=now,
        camera_serial="Q2MV-store-001-lane-01",
        store_id="store-001",
        trigger="CHECKOUT",
        status="NO_MATCH",
        lane_id="lane-01",
        transaction_id=f"{run}-fo",
        embedding=EMBEDDING,
    )
    out = generic(good.encode(), {JOB, SINK})
    semantic = [
        ("embedding_3_values", {"embedding": [0.1, 0.2, 0.3]}),
        ("embedding_nan", {"embedding": [math.nan] * FACE_LEN}),
        ("embedding_inf", {"embedding": [math.inf, *EMBEDDING[1:]]}),
        ("tx_id_path", {"transaction_id": "../../etc/passwd"}),
        ("event_time_zero", {"event_time": 0}),
        ("event_time_far_future", {"event_time": now + 10 * 365 * 86_400_000}),
    ]
    for i, (label, changes) in enumerate(semantic):
        rec = replace(good, observation_id=f"checkout:{run}-fo-{i}", **changes)  # type: ignore[arg-type]
        out.append(Hostile(label, b"Q2MV-store-001-lane-01", rec.encode(), frozenset({JOB})))
    for label, at in (("event_time_int64_max", INT64_MAX), ("event_time_int64_min", INT64_MIN)):
        rec = replace(good, observation_id=f"checkout:{run}-fo-{label}", event_time=at)
        out.append(Hostile(label, b"Q2MV-store-001-lane-01", rec.encode(), frozenset({JOB, SINK})))
    return out


def camera_events(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile ``CameraEvent`` records (the face stage reads them)."""
    now = now_ms or int(time.time() * 1000)
    good = CameraEvent(
        camera_serial="Q2MV-store-001-ENTRANCE",
        event_time=now,
        mqtt_topic="/merakimv/x/raw_detections",
        kind="RAW_DETECTIONS",
    )
    out = generic(good.encode(), {FACE_STAGE})
    for i, serial in enumerate(PATH_IDS):
        rec = replace(good, camera_serial=serial)
        out.append(Hostile(f"serial_path_{i}", b"x", rec.encode(), frozenset({FACE_STAGE})))
    people = tuple(DetectedObject(oid, "person", 0.1, 0.1, 0.5, 0.9) for oid in range(20_000))
    semantic: list[tuple[str, dict[str, object]]] = [
        ("people_20000_oversized", {"objects": people}),  # valid, over the size limit: 20 000 snapshots
        ("event_time_zero", {"event_time": 0}),
        ("event_time_negative", {"event_time": -1}),
        ("event_time_int64_min", {"event_time": INT64_MIN}),
        ("event_time_int64_max", {"event_time": INT64_MAX}),
        ("event_time_far_future", {"event_time": now + 10 * 365 * 86_400_000}),
        ("serial_controls", {"camera_serial": CONTROLS}),
    ]
    for label, changes in semantic:
        rec = replace(good, **changes)  # type: ignore[arg-type]
        out.append(Hostile(label, b"x", rec.encode(), frozenset({FACE_STAGE})))
    return out


def watchlist_entries(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile ``WatchlistEntry`` records (the job's broadcast state)."""
    now = now_ms or int(time.time() * 1000)
    good = WatchlistEntry(
        subject_id=f"subj-{run}",
        category="SUSPECT",
        embeddings=[EMBEDDING],
        reason="test",
        flagged_by="chaos@test",
        flagged_at=now,
    )
    out = generic(good.encode(), {JOB})
    semantic = [
        ("embedding_nan", {"embeddings": [[math.nan] * FACE_LEN]}),
        ("embedding_3_values", {"embeddings": [[0.1, 0.2, 0.3]]}),
        ("embedding_inf", {"embeddings": [[math.inf] * FACE_LEN]}),
        ("subject_path", {"subject_id": "../../x"}),
    ]
    for label, changes in semantic:
        rec = replace(good, **changes)  # type: ignore[arg-type]
        out.append(Hostile(label, rec.subject_id.encode(), rec.encode(), frozenset({JOB})))
    return out


def _default_rules() -> str:
    from jobs.scoring.rules import DEFAULT_RULESET

    text = DEFAULT_RULESET.read_text()
    assert "velocity_exceeded: 40" in text and "block_at: 85" in text, "the default rule set changed: update the corpus"
    return text


def rule_sets(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile rule-set updates: none may replace the rule set in force."""
    now = now_ms or int(time.time() * 1000)
    good = RuleSetUpdate(version=f"{run}-bad", yaml="version: x\n", published_at=now, published_by="chaos")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    yamls = {
        "yaml_syntax_error": "version: [unclosed\n",
        "yaml_billion_laughs": laughs,
        "yaml_deeply_nested": "[" * 10_000 + "]" * 10_000,
        "yaml_weight_nan": _default_rules().replace("velocity_exceeded: 40", "velocity_exceeded: .nan"),
        "yaml_weight_inf": _default_rules().replace("velocity_exceeded: 40", "velocity_exceeded: 1e400"),
        "yaml_threshold_huge": _default_rules().replace("block_at: 85", "block_at: 100000000000000000000000"),
        "yaml_python_tag": "!!python/object/apply:os.system ['true']\n",
        "yaml_huge": "x: " + "y" * 900_000,
    }
    out = generic(good.encode(), {JOB})
    for label, text in yamls.items():
        out.append(Hostile(label, b"active", replace(good, yaml=text).encode(), frozenset({JOB})))
    return out


def commands(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Hostile bot commands: unsigned, or naming ids that are paths (the watchlist service reads them)."""
    now = now_ms or int(time.time() * 1000)
    unsigned = BotCommand(command_id=f"{run}-cmd", issued_at=now, verb="FRAUD", argument="tx-1", actor="x@evil.test")
    out = generic(unsigned.encode(), {WATCHLIST_SERVICE})
    out.append(Hostile("unsigned_fraud", b"k", unsigned.encode(), frozenset({WATCHLIST_SERVICE})))
    forget = replace(unsigned, command_id=f"{run}-cmd-2", verb="FORGET", argument="../../subj")
    out.append(Hostile("unsigned_forget_path", b"k", forget.encode(), frozenset({WATCHLIST_SERVICE})))
    return out


def alerts(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Bytes on the alerts topic that neither the sender nor the sink can use."""
    now = now_ms or int(time.time() * 1000)
    good = Alert(
        alert_id=f"{run}-alert",
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=now,
        store_id="store-001",
        summary="chaos",
    )
    out = generic(good.encode(), {SENDER, SINK})
    injected = replace(good, alert_id=f"{run}-x\r\nBcc: thief@evil.test")  # a header injection into the mail
    out.append(Hostile("alert_id_header_injection", b"k", injected.encode(), frozenset({SENDER, SINK})))
    out.append(Hostile("alert_id_empty", b"k", replace(good, alert_id="").encode(), frozenset({SENDER, SINK})))
    out.append(
        Hostile("alert_id_over_512", b"k", replace(good, alert_id="a" * 600).encode(), frozenset({SENDER, SINK}))
    )
    for label, at in (("event_time_int64_max", INT64_MAX), ("event_time_int64_min", INT64_MIN)):
        rec = replace(good, alert_id=f"{run}-alert-{label}", event_time=at)
        out.append(Hostile(label, b"k", rec.encode(), frozenset({SENDER, SINK})))
    return out


def scored_transactions(run: str, now_ms: int | None = None) -> list[Hostile]:
    """Bytes on the scored topic the sink cannot use (the job's own output, so only bytes)."""
    return [h for h in generic(transaction(f"{run}-x", now_ms or 1).encode(), {SINK}) if h.label != "truncated"]


def mqtt_payloads() -> list[tuple[str, str, bytes]]:
    """(label, MQTT topic suffix after the prefix, payload) the camera bridge must dead-letter."""
    ok_serial = "Q2MV-store-001-ENTRANCE"
    raw = f"/merakimv/{ok_serial}/raw_detections"
    return [
        ("ts_1e20", raw, json.dumps({"ts": 1e20, "objects": []}).encode()),
        ("ts_huge_int", raw, b'{"ts": 100000000000000000000000, "objects": []}'),
        ("ts_negative", raw, json.dumps({"ts": -5, "objects": []}).encode()),
        ("ts_int64_max", raw, json.dumps({"ts": INT64_MAX, "objects": []}).encode()),
        ("ts_int64_min", raw, json.dumps({"ts": INT64_MIN, "objects": []}).encode()),
        ("ts_nan", raw, b'{"ts": NaN, "objects": []}'),
        ("ts_string", raw, json.dumps({"ts": "soon", "objects": []}).encode()),
        ("deeply_nested", raw, b"[" * NESTING + b"]" * NESTING),
        ("nested_objects", raw, b'{"ts": 1, "objects": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("not_json", raw, b"\xff\xfe not json"),
        ("huge", raw, b'{"ts": 1, "objects": [' + b'{"oid": 1, "type": "person"},' * 40_000 + b"{}]}"),
        ("oid_negative", raw, json.dumps({"ts": int(time.time() * 1000), "objects": [{"oid": -1}]}).encode()),
        ("counts_nan", f"/merakimv/{ok_serial}/0", b'{"ts": 1700000000000, "counts": {"person": NaN}}'),
        ("serial_path", "/merakimv/..%2F..%2Fx/raw_detections", json.dumps({"ts": 1, "objects": []}).encode()),
        # A topic name with U+0000 or a C0/C1 control is malformed MQTT: the broker drops the publisher's connection
        # and nothing reaches the bridge. What a broker does pass: a header-injection shape, a direction override.
        (
            "serial_controls",
            f"/merakimv/{MQTT_TOPIC_CONTROLS}/raw_detections",
            json.dumps({"ts": 1, "objects": []}).encode(),
        ),
        ("type_controls", raw, json.dumps({"ts": 1, "objects": [{"oid": 1, "type": CONTROLS}]}).encode()),
        ("coordinate_inf", raw, b'{"ts": 1700000000000, "objects": [{"oid": 1, "type": "person", "x0": Infinity}]}'),
    ]
