"""The forgets and enrolments ``audit`` states (schemas.forgets): which records a forget reaches."""

from __future__ import annotations

from schemas.forgets import Forgets
from schemas.records import AuditEvent


def event(action: str, at: int, subject: str = "subj-tx-1", actor: str = "guard@example.com", **kw) -> bytes:
    return AuditEvent(f"{action}:{at}", at, action, kw.pop("outcome", "DONE"), actor, subject_id=subject, **kw).encode()


def test_a_forget_reaches_the_subject_and_its_enrolment_sale_until_it_is_enrolled_again_in_any_order() -> None:
    for order in (1, -1):
        forgets = Forgets()
        records = [event("FORGET", 100), event("ENROLL", 200), event("ENROLL", 300), event("CONFIRM", 50)]
        assert [forgets.read(r) for r in records[::order]] == [True, True, True, False][::order]
        assert forgets.reaches("subj-tx-1", None, 150) and forgets.reaches("subj-b", "tx-1", 199)
        assert not forgets.reaches("subj-tx-1", None, 200) and not forgets.reaches("subj-b", "tx-1", 250)
        assert not forgets.reaches("subj-b", "tx-2", 10)
    forgets.read(event("FORGET", 400))
    assert forgets.lifted_at("subj-tx-1") is None and forgets.reaches("subj-tx-1", None, 250)


def test_only_the_watchlist_service_s_expiry_and_a_forget_that_did_not_fail_forget() -> None:
    forgets = Forgets()
    assert not forgets.read(event("EXPIRE", 100, actor="case-service"))
    assert not forgets.read(event("FORGET", 100, outcome="FAILED"))
    assert not forgets.read(b"junk") and not forgets.read(None)
    assert forgets.read(event("EXPIRE", 100, subject="subj-x", actor="watchlist-service", transaction_id="tx-9"))
    assert forgets.forgotten_at == {"subj-x": 100} and forgets.reaches(None, "tx-9", 90)


def test_pruning_drops_forgets_and_enrolments_older_than_the_horizon() -> None:
    forgets = Forgets()
    for record in (event("FORGET", 100), event("ENROLL", 150), event("FORGET", 500, subject="subj-tx-2")):
        forgets.read(record)
    forgets.prune(200)
    assert forgets.forgotten_at == {"subj-tx-2": 500} and forgets.sale_subject == {"tx-2": "subj-tx-2"}
    assert forgets.enrolled == {}
