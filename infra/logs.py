"""One logging set-up for every process: :func:`setup_logging`, called first thing by each ``main()``.

Every line carries the time (ISO 8601, UTC, milliseconds), the level, the process (its name and pid), the
logger and the message::

    2026-05-04T09:12:03.512Z INFO face-stage[41207] jobs.faces.stage: {'snapshots': 12, ...}

``CG_LOG__FORMAT=json`` writes one JSON object per line instead, with the same fields (``time``, ``level``,
``process``, ``pid``, ``logger``, ``message``, and ``exception`` when there is one), for log shippers.
``CG_LOG__LEVEL`` (default ``INFO``) is the level; a process's ``--log-level`` overrides it.

Secrets never reach a log line on purpose, and :class:`RedactSecrets` masks the usual ways they could
slip into one anyway (an ``Authorization`` or Meraki API key header, ``password=``/``token=`` in a URL
or form, the password of a ``user:password@`` login in a URL). Images and face embeddings are never logged:
log sizes, counts and ids, not payloads; nor are the requests of the AWS SDK and OpenSearch's client, whose DEBUG
lines :class:`QuietClientBodies` leaves out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from infra.durable import kept_secret
from infra.settings import Settings, get_settings

REDACTED = "[REDACTED]"
LOG_LEVEL_HELP = "Python log level (default: CG_LOG__LEVEL, INFO)."
"""Help of every process's ``--log-level`` option (``None`` when not given: the setting applies)."""

_SECRETS = (
    # Authorization: Bearer <token> (also in a headers dict's repr, or a bare "Bearer <token>": 8+ characters)
    re.compile(r"(?i)(\bbearer\s+)[\w.~+/-]{8,}=*"),
    # Authorization: Basic <base64>
    re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?basic\s+)[^\s'\",;}]+"),
    # the Meraki Dashboard API key header
    re.compile(r"(?i)(\bx-cisco-meraki-api-key[\"']?\s*[:=]\s*[\"']?)[^\s'\",;}]+"),
    # password=..., token=..., access_token=..., client_secret=..., api_key=... in a query string or form
    re.compile(r"(?i)(\b[\w.-]*(?:password|passwd|token|secret|api[_-]?key)=[\"']?)[^&\s'\",;)}]+"),
    # the password of a login in a URL (scheme://user:password@host): httpx logs every request's URL at INFO
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/?#@:'\"]*:)[^\s/?#@'\"]+(?=@)"),
)


def redact(text: str) -> str:
    """``text`` with the values of the secret patterns above replaced by ``[REDACTED]``."""
    for pattern in _SECRETS:
        text = pattern.sub(rf"\g<1>{REDACTED}", text)
    return text


_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[A-Za-z0-9][\w-]*(?:\.[\w-]+)*")
"""An e-mail address within free text (an SMTP server's answer)."""


PERSON_TAG_KEY_FILE = Path("secrets") / "person-tag.key"
"""Where in the stack directory the deployment's generated :func:`person_tag` key is kept (``CG_LOG__PERSON_TAG_KEY``
unset): made once, 0600, by the first process that tags a person; ``stack reset`` leaves it."""


def person_tag_key(settings: Settings) -> bytes:
    """The key of :func:`person_tag`: ``CG_LOG__PERSON_TAG_KEY``, else the deployment's generated one
    (:data:`PERSON_TAG_KEY_FILE`, :func:`infra.durable.kept_secret`). ``OSError``/``ValueError`` when that file can be
    neither read nor made."""
    if settings.log.person_tag_key is not None:
        return settings.log.person_tag_key.get_secret_value().encode()
    return kept_secret(Path(settings.stack_dir) / PERSON_TAG_KEY_FILE).encode()


class _PersonTagKey:
    """The process's :func:`person_tag` key, looked up at the first tag (most processes never tag anyone, and need
    no key file) from the settings :func:`setup_logging` was given, else :func:`get_settings`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: Settings | None = None
        self.key: bytes | None = None

    def use(self, settings: Settings) -> None:
        with self.lock:
            self.settings, self.key = settings, None

    def get(self) -> bytes:
        failed: BaseException | None = None
        with self.lock:
            if self.key is None:
                settings = self.settings or get_settings()
                try:
                    self.key = person_tag_key(settings)
                except (OSError, ValueError) as exc:  # a tag must not fail the line it is for
                    self.key, failed = secrets.token_bytes(32), exc
            key = self.key
        if failed is not None:
            logging.getLogger(__name__).warning(
                "person tags: the key %s could be neither read nor made (%s); this process tags people with a key of "
                "its own, so its tags match no other process's and change at its restart: set CG_LOG__PERSON_TAG_KEY",
                PERSON_TAG_KEY_FILE,
                type(failed).__name__,
            )
        return key


_PERSON_TAG_KEY = _PersonTagKey()


def person_tag(person: str) -> str:
    """How a log line names a person (a login, an e-mail address) instead of the address itself: ``person-`` and
    the first 8 hex digits of the HMAC-SHA256, keyed with the deployment's :func:`person_tag_key`, of the name
    trimmed and lower-cased. Stable across the deployment's processes and restarts, so one person's lines can be
    followed; without the key, no list of likely addresses tells whose tag it is (a plain SHA-256 did). Audit records
    keep the name itself."""
    digest = hmac.new(_PERSON_TAG_KEY.get(), person.strip().lower().encode(), hashlib.sha256)
    return "person-" + digest.hexdigest()[:8]


def tag_addresses(text: str) -> str:
    """``text`` with every e-mail address in it replaced by its :func:`person_tag`."""
    return _ADDRESS.sub(lambda match: person_tag(match.group(0)), text)


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message and exception text (on the handler: every logger's records).

    A message with a secret is replaced by its redacted text (no other handler sees the secret either);
    the exception text is formatted once here and kept redacted in ``exc_text``, where formatters take it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the formatter reports it as logging does
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


QUIET_BELOW_INFO = ("botocore", "boto3", "s3transfer", "opensearch")
"""Loggers of the AWS SDK and OpenSearch's client, whose DEBUG lines hold whole requests and answers: Rekognition's
face image, Fraud Detector's e-mail and IP, SES's alert mail with its snapshot, OpenSearch's documents and hits."""


class QuietClientBodies(logging.Filter):
    """Leaves out the DEBUG lines of :data:`QUIET_BELOW_INFO` (on the handler: ``--log-level DEBUG`` included),
    their INFO and above kept; the loggers' own levels are left alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return not any(record.name == name or record.name.startswith(f"{name}.") for name in QUIET_BELOW_INFO)


def _iso_utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <process>[<pid>] <logger>: <message>``."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {process.replace('%', '%%')}[%(process)d] %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_utc(record)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: time, level, process, pid, logger, message, exception (when present),
    then whatever ``extra=`` the call passed."""

    def __init__(self, process: str) -> None:
        super().__init__(
            rename_fields={"exc_info": "exception", "stack_info": "stack"},
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message"],  # uvicorn's colored copy of message
            json_ensure_ascii=False,
        )
        self.process_name = process

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data.update(
            time=_iso_utc(record),
            level=record.levelname,
            process=self.process_name,
            pid=record.process,
            logger=record.name,
            message=record.message,
        )
        super().add_fields(log_data, record, message_dict)

    def formatException(self, ei: Any) -> str:
        """The traceback, redacted (this formatter formats it anew rather than taking ``exc_text``)."""
        return redact(logging.Formatter.formatException(self, ei))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test's capture, a redirected stream)."""

    _checkout_guard = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _replaceable(handler: logging.Handler) -> bool:
    """Ours, or what ``logging.basicConfig`` installs (a plain stream or file handler); never a test's own."""
    return getattr(handler, "_checkout_guard", False) or type(handler) in (logging.StreamHandler, logging.FileHandler)


def setup_logging(settings: Settings | None = None, level: str | None = None, process: str | None = None) -> None:
    """Configure the root logger for this process: one stderr handler in the format ``settings.log.format``
    at ``level`` (``--log-level``) or else ``settings.log.level``. ``process`` names the process in every line
    (default: the script's name). Idempotent; replaces a handler an earlier ``logging.basicConfig`` put
    there, and leaves other loggers' levels alone."""
    settings = settings or get_settings()
    log = settings.log
    name = process or Path(sys.argv[0]).stem or "python"
    root = logging.getLogger()
    if level is not None and level.upper() not in logging.getLevelNamesMapping():
        import typer  # a process's --log-level: a usage error of its command line, not a traceback

        known = ", ".join(name for name in logging.getLevelNamesMapping() if name not in ("NOTSET", "WARN", "FATAL"))
        raise typer.BadParameter(f"{level!r} is not a log level: one of {known}", param_hint="'--log-level'")
    root.setLevel((level or log.level).upper())  # first: an unknown level raises with nothing changed
    _PERSON_TAG_KEY.use(settings)  # person tags are made with the key of the process's own settings
    handler = _StderrHandler()
    handler.setFormatter(JsonLineFormatter(name) if log.format == "json" else TextFormatter(name))
    handler.addFilter(QuietClientBodies())
    handler.addFilter(RedactSecrets())
    for old in [h for h in root.handlers if _replaceable(h)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)


UVICORN: dict[str, Any] = {"log_config": None}
"""``uvicorn.run(app, **UVICORN, ...)``: uvicorn configures no logging of its own (its default prints
``INFO:     ...`` without time or process), so its lines go through :func:`setup_logging`'s handler."""
