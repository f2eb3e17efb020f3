"""Store scopes of rooms (``CG_WEBEX__ROOM_STORES``): a chain's store security room sees and acts on its own stores'
checkouts, cases and watchlist entries only; other rooms see every store. The local Webex API server plays Webex
(tests/unit/test_webex_bot.py has the harness)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from infra.launcher import wait_for
from infra.settings import Settings
from jobs.bot.webex_bot import SCOPE_REFUSAL, watchlist_text
from schemas.records import WatchlistEntry, case_id_for
from tests.unit import test_webex_bot
from tests.unit.test_webex_bot import SECURITY_ROOM, Harness

harness = test_webex_bot.harness
"""The bot over HTTP with the local Webex API (the fixture of tests/unit/test_webex_bot.py)."""
TRANSACTIONS = {"tx-1": {"store_id": "S1"}, "tx-2": {"store_id": "S2"}}
OWN, OTHER, UNKNOWN = (case_id_for(f"watchlist:{tx}:subj-a") for tx in ("tx-1", "tx-2", "tx-9"))
CASES = {
    OWN: {"store_id": "S1", "state": "open"},
    OTHER: {"store_id": "S2", "state": "confirmed", "decided_by": "lead@s2.test"},
}


def scope(harness: Harness, rooms: dict[str, tuple[str, ...]]) -> list[frozenset[str]]:
    """Give the harness's bot these room scopes and indexed transactions and cases; returns the scopes ``status``
    was asked with."""
    bot, asked = harness.bot, []
    bot.settings = bot.settings.model_copy(
        update={"webex": bot.settings.webex.model_copy(update={"room_stores": rooms})}
    )
    bot.transaction_lookup, bot.case_lookup = TRANSACTIONS.get, CASES.get

    def store_status(stores: frozenset[str]) -> str:
        asked.append(stores)
        return "counts of your stores"

    bot.store_status_text = store_status
    return asked


def ask(harness: Harness, text: str) -> str:
    before = len(harness.replies(SECURITY_ROOM))
    harness.say(SECURITY_ROOM, "guard@store.test", text)
    replies = wait_for(lambda: harness.replies(SECURITY_ROOM)[before:], 10, what=f"the answer to {text}")
    return str(replies[0])


@pytest.mark.parametrize(
    "text",
    ["checkout tx-2", "fraud tx-2", "vip tx-2", "forget subj-tx-2", "renew subj-tx-2", f"confirm {OTHER}",
     f"note {OTHER} seen again", "checkout tx-9", "forget someone-else", f"dismiss {UNKNOWN}"],
)  # fmt: skip
def test_a_store_room_is_refused_what_is_not_its_stores_and_told_nothing_about_it(harness: Harness, text: str) -> None:
    """Before, every allowed room saw and acted on every store's checkouts and cases."""
    scope(harness, {SECURITY_ROOM: ("S1",)})
    assert ask(harness, text) == SCOPE_REFUSAL  # not "already confirmed by ...", not the face check
    assert harness.published == []


@pytest.mark.parametrize("text", ["checkout tx-1", "fraud tx-1", "forget subj-tx-1", f"confirm {OWN}"])
def test_a_store_room_runs_commands_on_its_own_stores(harness: Harness, text: str) -> None:
    scope(harness, {SECURITY_ROOM: ("S1", "S3")})
    assert ask(harness, text) != SCOPE_REFUSAL
    assert len(harness.published) == 1


def test_a_room_without_a_scope_sees_every_store(harness: Harness) -> None:
    asked = scope(harness, {"room-of-another-store": ("S1",)})
    assert ask(harness, "checkout tx-2") == "face check of tx-2: no match"
    assert ask(harness, "status") == "all healthy" and asked == []


def test_status_in_a_store_room_counts_its_stores_alone(harness: Harness) -> None:
    asked = scope(harness, {SECURITY_ROOM: ("S1", "S3")})
    assert ask(harness, "status") == "counts of your stores"
    assert asked == [frozenset({"S1", "S3"})]


def test_a_store_room_is_refused_while_the_store_cannot_be_looked_up(harness: Harness) -> None:
    scope(harness, {SECURITY_ROOM: ("S1",)})

    def away(_: str) -> dict[str, Any] | None:
        raise ConnectionError("OpenSearch away")

    harness.bot.transaction_lookup = away
    assert ask(harness, "fraud tx-1") == SCOPE_REFUSAL and harness.published == []


def test_a_card_press_in_a_store_room_is_refused_for_another_stores_case(harness: Harness) -> None:
    scope(harness, {SECURITY_ROOM: ("S1",)})
    card = harness.bot.client.send_card(SECURITY_ROOM, "Case", {"type": "AdaptiveCard", "body": []})
    before = len(harness.replies(SECURITY_ROOM))
    harness.webex.press(card["id"], "guard@store.test", {"verb": "confirm", "case_id": OTHER})
    [reply] = wait_for(lambda: harness.replies(SECURITY_ROOM)[before:], 10, what="the refusal")
    assert reply == SCOPE_REFUSAL and harness.published == []


def test_room_stores_is_a_json_map_of_rooms_to_store_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CG_WEBEX__ROOM_STORES", '{"room-nyc": [" S-NYC", "S-BKN"]}')
    webex = Settings().webex
    assert webex.stores_of("room-nyc") == frozenset({"S-NYC", "S-BKN"}) and webex.stores_of("room-hq") is None
    monkeypatch.setenv("CG_WEBEX__ROOM_STORES", '{"room-nyc": []}')
    with pytest.raises(ValidationError, match="at least one store"):
        Settings()


def test_the_watchlist_in_a_store_rooms_status_names_no_subject() -> None:
    now, day = 1_800_000_000_000, 86_400_000
    entries = [WatchlistEntry("subj-a", "SUSPECT", [], "fraud", "lp@x", now, expires_at=now + 20 * day)]
    assert watchlist_text(entries, now, 365, named=False) == "Watchlist: 1 suspect; 1 expiring within 30 days"
