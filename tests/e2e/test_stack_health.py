"""The local stack is up, healthy and laid out as the design says, and messages go through it; with
logins switched on, Kafka and Mosquitto admit the configured users only."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from pydantic import SecretStr

from infra.launcher import start_scoring_job, wait_for
from infra.settings import Settings
from infra.stack import OPENSEARCH_DISK_WATERMARKS, StackPaths, down, ensure_topics, status, up
from schemas.codec import codec
from schemas.topics import ALL_TOPICS, DEAD_LETTERS, SCORED_TRANSACTIONS, TRANSACTIONS, WATCHLIST
from tests.builders import sale
from tests.ports import free_port

pytestmark = pytest.mark.e2e


def test_all_services_healthy(stack: Settings) -> None:
    st = status(stack)
    for name, svc in st["services"].items():
        assert svc["healthy"], f"{name} not healthy: {svc}"
    assert st["topics"]["missing"] == []
    assert st["healthy"]


def test_up_is_idempotent(stack: Settings) -> None:
    before = {n: s["pid"] for n, s in status(stack)["services"].items()}
    t0 = time.monotonic()
    after = {n: s["pid"] for n, s in up(stack)["services"].items()}
    assert after == before, "up restarted a service that was running"
    assert time.monotonic() - t0 < 15


def test_topics_match_the_spec(stack: Settings) -> None:
    admin = AdminClient(stack.kafka.client_config())
    metadata = admin.list_topics(timeout=10).topics
    names = {spec.full_name(stack.kafka.topic_prefix): spec for spec in ALL_TOPICS}
    for name, spec in names.items():
        assert name in metadata, f"topic {name} missing"
        assert len(metadata[name].partitions) == spec.partitions, name
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names])
    for resource, fut in futures.items():
        actual = {k: v.value for k, v in fut.result(timeout=10).items()}
        for key, value in names[resource.name].config.items():
            assert actual.get(key) == value, f"{resource.name}: {key}={actual.get(key)}, spec says {value}"
    watchlist = WATCHLIST.full_name(stack.kafka.topic_prefix)
    assert actual_config(admin, watchlist)["cleanup.policy"] == "compact"


@contextlib.contextmanager
def own_topics(stack: Settings, tag: str) -> Iterator[tuple[Settings, AdminClient]]:
    """The settings with a topic prefix of their own, and an admin client; the prefix's topics go afterwards."""
    settings = stack.model_copy(
        update={"kafka": stack.kafka.model_copy(update={"topic_prefix": f"{tag}{uuid.uuid4().hex[:6]}."})}
    )
    admin = AdminClient(settings.kafka.client_config())
    try:
        yield settings, admin
    finally:
        names = [spec.full_name(settings.kafka.topic_prefix) for spec in ALL_TOPICS]
        for fut in admin.delete_topics(names, operation_timeout=10).values():
            fut.exception(30)


def test_dead_letters_are_kept_as_long_as_the_setting_says_also_when_it_changes(stack: Settings) -> None:
    with own_topics(stack, "e2edl") as (settings, admin):
        topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
        for days in (2, 0.5):
            ensure_topics(
                settings.model_copy(
                    update={"kafka": settings.kafka.model_copy(update={"dead_letter_retention_days": days})}
                )
            )
            wanted = str(int(days * 86_400_000))
            # The broker applies a config change from the metadata log a moment after the controller took it.
            wait_for(
                lambda wanted=wanted: actual_config(admin, topic)["retention.ms"] == wanted,
                15,
                what=f"retention {wanted}",
            )


def test_an_existing_watchlist_topic_gets_the_compaction_that_erasure_needs(stack: Settings) -> None:
    """A topic made before (or tuned since) kept a forgotten subject's embeddings readable for 7 days or more."""
    with own_topics(stack, "e2ewl") as (settings, admin):
        topic = WATCHLIST.full_name(settings.kafka.topic_prefix)
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
        ensure_topics(settings)
        for key in WATCHLIST.enforced:
            wanted = WATCHLIST.config[key]
            wait_for(lambda key=key, wanted=wanted: actual_config(admin, topic)[key] == wanted, 15, what=f"{key}")


def actual_config(admin: AdminClient, topic: str) -> dict[str, str]:
    [fut] = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {k: v.value for k, v in fut.result(timeout=10).items()}


def test_kafka_produce_consume_round_trip(stack: Settings) -> None:
    admin = AdminClient(stack.kafka.client_config())
    topic = f"{stack.kafka.topic_prefix}e2e-roundtrip-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    try:
        key, value = b"lane-1", uuid.uuid4().bytes
        producer = Producer(stack.kafka.client_config() | {"enable.idempotence": True})
        producer.produce(topic, key=key, value=value)
        assert producer.flush(15) == 0, "message not delivered"

        consumer = Consumer(
            stack.kafka.client_config()
            | {
                "group.id": f"e2e-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        consumer.subscribe([topic])
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = consumer.poll(1.0)
                if msg is None:
                    continue
                if msg.error():
                    assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                    continue
                assert (msg.key(), msg.value()) == (key, value)
                break
            else:
                pytest.fail("message not consumed within 30s")
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


def test_mqtt_publish_subscribe_round_trip(stack: Settings) -> None:
    topic = f"checkout-guard/e2e/{uuid.uuid4().hex[:8]}"
    payload = uuid.uuid4().hex.encode()
    received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    connected, subscribed = threading.Event(), threading.Event()

    sub = _mqtt_client(stack, f"e2e-sub-{uuid.uuid4().hex[:8]}")
    sub.on_connect = lambda *_: connected.set()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, msg: received.put(msg)
    sub.connect(stack.mqtt.host, stack.mqtt.port)
    sub.loop_start()
    pub = _mqtt_client(stack, f"e2e-pub-{uuid.uuid4().hex[:8]}")
    try:
        assert connected.wait(10), "subscriber did not connect"
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        pub.connect(stack.mqtt.host, stack.mqtt.port)
        pub.loop_start()
        pub.publish(topic, payload, qos=1).wait_for_publish(10)
        msg = received.get(timeout=10)
        assert (msg.topic, msg.payload) == (topic, payload)
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()


def _mqtt_client(settings: Settings, client_id: str) -> mqtt.Client:
    """A paho client that logs in as the settings' MQTT user when one is set."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if settings.mqtt.username and settings.mqtt.password is not None:
        client.username_pw_set(settings.mqtt.username, settings.mqtt.password.get_secret_value())
    return client


def test_opensearch_keeps_its_flood_stage_disk_watermark_on(stack: Settings) -> None:
    r = httpx.get(
        f"{stack.opensearch.url.rstrip('/')}/_cluster/settings",
        params={"include_defaults": "true", "flat_settings": "true"},
        timeout=10,
    )
    merged = {**r.json()["defaults"], **r.json()["persistent"], **r.json()["transient"]}
    assert merged["cluster.routing.allocation.disk.threshold_enabled"] == "true"
    for level, value in OPENSEARCH_DISK_WATERMARKS.items():
        assert merged[f"cluster.routing.allocation.disk.watermark.{level}"] == value, level


# --- with logins ------------------------------------------------------------------------------------


def _free_port() -> int:
    return free_port()  # below the ephemeral range: no outgoing connection takes it before the broker binds


@pytest.fixture(scope="module")
def secured(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A second Kafka and Mosquitto (own stack dir and ports) that ask for a login: SCRAM-SHA-512 and a
    Mosquitto password file, from the same settings the clients use."""
    root = tmp_path_factory.mktemp("secured-stack")
    (root / "lib").symlink_to(StackPaths.of(stack).root / "lib")  # the installed jars, not a second copy
    settings = stack.model_copy(
        update={
            "stack_dir": root,
            "kafka": stack.kafka.model_copy(
                update={
                    "bootstrap_servers": f"127.0.0.1:{_free_port()}",
                    "controller_port": _free_port(),
                    "security_protocol": "SASL_PLAINTEXT",
                    "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_username": "checkout-guard",
                    "sasl_password": SecretStr(secrets.token_urlsafe(16)),
                }
            ),
            "mqtt": stack.mqtt.model_copy(
                update={"port": _free_port(), "username": "camera", "password": SecretStr(secrets.token_urlsafe(16))}
            ),
            "model": stack.model.model_copy(update={"artifact_dir": stack.models_root}),
        }
    )
    try:
        up(settings, services=("kafka", "mosquitto"))
        yield settings
    finally:
        down(settings)


def _kafka_admits(settings: Settings, **login: object) -> bool:
    quiet = logging.getLogger("e2e.refused-kafka-clients")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False  # librdkafka retries a refused login a few times a second
    conf = {**settings.kafka.client_config(), **login, "socket.timeout.ms": 3000, "logger": quiet}
    try:
        return bool(AdminClient(conf).list_topics(timeout=4).brokers)
    except KafkaException:
        return False


def test_secured_kafka_admits_the_configured_user_only(stack: Settings, secured: Settings) -> None:
    assert _kafka_admits(secured)
    assert not _kafka_admits(secured, **{"sasl.password": "wrong"}), "a wrong password got in"
    anonymous = {"security.protocol": "PLAINTEXT"}
    assert not _kafka_admits(secured, **anonymous), "an anonymous client got in"

    # The controller listener: a plaintext one answers DescribeCluster (KIP-919), a SASL one hangs up.
    assert _controller_answers_anonymously(_kafka_host(stack), stack.kafka.controller_port), "probe broken"
    assert not _controller_answers_anonymously(_kafka_host(secured), secured.kafka.controller_port)


def _kafka_host(settings: Settings) -> str:
    return settings.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[0]


def _controller_answers_anonymously(host: str, port: int) -> bool:
    """Send DescribeCluster v0 without logging in; whether any response comes back."""
    client_id = b"e2e"
    request = (
        (60).to_bytes(2, "big")  # DescribeCluster
        + (0).to_bytes(2, "big")  # v0, a flexible version: request header v2
        + (1).to_bytes(4, "big")  # correlation id
        + len(client_id).to_bytes(2, "big")
        + client_id
        + b"\x00"  # header tagged fields
        + b"\x00\x00"  # include_cluster_authorized_operations=false, body tagged fields
    )
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(len(request).to_bytes(4, "big") + request)
        try:
            return len(sock.recv(4)) == 4
        except OSError:
            return False


def _mqtt_connack(settings: Settings, login: tuple[str, str] | None) -> bool:
    """Whether the broker accepts a CONNECT with this login (None: anonymous)."""
    accepted: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-auth-{uuid.uuid4().hex[:8]}")
    if login is not None:
        client.username_pw_set(*login)
    client.on_connect = lambda _c, _u, _f, reason, _p: accepted.put(not reason.is_failure)
    client.connect(settings.mqtt.host, settings.mqtt.port)
    client.loop_start()
    try:
        return accepted.get(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_secured_mosquitto_admits_the_configured_user_only(secured: Settings) -> None:
    assert secured.mqtt.username and secured.mqtt.password is not None
    login = (secured.mqtt.username, secured.mqtt.password.get_secret_value())
    assert _mqtt_connack(secured, login), "the configured user was refused"
    assert not _mqtt_connack(secured, (login[0], "wrong")), "a wrong password got in"
    assert not _mqtt_connack(secured, None), "an anonymous client got in"


def test_the_job_and_a_python_client_both_log_in_to_secured_kafka(secured: Settings, tmp_path: Path) -> None:
    settings = secured.isolated(f"e2es{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", face_deadline_ms=0)
    ensure_topics(settings)
    prefix = settings.kafka.topic_prefix
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    tx = replace(sale(f"sasl-{uuid.uuid4().hex[:8]}"), event_time=int(time.time() * 1000))
    producer.produce(TRANSACTIONS.full_name(prefix), key=b"store-001/lane-01", value=tx.encode())
    assert producer.flush(15) == 0
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"t{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([SCORED_TRANSACTIONS.full_name(prefix)])
    job = start_scoring_job(settings, name=f"{settings.consumer_group}-job")
    scored: list[dict] = []

    def decided() -> bool:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error() and msg.key().decode() == tx.transaction_id:
            scored.append(codec("ScoredTransaction").decode(msg.value()))
        return bool(scored) or not job.alive

    try:
        wait_for(decided, timeout=180, what="the job to read, score and write through SASL")
    finally:
        job.stop()
        consumer.close()
    assert scored, f"the job ended without scoring; end of its log:\n{job.log_path.read_text()[-3000:]}"
    assert scored[0]["transaction_id"] == tx.transaction_id
    client_password = settings.kafka.sasl_password.get_secret_value()  # type: ignore[union-attr]
    stack_password = json.loads(StackPaths.of(settings).kafka_admin_secret.read_text())["password"]
    logs = [p for p in (settings.stack_dir / "logs").rglob("*") if p.is_file()]
    for password in (client_password, stack_password):
        leaked = [str(p) for p in logs if password in p.read_text(errors="replace")]
        assert not leaked, f"a Kafka password is in {leaked}"
