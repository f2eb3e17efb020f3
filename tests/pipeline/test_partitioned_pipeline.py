"""The partitioned layout's Flink wiring, in-process: the same decisions as the single-state layout, at
parallelism 1 and 2 (watermark-ordered steps, keyed by shard)."""

import site
import sys

import pytest

from infra.settings import REPO_ROOT, Settings
from schemas.codec import codec
from tests.builders import java_bytes
from tests.unit.test_partitioned_scoring import seeded_stream

pytestmark = pytest.mark.pipeline

BASE = Settings().model_copy(
    update={
        "job": Settings().job.model_copy(
            update={
                "face_deadline_ms": 600_000,
                "bootstrap_control": False,
                "state_shards": 4,
                "event_idle_ms": 30_000,  # no lull in a test: the end of input releases the rest
            }
        ),
        "model": Settings().model.model_copy(update={"backend": "none"}),
    }
)
CLOCK_FIELDS = {"decided_at", "ttdf_ms", "proc_time_ms", "model_time_ms", "failed_at"}
"""Wall-clock fields: the only ones that may differ between two runs."""
SCHEMAS = {"processed_transactions": "ScoredTransaction", "alerts": "Alert", "dead_letters": "DeadLetter"}


def _run(records, settings: Settings, parallelism: int, until=None, timeout_s: float = 180.0) -> list:
    """The job over ``records``. With ``until`` (a test on the rows so far), the control stream never ends,
    as the job's Kafka one: the run stops once ``until`` holds (or fails after ``timeout_s``)."""
    import threading

    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    from jobs.flink.job import SOURCE_ROW, build_pipeline

    conf = Configuration()
    conf.set_string("python.executable", sys.executable)
    # The job's own mode (embedded interpreter): no Beam worker processes to outlive the run.
    conf.set_string("python.execution-mode", "thread")
    conf.set_string("python.pythonpath", ":".join([*site.getsitepackages(), str(REPO_ROOT)]))
    conf.set_string("pipeline.auto-watermark-interval", "50 ms")
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(parallelism)
    control = None
    if until is not None:
        from pyflink.table import StreamTableEnvironment

        t_env = StreamTableEnvironment.create(env)
        t_env.execute_sql(
            "CREATE TEMPORARY TABLE control (k INT) WITH ('connector' = 'datagen', 'rows-per-second' = '1')"
        )
        rows = t_env.to_data_stream(t_env.from_path("control"))
        control = rows.filter(lambda _r: False).map(lambda _r: None, output_type=SOURCE_ROW)  # no row, no end
    out = build_pipeline(env.from_collection(records, type_info=SOURCE_ROW), settings, control)
    got: list = []
    with out.execute_and_collect() as results:
        stop = threading.Timer(timeout_s, results.close)  # a job that waits for ever: the wait ends here
        stop.start()
        try:
            for r in results:
                got.append((r[0], java_bytes(r[1]), java_bytes(r[2])))
                if until is not None and until(got):
                    return got
        except Exception as err:  # noqa: BLE001 - the closed iterator's error: say what was missing
            raise AssertionError(f"not done after {timeout_s} s: {len(got)} rows") from err
        finally:
            stop.cancel()
    assert until is None, f"the job ended before the rows were all there: {len(got)} rows"
    return got


def _comparable(rows) -> list:
    out = []
    for topic, key, value in rows:
        record = codec(SCHEMAS[topic]).decode(value)
        out.append((topic, key, repr(sorted((k, v) for k, v in record.items() if k not in CLOCK_FIELDS))))
    return sorted(out)


def test_partitioned_layout_decides_as_the_single_layout_at_parallelism_one_and_two():
    batches, _ = seeded_stream(4, n=200)
    topics = {"cg.transactions": "transactions", "cg.face_observations": "face_observations"}
    records = [
        (r.key, r.value, topics[r.topic], r.partition, i, r.ts, {})
        for i, r in enumerate(record for batch in batches for record in batch)
    ]
    partitioned = BASE.model_copy(update={"job": BASE.job.model_copy(update={"layout": "partitioned"})})
    single = _comparable(_run(records, BASE, 1))
    assert sum(1 for t, _, _ in single if t == "processed_transactions") > 150
    assert any(t == "dead_letters" for t, _, _ in single)
    assert _comparable(_run(records, partitioned, 1)) == single
    assert _comparable(_run(records, partitioned, 2)) == single


def test_partitioned_layout_at_p2_reports_model_drift_as_the_single_layout():
    """The decide slots' drift tallies meet in one subtask: each closed hour has one report of all its rows
    (the same rows, late rows and PSI as the single layout's monitor), not one per slot under one id."""
    import random

    from jobs.model.train import ensure_default_model
    from tests.builders import T0, sale

    model = Settings().model.model_copy(update={"backend": "local", "drift_min_rows": 5})
    job = BASE.job.model_copy(update={"face_deadline_ms": 0})
    single = BASE.model_copy(update={"model": model, "job": job})
    ensure_default_model(single)
    rnd = random.Random(5)
    records = []
    for i in range(400):  # 3 h 20 min, one sale every 30 s, over 4 stores and 40 cards
        tx = sale(
            f"drift-{i:04d}",
            at_s=30 * i,
            store=f"store-00{i % 4 + 1}",
            amount=round(rnd.lognormvariate(3.5, 1.0), 2),
            card=f"card-{rnd.randrange(40)}",
        )
        records.append((tx.store_id.encode(), tx.encode(), "transactions", 0, i, tx.event_time, {}))
    partitioned = single.model_copy(update={"job": job.model_copy(update={"layout": "partitioned"})})

    def reports(rows) -> dict[str, dict]:
        drift = codec("ModelDrift")
        decoded = [drift.decode(v) for t, _, v in rows if t == "model_drift"]
        return {r["report_id"]: {k: v for k, v in r.items() if k != "created_at"} for r in decoded}

    expected = reports(_run(records, single, 1))
    assert len(expected) == 3 and [r["rows"] for r in expected.values()] == [120, 120, 120]
    # As in the job: the control stream (rules, watchlist) never ends and carries no event time.
    got = reports(_run(records, partitioned, 2, until=lambda rows: len(reports(rows)) >= 4))
    assert {k: got.get(k) for k in expected} == expected
    # the end of the input closes the last hour too (the single layout keeps it open for later rows)
    assert [(r["hour_start"], r["rows"]) for k, r in got.items() if k not in expected] == [(T0 + 3 * 3_600_000, 40)]


def test_the_java_batcher_hands_python_each_records_redrive_header_and_no_other():
    """What a re-driven copy's receipt step reads (``REDRIVEN_HEADER``: its dead letter) crosses the JVM's batcher
    with its record; other headers stay behind, and a record without that header has none."""
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.java_gateway import get_gateway

    from jobs.flink.frames import unpack_records
    from jobs.flink.job import SOURCE_ROW, _batched, _with_ext_jar
    from schemas.records import REDRIVEN_HEADER

    conf = Configuration()
    conf.set_string("python.executable", sys.executable)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    env.set_parallelism(1)
    _with_ext_jar(env, BASE)
    rows = [
        (b"k1", b"v1", "transactions", 0, 10, 1_000, {}),
        (b"k2", b"v2", "transactions", 1, 11, 2_000, {"trace": b"x", REDRIVEN_HEADER: b"transactions:decide:t2@1:5"}),
        (None, b"v3", "face_observations", 2, 12, 3_000, {"trace": b"y"}),
    ]
    batches = _batched(env.from_collection(rows, type_info=SOURCE_ROW), get_gateway().jvm.checkoutguard.flink, BASE)
    with batches.execute_and_collect() as results:
        got = [record for batch in results for record in unpack_records(java_bytes(batch))]
    assert got == [
        (b"k1", b"v1", "transactions", 0, 10, 1_000, None),
        (b"k2", b"v2", "transactions", 1, 11, 2_000, b"transactions:decide:t2@1:5"),
        (None, b"v3", "face_observations", 2, 12, 3_000, None),
    ]
