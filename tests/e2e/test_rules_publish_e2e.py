"""``python -m jobs.scoring.rules publish``: a validated rule set lands on the compacted rules topic."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, ConfigResource

from infra.stack import ensure_topics
from jobs.scoring.rules import DEFAULT_RULESET, RuleSet, from_update, publish_rules
from schemas.errors import CheckoutGuardError
from schemas.records import RuleSetUpdate
from tests.e2e.camera_helpers import delete_topics

pytestmark = pytest.mark.e2e


def test_published_rule_set_is_the_latest_record_under_key_active(stack, tmp_path):
    settings = stack.isolated(f"rulespub{uuid.uuid4().hex[:6]}", tmp_path / "checkpoints")
    text = DEFAULT_RULESET.read_text()
    first = RuleSet.from_yaml(text)
    second_text = text.replace(f'version: "{first.version}"', 'version: "e2e-2"').replace(
        "block_at: 85", "block_at: 80"
    )
    with pytest.raises(CheckoutGuardError, match=r"^no topic .*rules on Kafka at .*created by an admin"):
        publish_rules(settings, first, text, "tester")  # an operator's tool creates no topics
    ensure_topics(settings)
    topic = publish_rules(settings, first, text, "tester")
    publish_rules(settings, RuleSet.from_yaml(second_text), second_text, "tester")

    admin = AdminClient(settings.kafka.client_config())
    config = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)])
    [cfg] = [f.result() for f in config.values()]
    assert cfg["cleanup.policy"].value == "compact"

    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": "rulespub-check",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got = []
    try:
        for _ in range(50):
            for msg in consumer.consume(10, timeout=0.5):
                if msg.error() is None:
                    got.append(msg)
            if len(got) >= 2:
                break
    finally:
        consumer.close()
        delete_topics(settings)  # all of the prefix's topics, which ensure_topics made
    assert [m.key() for m in got] == [b"active", b"active"]
    latest = from_update(got[-1].value())
    assert (latest.version, latest.block_at) == ("e2e-2", 80)
    assert RuleSetUpdate.decode(got[-1].value()).published_by == "tester"
