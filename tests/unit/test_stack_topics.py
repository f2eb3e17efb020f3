"""The stack's view of our topics (``topics``, ``status``): a topic is missing by the one rule every tool follows
(``kafka_clients.listed_topic``), so one the broker lists as unknown is missing here too."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError

from infra import stack
from infra.settings import Settings
from schemas.topics import ALL_TOPICS, CASES, DAY_MS, DEAD_LETTERS, FACE_OBSERVATIONS, HOUR_MS, RULES
from tests.builders import partitions_led


def _settings(tmp_path: Path) -> Settings:
    return Settings(stack_dir=tmp_path, kafka={"bootstrap_servers": "127.0.0.1:9092", "topic_prefix": ""})


def _done(value: Any = None) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class Admin:
    """An admin client whose cluster has all our topics with their spec's partitions, but ``RULES``, listed as
    unknown (UNKNOWN_TOPIC_OR_PART, the broker's word for a topic it does not have)."""

    def __init__(self) -> None:
        self.topics: dict[str, Any] = {
            spec.full_name(""): SimpleNamespace(error=None, partitions=partitions_led(spec.partitions))
            for spec in ALL_TOPICS
        }
        self.topics[RULES.full_name("")] = SimpleNamespace(
            error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), partitions={}
        )
        self.created: list[str] = []
        self.described: list[str] = []
        self.altered: dict[str, dict[str, str]] = {}

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return SimpleNamespace(topics=self.topics, brokers={1: None})

    def create_topics(self, topics: list[Any], request_timeout: float) -> dict[str, Future]:
        self.created += [t.topic for t in topics]
        return {t.topic: _done() for t in topics}

    def incremental_alter_configs(self, resources: list[Any]) -> dict[Any, Future]:
        for r in resources:
            self.altered.setdefault(r.name, {}).update({e.name: e.value for e in r.incremental_configs})
        return {r: _done() for r in resources}

    def describe_configs(self, resources: list[Any]) -> dict[Any, Future]:
        self.described += [r.name for r in resources]
        return {r: _done({}) for r in resources}

    def poll(self, _timeout: float) -> int:
        return 0


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> Admin:
    fake = Admin()
    monkeypatch.setattr(stack, "_admin", lambda _settings: fake)
    return fake


def test_a_topic_listed_as_unknown_is_created(tmp_path: Path, admin: Admin) -> None:
    """It was taken for a topic that exists: never created, and every tool then stopped on it as missing."""
    assert stack.ensure_topics(_settings(tmp_path)) == [RULES.full_name("")]
    assert admin.created == [RULES.full_name("")]


def test_a_topic_listed_as_unknown_is_not_described(tmp_path: Path, admin: Admin) -> None:
    described = stack.describe_topics(_settings(tmp_path))
    assert RULES.full_name("") not in described and RULES.full_name("") not in admin.described
    assert len(described) == len(ALL_TOPICS) - 1


def test_status_counts_a_topic_listed_as_unknown_as_missing(tmp_path: Path, admin: Admin, monkeypatch) -> None:
    """``stack status`` said all topics were there and the stack healthy."""
    monkeypatch.setattr(stack, "_healthy", lambda *_a: True)
    monkeypatch.setattr(stack, "_our_process", lambda *_a: None)
    monkeypatch.setattr(stack, "_opensearch_status", lambda *_a: "green")
    monkeypatch.setattr(stack, "_prometheus_targets", lambda *_a: "")
    monkeypatch.setattr(stack, "port_open", lambda *_a: False)
    state = stack.status(_settings(tmp_path))
    assert state["topics"]["missing"] == [RULES.full_name("")]
    assert state["topics"]["present"] == len(ALL_TOPICS) - 1 and not state["healthy"]


def test_status_reports_a_topic_the_broker_answers_with_an_error_as_unhealthy_in_its_words(
    tmp_path: Path, admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A topic without a leader (LEADER_NOT_AVAILABLE) exists: it was counted present and the stack healthy, though
    nothing could read or write it."""
    monkeypatch.setattr(stack, "_healthy", lambda *_a: True)
    monkeypatch.setattr(stack, "_our_process", lambda *_a: None)
    monkeypatch.setattr(stack, "_opensearch_status", lambda *_a: "green")
    monkeypatch.setattr(stack, "_prometheus_targets", lambda *_a: "")
    monkeypatch.setattr(stack, "port_open", lambda *_a: False)
    rules = RULES.full_name("")
    error = KafkaError(KafkaError.LEADER_NOT_AVAILABLE)
    admin.topics[rules] = SimpleNamespace(error=error, partitions={})
    state = stack.status(_settings(tmp_path))
    words = f"topic {rules}: the broker answered {error.str()} ({error.name()})"
    assert state["topics"]["unavailable"] == {rules: words} and not state["healthy"]
    assert state["topics"]["missing"] == [] and state["topics"]["present"] == len(ALL_TOPICS)
    import rich.console

    wide = rich.console.Console
    monkeypatch.setattr(rich.console, "Console", lambda: wide(width=400))  # the table's detail on one line
    stack._print_status(state)
    assert "LEADER_NOT_AVAILABLE" in capsys.readouterr().out


@pytest.mark.parametrize("answer", ["no-leader", "partition-error"])
def test_status_reports_a_topic_with_a_partition_without_a_leader_as_unhealthy_naming_it(
    tmp_path: Path, admin: Admin, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """Only the topic's own error was looked at: a partition with no leader (leader -1, or answered with an error)
    left the topic counted available and the stack healthy, though that partition could not be read or written."""
    monkeypatch.setattr(stack, "_healthy", lambda *_a: True)
    monkeypatch.setattr(stack, "_our_process", lambda *_a: None)
    monkeypatch.setattr(stack, "_opensearch_status", lambda *_a: "green")
    monkeypatch.setattr(stack, "_prometheus_targets", lambda *_a: "")
    monkeypatch.setattr(stack, "port_open", lambda *_a: False)
    rules = RULES.full_name("")
    partitions = partitions_led(2)
    partitions[1].leader = -1
    error = KafkaError(KafkaError.LEADER_NOT_AVAILABLE)
    if answer == "partition-error":
        partitions[1].error = error
    admin.topics[rules] = SimpleNamespace(error=None, partitions=partitions)
    state = stack.status(_settings(tmp_path))
    words = {
        "no-leader": f"topic {rules} partition 1: no leader (the broker lists it with none)",
        "partition-error": f"topic {rules} partition 1: the broker answered {error.str()} ({error.name()})",
    }[answer]
    assert state["topics"]["unavailable"] == {rules: words} and not state["healthy"]
    assert state["topics"]["missing"] == [] and state["topics"]["present"] == len(ALL_TOPICS)


def test_face_embeddings_on_topics_deleted_by_age_go_within_about_an_hour_of_their_retention(
    tmp_path: Path, admin: Admin
) -> None:
    """Kafka deletes a segment only once its newest record is past ``retention.ms``: with the default 7-day
    ``segment.ms``, a ``face_observations`` segment written to every day kept each embedding in it for up to 8 days,
    not the 1 d the topic table gives, and a refused embedding in ``dead_letters`` up to 14. Hour segments, also
    set on topics that exist already."""
    settings = _settings(tmp_path)
    stack.ensure_topics(settings)
    for spec in (FACE_OBSERVATIONS, DEAD_LETTERS):
        assert int(spec.config["segment.ms"]) <= HOUR_MS, spec.name
        assert admin.altered[spec.full_name("")]["segment.ms"] == str(HOUR_MS), spec.name
    assert admin.altered[FACE_OBSERVATIONS.full_name("")]["retention.ms"] == str(DAY_MS)
    dead_letter_retention = str(int(settings.kafka.dead_letter_retention_days * DAY_MS))
    assert admin.altered[DEAD_LETTERS.full_name("")]["retention.ms"] == dead_letter_retention


def test_an_existing_cases_topic_gets_the_30_day_tombstones_the_sink_needs_after_a_long_outage(
    tmp_path: Path, admin: Admin
) -> None:
    """``cases`` gained ``delete.retention.ms`` of 30 days on 2026-12-03, set only when the topic was made: one made
    before kept Kafka's 1 day, so the OpenSearch sink back after a longer outage missed a removed case's tombstone
    and kept its document. The key is now set on the existing topic too; what an operator may tune stays."""
    stack.ensure_topics(_settings(tmp_path))
    cases = CASES.full_name("")
    assert cases not in admin.created
    assert admin.altered[cases]["delete.retention.ms"] == str(30 * DAY_MS)
    assert "min.compaction.lag.ms" not in admin.altered[cases]
