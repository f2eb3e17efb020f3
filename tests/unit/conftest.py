"""Unit tests: what one test does to the root logger does not outlive it.

``infra.logs.setup_logging`` (run for real by the logging tests and by entry points some tests call) puts a
stderr handler on the root logger and sets its level; left there, every later test's log records went to its
stderr, and so into the output of the command-line tests run through ``CliRunner`` (which then began with a
log line, not the command's own)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.unit.durability import DiskOrder


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _person_tags_keyed_for_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Person tags (``infra.logs.person_tag``) keyed with a key of the test's own: the deployment's generated one is
    kept in the stack directory, which a unit test leaves alone (tests/unit/test_logs.py tests that key)."""
    from infra import logs

    tags = logs._PersonTagKey()
    tags.key = b"unit-test person tag key"
    monkeypatch.setattr(logs, "_PERSON_TAG_KEY", tags)


@pytest.fixture
def hanging_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """A resolver that does not answer for the host names given (each lookup waits up to 8 s, then fails as
    ``EAI_AGAIN``); every other name resolves as usual. Its waits end when the test does."""
    real, answer = socket.getaddrinfo, threading.Event()
    hanging: set[str] = set()

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host in hanging:
            answer.wait(8)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield hanging.add
    finally:
        answer.set()


@pytest.fixture
def disk_order(monkeypatch: pytest.MonkeyPatch) -> DiskOrder:
    """Records (and still does) each ``os.fsync``, ``os.replace``, ``os.unlink`` and ``os.mkdir``: to check a writer
    survives a power cut."""
    order, real_fsync, real_replace, real_unlink, real_mkdir = DiskOrder(), os.fsync, os.replace, os.unlink, os.mkdir

    def fsync(fd: int) -> None:
        order.calls.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        order.calls.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
        order.calls.append(("unlink", os.path.realpath(path), ""))
        real_unlink(path, dir_fd=dir_fd)

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        order.calls.append(("mkdir", os.path.realpath(path), ""))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names an fd's file through /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return order


@pytest.fixture
def user_without_name(monkeypatch: pytest.MonkeyPatch) -> str:
    """The process runs as a user id the system has no name for (a container's ``--user 12345`` with no passwd
    entry and no ``USER``/``LOGNAME``): :func:`getpass.getuser` raises. Returns the actor a tool should record."""
    import pwd

    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    return f"uid:{os.getuid()}"
