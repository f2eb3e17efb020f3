"""Production mode's decisions (infra/production.py): which services run, when ill health restarts one, and
that a restart first clears what the previous process left. Fake clock, children and probe: nothing starts."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import psutil
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from infra import metrics, production
from infra.launcher import Child, Supervisor
from infra.processes import EXIT_MARGIN_S, owner_gone, stop_child
from infra.production import SERVICES, Answer, HealthSupervisor, choose, endpoints, unhealthy_since
from infra.settings import MetricsSettings, Settings, SupervisorSettings, get_settings
from tests.ports import free_port_block
from tests.process_trees import STUBBORN, start_leader, start_stubborn


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProc:
    pids = iter(range(100, 10_000))

    def __init__(self) -> None:
        self.pid, self.returncode = next(self.pids), None

    def poll(self) -> int | None:
        return self.returncode


class FakeChild(Child):
    def __init__(self, name: str) -> None:
        super().__init__(name, FakeProc(), Path(f"/nonexistent/{name}.log"))  # type: ignore[arg-type]

    def die(self, code: int) -> None:
        self.proc.returncode = code


class Starter:
    def __init__(self, name: str) -> None:
        self.name, self.started = name, list[FakeChild]()

    def __call__(self) -> FakeChild:
        self.started.append(FakeChild(self.name))
        return self.started[-1]


class Probe:
    """Answers what the test sets per process (default 200, from the child itself: its pid; ``pid[name]``
    another pid, or None for no pid header); records who was asked."""

    def __init__(self) -> None:
        self.status: dict[str, int | None] = {}
        self.pid: dict[str, int | None] = {}
        self.asked: list[str] = []
        self.children: Callable[[], list[Child]] = list

    def __call__(self, name: str) -> Answer:
        self.asked.append(name)
        own = next((c.proc.pid for c in self.children() if c.name == name and c.alive), None)
        return Answer(self.status.get(name, 200), self.pid.get(name, own))


CFG = SupervisorSettings(
    backoff_s=1.0, health_interval_s=5.0, start_grace_s=30.0, unhealthy_after_s=20.0, max_restarts=3
)


def _within(cfg: SupervisorSettings) -> Settings:
    """Settings with ``cfg``, the bridge's, the shoppers' and the alert sender's graces below its stop timeout (else
    refused)."""
    spare = cfg.stop_timeout_s - EXIT_MARGIN_S  # the alert sender's last commit ends that long before the SIGKILL
    return Settings(
        supervisor=cfg,
        cameras={"bridge_stop_grace_s": cfg.stop_timeout_s / 2},
        kafka={"stop_flush_s": spare / 4},
        alerts={"stop_wait_s": spare / 2},
    )


class Inline(Executor):
    """Runs what it is given at once: a fake stop is over when the check that asked for it returns."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        done: Future = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as exc:
            done.set_exception(exc)
        return done


def watch(clock: Clock, probe: Probe | None, cfg: SupervisorSettings = CFG) -> tuple[HealthSupervisor, list[Child]]:
    stopped: list[Child] = []

    def stop(child: Child) -> None:  # of a running one (an unhealthy one's); an exited one's leaves it as it is
        if child.alive:
            stopped.append(child)
            child.proc.returncode = -15

    sup = Supervisor(backoff_s=cfg.backoff_s, max_restarts=cfg.max_restarts, clock=clock)
    if probe is not None:
        probe.children = lambda: sup.children
    return HealthSupervisor(sup, cfg, probe, clock=clock, stop=stop, pool=Inline()), stopped


def advance(w: HealthSupervisor, clock: Clock, seconds: float, step: float = 1.0) -> None:
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        w.check()


# --------------------------------------------------------------------------------------------- choose


def test_every_service_runs_by_default_in_start_order_and_has_a_health_port() -> None:
    assert choose() == list(SERVICES)
    assert set(SERVICES) <= set(metrics.PROCESSES)
    assert not {"local-webex", "local-camera", "shoppers"} & set(SERVICES), "no stand-ins in production"


def test_only_and_without_choose_and_accept_comma_separated_names() -> None:
    assert choose(["alert-sender,opensearch-sink"]) == ["opensearch-sink", "alert-sender"]
    assert "scoring-job" not in choose(without=["scoring-job", "face-stage"])
    assert len(choose(without=["scoring-job", "face-stage"])) == len(SERVICES) - 2


def test_an_unknown_name_or_an_empty_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown service.*sinkk.*known: camera-bridge"):
        choose(["sinkk"])
    with pytest.raises(ValueError, match="unknown service.*local-camera"):
        choose(without=["local-camera"])
    with pytest.raises(ValueError, match="leave no service to run"):
        choose(["dashboard"], ["dashboard"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--only", "nope"], "Error: Invalid value for '--only': unknown service(s) nope; known: camera-bridge"),
        (["--without", "local-camera"], "Error: Invalid value for '--without': unknown service(s) local-camera"),
        (["--only", "dashboard", "--without", "dashboard"], "Error: Invalid value for '--only' / '--without'"),
    ],
)
def test_the_command_line_refuses_a_bad_choice_of_services_in_one_line_naming_the_option_with_exit_2(
    monkeypatch, args: list[str], says: str
) -> None:
    """A usage error (exit 2, as click's), one line that names the option: it said only "unknown service(s) nope"."""
    monkeypatch.setattr(production, "run", lambda *a: pytest.fail("started"))
    monkeypatch.setattr(production, "setup_logging", lambda *a: None)
    result = CliRunner().invoke(production.cli, args)
    [line] = result.output.strip().splitlines()
    assert result.exit_code == 2 and line.startswith(says), result.output


def test_a_real_camera_with_a_face_deadline_shorter_than_its_snapshot_budget_is_refused(monkeypatch) -> None:
    """Real footage takes up to minutes: with the demo's 4 s every checkout would be decided without its face."""
    from infra.settings import CameraSettings, JobSettings

    dashboard = CameraSettings(base_url="https://api.meraki.com/api/v1", deadline_s=30.0)
    short = Settings(cameras=dashboard, job=JobSettings(face_deadline_ms=4000))
    problem = production.face_deadline_problem(short)
    assert problem and "CG_JOB__FACE_DEADLINE_MS=4000" in problem and "at least 35000" in problem
    # the whole snapshot budget leaves no time to analyse the face and bring it through Kafka
    assert "at least 35000" in (
        production.face_deadline_problem(short.model_copy(update={"job": JobSettings(face_deadline_ms=30_000)})) or ""
    )
    for enough in (35_000, 0):  # the snapshot budget plus 5 s, or no face join at all
        assert (
            production.face_deadline_problem(Settings(cameras=dashboard, job=JobSettings(face_deadline_ms=enough)))
            is None
        )
    assert production.face_deadline_problem(Settings()) is None  # the local camera: footage within a second
    monkeypatch.setattr(production, "get_settings", lambda: short)
    monkeypatch.setattr(production, "run", lambda *a: pytest.fail("started"))
    monkeypatch.setattr(production, "setup_logging", lambda *a: None)
    result = CliRunner().invoke(production.cli, [])
    # a bad setting, answered as the others: one line naming the variable, exit 1 (it was exit 2, as a bad option)
    [line] = result.output.strip().splitlines()
    assert result.exit_code == 1 and line.startswith("Error: invalid setting CG_JOB__FACE_DEADLINE_MS=4000 is shorter")
    started: list = []
    monkeypatch.setattr(production, "run", lambda settings, names: started.append(names))
    assert CliRunner().invoke(production.cli, ["--only", "dashboard"]).exit_code == 0 and started == [["dashboard"]]


def test_a_blank_camera_url_is_the_local_camera_for_snapshots_and_the_face_deadline_check_alike() -> None:
    """``CG_CAMERAS__BASE_URL=`` fetched from the local camera but was a Dashboard to the check at start."""
    from infra.clients.meraki import api_base_url
    from infra.settings import CameraSettings, JobSettings

    for blank in ("", "  "):
        settings = Settings(cameras=CameraSettings(base_url=blank), job=JobSettings(face_deadline_ms=4000))
        assert settings.cameras.local and api_base_url(settings).startswith("http://127.0.0.1:")
        assert production.face_deadline_problem(settings) is None


def test_endpoints_say_where_health_and_metrics_are_or_that_there_are_none() -> None:
    settings = Settings(metrics=MetricsSettings(base_port=19460))
    port = metrics.port_of(settings, "alert-sender")
    assert endpoints(settings, "alert-sender") == (
        f"health http://127.0.0.1:{port}/healthz, metrics http://127.0.0.1:{port}/metrics"
    )
    off = Settings(metrics=MetricsSettings(enabled=False))
    assert "no health/metrics endpoint" in endpoints(off, "alert-sender")


# ------------------------------------------------------------------------------------ unhealthy_since


def test_a_503_starts_a_spell_at_once_even_during_the_grace() -> None:
    assert unhealthy_since(None, 503, now=5.0, started=0.0, grace_s=30.0) == 5.0
    assert unhealthy_since(5.0, 503, now=10.0, started=0.0, grace_s=30.0) == 5.0


def test_no_answer_counts_only_after_the_grace_and_a_2xx_ends_the_spell() -> None:
    assert unhealthy_since(None, None, now=29.0, started=0.0, grace_s=30.0) is None
    assert unhealthy_since(5.0, None, now=29.0, started=0.0, grace_s=30.0) == 5.0, "no answer keeps a 503 spell"
    assert unhealthy_since(None, None, now=31.0, started=0.0, grace_s=30.0) == 31.0
    assert unhealthy_since(31.0, 200, now=40.0, started=0.0, grace_s=30.0) is None


# ---------------------------------------------------------------------------------- HealthSupervisor


def test_a_process_answering_503_longer_than_the_limit_is_stopped_and_restarted_with_backoff() -> None:
    clock, probe = Clock(), Probe()
    w, stopped = watch(clock, probe)
    sink = Starter("opensearch-sink")
    w.supervisor.add("opensearch-sink", sink)
    w.check()
    probe.status["opensearch-sink"] = 503
    advance(w, clock, 5)  # the next probe (every 5 s) sees the first 503: the spell begins
    advance(w, clock, 20)
    assert stopped == [], "not yet: unhealthy for 20 s is not longer than 20 s"
    advance(w, clock, 5)
    assert stopped == [sink.started[0]]
    advance(w, clock, 2)
    assert len(sink.started) == 2 and sink.started[1].alive, "restarted by the supervisor after its backoff"
    assert "1 restarts" in w.supervisor.describe()


def test_a_restarted_process_gets_its_own_grace() -> None:
    clock, probe = Clock(), Probe()
    w, stopped = watch(clock, probe)
    job = Starter("scoring-job")
    w.supervisor.add("scoring-job", job)
    probe.status["scoring-job"] = None
    advance(w, clock, 30 + 20)
    assert stopped == [], "silent through the grace and then exactly the limit"
    advance(w, clock, 6)
    assert stopped == [job.started[0]]
    advance(w, clock, 2)
    assert len(job.started) == 2
    advance(w, clock, 45)
    assert len(stopped) == 1, "the new process is still within grace + limit"
    probe.status["scoring-job"] = 200
    advance(w, clock, 600)
    assert len(stopped) == 1 and job.started[1].alive


def logged_watch(caplog: pytest.LogCaptureFixture) -> tuple[Clock, Probe, HealthSupervisor, list[Child]]:
    """:func:`watch` with a probe, logging to a logger ``caplog`` records at INFO."""
    clock, probe = Clock(), Probe()
    w, stopped = watch(clock, probe)
    w.log = logging.getLogger("test.production")
    caplog.set_level(logging.INFO, logger="test.production")
    return clock, probe, w, stopped


def test_a_process_that_recovers_before_the_limit_is_left_running(caplog: pytest.LogCaptureFixture) -> None:
    clock, probe, w, stopped = logged_watch(caplog)
    bot = Starter("webex-bot")
    w.supervisor.add("webex-bot", bot)
    for _ in range(5):
        probe.status["webex-bot"] = 503
        advance(w, clock, 15)
        probe.status["webex-bot"] = 200
        advance(w, clock, 5)
    assert stopped == [] and len(bot.started) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("webex-bot: /healthz HTTP 503" in m for m in messages)
    assert any("webex-bot: /healthz ok" in m for m in messages)


def test_health_is_asked_once_per_interval_and_never_of_a_dead_process() -> None:
    clock, probe = Clock(), Probe()
    w, _ = watch(clock, probe)
    sender = Starter("alert-sender")
    w.supervisor.add("alert-sender", sender)
    advance(w, clock, 20)
    assert len(probe.asked) == 4
    sender.started[0].die(1)
    probe.asked.clear()
    w.check()
    assert probe.asked == []


def test_every_process_is_asked_at_once_and_the_round_waits_the_probe_timeout_at_most(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Asked one after another, each question waiting up to its timeout, nine services delayed the loop (and so
    the restart of a process that exited) by up to nine times the probe timeout."""
    clock, probe, w, stopped = logged_watch(caplog)
    w.settings = CFG.model_copy(update={"probe_timeout_s": 1.0, "start_grace_s": 0.0})
    hung = threading.Event()
    slow = Probe()
    slow.children = probe.children

    calls: list[str] = []

    def ask(name: str) -> Answer:
        calls.append(name)
        if name == "webex-bot":
            hung.wait(10)  # asked once: its question outlasts the round
            return Answer(503)
        time.sleep(0.8)  # each within the timeout; one after another they took 3.2 s
        return slow(name)

    w.probe = ask
    names = ["opensearch-sink", "alert-sender", "case-service", "dashboard", "webex-bot"]
    for name in names:
        w.supervisor.add(name, Starter(name))
    try:
        started = time.monotonic()
        w.check()
        took = time.monotonic() - started
        assert took < 2.0, f"a round took {took:.1f} s"
        assert sorted(slow.asked) == sorted(names[:-1])
        assert any("webex-bot: /healthz no answer" in r.getMessage() for r in caplog.records), "silence"
        clock.now += CFG.health_interval_s
        w.check()
        assert len(slow.asked) == 8, "the others are asked again"
        assert calls.count("webex-bot") == 1, "the silent one is not, while its question is out"
    finally:
        hung.set()
        w.close()
    assert stopped == []


def test_without_a_probe_only_exits_are_acted_on() -> None:
    clock = Clock()
    w, stopped = watch(clock, None)
    dash = Starter("dashboard")
    w.supervisor.add("dashboard", dash)
    advance(w, clock, 3600, step=60)
    assert stopped == [] and len(dash.started) == 1
    dash.started[0].die(1)
    advance(w, clock, 2)
    assert len(dash.started) == 2


def test_a_port_served_by_another_process_is_not_held_against_the_child(caplog: pytest.LogCaptureFixture) -> None:
    """A second copy on the same host runs without its endpoint; the first copy's answers (or a stranger's 404)
    on that port are not its health, so it was stopped every ~160 s for ever."""
    clock, probe, w, stopped = logged_watch(caplog)
    sink = Starter("opensearch-sink")
    w.supervisor.add("opensearch-sink", sink)
    probe.pid["opensearch-sink"] = 1  # someone else's endpoint: its pid is not the child's
    probe.status["opensearch-sink"] = 404
    advance(w, clock, 3600, step=5)
    assert stopped == [] and len(sink.started) == 1
    warnings = [r.getMessage() for r in caplog.records if "another process (pid 1)" in r.getMessage()]
    assert len(warnings) == 1, "said once, not per probe"
    sink.started[0].die(1)  # its next process may get the port: checked again
    del probe.pid["opensearch-sink"]
    advance(w, clock, 60, step=5)
    assert stopped == [sink.started[1]], "a 404 from its own endpoint counts"


def test_an_answer_without_a_pid_is_a_strangers_except_from_the_scoring_jobs_reporter() -> None:
    """Every service but the scoring job (Flink's reporter) names its pid: a server that does not is not ours, and
    its 404 got the service restarted until the supervisor gave up on it."""
    clock, probe = Clock(), Probe()
    w, stopped = watch(clock, probe)
    for name in ("alert-sender", "scoring-job"):
        w.supervisor.add(name, Starter(name))
        probe.pid[name], probe.status[name] = None, 404
    advance(w, clock, 3600, step=5)
    assert [child.name for child in stopped] == ["scoring-job"] * len(stopped) and stopped, "only the job's counts"


def test_the_probe_reads_which_process_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    base = free_port_block(len(metrics.PROCESSES))
    settings = Settings(metrics=MetricsSettings(base_port=base))
    endpoint = metrics.serve(settings, "face-stage")
    try:
        probe = production.http_probe(settings)
        assert probe("face-stage") == Answer(200, os.getpid())
        assert probe("alert-sender") == Answer(None), "nothing listens there"
    finally:
        endpoint.close()


def test_a_probe_of_an_endpoint_that_answers_a_byte_at_a_time_ends_at_the_probe_timeout() -> None:
    """The probe's timeout bounded each read alone: an endpoint that sent a byte every tenth of a second kept the
    question, and its thread, for as long as it went on (here 10 s for a 1 s timeout)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            for byte in b"HTTP/1.0 200 OK\r\nX-Padding: " + b"x" * 100:
                if done.is_set():
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))
                time.sleep(0.1)

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    base = port - metrics.PROCESSES["camera-bridge"]  # its health port is the trickling one
    settings = Settings(supervisor=SupervisorSettings(probe_timeout_s=1.0), metrics=MetricsSettings(base_port=base))
    try:
        started = time.monotonic()
        answer = production.http_probe(settings)("camera-bridge")
        took = time.monotonic() - started
    finally:
        done.set()
        server.join(5)
        listener.close()
    assert answer == Answer(None) and took < 1.5, f"{answer} after {took:.1f} s"


def test_a_slow_lookup_of_a_host_name_bind_host_ends_each_question_at_the_probe_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host-name CG_BIND_HOST was looked up inside each question, bounded by no probe timeout: a resolver that took
    5 s kept the question (and that service unasked) for 5 s with a 0.5 s timeout. The name is now looked up once,
    beside the questions, and each one ends in time; once found, the address is asked."""
    base = free_port_block(len(metrics.PROCESSES))
    endpoint = metrics.serve(Settings(metrics=MetricsSettings(base_port=base)), "face-stage")
    resolved, lookups = threading.Event(), list[str]()
    real = socket.getaddrinfo

    def slow(host: str, *args: object, **kwargs: object) -> list:
        if host != "health.example":
            return real(host, *args, **kwargs)  # type: ignore[arg-type]
        lookups.append(host)
        resolved.wait(5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    settings = Settings(
        bind_host="health.example",
        supervisor=SupervisorSettings(probe_timeout_s=0.5),
        metrics=MetricsSettings(base_port=base),
    )
    try:
        probe = production.http_probe(settings)
        for _ in range(2):
            started = time.monotonic()
            answer = probe("face-stage")
            took = time.monotonic() - started
            assert answer == Answer(None) and took < 1.0, f"{answer} after {took:.1f} s"
        assert lookups == ["health.example"], "one lookup at a time"
        resolved.set()
        assert probe("face-stage") == Answer(200, os.getpid())
        assert probe("face-stage") == Answer(200, os.getpid()) and len(lookups) == 1, "looked up once"
    finally:
        resolved.set()
        endpoint.close()


def test_at_most_one_question_per_service_is_out_however_often_it_restarts() -> None:
    """A restarted process was asked at once, beside its previous process's question still out: a probe stuck with
    each restart held one more thread, and the others' questions then waited behind them and came back silent."""
    clock, probe = Clock(), Probe()
    w, _ = watch(clock, probe, CFG.model_copy(update={"probe_timeout_s": 0.2, "start_grace_s": 0.0}))
    stuck = threading.Event()
    calls: list[str] = []

    def ask(name: str) -> Answer:
        calls.append(name)
        stuck.wait(10)
        return Answer(200)

    w.probe = ask
    sender = Starter("alert-sender")
    w.supervisor.add("alert-sender", sender)
    try:
        w.check()
        for _ in range(3):  # it exits and is restarted while its first question is still out
            sender.started[-1].die(1)
            advance(w, clock, 10, step=5)
        assert len(sender.started) == 4
        assert calls == ["alert-sender"], "asked again while a question was out"
        stuck.set()
        deadline = time.monotonic() + 5
        while len(calls) == 1 and time.monotonic() < deadline:  # once answered, its current process is asked
            clock.now += 5
            w.check()
        assert len(calls) == 2
    finally:
        stuck.set()
        w.close()


@pytest.mark.parametrize(("bind_host", "asked_at"), [("::1", "[::1]"), ("::", "127.0.0.1")])
def test_an_ipv6_bind_host_serves_health_where_the_supervisor_asks(bind_host: str, asked_at: str) -> None:
    """The endpoint was an IPv4 socket: with CG_BIND_HOST=:: (or any IPv6 address) no process served /metrics or
    /healthz, the supervisor restarted every service each 150 s for want of an answer, and ::1 made the probe's URL
    ``http://::1:9461`` invalid, which ended the supervisor and every service with it."""
    base = free_port_block(len(metrics.PROCESSES))
    settings = Settings(bind_host=bind_host, metrics=MetricsSettings(base_port=base))
    endpoint = metrics.serve(settings, "face-stage")
    try:
        assert endpoint.server is not None, "served"
        assert metrics.scrape_targets(settings)["face-stage"] == f"{asked_at}:{base + 1}"
        probe = production.http_probe(settings)
        assert probe("face-stage") == Answer(200, os.getpid())
        assert probe("alert-sender") == Answer(None), "nothing listens there"
    finally:
        endpoint.close()


def test_a_service_the_system_refuses_at_start_does_not_end_the_supervisor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fork refused for memory, or a log folder it cannot write, while ``supervise`` started its services raised
    out of :func:`production.run`: it stopped the services already started and ended."""
    ticks, stopped = iter(range(4)), list[list[Child]]()

    class Stop(production._Stop):
        @property
        def requested(self) -> str | None:  # type: ignore[override]
            return None if next(ticks, None) is not None else "SIGTERM"

        @requested.setter
        def requested(self, _value: str | None) -> None:
            pass

    def spawn(module: str, settings: Settings, name: str) -> Child:
        if name == "case-service":
            raise PermissionError(13, "Permission denied")
        return FakeChild(name)

    monkeypatch.setattr(production, "_Stop", Stop)
    monkeypatch.setattr(production.signal, "signal", lambda *a: None)
    monkeypatch.setattr(production.time, "sleep", lambda s: None)
    monkeypatch.setattr(production, "spawn", spawn)
    monkeypatch.setattr(production, "stop_all", lambda children, timeout: stopped.append(list(children)) or [])
    monkeypatch.setattr(production, "Reaper", lambda **k: type("R", (), {"finish": lambda self, timeout: []})())
    monkeypatch.delenv(production.RUN_VAR, raising=False)
    settings = Settings(stack_dir=tmp_path, metrics=MetricsSettings(enabled=False))
    with caplog.at_level(logging.INFO, logger="infra.supervisor"):
        production.run(settings, ["opensearch-sink", "case-service", "alert-sender"])
    assert [c.name for c in stopped[0]] == ["opensearch-sink", "alert-sender"], "every other service started"
    assert "case-service: could not be started ([Errno 13] Permission denied); restarting in" in caplog.text
    assert "case-service: no health/metrics endpoint (CG_METRICS__ENABLED=false); not started yet" in caplog.text


def test_the_shutdown_gives_what_the_children_left_running_the_stop_timeout_before_sigkill(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the children left outside their process groups got SIGKILL 10 s after its SIGTERM, whatever
    ``CG_SUPERVISOR__STOP_TIMEOUT_S``: a JVM saving its state was cut short with a longer one."""
    reaped: list[float] = []

    class Stopped(production._Stop):
        def __init__(self) -> None:
            self.requested = "SIGTERM"

    class Reaper:
        def __init__(self, **kwargs: object) -> None:
            pass

        def finish(self, timeout: float = 10.0) -> list[str]:
            reaped.append(timeout)
            return []

    monkeypatch.setattr(production, "_Stop", Stopped)
    monkeypatch.setattr(production.signal, "signal", lambda *a: None)
    monkeypatch.setattr(production, "leftovers", lambda timeout_s: [])
    monkeypatch.setattr(production, "stop_all", lambda children, timeout: [])
    monkeypatch.setattr(production, "Reaper", Reaper)
    monkeypatch.delenv(production.RUN_VAR, raising=False)
    cfg = SupervisorSettings(stop_timeout_s=19.5)
    production.run(Settings(stack_dir=tmp_path, supervisor=cfg, metrics=MetricsSettings(enabled=False)), ["dashboard"])
    assert reaped == [19.5]


def test_a_zero_limit_turns_health_restarts_off() -> None:
    clock, probe = Clock(), Probe()
    w, stopped = watch(clock, probe, CFG.model_copy(update={"unhealthy_after_s": 0.0}))
    w.supervisor.add("face-stage", Starter("face-stage"))
    probe.status["face-stage"] = 503
    advance(w, clock, 600, step=5)
    assert stopped == [] and probe.asked == []


def real_stop(cfg: SupervisorSettings) -> Callable[[Child], list[str]]:
    """The supervisor's stop for real children; nothing for a :class:`FakeChild` (its pid is not its own)."""
    return lambda child: [] if isinstance(child, FakeChild) else stop_child(child, cfg.stop_timeout_s)


_LEAVER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)  # in its group, as a JVM
worker.stdout.readline()  # it ignores SIGTERM now
print(worker.pid, flush=True)
time.sleep(60)
"""


def test_what_a_crashed_process_left_is_stopped_beside_the_loop_before_its_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Stopping what a crashed service left in its group (the scoring job's JVM) ran in its restart, inside the loop:
    for up to the stop timeout plus some seconds no other process was watched or restarted. It runs beside the loop
    now, and the service is started again once it is over."""
    cfg = CFG.model_copy(update={"stop_timeout_s": 2.0})
    spawned: list[tuple[Child, psutil.Process]] = []

    def spawn(module: str, settings: Settings, *, name: str) -> Child:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LEAVER, STUBBORN], start_new_session=True, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        worker = psutil.Process(int(proc.stdout.readline()))
        proc.stdout.close()
        spawned.append((Child(name, proc, tmp_path / f"{name}.log"), worker))
        return spawned[-1][0]

    monkeypatch.setattr(production, "spawn", spawn)
    clock = Clock()
    sup = Supervisor(backoff_s=cfg.backoff_s, max_restarts=cfg.max_restarts, clock=clock)
    w = HealthSupervisor(sup, cfg, None, clock=clock, stop=real_stop(cfg))
    dash = Starter("dashboard")
    try:
        sup.add("scoring-job", production.restartable("scoring-job", _within(cfg)))
        sup.add("dashboard", dash)
        (job, worker) = spawned[0]
        job.proc.kill()  # a crash: its worker runs on in its group
        job.proc.wait(5)
        dash.started[0].die(1)
        slowest = 0.0
        for _ in range(6):  # the exits are noticed, the backoff (1 s) passes
            clock.now += 0.5
            started = time.monotonic()
            w.check()
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 1.0, f"a check took {slowest:.1f} s: the stop of what it left held up the loop"
        assert len(dash.started) == 2, "another process's exit is acted on meanwhile"
        assert len(spawned) == 1 and _running(worker), "not restarted before what it left is stopped"
        deadline = time.monotonic() + 20
        while len(spawned) == 1 and time.monotonic() < deadline:  # SIGKILL after the stop timeout
            clock.now += 0.5
            w.check()
            time.sleep(0.1)
        assert len(spawned) == 2 and spawned[1][0].alive, "restarted once the stop is over"
        assert not _running(worker), "what it left was stopped first"
    finally:
        w.close()
        for child, left in spawned:
            child.kill()
            with contextlib.suppress(psutil.Error):
                left.kill()


def test_stopping_an_unhealthy_process_does_not_hold_up_the_loop(tmp_path: Path) -> None:
    """The stop of an unhealthy process ran in the loop: for its stop timeout (and the group's seconds) nothing else
    was watched and a SIGTERM waited. It runs beside the loop now; the process is restarted once it is over."""
    cfg = CFG.model_copy(update={"health_interval_s": 1.0, "start_grace_s": 0.0, "unhealthy_after_s": 1.0})
    cfg = cfg.model_copy(update={"stop_timeout_s": 2.0})
    clock, probe = Clock(), Probe()
    sup = Supervisor(backoff_s=cfg.backoff_s, max_restarts=cfg.max_restarts, clock=clock)
    probe.children = lambda: sup.children
    w = HealthSupervisor(sup, cfg, probe, clock=clock, stop=real_stop(cfg))
    job: list[Child] = []
    dash = Starter("dashboard")
    try:
        sup.add("scoring-job", lambda: job.append(start_stubborn("scoring-job", tmp_path / "job.log")) or job[-1])
        sup.add("dashboard", dash)
        probe.status["scoring-job"] = 503
        slowest = 0.0
        for _ in range(4):  # the spell begins, lasts over 1 s, and the stop is asked for
            clock.now += 1.0
            started = time.monotonic()
            w.check()
            slowest = max(slowest, time.monotonic() - started)
        assert job[0].alive, "it ignores SIGTERM: its stop is under way"
        assert slowest < 1.0, f"a check took {slowest:.1f} s: the stop held up the loop"
        dash.started[0].die(1)
        advance(w, clock, 2)
        assert len(dash.started) == 2, "another process's exit is acted on meanwhile"
        assert len(job) == 1, "not restarted before its stop is over"
        probe.status["scoring-job"] = 200
        deadline = time.monotonic() + 20
        while len(job) == 1 and time.monotonic() < deadline:  # SIGKILL after the stop timeout, then the backoff
            clock.now += 0.5
            w.check()
            time.sleep(0.1)
        assert job[0].proc.returncode == -signal.SIGKILL
        assert len(job) == 2 and job[1].alive, "restarted after its backoff, as after a crash"
        assert "1 restarts" in sup.describe()
    finally:
        w.close()
        for child in job:
            child.kill()


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (reaped between two questions is not running either)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_shutdown_signals_each_process_before_its_group(tmp_path: Path) -> None:
    """Its all-at-once SIGTERM went to each process group, so the scoring job's JVM died while the job cancelled."""
    (one, w1), (two, w2) = start_leader(tmp_path / "one"), start_leader(tmp_path / "two")
    try:
        assert production.stop_all([one, two], timeout_s=10) == []
        assert [(tmp_path / n).read_text() for n in ("one", "two")] == ["worker alive", "worker alive"]
        assert not any(_running(w) for w in (w1, w2))
    finally:
        one.kill()
        two.kill()


def test_the_shutdown_waits_for_the_slowest_process_not_for_their_sum(tmp_path: Path) -> None:
    """Children stopped one after another each had the whole stop timeout: nine services that ignore SIGTERM
    took nine times it, past systemd's TimeoutStopSec."""
    children = [start_stubborn(f"stubborn-{n}", tmp_path / f"{n}.log") for n in range(3)]
    started = time.monotonic()
    try:
        production.stop_all(children, timeout_s=2.0)
        took = time.monotonic() - started
    finally:
        for child in children:
            child.kill()
    assert all(not child.alive for child in children)
    assert took < 5.0, f"{took:.1f} s: one after another would take at least 6 s"


_SUPERVISOR = """
import subprocess, sys
from pathlib import Path
from infra import production
from infra.launcher import Child
from infra.settings import MetricsSettings, Settings

said = Path(sys.argv[1])

def spawn(module, settings, *, name):  # a service in its own session, as spawn starts them
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    said.write_text(str(proc.pid))
    return Child(name, proc, said.with_suffix(".log"))

production.spawn = spawn
production.run(Settings(metrics=MetricsSettings(enabled=False)), ["dashboard"])
"""


def test_a_hangup_stops_every_process_and_leaves_none_running(tmp_path: Path) -> None:
    """A closed terminal or a dropped ssh session (SIGHUP) ended ``make production`` at once: the services, each in
    its own session, ran on without a supervisor, holding their ports and consumer groups."""
    said = tmp_path / "child"
    sup = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(said)], start_new_session=True)
    child: psutil.Process | None = None
    try:
        deadline = time.monotonic() + 30
        while not (said.exists() and said.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(int(said.read_text()))
        time.sleep(2 * production.TICK_S)  # in its loop
        sup.send_signal(signal.SIGHUP)
        assert sup.wait(30) == 0, "a clean stop"
        assert not _running(child), "the service was left running"
    finally:
        sup.kill()
        if child is not None and _running(child):
            child.kill()


def test_a_run_id_names_the_supervisors_pid_and_a_pid_reused_later_is_not_the_supervisor() -> None:
    assert production.supervisor_pid(production.run_id(4321)) == 4321
    assert production.supervisor_pid("supervise-x-1") is None and production.supervisor_pid("run-12") is None
    assert owner_gone(created=100.0, owner_created=None), "no process has the pid (or only its zombie)"
    assert owner_gone(created=100.0, owner_created=150.0), "the pid's process started after the child: reused"
    assert not owner_gone(created=100.0, owner_created=90.0)


def _start_supervisor(said: Path) -> subprocess.Popen:
    """The supervisor of :data:`_SUPERVISOR`, its log in ``said``.log; returns once its service runs."""
    with said.with_suffix(".err").open("wb") as err:
        sup = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, str(said)], start_new_session=True, stderr=err)
    deadline = time.monotonic() + 30
    while not (said.exists() and said.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sup


def _sleeper(**env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **env}, start_new_session=True
    )


def test_a_supervisor_stops_what_a_killed_supervisor_left_and_only_that(tmp_path: Path) -> None:
    """A SIGKILLed (or OOM-killed) supervisor left its services running, each in its own session; the next one
    took their ports for another copy's and started a second consumer of each beside them."""
    first, second = tmp_path / "first", tmp_path / "second"
    live = _sleeper(**{production.RUN_VAR: production.run_id(os.getpid())})  # a live supervisor's: this test's
    stranger = _sleeper()
    procs = [live, stranger]
    try:
        procs.append(killed := _start_supervisor(first))
        orphan = psutil.Process(int(first.read_text()))
        killed.kill()
        killed.wait(10)
        assert _running(orphan), "the killed supervisor's service ran on"
        procs.append(sup := _start_supervisor(second))
        service = psutil.Process(int(second.read_text()))
        assert not _running(orphan), "stopped before the new supervisor started its own"
        assert _running(service) and live.poll() is None and stranger.poll() is None
        assert f"left: {orphan.pid} " in second.with_suffix(".err").read_text()
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(30) == 0
    finally:
        for path in (first, second):
            with contextlib.suppress(ValueError, OSError, psutil.Error):
                psutil.Process(int(path.read_text())).kill()
        for proc in procs:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        (
            "CG_SUPERVISOR__MAX_RESTARTS",
            "-1",
            "CG_SUPERVISOR__MAX_RESTARTS: Input should be greater than or equal to 0",
        ),
        ("CG_SUPERVISOR__BACKOFF_S", "abc", "CG_SUPERVISOR__BACKOFF_S: Input should be a valid number"),
        ("CG_SUPERVISOR__STOP_TIMEOUT_S", "inf", "CG_SUPERVISOR__STOP_TIMEOUT_S: Input should be a finite number"),
        ("CG_SUPERVISOR__MAX_BACKOFF_S", "0.5", "CG_SUPERVISOR__MAX_BACKOFF_S: 0.5 is below CG_SUPERVISOR__BACKOFF_S"),
        (
            "CG_SUPERVISOR__STOP_TIMEOUT_S",
            "12",
            "CG_ALERTS__STOP_WAIT_S + CG_KAFKA__STOP_FLUSH_S: 12 + 5 = 17 is not below CG_SUPERVISOR__STOP_TIMEOUT_S "
            "(12) less the 1 s its last offset commit ends before the SIGKILL (11): the supervisor's SIGKILL",
        ),
        (
            "CG_CAMERAS__BRIDGE_STOP_GRACE_S",
            "20",
            "CG_CAMERAS__BRIDGE_STOP_GRACE_S: 20 is not below CG_SUPERVISOR__STOP_TIMEOUT_S (20): the supervisor's",
        ),
        ("CG_METRICS__BASE_PORT", "70000", "CG_METRICS__BASE_PORT: Input should be less than or equal to 65527"),
        ("CG_LOG__LEVEL", "LOUD", "CG_LOG__LEVEL: 'LOUD' is not a log level: one of CRITICAL"),
    ],
)
def test_supervise_answers_a_bad_setting_in_one_line_with_exit_1_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    """Each was a 40-line traceback; -1 restarts ran with no restarts at all and port 70000 crashed every service.
    Exit 1, as every service (the same handling: ``checkout-guard supervise`` and ``python -m`` run it)."""
    from click.testing import CliRunner as ClickRunner

    from infra.cli import command_of, with_settings_errors

    monkeypatch.setattr(production, "run", lambda *a: pytest.fail("started"))
    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        result = ClickRunner().invoke(with_settings_errors(command_of(production.cli)), [])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {'invalid setting ' if says.startswith('CG_') else ''}{says}")


TIMES = [n for n, f in SupervisorSettings.model_fields.items() if n.endswith("_s")]


@pytest.mark.parametrize("field", TIMES)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1"])
def test_every_supervisor_time_is_a_finite_number_not_below_0(field: str, value: str) -> None:
    """``inf`` was taken: a stop timeout of inf hung the shutdown for good, a probe timeout of inf stalled the loop
    on one silent process, and a backoff of inf never restarted a service, without a word."""
    with pytest.raises(ValidationError) as refused:
        SupervisorSettings.model_validate({field: value})
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_a_max_backoff_below_the_backoff_is_refused_and_equal_is_allowed() -> None:
    """It was taken silently: every restart then waited the shorter max, never the backoff set."""
    with pytest.raises(ValidationError, match="below CG_SUPERVISOR__BACKOFF_S"):
        SupervisorSettings(backoff_s=10.0, max_backoff_s=5.0)
    assert SupervisorSettings(backoff_s=10.0, max_backoff_s=10.0).max_backoff_s == 10.0
    assert SupervisorSettings(start_grace_s=0.0, unhealthy_after_s=0.0).unhealthy_after_s == 0.0


def test_the_scoring_job_started_on_its_own_refuses_a_short_face_deadline_and_the_face_stage_only_warns(
    monkeypatch, caplog
) -> None:
    """Not only ``supervise``: a job submitted to a Flink cluster starts here. The face stage does not use the
    job's deadline: refusing there restarted it in a loop and left a deployment with no faces at all."""
    from infra.settings import CameraSettings, JobSettings
    from jobs.faces import stage
    from jobs.flink import job

    dashboard = CameraSettings(base_url="https://api.meraki.com/api/v1", deadline_s=30.0)
    short = Settings(cameras=dashboard, job=JobSettings(face_deadline_ms=30_000))
    for module in (job, stage):
        monkeypatch.setattr(module, "get_settings", lambda: short)
        monkeypatch.setattr(module, "setup_logging", lambda *a: None)
    with pytest.raises(SystemExit) as exit_, caplog.at_level("ERROR"):
        job.main()
    assert exit_.value.code == 2 and "Set CG_JOB__FACE_DEADLINE_MS to at least 35000" in caplog.text
    caplog.clear()
    ran: list = []
    monkeypatch.setattr(stage, "run_face_stage", lambda settings, *a: ran.append(settings))
    monkeypatch.setattr(stage.metrics, "serve", lambda *a, **k: type("E", (), {"close": lambda self: None})())
    with caplog.at_level("WARNING", logger="jobs.faces.stage"):
        stage.main()
    assert ran == [short] and "at least 35000" in caplog.text


def test_a_short_face_deadline_only_warns_when_supervise_starts_the_face_stage_without_the_job(
    monkeypatch, caplog
) -> None:
    """The face stage does not use CG_JOB__FACE_DEADLINE_MS: refusing it left a deployment with no faces at all."""
    from infra.settings import CameraSettings, JobSettings

    short = Settings(cameras=CameraSettings(base_url="https://api.meraki.com/api/v1"), job=JobSettings())
    monkeypatch.setattr(production, "get_settings", lambda: short)
    monkeypatch.setattr(production, "setup_logging", lambda *a: None)
    started: list = []
    monkeypatch.setattr(production, "run", lambda settings, names: started.append(names))
    with caplog.at_level("WARNING", logger="infra.supervisor"):
        result = CliRunner().invoke(production.cli, ["--only", "face-stage"])
    assert result.exit_code == 0 and started == [["face-stage"]]
    assert "CG_JOB__FACE_DEADLINE_MS=4000" in caplog.text
    assert CliRunner().invoke(production.cli, ["--only", "scoring-job"]).exit_code == 1


@pytest.mark.parametrize(
    ("cameras", "says"),
    [
        ({}, "CG_CAMERAS__BASE_URL is unset"),
        ({"base_url": "https://api.meraki.com/api/v1"}, "CG_CAMERAS__API_KEY is unset"),
        ({"base_url": "https://api.meraki.com/api/v1", "api_key": "org-key"}, None),
    ],
)
def test_supervise_warns_when_the_face_stage_would_ask_the_demos_camera(monkeypatch, caplog, cameras, says) -> None:
    """Unset, the camera is the local one, a stand-in production mode does not start: every face was UNAVAILABLE and
    the face deadline went unchecked, without a word; with the local camera's key the Dashboard refuses every
    snapshot. A warning (the local camera may run by hand), and only where a service asks the cameras."""
    from infra.settings import CameraSettings, JobSettings

    settings = Settings(cameras=CameraSettings(**cameras), job=JobSettings(face_deadline_ms=35_000))
    monkeypatch.setattr(production, "get_settings", lambda: settings)
    monkeypatch.setattr(production, "setup_logging", lambda *a: None)
    started: list = []
    monkeypatch.setattr(production, "run", lambda settings, names: started.append(names))
    for only in ("face-stage", "webex-bot", "dashboard"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="infra.supervisor"):
            assert CliRunner().invoke(production.cli, ["--only", only]).exit_code == 0
        warned = [r.getMessage() for r in caplog.records if "CG_CAMERAS__" in r.getMessage()]
        if says is None or only == "dashboard":
            assert warned == [], only
        else:
            [line] = warned
            assert line.startswith(says), line
    assert started == [["face-stage"], ["webex-bot"], ["dashboard"]]
    job = production.camera_stand_in(settings, ["scoring-job"])
    assert (job is not None) == (not cameras)  # its face deadline is checked only against a real camera
    assert (
        production.camera_stand_in(
            settings.model_copy(update={"job": JobSettings(face_deadline_ms=0)}), ["scoring-job"]
        )
        is None
    )
