"""A channel that is down (SMTP refusing connections, answering 4xx; Webex 5xx) pauses and is probed
until it answers, spending none of the alert's attempts, for as long as the alert's deadline allows;
only permanent refusals are dead-lettered at once. Minutes of outage run in milliseconds on a faster
clock (``ChannelWorker(clock=...)``)."""

from __future__ import annotations

import queue
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from infra.local.smtp import FileStore, read_mails
from infra.local.webex import free_port
from infra.settings import AlertSettings, Settings, SmtpSettings
from sinks.alerts.mail import MailError, OutgoingMail, SmtpMailer, smtp_unavailable
from sinks.alerts.sender import (
    ChannelWorker,
    Clock,
    DeliveryError,
    EmailChannel,
    Ledger,
    Outcome,
    Task,
    give_up_reason,
)
from tests.unit.test_alert_channels import alert as channel_alert

OUTAGE_S = 180.0
"""Three minutes: longer than 8 attempts' worth of backoff (at most 0.5+1+...+30+30 = 91.5 s)."""


class FastClock(Clock):
    """Monotonic time running ``speed`` times faster than real time, waits shortened to match."""

    def __init__(self, speed: float) -> None:
        self.speed, self.start = speed, time.monotonic()

    def now(self) -> float:
        return self.start + (time.monotonic() - self.start) * self.speed

    def wait(self, condition: threading.Condition, seconds: float | None) -> None:
        condition.wait(None if seconds is None else seconds / self.speed)


def alert(alert_id: str) -> dict[str, Any]:
    return channel_alert(alert_id, snapshot_ref=None)


@pytest.fixture
def closer() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def run_tasks(
    closer: ExitStack, channel: Any, settings: AlertSettings, tasks: list[Task], clock: Clock, stack_dir: Path
) -> tuple[list[Outcome], Ledger, ChannelWorker]:
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    ledger = closer.enter_context(closing(Ledger(stack_dir / "ledger.sqlite3")))
    worker = ChannelWorker(channel, ledger, settings, done, lambda ref: b"", clock=clock)
    if isinstance(channel, FlakyChannel):
        channel.worker = worker
    try:
        for task in tasks:
            worker.submit(task)
        outcomes = [done.get(timeout=20) for _ in tasks]
    finally:
        worker.stop()
    return outcomes, ledger, worker


class OutageMailer:
    """Real SMTP: to a port nobody listens on (connection refused) until ``up_at`` on the clock, then to
    a live server."""

    def __init__(self, clock: Clock, up_at: float, live_port: int) -> None:
        self.clock, self.up_at = clock, up_at
        self.down = SmtpMailer(SmtpSettings(port=free_port(), timeout_s=2))
        self.live = SmtpMailer(SmtpSettings(port=live_port, timeout_s=2))
        self.refused = 0

    def send(self, mail: OutgoingMail) -> None:
        if self.clock.now() < self.up_at:
            try:
                self.down.send(mail)
            finally:
                self.refused += 1
        self.live.send(mail)

    def close(self) -> None:
        self.down.close()
        self.live.close()


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    mail, port = tmp_path / "mail", free_port()
    controller = Controller(FileStore(mail), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, mail
    controller.stop()


def test_an_smtp_outage_longer_than_all_attempts_delivers_each_alert_exactly_once_and_dead_letters_none(
    smtp_server: tuple[int, Path], tmp_path: Path, closer: ExitStack
) -> None:
    port, mailbox = smtp_server
    clock = FastClock(speed=200)  # the outage takes 0.9 s, the deadline 3 s: room for a busy machine
    settings = AlertSettings(concurrency=4)  # the defaults: 8 attempts, 0.5 s .. 30 s backoff, 600 s deadline
    assert settings.max_attempts == 8 and settings.deadline_s >= OUTAGE_S + 2 * settings.retry_max_s
    mailer = OutageMailer(clock, clock.now() + OUTAGE_S, port)
    channel = closer.enter_context(closing(EmailChannel(Settings(stack_dir=tmp_path), mailer)))
    ids = [f"blocked:tx-{i}" for i in range(6)]
    tasks = [Task(alert(i), "email", clock.now() + settings.deadline_s) for i in ids]

    outcomes, ledger, worker = run_tasks(closer, channel, settings, tasks, clock, tmp_path)

    assert [o.reason for o in outcomes if not o.delivered] == []
    assert clock.now() - clock.start >= OUTAGE_S  # delivered after the outage, not given up during it
    assert mailer.refused > settings.max_attempts  # refused more often than an alert has attempts
    assert sorted(m["X-Checkout-Guard-Alert"] for m in read_mails(mailbox)) == sorted(ids)  # once each
    assert all(ledger.state(i, "email") == "sent" for i in ids)
    assert worker.failed_tries == 0 and worker.unavailable == mailer.refused


class FlakyChannel:
    """Down (``DeliveryError(down=True)``) until ``up_at`` on the clock; records each send's real interval and
    whether it went out as the worker's probe."""

    name, can_check_sent = "email", False

    def __init__(self, clock: Clock, up_at: float) -> None:
        self.clock, self.up_at = clock, up_at
        self.lock = threading.Lock()
        self.calls: list[tuple[float, float, bool, bool]] = []
        self.delivered: list[str] = []
        self.worker: ChannelWorker | None = None

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        start = time.monotonic()
        probe = self.worker.probe if self.worker is not None else None
        is_probe = probe is not None and probe.key[0] == alert["alert_id"]
        time.sleep(0.0005)
        up = self.clock.now() >= self.up_at
        with self.lock:
            self.calls.append((start, time.monotonic(), up, is_probe))
            if up:
                self.delivered.append(alert["alert_id"])
        if not up:
            raise DeliveryError("SMTP ConnectionRefusedError: [Errno 111] Connection refused", down=True)
        return None

    def close(self) -> None:
        pass


def test_a_down_channel_is_probed_one_send_at_a_time_and_then_sends_everything(
    tmp_path: Path, closer: ExitStack
) -> None:
    clock = FastClock(speed=200)
    settings = AlertSettings(concurrency=8)
    channel = FlakyChannel(clock, clock.now() + 120)
    tasks = [Task(alert(f"a-{i}"), "email", clock.now() + 600) for i in range(40)]

    outcomes, _, worker = run_tasks(closer, channel, settings, tasks, clock, tmp_path)

    assert all(o.delivered for o in outcomes) and sorted(channel.delivered) == sorted(t.key[0] for t in tasks)
    probes = sorted((s, e) for s, e, up, is_probe in channel.calls if is_probe and not up)
    before_down = [c for c in channel.calls if not c[2] and not c[3]]
    assert probes, "the outage was probed"
    assert all(later[0] >= earlier[1] for earlier, later in zip(probes, probes[1:], strict=False))  # never two
    assert len(probes) < 30  # capped backoff, one probe per pause: not one try per queued alert per round
    # Only the sends taken before the first failure was seen go out beside the probes: one per thread at most.
    assert len(before_down) <= settings.concurrency
    assert worker.failed_tries == 0


def test_a_channel_still_down_at_the_deadline_gives_every_waiting_alert_up_with_the_reason(
    tmp_path: Path, closer: ExitStack
) -> None:
    clock = FastClock(speed=1000)
    settings = AlertSettings(concurrency=2)
    channel = FlakyChannel(clock, float("inf"))
    tasks = [Task(alert(f"a-{i}"), "email", clock.now() + 60 + i) for i in range(5)]

    outcomes, ledger, worker = run_tasks(closer, channel, settings, tasks, clock, tmp_path)

    assert not any(o.delivered for o in outcomes)
    assert all("email still unavailable at the deadline" in o.reason and "refused" in o.reason for o in outcomes)
    assert clock.now() - clock.start >= 60 - settings.retry_max_s  # waited for the deadline, not the attempts
    assert worker.failed_tries == 0 and ledger.state("a-0", "email") is None


def smtp_server_answering(tmp_path: Path, rcpt: str | None = None, data: str | None = None) -> Controller:
    """aiosmtpd that stores mail, except that RCPT and/or DATA answer the given reply."""

    class Handler(FileStore):
        async def handle_RCPT(  # noqa: N802 (aiosmtpd hook)
            self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
        ) -> str:
            if rcpt is not None:
                return rcpt
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
            return data if data is not None else await super().handle_DATA(server, session, envelope)

    controller = Controller(Handler(tmp_path / "mail"), hostname="127.0.0.1", port=free_port())
    controller.start()
    return controller


@pytest.mark.parametrize(
    ("rcpt", "data", "down", "retriable"),
    [
        ("421 4.3.2 Service not available, closing channel", None, True, True),
        (None, "451 4.3.0 Try again later", True, True),
        ("450 4.2.1 Mailbox busy", None, True, True),
        ("550 5.1.1 No such user", None, False, False),
        (None, "554 5.7.1 Message rejected", False, False),
    ],
)
def test_smtp_replies_that_mean_try_later_are_down_and_permanent_ones_are_refusals(
    tmp_path: Path, rcpt: str | None, data: str | None, down: bool, retriable: bool
) -> None:
    controller = smtp_server_answering(tmp_path, rcpt, data)
    try:
        settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=controller.port))
        with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel, pytest.raises(DeliveryError) as e:
            channel.send(alert("a-1"), None, maybe_sent=False)
    finally:
        controller.stop()
    assert (e.value.down, e.value.retriable) == (down, retriable)


def test_an_unreachable_smtp_server_is_down_but_a_tls_or_protocol_mismatch_is_not(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=free_port()))
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel, pytest.raises(DeliveryError) as e:
        channel.send(alert("a-1"), None, maybe_sent=False)
    assert e.value.down and e.value.retriable
    for gone in (
        ConnectionRefusedError(111, "refused"),
        TimeoutError("timed out"),
        socket.gaierror(-2, "Name or service not known"),
        ConnectionResetError(104, "reset"),
        smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
    ):
        assert smtp_unavailable(gone), gone
    for misconfigured in (
        ssl.SSLCertVerificationError("certificate verify failed"),
        smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server."),
    ):
        assert not smtp_unavailable(misconfigured), misconfigured
    assert not MailError("SMTP 550", retriable=False, down=True).down  # a refusal is never "down"


def test_down_errors_are_given_up_only_at_the_deadline_whatever_the_attempts() -> None:
    task = Task(alert("a-1"), "email", deadline=100.0)
    down = DeliveryError("SMTP ConnectionRefusedError", down=True)
    assert give_up_reason(task, down, now=50.0, delay=30.0, max_attempts=8) is None
    assert give_up_reason(task, down, now=80.0, delay=30.0, max_attempts=8) == (
        "email still unavailable at the deadline, last: SMTP ConnectionRefusedError"
    )
    refused = DeliveryError("SMTP 550 5.1.1 No such user", retriable=False)
    assert "refused it" in (give_up_reason(task, refused, now=0.0, delay=0.0, max_attempts=8) or "")
