"""The watchlist service rides out a broker that is away: a failed transaction is retried or aborted and
redone; the input's offset is committed afterwards, without blocking."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from jobs.faces import watchlist_service
from jobs.faces.watchlist_service import Out, WatchlistService
from schemas.topics import AUDIT


class FlakyTransactions:
    """A transactional producer whose first transactions fail as a restarting broker makes them fail."""

    def __init__(self, failures: list[KafkaError]) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.committed: list[list[bytes]] = []
        self._open: list[bytes] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self._open = []

    def produce(self, topic: str, key: bytes, value: bytes | None) -> None:
        self._open.append(key)

    def send_offsets_to_transaction(self, offsets, metadata, timeout: float) -> None:
        raise AssertionError("blocks for good when the group coordinator restarts (librdkafka 5456)")

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        if self.failures:
            raise KafkaException(self.failures.pop(0))
        self.committed.append(self._open)

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self._open = []


class Group:
    def __init__(self) -> None:
        self.commits: list[list] = []

    def consumer_group_metadata(self) -> object:
        return object()

    def commit(self, offsets: list, asynchronous: bool) -> None:
        assert asynchronous, "a commit must not block while the coordinator is away"
        self.commits.append(offsets)


def service(producer: FlakyTransactions) -> WatchlistService:
    svc = WatchlistService.__new__(WatchlistService)
    svc.producer, svc.consumer, svc.prefix, svc._stop = producer, Group(), "", False
    return svc


def test_a_transaction_failing_while_the_broker_restarts_is_retried_and_lands_once_then_its_offset(
    monkeypatch,
) -> None:
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    timed_out = KafkaError(KafkaError._TIMED_OUT, "coordinator away", retriable=True)
    abortable = KafkaError(KafkaError._STATE, "needs abort", txn_requires_abort=True)
    producer = FlakyTransactions([timed_out, abortable])
    svc = service(producer)
    svc._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    assert producer.committed == [[b"a-1"]], "the outputs landed once"
    assert producer.calls == ["begin", "commit", "commit", "abort", "begin", "commit"]
    assert svc.consumer.commits == [["offset"]], "the offset moves after the outputs, once"


def test_a_fatal_error_is_not_retried(monkeypatch) -> None:
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    producer = FlakyTransactions([KafkaError(KafkaError._FENCED, "fenced", fatal=True)])
    svc = service(producer)
    with pytest.raises(KafkaException):
        svc._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    assert producer.committed == [] and svc.consumer.commits == []


def test_a_long_start_up_read_keeps_the_service_alive_and_goes_on_while_records_come(monkeypatch) -> None:
    """A year of audit takes longer to read than any fixed deadline: the read must fail only when records stop
    coming, and /healthz must not call the service hung while it reads (its supervisor would restart it, and the
    restart would read it all again)."""
    from infra.clients import control_topics
    from infra.metrics import Heartbeat

    now = [0.0]
    svc = WatchlistService.__new__(WatchlistService)
    svc.settings = watchlist_service.Settings()
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    calls: list[dict] = []

    def read(_settings, apply, **kwargs) -> dict:
        calls.append(kwargs)
        for _ in range(600):  # ten minutes of records, one a second
            now[0] += 1.0
            apply(AUDIT.full_name(""), b"command:c1", b"v")
            assert svc.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of reading"
        return {}

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    read_keys: list[bytes | None] = []
    assert svc.replay(AUDIT, lambda key, _value: read_keys.append(key)) == 600 == len(read_keys)
    assert calls[0]["stall_s"] is not None and calls[0]["timeout_s"] < svc.heartbeat.stale_s
