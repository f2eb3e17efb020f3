"""The alert sender's delivery ledger keeps a row per alert and channel only while a record of that alert can still
be read: before, its deliveries and dead letters were never deleted and the file grew for as long as the stack ran."""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path

from infra.clock import now_ms
from infra.settings import AlertSettings, KafkaSettings, Settings
from schemas.topics import DAY_MS, HOUR_MS
from sinks.alerts.sender import AlertSender, Ledger, ledger_keep_ms


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


def test_the_sender_prunes_deliveries_and_dead_letters_past_that_time_and_keeps_the_rest(tmp_path: Path) -> None:
    settings = Settings(stack_dir=tmp_path, alerts=AlertSettings(channels="email"))
    with closing(Ledger(tmp_path / "ledger.sqlite3")) as ledger:
        sender = AlertSender(settings, channels=[Quiet()], ledger=ledger, image_loader=lambda ref: b"")
        bound = now_ms() - ledger_keep_ms(settings)
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
