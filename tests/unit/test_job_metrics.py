"""The scoring job's own metrics, without Flink: what the core counts, what reaches the metric group, and
the Flink configuration that serves them (``jobs/scoring/stats.py``, ``jobs/flink/job_metrics.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infra.settings import MetricsSettings, Settings
from jobs.flink.job_metrics import GROUP, LABELS, JobMetrics
from jobs.scoring.core import DecisionCore, SourceRecord
from jobs.scoring.stats import FACE_OBSERVATION, TRANSACTION, Increments, JobStats, RecentWindow
from schemas.topics import FACE_OBSERVATIONS, TRANSACTIONS
from tests.builders import T0, checkout_face, sale

PREFIX = "m."
TX, FACES = TRANSACTIONS.full_name(PREFIX), FACE_OBSERVATIONS.full_name(PREFIX)
NOW = T0 + 3_600_000
DEADLINE = 4000


# --- the pure parts --------------------------------------------------------------------------------


def test_window_percentiles_are_nearest_rank_over_the_most_recent_samples():
    window = RecentWindow(size=100)
    assert window.percentiles(50, 99) is None
    window.extend(float(v) for v in range(1000))  # only the last 100 stay: 900..999
    window.add(5000.0)
    assert window.added == 1001
    assert window.percentiles(0, 50, 99, 100) == (901.0, 951.0, 999.0, 5000.0)


def test_increments_are_what_each_total_grew_by_since_the_last_call():
    stats, increments = JobStats(), Increments()
    stats.outcomes["APPROVE"] += 3
    stats.count_records(5, 4)
    assert sorted(increments.since_last(stats)) == [
        ("decisions", "APPROVE", 3),
        ("records_in", FACE_OBSERVATION, 1),
        ("records_in", TRANSACTION, 4),
    ]
    assert increments.since_last(stats) == []
    stats.outcomes["BLOCK"] += 1
    stats.dead_letters["not_avro"] += 2
    stats.outcomes["APPROVE"] += 1
    assert sorted(increments.since_last(stats)) == [
        ("dead_letters", "not_avro", 2),
        ("decisions", "APPROVE", 1),
        ("decisions", "BLOCK", 1),
    ]


# --- what the scoring core counts ------------------------------------------------------------------


def core(face_deadline_ms: int = DEADLINE) -> DecisionCore:
    base = Settings()
    settings = base.model_copy(
        update={
            "kafka": base.kafka.model_copy(update={"topic_prefix": PREFIX}),
            "job": base.job.model_copy(update={"bootstrap_control": False, "face_deadline_ms": face_deadline_ms}),
        }
    )
    return DecisionCore(settings, clock=lambda: NOW / 1000)


def tx(tx_id: str, offset: int = 0) -> SourceRecord:
    return SourceRecord(tx_id.encode(), sale(tx_id).encode(), TX, 0, offset, NOW)


def face(tx_id: str, offset: int = 0) -> SourceRecord:
    obs = checkout_face(tx_id, status="NO_FACE")
    return SourceRecord(b"Q2MV-store-001-lane-01", obs.encode(), FACES, 0, offset, NOW)


def test_core_counts_records_by_kind_decisions_by_outcome_dead_letters_by_kind_and_one_model_call_per_batch():
    c = core(face_deadline_ms=0)
    c.on_records([tx("t1"), tx("t2", 1), SourceRecord(b"x", b"not avro at all", TX, 0, 2, NOW)], NOW)
    c.on_records([face("t9")], NOW)
    stats = c.stats
    assert stats.records_in == {TRANSACTION: 3, FACE_OBSERVATION: 1}
    assert sum(stats.outcomes.values()) == 2 and set(stats.outcomes) <= {"APPROVE", "REVIEW", "BLOCK"}
    assert stats.dead_letters == {"not_avro": 1}
    assert stats.model_ms.added == 1  # the two transactions were decided in one model call
    assert stats.face_wait_ms.added == 0  # no face join: no waits


def test_core_measures_how_long_each_transaction_waited_for_its_face():
    c = core()
    c.on_records([tx("early"), face("late-face-first")], NOW)  # "late-face-first" arrives before its transaction
    c.on_records([tx("late-face-first", 1), face("early", 1)], NOW + 500)
    c.on_records([tx("never", 2)], NOW + 1000)
    c.on_timer(NOW + 1000 + DEADLINE, NOW + 1000 + DEADLINE + 30)
    assert sorted(c.stats.face_wait_ms.samples) == [0, 500, DEADLINE + 30]


# --- what reaches Flink's metric group --------------------------------------------------------------


class FakeMetric:
    def __init__(self) -> None:
        self.count = 0
        self.value: int | None = None

    def inc(self, n: int = 1) -> None:
        self.count += n

    def update(self, value: int) -> None:
        self.value = value


class FakeGroup:
    """PyFlink's MetricGroup surface: every metric by its path, e.g. ``checkout_guard/outcome=BLOCK/decisions``."""

    def __init__(self, path: str = "", registry: dict[str, Any] | None = None) -> None:
        self.path, self.registry = path, registry if registry is not None else {}

    def add_group(self, name: str, extra: str | None = None) -> FakeGroup:
        part = name if extra is None else f"{name}={extra}"
        return FakeGroup(f"{self.path}{part}/", self.registry)

    def counter(self, name: str) -> FakeMetric:
        return self.registry.setdefault(self.path + name, FakeMetric())

    def distribution(self, name: str) -> FakeMetric:
        return self.registry.setdefault(self.path + name, FakeMetric())

    def gauge(self, name: str, obj) -> None:
        self.registry[self.path + name] = obj


def test_counters_exist_from_the_start_and_grow_by_each_batchs_increase():
    group = FakeGroup()
    metrics = JobMetrics(group)
    reg = group.registry
    for outcome in ("APPROVE", "REVIEW", "BLOCK"):
        assert reg[f"{GROUP}/outcome={outcome}/decisions"].count == 0
    assert reg[f"{GROUP}/kind={TRANSACTION}/records_in"].count == 0

    stats = JobStats()
    stats.outcomes["BLOCK"] += 2
    stats.dead_letters["too_late"] += 1
    stats.observed_only["warm_up"] += 4
    stats.late_faces["matched"] += 1
    stats.face_memory_evicted["decided_without_face"] += 5
    stats.count_records(3, 3)
    metrics.report(stats)
    metrics.report(stats)  # nothing new: nothing added
    assert reg[f"{GROUP}/outcome=BLOCK/decisions"].count == 2
    assert reg[f"{GROUP}/reason=too_late/dead_letters"].count == 1
    assert reg[f"{GROUP}/kind={TRANSACTION}/records_in"].count == 3
    assert reg[f"{GROUP}/reason=warm_up/observed_only"].count == 4
    assert reg[f"{GROUP}/status=matched/late_faces"].count == 1
    assert reg[f"{GROUP}/map=decided_without_face/face_memory_evicted"].count == 5
    assert {family for family, _, _ in stats.totals()} == set(LABELS), "every family has its label"


def test_timing_percentiles_are_set_at_most_once_per_interval_in_their_units():
    now = [0.0]
    group = FakeGroup()
    metrics = JobMetrics(group, thread_mode=True, interval_s=1.0, clock=lambda: now[0])
    stats = JobStats()
    stats.model_ms.extend([1.5, 2.0, 40.0])
    stats.face_wait_ms.extend([0, 700])
    metrics.report(stats)
    reg = group.registry
    assert reg[f"{GROUP}/model_call_us_p50"].value == 2000 and reg[f"{GROUP}/model_call_us_p99"].value == 40_000
    assert reg[f"{GROUP}/face_wait_ms_p50"].value in (0, 700) and reg[f"{GROUP}/face_wait_ms_p99"].value == 700

    stats.model_ms.extend([90.0] * 10)
    now[0] = 0.5
    metrics.report(stats)
    assert reg[f"{GROUP}/model_call_us_p99"].value == 40_000  # within the interval: not yet
    now[0] = 1.0
    metrics.report(stats)
    assert reg[f"{GROUP}/model_call_us_p99"].value == 90_000


def test_process_mode_gauges_are_read_by_the_worker_not_set_in_java():
    group = FakeGroup()
    metrics = JobMetrics(group, thread_mode=False)
    stats = JobStats()
    stats.model_ms.add(3.0)
    metrics.report(stats)
    read = group.registry[f"{GROUP}/model_call_us_p50"]
    assert callable(read) and read() == 3000


# --- the reporter in the mini-cluster's configuration -------------------------------------------------


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A stack folder with the jars flink_options looks for (empty stand-ins)."""
    for jar in ("lib/flink/connector.jar", "lib/flink-plugins/metrics-prometheus/checkout-guard-metrics.jar"):
        (tmp_path / jar).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / jar).touch()
    return tmp_path


def test_flink_options_serve_the_job_metrics_on_its_port_bound_to_the_bind_host(installed: Path):
    from jobs.flink.job import REPORTER_FACTORY, flink_options

    settings = Settings(stack_dir=installed, bind_host="127.0.0.2", metrics=MetricsSettings(base_port=19460))
    options = flink_options(settings, None)
    assert options["metrics.reporters"] == "prom"
    assert options["metrics.reporter.prom.factory.class"] == REPORTER_FACTORY
    assert options["metrics.reporter.prom.host"] == "127.0.0.2"
    assert options["metrics.reporter.prom.port"] == "19460"  # the scoring job's offset is 0


def test_flink_options_have_no_reporter_with_metrics_off(installed: Path):
    from jobs.flink.job import flink_options

    options = flink_options(Settings(stack_dir=installed, metrics=MetricsSettings(enabled=False)), None)
    assert not [key for key in options if key.startswith("metrics.")]


def test_flink_options_refuse_metrics_on_without_the_reporter_installed(installed: Path):
    from infra.stack import StackError
    from jobs.flink.job import flink_options

    (installed / "lib/flink-plugins/metrics-prometheus/checkout-guard-metrics.jar").unlink()
    with pytest.raises(StackError, match="make setup"):
        flink_options(Settings(stack_dir=installed), None)


def test_a_call_without_new_timings_does_not_hold_back_the_next_ones():
    now = [0.0]
    group = FakeGroup()
    metrics = JobMetrics(group, interval_s=1.0, clock=lambda: now[0])
    stats = JobStats()
    stats.dead_letters["not_avro"] += 1
    metrics.report(stats)  # a batch of bad records only: no model call
    stats.model_ms.add(2.0)
    now[0] = 0.1
    metrics.report(stats)
    assert group.registry[f"{GROUP}/model_call_us_p50"].value == 2000


# --- the partitioned layout's keyed steps ------------------------------------------------------------


class FakeMapState(dict):
    def put_all(self, entries: Any) -> None:
        self.update(dict(entries))


class FakeRuntime:
    def __init__(self, group: FakeGroup) -> None:
        self.group = group

    def get_map_state(self, descriptor: Any) -> FakeMapState:
        return FakeMapState()

    def get_metrics_group(self) -> FakeGroup:
        return self.group


class Broken:
    """A store step with a bug: it raises on every message."""

    def restore(self, maps: dict[str, Any]) -> None:
        pass

    def on(self, key: str, payload: Any, order: Any) -> list[Any]:
        raise KeyError("a bug")

    def resync(self, key: str) -> None:
        pass

    def flush(self) -> dict[str, Any]:
        return {}


def _batch(shard: str, *messages: tuple[str, tuple, Any]) -> bytes:
    """An ``EventTimeBatcher`` batch: the shard, then each message as length + head + pickle."""
    import pickle

    from jobs.flink.steps import _HEAD

    out = len(shard).to_bytes(2, "big") + shard.encode()
    for key, order, payload in messages:
        body = _HEAD.pack(order[0], 0) + pickle.dumps((key, order, payload))
        out += len(body).to_bytes(4, "big") + body
    return out


def test_a_keyed_step_of_the_partitioned_layout_reports_the_dead_letters_of_messages_it_raised_on():
    """Only route and decide reported: a bug in receipt, store, identity or gather dead-lettered silently."""
    from jobs.flink.steps import STORE, ShardStep

    group = FakeGroup()
    fn = ShardStep(Settings(), STORE)
    fn.open(FakeRuntime(group))
    fn.shards.make = Broken
    tx = {"transaction_id": "T-1", "event_time": NOW}
    batch = _batch("0", ("store-1", (NOW, 0, 0), (tx, None)), ("store-1", (NOW, 0, 1), (tx, None)))
    out = list(fn.process_element(batch, ctx=None))
    assert len(out) == 1  # the two dead letters, in one batch
    dead = group.registry[f"{GROUP}/reason=internal_error/dead_letters"]
    assert dead.count == 2
    list(fn.process_element(_batch("0"), ctx=None))  # a batch without failures: nothing counted again
    assert dead.count == 2


def test_a_keyed_step_reports_nothing_with_metrics_off():
    from jobs.flink.steps import STORE, ShardStep

    group = FakeGroup()
    fn = ShardStep(Settings(metrics=MetricsSettings(enabled=False)), STORE)
    fn.open(FakeRuntime(group))
    assert fn.metrics is None and group.registry == {}
