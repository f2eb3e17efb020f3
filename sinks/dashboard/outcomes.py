"""What became of a verdict given on the case page: applied, unchanged, or refused and why, in plain words.

The page publishes a verdict as a command (:func:`sinks.dashboard.cases.verdict_command`, 202) and the case service
decides it later, writing one ``AuditEvent`` on ``audit`` per command: ``case:<command id>`` (``DONE``,
``UNCHANGED``, or ``FAILED`` with ``<kind>: <reason>``: the case decided or expired meanwhile, ``unknown_case``,
``bad_command``), or, for a command it could not take as the dashboard's (too old, off its allow-list, a signature that
does not verify), ``case-refused:<offset>`` naming the command only as a claim (``details.claimed_command_id``).
Before, the page only watched the case for its next version: a refusal in a race showed as "the case is now
confirmed" and every other refusal as "has not changed in 30 s … the audit says why".

:class:`OutcomeBook` keeps the outcomes of the dashboard's own commands (ids ``dashboard-…``) read from ``audit``
(:mod:`sinks.dashboard.outcome_reader` feeds it); :func:`outcome_answer` is what ``GET
/api/cases/<case>/commands/<command id>`` tells the person who gave it: the outcome and, for a refusal, the reason in
plain words (for "already decided", who decided and when, as the case page shows them). Never the event's details
(labels, counts, image refs): only what the case page shows that person already. Pure, but for the book's lock.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.settings import AlertSettings
from schemas.forgets import audit_event
from schemas.records import CASE_VERBS
from sinks.alerts.message import store_time
from sinks.dashboard.cases import DASHBOARD_COMMAND_PREFIX

APPLIED, UNCHANGED, REFUSED, PENDING = "applied", "unchanged", "refused", "pending"
"""A command's outcome as the page is told it; ``pending``: no audit event of it read (yet)."""
OUTCOMES = {"DONE": APPLIED, "UNCHANGED": UNCHANGED, "FAILED": REFUSED}
"""The case service's audit outcomes, as the page words them."""
DECIDED_AUDIT_PREFIX = f"case:{DASHBOARD_COMMAND_PREFIX}"
"""Audit ids of the case service's outcome of a dashboard command it took as the dashboard's."""
REFUSED_AUDIT_PREFIX = "case-refused:"
"""Audit ids of a command the case service refused before taking it as anyone's (under its offset)."""
KEEP_MS = 3_600_000
"""How long an outcome is kept after the case service wrote it: the page asks every second, then every 10 s."""
MAX_KEPT = 50_000
"""Outcomes kept at most (the oldest go first): a burst of verdicts cannot grow the dashboard without bound."""
MAX_REASON_CHARS = 300
"""How much of the service's reason the page is shown (it is one line)."""


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """One dashboard command's outcome, as the case service audited it."""

    command_id: str
    outcome: str
    """:data:`APPLIED`, :data:`UNCHANGED` or :data:`REFUSED`."""
    verb: str
    actor: str
    """Who gave it: the command's actor (a claim, for an event that names it only as one)."""
    at_ms: int
    case_id: str | None = None
    kind: str = ""
    """The refusal's kind (``illegal_transition``, ``unknown_case``, ``bad_command``, ``unauthorized``, ...)."""
    reason: str = ""
    """The case service's own words."""
    verified: bool = True
    """False for ``case-refused:`` events: the service could not take the command as the dashboard's, so its id and
    actor are claims. A verified outcome of the same id replaces one that is not, never the other way round."""


def outcome_of(key: bytes | None, value: bytes | None) -> CommandOutcome | None:
    """The outcome an ``audit`` record states of a dashboard command (``dashboard-…``); None for any other record
    (most of the topic: forgets, the bot's commands, expiries), told by its key before its value is decoded."""
    if not key or not key.startswith((DECIDED_AUDIT_PREFIX.encode(), REFUSED_AUDIT_PREFIX.encode())):
        return None
    event = audit_event(value)
    if event is None or event.action not in CASE_VERBS or event.outcome not in OUTCOMES:
        return None
    details = event.details or {}
    verified = event.audit_id.startswith(DECIDED_AUDIT_PREFIX)
    command_id = event.command_id if verified else details.get("claimed_command_id")
    actor = event.actor if verified else details.get("claimed_actor")
    if not command_id or not command_id.startswith(DASHBOARD_COMMAND_PREFIX) or not actor:
        return None
    said = event.reason or ""
    kind, _, reason = said.partition(": ") if event.outcome == "FAILED" else ("", "", said)
    return CommandOutcome(
        command_id=command_id,
        outcome=OUTCOMES[event.outcome],
        verb=event.action.lower(),
        actor=actor,
        at_ms=event.event_time,
        case_id=details.get("case_id"),
        kind=kind,
        reason=reason,
        verified=verified,
    )


class OutcomeBook:
    """The dashboard commands' outcomes read so far, by command id; those older than :data:`KEEP_MS` (and past
    :data:`MAX_KEPT`, the oldest) are let go. Taken from the reader's thread, asked from the requests'."""

    def __init__(self, keep_ms: int = KEEP_MS, max_kept: int = MAX_KEPT) -> None:
        self.keep_ms, self.max_kept = keep_ms, max_kept
        self._outcomes: dict[str, CommandOutcome] = {}
        self._lock = threading.Lock()

    def take(self, key: bytes | None, value: bytes | None, now_ms: int) -> CommandOutcome | None:
        """Keep the outcome ``audit``'s record states, if it is one of a dashboard command; it, or None."""
        outcome = outcome_of(key, value)
        if outcome is None or now_ms - outcome.at_ms > self.keep_ms:
            return None
        with self._lock:
            held = self._outcomes.get(outcome.command_id)
            if held is not None and held.verified and not outcome.verified:
                return held  # a claim never replaces what the service decided of the command itself
            self._outcomes.pop(outcome.command_id, None)
            self._outcomes[outcome.command_id] = outcome  # insertion order: the oldest first
            self._prune(now_ms)
        return outcome

    def get(self, command_id: str) -> CommandOutcome | None:
        with self._lock:
            return self._outcomes.get(command_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def _prune(self, now_ms: int) -> None:
        while self._outcomes:
            oldest = next(iter(self._outcomes.values()))
            if len(self._outcomes) <= self.max_kept and now_ms - oldest.at_ms <= self.keep_ms:
                return
            del self._outcomes[oldest.command_id]


def _one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    flat = " ".join(text.split())
    return flat[:limit].rstrip() + (" (cut)" if len(flat) > limit else "")


UNVERIFIED_HINT = "the dashboard and the case service need the same command signing key (CG_WEBEX__COMMAND_SIGNING_KEY)"


def plain_reason(outcome: CommandOutcome, case: Mapping[str, Any] | None, alerts: AlertSettings) -> str:
    """Why the case service refused ``outcome``'s command, in words for the person who gave it; for a case decided
    before it came (``illegal_transition``), who decided it and when, where ``case`` (the indexed case) says so, in
    the case's store's time as the case page gives it. Pure."""
    kind, reason = outcome.kind, _one_line(outcome.reason)
    if kind == "illegal_transition":
        state = str((case or {}).get("state") or "")
        by, at = (case or {}).get("decided_by"), (case or {}).get("decided_at")
        when = store_time(at, (case or {}).get("store_id"), alerts) if at else None
        if state in ("confirmed", "dismissed", "expired") and (by or when):
            decided = " ".join(part for part in (state, f"by {by}" if by else "", f"at {when}" if when else "") if part)
            return f"{reason} ({decided}); add a note if you see it differently"
        return reason or "the case changed before your verdict reached the case service"
    if kind == "unknown_case":
        return "the case service holds no such case (removed after its retention, or its alert never reached it)"
    if kind == "bad_command":
        return f"the case service cannot apply it: {reason}"
    if kind == "unauthorized":
        if reason.startswith("issued "):
            return (
                f"it reached the case service too late ({reason}: was the service down?); a verdict counts only "
                "within CG_WEBEX__COMMAND_MAX_AGE_S of being given, so give it again if it should still count"
            )
        if "allow-list" in reason:
            return "you are not on the case service's allow-list of people who decide cases (CG_WEBEX__ALLOWED_PEOPLE)"
        return f"the case service could not verify it as the dashboard's ({reason}): {UNVERIFIED_HINT}"
    if kind == "invalid_id":
        return f"the case service refused its id or your login name: {reason}"
    return f"{kind}: {reason}" if kind and reason else reason or kind or "refused"


def outcome_answer(
    command_id: str, outcome: CommandOutcome | None, case: Mapping[str, Any] | None, alerts: AlertSettings
) -> dict[str, Any]:
    """``GET /api/cases/<case>/commands/<command id>``'s answer: ``outcome`` (:data:`PENDING` for none read yet),
    and for one read: the verb, when (epoch ms, and in the case's store's time) and, refused or unchanged, ``reason``
    in plain words. Pure."""
    if outcome is None:
        return {"command_id": command_id, "outcome": PENDING}
    store = (case or {}).get("store_id")
    answer: dict[str, Any] = {
        "command_id": command_id,
        "outcome": outcome.outcome,
        "verb": outcome.verb,
        "at": outcome.at_ms,
        "local_time": store_time(outcome.at_ms, store, alerts),
    }
    if outcome.outcome == REFUSED:
        answer["reason"] = plain_reason(outcome, case, alerts)
    elif outcome.outcome == UNCHANGED:
        answer["reason"] = _one_line(outcome.reason) or "the case is already so"
    return answer


def outcome_for(outcome: CommandOutcome | None, person: str, case_id: str) -> CommandOutcome | None:
    """``outcome`` where it is ``person``'s (the allow-list's rule: any letter case) and of ``case_id``; else None,
    told as "pending", as nothing of another person's command or another case's is told. Pure."""
    if outcome is None or outcome.actor.lower() != person.lower():
        return None
    if outcome.case_id is not None and outcome.case_id != case_id:
        return None
    return outcome
