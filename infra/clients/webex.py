"""A small Webex REST client: the calls the alert sender and the bot make, nothing more.

Webex facts it relies on (developer.webex.com): bearer-token auth; ``POST /messages`` with ``roomId`` (or
``toPersonEmail``: a 1:1 message) and ``markdown`` (at most 7,439 bytes) as JSON, or as multipart/form-data with one
``files`` part to attach an image, ``<@personId:ID|name>`` in the markdown mentioning someone;
``GET /messages?roomId=`` (a bot: direct rooms only, 403 for a group space without ``mentionedPeople=me``, which
lists the messages that mention it);
``GET /messages/{id}`` for the text of a message a webhook announced; ``GET /people/me`` for the bot's own id;
``POST /webhooks``; ``429`` with ``Retry-After`` seconds when over the rate limit. A list comes a page at a
time: while more are left, the answer's ``Link`` header has a ``rel="next"`` URL to the rest (RFC 5988; webhooks
100 a page by default), which :meth:`WebexClient._list` follows.

Errors come back as :class:`WebexError` with ``retriable`` and ``retry_after`` set, so callers decide
about backoff, and with the answer's ``trackingId`` header (Webex support asks for it to look into a failed call) in
``tracking_id`` and at the end of ``reason``; the client itself never sleeps or retries (one request = one
attempt), except through :func:`with_retries`, which honours a 429's ``Retry-After`` up to :data:`RETRY_AFTER_LIMIT_S`.

Ids that go into a path (message and webhook ids; they reach us in webhook bodies) are escaped as one
path segment each: an id such as ``../webhooks/<id>`` must not turn a read into a call on another route
with the bot's token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from infra.clients import urls
from infra.retry import RETRY_AFTER_MAX_S, call_with_retries, parse_retry_after
from infra.settings import WebexSettings
from schemas.errors import CheckoutGuardError
from schemas.images import image_label

MAX_MARKDOWN_BYTES = 7439
RETRIABLE_STATUS = frozenset({408, 409, 423, 425, 429})
RETRY_AFTER_LIMIT_S = 300.0
"""The longest ``Retry-After`` :func:`with_retries` waits out (Webex asks for seconds, at most a few minutes): a
shorter cap retried inside the limit and was rate limited again; a longer one (a broken or hostile header) would
park the caller."""
MAX_LIST_PAGES = 50
"""The most pages one listing follows (5,000 webhooks at Webex's 100 a page): a ``Link`` that never ends (a broken
server, a loop) must not hold the caller forever; past it the listing stops with a WARNING."""
MAX_TRACKING_ID_CHARS = 200
"""The longest ``trackingId`` header kept (Webex's are under 100 characters); a longer one is not Webex's."""
NO_ANSWER = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)
"""Transport errors after the request went out, while its answer was awaited: Webex may have done it. The others
(no connection, a connect or pool timeout, a request not written whole) happen before Webex could act on it."""
T = TypeVar("T")
log = logging.getLogger(__name__)


class WebexError(CheckoutGuardError):
    """A failed Webex call: HTTP status (None for transport errors), whether retrying can help, and how
    long Webex asked us to wait (``Retry-After``). A 3xx is retriable: Webex's API does not redirect, so it
    comes from something in the way (a proxy, a captive gateway), which is mended, not a refusal of the call."""

    @property
    def unavailable(self) -> bool:
        """Webex did not answer this call itself: no answer, 5xx, or a redirect (something in the way)."""
        return self.status is None or self.status >= 500 or 300 <= self.status < 400

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retriable: bool = True,
        retry_after: float | None = None,
        asked_wait: float | None = None,
        tracking_id: str | None = None,
        maybe_done: bool = False,
    ) -> None:
        if tracking_id:
            reason = f"{reason} (trackingId {tracking_id})"
        super().__init__(reason)
        self.reason, self.status, self.retriable, self.retry_after = reason, status, retriable, retry_after
        self.tracking_id = tracking_id
        """The failed answer's ``trackingId`` header, what Webex support asks for; None without an answer or header."""
        self.maybe_done = maybe_done
        """The request was sent and no answer came (a read timeout, the connection dropped while waiting): Webex may
        have done it all the same, so a message posted again may be in the room twice (:func:`with_retries`)."""
        self.asked_wait = retry_after if asked_wait is None else asked_wait
        """The wait ``Retry-After`` asked for, up to :data:`RETRY_AFTER_LIMIT_S` (``retry_after`` stops at
        :data:`infra.retry.RETRY_AFTER_MAX_S`, the generic retry cap; the alert sender and the bot wait this one)."""


def asked_wait(exc: BaseException) -> float | None:
    """How long a failed Webex call asked to be left alone (a 429's ``Retry-After``), at most
    :data:`RETRY_AFTER_LIMIT_S`; None when it did not say."""
    wait = getattr(exc, "asked_wait", None)
    return None if wait is None else min(float(wait), RETRY_AFTER_LIMIT_S)


def truncate_utf8(text: str, max_bytes: int = MAX_MARKDOWN_BYTES) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    return raw[: max_bytes - 3].decode(errors="ignore") + "..."


def path_segment(value: str) -> str:
    """``value`` as exactly one URL path segment (:func:`infra.clients.urls.path_segment`); an empty or
    non-string id is a :class:`WebexError` that retrying cannot help, raised before any request."""
    try:
        return urls.path_segment(value)
    except ValueError as exc:
        raise WebexError(str(exc), retriable=False) from None


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 4,
    initial_s: float = 0.5,
    maximum_s: float = 30.0,
    deadline_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    posts: bool = False,
) -> T:
    """``call()`` again after 429 and other retriable failures, up to ``attempts`` tries; for one-off calls such
    as a bot's reply. The alert sender has its own per-channel scheduling instead.

    ``posts``: the call posts a message. A failure after which Webex may have posted it (:attr:`WebexError.maybe_done`:
    sent, no answer) is then raised at once, not tried again: a reply whose answer timed out was posted once per try.

    A 429 is waited out for its whole ``Retry-After`` up to :data:`RETRY_AFTER_LIMIT_S` (a try sooner is only
    refused again); other failures back off exponentially from ``initial_s`` up to ``maximum_s``. With
    ``deadline_s`` (seconds from now) a wait that would end past it is not begun: the last error is raised at
    once. Every wait is logged with its length and why."""

    def waiting(exc: BaseException, tries: int, seconds: float) -> None:
        why = "Retry-After of a 429" if getattr(exc, "status", None) == 429 else "backoff"
        reason = getattr(exc, "reason", type(exc).__name__)
        log.warning(
            "Webex call failed (%s): waiting %.1f s (%s) before try %d of %d", reason, seconds, why, tries + 1, attempts
        )

    return call_with_retries(
        call,
        retriable=lambda exc: isinstance(exc, WebexError) and exc.retriable and not (posts and exc.maybe_done),
        attempts=attempts,
        deadline_s=deadline_s,
        retry_after=asked_wait,
        wait=lambda n: min(maximum_s, initial_s * 2**n),
        maximum_s=max(maximum_s, RETRY_AFTER_LIMIT_S),
        sleep=sleep,
        before_sleep=waiting,
    )


@dataclass(frozen=True)
class Attachment:
    filename: str
    data: bytes
    content_type: str = "application/octet-stream"

    @classmethod
    def image(cls, stem: str, data: bytes) -> Attachment:
        """An image named and typed after its first bytes (``snapshot.png``, ``image/png``): not every snapshot is
        a JPEG, and one labelled so that is not is shown broken or not at all."""
        content_type, filename = image_label(data, stem)
        return cls(filename, data, content_type)


class WebexClient:
    """Thread-safe: each thread gets its own ``httpx.Client`` with one kept-alive connection (a shared
    pool serialises dozens of sending threads on its lock); pass ``transport`` to reach a test server."""

    def __init__(
        self, base_url: str, token: str, *, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self._base_url, self._token, self._timeout_s = base_url.rstrip("/"), token, timeout_s
        self._transport = transport
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    @property
    def _http(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self._base_url,
                timeout=self._timeout_s,
                transport=self._transport,
                headers={"Authorization": f"Bearer {self._token}"},
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    @classmethod
    def from_settings(cls, settings: WebexSettings) -> WebexClient:
        if settings.bot_token is None:
            raise ValueError("Webex needs a bot token (CG_WEBEX__BOT_TOKEN)")
        return cls(settings.base_url, settings.bot_token.get_secret_value(), timeout_s=settings.timeout_s)

    def close(self) -> None:
        """Close every thread's ``httpx.Client`` (each thread opened its own), from any thread."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> WebexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls

    def send_message(
        self, room_id: str, markdown: str, attachment: Attachment | None = None, parent_id: str | None = None
    ) -> dict[str, Any]:
        """Post ``markdown`` (truncated to Webex's limit) to a room, with one file when given, in the thread of
        ``parent_id`` when given."""
        fields = {"roomId": room_id, "markdown": truncate_utf8(markdown)}
        if parent_id:
            fields["parentId"] = parent_id
        if attachment is None:
            return self._call("POST", "/messages", json=fields)
        files = {"files": (attachment.filename, attachment.data, attachment.content_type)}
        return self._call("POST", "/messages", data=fields, files=files)

    def send_to_person(self, email: str, markdown: str) -> dict[str, Any]:
        """Post ``markdown`` (truncated to Webex's limit) to one person, in their 1:1 room with the bot."""
        return self._call("POST", "/messages", json={"toPersonEmail": email, "markdown": truncate_utf8(markdown)})

    def send_card(
        self, room_id: str, markdown: str, card: dict[str, Any], parent_id: str | None = None
    ) -> dict[str, Any]:
        """Post an adaptive card (``markdown`` is the fallback text of clients without cards), in the thread
        of ``parent_id`` when given."""
        fields: dict[str, Any] = {
            "roomId": room_id,
            "markdown": truncate_utf8(markdown),
            "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive", "content": card}],
        }
        if parent_id:
            fields["parentId"] = parent_id
        return self._call("POST", "/messages", json=fields)

    def get_attachment_action(self, action_id: str) -> dict[str, Any]:
        """A card button press (``inputs`` holds the pressed action's data)."""
        return self._call("GET", f"/attachment/actions/{path_segment(action_id)}")

    def get_person(self, person_id: str) -> dict[str, Any]:
        return self._call("GET", f"/people/{path_segment(person_id)}")

    def get_message(self, message_id: str) -> dict[str, Any]:
        return self._call("GET", f"/messages/{path_segment(message_id)}")

    def delete_message(self, message_id: str) -> bool:
        """Delete one of the bot's messages (its text and files); False when Webex no longer has it (404)."""
        try:
            self._call("DELETE", f"/messages/{path_segment(message_id)}")
        except WebexError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_messages(
        self, room_id: str, max_items: int = 100, parent_id: str | None = None, *, mentioning_me: bool = False
    ) -> list[dict[str, Any]]:
        """The room's latest messages, newest first; with ``parent_id``, that thread's replies only. A bot gets
        them of a direct (1:1) room only: for a group space Webex answers 403 unless ``mentioning_me``
        (``mentionedPeople=me``: only the messages that mention the bot, at most 100)."""
        params: dict[str, Any] = {"roomId": room_id, "max": max_items}
        if parent_id:
            params["parentId"] = parent_id
        if mentioning_me:
            params["mentionedPeople"] = "me"
        return self._list("/messages", params, max_items)

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/people/me")

    def list_webhooks(self) -> list[dict[str, Any]]:
        """Every webhook of the bot, all pages (the first holds 100): registration deletes the old ones it finds."""
        return self._list("/webhooks", {})

    def create_webhook(
        self, name: str, target_url: str, secret: str, filter_: str | None = None, resource: str = "messages"
    ) -> dict[str, Any]:
        body = {"name": name, "targetUrl": target_url, "resource": resource, "event": "created", "secret": secret}
        if filter_:
            body["filter"] = filter_
        return self._call("POST", "/webhooks", json=body)

    def delete_webhook(self, webhook_id: str) -> None:
        self._call("DELETE", f"/webhooks/{path_segment(webhook_id)}")

    # ------------------------------------------------------------------ plumbing

    def _list(self, path: str, params: dict[str, Any], limit: int | None = None) -> list[dict[str, Any]]:
        """The ``items`` of a listing, following its ``Link: <url>; rel="next"`` pages until ``limit`` items (None:
        all) or :data:`MAX_LIST_PAGES`. A next URL elsewhere than the base URL's scheme, host and port is refused
        (:class:`WebexError`, not retriable) before the bot's token is sent there."""
        items: list[dict[str, Any]] = []
        url, kwargs = path, {"params": params}
        for _ in range(MAX_LIST_PAGES):
            response = self._request("GET", url, **kwargs)
            page = _json(response).get("items") or []
            items.extend(page)
            url = response.links.get("next", {}).get("url", "")
            if not url or not page or (limit is not None and len(items) >= limit):
                return items if limit is None else items[:limit]
            if not self._same_origin(url):
                raise WebexError("a next-page link to another host than CG_WEBEX__BASE_URL's", retriable=False)
            kwargs = {}
        log.warning(
            "Webex listing of %s stopped after %d pages (%d items): more were left", path, MAX_LIST_PAGES, len(items)
        )
        return items if limit is None else items[:limit]

    def _same_origin(self, url: str) -> bool:
        target, base = httpx.URL(url), httpx.URL(self._base_url)
        return (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _json(self._request(method, path, **kwargs))

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; an answer other than 2xx is raised as :class:`WebexError`."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise WebexError(f"timeout: {type(exc).__name__}", maybe_done=isinstance(exc, NO_ANSWER)) from exc
        except httpx.TransportError as exc:
            raise WebexError(f"connection failed: {type(exc).__name__}", maybe_done=isinstance(exc, NO_ANSWER)) from exc
        status = response.status_code
        if status < 300:
            return response
        tracking_id = _tracking_id(response)
        if status < 400:  # the API never redirects: a proxy or gateway in the way, or a wrong base URL
            target = httpx.URL(response.headers.get("Location", ""))
            where = f" to {target.scheme}://{target.host}" if target.host else ""
            raise WebexError(
                f"{status} redirect{where}: Webex's API does not redirect (a proxy in the way, or CG_WEBEX__BASE_URL?)",
                status=status,
                tracking_id=tracking_id,
            )
        detail = _error_text(response)
        if status == 429:
            asked = parse_retry_after(response.headers.get("Retry-After"), 1.0, maximum_s=RETRY_AFTER_LIMIT_S)
            raise WebexError(
                f"429 rate limited: {detail}",
                status=status,
                retry_after=min(asked, RETRY_AFTER_MAX_S),
                asked_wait=asked,
                tracking_id=tracking_id,
            )
        retriable = status >= 500 or status in RETRIABLE_STATUS
        raise WebexError(
            f"{status} {detail}",
            status=status,
            retriable=retriable,
            retry_after=parse_retry_after(response.headers.get("Retry-After"), default=0.0) or None,
            tracking_id=tracking_id,
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    """A 2xx answer's JSON body (``{}`` when it has none)."""
    status = response.status_code
    if status == 204 or not response.content:
        return {}
    try:
        body: dict[str, Any] = response.json()
    except ValueError as exc:
        raise WebexError(f"{status} with a body that is not JSON", status=status) from exc
    return body


def _tracking_id(response: httpx.Response) -> str | None:
    """The answer's ``trackingId`` header (header names ignore case): Webex's id of the call, never anything of the
    request. Only a short run of printable ASCII without spaces is taken, as it goes into log lines; else None."""
    value = response.headers.get("trackingid", "").strip()
    if not value or len(value) > MAX_TRACKING_ID_CHARS or not all("!" <= c <= "~" for c in value):
        return None
    return value


def _error_text(response: httpx.Response) -> str:
    """Webex's own error message when it sent one (never the request, which may hold personal data)."""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])[:300]
    except ValueError:
        pass
    return response.reason_phrase or "error"
