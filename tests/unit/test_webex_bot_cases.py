"""Case verdicts from Webex: typed ``confirm``/``dismiss``/``assign``/``note``/``escalate`` and the case card's
buttons (signed ``attachmentActions`` webhooks) become the same signed commands; forged presses change nothing.
The local Webex API server plays Webex (tests/unit/test_webex_bot.py has the harness)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from infra.command_auth import authenticate_command
from infra.launcher import wait_for
from infra.local.webex import person_id, sign
from infra.settings import AlertSettings
from jobs.bot.webex_bot import HELP_TEXT, parse_command
from schemas.records import MAX_CASE_TEXT, BotCommand, case_id_for
from sinks.alerts.message import case_card
from tests.unit import test_webex_bot
from tests.unit.test_webex_bot import SECRET, SECURITY_ROOM, SHOP_FLOOR, Harness

ALERT = {"alert_id": "watchlist:tx-1:subj-a", "kind": "WATCHLIST_MATCH", "store_id": "S1", "event_time": 0}
CASE = case_id_for(ALERT["alert_id"])
harness = test_webex_bot.harness
"""The bot over HTTP with the local Webex API (the fixture of tests/unit/test_webex_bot.py)."""


@pytest.mark.parametrize(
    ("text", "verb", "argument"),
    [
        ("Checkout Guard confirm case-1a2b3c4d5e6f", "CONFIRM", "case-1a2b3c4d5e6f"),
        ("confirm case-1a2b3c4d5e6f fraud", "CONFIRM", "case-1a2b3c4d5e6f fraud"),
        ("dismiss case-1a2b3c4d5e6f not the same person", "DISMISS", "case-1a2b3c4d5e6f not the same person"),
        ("assign case-1a2b3c4d5e6f lead@store.test", "ASSIGN", "case-1a2b3c4d5e6f lead@store.test"),
        ("note case-1a2b3c4d5e6f left by the side door", "NOTE", "case-1a2b3c4d5e6f left by the side door"),
        ("escalate case-1a2b3c4d5e6f", "ESCALATE", "case-1a2b3c4d5e6f"),
    ],
)
def test_case_commands_are_parsed_with_their_whole_argument(text: str, verb: str, argument: str) -> None:
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.verb, parsed.argument, parsed.problem) == (verb, argument, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("confirm", "needs a case id"),
        ("confirm case-1a2b3c4d5e6f maybe", "`fraud`"),
        ("assign case-1a2b3c4d5e6f", "one person"),
    ],
)
def test_malformed_case_commands_are_answered_not_published(text: str, problem: str) -> None:
    assert problem in (parse_command(text).problem or "")


def test_a_verdict_from_the_security_room_becomes_one_signed_command(harness: Harness) -> None:
    harness.say(SECURITY_ROOM, "guard@store.test", f"Checkout Guard dismiss {CASE} different person")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    [command], [headers] = harness.published, harness.headers
    assert (command.verb, command.argument, command.actor) == (
        "DISMISS",
        f"{CASE} different person",
        "guard@store.test",
    )
    authenticate_command(command, headers, harness.bot.settings.webex, command.issued_at + 1000)
    assert CASE in reply and "Sent: dismiss case" in reply and "only if the case is still undecided" in reply
    assert "dismissed" not in reply  # the case service decides: a case decided already keeps its verdict


def test_a_verdict_from_someone_not_allowed_is_refused(harness: Harness) -> None:
    harness.say(SHOP_FLOOR, "cashier@store.test", f"confirm {CASE}")
    [reply] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the refusal")
    assert reply.startswith("Sorry") and harness.published == []


def test_an_assign_to_someone_off_the_people_list_is_answered_at_once_where_no_room_is_allowed() -> None:
    """It was answered "Sent" and applied: the case's owner could not act on it."""
    from types import SimpleNamespace

    from infra.settings import Settings, WebexSettings
    from jobs.bot.webex_bot import WebexBot

    bot = SimpleNamespace(settings=Settings(webex=WebexSettings(allowed_people="lead@store.test")))
    reply = WebexBot._unlisted_owner(bot, parse_command(f"assign {CASE} stranger@store.test"))  # type: ignore[arg-type]
    assert reply is not None and reply.startswith("Sorry") and "stranger@store.test is not on the allow-list" in reply
    assert "nothing was sent" in reply
    assert WebexBot._unlisted_owner(bot, parse_command(f"assign {CASE} lead@store.test")) is None  # type: ignore[arg-type]


def test_an_assign_to_a_member_of_an_allowed_room_is_sent(harness: Harness) -> None:
    """With allowed rooms anyone may be given a case: a member of such a room decides cases from there."""
    harness.say(SECURITY_ROOM, "guard@store.test", f"assign {CASE} guard2@store.test")
    wait_for(lambda: harness.published, 10, what="the command")
    assert harness.published[0].argument == f"{CASE} guard2@store.test"


def post_card(harness: Harness, room: str) -> str:
    card = case_card(ALERT, AlertSettings())
    return harness.bot.client.send_card(room, f"Case `{CASE}`", card)["id"]


def test_the_case_card_has_both_buttons_and_the_two_images() -> None:
    card = case_card(
        {**ALERT, "snapshot_ref": "local://x", "subject_id": "subj-a"}, AlertSettings(), has_reference=True
    )
    submits = [a["data"] for a in card["actions"] if a["type"] == "Action.Submit"]
    assert submits == [{"verb": "confirm", "case_id": CASE}, {"verb": "dismiss", "case_id": CASE}]
    columns = [col for part in card["body"] if part["type"] == "ColumnSet" for col in part["columns"]]
    assert [item["url"] for col in columns for item in col["items"] if item["type"] == "Image"] == [
        f"http://127.0.0.1:8050/cases/{CASE}/images/live",
        f"http://127.0.0.1:8050/cases/{CASE}/images/reference",
    ]


def test_a_card_press_does_what_the_typed_command_does(harness: Harness) -> None:
    message_id = post_card(harness, SECURITY_ROOM)
    [delivery] = harness.webex.press(message_id, "guard@store.test", {"verb": "confirm", "case_id": CASE})
    assert delivery["status"] == 200
    wait_for(lambda: harness.published, 10, what="the command")
    [command], [headers] = harness.published, harness.headers
    assert (command.verb, command.argument, command.actor, command.room_id) == (
        "CONFIRM",
        CASE,
        "guard@store.test",
        SECURITY_ROOM,
    )
    assert command.command_id == delivery["message_id"], "the action id: a redelivered press is the same command"
    authenticate_command(command, headers, harness.bot.settings.webex, command.issued_at + 1000)
    wait_for(lambda: any("Sent: confirm case" in r for r in harness.replies(SECURITY_ROOM)), 10, what="the reply")


def test_presses_from_two_people_webex_gives_no_address_for_are_two_actors_their_webex_ids(harness: Harness) -> None:
    """Both were recorded as actor "unknown", so the case service took the second person's press for a double press
    of the first's. Their Webex person id is the actor now, never a display name."""
    message_id = post_card(harness, SECURITY_ROOM)  # an allowed room: a press there needs no address
    fetch = harness.bot.client.get_person
    harness.bot.client.get_person = lambda pid: {**fetch(pid), "emails": [], "displayName": "Pat"}  # type: ignore[method-assign]
    harness.webex.press(message_id, "pat@store.test", {"verb": "confirm", "case_id": CASE})
    harness.webex.press(message_id, "sam@store.test", {"verb": "confirm", "case_id": CASE})
    wait_for(lambda: len(harness.published) == 2, 10, what="both commands")
    actors = sorted(command.actor for command in harness.published)
    assert actors == sorted([person_id("pat@store.test"), person_id("sam@store.test")])


def test_a_press_by_someone_not_allowed_changes_nothing(harness: Harness) -> None:
    message_id = post_card(harness, SHOP_FLOOR)
    harness.webex.press(message_id, "cashier@store.test", {"verb": "confirm", "case_id": CASE})
    wait_for(lambda: any(r.startswith("Sorry") for r in harness.replies(SHOP_FLOOR)), 10, what="the refusal")
    assert harness.published == []


def test_a_press_webex_will_not_give_us_gets_an_apology_not_silence(harness: Harness) -> None:
    message_id = post_card(harness, SECURITY_ROOM)
    harness.bot.me()  # known before Webex fails: only the press itself cannot be read
    harness.webex.state.fail((503,), count=4)  # every try of the fetch
    harness.webex.press(message_id, "guard@store.test", {"verb": "confirm", "case_id": CASE})
    wait_for(
        lambda: any(r.startswith("Sorry, I could not read your button press") for r in harness.replies(SECURITY_ROOM)),
        15,
        what="the apology",
    )
    assert harness.published == [] and harness.webex.state.requests["503"] == 4


def test_a_forged_press_changes_nothing(harness: Harness) -> None:
    message_id = post_card(harness, SECURITY_ROOM)
    harness.webex.state.webhooks.clear()  # the press is stored, only our forged callbacks arrive
    harness.webex.press(message_id, "guard@store.test", {"verb": "confirm", "case_id": CASE})
    [action_id] = list(harness.webex.state.actions)
    body = json.dumps(
        {
            "resource": "attachmentActions",
            "event": "created",
            "data": {"id": action_id, "roomId": SECURITY_ROOM, "personId": person_id("guard@store.test")},
        }
    ).encode()
    unsigned = httpx.post(harness.url, content=body)
    forged = httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, "guessed")})
    assert (unsigned.status_code, forged.status_code) == (401, 403)
    time.sleep(0.5)
    assert harness.published == []
    signed = httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)})
    assert signed.status_code == 200
    wait_for(lambda: harness.published, 10, what="the command of the correctly signed press")


def test_renew_is_a_signed_watchlist_change_for_allowed_people_only(harness: Harness) -> None:
    assert (parse_command("renew subj-tx-1").verb, parse_command("renew subj-tx-1").argument) == ("RENEW", "subj-tx-1")
    harness.say(SHOP_FLOOR, "cashier@store.test", "renew subj-tx-1")
    wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the refusal")
    assert harness.published == []
    harness.say(SECURITY_ROOM, "guard@store.test", "renew subj-tx-1")
    wait_for(lambda: harness.published, 10, what="the command")
    [command], [headers] = harness.published, harness.headers
    assert (command.verb, command.argument) == ("RENEW", "subj-tx-1")
    authenticate_command(command, headers, harness.bot.settings.webex, command.issued_at + 1000)


def test_status_counts_the_watchlist_and_lists_what_expires_soon_soonest_first() -> None:
    from jobs.bot.webex_bot import watchlist_text
    from schemas.records import WatchlistEntry

    day, now = 86_400_000, 1_800_000_000_000

    def entry(subject: str, category: str, **kw) -> WatchlistEntry:
        return WatchlistEntry(subject, category, [], "fraud", "lp@x", kw.pop("flagged_at", now), **kw)

    entries = [
        entry("subj-a", "SUSPECT", expires_at=now + 20 * day),
        entry("subj-b", "SUSPECT", flagged_at=now - 360 * day),  # written before expiry existed: 5 days left
        entry("subj-c", "VIP", expires_at=now + 200 * day),
    ]
    text = watchlist_text(entries, now, 365)
    assert text.startswith("Watchlist: 2 suspect, 1 vip; expiring within 30 days")
    assert text.endswith("`subj-b` in 5 d, `subj-a` in 20 d")
    assert watchlist_text([], now, 365) == "Watchlist: empty"


def test_a_verdict_on_a_case_decided_already_is_answered_at_once_and_not_sent(harness: Harness) -> None:
    decided = {
        "case_id": CASE,
        "state": "confirmed",
        "decided_by": "lead_1@store.test",  # shown as written, not in italics
        "decided_at": 1_796_515_200_000,  # 2026-12-06 00:00 UTC
    }
    harness.bot.case_lookup = {CASE: decided}.get
    harness.say(SECURITY_ROOM, "guard@store.test", f"dismiss {CASE} not the same person")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    assert reply == (
        f"Case `{CASE}` is already `confirmed` by `lead_1@store.test` at 2026-12-06 00:00 UTC: nothing was sent. "
        "Add a `note` to it if you see it differently."
    )
    assert harness.published == []
    harness.say(SECURITY_ROOM, "guard@store.test", f"note {CASE} the guard disagrees")  # a note goes in any state
    wait_for(lambda: len(harness.replies(SECURITY_ROOM)) == 2, 10, what="the note's reply")
    assert [c.verb for c in harness.published] == ["NOTE"]


@pytest.mark.parametrize(
    ("case", "sent"),
    [
        ({"state": "open"}, True),
        ({"state": "escalated"}, True),  # a verdict on an escalated case decides it
        (None, True),  # not indexed yet: the case service decides
        (OSError("OpenSearch away"), True),  # cannot read it now: the same
        ({"state": "expired", "decided_by": "case-service"}, False),
    ],
)
def test_a_verdict_is_sent_unless_the_indexed_case_is_decided(harness: Harness, case: object, sent: bool) -> None:
    def lookup(_case_id: str) -> object:
        if isinstance(case, Exception):
            raise case
        return case

    harness.bot.case_lookup = lookup  # type: ignore[assignment]
    harness.say(SECURITY_ROOM, "guard@store.test", f"confirm {CASE}")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    assert bool(harness.published) is sent and ("Sent: confirm case" in reply) is sent


def test_confirm_fraud_on_a_case_without_a_transaction_is_answered_at_once_and_not_sent(harness: Harness) -> None:
    """The case service refused it (``bad_command``) only in the audit; the sender had read "Sent"."""
    harness.bot.case_lookup = {CASE: {"case_id": CASE, "state": "open", "kind": "SUSPECT_ENTERED"}}.get
    harness.say(SECURITY_ROOM, "guard@store.test", f"confirm {CASE} fraud")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    assert reply == (
        f"Case `{CASE}` has no transaction to label as fraud: nothing was sent. `confirm {CASE}` confirms it "
        "without a label."
    )
    assert harness.published == []
    harness.say(SECURITY_ROOM, "guard@store.test", f"confirm {CASE}")  # without the label it goes
    wait_for(lambda: len(harness.replies(SECURITY_ROOM)) == 2, 10, what="the confirm's reply")
    assert [c.argument for c in harness.published] == [CASE]


def test_escalating_a_case_escalated_already_is_answered_not_sent(harness: Harness) -> None:
    harness.bot.case_lookup = {CASE: {"state": "escalated", "updated_by": "guard@store.test"}}.get
    harness.say(SECURITY_ROOM, "lead@store.test", f"escalate {CASE}")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    assert f"Case `{CASE}` is already `escalated`: nothing was sent" in reply and harness.published == []


def test_without_a_signing_key_a_verdict_is_refused_as_a_case_verdict_not_a_watchlist_change(harness: Harness) -> None:
    harness.bot.signing_key = ""
    harness.say(SECURITY_ROOM, "guard@store.test", f"confirm {CASE}")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the refusal")
    assert reply.startswith("Sorry, case verdicts and notes are switched off") and harness.published == []
    assert "watchlist" not in reply


def test_an_answer_naming_a_case_and_who_decided_it_goes_to_the_allowed_person_alone_off_the_allow_list(
    harness: Harness,
) -> None:
    """The lead may read who confirmed a case; the cashiers in the shop floor room may not: the answer went there."""
    decided = {"case_id": CASE, "state": "confirmed", "decided_by": "guard@store.test", "decided_at": 0}
    harness.bot.case_lookup = {CASE: decided}.get
    harness.say(SHOP_FLOOR, "lead@store.test", f"Checkout Guard dismiss {CASE}")
    [answer] = wait_for(lambda: harness.replies("direct:lead@store.test"), 10, what="the answer, directly")
    assert answer.startswith(f"Case `{CASE}` is already `confirmed` by `guard@store.test`")
    [note] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the note in the room")
    assert "directly" in note and CASE not in note and "guard@store.test" not in note
    harness.bot.case_lookup = None
    message_id = post_card(harness, SHOP_FLOOR)  # a press of the card's button: the same
    harness.webex.press(message_id, "lead@store.test", {"verb": "confirm", "case_id": CASE})
    wait_for(lambda: len(harness.replies("direct:lead@store.test")) == 2, 10, what="the press's answer, directly")
    assert "Sent: confirm case" in harness.replies("direct:lead@store.test")[-1]
    notes = wait_for(
        lambda: [r for r in harness.replies(SHOP_FLOOR) if "directly" in r][1:], 10, what="the second note"
    )
    assert notes == [note] and not any("Sent:" in reply for reply in harness.replies(SHOP_FLOOR))


@pytest.mark.parametrize(
    ("text", "argument"),
    [
        ("confirm case-1a2b3c4d5e6f Checkout Guard", "case-1a2b3c4d5e6f"),
        ("Checkout Guard confirm case-1a2b3c4d5e6f fraud @Checkout", "case-1a2b3c4d5e6f fraud"),
        ("escalate case-1a2b3c4d5e6f @Checkout Guard", "case-1a2b3c4d5e6f"),
        ("assign case-1a2b3c4d5e6f lead@store.test Checkout Guard", "case-1a2b3c4d5e6f lead@store.test"),
    ],
)
def test_a_mention_of_the_bot_after_a_case_command_is_not_an_extra_word(text: str, argument: str) -> None:
    """``confirm case-x @Checkout Guard`` was answered "takes only the word `fraud` after the case" and not sent."""
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.argument, parsed.problem) == (argument, None), parsed


def test_a_case_id_in_capitals_is_sent_as_the_case_id_and_a_transaction_id_is_answered_at_once() -> None:
    parsed = parse_command("confirm CASE-1A2B3C4D5E6F fraud")
    assert (parsed.verb, parsed.argument, parsed.problem) == ("CONFIRM", "case-1a2b3c4d5e6f fraud", None)
    assert "starts with `case-`" in (parse_command("dismiss tx-123 not him").problem or "")


@pytest.mark.parametrize(
    ("text", "argument"),
    [
        ("confirm <case-1a2b3c4d5e6f>", "case-1a2b3c4d5e6f"),
        ("confirm <case-1a2b3c4d5e6f> fraud", "case-1a2b3c4d5e6f fraud"),
        ("dismiss `case-1a2b3c4d5e6f` <not him>", "case-1a2b3c4d5e6f <not him>"),
        ("assign <case-1a2b3c4d5e6f> <lead@store.test>", "case-1a2b3c4d5e6f lead@store.test"),
        ("note 'case-1a2b3c4d5e6f' left by <the side door>", "case-1a2b3c4d5e6f left by <the side door>"),
        ('escalate "case-1a2b3c4d5e6f"', "case-1a2b3c4d5e6f"),
    ],
)
def test_a_case_id_in_the_help_texts_angle_brackets_or_in_quotes_is_read_as_the_case_id(
    text: str, argument: str
) -> None:
    """``confirm <case-…>``, copied from the help text, was answered "not a case id"; the watchlist commands took
    ``fraud <tx-1>`` all along. The text of a note or a reason is kept as written."""
    parsed = parse_command(text)
    assert (parsed.argument, parsed.problem) == (argument, None), parsed


@pytest.mark.parametrize(
    ("text", "argument"),
    [
        ("confirm case-1a2b3c4d5e6f [fraud]", "case-1a2b3c4d5e6f fraud"),
        ("confirm <case-1a2b3c4d5e6f> [fraud]", "case-1a2b3c4d5e6f fraud"),
        ("confirm [case-1a2b3c4d5e6f] <fraud>", "case-1a2b3c4d5e6f fraud"),
        ("confirm case-1a2b3c4d5e6f 'fraud'", "case-1a2b3c4d5e6f fraud"),
        ("Checkout Guard confirm case-1a2b3c4d5e6f [fraud] @Checkout", "case-1a2b3c4d5e6f fraud"),
        ("assign [case-1a2b3c4d5e6f] [lead@store.test]", "case-1a2b3c4d5e6f lead@store.test"),
        ("dismiss [case-1a2b3c4d5e6f] [not him]", "case-1a2b3c4d5e6f [not him]"),
    ],
)
def test_the_word_fraud_in_the_help_texts_square_brackets_is_read_as_fraud(text: str, argument: str) -> None:
    """``confirm case-… [fraud]``, as the help text writes it, was answered "takes only the word `fraud`" and not
    sent, though the case id was read in its brackets. A reason keeps its brackets: they are its text."""
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.argument, parsed.problem) == (argument, None), parsed


@pytest.mark.parametrize(
    "text", ["confirm case-1a2b3c4d5e6f [maybe]", "confirm case-1a2b3c4d5e6f []", "confirm case-1a2b3c4d5e6f fraud now"]
)
def test_anything_else_after_a_confirmed_case_is_still_answered_not_sent(text: str) -> None:
    assert "`fraud`" in (parse_command(text).problem or "")


@pytest.mark.parametrize(
    "text",
    ["note case-1a2b3c4d5e6f \x1b\x00", "note case-1a2b3c4d5e6f \u202e\u2066", "note case-1a2b3c4d5e6f \x07\r\n\x9b"],
)
def test_a_note_of_control_characters_alone_is_answered_at_once_not_sent(text: str) -> None:
    """The case service keeps no control characters, so such a note was refused there ("needs some text"), in the
    audit only, after the bot had answered "Sent"."""
    parsed = parse_command(text)
    assert parsed.argument is None and "needs some text" in (parsed.problem or ""), parsed


@pytest.mark.parametrize("verb", ["note", "dismiss"])
def test_a_note_or_reason_longer_than_the_case_keeps_is_answered_at_once_not_cut_unseen(verb: str) -> None:
    """The case service keeps the first 1000 characters: the rest of a longer note was dropped while the bot answered
    "Sent". What the case keeps is counted (control characters are left out), so a note that fits still goes."""
    long = parse_command(f"{verb} case-1a2b3c4d5e6f " + "w" * (MAX_CASE_TEXT + 1))
    assert long.argument is None and f"at most {MAX_CASE_TEXT} characters and this one has 1001" in (long.problem or "")
    fits = parse_command(f"{verb} case-1a2b3c4d5e6f " + "w" * MAX_CASE_TEXT + "\x00" * 50)
    assert fits.problem is None and fits.argument == "case-1a2b3c4d5e6f " + "w" * MAX_CASE_TEXT + "\x00" * 50


def test_a_note_with_a_lone_surrogate_is_sent_as_a_command_that_encodes() -> None:
    """Webex's JSON can carry ``\\ud800``; the command's encoding failed and the bot answered "could not record that
    right now; please try again", at every try."""
    text = json.loads('"note case-1a2b3c4d5e6f cut \\ud83d here"')
    parsed = parse_command(text)
    assert parsed.argument == "case-1a2b3c4d5e6f cut \ufffd here"
    command = BotCommand(command_id="m1", issued_at=1, verb="NOTE", actor="a@b.test", argument=parsed.argument)
    assert BotCommand.decode(command.encode()) == command


def test_a_case_id_a_digit_short_is_answered_at_once_not_sent() -> None:
    parsed = parse_command("confirm case-1a2b3c4d5e6 fraud")
    assert parsed.argument is None and "twelve hex digits" in (parsed.problem or ""), parsed


FILLED = {
    "<transaction>": "<tx-1>",
    "<subject>": "<subj-tx-1>",
    "<case>": "<case-1a2b3c4d5e6f>",
    "<person>": "<lead@store.test>",
    "<text>": "<left by the side door>",
    "[reason]": "[not him]",
}


@pytest.mark.parametrize("form", [f for f in HELP_TEXT.split("`")[1::2] if " " in f and "..." not in f])
def test_every_form_the_help_text_shows_is_accepted_as_written(form: str) -> None:
    """Typed as the help text writes it, brackets and all, every command is read (the mention's example too)."""
    text = form
    for placeholder, value in FILLED.items():
        text = text.replace(placeholder, value)
    parsed = parse_command(text)
    assert parsed.verb is not None and parsed.problem is None, (form, parsed)


@pytest.mark.parametrize(
    ("text", "argument"),
    [
        (
            "note case-1a2b3c4d5e6f left by the side door\nthe cashier saw him",
            "case-1a2b3c4d5e6f left by the side door\nthe cashier saw him",
        ),
        ("dismiss case-1a2b3c4d5e6f\nnot him:\n- taller\n- no cap", "case-1a2b3c4d5e6f not him:\n- taller\n- no cap"),
        ("Checkout Guard note case-1a2b3c4d5e6f one\n\ttwo @Checkout", "case-1a2b3c4d5e6f one\n\ttwo @Checkout"),
    ],
)
def test_a_note_or_reason_written_on_several_lines_is_sent_with_its_line_breaks(text: str, argument: str) -> None:
    """The words were joined with spaces, so a note written as a list reached the case as one line."""
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.argument, parsed.problem) == (argument, None), parsed


def test_status_shows_each_watchlist_subject_id_in_its_own_short_code_span_whatever_the_topic_holds() -> None:
    """The bot reads the ``watchlist`` topic as it is: an id written as it came ended its code span, so ``<@all>`` in it
    mentioned the whole room, and a 100 000-character one made a message Webex refuses."""
    from jobs.bot.webex_bot import watchlist_text
    from schemas.records import WatchlistEntry

    now = 1_800_000_000_000
    ids = ["x` <@all> `y", "z" * 100_000, ""]
    entries = [WatchlistEntry(s, "SUSPECT", [], "fraud", "lp@x", now, expires_at=now + 86_400_000) for s in ids]
    text = watchlist_text(entries, now, 365).removeprefix(
        "Watchlist: 3 suspect; expiring within 30 days (`renew <subject>` keeps one): "
    )
    assert "<" not in text and len(text) < 400
    assert text == "(no id) in 1 d, `x   @all   y` in 1 d, `" + "z" * 120 + "` in 1 d"
