"""Forgotten watchlist subjects as the ``audit`` topic states them, and the enrolments that lift a forget. Pure.

The watchlist service forgets a subject (``forget <subject>``, or the entry's expiry: ``FORGET`` / ``EXPIRE``
on ``audit``, ``DONE`` or ``UNCHANGED``) and its images with it. A forget reaches what the subject's faces and
its enrolment sale (the ``<tx>`` of ``subj-<tx>``: the buyer enrolled) showed; an ``ENROLL`` of the same subject
id after its latest forget starts a new entry, so what comes from that enrolment on is not reached. The
``watchlist`` tombstone is compacted away about a day after the forget; ``audit`` keeps it, so a service that
restarts still knows. Records of one subject may sit on different ``audit`` partitions, read in no fixed order:
the answer does not depend on the order forgets and enrolments are added in.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from schemas.codec import DecodeError
from schemas.indices import FORGETTING_ACTIONS, FORGETTING_OUTCOMES, enrolment_transaction
from schemas.records import WATCHLIST_SERVICE_ACTOR, AuditEvent


def audit_event(value: bytes | None) -> AuditEvent | None:
    """An ``audit`` record's event; ``None`` for a tombstone or bytes that do not decode (not a reader's to judge:
    the topic is written by the project's own services)."""
    if not value:
        return None
    try:
        return AuditEvent.decode(value)
    except DecodeError:
        return None


def is_forget(event: AuditEvent) -> bool:
    """Whether an ``audit`` event forgets its subject: a ``FORGET``, or the watchlist service's ``EXPIRE`` of an
    entry, done or found done (``UNCHANGED``). Not the case service's ``EXPIRE`` of a case nobody decided (its
    subject stays enrolled), not a ``FAILED`` one, not one without a subject."""
    if not event.subject_id or event.action not in FORGETTING_ACTIONS or event.outcome not in FORGETTING_OUTCOMES:
        return False
    return event.action != "EXPIRE" or event.actor == WATCHLIST_SERVICE_ACTOR


@dataclass
class Forgets:
    """The latest forget of each subject, the sale each forgotten subject was enrolled from, and enrolments."""

    forgotten_at: dict[str, int] = field(default_factory=dict)
    """Subject -> when its latest forget was made (ms)."""
    sale_subject: dict[str, str] = field(default_factory=dict)
    """Enrolment sale -> the forgotten subject enrolled from it."""
    enrolled: dict[str, list[int]] = field(default_factory=dict)
    """Subject -> its enrolments (ms, sorted): one after its latest forget lifts that forget."""

    def forget(self, subject: str, transaction_id: str | None, at_ms: int) -> None:
        self.forgotten_at[subject] = max(self.forgotten_at.get(subject, at_ms), at_ms)
        sale = enrolment_transaction(subject, transaction_id)
        if sale:
            self.sale_subject[sale] = subject

    def enrol(self, subject: str, at_ms: int) -> None:
        times = self.enrolled.setdefault(subject, [])
        if at_ms not in times:
            bisect.insort(times, at_ms)

    def read(self, value: bytes | None) -> bool:
        """Take an ``audit`` record: a forget (not the case service's ``EXPIRE`` of a case, not a ``FAILED`` one:
        that subject stays enrolled) or an ``ENROLL`` done; whether it was one. Anything else, or a record that
        does not decode, is not ours to judge."""
        event = audit_event(value)
        if event is None or not event.subject_id:
            return False
        if is_forget(event):
            self.forget(event.subject_id, event.transaction_id, event.event_time)
            return True
        if event.action == "ENROLL" and event.outcome == "DONE":
            self.enrol(event.subject_id, event.event_time)
            return True
        return False

    def lifted_at(self, subject: str) -> int | None:
        """When ``subject`` was enrolled again after its latest forget (its new entry's start); None if not."""
        times = self.enrolled.get(subject, [])
        i = bisect.bisect_right(times, self.forgotten_at.get(subject, 0))
        return times[i] if i < len(times) else None

    def reaches(self, subject_id: str | None, transaction_id: str | None, time_ms: int) -> bool:
        """Whether a forget reaches a record of ``subject_id`` or about the sale ``transaction_id`` made at
        ``time_ms``: its subject, or the subject enrolled from that sale, is forgotten, and the record is from
        before that subject was enrolled again (if it was)."""
        whose = {s for s in (subject_id, self.sale_subject.get(transaction_id or "")) if s in self.forgotten_at}
        for subject in whose:
            lifted = self.lifted_at(subject)
            if lifted is None or time_ms < lifted:
                return True
        return False

    def prune(self, before_ms: int) -> None:
        """Drop forgets made before ``before_ms`` (with their sales) and enrolments before it: records that old
        are no longer read."""
        old = {subject for subject, at in self.forgotten_at.items() if at < before_ms}
        for subject in old:
            del self.forgotten_at[subject]
        self.sale_subject = {sale: s for sale, s in self.sale_subject.items() if s not in old}
        for subject, times in list(self.enrolled.items()):
            kept = times[bisect.bisect_left(times, before_ms) :]
            if kept:
                self.enrolled[subject] = kept
            else:
                del self.enrolled[subject]
