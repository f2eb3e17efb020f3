"""Alert channels against real local servers (Webex API server, aiosmtpd), no Kafka: what is sent,
how failures are classified, how a channel worker retries, honours Retry-After and records the ledger."""

from __future__ import annotations

import email
import email.policy
import io
import queue
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from PIL import Image
from pydantic import SecretStr

from infra.clients.webex import WebexClient, WebexError
from infra.launcher import wait_for
from infra.local.smtp import FileStore, read_mails
from infra.local.webex import LocalWebexServer, free_port
from infra.logs import person_tag
from infra.settings import AlertSettings, Settings, SmtpSettings, WebexSettings
from sinks.alerts.mail import MailError, SesMailer, SmtpMailer, build_email
from sinks.alerts.message import describe
from sinks.alerts.sender import (
    ChannelWorker,
    DeliveryError,
    EmailChannel,
    Ledger,
    LedgerClosed,
    Outcome,
    RateLimit,
    Task,
    WebexChannel,
    channels_from_settings,
    sending_threads,
)
from tests.unit.durability import DiskOrder

TOKEN, ROOM = "unit-token", "room-alerts"


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


def alert(alert_id: str = "blocked:tx-1", snapshot_ref: str | None = "checkout/tx-1.jpg") -> dict[str, Any]:
    return dict(
        alert_id=alert_id,
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=1_767_261_303_000,
        store_id="S001",
        lane_id="L02",
        transaction_id="tx-1",
        amount=99.0,
        currency="EUR",
        outcome="BLOCK",
        risk_score=90,
        reasons=["return_exceeds_sale"],
        subject_id=None,
        category=None,
        similarity=None,
        snapshot_ref=snapshot_ref,
        summary="x",
    )


@pytest.fixture
def webex() -> Iterator[LocalWebexServer]:
    with LocalWebexServer(TOKEN) as server:
        yield server


@pytest.fixture
def closer() -> Iterator[ExitStack]:
    """Closes what a test opened (channels and their connections, ledgers) when it ends, pass or fail."""
    with ExitStack() as stack:
        yield stack


def settings_for(webex: LocalWebexServer, tmp_path: Path, token: str = TOKEN, **alerts: Any) -> Settings:
    return Settings(
        stack_dir=tmp_path,
        webex=WebexSettings(base_url=webex.url, bot_token=SecretStr(token), room_id=ROOM),
        alerts=AlertSettings(concurrency=4, retry_initial_s=0.05, retry_max_s=0.2, **{"webex_cards": False, **alerts}),
    )


def webex_channel(closer: ExitStack, settings: Settings) -> WebexChannel:
    """A Webex channel closed with the test (its client holds one connection per sending thread)."""
    return closer.enter_context(closing(WebexChannel(settings, WebexClient.from_settings(settings.webex))))


def test_webex_message_carries_markdown_and_the_snapshot_as_a_file(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    image = jpeg()
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    message_id = channel.send(alert(), image, maybe_sent=False)
    [posted] = webex.state.bot_messages(ROOM)
    assert posted["id"] == message_id
    assert "Transaction blocked" in posted["markdown"] and "blocked:tx-1" in posted["markdown"]
    assert webex.state.file_bytes(posted["files"][0]) == image


def test_a_png_snapshot_is_posted_to_webex_as_a_png_not_as_snapshot_jpg(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """The snapshot was always uploaded as image/jpeg named snapshot.jpg, so a PNG went out mislabelled."""
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(out, format="PNG")
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    channel.send(alert(), out.getvalue(), maybe_sent=False)
    channel.send(alert("blocked:tx-2"), jpeg(), maybe_sent=False)
    uploaded = [webex.state.files[m["files"][0].rsplit("/", 1)[-1]] for m in webex.state.bot_messages(ROOM)]
    assert [(name, kind) for name, kind, _ in uploaded] == [
        ("snapshot.png", "image/png"),
        ("snapshot.jpg", "image/jpeg"),
    ]


def test_webex_failures_are_classified_for_retry(webex: LocalWebexServer, tmp_path: Path, closer: ExitStack) -> None:
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    webex.state.fail((429,), count=1, retry_after=3)
    with pytest.raises(DeliveryError) as limited:
        channel.send(alert(), None, maybe_sent=False)
    assert limited.value.retriable and limited.value.retry_after == 3.0
    webex.state.fail((500,), count=1)
    with pytest.raises(DeliveryError) as broken:
        channel.send(alert(), None, maybe_sent=False)
    assert broken.value.retriable and broken.value.ambiguous
    bad_token = webex_channel(closer, settings_for(webex, tmp_path, token="wrong"))
    with pytest.raises(DeliveryError) as refused:
        bad_token.send(alert(), None, maybe_sent=False)
    assert not refused.value.retriable
    assert webex.state.bot_messages() == []


def test_webex_resend_after_an_unknown_outcome_finds_the_posted_message(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    webex.state.add_room(ROOM, "direct")  # a 1:1 room: the bot may list it
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    first = channel.send(alert(), None, maybe_sent=False)
    again = channel.send(alert(), None, maybe_sent=True)
    assert again == first
    assert len(webex.state.bot_messages(ROOM)) == 1
    channel.send(alert("blocked:tx-2"), None, maybe_sent=True)  # not there yet: posted
    assert len(webex.state.bot_messages(ROOM)) == 2
    channel.send(alert("blocked:tx"), None, maybe_sent=True)  # a prefix of posted ids is a different alert
    assert len(webex.state.bot_messages(ROOM)) == 3
    assert WebexChannel.carries({"text": "... alert blocked:tx-1"}, "blocked:tx-1")
    assert not WebexChannel.carries({"text": "... alert blocked:tx-10"}, "blocked:tx-1")


def test_a_resend_does_not_take_a_persons_message_naming_the_alert_for_the_alert(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """After an unknown outcome the room is searched for the alert: a guard who wrote its id there has not posted
    it, so the alert still goes out (taking the guard's message for it lost the alert)."""
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    webex.say(ROOM, "guard@shop.test", "anyone seen blocked:tx-1 yet? the mail came, Webex did not", "direct")
    detail = channel.send(alert(), None, maybe_sent=True)
    [posted] = webex.state.bot_messages(ROOM)
    assert detail == posted["id"] and "Transaction blocked" in posted["markdown"]
    assert webex.state.requests.get("403") is None  # the room was searched


def test_a_resend_in_a_group_space_finds_the_alert_among_the_messages_mentioning_the_bot(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Webex lists a group space for a bot only as the messages that mention it (403 otherwise): every alert message
    mentions the bot, so a resend after an unknown outcome finds the first post there instead of posting the
    shopper's face a second time; the plain listing is refused once and not asked again."""
    channel = webex_channel(closer, settings_for(webex, tmp_path))  # ROOM: a group space, as a team's room is
    first = channel.send(alert(), None, maybe_sent=False)
    assert channel.send(alert(), None, maybe_sent=True) == first
    channel.send(alert("blocked:tx-2"), None, maybe_sent=True)  # not there yet: posted
    assert len(webex.state.bot_messages(ROOM)) == 2
    assert webex.state.requests["403"] == 1  # learnt once: the second resend did not ask


class AnswerLost(httpx.BaseTransport):
    """Webex that posts a message and then answers 502 (a gateway timing out after the write), ``count`` times."""

    def __init__(self, count: int = 1) -> None:
        self.inner, self.count = httpx.HTTPTransport(), count

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/messages") and self.count > 0:
            self.count -= 1
            response.read()
            response.close()
            return httpx.Response(502, json={"message": "Bad Gateway"})
        return response

    def close(self) -> None:
        self.inner.close()


def test_an_alert_posted_in_a_group_space_whose_answer_was_lost_is_not_posted_again_and_its_id_is_kept(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A 5xx after Webex had posted the alert: re-posting left the first copy, with the shopper's face, in the room
    with no id in the ledger, so neither a forget nor the keep period ever deleted it."""
    settings = settings_for(webex, tmp_path, webex_cards=True)
    client = WebexClient(webex.url, TOKEN, transport=AnswerLost())
    channel = closer.enter_context(closing(WebexChannel(settings, client, has_reference=lambda _: False)))
    [outcome], ledger, _ = run_worker(
        closer, channel, settings, [Task(alert(), "webex", time.monotonic() + 30, alert_ms=1)], images={}
    )
    assert outcome.delivered, outcome.reason
    [posted] = [m for m in webex.state.bot_messages(ROOM) if not m.get("parentId")]
    [card] = [m for m in webex.state.bot_messages(ROOM) if m.get("parentId")]
    assert card["parentId"] == posted["id"]
    due = ledger.due_posts(now_ms=10**15, keep_ms=0)
    assert set(due) == {posted["id"], card["id"]}  # both deleted after the keep period (and on forget)


def test_the_local_webex_lists_a_group_space_for_the_bot_only_with_mentioned_people_me(
    webex: LocalWebexServer,
) -> None:
    """As Webex answers a bot (the stand-in's only caller): a direct room is listed whole; a group space, or a
    thread in it, is refused (403) unless ``mentionedPeople=me``, which gives the messages mentioning the bot."""
    webex.state.add_room("room-direct", "direct")
    webex.say("room-direct", "guard@shop.test", "status")
    webex.say("room-team", "guard@shop.test", "Checkout Guard status")  # mentions the bot
    webex.say("room-team", "guard@shop.test", "lunch?")
    with httpx.Client(base_url=webex.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        assert [m["text"] for m in http.get("/messages", params={"roomId": "room-direct"}).json()["items"]] == [
            "status"
        ]
        assert http.get("/messages", params={"roomId": "room-team"}).status_code == 403
        assert http.get("/messages", params={"roomId": "room-team", "parentId": "m"}).status_code == 403
        mentions = http.get("/messages", params={"roomId": "room-team", "mentionedPeople": "me"}).json()["items"]
    assert [m["text"] for m in mentions] == ["Checkout Guard status"]
    with pytest.raises(ValueError):
        webex.state.add_room("room-team", "direct")  # a room keeps its type


def run_worker(
    closer: ExitStack,
    channel: Any,
    settings: Settings,
    tasks: list[Task],
    timeout: float = 15.0,
    images: dict[str, bytes] | None = None,
) -> tuple[list[Outcome], Ledger, ChannelWorker]:
    """The outcomes of ``tasks`` through a worker, which is stopped before this returns; the ledger
    stays open for the test to read and is closed with it (before the channel: last in, first out)."""
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    ledger = closer.enter_context(closing(Ledger(settings.stack_dir / "ledger.sqlite3")))
    worker = ChannelWorker(channel, ledger, settings.alerts, done, lambda ref: (images or {})[ref])
    try:
        for task in tasks:
            worker.submit(task)
        outcomes = [done.get(timeout=timeout) for _ in tasks]
    finally:
        worker.stop()
    return outcomes, ledger, worker


def test_worker_waits_out_5xx_without_spending_attempts_and_delivers_exactly_once(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, max_attempts=2)  # more 5xx than attempts: they must not count
    webex.state.fail((500, 503), count=3)
    [outcome], ledger, worker = run_worker(
        closer, webex_channel(closer, settings), settings, [Task(alert(), "webex", time.monotonic() + 30)]
    )
    assert outcome.delivered
    assert len(webex.state.bot_messages(ROOM)) == 1
    assert ledger.state("blocked:tx-1", "webex") == "sent"
    assert worker.unavailable == 3 and worker.failed_tries == 0


def test_an_alert_whose_post_had_no_answer_in_a_group_space_is_delivered_not_dead_lettered(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A 5xx (or a timeout) leaves the post's outcome unknown; the resend's room search is refused (403) in a group
    space. That 4xx made the alert a dead letter: after any Webex hiccup the alert never reached the room."""
    settings = settings_for(webex, tmp_path)
    webex.state.fail((500,), count=1)
    [outcome], ledger, _ = run_worker(
        closer, webex_channel(closer, settings), settings, [Task(alert(), "webex", time.monotonic() + 30)]
    )
    assert outcome.delivered, outcome.reason
    assert len(webex.state.bot_messages(ROOM)) == 1 and ledger.state("blocked:tx-1", "webex") == "sent"


class CardRateLimited(httpx.BaseTransport):
    """Webex that takes alert messages but answers every card post 429 with a long ``Retry-After``."""

    def __init__(self) -> None:
        self.inner, self.refused = httpx.HTTPTransport(), threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and b'"attachments"' in request.content:
            self.refused.set()
            return httpx.Response(429, headers={"Retry-After": "30"}, json={"message": "Too Many Requests"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_redirect_from_a_proxy_pauses_the_channel_and_keeps_deletes_instead_of_refusing_them_for_good(
    tmp_path: Path, closer: ExitStack
) -> None:
    """Webex's API never redirects; a 3xx is a proxy or gateway in the way. It counted as a refusal for good: every
    alert was a dead letter at once, and the eraser gave up deleting messages (a shopper's face stayed in the
    room). Now it is the channel down: the alert waits (nothing was posted, so nothing to look for) and the
    delete is tried again."""
    proxy = httpx.MockTransport(lambda _: httpx.Response(302, headers={"Location": "https://login.proxy.test/?u=1"}))
    settings = Settings(stack_dir=tmp_path, webex=WebexSettings(bot_token=SecretStr(TOKEN), room_id=ROOM))
    client = WebexClient("https://webexapis.com/v1", TOKEN, transport=proxy)
    channel = closer.enter_context(closing(WebexChannel(settings, client, has_reference=lambda _: False)))
    channel._bot_id = "bot"  # GET /people/me is redirected too; the post is what is under test
    with pytest.raises(DeliveryError) as post:
        channel.send(alert(), None, maybe_sent=False)
    assert post.value.retriable and post.value.down and not post.value.ambiguous
    assert "redirect to https://login.proxy.test" in post.value.reason and "u=1" not in post.value.reason
    with pytest.raises(DeliveryError) as delete:
        channel.delete("m-1")
    assert delete.value.retriable and delete.value.down


def test_a_send_waiting_out_a_card_rate_limit_at_shutdown_is_recorded_before_the_ledger_closes(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Shutdown joined each sending thread 5 s: a card waiting out a 429 finished after the ledger had closed, so
    the delivered alert was not recorded (and was posted again on restart). Now the wait is cut short, the card
    given up and the delivery recorded before the worker stops."""
    settings = settings_for(webex, tmp_path, webex_cards=True)
    transport = CardRateLimited()
    channel = closer.enter_context(
        closing(
            WebexChannel(settings, WebexClient(webex.url, TOKEN, transport=transport), has_reference=lambda _: False)
        )
    )
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    ledger = closer.enter_context(closing(Ledger(tmp_path / "ledger.sqlite3")))
    worker = ChannelWorker(channel, ledger, settings.alerts, done, lambda ref: b"")
    worker.submit(Task(alert(snapshot_ref=None), "webex", time.monotonic() + 60, alert_ms=1))
    assert transport.refused.wait(10)
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 5
    assert ledger.state("blocked:tx-1", "webex") == "sent"
    [posted] = webex.state.bot_messages(ROOM)
    assert set(ledger.due_posts(now_ms=10**15, keep_ms=0)) == {posted["id"]}
    assert done.get_nowait().delivered


def test_a_write_to_a_closed_ledger_raises_instead_of_waiting_forever(tmp_path: Path) -> None:
    """The ledger's writer ends at ``close``: a write after it was queued for nobody and its thread waited forever
    (a send that ended after shutdown's wait hung there). What was handed over before ``close`` is committed."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.mark_sent("blocked:tx-1", "email", "mail-1")
    ledger.close()
    ledger.close()  # again: nothing to do
    raised: list[BaseException] = []

    def late_write() -> None:
        try:
            ledger.mark_sent("blocked:tx-2", "email", "mail-2")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            raised.append(exc)

    writer = threading.Thread(target=late_write, daemon=True)
    writer.start()
    writer.join(5)
    assert not writer.is_alive(), "the write after close is still waiting"
    [error] = raised
    assert isinstance(error, LedgerClosed) and "is closed" in str(error)
    with closing(Ledger(tmp_path / "ledger.sqlite3")) as reopened:
        assert reopened.state("blocked:tx-1", "email") == "sent"
        assert reopened.state("blocked:tx-2", "email") is None


class SlowChannel:
    """A channel whose send returns only when the test lets it (a send still under way at shutdown)."""

    name, can_check_sent, erasable = "email", False, False

    def __init__(self) -> None:
        self.sending, self.release = threading.Event(), threading.Event()

    def send(self, alert: dict[str, Any], image: bytes | None, maybe_sent: bool) -> str | None:
        self.sending.set()
        self.release.wait(10)
        return "mail-1"

    def delete(self, message_id: str) -> bool:
        return False

    def close(self) -> None:
        return None


def test_a_send_that_ends_after_the_ledger_closed_ends_its_thread_with_an_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past shutdown's wait the ledger closes with the send under way; its thread then waited forever on the
    ledger's write. Now the thread ends and an ERROR line says the alert may be sent again on restart."""
    channel = SlowChannel()
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    worker = ChannelWorker(channel, ledger, AlertSettings(stop_wait_s=0.2), queue.SimpleQueue(), lambda ref: b"")
    worker.submit(Task(alert(snapshot_ref=None), "email", time.monotonic() + 60))
    assert channel.sending.wait(10)
    worker.stop()
    ledger.close()
    channel.release.set()
    for thread in worker._threads:
        thread.join(5)
    assert not any(t.is_alive() for t in worker._threads), "a sending thread hangs on the closed ledger"
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("blocked:tx-1" in line and "is closed" in line and "sent again on restart" in line for line in lines)


def test_worker_pauses_the_channel_for_retry_after(webex: LocalWebexServer, tmp_path: Path, closer: ExitStack) -> None:
    settings = settings_for(webex, tmp_path)
    webex.state.fail((429,), count=1, retry_after=1)
    t0 = time.monotonic()
    [outcome], _, worker = run_worker(
        closer, webex_channel(closer, settings), settings, [Task(alert(), "webex", t0 + 30)]
    )
    assert outcome.delivered
    assert time.monotonic() - t0 >= 1.0
    assert worker.rate_limited == 1 and worker.failed_tries == 0


def test_worker_gives_up_with_a_reason_after_max_attempts(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path, max_attempts=3)
    webex.state.fail((409,))  # retriable, but about this request: the channel is up, attempts count
    [outcome], ledger, _ = run_worker(
        closer, webex_channel(closer, settings), settings, [Task(alert(), "webex", time.monotonic() + 30)]
    )
    assert not outcome.delivered
    assert "failed 3 times" in outcome.reason and "409" in outcome.reason
    assert ledger.state("blocked:tx-1", "webex") == "sending"  # tried, never confirmed


class BusyMessage(httpx.BaseTransport):
    """The local Webex, except that the first ``count`` posts of ``alert_id`` (None: for ever) are answered ``status``
    with ``Retry-After: retry_after``: Webex saying this message or its room is busy (409 Conflict, 423 Locked)."""

    def __init__(self, alert_id: str, status: int = 409, retry_after: int = 3, count: int | None = 1) -> None:
        self.inner, self.marker, self.status = httpx.HTTPTransport(), f"`{alert_id}`".encode(), status
        self.retry_after, self.count, self.refused = retry_after, count, threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        busy = self.count is None or self.count > 0
        if request.method == "POST" and self.marker in request.content and busy:
            if self.count is not None:
                self.count -= 1
            self.refused.set()
            return httpx.Response(self.status, headers={"Retry-After": str(self.retry_after)}, json={"message": "busy"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def busy_room_worker(
    closer: ExitStack, webex: LocalWebexServer, settings: Settings, transport: BusyMessage
) -> tuple[ChannelWorker, queue.SimpleQueue[Outcome]]:
    client = WebexClient(webex.url, TOKEN, transport=transport)
    channel = closer.enter_context(closing(WebexChannel(settings, client, has_reference=lambda _: False)))
    done: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    ledger = closer.enter_context(closing(Ledger(settings.stack_dir / "ledger.sqlite3")))
    worker = ChannelWorker(channel, ledger, settings.alerts, done, lambda ref: b"")
    closer.callback(worker.stop)
    return worker, done


@pytest.mark.parametrize("status", [409, 423])
def test_a_webex_409_or_423_with_retry_after_delays_that_alert_alone_and_spends_an_attempt(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack, status: int
) -> None:
    """Only a 429 is Webex's rate limit, the bot's in every room; a 409 or 423 is about that one message or room. Its
    Retry-After paused the room's whole channel, every other alert to the room waiting it out, and spent no attempt."""
    settings = settings_for(webex, tmp_path)
    busy = BusyMessage("blocked:tx-1", status=status, retry_after=3)
    worker, done = busy_room_worker(closer, webex, settings, busy)
    t0 = time.monotonic()
    worker.submit(Task(alert("blocked:tx-1", None), "webex", t0 + 30))
    assert busy.refused.wait(10)
    worker.submit(Task(alert("blocked:tx-2", None), "webex", t0 + 30))
    first = done.get(timeout=10)
    assert first.key == ("blocked:tx-2", "webex") and first.delivered
    assert time.monotonic() - t0 < 2.0, "the other alert waited out the busy message's Retry-After"
    second = done.get(timeout=10)
    assert second.key == ("blocked:tx-1", "webex") and second.delivered
    assert time.monotonic() - t0 >= 3.0  # its own Retry-After honoured
    assert worker.rate_limited == 0 and worker.failed_tries == 1
    assert posted_alerts(webex, ROOM) == ["blocked:tx-2", "blocked:tx-1"]  # each once


def test_a_webex_message_answered_409_with_retry_after_on_every_try_is_dead_lettered_after_max_attempts(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Such answers spent no attempt: the alert was tried again until its deadline (10 minutes by default)."""
    settings = settings_for(webex, tmp_path, max_attempts=2)
    worker, done = busy_room_worker(closer, webex, settings, BusyMessage("blocked:tx-1", retry_after=1, count=None))
    worker.submit(Task(alert("blocked:tx-1", None), "webex", time.monotonic() + 30))
    outcome = done.get(timeout=10)
    assert not outcome.delivered
    assert "failed 2 times" in outcome.reason and "409" in outcome.reason


def test_worker_attaches_no_image_when_the_snapshot_is_missing(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    settings = settings_for(webex, tmp_path)
    tasks = [
        Task(alert("a-1", snapshot_ref=None), "webex", time.monotonic() + 30),
        Task(alert("a-2", snapshot_ref="gone"), "webex", time.monotonic() + 30),
        Task(alert("a-3", snapshot_ref="there"), "webex", time.monotonic() + 30),
    ]
    outcomes, _, _ = run_worker(closer, webex_channel(closer, settings), settings, tasks, images={"there": jpeg()})
    assert all(o.delivered for o in outcomes)
    files = {m["markdown"].rsplit("`", 2)[-2]: m.get("files") for m in webex.state.bot_messages(ROOM)}
    assert files["a-1"] is None and files["a-2"] is None and files["a-3"]


# --------------------------------------------------------------------------- e-mail


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    mail = tmp_path / "mail"
    port = free_port()
    controller = Controller(FileStore(mail), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, mail
    controller.stop()


def test_email_goes_through_a_real_smtp_server_with_the_snapshot(smtp_server: tuple[int, Path], tmp_path: Path) -> None:
    port, mail = smtp_server
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port, to_addresses="a@x.test, b@x.test"))
    image = jpeg()
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel:
        channel.send(alert(), image, maybe_sent=False)
        channel.send(alert("blocked:tx-2"), None, maybe_sent=False)  # reuses the connection
    first, second = read_mails(mail)
    assert first["Subject"] == "[Checkout Guard] Transaction blocked - store S001, lane L02"
    assert first.get_all("Delivered-To") == ["a@x.test", "b@x.test"]
    assert [p.get_content() for p in first.walk() if p.get_content_maintype() == "image"] == [image]
    assert second["X-Checkout-Guard-Alert"] == "blocked:tx-2"


def test_a_mail_the_local_server_acknowledged_survives_a_power_cut(
    smtp_server: tuple[int, Path], tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The server answered 250 once the mail was renamed into place but its folder not synced: a power cut then could
    lose the rename, and the mail with it, though the sender had counted it delivered and would not send it again."""
    port, mail = smtp_server
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port, to_addresses="a@x.test"))
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel:
        channel.send(alert(), None, maybe_sent=False)
    (path,) = mail.glob("*.eml")
    assert disk_order.replaced_durably(path), disk_order.calls
    assert [p.name for p in mail.iterdir()] == [path.name]  # no temporary file left


def test_a_mail_to_many_recipients_reaches_them_all_with_no_line_past_smtps_limit(
    smtp_server: tuple[int, Path], tmp_path: Path
) -> None:
    """30 recipients made one ``To:`` line of over 1,100 characters: a relay keeping SMTP's 998-character limit (the
    local aiosmtpd among them) refused every alert mail with 500, so every alert was an e-mail dead letter. The
    header is folded after each address now."""
    port, mail = smtp_server
    recipients = [f"store-security-{i:03d}@example-chain.test" for i in range(30)]
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port, to_addresses=", ".join(recipients)))
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel:
        channel.send(alert(), None, maybe_sent=False)
    (received,) = read_mails(mail)
    assert [a.addr_spec for a in received["To"].addresses] == recipients
    assert received.get_all("Delivered-To") == recipients
    head = build_email("a-1", describe(alert(), AlertSettings()), "s@x.test", recipients).data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998


def test_a_recipient_whose_name_holds_a_comma_gets_the_mail_and_an_entry_that_is_no_address_stops_the_start(
    smtp_server: tuple[int, Path], tmp_path: Path
) -> None:
    """``"Doe, Jane" <jane@example.com>`` was split at its comma into two broken recipients: the relay refused them
    and Jane never got an alert. Entries are parsed as addresses now, and one that is none is a settings error."""
    port, mail = smtp_server
    to = '"Doe, Jane" <jane@example.com>, Security Team <team@example.com>,, bob@example.com'
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port, to_addresses=to))
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel:
        channel.send(alert(), None, maybe_sent=False)
    (received,) = read_mails(mail)
    assert [(a.display_name, a.addr_spec) for a in received["To"].addresses] == [
        ("Doe, Jane", "jane@example.com"),
        ("Security Team", "team@example.com"),
        ("", "bob@example.com"),
    ]
    assert received.get_all("Delivered-To") == ["jane@example.com", "team@example.com", "bob@example.com"]
    for bad in ("Jane <jane@example.com", "jane doe", "a@x.test b@x.test", '"Doe, Jane <jane@example.com>'):
        with pytest.raises(ValueError, match="address"):
            SmtpSettings(to_addresses=bad)


def test_an_email_channel_with_no_recipient_is_refused_at_start_not_counted_as_delivered(
    smtp_server: tuple[int, Path], tmp_path: Path
) -> None:
    """``CG_SMTP__TO_ADDRESSES`` empty (a variable left unset in the deployment) sent every alert mail to nobody and
    recorded it as delivered: no mail, no dead letter, a healthy sender. Like the Webex channel without a room, the
    sender does not start now."""
    port, mail = smtp_server
    for empty in ("", " , "):
        settings = Settings(
            stack_dir=tmp_path, alerts=AlertSettings(channels="email"), smtp=SmtpSettings(port=port, to_addresses=empty)
        )
        with pytest.raises(ValueError, match="CG_SMTP__TO_ADDRESSES"):
            EmailChannel(settings, SmtpMailer(settings.smtp))
        with pytest.raises(ValueError, match="CG_SMTP__TO_ADDRESSES"):
            channels_from_settings(settings)
    assert read_mails(mail) == []


def test_smtp_refusal_is_permanent_and_a_dead_server_is_retriable(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=free_port()))
    with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel, pytest.raises(DeliveryError) as down:
        channel.send(alert(), None, maybe_sent=False)
    assert down.value.retriable


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_smtp_starttls_and_login_as_a_company_relay_wants(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    def authenticator(_server: Any, _session: Any, _envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"relay" and auth_data.password == b"s3cret"
        return AuthResult(success=ok, handled=False)  # not handled: the server answers 535 itself

    port, mail = free_port(), tmp_path / "mail"
    controller = Controller(
        FileStore(mail),
        hostname="127.0.0.1",
        port=port,
        tls_context=tls,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_exclude_mechanism=["LOGIN"],
    )
    controller.start()
    try:
        with ExitStack() as channels:  # each channel keeps its connection until closed

            def channel(smtp: SmtpSettings) -> EmailChannel:
                return channels.enter_context(
                    closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp)))
                )

            good = SmtpSettings(port=port, starttls=True, ca_file=cert, username="relay", password=SecretStr("s3cret"))
            channel(good).send(alert(), None, False)
            wrong = good.model_copy(update={"password": SecretStr("nope")})
            with pytest.raises(DeliveryError) as refused:
                channel(wrong).send(alert("a-2"), None, False)
            assert not refused.value.retriable  # 535: more tries will not help
            plain = good.model_copy(update={"starttls": False})
            with pytest.raises(DeliveryError):
                channel(plain).send(alert("a-3"), None, False)
    finally:
        controller.stop()
    assert [m["X-Checkout-Guard-Alert"] for m in read_mails(mail)] == ["blocked:tx-1"]


def test_email_through_amazon_ses_with_moto_in_server_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        smtp = SmtpSettings(from_address="cg@store.test", to_addresses="sec@x.test")
        settings = Settings(
            stack_dir=tmp_path,
            smtp=smtp,
            alerts=AlertSettings(
                channels="email", email_transport="ses", ses_region="eu-west-1", ses_endpoint_url=endpoint
            ),
        )
        [built] = channels_from_settings(settings)
        with closing(built) as channel:  # the SES client's connection pool
            with pytest.raises(DeliveryError) as unverified:
                channel.send(alert(), None, maybe_sent=False)
            assert not unverified.value.retriable  # MessageRejected: sender identity not verified
            assert isinstance(channel, EmailChannel) and isinstance(channel.mailer, SesMailer)
            channel.mailer.client.verify_email_identity(EmailAddress="cg@store.test")
            image = jpeg()
            channel.send(alert(), image, maybe_sent=False)
        [sent] = httpx.get(f"{endpoint}/moto-api/data.json").json()["ses"]["RawMessage"]
    finally:
        server.stop()
    assert set(sent["destinations"]) == {"sec@x.test"} and sent["source"] == "cg@store.test"  # moto adds To: again
    mail = email.message_from_string(sent["raw_data"], policy=email.policy.default)
    assert mail["X-Checkout-Guard-Alert"] == "blocked:tx-1"
    assert [p.get_content() for p in mail.walk() if p.get_content_maintype() == "image"] == [image]


class BusyRelay:
    """An aiosmtpd handler that refuses ``busy@`` recipients with 450 while ``busy`` is set, accepts the others, and
    keeps the recipients of each mail it accepted."""

    def __init__(self) -> None:
        self.busy = True
        self.gone = True
        self.delivered: list[list[str]] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:  # noqa: N802
        if address.startswith("busy@") and self.busy:
            return "450 4.2.1 mailbox busy, try again later"
        if address.startswith("gone@") and self.gone:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.delivered.append(list(envelope.rcpt_tos))
        return "250 OK"


class QuotingRelay:
    """A relay that refuses every mail for good, its answer quoting a recipient's address, as Postfix's do."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return f"554 5.7.1 <{envelope.rcpt_tos[0]}>: Recipient address rejected: Access denied"


def test_an_smtp_answer_quoting_an_address_names_the_person_by_tag_in_the_reason(tmp_path: Path) -> None:
    """The dead letter's reason (and the sender's log line) quoted the relay's answer whole, address and all."""
    port = free_port()
    controller = Controller(QuotingRelay(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        smtp = SmtpSettings(port=port, to_addresses="Jane.Doe@store.test")
        channel = EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))
        with closing(channel), pytest.raises(DeliveryError) as refused:
            channel.send(alert(), None, maybe_sent=False)
    finally:
        controller.stop()
    reason = refused.value.reason
    assert not refused.value.retriable and "store.test" not in reason.lower()
    assert f"SMTP 554 5.7.1 <{person_tag('jane.doe@store.test')}>: Recipient address rejected" in reason


def test_a_mail_some_recipients_refused_is_a_failed_try_and_the_next_goes_to_them_only(tmp_path: Path) -> None:
    """One recipient's 450 while another accepted: the send fails (retriable), so that recipient is not left out
    for good (it counted as delivered), and the retry does not give the others a second copy."""
    port, relay = free_port(), BusyRelay()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        smtp = SmtpSettings(port=port, to_addresses="ok@x.test, busy@x.test")
        with closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))) as channel:
            with pytest.raises(DeliveryError) as refused:
                channel.send(alert(), None, maybe_sent=False)
            assert refused.value.retriable and "1 of 2 recipients ([450])" in refused.value.reason
            relay.busy = False
            channel.send(alert(), None, maybe_sent=False)
            channel.send(alert(), None, maybe_sent=False)  # every recipient has it now: nothing is sent
    finally:
        controller.stop()
    assert relay.delivered == [["ok@x.test"], ["busy@x.test"]]


def test_a_mail_refused_for_now_by_one_recipient_and_for_good_by_another_reaches_the_first_then_dead_letters(
    tmp_path: Path,
) -> None:
    """One recipient's 450 beside another's 550 was a dead letter at once: the busy recipient never got the alert.
    Now the busy one is tried again (and only it), the 550 one never again, and once only the 550 is left the
    mail fails for good with its code."""
    port, relay = free_port(), BusyRelay()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        smtp = SmtpSettings(port=port, to_addresses="ok@x.test, busy@x.test, gone@x.test")
        with closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))) as channel:
            with pytest.raises(DeliveryError) as first:
                channel.send(alert(), None, maybe_sent=False)
            assert first.value.retriable and "2 of 3 recipients ([450, 550])" in first.value.reason
            relay.busy = False
            with pytest.raises(DeliveryError) as last:  # the busy one gets it; the one refused for good is not asked
                channel.send(alert(), None, maybe_sent=False)
            assert not last.value.retriable and "1 of 3 recipients for good ([550])" in last.value.reason
            with pytest.raises(DeliveryError) as again:  # a re-drive of the dead letter asks only the refusing one
                channel.send(alert(), None, maybe_sent=False)
            assert not again.value.retriable and "[550]" in again.value.reason
    finally:
        controller.stop()
    assert relay.delivered == [["ok@x.test"], ["busy@x.test"]]


def test_a_recipient_still_refusing_for_now_after_others_took_the_mail_does_not_pause_the_channel(
    tmp_path: Path,
) -> None:
    """The retry of a mail others accepted (or refused for good) goes to the busy recipient alone; its 450 again is
    that mailbox (full, busy, greylisting), not a relay outage. It was ``down``: the channel paused and probed, every
    other alert held up, and this one never spending an attempt until its deadline. A mail refused 4xx by every
    recipient on every try is still an outage."""
    port, relay = free_port(), BusyRelay()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for recipients in ("ok@x.test, busy@x.test", "busy@x.test, gone@x.test"):
            smtp = SmtpSettings(port=port, to_addresses=recipients)
            with closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))) as channel:
                for _ in range(2):
                    with pytest.raises(DeliveryError) as refused:
                        channel.send(alert(), None, maybe_sent=False)
                    assert refused.value.retriable and not refused.value.down, (recipients, refused.value.reason)
        smtp = SmtpSettings(port=port, to_addresses="busy@x.test, busy@y.test")
        with closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))) as channel:
            for _ in range(2):
                with pytest.raises(DeliveryError) as refused:
                    channel.send(alert(), None, maybe_sent=False)
                assert refused.value.retriable and refused.value.down, refused.value.reason
    finally:
        controller.stop()
    assert relay.delivered == [["ok@x.test"]]


def test_a_re_driven_mail_goes_to_the_recipient_refused_for_good_once_its_mailbox_exists_and_not_to_the_others(
    tmp_path: Path,
) -> None:
    """A 550 makes the alert a dead letter; ``make redrive`` once the mailbox exists sends it back through the same
    sender. The refusal was remembered like a delivery: the re-drive failed at once with the old code and the
    recipient never got the alert. Given up, it is forgotten (who took the mail is not: they get no second copy)."""
    port, relay = free_port(), BusyRelay()
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        for recipients in ("ok@x.test, gone@x.test", "gone@x.test"):  # some took it, or none did
            relay.gone, relay.delivered = True, []
            smtp = SmtpSettings(port=port, to_addresses=recipients)
            with closing(EmailChannel(Settings(stack_dir=tmp_path, smtp=smtp), SmtpMailer(smtp))) as channel:
                with pytest.raises(DeliveryError) as refused:
                    channel.send(alert(), None, maybe_sent=False)
                assert not refused.value.retriable and "550" in refused.value.reason
                relay.gone = False  # the mailbox is made; the dead letter is re-driven
                channel.send(alert(), None, maybe_sent=False)
            assert relay.delivered == [["ok@x.test"], ["gone@x.test"]][-len(recipients.split(",")) :], recipients
    finally:
        controller.stop()


def test_recipient_and_sender_names_that_are_not_ascii_are_encoded_in_the_headers() -> None:
    """``To: Équipe Sûreté <team@x>`` went out as raw UTF-8 (From was encoded): not a header a relay without
    SMTPUTF8, or Amazon SES, takes; both are RFC 2047 words now and read back as the names."""
    recipients = ["Équipe Sûreté <team@x.test>", "guard@x.test"]
    mail = build_email("a-1", describe(alert(), AlertSettings()), "Sécurité <s@x.test>", recipients)
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [
        ("Équipe Sûreté", "team@x.test"),
        ("", "guard@x.test"),
    ]
    assert parsed["From"].addresses[0].display_name == "Sécurité"


class SesLimits:
    """A boto3 SES client as Amazon SES answers: more than 50 destinations refused, a raw mail over 10485760 bytes
    refused; ``throttle`` calls throttled. ``asked``: the raw mail of every call, refused ones too."""

    def __init__(self, throttle: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.asked: list[bytes] = []
        self.throttle = throttle

    def send_raw_email(self, *, Source: str, Destinations: list[str], RawMessage: dict[str, bytes]) -> dict:  # noqa: N803
        from botocore.exceptions import ClientError

        self.asked.append(RawMessage["Data"])
        if len(RawMessage["Data"]) > 10485760:
            too_long = "Message length is more than 10485760 bytes long."
            error = {"Error": {"Code": "MessageRejected", "Message": too_long}}
            raise ClientError({**error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "SendRawEmail")
        if len(Destinations) > 50:
            error = {"Error": {"Code": "InvalidParameterValue", "Message": "Recipient count exceeds 50."}}
            raise ClientError({**error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "SendRawEmail")
        if self.calls and self.throttle > 0:  # a later call of the mail's: throttled after the first went out
            self.throttle -= 1
            error = {"Error": {"Code": "Throttling", "Message": "Maximum sending rate exceeded."}}
            raise ClientError({**error, "ResponseMetadata": {"HTTPStatusCode": 400}}, "SendRawEmail")
        self.calls.append(list(Destinations))
        return {"MessageId": f"ses-{len(self.calls)}"}


class SlowOrFailingSes:
    """SES's query API over HTTP (``POST /``, ``Action=SendRawEmail``), answering each request after ``delay_s`` with
    ``status`` (200: the message id; else SES's error XML): counts the requests, which botocore's retries hide."""

    OK = (
        b'<SendRawEmailResponse xmlns="http://ses.amazonaws.com/doc/2010-12-01/"><SendRawEmailResult>'
        b"<MessageId>ses-1</MessageId></SendRawEmailResult><ResponseMetadata><RequestId>r-1</RequestId>"
        b"</ResponseMetadata></SendRawEmailResponse>"
    )
    FAILED = (
        b"<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code><Message>Service unavailable"
        b"</Message></Error><RequestId>r-1</RequestId></ErrorResponse>"
    )

    def __init__(self, status: int = 200, delay_s: float = 0.0) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        ses = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ses.requests += 1
                time.sleep(delay_s)
                body = ses.OK if status == 200 else ses.FAILED
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def ses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """AWS credentials, and none of this machine's AWS settings (a retry mode or count of its own)."""
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.mark.usefixtures("ses_env")
def test_an_ses_call_without_an_answer_in_time_is_given_up_after_the_mail_timeout_and_not_sent_again() -> None:
    """botocore's defaults waited 60 s for SES's answer (CG_SMTP__TIMEOUT_S applied to SMTP only), and sent a call whose
    answer timed out again on its own: SES gives every copy its own Message-ID, so the alert came several times."""
    ses = SlowOrFailingSes(delay_s=3.0)
    smtp = SmtpSettings(from_address="cg@store.test", to_addresses="sec@x.test", timeout_s=0.5)
    mailer = SesMailer(smtp, "eu-west-1", ses.url)
    try:
        mail = build_email("blocked:tx-1", describe(alert(), AlertSettings()), smtp.from_address, smtp.recipients())
        t0 = time.monotonic()
        with pytest.raises(MailError) as timed_out:
            mailer.send(mail)
        assert time.monotonic() - t0 < 2.0, "waited past CG_SMTP__TIMEOUT_S"
        assert timed_out.value.down and timed_out.value.retriable  # the channel pauses and tries again itself
        time.sleep(1.0)
        assert ses.requests == 1
    finally:
        mailer.close()
        ses.close()


@pytest.mark.usefixtures("ses_env")
def test_an_ses_5xx_is_the_channels_to_retry_not_sent_again_by_botocore() -> None:
    ses = SlowOrFailingSes(status=503)
    smtp = SmtpSettings(from_address="cg@store.test", to_addresses="sec@x.test")
    mailer = SesMailer(smtp, "eu-west-1", ses.url)
    try:
        mail = build_email("blocked:tx-1", describe(alert(), AlertSettings()), smtp.from_address, smtp.recipients())
        with pytest.raises(MailError) as unavailable:
            mailer.send(mail)
        assert unavailable.value.down and unavailable.value.retriable
        assert ses.requests == 1
    finally:
        mailer.close()
        ses.close()


def test_an_ses_mail_to_more_than_50_recipients_goes_out_in_calls_of_50_each_recipient_once(tmp_path: Path) -> None:
    """SES refuses a call with more than 50 recipients: every alert to 51 became a dead letter."""
    recipients = [f"guard{i}@store.test" for i in range(120)]
    smtp = SmtpSettings(from_address="cg@store.test", to_addresses=",".join(recipients))
    settings = Settings(stack_dir=tmp_path, smtp=smtp, alerts=AlertSettings(channels="email", email_transport="ses"))
    client = SesLimits(throttle=1)
    channel = EmailChannel(settings, SesMailer(smtp, client=client))
    with pytest.raises(DeliveryError) as throttled:  # the second call of three is throttled: a failed try
        channel.send(alert(), None, maybe_sent=False)
    assert throttled.value.retriable
    channel.send(alert(), None, maybe_sent=False)  # the retry goes to those who have not had it
    assert [len(c) for c in client.calls] == [50, 50, 20]
    assert sorted(r for c in client.calls for r in c) == sorted(recipients)


def test_a_webex_rate_limit_pauses_the_channel_as_long_as_retry_after_asks() -> None:
    """The channel's pause stopped at 60 s whatever Retry-After asked (up to 300 s): its next try then met another
    429, and so on, each spending the bot's rate again."""
    asked = WebexError("rate limited", status=429, retriable=True, retry_after=60.0, asked_wait=120.0)
    assert WebexChannel._delivery_error(asked).retry_after == 120.0


NYC_ROOM, LA_ROOM = "room-nyc", "room-la"


def scoped_settings(webex: LocalWebexServer, tmp_path: Path, **room_stores: list[str]) -> Settings:
    """``CG_WEBEX__ROOM_ID`` = ROOM and the bot's per-room stores (``CG_WEBEX__ROOM_STORES``)."""
    return Settings(
        stack_dir=tmp_path,
        webex=WebexSettings(
            base_url=webex.url, bot_token=SecretStr(TOKEN), room_id=ROOM, room_stores=room_stores or {}
        ),
        alerts=AlertSettings(channels="webex", concurrency=2, webex_cards=False),
    )


def routed_sender(closer: ExitStack, settings: Settings) -> Any:
    """An alert sender on the settings' channels (a channel per Webex room), fed through :func:`feed`."""
    from sinks.alerts.sender import AlertSender
    from tests.unit.test_process_metrics import ConfirmingProducer

    sender = AlertSender(settings, image_loader=lambda ref: jpeg())
    closer.enter_context(closing(sender))
    sender._producer = ConfirmingProducer()  # type: ignore[assignment]
    sender.start_workers()
    return sender


def feed(sender: Any, *alerts: dict[str, Any]) -> None:
    """Hand ``alerts`` to the sender as fetched records, and wait until each is done."""
    from confluent_kafka import Message

    from schemas.records import Alert

    offset = sender.stats.consumed
    sender._accept_batch(
        [
            Message(topic="alerts", partition=0, offset=offset + i, value=Alert(**a).encode())
            for i, a in enumerate(alerts)
        ]
    )
    deadline = time.monotonic() + 15
    while sender._unfinished and time.monotonic() < deadline:
        sender._drain_outcomes()
        time.sleep(0.01)
    assert not sender._unfinished


def in_store(alert_id: str, store: str) -> dict[str, Any]:
    return {**alert(alert_id, snapshot_ref=None), "store_id": store}


def posted_alerts(webex: LocalWebexServer, room: str) -> list[str]:
    return [m["markdown"].rsplit("_alert `", 1)[1].split("`", 1)[0] for m in webex.state.bot_messages(room)]


def test_webex_rooms_are_the_alert_room_and_every_room_of_the_bots_store_map(tmp_path: Path) -> None:
    from sinks.alerts.sender import webex_rooms

    def rooms(room_id: str | None, **room_stores: list[str]) -> list[tuple[str, frozenset[str] | None]]:
        return webex_rooms(Settings(stack_dir=tmp_path, webex=WebexSettings(room_id=room_id, room_stores=room_stores)))

    assert rooms(ROOM) == [(ROOM, None)]  # as before: every store's alerts in the one room
    assert rooms(ROOM, **{NYC_ROOM: ["S-NYC", "S-BKN"]}) == [(ROOM, None), (NYC_ROOM, frozenset({"S-NYC", "S-BKN"}))]
    assert rooms(ROOM, **{ROOM: ["S-LA"], NYC_ROOM: ["S-NYC"]}) == [
        (ROOM, frozenset({"S-LA"})),  # the alert room limited, as in the bot
        (NYC_ROOM, frozenset({"S-NYC"})),
    ]
    assert rooms(None, **{NYC_ROOM: ["S-NYC"]}) == [(NYC_ROOM, frozenset({"S-NYC"}))]
    assert rooms(None) == []


def test_a_stores_alerts_go_to_its_own_room_and_the_unscoped_alert_room_each_once(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Every store's alerts (faces, cases) went to CG_WEBEX__ROOM_ID only: a store's security room, limited to its
    stores in the bot, got none of its alerts."""
    settings = scoped_settings(webex, tmp_path, **{NYC_ROOM: ["S-NYC"]})
    sender = routed_sender(closer, settings)
    assert sorted(c.name for c in sender.channels) == ["webex", f"webex:{NYC_ROOM}"]
    assert sender.group_id.endswith("checkout-guard-alert-sender-webex")  # the rooms change no consumer group
    feed(sender, in_store("blocked:tx-1", "S-NYC"), in_store("blocked:tx-2", "S-SF"))
    assert posted_alerts(webex, NYC_ROOM) == ["blocked:tx-1"]
    assert sorted(posted_alerts(webex, ROOM)) == ["blocked:tx-1", "blocked:tx-2"]
    assert sender.ledger.state("blocked:tx-1", f"webex:{NYC_ROOM}") == sender.ledger.state("blocked:tx-1", "webex")
    assert sender.ledger.state("blocked:tx-2", f"webex:{NYC_ROOM}") is None
    feed(sender, in_store("blocked:tx-1", "S-NYC"), in_store("blocked:tx-2", "S-SF"))  # replayed: no room twice
    assert len(webex.state.bot_messages(NYC_ROOM)) == 1 and len(webex.state.bot_messages(ROOM)) == 2
    assert sender.stats.skipped_channels == 3 and sender.stats.unrouted == 0


def test_an_alert_the_alert_room_had_already_goes_to_a_store_room_added_since_and_not_again_to_the_alert_room(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Delivery is recorded per (alert, room): a re-driven alert is posted only in the rooms that do not have it."""
    settings = scoped_settings(webex, tmp_path, **{NYC_ROOM: ["S-NYC"]})
    sender = routed_sender(closer, settings)
    sender.ledger.mark_sent("blocked:tx-1", "webex", "m-before")  # posted before the store room existed
    feed(sender, in_store("blocked:tx-1", "S-NYC"))
    assert posted_alerts(webex, NYC_ROOM) == ["blocked:tx-1"] and webex.state.bot_messages(ROOM) == []


def test_an_alert_room_limited_to_other_stores_gets_none_of_a_stores_alerts_and_an_alert_no_room_gets_is_counted(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A room the bot limits to store S-LA got every store's alerts, faces included, when it was CG_WEBEX__ROOM_ID."""
    settings = scoped_settings(webex, tmp_path, **{ROOM: ["S-LA"], NYC_ROOM: ["S-NYC"]})
    sender = routed_sender(closer, settings)
    feed(sender, in_store("blocked:tx-1", "S-NYC"), in_store("blocked:tx-2", "S-LA"), in_store("blocked:tx-3", "S-SF"))
    assert posted_alerts(webex, ROOM) == ["blocked:tx-2"]
    assert posted_alerts(webex, NYC_ROOM) == ["blocked:tx-1"]
    assert sender.stats.unrouted == 1 and sender.stats.alerts_done == 3  # S-SF's: no room; done, not dead-lettered
    assert sender.stats.dead_lettered == 0


def test_a_webex_rate_limit_in_one_room_pauses_the_other_rooms_channels_too(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Webex limits the bot (its token), not a room: a 429 paused only the room that met it, and the other rooms'
    channels went on sending into the same limit, each meeting 429s of its own."""
    from confluent_kafka import Message

    from schemas.records import Alert

    settings = scoped_settings(webex, tmp_path, **{ROOM: ["S-LA"], NYC_ROOM: ["S-NYC"]})
    sender = routed_sender(closer, settings)
    rooms = {c.name: c for c in sender.channels}
    assert rooms["webex"].rate_limit is rooms[f"webex:{NYC_ROOM}"].rate_limit  # one bot token, one rate limit

    def accept(offset: int, store: str) -> None:
        record = Alert(**in_store(f"blocked:tx-{offset}", store)).encode()
        sender._accept_batch([Message(topic="alerts", partition=0, offset=offset, value=record)])

    webex.state.fail((429,), count=1, retry_after=3)
    accept(0, "S-LA")  # the alert room meets the 429
    wait_for(lambda: sender._workers["webex"].rate_limited == 1, 10, what="the 429 in the alert room")
    limited_at = time.monotonic()
    accept(1, "S-NYC")  # the store room's channel: the same bot, the same limit
    time.sleep(1.5)
    assert webex.state.bot_messages(NYC_ROOM) == [], "the store room posted while the bot was rate limited"
    wait_for(lambda: posted_alerts(webex, NYC_ROOM) == ["blocked:tx-1"], 15, what="the store room's alert")
    assert time.monotonic() - limited_at >= 2.5
    wait_for(lambda: posted_alerts(webex, ROOM) == ["blocked:tx-0"], 15, what="the alert room's alert")
    assert sender._workers[f"webex:{NYC_ROOM}"].rate_limited == 0  # it waited; it met no 429 of its own


class Scripted429s(httpx.BaseTransport):
    """The local Webex, except that the first ``cards`` card posts and ``deletes`` deletes are answered 429 with
    ``Retry-After: retry_after``; counts the deletes that reached it."""

    def __init__(self, cards: int = 0, deletes: int = 0, retry_after: int = 40) -> None:
        self.inner, self.cards, self.deletes, self.retry_after = httpx.HTTPTransport(), cards, deletes, retry_after
        self.deletes_asked = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        limited = httpx.Response(429, headers={"Retry-After": str(self.retry_after)}, json={"message": "Too Many"})
        if request.method == "POST" and b'"attachments"' in request.content and self.cards:
            self.cards -= 1
            return limited
        if request.method == "DELETE":
            self.deletes_asked += 1
            if self.deletes:
                self.deletes -= 1
                return limited
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_a_rate_limited_case_card_or_delete_pauses_every_room_and_cards_and_deletes_wait_out_the_bots_pause(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Webex limits the bot's token whatever the call: a 429 on a case card was waited out in its own thread while
    the other rooms went on sending, and the eraser's deletes neither paused the rooms nor waited for their pause
    (they tried again after a fixed minute). Now cards and deletes set and wait out the one shared pause."""
    scoped = scoped_settings(webex, tmp_path, **{ROOM: ["S001"], NYC_ROOM: ["S001"]})
    settings = scoped.model_copy(update={"alerts": scoped.alerts.model_copy(update={"webex_cards": True})})
    clock = [1000.0]
    shared = RateLimit(now=lambda: clock[0])
    waits: list[tuple[float, float]] = []  # (wait asked of the card's thread, the shared pause left then)

    def sleep(seconds: float) -> None:
        waits.append((seconds, shared.remaining()))
        clock[0] += seconds

    def room(name: str, transport: Scripted429s) -> WebexChannel:
        client = WebexClient(webex.url, TOKEN, transport=transport)
        channel = WebexChannel(settings, client, has_reference=lambda _: False, room_id=name, rate_limit=shared)
        channel.sleep = sleep
        return closer.enter_context(closing(channel))

    alerts_room, store_room = Scripted429s(cards=1), Scripted429s(deletes=1, retry_after=25)
    a, b = room(ROOM, alerts_room), room(NYC_ROOM, store_room)
    assert len((a.send(alert("blocked:tx-1", None), None, maybe_sent=False) or "").split()) == 2  # message and card
    assert waits == [(40.0, 40.0)], "the card's 429 did not pause the other rooms"

    with pytest.raises(DeliveryError) as limited:  # the eraser's delete meets a 429 of its own
        b.delete("m-1")
    assert limited.value.retriable and limited.value.retry_after == 25.0 and shared.remaining() == 25.0
    with pytest.raises(DeliveryError) as paused:  # and the next one is not asked of Webex until the pause ends
        a.delete("m-2")
    assert paused.value.retry_after == 25.0 and store_room.deletes_asked == 1 and alerts_room.deletes_asked == 0

    waits.clear()
    a.send(alert("blocked:tx-2", None), None, maybe_sent=False)
    assert waits == [(25.0, 25.0)], "the card did not wait out the pause the delete's 429 asked"
    assert not a.delete("m-3") and alerts_room.deletes_asked == 1  # the pause over: asked (Webex has no m-3)


class CardWithoutAnswer(httpx.BaseTransport):
    """The local Webex, except that the card post goes through but is answered 502 (``on_card`` runs then), and the
    first lookup of the card's thread is answered 429 with ``Retry-After: 20``; counts those lookups."""

    def __init__(self, on_card: Any) -> None:
        self.inner, self.on_card, self.lookups = httpx.HTTPTransport(), on_card, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and b'"attachments"' in request.content:
            self.inner.handle_request(request).read()
            self.on_card()
            return httpx.Response(502, json={"message": "Bad Gateway"})
        if request.method == "GET" and "parentId" in request.url.params:
            self.lookups += 1
            if self.lookups == 1:
                return httpx.Response(429, headers={"Retry-After": "20"}, json={"message": "Too Many"})
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_the_lookup_of_a_case_card_without_an_answer_waits_out_and_sets_the_bots_shared_pause(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """A card post without an answer is looked for in its thread; that read ignored the pause another room's 429 had
    asked, and its own 429 neither paused the other rooms nor was tried again: the card that went through stayed
    unknown to the ledger, so a forget left it (and its images' links) in the room. Now the lookup waits out the
    shared pause, sets it on a 429 and tries again after it."""
    base = settings_for(webex, tmp_path)
    settings = base.model_copy(update={"alerts": base.alerts.model_copy(update={"webex_cards": True})})
    clock = [1000.0]
    shared = RateLimit(now=lambda: clock[0])
    waits: list[tuple[float, float]] = []  # (wait asked of the card's thread, the shared pause left then)

    def sleep(seconds: float) -> None:
        waits.append((seconds, shared.remaining()))
        clock[0] += seconds

    transport = CardWithoutAnswer(on_card=lambda: shared.pause_for(30))  # another room's 429 meanwhile
    client = WebexClient(webex.url, TOKEN, transport=transport)
    channel = WebexChannel(settings, client, has_reference=lambda _: False, rate_limit=shared)
    channel.sleep = sleep
    closer.enter_context(closing(channel))
    ids = (channel.send(alert("blocked:tx-1", None), None, maybe_sent=False) or "").split()
    assert waits[0] == (30.0, 30.0), "the thread's lookup did not wait out the bot's pause"
    assert waits[1:] == [(20.0, 20.0)], "the lookup's 429 did not pause every room, or was not waited out"
    assert transport.lookups == 2 and len(ids) == 2  # the card that went through is known, deleted on forget


def test_webex_rooms_share_one_client_and_the_senders_threads_instead_of_32_threads_and_a_client_each(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Every room's channel had ``concurrency`` threads and a client of its own: N rooms made 32 x N threads and
    connections, all under the one bot's rate limit. The rooms now share one client and the threads (at least one
    each); e-mail keeps its own; each room still gets each of its alerts once."""
    rooms = {ROOM: ["S001"], NYC_ROOM: ["S001"], LA_ROOM: ["S001"]}
    settings = scoped_settings(webex, tmp_path, **rooms)
    settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"concurrency": 4})})
    sender = routed_sender(closer, settings)
    assert len({id(c.client) for c in sender.channels}) == 1
    assert [len(w._threads) for w in sender._workers.values()] == [1, 1, 1]  # 4 // 3 rooms
    assert sending_threads("email", ["email", "webex", "webex:r"], 32) == 32
    assert sending_threads("webex:r", ["email", "webex", "webex:r"], 32) == 16
    assert sending_threads("webex:r", [f"webex:{i}" for i in range(40)], 32) == 1  # at least one per room
    feed(sender, in_store("blocked:tx-1", "S001"), in_store("blocked:tx-2", "S001"))
    for room in rooms:
        assert sorted(posted_alerts(webex, room)) == ["blocked:tx-1", "blocked:tx-2"]


def test_a_mail_the_relay_refuses_for_its_size_goes_without_the_snapshot_and_says_so(tmp_path: Path) -> None:
    """Before, a relay's 552 (past its size limit, a snapshot of megabytes) was a permanent refusal: the alert was
    dead-lettered, and every re-drive was refused the same way."""
    mail, port = tmp_path / "mail", free_port()
    controller = Controller(FileStore(mail), hostname="127.0.0.1", port=port, data_size_limit=30_000)
    controller.start()
    try:
        settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port))
        big = jpeg() + bytes(60_000)  # a JPEG by its first bytes, past the relay's limit once in the mail
        with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel:
            channel.send(alert(), big, maybe_sent=False)
            channel.send(alert("blocked:tx-2"), jpeg(), maybe_sent=False)  # a small one keeps its picture
    finally:
        controller.stop()
    cut, whole = read_mails(mail)
    assert cut["X-Checkout-Guard-Alert"] == "blocked:tx-1"
    assert not [p for p in cut.walk() if p.get_content_maintype() == "image"]
    plain = next(p for p in cut.walk() if p.get_content_type() == "text/plain").get_content()
    assert "\nSnapshot:" in plain and "not attached: the mail with it (0.1 MB) was larger than the mail server" in plain
    assert [p.get_content() for p in whole.walk() if p.get_content_maintype() == "image"] == [jpeg()]


def test_a_mail_amazon_ses_refuses_for_its_size_goes_without_the_snapshot_and_says_so(tmp_path: Path) -> None:
    """SES's size refusal (MessageRejected: "Message length is more than 10485760 bytes long") was a permanent
    refusal, as a relay's 552 was: the alert was dead-lettered, and every re-drive was refused the same way."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("ses", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    smtp = SmtpSettings(from_address="cg@store.test", to_addresses="sec@x.test")
    settings = Settings(stack_dir=tmp_path, smtp=smtp)
    sent: list[bytes] = []

    class Recording:  # the stubbed client, keeping each raw mail asked of it
        def send_raw_email(self, **params: Any) -> Any:
            sent.append(params["RawMessage"]["Data"])
            return client.send_raw_email(**params)

    with Stubber(client) as ses, closing(EmailChannel(settings, SesMailer(smtp, client=Recording()))) as channel:
        too_long = "Message length is more than 10485760 bytes long: '11000000'."
        ses.add_client_error("send_raw_email", "MessageRejected", too_long, 400)
        ses.add_response("send_raw_email", {"MessageId": "ses-1"})
        channel.send(alert(), jpeg(), maybe_sent=False)
        ses.add_client_error("send_raw_email", "MessageRejected", "Email address is not verified.", 400)
        with pytest.raises(DeliveryError) as refused:  # another rejection is still one for good, tried once
            channel.send(alert("blocked:tx-2"), jpeg(), maybe_sent=False)
        ses.assert_no_pending_responses()
    assert not refused.value.retriable and "larger" not in refused.value.reason
    raw = [email.message_from_bytes(data, policy=email.policy.default) for data in sent]
    assert len(raw) == 3 and [p.get_content_maintype() for p in raw[0].walk()].count("image") == 1
    assert not [p for p in raw[1].walk() if p.get_content_maintype() == "image"]
    plain = next(p for p in raw[1].walk() if p.get_content_type() == "text/plain").get_content()
    assert "\nSnapshot:" in plain and "not attached" in plain


def test_a_mail_past_amazon_ses_size_limit_goes_once_without_the_snapshot_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SES's SendRawEmail takes 10 MB of raw mail, the snapshot base64-encoded in it (8 MB of picture are 11 MB
    there). Such a mail was sent to SES whole, refused, and only then sent without its snapshot: two calls, the
    first carrying the shopper's face to be refused. Now it is measured before: one call, without the snapshot."""
    smtp = SmtpSettings(from_address="cg@store.test", to_addresses="sec@x.test")
    settings = Settings(stack_dir=tmp_path, smtp=smtp)
    client = SesLimits()
    big = jpeg() + bytes(8_000_000)  # under 10 MB itself, over it once base64-encoded in the mail
    with closing(EmailChannel(settings, SesMailer(smtp, client=client))) as channel, caplog.at_level("WARNING"):
        channel.send(alert(), big, maybe_sent=False)
        channel.send(alert("blocked:tx-2"), jpeg(), maybe_sent=False)  # a small one keeps its picture
    assert len(client.asked) == 2, "SES was asked for the mail with the snapshot first"
    cut, whole = (email.message_from_bytes(data, policy=email.policy.default) for data in client.asked)
    assert cut["X-Checkout-Guard-Alert"] == "blocked:tx-1"
    assert not [p for p in cut.walk() if p.get_content_maintype() == "image"]
    plain = next(p for p in cut.walk() if p.get_content_type() == "text/plain").get_content()
    assert "\nSnapshot:" in plain
    assert "not attached: the mail with it (11.0 MB) was larger than the mail server" in plain
    assert [p.get_content() for p in whole.walk() if p.get_content_maintype() == "image"] == [jpeg()]
    assert "blocked:tx-1 refused for its size with the snapshot (SES not asked" in caplog.text


def test_a_mail_refused_for_its_size_without_a_snapshot_is_refused_for_good(tmp_path: Path) -> None:
    mail, port = tmp_path / "mail", free_port()
    controller = Controller(FileStore(mail), hostname="127.0.0.1", port=port, data_size_limit=500)
    controller.start()
    try:
        settings = Settings(stack_dir=tmp_path, smtp=SmtpSettings(port=port))
        with closing(EmailChannel(settings, SmtpMailer(settings.smtp))) as channel, pytest.raises(DeliveryError) as e:
            channel.send(alert(), None, maybe_sent=False)
    finally:
        controller.stop()
    assert not e.value.retriable and "552" in e.value.reason and read_mails(mail) == []


def test_a_webex_post_refused_for_its_size_goes_without_the_snapshot_and_says_so(
    webex: LocalWebexServer, tmp_path: Path, closer: ExitStack
) -> None:
    """Before, a 413 (a snapshot past Webex's 100 MB) was a permanent refusal: the alert was dead-lettered, and
    every re-drive was refused the same way."""
    channel = webex_channel(closer, settings_for(webex, tmp_path))
    channel.bot_id()  # asked once, before the refusal below
    webex.state.fail((413,), count=1)
    channel.send(alert(), jpeg(), maybe_sent=False)
    channel.MAX_FILE_BYTES = 100  # past the limit: left off before the post, not sent to be refused
    channel.send(alert("blocked:tx-2"), jpeg(), maybe_sent=False)
    first, second = webex.state.bot_messages(ROOM)
    for message in (first, second):
        assert not message.get("files")
        assert "**Snapshot:** not attached: it (0.0 MB) " in message["markdown"] and "alert `" in message["markdown"]
    assert "made the message larger than Webex takes" in first["markdown"]
    assert "is larger than Webex takes (100 MB)" in second["markdown"]
    assert webex.state.requests.get("413") == 1
