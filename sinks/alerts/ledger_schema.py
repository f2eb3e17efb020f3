"""The layout of the alert sender's delivery ledger (a SQLite file), its version and its migrations.

The ledger's tables changed without a version: ``posts.event_time`` became ``alert_ms`` and ``forgets`` gained
``until_ms`` (2026-12-05), ``dead_letters`` came on 2026-12-07. The code after such a change met a file written
before it, its queries failed on the old columns, and an upgraded sender crashed or lost its de-duplication. The
file now carries :data:`LEDGER_VERSION` in ``PRAGMA user_version``; :func:`prepare` brings a file of any earlier
layout (all unversioned, told apart by their columns) to the current one in one transaction, and refuses one it does
not know, naming the file: the ledger stops duplicate alerts and drives the Webex erasure of forgotten subjects, so it
is never recreated empty behind the operator's back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from schemas.errors import CheckoutGuardError
from sinks.alerts.erase import FORGET_GRACE_MS

LEDGER_VERSION = 2
"""``PRAGMA user_version`` of the layout below. Raise it with each change and add that change's step to
:func:`_migrate`; version 0 is every file written before the ledger had a version, 1 the one before ``notices``."""

TABLES: dict[str, str] = {
    "deliveries": (
        "CREATE TABLE deliveries (alert_id TEXT NOT NULL, channel TEXT NOT NULL, "
        "state TEXT NOT NULL, at_ms INTEGER NOT NULL, detail TEXT, PRIMARY KEY (alert_id, channel))"
    ),
    # Messages an erasable channel posted (their ids), and the subjects forgotten since: see sinks/alerts/erase.py.
    "posts": (
        "CREATE TABLE posts (message_id TEXT PRIMARY KEY, alert_id TEXT NOT NULL, "
        "channel TEXT NOT NULL, subject_id TEXT, transaction_id TEXT, alert_ms INTEGER, "
        "posted_ms INTEGER NOT NULL)"
    ),
    "forgets": (
        "CREATE TABLE forgets (audit_id TEXT PRIMARY KEY, subject_id TEXT, transaction_id TEXT, "
        "at_ms INTEGER NOT NULL, until_ms INTEGER NOT NULL)"
    ),
    # Records whose dead letter Kafka confirmed, by position: a re-read after a crash before the offset commit
    # is skipped, while a re-drive (the same alert at a new offset) is sent again.
    "dead_letters": (
        "CREATE TABLE dead_letters (position TEXT PRIMARY KEY, alert_id TEXT, "
        "error_kind TEXT NOT NULL, at_ms INTEGER NOT NULL)"
    ),
    # Webex replies owed for verdicts the case service refused, by its audit id: see sinks/alerts/notices.py.
    "notices": (
        "CREATE TABLE notices (notice_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, person TEXT NOT NULL, "
        "text TEXT NOT NULL, state TEXT NOT NULL, at_ms INTEGER NOT NULL, detail TEXT)"
    ),
}
"""The current layout, table by table."""

INDEXES: dict[str, str] = {
    **{f"posts_{c}": f"posts ({c})" for c in ("subject_id", "transaction_id", "posted_ms")},
    **{f"{t}_at_ms": f"{t} (at_ms)" for t in ("deliveries", "dead_letters", "notices")},
    "notices_state": "notices (state, at_ms)",
}
"""Index name -> what it indexes: each sweep's and :meth:`sinks.alerts.sender.Ledger.prune`'s lookups, no table
scans."""

CURRENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "deliveries": ("alert_id", "channel", "state", "at_ms", "detail"),
    "posts": ("message_id", "alert_id", "channel", "subject_id", "transaction_id", "alert_ms", "posted_ms"),
    "forgets": ("audit_id", "subject_id", "transaction_id", "at_ms", "until_ms"),
    "dead_letters": ("position", "alert_id", "error_kind", "at_ms"),
    "notices": ("notice_id", "room_id", "person", "text", "state", "at_ms", "detail"),
}

UNVERSIONED_COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "deliveries": (CURRENT_COLUMNS["deliveries"],),
    "posts": (
        ("message_id", "alert_id", "channel", "subject_id", "transaction_id", "event_time", "posted_ms"),
        CURRENT_COLUMNS["posts"],
    ),
    "forgets": (("audit_id", "subject_id", "transaction_id", "at_ms"), CURRENT_COLUMNS["forgets"]),
    "dead_letters": (CURRENT_COLUMNS["dead_letters"],),
}
"""Every table's columns in the files written before the version (a table a file lacks came later): the first ledger
(2026-11-22: ``deliveries``), the posts and forgets (2026-12-05: ``posts.event_time``, ``forgets`` without
``until_ms``), ``alert_ms`` (the same day), ``until_ms`` (the same day), ``dead_letters`` (2026-12-07)."""


class LedgerLayoutError(CheckoutGuardError, RuntimeError):
    """A ledger file this code cannot read: newer than it, or a layout it never wrote. Not recreated (see module)."""


def prepare(db: sqlite3.Connection, path: Path) -> None:
    """Bring the ledger ``db`` (at ``path``, for the error) to :data:`LEDGER_VERSION`: create a new one, migrate
    an earlier one, in one transaction (a crash leaves the file as it was); :class:`LedgerLayoutError` for a file of
    a newer version or of a layout it does not know. ``db`` is in autocommit mode (``isolation_level=None``).

    A current file (the version and every index there) is only read: the write lock is taken only to change the file.
    Before, every open took it, so an open of a current ledger waited up to SQLite's busy timeout (30 s) behind
    another process's write, for nothing."""
    if _is_current(db):
        return
    db.execute("BEGIN IMMEDIATE")  # two processes opening one file: the second sees the first's migration
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > LEDGER_VERSION:
            raise LedgerLayoutError(
                f"the delivery ledger {path} has version {version}, written by a newer alert sender than this one "
                f"(version {LEDGER_VERSION}): run that version, or move the file aside knowing that alerts it "
                "recorded are sent again and its posts are no longer erased at a forget"
            )
        if version < LEDGER_VERSION:
            _migrate(db, path, version)
        for name, on in INDEXES.items():
            db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")
        db.execute(f"PRAGMA user_version = {LEDGER_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _is_current(db: sqlite3.Connection) -> bool:
    """Whether ``db`` is at :data:`LEDGER_VERSION` with every index of :data:`INDEXES`, read without a write lock
    (a reader waits on no writer). Anything else goes through :func:`prepare`'s locked path, which reads the
    version again under the lock (another process may have migrated it meanwhile) and refuses a newer file."""
    if db.execute("PRAGMA user_version").fetchone()[0] != LEDGER_VERSION:
        return False
    found = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    return found >= INDEXES.keys()


def columns(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    """Table -> its column names, in order, of every table of ``db`` but SQLite's own."""
    names = [
        r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    ]
    return {t: tuple(r[1] for r in db.execute(f"PRAGMA table_info({_quoted(t)})")) for t in names}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _migrate(db: sqlite3.Connection, path: Path, version: int) -> None:
    """Each step from ``version`` up, inside :func:`prepare`'s transaction. An unversioned file gets every table it
    lacks of the current layout (``notices`` among them); version 1 gains ``notices``."""
    if version == 0:
        _from_unversioned(db, path)
    elif version == 1:
        db.execute(TABLES["notices"])


def _from_unversioned(db: sqlite3.Connection, path: Path) -> None:
    """A file without a version: new (no table), or written by a sender before the version, told by its columns.
    ``posts.event_time`` (the alert's event time) becomes ``alert_ms``, which it stood for (the forget's query falls
    back to the post's time without it); a forget gains ``until_ms`` as :meth:`record_forgets` sets it (its time
    plus :data:`FORGET_GRACE_MS`; an enrolment after it may cut that short, as one to come still does)."""
    found = columns(db)
    unknown = {t: c for t, c in found.items() if c not in UNVERSIONED_COLUMNS.get(t, ())}
    if unknown:
        described = "; ".join(f"{t} ({', '.join(c)})" for t, c in sorted(unknown.items()))
        raise LedgerLayoutError(
            f"the delivery ledger {path} has a layout no alert sender wrote: {described}; is "
            "CG_ALERTS__LEDGER_PATH the ledger's file? Not changed; move it aside only knowing that alerts it "
            "recorded are then sent again and its posts are no longer erased at a forget"
        )
    if found.get("posts") == UNVERSIONED_COLUMNS["posts"][0]:
        db.execute("ALTER TABLE posts RENAME COLUMN event_time TO alert_ms")
    if found.get("forgets") == UNVERSIONED_COLUMNS["forgets"][0]:
        db.execute("ALTER TABLE forgets RENAME TO forgets_unversioned")
        db.execute(TABLES["forgets"])
        db.execute(
            "INSERT INTO forgets SELECT audit_id, subject_id, transaction_id, at_ms, at_ms + ? "
            "FROM forgets_unversioned",
            (FORGET_GRACE_MS,),
        )
        db.execute("DROP TABLE forgets_unversioned")
    for table, sql in TABLES.items():
        if table not in found:
            db.execute(sql)
