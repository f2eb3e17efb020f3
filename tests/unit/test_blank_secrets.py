"""A key the deployment signs or checks with, given blank or as spaces only, is unset, as a blank
``CG_LOG__PERSON_TAG_KEY`` already was: spaces passed every "is it set?" check and keyed the HMAC with what anyone
can guess (a forged watchlist command, a signed link to a face without a login, a customer key recomputed from a
list of addresses, a dashboard login with a password of spaces), and an empty signing key made the watchlist
service dead-letter every checkout and status the bot recorded, as it was not None."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from infra.command_auth import SIGNATURE_HEADER, authenticate_command, sign_command
from infra.settings import DashboardSettings, Settings, WebexSettings
from jobs.faces.engine import FaceEngine
from jobs.faces.watchlist_service import Source, WatchlistCore
from schemas.errors import InvalidRecord
from schemas.records import BotCommand
from sinks.dashboard.app import DashboardConfigError, check_exposure

NOW = 1_800_000_000_000
ROOM = "room-security"
KEYS = {
    "CG_WEBEX__COMMAND_SIGNING_KEY": ("webex", "command_signing_key"),
    "CG_WEBEX__WEBHOOK_SECRET": ("webex", "webhook_secret"),
    "CG_WEBEX__PREVIOUS_WEBHOOK_SECRET": ("webex", "previous_webhook_secret"),
    "CG_ALERTS__IMAGE_LINK_KEY": ("alerts", "image_link_key"),
    "CG_INDICES__CUSTOMER_KEY_SECRET": ("indices", "customer_key_secret"),
    "CG_DASHBOARD__PASSWORD": ("dashboard", "password"),
    "CG_DASHBOARD__TOKEN": ("dashboard", "token"),
    "CG_LOG__PERSON_TAG_KEY": ("log", "person_tag_key"),
}


@pytest.mark.parametrize("blank", ["", " ", " \t "])
@pytest.mark.parametrize("variable", sorted(KEYS))
def test_a_blank_key_is_unset(monkeypatch: pytest.MonkeyPatch, variable: str, blank: str) -> None:
    monkeypatch.setenv(variable, blank)
    section, name = KEYS[variable]
    assert getattr(getattr(Settings(), section), name) is None


@pytest.mark.parametrize("variable", sorted(KEYS))
def test_a_key_with_spaces_around_it_is_kept_as_given(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Every process reads the same value: only a key of nothing but spaces is none."""
    monkeypatch.setenv(variable, " k3y ")
    section, name = KEYS[variable]
    value = getattr(getattr(Settings(), section), name)
    assert isinstance(value, SecretStr) and value.get_secret_value() == " k3y "


def command(verb: str = "FORGET", argument: str | None = "subj-tx-1") -> BotCommand:
    return BotCommand(
        verb=verb, argument=argument, command_id="m-1", issued_at=NOW - 2000, actor="guard@store.test", room_id=ROOM
    )


def test_a_command_signed_with_spaces_is_refused_where_the_key_is_spaces() -> None:
    webex = WebexSettings(command_signing_key=SecretStr("   "), allowed_rooms=ROOM)
    forged = command()
    with pytest.raises(InvalidRecord, match="no command signing key"):
        authenticate_command(forged, ((SIGNATURE_HEADER, sign_command(forged, "   ")),), webex, NOW)


def test_an_empty_signing_key_does_not_dead_letter_the_bots_checkouts(tmp_path) -> None:
    """Unset, the watchlist service has nothing to check the bot's records against and passes them by; empty was
    taken as a key, so every checkout, status and help of the bot became an ``unauthorized`` dead letter."""
    settings = Settings(stack_dir=tmp_path, webex=WebexSettings(command_signing_key=SecretStr(""), allowed_rooms=ROOM))
    core = WatchlistCore(settings, engine=FaceEngine(settings.faces))
    checkout = command("CHECKOUT", "tx-1")
    record = Source("commands", 0, 7, checkout.command_id.encode(), checkout.encode(), ())
    out = core.on_command(record, NOW)
    assert [o.topic.name for o in out] == ["audit"]  # the check's INSPECT event (unverified: no key), no dead letter
    assert b"INSPECT" in out[0].value and b"unauthorized" not in out[0].value


def test_a_dashboard_login_whose_password_is_spaces_is_half_a_login() -> None:
    """``CG_DASHBOARD__USERNAME`` with an empty password is refused at start; with spaces it opened the face snapshots
    to anyone who typed the user name and a space."""
    with pytest.raises(DashboardConfigError, match="needs both"):
        check_exposure(DashboardSettings(username="security", password=SecretStr("  ")), "0.0.0.0")
