"""Unit tests: what one test does to the root logger does not outlive it.

``infra.logs.setup_logging`` (run for real by the logging tests and by entry points some tests call) puts a
stderr handler on the root logger and sets its level; left there, every later test's log records went to its
stderr, and so into the output of the command-line tests run through ``CliRunner`` (which then began with a
log line, not the command's own)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
