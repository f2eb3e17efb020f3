"""Publishing :class:`~schemas.records.BotCommand`\\ s to ``commands``: one producer for every place a person
issues one (the Webex bot, the dashboard's case page), each command confirmed by Kafka before the caller
says it was taken, and signed (:mod:`infra.command_auth`) when a key is given."""

from __future__ import annotations

from confluent_kafka import KafkaError, Message

from infra.clients import kafka as kafka_clients
from infra.command_auth import SIGNATURE_HEADER, sign_command
from infra.settings import Settings
from schemas.errors import CheckoutGuardError
from schemas.records import BotCommand
from schemas.topics import COMMANDS

Headers = list[tuple[str, bytes]]
CONFIRM_TIMEOUT_S = 10.0


class CommandPublishError(CheckoutGuardError, RuntimeError):
    """Kafka did not confirm the command (unreachable, or it refused the record)."""


class KafkaCommandPublisher:
    """Produces BotCommands to ``commands`` (key = command id, so a redelivered one is the same command) and
    waits until Kafka confirmed each one."""

    def __init__(self, settings: Settings) -> None:
        self.topic = COMMANDS.full_name(settings.kafka.topic_prefix)
        self._producer = kafka_clients.producer(settings, kafka_clients.IDEMPOTENT, linger_ms=0)

    def __call__(self, command: BotCommand, headers: Headers | None = None) -> None:
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        self._producer.produce(
            self.topic,
            key=command.command_id.encode(),
            value=command.encode(),
            headers=list(headers or []),
            on_delivery=on_delivery,
        )
        if self._producer.flush(CONFIRM_TIMEOUT_S) > 0:
            raise CommandPublishError(f"command not confirmed by Kafka within {CONFIRM_TIMEOUT_S:.0f} s")
        if errors:
            raise CommandPublishError(f"command not delivered: {errors[0].str()}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait up to ``timeout_s`` for Kafka to take what is still queued (at a stop: the time its deadline leaves)."""
        self._producer.flush(timeout_s)


def signed_headers(command: BotCommand, signing_key: str | None) -> Headers:
    """The signature header of ``command`` under ``signing_key`` (none without a key: the case and
    watchlist services then refuse the command, and say so in the audit)."""
    return [(SIGNATURE_HEADER, sign_command(command, signing_key))] if signing_key else []
