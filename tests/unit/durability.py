"""What a writer asked of the disk, to check it survives a power cut (the ``disk_order`` fixture records it)."""

from __future__ import annotations

import os
from pathlib import Path


class DiskOrder:
    """Every fsync (of the file or folder its descriptor names), ``os.replace``, ``os.unlink`` and ``os.mkdir``, in
    order, by real path."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def replaced_durably(self, path: Path) -> bool:
        """Whether ``path`` was written as a power cut needs, each time: some file synced, renamed onto ``path``,
        then ``path``'s folder synced before anything else was renamed. False if it was never renamed onto."""
        dst, folder = os.path.realpath(path), os.path.realpath(path.parent)
        renames = [i for i, c in enumerate(self.calls) if c[0] == "replace"]
        onto = [i for i in renames if self.calls[i][2] == dst]
        for i in onto:
            later = [j for j in renames if j > i]
            if ("fsync", self.calls[i][1], "") not in self.calls[:i]:
                return False
            if ("fsync", folder, "") not in self.calls[i + 1 : later[0] if later else None]:
                return False
        return bool(onto)

    def moved_durably(self, src: Path, dst: Path) -> bool:
        """Whether ``src`` was renamed to ``dst`` as a power cut needs: after the rename, both folders synced (unsynced,
        the move can be lost, and the file back under its old name). False if it was never moved so."""
        moves = [i for i, c in enumerate(self.calls) if c == ("replace", os.path.realpath(src), os.path.realpath(dst))]
        folders = {os.path.realpath(src.parent), os.path.realpath(dst.parent)}
        return bool(moves) and all(all(("fsync", f, "") in self.calls[i + 1 :] for f in folders) for i in moves)

    def removed_durably(self, path: Path) -> bool:
        """Whether ``path`` was removed as a power cut needs, each time: unlinked, then its folder synced (unsynced,
        the removal can be lost and the file come back). False if it was never removed."""
        gone, folder = os.path.realpath(path), os.path.realpath(path.parent)
        removals = [i for i, c in enumerate(self.calls) if c == ("unlink", gone, "")]
        return bool(removals) and all(("fsync", folder, "") in self.calls[i + 1 :] for i in removals)

    def made_durably(self, folder: Path) -> bool:
        """Whether ``folder`` was made as a power cut needs: created, then its parent synced (unsynced, the new
        folder, and a file written into it, can be gone after a power cut). False if it was never made."""
        made, parent = os.path.realpath(folder), os.path.realpath(folder.parent)
        mkdirs = [i for i, c in enumerate(self.calls) if c == ("mkdir", made, "")]
        return bool(mkdirs) and all(("fsync", parent, "") in self.calls[i + 1 :] for i in mkdirs)
