"""The local stack is up, healthy and laid out as the design says, and messages go through it."""

from __future__ import annotations

import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from infra.settings import Settings
from infra.stack import status, up
from schemas.topics import ALL_TOPICS, WATCHLIST

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

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-sub-{uuid.uuid4().hex[:8]}")
    sub.on_connect = lambda *_: connected.set()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.on_message = lambda _c, _u, msg: received.put(msg)
    sub.connect(stack.mqtt.host, stack.mqtt.port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-pub-{uuid.uuid4().hex[:8]}")
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
