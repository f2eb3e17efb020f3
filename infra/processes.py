"""Which processes a run started, and stopping them all: children, grandchildren, and the orphans left
when a parent died first (re-parented to init, they are no longer anyone's descendants).

A process is the run's when it descends from the run's own process, or carries the run's marker in its
environment (:data:`MARKER`, passed down by :func:`infra.launcher.spawn`, which forwards everything but
``CG_*``; the local stack's services get an explicit environment and so never carry it). A process is
identified by (pid, create time), so a recycled pid is not taken for the process that had it before.

:func:`new_processes` is the pure part (tested); :func:`snapshot`, :func:`reap`, :func:`stop_child` and
:class:`Reaper` apply it with psutil.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import psutil

from infra.settings import EXIT_MARGIN_S, get_settings

log = logging.getLogger("infra.supervisor")
"""The supervisor's logger (a stop that failed is its news): ``make run`` writes it to its own supervisor.log."""


class Child(Protocol):
    """What the stops below need of a started process (:class:`infra.launcher.Child`), named here so that this
    module does not import ``infra.launcher``, which imports it."""

    name: str
    proc: subprocess.Popen

    @property
    def alive(self) -> bool: ...

    def terminate(self) -> None: ...

    def stop(self, timeout: float = 20.0) -> int | None: ...

    def pid_reused(self) -> bool: ...


T = TypeVar("T")
C = TypeVar("C", bound=Child)

ProcKey = tuple[int, float]
"""(pid, create time): one process, never confused with a later one that got the same pid."""

MARKER = "CHECKOUT_GUARD_RUN"
"""Environment variable a run sets to its id; its children and theirs inherit it."""


def new_processes(before: Collection[ProcKey], after: Iterable[ProcKey], keep: Collection[int] = ()) -> list[ProcKey]:
    """The processes of ``after`` that were not in ``before`` and whose pid is not in ``keep``, by pid."""
    seen = set(before)
    return sorted(p for p in set(after) if p not in seen and p[0] not in keep)


def key(proc: psutil.Process) -> ProcKey | None:
    with contextlib.suppress(psutil.Error):
        return proc.pid, proc.create_time()
    return None


def descendants(pid: int) -> list[psutil.Process]:
    """Every process under ``pid`` (children, theirs, ...); empty when it is gone."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def marked(marker: str, value: str) -> list[psutil.Process]:
    """Every process (but this one) whose environment has ``marker=value``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(marker) == value:
                found.append(proc)
    return found


def owner_gone(created: float, owner_created: float | None) -> bool:
    """Whether the process that started one created at ``created`` is gone: no process has its pid
    (``owner_created`` None, a zombie too) or the one that has it started later (the pid was reused)."""
    return owner_created is None or owner_created > created


def created_at(pid: int) -> float | None:
    """When process ``pid`` started; None when there is none (or only its zombie)."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            return proc.create_time()
    return None


def orphans(marker: str, owner: Callable[[str], int | None], spare: Collection[int] = ()) -> list[psutil.Process]:
    """Every process (but ``spare``'s pids) whose environment's ``marker`` names, through ``owner``, a pid that
    no longer runs the process that started it: what a supervisor killed with SIGKILL left running. A marker
    ``owner`` cannot read (None), another user's process, and one whose owner lives are not among them."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in spare:
            continue
        with contextlib.suppress(psutil.Error):
            value = proc.environ().get(marker)
            pid = owner(value) if value else None
            gone = pid is not None and owner_gone(proc.create_time(), created_at(pid))
            if gone and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def reap_orphans(procs: Collection[psutil.Process], timeout: float) -> list[str]:
    """Stop ``procs``: SIGTERM to the topmost first (those whose parent is not among them: a service, not its
    JVM, which the scoring job still needs to cancel its Flink job), SIGKILL after ``timeout``, then to the rest
    that still run, with SIGKILL at that same time (at least :data:`LAST_CHANCE_S` after their SIGTERM; before,
    a fixed 5 s more); a line for each process that was running."""
    deadline = time.monotonic() + timeout
    pids = {p.pid for p in procs}
    top: list[psutil.Process] = []
    below: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            (below if proc.ppid() in pids else top).append(proc)
    keys = [k for k in map(key, top) if k is not None]
    rest = [k for k in map(key, below) if k is not None]
    return reap(keys, timeout) + reap(rest, chance_left(deadline))


def snapshot(pid: int | None = None, marker: str | None = None, value: str | None = None) -> set[ProcKey]:
    """Every process carrying ``marker=value`` (descendants or orphans); without a marker, the descendants
    of ``pid`` (default: this process). A marked run thus never counts the local stack's services, which
    it may have started but which get a clean environment and are meant to outlive it."""
    procs = marked(marker, value) if marker and value else descendants(os.getpid() if pid is None else pid)
    return {k for k in map(key, procs) if k is not None}


def tree(keys: Iterable[int]) -> set[int]:
    """The pids given and all their descendants (what a ``keep`` should spare)."""
    out: set[int] = set()
    for pid in keys:
        out.add(pid)
        out.update(p.pid for p in descendants(pid))
    return out


def describe(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmd = "?"
    return f"{proc.pid} {cmd[:160]}"


def stop_timeout_s() -> float:
    """``CG_SUPERVISOR__STOP_TIMEOUT_S``: what a process gets between SIGTERM and SIGKILL where a caller names none."""
    return get_settings().supervisor.stop_timeout_s


def reap(keys: Iterable[ProcKey], timeout: float | None = None) -> list[str]:
    """SIGTERM the processes still alive (the same process: same create time), wait up to ``timeout`` (by default
    the supervisor's stop timeout, :func:`stop_timeout_s`: a fixed 10 s cut short a process saving its state within a
    longer one), SIGKILL the rest and wait for them up to :data:`KILL_WAIT_S` (this process's children are reaped then,
    no zombie is left; before, a fixed 5 s); returns a line for each one that was still running."""
    timeout = stop_timeout_s() if timeout is None else timeout
    procs: list[psutil.Process] = []
    for pid, created in keys:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                procs.append(proc)
    lines = [describe(p) for p in procs]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=KILL_WAIT_S)
    return lines


def stop_child(child: Child, timeout: float = 20.0) -> list[str]:
    """Stop a :class:`infra.launcher.Child` and everything under it, even when the child itself has already
    exited (its stop signals what is left of its group once, then kills it) or a grandchild left its process group;
    returns what had to be reaped after the child's own stop. Never raises: a stop that raised is logged at ERROR
    naming the child (it was dropped without a word, and the shutdown went on as if the child had stopped). The group
    of a child that had exited got a SIGTERM here and another from the child's stop. Once the child's pid is another
    process's (it exited long ago), neither that process's descendants nor its group are touched: they were reaped and
    killed as the child's.

    What is reaped after the child's stop (its descendants outside its group) gets SIGKILL by ``timeout`` from now,
    the stop's own deadline, at least :data:`LAST_CHANCE_S` after its SIGTERM: a fixed 5 s each for them (and for the
    child, after the SIGKILL of a stop that raised) kept a shutdown, and a stop the shutdown waits for, 5 to 10 s past
    the stop timeout."""
    deadline = time.monotonic() + timeout
    below = set() if child.pid_reused() else {k for k in map(key, descendants(child.proc.pid)) if k is not None}
    try:
        child.stop(timeout)
    except Exception as exc:  # cleanup goes on for the other children
        log.error("%s: did not stop (pid %d): %s", child.name, child.proc.pid, exc)
        if not child.pid_reused():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            child.proc.wait(chance_left(deadline))
    return reap(below, timeout=chance_left(deadline))


def stop_together(children: Iterable[C], timeout: float, stop: Callable[[C, float], T]) -> list[T]:
    """SIGTERM to every child (the last started first; a child's stop does not send it again), then
    ``stop(child, time left)`` for all of them side by side
    with one deadline ``timeout`` from now, so N children that ignore SIGTERM take about ``timeout``, not N times it
    (one after another, ``make run``'s stop took that); each ``stop`` then kills what is left. Results in the order
    given."""
    ordered = list(children)
    for child in reversed(ordered):
        child.terminate()
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=max(len(ordered), 1), thread_name_prefix="stop") as pool:
        return list(pool.map(lambda child: stop(child, max(deadline - time.monotonic(), 0.0)), ordered))


def stop_children(children: Iterable[Child], timeout: float = 20.0) -> list[str]:
    """:func:`stop_child` for every child at once (:func:`stop_together`); what had to be reaped. The processes are
    signalled before their groups: the scoring job still needs its JVM to cancel its Flink job."""
    return [line for lines in stop_together(children, timeout, stop_child) for line in lines]


@dataclass
class Reaper:
    """Snapshot the run's processes now; :meth:`finish` reaps those started since (sparing ``keep()``'s
    pids and their descendants) and returns a line for each, so a caller can report them."""

    marker: str | None = MARKER
    value: str | None = field(default_factory=lambda: os.environ.get(MARKER))
    keep: Callable[[], Collection[int]] = tuple
    before: set[ProcKey] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.before = snapshot(marker=self.marker, value=self.value)

    def leftovers(self) -> list[ProcKey]:
        after = snapshot(marker=self.marker, value=self.value)
        return new_processes(self.before, after, tree(self.keep()))

    def finish(self, timeout: float | None = None) -> list[str]:
        """Reap the leftovers (:func:`reap`; ``timeout`` by default the supervisor's stop timeout, not a fixed 10 s)."""
        return reap(self.leftovers(), timeout)


@contextlib.contextmanager
def reaping(
    report: Callable[[list[str]], None], timeout_s: float, keep: Callable[[], Collection[int]] = tuple
) -> Iterator[Reaper]:
    """Run a block, then reap every process it started that is still running (SIGTERM, SIGKILL ``timeout_s`` later:
    the supervisor's stop timeout, as :meth:`infra.production.HealthSupervisor.shutdown` gives them; a fixed 10 s cut
    short a process saving its state within a longer one), and ``report`` them."""
    reaper = Reaper(keep=keep)
    try:
        yield reaper
    finally:
        left = reaper.finish(timeout_s)
        if left:
            report(left)


def within(call: Callable[[], T], timeout_s: float, name: str) -> T:
    """``call()``'s result (or its exception) within ``timeout_s``, else :class:`TimeoutError`. For a call whose own
    time-outs leave the host name's lookup out (a socket's, httpx's: ``getaddrinfo`` takes none, and a resolver that
    does not answer held the call as long as it took): it runs in a daemon thread ``name``, left to end on its own
    past ``timeout_s`` while the caller goes on."""
    return in_daemon(call, name).result(timeout=timeout_s)


def in_daemon(call: Callable[[], T], name: str) -> Future[T]:
    """``call()`` started in a daemon thread ``name`` (no process waits for it at exit); its result or exception."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(call())
        except BaseException as exc:  # handed to the caller, as its own call would raise it
            done.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


def exit_deadline(stop_timeout_s: float, asked_at: float | None = None) -> float:
    """When (``time.monotonic()``) a service whose stop was asked at ``asked_at`` (now if None; see
    :func:`stop_asked_at`) must have given up its last Kafka calls: :data:`EXIT_MARGIN_S` before the SIGKILL that comes
    ``stop_timeout_s`` after the SIGTERM."""
    return (time.monotonic() if asked_at is None else asked_at) + stop_timeout_s - EXIT_MARGIN_S


class StopRequest(threading.Event):
    """A stop event that remembers when the stop was first asked (:attr:`asked_at`, ``time.monotonic()``): the
    supervisor's SIGKILL counts from the SIGTERM, not from when the service's loop got round to its stop (a
    synchronous offset commit hanging with Kafka down held the loop, and its time was not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked_at: float | None = None

    def set(self) -> None:
        if self.asked_at is None:
            self.asked_at = time.monotonic()
        super().set()

    def clear(self) -> None:
        super().clear()
        self.asked_at = None

    def exit_by(self, stop_timeout_s: float) -> float | None:
        """Once the stop is asked, when its last Kafka calls are given up (:func:`exit_deadline`: 1 s before the
        supervisor's SIGKILL, counted from the stop's asking); None before: while running, no limit."""
        return exit_deadline(stop_timeout_s, self.asked_at) if self.is_set() else None


def stop_asked_at(stop: threading.Event) -> float | None:
    """When ``stop`` was set, where it is a set :class:`StopRequest`; else None (count from now)."""
    return stop.asked_at if isinstance(stop, StopRequest) and stop.is_set() else None


def stop_on_signals(stop: StopRequest, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Set ``stop`` on any of ``signals`` (call from the main thread), at the signal's arrival. A Python handler runs
    only when the main thread runs Python again: one blocked in a C call (librdkafka's synchronous commit, Kafka down)
    ran it, and so took the stop's time, only once that call returned. The interpreter's C-level handler also writes the
    signal's number to the wakeup fd (:func:`signal.set_wakeup_fd`, taken here), which a daemon thread reads at once."""
    wanted = {int(sig) for sig in signals}
    for sig in wanted:
        signal.signal(sig, lambda *_: stop.set())
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())

    def watch() -> None:
        with reader, writer:  # the writer lives as long as the wakeup fd is read
            while data := reader.recv(64):
                if wanted.intersection(data):
                    stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()


def time_left(deadline: float, most_s: float | None = None) -> float:
    """Seconds until ``deadline`` (``time.monotonic()``), never below 0, and at most ``most_s`` if given."""
    left = max(deadline - time.monotonic(), 0.0)
    return left if most_s is None else min(left, most_s)


KILL_WAIT_S = 1.0
"""How long a stop waits for processes to be gone after their SIGKILL, and reaps its own children among them (no zombie
left): the kernel ends a killed process at once, unless it is inside an uninterruptible call (a disk or network file
system that does not answer), which no wait here would shorten. Before, 5 or 10 s, past the stop timeout."""

LAST_CHANCE_S = 0.05
"""How long a stop still waits for calls begun at or after their deadline (an earlier call used the time up): a call
that ends at once (a channel's close with nothing left to close) is then not given up for want of time. Far inside
:data:`EXIT_MARGIN_S`; calls side by side (:func:`all_done_by`) share it."""


def chance_left(deadline: float) -> float:
    """:func:`time_left` of ``deadline``, but at least :data:`LAST_CHANCE_S`: what a call at a stop may still be
    waited for."""
    return max(time_left(deadline), LAST_CHANCE_S)


def all_done_by(calls: Iterable[tuple[str, Callable[[], object]]], deadline: float) -> list[Future[object]]:
    """Start every ``(name, call)`` at once, each in a daemon thread ``name`` (:func:`in_daemon`), and wait for them
    until ``deadline`` (``time.monotonic()``), or :data:`LAST_CHANCE_S` from now when that is later; their futures
    in order, those not done given up to end on their own. One after another, a call begun once an earlier one had
    used up the deadline got no time at all, and was given up however quickly it would have ended."""
    futures = [in_daemon(call, name) for name, call in calls]
    futures_wait(futures, timeout=chance_left(deadline))
    return futures


def done_by(call: Callable[[], object], deadline: float, name: str) -> bool:
    """Whether ``call()`` (:func:`within`, in a daemon thread ``name``) ended by ``deadline`` (``time.monotonic()``);
    its exception is raised. At a stop, for a Kafka call that waits on the brokers as long as it takes (a synchronous
    commit, a consumer's close): with Kafka down it outlasted the supervisor's stop timeout into its SIGKILL."""
    try:
        within(call, time_left(deadline), name)
    except TimeoutError:
        return False
    return True


class DaemonPool(Executor):
    """A thread pool whose workers are daemon threads, with a stop bounded by a deadline (:meth:`stop`).

    Why not :class:`~concurrent.futures.ThreadPoolExecutor`: its ``shutdown`` waits without a limit, and its workers
    are joined when the interpreter exits, so one call stuck in a worker (a camera that does not answer) kept the
    process past the supervisor's stop timeout into its SIGKILL, however its stop had ended. Workers start as tasks
    come, up to ``max_workers``."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max, self._prefix = max_workers, thread_name_prefix
        self._work: queue.SimpleQueue[tuple[Future, Callable[[], object]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending: set[Future] = set()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args: object, **kwargs: object) -> Future[T]:
        future: Future[T] = Future()
        future.add_done_callback(self._forget)  # before it is queued: a worker may end it at once
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._pending.add(future)
            self._work.put((future, functools.partial(fn, *args, **kwargs)))
            if len(self._threads) < self._max:
                thread = threading.Thread(target=self._serve, name=f"{self._prefix}_{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        return future

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def _serve(self) -> None:
        while (task := self._work.get()) is not None:
            future, call = task
            if not future.set_running_or_notify_cancel():  # cancelled by a stop before it started
                continue
            try:
                result = call()
            except BaseException as exc:  # the caller's, as from ThreadPoolExecutor
                future.set_exception(exc)
            else:
                future.set_result(result)
        self._work.put(None)  # the next worker ends too

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As :meth:`Executor.shutdown`; ``wait`` waits without a limit (:meth:`stop` has one)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._work.put(None)
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()  # only those not started
        if wait:
            for thread in self._threads:
                thread.join()

    def stop(self, deadline: float) -> int:
        """Take no more tasks and wait for those given until ``deadline`` (``time.monotonic()``); then cancel those
        not started and leave those still running to end on their own (a daemon thread keeps no process alive).
        How many were not done by ``deadline``."""
        self.shutdown(wait=False)
        with self._lock:
            pending = list(self._pending)
        _, left = futures_wait(pending, timeout=time_left(deadline))
        for future in left:
            future.cancel()
        return len(left)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections on ``host:port`` (a server is up, or a port is taken), answered within
    ``timeout``, a host name's lookup included (:func:`within`); no answer in that time is False, as a refused
    connection or a name that does not resolve."""

    def connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            return False

    try:
        return within(connect, timeout, "port-check")
    except TimeoutError:
        return False


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a process's log, for the error that says why it did not start."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
