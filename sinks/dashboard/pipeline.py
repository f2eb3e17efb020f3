"""The pipeline-health page's data, read from Prometheus: which processes are up, records per second per
stage, consumer-group lag, dead letters, alert deliveries and p99 latency per stage.

Prometheus, not the processes themselves, is asked: it already scrapes every process (including the
Flink job's own reporter), keeps the history that rates need, and knows which process stopped answering.
:func:`pipeline_queries` and :func:`shape_pipeline` are pure (unit-tested on canned API answers);
:class:`PrometheusApi` only sends the queries, and :func:`read_pipeline` turns an unreachable Prometheus
into an answer that says so instead of an error page.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from infra.addresses import url_host
from infra.metrics import PROCESSES
from infra.settings import Settings
from schemas.errors import CheckoutGuardError

LATENCY_WINDOW = "5m"
"""p99 over five minutes: a shorter window has too few slow requests in it to say anything."""
MIN_RATE_WINDOW_S = 60
FLINK_DECISIONS = '{__name__=~"flink_.*checkout_guard.*decisions.*", __name__!~".*([Pp]er[_]?[Ss]econd|_rate).*"}'
"""The scoring job's decision counters from Flink's Prometheus reporter, whatever its scope prefix;
Flink meters (already a rate) are left out so they are not summed with the counters' rates."""
QUERY_TIMEOUT_S = 3.0


class PrometheusUnavailable(CheckoutGuardError, RuntimeError):
    """Prometheus did not answer (not running, wrong URL, timeout)."""


class PrometheusQueryError(CheckoutGuardError, ValueError):
    """Prometheus answered, but refused or failed one query."""


def prometheus_url(settings: Settings) -> str:
    """``metrics.prometheus_url`` (a store chain's own Prometheus), else the local stack's."""
    if settings.metrics.prometheus_url:
        return settings.metrics.prometheus_url.rstrip("/")
    return f"http://{url_host(settings.bind_host)}:{settings.metrics.prometheus_port}"


def shown_url(url: str) -> str:
    """``url`` as the page and its error texts may show it: without a login (``user:password@``), query or
    fragment. Anyone with a dashboard login, even the read-only token, sees it; a password in the
    configured URL was shown to all of them."""
    return str(httpx.URL(url).copy_with(userinfo=b"", query=None, fragment=None))


def prometheus_api(settings: Settings) -> PrometheusApi:
    """The health page's Prometheus client, logged in with ``CG_METRICS__PROMETHEUS_USERNAME``/``…__PASSWORD``
    when both are set (HTTP Basic)."""
    metrics = settings.metrics
    auth = None
    if metrics.prometheus_username and metrics.prometheus_password:
        auth = (metrics.prometheus_username, metrics.prometheus_password.get_secret_value())
    return PrometheusApi(prometheus_url(settings), auth=auth)


def rate_window(scrape_interval_s: float) -> str:
    """At least four scrapes per rate window (with fewer, ``rate`` is jumpy or empty), and at least a minute."""
    return f"{max(MIN_RATE_WINDOW_S, math.ceil(4 * scrape_interval_s))}s"


def pipeline_queries(window: str, latency_window: str = LATENCY_WINDOW) -> dict[str, str]:
    """PromQL per panel: instant queries, rates over ``window``."""
    return {
        "up": "up",
        "records_in": f"sum by (stage) (rate(cg_records_in_total[{window}]))",
        "records_out": f"sum by (stage) (rate(cg_records_out_total[{window}]))",
        "decisions": f"sum(rate({FLINK_DECISIONS}[{window}]))",
        "lag": "sum by (group) (cg_consumer_lag)",
        "dead_letters": f"sum by (stage) (rate(cg_dead_letters_total[{window}]))",
        "deliveries": f"sum by (channel, result) (rate(cg_channel_deliveries_total[{window}]))",
        "p99": (f"histogram_quantile(0.99, sum by (stage, le) (rate(cg_processing_seconds_bucket[{latency_window}])))"),
    }


def sample_value(sample: dict[str, Any]) -> float | None:
    """The number of one instant-vector sample; ``NaN``/``Inf`` (e.g. a quantile with no requests in the
    window) become ``None``, which JSON can carry and the page shows as a dash."""
    try:
        value = float(sample["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _by(series: Iterable[dict[str, Any]], label: str) -> dict[str, float | None]:
    return {s.get("metric", {}).get(label, ""): sample_value(s) for s in series}


def _total(values: Iterable[float | None]) -> float:
    return sum(v for v in values if v is not None)


def _process_order(name: str) -> tuple[int, str]:
    """The pipeline's own order (``PROCESSES``), anything else after it by name."""
    order = list(PROCESSES)
    return (order.index(name) if name in order else len(order), name)


def shape_pipeline(results: dict[str, list[dict[str, Any]]], *, window: str, source: str, at_ms: int) -> dict[str, Any]:
    """The page's JSON from each query's ``data.result`` (a missing query counts as no series)."""
    targets = sorted(
        (
            {
                "process": s["metric"].get("process") or s["metric"].get("job", ""),
                "instance": s["metric"].get("instance", ""),
                "up": sample_value(s) == 1.0,
            }
            for s in results.get("up", [])
            if "metric" in s
        ),
        key=lambda t: (_process_order(t["process"]), t["instance"]),
    )
    rates_in, rates_out = _by(results.get("records_in", []), "stage"), _by(results.get("records_out", []), "stage")
    throughput = [
        {"stage": stage, "in_per_s": rates_in.get(stage), "out_per_s": rates_out.get(stage)}
        for stage in sorted({*rates_in, *rates_out}, key=_process_order)
    ]
    decisions = [sample_value(s) for s in results.get("decisions", [])]
    decisions_per_s = decisions[0] if decisions else None
    if decisions_per_s is not None:
        throughput.insert(0, {"stage": "scoring-job", "in_per_s": None, "out_per_s": decisions_per_s})
    lag = [
        {"group": group, "lag": None if value is None else int(value)}
        for group, value in sorted(_by(results.get("lag", []), "group").items())
    ]
    dead = _by(results.get("dead_letters", []), "stage")
    dead_letters = [{"stage": stage, "per_s": dead[stage]} for stage in sorted(dead, key=_process_order)]
    deliveries = sorted(
        (
            {
                "channel": s["metric"].get("channel", ""),
                "result": s["metric"].get("result", ""),
                "per_s": sample_value(s),
            }
            for s in results.get("deliveries", [])
            if "metric" in s
        ),
        key=lambda d: (d["channel"], d["result"]),
    )
    p99 = _by(results.get("p99", []), "stage")
    latency = [{"stage": stage, "p99_s": p99[stage]} for stage in sorted(p99, key=_process_order)]
    return {
        "source": source,
        "at": at_ms,
        "window": window,
        "error": None,
        "summary": {
            "targets_up": sum(1 for t in targets if t["up"]),
            "targets": len(targets),
            "records_in_per_s": _total(rates_in.values()),
            "decisions_per_s": decisions_per_s,
            "lag": sum(row["lag"] or 0 for row in lag),
            "dead_letters_per_s": _total(dead.values()),
        },
        "targets": targets,
        "throughput": throughput,
        "lag": lag,
        "dead_letters": dead_letters,
        "deliveries": deliveries,
        "latency": latency,
    }


def unavailable(source: str, reason: str, *, window: str, at_ms: int) -> dict[str, Any]:
    """The same shape with nothing in it and the reason in ``error``: the page says what is wrong."""
    return {**shape_pipeline({}, window=window, source=source, at_ms=at_ms), "error": reason}


class PrometheusApi:
    """Instant queries against Prometheus's HTTP API (``/api/v1/query``)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = QUERY_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        auth: tuple[str, str] | None = None,
    ):
        self.url = url.rstrip("/")
        self.shown = shown_url(self.url)  # the only form that goes into answers and error texts
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport, auth=auth)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """``data.result`` of an instant vector query; raises :class:`PrometheusUnavailable` when nothing
        answers and :class:`PrometheusQueryError` when Prometheus refuses the query."""
        try:
            answer = self.client.get("/api/v1/query", params={"query": promql})
        except httpx.HTTPError as exc:
            raise PrometheusUnavailable(f"Prometheus at {self.shown} unreachable ({type(exc).__name__})") from exc
        try:
            body = answer.json()
        except ValueError:
            raise PrometheusUnavailable(
                f"{self.shown} answered HTTP {answer.status_code} without JSON: is it Prometheus?"
            ) from None
        if body.get("status") != "success":
            raise PrometheusQueryError(f"{body.get('errorType', 'error')}: {body.get('error', answer.status_code)}")
        data = body.get("data") or {}
        result = data.get("result") if data.get("resultType") == "vector" else None
        return result if isinstance(result, list) else []

    def close(self) -> None:
        self.client.close()


def read_pipeline(
    api: PrometheusApi, scrape_interval_s: float, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """Every panel's query against ``api``, shaped. Prometheus unreachable: :func:`unavailable`; a query it
    refuses: that panel empty and the reason in ``error``, the other panels still shown."""
    window = rate_window(scrape_interval_s)
    at_ms = int(clock() * 1000)
    results: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    for name, promql in pipeline_queries(window).items():
        try:
            results[name] = api.query(promql)
        except PrometheusUnavailable as exc:
            return unavailable(api.shown, str(exc), window=window, at_ms=at_ms)
        except PrometheusQueryError as exc:
            problems.append(f"{name}: {exc}")
    shaped = shape_pipeline(results, window=window, source=api.shown, at_ms=at_ms)
    shaped["error"] = "; ".join(problems) or None
    return shaped
