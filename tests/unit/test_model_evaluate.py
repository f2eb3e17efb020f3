"""Evaluation and the per-entity features (issue 13): rolling-origin folds, metrics, profiles in state."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import jobs.model.fraud_model as fm
import jobs.model.train as train_module
from infra.settings import Settings, get_settings
from jobs.model.fraud_model import (
    FEATURE_NAMES,
    FPR_ANCHORS,
    Calibration,
    DamagedArtifactError,
    LocalModel,
    ModelArtifactError,
    cross_validate,
    pr_auc,
    rolling_origin_folds,
    tpr_at_fpr,
)
from jobs.model.train import app, ensure_default_model, observe_all, synthetic_transactions
from jobs.scoring.features import (
    LINKED_FEATURES,
    PROFILE_FEATURES,
    PROFILE_KEY,
    STORES_REMEMBERED,
    CustomerProfile,
    identity_keys,
)
from jobs.scoring.scorer import CUSTOMERS, Scorer, ScoringState
from schemas.errors import CheckoutGuardError
from tests.builders import T0, sale
from tests.fraud_model import clean_settings, small_model

AFD_CSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fraud" / "afd_transactions_sample.csv"
needs_afd_csv = pytest.mark.skipif(not AFD_CSV.exists(), reason=f"shared fraud data absent ({AFD_CSV})")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@pytest.fixture(autouse=True)
def no_cg_environment(monkeypatch):
    """The commands read ``get_settings()``: give them the defaults, not CI's ``CG_*`` variables."""
    for name in [n for n in os.environ if n.startswith("CG_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# --- rolling-origin folds -----------------------------------------------------------------------


def test_rolling_origin_folds_never_train_on_their_own_window_or_later():
    rng = np.random.default_rng(11)
    times = np.sort(rng.integers(0, 50, 300))  # many equal timestamps, also across block edges
    folds = rolling_origin_folds(times, 5)
    assert len(folds) == 5
    windows = [w for _, w in folds]
    assert windows[0][0] == 50 and windows[-1][-1] == 299  # 6 blocks of 50: the first only trains
    assert np.array_equal(np.concatenate(windows), np.arange(50, 300))  # consecutive, disjoint
    for train, window in folds:
        assert len(train) > 0 and np.array_equal(train, np.arange(len(train)))  # a prefix of the past
        assert times[train].max() < times[window].min()  # strictly before: ties stay out of training
    assert [len(t) for t, _ in folds] == sorted(len(t) for t, _ in folds)


def test_rolling_origin_folds_refuse_rows_out_of_time_order_or_too_few():
    with pytest.raises(ValueError, match="time order"):
        rolling_origin_folds([3, 1, 2, 4], 1)
    with pytest.raises(ValueError, match="cannot make"):
        rolling_origin_folds([1, 2, 3], 5)


def test_cross_validation_scores_each_row_only_with_a_model_of_its_past():
    rng = np.random.default_rng(3)
    n = 600
    y = (rng.random(n) < 0.2).astype(np.int64)
    x = np.full((n, len(FEATURE_NAMES)), np.nan)
    x[:, FEATURE_NAMES.index("cust_count_24h")] = y * 2.0 + rng.normal(0, 0.5, n)  # learnable
    amounts = rng.lognormal(3, 1, n)  # the floor knows nothing here
    cv = cross_validate(x, y, np.arange(n), amounts, folds=5, rounds=40)
    report = cv.report
    assert np.isnan(cv.oof[:100]).all() and not np.isnan(cv.oof[100:]).any()  # the first block only trains
    assert len(report["folds"]) == 5 and report["pooled"]["model"]["rows"] == 500
    for fold in report["folds"]:
        assert fold["model"]["roc_auc"] > 0.9 and 0.3 < fold["floor"]["roc_auc"] < 0.7
        assert fold["model"]["rows"] == 100 and fold["train_rows"] == 100 * fold["fold"]
        assert set(fold["model"]) >= {"roc_auc", "roc_auc_ci95", "pr_auc", "at_fpr"}
    assert report["beats_floor_every_fold"] is True
    # a fold's rows are scored by a model that never saw them: labels flipped inside one window change
    # nothing before it, and that window's own scores neither
    flipped = y.copy()
    flipped[300:400] = 1 - flipped[300:400]
    other = cross_validate(x, flipped, np.arange(n), amounts, folds=5, rounds=40)
    np.testing.assert_array_equal(other.oof[:400], cv.oof[:400])
    assert not np.array_equal(other.oof[400:], cv.oof[400:])
    blind = cross_validate(x, y, np.arange(n), amounts, folds=5, rounds=40, drop=["cust_count_24h"])
    assert blind.report["pooled"]["model"]["roc_auc"] == pytest.approx(0.5, abs=0.1)  # nothing left to learn


def _fake_cv(pooled: dict[str, float], calls: list[str] | None = None):
    def fake(x, y, times, amounts, *, folds, seed, learner):
        if calls is not None:
            calls.append(learner)
        report = {"pooled": {"model": {"roc_auc": pooled[learner]}}, "settings": {"learner": learner}}
        return fm.CrossValidation(report, np.zeros(len(y)), [])

    return fake


@pytest.mark.parametrize(
    ("pooled", "chosen"),
    [
        ({"catboost": 0.85, "lightgbm": 0.90}, "lightgbm"),
        ({"catboost": 0.90, "lightgbm": 0.85}, "catboost"),
        ({"catboost": 0.880, "lightgbm": 0.889}, "catboost"),  # within the margin: a seed's luck, no switch
        ({"catboost": 0.880, "lightgbm": 0.880}, "catboost"),
        ({"catboost": math.nan, "lightgbm": math.nan}, "catboost"),  # no fold could score: nothing to switch for
    ],
)
def test_small_data_switches_to_lightgbm_only_when_it_cross_validates_clearly_better(monkeypatch, pooled, chosen):
    calls: list[str] = []
    monkeypatch.setattr(fm, "cross_validate", _fake_cv(pooled, calls))
    cv = fm.cross_validate_learners(np.zeros((300, 2)), np.zeros(300), np.arange(300), np.ones(300))
    assert sorted(calls) == ["catboost", "lightgbm"]
    assert cv.report["settings"]["learner"] == cv.report["learner_choice"]["chosen"] == chosen
    assert cv.report["learner_choice"]["pooled_roc_auc"].keys() == pooled.keys()


def test_large_data_cross_validates_lightgbm_alone(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(fm, "cross_validate", _fake_cv({"lightgbm": 0.9}, calls))
    n = fm.SMALL_DATA_ROWS
    cv = fm.cross_validate_learners(np.zeros((n, 2)), np.zeros(n), np.arange(n), np.ones(n))
    assert calls == ["lightgbm"] and "learner_choice" not in cv.report


def test_the_latest_folds_calibrate_with_enough_legitimate_rows():
    rng = np.random.default_rng(5)
    y = (np.arange(600) % 10 == 0).astype(np.int64)  # 90 legitimate rows in each block of 100
    x = rng.normal(size=(600, len(FEATURE_NAMES)))
    cv = cross_validate(x, y, np.arange(600), np.ones(600), folds=5, rounds=5)
    assert np.array_equal(cv.calibration_rows(y, min_legit=90), np.arange(500, 600))
    assert np.array_equal(cv.calibration_rows(y, min_legit=120), np.arange(400, 600))
    assert np.array_equal(cv.calibration_rows(y, min_legit=10_000), np.arange(100, 600))  # all there are


# --- metrics ------------------------------------------------------------------------------------


def test_the_fold_table_gives_each_windows_end_its_year_in_the_column():
    """The end's year was cut (``2025-12-20 10:00..01-05 14:00``): a window over New Year read as going backwards."""
    from datetime import UTC, datetime

    def ms(*when: int) -> int:
        return int(datetime(*when, tzinfo=UTC).timestamp() * 1000)

    metrics = {"rows": 40, "fraud": 4, "roc_auc": 0.9, "roc_auc_ci95": [0.8, 0.95], "pr_auc": 0.5, "at_fpr": {}}
    report = {
        "method": "rolling-origin cross-validation",
        "folds": [
            {
                "fold": 1,
                "from_ms": ms(2025, 12, 20, 10),
                "to_ms": ms(2026, 1, 5, 14),
                "train_rows": 100,
                "train_fraud": 9,
                "model": metrics,
                "floor": metrics,
            },
            {
                "fold": 2,
                "from_ms": ms(2026, 1, 5, 15),
                "to_ms": ms(2026, 1, 9, 8),
                "train_rows": 140,
                "train_fraud": 0,
                "skipped": "one class",
            },
        ],
        "pooled": {"model": metrics, "floor": metrics},
    }
    header, first, second = fm.format_evaluation(report).splitlines()[1:4]
    assert "2025-12-20 10:00..2026-01-05 14:00" in first and "2026-01-05 15:00..2026-01-09 08:00" in second
    column = header.index("train") + len("train")
    assert first.index("100 (9)") + len("100 (9)") == column == second.index("140 (0)") + len("140 (0)")


def test_pr_auc_on_small_known_cases():
    assert pr_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(1 / 2 + 1 / 2 * 2 / 3)
    assert pr_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.2, 0.1])) == pytest.approx(1 / 4 + 1 / 2 * 2 / 3)
    assert pr_auc(np.array([0, 1, 1, 0]), np.array([0.1, 0.8, 0.9, 0.2])) == 1.0
    assert pr_auc(np.array([0, 1, 0, 0, 1]), np.ones(5)) == pytest.approx(0.4)  # no ranking: the fraud share
    assert math.isnan(pr_auc(np.zeros(3), np.arange(3)))


def test_tpr_at_fpr_on_a_small_known_case():
    legit = np.arange(100) / 100  # 0.00 ... 0.99
    fraud = np.array([0.995, 0.985, 0.975, 0.5])
    y = np.r_[np.zeros(100), np.ones(4)].astype(np.int64)
    got = tpr_at_fpr(y, np.r_[legit, fraud])
    assert got["1%"] == {"tpr": 0.5, "fpr": 0.01, "prob_threshold": 0.98}
    assert got["2%"] == {"tpr": 0.75, "fpr": 0.02, "prob_threshold": 0.97}
    assert got["5%"]["tpr"] == 0.75 and got["5%"]["fpr"] == 0.05
    assert tpr_at_fpr(np.zeros(3), np.arange(3)) == {}


def test_calibration_is_monotone_and_fpr_consistent_on_the_out_of_fold_scores_it_was_fitted_on():
    meta = small_model().meta
    cal = Calibration.from_json(meta["calibration"])
    assert all(b > a for a, b in zip(cal.probs, cal.probs[1:], strict=False))
    grid = np.linspace(0, 1, 10_001)
    assert np.all(np.diff(cal.score(grid)) >= 0)
    assert cal.legit_rows > 1000  # the last fold's legitimate rows
    by_score = meta["metrics"]["latest_folds_out_of_fold"]["by_score"]
    for score, fpr in FPR_ANCHORS:
        if str(score) in by_score:
            assert by_score[str(score)]["fpr"] == pytest.approx(fpr, abs=0.003), score


# --- per-entity profiles ------------------------------------------------------------------------


def _profiles(history):
    return [tx[PROFILE_KEY] for tx, _ in history.items]


def _same(a, b):
    return len(a) == len(b) and all(
        len(p) == len(q) and all(u == v or (u != u and v != v) for u, v in zip(p, q, strict=True))
        for p, q in zip(a, b, strict=True)
    )


def test_profile_features_are_deterministic_and_survive_persisting_the_state_midway():
    settings = clean_settings()
    txs = synthetic_transactions(3000, seed=21)
    once = observe_all(txs, settings)
    assert _same(_profiles(once), _profiles(observe_all(txs, settings)))
    assert all(len(p) == len(PROFILE_FEATURES) for p in _profiles(once))
    # The job's way: state changes handed over as writes, persisted, the job restarted from them.
    scorer = Scorer(settings)
    state, persisted = ScoringState(), {}
    got = []
    for n, tx in enumerate(txs):
        if n == 1500:
            # what Flink keeps: pickled values, read back into a new state
            maps = {
                name: {k: pickle.loads(pickle.dumps(v)) for (m, k), v in persisted.items() if m == name}
                for name in ("receipts", "stores", CUSTOMERS)
            }
            state = ScoringState.restore(maps["receipts"], maps["stores"], maps[CUSTOMERS])
        env = scorer.parse(tx.encode(), None, "transactions", 0, n, tx.event_time)
        out, writes = scorer.observe(env, state)
        for m, k, v in writes:
            if v is None:
                persisted.pop((m, k), None)
            else:
                persisted[(m, k)] = v
        got.append(out[0][PROFILE_KEY])
    assert _same(got, _profiles(once))
    assert any(k.startswith("ent:") for m, k in persisted if m == CUSTOMERS)


def test_linked_identities_are_profiled_in_the_customers_map_and_expire_with_it():
    settings = clean_settings()
    scorer, state = Scorer(settings), ScoringState()
    who = {"customer_id": "c-1", "customer_email": "a@x.com", "ip_address": "10.0.0.1", "user_agent": "UA/1"}
    first = scorer.parse(sale("t1", card="card-A", **who).encode(), None, "t", 0, 1, 0)
    out, writes = scorer.observe(first, state)
    keys = {k for m, k, _ in writes if m == CUSTOMERS}
    linked = {"ent:id:c-1", "ent:email:a@x.com", "ent:ip:10.0.0.1"}  # a user agent is no id
    assert keys == {"token:card-A", "ent:card:card-A", *linked}  # the card is the customer key, counted in too
    assert set(identity_keys(out[0])[0]) == linked
    link = dict(zip(LINKED_FEATURES, out[0][PROFILE_KEY][-len(LINKED_FEATURES) :], strict=True))
    assert link["link_identities"] == 3 and link["link_new"] == 3 and link["link_since_prev_s_min"] is None
    # Another card, half an hour later, from the same IP: the linked identities remember it.
    other = sale("t2", at_s=1800, card="card-B", ip_address="10.0.0.1", user_agent="UA/1", amount=40.0)
    out, _ = scorer.observe(scorer.parse(other.encode(), None, "t", 0, 2, 0), state)
    profile = dict(zip(PROFILE_FEATURES, out[0][PROFILE_KEY], strict=True))
    assert profile["cust_tx_before"] == 0 and profile["cust_since_prev_s"] is None  # a new card ...
    assert profile["link_identities"] == 1 and profile["link_new"] == 0  # ... on a known IP
    assert profile["link_since_prev_s_min"] == 1800 and profile["link_tx_before_max"] == 1
    assert profile["link_count_1h_max"] == pytest.approx(math.exp(-0.5))
    assert profile["link_sum_24h_max"] == pytest.approx(25.0 * math.exp(-1800 / 86400))
    # idle past the customers' retention: swept like any profile
    state.newest_event_ms = T0 + (settings.rules.customer_retention_days + 1) * DAY_MS
    removed = state.expire_customers(settings.rules.customer_retention_days * DAY_MS)
    assert {k for _, k, _ in removed} == keys | {"token:card-B", "ent:card:card-B"} and state.customers == {}


def test_window_counts_decay_and_out_of_order_events_read_the_newest_state():
    p = CustomerProfile()
    first = p.activity(T0, 10.0)
    assert first[:3] == (0.0, 0.0, None) and first[3:] == (0.0,) * 6
    before = p.activity(T0 + HOUR_MS, 30.0)
    tx_before, age, since, c1, c24, c7, s1, s24, s7 = before
    assert (age, since) == (pytest.approx(1 / 24), 3600.0)
    assert c1 == pytest.approx(math.exp(-1)) and c24 == pytest.approx(math.exp(-1 / 24))
    assert s7 == pytest.approx(10.0 * math.exp(-1 / 168))
    late = p.activity(T0 + HOUR_MS // 2, 5.0)  # arrives after the newer one: windows as of the newest
    assert late[2] == 0.0 and late[3] == pytest.approx(math.exp(-1) + 1)
    assert p.last == T0 + HOUR_MS and p.first == T0


def test_a_customer_profile_pickled_by_the_previous_version_restores():
    # pickle.dumps of CustomerProfile(recent=[1_700_000_000_000, 1_700_000_060_000], count=6, mean=42.5,
    # m2=120.0, stores={"store-001"}) by the code before the activity fields (protocols 2 and 5)
    old = [
        b"\x80\x02cjobs.scoring.features\nCustomerProfile\nq\x00)\x81q\x01N}q\x02(X\x06\x00\x00\x00recentq\x03]q"
        b"\x04(\x8a\x06\x00h\xe5\xcf\x8b\x01\x8a\x06`R\xe6\xcf\x8b\x01eX\x05\x00\x00\x00countq\x05K\x06X\x04\x00"
        b"\x00\x00meanq\x06G@E@\x00\x00\x00\x00\x00X\x02\x00\x00\x00m2q\x07G@^\x00\x00\x00\x00\x00\x00X\x06\x00"
        b"\x00\x00storesq\x08c__builtin__\nset\nq\t]q\nX\t\x00\x00\x00store-001q\x0ba\x85q\x0cRq\ru\x86q\x0eb.",
        b"\x80\x05\x95\x96\x00\x00\x00\x00\x00\x00\x00\x8c\x15jobs.scoring.features\x94\x8c\x0fCustomerProfile\x94"
        b"\x93\x94)\x81\x94N}\x94(\x8c\x06recent\x94]\x94(\x8a\x06\x00h\xe5\xcf\x8b\x01\x8a\x06`R\xe6\xcf\x8b\x01e"
        b"\x8c\x05count\x94K\x06\x8c\x04mean\x94G@E@\x00\x00\x00\x00\x00\x8c\x02m2\x94G@^\x00\x00\x00\x00\x00\x00"
        b"\x8c\x06stores\x94\x8f\x94(\x8c\tstore-001\x94\x90u\x86\x94b.",
    ]
    for data in old:
        p = pickle.loads(data)
        assert isinstance(p, CustomerProfile)
        assert (p.recent, p.count, p.mean, p.m2, p.stores) == (
            [1_700_000_000_000, 1_700_000_060_000],
            6,
            42.5,
            120.0,
            ["store-001"],  # kept as a set then: restored as the list of stores used
        )
        assert (p.first, p.last) == (1_700_000_000_000, 1_700_000_060_000)
        assert (p.c1h, p.s1h, p.c24h, p.s24h, p.c7d, p.s7d) == (0.0,) * 6
        assert not p.idle_since(1_700_000_060_000) and p.idle_since(1_700_000_060_001)
        tx = sale("t9", amount=50.0).to_avro() | {"event_time": 1_700_000_120_000}
        ind, customer = p.observe_profile(tx, Settings().rules)
        assert "amount_zscore" in ind and customer[0] == 6 and customer[2] == 60.0
        assert pickle.loads(pickle.dumps(p)) == p  # and the new shape round-trips


def test_a_store_visited_again_stays_known_past_the_customers_16th_store():
    """The 16 stores a customer used most recently are remembered (least recently used forgotten first): a 17th
    store is new once, not at every visit, and a store used again moves to the front."""
    rules = Settings().rules
    p = CustomerProfile()

    def new_store(store: str, i: int) -> bool:
        tx = sale(f"t{i}", store=store).to_avro() | {"event_time": T0 + i * 60_000}
        return "new_store_for_customer" in p.observe_profile(tx, rules)[0]

    assert [new_store(f"st-{i:02}", i) for i in range(16)] == [False] + [True] * 15
    assert not new_store("st-00", 16)  # used again: now the most recent
    assert new_store("st-16", 17) and not new_store("st-16", 18), "a 17th store is new once"
    assert not new_store("st-00", 19), "kept: used more recently than st-01"
    assert new_store("st-01", 20), "the least recently used went to make room"
    assert len(p.stores) == STORES_REMEMBERED


def test_a_customer_profile_saved_with_its_stores_as_a_set_restores_them():
    # pickle.dumps(CustomerProfile(recent=[1_700_000_000_000], count=16, mean=20.0, first=..., last=...,
    # stores={"st-00", ..., "st-15"}), protocol 5) by the code that kept the first 16 stores in a set
    saved = (
        b"\x80\x05\x95|\x01\x00\x00\x00\x00\x00\x00\x8c\x15jobs.scoring.features\x94\x8c\x0fCustomerProfile\x94"
        b"\x93\x94)\x81\x94N}\x94(\x8c\x06recent\x94]\x94\x8a\x06\x00h\xe5\xcf\x8b\x01a\x8c\x05count\x94K\x10\x8c"
        b"\x04mean\x94G@4\x00\x00\x00\x00\x00\x00\x8c\x02m2\x94G\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x06stores\x94"
        b"\x8f\x94(\x8c\x05st-14\x94\x8c\x05st-12\x94\x8c\x05st-13\x94\x8c\x05st-01\x94\x8c\x05st-00\x94\x8c\x05st"
        b"-06\x94\x8c\x05st-03\x94\x8c\x05st-09\x94\x8c\x05st-04\x94\x8c\x05st-10\x94\x8c\x05st-08\x94\x8c\x05st-0"
        b"7\x94\x8c\x05st-11\x94\x8c\x05st-15\x94\x8c\x05st-05\x94\x8c\x05st-02\x94\x90\x8c\x05first\x94\x8a\x06"
        b"\x00h\xe5\xcf\x8b\x01\x8c\x04last\x94\x8a\x06\x00h\xe5\xcf\x8b\x01\x8c\x03c1h\x94G\x00\x00\x00\x00\x00"
        b"\x00\x00\x00\x8c\x03s1h\x94G\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x04c24h\x94G\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x8c\x04s24h\x94G\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x03c7d\x94G\x00\x00\x00\x00\x00\x00\x00"
        b"\x00\x8c\x03s7d\x94G\x00\x00\x00\x00\x00\x00\x00\x00u\x86\x94b."
    )
    p = pickle.loads(saved)
    assert sorted(p.stores) == [f"st-{i:02}" for i in range(16)] and (p.count, p.mean) == (16, 20.0)
    rules = Settings().rules
    for i, store in enumerate(["st-07", "st-99", "st-99"]):
        tx = sale(f"t{i}", store=store).to_avro() | {"event_time": 1_700_000_060_000 + i}
        ind = p.observe_profile(tx, rules)[0]
        assert ("new_store_for_customer" in ind) == (i == 1), store
    assert len(p.stores) == STORES_REMEMBERED and p.stores[-2:] == ["st-07", "st-99"]
    assert pickle.loads(pickle.dumps(p)) == p


# --- the commands on the shared sample ---------------------------------------------------------


@needs_afd_csv
def test_evaluate_on_the_fraud_detector_sample_prints_pooled_auc_with_its_interval_and_the_floor(tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["evaluate", str(AFD_CSV), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "486 labelled (57 fraud)" in res.output
    pooled_line = next(line for line in res.output.splitlines() if line.strip().startswith("pooled"))
    assert "model: 0." in pooled_line and "floor: 0." in pooled_line and "-0." in pooled_line  # CI lo-hi
    report = json.loads(out.read_text())
    assert len(report["folds"]) == 5
    pooled = report["pooled"]
    assert (pooled["model"]["rows"], pooled["model"]["fraud"]) == (405, 38)
    lo, hi = pooled["model"]["roc_auc_ci95"]
    assert lo < pooled["model"]["roc_auc"] < hi
    assert pooled["model"]["roc_auc"] > pooled["floor"]["roc_auc"]  # measured 0.886 against 0.677
    assert 0 < pooled["model"]["pr_auc"] < 1 and set(pooled["model"]["at_fpr"]) == {"1%", "2%", "5%"}
    # the learner is chosen on these folds: both were cross-validated, and here the kept one also ranks higher
    choice = report["learner_choice"]
    assert choice["chosen"] == report["settings"]["learner"] == "catboost"  # measured 0.886 against 0.851
    assert pooled["model"]["roc_auc"] == max(choice["pooled_roc_auc"].values())
    assert set(choice["pooled_roc_auc"]) == {"catboost", "lightgbm"} and "learner: catboost, by pooled" in res.output


@pytest.mark.parametrize("args", [[], ["--seeds", "2"], ["--grid"]], ids=["plain", "seeds", "grid"])
def test_evaluate_with_every_fraud_row_in_the_last_folds_window_fails_with_the_reason_not_a_report_of_nothing(
    tmp_path, args
):
    """Every fold trains on the rows before its window; with all fraud rows in the last window each fold is
    skipped (one class): evaluate printed a report with no figure and exited 0, and wrote it as --json."""
    header = "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant\n"
    body = "".join(
        f"{int(n >= 55)},2023-01-{1 + n // 24:02d}T{n % 24:02d}:00:00Z,e{n},customer,c{n % 5},{10 + n},USD,fraud_A\n"
        for n in range(60)
    )
    data = tmp_path / "late-fraud.csv"
    data.write_text(header + body)
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["evaluate", str(data), "--folds", "3", "--json", str(out), *args])
    assert res.exit_code == 1 and isinstance(res.exception, CheckoutGuardError), res.output
    said = str(res.exception)
    assert said.startswith("no fold could be scored: every fold's training rows hold one class"), said
    assert "the first fraud row in event-time order is labelled row 56 of 60" in said and "first 45" in said
    assert not out.exists()


@needs_afd_csv
def test_evaluate_over_several_seeds_says_in_how_many_the_model_beat_the_floor(tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["evaluate", str(AFD_CSV), "--folds", "3", "--seeds", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    stability = json.loads(out.read_text())["seed_stability"]
    assert stability["seeds"] == 3 and len(stability["folds"]) == 3
    for fold in stability["folds"]:
        assert fold["roc_auc_min"] <= fold["roc_auc_mean"] <= fold["roc_auc_max"]
        assert 0 <= fold["seeds_above_floor"] <= 3
    above_all = stability["seeds_above_floor_in_every_fold"]
    assert above_all <= min(f["seeds_above_floor"] for f in stability["folds"])
    assert f"above the floor in every fold in {above_all} of 3 seeds" in res.output


@needs_afd_csv
def test_evaluate_grid_compares_the_candidate_settings(monkeypatch):
    # One row of each kind (the chosen settings, a learner override, a rounds override, features left out):
    # the whole grid cost a minute of CI and runs no more of the code.
    kinds = ["chosen settings", "CatBoost depth 3", "LightGBM, 100 rounds", "without customer-profile"]
    grid = tuple(row for row in train_module.GRID if row[0] in kinds)
    assert [row[0] for row in grid] == kinds
    monkeypatch.setattr(train_module, "GRID", grid)
    res = CliRunner().invoke(app, ["evaluate", str(AFD_CSV), "--grid", "--folds", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 2 + len(grid), res.output
    assert lines[1] == "learner chosen on these folds (rows without one use it): catboost"
    assert lines[2].startswith("chosen settings") and any("without customer-profile" in line for line in lines)


@pytest.mark.parametrize("option", [["--learner", "lightgbm"], ["--rounds", "50"]])
def test_evaluate_grid_refuses_a_learner_or_rounds_it_would_ignore(tmp_path, monkeypatch, option):
    """``evaluate --grid --learner lightgbm`` (or ``--rounds``) ran the whole grid, each row with its own learner and
    rounds, as if the option had not been given."""
    monkeypatch.setattr(train_module, "_grid", lambda *_args, **_kwargs: pytest.fail("the grid ran"))
    data = tmp_path / "data.csv"
    data.write_text("EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,order_price,payment_currency,merchant\n")
    res = CliRunner().invoke(app, ["evaluate", str(data), "--grid", *option])
    assert res.exit_code == 2, res.output
    assert f"leave {option[0]} out" in res.output


@needs_afd_csv
def test_evaluate_grid_runs_each_learner_it_names_and_gives_the_mean_over_seeds(tmp_path, monkeypatch):
    grid = (
        ("chosen settings", None, {}, None, ()),
        ("LightGBM", "lightgbm", {}, 200, ()),
    )
    monkeypatch.setattr(train_module, "GRID", grid)
    out = tmp_path / "grid.json"
    res = CliRunner().invoke(
        app, ["evaluate", str(AFD_CSV), "--grid", "--folds", "2", "--seeds", "2", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "learner chosen on these folds (rows without one use it): catboost" in res.output
    results = json.loads(out.read_text())
    assert [r["report"]["method"].rsplit(" ", 1)[-1] for r in results] == ["(catboost)", "(lightgbm)"]
    history = observe_all(train_module.csv_transactions(AFD_CSV), get_settings())
    for entry, result in zip(grid, results, strict=True):
        _, learner, params, rounds, _ = entry
        learner = learner or "catboost"  # the grid's rows without a learner take the one chosen on the folds
        pooled = [
            train_module.evaluate_history(history, folds=2, seed=seed, rounds=rounds, params=params, learner=learner)[
                1
            ].report["pooled"]["model"]["roc_auc"]
            for seed in (7, 8)
        ]
        assert pooled[0] != pooled[1]  # the seeds differ, so the mean is not one seed's figure
        assert result["pooled_roc_auc_mean_of_seeds"] == pytest.approx(np.mean(pooled))
        assert f"| {np.mean(pooled):.3f}" in res.output


# --- the default model --------------------------------------------------------------------------


def _champion_of_other_features(root) -> str:
    """A champion trained on an earlier feature list: whole, but this code cannot score with it."""
    stale = small_model().save(root)
    meta = json.loads((stale / "model.json").read_text())
    meta["feature_names"] = [*meta["feature_names"], "hour_utc"]  # an artifact of an earlier feature list
    meta["version"] = "gbm-old"
    meta["data"] = {**(meta.get("data") or {}), "source": "transactions-2026.csv"}  # an operator's model
    (root / "gbm-old").mkdir()
    (root / "gbm-old" / "model.json").write_text(json.dumps(meta))
    (root / "gbm-old" / "model.txt").write_text((stale / "model.txt").read_text())
    shutil.rmtree(stale)
    (root / "CURRENT").write_text("gbm-old\n")
    return "gbm-old"


def test_a_champion_of_other_features_is_not_replaced_unasked_and_train_default_force_replaces_it_audited(
    tmp_path, monkeypatch
):
    """At the job's start (and ``train-default``) a champion this code could not load was replaced by the synthetic
    default with no MODEL_PROMOTE event: a change of champion only ``promote`` (audited) makes. It now stops with the
    reason and the way to replace it; ``train-default --force`` replaces it with the audit event."""
    settings = Settings(model={"artifact_dir": tmp_path})
    old = _champion_of_other_features(tmp_path)
    sent = _audited(monkeypatch)
    monkeypatch.setattr(train_module, "train_default", lambda _settings: pytest.fail("replaced it unasked"))
    with pytest.raises(ModelArtifactError, match="other features.*not replace the champion gbm-old unasked.*--force"):
        ensure_default_model(settings)
    assert (tmp_path / "CURRENT").read_text().strip() == old and sent == []
    monkeypatch.setattr(train_module, "train_default", lambda _settings: small_model())
    monkeypatch.setenv("CG_MODEL__ARTIFACT_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["train-default"])  # the console's one Error: line is infra.cli's (exit 1)
    assert isinstance(result.exception, ModelArtifactError) and sent == [], result.output
    assert (tmp_path / "CURRENT").read_text().strip() == old
    result = CliRunner().invoke(app, ["train-default", "--force"])
    assert result.exit_code == 0, result.output
    assert sent == [(old, small_model().version, "train-default --force")]
    assert LocalModel.load(tmp_path).version == small_model().version


def test_an_earlier_synthetic_default_of_other_features_is_replaced_by_the_default_audited(tmp_path, monkeypatch):
    """A demo's models after an upgrade of the code: its champion is the synthetic default of the earlier feature list.
    Refusing it stopped ``make run`` until someone ran ``train-default --force``; it is replaced at the job's start,
    as ``--force`` replaces one (with the MODEL_PROMOTE event), an operator's model still never."""
    settings = Settings(model={"artifact_dir": tmp_path})
    old = _champion_of_other_features(tmp_path)
    meta = json.loads((tmp_path / old / "model.json").read_text())
    meta["data"] = {**(meta.get("data") or {}), "source": "synthetic:PosGenerator(seed=1)"}
    (tmp_path / old / "model.json").write_text(json.dumps(meta))
    sent = _audited(monkeypatch)
    monkeypatch.setattr(train_module, "train_default", lambda _settings: small_model())
    assert ensure_default_model(settings).name == small_model().version
    assert (tmp_path / "CURRENT").read_text().strip() == small_model().version
    reason = f"the synthetic default model {old} retrained for this code's features"
    assert sent == [(old, small_model().version, reason)]


def test_a_plain_train_default_replacing_an_earlier_synthetic_default_audits_why_not_force(tmp_path, monkeypatch):
    """A plain ``train-default`` (no ``--force``) that replaced an earlier synthetic default sent the MODEL_PROMOTE
    event with the reason "train-default --force", an option nobody gave, and did not say the champion changed."""
    old = _champion_of_other_features(tmp_path)
    meta = json.loads((tmp_path / old / "model.json").read_text())
    meta["data"] = {**(meta.get("data") or {}), "source": "synthetic:PosGenerator(seed=1)"}
    (tmp_path / old / "model.json").write_text(json.dumps(meta))
    sent = _audited(monkeypatch)
    monkeypatch.setattr(train_module, "train_default", lambda _settings: small_model())
    monkeypatch.setenv("CG_MODEL__ARTIFACT_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["train-default"])
    assert result.exit_code == 0, result.output
    reason = f"the synthetic default model {old} retrained for this code's features"
    assert sent == [(old, small_model().version, reason)], "no --force was given"
    assert f"champion: {small_model().version} (was {old})" in result.output


def test_the_default_model_does_not_take_over_from_a_champion_set_while_it_trained(tmp_path, monkeypatch):
    """With no champion at the start, the default became CURRENT after its training whatever was set meanwhile (a
    ``train --current``): that champion was replaced unaudited. It stays; the default is saved beside it."""
    from jobs.model.registry import write_pointer
    from tests.fraud_model import challenger_model

    settings = Settings(model={"artifact_dir": tmp_path})
    set_meanwhile = challenger_model().save(tmp_path, make_current=False).name

    def champion_set_meanwhile(_settings: Settings) -> object:
        write_pointer(tmp_path, "CURRENT", set_meanwhile)
        return small_model()

    monkeypatch.setattr(train_module, "train_default", champion_set_meanwhile)
    assert ensure_default_model(settings).name == set_meanwhile
    assert (tmp_path / "CURRENT").read_text().strip() == set_meanwhile
    assert (tmp_path / small_model().version / "model.json").is_file()


@pytest.mark.parametrize(
    "damage",
    [
        "model.json cut short",
        "model file cut short",
        "model file not there yet",
        "model.json not there yet",
        "CURRENT names no folder",
        "CURRENT empty",
    ],
)
def test_a_damaged_champion_is_not_replaced_by_a_retrained_default_model(tmp_path, monkeypatch, damage):
    """A champion caught mid-copy at the job's start was overwritten by the synthetic default, unaudited."""
    settings = Settings(model={"artifact_dir": tmp_path})
    champion = small_model().save(tmp_path)
    target = champion / ("model.json" if damage.startswith("model.json") else "model.txt")
    if damage.endswith("not there yet"):
        target.unlink()
    elif damage.endswith("cut short"):
        target.write_bytes(target.read_bytes()[:1000])
    else:
        champion.rename(tmp_path / "elsewhere")
        (tmp_path / "CURRENT").write_text("" if damage == "CURRENT empty" else champion.name)
    monkeypatch.setattr(train_module, "train_default", lambda _settings: pytest.fail("retrained over it"))
    with pytest.raises(DamagedArtifactError):
        ensure_default_model(settings)
    assert (tmp_path / "CURRENT").read_text().strip() == ("" if damage == "CURRENT empty" else champion.name)


def _audited(monkeypatch) -> list[tuple[str | None, str, str | None]]:
    from jobs.model import registry

    sent: list[tuple[str | None, str, str | None]] = []
    monkeypatch.setattr(registry, "_audit", lambda _s, old, new, _actor, reason, _t: sent.append((old, new, reason)))
    return sent


def test_train_default_force_replaces_the_champion_as_promote_does_with_its_audit_event(tmp_path, monkeypatch):
    """``train-default --force`` moved CURRENT with no MODEL_PROMOTE event, the one change of champion unaudited."""
    from jobs.model.registry import CHALLENGER, read_pointer, write_pointer
    from tests.fraud_model import challenger_model

    old = small_model().save(tmp_path).name
    write_pointer(tmp_path, CHALLENGER, "gbm-kept")
    new = challenger_model()
    monkeypatch.setattr(train_module, "train_default", lambda _settings: new)
    monkeypatch.setenv("CG_MODEL__ARTIFACT_DIR", str(tmp_path))
    sent = _audited(monkeypatch)
    result = CliRunner().invoke(app, ["train-default", "--force"])
    assert result.exit_code == 0, result.output
    assert sent == [(old, new.version, "train-default --force")]
    assert (read_pointer(tmp_path, "CURRENT"), read_pointer(tmp_path, CHALLENGER)) == (new.version, "gbm-kept")
    assert f"champion: {new.version} (was {old})" in result.output


def test_train_default_force_leaves_a_champion_promoted_while_it_trained(tmp_path, monkeypatch):
    """Its pointers are compared and swapped as promote's are: a promotion made during its training is not
    overwritten; it says what changed and exits 2, the new version saved beside."""
    from jobs.model.registry import CHALLENGER, read_pointer, write_pointer
    from tests.fraud_model import challenger_model

    old = small_model().save(tmp_path).name
    write_pointer(tmp_path, CHALLENGER, "gbm-other")
    new = challenger_model()

    def promoted_meanwhile(_settings: Settings) -> object:
        write_pointer(tmp_path, "CURRENT", "gbm-other")
        write_pointer(tmp_path, CHALLENGER, old)
        return new

    monkeypatch.setattr(train_module, "train_default", promoted_meanwhile)
    monkeypatch.setenv("CG_MODEL__ARTIFACT_DIR", str(tmp_path))
    sent = _audited(monkeypatch)
    result = CliRunner().invoke(app, ["train-default", "--force"])
    assert result.exit_code == 2, result.output
    assert f"champion {old} -> gbm-other" in result.output
    assert sent == []
    assert (read_pointer(tmp_path, "CURRENT"), read_pointer(tmp_path, CHALLENGER)) == ("gbm-other", old)
    assert (tmp_path / new.version / "model.json").is_file()
