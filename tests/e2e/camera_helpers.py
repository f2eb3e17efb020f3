"""Shared pieces of the camera e2e tests: a private Mosquitto, isolated settings, reading topics."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer

from infra.settings import MqttSettings, Settings
from infra.stack import ensure_topics
from schemas.topics import ALL_TOPICS
from tests.ports import free_port


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class PrivateMosquitto:
    """A Mosquitto of this test only (its own port and data dir): it may be stopped and restarted
    without touching the shared stack's broker."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        (workdir / "mosq-data").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\npersistence true\n"
            f"persistence_location {workdir / 'mosq-data'}/\nlog_dest none\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateMosquitto:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def isolated_camera_settings(
    stack: Settings, tmp_path: Path, mqtt_port: int | None = None, **cameras: object
) -> Settings:
    """Own topics, consumer group, MQTT topic prefix (and broker port when given)."""
    name = f"cam{uuid.uuid4().hex[:8]}"
    s = stack.isolated(name, tmp_path / "checkpoints")
    update: dict[str, object] = {"cameras": s.cameras.model_copy(update={"mqtt_topic_prefix": name, **cameras})}
    if mqtt_port:
        update["mqtt"] = MqttSettings(host="127.0.0.1", port=mqtt_port)
    s = s.model_copy(update=update)
    ensure_topics(s)
    return s


def face_camera_settings(stack: Settings, tmp_path: Path) -> Settings:
    """Isolated settings for a face-stage test: a local camera on a free port, the face stage
    reading its topic from the start, fast polling."""
    return isolated_camera_settings(
        stack, tmp_path, local_port=free_port(), face_stage_offset_reset="earliest", poll_interval_s=0.25
    )


def delete_topics(settings: Settings) -> None:
    """Remove exactly this run's topics (its own prefix) from the shared broker."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka.client_config())  # kept alive until the deletes are done
    futures = admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS], operation_timeout=10)
    for future in futures.values():
        future.exception(30)  # wait (the request dies with the client otherwise); a missing topic is fine


class TopicReader:
    """Reads topics from the beginning, keeps everything seen, waits for a condition."""

    def __init__(self, settings: Settings, *topics: str) -> None:
        self.consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe(list(topics))
        self.seen: list[tuple[str, bytes | None, bytes]] = []

    def until(self, done: Callable[[list[tuple[str, bytes | None, bytes]]], bool], timeout_s: float = 60.0) -> list:
        deadline = time.monotonic() + timeout_s
        while not done(self.seen):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout_s} s; saw {len(self.seen)} records")
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.seen.append((msg.topic(), msg.key(), msg.value()))
        return self.seen

    def drain(self, seconds: float) -> list:
        """Keep reading for ``seconds`` (to see that nothing more arrives)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = self.consumer.poll(0.2)
            if msg is not None and not msg.error():
                self.seen.append((msg.topic(), msg.key(), msg.value()))
        return self.seen

    def close(self) -> None:
        self.consumer.close()
