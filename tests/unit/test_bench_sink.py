"""``make bench``'s sink face-read stage (tests/bench/sink.py): its batches, built as the sink builds them, and its
figures; no OpenSearch."""

from __future__ import annotations

from typing import Any

import pytest

from sinks.opensearch.sink import TRANSACTION_FACE_FIELDS, keep_faces, lacks_face
from tests.bench.sink import ORDER, batch_actions, build_batches, report_rows, summarise


class FirstDecisions:
    """Answers the sink's ``mget`` from the first decisions the stage indexes before its timing."""

    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self.docs = docs

    def mget(self, body: dict[str, Any], **_: Any) -> dict[str, Any]:
        out = []
        for doc in body["docs"]:
            found = self.docs.get(doc["_id"])
            out.append({"_id": doc["_id"], "found": found is not None, "_source": found or {}})
        return {"docs": out}


def test_batches_hold_re_decisions_and_new_transactions_half_of_each_without_a_face() -> None:
    batches = build_batches(3, 8, customers=50)
    ids = [r.transaction_id for b in batches for r in b.records]
    assert len(ids) == len(set(ids)) == 24  # every timed batch has ids of its own
    for batch in batches:
        assert [r.transaction_id for r in batch.first] == [r.transaction_id for r in batch.records[::2]]
        assert all(r.face_status != "UNAVAILABLE" for r in batch.first)  # a first decision to keep the face of
        assert [r.face_status == "UNAVAILABLE" for r in batch.records] == [True, True, False, False] * 2


def test_the_sinks_actions_read_the_faces_of_the_faceless_re_decisions_alone_and_keep_theirs() -> None:
    [batch] = build_batches(1, 8, customers=50)
    actions = batch_actions(batch.records, index_prefix="benchsunit")
    assert len(actions) == 8
    assert all(a.op["_index"].startswith("benchsunit-transactions-") for a in actions)
    assert sum(lacks_face(a.op) for a in actions) == 2  # the faceless live half is not read
    first = {r.transaction_id: r.to_avro() for r in batch.first}
    expected = summarise(_runs(1), 8)["faces_kept_expected"]
    assert keep_faces(FirstDecisions(first), actions) == expected == 2  # type: ignore[arg-type]
    kept = actions[0].op["_source"]
    assert {f: kept[f] for f in TRANSACTION_FACE_FIELDS} == {
        f: first[actions[0].doc_id][f] for f in TRANSACTION_FACE_FIELDS
    }


def _runs(rounds: int, a_per_s: float = 1000.0, b_per_s: float = 800.0) -> list[dict[str, Any]]:
    rates = {"A": a_per_s, "B": b_per_s}
    return [
        {"side": s, "docs": 500, "seconds": 500 / rates[s], "per_s": rates[s], "read_s": 0.004, "faces_kept": 125}
        for s in ORDER * rounds
    ]


def test_the_ratio_is_b_over_a_per_round_with_its_spread_and_the_rows_show_it() -> None:
    runs = _runs(3)
    runs[4:8] = _runs(1, a_per_s=1000.0, b_per_s=500.0)  # a slow second round
    result = summarise(runs, 500)
    assert result["ratio_per_round"] == pytest.approx([0.8, 0.5, 0.8])
    assert (result["ratio_median"], result["ratio_min"], result["ratio_max"]) == pytest.approx((0.8, 0.5, 0.8))
    assert result["median_per_s"] == {"A": 1000.0, "B": 800.0}
    assert result["faces_kept_expected"] == 125
    rows = report_rows(result)
    assert rows[0][1] == "0.800 (0.500-0.800)"
    assert "3 A-B-B-A rounds" in rows[0][0]
    assert rows[1][1] == "1,000 / 800"
    assert rows[2][1] == "4.0"
    assert rows[3][1] == "125 / 125"
