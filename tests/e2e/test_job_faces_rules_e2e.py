"""The running job with its control inputs: faces joined by transaction, watchlist and rules as
broadcast state, changed while the job runs."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer

from infra.launcher import start_scoring_job
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.scoring.rules import DEFAULT_RULESET
from schemas.codec import codec
from schemas.topics import ALERTS, FACE_OBSERVATIONS, RULES, SCORED_TRANSACTIONS, TRANSACTIONS, WATCHLIST
from tests.builders import face_vector, sale

pytestmark = pytest.mark.e2e

SUSPECT = face_vector(np.random.default_rng(3))


@pytest.fixture
def job(stack: Settings, tmp_path):
    settings = stack.isolated(f"e2ef{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints", face_deadline_ms=2000)
    ensure_topics(settings)
    children = []
    yield settings, lambda: children.append(start_scoring_job(settings))
    for child in children:
        child.stop()


class Outputs:
    """Reads scored transactions and alerts as the job writes them."""

    def __init__(self, settings: Settings) -> None:
        prefix = settings.kafka.topic_prefix
        self.scored_topic = SCORED_TRANSACTIONS.full_name(prefix)
        self.consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"t{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([self.scored_topic, ALERTS.full_name(prefix)])
        self.scored: dict[str, dict] = {}
        self.alerts: dict[str, dict] = {}

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.5)
            if msg is not None and not msg.error():
                if msg.topic() == self.scored_topic:
                    self.scored[msg.key().decode()] = codec("ScoredTransaction").decode(msg.value())
                else:
                    self.alerts[msg.key().decode()] = codec("Alert").decode(msg.value())
            if predicate():
                return
        raise TimeoutError(f"timed out waiting for {what}")


def _send(producer: Producer, topic: str, key: str, value: bytes | None) -> None:
    producer.produce(topic, key=key.encode(), value=value)
    producer.flush(10)


def _now_sale(tx_id: str):
    return replace(sale(tx_id, store="store-A", amount=42), event_time=int(time.time() * 1000))


def test_faces_join_watchlist_matches_alert_and_rules_change_without_a_restart(job: Settings):
    settings, start_job = job
    prefix = settings.kafka.topic_prefix
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    out = Outputs(settings)

    # The watchlist (compacted topic) says who the suspect is; the face stage saw them at t-face.
    _send(
        producer,
        WATCHLIST.full_name(prefix),
        "subj-e2e",
        codec("WatchlistEntry").encode(
            {
                "subject_id": "subj-e2e",
                "category": "SUSPECT",
                "embeddings": [SUSPECT],
                "reference_image_ref": None,
                "reason": "e2e",
                "flagged_by": "tester",
                "flagged_at": int(time.time() * 1000),
                "source_transaction_id": None,
            }
        ),
    )
    # The job starts after the watchlist was written: its first decision must already know the
    # suspect (it reads the compacted topics before deciding, not only as they stream in).
    start_job()
    _send(producer, TRANSACTIONS.full_name(prefix), "store-A/lane-01", _now_sale("t-face").encode())
    _send(
        producer,
        FACE_OBSERVATIONS.full_name(prefix),
        "Q2MV-store-A-lane-01",
        codec("FaceObservation").encode(
            {
                "observation_id": "checkout:t-face",
                "event_time": int(time.time() * 1000),
                "camera_serial": "Q2MV-store-A-lane-01",
                "store_id": "store-A",
                "lane_id": "lane-01",
                "transaction_id": "t-face",
                "trigger": "CHECKOUT",
                "status": "NO_MATCH",
                "quality": 0.9,
                "image_ref": "checkout/t-face.jpg",
                "embedding": SUSPECT,
            }
        ),
    )
    # A transaction whose face never comes goes ahead after the deadline.
    _send(producer, TRANSACTIONS.full_name(prefix), "store-A/lane-02", _now_sale("t-noface").encode())

    out.wait(lambda: {"t-face", "t-noface"} <= set(out.scored), 120, "both transactions scored")
    face = out.scored["t-face"]
    assert face["face_status"] == "MATCHED" and face["face_subject_id"] == "subj-e2e"
    assert face["outcome"] in ("REVIEW", "BLOCK") and "watchlist_suspect" in face["reasons"]
    # a face match alone never blocks: a block needs other evidence (here the model's score may add it)
    assert face["outcome"] == "REVIEW" or set(face["reasons"]) - {"watchlist_suspect"}, face["reasons"]
    out.wait(lambda: "watchlist:checkout:t-face:subj-e2e" in out.alerts, 30, "the watchlist alert")
    assert out.alerts["watchlist:checkout:t-face:subj-e2e"]["snapshot_ref"] == "checkout/t-face.jpg"
    late = out.scored["t-noface"]
    assert late["face_status"] == "UNAVAILABLE"
    assert late["decided_at"] - late["ingest_time"] >= 1500, "it waited for the face deadline"

    # Forgetting the subject (tombstone) stops the matching at once.
    _send(producer, WATCHLIST.full_name(prefix), "subj-e2e", None)
    # A new rule set, published while the job runs: takes effect without a restart.
    rules = DEFAULT_RULESET.read_text().replace('version: "', 'version: "e2e-live-', 1)
    version = next(line.split('"')[1] for line in rules.splitlines() if line.startswith("version:"))
    _send(
        producer,
        RULES.full_name(prefix),
        "active",
        codec("RuleSetUpdate").encode(
            {
                "version": version,
                "yaml": rules,
                "published_at": int(time.time() * 1000),
                "published_by": "tester",
            }
        ),
    )
    probes: list[str] = []

    def new_rules_in_force() -> bool:
        """The newest probe was decided with the new rules and without the forgotten subject."""
        last = out.scored.get(probes[-1], {}) if probes else {}
        return last.get("rules_version") == version and last.get("face_status") == "NO_MATCH"

    deadline = time.monotonic() + 90
    while not new_rules_in_force():
        assert time.monotonic() < deadline, "the new rule set (or the forget) never took effect"
        probes.append(f"probe-{len(probes)}")
        _send(producer, TRANSACTIONS.full_name(prefix), "store-A/lane-03", _now_sale(probes[-1]).encode())
        _send(
            producer,
            FACE_OBSERVATIONS.full_name(prefix),
            "Q2MV-store-A-lane-03",
            codec("FaceObservation").encode(
                {
                    "observation_id": f"checkout:{probes[-1]}",
                    "event_time": int(time.time() * 1000),
                    "camera_serial": "Q2MV-store-A-lane-03",
                    "store_id": "store-A",
                    "lane_id": "lane-03",
                    "transaction_id": probes[-1],
                    "trigger": "CHECKOUT",
                    "status": "NO_MATCH",
                    "quality": 0.9,
                    "image_ref": None,
                    "embedding": SUSPECT,
                }
            ),
        )
        out.wait(lambda: probes[-1] in out.scored, 60, "a probe transaction scored")
    assert len(probes) < 60
