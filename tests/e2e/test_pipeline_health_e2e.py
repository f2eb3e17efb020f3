"""Pipeline health end to end: processes export /metrics and /healthz, Prometheus scrapes them, and the
dashboard's /pipeline page shows targets, throughput and consumer-group lag from it, in headless Chromium.

The stack's own Prometheus scrapes the default metrics ports, which a running demo or another test may
hold. So the processes here get a block of free metrics ports and a Prometheus of their own, started by
the stack's own code (``up(..., services=("prometheus",))``) from a private stack dir: the same config
generator and binary, none of the shared ports. Screenshots go to ``.stack/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from opensearchpy import NotFoundError

from infra.clients.opensearch import make_client
from infra.launcher import Child, spawn, wait_for
from infra.local.smtp import mail_dir
from infra.metrics import PROCESSES, port_of
from infra.settings import Settings
from infra.stack import StackPaths, ensure_topics, service_process, status, up
from schemas.indices import default_group_id as sink_group_id
from schemas.records import Alert, ScoredTransaction
from schemas.topics import ALERTS, ALL_TOPICS, SCORED_TRANSACTIONS
from sinks.alerts.sender import default_group_id as sender_group_id
from sinks.dashboard.app import Dashboard, create_app
from tests.ports import free_port, free_port_block

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".stack" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STARTED = ("opensearch-sink", "alert-sender", "dashboard")
WAIT_S = 60.0
"""Each wait below: start-up on a busy 2-core machine takes seconds, a scrape one second here."""
POSITIVE_RATE = re.compile(r"^\s*(?=[\d.,\s\u202f\u00a0]*[1-9])[\d.,\s\u202f\u00a0]+$")
"""A records/s cell (pipeline.js fmtRate) showing a rate above zero: digits and separators, one of them not 0
(not "0.00", not "–")."""


def mail_files(directory: Path, address: str) -> list[Path]:
    needle = f"Delivered-To: {address}\r\n".encode()
    return [p for p in directory.glob("*.eml") if needle in p.read_bytes()[:4096]]


@dataclass
class Pipeline:
    settings: Settings
    prometheus: str
    dashboard: str
    children: dict[str, Child]


def produce_until(stop: threading.Event, settings: Settings, name: str) -> None:
    """A few scored transactions and an alert every second: the counters keep rising while Prometheus
    scrapes (a counter that appears already at its final value has a rate of 0)."""
    producer = Producer(settings.kafka.client_config())
    scored, alerts = (spec.full_name(settings.kafka.topic_prefix) for spec in (SCORED_TRANSACTIONS, ALERTS))
    n = 0
    while not stop.is_set() and n < 2000:
        now = int(time.time() * 1000)
        for _ in range(5):
            n += 1
            tx = ScoredTransaction(
                transaction_id=f"{name}-tx-{n}",
                event_time=now,
                store_id="S01",
                lane_id="L1",
                kind="SALE",
                amount=12.5,
                currency="USD",
                item_count=1,
                customer_key=f"card:{n % 7}",
                outcome="APPROVE",
                risk_score=5,
                reasons=(),
                rules_version="builtin-v1",
                ingest_time=now,
                decided_at=now + 20,
                proc_time_ms=12,
                model_time_ms=3,
                ttdf_ms=20,
            )
            producer.produce(scored, key=tx.transaction_id.encode(), value=tx.encode())
        if n % 25 == 5:  # an alert now and then: the sender has work, the mailbox stays small
            alert = Alert(
                alert_id=f"blocked:{name}-tx-{n}",
                kind="BLOCKED_TRANSACTION",
                severity="high",
                event_time=now,
                store_id="S01",
                summary=f"Blocked {name}-tx-{n}",
            )
            producer.produce(alerts, key=alert.alert_id.encode(), value=alert.encode())
        producer.flush(10)
        stop.wait(1.0)
    producer.flush(10)


@pytest.fixture(scope="module")
def pipeline(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("pipeline")
    name = f"e2epipe{uuid.uuid4().hex[:6]}"
    base = stack.isolated(name, tmp / "checkpoints")
    settings = base.model_copy(
        update={
            "stack_dir": tmp / "stack",  # the private Prometheus's data and the children's logs
            "metrics": base.metrics.model_copy(
                update={
                    "base_port": free_port_block(len(PROCESSES)),
                    "prometheus_port": free_port(),
                    "scrape_interval_s": 1.0,
                    "lag_interval_s": 1.0,
                }
            ),
            "dashboard": base.dashboard.model_copy(update={"port": free_port(), "refresh_ms": 1000}),
            "alerts": base.alerts.model_copy(update={"channels": "email", "ledger_path": tmp / "ledger.sqlite3"}),
            "smtp": base.smtp.model_copy(update={"to_addresses": f"{name}@checkout-guard.test"}),
        }
    )
    ensure_topics(settings)
    up(settings, services=("prometheus",))
    children: dict[str, Child] = {}
    stop = threading.Event()
    producer = threading.Thread(target=produce_until, args=(stop, settings, name), daemon=True)
    try:
        children = {
            "opensearch-sink": spawn("sinks.opensearch.sink", settings, name=f"{name}-sink"),
            "alert-sender": spawn("sinks.alerts.sender", settings, name=f"{name}-sender"),
            "dashboard": spawn("sinks.dashboard", settings, name=f"{name}-dashboard"),
        }
        producer.start()
        yield Pipeline(
            settings,
            f"http://127.0.0.1:{settings.metrics.prometheus_port}",
            f"http://127.0.0.1:{settings.dashboard.port}",
            children,
        )
    finally:
        stop.set()
        producer.join(timeout=15)
        for child in children.values():
            child.stop()
        prometheus = service_process("prometheus", StackPaths.of(settings))  # ours only: the private stack dir
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        for path in mail_files(mail_dir(stack.stack_dir), settings.smtp.to_addresses):
            path.unlink(missing_ok=True)  # the stack's mailbox is the demo's too
        admin = AdminClient(dict(settings.kafka.client_config()))
        for future in admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]).values():
            with contextlib.suppress(KafkaException):
                future.result(30)
        client = make_client(settings.opensearch)
        client.indices.delete(index=f"{name}-*", ignore_unavailable=True)
        with contextlib.suppress(NotFoundError):
            for template in client.indices.get_index_template(name=f"{name}-*")["index_templates"]:
                client.indices.delete_index_template(name=template["name"])


def answers(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def alive(p: Pipeline) -> bool:
    """True while every child runs; fails the test at once (with its log) when one exited."""
    dead = {name: str(child.log_path) for name, child in p.children.items() if not child.alive}
    assert not dead, f"exited early, see {dead}"
    return True


def prometheus_up(p: Pipeline) -> dict[str, bool]:
    answer = httpx.get(f"{p.prometheus}/api/v1/query", params={"query": "up"}, timeout=5).json()
    return {s["metric"]["process"]: s["value"][1] == "1" for s in answer["data"]["result"]}


def scrape_urls(prometheus: str) -> dict[str, str]:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return {t["labels"]["process"]: t["scrapeUrl"] for t in targets}


def test_the_stacks_prometheus_is_up_and_scrapes_every_process(stack: Settings) -> None:
    # Another test's `make run` may have brought the shared stack up with other metrics ports; `up`
    # with these settings hands its Prometheus the matching scrape config again (a SIGHUP reload).
    up(stack, services=("prometheus",))
    assert status(stack)["services"]["prometheus"]["healthy"]
    url = f"http://127.0.0.1:{stack.metrics.prometheus_port}"
    wanted = {process: f"http://127.0.0.1:{port_of(stack, process)}/metrics" for process in PROCESSES}
    wait_for(lambda: scrape_urls(url) == wanted, timeout=20, what=f"the scrape targets {wanted}")


def test_processes_are_scraped_and_the_pipeline_api_shows_throughput_and_lag(pipeline: Pipeline) -> None:
    p, t0 = pipeline, time.monotonic()
    for process in STARTED:
        for path in ("/metrics", "/healthz"):
            url = f"http://127.0.0.1:{port_of(p.settings, process)}{path}"
            wait_for(lambda url=url: alive(p) and answers(url) == 200, WAIT_S, interval=0.5, what=f"{process} {url}")
    metrics = httpx.get(f"http://127.0.0.1:{port_of(p.settings, 'dashboard')}/metrics", timeout=5).text
    assert "# TYPE cg_consumer_lag gauge" in metrics and "# TYPE cg_consumer_lag_read_ok gauge" in metrics

    def started_up_others_listed() -> bool:
        seen = prometheus_up(p)  # the processes not started are listed too (as down), once scraped once
        return set(seen) == set(PROCESSES) and all(seen[process] for process in STARTED)

    wait_for(
        started_up_others_listed,
        WAIT_S,
        interval=0.5,
        what=f"Prometheus to list every process and see {', '.join(STARTED)} up",
    )

    groups = {sink_group_id(p.settings.kafka.topic_prefix), sender_group_id(p.settings)}

    def healthy_pipeline() -> dict[str, Any] | None:
        alive(p)
        data = httpx.get(f"{p.dashboard}/api/pipeline", timeout=10).json()
        rates = {row["stage"]: row["in_per_s"] for row in data["throughput"]}
        lagging = {row["group"] for row in data["lag"]}
        return data if (rates.get("opensearch-sink") or 0) > 0 and groups <= lagging else None

    data = wait_for(healthy_pipeline, WAIT_S, interval=1.0, what="throughput and lag of both groups on /api/pipeline")
    assert data["error"] is None
    assert data["source"] == p.prometheus
    assert {t["process"] for t in data["targets"] if t["up"]} >= set(STARTED)
    assert data["summary"]["records_in_per_s"] > 0
    print(f"\n/api/pipeline after {time.monotonic() - t0:.0f}s: {data['summary']}, lag {data['lag']}")


def test_the_pipeline_page_shows_targets_throughput_and_lag_in_headless_chromium(pipeline: Pipeline) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import expect, sync_playwright

    p = pipeline
    groups = [sink_group_id(p.settings.kafka.topic_prefix), sender_group_id(p.settings)]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{p.dashboard}/?minutes=15", wait_until="domcontentloaded")
            # the link carries the window once the page has read its controls (syncNav); a click before
            # that (a loaded machine) follows the bare href and never reaches "?minutes="
            page.wait_for_selector('#nav-pipeline[href*="minutes="]', state="attached", timeout=30_000)
            page.click("#nav-pipeline")  # the live page links to it, window kept
            page.wait_for_url("**/pipeline?*", timeout=30_000)
            assert "minutes=15" in page.url
            selectors = [f'#lag-table tr[data-group="{g}"]' for g in groups]
            selectors += ['#throughput-table tr[data-stage="opensearch-sink"]']
            selectors += [f'#targets-table tr[data-process="{s}"] span.state.up' for s in STARTED]
            for selector in selectors:
                page.wait_for_selector(selector, state="attached", timeout=int(WAIT_S * 1000))
            sink_in = page.locator('#throughput-table tr[data-stage="opensearch-sink"] td.in')
            expect(sink_in).to_have_text(POSITIVE_RATE, timeout=int(WAIT_S * 1000))
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "pipeline.png"), full_page=True)

            assert errors == []
            assert page.is_hidden("#pipeline-error")
            assert page.locator("#status.error").count() == 0
            up_now, total = page.inner_text("#kpi-targets .value").split(" / ")
            assert int(up_now) >= len(STARTED) and int(total) == len(PROCESSES)
            for s in STARTED:
                assert page.inner_text(f'#targets-table tr[data-process="{s}"] td.state') == "up"
            for g in groups:
                assert page.locator(f'#lag-table tr[data-group="{g}"] td.lag').inner_text() != "–"
        finally:
            browser.close()


def test_the_page_says_so_when_prometheus_is_unreachable(stack: Settings, tmp_path: Path) -> None:
    """No Prometheus at the configured address: a 200 with the reason, shown on the page, not an error page."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import sync_playwright

    gone = free_port()
    settings = stack.model_copy(
        update={"metrics": stack.metrics.model_copy(update={"prometheus_url": f"http://127.0.0.1:{gone}"})}
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, Dashboard(settings)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, interval=0.05, what="the dashboard to start")
        answer = httpx.get(f"http://127.0.0.1:{port}/api/pipeline", timeout=30)
        assert answer.status_code == 200 and "unreachable" in answer.json()["error"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 700})
                page.goto(f"http://127.0.0.1:{port}/pipeline", wait_until="domcontentloaded")
                page.wait_for_selector("body[data-renders]", state="attached", timeout=30_000)  # the first render
                banner = page.inner_text("#pipeline-error")
                assert f"127.0.0.1:{gone} unreachable" in banner and "make up" in banner
                assert page.is_visible("#pipeline-error") and page.locator("#status.error").count() == 1
                assert page.inner_text("#lag-none") == "Unknown: Prometheus did not answer."  # not "no lag"
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOTS / "pipeline-unavailable.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
