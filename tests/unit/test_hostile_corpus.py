"""The fault-injection corpus (tests/e2e/hostile.py) builds, and each item says who must reject it."""

from __future__ import annotations

import pytest

from tests.e2e import hostile

GENERATORS = (
    hostile.transactions,
    hostile.face_observations,
    hostile.camera_events,
    hostile.watchlist_entries,
    hostile.rule_sets,
    hostile.commands,
    hostile.alerts,
    hostile.scored_transactions,
)


@pytest.mark.parametrize("make", GENERATORS, ids=lambda f: f.__name__)
def test_every_corpus_builds_with_unique_labels_and_a_stage_to_reject_each_item(make) -> None:
    items = make("run1")
    labels = [item.label for item in items]
    assert items and len(labels) == len(set(labels))
    assert all(item.stages for item in items)
    assert all(item.value is not None and len(item.value) <= hostile.OVERSIZED for item in items)


def test_the_mqtt_corpus_covers_the_issues_payloads() -> None:
    labels = {label for label, _, _ in hostile.mqtt_payloads()}
    assert {"ts_1e20", "deeply_nested", "not_json", "serial_path"} <= labels
