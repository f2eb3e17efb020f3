"""The fraud model: one feature path with the job, FPR calibration, artifact, train and backtest."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from infra.settings import Settings, get_settings
from jobs.model.fraud_model import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    INCREASING_RISK,
    SMALL_DATA_ROWS,
    Calibration,
    LocalModel,
    ModelArtifactError,
    feature_matrix,
    feature_row,
    fit,
    learner_for,
    roc_auc,
    train_booster,
)
from jobs.model.labels import FieldLabels
from jobs.model.predictors import LocalPredictor
from jobs.model.train import (
    app,
    backtest_metrics,
    calibration_check,
    csv_transactions,
    format_calibration,
    labelled,
    main,
    makes_current,
    observe_all,
    synthetic_transactions,
    training_flags,
)
from jobs.scoring.features import PROFILE_FEATURES
from jobs.scoring.rules import DEFAULT_RULESET, FaceResult, RuleSetError
from jobs.scoring.scorer import Predictor, Scorer, ScoringState
from schemas.codec import codec, json_safe
from schemas.errors import CheckoutGuardError
from schemas.model_artifact import TRAINED_IDS_FILE, id_digest, read_trained_ids
from schemas.records import make_label
from tests.builders import return_of, sale
from tests.fraud_model import clean_settings, small_model

SETTINGS = clean_settings()
AFD_CSV = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fraud" / "afd_transactions_sample.csv"
needs_afd_csv = pytest.mark.skipif(not AFD_CSV.exists(), reason=f"shared fraud data absent ({AFD_CSV})")


@pytest.fixture(autouse=True)
def no_cg_environment(monkeypatch):
    """The commands read ``get_settings()``: give them the defaults, not CI's ``CG_*`` variables."""
    for name in [n for n in os.environ if n.startswith("CG_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class Recording(Predictor):
    """Records the feature vectors of exactly what the job hands its predictor."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def predict_batch(self, items):
        for tx, ind in items:
            self.rows[tx["transaction_id"]] = feature_row(tx, ind)
        return super().predict_batch(items)


def test_training_features_are_what_the_job_gives_its_predictor():
    txs = synthetic_transactions(6000, seed=5)  # 100 min of traffic: returns of sales over an hour old
    history = observe_all(txs, SETTINGS)
    # The job's path: bytes -> parse -> score (observe on state, then decide_batch -> predictor).
    recorder = Recording()
    scorer, state = Scorer(SETTINGS, predictor=recorder), ScoringState()
    for n, tx in enumerate(txs):
        env = scorer.parse(tx.encode(), None, "transactions", 0, n, tx.event_time + 5)
        scorer.score(env, state)
    job = np.array([recorder.rows[tx["transaction_id"]] for tx, _ in history.items], dtype=np.float64)
    train = feature_matrix(history.items)
    assert train.shape == (len(txs), len(FEATURE_NAMES))
    np.testing.assert_array_equal(train, job)  # NaN == NaN here
    # and the history is real: customers came back, returns found their receipts
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    assert np.nanmax(train[:, col["velocity"]]) > 1
    assert np.sum(~np.isnan(train[:, col["seconds_since_sale"]])) > 10
    assert np.sum(~np.isnan(train[:, col["amount_zscore"]])) > 100
    # the profile features are there too: customers and their linked identities came back
    profile = train[:, [col[name] for name in PROFILE_FEATURES]]
    assert not np.isnan(profile[:, PROFILE_FEATURES.index("cust_count_24h")]).any()
    assert np.nanmax(profile[:, PROFILE_FEATURES.index("cust_count_1h")]) > 1
    assert np.sum(~np.isnan(profile[:, PROFILE_FEATURES.index("link_since_prev_s_min")])) > 1000


def test_calibration_is_monotone_and_hits_its_fpr_anchors():
    legit = np.random.default_rng(1).beta(1, 30, 20_000)
    cal = Calibration.fit(legit)
    grid = np.linspace(0, 1, 5001)
    assert np.all(np.diff(cal.score(grid)) >= 0)
    assert cal.score(np.array([0.0, 1.0])).tolist() == [0, 1000]
    for score, fpr in ((600, 0.10), (900, 0.02), (950, 0.01)):
        assert np.mean(cal.score(legit) >= score) == pytest.approx(fpr, abs=0.002)


@pytest.mark.parametrize(
    "legit",
    [np.r_[np.full(990, 0.2), np.full(10, 1.0)], np.zeros(50), np.ones(50), np.linspace(0.0, 1.0, 7)],
    ids=["some at 1.0", "all 0", "all 1", "few"],
)
def test_every_calibration_fit_makes_is_one_the_load_accepts(legit):
    """``fit`` keeps its probabilities strictly rising with ``nextafter``, past 1.0 where legitimate rows
    score 1.0; the load's check must take what training wrote."""
    fitted = Calibration.fit(legit)
    assert Calibration.from_json(json.loads(json.dumps(fitted.to_json()))) == fitted


def test_calibration_holds_on_held_out_legitimate_traffic():
    model = small_model()
    # another seed: transactions the model never saw, after some history like its out-of-fold rows
    history = observe_all(synthetic_transactions(8000, seed=99), SETTINGS)
    items = history.items[int(len(history.items) * 0.3) :]
    labels = np.array([tx["label"] for tx, _ in items])
    scores = model.scores(feature_matrix(items))
    legit = scores[labels == 0]
    assert legit.size > 2000
    # Fitted on out-of-fold probabilities of models trained on fewer rows than the final one, which is
    # surer of itself: on new traffic the bands are conservative (measured 5.6 % of legitimate
    # transactions at >= 600, 1.0 % at >= 900), never looser than promised, and not degenerate.
    for score, fpr in ((500, 0.2), (600, 0.10), (700, 0.06), (800, 0.04), (900, 0.02), (950, 0.01)):
        assert fpr / 3 <= np.mean(legit >= score) <= fpr + max(0.2 * fpr, 0.004), score
    assert roc_auc(labels, scores) > 0.95


def test_artifact_round_trips_with_its_version_and_current_pointer(tmp_path):
    model = small_model()
    path = model.save(tmp_path)
    assert path.name == model.version and model.version.startswith("gbm-")
    assert (tmp_path / "CURRENT").read_text().strip() == model.version
    meta = json.loads((path / "model.json").read_text())
    assert meta["feature_names"] == list(FEATURE_NAMES) and meta["data"]["sha256"]
    assert "ROC-AUC" in (path / "metrics.txt").read_text()
    loaded = LocalModel.load(tmp_path)
    x = feature_matrix(observe_all(synthetic_transactions(300, seed=3), SETTINGS).items)
    np.testing.assert_array_equal(loaded.scores(x), model.scores(x))
    assert loaded.trained_ids() == model.trained_ids() and len(model.trained_ids() or ()) > 1000
    assert not any(len(d) != 16 for d in loaded.trained_ids() or ())  # digests, never the raw ids


@pytest.mark.parametrize("damage", ["cut short", "cut at a line", "not digests"])
def test_a_damaged_training_rows_file_reads_as_unknown_not_as_fewer_rows(tmp_path, damage):
    """Rows missing from a cut file would count as unseen, flattering the model in the backtest and on the
    dashboard: a damaged file reads as "cannot tell" (None), as a missing one does."""
    path = small_model().save(tmp_path)
    text = (path / TRAINED_IDS_FILE).read_text()
    if damage == "cut short":
        text = text[: len(text) // 3]
    elif damage == "cut at a line":
        text = text[: text.index("\n", len(text) // 3) + 1]
    else:
        text = "hello world\n"
    (path / TRAINED_IDS_FILE).write_text(text)
    assert read_trained_ids(path) is None
    meta = json.loads((path / "model.json").read_text())
    del meta["trained_ids_sha256"]  # an artifact saved before the digest: only the format is checked,
    (path / "model.json").write_text(json.dumps(meta))  # which a cut between two lines passes
    assert (read_trained_ids(path) is None) == (damage != "cut at a line")


def test_artifact_of_other_features_is_refused(tmp_path):
    path = small_model().save(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="other features"):
        LocalModel.load(path)
    with pytest.raises(ModelArtifactError, match="no model artifact"):
        LocalModel.load(tmp_path / "nothing-here")


def test_a_small_history_trains_catboost_whose_artifact_scores_the_same_after_loading(tmp_path):
    data = labelled(observe_all(synthetic_transactions(2500, seed=12), SETTINGS))
    assert 0 < data.y.sum() < len(data.y) < SMALL_DATA_ROWS
    model = fit(data.x, data.y, Calibration.fit(np.linspace(0.0, 1.0, 300)), rounds=60).model
    assert model.meta["learner"] == model.booster.learner == learner_for(len(data.y)) == "catboost"
    assert roc_auc(data.y, model.probabilities(data.x)) > 0.9  # it learnt the synthetic fraud patterns
    path = model.save(tmp_path)
    assert (path / "model.cbm").is_file() and not (path / "model.txt").exists()
    loaded = LocalModel.load(path)
    assert loaded.version == model.version and loaded.booster.learner == "catboost"
    np.testing.assert_array_equal(loaded.scores(data.x), model.scores(data.x))
    assert "catboost, 60 rounds" in (path / "metrics.txt").read_text()

    # Unknown and never-seen categories score (as the category's prior), they do not fail.
    odd = data.x[:20].copy()
    first_cat = FEATURE_NAMES.index(CATEGORICAL_FEATURES[0])
    odd[:10, first_cat:] = np.nan
    odd[10:, first_cat] = 987_654.0
    assert np.all(np.isfinite(loaded.probabilities(odd)))

    # The version hashes the model file: the same rows and seed give the same version (CatBoost's file
    # holds a random model id and the training clock unless they are removed).
    again = fit(data.x, data.y, Calibration.fit(np.linspace(0.0, 1.0, 300)), rounds=60).model
    assert again.version == model.version
    # ... and everything else the artifact holds: another calibration (a retrain with other --folds) is another
    # version, where it took the champion's name and replaced its folder.
    other = fit(data.x, data.y, Calibration.fit(np.linspace(0.0, 1.0, 301)), rounds=60).model
    assert other.version != model.version


def test_catboost_never_scores_more_velocity_as_safer():
    """Adversarial rows whose fraud *falls* as two constrained features grow: the model must still never
    score more of any ``INCREASING_RISK`` feature as safer (each swept over a grid on 200 rows). CatBoost's
    feature combinations carried constrained features unconstrained (measured here: probabilities fell
    by up to 0.015) until they were switched off."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1500, len(FEATURE_NAMES)))
    x[:, -len(CATEGORICAL_FEATURES) :] = rng.integers(0, 5, size=(1500, len(CATEGORICAL_FEATURES)))
    increasing = [FEATURE_NAMES.index(name) for name in sorted(INCREASING_RISK)]
    y = (-x[:, increasing[0]] - x[:, increasing[1]] + 0.3 * rng.normal(size=1500) > 0).astype(np.int64)
    booster = train_booster(x, y, seed=7, learner="catboost")
    for column in increasing:
        rows, previous = x[:200].copy(), None
        for value in np.linspace(-3.0, 3.0, 13):
            rows[:, column] = value
            p = booster.predict(rows)
            if previous is not None:
                assert np.all(p >= previous - 1e-12), f"{FEATURE_NAMES[column]}: {value} scored safer"
            previous = p


def test_an_artifact_written_before_catboost_loads_as_lightgbm_and_an_unknown_learner_is_refused(tmp_path):
    model = small_model()
    assert learner_for(model.meta["trained_on"]["rows"]) == model.booster.learner == "lightgbm"
    path = model.save(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    del meta["learner"]  # what every artifact written before CatBoost came in looks like
    (path / "model.json").write_text(json.dumps(meta))
    loaded = LocalModel.load(path)
    x = feature_matrix(observe_all(synthetic_transactions(300, seed=3), SETTINGS).items)
    assert loaded.booster.learner == "lightgbm"
    np.testing.assert_array_equal(loaded.scores(x), model.scores(x))
    meta["learner"] = "xgboost"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="no xgboost model file"):
        LocalModel.load(path)


def test_a_damaged_model_file_is_an_artifact_error_the_registry_can_report(tmp_path):
    data = labelled(observe_all(synthetic_transactions(1500, seed=13), SETTINGS))
    path = fit(data.x, data.y, Calibration.fit(np.linspace(0.0, 1.0, 300)), rounds=20).model.save(tmp_path)
    (path / "model.cbm").write_bytes((path / "model.cbm").read_bytes()[:100])
    with pytest.raises(ModelArtifactError, match="catboost model file .* is damaged"):
        LocalModel.load(path)
    meta = json.loads((path / "model.json").read_text())
    del meta["model_sha256"]  # an artifact saved before the digest: CatBoost's own parser refuses it
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="unreadable catboost model file"):
        LocalModel.load(path)


@pytest.mark.parametrize("digest", [True, False], ids=["with its digest", "saved before the digest"])
@pytest.mark.parametrize("share", [0.1, 0.5, 0.99])
def test_a_lightgbm_model_file_cut_short_is_an_artifact_error_not_a_crash(tmp_path, digest, share):
    """LightGBM's parser kills the process (segfault or abort) on a file cut short, e.g. one still being
    copied in: the load refuses it before parsing, so the job can keep its models."""
    path = small_model().save(tmp_path)
    data = (path / "model.txt").read_bytes()
    (path / "model.txt").write_bytes(data[: int(len(data) * share)])
    if not digest:
        meta = json.loads((path / "model.json").read_text())
        del meta["model_sha256"]
        (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="lightgbm model file .* is (damaged|cut short)"):
        LocalModel.load(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m.pop("version"),
        lambda m: m.update(version=""),
        lambda m: m["calibration"]["scores"].pop(),
        lambda m: m["calibration"]["probs"].reverse(),
        lambda m: m["calibration"]["probs"].__setitem__(2, float("nan")),
        lambda m: m["calibration"].update(probs=[], scores=[]),
        lambda m: m["calibration"]["scores"].__setitem__(-1, 5000.0),
        lambda m: m.pop("calibration"),
    ],
    ids=["no version", "empty version", "scores shorter", "probs reversed", "a NaN", "empty", "score 5000", "none"],
)
def test_a_damaged_model_json_is_an_artifact_error_at_load_not_every_later_score(tmp_path, damage):
    """A calibration that loads and then fails (or scores everything 1000) would cost every decision."""
    path = small_model().save(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    damage(meta)
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelArtifactError, match="version|calibration"):
        LocalModel.load(path)


@pytest.mark.parametrize("text", ["{not json", "[]", "\udcff"], ids=["not json", "a list", "not utf-8"])
def test_an_unreadable_model_json_is_an_artifact_error(tmp_path, text):
    path = small_model().save(tmp_path)
    (path / "model.json").write_bytes(b"\xff\xfe" if text == "\udcff" else text.encode())
    with pytest.raises(ModelArtifactError, match="model.json"):
        LocalModel.load(path)


def test_batch_scores_equal_one_by_one_scores():
    model = small_model()
    items = observe_all(synthetic_transactions(400, seed=4), SETTINGS).items
    batch = model.predict_batch(items)
    single = [model.predict_batch([item])[0] for item in items]
    assert [r.score for r in batch] == [r.score for r in single]
    assert all(r.version == f"local:{model.version}" for r in batch)


def test_return_at_another_store_by_another_customer_is_blocked_with_reasons():
    scorer = Scorer(SETTINGS, predictor=LocalPredictor(small_model()))
    state = ScoringState()
    scorer.score(
        scorer.parse(sale("s1", store="store-A", card="card-A", amount=450).encode(), None, "t", 0, 1, 0), state
    )
    env = scorer.parse(
        return_of("r1", "s1", at_s=900, store="store-B", card="card-Z", amount=450).encode(), None, "t", 0, 2, 0
    )
    out, _ = scorer.observe(env, state)
    result = scorer.decide_batch([out], [FaceResult(status="NO_FACE")])
    rows = result[0] if isinstance(result, tuple) else result
    scored = codec("ScoredTransaction").decode(next(v for t, _, v in rows if t == scorer.scored_topic))
    assert scored["outcome"] == "BLOCK" and scored["risk_score"] >= 85
    assert {"customer_mismatch", "cross_store_return", "suspicious_timing", "no_photo_verification"} <= set(
        scored["reasons"]
    )
    assert scored["model_score"] is not None and scored["model_version"].startswith("local:gbm-")
    assert scored["rules_version"] == scorer.rule_set.version
    assert any(t == scorer.alerts_topic for t, _, _ in rows)


@pytest.mark.parametrize(
    "args",
    [
        ["backtest", "{csv}", "--model", "{tmp}/no-models"],  # a missing model folder
        ["evaluate", "{tmp}/header-only.csv"],  # a CSV without the required columns
        ["backtest", "{tmp}/missing.csv"],  # a CSV that is not there
        ["evaluate", "{tmp}/missing.csv"],
        ["train", "{tmp}", "--out", "{tmp}/models"],  # a folder for a CSV
    ],
)
def test_the_model_commands_answer_a_bad_file_or_folder_with_one_line_and_exit_1(tmp_path, monkeypatch, capsys, args):
    (tmp_path / "header-only.csv").write_text("EVENT_LABEL,EVENT_TIMESTAMP\n")
    (tmp_path / "ok.csv").write_text("x\n")
    argv = [a.format(csv=tmp_path / "ok.csv", tmp=tmp_path) for a in args]
    monkeypatch.setattr("sys.argv", ["train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("Error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_figures_over_one_class_are_written_as_json_null_not_nan():
    report = {"roc_auc": float("nan"), "folds": [{"fpr": float("inf"), "rows": 3}], "band": (0.5, float("nan"))}
    assert json.loads(json.dumps(json_safe(report), allow_nan=False)) == {
        "roc_auc": None,
        "folds": [{"fpr": None, "rows": 3}],
        "band": [0.5, None],
    }


def test_a_plain_train_does_not_replace_the_jobs_champion(tmp_path):
    job, other = tmp_path / "models", tmp_path / "elsewhere"
    assert makes_current(job, job, None)  # no champion yet: the first model becomes it
    small_model().save(job)
    assert not makes_current(job, job, None) and not makes_current(tmp_path / "." / "models", job, None)
    assert makes_current(job, job, True)  # --current: as asked
    small_model().save(other)
    assert makes_current(other, job, None) and not makes_current(other, job, False)


def test_train_refuses_an_out_that_is_not_a_folder_before_training(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("x\n")  # no rows to train on: the --out check comes first
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(data)])
    assert res.exit_code == 2 and "is not a folder" in " ".join(res.output.replace("│", " ").split())


def test_backtest_refuses_to_write_its_decisions_over_its_input(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("x\n")
    res = CliRunner().invoke(app, ["backtest", str(data), "--output", str(tmp_path / "." / "data.csv")])
    assert res.exit_code == 2 and "overwrite" in res.output and data.read_text() == "x\n"


@needs_afd_csv
def test_evaluate_says_how_many_rows_it_rejected_and_why_before_anything_else(tmp_path):
    lines = AFD_CSV.read_text().splitlines()
    bad = [lines[0], *("yes" + line[line.index(",") :] for line in lines[1:4])]
    (tmp_path / "bad.csv").write_text("\n".join(bad) + "\n")
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "bad.csv")])
    assert res.exit_code != 0
    assert res.output.startswith("3 row(s) rejected and left out (first: ")
    assert "EVENT_LABEL 'yes' is not 1/0/fraud/legit/legitimate/empty" in res.output


@needs_afd_csv
def test_train_then_backtest_on_the_fraud_detector_sample(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(AFD_CSV), "--out", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    assert "trained on all 486 labelled rows (57 fraud)" in res.output
    assert "rolling-origin cross-validation, 5 folds over 486 labelled rows" in res.output
    assert "pooled" in res.output and "floor:" in res.output
    model = LocalModel.load(tmp_path / "models")
    assert (model.path / "metrics.txt").read_text().strip() == res.output[: res.output.index("artifact:")].strip()
    pooled = model.meta["evaluation"]["pooled"]
    assert (pooled["model"]["rows"], pooled["model"]["fraud"]) == (405, 38)  # every block but the first
    assert pooled["model"]["roc_auc"] > pooled["floor"]["roc_auc"] + 0.1  # measured 0.886 against 0.677
    assert model.meta["calibration"]["legit_rows"] == 228  # the last three folds' out-of-fold legitimate rows
    assert len(model.meta["evaluation"]["folds"]) == 5
    out = tmp_path / "decisions.csv"
    res = runner.invoke(app, ["backtest", str(AFD_CSV), "--model", str(tmp_path / "models"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1287 and len({r["EVENT_ID"] for r in rows}) == 1287
    assert {r["outcome"] for r in rows} <= {"APPROVE", "REVIEW", "BLOCK"}
    assert sum(1 for r in rows if r["EVENT_LABEL"] == "") == 801  # unlabelled rows are scored too
    metrics = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    assert metrics["all_labelled"]["rows"] == 486
    assert "in sample" in res.output  # its own training data: the out-of-fold figures are in the report
    assert metrics["in_training"]["rows"] == 486 and metrics["unseen"]["rows"] == 0
    assert {r["in_training"] for r in rows if r["EVENT_LABEL"] != ""} == {"1"}

    # A warm-up, as the job's CG_JOB__DECIDE_FROM: the earlier events build state only, and the later
    # ones are decided exactly as when every event was decided.
    warm_out = tmp_path / "warm.csv"
    args = ["backtest", str(AFD_CSV), "--model", str(tmp_path / "models"), "--output", str(warm_out)]
    res = runner.invoke(app, [*args, "--decide-from", "2023-02-01"])
    assert res.exit_code == 0, res.output
    with warm_out.open() as f:
        warm = {r["EVENT_ID"]: r for r in csv.DictReader(f)}
    later = {r["EVENT_ID"]: r for r in rows if r["EVENT_TIMESTAMP"] >= "2023-02-01"}
    assert 100 < len(warm) == len(later) < 1287 and warm == later
    assert f"{1287 - len(later)} earlier events only built state (warm-up)" in res.output


@needs_afd_csv
def test_backtest_scores_rows_the_model_never_saw_apart_from_its_training_rows(tmp_path):
    """A CSV holding the training rows and others (the way a new model is tried on fresh labels):
    only the others are out of sample -- rows held out of training, and rows unlabelled at training
    time that have a label now -- and they are reported on their own beside order_price."""
    with AFD_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    held_out = {r["EVENT_ID"] for r in rows if r["EVENT_LABEL"] != "" and r["EVENT_ID"][:2] in {"1e", "1f"}}
    train_csv = tmp_path / "train.csv"
    with train_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["EVENT_ID"] not in held_out)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(train_csv), "--out", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    labelled_since = [r for r in rows if r["EVENT_LABEL"] == ""][:30]
    for n, r in enumerate(labelled_since):  # field verdicts that arrived after training
        r["EVENT_LABEL"], r["LABEL_TIMESTAMP"] = ("1" if n % 10 == 0 else "0"), r["EVENT_TIMESTAMP"]
    later_csv = tmp_path / "later.csv"
    with later_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "decisions.csv"
    res = runner.invoke(app, ["backtest", str(later_csv), "--model", str(tmp_path / "models"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    unseen, new = metrics["unseen"], held_out | {r["EVENT_ID"] for r in labelled_since}
    assert unseen["rows"] == len(new) == 104 + 30 and metrics["in_training"]["rows"] == 486 - 104
    assert unseen["model"]["rows"] == unseen["floor"]["rows"] == 134 and unseen["fraud"] == unseen["model"]["fraud"]
    lo, hi = unseen["model"]["roc_auc_ci95"]
    assert lo <= unseen["model"]["roc_auc"] <= hi
    with out.open() as f:
        flags = {r["EVENT_ID"]: r["in_training"] for r in csv.DictReader(f)}
    assert {flags[i] for i in new} == {"0"}
    assert {flags[r["EVENT_ID"]] for r in rows if r["EVENT_LABEL"] != "" and r["EVENT_ID"] not in new} == {"1"}
    assert f"labelled rows the model never saw: 134 ({unseen['fraud']} fraud): model ROC-AUC" in res.output
    assert "order_price alone" in res.output


def test_backtest_metrics_split_training_rows_from_unseen_ones():
    def decision(tx: str, label: int, score: int, amount: float) -> dict:
        return {
            "transaction_id": tx,
            "label": label,
            "model_score": score,
            "outcome": "APPROVE",
            "amount": amount,
            "event_time": 1_700_000_000_000,
        }

    # the 12 training rows rank badly (fraud scores low), the 8 unseen ones perfectly
    decisions = [decision(f"t{i}", i % 2, 500 - 10 * i * (i % 2), 5.0 + i) for i in range(12)]
    decisions += [decision(f"u{i}", i % 2, 100 + 10 * i * (i % 2), 50.0 - i) for i in range(8)]
    decisions.append({**decision("unlabelled", 0, 1, 1.0), "label": None})
    flags = training_flags(decisions, frozenset(id_digest(f"t{i}") for i in range(12)))
    assert flags == [True] * 12 + [False] * 9
    metrics = backtest_metrics(decisions, flags)
    assert (metrics["all_labelled"]["rows"], metrics["in_training"]["rows"], metrics["unseen"]["rows"]) == (20, 12, 8)
    assert metrics["unseen"]["model"]["roc_auc"] == 1.0 and metrics["in_training"]["model"]["roc_auc"] < 0.5
    assert metrics["unseen"]["floor"]["roc_auc"] == roc_auc(np.array([0, 1] * 4), 50.0 - np.arange(8.0))  # 0.375
    assert "unseen" not in backtest_metrics(decisions) and training_flags(decisions, None) is None


def test_calibration_check_gives_the_legit_share_at_each_score_overall_and_per_month():
    nov, dec = 1_667_260_800_000, 1_669_852_800_000  # 2022-11-01, 2022-12-01 (UTC)

    def decision(label: int | None, score: int | None, t: int) -> dict:
        return {
            "transaction_id": f"t{t}",
            "label": label,
            "model_score": score,
            "event_time": t,
            "outcome": "APPROVE",
            "amount": 1.0,
        }

    # November's 4 legitimate rows all score high (new customers), December's 6 low; fraud rows and
    # unlabelled or unscored rows are not counted
    decisions = [decision(0, 950, nov + i) for i in range(4)] + [decision(0, 100 * i, dec + i) for i in range(6)]
    decisions += [decision(1, 990, nov + 10), decision(None, 990, nov + 11), decision(0, None, nov + 12)]
    check = calibration_check(decisions)
    assert check["promised_fpr"] == {"600": 0.10, "800": 0.04, "900": 0.02, "950": 0.01}
    assert check["legit_rows"] == 10 and check["share_at_or_above"]["600"] == 0.4
    assert list(check["by_month"]) == ["2022-11", "2022-12"]
    assert check["by_month"]["2022-11"] == {
        "legit_rows": 4,
        "share_at_or_above": dict.fromkeys(("600", "800", "900", "950"), 1.0),
    }
    assert check["by_month"]["2022-12"]["share_at_or_above"] == {"600": 0.0, "800": 0.0, "900": 0.0, "950": 0.0}
    table = format_calibration(check, "these rows").splitlines()
    assert table[2].split() == ["promised", "0.10", "0.04", "0.02", "0.01"]
    assert table[3].split() == ["all", "10", "0.40", "0.40", "0.40", "0.40"]
    assert table[4].split() == ["2022-11", "4", "1.00", "1.00", "1.00", "1.00"]
    assert backtest_metrics(decisions)["all_labelled"]["calibration"] == check


def _eight_labelled_rows(path: Path) -> Path:
    """A Fraud Detector CSV of 8 labelled rows (every other one fraud) over two days, three customers."""
    header = "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant\n"
    body = "".join(
        f"{n % 2},2023-01-0{1 + n // 4}T1{n % 4}:00:00Z,e{n},customer,c{n % 3},{10 + 90 * (n % 2)},USD,fraud_A\n"
        for n in range(8)
    )
    path.write_text(header + body)
    return path


def test_backtest_of_a_model_that_did_not_record_its_training_rows_says_it_cannot_tell(tmp_path):
    data = _eight_labelled_rows(tmp_path / "old.csv")
    model_dir = small_model().save(tmp_path / "models")
    (model_dir / TRAINED_IDS_FILE).unlink()  # an artifact from before the digests were kept
    out = tmp_path / "decisions.csv"
    res = CliRunner().invoke(app, ["backtest", str(data), "--model", str(model_dir), "--output", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    assert set(metrics) == {"all_labelled"} and metrics["all_labelled"]["rows"] == 8
    with out.open() as f:
        assert {r["in_training"] for r in csv.DictReader(f)} == {""}
    assert "did not record its training rows" in res.output and "never saw" not in res.output


def test_backtest_reports_unusable_rows_with_reasons_and_scores_the_rest(tmp_path):
    header = (
        "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant,"
        "product_category,customer_email\n"
    )
    rows = [
        "0,2023-01-02T10:00:00Z,ok-late,customer,c1,25.5,USD,fraud_Shop A,grocery_pos,a@x.com",
        "1,2023-01-01T10:00:00Z,ok-early,customer,c1,900.0,usd,fraud_Shop B,shopping_net,a@x.com",
        ",2023-01-01T11:00:00Z,no-label,customer,c2,12.0,EUR,fraud_Shop A,travel,b@y.com",
        "0,2023-01-01T12:00:00Z,bad-price,customer,c3,abc,USD,fraud_Shop A,travel,c@z.com",
        "0,2023-01-01T13:00:00Z,no-price,customer,c3,,USD,fraud_Shop A,travel,c@z.com",
        "0,2023-01-01T14:00:00Z,bad-currency,customer,c3,5.0,$$,fraud_Shop A,travel,c@z.com",
        "0,yesterday,bad-time,customer,c3,5.0,USD,fraud_Shop A,travel,c@z.com",
        "0,2023-01-01T15:00:00Z,zero-price,customer,c3,0,USD,fraud_Shop A,travel,c@z.com",
    ]
    data = tmp_path / "mixed.csv"
    data.write_text(header + "\n".join(rows) + "\n")
    model_dir = small_model().save(tmp_path / "models")
    out = tmp_path / "decisions.csv"
    res = CliRunner().invoke(app, ["backtest", str(data), "--model", str(model_dir), "--output", str(out)])
    assert res.exit_code == 0, res.output
    with out.open() as f:
        got = {r["EVENT_ID"]: r for r in csv.DictReader(f)}
    assert list(got)[:3] == ["ok-early", "no-label", "ok-late"]  # event-time order, whatever the file order
    assert {got[i]["outcome"] for i in ("ok-early", "no-label", "ok-late")} <= {"APPROVE", "REVIEW", "BLOCK"}
    assert got["no-label"]["EVENT_LABEL"] == "" and got["no-label"]["score"] != ""
    reasons = {i: got[i]["reasons"] for i in ("bad-price", "no-price", "bad-currency", "bad-time", "zero-price")}
    assert all(got[i]["outcome"] == "REJECTED" for i in reasons)
    assert "order_price 'abc' is not a number" in reasons["bad-price"]
    assert "order_price is empty" in reasons["no-price"]
    assert "payment_currency" in reasons["bad-currency"]
    assert "EVENT_TIMESTAMP" in reasons["bad-time"]
    assert "amount must be a positive number" in reasons["zero-price"]  # the job's own validation
    # said on the screen too, as evaluate and train say it: before, only a count in the summary
    assert res.output.startswith("5 row(s) rejected and left out (first: bad-price: order_price 'abc' is not a number")


@pytest.mark.parametrize(
    ("body", "args", "says"),
    [
        ("", [], "mixed.csv holds no transactions"),
        (
            "0,yesterday,bad,customer,c3,5.0,USD,fraud_Shop A,travel\n",
            [],
            "mixed.csv: all 1 rows rejected (first, bad: ",
        ),
        (
            "0,2023-01-01T10:00:00Z,early,customer,c3,5.0,USD,fraud_Shop A,travel\n",
            ["--decide-from", "2024-01-01"],
            "mixed.csv: all 1 events are before --decide-from",
        ),
    ],
    ids=["header only", "every row rejected", "every event in the warm-up"],
)
def test_backtest_that_decides_nothing_fails_with_the_reason_and_writes_no_decisions(tmp_path, body, args, says):
    data = tmp_path / "mixed.csv"
    data.write_text(
        "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant,"
        "product_category\n" + body
    )
    model_dir = small_model().save(tmp_path / "models")
    out = tmp_path / "decisions.csv"
    res = CliRunner().invoke(app, ["backtest", str(data), "--model", str(model_dir), "--output", str(out), *args])
    assert res.exit_code == 1 and isinstance(res.exception, CheckoutGuardError)
    assert str(res.exception).startswith(says) and not out.exists()


@pytest.mark.parametrize("where", ["missing/report.json", "."])
def test_evaluate_refuses_a_json_path_it_cannot_write_before_evaluating(tmp_path, where):
    data = tmp_path / "data.csv"
    data.write_text("x\n")  # no rows to evaluate: the --json check comes first
    res = CliRunner().invoke(app, ["evaluate", str(data), "--json", str(tmp_path / where)])
    said = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 2 and "--json" in said and "folder" in said


def test_backtest_refuses_an_output_it_cannot_write_before_scoring(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("x\n")
    res = CliRunner().invoke(app, ["backtest", str(data), "--output", str(tmp_path / "missing" / "out.csv")])
    assert res.exit_code == 2 and "is not a folder" in " ".join(res.output.replace("│", " ").split())


def test_backtest_decides_by_the_rule_set_file_given_and_not_the_jobs_threshold_overrides(tmp_path, monkeypatch):
    data = _eight_labelled_rows(tmp_path / "data.csv")
    model_dir = small_model().save(tmp_path / "models")
    default = DEFAULT_RULESET.read_text()
    trial = re.sub(r"(?m)^version: .*$", 'version: "trial-1"', default.replace("block_at: 85", "block_at: 70"))
    rules = tmp_path / "trial.yaml"
    rules.write_text(trial)
    monkeypatch.setenv("CG_RULES__BLOCK_AT", "99")  # the live job's override: not part of the rule set on trial
    monkeypatch.setattr("jobs.model.train.get_settings", lambda: Settings())
    out = tmp_path / "decisions.csv"
    args = ["backtest", str(data), "--model", str(model_dir), "--output", str(out), "--rules", str(rules)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["rules_version"] for r in rows} == {"trial-1"}  # not trial-1+block_at=99
    assert "rules trial-1:" in res.output

    bad = tmp_path / "bad.yaml"
    bad.write_text(trial.replace("block_at: 70", "block_at: -5"))
    other = tmp_path / "other.csv"
    res = CliRunner().invoke(app, [*args[:4], "--output", str(other), "--rules", str(bad)])
    assert res.exit_code == 1 and isinstance(res.exception, RuleSetError) and "bad.yaml" in str(res.exception)
    assert not other.exists()  # refused before anything was scored


def _corrected_labels_csv(path: Path) -> Path:
    """60 rows over three days (every fourth one fraud, e2 unlabelled), then rows appended later with the id and
    content of earlier ones: e1's label corrected to fraud (a chargeback), e2 labelled legit, e5 repeated without a
    label, e4 flipped to legit and back, and e6 with another price (another transaction under its id, refused)."""
    header = "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant\n"

    def row(n: int, label: str, price: float | None = None) -> str:
        at = f"2023-01-{1 + n // 24:02d}T{n % 24:02d}:00:00Z"
        return f"{label},{at},e{n},customer,c{n % 5},{10 + n if price is None else price},USD,fraud_A\n"

    body = "".join(row(n, "" if n == 2 else str(int(n % 4 == 0))) for n in range(60))
    later = row(1, "1") + row(2, "0") + row(5, "") + row(4, "0") + row(4, "1") + row(6, "1", price=999)
    path.write_text(header + body + later)
    return path


def test_a_label_corrected_by_a_later_row_of_the_same_transaction_is_the_one_trained_on(tmp_path):
    data = _corrected_labels_csv(tmp_path / "corrected.csv")
    history = observe_all(csv_transactions(data), clean_settings())
    labels = {tx["transaction_id"]: tx["label"] for tx, _ in history.items}
    assert len(history.items) == 60 and history.duplicates == 5, "each transaction is counted once"
    assert (labels["e1"], labels["e2"], labels["e4"], labels["e5"], labels["e6"]) == (1, 0, 1, 0, 0)
    assert history.relabelled == ["e1", "e2"], "e4 ends as its first row began; e5's empty label erases nothing"
    assert [ident for ident, _ in history.rejected] == ["e6"]  # other content: not a copy, its label is not taken


def test_a_rejected_row_whose_id_is_no_id_is_named_by_its_length_or_line_never_shown(tmp_path):
    """train, evaluate and backtest print the first rejected id and backtest writes each in its CSV: a hostile one
    (from the topic, or a CSV row's EVENT_ID) put a terminal escape on the screen, a formula in the spreadsheet, or a
    megabyte in both."""
    from dataclasses import replace

    from tests.builders import sale

    hostile = replace(sale("t1"), transaction_id="\x1b[2J" + "x" * 500_000)
    history = observe_all([hostile, replace(sale("t2"), amount=-1.0)], clean_settings())
    assert [ident for ident, _ in history.rejected] == ["an id of 500004 characters, not shown", "t2"]
    data = tmp_path / "hostile.csv"
    data.write_text(
        "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_TYPE,ENTITY_ID,order_price,payment_currency,merchant\n"
        '0,2023-01-01T10:00:00Z,"=HYPERLINK(""http://evil.test"")\x1b[2J",customer,c1,abc,USD,fraud_A\n'
        "0,2023-01-01T11:00:00Z,e2,customer,c1,abc,USD,fraud_A\n"
    )
    assert [row[0] for row in csv_transactions(data) if isinstance(row, tuple)] == ["line 2", "e2"]


def test_train_evaluate_and_backtest_take_the_last_label_given_for_a_transaction_and_say_how_many(tmp_path):
    data = _corrected_labels_csv(tmp_path / "corrected.csv")
    says = "2 transaction id(s) take their label from a later row with the same id and content"
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(data), "--folds", "2"])
    assert res.exit_code == 0, res.output
    assert f"{says} (a corrected label: the last one given counts): e1, e2\n" in res.output
    assert "60 transactions, 60 labelled (16 fraud)" in res.output
    res = runner.invoke(app, ["train", str(data), "--folds", "2", "--out", str(tmp_path / "models")])
    assert res.exit_code == 0, res.output
    assert res.output.count(says) == 1 and "trained on all 60 labelled rows (16 fraud)" in res.output
    model = LocalModel.load(tmp_path / "models")
    assert id_digest("e2") in (model.trained_ids() or ())  # labelled by its later row only

    out = tmp_path / "decisions.csv"
    res = runner.invoke(app, ["backtest", str(data), "--model", str(tmp_path / "models"), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count(says) == 1 and "60 decisions, 1 rejected, 5 duplicates" in res.output
    with out.open() as f:
        rows = {r["EVENT_ID"]: r for r in csv.DictReader(f)}
    assert (rows["e1"]["EVENT_LABEL"], rows["e2"]["EVENT_LABEL"], rows["e5"]["EVENT_LABEL"]) == ("1", "0", "0")
    assert rows["e2"]["in_training"] == "1" and rows["e6"]["outcome"] == "REJECTED"
    metrics = json.loads(res.output[res.output.index("{") : res.output.rindex("}") + 1])
    assert metrics["all_labelled"]["fraud"] == 16 and metrics["in_training"]["rows"] == 60
    assert metrics["unseen"]["rows"] == 0


def test_a_field_verdict_overrides_the_label_a_later_row_corrected_and_is_counted_against_it(tmp_path, monkeypatch):
    data = _corrected_labels_csv(tmp_path / "corrected.csv")
    verdicts = FieldLabels(
        by_transaction={t: make_label(transaction_id=t, label=0, source="cli", decided_at=1) for t in ("e1", "e2")}
    )
    monkeypatch.setattr("jobs.model.labels.read_labels", lambda settings: verdicts)
    res = CliRunner().invoke(
        app, ["train", str(data), "--folds", "2", "--labels-from-topic", "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    model = LocalModel.load(tmp_path / "m")
    joined = model.meta["data"]["field_labels"]
    # against the data's final labels (e1 fraud, e2 legit), not its first rows' (e1 legit, e2 unlabelled)
    assert (joined["joined"], joined["newly_labelled"], joined["changed"]) == (2, 0, 1)
    assert model.meta["trained_on"]["fraud"] == 15, "e1 is legit again: the field verdict wins"


@pytest.mark.parametrize("given", ["a file", "a models root without CURRENT", "an empty folder"])
def test_backtest_given_no_model_folder_says_what_is_there_and_exits_1(tmp_path, monkeypatch, capsys, given):
    """ "No model artifact (train one)" sent people with models on disk to train another."""
    data = _eight_labelled_rows(tmp_path / "data.csv")
    root = tmp_path / "models"
    version = small_model().save(root)
    for n in range(6):  # seven versions in all, none of them CURRENT
        shutil.copytree(version, root / f"gbm-20230101-0000000{n}")
    (root / "CURRENT").unlink()
    (tmp_path / "empty").mkdir()
    model = {
        "a file": version / "model.json",
        "a models root without CURRENT": root,
        "an empty folder": tmp_path / "empty",
    }
    argv = ["backtest", str(data), "--model", str(model[given]), "--output", str(tmp_path / "out.csv")]
    monkeypatch.setattr("sys.argv", ["train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("Error: ") and err.count("\n") == 1, err
    if given == "a file":
        assert f"{version / 'model.json'} is a file, not a model folder" in err
    elif given == "an empty folder":
        assert f"no model artifact at {tmp_path / 'empty'} (train one" in err
    else:
        newest = sorted([version.name, *(f"gbm-20230101-0000000{n}" for n in range(6))], reverse=True)
        assert f"{root} is a models root without a CURRENT pointer, holding 7 version(s): " in err
        assert f"{', '.join(newest[:5])} and 2 more; give one's folder ({root / newest[0]})" in err
        assert f"challenger <version> --models {root}, then promote --models {root}" in err
    assert not (tmp_path / "out.csv").exists()


def test_the_hint_for_a_models_root_without_current_lists_numbered_versions_newest_first(tmp_path):
    """By plain name ``v9`` sorted after ``v10``: the hint offered the oldest hand-named version as the one to give."""
    for name in ("v2", "v10", "v9", "v1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    with pytest.raises(ModelArtifactError) as err:
        LocalModel.load(tmp_path)
    assert "holding 4 version(s): v10, v9, v2, v1; " in str(err.value)
    assert f"give one's folder ({tmp_path / 'v10'})" in str(err.value)
