"""The dashboard's read of ``audit``: the case service's outcomes of the case page's verdicts
(:mod:`sinks.dashboard.outcomes`), for ``GET /api/cases/<case>/commands/<command id>``.

Started by the first question of an outcome (a dashboard may never get one, and one that never does opens no
consumer), it reads every partition of ``audit`` from :data:`LOOKBACK_MS` before then and follows it in a daemon
thread until :meth:`AuditOutcomes.close` at the stop: assigned reads (no consumer group joined, no offset committed),
committed transactions only, as the case service writes its outcomes. The look back is what lets a page that asks
again after the dashboard restarted (or a second dashboard behind the same address) still learn an outcome written
before. Only the outcomes of dashboard commands are kept (:class:`~sinks.dashboard.outcomes.OutcomeBook`), told by
their keys before anything is decoded. Kafka away: the outcomes read so far are still answered, :meth:`problem` says
why no more come, and the read starts again after :data:`RETRY_S`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infra import clock
from infra.clients.kafka import topic_unavailable
from infra.clients.topic_replay import assigned_consumer
from infra.settings import Settings
from schemas.topics import AUDIT
from sinks.dashboard.outcomes import CommandOutcome, OutcomeBook

log = logging.getLogger(__name__)

LOOKBACK_MS = 3_600_000
"""How far back in ``audit`` the read starts: the outcomes a page may still be asking about."""
RETRY_S = 10.0
"""The wait before the read starts again after Kafka failed it (the topic missing, the cluster away)."""
METADATA_TIMEOUT_S = 10.0
BATCH = 500
POLL_S = 0.5


class AuditOutcomes:
    """The case page's command outcomes, read from ``audit`` (see the module). ``consumer`` makes the Kafka
    consumer (tests give a fake)."""

    def __init__(
        self,
        settings: Settings,
        *,
        book: OutcomeBook | None = None,
        consumer: Callable[[], Any] | None = None,
        now_ms: Callable[[], int] = clock.now_ms,
        retry_s: float = RETRY_S,
    ) -> None:
        self.topic = AUDIT.full_name(settings.kafka.topic_prefix)
        self.book = book or OutcomeBook()
        self._consumer = consumer or (lambda: assigned_consumer(settings.kafka, "dashboard-outcomes", "latest"))
        self.now_ms, self.retry_s = now_ms, retry_s
        self._problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def get(self, command_id: str) -> CommandOutcome | None:
        """The outcome of ``command_id`` read so far (the read starts with the first question)."""
        self.start()
        return self.book.get(command_id)

    def problem(self) -> str | None:
        """Why no outcome may be read now (Kafka away, the topic missing), or None."""
        return self._problem

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="dashboard-outcomes", daemon=True)
                self._thread.start()

    def close(self, timeout_s: float) -> None:
        """End the read (after its current poll, at most :data:`POLL_S`), waiting for it at most ``timeout_s``."""
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout_s))

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            consumer = None
            try:
                consumer = self._consumer()
                self.assign(consumer)
                if failing:
                    log.info("case page outcomes: reading %s again", self.topic)
                failing = False
                while not self._stop.is_set():
                    self.poll(consumer)
            except Exception as exc:  # noqa: BLE001 - Kafka away or the topic missing: answered as not known, retried
                self._problem = f"{self.topic} not read ({str(exc) or type(exc).__name__})"
                log.log(logging.DEBUG if failing else logging.WARNING, "case page outcomes: %s", self._problem)
                failing = True
                self._stop.wait(self.retry_s)
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception as exc:  # noqa: BLE001 - closing what failed: nothing left to do with it
                        log.debug("case page outcomes: closing the consumer: %s", exc)

    def assign(self, consumer: Any) -> None:
        """Every partition of ``audit``, from the first record written :data:`LOOKBACK_MS` ago (its end where none
        was); raises where the topic or a partition cannot be read."""
        listed = consumer.list_topics(self.topic, timeout=METADATA_TIMEOUT_S).topics.get(self.topic)
        if listed is None or listed.error is not None:
            error = listed.error if listed is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            raise topic_unavailable(self.topic, error)
        since = self.now_ms() - LOOKBACK_MS
        marks = [TopicPartition(self.topic, p, since) for p in sorted(listed.partitions)]
        found = consumer.offsets_for_times(marks, timeout=METADATA_TIMEOUT_S)
        for tp in found:
            if tp.error is not None:
                raise topic_unavailable(self.topic, tp.error, tp.partition)
        consumer.assign(found)
        self._problem = None

    def poll(self, consumer: Any) -> int:
        """One poll: the outcomes among what came, kept; how many."""
        kept = 0
        for message in consumer.consume(num_messages=BATCH, timeout=POLL_S):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.fatal():
                    raise KafkaException(error)
                log.debug("case page outcomes: %s", error)
                continue
            kept += self.book.take(message.key(), message.value(), self.now_ms()) is not None
        return kept
