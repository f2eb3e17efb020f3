"""Alert e-mails: building the message and sending it by SMTP (STARTTLS/TLS, auth) or Amazon SES.

Both senders raise :class:`MailError` with ``retriable`` set from what the server said: SMTP 4xx,
dropped connections, timeouts and SES throttling/5xx are worth another try; SMTP 5xx and SES
``MessageRejected`` are not. A refusal for the mail's size (SMTP 552 / 5.3.4, SES ``MessageRejected``
saying so or HTTP 413, or a mail past SES's 10 MB, which is not sent at all) sets ``too_large``: the channel sends
it again at once without the snapshot. Those
that say the *service* is unavailable rather than anything about the message (no connection, DNS,
timeouts, SMTP 4xx, SES throttling/5xx) also set ``down``: the sender then waits for the server instead
of spending the alert's attempts. Neither logs the message (it can carry a face snapshot).
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import ssl
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from typing import Any, Protocol

from infra.logs import tag_addresses
from infra.settings import SmtpSettings
from schemas.errors import CheckoutGuardError
from schemas.images import image_label
from sinks.alerts.message import AlertText, message_id, shown


class MailError(CheckoutGuardError):
    """A mail not sent. ``down``: the mail service is unavailable (try later, whatever the mail). ``too_large``:
    refused for its size (the same mail is refused again on every try)."""

    def __init__(self, reason: str, *, retriable: bool = True, down: bool = False, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.retriable, self.down = reason, retriable, down and retriable
        self.too_large = too_large


def smtp_too_large(code: int, answer: bytes | str) -> bool:
    """Whether an SMTP answer to ``MAIL FROM`` (its ``SIZE``) or to the data refuses the mail for its size: 552
    (RFC 5321's "exceeded storage allocation", what relays answer past their size limit) or the enhanced status
    5.3.4 ("message too big for system"). Pure."""
    text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
    return code == 552 or (code >= 500 and "5.3.4" in text)


SES_SIZE_WORDS = re.compile(r"message length|message size|too (large|big|long)|exceeds? .*(size|length|bytes)", re.I)
"""How SES says a mail is past its size limit (10 MB for ``SendRawEmail``): ``MessageRejected: Message length is more
than 10485760 bytes long``."""


def ses_too_large(code: str, status: int, message: str) -> bool:
    """Whether an SES error refuses the mail for its size: ``MessageRejected`` (or ``InvalidParameterValue``) with a
    size message, or HTTP 413 (the request past the endpoint's limit). Pure."""
    if status == 413:
        return True
    return code in {"MessageRejected", "InvalidParameterValue"} and SES_SIZE_WORDS.search(message) is not None


def smtp_unavailable(exc: BaseException) -> bool:
    """Whether an SMTP failure means the server cannot be reached or talked to now: refused, reset or
    dropped connections, timeouts, DNS failures. Not the other ``SMTPException`` (an ``OSError`` too:
    e.g. STARTTLS not offered) nor TLS errors (an untrusted certificate): waiting does not fix those."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, smtplib.SMTPException | ssl.SSLError):
        return False
    return isinstance(exc, OSError)


class Mailer(Protocol):
    def send(self, mail: OutgoingMail) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class OutgoingMail:
    """A finished MIME message (CRLF line ends) and its Message-ID."""

    message_id: str
    data: bytes


def _base64_lines(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _part(content_type: str, data: bytes, *extra: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in (f"Content-Type: {content_type}", "Content-Transfer-Encoding: base64", *extra))
    return head.encode() + b"\r\n" + _base64_lines(data)


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    """multipart/<subtype>; the boundary cannot occur in base64 bodies (``_`` is not in their alphabet)."""
    boundary = f"=_cg_{uuid.uuid4().hex}"
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part for part in parts) + f"--{boundary}--\r\n".encode()
    return f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'.encode() + body


def _header(value: str) -> str:
    """A header value on one line (:func:`~sinks.alerts.message.shown`: a value cannot add a header), RFC 2047
    encoded and folded with CRLF when it is not ASCII (store names)."""
    value = shown(value, HEADER_MAX)
    return value if value.isascii() else Header(value, "utf-8").encode(linesep="\r\n")


def address_header(address: str) -> str:
    """``Name <a@b>`` as a header writes it: a name that is not ASCII (``Équipe Sûreté``) RFC 2047 encoded, as
    mail without SMTPUTF8 (and Amazon SES, also for ``Source``) requires; a bare address as it is."""
    return formataddr(parseaddr(address))


HEADER_MAX = 900
"""Below SMTP's 998-byte line limit with the header's name (a longer Subject is refused by the relay)."""
ADDRESS_FOLD = ",\r\n "
"""Between the addresses of ``To:``: one line each (folded), so no number of recipients makes a line longer than
SMTP's 998 bytes (on one line, 30 addresses did and the relay refused every alert mail)."""


def build_email(
    alert_id: str, text: AlertText, sender: str, recipients: list[str], image: bytes | None = None
) -> OutgoingMail:
    """Plain text for any client, HTML with the snapshot shown inline (once: clients also offer the inline
    part, named ``snapshot.jpg`` or ``snapshot.png`` after what its bytes are, for saving).

    Written out directly (base64 bodies, fixed structure) rather than through the ``email`` package's
    generator, which costs about a millisecond per message -- a third of the sender's CPU per alert.
    """
    plain = _part('text/plain; charset="utf-8"', text.plain().encode())
    if image is None:
        body = _multipart("alternative", [plain, _part('text/html; charset="utf-8"', text.html().encode())])
    else:
        cid = f"snapshot-{message_id(alert_id)[7:23]}@checkout-guard"
        html = _part('text/html; charset="utf-8"', text.html(image_cid=cid).encode())
        kind, filename = image_label(image, "snapshot")  # a PNG labelled image/jpeg was shown broken or not at all
        inline = _part(kind, image, f"Content-ID: <{cid}>", f'Content-Disposition: inline; filename="{filename}"')
        body = _multipart("alternative", [plain, _multipart("related", [html, inline])])
    mid = message_id(alert_id)
    headers = [
        f"Subject: {_header(text.subject)}",
        f"From: {address_header(sender)}",
        f"To: {ADDRESS_FOLD.join(address_header(r) for r in recipients)}",
        f"Date: {formatdate(localtime=True)}",
        f"Message-ID: {mid}",
        f"X-Checkout-Guard-Alert: {alert_id}",
        "MIME-Version: 1.0",
    ]
    return OutgoingMail(mid, "".join(f"{h}\r\n" for h in headers).encode() + body)


class SmtpMailer:
    """One SMTP connection per sending thread, kept open between mails and reopened after any error.

    A server may accept a mail for some recipients and refuse others (``RCPT TO`` answered 4xx/5xx): that is a
    failed send, not a delivery, and a later try of the same mail goes to the recipients refused for now (4xx)
    only. A recipient refused for good (5xx) is not tried again: while others still wait on a 4xx the send is
    retriable, and once only 5xx refusals are left it fails for good with their codes (a dead letter), the others
    having it; then the refusals are forgotten, so a re-drive of the dead letter asks those recipients again (and
    only them). A 4xx again on such a retry is about those mailboxes, not ``down``. Who accepted or refused it for
    good is remembered by Message-ID, in memory: after a restart all get it again, with the same Message-ID."""

    ACCEPTED_KEPT = 10_000
    """Mails whose accepted recipients are remembered (the oldest are forgotten first)."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        self._accepted: OrderedDict[str, tuple[frozenset[str], dict[str, int]]] = OrderedDict()
        """Per Message-ID: the recipients who accepted it, and those refused for good with their 5xx code."""
        self._local = threading.local()
        self._all: list[smtplib.SMTP] = []
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        """One TLS context for all connections (loading the CA store costs ~20 ms)."""
        with self._lock:
            if self._context is None:
                ca = self.settings.ca_file
                self._context = ssl.create_default_context(cafile=str(ca) if ca else None)
            return self._context

    def _connect(self) -> smtplib.SMTP:
        s = self.settings
        conn: smtplib.SMTP
        if s.ssl:
            conn = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_s, context=self._tls())
        else:
            conn = smtplib.SMTP(s.host, s.port, timeout=s.timeout_s)
        try:
            if s.starttls and not s.ssl:
                conn.starttls(context=self._tls())
            if s.username and s.password is not None:
                conn.login(s.username, s.password.get_secret_value())
        except BaseException:  # refused STARTTLS or login: the connected socket is nobody's, close it
            conn.close()
            raise
        with self._lock:
            self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def send(self, mail: OutgoingMail) -> None:
        reused = getattr(self._local, "conn", None) is not None
        try:
            try:
                self._send_once(mail)
            except smtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                self._drop()  # an idle connection the server closed: one fresh try
                self._send_once(mail)
        except smtplib.SMTPResponseException as exc:
            self._drop()
            transient = exc.smtp_code < 500  # 4xx (421 service not available, 451, 452): try again later
            raise MailError(
                f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}",
                retriable=transient,
                down=transient,
                too_large=smtp_too_large(exc.smtp_code, exc.smtp_error),
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            self._drop()
            codes = sorted(code for code, _ in exc.recipients.values())
            with self._lock:  # the relay took this mail, or refused it for good, for some recipient on a try before
                done, gone = self._accepted.get(mail.message_id, (frozenset(), {}))
            answered_before = bool(done or gone)
            self._remember(mail.message_id, set(), exc.recipients)
            # 421: the relay is closing. Every recipient 4xx on a mail it never took for anyone: it may be overloaded,
            # try later. But 4xx for those left of a mail it took (or refused for good) for others is about those
            # mailboxes (full, busy, greylisted), not an outage: pausing the channel would hold up every alert.
            down = 421 in codes or (all(c < 500 for c in codes) and not answered_before)
            retriable = any(c < 500 for c in codes)
            if not retriable:
                self._forget_refusals(mail.message_id)
            raise MailError(f"SMTP recipients refused ({codes})", retriable=retriable, down=down) from exc
        except (smtplib.SMTPException, OSError) as exc:
            self._drop()
            raise MailError(
                tag_addresses(f"SMTP {type(exc).__name__}: {exc}")[:300], down=smtp_unavailable(exc)
            ) from exc

    def _remember(self, message_id: str, accepted: set[str], refused: dict[str, tuple[int, bytes]]) -> dict[str, int]:
        """Add this try's accepting recipients and those refused for good (5xx) to what is known of the mail; all
        its refusals for good so far."""
        with self._lock:
            done, gone = self._accepted.get(message_id, (frozenset(), {}))
            gone = {**gone, **{r: code for r, (code, _) in refused.items() if code >= 500}}
            self._accepted[message_id] = (done | accepted, gone)
            self._accepted.move_to_end(message_id)
            while len(self._accepted) > self.ACCEPTED_KEPT:
                self._accepted.popitem(last=False)
            return gone

    def _forget_refusals(self, message_id: str) -> None:
        """The mail failed for good (the alert becomes a dead letter): forget who refused it, keep who took it, so
        a re-drive once the mailbox is fixed goes to the refusing recipients again and not to the others."""
        with self._lock:
            if message_id in self._accepted:
                self._accepted[message_id] = (self._accepted[message_id][0], {})

    def _send_once(self, mail: OutgoingMail) -> None:
        with self._lock:
            done, gone = self._accepted.get(mail.message_id, (frozenset(), {}))
        recipients = [r for r in self.settings.recipients() if r not in done and r not in gone]
        if recipients:
            if getattr(self._local, "conn", None) is None:
                self._local.conn = self._connect()
            envelope_from = parseaddr(self.settings.from_address)[1] or self.settings.from_address
            refused = self._local.conn.sendmail(envelope_from, recipients, mail.data)
            gone = self._remember(mail.message_id, {r for r in recipients if r not in refused}, refused)
            if any(code < 500 for code, _ in refused.values()):  # 450 mailbox busy, 452: those, later
                codes = sorted(code for code, _ in refused.values())
                raise MailError(f"SMTP refused {len(refused)} of {len(recipients)} recipients ({codes})")
        if gone:  # the others have it (now or on an earlier try); these never will
            self._forget_refusals(mail.message_id)
            codes = sorted(gone.values())
            raise MailError(
                f"SMTP refused {len(gone)} of {len(self.settings.recipients())} recipients for good ({codes})",
                retriable=False,
            )

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                with contextlib.suppress(smtplib.SMTPException, OSError):
                    conn.quit()  # polite; closes the socket only when the server answers
            finally:
                conn.close()


class SesMailer:
    """Amazon SES ``SendRawEmail`` (raw MIME keeps the inline snapshot); the boto3 client is thread-safe.

    SES takes at most :data:`MAX_DESTINATIONS` recipients per call (more: ``InvalidParameterValue``, every alert a
    dead letter), so a mail to more goes out in several calls of that many. As with SMTP's partial refusals, the
    recipients of calls SES accepted are remembered by Message-ID (in memory): a retry after a failed call goes to
    the others only, and after a restart all get it again with the same Message-ID."""

    MAX_DESTINATIONS = 50
    ACCEPTED_KEPT = 10_000
    """Mails whose accepted recipients are remembered (the oldest are forgotten first)."""
    MAX_RAW_BYTES = 10 * 1024 * 1024
    """The largest raw mail ``SendRawEmail`` (SES API v1, what this uses; API v2's ``SendEmail`` takes 40 MB) takes:
    10 MB, its snapshot base64-encoded in it (SES refuses more: "Message length is more than 10485760 bytes long").
    A larger mail is not sent (:meth:`send`): SES would only refuse it."""

    RETRIABLE_CODES = frozenset(
        {
            "Throttling",
            "ThrottlingException",
            "ServiceUnavailable",
            "InternalFailure",
            "RequestTimeout",
            "TooManyRequestsException",
        }
    )

    def __init__(
        self,
        settings: SmtpSettings,
        region: str | None = None,
        endpoint_url: str | None = None,
        client: Any | None = None,
    ) -> None:
        """``region`` None: boto3's default chain (``AWS_DEFAULT_REGION``, the AWS profile); credentials
        always come from boto3's chain (environment, profile, container or instance role).

        Each call is one request that waits at most ``CG_SMTP__TIMEOUT_S`` to connect and for the answer, as an
        SMTP command does: botocore's defaults (60 s each, 3 requests in its standard mode) held the e-mail channel
        for minutes, and sent a ``SendRawEmail`` whose answer timed out or was a 5xx again on their own. SES gives
        every mail it takes its own Message-ID, so those copies of the alert (and its snapshot) reached the
        recipients as several mails. Another try is the channel's (a mail service that is down pauses it)."""
        from botocore.config import Config

        from infra.clients.aws import aws_client

        self.settings = settings
        self._accepted: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()
        self._owns_client = client is None
        self.client = client or aws_client(
            "ses",
            region=region,
            region_setting="CG_ALERTS__SES_REGION",
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=settings.timeout_s,
                read_timeout=settings.timeout_s,
                retries={"total_max_attempts": 1},
            ),
        )

    def send(self, mail: OutgoingMail) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as EndpointUnreachable

        if len(mail.data) > self.MAX_RAW_BYTES:  # before, SES was sent it once, only to refuse it
            raise MailError(
                f"SES not asked: the mail ({len(mail.data)} bytes) is larger than SES takes ({self.MAX_RAW_BYTES})",
                retriable=False,
                too_large=True,
            )
        with self._lock:
            done = self._accepted.get(mail.message_id, frozenset())
        left = [r for r in self.settings.recipients() if r not in done]
        try:
            for start in range(0, len(left), self.MAX_DESTINATIONS):
                chunk = left[start : start + self.MAX_DESTINATIONS]
                self.client.send_raw_email(
                    Source=address_header(self.settings.from_address),
                    Destinations=chunk,
                    RawMessage={"Data": mail.data},
                )
                with self._lock:
                    done = self._accepted.get(mail.message_id, frozenset()) | frozenset(chunk)
                    self._accepted[mail.message_id] = done
                    self._accepted.move_to_end(mail.message_id)
                    while len(self._accepted) > self.ACCEPTED_KEPT:
                        self._accepted.popitem(last=False)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = code in self.RETRIABLE_CODES or status >= 500
            too_large = ses_too_large(code, status, str(exc.response.get("Error", {}).get("Message", "")))
            reason = f"SES {code or status}" + (" (the mail is larger than SES takes)" if too_large else "")
            raise MailError(reason, retriable=transient, down=transient, too_large=too_large) from exc
        except BotoCoreError as exc:  # unreachable or timing out: down; missing credentials and such: a failed try
            down = isinstance(exc, EndpointUnreachable | HTTPClientError)
            raise MailError(f"SES {type(exc).__name__}", down=down) from exc

    def close(self) -> None:
        """Close the client's connection pool (a client passed in stays the caller's)."""
        if self._owns_client:
            self.client.close()


def _text(value: bytes | str) -> str:
    """An SMTP server's answer, cut short, each address it quotes (``<jane@store.test>: mailbox full``) named by
    its :func:`tag_addresses` tag: the answer goes into logs and dead-letter reasons."""
    return tag_addresses(value.decode(errors="replace") if isinstance(value, bytes) else str(value))[:200]
