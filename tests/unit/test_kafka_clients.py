"""infra.clients.kafka: client configs from the settings + presets + overrides, and the one BufferError loop."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from infra.clients import kafka as kafka_clients
from infra.settings import KafkaSettings, Settings
from schemas.errors import CheckoutGuardError

KAFKA = KafkaSettings(
    bootstrap_servers="127.0.0.1:1",
    security_protocol="SASL_SSL",
    sasl_mechanism="PLAIN",
    sasl_username="u",
    sasl_password="p",
)  # type: ignore[arg-type]
BASE = KAFKA.client_config()


def test_settings_then_presets_then_overrides_with_dots_for_underscores() -> None:
    conf = kafka_clients.config(KAFKA, kafka_clients.RELIABLE, client_id="checkout-guard-pos", compression_type="lz4")
    assert conf == {
        **BASE,
        "client.id": "checkout-guard-pos",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "lz4",
    }
    assert kafka_clients.config(KAFKA, kafka_clients.IDEMPOTENT, linger_ms=0)["linger.ms"] == 0  # override wins


def test_settings_object_or_its_kafka_part() -> None:
    settings = Settings(kafka={"bootstrap_servers": "broker:9092"})
    assert kafka_clients.config(settings) == kafka_clients.config(settings.kafka) == settings.kafka.client_config()


def test_python_client_keys_keep_their_underscores() -> None:
    def on_error(_err: object) -> None: ...

    conf = kafka_clients.config(KAFKA, error_cb=on_error, log_connection_close=False)
    assert conf["error_cb"] is on_error and conf["log.connection.close"] is False


def test_read_committed_consumer_preset() -> None:
    conf = kafka_clients.config(
        KAFKA, kafka_clients.READ_COMMITTED, group_id="g", auto_offset_reset="earliest", group_instance_id="g@host"
    )
    assert conf == {
        **BASE,
        "group.id": "g",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        "group.instance.id": "g@host",
    }


def test_librdkafka_accepts_the_properties_the_call_sites_use() -> None:
    """The ``_`` -> ``.`` spelling yields real property names (librdkafka refuses unknown ones)."""
    kafka_clients.producer(
        KAFKA,
        kafka_clients.RELIABLE,
        client_id="x",
        compression_type="lz4",
        partitioner="murmur2_random",
        batch_num_messages=10,
        queue_buffering_max_messages=100,
    )
    kafka_clients.producer(KAFKA, transactional_id="tx", linger_ms=5)
    kafka_clients.admin(KAFKA, log_connection_close=False)
    consumer = kafka_clients.consumer(
        KAFKA,
        "g",
        kafka_clients.READ_COMMITTED,
        auto_offset_reset="error",
        enable_partition_eof=True,
        group_instance_id="g@h",
        partition_assignment_strategy="cooperative-sticky",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=2_000,
        fetch_wait_max_ms=10,
    )
    consumer.close()
    with pytest.raises(KafkaException, match="No such configuration property"):
        kafka_clients.producer(KAFKA, linger_mss=5)


class FullQueue:
    """A producer whose local queue is full for the first ``full`` sends."""

    def __init__(self, full: int) -> None:
        self.full, self.sent, self.polls = full, [], []

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("Local: Queue full")
        self.sent.append((topic, kwargs))

    def poll(self, timeout: float) -> int:
        self.polls.append(timeout)
        return 0


def test_produce_polls_while_the_queue_is_full() -> None:
    producer = FullQueue(full=2)
    callback = print
    kafka_clients.produce(producer, "t", b"k", b"v", callback, poll_s=0.5)
    assert producer.polls == [0.5, 0.5]
    assert producer.sent == [("t", {"key": b"k", "value": b"v", "on_delivery": callback})]


def test_produce_passes_optional_fields_only_when_given_and_can_wait_instead_of_polling() -> None:
    producer, waits = FullQueue(full=1), []
    kafka_clients.produce(producer, "t", None, b"v", headers=[("h", b"1")], partition=0, timestamp=5, wait=waits.append)
    assert waits == [0.05] and producer.polls == []
    assert producer.sent == [
        ("t", {"key": None, "value": b"v", "headers": [("h", b"1")], "partition": 0, "timestamp": 5})
    ]


class FullForGood(FullQueue):
    """Kafka away: the local queue stays full, and ``poll`` waits as librdkafka's does."""

    def __init__(self) -> None:
        super().__init__(full=10**9)

    def poll(self, timeout: float) -> int:
        super().poll(timeout)
        time.sleep(timeout)
        return 0


def test_produce_at_a_stop_gives_up_a_full_queue_at_the_deadline_or_once_stop_is_set_not_waiting_for_ever() -> None:
    """A record produced at a stop (a dead letter) with Kafka away and the queue full was tried again for ever, past
    the supervisor's SIGKILL. With a ``deadline`` or a ``stop`` it raises :class:`ProduceGivenUp` by then."""
    started = time.monotonic()
    with pytest.raises(kafka_clients.ProduceGivenUp, match="queue was still full"):
        kafka_clients.produce(FullForGood(), "t", b"k", b"v", poll_s=0.5, deadline=time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - started < 0.5, "polls are cut short at the deadline"
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(BufferError):  # ProduceGivenUp is one
        kafka_clients.produce(FullForGood(), "t", b"k", b"v", wait=time.sleep, stop=stop)
    producer = FullQueue(full=3)  # without either, it waits for room as long as it takes
    kafka_clients.produce(producer, "t", b"k", b"v", poll_s=0.01)
    assert len(producer.sent) == 1


SCRAM = KafkaSettings(
    bootstrap_servers="b-1.msk.example:9096",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="checkout-guard",
    sasl_password='pa"ss\\word',
)  # type: ignore[arg-type]


def test_java_clients_log_in_through_jaas_not_librdkafka_keys() -> None:
    conf = SCRAM.java_client_config()
    assert conf == {
        "bootstrap.servers": "b-1.msk.example:9096",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="checkout-guard" password="pa\\"ss\\\\word";',
    }
    assert "sasl.username" not in conf and "sasl.password" not in conf


def test_java_login_module_under_a_shaded_client_and_for_plain() -> None:
    shaded = SCRAM.java_client_config("org.apache.flink.kafka.shaded.")
    assert shaded["sasl.jaas.config"].startswith(
        "org.apache.flink.kafka.shaded.org.apache.kafka.common.security.scram.ScramLoginModule required "
    )
    plain = KAFKA.java_client_config()
    assert (
        plain["sasl.jaas.config"]
        == 'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="p";'
    )


def test_java_config_without_sasl_is_the_connection_only() -> None:
    assert KafkaSettings().java_client_config() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "PLAINTEXT",
    }


def test_a_mechanism_without_a_derivable_java_login_is_refused() -> None:
    with pytest.raises(ValueError, match="GSSAPI"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI").java_client_config()
    with pytest.raises(ValueError, match="sasl_username"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256").java_client_config()


# ---------------------------------------------------------------------------- librdkafka's log, Kafka not answering


def _record(text: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(
        "checkout_guard.kafka", level, __file__, 1, "%s [%s] %s", ("FAIL", "c#producer-1", text), None
    )


REFUSED = (
    "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after {}ms in state CONNECT)"
)


def test_a_repeated_librdkafka_message_is_shown_once_a_minute_whatever_its_millisecond_counts() -> None:
    now = [0.0]
    repeats = kafka_clients.RepeatFilter(every_s=60.0, clock=lambda: now[0])
    shown = [repeats.filter(_record(REFUSED.format(ms))) for ms in (0, 1, 51, 0)]
    assert shown == [True, False, False, False]
    assert repeats.filter(_record("Disconnected (after 3ms in state UP)")), "another message is news"
    assert repeats.filter(_record(REFUSED.format(0), logging.WARNING)), "so is another level"
    now[0] = 61.0
    assert repeats.filter(_record(REFUSED.format(7))), "and the same one a minute later"


def test_the_same_failure_of_a_new_client_is_a_repeat_too() -> None:
    """The lag reader builds an admin client per read: with its name in the key, Kafka down logged an ERROR
    at every read (every 10 s)."""
    repeats = kafka_clients.RepeatFilter(every_s=60.0, clock=lambda: 0.0)
    lines = [
        f"FAIL [rdkafka#{kind}] [thrd:b/bootstrap]: refused" for kind in ("producer-1", "producer-2", "consumer-9")
    ]
    assert [repeats.filter(_record(line)) for line in lines] == [True, False, False]
    named = [f"FAIL [checkout-guard-replay#consumer-{n}] [thrd:b/bootstrap]: refused" for n in (1, 2, 3)]
    assert [repeats.filter(_record(line)) for line in named] == [True, False, False], "a client.id stays in the name"


def test_every_client_logs_through_the_filtered_logger_unless_told_otherwise(monkeypatch) -> None:
    built: list[dict[str, Any]] = []
    monkeypatch.setattr(kafka_clients, "Producer", built.append)
    monkeypatch.setattr(kafka_clients, "Consumer", built.append)
    monkeypatch.setattr(kafka_clients, "AdminClient", built.append)
    kafka_clients.producer(KAFKA, kafka_clients.RELIABLE)
    kafka_clients.consumer(KAFKA, "g")
    kafka_clients.admin(KAFKA)
    own = logging.getLogger("mine")
    kafka_clients.producer(KAFKA, logger=own)
    loggers = [conf["logger"] for conf in built]
    assert loggers[:3] == [logging.getLogger(kafka_clients.LOGGER)] * 3 and loggers[3] is own
    assert built[1]["group.id"] == "g"
    assert [type(f) for f in loggers[0].filters].count(kafka_clients.RepeatFilter) == 1


class _Cluster:
    def __init__(self, error: KafkaError | None) -> None:
        self.error = error
        self.polled = 0

    def poll(self, timeout: float) -> int:
        self.polled += 1
        return 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> str:
        if self.error is not None:
            raise KafkaException(self.error)
        return f"metadata of {topic}"


@pytest.mark.parametrize("code", [KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN])
def test_no_broker_answering_is_one_error_naming_the_brokers(code: int) -> None:
    settings = KafkaSettings(bootstrap_servers="kafka-1:9092")
    cluster = _Cluster(KafkaError(code, "Failed to get metadata"))
    with pytest.raises(
        kafka_clients.KafkaUnavailable, match=r"^Kafka at kafka-1:9092 did not answer within 3 s"
    ) as info:
        kafka_clients.cluster_metadata(cluster, settings, timeout_s=3)
    assert isinstance(info.value, KafkaException) and isinstance(info.value, CheckoutGuardError)
    assert str(info.value).endswith("refusing this client (TLS, credentials)") and cluster.polled == 1
    with pytest.raises(kafka_clients.KafkaUnavailable, match=r"^Kafka did not answer"):
        kafka_clients.cluster_metadata(_Cluster(KafkaError(code)))


def test_other_metadata_errors_and_answers_pass_through() -> None:
    refused = KafkaError(KafkaError._AUTHENTICATION, "SASL authentication failed")
    with pytest.raises(KafkaException) as info:
        kafka_clients.cluster_metadata(_Cluster(refused), KAFKA)
    assert not isinstance(info.value, kafka_clients.KafkaUnavailable) and info.value.args[0] is refused
    assert kafka_clients.cluster_metadata(_Cluster(None), KAFKA, "t") == "metadata of t"


def test_why_no_broker_was_usable_is_logged_before_the_error(caplog) -> None:
    """librdkafka hands its lines to the logger only on ``poll``: without one before the error, the reason (here a
    refused connection; elsewhere a TLS or SASL failure) was never shown."""
    with caplog.at_level(logging.INFO, logger=kafka_clients.LOGGER):
        client = kafka_clients.producer(KafkaSettings(bootstrap_servers="127.0.0.1:1"))
        with pytest.raises(kafka_clients.KafkaUnavailable):
            kafka_clients.cluster_metadata(client, timeout_s=1)
    assert any("Connection refused" in r.getMessage() for r in caplog.records if r.name == kafka_clients.LOGGER)


def test_an_admin_session_hands_its_log_lines_over_when_the_task_fails(caplog) -> None:
    """An admin client forwards librdkafka's lines only on ``poll``: the metrics exporter's lag reader dropped
    why it could not reach Kafka with the client."""
    from infra.metrics import read_lags
    from infra.settings import Settings

    for f in logging.getLogger(kafka_clients.LOGGER).filters:  # an earlier test may have shown the same line
        if isinstance(f, kafka_clients.RepeatFilter):
            f._shown.clear()
    with caplog.at_level(logging.INFO, logger=kafka_clients.LOGGER), pytest.raises((KafkaException, TimeoutError)):
        read_lags(Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1")), timeout=1)
    assert any("Connection refused" in r.getMessage() for r in caplog.records if r.name == kafka_clients.LOGGER)


def test_lags_are_an_error_when_librdkafkas_timeout_ends_the_group_listing_first(monkeypatch) -> None:
    """librdkafka's request timeout can end ``list_consumer_groups`` before the wait on its future does: the result
    then holds errors alone, no exception, and an unreachable Kafka was read as one without consumer groups (no lag
    at all; seen in CI as a flaky test). Now that is an error; groups listed in part still give their lags."""
    import contextlib
    from concurrent.futures import Future
    from types import SimpleNamespace

    from infra import metrics
    from infra.settings import Settings

    listed: dict[str, SimpleNamespace] = {}

    class Admin:
        def list_consumer_groups(self, request_timeout: float) -> Future:
            done: Future = Future()
            done.set_result(listed["groups"])
            return done

    @contextlib.contextmanager
    def session(_settings):
        yield Admin()

    monkeypatch.setattr(kafka_clients, "admin_session", session)
    timed_out = KafkaError(KafkaError._TIMED_OUT)
    listed["groups"] = SimpleNamespace(valid=[], errors=[timed_out])
    with pytest.raises(KafkaException):
        metrics.read_lags(Settings(), timeout=1)
    listed["groups"] = SimpleNamespace(valid=[], errors=[])
    assert metrics.read_lags(Settings(), timeout=1) == []


def test_require_topics_lists_all_topics_and_names_the_missing_ones() -> None:
    from types import SimpleNamespace

    asked: list[str | None] = []

    class Cluster:
        def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
            asked.append(topic)
            unknown = SimpleNamespace(error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
            leaderless = SimpleNamespace(error=KafkaError(KafkaError.LEADER_NOT_AVAILABLE))
            return SimpleNamespace(
                topics={"a": SimpleNamespace(error=None, partitions={}), "b": unknown, "d": leaderless}
            )

    assert set(kafka_clients.require_topics(Cluster(), KAFKA, "a").topics) == {"a", "b", "d"}
    with pytest.raises(kafka_clients.TopicMissing, match=r"^no topic b, c on Kafka at .*created by an admin"):
        kafka_clients.require_topics(Cluster(), KAFKA, "a", "b", "c")
    with pytest.raises(kafka_clients.TopicError) as info:  # it exists: no leader this moment is not "missing"
        kafka_clients.require_topics(Cluster(), KAFKA, "a", "d")
    assert not isinstance(info.value, kafka_clients.TopicMissing) and str(info.value).startswith("topic d: the broker")
    assert "(Kafka at " in str(info.value)
    assert asked == [None, None, None]  # never a topic by name: that could ask a broker to create it


def test_require_topics_refuses_a_topic_with_a_partition_without_a_leader() -> None:
    """A writer's start-up check looked only at the topic's own error: a topic whose partition had no leader (or an
    error of its own) passed, and the records for that partition waited in the queue until their delivery timed out."""
    from types import SimpleNamespace

    from tests.builders import partitions_led

    leaderless = partitions_led(3)
    leaderless[1].leader = -1
    refused = partitions_led(2)
    refused[1].error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    topics = {
        "ok": SimpleNamespace(error=None, partitions=partitions_led(2)),
        "led": SimpleNamespace(error=None, partitions=leaderless),
        "refused": SimpleNamespace(error=None, partitions=refused),
    }

    class Cluster:
        def list_topics(self, topic: str | None = None, timeout: float = -1) -> SimpleNamespace:
            return SimpleNamespace(topics=topics)

    assert kafka_clients.require_topics(Cluster(), KAFKA, "ok").topics is topics
    with pytest.raises(kafka_clients.TopicError, match=r"^topic led partition 1: no leader .*\(Kafka at ") as info:
        kafka_clients.require_topics(Cluster(), KAFKA, "ok", "led")
    assert not isinstance(info.value, kafka_clients.TopicMissing)
    with pytest.raises(
        kafka_clients.TopicError, match=r"^topic refused partition 1: the broker answered .*AUTHORIZATION"
    ):
        kafka_clients.require_topics(Cluster(), KAFKA, "refused")
