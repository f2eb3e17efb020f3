"""Evaluation arithmetic (thresholds by identity folds, intervals), the pinned YuNet/SFace weights; no photos needed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from infra.settings import FaceSettings
from jobs.faces import engine as face_engine
from jobs.faces import weights
from jobs.faces.evaluation import (
    all_pairs,
    cross_validate,
    identity_folds,
    threshold_at_fmr,
    wilson,
)


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
    """The watchlist holds 128 values: a fused (256-value) engine must not reach the face stage."""
    with pytest.raises(ValueError, match="fused"):
        face_engine.FaceEngine(FaceSettings(embedder="fused"))
    assert face_engine.FaceEngine(FaceSettings(embedder="fused"), evaluation=True).embedder == "fused"
