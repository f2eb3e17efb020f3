"""The local Webex API (infra/local/webex.py) answers as Webex does where the clients rely on it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from infra.local.webex import LocalWebexServer

TOKEN = "local-token"


@pytest.fixture
def webex() -> Iterator[tuple[LocalWebexServer, httpx.Client]]:
    with (
        LocalWebexServer(TOKEN) as server,
        httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http,
    ):
        yield server, http


def _all_pages(http: httpx.Client, path: str, **params: object) -> tuple[list[dict], int]:
    """Every item of a list, following ``Link: rel="next"`` as a Webex client must; and how many pages."""
    response = http.get(path, params=params)
    items, pages = [], 0
    while True:
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        pages += 1
        if "next" not in response.links:
            return items, pages
        response = http.get(response.links["next"]["url"])


def test_webhooks_are_listed_100_a_page_with_a_link_to_the_next_as_webex_does(webex) -> None:
    _, http = webex
    for i in range(101):
        body = {"name": f"hook-{i}", "targetUrl": "https://bot.example/w", "resource": "messages", "event": "created"}
        assert http.post("/webhooks", json=body).status_code == 200
    first = http.get("/webhooks")
    assert len(first.json()["items"]) == 100, "Webex's default max for webhooks"
    assert "next" in first.links, "the rest is behind the Link header"
    items, pages = _all_pages(http, "/webhooks")
    assert [w["name"] for w in items] == [f"hook-{i}" for i in range(101)] and pages == 2
    items, pages = _all_pages(http, "/webhooks", max=40)
    assert len(items) == 101 and pages == 3


def test_messages_are_listed_max_a_page_newest_first_with_a_link_to_older_ones(webex) -> None:
    server, http = webex
    server.state.add_room("room-1", "direct")
    for i in range(5):
        assert http.post("/messages", json={"roomId": "room-1", "markdown": f"m{i}"}).status_code == 200
    assert http.post("/messages", json={"roomId": "room-2", "markdown": "elsewhere"}).status_code == 200
    first = http.get("/messages", params={"roomId": "room-1", "max": 2})
    assert [m["markdown"] for m in first.json()["items"]] == ["m4", "m3"]
    assert "next" in first.links
    items, pages = _all_pages(http, "/messages", roomId="room-1", max=2)
    assert [m["markdown"] for m in items] == ["m4", "m3", "m2", "m1", "m0"] and pages == 3
    last = http.get("/messages", params={"roomId": "room-1"})
    assert len(last.json()["items"]) == 5 and "next" not in last.links
