"""The local stack's Prometheus: its generated scrape config covers every process of the metrics
contract, it listens on the bind host with its data under the stack dir, and a machine without the
binary gets a StackError that says to run ``make setup``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra import stack
from infra.metrics import PROCESSES, scrape_targets
from infra.settings import MetricsSettings, Settings
from infra.stack import Endpoints, StackError, StackPaths, prometheus_config


def settings_in(tmp_path: Path, **metrics: object) -> Settings:
    return Settings(stack_dir=tmp_path, metrics=MetricsSettings(**metrics))  # type: ignore[arg-type]


def test_one_scrape_job_per_process_labelled_with_its_name(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, base_port=39460, scrape_interval_s=5.0)
    config = yaml.safe_load(prometheus_config(settings))
    jobs = {job["job_name"]: job.get("static_configs") for job in config["scrape_configs"]}
    assert list(jobs) == [*PROCESSES, "flink-cluster"]
    for process, target in scrape_targets(settings).items():
        assert jobs[process] == [{"targets": [target], "labels": {"process": process}}]
    assert jobs["dashboard"][0]["targets"] == ["127.0.0.1:39467"]
    assert config["global"]["scrape_interval"] == "5s"


def test_the_scrape_timeout_never_exceeds_a_short_interval(tmp_path: Path) -> None:
    short = yaml.safe_load(prometheus_config(settings_in(tmp_path, scrape_interval_s=1.5)))["global"]
    assert (short["scrape_interval"], short["scrape_timeout"]) == ("1500ms", "1500ms")
    long = yaml.safe_load(prometheus_config(settings_in(tmp_path, scrape_interval_s=30)))["global"]
    assert (long["scrape_interval"], long["scrape_timeout"]) == ("30s", "10s")


def test_prometheus_listens_on_the_bind_host_with_its_data_under_the_stack_dir(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, prometheus_port=39490).model_copy(update={"bind_host": "10.1.2.3"})
    paths, ep = StackPaths.of(settings), Endpoints.of(settings)
    cmd = stack._prometheus_command("/usr/bin/prometheus", paths, ep)
    assert "--web.listen-address=10.1.2.3:39490" in cmd
    assert f"--storage.tsdb.path={tmp_path.resolve() / 'data' / 'prometheus'}" in cmd
    assert f"--config.file={tmp_path.resolve() / 'conf' / 'prometheus.yml'}" in cmd
    assert f"--storage.tsdb.retention.time={stack.PROMETHEUS_RETENTION}" in cmd
    assert stack._marker("prometheus", paths) in " ".join(cmd)  # how `down` and `status` find it again
    assert ep.ports("prometheus") == [("10.1.2.3", 39490)]


def test_a_machine_without_prometheus_is_told_to_run_make_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.shutil, "which", lambda *a, **k: None)
    settings = settings_in(tmp_path)
    with pytest.raises(StackError, match=r"prometheus is not installed .*run `make setup`"):
        stack._start_prometheus(settings, StackPaths.of(settings), Endpoints.of(settings))


def test_the_flink_clusters_members_are_found_from_the_file_flink_up_writes(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    config = yaml.safe_load(prometheus_config(settings))
    [cluster] = [job for job in config["scrape_configs"] if job["job_name"] == "flink-cluster"]
    [discovery] = cluster["file_sd_configs"]
    assert discovery["files"] == [str(tmp_path.resolve() / "flink-cluster" / "prometheus-targets.json")]
