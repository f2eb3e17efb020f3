"""The alert sender's delivery ledger keeps a row per alert and channel only while a record of that alert can still
be read: before, its deliveries and dead letters were never deleted and the file grew for as long as the stack ran."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from infra.clients import kafka as kafka_clients
from infra.clock import now_ms
from infra.settings import AlertSettings, KafkaSettings, Settings
from schemas.topics import DAY_MS, HOUR_MS
from sinks.alerts.sender import AlertSender, Ledger, ledger_keep_ms, parse_retentions


class Quiet:
    name = "email"

    def close(self) -> None: ...


def rows(ledger: Ledger, table: str) -> list[str]:
    with ledger._reading() as db:
        return sorted(
            r[0] for r in db.execute(f"SELECT {'alert_id' if table == 'deliveries' else 'position'} FROM {table}")
        )


def test_the_ledger_is_kept_while_the_alerts_and_a_redrive_or_a_new_decision_of_them_can_be_read() -> None:
    # alerts: 30 d + 7 d of segment; again later: transactions' 7 d + 7 d of segment (above dead letters' 7 d + 1 h)
    assert ledger_keep_ms(Settings()) == (30 + 7 + 14 + 1) * DAY_MS
    longer = Settings(kafka=KafkaSettings(dead_letter_retention_days=30))
    assert ledger_keep_ms(longer) == (30 + 7 + 30 + 1) * DAY_MS + HOUR_MS


def kafka_has(**retention_days: float) -> Any:
    """A reader of the topics' configs (``AlertSender(topic_configs=...)``) answering as Kafka would: each topic's
    ``retention.ms`` (``retention_days``, by topic name; else the code's) and the default 7-day ``segment.ms``."""
    code = {"alerts": 30, "transactions": 7, "dead_letters": 7}

    def read(topics: Sequence[str]) -> dict[str, dict[str, str]]:
        days = {t: retention_days.get(t, code[t]) for t in topics}
        return {
            t: {"retention.ms": str(int(d * DAY_MS)) if d >= 0 else "-1", "segment.ms": str(7 * DAY_MS)}
            for t, d in days.items()
        }

    return read


def test_the_sender_prunes_deliveries_and_dead_letters_past_that_time_and_keeps_the_rest(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="email"))
    with closing(Ledger(tmp_path / "ledger.sqlite3")) as ledger:
        sender = AlertSender(
            settings, channels=[Quiet()], ledger=ledger, image_loader=lambda ref: b"", topic_configs=kafka_has()
        )
        keep = ledger_keep_ms(settings)
        assert keep is not None
        bound = now_ms() - keep
        for alert_id, at in (("alert-old", bound - HOUR_MS), ("alert-new", bound + HOUR_MS)):
            ledger._write(
                ("INSERT INTO deliveries VALUES (?, 'email', 'sent', ?, NULL)", (alert_id, at)),
                (
                    "INSERT INTO dead_letters VALUES (?, ?, 'delivery_failed', ?)",
                    (f"alerts:0:{alert_id}", alert_id, at),
                ),
                ("INSERT INTO posts VALUES (?, ?, 'webex', NULL, NULL, ?, ?)", (f"m-{alert_id}", alert_id, at, at)),
            )

        pruning = sender.prune_ledger()
        assert pruning is not None  # on a thread of its own: a locked database does not hold up the sender's loop
        pruning.join(10)

        assert rows(ledger, "deliveries") == ["alert-new"] and ledger.state("alert-old", "email") is None
        assert rows(ledger, "dead_letters") == ["alerts:0:alert-new"]
        assert len(ledger.due_posts(now_ms(), None)) == 0  # the eraser's posts are its own: none dropped here
        with ledger._reading() as db:
            assert db.execute("SELECT count(*) FROM posts").fetchone()[0] == 2


def test_a_prune_deletes_in_small_commits_and_leaves_what_is_over_its_share_to_the_next(tmp_path: Path) -> None:
    with closing(Ledger(tmp_path / "ledger.sqlite3")) as ledger:
        for n in range(5):
            ledger._write(("INSERT INTO deliveries VALUES (?, 'email', 'sent', ?, NULL)", (f"alert-{n}", n)))

        assert ledger.prune(100, batch=2, max_batches=2) == 4
        assert len(rows(ledger, "deliveries")) == 1
        assert ledger.prune(100, batch=2, max_batches=2) == 1
        assert ledger.prune(100, batch=2, max_batches=2) == 0
        assert rows(ledger, "deliveries") == []
        ledger._write(("INSERT INTO deliveries VALUES ('alert-9', 'email', 'sent', 1, NULL)", ()))
        stopped = threading.Event()
        stopped.set()
        assert ledger.prune(100, stop=stopped) == 0  # the sender stopping: the rest at its next start


def aged_rows(ledger: Ledger, **days_ago: float) -> None:
    """A delivery of each alert id recorded that many days ago."""
    for alert_id, days in days_ago.items():
        at = now_ms() - int(days * DAY_MS)
        ledger._write(("INSERT INTO deliveries VALUES (?, 'email', 'sent', ?, NULL)", (alert_id.replace("_", "-"), at)))


def pruned_with(tmp_path: Path, ledger: Ledger, topic_configs: Any) -> list[str]:
    """What the sender's prune (at start) leaves of the ledger's deliveries."""
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="email"))
    channels: list[Any] = [Quiet()]
    sender = AlertSender(
        settings, channels=channels, ledger=ledger, image_loader=lambda ref: b"", topic_configs=topic_configs
    )
    pruning = sender.prune_ledger()
    assert pruning is not None
    pruning.join(10)
    return rows(ledger, "deliveries")


def test_an_alerts_retention_raised_in_kafka_keeps_the_ledger_rows_that_long_not_the_codes_52_days(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The prune's bound was the code's retentions: an operator who kept alerts 90 days (retention.ms on the topic)
    had the ledger forget after 52 days alerts that could still be read, and a re-read sent them again."""
    with closing(Ledger(tmp_path / "ledger.sqlite3")) as ledger, caplog.at_level(logging.INFO):
        aged_rows(ledger, alert_60d=60, alert_111d=111, alert_113d=113)
        # 90 d + 7 d of segment, then transactions' 7 d + 7 d of segment, plus a day: 112 days
        assert pruned_with(tmp_path, ledger, kafka_has(alerts=90)) == ["alert-111d", "alert-60d"]
    assert (
        "keeps its rows 112.0 days, by the retentions Kafka has for alerts, transactions, dead_letters" in caplog.text
    )


def test_an_alerts_topic_kept_for_ever_in_kafka_keeps_every_ledger_row() -> None:
    settings = Settings(kafka=KafkaSettings(topic_prefix="shop1."))
    forever = {"shop1.alerts": {"retention.ms": -1}}
    assert ledger_keep_ms(settings, forever) is None
    assert ledger_keep_ms(settings, {"alerts": {"retention.ms": -1}}) == 52 * DAY_MS  # another prefix's topic
    shorter = {"shop1.transactions": {"retention.ms": DAY_MS, "segment.ms": HOUR_MS}}  # the dead letters' 7 d + 1 h
    assert ledger_keep_ms(settings, shorter) == (30 + 7 + 7 + 1) * DAY_MS + HOUR_MS


def test_retentions_kafka_gives_no_number_for_are_not_read() -> None:
    topics = ["alerts", "transactions"]
    with pytest.raises(ValueError, match="no retention.ms of transactions"):
        parse_retentions({"alerts": {"retention.ms": "1"}}, topics)
    with pytest.raises(ValueError, match="alerts that is no number"):
        parse_retentions({"alerts": {"retention.ms": "soon"}, "transactions": {"retention.ms": "1"}}, topics)
    assert parse_retentions({t: {"retention.ms": "5", "segment.ms": "6"} for t in topics}, topics)["alerts"] == {
        "retention.ms": 5,
        "segment.ms": 6,
    }


def test_retentions_kafka_does_not_give_fall_back_to_the_codes_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def unreadable(topics: Sequence[str]) -> dict[str, dict[str, str]]:
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "not allowed: secret-word"))

    with closing(Ledger(tmp_path / "ledger.sqlite3")) as ledger, caplog.at_level(logging.WARNING):
        aged_rows(ledger, alert_51d=51, alert_53d=53)
        assert pruned_with(tmp_path, ledger, unreadable) == ["alert-51d"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "retention of alerts, transactions, dead_letters could not be read from Kafka" in warning
    assert "TOPIC_AUTHORIZATION_FAILED" in warning and "secret-word" not in warning
    assert "keeps its rows 52.0 days, by the code's retentions" in warning


def test_topic_configs_asks_kafka_for_the_topics_values_and_keeps_only_those_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[list[str], float]] = []

    class Admin:
        def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Future]:
            asked.append(([r.name for r in resources], request_timeout))
            out: dict[Any, Future] = {}
            for r in resources:
                future: Future = Future()
                entries = {"retention.ms": "7776000000", "segment.ms": "3600000", "cleanup.policy": "delete"}
                future.set_result({k: SimpleNamespace(value=v) for k, v in entries.items()})
                out[r] = future
            return out

        def poll(self, _timeout: float) -> int:
            return 0

    monkeypatch.setattr(kafka_clients, "admin", lambda *_a, **_k: Admin())
    got = kafka_clients.topic_configs(KafkaSettings(), ["alerts"], ("retention.ms", "segment.ms"), timeout_s=3)
    assert got == {"alerts": {"retention.ms": "7776000000", "segment.ms": "3600000"}}
    assert asked == [(["alerts"], 3)]
