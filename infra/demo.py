"""``make run``: the whole pipeline on this machine with live demo traffic.

Brings up the local stack (Kafka, OpenSearch, Mosquitto), starts the PyFlink scoring job, the
OpenSearch sink and the POS generator (real-time event stamps, a share of fraud patterns), then
shows a live view of what lands in OpenSearch until Ctrl-C. Ctrl-C stops the generator, the job and
the sink cleanly; the services keep running (``make down`` stops them) so the data stays to explore.
Supervised (the default): a process that dies is started again with backoff, a bounded number of
times per window, once what it left in its process group (a crashed scoring job's JVM) is stopped; restarts are
logged to ``<stack dir>/logs/supervisor.log`` and shown in the view.
Kafka or OpenSearch going away while the view runs is shown in it ("unreachable at ..., waiting") and the
view carries on when they are back. Every process the demo started (and any its processes left, found by
:data:`infra.processes.MARKER`) is stopped at the end, a second Ctrl-C notwithstanding.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import httpx
import typer
from confluent_kafka import Consumer, KafkaException, TopicPartition
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from infra.clients import kafka as kafka_clients
from infra.clients.opensearch import make_client
from infra.launcher import Child, Supervisor, spawn, start_scoring_job
from infra.processes import MARKER, Reaper
from infra.production import HealthSupervisor
from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack import ensure_topics, up
from schemas.indices import index_name
from schemas.topics import (
    ALERTS,
    CAMERA_EVENTS,
    COMMANDS,
    DEAD_LETTERS,
    FACE_OBSERVATIONS,
    SCORED_TRANSACTIONS,
    TRANSACTIONS,
    WATCHLIST,
)

console = Console()


def topic_sizes(consumer: Consumer, topics: Iterable[str]) -> dict[str, int]:
    """Messages per topic (sum of high watermarks; our topics are never truncated in a demo). One metadata
    request for all: KafkaException when Kafka does not answer it (a caller says so and asks again later)."""
    metadata = consumer.list_topics(timeout=5).topics
    sizes = {}
    for topic in topics:
        total = 0
        for p in metadata[topic].partitions if topic in metadata else ():
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
            except KafkaException:  # no leader for a moment (a new topic, a broker restarting): next time
                continue
            total += high - low
        sizes[topic] = total
    return sizes


class Outages:
    """Which backing service (Kafka, OpenSearch) the view cannot reach, since when: shown instead of a
    traceback while it is away, dropped when it answers again. Each change is logged."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.since: dict[str, tuple[float, str]] = {}
        self.log = logger or logging.getLogger("infra.supervisor")

    def note(self, service: str, address: str, reachable: bool, now: float) -> None:
        if reachable:
            if self.since.pop(service, None) is not None:
                self.log.info("%s at %s answers again", service, address)
        elif service not in self.since:
            self.since[service] = (now, address)
            self.log.warning("%s unreachable at %s, waiting", service, address)

    def lines(self, now: float) -> list[str]:
        return [
            f"{service} unreachable at {address}, waiting ({now - since:.0f} s)"
            for service, (since, address) in self.since.items()
        ]


VIEW_TOPICS = (
    TRANSACTIONS,
    CAMERA_EVENTS,
    FACE_OBSERVATIONS,
    SCORED_TRANSACTIONS,
    ALERTS,
    COMMANDS,
    WATCHLIST,
    DEAD_LETTERS,
)


def _kafka_table(settings: Settings, consumer: Consumer, outages: Outages, now: float) -> Table:
    names = [spec.full_name(settings.kafka.topic_prefix) for spec in VIEW_TOPICS]
    counts = Table(title="Kafka topics", show_edge=False)
    counts.add_column("topic")
    counts.add_column("messages", justify="right")
    try:
        sizes: dict[str, int] | None = topic_sizes(consumer, names)
    except KafkaException:
        sizes = None
    outages.note("Kafka", settings.kafka.bootstrap_servers, sizes is not None, now)
    for name in names:
        counts.add_row(name, "?" if sizes is None else f"{sizes[name]:,}")
    return counts


OUTCOMES_QUERY = {
    "size": 0,
    "aggs": {
        "o": {"terms": {"field": "outcome"}, "aggs": {"a": {"sum": {"field": "amount"}}}},
        "lat": {"percentiles": {"field": "ttdf_ms", "percents": [50, 99]}},
    },
}
ALERTS_QUERY = {"size": 5, "sort": [{"event_time": "desc"}], "_source": ["event_time", "summary"]}


def _opensearch_tables(settings: Settings, client) -> tuple[Table, Table, bool]:
    """Outcomes and the latest alerts; False when OpenSearch did not answer (the tables are then empty)."""
    tx_index = index_name(settings.opensearch.index_prefix, "transactions")
    outcomes = Table(title=f"OpenSearch {tx_index}", show_edge=False)
    outcomes.add_column("outcome")
    outcomes.add_column("documents", justify="right")
    outcomes.add_column("amount", justify="right")
    alerts = Table(title="latest alerts", show_edge=False)
    alerts.add_column("when")
    alerts.add_column("summary")

    def fill_outcomes(res: dict) -> None:
        for b in res["aggregations"]["o"]["buckets"]:
            outcomes.add_row(b["key"], f"{b['doc_count']:,}", f"{b['a']['value']:,.2f}")
        lat = res["aggregations"]["lat"]["values"]
        outcomes.caption = f"event->decision p50 {lat.get('50.0') or 0:.0f} ms, p99 {lat.get('99.0') or 0:.0f} ms"

    def fill_alerts(res: dict) -> None:
        for hit in res["hits"]["hits"]:
            src = hit["_source"]
            alerts.add_row(time.strftime("%H:%M:%S", time.localtime(src["event_time"] / 1000)), src["summary"])

    searches = (
        (fill_outcomes, tx_index, OUTCOMES_QUERY),
        (fill_alerts, index_name(settings.opensearch.index_prefix, "alerts"), ALERTS_QUERY),
    )
    for fill, index, body in searches:
        try:
            fill(client.search(index=index, body=body))
        except OpenSearchConnectionError:  # refused, reset, timed out: OpenSearch is away
            return outcomes, alerts, False
        except Exception:  # no index yet, nothing to aggregate yet: an empty table
            continue
    return outcomes, alerts, True


def snapshot(
    settings: Settings, consumer: Consumer, client, supervisor: Supervisor, outages: Outages | None = None
) -> Group:
    """The view: topic sizes, outcomes and latest alerts from OpenSearch, the processes; a service that does
    not answer is named at the top (``outages``) rather than ending the view."""
    outages = outages or Outages()
    now = time.monotonic()
    counts = _kafka_table(settings, consumer, outages, now)
    outcomes, alerts, opensearch_up = _opensearch_tables(settings, client)
    outages.note("OpenSearch", settings.opensearch.url, opensearch_up, now)
    parts: list[Any] = [
        counts,
        outcomes,
        alerts,
        Panel(supervisor.describe(), title="processes (logs in .stack/logs/)"),
    ]
    if outages.since:
        parts.insert(0, Panel("\n".join(outages.lines(now)), title="waiting", style="bold yellow"))
    return Group(*parts)


SHARED_FACES = REPO_ROOT.parent / "shared" / "data" / "faces"
DEMO_ROOM = "demo-security-room"
DEMO_OFFICER = "officer@store.example"


def demo_settings(settings: Settings) -> Settings:
    """The embedded default: Webex is the local Webex API, the bot listens for its signed webhooks."""
    webex = settings.webex
    if webex.base_url.startswith("https://webexapis.com"):
        webex = webex.model_copy(
            update={
                "base_url": f"http://127.0.0.1:{webex.local_port}/v1",
                "bot_token": webex.bot_token or SecretStr("local-bot-token"),
                "room_id": webex.room_id or DEMO_ROOM,
                "webhook_secret": webex.webhook_secret or SecretStr(secrets.token_hex(16)),
                "public_url": webex.public_url or f"http://{webex.bot_host}:{webex.bot_port}",
                "allowed_people": webex.allowed_people or DEMO_OFFICER,
            }
        )
    if webex.command_signing_key is None:  # the bot signs watchlist commands, the watchlist service checks them
        webex = webex.model_copy(update={"command_signing_key": SecretStr(secrets.token_hex(32))})
    alerts = settings.alerts
    if alerts.image_link_key is None:  # the sender signs the card's image links, the dashboard checks them
        alerts = alerts.model_copy(update={"image_link_key": SecretStr(secrets.token_hex(32))})
    cameras = settings.cameras
    if not cameras.local_photo_dirs and SHARED_FACES.is_dir():
        # A checkout with real test photos beside it: more shoppers than the two people a fresh
        # machine has (the photos of the face_recognition package), so a flagged face is one person.
        dirs = [SHARED_FACES / d for d in ("face_recognition/knn_examples/train", "dlib/johns", "face-api-js")]
        cameras = cameras.model_copy(update={"local_photo_dirs": os.pathsep.join(str(d) for d in dirs if d.is_dir())})
    return settings.model_copy(update={"webex": webex, "alerts": alerts, "cameras": cameras})


def flag_a_blocked_transaction(settings: Settings, client, flagged: set[str]) -> str | None:
    """Play the security officer: ``fraud <tx>`` in the room for the newest blocked, face-seen sale that was
    fraud (the generator's label: what the officer saw on the floor). A blocked legitimate sale is left
    alone: enrolling a regular shopper's face would put everyone who shares it on the watchlist."""
    idx = index_name(settings.opensearch.index_prefix, "transactions")
    with contextlib.suppress(Exception):
        res = client.search(
            index=idx,
            body={
                "size": 5,
                "sort": [{"decided_at": "desc"}],
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"outcome": "BLOCK"}},
                            {"term": {"face_status": "NO_MATCH"}},
                            {"term": {"label": 1}},
                        ]
                    }
                },
                "_source": ["transaction_id"],
            },
        )
        for hit in res["hits"]["hits"]:
            tx = hit["_source"]["transaction_id"]
            if tx not in flagged:
                httpx.post(
                    f"http://127.0.0.1:{settings.webex.local_port}/_local/say",
                    timeout=10,
                    json={"roomId": settings.webex.room_id, "personEmail": DEMO_OFFICER, "text": f"fraud {tx}"},
                ).raise_for_status()  # not said: tried again next time
                flagged.add(tx)
                return tx
    return None


def _start_pipeline(settings: Settings, supervisor: Supervisor, rate: float, fraud_share: float) -> None:
    """Every demo process under the supervisor, each with the function that (re)starts it."""
    token = settings.webex.bot_token.get_secret_value() if settings.webex.bot_token else ""

    def module(name: str, module: str, *args: str) -> None:
        supervisor.add(name, functools.partial(spawn, module, settings, *args, name=name))

    module("local-webex", "infra.local.webex", "--port", str(settings.webex.local_port), "--token", token)
    module("local-camera", "infra.local.camera")
    module("camera-bridge", "producers.camera_bridge")
    module("face-stage", "jobs.faces.stage")
    supervisor.add("scoring-job", functools.partial(start_scoring_job, settings))
    module("opensearch-sink", "sinks.opensearch.sink")
    module("watchlist-service", "jobs.faces.watchlist_service")
    module("case-service", "jobs.cases.service")
    module("alert-sender", "sinks.alerts.sender")
    module("webex-bot", "jobs.bot.webex_bot")
    module("dashboard", "sinks.dashboard")
    time.sleep(3)  # the camera and the bot answer before shoppers arrive

    def shoppers() -> Child:
        # A seed per start: transaction ids are tx-<seed>-<n>, and the job (its state restored from the
        # last run's checkpoint) rightly drops ids it has already decided as duplicates.
        return spawn(
            "producers.shoppers",
            settings,
            "--rate",
            str(rate),
            "--count",
            "100000000",
            "--fraud-share",
            str(fraud_share),
            "--seed",
            str(time.time_ns() // 1_000_000),
            "--no-progress",
            name="shoppers",
        )

    supervisor.add("shoppers", shoppers)


def _supervisor_log(settings: Settings) -> logging.Logger:
    """Restarts are logged to a file: the console belongs to the live view."""
    logger = logging.getLogger("infra.supervisor")
    log_file = settings.stack_dir / "logs" / "supervisor.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _supervision(settings: Settings, supervise: bool, logger: logging.Logger) -> HealthSupervisor:
    """The demo's processes watched as ``checkout-guard supervise`` watches its own, with its ``CG_SUPERVISOR__*``
    settings but no health questions: one that exits is started again with backoff (``supervise``), and what it
    left in its process group (a crashed scoring job's JVM) is stopped first, beside the loop. The demo's plain
    :class:`Supervisor` restarted it at once and stopped what it left only at the end, so a restarted scoring job
    ran beside its predecessor's JVM."""
    cfg = settings.supervisor
    return HealthSupervisor(Supervisor.from_settings(cfg, restart=supervise, logger=logger), cfg, None, logger=logger)


def main(
    rate: Annotated[float, typer.Option(help="Shoppers' transactions per second (each is a face analysis).")] = 1.0,
    fraud_share: Annotated[float, typer.Option(help="Share of fraud patterns in the traffic.")] = 0.1,
    flag_every_s: Annotated[float, typer.Option(help="How often the officer flags a blocked sale.")] = 90.0,
    supervise: Annotated[
        bool,
        typer.Option(
            help="Start a process that dies again (with backoff, at most CG_SUPERVISOR__MAX_RESTARTS times in "
            "CG_SUPERVISOR__WINDOW_S, as checkout-guard supervise)."
        ),
    ] = True,
) -> None:
    """Start everything, drive live traffic and show what arrives, until Ctrl-C."""
    settings = demo_settings(get_settings())
    console.print("[bold]Starting the local stack[/] (Kafka, OpenSearch, Mosquitto, SMTP)…")
    up(settings)
    ensure_topics(settings)
    watch = _supervision(settings, supervise, _supervisor_log(settings))
    supervisor = watch.supervisor
    # Every process of the run carries the marker (a caller's, when it set one): what a child left when it
    # died (an orphaned JVM, a Python worker) is found and stopped at the end instead of running on.
    os.environ.setdefault(MARKER, f"demo-{os.getpid()}-{secrets.token_hex(4)}")
    reaper = Reaper()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        _start_pipeline(settings, supervisor, rate, fraud_share)
        _show(settings, watch, supervise, flag_every_s, lambda: stopping)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
        console.print("Stopping the demo processes…")
        left = _stop(settings, watch, reaper)
        if left:
            console.print(f"Also stopped {len(left)} processes still running after the process that started them:")
            for line in left:
                console.print(f"  {line}", markup=False, highlight=False)
        console.print("Stopped. The services still run: `make status`, `make down`.")


def _stop(settings: Settings, watch: HealthSupervisor, reaper: Reaper) -> list[str]:
    """Every process of the demo, side by side, SIGKILL after ``CG_SUPERVISOR__STOP_TIMEOUT_S`` as under
    ``checkout-guard supervise`` (it waited 20 s whatever the setting), then what they left, with the same timeout
    (it had 10 s whatever the setting); a line for each."""
    # a stop of what a crashed process left, still under way, is waited for: stopped again, its group got SIGTERM twice
    return watch.shutdown(reaper, settings.supervisor.stop_timeout_s)


def _show(
    settings: Settings, watch: HealthSupervisor, supervise: bool, flag_every_s: float, stopping: Callable[[], bool]
) -> None:
    """The live view until ``stopping()``; Kafka or OpenSearch away is shown in it, and it goes on."""
    supervisor = watch.supervisor
    idx = settings.opensearch.index_prefix
    dash = settings.dashboard
    console.print(
        f"Live dashboard:      [cyan]http://{dash.host}:{dash.port}/[/]\n"
        f"E-mails to security: [cyan]{settings.stack_dir / 'mail'}[/] (one .eml per alert)\n"
        f"Webex room:          [cyan]http://127.0.0.1:{settings.webex.local_port}/_local/messages[/]\n"
        f"Scored transactions: [cyan]{settings.opensearch.url}/{index_name(idx, 'transactions')}/_search[/]\n"
        f"Kafka:               {settings.kafka.bootstrap_servers} (kcat -b {settings.kafka.bootstrap_servers} -L)\n"
        "The job needs ~30 s to start. Ctrl-C stops the demo; `make down` stops the services.\n"
        + (
            f"Supervised: processes that die are restarted ({settings.stack_dir / 'logs' / 'supervisor.log'})."
            if supervise
            else "Not supervised: a process that dies stays down."
        )
    )
    # The view's client logs to the supervisor's file (the console belongs to the live view), and is polled
    # after each refresh: a consumer hands librdkafka's lines over only on poll.
    kafka_log = kafka_clients.librdkafka_logger("infra.supervisor.kafka")
    consumer = kafka_clients.consumer(settings, "checkout-guard-demo-view", logger=kafka_log)
    client = make_client(settings.opensearch, timeout_s=5)
    outages = Outages(supervisor.log)
    flagged: set[str] = set()
    next_flag = time.monotonic() + flag_every_s
    try:
        with Live(console=console, refresh_per_second=1) as live:
            while not stopping():
                if time.monotonic() >= next_flag:
                    next_flag = time.monotonic() + flag_every_s
                    flag_a_blocked_transaction(settings, client, flagged)
                watch.check()
                live.update(snapshot(settings, consumer, client, supervisor, outages))
                consumer.poll(0)
                time.sleep(2)
    finally:
        consumer.close()


if __name__ == "__main__":
    typer.run(main)
