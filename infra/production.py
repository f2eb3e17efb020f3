"""Production mode (``checkout-guard supervise``, ``make production``): the real services only, kept running.

Runs the scoring job, face stage, camera bridge, OpenSearch sink, watchlist service, case service, alert sender,
Webex bot and dashboard (``--only``/``--without`` choose) against the configured Kafka, OpenSearch, MQTT, SMTP and
Webex: no local stack and no stand-ins, unlike ``make run``. Each runs under :class:`infra.launcher.Supervisor` (started
again after an exit, with doubling backoff, at most ``max_restarts`` per window) and is asked for its
``/healthz`` (infra/metrics.py) every ``health_interval_s``: one that has answered 503, or nothing once past
its start grace, for longer than ``unhealthy_after_s`` is stopped, so the supervisor restarts it like any
other exit (a hung loop is restarted, not just reported). SIGTERM, SIGINT or SIGHUP stops every process (SIGTERM,
SIGKILL after ``stop_timeout_s``, whole process groups and what they left) and exits 0.

The decisions (:func:`choose`, :func:`unhealthy_since`, :meth:`HealthSupervisor.check`) are pure given a
clock, a probe and the children; :func:`run` applies them to real processes. Stages are named by module
path only (``infra`` never imports them).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Annotated

import psutil
import typer

from infra import metrics
from infra.addresses import bracketed, client_host
from infra.flink_cluster import beside_cluster_job
from infra.launcher import Child, Supervisor, spawn
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import Reaper, orphans, reap_orphans, stop_child, stop_children
from infra.settings import CameraSettings, Settings, SupervisorSettings, face_deadline_problem, get_settings

log = logging.getLogger("infra.supervisor")

SERVICES: dict[str, str] = {
    "camera-bridge": "producers.camera_bridge",
    "face-stage": "jobs.faces.stage",
    "scoring-job": "jobs.flink.job",
    "opensearch-sink": "sinks.opensearch.sink",
    "watchlist-service": "jobs.faces.watchlist_service",
    "case-service": "jobs.cases.service",
    "alert-sender": "sinks.alerts.sender",
    "webex-bot": "jobs.bot.webex_bot",
    "dashboard": "sinks.dashboard",
}
"""Every real service (name as in :data:`infra.metrics.PROCESSES`, so its health port is known) and its
module, in start order: the producers of a topic before its consumers."""

NO_PID_HEADER = frozenset({"scoring-job"})
"""Processes whose ``/healthz`` does not name its pid (the scoring job's is Flink's reporter): an answer without
:data:`infra.metrics.PID_HEADER` is theirs; for every other process it is a stranger's on its port."""

RUN_VAR = "CHECKOUT_GUARD_SUPERVISE"
"""Set to this run's id (``supervise-<pid>-<random>``, the supervisor's pid) in every child's environment: finds
what a child left when it died (an orphaned JVM), and what a supervisor killed outright left (:func:`leftovers`)."""
TICK_S = 0.5
"""How often the loop looks at the children; signals are answered within this."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Each stops every process, then the supervisor. SIGHUP (a closed terminal, a dropped ssh session) ended the
supervisor alone, and the services, each in its own session, ran on without it."""


def run_id(pid: int) -> str:
    """This run's :data:`RUN_VAR` value: names the supervisor's pid, so a later one can tell whether it lives."""
    return f"supervise-{pid}-{uuid.uuid4().hex[:8]}"


def supervisor_pid(value: str) -> int | None:
    """The supervisor pid a :data:`RUN_VAR` value names (None: not one of :func:`run_id`'s)."""
    match = re.fullmatch(r"supervise-(\d+)-[0-9a-f]+", value)
    return int(match[1]) if match else None


def leftovers(timeout_s: float) -> list[str]:
    """Stop what a supervisor that no longer runs (SIGKILLed, OOM-killed) left: its services, each in its own
    session, ran on, and the next supervisor took their ports for another copy's and started a second consumer of
    each beside them. Only processes marked by a dead supervisor are stopped (SIGTERM, SIGKILL after
    ``timeout_s``), never a live supervisor's or unmarked ones; a line for each."""
    spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = orphans(RUN_VAR, supervisor_pid, spare)
    return reap_orphans(found, timeout_s) if found else []


@dataclass(frozen=True)
class Answer:
    """What a process's ``/healthz`` port said: the HTTP status (None: nothing answered) and the pid of the
    process that answered (:data:`infra.metrics.PID_HEADER`; None where it does not say, as Flink's reporter)."""

    status: int | None
    pid: int | None = None


Probe = Callable[[str], Answer]
"""``/healthz`` of a process by name."""


def _names(values: Iterable[str]) -> list[str]:
    return [n.strip() for value in values for n in value.split(",") if n.strip()]


def choose(only: Iterable[str] = (), without: Iterable[str] = ()) -> list[str]:
    """The services to run, in start order: ``only`` (all when empty) less ``without``; names may also be
    comma separated. ValueError for an unknown name or an empty choice, so a typo never runs half a site; its
    message names the option, as click's usage errors do (``supervise`` prints it as one line, exit 2)."""
    wanted, dropped = _names(only), _names(without)
    for option, names in (("--only", wanted), ("--without", dropped)):
        unknown = sorted({n for n in names if n not in SERVICES})
        if unknown:
            raise ValueError(
                f"Invalid value for '{option}': unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}"
            )
    chosen = [n for n in SERVICES if (not wanted or n in wanted) and n not in dropped]
    if not chosen:
        raise ValueError("Invalid value for '--only' / '--without': together they leave no service to run")
    return chosen


FACE_SERVICES = frozenset({"face-stage", "scoring-job"})
"""The services between a checkout and its face: the face deadline must fit the camera's snapshot budget."""
CAMERA_SERVICES = frozenset({"face-stage", "webex-bot"})
"""The services that ask the cameras for snapshots (the bot for ``checkout <tx>``)."""


def camera_stand_in(settings: Settings, names: Iterable[str]) -> str | None:
    """Why ``names`` would ask the demo's camera rather than the store's, or None. Unset, ``CG_CAMERAS__BASE_URL`` is
    the local camera, a stand-in ``make run`` starts and production mode does not: every snapshot failed, every face
    was UNAVAILABLE, and the face deadline check, which trusts the local camera's footage within a second, let the
    demo's 4 s through, all without a word at start. With a Dashboard but the local camera's key, the Dashboard
    refuses every snapshot. A warning, not a refusal: the local camera may have been started by hand for a trial."""
    chosen = set(names)
    cameras = settings.cameras
    takes_faces = chosen & CAMERA_SERVICES or ("scoring-job" in chosen and settings.job.face_deadline_ms > 0)
    if not takes_faces:
        return None
    if cameras.local:
        return (
            "CG_CAMERAS__BASE_URL is unset: snapshots are asked of the local camera at "
            f"127.0.0.1:{cameras.local_port}, a stand-in production mode does not start, so every face is UNAVAILABLE "
            "and CG_JOB__FACE_DEADLINE_MS is not checked against a real camera; set it to the Meraki Dashboard API "
            "(https://api.meraki.com/api/v1)"
        )
    demo_key = CameraSettings.model_fields["api_key"].default
    if chosen & CAMERA_SERVICES and cameras.api_key.get_secret_value() == demo_key.get_secret_value():
        return (
            "CG_CAMERAS__API_KEY is unset: the Dashboard at CG_CAMERAS__BASE_URL is asked with the local camera's key, "
            "and refuses every snapshot; set the organisation's Dashboard API key"
        )
    return None


def healthy(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def unhealthy_since(
    bad_since: float | None, status: int | None, now: float, started: float, grace_s: float
) -> float | None:
    """When the current spell of ill health began (None: healthy). A 503 (any non-2xx) counts at once; no
    answer counts only once ``grace_s`` after the start is over (the process may not listen yet), and
    during the grace neither starts nor ends a spell."""
    if healthy(status):
        return None
    if status is None and now < started + grace_s:
        return bad_since
    return now if bad_since is None else bad_since


def _verdict(status: int | None) -> str:
    return "ok" if healthy(status) else "no answer" if status is None else f"HTTP {status}"


@dataclass
class _Health:
    pid: int
    started: float
    next_probe: float
    bad_since: float | None = None
    last: str = "starting"
    foreign: bool = False
    """Its port is another process's (a second copy started first): this process is not health-checked."""


class HealthSupervisor:
    """A :class:`Supervisor` plus health: :meth:`check` lets the supervisor restart children that exited,
    then probes each running child at most every ``health_interval_s`` and stops one unhealthy for longer
    than ``unhealthy_after_s`` (in the background: the loop goes on); once stopped, its exit goes through the
    supervisor's backoff and restart bound like a crash. What a child that exited left in its process group is stopped
    in the background too, before its restart. Without a ``probe`` (metrics off) only exits are acted on."""

    def __init__(
        self,
        supervisor: Supervisor,
        settings: SupervisorSettings,
        probe: Probe | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stop: Callable[[Child], object] | None = None,
        logger: logging.Logger | None = None,
        pool: Executor | None = None,
    ) -> None:
        self.supervisor, self.settings, self.probe, self.clock = supervisor, settings, probe, clock
        self.stop = stop or (lambda child: stop_child(child, settings.stop_timeout_s))
        self.log = logger or log
        self._health: dict[str, _Health] = {}
        self._pool = pool or ThreadPoolExecutor(max_workers=len(SERVICES), thread_name_prefix="health-stop")
        self._stops: dict[str, Future[object]] = {}
        """Stops under way, by child: each runs in :attr:`_pool`, as it takes up to ``stop_timeout_s`` plus some
        5 s for the process group, and the loop, blocked that long, watched nothing else and left a SIGTERM
        waiting. Until its stop is over the child is neither probed nor restarted."""
        self._probes = ThreadPoolExecutor(max_workers=len(SERVICES), thread_name_prefix="health-probe")
        self._asking: dict[str, tuple[int, Future[Answer]]] = {}
        """Questions still out, by child: the pid asked about and the answer to come (a process whose question
        outlasted ``probe_timeout_s`` is not asked again meanwhile)."""
        self._cleared: dict[str, int] = {}
        """By child: the pid whose stop (an unhealthy one's, or that of what an exited one left) is asked for."""

    def check(self) -> None:
        self._finish_stops()
        self.supervisor.check(busy=self._stops)
        self._clear_exited()
        if self.probe is None or self.settings.unhealthy_after_s <= 0:
            return
        now = self.clock()
        # a dead one is the supervisor's: restarting after its backoff, or given up; a stopping one is the pool's
        due = [c for c in self.supervisor.children if c.alive and c.name not in self._stops and self._due(c, now)]
        for child, answer in zip(due, self._ask(due, self.probe), strict=True):
            self._judge(child, answer, now)

    def _ask(self, children: Sequence[Child], probe: Probe) -> list[Answer]:
        """Each child's ``/healthz`` side by side, waiting ``probe_timeout_s`` for them all: asked one after another,
        nine services took up to nine times it, and a process that exited went unnoticed that long. No answer in
        time is silence; a child whose previous question is still out is not asked again until it is answered, nor
        its next process while its previous one's is (each question ends within ``probe_timeout_s``, see
        :func:`ask_healthz`): so at most one question per service is out, and a stuck one never holds a new thread."""
        for child in children:
            pid, asked = self._asking.get(child.name, (None, None))
            if asked is not None and asked.done() and pid != child.proc.pid:  # its previous process's answer
                del self._asking[child.name]
                asked = None
            if asked is None:
                self._asking[child.name] = child.proc.pid, self._probes.submit(probe, child.name)
        out = [self._asking[c.name][1] for c in children]
        wait(out, timeout=self.settings.probe_timeout_s)
        answers = []
        for child, asked in zip(children, out, strict=True):
            if not asked.done() or self._asking[child.name][0] != child.proc.pid:
                answers.append(Answer(None))
                continue
            del self._asking[child.name]
            if asked.exception() is not None:
                self.log.warning("%s: its /healthz could not be asked: %s", child.name, asked.exception())
            answers.append(Answer(None) if asked.exception() is not None else asked.result())
        return answers

    def _clear_exited(self) -> None:
        """Stop what each child that exited left in its process group (a crashed scoring job's JVM), in :attr:`_pool`:
        done at its restart, it held up the loop for up to ``stop_timeout_s`` plus some 10 s, and no other process was
        watched or restarted meanwhile. The supervisor has noted the exit (its backoff is running, never over within
        the same check); it restarts the child once this stop is over."""
        for child in self.supervisor.children:
            if child.alive or child.name in self._stops or self._cleared.get(child.name) == child.proc.pid:
                continue
            self._cleared[child.name] = child.proc.pid
            self._stops[child.name] = self._pool.submit(self.stop, child)

    def _finish_stops(self) -> None:
        """Hand the children whose stop is over back to the supervisor (their exit then restarts them)."""
        for name, stop in list(self._stops.items()):
            if not stop.done():
                continue
            del self._stops[name]
            if stop.exception() is not None:
                self.log.error("%s: its stop failed: %s", name, stop.exception())
            elif isinstance(left := stop.result(), list) and left:
                self.log.warning("%s: stopped what it left running: %s", name, "; ".join(map(str, left)))

    def stop_all(self, timeout_s: float) -> list[str]:
        """The shutdown: the module's :func:`stop_all` for every child, but a child whose stop is under way here (an
        unhealthy one's, or that of what an exited one left) is left to that stop and waited for: stopped again beside
        it, its process group got a second SIGTERM. A stop still waiting for a thread is taken over instead (it would
        only start, with a whole ``stop_timeout_s`` of its own, after the others). Each stop under way began before the
        shutdown with the same timeout, so it ends before those of the shutdown would. What had to be reaped."""
        busy = {name for name, stop in self._stops.items() if not stop.cancel()}
        free = [c for c in self.supervisor.children if c.name not in busy or self._cleared.get(c.name) != c.proc.pid]
        left = stop_all(free, timeout_s)
        self.close()
        for name, stop in self._stops.items():
            if name not in busy:
                continue
            if stop.exception() is not None:
                self.log.error("%s: its stop failed: %s", name, stop.exception())
            elif isinstance(result := stop.result(), list):
                left += map(str, result)
        self._stops.clear()
        return left

    def shutdown(self, reaper: Reaper, timeout_s: float) -> list[str]:
        """The whole shutdown of ``supervise`` and ``make run``: :meth:`stop_all`, then what the children left outside
        their process groups (``reaper``'s), which gets its SIGTERM only now and the same ``timeout_s`` before SIGKILL
        as they had (a fixed 10 s cut short a JVM saving its state). What had to be reaped."""
        return self.stop_all(timeout_s) + reaper.finish(timeout_s)

    def close(self) -> None:
        """Wait for the stops under way (each bounded by ``stop_timeout_s`` and the group's few seconds); questions
        still out are not waited for."""
        self._probes.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=True)

    def _due(self, child: Child, now: float) -> bool:
        """Whether ``child`` is to be asked now (at most every ``health_interval_s``)."""
        state = self._health.get(child.name)
        if state is None or state.pid != child.proc.pid:  # a new process: its own grace
            state = self._health[child.name] = _Health(child.proc.pid, now, now)
        if now < state.next_probe:
            return False
        state.next_probe = now + self.settings.health_interval_s
        return True

    def _judge(self, child: Child, answer: Answer, now: float) -> None:
        state = self._health[child.name]
        own = answer.pid == child.proc.pid or (answer.pid is None and child.name in NO_PID_HEADER)
        if state.foreign or (answer.status is not None and not own):
            if not state.foreign:  # its own endpoint could not open: that port's health is not this child's
                self.log.warning(
                    "%s: its health port is served by another process (%s), not by pid %d (a second copy on this "
                    "host?): only its exits are acted on until it restarts",
                    child.name,
                    f"pid {answer.pid}" if answer.pid is not None else "no pid given: not a Checkout Guard process",
                    child.proc.pid,
                )
            state.foreign, state.bad_since = True, None
            return
        status = answer.status
        state.bad_since = unhealthy_since(state.bad_since, status, now, state.started, self.settings.start_grace_s)
        verdict = _verdict(status)
        if verdict != state.last and (state.bad_since is not None or healthy(status)):
            level = logging.INFO if healthy(status) else logging.WARNING
            self.log.log(level, "%s: /healthz %s (pid %d)", child.name, verdict, child.proc.pid)
            state.last = verdict
        if state.bad_since is not None and now - state.bad_since > self.settings.unhealthy_after_s:
            self.log.error(
                "%s: unhealthy (/healthz %s) for %.0f s: stopping pid %d to restart it",
                child.name,
                verdict,
                now - state.bad_since,
                child.proc.pid,
            )
            del self._health[child.name]
            self._cleared[child.name] = child.proc.pid  # this stop ends its group too
            self._stops[child.name] = self._pool.submit(self.stop, child)


def restartable(name: str, settings: Settings) -> Callable[[], Child]:
    """Starts ``name``'s module. What a previous process left in its group (a SIGKILLed job's JVM) is stopped
    before by :class:`HealthSupervisor`, beside the loop (here, in the restart, it held up the loop)."""

    def start() -> Child:
        return spawn(SERVICES[name], settings, name=name)

    return start


MAX_HEAD = 65536
"""The most bytes of a ``/healthz`` answer read (a head not complete by then is no answer)."""


def parse_head(head: bytes) -> Answer:
    """The status and :data:`infra.metrics.PID_HEADER` of an HTTP answer (status line and headers up to the blank
    line, then what came of its body); no answer for anything else (a head cut short, not HTTP)."""
    parsed = _parse(head)
    return parsed[0] if parsed is not None else Answer(None)


def _parse(head: bytes) -> tuple[Answer, int | None] | None:
    """The answer and its Content-Length (None: not given, or not a number); None until the head is complete."""
    if b"\r\n\r\n" not in head:
        return None
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not (parts[1].isascii() and parts[1].isdigit()):
        return Answer(None), 0
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        return Answer(None), 0
    pid, length = headers.get(metrics.PID_HEADER, ""), headers.get("Content-Length", "")
    answer = Answer(int(parts[1]), int(pid) if pid.isascii() and pid.isdigit() else None)
    return answer, int(length) if length.isascii() and length.isdigit() else None


def ask_healthz(host: str, port: int, timeout_s: float) -> Answer:
    """``GET /healthz`` on ``host:port`` (an address, not a name to look up), the whole question within
    ``timeout_s``: httpx's timeout bounds each connect and each read alone, so an endpoint that answered a few bytes
    at a time kept the question, and its thread, as long as it went on. Nothing in time is no answer. The answer is
    read to its end (its Content-Length, or the close an HTTP/1.0 question asks for), so the endpoint never writes
    to a closed connection; at most :data:`MAX_HEAD` bytes of it are read."""
    deadline = time.monotonic() + timeout_s
    got = b""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(f"GET /healthz HTTP/1.0\r\nHost: {bracketed(host)}:{port}\r\n\r\n".encode())
            while len(got) < MAX_HEAD:
                parsed = _parse(got)
                if parsed is not None and parsed[1] is not None and len(got) - got.index(b"\r\n\r\n") - 4 >= parsed[1]:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return Answer(None)
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
    except OSError:  # refused, reset, timed out
        return Answer(None)
    return parse_head(got)


class HostAddress:
    """Where a client reaches listeners bound to ``host``: an address as it is; a name looked up once, as the
    metrics endpoints bind it (IPv4, its first address), and kept. The lookup runs in a thread of its own and a
    caller waits for it at most its own timeout: a lookup inside each question was bounded by no probe timeout, and
    a slow resolver held that service's question, so it was not asked again, for as long as the lookup took. At
    most one lookup is under way; one that failed is tried again by the next question."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._address: str | None = host if _is_address(host) else None
        self._pending: Future[str] | None = None
        self._lock = threading.Lock()

    def __call__(self, timeout_s: float) -> str | None:
        """The address, waiting at most ``timeout_s`` for the lookup (None: not known in that time)."""
        if self._address is not None:
            return self._address
        with self._lock:
            pending = self._pending
            if pending is None or (pending.done() and pending.exception() is not None):
                self._pending = pending = Future()
                threading.Thread(target=self._look_up, args=(pending,), name="health-lookup", daemon=True).start()
        try:
            self._address = pending.result(timeout=max(timeout_s, 0.0))
        except (TimeoutError, OSError):  # still looking, or not found (said once per lookup)
            return None
        return self._address

    def _look_up(self, pending: Future[str]) -> None:
        try:
            found = socket.getaddrinfo(self.host, None, socket.AF_INET, socket.SOCK_STREAM)
            pending.set_result(str(found[0][4][0]))
        except Exception as exc:  # not found, no address, a name no resolver takes: tried again next question
            log.warning("CG_BIND_HOST %s could not be looked up for health questions: %s", self.host, exc)
            pending.set_exception(OSError(f"no address for {self.host}: {exc}"))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def http_probe(settings: Settings) -> Probe:
    """Asks each process's ``/healthz`` with :func:`ask_healthz`, ``probe_timeout_s`` in all, the lookup of a
    host-name ``CG_BIND_HOST`` (:class:`HostAddress`) included."""
    address = HostAddress(client_host(settings.bind_host))
    timeout_s = settings.supervisor.probe_timeout_s

    def probe(name: str) -> Answer:
        deadline = time.monotonic() + timeout_s
        host = address(timeout_s)
        left = deadline - time.monotonic()
        if host is None or left <= 0:
            return Answer(None)
        return ask_healthz(host, metrics.port_of(settings, name), left)

    return probe


def endpoints(settings: Settings, name: str) -> str:
    """Where ``name`` answers ``/healthz`` and ``/metrics`` (for the log: what to point a monitor at)."""
    if not settings.metrics.enabled:
        return "no health/metrics endpoint (CG_METRICS__ENABLED=false)"
    target = metrics.scrape_targets(settings)[name]
    return f"health http://{target}/healthz, metrics http://{target}/metrics"


class _Stop:
    """Set by SIGTERM/SIGINT/SIGHUP; the loop ends within a tick (a flag, no lock for a handler to wait on)."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = signal.Signals(signum).name


def stop_all(children: Sequence[Child], timeout_s: float) -> list[str]:
    """SIGTERM to every child at once, then :func:`stop_child` for all of them side by side, so the shutdown
    takes the slowest stop (about ``timeout_s``), not their sum (nine services ignoring SIGTERM took nine
    times ``stop_timeout_s``: past systemd's stop timeout); what had to be reaped. The processes only, not
    their groups: the scoring job still needs its JVM to cancel its Flink job."""
    return stop_children(children, timeout_s)


def run(settings: Settings, names: Sequence[str]) -> None:
    """Start ``names`` supervised and keep them running until SIGTERM/SIGINT/SIGHUP; then stop them all."""
    stop = _Stop()
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    cfg = settings.supervisor
    left = leftovers(cfg.stop_timeout_s)
    if left:
        log.warning("stopped %d processes a supervisor that no longer runs left: %s", len(left), "; ".join(left))
    os.environ[RUN_VAR] = this_run = run_id(os.getpid())
    reaper = Reaper(marker=RUN_VAR, value=this_run)
    supervisor = Supervisor.from_settings(cfg, logger=log)
    probe = http_probe(settings) if settings.metrics.enabled else None
    watch = HealthSupervisor(supervisor, cfg, probe)
    if probe is None or cfg.unhealthy_after_s <= 0:
        log.warning("health checks off (metrics disabled or CG_SUPERVISOR__UNHEALTHY_AFTER_S=0): exits only")
    try:
        for name in names:
            if stop.requested:
                break
            child = supervisor.add(name, restartable(name, settings))  # None: refused, tried again after the backoff
            where = f"log {child.log_path}" if child is not None else "not started yet"
            log.info("%s: %s; %s", name, endpoints(settings, name), where)
        while not stop.requested:
            watch.check()
            time.sleep(TICK_S)
    finally:
        log.info("%s: stopping %d processes", stop.requested or "exiting", len(supervisor.children))
        left = watch.shutdown(reaper, cfg.stop_timeout_s)  # a stop under way (a health stop) is waited for
        if left:
            log.warning("stopped %d processes the children left running: %s", len(left), "; ".join(left))
        log.info("every process stopped")


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main(
    only: Annotated[
        list[str] | None,
        typer.Option(metavar="NAMES", help=f"Run only these (repeat or comma-separate): {', '.join(SERVICES)}."),
    ] = None,
    without: Annotated[list[str] | None, typer.Option(metavar="NAMES", help="Run every service but these.")] = None,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    """Production mode: the real services (no local stack, no stand-ins) against the configured Kafka,
    OpenSearch, MQTT, SMTP and Webex, restarted when they exit or their /healthz stays unhealthy, until
    SIGTERM, Ctrl-C or a hang-up (then every process is stopped and the exit status is 0)."""
    # a bad setting or CG_ENV_FILE: one line naming the variable, exit 1, as every service (infra.cli's handling)
    settings = get_settings()
    setup_logging(settings, log_level, "supervise")
    try:
        names = choose(only or (), without or ())
    except ValueError as exc:  # the command line is wrong: a usage error, exit 2 as click's, in one line
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    problem = face_deadline_problem(settings) if FACE_SERVICES & set(names) else None
    if problem is not None and "scoring-job" in names:  # refused, not warned: every face would be UNAVAILABLE
        # a bad setting, as pydantic's: the same one line and exit 1 (it was exit 2, as for a bad option)
        typer.echo(f"Error: invalid setting {problem}", err=True)
        raise typer.Exit(1) from None
    if problem is not None:  # the face stage ignores the job's deadline: the job is started (and refused) elsewhere
        log.warning("the scoring job would refuse to start: %s", problem)
    if (stand_in := camera_stand_in(settings, names)) is not None:
        log.warning("%s", stand_in)
    # Refused once here, not by the job at each restart until the supervisor gives it up.
    if "scoring-job" in names and (beside := beside_cluster_job(settings, log)) is not None:
        typer.echo(f"Error: {beside}; or run the other services with --without scoring-job", err=True)
        raise typer.Exit(2) from None
    run(settings, names)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
