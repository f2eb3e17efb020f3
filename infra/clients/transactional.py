"""Consume, decide, publish in one Kafka transaction, then commit: the loop the watchlist and case services share.

Each service turns an input record (:class:`Source`) into output records (:class:`Out`) with pure code, then
calls :func:`publish`: the outputs go out in one transaction (all land or none), and only then are the inputs'
offsets committed. A crash between the two replays the inputs, which the services recognise (their audit
ids) and skip, so nothing is doubled and nothing lost.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaException

from infra import metrics
from infra.clients.control_topics import ReadStopped, ReadStopRequested
from infra.clients.kafka import error_named as error_named  # the services name Kafka errors so too
from infra.processes import chance_left, done_by, in_daemon
from infra.retry import Backoff
from schemas.errors import CheckoutGuardError
from schemas.topics import COMPACTION_MARKER, DEAD_LETTERS, TopicSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

PUBLISH_RETRY_S = 240.0
"""How long a transaction is retried while Kafka is away (the consumer's max.poll.interval.ms is 300 s)."""
KAFKA_CALL_S = 30.0
"""How long one transaction call (commit, abort) may wait on the brokers while the service runs."""
STOP_POLL_S = 0.1
"""How often a wait on Kafka in :func:`publish` looks whether the stop was asked, whose deadline then bounds it."""


class TransactionGivenUp(CheckoutGuardError, RuntimeError):
    """:func:`publish` gave its transaction up at the stop's deadline (``exit_by``), Kafka not done with it: its inputs'
    offsets are not committed, so they are read again at the next start (skipped there if it landed after all). Also a
    start-up call (:func:`init_transactions`, a start-up read) given up at that deadline (:func:`bounded`), and the
    watchlist service's Rekognition or S3 call or local image store's file operation under way
    (:func:`infra.clients.aws.given_up_by`: its command then not committed, read again)."""


STOP_ERRORS = (TransactionGivenUp, ReadStopped, KafkaException, BufferError)
"""What ends a service's Kafka work once its stop is asked (:func:`given_up_at_stop`): the stop's deadline, a start-up
read stopped by it, or a Kafka error (a commit, the consumer's close) as the brokers go away."""


def given_up_at_stop(service: str, exc: BaseException) -> None:
    """Say, in one WARNING, that ``service``'s stop gave up its Kafka work on ``exc`` (one of :data:`STOP_ERRORS`,
    raised once the stop was asked). Nothing is committed after such an error, so the inputs not committed are read
    again at the next start: the process exits 0, where a traceback and exit 1 made a stop with Kafka gone look like a
    crash. A Kafka error is named by its type and code only (:func:`error_named`), never its words nor a record; a
    give-up of our own (the stop's deadline) by what was not finished. A start-up read the stop itself cut short
    (:class:`ReadStopRequested`) lost nothing: one INFO line, where a WARNING made a plain stop look like a loss."""
    if isinstance(exc, ReadStopRequested):
        log.info("%s: start-up read stopped by the stop request (%s); it is read again at the next start", service, exc)
        return
    if isinstance(exc, KafkaException):
        why = f"Kafka failed ({error_named(exc)})"
    elif isinstance(exc, BufferError):
        why = f"Kafka's local queue was full ({error_named(exc)})"
    elif isinstance(exc, CheckoutGuardError):
        why = str(exc)  # our own words: what the deadline cut short
    else:
        why = error_named(exc)
    log.warning(
        "%s: %s after the stop was asked; given up: the inputs not committed are read again at the next start, and "
        "skipped there if their transaction landed after all",
        service,
        why,
    )


def close_failed(service: str, exc: Exception, stopping: bool, ended_by: BaseException | None) -> None:
    """``service``'s consumer's close failed with ``exc`` as the service ended. Once the stop is asked a Kafka error is
    :func:`given_up_at_stop`; after the loop's own error (``ended_by``, which says why the service ended, and which the
    caller's ``finally`` goes on raising) one WARNING naming the close's error by its type and Kafka code only
    (:func:`error_named`), never its words: raised from that ``finally`` it hid the loop's error. Otherwise ``exc`` is
    raised, as before."""
    if stopping and isinstance(exc, STOP_ERRORS):
        given_up_at_stop(service, exc)
    elif ended_by is not None:
        log.warning(
            "%s: the consumer's close failed too (%s); the error that ended the service is raised",
            service,
            error_named(exc),
        )
    else:
        raise exc


def close_consumer(
    service: str,
    consumer: Any,
    deadline: float,
    stop_asked: Callable[[], bool],
    ended_by: BaseException | None,
    thread_name: str,
) -> None:
    """Close ``service``'s consumer (it leaves the group) in a daemon thread ``thread_name``, given up at ``deadline``
    (``time.monotonic()``): with Kafka down the close waited on the brokers as long as it took, past the supervisor's
    SIGKILL. No offset is committed by it (the inputs' are committed after their transaction), so nothing is lost:
    given up, one WARNING. Its error is :func:`close_failed`'s, ``stop_asked()`` read once it failed."""
    try:
        if not done_by(consumer.close, deadline, thread_name):
            log.warning(
                "%s: Kafka did not take the consumer's close before the supervisor's stop timeout; the inputs not "
                "committed are read again at the next start",
                service,
            )
    except Exception as exc:  # noqa: BLE001 - a WARNING at a stop or after the loop's own error, else raised
        close_failed(service, exc, stop_asked(), ended_by)


def bounded(
    call: Callable[[], T],
    what: str,
    exit_by: Callable[[], float | None],
    name: str = "kafka-call",
    whose: str = "Kafka",
) -> T:
    """``call()``'s result (a Kafka call that waits on the brokers: a transaction's commit up to :data:`KAFKA_CALL_S`, a
    start-up read of a topic; or another service's, ``whose``, as a Rekognition call with its retries) from a daemon
    thread ``name``, waited for until it ends, or once the stop is asked (``exit_by()`` not None) until that deadline:
    in the main thread, a 30 s commit with Kafka down held the stop past the supervisor's SIGKILL. Its exception is
    raised; :class:`TransactionGivenUp` (naming ``what``) when the deadline came first (the call is left to end on its
    own)."""
    future = in_daemon(call, name)
    while True:
        by = exit_by()
        # waited apart from its result: the call's own TimeoutError (a read stopped) was taken for the wait's
        futures_wait([future], timeout=STOP_POLL_S if by is None else chance_left(by))
        if future.done():
            return future.result()
        if by is not None:
            raise TransactionGivenUp(f"{whose} did not finish {what} before the supervisor's stop timeout")


def init_transactions(producer: Any, exit_by: Callable[[], float | None]) -> None:
    """The transactional producer's start (``init_transactions``, which waits on the brokers up to
    :data:`KAFKA_CALL_S`), ended by the stop's deadline as a commit is (:func:`bounded`): a stop asked while it waited
    on Kafka (down) was held up to 30 s, past the supervisor's SIGKILL."""
    bounded(lambda: producer.init_transactions(KAFKA_CALL_S), "the producer's start", exit_by, "kafka-init")


@dataclass(frozen=True)
class Out:
    """One record to publish: topic, key, value (``None`` = tombstone), Kafka headers (a signed command's
    signature)."""

    topic: TopicSpec
    key: bytes
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    reason: str | None = None
    """A dead letter's error kind (its metric label)."""


@dataclass(frozen=True)
class Source:
    """Where an input record came from (for dead letters and refusals)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, Any], ...] = ()
    """Kafka headers (the command signature); confluent-kafka gives ``(name, bytes | None)`` pairs."""
    written_at: int | None = None
    """The record's Kafka timestamp (ms): a command's freshness is judged by when it reached Kafka, so one
    given while a service was down or behind is still applied when it catches up."""


def source_of(msg: Any) -> Source:
    """The :class:`Source` of a consumed confluent-kafka message."""
    from infra.clients.kafka import written_at_ms

    headers = tuple(msg.headers() or ())
    return Source(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), headers, written_at_ms(msg))


def publish(
    producer: Any,
    consumer: Any,
    prefix: str,
    process: str,
    outs: Sequence[Out],
    offsets: list,
    *,
    beat: Callable[[str | None], None] = lambda _problem: None,
    stopping: Callable[[], bool] = lambda: False,
    exit_by: Callable[[], float | None] = lambda: None,
) -> None:
    """The outputs in one transaction (all land or none), then the inputs' offsets.

    A broker that is away (restarting, a leader moving) fails the transaction with a retriable or abortable
    error: it is aborted and tried again with backoff, for up to :data:`PUBLISH_RETRY_S` (less than the
    consumer's poll interval, after which the group has moved on), with ``beat("Kafka unreachable")`` for
    the health check. Past that, on a fatal error, or once ``stopping()``, the error propagates: the process
    exits non-zero and resumes from the last commit. Records are counted once their transaction committed.

    ``exit_by()`` is the stop's deadline once the stop is asked (None before): the transaction's commit, its abort
    and the backoff between tries end by it, even one under way when the stop came; the transaction is then given
    up (:class:`TransactionGivenUp`) and no offset is committed.
    """
    backoff = Backoff(initial_s=0.5, maximum_s=10.0)
    give_up_at = time.monotonic() + PUBLISH_RETRY_S
    attempt = 0
    while outs:
        try:
            _transaction(producer, prefix, outs, lambda: stopping() or time.monotonic() > give_up_at, beat, exit_by)
            count(process, outs)
            break
        except (KafkaException, BufferError) as exc:
            err = exc.args[0] if isinstance(exc, KafkaException) else None
            if (err is not None and err.fatal()) or stopping() or time.monotonic() > give_up_at:
                raise
            beat("Kafka unreachable")
            log.warning("publishing failed (%s); aborting and trying again", error_named(exc))
            with contextlib.suppress(KafkaException):  # nothing to abort is fine too
                bounded(
                    lambda: producer.abort_transaction(KAFKA_CALL_S), "the transaction's abort", exit_by, "kafka-abort"
                )
            _pause(backoff.delay(attempt), exit_by)
            attempt += 1
    if offsets:  # never blocks; one that fails is covered by the next one, or replayed as a no-op
        consumer.commit(offsets=offsets, asynchronous=True)


def _transaction(
    producer: Any,
    prefix: str,
    outs: Sequence[Out],
    give_up: Callable[[], bool],
    beat: Callable[[str | None], None] = lambda _problem: None,
    exit_by: Callable[[], float | None] = lambda: None,
) -> None:
    """One transaction of ``outs``; a retriable commit error is retried until ``give_up()`` (stopping, or past the
    caller's deadline), an abortable one is raised for the caller to abort and redo. Each retry beats
    ``beat("Kafka unreachable")``: a commit waits up to 30 s per try, and a few of them unbeaten turned ``/healthz``
    to 503, so the supervisor restarted a service that was only waiting for Kafka. Each commit ends by the stop's
    deadline (:func:`bounded`)."""
    producer.begin_transaction()
    for out in outs:
        extra = {"headers": list(out.headers)} if out.headers else {}
        producer.produce(out.topic.full_name(prefix), key=out.key, value=out.value, **extra)
    while True:
        try:
            bounded(
                lambda: producer.commit_transaction(KAFKA_CALL_S), "the transaction's commit", exit_by, "kafka-commit"
            )
            return
        except KafkaException as exc:
            if not exc.args[0].retriable() or give_up():
                raise  # abortable: the caller aborts and redoes the whole transaction
            beat("Kafka unreachable")  # waiting on purpose is progress; /readyz says on what


def _pause(delay_s: float, exit_by: Callable[[], float | None]) -> None:
    """Sleep ``delay_s`` between two tries, ended once the stop is asked (:class:`TransactionGivenUp`: a stop
    gives the transaction up rather than try it again)."""
    end = time.monotonic() + delay_s
    while (left := end - time.monotonic()) > 0:
        if exit_by() is not None:
            raise TransactionGivenUp("the stop came while Kafka was waited for between two tries")
        time.sleep(min(STOP_POLL_S, left))


def count(process: str, outs: Sequence[Out]) -> None:
    """Count a committed transaction's records: dead letters by reason, the others by topic (tombstones apart). The
    compaction marker is housekeeping, not a record of the service's (no entry nor case ends by it): counted as a
    ``<topic>_tombstone`` it showed as a forget or a removed case every hour on a quiet topic."""
    for out in outs:
        if out.key == COMPACTION_MARKER and out.value is None:
            continue
        if out.topic == DEAD_LETTERS:
            metrics.DEAD_LETTERS.labels(process, out.reason or "unknown").inc()
        else:
            kind = out.topic.name if out.value is not None else f"{out.topic.name}_tombstone"
            metrics.RECORDS_OUT.labels(process, kind).inc()
