"""Case transitions (jobs/cases/core.py): open per alert, verdicts, refusals, expiry."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.cases.core import (
    CaseBook,
    Refused,
    add_note,
    assign,
    case_id_for,
    check_assignee,
    confirm,
    dismiss,
    escalate,
    expire,
    open_case,
    parse_case_command,
    repeats,
)
from schemas.errors import InvalidRecord
from schemas.records import FRAUD, LEGITIMATE, Alert, Case

T0 = 1_767_225_600_000
HOUR = 3_600_000


def face_alert(alert_id: str = "watchlist:tx-1:subj-a", subject: str = "subj-a") -> Alert:
    return Alert(
        alert_id=alert_id,
        kind="WATCHLIST_MATCH",
        severity="high",
        event_time=T0,
        store_id="store-001",
        summary="Possible suspect at lane-01",
        lane_id="lane-01",
        transaction_id="tx-1",
        subject_id=subject,
        category="SUSPECT",
        similarity=0.93,
        snapshot_ref="local://checkout/tx-1.jpg",
    )


def blocked_alert() -> Alert:
    return Alert(
        alert_id="blocked:tx-9",
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=T0,
        store_id="store-001",
        summary="Return blocked",
        transaction_id="tx-9",
    )


def opened(alert: Alert | None = None) -> Case:
    return open_case(alert or face_alert(), T0, 24 * HOUR, reference_image_ref="local://reference/subj-a.jpg")


def test_an_alert_opens_a_case_with_both_images_and_the_evidence() -> None:
    case = opened()
    assert case.case_id == case_id_for("watchlist:tx-1:subj-a") and case.case_id.startswith("case-")
    assert (case.state, case.version, case.owner, case.verdict) == ("open", 1, None, None)
    assert case.snapshot_ref == "local://checkout/tx-1.jpg"
    assert case.reference_image_ref == "local://reference/subj-a.jpg"
    assert (case.subject_id, case.similarity, case.transaction_id) == ("subj-a", 0.93, "tx-1")
    assert case.expires_at == T0 + 24 * HOUR


def test_a_case_opens_at_its_alerts_time_not_when_it_is_read() -> None:
    late = open_case(face_alert(), T0 + 20 * 24 * HOUR, 24 * HOUR)  # read 20 days after the alert
    assert (late.opened_at, late.expires_at, late.updated_at) == (T0, T0 + 24 * HOUR, T0 + 20 * 24 * HOUR)
    gone = expire(late, T0 + 20 * 24 * HOUR)  # older than the expiry: due at once
    assert gone is not None and gone.state == "expired"


def test_case_survives_its_codec_round_trip_with_notes() -> None:
    case = add_note(opened(), "lead@example.com", "looks like him", T0 + 1)
    assert Case.decode(case.encode()) == case


def test_confirming_a_face_match_closes_it_without_a_fraud_label() -> None:
    case = confirm(opened(), "guard@example.com", T0 + 5)
    assert (case.state, case.verdict, case.version, case.decided_at) == ("confirmed", "confirmed", 2, T0 + 5)
    assert case.fraud_label is None
    assert case.owner == "guard@example.com" and case.updated_by == "guard@example.com"


def test_confirming_with_fraud_labels_the_transaction_fraud() -> None:
    case = confirm(opened(), "guard@example.com", T0 + 5, fraud=True)
    assert (case.verdict, case.fraud_label) == ("confirmed_fraud", FRAUD)


def test_a_blocked_transaction_case_is_labelled_by_its_verdict() -> None:
    assert confirm(opened(blocked_alert()), "a@x", T0).fraud_label == FRAUD
    assert dismiss(opened(blocked_alert()), "a@x", T0).fraud_label == LEGITIMATE


def test_dismissing_a_face_match_counts_one_more_false_match_of_the_subject() -> None:
    case = dismiss(opened(), "guard@example.com", T0 + 5, "different person", prior_false_matches=2)
    assert (case.state, case.verdict_reason, case.subject_false_matches) == ("dismissed", "different person", 3)
    assert case.fraud_label is None


@pytest.mark.parametrize("verb", ["confirm", "dismiss", "escalate"])
def test_a_decided_case_refuses_another_verdict_with_a_reason(verb: str) -> None:
    decided = confirm(opened(), "a@x", T0)
    with pytest.raises(Refused) as refused:
        {"confirm": lambda: confirm(decided, "b@x", T0), "dismiss": lambda: dismiss(decided, "b@x", T0),
         "escalate": lambda: escalate(decided, "b@x", T0)}[verb]()  # fmt: skip
    assert refused.value.kind == "illegal_transition" and "already confirmed" in refused.value.reason


def test_an_escalated_case_can_still_be_decided_but_not_escalated_again() -> None:
    up = escalate(opened(), "a@x", T0)
    assert up.state == "escalated"
    with pytest.raises(Refused, match="already escalated"):
        escalate(up, "a@x", T0)
    assert dismiss(up, "b@x", T0).state == "dismissed"


def test_assign_sets_the_owner_and_needs_one_person() -> None:
    assert assign(opened(), "lead@x", "guard@x", T0).owner == "guard@x"
    with pytest.raises(Refused):
        assign(opened(), "lead@x", "two people", T0)


def test_notes_are_kept_in_order_even_after_the_verdict() -> None:
    case = add_note(confirm(opened(), "a@x", T0), "b@x", "second look agrees", T0 + 9)
    assert [(n.actor, n.text, n.at) for n in case.notes] == [("b@x", "second look agrees", T0 + 9)]
    assert case.state == "confirmed" and case.version == 3
    assert (case.decided_by, case.updated_by) == ("a@x", "b@x")  # a later note does not take the verdict over


def test_who_decided_is_kept_for_each_verdict_and_none_while_undecided() -> None:
    assert opened().decided_by is None and escalate(opened(), "a@x", T0).decided_by is None
    assert dismiss(opened(), "d@x", T0, "not them").decided_by == "d@x"
    assert expire(opened(), opened().expires_at).decided_by == "case-service"  # type: ignore[union-attr]
    assert Case.decode(dismiss(opened(), "d@x", T0).encode()).decided_by == "d@x"


def test_an_unanswered_case_expires_at_its_time_and_not_before() -> None:
    case = opened()
    assert expire(case, case.expires_at - 1) is None
    gone = expire(case, case.expires_at)
    assert gone is not None and (gone.state, gone.verdict) == ("expired", "expired")
    assert expire(confirm(case, "a@x", T0), case.expires_at + 1) is None


def test_a_redelivered_alert_opens_no_second_case() -> None:
    book = CaseBook()
    assert book.open(face_alert(), T0, HOUR, None) is not None
    assert book.open(face_alert(), T0 + 1, HOUR, None) is None
    assert len(book.cases) == 1


def test_the_book_counts_dismissals_per_subject_and_keeps_the_latest_version() -> None:
    book = CaseBook()
    first = book.open(face_alert("a1"), T0, HOUR, None)
    second = book.open(face_alert("a2"), T0, HOUR, None)
    assert first and second
    book.apply(parse_case_command("DISMISS", f"{first.case_id} not him"), "a@x", T0 + 1)
    again = book.apply(parse_case_command("dismiss", second.case_id), "a@x", T0 + 2)
    assert again.subject_false_matches == 2 and book.false_matches["subj-a"] == 2
    book.load(first)  # an older version replayed late changes nothing
    assert book.cases[first.case_id].state == "dismissed" and book.false_matches["subj-a"] == 2


def test_dismissing_a_sales_block_labels_nothing_over_another_cases_confirmed_fraud() -> None:
    book = CaseBook()
    face = book.open(face_alert(), T0, HOUR, None)
    blocked = book.open(dataclasses.replace(face_alert("blocked:tx-1"), kind="BLOCKED_TRANSACTION"), T0, HOUR, None)
    other = book.open(
        dataclasses.replace(face_alert("blocked:tx-2"), kind="BLOCKED_TRANSACTION", transaction_id="tx-2"),
        T0,
        HOUR,
        None,
    )
    assert face and blocked and other
    book.apply(parse_case_command("CONFIRM", f"{face.case_id} fraud"), "a@x", T0 + 1)
    dismissed = book.apply(parse_case_command("DISMISS", f"{blocked.case_id} receipt"), "b@x", T0 + 2)
    assert (dismissed.state, dismissed.fraud_label, dismissed.verdict_reason) == ("dismissed", None, "receipt")
    assert dismissed.notes[-1].actor == "case-service" and face.case_id in dismissed.notes[-1].text
    assert book.labelled(dismissed, FRAUD) == [face.case_id]
    elsewhere = book.apply(parse_case_command("DISMISS", other.case_id), "b@x", T0 + 3)
    assert elsewhere.fraud_label == LEGITIMATE and elsewhere.notes == (), "another sale's fraud changes nothing"


def test_the_book_expires_only_due_cases() -> None:
    book = CaseBook()
    early = book.open(face_alert("a1"), T0, HOUR, None)
    book.open(dataclasses.replace(face_alert("a2"), event_time=T0 + HOUR), T0 + HOUR, HOUR, None)
    assert early and [c.case_id for c in book.due(T0 + HOUR)] == [early.case_id]
    assert book.due(T0 + HOUR) == []


def test_a_command_for_an_unknown_case_is_refused() -> None:
    with pytest.raises(Refused) as refused:
        CaseBook().apply(parse_case_command("CONFIRM", "case-000000000000"), "a@x", T0)
    assert refused.value.kind == "unknown_case"


@pytest.mark.parametrize(
    ("verb", "argument", "problem"),
    [
        ("CONFIRM", None, "needs a case id"),
        ("CONFIRM", "case-1a2b3c4d5e6f maybe", "only the word `fraud`"),
        ("ESCALATE", "case-1a2b3c4d5e6f now", "nothing after"),
        ("ASSIGN", "case-1a2b3c4d5e6f", "one person"),
        ("NOTE", "case-1a2b3c4d5e6f", "some text"),
    ],
)
def test_malformed_case_commands_say_what_is_missing(verb: str, argument: str | None, problem: str) -> None:
    with pytest.raises(Refused, match=problem):
        parse_case_command(verb, argument)


def test_case_commands_parse_their_arguments() -> None:
    assert parse_case_command("confirm", "case-1a2b3c4d5e6f FRAUD").fraud is True
    assert (
        parse_case_command("DISMISS", "case-1a2b3c4d5e6f wrong person, different coat").text
        == "wrong person, different coat"
    )
    assert parse_case_command("ASSIGN", "case-1a2b3c4d5e6f guard@example.com").text == "guard@example.com"
    with pytest.raises(InvalidRecord) as bad:
        parse_case_command("CONFIRM", "../etc")
    assert bad.value.kind == "invalid_id"


def test_a_verdict_given_before_the_expiry_decides_the_case_the_service_expired_before_reading_it() -> None:
    case = opened(blocked_alert())
    gone = expire(case, case.expires_at + HOUR)
    assert gone is not None
    late = confirm(gone, "a@x", case.expires_at + HOUR, given_at=case.expires_at - 1)
    assert (late.state, late.fraud_label, late.decided_by) == ("confirmed", FRAUD, "a@x")
    assert dismiss(gone, "a@x", case.expires_at + HOUR, given_at=case.expires_at - 1).fraud_label == LEGITIMATE
    for given_at in (case.expires_at, None):  # given after the expiry, or when unknown: the expiry stands
        with pytest.raises(Refused, match="already expired"):
            confirm(gone, "a@x", case.expires_at + HOUR, given_at=given_at)
    with pytest.raises(Refused, match="already confirmed"):  # the first verdict still wins
        dismiss(late, "b@x", case.expires_at + HOUR, given_at=case.expires_at - 1)


def test_notes_and_reasons_lose_control_characters_and_direction_overrides_but_keep_their_lines() -> None:
    """A note or reason is shown on the case page, in OpenSearch and in the audit: a terminal escape, a NUL or a
    right-to-left override (a note that reads as something else than it says) does not go in with it."""
    noted = add_note(opened(), "lead@example.com", "paid\x1b[2J at\x00 the\u202e desk\r\nsecond line\ttab", T0 + 1)
    assert noted.notes[-1].text == "paid[2J at the desk\nsecond line\ttab"
    dismissed = dismiss(opened(), "lead@example.com", T0 + 1, reason="\x07wrong\x85\u2066person\x9b")
    assert dismissed.verdict_reason == "wrong\nperson"
    with pytest.raises(Refused, match="needs some text"):
        add_note(opened(), "lead@example.com", "\x1b\x00\u202e", T0 + 1)
    for person in ("lead@example.com\u202e", "lead\x00@example.com", "lead@exa\x1bmple.com"):
        with pytest.raises(Refused, match="one person"):
            assign(opened(), "lead@example.com", person, T0 + 1)
    assert add_note(opened(), "a@example.com", "👨‍👩‍👧 ok", T0 + 1).notes[-1].text == "👨‍👩‍👧 ok", "emoji joiners stay"


def test_a_webex_person_id_repeats_only_its_own_verdict_letter_case_and_all() -> None:
    """A card press from a person Webex gives no address for is by their Webex person id (case-sensitive base64):
    it repeats that person's verdict, not another's whose id differs only in its letters' case."""
    pat = "Y2lzY29zcGFyazovL3VzL1BFT1BMRS9wYXQ"
    case = confirm(opened(), pat, T0 + 1)
    assert repeats(case, "CONFIRM", False, pat)
    assert not repeats(case, "CONFIRM", False, pat.swapcase())
    assert repeats(confirm(opened(), "Jane@Store.test", T0 + 1), "CONFIRM", False, "jane@store.test")


def test_only_the_same_verdict_by_the_same_person_repeats_a_decided_case() -> None:
    case = opened(face_alert())
    assert not repeats(case, "CONFIRM", False, "a@x"), "an undecided case is decided, not repeated"
    done = confirm(case, "a@x", 10)
    assert repeats(done, "CONFIRM", False, "a@x")
    assert not repeats(done, "CONFIRM", True, "a@x") and not repeats(done, "DISMISS", False, "a@x")
    assert not repeats(done, "CONFIRM", False, "b@x"), "another person's verdict is refused as before"
    assert repeats(dismiss(case, "a@x", 10), "DISMISS", False, "a@x")
    gone = expire(case, case.expires_at)
    assert gone is not None and not repeats(gone, "DISMISS", False, "case-service")


@pytest.mark.parametrize(
    ("person", "why"),
    [
        ("gu\u0430rd@example.com", "plain ASCII"),  # Cyrillic a in the name
        ("guard@ex\u0430mple.com", "mixes Cyrillic and Latin"),  # Cyrillic a in the domain
        ("guard@\u0430\u0440\u0440\u04cf\u0435.com", "look Latin"),  # "apple" in Cyrillic letters alone
        ("gu\u200dard@example.com", "invisible"),  # a zero-width joiner
        ("guard@exa\u200cmple.com", "invisible"),  # a zero-width non-joiner
        ("guard@\uff45xample.com", "stand for others"),  # a full-width e
        ("guard", "not an e-mail address"),
        ("guard@example..com", "not a domain name"),
    ],
)
def test_assign_to_a_lookalike_or_non_address_is_refused_with_the_reason(person: str, why: str) -> None:
    """The owner is who the case page and the audit say has the case: a lookalike of a colleague's address was
    accepted as it came and read as theirs."""
    for refuse in (
        lambda: assign(opened(), "lead@example.com", person, T0 + 1),
        lambda: parse_case_command("ASSIGN", f"case-1a2b3c4d5e6f {person}"),
    ):
        with pytest.raises(Refused, match=why) as refused:
            refuse()
        assert refused.value.kind == "bad_command"


def test_assign_takes_real_addresses_international_domains_included() -> None:
    for person in (
        "guard@example.com",
        "jane.doe+cases@store.example",
        "lead@localhost",
        "a@b\u00fccher.de",
        "a@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
        "a@\u4f8b\u3048.jp",
    ):
        assert check_assignee(person) == person
        assert assign(opened(), "lead@example.com", person, T0 + 1).owner == person


def test_a_case_id_in_capitals_names_its_case_and_a_transaction_id_is_no_case_id() -> None:
    """Both were taken as case ids no case has: the command waited for the case and was refused ``unknown_case``
    15 minutes later, while the sender had read "Sent"."""
    assert parse_case_command("CONFIRM", "CASE-1A2B3C4D5E6F fraud").case_id == "case-1a2b3c4d5e6f"
    with pytest.raises(Refused, match="starts with `case-`") as refused:
        parse_case_command("CONFIRM", "tx-123")
    assert refused.value.kind == "bad_command"


@pytest.mark.parametrize("case_id", ["case-1a2b3c4d5e6", "case-1a2b3c4d5e6f0", "case-1a2b3c4d5e6g", "case-x"])
def test_a_case_id_of_the_wrong_shape_is_refused_at_once_not_waited_for(case_id: str) -> None:
    """A digit short or over, or a letter past ``f``: no case ever has it, so the command waited 15 minutes for the
    case and was refused ``unknown_case`` in the audit, after the bot had answered "Sent"."""
    with pytest.raises(Refused, match="twelve hex digits") as refused:
        parse_case_command("CONFIRM", case_id)
    assert refused.value.kind == "bad_command"


def test_the_same_verdict_again_from_the_same_address_in_other_letter_case_repeats() -> None:
    """Confirmed in Webex as ``Jane@Store.test``, then on the case page logged in as ``jane@store.test`` (one person
    to the allow-list): the second was refused ``illegal_transition`` and dead-lettered as another person's."""
    done = confirm(opened(face_alert()), "Jane@Store.test", 10)
    assert repeats(done, "CONFIRM", False, "jane@store.test")
    assert not repeats(done, "CONFIRM", False, "jane@store.test.evil"), "another address is still another person"
