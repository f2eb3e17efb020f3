"""Local image store: refs, private files, retention purge that keeps retained and reference images."""

from __future__ import annotations

import os
import stat
import time

import pytest

from infra.clients.image_store import ImageStore, LocalImageStore
from infra.settings import Settings


@pytest.fixture
def store(tmp_path) -> LocalImageStore:
    s = ImageStore.from_settings(Settings(stack_dir=tmp_path))
    assert isinstance(s, LocalImageStore) and s.root == tmp_path / "images"
    return s


def _age(store: LocalImageStore, ref: str, seconds: float) -> None:
    path = store._path(ref)
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_put_get_find_round_trip_with_private_files(store):
    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    assert store.get(ref) == b"\xff\xd8jpeg"
    assert store.find("checkout", "tx-1") == ref
    assert store.find("entrance", "tx-1") is None
    assert stat.S_IMODE(store._path(ref).stat().st_mode) == 0o600


def test_keys_that_are_not_file_names_are_quoted_not_escaped_from_the_folder(store):
    ref = store.put("checkout", "../../etc/passwd", b"x")
    assert store.find("checkout", "../../etc/passwd") == ref
    assert store._path(ref).parent == store.root / "checkout"
    with pytest.raises(ValueError):
        store.get("file:checkout/../secret")
    with pytest.raises(ValueError):
        store.put("selfie", "k", b"x")


def test_purge_deletes_old_unretained_snapshots_only(store):
    old = store.put("checkout", "tx-old", b"a")
    alerted = store.put("checkout", "tx-alerted", b"b")
    fresh = store.put("entrance", "cam:1", b"c")
    reference = store.put("reference", "subj-tx-old", b"d")
    for ref in (old, alerted, reference):
        _age(store, ref, 48 * 3600)
    store.retain(alerted, "alert=a1 subject=subj-x")
    cutoff = int((time.time() - 24 * 3600) * 1000)
    assert store.purge(cutoff) == 1
    assert store.find("checkout", "tx-old") is None
    assert store.get(alerted) == b"b" and store.get(fresh) == b"c" and store.get(reference) == b"d"
    assert store.retained() == {alerted: "alert=a1 subject=subj-x"}
    assert store.purge(cutoff) == 0, "purging again finds nothing"


def test_retaining_a_missing_image_is_an_error(store):
    with pytest.raises(FileNotFoundError):
        store.retain("file:checkout/tx-gone", "alert=a9 subject=-")
    assert store.retained() == {}


def test_delete_removes_image_and_its_retention_marker(store):
    ref = store.put("checkout", "tx-2", b"a")
    store.retain(ref, "alert=a2 subject=-")
    store.delete(ref)
    store.delete(ref)  # idempotent
    assert store.find("checkout", "tx-2") is None and store.retained() == {}


def test_unknown_store_kind_is_a_configuration_error(tmp_path):
    settings = Settings(stack_dir=tmp_path)
    bad = settings.model_copy(update={"faces": settings.faces.model_copy(update={"image_store": "ftp"})})
    with pytest.raises(ValueError):
        ImageStore.from_settings(bad)
