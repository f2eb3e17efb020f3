"""The stream backtest's own topics (``<name>.*``): made, waited for and deleted by the one rule every tool judges a
topic by (``kafka_clients.listed_topic``), so one the broker lists as unknown (UNKNOWN_TOPIC_OR_PART) is missing."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError

from infra import stack
from infra.clients import kafka as kafka_clients
from infra.clients import opensearch
from infra.settings import Settings
from jobs.flink.backtest_stream import cleanup, create_copy_topics
from schemas.topics import ALL_TOPICS, RULES, TRANSACTIONS
from tests.builders import partitions_led

NAME = "bt-1"


def _exists(partitions: int = 1, leader: int = 1) -> Any:
    return SimpleNamespace(error=None, partitions=partitions_led(partitions, leader))


def _unknown() -> Any:
    return SimpleNamespace(error=KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), partitions={})


class Admin:
    """An admin client over a cluster listing ``topics`` (name -> metadata); records what it is asked to make or
    delete, and how often it was listed."""

    def __init__(self, topics: dict[str, Any]) -> None:
        self.topics = topics
        self.listings = 0
        self.created: list[Any] = []
        self.deleted: list[str] = []

    def listing(self, *_a: Any, **_k: Any) -> Any:
        self.listings += 1
        return SimpleNamespace(topics=dict(self.topics))

    def create_topics(self, topics: list[Any], request_timeout: float) -> dict[str, Any]:
        self.created += topics
        self.topics.update({t.topic: _exists(t.num_partitions) for t in topics})
        return {}

    def delete_topics(self, topics: list[str], request_timeout: float) -> dict[str, Any]:
        self.deleted += topics
        return {}


def _cluster(monkeypatch: pytest.MonkeyPatch, topics: dict[str, Any]) -> Admin:
    admin = Admin(topics)
    monkeypatch.setattr(kafka_clients, "admin_session", lambda _settings: contextlib.nullcontext(admin))
    monkeypatch.setattr(kafka_clients, "cluster_metadata", admin.listing)
    return admin


def _copy(tmp_path: Path) -> Settings:
    return Settings(stack_dir=tmp_path, kafka={"topic_prefix": f"{NAME}."})


def test_a_copy_transactions_topic_listed_as_unknown_is_made_with_the_copys_partitions_and_no_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was taken for one that exists: left to ``ensure_topics``, which made it with the spec's partitions and
    time retention, so the copy read another order and retention deleted the old-timestamped copies at once."""
    transactions = TRANSACTIONS.full_name(f"{NAME}.")
    admin = _cluster(monkeypatch, {transactions: _unknown()})
    ensured: list[bool] = []

    def ensure(_settings: Settings) -> list[str]:
        ensured.append(True)
        for spec in ALL_TOPICS:
            admin.topics.setdefault(spec.full_name(f"{NAME}."), _exists(spec.partitions))
        return []

    monkeypatch.setattr(stack, "ensure_topics", ensure)
    create_copy_topics(_copy(tmp_path), 1)
    [made] = admin.created
    assert made.topic == transactions and made.num_partitions == 1 and made.config["retention.ms"] == "-1"
    assert ensured == [True]


def test_the_wait_for_the_copy_topics_goes_on_while_one_is_listed_as_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy topic listed as unknown was taken as listed: the wait ended at once, and the rules publish then
    stopped on a missing topic."""
    admin = _cluster(monkeypatch, {s.full_name(f"{NAME}."): _exists(s.partitions) for s in ALL_TOPICS})
    rules = RULES.full_name(f"{NAME}.")
    admin.topics[rules] = _unknown()
    listed_after = 3  # the listings (of the wait) after which the broker knows it

    def listing(*_a: Any, **_k: Any) -> Any:
        if admin.listings >= listed_after:
            admin.topics[rules] = _exists()
        return Admin.listing(admin)

    monkeypatch.setattr(kafka_clients, "cluster_metadata", listing)
    monkeypatch.setattr(stack, "ensure_topics", lambda _settings: [])
    create_copy_topics(_copy(tmp_path), 1)
    assert admin.created == [] and admin.listings == listed_after + 1, "waited until it was listed"


def test_the_wait_for_the_copy_topics_goes_on_while_a_partition_has_no_leader_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy topic listed with a partition without a leader was taken as ready: the wait ended at once, and the rules
    publish or the replay then stopped on it; one that never gets a leader is named, with its partition."""
    admin = _cluster(monkeypatch, {s.full_name(f"{NAME}."): _exists(s.partitions) for s in ALL_TOPICS})
    rules = RULES.full_name(f"{NAME}.")
    admin.topics[rules] = _exists(2)
    admin.topics[rules].partitions[1].leader = -1
    led_after = 3  # the listings (of the wait) after which the partition has its leader

    def listing(*_a: Any, **_k: Any) -> Any:
        if admin.listings >= led_after:
            admin.topics[rules] = _exists(2)
        return Admin.listing(admin)

    monkeypatch.setattr(kafka_clients, "cluster_metadata", listing)
    monkeypatch.setattr(stack, "ensure_topics", lambda _settings: [])
    create_copy_topics(_copy(tmp_path), 1)
    assert admin.listings == led_after + 1, "waited until it had its leader"

    from infra import launcher

    admin.topics[rules] = _exists(2, leader=-1)
    monkeypatch.setattr(kafka_clients, "cluster_metadata", admin.listing)
    monkeypatch.setattr(launcher.time, "sleep", lambda _s: None)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(launcher.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(TimeoutError, match=f"topic {rules} partition 0: no leader"):
        create_copy_topics(_copy(tmp_path), 1)


def test_cleanup_leaves_a_copy_topic_listed_as_unknown_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was asked to be deleted (which the broker refuses for a topic it does not have) and counted as deleted."""
    indices = SimpleNamespace(
        get=lambda index, params: {},
        delete=lambda index: None,
        exists_index_template=lambda name: False,
        delete_index_template=lambda name: None,
    )
    monkeypatch.setattr(opensearch, "make_client", lambda _settings: SimpleNamespace(indices=indices))
    transactions, rules = TRANSACTIONS.full_name(f"{NAME}."), RULES.full_name(f"{NAME}.")
    admin = _cluster(monkeypatch, {transactions: _exists(), rules: _unknown()})
    assert cleanup(Settings(stack_dir=tmp_path), NAME) == ([transactions], [])
    assert admin.deleted == [transactions]
