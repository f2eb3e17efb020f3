"""The local SMTP stand-in keeps alert mails, snapshots attached, no longer than an alert snapshot is kept."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest

from infra.local.smtp import FileStore, duplicates, keep_purging, purge_mails, read_mails
from infra.settings import Settings

DAY_S = 86_400


def _mail(folder: Path, name: str, age_s: float) -> Path:
    path = folder / f"{name}.eml"
    path.write_bytes(b"Subject: alert\r\n\r\nsnapshot attached\r\n")
    accepted = time.time() - age_s
    os.utime(path, (accepted, accepted))
    return path


def test_mails_older_than_the_alert_snapshot_retention_are_deleted_and_younger_ones_kept(tmp_path: Path) -> None:
    keep_s = Settings().faces.alert_snapshot_retention_days * DAY_S
    old = _mail(tmp_path, "old", keep_s + 60)
    young = _mail(tmp_path, "young", keep_s - 60)
    assert purge_mails(tmp_path, keep_s) == 1
    assert not old.exists() and young.exists()


def test_duplicates_log_entries_older_than_the_mail_retention_are_pruned_and_newer_ones_kept(tmp_path: Path) -> None:
    """Before, the server appended a line per second copy for as long as it ran, and the file grew for ever."""
    keep_s = 2 * DAY_S
    now = time.time()
    (tmp_path / "duplicates.log").write_text(
        f"{int((now - keep_s - 60) * 1e9)} <old@checkout-guard>\n"
        "not a time <garbled@checkout-guard>\n"
        f"{int((now - keep_s + 60) * 1e9)} <young@checkout-guard>\n"
    )
    purge_mails(tmp_path, keep_s, now=now)
    assert duplicates(tmp_path) == ["<young@checkout-guard>"]


def test_the_running_server_purges_at_start_and_again_at_each_interval(tmp_path: Path) -> None:
    """Before, the stand-in kept every mail, and its snapshot, until the stack was reset."""
    keep_s = 2 * DAY_S
    first = _mail(tmp_path, "first", 3 * DAY_S)

    async def run() -> tuple[bool, bool]:
        stop = asyncio.Event()
        task = asyncio.create_task(keep_purging(tmp_path, keep_s, 0.05, stop))
        await asyncio.sleep(0.02)
        gone_at_start = not first.exists()
        later = _mail(tmp_path, "later", 3 * DAY_S)  # past its retention while the server runs
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(task, 2)
        return gone_at_start, not later.exists()

    assert asyncio.run(run()) == (True, True)


def test_the_stack_starts_the_server_with_the_alert_snapshot_retention_and_the_purge_interval(
    tmp_path: Path, monkeypatch
) -> None:
    import infra.stack as stack

    started: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(stack, "_base_env", lambda settings: {})
    monkeypatch.setattr(stack, "_spawn", lambda svc, paths, cmd, env, cwd: started.append((cmd, env)))
    settings = Settings(
        stack_dir=tmp_path, faces={"alert_snapshot_retention_days": 5, "retention_purge_interval_s": 60}
    )  # type: ignore[arg-type]
    stack._start_smtp(settings, stack.StackPaths.of(settings), stack.Endpoints.of(settings))
    [(cmd, env)] = started
    assert "--keep-days=5.0" in cmd and "--purge-every-s=60.0" in cmd
    assert env["CG_ENV_FILE"] == "", "the stack's settings are in the options: no .env the stack may not have read"


def test_the_server_run_on_its_own_reads_the_env_file_as_every_process_does(tmp_path: Path, monkeypatch) -> None:
    """It built ``Settings()`` from the environment alone: a retention or purge interval set in ``.env``
    (``CG_ENV_FILE``), which every other process reads, was ignored."""
    from infra.local import smtp
    from infra.settings import get_settings

    dotenv = tmp_path / "site.env"
    dotenv.write_text("CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS=3\nCG_FACES__RETENTION_PURGE_INTERVAL_S=7\n")
    for name in ("CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS", "CG_FACES__RETENTION_PURGE_INTERVAL_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CG_ENV_FILE", str(dotenv))
    served: list[tuple[float, float]] = []
    monkeypatch.setattr(
        smtp, "serve", lambda _h, _p, _d, keep_s, every_s, _latency_s=0.0: served.append((keep_s, every_s))
    )
    get_settings.cache_clear()
    try:
        smtp.main(mail_dir=tmp_path / "mail")
    finally:
        get_settings.cache_clear()
    assert served == [(3 * DAY_S, 7.0)]


def _kept(folder: Path, name: str, headers: str, file_age_s: float) -> Path:
    path = folder / f"{name}.eml"
    path.write_bytes(headers.encode() + b"Subject: alert\r\n\r\nsnapshot attached\r\n")
    at = time.time() - file_age_s
    os.utime(path, (at, at))
    return path


def test_a_copied_mail_folder_keeps_each_mails_retention_from_when_the_server_accepted_it(tmp_path: Path) -> None:
    """Before, the age came from the file's time, which a copy or a restore of the folder resets: the mails, and
    their snapshots, were kept a whole retention longer."""
    keep_s = 2 * DAY_S

    def ago(s: float) -> str:
        return format_datetime(datetime.fromtimestamp(time.time() - s, UTC))

    received = _kept(tmp_path, "received", f"Received: by checkout-guard-local-smtp; {ago(3 * DAY_S)}\r\n", 60)
    dated = _kept(tmp_path, "dated", f"Date: {ago(3 * DAY_S)}\r\n", 60)  # no Received line: its Date
    young = _kept(tmp_path, "young", f"Received: by checkout-guard-local-smtp; {ago(DAY_S)}\r\n", 60)
    undated = _kept(tmp_path, "undated", "", 3 * DAY_S)  # nothing in the mail: the file's time
    future = _kept(tmp_path, "future", f"Date: {ago(-400 * DAY_S)}\r\n", 3 * DAY_S)  # never later than the file
    assert purge_mails(tmp_path, keep_s) == 4
    assert [p.name for p in tmp_path.glob("*.eml")] == [young.name]
    assert not (received.exists() or dated.exists() or undated.exists() or future.exists())


def test_the_server_writes_when_it_accepted_a_mail_into_it(tmp_path: Path) -> None:
    from aiosmtpd.smtp import Envelope

    from infra.local.smtp import accepted_at  # new with the Received line

    envelope = Envelope()
    envelope.mail_from, envelope.rcpt_tos = "a@x", ["b@x"]
    envelope.original_content = b"Message-ID: <1@x>\r\nSubject: alert\r\n\r\nbody\r\n"
    before = time.time()
    asyncio.run(FileStore(tmp_path).handle_DATA(None, None, envelope))  # type: ignore[arg-type]
    (mail,) = tmp_path.glob("*.eml")
    os.utime(mail, (before + 10 * DAY_S, before + 10 * DAY_S))  # a copy's time, later than the acceptance
    assert before - 1 <= accepted_at(mail) <= time.time()


def test_a_duplicates_log_line_with_no_space_is_skipped_with_a_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited or torn duplicates.log made duplicates() raise IndexError on a line with no space."""
    (tmp_path / "duplicates.log").write_text("1 <a@checkout-guard>\n1700000000000000000\nsecret-torn\n2 <b@x>\n")
    with caplog.at_level(logging.WARNING, logger="infra.local.smtp"):
        assert duplicates(tmp_path) == ["<a@checkout-guard>", "<b@x>"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "line 2" in warnings[0] and "line 3" in warnings[1]
    assert not any("secret-torn" in w or "1700000000000000000" in w for w in warnings)  # no content


def test_read_mails_orders_by_when_the_server_accepted_each_mail_not_by_the_files_time(tmp_path: Path) -> None:
    """read_mails sorted by the file's time, which a copy or restore of the folder resets: the copy's order."""
    now = time.time()

    def received(age_s: float) -> str:
        return (
            f"Received: by checkout-guard-local-smtp; {format_datetime(datetime.fromtimestamp(now - age_s, UTC))}\r\n"
        )

    _kept(tmp_path, "a-first", received(300) + "Subject: first\r\n", file_age_s=10)  # copied last
    _kept(tmp_path, "b-second", received(200) + "Subject: second\r\n", file_age_s=50)
    _kept(tmp_path, "c-no-received", "Subject: third\r\n", file_age_s=100)  # no Received: its file's time
    assert [m["Subject"] for m in read_mails(tmp_path)] == ["first", "second", "third"]
