"""A local Webex API server: the endpoints Checkout Guard uses, for tests and the offline demo.

Speaks the documented API (https://developer.webex.com/docs/api): bearer-token auth (401 otherwise),
``POST /messages`` as JSON (with an adaptive card in ``attachments``) or multipart/form-data with one ``files``
part, ``GET /messages?roomId=[&parentId=][&mentionedPeople=me]`` (newest first), ``GET /messages/{id}``,
``DELETE /messages/{id}`` (the bot's own), ``GET /people/me``, ``GET /people/{id}``,
``GET /attachment/actions/{id}``, ``POST/GET/DELETE /webhooks``, and the ``429 Retry-After`` behaviour. Lists are
paged as Webex pages them: ``max`` items (messages 50, webhooks 100 by default), then a ``Link`` ``rel="next"``. It
keeps what it received (messages and attached files) so tests can look, can be told to answer 429/500 or to be
slow for a while, and can play a person writing in a room (:func:`say`) or pressing a card's button
(:func:`press`): the message or attachment action is stored and every matching webhook (``messages`` /
``attachmentActions``, ``created``) gets a callback signed like Webex signs it (``X-Spark-Signature`` = hex
HMAC-SHA1 of the raw body keyed with the webhook secret).

In-process: ``with LocalWebexServer(token) as webex: ...`` (uvicorn in a thread; ``webex.state`` for the
test's eyes). As a process (the demo): ``python -m infra.local.webex --port 8089 --token T``; then the
control endpoints under ``/_local/`` (no auth, bound to 127.0.0.1) do the same over HTTP.

Every API caller is the bot: the server knows one token, the bot's (``GET /people/me``). So listing messages is
as Webex answers a bot: in a direct (1:1) room every message, in a group space only with ``mentionedPeople=me``
(the messages that mention the bot -- its own too when they mention it: ``<@personId:ID|name>`` in a posted
message's markdown fills its ``mentionedPeople``) and 403 without it, threads (``parentId``) alike. A room is
a group space (how a team gets alerts) unless declared direct (:meth:`WebexState.add_room`, ``say(...,
room_type="direct")``, or a message sent with ``toPersonEmail``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import typer
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infra.logs import LOG_LEVEL_HELP, UVICORN, setup_logging
from infra.settings import get_settings

MAX_MARKDOWN_BYTES = 7439
BOT_EMAIL = "checkout-guard@webex.bot"


def webex_id(kind: str) -> str:
    """An id shaped like Webex's: base64 of ``ciscospark://us/<KIND>/<uuid>``."""
    return base64.urlsafe_b64encode(f"ciscospark://us/{kind}/{uuid.uuid4()}".encode()).decode().rstrip("=")


def sign(body: bytes, secret: str) -> str:
    """What Webex puts in ``X-Spark-Signature``."""
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Fault:
    """Answer ``statuses`` in turn to API calls until ``until`` (monotonic) or until ``count`` runs out."""

    statuses: tuple[int, ...]
    until: float
    count: int | None
    retry_after: int
    _cycle: Any = None

    def next_status(self) -> int | None:
        if time.monotonic() > self.until or self.count == 0:
            return None
        if self.count is not None:
            self.count -= 1
        if self._cycle is None:
            self._cycle = itertools.cycle(self.statuses)
        return next(self._cycle)


@dataclass
class WebexState:
    """Everything the server knows; guarded by ``lock`` because tests read it from another thread."""

    token: str
    bot: dict[str, Any] = field(
        default_factory=lambda: {
            "id": webex_id("PEOPLE"),
            "emails": [BOT_EMAIL],
            "displayName": "Checkout Guard",
            "type": "bot",
        }
    )
    messages: list[dict[str, Any]] = field(default_factory=list)
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Attachment actions (card button presses) by id."""
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    """file id -> (filename, content type, bytes)."""
    webhooks: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    """Webhook callbacks made: target, status code (or error), message id."""
    requests: dict[str, int] = field(default_factory=dict)
    """Count of answers per status code, e.g. {"200": 10, "429": 3}."""
    rooms: dict[str, str] = field(default_factory=dict)
    """Room id -> ``direct`` or ``group``; a room not in it is a group space."""
    fault: Fault | None = None
    latency_s: float = 0.0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def add_room(self, room_id: str, room_type: str = "group") -> str:
        """Declare a room's type (``direct``: a 1:1 room with the bot); a room keeps the type it was first given,
        as in Webex. Returns the room's type."""
        if room_type not in ("direct", "group"):
            raise ValueError(f"a room is direct or group, not {room_type!r}")
        with self.lock:
            known = self.rooms.setdefault(room_id, room_type)
        if known != room_type:
            raise ValueError(f"room {room_id} is {known}, not {room_type}")
        return known

    def room_type(self, room_id: str) -> str:
        with self.lock:
            return self.rooms.get(room_id, "group")

    def bot_messages(self, room_id: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                m
                for m in self.messages
                if m["personId"] == self.bot["id"] and (room_id is None or m["roomId"] == room_id)
            ]

    def file_bytes(self, url: str) -> bytes:
        return self.files[url.rsplit("/", 1)[-1]][2]

    def fail(
        self,
        statuses: tuple[int, ...] = (429,),
        *,
        seconds: float = 3600.0,
        count: int | None = None,
        retry_after: int = 1,
    ) -> None:
        """Answer these statuses to API calls for ``seconds`` or ``count`` calls, whichever ends first."""
        with self.lock:
            self.fault = Fault(tuple(statuses), time.monotonic() + seconds, count, retry_after)

    def heal(self) -> None:
        with self.lock:
            self.fault = None


def _count(state: WebexState, status: int) -> None:
    with state.lock:
        state.requests[str(status)] = state.requests.get(str(status), 0) + 1


def _error(state: WebexState, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    _count(state, status)
    tracking_id = f"ROUTER_{uuid.uuid4()}"  # Webex sends its id of the call in the body and the trackingid header
    return JSONResponse(
        {"message": message, "errors": [{"description": message}], "trackingId": tracking_id},
        status_code=status,
        headers={**(headers or {}), "trackingid": tracking_id},
    )


def _public(message: dict[str, Any]) -> dict[str, Any]:
    """A stored message as the API shows it: without the ``_``-prefixed bookkeeping (raw file bytes)."""
    return {k: v for k, v in message.items() if not k.startswith("_")}


def _without_secret(hook: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hook.items() if k != "secret"}


def _message_problem(fields: dict[str, Any], files: list[tuple[str, str, bytes]]) -> str | None:
    """Why Webex would refuse this message (400), checked in the API's order; ``None`` if it is fine."""
    text, markdown = fields.get("text"), fields.get("markdown")
    if not fields.get("roomId") and not fields.get("toPersonEmail"):
        return "roomId or toPersonEmail is required"
    if len(files) > 1:
        return "Only one file may be attached per message"
    if not (text or markdown or files or fields.get("attachments")):
        return "text, markdown or files is required"
    attachments = fields.get("attachments")
    if attachments is not None:
        if files or fields.get("files"):
            return "A message may carry files or a card, not both"
        if not isinstance(attachments, list) or len(attachments) != 1 or not isinstance(attachments[0], dict):
            return "Only one card per message is supported"
        if attachments[0].get("contentType") != "application/vnd.microsoft.card.adaptive":
            return "attachments[0].contentType must be application/vnd.microsoft.card.adaptive"
        content = attachments[0].get("content")
        if not isinstance(content, dict) or content.get("type") != "AdaptiveCard":
            return "attachments[0].content must be an AdaptiveCard"
    if markdown and len(str(markdown).encode()) > MAX_MARKDOWN_BYTES:
        return f"Message exceeds the maximum length of {MAX_MARKDOWN_BYTES} bytes"
    return None


Handler = Callable[[Request], Awaitable[Response]]
MessageBody = tuple[dict[str, Any], list[tuple[str, str, bytes]]]
"""A posted message's fields and its attached files (filename, content type, bytes)."""


class _WebexApi:
    """The endpoints over one ``WebexState``; a class so each handler stays small and shares the state."""

    def __init__(self, state: WebexState, public_base: str) -> None:
        self.state = state
        self.public_base = public_base

    def routes(self) -> list[Route]:
        api = self._guarded
        return [
            Route("/v1/messages", api(self.post_message), methods=["POST"]),
            Route("/v1/messages", api(self.list_messages), methods=["GET"]),
            Route("/v1/messages/{id}", api(self.get_message), methods=["GET"]),
            Route("/v1/messages/{id}", api(self.delete_message), methods=["DELETE"]),
            Route("/v1/contents/{id}", api(self.get_content), methods=["GET"]),
            Route("/v1/people/me", api(self.people_me), methods=["GET"]),
            Route("/v1/people/{id}", api(self.get_person), methods=["GET"]),
            Route("/v1/attachment/actions/{id}", api(self.get_action), methods=["GET"]),
            Route("/v1/webhooks", api(self.webhooks), methods=["GET", "POST"]),
            Route("/v1/webhooks/{id}", api(self.delete_webhook), methods=["DELETE"]),
            Route("/_local/messages", self.control_messages, methods=["GET"]),
            Route("/_local/fault", self.control_fault, methods=["POST"]),
            Route("/_local/say", self.control_say, methods=["POST"]),
            Route("/_local/press", self.control_press, methods=["POST"]),
        ]

    def _guarded(self, handler: Handler) -> Handler:
        """Every API endpoint answers the guard's refusal first, as the real API does."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            if (denied := await self.guard(request)) is not None:
                return denied
            return await handler(request)

        return endpoint

    async def guard(self, request: Request) -> JSONResponse | None:
        """Latency, injected faults and the bearer token, in the order a real API applies them. The request is read
        whole first, as Webex has it once sent: a client that stops waiting during the latency still has its call
        done (a post is in the room), as at Webex, where before the server found the client gone and did nothing."""
        state = self.state
        await request.body()  # kept by the request for the handler
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        with state.lock:
            status = state.fault.next_status() if state.fault else None
            retry_after = state.fault.retry_after if state.fault else 0
        if status == 429:
            return _error(state, 429, "Too Many Requests", {"Retry-After": str(retry_after)})
        if status is not None:
            return _error(state, status, "Injected failure")
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return _error(state, 401, "The request requires a valid access token set in the Authorization header.")
        return None

    def ok(self, body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
        _count(self.state, status)
        return JSONResponse(body, status_code=status, headers=headers)

    def page(self, request: Request, items: list[dict[str, Any]], limit: int, **next_params: str) -> JSONResponse:
        """One page of a list, as Webex pages them (RFC 5988): at most ``limit`` items, and while more are left a
        ``Link: <url>; rel="next"`` to the rest (this request's URL with ``next_params``). A client reading only
        ``items`` of the first answer misses the rest, as it would at Webex."""
        if len(items) <= limit:
            return self.ok({"items": items})
        url = request.url.include_query_params(**next_params)
        return self.ok({"items": items[:limit]}, headers={"Link": f'<{url}>; rel="next"'})

    # --- the API ----------------------------------------------------------------------------

    async def post_message(self, request: Request) -> Response:
        parsed = await self._message_body(request)
        if isinstance(parsed, Response):
            return parsed
        fields, files = parsed
        if (problem := _message_problem(fields, files)) is not None:
            return _error(self.state, 400, problem)
        room_id, to_email = fields.get("roomId"), fields.get("toPersonEmail")
        text, markdown = fields.get("text"), fields.get("markdown")
        room = room_id or f"direct:{to_email}"
        message = _store_message(
            self.state,
            self.public_base,
            room_id=room,
            person=self.state.bot,
            text=text or _plain(markdown),
            markdown=markdown,
            files=files,
            room_type=self.state.add_room(room, "direct") if not room_id else self.state.room_type(room),
            mentioned=_mentions(markdown),
            extra={k: fields[k] for k in ("attachments", "parentId") if fields.get(k)},
        )
        return self.ok(_public(message))

    async def _message_body(self, request: Request) -> MessageBody | Response:
        """The fields and files of ``POST /messages``, JSON or multipart; a 400 answer if unreadable."""
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                return self._multipart_message(ctype, await request.body())
            fields = json.loads(await request.body())
            if not isinstance(fields, dict):
                raise ValueError("body is not an object")
            return fields, []
        except (ValueError, UnicodeDecodeError):
            return _error(self.state, 400, "The request could not be understood by the server due to malformed syntax.")

    def _multipart_message(self, ctype: str, body: bytes) -> MessageBody | Response:
        """Text parts are fields; file parts must be named ``files`` (raises ValueError if malformed)."""
        fields: dict[str, Any] = {}
        files: list[tuple[str, str, bytes]] = []
        for name, filename, part_type, value in parse_multipart(ctype, body):
            if filename is None:
                fields[name] = value.decode()
            elif name != "files":
                return _error(self.state, 400, f"unknown file field {name!r}")
            else:
                files.append((filename, part_type, value))
        return fields, files

    async def list_messages(self, request: Request) -> Response:
        room_id = request.query_params.get("roomId")
        if not room_id:
            return _error(self.state, 400, "roomId is required")
        try:
            limit = int(request.query_params.get("max", "50"))
        except ValueError:
            return _error(self.state, 400, "max must be a number")
        if limit < 1:
            return _error(self.state, 400, "max must be a positive number")
        parent = request.query_params.get("parentId")  # a thread's replies only, as Webex lists them
        before = request.query_params.get("beforeMessage")  # the next page: messages sent before this one
        state = self.state
        mentioned = request.query_params.get("mentionedPeople")
        if mentioned is not None and mentioned not in ("me", state.bot["id"]):
            return _error(state, 400, "mentionedPeople must be me (or the caller's own id)")
        if mentioned is None and state.room_type(room_id) == "group":  # the caller is the bot (one token)
            return _error(state, 403, "Bots must specify mentionedPeople=me to list messages in group rooms")
        with state.lock:
            newest_first = list(reversed(state.messages))
            if before is not None:
                at = next((i for i, m in enumerate(newest_first) if m["id"] == before), None)
                if at is None:
                    return _error(state, 404, "beforeMessage not found")
                newest_first = newest_first[at + 1 :]
            items = [
                _public(m)
                for m in newest_first
                if m["roomId"] == room_id
                and (parent is None or m.get("parentId") == parent)
                and (mentioned is None or state.bot["id"] in (m.get("mentionedPeople") or ()))
            ]
        return self.page(request, items, limit, beforeMessage=items[limit - 1]["id"] if len(items) > limit else "")

    async def get_message(self, request: Request) -> Response:
        with self.state.lock:
            found = next((m for m in self.state.messages if m["id"] == request.path_params["id"]), None)
        if found is None:
            return _error(self.state, 404, "Message not found")
        return self.ok(_public(found))

    async def delete_message(self, request: Request) -> Response:
        """As Webex: a bot deletes its own messages (403 for another's), and their files go with them."""
        state = self.state
        with state.lock:
            found = next((m for m in state.messages if m["id"] == request.path_params["id"]), None)
            if found is None:
                return _error(state, 404, "Message not found")
            if found["personId"] != state.bot["id"]:
                return _error(state, 403, "Only the sender or a moderator can delete a message")
            state.messages.remove(found)
            for url in found.get("files") or []:
                state.files.pop(url.rsplit("/", 1)[-1], None)
        _count(state, 204)
        return Response(status_code=204)

    async def get_content(self, request: Request) -> Response:
        entry = self.state.files.get(request.path_params["id"])
        if entry is None:
            return _error(self.state, 404, "Content not found")
        _count(self.state, 200)
        name, ctype, data = entry
        return Response(data, media_type=ctype, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def people_me(self, _: Request) -> Response:
        return self.ok(self.state.bot)

    async def get_person(self, request: Request) -> Response:
        """A person by id: ids made by :func:`person_id` carry the e-mail, so any person the server saw is known."""
        pid = request.path_params["id"]
        if pid == self.state.bot["id"]:
            return self.ok(self.state.bot)
        try:
            uri = base64.urlsafe_b64decode(pid + "=" * (-len(pid) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            uri = ""
        if not uri.startswith(PEOPLE_URI):
            return _error(self.state, 404, "Person not found")
        email = uri[len(PEOPLE_URI) :]
        return self.ok({"id": pid, "emails": [email], "displayName": email.split("@")[0], "type": "person"})

    async def get_action(self, request: Request) -> Response:
        with self.state.lock:
            action = self.state.actions.get(request.path_params["id"])
        if action is None:
            return _error(self.state, 404, "Attachment action not found")
        return self.ok(action)

    async def webhooks(self, request: Request) -> Response:
        if request.method == "GET":
            try:
                limit = int(request.query_params.get("max", "100"))
                start = int(request.query_params.get("cursor", "0"))
            except ValueError:
                return _error(self.state, 400, "max and cursor must be numbers")
            if limit < 1 or start < 0:
                return _error(self.state, 400, "max must be a positive number")
            with self.state.lock:
                items = [_without_secret(w) for w in self.state.webhooks][start:]
            return self.page(request, items, limit, cursor=str(start + limit))
        return await self.create_webhook(request)

    async def create_webhook(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            missing = [k for k in ("name", "targetUrl", "resource", "event") if not body.get(k)]
        except (ValueError, AttributeError):
            return _error(self.state, 400, "malformed JSON body")
        if missing:
            return _error(self.state, 400, f"missing {', '.join(missing)}")
        hook = {
            "id": webex_id("WEBHOOK"),
            "name": body["name"],
            "targetUrl": body["targetUrl"],
            "resource": body["resource"],
            "event": body["event"],
            "filter": body.get("filter"),
            "secret": body.get("secret"),
            "status": "active",
            "created": _now_iso(),
        }
        with self.state.lock:
            self.state.webhooks.append(hook)
        return self.ok(_without_secret(hook))

    async def delete_webhook(self, request: Request) -> Response:
        state = self.state
        with state.lock:
            before = len(state.webhooks)
            state.webhooks[:] = [w for w in state.webhooks if w["id"] != request.path_params["id"]]
            gone = before != len(state.webhooks)
        if not gone:
            return _error(state, 404, "Webhook not found")
        _count(state, 204)
        return Response(status_code=204)

    # --- control (the demo and other processes; tests in-process use ``state`` directly) ---------

    async def control_messages(self, _: Request) -> Response:
        with self.state.lock:
            return JSONResponse(
                {"items": [_public(m) | {"fileSizes": [len(f[2]) for f in m["_files"]]} for m in self.state.messages]}
            )

    async def control_fault(self, request: Request) -> Response:
        state = self.state
        body = json.loads(await request.body() or b"{}")
        if body.get("statuses"):
            state.fail(
                tuple(body["statuses"]),
                seconds=float(body.get("seconds", 3600)),
                count=body.get("count"),
                retry_after=int(body.get("retry_after", 1)),
            )
        else:
            state.heal()
        state.latency_s = float(body.get("latency_ms", state.latency_s * 1000)) / 1000
        return JSONResponse({"ok": True})

    async def control_say(self, request: Request) -> Response:
        body = json.loads(await request.body())
        try:
            delivered = await say(
                self.state,
                self.public_base,
                room_id=body["roomId"],
                person_email=body["personEmail"],
                text=body["text"],
                room_type=body.get("roomType"),
            )
        except ValueError as exc:  # a room type other than the room's
            return JSONResponse({"message": str(exc)}, status_code=400)
        return JSONResponse({"deliveries": delivered})

    async def control_press(self, request: Request) -> Response:
        body = json.loads(await request.body())
        delivered = await press(
            self.state, message_id=body["messageId"], person_email=body["personEmail"], inputs=body.get("inputs") or {}
        )
        return JSONResponse({"deliveries": delivered})


def build_app(state: WebexState, public_base: str = "") -> Starlette:
    """The ASGI app over ``state``; ``public_base`` is used for file URLs in messages."""
    return Starlette(routes=_WebexApi(state, public_base).routes())


_DISPOSITION_PARAM = re.compile(rb';\s*(name|filename)="([^"]*)"')


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str | None, str, bytes]]:
    """multipart/form-data (RFC 7578) -> (field name, file name or None, content type, bytes) per part."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError("multipart body without a boundary")
    delimiter = b"--" + match.group(1).encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("malformed multipart body")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not payload.endswith(b"\r\n"):
            raise ValueError("malformed multipart part")
        headers = {}
        for line in head.split(b"\r\n"):
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get(b"content-disposition", b"")
        params = {k.decode(): v.decode() for k, v in _DISPOSITION_PARAM.findall(disposition)}
        if "name" not in params:
            raise ValueError("multipart part without a name")
        part_type = headers.get(b"content-type", b"text/plain").decode().split(";")[0].strip()
        parts.append((params["name"], params.get("filename"), part_type, payload[:-2]))
    return parts


MENTION = re.compile(r"<@personId:([^|>]+)(?:\|[^>]*)?>")


def _mentions(markdown: str | None) -> list[str] | None:
    """The person ids a posted message's markdown mentions (``<@personId:ID|name>``), as Webex fills
    ``mentionedPeople``."""
    return list(dict.fromkeys(MENTION.findall(markdown or ""))) or None


def _plain(markdown: str | None) -> str:
    return (markdown or "").replace("**", "").replace("`", "")


PEOPLE_URI = "ciscospark://us/PEOPLE/"


def person_id(email: str) -> str:
    """A stable person id per e-mail, so a test can tell people apart (``GET /people/{id}`` reads it back)."""
    return base64.urlsafe_b64encode(f"{PEOPLE_URI}{email.lower()}".encode()).decode().rstrip("=")


def _store_message(
    state: WebexState,
    public_base: str,
    *,
    room_id: str,
    person: dict[str, Any],
    text: str | None,
    markdown: str | None,
    files: list[tuple[str, str, bytes]],
    room_type: str,
    mentioned: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        **(extra or {}),
        "id": webex_id("MESSAGE"),
        "roomId": room_id,
        "roomType": room_type,
        "text": text,
        "personId": person["id"],
        "personEmail": person["emails"][0],
        "created": _now_iso(),
        "_files": files,
    }
    if markdown:
        message["markdown"] = markdown
    if mentioned:
        message["mentionedPeople"] = mentioned
    urls = []
    for entry in files:
        fid = uuid.uuid4().hex
        state.files[fid] = entry
        urls.append(f"{public_base}/v1/contents/{fid}")
    if urls:
        message["files"] = urls
    with state.lock:
        state.rooms.setdefault(room_id, room_type)  # a room is what its first message made it
        state.messages.append(message)
    return message


async def say(
    state: WebexState,
    public_base: str,
    *,
    room_id: str,
    person_email: str,
    text: str,
    room_type: str | None = None,
) -> list[dict[str, Any]]:
    """A person writes ``text`` in a room: store it and call every webhook on ``messages/created`` whose
    filter (``roomId=...``) matches, signed with that webhook's secret. Returns the deliveries made.
    ``room_type`` declares the room's type (:meth:`WebexState.add_room`); by default it is the room's own."""
    room_type = state.add_room(room_id, room_type) if room_type else state.room_type(room_id)
    person: dict[str, Any] = {"id": person_id(person_email), "emails": [person_email]}
    mentioned = [state.bot["id"]] if text.startswith(state.bot["displayName"]) else None
    message = _store_message(
        state,
        public_base,
        room_id=room_id,
        person=person,
        text=text,
        markdown=None,
        files=[],
        room_type=room_type,
        mentioned=mentioned,
    )
    data = {
        "id": message["id"],
        "roomId": room_id,
        "roomType": room_type,
        "personId": person["id"],
        "personEmail": person_email,
        "created": message["created"],
    }
    if mentioned:
        data["mentionedPeople"] = mentioned
    return await _notify(state, "messages", room_id, person["id"], data)


async def press(
    state: WebexState, *, message_id: str, person_email: str, inputs: dict[str, Any]
) -> list[dict[str, Any]]:
    """A person presses a button of the card in message ``message_id`` (its ``Action.Submit`` data as
    ``inputs``): store the attachment action and call every ``attachmentActions/created`` webhook whose
    filter matches, signed like every callback. The callback carries the action's id only; its inputs are
    fetched with ``GET /attachment/actions/{id}``, as with Webex. Returns the deliveries made."""
    with state.lock:
        message = next((m for m in state.messages if m["id"] == message_id), None)
    if message is None or not message.get("attachments"):
        raise KeyError(f"no card message {message_id}")
    pid = person_id(person_email)
    action = {
        "id": webex_id("ATTACHMENT_ACTION"),
        "type": "submit",
        "messageId": message_id,
        "inputs": inputs,
        "personId": pid,
        "roomId": message["roomId"],
        "created": _now_iso(),
    }
    with state.lock:
        state.actions[action["id"]] = action
    data = {k: action[k] for k in ("id", "type", "messageId", "personId", "roomId", "created")}
    return await _notify(state, "attachmentActions", message["roomId"], pid, data)


async def _notify(
    state: WebexState, resource: str, room_id: str, actor_id: str, data: dict[str, Any]
) -> list[dict[str, Any]]:
    """Call every ``<resource>/created`` webhook whose filter matches ``room_id`` with ``data``, signed with
    the webhook's secret; record and return the deliveries (``message_id`` is the callback's ``data.id``)."""
    with state.lock:
        hooks = [
            w
            for w in state.webhooks
            if w["resource"] == resource
            and w["event"] == "created"
            and (not w.get("filter") or w["filter"] == f"roomId={room_id}")
        ]
    made = []
    async with httpx.AsyncClient(timeout=10) as client:
        for hook in hooks:
            body = json.dumps(
                {
                    "id": hook["id"],
                    "name": hook["name"],
                    "targetUrl": hook["targetUrl"],
                    "resource": resource,
                    "event": "created",
                    "filter": hook.get("filter"),
                    "orgId": "local",
                    "createdBy": state.bot["id"],
                    "appId": "local",
                    "ownedBy": "creator",
                    "status": "active",
                    "created": hook["created"],
                    "actorId": actor_id,
                    "data": data,
                }
            ).encode()
            headers = {"Content-Type": "application/json"}
            if hook.get("secret"):
                headers["X-Spark-Signature"] = sign(body, hook["secret"])
            try:
                r = await client.post(hook["targetUrl"], content=body, headers=headers)
                made.append({"target": hook["targetUrl"], "status": r.status_code, "message_id": data["id"]})
            except httpx.HTTPError as exc:
                made.append(
                    {"target": hook["targetUrl"], "status": None, "error": type(exc).__name__, "message_id": data["id"]}
                )
    with state.lock:
        state.deliveries += made
    return made


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Any ASGI app served by uvicorn on a thread of this process (tests, benchmarks)."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lifespan: Literal["auto", "on", "off"] = "off",
        name: str = "asgi",
    ) -> None:
        self.host, self.port = host, port or free_port(host)
        self.base = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=self.port, log_level="warning", access_log=False, lifespan=lifespan, **UVICORN
            )
        )
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


class LocalWebexServer(BackgroundServer):
    """The server on a thread of this process: ``url`` is the API base (``.../v1``), ``state`` what it saw."""

    def __init__(self, token: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = WebexState(token=token)
        port = port or free_port(host)
        self.app = build_app(self.state, f"http://{host}:{port}")
        super().__init__(self.app, host=host, port=port, name="local-webex")

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def start(self) -> LocalWebexServer:
        super().start()
        return self

    def say(self, room_id: str, person_email: str, text: str, room_type: str | None = None) -> list[dict[str, Any]]:
        """Play a person writing in a room (from any thread): webhooks are called, deliveries returned."""
        return asyncio.run(
            say(self.state, self.base, room_id=room_id, person_email=person_email, text=text, room_type=room_type)
        )

    def press(self, message_id: str, person_email: str, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Play a person pressing a card button (from any thread): webhooks are called, deliveries returned."""
        return asyncio.run(press(self.state, message_id=message_id, person_email=person_email, inputs=inputs))

    def __enter__(self) -> LocalWebexServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main(
    port: Annotated[
        int | None, typer.Option(help="Port on 127.0.0.1; defaults to CG_WEBEX__LOCAL_PORT (8089).")
    ] = None,
    token: Annotated[str, typer.Option(help="The bot token the server accepts.")] = "local-bot-token",
    latency_ms: Annotated[float, typer.Option(help="Added to every API answer.")] = 0.0,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    """Serve the local Webex API until interrupted."""
    settings = get_settings()
    setup_logging(settings, log_level, "webex-local")
    if port is None:
        port = settings.webex.local_port
    state = WebexState(token=token, latency_s=latency_ms / 1000)
    base = f"http://127.0.0.1:{port}"
    uvicorn.run(
        build_app(state, base),
        host="127.0.0.1",
        port=port,
        log_level=(log_level or "warning").lower(),  # the server's own lines: quiet unless asked for
        access_log=False,
        lifespan="off",
        **UVICORN,
    )


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(main)
