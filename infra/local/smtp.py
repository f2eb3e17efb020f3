"""The embedded stack's mail server: a real SMTP server (aiosmtpd) that keeps every mail as a file.

Each accepted message becomes one ``.eml`` file in ``<stack dir>/mail/`` (written to a temporary name, synced
and renamed, its folder synced before the mail is acknowledged: a reader never sees half a mail, and a power cut
does not lose one the sender was told was accepted), with a ``Received`` line (when it was accepted) and
``X-Envelope-From`` / ``Delivered-To`` headers prepended from the SMTP envelope. Open the files with any mail
client, or use :func:`read_mails`.

The mailbox de-duplicates by ``Message-ID``, as Gmail, Exchange and Sieve's ``duplicate`` test do:
SMTP cannot tell a sender whether a mail it sent just before crashing was accepted, so a restarted
sender may send it again, and exactly-once delivery is the receiving mailbox's job. The alert sender
derives the Message-ID from the alert id; a second copy is acknowledged, counted in ``duplicates.log``
and not stored.

It does not relay anywhere: it is the local stand-in for a company relay. ``infra.stack up`` starts it
as ``python -m infra.local.smtp --host H --port P --mail-dir D`` (port from ``CG_SMTP__PORT``, default 2525), with
the retention and purge interval below as options; run on its own, it reads them from the ``CG_*`` settings and the
``.env`` file (``CG_ENV_FILE``), as every process does.

Alert mails carry the alert's snapshot (a face), so the server keeps them no longer than the image store keeps
an alert snapshot: a kept mail is deleted ``CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS`` after it was accepted (the
time in the ``Received`` line the server writes, not the file's, which a copy of the folder resets),
checked at start and every ``CG_FACES__RETENTION_PURGE_INTERVAL_S``, the image store purge's cadence
(:func:`purge_mails`); ``duplicates.log`` loses its entries older than that at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import email.utils
import hashlib
import logging
import signal
import smtplib
import threading
import time
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Annotated

import typer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from infra.durable import fsync_dir, replace_durably
from infra.settings import get_settings

log = logging.getLogger(__name__)

# Guards duplicates.log: the server's thread appends to it while the purge's thread rewrites it without the old
# entries, and an entry appended between the purge's read and its rename would be lost.
_DUPLICATES_LOCK = threading.Lock()


def mail_dir(stack_dir: Path) -> Path:
    """Where the local server keeps the mails of a stack dir."""
    return Path(stack_dir).expanduser().resolve() / "mail"


class FileStore:
    """aiosmtpd handler: one ``.eml`` file per accepted message, written atomically and durably."""

    def __init__(self, directory: Path, latency_s: float = 0.0) -> None:
        self.directory, self.latency_s = directory, latency_s
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        if self.latency_s:  # a slow relay, for benchmarks
            await asyncio.sleep(self.latency_s)
        # The Received line records when the mail was accepted, for the retention: a file's time is reset by a copy.
        header = (
            f"Received: by checkout-guard-local-smtp; {email.utils.format_datetime(datetime.now(UTC))}\r\n"
            f"X-Envelope-From: {envelope.mail_from}\r\n"
            + "".join(f"Delivered-To: {rcpt}\r\n" for rcpt in envelope.rcpt_tos)
        )
        content = envelope.original_content or b""
        message_id = _message_id(content)
        if message_id:
            name = f"{hashlib.sha256(message_id.encode()).hexdigest()[:24]}.eml"
            if (self.directory / name).exists():
                with _DUPLICATES_LOCK, open(self.directory / "duplicates.log", "a") as log:
                    log.write(f"{time.time_ns()} {message_id}\n")
                return "250 Message accepted for delivery (duplicate Message-ID, kept once)"
        else:
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:12]}.eml"
        # On disk, its folder synced, before the 250: the sender then counts the mail delivered, never to send it again.
        replace_durably(self.directory / name, header.encode() + content)
        return "250 Message accepted for delivery"


def _headers(content: bytes) -> email.message.Message:
    """The headers of a raw mail, parsed alone (the body may be megabytes of attachment)."""
    head = content.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)


def _message_id(content: bytes) -> str | None:
    """The Message-ID header of a raw mail (headers only are parsed)."""
    value = _headers(content).get("Message-ID")
    return str(value).strip() if value else None


_HEAD_BYTES = 256 * 1024
"""The most of a mail read for its headers, far more than they take: each purge dates every kept mail."""


def accepted_at(path: Path) -> float:
    """When a kept mail was accepted (epoch seconds): the time of its first ``Received`` line, which this server
    writes, else its ``Date``, else the file's time; and never later than the file's time. A copied or restored
    mail folder gives its files new times, which restarted their retention; a date in a mail that lies in the
    future must not keep it longer either."""
    file_time = path.stat().st_mtime
    head = b""
    with open(path, "rb") as f:  # up to the blank line: the body, megabytes of snapshot, is not read
        while len(head) < _HEAD_BYTES and (line := f.readline(_HEAD_BYTES)) not in (b"", b"\r\n", b"\n"):
            head += line
    headers = _headers(head)
    for value in (str(headers.get("Received", "")).rpartition(";")[2], headers.get("Date", "")):
        when = _date(value)
        if when is not None:
            return min(when, file_time)
    return file_time


def _date(value: object) -> float | None:
    """An RFC 5322 date (a ``Date`` header, a ``Received`` line's end) in epoch seconds; None when it is none."""
    try:
        when = email.utils.parsedate_to_datetime(str(value or "").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 5322's -0000: UTC, with no zone said
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def duplicates(directory: Path) -> list[str]:
    """Message-IDs whose second (third...) copy the mailbox acknowledged without storing it. A line with no space (a
    hand-edited or torn file) names no Message-ID: skipped with a WARNING giving its line number, not its content
    (before, it raised IndexError)."""
    path = directory / "duplicates.log"
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        _, space, message_id = line.partition(" ")
        if not space:
            log.warning("%s line %d names no Message-ID (no space): skipped", path, number)
            continue
        out.append(message_id)
    return out


def read_mails(directory: Path) -> list[EmailMessage]:
    """Every mail the server kept, in the order it accepted them: by the time of the ``Received`` line it wrote at the
    top (seconds), else the file's time, then the file's time (ns) and name. Before, by the file's time alone, which a
    copy or restore of the folder resets, so the order was the copy's."""
    kept = []
    for path in directory.glob("*.eml"):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        mtime_ns = path.stat().st_mtime_ns
        received = _date(str(msg.get("Received", "")).rpartition(";")[2])
        kept.append((received if received is not None else mtime_ns / 1e9, mtime_ns, path.name, msg))
    return [msg for *_, msg in sorted(kept, key=lambda k: k[:3])]


def purge_mails(directory: Path, keep_s: float, now: float | None = None) -> int:
    """Delete the kept mails accepted more than ``keep_s`` before ``now`` (by the time recorded in the mail,
    :func:`accepted_at`): an alert mail holds its snapshot, a face, which must not outlive the alert snapshot's
    retention.
    The folder is synced after a delete, so a power cut does not bring a mail back. ``duplicates.log`` loses its
    entries older than that too (:func:`prune_duplicates`). How many mails went."""
    cutoff = (time.time() if now is None else now) - keep_s
    prune_duplicates(directory, cutoff)
    gone = 0
    for path in directory.glob("*.eml"):
        with contextlib.suppress(FileNotFoundError):
            if accepted_at(path) < cutoff:
                path.unlink()
                gone += 1
    if gone:
        fsync_dir(directory)
    return gone


def prune_duplicates(directory: Path, cutoff: float) -> int:
    """Drop the ``duplicates.log`` entries logged before ``cutoff`` (epoch seconds), and any line that names no time:
    one line per second copy, appended for as long as the server ran, grew the file for ever. The rest is written
    back durably, under the lock the server appends under, so no newer entry is lost. How many lines went."""
    log = directory / "duplicates.log"
    with _DUPLICATES_LOCK:
        try:
            lines = log.read_text().splitlines()
        except FileNotFoundError:
            return 0
        kept = [line for line in lines if _logged_at(line) >= cutoff]
        if len(kept) < len(lines):
            replace_durably(log, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def _logged_at(line: str) -> float:
    """When a ``duplicates.log`` line was written (its first field, nanoseconds), or -inf for a line that names none."""
    try:
        return int(line.split(" ", 1)[0]) / 1e9
    except ValueError:
        return float("-inf")


async def keep_purging(directory: Path, keep_s: float, every_s: float, stop: asyncio.Event) -> None:
    """:func:`purge_mails` now and every ``every_s`` until ``stop``: the running server enforces the retention."""
    while not stop.is_set():
        gone = await asyncio.to_thread(purge_mails, directory, keep_s)
        if gone:
            print(f"local SMTP server: deleted {gone} mail(s) past their retention", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """A real SMTP exchange: greeting, NOOP answered 250, QUIT."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            return smtp.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def serve(host: str, port: int, directory: Path, keep_s: float, purge_every_s: float, latency_s: float = 0.0) -> None:
    """Run until SIGTERM/SIGINT, deleting mails older than ``keep_s`` every ``purge_every_s``."""
    controller = Controller(
        FileStore(directory, latency_s), hostname=host, port=port, data_size_limit=25 * 1024 * 1024, ready_timeout=30
    )
    controller.start()
    print(f"local SMTP server on {host}:{port}, mails kept in {directory}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(keep_purging(directory, keep_s, purge_every_s, stop))
    finally:
        with contextlib.suppress(Exception):
            controller.stop()
        loop.close()
        print("local SMTP server stopped", flush=True)


def main(
    mail_dir: Annotated[Path, typer.Option("--mail-dir", help="Directory for the .eml files.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 2525,
    latency_ms: Annotated[float, typer.Option(help="Delay before accepting each mail (benchmarks).")] = 0.0,
    keep_days: Annotated[
        float | None,
        typer.Option(help="Delete mails this long after acceptance (default: alert snapshots' retention)."),
    ] = None,
    purge_every_s: Annotated[
        float | None, typer.Option(help="How often to delete them (default: the image store purge's interval).")
    ] = None,
) -> None:
    """Serve SMTP and keep every accepted mail as an .eml file, for as long as an alert snapshot is kept."""
    # the settings as every process reads them, the .env file (CG_ENV_FILE) too: Settings() read the environment alone
    faces = get_settings().faces
    days = faces.alert_snapshot_retention_days if keep_days is None else keep_days
    every = faces.retention_purge_interval_s if purge_every_s is None else purge_every_s
    serve(host, port, mail_dir, days * 86_400, every, latency_ms / 1000)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(main)
