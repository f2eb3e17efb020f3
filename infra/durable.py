"""Files that survive a power cut whole: written, flushed to disk, then renamed into place, and the folder synced.

A rename alone keeps a reader from seeing half a file, but not a crash: the rename may reach the disk before the
file's bytes (an empty or cut-short file after a power cut), and the rename itself is lost until its folder is
synced. So each writer here fsyncs the file before the rename and the folder after it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` (a file renamed in or out, one created or removed) last past a crash."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path, mode: int = 0o777) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` (``mode`` for ``folder`` itself, as ``mkdir`` gives it), each
    folder it makes synced into its parent: a new folder's name is only on disk once its parent is synced, and a
    power cut lost a first file written durably into it with the folder itself."""
    missing: list[Path] = []
    at = folder
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=mode if made == folder else 0o777)
        except FileExistsError:  # another process made it meanwhile; its parent may not be synced yet
            if not made.is_dir():
                raise
        fsync_dir(made.parent)


def write_synced(path: Path, data: bytes | str) -> None:
    """Write ``path`` and fsync it, with no rename: for a file in a temporary folder that is renamed as a whole
    (:func:`rename_durably`), so the folder never names a file whose bytes are not on disk."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def rename_durably(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``, then sync ``dst``'s folder so the rename is on disk before anything points at it."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def replace_durably(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: a reader, even after a power cut, finds the old content or the new, never an
    empty or half file. Temp file beside it (removed if the write fails), fsync, rename, fsync of the folder.

    The temp file's name is new for each write, so two writers of one path (two processes, or two threads) never
    write into each other's. ``mode``: the file's permission bits whatever the umask, from its creation on (0o600
    for a file only its owner may read); None: the umask's, as ``open`` gives."""
    tmp = _synced_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_once(path: Path, data: bytes | str, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether this call created it. Whole or not at all, for a
    reader in another process as after a power cut: a temp file beside it is written with ``mode`` (whatever the
    umask) and synced, then linked to the name, which fails when another writer got there first (its file stays)."""
    tmp = _synced_temp(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def kept_secret(path: Path) -> str:
    """A random secret (64 hex digits) generated once and kept in ``path`` (0600, in a folder made 0700): the same to
    every process that asks for it, before and after restarts, however many make it at once (:func:`create_once`:
    the first one's stays). ``OSError`` when it can be neither read nor made, ``ValueError`` for an empty file."""
    if not path.exists():
        make_dirs_durably(path.parent, mode=0o700)
        create_once(path, secrets.token_hex(32) + "\n", mode=0o600)
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ValueError(f"{path} holds no secret")
    return value


def _synced_temp(path: Path, data: bytes | str, mode: int | None) -> Path:
    """A new temp file beside ``path`` (:func:`_new_temp`) holding ``data``, synced, for :func:`replace_durably` and
    :func:`create_once` to put in place; removed if the write fails. ``mode``: its permission bits whatever the umask;
    None: the umask's."""
    fd, tmp = _new_temp(path, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)  # the umask may have taken bits away
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _new_temp(path: Path, mode: int) -> tuple[int, Path]:
    """A file of a name no one else uses beside ``path`` (``.<name>.tmp-<pid>-<random>``, hidden, the name cut so
    the whole stays within 255 bytes), created open for writing."""
    stem = os.fsencode(path.name)[:200].decode(errors="surrogateescape")
    for _ in range(100):
        tmp = path.with_name(f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def remove_durably(path: Path) -> None:
    """Remove ``path`` (if there) and sync its folder, so the file does not come back after a crash."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)
