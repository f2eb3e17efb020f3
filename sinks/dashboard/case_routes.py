"""The dashboard's case endpoints (the queue, a case, its images, the figures, a verdict) over the pure
functions of :mod:`sinks.dashboard.cases`.

- ``GET  /cases``                        the case queue page (filters: store, state, kind)
- ``GET  /cases/{case_id}``              the case page alert messages link to: the evidence side by side,
  the transaction, the notes and trail, the verdict buttons
- ``GET  /cases/{case_id}/images/{which}``  ``live`` (the alert's snapshot) or ``reference`` (the subject's
  enrolled image), downscaled; looked up by case id, the page never sees an image ref. Opened by its signed link
  (Webex cards, mail clients) it carries no ``Cross-Origin-Resource-Policy``; under the login it is same-origin
- ``GET  /api/cases``                    the queue as JSON (``store``, ``state`` (default ``undecided``), ``kind``)
- ``GET  /api/cases/figures``            open cases by age, time to verdict p50/p95, confirmed vs dismissed
  per kind and store (``store``, ``days``)
- ``GET  /api/cases/{case_id}``          one case, with its alert's transaction decision, and ``max_text``: the
  longest reason or note a verdict takes (the page's box keeps to it)
- ``POST /api/cases/{case_id}/verdict``  ``{"verb": "confirm"|"dismiss"|"escalate"|"assign"|"note",
  "text": ..., "fraud": bool, "request_id": ...}`` (``request_id``, required: the client's id of one submission,
  which makes the command id: sent twice, it is one command the case service applies once; without it, 400):
  published as a signed command in the logged-in person's name (202, with its ``command_id``), which the case service
  applies or refuses. One the case service would refuse as the indexed case stands (a verdict on a decided case,
  ``fraud`` on a case without a transaction) is answered 409 with the reason and not published
- ``GET  /api/cases/{case_id}/commands/{command_id}``  what the case service made of that verdict, read from
  ``audit`` (:mod:`sinks.dashboard.outcomes`): ``pending``, ``applied``, ``unchanged`` or ``refused`` with the reason
  in plain words; told only to the person who gave it (another's reads ``pending``), 503 while ``audit`` cannot be read

A verdict needs a personal login (HTTP Basic; the ``token`` login reads only) of a person on the allow-list
(``CG_WEBEX__ALLOWED_PEOPLE``, the same list the Webex bot and the case service use) and a JSON body (a
cross-site form cannot send one, so a page elsewhere cannot make a logged-in browser decide a case).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from opensearchpy.exceptions import TransportError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from infra.clients.commands import CommandPublishError, Headers, KafkaCommandPublisher, signed_headers
from infra.logs import person_tag
from infra.settings import Settings
from schemas.errors import InvalidRecord
from schemas.identifiers import check_case_id
from schemas.indices import index_name
from schemas.records import BotCommand
from sinks.dashboard.cases import (
    CASE_SOURCE,
    COMMAND_ID_RE,
    DEFAULT_QUEUE_STATE,
    IMAGE_KINDS,
    MAX_TEXT,
    QUEUE_STATES,
    REFUSAL_FIELDS,
    CaseFilter,
    case_by_id_query,
    case_figures,
    case_queue_query,
    figures_query,
    public_case,
    refused_now,
    shape_queue,
    verdict_command,
)
from sinks.dashboard.headers import IMAGE_HEADERS, LINKED_IMAGE_HEADERS
from sinks.dashboard.login import _secret, opened_by_link
from sinks.dashboard.outcome_reader import AuditOutcomes
from sinks.dashboard.outcomes import CommandOutcome, outcome_answer, outcome_for
from sinks.dashboard.queries import transaction_by_id_query

log = logging.getLogger(__name__)
MAX_FIGURE_DAYS = 366
MAX_BODY_BYTES = 4096
Publish = Callable[[BotCommand, Headers], None]


class Outcomes(Protocol):
    """Where the case page's command outcomes are read (:class:`~sinks.dashboard.outcome_reader.AuditOutcomes`)."""

    def get(self, command_id: str) -> CommandOutcome | None: ...

    def problem(self) -> str | None: ...


def _unavailable(exc: TransportError) -> JSONResponse:
    log.warning("OpenSearch query failed: %s %s", type(exc).__name__, getattr(exc, "status_code", ""))
    return JSONResponse({"error": f"OpenSearch unavailable ({type(exc).__name__})"}, status_code=503)


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status, headers={"Cache-Control": "no-store"})


NOT_A_CASE_ID = "no such case: a case id is case- and twelve hex digits (0-9, a-f), as the alert and its card name it"


def _is_case_id(case_id: str) -> bool:
    """Whether ``case_id`` has a case id's shape: one of any other (over-long, malformed) names no case and is not
    sent to OpenSearch, which may reject it, and the page would then say "OpenSearch unavailable" and ask again."""
    try:
        check_case_id(case_id)
    except InvalidRecord:
        return False
    return True


async def _small_body(request: Request) -> bytes | None:
    """The request body, or ``None`` once it is over :data:`MAX_BODY_BYTES`: by its ``Content-Length`` before
    reading any, or as it arrives, so a client sending without end is not held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > MAX_BODY_BYTES):
        return None
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            return None
    return bytes(raw)


class FirstVerdictPublisher:
    """The dashboard's command publisher: a Kafka producer made on the first verdict (a dashboard may never get one),
    closed by :meth:`close` at the stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._publisher: KafkaCommandPublisher | None = None
        self._lock = threading.Lock()

    def __call__(self, command: BotCommand, headers: Headers) -> None:
        with self._lock:  # one producer
            if self._publisher is None:
                self._publisher = KafkaCommandPublisher(self.settings)
            self._publisher(command, headers)

    def close(self, timeout_s: float) -> None:
        """Flush the producer, if one was made, for at most ``timeout_s``; a verdict under way goes first."""
        with self._lock:
            publisher, self._publisher = self._publisher, None
            if publisher is not None:
                publisher.close(timeout_s)


class CaseRoutes:
    """Case endpoints over a ``Dashboard`` (its OpenSearch search, image store, settings and clock).
    ``publish`` sends a command (default: a :class:`FirstVerdictPublisher`, its owner's to close); ``outcomes`` reads
    what became of one (default: an :class:`AuditOutcomes`, its owner's to close)."""

    def __init__(
        self,
        board: Any,
        page: Callable[[str], Response],
        publish: Publish | None = None,
        outcomes: Outcomes | None = None,
    ) -> None:
        self.board = board
        self.settings = board.settings
        self.index = index_name(self.settings.opensearch.index_prefix, "cases")
        self.page = page
        self._publish = publish if publish is not None else FirstVerdictPublisher(self.settings)
        self._publish_lock = threading.Lock()
        self.outcomes = outcomes if outcomes is not None else AuditOutcomes(self.settings)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/cases", lambda _: self.page("cases.html")),
            Route("/cases/{case_id:str}/images/{which:str}", self.image),
            Route("/cases/{case_id:str}", lambda _: self.page("case.html")),
            Route("/api/cases", self.queue),
            Route("/api/cases/figures", self.figures),
            Route("/api/cases/{case_id:str}/verdict", self.verdict, methods=["POST"]),
            Route("/api/cases/{case_id:str}/commands/{command_id:str}", self.outcome),
            Route("/api/cases/{case_id:str}", self.case),
        ]

    # ------------------------------------------------------------------ reads

    def find(self, case_id: str, fields: tuple[str, ...] = CASE_SOURCE) -> dict[str, Any] | None:
        hits = self.board.search(self.index, case_by_id_query(case_id, fields))["hits"]["hits"]
        return hits[0]["_source"] if hits else None

    def queue(self, request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or DEFAULT_QUEUE_STATE
        if state not in QUEUE_STATES:
            return _error(400, f"state is one of {', '.join(QUEUE_STATES)}")
        case_filter = CaseFilter(store=q.get("store") or None, state=state, kind=q.get("kind") or None)
        try:
            answer = self.board.search(self.index, case_queue_query(case_filter))
        except TransportError as exc:
            return _unavailable(exc)
        return JSONResponse(shape_queue(answer, self.settings.alerts), headers={"Cache-Control": "no-store"})

    def figures(self, request: Request) -> Response:
        try:
            days = min(max(int(request.query_params.get("days", 7)), 1), MAX_FIGURE_DAYS)
        except ValueError:
            return _error(400, "days is a whole number")
        now_ms = int(self.board.clock() * 1000)
        body = figures_query(request.query_params.get("store") or None, now_ms - days * 86_400_000)
        try:
            hits = self.board.search(self.index, body)["hits"]
        except TransportError as exc:
            return _unavailable(exc)
        sources = [h.get("_source") or {} for h in hits.get("hits", [])]
        total = hits.get("total") or {}
        truncated = isinstance(total, dict) and int(total.get("value", 0)) > len(sources)
        figures = case_figures(sources, now_ms, truncated=truncated)
        return JSONResponse({**figures, "days": days}, headers={"Cache-Control": "no-store"})

    def case(self, request: Request) -> Response:
        case_id = request.path_params["case_id"]
        if not _is_case_id(case_id):
            return _error(404, NOT_A_CASE_ID)
        try:
            source = self.find(case_id)
            if source is None:
                return _error(404, "no such case (yet)")
            transaction = None
            if source.get("transaction_id"):
                found = self.board.search(self.board.transactions, transaction_by_id_query(source["transaction_id"]))[
                    "hits"
                ]["hits"]
                transaction = found[0]["_source"] if found else None
        except TransportError as exc:
            return _unavailable(exc)
        return JSONResponse(
            {
                "case": public_case(source, self.settings.alerts),
                "transaction": transaction,
                "you": self.decider(request)[0],
                "max_text": MAX_TEXT,  # the reason / note box's limit: the page has it from here, not a copy
            },
            headers={"Cache-Control": "no-store"},
        )

    def image(self, request: Request) -> Response:
        case_id, which = request.path_params["case_id"], request.path_params["which"]
        field = IMAGE_KINDS.get(which)
        if field is None or not _is_case_id(case_id):
            return Response(status_code=404)
        try:
            source = self.find(case_id, (field,))
        except TransportError:
            return Response(status_code=503)
        ref = (source or {}).get(field)
        body = self.board.downscaled(f"case {case_id} ({which})", ref, large=True) if ref else None
        if body is None:
            return Response(status_code=404)
        key = _secret(self.settings.alerts.image_link_key)
        linked = opened_by_link(key, case_id, which, request.query_params, self.board.clock())
        return Response(body, media_type="image/jpeg", headers=LINKED_IMAGE_HEADERS if linked else IMAGE_HEADERS)

    # ------------------------------------------------------------------ the verdict

    @staticmethod
    def person(request: Request) -> str | None:
        """The personal login of this request (not the token's, nor an image link's), or None."""
        user = request.scope.get("user")
        name = getattr(user, "username", None) if getattr(user, "is_authenticated", False) else None
        scopes = getattr(request.scope.get("auth"), "scopes", ())
        if not name or name in ("token", "image-link") or "authenticated" not in scopes:
            return None
        return str(name)

    def decider(self, request: Request) -> tuple[str | None, str]:
        """Who may decide from this request: ``(person, "")``, or ``(None, why not)``."""
        name = self.person(request)
        if name is None:
            return None, (
                "a verdict needs a personal login (CG_DASHBOARD__USERS, or CG_DASHBOARD__USERNAME/PASSWORD): the case "
                "records who decided"
            )
        if not self.settings.webex.is_allowed(None, name):
            return None, f"{name} is not on the allow-list of people who decide cases (CG_WEBEX__ALLOWED_PEOPLE)"
        return name, ""

    async def verdict(self, request: Request) -> Response:
        person, why_not = self.decider(request)
        if person is None:
            return _error(403, why_not)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error(415, "send the verdict as application/json")
        raw = await _small_body(request)
        if raw is None:
            return _error(413, f"a verdict is at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is a JSON object")
        case_id = request.path_params["case_id"]
        key = self.settings.webex.command_signing_key
        signing_key = key.get_secret_value() if key else ""
        if not signing_key:
            return _error(
                503, "no command signing key (CG_WEBEX__COMMAND_SIGNING_KEY): the case service would refuse it"
            )
        try:
            check_case_id(case_id)
            command = verdict_command(
                case_id,
                str(body.get("verb", "")),
                person,
                int(self.board.clock() * 1000),
                text=body.get("text") if isinstance(body.get("text"), str) else None,
                fraud=body.get("fraud", False),
                unlisted_owner=self.settings.webex.unlisted_owner,
                request_id=body.get("request_id"),
            )
        except InvalidRecord as exc:
            return _error(400, str(exc))
        try:
            case = await run_in_threadpool(self.find, case_id, REFUSAL_FIELDS)
            if case is None:
                return _error(404, "no such case (yet)")
            refused = refused_now(case, command)
            if refused:  # the case service would refuse it, and say so only in the audit
                return _error(409, refused)
            await run_in_threadpool(self.publisher, command, signed_headers(command, signing_key))
        except TransportError as exc:
            return _unavailable(exc)
        except CommandPublishError as exc:
            return _error(503, f"the verdict was not recorded: {exc}")
        log.info(
            "%s %s by %s from the dashboard (command %s)", command.verb, case_id, person_tag(person), command.command_id
        )
        return JSONResponse({"command_id": command.command_id, "verb": command.verb.lower()}, status_code=202)

    def outcome(self, request: Request) -> Response:
        """What the case service made of one of this person's verdicts (see the module's list)."""
        case_id, command_id = request.path_params["case_id"], request.path_params["command_id"]
        if not _is_case_id(case_id) or COMMAND_ID_RE.fullmatch(command_id) is None:
            return _error(404, "no such verdict: a case page's command id is dashboard- and 32 hex digits")
        person = self.person(request)
        if person is None:
            return _error(403, "only the person who gave a verdict is told what became of it: log in as yourself")
        outcome = outcome_for(self.outcomes.get(command_id), person, case_id)
        problem = self.outcomes.problem()
        if outcome is None and problem is not None:
            return _error(503, f"the case service's answers cannot be read now: {problem}")
        case = None
        if outcome is not None:
            try:
                case = self.find(case_id, REFUSAL_FIELDS + ("store_id",))
            except TransportError as exc:  # the outcome still says the most: only who decided, and when, is left out
                log.warning("OpenSearch query failed: %s", type(exc).__name__)
        answer = outcome_answer(command_id, outcome, case, self.settings.alerts)
        return JSONResponse(answer, headers={"Cache-Control": "no-store"})

    def publisher(self, command: BotCommand, headers: Headers) -> None:
        with self._publish_lock:  # one verdict at a time
            self._publish(command, headers)
