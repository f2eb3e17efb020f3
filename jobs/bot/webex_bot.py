"""The Webex bot: store staff talk to Checkout Guard from a Webex room.

Webex calls ``POST /webex/webhook`` for every new message in the bot's rooms, and for every press of a
case card's Confirm/Dismiss button (``attachmentActions``, a second webhook with the same URL and secret: a
press is fetched with ``GET /attachment/actions/{id}`` and its person with ``GET /people/{id}``, then handled
exactly like the typed ``confirm <case>`` / ``dismiss <case>``). The receiver:

1. verifies ``X-Spark-Signature`` (hex HMAC-SHA1 of the raw body, keyed with the webhook secret) in
   constant time: missing -> 401, wrong -> 403, nothing else happens; without a configured secret every
   callback is refused (403); after a rotation the previous secret is taken too, until
   :data:`PREVIOUS_SECRET_GRACE_S` after the webhooks were re-registered with the new one, and never longer than
   ``CG_WEBEX__PREVIOUS_WEBHOOK_SECRET_MAX_AGE_S`` after the start (a registration that keeps failing);
2. parses the callback (malformed, too deeply nested or over :data:`MAX_BODY_BYTES` -> 400/413, never
   5xx), ignores the bot's own messages and messages already handled (Webex may deliver twice), answers
   200 at once and does the rest in the background;
3. fetches the text (``GET /messages/{id}``; retried, then answered with an apology when Webex still fails),
   ignores one Webex says is older than ``CG_WEBEX__COMMAND_MAX_AGE_S`` (a replayed webhook), strips the
   mention, parses the command, and:
   ``checkout <tx>`` -> the face check for that transaction; ``fraud <tx>`` / ``vip <tx>`` -> enroll the face
   of that checkout as suspect / VIP; ``forget <subject>`` -> delete a watchlist entry; ``confirm <case>
   [fraud]``, ``dismiss <case> [reason]``, ``assign <case> <person>``, ``note <case> <text>``, ``escalate
   <case>`` -> a verdict or work on a case (the case service applies them); ``status`` -> the
   pipeline's health and counts; ``help``. Every command that reveals or changes watchlist data (all but
   ``help``, see :data:`RESTRICTED_VERBS`) is only accepted from allow-listed rooms or people; others get
   a short refusal (logged) and no command is produced; the answer to an allowed person in a group room that is
   not allowed (it names people or cases) goes to that person alone (:data:`REVEALING_VERBS`); in a room with a
   store scope (``CG_WEBEX__ROOM_STORES``) a command naming a transaction, subject or case runs only on that room's
   stores' (:data:`SCOPED_VERBS`), and ``status`` counts those stores alone;
4. puts every accepted command on ``commands`` (BotCommand, key = command_id = the Webex message id, so
   a redelivered message is the same command), signed with ``CG_WEBEX__COMMAND_SIGNING_KEY`` in the
   :data:`~infra.command_auth.SIGNATURE_HEADER` header (the watchlist service applies only
   signed, fresh commands from allow-listed issuers; without a key the bot refuses watchlist changes),
   and replies in the room; ``help`` from anyone else is answered, not recorded (it would be dead-lettered).

``checkout`` answers at once through ``inspect_checkout(tx_id) -> str`` (default: the recorded decision
and face result from OpenSearch), then follows up with ``fresh_checkout`` (default:
:class:`jobs.faces.checkout_inspect.CheckoutInspector`: the lane camera's snapshot at the transaction time,
analysed now and compared with the current watchlist).
On start, when ``CG_WEBEX__PUBLIC_URL`` is set, the bot registers (or re-points) its webhook.

Metrics (``infra.metrics``, stage ``webex-bot``, on their own port, not the webhook's): webhooks in by kind
(``accepted``, ``rejected_signature``, ``invalid``, ``ignored`` for a redelivery) and commands out by verb once
Kafka confirmed them. The bot has no loop to watch: ``/healthz`` stays 200, and ``/readyz`` says whether the bot can
work now: 503 while Kafka or Webex does not answer (:meth:`WebexBot.ready`: answered at once from the last look of
a background thread that looks every :data:`READY_RECHECK_S`, and at once after a command could not be recorded,
:class:`Readiness`), not whether the last command was.

Run: ``python -m jobs.bot.webex_bot`` (listens on ``CG_WEBEX__BOT_HOST``:``CG_WEBEX__BOT_PORT``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from infra import metrics, web_server
from infra.clients import kafka as kafka_clients
from infra.clients.commands import Headers, KafkaCommandPublisher, signed_headers
from infra.clients.webex import RETRY_AFTER_LIMIT_S, WebexClient, WebexError, asked_wait, with_retries
from infra.clock import now_ms
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.processes import done_by, exit_deadline
from infra.retry import call_with_retries
from infra.settings import Settings, get_settings
from jobs.cases.core import ESCALATED, PENDING, parse_case_command
from jobs.faces.checkout_inspect import FACE_MATCH_CAVEAT, Lookup
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import ID_RE, NAME_RE, check
from schemas.records import (
    CASE_VERBS,
    MAX_CASE_TEXT,
    OUTCOME_WORDS,
    REKOGNITION_MATCHER,
    BotCommand,
    WatchlistEntry,
    case_text,
    well_formed,
)
from schemas.similarity import CATEGORY_WORDS, category_words, similarity_text
from schemas.topics import WATCHLIST

log = logging.getLogger(__name__)

PROCESS = "webex-bot"
"""The ``stage`` label of this process's metrics (its name in ``infra.metrics.PROCESSES``)."""
WEBHOOK_PATH = "/webex/webhook"
WEBHOOK_NAME = "checkout-guard-bot"
CARD_WEBHOOK_NAME = "checkout-guard-bot-cards"
"""The second webhook: ``attachmentActions/created`` (a case card's Confirm/Dismiss pressed), same URL and secret."""
CARD_VERBS = frozenset({"confirm", "dismiss"})
"""What a card's ``Action.Submit`` may ask (``inputs.verb``), with ``inputs.case_id``."""
PREVIOUS_SECRET_GRACE_S = 600.0
"""How long callbacks signed with ``CG_WEBEX__PREVIOUS_WEBHOOK_SECRET`` are still taken after the webhooks were
re-registered with the new secret (from the start when the bot registers none): Webex signs what it sends, and
sends again, with the secret it had; after the rotation a callback with the old one is refused (403)."""
READY_RECHECK_S = 30.0
"""How often the bot looks at Kafka and Webex in the background for ``/readyz`` (one metadata request and one
``GET /people/me`` per look); a command that could not be recorded makes it look at once."""
READY_FIRST_WAIT_S = 0.5
"""How long a ``/readyz`` question waits for the first look (one that finishes quickly) before it hears ``not checked
yet``; once looked, every question is answered at once from the last look."""
KAFKA_PROBE_TIMEOUT_S = 3.0
MAX_BODY_BYTES = 64 * 1024
"""A Webex message webhook is well under 2 KB; anything much larger is not one."""
WATCHLIST_VERBS = frozenset({"FRAUD", "VIP", "FORGET", "RENEW"})
SIGNED_VERBS = WATCHLIST_VERBS | CASE_VERBS
"""Verbs that change something (the watchlist, a case): refused without a command signing key."""
DECIDING_VERBS = frozenset({"CONFIRM", "DISMISS", "ESCALATE"})
"""Case verbs a decided case refuses (it takes notes only)."""
RESTRICTED_VERBS = SIGNED_VERBS | {"CHECKOUT", "STATUS"}
"""Only for allow-listed rooms and people: the watchlist changes, ``checkout`` (subject ids, similarities
and a fresh camera snapshot on demand) and ``status`` (the loss-prevention system's health and volumes).
Anyone on Webex can write to a bot, so only ``help`` answers everyone."""
REVEALING_VERBS = RESTRICTED_VERBS
"""Their answers name people or cases (subject ids and similarities, the watchlist, a case and who decided it):
asked for in a group room that is not allowed (the sender is allowed by their e-mail), they go to the sender alone,
and the room reads :data:`DIRECT_NOTE`. A typed command and a card press alike."""
SCOPED_VERBS = RESTRICTED_VERBS - {"STATUS"}
"""Verbs naming one transaction, subject or case: in a room with a store scope (``CG_WEBEX__ROOM_STORES``) they run
only on that room's stores' (:meth:`WebexBot._out_of_scope`); ``status`` there counts its stores alone."""
SCOPE_REFUSAL = (
    "Sorry, this room sees only its own stores' checkouts, cases and watchlist entries, and I cannot tell that this "
    "one is theirs; nothing was done."
)
"""The same answer whether the item is another store's, unknown or cannot be looked up now: it tells nothing."""
DIRECT_NOTE = (
    "I sent you the answer directly: it names people or cases from the watchlist, and this room is not on the "
    "allow-list."
)
WATCHLIST_REFUSAL = (
    "Sorry, changes to the watchlist can only be made from the store security room or by "
    "people on the allow-list. Please ask your store security lead."
)
UNSIGNED_REFUSAL = "Sorry, watchlist changes are switched off here: no command signing key is configured."
CASE_UNSIGNED_REFUSAL = "Sorry, case verdicts and notes are switched off here: no command signing key is configured."
"""The same for a case verb: a guard who types ``confirm <case>`` must not read that the watchlist is off."""
UNREAD_APOLOGY = "Sorry, I could not read your message from Webex just now; nothing was done. Please send it again."
"""The answer when ``GET /messages/{id}`` fails after its retries (a timeout, 5xx, rate limits)."""
UNREAD_PRESS_APOLOGY = (
    "Sorry, I could not read your button press from Webex just now; nothing was done. Please press it again."
)
"""The same for a card press (``GET /attachment/actions/{id}`` or its person)."""
Handler = Callable[[dict[str, Any]], str | None]
"""Handles one webhook's ``data`` (a message or a card press); returns the reply sent."""
"""Kafka headers of a command (its signature)."""
VERBS_WITH_ARGUMENT = {
    "CHECKOUT": "transaction id",
    "FRAUD": "transaction id",
    "VIP": "transaction id",
    "FORGET": "subject id",
    "RENEW": "subject id",
}
ID_WRAPPING = "`'\"<>[]"
"""Quotes, and the brackets of the help text's ``<transaction>``, ``<case>``, ``<person>`` and ``[fraud]``: copied
around an id, an address or the word ``fraud``, not part of it (a reason or a note keeps them: they are its text)."""
HELP_TEXT = (
    "**Checkout Guard** understands:\n\n"
    "- `checkout <transaction>` - take the snapshot and compare the face now\n"
    "- `fraud <transaction>` - put the face from that checkout on the suspect watchlist\n"
    "- `vip <transaction>` - put the face from that checkout on the VIP list\n"
    "- `forget <subject>` - remove someone from the watchlist (e.g. `subj-<transaction>`)\n"
    "- `renew <subject>` - keep a watchlist entry for another period (entries expire unless renewed)\n"
    "- `confirm <case> [fraud]` - the alert was right (`fraud`: also label the transaction fraud)\n"
    "- `dismiss <case> [reason]` - the alert was wrong\n"
    "- `assign <case> <person>`, `note <case> <text>`, `escalate <case>` - work on a case\n"
    "- `status` - pipeline health and counts\n"
    "- `help` - this list\n\n"
    "`<...>` is yours to fill in and `[...]` may be left out; typed along, brackets or quotes around an id, a person "
    "or `fraud` are ignored (`confirm <case-1a2b3c4d5e6f> [fraud]` works), while a reason or a note is kept as "
    "written.\n\n"
    "All but `help` answer only in the store security room or to people on the allow-list."
)


# --------------------------------------------------------------------------- pure pieces


def verify_signature(body: bytes, signature: str | None, secret: str) -> bool:
    """True when ``signature`` is the hex HMAC-SHA1 of exactly these bytes under ``secret``."""
    if not signature or not secret:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.strip().lower().encode(errors="replace"))


@dataclass(frozen=True)
class ParsedCommand:
    verb: str | None
    """CHECKOUT | FRAUD | VIP | FORGET | STATUS | HELP, or None when the text is not a command."""
    argument: str | None = None
    problem: str | None = None
    """Why the command cannot run as written (missing or odd argument); the reply says it."""


def strip_mention(text: str, bot_names: tuple[str, ...]) -> str:
    """The text without the leading mention of the bot (group rooms prefix the bot's display name, or
    just its first word when people type ``@Checkout``)."""
    stripped = text.strip().lstrip("@").strip()
    for name in sorted((n for n in bot_names if n), key=len, reverse=True):
        if stripped.lower().startswith(name.lower()):
            rest = stripped[len(name) :]
            if not rest or not rest[0].isalnum():
                return rest.lstrip(" ,:").strip()
    return stripped


def strip_trailing_mention(text: str, bot_names: tuple[str, ...]) -> str:
    """The text without a mention of the bot at its end (``fraud tx-1 @Checkout Guard``), so that the mention is
    not read as a second argument; only a whole word after a space or ``@`` is a mention."""
    stripped = text.strip()
    for name in sorted((n for n in bot_names if n), key=len, reverse=True):
        if len(stripped) > len(name) and stripped.lower().endswith(name.lower()):
            before = stripped[-len(name) - 1]
            if before.isspace() or before == "@":
                return stripped[: -len(name)].rstrip(" ,:@").strip()
    return stripped


INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
"""Zero-width space, non-joiner and joiner, word joiner, BOM and soft hyphen: shown as nothing, pasted along with
ids (``tx-1\u200b``).
Removed before parsing, so the text is read as its sender sees it (bidi controls are not: they reorder what is
shown, and an id holding one is refused)."""


def parse_command(text: str, bot_names: tuple[str, ...] = ()) -> ParsedCommand:
    """``fraud tx-1`` -> ParsedCommand("FRAUD", "tx-1"); unknown words -> verb None.

    The mention is stripped first; when that leaves no command the text is read as it is, because the
    bot's short name can itself be a verb (``Checkout`` vs ``checkout tx-1``)."""
    text = well_formed(text).translate(INVISIBLE)  # a lone surrogate (from JSON) would fail the command's encoding
    parsed = _parse_text(strip_mention(text, bot_names), bot_names)
    if parsed.verb is None:
        parsed = _parse_text(text.strip().lstrip("@"), bot_names)
    return parsed


def _parse_text(text: str, bot_names: tuple[str, ...]) -> ParsedCommand:
    parsed = _parse_words(text.split(), text)
    # ``fraud tx-1 @Checkout``, ``confirm case-1 @Checkout``: the mention is no argument. Only where it made the
    # command wrong: in a note or a dismissal reason the bot's name may be a word of the text.
    if parsed.problem and (parsed.verb in VERBS_WITH_ARGUMENT or parsed.verb in CASE_VERBS):
        text = strip_trailing_mention(text, bot_names)
        return _parse_words(text.split(), text)
    return parsed


def _parse_words(words: list[str], text: str | None = None) -> ParsedCommand:
    """The command of ``words``; ``text``, the words as typed, gives a note or a dismissal reason its line breaks."""
    if not words:
        return ParsedCommand(None)
    verb = words[0].lower().rstrip(":").upper()
    if verb in CASE_VERBS:
        # ``confirm <case-…> [fraud]`` as the help text writes it, or the id in quotes: read as the case id, as the
        # watchlist commands read theirs (before: "that is not a case id"); so are ``assign``'s person and the word
        # ``fraud`` (before, ``[fraud]`` was answered "takes only the word `fraud`"); a word of brackets alone stays
        # as typed, and is refused
        ids = 3 if verb in ("ASSIGN", "CONFIRM") else 2
        parts = text.split(maxsplit=ids) if text is not None else [*words[:ids], " ".join(words[ids:])]
        head = [word.strip(ID_WRAPPING) or word for word in parts[1:ids] if word.strip()]
        rest = [part.strip() for part in parts[ids:] if part.strip()]  # as typed: its line breaks are kept
        try:  # what the case service accepts, answered here instead of becoming a dead letter there
            command = parse_case_command(verb, " ".join([*head, *rest]))
        except InvalidRecord as bad:
            return ParsedCommand(verb, problem=bad.reason if bad.kind != "invalid_id" else "that is not a case id")
        case_id = command.case_id
        kept = case_text(command.text or "", cut=False) if verb in ("NOTE", "DISMISS") else None
        if kept is not None and len(kept) > MAX_CASE_TEXT:  # the case service would keep its start only, unsaid
            what = "a note" if verb == "NOTE" else "a dismissal reason"
            return ParsedCommand(
                verb,
                problem=f"{what} keeps at most {MAX_CASE_TEXT} characters and this one has {len(kept)}; nothing was "
                "sent (shorten it, or write it as several notes)",
            )
        return ParsedCommand(verb, " ".join([case_id, *head[1:], *rest]))  # the case id as the case service reads it
    if verb not in {"CHECKOUT", "FRAUD", "VIP", "FORGET", "RENEW", "STATUS", "HELP"}:
        return ParsedCommand(None)
    if verb not in VERBS_WITH_ARGUMENT:
        return ParsedCommand(verb)
    if len(words) < 2:
        return ParsedCommand(verb, problem=f"`{verb.lower()}` needs a {VERBS_WITH_ARGUMENT[verb]}")
    if len(words) > 2:  # not the first id alone: the sender would believe the others were done too
        what = VERBS_WITH_ARGUMENT[verb]
        return ParsedCommand(verb, problem=f"`{verb.lower()}` takes one {what} at a time; nothing was sent")
    argument = words[1].strip(ID_WRAPPING)
    # The ids the watchlist service accepts (schemas.identifiers), the subject ``subj-<tx>`` included:
    # a path or an over-long id is answered here instead of becoming a dead letter there.
    subject = f"subj-{argument}" if verb in {"FRAUD", "VIP"} else argument
    if ID_RE.fullmatch(argument) is None or ID_RE.fullmatch(subject) is None:
        # Echoed as code only (anyone may get this answer): the sender's backtick must not end the span and
        # let the bot post their link or mention.
        shown = _code(argument[:40]) or "that"
        return ParsedCommand(verb, problem=f"{shown} does not look like a {VERBS_WITH_ARGUMENT[verb]}")
    return ParsedCommand(verb, argument)


class BadCallback(CheckoutGuardError, ValueError):
    """The body is not a Webex message webhook we can use (-> 400)."""


def parse_callback(body: bytes) -> dict[str, Any]:
    """The ``data`` of a ``messages/created`` webhook callback, checked for the fields we use."""
    resource, data = parse_any_callback(body)
    if resource != "messages":
        raise BadCallback("not a messages/created callback")
    return data


def parse_any_callback(body: bytes) -> tuple[str, dict[str, Any]]:
    """The resource (``messages`` or ``attachmentActions``) and ``data`` of a ``created`` webhook callback,
    checked for the fields we use."""
    try:
        payload = json.loads(body)
    except RecursionError as exc:  # deeply nested arrays/objects: the parser's recursion limit, not a 500
        raise BadCallback("body is nested too deeply") from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadCallback("body is not JSON") from exc
    if not isinstance(payload, dict):
        raise BadCallback("body is not a JSON object")
    resource = payload.get("resource")
    if resource not in ("messages", "attachmentActions") or payload.get("event") != "created":
        raise BadCallback("not a messages/created or attachmentActions/created callback")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise BadCallback("data missing")
    for name in ("id", "roomId", "personId"):
        if not isinstance(data.get(name), str) or not data[name] or len(data[name]) > 512:
            raise BadCallback(f"data.{name} missing or not a string")
    email = data.get("personEmail")
    if email is not None and (not isinstance(email, str) or len(email) > 320):
        raise BadCallback("data.personEmail is not a string")
    return str(resource), data


def webex_time_ms(value: Any) -> int | None:
    """Webex's ``created`` (ISO 8601, ``2026-12-06T19:56:42.123Z``) as epoch milliseconds; None when it is not
    a time with a zone."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return int(when.timestamp() * 1000) if when.tzinfo is not None else None
    except (ValueError, OverflowError, OSError):
        return None


# --------------------------------------------------------------------------- default collaborators


def recorded_checkout(lookup: Lookup) -> Callable[[str], str]:
    """``checkout <tx>`` from what the pipeline already knows: the transaction's face result, as
    ``lookup`` (the scored transaction by id, :func:`jobs.faces.checkout_inspect.opensearch_lookup`) finds it."""

    def inspect(tx_id: str) -> str:
        try:
            doc = lookup(tx_id)
        except Exception as exc:  # OpenSearch down: say so instead of failing the reply
            return f"I cannot read the decision on `{tx_id}` now ({type(exc).__name__})."
        if doc is None:
            return f"No decision on `{tx_id}` is stored yet."
        # the document is what the sink indexed from the topic: every value of it is shown as a stored value (_code)
        # unless it is a name or a word of ours, so none can end a code span, mention a room or fill the message
        face = doc.get("face_status") or "UNAVAILABLE"
        caveat = ""
        if face == "MATCHED":
            by = " by Rekognition" if doc.get("face_matcher") == REKOGNITION_MATCHER else ""
            category = str(doc.get("face_category") or "")
            who = f"**{category_words(category)}**" if category.upper() in CATEGORY_WORDS else _code(category)
            face_text = (
                f"face matches {who} {_code(doc.get('face_subject_id'))} "
                f"({similarity_text(doc.get('face_similarity') or 0)}% similar{by})"
            )
            caveat = f" {FACE_MATCH_CAVEAT}"
        else:
            face_text = {
                "NO_MATCH": "a face was seen, no watchlist match",
                "NO_FACE": "no usable face in the snapshot",
                "UNAVAILABLE": "no snapshot was available",
            }.get(face, _code(str(face).lower()))
        return (
            f"Transaction `{tx_id}` at store {_name(doc.get('store_id'))} lane {_name(doc.get('lane_id'))}: "
            f"{OUTCOME_WORDS.get(doc.get('outcome') or '', '?')} (risk {doc.get('risk_score')}); {face_text}.{caveat} "
            "Taking a fresh snapshot of that lane's camera now..."
        )

    return inspect


def _code(value: Any) -> str:
    """A stored value shown as it is: on one line, cut at 120 characters, in a code span (``jane_doe@x`` must not
    turn italic; a backtick or ``<`` could end the span or mention someone, so those go); empty when empty."""
    text = "".join(" " if c in "`<>" else c for c in " ".join(str(value or "").split()))[:120].strip()
    return f"`{text}`" if text else ""


def _name(value: Any) -> str:
    """A store or lane as a reply names it: as it is when it is a name (:data:`~schemas.identifiers.NAME_RE`), else as
    a stored value (:func:`_code`)."""
    return value if isinstance(value, str) and NAME_RE.fullmatch(value) else _code(value)


def _utc(ms: Any) -> str:
    """Epoch milliseconds as ``2026-12-06 00:15 UTC``; empty when not a time."""
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def pipeline_status_text(settings: Settings, stores: frozenset[str] | None = None) -> str:
    """Service health from ``infra.stack.status`` and document counts per outcome from OpenSearch; with ``stores``
    (a room's scope) the counts are those stores' alone and the watchlist is counted, its subjects not named."""
    from infra.clients.opensearch import make_client
    from infra.stack import status
    from schemas.indices import index_name

    lines = []
    try:
        st = status(settings)
        services = ", ".join(f"{name} {'up' if s['healthy'] else '**DOWN**'}" for name, s in st["services"].items())
        lines.append(f"**Pipeline {'healthy' if st['healthy'] else 'NOT healthy'}**: {services}")
    except Exception as exc:  # status is best effort: report what failed
        lines.append(f"Pipeline health unknown ({type(exc).__name__})")
    try:
        with contextlib.closing(make_client(settings.opensearch, timeout_s=5)) as client:
            prefix = settings.opensearch.index_prefix
            scope: dict[str, Any] = {} if stores is None else {"query": {"terms": {"store_id": sorted(stores)}}}
            res = client.search(
                index=index_name(prefix, "transactions"),
                body={"size": 0, "aggs": {"o": {"terms": {"field": "outcome"}}}, **scope},
            )
            counts = ", ".join(f"{b['key'].lower()} {b['doc_count']:,}" for b in res["aggregations"]["o"]["buckets"])
            alerts = client.count(index=index_name(prefix, "alerts"), body=scope or None)["count"]
        of = "" if stores is None else " of " + ", ".join(_code(store) for store in sorted(stores))
        lines.append(f"Transactions{of}: {counts or 'none yet'}; alerts: {alerts:,}")
    except Exception as exc:
        lines.append(f"Counts unavailable ({type(exc).__name__})")
    try:
        entries = read_watchlist(settings)
        lines.append(watchlist_text(entries, now_ms(), settings.faces.watchlist_expire_days, named=stores is None))
    except Exception as exc:
        lines.append(f"Watchlist unavailable ({type(exc).__name__})")
    return "\n\n".join(lines)


EXPIRY_SOON_DAYS = 30
"""``status`` lists the watchlist entries that expire within this many days (renew them or let them go)."""


def watchlist_text(entries: list[WatchlistEntry], at_ms: int, expire_days: float, named: bool = True) -> str:
    """The watchlist in one paragraph: entries per category and those expiring soon, soonest first; not ``named``
    (a room with a store scope: the watchlist is the chain's), only how many expire soon."""
    lifetime, soon = int(expire_days * 86_400_000), at_ms + EXPIRY_SOON_DAYS * 86_400_000
    by_category = Counter(e.category.lower() for e in entries)
    counts = ", ".join(f"{n} {category}" for category, n in sorted(by_category.items())) or "empty"
    expiring = sorted((e.expiry(lifetime), e.subject_id) for e in entries if e.expiry(lifetime) <= soon)
    text = f"Watchlist: {counts}"
    if expiring and not named:
        return text + f"; {len(expiring)} expiring within {EXPIRY_SOON_DAYS} days"
    if expiring:
        # each id as a stored value (_code): the topic's records are not the bot's own, and an id written as it came
        # could end its code span and mention a whole room (``<@all>``), or make the message too long to post
        listed = ", ".join(
            f"{_code(s) or '(no id)'} in {max(0, (t - at_ms) // 86_400_000)} d" for t, s in expiring[:10]
        )
        text += f"; expiring within {EXPIRY_SOON_DAYS} days (`renew <subject>` keeps one): {listed}"
    return text


def read_watchlist(settings: Settings) -> list[WatchlistEntry]:
    """The current watchlist from its compacted topic (the last record per subject; tombstones remove). A record that
    does not decode (a newer schema than this bot's, corrupt bytes) is left out with a WARNING naming its key, and the
    entry read before for that key stays, as the watchlist service reads the topic: raised, it stopped the read, and
    every ``status`` said "Watchlist unavailable" for as long as the topic kept that record (compaction keeps it)."""
    from infra.clients.control_topics import read_control_topics

    entries: dict[bytes, WatchlistEntry] = {}

    def apply(_topic: str, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            return
        if value is None:
            entries.pop(key, None)
            return
        try:
            entries[key] = WatchlistEntry.decode(value)
        except InvalidRecord as exc:  # DecodeError: its kind says why, never the bytes
            subject = key.decode(errors="replace")[:80]
            log.warning("watchlist record %s left out: it does not decode (%s)", subject, exc.kind)

    read_control_topics(settings, apply, timeout_s=5.0, specs=(WATCHLIST,))
    return list(entries.values())


# --------------------------------------------------------------------------- the bot


class Readiness:
    """``/readyz`` of the bot: whether Kafka and Webex answer (``check``), from the last look of a background thread
    that looks every ``recheck_s`` (a probe every few seconds must not cost a Webex call each) and at once after
    :meth:`look_again`. Asked inline, one question waited for Webex's timeout plus Kafka's probe timeout, and questions
    asked meanwhile queued behind it: a probe with a short timeout failed exactly when a dependency was slow.

    The thread starts with the first question (a bot no one asks does not call Webex for it); until its first look
    is done, a question waits at most ``first_wait_s`` for it, then hears ``not checked yet`` (503).
    :meth:`close` stops it.
    """

    def __init__(
        self,
        check: Callable[[], tuple[bool, str]],
        recheck_s: float = READY_RECHECK_S,
        first_wait_s: float = READY_FIRST_WAIT_S,
    ) -> None:
        self.check, self.recheck_s, self.first_wait_s = check, recheck_s, first_wait_s
        self._lock = threading.Lock()
        self._last: tuple[bool, str] | None = None
        self._looked = threading.Event()
        """Set once the first look is done."""
        self._wake = threading.Event()
        """Look now (:meth:`look_again`, :meth:`close`)."""
        self._closed = False
        self._thread: threading.Thread | None = None

    def __call__(self) -> tuple[bool, str]:
        with self._lock:  # held for no check: only to start the thread once
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="webex-bot-readiness", daemon=True)
                self._thread.start()
        if self._looked.wait(self.first_wait_s):
            last = self._last
            if last is not None:
                return last
        return False, "not checked yet"

    def look_again(self) -> None:
        """Look now, not at the next turn (a command could not be recorded: is Kafka away?); until that look is done,
        questions hear the last one. A look under way when asked is followed by another."""
        self._wake.set()

    def close(self) -> None:
        """Stop the thread: it looks no more (a look under way ends with its own timeouts; nothing waits for it)."""
        with self._lock:
            self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                result = self.check()
            except Exception as exc:  # noqa: BLE001 - a check that raises says "not ready"; the thread looks on
                result = (False, f"readiness check failed ({type(exc).__name__})")
            if self._closed:
                return
            self._last = result
            self._looked.set()
            self._wake.wait(self.recheck_s)


class KafkaProbe:
    """``/readyz``'s look at Kafka: a metadata request through one admin client, built at the first look and kept
    (its connections serve every look). :meth:`close` gives the client up: an admin client has no close of its own,
    so its queued log lines are handed over and the bot's reference dropped, which destroys it (it was kept, with its
    broker connections and threads, until the process ended); a look after that raises."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any = None
        self._closed = False
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            if self._closed:
                raise RuntimeError("the bot is closed: Kafka is not looked at")
            if self._admin is None:
                self._admin = kafka_clients.admin(self.settings)
            admin = self._admin  # a look under way keeps its client until it ends (its own timeout)
        return kafka_clients.cluster_metadata(admin, self.settings, timeout_s=KAFKA_PROBE_TIMEOUT_S)

    def close(self) -> None:
        with self._lock:
            admin, self._admin, self._closed = self._admin, None, True
        if admin is not None:
            admin.poll(0)


class WebexBot:
    """The webhook receiver and command handler; collaborators are injected so tests can use real local
    servers for Webex and Kafka and stand-alone functions for the answers.

    :meth:`close` (or ``with``) closes what the bot built itself (Webex client, Kafka publisher, Kafka probe,
    OpenSearch client, checkout inspector); injected collaborators stay their owner's to close."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: WebexClient | None = None,
        publish: Callable[[BotCommand, Headers], None] | None = None,
        inspect_checkout: Callable[[str], str] | None = None,
        fresh_checkout: Callable[[str], str] | None = None,
        status_text: Callable[[], str] | None = None,
        case_lookup: Lookup | None = None,
        kafka_probe: Callable[[], object] | None = None,
        transaction_lookup: Lookup | None = None,
        store_status_text: Callable[[frozenset[str]], str] | None = None,
    ) -> None:
        self.settings = settings
        self.case_lookup = case_lookup
        """The case by id as indexed (OpenSearch), to answer a verdict on a decided case at once; ``None``: none."""
        # The scored transaction by id as indexed, for its store in a room with a store scope; ``None``: none (such a
        # room then runs no command naming a transaction or subject).
        self.transaction_lookup = transaction_lookup
        self._owned: list[Any] = []
        """What the bot built itself and closes in :meth:`close`, in the order built."""
        if client is None:
            client = WebexClient.from_settings(settings.webex)
            self._owned.append(client)
        self.client = client
        if publish is None:
            publish = KafkaCommandPublisher(settings)
            self._owned.append(publish)
        self.publish = publish
        self.inspect_checkout: Callable[[str], str]
        self.fresh_checkout: Callable[[str], str] | None
        self.inspect_checkout, self.fresh_checkout = (
            (inspect_checkout, fresh_checkout)
            if inspect_checkout is not None
            else self._from_opensearch(fresh_checkout)
        )
        self.status_text = status_text or (lambda: pipeline_status_text(settings))
        # ``status`` in a room with a store scope: its stores' counts, the watchlist's subjects not named.
        self.store_status_text = store_status_text or (lambda stores: pipeline_status_text(settings, stores))
        secret, previous = settings.webex.webhook_secret, settings.webex.previous_webhook_secret
        self.secret = secret.get_secret_value() if secret else ""
        self.previous_secret = previous.get_secret_value() if previous and self.secret else ""
        """Verifies callbacks only, until :attr:`previous_until` (a rotation of the secret, :meth:`_signed_before`)."""
        self.previous_until = time.monotonic() + min(
            settings.webex.previous_webhook_secret_max_age_s,
            math.inf if settings.webex.public_url else PREVIOUS_SECRET_GRACE_S,
        )
        """``time.monotonic()`` after which the previous secret is refused: :data:`PREVIOUS_SECRET_GRACE_S` after the
        webhooks were registered, and never later than ``CG_WEBEX__PREVIOUS_WEBHOOK_SECRET_MAX_AGE_S`` after the
        start (a registration that keeps failing)."""
        key = settings.webex.command_signing_key
        self.signing_key = key.get_secret_value() if key else ""
        if not self.signing_key:
            log.error("CG_WEBEX__COMMAND_SIGNING_KEY is not set: fraud, vip and forget will be refused")
        self._me: dict[str, Any] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.handled = 0
        self.heartbeat = metrics.Heartbeat(stale_s=float("inf"))
        """Never stale (webhooks come when people write): ``/healthz`` stays 200; readiness is :meth:`ready`."""
        # ``/readyz``; kafka_probe raises while Kafka does not answer (default: a metadata request).
        if kafka_probe is None:
            kafka_probe = KafkaProbe(settings)
            self._owned.append(kafka_probe)
        self.kafka_probe = kafka_probe
        self.ready = Readiness(self.check_dependencies)
        self._webhooks = {
            kind: metrics.RECORDS_IN.labels(PROCESS, kind)
            for kind in ("accepted", "rejected_signature", "invalid", "ignored")
        }
        self.app = Starlette(
            routes=[
                Route(WEBHOOK_PATH, self.webhook, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    def _from_opensearch(
        self, fresh_checkout: Callable[[str], str] | None
    ) -> tuple[Callable[[str], str], Callable[[str], str]]:
        """The default ``checkout <tx>`` answers, reading OpenSearch: the recorded decision at once, then a follow-up
        from a fresh snapshot of that lane's camera at the transaction time (seconds: the camera API polls); both read
        the transaction through the same lookup, as do the store scope and (unless injected) :attr:`case_lookup`."""
        from infra.clients.opensearch import make_client
        from jobs.faces.checkout_inspect import CheckoutInspector, opensearch_lookup

        opensearch = make_client(self.settings.opensearch, timeout_s=5)
        self._owned.append(opensearch)
        lookup = opensearch_lookup(self.settings, opensearch)
        if self.transaction_lookup is None:
            self.transaction_lookup = lookup
        if self.case_lookup is None:
            self.case_lookup = opensearch_lookup(self.settings, opensearch, "cases")
        if fresh_checkout is None:
            fresh_checkout = CheckoutInspector(self.settings, lookup=lookup)
            self._owned.append(fresh_checkout)
        return recorded_checkout(lookup), fresh_checkout

    def close(self) -> None:
        """Stop the readiness thread, then close what the bot built (newest first); one failing to close does not
        keep the others open."""
        self.ready.close()
        owned, self._owned = self._owned, []
        with contextlib.ExitStack() as closing:
            for part in owned:
                closing.callback(part.close)

    def __enter__(self) -> WebexBot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    async def health(self, _: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "handled": self.handled})

    async def webhook(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_body(request)
        except ValueError as exc:
            self._webhooks["invalid"].inc()
            return JSONResponse({"error": str(exc)}, status_code=413)
        except ClientDisconnect:
            self._webhooks["invalid"].inc()
            return JSONResponse({"error": "client went away"}, status_code=400)
        if not self.secret:
            self._webhooks["rejected_signature"].inc()
            return JSONResponse({"error": "webhook secret not configured"}, status_code=403)
        signature = request.headers.get("x-spark-signature")
        if not signature:
            self._webhooks["rejected_signature"].inc()
            return JSONResponse({"error": "X-Spark-Signature missing"}, status_code=401)
        if not verify_signature(body, signature, self.secret) and not self._signed_before(body, signature):
            self._webhooks["rejected_signature"].inc()
            log.warning("webhook with a wrong signature refused")
            return JSONResponse({"error": "signature does not match"}, status_code=403)
        try:
            resource, data = parse_any_callback(body)
        except BadCallback as exc:
            self._webhooks["invalid"].inc()
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not self._first_time(data["id"]):
            self._webhooks["ignored"].inc()
            return JSONResponse({"ok": True, "ignored": "already handled"})
        self._webhooks["accepted"].inc()
        background = self._handle_action_safely if resource == "attachmentActions" else self._handle_safely
        return JSONResponse({"ok": True}, background=BackgroundTask(run_in_threadpool, background, data))

    def _signed_before(self, body: bytes, signature: str) -> bool:
        """True for a callback signed with the previous secret while it is still taken: Webex had the old secret until
        the webhooks were re-registered, and what it sent (or sends again) then is signed with it."""
        if not self.previous_secret or time.monotonic() >= self.previous_until:
            return False
        if not verify_signature(body, signature, self.previous_secret):
            return False
        log.info("webhook signed with the previous secret taken (CG_WEBEX__PREVIOUS_WEBHOOK_SECRET)")
        return True

    @staticmethod
    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ValueError("body too large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ValueError("body too large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _first_time(self, message_id: str) -> bool:
        with self._lock:
            if message_id in self._seen:
                return False
            self._seen[message_id] = None
            while len(self._seen) > 10_000:
                self._seen.popitem(last=False)
            return True

    # ------------------------------------------------------------------ commands

    def me(self) -> dict[str, Any]:
        if self._me is None:
            self._me = with_retries(self.client.me)
        return self._me

    def _handle_safely(self, data: dict[str, Any], handler: Handler | None = None) -> None:
        try:
            (handler or self.handle)(data)
        except Exception:  # one bad message must not take the receiver down; the id is enough to trace it
            log.exception("handling message %s failed", data.get("id"))
            with self._lock:
                self._seen.pop(data["id"], None)  # a redelivery may try again

    def handle(self, data: dict[str, Any]) -> str | None:
        """Handle one announced message; returns the reply sent (None when the message is ignored)."""
        me = self.me()
        if data["personId"] == me.get("id"):
            return None
        with self._apology_on_failure(data["roomId"], UNREAD_APOLOGY):
            message = with_retries(lambda: self.client.get_message(data["id"]))
        if message.get("personId") == me.get("id") or self._replayed(message, data["id"]):
            return None
        room_id = message.get("roomId") or data["roomId"]
        person = message.get("personEmail") or data.get("personEmail") or ""
        display = str(me.get("displayName") or "")
        names = (display, display.split(" ")[0], str(me.get("nickName") or ""))
        parsed = parse_command(message.get("text") or "", names)
        person_id = str(message.get("personId") or data["personId"])
        reply, accepted = self._execute(parsed, data["id"], room_id, person, person_id)
        direct = self._direct(parsed, room_id, message.get("roomType") or data.get("roomType"), person)
        self._reply(room_id, person, reply, direct)
        if direct:
            with_retries(lambda: self.client.send_message(room_id, DIRECT_NOTE), posts=True)
        self.handled += 1
        if accepted and parsed.verb == "CHECKOUT" and parsed.argument and self.fresh_checkout is not None:
            self._reply(room_id, person, self.fresh_checkout(parsed.argument), direct)
        return reply

    def _reply(self, room_id: str, person: str, text: str, direct: bool) -> None:
        if direct:
            with_retries(lambda: self.client.send_to_person(person, text), posts=True)
        else:
            with_retries(lambda: self.client.send_message(room_id, text), posts=True)

    def _direct(self, parsed: ParsedCommand, room_id: str, room_type: Any, person: str) -> bool:
        """True when the answer goes to the sender alone: an allow-listed person's command whose answer names people
        or cases (:data:`REVEALING_VERBS`: also a refusal such as "already confirmed by ...") in a room whose members
        may not all read it: a group room (or one Webex does not say is 1:1) that is not on the allow-list."""
        return (
            parsed.verb in REVEALING_VERBS
            and not parsed.problem
            and bool(person)
            and self.settings.webex.is_allowed(None, person)
            and room_type != "direct"
            and not self.settings.webex.is_allowed(room_id, None)
        )

    def _handle_action_safely(self, data: dict[str, Any]) -> None:
        self._handle_safely(data, self.handle_action)

    def handle_action(self, data: dict[str, Any]) -> str | None:
        """Handle one card button press: fetch the action (its inputs) and its person, then do what the same
        command typed in the room would do (the action id is the command id: a redelivery is the same)."""
        me = self.me()
        with self._apology_on_failure(data["roomId"], UNREAD_PRESS_APOLOGY):
            action = with_retries(lambda: self.client.get_attachment_action(data["id"]))
        person_id = str(action.get("personId") or data["personId"])
        if person_id == me.get("id") or self._replayed(action, data["id"]):
            return None
        room_id = str(action.get("roomId") or data["roomId"])
        with self._apology_on_failure(room_id, UNREAD_PRESS_APOLOGY):
            person = with_retries(lambda: self.client.get_person(person_id))
        emails = person.get("emails") or []
        email = str(emails[0]) if emails else ""
        raw_inputs = action.get("inputs")
        inputs = raw_inputs if isinstance(raw_inputs, dict) else {}
        verb, case_id = str(inputs.get("verb") or "").lower(), str(inputs.get("case_id") or "")
        try:  # one case id, nothing else: a doctored card must not smuggle words (``case-x fraud``) in
            check(case_id, "case_id")
        except InvalidRecord:
            verb = ""
        parsed = _parse_words([verb, case_id]) if verb in CARD_VERBS else ParsedCommand(None)
        reply, _accepted = self._execute(parsed, str(action.get("id") or data["id"]), room_id, email, person_id)
        direct = self._direct(parsed, room_id, None, email)  # a card sits in a group room (the alerts' room)
        self._reply(room_id, email, reply, direct)
        if direct:
            with_retries(lambda: self.client.send_message(room_id, DIRECT_NOTE), posts=True)
        self.handled += 1
        return reply

    @contextlib.contextmanager
    def _apology_on_failure(self, room_id: str, apology: str) -> Iterator[None]:
        """Webex took the message (or press) but will not give it to us after the retries: the sender must not
        wait for an answer. The error goes on to be logged; the apology is best effort (Webex may refuse it too)."""
        try:
            yield
        except WebexError:
            with contextlib.suppress(WebexError):
                with_retries(lambda: self.client.send_message(room_id, apology), posts=True)
            raise

    def _replayed(self, item: dict[str, Any], item_id: str) -> bool:
        """True when Webex says the message (or card press) was made longer than ``CG_WEBEX__COMMAND_MAX_AGE_S``
        ago, or gives no time: a webhook replayed after the bot forgot it (a restart), not one Webex just sent.
        Its command would be signed as new, so the services' age limit would not stop it."""
        created = webex_time_ms(item.get("created"))
        age_s = None if created is None else (now_ms() - created) / 1000
        if age_s is not None and age_s <= self.settings.webex.command_max_age_s:
            return False
        if age_s is None:
            log.warning("%s ignored: Webex gives no time it was made at", item_id)
        else:
            log.warning("%s ignored: made %.0f s ago, over CG_WEBEX__COMMAND_MAX_AGE_S (replayed?)", item_id, age_s)
        return True

    def _execute(
        self, parsed: ParsedCommand, message_id: str, room_id: str, person: str, person_id: str
    ) -> tuple[str, bool]:
        """The reply, and whether the command was accepted (recorded on ``commands``). ``person``: the sender's
        e-mail address, empty when Webex gives none; ``person_id``: their Webex id, the command's actor then (one
        "unknown" for every such person made two of them one person to the case service's double-press check)."""
        if parsed.verb is None:
            return "Sorry, I did not understand that.\n\n" + HELP_TEXT, False
        if parsed.problem:
            return f"Sorry, {parsed.problem}. Try `help`.", False
        refusal = (
            self._refusal(parsed.verb, message_id, room_id, person)
            or self._unlisted_owner(parsed)
            or self._out_of_scope(parsed, message_id, room_id)
            or self._decided_already(parsed)
        )
        if refusal:
            return refusal, False
        if parsed.verb not in RESTRICTED_VERBS and not self.settings.webex.is_allowed(room_id, person):
            # ``help`` answers everyone, but the watchlist service dead-letters a command from anyone off the
            # allow-list as ``unauthorized``: only an allow-listed issuer's is recorded.
            return self._answer(parsed, None), False
        command = BotCommand(
            command_id=message_id,
            issued_at=now_ms(),
            verb=parsed.verb,
            argument=parsed.argument,
            actor=person or person_id,
            room_id=room_id,
            source="webex",
        )
        headers = signed_headers(command, self.signing_key)
        try:
            self.publish(command, headers)
        except Exception as exc:  # Kafka unreachable: tell the person instead of going quiet
            log.error("command %s not published: %s", message_id, exc)
            self.ready.look_again()  # /readyz looks at Kafka now, not at this one command
            return "Sorry, I could not record that right now; please try again in a minute.", False
        metrics.RECORDS_OUT.labels(PROCESS, parsed.verb.lower()).inc()
        return self._answer(parsed, self.settings.webex.stores_of(room_id)), True

    def _refusal(self, verb: str, message_id: str, room_id: str, person: str) -> str | None:
        """Why this sender may not run ``verb`` here (the reply), or None when they may.

        The bot writes no audit events (the watchlist service audits changes, and the checkouts it records); a
        refusal is logged with the message id, so it can be traced in Webex, and nothing is published."""
        if verb not in RESTRICTED_VERBS:
            return None
        if not self.settings.webex.is_allowed(room_id, person):
            log.warning("%s refused: room or sender not on the allow-list (message %s)", verb, message_id)
            if verb in WATCHLIST_VERBS:
                return WATCHLIST_REFUSAL
            return f"Sorry, `{verb.lower()}` answers only in the store security room or to people on the allow-list."
        if verb in SIGNED_VERBS and not self.signing_key:
            log.error("%s refused: no command signing key configured (message %s)", verb, message_id)
            return UNSIGNED_REFUSAL if verb in WATCHLIST_VERBS else CASE_UNSIGNED_REFUSAL
        return None

    def _unlisted_owner(self, parsed: ParsedCommand) -> str | None:
        """The answer to an ``assign`` to someone off the allow-list (they could not act on the case; the case service
        refuses it), else None."""
        if parsed.verb != "ASSIGN":
            return None
        person = (parsed.argument or "").split()[-1]
        why = self.settings.webex.unlisted_owner(person)
        return f"Sorry, {why}; nothing was sent." if why else None

    def _out_of_scope(self, parsed: ParsedCommand, message_id: str, room_id: str) -> str | None:
        """:data:`SCOPE_REFUSAL` when ``room_id`` has a store scope and the transaction, subject or case named is not
        one of its stores' as indexed (another store's, not indexed yet, or OpenSearch away: not known to be theirs),
        else None. Asked before anything about the item is looked up for the answer."""
        stores = self.settings.webex.stores_of(room_id)
        if stores is None or parsed.verb not in SCOPED_VERBS:
            return None
        store = self._store_of(parsed)
        if store in stores:
            return None
        log.warning("%s refused: not one of the stores of room %s (message %s)", parsed.verb, room_id, message_id)
        return SCOPE_REFUSAL

    def _store_of(self, parsed: ParsedCommand) -> str | None:
        """The store of the case, transaction or subject (``subj-<transaction>``: the checkout it was enrolled from)
        named, as indexed; None when not known."""
        argument = (parsed.argument or "").split()
        item = argument[0] if argument else ""
        lookup = self.case_lookup if parsed.verb in CASE_VERBS else self.transaction_lookup
        if parsed.verb in {"FORGET", "RENEW"}:
            item = item.removeprefix("subj-") if item.startswith("subj-") else ""
        if not item or lookup is None:
            return None
        try:
            doc = lookup(item)
        except Exception as exc:  # noqa: BLE001 - OpenSearch away: not known to be this room's, refused
            log.warning("%s not looked up for its store (%s)", item, type(exc).__name__)
            return None
        store = (doc or {}).get("store_id")
        return store if isinstance(store, str) else None

    def _decided_already(self, parsed: ParsedCommand) -> str | None:
        """The answer to a verdict, escalation or assignment on a case that is decided already, or to ``confirm
        <case> fraud`` on a case without a transaction (the case service would refuse either, saying so only in the
        audit: the sender read "Sent"), from the indexed case; ``None`` (send it) when the case is undecided, not
        indexed yet or cannot be read now. A note is taken in any state."""
        if parsed.verb not in CASE_VERBS or parsed.verb == "NOTE" or self.case_lookup is None:
            return None
        case_id = (parsed.argument or "").split()[0]
        try:
            case = self.case_lookup(case_id)
        except Exception as exc:  # noqa: BLE001 - OpenSearch away: the case service still checks the command
            log.warning("case %s not looked up before %s (%s)", case_id, parsed.verb, type(exc).__name__)
            return None
        state = str((case or {}).get("state") or "")
        fraud = parsed.verb == "CONFIRM" and [w.lower() for w in (parsed.argument or "").split()[1:]] == ["fraud"]
        if case and state in PENDING and fraud and not case.get("transaction_id"):
            return (
                f"Case `{case_id}` has no transaction to label as fraud: nothing was sent. "
                f"`confirm {case_id}` confirms it without a label."
            )
        if not case or state in PENDING and not (parsed.verb == "ESCALATE" and state == ESCALATED):
            return None
        by, when = _code(case.get("decided_by")), _utc(case.get("decided_at"))  # an escalation keeps neither
        done = f"already {_code(state)}" + (f" by {by}" if by else "") + (f" at {when}" if when else "")
        return f"Case `{case_id}` is {done}: nothing was sent. Add a `note` to it if you see it differently."

    def _answer(self, parsed: ParsedCommand, stores: frozenset[str] | None) -> str:
        """The reply to an accepted command (``stores``: the room's store scope, None for every store)."""
        arg = parsed.argument
        if parsed.verb == "HELP":
            return HELP_TEXT
        if parsed.verb == "STATUS":
            return self.status_text() if stores is None else self.store_status_text(stores)
        if parsed.verb == "CHECKOUT":
            return self.inspect_checkout(arg or "")
        if parsed.verb == "FRAUD":
            return (
                f"Noted: the face from checkout `{arg}` goes on the **suspect** watchlist as `subj-{arg}`. "
                "I will post here when that person is seen again."
            )
        if parsed.verb == "VIP":
            return f"Noted: the face from checkout `{arg}` goes on the **VIP** list as `subj-{arg}`."
        if parsed.verb == "RENEW":
            return f"Noted: `{arg}` stays on the watchlist for another period (the audit records who renewed it)."
        if parsed.verb in CASE_VERBS:
            case_id = (arg or "").split()[0]
            if parsed.verb in DECIDING_VERBS:  # the case service decides: a case decided already keeps its verdict
                return (
                    f"Sent: {parsed.verb.lower()} case `{case_id}`. It counts only if the case is still undecided; "
                    "the case page shows its verdict and who gave it."
                )
            return f"Sent: {parsed.verb.lower()} for case `{case_id}`. The case page shows it once recorded."
        return f"Noted: `{arg}` will be removed from the watchlist and its reference images deleted."

    # ------------------------------------------------------------------ readiness

    def check_dependencies(self) -> tuple[bool, str]:
        """Ask Kafka (metadata) and Webex (``GET /people/me``) once each: ready, or what does not answer. A 429 is
        Webex answering: the bot's replies wait it out."""
        problems = []
        try:
            self.kafka_probe()
        except Exception as exc:  # noqa: BLE001 - whatever Kafka raises, commands cannot be recorded now
            problems.append(f"Kafka unreachable ({type(exc).__name__})")
        try:
            self.client.me()
        except WebexError as exc:
            if exc.status != 429:
                problems.append(f"Webex {'unreachable' if exc.unavailable else 'refuses the bot'} ({exc.reason})")
        return (False, "; ".join(problems)) if problems else (True, "ok")

    # ------------------------------------------------------------------ webhook registration

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=self.register_webhook, name="webhook-registration", daemon=True).start()
        yield

    def register_webhook(self) -> dict[str, Any] | None:
        """Create our webhook at the public URL, or re-point an old one; no public URL -> nothing to do."""
        public = self.settings.webex.public_url
        if not public:
            log.info("no public URL configured (CG_WEBEX__PUBLIC_URL): webhook not registered")
            return None
        if not self.secret:
            log.error("a public URL without a webhook secret: refusing to register an unsigned webhook")
            return None
        target = public.rstrip("/") + WEBHOOK_PATH
        tries = 5

        def register() -> dict[str, Any]:
            for old in self.client.list_webhooks():
                if old.get("name") in (WEBHOOK_NAME, CARD_WEBHOOK_NAME):  # re-create: the URL or secret may differ
                    self.client.delete_webhook(old["id"])
            hook = self.client.create_webhook(WEBHOOK_NAME, target, self.secret)
            self.client.create_webhook(CARD_WEBHOOK_NAME, target, self.secret, resource="attachmentActions")
            return hook

        def failed(exc: BaseException, attempt: int, delay: float | None = None) -> None:
            again = "" if delay is None else f"; trying again in {delay:.1f} s"
            log.warning(
                "webhook registration failed (%s), try %d of %d%s", getattr(exc, "reason", exc), attempt, tries, again
            )

        try:  # every Webex error is worth another try here (the bot cannot work without its webhook)
            hook = call_with_retries(
                register,
                retriable=lambda exc: isinstance(exc, WebexError),
                attempts=tries,
                retry_after=asked_wait,  # a 429's, up to RETRY_AFTER_LIMIT_S: sooner only meets it again
                wait=lambda n: min(30.0, 2.0**n),
                maximum_s=RETRY_AFTER_LIMIT_S,
                before_sleep=failed,
            )
        except WebexError as exc:
            failed(exc, tries)
            return None
        log.info("webhook %s registered for %s", hook.get("id"), target)
        self.previous_until = min(self.previous_until, time.monotonic() + PREVIOUS_SECRET_GRACE_S)
        if self.previous_secret:
            log.info(
                "callbacks signed with the previous webhook secret are taken %.0f s more",
                max(0.0, self.previous_until - time.monotonic()),
            )
        return hook


def main(log_level: str | None = None) -> None:
    """Serve the webhook receiver until interrupted."""
    settings = get_settings()
    setup_logging(settings, log_level, "bot")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop_timeout_s = settings.supervisor.stop_timeout_s
    bot = WebexBot(settings)
    deadline: float | None = None
    try:
        endpoint = metrics.serve(settings, PROCESS, health=bot.heartbeat, ready=bot.ready)
        try:
            # until SIGTERM; the commands still being handled are given up 2 s before the supervisor's SIGKILL
            deadline = web_server.serve(
                bot.app,
                host=settings.webex.bot_host,
                port=settings.webex.bot_port,
                stop_timeout_s=stop_timeout_s,
                name=PROCESS,
                log_level="warning",
                access_log=False,
            )
        finally:
            endpoint.close()
    finally:
        # its Webex, Kafka, OpenSearch and camera clients, by 1 s before the SIGKILL: the Kafka publisher's flush
        # waited 5 s, and a client's close as long as it took, after the server's stop had taken its time
        if not done_by(bot.close, deadline or exit_deadline(stop_timeout_s), "webex-bot-close"):
            log.warning(
                "webex bot: its clients (Kafka, Webex, OpenSearch, cameras) were not closed before the supervisor's "
                "stop timeout; given up (the bot answers a command as sent only once Kafka confirmed it)"
            )


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Serve the bot's Webex webhook (CG_WEBEX__BOT_HOST:BOT_PORT) until interrupted; registers the webhook
    at CG_WEBEX__PUBLIC_URL when set."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
