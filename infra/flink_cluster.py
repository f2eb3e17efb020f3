"""A standalone Flink cluster from the apache-flink wheel: one JobManager and ``CG_FLINK__TASKMANAGERS``
TaskManagers as plain foreground processes, so the scoring job can run where a retailer runs Flink.

CLI: ``python -m infra.stack flink up|down|status|submit|stop`` (the sub-app :func:`cli`, registered by
infra/stack.py). The wheel is a full Flink distribution: each process is its own ``bin/jobmanager.sh
start-foreground`` / ``bin/taskmanager.sh start-foreground`` (the script ``exec``\\s the JVM, so the pid we
spawn is the JVM's), with JDK 17 (``CG_JAVA_HOME`` or the one the stack finds), nothing downloaded.

Everything lives under ``CG_FLINK__CLUSTER_DIR`` (default ``<stack dir>/flink-cluster``)::

    conf/config.yaml   generated on every ``up`` (ports, memory, checkpoints, Python, the reporter)
    conf/log4j-*.properties   copied from the wheel      plugins/metrics-prometheus -> the job's reporter
    logs/<member>.out  console output        logs/flink-*.log   Flink's own logs
    run/<member>.pid   our pid files          tmp/               JVM and Flink temp dirs

A job is submitted unchanged with the wheel's ``flink run -d -p N -pym jobs.flink.job`` (:func:`submit_command`):
its ``main()`` sees the CLI's cluster target, builds, submits and returns. The JobManager's REST API and web UI
answer at ``http://<host>:CG_FLINK__REST_PORT``; ``status`` reads ``/overview``.

This module imports nothing of infra/stack.py (which registers its CLI): the JDK and the reporter plugin
folder are handed in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import psutil
import typer
import yaml

from infra.addresses import client_host, host_port, reporter_host, url_host
from infra.processes import log_tail, port_open, within
from infra.settings import REPO_ROOT, Settings
from schemas.errors import CheckoutGuardError

log = logging.getLogger("infra.flink_cluster")

JOBMANAGER = "jobmanager"
JM_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TM_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
REPORTER = "prom"
REPORTER_FACTORY = "checkoutguard.flink.metrics.BoundPrometheusReporterFactory"
"""Flink's Prometheus reporter, subclassed to bind one host (``jobs/flink/java-plugins/metrics-prometheus``):
Flink 2.2's own ``PrometheusReporter`` listens on every interface and has no host option."""
REPORTER_WAIT_S = 20.0
"""How long ``up`` waits for the members' reporters to bind before it writes Prometheus's targets."""
REPORTER_DIR = "metrics-prometheus"
"""The reporter's folder in a Flink plugins folder (infra/install.sh puts it in ``<stack>/lib/flink-plugins``)."""
START_TIMEOUT_S = 120.0
"""The JobManager answers REST in ~10 s and the TaskManagers register in ~10 s more on an idle 2-core machine."""
STOP_TIMEOUT_S = 30.0
HEARTBEAT_INTERVAL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 10000
"""A TaskManager that is gone (SIGKILL, a lost machine) is noticed within ~10 s, not Flink's default 50 s, so
its job restarts from the last checkpoint as soon as a replacement registers."""
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JOB_NAME = "checkout-guard-scoring"
"""The scoring job's Flink name (``pipeline.name``): how ``submit`` and ``stop`` tell it from other jobs."""
ENDED_STATES = frozenset({"FINISHED", "FAILED", "CANCELED"})
"""Flink job states after which a job never runs again; any other (RUNNING, RESTARTING, CREATED, ...) is live."""


class FlinkClusterError(CheckoutGuardError, RuntimeError):
    """The cluster could not be brought to the requested state; the message says why and what to do."""


def flink_home() -> Path:
    """The Flink distribution inside the ``apache-flink`` wheel (``bin/``, ``lib/``, ``opt/``, ``conf/``)."""
    spec = importlib.util.find_spec("pyflink")
    if spec is None or not spec.submodule_search_locations:
        raise FlinkClusterError("apache-flink is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


# --------------------------------------------------------------------------------------------------
# Pure: paths, members, config and command lines


@dataclass(frozen=True)
class ClusterPaths:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> ClusterPaths:
        root = settings.flink.cluster_dir or Path(settings.stack_dir) / "flink-cluster"
        return cls(Path(root).expanduser().resolve())

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def config_yaml(self) -> Path:
        return self.conf / "config.yaml"

    @property
    def plugins(self) -> Path:
        return self.root / "plugins"

    @property
    def lib(self) -> Path:
        """The cluster's ``FLINK_LIB_DIR``: links to the wheel's ``lib/*.jar`` and ``opt/flink-python-*.jar``."""
        return self.root / "lib"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def scrape_targets(self) -> Path:
        """Prometheus file-based discovery of the members' reporters (:func:`write_scrape_targets`)."""
        return self.root / "prometheus-targets.json"

    def pid(self, member: str) -> Path:
        return self.run / f"{member}.pid"

    def out(self, member: str) -> Path:
        return self.logs / f"{member}.out"


@dataclass(frozen=True)
class Member:
    """One process of the cluster: its name, the wheel's script that starts it, and its ``-D`` options."""

    name: str
    script: str
    dynamic: tuple[tuple[str, str], ...] = ()

    @property
    def is_jobmanager(self) -> bool:
        return self.name == JOBMANAGER


def taskmanager_name(index: int) -> str:
    return f"taskmanager-{index}"


def members(settings: Settings) -> list[Member]:
    """The JobManager, then each TaskManager with its own RPC and data port and a readable resource id."""
    fl = settings.flink
    out = [Member(JOBMANAGER, "jobmanager.sh")]
    for i in range(fl.taskmanagers):
        out.append(
            Member(
                taskmanager_name(i),
                "taskmanager.sh",
                (
                    ("taskmanager.resource-id", taskmanager_name(i)),
                    ("taskmanager.rpc.port", str(fl.taskmanager_base_port + 2 * i)),
                    ("taskmanager.data.port", str(fl.taskmanager_base_port + 2 * i + 1)),
                ),
            )
        )
    return out


def member_ports(settings: Settings, member: Member) -> list[int]:
    """The fixed ports ``member`` listens on (the reporter's port is the first free one of a range)."""
    if member.is_jobmanager:
        return [settings.flink.rest_port, settings.flink.rpc_port, settings.flink.blob_port]
    return [int(v) for k, v in member.dynamic if k in ("taskmanager.rpc.port", "taskmanager.data.port")]


def cluster_options(
    settings: Settings, paths: ClusterPaths, java_home: Path, python: str, reporter: bool
) -> dict[str, str]:
    """The cluster's ``config.yaml``: what belongs to the cluster, not to a job (the job sets its own
    program-level options: checkpoint interval, state backend, Python batching, its jars)."""
    fl, host = settings.flink, settings.bind_host
    options = {
        "jobmanager.rpc.address": client_host(host),
        "jobmanager.rpc.port": str(fl.rpc_port),
        "jobmanager.bind-host": host,
        "jobmanager.memory.process.size": fl.jobmanager_memory,
        "jobmanager.execution.failover-strategy": "region",
        "blob.server.port": str(fl.blob_port),
        "rest.port": str(fl.rest_port),
        "rest.address": client_host(host),
        "rest.bind-address": host,
        "taskmanager.bind-host": host,
        "taskmanager.host": client_host(host),
        "taskmanager.numberOfTaskSlots": str(fl.slots_per_taskmanager),
        "taskmanager.memory.process.size": fl.taskmanager_memory,
        "taskmanager.memory.managed.size": fl.taskmanager_managed_memory,
        "heartbeat.interval": str(HEARTBEAT_INTERVAL_MS),
        "heartbeat.timeout": str(HEARTBEAT_TIMEOUT_MS),
        "parallelism.default": "1",
        # Defaults for jobs that set none; the scoring job sets its own (the same settings).
        "execution.checkpointing.dir": settings.checkpoint_dir.resolve().as_uri(),
        "state.backend.type": settings.job.state_backend,
        "python.executable": python,
        "python.client.executable": python,
        "env.java.home": str(java_home),
        "env.pid.dir": str(paths.run),
        "env.log.dir": str(paths.logs),
        "io.tmp.dirs": str(paths.tmp),
        "web.tmpdir": str(paths.tmp / "web"),
        "web.submit.enable": "false",  # jobs come through `flink run`, not uploads from the browser
    }
    if reporter:
        prefix = f"metrics.reporter.{REPORTER}."
        options |= {
            "metrics.reporters": REPORTER,
            prefix + "factory.class": REPORTER_FACTORY,
            prefix + "host": reporter_host(host),
            prefix + "port": fl.metrics_ports,
        }
    return options


def java_opts(flink: Path) -> str:
    """``env.java.opts.all`` of the wheel's own config: the ``--add-opens`` Flink needs on Java 17."""
    try:
        config = yaml.safe_load((flink / "conf" / "config.yaml").read_text()) or {}
        return str(config["env"]["java"]["opts"]["all"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""


def config_yaml(options: dict[str, str]) -> str:
    header = "# Generated by infra/flink_cluster.py on every `flink up` -- edit the generator, not this file.\n"
    return header + yaml.safe_dump(options, sort_keys=False, width=1000)


def member_command(flink: Path, member: Member) -> list[str]:
    """``<wheel>/bin/<script> start-foreground -D k=v ...``: the script execs the JVM in its place."""
    cmd = [str(flink / "bin" / member.script), "start-foreground"]
    for key, value in member.dynamic:
        cmd += ["-D", f"{key}={value}"]
    return cmd


def member_env(paths: ClusterPaths, member: Member, java_home: Path, flink: Path, python: str) -> dict[str, str]:
    """A small explicit environment (never the caller's ``CG_*`` or run marker: the cluster outlives it).

    ``python``'s folder leads the PATH: the TaskManagers' embedded interpreter (PEMJA, ``thread`` mode) finds
    its standard library from the ``python3`` on the PATH, and a system one beside this venv's does not fit."""
    return {
        "PATH": f"{Path(python).parent}:{SERVICE_PATH}",
        "LANG": "C.UTF-8",
        "HOSTNAME": socket.gethostname(),
        "JAVA_HOME": str(java_home),
        "FLINK_HOME": str(flink),
        "FLINK_CONF_DIR": str(paths.conf),
        "FLINK_LOG_DIR": str(paths.logs),
        "FLINK_PID_DIR": str(paths.run),
        "FLINK_PLUGINS_DIR": str(paths.plugins),
        "FLINK_LIB_DIR": str(paths.lib),
        "FLINK_IDENT_STRING": f"cg-{member.name}",
    }


def member_marker(paths: ClusterPaths, member: Member) -> tuple[str, ...]:
    """Strings in the command line of ``member``'s JVM started for this cluster dir (pids get reused)."""
    common = f"--configDir {paths.conf}"
    if member.is_jobmanager:
        return (JM_CLASS, common)
    return (TM_CLASS, common, f"taskmanager.resource-id={member.name}")


def submit_command(flink: Path, parallelism: int, python: str, detached: bool = True) -> list[str]:
    """The wheel's ``flink run``: the job module, unchanged, with this venv's Python on both sides."""
    return [
        str(flink / "bin" / "flink"),
        "run",
        *(["-d"] if detached else []),
        "-p",
        str(parallelism),
        "-pym",
        "jobs.flink.job",
        "-pyexec",
        python,
        "-pyclientexec",
        python,
    ]


def stop_command(flink: Path, job_id: str, target: str) -> list[str]:
    """The wheel's ``flink stop``: stop ``job_id`` with a savepoint (canonical format: it restores on any
    state backend, and on the mini-cluster) under ``target``."""
    return [str(flink / "bin" / "flink"), "stop", "--type", "canonical", "--savepointPath", target, job_id]


def savepoint_path(output: str) -> str | None:
    """The savepoint ``flink stop`` reports (``Savepoint completed. Path: file:/...``)."""
    for line in output.splitlines():
        if "Savepoint completed. Path:" in line:
            return line.split("Path:", 1)[1].strip()
    return None


def submit_env(settings: Settings, paths: ClusterPaths, java_home: Path, base: dict[str, str]) -> dict[str, str]:
    """``base`` (the caller's environment: PATH, the run marker) without PyFlink's internal markers, plus the
    settings as ``CG_*`` (the job's ``main()`` reads them in the client) and the cluster's config dir."""
    env = {k: v for k, v in base.items() if not k.startswith(("CG_", "PYFLINK_", "_PYFLINK"))}
    env |= settings.to_env()
    # A setting the caller left unset stays unset: the client must not read the repo root's .env (its default
    # CG_ENV_FILE), which the caller may not have read (CG_ENV_FILE empty or another file), as infra/launcher.py.
    env["CG_ENV_FILE"] = ""
    env |= {"JAVA_HOME": str(java_home), "FLINK_CONF_DIR": str(paths.conf), "FLINK_LOG_DIR": str(paths.logs)}
    return env


def rest_url(settings: Settings) -> str:
    """The JobManager's REST API and web UI (``http://[::1]:8081`` for an IPv6 bind host)."""
    return f"http://{url_host(settings.bind_host)}:{settings.flink.rest_port}"


# --------------------------------------------------------------------------------------------------
# Processes


def member_process(paths: ClusterPaths, member: Member) -> psutil.Process | None:
    """The live JVM recorded in ``member``'s pid file, if it really is this cluster's member."""
    try:
        proc = psutil.Process(int(paths.pid(member.name).read_text().strip()))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
        if all(part in cmdline for part in member_marker(paths, member)):
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _starting(paths: ClusterPaths, member: Member) -> psutil.Process | None:
    """A member whose start script has not exec'd its JVM yet (the pid file is written before)."""
    try:
        proc = psutil.Process(int(paths.pid(member.name).read_text().strip()))
        cmdline = " ".join(proc.cmdline())
        if proc.status() != psutil.STATUS_ZOMBIE and member.script in cmdline and "start-foreground" in cmdline:
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def _prepare(settings: Settings, paths: ClusterPaths, java_home: Path, plugins: Path | None, flink: Path) -> None:
    """Write the config dir and the plugins folder (the job's reporter only, linked, not copied)."""
    for d in (paths.conf, paths.logs, paths.run, paths.tmp, paths.tmp / "web", paths.plugins):
        d.mkdir(parents=True, exist_ok=True)
    _link_lib(paths, flink)
    for name in ("log4j-console.properties", "log4j-cli.properties", "log4j.properties", "logback-console.xml"):
        with contextlib.suppress(OSError):
            shutil.copyfile(flink / "conf" / name, paths.conf / name)
    link = paths.plugins / REPORTER_DIR
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    source = plugins / REPORTER_DIR if plugins is not None and settings.metrics.enabled else None
    if source is not None:
        if not any(source.glob("*.jar")):
            raise FlinkClusterError(f"the job's Prometheus reporter is not installed in {source}: run `make setup`")
        link.symlink_to(source, target_is_directory=True)
    options = cluster_options(settings, paths, java_home, sys.executable, reporter=source is not None)
    opts = java_opts(flink)
    if opts:
        options["env.java.opts.all"] = opts
    paths.config_yaml.write_text(config_yaml(options))


def lib_jars(flink: Path) -> list[Path]:
    """The cluster's classpath: the wheel's ``lib/`` and its ``flink-python`` jar, which a standard distribution
    keeps in ``opt/``: the JobManager and TaskManagers load Python operators (a job's user jars do not ship it)."""
    return sorted(flink.glob("lib/*.jar")) + sorted(flink.glob("opt/flink-python-*.jar"))


def _link_lib(paths: ClusterPaths, flink: Path) -> None:
    if paths.lib.exists():
        shutil.rmtree(paths.lib)
    paths.lib.mkdir(parents=True)
    for jar in lib_jars(flink):
        (paths.lib / jar.name).symlink_to(jar)


def _spawn(paths: ClusterPaths, member: Member, java_home: Path, flink: Path) -> subprocess.Popen:
    """Start one member detached from our session, console output to ``logs/<member>.out`` (previous: .1)."""
    out = paths.out(member.name)
    if out.exists() and out.stat().st_size:
        out.replace(out.with_suffix(".out.1"))
    with open(out, "ab") as fh:
        proc = subprocess.Popen(
            member_command(flink, member),
            cwd=paths.root,
            env=member_env(paths, member, java_home, flink, sys.executable),
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    paths.pid(member.name).write_text(f"{proc.pid}\n")
    return proc


REST_TIMEOUT_S = 5.0
"""How long ``submit`` and ``stop`` wait for the JobManager's job list, the host name's lookup included."""


def overview(settings: Settings, timeout: float = 2.0) -> dict[str, Any] | None:
    """The JobManager's REST ``/overview`` (taskmanagers, slots-total, jobs-running, flink-version, ...),
    or None when it does not answer within ``timeout`` (:func:`_get_json`: the host name's lookup included)."""
    try:
        view = _get_json(rest_url(settings) + "/overview", timeout)
    except (httpx.HTTPError, ValueError):
        return None
    return view if isinstance(view, dict) else None


def _get_json(url: str, timeout_s: float) -> Any:
    """GET ``url``'s JSON within about ``timeout_s`` in all, the host name's lookup included. httpx bounds the
    connection and each read alone, not the lookup (a resolver that does not answer held every mini-cluster start
    as long as it took) nor an answer that comes a few bytes at a time: the request runs in a thread of its own
    (:func:`infra.processes.within`), left to end on its own (its reads time out) while the caller goes on."""

    def ask() -> Any:
        with httpx.stream("GET", url, timeout=timeout_s) as answer:
            answer.raise_for_status()
            return json.loads(answer.read())

    try:
        return within(ask, timeout_s, "flink-cluster-check")
    except TimeoutError:
        raise httpx.TimeoutException(f"no whole answer within {timeout_s:.0f} s") from None


def _unresolved(exc: BaseException) -> bool:
    """Whether a failed connection failed on the host name's lookup (a :class:`socket.gaierror` under httpx's
    error), not at a port nothing listens on."""
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, socket.gaierror):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _wait(what: str, ready: Callable[[], bool], procs: dict[str, subprocess.Popen], paths: ClusterPaths) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise FlinkClusterError(
                    f"{name} exited during start-up ({proc.returncode}); end of {paths.out(name)}:\n"
                    f"{log_tail(paths.out(name))}"
                )
        if time.monotonic() > deadline:
            raise FlinkClusterError(f"{what} not within {START_TIMEOUT_S:.0f} s; see the logs in {paths.logs}")
        time.sleep(0.5)


def up(settings: Settings, java_home: Path, plugins: Path | None = None, only: str | None = None) -> dict[str, Any]:
    """Start the members that are not running (``only``: that one alone, e.g. a TaskManager after it was
    killed), wait until the JobManager answers and every TaskManager has registered; returns :func:`status`.

    Idempotent: running members are left alone. A start that fails or times out stops the members it started
    (:func:`_stop_started`) and its error says what is left and that ``flink down`` stops it. ``plugins``: a Flink
    plugins folder holding the job's Prometheus reporter (``metrics-prometheus/``), loaded when
    ``CG_METRICS__ENABLED``."""
    paths, flink = ClusterPaths.of(settings), flink_home()
    wanted = [m for m in members(settings) if only is None or m.name == only]
    if not wanted:
        raise FlinkClusterError(f"no cluster member named {only}: {', '.join(m.name for m in members(settings))}")
    host = client_host(settings.bind_host)
    todo = [m for m in wanted if member_process(paths, m) is None and _starting(paths, m) is None]
    busy = [f"{m.name} :{p}" for m in todo for p in member_ports(settings, m) if port_open(host, p)]
    if busy:
        raise FlinkClusterError(
            f"port(s) taken by another process: {', '.join(busy)}; free them or change CG_FLINK__REST_PORT, "
            "…__RPC_PORT, …__BLOB_PORT, …__TASKMANAGER_BASE_PORT"
        )
    if todo and (only is None or any(m.is_jobmanager for m in todo)):
        _prepare(settings, paths, java_home, plugins, flink)
    elif todo and not paths.config_yaml.exists():
        raise FlinkClusterError("the cluster has no config yet: `python -m infra.stack flink up` first")
    t0 = time.monotonic()
    procs: dict[str, subprocess.Popen] = {}
    try:
        for member in todo:
            procs[member.name] = _spawn(paths, member, java_home, flink)
            log.info("flink %s: started pid %d", member.name, procs[member.name].pid)
        _wait("the JobManager's REST API", lambda: overview(settings) is not None, procs, paths)
        registered = {m.name for m in members(settings) if not m.is_jobmanager}
        _wait(
            f"{len(registered)} TaskManagers registered",
            lambda: registered <= set(taskmanager_ids(settings)),
            procs,
            paths,
        )
    except BaseException as exc:  # a failed start, a time-out, Ctrl-C: what this call started must not run on
        before = [m.name for m in members(settings) if m.name not in procs and member_process(paths, m) is not None]
        said = failed_up(list(procs), _stop_started(paths, procs), before)
        if isinstance(exc, FlinkClusterError):
            raise FlinkClusterError(f"{exc}\n{said}") from None
        log.error("flink up interrupted: %s", said)
        raise
    if todo:
        log.info("flink cluster up in %.1fs; web UI %s", time.monotonic() - t0, rest_url(settings))
    write_scrape_targets(settings, wait_s=REPORTER_WAIT_S if todo and settings.metrics.enabled else 0.0)
    return status(settings)


def _stop_started(paths: ClusterPaths, procs: dict[str, subprocess.Popen]) -> list[str]:
    """Stop the members a failed ``up`` started: SIGTERM to each one's session (the script, or the JVM it exec'd),
    SIGKILL to what is left after :data:`STOP_TIMEOUT_S`; their pid files go with them. Returns those still
    running."""
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    left = []
    for name, proc in procs.items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session's other processes, even once the member is gone
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            left.append(name)
            continue
        paths.pid(name).unlink(missing_ok=True)
    return left


def failed_up(started: list[str], left: list[str], before: list[str]) -> str:
    """What a failed ``up`` leaves, for its error: before, the members it had started ran on, unnamed, and nothing
    said that ``flink down`` stops them."""
    gone = [name for name in started if name not in left]
    lines = [f"stopped what this `flink up` started: {', '.join(gone)}" if gone else "it started nothing"]
    if left:
        lines.append(f"still running after SIGKILL: {', '.join(left)}")
    if before:
        lines.append(f"left running as before: {', '.join(before)}")
    if left or before:
        lines.append("`python -m infra.stack flink down` stops them")
    return "; ".join(lines)


def reporter_ports(settings: Settings, proc: psutil.Process) -> list[int]:
    """The ports of ``metrics_ports`` that ``proc`` listens on (its reporter took the first free one)."""
    first, _, last = settings.flink.metrics_ports.partition("-")
    low, high = int(first), int(last or first)
    with contextlib.suppress(psutil.Error):
        return sorted(
            {
                c.laddr.port
                for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and low <= c.laddr.port <= high
            }
        )
    return []


def write_scrape_targets(settings: Settings, wait_s: float = 0.0) -> list[dict[str, Any]]:
    """Tell Prometheus where the running members' reporters are: ``[{"targets": ["host:port"], "labels":
    {"process": "flink-<member>"}}]`` in :attr:`ClusterPaths.scrape_targets`, which the stack's scrape config
    reads (``file_sd_configs``, re-read within seconds); empty once the cluster is down. ``wait_s``: how long
    to wait for every running member's reporter to bind."""
    paths = ClusterPaths.of(settings)
    host = client_host(settings.bind_host)
    deadline = time.monotonic() + wait_s
    while True:
        running = [(m, p) for m in members(settings) if (p := member_process(paths, m)) is not None]
        found = {m.name: reporter_ports(settings, p) for m, p in running}
        if all(found.values()) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    groups = [
        {"targets": [host_port(host, port) for port in ports], "labels": {"process": f"flink-{name}"}}
        for name, ports in found.items()
        if ports
    ]
    paths.root.mkdir(parents=True, exist_ok=True)
    tmp = paths.scrape_targets.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=1))
    tmp.replace(paths.scrape_targets)  # Prometheus never reads half a file
    return groups


def taskmanager_ids(settings: Settings) -> list[str]:
    """The resource ids of the TaskManagers registered with the JobManager (REST ``/taskmanagers``)."""
    try:
        return [tm["id"] for tm in _get_json(rest_url(settings) + "/taskmanagers", 2.0).get("taskmanagers", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return []


def down(settings: Settings, only: str | None = None) -> list[str]:
    """Stop the members this cluster dir started (SIGTERM, SIGKILL after a timeout; ``only``: that one);
    clean their pid files. Returns the names of the members stopped."""
    paths = ClusterPaths.of(settings)
    procs: dict[str, psutil.Process] = {}
    for member in members(settings):
        if only is not None and member.name != only:
            continue
        proc = member_process(paths, member) or _starting(paths, member)
        if proc is None:
            paths.pid(member.name).unlink(missing_ok=True)
            continue
        procs[member.name] = proc
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
        log.info("flink %s: SIGTERM to pid %d", member.name, proc.pid)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=STOP_TIMEOUT_S)
    for proc in alive:
        log.warning("pid %d did not stop within %.0fs: SIGKILL", proc.pid, STOP_TIMEOUT_S)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    for name in procs:
        paths.pid(name).unlink(missing_ok=True)
    if procs or paths.scrape_targets.exists():
        write_scrape_targets(settings)
    return list(procs)


def status(settings: Settings) -> dict[str, Any]:
    """Each member's process and the JobManager's ``/overview``::

        {"members": {"jobmanager": {"pid": int | None, "ports": [...]}, "taskmanager-0": {...}},
         "overview": {...} | None, "taskmanagers": ["taskmanager-0", ...], "web_ui": "http://...",
         "healthy": bool}

    Healthy: the JobManager answers and every TaskManager of the settings is registered."""
    paths = ClusterPaths.of(settings)
    found = {}
    for member in members(settings):
        proc = member_process(paths, member)
        found[member.name] = {"pid": proc.pid if proc else None, "ports": member_ports(settings, member)}
    view = overview(settings)
    registered = taskmanager_ids(settings) if view else []
    expected = {m.name for m in members(settings) if not m.is_jobmanager}
    return {
        "members": found,
        "overview": view,
        "taskmanagers": registered,
        "web_ui": rest_url(settings),
        "healthy": view is not None and expected <= set(registered),
    }


def live_scoring_jobs(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The scoring jobs of ``listed`` (REST ``/jobs/overview``) that have not ended: running, restarting after a
    lost TaskManager, being created or cancelled."""
    return [job for job in listed if job.get("name") == JOB_NAME and job.get("state") not in ENDED_STATES]


def named_jobs(jobs: list[dict[str, Any]]) -> str:
    """Jobs as the messages name them: ``<job id> (<state>)``, comma-separated."""
    return ", ".join(f"{job.get('jid')} ({job.get('state')})" for job in jobs)


def second_job_problem(listed: list[dict[str, Any]]) -> str | None:
    """Why a scoring job must not be submitted beside the jobs ``listed``, or None. Two of them on one checkpoint
    dir and consumer group split the partitions, each restores the other's newest checkpoint at its restarts, and
    every record is decided by whichever holds its partition, with half the state."""
    live = live_scoring_jobs(listed)
    if not live:
        return None
    named = named_jobs(live)
    return (
        f"the scoring job already runs on the cluster: {named}; `flink stop` it first (a savepoint: the new job "
        "resumes from it; a rescale is stop, then submit with the new parallelism)"
    )


DEFAULT_MAX_PARALLELISM_RULE = (
    "pipeline.max-parallelism is not set, so Flink chose it at the job's first start from its parallelism then "
    "(1.5 times it rounded up to a power of two, at least 128)"
)
"""Flink's rule (``KeyGroupRangeAssignment.computeDefaultMaxParallelism`` of the pinned Flink 2.2:
``min(max(roundUpToPowerOfTwo(p + p / 2), 128), 32768)``); a restore keeps the state's maximum parallelism."""


def state_max_parallelism(vertices: list[dict[str, Any]]) -> int | None:
    """The maximum parallelism a job's state allows a rescale, from its REST ``/jobs/<id>`` ``vertices``: the
    smallest ``maxParallelism`` of the vertices at the job's parallelism (those ``-p`` sets; one fixed at 1, the
    drift merge, is not rescaled), or None when they do not say."""
    sizes = [(v.get("parallelism"), v.get("maxParallelism")) for v in vertices if isinstance(v, dict)]
    known = [(p, m) for p, m in sizes if isinstance(p, int) and isinstance(m, int) and m > 0]
    if not known:
        return None
    job_parallelism = max(p for p, _ in known)
    return min(m for p, m in known if p == job_parallelism)


def max_parallelism_problem(parallelism: int, jid: str, maximum: int | None) -> str | None:
    """Why a job of ``parallelism`` cannot resume from the state of the scoring job ``jid`` whose maximum
    parallelism is ``maximum`` (:func:`state_max_parallelism`), or None. Flink keeps the keyed state in that many
    key groups and restores no more subtasks than that: ``flink run -d`` still reported the job submitted, and it
    failed to restore."""
    if maximum is None or parallelism <= maximum:
        return None
    return (
        f"--parallelism {parallelism} is above the maximum parallelism {maximum} of the scoring job's state (job "
        f"{jid}, the last on the cluster, whose savepoint the job resumes from): Flink cannot restore it at "
        f"{parallelism}. {DEFAULT_MAX_PARALLELISM_RULE} and keeps it in the state; submit with --parallelism "
        f"{maximum} or less"
    )


def last_job_max_parallelism(settings: Settings, listed: list[dict[str, Any]]) -> tuple[str, int | None] | None:
    """The newest scoring job of this deployment among ``listed`` (REST ``/jobs/overview``; a rescale's job stopped
    with a savepoint) and its state's maximum parallelism (:func:`state_max_parallelism`), or None when there is
    none. A job whose details do not come within :data:`REST_TIMEOUT_S` has None: not checked."""
    url = rest_url(settings)
    ours = [job for job in listed if job.get("name") == JOB_NAME]
    ours.sort(key=lambda job: job.get("start-time") or 0, reverse=True)
    for job in ours:
        if not _this_deployments(url, job, settings, REST_TIMEOUT_S):
            continue
        jid = str(job.get("jid"))
        try:
            vertices = _get_json(f"{url}/jobs/{jid}", REST_TIMEOUT_S).get("vertices", [])
        except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
            log.debug("the maximum parallelism of the cluster's job %s was not read: %s", jid, exc)
            return jid, None
        return jid, state_max_parallelism(list(vertices))
    return None


SLOT_WAIT_S = 15.0
"""How long ``submit`` waits for enough free slots: a job just stopped hands its slots back within seconds."""


def slots_problem(parallelism: int, view: dict[str, Any] | None) -> str | None:
    """Why a job of ``parallelism`` would not run on the cluster ``view`` (REST ``/overview``) describes, or None
    (also when the cluster does not answer: ``flink run`` says so itself). Every operator of the job shares one
    slot per subtask, so it needs ``parallelism`` free slots; without them ``flink run -d`` still reported the job
    submitted, and it waited for slots, failed after Flink's slot request timeout and restarted, never running."""
    if view is None:
        return None
    free, total = int(view.get("slots-available") or 0), int(view.get("slots-total") or 0)
    if parallelism <= free:
        return None
    if parallelism > total:
        return (
            f"--parallelism {parallelism} needs {parallelism} task slots; the cluster has {total} "
            f"({view.get('taskmanagers')} TaskManagers): raise CG_FLINK__TASKMANAGERS and run `flink up` (it starts "
            "the new TaskManagers beside the running ones), or CG_FLINK__SLOTS_PER_TASKMANAGER and restart the "
            "cluster (`flink stop`, `flink down`, `flink up`), or submit with fewer"
        )
    return (
        f"--parallelism {parallelism} needs {parallelism} free task slots; {free} of {total} are free, the rest "
        f"held by {view.get('jobs-running')} running job(s): `flink stop` the job first (a rescale is stop, then "
        "submit with the new parallelism)"
    )


def wait_for_slots(settings: Settings, parallelism: int, wait_s: float = SLOT_WAIT_S) -> None:
    """:class:`FlinkClusterError` with :func:`slots_problem`'s reason unless ``parallelism`` slots are free within
    ``wait_s`` (at once when the cluster has fewer slots in all)."""
    deadline = time.monotonic() + wait_s
    while True:
        view = overview(settings)
        problem = slots_problem(parallelism, view)
        if problem is None or view is None:
            return
        if parallelism > int(view.get("slots-total") or 0) or time.monotonic() >= deadline:
            raise FlinkClusterError(problem)
        time.sleep(1.0)


CLI_STOP_S = 5.0
"""How long the ``flink`` CLI's process group gets after SIGTERM, on a time-out, before SIGKILL."""


def run_cli(
    cmd: list[str], env: dict[str, str], timeout_s: float, what: str, after: str
) -> subprocess.CompletedProcess:
    """Run the wheel's ``flink`` CLI from the repo root in its own process group, its output captured, for at most
    ``timeout_s``. Past it (a JobManager that takes the request and never answers) or on Ctrl-C the whole group is
    stopped, the CLI's JVM and the job's Python client it started alike, and a time-out is a
    :class:`FlinkClusterError` naming ``what`` and ``after`` (what the cluster may still do). Before, the time-out
    escaped as a traceback and killed the JVM alone: the Python client under it was left running."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its group is ours to stop; Ctrl-C reaches it through the except below
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as exc:
        _stop_group(proc)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise FlinkClusterError(
                f"{what} did not finish within {timeout_s:.0f} s and was stopped; {after}"
            ) from None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left of it after :data:`CLI_STOP_S`; never raises."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(CLI_STOP_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group's other members, even once the CLI itself is gone
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=CLI_STOP_S)


def submit(
    settings: Settings, java_home: Path, parallelism: int, timeout_s: float = 300.0
) -> subprocess.CompletedProcess:
    """Run ``flink run -d -p N -pym jobs.flink.job`` against this cluster from the repo root (the client
    imports the job from there); returns once the job is submitted. Raises with the CLI's output on failure, and
    before it when the cluster does not answer, already runs the scoring job (:func:`second_job_problem`: with
    free slots a second submit, a rescale without its stop, started a second job beside the first), when
    ``parallelism`` is above the maximum parallelism of its last scoring job's state (:func:`max_parallelism_problem`)
    or has not ``parallelism`` free slots (:func:`wait_for_slots`)."""
    paths, flink = ClusterPaths.of(settings), flink_home()
    if not paths.config_yaml.exists():
        raise FlinkClusterError("no cluster config: `python -m infra.stack flink up` first")
    listed = jobs(settings, must_answer=True)
    if (problem := second_job_problem(listed)) is not None:
        raise FlinkClusterError(problem)
    last = last_job_max_parallelism(settings, listed)
    if last is not None and (problem := max_parallelism_problem(parallelism, *last)) is not None:
        raise FlinkClusterError(problem)
    wait_for_slots(settings, parallelism)
    done = run_cli(
        submit_command(flink, parallelism, sys.executable),
        submit_env(settings, paths, java_home, dict(os.environ)),
        timeout_s,
        "flink run",
        "the job may not have been submitted; see `flink status` and the web UI before submitting again",
    )
    if done.returncode != 0:
        raise FlinkClusterError(f"flink run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def not_running_advice(state: str) -> str:
    """What to do about a live scoring job that is not RUNNING, by its state: every state was told to wait for the
    job to run and stop again, which a CANCELLING job never does."""
    if state == "CANCELLING":
        return (
            "It is being cancelled: no savepoint will be taken, and it will not run again; wait until "
            "`flink status` shows it CANCELED (nothing is left to stop then)."
        )
    if state == "FAILING":
        return (
            "It is failing: Flink restarts it if its restart strategy allows (RESTARTING, then RUNNING), or it "
            "ends FAILED; wait until `flink status` shows it running, then stop again (FAILED: nothing to stop)."
        )
    return "Wait until `flink status` shows every TaskManager registered and the job running, then stop again."


def stop_with_savepoint(settings: Settings, java_home: Path, timeout_s: float = 300.0) -> list[str]:
    """Stop the scoring job on the cluster with a savepoint under ``<checkpoint dir>/savepoints``, where the
    job's next start finds it as its newest state (here or on the mini-cluster); returns the savepoints.

    Other jobs of the cluster are left alone: stopped too, their savepoints landed in that folder, and the scoring
    job's next start restored the newest one there, another job's. A scoring job that lives but does not run
    (restarting after a lost TaskManager, being created, failing or being cancelled) is an error, not "no job was
    running": it takes no savepoint now, and it resumes once it can, beside whatever was submitted after that
    answer (a cancelled one does not: :func:`not_running_advice` says which)."""
    paths, flink = ClusterPaths.of(settings), flink_home()
    target = (settings.checkpoint_dir / "savepoints").resolve().as_uri()
    env = submit_env(settings, paths, java_home, dict(os.environ))
    live = live_scoring_jobs(jobs(settings, must_answer=True))  # a cluster not answering is not "no job was running"
    waiting = [job for job in live if job.get("state") != "RUNNING"]
    if waiting:
        named = ", ".join(f"{job.get('jid')} is {job.get('state')}" for job in waiting)
        advice = " ".join(
            (f"{job.get('jid')}: " if len(waiting) > 1 else "") + not_running_advice(str(job.get("state")))
            for job in waiting
        )
        raise FlinkClusterError(f"the scoring job {named}: a savepoint needs it RUNNING; nothing was stopped. {advice}")
    done = []
    for job in live:
        stop = run_cli(
            stop_command(flink, str(job["jid"]), target),
            env,
            timeout_s,
            f"flink stop {job['jid']}",
            "its savepoint may still complete and the job stop; see `flink status` before submitting again",
        )
        path = savepoint_path(stop.stdout)
        if stop.returncode != 0 or path is None:
            raise FlinkClusterError(
                f"flink stop {job['jid']} failed ({stop.returncode}):\n{stop.stdout[-3000:]}\n{stop.stderr[-3000:]}"
            )
        log.info("job %s stopped with savepoint %s", job["jid"], path)
        done.append(path)
    return done


def jobs(settings: Settings, must_answer: bool = False) -> list[dict[str, Any]]:
    """The cluster's jobs (REST ``/jobs/overview``): id, name, state, ... Empty when the cluster does not
    answer within :data:`REST_TIMEOUT_S`, or :class:`FlinkClusterError` with ``must_answer``. The time-out bounds
    the host name's lookup too (:func:`_get_json`): a resolver that did not answer held `flink submit` and
    `flink stop` as long as it took."""
    url = rest_url(settings) + "/jobs/overview"
    try:
        return list(_get_json(url, REST_TIMEOUT_S).get("jobs", []))
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        if must_answer:
            why = str(exc) or type(exc).__name__
            if _unresolved(exc):
                why = f"the host name {client_host(settings.bind_host)} does not resolve ({exc})"
            raise FlinkClusterError(f"the Flink cluster did not answer at {url}: {why}") from None
        return []


CLUSTER_CHECK_S = 2.0
"""How long a mini-cluster start (and ``upgrade status``) waits for the cluster's job list: a JobManager that
takes the question and never answers must not hold up a plain local start."""


DEPLOYMENT_PARAMETERS = ("checkout-guard.consumer-group", "checkout-guard.checkpoint-dir")
"""The scoring job's global job parameters (shown in the web UI and at ``/jobs/<id>/config``) naming what it shares
with a job of the same deployment: its consumer group and its checkpoint dir."""


def deployment_parameters(settings: Settings) -> dict[str, str]:
    """The global job parameters the scoring job carries (:data:`DEPLOYMENT_PARAMETERS`), so that a mini-cluster
    start of another deployment (a backtest copy: ``Settings.isolated``) can tell the cluster's job is not its own."""
    group, checkpoints = DEPLOYMENT_PARAMETERS
    return {group: settings.consumer_group, checkpoints: str(settings.checkpoint_dir.resolve())}


def _this_deployments(url: str, job: dict[str, Any], settings: Settings, timeout_s: float) -> bool:
    """Whether the cluster's scoring ``job`` reads this deployment's consumer group or writes its checkpoint dir.
    A job that does not say (submitted before it did, or its config not read in time) is taken as this one's."""
    try:
        config = _get_json(f"{url}/jobs/{job.get('jid')}/config", max(timeout_s, 0.1))
        theirs = config["execution-config"]["user-config"]
    except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
        log.debug("the config of the cluster's job %s was not read: %s", job.get("jid"), exc)
        return True
    mine = deployment_parameters(settings)
    said = {key: theirs.get(key) for key in mine} if isinstance(theirs, dict) else {}
    if not any(said.values()):
        return True
    return any(said[key] == value for key, value in mine.items())


def cluster_scoring_jobs(settings: Settings, timeout_s: float = CLUSTER_CHECK_S) -> list[dict[str, Any]]:
    """The live scoring jobs (:func:`live_scoring_jobs`) of the cluster the settings name (its REST port on the
    bind host: where ``flink submit`` puts the job). Empty when nothing listens there and no JobManager of this
    cluster dir runs (no cluster); :class:`FlinkClusterError` when the cluster does not answer within about
    ``timeout_s``, or when the bind host is a name that does not resolve (not checked, rather than no cluster).
    Jobs of another deployment (:func:`_this_deployments`: a backtest copy beside the live job) are left out."""
    url, deadline = rest_url(settings), time.monotonic() + timeout_s
    try:
        live = live_scoring_jobs(list(_get_json(url + "/jobs/overview", timeout_s).get("jobs", [])))
        return [job for job in live if _this_deployments(url, job, settings, deadline - time.monotonic())]
    except httpx.ConnectError as exc:  # refused: no cluster, unless its JobManager runs and is not serving yet
        if _unresolved(exc):  # no connection was tried: the cluster it names may run the job
            host = client_host(settings.bind_host)
            raise FlinkClusterError(
                f"the Flink cluster at {url} was not asked: the host name {host} does not resolve ({exc})"
            ) from None
        if member_process(ClusterPaths.of(settings), members(settings)[0]) is None:
            return []
        why = f"its JobManager runs but refused the connection ({exc})"
    except (httpx.HTTPError, ValueError, TypeError, AttributeError) as exc:
        why = str(exc) or type(exc).__name__
    raise FlinkClusterError(f"the Flink cluster at {url} did not answer within {timeout_s:.0f} s: {why}")


def mini_cluster_problem(live: list[dict[str, Any]], url: str) -> str | None:
    """Why a scoring job must not start on a mini-cluster beside the cluster's ``live`` scoring jobs, or None.
    The job's own control file (``job.json``) names mini-cluster jobs only: one started beside a cluster job read
    the same consumer group and wrote the same checkpoint dir, deciding every transaction twice, each job
    restoring the other's checkpoints."""
    if not live:
        return None
    named = named_jobs(live)
    return (
        f"the Flink cluster at {url} runs the scoring job {JOB_NAME}: {named}; a mini-cluster job beside it would "
        "read the same consumer group and write the same checkpoint dir. Stop it first: `python -m infra.stack "
        "flink stop` (a savepoint this start then resumes from; one that is not RUNNING is cancelled in the web UI)"
    )


def beside_cluster_job(settings: Settings, logger: logging.Logger = log) -> str | None:
    """Why a mini-cluster scoring job (``python -m jobs.flink.job``, ``make run``, ``supervise``) must not start, or
    None: :func:`mini_cluster_problem` of the cluster the settings name. A cluster that does not answer within
    :data:`CLUSTER_CHECK_S` does not hold up a local start: ``logger`` warns that it was not checked."""
    try:
        return mini_cluster_problem(cluster_scoring_jobs(settings), rest_url(settings))
    except FlinkClusterError as exc:
        logger.warning("%s; starting without knowing whether it runs the scoring job", exc)
        return None


# --------------------------------------------------------------------------------------------------
# CLI


def cli(
    settings_of: Callable[[], Settings],
    java_home_of: Callable[[Settings], Path],
    plugins_of: Callable[[Settings], Path],
    error: type[Exception] = FlinkClusterError,
) -> typer.Typer:
    """The ``flink`` sub-app: ``settings_of`` builds the CLI's settings, ``java_home_of`` finds the JDK and
    ``plugins_of`` the plugins folder with the job's reporter (infra/stack.py hands in its own)."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        help="A standalone Flink cluster from the apache-flink wheel: a JobManager and TaskManagers.",
    )

    def fail(exc: Exception) -> None:
        typer.echo(f"[flink] ERROR: {exc}", err=True)
        raise typer.Exit(1)

    @app.command("up")
    def up_cmd(
        only: Annotated[str | None, typer.Option(help="start this member alone, e.g. taskmanager-1")] = None,
    ) -> None:
        """Start the JobManager and the TaskManagers (those not running) and wait until all registered."""
        settings = settings_of()
        try:
            _print(up(settings, java_home_of(settings), plugins_of(settings), only=only))
        except (FlinkClusterError, error) as exc:
            fail(exc)

    @app.command("down")
    def down_cmd(
        only: Annotated[str | None, typer.Option(help="stop this member alone, e.g. taskmanager-1")] = None,
    ) -> None:
        """Stop the cluster's processes started from this cluster dir (running jobs fail over or stop)."""
        stopped = down(settings_of(), only=only)
        typer.echo(f"[flink] stopped: {', '.join(stopped) if stopped else 'nothing was running'}")

    @app.command("status")
    def status_cmd() -> None:
        """Show each member, the registered TaskManagers and the jobs (REST /overview); exit 1 if unhealthy."""
        st = status(settings_of())
        _print(st)
        if not st["healthy"]:
            raise typer.Exit(1)

    @app.command("submit")
    def submit_cmd(
        parallelism: Annotated[int, typer.Option(min=1, help="the job's parallelism (flink run -p)")] = 1,
    ) -> None:
        """Submit the scoring job: `flink run -d -p N -pym jobs.flink.job` with this venv's Python."""
        settings = settings_of()
        try:
            done = submit(settings, java_home_of(settings), parallelism)
        except (FlinkClusterError, error) as exc:
            fail(exc)
        typer.echo(done.stdout.strip()[-2000:])
        typer.echo(f"[flink] submitted; web UI {rest_url(settings)}")

    @app.command("stop")
    def stop_cmd() -> None:
        """Stop the scoring job with a savepoint under <checkpoints>/savepoints (the next start restores it,
        on the cluster or the mini-cluster); other jobs of the cluster are left running."""
        settings = settings_of()
        try:
            saved = stop_with_savepoint(settings, java_home_of(settings))
        except (FlinkClusterError, error) as exc:
            fail(exc)
        typer.echo(f"[flink] savepoints: {', '.join(saved) if saved else 'no job was running'}")

    return app


def _print(st: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"checkout-guard Flink cluster -- web UI {st['web_ui']}")
    for col in ("member", "pid", "ports", "registered"):
        table.add_column(col)
    for name, m in st["members"].items():
        registered = "" if name == JOBMANAGER else ("yes" if name in st["taskmanagers"] else "no")
        if name == JOBMANAGER:
            registered = "answers" if st["overview"] else "no answer"
        table.add_row(name, str(m["pid"] or "-"), ", ".join(map(str, m["ports"])), registered)
    Console().print(table)
    view = st["overview"]
    if view:
        typer.echo(
            f"Flink {view.get('flink-version')}: {view.get('taskmanagers')} TaskManagers, "
            f"{view.get('slots-available')}/{view.get('slots-total')} slots free, "
            f"{view.get('jobs-running')} jobs running"
        )
