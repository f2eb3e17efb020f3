"""Champion and challenger: pointer files, the registry the job follows, and the promotion command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from infra.settings import ModelSettings, Settings
from jobs.model.fraud_model import LocalModel, ModelArtifactError, pointer_lock
from jobs.model.predictors import ScoringModels, drift_monitors, make_predictor
from jobs.model.registry import CHALLENGER, CURRENT, ModelRegistry, app, read_pointer, write_pointer
from jobs.scoring.rules import ModelResult
from jobs.scoring.scorer import Predictor, Scorer
from schemas.codec import codec
from tests.builders import T0, sale
from tests.fraud_model import challenger_model as other_model
from tests.fraud_model import small_model


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _settings(root: Path, **model: object) -> Settings:
    return Settings(model=ModelSettings(artifact_dir=root, reload_interval_s=5.0, **model))


def _models(root: Path) -> tuple[str, str]:
    champion, challenger = small_model(), other_model()
    assert champion.version != challenger.version
    challenger.save(root, make_current=False)
    champion.save(root)  # CURRENT -> champion
    return champion.version, challenger.version


ITEMS = [(sale(f"t{i}", amount=10.0 + 37 * i).to_avro(), {}) for i in range(20)]


def test_pointer_files_are_written_whole_and_removed_by_none(tmp_path):
    assert read_pointer(tmp_path, CHALLENGER) is None
    write_pointer(tmp_path, CHALLENGER, "gbm-1")
    assert read_pointer(tmp_path, CHALLENGER) == "gbm-1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp file left behind"
    write_pointer(tmp_path, CHALLENGER, None)
    assert read_pointer(tmp_path, CHALLENGER) is None


def test_the_challenger_is_scored_and_recorded_but_the_champion_decides(tmp_path):
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    models = ScoringModels(ModelRegistry(_settings(tmp_path)))
    results = models.predict_batch(ITEMS)
    alone = [r.score for r in small_model().predict_batch(ITEMS)]
    assert [r.score for r in results] == alone
    assert [r.challenger_score for r in results] == [r.score for r in other_model().predict_batch(ITEMS)]
    assert {r.version for r in results} == {f"local:{champ}"}
    assert {r.challenger_version for r in results} == {f"local:{chal}"}


def test_without_a_challenger_results_carry_none(tmp_path):
    _models(tmp_path)
    results = ScoringModels(ModelRegistry(_settings(tmp_path))).predict_batch(ITEMS)
    assert {(r.challenger_score, r.challenger_version) for r in results} == {(None, None)}


def test_a_promotion_applies_to_a_running_predictor_after_the_reload_interval(tmp_path):
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    models = ScoringModels(registry)
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"champion: {chal} (was {champ}); challenger: {champ}" in result.output
    assert read_pointer(tmp_path, CURRENT) == chal and read_pointer(tmp_path, CHALLENGER) == champ
    clock.now = 1.0  # within the interval: still the old champion
    assert models.predict_batch(ITEMS[:1])[0].version == f"local:{champ}"
    clock.now = 6.0
    swapped = models.predict_batch(ITEMS)
    assert {r.version for r in swapped} == {f"local:{chal}"}
    assert {r.challenger_version for r in swapped} == {f"local:{champ}"}
    assert [r.score for r in swapped] == [r.score for r in other_model().predict_batch(ITEMS)]
    assert registry.swaps == 1


def test_promote_prints_the_new_champions_report_and_retire_drops_the_old_one(tmp_path):
    _, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--retire", "--models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"model {chal}" in result.output and "ROC-AUC" in result.output
    assert read_pointer(tmp_path, CHALLENGER) is None


def test_promote_as_a_user_the_system_cannot_name_audits_the_user_id(tmp_path, monkeypatch, user_without_name):
    """``getpass.getuser()`` raised (no passwd entry, no USER): promote died with a traceback."""
    from jobs.model import registry

    _, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    actors: list[str] = []
    monkeypatch.setattr(registry, "_audit", lambda settings, old, new, actor, *rest: actors.append(actor))
    result = CliRunner().invoke(app, ["promote", "--models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert actors == [user_without_name] and read_pointer(tmp_path, CURRENT) == chal


def test_promote_without_a_challenger_is_refused(tmp_path):
    _models(tmp_path)
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code != 0 and "no challenger" in result.output


def test_setting_a_challenger_refuses_a_version_that_does_not_load(tmp_path):
    _models(tmp_path)
    result = CliRunner().invoke(app, ["challenger", "gbm-nope", "--models", str(tmp_path)])
    assert result.exit_code == 2 and "not a model version" in result.output
    assert read_pointer(tmp_path, CHALLENGER) is None


@pytest.mark.parametrize("name", [".", "..", "sub/../x", "ABSOLUTE"])
def test_a_challenger_must_name_a_version_folder_directly_under_the_models_root(tmp_path, name):
    """``.`` and paths load today (``.`` follows the root's own CURRENT) but, promoted, would leave a CURRENT
    the job cannot read."""
    _, chal = _models(tmp_path)
    name = str(tmp_path / chal) if name == "ABSOLUTE" else name
    result = CliRunner().invoke(app, ["challenger", name, "--models", str(tmp_path)])
    assert result.exit_code == 2 and "not a model version" in result.output
    assert read_pointer(tmp_path, CHALLENGER) is None


def test_the_champion_cannot_be_its_own_challenger(tmp_path):
    champ, _ = _models(tmp_path)
    result = CliRunner().invoke(app, ["challenger", champ, "--models", str(tmp_path)])
    assert result.exit_code == 2 and "champion already" in result.output
    assert read_pointer(tmp_path, CHALLENGER) is None


def test_promote_refuses_a_hand_written_challenger_pointer_that_is_not_a_version(tmp_path):
    champ, _ = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, ".")
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, ModelArtifactError)  # one Error: line, no usage
    assert "not a model version" in str(result.exception)
    assert read_pointer(tmp_path, CURRENT) == champ


def _copy(root: Path, version: str, name: str) -> None:
    shutil.copytree(root / version, root / name)


def test_a_copy_of_the_champion_is_neither_a_challenger_nor_promoted_nor_scored_beside_it(tmp_path):
    """Models are told apart by the version in model.json, not by their folders' names."""
    champ, _ = _models(tmp_path)
    _copy(tmp_path, champ, "prod-backup")
    result = CliRunner().invoke(app, ["challenger", "prod-backup", "--models", str(tmp_path)])
    assert result.exit_code == 2 and "champion's model" in result.output
    write_pointer(tmp_path, CHALLENGER, "prod-backup")  # by hand
    registry = ModelRegistry(Settings(model=ModelSettings(artifact_dir=tmp_path)))
    assert registry.champion.version == champ and registry.challenger is None
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code == 1 and "nothing to promote" in str(result.exception)
    write_pointer(tmp_path, CHALLENGER, champ)
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code == 1 and read_pointer(tmp_path, CURRENT) == champ


def test_a_crashed_saves_temp_folder_is_no_version(tmp_path):
    _, chal = _models(tmp_path)
    _copy(tmp_path, chal, f".{chal}.tmp-4242")
    status = CliRunner().invoke(app, ["status", "--models", str(tmp_path)])
    assert ".tmp-" not in status.output
    result = CliRunner().invoke(app, ["challenger", f".{chal}.tmp-4242", "--models", str(tmp_path)])
    assert result.exit_code == 2 and "not a model version" in result.output


def test_status_flags_a_champion_that_is_there_but_cannot_be_loaded(tmp_path):
    champ, _ = _models(tmp_path)
    model_file = next((tmp_path / champ).glob("model.[ct]*"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    result = CliRunner().invoke(app, ["status", "--models", str(tmp_path)])
    assert result.exit_code == 0 and f"{champ} (CANNOT BE LOADED:" in result.output


def test_the_same_model_saved_again_keeps_its_folder_and_says_it_is_the_champion(tmp_path):
    champ, _ = _models(tmp_path)
    before = (tmp_path / champ / "model.json").stat().st_mtime_ns
    assert small_model().save(tmp_path, make_current=False) == tmp_path / champ
    assert (tmp_path / champ / "model.json").stat().st_mtime_ns == before  # not rewritten under a running job


def test_train_saving_its_champion_waits_for_a_pointer_change_under_way(tmp_path):
    """``train`` wrote CURRENT past the lock a ``promote`` holds while it checks and moves the pointers."""
    import threading

    champ, chall = _models(tmp_path)
    model = other_model()
    with pointer_lock(tmp_path):  # a promote between its check and its writes
        saver = threading.Thread(target=model.save, args=(tmp_path,))
        saver.start()
        saver.join(timeout=1.0)
        assert saver.is_alive() and read_pointer(tmp_path, CURRENT) == champ
    saver.join(timeout=10.0)
    assert not saver.is_alive() and read_pointer(tmp_path, CURRENT) == chall


def test_status_of_a_models_root_that_is_not_there_says_so(tmp_path):
    result = CliRunner().invoke(app, ["status", "--models", str(tmp_path / "nope")])
    assert result.exit_code == 1 and isinstance(result.exception, ModelArtifactError)
    assert "no models root" in str(result.exception)


def test_status_flags_a_pointer_to_a_missing_version(tmp_path):
    _models(tmp_path)
    write_pointer(tmp_path, CURRENT, "gbm-20990101-deadbeef")
    result = CliRunner().invoke(app, ["status", "--models", str(tmp_path)])
    assert result.exit_code == 0 and "gbm-20990101-deadbeef (MISSING" in result.output


def test_a_pointer_to_a_missing_model_keeps_the_models_in_use(tmp_path):
    champ, _ = _models(tmp_path)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    write_pointer(tmp_path, CURRENT, "gbm-missing")
    clock.now = 10.0
    assert registry.refresh() is False
    assert registry.champion is not None and registry.champion.version == champ


def test_a_challenger_that_cannot_be_loaded_does_not_stop_the_job_at_start_and_is_taken_once_whole(tmp_path, caplog):
    """The challenger never decides: a CHALLENGER naming a version gone or damaged stopped the job at every start
    (no transaction scored); the champion now scores alone, and the challenger joins once it loads."""
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    moved = tmp_path.parent / f"{tmp_path.name}-away"
    (tmp_path / chal).rename(moved)
    clock = Clock()
    with caplog.at_level("WARNING", logger="checkout_guard.models"):
        registry = ModelRegistry(_settings(tmp_path), clock=clock)
        assert registry.champion is not None and registry.champion.version == champ
        assert registry.challenger is None
        for step in range(10, 100, 5):
            clock.now = float(step)
            assert registry.refresh() is False
    assert len([r for r in caplog.records if "cannot be loaded" in r.getMessage()]) == 1, "logged once"
    moved.rename(tmp_path / chal)
    clock.now = 200.0
    assert registry.refresh() is True
    assert registry.challenger is not None and registry.challenger.version == chal


def test_a_new_champion_is_taken_even_when_its_challenger_cannot_be_loaded(tmp_path):
    """A promotion together with a challenger that does not load: the job kept scoring with the old champion while
    ``status`` named the new one; the new champion decides now, without that challenger."""
    champ, chal = _models(tmp_path)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    write_pointer(tmp_path, CURRENT, chal)
    write_pointer(tmp_path, CHALLENGER, "gbm-20990101-deadbeef")
    clock.now = 10.0
    assert registry.refresh() is True
    assert registry.champion is not None and registry.champion.version == chal
    assert registry.challenger is None


def test_a_promotion_swaps_the_loaded_models_without_reading_them_from_disk_again(tmp_path, monkeypatch):
    """A promotion swaps the two roles: both models are loaded already. Each was read from disk again (a pause in
    scoring), and an old champion whose folder had gone since was lost as challenger."""
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    loads: list[Path] = []
    load = LocalModel.load
    monkeypatch.setattr(LocalModel, "load", classmethod(lambda cls, path: loads.append(path) or load(path)))
    shutil.rmtree(tmp_path / champ)  # the old champion's folder, cleaned away after the job loaded it
    write_pointer(tmp_path, CURRENT, chal)
    write_pointer(tmp_path, CHALLENGER, champ)
    clock.now = 10.0
    assert registry.refresh() is True
    assert registry.champion is not None and registry.champion.version == chal
    assert registry.challenger is not None and registry.challenger.version == champ
    assert loads == []


def test_a_pinned_champion_is_not_moved_by_the_pointer(tmp_path):
    champ, chal = _models(tmp_path)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path, artifact=champ, challenger=chal), clock=clock)
    assert registry.challenger is not None and registry.challenger.version == chal
    write_pointer(tmp_path, CURRENT, chal)
    clock.now = 10.0
    registry.refresh()
    assert registry.champion is not None and registry.champion.version == champ


def test_no_champion_at_start_is_an_error(tmp_path):
    with pytest.raises(ModelArtifactError):
        ModelRegistry(_settings(tmp_path))


class _Remote(Predictor):
    def predict_batch(self, items):
        return [ModelResult(score=123, version="afd:test", time_ms=4) for _ in items]


def test_a_remote_champion_gets_the_local_challenger_beside_it(tmp_path):
    _, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    models = ScoringModels(ModelRegistry(_settings(tmp_path)), remote=_Remote())
    results = models.predict_batch(ITEMS)
    assert {(r.score, r.version, r.time_ms) for r in results} == {(123, "afd:test", 4)}
    assert [r.challenger_score for r in results] == [r.score for r in other_model().predict_batch(ITEMS)]


def test_the_job_publishes_an_hourly_drift_report_and_alerts_when_the_inputs_shift(tmp_path):
    """The champion's inputs of an hour far from its training data: when the hour closes, its report goes
    to ``model_drift`` and a ``MODEL_DRIFT`` alert to ``alerts`` with the batch's decisions."""
    _models(tmp_path)
    settings = _settings(tmp_path)
    models = ScoringModels(ModelRegistry(settings), drift=drift_monitors(settings), psi_alert=0.25)
    scorer = Scorer(settings, predictor=models)
    hour = [sale(f"d{i}", at_s=i, amount=9000.0 + i, card=f"c{i}").to_avro() for i in range(300)]
    rows, _ = scorer.decide_batch([(tx, {}, tx["event_time"]) for tx in hour])
    assert not [r for r in rows if r[0] == scorer.drift_topic], "the hour is still open"
    later = sale("d-later", at_s=3 * 3600, amount=20.0).to_avro()  # past the hour and its grace
    rows, _ = scorer.decide_batch([(later, {}, later["event_time"])])
    reports = [codec("ModelDrift").decode(v) for t, _, v in rows if t == scorer.drift_topic]
    assert len(reports) == 1
    report = reports[0]
    assert report["rows"] == 300 and report["model_version"] == small_model().version
    assert report["alert"] and report["feature_psi"]["amount_log"] > 0.25
    alerts = [codec("Alert").decode(v) for t, _, v in rows if t == scorer.alerts_topic]
    assert [a["kind"] for a in alerts] == ["MODEL_DRIFT"] and alerts[0]["alert_id"] == report["report_id"]


def test_a_rollback_does_not_report_an_hour_of_the_old_champion_twice(tmp_path):
    """Promote twice within an hour (A -> B -> A): A's hour was reported when B took over; A's rows after the
    rollback count as late in a later report, never as a second report under the same id (which would
    overwrite the first in OpenSearch)."""
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    settings = _settings(tmp_path, drift_min_rows=1)
    clock = Clock()
    models = ScoringModels(ModelRegistry(settings, clock=clock), drift=drift_monitors(settings))

    def batch(first_s: int, n: int) -> None:
        models.predict_batch([(sale(f"r{first_s}-{i}", at_s=first_s + i).to_avro(), {}) for i in range(n)])
        models.settle()  # decided (the scorer's part)

    def promote() -> None:
        assert CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)]).exit_code == 0
        clock.now += 6.0  # past the reload interval

    batch(60, 30)
    promote()  # B
    batch(1200, 10)
    promote()  # A again
    batch(2400, 5)
    batch(2 * 3600, 1)  # the next hour, past the grace: closes A's hour
    reports = [report for report, _ in models.drain_reports()]
    ids = [r["report_id"] for r in reports]
    assert len(ids) == len(set(ids)) == 2, ids
    assert [(r["model_version"], r["rows"]) for r in reports] == [(champ, 30), (chal, 10)]
    batch(4 * 3600, 1)  # closes A's next hour: the rollback's 5 rows of the reported hour are its late rows
    [(report, _)] = models.drain_reports()
    assert (report["report_id"], report["rows"], report["late_rows"]) == (f"drift:{champ}:{T0 + 7_200_000}", 1, 5)


def test_a_version_that_failed_to_load_is_taken_once_it_is_whole(tmp_path, caplog, monkeypatch):
    """A version still being copied in (its model file not there yet) fails once; it is tried again after a
    growing pause (not every interval, nor never: the job kept the old champion until a restart while
    ``status`` showed the new one)."""
    champ, chal = _models(tmp_path)
    model_file = tmp_path / chal / "model.cbm"
    data = model_file.read_bytes()
    model_file.unlink()
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    loads: list[float] = []
    load = LocalModel.load
    monkeypatch.setattr(LocalModel, "load", classmethod(lambda cls, path: loads.append(clock.now) or load(path)))
    write_pointer(tmp_path, CURRENT, chal)
    with caplog.at_level("WARNING", logger="checkout_guard.models"):
        for step in range(10, 200, 5):  # every reload interval (5 s) for three minutes
            clock.now = float(step)
            assert registry.refresh() is False
    assert registry.champion is not None and registry.champion.version == champ
    assert len([r for r in caplog.records if "cannot be loaded" in r.getMessage()]) == 1, "logged once"
    assert loads[:4] == [10.0, 15.0, 25.0, 45.0] and len(loads) < 10, "a pause that doubles, up to a minute"
    model_file.write_bytes(data)
    clock.now = 260.0
    assert registry.refresh() is True and registry.champion.version == chal


def test_going_back_to_the_models_in_use_makes_the_next_failure_news_again(tmp_path, caplog):
    champ, chal = _models(tmp_path)
    (tmp_path / chal / "model.json").write_text("{")
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    with caplog.at_level("WARNING", logger="checkout_guard.models"):
        for step, pointer in ((10.0, chal), (20.0, champ), (30.0, chal)):
            write_pointer(tmp_path, CURRENT, pointer)
            clock.now = step
            assert registry.refresh() is False
    assert len([r for r in caplog.records if "cannot be loaded" in r.getMessage()]) == 2


@pytest.mark.parametrize("pointer", ["not text", "a folder"])
def test_an_unreadable_pointer_keeps_the_models_in_use_and_is_one_line_in_status(tmp_path, pointer):
    champ, _ = _models(tmp_path)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    (tmp_path / CURRENT).unlink()
    if pointer == "a folder":
        (tmp_path / CURRENT).mkdir()
    else:
        (tmp_path / CURRENT).write_bytes(b"\xff\xfe\n")
    clock.now = 10.0
    assert registry.refresh() is False
    assert registry.champion is not None and registry.champion.version == champ
    with pytest.raises(ModelArtifactError, match="cannot be read"):
        ModelRegistry(_settings(tmp_path))
    status = subprocess.run(  # the module's python -m, as make models runs it
        [sys.executable, "-m", "jobs.model.registry", "status", "--models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1 and "Error: the pointer" in status.stderr and "Traceback" not in status.stderr


def test_a_challenger_whose_model_json_is_damaged_is_refused_with_one_line(tmp_path):
    champ, chal = _models(tmp_path)
    (tmp_path / chal / "model.json").write_text("{")
    result = CliRunner().invoke(app, ["challenger", chal, "--models", str(tmp_path)])
    assert result.exit_code == 2 and "cannot be loaded" in result.output and "unreadable model.json" in result.output
    assert read_pointer(tmp_path, CHALLENGER) is None


def test_a_damaged_drift_reference_costs_that_models_drift_reports_not_its_decisions(tmp_path, caplog):
    """A model.json whose drift reference is damaged still scores; only its drift reports are off (logged)."""
    champ, chal = _models(tmp_path)
    path = tmp_path / chal / "model.json"
    meta = json.loads(path.read_text())
    meta["reference"]["features"]["amount_log"]["expected"].append(0.0)
    path.write_text(json.dumps(meta))
    write_pointer(tmp_path, CURRENT, chal)
    settings = _settings(tmp_path, drift_min_rows=1)
    models = ScoringModels(ModelRegistry(settings), drift=drift_monitors(settings))
    with caplog.at_level("WARNING", logger="checkout_guard.predictors"):
        results = models.predict_batch(ITEMS)
        models.settle()
        models.predict_batch([(sale("later", at_s=3 * 3600).to_avro(), {})])
        models.settle()
    assert len(results) == len(ITEMS) and all(r.version == f"local:{chal}" for r in results)
    assert not list(models.drain_reports())
    [warning] = [r.getMessage() for r in caplog.records if "no drift reports" in r.getMessage()]
    assert f"model {chal}" in warning and "proportions for" in warning


def test_promote_whose_audit_event_is_not_delivered_is_one_line_and_moves_nothing(tmp_path):
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.model.registry", "promote", "--timeout-s", "1", "--models", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CG_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"},  # nothing listens there
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: audit event not sent: Kafka at 127.0.0.1:1 did not answer within 1 s"), error
    assert error.endswith("the models are unchanged")
    assert (read_pointer(tmp_path, CURRENT), read_pointer(tmp_path, CHALLENGER)) == (champ, chal)


def test_promote_to_a_cluster_without_the_audit_topic_names_it_and_moves_nothing(tmp_path, monkeypatch):
    from infra.clients import kafka as kafka_clients
    from jobs.model.registry import AuditNotDelivered

    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    monkeypatch.setattr(kafka_clients, "producer", lambda *a, **k: object())

    def no_audit_topic(client, source, *topics, timeout_s=10.0):
        raise kafka_clients.TopicMissing(f"no topic {', '.join(topics)} on Kafka at k:9092: created by an admin")

    monkeypatch.setattr(kafka_clients, "require_topics", no_audit_topic)
    result = CliRunner().invoke(app, ["promote", "--models", str(tmp_path)])
    assert isinstance(result.exception, AuditNotDelivered), result.output
    assert str(result.exception) == (
        "audit event not sent: no topic audit on Kafka at k:9092: created by an admin; the models are unchanged"
    )
    assert (read_pointer(tmp_path, CURRENT), read_pointer(tmp_path, CHALLENGER)) == (champ, chal)


@pytest.mark.parametrize("names", [None, 5])
def test_a_model_json_whose_feature_names_are_not_a_list_keeps_the_models_in_use_and_is_refused_in_one_line(
    tmp_path, names
):
    """``"feature_names": null`` (a hand-edited or foreign model.json) raised a TypeError out of the job's refresh,
    which stopped scoring, and a traceback out of ``challenger``, instead of "does not load"."""
    champ, chal = _models(tmp_path)
    meta = json.loads((tmp_path / chal / "model.json").read_text())
    meta["feature_names"] = names
    (tmp_path / chal / "model.json").write_text(json.dumps(meta))
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    write_pointer(tmp_path, CHALLENGER, chal)
    clock.now = 10.0
    assert registry.refresh() is False
    assert registry.champion is not None and registry.champion.version == champ and registry.challenger is None
    result = CliRunner().invoke(app, ["challenger", chal, "--models", str(tmp_path)])
    assert result.exit_code == 2 and "other features" in result.output
    status = CliRunner().invoke(app, ["status", "--models", str(tmp_path)])
    assert status.exit_code == 0 and f"challenger: {chal} (CANNOT BE LOADED: model" in status.output


def _run_inside(monkeypatch, args: list[str]) -> list[Result]:
    """Run the command ``args`` once, inside the next command's window between reading the pointers and moving
    them (while it loads the version it checks): the two commands interleaved, deterministically."""
    from jobs.model import registry

    original, results, started = registry._check_version, [], []

    def check_then_run_the_other(root, version):
        model = original(root, version)
        if not started:  # once: the other command checks a version too
            started.append(True)
            results.append(CliRunner().invoke(app, args))
        return model

    monkeypatch.setattr(registry, "_check_version", check_then_run_the_other)
    return results


def _audited(monkeypatch) -> list[tuple[str | None, str]]:
    from jobs.model import registry

    sent: list[tuple[str | None, str]] = []
    monkeypatch.setattr(registry, "_audit", lambda settings, old, new, *rest: sent.append((old, new)))
    return sent


def test_two_promotes_at_once_swap_the_models_once_with_one_audit_event(tmp_path, monkeypatch):
    """Both promotes read (A, B): the second to write swapped the models back and both sent MODEL_PROMOTE."""
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    sent = _audited(monkeypatch)
    inner = _run_inside(monkeypatch, ["promote", "--models", str(tmp_path)])
    outer = CliRunner().invoke(app, ["promote", "--models", str(tmp_path)])
    assert inner[0].exit_code == 0, inner[0].output
    assert outer.exit_code == 2, outer.output
    [error] = [line for line in outer.output.splitlines() if line.startswith("Error:")]
    assert f"champion {champ} -> {chal}" in error and f"challenger {chal} -> {champ}" in error
    assert (read_pointer(tmp_path, CURRENT), read_pointer(tmp_path, CHALLENGER)) == (chal, champ)
    assert sent == [(champ, chal)]


def test_a_challenger_set_during_a_promote_is_kept_and_the_promote_refused(tmp_path, monkeypatch):
    champ, chal = _models(tmp_path)
    shutil.copytree(tmp_path / chal, tmp_path / "gbm-third")  # another version folder
    write_pointer(tmp_path, CHALLENGER, chal)
    sent = _audited(monkeypatch)
    inner = _run_inside(monkeypatch, ["challenger", "gbm-third", "--models", str(tmp_path)])
    outer = CliRunner().invoke(app, ["promote", "--models", str(tmp_path)])
    assert inner[0].exit_code == 0, inner[0].output
    assert outer.exit_code == 2 and f"challenger {chal} -> gbm-third" in outer.output, outer.output
    assert (read_pointer(tmp_path, CURRENT), read_pointer(tmp_path, CHALLENGER)) == (champ, "gbm-third")
    assert sent == []


def test_a_challenger_command_during_a_promote_is_refused_not_applied_to_the_new_champion(tmp_path, monkeypatch):
    """It checked its version against the old champion; set after the promote, it named a copy of the new one."""
    champ, chal = _models(tmp_path)
    shutil.copytree(tmp_path / chal, tmp_path / "gbm-copy")
    write_pointer(tmp_path, CHALLENGER, chal)
    sent = _audited(monkeypatch)
    inner = _run_inside(monkeypatch, ["promote", "--models", str(tmp_path)])
    outer = CliRunner().invoke(app, ["challenger", "gbm-copy", "--models", str(tmp_path)])
    assert inner[0].exit_code == 0, inner[0].output
    assert outer.exit_code == 2 and f"champion {champ} -> {chal}" in outer.output, outer.output
    assert (read_pointer(tmp_path, CURRENT), read_pointer(tmp_path, CHALLENGER)) == (chal, champ)
    assert sent == [(champ, chal)]


def test_the_audit_event_is_sent_under_the_pointer_lock(tmp_path, monkeypatch):
    """A promote waiting for its audit event holds the lock: another command's check waits for its write."""
    import fcntl

    from jobs.model import fraud_model, registry

    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    held: list[bool] = []

    def audit(*_args: object) -> None:
        with (tmp_path / fraud_model.LOCK).open("a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)

    monkeypatch.setattr(registry, "_audit", audit)
    assert CliRunner().invoke(app, ["promote", "--models", str(tmp_path)]).exit_code == 0
    assert held == [True]


class _MapState(dict):
    def put_all(self, entries: dict) -> None:
        self.update(entries)

    def remove(self, key: str) -> None:
        del self[key]


class _Runtime:
    """The drift step's runtime context: its one map of state (the drift episodes)."""

    def get_map_state(self, descriptor: object) -> _MapState:
        return _MapState()


def test_a_champion_kept_under_another_folder_name_gets_drift_reports_in_both_layouts(tmp_path):
    """The partitioned layout's drift step finds the model of its slots' tallies by the version in model.json, as
    the registry does: a champion copied in under another folder name reports there as in the single layout."""
    from jobs.flink.steps import DriftMergeFunction

    champ, _ = _models(tmp_path)
    shutil.move(tmp_path / champ, tmp_path / "prod-nov")
    write_pointer(tmp_path, CURRENT, "prod-nov")
    settings = _settings(tmp_path)
    hour = [(sale(f"d{i}", at_s=i, amount=9000.0 + i, card=f"c{i}").to_avro(), {}) for i in range(300)]
    later = [(sale("d-later", at_s=3 * 3600, amount=20.0).to_avro(), {})]  # past the hour and its grace
    single = ScoringModels(ModelRegistry(settings), drift=drift_monitors(settings))
    slot = ScoringModels(ModelRegistry(settings), drift=drift_monitors(settings), tally_drift=True)
    for models, batches in ((single, [hour, later]), (slot, [hour])):
        for batch in batches:
            models.predict_batch(batch)
            models.settle()
    expected = [(r["model_version"], r["rows"]) for r, _ in single.drain_reports()]
    assert expected == [(champ, 300)]
    step = DriftMergeFunction(settings)
    step.open(_Runtime())
    reports = step.merge.on_tallies(slot.drain_tallies(), T0 + 3 * 3_600_000)
    assert [(r["model_version"], r["rows"]) for r, _ in reports] == expected


def test_a_version_lookup_loads_an_intact_copy_when_the_first_copy_is_damaged(tmp_path, caplog):
    """The drift step and the SageMaker calibration find a model by its version: the first folder holding it was
    loaded and, damaged, nothing was, though a copy of the same version lay intact under another name. Each copy is
    tried in turn; a warning names the damaged one; only when none loads is the lookup refused."""
    from jobs.model.registry import load_version

    champ, _ = _models(tmp_path)
    shutil.copytree(tmp_path / champ, tmp_path / "prod-nov")
    model_file = next((tmp_path / champ).glob("model.[ct]*"))  # the folder of the version's name, looked at first
    model_file.write_bytes(model_file.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="checkout_guard.models"):
        model = load_version(tmp_path, champ)
    assert model.version == champ and model.path == tmp_path / "prod-nov"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and f"copy in {tmp_path / champ} does not load" in warned[0], warned
    copy = tmp_path / "prod-nov" / model_file.name
    copy.write_bytes(copy.read_bytes()[:100])
    with pytest.raises(ModelArtifactError, match=f"no copy of model {champ} .* loads"):
        load_version(tmp_path, champ)


def _mismatched_challenger() -> LocalModel:
    """A challenger whose model file was fitted on 3 columns though its ``model.json`` names this code's features:
    it loads, and its learner refuses every batch (LightGBM: "the number of features ... is not the same")."""
    import lightgbm as lgb
    import numpy as np

    from jobs.model.fraud_model import Booster

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1}, lgb.Dataset(x, (x[:, 0] > 0).astype(int)), 3
    )
    meta = {**other_model().meta, "version": "gbm-20990101-0badf00d", "learner": "lightgbm"}
    return LocalModel(Booster("lightgbm", booster), meta)


def test_a_challenger_that_fails_to_score_leaves_the_champions_decisions_alone(tmp_path, caplog):
    """The challenger never decides: its model raising on a batch made the batch raise, so every transaction was
    decided again one by one and dead-lettered. The champion's scores now go out without challenger scores, and
    the failure is logged once (not per batch)."""
    champion = small_model()
    models = ScoringModels(ModelRegistry.fixed(champion, _mismatched_challenger()))
    with caplog.at_level("WARNING", logger="checkout_guard.predictors"):
        results = models.predict_batch(ITEMS)
        again = models.predict_batch(ITEMS)
    assert [r.score for r in results] == [r.score for r in champion.predict_batch(ITEMS)] == [r.score for r in again]
    assert {(r.version, r.challenger_score, r.challenger_version) for r in results} == {
        (f"local:{champion.version}", None, None)
    }
    warned = [r.getMessage() for r in caplog.records if "failed to score" in r.getMessage()]
    assert len(warned) == 1 and "gbm-20990101-0badf00d" in warned[0] and "LightGBMError" in warned[0]


def test_a_reload_while_promote_moves_the_pointers_waits_for_both(tmp_path):
    """``promote`` renames ``CURRENT`` and then ``CHALLENGER`` under the pointer lock. A reload between the two
    read one model named for both roles: it dropped the old champion, and a reload later read it from disk again,
    or lost it as challenger when its folder had gone since. The job now reads the pointers only when no command
    holds the lock, and swaps the two loaded models once both are moved."""
    champ, chal = _models(tmp_path)
    write_pointer(tmp_path, CHALLENGER, chal)
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    old_champion = registry.champion
    shutil.rmtree(tmp_path / champ)  # the old champion's folder, cleaned away after the job loaded it
    with pointer_lock(tmp_path):  # the promotion half done: CURRENT moved, CHALLENGER not yet
        write_pointer(tmp_path, CURRENT, chal)
        clock.now = 10.0
        assert registry.refresh() is False
        assert registry.champion is old_champion
        assert registry.challenger is not None and registry.challenger.version == chal
        write_pointer(tmp_path, CHALLENGER, champ)
    clock.now = 20.0
    assert registry.refresh() is True
    assert registry.champion is not None and registry.champion.version == chal
    assert registry.challenger is old_champion and registry.swaps == 1


def test_a_promotion_swaps_models_kept_in_folders_of_other_names_without_reading_them_again(tmp_path, monkeypatch):
    """Pointers name folders, and a folder may hold a model under another name (``prod``, ``candidate``). The
    registry reused a loaded model only when the folder bore its version's name: a promotion of such folders read
    the new champion from disk again (a pause in scoring) and lost the old champion as challenger once its folder
    had gone. Both loaded models now change roles in memory, as for folders of the versions' names."""
    champ, chal = _models(tmp_path)
    _copy(tmp_path, champ, "prod")
    _copy(tmp_path, chal, "candidate")
    shutil.rmtree(tmp_path / champ)
    shutil.rmtree(tmp_path / chal)
    write_pointer(tmp_path, CURRENT, "prod")
    write_pointer(tmp_path, CHALLENGER, "candidate")
    clock = Clock()
    registry = ModelRegistry(_settings(tmp_path), clock=clock)
    old_champion, old_challenger = registry.champion, registry.challenger
    assert old_champion is not None and old_challenger is not None and old_challenger.version == chal
    result = CliRunner().invoke(app, ["promote", "--no-audit", "--models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    loads: list[Path] = []
    load = LocalModel.load
    monkeypatch.setattr(LocalModel, "load", classmethod(lambda cls, path: loads.append(path) or load(path)))
    shutil.rmtree(tmp_path / "prod")  # the old champion's folder, cleaned away after the promotion
    clock.now = 10.0
    assert registry.refresh() is True
    assert registry.champion is old_challenger and registry.challenger is old_champion
    assert loads == []


def test_status_lists_numbered_versions_by_their_number(tmp_path):
    """``v10`` is newer than ``v9``: by plain name it was listed between ``v1`` and ``v2``."""
    for name in ("v10", "v9", "v1", "v2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    result = CliRunner().invoke(app, ["status", "--models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-4:] == ["  v1", "  v2", "  v9", "  v10"]


def _record_disk_order(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of the file or folder it names) and rename, in order."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fd's file through /proc")
def test_artifacts_and_pointers_are_on_disk_before_anything_names_them(tmp_path, monkeypatch):
    """Renamed without fsync, a power cut could leave CURRENT empty, or naming a version whose files never reached
    the disk: the job then did not start. Each file is synced before its rename, each folder after it."""
    root = tmp_path.resolve()
    model = small_model()
    calls = _record_disk_order(monkeypatch)
    model.save(root)
    version = model.version
    renames = [i for i, (op, _) in enumerate(calls) if op == "replace"]
    assert len(renames) == 2, calls  # the version folder, then CURRENT
    folder_rename, pointer_rename = renames
    tmp_folder = calls[folder_rename][1].split(" -> ")[0]
    synced_before = {path for op, path in calls[:folder_rename] if op == "fsync"}
    written = {os.path.join(tmp_folder, f.name) for f in (root / version).iterdir()}
    assert written and written | {tmp_folder} <= synced_before, calls
    assert ("fsync", str(root)) in calls[folder_rename + 1 : pointer_rename], "the folder's new name synced first"
    tmp_pointer = calls[pointer_rename][1].split(" -> ")[0]
    assert ("fsync", tmp_pointer) in calls[folder_rename + 1 : pointer_rename], "CURRENT's bytes synced first"
    assert calls[pointer_rename + 1 :] == [("fsync", str(root))], "the rename of CURRENT synced"
    assert read_pointer(root, CURRENT) == version

    calls.clear()
    write_pointer(root, CHALLENGER, "gbm-x")
    assert [op for op, _ in calls] == ["fsync", "replace", "fsync"] and calls[-1] == ("fsync", str(root)), calls
    calls.clear()
    write_pointer(root, CHALLENGER, None)
    assert calls == [("fsync", str(root))] and read_pointer(root, CHALLENGER) is None


def _drifting_hours(scorer: Scorer, hours: range) -> tuple[list[dict], list[dict], list]:
    """300 sales far from the training data in each of ``hours``, one batch per hour; the reports, the alerts
    and the state writes of the hours closed (each batch closes the hour two before it: the grace)."""
    reports, alerts, writes = [], [], []
    for h in hours:
        batch = [sale(f"h{h}-{i}", at_s=h * 3600 + i, amount=9000.0 + i, card=f"c{i}").to_avro() for i in range(300)]
        rows, made = scorer.decide_batch([(tx, {}, tx["event_time"]) for tx in batch])
        reports += [codec("ModelDrift").decode(v) for t, _, v in rows if t == scorer.drift_topic]
        alerts += [codec("Alert").decode(v) for t, _, v in rows if t == scorer.alerts_topic]
        writes += [w for w in made if w[0] == "drift_episodes"]
    return reports, alerts, writes


def test_a_drift_that_lasts_hours_alerts_once_when_it_starts_not_every_hour(tmp_path):
    """Hours in a row far from the training data: a report each hour, all past the setting, but one
    ``MODEL_DRIFT`` alert, the first hour's (before, one every hour for as long as the drift lasted)."""
    _models(tmp_path)
    settings = _settings(tmp_path)
    scorer = Scorer(settings, predictor=make_predictor(settings))
    reports, alerts, _ = _drifting_hours(scorer, range(5))
    assert len(reports) == 3 and all(r["alert"] for r in reports)  # the last two hours are still open
    assert [a["alert_id"] for a in alerts] == [reports[0]["report_id"]]


def test_a_drift_under_way_is_not_alerted_again_after_a_restart_from_its_state(tmp_path):
    """The open episodes are job state (``drift_episodes``): a job restored from it goes on without a second
    alert for the same drift, while one without it alerts again."""
    _models(tmp_path)
    settings = _settings(tmp_path)
    first = Scorer(settings, predictor=make_predictor(settings))
    _, alerts, writes = _drifting_hours(first, range(3))
    assert len(alerts) == 1 and writes and all(value for _, _, value in writes)
    restored = make_predictor(settings)
    restored.restore_drift({key: value for _, key, value in writes})
    _, alerts, _ = _drifting_hours(Scorer(settings, predictor=restored), range(3, 6))
    assert alerts == []
    _, alerts, _ = _drifting_hours(Scorer(settings, predictor=make_predictor(settings)), range(6, 9))
    assert len(alerts) == 1


def test_a_drift_still_past_the_setting_is_reminded_after_the_reminder_interval(tmp_path):
    """``drift_remind_hours``: an alert again that long after the last one while the drift lasts; 0: never."""
    _models(tmp_path)
    settings = _settings(tmp_path, drift_remind_hours=2)
    _, alerts, _ = _drifting_hours(Scorer(settings, predictor=make_predictor(settings)), range(7))
    assert [a["event_time"] for a in alerts] == [T0, T0 + 2 * 3_600_000, T0 + 4 * 3_600_000]
    assert "a reminder: past the threshold since 2026-" in alerts[1]["summary"]
    never = _settings(tmp_path, drift_remind_hours=0)
    _, alerts, _ = _drifting_hours(Scorer(never, predictor=make_predictor(never)), range(7))
    assert len(alerts) == 1


@pytest.mark.parametrize("retire", [True, False])
def test_a_retired_models_open_drift_episodes_leave_the_jobs_state_and_a_challengers_stay(tmp_path, retire):
    """A champion drifting when it was promoted away kept its open episodes in the job's state (``drift_episodes``) for
    ever, one entry per version retired. Once it is neither champion nor challenger they are removed, written as
    ``None`` so the checkpoint forgets them; kept as challenger (``promote`` without ``--retire``), a rollback may
    bring it back, and they stay."""
    champ, chal = _models(tmp_path)
    settings = _settings(tmp_path)
    predictor = make_predictor(settings)
    assert isinstance(predictor, ScoringModels)
    scorer = Scorer(settings, predictor=predictor)
    _, alerts, writes = _drifting_hours(scorer, range(3))
    assert len(alerts) == 1 and {key for _, key, value in writes if value} == {champ}
    write_pointer(tmp_path, CURRENT, chal)  # promote, the old champion retired or kept as challenger
    write_pointer(tmp_path, CHALLENGER, None if retire else champ)
    assert predictor.registry.refresh(force=True)
    _, alerts, writes = _drifting_hours(scorer, range(3, 5))
    assert alerts == [], "the old champion's last hours are no new episode"
    if retire:
        assert ("drift_episodes", champ, None) in writes, writes
        assert champ not in predictor.episodes.open
    else:
        assert [w for w in writes if w[1] == champ and w[2] is None] == []
        assert champ in predictor.episodes.open


def test_a_retired_models_drift_episodes_restored_from_a_checkpoint_leave_the_jobs_state(tmp_path):
    """A checkpoint taken before a version was retired brought its episodes back at every restart: they are removed
    at the first batch, once the job knows the roles."""
    champ, _ = _models(tmp_path)
    settings = _settings(tmp_path)
    predictor = make_predictor(settings)
    assert isinstance(predictor, ScoringModels)
    predictor.restore_drift({"gbm-retired": {"score": [T0, T0]}})
    _, _, writes = _drifting_hours(Scorer(settings, predictor=predictor), range(2))
    assert ("drift_episodes", "gbm-retired", None) in writes
    assert set(predictor.episodes.open) <= {champ}


def _unpacked(archive: Path, into: Path) -> Path:
    """``archive`` extracted as Flink extracts a ``pyArchives`` zip: into a folder of the archive's name."""
    import zipfile

    folder = into / "models.zip"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(folder)
    return folder


def test_pack_ships_the_champion_and_challenger_alone_and_the_job_loads_them_from_it(tmp_path):
    """Managed Flink has no models folder of its own: the application zip must carry the trained models, or the job
    scored real traffic with the synthetic default trained on generated data at start."""
    root = tmp_path / "models"
    champ, chal = _models(root)
    write_pointer(root, CHALLENGER, chal)
    small_model().save(root / "old", make_current=False)  # another version, not named by a pointer
    with pointer_lock(root):
        pass  # a lock file, as the commands leave one
    out = tmp_path / "lib-models.zip"
    result = CliRunner().invoke(app, ["pack", str(out), "--models", str(root)])
    assert result.exit_code == 0, result.output
    assert f"champion {champ}, challenger {chal}" in result.output
    unpacked = _unpacked(out, tmp_path / "worker")
    assert sorted(p.name for p in unpacked.iterdir()) == sorted([CURRENT, CHALLENGER, champ, chal])
    assert {p.relative_to(unpacked / champ) for p in (unpacked / champ).rglob("*")} == {
        p.relative_to(root / champ) for p in (root / champ).rglob("*")
    }
    models = ScoringModels(ModelRegistry(_settings(unpacked, auto_train=False))).predict_batch(ITEMS)
    assert {(r.version, r.challenger_version) for r in models} == {(f"local:{champ}", f"local:{chal}")}


def test_pack_of_one_version_ships_it_as_the_champion_without_a_challenger(tmp_path):
    champ, chal = _models(tmp_path / "models")
    out = tmp_path / "models.zip"
    result = CliRunner().invoke(app, ["pack", str(out), "--version", chal, "--models", str(tmp_path / "models")])
    assert result.exit_code == 0, result.output
    unpacked = _unpacked(out, tmp_path / "worker")
    assert sorted(p.name for p in unpacked.iterdir()) == sorted([CURRENT, chal])
    assert read_pointer(unpacked, CURRENT) == chal and champ not in result.output


def test_pack_refuses_a_models_root_without_a_champion_or_a_version_that_does_not_load(tmp_path):
    out = tmp_path / "models.zip"
    result = CliRunner().invoke(app, ["pack", str(out), "--models", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "no champion" in str(result.exception)
    _models(tmp_path / "models")
    result = CliRunner().invoke(app, ["pack", str(out), "--version", "gbm-nope", "--models", str(tmp_path / "models")])
    assert result.exit_code != 0 and "not a model version" in str(result.exception)
    assert not list(tmp_path.glob("*.zip*")), "nothing written, no temporary file left"
