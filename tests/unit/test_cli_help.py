"""Every entry point answers ``--help`` in seconds, exit 0, and starts nothing.

The entry points: each ``checkout-guard`` subcommand (the console script when installed, else
``python -m infra.cli``) and each module with a ``__main__`` block under producers/, jobs/, sinks/,
infra/ and tests/bench/ (``python -m <module> --help``). All run in parallel subprocesses, each with
its own empty stack dir and every service address pointing at a closed port: after ``--help`` the
stack dir is still empty and no process of the run is left. The console subcommands' help names the
``CG_*`` settings they read.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from infra.cli import ENTRIES, Entry
from infra.settings import REPO_ROOT
from tests.unit.test_csv_replay import afd_row

TIMEOUT_S = 45.0
"""A hang, not a speed bar: up to 8 interpreters import the whole project at once on a loaded 2-core machine (one
`producers.pos --help` took over 20 s while the end-to-end tests ran beside the unit tier)."""
MARKER = "CHECKOUT_GUARD_HELP_TEST"
"""Set in every run's environment, to find any process a run left behind."""
CLOSED = "127.0.0.1:1"


def _main_modules() -> list[str]:
    found = []
    for top in ("producers", "jobs", "sinks", "infra", "tests/bench"):
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            if 'if __name__ == "__main__":' not in path.read_text():
                continue
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found.append(".".join(parts[:-1] if parts[-1] == "__main__" else parts))
    return found


def _console_paths(entries: tuple[Entry, ...] = ENTRIES, above: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for entry in entries:
        path = (*above, entry.name)
        out.append(path)
        out += _console_paths(entry.children, path)
    return out


def _console() -> list[str]:
    script = Path(sys.executable).with_name("checkout-guard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "infra.cli"]


MODULES = _main_modules()
CONSOLE = _console_paths()


@dataclass
class Run:
    argv: list[str]
    code: int | None
    output: str
    seconds: float
    stack_left: list[str]


def _run(argv: list[str], marker: str) -> Run:
    with tempfile.TemporaryDirectory(prefix="cg-help-") as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CG_")}
        env.update(
            {
                MARKER: marker,
                "CG_STACK_DIR": stack,
                "CG_KAFKA__BOOTSTRAP_SERVERS": CLOSED,
                "CG_OPENSEARCH__URL": f"http://{CLOSED}",
                "CG_MQTT__PORT": "1",
                "CG_SMTP__PORT": "1",
                "CG_WEBEX__BASE_URL": f"http://{CLOSED}",
                "CG_CAMERAS__BASE_URL": f"http://{CLOSED}",
                "COLUMNS": "100",
            }
        )
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            code, output = None, f"timed out after {TIMEOUT_S:.0f}s\n{out}"
        seconds = time.monotonic() - started
        left = sorted(str(p.relative_to(stack)) for p in Path(stack).rglob("*"))
    return Run(argv, code, output, seconds, left)


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    """Every ``--help``, run once, in parallel; then no process of theirs may be left."""
    marker = uuid.uuid4().hex
    jobs = {f"python -m {m}": [sys.executable, "-m", m, "--help"] for m in MODULES}
    jobs |= {" ".join(["checkout-guard", *path]): [*_console(), *path, "--help"] for path in [(), *CONSOLE]}
    with ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(_run, argv, marker) for name, argv in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    left = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except (psutil.Error, OSError):
            continue
    assert not left, f"--help left processes running: {left}"
    return results


def _check(run: Run) -> None:
    shown = f"{' '.join(run.argv)}\n{run.output[-3000:]}"
    assert run.code == 0, shown
    assert run.seconds < TIMEOUT_S, shown
    assert re.search(r"^\s*Usage: ", run.output, re.MULTILINE), shown
    assert not run.stack_left, f"--help wrote to the stack dir: {run.stack_left}\n{shown}"


def test_every_main_module_is_found():
    assert {"jobs.flink.job", "jobs.faces", "sinks.dashboard", "infra.cli", "tests.bench.run"} <= set(MODULES)
    assert len(MODULES) >= 30


@pytest.mark.parametrize("module", MODULES)
def test_python_m_help(runs: dict[str, Run], module: str):
    _check(runs[f"python -m {module}"])


@pytest.mark.parametrize("path", [(), *CONSOLE], ids=lambda p: " ".join(p) or "checkout-guard")
def test_console_help_shows_its_settings(runs: dict[str, Run], path: tuple[str, ...]):
    run = runs[" ".join(["checkout-guard", *path])]
    _check(run)
    assert re.search(r"\bCG_[A-Z_]*[A-Z](__\*|=)", run.output), run.output
    assert f"Usage: checkout-guard {' '.join(path)}".rstrip() in " ".join(run.output.split())


def test_console_sections_are_settings_fields():
    from infra.settings import Settings

    def leaves(entries: tuple[Entry, ...]) -> list[Entry]:
        return [leaf for e in entries for leaf in (leaves(e.children) if e.children else [e])]

    for entry in leaves(ENTRIES):
        assert entry.sections, entry.name
        assert set(entry.sections) <= set(Settings.model_fields), entry.name


PROCESSES = {
    "jobs.flink.job": "job",
    "jobs.faces.stage": "face-stage",
    "jobs.faces.watchlist_service": "watchlist",
    "producers.camera_bridge": "bridge",
    "infra.local.camera": "camera",
    "jobs.bot.webex_bot": "bot",
}
"""Processes whose ``main()`` took no arguments before they had a command line (``launcher.spawn`` runs them bare)."""


@pytest.mark.parametrize("module", sorted(PROCESSES))
def test_a_process_without_arguments_runs_as_before_and_the_console_runs_the_same(module: str, monkeypatch):
    import importlib

    import typer.main

    from infra.cli import build

    mod = importlib.import_module(module)
    calls: list[str] = []
    monkeypatch.setattr(mod, "main", lambda *a, **kw: calls.append(kw.get("log_level", a[-1] if a else "INFO")))
    typer.main.get_command(mod.cli).main([], prog_name=module, standalone_mode=False)
    build().main([PROCESSES[module], "--log-level", "debug"], standalone_mode=False)
    assert calls == ["INFO", "debug"]


def test_the_console_answers_a_bad_file_with_one_line_and_exit_1_as_python_m_does(tmp_path, capsys):
    from infra.cli import main

    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    (tmp_path / "header.csv").write_text("EVENT_TIMESTAMP,EVENT_ID,order_price,payment_currency,merchant,EVENT_LABEL\n")
    rows = [afd_row(f"ev-{i}", f"2022-11-07T15:5{i}:00Z", EVENT_LABEL=str(i % 2)) for i in range(6)]
    with (tmp_path / "few.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for argv in (
        ["evaluate", str(tmp_path / "cols.csv")],
        ["evaluate", str(tmp_path / "header.csv")],  # no labelled rows: the data, not the command line (was exit 2)
        ["evaluate", str(tmp_path / "few.csv")],  # too few labelled rows for the folds: the data too (was exit 2)
        ["backtest", str(tmp_path / "cols.csv"), "--model", str(tmp_path / "none")],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.startswith("Error: ") and len(err.splitlines()) == 1, (argv, err)


def test_help_paragraphs_are_reflowed_but_lists_keep_their_lines() -> None:
    """Rich help kept a docstring's line breaks and wrapped again, breaking sentences mid-line."""
    from infra.cli import reflow_paragraphs

    text = "One sentence\ngoes on here.\n\nSteps:\n- first\n- second\n  continued\n\n\b\nkept\nas is"
    assert reflow_paragraphs(text) == (
        "One sentence goes on here.\n\nSteps:\n- first\n- second continued\n\n\b\nkept\nas is"
    )
    columns = "Columns\n  a  b\n  cc  d\nnext sentence\ngoes on.\n\nRun\n    python -m x  # one\n    python -m y"
    assert reflow_paragraphs(columns) == (
        "Columns\n  a  b\n  cc  d\nnext sentence goes on.\n\nRun\n    python -m x  # one\n    python -m y"
    )
    example = "Run it:\n    python -m jobs.flink.upgrade savepoint\nthen start the job\nagain."
    assert (
        reflow_paragraphs(example) == "Run it:\n    python -m jobs.flink.upgrade savepoint\nthen start the job again."
    )


def test_every_console_command_gets_its_help_reflowed() -> None:
    """The wiring (each command the console loads is reflowed); the rules are the test above's."""
    from infra.cli import build, keeps_line

    def walk(command, path: str) -> list[str]:
        bad = [
            f"{path}: {line!r}"
            for paragraph in (command.help or "").split("\n\n")
            if not paragraph.startswith("\b")
            for before, line in zip(paragraph.split("\n"), paragraph.split("\n")[1:], strict=False)
            if not keeps_line(before, line)
        ]
        for name in getattr(command, "list_commands", lambda _ctx: [])(None):
            sub = command.get_command(None, name)
            bad += walk(sub, f"{path} {name}") if sub is not None else []
        return bad

    assert walk(build(), "checkout-guard") == []
