"""The Webex bot over HTTP, with the local Webex API server playing Webex: signatures, allow-lists,
replies, its own messages, webhook registration and a flood of malformed bodies. Commands are collected
by a plain function here; tests/e2e/test_alerts_e2e.py checks they reach Kafka."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from infra.cli import setting_errors
from infra.clients.webex import WebexClient, WebexError
from infra.command_auth import authenticate_command
from infra.launcher import wait_for
from infra.local.webex import BackgroundServer, LocalWebexServer, person_id, sign
from infra.settings import Settings, WebexSettings
from jobs.bot import webex_bot
from jobs.bot.webex_bot import (
    MAX_BODY_BYTES,
    PREVIOUS_SECRET_GRACE_S,
    WEBHOOK_PATH,
    Headers,
    WebexBot,
    parse_callback,
    parse_command,
    strip_mention,
    verify_signature,
    webex_time_ms,
)
from schemas.records import BotCommand

TOKEN, SECRET, SIGNING_KEY = "bot-token", "hook-secret", "command-signing-key"
SECURITY_ROOM, SHOP_FLOOR = "room-security", "room-shop-floor"


def test_signature_is_hmac_sha1_of_the_exact_body() -> None:
    body = b'{"id": "x"}'
    assert verify_signature(body, sign(body, SECRET), SECRET)
    assert verify_signature(body, sign(body, SECRET).upper(), SECRET)
    assert not verify_signature(body + b" ", sign(body, SECRET), SECRET)
    assert not verify_signature(body, sign(body, "other"), SECRET)
    assert not verify_signature(body, None, SECRET)
    assert not verify_signature(body, sign(body, ""), "")  # no secret configured: nothing verifies


@pytest.mark.parametrize(
    ("text", "verb", "argument"),
    [
        ("Checkout Guard fraud tx-123", "FRAUD", "tx-123"),
        ("Checkout vip tx-9", "VIP", "tx-9"),
        ("checkout tx-9", "CHECKOUT", "tx-9"),  # the bot's short name is also a verb
        ("Checkout checkout tx-9", "CHECKOUT", "tx-9"),
        ("@Checkout Guard: checkout `tx-1`", "CHECKOUT", "tx-1"),
        ("forget subj-tx-1", "FORGET", "subj-tx-1"),
        ("STATUS", "STATUS", None),
        ("help me", "HELP", None),
        ("what is this", None, None),
        ("", None, None),
    ],
)
def test_commands_are_parsed_after_the_mention(text: str, verb: str | None, argument: str | None) -> None:
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.verb, parsed.argument, parsed.problem) == (verb, argument, None)


def test_a_command_without_its_argument_says_what_is_missing() -> None:
    assert parse_command("fraud").problem == "`fraud` needs a transaction id"
    assert "does not look like" in parse_command("forget ../../etc").problem


@pytest.mark.parametrize(
    "text", ["checkout a/b", "forget subj-1/../../x", "fraud tx?reboot", "vip " + "t" * 124, "checkout " + "t" * 129]
)
def test_arguments_that_are_not_valid_ids_are_answered_not_published(text: str) -> None:
    """The bot applies schemas.identifiers (also to the subject ``subj-<tx>`` that fraud/vip would create)."""
    assert "does not look like" in (parse_command(text).problem or "")


@pytest.mark.parametrize(
    "text",
    [
        "forget a`[login](https://evil.example/x)",
        "fraud x`<@all>y",
        "checkout x`<@personEmail:ceo@store.test|CEO>y",
        "vip **x**`__y__",
    ],
)
def test_an_odd_argument_is_echoed_as_code_never_as_the_senders_markdown(text: str) -> None:
    """Anyone may get this answer: a backtick in the argument must not end the code span and let the bot post
    the sender's link or mention in its own name."""
    problem = parse_command(text).problem or ""
    assert "does not look like" in problem
    assert problem.count("`") == 2 and "<" not in problem and ">" not in problem, problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("forget subj-a subj-b", "`forget` takes one subject id"),
        ("fraud tx-1 tx-2 tx-3", "`fraud` takes one transaction id"),
        ("Checkout Guard vip tx-1 and tx-2", "`vip` takes one transaction id"),
    ],
)
def test_a_watchlist_command_with_more_than_one_id_is_answered_not_cut_to_the_first(text: str, problem: str) -> None:
    """``forget subj-a subj-b`` used to forget ``subj-a`` alone while the sender believed both were gone."""
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert problem in (parsed.problem or ""), parsed


def test_a_mention_of_the_bot_after_the_command_is_not_an_extra_word() -> None:
    for text in ("fraud tx-1 Checkout Guard", "fraud tx-1 @Checkout", "Checkout Guard fraud tx-1 Checkout Guard"):
        parsed = parse_command(text, ("Checkout Guard", "Checkout"))
        assert (parsed.verb, parsed.argument, parsed.problem) == ("FRAUD", "tx-1", None), text
    assert parse_command("forget subj-checkout", ("Checkout",)).argument == "subj-checkout"
    assert (
        parse_command("note case-1a2b3c4d5e6f asked Checkout", ("Checkout",)).argument
        == "case-1a2b3c4d5e6f asked Checkout"
    )


@pytest.mark.parametrize(
    ("text", "verb", "argument"),
    [
        ("fraud tx-1\u200b", "FRAUD", "tx-1"),  # a zero-width space pasted with the id
        ("\ufefffraud tx-1", "FRAUD", "tx-1"),
        ("fraud tx\u200d-1", "FRAUD", "tx-1"),  # zero-width joiner
        ("vip \u200ctx-1", "VIP", "tx-1"),  # zero-width non-joiner
        ("Checkout Guard\u2060 forget subj-\u00adtx-1", "FORGET", "subj-tx-1"),
        (
            "assign case-1a2b3c4d5e6f lead\u200b@store.test",
            "ASSIGN",
            "case-1a2b3c4d5e6f lead@store.test",
        ),  # not a lookalike of the lead
    ],
)
def test_invisible_characters_are_read_as_the_sender_sees_the_text(text: str, verb: str, argument: str) -> None:
    parsed = parse_command(text, ("Checkout Guard", "Checkout"))
    assert (parsed.verb, parsed.argument, parsed.problem) == (verb, argument, None)


def test_text_that_reads_in_another_order_than_it_is_written_is_refused() -> None:
    assert "does not look like" in (parse_command("forget \u202e1-jbus").problem or "")  # shows as "subj-1"


def test_mention_is_only_stripped_as_a_whole_word() -> None:
    assert strip_mention("Checkoutstatus", ("Checkout",)) == "Checkoutstatus"


def test_callback_parsing_rejects_what_is_not_a_message_webhook() -> None:
    good = {"resource": "messages", "event": "created", "data": {"id": "m", "roomId": "r", "personId": "p"}}
    assert parse_callback(json.dumps(good).encode())["id"] == "m"
    for bad in (
        b"",
        b"[]",
        b"{",
        json.dumps({**good, "event": "deleted"}).encode(),
        json.dumps({**good, "data": {"id": 5, "roomId": "r", "personId": "p"}}).encode(),
    ):
        with pytest.raises(ValueError):
            parse_callback(bad)


# --------------------------------------------------------------------------- over HTTP


class Harness:
    def __init__(
        self,
        webex: LocalWebexServer,
        bot: WebexBot,
        server: BackgroundServer,
        published: list[BotCommand],
        headers: list[Headers],
    ) -> None:
        self.webex, self.bot, self.server, self.published, self.headers = webex, bot, server, published, headers
        self.url = server.base + WEBHOOK_PATH

    def replies(self, room: str) -> list[str]:
        return [m["markdown"] for m in self.webex.state.bot_messages(room)]

    def say(self, room: str, email: str, text: str, room_type: str | None = None) -> list[dict[str, Any]]:
        return self.webex.say(room, email, text, room_type)


@pytest.fixture
def harness() -> Iterator[Harness]:
    with LocalWebexServer(TOKEN) as webex:
        settings = Settings(
            webex=WebexSettings(
                base_url=webex.url,
                bot_token=SecretStr(TOKEN),
                webhook_secret=SecretStr(SECRET),
                public_url="http://127.0.0.1:1",
                allowed_rooms=SECURITY_ROOM,
                allowed_people="lead@store.test",
                command_signing_key=SecretStr(SIGNING_KEY),
            )
        )
        published: list[BotCommand] = []
        headers: list[Headers] = []

        def publish(command: BotCommand, signature: Headers) -> None:
            published.append(command)
            headers.append(signature)

        # The bot's Webex client holds a connection per handler thread: closed once the receiver stopped.
        with WebexBot(
            settings,
            publish=publish,
            status_text=lambda: "all healthy",
            inspect_checkout=lambda tx: f"face check of {tx}: no match",
        ) as bot:
            server = BackgroundServer(bot.app, lifespan="on", name="bot").start()
            try:
                hooks = wait_for(
                    lambda: len(webex.state.webhooks) == 2 and list(webex.state.webhooks), 10, what="the webhooks"
                )  # messages and card presses, registered on start
                for i, hook in enumerate(hooks):
                    webex.state.webhooks[i] = {**hook, "targetUrl": server.base + WEBHOOK_PATH}  # reachable here
                yield Harness(webex, bot, server, published, headers)
            finally:
                server.stop()


def test_bot_registers_its_webhook_with_the_secret_on_start(harness: Harness) -> None:
    hook, cards = list(harness.webex.state.webhooks)
    assert hook["secret"] == SECRET and hook["resource"] == "messages" and hook["event"] == "created"
    assert (cards["secret"], cards["resource"], cards["targetUrl"]) == (SECRET, "attachmentActions", hook["targetUrl"])
    harness.bot.register_webhook()  # a restart re-registers: still one of each, now at the configured URL
    again, _ = harness.webex.state.webhooks
    assert again["targetUrl"] == "http://127.0.0.1:1/webex/webhook" and again["id"] != hook["id"]
    assert len(harness.webex.state.webhooks) == 2


def test_re_registration_deletes_its_old_webhooks_past_webexs_first_page(harness: Harness) -> None:
    """Webex lists 100 webhooks a page: the bot's old ones behind 120 others were not seen, so each restart
    added two more, and Webex called the bot once per copy."""
    state = harness.webex.state
    others = [
        {"id": f"other-{i}", "name": f"other-{i}", "targetUrl": "https://other.test/", "resource": "messages",
         "event": "created", "secret": "x", "status": "active", "created": "2026-01-01T00:00:00.000Z"}
        for i in range(120)
    ]  # fmt: skip
    with state.lock:
        state.webhooks[:0] = others
    assert harness.bot.register_webhook() is not None
    ours = [w for w in state.webhooks if not w["id"].startswith("other-")]
    assert len(ours) == 2 and {w["resource"] for w in ours} == {"messages", "attachmentActions"}
    assert len(state.webhooks) == 122, "the other webhooks are left alone"


def test_webhook_registration_waits_out_a_rate_limit_as_webex_asks(harness: Harness) -> None:
    """Retried at 1 s, 2 s, 4 s... regardless, a rate-limited registration spends its tries inside the limit and
    leaves the bot without a webhook."""
    harness.webex.state.fail((429,), count=2, retry_after=3)
    t0 = time.monotonic()
    assert harness.bot.register_webhook() is not None
    assert time.monotonic() - t0 >= 6.0 and harness.webex.state.requests["429"] == 2


def test_a_failed_registration_is_logged_with_webexs_tracking_id(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Webex support asks for the trackingId of a failed call; the warning gave only the status and message."""
    retries = webex_bot.call_with_retries
    monkeypatch.setattr(webex_bot, "call_with_retries", lambda call, **kw: retries(call, **kw, sleep=lambda _: None))
    harness.webex.state.fail((503,), count=1)
    with caplog.at_level("WARNING", logger=webex_bot.__name__):
        assert harness.bot.register_webhook() is not None
    [warning] = [r.getMessage() for r in caplog.records if "registration failed" in r.getMessage()]
    assert warning.startswith("webhook registration failed (503 Injected failure (trackingId ROUTER_"), warning


def test_fraud_from_the_security_room_becomes_one_command_and_a_reply(harness: Harness) -> None:
    [delivery] = harness.say(SECURITY_ROOM, "guard@store.test", "Checkout Guard fraud tx-42")
    assert delivery["status"] == 200
    wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the reply")
    [command] = harness.published
    assert (command.verb, command.argument, command.actor, command.room_id) == (
        "FRAUD",
        "tx-42",
        "guard@store.test",
        SECURITY_ROOM,
    )
    assert command.command_id == delivery["message_id"]  # a redelivery is the same command
    assert "subj-tx-42" in harness.replies(SECURITY_ROOM)[0]


def test_watchlist_change_from_a_room_not_allowed_is_politely_refused(harness: Harness) -> None:
    harness.say(SHOP_FLOOR, "cashier@store.test", "Checkout Guard vip tx-7")
    [reply] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the refusal")
    assert reply.startswith("Sorry, changes to the watchlist can only be made")
    assert harness.published == []


def test_allow_listed_person_may_change_the_watchlist_from_any_room(harness: Harness) -> None:
    harness.say(SHOP_FLOOR, "Lead@Store.test", "forget subj-tx-7")
    wait_for(lambda: harness.published, 10, what="the command")
    assert harness.published[0].verb == "FORGET"


def test_checkout_and_status_answer_only_allow_listed_rooms_and_people(harness: Harness) -> None:
    """Both reveal watchlist data (subject ids, similarities, a fresh snapshot on demand, volumes)."""
    fresh: list[str] = []
    harness.bot.fresh_checkout = lambda tx: fresh.append(tx) or f"fresh snapshot of {tx}: no match"
    harness.say(SHOP_FLOOR, "cashier@store.test", "Checkout Guard checkout tx-5")
    harness.say(SHOP_FLOOR, "cashier@store.test", "status")
    refusals = wait_for(
        lambda: len(harness.replies(SHOP_FLOOR)) == 2 and harness.replies(SHOP_FLOOR), 10, what="two refusals"
    )
    assert sorted(refusals) == [
        "Sorry, `checkout` answers only in the store security room or to people on the allow-list.",
        "Sorry, `status` answers only in the store security room or to people on the allow-list.",
    ]
    assert harness.published == [] and fresh == [], "a refused checkout still took a snapshot"
    harness.say(SECURITY_ROOM, "guard@store.test", "Checkout Guard checkout tx-5")
    harness.say(SHOP_FLOOR, "Lead@Store.test", "status")
    replies = wait_for(
        lambda: len(harness.replies(SECURITY_ROOM)) == 2 and harness.replies(SECURITY_ROOM), 10, what="the answers"
    )
    assert replies == ["face check of tx-5: no match", "fresh snapshot of tx-5: no match"]
    [status] = wait_for(lambda: harness.replies("direct:Lead@Store.test"), 10, what="the status for the lead")
    assert status == "all healthy"  # to the lead alone: the shop floor room is not allowed to read it
    assert sorted(c.verb for c in harness.published) == ["CHECKOUT", "STATUS"] and fresh == ["tx-5"]


def test_watchlist_data_asked_for_in_a_room_not_allowed_goes_to_the_allowed_person_alone(harness: Harness) -> None:
    """The lead may see subject ids and similarities; the cashiers in the shop floor room may not."""
    harness.bot.fresh_checkout = lambda tx: f"fresh snapshot of {tx}: matches suspect subj-a (97% similar)"
    harness.say(SHOP_FLOOR, "lead@store.test", "Checkout Guard checkout tx-5")
    direct = wait_for(
        lambda: len(harness.replies("direct:lead@store.test")) == 2 and harness.replies("direct:lead@store.test"),
        10,
        what="both answers, directly",
    )
    assert direct == ["face check of tx-5: no match", "fresh snapshot of tx-5: matches suspect subj-a (97% similar)"]
    [note] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the note in the room")
    assert "directly" in note and "tx-5" not in note and "subj-a" not in note
    harness.say("room-lead-1-1", "lead@store.test", "status", room_type="direct")  # their own 1:1 room: answered there
    assert wait_for(lambda: harness.replies("room-lead-1-1"), 10, what="the status") == ["all healthy"]


def test_help_answers_anyone(harness: Harness) -> None:
    harness.say(SHOP_FLOOR, "cashier@store.test", "help")
    [reply] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the help")
    assert reply.startswith("**Checkout Guard** understands")


def test_help_from_someone_not_allow_listed_is_answered_without_a_command_the_services_would_refuse(
    harness: Harness,
) -> None:
    """The watchlist service dead-letters a command from an issuer off the allow-list as ``unauthorized``: a
    cashier asking for help must not leave one."""
    harness.say(SHOP_FLOOR, "cashier@store.test", "help")
    [reply] = wait_for(lambda: harness.replies(SHOP_FLOOR), 10, what="the help")
    assert reply.startswith("**Checkout Guard** understands") and harness.published == []
    harness.say(SECURITY_ROOM, "guard@store.test", "help")  # from the security room it is recorded, and accepted
    wait_for(lambda: harness.published, 10, what="the help command")
    [command], [headers] = harness.published, harness.headers
    authenticate_command(command, headers, harness.bot.settings.webex, command.issued_at, fresh=False)


def test_every_published_command_is_signed_so_the_watchlist_service_accepts_it(harness: Harness) -> None:
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-42")
    wait_for(lambda: harness.published, 10, what="the command")
    [command], [headers] = harness.published, harness.headers
    settings = harness.bot.settings.webex
    authenticate_command(command, headers, settings, command.issued_at + 1000)  # raises when not accepted
    with pytest.raises(ValueError, match="does not match"):
        authenticate_command(replace(command, argument="tx-43"), headers, settings, command.issued_at + 1000)


def test_without_a_signing_key_watchlist_changes_are_refused_and_nothing_is_published(harness: Harness) -> None:
    harness.bot.signing_key = ""
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-42")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the refusal")
    assert reply.startswith("Sorry, watchlist changes are switched off") and harness.published == []
    harness.say(SECURITY_ROOM, "guard@store.test", "status")  # what changes nothing still works, unsigned
    wait_for(lambda: harness.published, 10, what="the status command")
    assert harness.headers == [[]]


def test_own_messages_are_ignored(harness: Harness) -> None:
    harness.say(SECURITY_ROOM, "guard@store.test", "help")
    wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the help reply")
    # Webex also announces the bot's own reply; handling it would loop.
    [own] = harness.webex.state.bot_messages(SECURITY_ROOM)
    body = json.dumps(
        {
            "resource": "messages",
            "event": "created",
            "data": {"id": own["id"], "roomId": SECURITY_ROOM, "personId": harness.webex.state.bot["id"]},
        }
    ).encode()
    r = httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)})
    assert r.status_code == 200
    time.sleep(0.5)
    assert len(harness.webex.state.bot_messages(SECURITY_ROOM)) == 1
    assert [c.verb for c in harness.published] == ["HELP"]


def callback(message_id: str, room: str = SECURITY_ROOM, email: str = "guard@store.test") -> bytes:
    return json.dumps(
        {
            "id": "hook",
            "resource": "messages",
            "event": "created",
            "data": {"id": message_id, "roomId": room, "personId": person_id(email), "personEmail": email},
        }
    ).encode()


def test_forged_or_unsigned_webhooks_are_refused_and_change_nothing(harness: Harness) -> None:
    # A real message from the security room exists; only a correctly signed callback may act on it.
    harness.webex.state.webhooks.clear()
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-13")
    [message] = [m for m in harness.webex.state.messages if m["text"] == "fraud tx-13"]
    body = callback(message["id"])
    unsigned = httpx.post(harness.url, content=body)
    forged = httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, "guessed")})
    tampered = httpx.post(harness.url, content=body + b" ", headers={"X-Spark-Signature": sign(body, SECRET)})
    assert (unsigned.status_code, forged.status_code, tampered.status_code) == (401, 403, 403)
    time.sleep(0.5)
    assert harness.published == [] and harness.replies(SECURITY_ROOM) == []
    good = httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)})
    assert good.status_code == 200
    wait_for(lambda: harness.published, 10, what="the signed command")


def test_after_a_secret_rotation_callbacks_signed_with_the_previous_secret_are_taken_for_a_while(
    harness: Harness,
) -> None:
    """Restarted with a new secret, the bot refused (403) what Webex still signed with the old one until the
    re-registration went through: the staff's commands of those minutes were lost."""
    settings = harness.bot.settings
    rotated = settings.model_copy(
        update={"webex": settings.webex.model_copy(update={"previous_webhook_secret": SecretStr("old-secret")})}
    )
    with WebexBot(rotated, client=harness.bot.client, publish=lambda *_: None, inspect_checkout=str) as bot:
        assert bot.previous_secret == "old-secret" and bot.previous_until > time.monotonic() + 3600  # re-registered
    harness.bot.previous_secret = "old-secret"
    harness.bot.register_webhook()  # the new secret reached Webex: the old one is taken a while more
    assert time.monotonic() + PREVIOUS_SECRET_GRACE_S - 5 < harness.bot.previous_until
    harness.webex.state.webhooks.clear()
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-14")
    [message] = [m for m in harness.webex.state.messages if m["text"] == "fraud tx-14"]
    body = callback(message["id"])
    assert (
        httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, "old-secret")}).status_code
        == 200
    )
    wait_for(lambda: harness.published, 10, what="the command signed with the previous secret")
    harness.bot.previous_until = time.monotonic()  # the grace is over: the old secret no longer verifies
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-15")
    [later] = [m for m in harness.webex.state.messages if m["text"] == "fraud tx-15"]
    body = callback(later["id"])
    assert (
        httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, "old-secret")}).status_code
        == 403
    )
    assert (
        httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, "guessed")}).status_code == 403
    )


def test_the_previous_secret_is_not_taken_past_its_maximum_age_while_the_re_registration_keeps_failing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration with the new secret that never went through left the old secret taken for ever."""
    settings = harness.bot.settings
    webex = settings.webex.model_copy(
        update={"previous_webhook_secret": SecretStr("old-secret"), "previous_webhook_secret_max_age_s": 60.0}
    )
    rotated = settings.model_copy(update={"webex": webex})
    with WebexBot(rotated, client=harness.bot.client, publish=lambda *_: None, inspect_checkout=str) as bot:
        started = time.monotonic()
        harness.webex.state.fail((401,), count=5)  # every try of the registration: the new secret never reaches Webex
        retries = webex_bot.call_with_retries
        monkeypatch.setattr(
            webex_bot, "call_with_retries", lambda call, **kw: retries(call, **kw, sleep=lambda _: None)
        )
        assert bot.register_webhook() is None
        assert started < bot.previous_until <= started + 60.0
        assert bot._signed_before(b"{}", sign(b"{}", "old-secret"))
        bot.previous_until = time.monotonic()  # the maximum age is over
        assert not bot._signed_before(b"{}", sign(b"{}", "old-secret"))
        harness.webex.state.heal()
        assert bot.register_webhook() is not None  # a registration then does not take the old secret again
        assert bot.previous_until <= time.monotonic()


def test_a_captured_webhook_replayed_later_runs_nothing_again(harness: Harness) -> None:
    """A signed body carries no time, and the bot forgets what it handled when it restarts: replayed then, an old
    message would become a command signed as new (the services' age limit measures from the bot's signing)."""
    harness.webex.state.webhooks.clear()
    harness.say(SECURITY_ROOM, "guard@store.test", "checkout tx-13")
    [message] = [m for m in harness.webex.state.messages if m["text"] == "checkout tx-13"]
    message["created"] = "2026-01-05T08:00:00.000Z"  # what Webex says of it now: posted long ago
    body = callback(message["id"])
    assert httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)}).status_code == 200
    time.sleep(1.0)
    assert harness.published == [] and harness.replies(SECURITY_ROOM) == []
    harness.say(SECURITY_ROOM, "guard@store.test", "checkout tx-14")  # a message of now is handled
    [fresh] = [m for m in harness.webex.state.messages if m["text"] == "checkout tx-14"]
    body = callback(fresh["id"])
    httpx.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)})
    wait_for(lambda: harness.published, 10, what="the fresh command")
    assert [c.argument for c in harness.published] == ["tx-14"]


def test_webex_times_are_read_only_with_their_zone() -> None:
    assert webex_time_ms("2026-12-06T19:56:42.123Z") == 1796587002123
    assert webex_time_ms("2026-12-06T20:56:42.123+01:00") == 1796587002123
    for bad in ("2026-12-06T19:56:42.123", "yesterday", "", None, 1796587002123, "9" * 100):
        assert webex_time_ms(bad) is None


def malformed_bodies(rng: random.Random, n: int) -> Iterator[tuple[bytes, bool]]:
    """(body, signed) pairs: garbage, wrong JSON shapes, wrong types, huge bodies; most signed so the
    parser behind the signature check is exercised too."""
    shapes: list[Any] = [
        [],
        1,
        "x",
        None,
        {},
        {"resource": "messages"},
        {"resource": "rooms", "event": "created"},
        {"resource": "messages", "event": "created"},
        {"resource": "messages", "event": "created", "data": []},
        {"resource": "messages", "event": "created", "data": {"id": None}},
        {"resource": "messages", "event": "created", "data": {"id": "m", "roomId": 3, "personId": "p"}},
        {
            "resource": "messages",
            "event": "created",
            "data": {"id": "m", "roomId": "r", "personId": "p", "personEmail": ["x"]},
        },
        {"resource": "messages", "event": "created", "data": {"id": "x" * 600, "roomId": "r", "personId": "p"}},
    ]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 300))
        elif kind == 1:
            body = json.dumps(rng.choice(shapes)).encode()
        elif kind == 2:
            body = json.dumps(rng.choice(shapes)).encode()[: rng.randint(0, 40)]
        elif kind == 3:
            body = ("{" * rng.randint(1, 5000)).encode()
        else:
            body = b'{"resource": "messages", "event": "created", "data": {"id": "' + b"\xff\xfe" * 10 + b'"}}'
        yield body, i % 7 != 0


def test_a_thousand_malformed_bodies_get_only_4xx_and_the_receiver_keeps_answering(harness: Harness) -> None:
    rng = random.Random(5)
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=10) as client:
        for body, signed in malformed_bodies(rng, 1200):
            headers = {"X-Spark-Signature": sign(body, SECRET)} if signed else {}
            status = client.post(harness.url, content=body, headers=headers).status_code
            statuses[status] = statuses.get(status, 0) + 1
        huge = b"{" + b" " * (200 * 1024) + b"}"
        big = client.post(harness.url, content=huge, headers={"X-Spark-Signature": sign(huge, SECRET)})
        statuses[big.status_code] = statuses.get(big.status_code, 0) + 1
        assert all(400 <= s < 500 for s in statuses), statuses
        assert statuses.get(400, 0) > 800  # most passed the signature and were rejected by the parser
        assert client.get(harness.server.base + "/health").status_code == 200
    harness.say(SECURITY_ROOM, "guard@store.test", "vip tx-77")
    wait_for(lambda: harness.published, 10, what="a real command after the flood")
    assert harness.published[0].verb == "VIP"


def test_a_command_that_cannot_be_recorded_gets_an_apology_not_silence(harness: Harness) -> None:
    def broken(_: BotCommand, _headers: Headers) -> None:
        raise RuntimeError("command not confirmed by Kafka within 10 s")

    harness.bot.publish = broken
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-8")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the apology")
    assert reply.startswith("Sorry, I could not record that right now")


def test_readiness_follows_whether_kafka_and_webex_answer_not_whether_the_last_command_was_recorded(
    harness: Harness,
) -> None:
    """One command Kafka refused kept /readyz 503 until the next command went through, Kafka long back."""
    kafka_down = [True]

    def kafka_probe() -> None:
        if kafka_down[0]:
            raise RuntimeError("no broker")

    def broken(_: BotCommand, _headers: Headers) -> None:
        raise RuntimeError("command not confirmed by Kafka within 10 s")

    bot = harness.bot
    bot.kafka_probe, bot.publish = kafka_probe, broken
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-8")
    wait_for(lambda: harness.replies(SECURITY_ROOM), 10, what="the apology")
    wait_for(lambda: bot.ready() == (False, "Kafka unreachable (RuntimeError)"), 10, what="Kafka seen away")
    kafka_down[0] = False  # Kafka is back, no command since
    assert bot.ready() == (False, "Kafka unreachable (RuntimeError)")  # looked at a moment ago
    bot.ready.look_again()  # READY_RECHECK_S later
    wait_for(lambda: bot.ready() == (True, "ok"), 10, what="Kafka seen back")
    harness.webex.state.fail((503,), count=1)
    bot.ready.look_again()
    wait_for(lambda: bot.ready()[1].startswith("Webex unreachable (503"), 10, what="Webex seen away")
    assert not bot.ready()[0]


def test_readyz_answers_at_once_while_the_look_at_kafka_and_webex_hangs(harness: Harness) -> None:
    """The look ran inside the /readyz question, under a lock: a question waited for Webex's and Kafka's timeouts, and
    those asked meanwhile queued behind it, so a 1-2 s probe failed exactly when a dependency was slow."""
    gate, looks = threading.Event(), []

    def slow_kafka() -> None:
        looks.append(time.monotonic())
        gate.wait(8)  # Kafka answers only when the test lets it

    bot = harness.bot
    bot.kafka_probe = slow_kafka
    answers: list[tuple[float, tuple[bool, str]]] = []

    def ask() -> None:
        t0 = time.monotonic()
        answer = bot.ready()
        answers.append((time.monotonic() - t0, answer))

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(10)
    assert [answer for _, answer in answers] == [(False, "not checked yet")] * 4
    assert max(took for took, _ in answers) < 1.5, answers
    assert len(looks) == 1  # one look in the background, not one per question
    gate.set()
    wait_for(lambda: bot.ready() == (True, "ok"), 10, what="the first look's answer")
    gate.clear()  # Kafka slow again: a look after a failed command hangs, /readyz answers from the last one
    bot.ready.look_again()
    wait_for(lambda: len(looks) == 2, 10, what="the second look")
    t0 = time.monotonic()
    assert bot.ready() == (True, "ok") and time.monotonic() - t0 < 0.5
    bot.ready.close()
    gate.set()
    thread = bot.ready._thread
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive() and len(looks) == 2  # closed: it looks no more


def test_a_message_webex_will_not_give_us_gets_an_apology_not_silence(harness: Harness) -> None:
    harness.bot.me()  # known before Webex fails: only the message itself cannot be read
    harness.webex.state.fail((503,), count=4)  # every try of the fetch
    harness.say(SECURITY_ROOM, "guard@store.test", "fraud tx-8")
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM), 15, what="the apology")
    assert reply.startswith("Sorry, I could not read your message") and harness.published == []
    assert harness.webex.state.requests["503"] == 4


def test_replies_wait_out_a_rate_limit_and_a_server_error(harness: Harness) -> None:
    harness.webex.state.fail((429, 500), count=2, retry_after=1)  # fetching the message meets both
    t0 = time.monotonic()
    harness.webex.say(SECURITY_ROOM, "guard@store.test", "help")
    wait_for(lambda: harness.replies(SECURITY_ROOM), 15, what="the reply after the failures")
    assert time.monotonic() - t0 >= 1.0  # Retry-After honoured
    assert harness.webex.state.requests["429"] == 1 and harness.webex.state.requests["500"] == 1


def test_a_reply_whose_post_got_no_answer_is_not_posted_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Webex may have posted a reply whose answer timed out: each of the 4 tries put it in the room once more."""
    with WebexClient(harness.webex.url, TOKEN, timeout_s=0.3) as slow:
        monkeypatch.setattr(harness.bot, "client", slow)
        harness.webex.state.latency_s = 1.0  # Webex posts each try, after the bot stopped waiting
        with pytest.raises(WebexError) as err:
            harness.bot._reply(SECURITY_ROOM, "guard@store.test", "Noted.", direct=False)
        time.sleep(1.5)  # what Webex was still doing is done
        harness.webex.state.latency_s = 0.0
    assert err.value.maybe_done and harness.replies(SECURITY_ROOM) == ["Noted."]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[" * 30_000 + b"]" * 30_000, 400),  # under the size cap: the parser's recursion limit
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400),
        (b"[" * 100_000 + b"]" * 100_000, 413),  # 100,000 levels cannot fit under the cap
    ],
)
def test_a_correctly_signed_deeply_nested_body_gets_a_4xx_never_a_500(
    harness: Harness, body: bytes, status: int
) -> None:
    assert (len(body) <= MAX_BODY_BYTES) == (status == 400)
    with httpx.Client(timeout=10) as client:
        r = client.post(harness.url, content=body, headers={"X-Spark-Signature": sign(body, SECRET)})
        assert r.status_code == status, r.text
        assert client.get(harness.server.base + "/health").status_code == 200


@pytest.mark.parametrize(
    "url",
    ["http://bot.store.example", "http://10.0.0.5:8088", "HTTP://bot.example/x", "bot.example", "ftp://bot.example"],
)
def test_a_public_url_webex_would_post_to_over_plain_http_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """Registered as it was, Webex posted every signed callback (the staff's commands) in clear over the network."""
    monkeypatch.setenv("CG_WEBEX__PUBLIC_URL", url)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith("CG_WEBEX__PUBLIC_URL: ")
    assert "must be an https:// URL" in setting_errors(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://bot.store.example",
        "http://127.0.0.1:8088",  # make run and the tests: the local Webex API on this machine
        "http://localhost:8088",
        "http://[::1]:8088",
        "http://0.0.0.0:8088",
    ],
)
def test_an_https_or_this_machines_public_url_is_taken(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("CG_WEBEX__PUBLIC_URL", url)
    assert Settings().webex.public_url == url


def test_the_bots_web_server_logs_through_the_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn set up handlers of its own for the bot's web server: its lines (an exception in a webhook, with its
    traceback) skipped the masking of secrets and the project's line format."""
    from infra import web_server
    from jobs.bot import webex_bot

    options: dict[str, Any] = {}

    class Server:
        def __init__(self, config: Any) -> None:
            options["log_config"] = config.log_config

        def run(self) -> None:
            pass

    monkeypatch.setattr(webex_bot, "get_settings", lambda: Settings())
    monkeypatch.setattr(webex_bot, "setup_logging", lambda *_a, **_k: None)
    monkeypatch.setattr(
        webex_bot,
        "WebexBot",
        lambda _settings: type("B", (), {"app": None, "heartbeat": None, "ready": None, "close": lambda self: None})(),
    )
    monkeypatch.setattr(webex_bot.metrics, "serve", lambda *_a, **_k: type("E", (), {"close": lambda self: None})())
    monkeypatch.setattr(web_server.uvicorn, "Server", Server)
    monkeypatch.setattr(web_server, "stop_on_signals", lambda stop, _signals: stop.set())  # stopped at once
    webex_bot.main()
    assert options["log_config"] is None


def test_closing_the_bot_gives_up_the_admin_client_its_readiness_looks_at_kafka_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin client of /readyz's Kafka look was never closed: its broker connections and threads stayed until the
    process ended (a bot built again, as in the tests, kept one more each time)."""
    import gc
    import weakref

    polled: list[int] = []

    class Admin:
        def list_topics(self, topic: str | None = None, timeout: float | None = None) -> object:
            return {}

        def poll(self, timeout: float) -> int:
            polled.append(1)  # the client's last log lines handed over
            return 0

    built: list[Admin] = []
    monkeypatch.setattr(webex_bot.kafka_clients, "admin", lambda _settings: built.append(Admin()) or built[-1])

    class Client:
        def me(self) -> dict[str, Any]:
            return {"id": "bot"}

    bot = WebexBot(Settings(), client=Client(), publish=lambda *_: None, inspect_checkout=str)  # type: ignore[arg-type]
    wait_for(lambda: bot.ready() == (True, "ok"), 10, what="the look at Kafka and Webex")
    admin = weakref.ref(built.pop())
    bot.close()
    gc.collect()
    assert admin() is None and polled == [1]
    with pytest.raises(RuntimeError, match="closed"):
        bot.kafka_probe()  # a look after close builds no new client
    assert not built


def test_a_stop_gives_up_a_command_still_being_handled_and_closes_the_bots_clients_before_the_sigkill() -> None:
    """On SIGTERM uvicorn waited for a command still being handled (its thread: a Kafka publish with Kafka down, a
    camera that does not answer) as long as it took, past the supervisor's SIGKILL, then raised the SIGTERM again with
    the default handler, so the process died of it before the bot's clients were closed. The command is given up 2 s
    before the SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM) and the clients closed by 1 s before."""
    import subprocess
    import sys

    from infra.settings import REPO_ROOT

    code = """
import os, signal, socket, threading, time, urllib.request
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.routing import Route
from infra.settings import Settings
from jobs.bot import webex_bot

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
settings = Settings(
    supervisor={"stop_timeout_s": 2.5}, cameras={"bridge_stop_grace_s": 1.0}, kafka={"stop_flush_s": 0.5},
    alerts={"stop_wait_s": 0.2}, webex={"bot_host": "127.0.0.1", "bot_port": port},
)
closed = []

async def hang(_request):  # answered at once, the command handled after the answer (as the webhook does)
    return JSONResponse({"ok": True}, background=BackgroundTask(run_in_threadpool, time.sleep, 8))

class Bot:
    app = Starlette(routes=[Route("/hang", hang, methods=["POST"])])
    heartbeat = ready = None
    def close(self):
        closed.append(time.monotonic())
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.close()

webex_bot.get_settings = lambda: settings
webex_bot.setup_logging = lambda *a, **k: None
webex_bot.WebexBot = lambda _settings: Bot()
webex_bot.metrics.serve = lambda *a, **k: type("E", (), {"close": lambda self: None})()
sent = []

def client():
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/hang", b"{}"), timeout=5)
            break
        except OSError:
            time.sleep(0.05)
    time.sleep(0.3)  # the command's thread is under way
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=client, daemon=True).start()
webex_bot.main()
print(round(time.monotonic() - sent[0], 2), bool(closed))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, f"the bot died of its SIGTERM (exit {out.returncode}): {out.stderr[-2000:]}"
    took, closed = out.stdout.split()
    assert float(took) < 1.7, f"the bot stopped {took}s after its SIGTERM; the SIGKILL comes at 2.5 s"
    assert closed == "True", "the bot's clients were not closed"


def test_the_recorded_checkout_answer_says_which_engine_matched_and_that_a_match_is_no_proof() -> None:
    """``checkout <tx>`` named the subject a decision matched with a bare similarity: no word of Rekognition (whose
    99 is a bare match where the local engine's 68 is a clear one) and none that a match is a lead to check."""
    from jobs.faces.checkout_inspect import FACE_MATCH_CAVEAT

    doc = {
        "store_id": "S1",
        "lane_id": "L2",
        "outcome": "REVIEW",
        "risk_score": 60,
        "face_status": "MATCHED",
        "face_category": "SUSPECT",
        "face_subject_id": "subj-tx-1",
        "face_similarity": 99.41,
        "face_matcher": "rekognition",
    }
    reply = webex_bot.recorded_checkout({"tx-3": doc}.get)("tx-3")
    assert "face matches **suspect** `subj-tx-1` (99.4% similar by Rekognition)." in reply
    assert FACE_MATCH_CAVEAT in reply
    local = webex_bot.recorded_checkout({"tx-3": {**doc, "face_matcher": "local", "face_similarity": 68.8}}.get)("tx-3")
    assert "(68.8% similar)." in local and FACE_MATCH_CAVEAT in local
    no_match = webex_bot.recorded_checkout({"tx-3": {**doc, "face_status": "NO_MATCH"}}.get)("tx-3")
    assert FACE_MATCH_CAVEAT not in no_match


def test_the_recorded_checkout_answer_shows_an_indexed_decisions_values_in_short_code_spans_mentioning_nobody() -> None:
    """The decision is what the sink indexed from ``processed_transactions``: its values were written as they came, so
    a subject id with a backtick and ``<@all>`` ended its code span and mentioned the room, and a face status or lane of
    100 000 characters made a reply Webex refuses."""
    doc = {
        "store_id": "S1 <@all>",
        "lane_id": "L" * 100_000,
        "outcome": "REVIEW",
        "risk_score": 60,
        "face_status": "MATCHED",
        "face_category": "<@all>",
        "face_subject_id": "x` <@all> `",
        "face_similarity": 99.41,
    }
    reply = webex_bot.recorded_checkout({"tx-3": doc}.get)("tx-3")
    assert "<" not in reply and len(reply) < 1000
    assert reply.startswith("Transaction `tx-3` at store `S1  @all` lane `" + "L" * 120 + "`: ")
    assert "face matches `@all` `x   @all` (99.4% similar)" in reply
    odd = webex_bot.recorded_checkout({"tx-3": {**doc, "face_status": "Q" * 100_000}}.get)("tx-3")
    assert "<" not in odd and len(odd) < 1000


def test_the_recorded_checkout_answer_reads_a_near_match_and_a_vip_as_the_alerts_do() -> None:
    """It read 99.96 as "100.0% similar" (a near match as a perfect one) and a VIP as "**vip**", where the alert
    messages say 99.9 and VIP."""
    doc = {
        "store_id": "S1",
        "lane_id": "L2",
        "outcome": "APPROVE",
        "risk_score": 10,
        "face_status": "MATCHED",
        "face_category": "VIP",
        "face_subject_id": "subj-v1",
        "face_similarity": 99.96,
        "face_matcher": "local",
    }
    reply = webex_bot.recorded_checkout({"tx-4": doc}.get)("tx-4")
    assert "face matches **VIP** `subj-v1` (99.9% similar)." in reply


def test_a_watchlist_record_that_does_not_decode_is_left_out_of_status_not_the_whole_watchlist(monkeypatch, caplog):
    """A compacted topic keeps such a record (a newer schema's, corrupt bytes) until its key is written again: raised,
    it made every ``status`` say "Watchlist unavailable"; the watchlist service leaves it out, and so does the bot."""
    from infra.clients import control_topics
    from schemas.records import WatchlistEntry

    def entry(subject: str) -> bytes:
        return WatchlistEntry(subject, "SUSPECT", [], "fraud", "lp@example.com", 1).encode()

    def read(_settings, apply, timeout_s=0.0, specs=()):
        apply("watchlist", b"subj-a", entry("subj-a"))
        apply("watchlist", b"subj-b", entry("subj-b"))
        apply("watchlist", b"subj-b", b"\xc3\x01" + b"\x00" * 8 + b"\x02")  # a schema this bot does not know
        apply("watchlist", b"subj-c", b"not avro")

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    entries = webex_bot.read_watchlist(Settings())
    assert [e.subject_id for e in entries] == ["subj-a", "subj-b"]  # subj-b: the entry read before stays
    assert "subj-c" in caplog.text and "not avro" not in caplog.text
