"""Where the tests find real face photos: the face_recognition sdist installed by `make setup`, and
the shared labelled folders when present (read in place, never copied into the repo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.local.camera import SDIST_PHOTOS, load_people
from infra.settings import Settings

SHARED_FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
SHARED_PERSON_DIRS = (
    "face-api-js",
    "dlib/johns",
    "face_recognition/knn_examples/train",
    "face_recognition/test_images",
)


def calibration_photos() -> list[Path]:
    """The shared photos outside every evaluation set whose faces calibrate the int8 networks (dlib's scenes,
    face_recognition's loose photos and its knn_examples/test); empty when the shared data is absent."""
    return sorted(
        [*(SHARED_FACES / "dlib" / "scenes").glob("*.jpg"), *(SHARED_FACES / "face_recognition").glob("*.jpg")]
        + list((SHARED_FACES / "face_recognition" / "knn_examples" / "test").glob("*.jpg"))
    )


def shared_photo_dirs() -> list[Path]:
    return [SHARED_FACES / d for d in SHARED_PERSON_DIRS if (SHARED_FACES / d).is_dir()]


def sdist_or_shared_photo_dirs() -> list[Path]:
    sdist = Path(Settings().stack_dir) / SDIST_PHOTOS
    return ([sdist] if sdist.is_dir() else []) + shared_photo_dirs()


def people_or_skip() -> dict[str, tuple[Path, ...]]:
    """The local camera's people from those photos; the calling test skips, saying why, when there are none."""
    dirs = sdist_or_shared_photo_dirs()
    if not dirs:
        pytest.skip("no face photos: run `make setup` (face_recognition sdist) or provide ../shared/data/faces")
    return load_people(dirs)
