"""The face networks on ONNX Runtime (jobs/faces/ort.py) against OpenCV's own YuNet and DNN paths."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from infra import onnx_proto as pb
from infra.settings import FaceSettings
from jobs.faces import engine as face_engine
from jobs.faces import weights
from jobs.faces.ort import (
    FacePluginEmbedder,
    SfaceEmbedder,
    YunetDetector,
    _dequantize,
    faceplugin_float_model,
    nms,
    sface_float_model,
    yunet_float_model,
)
from jobs.faces.resnet import FaceResnet

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="shared face photos (../shared/data/faces) absent")
RESNET = "dlib_face_recognition_resnet_model_v1.dat"


@pytest.fixture(scope="module")
def detectors() -> tuple[YunetDetector, object]:
    raw = weights.load(weights.YUNET)
    return YunetDetector(yunet_float_model(raw)), cv2.FaceDetectorYN.create(
        "onnx", raw, b"", (320, 320), 0.5, 0.3, 5000
    )


def _opencv_rows(det: object, rgb: np.ndarray) -> np.ndarray:
    det.setInputSize((rgb.shape[1], rgb.shape[0]))
    rows = det.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1]
    return np.zeros((0, 15), np.float32) if rows is None else rows


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def _photos() -> list[Path]:
    roots = [FACES / "dlib" / "scenes", FACES / "face_recognition" / "test_images", FACES / "no_face"]
    return sorted(p for r in roots for p in r.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


@needs_faces
def test_yunet_on_onnx_runtime_finds_what_opencvs_facedetectoryn_finds(detectors):
    ours, theirs = detectors
    engine = face_engine.FaceEngine(FaceSettings(detector="hog", embedder="dlib"))
    compared = 0
    for path in _photos():
        rgb = np.ascontiguousarray(engine._prepare(path.read_bytes())[0])
        for image in (rgb, np.ascontiguousarray(rgb[: rgb.shape[0] - 13, : rgb.shape[1] - 7])):  # sizes off /32
            mine, ref = ours.detect(image), _opencv_rows(theirs, image)
            assert mine.shape == ref.shape, path.name
            for row in ref:
                best = max(mine, key=lambda m, row=row: _iou(m, row))
                assert _iou(best, row) > 0.999
                assert np.abs(best[4:14] - row[4:14]).max() < 0.01  # landmarks, pixels
                assert abs(best[14] - row[14]) < 1e-4
                compared += 1
    assert compared > 30


def test_rows_come_back_empty_on_a_blank_frame(detectors):
    rows = detectors[0].detect(np.full((480, 640, 3), 127, np.uint8))
    assert rows.shape == (0, 15) and rows.dtype == np.float32


def test_nms_keeps_the_best_of_overlapping_boxes_like_opencv():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 10, 10], [0, 0, 10, 10]], np.int32)
    scores = np.array([0.8, 0.9, 0.7, 0.5], np.float32)
    assert nms(boxes, scores, 0.5, 0.3, 5000) == [1, 2]  # 0 overlaps 1 (IoU 0.68); 3 is at the threshold
    assert nms(boxes, scores, 0.5, 0.3, 1) == [1]  # top_k
    assert nms(boxes, scores, 0.5, 0.7, 5000) == [1, 0, 2]  # IoU 0.68 <= 0.7 keeps both
    assert sorted(nms(boxes, scores, 0.5, 0.3, 5000)) == sorted(
        cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), 0.5, 0.3, top_k=5000)
    )


def test_blockwise_dequantisation_repeats_each_scale_over_its_block():
    q = np.array([[1, 2, 3, 4, 5]], np.int8)
    out = _dequantize(q, np.array([[2.0, 10.0]], np.float32), np.array([[1, 0]], np.int8), axis=1, block=3)
    assert out.tolist() == [[0.0, 2.0, 4.0, 40.0, 50.0]]
    per_tensor = _dequantize(q, np.array([0.5], np.float32), None, axis=0, block=64)
    assert per_tensor.tolist() == [[0.5, 1.0, 1.5, 2.0, 2.5]]


def test_float_yunet_has_no_quantised_weights_a_free_input_size_and_its_pinned_hash():
    model = yunet_float_model(weights.load(weights.YUNET))
    weights.verified_model(model, weights.YUNET_FLOAT_SHA256, "yunet")
    graph = next(bytes(f.value) for f in pb.fields(model) if f.number == 7)
    ops = {pb.read_node(bytes(f.value)).op for f in pb.fields(graph) if f.number == 1}
    assert "DequantizeLinear" not in ops and "Conv" in ops
    inputs = [pb.read_value_info(bytes(f.value)) for f in pb.fields(graph) if f.number == 11]
    assert inputs == [("input", 1, [1, 3, "height", "width"])]


def test_a_file_that_is_not_yunet_is_refused():
    with pytest.raises(ValueError):
        yunet_float_model(b"\x0a\x03abc")  # one string field: no graph
    with pytest.raises(ValueError):
        yunet_float_model(pb.field(7, pb.field(1, pb.node("Relu", ["x"], "y"))))  # nothing to dequantise


def test_engine_refuses_to_start_when_a_generated_model_differs(monkeypatch):
    caches = (face_engine._yunet, face_engine._face_resnet, face_engine._sface)
    for name, settings in (
        ("YUNET_FLOAT_SHA256", FaceSettings(detector="yunet", embedder="dlib")),
        ("DLIB_RESNET_ONNX_SHA256", FaceSettings(detector="hog", embedder="dlib")),
        ("DLIB_RESNET_INT8_ONNX_SHA256", FaceSettings(detector="hog", embedder="dlib", dlib_int8=True)),
        ("SFACE_FLOAT_SHA256", FaceSettings(detector="hog", embedder="sface")),
        ("SFACE_INT8_SHA256", FaceSettings(detector="hog", embedder="sface", sface_int8=True)),
    ):
        monkeypatch.setattr(weights, name, "0" * 64)
        for cached in caches:
            cached.cache_clear()
        try:
            with pytest.raises(weights.WeightsError, match="refusing face model"):
                face_engine.FaceEngine(settings)
        finally:
            monkeypatch.undo()
            for cached in caches:
                cached.cache_clear()


def test_a_tampered_float_sface_is_refused():
    model = bytearray(sface_float_model(weights.load(weights.SFACE)))
    weights.verified_model(bytes(model), weights.SFACE_FLOAT_SHA256, "sface")
    model[len(model) // 2] ^= 1  # one bit of one weight
    with pytest.raises(weights.WeightsError, match="refusing face model"):
        weights.verified_model(bytes(model), weights.SFACE_FLOAT_SHA256, "sface")


@pytest.fixture(scope="module")
def sface() -> tuple[object, SfaceEmbedder]:
    raw = weights.load(weights.SFACE)
    return cv2.FaceRecognizerSF.create("onnx", raw, b""), SfaceEmbedder(sface_float_model(raw))


def test_float_sface_has_no_quantised_weights_nor_prelu_and_a_free_batch():
    graph = next(bytes(f.value) for f in pb.fields(sface_float_model(weights.load(weights.SFACE))) if f.number == 7)
    ops = {pb.read_node(bytes(f.value)).op for f in pb.fields(graph) if f.number == 1}
    assert not ops & {"DequantizeLinear", "PRelu"} and {"Conv", "Gemm"} <= ops
    io = [pb.read_value_info(bytes(f.value)) for f in pb.fields(graph) if f.number in (11, 12)]
    assert io == [("data", 1, ["batch", 3, 112, 112]), ("fc1", 1, ["batch", 128])]


def test_sface_on_onnx_runtime_equals_opencvs_on_random_chips(sface):
    theirs, ours = sface
    for chip in np.random.default_rng(7).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8):
        ref = theirs.feature(np.ascontiguousarray(chip[:, :, ::-1])).ravel()  # BGR in: OpenCV swaps to RGB
        assert float(np.abs(ours.features([chip])[0] - ref).max()) < 1e-4 * float(np.abs(ref).max())


@needs_faces
def test_engine_sface_embeddings_equal_opencvs_facerecognizersf_on_the_shared_photos(sface):
    theirs = sface[0]
    engine = face_engine.FaceEngine(FaceSettings(detector="yunet", embedder="sface"))
    compared = 0
    for path in _photos():
        candidates, work = engine._candidates(*engine._prepare(path.read_bytes()))
        faces = engine._finish(candidates, work, limit=None)
        embedded = [(m, face.embedding) for (_, _, m), face in zip(candidates, faces, strict=True) if face.passed]
        if not embedded:
            continue
        bgr = cv2.cvtColor(work, cv2.COLOR_RGB2BGR)
        for points, mine in embedded:
            row = np.zeros(15, np.float32)
            row[4:14] = points.ravel()
            ref = theirs.feature(theirs.alignCrop(bgr, row)).ravel()
            ref = ref * (face_engine.SFACE_SCALE / np.linalg.norm(ref))
            assert float(np.abs(mine - ref).max()) < 1e-4, path.name
            compared += 1
    assert compared > 30


def test_a_batch_of_sface_chips_gets_the_features_each_chip_gets_alone(sface):
    net = sface[1]
    chips = list(np.random.default_rng(8).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8))
    batch = net.features(chips)
    assert batch.shape == (5, 128) and batch.dtype == np.float32
    for chip, row in zip(chips, batch, strict=True):
        assert float(np.abs(net.features([chip])[0] - row).max()) < 1e-6
    assert net.features([]).shape == (0, 128)
    with pytest.raises(ValueError, match="112x112x3"):
        net.features([chips[0][:100]])


def test_descriptor_on_onnx_runtime_equals_opencvs():
    path = face_engine.model_path(RESNET)
    ours, theirs = FaceResnet(path), FaceResnet(path, backend="opencv")
    rng = np.random.default_rng(5)
    for _ in range(3):
        chip = rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)
        assert float(np.abs(ours.descriptor(chip) - theirs.descriptor(chip)).max()) < 1e-5


def test_a_batch_of_chips_gets_the_descriptors_each_chip_gets_alone():
    path = face_engine.model_path(RESNET)
    chips = list(np.random.default_rng(6).integers(0, 256, (4, 150, 150, 3), dtype=np.uint8))
    for backend in ("ort", "opencv"):
        net = FaceResnet(path, backend=backend)
        batch = net.descriptors(chips)
        assert batch.shape == (4, 128) and batch.dtype == np.float32
        for chip, row in zip(chips, batch, strict=True):
            assert float(np.abs(net.descriptor(chip) - row).max()) < 1e-6
    with pytest.raises(ValueError, match="150x150x3"):
        net.descriptors([chips[0], chips[1][:100]])


def test_value_info_and_tensor_round_trip_through_the_wire_format():
    info = pb.value_info("kps_8", (1, "anchors", 10))
    assert pb.read_value_info(info) == ("kps_8", 1, [1, "anchors", 10])
    name, value = pb.read_tensor(pb.tensor_proto("w", np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert name == "w" and value.tolist() == [[0, 1, 2], [3, 4, 5]]
    floats = pb.field(1, 2) + pb.field(2, 1) + pb.field(4, np.array([1.5, -2], "<f4").tobytes()) + pb.field(8, "g")
    assert pb.read_tensor(floats)[1].tolist() == [1.5, -2.0]  # float_data, packed (as SFace's file stores it)
    node = pb.read_node(pb.node("DequantizeLinear", ["q", "s"], "out", axis=-1, block_size=9))
    assert node.ints == {"axis": -1, "block_size": 9} and node.outputs == ["out"]


@pytest.mark.skipif(
    not (weights.models_dir() / weights.FACEPLUGIN.file).is_file(),
    reason="FacePlugin network not fetched (make face-models): fused3 unavailable",
)
def test_faceplugin_with_prelu_rewritten_gives_the_files_features_and_its_pinned_hash():
    model = weights.load_cached(weights.FACEPLUGIN)
    fast = faceplugin_float_model(model)
    assert weights.verified_model(fast, weights.FACEPLUGIN_FLOAT_SHA256, "rewritten") == fast
    graph = next(bytes(f.value) for f in pb.fields(fast) if f.number == 7)
    assert "PRelu" not in {pb.read_node(bytes(f.value)).op for f in pb.fields(graph) if f.number == 1}
    chips = list(np.random.default_rng(9).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8))
    ref, ours = FacePluginEmbedder(model).features(chips), FacePluginEmbedder(fast).features(chips)
    assert ours.shape == (3, 512)
    assert float(np.abs(ours - ref).max()) < 1e-5 * float(np.abs(ref).max())
