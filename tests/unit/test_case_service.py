"""Case service decisions (no Kafka): alerts open cases, signed verdicts apply with their effects, forged ones
change nothing, undecided cases expire."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from pydantic import SecretStr

from infra.command_auth import SIGNATURE_HEADER, authenticate_command, sign_command
from infra.processes import StopRequest
from infra.settings import CasesSettings, Settings, WebexSettings
from jobs.cases.core import case_id_for
from jobs.cases.service import CaseCore, Source
from jobs.model.labels import latest_labels
from schemas.records import (
    MAX_CASE_TEXT,
    WEBEX_REPLY_PERSON,
    WEBEX_REPLY_ROOM,
    Alert,
    AuditEvent,
    BotCommand,
    Case,
    DeadLetter,
    Label,
    WatchlistEntry,
)
from schemas.topics import AUDIT, CASES, COMMANDS, DEAD_LETTERS, LABELS
from tests.builders import partitions_led

NOW = 1_800_000_000_000
KEY = "unit-test-command-signing-key"
GUARD = "guard@example.com"
LEAD = "lead@example.com"


@pytest.fixture
def core() -> CaseCore:
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=f"{GUARD},{LEAD}")
    core = CaseCore(Settings(webex=webex, cases=CasesSettings(expire_after_s=600, flag_dismissals=2)))
    core.marked_at = NOW  # the compaction marker is due an hour on (its own test)
    return core


def alert_src(
    alert_id: str = "watchlist:tx-1:subj-a",
    kind: str = "WATCHLIST_MATCH",
    offset: int = 0,
    event_time: int = NOW,
    **fields: Any,
) -> Source:
    alert = Alert(
        alert_id=alert_id,
        kind=kind,
        severity="high",
        event_time=event_time,
        store_id="store-001",
        summary="Possible suspect at lane-01",
        lane_id="lane-01",
        transaction_id="tx-1",
        subject_id="subj-a" if kind != "BLOCKED_TRANSACTION" else None,
        category="SUSPECT" if kind != "BLOCKED_TRANSACTION" else None,
        similarity=0.9 if kind != "BLOCKED_TRANSACTION" else None,
        snapshot_ref="file:checkout/tx-1.jpg" if kind != "BLOCKED_TRANSACTION" else None,
    )
    return Source("alerts", 0, offset, alert_id.encode(), replace(alert, **fields).encode())


def command_src(verb: str, arg: str, cid: str, offset: int = 1, actor: str = GUARD, key: str = KEY) -> Source:
    cmd = BotCommand(command_id=cid, issued_at=NOW - 1000, verb=verb, actor=actor, argument=arg, room_id="room-1")
    return Source("commands", 0, offset, cid.encode(), cmd.encode(), ((SIGNATURE_HEADER, sign_command(cmd, key)),))


def of(outs, topic):
    return [o for o in outs if o.topic == topic]


def case_of(outs) -> Case:
    (out,) = of(outs, CASES)
    return Case.decode(out.value)


def audits(outs) -> list[AuditEvent]:
    return [AuditEvent.decode(o.value) for o in of(outs, AUDIT)]


def opened(core: CaseCore, **kw) -> Case:
    return case_of(core.on_alert(alert_src(**kw), NOW))


def test_an_alert_opens_one_case_with_the_enrolled_reference_image(core) -> None:
    entry = WatchlistEntry("subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg")
    core.load_watchlist(b"subj-a", entry.encode())
    case = opened(core)
    assert case.case_id == case_id_for("watchlist:tx-1:subj-a") and case.state == "open"
    assert (case.snapshot_ref, case.reference_image_ref) == (
        "file:checkout/tx-1.jpg",
        "file:reference/subj-a.jpg",
    )
    assert core.on_alert(alert_src(offset=7), NOW) == [], "a redelivered alert opens no second case"


def test_a_signed_confirm_closes_the_face_case_asks_for_a_template_and_labels_nothing(core) -> None:
    case = opened(core)
    outs = core.on_command(command_src("CONFIRM", case.case_id, "m1"), NOW)
    closed = case_of(outs)
    assert (closed.state, closed.version, closed.owner) == ("confirmed", 2, GUARD)
    (audit,) = audits(outs)
    assert (audit.action, audit.outcome, audit.actor, audit.subject_id) == ("CONFIRM", "DONE", GUARD, "subj-a")
    assert audit.details["case_id"] == case.case_id and audit.details["template_requested"] == "true"
    assert of(outs, LABELS) == []
    (learn_out,) = of(outs, COMMANDS)
    learn = BotCommand.decode(learn_out.value)
    assert (learn.verb, learn.argument, learn.actor) == ("LEARN", "subj-a file:checkout/tx-1.jpg", GUARD)
    authenticate_command(learn, learn_out.headers, core.settings.webex, NOW)  # the watchlist service accepts it
    assert core.on_command(command_src("CONFIRM", case.case_id, "m1"), NOW) == [], "a replayed command is a no-op"


def test_confirm_fraud_publishes_a_fraud_label_for_the_transaction(core) -> None:
    case = opened(core)
    outs = core.on_command(command_src("CONFIRM", f"{case.case_id} fraud", "m1"), NOW)
    (label_out,) = of(outs, LABELS)
    label = Label.decode(label_out.value)
    assert label_out.key == b"tx-1" and (label.label, label.source, label.case_id) == (1, "case", case.case_id)
    assert label.decided_by == GUARD


def test_a_blocked_transaction_dismissed_is_labelled_legitimate(core) -> None:
    case = opened(core, alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION")
    outs = core.on_command(command_src("DISMISS", f"{case.case_id} receipt found", "m1"), NOW)
    assert Label.decode(of(outs, LABELS)[0].value).label == 0
    assert of(outs, COMMANDS) == []


@pytest.mark.parametrize("fraud_first", [True, False])
def test_a_sale_confirmed_fraud_in_one_case_stays_fraud_whatever_order_its_other_case_is_dismissed(
    core, fraud_first
) -> None:
    face = opened(core)  # a watchlist match at the checkout of tx-1
    blocked = opened(core, alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION")
    fraud = command_src("CONFIRM", f"{face.case_id} fraud", "m1", offset=1)
    dismissal = command_src("DISMISS", f"{blocked.case_id} receipt found", "m2", offset=2)
    first, second = (fraud, dismissal) if fraud_first else (dismissal, fraud)
    outs = [*core.on_command(first, NOW), *core.on_command(second, NOW + 1)]
    in_force = latest_labels((o.key, o.value) for o in of(outs, LABELS))  # what train joins
    assert {tx: label.label for tx, label in in_force.by_transaction.items()} == {"tx-1": 1}
    dismissed = next(Case.decode(o.value) for o in of(outs, CASES) if o.key == blocked.case_id.encode())
    by_action = {a.action: a for a in audits(outs)}
    if fraud_first:  # the dismissal labels nothing, and says why on the case and in the audit
        assert dismissed.fraud_label is None and len(of(outs, LABELS)) == 1
        assert dismissed.notes[-1].text == f"no legitimate label for tx-1: {face.case_id} confirmed it as fraud"
        assert by_action["DISMISS"].details["label_withheld"].startswith(f"0: {face.case_id}")
    else:  # the fraud label comes after the legitimate one and replaces it
        assert by_action["CONFIRM"].details["label_replaces"] == blocked.case_id


def test_dismissals_count_against_the_subject_and_flag_it_at_the_setting(core) -> None:
    first = opened(core, alert_id="a1")
    second = opened(core, alert_id="a2")
    outs = core.on_command(command_src("DISMISS", f"{first.case_id} not him", "m1"), NOW)
    assert case_of(outs).subject_false_matches == 1 and [a.action for a in audits(outs)] == ["DISMISS"]
    outs = core.on_command(command_src("DISMISS", second.case_id, "m2", offset=2), NOW)
    assert case_of(outs).subject_false_matches == 2
    flag = next(a for a in audits(outs) if a.action == "FLAG_SUBJECT")
    assert flag.subject_id == "subj-a" and flag.details["subject_false_matches"] == "2"
    assert of(outs, LABELS) == [] and of(outs, COMMANDS) == []


@pytest.mark.parametrize(
    ("actor", "key"), [(GUARD, "not-the-key"), ("stranger@example.com", KEY)], ids=["forged", "not-allowed"]
)
def test_an_unverified_command_changes_nothing_and_is_dead_lettered(core, actor: str, key: str) -> None:
    case = opened(core)
    outs = core.on_command(command_src("CONFIRM", case.case_id, "m1", actor=actor, key=key), NOW)
    assert of(outs, CASES) == []
    (audit,) = audits(outs)
    assert (audit.outcome, audit.actor) == ("FAILED", "unverified") and audit.reason.startswith("unauthorized")
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "unauthorized"
    assert core.book.cases[case.case_id].state == "open"


def test_a_signed_verdict_with_a_megabyte_command_id_is_refused_invalid_id_with_a_small_audit_event(core) -> None:
    """The audit event is named by the command id and carries it: a signed one of 1 MB made an event of 1 MB."""
    case = opened(core)
    outs = core.on_command(command_src("CONFIRM", case.case_id, "m" * 1_000_000), NOW)
    assert of(outs, CASES) == [] and core.book.cases[case.case_id].state == "open"
    (audit,) = audits(outs)
    assert (audit.outcome, audit.audit_id) == ("FAILED", "case-refused:commands:0:1") and audit.command_id is None
    assert (audit.reason or "").startswith("invalid_id: command_id is not a command id (1000000-character string")
    assert len(of(outs, AUDIT)[0].value) < 2000
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "invalid_id"
    webex_id = "Y2lzY29zcGFyazovL3VzL01FU1NBR0UvOTJkYjNiZTAtNDNiZC0xMWU2LThhZTktZGQ1YjNkZmM1NjVk+/=="
    assert case_of(core.on_command(command_src("CONFIRM", case.case_id, webex_id, offset=2), NOW)).state != "open"


def test_a_signed_verdict_with_a_megabyte_actor_is_refused_invalid_id_with_a_small_audit_event(core) -> None:
    """The actor is copied into the audit event and the case: a signed one of 1 MB made each of them 1 MB."""
    case = opened(core)
    outs = core.on_command(command_src("CONFIRM", case.case_id, "m1", actor="g" * 1_000_000), NOW)
    assert of(outs, CASES) == [] and core.book.cases[case.case_id].state == "open"
    (audit,) = audits(outs)
    assert (audit.outcome, audit.audit_id, audit.actor) == ("FAILED", "case-refused:commands:0:1", "unverified")
    assert (audit.reason or "").startswith("invalid_id: actor is not a command's actor (1000000-character string")
    assert len(of(outs, AUDIT)[0].value) < 2000
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "invalid_id"
    assert case_of(core.on_command(command_src("CONFIRM", case.case_id, "m2", offset=2), NOW)).state != "open"


def test_an_illegal_transition_is_refused_with_a_reason(core) -> None:
    case = opened(core)
    core.on_command(command_src("CONFIRM", case.case_id, "m1"), NOW)
    outs = core.on_command(command_src("DISMISS", case.case_id, "m2", offset=2), NOW)
    (audit,) = audits(outs)
    assert audit.outcome == "FAILED" and "already confirmed" in audit.reason
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "illegal_transition"
    assert case_of(outs).state == "confirmed", "the verdict changes nothing but a note"


def test_a_verdict_refused_because_someone_else_decided_first_is_noted_on_the_case(core) -> None:
    """The bot said "Sent" (the page 202) before the service read the verdict; the case was confirmed by another
    person in between. The refusal was only in the audit and a dead letter: the case now carries a note saying
    whose verdict was refused and why, shown on the case page, and kept across a replay (no second note)."""
    case = opened(core)
    core.on_command(command_src("CONFIRM", case.case_id, "m1", actor=LEAD), NOW)
    outs = core.on_command(command_src("DISMISS", f"{case.case_id} receipt found", "m2", offset=2), NOW + 5)
    noted = case_of(outs)
    assert (noted.state, noted.decided_by, noted.version) == ("confirmed", LEAD, case.version + 2)
    (note,) = noted.notes
    assert note.actor == "case-service" and note.at == NOW + 5
    assert note.text.startswith(f"dismiss by {GUARD} was refused: {case.case_id} is already confirmed")
    assert core.book.cases[case.case_id] == noted
    assert core.on_command(command_src("DISMISS", f"{case.case_id} receipt found", "m2", offset=2), NOW + 9) == []


def test_a_webex_verdict_the_case_refuses_names_the_room_and_person_to_reply_to_and_a_dashboard_one_does_not(
    core,
) -> None:
    """The bot answered "Sent"; the refusal came later and only the audit knew: its event now says where the person
    who gave it waits (the alert sender replies there, sinks/alerts/notices.py). The case page shows its own."""
    case = opened(core)
    core.on_command(command_src("CONFIRM", case.case_id, "m1", actor=LEAD), NOW)
    outs = core.on_command(command_src("DISMISS", case.case_id, "m2", offset=2), NOW + 5)
    (refusal,) = audits(outs)
    assert refusal.outcome == "FAILED" and refusal.details == {
        "case_id": case.case_id,
        WEBEX_REPLY_ROOM: "room-1",
        WEBEX_REPLY_PERSON: GUARD,
    }
    page = BotCommand(
        command_id="page-1", issued_at=NOW, verb="DISMISS", actor=GUARD, argument=case.case_id, source="dashboard"
    )
    src = Source("commands", 0, 3, b"page-1", page.encode(), ((SIGNATURE_HEADER, sign_command(page, KEY)),))
    (from_page,) = audits(core.on_command(src, NOW + 6))
    assert from_page.outcome == "FAILED" and from_page.details == {"case_id": case.case_id}
    unknown = core._taken_up(command_src("CONFIRM", "case-0123456789ab", "m4", offset=4), NOW + 7, wait=False)
    assert audits(unknown)[0].details[WEBEX_REPLY_ROOM] == "room-1", "a case that never opened: told too"


def test_a_signed_webex_verdict_refused_as_too_old_names_where_to_reply_but_an_unsigned_one_does_not(core) -> None:
    """The case service was down past CG_WEBEX__COMMAND_MAX_AGE_S: the bot's verdict is refused ``unauthorized``
    though the bot signed it, and the person is told; an unsigned command's room is only a claim, never replied to."""
    case = opened(core)
    late = NOW + 901_000
    (refusal,) = audits(core.on_command(command_src("CONFIRM", case.case_id, "m1"), late))
    assert refusal.reason.startswith("unauthorized: issued") and refusal.actor == "unverified"
    assert (refusal.details[WEBEX_REPLY_ROOM], refusal.details[WEBEX_REPLY_PERSON]) == ("room-1", GUARD)
    assert refusal.details["case_id"] == case.case_id
    (forged,) = audits(core.on_command(command_src("CONFIRM", case.case_id, "m2", offset=2, key="not-the-key"), NOW))
    assert forged.reason == "unauthorized: signature does not match"
    assert WEBEX_REPLY_ROOM not in forged.details and WEBEX_REPLY_PERSON not in forged.details


@pytest.mark.parametrize("verdict", ["", " fraud"], ids=["confirm", "confirm-fraud"])
def test_a_second_press_of_the_same_verdict_by_the_same_person_is_unchanged_not_dead_lettered(core, verdict) -> None:
    """A double press of Confirm (two commands, two ids) dead-lettered the second as illegal_transition: noise."""
    case = opened(core)
    first = case_of(core.on_command(command_src("CONFIRM", case.case_id + verdict, "m1"), NOW))
    outs = core.on_command(command_src("CONFIRM", case.case_id + verdict, "m2", offset=2), NOW + 500)
    (audit,) = audits(outs)
    assert (audit.action, audit.outcome, audit.actor, audit.command_id) == ("CONFIRM", "UNCHANGED", GUARD, "m2")
    assert audit.details == {"case_id": case.case_id} and "already confirmed" in audit.reason
    assert [o.topic for o in outs] == [AUDIT] and core.book.cases[case.case_id] == first, (
        "no version, no LEARN, no label"
    )
    assert core.on_command(command_src("CONFIRM", case.case_id + verdict, "m2", offset=2), NOW) == [], "replayed"
    other = "" if verdict else " fraud"
    for cmd in (
        command_src("DISMISS", case.case_id, "m3", offset=3),
        command_src("CONFIRM", case.case_id + other, "m4"),
    ):
        refused = core.on_command(cmd, NOW + 600)  # the opposite verdict (or another one) is still refused
        assert DeadLetter.decode(of(refused, DEAD_LETTERS)[0].value).error_kind == "illegal_transition"


def test_assign_and_note_write_new_versions(core) -> None:
    case = opened(core)
    assigned = case_of(core.on_command(command_src("ASSIGN", f"{case.case_id} lead@example.com", "m1"), NOW))
    noted = case_of(core.on_command(command_src("NOTE", f"{case.case_id} seen at the door", "m2", 2), NOW))
    assert (assigned.owner, assigned.version) == ("lead@example.com", 2)
    assert noted.version == 3 and noted.notes[0].text == "seen at the door" and noted.owner == "lead@example.com"


def test_an_assign_to_a_lookalike_address_is_refused_bad_command_and_changes_nothing(core) -> None:
    case = opened(core)
    outs = core.on_command(command_src("ASSIGN", f"{case.case_id} le\u0430d@example.com", "m1"), NOW)
    assert of(outs, CASES) == []
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "bad_command"
    assert "plain ASCII" in (audits(outs)[0].reason or "")
    assert core.book.cases[case.case_id].owner is None


def test_an_assign_to_someone_off_the_allow_list_is_refused_bad_command_and_changes_nothing(core) -> None:
    """It was applied: the case's owner was someone who could not act on it."""
    case = opened(core)
    outs = core.on_command(command_src("ASSIGN", f"{case.case_id} stranger@example.com", "m1"), NOW)
    assert of(outs, CASES) == []
    assert DeadLetter.decode(of(outs, DEAD_LETTERS)[0].value).error_kind == "bad_command"
    assert "stranger@example.com is not on the allow-list" in (audits(outs)[0].reason or "")
    assert core.book.cases[case.case_id].owner is None
    assigned = case_of(core.on_command(command_src("ASSIGN", f"{case.case_id} LEAD@example.com", "m2", 2), NOW))
    assert assigned.owner == "LEAD@example.com"  # the allow-list reads an address in any letter case


def test_undecided_cases_expire_after_the_setting_once(core) -> None:
    case = opened(core)
    assert core.expire(NOW + 599_999) == []
    outs = core.expire(NOW + 600_000)
    assert case_of(outs).state == "expired" and audits(outs)[0].action == "EXPIRE"
    assert core.expire(NOW + 700_000) == []
    late = core.on_command(command_src("CONFIRM", case.case_id, "m1"), NOW + 700_000)
    assert "already expired" in audits(late)[0].reason
    assert case_of(late).state == "expired" and case_of(late).notes[-1].text.startswith(f"confirm by {GUARD} was")


def test_a_record_that_does_not_decode_on_cases_or_watchlist_is_skipped_when_state_is_rebuilt(core, caplog) -> None:
    """The start-up read of ``cases`` and ``watchlist`` stops at an exception: one record the service cannot decode
    (written by a newer version before a rollback, a stray producer) stopped the case service at every start."""
    case = opened(core)
    restarted = CaseCore(core.settings)
    entry = WatchlistEntry("subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg")
    with caplog.at_level("WARNING", logger="jobs.cases.service"):
        restarted.load_case(b"case-000000000000", b"not a case record")
        restarted.load_case(b"\xff\xfe", None)  # a tombstone whose key is not text
        restarted.load_case(case.case_id.encode(), case.encode())
        restarted.load_watchlist(b"subj-b", b"not an entry")
        restarted.load_watchlist(b"subj-a", entry.encode())
    assert list(restarted.book.cases) == [case.case_id]
    assert restarted.references == {"subj-a": "file:reference/subj-a.jpg"}
    skipped = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(skipped) == 2 and "case-000000000000" in skipped[0] and "not a case record" not in skipped[0]


def test_state_is_rebuilt_from_the_topics(core) -> None:
    case = opened(core)
    outs = core.on_command(command_src("DISMISS", case.case_id, "m0"), NOW)
    restarted = CaseCore(core.settings)
    restarted.load_case(case.case_id.encode(), case.encode())
    for out in outs:
        if out.topic == CASES:
            restarted.load_case(out.key, out.value)
        elif out.topic == AUDIT:
            restarted.load_audit(out.key, out.value)
    assert restarted.on_alert(alert_src(), NOW) == []
    assert restarted.on_command(command_src("DISMISS", case.case_id, "m0"), NOW) == []
    assert restarted.book.false_matches["subj-a"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("similarity", float("nan")), ("similarity", float("inf")), ("amount", 1e308), ("match_threshold", -1.0)],
)
def test_an_alert_with_a_number_the_alert_sender_refuses_opens_no_case_and_is_dead_lettered(core, field, value) -> None:
    """Copied, a NaN similarity was indexed and shown on the case page of an alert no channel sent."""
    outs = core.on_alert(alert_src(**{field: value}), NOW)
    assert [o.topic for o in outs] == [DEAD_LETTERS] and core.book.cases == {}
    letter = DeadLetter.decode(outs[0].value)
    assert letter.error_kind == "invalid_field" and field in letter.reason and str(value) not in letter.reason


def test_a_case_keeps_its_alerts_summary_as_one_cut_line_of_text(core) -> None:
    """The summary was copied whole, up to the 256 KiB record limit, into the case, its index and its page."""
    assert opened(core).summary == "Possible suspect at lane-01"
    case = opened(core, alert_id="watchlist:tx-2:subj-a", summary="\u202e" + "Possible suspect " * 5_000)
    assert len(case.summary) == MAX_CASE_TEXT and case.summary.startswith("Possible suspect")


def test_garbage_input_is_dead_lettered_and_other_verbs_are_not_ours(core) -> None:
    assert [o.topic for o in core.on_alert(Source("alerts", 0, 3, None, b"junk"), NOW)] == [DEAD_LETTERS]
    assert core.on_command(command_src("FRAUD", "tx-1", "m1"), NOW) == []


def test_every_case_version_indexes_as_one_document_the_latest_winning(core) -> None:
    from confluent_kafka import Message

    from sinks.opensearch.sink import to_actions

    case = opened(core)
    later = case_of(core.on_command(command_src("NOTE", f"{case.case_id} seen at the door", "m1"), NOW))
    batch = [
        Message(topic="cg.cases", partition=0, offset=offset, key=c.case_id.encode(), value=c.encode())
        for offset, c in ((10, case), (11, later))
    ]
    actions, dead = to_actions(batch, index_prefix="cg", topic_prefix="cg.")
    assert dead == []
    [action] = actions  # one document per case in a batch: the version published last
    assert (action.op["_index"], action.op["_id"], action.op["version"]) == ("cg-cases-all", case.case_id, 11)
    assert action.op["_source"]["notes"][0]["text"] == "seen at the door" and action.op["_source"]["version"] == 2


def test_a_subject_is_flagged_at_every_multiple_of_the_setting_not_at_each_dismissal(core) -> None:
    flags = []
    for i in range(5):
        case = opened(core, alert_id=f"a{i}", offset=i)
        outs = core.on_command(command_src("DISMISS", case.case_id, f"m{i}", offset=i), NOW)
        flags += [a.details["subject_false_matches"] for a in audits(outs) if a.action == "FLAG_SUBJECT"]
    assert flags == ["2", "4"]


def test_a_command_that_reached_kafka_in_time_is_applied_however_late_the_service_reads_it(core) -> None:
    opened(core)
    late = NOW + 3_600_000  # the service was down for an hour
    src = command_src("DISMISS", f"{case_id_for('watchlist:tx-1:subj-a')} other person", "c-late")
    assert of(core.on_command(src, late), DEAD_LETTERS), "judged by the reading time, it is stale"
    on_time = replace(command_src("DISMISS", f"{case_id_for('watchlist:tx-1:subj-a')} x", "c-late-2"), written_at=NOW)
    assert case_of(core.on_command(on_time, late)).state == "dismissed"


def test_a_verdict_read_before_its_alert_waits_for_the_case_and_holds_back_the_commit(core) -> None:
    case_id = case_id_for("watchlist:tx-1:subj-a")
    early = command_src("DISMISS", f"{case_id} not them", "c-early", offset=7)
    assert core.on_command(early, NOW) == []
    assert core.oldest_waiting("commands", 0) == 7
    outs = core.on_alert(alert_src(), NOW + 10)
    assert [Case.decode(o.value).state for o in of(outs, CASES)] == ["open", "dismissed"]
    assert core.oldest_waiting("commands", 0) is None


def test_a_verdict_for_a_case_that_never_opens_is_refused_once_it_is_too_old(core) -> None:
    held = replace(command_src("CONFIRM", "case-000000000000", "c-orphan", offset=3), written_at=NOW)
    assert core.on_command(held, NOW) == []
    assert core.expire(NOW + 1000) == []
    max_age_ms = int(core.settings.webex.command_max_age_s * 1000)
    outs = core.expire(NOW + max_age_ms + 1)
    assert [DeadLetter.decode(o.value).error_kind for o in of(outs, DEAD_LETTERS)] == ["unknown_case"]
    assert core.oldest_waiting("commands", 0) is None


def test_a_restart_while_a_verdict_waits_reads_the_commands_after_it_again_and_repeats_none_of_them(core) -> None:
    """The waiting verdict holds the commands offset back, so a restart reads every command after it again: the
    applied and refused ones were skipped by their audit ids, but an undecodable one was dead-lettered again."""
    case = opened(core, alert_id="watchlist:tx-2:subj-a")
    early = command_src("DISMISS", case_id_for("watchlist:tx-1:subj-a"), "c-early", offset=7)
    later = [
        early,
        command_src("NOTE", f"{case.case_id} seen", "c-note", offset=8),
        command_src("CONFIRM", case.case_id, "c-forged", offset=9, key="not-the-key"),
        Source("commands", 0, 10, b"junk", b"junk"),
    ]
    outs = [out for src in later for out in core.on_command(src, NOW)]
    assert [DeadLetter.decode(o.value).error_kind for o in of(outs, DEAD_LETTERS)] == ["unauthorized", "not_avro"]
    assert core.oldest_waiting("commands", 0) == 7, "the commit stays before the waiting verdict"

    restarted = CaseCore(core.settings)  # state from the topics; the commands read again from offset 7
    for held in core.book.cases.values():
        restarted.load_case(held.case_id.encode(), held.encode())
    for out in of(outs, AUDIT):
        restarted.load_audit(out.key, out.value)
    assert [out for src in later for out in restarted.on_command(src, NOW + 60_000)] == []
    assert restarted.oldest_waiting("commands", 0) == 7, "the verdict waits again"
    reopened = restarted.on_alert(alert_src(), NOW + 61_000)
    assert [Case.decode(o.value).state for o in of(reopened, CASES)] == ["open", "dismissed"]


DAY = 86_400_000


def retained(days: float = 30.0) -> CaseCore:
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=GUARD)
    cases = CasesSettings(expire_after_s=600, flag_dismissals=2, retain_decided_days=days)
    return CaseCore(Settings(webex=webex, cases=cases))


def test_a_decided_case_is_removed_after_the_retention_period_and_audited() -> None:
    core = retained(30)
    case = opened(core)
    core.on_command(command_src("DISMISS", case.case_id, "m0"), NOW)
    undecided = case_of(core.on_alert(alert_src("watchlist:tx-2:subj-a", offset=2), NOW))
    assert core.retire(NOW + 30 * DAY - 1) == [] and core.book.false_matches["subj-a"] == 1
    outs = core.retire(NOW + 30 * DAY + 1)
    [tombstone] = of(outs, CASES)
    assert (tombstone.key, tombstone.value) == (case.case_id.encode(), None)
    assert [(a.action, a.details["case_id"]) for a in audits(outs)] == [("RETIRE", case.case_id)]
    assert case.case_id not in core.book.cases and undecided.case_id in core.book.cases  # open cases stay
    assert core.book.false_matches["subj-a"] == 0  # its dismissal no longer counts against the subject
    assert core.retire(NOW + 31 * DAY) == []


def test_a_subject_flagged_again_after_retention_gets_a_new_flag_audit_id_not_the_earlier_ones() -> None:
    """Retention lowers the subject's dismissal count, so it reaches the same count again: the second flag must
    not repeat the first one's audit id (the audit topic is keyed by it, and one id is one event)."""
    core = retained(30)
    later = NOW + 31 * DAY

    def dismissed(alert_id: str, cid: str, at: int) -> list[AuditEvent]:
        case = case_of(core.on_alert(alert_src(alert_id, event_time=at), at))
        cmd = BotCommand(command_id=cid, issued_at=at - 1000, verb="DISMISS", actor=GUARD, argument=case.case_id)
        signed = ((SIGNATURE_HEADER, sign_command(cmd, KEY)),)
        return audits(core.on_command(Source("commands", 0, 1, cid.encode(), cmd.encode(), signed), at))

    dismissed("a1", "m1", NOW)
    [first] = [a for a in dismissed("a2", "m2", NOW) if a.action == "FLAG_SUBJECT"]
    core.retire(later)  # both dismissals are past retention: they stop counting
    dismissed("a3", "m3", later)
    [second] = [a for a in dismissed("a4", "m4", later) if a.action == "FLAG_SUBJECT"]
    assert first.details["subject_false_matches"] == second.details["subject_false_matches"] == "2"
    assert first.audit_id != second.audit_id
    assert first.details["case_id"] in first.audit_id and second.details["case_id"] in second.audit_id


def test_a_tombstone_read_at_start_forgets_the_case() -> None:
    core = retained()
    case = opened(core)
    restarted = retained()
    restarted.load_case(case.case_id.encode(), case.encode())
    restarted.load_case(case.case_id.encode(), None)
    assert restarted.book.cases == {}


def test_an_alert_read_late_opens_its_case_at_the_alert_time_and_expired_when_older_than_the_expiry(core) -> None:
    recent = case_of(core.on_alert(alert_src("watchlist:tx-2:subj-a", event_time=NOW - 5 * 60_000), NOW))
    assert (recent.state, recent.opened_at, recent.expires_at) == ("open", NOW - 300_000, NOW + 300_000)

    old = NOW - 20 * DAY  # e.g. the service lost its offsets and reads the alerts topic's 30 days again
    outs = core.on_alert(replace(alert_src(event_time=old), written_at=old), NOW)
    first, then = (Case.decode(o.value) for o in of(outs, CASES))
    assert (first.state, first.opened_at, first.expires_at) == ("open", old, old + 600_000)
    assert (then.state, then.version, then.decided_at) == ("expired", 2, NOW)
    assert [a.action for a in audits(outs)] == ["EXPIRE"]
    assert core.book.cases[then.case_id].state == "expired" and core.expire(NOW + 1) == []

    ahead = case_of(core.on_alert(alert_src("watchlist:tx-3:subj-a", event_time=NOW + 5_000), NOW))
    assert ahead.opened_at == NOW  # an alert clock ahead of ours opens now, not in the future


def test_every_alert_the_topic_still_holds_finds_its_case_so_none_opens_twice() -> None:
    """Coherent horizons: a case (decided when its alert is read, at the latest) is kept
    ``retain_decided_days`` (90), longer than the alerts topic keeps the alert (30 days), so a re-read alert
    always meets its case; alerts written longer ago than the horizon are skipped."""
    core = retained(90)
    written = NOW - 29 * DAY
    src = replace(alert_src(event_time=written), written_at=written)
    case = of(core.on_alert(src, NOW), CASES)
    assert case, "an alert the topic still holds opens its case"
    until = written + 30 * DAY  # the last moment the alerts topic holds it
    assert core.retire(until) == [] and core.on_alert(src, until) == []
    assert retained(90).on_alert(replace(src, written_at=NOW - 91 * DAY), NOW) == []


def test_inputs_written_before_the_retention_horizon_are_skipped_not_acted_on() -> None:
    core = retained(30)
    old_alert = replace(alert_src(), written_at=NOW - 31 * DAY)
    assert core.on_alert(old_alert, NOW) == [] and core.book.cases == {}
    case = opened(core)
    old_command = replace(command_src("CONFIRM", case.case_id, "m9"), written_at=NOW - 31 * DAY)
    assert core.on_command(old_command, NOW) == [] and core.book.cases[case.case_id].state == "open"


def test_audit_ids_older_than_the_horizon_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    import jobs.cases.service as service

    monkeypatch.setattr(service, "PRUNE_AT", 1)
    core = retained(30)
    case = opened(core)
    core.on_command(command_src("DISMISS", case.case_id, "m0"), NOW)
    core.done["case:ancient"] = NOW - 40 * DAY
    core.retire(NOW)
    assert "case:ancient" not in core.done and "case:m0" in core.done


def test_the_cases_topic_gets_a_compaction_marker_once_a_segment(core: CaseCore) -> None:
    """A segment rolls only on a write: on a quiet topic a retired case stayed readable until the next alert."""
    from schemas.topics import CASES, COMPACTION_MARKER, HOUR_MS

    assert core.expire(NOW + HOUR_MS - 1) == []
    [marker] = core.expire(NOW + HOUR_MS)
    assert (marker.topic, marker.key, marker.value) == (CASES, COMPACTION_MARKER, None)
    assert core.expire(NOW + HOUR_MS + 1) == [], "once per segment.ms"


def test_a_long_start_up_read_keeps_the_case_service_alive_and_goes_on_while_records_come(monkeypatch) -> None:
    """``cases`` and ``audit`` grow with the deployment's age: the start-up read must fail only when records stop
    coming, and /healthz must not call the service hung while it reads."""
    from infra.clients import control_topics
    from infra.metrics import Heartbeat
    from jobs.cases.service import CaseService

    now = [0.0]
    svc = CaseService.__new__(CaseService)
    svc.settings, svc._stop = Settings(), StopRequest()
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    calls: list[dict] = []

    def read(_settings, apply, **kwargs) -> dict:
        calls.append(kwargs)
        for _ in range(600):  # ten minutes of records, one a second
            now[0] += 1.0
            apply(CASES.full_name(""), b"case-1", b"v")
            assert svc.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of reading"
        return {}

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    keys: list[bytes | None] = []
    svc.replay(CASES, lambda key, _value: keys.append(key), since_ms=5)
    assert len(keys) == 600 and calls[0]["since_ms"] == 5
    assert calls[0]["stall_s"] is not None and calls[0]["timeout_s"] < svc.heartbeat.stale_s


def test_a_verdict_given_before_the_expiry_counts_when_the_service_reads_it_after_expiring_the_case(core) -> None:
    """The service was down: at its start the expiry sweep runs before it reads the commands written meanwhile."""
    case = opened(core, alert_id="blocked:tx-1", kind="BLOCKED_TRANSACTION")
    late = NOW + 3_600_000
    assert [Case.decode(o.value).state for o in of(core.expire(late), CASES) if o.value] == ["expired"]
    in_time = replace(command_src("CONFIRM", case.case_id, "m1"), written_at=case.expires_at - 10_000)
    outs = core.on_command(in_time, late)
    assert (case_of(outs).state, case_of(outs).decided_by) == ("confirmed", GUARD)
    (audit,) = audits(outs)
    assert (audit.action, audit.outcome, audit.details["replaced_expiry"]) == ("CONFIRM", "DONE", "true")
    (label,) = of(outs, LABELS)
    assert Label.decode(label.value).label == 1
    too_late = replace(command_src("DISMISS", case.case_id, "m2", offset=2), written_at=case.expires_at + 1)
    assert "already confirmed" in audits(core.on_command(too_late, late))[0].reason


class _SlowMetadata:
    """A reader of a topic of three partitions whose every metadata call takes its whole timeout on the test's
    clock (Kafka slow to answer) and that checks, at each call, that ``/healthz`` is still alive."""

    def __init__(self, topic: str, now: list[float], alive) -> None:
        self.topic, self.now, self.alive, self.read = topic, now, alive, False

    def _slow(self, timeout: float) -> None:
        assert self.alive(), f"/healthz stale after {self.now[0]:.0f} s of start-up calls"
        self.now[0] += timeout

    def list_topics(self, topic: str, timeout: float):
        from types import SimpleNamespace

        self._slow(timeout)
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=partitions_led(3))})

    def get_watermark_offsets(self, _tp, timeout: float) -> tuple[int, int]:
        self._slow(timeout)
        return 0, 1

    def offsets_for_times(self, partitions, timeout: float):
        from confluent_kafka import TopicPartition

        self._slow(timeout)
        return [TopicPartition(p.topic, p.partition, 0) for p in partitions]

    def assign(self, partitions) -> None:
        self.partitions = [p.partition for p in partitions]

    def poll(self, _timeout: float):
        from confluent_kafka import Message

        assert self.alive(), f"/healthz stale after {self.now[0]:.0f} s before the first record"
        self.now[0] += 0.2
        if self.read:
            return None
        self.read = True
        return Message(topic=self.topic, partition=0, offset=0, key=b"k", value=b"v")

    def position(self, partitions):
        from confluent_kafka import TopicPartition

        return [TopicPartition(p.topic, p.partition, 1) for p in partitions]

    def close(self) -> None:
        pass


def test_healthz_stays_alive_before_the_first_record_while_kafka_takes_its_whole_timeout_per_metadata_call(
    monkeypatch,
) -> None:
    """Before the first record the start-up read asks Kafka for the partitions, each one's end offset and (for
    ``audit``) the start offsets, each call waiting up to 30 s: their sum went past the heartbeat's 60 s."""
    from infra.clients import control_topics
    from infra.clients import kafka as kafka_clients
    from infra.metrics import Heartbeat
    from jobs.cases.service import CaseService

    now = [0.0]
    svc = CaseService.__new__(CaseService)
    svc.settings, svc._stop = Settings(), StopRequest()
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    topic = AUDIT.full_name(svc.settings.kafka.topic_prefix)
    monkeypatch.setattr(control_topics.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(
        kafka_clients, "consumer", lambda *_a, **_k: _SlowMetadata(topic, now, lambda: svc.heartbeat()[0])
    )
    keys: list[bytes | None] = []
    svc.replay(AUDIT, lambda key, _value: keys.append(key), since_ms=5)
    assert keys == [b"k"] and now[0] > 150, "five calls of 30 s each, then the record"


def test_a_forgotten_subject_s_cases_lose_their_image_refs_and_a_later_confirm_asks_for_no_template(core) -> None:
    """A forget (the watchlist tombstone) deletes the subject's images: its cases, and the case of the sale its
    buyer was enrolled from, kept the refs and wrote them again with every later version (and a confirm asked the
    watchlist service to learn from a deleted sighting)."""
    entry = WatchlistEntry(
        "subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg", "tx-enrol"
    )
    core.load_watchlist(b"subj-a", entry.encode())
    mine = opened(core)
    decided = opened(core, alert_id="watchlist:tx-2:subj-a", offset=2)
    core.on_command(command_src("DISMISS", decided.case_id, "m1"), NOW)

    def other_alert(alert_id: str, tx: str, subject: str) -> Source:
        alert = replace(Alert.decode(alert_src(alert_id).value), transaction_id=tx, subject_id=subject)
        return Source("alerts", 0, 3, alert_id.encode(), alert.encode())

    sale_case = case_of(core.on_alert(other_alert("watchlist:tx-enrol:subj-b", "tx-enrol", "subj-b"), NOW))
    other = case_of(core.on_alert(other_alert("watchlist:tx-9:subj-c", "tx-9", "subj-c"), NOW))

    tombstone = Source("watchlist", 0, 5, b"subj-a", None, (), NOW + 1000)
    outs = core.on_watchlist(tombstone, NOW + 2000)
    stripped = {Case.decode(o.value).case_id: Case.decode(o.value) for o in of(outs, CASES)}
    assert set(stripped) == {mine.case_id, decided.case_id, sale_case.case_id}
    for case in stripped.values():
        assert (case.snapshot_ref, case.reference_image_ref) == (None, None)
        assert case.updated_by == "case-service" and case.subject_id is not None
    assert stripped[decided.case_id].state == "dismissed", "the verdict stays"
    assert core.book.cases[other.case_id] == other
    assert core.on_watchlist(tombstone, NOW + 3000) == [], "a tombstone read again changes nothing"

    outs = core.on_command(command_src("CONFIRM", mine.case_id, "m2", offset=4), NOW + 3000)
    assert case_of(outs).state == "confirmed" and of(outs, COMMANDS) == []


def test_an_alert_from_before_its_subject_was_forgotten_read_after_opens_its_case_without_image_refs(core) -> None:
    core.on_watchlist(Source("watchlist", 0, 5, b"subj-a", None, (), NOW + 1000), NOW + 1000)
    late = case_of(core.on_alert(alert_src(), NOW + 2000))
    assert (late.snapshot_ref, late.reference_image_ref, late.subject_id) == (None, None, "subj-a")
    stale = case_of(core.on_alert(alert_src("watchlist:tx-4:subj-a", event_time=NOW + 3000), NOW + 3000))
    assert stale.snapshot_ref is None, "a match scored after the forget, of an entry gone, shows no face either"
    entry = WatchlistEntry("subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg")
    assert core.on_watchlist(Source("watchlist", 0, 6, b"subj-a", entry.encode(), (), NOW + 4000), NOW + 4000) == []
    after = case_of(core.on_alert(alert_src("watchlist:tx-5:subj-a", event_time=NOW + 5000), NOW + 5000))
    assert after.snapshot_ref == "file:checkout/tx-1.jpg", "a sighting after the subject was enrolled again keeps it"


def audit_record(action: str, at: int, subject: str = "subj-a", actor: str = GUARD, outcome: str = "DONE") -> bytes:
    return AuditEvent(f"command:{action}:{at}", at, action, outcome, actor, subject_id=subject).encode()


def alert_of(subject: str, tx: str, event_time: int = NOW) -> Source:
    alert = replace(Alert.decode(alert_src(event_time=event_time).value), transaction_id=tx, subject_id=subject)
    alert_id = f"watchlist:{tx}:{subject}:{event_time}"
    return Source("alerts", 0, 9, alert_id.encode(), replace(alert, alert_id=alert_id).encode())


def test_a_subject_forgotten_before_a_restart_stays_forgotten_until_it_is_enrolled_again(core) -> None:
    """The forget was kept only in memory: after a restart (the tombstone compacted away, or its offset committed),
    an alert from before the forget, not read yet, opened its case with the forgotten person's images."""
    entry = WatchlistEntry("subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg")
    core.load_watchlist(b"subj-a", entry.encode())  # the entry as the compacted topic holds it: enrolled again
    core.load_audit(b"command:e2", audit_record("ENROLL", NOW + 4000))  # read first: another audit partition
    core.load_audit(b"command:f1", audit_record("FORGET", NOW + 1000))
    core.load_audit(b"command:f9", audit_record("FORGET", NOW + 1000, subject="subj-tx-9"))
    core.load_audit(b"case-expire:x", audit_record("EXPIRE", NOW + 1000, subject="subj-y", actor="case-service"))
    core.load_audit(b"command:f0", audit_record("FORGET", NOW + 1000, subject="subj-z", outcome="FAILED"))

    late = case_of(core.on_alert(alert_src(), NOW + 9000))
    assert (late.snapshot_ref, late.reference_image_ref, late.subject_id) == (None, None, "subj-a")
    new = case_of(core.on_alert(alert_of("subj-a", "tx-5", NOW + 5000), NOW + 9000))
    assert (new.snapshot_ref, new.reference_image_ref) == ("file:checkout/tx-1.jpg", "file:reference/subj-a.jpg")
    sale = case_of(core.on_alert(alert_of("subj-b", "tx-9"), NOW + 9000))
    assert sale.snapshot_ref is None, "the enrolment sale's alert shows the buyer forgotten"
    for subject in ("subj-y", "subj-z"):  # a case's expiry, a failed forget: nobody was forgotten
        assert case_of(core.on_alert(alert_of(subject, "tx-8"), NOW + 9000)).snapshot_ref == "file:checkout/tx-1.jpg"

    core.load_audit(b"command:f3", audit_record("FORGET", NOW + 6000))  # forgotten again: the new entry too
    assert case_of(core.on_alert(alert_of("subj-a", "tx-6", NOW + 5500), NOW + 9000)).snapshot_ref is None


def test_a_subject_forgotten_while_the_service_was_away_loses_its_held_cases_image_refs_at_start(core) -> None:
    """Its tombstone was never read (compacted away, or before the group's offsets): the cases read back from
    ``cases`` kept the forgotten person's image refs, wrote them again with every later version, and a confirm
    asked the watchlist service to learn from the deleted sighting."""
    entry = WatchlistEntry("subj-a", "SUSPECT", [[0.0] * 4], "fraud", GUARD, NOW, "file:reference/subj-a.jpg")
    core.load_watchlist(b"subj-a", entry.encode())
    held = opened(core)
    sale = case_of(core.on_alert(alert_of("subj-b", "tx-9"), NOW))
    kept = case_of(core.on_alert(alert_of("subj-c", "tx-8"), NOW))
    restarted = CaseCore(core.settings)
    for case in (held, sale, kept):
        restarted.load_case(case.case_id.encode(), case.encode())
    restarted.load_audit(b"command:f1", audit_record("FORGET", NOW + 1000))
    restarted.load_audit(b"command:f9", audit_record("FORGET", NOW + 1000, subject="subj-tx-9"))

    stripped = {
        Case.decode(o.value).case_id: Case.decode(o.value) for o in of(restarted.forget_held(NOW + 2000), CASES)
    }
    assert set(stripped) == {held.case_id, sale.case_id}
    assert all((c.snapshot_ref, c.reference_image_ref) == (None, None) for c in stripped.values())
    assert restarted.book.cases[kept.case_id] == kept
    assert restarted.forget_held(NOW + 3000) == [], "once stripped, nothing more"
    outs = restarted.on_command(command_src("CONFIRM", held.case_id, "m1"), NOW + 3000)
    assert case_of(outs).snapshot_ref is None and of(outs, COMMANDS) == [], "no LEARN of a deleted sighting"


class _HangingCommit:
    """A transactional producer whose commit waits on Kafka (down) for ``hang_s``; ``on_commit`` runs as it begins."""

    def __init__(self, on_commit, released) -> None:
        self.on_commit, self.released = on_commit, released

    def init_transactions(self, timeout: float) -> None:
        pass

    def poll(self, timeout: float) -> int:
        return 0

    def begin_transaction(self) -> None:
        pass

    def produce(self, topic: str, key: bytes, value: bytes | None) -> None:
        pass

    def commit_transaction(self, timeout: float) -> None:
        self.on_commit()
        self.released.wait(4.0)  # Kafka does not answer


class _OneCommand:
    """A consumer of one command whose close waits on Kafka (down) too; its offset commits in ``commits``."""

    def __init__(self, released) -> None:
        from confluent_kafka import Message

        self.released, self.commits, self.closed = released, [], False
        self.records = [Message(topic="commands", partition=0, offset=3, key=b"c-1", value=b"v")]

    def subscribe(self, topics: list[str]) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list:
        taken, self.records = self.records, []
        return taken

    def commit(self, offsets: list, asynchronous: bool) -> None:
        self.commits.append(offsets)

    def close(self) -> None:
        self.released.wait(4.0)
        self.closed = True


class _IdleCore:
    """A case core with nothing held, nothing to expire, no input waiting."""

    book = type("Book", (), {"cases": {}})()
    references: dict = {}

    def load_case(self, _key: bytes | None, _value: bytes | None) -> None:
        pass

    load_watchlist = load_audit = load_case

    def horizon(self, now_ms: int) -> int:
        return now_ms

    def forget_held(self, now_ms: int) -> list:
        return []

    def expire(self, now_ms: int) -> list:
        return []

    def oldest_waiting(self, topic: str, partition: int) -> None:
        return None

    def take_settled(self) -> list:
        return []


def test_a_transaction_commit_hanging_on_kafka_at_a_stop_is_given_up_by_the_stops_deadline_uncommitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM came while a transaction's commit waited on Kafka (down): the commit waited its 30 s, past the
    supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM), and so did the consumer's close
    after it. Both are given up 1 s before the SIGKILL, counted from the SIGTERM; the inputs' offsets not committed."""
    import threading
    import time

    from infra.metrics import Heartbeat
    from infra.processes import StopRequest
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService, Out

    released = threading.Event()
    stopped_at: list[float] = []

    def sigterm() -> None:  # SIGTERM arrives while the commit waits on Kafka
        stopped_at.append(time.monotonic())
        svc.stop()

    svc = CaseService.__new__(CaseService)
    svc.settings = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
    )
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    consumer = _OneCommand(released)
    svc.producer, svc.consumer, svc.core = _HangingCommit(sigterm, released), consumer, _IdleCore()  # type: ignore[assignment]
    svc._processing = case_service.metrics.PROCESSING_SECONDS.labels(case_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: [Out(AUDIT, b"a-1", b"v")]}
    svc.replay = lambda *_a, **_k: None  # type: ignore[method-assign]
    try:
        svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung calls end now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert consumer.commits == [], "the inputs of a transaction given up were committed"
    assert not consumer.closed, "the consumer's close waits on Kafka: it is given up, not waited for"
    assert any(r.levelname == "WARNING" and "given up" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failing", ["commit", "close"])
def test_a_kafka_error_after_the_stop_is_one_warning_and_a_clean_exit_with_the_input_uncommitted(
    failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The brokers went away at the stop: the transaction's commit (or the consumer's close) failed with a Kafka error,
    which ended the service with a traceback and exit 1. Once the stop is asked it is one WARNING, no record in it, and
    the service returns (exit 0) with the input not committed, read again at the next start."""
    import threading

    from confluent_kafka import KafkaError, KafkaException

    from infra.metrics import Heartbeat
    from infra.processes import StopRequest
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService, Out

    gone = KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))

    class Producer(_HangingCommit):
        def commit_transaction(self, timeout: float) -> None:
            svc.stop()  # SIGTERM, and the brokers go away
            if failing == "commit":
                raise gone

    class Consumer(_OneCommand):
        def close(self) -> None:
            if failing == "close":
                raise gone

    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    consumer = Consumer(threading.Event())
    svc.producer, svc.consumer, svc.core = Producer(None, None), consumer, _IdleCore()  # type: ignore[assignment]
    svc._processing = case_service.metrics.PROCESSING_SECONDS.labels(case_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: [Out(AUDIT, b"a-1", b"secret-record-value")]}
    svc.replay = lambda *_a, **_k: None  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        svc.run()  # returns: no traceback, exit 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "_TRANSPORT" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None and b"secret" not in warnings[0].getMessage().encode()
    if failing == "commit":
        assert consumer.commits == [], "the input of a transaction that failed was committed"


@pytest.mark.parametrize("hanging", ["replay", "init_transactions"])
def test_a_stop_during_the_start_ends_a_start_up_call_hanging_on_kafka_by_the_stops_deadline(
    hanging: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came while a start-up call waited on Kafka (down): a start-up read of a topic (up to 30 s per metadata
    call) or the producer's ``init_transactions`` (30 s) ran on past the supervisor's SIGKILL. Both now end 1 s before
    it, counted from the SIGTERM, as the loop's Kafka calls do, and the read is told of the stop."""
    import threading
    import time

    from infra.clients import control_topics
    from infra.metrics import Heartbeat
    from infra.processes import StopRequest
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService

    released = threading.Event()
    stopped_at: list[float] = []
    reads: list[dict] = []

    def sigterm_and_hang() -> None:
        stopped_at.append(time.monotonic())
        svc.stop()
        released.wait(4.0)  # Kafka does not answer

    def read(_settings, _apply, **kwargs) -> dict:
        reads.append(kwargs)
        if hanging == "replay":
            sigterm_and_hang()
        return {}

    class Producer(_HangingCommit):
        def init_transactions(self, timeout: float) -> None:
            if hanging == "init_transactions":
                sigterm_and_hang()

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    svc = CaseService.__new__(CaseService)
    svc.settings = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
    )
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = Producer(None, released), _OneCommand(released), _IdleCore()  # type: ignore[assignment]
    svc._processing = case_service.metrics.PROCESSING_SECONDS.labels(case_service.PROCESS)
    svc.topics = {}
    try:
        svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung calls end now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert reads and all(kwargs["stop"] is svc._stop for kwargs in reads), "the read is not told of the stop"
    assert any(r.levelname == "WARNING" and "given up" in r.getMessage() for r in caplog.records)


def test_a_failing_close_after_the_loops_own_error_is_a_warning_and_the_loops_error_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No stop asked: the loop died of its own error, then the consumer's close failed too, and the close's error was
    raised from ``finally``, hiding the one that said why the service died. The loop's error is now raised, the close's
    is one WARNING naming its type and Kafka code, never its words."""
    import threading

    from confluent_kafka import KafkaError, KafkaException

    from infra.metrics import Heartbeat
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService

    died = KafkaException(KafkaError(KafkaError._FATAL, "producer fenced"))

    class Consumer(_OneCommand):
        def consume(self, num_messages: int, timeout: float) -> list:
            raise died

        def close(self) -> None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "secret-record-value"))

    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = _HangingCommit(None, None), Consumer(threading.Event()), _IdleCore()  # type: ignore[assignment]
    svc._processing = case_service.metrics.PROCESSING_SECONDS.labels(case_service.PROCESS)
    svc.topics = {}
    svc.replay = lambda *_a, **_k: None  # type: ignore[method-assign]
    with caplog.at_level("WARNING"), pytest.raises(KafkaException) as raised:
        svc.run()
    assert raised.value is died, f"the close's error hid the loop's: {raised.value!r}"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "KafkaException _TRANSPORT" in warnings[0].getMessage(), warnings
    assert "secret" not in warnings[0].getMessage() and warnings[0].exc_info is None


def test_a_failing_close_with_no_loop_error_and_no_stop_is_still_raised() -> None:
    """Nothing else explains the end: the close's own error is raised, as before."""
    from confluent_kafka import KafkaError, KafkaException

    from jobs.cases.service import CaseService

    class Consumer:
        def close(self) -> None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))

    svc = CaseService.__new__(CaseService)
    svc.settings, svc._stop, svc.consumer = Settings(), StopRequest(), Consumer()  # type: ignore[assignment]
    with pytest.raises(KafkaException):
        svc._close()


def test_a_stop_that_cuts_a_start_up_read_short_is_an_info_line_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came during a start-up read: the read stopped at its next call, nothing lost (it is read again at the
    next start), yet the stop logged a WARNING as if Kafka work had been given up. It is now one INFO line; the
    producer is not started."""
    from types import SimpleNamespace

    from infra.clients import kafka as kafka_clients
    from infra.metrics import Heartbeat
    from jobs.cases.service import CaseService

    class Reader:
        def list_topics(self, topic: str, timeout: float) -> SimpleNamespace:
            svc.stop()  # SIGTERM while the broker answers
            return SimpleNamespace(
                topics={topic: SimpleNamespace(error=None, partitions={0: SimpleNamespace(id=0, error=None, leader=1)})}
            )

        def close(self) -> None:
            pass

    class Producer(_HangingCommit):
        def init_transactions(self, timeout: float) -> None:
            raise AssertionError("the producer was started after the stop")

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: Reader())
    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = Producer(None, None), _OneCommand(None), _IdleCore()  # type: ignore[assignment]
    svc.consumer.close = lambda: None  # type: ignore[method-assign]
    svc.topics = {}
    with caplog.at_level("INFO"):
        svc.run()
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any(
        r.levelname == "INFO" and "start-up read stopped by the stop request" in r.getMessage() for r in caplog.records
    )


def test_with_allowed_rooms_a_case_may_be_given_to_someone_off_the_people_list() -> None:
    """A member of an allowed room decides cases from there (who is a member only Webex knows): refusing such an
    owner left a deployment that allows rooms alone unable to assign any case."""
    rooms_only = WebexSettings(allowed_rooms="room-security")
    assert rooms_only.unlisted_owner("guard@example.com") is None
    people_only = WebexSettings(allowed_people="lead@example.com")
    assert people_only.unlisted_owner("LEAD@example.com") is None
    assert "not on the allow-list" in (people_only.unlisted_owner("guard@example.com") or "")


def test_a_broker_error_ending_a_start_up_read_the_stop_came_during_is_an_info_line_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came while a start-up read's listing waited on the broker, which then answered with an error: the stop
    logged a WARNING, "Kafka failed", as though something was lost, where the read was stopped anyway and is read again
    at the next start. It is now the stop's INFO line, as a read the stop cut short between two calls is."""
    from confluent_kafka import KafkaError, KafkaException

    from infra.clients import kafka as kafka_clients
    from infra.metrics import Heartbeat
    from jobs.cases.service import CaseService

    class Reader:
        def list_topics(self, topic: str, timeout: float) -> None:
            svc.stop()  # SIGTERM while the broker answers
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))

        def close(self) -> None:
            pass

    class Producer(_HangingCommit):
        def init_transactions(self, timeout: float) -> None:
            raise AssertionError("the producer was started after the stop")

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: Reader())
    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = Producer(None, None), _OneCommand(None), _IdleCore()  # type: ignore[assignment]
    svc.consumer.close = lambda: None  # type: ignore[method-assign]
    svc.topics = {}
    with caplog.at_level("INFO"):
        svc.run()
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any(
        r.levelname == "INFO" and "start-up read stopped by the stop request" in r.getMessage() for r in caplog.records
    )


def test_a_consumer_error_is_logged_by_its_kafka_code_never_the_brokers_words(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A consumer error was logged with its whole text, which can echo a value; it is named by its code only, as the
    service's other Kafka warnings are."""
    import threading

    from confluent_kafka import KafkaError, Message

    from infra.metrics import Heartbeat
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService

    released = threading.Event()
    released.set()

    class Erring(_OneCommand):
        def consume(self, num_messages: int, timeout: float) -> list:
            svc.stop()
            echoed = KafkaError(KafkaError._TRANSPORT, "fetch refused: key=secret-card-token")
            return [Message(topic="commands", partition=0, error=echoed)]

    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = _HangingCommit(lambda: None, released), Erring(released), _IdleCore()  # type: ignore[assignment]
    svc._processing = case_service.metrics.PROCESSING_SECONDS.labels(case_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: []}
    svc.replay = lambda *_a, **_k: None  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        svc.run()
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["consumer error: KafkaError _TRANSPORT"], said


@pytest.mark.parametrize("listed", ["missing", "unavailable"])
def test_a_topic_found_missing_or_unavailable_by_a_start_up_read_the_stop_came_during_is_the_stops_info_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, listed: str
) -> None:
    """SIGTERM came while a start-up read's listing waited on the broker, which then listed the topic as unknown (or
    answered for it with an error): the service ended with a traceback, as a crash. The read, stopped anyway and read
    again at the next start, is the stop's INFO line, as a broker's error there is."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError

    from infra.clients import kafka as kafka_clients
    from infra.metrics import Heartbeat
    from jobs.cases.service import CaseService

    code = KafkaError.UNKNOWN_TOPIC_OR_PART if listed == "missing" else KafkaError.TOPIC_AUTHORIZATION_FAILED

    class Reader:
        def list_topics(self, topic: str, timeout: float) -> SimpleNamespace:
            svc.stop()  # SIGTERM while the broker answers
            return SimpleNamespace(topics={topic: SimpleNamespace(error=KafkaError(code), partitions={})})

        def close(self) -> None:
            pass

    class Producer(_HangingCommit):
        def init_transactions(self, timeout: float) -> None:
            raise AssertionError("the producer was started after the stop")

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: Reader())
    svc = CaseService.__new__(CaseService)
    svc.settings = Settings()
    svc.prefix, svc._stop, svc._next_expiry, svc.heartbeat = "", StopRequest(), float("inf"), Heartbeat()
    svc.producer, svc.consumer, svc.core = Producer(None, None), _OneCommand(None), _IdleCore()  # type: ignore[assignment]
    svc.consumer.close = lambda: None  # type: ignore[method-assign]
    svc.topics = {}
    with caplog.at_level("INFO"):
        svc.run()  # returns: no traceback
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any(
        r.levelname == "INFO" and "start-up read stopped by the stop request" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    "alert_id",
    ["", "x\r\nBcc: thief@evil.test", "a" * 600],
    ids=["empty", "header_injection", "over_512"],
)
def test_an_alert_whose_id_the_sender_refuses_is_dead_lettered_and_opens_no_case(core, alert_id) -> None:
    """An empty id (a record of zeros decodes as one) opened a case for every such alert under one case id, and the
    others opened cases no card ever links to: the sender and the sink refuse those alerts."""
    outs = core.on_alert(alert_src(alert_id=alert_id), NOW)
    assert of(outs, CASES) == [] and core.book.cases == {}
    (letter,) = (DeadLetter.decode(o.value) for o in of(outs, DEAD_LETTERS))
    assert letter.error_kind == "invalid_id" and "alert_id" in letter.reason and "thief" not in letter.reason


def test_an_alert_over_the_message_size_limit_is_dead_lettered_oversized_and_opens_no_case(core) -> None:
    """Its case carries its summary and more: a case record past Kafka's producer limit (1 MB) failed every publish, the
    service exited, and read the same alert again at each restart."""
    alert = Alert.decode(alert_src().value or b"")
    big = replace(alert, summary="s" * (core.settings.job.max_message_bytes + 1)).encode()
    outs = core.on_alert(Source("alerts", 0, 9, b"k", big), NOW)
    assert of(outs, CASES) == [] and core.book.cases == {}
    (letter,) = (DeadLetter.decode(o.value) for o in of(outs, DEAD_LETTERS))
    assert letter.error_kind == "oversized" and str(len(big)) in letter.reason


@pytest.mark.parametrize("event_time", [0, -1, -(2**63)])
def test_an_alert_dated_at_or_before_1970_is_dead_lettered_invalid_timestamp_and_opens_no_case(core, event_time):
    """Its case opened at that time: the sink could not index one at the far end of a ``long`` (no index has that
    day), so the case was on ``cases`` but never on the dashboard. The job makes no alert so dated (it refuses such a
    transaction or observation): one is hostile."""
    alert = Alert.decode(alert_src().value or b"")
    outs = core.on_alert(Source("alerts", 0, 9, b"k", replace(alert, event_time=event_time).encode()), NOW)
    assert of(outs, CASES) == [] and core.book.cases == {}
    (letter,) = (DeadLetter.decode(o.value) for o in of(outs, DEAD_LETTERS))
    assert letter.error_kind == "invalid_timestamp"


class _Committing(_HangingCommit):
    """A transactional producer whose commit goes through at once."""

    def __init__(self) -> None:
        super().__init__(None, None)

    def produce(self, topic: str, key: bytes, value: bytes | None, headers: list | None = None) -> None:
        pass

    def commit_transaction(self, timeout: float) -> None:
        pass


def _waits(kind: str) -> tuple[float, float]:
    """``cg_input_wait_seconds`` of the case service for ``kind`` so far: (count, sum)."""
    from prometheus_client import REGISTRY

    labels = {"stage": "case-service", "kind": kind}
    count = REGISTRY.get_sample_value("cg_input_wait_seconds_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("cg_input_wait_seconds_sum", labels) or 0.0


def test_the_wait_of_an_alert_and_a_verdict_is_timed_from_their_record_time_to_their_outcome_committed(
    core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cg_processing_seconds`` timed the handler alone (microseconds): a verdict held for its alert for five minutes,
    or read after an outage, looked instant. ``cg_input_wait_seconds`` counts from the record's time on Kafka (the
    broker's, for a command) to the transaction that carries its outcome; a held verdict counts once, when applied."""
    import threading

    from infra.metrics import Heartbeat
    from jobs.cases import service as case_service
    from jobs.cases.service import CaseService

    svc = CaseService.__new__(CaseService)
    svc.settings, svc.prefix, svc.core = core.settings, "", core
    svc._stop, svc.heartbeat = StopRequest(), Heartbeat()
    svc.producer, svc.consumer = _Committing(), _OneCommand(threading.Event())  # type: ignore[assignment]
    committed = [0]
    monkeypatch.setattr(case_service.clock, "now_ms", lambda: committed[0])
    commands, alerts = _waits("command"), _waits("alert")

    early = replace(command_src("CONFIRM", case_id_for("watchlist:tx-1:subj-a"), "m1"), written_at=NOW)
    assert core.on_command(early, NOW + 10) == [], "held for its alert"
    committed[0] = NOW + 500
    svc._publish([], [])
    assert _waits("command") == commands, "a held verdict has no outcome yet"

    alert = replace(alert_src(event_time=NOW + 299_000), written_at=NOW + 299_000)
    outs = core.on_alert(alert, NOW + 300_000)  # opens the case, and the held verdict is applied
    assert case_of([o for o in outs if o.topic == CASES][-1:]).state == "confirmed"
    committed[0] = NOW + 302_000
    svc._publish(outs, [])
    assert _waits("command") == (commands[0] + 1, commands[1] + 302.0), "from its record time, held 5 min"
    assert _waits("alert") == (alerts[0] + 1, alerts[1] + 3.0)
    svc._publish([], [])
    assert _waits("command")[0] == commands[0] + 1, "timed once"
    assert core.on_command(early, NOW + 303_000) == [] and core.take_settled() == [], "a replay is no outcome"
