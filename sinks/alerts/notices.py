"""Webex replies to case verdicts the case service refused after the bot had taken them.

The bot answers a verdict given in Webex (typed, or a case card's button) "Sent" once Kafka has it; the case service
decides it later and may refuse it: another person decided the case first, it expired, retention removed it or its
alert never came (``unknown_case``), the verdict reached the service too late (it was down longer than
``CG_WEBEX__COMMAND_MAX_AGE_S``) or the service's allow-list is not the bot's. Before, only the audit and the dead
letters knew: the person believed their verdict counted. The service now names the Webex room and person in the
refusal's audit event (:func:`schemas.records.webex_reply_details`, for a command the bot signed only), and the alert
sender, whose eraser reads ``audit`` already (sinks/alerts/erase.py), tells them:

- the eraser records each such refusal in the ledger (:func:`refusal_notice`; one row per audit id, ``INSERT OR
  IGNORE``, before its offset is committed), so an event read again (a redelivery, a restart from the last commit)
  makes no second reply;
- :class:`Notifier`, a thread of its own, posts the ledger's pending replies: to the room, mentioning the person, or,
  where the room is not on the allow-list, to the person alone (as the bot's answer went, :func:`address`). A post is
  marked ``sending`` first and one Webex may have made without answering (a read timeout, a dropped connection) is
  not posted again, as the bot's own replies are not: delivered once at most, never twice. A 429 waits on the bot's
  rate limit (shared with the alert channels and the eraser), Webex down waits :data:`RETRY_PAUSE_S`; a reply Webex
  refuses for good (the bot left the room) is given up, and the others go on; one not posted within
  ``CG_ALERTS__DEADLINE_S`` of its refusal is given up too (and a refusal that old, read again after an offset reset,
  makes none). Neither waits on the alerts' sends or the eraser's sweeps, nor they on it.

A reply names the verb, the case and the service's reason (one line, cut at :data:`MAX_REASON_CHARS`): never an image,
an embedding or a secret.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from infra import metrics
from infra.clients.webex import WebexClient, WebexError, asked_wait
from infra.settings import Settings, WebexSettings
from schemas.records import CASE_VERBS, WEBEX_REPLY_PERSON, WEBEX_REPLY_ROOM
from sinks.alerts.erase import LedgerClosed

log = logging.getLogger(__name__)

STAGE = "alert-sender"
CASE_AUDIT_PREFIX = "case"
"""The case service's audit ids (``case:<command id>``, ``case-refused:<offset>``): only its refusals are replied to."""
MAX_REASON_CHARS = 300
MAX_PER_ROUND = 50
"""Replies posted per round at most; the rest in the next round (a second later)."""
ROUND_S = 1.0
"""How often the notifier looks for pending replies when nothing wakes it."""
RETRY_PAUSE_S = 30.0
"""How long the replies wait after Webex did not take one for a reason that heals (no connection, 5xx)."""
HINTS = {
    "illegal_transition": "The case page shows its verdict and who gave it; add a `note` if you see it differently.",
    "unknown_case": "The case service holds no such case (removed after its retention, or its alert never came).",
    "unauthorized": "Give it again if it should still count.",
}
"""What the person can do, by the refusal's kind."""
PENDING, SENDING, SENT, UNKNOWN, FAILED, EXPIRED = "pending", "sending", "sent", "unknown", "failed", "expired"
"""A reply's states in the ledger: ``sending`` (the post under way, or a crash in it: not posted again) and
``unknown`` (no answer: Webex may have posted it) are never posted again."""


@dataclass(frozen=True)
class Notice:
    """A reply owed to a person whose Webex verdict the case service refused (one per refusal: its audit id)."""

    notice_id: str
    room_id: str
    person: str
    """Their e-mail address, or their Webex person id when Webex gave no address (the command's actor)."""
    text: str
    """The markdown, without whom it is addressed to (:func:`markdown` adds the mention in a room)."""
    at_ms: int
    """When the service refused it."""


def _plain(value: Any, limit: int) -> str:
    """``value`` on one line, cut at ``limit`` characters, without what could end a code span or mention someone."""
    text = "".join(" " if c in "`<>|" else c for c in " ".join(str(value or "").split()))
    return text[:limit].rstrip() + (" (cut)" if len(text) > limit else "")


def refusal_notice(event: Mapping[str, Any], now_ms: int, fresh_ms: int) -> Notice | None:
    """The reply owed for an audit event, if it is the case service's refusal of a verdict given in Webex (``FAILED``,
    with the room and person) made within ``fresh_ms`` of ``now_ms``; else None. Pure."""
    details = event.get("details") or {}
    room, person = details.get(WEBEX_REPLY_ROOM), details.get(WEBEX_REPLY_PERSON)
    verb, audit_id = str(event.get("action") or ""), str(event.get("audit_id") or "")
    if event.get("outcome") != "FAILED" or verb not in CASE_VERBS or not audit_id.startswith(CASE_AUDIT_PREFIX):
        return None
    at = event.get("event_time")
    if not room or not person or not isinstance(at, int) or now_ms - at > fresh_ms:
        return None
    kind, _, reason = str(event.get("reason") or "").partition(": ")
    return Notice(audit_id, str(room), str(person), notice_text(verb, details.get("case_id"), kind, reason), at)


def notice_text(verb: str, case_id: str | None, kind: str, reason: str) -> str:
    """``Your `dismiss` of case `case-…` was not recorded: <why>. <what to do>`` (markdown). Pure."""
    of_case = f" of case `{_plain(case_id, 64)}`" if case_id else ""
    why = _plain(reason, MAX_REASON_CHARS) or _plain(kind, 64) or "refused"
    if kind == "unauthorized":
        why = f"the case service refused it ({why})"
    hint = HINTS.get(kind, "")
    return f"your `{verb.lower()}`{of_case} was **not recorded**: {why}. {hint}".rstrip()


def address(notice: Notice, webex: WebexSettings) -> tuple[str, str] | None:
    """Where the reply goes, as the bot's answer went: ``("room", room id)`` for a room on the allow-list,
    ``("person", e-mail)`` for an allowed person writing from another room (the reply names a case: it goes to them
    alone, in their 1:1 room with the bot); None when neither is allowed any more. Pure."""
    if webex.is_allowed(notice.room_id, None):
        return "room", notice.room_id
    if "@" in notice.person and webex.is_allowed(None, notice.person):
        return "person", notice.person
    return None


def markdown(notice: Notice, to: str) -> str:
    """The reply's markdown: in a room it mentions the person (``<@personEmail:…>``, or ``<@personId:…>`` for one
    Webex gave no address for), so they are notified; to the person alone it needs no name. Pure."""
    if to == "person":
        return f"Sorry, {notice.text}"
    who = _plain(notice.person, 254).replace(" ", "")
    kind = "personEmail" if "@" in who else "personId"
    return f"Sorry <@{kind}:{who}|{who}>, {notice.text}"


class RateLimited(Protocol):
    """The bot's shared rate limit (:class:`sinks.alerts.sender.RateLimit`)."""

    def remaining(self) -> float: ...

    def pause_for(self, seconds: float) -> None: ...


class Notifier:
    """Posts the ledger's pending replies (see the module); ``run`` is its thread's loop."""

    def __init__(
        self,
        settings: Settings,
        ledger: Any,
        client: WebexClient,
        rate_limit: RateLimited,
        *,
        now_ms: Callable[[], int] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.ledger, self.client, self.rate_limit = settings, ledger, client, rate_limit
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.monotonic = monotonic
        self.fresh_ms = int(settings.alerts.deadline_s * 1000)
        self._held_until = 0.0
        """No post before this (monotonic): Webex did not take the last one for a reason that heals."""
        self._woken = threading.Event()

    def take(self, events: list[dict[str, Any]]) -> int:
        """Record the replies the audit ``events`` call for (the eraser's :attr:`~sinks.alerts.erase.Eraser.on_events`,
        before their offsets are committed) and post them now; how many."""
        now = self.now_ms()
        notices = [n for event in events if (n := refusal_notice(event, now, self.fresh_ms)) is not None]
        if notices:
            self.ledger.record_notices(notices)
            self.wake()
        return len(notices)

    def wake(self) -> None:
        """New replies are in the ledger (the eraser recorded them): post them now, not at the next round."""
        self._woken.set()

    def deliver(self, stop: threading.Event | None = None) -> int:
        """One round: each pending reply posted once, oldest first, until Webex or the rate limit holds them up (the
        rest wait); how many went."""
        if self.monotonic() < self._held_until:
            return 0
        posted = 0
        for notice in self.ledger.pending_notices(MAX_PER_ROUND):
            if (stop is not None and stop.is_set()) or self.rate_limit.remaining() > 0:
                break
            if self.now_ms() - notice.at_ms > self.fresh_ms:
                log.warning("refusal reply %s not posted within CG_ALERTS__DEADLINE_S: given up", notice.notice_id)
                self.ledger.mark_notice(notice.notice_id, EXPIRED)
                continue
            result = self._post(notice)
            if result is None:
                break
            posted += result
        return posted

    def _post(self, notice: Notice) -> int | None:
        """Post one reply: 1 posted, 0 given up, None held up (the round stops; the reply stays pending)."""
        target = address(notice, self.settings.webex)
        if target is None:
            log.warning("refusal reply %s not posted: its room and person are off the allow-list", notice.notice_id)
            self.ledger.mark_notice(notice.notice_id, FAILED, "off the allow-list")
            return 0
        to, where = target
        self.ledger.mark_notice(notice.notice_id, SENDING)  # a crash from here on: not posted again
        try:
            text = markdown(notice, to)
            sent = self.client.send_message(where, text) if to == "room" else self.client.send_to_person(where, text)
        except WebexError as exc:
            if exc.maybe_done:
                log.warning("refusal reply %s had no answer (%s): not posted again", notice.notice_id, exc.reason)
                self.ledger.mark_notice(notice.notice_id, UNKNOWN, exc.reason[:200])
                return 0
            if exc.status == 429 or exc.retriable:
                if exc.status == 429:  # the bot's: every room's channel and the eraser wait too
                    self.rate_limit.pause_for(asked_wait(exc) or 1.0)
                else:
                    self._held_until = self.monotonic() + RETRY_PAUSE_S
                log.info("refusal reply %s held up (%s): tried again later", notice.notice_id, exc.reason)
                self.ledger.mark_notice(notice.notice_id, PENDING)
                return None
            log.warning("refusal reply %s refused by Webex (%s): given up", notice.notice_id, exc.reason)
            self.ledger.mark_notice(notice.notice_id, FAILED, exc.reason[:200])
            return 0
        self.ledger.mark_notice(notice.notice_id, SENT, str(sent.get("id") or "") or None)
        metrics.RECORDS_OUT.labels(STAGE, "refusal_reply").inc()
        log.info("refusal reply %s posted to the %s", notice.notice_id, to)
        return 1

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: a round at each wake and every :data:`ROUND_S`. A round that fails (the disk) is tried
        again after :data:`RETRY_PAUSE_S`; the ledger closed at shutdown ends it."""
        while not stop.is_set():
            try:
                self.deliver(stop)
            except LedgerClosed:
                if not stop.is_set():
                    raise  # only the sender's shutdown closes the ledger
                break
            except Exception as exc:  # noqa: BLE001 - the disk failing: the alerts go on, tried again
                log.warning("refusal replies: %s; trying again in %.0fs", type(exc).__name__, RETRY_PAUSE_S)
                stop.wait(RETRY_PAUSE_S)
                continue
            self._woken.wait(ROUND_S)
            self._woken.clear()
