"""A mini-cluster scoring job (``python -m jobs.flink.job``, ``make run``, ``supervise``) beside the scoring job on the
Flink cluster the settings name: refused, naming that job and ``flink stop``; a cluster that does not answer only
warns. ``upgrade status`` names the cluster's job too."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infra import flink_cluster as fc
from infra import production
from infra.settings import FlinkClusterSettings, JobSettings, ModelSettings, Settings

LIVE = [{"jid": "c0ffee", "name": fc.JOB_NAME, "state": "RUNNING"}]


class _Cluster:
    """A JobManager's REST API on a free port: ``/jobs/overview`` lists ``jobs``; ``stall_s`` holds each answer."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, object]] = []
        self.user_config: dict[str, dict[str, str]] = {}  # a job's global job parameters (``/jobs/<jid>/config``)
        self.stall_s = 0.0
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                time.sleep(cluster.stall_s)
                jid = self.path.removeprefix("/jobs/").removesuffix("/config")
                if self.path.endswith("/config") and jid in cluster.user_config:
                    config = {"jid": jid, "execution-config": {"user-config": cluster.user_config[jid]}}
                    body = json.dumps(config).encode()
                    self.send_response(200)
                else:
                    body = json.dumps({"jobs": cluster.jobs}).encode()
                    self.send_response(200 if self.path == "/jobs/overview" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                """A client that gave up on a stalled answer (the check's own time limit): no traceback on
                stderr, which a later test (a command's captured output) would find there."""

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def cluster() -> Iterator[_Cluster]:
    running = _Cluster()
    yield running
    running.stall_s = 0.0
    running.server.shutdown()
    running.server.server_close()


def _settings(tmp_path: Path, rest_port: int) -> Settings:
    return Settings(
        stack_dir=tmp_path / "stack",
        bind_host="127.0.0.1",
        flink=FlinkClusterSettings(cluster_dir=tmp_path / "cluster", rest_port=rest_port),
        job=JobSettings(checkpoint_dir=tmp_path / "checkpoints"),
        model=ModelSettings(backend="none"),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("state", ["RUNNING", "RESTARTING"])
def test_a_mini_cluster_start_beside_the_clusters_scoring_job_is_refused_naming_it_and_flink_stop(
    tmp_path: Path, cluster: _Cluster, state: str
) -> None:
    cluster.jobs = [{"jid": "c0ffee", "name": fc.JOB_NAME, "state": state}]
    problem = fc.beside_cluster_job(_settings(tmp_path, cluster.port))
    assert problem is not None
    assert f"http://127.0.0.1:{cluster.port} runs the scoring job {fc.JOB_NAME}: c0ffee ({state})" in problem
    assert "python -m infra.stack flink stop" in problem


def test_a_cluster_without_a_live_scoring_job_or_no_cluster_at_all_lets_the_mini_cluster_start(
    tmp_path: Path, cluster: _Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.jobs = [
        {"jid": "old", "name": fc.JOB_NAME, "state": "FINISHED"},
        {"jid": "theirs", "name": "inventory-forecast", "state": "RUNNING"},
    ]
    with caplog.at_level("WARNING"):
        assert fc.beside_cluster_job(_settings(tmp_path, cluster.port)) is None
        assert fc.beside_cluster_job(_settings(tmp_path, _free_port())) is None  # nothing listens: no cluster
    assert caplog.text == "", "no cluster is the usual case, not worth a warning"


def test_a_cluster_that_does_not_answer_does_not_hold_up_the_start_and_is_warned_about(
    tmp_path: Path, cluster: _Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.jobs, cluster.stall_s = LIVE, 30.0
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        assert fc.beside_cluster_job(_settings(tmp_path, cluster.port)) is None
    assert time.monotonic() - started < 3 * fc.CLUSTER_CHECK_S
    assert f"the Flink cluster at http://127.0.0.1:{cluster.port} did not answer within 2 s" in caplog.text
    assert "starting without knowing whether it runs the scoring job" in caplog.text


def test_the_job_refuses_its_mini_cluster_start_beside_the_clusters_scoring_job(
    tmp_path: Path, cluster: _Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It checked only its own job.json, which a cluster job never writes: two jobs then read one consumer group and
    wrote one checkpoint dir (every decision twice, each restoring the other's checkpoints)."""
    from jobs.flink import job

    cluster.jobs = LIVE
    monkeypatch.setattr(job, "setup_logging", lambda *a: None)
    monkeypatch.setattr(job, "_without_worker_pool_server", lambda: None)
    monkeypatch.setattr(job, "submitted_to_cluster", lambda: False)

    def built(*_args: object) -> None:
        raise AssertionError("the job must not be built")

    monkeypatch.setattr(job, "start_point", built)
    with pytest.raises(SystemExit) as refused, caplog.at_level("ERROR"):
        job.main(_settings(tmp_path, cluster.port))
    assert refused.value.code == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"refusing to start: {fc.mini_cluster_problem(LIVE, f'http://127.0.0.1:{cluster.port}')}"
    ]


def test_supervise_refuses_the_scoring_job_beside_the_clusters_and_runs_the_others(
    tmp_path: Path, cluster: _Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.jobs = LIVE
    monkeypatch.setattr(production, "get_settings", lambda: _settings(tmp_path, cluster.port))
    monkeypatch.setattr(production, "setup_logging", lambda *a: None)
    started: list[list[str]] = []
    monkeypatch.setattr(production, "run", lambda _settings, names: started.append(list(names)))
    result = CliRunner().invoke(production.cli, ["--only", "scoring-job,dashboard"])
    assert result.exit_code == 2 and started == []
    assert result.output.startswith("Error: the Flink cluster at") and "--without scoring-job" in result.output
    assert result.output.count("\n") == 1
    assert CliRunner().invoke(production.cli, ["--only", "dashboard"]).exit_code == 0
    assert started == [["dashboard"]]


def test_upgrade_status_names_the_scoring_job_on_the_cluster(
    tmp_path: Path, cluster: _Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "running: no" while the cluster ran the job: a mini-cluster start then went beside it."""
    from jobs.flink import upgrade

    cluster.jobs = LIVE
    monkeypatch.setattr(upgrade, "get_settings", lambda: _settings(tmp_path, cluster.port))
    result = CliRunner().invoke(upgrade.app, ["status"])
    assert result.exit_code == 0, result.output
    assert f"on the Flink cluster: c0ffee (RUNNING) at http://127.0.0.1:{cluster.port};" in result.output
    cluster.jobs = []
    assert "on the Flink cluster: no" in CliRunner().invoke(upgrade.app, ["status"]).output


def test_upgrade_savepoint_beside_the_clusters_scoring_job_names_it_and_flink_stop(
    tmp_path: Path, cluster: _Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said "no running scoring job found (job.json ... missing)" while the cluster ran the job: nothing to stop,
    it read, and the upgrade went on beside it. It names the cluster's job and the command that takes its savepoint."""
    from jobs.flink import upgrade

    settings = _settings(tmp_path, cluster.port)
    monkeypatch.setattr(upgrade, "get_settings", lambda: settings)
    cluster.jobs = LIVE
    result = CliRunner().invoke(upgrade.app, ["savepoint", "--timeout", "1"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert f"the scoring job runs on the Flink cluster at http://127.0.0.1:{cluster.port}: c0ffee (RUNNING)" in message
    assert f"`python -m infra.stack flink stop` stops it with a savepoint under {tmp_path / 'checkpoints'}" in message
    cluster.jobs = []  # no scoring job anywhere: the plain answer, no command to run
    result = CliRunner().invoke(upgrade.app, ["savepoint", "--timeout", "1"])
    assert str(result.exception) == "no running scoring job found (job.json in the checkpoint dir is missing)"


def test_upgrade_savepoint_with_a_cluster_that_does_not_answer_says_it_was_not_checked(
    tmp_path: Path, cluster: _Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.flink import upgrade

    cluster.jobs, cluster.stall_s = LIVE, 30.0
    monkeypatch.setattr(upgrade, "get_settings", lambda: _settings(tmp_path, cluster.port))
    message = str(CliRunner().invoke(upgrade.app, ["savepoint", "--timeout", "1"]).exception)
    assert message.startswith("no running scoring job found (job.json in the checkpoint dir is missing); whether")
    assert f"the Flink cluster at http://127.0.0.1:{cluster.port} did not answer within 2 s" in message
    assert message.endswith("if it does, `python -m infra.stack flink stop` stops it")


def test_a_bind_host_name_that_does_not_resolve_is_warned_about_as_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host name that did not resolve read as a refused connection: "no cluster", silently, though the cluster it
    names may well run the scoring job. The start goes on, as for a cluster that does not answer, with a warning."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host == "flink-jm.example.internal":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    settings = _settings(tmp_path, _free_port()).model_copy(update={"bind_host": "flink-jm.example.internal"})
    with caplog.at_level("WARNING"):
        assert fc.beside_cluster_job(settings) is None
    assert f"the Flink cluster at {fc.rest_url(settings)} was not asked" in caplog.text
    assert "the host name flink-jm.example.internal does not resolve" in caplog.text
    assert "starting without knowing whether it runs the scoring job" in caplog.text


def test_a_bind_host_name_whose_lookup_hangs_does_not_hold_up_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, hanging_resolver: Callable[[str], None]
) -> None:
    """httpx bounds the connection and each read, not the host name's lookup: a resolver that does not answer held
    every mini-cluster start (and supervise, upgrade status) as long as the lookup took, not about 2 s."""
    hanging_resolver("flink-jm.example.internal")
    settings = _settings(tmp_path, _free_port()).model_copy(update={"bind_host": "flink-jm.example.internal"})
    started = time.monotonic()
    with caplog.at_level("WARNING"):
        assert fc.beside_cluster_job(settings) is None
    assert time.monotonic() - started < 2 * fc.CLUSTER_CHECK_S
    assert f"the Flink cluster at {fc.rest_url(settings)} did not answer within 2 s" in caplog.text
    assert "starting without knowing whether it runs the scoring job" in caplog.text


def test_a_start_of_another_deployment_beside_the_clusters_scoring_job_is_not_refused(
    tmp_path: Path, cluster: _Cluster
) -> None:
    """A backtest copy (``Settings.isolated``: its own consumer group and checkpoint dir) asks the same cluster
    settings: it was refused while the live job ran on the cluster, though it shares nothing with it. The cluster's
    job names its consumer group and checkpoint dir in its global job parameters; one sharing either is refused,
    and so is one that names neither (a job submitted before it did)."""
    settings = _settings(tmp_path, cluster.port)
    copy = settings.isolated("bt-rules", tmp_path / "backtest" / "checkpoints")
    cluster.jobs = LIVE
    cluster.user_config = {"c0ffee": fc.deployment_parameters(settings)}
    assert fc.beside_cluster_job(copy) is None
    assert fc.beside_cluster_job(settings) is not None
    group = settings.consumer_group
    shares_the_group = copy.model_copy(update={"job": copy.job.model_copy(update={"consumer_group": group})})
    assert fc.beside_cluster_job(shares_the_group) is not None
    cluster.user_config = {"c0ffee": {"some.other.parameter": "x"}}  # an older job that does not say
    assert fc.beside_cluster_job(copy) is not None
