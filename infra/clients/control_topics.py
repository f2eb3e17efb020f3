"""Read the compacted control topics (rules, watchlist) from their start to their current end.

Used where a process needs the state those topics hold *before* it acts: the scoring job at start
(so a known suspect cannot slip through while the broadcast stream catches up), the watchlist
service at start (watchlist and audit), and the Webex bot's ``checkout`` inspection.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from infra.settings import Settings
from schemas.errors import CheckoutGuardError
from schemas.topics import RULES, WATCHLIST, TopicSpec

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message

log = logging.getLogger(__name__)

STARTUP_READ_STALL_S = 30.0
"""How long a service's start-up read of a topic (``stall_s``) may go without a record before it fails: below the
heartbeat's 60 s, so a read that truly stalls fails and is restarted rather than hanging the process."""


def end_offset(
    consumer,
    topic: str,
    partition: int,
    timeout_s: float,
    beat: Callable[[], object] | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """The partition's high watermark, waiting out the transient errors of a just-created topic
    (no leader elected yet) until ``timeout_s``; ``beat()`` after each failed try (each may take ``timeout_s``).
    ``deadline`` (``time.monotonic()``): no try goes past it, the retries neither. ``stop``: once set, no try more
    (:class:`ReadStopRequested`), also while waiting between two: the retries ran on to their own timeout."""
    from confluent_kafka import KafkaException, TopicPartition

    from infra.retry import call_with_retries

    def transient(exc: BaseException) -> bool:
        if not isinstance(exc, KafkaException):
            return False
        err = exc.args[0]
        return err.retriable() or err.name() in (
            "NOT_LEADER_FOR_PARTITION",
            "LEADER_NOT_AVAILABLE",
            "UNKNOWN_TOPIC_OR_PART",
        )

    def within(seconds: float) -> float:
        return seconds if deadline is None else max(0.0, min(seconds, deadline - time.monotonic()))

    def pause(seconds: float) -> None:
        """The wait before the next try, cut short (and the retries given up) by the stop."""
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise ReadStopRequested(f"read of {topic} stopped by its caller while asking {topic}[{partition}]'s end")

    return call_with_retries(
        lambda: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=within(timeout_s))[1],
        retriable=transient,
        wait=lambda _n: 0.25,
        deadline_s=within(timeout_s),
        before_sleep=None if beat is None else lambda *_: beat(),
        sleep=pause,
    )


_T = TypeVar("_T")


class ControlTopicMissing(CheckoutGuardError, RuntimeError):
    """A topic to read does not exist: not listed, or listed as unknown (``kafka_clients.listed_topic``, the rule every
    tool judges a missing topic by). A ``RuntimeError``, as a topic the broker answers with an error is
    (``topic_replay.TopicUnavailable``), so a caller that gives up on one gives up on the other; one that takes a
    missing topic for an empty one (the sink's forgets) tells it by its type."""


class ReadStopped(CheckoutGuardError, TimeoutError):
    """A read of the control topics cut off by its caller's ``deadline`` or ``stop`` (not the broker's error)."""


class ReadStopRequested(ReadStopped):
    """A read cut short by its caller's ``stop`` (not a deadline Kafka did not meet): nothing is lost by it, the caller
    stopping reads the topic again at its next start."""


class _Bound:
    """The caller's bound on a whole read: the time each step may still wait, or :class:`ReadStopped`."""

    def __init__(self, topics: list[str], deadline: float | None, stop: threading.Event | None) -> None:
        self.topics, self.deadline, self.stop = ", ".join(topics), deadline, stop

    def left(self, step: str, seconds: float) -> float:
        """``seconds``, or less where the deadline comes first; raises once stopped or past it."""
        if self.stop is not None and self.stop.is_set():
            raise ReadStopRequested(f"read of {self.topics} stopped by its caller before {step}")
        if self.deadline is None:
            return seconds
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ReadStopped(f"read of {self.topics} not done by its deadline (before {step})")
        return min(seconds, left)

    def call(self, step: str, call: Callable[[float], _T], timeout_s: float) -> _T:
        """``call(timeout)`` with the timeout cut to the time left; its failure once past the deadline (the broker's
        timeout error, a retry given up) is the deadline's. A broker's error (``KafkaException``) once the stop was
        asked is the stop's (:class:`ReadStopRequested`): the call was under way when it came, and the read, stopped
        anyway, is read again at the next start; taken for a loss, it was a WARNING at a plain stop."""
        from confluent_kafka import KafkaException

        timeout = self.left(step, timeout_s)
        try:
            return call(timeout)
        except Exception as exc:
            if isinstance(exc, KafkaException) and self.stop is not None and self.stop.is_set():
                raise ReadStopRequested(f"read of {self.topics} stopped by its caller during {step}") from exc
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise ReadStopped(f"read of {self.topics} not done by its deadline ({step})") from exc
            raise


def read_control_topics(
    settings: Settings,
    apply: Callable[[str, bytes | None, bytes | None], object],
    timeout_s: float = 20.0,
    specs: tuple[TopicSpec, ...] = (RULES, WATCHLIST),
    since_ms: int | None = None,
    stall_s: float | None = None,
    beat: Callable[[], object] | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> dict[tuple[str, int], int]:
    """Call ``apply(topic, key, value)`` for every committed record, in order, up to the current end
    (an exception from ``apply`` stops the read); return the last offset read per partition (-1 where
    nothing was read). ``since_ms``: start at the first record written at or after it (broker timestamp)
    instead of the beginning, so a long log is read only as far back as needed. ``TimeoutError`` if the
    end is not reached within ``timeout_s``; with ``stall_s``, only if no record came for ``stall_s`` (the
    deadline moves with every record read), so a long log (a year of ``audit``) is read to its end however long
    that takes, as long as it keeps coming. ``beat()`` is called after each metadata call (each may take
    ``timeout_s``, and a topic of many partitions makes many), so a caller's health check sees progress before the
    first record too.

    ``deadline`` (``time.monotonic()``) bounds the whole read, which otherwise may take ``timeout_s`` per metadata
    call (partitions + 2 of them) before reading: each call waits at most the time left, each poll too, and past it
    the read raises :class:`ReadStopped` (a ``TimeoutError``) and closes its consumer. ``stop``: the same
    (:class:`ReadStopRequested`), as soon as it is set (checked before each call and each poll; a call in progress runs
    on, to the deadline at most, and a broker's error it then ends with is the stop's too, as is a topic then found
    missing or unavailable: the services' stop took them for a crash, a traceback). Neither: no bound but
    ``timeout_s``, as before.

    A topic that does not exist is :class:`ControlTopicMissing`, also where a partition of it is answered with
    UNKNOWN_TOPIC_OR_PART (deleted since it was listed); one the broker answers with another error (no leader,
    not authorised) is ``topic_replay.TopicUnavailable`` in the broker's words, also where a partition's read is
    answered so (a fetch it refuses: ended at the timeout as "not read to the end", the broker's error unsaid), and
    where the listing shows a partition without a leader or with an error (``topic_replay.topic_unusable``): its end,
    asked of its leader next, was waited for to the timeout, the partition unnamed."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

    from infra.clients import kafka as kafka_clients
    from infra.clients.topic_replay import topic_unusable

    prefix = settings.kafka.topic_prefix
    topics = [spec.full_name(prefix) for spec in specs]
    reader = kafka_clients.consumer(settings, f"{settings.consumer_group}-control-read", kafka_clients.READ_COMMITTED)
    progress = beat if beat is not None else (lambda: None)
    bound = _Bound(topics, deadline, stop)
    try:
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            listed = bound.call("listing its partitions", partial(_partitions, reader, topic), timeout_s)
            meta = kafka_clients.listed_topic(listed, topic)
            progress()
            if meta is None:
                raise ControlTopicMissing(f"topic {topic} does not exist on the cluster")
            if (why := topic_unusable(topic, meta)) is not None:  # each partition's end is asked of its leader next
                raise why
            for p in meta.partitions:
                ends[(topic, p)] = bound.call(
                    f"asking {topic}[{p}]'s end", partial(_end, reader, topic, p, bound, beat), timeout_s
                )
                progress()
        last = {tp: -1 for tp in ends}
        pending = {tp for tp, end in ends.items() if end > 0}
        starts = {tp: OFFSET_BEGINNING for tp in pending}
        if since_ms is not None and pending:
            starts = bound.call(
                "asking the offsets by time", lambda t: _offsets_since(reader, pending, since_ms, t), timeout_s
            )
            progress()
            pending = {tp for tp, offset in starts.items() if offset != OFFSET_END}  # END: nothing written since
        reader.assign([TopicPartition(t, p, starts[(t, p)]) for t, p in pending])
        read_by = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > read_by:
                waited = f"in {timeout_s:.0f}s" if stall_s is None else f"(no record for {stall_s:.0f}s)"
                raise TimeoutError(f"control topics not read to their end {waited}")
            msg = reader.poll(bound.left("reading", 0.2))
            if msg is not None and _applied(msg, ends, apply, last) and stall_s is not None:
                read_by = time.monotonic() + stall_s
            for tp in list(pending):  # read_committed: the end may be a transaction marker
                if reader.position([TopicPartition(*tp)])[0].offset >= ends[tp]:
                    pending.discard(tp)
    except BaseException as exc:
        _after_error(reader, bound, exc)  # the stop's error, where the stop came first
        raise
    reader.close()
    return last


def _after_error(reader, bound: _Bound, exc: BaseException) -> None:
    """Close the read's consumer after the read's own error ``exc``, which stays the one raised: a close failing too
    (Kafka gone) is a WARNING naming its type and Kafka code; raised from a ``finally`` it hid why the read failed.

    Raises :class:`ReadStopRequested` where the stop was asked before a broker's error, or a topic found missing or
    unavailable, ended the read: stopped anyway, it is read again at the next start (the services' INFO); as itself,
    the services' stop took it for a crash (a traceback)."""
    from confluent_kafka import KafkaException

    from infra.clients.kafka import TopicUnavailable, error_named

    try:
        reader.close()
    except Exception as failed:  # noqa: BLE001 - the read's error is the one to raise
        log.warning("closing the read of %s after its error failed too (%s)", bound.topics, error_named(failed))
    stopped = bound.stop is not None and bound.stop.is_set()
    if stopped and isinstance(exc, (KafkaException, ControlTopicMissing, TopicUnavailable)):
        raise ReadStopRequested(f"read of {bound.topics} stopped by its caller ({type(exc).__name__})") from exc


def _partitions(reader, topic: str, timeout_s: float):
    """The topic's metadata (its partitions), waiting at most ``timeout_s``."""
    return reader.list_topics(topic, timeout=timeout_s)


def _deleted_since(topic: str, error: KafkaError) -> ControlTopicMissing | None:
    """:class:`ControlTopicMissing` where a listed topic's partition is answered with UNKNOWN_TOPIC_OR_PART (the topic
    deleted since it was listed): judged by the error code, as ``kafka_clients.listed_topic`` judges a listing."""
    from confluent_kafka import KafkaError

    if error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
        return None
    return ControlTopicMissing(f"topic {topic} does not exist on the cluster (deleted since it was listed)")


def _applied(
    msg: Message,
    ends: dict[tuple[str, int], int],
    apply: Callable[[str, bytes | None, bytes | None], object],
    last: dict[tuple[str, int], int],
) -> bool:
    """Hand a polled record to ``apply`` and note its offset in ``last``: True. A message carrying an error for a
    partition being read (a fetch the broker refused: not authorised, say) raises :class:`ControlTopicMissing` or
    ``topic_replay.TopicUnavailable`` in the broker's words; skipped, it left the read waiting to its timeout, "not
    read to the end". An end of partition, or an event of no partition of the read (the client's own, a broker
    connection lost and retried), passes: False."""
    from confluent_kafka import KafkaError

    from infra.clients.topic_replay import topic_unavailable

    topic, partition, offset, error = msg.topic(), msg.partition(), msg.offset(), msg.error()
    if error is not None:
        if topic is None or partition is None or (topic, partition) not in ends:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return False
        raise _deleted_since(topic, error) or topic_unavailable(topic, error, partition)
    assert topic is not None and partition is not None and offset is not None, "a record has all three"
    apply(topic, msg.key(), msg.value())
    last[(topic, partition)] = offset
    return True


def _end(reader, topic: str, partition: int, bound: _Bound, beat: Callable[[], object] | None, timeout_s: float) -> int:
    """:func:`end_offset` within the read's ``bound`` (its deadline, its stop); a topic that no longer exists once its
    retries are over is :class:`ControlTopicMissing`."""
    from confluent_kafka import KafkaException

    try:
        return end_offset(reader, topic, partition, timeout_s, beat=beat, deadline=bound.deadline, stop=bound.stop)
    except KafkaException as exc:
        if (missing := _deleted_since(topic, exc.args[0])) is not None:
            raise missing from exc
        raise


def _offsets_since(
    reader, partitions: set[tuple[str, int]], since_ms: int, timeout_s: float
) -> dict[tuple[str, int], int]:
    """Per partition, the offset of the first record written at or after ``since_ms`` (``OFFSET_END``: none); a
    partition the broker answers with an error is ``topic_replay.TopicUnavailable`` in the broker's words, as every
    reader of a topic words it (not the client's error object, ``KafkaError{code=...}``)."""
    from confluent_kafka import TopicPartition

    from infra.clients.topic_replay import topic_unavailable

    found = reader.offsets_for_times([TopicPartition(t, p, since_ms) for t, p in partitions], timeout=timeout_s)
    for tp in found:
        if tp.error is not None:
            raise _deleted_since(tp.topic, tp.error) or topic_unavailable(tp.topic, tp.error, tp.partition)
    return {(tp.topic, tp.partition): tp.offset for tp in found}
