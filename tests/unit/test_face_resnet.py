"""dlib's descriptor network on OpenCV (jobs/faces/resnet.py) against dlib's own, on the installed model file."""

from __future__ import annotations

import dlib
import numpy as np
import pytest

from jobs.faces import weights
from jobs.faces.engine import model_path
from jobs.faces.resnet import FaceResnet, ResnetFileError, load_weights

MODEL = "dlib_face_recognition_resnet_model_v1.dat"


@pytest.fixture(scope="module")
def both() -> tuple[FaceResnet, object]:
    return FaceResnet(model_path(MODEL)), dlib.face_recognition_model_v1(str(model_path(MODEL)))


def _chips() -> list[np.ndarray]:
    """Noise, a flat grey chip, and a smooth synthetic face-like pattern: inputs far apart in every layer."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:150, 0:150]
    blob = 128 + 100 * np.sin(xx / 11.0)[..., None] * np.cos(yy / 17.0)[..., None] * np.array([1.0, 0.8, 0.6])
    return [
        rng.integers(0, 256, (150, 150, 3), dtype=np.uint8),
        np.full((150, 150, 3), 127, dtype=np.uint8),
        np.clip(blob, 0, 255).astype(np.uint8),
    ]


def test_descriptor_equals_dlibs_own_network_to_float_rounding(both):
    ours, theirs = both
    for chip in _chips():
        mine = ours.descriptor(chip)
        ref = np.asarray(theirs.compute_face_descriptor(chip), dtype=np.float32)
        assert mine.shape == (128,) and mine.dtype == np.float32
        assert float(np.abs(mine - ref).max()) < 1e-4
    # and different chips give different descriptors (the comparison above is not trivially true)
    a, b = (ours.descriptor(c) for c in _chips()[:2])
    assert float(np.linalg.norm(a - b)) > 0.1


def test_a_chip_of_the_wrong_size_is_refused(both):
    with pytest.raises(ValueError, match="150x150x3"):
        both[0].descriptor(np.zeros((112, 112, 3), dtype=np.uint8))


def test_a_model_file_of_another_network_is_refused(tmp_path):
    with pytest.raises(ResnetFileError):
        load_weights(model_path("shape_predictor_5_face_landmarks.dat"))
    cut = tmp_path / "cut.dat"
    cut.write_bytes(model_path(MODEL).read_bytes()[:5_000_000])
    with pytest.raises((ResnetFileError, ValueError)):
        load_weights(cut)


def test_engine_refuses_to_start_when_the_descriptor_model_file_differs(monkeypatch, tmp_path):
    from infra.settings import FaceSettings
    from jobs.faces import engine as face_engine
    from jobs.faces import weights

    real = model_path(MODEL)
    bad = tmp_path / MODEL
    data = bytearray(real.read_bytes())
    data[1000] ^= 0xFF  # one weight changed: still parses, but is not the pinned file
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(face_engine, "model_path", lambda name: bad if name == MODEL else real.parent / name)
    face_engine._face_resnet.cache_clear()
    try:
        with pytest.raises(weights.WeightsError, match="refusing face model"):
            face_engine.FaceEngine(FaceSettings(detector="hog", embedder="dlib"))
    finally:
        face_engine._face_resnet.cache_clear()


def test_int8_graph_gives_descriptors_close_to_the_float_ones_on_real_faces():
    """The int8 convolutions (CG_FACES__DLIB_INT8) move a real face's descriptor by a small fraction of the distances
    that tell people apart, so every pair's distance stays within 0.1 of the float one."""
    from infra.settings import FaceSettings
    from jobs.faces.engine import FaceEngine
    from tests.unit.faces_data import people_or_skip

    photos = [path for paths in people_or_skip().values() for path in paths[:3]]
    chips = _passing_chips(FaceEngine(FaceSettings(embedder="dlib")), photos, per_photo=1)
    assert len(chips) >= 4
    exact = FaceResnet(model_path(MODEL)).descriptors(chips)
    fast = FaceResnet(model_path(MODEL), int8=True, onnx_sha256=weights.DLIB_RESNET_INT8_ONNX_SHA256).descriptors(chips)
    assert float(np.linalg.norm(exact - fast, axis=1).max()) < 0.1  # measured: median ~0.04, max ~0.05
    d_exact = np.linalg.norm(exact[:, None] - exact[None], axis=2)
    d_fast = np.linalg.norm(fast[:, None] - fast[None], axis=2)
    assert float(np.abs(d_exact - d_fast).max()) < 0.05 and float(d_exact.max()) > 0.6  # measured: <= 0.02
    with pytest.raises(ValueError, match="ONNX Runtime"):
        FaceResnet(model_path(MODEL), backend="opencv", int8=True)


def test_int8_ranges_are_the_calibration_photos_ranges():
    """``INT8_RANGES`` are what ``calibration_ranges`` finds on the faces of the photos outside every evaluation set,
    so they can be recomputed (and were not taken from the evaluation's photos)."""
    from infra.settings import FaceSettings
    from jobs.faces.engine import FaceEngine
    from jobs.faces.resnet import INT8_RANGES, calibration_ranges
    from tests.unit.faces_data import calibration_photos

    photos = calibration_photos()
    if not photos:
        pytest.skip("shared face photos (../shared/data/faces) absent")
    chips = _passing_chips(FaceEngine(FaceSettings(embedder="dlib")), photos)
    assert len(chips) == 46
    found = calibration_ranges(*load_weights(model_path(MODEL)), chips)
    assert np.abs(np.array(found) - np.array(INT8_RANGES)).max() < 1e-3


def _passing_chips(engine, photos, per_photo: int | None = None) -> list[np.ndarray]:
    """The 150x150 dlib chips of the faces passing the engine's gate in ``photos`` (the first ``per_photo`` of each)."""
    chips = []
    for path in photos:
        rgb, scale = engine._prepare(path.read_bytes())
        chips += [chip for face, chip, _ in engine._candidates(rgb, scale)[0] if face.passed][:per_photo]
    return chips
