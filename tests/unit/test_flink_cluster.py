"""The standalone Flink cluster's generated config and command lines (infra/flink_cluster.py), and the job's
split between program-level options (a cluster takes them from ``flink run``) and the mini-cluster's own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from infra import flink_cluster as fc
from infra import settings as settings_module
from infra.processes import MARKER
from infra.settings import FlinkClusterSettings, MetricsSettings, Settings, get_settings

JAVA = Path("/usr/lib/jvm/java-17-openjdk-amd64")
PYTHON = "/repo/.venv/bin/python"


def _settings(tmp_path: Path, **flink: object) -> Settings:
    return Settings(
        stack_dir=tmp_path / "stack",
        bind_host="127.0.0.2",
        flink=FlinkClusterSettings(cluster_dir=tmp_path / "cluster", **flink),  # type: ignore[arg-type]
    )


def test_cluster_dir_defaults_to_the_stack_dir_and_follows_the_setting(tmp_path: Path) -> None:
    assert fc.ClusterPaths.of(Settings(stack_dir=tmp_path)).root == (tmp_path / "flink-cluster").resolve()
    paths = fc.ClusterPaths.of(_settings(tmp_path))
    assert paths.root == (tmp_path / "cluster").resolve()
    assert paths.pid("taskmanager-1") == paths.root / "run" / "taskmanager-1.pid"
    assert paths.config_yaml == paths.root / "conf" / "config.yaml"


def test_a_jobmanager_and_each_taskmanager_get_their_own_ports_and_resource_id(tmp_path: Path) -> None:
    settings = _settings(tmp_path, taskmanagers=3, taskmanager_base_port=7000, rest_port=7081, rpc_port=7123)
    members = fc.members(settings)
    assert [m.name for m in members] == ["jobmanager", "taskmanager-0", "taskmanager-1", "taskmanager-2"]
    assert members[0].is_jobmanager and not members[0].dynamic
    assert fc.member_ports(settings, members[0]) == [7081, 7123, settings.flink.blob_port]
    tm_ports = [fc.member_ports(settings, m) for m in members[1:]]
    assert tm_ports == [[7000, 7001], [7002, 7003], [7004, 7005]]
    assert dict(members[2].dynamic)["taskmanager.resource-id"] == "taskmanager-1"


def test_member_command_starts_the_wheels_script_in_the_foreground_with_its_options(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    jm, tm0, _ = fc.members(settings)
    flink = Path("/wheel/pyflink")
    assert fc.member_command(flink, jm) == ["/wheel/pyflink/bin/jobmanager.sh", "start-foreground"]
    cmd = fc.member_command(flink, tm0)
    assert cmd[:2] == ["/wheel/pyflink/bin/taskmanager.sh", "start-foreground"]
    pairs = list(zip(cmd[2::2], cmd[3::2], strict=True))
    assert all(flag == "-D" for flag, _ in pairs)
    assert "taskmanager.rpc.port=6130" in [kv for _, kv in pairs]
    assert "taskmanager.data.port=6131" in [kv for _, kv in pairs]


def test_members_get_a_clean_environment_with_the_venv_first_on_the_path(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = fc.ClusterPaths.of(settings)
    env = fc.member_env(paths, fc.members(settings)[1], JAVA, Path("/wheel/pyflink"), PYTHON)
    assert env["PATH"].split(":")[0] == "/repo/.venv/bin"  # PEMJA finds its stdlib from this python3
    assert env["FLINK_CONF_DIR"] == str(paths.conf)
    assert env["FLINK_LIB_DIR"] == str(paths.lib)
    assert env["FLINK_PLUGINS_DIR"] == str(paths.plugins)
    assert env["FLINK_PID_DIR"] == str(paths.run) and env["FLINK_LOG_DIR"] == str(paths.logs)
    assert env["JAVA_HOME"] == str(JAVA)
    assert not [k for k in env if k.startswith("CG_") or k == MARKER], "the cluster is not the caller's run"


def test_markers_tell_the_jobmanager_and_each_taskmanager_of_this_cluster_apart(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = fc.ClusterPaths.of(settings)
    markers = [fc.member_marker(paths, m) for m in fc.members(settings)]
    assert len(set(markers)) == 3
    assert all(f"--configDir {paths.conf}" in m for m in markers)
    other = fc.ClusterPaths.of(_settings(tmp_path / "other"))
    assert fc.member_marker(other, fc.members(settings)[1]) != markers[1]


def test_cluster_config_binds_the_bind_host_and_carries_ports_memory_checkpoints_and_python(tmp_path: Path) -> None:
    settings = _settings(tmp_path, rest_port=18081, rpc_port=16123, blob_port=16124, taskmanager_memory="1g")
    paths = fc.ClusterPaths.of(settings)
    options = fc.cluster_options(settings, paths, JAVA, PYTHON, reporter=False)
    assert options["rest.port"] == "18081" and options["jobmanager.rpc.port"] == "16123"
    assert options["blob.server.port"] == "16124"
    for key in ("jobmanager.bind-host", "taskmanager.bind-host", "rest.bind-address"):
        assert options[key] == "127.0.0.2", key
    assert options["rest.address"] == options["taskmanager.host"] == options["jobmanager.rpc.address"] == "127.0.0.2"
    assert options["taskmanager.numberOfTaskSlots"] == "1"
    assert options["taskmanager.memory.process.size"] == "1g"
    assert options["execution.checkpointing.dir"] == settings.checkpoint_dir.resolve().as_uri()
    assert options["python.executable"] == options["python.client.executable"] == PYTHON
    assert options["env.java.home"] == str(JAVA)
    assert options["io.tmp.dirs"].startswith(str(paths.root))
    assert not [key for key in options if key.startswith("metrics.")]


def test_cluster_config_loads_the_jobs_reporter_on_a_port_range_bound_to_the_bind_host(tmp_path: Path) -> None:
    settings = _settings(tmp_path, metrics_ports="19470-19479")
    options = fc.cluster_options(settings, fc.ClusterPaths.of(settings), JAVA, PYTHON, reporter=True)
    assert options["metrics.reporters"] == fc.REPORTER
    assert options["metrics.reporter.prom.factory.class"] == fc.REPORTER_FACTORY
    assert options["metrics.reporter.prom.host"] == "127.0.0.2"
    assert options["metrics.reporter.prom.port"] == "19470-19479"  # three processes, one port each


def test_config_yaml_is_flat_yaml_flink_reads_back_as_strings(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    options = fc.cluster_options(settings, fc.ClusterPaths.of(settings), JAVA, PYTHON, reporter=True)
    text = fc.config_yaml(options)
    assert text.startswith("# Generated by infra/flink_cluster.py")
    assert yaml.safe_load(text) == options


def test_submit_runs_the_job_module_unchanged_detached_at_the_given_parallelism() -> None:
    cmd = fc.submit_command(Path("/wheel/pyflink"), 2, PYTHON)
    assert cmd == [
        "/wheel/pyflink/bin/flink",
        *("run", "-d", "-p", "2", "-pym", "jobs.flink.job", "-pyexec", PYTHON, "-pyclientexec", PYTHON),
    ]
    assert "-d" not in fc.submit_command(Path("/w"), 1, PYTHON, detached=False)


def _overview(total: int, free: int, running: int = 0) -> dict[str, object]:
    return {"taskmanagers": total, "slots-total": total, "slots-available": free, "jobs-running": running}


def test_a_parallelism_the_clusters_slots_can_take_is_submitted() -> None:
    assert fc.slots_problem(2, _overview(total=2, free=2)) is None
    assert fc.slots_problem(1, _overview(total=4, free=1, running=1)) is None
    assert fc.slots_problem(4, None) is None, "a cluster that does not answer: flink run says so itself"


def test_a_parallelism_above_the_clusters_slots_names_the_settings_that_add_slots() -> None:
    problem = fc.slots_problem(4, _overview(total=2, free=2))
    assert problem is not None and "needs 4 task slots; the cluster has 2" in problem
    assert "CG_FLINK__TASKMANAGERS" in problem and "CG_FLINK__SLOTS_PER_TASKMANAGER" in problem


def test_slots_held_by_a_running_job_say_to_stop_it_first() -> None:
    problem = fc.slots_problem(2, _overview(total=2, free=0, running=1))
    assert problem is not None and "0 of 2 are free" in problem and "`flink stop` the job first" in problem


def test_submit_refuses_a_parallelism_the_cluster_cannot_run_before_flink_run(tmp_path: Path, monkeypatch) -> None:
    """A rescale from 2 to 4 on two one-slot TaskManagers: `flink run -d` reported the job submitted, and it never
    ran (waiting for slots, failing after the slot request timeout, restarting)."""
    settings = _settings(tmp_path)
    paths = fc.ClusterPaths.of(settings)
    paths.conf.mkdir(parents=True)
    paths.config_yaml.write_text("{}")
    monkeypatch.setattr(fc, "flink_home", lambda: Path("/wheel/pyflink"))
    monkeypatch.setattr(fc, "overview", lambda _settings, timeout=2.0: _overview(total=2, free=2))
    monkeypatch.setattr(fc, "jobs", lambda _settings, must_answer=False: [])

    def not_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("flink run must not be called")

    monkeypatch.setattr(fc, "run_cli", not_run)
    with pytest.raises(fc.FlinkClusterError, match="needs 4 task slots; the cluster has 2"):
        fc.submit(settings, JAVA, parallelism=4)


def _cluster_answers(
    monkeypatch: pytest.MonkeyPatch,
    listed: list[dict[str, object]],
    fake_cli: bool = True,
    vertices: dict[str, list[dict[str, object]]] | None = None,
) -> list[list[str]]:
    """A cluster with 4 free slots whose REST ``/jobs/overview`` lists ``listed`` and ``/jobs/<id>`` has the
    ``vertices`` of a job (404 for the others, and for each job's ``/config``); the ``flink`` CLI calls made
    (``fake_cli``: answered here, each a success)."""
    import httpx

    def get(url: str, timeout_s: float) -> dict[str, object]:
        if url.endswith("/jobs/overview"):
            return {"jobs": listed}
        jid = url.rpartition("/jobs/")[2]
        if jid in (vertices or {}):
            return {"jid": jid, "vertices": (vertices or {})[jid]}
        request = httpx.Request("GET", url)
        raise httpx.HTTPStatusError("404", request=request, response=httpx.Response(404, request=request))

    monkeypatch.setattr(fc, "flink_home", lambda: Path("/wheel/pyflink"))
    monkeypatch.setattr(fc, "_get_json", get)
    monkeypatch.setattr(fc, "overview", lambda _settings, timeout=2.0: _overview(total=4, free=4 - len(listed)))
    calls: list[list[str]] = []

    def run(cmd: list[str], *_args: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        said = f"Savepoint completed. Path: file:/ck/savepoints/{cmd[-1]}" if "stop" in cmd else "Job submitted"
        return subprocess.CompletedProcess(cmd, 0, said + "\n", "")

    if fake_cli:
        monkeypatch.setattr(fc, "run_cli", run)
    return calls


def _configured(tmp_path: Path) -> Settings:
    settings = _settings(tmp_path)
    fc.ClusterPaths.of(settings).conf.mkdir(parents=True)
    fc.ClusterPaths.of(settings).config_yaml.write_text("{}")
    return settings


@pytest.mark.parametrize("state", ["RUNNING", "RESTARTING", "INITIALIZING"])
def test_submit_refuses_to_start_the_scoring_job_beside_a_live_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """With free slots (the default submit is p = 1 on two slots, or a rescale whose `flink stop` was left out, or
    whose job was restarting after a lost TaskManager) a second submit started a second scoring job beside the first:
    the same consumer group and checkpoint dir, each deciding half the partitions with half the state."""
    calls = _cluster_answers(monkeypatch, [{"jid": "j1", "name": fc.JOB_NAME, "state": state}])
    with pytest.raises(fc.FlinkClusterError, match=f"already runs on the cluster: j1 \\({state}\\); `flink stop`"):
        fc.submit(_configured(tmp_path), JAVA, parallelism=1)
    assert calls == [], "flink run must not be called"


def test_submit_goes_on_beside_ended_scoring_jobs_and_other_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = [
        {"jid": "old", "name": fc.JOB_NAME, "state": "FINISHED"},  # stopped with a savepoint: the rescale's stop
        {"jid": "gone", "name": fc.JOB_NAME, "state": "CANCELED"},
        {"jid": "theirs", "name": "inventory-forecast", "state": "RUNNING"},
    ]
    calls = _cluster_answers(monkeypatch, listed)
    fc.submit(_configured(tmp_path), JAVA, parallelism=1)
    assert len(calls) == 1 and calls[0][1:2] == ["run"]


def _vertices(parallelism: int, maximum: int) -> list[dict[str, object]]:
    """A scoring job's vertices in REST ``/jobs/<id>``: its steps at ``parallelism``, the drift merge at 1."""
    steps = [{"name": name, "parallelism": parallelism, "maxParallelism": maximum} for name in ("source", "score")]
    return [*steps, {"name": "drift", "parallelism": 1, "maxParallelism": 128}]


def test_a_rescale_above_the_states_maximum_parallelism_is_refused_before_flink_run_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job stopped for the rescale keeps 128 key groups (Flink's default for a first parallelism up to 85):
    `flink run -d -p 200` reported the job submitted, and it failed to restore its savepoint."""
    listed = [
        {"jid": "older", "name": fc.JOB_NAME, "state": "FINISHED", "start-time": 1},
        {"jid": "stopped", "name": fc.JOB_NAME, "state": "FINISHED", "start-time": 2},
    ]
    calls = _cluster_answers(monkeypatch, listed, vertices={"stopped": _vertices(2, 128), "older": _vertices(1, 512)})
    monkeypatch.setattr(fc, "overview", lambda _settings, timeout=2.0: _overview(total=256, free=256))
    settings = _configured(tmp_path)
    with pytest.raises(fc.FlinkClusterError) as refused:
        fc.submit(settings, JAVA, parallelism=200)
    said = str(refused.value)
    assert said.startswith("--parallelism 200 is above the maximum parallelism 128 of the scoring job's state")
    assert "(job stopped, the last on the cluster" in said and "pipeline.max-parallelism is not set" in said
    assert said.endswith("submit with --parallelism 128 or less")
    assert calls == [], "flink run must not be called"
    fc.submit(settings, JAVA, parallelism=128)
    assert len(calls) == 1 and calls[0][1:2] == ["run"]


def test_the_states_maximum_parallelism_is_that_of_the_rescaled_steps_not_of_one_fixed_at_1() -> None:
    assert fc.state_max_parallelism(_vertices(100, 256)) == 256
    assert fc.state_max_parallelism(_vertices(1, 128)) == 128
    assert fc.state_max_parallelism([{"name": "source"}]) is None
    assert fc.max_parallelism_problem(300, "j", None) is None, "not known: flink run is left to say"


def test_submit_to_a_cluster_that_does_not_answer_is_an_error_before_flink_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _configured(tmp_path)
    settings = settings.model_copy(update={"flink": settings.flink.model_copy(update={"rest_port": 1})})
    monkeypatch.setattr(fc, "flink_home", lambda: Path("/wheel/pyflink"))

    def not_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("flink run must not be called")

    monkeypatch.setattr(fc, "run_cli", not_run)
    with pytest.raises(fc.FlinkClusterError, match="the Flink cluster did not answer at http://127.0.0.2:1/"):
        fc.submit(settings, JAVA, parallelism=1)


@pytest.mark.parametrize("command", ["submit", "stop"])
def test_submit_and_stop_with_a_host_name_whose_lookup_hangs_fail_within_their_time_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, hanging_resolver: Callable[[str], None]
) -> None:
    """httpx bounds the connection and each read, not the host name's lookup: a resolver that did not answer held
    `flink submit` and `flink stop` for as long as the lookup took, not the 5 s of their job list question."""
    hanging_resolver("flink-jm.example.internal")
    monkeypatch.setattr(fc, "REST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(fc, "flink_home", lambda: Path("/wheel/pyflink"))

    def not_run(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the flink CLI must not be called")

    monkeypatch.setattr(fc, "run_cli", not_run)
    settings = _configured(tmp_path).model_copy(update={"bind_host": "flink-jm.example.internal"})
    started = time.monotonic()
    with pytest.raises(fc.FlinkClusterError, match="the Flink cluster did not answer at http://flink-jm"):
        if command == "submit":
            fc.submit(settings, JAVA, parallelism=1)
        else:
            fc.stop_with_savepoint(settings, JAVA)
    assert time.monotonic() - started < 3.0


def test_submit_waits_a_little_for_the_slots_of_a_job_that_just_stopped(tmp_path: Path, monkeypatch) -> None:
    settings = _settings(tmp_path)
    views = iter([_overview(total=2, free=0), _overview(total=2, free=2)])
    monkeypatch.setattr(fc, "overview", lambda _settings, timeout=2.0: next(views))
    monkeypatch.setattr(fc.time, "sleep", lambda _s: None)
    fc.wait_for_slots(settings, 2)
    monkeypatch.setattr(fc, "overview", lambda _settings, timeout=2.0: _overview(total=2, free=0, running=1))
    with pytest.raises(fc.FlinkClusterError, match="0 of 2 are free"):
        fc.wait_for_slots(settings, 2, wait_s=0.0)


def test_submit_passes_the_settings_not_the_callers_cg_variables(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = fc.ClusterPaths.of(settings)
    base = {"PATH": "/bin", "CG_KAFKA__TOPIC_PREFIX": "stale.", "PYFLINK_GATEWAY_PORT": "1", MARKER: "run-1"}
    env = fc.submit_env(settings.isolated("t1", tmp_path / "ck"), paths, JAVA, base)
    assert env["CG_KAFKA__TOPIC_PREFIX"] == "t1."
    assert env["FLINK_CONF_DIR"] == str(paths.conf) and env["JAVA_HOME"] == str(JAVA)
    assert "PYFLINK_GATEWAY_PORT" not in env
    assert env[MARKER] == "run-1" and env["PATH"] == "/bin"


@pytest.mark.parametrize("named", ["", "store.env"])
def test_the_submitted_jobs_client_has_the_callers_settings_not_another_env_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """``flink run`` runs the job's ``main()``, which read the repo root's ``.env`` for every setting its caller left
    unset: with CG_ENV_FILE empty ("no file") or naming another file, a model or a topic prefix left in that .env
    reached the submitted job while the caller ran without it."""
    (tmp_path / ".env").write_text("CG_MODEL__AFD_MODEL_ID=left-over\nCG_KAFKA__TOPIC_PREFIX=repo.\n")
    (tmp_path / "store.env").write_text("CG_JOB__PARALLELISM=2\n")
    monkeypatch.setattr(settings_module, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("CG_ENV_FILE", str(tmp_path / named) if named else "")
    get_settings.cache_clear()
    try:
        caller = get_settings()
        assert caller.model.afd_model_id is None and caller.kafka.topic_prefix != "repo."
        env = fc.submit_env(caller, fc.ClusterPaths.of(caller), JAVA, dict(os.environ))
        for name in [n for n in os.environ if n.startswith("CG_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        client = get_settings()
    finally:
        get_settings.cache_clear()
    assert client.model.afd_model_id is None, "nothing from the repo root's .env"
    assert client == caller, "the client's settings are its caller's"


def test_the_wheel_provides_the_cluster_classpath_and_java_17_options() -> None:
    try:
        flink = fc.flink_home()
    except fc.FlinkClusterError:
        pytest.skip("apache-flink is not installed")
    names = [jar.name for jar in fc.lib_jars(flink)]
    assert any(n.startswith("flink-dist-") for n in names)
    assert any(n.startswith("flink-python-") for n in names), "Python operators load from the cluster's classpath"
    assert "--add-opens=java.base/java.lang=ALL-UNNAMED" in fc.java_opts(flink)
    assert (flink / "bin" / "jobmanager.sh").is_file() and (flink / "bin" / "taskmanager.sh").is_file()


def test_down_and_status_of_a_cluster_that_never_ran_find_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path, rest_port=1)  # nothing answers on port 1
    paths = fc.ClusterPaths.of(settings)
    paths.run.mkdir(parents=True)
    paths.pid("taskmanager-0").write_text("1\n")  # pid 1 is not a TaskManager of this cluster
    assert fc.down(settings) == []
    assert not paths.pid("taskmanager-0").exists()
    st = fc.status(settings)
    assert not st["healthy"] and st["overview"] is None
    assert all(m["pid"] is None for m in st["members"].values())


# --- the job: program-level options only on a cluster ---------------------------------------------


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A stack folder with the jars the job's options look for (empty stand-ins)."""
    for jar in ("lib/flink/connector.jar", "lib/flink-plugins/metrics-prometheus/checkout-guard-metrics.jar"):
        (tmp_path / jar).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / jar).touch()
    return tmp_path


CLUSTER_LEVEL = ("taskmanager.", "jobmanager.", "rest.", "metrics.", "env.", "parallelism.default", "blob.")


def test_on_a_cluster_the_job_sets_program_level_options_only(installed: Path) -> None:
    from jobs.flink.job import program_options

    settings = Settings(stack_dir=installed, java_home=JAVA)
    options = program_options(settings, None)
    assert not [key for key in options if key.startswith(CLUSTER_LEVEL)]
    assert options["execution.checkpointing.dir"] == settings.checkpoint_dir.resolve().as_uri()
    assert options["pipeline.jars"].endswith("connector.jar")


def test_the_mini_cluster_keeps_the_program_options_and_its_own_cluster_options(installed: Path) -> None:
    from jobs.flink.job import flink_options, program_options

    settings = Settings(stack_dir=installed, metrics=MetricsSettings(base_port=19460))
    restore = installed / "savepoints" / "savepoint-1"
    local, program = flink_options(settings, restore), program_options(settings, restore)
    assert {k: local[k] for k in program} == program
    assert local["parallelism.default"] == "1" and local["metrics.reporter.prom.port"] == "19460"
    assert program["execution.state-recovery.path"] == restore.resolve().as_uri()


def test_stop_takes_a_canonical_savepoint_where_the_next_start_finds_it() -> None:
    cmd = fc.stop_command(Path("/wheel/pyflink"), "abc123", "file:///ck/savepoints")
    assert cmd == [
        "/wheel/pyflink/bin/flink",
        *("stop", "--type", "canonical", "--savepointPath", "file:///ck/savepoints", "abc123"),
    ]
    output = 'Suspending job "abc123" with a CANONICAL savepoint.\nSavepoint completed. Path: file:/ck/savepoints/s-1\n'
    assert fc.savepoint_path(output) == "file:/ck/savepoints/s-1"
    assert fc.savepoint_path("Suspending job ...\n") is None


def test_stop_takes_a_savepoint_of_the_scoring_job_only_not_of_the_clusters_other_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every RUNNING job was stopped, its savepoint written to the scoring job's savepoints folder, where the
    scoring job's next start restored the newest one: perhaps another job's (its own state then dropped as
    unclaimed)."""
    listed = [
        {"jid": "theirs", "name": "inventory-forecast", "state": "RUNNING"},
        {"jid": "ours", "name": fc.JOB_NAME, "state": "RUNNING"},
        {"jid": "before", "name": fc.JOB_NAME, "state": "FINISHED"},
    ]
    calls = _cluster_answers(monkeypatch, listed)
    monkeypatch.setattr(fc, "stop_command", lambda _flink, jid, _target: ["flink", "stop", jid])
    assert fc.stop_with_savepoint(_settings(tmp_path), JAVA) == ["file:/ck/savepoints/ours"]
    assert [cmd[-1] for cmd in calls] == ["ours"]


@pytest.mark.parametrize("state", ["RESTARTING", "INITIALIZING"])
def test_stopping_a_scoring_job_that_is_not_running_is_an_error_not_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str
) -> None:
    """A job restarting after a lost TaskManager was skipped: `flink stop` said "no job was running" and exited 0,
    and the job resumed later beside the one the operator then submitted."""
    calls = _cluster_answers(monkeypatch, [{"jid": "ours", "name": fc.JOB_NAME, "state": state}])
    with pytest.raises(fc.FlinkClusterError, match=f"ours is {state}: a savepoint needs it RUNNING; nothing was"):
        fc.stop_with_savepoint(_settings(tmp_path), JAVA)
    assert calls == []


HANGING_CLI = """
python3 -c 'import time; time.sleep(120)' &
echo $! > "$1"
wait
"""


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("command", ["submit", "stop"])
def test_a_flink_cli_that_never_returns_is_stopped_with_its_children_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """A JobManager that takes the request and never answers: at the time-out, `flink run` / `flink stop` escaped as
    a TimeoutExpired traceback (the CLI catches FlinkClusterError), and only the CLI's JVM was killed: the job's
    Python client it had started ran on."""
    pid_file = tmp_path / "client.pid"
    hanging = ["bash", "-c", HANGING_CLI, "flink", str(pid_file)]
    listed = [{"jid": "ours", "name": fc.JOB_NAME, "state": "RUNNING"}] if command == "stop" else []
    _cluster_answers(monkeypatch, listed, fake_cli=False)
    monkeypatch.setattr(fc, "submit_command", lambda *_args: hanging)
    monkeypatch.setattr(fc, "stop_command", lambda *_args: hanging)
    settings = _configured(tmp_path)
    started = time.monotonic()
    with pytest.raises(fc.FlinkClusterError, match=r"did not finish within 1 s and was stopped; .*`flink status`"):
        if command == "submit":
            fc.submit(settings, JAVA, parallelism=1, timeout_s=1)
        else:
            fc.stop_with_savepoint(settings, JAVA, timeout_s=1)
    assert time.monotonic() - started < 20
    assert _gone(int(pid_file.read_text())), "the CLI's child is stopped with it"


def test_taskmanager_ports_past_65535_are_a_settings_error() -> None:
    """TaskManager i takes base + 2i and base + 2i + 1: a high base started a TaskManager on no port at all."""
    from pydantic import ValidationError

    from infra.settings import FlinkClusterSettings

    assert FlinkClusterSettings(taskmanager_base_port=65530, taskmanagers=3).taskmanagers == 3
    with pytest.raises(ValidationError, match="need ports up to 65537"):
        FlinkClusterSettings(taskmanager_base_port=65530, taskmanagers=4)


@pytest.mark.parametrize(
    ("flink", "says"),
    [
        ({"taskmanager_base_port": 6120, "taskmanagers": 3}, "6123: rpc_port and taskmanager-1's data port"),
        ({"rest_port": 6131}, "6131: rest_port and taskmanager-0's data port"),
        ({"blob_port": 6123}, "6123: rpc_port and blob_port"),
        ({"metrics_ports": "6100-6200"}, "metrics_ports 6100-6200 holds the cluster's own port(s) 6123, 6124, 6130"),
        ({"metrics_ports": "8081"}, "holds the cluster's own port(s) 8081 (rest_port)"),
    ],
)
def test_cluster_ports_that_coincide_are_a_settings_error_not_a_bind_failure_in_flink_up(
    flink: dict[str, object], says: str
) -> None:
    """They were accepted: `flink up` started the JobManager, and a TaskManager (or the JobManager's reporter) failed
    to bind, or a reporter took a member's port before it."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(says)):
        FlinkClusterSettings(**flink)  # type: ignore[arg-type]


def test_cluster_ports_apart_are_accepted() -> None:
    assert FlinkClusterSettings().taskmanagers == 2
    moved = FlinkClusterSettings(taskmanager_base_port=7000, taskmanagers=8, metrics_ports="7016-7030", rest_port=7031)
    assert moved.metrics_ports == "7016-7030"


# --- a failed `flink up` stops what it started -------------------------------------------------------

FAKE_MEMBER = """#!/bin/sh
case "$*" in *taskmanager-0*) [ -n "$FAIL_TM0" ] && exit 3;; esac
exec sleep 60
"""


def _fake_wheel(tmp_path: Path, fail_taskmanager: bool) -> Path:
    """A wheel whose member scripts sleep in the foreground (taskmanager-0's exits 3 when ``fail_taskmanager``)."""
    flink = tmp_path / "wheel"
    (flink / "bin").mkdir(parents=True)
    body = FAKE_MEMBER.replace('[ -n "$FAIL_TM0" ]', "true" if fail_taskmanager else "false")
    for script in ("jobmanager.sh", "taskmanager.sh"):
        (flink / "bin" / script).write_text(body)
        (flink / "bin" / script).chmod(0o755)
    return flink


def _quiet_ports(tmp_path: Path) -> Settings:
    """Ports nothing listens on here (the REST API never answers), apart from other people's clusters."""
    base = 41000 + os.getpid() % 2000 * 8
    return Settings(
        stack_dir=tmp_path / "stack",
        bind_host="127.0.0.1",
        flink=FlinkClusterSettings(
            cluster_dir=tmp_path / "cluster",
            rest_port=base,
            rpc_port=base + 1,
            blob_port=base + 2,
            taskmanager_base_port=base + 3,
        ),
    )


def _spawned(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen]:
    seen: list[subprocess.Popen] = []
    spawn = fc._spawn

    def recorded(*args: object) -> subprocess.Popen:
        seen.append(spawn(*args))  # type: ignore[arg-type]
        return seen[-1]

    monkeypatch.setattr(fc, "_spawn", recorded)
    return seen


@pytest.mark.parametrize("fail_taskmanager", [False, True], ids=["timed-out", "member-exited"])
def test_a_failed_flink_up_stops_the_members_it_started_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_taskmanager: bool
) -> None:
    """A start that timed out, or whose TaskManager exited, left the JobManager and the other members running, and
    the error did not say that `flink down` stops them."""
    settings = _quiet_ports(tmp_path)
    monkeypatch.setattr(fc, "flink_home", lambda: _fake_wheel(tmp_path, fail_taskmanager))
    monkeypatch.setattr(fc, "START_TIMEOUT_S", 1.0)
    spawned = _spawned(monkeypatch)
    with pytest.raises(fc.FlinkClusterError) as failed:
        fc.up(settings, JAVA)
    said = str(failed.value)
    assert ("exited during start-up (3)" if fail_taskmanager else "not within 1 s") in said
    assert said.endswith("stopped what this `flink up` started: jobmanager, taskmanager-0, taskmanager-1"), said
    assert len(spawned) == 3 and all(proc.poll() is not None for proc in spawned)
    assert not list(fc.ClusterPaths.of(settings).run.glob("*.pid"))


def test_a_failed_flink_up_leaves_the_members_running_before_and_names_flink_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _quiet_ports(tmp_path)
    paths = fc.ClusterPaths.of(settings)
    monkeypatch.setattr(fc, "flink_home", lambda: _fake_wheel(tmp_path, False))
    monkeypatch.setattr(fc, "START_TIMEOUT_S", 1.0)
    jobmanager = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", fc.JM_CLASS, "--configDir", str(paths.conf)]
    )
    try:
        paths.run.mkdir(parents=True)
        paths.pid(fc.JOBMANAGER).write_text(f"{jobmanager.pid}\n")
        spawned = _spawned(monkeypatch)
        with pytest.raises(fc.FlinkClusterError) as failed:
            fc.up(settings, JAVA)
        assert str(failed.value).endswith(
            "stopped what this `flink up` started: taskmanager-0, taskmanager-1; left running as before: "
            "jobmanager; `python -m infra.stack flink down` stops them"
        )
        assert len(spawned) == 2 and all(proc.poll() is not None for proc in spawned)
        assert jobmanager.poll() is None and paths.pid(fc.JOBMANAGER).exists()
    finally:
        jobmanager.kill()
        jobmanager.wait(10)


def test_a_flink_up_interrupted_with_ctrl_c_stops_the_members_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fc, "flink_home", lambda: _fake_wheel(tmp_path, False))
    spawned = _spawned(monkeypatch)

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fc, "overview", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fc.up(_quiet_ports(tmp_path), JAVA)
    assert len(spawned) == 3 and all(proc.poll() is not None for proc in spawned)


@pytest.mark.parametrize(
    ("state", "says", "never"),
    [
        ("CANCELLING", "It is being cancelled: no savepoint will be taken, and it will not run again", "stop again"),
        ("FAILING", "It is failing: Flink restarts it if its restart strategy allows", "being cancelled"),
        ("RESTARTING", "Wait until `flink status` shows every TaskManager registered and the job running", "cancelled"),
    ],
)
def test_stopping_a_scoring_job_that_is_not_running_says_what_its_state_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str, says: str, never: str
) -> None:
    """Every state was told to wait for the job to run and stop again: a CANCELLING job never runs again."""
    calls = _cluster_answers(monkeypatch, [{"jid": "ours", "name": fc.JOB_NAME, "state": state}])
    with pytest.raises(fc.FlinkClusterError) as refused:
        fc.stop_with_savepoint(_settings(tmp_path), JAVA)
    assert says in str(refused.value) and never not in str(refused.value)
    assert calls == []
