"""The read of the control topics: an overall ``deadline`` (and ``stop``) bounds the whole read, where each metadata
call used to take its own ``timeout_s`` (about ``timeout_s`` x (partitions + 3) with a slow broker)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from infra.clients import control_topics
from infra.clients import kafka as kafka_clients
from infra.settings import Settings
from schemas.topics import RULES
from tests.builders import partitions_led

TOPIC = RULES.full_name(Settings().kafka.topic_prefix)


class SlowBroker:
    """A consumer of ``partitions`` partitions of ``records`` records each, on the test's clock ``now``: each metadata
    call takes ``delay_s`` or, where its timeout is shorter, fails with a timeout at its end (as librdkafka's do); each
    poll hands out the next record at once, or none after waiting its whole timeout."""

    def __init__(self, now: list[float], delay_s: float, partitions: int, records: int = 1) -> None:
        self.now, self.delay_s, self.records = now, delay_s, records
        self.partitions = partitions
        self.timeouts: list[float] = []
        self.polls: list[float] = []
        self.queue = [(p, o) for p in range(partitions) for o in range(records)]
        self.read: dict[int, int] = {}
        self.closed = False

    def _metadata(self, timeout: float) -> None:
        self.timeouts.append(timeout)
        self.now[0] += min(self.delay_s, timeout)
        if self.delay_s > timeout:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    def list_topics(self, topic: str, timeout: float) -> Any:
        self._metadata(timeout)
        meta = SimpleNamespace(error=None, partitions=partitions_led(self.partitions))
        return SimpleNamespace(topics={topic: meta})

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self._metadata(timeout)
        return 0, self.records

    def assign(self, _partitions: list[TopicPartition]) -> None:
        pass

    def poll(self, timeout: float) -> Message | None:
        self.polls.append(timeout)
        if not self.queue:
            self.now[0] += timeout
            return None
        partition, offset = self.queue.pop(0)
        self.read[partition] = offset + 1
        return Message(topic=TOPIC, partition=partition, offset=offset, value=b"v")

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.read.get(p.partition, 0)) for p in partitions]

    def close(self) -> None:
        self.closed = True


def _broker(monkeypatch: pytest.MonkeyPatch, broker: SlowBroker) -> None:
    monkeypatch.setattr(control_topics.time, "monotonic", lambda: broker.now[0])
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: broker)


def test_a_slow_metadata_call_waits_only_the_time_left_before_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call had its full ``timeout_s``: a read due to end at 7 s went on to 5 s x (partitions + 1)."""
    broker = SlowBroker([0.0], delay_s=3.0, partitions=4)
    _broker(monkeypatch, broker)
    with pytest.raises(control_topics.ReadStopped, match="deadline"):
        control_topics.read_control_topics(Settings(), lambda *_: None, timeout_s=5.0, specs=(RULES,), deadline=7.0)
    assert broker.timeouts == [5.0, 4.0, 1.0], "the partitions (3 s), one end (3 s), then 1 s left for the next"
    assert broker.now[0] == 7.0 and broker.closed


def test_the_read_stops_at_the_deadline_its_polls_no_longer_than_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records stop coming before the end: the read waited out its own ``timeout_s`` (20 s), past the caller's
    deadline."""
    broker = SlowBroker([0.0], delay_s=0.0, partitions=1, records=3)
    broker.queue = broker.queue[:1]  # the end is at 3, only one record comes
    _broker(monkeypatch, broker)
    read: list[bytes | None] = []
    with pytest.raises(control_topics.ReadStopped):
        control_topics.read_control_topics(
            Settings(), lambda _t, _k, v: read.append(v), timeout_s=20.0, specs=(RULES,), deadline=0.5
        )
    assert read == [b"v"] and broker.closed
    assert broker.now[0] == pytest.approx(0.5), "past the deadline"
    assert broker.polls[-1] == pytest.approx(0.1), "the last poll waits only the time left"


def test_a_read_told_to_stop_stops_before_its_next_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = SlowBroker([0.0], delay_s=0.0, partitions=1, records=5)
    _broker(monkeypatch, broker)
    stop, read = threading.Event(), []

    def apply(_topic: str, _key: bytes | None, value: bytes | None) -> None:
        read.append(value)
        stop.set()

    with pytest.raises(control_topics.ReadStopped, match="stopped"):
        control_topics.read_control_topics(Settings(), apply, timeout_s=20.0, specs=(RULES,), stop=stop)
    assert len(read) == 1 and len(broker.polls) == 1 and broker.closed


@pytest.mark.parametrize("stopped_first", [True, False])
def test_a_broker_error_of_a_call_under_way_when_the_stop_came_is_the_stops(
    monkeypatch: pytest.MonkeyPatch, stopped_first: bool
) -> None:
    """The stop came while the listing waited on the broker, which then answered with an error: the read, stopped
    anyway, is the stop's (ReadStopRequested, an INFO at the services' stop), not the broker's (a WARNING, as though
    something was lost). The same error with no stop asked stays the broker's."""
    stop = threading.Event()
    refused = KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))

    class Reader:
        closed = False

        def list_topics(self, topic: str, timeout: float) -> None:
            if stopped_first:
                stop.set()  # SIGTERM while the broker answers
            raise refused

        def close(self) -> None:
            self.closed = True

    reader = Reader()
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: reader)
    expected = control_topics.ReadStopRequested if stopped_first else KafkaException
    with pytest.raises(expected) as got:
        control_topics.read_control_topics(Settings(), lambda *_a: None, timeout_s=20.0, specs=(RULES,), stop=stop)
    assert type(got.value) is expected
    assert (got.value.__cause__ if stopped_first else got.value) is refused
    assert reader.closed


def test_without_a_deadline_each_metadata_call_has_its_own_timeout_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """Existing callers (no ``deadline``, no ``stop``) read as they did: 3 s per call, 15 s of calls within 5 s
    timeouts, to the end."""
    broker = SlowBroker([0.0], delay_s=3.0, partitions=4, records=2)
    _broker(monkeypatch, broker)
    last = control_topics.read_control_topics(Settings(), lambda *_: None, timeout_s=5.0, specs=(RULES,))
    assert broker.timeouts == [5.0] * 5 and broker.polls == [0.2] * 8
    assert last == {(TOPIC, p): 1 for p in range(4)} and broker.now[0] == 15.0


class Listing(SlowBroker):
    """A broker whose listing of the topic is ``topics`` (``{}``: not listed at all)."""

    def __init__(self, topics: dict[str, Any]) -> None:
        super().__init__([0.0], delay_s=0.0, partitions=1)
        self.topics = topics

    def list_topics(self, topic: str, timeout: float) -> Any:
        return SimpleNamespace(topics=self.topics)


@pytest.mark.parametrize(
    "topics",
    [{}, {TOPIC: SimpleNamespace(error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), partitions={})}],
    ids=["not-listed", "listed-unknown"],
)
def test_a_control_topic_not_listed_or_listed_unknown_is_missing_alike(
    monkeypatch: pytest.MonkeyPatch, topics: dict[str, Any]
) -> None:
    """Judged by ``listed_topic`` as every tool is: a topic not listed ended the read with a ``KeyError``, one listed
    as unknown with a ``RuntimeError`` carrying the client's error object."""
    broker = Listing(topics)
    _broker(monkeypatch, broker)
    with pytest.raises(control_topics.ControlTopicMissing) as missing:
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,))
    assert str(missing.value) == f"topic {TOPIC} does not exist on the cluster" and broker.closed


@pytest.mark.parametrize("code", [KafkaError.LEADER_NOT_AVAILABLE, KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_a_control_topic_the_broker_answers_with_an_error_is_named_in_the_brokers_words(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """It exists: not missing, and worded as the tools word it, not as ``KafkaError{code=...,val=...,str=...}``."""
    from infra.clients.topic_replay import TopicUnavailable

    error = KafkaError(code)
    _broker(monkeypatch, Listing({TOPIC: SimpleNamespace(error=error, partitions={})}))
    with pytest.raises(TopicUnavailable) as unavailable:
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,))
    assert not isinstance(unavailable.value, control_topics.ControlTopicMissing)
    assert str(unavailable.value) == f"topic {TOPIC}: the broker answered {error.str()} ({error.name()})"


def test_a_control_topic_with_a_partition_without_a_leader_stops_the_read_at_once_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing was judged by the topic's own error only: a partition listed without a leader had its end asked
    of no leader, and the start-up read waited to its timeout without naming it."""
    from infra.clients.topic_replay import TopicUnavailable

    partitions = partitions_led(3)
    partitions[1].leader = -1
    broker = Listing({TOPIC: SimpleNamespace(error=None, partitions=partitions)})
    _broker(monkeypatch, broker)
    with pytest.raises(TopicUnavailable, match=rf"^topic {TOPIC} partition 1: no leader") as unavailable:
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,), timeout_s=30)
    assert not isinstance(unavailable.value, control_topics.ControlTopicMissing)
    assert broker.timeouts == [] and broker.now == [0.0], "no partition's end was asked"
    assert broker.closed


class RefusesOffsetsByTime(SlowBroker):
    """A broker that answers the offsets by time of partition 0 with ``error``."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__([0.0], delay_s=0.0, partitions=1)
        self.error = error

    def offsets_for_times(self, partitions: list[TopicPartition], timeout: float) -> list[Any]:
        return [
            SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=-1, error=self.error) for tp in partitions
        ]


def test_offsets_by_time_the_broker_refuses_are_named_in_the_brokers_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read's error carried the client's error object (``KafkaError{code=...,val=...,str=...}``), not the broker's
    words as every other reader of a topic gives them."""
    from infra.clients.topic_replay import TopicUnavailable

    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    broker = RefusesOffsetsByTime(error)
    _broker(monkeypatch, broker)
    with pytest.raises(TopicUnavailable) as refused:
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,), since_ms=1_000)
    assert str(refused.value) == f"topic {TOPIC} partition 0: the broker answered {error.str()} ({error.name()})"
    assert "KafkaError{" not in str(refused.value) and broker.closed


class DeletedSinceListed(SlowBroker):
    """A broker that lists the topic, then answers its partition's end with UNKNOWN_TOPIC_OR_PART (deleted since),
    each try taking a second of the test's clock."""

    def __init__(self) -> None:
        super().__init__([0.0], delay_s=0.0, partitions=1)

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self.now[0] += 1.0
        raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))


def test_a_control_topic_deleted_after_it_was_listed_is_missing_by_its_error_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its end's ``KafkaException`` went out as it was, and a caller told a missing topic by the words in its message
    (the OpenSearch sink looked for "UNKNOWN_TOPIC")."""
    broker = DeletedSinceListed()
    _broker(monkeypatch, broker)
    with pytest.raises(control_topics.ControlTopicMissing, match=f"topic {TOPIC} does not exist on the cluster"):
        control_topics.read_control_topics(Settings(), lambda *_: None, timeout_s=1.5, specs=(RULES,))
    assert broker.closed


class RefusesReads(SlowBroker):
    """A broker that answers the read of partition 1 (of 2) with ``error``, as librdkafka hands a fetch error: a
    message of that partition carrying it; a client-wide event (no topic, a lost connection) comes first."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__([0.0], delay_s=0.0, partitions=2)
        self.queue = [(0, 0)]  # partition 0's record; partition 1's never comes
        self.events = [
            Message(error=KafkaError(KafkaError._TRANSPORT)),
            Message(topic=TOPIC, partition=1, error=error),
        ]

    def poll(self, timeout: float) -> Message | None:
        if self.queue:
            return super().poll(timeout)
        if self.events:
            self.polls.append(timeout)
            return self.events.pop(0)
        return super().poll(timeout)


def test_a_read_the_broker_refuses_is_named_in_the_brokers_words_not_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refused partition's messages were skipped as if they were nothing: the read waited out its timeout and
    said "control topics not read to their end", the broker's TOPIC_AUTHORIZATION_FAILED unsaid."""
    from infra.clients.topic_replay import TopicUnavailable

    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    broker = RefusesReads(error)
    _broker(monkeypatch, broker)
    read: list[bytes | None] = []
    with pytest.raises(TopicUnavailable) as refused:
        control_topics.read_control_topics(Settings(), lambda _t, _k, v: read.append(v), timeout_s=5.0, specs=(RULES,))
    assert str(refused.value) == f"topic {TOPIC} partition 1: the broker answered {error.str()} ({error.name()})"
    assert read == [b"v"] and broker.now[0] == 0.0 and broker.closed, "at once, past the client-wide event"


def test_a_close_failing_after_the_reads_own_error_leaves_that_error_raised_and_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer's close, failing too (Kafka gone), was raised from the read's ``finally`` in place of the read's
    error, which said why the read failed; it is one WARNING naming its type and Kafka code, never its words. A close
    failing after a read that succeeded is still raised: nothing else says it."""

    class ClosesBadly(Listing):
        def close(self) -> None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "close refused: key=secret-card-token"))

    _broker(monkeypatch, ClosesBadly({}))
    with caplog.at_level("WARNING"), pytest.raises(control_topics.ControlTopicMissing):
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"closing the read of {TOPIC} after its error failed too (KafkaException _TRANSPORT)"], said
    ok = ClosesBadly({})
    ok.list_topics = SlowBroker.list_topics.__get__(ok)  # type: ignore[method-assign]
    _broker(monkeypatch, ok)
    with pytest.raises(KafkaException):
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,))


@pytest.mark.parametrize("code", [KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.TOPIC_AUTHORIZATION_FAILED])
@pytest.mark.parametrize("stopped_first", [True, False])
def test_a_topic_found_missing_or_unavailable_once_the_stop_came_is_the_stops(
    monkeypatch: pytest.MonkeyPatch, code: int, stopped_first: bool
) -> None:
    """The stop came while the listing waited on the broker, which then listed the topic as unknown or answered for it
    with an error: the read ended with that error, which the services' stop took for a crash (a traceback). It is the
    stop's (ReadStopRequested); with no stop asked it stays itself."""
    from infra.clients.topic_replay import TopicUnavailable

    stop = threading.Event()

    class Answers(Listing):
        def list_topics(self, topic: str, timeout: float) -> Any:
            if stopped_first:
                stop.set()
            return super().list_topics(topic, timeout)

    broker = Answers({TOPIC: SimpleNamespace(error=KafkaError(code), partitions={})})
    _broker(monkeypatch, broker)
    cause = control_topics.ControlTopicMissing if code == KafkaError.UNKNOWN_TOPIC_OR_PART else TopicUnavailable
    with pytest.raises((control_topics.ReadStopRequested, cause)) as got:
        control_topics.read_control_topics(Settings(), lambda *_: None, specs=(RULES,), stop=stop)
    if stopped_first:
        assert type(got.value) is control_topics.ReadStopRequested and type(got.value.__cause__) is cause
    else:
        assert type(got.value) is cause
    assert broker.closed


def test_a_stop_during_the_retries_of_a_partitions_end_ends_them_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A just-created topic (no leader yet): its end was asked again every 0.25 s until the read's own timeout (20 s),
    whatever the stop. The stop now ends the retries at the wait after the try under way."""
    import time

    stop = threading.Event()
    tries: list[float] = []

    class NoLeaderYet(SlowBroker):
        def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
            tries.append(timeout)
            if len(tries) == 2:
                stop.set()  # SIGTERM between two tries
            raise KafkaException(KafkaError(KafkaError.LEADER_NOT_AVAILABLE))

    broker = NoLeaderYet([0.0], delay_s=0.0, partitions=1)
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: broker)
    started = time.monotonic()
    with pytest.raises(control_topics.ReadStopRequested, match="stopped by its caller"):
        control_topics.read_control_topics(Settings(), lambda *_: None, timeout_s=20.0, specs=(RULES,), stop=stop)
    assert len(tries) == 2 and time.monotonic() - started < 2.0, f"{len(tries)} tries after the stop"
    assert broker.closed
