"""Case transitions, pure: an alert opens a case, a person decides it, nobody answering expires it.

Every transition takes the current :class:`~schemas.records.Case` and returns the next version (``version``
+ 1, ``updated_at``/``updated_by`` set) or raises :class:`Refused` with a reason a person can read (the audit
keeps it). ``open`` and ``escalated`` cases wait for a verdict; ``confirmed``,
``dismissed`` and ``expired`` are final: a final case takes notes only (an expired one also a confirm or
dismiss given before it expired, read late). :class:`CaseBook` holds every
case by id and by alert id (an alert delivered twice opens one case) and the dismissed face matches per
subject (what the threshold report and the subject flag count). No Kafka, no clock, no I/O here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.errors import InvalidRecord
from schemas.identifiers import CASE_ID_RE, check, check_address
from schemas.records import (
    CASE_VERBS,
    FACE_ALERT_KINDS,
    FRAUD,
    LEGITIMATE,
    MAX_CASE_TEXT,
    Alert,
    Case,
    CaseNote,
    case_id_for,
    case_text,
)

OPEN, CONFIRMED, DISMISSED, ESCALATED, EXPIRED = "open", "confirmed", "dismissed", "escalated", "expired"
PENDING = frozenset({OPEN, ESCALATED})
"""States that wait for a verdict (and expire)."""
DECIDED_STATES = frozenset({CONFIRMED, DISMISSED, EXPIRED})
"""States with nothing left to decide: kept ``CG_CASES__RETAIN_DECIDED_DAYS``, then removed."""
FRAUD_KINDS = frozenset({"BLOCKED_TRANSACTION"})
"""Alert kinds about a transaction: a verdict on them is a fraud / legitimate label."""
MAX_TEXT = MAX_CASE_TEXT
"""Most characters of a note or a dismissal reason (longer text is cut)."""
MAX_NOTES = 100
"""Most notes a case keeps (a case record must stay well under Kafka's message size)."""
SERVICE = "case-service"
"""Who the case service's own changes are by (an expiry, a note that a label was withheld)."""


class Refused(InvalidRecord):
    """A command that cannot apply to the case (``kind``: ``unknown_case``, ``illegal_transition``,
    ``bad_command``); the reason says why in words for the person who asked."""


def open_case(alert: Alert, now_ms: int, expire_after_ms: int, reference_image_ref: str | None = None) -> Case:
    """Version 1 of the case of ``alert``: open, owned by nobody, opened at the alert's time (not when this
    service got to it: after a pause or a lost offset it reads alerts days old) and expiring
    ``expire_after_ms`` after that, so the queue's ages and the time to verdict are the alert's. An alert
    stamped ahead of ``now_ms`` (a clock ahead of ours) opens now. Already due when the alert is older than
    the expiry: :func:`expire` it at once. The summary is kept as a note is (:func:`~schemas.records.case_text`:
    without control characters or direction overrides, cut to :data:`MAX_TEXT`): the jobs write a line of a few
    hundred characters, and a longer one (up to the record limit, 256 KiB) was copied whole into the case, its
    index and its page."""
    opened_at = min(alert.event_time, now_ms)
    return Case(
        case_id=case_id_for(alert.alert_id),
        version=1,
        state=OPEN,
        kind=alert.kind,
        store_id=alert.store_id,
        alert_id=alert.alert_id,
        summary=_cut(alert.summary) or "",  # shown on the case page and indexed: one line of text, not 256 KiB
        opened_at=opened_at,
        updated_at=now_ms,
        expires_at=opened_at + expire_after_ms,
        updated_by=SERVICE,
        lane_id=alert.lane_id,
        transaction_id=alert.transaction_id,
        subject_id=alert.subject_id,
        category=alert.category,
        similarity=alert.similarity,
        snapshot_ref=alert.snapshot_ref,
        reference_image_ref=reference_image_ref,
    )


def _next(case: Case, actor: str, now_ms: int, **changes: Any) -> Case:
    return dataclasses.replace(case, version=case.version + 1, updated_at=now_ms, updated_by=actor, **changes)


def _pending(case: Case, verb: str) -> None:
    if case.state not in PENDING:
        raise Refused("illegal_transition", f"{case.case_id} is already {case.state}: cannot {verb} it")


def _decidable(case: Case, verb: str, given_at: int | None) -> None:
    """An undecided case, or one the service expired while a verdict given before ``expires_at`` (``given_at``:
    when the command reached Kafka) was still on its way to it: the service was down or behind, and the
    expiry sweep ran before it read that verdict. The person answered in time, so their verdict counts."""
    if case.state == EXPIRED and given_at is not None and given_at < case.expires_at:
        return
    _pending(case, verb)


def _cut(text: str | None) -> str | None:
    return case_text(text or "")


def confirm(case: Case, actor: str, now_ms: int, fraud: bool = False, given_at: int | None = None) -> Case:
    """A person confirms the alert was right. The label: fraud for a blocked transaction or when asked
    (``fraud``); none for a face match otherwise (a face is not a fraud verdict on the transaction).
    ``given_at``: when the verdict reached Kafka (one given before the case expired replaces the expiry)."""
    _decidable(case, "confirm", given_at)
    if fraud and not case.transaction_id:
        raise Refused("bad_command", f"{case.case_id} has no transaction to label as fraud")
    label = FRAUD if fraud or case.kind in FRAUD_KINDS and case.transaction_id else None
    return _next(
        case,
        actor,
        now_ms,
        state=CONFIRMED,
        verdict="confirmed_fraud" if fraud else "confirmed",
        decided_at=now_ms,
        decided_by=actor,
        owner=case.owner or actor,
        fraud_label=label,
    )


def dismiss(
    case: Case,
    actor: str,
    now_ms: int,
    reason: str | None = None,
    prior_false_matches: int = 0,
    given_at: int | None = None,
    fraud_case: str | None = None,
) -> Case:
    """A person says the alert was wrong. A face match counts as a false match of its subject
    (``prior_false_matches`` + 1); a blocked transaction is labelled legitimate, unless ``fraud_case``, another
    case, confirmed that transaction as fraud: the block being wrong does not make the sale legitimate, and the
    labels topic keeps the last verdict per transaction, so the fraud label would be undone. Then this case
    labels nothing and a note says why. ``given_at`` as for :func:`confirm`."""
    _decidable(case, "dismiss", given_at)
    face = case.kind in FACE_ALERT_KINDS and case.subject_id is not None
    legitimate = case.kind in FRAUD_KINDS and case.transaction_id is not None
    notes = case.notes
    if legitimate and fraud_case is not None:
        legitimate = False
        text = f"no legitimate label for {case.transaction_id}: {fraud_case} confirmed it as fraud"
        if len(notes) < MAX_NOTES:
            notes = (*notes, CaseNote(at=now_ms, actor=SERVICE, text=text))
    return _next(
        case,
        actor,
        now_ms,
        state=DISMISSED,
        verdict="dismissed",
        verdict_reason=_cut(reason),
        decided_at=now_ms,
        decided_by=actor,
        owner=case.owner or actor,
        subject_false_matches=prior_false_matches + 1 if face else case.subject_false_matches,
        fraud_label=LEGITIMATE if legitimate else None,
        notes=notes,
    )


def escalate(case: Case, actor: str, now_ms: int) -> Case:
    """Hand the case up: it stays undecided (and still expires)."""
    _pending(case, "escalate")
    if case.state == ESCALATED:
        raise Refused("illegal_transition", f"{case.case_id} is already escalated")
    return _next(case, actor, now_ms, state=ESCALATED)


def assign(
    case: Case, actor: str, person: str, now_ms: int, unlisted: Callable[[str], str | None] = lambda _: None
) -> Case:
    """Give an undecided case to ``person`` (an e-mail address, :func:`check_assignee`); :class:`Refused`
    ``bad_command`` when ``unlisted`` says why they cannot own it (off the allow-list: they could not act on it)."""
    _pending(case, "assign")
    owner = check_assignee(person)
    why = unlisted(owner)
    if why:
        raise Refused("bad_command", why)
    return _next(case, actor, now_ms, owner=owner)


def check_assignee(person: str) -> str:
    """``person`` when it is one real e-mail address (:func:`~schemas.identifiers.check_address`: no lookalike of a
    colleague's), else :class:`Refused` ``bad_command`` with the reason."""
    try:
        return check_address(person)
    except InvalidRecord as bad:
        raise Refused(bad.kind, bad.reason) from None


def add_note(case: Case, actor: str, text: str, now_ms: int) -> Case:
    """A note, in any state (a decided case may still be annotated)."""
    cut = _cut(text)
    if cut is None:
        raise Refused("bad_command", "note needs some text")
    if len(case.notes) >= MAX_NOTES:
        raise Refused("illegal_transition", f"{case.case_id} has {MAX_NOTES} notes already")
    return _next(case, actor, now_ms, notes=(*case.notes, CaseNote(at=now_ms, actor=actor, text=cut)))


def refusal_note(case: Case, verb: str, actor: str, reason: str, now_ms: int) -> Case | None:
    """The case with a service note that ``actor``'s ``verb`` was refused and why (None: its notes are full). The
    bot and the page said "sent" before the service read it; a change in between (another person's verdict) is
    only found here, so the case itself says it, where the person looks, not only the audit and a dead letter."""
    if len(case.notes) >= MAX_NOTES:
        return None
    text = _cut(f"{verb.lower()} by {actor} was refused: {reason}") or ""
    return _next(case, SERVICE, now_ms, notes=(*case.notes, CaseNote(at=now_ms, actor=SERVICE, text=text)))


def expire(case: Case, now_ms: int, actor: str = SERVICE) -> Case | None:
    """The expired case when it is undecided and its time is up; else None."""
    if case.state not in PENDING or now_ms < case.expires_at:
        return None
    return _next(case, actor, now_ms, state=EXPIRED, verdict="expired", decided_at=now_ms, decided_by=actor)


def without_images(case: Case, actor: str, now_ms: int) -> Case | None:
    """The case without its image refs (the live snapshot, the reference image), in any state, for a forget of
    its subject or of the buyer enrolled from its sale; None when it holds none. The images are deleted by the
    forget: the case keeps what a person needs to follow it (subject id, category, similarity, verdict)."""
    if case.snapshot_ref is None and case.reference_image_ref is None:
        return None
    return _next(case, actor, now_ms, snapshot_ref=None, reference_image_ref=None)


def repeats(case: Case, verb: str, fraud: bool, actor: str) -> bool:
    """Whether ``verb`` by ``actor`` is the verdict ``case`` has already, given by that same person: a second press
    of the card's button, or the same command typed again. Nothing is left to do (the caller audits it
    ``UNCHANGED``); an opposite verdict, or another person's, is still refused. The same person whatever the case of
    their address's letters, as the allow-list reads it (Webex's ``Jane@store.test``, the dashboard login's
    ``jane@store.test``)."""
    wanted = {"CONFIRM": "confirmed_fraud" if fraud else "confirmed", "DISMISS": "dismissed"}.get(verb)
    if wanted is None or case.state not in (CONFIRMED, DISMISSED):
        return False
    return case.verdict == wanted and _same_person(case.decided_by or "", actor)


def _same_person(one: str, other: str) -> bool:
    """Two actors are one person: the same address in any letter case, or the same Webex person id (a person Webex
    gives no address for) exactly, since its letters' case is part of it."""
    return one == other or "@" in one and one.lower() == other.lower()


@dataclass(frozen=True)
class CaseCommand:
    """A case verb's argument, parsed: ``confirm <case> [fraud]``, ``dismiss <case> [reason...]``,
    ``escalate <case>``, ``assign <case> <person>``, ``note <case> <text...>``."""

    verb: str
    case_id: str
    fraud: bool = False
    text: str | None = None
    """The dismissal reason, the note, or the assignee."""


def parse_case_command(verb: str, argument: str | None) -> CaseCommand:
    """The command of ``verb`` + ``argument``; :class:`Refused` ``bad_command`` (or ``invalid_id``) says
    what is wrong. Used by the bot (to answer at once) and by the case service (to apply)."""
    verb = verb.upper()
    if verb not in CASE_VERBS:
        raise Refused("bad_command", f"{verb.lower()} is not a case command")
    words = (argument or "").split(maxsplit=1)
    if not words:
        raise Refused("bad_command", f"`{verb.lower()}` needs a case id")
    # every case id is ``case-`` + hex (:func:`~schemas.records.case_id_for`): anything else (a transaction id typed
    # for the case's, the id in capitals) named no case, waited for one and was refused ``unknown_case`` 15 min on
    case_id = check(words[0], "case id").lower()
    if not case_id.startswith("case-"):
        raise Refused("bad_command", "a case id starts with `case-`, as the alert and its case card name it")
    if CASE_ID_RE.fullmatch(case_id) is None:  # a digit short or too many, a letter past f: no case can have it
        raise Refused(
            "bad_command", "a case id is `case-` and twelve hex digits (0-9, a-f), as the alert and its card name it"
        )
    rest = words[1].strip() if len(words) > 1 else ""
    if verb == "CONFIRM":
        if rest and rest.lower() != "fraud":
            raise Refused("bad_command", "`confirm <case>` takes only the word `fraud` after the case")
        return CaseCommand(verb, case_id, fraud=bool(rest))
    if verb == "ESCALATE":
        if rest:
            raise Refused("bad_command", "`escalate <case>` takes nothing after the case")
        return CaseCommand(verb, case_id)
    if verb == "ASSIGN":
        if not rest or len(rest.split()) != 1:
            raise Refused("bad_command", "`assign <case> <person>` needs one person")
        rest = check_assignee(rest)
    if verb == "NOTE" and not case_text(rest):  # the note kept would be empty: refused here, at once, not in add_note
        raise Refused("bad_command", "`note <case> <text>` needs some text (control characters are left out)")
    return CaseCommand(verb, case_id, text=rest or None)


class CaseBook:
    """Every case by id, the case of each alert, and the dismissed face matches per subject."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}
        self.false_matches: Counter[str] = Counter()

    def load(self, case: Case) -> None:
        """Take a case version (replay of the cases topic, or one just made); an older version than the
        one held is ignored."""
        held = self.cases.get(case.case_id)
        if held is not None and held.version >= case.version:
            return
        newly_dismissed = case.state == DISMISSED and (held is None or held.state != DISMISSED)
        if newly_dismissed and case.subject_id and case.kind in FACE_ALERT_KINDS:
            self.false_matches[case.subject_id] += 1
        self.cases[case.case_id] = case

    def forget(self, case_id: str) -> None:
        case = self.cases.pop(case_id, None)
        if case and case.state == DISMISSED and case.subject_id and case.kind in FACE_ALERT_KINDS:
            self.false_matches[case.subject_id] -= 1

    def open(self, alert: Alert, now_ms: int, expire_after_ms: int, reference_image_ref: str | None) -> Case | None:
        """The new case of ``alert``, or None when it has one already (a redelivered alert)."""
        if case_id_for(alert.alert_id) in self.cases:
            return None
        case = open_case(alert, now_ms, expire_after_ms, reference_image_ref)
        self.load(case)
        return case

    def apply(
        self,
        command: CaseCommand,
        actor: str,
        now_ms: int,
        given_at: int | None = None,
        unlisted: Callable[[str], str | None] = lambda _: None,
    ) -> Case:
        """The next version of the case ``command`` is about (kept here), or :class:`Refused`. ``given_at``: when
        the command reached Kafka; a confirm or dismiss given before the case expired still decides it.
        ``unlisted``: why a person cannot own a case (the allow-list), for ``assign``."""
        case = self.cases.get(command.case_id)
        if case is None:
            raise Refused("unknown_case", f"no case {command.case_id}")
        if command.verb == "CONFIRM":
            new = confirm(case, actor, now_ms, command.fraud, given_at)
        elif command.verb == "DISMISS":
            prior = self.false_matches[case.subject_id] if case.subject_id else 0
            fraud_cases = self.labelled(case, FRAUD)
            new = dismiss(case, actor, now_ms, command.text, prior, given_at, fraud_cases[0] if fraud_cases else None)
        elif command.verb == "ESCALATE":
            new = escalate(case, actor, now_ms)
        elif command.verb == "ASSIGN":
            new = assign(case, actor, command.text or "", now_ms, unlisted)
        else:
            new = add_note(case, actor, command.text or "", now_ms)
        self.load(new)
        return new

    def refused(self, case_id: str, verb: str, actor: str, reason: str, now_ms: int) -> Case | None:
        """The case's next version with the refusal noted (kept here), or None (no such case, notes full)."""
        case = self.cases.get(case_id)
        noted = refusal_note(case, verb, actor, reason, now_ms) if case is not None else None
        if noted is not None:
            self.load(noted)
        return noted

    def labelled(self, case: Case, label: int) -> list[str]:
        """The other held cases whose verdict labelled ``case``'s transaction ``label`` (sorted ids): several
        alerts can name one sale (its block, a watchlist match at its checkout)."""
        if not case.transaction_id:
            return []
        return sorted(
            other.case_id
            for other in self.cases.values()
            if other.transaction_id == case.transaction_id
            and other.case_id != case.case_id
            and other.state in (CONFIRMED, DISMISSED)
            and other.fraud_label == label
        )

    def forget_images(
        self, subject_id: str, transaction_id: str | None, until_ms: int, now_ms: int, actor: str
    ) -> list[Case]:
        """Strip the image refs of every case of ``subject_id``, or of the sale ``transaction_id`` (its buyer was
        enrolled), opened at or before ``until_ms`` (a forget reaches what came before it); the new versions
        (kept here), none for a case without refs."""
        out = []
        for case in list(self.cases.values()):
            ours = case.subject_id == subject_id or (
                transaction_id is not None and case.transaction_id == transaction_id
            )
            new = without_images(case, actor, now_ms) if ours and case.opened_at <= until_ms else None
            if new is not None:
                self.load(new)
                out.append(new)
        return out

    def past_retention(self, horizon_ms: int) -> list[Case]:
        """Decided cases (confirmed, dismissed, expired) decided before ``horizon_ms``: what retention removes."""
        return [
            case
            for case in self.cases.values()
            if case.state in DECIDED_STATES and (case.decided_at or case.updated_at) < horizon_ms
        ]

    def due(self, now_ms: int) -> list[Case]:
        """Expire every undecided case whose time is up; the expired versions (kept here)."""
        out = []
        for case in list(self.cases.values()):
            new = expire(case, now_ms)
            if new is not None:
                self.load(new)
                out.append(new)
        return out
