"""SFace with int8 pointwise convolutions and classifier (jobs/faces/sface_int8.py) against the float network."""

from __future__ import annotations

import numpy as np
import pytest

from infra import onnx_proto as pb
from infra.settings import FaceSettings
from jobs.faces import sface_int8, weights
from jobs.faces.engine import FaceEngine
from jobs.faces.ort import SfaceEmbedder, sface_float_model


@pytest.fixture(scope="module")
def float_model() -> bytes:
    return sface_float_model(weights.load(weights.SFACE))


def _aligned_chips(engine: FaceEngine, photos) -> list[np.ndarray]:
    """SFace's 112x112 chips of the faces passing the engine's gate in ``photos``."""
    chips = []
    for path in photos:
        rgb, scale = engine._prepare(path.read_bytes())
        candidates, work = engine._candidates(rgb, scale)
        chips += engine._aligned_chips(work, [marks for face, _, marks in candidates if face.passed])
    return chips


def test_the_int8_graph_quantises_the_twelve_pointwise_convolutions_and_the_classifier(float_model):
    model = sface_int8.int8_model(float_model)
    graph = next(f.value for f in pb.fields(model) if f.number == 7)
    ops = [pb.read_node(bytes(f.value)).op for f in pb.fields(bytes(graph)) if f.number == 1]
    assert ops.count("QLinearConv") == 12 and ops.count("MatMulInteger") == 1 and "Gemm" not in ops
    assert ops.count("BatchNormalization") == 29 - 12  # folded into the quantised convolutions only
    assert ops.count("Conv") == 27 - 12  # the depthwise and first convolutions stay in float
    weights.verified_model(model, weights.SFACE_INT8_SHA256, "sface int8")  # the pinned graph, deterministic


def test_int8_features_stay_close_to_the_float_ones_on_faces_it_was_not_calibrated_on(float_model):
    from tests.unit.faces_data import people_or_skip

    photos = [path for paths in people_or_skip().values() for path in paths[:3]]
    chips = _aligned_chips(FaceEngine(FaceSettings(embedder="sface")), photos)
    assert len(chips) >= 4
    exact = SfaceEmbedder(float_model).features(chips)
    fast = SfaceEmbedder(sface_int8.int8_model(float_model)).features(chips)
    cos = (exact * fast).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(fast, axis=1)
    assert float(cos.min()) > 0.98  # measured on the calibration faces: min 0.991, median 0.996
    unit = exact / np.linalg.norm(exact, axis=1, keepdims=True)
    assert float((unit @ unit.T).min()) < 0.5  # different people among them: the closeness is not trivial


def test_int8_ranges_are_the_calibration_photos_ranges(float_model):
    """``SFACE_INT8_RANGES`` are what ``calibration_ranges`` finds on SFace's chips of the faces of the photos outside
    every evaluation set (those dlib's int8 ranges come from), so they can be recomputed."""
    from tests.unit.faces_data import calibration_photos

    photos = calibration_photos()
    if not photos:
        pytest.skip("shared face photos (../shared/data/faces) absent")
    chips = _aligned_chips(FaceEngine(FaceSettings(embedder="sface")), photos)
    assert len(chips) == 46
    found = sface_int8.calibration_ranges(float_model, chips)
    assert found.keys() == sface_int8.SFACE_INT8_RANGES.keys()
    for name, (low, high) in found.items():
        assert np.allclose((low, high), sface_int8.SFACE_INT8_RANGES[name], atol=1e-3), name


def test_a_graph_that_is_not_sfaces_is_refused():
    with pytest.raises(ValueError, match="SFace graph not as expected"):
        sface_int8.int8_model(pb.field(7, pb.field(1, pb.node("Relu", ["x"], "y"))))
