"""MV Sense MQTT -> Kafka: every camera message becomes a ``CameraEvent`` keyed by camera serial.

Input: ``/merakimv/<serial>/raw_detections`` (tracked objects with their ``oid``) and
``/merakimv/<serial>/<zoneId>`` (zone counts; zone ``0`` = the whole frame) from the broker in
``settings.mqtt``. Other camera topics (``light``, ``audio_detections``, ``custom_analytics``, ...)
are ignored and counted; a payload we cannot read becomes a ``DeadLetter`` naming the MQTT topic and why.

Delivery: QoS 1 subscription on a persistent session (``clean_session=False``, a stable client id),
and each MQTT message is acknowledged (PUBACK) only after Kafka acknowledged the record made from it
(``manual_ack``): a crash or a broker restart loses nothing; a redelivery makes an identical record
(same key, same content). paho reconnects by itself and we resubscribe on every connect, so a
Mosquitto restart without persistence is survived too. Output: ``camera_events`` / ``dead_letters``
through an idempotent producer with delivery callbacks.

Run: ``python -m producers.camera_bridge`` (Ctrl-C / SIGTERM stops after flushing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from confluent_kafka import KafkaError, Producer

from infra.clients import kafka as kafka_clients
from infra.clock import now_ms
from infra.settings import Settings, get_settings
from schemas.errors import InvalidRecord
from schemas.records import CameraEvent, DeadLetter, DetectedObject, dead_letter
from schemas.topics import CAMERA_EVENTS, DEAD_LETTERS

log = logging.getLogger("producers.camera_bridge")

STAGE = "camera_bridge"
_ZONE_RE = re.compile(r"^\d+$")
_BOX = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message we deliberately do not forward; ``what`` is counted (e.g. ``light``)."""

    what: str


# --------------------------------------------------------------------------------------------------
# Pure parsing


def _number(obj: dict, name: str, where: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRecord("invalid", f"{where}: {name!r} must be a number, got {value!r}")
    return float(value)


def _int(obj: dict, name: str, where: str) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidRecord("invalid", f"{where}: {name!r} must be an integer, got {value!r}")
    return value


def parse_message(topic: str, payload: bytes, prefix: str = "", max_bytes: int = 256 * 1024) -> CameraEvent | Ignored:
    """One MQTT message as a :class:`CameraEvent`, :class:`Ignored`, or :class:`InvalidRecord` raised."""
    route = _route(topic, prefix)
    if isinstance(route, Ignored):
        return route
    serial, sub = route
    body = _body(payload, max_bytes)
    ts = _int(body, "ts", "message")
    if ts <= 0:
        raise InvalidRecord("invalid", f"ts must be epoch milliseconds, got {ts}")
    if sub == "raw_detections":
        return CameraEvent(serial, ts, topic, "RAW_DETECTIONS", None, _detections(body), {})
    return CameraEvent(serial, ts, topic, "ZONE_COUNT", sub, (), _zone_counts(body))


def _route(topic: str, prefix: str) -> tuple[str, str] | Ignored:
    """``(serial, subtopic)`` of a camera topic we forward, else what to count it as."""
    if prefix and not topic.startswith(prefix):
        return Ignored("foreign_topic")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 4 or parts[0] or parts[1] != "merakimv" or not parts[2]:
        return Ignored("foreign_topic")
    serial, sub = parts[2], parts[3]
    if sub != "raw_detections" and not _ZONE_RE.match(sub):
        return Ignored(sub or "empty_subtopic")
    return serial, sub


def _body(payload: bytes, max_bytes: int) -> dict:
    """The payload as a JSON object (``oversized``, ``not_json`` or ``invalid`` raised)."""
    if len(payload) > max_bytes:
        raise InvalidRecord("oversized", f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRecord("not_json", f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRecord("invalid", f"payload must be a JSON object, got {type(body).__name__}")
    return body


def _detections(body: dict) -> tuple[DetectedObject, ...]:
    """A ``raw_detections`` message's ``objects``."""
    objects = body.get("objects")
    if not isinstance(objects, list):
        raise InvalidRecord("invalid", "raw_detections: 'objects' must be a list")
    parsed = []
    for i, obj in enumerate(objects):
        where = f"objects[{i}]"
        if not isinstance(obj, dict):
            raise InvalidRecord("invalid", f"{where} must be an object")
        kind = obj.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidRecord("invalid", f"{where}: 'type' must be a non-empty string")
        frame = _int(obj, "frame", where) if obj.get("frame") is not None else None
        parsed.append(
            DetectedObject(_int(obj, "oid", where), kind, *(_number(obj, b, where) for b in _BOX), frame=frame)
        )
    return tuple(parsed)


def _zone_counts(body: dict) -> dict[str, int]:
    """A zone message's ``counts`` (object name -> non-negative count)."""
    counts = body.get("counts")
    if not isinstance(counts, dict):
        raise InvalidRecord("invalid", "zone message: 'counts' must be an object")
    clean = {}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRecord("invalid", f"zone message: count of {name!r} must be a non-negative integer")
        clean[str(name)] = value
    return clean


def mqtt_dead_letter(topic: str, payload: bytes, error: InvalidRecord, failed_at: int) -> DeadLetter:
    """A bad MQTT message; MQTT has no offsets, so the id is the topic + a hash of the payload
    (a redelivered duplicate gets the same id)."""
    digest = hashlib.sha256(payload).hexdigest()[:16]
    return dead_letter(
        topic=topic,
        partition=-1,
        offset=-1,
        key=None,
        value=payload,
        error=error,
        stage=STAGE,
        failed_at=failed_at,
        dead_letter_id=f"mqtt:{topic}:{digest}",
    )


# --------------------------------------------------------------------------------------------------
# The bridge


@dataclass
class BridgeStats:
    received: int = 0
    published: int = 0
    dead_lettered: int = 0
    delivery_failed: int = 0
    connects: int = 0
    ignored: Counter = field(default_factory=Counter)


def make_producer(settings: Settings) -> Producer:
    return kafka_clients.producer(settings, kafka_clients.RELIABLE, client_id="checkout-guard-camera-bridge")


def client_id(settings: Settings) -> str:
    """Stable per environment: the broker keeps our session (subscription, unacked messages) across reconnects."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", settings.kafka.topic_prefix.strip(".")) or "main"
    return f"checkout-guard-camera-bridge-{name}"


class CameraBridge:
    """Wires :func:`parse_message` between paho (loop thread) and a Kafka producer (``run`` thread)."""

    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.settings = settings
        self.prefix = settings.cameras.mqtt_topic_prefix
        self.stats = BridgeStats()
        self.connected = threading.Event()
        self._producer = producer or make_producer(settings)
        self._events_topic = CAMERA_EVENTS.full_name(settings.kafka.topic_prefix)
        self._dlq_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(settings), clean_session=False, manual_ack=True
        )
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._lock = threading.Lock()

    # paho callbacks (loop thread)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt connect refused: %s", reason)
            return
        client.subscribe(f"{self.prefix}/merakimv/#", qos=1)
        self.stats.connects += 1
        self.connected.set()
        log.info(
            "connected to mqtt %s:%s (session present: %s)",
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            _f.session_present,
        )

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        log.warning("mqtt disconnected (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats.received += 1
        now = now_ms()
        try:
            result = parse_message(msg.topic, msg.payload, self.prefix, self.settings.job.max_message_bytes)
        except InvalidRecord as exc:
            dl = mqtt_dead_letter(msg.topic, msg.payload, exc, now)
            self._send(self._dlq_topic, dl.dead_letter_id.encode(), dl.encode(), msg, dead=True)
            return
        if isinstance(result, Ignored):
            self.stats.ignored[result.what] += 1
            self._ack(msg)
            return
        self._send(self._events_topic, result.camera_serial.encode(), result.encode(), msg, dead=False)

    # Kafka side

    def _send(self, topic: str, key: bytes, value: bytes, msg: mqtt.MQTTMessage, dead: bool) -> None:
        def delivered(err: KafkaError | None, _m: object) -> None:
            if err is not None:
                self.stats.delivery_failed += 1
                log.error("kafka delivery failed (%s); the mqtt message stays unacknowledged", err)
                return
            if dead:
                self.stats.dead_lettered += 1
            else:
                self.stats.published += 1
            self._ack(msg)

        # A full local queue is drained by the run loop's poll(), not by this (paho) thread: sleep, not poll.
        kafka_clients.produce(self._producer, topic, key, value, delivered, wait=time.sleep)

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            with self._lock:
                self._client.ack(msg.mid, msg.qos)

    def run(self, stop: threading.Event, on_tick: Callable[[BridgeStats], None] | None = None) -> BridgeStats:
        """Connect (retrying until the broker answers), forward until ``stop`` is set, then flush."""
        self._client.connect_async(self.settings.mqtt.host, self.settings.mqtt.port, keepalive=15)
        self._client.loop_start()
        try:
            while not stop.is_set():
                self._producer.poll(0.1)
                if on_tick:
                    on_tick(self.stats)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self._producer.flush(10)
        return self.stats


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[camera-bridge] %(message)s")
    settings = get_settings()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    last = [time.monotonic()]

    def report(stats: BridgeStats) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            log.info(
                "received %d, published %d, dead-lettered %d, ignored %s, delivery failures %d",
                stats.received,
                stats.published,
                stats.dead_lettered,
                dict(stats.ignored),
                stats.delivery_failed,
            )

    try:
        CameraBridge(settings).run(stop, report)
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
