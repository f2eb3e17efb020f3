"""``make run``: the whole pipeline on this machine with live demo traffic.

Brings up the local stack (Kafka, OpenSearch, Mosquitto), starts the PyFlink scoring job, the
OpenSearch sink and the POS generator (real-time event stamps, a share of fraud patterns), then
shows a live view of what lands in OpenSearch until Ctrl-C. Ctrl-C stops the generator, the job and
the sink cleanly; the services keep running (``make down`` stops them) so the data stays to explore.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Annotated

import typer
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from infra.settings import Settings, get_settings
from infra.stack import up
from jobs.launcher import Child, spawn, start_scoring_job
from schemas.topics import ALERTS, DEAD_LETTERS, SCORED_TRANSACTIONS, TRANSACTIONS
from sinks.opensearch_sink import index_name, make_client

console = Console()


def topic_size(consumer: Consumer, topic: str) -> int:
    """Messages in a topic (sum of high watermarks; our topics are never truncated in a demo)."""
    md = consumer.list_topics(topic, timeout=5).topics.get(topic)
    if md is None:
        return 0
    total = 0
    for p in md.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
        total += high - low
    return total


def snapshot(settings: Settings, consumer: Consumer, client, children: list[Child]) -> Group:
    prefix, idx = settings.kafka.topic_prefix, settings.opensearch.index_prefix
    tx_index = index_name(idx, "transactions")
    counts = Table(title="Kafka topics", show_edge=False)
    counts.add_column("topic")
    counts.add_column("messages", justify="right")
    for spec in (TRANSACTIONS, SCORED_TRANSACTIONS, ALERTS, DEAD_LETTERS):
        counts.add_row(spec.full_name(prefix), f"{topic_size(consumer, spec.full_name(prefix)):,}")
    outcomes = Table(title=f"OpenSearch {tx_index}", show_edge=False)
    outcomes.add_column("outcome")
    outcomes.add_column("documents", justify="right")
    outcomes.add_column("amount", justify="right")
    with contextlib.suppress(Exception):
        res = client.search(index=tx_index, body={
            "size": 0, "aggs": {"o": {"terms": {"field": "outcome"}, "aggs": {"a": {"sum": {"field": "amount"}}}},
                                "lat": {"percentiles": {"field": "ttdf_ms", "percents": [50, 99]}}},
        })
        for b in res["aggregations"]["o"]["buckets"]:
            outcomes.add_row(b["key"], f"{b['doc_count']:,}", f"{b['a']['value']:,.2f}")
        lat = res["aggregations"]["lat"]["values"]
        outcomes.caption = f"event->decision p50 {lat.get('50.0') or 0:.0f} ms, p99 {lat.get('99.0') or 0:.0f} ms"
    alerts = Table(title="latest alerts", show_edge=False)
    alerts.add_column("when")
    alerts.add_column("summary")
    with contextlib.suppress(Exception):
        res = client.search(index=index_name(idx, "alerts"), body={
            "size": 5, "sort": [{"event_time": "desc"}], "_source": ["event_time", "summary"]})
        for hit in res["hits"]["hits"]:
            src = hit["_source"]
            alerts.add_row(time.strftime("%H:%M:%S", time.localtime(src["event_time"] / 1000)), src["summary"])
    procs = ", ".join(f"{c.name} {'running' if c.alive else f'EXITED {c.proc.returncode}'}" for c in children)
    return Group(counts, outcomes, alerts, Panel(procs, title="processes (logs in .stack/logs/)"))


def main(
    rate: Annotated[float, typer.Option(help="Demo transactions per second.")] = 20.0,
    fraud_share: Annotated[float, typer.Option(help="Share of fraud patterns in the traffic.")] = 0.05,
) -> None:
    """Start everything, drive live traffic and show what arrives, until Ctrl-C."""
    settings = get_settings()
    console.print("[bold]Starting the local stack[/] (Kafka, OpenSearch, Mosquitto)…")
    up(settings)
    children = [
        start_scoring_job(settings),
        spawn("sinks.opensearch_sink", settings, name="opensearch-sink"),
        spawn("producers.pos", settings, "generate", "--rate", str(rate), "--fraud-share", str(fraud_share),
              "--realtime", "--no-progress", name="pos-generator"),
    ]
    idx = settings.opensearch.index_prefix
    console.print(
        f"Scored transactions: [cyan]{settings.opensearch.url}/{index_name(idx, 'transactions')}/_search[/]\n"
        f"Alerts:              [cyan]{settings.opensearch.url}/{index_name(idx, 'alerts')}/_search[/]\n"
        f"Kafka:               {settings.kafka.bootstrap_servers} (kcat -b {settings.kafka.bootstrap_servers} -L)\n"
        "The job needs ~15 s to start. Ctrl-C stops the demo; `make down` stops the services."
    )
    consumer = Consumer({**settings.kafka.client_config(), "group.id": "checkout-guard-demo-view"})
    client = make_client(settings.opensearch)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        with Live(console=console, refresh_per_second=1) as live:
            while not stopping:
                live.update(snapshot(settings, consumer, client, children))
                time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("Stopping the generator, the job and the sink…")
        for child in children[::-1]:
            child.stop()
        consumer.close()
        console.print("Stopped. The services still run: `make status`, `make down`.")


if __name__ == "__main__":
    typer.run(main)
