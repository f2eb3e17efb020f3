"""Model drift: PSI, the training reference, the hourly monitor, its reports and alerts, their schemas."""

from __future__ import annotations

import io
import json
import math
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from fastavro import schemaless_reader, schemaless_writer
from pydantic import ValidationError

from infra.settings import AlertSettings, ModelSettings
from jobs.model.drift import (
    HOUR_MS,
    DriftEpisodes,
    DriftMerge,
    DriftMonitor,
    _bin_categorical,
    _bin_numeric,
    bench_observe,
    drift_alert,
    drift_id,
    psi,
    reference_profile,
    with_alerts,
)
from schemas.codec import MAGIC, codec, latest_versions, load_schemas
from schemas.identifiers import check
from schemas.records import Alert, AlertAvro, ModelDrift, ModelDriftAvro
from schemas.topics import ALL_TOPICS, MODEL_DRIFT
from sinks.alerts.message import describe

NAMES = ["amount_log", "velocity", "hour_utc", "email_domain"]
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, an hour start
CREATED = 1_767_300_000_000


def _rows(n: int, rng: np.random.Generator, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows in NAMES order: a continuous amount, a count with 20 % missing, the hour, a hashed category."""
    x = np.empty((n, len(NAMES)))
    x[:, 0] = rng.normal(3.0 + shift, 1.0, n)
    x[:, 1] = rng.poisson(2.0 + 4 * shift, n).astype(float)
    x[rng.random(n) < 0.2, 1] = math.nan
    x[:, 2] = rng.integers(0, 24, n)
    x[:, 3] = rng.choice([101.0, 202.0, 303.0, math.nan], size=n, p=[0.5, 0.3, 0.1, 0.1])
    scores = np.clip(rng.normal(300 + 300 * shift, 150, n), 0, 1000).round()
    return x, scores


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    x, scores = _rows(20_000, np.random.default_rng(1))
    return reference_profile(NAMES, x, scores, bins=10, categorical=["email_domain"])


def _monitor(reference: dict[str, Any], **kw: Any) -> DriftMonitor:
    args: dict[str, Any] = {"psi_alert": 0.25, "min_rows": 200, "now_ms": lambda: CREATED}
    return DriftMonitor(reference, "gbm-20260101-abcd1234", **{**args, **kw})


def _times(n: int, hour: int = 0, within_ms: int = HOUR_MS) -> np.ndarray:
    return T0 + hour * HOUR_MS + np.linspace(0, within_ms - 1, n).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# PSI


def test_psi_of_identical_distributions_is_zero_and_of_a_shifted_one_large() -> None:
    expected = [0.1] * 10
    assert psi(expected, [100] * 10) == pytest.approx(0.0, abs=1e-12)
    assert psi(expected, [0] * 10) == 0.0  # nothing observed: nothing to say
    moved = [0, 0, 0, 0, 0, 100, 200, 300, 200, 200]
    assert psi(expected, moved) > 1.0
    slight = [90, 110, 100, 100, 100, 100, 100, 100, 95, 105]
    assert 0 < psi(expected, slight) < 0.01


def test_psi_is_finite_for_empty_bins_on_either_side_and_checks_the_bin_count() -> None:
    assert math.isfinite(psi([0.5, 0.5, 0.0], [0, 10, 10]))
    assert psi([0.5, 0.5, 0.0], [0, 10, 10]) > psi([0.5, 0.5, 0.0], [5, 10, 5]) > 0.25
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1, 2, 3])


# --------------------------------------------------------------------------------------------------
# The training reference


def test_reference_profile_is_json_and_a_monitor_from_its_round_trip_reports_the_same(
    reference: dict[str, Any],
) -> None:
    text = json.dumps(reference, allow_nan=False)  # plain JSON: no NaN or infinity anywhere
    again = json.loads(text)
    assert again == reference and again["rows"] == 20_000 and again["bins"] == 10
    x, scores = _rows(500, np.random.default_rng(2), shift=0.5)
    times = _times(500)
    first = _monitor(reference).observe(times, x, scores) + _monitor(reference).flush()
    a, b = _monitor(reference), _monitor(again)
    a.observe(times, x, scores)
    b.observe(times, x, scores)
    assert a.flush() == b.flush()
    assert first == []  # nothing closed before the flush


def test_reference_bins_quantiles_keep_nan_apart_and_leave_time_features_out(reference: dict[str, Any]) -> None:
    assert set(reference["features"]) == {"amount_log", "velocity", "email_domain"}  # hour_utc: time feature
    amount = reference["features"]["amount_log"]
    assert amount["kind"] == "numeric" and len(amount["edges"]) == 9
    assert amount["expected"][0] == 0.0  # no NaN amounts
    assert all(p == pytest.approx(0.1, abs=0.01) for p in amount["expected"][1:-1])  # deciles
    velocity = reference["features"]["velocity"]
    assert velocity["expected"][0] == pytest.approx(0.2, abs=0.01)  # its own bin for missing values
    assert sum(velocity["expected"]) == pytest.approx(1.0)
    email = reference["features"]["email_domain"]
    assert email["kind"] == "categorical" and email["values"] == [101.0, 202.0, 303.0]
    # [missing, other, 101, 202, 303]
    assert email["expected"] == pytest.approx([0.1, 0.0, 0.5, 0.3, 0.1], abs=0.01)
    assert reference["score"]["kind"] == "numeric" and reference["score"]["expected"][0] == 0.0


def test_a_feature_never_seen_in_training_and_bad_shapes() -> None:
    x = np.full((50, 2), math.nan)
    x[:, 0] = np.arange(50)
    profile = reference_profile(["a", "never"], x, np.arange(50), bins=5)
    assert profile["features"]["never"] == {"kind": "numeric", "edges": [], "expected": [1.0, 0.0]}
    with pytest.raises(ValueError):
        reference_profile(["a"], x, np.arange(50))
    with pytest.raises(ValueError):
        reference_profile(["a", "never"], x[:0], [])
    with pytest.raises(ValueError):
        reference_profile(["a", "never"], x, np.arange(10))


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r["features"]["amount_log"].update(
            expected=[math.nan] * len(r["features"]["amount_log"]["expected"])
        ),
        lambda r: r["features"]["amount_log"].update(expected=[-p for p in r["features"]["amount_log"]["expected"]]),
        lambda r: r["features"]["amount_log"].update(expected=[0.0] * len(r["features"]["amount_log"]["expected"])),
        lambda r: r["features"]["amount_log"]["expected"].append(0.0),
        lambda r: r["features"]["amount_log"]["edges"].reverse(),
        lambda r: r["feature_names"].pop(),
        lambda r: r.pop("score"),
        lambda r: r["features"].update(amount_log=None),
        lambda r: r.update(rows=None),
        lambda r: r.update(rows=math.inf),
    ],
    ids=[
        "nan",
        "negative",
        "zero-sum",
        "one more",
        "edges reversed",
        "a name short",
        "no score",
        "not a column",
        "rows null",
        "rows infinite",
    ],
)
def test_a_damaged_reference_is_refused_with_a_reason(reference: dict[str, Any], damage) -> None:
    """A NaN proportion won every max() and hid a real alert; a negative or zero-sum one raised a false
    one every hour: refused, so the caller turns the monitor off for that model and says why."""
    damaged = json.loads(json.dumps(reference))
    damage(damaged)
    with pytest.raises(ValueError, match="reference"):
        _monitor(damaged)


def test_an_indicator_that_is_mostly_zero_or_never_set_in_training_shows_when_it_fires_more() -> None:
    """A 0/1 indicator set on 3 % of the training rows (and one never set) took every quantile at 0, and its one
    bin held 0 and 1 alike: an hour where it fired on 40 % of the rows had PSI 0 and no alert. The 0 now has a
    bin of its own, so the same hour stands out; an hour like training stays quiet."""
    rng = np.random.default_rng(12)
    n = 20_000
    x = np.column_stack([(rng.random(n) < 0.03).astype(float), np.zeros(n), rng.normal(size=n)])
    names = ["return_without_receipt", "cross_store_return", "amount_log"]
    profile = json.loads(json.dumps(reference_profile(names, x, rng.integers(0, 1000, n), bins=10)))

    def hour(rate: float, never_rate: float) -> ModelDriftAvro:
        rows = np.column_stack(
            [(rng.random(500) < rate).astype(float), (rng.random(500) < never_rate).astype(float), rng.normal(size=500)]
        )
        monitor = _monitor(profile)
        monitor.observe(_times(500), rows, rng.integers(0, 1000, 500))
        (report,) = monitor.flush()
        return report

    usual = hour(0.03, 0.0)
    assert usual["worst_psi"] < 0.05 and not usual["alert"]
    fired = hour(0.40, 0.0)
    assert fired["feature_psi"]["return_without_receipt"] > 0.25 and fired["alert"]
    assert fired["worst_feature"] == "return_without_receipt"
    never = hour(0.03, 0.30)
    assert never["feature_psi"]["cross_store_return"] > 0.25 and never["alert"]
    assert never["feature_psi"]["return_without_receipt"] < 0.05


# --------------------------------------------------------------------------------------------------
# The monitor


def test_the_same_distribution_is_stable_and_a_shifted_one_alerts(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    monitor = _monitor(reference)
    x, scores = _rows(2000, rng)
    assert monitor.observe(_times(2000, 0), x, scores) == []
    x, scores = _rows(2000, rng, shift=1.0)
    (steady,) = monitor.observe(_times(2000, 1), x, scores)
    assert steady["rows"] == 2000 and steady["hour_start"] == T0 and not steady["alert"]
    assert steady["score_psi"] < 0.05 and steady["worst_psi"] < 0.05
    assert set(steady["feature_psi"]) == {"amount_log", "velocity", "email_domain"}
    (shifted,) = monitor.flush()
    assert shifted["hour_start"] == T0 + HOUR_MS and shifted["alert"]
    assert shifted["score_psi"] > 0.25 and shifted["worst_psi"] > 0.25
    assert shifted["worst_feature"] in {"amount_log", "velocity"}
    assert shifted["feature_psi"]["email_domain"] < 0.05  # the category mix did not move
    assert shifted["report_id"] == f"drift:gbm-20260101-abcd1234:{T0 + HOUR_MS}"
    assert (shifted["reference_rows"], shifted["created_at"], shifted["late_rows"]) == (20_000, CREATED, 0)


def test_no_alert_below_the_minimum_of_rows_or_below_the_threshold(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(4)
    x, scores = _rows(150, rng, shift=1.0)
    few = _monitor(reference)
    few.observe(_times(150), x, scores)
    (report,) = few.flush()
    assert report["score_psi"] > 0.25 and not report["alert"]  # 150 < min_rows
    lax = _monitor(reference, min_rows=100, psi_alert=50.0)
    lax.observe(_times(150), x, scores)
    assert not lax.flush()[0]["alert"]  # enough rows, PSI under a (silly) threshold
    strict = _monitor(reference, min_rows=100)
    strict.observe(_times(150), x, scores)
    assert strict.flush()[0]["alert"]


def test_hours_close_in_order_when_a_later_hour_arrives(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(5)
    monitor = _monitor(reference)
    x, s = _rows(40, rng)
    # one batch spanning hours 0, 1 and 2 (out of order within it): 0 and 1 close, 2 stays open
    times = np.concatenate([_times(10, 2), _times(20, 0), _times(10, 1)])
    reports = monitor.observe(times, x, s)
    assert [(r["hour_start"], r["rows"]) for r in reports] == [(T0, 20), (T0 + HOUR_MS, 10)]
    assert monitor.open_hours == [T0 + 2 * HOUR_MS]
    assert monitor.observe(_times(5, 2), x[:5], s[:5]) == []  # the same hour: nothing closes
    (third,) = monitor.observe(_times(1, 5), x[:1], s[:1])  # a gap of hours: only what was open closes
    assert (third["hour_start"], third["rows"]) == (T0 + 2 * HOUR_MS, 15)
    assert [r["hour_start"] for r in monitor.flush()] == [T0 + 5 * HOUR_MS]
    assert monitor.open_hours == [] and monitor.flush() == []


def test_late_rows_are_counted_in_the_next_report_and_never_reopen_an_hour(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(6)
    monitor = _monitor(reference)
    x, s = _rows(30, rng)
    monitor.observe(_times(10, 0), x[:10], s[:10])
    (first,) = monitor.observe(_times(10, 1), x[10:20], s[10:20])
    assert first["late_rows"] == 0
    assert monitor.observe(_times(7, 0), x[:7], s[:7]) == []  # hour 0 is closed: late, all of them
    assert monitor.open_hours == [T0 + HOUR_MS]
    mixed = np.concatenate([_times(3, 0), _times(4, 1)])  # 3 late, 4 in the open hour
    assert monitor.observe(mixed, x[:7], s[:7]) == []
    (second,) = monitor.flush()
    assert (second["hour_start"], second["rows"], second["late_rows"]) == (T0 + HOUR_MS, 14, 10)
    monitor.observe(_times(2, 1), x[:2], s[:2])  # after a flush, too
    monitor.observe(_times(1, 3), x[:1], s[:1])
    (third,) = monitor.flush()
    assert (third["hour_start"], third["rows"], third["late_rows"]) == (T0 + 3 * HOUR_MS, 1, 2)


def test_grace_keeps_an_hour_open_for_stragglers_and_open_hours_stay_bounded(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(7)
    monitor = _monitor(reference, grace_ms=300_000)
    x, s = _rows(200, rng)
    assert monitor.observe(_times(10, 0), x[:10], s[:10]) == []
    assert monitor.observe(_times(5, 1, within_ms=60_000), x[:5], s[:5]) == []  # 1 min into hour 1: in grace
    assert monitor.observe(_times(3, 0), x[:3], s[:3]) == []  # a straggler of hour 0, still counted
    (closed,) = monitor.observe(np.array([T0 + HOUR_MS + 300_000]), x[:1], s[:1])  # grace over
    assert (closed["rows"], closed["late_rows"]) == (13, 0)
    # a long disordered stream (events up to 4 min behind): never more than two hours open
    times = T0 + np.arange(20_000) * 1_000 - rng.integers(0, 240_000, 20_000)
    most_open, reports = 0, []
    for i in range(0, len(times), 100):
        batch = times[i : i + 100]
        reports += monitor.observe(batch, x[: len(batch)], s[: len(batch)])
        most_open = max(most_open, len(monitor.open_hours))
    reports += monitor.flush()
    assert most_open <= 2
    starts = [r["hour_start"] for r in reports]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    with pytest.raises(ValueError):
        _monitor(reference, grace_ms=HOUR_MS)


def test_nan_features_and_missing_scores_have_their_own_bin(reference: dict[str, Any]) -> None:
    rng = np.random.default_rng(8)
    x, _ = _rows(400, rng)
    x[:, 1] = math.nan  # velocity unknown for every row (20 % in training)
    scores: list[int | None] = [None] * 400  # no model score at all
    monitor = _monitor(reference)
    monitor.observe(_times(400), x, scores)
    (report,) = monitor.flush()
    assert report["feature_psi"]["velocity"] > 1.0 and report["worst_feature"] == "velocity"
    assert report["score_psi"] > 1.0 and report["alert"]
    assert report["feature_psi"]["amount_log"] < 0.1
    assert all(math.isfinite(v) for v in report["feature_psi"].values())


def test_the_batch_binning_equals_searchsorted_per_column_on_edges_infinities_and_nan() -> None:
    rng = np.random.default_rng(10)
    x = np.column_stack(
        [
            rng.integers(0, 4, 300).astype(float),  # discrete: values equal to edges
            rng.normal(size=300),
            np.full(300, math.nan),  # never seen in training: no edges
            rng.choice([5.0, 7.0, 9.0, math.nan], 300),  # categorical
            rng.choice([1.0, 2.0], 300),  # categorical, never seen: no codes
        ]
    )
    names = ["d", "n", "empty", "c", "c_empty"]
    training = x.copy()
    training[:, 4] = math.nan
    profile = reference_profile(names, training, rng.integers(0, 1000, 300), bins=4, categorical=["c", "c_empty"])
    x[:5, 1] = [math.inf, -math.inf, math.nan, profile["features"]["n"]["edges"][0], 1e300]
    monitor = _monitor(profile)
    got = np.column_stack(monitor._binner.bins(x))
    expected = []
    for column in monitor._columns:  # numeric first, then categorical, as the binner lays them out
        values = x[:, column.index]
        if column.categorical:
            expected.append((_bin_categorical(values, column.cuts) + column.offset, column.categorical))
        else:
            expected.append((_bin_numeric(values, column.cuts) + column.offset, column.categorical))
    want = np.column_stack([b for b, cat in expected if not cat] + [b for b, cat in expected if cat])
    assert np.array_equal(got, want)
    assert set(np.unique(want[:, 2] - monitor._columns[2].offset).tolist()) == {0}  # NaN everywhere


def test_observe_checks_the_batch_shape_and_takes_an_empty_batch(reference: dict[str, Any]) -> None:
    monitor = _monitor(reference)
    assert monitor.observe([], np.empty((0, len(NAMES))), []) == []
    with pytest.raises(ValueError):
        monitor.observe([T0], np.zeros((1, 3)), [1])
    with pytest.raises(ValueError):
        monitor.observe([T0, T0], np.zeros((2, len(NAMES))), [1])


def test_bench_observe_reports_a_rate() -> None:
    assert bench_observe(rows=2_000, batch=250) > 0


# --------------------------------------------------------------------------------------------------
# Records, schemas, topic, settings


def _report(reference: dict[str, Any], shift: float = 1.0) -> ModelDriftAvro:
    x, scores = _rows(400, np.random.default_rng(9), shift=shift)
    monitor = _monitor(reference)
    monitor.observe(_times(400), x, scores)
    (report,) = monitor.flush()
    return report


def test_a_report_is_exactly_the_typed_dict_and_round_trips_through_the_model_drift_codec(
    reference: dict[str, Any],
) -> None:
    report = _report(reference)
    avro = [f["name"] for f in latest_versions()["ModelDrift"].parsed["fields"]]
    assert set(report) == set(ModelDriftAvro.__annotations__) == {f.name for f in fields(ModelDrift)} == set(avro)
    assert ModelDriftAvro.__required_keys__ == frozenset(avro)
    data = codec("ModelDrift").encode(report)
    assert data[:2] == MAGIC and codec("ModelDrift").decode(data) == report
    record = ModelDrift.decode(data)
    assert record.report_id == report["report_id"] and record.feature_psi == report["feature_psi"]
    assert ModelDrift.decode(record.encode()) == record


def test_the_model_drift_topic() -> None:
    assert MODEL_DRIFT in ALL_TOPICS and MODEL_DRIFT.name == "model_drift"
    assert MODEL_DRIFT.record_type == "ModelDrift" and MODEL_DRIFT.record_type in latest_versions()
    assert MODEL_DRIFT.config["retention.ms"] == str(90 * 24 * 3600 * 1000)


def test_the_drift_settings_defaults() -> None:
    model = ModelSettings()
    assert (model.drift_psi_alert, model.drift_min_rows, model.drift_bins) == (0.25, 200, 10)
    assert 0 <= model.drift_grace_ms < HOUR_MS


def test_train_bins_the_drift_reference_as_the_drift_bins_setting_asks() -> None:
    from jobs.model.train import train_default
    from tests.fraud_model import clean_settings

    settings = clean_settings()
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"drift_bins": 4})})
    reference = train_default(settings, rows=2000, folds=2).meta["reference"]
    assert reference["bins"] == 4 and len(reference["features"]["amount_log"]["edges"]) == 3
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        ModelSettings(drift_bins=1)


def test_the_drift_alert_is_a_valid_model_drift_alert(reference: dict[str, Any]) -> None:
    report = _report(reference)
    alert = drift_alert(report)
    assert set(alert) == set(AlertAvro.__annotations__)
    assert alert["alert_id"] == report["report_id"] == drift_id(report["model_version"], report["hour_start"])
    assert check(alert["alert_id"], "alert_id")  # the sender accepts it
    assert (alert["kind"], alert["severity"], alert["event_time"]) == ("MODEL_DRIFT", "warning", T0)
    assert "score" in alert["reasons"] and report["worst_feature"] in alert["reasons"]
    assert f"score PSI {report['score_psi']:.2f}" in alert["summary"]
    assert report["worst_feature"] in alert["summary"] and "2026-01-01 00:00 UTC" in alert["summary"]
    data = codec("Alert").encode(alert)
    assert codec("Alert").decode(data) == alert
    assert Alert.decode(data).kind == "MODEL_DRIFT"
    assert "threshold: PSI 0.25" in alert["summary"]
    assert "threshold: PSI 0.1)" in drift_alert(report, psi_alert=0.1)["summary"]
    text = describe(dict(alert), AlertSettings(timezone="UTC"))
    assert text.headline == "Fraud model drift - all stores"


def test_a_drift_id_is_a_valid_id_whatever_the_model_version() -> None:
    assert check(drift_id("frauddetector/transaction v2", T0), "id") == f"drift:frauddetector_transaction_v2:{T0}"
    assert len(drift_id("x" * 500, T0)) <= 128


def _schema(record: str, version: int) -> Any:
    (sv,) = [s for s in load_schemas().values() if s.short_name == record and s.version == version]
    return sv


def test_an_alert_written_with_v1_still_decodes_and_v1_keeps_its_fingerprint() -> None:
    v1 = _schema("Alert", 1)
    assert v1.fingerprint.hex() == "85259d94da4b16c9"  # the enum default added to v1 is not part of it
    assert latest_versions()["Alert"].version >= 2
    record = {
        "alert_id": "blocked:tx-1",
        "kind": "WATCHLIST_MATCH",
        "severity": "high",
        "event_time": T0,
        "store_id": "S1",
        "summary": "x",
        "reasons": ["watchlist_suspect"],
    }
    buf = io.BytesIO()
    schemaless_writer(buf, v1.parsed, record)
    decoded = codec("Alert").decode(MAGIC + v1.fingerprint + buf.getvalue())
    assert decoded["kind"] == "WATCHLIST_MATCH" and decoded["alert_id"] == "blocked:tx-1"
    assert decoded["lane_id"] is None and decoded["reasons"] == ["watchlist_suspect"]


def test_a_v1_reader_resolves_a_new_kind_to_its_enum_default() -> None:
    """Formal full compatibility (the codec itself always reads into the newest version)."""
    v1, v2 = _schema("Alert", 1), _schema("Alert", 2)
    buf = io.BytesIO()
    record = {"alert_id": "a", "kind": "MODEL_DRIFT", "severity": "w", "event_time": 0, "store_id": "", "summary": ""}
    schemaless_writer(buf, v2.parsed, record)
    buf.seek(0)
    decoded: Any = schemaless_reader(buf, v2.parsed, v1.parsed)
    assert decoded["kind"] == "BLOCKED_TRANSACTION"


# --------------------------------------------------------------------------------------------------
# Parallel slots: tallies merged by one monitor


def test_tallies_of_two_slots_merged_report_exactly_as_one_monitor_on_every_row(reference: dict[str, Any]) -> None:
    """The partitioned layout: each decide slot tallies its own rows, one monitor merges the tallies and
    closes hours by the job's watermark (everything before it has arrived from every slot)."""
    rng = np.random.default_rng(11)
    times = T0 + np.arange(12_000) * 1_000 - rng.integers(0, 240_000, 12_000)  # 3.3 h, up to 4 min disordered
    x, s = _rows(len(times), rng, shift=0.3)
    slot_of = rng.integers(0, 2, len(times))
    whole, merged = _monitor(reference, grace_ms=300_000), _monitor(reference, grace_ms=300_000)
    slots = [_monitor(reference, grace_ms=300_000) for _ in range(2)]
    expected, got = [], []
    for i in range(0, len(times), 250):
        part = slice(i, i + 250)
        expected += whole.observe(times[part], x[part], s[part])
        watermark = int(times[i + 250 :].min()) - 1 if i + 250 < len(times) else int(times.max())
        for k in (1, 0):  # the second slot's tally first: it may run ahead
            mine = np.flatnonzero(slot_of[part] == k) + i
            tally = slots[k].tally(times[mine], x[mine], s[mine])
            if tally is not None:
                got += merged.merge(tally, watermark)
    expected += whole.flush()
    got += merged.flush()
    assert len(expected) == 5 and got == expected  # every hour (one starts before T0): same rows, late rows, PSI
    assert all(slot.open_hours == [] for slot in slots)  # a slot only tallies


def test_a_tally_goes_to_its_own_models_monitor_only(reference: dict[str, Any]) -> None:
    x, s = _rows(10, np.random.default_rng(12))
    tally = _monitor(reference).tally(_times(10), x, s)
    assert tally is not None
    other = DriftMonitor(reference, "gbm-other", psi_alert=0.25, min_rows=200)
    with pytest.raises(ValueError):
        other.merge(tally)
    assert _monitor(reference).tally(np.array([], dtype=np.int64), x[:0], s[:0]) is None


def test_the_drift_step_reports_every_version_and_closes_a_replaced_models_hours(reference: dict[str, Any]) -> None:
    """``DriftMerge``: a monitor per version; after a promotion the old version's last hour closes as the
    watermark moves on, with no more tallies of that version; a version without a reference is skipped."""
    made: list[str] = []

    def monitor_of(version: str) -> DriftMonitor | None:
        made.append(version)
        if version == "no-reference":
            return None
        return DriftMonitor(reference, version, psi_alert=0.25, min_rows=5, now_ms=lambda: CREATED)

    merge = DriftMerge(monitor_of, DriftEpisodes(0.25))
    rng = np.random.default_rng(13)
    x, s = _rows(60, rng, shift=2.0)
    old, new, bare = (monitor_of(v) for v in ("v-old", "v-new", "v-old"))
    assert old is not None and new is not None and bare is not None
    made.clear()  # from here, what the merge asks for
    assert merge.on_tallies([old.tally(_times(20, 0), x[:20], s[:20])], T0 + 3_000_000) == []
    assert merge.due() == [T0 + HOUR_MS]  # the hour's end (no grace here): a timer then
    closed = merge.on_tallies([new.tally(_times(20, 1), x[20:40], s[20:40])], T0 + HOUR_MS)  # v-old's hour 0
    assert [(r["model_version"], r["hour_start"], r["rows"]) for r, _ in closed] == [("v-old", T0, 20)]
    assert closed[0][1] is not None and closed[0][1]["kind"] == "MODEL_DRIFT"  # a shift of 2 sd alerts
    assert merge.on_tallies([bare.tally(_times(5, 1), x[:5], s[:5])], T0 + HOUR_MS) == []  # v-old again: same one
    skipped = DriftMonitor(reference, "no-reference", psi_alert=0.25, min_rows=5).tally(_times(5, 2), x[:5], s[:5])
    assert merge.on_tallies([skipped], T0 + HOUR_MS) == []
    assert made == ["v-old", "v-new", "no-reference"]  # one monitor per version
    by_timer = merge.on_watermark(T0 + 2 * HOUR_MS)  # hour 1 of both versions
    assert sorted((r["model_version"], r["rows"]) for r, _ in by_timer) == [("v-new", 20), ("v-old", 5)]
    assert merge.due() == []


def test_a_version_the_drift_step_let_go_never_reports_an_hour_twice(reference: dict[str, Any]) -> None:
    """A, B, C, D, E: the least recently used idle monitor (A) goes, remembering how far it reported, so a
    straggling slot's tally for A's reported hour counts as late instead of making a second report."""
    x, s = _rows(40, np.random.default_rng(14))

    def monitor_of(version: str) -> DriftMonitor:
        return DriftMonitor(reference, version, psi_alert=0.25, min_rows=5, now_ms=lambda: CREATED)

    merge, slots = DriftMerge(monitor_of, DriftEpisodes(0.25)), {}
    reports: list[tuple[str, int, int, int]] = []

    def keep(done: list) -> None:
        reports.extend(
            (r["model_version"], (r["hour_start"] - T0) // HOUR_MS, r["rows"], r["late_rows"]) for r, _ in done
        )

    def tally(version: str, hour: int, n: int, watermark: int) -> None:
        slot = slots.setdefault(version, monitor_of(version))
        keep(merge.on_tallies([slot.tally(_times(n, hour), x[:n], s[:n])], watermark))

    for hour, version in enumerate("ABCDE"):
        tally(version, hour, 10, T0 + hour * HOUR_MS)
    assert "A" not in merge.monitors and len(merge.monitors) == DriftMerge.MAX_VERSIONS
    tally("A", 0, 3, T0 + 4 * HOUR_MS + 1)  # a slot still on A: hour 0 was reported
    tally("A", 5, 5, T0 + 4 * HOUR_MS + 2)  # A again (a rollback)
    keep(merge.on_watermark(T0 + 9 * HOUR_MS))
    assert sorted(reports) == [
        ("A", 0, 10, 0),
        ("A", 5, 5, 3),  # the straggler's 3 rows: late, in A's next report
        ("B", 1, 10, 0),
        ("C", 2, 10, 0),
        ("D", 3, 10, 0),
        ("E", 4, 10, 0),
    ]


def test_merged_rows_older_than_the_watermark_less_the_grace_are_late(reference: dict[str, Any]) -> None:
    x, s = _rows(20, np.random.default_rng(15))
    merged, slot = _monitor(reference, grace_ms=300_000), _monitor(reference, grace_ms=300_000)
    assert merged.merge(slot.tally(_times(10, 0), x[:10], s[:10]), T0 + 600_000) == []
    (report,) = merged.merge(slot.tally(_times(4, 1), x[:4], s[:4]), T0 + HOUR_MS + 300_000)  # hour 0 closes
    assert (report["rows"], report["late_rows"]) == (10, 0)
    assert merged.merge(slot.tally(_times(6, 0), x[:6], s[:6]), T0 + HOUR_MS + 300_000) == []  # too late
    (second,) = merged.flush()
    assert (second["hour_start"], second["rows"], second["late_rows"]) == (T0 + HOUR_MS, 4, 6)


@pytest.mark.parametrize(
    ("name", "value"), [("drift_psi_alert", float("nan")), ("drift_grace_ms", 7_200_000), ("drift_min_rows", -5)]
)
def test_drift_settings_that_would_switch_the_monitor_off_unseen_are_refused_by_name(name: str, value: Any) -> None:
    """A NaN threshold never alerted and an hour's grace built no monitor: both only a log line."""
    with pytest.raises(ValidationError, match=name):
        ModelSettings(**{name: value})


def test_a_drift_minimum_of_zero_rows_is_refused_not_read_as_off() -> None:
    """``CG_MODEL__DRIFT_PSI_ALERT=0`` turns the monitor off; ``…__DRIFT_MIN_ROWS=0``, set for the same, did the
    opposite: every hour might alert, one of a handful of rows too, on a PSI large by chance alone."""
    with pytest.raises(ValidationError, match="drift_min_rows"):
        ModelSettings(drift_min_rows=0)
    assert ModelSettings(drift_min_rows=1).drift_min_rows == 1


def _hour_report(hour: int, *, score: float = 0.0, rows: int = 400, **features: float) -> ModelDriftAvro:
    """A report of hour ``hour`` (from T0) with these PSIs (every other feature 0)."""
    feature_psi = {"amount_log": 0.0, "velocity": 0.0, **features}
    worst = max(feature_psi, key=lambda name: feature_psi[name])
    return {
        "report_id": drift_id("v1", T0 + hour * HOUR_MS),
        "model_version": "v1",
        "hour_start": T0 + hour * HOUR_MS,
        "rows": rows,
        "late_rows": 0,
        "score_psi": score,
        "feature_psi": feature_psi,
        "worst_feature": worst,
        "worst_psi": feature_psi[worst],
        "alert": rows >= 200 and max(score, feature_psi[worst]) >= 0.25,
        "reference_rows": 20_000,
        "created_at": CREATED,
    }


def test_a_figure_alerts_when_it_crosses_not_while_it_stays_above_and_again_when_it_crosses_anew() -> None:
    episodes = DriftEpisodes(0.25, min_rows=200)
    hours = [
        _hour_report(0, velocity=0.4),  # velocity crosses: alert
        _hour_report(1, velocity=0.5),  # still above: none
        _hour_report(2, velocity=0.1, rows=50),  # too few rows to tell: ends nothing
        _hour_report(3, velocity=0.45, score=0.3),  # the score crosses while velocity stays: alert
        _hour_report(4, velocity=0.45, score=0.3),  # both still above: none
        _hour_report(5, velocity=0.05, score=0.31),  # velocity falls below
        _hour_report(6, velocity=0.3, score=0.3),  # and crosses again: alert
    ]
    alerted = [report["hour_start"] for report, alert in with_alerts(hours, episodes) if alert is not None]
    assert alerted == [T0, T0 + 3 * HOUR_MS, T0 + 6 * HOUR_MS]
    assert [report["alert"] for report in hours] == [True, True, False, True, True, True, True]  # each hour's own


def test_the_open_episodes_are_handed_to_state_and_restored_from_it() -> None:
    episodes = DriftEpisodes(0.25, min_rows=200)
    with_alerts([_hour_report(0, velocity=0.4)], episodes)
    changes = episodes.drain_changes()
    assert changes == {"v1": {"velocity": [T0, T0]}} and episodes.drain_changes() == {}
    restored = DriftEpisodes(0.25, min_rows=200)
    restored.restore(changes)
    assert [a for _, a in with_alerts([_hour_report(1, velocity=0.4)], restored)] == [None]
    with_alerts([_hour_report(2)], restored)  # every figure below: the version's episodes end
    assert restored.drain_changes() == {"v1": None}


def test_the_drift_step_of_the_partitioned_layout_alerts_a_lasting_drift_once(reference: dict[str, Any]) -> None:
    monitor = _monitor(reference)
    merge = DriftMerge(lambda version: monitor, DriftEpisodes(0.25, min_rows=200))
    alerts = []
    for hour in range(4):
        x, scores = _rows(300, np.random.default_rng(hour), shift=1.0)
        alerts += [a for _, a in merge.on_tallies([monitor.tally(_times(300, hour), x, scores)], T0 + hour * HOUR_MS)]
    alerts += [a for _, a in merge.on_watermark(T0 + 5 * HOUR_MS)]
    assert [a["event_time"] for a in alerts if a is not None] == [T0]


def test_the_drift_step_removes_a_version_s_episodes_a_day_after_its_last_tally(reference: dict[str, Any]) -> None:
    """The partitioned layout's drift step does not know the roles: a version promoted away kept its open episodes
    in the step's state for ever. A day of the other versions' tallies after its last one, with its hours reported,
    they are removed, written as ``None`` for state; a version restored from a checkpoint counts from the first
    tally after the restart."""

    def monitor_of(version: str) -> DriftMonitor:
        return DriftMonitor(reference, version, psi_alert=0.25, min_rows=200, now_ms=lambda: CREATED)

    merge = DriftMerge(monitor_of, DriftEpisodes(0.25, min_rows=200))
    merge.episodes.restore({"v-restored": {"score": [T0 - HOUR_MS, T0 - HOUR_MS]}})
    old, new = monitor_of("v-old"), monitor_of("v-new")
    x, s = _rows(300, np.random.default_rng(16), shift=1.0)
    alerts = merge.on_tallies([old.tally(_times(300, 0), x, s)], T0)
    for hour in range(1, 24):  # promoted: a day less an hour of v-new only, v-old may yet come back
        alerts += merge.on_tallies([new.tally(_times(300, hour), x, s)], T0 + hour * HOUR_MS)
    assert [(r["model_version"], r["hour_start"]) for r, a in alerts if a is not None] == [
        ("v-old", T0),
        ("v-new", T0 + HOUR_MS),
    ]
    assert set(merge.episodes.open) == {"v-old", "v-new", "v-restored"}
    merge.episodes.drain_changes()
    merge.on_tallies([new.tally(_times(300, 24), x, s)], T0 + 24 * HOUR_MS)  # a day after v-old's last tally
    assert set(merge.episodes.open) == {"v-new"}
    assert merge.episodes.drain_changes() == {"v-old": None, "v-restored": None}


@pytest.mark.parametrize("remind_hours", [2, 72])
def test_the_drift_step_keeps_a_silent_versions_episodes_for_the_reminder_interval(
    reference: dict[str, Any], remind_hours: int
) -> None:
    """They went after a fixed day of event time whatever CG_MODEL__DRIFT_REMIND_HOURS: with reminders every 72 h a
    version rolled back a day after its promotion alerted a drift still under way two days before its reminder. They
    now stay for the reminder's interval, after which the reminder would be due anyway."""

    def monitor_of(version: str) -> DriftMonitor:
        return DriftMonitor(reference, version, psi_alert=0.25, min_rows=200, now_ms=lambda: CREATED)

    merge = DriftMerge(monitor_of, DriftEpisodes(0.25, min_rows=200, remind_ms=remind_hours * HOUR_MS))
    old, new = monitor_of("v-old"), monitor_of("v-new")
    x, s = _rows(300, np.random.default_rng(16), shift=1.0)
    merge.on_tallies([old.tally(_times(300, 0), x, s)], T0)
    kept = []
    for hour in range(1, remind_hours + 1):  # promoted: v-new only, each hour
        merge.on_tallies([new.tally(_times(300, hour), x, s)], T0 + hour * HOUR_MS)
        kept.append("v-old" in merge.episodes.open)
    # v-old's hour 0 is reported at hour 1; its newest event at the end of hour 0, so silent for the interval at its end
    assert kept == [True] * (remind_hours - 1) + [False], kept
    from jobs.model.drift import idle_after_ms

    assert idle_after_ms(remind_hours * HOUR_MS) == remind_hours * HOUR_MS
    assert idle_after_ms(0) == 24 * HOUR_MS, "without reminders a day, so that the state stays bounded"
