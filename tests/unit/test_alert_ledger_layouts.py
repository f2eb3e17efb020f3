"""A ledger file written by an earlier alert sender is migrated at open, not met by queries on columns it lacks: the
layout changed (``posts.event_time`` -> ``alert_ms``, ``forgets.until_ms``, ``dead_letters``) without a version, and
an upgraded sender crashed on the old file or lost its de-duplication. The CREATE statements below are those each
earlier sender ran (git history of sinks/alerts/sender.py)."""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from sinks.alerts.erase import FORGET_GRACE_MS
from sinks.alerts.ledger_schema import LEDGER_VERSION, LedgerLayoutError, columns
from sinks.alerts.sender import Ledger

DELIVERIES = (
    "CREATE TABLE IF NOT EXISTS deliveries (alert_id TEXT NOT NULL, channel TEXT NOT NULL, "
    "state TEXT NOT NULL, at_ms INTEGER NOT NULL, detail TEXT, PRIMARY KEY (alert_id, channel))"
)
POSTS_EVENT_TIME = (
    "CREATE TABLE IF NOT EXISTS posts (message_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, "
    "channel TEXT NOT NULL, subject_id TEXT, transaction_id TEXT, event_time INTEGER, "
    "posted_ms INTEGER NOT NULL)"
)
POSTS_ALERT_MS = POSTS_EVENT_TIME.replace("event_time", "alert_ms")
POSTS_INDEXES = tuple(
    f"CREATE INDEX IF NOT EXISTS posts_{c} ON posts ({c})" for c in ("subject_id", "transaction_id", "posted_ms")
)
FORGETS_AT = (
    "CREATE TABLE IF NOT EXISTS forgets (audit_id TEXT PRIMARY KEY, subject_id TEXT, transaction_id TEXT, "
    "at_ms INTEGER NOT NULL)"
)
FORGETS_UNTIL = FORGETS_AT.replace("at_ms INTEGER NOT NULL)", "at_ms INTEGER NOT NULL, until_ms INTEGER NOT NULL)")
DEAD_LETTERS = (
    "CREATE TABLE IF NOT EXISTS dead_letters (position TEXT PRIMARY KEY, alert_id TEXT, "
    "error_kind TEXT NOT NULL, at_ms INTEGER NOT NULL)"
)
AT_MS_INDEXES = tuple(f"CREATE INDEX IF NOT EXISTS {t}_at_ms ON {t} (at_ms)" for t in ("deliveries", "dead_letters"))

LAYOUTS = {
    "2026-11-22 deliveries only": (DELIVERIES,),
    "2026-12-05 posts.event_time, forgets without until_ms": (DELIVERIES, POSTS_EVENT_TIME, FORGETS_AT),
    "2026-12-05 posts.alert_ms, forgets without until_ms": (DELIVERIES, POSTS_ALERT_MS, *POSTS_INDEXES, FORGETS_AT),
    "2026-12-05 forgets.until_ms": (DELIVERIES, POSTS_ALERT_MS, *POSTS_INDEXES, FORGETS_UNTIL),
    "2026-12-07 dead_letters": (DELIVERIES, POSTS_ALERT_MS, *POSTS_INDEXES, FORGETS_UNTIL, DEAD_LETTERS),
    "2026-12-07 at_ms indexes": (
        DELIVERIES,
        POSTS_ALERT_MS,
        *POSTS_INDEXES,
        FORGETS_UNTIL,
        DEAD_LETTERS,
        *AT_MS_INDEXES,
    ),
}
NOW = 1_800_000_000_000


def written_by(path: Path, statements: tuple[str, ...]) -> None:
    """A ledger as an earlier sender left it: its tables, a delivery, and (where its layout had them) a post of an
    alert about subj-1 made at NOW - 1000 and a forget of subj-1 at NOW."""
    with closing(sqlite3.connect(path)) as db, db:
        for sql in statements:
            db.execute(sql)
        db.execute("INSERT INTO deliveries VALUES ('alert-1', 'webex', 'sent', ?, 'm-1')", (NOW,))
        tables = columns(db)
        if "posts" in tables:
            db.execute(
                "INSERT INTO posts VALUES ('m-1', 'alert-1', 'webex', 'subj-1', 'tx-1', ?, ?)", (NOW - 1000, NOW)
            )
        if "forgets" in tables:
            forget: tuple[object, ...] = ("audit-1", "subj-1", None, NOW)
            if "until_ms" in tables["forgets"]:
                forget += (NOW + FORGET_GRACE_MS,)
            db.execute(f"INSERT INTO forgets VALUES ({', '.join('?' * len(forget))})", forget)


def fresh_columns(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    with closing(Ledger(tmp_path / "fresh.sqlite3")):
        pass
    with closing(sqlite3.connect(tmp_path / "fresh.sqlite3")) as db:
        return columns(db)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_ledger_of_each_earlier_layout_is_migrated_at_open_and_keeps_what_it_recorded(
    tmp_path: Path, layout: str
) -> None:
    path = tmp_path / "ledger.sqlite3"
    written_by(path, LAYOUTS[layout])

    with closing(Ledger(path)) as ledger:
        assert ledger.state("alert-1", "webex") == "sent"  # not sent again
        if FORGETS_AT in LAYOUTS[layout] or FORGETS_UNTIL in LAYOUTS[layout]:
            # the forget recorded before still erases the subject's message, and a new alert of it is withheld
            assert ledger.due_posts(NOW, None) == {"m-1": ("webex", "subj-1")}
            assert ledger.forgotten({"subject_id": "subj-1"}, NOW) == "subj-1"
        ledger.mark_dead_lettered("alerts:0:7", "alert-2", "delivery_failed")
        ledger.record_forgets([("audit-2", "subj-2", None, NOW)])
        ledger.mark_sent("alert-3", "webex", "m-3", ("m-3",), {"subject_id": "subj-2"}, NOW)
        assert ledger.dead_lettered(["alerts:0:7"]) == {"alerts:0:7"}
        assert "m-3" in ledger.due_posts(NOW, None)

    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LEDGER_VERSION
        assert columns(db) == fresh_columns(tmp_path)


def test_a_version_1_ledger_gains_the_refusal_replies_table_and_keeps_what_it_recorded(tmp_path: Path) -> None:
    """Version 1 (2026-12-07's layout, versioned) had no ``notices``: the replies to refused Webex verdicts."""
    from sinks.alerts.notices import Notice

    path = tmp_path / "ledger.sqlite3"
    written_by(path, LAYOUTS["2026-12-07 at_ms indexes"])
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 1")
    with closing(Ledger(path)) as ledger:
        assert ledger.state("alert-1", "webex") == "sent"
        ledger.record_notices([Notice("case:m1", "room-1", "guard@x.test", "your `dismiss` ...", NOW)])
        assert [n.notice_id for n in ledger.pending_notices(10)] == ["case:m1"]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LEDGER_VERSION == 2
        assert columns(db) == fresh_columns(tmp_path)


def test_a_forget_migrated_from_before_until_ms_keeps_the_grace_it_had(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    written_by(path, LAYOUTS["2026-12-05 posts.alert_ms, forgets without until_ms"])
    with closing(Ledger(path)):
        pass
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT at_ms, until_ms FROM forgets").fetchall() == [(NOW, NOW + FORGET_GRACE_MS)]


def test_a_ledger_of_a_layout_no_sender_wrote_is_refused_naming_the_file_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(DELIVERIES)
        db.execute("CREATE TABLE posts (message_id TEXT PRIMARY KEY, room TEXT)")
    before = path.read_bytes()

    with pytest.raises(LedgerLayoutError, match=f"{re.escape(str(path))}.*posts \\(message_id, room\\)"):
        Ledger(path)
    assert path.read_bytes() == before
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0


def test_a_ledger_written_by_a_newer_sender_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {LEDGER_VERSION + 1}")
    with pytest.raises(LedgerLayoutError, match=f"{re.escape(str(path))} has version {LEDGER_VERSION + 1}"):
        Ledger(path)


def test_a_new_ledger_gets_the_current_version(tmp_path: Path) -> None:
    with closing(Ledger(tmp_path / "ledger.sqlite3")):
        pass
    with closing(sqlite3.connect(tmp_path / "ledger.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LEDGER_VERSION


def beside(path: Path) -> set[str]:
    """The WAL files SQLite keeps beside ``path`` while a WAL connection is open."""
    return {p.name for p in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")) if p.exists()}


def test_a_ledger_with_the_rollback_journal_keeps_what_it_recorded_across_a_reopen_and_writes_no_wal(
    tmp_path: Path,
) -> None:
    """On ECS the ledger lives on EFS, a network file system, where SQLite's WAL (an index in memory shared through
    the ``-shm`` file) is not safe: ``CG_ALERTS__LEDGER_JOURNAL_MODE=delete`` keeps it in the rollback journal, each
    commit synced in full, and a replaced task finds every row."""
    path = tmp_path / "ledger.sqlite3"
    with closing(Ledger(path, journal_mode="delete")) as ledger:
        ledger.mark_sent("alert-1", "webex", "m-1", ("m-1",), {"subject_id": "subj-1"}, NOW - 1000)
        ledger.mark_sending("alert-2", "email")
        ledger.mark_dead_lettered("alerts:0:7", "alert-3", "delivery_failed")
        ledger.record_forgets([("audit-1", "subj-1", None, NOW)])
        assert beside(path) == set()
        with ledger._reading() as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with closing(Ledger(path, journal_mode="delete")) as reopened:
        assert reopened.states(["alert-1", "alert-2"]) == {
            ("alert-1", "webex"): "sent",
            ("alert-2", "email"): "sending",
        }
        assert reopened.dead_lettered(["alerts:0:7"]) == {"alerts:0:7"}
        assert reopened.due_posts(NOW, None) == {"m-1": ("webex", "subj-1")}
        assert beside(path) == set()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_ledger_of_each_earlier_layout_is_migrated_with_the_rollback_journal_too(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "ledger.sqlite3"
    written_by(path, LAYOUTS[layout])
    with closing(Ledger(path, journal_mode="delete")) as ledger:
        assert ledger.state("alert-1", "webex") == "sent"
        ledger.mark_sent("alert-3", "webex", "m-3")
        assert beside(path) == set()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LEDGER_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert columns(db) == fresh_columns(tmp_path)


def test_a_wal_ledger_moved_to_network_storage_switches_to_the_rollback_journal_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    """A ledger a sender wrote on a local disk (WAL, the default), copied to the file system a task mounts."""
    path = tmp_path / "ledger.sqlite3"
    with closing(Ledger(path)) as local:
        local.mark_sent("alert-1", "webex", "m-1")
        assert beside(path)  # WAL, as before
    with closing(Ledger(path, journal_mode="delete")) as ledger:
        assert ledger.state("alert-1", "webex") == "sent"
        ledger.mark_sent("alert-2", "webex", "m-2")
        assert beside(path) == set()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_the_ledger_takes_its_journal_mode_from_the_settings(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from infra.settings import AlertSettings, Settings

    assert AlertSettings().ledger_journal_mode == "wal"  # a local disk, as before
    assert AlertSettings(ledger_journal_mode=" DELETE ").ledger_journal_mode == "delete"  # SQLite's spelling
    with pytest.raises(ValidationError, match="ledger_journal_mode"):
        AlertSettings(ledger_journal_mode="memory")  # loses committed rows with the process
    path = tmp_path / "ledger.sqlite3"
    settings = Settings(alerts=AlertSettings(ledger_path=path, ledger_journal_mode="delete"))
    with closing(Ledger.from_settings(settings)) as ledger:
        ledger.mark_sent("alert-1", "webex", "m-1")
        assert beside(path) == set()


def test_opening_a_current_ledger_does_not_wait_for_another_processs_write(tmp_path: Path) -> None:
    """Every open took the write lock to look at the version, so a restarted sender waited up to SQLite's busy
    timeout (30 s) behind another process's write though nothing was to migrate; a current file is only read."""
    path = tmp_path / "ledger.sqlite3"
    with closing(Ledger(path)):
        pass
    opened: list[float] = []

    def open_it() -> None:
        started = time.monotonic()
        with closing(Ledger(path)) as ledger:
            opened.append(time.monotonic() - started)
            assert ledger.state("alert-1", "webex") is None

    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process writing
        other.execute("INSERT INTO deliveries VALUES ('alert-9', 'webex', 'sending', 1, NULL)")
        opening = threading.Thread(target=open_it, daemon=True)
        opening.start()
        opening.join(5)
        other.rollback()
    opening.join(35)
    assert opened and opened[0] < 5, f"the open waited {opened}s for the other write"


def test_a_current_ledger_missing_an_index_gets_it_back_at_open(tmp_path: Path) -> None:
    """The read-only open is taken only when nothing is to do: an index missing still goes through the migration."""
    path = tmp_path / "ledger.sqlite3"
    with closing(Ledger(path)):
        pass
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP INDEX posts_posted_ms")
    with closing(Ledger(path)):
        pass
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'posts_posted_ms'").fetchone() == (1,)
