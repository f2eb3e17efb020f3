"""Webex replies to verdicts the case service refused after the bot had answered "Sent" (sinks/alerts/notices.py):
which refusals are replied to, where, once, and what holds a reply up, against the local Webex API."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.clients.webex import WebexClient
from infra.local.webex import LocalWebexServer
from infra.settings import AlertSettings, CasesSettings, Settings, WebexSettings
from jobs.cases.service import CaseCore
from schemas.codec import codec
from schemas.records import WEBEX_REPLY_PERSON, WEBEX_REPLY_ROOM, AuditEvent
from schemas.topics import AUDIT, CASES
from sinks.alerts import notices
from sinks.alerts.erase import Eraser
from sinks.alerts.notices import Notifier, refusal_notice
from sinks.alerts.sender import AlertSender, Ledger, RateLimit
from tests.unit import test_alert_channels as channels
from tests.unit import test_case_service as case_tests
from tests.unit.test_alert_eraser import Message
from tests.unit.test_case_service import KEY, LEAD, alert_src, command_src

webex, closer = channels.webex, channels.closer
"""The fixtures of tests/unit/test_alert_channels.py."""

ROOM, GUARD = "room-1", "guard@example.com"
NOW = case_tests.NOW


def settings_for(server: LocalWebexServer, tmp_path: Path, **webex_fields: str) -> Settings:
    fields = {"allowed_rooms": ROOM, **webex_fields}
    return Settings(
        stack_dir=tmp_path,
        webex=WebexSettings(
            base_url=server.url,
            bot_token=SecretStr(channels.TOKEN),
            room_id="room-alerts",
            command_signing_key=SecretStr(KEY),
            **fields,
        ),
        alerts=AlertSettings(deadline_s=600),
        cases=CasesSettings(expire_after_s=600),
    )


def refusals(settings: Settings) -> list[AuditEvent]:
    """The case service's audit events of a dismiss by GUARD, given in Webex room-1, of a case LEAD confirmed first."""
    core = CaseCore(settings)
    core.marked_at = NOW
    case_id = next(o for o in core.on_alert(alert_src(event_time=NOW), NOW) if o.topic == CASES).key.decode()
    core.on_command(command_src("CONFIRM", case_id, "m1", actor=LEAD), NOW)
    outs = core.on_command(command_src("DISMISS", case_id, "m2", offset=2), NOW + 5)
    return [AuditEvent.decode(o.value) for o in outs if o.topic == AUDIT]


def notifier(closer: ExitStack, settings: Settings, ledger: Ledger, now: int = NOW) -> Notifier:
    client = closer.enter_context(closing(WebexClient.from_settings(settings.webex)))
    return Notifier(settings, ledger, client, RateLimit(), now_ms=lambda: now)


def ledger_at(closer: ExitStack, tmp_path: Path) -> Ledger:
    return closer.enter_context(closing(Ledger(tmp_path / "ledger.sqlite3")))


def eraser(settings: Settings, ledger: Ledger, replies: Notifier) -> Eraser:
    return Eraser(settings, ledger, {}, "g", now_ms=lambda: NOW, on_events=replies.take)


def test_a_refused_webex_verdict_is_replied_to_once_in_its_room_naming_the_case_and_why(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """The bot said "Sent"; the case service refused the dismiss (another person had confirmed the case first) and
    only the audit knew. The room now gets one reply mentioning the person, naming the case and why; the audit event
    read again (a redelivery) and a restarted sender post nothing more."""
    settings = settings_for(webex, tmp_path)
    ledger = ledger_at(closer, tmp_path)
    replies = notifier(closer, settings, ledger)
    (refusal,) = refusals(settings)
    eraser(settings, ledger, replies).take([Message(refusal)])
    assert replies.deliver() == 1
    (reply,) = webex.state.bot_messages(ROOM)
    case_id = refusal.details["case_id"]
    assert f"<@personEmail:{GUARD}|{GUARD}>" in reply["markdown"]
    told = f"your `dismiss` of case `{case_id}` was **not recorded**: {case_id} is already confirmed"
    assert told in reply["markdown"]
    eraser(settings, ledger, replies).take([Message(refusal)])  # read again before its offset was committed
    again = notifier(closer, settings, ledger_at(closer, tmp_path))  # the sender restarted: its ledger reopened
    assert (replies.deliver(), again.deliver()) == (0, 0)
    assert len(webex.state.bot_messages()) == 1


def test_a_refusal_in_a_room_off_the_allow_list_goes_to_the_person_alone_as_the_bots_answer_did(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, allowed_rooms="", allowed_people=f"{GUARD},{LEAD}")
    ledger = ledger_at(closer, tmp_path)
    replies = notifier(closer, settings, ledger)
    replies.take([codec("AuditEvent").decode(refusals(settings)[0].encode())])
    assert replies.deliver() == 1
    (reply,) = webex.state.bot_messages()
    assert reply["roomId"] == f"direct:{GUARD}" and reply["markdown"].startswith("Sorry, your `dismiss`")


def event(**changes: object) -> dict:
    base = {
        "audit_id": "case:m2",
        "event_time": NOW,
        "action": "DISMISS",
        "outcome": "FAILED",
        "actor": GUARD,
        "reason": "illegal_transition: case-0123456789ab is already confirmed: cannot dismiss it",
        "details": {"case_id": "case-0123456789ab", WEBEX_REPLY_ROOM: ROOM, WEBEX_REPLY_PERSON: GUARD},
    }
    return {**base, **changes}


def test_only_the_case_services_fresh_refusals_of_webex_verdicts_are_replied_to() -> None:
    fresh = 600_000
    assert refusal_notice(event(), NOW, fresh) is not None
    assert refusal_notice(event(outcome="UNCHANGED"), NOW, fresh) is None, "a double press counted"
    assert refusal_notice(event(outcome="DONE"), NOW, fresh) is None
    assert refusal_notice(event(action="FORGET"), NOW, fresh) is None, "the watchlist service's"
    assert refusal_notice(event(audit_id="watchlist:m2"), NOW, fresh) is None
    assert refusal_notice(event(details={"case_id": "case-0123456789ab"}), NOW, fresh) is None, "the case page's"
    assert refusal_notice(event(event_time=NOW - fresh - 1), NOW, fresh) is None, "read again long after"
    stale = refusal_notice(event(reason="unauthorized: issued 960 s ago, outside the accepted window"), NOW, fresh)
    assert stale is not None and "the case service refused it (issued 960 s ago" in stale.text
    hostile = refusal_notice(event(reason="bad_command: <@personId:all|all> `x`\nline"), NOW, fresh)
    assert hostile is not None and "<@" not in hostile.text and "\n" not in hostile.text


def test_a_reply_webex_refuses_for_good_is_given_up_and_the_next_one_still_goes(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, allowed_rooms=f"{ROOM},room-gone")
    ledger = ledger_at(closer, tmp_path)
    replies = notifier(closer, settings, ledger)
    gone = event(audit_id="case:m1", event_time=NOW - 1)
    gone["details"] = {**gone["details"], WEBEX_REPLY_ROOM: "room-gone"}  # type: ignore[dict-item]
    replies.take([gone, event()])
    webex.state.fail((404,), count=1)  # the bot was taken out of that room
    assert replies.deliver() == 1
    assert [m["roomId"] for m in webex.state.bot_messages()] == [ROOM]
    assert ledger.pending_notices(10) == [] and replies.deliver() == 0


def test_webex_down_or_rate_limiting_holds_the_replies_up_and_they_go_when_it_answers(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(webex, tmp_path)
    ledger = ledger_at(closer, tmp_path)
    clock = [0.0]
    client = closer.enter_context(closing(WebexClient.from_settings(settings.webex)))
    limit = RateLimit(lambda: clock[0])
    replies = Notifier(settings, ledger, client, limit, now_ms=lambda: NOW, monotonic=lambda: clock[0])
    replies.take([event()])
    webex.state.fail((503,), count=1)
    assert replies.deliver() == 0 and len(ledger.pending_notices(10)) == 1
    assert replies.deliver() == 0, "tried again before its pause"
    clock[0] += notices.RETRY_PAUSE_S
    webex.state.fail((429,), count=1, retry_after=20)
    assert replies.deliver() == 0 and limit.remaining() == 20.0, "the bot's rate limit: every channel waits"
    clock[0] += 20
    assert replies.deliver() == 1 and len(webex.state.bot_messages(ROOM)) == 1


def test_a_reply_that_got_no_answer_is_not_posted_again_nor_one_past_the_deadline(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path)
    ledger = ledger_at(closer, tmp_path)
    webex.state.latency_s = 1.0
    client = closer.enter_context(closing(WebexClient(webex.url, channels.TOKEN, timeout_s=0.3)))
    replies = Notifier(settings, ledger, client, RateLimit(), now_ms=lambda: NOW)
    replies.take([event()])
    assert replies.deliver() == 0, "a read timeout: Webex may have posted it"
    webex.state.latency_s = 0.0
    assert replies.deliver() == 0 and ledger.pending_notices(10) == []
    late = notifier(closer, settings, ledger, now=NOW + 600_001)
    late.take([event(audit_id="case:m3", event_time=NOW + 600_001)])
    later = Notifier(settings, ledger, client, RateLimit(), now_ms=lambda: NOW + 2 * 600_001)
    assert later.deliver() == 0 and ledger.pending_notices(10) == [], "given up past CG_ALERTS__DEADLINE_S"


def test_the_notifier_thread_posts_a_reply_as_soon_as_the_eraser_records_it(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path)
    ledger = ledger_at(closer, tmp_path)
    replies = notifier(closer, settings, ledger)
    stop = threading.Event()
    thread = threading.Thread(target=replies.run, args=(stop,), daemon=True)
    thread.start()
    try:
        eraser(settings, ledger, replies).take([Message(AuditEvent(**event()))])
        deadline = time.monotonic() + 5
        while not webex.state.bot_messages(ROOM) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(webex.state.bot_messages(ROOM)) == 1
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_sender_with_a_webex_channel_replies_from_a_thread_of_its_own_fed_by_its_eraser(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eraser reads ``audit`` and records the replies; the notifier posts them with the bot's client and shared
    rate limit; its thread dying shows on ``/healthz`` as the eraser's does."""
    monkeypatch.setattr(Eraser, "run", lambda self, stop: None)
    monkeypatch.setattr(Notifier, "run", lambda self, stop: None)  # the threads end at once: "died"
    settings = channels.settings_for(webex, tmp_path, channels="webex")
    channel = channels.webex_channel(closer, settings)
    alerts = AlertSender(settings, channels=[channel], ledger=ledger_at(closer, tmp_path))
    stop = threading.Event()
    alerts.start_eraser(stop)
    assert alerts._eraser is not None and alerts._notifier is not None
    assert alerts._eraser.on_events == alerts._notifier.take
    assert (alerts._notifier.client, alerts._notifier.rate_limit) == (channel.client, channel.rate_limit)
    assert alerts._notifier_thread is not None
    alerts._notifier_thread.join(5)
    alerts._eraser_thread = None  # only the replies' thread died
    assert alerts.health() == (False, "refusal replies stopped")
    alerts._halt.set()
    assert alerts.health()[0]
