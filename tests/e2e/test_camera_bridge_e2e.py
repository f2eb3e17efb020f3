"""The camera bridge on a real Mosquitto and Kafka: MV Sense messages arrive as CameraEvents keyed by
serial, garbage as dead letters, other topics nowhere; a broker restart is survived.

The broker here is the test's own Mosquitto on a free port, so stopping it leaves the shared one alone.
"""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from producers.camera_bridge import CameraBridge
from schemas.records import CameraEvent, DeadLetter
from schemas.topics import CAMERA_EVENTS, DEAD_LETTERS
from tests.e2e.camera_helpers import PrivateMosquitto, TopicReader, delete_topics, isolated_camera_settings

pytestmark = pytest.mark.e2e


def _publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _detections(oid: int) -> bytes:
    return json.dumps(
        {
            "ts": int(time.time() * 1000),
            "objects": [{"frame": 1, "oid": oid, "type": "person", "x0": 0.2, "y0": 0.1, "x1": 0.6, "y1": 0.9}],
        }
    ).encode()


def test_bridge_forwards_detections_dead_letters_garbage_and_survives_a_broker_restart(stack, tmp_path) -> None:
    broker = PrivateMosquitto(tmp_path).start()
    settings = isolated_camera_settings(stack, tmp_path, mqtt_port=broker.port)
    prefix = settings.cameras.mqtt_topic_prefix
    topic_prefix = settings.kafka.topic_prefix
    events, dlq = CAMERA_EVENTS.full_name(topic_prefix), DEAD_LETTERS.full_name(topic_prefix)
    bridge = CameraBridge(settings)
    stop = threading.Event()
    ended: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run(stop)
        except BaseException as exc:  # kept for the failure message: a dead bridge explains a timeout
            ended.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    reader = TopicReader(settings, events, dlq)

    def why() -> str:
        return f"bridge ended with {ended!r}, failure {bridge.failure()!r}, stats {bridge.stats}"

    try:
        assert bridge.connected.wait(15), f"bridge did not connect: {why()}"
        _publish(
            broker.port,
            [
                (f"{prefix}/merakimv/Q2MV-s1-ENTRANCE/raw_detections", _detections(1001)),
                (
                    f"{prefix}/merakimv/Q2MV-s1-ENTRANCE/0",
                    json.dumps({"ts": 1_795_000_000_000, "counts": {"person": 1}}).encode(),
                ),
                (f"{prefix}/merakimv/Q2MV-s1-ENTRANCE/light", b'{"lux": 300}'),
                (f"{prefix}/merakimv/Q2MV-s1-ENTRANCE/raw_detections", b"this is not json"),
            ],
        )
        try:
            seen = reader.until(lambda s: sum(t == events for t, _, _ in s) >= 2 and any(t == dlq for t, _, _ in s))
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {why()}") from exc
        cam = [CameraEvent.decode(v) for t, _, v in seen if t == events]
        assert {e.kind for e in cam} == {"RAW_DETECTIONS", "ZONE_COUNT"}
        assert all(k == b"Q2MV-s1-ENTRANCE" for t, k, _ in seen if t == events)
        assert cam[[e.kind for e in cam].index("RAW_DETECTIONS")].objects[0].oid == 1001
        dead = [DeadLetter.decode(v) for t, _, v in seen if t == dlq]
        assert len(dead) == 1 and dead[0].error_kind == "not_json" and dead[0].payload == b"this is not json"
        assert bridge.stats.ignored["light"] == 1

        broker.stop()
        assert not bridge.connected.wait(0) or _wait_disconnect(bridge)
        broker.start()
        assert bridge.connected.wait(20), "bridge did not reconnect after the broker restart"
        _publish(broker.port, [(f"{prefix}/merakimv/Q2MV-s1-ENTRANCE/raw_detections", _detections(2002))])
        seen = reader.until(
            lambda s: any(
                t == events and CameraEvent.decode(v).objects and CameraEvent.decode(v).objects[0].oid == 2002
                for t, _, v in s
            )
        )
        assert bridge.stats.connects >= 2
    finally:
        stop.set()
        runner.join(15)
        reader.close()
        broker.stop()
        delete_topics(settings)


def _wait_disconnect(bridge: CameraBridge, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while bridge.connected.is_set():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_messages_published_while_the_bridge_is_down_arrive_when_it_is_back(stack, tmp_path) -> None:
    """The persistent session (same client id, clean_session False, QoS 1) keeps them at the broker."""
    broker = PrivateMosquitto(tmp_path).start()
    settings = isolated_camera_settings(stack, tmp_path, mqtt_port=broker.port)
    prefix = settings.cameras.mqtt_topic_prefix
    events = CAMERA_EVENTS.full_name(settings.kafka.topic_prefix)
    reader = TopicReader(settings, events)

    def bridge_running() -> tuple[CameraBridge, threading.Event, threading.Thread]:
        bridge, stop = CameraBridge(settings), threading.Event()
        thread = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
        thread.start()
        assert bridge.connected.wait(15)
        return bridge, stop, thread

    try:
        _, stop, thread = bridge_running()  # first run: the broker learns the session and subscription
        stop.set()
        thread.join(15)
        _publish(
            broker.port,
            [(f"{prefix}/merakimv/Q2MV-s2-ENTRANCE/raw_detections", _detections(oid)) for oid in (31, 32, 33)],
        )
        _, stop, thread = bridge_running()
        seen = reader.until(lambda s: len(s) >= 3)
        assert sorted(CameraEvent.decode(v).objects[0].oid for _, _, v in seen) == [31, 32, 33]
    finally:
        stop.set()
        thread.join(15)
        reader.close()
        broker.stop()
        delete_topics(settings)
