"""Only the bot's signed, fresh commands from allow-listed issuers change the watchlist (issue 12, defect 8):
anything else on ``commands`` is audited as refused and dead-lettered ``unauthorized``; ids are checked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import SecretStr

from infra.command_auth import SIGNATURE_HEADER, authenticate_command, sign_command
from infra.settings import Settings, WebexSettings
from jobs.faces.engine import FaceEngine
from jobs.faces.watchlist_service import UNVERIFIED_ACTOR, Out, Source, WatchlistCore
from schemas.errors import InvalidRecord
from schemas.records import AuditEvent, BotCommand, DeadLetter
from schemas.topics import AUDIT, DEAD_LETTERS, WATCHLIST

NOW = 1_800_000_000_000
KEY = "unit-test-command-signing-key"
ROOM = "room-security"
_ENGINE: FaceEngine | None = None


def webex(**update: Any) -> WebexSettings:
    base = {"command_signing_key": SecretStr(KEY), "allowed_rooms": ROOM, "allowed_people": "lead@store.test"}
    return WebexSettings(**{**base, **update})


@pytest.fixture
def core(tmp_path) -> WatchlistCore:
    global _ENGINE
    settings = Settings(stack_dir=tmp_path, webex=webex())
    _ENGINE = _ENGINE or FaceEngine(settings.faces)
    return WatchlistCore(settings, engine=_ENGINE)


def cmd(verb: str = "FORGET", arg: str | None = "subj-tx-1", **fields: Any) -> BotCommand:
    base = {"command_id": "m-1", "issued_at": NOW - 2000, "actor": "guard@store.test", "room_id": ROOM}
    return BotCommand(verb=verb, argument=arg, **{**base, **fields})


def source(command: BotCommand, headers: Sequence[tuple[str, Any]] = (), offset: int = 7) -> Source:
    return Source("commands", 0, offset, command.command_id.encode(), command.encode(), tuple(headers))


def signed(command: BotCommand, key: str = KEY) -> tuple[tuple[str, bytes], ...]:
    return ((SIGNATURE_HEADER, sign_command(command, key)),)


def topics(outs: list[Out]) -> dict[str, list[Out]]:
    return {spec.name: [o for o in outs if o.topic == spec] for spec in (WATCHLIST, AUDIT, DEAD_LETTERS)}


def refused(outs: list[Out]) -> tuple[AuditEvent, DeadLetter]:
    """The one refusal audit and the one dead letter an unauthorised command leaves, and nothing else."""
    by = topics(outs)
    assert by["watchlist"] == [], "an unauthorised command changed the watchlist"
    [audit], [letter] = by["audit"], by["dead_letters"]
    return AuditEvent.decode(audit.value), DeadLetter.decode(letter.value)


# --------------------------------------------------------------------------- the signature check alone


def test_a_signed_fresh_command_from_an_allowed_room_or_person_passes() -> None:
    authenticate_command(cmd(), signed(cmd()), webex(), NOW)
    from_anywhere = cmd(actor="Lead@Store.test", room_id="room-lobby")
    authenticate_command(from_anywhere, signed(from_anywhere), webex(), NOW)


@pytest.mark.parametrize(
    ("headers", "settings", "why"),
    [
        ((), webex(), "0 signatures"),
        (signed(cmd(), key="guessed"), webex(), "does not match"),
        (signed(cmd(arg="subj-tx-2")), webex(), "does not match"),  # signed another command
        (signed(cmd(issued_at=NOW - 1)), webex(), "does not match"),  # timestamp changed after signing
        (signed(cmd()) * 2, webex(), "2 signatures"),
        (((SIGNATURE_HEADER, None),), webex(), "not one"),
        (signed(cmd()), webex(command_signing_key=None), "no command signing key"),
        (signed(cmd(), key=""), webex(command_signing_key=SecretStr("")), "no command signing key"),
    ],
)
def test_unsigned_badly_signed_or_unkeyed_commands_are_unauthorized(headers, settings, why) -> None:
    with pytest.raises(InvalidRecord) as err:
        authenticate_command(cmd(), headers, settings, NOW)
    assert err.value.kind == "unauthorized" and why in err.value.reason


@pytest.mark.parametrize("issued_at", [NOW - 900_001, NOW + 60_001])
def test_a_signed_command_outside_the_time_window_is_unauthorized(issued_at: int) -> None:
    old = cmd(issued_at=issued_at)
    with pytest.raises(InvalidRecord, match="outside the accepted window"):
        authenticate_command(old, signed(old), webex(), NOW)


def test_a_signed_command_from_an_issuer_off_the_allow_list_is_unauthorized() -> None:
    """The service applies the allow-list itself: a key leaked to a room the bot serves is not enough."""
    lobby = cmd(actor="visitor@store.test", room_id="room-lobby")
    with pytest.raises(InvalidRecord, match="allow-list"):
        authenticate_command(lobby, signed(lobby), webex(), NOW)


def test_the_signature_covers_field_boundaries() -> None:
    """Moving text from one field into the next gives another signature (no naive concatenation)."""
    a = cmd(actor="a@x.test", room_id="r,b")
    b = cmd(actor="a@x.test,r", room_id="b")
    assert sign_command(a, KEY) != sign_command(b, KEY)
    assert sign_command(a, KEY).startswith(b"v1=") and len(sign_command(a, KEY)) == 3 + 64


# --------------------------------------------------------------------------- the service


def test_an_unsigned_forget_is_dead_lettered_unauthorized_and_never_applied(core: WatchlistCore) -> None:
    core.entries["subj-tx-1"] = {"category": "SUSPECT", "source_transaction_id": "tx-1"}
    audit, letter = refused(core.on_command(source(cmd()), NOW))
    assert core.entries["subj-tx-1"]["category"] == "SUSPECT", "the subject was forgotten"
    assert (letter.error_kind, letter.dead_letter_id) == ("unauthorized", "commands:0:7")
    assert (audit.audit_id, audit.outcome, audit.action) == ("refused:commands:0:7", "FAILED", "FORGET")
    assert audit.actor == UNVERIFIED_ACTOR and audit.details["claimed_actor"] == "guard@store.test"
    assert audit.reason.startswith("unauthorized:") and audit.command_id is None


def test_a_forged_command_does_not_block_the_real_command_with_the_same_id(core: WatchlistCore) -> None:
    """The refusal is keyed by offset: a forged copy of a message id must not make the real one 'done'."""
    refused(core.on_command(source(cmd(), signed(cmd(), key="guessed"), offset=1), NOW))
    assert core.on_command(source(cmd(), signed(cmd(), key="guessed"), offset=1), NOW) == [], "replayed refusal"
    real = topics(core.on_command(source(cmd(), signed(cmd()), offset=2), NOW))
    assert [AuditEvent.decode(o.value).audit_id for o in real["audit"]] == ["command:m-1"]
    assert real["watchlist"][0].value is None and real["dead_letters"] == []


def test_a_service_without_a_signing_key_applies_no_command(tmp_path) -> None:
    core = WatchlistCore(Settings(stack_dir=tmp_path, webex=webex(command_signing_key=None)), engine=_ENGINE)
    _, letter = refused(core.on_command(source(cmd(), signed(cmd())), NOW))
    assert letter.error_kind == "unauthorized" and "no command signing key" in letter.reason


def test_a_stale_or_off_list_signed_command_is_refused_by_the_service(core: WatchlistCore) -> None:
    stale = cmd(issued_at=NOW - 3_600_000)
    assert refused(core.on_command(source(stale, signed(stale), offset=3), NOW))[1].error_kind == "unauthorized"
    lobby = cmd(command_id="m-2", actor="visitor@store.test", room_id="room-lobby")
    assert refused(core.on_command(source(lobby, signed(lobby), offset=4), NOW))[1].error_kind == "unauthorized"


@pytest.mark.parametrize(
    ("verb", "arg"),
    [
        ("FRAUD", "x/../Q2XX-VICTIM-0001/reboot?"),
        ("VIP", "../../etc"),
        ("FORGET", "subj-tx-1/../../reference"),
        ("FORGET", "subj tx"),
        ("FRAUD", "t" * 124),  # the transaction id fits, the subject id subj-<tx> would not
    ],
)
def test_signed_commands_with_invalid_ids_are_dead_lettered_invalid_id(core: WatchlistCore, verb, arg) -> None:
    bad = cmd(verb=verb, arg=arg)
    by = topics(core.on_command(source(bad, signed(bad)), NOW))
    [audit], [letter] = by["audit"], by["dead_letters"]
    assert by["watchlist"] == [] and DeadLetter.decode(letter.value).error_kind == "invalid_id"
    event = AuditEvent.decode(audit.value)
    assert event.outcome == "FAILED" and event.reason.startswith("invalid_id")
    assert event.subject_id is None and event.transaction_id is None, "a hostile id was copied into the audit"


@pytest.mark.parametrize("command_id", ["m" * 1_000_000, "m" * 513, "", "m-1\r\nX: y", "m 1"])
def test_a_signed_command_whose_id_is_no_command_id_is_refused_invalid_id_under_its_offset(
    core: WatchlistCore, command_id: str
) -> None:
    """The audit event is named by the command id and carries it: a signed one of 1 MB made an event of 1 MB."""
    core.entries["subj-tx-1"] = {"category": "SUSPECT", "source_transaction_id": "tx-1"}
    bad = cmd(command_id=command_id)
    audit, letter = refused(core.on_command(source(bad, signed(bad)), NOW))
    assert core.entries["subj-tx-1"]["category"] == "SUSPECT", "the subject was forgotten"
    assert (letter.error_kind, audit.audit_id, audit.command_id) == ("invalid_id", "refused:commands:0:7", None)
    assert (audit.reason or "").startswith("invalid_id: command_id is not a command id") and len(audit.encode()) < 2000
    longest = cmd(command_id="m" * 512)
    authenticate_command(longest, signed(longest), webex(), NOW)


@pytest.mark.parametrize("actor", ["g" * 1_000_000, "g" * 255, "", "guard@store.test\r\nX: y"])
def test_a_signed_command_from_an_allowed_room_whose_actor_is_no_person_is_refused_invalid_id(
    core: WatchlistCore, actor: str
) -> None:
    """The actor is copied into the audit event: a signed one of 1 MB from an allowed room made an event of 1 MB."""
    core.entries["subj-tx-1"] = {"category": "SUSPECT", "source_transaction_id": "tx-1"}
    bad = cmd(actor=actor)
    audit, letter = refused(core.on_command(source(bad, signed(bad)), NOW))
    assert core.entries["subj-tx-1"]["category"] == "SUSPECT", "the subject was forgotten"
    assert (letter.error_kind, audit.audit_id, audit.actor) == ("invalid_id", "refused:commands:0:7", UNVERIFIED_ACTOR)
    assert (audit.reason or "").startswith("invalid_id: actor is not a command's actor") and len(audit.encode()) < 2000
    for fits in ("g" * 254, "Y2lzY29zcGFyazovL3VzL1BFT1BMRS9mNWIzNjE4Ny1jOGRkLTQ3MjctOGIyZi1mOWM0NDdmMjkwNDY"):
        authenticate_command(cmd(actor=fits), signed(cmd(actor=fits)), webex(), NOW)


def test_a_checkout_or_status_record_not_signed_by_the_bot_is_dead_lettered_and_an_old_signed_one_ignored(
    core: WatchlistCore,
) -> None:
    forged = cmd("CHECKOUT", "tx-1")
    by = topics(core.on_command(source(forged), NOW))
    [letter] = by["dead_letters"]
    assert DeadLetter.decode(letter.value).error_kind == "unauthorized"
    assert by["watchlist"] == [] and by["audit"] == []
    old = cmd("STATUS", None, issued_at=NOW - 10 * 86_400_000)  # replayed after an offset reset
    assert core.on_command(source(old, signed(old), offset=8), NOW) == []


def test_a_checkout_with_an_id_the_bot_sends_none_such_is_failed_without_copying_it(core: WatchlistCore) -> None:
    bad = cmd("CHECKOUT", "x/../Q2XX-VICTIM-0001")
    by = topics(core.on_command(source(bad, signed(bad)), NOW))
    [audit], [letter] = by["audit"], by["dead_letters"]
    event = AuditEvent.decode(audit.value)
    assert (event.action, event.outcome, event.transaction_id) == ("INSPECT", "FAILED", None)
    assert DeadLetter.decode(letter.value).error_kind == "invalid_id"


def test_without_a_signing_key_a_checkout_is_audited_under_its_offset_as_unverified(tmp_path) -> None:
    """The bot runs ``checkout`` without a key too (it changes no watchlist): its picture is audited all the same, but
    nothing says who asked, so under the record's offset (a claimed id must not mark a real command done)."""
    core = WatchlistCore(Settings(stack_dir=tmp_path, webex=webex(command_signing_key=None)), engine=_ENGINE)
    outs = core.on_command(source(cmd("CHECKOUT", "tx-1"), offset=9), NOW)
    [audit] = topics(outs)["audit"]
    event = AuditEvent.decode(audit.value)
    assert (event.audit_id, event.action, event.outcome) == ("unverified:commands:0:9", "INSPECT", "DONE")
    assert event.actor == UNVERIFIED_ACTOR and event.details["claimed_actor"] == "guard@store.test"
    assert event.transaction_id == "tx-1" and event.command_id is None
    assert core.on_command(source(cmd("CHECKOUT", "tx-1"), offset=9), NOW) == []


def test_commands_are_timed_by_the_broker_so_a_replay_cannot_be_stamped_fresh() -> None:
    """Freshness is the signed issued_at against the record's time: with the producer's own CreateTime, whoever can
    write ``commands`` re-sent an old signed command with a new timestamp and it was applied again. The broker's
    time is set on the topic, also where it exists already (``enforced``; the AWS template is generated from it)."""
    from schemas.topics import COMMANDS

    assert COMMANDS.config["message.timestamp.type"] == "LogAppendTime"
    assert "message.timestamp.type" in COMMANDS.enforced
