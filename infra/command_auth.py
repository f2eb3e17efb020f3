"""Signed bot commands: the Webex bot signs every ``BotCommand`` it publishes, the watchlist service
applies only commands that verify.

``commands`` may be writable by more than the bot (any producer with topic access), so the signature,
not the topic, is what makes a command the bot's. Both sides share ``CG_WEBEX__COMMAND_SIGNING_KEY``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any

from infra.settings import WebexSettings
from schemas.errors import InvalidRecord
from schemas.identifiers import check_actor, check_command_id
from schemas.records import BotCommand

SIGNATURE_HEADER = "cg-signature"
"""Kafka header of a signed BotCommand. A header, not a record field: the schema (and its fingerprint)
stays as it is, and the signature covers the command's fields rather than one encoding of them."""
SIGNATURE_DOMAIN = b"checkout-guard.bot-command.v1\n"
"""Prefix of the signed bytes, so a signature made for anything else never verifies a command."""
MAX_CLOCK_SKEW_MS = 60_000
"""How far in the future ``issued_at`` may be (the bot's and this service's clocks differ a little)."""


def command_signing_input(cmd: BotCommand) -> bytes:
    """The bytes signed: every field in a fixed order as a JSON array, so no field can run into the next
    and ``issued_at`` is covered (a copied command goes stale)."""
    fields = [cmd.command_id, cmd.issued_at, cmd.verb, cmd.argument, cmd.actor, cmd.room_id, cmd.source]
    return SIGNATURE_DOMAIN + json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode()


def sign_command(cmd: BotCommand, key: str) -> bytes:
    """The :data:`SIGNATURE_HEADER` value for ``cmd``: ``v1=`` + hex HMAC-SHA256 under ``key``."""
    return b"v1=" + hmac.new(key.encode(), command_signing_input(cmd), hashlib.sha256).hexdigest().encode()


def authenticate_command(
    cmd: BotCommand, headers: Sequence[tuple[str, Any]], webex: WebexSettings, now_ms: int, fresh: bool = True
) -> None:
    """Return when ``cmd`` is signed with the configured key, fresh (unless ``fresh`` is false: a record
    of a question already answered may be old), and from an allow-listed issuer; else raise
    :class:`InvalidRecord` ``unauthorized`` (the reason says which check failed). A signed command whose id is no
    command id (:func:`schemas.identifiers.check_command_id`: over 512 characters, controls, spaces) is ``invalid_id``:
    the services name its audit event by that id and copy it in, so each refuses it as they refuse an unsigned one
    (audited under its offset, the claimed id cut short, and dead-lettered). So is one whose actor is not 1 to 254
    printable characters (:func:`schemas.identifiers.check_actor`): the actor is copied into the audit event too."""
    key = webex.command_signing_key.get_secret_value() if webex.command_signing_key else ""
    if not key:
        raise InvalidRecord("unauthorized", "no command signing key configured (CG_WEBEX__COMMAND_SIGNING_KEY)")
    signatures = [value for name, value in headers if name == SIGNATURE_HEADER]
    if len(signatures) != 1 or not isinstance(signatures[0], bytes):
        raise InvalidRecord("unauthorized", f"command carries {len(signatures)} signatures, not one")
    if not hmac.compare_digest(sign_command(cmd, key), signatures[0]):
        raise InvalidRecord("unauthorized", "signature does not match")
    check_command_id(cmd.command_id)
    check_actor(cmd.actor)
    age_ms = now_ms - cmd.issued_at
    if fresh and (age_ms > webex.command_max_age_s * 1000 or age_ms < -MAX_CLOCK_SKEW_MS):
        raise InvalidRecord("unauthorized", f"issued {age_ms // 1000} s ago, outside the accepted window")
    if not webex.is_allowed(cmd.room_id, cmd.actor):
        raise InvalidRecord("unauthorized", "issuer is not on the allow-list")


def signed_by_bot(cmd: BotCommand, headers: Sequence[tuple[str, Any]], webex: WebexSettings) -> bool:
    """Whether ``cmd`` carries one signature and it verifies under the configured key, whatever else
    :func:`authenticate_command` refused it for (its age, the allow-list): its fields, its room among them, are then
    the bot's, not a claim."""
    key = webex.command_signing_key.get_secret_value() if webex.command_signing_key else ""
    signatures = [value for name, value in headers if name == SIGNATURE_HEADER]
    if not key or len(signatures) != 1 or not isinstance(signatures[0], bytes):
        return False
    return hmac.compare_digest(sign_command(cmd, key), signatures[0])


CLAIM_MAX = 256
"""How much of each claim an unverified command's audit event keeps (:func:`claimed_details`)."""


def claimed_details(cmd: BotCommand) -> dict[str, str]:
    """What a command that could not be verified (unsigned, refused, or no key to check it with) claims -- its actor,
    command id and room, each cut to :data:`CLAIM_MAX` characters -- as its audit event's ``details``: claims only,
    never its actor or id."""
    claims = {"claimed_actor": cmd.actor, "claimed_command_id": cmd.command_id, "claimed_room_id": cmd.room_id}
    return {name: value[:CLAIM_MAX] for name, value in claims.items() if value}
