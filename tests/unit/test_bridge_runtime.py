"""The camera bridge's wiring without brokers: Kafka retries and acks, health, exit status, MQTT login.

A fake producer stands in at the Kafka client boundary (``produce``/``poll``/``flush`` with delivery
callbacks); paho's client is real but never connects, and its ``ack`` is recorded.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import KafkaError, KafkaException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import REGISTRY

from infra.processes import StopRequest
from infra.retry import Backoff
from infra.settings import CameraSettings, MqttSettings, Settings
from producers import camera_bridge
from producers.camera_bridge import CameraBridge, load_saved_records, saved_records_path, serve
from schemas.records import CameraEvent, DeadLetter
from tests.unit.durability import DiskOrder

EVENTS, DLQ = "camera_events", "dead_letters"
GOOD = json.dumps(
    {"ts": 1_795_000_000_000, "objects": [{"oid": 7, "type": "person", "x0": 0, "y0": 0, "x1": 1, "y1": 1}]}
).encode()
TIMED_OUT = KafkaError(KafkaError._MSG_TIMED_OUT)


class FakeKafka:
    """confluent_kafka.Producer at its boundary. ``outcome(n)`` is the delivery error of the n-th produce
    (None = delivered); callbacks run on ``poll``/``flush``, as librdkafka's do."""

    def __init__(self, outcome: Callable[[int], KafkaError | None] = lambda n: None) -> None:
        self.outcome = outcome
        self.sent: list[tuple[str, bytes, bytes]] = []
        self._pending: list[tuple[int, Callable[[Any, Any], None]]] = []

    def produce(self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        self._pending.append((len(self.sent), on_delivery))
        self.sent.append((topic, key, value))

    def poll(self, timeout: float = 0) -> int:
        pending, self._pending = self._pending, []
        for n, callback in pending:
            callback(self.outcome(n), None)
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def topics(self) -> list[str]:
        return [t.rsplit(".", 1)[-1] for t, _, _ in self.sent]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _message(
    payload: bytes,
    mid: int = 1,
    topic: str = "/merakimv/Q2MV-A/raw_detections",
    retain: bool = False,
    dup: bool = False,
) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=topic.encode())
    msg.payload, msg.qos, msg.retain, msg.dup = payload, 1, retain, dup
    return msg


def _bridge(
    monkeypatch: pytest.MonkeyPatch,
    kafka: FakeKafka,
    clock: Clock | None = None,
    *,
    stack_dir: Path | None = None,
    stop_grace_s: float = 10.0,
    **mqtt_settings: Any,
) -> tuple[CameraBridge, list[int]]:
    """A bridge whose stack folder is a fresh one (records saved at a stop go there, never into the repo's)."""
    settings = Settings(
        mqtt=MqttSettings(**mqtt_settings),
        cameras=CameraSettings(bridge_stop_grace_s=stop_grace_s),
        stack_dir=stack_dir or Path(tempfile.mkdtemp(prefix="cg-bridge-test-")),
    )
    bridge = CameraBridge(settings, kafka, backoff=Backoff(initial_s=1.0, maximum_s=8.0), clock=clock or Clock())
    acks: list[int] = []
    monkeypatch.setattr(bridge.client, "ack", lambda mid, qos: acks.append(mid))
    return bridge, acks


def test_a_failed_kafka_delivery_is_produced_again_with_backoff_and_acked_only_once_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka, clock = FakeKafka(lambda n: TIMED_OUT if n < 3 else None), Clock()
    bridge, acks = _bridge(monkeypatch, kafka, clock)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=41))
    waits = []
    for _ in range(3):
        bridge.service(0)  # the delivery fails
        assert acks == [] and bridge.awaiting_retry == 1
        sent = len(kafka.sent)
        start = clock.now
        while len(kafka.sent) == sent:  # not produced again before its backoff is over
            clock.now += 0.25
            bridge.service(0)
        waits.append(clock.now - start)
    bridge.service(0)
    assert acks == [41] and bridge.awaiting_retry == 0
    assert len(kafka.sent) == 4 and len({v for _, _, v in kafka.sent}) == 1 and set(kafka.topics()) == {EVENTS}
    assert all(0.5 <= w <= 8.25 for w in waits) and waits[2] >= 2.0  # jittered, growing, capped
    assert (bridge.stats.delivery_failed, bridge.stats.published) == (3, 1)
    assert bridge.healthy()


def test_kafka_down_longer_than_the_message_timeout_does_not_wedge_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every delivery times out for a while; messages keep arriving; once Kafka is back each MQTT
    message is acknowledged exactly once, and none before its record was delivered."""
    down = [True]
    kafka, clock = FakeKafka(lambda n: TIMED_OUT if down[0] else None), Clock()
    bridge, acks = _bridge(monkeypatch, kafka, clock)
    for mid in range(1, 6):
        bridge._on_message(bridge.client, None, _message(GOOD, mid=mid))
        for _ in range(20):
            clock.now += 3.0
            bridge.service(0)
    bridge._on_message(bridge.client, None, _message(b"not json", mid=6))
    bridge.service(0)
    assert acks == [] and bridge.healthy() and len(kafka.sent) > 30  # retried all along, nothing acked
    down[0] = False
    for _ in range(10):
        clock.now += 10.0
        bridge.service(0)
    assert sorted(acks) == [1, 2, 3, 4, 5, 6]
    assert bridge.awaiting_retry == 0 and bridge.stats.published == 5 and bridge.stats.dead_lettered == 1


def test_an_event_kafka_refuses_as_too_large_is_dead_lettered_then_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = FakeKafka(lambda n: KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if n == 0 else None)
    bridge, acks = _bridge(monkeypatch, kafka)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=9))
    bridge.service(0)
    bridge.service(0)
    assert kafka.topics() == [EVENTS, DLQ] and acks == [9]
    dl = DeadLetter.decode(kafka.sent[1][2])
    assert dl.error_kind == "oversized" and dl.payload == GOOD


def test_retained_messages_redelivered_on_each_resubscribe_are_acked_and_counted_but_not_published_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = FakeKafka()
    bridge, acks = _bridge(monkeypatch, kafka)

    def ignored() -> float:
        return (
            REGISTRY.get_sample_value("cg_records_in_total", {"stage": camera_bridge.PROCESS, "kind": "ignored"}) or 0.0
        )

    before = ignored()
    bridge._on_message(bridge.client, None, _message(GOOD, mid=1))  # live: forwarded
    for mid in (2, 3):  # the same message, retained, after two reconnects
        bridge._on_message(bridge.client, None, _message(GOOD, mid=mid, retain=True))
    bridge.service(0)
    assert kafka.topics() == [EVENTS] and acks == [2, 3, 1] and bridge.healthy()
    assert bridge.stats.published == 1 and bridge.stats.ignored == {"retained": 2}
    assert ignored() - before == 2


def test_no_message_content_raises_out_of_the_paho_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = FakeKafka()
    bridge, acks = _bridge(monkeypatch, kafka)
    hostile = [
        json.dumps({"ts": 1e20, "objects": []}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ts": NaN}',
    ]
    for mid, payload in enumerate(hostile, start=1):
        bridge._on_message(bridge.client, None, _message(payload, mid=mid))
    bridge._on_message(bridge.client, None, _message(GOOD, mid=4, topic="/merakimv/../raw_detections"))
    bridge.service(0)
    assert kafka.topics() == [DLQ] * 4 and acks == [1, 2, 3, 4] and bridge.healthy()
    kinds = [DeadLetter.decode(v).error_kind for _, _, v in kafka.sent]
    assert kinds == ["invalid_timestamp", "not_json", "not_json", "invalid_id"]


def test_an_unexpected_exception_while_converting_is_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> CameraEvent:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(camera_bridge, "parse_message", broken)
    kafka = FakeKafka()
    bridge, acks = _bridge(monkeypatch, kafka)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=3))
    bridge.service(0)
    assert kafka.topics() == [DLQ] and acks == [3] and bridge.healthy()
    assert "RecursionError" in DeadLetter.decode(kafka.sent[0][2]).reason


def test_a_message_that_cannot_even_be_dead_lettered_makes_the_bridge_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Broken(FakeKafka):
        def produce(self, topic: str, **kwargs: Any) -> None:
            raise RuntimeError("producer is gone")

    bridge, acks = _bridge(monkeypatch, Broken())
    bridge._on_message(bridge.client, None, _message(GOOD))  # must not raise into paho
    assert not bridge.healthy() and "could not be forwarded" in (bridge.failure() or "") and acks == []


def test_a_fatal_producer_error_makes_the_bridge_unhealthy_and_leaves_the_message_unacked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = FakeKafka(lambda n: KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    bridge, acks = _bridge(monkeypatch, kafka)
    bridge._on_message(bridge.client, None, _message(GOOD))
    bridge.service(0)
    assert acks == [] and not bridge.healthy() and "fatally" in (bridge.failure() or "")


def test_a_dead_mqtt_network_thread_ends_the_process_with_status_1(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """paho's thread ending (here its loop returns at once) is noticed; the bridge does not idle on."""
    bridge, _ = _bridge(monkeypatch, FakeKafka(), port=1)
    monkeypatch.setattr(bridge.client, "loop_forever", lambda *a, **k: mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST)
    status: list[int] = []
    caplog.set_level(logging.ERROR, logger="producers.camera_bridge")
    runner = threading.Thread(target=lambda: status.append(serve(bridge, threading.Event())), daemon=True)
    runner.start()
    runner.join(10)
    assert not runner.is_alive() and status == [1]
    assert "exiting with status 1" in caplog.text and "network thread" in caplog.text


def test_a_stopped_bridge_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, _ = _bridge(monkeypatch, FakeKafka(), port=1)
    stop = threading.Event()
    stop.set()
    assert serve(bridge, stop) == 0


def test_the_bridge_logs_in_with_the_configured_user_and_never_logs_the_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    logins: list[tuple[str | None, str | None]] = []
    monkeypatch.setattr(
        mqtt.Client, "username_pw_set", lambda self, user, password=None: logins.append((user, password))
    )
    caplog.set_level(logging.DEBUG)
    bridge, _ = _bridge(monkeypatch, FakeKafka(), username="camera-bridge", password="s3cret-pw")
    assert logins == [("camera-bridge", "s3cret-pw")]
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(False), ReasonCode(PacketTypes.CONNACK, "Success"), None)
    refused = ReasonCode(PacketTypes.CONNACK, "Bad user name or password")
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(False), refused, None)
    assert "as camera-bridge" in caplog.text and "s3cret-pw" not in caplog.text
    assert not bridge.healthy() and "CG_MQTT__PASSWORD" in (bridge.failure() or "")
    assert "s3cret-pw" not in repr(bridge.settings)


def test_without_a_user_the_bridge_connects_anonymously(monkeypatch: pytest.MonkeyPatch) -> None:
    logins: list[object] = []
    monkeypatch.setattr(mqtt.Client, "username_pw_set", lambda self, *a, **k: logins.append(a))
    bridge, _ = _bridge(monkeypatch, FakeKafka())
    assert logins == [] and bridge.healthy()
    busy = ReasonCode(PacketTypes.CONNACK, "Server unavailable")
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(False), busy, None)
    assert bridge.healthy()  # a busy broker is retried, not fatal


def test_the_bridge_counts_as_connected_only_once_the_broker_confirms_its_subscription(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bridge, _ = _bridge(monkeypatch, FakeKafka())
    subscribed: list[str] = []
    monkeypatch.setattr(bridge.client, "subscribe", lambda topic, qos=0: subscribed.append(topic) or (0, 41))
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(False), ReasonCode(PacketTypes.CONNACK, "Success"), None)
    assert subscribed and not bridge.connected.is_set()  # what is published now would not reach us yet
    granted = [ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")]
    bridge._on_subscribe(bridge.client, None, 40, granted, None)  # another subscription's SUBACK
    assert not bridge.connected.is_set()
    bridge._on_subscribe(bridge.client, None, 41, granted, None)
    assert bridge.connected.is_set() and bridge.healthy()


def test_a_subscription_the_broker_refuses_makes_the_bridge_unhealthy(monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, _ = _bridge(monkeypatch, FakeKafka())
    monkeypatch.setattr(bridge.client, "subscribe", lambda topic, qos=0: (0, 7))
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(False), ReasonCode(PacketTypes.CONNACK, "Success"), None)
    bridge._on_subscribe(bridge.client, None, 7, [ReasonCode(PacketTypes.SUBACK, "Unspecified error")], None)
    assert not bridge.connected.is_set() and "refused the subscription" in (bridge.failure() or "")


def test_a_stopping_bridge_acknowledges_what_kafka_took_before_it_disconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Acks sent after the disconnect are lost: the broker would hand the next run every record in flight again."""
    bridge, _ = _bridge(monkeypatch, FakeKafka(), port=1)
    order: list[object] = []
    monkeypatch.setattr(bridge.client, "ack", lambda mid, qos: order.append(("ack", mid)))
    monkeypatch.setattr(bridge.client, "disconnect", lambda *a, **k: order.append("disconnect"))
    for name in ("connect_async", "loop_start", "loop_stop"):
        monkeypatch.setattr(bridge.client, name, lambda *a, **k: None)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))  # in flight: Kafka has not answered yet
    stop = threading.Event()
    stop.set()
    bridge.run(stop)
    assert order == [("ack", 5), "disconnect"]
    bridge._on_message(bridge.client, None, _message(GOOD, mid=6))  # arrives while stopping: left for next run
    assert order == [("ack", 5), "disconnect"] and len(bridge._producer.sent) == 1  # type: ignore[attr-defined]


def _reconnect(bridge: CameraBridge, monkeypatch: pytest.MonkeyPatch, session_present: bool) -> None:
    monkeypatch.setattr(bridge.client, "subscribe", lambda topic, qos=0: (0, 99))
    success = ReasonCode(PacketTypes.CONNACK, "Success")
    bridge._on_connect(bridge.client, None, mqtt.ConnectFlags(session_present), success, None)


def test_a_message_the_broker_sends_again_after_a_reconnect_is_produced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a reconnect the broker sends every unacknowledged message again (DUP): one still waiting for Kafka
    is acknowledged once Kafka has its first copy, one whose PUBACK went with the old connection at once."""
    kafka, clock = FakeKafka(lambda n: TIMED_OUT if n == 0 else None), Clock()
    bridge, acks = _bridge(monkeypatch, kafka, clock)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=41))
    bridge.service(0)  # Kafka is away: waits for another attempt
    _reconnect(bridge, monkeypatch, session_present=True)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=41, dup=True))
    for _ in range(40):
        clock.now += 0.5
        bridge.service(0)
    assert len(kafka.sent) == 2 and acks == [41]  # the first try and its retry; no second event
    assert bridge.stats.published == 1 and bridge.stats.ignored == {"redelivered": 1}

    bridge._on_message(bridge.client, None, _message(GOOD, mid=41, dup=True))  # its PUBACK was lost
    bridge.service(0)
    assert len(kafka.sent) == 2 and acks == [41, 41] and bridge.stats.published == 1

    bridge._on_message(bridge.client, None, _message(GOOD, mid=42))  # the same content, new: not a redelivery
    bridge.service(0)
    assert len(kafka.sent) == 3 and acks == [41, 41, 42]


def test_a_record_of_a_session_the_broker_lost_does_not_acknowledge_a_newer_message_with_its_packet_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker restarted without persistence starts a new session and numbers its messages afresh: the late
    acknowledgement of an old message's record would acknowledge the new one with that id before Kafka has it."""
    kafka, clock = FakeKafka(lambda n: TIMED_OUT if n == 1 else None), Clock()
    bridge, acks = _bridge(monkeypatch, kafka, clock)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))  # on its way to Kafka
    _reconnect(bridge, monkeypatch, session_present=False)
    newer = GOOD.replace(b"1795000000000", b"1795000001000")
    bridge._on_message(bridge.client, None, _message(newer, mid=5))  # its delivery fails
    bridge.service(0)
    assert acks == [] and bridge.stats.published == 1 and bridge.awaiting_retry == 1
    clock.now += 10
    bridge.service(0)
    bridge.service(0)
    assert acks == [5] and bridge.stats.published == 2  # the new message, once Kafka has it


def test_kafka_silent_for_a_while_makes_the_bridge_not_ready_before_librdkafka_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka reports a failed delivery only after message.timeout.ms (5 minutes): until then /readyz said
    ready while no record reached Kafka."""

    class Silent(FakeKafka):
        answering = False

        def poll(self, timeout: float = 0) -> int:
            return super().poll(timeout) if self.answering else 0

    kafka, clock = Silent(), Clock()
    bridge, acks = _bridge(monkeypatch, kafka, clock)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=3))
    clock.now += 2
    bridge.service(0)
    assert bridge.problem() is None  # a second or two is a slow broker, not an absent one
    clock.now += 10  # KAFKA_SILENT_S
    bridge.service(0)
    assert bridge.problem() == "Kafka unreachable" and bridge.healthy() and acks == []
    kafka.answering = True
    bridge.service(0)
    assert bridge.problem() is None and acks == [3]


def _offline(bridge: CameraBridge, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` without a broker: paho's connect, loop and disconnect do nothing."""
    for name in ("connect_async", "loop_start", "loop_stop", "disconnect"):
        monkeypatch.setattr(bridge.client, name, lambda *a, **k: None)


def _stopped() -> threading.Event:
    stop = threading.Event()
    stop.set()
    return stop


def test_a_record_the_broker_will_not_resend_is_saved_at_the_stop_and_produced_by_the_next_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka is down at the stop. A record of a session the broker lost (restarted without persistence) waits for
    its retry: the broker will never send its message again, so it is saved with the reason, not dropped; a record
    of the open session stays unacknowledged for the broker to send again. The next run produces the saved one."""
    kafka = FakeKafka(lambda n: TIMED_OUT)
    bridge, acks = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.3)
    _offline(bridge, monkeypatch)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))
    bridge.service(0)  # Kafka is away: waits for another attempt
    _reconnect(bridge, monkeypatch, session_present=False)
    newer = GOOD.replace(b"1795000000000", b"1795000001000")
    bridge._on_message(bridge.client, None, _message(newer, mid=5))  # the new session's message 5
    caplog.set_level(logging.INFO, logger="producers.camera_bridge")
    bridge.run(_stopped())
    assert acks == [] and (bridge.stats.saved, bridge.stats.left_unacked) == (1, 1)
    path = saved_records_path(bridge.settings)
    [saved] = load_saved_records(path)
    assert saved.out.value == kafka.sent[0][2] and "mqtt session has ended" in saved.reason
    assert "1 saved to" in caplog.text and "1 left unacknowledged" in caplog.text
    assert "1795000000000" not in caplog.text  # counts, not payloads

    kafka2 = FakeKafka()  # Kafka is back
    bridge2, acks2 = _bridge(monkeypatch, kafka2, stack_dir=tmp_path, stop_grace_s=0.3)
    _offline(bridge2, monkeypatch)
    bridge2.run(_stopped())
    assert kafka2.sent == [kafka.sent[0]] and acks2 == []  # nothing of this session to acknowledge
    assert bridge2.stats.published == 1 and bridge2.stats.saved == 0 and not path.exists()


def test_a_saved_file_that_cannot_be_read_is_moved_aside_not_produced_nor_overwritten(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kafka = FakeKafka()
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.3)
    _offline(bridge, monkeypatch)
    path = saved_records_path(bridge.settings)
    path.parent.mkdir(parents=True)
    path.write_text("not json\n")
    bridge.run(_stopped())
    assert kafka.sent == [] and not path.exists()
    [aside] = path.parent.glob(f"{path.name}.unreadable-*")
    assert aside.read_text() == "not json\n"


def test_a_saved_file_moved_aside_stays_aside_after_a_power_cut(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The move aside did not sync the folder: after a power cut the unreadable file could be back under the saved
    file's name, though the log said where it had gone."""
    kafka = FakeKafka()
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.3)
    path = saved_records_path(bridge.settings)
    path.parent.mkdir(parents=True)
    path.write_text("not json\n")
    bridge.resend_saved()
    [aside] = path.parent.glob(f"{path.name}.unreadable-*")
    assert disk_order.moved_durably(path, aside), disk_order.calls
    assert kafka.sent == [] and not path.exists() and aside.read_text() == "not json\n"


def test_a_saved_file_that_cannot_be_moved_aside_is_logged_as_left_in_place_and_read_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The failed move was suppressed and the log said the file had been "moved to" a name that did not exist."""
    kafka = FakeKafka()
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.3)
    path = saved_records_path(bridge.settings)
    path.parent.mkdir(parents=True)
    path.write_text("secret-payload not json\n")
    reads: list[Path] = []
    real_load = camera_bridge.load_saved_records

    def counted_load(p: Path) -> list[camera_bridge.SavedRecord]:
        reads.append(p)
        return real_load(p)

    def refused(_src: Path, _dst: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(camera_bridge, "load_saved_records", counted_load)
    monkeypatch.setattr(camera_bridge, "rename_durably", refused)
    caplog.set_level(logging.INFO, logger="producers.camera_bridge")
    bridge.resend_saved()
    for _ in range(5):
        bridge.service(0)
    assert reads == [path], "read once, at the start, not again each turn"
    assert kafka.sent == [] and path.read_text() == "secret-payload not json\n"
    [said] = [r for r in caplog.records if "saved at the last stop" in r.getMessage()]
    assert said.levelno == logging.WARNING
    assert "nor move the file aside" in said.getMessage() and "Permission denied" in said.getMessage()
    assert "moved to" not in said.getMessage() and "secret-payload" not in caplog.text


def test_a_saved_file_that_cannot_be_moved_aside_is_never_written_over_the_stop_saves_beside_it_and_both_are_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Left in place, the unreadable file was replaced by the stop's records (or removed with nothing to save): its
    content was lost, though the log said it stayed and would be read again."""
    path = saved_records_path(Settings(stack_dir=tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text("secret-payload not json\n")

    def refused(_src: Path, _dst: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(camera_bridge, "rename_durably", refused)
    [value] = _saved(tmp_path, monkeypatch, GOOD)  # Kafka down, a lost session: the stop saves one record
    assert path.read_text() == "secret-payload not json\n"
    [beside] = camera_bridge.saved_beside(path)
    assert [r.out.value for r in load_saved_records(beside)] == [value]

    kafka = FakeKafka()  # Kafka is back; the file still cannot be moved
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.2)
    _offline(bridge, monkeypatch)
    bridge.run(_stopped())  # nothing left to save at this stop
    assert [v for _, _, v in kafka.sent] == [value] and bridge.stats.saved == 0
    assert path.read_text() == "secret-payload not json\n" and camera_bridge.saved_beside(path) == []


class RefusingKafka(FakeKafka):
    """Refuses, at ``produce``, the record whose value is ``refused`` (None: every record), as librdkafka raises
    for a record over ``message.max.bytes`` (e.g. a lower limit set between two runs)."""

    def __init__(self, refused: bytes | None) -> None:
        super().__init__()
        self.refused = refused

    def produce(self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        if self.refused is None or value == self.refused:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        super().produce(topic, key=key, value=value, on_delivery=on_delivery)


def _saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *payloads: bytes) -> list[bytes]:
    """A first run with Kafka down and a lost session saves one record per payload; their event values."""
    kafka = FakeKafka(lambda n: TIMED_OUT)
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.2)
    _offline(bridge, monkeypatch)
    for mid, payload in enumerate(payloads, start=1):
        bridge._on_message(bridge.client, None, _message(payload, mid=mid))
    bridge.service(0)
    _reconnect(bridge, monkeypatch, session_present=False)
    bridge.run(_stopped())
    assert bridge.stats.saved == len(payloads)
    return [v for _, _, v in kafka.sent[: len(payloads)]]


def test_a_saved_record_kafka_refuses_at_the_next_run_is_dead_lettered_and_the_rest_still_produced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The next run's produce of one saved record raised: the bridge ended with a traceback and its stop replaced
    the saved file with what it had handed to Kafka, so the refused record and every one after it were lost."""
    first, second, third = (GOOD.replace(b"1795000000000", f"179500000{i}000".encode()) for i in range(3))
    values = _saved(tmp_path, monkeypatch, first, second, third)
    kafka = RefusingKafka(values[1])
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.2)
    _offline(bridge, monkeypatch)
    bridge.run(_stopped())
    assert kafka.topics() == [EVENTS, DLQ, EVENTS]
    assert [kafka.sent[0][2], kafka.sent[2][2]] == [values[0], values[2]]
    dl = DeadLetter.decode(kafka.sent[1][2])
    assert b"1795000001000" in dl.payload and "kafka refused" in dl.reason
    assert (bridge.stats.published, bridge.stats.dead_lettered) == (2, 1)
    assert not saved_records_path(bridge.settings).exists()


def test_a_saved_record_kafka_takes_neither_as_event_nor_as_dead_letter_is_saved_again_not_dropped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _saved(tmp_path, monkeypatch, GOOD)
    kafka = RefusingKafka(None)
    bridge, _ = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.2)
    _offline(bridge, monkeypatch)
    bridge.run(_stopped())
    [again] = load_saved_records(saved_records_path(bridge.settings))
    assert again.payload == GOOD and "kafka refused" in again.reason and bridge.stats.saved == 1


def test_the_saved_file_of_camera_records_is_readable_by_its_owner_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The records saved at a stop are where people stood in front of a camera: the file was written with the
    umask's mode (0644 as a rule), readable by every account on the host."""
    old = os.umask(0o022)
    try:
        _saved(tmp_path, monkeypatch, GOOD)
    finally:
        os.umask(old)
    path = saved_records_path(Settings(stack_dir=tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_the_saved_file_goes_once_kafka_has_its_records_so_a_crash_later_in_the_run_does_not_send_them_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The file was replaced only at the next run's stop: a run killed (SIGKILL, a crash) hours after Kafka took the
    saved records left the file, and the run after it produced every one of them a second time."""
    [value] = _saved(tmp_path, monkeypatch, GOOD)
    kafka = FakeKafka(lambda n: TIMED_OUT if n == 0 else None)  # the first try fails, the retry is delivered
    clock = Clock()
    bridge, _ = _bridge(monkeypatch, kafka, clock, stack_dir=tmp_path)
    path = saved_records_path(bridge.settings)
    bridge.resend_saved()
    bridge.service(0)
    assert path.exists()  # Kafka has not taken it yet
    clock.now += 60
    bridge.service(0)
    bridge.service(0)
    assert [v for _, _, v in kafka.sent] == [value, value] and bridge.stats.published == 1
    assert not path.exists()  # the process may die now: nothing comes twice


def _records(tag: str, n: int) -> list[camera_bridge.SavedRecord]:
    return [
        camera_bridge.SavedRecord(
            "/merakimv/Q2MV-A/raw_detections", GOOD, camera_bridge.Outgoing(False, b"k", b"v"), f"{tag}{i}"
        )
        for i in range(n)
    ]


def test_two_bridges_saving_at_once_under_one_client_id_each_write_a_whole_file_of_their_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Both wrote through one fixed tmp name: a second bridge saving while the first was writing (an old one still
    stopping beside the new one) truncated and renamed the first's tmp file, whose rename then failed (records lost)
    or mixed both sets in one file."""
    path = tmp_path / "camera-bridge" / "cg.unsent.jsonl"
    real_fsync = os.fsync
    second_done: list[bool] = []

    def fsync_then_the_other_bridge_saves(fd: int) -> None:
        if not second_done:
            second_done.append(True)
            camera_bridge.save_records(path, _records("new", 1))
        real_fsync(fd)

    monkeypatch.setattr(camera_bridge.os, "fsync", fsync_then_the_other_bridge_saves)
    camera_bridge.save_records(path, _records("old", 3))
    assert [r.reason for r in load_saved_records(path)] == ["old0", "old1", "old2"]  # the last rename's, whole
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_saved_records_survive_a_power_cut_their_folder_synced_after_the_rename(
    tmp_path: Path, disk_order: DiskOrder
) -> None:
    """Renamed with no fsync of its folder, the saved file's rename could be lost in a power cut just after the stop:
    the records Kafka had not taken, acknowledged to the broker, were then gone (or an older file came back)."""
    path = tmp_path / "camera-bridge" / "cg.unsent.jsonl"
    camera_bridge.save_records(path, _records("old", 2))
    camera_bridge.save_records(path, _records("new", 1))
    assert disk_order.replaced_durably(path), disk_order.calls
    assert [r.reason for r in load_saved_records(path)] == ["new0"]


def test_a_saved_file_removed_once_kafka_has_its_records_stays_removed_after_a_power_cut(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, disk_order: DiskOrder
) -> None:
    """Removed with a plain unlink, the removal could be lost in a power cut: the file came back and the next run
    produced its records a second time."""
    _saved(tmp_path, monkeypatch, GOOD)
    bridge, _ = _bridge(monkeypatch, FakeKafka(), stack_dir=tmp_path)
    path = saved_records_path(bridge.settings)
    bridge.resend_saved()
    bridge.service(0)
    assert not path.exists() and disk_order.removed_durably(path), disk_order.calls


def test_a_save_with_no_records_removes_the_old_file_for_good(tmp_path: Path, disk_order: DiskOrder) -> None:
    path = tmp_path / "camera-bridge" / "cg.unsent.jsonl"
    camera_bridge.save_records(path, _records("old", 2))
    camera_bridge.save_records(path, [])
    assert not path.exists() and disk_order.removed_durably(path), disk_order.calls


def test_the_first_saved_records_survive_a_power_cut_with_their_new_folder(
    tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The bridge's folder was made without syncing the stack folder: a power cut could take the new folder and the
    records saved in it, which the broker will not send again."""
    path = tmp_path / "stack" / "camera-bridge" / "cg.unsent.jsonl"
    camera_bridge.save_records(path, _records("old", 1))
    assert disk_order.made_durably(path.parent) and disk_order.made_durably(path.parent.parent), disk_order.calls
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_save_that_fails_half_way_leaves_no_tmp_file_and_the_old_saved_file_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "camera-bridge" / "cg.unsent.jsonl"
    camera_bridge.save_records(path, _records("old", 2))

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(camera_bridge.os, "fsync", disk_full)
    with pytest.raises(OSError):
        camera_bridge.save_records(path, _records("new", 1))
    assert [r.reason for r in load_saved_records(path)] == ["old0", "old1"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_retry_kafka_has_no_room_for_at_the_stop_is_given_up_by_the_end_of_the_drain_and_left_unacked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At the stop the bridge produces its waiting retries at once; with Kafka away and the producer's local queue
    full, each waited for room for ever, past the supervisor's SIGKILL, and nothing was saved. A retry is given up
    when the stop's drain (``CG_CAMERAS__BRIDGE_STOP_GRACE_S``) ends, and left unacknowledged for the broker to send
    again."""
    room = threading.Event()

    class Full(FakeKafka):
        def produce(self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
            if self.sent and not room.is_set():  # the first try went in; the queue has been full since
                raise BufferError("Local: Queue full")
            super().produce(topic, key=key, value=value, on_delivery=on_delivery)

    kafka = Full(lambda n: TIMED_OUT)
    bridge, acks = _bridge(monkeypatch, kafka, stack_dir=tmp_path, stop_grace_s=0.3)
    _offline(bridge, monkeypatch)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))
    bridge.service(0)  # Kafka is away: waits for another attempt
    assert bridge.awaiting_retry == 1
    worker = threading.Thread(target=bridge.run, args=(_stopped(),), daemon=True)
    try:
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "the stop still waits for room in Kafka's queue"
    finally:
        room.set()  # without the fix: lets the stuck stop end
    assert acks == [] and bridge.stats.left_unacked == 1 and len(kafka.sent) == 1


def test_the_stop_grace_counts_from_the_stop_s_arrival_not_from_the_end_of_the_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The grace (``CG_CAMERAS__BRIDGE_STOP_GRACE_S``) counted from when the loop got round to the stop: the time
    the loop took after the SIGTERM was not counted, and the drain ran that much past the supervisor's SIGKILL."""
    bridge, acks = _bridge(monkeypatch, FakeKafka(lambda n: TIMED_OUT), stack_dir=tmp_path, stop_grace_s=2.0)
    _offline(bridge, monkeypatch)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))
    stop = StopRequest()
    stop.set()
    assert stop.asked_at is not None
    stop.asked_at -= 2.0  # the loop took the whole grace after the SIGTERM
    started = time.monotonic()
    bridge.run(stop)
    assert time.monotonic() - started < 1.0
    assert acks == [] and bridge.stats.left_unacked == 1


def test_a_stop_asked_while_the_loop_waits_for_room_in_kafka_ends_within_its_grace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A retry the run loop produced with Kafka away and the local queue full waited for room for ever: a SIGTERM
    meanwhile never reached the stop, and the supervisor's SIGKILL came with nothing saved."""
    room = threading.Event()

    class Full(FakeKafka):
        def produce(self, topic: str, *, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
            if self.sent and not room.is_set():  # the first try went in; the queue has been full since
                raise BufferError("Local: Queue full")
            super().produce(topic, key=key, value=value, on_delivery=on_delivery)

    clock = Clock()
    bridge, acks = _bridge(monkeypatch, Full(lambda n: TIMED_OUT), clock, stack_dir=tmp_path, stop_grace_s=0.5)
    _offline(bridge, monkeypatch)
    bridge._on_message(bridge.client, None, _message(GOOD, mid=5))
    bridge.service(0)  # Kafka is away: waits for another attempt
    clock.now += 60  # that attempt is due: the loop's produce waits for room
    monkeypatch.setattr(bridge, "failure", lambda: None)  # no paho network thread here to watch
    stop = StopRequest()
    worker = threading.Thread(target=bridge.run, args=(stop,), daemon=True)
    try:
        worker.start()
        time.sleep(0.3)
        stop.set()
        worker.join(3)
        assert not worker.is_alive(), "the stop still waits for room in Kafka's queue"
    finally:
        room.set()  # without the fix: lets the stuck loop end
        worker.join(5)
    assert acks == [] and bridge.stats.left_unacked == 1
