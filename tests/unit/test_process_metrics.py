"""Every long-running process counts what it does in ``infra.metrics`` and says whether it is healthy.

Each stage is driven through the same in-process code path its own unit tests use (fake Kafka clients,
fake channels, a scripted OpenSearch); the counters are read from prometheus-client's process-global
registry before and after, so only the growth is asserted. The metrics core itself is tested over HTTP:
``/metrics`` and ``/healthz`` on a free port, a heartbeat going stale on a fake clock, a taken port.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import KafkaError, Message, TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import SecretStr
from starlette.testclient import TestClient

from infra import metrics
from infra.clients.image_store import LocalImageStore
from infra.clients.meraki import Snapshot
from infra.local.webex import person_id, sign
from infra.metrics import ConsumerLagCollector, Heartbeat, PartitionLag, group_lags, serve
from infra.processes import StopRequest
from infra.retry import Backoff
from infra.settings import METRICS_PORTS, AlertSettings, CameraSettings, MetricsSettings, Settings, WebexSettings
from jobs.bot.webex_bot import ParsedCommand, WebexBot
from jobs.cases.core import case_id_for
from jobs.cases.service import CaseCore
from jobs.faces import watchlist_service
from jobs.faces.stage import FaceStage, FaceStageRunner
from jobs.faces.watchlist_service import Source, WatchlistCore, WatchlistService
from producers.camera_bridge import CameraBridge
from schemas.errors import InvalidRecord
from schemas.indices import ROUTES
from schemas.records import Alert, BotCommand, DeadLetter
from schemas.topics import CAMERA_EVENTS, TRANSACTIONS
from sinks.alerts.message import describe
from sinks.alerts.sender import AlertSender, DeliveryError, Ledger, check_event_time
from sinks.opensearch.sink import OpenSearchSink
from tests.unit import test_case_service as cases
from tests.unit.test_bridge_runtime import GOOD, TIMED_OUT, FakeKafka
from tests.unit.test_bridge_runtime import Clock as BridgeClock
from tests.unit.test_bridge_runtime import _message as mqtt_message
from tests.unit.test_edge_face_stage_runner import Consumer as FaceConsumer
from tests.unit.test_edge_face_stage_runner import Producer as FaceProducer
from tests.unit.test_edge_face_stage_runner import tx_message
from tests.unit.test_opensearch_sink import FakeBulkClient, alert, scored
from tests.unit.test_watchlist_service import ALLOWED, KEY, NOW, command
from tests.unit.test_watchlist_service_publish import FlakyTransactions, Group, _reading_one_alert
from tests.unit.test_watchlist_service_publish import service as watchlist_service_of

IN, OUT, DEAD = "cg_records_in_total", "cg_records_out_total", "cg_dead_letters_total"
DELIVERIES, DEPTH = "cg_channel_deliveries_total", "cg_queue_depth"
Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def read(series: Key) -> float:
    return REGISTRY.get_sample_value(series[0], dict(series[1])) or 0.0


class Growth:
    """The named samples read now; :meth:`since` says how much each grew (the registry is process-global)."""

    def __init__(self, expected: Mapping[Key, float]) -> None:
        self.before = {series: read(series) for series in expected}

    def since(self) -> dict[Key, float]:
        return {series: read(series) - before for series, before in self.before.items()}


def wait_until(done: Callable[[], bool], limit_s: float = 10.0, step: Callable[[], object] = lambda: None) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        step()
        time.sleep(0.005)


# --------------------------------------------------------------------------- the metrics core


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def local(enabled: bool = True, lag_interval_s: float = 5.0) -> Settings:
    return Settings(bind_host="127.0.0.1", metrics=MetricsSettings(enabled=enabled, lag_interval_s=lag_interval_s))


def test_serve_answers_metrics_and_healthz_turns_503_when_the_heartbeat_goes_stale() -> None:
    clock = FakeClock()
    heartbeat = Heartbeat(stale_s=60, clock=clock)
    endpoint = serve(local(), "face-stage", health=heartbeat, port=0)
    try:
        assert endpoint.server is not None and endpoint.port > 0
        base = f"http://127.0.0.1:{endpoint.port}"
        scrape = httpx.get(f"{base}/metrics")
        assert scrape.status_code == 200 and "cg_records_in_total" in scrape.text
        assert scrape.headers["content-type"].startswith("text/plain")
        ok = httpx.get(f"{base}/healthz")
        assert (ok.status_code, ok.text) == (200, "face-stage ok: ok\n")
        clock.now += 61
        stale = httpx.get(f"{base}/healthz")
        assert (stale.status_code, stale.text) == (503, "face-stage unhealthy: no progress for 61 s\n")
        heartbeat.beat()
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/other").status_code == 404
    finally:
        endpoint.close()
    assert endpoint.server is None


def test_a_reported_problem_makes_readyz_503_while_healthz_stays_alive_until_it_beats_without_one() -> None:
    heartbeat = Heartbeat(clock=FakeClock())
    endpoint = serve(local(), "opensearch-sink", health=heartbeat, port=0)
    try:
        url = f"http://127.0.0.1:{endpoint.port}"
        heartbeat.beat("OpenSearch unreachable")
        ready = httpx.get(f"{url}/readyz")
        assert (ready.status_code, ready.text) == (503, "opensearch-sink unhealthy: OpenSearch unreachable\n")
        alive = httpx.get(f"{url}/healthz")  # a restart would not bring OpenSearch back: alive, degraded
        assert (alive.status_code, alive.text) == (200, "opensearch-sink ok: degraded: OpenSearch unreachable\n")
        heartbeat.beat()
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        endpoint.close()


def test_a_health_check_that_raises_is_unhealthy_and_the_server_keeps_answering() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    endpoint = serve(local(), "alert-sender", health=broken, port=0)
    try:
        url = f"http://127.0.0.1:{endpoint.port}"
        answer = httpx.get(f"{url}/healthz")
        assert (answer.status_code, answer.text) == (503, "alert-sender unhealthy: health check failed: RuntimeError\n")
        assert httpx.get(f"{url}/metrics").status_code == 200
    finally:
        endpoint.close()


def test_serve_with_the_port_taken_runs_on_without_an_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = serve(local(), "camera-bridge", port=port)
    assert (endpoint.process, endpoint.port, endpoint.server) == ("camera-bridge", port, None)
    assert "running without an endpoint" in caplog.text
    endpoint.close()  # nothing to close: no error either


def test_serve_with_metrics_disabled_opens_nothing_and_names_the_configured_port() -> None:
    settings = local(enabled=False)
    endpoint = serve(settings, "watchlist-service")
    assert endpoint.server is None and endpoint.port == settings.metrics.base_port + 5
    with pytest.raises(KeyError):
        metrics.port_of(settings, "no-such-process")


def test_group_lags_is_end_minus_committed_from_the_start_when_uncommitted_and_never_negative() -> None:
    committed = {
        "sink": {("alerts", 0): 5, ("alerts", 1): -1001, ("alerts", 2): 12, ("gone", 0): 3},
        "bot": {("commands", 0): 7},
    }
    ends = {("alerts", 0): 10, ("alerts", 1): 7, ("alerts", 2): 10, ("commands", 0): 7}
    assert group_lags(committed, ends) == [
        PartitionLag("bot", "commands", 0, 0),
        PartitionLag("sink", "alerts", 0, 5),
        PartitionLag("sink", "alerts", 1, 7),  # nothing committed yet: the whole partition waits
        PartitionLag("sink", "alerts", 2, 0),  # committed past the end read a moment earlier: not -2
    ]  # ("gone", 0) has no end offset: left out


def _lag_registry(collector: ConsumerLagCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_a_scrape_serves_the_last_read_lag_and_never_reads_kafka() -> None:
    reads: list[int] = []

    def reader() -> list[PartitionLag]:
        reads.append(1)
        return [PartitionLag("sink", "alerts", 0, len(reads))]

    clock = FakeClock()
    collector = ConsumerLagCollector(local(lag_interval_s=5), read=reader, clock=clock)
    registry = _lag_registry(collector)
    assert "cg_consumer_lag{" not in generate_latest(registry).decode() and not reads  # nothing read yet
    assert registry.get_sample_value("cg_consumer_lag_read_ok") == 0
    assert collector.refresh()
    clock.now += 3
    for _ in range(3):
        text = generate_latest(registry).decode()
    assert len(reads) == 1
    assert 'cg_consumer_lag{group="sink",partition="0",topic="alerts"} 1.0' in text
    assert registry.get_sample_value("cg_consumer_lag_read_ok") == 1
    assert registry.get_sample_value("cg_consumer_lag_age_seconds") == 3


def test_a_scrape_answers_at_once_while_the_lag_reader_waits_for_kafka() -> None:
    """It read Kafka inside the scrape: a Kafka that did not answer took every scrape to the 5 s timeout."""
    answer = threading.Event()
    reads: list[int] = []

    def reader() -> list[PartitionLag]:
        reads.append(1)
        answer.wait(10)
        return [PartitionLag("sink", "alerts", 0, 4)]

    collector = ConsumerLagCollector(local(lag_interval_s=0.01), read=reader).start()
    try:
        registry = _lag_registry(collector)
        wait_until(lambda: bool(reads))
        began = time.monotonic()
        generate_latest(registry)
        assert time.monotonic() - began < 0.5
        assert registry.get_sample_value("cg_consumer_lag_read_ok") == 0
        answer.set()
        wait_until(lambda: registry.get_sample_value("cg_consumer_lag_read_ok") == 1)
        assert registry.get_sample_value("cg_consumer_lag", {"group": "sink", "topic": "alerts", "partition": "0"}) == 4
    finally:
        answer.set()
        collector.stop()
    assert collector._thread is None
    count = len(reads)
    time.sleep(0.05)
    assert len(reads) == count  # stopped: no more reads


def test_through_a_kafka_outage_the_last_lag_is_served_with_its_age_for_a_bounded_time() -> None:
    reader = _lag_reader([PartitionLag("sink", "alerts", 0, 4)], RuntimeError("all brokers down"), TimeoutError())
    clock = FakeClock()
    collector = ConsumerLagCollector(local(lag_interval_s=5), read=reader, clock=clock)
    registry = _lag_registry(collector)
    assert collector.refresh()
    clock.now += 5
    assert not collector.refresh()
    lag = {"group": "sink", "topic": "alerts", "partition": "0"}
    assert registry.get_sample_value("cg_consumer_lag", lag) == 4  # a lag alert keeps firing through a blip
    assert registry.get_sample_value("cg_consumer_lag_read_ok") == 0
    assert registry.get_sample_value("cg_consumer_lag_age_seconds") == 5
    clock.now += metrics.LAG_KEPT_READS * 5
    assert not collector.refresh()
    assert registry.get_sample_value("cg_consumer_lag", lag) is None  # too old to pass for the lag
    assert registry.get_sample_value("cg_consumer_lag_age_seconds") == (metrics.LAG_KEPT_READS + 1) * 5
    assert "# TYPE cg_consumer_lag gauge" in generate_latest(registry).decode()


def _lag_reader(*answers: Any) -> Callable[[], list[PartitionLag]]:
    """A lag reader that gives ``answers`` in turn, raising those that are exceptions."""
    left = list(answers)

    def read() -> list[PartitionLag]:
        answer = left.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return read


def test_an_outage_of_the_lag_reader_is_one_warning_and_its_end_one_line(caplog) -> None:
    """It warned at every read (every 10 s) while Kafka was away."""
    reader = _lag_reader(TimeoutError(), TimeoutError(), TimeoutError(), [], TimeoutError())
    collector = ConsumerLagCollector(local(lag_interval_s=5), read=reader)
    with caplog.at_level(logging.INFO, logger="infra.metrics"):
        assert [collector.refresh() for _ in range(5)] == [False, False, False, True, False]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "infra.metrics"]
    assert said == [
        ("WARNING", "consumer lag unavailable: TimeoutError"),
        ("INFO", "consumer lag available again"),
        ("WARNING", "consumer lag unavailable: TimeoutError"),
    ]


def test_timed_observes_the_wall_time_of_its_block() -> None:
    series = key("cg_processing_seconds_count", stage="timed-test")
    growth = Growth({series: 1})
    with metrics.timed(metrics.PROCESSING_SECONDS.labels("timed-test")):
        time.sleep(0.001)
    assert growth.since() == {series: 1}
    assert (REGISTRY.get_sample_value("cg_processing_seconds_sum", {"stage": "timed-test"}) or 0) >= 0.001


# --------------------------------------------------------------------------- face-stage


class NoFaces:
    def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
        return []


class Store:
    def put(self, kind: str, key: str, data: bytes) -> str:
        return f"{kind}/{key}.jpg"


def test_every_stage_metric_has_the_stage_label() -> None:
    """README: the ``stage`` label is the process name. ``cg_face_analysis_seconds`` had none, so a query by stage
    (``{stage="face-stage"}``) found none of its series. The deliveries are the alert sender's alone."""
    stage_metrics = [
        m for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram) and m is not metrics.DELIVERIES
    ]
    assert metrics.FACE_ANALYSIS_SECONDS in stage_metrics
    assert [m._name for m in stage_metrics if m._labelnames[:1] != ("stage",)] == []


def test_face_stage_counts_inputs_observations_by_status_dead_letters_and_each_analysis() -> None:
    stage_name = "face-stage"
    expected = {
        key(IN, stage=stage_name, kind="transaction"): 3,
        key(IN, stage=stage_name, kind="camera_event"): 1,
        key(OUT, stage=stage_name, kind="no_face"): 3,
        key(DEAD, stage=stage_name, reason="not_avro"): 1,
        key("cg_processing_seconds_count", stage=stage_name): 3,
        key("cg_face_analysis_seconds_count", stage=stage_name): 3,  # it had no stage label, unlike the README says
    }
    growth = Growth(expected)
    settings = Settings(cameras=CameraSettings(max_in_flight=3, snapshot_workers=2))

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8jpeg", "image/jpeg", at_ms, False, 1, 1, 0.1)

    cam_topic = CAMERA_EVENTS.full_name("")
    garbage = Message(topic=cam_topic, partition=0, offset=0, key=b"k", value=b"garbage")
    consumer = FaceConsumer([tx_message(0, "tx-0"), garbage, tx_message(1, "tx-1"), tx_message(2, "tx-2")])
    runner = FaceStageRunner(
        settings,
        FaceStage(settings, snapshot, NoFaces(), Store()),
        producer=FaceProducer(failures=2),  # the first two deliveries time out and are sent again
        consumer=consumer,
        backoff=Backoff(initial_s=0.01, maximum_s=0.02),
        recall=lambda *_: [],  # nothing published before
    )
    health: list[tuple[bool, str]] = []
    stop, started = threading.Event(), time.monotonic()
    tx_topic = TRANSACTIONS.full_name("")

    def tick(_stats: dict) -> None:
        health.append(runner.heartbeat.ready())
        finished = consumer.commits.get((tx_topic, 0)) == 3 and consumer.commits.get((cam_topic, 0)) == 1
        if finished or time.monotonic() - started > 15:
            stop.set()

    stats = runner.run(stop, tick)

    assert stats["failed"] == 2 and stats["observations"] == 3
    assert growth.since() == expected
    assert (False, "Kafka unreachable") in health, "a failed delivery waiting to be sent again is reported"
    assert health[-1] == (True, "ok")
    for queue in ("snapshots", "delivery_retries", "unacknowledged"):
        assert REGISTRY.get_sample_value(DEPTH, {"stage": stage_name, "queue": queue}) == 0


# --------------------------------------------------------------------------- camera-bridge


def test_camera_bridge_counts_messages_by_kind_events_out_and_dead_letters_by_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stage_name = "camera-bridge"
    expected = {
        key(IN, stage=stage_name, kind="raw_detections"): 1,
        key(IN, stage=stage_name, kind="zone_count"): 1,
        key(IN, stage=stage_name, kind="ignored"): 1,
        key(IN, stage=stage_name, kind="invalid"): 1,
        key(OUT, stage=stage_name, kind="raw_detections"): 1,
        key(OUT, stage=stage_name, kind="zone_count"): 1,
        key(DEAD, stage=stage_name, reason="not_json"): 1,
    }
    growth = Growth(expected)
    kafka, clock = FakeKafka(lambda n: TIMED_OUT if n == 0 else None), BridgeClock()
    bridge = CameraBridge(Settings(), kafka, backoff=Backoff(initial_s=1.0, maximum_s=2.0), clock=clock)  # type: ignore[arg-type]
    monkeypatch.setattr(bridge.client, "ack", lambda mid, qos: None)
    messages: list[mqtt.MQTTMessage] = [
        mqtt_message(GOOD, 1),
        mqtt_message(b'{"ts": 1795000000000, "counts": {"person": 2}}', 2, "/merakimv/Q2MV-A/0"),
        mqtt_message(b"{}", 3, "/merakimv/Q2MV-A/light"),
        mqtt_message(b"not json", 4, "/merakimv/Q2MV-A/raw_detections"),
    ]
    for msg in messages:
        bridge._on_message(bridge.client, None, msg)
    bridge.service(0)  # the first event's delivery times out: it waits for another attempt
    assert bridge.problem() == "Kafka unreachable"
    clock.now += 2.0  # its backoff is over: produced again and delivered
    bridge.service(0)
    bridge.service(0)

    assert growth.since() == expected
    assert bridge.problem() is None


# --------------------------------------------------------------------------- opensearch-sink


class SinkConsumer:
    """Owns every partition, hands out nothing more (the batch is given to the sink directly)."""

    def __init__(self) -> None:
        self.commits: list[list[TopicPartition]] = []
        self.positions: dict[tuple[str, int], int] = {}
        """The consumer's position per partition (none given: unknown, as before anything was read)."""

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(route.topic.full_name(""), 0) for route in ROUTES] + [TopicPartition("elsewhere", 0)]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
            for tp in partitions
        ]

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        return []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        self.commits.append(offsets)
        return offsets

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass


class ConfirmingProducer:
    """Confirms every produced record on ``poll``/``flush``; the first ``refuse`` deliveries fail."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.sent: list[tuple[str, bytes]] = []
        self._pending: list[tuple[str, bytes, Callable[[Any, Any], None]]] = []

    def produce(self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        self._pending.append((topic, value, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for topic, value, on_delivery in pending:
            if self.refuse > 0:
                self.refuse -= 1
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                self.sent.append((topic, value))
                on_delivery(None, None)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return len(self._pending)


class WatchedBulkClient(FakeBulkClient):
    """Records the sink's health at each bulk request: a retry comes after the wait that reported it."""

    def __init__(self, *answers: Any) -> None:
        super().__init__(*answers)
        self.health: list[tuple[bool, str]] = []
        self.heartbeat: Heartbeat | None = None

    def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        assert self.heartbeat is not None
        self.health.append(self.heartbeat.ready())
        return super().bulk(body, *args, **kwargs)


def test_opensearch_sink_counts_records_in_documents_written_by_kind_dead_letters_and_batch_time() -> None:
    stage_name = "opensearch-sink"
    expected = {
        key(IN, stage=stage_name, kind="transactions"): 3,
        key(IN, stage=stage_name, kind="alerts"): 1,
        key(IN, stage=stage_name, kind="face_observations"): 1,
        key(IN, stage=stage_name, kind="unknown"): 1,
        key(OUT, stage=stage_name, kind="transactions"): 2,
        key(OUT, stage=stage_name, kind="alerts"): 1,
        key(DEAD, stage=stage_name, reason="opensearch_rejected"): 1,
        key(DEAD, stage=stage_name, reason="not_avro"): 1,
        key(DEAD, stage=stage_name, reason="unknown_topic"): 1,
        key("cg_processing_seconds_count", stage=stage_name): 1,
    }
    growth = Growth(expected)
    client = WatchedBulkClient(
        {
            "tx-2": {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}},
            "tx-3": {"status": 400, "error": {"type": "mapper_parsing_exception", "reason": "bad field"}},
        },
        {},  # the retry of tx-2 goes through
    )
    sink = OpenSearchSink(Settings(), client=client, backoff=Backoff(initial_s=0.001, maximum_s=0.002))  # type: ignore[arg-type]
    client.heartbeat = sink.heartbeat
    consumer, producer = SinkConsumer(), ConfirmingProducer()
    sink._consumer, sink._producer = consumer, producer  # type: ignore[assignment]
    topic = {route.kind: route.topic.full_name("") for route in ROUTES}
    batch = [
        Message(topic=topic["transactions"], partition=0, offset=n, value=scored(f"tx-{n}").encode()) for n in (1, 2, 3)
    ] + [
        Message(topic=topic["alerts"], partition=0, offset=0, value=alert().encode()),
        Message(topic=topic["face_observations"], partition=0, offset=0, value=b"garbage"),
        Message(topic="elsewhere", partition=0, offset=0, value=b"x"),
    ]

    sink._process(batch)

    assert growth.since() == expected
    assert client.health == [(True, "ok"), (False, "OpenSearch unreachable: 429 es_rejected_execution_exception")]
    assert sink.heartbeat.ready() == (True, "ok") and len(producer.sent) == 3


# --------------------------------------------------------------------------- alert-sender


class ScriptedChannel:
    """``email`` whose answer depends on the alert: ``ok-*`` delivered, ``refused-*`` refused for good,
    ``flaky-*`` failing once; everything is down while ``down`` is set."""

    name, can_check_sent = "email", False

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        alert_id = alert["alert_id"]
        with self.lock:
            self.calls[alert_id] = self.calls.get(alert_id, 0) + 1
            calls = self.calls[alert_id]
        if self.down.is_set():
            raise DeliveryError("SMTP ConnectionRefusedError", down=True)
        if alert_id.startswith("refused"):
            raise DeliveryError("550 mailbox unavailable", retriable=False)
        if alert_id.startswith("flaky") and calls == 1:
            raise DeliveryError("451 try again")
        return None

    def close(self) -> None:
        pass


def sender_with(tmp_path: Path, channel: ScriptedChannel, producer: ConfirmingProducer) -> AlertSender:
    alerts = AlertSettings(channels="email", concurrency=2, retry_initial_s=0.01, retry_max_s=0.02)
    settings = Settings(stack_dir=tmp_path, alerts=alerts)
    sender = AlertSender(settings, channels=[channel], ledger=Ledger(tmp_path / "ledger.sqlite3"))
    sender._producer = producer  # type: ignore[assignment]
    sender.start_workers()
    return sender


def alert_message(alert_id: str, offset: int, event_time: int = 0) -> Message:
    record = Alert(
        alert_id=alert_id,
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=event_time,
        store_id="S1",
        summary="x",
    )
    return Message(topic="alerts", partition=0, offset=offset, key=alert_id.encode(), value=record.encode())


def test_alert_sender_counts_alerts_and_each_channel_outcome_as_the_sender_saw_it(tmp_path: Path) -> None:
    stage_name = "alert-sender"
    expected = {
        key(IN, stage=stage_name, kind="alert"): 4,
        key(IN, stage=stage_name, kind="invalid"): 1,
        key(OUT, stage=stage_name, kind="alert"): 3,
        key(DEAD, stage=stage_name, reason="not_avro"): 1,
        key(DEAD, stage=stage_name, reason="delivery_failed"): 1,
        key(DELIVERIES, channel="email", result="delivered"): 2,
        key(DELIVERIES, channel="email", result="failed"): 2,
        key(DELIVERIES, channel="email", result="retried"): 1,
        key(DELIVERIES, channel="email", result="dead_lettered"): 1,
        key(DELIVERIES, channel="email", result="already_sent"): 1,
    }
    growth = Growth(expected)
    channel, producer = ScriptedChannel(), ConfirmingProducer(refuse=1)
    sender = sender_with(tmp_path, channel, producer)

    def turn() -> None:
        sender._drain_outcomes()
        producer.poll()

    try:
        sender._accept_batch([Message(topic="alerts", partition=0, offset=0, value=b"garbage")])
        producer.poll()  # its dead letter is not delivered: produced again
        assert sender.problem() == "Kafka unreachable", "reported until a dead letter is delivered"
        sender._accept_batch([alert_message("ok-1", 1), alert_message("refused-1", 2)])
        sender._accept_batch([alert_message("flaky-1", 3)])
        wait_until(lambda: sender.stats.alerts_done == 4, step=turn)
        sender._accept_batch([alert_message("ok-1", 4)])  # replayed: the ledger has it
        wait_until(lambda: sender.stats.alerts_done == 5, step=turn)
    finally:
        sender.close()

    assert growth.since() == expected
    assert sender.problem() is None


def test_an_alert_read_again_after_its_dead_letter_was_confirmed_is_skipped_not_dead_lettered_or_tried_again(
    tmp_path: Path,
) -> None:
    """A crash between a dead letter's acknowledgement and the offset commit read the alert again: a second dead
    letter, and another try on the channel that had refused it. The ledger now records the dead letter by position."""
    expected = {
        key(DEAD, stage="alert-sender", reason="delivery_failed"): 2,  # the first read's and the re-drive's
        key(DEAD, stage="alert-sender", reason="not_avro"): 1,
        key(DELIVERIES, channel="email", result="already_dead_lettered"): 2,
    }
    growth = Growth(expected)
    channel, producer = ScriptedChannel(), ConfirmingProducer()

    def run(sender: AlertSender, done: int) -> None:
        sender._accept_batch(
            [alert_message("refused-1", 7), Message(topic="alerts", partition=0, offset=8, value=b"x")]
        )
        wait_until(lambda: sender.stats.alerts_done == done, step=lambda: (sender._drain_outcomes(), producer.poll()))

    first = sender_with(tmp_path, channel, producer)
    try:
        run(first, 2)  # dead-lettered, confirmed; the "crash" comes before any offset commit
    finally:
        first.close()
    again = sender_with(tmp_path, channel, producer)  # the same ledger file
    try:
        run(again, 2)
        again._accept_batch([alert_message("refused-1", 9)])  # a re-drive: a new record, tried as ever
        wait_until(lambda: again.stats.alerts_done == 3, step=lambda: (again._drain_outcomes(), producer.poll()))
    finally:
        again.close()

    assert growth.since() == expected
    assert len(producer.sent) == 3 and channel.calls == {"refused-1": 2}
    assert again.stats.already_dead_lettered == 2 and again.stats.dead_lettered == 1


def test_alert_sender_reports_a_channel_down_until_it_answers_again(tmp_path: Path) -> None:
    channel = ScriptedChannel()
    channel.down.set()
    failed = key(DELIVERIES, channel="email", result="failed")
    growth = Growth({failed: 1})
    sender = sender_with(tmp_path, channel, ConfirmingProducer())
    try:
        sender._accept_batch([alert_message("ok-2", 0)])
        wait_until(lambda: sender.problem() == "email unreachable", step=sender._drain_outcomes)
        channel.down.clear()
        wait_until(lambda: sender.stats.alerts_done == 1, step=sender._drain_outcomes)
        assert sender.problem() is None
    finally:
        sender.close()
    assert growth.since()[failed] >= 1


def test_an_alert_of_a_longest_valid_transaction_id_is_sent_not_dead_lettered(tmp_path: Path) -> None:
    """``blocked:<transaction>`` of a 128-character transaction id (a valid one) is 136 characters: the sender took
    it for a hostile id and dead-lettered the alert (``invalid_id``); a watch-list sighting's id, built from two ids,
    crosses 128 with transaction ids of about 50."""
    channel, producer = ScriptedChannel(), ConfirmingProducer()
    sender = sender_with(tmp_path, channel, producer)
    long_id = "ok-blocked:" + "t" * 128
    try:
        sender._accept_batch([alert_message(long_id, 0), alert_message("ok-x/../y", 1)])
        wait_until(lambda: sender.stats.alerts_done == 2, step=lambda: (sender._drain_outcomes(), producer.poll()))
    finally:
        sender.close()
    assert channel.calls == {long_id: 1}  # an id with a path in it is still refused
    assert sender.stats.dead_lettered == 1


class FormattingChannel(ScriptedChannel):
    """A :class:`ScriptedChannel` that words each alert first, as the e-mail and Webex channels do."""

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        describe(alert, AlertSettings(timezone="Europe/Berlin"))
        return super().send(alert, image, maybe_sent)


def test_an_alert_whose_event_time_is_no_date_is_dead_lettered_at_once_as_invalid_timestamp(tmp_path: Path) -> None:
    """``event_time`` 10**18 ms (or far before 1970) makes the message's local time raise in every channel: the
    alert was retried ``max_attempts`` times as an internal error before its dead letter (``delivery_failed``)."""
    channel, producer = FormattingChannel(), ConfirmingProducer()
    sender = sender_with(tmp_path, channel, producer)
    messages = [alert_message("ok-far", 0, 10**18), alert_message("ok-past", 1, -(10**18))]
    try:
        sender._accept_batch([*messages, alert_message("ok-now", 2, 1_767_261_303_000)])
        wait_until(lambda: sender.stats.alerts_done == 3, step=lambda: (sender._drain_outcomes(), producer.poll()))
    finally:
        sender.close()
    assert channel.calls == {"ok-now": 1}  # the others never reached a channel
    letters = [DeadLetter.decode(value) for _, value in producer.sent]
    assert [(d.error_kind, d.offset) for d in letters] == [("invalid_timestamp", 0), ("invalid_timestamp", 1)]
    assert all("event_time" in d.reason for d in letters)
    with pytest.raises(InvalidRecord):
        check_event_time({"event_time": 253_402_300_799_999}, "Pacific/Kiritimati")  # 9999-12-31 UTC: year 10000 there
    check_event_time({"event_time": 0}, None)  # 1970: shown as it is


# --------------------------------------------------------------------------- watchlist-service


def test_watchlist_service_counts_commands_by_verb_and_records_once_their_transaction_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage_name = "watchlist-service"
    expected = {
        key(IN, stage=stage_name, kind="forget"): 1,
        key(IN, stage=stage_name, kind="fraud"): 1,
        key(IN, stage=stage_name, kind="invalid"): 1,
        key(IN, stage=stage_name, kind="alert"): 1,
        key(OUT, stage=stage_name, kind="watchlist_tombstone"): 1,
        key(OUT, stage=stage_name, kind="audit"): 2,
        key(DEAD, stage=stage_name, reason="unauthorized"): 1,
        key(DEAD, stage=stage_name, reason="not_avro"): 1,
    }
    growth = Growth(expected)
    settings = Settings(
        stack_dir=tmp_path, webex=WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    )
    core = WatchlistCore(settings, engine=object(), store=LocalImageStore(tmp_path / "images"))  # type: ignore[arg-type]
    unsigned = BotCommand(command_id="c7", issued_at=NOW, verb="FRAUD", actor="lp@example.com", argument="tx-1")
    no_snapshot = Alert(
        alert_id="a-1", kind="BLOCKED_TRANSACTION", severity="high", event_time=0, store_id="S1", summary="x"
    )
    outs = [
        *core.on_command(command("FORGET", "subj-tx-9", cid="c1"), NOW),
        *core.on_command(Source("commands", 0, 7, b"c7", unsigned.encode()), NOW),
        *core.on_command(Source("commands", 0, 8, None, b"garbage"), NOW),
        *core.on_alert(Source("alerts", 0, 1, b"a-1", no_snapshot.encode()), NOW),
    ]
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    abortable = KafkaError(KafkaError._STATE, "needs abort", txn_requires_abort=True)
    svc = WatchlistService.__new__(WatchlistService)
    svc.producer, svc.consumer, svc.prefix = FlakyTransactions([abortable]), Group(), ""  # type: ignore[assignment]
    svc.settings, svc._stop = settings, StopRequest()
    svc.heartbeat = Heartbeat()

    svc._publish(outs, ["offset"])

    assert growth.since() == expected, "counted once, though the transaction was redone"
    assert svc.heartbeat.ready() == (False, "Kafka unreachable"), "until the loop's next turn beats again"


def test_an_alert_read_again_while_the_image_store_is_away_is_one_input_timed_without_the_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alert whose snapshot cannot be retained while S3 is away is read again after a backoff: each read was
    counted as another alert, and each backoff was observed as processing time, so an outage showed as a burst of
    slow alerts."""
    from botocore.exceptions import EndpointConnectionError

    stage_name, backoff_s = "watchlist-service", 0.1
    alerts, timings = key(IN, stage=stage_name, kind="alert"), key("cg_processing_seconds_count", stage=stage_name)
    spent = key("cg_processing_seconds_sum", stage=stage_name)
    growth = Growth({alerts: 1, timings: 1, spent: 0})
    outage = [EndpointConnectionError(endpoint_url="https://s3.example") for _ in range(2)]

    class AwayStore(LocalImageStore):
        def retain(self, ref: str, reason: str) -> None:
            if outage:
                raise outage.pop(0)
            super().retain(ref, reason)

    store = AwayStore(tmp_path / "images")
    snapshot = store.put("checkout", "tx-9", b"a shopper at a lane")
    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=object(), store=store)  # type: ignore[arg-type]
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect", snapshot_ref=snapshot)
    svc = watchlist_service_of(FlakyTransactions([]))
    _reading_one_alert(svc, core, alert, monkeypatch)
    monkeypatch.setattr(WatchlistService, "STORE_BACKOFF", Backoff(initial_s=backoff_s, maximum_s=backoff_s))
    svc.run()

    assert svc.consumer.seeks == [7, 7], "read three times"
    grown = growth.since()
    assert (grown[alerts], grown[timings]) == (1, 1), "one alert, retained once S3 was back"
    assert grown[spent] < backoff_s, "the waits for S3 are no processing"


# --------------------------------------------------------------------------- case-service


def test_case_service_counts_a_verdict_that_waited_for_its_case_as_one_command() -> None:
    """A verdict read before its alert waits for the case, then is applied when the alert opens it, or refused once
    too old: it was counted when read and again when taken up, so one verdict showed as two commands."""
    stage_name = "case-service"
    expected = {
        key(IN, stage=stage_name, kind="dismiss"): 1,
        key(IN, stage=stage_name, kind="confirm"): 1,
        key(IN, stage=stage_name, kind="alert"): 1,
    }
    growth = Growth(expected)
    webex = WebexSettings(command_signing_key=SecretStr(cases.KEY), allowed_people=f"{cases.GUARD},{cases.LEAD}")
    core = CaseCore(Settings(webex=webex))
    core.marked_at = cases.NOW
    case_id = case_id_for("watchlist:tx-1:subj-a")
    early = cases.command_src("DISMISS", f"{case_id} not them", "c-early", offset=7)
    orphan = replace(cases.command_src("CONFIRM", "case-000000000000", "c-orphan", offset=8), written_at=cases.NOW)

    assert core.on_command(early, cases.NOW) == [] and core.on_command(orphan, cases.NOW) == []
    opened = core.on_alert(cases.alert_src(), cases.NOW + 10)
    refused = core.expire(cases.NOW + int(webex.command_max_age_s * 1000) + 1)

    assert [cases.Case.decode(o.value).state for o in cases.of(opened, cases.CASES)] == ["open", "dismissed"]
    assert [cases.DeadLetter.decode(o.value).error_kind for o in cases.of(refused, cases.DEAD_LETTERS)] == [
        "unknown_case"
    ]
    assert growth.since() == expected


def test_the_hourly_compaction_marker_is_no_forget_nor_removed_case_in_records_out() -> None:
    """The marker each service appends once a segment on its compacted topic is a tombstone of a key that never had
    a record: it was counted as ``watchlist_tombstone`` / ``cases_tombstone``, so a quiet store showed one forget and
    one removed case an hour. A real tombstone is still counted."""
    from infra.clients.transactional import Out, count
    from schemas.topics import CASES, COMPACTION_MARKER, HOUR_MS, WATCHLIST

    core = CaseCore(Settings())
    core.marked_at = cases.NOW
    [marker] = core.expire(cases.NOW + HOUR_MS)
    assert marker.key == COMPACTION_MARKER
    for stage_name, topic, outs in (
        ("case-service", CASES, [marker]),
        ("watchlist-service", WATCHLIST, [Out(WATCHLIST, COMPACTION_MARKER, None), Out(WATCHLIST, b"subj-a", None)]),
    ):
        expected = {key(OUT, stage=stage_name, kind=f"{topic.name}_tombstone"): float(topic == WATCHLIST)}
        growth = Growth(expected)
        count(stage_name, outs)
        assert growth.since() == expected, stage_name


# --------------------------------------------------------------------------- webex-bot


def test_webex_bot_counts_webhooks_by_outcome_and_commands_out_not_those_kafka_refused() -> None:
    stage_name, secret, room = "webex-bot", "hook-secret", "room-security"
    expected = {
        key(IN, stage=stage_name, kind="accepted"): 1,
        key(IN, stage=stage_name, kind="rejected_signature"): 2,
        key(IN, stage=stage_name, kind="invalid"): 1,
        key(IN, stage=stage_name, kind="ignored"): 1,
        key(OUT, stage=stage_name, kind="fraud"): 1,
        key(OUT, stage=stage_name, kind="help"): 1,
    }
    growth = Growth(expected)
    webex = WebexSettings(webhook_secret=SecretStr(secret), command_signing_key=SecretStr(KEY), allowed_rooms=room)
    published: list[BotCommand] = []
    bot = WebexBot(
        Settings(webex=webex),
        client=object(),  # type: ignore[arg-type]  # nothing here reaches Webex
        publish=lambda cmd, _headers: published.append(cmd),
        inspect_checkout=lambda tx: tx,
        status_text=lambda: "healthy",
    )
    bot._handle_safely = lambda data: None  # type: ignore[method-assign]  # the background part: not counted here
    http = TestClient(bot.app)
    body = (
        b'{"resource": "messages", "event": "created", "data": {"id": "m-1", "roomId": "'
        + room.encode()
        + b'", "personId": "'
        + person_id("lp@example.com").encode()
        + b'"}}'
    )
    url = "/webex/webhook"
    assert http.post(url, content=body).status_code == 401
    assert http.post(url, content=body, headers={"X-Spark-Signature": sign(body, "guessed")}).status_code == 403
    assert http.post(url, content=b"nope", headers={"X-Spark-Signature": sign(b"nope", secret)}).status_code == 400
    assert http.post(url, content=body, headers={"X-Spark-Signature": sign(body, secret)}).status_code == 200
    assert http.post(url, content=body, headers={"X-Spark-Signature": sign(body, secret)}).json()["ignored"]

    assert bot._execute(ParsedCommand("FRAUD", "tx-1"), "m-1", room, "lp@example.com", "person-lp")[1]

    def refused(_cmd: BotCommand, _headers: Any) -> None:
        raise RuntimeError("command not confirmed by Kafka within 10 s")

    bot.publish = refused
    assert not bot._execute(ParsedCommand("STATUS"), "m-2", room, "lp@example.com", "person-lp")[1]
    bot.publish = lambda cmd, _headers: published.append(cmd)
    assert bot._execute(ParsedCommand("HELP"), "m-3", room, "lp@example.com", "person-lp")[1]

    assert growth.since() == expected and [c.verb for c in published] == ["FRAUD", "HELP"]
    bot.close()


def test_the_metrics_ports_from_the_base_cover_every_process() -> None:
    """The settings bound the base port by METRICS_PORTS, so every process's port stays within 65535."""
    assert max(metrics.PROCESSES.values()) < METRICS_PORTS
    top = Settings(metrics=MetricsSettings(base_port=65536 - METRICS_PORTS))
    assert max(metrics.port_of(top, name) for name in metrics.PROCESSES) <= 65535
    with pytest.raises(ValueError, match="less than or equal to"):
        MetricsSettings(base_port=65537 - METRICS_PORTS)


def test_every_health_answer_names_the_process_that_gave_it() -> None:
    endpoint = serve(local(), "face-stage", port=0)
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            reply = httpx.get(f"http://127.0.0.1:{endpoint.port}{path}", timeout=5)
            assert reply.headers[metrics.PID_HEADER] == str(os.getpid()), path
    finally:
        endpoint.close()


def test_the_alert_senders_readyz_is_503_too_once_its_eraser_thread_has_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: ``/readyz`` is 503 also while ``/healthz`` is. The sender's ``/readyz`` asked only its heartbeat, so
    with the eraser dead (``/healthz`` 503: forgotten subjects' messages stay in the room) it still said ready."""
    from sinks.alerts import sender as sender_module

    sender = sender_with(tmp_path, ScriptedChannel(), ConfirmingProducer())
    wired: dict[str, Any] = {}

    def fake_serve(settings: Settings, process: str, **checks: Any) -> metrics.Endpoint:
        wired.update(checks)
        return metrics.Endpoint(process, 0, None)

    monkeypatch.setattr(sender_module, "get_settings", lambda: sender.settings)
    monkeypatch.setattr(sender_module, "setup_logging", lambda *_a: None)
    monkeypatch.setattr(sender_module.signal, "signal", lambda *_a: None)
    monkeypatch.setattr(sender_module, "AlertSender", lambda _settings, group_id=None: sender)
    monkeypatch.setattr(sender, "run", lambda _stop: None)
    monkeypatch.setattr(sender_module.metrics, "serve", fake_serve)
    try:
        sender_module.main(group_id=None, log_level=None)
        assert wired["ready"]() == (True, "ok")
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        sender._eraser_thread = dead
        assert wired["health"]() == (False, "alert eraser stopped")
        assert wired["ready"]() == (False, "alert eraser stopped")
    finally:
        sender.close()


def test_a_face_stage_trigger_that_used_its_whole_snapshot_deadline_is_under_a_finite_bucket() -> None:
    """A checkout trigger with the real Dashboard takes up to ``CG_CAMERAS__DEADLINE_S`` (30 s) for its snapshot, then
    its analysis: the buckets ended at 30 s, so such triggers fell in ``+Inf`` alone and the pipeline page's p99 stayed
    at 30 s however slow the cameras got."""
    from infra.settings import FACE_DELIVERY_MARGIN_MS

    worst = CameraSettings().deadline_s + FACE_DELIVERY_MARGIN_MS / 1000
    top = max(metrics.LATENCY_BUCKETS)
    assert top >= 2 * worst, "room above the slowest trigger without a backlog"
    below_top = key("cg_processing_seconds_bucket", stage="face-stage", le=f"{top:.1f}")
    growth = Growth({below_top: 1})
    metrics.PROCESSING_SECONDS.labels("face-stage").observe(worst)
    assert growth.since() == {below_top: 1}


def test_a_connection_that_sends_nothing_is_closed_after_the_request_timeout_and_health_still_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that connected and never sent a request kept a handler thread for ever; now it is dropped."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.3)
    endpoint = serve(local(), "face-stage", port=0)
    try:
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b"", "the server closes the connection"
            assert time.monotonic() - started < 4
        assert httpx.get(f"http://127.0.0.1:{endpoint.port}/healthz", timeout=5).status_code == 200
    finally:
        endpoint.close()


def test_connections_beyond_the_handler_limit_take_the_oldest_idle_ones_place_instead_of_a_thread_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 30.0)
    monkeypatch.setattr(metrics, "MAX_HANDLERS", 2)
    endpoint = serve(local(), "face-stage", port=0)
    silent: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(2):
            silent.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5))
        wait_until(lambda: threading.active_count() == before + 2)
        for _ in range(5):
            silent.append(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5))
        for sock in silent[:5]:
            assert sock.recv(1) == b"", "the oldest idle ones are closed at once, not held by a thread"
        for sock in silent[5:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # the newest two hold the places
                sock.recv(1)
        wait_until(lambda: threading.active_count() == before + 2)  # the closed ones' threads end
        for sock in silent:
            sock.close()
        wait_until(lambda: threading.active_count() == before)
        assert httpx.get(f"http://127.0.0.1:{endpoint.port}/healthz", timeout=5).status_code == 200
    finally:
        for sock in silent:
            sock.close()
        endpoint.close()


def test_a_scrape_is_answered_while_idle_connections_hold_every_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every place held by a connection that sent nothing, a Prometheus scrape was closed unanswered."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 30.0)
    monkeypatch.setattr(metrics, "MAX_HANDLERS", 2)
    endpoint = serve(local(), "face-stage", port=0)
    before = threading.active_count()
    silent = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(2)]
    try:
        wait_until(lambda: threading.active_count() == before + 2)
        scrape = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5)
        assert scrape.status_code == 200 and b"cg_records_in" in scrape.content
        assert silent[0].recv(1) == b"", "the connection idle the longest made room"
        silent[1].setblocking(False)
        with pytest.raises(BlockingIOError):
            silent[1].recv(1)
    finally:
        for sock in silent:
            sock.close()
        endpoint.close()


def test_a_request_sent_but_not_yet_read_is_not_closed_to_make_room_for_a_newer_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection whose handler thread had not read its request yet (a busy machine) counted as idle, and a newer
    connection closed it: a scrape or health question sent in time went unanswered."""
    monkeypatch.setattr(metrics, "MAX_HANDLERS", 1)
    monkeypatch.setattr(metrics, "EVICT_WAIT_S", 0.1)
    server = metrics._MetricsServer(("127.0.0.1", 0), "face-stage", lambda: (True, "ok"), lambda: (True, "ok"))
    sent, sent_client = socket.socketpair()
    newer, newer_client = socket.socketpair()
    try:
        assert server._slots.acquire(blocking=False), "the one place, held by the connection that sent its request"
        server.idle(sent)
        sent_client.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        server.process_request(newer, ("127.0.0.1", 1))
        sent_client.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, its answer to come
            sent_client.recv(1)
        assert newer_client.recv(1) == b"", "the newer connection is closed instead"
    finally:
        for sock in (sent, sent_client, newer, newer_client):
            sock.close()
        server.server_close()
