"""Three brokers survive the loss of the busiest one: an idempotent producer at a fixed rate keeps every
acknowledged record while the broker that leads most partitions and is the active controller is SIGKILLed,
and the killed broker rejoins with every partition's ISR back to three. The scoring job, run against the
three brokers while the broker leading most of its partitions is SIGKILLed, still writes exactly one
document per transaction.

Runs its own 3-node cluster (own stack dir, free ports, the installed jars of the shared stack), never
the shared stack's Kafka."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from confluent_kafka import KafkaError, Message, TopicPartition
from confluent_kafka.admin import NewTopic

from infra.clients import kafka as kafka_clients
from infra.clients.opensearch import make_client
from infra.kafka_cluster import PORT_STRIDE
from infra.launcher import start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings
from infra.stack import StackPaths, down, ensure_topics, kafka_state, up
from schemas.indices import index_name
from schemas.topics import ALL_TOPICS, TRANSACTIONS
from tests.e2e.sink_helpers import sink_running
from tests.ports import free_port

pytestmark = pytest.mark.e2e

RATE_PER_S = 200
PARTITIONS = 6
BEFORE_KILL_S = 8.0
DOWN_FOR_S = 15.0
"""How long the killed broker stays down while the producer keeps going."""
FAILOVER_BOUND_S = 30.0
"""A new controller and new partition leaders within this (broker session timeout 9 s, election ~1 s)."""
ISR_BOUND_S = 60.0
"""Every partition back to three in-sync replicas within this after the restart."""


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    return free_port()  # below the ephemeral range: no outgoing connection takes it before the broker binds


def _controller_base() -> int:
    """A port p with p, p + 2 and p + 4 free: the three controller ports derived from one setting."""
    for _ in range(200):
        base = _free_port()
        if base + 2 * PORT_STRIDE < 65536 and all(_port_free(base + PORT_STRIDE * i) for i in range(3)):
            return base
    raise RuntimeError("no three free controller ports")


def _our_processes(root: Path) -> list[psutil.Process]:
    """Every live process whose command line names this cluster's stack dir."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(root) in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def cluster(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A 3-broker cluster of its own, started by ``up`` as ``make up`` does with CG_KAFKA__BROKERS=3; one for
    this module's tests (each leaves it whole: the broker it kills is started again), which saves a start."""
    root = tmp_path_factory.mktemp("three-brokers")
    (root / "lib").symlink_to(StackPaths.of(stack).root / "lib")  # the installed jars, not a second copy
    addresses = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(3))
    settings = stack.model_copy(
        update={
            "stack_dir": root,
            "kafka": stack.kafka.model_copy(
                update={
                    "bootstrap_servers": addresses,
                    "controller_port": _controller_base(),
                    "brokers": 3,
                    "topic_prefix": f"e2e3b{uuid.uuid4().hex[:6]}.",
                }
            ),
        }
    )
    try:
        up(settings, services=("kafka",))
        yield settings
    finally:
        stopped = sorted(down(settings))
    # `down` as `make down` runs it, checked once the module's tests are done with the cluster
    assert stopped == ["kafka-1", "kafka-2", "kafka-3"]
    assert _our_processes(root) == [], "a broker outlived down"
    assert not any(StackPaths.of(settings).run.glob("kafka*.pid"))


class _FixedRateProducer(threading.Thread):
    """Sends sequence numbers at a fixed rate (idempotent, acks=all) until stopped; keeps every
    acknowledged sequence number and every delivery error."""

    def __init__(self, settings: Settings, topic: str) -> None:
        super().__init__(daemon=True)
        self.producer = kafka_clients.producer(settings, kafka_clients.RELIABLE, client_id="e2e-three-brokers")
        self.topic, self.stop = topic, threading.Event()
        self.sent, self.acked, self.errors = 0, [], []  # type: ignore[var-annotated]
        self.unacked = -1

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(err.str())
        else:
            self.acked.append(int(msg.value() or b"-1"))

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * RATE_PER_S)
            while self.sent < due:
                kafka_clients.produce(
                    self.producer, self.topic, str(self.sent).encode(), str(self.sent).encode(), self._delivered
                )
                self.sent += 1
            self.producer.poll(0.005)
        self.unacked = self.producer.flush(60)


def _wait_for(what: str, check: Callable[[], Any], bound_s: float, step_s: float = 0.5) -> Any:
    """``check()`` until it returns something true (returned), failing after ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"{what} not within {bound_s:.0f}s")


def _read_back(settings: Settings, topic: str, expected: int, bound_s: float = 60.0) -> Counter[int]:
    consumer = kafka_clients.consumer(
        settings, f"e2e-three-brokers-{uuid.uuid4().hex[:8]}", kafka_clients.MANUAL_COMMIT
    )
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])  # 0: from the start
        seen: Counter[int] = Counter()
        deadline = time.monotonic() + bound_s
        while sum(seen.values()) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=1.0):
                assert msg.error() is None, msg.error()
                seen[int(msg.value() or b"-1")] += 1
        # whatever else is there (a duplicate) arrives within a few more polls
        for msg in consumer.consume(500, timeout=2.0):
            seen[int(msg.value() or b"-1")] += 1
        return seen
    finally:
        consumer.close()


def test_killing_the_busiest_broker_and_controller_loses_no_acknowledged_record(cluster: Settings) -> None:
    settings = cluster
    admin = kafka_clients.admin(settings)
    state = kafka_state(settings, ["__consumer_offsets"])
    assert [b["up"] for b in state["brokers"]] == [True, True, True]
    assert all(len(p["replicas"]) == 3 for p in state["partitions"]["__consumer_offsets"]), "offsets: RF 3"
    ours = kafka_state(settings)["partitions"]
    assert len(ours) == len(ALL_TOPICS) and all(len(p["replicas"]) == 3 for ps in ours.values() for p in ps)
    assert ensure_topics(settings) == [], "topics were created by up"

    # The active controller is made the preferred leader of most partitions of the test topic.
    controller = _wait_for("a quorum leader", lambda: kafka_state(settings, [])["controller"], 30)
    a, b = [n for n in (1, 2, 3) if n != controller]
    c = controller
    assignment = [[c, a, b], [c, b, a], [c, a, b], [c, b, a], [a, b, c], [b, c, a]]
    topic = f"{settings.kafka.topic_prefix}three-brokers"
    new = NewTopic(topic, PARTITIONS, replica_assignment=assignment, config={"min.insync.replicas": "2"})
    admin.create_topics([new])[topic].result(30)
    leaders = _wait_for(
        "preferred leaders",
        lambda: (
            (ps := kafka_state(settings, [topic])["partitions"].get(topic))
            and [p["leader"] for p in ps] == [r[0] for r in assignment]
            and ps
        ),
        30,
    )
    busiest, _ = Counter(p["leader"] for p in leaders).most_common(1)[0]
    assert busiest == controller
    victim = next(b for b in kafka_state(settings, [])["brokers"] if b["node"] == busiest)

    producer = _FixedRateProducer(settings, topic)
    producer.start()
    try:
        time.sleep(BEFORE_KILL_S)
        killed = psutil.Process(victim["pid"])
        killed.kill()  # SIGKILL: no controlled shutdown
        killed.wait(10)
        killed_at = time.monotonic()
        after = _wait_for(
            "a new controller and leaders off the killed broker",
            lambda: (
                (st := kafka_state(settings, [topic]))["controller"] not in (None, busiest)
                and not next(b for b in st["brokers"] if b["node"] == busiest)["up"]
                and all(p["leader"] not in (-1, busiest) for p in st["partitions"][topic])
                and st
            ),
            FAILOVER_BOUND_S,
        )
        assert all(len(p["isr"]) == 2 for p in after["partitions"][topic]), after["partitions"][topic]
        time.sleep(max(0.0, DOWN_FOR_S - (time.monotonic() - killed_at)))
        assert producer.errors == [], producer.errors[:5]

        restarted = time.monotonic()
        up(settings, services=("kafka",))  # the killed node rejoins, as `make up` restarts it
        up_s = time.monotonic() - restarted
        _wait_for(
            "ISR back to 3 on every partition",
            lambda: all(
                len(p["isr"]) == 3 for ps in kafka_state(settings, [topic, *ours])["partitions"].values() for p in ps
            ),
            ISR_BOUND_S,
        )
        isr_back_s = time.monotonic() - restarted
        time.sleep(3.0)  # keep producing a moment on the full cluster
    finally:
        producer.stop.set()
        producer.join(90)

    assert producer.unacked == 0, "records left unacknowledged at flush"
    assert producer.errors == [], producer.errors[:5]
    assert len(producer.acked) == producer.sent and producer.sent >= RATE_PER_S * (BEFORE_KILL_S + DOWN_FOR_S)
    seen = _read_back(settings, topic, producer.sent)
    missing = [n for n in range(producer.sent) if seen[n] == 0]
    twice = [n for n, count in seen.items() if count > 1]
    assert not missing and not twice, f"missing {missing[:10]}, duplicated {twice[:10]}"
    assert set(seen) == set(producer.acked)
    print(
        f"\nsent {producer.sent} at {RATE_PER_S}/s: all acked, read once; "
        f"restart {up_s:.0f}s, ISR 3 after {isr_back_s:.0f}s"
    )


def _busiest_broker(settings: Settings) -> dict:
    """The broker leading most partitions of our topics (the one whose loss moves most leaders)."""
    state = kafka_state(settings)
    busiest, _ = Counter(p["leader"] for ps in state["partitions"].values() for p in ps).most_common(1)[0]
    return next(b for b in state["brokers"] if b["node"] == busiest)


def _send_transactions(settings: Settings, txs: list, rate_per_s: float, errors: list[str]) -> None:
    producer = kafka_clients.producer(settings, kafka_clients.RELIABLE, client_id="e2e-three-brokers-pos")
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err.str())

    t0 = time.monotonic()
    for i, tx in enumerate(txs):
        time.sleep(max(0.0, t0 + i / rate_per_s - time.monotonic()))
        kafka_clients.produce(producer, topic, f"{tx.store_id}/{tx.lane_id}", tx.encode(), delivered)
        producer.poll(0)
    if producer.flush(120):
        errors.append("unacknowledged at flush")


def test_the_job_writes_one_document_per_transaction_while_the_busiest_broker_is_killed(
    cluster: Settings, tmp_path: Path
) -> None:
    name = f"e2e3bjob{uuid.uuid4().hex[:6]}"
    settings = cluster.isolated(name, tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=0)
    ensure_topics(settings)
    gen = PosGenerator(seed=31, stores=4, customers=2000, fraud_share=0.05, tx_per_second=50)
    txs = [next(gen) for _ in range(3000)]
    warm_up, stream = txs[:300], txs[300:]  # the stream, at 50/s, runs through the kill and the restart
    errors: list[str] = []
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")

    def scored() -> int:
        client.indices.refresh(index=index)
        return int(client.count(index=index)["count"])

    with sink_running(settings, timeout_s=60):
        job = start_scoring_job(settings, name=f"{name}-job")
        sending = threading.Thread(target=_send_transactions, args=(settings, stream, 50.0, errors), daemon=True)
        try:
            _send_transactions(settings, warm_up, 1000.0, errors)
            wait_for(lambda: scored() >= len(warm_up), timeout=240, interval=1.0, what="the job to score")
            sending.start()
            time.sleep(5.0)
            victim = _busiest_broker(settings)
            killed = psutil.Process(victim["pid"])
            killed.kill()  # mid-stream, the job reading from and writing transactions to it
            killed.wait(10)
            time.sleep(DOWN_FOR_S)
            assert job.alive, f"the job exited; see {job.log_path}"
            up(settings, services=("kafka",))
            sending.join(180)
            assert not sending.is_alive() and errors == [], errors[:5]
            wait_for(lambda: scored() >= len(txs), timeout=240, interval=2.0, what=f"{len(txs)} documents")
            time.sleep(3.0)  # anything more (a second document for a transaction) has time to show
            ids: Counter[str] = Counter()
            page = client.search(
                index=index, body={"query": {"match_all": {}}, "_source": ["transaction_id"]}, size=10_000
            )
            ids.update(hit["_source"]["transaction_id"] for hit in page["hits"]["hits"])
            assert scored() == len(txs) == len(ids)
            assert set(ids) == {tx.transaction_id for tx in txs}, "exactly one document per transaction"
        finally:
            job.stop()
