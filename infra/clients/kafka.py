"""Kafka clients, built in one place: ``KafkaSettings.client_config()`` (brokers, security) + presets + overrides.

``producer(settings, RELIABLE, client_id="checkout-guard-pos", compression_type="lz4")`` builds a
``confluent_kafka.Producer`` from the settings' connection properties, then each preset (a mapping of
librdkafka properties) in order, then the keyword overrides, whose ``_`` stand for ``.``
(``linger_ms=5`` is ``linger.ms``; the Python client's own keys such as ``error_cb`` or ``logger`` are
passed as they are). :func:`config` gives the same dict without a client.

:func:`produce` is the one send loop that copes with a full local queue (``BufferError``): it lets
deliveries drain the queue (``poll``) and tries again, as long as it takes, or at a stop until the caller's deadline.

Every client logs through the ``checkout_guard.kafka`` logger (:func:`librdkafka_logger`), not librdkafka's own
stderr lines: the process's log format and secret redaction apply, and a failure librdkafka repeats at every
retry (twenty lines a second while a broker is down) is shown once a minute. :func:`cluster_metadata` is a
tool's first question to the cluster: no broker answering is one :class:`KafkaUnavailable`, not a minute of
waiting for acknowledgements.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, ResourceType, TopicMetadata

from infra.settings import KafkaSettings, Settings
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.records import DeadLetter, dead_letter

IDEMPOTENT: Mapping[str, Any] = {"enable.idempotence": True}
"""A producer whose retries neither duplicate nor reorder."""
RELIABLE: Mapping[str, Any] = {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
"""Idempotent, ``acks=all``, small batches: what the pipeline's own producers use."""
MANUAL_COMMIT: Mapping[str, Any] = {"enable.auto.commit": False}
"""A consumer that commits (or never commits) offsets itself."""
READ_COMMITTED: Mapping[str, Any] = {"enable.auto.commit": False, "isolation.level": "read_committed"}
"""Manual commits, and only records of committed transactions."""

PYTHON_KEYS = frozenset({"error_cb", "throttle_cb", "stats_cb", "oauth_cb", "logger", "on_delivery", "on_commit"})
"""confluent-kafka's own keys, which keep their underscores."""


class _Produces(Protocol):
    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...
    def poll(self, timeout: float) -> int: ...


def _kafka(source: Settings | KafkaSettings) -> KafkaSettings:
    return source.kafka if isinstance(source, Settings) else source


def _key(name: str) -> str:
    return name if name in PYTHON_KEYS else name.replace("_", ".")


def config(source: Settings | KafkaSettings, *presets: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Connection properties of ``source``, then ``presets`` in order, then ``overrides`` (``_`` = ``.``)."""
    conf: dict[str, Any] = dict(_kafka(source).client_config())
    for preset in presets:
        conf.update(preset)
    conf.update({_key(name): value for name, value in overrides.items()})
    return conf


LOGGER = "checkout_guard.kafka"
REPEAT_AFTER_S = 60.0
"""How long the same librdkafka message is held back after it was shown."""


class RepeatFilter(logging.Filter):
    """Passes a message once per ``every_s``: librdkafka logs a failure again at every retry. Millisecond
    counts, which differ between repeats (``after 0ms in state CONNECT``), do not make a message new, nor
    does the client's instance (``rdkafka#producer-7``, ``checkout-guard-labels#producer-2``: its
    ``client.id`` stays): a task that builds a client each time (the metrics exporter's lag reader) would
    repeat its failure at every read otherwise."""

    _VARYING = re.compile(r"\d+ms\b|#\w+-\d+\]")
    _KEPT = 1000

    def __init__(self, every_s: float = REPEAT_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._shown: dict[tuple[int, str], float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, self._VARYING.sub("…", record.getMessage()))
        now = self.clock()
        with self._lock:
            shown = self._shown.get(key)
            if shown is not None and now - shown < self.every_s:
                return False
            if len(self._shown) >= self._KEPT:
                self._shown.clear()
            self._shown[key] = now
        return True


def librdkafka_logger(name: str = LOGGER) -> logging.Logger:
    """The logger every client gets (``logger`` in its config) unless given another by ``name``: librdkafka's
    lines through Python logging, repeats held back (:class:`RepeatFilter`). Without logging set up, warnings
    and errors reach stderr."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


def _built(source: Settings | KafkaSettings, presets: tuple[Mapping[str, Any], ...], overrides: Any) -> dict[str, Any]:
    return {"logger": librdkafka_logger(), **config(source, *presets, **overrides)}


def producer(source: Settings | KafkaSettings, *presets: Mapping[str, Any], **overrides: Any) -> Producer:
    return Producer(_built(source, presets, overrides))


def consumer(
    source: Settings | KafkaSettings, group_id: str, *presets: Mapping[str, Any], **overrides: Any
) -> Consumer:
    return Consumer(_built(source, presets, {"group_id": group_id, **overrides}))


def admin(source: Settings | KafkaSettings, *presets: Mapping[str, Any], **overrides: Any) -> AdminClient:
    return AdminClient(_built(source, presets, overrides))


@contextmanager
def admin_session(
    source: Settings | KafkaSettings, *presets: Mapping[str, Any], **overrides: Any
) -> Iterator[AdminClient]:
    """An admin client for one task. An admin client hands its log lines to the logger only on ``poll``, which
    nothing else calls: at the end of the task they are handed over, or they would be dropped with the client
    (why a broker refused it, say)."""
    client = admin(source, *presets, **overrides)
    try:
        yield client
    finally:
        client.poll(0)


def topic_configs(
    source: Settings | KafkaSettings, topics: Sequence[str], keys: Collection[str], timeout_s: float = 10.0
) -> dict[str, dict[str, str]]:
    """The values of ``keys`` (``retention.ms``...) that ``topics`` have now, as the cluster answers
    ``describe_configs``: the topic's own or, where it sets none, the broker's default; a key the answer has no
    value for is left out. An operator may have changed a topic since it was created from ``schemas.topics``, so
    what depends on how long records stay asks this rather than the spec. Kafka not answering within ``timeout_s``,
    a topic missing or not to be described by this login: ``KafkaException`` (or ``TimeoutError``)."""
    with admin_session(source) as client:
        futures = client.describe_configs(
            [ConfigResource(ResourceType.TOPIC, topic) for topic in topics], request_timeout=timeout_s
        )
        out: dict[str, dict[str, str]] = {}
        for resource, future in futures.items():
            entries = future.result(timeout_s)
            out[resource.name] = {k: e.value for k, e in entries.items() if k in keys and e.value is not None}
    return out


def is_record(
    message: Any,
    log: logging.Logger,
    what: str = "consumer",
    on_error: Callable[[KafkaError], object] | None = None,
) -> bool:
    """Whether a fetched message is a record; an error event is not: a fatal one raises, the end of a partition
    passes quietly, any other is logged (``<what> error: ...``), handed to ``on_error`` if given, and skipped."""
    error = message.error()
    if error is None:
        return True
    if error.fatal():
        raise KafkaException(error)
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("%s error: %s", what, error.str())
        if on_error is not None:
            on_error(error)
    return False


def error_named(exc: BaseException | KafkaError) -> str:
    """``exc`` named by its type and, a Kafka error, its code (``KafkaException _TRANSPORT``; a consumer's
    ``msg.error()``: ``KafkaError _TRANSPORT``): never its words, which a broker may fill with the values it refuses
    (a key, a record's field)."""
    if isinstance(exc, KafkaError):
        return f"KafkaError {exc.name()}"
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return type(exc).__name__ + (f" {err.name()}" if isinstance(err, KafkaError) else "")


class KafkaUnavailable(CheckoutGuardError, KafkaException):
    """No broker answered in time. A ``KafkaException`` too, so code that handles Kafka's errors handles it."""


_NOT_ANSWERING = frozenset({KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN})


def cluster_metadata(
    client: Producer | Consumer | AdminClient,
    source: Settings | KafkaSettings | None = None,
    topic: str | None = None,
    timeout_s: float = 10.0,
) -> ClusterMetadata:
    """``client.list_topics(topic)``; no usable broker within ``timeout_s`` is :class:`KafkaUnavailable`, naming
    ``source``'s bootstrap servers (other error codes are raised as they come). librdkafka gives the same
    answer for a broker that is down, unreachable or refusing this client (TLS, credentials, protocol); its log
    lines say which, and are handed over (``poll``) before the error, since the client is dropped after it."""
    try:
        return client.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is None or error.code() not in _NOT_ANSWERING:
            raise
        client.poll(0)  # the queued log lines: why no broker was usable; the caller gives the client up
        where = f"Kafka at {_kafka(source).bootstrap}" if source is not None else "Kafka"
        raise KafkaUnavailable(
            f"{where} did not answer within {timeout_s:g} s ({error.str()}): down, unreachable, or refusing this "
            "client (TLS, credentials)"
        ) from None


class TopicUnavailable(CheckoutGuardError, RuntimeError):
    """The broker answered for the topic with an error (no leader, not authorised): an operational failure, named
    as the broker said it, not taken for a topic that does not exist. Here, with :func:`topic_unusable`, so the
    writers' check (:func:`require_topics`) judges a topic as the readers (``topic_replay``) do."""


def topic_unavailable(topic: str, error: KafkaError, partition: int | None = None) -> TopicUnavailable:
    """The error for a topic (or one partition of it) the broker answered with ``error``, in the broker's words
    (``error.str()`` and its name), not the client's error object: every reader of a topic words it so.

    The words stay (unlike a logged publish error, :func:`error_named`): these errors come
    from metadata, offset and fetch answers, which carry only an error code, and the client words them from it with
    the topic, partition, offset and broker ("Broker: Topic authorization failed"), never a record; an operator at the
    command line needs them, where the code alone (``TOPIC_AUTHORIZATION_FAILED``) says less."""
    where = f"topic {topic}" if partition is None else f"topic {topic} partition {partition}"
    return TopicUnavailable(f"{where}: the broker answered {error.str()} ({error.name()})")


def topic_unusable(topic: str, listed: TopicMetadata) -> TopicUnavailable | None:
    """Why ``topic``, listed (:func:`listed_topic`), cannot be read or written now, or ``None``: its own
    error, else the first partition the broker answers with an error or lists without a leader (leader -1), named
    (:func:`topic_unavailable`'s words). Judged only by the topic's own error, a topic with a leaderless partition was
    taken for ready (the stream backtest's copy topics) and healthy (``stack status``): both ask this."""
    if listed.error is not None:
        return topic_unavailable(topic, listed.error)
    for partition in sorted(listed.partitions.values(), key=lambda p: p.id):
        if partition.error is not None:
            return topic_unavailable(topic, partition.error, partition.id)
        if partition.leader < 0:
            return TopicUnavailable(
                f"topic {topic} partition {partition.id}: no leader (the broker lists it with none)"
            )
    return None


class TopicError(CheckoutGuardError, LookupError):
    """A topic a tool writes to is missing, or not usable now (no leader, not authorised)."""


class TopicMissing(TopicError):
    """A topic a tool writes to does not exist: tools create none (on a cluster with ACLs they may not)."""


def require_topics(
    client: Producer | Consumer | AdminClient,
    source: Settings | KafkaSettings,
    *topics: str,
    timeout_s: float = 10.0,
) -> ClusterMetadata:
    """:func:`cluster_metadata` of all topics (asking for one by name could ask a broker to create it), and
    :class:`TopicMissing` naming those of ``topics`` the cluster does not list; another error of a listed topic
    (no leader this moment, not authorised), or a partition of it answered with an error or listed without a leader,
    is a :class:`TopicError` naming it (and the partition) and the error, not a missing topic (:func:`topic_unusable`):
    the callers produce to these topics next, and a record for a leaderless partition waits in the queue until its
    delivery times out: a start-up check that passed such a topic let those writes fail minutes later."""
    metadata = cluster_metadata(client, source, timeout_s=timeout_s)
    listed = {t: found for t in topics if (found := listed_topic(metadata, t)) is not None}
    missing = [t for t in topics if t not in listed]
    if missing:
        raise TopicMissing(
            f"no topic {', '.join(missing)} on Kafka at {_kafka(source).bootstrap} (or this login may not describe "
            "it): the topics are created by an admin (`python -m infra.stack topics`, or `make up` locally)"
        )
    for name, topic in listed.items():
        if (why := topic_unusable(name, topic)) is not None:
            raise TopicError(f"{why} (Kafka at {_kafka(source).bootstrap})")
    return metadata


def listed_topic(metadata: ClusterMetadata, topic: str) -> TopicMetadata | None:
    """``topic``'s entry in ``metadata``, or ``None`` where the cluster does not have it: not
    listed, or listed with UNKNOWN_TOPIC_OR_PART, the broker's word for a topic it does not know. Another error of
    a listed topic (no leader, not authorised) stays on the entry: the topic exists. Writers and readers alike
    tell a missing topic by this, so no tool calls one topic missing that another calls unavailable."""
    found = metadata.topics.get(topic)
    if found is None or (found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        return None
    return found


class ProduceGivenUp(CheckoutGuardError, BufferError):
    """:func:`produce` gave a record up at a stop: the local queue was still full (Kafka away) at the caller's
    deadline, or once its stop was asked. A ``BufferError`` too, the error the queue itself gave."""


def produce(
    producer: _Produces,
    topic: str,
    key: bytes | str | None,
    value: bytes | str | None,
    on_delivery: Callable[[Any, Any], None] | None = None,
    *,
    headers: Any = None,
    partition: int | None = None,
    timestamp: int | None = None,
    poll_s: float = 0.05,
    wait: Callable[[float], object] | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> None:
    """``producer.produce(...)``, tried again while the local queue is full (``BufferError``): in between,
    ``producer.poll(poll_s)`` serves delivery callbacks, which empties the queue. ``wait``: called with
    ``poll_s`` instead of polling, where another thread polls this producer (e.g. ``time.sleep``).
    ``headers``, ``partition`` and ``timestamp`` are passed only when given.

    While running, waiting for room is the back-pressure, however long Kafka is away. At a stop it is not: a record
    produced then (a dead letter, an audit event) with Kafka down and the queue full waited past the supervisor's
    SIGKILL. A caller in its stop path passes ``deadline`` (``time.monotonic()``) or ``stop`` (given up once set):
    a full queue then raises :class:`ProduceGivenUp` once the deadline has passed or ``stop`` is set."""
    kwargs: dict[str, Any] = {"key": key, "value": value}
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    if headers is not None:
        kwargs["headers"] = headers
    if partition is not None:
        kwargs["partition"] = partition
    if timestamp is not None:
        kwargs["timestamp"] = timestamp
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            if (deadline is not None and time.monotonic() >= deadline) or (stop is not None and stop.is_set()):
                raise ProduceGivenUp(
                    f"record for {topic} not produced: Kafka's local queue was still full at the stop"
                ) from None
            pause = poll_s if deadline is None else min(poll_s, max(deadline - time.monotonic(), 0.0))
            if wait is not None:
                wait(pause)
            else:
                producer.poll(pause)


@dataclass
class DeliveryTally:
    """Acknowledgements of a batch of sends: pass :meth:`delivered` as ``on_delivery``, then :meth:`flushed`
    with what ``producer.flush`` left unacknowledged. Keeps the first five distinct errors."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    unconfirmed: int = 0
    """Of ``failed``: timed out, so the broker may have written them all the same."""
    errors: list[str] = field(default_factory=list)

    def delivered(self, err: KafkaError | None, _message: Any) -> None:
        if err is None:
            self.acked += 1
            return
        self.failed += 1
        if err.code() == KafkaError._MSG_TIMED_OUT:
            self.unconfirmed += 1
        if len(self.errors) < 5 and err.str() not in self.errors:
            self.errors.append(err.str())

    def flushed(self, unacked: int, timeout_s: float) -> None:
        if unacked:
            self.failed += unacked
            self.unconfirmed += unacked
            self.errors.append(f"{unacked} not acknowledged within {timeout_s:.0f}s")

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.acked == self.sent


MAX_REASON_CHARS = 2000
"""Longest dead-letter reason kept from a consumed message's failure (an OpenSearch error can be long)."""


def message_dead_letter(message: Message, error_kind: str, reason: str, *, stage: str, failed_at: int) -> DeadLetter:
    """The dead letter of a consumed message; its id is stable across replays of the same offset."""
    return dead_letter(
        topic=message.topic() or "",
        partition=message.partition() or 0,
        offset=message.offset() or 0,
        key=message.key(),
        value=message.value(),
        error=InvalidRecord(error_kind, reason[:MAX_REASON_CHARS]),
        stage=stage,
        failed_at=failed_at,
    )


def written_at_ms(message: Message) -> int | None:
    """A record's Kafka timestamp in ms (producer or broker time), ``None`` when it has none."""
    ts_type, ts = message.timestamp()
    return ts if ts_type != TIMESTAMP_NOT_AVAILABLE and ts >= 0 else None
