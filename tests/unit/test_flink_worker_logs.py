"""The Flink Python worker's lines are masked as every process's are (jobs/flink/worker_logs.py)."""

from __future__ import annotations

import io
import logging

import pytest

from infra.logs import REDACTED, RedactSecrets
from infra.settings import Settings
from jobs.flink.worker_logs import mask_worker_logs


def test_the_workers_own_handler_masks_secrets_in_lines_and_tracebacks_once_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    pyflinks = logging.StreamHandler(stream)  # the handler the worker has before any function opens
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [pyflinks])
    monkeypatch.setattr(root, "level", logging.INFO)
    mask_worker_logs(Settings())
    mask_worker_logs(Settings())  # every function's open calls it: the filters go on once
    assert root.handlers == [pyflinks]  # the worker's handler stays: it carries the lines to the TaskManager
    assert sum(isinstance(f, RedactSecrets) for f in pyflinks.filters) == 1
    log = logging.getLogger("checkout_guard.scoring_job")
    log.warning("model endpoint https://svc/?token=abc123secret failed")
    try:
        raise RuntimeError("Authorization: Bearer abcdefgh12345678")
    except RuntimeError:
        log.exception("call failed")
    logging.getLogger("botocore.endpoint").debug("a request body")
    text = stream.getvalue()
    assert "abc123secret" not in text and "abcdefgh12345678" not in text and REDACTED in text
    assert "a request body" not in text


def test_a_worker_without_a_handler_gets_the_projects(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    mask_worker_logs(Settings())
    [handler] = root.handlers
    assert getattr(handler, "_checkout_guard", False) and any(isinstance(f, RedactSecrets) for f in handler.filters)
