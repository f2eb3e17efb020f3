"""What readers outside the model code need of a local model artifact: which folders of the models root hold a
model version, and which labelled rows trained it.

A model's ROC-AUC on rows it was fitted on is in sample: the backtest and the dashboard's
champion/challenger comparison leave those rows out, so both need the same digest and file name.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

TRAINED_IDS_FILE = "trained_ids.txt"
"""In an artifact folder: one :func:`id_digest` per labelled row the model was fitted on."""
TRAINED_IDS_SHA256 = "trained_ids_sha256"
"""``model.json``'s SHA-256 of :data:`TRAINED_IDS_FILE` (artifacts saved before it have none)."""
_DIGEST_RE = re.compile(r"[0-9a-f]{16}")
LOCAL_PREFIX = "local:"
"""A scored record's ``model_version`` for the local model: ``local:<version>`` (``model.json``'s)."""
MODEL_META_FILE = "model.json"
"""In an artifact folder: the model's version and settings (its model file is read only by the model code)."""
CURRENT, CHALLENGER = "CURRENT", "CHALLENGER"
"""Pointer files in the models root: the folder of the champion, and of the optional challenger."""
FALLBACK_SUFFIX = " (fallback)"
"""Appended to the version when the local model answered for a remote backend that failed."""
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGITS_RE = re.compile(r"(\d+)")


def id_digest(transaction_id: str) -> str:
    """64 bits of SHA-256: enough to tell ~1e6 training rows apart, and no raw ids in the artifact."""
    return hashlib.sha256(transaction_id.encode()).hexdigest()[:16]


def model_of(model_version: str) -> str:
    """The model a scored record's ``model_version`` names, without the mark of a fallback answer: the local
    model's scores as a remote backend's fallback and as champion or challenger are one model's."""
    return model_version.removesuffix(FALLBACK_SUFFIX)


def is_fallback(model_version: str) -> bool:
    """The local model answered for a remote backend that failed."""
    return model_version.endswith(FALLBACK_SUFFIX)


def artifact_version(model_version: str | None) -> str | None:
    """The local model version a scored record's ``model_version`` names (:func:`version_folders` finds its
    folders), or None for a remote backend's version or anything that is not a plain folder name (the value comes
    from stored documents)."""
    if not model_version or not model_version.startswith(LOCAL_PREFIX):
        return None
    name = model_of(model_version).removeprefix(LOCAL_PREFIX)
    return name if _VERSION_RE.fullmatch(name) else None


def trained_ids_text(digests: frozenset[str]) -> str:
    """The :data:`TRAINED_IDS_FILE` of these digests (sorted, one per line)."""
    return "".join(f"{d}\n" for d in sorted(digests))


def trained_ids_sha256(text: str) -> str:
    """What ``model.json`` records of :data:`TRAINED_IDS_FILE` (:data:`TRAINED_IDS_SHA256`)."""
    return hashlib.sha256(text.encode()).hexdigest()


def read_trained_ids(version_dir: Path) -> frozenset[str] | None:
    """The digests of an artifact's training rows; None when it did not record them, is gone, cannot
    be read here (another user's folder) or is damaged -- cut short (its SHA-256 in ``model.json``,
    :data:`TRAINED_IDS_SHA256`, differs) or not digests: the caller then cannot tell, and says so,
    rather than count training rows as unseen."""
    try:
        text = (version_dir / TRAINED_IDS_FILE).read_text(encoding="ascii")
    except (OSError, ValueError):
        return None
    try:
        meta = json.loads((version_dir / "model.json").read_text())
    except (OSError, ValueError):
        meta = None  # the digest is checked where model.json records it
    expected = meta.get(TRAINED_IDS_SHA256) if isinstance(meta, dict) else None
    if expected is not None and trained_ids_sha256(text) != expected:
        return None
    digests = text.split()
    if not all(_DIGEST_RE.fullmatch(d) for d in digests):
        return None
    return frozenset(digests)


def version_order(name: str) -> tuple[str | int, ...]:
    """Sort key of a folder name with its runs of digits compared as numbers: ``v9`` before ``v10`` (by plain
    name, ``v10`` came first and the newest of hand-named versions was listed last)."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS_RE.split(name)))


def artifact_folders(root: Path) -> list[str]:
    """Version folders under ``root`` (those holding :data:`MODEL_META_FILE`), in :func:`version_order`: not a save's
    temporary ``.<version>.tmp-<pid>`` (a crashed save leaves one, and the next save of that version deletes it)."""
    try:
        return sorted(
            (
                p.name
                for p in root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / MODEL_META_FILE).exists()
            ),
            key=version_order,
        )
    except OSError:  # no models root (yet), or not one this process may read
        return []


def folder_version(folder: Path) -> str | None:
    """The version :data:`MODEL_META_FILE` in ``folder`` names (read alone, not the model file), or None."""
    try:
        meta = json.loads((folder / MODEL_META_FILE).read_text())
    except (OSError, ValueError):
        return None
    version = meta.get("version") if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


def _pointed(root: Path) -> list[str]:
    """The folders :data:`CURRENT` and :data:`CHALLENGER` name; one that cannot be read is left out (every folder
    is still looked at)."""
    names = []
    for pointer in (CURRENT, CHALLENGER):
        try:
            names.append((root / pointer).read_text().strip())
        except (OSError, ValueError):
            continue
    return names


def version_folders(root: Path, version: str) -> list[Path]:
    """Every folder of ``root`` whose :data:`MODEL_META_FILE` holds ``version``, whatever it is called.

    Models are told apart by that version, not by folder names: a folder copied or renamed by hand and set through
    ``challenger``/``promote`` scores as ``local:<version>``, and every reader holding only that version (the
    registry's drift step, the dashboard's training rows, the SageMaker calibration) finds it here, one way. The
    folder of the version's name comes first, then those the pointers name, then the others by name: a reader
    that loads the model tries them in this order, so one damaged copy does not hide an intact one."""
    folders = artifact_folders(root)
    first = [name for name in (version, *_pointed(root)) if name in folders]
    return [root / name for name in dict.fromkeys([*first, *folders]) if folder_version(root / name) == version]
