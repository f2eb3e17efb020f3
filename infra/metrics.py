"""Prometheus metrics and health endpoints of every long-running process, defined once.

Each process calls :func:`serve` once at start with its name from :data:`PROCESSES`: it then answers
``GET /metrics`` (the Prometheus text format, prometheus-client's default registry), ``GET /healthz``
(liveness: 200 while its loop makes progress, 503 when it hangs -- restarting it helps) and ``GET /readyz``
(readiness: 503 also while a dependency it needs is unreachable -- restarting it would not help, so a
supervisor acts on ``/healthz`` only; the reason is in both bodies; a request must come within
:data:`REQUEST_TIMEOUT_S`, and at most :data:`MAX_HANDLERS` connections are handled at once, an idle one making room
for a newer one) on ``CG_BIND_HOST`` and
``CG_METRICS__BASE_PORT`` + the process's offset. The scoring job's offset is taken by Flink's own
Prometheus reporter (its metrics are named ``flink_*``; the job's own figures ``flink_..._checkout_guard_*``,
see :mod:`jobs.flink.job_metrics`), subclassed to bind ``CG_BIND_HOST`` only (Flink's binds every interface;
``jobs/flink/java-plugins``). The local Prometheus scrapes exactly these
ports (:func:`scrape_targets`), so adding a process here is all it takes to have it scraped.

The metric objects below are the only ones: a stage counts in batches (``inc(n)``), never per record
in a hot loop, so the cost stays below the noise (``make bench`` measures metrics on against off).
Labels are bounded sets (stage, kind, reason kind, channel, result): never a transaction id, a face,
an e-mail address or a secret.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.addresses import url_host
from infra.settings import Settings
from schemas.topics import ALL_TOPICS

log = logging.getLogger(__name__)

PROCESSES: dict[str, int] = {
    "scoring-job": 0,
    "face-stage": 1,
    "camera-bridge": 2,
    "opensearch-sink": 3,
    "alert-sender": 4,
    "watchlist-service": 5,
    "webex-bot": 6,
    "dashboard": 7,
    "case-service": 8,
}
"""Every long-running process and its port offset from ``CG_METRICS__BASE_PORT``."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Up to 2 minutes: a face-stage trigger with the real Dashboard takes up to ``CG_CAMERAS__DEADLINE_S`` (30 s) for its
snapshot and then its analysis; with 30 s the top bucket, those fell in ``+Inf`` and a p99 showed 30 s at most."""

WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0)
"""From 50 ms (a Kafka transaction's round trip) to an hour: a case verdict may wait up to
``CG_WEBEX__COMMAND_MAX_AGE_S`` (900 s) for its alert, and a service back from an outage decides inputs older still."""

RECORDS_IN = Counter("cg_records_in", "Records a stage consumed, by kind.", ["stage", "kind"])
RECORDS_OUT = Counter("cg_records_out", "Records a stage produced or wrote, by kind.", ["stage", "kind"])
DEAD_LETTERS = Counter("cg_dead_letters", "Records a stage dead-lettered, by reason kind.", ["stage", "reason"])
PROCESSING_SECONDS = Histogram(
    "cg_processing_seconds",
    "Time a stage spent on one unit of work (a record, a frame or a batch: see the stage's docs).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
INPUT_WAIT_SECONDS = Histogram(
    "cg_input_wait_seconds",
    "Time from an input's record time on Kafka to its outcome committed (what a person waits), by stage and kind.",
    ["stage", "kind"],
    buckets=WAIT_BUCKETS,
)
SKIPPED = Counter(
    "cg_skipped", "Work a stage skipped because it came too late to be of use, by why.", ["stage", "reason"]
)
DELIVERIES = Counter("cg_channel_deliveries", "Alert deliveries by channel and result.", ["channel", "result"])
FACE_ANALYSIS_SECONDS = Histogram(
    "cg_face_analysis_seconds",
    "Time to analyse one frame (decode, detect, describe, match).",
    ["stage"],  # like every stage metric: a query by stage (the README's promise) found none of its series
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge("cg_queue_depth", "Items waiting in a stage's in-process queue.", ["stage", "queue"])
CONSUMER_LAG = "cg_consumer_lag"
"""Name of the per-partition consumer-group lag (:class:`ConsumerLagCollector`)."""


def port_of(settings: Settings, process: str) -> int:
    """Where ``process`` serves its metrics (KeyError for a name not in :data:`PROCESSES`)."""
    return settings.metrics.base_port + PROCESSES[process]


def scrape_targets(settings: Settings) -> dict[str, str]:
    """``process -> host:port`` for the local Prometheus's scrape configuration and the supervisor's probes (a
    wildcard bind host asked at 127.0.0.1, an IPv6 address in brackets: ``[::1]:9461``)."""
    host = url_host(settings.bind_host)
    return {name: f"{host}:{port_of(settings, name)}" for name in PROCESSES}


HealthCheck = Callable[[], tuple[bool, str]]
"""Says whether the process does its work: (ok, a short reason). Must be quick and never raise."""


def _alive() -> tuple[bool, str]:
    return True, "ok"


class Heartbeat:
    """A health check for a loop: alive while :meth:`beat` was called within ``stale_s``. A loop that
    hangs (a stuck call, a dead thread) turns ``/healthz`` to 503, which a supervisor or an orchestrator
    acts on. ``problem`` (what the loop last reported, e.g. "Kafka unreachable") turns only ``/readyz``
    to 503 (:meth:`ready`): the process is alive and waiting for its dependency. A loop that turns without getting
    anything done says so with :meth:`stall` instead of beating."""

    def __init__(self, stale_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s, self.clock = stale_s, clock
        self.last = clock()
        self.problem: str | None = None
        self.stalled: str | None = None

    def beat(self, problem: str | None = None) -> None:
        self.last, self.problem, self.stalled = self.clock(), problem, None

    def stall(self, reason: str) -> None:
        """The loop turns but its work does not move (e.g. every worker stuck): ``/healthz`` is 503 with ``reason``
        until the next :meth:`beat`, as for a hung loop."""
        self.stalled = reason

    def __call__(self) -> tuple[bool, str]:
        """Liveness: stale or stalled or not; a reported problem shows in the reason (``degraded: ...``) only."""
        age = self.clock() - self.last
        if age > self.stale_s:
            return False, f"no progress for {age:.0f} s"
        if self.stalled:
            return False, self.stalled
        if self.problem:
            return True, f"degraded: {self.problem}"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Readiness: alive and no problem reported."""
        alive, reason = self()
        if not alive:
            return alive, reason
        if self.problem:
            return False, self.problem
        return True, "ok"


REQUEST_TIMEOUT_S = 5.0
"""How long a connection to the endpoint may take to send its request (and to read the answer): one that sends
nothing kept its handler thread for ever, and many such connections piled up threads."""
MAX_HANDLERS = 32
"""Connections handled at once, so connections that hang cannot take more than this many threads (each for
``REQUEST_TIMEOUT_S`` at most). One beyond takes the place of the connection that has waited longest without sending
its request (:meth:`_MetricsServer.process_request`); with every one of them answering a request, it is closed at once
(a scrape or probe asks again at its next turn)."""
EVICT_WAIT_S = 1.0
"""How long a connection beyond :data:`MAX_HANDLERS` waits for the place of the idle connection closed for it."""

PID_HEADER = "X-Process-Id"
"""Every answer names the process that gave it: the supervisor tells its child's endpoint from another
process's on the same port (a second copy started first), which would otherwise read as its child's health."""


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # a silent client is dropped, its thread ends
        self.server.idle(self.connection)

    def parse_request(self) -> bool:
        """Its request line came: no longer idle, so it is not closed for a newer connection."""
        self.server.busy(self.connection)
        return super().parse_request()

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            check = self.server.health if path == "/healthz" else self.server.ready
            try:
                ok, reason = check()
            except Exception as exc:  # a health check that raises says "unhealthy", it does not kill the server
                ok, reason = False, f"health check failed: {type(exc).__name__}"
            self._reply(200 if ok else 503, f"{self.server.process} {'ok' if ok else 'unhealthy'}: {reason}\n".encode())
        else:
            self._reply(404, b"not found: /metrics, /healthz or /readyz\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(PID_HEADER, str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes every few seconds: not logged
        return


def _request_waiting(connection: Any) -> bool:
    """Whether the client has sent bytes its handler has not read yet (not when it closed its end: nothing to lose)."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        if not poller.poll(0):
            return False
        return connection.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):  # closed meanwhile
        return False


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], process: str, health: HealthCheck, ready: HealthCheck) -> None:
        self.process, self.health, self.ready = process, health, ready
        self.request_timeout = REQUEST_TIMEOUT_S
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        self._idle: dict[Any, None] = {}
        """Handled connections that have not sent their request line yet, the oldest first."""
        self._idle_lock = threading.Lock()
        # an IPv6 bind host needs an IPv6 socket: the IPv4 one refused it and the process ran without an endpoint
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def idle(self, connection: Any) -> None:
        with self._idle_lock:
            self._idle[connection] = None

    def busy(self, connection: Any) -> None:
        with self._idle_lock:
            self._idle.pop(connection, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection while fewer than :data:`MAX_HANDLERS` run. Beyond, the connection that has waited
        longest without sending its request is closed to make room: closing the newest instead refused every
        Prometheus scrape while idle connections held all the places. With none idle, the connection is closed."""
        if not self._slots.acquire(blocking=False) and not self._evict_idle():
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self._slots.release()
            raise

    def _evict_idle(self) -> bool:
        """Close the oldest idle connection (its handler then ends at once) and take its place; False when there is
        none, or its place is not free within :data:`EVICT_WAIT_S`. One whose request has come but is not read yet (its
        handler thread not yet run, on a busy machine) is not idle: closing it dropped a scrape or health question
        that had been sent in time. Chosen and closed under the lock :meth:`busy` takes, so a handler that has just
        read its request line is not closed between the two."""
        with self._idle_lock:
            oldest = next((c for c in self._idle if not _request_waiting(c)), None)
            if oldest is None:
                return False
            del self._idle[oldest]
            with contextlib.suppress(OSError):  # closed meanwhile: its place is freed all the same
                oldest.shutdown(socket.SHUT_RDWR)
        return self._slots.acquire(timeout=EVICT_WAIT_S)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.busy(request)
            self._slots.release()

    def server_bind(self) -> None:
        """``::`` also takes IPv4 connections, so that 127.0.0.1 (where a wildcard's endpoint is asked) reaches it."""
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            with contextlib.suppress(OSError, AttributeError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


@dataclass
class Endpoint:
    """A running metrics/health server; :meth:`close` stops it (tests, clean shutdown)."""

    process: str
    port: int
    server: _MetricsServer | None

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def serve(
    settings: Settings,
    process: str,
    health: HealthCheck | None = None,
    port: int | None = None,
    ready: HealthCheck | None = None,
) -> Endpoint:
    """Start ``process``'s ``/metrics``, ``/healthz`` (``health``) and ``/readyz`` server in a daemon thread.
    ``ready`` defaults to a :class:`Heartbeat`'s :meth:`~Heartbeat.ready`, else to ``health``.

    Off (``CG_METRICS__ENABLED=false``) the process runs without an endpoint; with the port taken (a second
    copy of the process, a test beside a running demo) too, and a warning says so. ``port`` 0 picks a free
    port (tests)."""
    wanted = port_of(settings, process) if port is None else port
    if not settings.metrics.enabled:
        return Endpoint(process, wanted, None)
    try:
        live = health or _alive
        readiness = ready or (live.ready if isinstance(live, Heartbeat) else live)
        server = _MetricsServer((settings.bind_host, wanted), process, live, readiness)
    except (OSError, OverflowError) as exc:  # taken, or (a port given in a test) out of range
        log.warning(
            "metrics: %s cannot serve on %s:%d (%s); running without an endpoint",
            process,
            settings.bind_host,
            wanted,
            exc,
        )
        return Endpoint(process, wanted, None)
    threading.Thread(target=server.serve_forever, name=f"metrics-{process}", daemon=True).start()
    log.info("metrics: %s serves /metrics and /healthz on %s:%d", process, settings.bind_host, server.server_port)
    return Endpoint(process, server.server_port, server)


class timed:  # noqa: N801 - used like a function: ``with timed(PROCESSING_SECONDS.labels("sink")):``
    """Observe the wall time of a block on a histogram (or histogram child)."""

    __slots__ = ("hist", "start")

    def __init__(self, hist: Any) -> None:
        self.hist = hist

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.hist.observe(time.perf_counter() - self.start)


# --- consumer-group lag ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    lag: int


def group_lags(
    committed: dict[str, dict[tuple[str, int], int]], ends: dict[tuple[str, int], int]
) -> list[PartitionLag]:
    """Lag per group and partition: end offset minus committed offset (never below 0). A partition with
    no committed offset yet (negative) counts from the start, i.e. its whole end offset."""
    out = []
    for group, offsets in sorted(committed.items()):
        for (topic, partition), offset in sorted(offsets.items()):
            end = ends.get((topic, partition))
            if end is None:
                continue
            out.append(PartitionLag(group, topic, partition, max(0, end - max(offset, 0))))
    return out


LAG_READ_OK = "cg_consumer_lag_read_ok"
"""1 when the last read of the consumer lag from Kafka succeeded, 0 when it failed (or none has yet): the
alert for "Kafka does not answer the lag reader", which a missing target used to stand for."""
LAG_AGE = "cg_consumer_lag_age_seconds"
"""Seconds since the figures of ``cg_consumer_lag`` were read (absent before the first good read)."""
LAG_KEPT_READS = 12
"""Through an outage the last good figures are served for this many read intervals (a minute at the default
5 s), then left out: a lag alert keeps firing through a blip, and hours-old figures are not passed off as lag."""


class ConsumerLagCollector(Collector):
    """``cg_consumer_lag{group,topic,partition}`` for every consumer group that has committed offsets on
    this deployment's topics (those with ``CG_KAFKA__TOPIC_PREFIX``): the Python consumers and the Flink
    job (which commits on each checkpoint) alike, with ``cg_consumer_lag_read_ok`` and
    ``cg_consumer_lag_age_seconds``.

    Kafka is read by a daemon thread (:meth:`start`, :meth:`stop`) every ``lag_interval_s``, never by a scrape:
    a Kafka that does not answer took each scrape to the scrape timeout (5 s), and Prometheus then dropped the
    whole process's metrics as a target that is down. A scrape serves the last good figures, for at most
    :data:`LAG_KEPT_READS` intervals."""

    def __init__(
        self,
        settings: Settings,
        read: Callable[[], list[PartitionLag]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.clock = settings, clock
        self.read = read or (lambda: read_lags(settings))
        self.interval = settings.metrics.lag_interval_s
        self._cache: list[PartitionLag] = []
        self._good_at: float | None = None
        self._ok = False
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """One read from Kafka into the cache (the thread's step); whether it succeeded."""
        try:
            lags = self.read()
        except Exception as exc:  # Kafka away: the cache stays, the failure is exported
            # Once per outage, not at every read (a timeout's text is empty: its type is named).
            log.log(
                logging.DEBUG if self._failing else logging.WARNING,
                "consumer lag unavailable: %s",
                str(exc) or type(exc).__name__,
            )
            self._failing = True
            with self._lock:
                self._ok = False
            return False
        if self._failing:
            log.info("consumer lag available again")
        self._failing = False
        with self._lock:
            self._cache, self._good_at, self._ok = lags, self.clock(), True
        return True

    def start(self) -> ConsumerLagCollector:
        """Read now and then every ``lag_interval_s`` in a daemon thread, until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="consumer-lag", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after its current read (which its own timeouts bound)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)

    def lags(self) -> list[PartitionLag]:
        """The last good figures while they are fresh enough to serve; never reads Kafka."""
        with self._lock:
            if self._good_at is None or self.clock() - self._good_at > LAG_KEPT_READS * self.interval:
                return []
            return list(self._cache)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            CONSUMER_LAG,
            "Records a consumer group has not yet committed, per partition (the last good read).",
            labels=["group", "topic", "partition"],
        )
        for item in self.lags():
            family.add_metric([item.group, item.topic, str(item.partition)], item.lag)
        yield family
        with self._lock:
            ok, good_at = self._ok, self._good_at
        yield GaugeMetricFamily(LAG_READ_OK, "1 if the last read of the consumer lag from Kafka succeeded.", ok)
        if good_at is not None:
            yield GaugeMetricFamily(LAG_AGE, "Seconds since the consumer lag was last read.", self.clock() - good_at)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def read_lags(settings: Settings, timeout: float = 5.0) -> list[PartitionLag]:
    """Committed offsets of every group (on topics with our prefix) against the partitions' end offsets.

    Every group's offsets are asked for at once and the whole read ends within about ``timeout`` per step
    (groups, offsets, end offsets), whatever the number of groups: one round trip each, in turn, made a big
    deployment's read slow."""
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    from infra.clients import kafka as kafka_clients

    ours = {spec.full_name(settings.kafka.topic_prefix) for spec in ALL_TOPICS}
    committed: dict[str, dict[tuple[str, int], int]] = {}
    ends: dict[tuple[str, int], int] = {}
    with kafka_clients.admin_session(settings) as admin:
        groups = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
        if groups.errors and not groups.valid:
            # librdkafka's own request timeout can end the listing first: a result of errors alone, not an
            # exception, and an unreachable Kafka read as one without consumer groups (no lag at all)
            raise KafkaException(groups.errors[0])
        if groups.errors:
            log.warning(
                "consumer groups listed in part (%d broker error(s)): lags of the rest only", len(groups.errors)
            )
        pending_groups = {
            listing.group_id: admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(listing.group_id)], request_timeout=timeout
            )[listing.group_id]
            for listing in groups.valid
        }
        deadline = time.monotonic() + timeout
        for group_id, future in pending_groups.items():
            result = future.result(max(0.0, deadline - time.monotonic()))
            offsets = {
                (tp.topic, tp.partition): tp.offset
                for tp in result.topic_partitions or []
                if tp.topic in ours and tp.error is None
            }
            if offsets:
                committed[group_id] = offsets
        wanted = sorted({tp for offsets in committed.values() for tp in offsets})
        if wanted:
            latest = admin.list_offsets(
                {TopicPartition(t, p): OffsetSpec.latest() for t, p in wanted}, request_timeout=timeout
            )
            deadline = time.monotonic() + timeout
            for tp, pending in latest.items():
                with contextlib.suppress(KafkaException):  # a partition without a leader this moment: next time
                    ends[(tp.topic, tp.partition)] = pending.result(max(0.0, deadline - time.monotonic())).offset
    return group_lags(committed, ends)
