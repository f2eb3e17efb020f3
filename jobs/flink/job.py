"""PyFlink scoring job: ``transactions`` -> ``processed_transactions`` + ``alerts`` + ``dead_letters``.

Inputs: Avro ``PosTransaction`` records on the transactions topic (any bytes, really: bad ones are
dead-lettered with their topic/partition/offset and the reason).
Outputs: one ``ScoredTransaction`` per transaction (key = transaction id), an ``Alert`` per block
(key = alert id), ``DeadLetter`` records (key = ``topic:partition:offset``).

Only wiring lives here: the operator is :mod:`jobs.flink.operator`, every decision it makes is
:mod:`jobs.scoring.core`'s (pure, over :mod:`jobs.scoring.scorer`). Delivery: incremental RocksDB
checkpoints every ``job.checkpoint_interval_ms`` (state + source offsets); the Kafka sink is at-least-once and every
output carries a deterministic key, so consumers are idempotent by key (OpenSearch ``_id``, alert
dedup key) and a crash doubles nothing downstream. On start the job resumes from the newest retained
checkpoint, so its keyed state (receipts, store activity, customer history) survives ``SIGKILL``.

Run it: ``python -m jobs.flink.job`` (needs the stack: ``make up``) on a local mini-cluster until it ends; or
submit it unchanged to a standalone cluster (``python -m infra.stack flink up``) with the wheel's
``flink run -d -p N -pym jobs.flink.job`` (``python -m infra.stack flink submit --parallelism N``): there
``main()`` sets program-level options only, submits and returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import psutil
import typer
from pyflink.common import Configuration
from pyflink.common.typeinfo import Types
from pyflink.datastream import DataStream, StreamExecutionEnvironment
from pyflink.table import DataTypes, Schema, StreamTableEnvironment, TableDescriptor

from infra.addresses import client_host, is_wildcard, reporter_host
from infra.flink_cluster import (
    JOB_NAME,
    REPORTER,
    REPORTER_DIR,
    REPORTER_FACTORY,
    beside_cluster_job,
    deployment_parameters,
)
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.metrics import port_of
from infra.processes import StopRequest, done_by, exit_deadline, in_daemon, stop_asked_at, stop_on_signals
from infra.settings import REPO_ROOT, Settings, face_deadline_problem, get_settings
from infra.stack import StackError, StackPaths, flink_connector_jars, flink_ext_jar
from jobs.flink.operator import BROADCAST, DecideStep
from jobs.scoring.rules import RuleSet, RuleSetError
from schemas.errors import CheckoutGuardError
from schemas.records import REDRIVEN_HEADER
from schemas.topics import (
    ALERTS,
    DEAD_LETTERS,
    FACE_OBSERVATIONS,
    MODEL_DRIFT,
    RULES,
    SCORED_TRANSACTIONS,
    TRANSACTIONS,
    WATCHLIST,
)

log = logging.getLogger("checkout_guard.scoring_job")

SOURCE_ROW = Types.ROW_NAMED(
    ["k", "v", "topic", "partition", "offset", "ts", "headers"],
    [
        Types.PRIMITIVE_ARRAY(Types.BYTE()),
        Types.PRIMITIVE_ARRAY(Types.BYTE()),
        Types.STRING(),
        Types.INT(),
        Types.LONG(),
        Types.LONG(),
        Types.MAP(Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE())),
    ],
)
"""One Kafka record as the job sees it: key, value, where it came from, broker timestamp (ms, or the
Kafka table's TIMESTAMP_LTZ as an ``Instant``), its headers (of which the batcher keeps
:data:`schemas.records.REDRIVEN_HEADER` alone)."""
OUT_ROW = Types.ROW_NAMED(
    ["topic", "k", "v"], [Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE()), Types.PRIMITIVE_ARRAY(Types.BYTE())]
)
"""One output record: target topic, key, value."""
BATCH_BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
"""A batch of records in or out of the scoring step (framing in :mod:`jobs.flink.frames`)."""
STATE_KEY = "all"
"""Every transaction is scored under one key, see :class:`DecideStep`."""


def _state_key(batch: Any) -> str:
    return STATE_KEY


def _with_ext_jar(env, settings: Settings) -> None:
    """Make the job's Java operators (``RecordBatcher``, ``OutputUnbatcher``) loadable, once."""
    from pyflink.java_gateway import get_gateway
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    uri = flink_ext_jar(settings).resolve().as_uri()
    jvm = get_gateway().jvm
    config = jvm.org.apache.flink.python.util.PythonConfigUtil.getEnvironmentConfig(env._j_stream_execution_environment)
    if uri in (config.getString(jvm.org.apache.flink.configuration.PipelineOptions.JARS.key(), None) or ""):
        add_jars_to_context_class_loader([uri])
    else:
        env.add_jars(uri)


def _batched(source: DataStream, ops: Any, settings: Settings) -> DataStream:
    """Source rows packed by the Java ``RecordBatcher``: Python is entered once per batch, not per record."""
    job = settings.job
    return DataStream(
        source._j_data_stream.transform(
            "batch records for Python",
            BATCH_BYTES.get_java_type_info(),
            ops.RecordBatcher(job.batch_size, job.batch_time_ms, REDRIVEN_HEADER),
        ).uid("batch-in")
    )


def build_pipeline(source: DataStream, settings: Settings, broadcast: DataStream | None = None) -> DataStream:
    """Source rows (``SOURCE_ROW``: transactions, face observations) + broadcast rows (rules,
    watchlist) -> output rows (``OUT_ROW``): decisions, alerts, dead letters.

    Java batches the rows for Python (at most ``job.batch_size`` records, ``job.batch_time_ms``
    after the first, and before every checkpoint barrier) and unpacks Python's output batches."""
    from pyflink.java_gateway import get_gateway

    env = source.get_execution_environment()
    _with_ext_jar(env, settings)
    if broadcast is None:
        broadcast = env.from_collection([], type_info=SOURCE_ROW)
    if settings.job.layout == "partitioned":
        return build_partitioned(source, settings, broadcast)
    ops = get_gateway().jvm.checkoutguard.flink
    batches = _batched(source, ops, settings)
    scored = (
        batches.key_by(_state_key, key_type=Types.STRING())
        .connect(broadcast.broadcast(BROADCAST))
        .process(DecideStep(settings), output_type=BATCH_BYTES)
        .name("parse, match receipts, track stores and customers, join faces, decide")
        .uid("score")
    )
    # A chain of its own: unpacking and the Kafka sink run on the other core, not in Python's thread.
    return DataStream(
        scored._j_data_stream.flatMap(ops.OutputUnbatcher(), OUT_ROW.get_java_type_info())
        .name("unpack outputs")
        .uid("batch-out")
        .startNewChain()
    )


def build_partitioned(source: DataStream, settings: Settings, broadcast: DataStream) -> DataStream:
    """The partitioned layout (``CG_JOB__LAYOUT=partitioned``): route, then the keyed steps of
    :mod:`jobs.scoring.partitioned`, each on every slot, keyed by shard (:mod:`jobs.flink.steps`).

    route -> receipt -> store -> identity -> gather (also from route and store) -> decide -> Kafka (and the
    decide slots' drift tallies -> one drift subtask -> Kafka; each keyed step's dead letters -> Kafka). Between
    steps the Java ``EventTimeBatcher``, keyed by shard so that one subtask sees all of a shard's messages,
    holds each message until the watermark (``StepEventTime``, assigned after route) passes it, so every key
    meets its messages in event-time order on any parallelism."""
    from pyflink.java_gateway import get_gateway

    from jobs.flink.steps import DecideShards, DriftMergeFunction, RouteFunction, ShardStep, shard_of_batch
    from jobs.scoring.partitioned import DECIDE, DRIFT, GATHER, IDENTITY, RECEIPT, STORE

    ops = get_gateway().jvm.checkoutguard.flink
    job = settings.job
    control = broadcast._j_data_stream.assignTimestampsAndWatermarks(ops.ControlEventTime())
    rules = DataStream(control.uid("control-event-time")).broadcast(BROADCAST)
    shards = f"-s{job.state_shards}"
    """In the keyed steps' uids: state split into another number of shards is not theirs (a fresh start)."""

    def unbatch(batches: DataStream, uid: str) -> DataStream:
        return DataStream(
            batches._j_data_stream.flatMap(ops.OutputUnbatcher(), OUT_ROW.get_java_type_info()).uid(uid).name(uid)
        )

    def only(rows: DataStream, topic: str | None) -> DataStream:
        return DataStream(rows._j_data_stream.filter(ops.TopicFilter(topic)))

    def held(step: str, *inputs: DataStream) -> DataStream:
        rows = [only(r, "@" + step) for r in inputs]
        union = rows[0].union(*rows[1:]) if len(rows) > 1 else rows[0]
        batcher = ops.EventTimeBatcher(job.batch_size, job.batch_time_ms, job.event_idle_ms)
        j_batches = union._j_data_stream.keyBy(ops.ShardKey()).transform(
            f"in event-time order: {step}", BATCH_BYTES.get_java_type_info(), batcher
        )
        return DataStream(j_batches.uid(f"{step}-in{shards}")).key_by(shard_of_batch, key_type=Types.STRING())

    def keyed(step: str, *inputs: DataStream) -> DataStream:
        out = held(step, *inputs).process(ShardStep(settings, step), output_type=BATCH_BYTES)
        out = out.name(step).uid(f"{step}{shards}")
        return unbatch(out, f"{step}-out")

    batches = _batched(source, ops, settings)
    routed = batches.connect(rules).process(RouteFunction(settings), output_type=BATCH_BYTES).name("route").uid("route")
    timed = unbatch(routed, "route-out")._j_data_stream.assignTimestampsAndWatermarks(
        ops.StepEventTime(job.event_order_ms, job.event_idle_ms)
    )
    routed_rows = DataStream(timed.uid("event-time"))
    receipts = keyed(RECEIPT, routed_rows)
    stores = keyed(STORE, receipts)
    identities = keyed(IDENTITY, stores)
    gathered = keyed(GATHER, routed_rows, stores, identities)
    decided = (
        held(DECIDE, gathered).connect(rules).process(DecideShards(settings), output_type=BATCH_BYTES).name(DECIDE)
    ).uid(f"{DECIDE}{shards}")
    decisions = unbatch(decided, "decide-out")
    tallies = only(decisions, DRIFT).key_by(lambda _row: 0, key_type=Types.INT())
    drift = tallies.process(DriftMergeFunction(settings), output_type=OUT_ROW).set_parallelism(1)
    drift = drift.name("drift").uid("drift")
    # The keyed steps' own rows (dead letters of a message a step raised on, a reused transaction id) go out too:
    # only route's and decide's did, so a keyed step's dead letter was dropped and its record lost without a trace.
    failed = [only(rows, None) for rows in (receipts, stores, identities, gathered)]
    return only(routed_rows, None).union(only(decisions, None), drift, *failed)


# --- wiring to Kafka -------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete retained checkpoint (``chk-N``) or savepoint, by the time it was written."""
    best: tuple[float, Path] | None = None
    for pattern in ("*/chk-*/_metadata", "savepoints/savepoint-*/_metadata"):
        for meta in checkpoint_dir.glob(pattern):
            stamp = meta.stat().st_mtime
            if best is None or stamp > best[0]:
                best = (stamp, meta.parent)
    return best[1] if best else None


def _state_folder(path: Path) -> Path:
    """A savepoint or checkpoint named by its folder or by its ``_metadata`` file (Flink takes both): the folder."""
    return path.parent if path.name == "_metadata" else path


class RestoreError(CheckoutGuardError, ValueError):
    """``CG_JOB__RESTORE_FROM`` names no complete savepoint or checkpoint: the job would not start from it."""


def chosen_restore(settings: Settings) -> Path | None:
    """``CG_JOB__RESTORE_FROM`` as the folder of a complete savepoint or checkpoint (its ``_metadata`` file, which
    Flink takes too, counts as its folder); ``None`` when unset. :class:`RestoreError` when it holds no ``_metadata``:
    Flink's own error came later, as a Java trace, and every restart of a supervised job met it again (e.g. once the
    stale-state sweep has deleted a savepoint the setting still names)."""
    given = settings.job.restore_from
    if given is None:
        return None
    folder = _state_folder(given)
    if not (folder / "_metadata").is_file():
        raise RestoreError(
            f"CG_JOB__RESTORE_FROM={given} is no complete savepoint or checkpoint (no _metadata in {folder}): "
            f"name a savepoint-... or chk-N folder, or unset it to resume from the newest state in "
            f"{settings.checkpoint_dir}"
        )
    return folder


def restore_point(settings: Settings) -> Path | None:
    """What a start resumes from: ``CG_JOB__RESTORE_FROM`` when set (:func:`chosen_restore`), else the newest
    checkpoint or savepoint."""
    return chosen_restore(settings) or latest_checkpoint(settings.checkpoint_dir)


def purge_stale_state(checkpoint_dir: Path, keep: Path | None, older_than_s: float, now: float) -> list[Path]:
    """Delete the checkpoint folders of earlier runs (``<job id>/``) and the savepoints whose newest file is
    older than ``older_than_s``, except the one holding ``keep`` (what this run restores from); returns
    what went. Flink retains checkpoints of a killed job for good, with every buyer's face in them."""
    if older_than_s <= 0 or not checkpoint_dir.is_dir():
        return []
    keep_dirs = {keep.resolve(), keep.resolve().parent} if keep is not None else set()
    candidates = [d for d in checkpoint_dir.iterdir() if d.is_dir() and d.name != "savepoints"]
    candidates += [d for d in (checkpoint_dir / "savepoints").glob("savepoint-*") if d.is_dir()]
    gone = []
    for folder in candidates:
        if folder.resolve() in keep_dirs:
            continue
        newest = max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=folder.stat().st_mtime)
        if now - newest > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


STALE_STATE_SWEEP_S = 3600.0
"""How often a running job purges stale checkpoints and savepoints again (besides at its start)."""


def sweep_stale_state(settings: Settings, now: float) -> list[Path]:
    """:func:`purge_stale_state` while the job runs, keeping the newest complete checkpoint or savepoint (once the
    running job has completed one, its own; before, what it restored from). At start only, the checkpoint a job
    had restored from -- every buyer's face of that time -- stayed for as long as the job ran, months perhaps,
    while ``rules.receipt_face_retention_hours`` promised 72 h; the job restores with Flink's default NO_CLAIM
    mode, so its own checkpoints never need that folder's files."""
    hours = settings.job.stale_state_retention_hours
    return purge_stale_state(settings.checkpoint_dir, latest_checkpoint(settings.checkpoint_dir), hours * 3600, now)


def control_file(settings: Settings) -> Path:
    """Where the running job says who it is (pid, its start time, job id), for ``jobs.flink.upgrade``."""
    return settings.checkpoint_dir / "job.json"


START_TIME_TOLERANCE_S = 0.05
"""A process's start time read twice differs by rounding only; another process with the same pid differs more."""


def write_control(control: Path, job_id: str) -> None:
    """Name this process by pid *and* start time: after a SIGKILL the file stays, and its pid may be reused."""
    me = psutil.Process()
    control.write_text(json.dumps({"pid": me.pid, "started": me.create_time(), "job_id": job_id}))


def running_job(control: Path) -> dict[str, Any] | None:
    """What ``control`` says, if the process it names still runs; None for a missing or stale file (the
    pid gone, or now another process: a different start time, or a file without one)."""
    try:
        info = json.loads(control.read_text())
        proc = psutil.Process(int(info["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - float(info["started"])) > START_TIME_TOLERANCE_S:
            return None
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None
    return info


def shared_checkpoint_dir(settings: Settings) -> str | None:
    """Why this job must not start on ``settings.checkpoint_dir``, or ``None``: another scoring job runs on it (its
    control file names a live process). Two jobs on one folder overwrote each other's control file (``upgrade
    savepoint`` then stopped the wrong one) and each restart resumed from the newest checkpoint there, the other
    job's too: a job started beside the live one "from a time" took the live job's offsets and state instead."""
    other = running_job(control_file(settings))
    if other is None or int(other["pid"]) == os.getpid():
        return None
    return (
        f"another scoring job (pid {other['pid']}) runs on the checkpoint dir {settings.checkpoint_dir}: give this one "
        "its own CG_JOB__CHECKPOINT_DIR (and CG_JOB__CONSUMER_GROUP), or stop that one first"
    )


def ignored_start(settings: Settings, restore: Path | None) -> str | None:
    """A warning when ``CG_JOB__STARTING_OFFSETS`` asks for a start other than the default and the job restores
    state instead, whose source offsets win; ``None`` otherwise."""
    start = settings.job.starting_offsets
    if restore is None or start == "earliest":
        return None
    return (
        f"CG_JOB__STARTING_OFFSETS={start} is ignored: the job restores {restore.parent.name}/{restore.name}, whose "
        "Kafka offsets win; to start from that time, give the job a new CG_JOB__CHECKPOINT_DIR"
    )


NO_WORKER_POOL = {"_python_worker_execution_mode": "process"}
"""PyFlink starts its Beam worker-pool gRPC server (loopback mode) on ``[::]``, every interface, whenever a
job runs on a local mini-cluster and this variable is unset -- whatever ``python.execution-mode`` says, and
a new one each time an environment opens (the singleton's ``__init__`` forgets the last): four here. Its
``StartWorker`` call writes the caller's values into ``os.environ`` and ``sys.path``. ``process`` turns that
server off: ``thread`` mode never needs it, and ``process`` mode then starts its Beam workers as child
processes instead (see :func:`_check_execution_mode` for that mode's own listeners)."""


def _without_worker_pool_server() -> None:
    os.environ.update(NO_WORKER_POOL)


def _check_execution_mode(settings: Settings) -> None:
    """``process`` mode cannot keep to ``bind_host``: Beam's Java fn-API servers, which its Python workers
    connect to (control, data, and the state API that reads and writes keyed state), bind every interface
    (``NettyServerBuilder.forPort``, in Beam, whatever Flink is told). Refused unless that is accepted
    explicitly with a wildcard ``bind_host``; ``thread`` mode (the default) starts none of them. Anything
    but exactly ``thread`` counts as process mode, as PyFlink takes it (the setting only allows the two)."""
    mode = settings.job.python_execution_mode
    if mode != "thread" and not is_wildcard(settings.bind_host):
        raise ValueError(
            f"CG_JOB__PYTHON_EXECUTION_MODE={mode} opens Beam's gRPC servers on every interface, not only "
            f"{settings.bind_host}: use thread mode, or accept that with CG_BIND_HOST=0.0.0.0"
        )


REPORTER_JAR = Path(REPORTER_DIR) / "checkout-guard-metrics.jar"


def reporter_plugins(settings: Settings) -> Path:
    """The Flink plugins folder holding the job's Prometheus reporter (installed by infra/install.sh)."""
    plugins = StackPaths.of(settings).flink_plugins
    if not (plugins / REPORTER_JAR).is_file():
        raise StackError(
            "the job's Prometheus reporter is not installed: run `make setup` (or CG_METRICS__ENABLED=false)"
        )
    return plugins


def reporter_options(settings: Settings) -> dict[str, str]:
    """The Prometheus reporter on the scoring job's metrics port and ``bind_host``; none when metrics are off."""
    if not settings.metrics.enabled:
        return {}
    reporter_plugins(settings)
    prefix = f"metrics.reporter.{REPORTER}."
    return {
        "metrics.reporters": REPORTER,
        prefix + "factory.class": REPORTER_FACTORY,
        prefix + "host": reporter_host(settings.bind_host),
        prefix + "port": str(port_of(settings, "scoring-job")),
    }


def _with_reporter(settings: Settings) -> None:
    """Make the Prometheus reporter loadable by the mini-cluster, before it starts (``execute_async``).

    PyFlink's local executor builds its MiniCluster without a plugin manager (``PerJobMiniClusterFactory``
    never sets one, so ``FLINK_PLUGINS_DIR`` is never read): Flink then looks reporter factories up only with
    ``ServiceLoader`` on the submitting thread's context class loader. The plugin folder's jars (Flink's
    reporter and our subclass) go there, as PyFlink does with connector jars; not into ``pipeline.jars``:
    the reporter runs in the cluster, not in the job."""
    if not settings.metrics.enabled:
        return
    from pyflink.util.java_utils import add_jars_to_context_class_loader

    jars = sorted((reporter_plugins(settings) / REPORTER_JAR.parent).glob("*.jar"))
    add_jars_to_context_class_loader([jar.resolve().as_uri() for jar in jars])


def program_options(settings: Settings, restore_from: Path | None) -> dict[str, str]:
    """The job's own options, which a cluster takes from a program (``flink run``): its jars, Python,
    checkpointing, state backend, restarts, the state to restore. Nothing of the cluster's, not even the
    parallelism (``flink run -p`` sets it)."""
    _check_execution_mode(settings)
    job = settings.job
    values = {
        "pipeline.jars": ";".join(jar.resolve().as_uri() for jar in flink_connector_jars(settings)),
        "pipeline.name": JOB_NAME,
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "python.execution-mode": job.python_execution_mode,
        "python.fn-execution.bundle.size": str(job.bundle_size),
        "python.fn-execution.bundle.time": str(job.bundle_time_ms),
        "execution.checkpointing.interval": f"{job.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": settings.checkpoint_dir.resolve().as_uri(),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "3",
        "state.backend.type": job.state_backend,
        "execution.checkpointing.incremental": "true",
        "restart-strategy.type": "exponential-delay",
    }
    if job.python_execution_mode == "thread":
        # The embedded (PEMJA) interpreter does not start from our venv: give it its packages.
        import site

        values["python.pythonpath"] = ":".join([*site.getsitepackages(), str(REPO_ROOT)])
    if restore_from is not None:
        values["execution.state-recovery.path"] = restore_from.resolve().as_uri()
        # A new version may drop an operator (e.g. a source whose topic list changed: its new one
        # resumes from the group's committed offsets); its old state is then left behind, by choice.
        values["execution.state-recovery.ignore-unclaimed-state"] = str(job.ignore_unclaimed_state).lower()
    return values


def flink_options(settings: Settings, restore_from: Path | None) -> dict[str, str]:
    """The mini-cluster's configuration: the program's options and the cluster's own; every server it starts
    (REST, BLOB, RPC, the Prometheus reporter's) binds to ``bind_host``."""
    job = settings.job
    values = {
        **program_options(settings, restore_from),
        "parallelism.default": str(job.parallelism),
        "taskmanager.memory.process.size": job.taskmanager_process_memory,
        "taskmanager.memory.managed.size": "256m",
        "taskmanager.numberOfTaskSlots": str(max(1, job.parallelism)),
        "rest.bind-address": settings.bind_host,
        "rest.address": client_host(settings.bind_host),
        "jobmanager.bind-host": settings.bind_host,  # the BLOB server (0.0.0.0 without it) and RPC
        "taskmanager.bind-host": settings.bind_host,
        "taskmanager.host": client_host(settings.bind_host),
        **reporter_options(settings),
    }
    if settings.java_home:
        values["env.java.home"] = str(settings.java_home)
    return values


def flink_configuration(settings: Settings, restore_from: Path | None, on_cluster: bool = False) -> Configuration:
    """:func:`flink_options` for the mini-cluster; :func:`program_options` only for a cluster."""
    conf = Configuration()
    options = program_options if on_cluster else flink_options
    for key, value in options(settings, restore_from).items():
        conf.set_string(key, value)
    return conf


def _context_config() -> Any:
    """The configuration of the context environment: the CLI's (its target, ``-s``) under ``flink run``."""
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    j_env = jvm.org.apache.flink.streaming.api.environment.StreamExecutionEnvironment.getExecutionEnvironment()
    return jvm.org.apache.flink.python.util.PythonConfigUtil.getEnvironmentConfig(j_env)


def submitted_to_cluster() -> bool:
    """True when ``flink run`` started this program: the CLI's context environment targets its cluster
    (``execution.target`` ``remote``, ``kubernetes-session``, ...); a plain ``python -m`` runs ``local``."""
    return (_context_config().getString("execution.target", None) or "local") != "local"


def cli_restore_request() -> str | None:
    """The savepoint or checkpoint ``flink run -s`` named (the CLI's ``execution.state-recovery.path``), or None."""
    return _context_config().getString("execution.state-recovery.path", None) or None


def requested_restore(uri: str) -> Path | None:
    """``flink run -s``'s path as a local folder (a ``file:`` URI or a path; a ``_metadata`` file counts as its
    folder); None for one elsewhere (``s3://``): the CLI's own setting then stands, as the job sets none."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(unquote(parsed.path)) if parsed.scheme else Path(uri)
    return _state_folder(path)


def start_point(settings: Settings, requested: str | None) -> Path | None:
    """What this start resumes from: the savepoint ``flink run -s`` named (``requested``), else
    :func:`restore_point`. The program's options override the CLI's, so the newest state under the checkpoint dir,
    which the job set whenever there was one, replaced a savepoint given with ``-s``."""
    if requested:
        return requested_restore(requested)
    return restore_point(settings)


SHADED_KAFKA = "org.apache.flink.kafka.shaded."
"""Where flink-sql-connector-kafka relocated the Kafka client: its JAAS login modules are named under it."""


def kafka_properties(settings: Settings) -> dict[str, str]:
    """The connector's ``properties.*``: Java client properties (a SASL login is ``sasl.jaas.config``; the
    librdkafka ``sasl.username``/``sasl.password`` mean nothing to Java)."""
    return {f"properties.{k}": v for k, v in settings.kafka.java_client_config(SHADED_KAFKA).items()}


def _startup(settings: Settings) -> dict[str, str]:
    start = settings.job.starting_offsets  # earliest, latest or epoch ms: the setting's validator sees to it
    if start.isdigit():
        return {"scan.startup.mode": "timestamp", "scan.startup.timestamp-millis": start}
    if start == "latest":
        return {"scan.startup.mode": "latest-offset"}
    return {"scan.startup.mode": "group-offsets", "properties.auto.offset.reset": "earliest"}


RAW_KEY_VALUE = {"key.format": "raw", "key.fields": "k", "value.format": "raw", "value.fields-include": "EXCEPT_KEY"}


def source_options(settings: Settings, topics: str, group: str, startup: dict[str, str]) -> dict[str, str]:
    """Table options of a Kafka source (the credentials among them)."""
    return {
        "topic": topics,
        "properties.group.id": group,
        "properties.isolation.level": "read_committed",
        "properties.fetch.max.wait.ms": str(settings.job.fetch_max_wait_ms),
        **startup,
        **RAW_KEY_VALUE,
        **kafka_properties(settings),
    }


def sink_options(settings: Settings, topics: str) -> dict[str, str]:
    """Table options of the Kafka sink (the credentials among them)."""
    return {
        "topic": topics,
        "sink.delivery-guarantee": "at-least-once",
        **RAW_KEY_VALUE,
        "properties.linger.ms": "2",
        "properties.compression.type": "lz4",
        **kafka_properties(settings),
    }


def _kafka_table(t_env: StreamTableEnvironment, name: str, schema: Schema, options: dict[str, str]) -> None:
    """A Kafka table from a descriptor, not DDL text: the credentials never become SQL, which Flink
    echoes in errors (options it shows from a catalog table are masked: ``password``, ``jaas.config``).
    The table and so the plan, and the uids of the source and sink operators, are those of the DDL."""
    descriptor = TableDescriptor.for_connector("kafka").schema(schema)
    for key, value in options.items():
        descriptor = descriptor.option(key, value)
    t_env.create_temporary_table(name, descriptor.build())


def _source_schema() -> Schema:
    return (
        Schema.new_builder()
        .column("k", DataTypes.BYTES())
        .column("v", DataTypes.BYTES())
        .column_by_metadata("topic", DataTypes.STRING(), None, True)
        .column_by_metadata("partition", DataTypes.INT(), None, True)
        .column_by_metadata("offset", DataTypes.BIGINT(), None, True)
        .column_by_metadata("timestamp", DataTypes.TIMESTAMP_LTZ(3), None, True)
        .column_by_metadata("headers", DataTypes.MAP(DataTypes.STRING(), DataTypes.BYTES()), None, True)
        .build()
    )


def _source_table(
    t_env: StreamTableEnvironment, name: str, topics: str, group: str, startup: dict[str, str], settings: Settings
) -> DataStream:
    _kafka_table(t_env, name, _source_schema(), source_options(settings, topics, group, startup))
    return t_env.to_data_stream(t_env.from_path(name))


def kafka_source(t_env: StreamTableEnvironment, settings: Settings) -> DataStream:
    """Transactions and face observations: the keyed input, from the configured start."""
    prefix = settings.kafka.topic_prefix
    topics = f"{TRANSACTIONS.full_name(prefix)};{FACE_OBSERVATIONS.full_name(prefix)}"
    return _source_table(t_env, "pos_in", topics, settings.consumer_group, _startup(settings), settings)


def broadcast_source(t_env: StreamTableEnvironment, settings: Settings) -> DataStream:
    """Rules and watchlist: compacted topics read from their beginning (they are the source of truth)."""
    prefix = settings.kafka.topic_prefix
    topics = f"{RULES.full_name(prefix)};{WATCHLIST.full_name(prefix)}"
    return _source_table(
        t_env,
        "control_in",
        topics,
        f"{settings.consumer_group}-control",
        {"scan.startup.mode": "earliest-offset"},
        settings,
    )


def kafka_sink(t_env: StreamTableEnvironment, out: DataStream, settings: Settings):
    prefix = settings.kafka.topic_prefix
    topics = ";".join(t.full_name(prefix) for t in (SCORED_TRANSACTIONS, ALERTS, DEAD_LETTERS, MODEL_DRIFT))
    schema = (
        Schema.new_builder()
        .column_by_metadata("topic", DataTypes.STRING())
        .column("k", DataTypes.BYTES())
        .column("v", DataTypes.BYTES())
        .build()
    )
    _kafka_table(t_env, "outputs", schema, sink_options(settings, topics))
    table = t_env.from_data_stream(out)
    statements = t_env.create_statement_set()
    statements.add_insert("outputs", table)
    statements.attach_as_datastream()


def settings_problem(settings: Settings) -> str | None:
    """Why the job must not start with these settings: a face deadline too short (as supervise refuses it, for any
    way in), or a rule set (``CG_RULES__*``) that does not load. Every worker builds that rule set as its step opens:
    refused there, the step failed and Flink's restart strategy started it again without end, deciding nothing."""
    if (problem := face_deadline_problem(settings)) is not None:
        return problem
    try:
        RuleSet.from_settings(settings.rules)
    except RuleSetError as err:
        return str(err)
    return None


def main(settings: Settings | None = None, log_level: str | None = None) -> None:
    settings = settings or get_settings()
    setup_logging(settings, log_level, "job")
    if (problem := settings_problem(settings)) is not None:
        log.error("refusing to start: %s", problem)
        raise SystemExit(2)
    settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if settings.model.backend != "none" and settings.model.auto_train:
        # Here, before the job is built, so no Flink worker ever trains (a worker only loads).
        from jobs.model.train import ensure_default_model

        ensure_default_model(settings)
    if (shared := shared_checkpoint_dir(settings)) is not None:
        log.error("refusing to start: %s", shared)
        raise SystemExit(2)
    _without_worker_pool_server()
    on_cluster = submitted_to_cluster()
    if not on_cluster and (beside := beside_cluster_job(settings, log)) is not None:  # `flink submit` checks its own
        log.error("refusing to start: %s", beside)
        raise SystemExit(2)
    requested = cli_restore_request() if on_cluster else None
    try:
        restore = start_point(settings, requested)
    except RestoreError as err:
        log.error("refusing to start: %s", err)
        raise SystemExit(2) from None
    if (ignored := ignored_start(settings, restore)) is not None:
        log.warning("%s", ignored)
    if requested:
        log.info("starting scoring job, restoring %s (flink run -s)", requested)
    else:
        log.info("starting scoring job%s", f", restoring {restore.parent.name}/{restore.name}" if restore else "")
    if decide_from := settings.job.decide_from:
        at = datetime.fromtimestamp(decide_from / 1000, UTC).isoformat(timespec="seconds")
        log.info("warm-up: transactions before %s only build state (CG_JOB__DECIDE_FROM)", at)
        if decide_from > time.time() * 1000:
            log.warning("CG_JOB__DECIDE_FROM (%s) is in the future: nothing is decided before then", at)
    hours = settings.job.stale_state_retention_hours
    for gone in purge_stale_state(settings.checkpoint_dir, restore, hours * 3600, time.time()):
        log.info("deleted %s: older than %.0f h (CG_JOB__STALE_STATE_RETENTION_HOURS)", gone.name, hours)
    env = StreamExecutionEnvironment.get_execution_environment(flink_configuration(settings, restore, on_cluster))
    env.get_config().set_global_job_parameters(deployment_parameters(settings))  # a start beside it tells it apart
    env.set_buffer_timeout(settings.job.buffer_timeout_ms)
    t_env = StreamTableEnvironment.create(env)
    out = build_pipeline(kafka_source(t_env, settings), settings, broadcast_source(t_env, settings))
    kafka_sink(t_env, out, settings)
    if on_cluster:  # `flink run -d`: build, submit, return; the cluster runs it (and its reporter)
        client = env.execute_async(JOB_NAME)
        log.info("job %s submitted to the cluster", client.get_job_id())
        return
    _with_reporter(settings)
    client = env.execute_async(JOB_NAME)
    run_until_done(client, settings)


def _stop_with_savepoint(client, target: str) -> str:
    """Flink's stop-with-savepoint (canonical format). PyFlink 2.2's wrapper still calls the
    two-argument Java method, which Flink 2 replaced by one taking the savepoint format."""
    from pyflink.common.completable_future import CompletableFuture
    from pyflink.java_gateway import get_gateway

    fmt = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    return CompletableFuture(client._j_job_client.stopWithSavepoint(False, target, fmt), str).result()


STATUS_POLL_S = 0.5
"""How often the job's status is asked for, and how often a status call the JVM has not answered looks at the stop."""


def _status(client, stop: threading.Event) -> str | None:
    """The job's status, or None when the stop is asked before the JVM answered: a status call waiting on a JVM that
    does not answer held the loop, and the stop's cancel, past the supervisor's SIGKILL."""
    answer = in_daemon(lambda: str(client.get_job_status().result()), "scoring-job-status")
    while True:
        try:
            return answer.result(timeout=STATUS_POLL_S)
        except TimeoutError:
            if stop.is_set():
                return None


def run_until_done(client, settings: Settings) -> None:
    """Wait for the job; on SIGUSR1 stop it with a savepoint (the upgrade path), on SIGTERM cancel it.

    The savepoint lands under ``<checkpoints>/savepoints``, where the next start finds it as the
    newest state, so "stop with savepoint, deploy the new code, start" keeps every keyed state.
    The cancel is given up 1 s before the supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM,
    timed at its arrival): the job resumes from its last checkpoint at the next start either way.
    """
    requests: list[int] = []
    signal.signal(signal.SIGUSR1, lambda sig, _: requests.append(sig))
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGTERM,))  # timed at the signal's arrival, even with the loop in a JVM call
    job_id = str(client.get_job_id())
    control = control_file(settings)
    write_control(control, job_id)
    log.info("job %s running (pid %s); SIGUSR1 = stop with savepoint", job_id, os.getpid())
    next_sweep = time.monotonic() + STALE_STATE_SWEEP_S  # main() has just swept
    try:
        while True:
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + STALE_STATE_SWEEP_S
                try:
                    for gone in sweep_stale_state(settings, time.time()):
                        log.info("deleted %s: stale state (CG_JOB__STALE_STATE_RETENTION_HOURS)", gone.name)
                except OSError as exc:  # the disk: the job goes on, tried again at the next sweep
                    log.warning("purging stale checkpoints failed: %s", exc)
            status = _status(client, stop)
            if status in ("FINISHED", "FAILED", "CANCELED"):
                log.info("job %s %s", job_id, status)
                return
            if signal.SIGUSR1 in requests:
                target = (settings.checkpoint_dir / "savepoints").resolve().as_uri()
                path = _stop_with_savepoint(client, target)
                log.info("stopped with savepoint %s", path)
                return
            if stop.is_set():
                _cancel(client, job_id, exit_deadline(settings.supervisor.stop_timeout_s, stop_asked_at(stop)))
                return
            stop.wait(STATUS_POLL_S)
    finally:
        control.unlink(missing_ok=True)


def _cancel(client, job_id: str, deadline: float) -> None:
    """Cancel the job, given up at ``deadline`` (``time.monotonic()``) with a WARNING: a cancel the JVM did not finish
    (a task that does not end) was waited for as long as it took, past the supervisor's SIGKILL. The next start resumes
    from the last checkpoint either way."""
    if done_by(lambda: client.cancel().result(), deadline, "scoring-job-cancel"):
        log.info("job %s cancelled", job_id)
    else:
        log.warning(
            "job %s: its cancel was not done before the supervisor's stop timeout; given up (the next start resumes "
            "from the last checkpoint)",
            job_id,
        )


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Run the scoring job on a local Flink mini-cluster until it ends: SIGTERM cancels it, SIGUSR1 stops it
    with a savepoint. Resumes from the newest retained checkpoint (or CG_JOB__RESTORE_FROM)."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level=log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
