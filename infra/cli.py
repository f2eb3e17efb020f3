"""``checkout-guard``: one command line for every process and tool of the pipeline.

Each subcommand is the command line of a module (``checkout-guard sink`` = ``python -m sinks.opensearch.sink``,
same options), named here by its module path only and imported when the subcommand runs: ``infra`` sits
below the stages and never imports them (tests/unit/test_layout.py), and ``checkout-guard --help`` stays
fast. Every subcommand's ``--help`` ends with the ``CG_*`` settings that process reads, with their
defaults, generated from :class:`infra.settings.Settings`.

``topics tail`` lives here (:mod:`infra.clients.topic_tail` does the work): it prints a topic decoded,
which generic Kafka tools cannot do, since messages use Avro single-object encoding.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, get_origin

import typer
import typer.core
import typer.main
from dotenv import dotenv_values
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError
from rich.markup import escape

from infra.settings import REPO_ROOT, Settings, SettingsFileError, env_file
from schemas.errors import CheckoutGuardError

PROG = "checkout-guard"
HELP_WIDTH = 76
"""Settings lines are wrapped to this, so help renders the same at any terminal width of 80 or more."""


@dataclass(frozen=True)
class Entry:
    """One subcommand: the command line of ``module`` (its attribute ``attr``: a Typer app, or a function
    as for ``typer.run``), or one ``command`` of that app; or a group of ``children``."""

    name: str
    summary: str
    module: str = ""
    attr: str = "app"
    command: str | None = None
    sections: tuple[str, ...] = ()
    """The :class:`Settings` fields the process reads: ``kafka`` is ``CG_KAFKA__*``, ``stack_dir`` ``CG_STACK_DIR``."""
    children: tuple[Entry, ...] = ()
    one_line_errors: bool = False
    """A tool, not a service: an error the project raises on purpose (a bad file, folder or artifact) or a file
    the OS refuses is one ``Error: ...`` line and exit 1, not a traceback (a service keeps its tracebacks)."""

    @property
    def all_sections(self) -> tuple[str, ...]:
        """Its own sections (its children's, for a group), and ``log``, which every process reads."""
        own = self.sections if not self.children else (s for child in self.children for s in child.all_sections)
        return tuple(dict.fromkeys((*own, "log")))


def setting_errors(exc: ValidationError) -> str:
    """A settings error as its variables and pydantic's messages (``CG_JOB__PARALLELISM: Input should be a valid
    integer``), without the input pydantic keeps (it may be a secret); only a validator of a field that is no
    secret repeats a value. Another model's error (a section built from an option) names its fields; a check across
    sections (no location) is its message alone, which names its variables."""

    def name(loc: tuple[int | str, ...]) -> str:
        parts = [str(part) for part in loc]
        if exc.title == Settings.__name__:
            return "CG_" + "__".join(parts).upper()
        return ".".join([exc.title, *parts])

    def line(error: ErrorDetails) -> str:
        message = error["msg"].removeprefix("Value error, ")
        # a check across sections (Settings' own validator) has no location: its message names its variables
        return message if not error["loc"] and exc.title == Settings.__name__ else f"{name(error['loc'])}: {message}"

    return "; ".join(line(error) for error in exc.errors())


def json_setting_error(exc: SettingsError) -> str:
    """A ``CG_*`` value that should be JSON and is not, by its variable (``CG_DASHBOARD__USERS: not valid JSON``):
    pydantic-settings names only the section (``error parsing value for field "dashboard" ...``), its words kept
    when no variable of that section is found to blame. Never the value: a login's password hash may be in it."""
    found = re.search(r'field "(\w+)"', str(exc))
    field = Settings.model_fields.get(found.group(1)) if found else None
    section = field.annotation if field else None
    if not (found and isinstance(section, type) and issubclass(section, BaseModel)):
        return str(exc)
    values: dict[str, str | None] = {}
    try:
        if (path := env_file()) is not None and path.is_file():
            values |= {name.upper(): value for name, value in dotenv_values(path).items()}
    except (CheckoutGuardError, OSError, ValueError):  # the file's own error is reported when it is read
        pass
    values |= {name.upper(): value for name, value in os.environ.items()}
    prefix = f"CG_{found.group(1).upper()}__"
    bad = []
    for name, info in section.model_fields.items():
        value = values.get(prefix + name.upper())
        if value is None or get_origin(info.annotation) not in (dict, list, tuple, set):
            continue
        try:
            json.loads(value)
        except ValueError:
            bad.append(prefix + name.upper())
    return f"invalid setting {', '.join(bad)}: not valid JSON" if bad else str(exc)


class _OneLineErrors:
    """Wraps a click command's ``invoke``: our own errors, OS errors, bad settings and Kafka or OpenSearch not
    answering end as one usage-style line."""

    def __init__(self, invoke: Any) -> None:
        self.invoke = invoke

    def __call__(self, ctx: Any) -> Any:
        from confluent_kafka import KafkaException  # Kafka not answering: a tool reading a topic says so
        from opensearchpy.exceptions import ConnectionError as OpenSearchDown

        try:
            return self.invoke(ctx)
        except (CheckoutGuardError, OSError, KafkaException) as exc:
            message = str(exc)
        except ValidationError as exc:
            message = f"invalid setting {setting_errors(exc)}"
        except SettingsError as exc:  # a CG_* value that should be JSON and is not
            message = json_setting_error(exc)
        except OpenSearchDown as exc:
            message = f"OpenSearch did not answer: {exc.error}"
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1)


class _SettingsErrorsOnly:
    """Wraps a service's ``invoke``: a bad ``CG_*`` setting at its start ends as one ``Error:`` line naming the
    variable, as for a tool (it was a traceback that named a field, ``log.level``, not the variable), and so does a
    ``CG_ENV_FILE`` naming no file; every other error of a service keeps its traceback."""

    def __init__(self, invoke: Any) -> None:
        self.invoke = invoke

    def __call__(self, ctx: Any) -> Any:
        try:
            return self.invoke(ctx)
        except ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            message = f"invalid setting {setting_errors(exc)}"
        except SettingsError as exc:  # a CG_* value that should be JSON and is not
            message = json_setting_error(exc)
        except SettingsFileError as exc:  # CG_ENV_FILE names no readable file
            message = str(exc)
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1)


def with_settings_errors(command: Any) -> Any:
    """``command`` (a service's click command) answering a bad ``CG_*`` setting at its start with one ``Error:``
    line naming the variable, exit 1; its other errors keep their tracebacks (:class:`_SettingsErrorsOnly`)."""
    command.invoke = _SettingsErrorsOnly(command.invoke)
    return command


def with_one_line_errors(command: Any) -> Any:
    """``command`` (a click command or group) answering a bad file, folder or artifact with one ``Error: ...``
    line and exit 1, not a traceback: a tool's way (:attr:`Entry.one_line_errors`; a tool's ``python -m``)."""
    command.invoke = _OneLineErrors(command.invoke)
    return command


_LIST_ITEM = re.compile(r"\s*(?:[-*]\s|\d+[.)]\s)")
"""A line that starts a list item: it keeps its own line, and plain lines after it continue it."""
_VERBATIM = re.compile(r"\s*\w[\w.-]*\s{2,}|\s{4,}")
"""An aligned column (a word, then two spaces or more) or an indented example: it keeps its own line, and so
does the line after it (joined to it, prose became part of a command someone copies)."""


def keeps_line(before: str, line: str) -> bool:
    """Whether ``line`` stays on its own line after ``before`` in reflowed help."""
    return bool(_LIST_ITEM.match(line) or _VERBATIM.match(line) or _VERBATIM.match(before)) or before.endswith(":")


def reflow_paragraphs(text: str) -> str:
    """``text`` with each paragraph's lines joined. Rich help keeps a docstring's line breaks and then
    wraps again at the terminal's width, breaking sentences mid-line; list items and ``\\b`` blocks stay."""
    out = []
    for paragraph in text.split("\n\n"):
        lines = paragraph.split("\n")
        if paragraph.startswith("\b"):
            out.append(paragraph)
            continue
        joined = [lines[0].rstrip()]
        for before, line in zip(lines, lines[1:], strict=False):
            if keeps_line(before, line):
                joined.append(line.rstrip())
            else:
                joined[-1] = f"{joined[-1]} {line.strip()}"
        out.append("\n".join(joined))
    return "\n\n".join(out)


def reflow_help(command: Any) -> Any:
    """:func:`reflow_paragraphs` on the help of ``command`` and every subcommand under it."""
    if command.help:
        command.help = reflow_paragraphs(command.help)
    for sub in getattr(command, "commands", {}).values():
        reflow_help(sub)
    return command


def command_of(obj: typer.Typer | Callable[..., Any]) -> Any:
    """The click command of a module's command line: a Typer app, or a function as for ``typer.run``."""
    if not isinstance(obj, typer.Typer):
        app = typer.Typer(add_completion=False)
        app.command()(obj)
        obj = app
    return typer.main.get_command(obj)


def run_tool(app: typer.Typer) -> None:
    """A tool module's ``python -m``: its Typer app with :func:`with_one_line_errors`, as the console runs it."""
    with_one_line_errors(reflow_help(command_of(app)))()


def run_service(obj: typer.Typer | Callable[..., Any]) -> None:
    """A service module's ``python -m`` (its Typer app, or its function as for ``typer.run``) with
    :func:`with_settings_errors`, as ``checkout-guard <service>`` runs it: a bad setting was a traceback there."""
    with_settings_errors(reflow_help(command_of(obj)))()


_JOB = ("kafka", "job", "rules", "model", "faces", "metrics", "stack_dir", "bind_host", "java_home")
_MODEL = ("model", "kafka", "rules", "job", "stack_dir")
_STACK = ("kafka", "opensearch", "mqtt", "smtp", "metrics", "stack_dir", "bind_host", "java_home")

ENTRIES: tuple[Entry, ...] = (
    Entry("job", "the PyFlink scoring job (local mini-cluster)", "jobs.flink.job", "cli", sections=_JOB),
    Entry(
        "face-stage",
        "snapshot and face of every checkout and entrance",
        "jobs.faces.stage",
        "cli",
        sections=("kafka", "job", "cameras", "faces", "metrics", "stack_dir"),
    ),
    Entry(
        "watchlist",
        "the watchlist service: enroll/forget commands",
        "jobs.faces.watchlist_service",
        "cli",
        sections=("kafka", "faces", "webex", "metrics", "stack_dir"),
    ),
    Entry(
        "cases",
        "the case service: a case per alert, signed verdicts, expiry",
        "jobs.cases.service",
        "cli",
        sections=("kafka", "cases", "webex", "job", "metrics"),
    ),
    Entry(
        "bridge",
        "camera bridge: MV Sense MQTT to camera_events",
        "producers.camera_bridge",
        "cli",
        sections=("kafka", "mqtt", "cameras", "job", "metrics"),
    ),
    Entry(
        "camera",
        "local Meraki-compatible cameras (stand-in)",
        "infra.local.camera",
        "cli",
        sections=("cameras", "mqtt", "stack_dir"),
    ),
    Entry(
        "bot",
        "the Webex bot (webhook receiver)",
        "jobs.bot.webex_bot",
        "cli",
        sections=("webex", "kafka", "opensearch", "indices", "faces", "cameras", "metrics", "stack_dir"),
    ),
    Entry("webex-local", "local Webex API (stand-in)", "infra.local.webex", "main", sections=("webex",)),
    Entry(
        "sink",
        "Kafka to OpenSearch (idempotent) with index retention",
        "sinks.opensearch.sink",
        "app",
        sections=("kafka", "opensearch", "indices", "model", "metrics"),
    ),
    Entry(
        "alerts",
        "alert sender: e-mail (SMTP/SES) and Webex",
        "sinks.alerts.sender",
        "main",
        sections=("kafka", "alerts", "smtp", "webex", "faces", "metrics", "stack_dir"),
    ),
    Entry(
        "dashboard",
        "the live dashboard (web)",
        "sinks.dashboard.__main__",
        "cli",
        sections=("dashboard", "opensearch", "indices", "metrics"),
    ),
    Entry(
        "supervise",
        "production mode: the real services, restarted on exit or bad health",
        "infra.production",
        "cli",
        sections=(
            *("supervisor", "metrics", "log", "kafka", "opensearch", "mqtt", "smtp", "webex", "alerts", "cameras"),
            *("faces", "indices", "dashboard", "cases", "job", "rules", "model", "stack_dir", "bind_host", "java_home"),
        ),
    ),
    Entry(
        "train", "fraud model: evaluate, then train", "jobs.model.train", "app", "train", _MODEL, one_line_errors=True
    ),
    Entry(
        "evaluate",
        "fraud model: rolling-origin evaluation",
        "jobs.model.train",
        "app",
        "evaluate",
        _MODEL,
        one_line_errors=True,
    ),
    Entry(
        "backtest",
        "fraud model: backtest a CSV through features, model, rules",
        "jobs.model.train",
        "app",
        "backtest",
        _MODEL,
        one_line_errors=True,
    ),
    Entry(
        "models",
        "champion and challenger: status, challenger, promote",
        "jobs.model.registry",
        "app",
        sections=("model", "kafka", "stack_dir"),
        one_line_errors=True,
    ),
    Entry(
        "labels",
        "field labels: publish, withdraw, import",
        "producers.labels",
        "app",
        sections=("kafka", "model"),
        one_line_errors=True,
    ),
    Entry(
        "replay",
        "re-publish a topic range by offsets or time",
        "producers.replay",
        "app",
        sections=("kafka",),
        one_line_errors=True,
    ),
    Entry(
        "backtest-stream",
        "a job copy over a replayed range, compared",
        "jobs.flink.backtest_stream",
        "app",
        sections=("kafka", "job", "rules", "model", "opensearch", "indices", "stack_dir", "bind_host", "java_home"),
        one_line_errors=True,
    ),
    Entry(
        "faces",
        "faces CLI: detect, compare, evaluate, bench",
        "jobs.faces.cli",
        "app",
        sections=("faces", "stack_dir"),
        one_line_errors=True,
    ),
    Entry(
        "rules",
        "rule sets: validate, publish",
        "jobs.scoring.rules",
        "app",
        sections=("rules", "kafka"),
        one_line_errors=True,
    ),
    Entry(
        "pos",
        "POS traffic: generate, replay-csv",
        "producers.pos",
        "app",
        sections=("kafka", "stack_dir"),
        one_line_errors=True,
    ),
    Entry(
        "upgrade",
        "stop the running job with a savepoint; its status",
        "jobs.flink.upgrade",
        "app",
        sections=("job", "stack_dir"),
        one_line_errors=True,
    ),
    Entry(
        "topics",
        "read topics",
        children=(
            Entry(
                "tail",
                "print a topic's records decoded, as JSON lines",
                "infra.cli",
                "tail_app",
                sections=("kafka",),
                one_line_errors=True,
            ),
        ),
    ),
    Entry(
        "dead-letters",
        "dead letters",
        children=(
            Entry(
                "redrive",
                "re-drive dead letters to their source topic",
                "producers.redrive",
                "cli",
                sections=("kafka",),
                one_line_errors=True,
            ),
        ),
    ),
    Entry(
        "stack",
        "the local stack: Kafka, OpenSearch, Mosquitto, SMTP",
        children=(
            Entry(
                "up",
                "start the local stack and create the topics",
                "infra.stack",
                "app",
                "up",
                _STACK,
                one_line_errors=True,
            ),
            Entry("down", "stop the local stack", "infra.stack", "app", "down", _STACK, one_line_errors=True),
            Entry(
                "status",
                "health of each service and the topics",
                "infra.stack",
                "app",
                "status",
                _STACK,
                one_line_errors=True,
            ),
            Entry(
                "flink",
                "a standalone Flink cluster from the wheel: up, down, status, submit, stop",
                "infra.stack",
                "flink_app",
                sections=("flink", "job", "kafka", "metrics", "stack_dir", "bind_host", "java_home"),
                one_line_errors=True,
            ),
        ),
    ),
)


# ---------------------------------------------------------------------------- settings in --help


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        value = value.relative_to(REPO_ROOT) if value.is_relative_to(REPO_ROOT) else value
    return shlex.quote(str(value))


def settings_lines(sections: Iterable[str]) -> list[str]:
    """``CG_KAFKA__*  BOOTSTRAP_SERVERS=127.0.0.1:9092 ...`` per section, then ``CG_STACK_DIR=.stack ...``:
    every variable of each section with its default (not the environment's value), wrapped."""
    lines: list[str] = []
    scalars: list[str] = []
    for section in sections:
        default = Settings.model_fields[section].get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            items = [f"{name.upper()}={_shown(getattr(default, name))}" for name in type(default).model_fields]
            text = f"CG_{section.upper()}__*  " + " ".join(items)
            lines += textwrap.wrap(
                text, HELP_WIDTH, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False
            )
        else:
            scalars.append(f"CG_{section.upper()}={_shown(default)}")
    if scalars:
        lines += textwrap.wrap(" ".join(scalars), HELP_WIDTH, break_long_words=False, break_on_hyphens=False)
    return lines


def settings_epilog(sections: Sequence[str], rich: bool) -> str:
    """The settings part of a ``--help``: Rich markup escaped, or kept from rewrapping by plain click (``\\b``)."""
    lines = ["Settings read (environment variables; default after =):", *settings_lines(sections)]
    if rich:
        return escape("\n".join(lines))
    return "\b\n" + "\n".join(lines)


def _with_settings(command: Any, sections: Sequence[str]) -> None:
    """Put the settings at the end of ``command``'s help and of every subcommand's under it."""
    rich = typer.core.HAS_RICH and getattr(command, "rich_markup_mode", None) == "rich"
    command.epilog = settings_epilog(sections, rich)
    for sub in getattr(command, "commands", {}).values():
        _with_settings(sub, sections)


# ---------------------------------------------------------------------------- the lazy group


def load(entry: Entry) -> Any:
    """The click command of ``entry``: its module imported now, the settings added to its help."""
    command = command_of(getattr(importlib.import_module(entry.module), entry.attr))
    if entry.command is not None:
        command = command.commands[entry.command]
    command.name = entry.name
    reflow_help(command)
    if entry.one_line_errors:
        with_one_line_errors(command)
    else:
        with_settings_errors(command)
    _with_settings(command, entry.all_sections)
    return command


class LazyGroup(typer.core.TyperGroup):
    """Subcommands from :data:`ENTRIES`, each imported only when it is the one that runs. Its own help is
    click's plain help, listed from the entries (Typer's would import every subcommand to describe it)."""

    def __init__(self, *, entries: Sequence[Entry], sections: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(rich_markup_mode=None, **kwargs)
        self.entries = {entry.name: entry for entry in entries}
        if sections:
            self.epilog = settings_epilog(sections, rich=False)

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.entries)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        entry = self.entries.get(cmd_name)
        if entry is None:
            return None
        if entry.children:
            return LazyGroup(name=entry.name, help=entry.summary, entries=entry.children, sections=entry.all_sections)
        return load(entry)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(entry.name, entry.summary) for entry in self.entries.values()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def build() -> LazyGroup:
    return LazyGroup(
        name=PROG,
        entries=ENTRIES,
        help="Checkout Guard: every process and tool of the pipeline. Each subcommand's --help lists its "
        "options and the CG_* settings (environment variables) it reads.",
        no_args_is_help=True,
        epilog="\b\nSettings come from CG_* environment variables, nested with __, e.g.\n"
        "CG_KAFKA__BOOTSTRAP_SERVERS=broker:9092 CG_KAFKA__TOPIC_PREFIX=test.",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The ``checkout-guard`` console script."""
    build().main(list(argv) if argv is not None else sys.argv[1:], prog_name=PROG)


# ---------------------------------------------------------------------------- topics tail

tail_app = typer.Typer(add_completion=False)


@tail_app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Logical topic name (e.g. processed_transactions) or its full name.")],
    n: Annotated[int, typer.Option("-n", "--records", min=1, help="How many records.")] = 10,
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="earliest, latest, epoch ms or ISO-8601 time: the first N records from there (default: the last N).",
        ),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Only records with this key.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Then print new records as they arrive.")] = False,
) -> None:
    """Print a topic's records decoded (Avro single-object encoding, any known schema version) as JSON lines.

    Without --from: the newest N records of the whole topic (with --key: the newest N with that key), oldest first.

    With --from: the first N records at or after that point (and with that key), in timestamp order.

    --follow then prints new records as they arrive; with --from and --follow, every record from there on.

    Records retention deletes before they are read are counted in a Warning line (exit 1), not skipped silently.

    bytes fields are base64; a message that does not decode is printed with an "error" field, never a crash.
    """
    from confluent_kafka import KafkaException

    from infra.clients import topic_tail
    from infra.clients.topic_replay import deleted_warning
    from infra.settings import get_settings

    settings = get_settings()
    try:
        spec = topic_tail.resolve_topic(topic, settings.kafka.topic_prefix)
        begin = topic_tail.parse_start(start) if start is not None else None
    except topic_tail.TailError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    deleted: dict[int, int] = {}
    try:
        topic_tail.tail(
            settings.kafka,
            spec.full_name(settings.kafka.topic_prefix),
            emit,
            n=n,
            start=begin,
            key=key,
            follow=follow,
            deleted=deleted,
        )
    except KeyboardInterrupt:
        pass
    except (topic_tail.TailError, TimeoutError, RuntimeError, KafkaException) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    gone = deleted_warning(deleted, lost="are not printed")
    if gone is not None:  # the lines read as every record there was: say what went, as redrive does
        typer.echo(f"Warning: {gone}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    main()
