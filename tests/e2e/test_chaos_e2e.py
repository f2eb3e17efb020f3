"""Fault injection on the real local stack: hostile records on every input, then a broker SIGKILL, a real
OpenSearch stop and a three-minute SMTP outage while traffic flows.

Every process of the pipeline runs as its own child process (the scoring job, the OpenSearch sink, the
face stage, the camera bridge, the watchlist service, the alert sender, the Webex bot, the local camera
and the local Webex API). The suite checks what a store chain relies on:

- every hostile record ends as a dead letter naming it and why (or a 4xx for a webhook), from each
  stage that reads it, and never as a decision;
- every valid transaction is exactly one OpenSearch document, every alert exactly one mail;
- no process exits and the Flink job never restarts; every consumer group catches up (nothing stuck).

It prints the counts. The tests run in order on one pipeline (module fixture) and are bounded in time.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import io
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psutil
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from infra.clients.opensearch import make_client
from infra.launcher import Child, spawn, start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.local.smtp import mail_dir
from infra.settings import Settings
from infra.stack import SERVICES, StackPaths, ensure_topics, service_process, up
from jobs.bot.webex_bot import WEBHOOK_PATH
from schemas.codec import codec
from schemas.indices import index_name
from schemas.records import Alert
from schemas.topics import (
    ALERTS,
    CAMERA_EVENTS,
    COMMANDS,
    DEAD_LETTERS,
    FACE_OBSERVATIONS,
    RULES,
    SCORED_TRANSACTIONS,
    TRANSACTIONS,
    WATCHLIST,
)
from tests.e2e import hostile
from tests.e2e.camera_helpers import delete_topics
from tests.e2e.test_bound_addresses_e2e import MAPPED_V4, _listeners, _tree
from tests.ports import free_port

pytestmark = pytest.mark.e2e

TOKEN, ROOM, OFFICER = "chaos-bot-token", "chaos-room", "officer@chaos.test"
OUTAGE_S = 180.0
"""How long the SMTP server stays down (the issue's three minutes)."""


@dataclass
class Pipeline:
    settings: Settings
    stack: Settings
    children: dict[str, Child]
    webhook_secret: str
    valid: set[str] = field(default_factory=set)
    expected_dead: dict[tuple[str, str], str] = field(default_factory=dict)
    """(dead_letter_id, stage) -> label of the hostile record."""
    bridge_hostile: int = 0
    csv_hostile: int = 0
    alerts_sent: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def prefix(self) -> str:
        return self.settings.kafka.topic_prefix

    def topic(self, spec) -> str:
        return spec.full_name(self.prefix)


def _settings(stack: Settings, tmp_path: Path, name: str, secret: str) -> Settings:
    s = stack.isolated(name, tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=3000)
    webex_port, bot_port = free_port(), free_port()
    return s.model_copy(
        update={
            "webex": s.webex.model_copy(
                update={
                    "base_url": f"http://127.0.0.1:{webex_port}/v1",
                    "local_port": webex_port,
                    "bot_token": SecretStr(TOKEN),
                    "room_id": ROOM,
                    "webhook_secret": SecretStr(secret),
                    "bot_port": bot_port,
                    "public_url": f"http://127.0.0.1:{bot_port}",
                    "allowed_people": OFFICER,
                    "command_signing_key": SecretStr(f"sign-{secret}"),
                }
            ),
            "smtp": s.smtp.model_copy(update={"to_addresses": f"{name}@checkout-guard.test"}),
            "alerts": s.alerts.model_copy(
                update={"retry_initial_s": 0.5, "retry_max_s": 5.0, "ledger_path": tmp_path / "ledger.sqlite3"}
            ),
            "dashboard": s.dashboard.model_copy(update={"port": free_port()}),
            "cameras": s.cameras.model_copy(
                update={"local_port": free_port(), "mqtt_topic_prefix": name, "poll_interval_s": 0.25}
            ),
        }
    )


def _start(settings: Settings) -> dict[str, Child]:
    webex = settings.webex
    children = {
        "local-webex": spawn(
            "infra.local.webex", settings, "--port", str(webex.local_port), "--token", TOKEN, name="chaos-local-webex"
        ),
        "local-camera": spawn("infra.local.camera", settings, name="chaos-local-camera"),
        "camera-bridge": spawn("producers.camera_bridge", settings, name="chaos-camera-bridge"),
        "face-stage": spawn("jobs.faces.stage", settings, name="chaos-face-stage"),
        "scoring-job": start_scoring_job(settings, name="chaos-scoring-job"),
        "opensearch-sink": spawn("sinks.opensearch.sink", settings, name="chaos-opensearch-sink"),
        "watchlist-service": spawn("jobs.faces.watchlist_service", settings, name="chaos-watchlist-service"),
        "alert-sender": spawn("sinks.alerts.sender", settings, name="chaos-alert-sender"),
        "webex-bot": spawn("jobs.bot.webex_bot", settings, name="chaos-webex-bot"),
        "dashboard": spawn("sinks.dashboard", settings, name="chaos-dashboard"),
    }
    return children


@pytest.fixture(scope="module")
def pipeline(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    name = f"chaos{uuid.uuid4().hex[:6]}"
    secret = uuid.uuid4().hex
    settings = _settings(stack, tmp_path_factory.mktemp("chaos"), name, secret)
    ensure_topics(settings)
    children = _start(settings)
    p = Pipeline(settings, stack, children, secret)
    try:
        _wait_scoring(p)
        yield p
    finally:
        for child in reversed(children.values()):
            child.stop()
        up(stack)  # whatever a fault test left stopped
        for path in mail_dir(settings.stack_dir).glob("*.eml"):
            with contextlib.suppress(OSError), path.open("rb") as fh:
                if settings.smtp.to_addresses.encode() in fh.read(4096):
                    path.unlink()
        with contextlib.suppress(Exception):
            make_client(settings.opensearch).indices.delete(
                index=f"{settings.opensearch.index_prefix}-*", ignore_unavailable=True
            )
        delete_topics(settings)


# --------------------------------------------------------------------------------------------- traffic


def _producer(settings: Settings) -> Producer:
    return Producer(
        {
            **settings.kafka.client_config(),
            "enable.idempotence": True,
            "linger.ms": 5,
            "message.max.bytes": 2_000_000,
            "message.timeout.ms": 300_000,
        }
    )


def _valid_transactions(p: Pipeline, n: int, seed: int, behind_s: float = 1200.0) -> list:
    """``n`` generated transactions stamped in the past (beyond the face stage's lag: no snapshots), spread over
    a minute whatever the time of day (with the generator's diurnal traffic, a start at night stretched them
    past now, and the job rightly refused them as from the future)."""
    start = int((time.time() - behind_s) * 1000)
    gen = PosGenerator(
        seed=seed, stores=3, customers=500, fraud_share=0.1, tx_per_second=n / 60, start_time_ms=start, diurnal=False
    )
    return [next(gen) for _ in range(n)]


def _send_valid(p: Pipeline, txs: list, rate: float = 0.0) -> None:
    producer = _producer(p.settings)
    errors: list[str] = []

    def done(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    for tx in txs:
        producer.produce(p.topic(TRANSACTIONS), tx.encode(), key=f"{tx.store_id}/{tx.lane_id}", on_delivery=done)
        with p.lock:
            p.valid.add(tx.transaction_id)
        producer.poll(0)
        if rate:
            time.sleep(1.0 / rate)
    assert producer.flush(300) == 0
    assert not errors, errors[:3]


def _send_hostile(p: Pipeline, spec, items: list[hostile.Hostile]) -> None:
    """Produce ``items`` to ``spec``'s topic; remember which stage must dead-letter which offset."""
    producer = _producer(p.settings)
    errors: list[str] = []

    def done(item: hostile.Hostile):
        def callback(err, msg) -> None:
            if err is not None:
                errors.append(f"{item.label}: {err}")
                return
            dl_id = f"{msg.topic()}:{msg.partition()}:{msg.offset()}"
            with p.lock:
                for stage in item.stages:
                    p.expected_dead[(dl_id, stage)] = f"{spec.name}/{item.label}"

        return callback

    for item in items:
        producer.produce(p.topic(spec), item.value, key=item.key, on_delivery=done(item))
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not errors, errors


def _wait_scoring(p: Pipeline) -> None:
    """The job is up once a probe transaction is indexed (also proves the sink and the face join)."""
    probe = _valid_transactions(p, 1, seed=int(time.time()) % 10_000, behind_s=5)
    _send_valid(p, probe)
    _wait_documents(p, timeout=240)


def _documents(p: Pipeline) -> Counter[str]:
    client = make_client(p.settings.opensearch)
    index = index_name(p.settings.opensearch.index_prefix, "transactions")
    if not client.indices.exists(index=index):
        return Counter()
    client.indices.refresh(index=index)
    found: Counter[str] = Counter()
    body = {"query": {"match_all": {}}, "_source": ["transaction_id"], "size": 5000, "sort": ["_doc"]}
    page = client.search(index=index, body=body, scroll="1m")
    while page["hits"]["hits"]:
        found.update(hit["_source"]["transaction_id"] for hit in page["hits"]["hits"])
        page = client.scroll(scroll_id=page["_scroll_id"], scroll="1m")
    with contextlib.suppress(Exception):
        client.clear_scroll(scroll_id=page["_scroll_id"])
    return found


def _wait_documents(p: Pipeline, timeout: float) -> Counter[str]:
    docs: Counter[str] = Counter()

    def arrived() -> bool:
        nonlocal docs
        try:
            docs = _documents(p)
        except Exception:  # noqa: BLE001 - OpenSearch may be restarting
            return False
        with p.lock:
            return p.valid <= set(docs)

    try:
        wait_for(arrived, timeout=timeout, interval=2.0, what="every valid transaction in OpenSearch")
    except TimeoutError:
        with p.lock:
            missing = sorted(p.valid - set(docs))
        why = {}
        for dl in _dead_letters(p):
            for tx in missing:
                if tx.encode() in dl["payload"]:
                    why[tx] = f"{dl['stage']}:{dl['error_kind']}: {dl['reason'][:200]}"
        raise AssertionError(
            f"{len(missing)} valid transactions missing, e.g. {missing[:5]}; dead letters: {why}"
        ) from None
    return docs


def _read_all(p: Pipeline, topic: str, timeout: float = 15.0) -> list:
    """Every record of ``topic`` up to its end now."""
    consumer = Consumer(
        {
            **p.settings.kafka.client_config(),
            "group.id": f"chaos-read-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {pid: consumer.get_watermark_offsets(TopicPartition(topic, pid), timeout=10)[1] for pid in md.partitions}
        consumer.assign([TopicPartition(topic, pid, 0) for pid in md.partitions])
        out: list = []
        position = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + timeout
        while any(position[pid] < end for pid, end in ends.items()) and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out.append(msg)
                    position[msg.partition()] = msg.offset() + 1
        return out
    finally:
        consumer.close()


def _dead_letters(p: Pipeline) -> list[dict]:
    return [codec("DeadLetter").decode(msg.value()) for msg in _read_all(p, p.topic(DEAD_LETTERS))]


def _assert_alive(p: Pipeline) -> None:
    dead = {name: child.proc.returncode for name, child in p.children.items() if not child.alive}
    assert not dead, f"processes exited: {dead}"
    flink_logs = p.settings.stack_dir / "logs" / "chaos-scoring-job.flink"
    restarts = []
    for path in flink_logs.glob("*.log"):
        restarts += [line for line in path.read_text(errors="replace").splitlines() if "to RESTARTING" in line]
    assert not restarts, f"the Flink job restarted: {restarts[:2]}"


def _lag(p: Pipeline) -> dict[str, int]:
    """Records not yet committed, per consumer group of this run (the job commits on checkpoints)."""
    admin = AdminClient(p.settings.kafka.client_config())
    groups = [
        g.group_id
        for g in admin.list_consumer_groups(request_timeout=10).result().valid
        if p.prefix.rstrip(".") in g.group_id
    ]
    consumer = Consumer({**p.settings.kafka.client_config(), "group.id": f"chaos-lag-{uuid.uuid4().hex[:6]}"})
    out: dict[str, int] = {}
    try:
        for group in groups:
            result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
            behind = 0
            for tp in result.topic_partitions:
                if tp.offset < 0:
                    continue
                high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)[1]
                behind += max(0, high - tp.offset)
            out[group] = behind
    finally:
        consumer.close()
    return out


# --------------------------------------------------------------------------------------------- inputs


def _publish_mqtt(p: Pipeline) -> int:
    """Publish the hostile MQTT payloads; how many the bridge must dead-letter: those the local Mosquitto passes on
    (it drops one over ``CG_JOB__MAX_MESSAGE_BYTES``, ``message_size_limit``, before the bridge would read it)."""
    payloads = hostile.mqtt_payloads()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"chaos-{uuid.uuid4().hex[:6]}")
    mq = p.settings.mqtt
    if mq.username and mq.password:
        client.username_pw_set(mq.username, mq.password.get_secret_value())
    client.connect(mq.host, mq.port)
    client.loop_start()
    try:
        for _label, suffix, payload in payloads:
            client.publish(f"{p.settings.cameras.mqtt_topic_prefix}{suffix}", payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    return sum(len(payload) <= p.settings.job.max_message_bytes for _label, _suffix, payload in payloads)


def _post_webhooks(p: Pipeline) -> dict[str, int]:
    """Hostile webhook bodies, correctly signed or not: each must get a 4xx, never a 5xx."""
    url = f"http://127.0.0.1:{p.settings.webex.bot_port}{WEBHOOK_PATH}"

    def sign(body: bytes) -> str:
        return hmac.new(p.webhook_secret.encode(), body, hashlib.sha1).hexdigest()

    nested = b"[" * hostile.NESTING + b"]" * hostile.NESTING
    bodies = {
        "nested_signed": (nested, sign(nested)),
        "nested_under_size_cap_signed": (b"[" * 30_000 + b"]" * 30_000, None),
        "nested_object_signed": (b'{"data": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}", None),
        "huge_signed": (b'{"data": "' + b"x" * 3_000_000 + b'"}', None),
        "not_json_signed": (b"\xff\xfe", None),
        "wrong_types_signed": (json.dumps({"resource": 5, "data": "x"}).encode(), None),
        "bad_signature": (json.dumps({"resource": "messages", "data": {"id": "x"}}).encode(), "0" * 40),
        "unsigned": (json.dumps({"resource": "messages", "data": {"id": "x"}}).encode(), ""),
    }
    status: dict[str, int] = {}
    with httpx.Client(timeout=30) as http:
        for label, (body, signature) in bodies.items():
            headers = {"Content-Type": "application/json"}
            sig = sign(body) if signature is None else signature
            if sig:
                headers["X-Spark-Signature"] = sig
            status[label] = http.post(url, content=body, headers=headers).status_code
    return status


def _csv_rows(p: Pipeline) -> tuple[Path, set[str], int]:
    """A Fraud Detector CSV stamped recently: valid rows and hostile ones (bad bytes, huge, NaN, paths)."""
    header = [
        "EVENT_LABEL",
        "EVENT_TIMESTAMP",
        "LABEL_TIMESTAMP",
        "EVENT_ID",
        "ENTITY_TYPE",
        "ENTITY_ID",
        "card_bin",
        "customer_name",
        "billing_state",
        "ip_address",
        "customer_email",
        "product_category",
        "order_price",
        "payment_currency",
        "merchant",
    ]
    base = time.gmtime(time.time() - 900)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", base)
    run = p.prefix.rstrip(".")

    def row(event_id: str, entity: str = "123-45-6789", price: str = "42.10") -> list[str]:
        fixed = ("", stamp, "", event_id, "customer", entity, "411111", "Ann", "GA", "10.0.0.1", "a@b.test")
        return [*fixed, "food", price, "USD", "fraud_Hamill-Daugherty"]

    valid = {f"{run}-csv-{i}" for i in range(5)}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for tx in sorted(valid):
        writer.writerow(row(tx))
    hostile_rows = [
        row(f"{run}-csv-nan", price="NaN"),
        row(f"{run}-csv-inf", price="inf"),
        row(f"{run}-csv-neg", price="-3"),
        row(f"{run}-csv-path", entity="../../x"),
        row("../../etc/passwd"),
        row(f"{run}-csv-huge", entity="e" * 200_000),
    ]
    for r in hostile_rows:
        writer.writerow(r)
    data = out.getvalue().encode()
    bad_bytes = ",".join(row(f"{run}-csv-latin1")).encode().replace(b"Ann", b"\xc9\xff\xfe") + b"\n"
    path = p.settings.stack_dir / "tmp" / f"{run}-chaos.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data + bad_bytes)
    return path, valid, len(hostile_rows) + 1


# --------------------------------------------------------------------------------------------- tests


def test_every_hostile_record_is_dead_lettered_with_its_reason_and_every_valid_one_scored_once(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    run = p.prefix.rstrip(".")
    txs = _valid_transactions(p, 600, seed=41)
    producing = threading.Thread(target=_send_valid, args=(p, txs, 200.0))
    producing.start()
    corpus = [
        (TRANSACTIONS, hostile.transactions(run)),
        (FACE_OBSERVATIONS, hostile.face_observations(run)),
        (CAMERA_EVENTS, hostile.camera_events(run)),
        (WATCHLIST, hostile.watchlist_entries(run)),
        (RULES, hostile.rule_sets(run)),
        (COMMANDS, hostile.commands(run)),
        (ALERTS, hostile.alerts(run)),
        (SCORED_TRANSACTIONS, hostile.scored_transactions(run)),
    ]
    for spec, items in corpus:
        _send_hostile(p, spec, items)
    p.bridge_hostile = _publish_mqtt(p)
    statuses = _post_webhooks(p)
    csv_path, csv_valid, p.csv_hostile = _csv_rows(p)
    replay = spawn("producers.pos", p.settings, "replay-csv", str(csv_path), "--no-progress", name="chaos-csv")
    assert replay.proc.wait(120) == 0, replay.log_path.read_text()[-2000:]
    with p.lock:
        p.valid |= csv_valid
    producing.join()

    # Everything that must be dead-lettered is, by the stage that read it, and with a reason.
    got: dict[tuple[str, str], dict] = {}

    def all_dead() -> bool:
        for dl in _dead_letters(p):
            got[(dl["dead_letter_id"], dl["stage"])] = dl
        with p.lock:
            return set(p.expected_dead) <= set(got)

    with contextlib.suppress(TimeoutError):
        wait_for(all_dead, timeout=240, interval=3.0, what="every hostile record's dead letter")
    missing = sorted(label for key, label in p.expected_dead.items() if key not in got)
    by_stage = Counter(stage for _, stage in got)
    by_kind = Counter(f"{dl['stage']}:{dl['error_kind']}" for dl in got.values())
    print(
        f"\nhostile Kafka records: {len({k[0] for k in p.expected_dead})}, dead letters expected "
        f"{len(p.expected_dead)}, got {len(got)}; by stage {dict(by_stage)}"
    )
    print("dead letters by stage:kind:", dict(sorted(by_kind.items())))
    print("webhooks:", statuses)
    assert not missing, f"{len(missing)} hostile records were not dead-lettered: {missing[:20]}"
    for key in p.expected_dead:
        assert got[key]["reason"], key
    bridge = [dl for dl in got.values() if dl["stage"] == "camera_bridge"]
    assert len(bridge) >= p.bridge_hostile, f"MQTT: {len(bridge)} dead letters for {p.bridge_hostile} hostile messages"
    csv_dead = [dl for dl in got.values() if dl["source_topic"].startswith("file:") or "csv" in dl["stage"]]
    assert len(csv_dead) >= p.csv_hostile, f"CSV: {len(csv_dead)} dead letters for {p.csv_hostile} hostile rows"
    assert all(400 <= code < 500 for code in statuses.values()), statuses
    for dl in got.values():
        encoded = len(codec("DeadLetter").encode(dl))
        assert encoded < 1_000_000, f"a dead letter of {encoded} bytes cannot be produced"

    # Every valid transaction: exactly one document; no hostile one became a decision.
    docs = _wait_documents(p, timeout=240)
    doubled = {tx: n for tx, n in docs.items() if n > 1}
    assert not doubled, doubled
    assert set(docs) == p.valid, f"unexpected documents: {sorted(set(docs) - p.valid)[:10]}"
    print(f"valid transactions: {len(p.valid)}, documents: {sum(docs.values())}")
    _assert_alive(p)


def test_every_process_of_the_running_pipeline_listens_only_on_the_configured_host(pipeline: Pipeline) -> None:
    p = pipeline
    paths = StackPaths.of(p.stack)
    procs = {svc: _tree(service_process(svc, paths)) for svc in SERVICES}
    procs.update({name: _tree(psutil.Process(child.proc.pid)) for name, child in p.children.items()})
    listeners = _listeners(procs)
    table = "\n".join(f"  {owner:<18} pid {pid:<7} {name:<16} {ip}:{port}" for owner, pid, name, ip, port in listeners)
    print(f"\nlistening TCP sockets of the stack and every pipeline process ({p.settings.bind_host}):\n{table}")
    owners = {owner for owner, *_ in listeners}
    assert owners >= {*SERVICES, "scoring-job", "webex-bot", "dashboard", "local-camera", "local-webex"}, table
    wrong = [row for row in listeners if row[3].removeprefix(MAPPED_V4) != p.settings.bind_host]
    assert not wrong, f"listening beyond {p.settings.bind_host}:\n{table}"


def _service_pid(p: Pipeline, svc: str) -> int:
    proc = service_process(svc, StackPaths.of(p.stack))
    assert proc is not None, f"{svc} is not running"
    return proc.pid


def _mails(p: Pipeline) -> Counter[str]:
    """Mails kept for this run's recipient, by Message-ID."""
    needle = f"Delivered-To: {p.settings.smtp.to_addresses}\r\n".encode()
    ids: Counter[str] = Counter()
    for path in mail_dir(p.settings.stack_dir).glob("*.eml"):
        with contextlib.suppress(OSError):
            head = path.read_bytes()[:8192]
            if needle in head:
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"message-id:"):
                        ids[line.split(b":", 1)[1].strip().decode()] += 1
    return ids


def _alert_ids(p: Pipeline) -> set[str]:
    """The alerts that must be mailed: every one on the topic but the hostile ones the sender refused."""
    refused = {dl["dead_letter_id"] for dl in _dead_letters(p) if dl["stage"] == "alert-sender"}
    out = set()
    for msg in _read_all(p, p.topic(ALERTS)):
        if f"{msg.topic()}:{msg.partition()}:{msg.offset()}" not in refused:
            out.add(Alert.decode(msg.value()).alert_id)
    return out


def test_broker_kill_opensearch_stop_and_smtp_outage_lose_and_double_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    txs = _valid_transactions(p, 3000, seed=42, behind_s=900)
    smtp_pid = _service_pid(p, "smtp")
    os.kill(smtp_pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        psutil.Process(smtp_pid).wait(30)
    outage_from = time.monotonic()
    producing = threading.Thread(target=_send_valid, args=(p, txs, 25.0))
    producing.start()
    run = p.prefix.rstrip(".")
    producer = _producer(p.settings)
    now = int(time.time() * 1000)
    for i in range(20):  # alerts the sender must mail once the SMTP server is back
        alert = Alert(f"{run}-outage-{i}", "BLOCKED_TRANSACTION", "high", now, "store-001", summary=f"outage {i}")
        producer.produce(p.topic(ALERTS), alert.encode(), key=alert.alert_id.encode())
    assert producer.flush(30) == 0

    time.sleep(20)
    kafka_pid = _service_pid(p, "kafka")
    os.kill(kafka_pid, signal.SIGKILL)  # the broker dies mid-stream
    time.sleep(8)
    up(p.stack)
    time.sleep(30)
    os_pid = _service_pid(p, "opensearch")
    os.kill(os_pid, signal.SIGTERM)  # a real OpenSearch stop
    with contextlib.suppress(psutil.Error):
        psutil.Process(os_pid).wait(60)
    time.sleep(45)
    left = OUTAGE_S - (time.monotonic() - outage_from)
    if left > 0:
        time.sleep(left)
    up(p.stack)  # OpenSearch and SMTP back
    print(f"\nSMTP was down for {time.monotonic() - outage_from:.0f} s")
    producing.join(600)
    assert not producing.is_alive()

    docs = _wait_documents(p, timeout=400)
    doubled = {tx: n for tx, n in docs.items() if n > 1}
    assert not doubled, doubled
    assert set(docs) == p.valid
    alerts = _alert_ids(p)

    def mailed() -> bool:
        return len(_mails(p)) >= len(alerts)

    wait_for(mailed, timeout=300, interval=3.0, what=f"{len(alerts)} mails")
    time.sleep(5)
    mails = _mails(p)
    print(
        f"valid transactions: {len(p.valid)}, documents: {sum(docs.values())}; alerts: {len(alerts)}, "
        f"mails: {sum(mails.values())} ({len(mails)} distinct)"
    )
    assert sum(mails.values()) == len(alerts), "exactly one mail per alert"
    sender_dead = [dl for dl in _dead_letters(p) if dl["stage"] == "alert-sender" and "outage" in dl["dead_letter_id"]]
    assert not sender_dead, sender_dead[:2]
    _assert_alive(p)


def test_nothing_is_stuck_afterwards(pipeline: Pipeline) -> None:
    p = pipeline
    _send_valid(p, _valid_transactions(p, 50, seed=43, behind_s=60))
    _wait_documents(p, timeout=120)
    lag: dict[str, int] = {}

    def caught_up() -> bool:
        nonlocal lag
        lag = _lag(p)
        return bool(lag) and not any(lag.values())

    with contextlib.suppress(TimeoutError):
        wait_for(caught_up, timeout=120, interval=3.0, what="every consumer group at the end of its topics")
    print(f"\nconsumer lag per group: {lag}")
    assert lag and not any(lag.values()), lag
    _assert_alive(p)
