"""The pipeline-health page's data: the PromQL it sends, how Prometheus's answers (canned API JSON here)
become the page's JSON, and that an unreachable or refusing Prometheus is a 200 that says so, behind the
same login as the rest of the dashboard."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from starlette.testclient import TestClient

import sinks.dashboard.__main__ as dashboard_main
from infra.metrics import ConsumerLagCollector, Endpoint
from infra.settings import DashboardSettings, MetricsSettings, Settings
from sinks.dashboard.app import Dashboard, create_app
from sinks.dashboard.pipeline import (
    FLINK_DECISIONS,
    PrometheusApi,
    pipeline_queries,
    prometheus_api,
    prometheus_url,
    rate_window,
    read_pipeline,
    sample_value,
    shape_pipeline,
)

AT = 1_764_720_000.0


def vector(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
    """A ``/api/v1/query`` answer as Prometheus sends it: an instant vector, values as strings."""
    result = [{"metric": labels, "value": [AT, value]} for labels, value in series]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def up(process: str, port: int, value: str) -> tuple[dict[str, str], str]:
    labels = {"__name__": "up", "instance": f"127.0.0.1:{port}", "job": process, "process": process}
    return labels, value


QUERIES = pipeline_queries("60s")
ANSWERS: dict[str, dict[str, Any]] = {
    "up": vector(up("alert-sender", 9464, "1"), up("dashboard", 9467, "1"), up("scoring-job", 9460, "0")),
    "records_in": vector(({"stage": "opensearch-sink"}, "12.5"), ({"stage": "alert-sender"}, "0.25")),
    "records_out": vector(({"stage": "opensearch-sink"}, "12"), ({"stage": "face-stage"}, "1.5")),
    "decisions": vector(({}, "40.2")),
    "lag": vector(({"group": "checkout-guard-scoring"}, "3"), ({"group": "checkout-guard-opensearch"}, "120")),
    "dead_letters": vector(({"stage": "opensearch-sink"}, "0.1")),
    "deliveries": vector(
        ({"channel": "webex", "result": "failed"}, "0.5"), ({"channel": "email", "result": "delivered"}, "2")
    ),
    "p99": vector(({"stage": "opensearch-sink"}, "0.042"), ({"stage": "alert-sender"}, "NaN")),
}


def results() -> dict[str, list[dict[str, Any]]]:
    return {name: answer["data"]["result"] for name, answer in ANSWERS.items()}


def prometheus(answer: Callable[[str], httpx.Response]) -> PrometheusApi:
    """A PrometheusApi whose HTTP goes to ``answer(promql)``."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/query"
        return answer(request.url.params["query"])

    return PrometheusApi("http://prometheus.test:9490", transport=httpx.MockTransport(handle))


def canned(promql: str) -> httpx.Response:
    name = next(n for n, q in QUERIES.items() if q == promql)
    return httpx.Response(200, json=ANSWERS[name])


def test_queries_ask_for_up_rates_lag_and_p99_per_stage() -> None:
    assert QUERIES["up"] == "up"
    assert QUERIES["records_in"] == "sum by (stage) (rate(cg_records_in_total[60s]))"
    assert QUERIES["records_out"] == "sum by (stage) (rate(cg_records_out_total[60s]))"
    assert QUERIES["lag"] == "sum by (group) (cg_consumer_lag)"
    assert QUERIES["dead_letters"] == "sum by (stage) (rate(cg_dead_letters_total[60s]))"
    assert QUERIES["deliveries"] == "sum by (channel, result) (rate(cg_channel_deliveries_total[60s]))"
    assert QUERIES["p99"] == ("histogram_quantile(0.99, sum by (stage, le) (rate(cg_processing_seconds_bucket[5m])))")
    assert QUERIES["decisions"] == f"sum(rate({FLINK_DECISIONS}[60s]))"
    assert "flink_.*checkout_guard.*decisions.*" in FLINK_DECISIONS


def test_the_rate_window_holds_four_scrapes_and_at_least_a_minute() -> None:
    assert rate_window(5.0) == "60s"
    assert rate_window(1.0) == "60s"
    assert rate_window(30.0) == "120s"
    assert rate_window(22.5) == "90s"


def test_nan_and_inf_samples_become_none() -> None:
    assert sample_value({"value": [AT, "0.5"]}) == 0.5
    assert sample_value({"value": [AT, "NaN"]}) is None
    assert sample_value({"value": [AT, "+Inf"]}) is None
    assert sample_value({}) is None


def test_answers_are_shaped_per_panel_in_the_pipelines_order() -> None:
    shaped = shape_pipeline(results(), window="60s", source="http://p:9490", at_ms=int(AT * 1000))
    assert shaped["error"] is None and shaped["window"] == "60s" and shaped["source"] == "http://p:9490"
    assert shaped["targets"] == [
        {"process": "scoring-job", "instance": "127.0.0.1:9460", "up": False},
        {"process": "alert-sender", "instance": "127.0.0.1:9464", "up": True},
        {"process": "dashboard", "instance": "127.0.0.1:9467", "up": True},
    ]
    assert shaped["throughput"] == [
        {"stage": "scoring-job", "in_per_s": None, "out_per_s": 40.2},  # the Flink job's decisions
        {"stage": "face-stage", "in_per_s": None, "out_per_s": 1.5},
        {"stage": "opensearch-sink", "in_per_s": 12.5, "out_per_s": 12.0},
        {"stage": "alert-sender", "in_per_s": 0.25, "out_per_s": None},
    ]
    assert shaped["lag"] == [
        {"group": "checkout-guard-opensearch", "lag": 120},
        {"group": "checkout-guard-scoring", "lag": 3},
    ]
    assert shaped["dead_letters"] == [{"stage": "opensearch-sink", "per_s": 0.1}]
    assert shaped["deliveries"] == [
        {"channel": "email", "result": "delivered", "per_s": 2.0},
        {"channel": "webex", "result": "failed", "per_s": 0.5},
    ]
    assert shaped["latency"] == [
        {"stage": "opensearch-sink", "p99_s": 0.042},
        {"stage": "alert-sender", "p99_s": None},  # no request in the window: no quantile, not 0
    ]
    assert shaped["summary"] == {
        "targets_up": 2,
        "targets": 3,
        "records_in_per_s": 12.75,
        "decisions_per_s": 40.2,
        "lag": 123,
        "dead_letters_per_s": 0.1,
    }
    json.dumps(shaped, allow_nan=False)  # what the endpoint sends is plain JSON


def test_a_pipeline_without_the_flink_job_or_lag_has_no_rows_for_them() -> None:
    shaped = shape_pipeline({"up": results()["up"], "decisions": []}, window="60s", source="s", at_ms=0)
    assert [row["stage"] for row in shaped["throughput"]] == []
    assert shaped["lag"] == [] and shaped["summary"]["decisions_per_s"] is None


def test_read_pipeline_sends_every_query_and_shapes_the_answers() -> None:
    asked: list[str] = []

    def answer(promql: str) -> httpx.Response:
        asked.append(promql)
        return canned(promql)

    shaped = read_pipeline(prometheus(answer), scrape_interval_s=5.0, clock=lambda: AT)
    assert sorted(asked) == sorted(QUERIES.values())
    assert shaped == shape_pipeline(results(), window="60s", source="http://prometheus.test:9490", at_ms=int(AT * 1000))


def test_an_unreachable_prometheus_is_an_answer_with_the_reason_and_empty_panels() -> None:
    def refuse(promql: str) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    shaped = read_pipeline(prometheus(refuse), scrape_interval_s=5.0, clock=lambda: AT)
    assert shaped["error"] == "Prometheus at http://prometheus.test:9490 unreachable (ConnectError)"
    assert shaped["targets"] == shaped["throughput"] == shaped["lag"] == shaped["latency"] == []
    assert shaped["summary"]["targets"] == 0


def test_something_else_than_prometheus_at_the_url_is_named() -> None:
    shaped = read_pipeline(
        prometheus(lambda q: httpx.Response(404, text="<html>not found</html>")), scrape_interval_s=5.0
    )
    assert shaped["error"] == "http://prometheus.test:9490 answered HTTP 404 without JSON: is it Prometheus?"


def test_a_refused_query_empties_its_panel_only_and_says_which() -> None:
    def answer(promql: str) -> httpx.Response:
        if promql == QUERIES["p99"]:
            return httpx.Response(422, json={"status": "error", "errorType": "execution", "error": "boom"})
        return canned(promql)

    shaped = read_pipeline(prometheus(answer), scrape_interval_s=5.0)
    assert shaped["error"] == "p99: execution: boom"
    assert shaped["latency"] == [] and len(shaped["targets"]) == 3 and len(shaped["lag"]) == 2


def test_the_local_prometheus_is_asked_unless_another_is_configured() -> None:
    settings = Settings()
    assert prometheus_url(settings) == f"http://127.0.0.1:{settings.metrics.prometheus_port}"
    wildcard = settings.model_copy(update={"bind_host": "0.0.0.0"})
    assert prometheus_url(wildcard) == f"http://127.0.0.1:{settings.metrics.prometheus_port}"
    chain = settings.model_copy(update={"metrics": MetricsSettings(prometheus_url="https://prom.chain.example/")})
    assert prometheus_url(chain) == "https://prom.chain.example"


@pytest.mark.parametrize(("bind_host", "host"), [("::1", "[::1]"), ("::", "127.0.0.1"), ("fd00::5", "[fd00::5]")])
def test_an_ipv6_bind_host_asks_the_local_prometheus_at_a_valid_url(bind_host: str, host: str) -> None:
    """``http://::1:9490`` is no URL (its port is not one): with CG_BIND_HOST=::1 the dashboard's Prometheus client
    raised httpx.InvalidURL as the dashboard started, so the dashboard never ran."""
    settings = Settings(bind_host=bind_host)
    url = prometheus_url(settings)
    assert url == f"http://{host}:{settings.metrics.prometheus_port}"
    assert httpx.URL(url).port == settings.metrics.prometheus_port
    assert prometheus_api(settings).shown == url, "the dashboard's client is made"


def test_a_login_in_the_prometheus_url_is_used_but_never_shown() -> None:
    """Anyone with a dashboard login (even the read-only token) saw the password in ``source`` and errors."""
    sent: list[str] = []
    up_now = True

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization", ""))
        if not up_now:
            raise httpx.ConnectError("refused")
        return canned(request.url.params["query"])

    url = "https://ops:S3cretPass@prom.chain.example/prom?token=Tok3n#frag"
    api = PrometheusApi(url, transport=httpx.MockTransport(handle))
    shaped = read_pipeline(api, scrape_interval_s=5.0)
    assert sent[0] == "Basic " + base64.b64encode(b"ops:S3cretPass").decode()  # still logs in with it
    assert shaped["source"] == "https://prom.chain.example/prom"
    up_now = False
    down = read_pipeline(api, scrape_interval_s=5.0)
    assert down["error"] == "Prometheus at https://prom.chain.example/prom unreachable (ConnectError)"
    for answer in (shaped, down):
        assert "S3cretPass" not in json.dumps(answer) and "Tok3n" not in json.dumps(answer)


def test_the_prometheus_login_settings_log_in_with_http_basic() -> None:
    login = MetricsSettings(
        prometheus_url="https://prom.chain.example", prometheus_username="ops", prometheus_password="S3cretPass"
    )
    api = prometheus_api(Settings(metrics=login))
    request = next(api.client.auth.auth_flow(httpx.Request("GET", "https://prom.chain.example/api/v1/query")))
    assert request.headers["authorization"] == "Basic " + base64.b64encode(b"ops:S3cretPass").decode()
    assert api.shown == "https://prom.chain.example"
    assert prometheus_api(Settings()).client.auth is None  # no login configured: none sent


@pytest.mark.parametrize(
    ("login", "given", "missing"),
    [
        ({"prometheus_username": "ops"}, "USERNAME", "PASSWORD"),
        ({"prometheus_password": "S3cretPass"}, "PASSWORD", "USERNAME"),
        ({"prometheus_username": "ops", "prometheus_password": ""}, "USERNAME", "PASSWORD"),
    ],
    ids=["username-only", "password-only", "empty-password"],
)
def test_half_a_prometheus_login_is_refused_at_start_naming_both_variables(login, given, missing) -> None:
    """Half a login used to ask Prometheus with none: the health page then showed a bare HTTP 401."""
    with pytest.raises(ValidationError) as refused:
        Settings(metrics=login)
    text = str(refused.value)
    assert f"CG_METRICS__PROMETHEUS_{given} is set but CG_METRICS__PROMETHEUS_{missing} is not" in text
    assert "S3cretPass" not in text


class NoSearch:
    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        raise AssertionError("the pipeline page does not read OpenSearch")


def served(api: PrometheusApi, **login: Any) -> TestClient:
    settings = Settings().model_copy(update={"dashboard": DashboardSettings(**login)})
    board = Dashboard(settings, client=NoSearch(), prometheus=api)  # type: ignore[arg-type]
    return TestClient(create_app(settings, board), base_url="http://127.0.0.1:8050", raise_server_exceptions=False)


def test_the_endpoint_answers_200_with_the_error_when_prometheus_is_down() -> None:
    def refuse(promql: str) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out")

    answer = served(prometheus(refuse)).get("/api/pipeline")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    assert answer.json()["error"] == "Prometheus at http://prometheus.test:9490 unreachable (ConnectTimeout)"


def test_the_page_and_its_data_need_the_login_like_every_other_endpoint() -> None:
    client = served(prometheus(canned), username="manager", password=SecretStr("pw"))
    assert client.get("/pipeline").status_code == 401
    assert client.get("/api/pipeline").status_code == 401
    auth = {"Authorization": "Basic " + base64.b64encode(b"manager:pw").decode()}
    page = client.get("/pipeline", headers=auth)
    assert page.status_code == 200 and "/static/pipeline.js" in page.text
    data = client.get("/api/pipeline", headers=auth).json()
    assert data["error"] is None and data["summary"]["lag"] == 123


def test_the_dashboard_command_serves_its_metrics_with_every_groups_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[object] = []
    served_as: list[str] = []

    class Registry:
        def register(self, collector: object) -> None:
            registered.append(collector)

    started: list[object] = []
    monkeypatch.setattr(dashboard_main, "REGISTRY", Registry())
    monkeypatch.setattr(dashboard_main, "serve", lambda settings, process: served_as.append(process))
    monkeypatch.setattr(ConsumerLagCollector, "start", lambda self: started.append(self) or self)
    dashboard_main.export_metrics(Settings())
    assert [type(c) for c in registered] == [ConsumerLagCollector]
    assert served_as == ["dashboard"]
    assert started == registered  # its thread reads Kafka: a scrape only serves what it read
    dashboard_main.export_metrics(Settings(metrics={"enabled": False}))
    assert len(started) == 1  # metrics off: Kafka is not read for nothing


def test_at_the_stop_the_dashboard_stops_its_lag_thread_and_closes_its_command_publisher_by_the_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After its web server stopped, the dashboard closed neither its command publisher (a Kafka producer) nor the
    thread reading every group's lag: both are now closed after the server, by the stop's deadline (1 s before the
    SIGKILL), a flush that Kafka (down) does not finish given up with a WARNING."""
    import threading
    import time

    from typer.testing import CliRunner

    released = threading.Event()
    order: list[str] = []
    closed: list[float] = []
    lag = ConsumerLagCollector(Settings(metrics={"lag_interval_s": 0.05}), read=list)
    ends: list[float] = []

    class HangingFlush:
        def __init__(self, _settings: Settings) -> None:
            pass

        def __call__(self, *_a: object) -> None:
            pass

        def close(self, timeout_s: float) -> None:
            order.append("commands closed")
            closed.append(timeout_s)
            released.wait(4.0)  # Kafka does not take the flush

    def serve(*_a: object, **_k: object) -> float:
        order.append("server stopped")
        ends.append(time.monotonic() + 0.5)
        return ends[0]

    monkeypatch.setattr(dashboard_main, "FirstVerdictPublisher", HangingFlush, raising=False)
    monkeypatch.setattr(
        dashboard_main, "export_metrics", lambda _settings: (lag.start(), Endpoint("dashboard", 0, None))
    )
    monkeypatch.setattr(dashboard_main.web_server, "serve", serve)
    monkeypatch.setattr(dashboard_main, "get_settings", lambda: Settings())
    try:
        result = CliRunner().invoke(dashboard_main.cli, ["--host", "127.0.0.1"])
        late = time.monotonic() - ends[0]
    finally:
        released.set()
    assert result.exit_code == 0, result.output
    assert order == ["server stopped", "commands closed"] and 0 < closed[0] <= 0.5
    assert late < 0.3, f"the closes ran {late:.1f} s past the stop's deadline"
    assert lag._thread is None, "the lag thread was not stopped"
    assert any(r.levelname == "WARNING" and "dashboard-commands-close" in r.getMessage() for r in caplog.records)


def test_the_prometheus_client_the_dashboard_made_is_closed_when_the_app_shuts_down() -> None:
    """Its pooled connection to Prometheus outlived the app, left to the garbage collector (an unclosed-socket
    warning at some later, unrelated moment); a client the caller passed in stays the caller's."""
    settings = Settings()
    made = Dashboard(settings, client=NoSearch())  # type: ignore[arg-type]
    with TestClient(create_app(settings, made), base_url="http://127.0.0.1:8050"):
        assert not made.prometheus.client.is_closed
    assert made.prometheus.client.is_closed
    given = PrometheusApi("http://127.0.0.1:1")
    with TestClient(create_app(settings, Dashboard(settings, client=NoSearch(), prometheus=given))):  # type: ignore[arg-type]
        pass
    assert not given.client.is_closed
    given.close()


def test_at_the_stop_the_dashboard_closes_its_metrics_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Webex bot closed its metrics endpoint at the stop, the dashboard never did: its server answered /metrics and
    /healthz until the process ended. It is now closed in the dashboard's bounded stop, beside the lag thread."""
    import socket

    from typer.testing import CliRunner

    from infra import metrics

    endpoints: list[Endpoint] = []

    def export(settings: Settings) -> tuple[ConsumerLagCollector, Endpoint]:
        endpoints.append(metrics.serve(settings, "dashboard", port=0))  # a real server, on a free port
        return ConsumerLagCollector(settings), endpoints[0]

    monkeypatch.setattr(dashboard_main, "export_metrics", export)
    monkeypatch.setattr(dashboard_main.web_server, "serve", lambda *_a, **_k: None)  # the SIGTERM came at once
    monkeypatch.setattr(dashboard_main, "get_settings", lambda: Settings(metrics={"enabled": True}))
    result = CliRunner().invoke(dashboard_main.cli, ["--host", "127.0.0.1"])
    endpoint = endpoints[0]
    try:
        assert result.exit_code == 0, result.output
        assert endpoint.server is None, "the metrics endpoint was not closed at the stop"
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", endpoint.port), timeout=1):
            pass
    finally:
        endpoint.close()
