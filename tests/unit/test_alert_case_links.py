"""Every alert names its case: the e-mail links the case page, the Webex message is followed by the case card
in its thread (the two images, Confirm/Dismiss); a card Webex refuses does not fail the delivered alert."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.cli import setting_errors
from infra.clients.webex import WebexError
from infra.local.webex import LocalWebexServer
from infra.settings import AlertSettings, Settings
from schemas.records import case_id_for
from sinks.alerts.message import describe
from sinks.alerts.sender import RateLimit, WebexChannel
from tests.unit import test_alert_channels as channels
from tests.unit.test_alert_channels import ROOM, alert, jpeg, settings_for, webex_channel

webex, closer = channels.webex, channels.closer
"""The fixtures of tests/unit/test_alert_channels.py."""
CASE = case_id_for("blocked:tx-1")


def test_the_email_and_the_webex_text_name_and_link_the_case() -> None:
    text = describe(alert(), AlertSettings())
    assert f"Case {CASE}, confirm or dismiss it here: http://127.0.0.1:8050/cases/{CASE}" in text.plain()
    assert f"href='http://127.0.0.1:8050/cases/{CASE}'" in text.html()
    assert f"`confirm {CASE}`" in text.markdown()


def test_the_case_card_follows_the_alert_message_in_its_thread(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    detail = channel.send(alert(), jpeg(), maybe_sent=False)
    posted, card = webex.state.bot_messages(ROOM)
    message_id = posted["id"]
    assert detail == f"{message_id} {card['id']}" and posted["files"]
    assert card["parentId"] == message_id and CASE in card["markdown"]
    [attachment] = card["attachments"]
    actions = [a.get("data") for a in attachment["content"]["actions"]]
    assert {"verb": "confirm", "case_id": CASE} in actions and {"verb": "dismiss", "case_id": CASE} in actions


def test_the_case_card_of_a_subject_without_a_reference_image_says_so_instead_of_a_broken_image(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    import json

    from infra.clients.image_store import LocalImageStore
    from sinks.alerts.message import NO_REFERENCE

    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    face = {**alert("watchlist:tx-1:subj-tx-1"), "kind": "WATCHLIST_MATCH", "subject_id": "subj-tx-1"}
    channel.send(face, jpeg(), maybe_sent=False)
    _, card = webex.state.bot_messages(ROOM)
    content = json.dumps(card["attachments"][0]["content"])
    assert "/images/reference" not in content and NO_REFERENCE in content
    assert "/images/live" in content, "the live snapshot still shows"

    LocalImageStore(tmp_path / "images").put("reference", "subj-tx-2", jpeg())
    channel.send({**face, "alert_id": "watchlist:tx-2:subj-tx-2", "subject_id": "subj-tx-2"}, jpeg(), maybe_sent=False)
    *_, card = webex.state.bot_messages(ROOM)
    content = json.dumps(card["attachments"][0]["content"])
    assert "/images/reference" in content and NO_REFERENCE not in content


def test_a_card_webex_refuses_is_posted_as_a_note_without_it_in_the_thread_and_does_not_fail_the_alert(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A card Webex refused (400, or 413 for its size) was dropped with a warning: the thread showed nothing, and no one
    knew the buttons were missing. The reply is now posted without the card, saying so and linking the case page."""
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    for status in (400, 413):
        webex.state.fail((status,), count=1)
        parent = {"id": f"message-{status}", "personId": "person-bot"}
        note_id = channel._send_card(alert(), CASE, parent)  # not raised: the alert went out already
        *_, note = webex.state.bot_messages(ROOM)
        assert note_id == note["id"] and note["parentId"] == parent["id"] and not note.get("attachments")
        assert f"Case `{CASE}`" in note["markdown"] and "refused by Webex" in note["markdown"]
        assert f"/cases/{CASE}" in note["markdown"]
    assert len(webex.state.bot_messages(ROOM)) == 2
    webex.state.fail((403,), count=1)  # not the card's fault: nothing more is tried
    assert channel._send_card(alert(), CASE, {"id": "message-403"}) is None
    assert len(webex.state.bot_messages(ROOM)) == 2


def waits_on_one_clock(channel: WebexChannel) -> list[float]:
    """The channel's waits, recorded instead of slept, on a clock they advance: the bot's shared rate-limit pause
    (which a 429 sets and a card waits out) reads that clock too, so a recorded wait ends the pause it waited for."""
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    channel.sleep = sleep  # type: ignore[method-assign]
    channel.rate_limit = RateLimit(lambda: now[0])
    return waits


def test_a_rate_limited_card_is_posted_after_retry_after_not_dropped(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """The alert message often uses up the bot's rate: a 429 on its card is waited out (``Retry-After``), not taken
    as a refusal that leaves the alert without its Confirm/Dismiss buttons."""
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    waits = waits_on_one_clock(channel)
    parent = channel.client.send_message(ROOM, "the alert")
    webex.state.fail((429,), count=2, retry_after=7)
    card_id = channel._send_card(alert(), CASE, parent)
    _, card = webex.state.bot_messages(ROOM)
    assert card_id == card["id"] and card["parentId"] == parent["id"]
    assert waits == [7.0, 7.0]


def test_a_card_rate_limited_for_longer_than_a_minute_waits_the_whole_retry_after(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """The card's wait stopped at 60 s: asked for 120 s, each early try met another 429 and the card was dropped."""
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    waits = waits_on_one_clock(channel)
    parent = channel.client.send_message(ROOM, "the alert")
    webex.state.fail((429,), count=1, retry_after=120)
    assert channel._send_card(alert(), CASE, parent) is not None
    assert waits == [120.0]


class LostAnswers:
    """A Webex whose card posts go through but whose answers are lost (a timeout after the write)."""

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def send_card(self, room_id: str, markdown: str, card: dict, parent_id: str | None = None) -> dict:
        self.messages.insert(0, {"id": f"card-{len(self.messages)}", "parentId": parent_id, "personId": "bot"})
        raise WebexError("timeout: ReadTimeout")

    def me(self) -> dict:
        return {"id": "bot", "displayName": "Checkout Guard"}

    def list_messages(self, room_id: str, max_items: int = 100, parent_id: str | None = None) -> list[dict]:
        self.asked = (max_items, parent_id)
        return [m for m in self.messages if parent_id is None or m["parentId"] == parent_id][:max_items]


def test_a_card_post_without_an_answer_is_looked_up_in_the_thread(tmp_path: Path) -> None:
    """A card that went through although its answer was lost is still known (and deleted on forget)."""
    room = LostAnswers()
    channel = WebexChannel(settings_for_stub(tmp_path), room)  # type: ignore[arg-type]
    assert channel._send_card(alert(), CASE, {"id": "m-alert", "personId": "bot"}) == "card-0"
    assert room.asked == (10, "m-alert")  # the thread's replies, not the room's latest thousand


def settings_for_stub(tmp_path: Path) -> Settings:
    return Settings(stack_dir=tmp_path, webex={"room_id": ROOM}, alerts=AlertSettings(webex_cards=True))


def test_a_resend_after_an_unknown_outcome_posts_the_card_the_first_try_never_reached(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    webex.state.add_room(ROOM, "direct")  # a room the bot may list (a group space it may not)
    settings = settings_for(webex, tmp_path, webex_cards=False)
    webex_channel(closer, settings).send(alert(), None, maybe_sent=False)  # the message went out, then the try ended
    channel = webex_channel(closer, settings_for(webex, tmp_path, webex_cards=True))
    detail = channel.send(alert(), None, maybe_sent=True)
    posted, card = webex.state.bot_messages(ROOM)
    assert card["parentId"] == posted["id"] and detail == f"{posted['id']} {card['id']}"
    assert channel.send(alert(), None, maybe_sent=True) == detail  # both found: nothing posted again
    assert len(webex.state.bot_messages(ROOM)) == 2


def test_an_alert_too_long_for_webex_keeps_its_marker_so_a_resend_finds_it(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    webex.state.add_room(ROOM, "direct")  # a room the bot may list (a group space it may not)
    channel = webex_channel(closer, settings_for(webex, tmp_path, dashboard_link="http://d/{transaction_id}"))
    huge = {**alert(), "transaction_id": "t" * 8000}  # the link is not cut, so the text is past Webex's limit
    first = channel.send(huge, None, maybe_sent=False)
    assert channel.send(huge, None, maybe_sent=True) == first
    [posted] = webex.state.bot_messages(ROOM)
    assert WebexChannel.carries(posted, "blocked:tx-1")


@pytest.mark.parametrize(
    "link",
    [
        "http://dashboard.chain.example/cases/{case_id}",
        "HTTP://10.1.2.3:8050/cases/{case_id}",
        "ftp://x/cases/{case_id}",
    ],
)
def test_signed_image_links_over_plain_http_to_another_machine_are_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, link: str
) -> None:
    """Webex's servers fetch the card's images at the case link: over plain http the shopper's face, and the link that
    opens it for a day, crossed the network in clear (a webhook public URL over plain http is refused so)."""
    monkeypatch.setenv("CG_ALERTS__IMAGE_LINK_KEY", "k" * 64)
    monkeypatch.setenv("CG_ALERTS__CASE_LINK", link)
    with pytest.raises(ValidationError) as refused:
        Settings()
    line = setting_errors(refused.value)
    assert line.startswith("CG_ALERTS__IMAGE_LINK_KEY: signs the card's image links for Webex") and "k" * 64 not in line
    assert "make CG_ALERTS__CASE_LINK an https:// URL" in line


@pytest.mark.parametrize(
    ("key", "link"),
    [
        ("k" * 64, "https://dashboard.chain.example/cases/{case_id}"),
        ("k" * 64, "http://127.0.0.1:8050/cases/{case_id}"),  # make run: the local Webex on this machine
        ("k" * 64, "http://localhost:8050/cases/{case_id}"),
        ("", "http://dashboard.chain.example/cases/{case_id}"),  # no key: plain links behind the login, as before
    ],
)
def test_signed_links_over_https_or_to_this_machine_and_plain_links_are_taken(
    monkeypatch: pytest.MonkeyPatch, key: str, link: str
) -> None:
    monkeypatch.setenv("CG_ALERTS__IMAGE_LINK_KEY", key)
    monkeypatch.setenv("CG_ALERTS__CASE_LINK", link)
    assert Settings().alerts.case_link == link
