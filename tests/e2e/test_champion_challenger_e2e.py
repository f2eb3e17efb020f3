"""Champion and challenger in the running job, on the real stack.

Two trained models: the job scores every transaction with both, only the champion decides, and both
scores reach OpenSearch; ``promote`` (the command, with its audit event) swaps them in the running job
without a restart. Then analysts' verdicts published to ``labels`` are joined by the next ``train``,
which learns from the transactions topic.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer
from typer.testing import CliRunner

from infra.clients.opensearch import make_client
from infra.launcher import start_scoring_job, wait_for
from infra.local.pos_generator import PosGenerator
from infra.settings import Settings, get_settings
from infra.stack import ensure_topics
from jobs.model.fraud_model import LocalModel
from jobs.model.registry import CHALLENGER, CURRENT, app, read_pointer, write_pointer
from jobs.model.train import app as train_app
from producers.labels import publish_labels
from schemas.codec import codec
from schemas.indices import index_name
from schemas.records import make_label
from schemas.topics import AUDIT, TRANSACTIONS
from tests.e2e.sink_helpers import sink_running
from tests.fraud_model import challenger_model, small_model

pytestmark = pytest.mark.e2e


@pytest.fixture
def pipeline(stack: Settings, tmp_path):
    name = f"e2ecc{uuid.uuid4().hex[:8]}"
    settings = stack.isolated(name, tmp_path / "checkpoints", checkpoint_interval_ms=1000, face_deadline_ms=0)
    models = tmp_path / "models"
    settings = settings.model_copy(
        update={"model": settings.model.model_copy(update={"artifact_dir": models, "reload_interval_s": 0.5})}
    )
    champion, challenger = small_model(), challenger_model()
    # both learners in the running job: a large-history LightGBM champion, a small-data CatBoost challenger
    assert (champion.booster.learner, challenger.booster.learner) == ("lightgbm", "catboost")
    challenger.save(models, make_current=False)
    champion.save(models)
    write_pointer(models, CHALLENGER, challenger.version)
    ensure_topics(settings)
    with sink_running(settings):
        job = start_scoring_job(settings)
        yield settings, champion.version, challenger.version
        job.stop()


def _produce(settings: Settings, txs) -> set[str]:
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True, "linger.ms": 5})
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    for tx in txs:
        producer.produce(topic, key=f"{tx.store_id}/{tx.lane_id}", value=tx.encode())
        producer.poll(0)
    assert producer.flush(30) == 0
    return {tx.transaction_id for tx in txs}


def _documents(settings: Settings, ids: set[str]) -> dict[str, dict]:
    client = make_client(settings.opensearch)
    index = index_name(settings.opensearch.index_prefix, "transactions")
    found: dict[str, dict] = {}

    def arrived() -> bool:
        client.indices.refresh(index=index)
        page = client.search(
            index=index, body={"query": {"ids": {"values": sorted(ids - set(found))}}, "size": len(ids)}
        )
        for hit in page["hits"]["hits"]:
            found[hit["_id"]] = hit["_source"]
        return set(found) == ids

    wait_for(arrived, timeout=240, interval=1.0, what=f"{len(ids)} scored documents in {index}")
    return found


def _audited_promotion(settings: Settings, champion: str) -> dict:
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([AUDIT.full_name(settings.kafka.topic_prefix)])
    events: list[dict] = []

    def read() -> bool:
        for msg in consumer.consume(100, timeout=0.5):
            if msg.error() is None:
                events.append(codec("AuditEvent").decode(msg.value()))
        return any(e["action"] == "MODEL_PROMOTE" and e["details"].get("champion") == champion for e in events)

    try:
        wait_for(read, timeout=30, what="the promotion's audit event")
    finally:
        consumer.close()
    return next(e for e in events if e["action"] == "MODEL_PROMOTE")


def _invoke(typer_app, settings: Settings, args: list[str]) -> str:
    """A command as an operator runs it, with these settings in its environment."""
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(typer_app, args, env=settings.to_env())
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return result.output


def test_both_models_score_every_transaction_and_promote_swaps_them_in_the_running_job(pipeline, tmp_path):
    settings, champion, challenger = pipeline
    gen = PosGenerator(seed=31, stores=4, customers=500, fraud_share=0.05, tx_per_second=50)
    first = _produce(settings, [next(gen) for _ in range(300)])
    docs = _documents(settings, first)
    assert {d["model_version"] for d in docs.values()} == {f"local:{champion}"}
    assert {d["challenger_version"] for d in docs.values()} == {f"local:{challenger}"}
    assert all(d["model_score"] is not None and d["challenger_score"] is not None for d in docs.values())
    assert any(d["model_score"] != d["challenger_score"] for d in docs.values()), "two different models"

    output = _invoke(app, settings, ["promote", "--reason", "e2e", "--models", str(settings.model.artifact_dir)])
    assert f"model {challenger}" in output, "the promoted model's report is printed"
    assert read_pointer(settings.model.artifact_dir, CURRENT) == challenger
    event = _audited_promotion(settings, challenger)
    assert event["details"]["previous"] == champion and event["reason"] == "e2e"

    # No restart: the job follows the pointers within reload_interval_s; transactions after that are
    # scored the other way round. (A batch decided in between may still carry the old pair.)
    def swapped() -> bool:
        ids = _produce(settings, [next(gen) for _ in range(20)])
        return all(d["model_version"] == f"local:{challenger}" for d in _documents(settings, ids).values())

    wait_for(swapped, timeout=120, interval=1.0, what="the job to score with the promoted champion")
    later = _documents(settings, _produce(settings, [next(gen) for _ in range(200)]))
    assert {d["model_version"] for d in later.values()} == {f"local:{challenger}"}
    assert {d["challenger_version"] for d in later.values()} == {f"local:{champion}"}

    # Labels from the field reach the next train: analysts overturn the data's label of a dozen transactions.
    scored = {**docs, **later}
    overturned = sorted(scored)[:12]
    verdicts = [
        make_label(transaction_id=t, label=1 - (scored[t]["label"] or 0), source="case", decided_at=1_700_000_000_000)
        for t in overturned
    ]
    published = publish_labels(settings, verdicts)
    assert published.ok, published.errors
    out = tmp_path / "retrained"
    output = _invoke(
        train_app, settings, ["train", "--from-topic", "--labels-from-topic", "--folds", "3", "--out", str(out)]
    )
    assert "field labels: 12 joined" in output, output
    joined = LocalModel.load(out).meta["data"]["field_labels"]
    assert (joined["joined"], joined["changed"], joined["unmatched"]) == (12, 12, 0)
