"""The scoring job's consumer groups belong to its deployment: two deployments on one Kafka cluster under different
topic prefixes must never share a group (they would split the partitions and each miss the other's share)."""

from __future__ import annotations

import pytest

from infra.clients import control_topics
from infra.settings import Settings
from jobs.faces import stage


@pytest.fixture(autouse=True)
def _no_group_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CG_JOB__CONSUMER_GROUP", raising=False)
    monkeypatch.delenv("CG_KAFKA__TOPIC_PREFIX", raising=False)


def _control_read_group(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> str:
    """The group the read of the rules and watchlist before the first decision joins."""
    asked: list[str] = []

    class Stop(Exception):
        pass

    def consumer(_settings: Settings, group: str, *_a: object, **_k: object) -> object:
        asked.append(group)
        raise Stop

    from infra.clients import kafka as kafka_clients

    monkeypatch.setattr(kafka_clients, "consumer", consumer)
    with pytest.raises(Stop):
        control_topics.read_control_topics(settings, lambda *_a: None)
    return asked[0]


def test_the_scoring_groups_of_two_topic_prefixes_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    blue, green = Settings(kafka={"topic_prefix": "blue."}), Settings(kafka={"topic_prefix": "green."})
    assert blue.consumer_group == "blue.checkout-guard-scoring"
    assert green.consumer_group == "green.checkout-guard-scoring"
    assert stage.consumer_group(blue) == "blue.checkout-guard-scoring.face-stage"
    assert _control_read_group(green, monkeypatch) == "green.checkout-guard-scoring-control-read"


def test_without_a_topic_prefix_the_groups_keep_their_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade of a deployment without a prefix keeps its committed offsets."""
    settings = Settings()
    assert settings.consumer_group == "checkout-guard-scoring"
    assert stage.consumer_group(settings) == "checkout-guard-scoring.face-stage"
    assert _control_read_group(settings, monkeypatch) == "checkout-guard-scoring-control-read"


def test_a_group_set_explicitly_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CG_JOB__CONSUMER_GROUP", "store-7-scoring")
    settings = Settings(kafka={"topic_prefix": "blue."})
    assert settings.consumer_group == "store-7-scoring"
    assert stage.consumer_group(settings) == "store-7-scoring.face-stage"


def test_a_child_process_gets_the_same_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """``to_env`` hands the settings to a child: it must derive the same group, set or not."""
    for settings in (Settings(kafka={"topic_prefix": "blue."}), Settings(job={"consumer_group": "mine"})):
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        assert Settings().consumer_group == settings.consumer_group
        for name in settings.to_env():
            monkeypatch.delenv(name)
