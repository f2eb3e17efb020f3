"""The OpenSearch sink against the real local Kafka and OpenSearch.

Each test gets its own topic prefix (``t<hex>.``), index prefix and consumer group, and removes them
afterwards, so it can share the stack with other work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opensearchpy import OpenSearch

from infra.clients.opensearch import make_client
from infra.retry import Backoff
from infra.settings import REPO_ROOT, Settings, get_settings
from schemas.indices import TEMPLATE_DIR, indexed_customer_key
from schemas.records import Alert, DeadLetter, FaceObservation, Label, ModelDrift, Record, ScoredTransaction, make_label
from schemas.topics import ALERTS, DEAD_LETTERS, FACE_OBSERVATIONS, LABELS, MODEL_DRIFT, SCORED_TRANSACTIONS, TopicSpec
from sinks.opensearch.sink import (
    IndexPeriodConflict,
    OpenSearchSink,
    apply_retention,
    bulk_once,
    install_templates,
    to_actions,
)

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stack and isolation


@pytest.fixture(scope="module")
def base_settings() -> Settings:
    """The stack's settings; skips the module when Kafka or OpenSearch cannot be reached."""
    settings = get_settings()
    try:
        AdminClient(settings.kafka.client_config()).list_topics(timeout=5)
    except Exception as exc:
        pytest.skip(
            f"Kafka at {settings.kafka.bootstrap_servers} not reachable ({exc}); "
            "start the stack with `python -m infra.stack up`"
        )
    try:
        make_client(settings.opensearch, timeout_s=5).info()
    except Exception as exc:
        pytest.skip(
            f"OpenSearch at {settings.opensearch.url} not reachable ({type(exc).__name__}); "
            "start the stack with `python -m infra.stack up`"
        )
    return settings


@dataclass
class Sandbox:
    """One test's private topics, indices and consumer group on the shared stack."""

    settings: Settings
    index_prefix: str
    group_id: str
    opensearch: OpenSearch

    @property
    def topic_prefix(self) -> str:
        return self.settings.kafka.topic_prefix

    def topic(self, spec: object) -> str:
        return spec.full_name(self.topic_prefix)  # type: ignore[attr-defined]

    def count(self, kind: str) -> int:
        index = f"{self.index_prefix}-{kind}"
        self.opensearch.indices.refresh(index=index)
        return self.opensearch.count(index=index)["count"]

    def sink(self, settings: Settings | None = None) -> OpenSearchSink:
        """A sink on this sandbox with a short backoff, so outage tests take seconds."""
        return OpenSearchSink(
            settings or self.settings,
            index_prefix=self.index_prefix,
            group_id=self.group_id,
            backoff=Backoff(initial_s=0.05, maximum_s=0.5),
            summary_interval_s=5.0,
        )


@pytest.fixture
def sandbox(base_settings: Settings) -> Iterator[Sandbox]:
    tag = uuid.uuid4().hex[:10]
    topic_prefix = f"t{tag}."
    settings = base_settings.model_copy(
        update={"kafka": base_settings.kafka.model_copy(update={"topic_prefix": topic_prefix})}
    )
    admin = AdminClient(settings.kafka.client_config())
    specs = (SCORED_TRANSACTIONS, ALERTS, FACE_OBSERVATIONS, DEAD_LETTERS, LABELS, MODEL_DRIFT)
    topics = [spec.full_name(topic_prefix) for spec in specs]
    new = [
        NewTopic(spec.full_name(topic_prefix), num_partitions=spec.partitions, replication_factor=1) for spec in specs
    ]
    for future in admin.create_topics(new).values():
        future.result(timeout=30)
    box = Sandbox(
        settings,
        index_prefix=f"t{tag}-cg",
        group_id=f"t{tag}-opensearch-sink",
        opensearch=make_client(base_settings.opensearch),
    )
    try:
        yield box
    finally:
        cleanup: list[Callable[[], object]] = []
        for kind in ("transactions", "alerts", "face_observations", "labels", "model_drift"):
            name = f"{box.index_prefix}-{kind}"
            cleanup.append(lambda n=name: box.opensearch.indices.delete(index=f"{n}-*,{n}", ignore_unavailable=True))
            cleanup.append(lambda n=name: box.opensearch.indices.delete_index_template(name=n))
        cleanup.append(lambda: admin.delete_consumer_groups([box.group_id])[box.group_id].result(timeout=30))
        cleanup += [lambda f=f: f.result(timeout=30) for f in admin.delete_topics(topics).values()]
        for step in cleanup:  # each step on its own, so one failure does not leave the rest behind
            with contextlib.suppress(Exception):
                step()


# --------------------------------------------------------------------------- helpers


def produce(box: Sandbox, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({**box.settings.kafka.client_config(), "enable.idempotence": True, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def encoded(records: list[Record], key_field: str) -> list[tuple[bytes, bytes]]:
    return [(getattr(r, key_field).encode(), r.encode()) for r in records]


def scored(n: int, start: int = 0) -> list[ScoredTransaction]:
    return [
        ScoredTransaction(
            transaction_id=f"tx-{i:06d}",
            event_time=1_700_000_000_000 + i,
            store_id=f"S{i % 4}",
            lane_id=f"L{i % 7}",
            kind="SALE",
            amount=10.0 + i,
            currency="USD",
            item_count=1 + i % 3,
            customer_key=f"card:{i % 50}",
            outcome=("APPROVE", "REVIEW", "BLOCK")[i % 3],
            risk_score=i % 100,
            reasons=("velocity",) if i % 2 else (),
            rules_version="builtin-v1",
            ingest_time=1_700_000_000_010 + i,
            decided_at=1_700_000_000_030 + i,
            proc_time_ms=12,
            model_time_ms=4,
            ttdf_ms=30,
            indicators={"velocity": float(i % 5), "amount_zscore": 0.5},
            billing_state="CA",
            billing_country="US",
        )
        for i in range(start, start + n)
    ]


def alerts(n: int) -> list[Alert]:
    return [
        Alert(
            alert_id=f"alert-{i:05d}",
            kind="BLOCKED_TRANSACTION",
            severity="high",
            event_time=1_700_000_000_000 + i,
            store_id=f"S{i % 4}",
            summary=f"transaction tx-{i:06d} blocked",
            transaction_id=f"tx-{i:06d}",
            amount=99.5,
            currency="USD",
            outcome="BLOCK",
            risk_score=95,
            reasons=("velocity",),
        )
        for i in range(n)
    ]


def _committed(probe: Consumer, partitions: list[TopicPartition], attempts: int = 10) -> list[TopicPartition]:
    """``committed()``, retried while a freshly started broker is still electing its coordinator."""
    for attempt in range(attempts):
        try:
            return probe.committed(partitions, timeout=10)
        except KafkaException as exc:
            if attempt == attempts - 1 or not exc.args[0].retriable():
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def committed_and_end(
    box: Sandbox, specs: tuple[TopicSpec, ...] = (SCORED_TRANSACTIONS, ALERTS)
) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """The group's committed offsets and the end offsets of the sink's input partitions."""
    probe = Consumer({**box.settings.kafka.client_config(), "group.id": box.group_id, "enable.auto.commit": False})
    try:
        partitions = [TopicPartition(box.topic(spec), p) for spec in specs for p in range(spec.partitions)]
        committed = {(tp.topic, tp.partition): tp.offset for tp in _committed(probe, partitions)}
        end = {(tp.topic, tp.partition): probe.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        return committed, end
    finally:
        probe.close()


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting until {what}")
        time.sleep(0.2)


def caught_up(box: Sandbox, specs: tuple[TopicSpec, ...] = (SCORED_TRANSACTIONS, ALERTS)) -> bool:
    committed, end = committed_and_end(box, specs)
    return all(committed[tp] == end[tp] or (end[tp] == 0 and committed[tp] < 0) for tp in end)


@contextlib.contextmanager
def running(sink: OpenSearchSink) -> Iterator[OpenSearchSink]:
    """Run the sink in a thread; stop it and surface its exception, if any, on exit."""
    stop, failure = threading.Event(), []

    def target() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # surfaced in the test thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="opensearch-sink", daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "sink did not stop within 30s"
    if failure:
        raise failure[0]


def dead_letters(box: Sandbox, expected: int) -> list[DeadLetter]:
    consumer = Consumer(
        {
            **box.settings.kafka.client_config(),
            "group.id": f"{box.group_id}-dlq-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([box.topic(DEAD_LETTERS)])
    found: list[DeadLetter] = []
    deadline = time.monotonic() + 30
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                if msg.error() is None:
                    found.append(DeadLetter.decode(msg.value()))
    finally:
        consumer.close()
        with contextlib.suppress(Exception):
            admin = AdminClient(box.settings.kafka.client_config())
            admin.delete_consumer_groups([f"{box.group_id}-dlq-reader"])[f"{box.group_id}-dlq-reader"].result(10)
    return found


class SwitchableProxy(socketserver.ThreadingTCPServer):
    """A TCP proxy to OpenSearch whose link can be cut: while cut it drops open connections and
    closes new ones at once, which the client sees as OpenSearch being unreachable."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target_url: str) -> None:
        target = urlparse(target_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 9200)
        self.scheme = target.scheme
        self.link_up = threading.Event()
        self.link_up.set()
        self.accepted_while_cut = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def cut(self) -> None:
        self.link_up.clear()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.link_up.set()

    def track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.update(socks)

    def untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(socks)


class _ProxyHandler(socketserver.BaseRequestHandler):
    server: SwitchableProxy

    def handle(self) -> None:
        client = self.request
        if not self.server.link_up.is_set():
            self.server.accepted_while_cut += 1
            return  # closed on return: the client gets a dropped connection
        upstream = socket.create_connection(self.server.target, timeout=10)
        self.server.track(client, upstream)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, client)
                while self.server.link_up.is_set():
                    for key, _ in sel.select(timeout=0.1):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)
        except OSError:
            return
        finally:
            self.server.untrack(client, upstream)
            upstream.close()


@pytest.fixture
def proxy(base_settings: Settings) -> Iterator[SwitchableProxy]:
    server = SwitchableProxy(base_settings.opensearch.url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- tests


def test_every_record_becomes_exactly_one_document_even_when_replayed(sandbox: Sandbox) -> None:
    transactions, alert_records = scored(400), alerts(60)
    produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(transactions, "transaction_id"))
    produce(sandbox, sandbox.topic(ALERTS), encoded(alert_records, "alert_id"))

    with running(sandbox.sink()) as sink:
        started = time.monotonic()
        wait_until(lambda: caught_up(sandbox), "the sink committed every offset")
        log.info("indexed %d docs in %.2fs", sink.stats.indexed, time.monotonic() - started)
        assert sandbox.count("transactions") == 400
        assert sandbox.count("alerts") == 60

        produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(transactions, "transaction_id"))
        wait_until(lambda: caught_up(sandbox), "the sink committed the replayed offsets")
        assert sandbox.count("transactions") == 400
        assert sandbox.count("alerts") == 60
    assert sink.stats.indexed == 400 + 60 + 400
    assert sink.stats.dead_lettered == 0


def test_documents_are_searchable_by_their_mapped_types(sandbox: Sandbox) -> None:
    produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(scored(30), "transaction_id"))
    with running(sandbox.sink()):
        wait_until(lambda: caught_up(sandbox), "the sink committed every offset")
    index = f"{sandbox.index_prefix}-transactions"
    sandbox.opensearch.indices.refresh(index=index)
    answer = sandbox.opensearch.search(
        index=index,
        body={
            "size": 0,
            "track_total_hits": True,
            "aggs": {
                "late": {"filter": {"range": {"event_time": {"gte": 1_700_000_000_010}}}},
                "by_outcome": {"terms": {"field": "outcome"}},
                "revenue": {"sum": {"field": "amount"}},
                "velocity": {"max": {"field": "indicators.velocity"}},
                "per_minute": {"date_histogram": {"field": "decided_at", "fixed_interval": "1m"}},
            },
        },
    )
    assert answer["hits"]["total"]["value"] == 30
    assert answer["aggregations"]["late"]["doc_count"] == 20
    assert {b["key"]: b["doc_count"] for b in answer["aggregations"]["by_outcome"]["buckets"]} == {
        "APPROVE": 10,
        "REVIEW": 10,
        "BLOCK": 10,
    }
    assert answer["aggregations"]["revenue"]["value"] == sum(10.0 + i for i in range(30))
    assert answer["aggregations"]["velocity"]["value"] == 4.0
    mapping = sandbox.opensearch.indices.get_mapping(index=f"{index}-2023.11.14")[f"{index}-2023.11.14"]["mappings"]
    assert mapping["properties"]["indicators"]["properties"]["velocity"]["type"] == "double"


def test_bad_input_is_dead_lettered_and_the_rest_indexed(sandbox: Sandbox) -> None:
    """A keyword past Lucene's 32,766-byte term limit made OpenSearch refuse the whole document (dead-lettered
    ``opensearch_rejected``, the decision never shown): it is indexed now, the value kept in ``_source`` and not
    searchable (``ignore_above``); one a forget finds documents by is dead-lettered ``invalid_field`` by the sink."""
    good = scored(20)
    long_cashier = ScoredTransaction(**{**scored(1, start=900)[0].to_avro(), "reasons": (), "cashier_id": "c" * 40_000})
    long_face = ScoredTransaction(**{**scored(1, start=902)[0].to_avro(), "face_subject_id": "f" * 40_000})
    not_a_name = ScoredTransaction(**{**scored(1, start=901)[0].to_avro(), "indicators": {"": 1.0}})
    produce(
        sandbox,
        sandbox.topic(SCORED_TRANSACTIONS),
        encoded(good, "transaction_id")
        + [(b"junk", b"\x00not avro")]
        + encoded([long_cashier, not_a_name, long_face], "transaction_id"),
    )

    with running(sandbox.sink()) as sink:
        wait_until(lambda: caught_up(sandbox), "the sink committed past the bad messages")
    assert sandbox.count("transactions") == 21
    found = sandbox.opensearch.search(
        index=f"{sandbox.index_prefix}-transactions",
        body={"query": {"ids": {"values": [long_cashier.transaction_id]}}},
    )["hits"]["hits"]
    assert [hit["_source"]["cashier_id"] for hit in found] == ["c" * 40_000]
    assert sink.stats.dead_lettered == 3
    letters = sorted(dead_letters(sandbox, expected=3), key=lambda d: (d.error_kind, d.reason))
    assert [d.error_kind for d in letters] == ["invalid_field", "invalid_field", "not_avro"]
    assert letters[2].payload == b"\x00not avro"
    assert letters[2].stage == "opensearch-sink"
    assert letters[2].dead_letter_id.startswith(f"{sandbox.topic(SCORED_TRANSACTIONS)}:")
    assert letters[0].reason.startswith("face_subject_id is 40000 bytes") and "fff" not in letters[0].reason
    assert letters[0].payload == long_face.encode()
    assert letters[1].reason.startswith("indicators holds 1 of 1 names that are not a name")


def test_sink_rides_out_an_opensearch_outage_without_losing_or_committing(
    sandbox: Sandbox,
    proxy: SwitchableProxy,
) -> None:
    # Small batches, so most of the records produced during the outage are still in Kafka when it
    # ends and must be fetched after the paused partitions resume.
    settings = sandbox.settings.model_copy(
        update={"opensearch": sandbox.settings.opensearch.model_copy(update={"url": proxy.url, "bulk_max_docs": 64})}
    )
    sink = sandbox.sink(settings=settings)
    before, during = scored(100), scored(250, start=100)
    produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(before, "transaction_id"))

    with running(sink):
        wait_until(lambda: caught_up(sandbox), "the first records were committed")
        assert sandbox.count("transactions") == 100
        committed_before_outage, _ = committed_and_end(sandbox)
        commits_before_outage = sink.stats.commits

        proxy.cut()
        produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(during, "transaction_id"))
        wait_until(
            lambda: sink.stats.retries >= 5 and proxy.accepted_while_cut >= 3,
            "the sink retried against the unreachable OpenSearch",
        )
        time.sleep(1.0)
        assert committed_and_end(sandbox)[0] == committed_before_outage
        assert sink.stats.commits == commits_before_outage
        assert sandbox.count("transactions") == 100

        proxy.restore()
        wait_until(lambda: caught_up(sandbox), "the sink caught up after the outage")
        assert sandbox.count("transactions") == 350
    assert sink.stats.dead_lettered == 0
    ids = sandbox.opensearch.search(
        index=f"{sandbox.index_prefix}-transactions",
        body={"size": 0, "aggs": {"ids": {"cardinality": {"field": "transaction_id", "precision_threshold": 1000}}}},
    )
    assert ids["aggregations"]["ids"]["value"] == 350


def test_sink_started_while_opensearch_is_down_waits_and_then_indexes(
    sandbox: Sandbox,
    proxy: SwitchableProxy,
) -> None:
    settings = sandbox.settings.model_copy(
        update={"opensearch": sandbox.settings.opensearch.model_copy(update={"url": proxy.url})}
    )
    produce(sandbox, sandbox.topic(ALERTS), encoded(alerts(15), "alert_id"))
    proxy.cut()
    with running(sandbox.sink(settings=settings)) as sink:
        wait_until(lambda: sink.stats.retries >= 3, "the sink retried installing its templates")
        assert committed_and_end(sandbox)[0][(sandbox.topic(ALERTS), 0)] < 0
        proxy.restore()
        wait_until(lambda: caught_up(sandbox), "the sink indexed everything once OpenSearch was back")
        assert sandbox.count("alerts") == 15


def face_observations(n: int, event_time: int = 1_700_000_000_000, start: int = 0) -> list[FaceObservation]:
    return [
        FaceObservation(
            observation_id=f"checkout:tx-{i:06d}",
            event_time=event_time + i,
            camera_serial=f"Q2MV-S{i % 2}-L1",
            store_id=f"S{i % 2}",
            lane_id="L1",
            transaction_id=f"tx-{i:06d}",
            trigger="CHECKOUT",
            status=("MATCHED", "NO_MATCH", "NO_FACE")[i % 3],
            subject_id="subj-tx-9" if i % 3 == 0 else None,
            similarity=97.5 if i % 3 == 0 else None,
            quality=0.8,
            image_ref=f"checkout/tx-{i:06d}",
            embedding=[0.25] * 128 if i % 3 != 2 else None,
        )
        for i in range(start, start + n)
    ]


def test_face_observations_are_indexed_once_each_without_their_embeddings(sandbox: Sandbox) -> None:
    records = face_observations(30)
    produce(sandbox, sandbox.topic(FACE_OBSERVATIONS), encoded(records, "camera_serial") * 2)  # and a replay
    with running(sandbox.sink()) as sink:
        wait_until(lambda: sink.stats.indexed + sink.stats.superseded >= 60, "the sink indexed the face observations")
    assert sandbox.count("face_observations") == 30
    alias = f"{sandbox.index_prefix}-face_observations"
    hits = sandbox.opensearch.search(index=alias, body={"size": 100, "query": {"term": {"status": "MATCHED"}}})
    assert hits["hits"]["total"]["value"] == 10
    assert {hit["_id"] for hit in hits["hits"]["hits"]} == {f"checkout:tx-{i:06d}" for i in range(0, 30, 3)}
    assert all("embedding" not in hit["_source"] for hit in hits["hits"]["hits"])
    assert {hit["_index"] for hit in hits["hits"]["hits"]} == {f"{alias}-2023.11.14"}


def test_retention_drops_expired_face_observations_before_transactions(sandbox: Sandbox) -> None:
    old, now = 1_700_000_000_000, int(time.time() * 1000)
    produce(
        sandbox,
        sandbox.topic(FACE_OBSERVATIONS),
        encoded(face_observations(6, old), "camera_serial")
        + encoded(face_observations(3, now, start=100), "camera_serial"),
    )
    produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(scored(5), "transaction_id"))
    with running(sandbox.sink()) as sink:
        wait_until(lambda: sink.stats.indexed + sink.stats.superseded >= 9 + 5, "the sink indexed everything")
    client, prefix, settings = sandbox.opensearch, sandbox.index_prefix, sandbox.settings.indices
    assert sandbox.count("face_observations") == 9
    assert apply_retention(client, prefix, settings) == []  # old history replayed just now is kept for now

    created = max(
        int(body["settings"]["index"]["creation_date"])
        for body in client.indices.get_settings(index=f"{prefix}-*", name="index.creation_date").values()
    )
    later = created + settings.face_observations_retention_days * 24 * 3600 * 1000 + 1
    assert apply_retention(client, prefix, settings, now_ms=later) == [f"{prefix}-face_observations-2023.11.14"]
    assert sandbox.count("transactions") == 5
    assert sandbox.count("face_observations") == 3  # today's index still holds the alias


def test_single_index_of_the_previous_layout_moves_behind_the_alias(sandbox: Sandbox) -> None:
    client, prefix = sandbox.opensearch, sandbox.index_prefix
    legacy = f"{prefix}-transactions"
    body = json.loads((TEMPLATE_DIR / "transactions.json").read_text())["template"]
    client.indices.create(index=legacy, body=body)
    docs = [record.to_avro() for record in scored(12)]
    for doc in docs:
        client.index(index=legacy, id=doc["transaction_id"], body=doc)
    client.indices.refresh(index=legacy)

    install_templates(client, prefix)
    install_templates(client, prefix)  # repeating it changes nothing
    assert client.indices.exists_alias(name=legacy)
    assert sandbox.count("transactions") == 12
    assert f"{legacy}-2023.11.14" in client.indices.get_alias(name=legacy)


def test_pseudonymise_command_hashes_email_keys_indexed_before_the_upgrade(sandbox: Sandbox) -> None:
    """The upgrade step: a document an earlier sink indexed with ``email:<address>`` is rewritten by
    ``python -m sinks.opensearch.pseudonymise`` to the keyed hash; other keys and a second run change nothing."""
    client, prefix, secret = sandbox.opensearch, sandbox.index_prefix, "e2e-secret"
    install_templates(client, prefix)
    old, kept = [record.to_avro() for record in scored(2)]
    old["customer_key"], kept["customer_key"] = "email:alice@example.com", "token:tok_1"
    index = f"{prefix}-transactions-2023.11.14"
    for doc in (old, kept):  # as an earlier version of the sink wrote them
        client.index(index=index, id=doc["transaction_id"], body=doc, refresh=True)

    def command(*args: str) -> str:
        env = {**os.environ, "CG_INDICES__CUSTOMER_KEY_SECRET": secret}  # the rest as this test's settings
        argv = [sys.executable, "-m", "sinks.opensearch.pseudonymise", "--index-prefix", prefix, *args]
        done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "alice" not in done.stdout + done.stderr
        return done.stdout

    assert command("--dry-run").startswith("would hash the customer key of 1 document(s)")
    assert client.get(index=index, id=old["transaction_id"])["_source"]["customer_key"] == old["customer_key"]
    assert command().startswith("hashed the customer key of 1 of 1 document(s)")
    hashed = client.get(index=index, id=old["transaction_id"])["_source"]
    assert hashed["customer_key"] == indexed_customer_key("email:alice@example.com", secret)
    assert (hashed["amount"], hashed["event_time"]) == (old["amount"], old["event_time"])  # the rest is kept
    assert client.get(index=index, id=kept["transaction_id"])["_source"]["customer_key"] == "token:tok_1"
    assert command().startswith("hashed the customer key of 0 of 0 document(s)")  # nothing left: idempotent


def test_a_sink_of_another_period_refuses_a_prefix_with_day_indices(sandbox: Sandbox) -> None:
    client, prefix = sandbox.opensearch, sandbox.index_prefix
    install_templates(client, prefix, "day", now_ms=1_700_000_000_000)  # 2023-11-14: day indices
    with pytest.raises(IndexPeriodConflict, match="'day' indices"):
        install_templates(client, prefix, "month", now_ms=1_700_000_000_000)
    assert not client.indices.exists(index=f"{prefix}-transactions-2023.11")  # nothing was created
    install_templates(client, prefix, "day", now_ms=1_700_000_000_000)  # the period it was written with goes on


def test_sink_creates_period_indices_itself_where_the_cluster_does_not_auto_create(sandbox: Sandbox) -> None:
    # Only this sandbox's indices are refused auto-creation (transient, and reset afterwards).
    client = sandbox.opensearch
    client.cluster.put_settings(body={"transient": {"action.auto_create_index": f"-{sandbox.index_prefix}-*,+*"}})
    try:
        produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(scored(10), "transaction_id"))
        with running(sandbox.sink()) as sink:
            wait_until(lambda: caught_up(sandbox), "the sink created the 2023-11-14 index and indexed into it")
        assert sink.stats.retries >= 1
        assert sink.stats.dead_lettered == 0
        assert sandbox.count("transactions") == 10
    finally:
        client.cluster.put_settings(body={"transient": {"action.auto_create_index": None}})


# --------------------------------------------------------------------------- champion/challenger, labels, drift

HOUR = 3_600_000
MODEL_TOPICS = (SCORED_TRANSACTIONS, LABELS, MODEL_DRIFT)


def verdict(tx: str, label: int, decided_at: int, source: str = "case") -> Label:
    return make_label(transaction_id=tx, label=label, source=source, decided_at=decided_at, decided_by="analyst@x")


def keyed(records: list[Label]) -> list[tuple[bytes, bytes]]:
    return [(r.transaction_id.encode(), r.encode()) for r in records]


def produce_tombstone(box: Sandbox, key: str) -> None:
    producer = Producer({**box.settings.kafka.client_config(), "enable.idempotence": True})
    producer.produce(box.topic(LABELS), key=key.encode(), value=None)
    assert producer.flush(30) == 0


def drift_report(version: str, hour_start: int, score_psi: float, rows: int = 500) -> ModelDrift:
    return ModelDrift(
        report_id=f"drift:{version}:{hour_start}",
        model_version=version,
        hour_start=hour_start,
        rows=rows,
        late_rows=0,
        score_psi=score_psi,
        feature_psi={"amount_log": 0.31, "item_count": 0.02, "retired_feature": 0.01},  # the last: no model's now
        worst_feature="amount_log",
        worst_psi=0.31,
        alert=score_psi >= 0.25,
        reference_rows=340,
        created_at=hour_start + HOUR + 60_000,
    )


def docs(box: Sandbox, kind: str) -> dict[str, dict]:
    index = f"{box.index_prefix}-{kind}"
    box.opensearch.indices.refresh(index=index)
    hits = box.opensearch.search(index=index, body={"size": 1000, "version": True})["hits"]["hits"]
    return {hit["_id"]: {**hit["_source"], "_version": hit["_version"]} for hit in hits}


def test_challenger_scores_labels_and_drift_reports_reach_their_indices(sandbox: Sandbox) -> None:
    transactions = [
        ScoredTransaction(
            **{**t.to_avro(), "model_score": 100 * i, "model_version": "gbm-a", "challenger_score": 999 - 100 * i}
            | ({"challenger_version": "gbm-b"} if i % 2 == 0 else {"challenger_score": None})
        )
        for i, t in enumerate(scored(6))
    ]
    produce(sandbox, sandbox.topic(SCORED_TRANSACTIONS), encoded(transactions, "transaction_id"))
    t0 = 1_700_000_000_000
    produce(
        sandbox,
        sandbox.topic(LABELS),
        keyed(
            [
                verdict("tx-000001", 0, t0 + 5 * HOUR),  # an analyst says legit ...
                verdict("tx-000002", 1, t0),
                verdict("tx-000003", 1, t0),
                verdict(
                    "tx-000001", 1, t0 + HOUR, source="chargeback"
                ),  # ... the chargeback, dated earlier, published later
            ]
        )
        + [(b"tx-000004", verdict("tx-000005", 1, t0).encode())],  # keyed by another transaction: refused
    )
    produce_tombstone(sandbox, "tx-000003")  # withdrawn
    produce_tombstone(sandbox, "tx-never-labelled")  # nothing to delete
    hour = t0 - t0 % HOUR
    reports = [
        drift_report("gbm-a", hour, 0.05),
        drift_report("gbm-b", hour, 0.4),
        drift_report("gbm-a", hour + HOUR, 0.3),
    ]
    reemitted = drift_report("gbm-a", hour, 0.06, rows=520)  # the same hour again, with late rows counted
    produce(sandbox, sandbox.topic(MODEL_DRIFT), encoded([*reports, reemitted], "report_id"))

    with running(sandbox.sink()) as sink:
        wait_until(lambda: caught_up(sandbox, MODEL_TOPICS), "the sink committed every offset of the three topics")
    assert sink.stats.dead_lettered == 1
    assert [d.error_kind for d in dead_letters(sandbox, expected=1)] == ["invalid_key"]

    scored_docs = docs(sandbox, "transactions")
    assert (
        scored_docs["tx-000002"]["challenger_score"] == 799
        and scored_docs["tx-000002"]["challenger_version"] == "gbm-b"
    )
    assert scored_docs["tx-000001"]["challenger_score"] is None
    index = f"{sandbox.index_prefix}-transactions"
    answer = sandbox.opensearch.search(
        index=index,
        body={
            "size": 0,
            "aggs": {"c": {"histogram": {"field": "challenger_score", "interval": 100, "min_doc_count": 1}}},
        },
    )
    assert {b["key"]: b["doc_count"] for b in answer["aggregations"]["c"]["buckets"]} == {500.0: 1, 700.0: 1, 900.0: 1}

    labels = docs(sandbox, "labels")
    assert set(labels) == {"tx-000001", "tx-000002"}  # tx-000003 withdrawn, the mis-keyed one refused
    assert (labels["tx-000001"]["label"], labels["tx-000001"]["source"]) == (1, "chargeback")  # published last wins
    assert labels["tx-000001"]["decided_at"] == t0 + HOUR
    assert sandbox.opensearch.indices.get_alias(name=f"{sandbox.index_prefix}-labels") == {
        f"{sandbox.index_prefix}-labels-all": {"aliases": {f"{sandbox.index_prefix}-labels": {}}}
    }

    drift = docs(sandbox, "model_drift")
    assert set(drift) == {r.report_id for r in reports}
    assert drift[reemitted.report_id]["rows"] == 520
    assert drift[f"drift:gbm-b:{hour}"]["alert"] is True
    assert drift[f"drift:gbm-b:{hour}"]["feature_psi"] == {
        "amount_log": 0.31,
        "item_count": 0.02,
        "retired_feature": 0.01,
    }
    mapping = sandbox.opensearch.indices.get_mapping(index=f"{sandbox.index_prefix}-model_drift-2023.11.14")
    props = next(iter(mapping.values()))["mappings"]["properties"]
    assert props["feature_psi"]["properties"]["amount_log"]["type"] == "double"
    assert "retired_feature" not in props["feature_psi"]["properties"]  # kept in the document, not a field of the index

    # An older write that reaches OpenSearch late (a consumer that lost the partition, a replay) changes nothing.
    first = Message(
        topic=sandbox.topic(LABELS),
        partition=0,
        offset=0,
        key=b"tx-000001",
        value=verdict("tx-000001", 0, t0 + 5 * HOUR).encode(),
    )
    actions, dead = to_actions([first], index_prefix=sandbox.index_prefix, topic_prefix=sandbox.topic_prefix)
    assert dead == []
    result = bulk_once(sandbox.opensearch, actions)
    assert (result.acknowledged, result.stale, result.retry, result.rejected) == (1, 1, [], [])
    assert docs(sandbox, "labels")["tx-000001"]["label"] == 1

    # A sink of a fresh group replays every topic from the start: the same documents.
    before = {kind: sources(docs(sandbox, kind)) for kind in ("labels", "model_drift")}
    first_group, sandbox.group_id = sandbox.group_id, f"{sandbox.group_id}-replay"
    try:
        with running(sandbox.sink()) as replay:
            wait_until(lambda: caught_up(sandbox, MODEL_TOPICS), "the replaying sink committed every offset")
    finally:
        admin = AdminClient(sandbox.settings.kafka.client_config())
        with contextlib.suppress(Exception):
            admin.delete_consumer_groups([first_group])[first_group].result(timeout=30)
    # the analyst's older verdict came again: dropped within the batch or refused by OpenSearch, never written
    assert replay.stats.superseded + replay.stats.stale >= 1
    assert {kind: sources(docs(sandbox, kind)) for kind in ("labels", "model_drift")} == before


def sources(found: dict[str, dict]) -> dict[str, dict]:
    """Documents without their version (a replay may rewrite a document with the same content)."""
    return {doc_id: {k: v for k, v in doc.items() if k != "_version"} for doc_id, doc in found.items()}
