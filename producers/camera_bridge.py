"""MV Sense MQTT -> Kafka: every camera message becomes a ``CameraEvent`` keyed by camera serial.

Input: ``/merakimv/<serial>/raw_detections`` (tracked objects with their ``oid``) and
``/merakimv/<serial>/<zoneId>`` (zone counts; zone ``0`` = the whole frame) from the broker in
``settings.mqtt`` (logging in with ``settings.mqtt.username``/``password`` when set). Other camera
topics (``light``, ``audio_detections``, ``custom_analytics``, ...) are ignored and counted, and so is
a retained message (:data:`RETAINED`): the broker hands it over because we (re)subscribed, on every
reconnect again, so it is the camera's last state, not a new event.

No message stops the bridge: whatever cannot be turned into a record -- not JSON, nested deeper
than :data:`MAX_JSON_DEPTH`, oversized, a number out of range (``ts`` outside
[:data:`MIN_TS_MS`, :data:`MAX_TS_MS`], negative or huge counts and ids), a serial in the topic that
is not an identifier, or any exception at all while converting it -- becomes a ``DeadLetter`` naming
the MQTT topic and why. An exception in paho's callback would end paho's network thread while the
process looked alive, and the persistent session would hand the same message to the next run.

Delivery: QoS 1 subscription on a persistent session (``clean_session=False``, a stable client id),
and each MQTT message is acknowledged (PUBACK) only after Kafka acknowledged the record made from it
(``manual_ack``, ``acks=all``): a crash or a broker restart loses nothing; a redelivery to the next
run makes an identical record (same key, same content). Within a run, the broker's redelivery after a
reconnect (DUP flag) of a message already produced is not produced again (:data:`REDELIVERED`), and
records of a session the broker lost (no session present at the reconnect) acknowledge nothing.
A failed Kafka delivery (a broker down longer than ``message.timeout.ms`` included) is produced
again with jittered backoff until it is delivered; the unacknowledged MQTT messages meanwhile hold
the broker's in-flight window, which is the backpressure. paho reconnects by itself and we
resubscribe on every connect, so a Mosquitto restart without
persistence is survived too. Output: ``camera_events`` / ``dead_letters``.

Stopping: Kafka gets ``CG_CAMERAS__BRIDGE_STOP_GRACE_S`` to take what the bridge has accepted (waiting
retries are tried once more at once). A record still not taken then whose MQTT message the broker will
send again (unacknowledged, in the session still open) is left to that; one it will never send again (its
session ended, or QoS 0) is saved with the reason to :func:`saved_records_path` and produced first by the
next run (:func:`save_records`, :func:`load_saved_records`): at least once, never dropped without a word.

Health: :meth:`CameraBridge.healthy` is false once paho's network thread has ended, the Kafka producer
failed fatally, the MQTT broker refused our login, or a message could not even be dead-lettered;
``run`` then raises :class:`BridgeFailed` and the process logs why and exits with status 1, so a
supervisor restarts it instead of it idling while looking alive. ``/healthz`` (``infra.metrics``) is
liveness: 503 when the run loop stops turning, 200 ``degraded: ...`` with the reason otherwise; ``/readyz``
turns 503 while the MQTT broker is away ("MQTT unreachable") or Kafka deliveries wait to be retried
("Kafka unreachable"), so that a supervisor never restarts a bridge that only waits for a broker.

Metrics (stage ``camera-bridge``): MQTT messages in by kind (``raw_detections``, ``zone_count``, ``ignored``,
``invalid``), camera events out by kind once Kafka acknowledged them, dead letters by error kind, and the
queue depth ``delivery_retries``.

Run: ``python -m producers.camera_bridge`` (Ctrl-C / SIGTERM stops after draining (see Stopping), and acknowledges what
Kafka took before it disconnects).
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import paho.mqtt.client as mqtt
import typer
from confluent_kafka import KafkaError, KafkaException, Producer

from infra import metrics
from infra.clients import kafka as kafka_clients
from infra.clock import now_ms
from infra.durable import make_dirs_durably, remove_durably, rename_durably, replace_durably
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import StopRequest, stop_asked_at, stop_on_signals
from infra.retry import Backoff
from infra.settings import Settings, get_settings
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import check_serial
from schemas.records import CameraEvent, DeadLetter, DetectedObject, dead_letter
from schemas.topics import CAMERA_EVENTS, DEAD_LETTERS

log = logging.getLogger("producers.camera_bridge")

STAGE = "camera_bridge"
PROCESS = "camera-bridge"
"""The ``stage`` label of this process's metrics (its name in ``infra.metrics.PROCESSES``)."""
_ZONE_RE = re.compile(r"[0-9]{1,20}")
_BOX = ("x0", "y0", "x1", "y1")

MIN_TS_MS = 946_684_800_000
"""2000-01-01T00:00:00Z: ``ts`` is epoch milliseconds. An earlier one is no MV camera's (they came in 2016): most
likely epoch seconds (about 1.8e9 now), which read as January 1970 and made every event hours late, silently
(the face stage skips entrances that late). A camera whose clock is only years behind is the job's ``too_late``."""
MAX_TS_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z: a far-future ``ts`` would stall event time downstream (and 1e20 overflows Avro long)."""
MAX_LONG = 2**63 - 1
"""Avro ``long``: object ids and frame numbers."""
MAX_COUNT = 100_000
"""A zone count above this is no camera frame's (and Avro ``int`` ends at 2**31 - 1)."""
MAX_NAME_CHARS = 64
"""Object types and count names (``person``, ``vehicle``)."""
MAX_JSON_DEPTH = 16
"""MV Sense payloads nest three levels; deeper ones are refused before ``json.loads`` recurses."""
OTHER_SUBTOPIC = "other_subtopic"
"""What an ignored subtopic is counted as when it is no identifier, or when :data:`MAX_IGNORED_KINDS`
are counted already: a publisher of random topics cannot grow the counter without bound."""
MAX_IGNORED_KINDS = 64
RETAINED = "retained"
"""What a message with the MQTT retain flag is counted as. A broker sets the flag only on what it sends
because of a new subscription (MQTT 3.1.1, 3.3.1.3); live messages and those queued in our session
come without it. The bridge subscribes again on every connect, so forwarding these would publish the
same camera event again after each reconnect."""
REDELIVERED = "redelivered"
"""What a message is counted as when the broker sends it again after a reconnect (DUP flag) and its record was
produced already (:meth:`CameraBridge._redelivered`): it is not produced a second time."""
AUTH_REFUSED = ("Bad user name or password", "Not authorized")
"""CONNACK reasons that retrying cannot fix: the bridge exits instead of looking connected-ish forever."""
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD})
"""Delivery errors that no retry fixes for that record: it is dead-lettered instead."""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message we deliberately do not forward; ``what`` is counted (e.g. ``light``)."""

    what: str


@dataclass(frozen=True, slots=True)
class Outgoing:
    """The Kafka record one MQTT message becomes: its camera event, or its dead letter (``dead``)."""

    dead: bool
    key: bytes
    value: bytes
    kind: str = ""
    """Metric label: the event kind (``raw_detections``, ``zone_count``), or the dead letter's error kind."""


# --------------------------------------------------------------------------------------------------
# Pure parsing


def _shown(value: object) -> str:
    """``value`` for a reason: short, since it may be a hostile payload and reasons are logged."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _int(obj: dict, name: str, where: str, low: int, high: int, kind: str = "invalid") -> int:
    """An integer in ``[low, high]`` (else ``kind``); an integral float (``5.0``) counts, a bool does not."""
    value = obj.get(name)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecord("invalid", f"{where}: {name!r} must be an integer, got {_shown(value)}")
    if not low <= value <= high:
        raise InvalidRecord(kind, f"{where}: {name!r} = {_shown(value)} is outside [{low}, {high}]")
    return value


def _fraction(obj: dict, name: str, where: str) -> float:
    """A box coordinate: a fraction of the frame, 0 to 1."""
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise InvalidRecord("invalid", f"{where}: {name!r} must be a number from 0 to 1, got {_shown(value)}")
    return float(value)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise InvalidRecord("invalid", f"{what} must be a string of 1 to {MAX_NAME_CHARS} characters")
    return value


def parse_message(topic: str, payload: bytes, prefix: str = "", max_bytes: int = 256 * 1024) -> CameraEvent | Ignored:
    """One MQTT message as a :class:`CameraEvent`, :class:`Ignored`, or :class:`InvalidRecord` raised."""
    route = _route(topic, prefix)
    if isinstance(route, Ignored):
        return route
    serial, sub = route
    body = _body(payload, max_bytes)
    ts = _timestamp(body)
    if sub == "raw_detections":
        return CameraEvent(serial, ts, topic, "RAW_DETECTIONS", None, _detections(body), {})
    return CameraEvent(serial, ts, topic, "ZONE_COUNT", sub, (), _zone_counts(body))


def _timestamp(body: dict) -> int:
    """``ts`` in epoch milliseconds from :data:`MIN_TS_MS` to :data:`MAX_TS_MS` (``invalid_timestamp`` raised,
    saying so when it would be in range as epoch seconds)."""
    try:
        return _int(body, "ts", "message", MIN_TS_MS, MAX_TS_MS, kind="invalid_timestamp")
    except InvalidRecord as exc:
        value = body.get("ts")
        if isinstance(value, int | float) and MIN_TS_MS / 1000 <= value <= MAX_TS_MS / 1000:
            raise InvalidRecord(exc.kind, f"{exc.reason}: epoch seconds? MV Sense sends milliseconds") from None
        raise


def _route(topic: str, prefix: str) -> tuple[str, str] | Ignored:
    """``(serial, subtopic)`` of a camera topic we forward, else what to count it as.

    The serial becomes the record key and, downstream, part of Meraki API paths: one that is not an
    identifier is ``invalid_id`` (a dead letter), not a topic to ignore.
    """
    if prefix and not topic.startswith(prefix):
        return Ignored("foreign_topic")
    parts = topic[len(prefix) :].split("/")
    if len(parts) != 4 or parts[0] or parts[1] != "merakimv" or not parts[2]:
        return Ignored("foreign_topic")
    serial, sub = parts[2], parts[3]
    if sub != "raw_detections" and not _ZONE_RE.fullmatch(sub):
        return Ignored(sub if sub.isidentifier() and len(sub) <= MAX_NAME_CHARS else OTHER_SUBTOPIC)
    return check_serial(serial), sub


_JSON_TOKEN = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays/objects deeper than ``limit`` (brackets in strings do not count).

    Linear: one regex step per string or bracket, and it stops at the first level past ``limit``; a
    payload with no more than ``limit`` opening brackets is not scanned at all.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, pos = 0, 0
    while (token := _JSON_TOKEN.search(text, pos)) is not None:
        char, pos = token.group(), token.end()
        if char == '"':
            end = _STRING_REST.match(text, pos)
            if end is None:
                return False  # an unterminated string: json.loads says what is wrong
            pos = end.end()
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are all different: ``json.loads`` kept the last of two ``ts`` or ``objects``
    without a word, so which one counted was a guess (a second, empty ``objects`` dropped every detection)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        twice = next(name for name, n in Counter(name for name, _ in pairs).items() if n > 1)
        raise InvalidRecord("invalid", f"payload names {_shown(twice)} more than once in one object")
    return obj


def _body(payload: bytes, max_bytes: int) -> dict:
    """The payload as a JSON object (``oversized``, ``not_json`` or ``invalid`` raised).

    Size and depth are checked before ``json.loads``: its recursion ends in a RecursionError (caught
    too, as a last resort), not a ValueError. ``NaN``/``Infinity`` are not JSON and are refused, and so
    is an object that names a field twice (``invalid``).
    """
    if len(payload) > max_bytes:
        raise InvalidRecord("oversized", f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRecord("not_json", f"payload is not JSON: not UTF-8 at byte {exc.start}") from None
    if json_too_deep(text):
        raise InvalidRecord("not_json", f"payload is not JSON we accept: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except InvalidRecord:
        raise
    except ValueError as exc:
        raise InvalidRecord("not_json", f"payload is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidRecord("not_json", "payload is not JSON we accept: nested too deeply") from None
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
        kind = _name(obj.get("type"), f"{where}: 'type'")
        frame = _int(obj, "frame", where, 0, MAX_LONG) if obj.get("frame") is not None else None
        oid = _int(obj, "oid", where, 0, MAX_LONG)
        x0, y0, x1, y1 = (_fraction(obj, b, where) for b in _BOX)
        parsed.append(DetectedObject(oid, kind, x0, y0, x1, y1, frame=frame))
    return tuple(parsed)


def _zone_counts(body: dict) -> dict[str, int]:
    """A zone message's ``counts`` (object name -> count from 0 to :data:`MAX_COUNT`)."""
    counts = body.get("counts")
    if not isinstance(counts, dict):
        raise InvalidRecord("invalid", "zone message: 'counts' must be an object")
    clean = {}
    for name, value in counts.items():
        _name(name, "zone message: a count's name")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise InvalidRecord(
                "invalid", f"zone message: count of {_shown(name)} must be a non-negative integer up to {MAX_COUNT}"
            )
        clean[name] = value
    return clean


def mqtt_dead_letter(topic: str, payload: bytes, error: InvalidRecord, failed_at: int) -> DeadLetter:
    """A bad MQTT message; MQTT has no offsets, so the id is the topic + a hash of topic and payload
    (a redelivered duplicate gets the same id; a long hostile topic is cut in the id, not in the hash)."""
    digest = hashlib.sha256(topic.encode("utf-8", "replace") + b"\0" + payload).hexdigest()[:16]
    return dead_letter(
        topic=topic,
        partition=-1,
        offset=-1,
        key=None,
        value=payload,
        error=error,
        stage=STAGE,
        failed_at=failed_at,
        dead_letter_id=f"mqtt:{topic[:200]}:{digest}",
    )


def convert(
    topic: str, payload: bytes, prefix: str, max_bytes: int, failed_at: int, retained: bool = False
) -> Outgoing | Ignored:
    """What one MQTT message becomes: its event, :class:`Ignored` (``retained`` ones too, unread: see
    :data:`RETAINED`), or -- whatever goes wrong, even an exception no parser anticipated -- its dead
    letter. Never raises for a message's content."""
    if retained:
        return Ignored(RETAINED)
    try:
        result = parse_message(topic, payload, prefix, max_bytes)
        if isinstance(result, Ignored):
            return result
        return Outgoing(False, result.camera_serial.encode(), result.encode(), result.kind.lower())
    except InvalidRecord as exc:
        error = exc
    except Exception as exc:  # the bridge must outlive any message; the dead letter says what happened
        error = InvalidRecord("invalid", f"cannot convert the message: {type(exc).__name__}: {str(exc)[:200]}")
    dl = mqtt_dead_letter(topic, payload, error, failed_at)
    return Outgoing(True, dl.dead_letter_id.encode(), dl.encode(), error.kind)


# --------------------------------------------------------------------------------------------------
# The bridge


@dataclass
class BridgeStats:
    received: int = 0
    published: int = 0
    dead_lettered: int = 0
    delivery_failed: int = 0
    """Failed Kafka deliveries, each of which was produced again (or dead-lettered, if too large)."""
    connects: int = 0
    ignored: Counter = field(default_factory=Counter)
    saved: int = 0
    """Records Kafka had not taken at the stop, saved for the next run (their MQTT message is not sent again)."""
    left_unacked: int = 0
    """Records Kafka had not taken at the stop whose MQTT message stays unacknowledged for the broker to resend."""


class BridgeFailed(CheckoutGuardError, RuntimeError):
    """The bridge can no longer make progress (see :meth:`CameraBridge.failure`); the process should exit."""


KAFKA_SILENT_S = 10.0
"""A record without Kafka's answer for this long means Kafka is away: librdkafka keeps trying for
``message.timeout.ms`` (5 minutes) before it reports the failure, and ``/readyz`` said ready meanwhile."""


DELIVERY_BACKOFF = Backoff(initial_s=0.5, maximum_s=30.0)
"""Between Kafka delivery attempts of one record: a long outage is still probed twice a minute."""


@dataclass(frozen=True, slots=True)
class _Retry:
    at: float
    out: Outgoing
    msg: mqtt.MQTTMessage
    attempt: int


@dataclass(frozen=True, slots=True)
class _Unanswered:
    """A record on its way to Kafka: since when (the bridge's clock), and what to save if Kafka never answers."""

    since: float
    out: Outgoing
    msg: mqtt.MQTTMessage


@dataclass(frozen=True, slots=True)
class SavedRecord:
    """A record Kafka had not taken when the bridge stopped, and whose MQTT message the broker will not resend."""

    mqtt_topic: str
    payload: bytes
    out: Outgoing
    reason: str


def saved_records_path(settings: Settings) -> Path:
    """One file per environment (the MQTT client id's), under the stack folder."""
    return settings.stack_dir / "camera-bridge" / f"{client_id(settings)}.unsent.jsonl"


SAVED_BESIDE = ".more-"
"""What a stop saves under ``<saved file's name>.more-<ms>`` when the saved file is one the bridge could neither read
nor move aside (:func:`saved_beside`): written over, its content was lost."""


def saved_beside(path: Path) -> list[Path]:
    """The files saved beside ``path`` (:data:`SAVED_BESIDE`), oldest first: the next start reads them with it. A
    file of theirs moved aside as unreadable (``….unreadable-<ms>``) is not one of them."""
    prefix = path.name + SAVED_BESIDE
    found = [(p.name[len(prefix) :], p) for p in path.parent.glob(f"{glob.escape(prefix)}*")]
    return [p for _, p in sorted((int(ms), p) for ms, p in found if ms.isascii() and ms.isdigit())]


def new_saved_beside(path: Path) -> Path:
    """A name beside ``path`` that no file has yet: a stop never writes over a file saved before."""
    ms = now_ms()
    while (beside := path.with_name(f"{path.name}{SAVED_BESIDE}{ms}")).exists():
        ms += 1
    return beside


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def save_records(path: Path, records: list[SavedRecord]) -> None:
    """Replace ``path`` with ``records`` durably (:func:`infra.durable.replace_durably`: a crash or power cut leaves
    the old file or the new one); no records removes it. One JSON object a line, bytes in base64. The records say
    where people stood in front of a camera: the file is its owner's only (0600, in a 0700 folder), whatever the
    umask. Its temporary file's name is new for each write (two bridges of one client id, an old one still stopping
    beside the new one, never write into each other's), and a write that fails removes it. The removal syncs the
    folder too (:func:`infra.durable.remove_durably`): a file that came back after a power cut was produced again."""
    if not records:
        if path.exists():
            remove_durably(path)
        return
    make_dirs_durably(path.parent, mode=0o700)  # a first save's new folder is synced into its parent too
    os.chmod(path.parent, 0o700)
    lines = [
        json.dumps(
            {
                "mqtt_topic": r.mqtt_topic,
                "payload": _b64(r.payload),
                "dead": r.out.dead,
                "key": _b64(r.out.key),
                "value": _b64(r.out.value),
                "kind": r.out.kind,
                "reason": r.reason,
            }
        )
        + "\n"
        for r in records
    ]
    replace_durably(path, "".join(lines), mode=0o600)


def load_saved_records(path: Path) -> list[SavedRecord]:
    """What :func:`save_records` wrote (none without a file); ValueError or OSError for a file it did not write."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        out = Outgoing(bool(d["dead"]), base64.b64decode(d["key"]), base64.b64decode(d["value"]), str(d["kind"]))
        records.append(SavedRecord(str(d["mqtt_topic"]), base64.b64decode(d["payload"]), out, str(d["reason"])))
    return records


MAX_REMEMBERED = 4096
"""Messages remembered as forwarded, so that the broker's redelivery of one (after a reconnect) is not forwarded
again: about as many as are unacknowledged at once (the broker's in-flight window) and what came in just before
a reconnect, whose PUBACK paho dropped with the connection."""


@dataclass(slots=True)
class _Forwarded:
    """A message turned into a record: its fingerprint, the broker session it came in, and whether Kafka has it."""

    fingerprint: bytes
    session: int
    delivered: bool = False


def _fingerprint(msg: mqtt.MQTTMessage) -> bytes:
    return hashlib.sha256(_topic_of(msg).encode("utf-8", "replace") + b"\0" + bytes(msg.payload)).digest()


def make_producer(settings: Settings) -> Producer:
    return kafka_clients.producer(settings, kafka_clients.RELIABLE, client_id="checkout-guard-camera-bridge")


def client_id(settings: Settings) -> str:
    """Stable per environment: the broker keeps our session (subscription, unacked messages) across reconnects."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", settings.kafka.topic_prefix.strip(".")) or "main"
    return f"checkout-guard-camera-bridge-{name}"


def _topic_of(msg: mqtt.MQTTMessage) -> str:
    """The message's topic; paho's ``topic`` raises on bytes that are not UTF-8."""
    try:
        return msg.topic
    except UnicodeDecodeError:
        return bytes(msg._topic).decode("utf-8", "replace")


def _fatal(err: KafkaError) -> bool:
    return bool(getattr(err, "fatal", lambda: False)())


def _refusal_kind(err: object) -> str:
    """``oversized`` when Kafka refused a record for its size, else ``refused``."""
    if isinstance(err, KafkaException) and err.args:
        err = err.args[0]
    code = getattr(err, "code", None)
    return "oversized" if callable(code) and code() in _TOO_LARGE else "refused"


class CameraBridge:
    """Wires :func:`convert` between paho (network thread) and a Kafka producer (``run`` thread)."""

    def __init__(
        self,
        settings: Settings,
        producer: Producer | None = None,
        *,
        backoff: Backoff = DELIVERY_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.prefix = settings.cameras.mqtt_topic_prefix
        self.stats = BridgeStats()
        self.connected = threading.Event()
        """Set once the broker has confirmed our subscription (the SUBACK), cleared on disconnect."""
        self._subscribe_mid: int | None = None
        self._producer = producer if producer is not None else make_producer(settings)
        self._events_topic = CAMERA_EVENTS.full_name(settings.kafka.topic_prefix)
        self._dlq_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
        self._backoff, self._clock = backoff, clock
        self._lock = threading.Lock()
        self._retries: list[_Retry] = []
        self._forwarded: OrderedDict[int, _Forwarded] = OrderedDict()
        """By MQTT packet id: what was produced, until :data:`MAX_REMEMBERED` delivered ones are newer."""
        self._unanswered: dict[object, _Unanswered] = {}
        """Each record now on its way to Kafka and when it was produced (this bridge's clock), until Kafka answers."""
        self._resending: list[SavedRecord] = []
        self._resent_upto = 0
        """Records read from the last stop's file, and how many of them :meth:`resend_saved` has handed over."""
        self._resend_kept: list[SavedRecord] = []
        """Of those, the ones Kafka refused even as dead letters: saved again at this run's stop."""
        self._resend_open: set[int] = set()
        """``id`` of the message of each record handed over from that file that Kafka has not acknowledged yet."""
        self._read_files: list[Path] = []
        """The saved files those records came from: removed once Kafka has them all, or at the stop once saved again."""
        self._held = False
        """The saved file could neither be read nor moved aside at the start: this run's stop saves beside it."""
        self._session = 0
        """Counts the broker sessions: a packet id of an older one may name another message now."""
        self._failed: str | None = None
        self._running = self._stopping = False
        self._stop_by: float | None = None
        self._stop_asked: threading.Event | None = None
        """The stop ``run`` was given: a retry the run loop produces into a full local queue (Kafka away) waits for
        room only until it is set, and is then left to the stop's drain, which has its deadline."""
        """At a stop, when (``time.monotonic()``) its drain ends: a record produced then waits for room in a full
        local queue (Kafka away) no longer (:class:`kafka_clients.ProduceGivenUp`); None while running."""
        self.heartbeat = metrics.Heartbeat()
        """Beaten by :meth:`run` every turn with the problem of the moment (the process's ``/healthz``)."""
        self._in = {
            kind: metrics.RECORDS_IN.labels(PROCESS, kind)
            for kind in ("raw_detections", "zone_count", "ignored", "invalid")
        }
        self._retry_depth = metrics.QUEUE_DEPTH.labels(PROCESS, "delivery_retries")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(settings), clean_session=False, manual_ack=True
        )
        mq = settings.mqtt
        if mq.username:
            self.client.username_pw_set(mq.username, mq.password.get_secret_value() if mq.password else None)
        # paho hints the delays as int; it waits a float delay as given
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=5)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # health

    def failure(self) -> str | None:
        """Why the bridge cannot go on (None while it can)."""
        if self._failed is not None:
            return self._failed
        if self._running and not self._stopping:
            network = self.client._thread  # paho's network thread; it sets this to None as it ends
            if network is None or not network.is_alive():
                return "the mqtt network thread has ended: no message would be received or acknowledged"
        return None

    def healthy(self) -> bool:
        return self.failure() is None

    def problem(self) -> str | None:
        """What keeps the bridge from forwarding right now (``/readyz``): its failure, the MQTT broker
        away, or Kafka not taking records (deliveries waiting for another attempt, or a record unanswered
        for :data:`KAFKA_SILENT_S`)."""
        failure = self.failure()
        if failure is not None:
            return failure
        if self._running and not self.connected.is_set():
            return "MQTT unreachable"
        if self.awaiting_retry or self._oldest_unanswered_s() > KAFKA_SILENT_S:
            return "Kafka unreachable"
        return None

    def _oldest_unanswered_s(self) -> float:
        """How long the oldest record produced has waited for Kafka's answer (0 when none waits)."""
        with self._lock:
            oldest = min((u.since for u in self._unanswered.values()), default=None)
        return 0.0 if oldest is None else self._clock() - oldest

    @property
    def awaiting_retry(self) -> int:
        """Records whose Kafka delivery failed and that wait for their next attempt."""
        with self._lock:
            return len(self._retries)

    def _fail(self, reason: str) -> None:
        if self._failed is None:
            self._failed = reason
            log.error("camera bridge failing: %s", reason)

    # paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            if reason in AUTH_REFUSED:
                self._fail(f"mqtt broker refused our login ({reason}); check CG_MQTT__USERNAME / CG_MQTT__PASSWORD")
            else:
                log.warning("mqtt connect refused: %s", reason)
            return
        if not flags.session_present:  # the broker forgot our unacknowledged messages and may reuse their ids
            with self._lock:
                self._session += 1
                self._forwarded.clear()
        # Subscribed again on every connect; "connected" waits for the SUBACK: a first session has no
        # subscription until the broker has taken it, and what is published before that is not ours.
        rc, self._subscribe_mid = client.subscribe(f"{self.prefix}/merakimv/#", qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:  # not sent: the next reconnect subscribes again
            log.warning("mqtt subscribe to %s/merakimv/# not sent (%s)", self.prefix, mqtt.error_string(rc))
        self.stats.connects += 1
        log.info(
            "connected to mqtt %s:%s as %s (session present: %s)",
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            self.settings.mqtt.username or "anonymous",
            flags.session_present,
        )

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            self._fail(
                f"mqtt broker refused the subscription to {self.prefix}/merakimv/# ({refused[0]}); check its ACL"
            )
            return
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        log.warning("mqtt disconnected (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """Never raises: an exception here would end paho's network thread. While stopping, a message is
        left unacked: the persistent session hands it to the next run."""
        if self._stopping:
            return
        try:
            self._forward(msg)
        except Exception as exc:
            self._fail(f"a message on {_topic_of(msg)[:200]!r} could not be forwarded nor dead-lettered: {exc!r}")

    def _forward(self, msg: mqtt.MQTTMessage) -> None:
        self.stats.received += 1
        topic, payload = _topic_of(msg), bytes(msg.payload)
        out = convert(topic, payload, self.prefix, self.settings.job.max_message_bytes, now_ms(), bool(msg.retain))
        if isinstance(out, Outgoing) and self._redelivered(msg):
            out = Ignored(REDELIVERED)  # acknowledged by _redelivered, or once Kafka has the first copy
        # One message per paho callback: there is no batch to count, and MQTT rates are low.
        self._in["ignored" if isinstance(out, Ignored) else "invalid" if out.dead else out.kind].inc()
        if isinstance(out, Ignored):
            ignored = self.stats.ignored
            ignored[out.what if out.what in ignored or len(ignored) < MAX_IGNORED_KINDS else OTHER_SUBTOPIC] += 1
            if out.what != REDELIVERED:
                self._ack(msg)
            return
        # A full local queue is drained by the run loop's poll(), not by this thread: sleep, not poll.
        try:
            try:
                self._produce(out, msg, 0, wait=time.sleep)
            except kafka_clients.ProduceGivenUp:
                raise
            except Exception as exc:
                if out.dead:
                    raise
                self._produce(self._refused(msg, exc), msg, 0, wait=time.sleep)
        except kafka_clients.ProduceGivenUp:  # the stop's drain is over: left unacked for the next session
            return

    def _redelivered(self, msg: mqtt.MQTTMessage) -> bool:
        """Whether ``msg`` is the broker's redelivery (DUP flag, same packet id, topic and payload, same session)
        of a message already produced: after a reconnect the broker sends again every message not acknowledged,
        both those still on their way to Kafka and those whose PUBACK paho dropped with the old connection.
        Producing it again doubled its event, and its second PUBACK could acknowledge a newer message that
        reused the packet id before Kafka had that one. A redelivery is not produced: it is acknowledged now
        if Kafka has the record, else when Kafka acknowledges it. Anything else is remembered as forwarded."""
        if msg.qos == 0:  # no packet id, never redelivered, never acknowledged
            return False
        fingerprint = _fingerprint(msg)
        with self._lock:
            seen = self._forwarded.get(msg.mid)
            if msg.dup and seen is not None and seen.fingerprint == fingerprint:
                if seen.delivered:
                    self.client.ack(msg.mid, msg.qos)
                return True
            self._forwarded[msg.mid] = _Forwarded(fingerprint, self._session)
            self._forwarded.move_to_end(msg.mid)
            if len(self._forwarded) > MAX_REMEMBERED:
                old = next((mid for mid, f in self._forwarded.items() if f.delivered), None)
                if old is not None:
                    del self._forwarded[old]
        return False

    def _ack_delivered(self, msg: mqtt.MQTTMessage) -> None:
        """Acknowledge a message whose record Kafka has, unless the broker session it came in has ended: that
        session's messages are gone from the broker, and their packet ids may name newer messages now."""
        if msg.qos == 0:
            return
        with self._lock:
            if self._session_ended(msg):
                log.info("not acknowledging mqtt message %d: the broker session it came in has ended", msg.mid)
                return
            self._forwarded[msg.mid].delivered = True
            self.client.ack(msg.mid, msg.qos)

    def _session_ended(self, msg: mqtt.MQTTMessage) -> bool:
        """Whether the broker session ``msg`` (QoS 1) came in has ended; call with the lock held."""
        seen = self._forwarded.get(msg.mid)
        return seen is None or seen.fingerprint != _fingerprint(msg) or seen.session != self._session

    # Kafka side

    def _refused(self, msg: mqtt.MQTTMessage, why: object) -> Outgoing:
        """The dead letter of a message whose event Kafka will never take (e.g. too large)."""
        error = InvalidRecord(_refusal_kind(why), f"kafka refused the camera event: {str(why)[:200]}")
        dl = mqtt_dead_letter(_topic_of(msg), bytes(msg.payload), error, now_ms())
        return Outgoing(True, dl.dead_letter_id.encode(), dl.encode(), error.kind)

    def _produce(
        self,
        out: Outgoing,
        msg: mqtt.MQTTMessage,
        attempt: int,
        wait: Callable[[float], object] | None,
        give_up: threading.Event | None = None,
    ) -> None:
        token = object()

        def delivered(err: KafkaError | None, _m: object) -> None:
            with self._lock:
                self._unanswered.pop(token, None)
            self._delivered(out, msg, attempt, err)

        topic = self._dlq_topic if out.dead else self._events_topic
        with self._lock:
            self._unanswered[token] = _Unanswered(self._clock(), out, msg)
        try:
            kafka_clients.produce(
                self._producer, topic, out.key, out.value, delivered, wait=wait, deadline=self._stop_by, stop=give_up
            )
        except BaseException:
            with self._lock:
                self._unanswered.pop(token, None)
            raise

    def _delivered(self, out: Outgoing, msg: mqtt.MQTTMessage, attempt: int, err: KafkaError | None) -> None:
        """Delivery callback (``run`` thread): ack the MQTT message only now; otherwise try again later."""
        if err is None:
            if out.dead:
                self.stats.dead_lettered += 1
                metrics.DEAD_LETTERS.labels(PROCESS, out.kind).inc()
            else:
                self.stats.published += 1
                metrics.RECORDS_OUT.labels(PROCESS, out.kind).inc()
            self._ack_delivered(msg)
            if id(msg) in self._resend_open:
                self._resend_open.discard(id(msg))
                self._forget_saved_once_delivered()
            return
        self.stats.delivery_failed += 1
        if _fatal(err):
            self._fail(f"the kafka producer failed fatally: {err}")
            return
        if not out.dead and _refusal_kind(err) == "oversized":
            refused = self._refused(msg, err)
            try:
                self._produce(refused, msg, 0, wait=None)
            except kafka_clients.ProduceGivenUp:  # at the stop: kept, and saved or left unacked with the others
                with self._lock:
                    self._retries.append(_Retry(self._clock(), refused, msg, 0))
            return
        delay = self._backoff.delay(attempt)
        log.warning(
            "kafka delivery of the record from %s failed (%s); attempt %d in %.1f s, the mqtt message stays unacked",
            _topic_of(msg)[:200],
            err,
            attempt + 2,
            delay,
        )
        with self._lock:
            self._retries.append(_Retry(self._clock() + delay, out, msg, attempt + 1))

    def _resend_due(self) -> None:
        now = self._clock()
        with self._lock:
            due = [r for r in self._retries if r.at <= now]
            self._retries = [r for r in self._retries if r.at > now]
        for retry in due:
            try:  # a stop asked meanwhile ends its wait for room: the drain tries it again, until its deadline
                self._produce(retry.out, retry.msg, retry.attempt, wait=None, give_up=self._stop_asked)
            except kafka_clients.ProduceGivenUp:  # at the stop: kept, and saved or left unacked with the others
                with self._lock:
                    self._retries.append(retry)
            except Exception as exc:
                self._fail(f"producing a record again failed: {exc!r}")

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            with self._lock:
                self.client.ack(msg.mid, msg.qos)

    def service(self, timeout: float = 0.1) -> None:
        """One turn of the run loop: serve delivery callbacks, produce again what is due."""
        self._producer.poll(timeout)
        self._resend_due()

    def run(self, stop: threading.Event, on_tick: Callable[[BridgeStats], None] | None = None) -> BridgeStats:
        """Connect (retrying until the broker answers), forward until ``stop`` is set, then flush. The stop's grace
        counts from when ``stop`` was set, where it is a :class:`infra.processes.StopRequest` (the supervisor's
        SIGKILL counts from its SIGTERM, not from when this loop got round to the stop).

        Raises :class:`BridgeFailed` (after the same cleanup) as soon as :meth:`failure` names a reason.
        """
        self._stopping, self._stop_by, self._stop_asked = False, None, stop
        self.client.connect_async(self.settings.mqtt.host, self.settings.mqtt.port, keepalive=15)
        self.client.loop_start()
        self._running = True  # from now on paho's network thread is watched: it would end silently
        try:
            self.resend_saved()
            while not stop.is_set():
                self.service(0.1)
                reason = self.failure()
                if reason is not None:
                    self.heartbeat.beat(reason)
                    raise BridgeFailed(reason)
                self.heartbeat.beat(self.problem())
                self._retry_depth.set(self.awaiting_retry)
                if on_tick:
                    on_tick(self.stats)
        finally:
            # Drain while still connected: the acks of what Kafka takes now reach the broker. Disconnected
            # first, they were dropped, and the next run got every record in flight again (duplicates).
            # Messages that arrive meanwhile are left unacked for the next session (see _on_message).
            self._stopping = True
            self._drain(self.settings.cameras.bridge_stop_grace_s, stop_asked_at(stop))
            self._save_unsent()
            self.client.disconnect()
            self.client.loop_stop()
        return self.stats

    def resend_saved(self) -> None:
        """Produce what the last run saved at its stop (:func:`save_records`), the saved file and those saved beside
        it (:func:`saved_beside`); they are QoS 0 messages here: nothing to acknowledge, and saved again at this run's
        stop unless Kafka has them by then. A file that cannot be read is moved aside (named in the log), not produced
        and not overwritten; the move is synced into its folder (:func:`infra.durable.rename_durably`), so a power cut
        does not undo it. A move that fails is a warning saying so (the log said "moved to" all the same); the file
        stays, read again only at the next run's start (this is called once per :meth:`run`), never in a loop, and this
        run's stop saves beside it (:meth:`_save_unsent`). The log names files, never their content."""
        path = saved_records_path(self.settings)
        records: list[SavedRecord] = []
        self._read_files, self._held = [], False
        for file in (path, *saved_beside(path)):
            try:
                records += load_saved_records(file)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                if not self._set_aside(file, exc) and file == path:
                    self._held = True
                continue
            if file.exists():  # none saved at the last stop: nothing to remove, its folder perhaps not made yet
                self._read_files.append(file)
        if records:
            log.warning("producing %d record(s) the last run saved at its stop (%s)", len(records), path)
        # Until handed to Kafka a record is only here: a stop (or an exception) half-way saves the rest again.
        self._resending, self._resent_upto = records, 0
        for i, r in enumerate(records):
            msg = mqtt.MQTTMessage(mid=0, topic=r.mqtt_topic.encode("utf-8", "replace"))
            msg.payload, msg.qos = r.payload, 0
            self._resend_open.add(id(msg))  # the message stays referenced (unanswered or retried) until delivered
            try:
                self._produce(r.out, msg, 0, wait=None)
            except Exception as exc:
                self._resend_refused(r, msg, exc)
            self._resent_upto = i + 1
        self._forget_saved_once_delivered()

    def _set_aside(self, path: Path, exc: Exception) -> bool:
        """Move the unreadable saved file ``path`` aside (``….unreadable-<ms>``); whether it is gone from its name."""
        aside = path.with_name(f"{path.name}.unreadable-{now_ms()}")
        try:
            rename_durably(path, aside)
        except OSError as moving:
            if path.exists():
                log.warning(
                    "cannot read the records saved at the last stop (%s: %s), nor move the file aside to %s: %s; "
                    "left under its name, not produced, read again at the next start",
                    path,
                    exc,
                    aside.name,
                    moving.strerror or moving,
                )
                return False
            # renamed, but the folder's sync failed: a power cut may bring it back under the saved name
            log.warning(
                "cannot read the records saved at the last stop (%s: %s); moved to %s, but its folder could "
                "not be synced (%s): a power cut may bring it back",
                path,
                exc,
                aside.name,
                moving.strerror or moving,
            )
            return True
        log.error("cannot read the records saved at the last stop (%s); moved to %s: %s", path, aside, exc)
        return True

    def _forget_saved_once_delivered(self) -> None:
        """Remove the last stop's file once Kafka has acknowledged all of it: kept until this run's stop, a crash
        or SIGKILL later in the run left it, and the next run produced every record a second time."""
        if not self._resending or self._resend_open or self._resend_kept:
            return
        if self._resent_upto < len(self._resending):
            return
        self._read_files = self._remove_read_files("kafka has the records saved at the last stop")
        self._resending, self._resent_upto = [], 0
        log.info("kafka has acknowledged every record saved at the last stop; their file(s) removed")

    def _remove_read_files(self, why: str, but: Path | None = None) -> list[Path]:
        """Remove the files the records saved at the last stop were read from (all but ``but``), each synced out of
        its folder (after a power cut a file came back, and was produced again); those that could not be removed."""
        kept = []
        for file in self._read_files:
            if file == but:
                continue
            try:
                remove_durably(file)
            except OSError as exc:  # tried again at the stop
                log.warning("%s, but %s could not be removed: %s", why, file, exc)
                kept.append(file)
        return kept

    def _resend_refused(self, r: SavedRecord, msg: mqtt.MQTTMessage, exc: Exception) -> None:
        """A saved record Kafka refused at once (e.g. over a lower ``message.max.bytes``): dead-lettered as a live
        message would be; kept for this run's stop when even that fails. Ending the run here lost the rest."""
        if not r.out.dead:
            try:
                self._produce(self._refused(msg, exc), msg, 0, wait=None)
                log.error("kafka refused a record saved at the last stop (%s); dead-lettered", str(exc)[:200])
                return
            except Exception as dl_exc:
                exc = dl_exc
        log.error("kafka refused a record saved at the last stop (%s); saved again at this stop", str(exc)[:200])
        self._resend_open.discard(id(msg))
        why = f"kafka refused it when produced again ({str(exc)[:200]}); its mqtt message is not sent again"
        self._resend_kept.append(SavedRecord(r.mqtt_topic, r.payload, r.out, why))

    def _drain(self, grace_s: float, asked_at: float | None = None) -> None:
        """Give Kafka up to ``grace_s`` (wall clock) from ``asked_at`` (the stop's arrival, ``time.monotonic()``; now
        if None) for every record accepted; waiting retries go at once. Counted from the end of the loop, the time the
        loop took after the SIGTERM (a retry waiting for room in Kafka's queue) ran past the supervisor's SIGKILL. A
        record produced meanwhile (a retry, a dead letter) waits for room in a full local queue (Kafka away) until
        then, not for ever past the supervisor's SIGKILL: one given up is saved or left unacknowledged
        (:meth:`_save_unsent`)."""
        deadline = (time.monotonic() if asked_at is None else asked_at) + grace_s
        self._stop_by = deadline
        with self._lock:
            retries, self._retries = self._retries, []
        for retry in retries:
            try:
                self._produce(retry.out, retry.msg, retry.attempt, wait=None)
            except Exception as exc:
                log.warning("producing a record again at the stop failed: %r", exc)
                with self._lock:
                    self._retries.append(retry)
        while (left := deadline - time.monotonic()) > 0:
            with self._lock:
                if not self._unanswered and not self._retries:
                    return
            self._producer.poll(min(0.1, left))
            self._resend_due()

    def _save_unsent(self) -> None:
        """After :meth:`_drain`: save what the broker will never send again, count (and log) the rest."""
        grace = self.settings.cameras.bridge_stop_grace_s
        with self._lock:
            unsent = [(r.out, r.msg, f"kafka delivery failed {r.attempt} time(s)") for r in self._retries]
            unsent += [(u.out, u.msg, f"no answer from kafka within {grace:g} s") for u in self._unanswered.values()]
            lost = [(o, m, why) for o, m, why in unsent if m.qos == 0 or self._session_ended(m)]
        saved = [
            SavedRecord(
                _topic_of(m),
                bytes(m.payload),
                o,
                f"{why} at the stop; "
                + ("its mqtt message was QoS 0 or saved before" if m.qos == 0 else "its mqtt session has ended"),
            )
            for o, m, why in lost
        ]
        not_resent = self._resend_kept + self._resending[self._resent_upto :]
        saved += not_resent
        path = saved_records_path(self.settings)
        if self._held and path.exists():  # never written over (nor removed): what it holds is read again next start
            path = new_saved_beside(path)
        self.stats.left_unacked = len(unsent) - len(lost)
        try:
            if saved or path.exists():
                save_records(path, saved)
        except OSError as exc:
            log.error(
                "stopping: %d record(s) Kafka has not taken, whose mqtt messages the broker will not send again, "
                "could not be saved to %s and are lost: %s",
                len(saved),
                path,
                exc,
            )
            saved = []
        else:  # what is left of the files read at the start is in ``path`` now
            self._read_files = self._remove_read_files("stopping: the records saved at the last stop saved again", path)
        self.stats.saved = len(saved)
        if unsent or not_resent:
            log.warning(
                "stopping with %d record(s) Kafka has not taken: %d saved to %s for the next run "
                "(the broker will not send their mqtt messages again), %d left unacknowledged for the broker "
                "to send again",
                len(unsent) + len(not_resent),
                len(saved),
                path,
                self.stats.left_unacked,
            )


def serve(bridge: CameraBridge, stop: threading.Event, on_tick: Callable[[BridgeStats], None] | None = None) -> int:
    """Run ``bridge`` until ``stop``; the process exit status: 0, or 1 with the reason logged when it failed."""
    try:
        bridge.run(stop, on_tick)
    except BridgeFailed as exc:
        log.error("camera bridge exiting with status 1: %s", exc)
        return 1
    return 0


def main(log_level: str | None = None) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, "bridge")
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGTERM, signal.SIGINT))  # the stop's grace counts from the signal's arrival
    last = [time.monotonic()]
    bridge = CameraBridge(settings)
    endpoint = metrics.serve(settings, PROCESS, health=bridge.heartbeat)

    def report(stats: BridgeStats) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            log.info(
                "received %d, published %d, dead-lettered %d, ignored %s, delivery failures %d, awaiting retry %d",
                stats.received,
                stats.published,
                stats.dead_lettered,
                dict(stats.ignored),
                stats.delivery_failed,
                bridge.awaiting_retry,
            )

    try:
        status = serve(bridge, stop, report)
    except KeyboardInterrupt:
        status = 0
    finally:
        endpoint.close()
    raise SystemExit(status)


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Bridge the cameras' MV Sense MQTT messages to the camera_events topic until SIGTERM/Ctrl-C
    (exit status 1 when the bridge gives up)."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
