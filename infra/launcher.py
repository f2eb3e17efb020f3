"""Start the pipeline's Python processes (the Flink job, the sinks) as children with given settings.

Used by ``make run``, the end-to-end tests and the benchmark. Each child runs in its own process
group, so killing it also ends the JVM and the Python workers PyFlink starts underneath. A
:class:`Supervisor` starts a child that exits unexpectedly again, with backoff and a bound per window.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from infra.processes import KILL_WAIT_S, LAST_CHANCE_S, stop_together
from infra.settings import REPO_ROOT, Settings, SupervisorSettings


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path
    terminated: bool = field(default=False, init=False, repr=False)
    """SIGTERM was sent (:meth:`terminate`): it is not sent again."""
    created: float | None = field(default=None, init=False, repr=False)
    """When the child started (psutil's create time), taken as it is made, before it is waited for: once it has
    exited and been waited for, its pid, and the process group named after it, may be another process's
    (:meth:`pid_reused`). None: not known (made for a process already waited for)."""

    def __post_init__(self) -> None:
        if self.proc.returncode is None:  # not waited for yet: the pid is still the child's, a zombie's at worst
            with contextlib.suppress(psutil.Error):
                self.created = psutil.Process(self.proc.pid).create_time()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def pid_reused(self) -> bool:
        """Whether the child's pid now names another process (it exited, was waited for, and the pid was given
        again): that process's group and descendants are not the child's, and are never signalled. A pid no process
        has is not reused, and then a group named after it is the child's: a group that still has members keeps its
        id from being given to a new process."""
        if self.created is None:
            return False
        try:
            return psutil.Process(self.proc.pid).create_time() != self.created
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # cannot tell: not signalled, as another's
            return True

    def _group(self) -> list[int]:
        """The live members of the child's process group (none once its pid is another process's)."""
        return [] if self.pid_reused() else _group_members(self.proc.pid)

    def _signal_group(self, sig: int) -> None:
        """``sig`` to the child's process group, unless its pid is another process's by now."""
        if not self.pid_reused():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the job's JVM and Python workers too)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the child alone, once: its group (the scoring job's JVM) is left to :meth:`stop`. A shutdown
        signals every child and then stops each one (:func:`infra.processes.stop_together`), and the stop signalled
        it again: a second SIGTERM, to a process that takes one as "stop now, no cleanup", cut its stop short."""
        if self.alive and not self.terminated:
            self.terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the child alone (unless :meth:`terminate` sent it already), then to what is left of its group;
        SIGKILL where they do not go in time. Returns the child's exit code.

        All within ``timeout``, plus :data:`~infra.processes.KILL_WAIT_S` for a child killed to be gone (one still
        there then raises :class:`subprocess.TimeoutExpired`): what is left of the group gets SIGKILL at that deadline,
        at least :data:`~infra.processes.LAST_CHANCE_S` after its SIGTERM. Before, a child killed was waited for 10 s
        and its group got at least 5 s more, so a stop ran up to 15 s past its timeout into the supervisor's own.

        The child first: on SIGTERM the scoring job cancels its Flink job through its JVM, and a SIGTERM to
        the whole group killed that JVM at the same moment (the cancel failed, with some 80 py4j tracebacks
        in the job's log). The rest of the group (the JVM, workers) is then waited for and signalled in
        turn: it must not be left running. A group is left alone once the child's pid is another process's
        (:meth:`pid_reused`)."""
        deadline = time.monotonic() + timeout
        self.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            code = self.proc.wait(KILL_WAIT_S)  # reaped: no zombie; one still there raises TimeoutExpired
        # The group is signalled only while the pid is still the child's: a child that exited long ago (given up, or
        # stopped at the shutdown) left its pid free, and a process that got it may lead a group of its own.
        if self._group():
            self._signal_group(signal.SIGTERM)
        rest = max(deadline, time.monotonic() + LAST_CHANCE_S)
        while self._group() and time.monotonic() < rest:
            time.sleep(0.1)
        if self._group():
            self._signal_group(signal.SIGKILL)
        return code


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
    return members


def spawn(module: str, settings: Settings, *args: str, name: str | None = None) -> Child:
    """Run ``python -m <module> [args]`` with ``settings`` passed down as ``CG_*`` variables."""
    name = name or module.rsplit(".", 1)[-1]
    log_dir = settings.stack_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    # Not our settings (they come from ``settings``), nor PyFlink's internal markers: a process that
    # ran a job in-process (a test) has PYFLINK_GATEWAY_DISABLED set, which would stop the child.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CG_", "PYFLINK_", "_PYFLINK"))}
    env.update(settings.to_env())
    # Every setting the parent has is above; one it left unset must stay unset, not come from the repo root's
    # .env (the child's default CG_ENV_FILE), which the parent may not have read (CG_ENV_FILE empty or another file).
    env["CG_ENV_FILE"] = ""
    # The Flink JVM's own log (task failures, restarts) beside the child's, not inside the venv.
    env["FLINK_LOG_DIR"] = str(log_dir / f"{name}.flink")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def start_scoring_job(settings: Settings, name: str = "scoring-job") -> Child:
    return spawn("jobs.flink.job", settings, name=name)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class _Supervised:
    name: str
    start: Callable[[], Child]
    child: Child | None
    """None until its first start succeeds (the system refused it: a fork without memory, a log folder)."""
    restarts: deque[float] = field(default_factory=deque)
    """When it was restarted, within the window."""
    due: float | None = None
    """When a dead child is started again; None while it runs (or once given up)."""
    given_up: bool = False


class Supervisor:
    """Keeps children running (``make run``): one that exits while not being stopped is started again
    after ``backoff_s``, doubling with each restart in the last ``window_s`` up to ``max_backoff_s``;
    after ``max_restarts`` within the window it stays down, so a child that cannot start does not
    spin. Every exit, restart and give-up is logged. :meth:`check` does one pass; call it in a loop."""

    def __init__(
        self,
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        max_restarts: int = 5,
        window_s: float = 600.0,
        restart: bool = True,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_restarts, self.window_s, self.restart = max_restarts, window_s, restart
        self.clock = clock
        self.log = logger or logging.getLogger("infra.supervisor")
        self._members: list[_Supervised] = []
        self._stopping = False

    @classmethod
    def from_settings(
        cls, cfg: SupervisorSettings, *, restart: bool = True, logger: logging.Logger | None = None
    ) -> Supervisor:
        """With the ``CG_SUPERVISOR__*`` backoff and restart bound, for ``checkout-guard supervise`` and ``make run``
        alike: ``make run``'s took its defaults and ignored them."""
        return cls(
            backoff_s=cfg.backoff_s,
            max_backoff_s=cfg.max_backoff_s,
            max_restarts=cfg.max_restarts,
            window_s=cfg.window_s,
            restart=restart,
            logger=logger,
        )

    def add(self, name: str, start: Callable[[], Child]) -> Child | None:
        """Start a child with ``start`` (called again for each restart) and watch it. A start the system refuses
        is a failed restart, tried again after the backoff (None: not running yet); it used to raise, and the
        caller stopped every child already started over one that could not start at that moment."""
        member = _Supervised(name, start, None)
        self._members.append(member)
        try:
            member.child = start()
        except OSError as exc:
            now = self.clock()
            member.restarts.append(now)
            self._exited(member, now, f"could not be started ({exc})", logging.ERROR)
            return None
        self.log.info("%s: started (pid %d)", name, member.child.proc.pid)
        return member.child

    @property
    def children(self) -> list[Child]:
        """Every child started (running or not); one never started yet is not among them."""
        return [m.child for m in self._members if m.child is not None]

    def check(self, busy: Collection[str] = ()) -> None:
        """Notice children that exited and start those whose backoff is over; the children named in ``busy`` (being
        stopped elsewhere) are left as they are until they are no longer busy."""
        if self._stopping:
            return
        now = self.clock()
        for member in self._members:
            if member.given_up or member.name in busy:
                continue
            if member.due is None and member.child is not None and not member.child.alive:
                self._exited(member, now, f"exited with code {member.child.proc.returncode}")
            if member.due is not None and now >= member.due:
                member.due = None
                member.restarts.append(now)
                try:
                    member.child = member.start()
                except OSError as exc:  # a fork refused for memory, a log folder gone: this child only, tried again
                    self._exited(member, now, f"could not be started ({exc})", logging.ERROR)
                    continue
                self.log.warning(
                    "%s: restarted (pid %d), restart %d within %.0f s",
                    member.name,
                    member.child.proc.pid,
                    len(member.restarts),
                    self.window_s,
                )

    def _exited(self, member: _Supervised, now: float, what: str, level: int = logging.WARNING) -> None:
        """``member`` is down (``what``: it exited, or its restart failed): start it after the backoff, or give up."""
        while member.restarts and member.restarts[0] <= now - self.window_s:
            member.restarts.popleft()
        if not self.restart:
            member.given_up = True
            self.log.error("%s: %s (not supervised: stays down)", member.name, what)
            return
        if len(member.restarts) >= self.max_restarts:
            member.given_up = True
            self.log.error(
                "%s: %s after %d restarts within %.0f s: giving up, see %s",
                member.name,
                what,
                len(member.restarts),
                self.window_s,
                member.child.log_path if member.child is not None else "the errors above",
            )
            return
        # the exponent capped: 2 ** 1024 restarts in a long window overflowed a float and ended the supervisor
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** min(len(member.restarts), 30))
        member.due = now + wait
        self.log.log(level, "%s: %s; restarting in %.1f s", member.name, what, wait)

    def describe(self) -> str:
        """One line per child: running / restarting / down, with its restarts in the window."""
        lines = []
        for m in self._members:
            why = "never started" if m.child is None else f"exit {m.child.proc.returncode}"
            if m.child is not None and m.child.alive:
                state = "running"
            elif m.given_up:
                state = f"DOWN ({why})"
            else:
                state = f"restarting ({why})"
            lines.append(f"{m.name} {state}" + (f", {len(m.restarts)} restarts" if m.restarts else ""))
        return ", ".join(lines)

    def stop(self, timeout: float = 20.0) -> list[str]:
        """Stop every child; none is restarted from now on. SIGTERM to all first, then each is waited for side by
        side with one deadline ``timeout`` away and SIGKILLed at it (:func:`infra.processes.stop_together`): one
        after another, N children that ignore SIGTERM took N times ``timeout``. Returns the names of those that did
        not stop (logged at ERROR): a stop that raised (a child still there 1 s after its SIGKILL) came out of here,
        and the caller's cleanup, and the other children's stops, went no further."""
        self._stopping = True
        children = [m.child for m in self._members if m.child is not None]
        failures = stop_together(children, timeout, _stop_one)
        not_stopped = []
        for child, failure in reversed(list(zip(children, failures, strict=True))):
            if failure is None:
                self.log.info("%s: stopped", child.name)
                continue
            not_stopped.append(child.name)
            self.log.error("%s: did not stop (pid %d): %s", child.name, child.proc.pid, failure)
        return not_stopped[::-1]


def _stop_one(child: Child, timeout: float) -> Exception | None:
    """``child.stop(timeout)``; what it raised instead, once its group has had a SIGKILL (what could be stopped is)."""
    try:
        child.stop(timeout)
    except Exception as exc:
        with contextlib.suppress(Exception):
            child.kill()
        return exc
    return None
