"""The Webex client's paths against the local Webex API (infra/local/webex.py, a real HTTP server).

Message and webhook ids reach the client from webhook bodies; each must stay one path segment, so an
id can never turn "read this message" into another call made with the bot's token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from infra.clients.webex import RETRY_AFTER_LIMIT_S, WebexClient, WebexError, path_segment, with_retries
from infra.local.webex import LocalWebexServer, free_port

TOKEN = "edge-token"


@pytest.fixture
def webex() -> Iterator[tuple[LocalWebexServer, WebexClient]]:
    with LocalWebexServer(TOKEN) as server, WebexClient(server.url, TOKEN) as client:
        yield server, client


def test_a_message_id_cannot_reach_another_endpoint(webex) -> None:
    _, client = webex
    client.create_webhook("hook", "https://bot.example/webex/webhook", "s3cret")
    for hostile in ("../people/me", "../webhooks", "..", "%2E%2E/webhooks"):
        with pytest.raises(WebexError) as err:
            client.get_message(hostile)  # unescaped, these read the bot's profile or the webhooks
        assert err.value.status == 404, hostile
    sent = client.send_message("room-1", "hello")
    assert client.get_message(sent["id"])["id"] == sent["id"], "a real id still works"


def test_a_webhook_id_cannot_delete_another_webhook(webex) -> None:
    _, client = webex
    hook = client.create_webhook("hook", "https://bot.example/webex/webhook", "s3cret")
    with pytest.raises(WebexError) as err:
        client.delete_webhook(f"x/../{hook['id']}")  # unescaped: DELETE /webhooks/<the real id>
    assert err.value.status == 404
    assert [w["id"] for w in client.list_webhooks()] == [hook["id"]]
    client.delete_webhook(hook["id"])
    assert client.list_webhooks() == []


def test_webhooks_past_webexs_first_page_of_100_are_listed(webex) -> None:
    server, client = webex
    made = [client.create_webhook(f"hook-{i}", "https://bot.example/webex/webhook", "s3cret")["id"] for i in range(130)]
    assert [w["id"] for w in client.list_webhooks()] == made  # the first page alone held 100
    assert server.state.requests["200"] >= 132, "two pages, each a request"


def test_messages_are_listed_across_pages_up_to_the_number_asked_for() -> None:
    """Webex may answer fewer than ``max`` a page (the local API never does): the Link to the rest is followed,
    and no further than the number asked for."""
    messages = [{"id": f"m{i}", "roomId": "room-1"} for i in range(7)]
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        start = int(request.url.params.get("cursor", "0"))
        page = messages[start : start + 3]
        more = start + 3 < len(messages)
        link = (
            {"Link": f'<https://webex.test/v1/messages?roomId=room-1&cursor={start + 3}>; rel="next"'} if more else {}
        )
        return httpx.Response(200, json={"items": page}, headers=link)

    with WebexClient("https://webex.test/v1", TOKEN, transport=httpx.MockTransport(handler)) as client:
        assert [m["id"] for m in client.list_messages("room-1", 5)] == ["m0", "m1", "m2", "m3", "m4"]
        assert len(asked) == 2
        assert [m["id"] for m in client.list_messages("room-1", 100)] == [m["id"] for m in messages]


def test_a_next_page_link_to_another_host_gets_no_token() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(
            200,
            json={"items": [{"id": "w1"}]},
            headers={"Link": '<https://evil.test/v1/webhooks?cursor=1>; rel="next"'},
        )

    with (
        WebexClient("https://webex.test/v1", TOKEN, transport=httpx.MockTransport(handler)) as client,
        pytest.raises(WebexError) as err,
    ):
        client.list_webhooks()
    assert not err.value.retriable and seen == ["webex.test"]


def test_an_empty_id_is_refused_before_any_request(webex) -> None:
    server, client = webex
    client.send_message("room-1", "hello")
    before = dict(server.state.requests)
    with pytest.raises(WebexError) as err:
        client.get_message("")  # unescaped: GET /messages/, a listing instead of one message
    assert not err.value.retriable and err.value.status is None
    assert server.state.requests == before, "no request reached the server"
    assert path_segment("a/b?c#d.e") == "a%2Fb%3Fc%23d%2Ee"


def test_the_local_webex_server_takes_a_log_level_like_every_other_process(monkeypatch):
    import typer.main

    from infra.local import webex

    seen: dict[str, object] = {}
    monkeypatch.setattr(webex, "setup_logging", lambda settings, level, process: seen.update(level=level, name=process))
    monkeypatch.setattr(webex.uvicorn, "run", lambda app, **kw: seen.update(server=kw["log_level"]))
    app = typer.Typer(add_completion=False)
    app.command()(webex.main)
    command = typer.main.get_command(app)
    command.main(["--log-level", "DEBUG", "--port", "1"], standalone_mode=False)
    assert seen == {"level": "DEBUG", "name": "webex-local", "server": "debug"}
    command.main(["--port", "1"], standalone_mode=False)
    assert seen["level"] is None and seen["server"] == "warning"


def test_a_long_retry_after_is_waited_out_whole_and_logged(webex, caplog) -> None:
    """Cut at 30 s, a Retry-After of 120 s was met again by the next try, still inside the rate limit."""
    server, client = webex
    server.state.fail((429,), count=1, retry_after=120)
    waits: list[float] = []
    with caplog.at_level("WARNING", logger="infra.clients.webex"):
        sent = with_retries(lambda: client.send_message("room-1", "hello"), sleep=waits.append)
    assert sent["id"] and waits == [120.0]
    assert "waiting 120.0 s (Retry-After of a 429) before try 2 of 4" in caplog.text
    server.state.fail((429,), count=1, retry_after=86_400)  # a broken or hostile header: no longer than the limit
    waits.clear()
    with_retries(lambda: client.send_message("room-1", "hello"), sleep=waits.append)
    assert waits == [RETRY_AFTER_LIMIT_S] == [300.0]


def test_a_retry_after_past_the_callers_deadline_is_not_waited_for(webex) -> None:
    server, client = webex
    server.state.fail((429,), count=1, retry_after=120)
    waits: list[float] = []
    with pytest.raises(WebexError) as err:
        with_retries(lambda: client.send_message("room-1", "hello"), deadline_s=60, sleep=waits.append)
    assert err.value.status == 429 and waits == []


def test_a_failed_answer_keeps_webexs_tracking_id_header_on_the_error_and_in_its_reason() -> None:
    """Webex support asks for the trackingId of a failed call; the error kept only status and message."""
    answers = [
        httpx.Response(503, json={"message": "down", "trackingId": "BODY_1"}, headers={"TrackingID": "ROUTER_5F2A"}),
        httpx.Response(429, json={"message": "slow down"}, headers={"trackingid": "ROUTER_6B3C", "Retry-After": "2"}),
        httpx.Response(404, json={"message": "gone", "trackingId": "BODY_2"}),  # no header: none, not the body's
        httpx.Response(400, json={"message": "bad"}, headers={"trackingid": "two words\nINFO forged"}),
    ]
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("trackingid"))
        return answers.pop(0)

    errors = []
    with WebexClient("https://webex.test/v1", TOKEN, transport=httpx.MockTransport(handler)) as client:
        for _ in range(4):
            with pytest.raises(WebexError) as err:
                client.me()
            errors.append(err.value)
    assert [e.tracking_id for e in errors] == ["ROUTER_5F2A", "ROUTER_6B3C", None, None]
    assert [e.reason for e in errors] == [
        "503 down (trackingId ROUTER_5F2A)",
        "429 rate limited: slow down (trackingId ROUTER_6B3C)",
        "404 gone",
        "400 bad",
    ]
    assert errors[1].asked_wait == 2.0 and sent == [None] * 4, "the id is the answer's, never one the client sent"


def test_the_local_webex_api_sends_a_tracking_id_header_like_webex(webex) -> None:
    server, client = webex
    server.state.fail((503,), count=1)
    with pytest.raises(WebexError) as err:
        client.send_message("room-1", "hello")
    assert err.value.tracking_id and err.value.tracking_id.startswith("ROUTER_")
    assert err.value.reason == f"503 Injected failure (trackingId {err.value.tracking_id})"


def test_a_post_whose_answer_timed_out_is_not_posted_again_while_a_refused_connection_is_tried_again() -> None:
    """Webex may have posted a message whose answer never came: each try of a bot reply after a read timeout put it
    in the room once more. A post that never reached Webex (no connection) is still tried again."""
    with LocalWebexServer(TOKEN) as server, WebexClient(server.url, TOKEN, timeout_s=0.3) as client:
        server.state.latency_s = 1.0  # Webex posts it, after the client stopped waiting
        with pytest.raises(WebexError) as err:
            with_retries(lambda: client.send_message("room-1", "hello"), posts=True, sleep=lambda _: None)
        assert err.value.maybe_done and err.value.retriable
        time.sleep(1.5)  # what the server was still doing is done
        assert len(server.state.bot_messages("room-1")) == 1
        server.state.latency_s = 0.0
        assert with_retries(client.me, sleep=lambda _: None)["id"], "a read retried as before"
    tries: list[float] = []
    nobody = WebexClient(f"http://127.0.0.1:{free_port()}/v1", TOKEN, timeout_s=0.3)
    with nobody, pytest.raises(WebexError) as refused:
        with_retries(lambda: nobody.send_message("room-1", "hello"), posts=True, sleep=tries.append)
    assert not refused.value.maybe_done and len(tries) == 3, "never sent: tried 4 times"
