"""The scoring job's Flink wiring, run in-process on a local mini-cluster (no Kafka)."""

import sys

import pytest

from infra.settings import Settings
from schemas.codec import codec
from tests.builders import T0, java_bytes, return_of, sale

pytestmark = pytest.mark.pipeline

NO_WAIT = Settings().model_copy(
    update={
        "job": Settings().job.model_copy(
            update={"face_deadline_ms": 0, "batch_time_ms": 0, "bootstrap_control": False}
        ),
        "model": Settings().model.model_copy(update={"backend": "none"}),
    }
)
"""No Kafka, no face stage, no model, no batching: every transaction is decided by the rules as it arrives."""


@pytest.fixture(scope="module")
def run_job():
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    from jobs.flink.job import SOURCE_ROW, build_pipeline

    def run(records: list[bytes], settings: Settings = NO_WAIT, topics: list[str] | None = None):
        conf = Configuration()
        conf.set_string("python.executable", sys.executable)
        conf.set_string("python.fn-execution.bundle.time", "10")
        env = StreamExecutionEnvironment.get_execution_environment(conf)
        env.set_parallelism(1)
        topics = topics or ["transactions"] * len(records)
        rows = [
            (None, data, topic, 0, i, T0 + 3_600_000, {})
            for i, (data, topic) in enumerate(zip(records, topics, strict=True))
        ]
        out = build_pipeline(env.from_collection(rows, type_info=SOURCE_ROW), settings)
        with out.execute_and_collect() as results:
            return [(r[0], java_bytes(r[1]), java_bytes(r[2])) for r in results]

    return run


def test_job_scores_valid_transactions_dead_letters_bad_ones_and_alerts_on_blocks(run_job):
    records = [
        sale("t1", store="store-A", amount=300).encode(),
        b"\x00garbage",
        sale("t2", store="store-A", card="card-B").encode(),
        return_of("r1", "t1", at_s=300, store="store-B", card="card-Z", amount=300).encode(),
        sale("t2", store="store-A", card="card-B").encode(),  # delivered twice
    ]
    out = run_job(records)
    by_topic: dict[str, list] = {}
    for topic, key, value in out:
        by_topic.setdefault(topic, []).append((key, value))

    scored = {k.decode(): codec("ScoredTransaction").decode(v) for k, v in by_topic["processed_transactions"]}
    assert sorted(scored) == ["r1", "t1", "t2"]
    assert len(by_topic["processed_transactions"]) == 3
    assert scored["r1"]["outcome"] == "BLOCK"
    assert "customer_mismatch" in scored["r1"]["reasons"]
    assert scored["t1"]["outcome"] == "APPROVE"

    [(alert_key, _)] = by_topic["alerts"]
    assert alert_key == b"blocked:r1"

    [(dl_key, dl_value)] = by_topic["dead_letters"]
    assert dl_key == b"transactions:0:1"
    assert codec("DeadLetter").decode(dl_value)["error_kind"] == "not_avro"


def test_job_joins_the_checkout_face_to_its_transaction(run_job):
    settings = NO_WAIT.model_copy(update={"job": NO_WAIT.job.model_copy(update={"face_deadline_ms": 60_000})})
    observation = codec("FaceObservation").encode(
        {
            "observation_id": "checkout:t1",
            "event_time": T0,
            "camera_serial": "Q2MV-store-A-lane-01",
            "store_id": "store-A",
            "lane_id": "lane-01",
            "transaction_id": "t1",
            "trigger": "CHECKOUT",
            "status": "NO_FACE",
            "reason": "no face in frame",
        }
    )
    out = run_job(
        [observation, b"junk", sale("t1", store="store-A").encode()],
        settings,
        ["face_observations", "face_observations", "transactions"],
    )
    [scored] = [codec("ScoredTransaction").decode(v) for t, _, v in out if t == "processed_transactions"]
    assert scored["face_status"] == "NO_FACE"
    [dead] = [codec("DeadLetter").decode(v) for t, _, v in out if t == "dead_letters"]
    assert dead["source_topic"] == "face_observations" and dead["error_kind"] == "not_avro"
