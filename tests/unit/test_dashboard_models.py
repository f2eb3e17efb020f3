"""The dashboard's Models view without a cluster: score histograms, the label join, ROC-AUC and drift rows."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from infra.settings import Settings
from schemas.model_artifact import TRAINED_IDS_FILE, TRAINED_IDS_SHA256, id_digest, trained_ids_sha256
from sinks.dashboard.app import Dashboard, create_app
from sinks.dashboard.queries import (
    LabelledRow,
    Window,
    auc_interval,
    drift_query,
    evaluate_models,
    labelled_rows,
    labels_page_query,
    models_query,
    roc_auc,
    scored_by_ids_query,
    shape_distributions,
    shape_drift,
)

HOUR_MS = 3_600_000


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """The definition: the share of (fraud, legit) pairs the fraud row wins, ties counting half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# --------------------------------------------------------------------------- ROC-AUC


def test_auc_is_the_mann_whitney_statistic_ties_counting_half() -> None:
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(2, 60)
        labels = [rng.random() < 0.3 for _ in range(n)]
        labels[0], labels[1] = True, False
        scores = [float(rng.choice(range(0, 1001, 50))) for _ in range(n)]  # coarse: many ties
        ints = [int(y) for y in labels]
        assert roc_auc(scores, ints) == pytest.approx(pairwise_auc(scores, ints))


def test_auc_extremes_and_undefined_cases() -> None:
    assert roc_auc([900, 800, 100, 50], [1, 1, 0, 0]) == 1.0
    assert roc_auc([100, 50, 900, 800], [1, 1, 0, 0]) == 0.0
    assert roc_auc([500, 500, 500], [1, 0, 0]) == 0.5
    assert roc_auc([900, 100], [1, 1]) is None  # no legitimate row
    assert roc_auc([900, 100], [0, 0]) is None
    assert roc_auc([], []) is None


def test_auc_interval_narrows_with_more_rows_and_stays_within_0_and_1() -> None:
    small = auc_interval(0.8, 6, 140)
    large = auc_interval(0.8, 600, 14_000)
    assert small[0] < large[0] < 0.8 < large[1] < small[1]
    low, high = auc_interval(0.97, 2, 5)
    assert 0.0 <= low < 0.97 and high == 1.0


def test_a_perfect_ranking_of_few_rows_gets_a_wide_interval_not_certainty() -> None:
    """Hanley & McNeil's error is 0 at an AUC of 1 or 0: 1 fraud row ranked above 3 legitimate ones (a 1-in-4
    chance at random) read "1.000-1.000"."""
    assert auc_interval(1.0, 1, 3)[0] < 0.5 and auc_interval(1.0, 1, 3)[1] == 1.0
    assert auc_interval(1.0, 3, 3)[0] < 0.9 and auc_interval(0.0, 3, 3) == (0.0, 1 - auc_interval(1.0, 3, 3)[0])
    assert 0.95 < auc_interval(1.0, 38, 286)[0] < 1.0  # many rows: narrow again


# --------------------------------------------------------------------------- distributions


def test_models_query_histograms_each_version_in_each_role_and_finds_the_newest_over_the_window_and_store() -> None:
    body = models_query(Window(1_000, 2_000, store="S3"))
    assert {"term": {"store_id": "S3"}} in body["query"]["bool"]["filter"]
    for role, score, version in (
        ("champion", "model_score", "model_version"),
        ("challenger", "challenger_score", "challenger_version"),
    ):
        versions = body["aggs"][f"{role}_versions"]
        assert versions["terms"] == {"field": version, "size": 10}
        assert versions["aggs"]["histogram"]["histogram"] == {
            "field": score,
            "interval": 50,
            "min_doc_count": 0,
            "extended_bounds": {"min": 0, "max": 950},
        }
        assert versions["aggs"]["stats"] == {"stats": {"field": score}}
        assert versions["aggs"]["latest"] == {"max": {"field": "event_time"}}
    newest_hit = body["aggs"]["newest"]["top_hits"]
    assert newest_hit["size"] == 1 and newest_hit["sort"] == [{"event_time": {"order": "desc"}}]
    assert newest_hit["_source"] == ["model_version", "challenger_version"]


def histogram(**counts: int) -> dict[str, Any]:
    return {"buckets": [{"key": float(k.lstrip("b")), "doc_count": v} for k, v in counts.items()]}


def version_bucket(version: str, rows: int, total: float, **counts: int) -> dict[str, Any]:
    return {"key": version, "doc_count": rows, "histogram": histogram(**counts), "stats": {"count": rows, "sum": total}}


def newest(champion: str | None, challenger: str | None = None) -> dict[str, Any]:
    """The ``newest`` top hit: the newest scored record's versions (none when no record)."""
    source = {"model_version": champion, "challenger_version": challenger}
    return {"hits": {"hits": [{"_source": source}] if champion else []}}


def test_distributions_have_twenty_bins_and_a_score_of_1000_counts_in_the_last() -> None:
    answer = {
        "hits": {"total": {"value": 120}},
        "aggregations": {
            "champion_versions": {
                "buckets": [version_bucket("gbm-b", 90, 19_110.0, b0=70, b50=10, b900=5, b950=3, b1000=2)]
            },
            "challenger_versions": {"buckets": [version_bucket("gbm-c", 40, 10_000.0, b0=20, b500=20)]},
            "newest": newest("gbm-b", "gbm-c"),
            "stores_all": {"ids": {"buckets": [{"key": "S2", "doc_count": 1}, {"key": "S1", "doc_count": 1}]}},
        },
    }
    page = shape_distributions(answer)
    assert page["scored"] == 120 and page["bin_width"] == 50
    assert page["bins"] == list(range(0, 1000, 50))
    champion = page["champion"]
    assert len(champion["counts"]) == 20 and sum(champion["counts"]) == 90
    assert (champion["counts"][0], champion["counts"][18], champion["counts"][19]) == (70, 5, 5)
    assert champion["mean"] == 212.3 and champion["version"] == "gbm-b" and champion["versions"] == {"gbm-b": 90}
    assert page["challenger"]["counts"][10] == 20 and page["challenger"]["rows"] == 40
    assert page["all_stores"] == ["S1", "S2"]


def test_after_a_promotion_each_roles_distribution_is_one_models_over_every_row_it_scored() -> None:
    """gbm-a decided 60 rows with gbm-b beside it, then gbm-b was promoted: 30 more rows, gbm-a beside it. The
    champion now is gbm-b, and its distribution is gbm-b's 90 scores, as challenger and as champion; pooling the
    champion field's 90 scores would mix two models' scales."""
    answer = {
        "hits": {"total": {"value": 90}},
        "aggregations": {
            "champion_versions": {
                "buckets": [
                    version_bucket("gbm-a", 60, 6_000.0, b100=60),
                    version_bucket("gbm-b", 30, 21_000.0, b700=30),
                ]
            },
            "challenger_versions": {
                "buckets": [
                    version_bucket("gbm-b", 60, 42_000.0, b700=60),
                    version_bucket("gbm-a", 30, 3_000.0, b100=30),
                ]
            },
            "newest": newest("gbm-b", "gbm-a"),
        },
    }
    page = shape_distributions(answer)
    assert (page["champion"]["version"], page["champion"]["rows"], page["champion"]["mean"]) == ("gbm-b", 90, 700.0)
    assert page["champion"]["counts"][14] == 90 and sum(page["champion"]["counts"]) == 90
    assert (page["challenger"]["version"], page["challenger"]["rows"], page["challenger"]["mean"]) == (
        "gbm-a",
        90,
        100.0,
    )
    assert page["champion"]["versions"] == {"gbm-a": 60, "gbm-b": 30}  # who held the role in the window
    # then ``promote --retire`` (or ``challenger --clear``): the newest record names no challenger, so none now
    answer["aggregations"]["newest"] = newest("gbm-b", None)
    retired = shape_distributions(answer)
    assert retired["champion"]["version"] == "gbm-b" and retired["challenger"]["version"] is None
    assert retired["challenger"]["rows"] == 0 and retired["challenger"]["versions"] == {"gbm-b": 60, "gbm-a": 30}


def test_a_remote_champions_fallback_answers_count_as_the_local_models_rows_not_as_the_champion() -> None:
    """A remote champion with the local model as its fallback: gbm-a stood in for it, then ``promote`` made gbm-b
    the local champion (the fallback) and gbm-a the challenger. The newest record is one of gbm-b's fallback
    answers: the champion is still the remote model, over its own rows; gbm-a is one model over its rows as
    challenger and as fallback, not two."""
    answer = {
        "hits": {"total": {"value": 105}},
        "aggregations": {
            "champion_versions": {
                "buckets": [
                    {**version_bucket("afd:det:1", 80, 40_000.0, b500=80), "latest": {"value": 5_000.0}},
                    {**version_bucket("local:gbm-a (fallback)", 20, 2_000.0, b100=20), "latest": {"value": 3_000.0}},
                    {**version_bucket("local:gbm-b (fallback)", 5, 3_500.0, b700=5), "latest": {"value": 6_000.0}},
                ]
            },
            "challenger_versions": {
                "buckets": [
                    version_bucket("local:gbm-b", 60, 42_000.0, b700=60),
                    version_bucket("local:gbm-a", 45, 4_500.0, b100=45),
                ]
            },
            "newest": newest("local:gbm-b (fallback)", "local:gbm-a"),
        },
    }
    page = shape_distributions(answer)
    champion, challenger = page["champion"], page["challenger"]
    assert (champion["version"], champion["rows"], champion["fallback_rows"], champion["mean"]) == (
        "afd:det:1",
        80,
        0,
        500.0,
    )
    assert (challenger["version"], challenger["rows"], challenger["fallback_rows"]) == ("local:gbm-a", 65, 20)
    assert challenger["counts"][2] == 65 and challenger["mean"] == 100.0
    assert champion["versions"]["local:gbm-a (fallback)"] == 20  # shown as such among the role's holders
    # the remote model answered nothing in the window: the champion's figures are its fallback's, said to be so
    for bucket in answer["aggregations"]["champion_versions"]["buckets"][:2]:
        bucket["key"] = "local:gbm-b (fallback)"
    alone = shape_distributions(answer)["champion"]
    assert (alone["version"], alone["rows"], alone["fallback_rows"]) == ("local:gbm-b", 165, 105)


def test_a_models_roc_auc_takes_its_fallback_answers_as_its_own_rows() -> None:
    labels = {f"tx-{i}": int(i % 2 == 0) for i in range(8)}
    hits = [hit(tx, 900 if labels[tx] else 100, None, ("local:gbm-a (fallback)", "-")) for tx in list(labels)[:4]]
    hits += [hit(tx, 500, 800 if labels[tx] else 200, ("afd:det:1", "local:gbm-a")) for tx in list(labels)[4:]]
    current = {"champion": "afd:det:1", "challenger": "local:gbm-a"}
    ev = evaluate_models(labelled_rows(hits, labels), None, current)
    challenger = ev["challenger"]
    assert (challenger["rows"], challenger["fallback_rows"], challenger["auc"]) == (8, 4, 1.0)
    assert (ev["champion"]["version"], ev["champion"]["rows"], ev["champion"]["fallback_rows"]) == ("afd:det:1", 4, 0)
    assert ev["paired"]["rows"] == 4


def test_no_challenger_and_no_data_give_zeros_not_errors() -> None:
    page = shape_distributions({"hits": {"total": {"value": 0}}, "aggregations": {}})
    for role in ("champion", "challenger"):
        assert page[role] == {
            "version": None,
            "rows": 0,
            "fallback_rows": 0,
            "mean": None,
            "versions": {},
            "counts": [0] * 20,
        }


# --------------------------------------------------------------------------- the label join


def test_label_pages_go_newest_verdict_first_and_continue_after_the_last_sort_key() -> None:
    first = labels_page_query(500)
    assert first["size"] == 500 and "search_after" not in first
    assert first["sort"] == [{"decided_at": {"order": "desc"}}, {"transaction_id": {"order": "asc"}}]
    assert first["query"]["bool"]["filter"] == [{"terms": {"label": [0, 1]}}]
    assert labels_page_query(500, [1_700_000_000_000, "tx-9"])["search_after"] == [1_700_000_000_000, "tx-9"]


def test_scored_lookup_is_by_id_inside_the_window_and_store() -> None:
    body = scored_by_ids_query(Window(5, 10, store="S1"), ["tx-1", "tx-2"])
    filters = body["query"]["bool"]["filter"]
    assert {"terms": {"transaction_id": ["tx-1", "tx-2"]}} in filters
    assert {"term": {"store_id": "S1"}} in filters
    assert filters[0]["range"]["event_time"]["gte"] == 5
    assert body["size"] == 2
    assert set(body["_source"]) == {
        "transaction_id",
        "model_score",
        "model_version",
        "challenger_score",
        "challenger_version",
    }


def hit(
    tx: str, champion: int | None, challenger: int | None = None, versions: tuple[str, str] = ("gbm-a", "gbm-b")
) -> dict[str, Any]:
    return {
        "_source": {
            "transaction_id": tx,
            "model_score": champion,
            "model_version": versions[0] if champion is not None else None,
            "challenger_score": challenger,
            "challenger_version": versions[1] if challenger is not None else None,
        }
    }


def test_evaluation_puts_champion_and_challenger_side_by_side_and_pairs_the_common_rows() -> None:
    labels = {"tx-1": 1, "tx-2": 1, "tx-3": 0, "tx-4": 0, "tx-5": 0, "tx-6": 1}
    hits = [
        hit("tx-1", 900, 950),
        hit("tx-2", 300, 800),  # the challenger ranks this fraud higher
        hit("tx-3", 400, 100),
        hit("tx-4", 100, 200),
        hit("tx-5", 50),  # scored before the challenger was loaded
        hit("tx-6", 700),
        hit("tx-unlabelled", 990, 990),  # no verdict: not joined
    ]
    rows = labelled_rows(hits, labels)
    assert [row.transaction_id for row in rows] == ["tx-1", "tx-2", "tx-3", "tx-4", "tx-5", "tx-6"]
    ev = evaluate_models(rows)
    assert (ev["labelled"], ev["fraud"]) == (6, 3)
    champion, challenger = ev["champion"], ev["challenger"]
    assert (champion["rows"], champion["fraud"], challenger["rows"], challenger["fraud"]) == (6, 3, 4, 2)
    assert champion["auc"] == pytest.approx(pairwise_auc([900, 300, 400, 100, 50, 700], [1, 1, 0, 0, 0, 1]), abs=1e-4)
    assert challenger["auc"] == 1.0
    assert champion["version"] == "gbm-a" and challenger["version"] == "gbm-b"
    assert champion["auc_low"] <= champion["auc"] <= champion["auc_high"]
    paired = ev["paired"]
    assert (paired["rows"], paired["fraud"], paired["champion_auc"], paired["challenger_auc"]) == (4, 2, 0.75, 1.0)
    assert paired["champion_auc_low"] < 0.75 < paired["champion_auc_high"] and paired["challenger_auc_low"] < 1.0


def test_evaluation_without_labels_or_without_one_class_has_no_auc() -> None:
    empty = evaluate_models([])
    assert empty["champion"] == {
        "rows": 0,
        "fraud": 0,
        "auc": None,
        "auc_low": None,
        "auc_high": None,
        "version": None,
        "fallback_rows": 0,
        "in_training": None,
    }
    only_fraud = [
        LabelledRow(f"tx-{i}", 1, {"champion": 900, "challenger": None}, {"champion": "a", "challenger": None})
        for i in range(3)
    ]
    assert evaluate_models(only_fraud)["champion"]["auc"] is None


def test_a_model_is_not_judged_on_the_rows_it_was_trained_on() -> None:
    """A challenger trained on field labels scores its own training rows well: they are left out of its
    ROC-AUC and of the paired comparison, not of the champion's."""
    labels = {"tx-1": 1, "tx-2": 1, "tx-3": 0, "tx-4": 0, "tx-5": 1, "tx-6": 0}
    hits = [hit(tx, 500, 500) for tx in labels]
    for h in hits:
        h["_source"]["challenger_version"] = "local:gbm-b"
    hits[1]["_source"]["challenger_score"] = 990  # tx-2: a training row, scored as learnt
    trained = {"local:gbm-b": frozenset(id_digest(tx) for tx in ("tx-2", "tx-3"))}
    ev = evaluate_models(labelled_rows(hits, labels), trained.get)
    assert (ev["challenger"]["rows"], ev["challenger"]["in_training"], ev["challenger"]["auc"]) == (4, 2, 0.5)
    assert (ev["champion"]["rows"], ev["champion"]["in_training"]) == (6, None)  # gbm-a's rows are not known
    assert ev["paired"]["rows"] == 4 and ev["paired"]["challenger_auc"] == 0.5
    assert evaluate_models(labelled_rows(hits, labels))["challenger"]["auc"] > 0.5  # without: flattered


def test_each_role_is_the_version_holding_it_now_without_its_own_training_rows() -> None:
    labels = {f"tx-{i}": int(i % 2 == 0) for i in range(8)}
    old, new = "local:gbm-a (fallback)", "local:gbm-c"  # the champion changed within the window
    hits = [hit(tx, 500, 500, (old if i < 4 else new, "local:gbm-b")) for i, tx in enumerate(labels)]
    trained = {
        old: frozenset({id_digest("tx-0")}),
        new: frozenset({id_digest("tx-1"), id_digest("tx-5")}),  # tx-1 was scored by the old one: not new's
        "local:gbm-b": frozenset({id_digest("tx-7")}),
    }
    current = {"champion": new, "challenger": "local:gbm-b"}
    ev = evaluate_models(labelled_rows(hits, labels), trained.get, current)
    assert (ev["champion"]["version"], ev["champion"]["rows"], ev["champion"]["in_training"]) == (new, 3, 1)
    assert (ev["challenger"]["rows"], ev["challenger"]["in_training"]) == (7, 1)  # only tx-7
    assert ev["paired"]["rows"] == 2  # tx-4 and tx-6: neither tx-5 nor tx-7
    calls: list[str | None] = []
    evaluate_models(labelled_rows(hits, labels), lambda v: calls.append(v) or None, current)  # type: ignore[func-returns-value]
    assert sorted(calls, key=str) == sorted([new, "local:gbm-b"], key=str)  # each version looked up once


def test_after_a_promotion_each_models_roc_auc_is_its_own_not_a_mix_of_two() -> None:
    """gbm-a and gbm-b both rank perfectly, on different scales. Five rows with gbm-a deciding and gbm-b beside
    it, then gbm-b promoted and five more. Pooling the champion field (gbm-a's then gbm-b's scores) read 0.75;
    each model over the rows it scored, in either role, is 1.0."""
    labels = {f"tx-{i}": int(i in (0, 1, 5, 6)) for i in range(10)}
    a = {tx: 60 if y else 40 for tx, y in labels.items()}  # gbm-a: low scores
    b = {tx: 900 if y else 800 for tx, y in labels.items()}  # gbm-b: high scores
    hits = [hit(tx, a[tx], b[tx], ("gbm-a", "gbm-b")) for tx in list(labels)[:5]]
    hits += [hit(tx, b[tx], a[tx], ("gbm-b", "gbm-a")) for tx in list(labels)[5:]]
    rows = labelled_rows(hits, labels)
    ev = evaluate_models(rows, current={"champion": "gbm-b", "challenger": "gbm-a"})
    assert (ev["champion"]["version"], ev["champion"]["rows"], ev["champion"]["auc"]) == ("gbm-b", 10, 1.0)
    assert (ev["challenger"]["version"], ev["challenger"]["rows"], ev["challenger"]["auc"]) == ("gbm-a", 10, 1.0)
    assert (ev["paired"]["rows"], ev["paired"]["champion_auc"], ev["paired"]["challenger_auc"]) == (10, 1.0, 1.0)
    pooled = roc_auc([float(h["_source"]["model_score"]) for h in hits], [labels[tx] for tx in labels])
    assert pooled == 0.75  # what the page showed before


def _artifact(root: Path, folder: str, version: str, *rows: str) -> Path:
    """An artifact folder as the view reads it: ``model.json``'s version and the training rows' digests."""
    (root / folder).mkdir()
    (root / folder / "model.json").write_text(json.dumps({"version": version}))
    (root / folder / TRAINED_IDS_FILE).write_text("".join(f"{id_digest(tx)}\n" for tx in rows))
    return root / folder


def test_the_view_finds_each_models_training_rows_in_its_artifact_folder(tmp_path) -> None:
    _artifact(tmp_path, "gbm-b", "gbm-b", "tx-001", "tx-002")
    board = Dashboard(Settings(model={"artifact_dir": tmp_path}), client=FakeCluster({}, {}))  # type: ignore[arg-type]
    assert board.trained_ids("local:gbm-b (fallback)") == {id_digest("tx-001"), id_digest("tx-002")}
    assert board.trained_ids("local:gbm-a") is None  # no such artifact here: nothing left out
    assert board.trained_ids("afd:detector:1") is None and board.trained_ids(None) is None
    assert board.trained_ids("local:../gbm-b") is None  # a stored version is never a path
    (_artifact(tmp_path, "gbm-c", "gbm-c") / TRAINED_IDS_FILE).unlink()
    (tmp_path / "gbm-c" / TRAINED_IDS_FILE).mkdir()  # unreadable as a file: unknown, not a broken page
    assert board.trained_ids("local:gbm-c") is None


def test_the_view_finds_the_training_rows_of_a_model_kept_under_another_folder_name(tmp_path) -> None:
    """A folder copied or renamed by hand and set through ``challenger``/``promote`` scores as ``local:<the version
    in its model.json>``: the view looked in the folder of that name only, so its training rows were "unknown" and
    counted in its ROC-AUC. It finds the folder as the registry does, by the version in ``model.json``."""
    _artifact(tmp_path, "prod-nov", "gbm-b", "tx-001", "tx-002")
    _artifact(tmp_path, "gbm-a", "gbm-x", "tx-009")  # named like another version, holding another model
    (tmp_path / "CURRENT").write_text("prod-nov\n")
    board = Dashboard(Settings(model={"artifact_dir": tmp_path}), client=FakeCluster({}, {}))  # type: ignore[arg-type]
    assert board.trained_ids("local:gbm-b") == {id_digest("tx-001"), id_digest("tx-002")}
    assert board.trained_ids("local:gbm-a") is None  # its folder's name is not its model
    assert board.trained_ids("local:gbm-x") == {id_digest("tx-009")}


def test_the_models_view_leaves_out_the_rows_the_artifacts_in_its_models_root_were_trained_on(tmp_path) -> None:
    labels = {f"tx-{i:03d}": int(i % 4 == 0) for i in range(12)}
    scores: dict[str, tuple[int | None, int | None]] = {tx: (100, 900 if y else 100) for tx, y in labels.items()}
    scores["tx-001"] = (100, 990)  # legitimate, scored high: below 1.0 until this training row is left out
    cluster = FakeCluster(labels, scores, versions=("local:gbm-a", "local:gbm-b"))
    board = Dashboard(Settings(model={"artifact_dir": tmp_path}), client=cluster)  # type: ignore[arg-type]
    before = board.models(Window(0, HOUR_MS))["evaluation"]
    assert before["challenger"]["in_training"] is None and before["challenger"]["auc"] < 1.0
    _artifact(tmp_path, "gbm-b", "gbm-b", "tx-001")
    after = board.models(Window(0, HOUR_MS))["evaluation"]
    assert (after["challenger"]["in_training"], after["challenger"]["rows"], after["challenger"]["auc"]) == (1, 11, 1.0)
    assert after["champion"]["in_training"] is None and after["champion"]["rows"] == 12
    assert after["paired"]["rows"] == 11


class FakeCluster:
    """Answers the Models view's searches from in-memory labels and scored documents, like OpenSearch:
    label pages by ``search_after``, scored documents by ``terms`` on the id (the window is ignored)."""

    def __init__(
        self,
        labels: dict[str, int],
        scores: dict[str, tuple[int | None, int | None]],
        versions: tuple[str, str] = ("gbm-a", "gbm-b"),
    ) -> None:
        self.labels = sorted(labels.items())  # sort key: decided_at is the same for all, then the id
        self.scores = scores
        self.versions = versions
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        self.requests.append((index, body))
        if index.endswith("-labels") and "sort" in body:
            after = (body.get("search_after") or [0, ""])[1]
            page = [(tx, y) for tx, y in self.labels if tx > after][: body["size"]]
            hits = [{"_source": {"transaction_id": tx, "label": y}, "sort": [0, tx]} for tx, y in page]
            return {"hits": {"hits": hits}}
        if index.endswith("-labels"):
            fraud = sum(y for _, y in self.labels)
            return {"hits": {"total": {"value": len(self.labels)}}, "aggregations": {"fraud": {"doc_count": fraud}}}
        if index.endswith("-model_drift"):
            return {"aggregations": {"models": {"buckets": []}}}
        terms = next((f["terms"]["transaction_id"] for f in body["query"]["bool"]["filter"] if "terms" in f), None)
        if terms is not None:
            return {"hits": {"hits": [hit(tx, *self.scores[tx], self.versions) for tx in terms if tx in self.scores]}}
        # the distributions query: only who holds each role now (every row is the newest here)
        challenged = any(challenger is not None for _, challenger in self.scores.values())
        aggregations = {"newest": newest(self.versions[0], self.versions[1] if challenged else None)}
        return {"hits": {"total": {"value": len(self.scores)}}, "aggregations": aggregations}


def test_the_view_joins_labels_page_by_page_and_reports_when_it_stopped_early() -> None:
    labels = {f"tx-{i:03d}": int(i % 4 == 0) for i in range(25)}
    scores: dict[str, tuple[int | None, int | None]] = {tx: (900 if y else 100, None) for tx, y in labels.items()}
    cluster = FakeCluster(labels, scores)
    board = Dashboard(Settings(), client=cluster)  # type: ignore[arg-type]
    board.max_labels = 10
    page = board.models(Window(0, HOUR_MS))
    assert page["labels"]["read"] == 10 and page["labels"]["truncated"] is True
    assert page["labels"]["total"] == 25
    assert page["evaluation"]["champion"]["rows"] == 10 and page["evaluation"]["champion"]["auc"] == 1.0
    assert page["evaluation"]["challenger"]["rows"] == 0

    board.max_labels = 100
    page = board.models(Window(0, HOUR_MS))
    assert page["labels"]["read"] == 25 and page["labels"]["truncated"] is False
    assert (page["evaluation"]["labelled"], page["evaluation"]["fraud"]) == (25, 7)


# --------------------------------------------------------------------------- drift


def test_drift_query_takes_the_latest_report_per_model_up_to_the_window_end_over_all_stores() -> None:
    window = Window(10 * HOUR_MS, 12 * HOUR_MS, store="S1")
    body = drift_query(window)
    assert body["query"] == {"range": {"hour_start": {"lt": 12 * HOUR_MS, "format": "epoch_millis"}}}
    assert "store_id" not in str(body)  # drift is measured over all stores
    models = body["aggs"]["models"]
    assert models["terms"]["field"] == "model_version"
    assert models["terms"]["order"] == {"newest": "desc"}
    assert models["aggs"]["latest"]["top_hits"]["sort"] == [{"hour_start": {"order": "desc"}}]
    overlap = models["aggs"]["in_window"]["filter"]["range"]["hour_start"]
    assert overlap == {"gte": 9 * HOUR_MS + 1, "lt": 12 * HOUR_MS}  # the hour that began before the window counts


def drift_bucket(version: str, hour: int, **report: Any) -> dict[str, Any]:
    source = {
        "report_id": f"drift:{version}:{hour}",
        "model_version": version,
        "hour_start": hour,
        "rows": 812,
        "late_rows": 0,
        "reference_rows": 340,
        "created_at": hour + 4_000_000,
        **report,
    }
    return {
        "key": version,
        "doc_count": 5,
        "latest": {"hits": {"hits": [{"_source": source}]}},
        "in_window": {"doc_count": 2, "alerts": {"doc_count": 1}},
    }


def test_drift_rows_show_score_psi_the_worst_features_and_the_alert() -> None:
    answer = {
        "aggregations": {
            "models": {
                "buckets": [
                    drift_bucket(
                        "gbm-b",
                        5 * HOUR_MS,
                        score_psi=0.31,
                        feature_psi={f"f{i}": i / 100 for i in range(12)} | {"amount": 0.42, "nan": float("nan")},
                        alert=True,
                    ),
                    drift_bucket("gbm-a", 4 * HOUR_MS, score_psi=0.05, feature_psi={}, alert=False),
                    {"key": "gbm-empty", "latest": {"hits": {"hits": []}}},
                ]
            }
        }
    }
    page = shape_drift(answer)
    assert [m["model_version"] for m in page["models"]] == ["gbm-b", "gbm-a"]
    b = page["models"][0]
    assert (b["score_psi"], b["score_band"], b["alert"], b["hour_start"]) == (0.31, "significant", True, 5 * HOUR_MS)
    assert [(w["feature"], w["psi"], w["band"]) for w in b["worst"]] == [
        ("amount", 0.42, "significant"),
        ("f11", 0.11, "moderate"),
        ("f10", 0.1, "moderate"),
        ("f9", 0.09, "stable"),
        ("f8", 0.08, "stable"),
    ]
    assert (b["hours_in_window"], b["alerts_in_window"], b["rows"], b["reference_rows"]) == (2, 1, 812, 340)
    a = page["models"][1]
    assert (a["score_band"], a["worst"], a["alert"]) == ("stable", [], False)
    assert page["thresholds"] == {"moderate": 0.1, "significant": 0.25}
    assert shape_drift({}) == {"models": [], "thresholds": {"moderate": 0.1, "significant": 0.25}}


# --------------------------------------------------------------------------- the page


def test_models_page_is_served_with_its_scripts_and_links_back_to_the_live_page() -> None:
    board = Dashboard(Settings(), client=FakeCluster({}, {}))  # type: ignore[arg-type]
    client = TestClient(create_app(Settings(), board), base_url="http://127.0.0.1:8050")  # no login: loopback only
    page = client.get("/models")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/common.js"></script>' in page.text
    assert '<script src="/static/models.js"></script>' in page.text
    assert 'data-path="/"' in page.text and 'data-path="/models"' in page.text
    assert 'data-path="/models"' in client.get("/").text
    empty = client.get("/api/models", params={"minutes": 60}).json()
    assert empty["evaluation"]["labelled"] == 0 and empty["labels"]["total"] == 0
    assert client.get("/api/drift", params={"minutes": 60}).json()["models"] == []


def test_the_view_reads_the_training_rows_of_an_intact_copy_when_the_first_copy_is_damaged(tmp_path) -> None:
    """Two folders hold one version: the first one's training rows cut short (their SHA-256 in model.json differs)
    left that model's rows "unknown", though the other copy holds them whole."""
    rows = "".join(f"{id_digest(tx)}\n" for tx in ("tx-001", "tx-002"))
    for folder in ("gbm-b", "prod-nov"):
        _artifact(tmp_path, folder, "gbm-b", "tx-001", "tx-002")
        meta = {"version": "gbm-b", TRAINED_IDS_SHA256: trained_ids_sha256(rows)}
        (tmp_path / folder / "model.json").write_text(json.dumps(meta))
    (tmp_path / "gbm-b" / TRAINED_IDS_FILE).write_text(rows[:17])  # the version's own folder, looked at first
    board = Dashboard(Settings(model={"artifact_dir": tmp_path}), client=FakeCluster({}, {}))  # type: ignore[arg-type]
    assert board.trained_ids("local:gbm-b") == {id_digest("tx-001"), id_digest("tx-002")}
