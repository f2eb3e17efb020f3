"""The alert sender's command line: like every long-running process, it takes ``--log-level`` (README,
"Command line"), which overrides ``CG_LOG__LEVEL`` for this process alone."""

from __future__ import annotations

import pytest

import sinks.alerts.sender as sender
from infra.settings import Settings


class _Stopped(Exception):
    """Raised where the sender would go on to Kafka: the test needs only what reached the logging setup."""


@pytest.fixture
def logging_calls(monkeypatch) -> list[tuple[str | None, str | None]]:
    calls: list[tuple[str | None, str | None]] = []

    def setup_logging(settings: Settings, level: str | None = None, process: str | None = None) -> None:
        calls.append((level, process))
        raise _Stopped

    monkeypatch.setattr(sender, "get_settings", Settings)
    monkeypatch.setattr(sender, "setup_logging", setup_logging)
    return calls


def test_the_alert_sender_takes_log_level_from_the_console(logging_calls):
    from infra.cli import build

    with pytest.raises(_Stopped):
        build().main(["alerts", "--log-level", "debug"], standalone_mode=False)
    assert logging_calls == [("debug", "alerts")]


def test_the_alert_sender_without_log_level_leaves_the_level_to_the_settings(logging_calls):
    import typer
    import typer.main

    app = typer.Typer(add_completion=False)  # what ``typer.run(main)`` builds for ``python -m``
    app.command()(sender.main)
    with pytest.raises(_Stopped):
        typer.main.get_command(app).main([], prog_name="sinks.alerts.sender", standalone_mode=False)
    assert logging_calls == [(None, "alerts")]
