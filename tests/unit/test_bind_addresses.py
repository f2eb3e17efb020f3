"""An IPv6 ``CG_BIND_HOST`` in every address made of it (infra/addresses.py): a URL or ``host:port`` needs the
address in brackets, and every module reads a wildcard bind host the same way."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from infra import addresses, stack
from infra import flink_cluster as fc
from infra.metrics import scrape_targets
from infra.settings import FlinkClusterSettings, KafkaSettings, Settings
from infra.stack import Endpoints, StackPaths
from sinks.dashboard.pipeline import prometheus_url

PORTS = {"bootstrap_servers": "127.0.0.1:9092", "controller_port": 9093}
"""The default ports, spelled out: CI runs with others in CG_KAFKA__* and Settings() would read them."""


def _settings(tmp_path: Path, bind_host: str) -> Settings:
    return Settings(
        stack_dir=tmp_path / "stack",
        bind_host=bind_host,
        kafka=PORTS,  # type: ignore[arg-type]
        flink=FlinkClusterSettings(cluster_dir=tmp_path / "cluster", rest_port=7081),
    )


@pytest.mark.parametrize(("bind_host", "host"), [("::1", "[::1]"), ("::", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")])
def test_the_flink_rest_api_is_asked_at_a_valid_url_for_an_ipv6_bind_host(tmp_path: Path, bind_host, host) -> None:
    """``http://::1:7081`` is no URL: with CG_BIND_HOST=::1 every REST call of ``stack flink`` (up's wait,
    status, submit, stop) raised httpx.InvalidURL."""
    url = fc.rest_url(_settings(tmp_path, bind_host))
    assert url == f"http://{host}:7081"
    assert httpx.URL(url).port == 7081


@pytest.mark.parametrize(("bind_host", "listen"), [("::1", "[::1]"), ("::", "[::]"), ("", "")])
def test_the_local_prometheus_listens_on_an_ipv6_bind_host(tmp_path: Path, bind_host: str, listen: str) -> None:
    """Prometheus refuses ``--web.listen-address=::1:9490`` (too many colons) and did not start."""
    settings = _settings(tmp_path, bind_host)
    port = settings.metrics.prometheus_port  # 9490, or what CI's CG_METRICS__* moved it to
    command = stack._prometheus_command("prometheus", StackPaths.of(settings), Endpoints.of(settings))
    assert f"--web.listen-address={listen}:{port}" in command


def test_the_stack_asks_its_prometheus_at_a_valid_url_for_an_ipv6_bind_host(tmp_path: Path, monkeypatch) -> None:
    """The stack's health check of its Prometheus asked ``http://::1:9490/-/ready``: an InvalidURL, not an
    answer, so ``up`` never saw it healthy."""
    asked: list[str] = []
    monkeypatch.setattr(stack.httpx, "get", lambda url, **_k: asked.append(url) or httpx.Response(200))
    settings = _settings(tmp_path, "::1")
    assert stack._prometheus_get(Endpoints.of(settings), "/-/ready") is not None
    assert asked == [f"http://[::1]:{settings.metrics.prometheus_port}/-/ready"]
    assert Endpoints.of(settings).address("prometheus") == f"[::1]:{settings.metrics.prometheus_port}"


def test_the_flink_members_scrape_targets_bracket_an_ipv6_bind_host(tmp_path: Path, monkeypatch) -> None:
    """Prometheus read the target ``::1:9250`` as no address and scraped no Flink member."""
    settings = _settings(tmp_path, "::1")
    monkeypatch.setattr(fc, "member_process", lambda _paths, m: object() if m.is_jobmanager else None)
    monkeypatch.setattr(fc, "reporter_ports", lambda *_a: [9250])
    [group] = fc.write_scrape_targets(settings)
    assert group["targets"] == ["[::1]:9250"]


@pytest.mark.parametrize("bind_host", ["0.0.0.0", "::", "", "127.0.0.2", "::1", "fd00::5"])
def test_every_module_reads_a_wildcard_bind_host_the_same_way(tmp_path: Path, bind_host: str) -> None:
    """The rule was written out in four places (metrics, the dashboard, the stack, the Flink cluster and job):
    each asks a listener where infra/addresses.py says, and only a wildcard lets the job's process mode listen
    everywhere."""
    from jobs.flink.job import _check_execution_mode

    settings = _settings(tmp_path, bind_host)
    client, in_url = addresses.client_host(bind_host), addresses.url_host(bind_host)
    assert httpx.URL(f"http://{in_url}:80").host == client  # the URL form names the host a client asks
    paths = fc.ClusterPaths.of(settings)
    options = fc.cluster_options(settings, paths, Path("/jdk"), "python", reporter=False)
    assert options["rest.address"] == options["taskmanager.host"] == client
    assert Endpoints.of(settings).prometheus_host == client
    assert set(scrape_targets(settings).values()) == {
        f"{in_url}:{settings.metrics.base_port + offset}" for offset in range(9)
    }
    assert prometheus_url(settings) == f"http://{in_url}:{settings.metrics.prometheus_port}"
    process = settings.model_copy(update={"job": settings.job.model_copy(update={"python_execution_mode": "process"})})
    if addresses.is_wildcard(bind_host):
        _check_execution_mode(process)
    else:
        with pytest.raises(ValueError, match="every interface"):
            _check_execution_mode(process)


def _kafka_properties(settings: Settings, node: int = 0, admin_password: str | None = None) -> dict[str, str]:
    ep = Endpoints.of(settings)
    nodes = ep.kafka_nodes
    text = stack._kafka_properties(settings, StackPaths.of(settings), ep, admin_password, nodes[node])
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.parametrize(("bind_host", "listen"), [("::1", "[::1]"), ("::", "[::]"), ("127.0.0.2", "127.0.0.2")])
def test_kafka_listens_on_an_ipv6_bind_host_in_brackets(tmp_path: Path, bind_host: str, listen: str) -> None:
    """Kafka read ``PLAINTEXT://::1:9092`` (and the controller's) with the port's colon inside the address."""
    settings = _settings(tmp_path, bind_host)
    assert _kafka_properties(settings)["listeners"] == f"PLAINTEXT://{listen}:9092,CONTROLLER://{listen}:9093"
    sasl = settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(
                update={"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512"}
                | {"sasl_username": "checkout-guard", "sasl_password": SecretStr("client-secret")}
            )
        }
    )
    assert _kafka_properties(sasl, admin_password="pw")["listeners"] == (
        f"SASL_PLAINTEXT://{listen}:9092,CONTROLLER://{listen}:9093"
    )


def test_three_kafka_nodes_on_ipv6_advertise_and_vote_in_brackets_and_are_asked_bare(tmp_path: Path) -> None:
    """With ``CG_KAFKA__BOOTSTRAP_SERVERS=[::1]:9092`` the nodes' host kept its brackets (no socket connects to
    ``[::1]``, so the stack never saw them up), and an unbracketed ``::1:9092`` was written as is in the
    advertised listeners, the quorum voters and the clients' bootstrap list."""
    for bootstrap in ("[::1]:9092", "::1:9092"):
        settings = _settings(tmp_path, "::1").model_copy(
            update={"kafka": KafkaSettings(bootstrap_servers=bootstrap, controller_port=9093, brokers=3)}
        )
        ep = Endpoints.of(settings)
        assert ep.kafka_host == "::1" and {n.host for n in ep.kafka_nodes} == {"::1"}
        assert {h for h, _ in ep.ports("kafka")} == {"::1"}
        props = [_kafka_properties(settings, node) for node in range(3)]
        assert [p["advertised.listeners"] for p in props] == [f"PLAINTEXT://[::1]:{9092 + 2 * i}" for i in range(3)]
        assert {p["controller.quorum.voters"] for p in props} == {"1@[::1]:9093,2@[::1]:9095,3@[::1]:9097"}
        assert settings.kafka.bootstrap == "[::1]:9092,[::1]:9094,[::1]:9096"
        assert ep.address("kafka").startswith("[::1]:9092, [::1]:9094, [::1]:9096 (controllers")


@pytest.mark.parametrize("svc", ["opensearch", "mosquitto", "smtp", "prometheus"])
def test_every_other_service_address_brackets_an_ipv6_host(tmp_path: Path, svc: str) -> None:
    """The addresses the stack reports (healthy at, already served at, port taken) as ``host:port``."""
    settings = Settings(
        stack_dir=tmp_path,
        bind_host="::1",
        kafka=PORTS,  # type: ignore[arg-type]
        opensearch={"url": "http://[::1]:9200"},  # type: ignore[arg-type]
        mqtt={"host": "::1"},  # type: ignore[arg-type]
        smtp={"host": "::1"},  # type: ignore[arg-type]
    )
    ep = Endpoints.of(settings)
    [(host, port)] = ep.ports(svc)
    assert host == "::1"
    assert ep.address(svc) == f"[::1]:{port}"


@pytest.mark.parametrize(
    ("address", "bare"),
    [
        ("[::1]:9092", ("::1", "9092")),
        ("PLAINTEXT://[fd00::5]:9094", ("fd00::5", "9094")),
        (":9092", ("127.0.0.1", "9092")),
    ],
)
def test_a_host_port_is_split_bare_and_written_back_bracketed(address: str, bare: tuple[str, str]) -> None:
    assert addresses.split_host_port(address) == bare
    host, port = bare
    assert addresses.split_host_port(addresses.host_port(host, int(port))) == bare


@pytest.mark.parametrize("bind_host", ["0.0.0.0", "::", "127.0.0.1", "::1", ""])
def test_the_cluster_and_the_job_bind_their_prometheus_reporter_to_the_same_host(
    tmp_path: Path, bind_host: str
) -> None:
    """The reporter's host was worked out twice, in the Flink cluster's config and in the job's options: both now
    agree with infra/addresses.py's one rule."""
    from jobs.flink.job import REPORTER, REPORTER_JAR, reporter_options

    settings = _settings(tmp_path, bind_host)
    settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"enabled": True})})
    jar = StackPaths.of(settings).flink_plugins / REPORTER_JAR
    jar.parent.mkdir(parents=True, exist_ok=True)
    jar.touch()
    key = f"metrics.reporter.{REPORTER}.host"
    cluster = fc.cluster_options(settings, fc.ClusterPaths.of(settings), Path("/jdk"), "python", reporter=True)
    assert cluster[key] == reporter_options(settings)[key] == addresses.reporter_host(bind_host)
    assert addresses.reporter_host(bind_host) == (bind_host or "0.0.0.0")
