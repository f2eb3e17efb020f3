"""dlib's 128-d face descriptor network, run by ONNX Runtime (no dlib call at inference).

Why: the ``dlib-bin`` wheels are built without BLAS, so dlib's own ResNet takes ~80-100 ms of one core per
150x150 chip; the same weights as an ONNX graph take ~8 ms in ONNX Runtime (~11 ms in OpenCV's DNN module)
and give the same descriptor (to float32 rounding: max |difference| < 1e-5, see tests/unit/test_face_resnet.py).
The network is dlib's ``anet_type`` (``dlib_face_recognition_resnet_model_v1.dat``): a 7x7/2 conv stem, 14 residual
blocks of two 3x3 convs with per-channel affine layers (frozen batch norm), global average pooling and a 256->128
linear layer.

The weights are read from the model file's dlib serialisation: tensors are stored as raw little-endian float32
after a small header, and each layer's name string precedes its parameters; the layer sequence is checked
against the architecture before any weight is used, so a different file is refused rather than misread. The
ONNX model is written here (a few protobuf fields, no ``onnx`` package) and handed to the runtime from memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.onnx_proto import U8S8_STEPS, model_bytes, node, tensor_proto, value_info
from jobs.faces import ort, weights
from schemas.errors import CheckoutGuardError

INPUT_MEAN = np.array([122.782, 117.001, 104.298], dtype=np.float32)
"""dlib's ``input_rgb_image`` subtracts these per channel (R, G, B) and divides by 256."""
CHIP = 150
BLOCKS = (32, 32, 32, 64, 64, 64, 64, 128, 128, 128, 256, 256, 256, 256)
"""Output channels of the 14 residual blocks, input side first; a block whose channels differ from its
predecessor's (or the last one) starts with a stride-2 conv and its shortcut is a 2x2 average pool."""
DOWN = (False, False, False, True, False, False, False, True, False, False, True, False, False, True)


INT8_RANGES = (
    (-0.4796, 0.5887, -9.2618, 10.0284),
    (0.0, 10.0284, -14.2241, 9.6392),
    (0.0, 9.6392, -8.5562, 6.7764),
    (0.0, 10.2596, -10.3461, 9.1922),
    (0.0, 9.1922, -10.1813, 10.4821),
    (0.0, 15.9766, -8.3699, 7.9717),
    (0.0, 7.9717, -10.9328, 11.2505),
    (0.0, 20.3701, -6.6413, 8.5036),
    (0.0, 8.5036, -6.3126, 9.6741),
    (0.0, 10.8253, -5.7085, 6.7571),
    (0.0, 6.7571, -6.3388, 7.8323),
    (0.0, 16.1609, -5.1881, 5.6782),
    (0.0, 5.6782, -5.7785, 8.8181),
    (0.0, 19.6427, -5.5373, 5.5003),
    (0.0, 5.5003, -6.3233, 7.1164),
    (0.0, 19.935, -4.3975, 5.9883),
    (0.0, 5.9883, -4.1666, 5.953),
    (0.0, 10.5604, -4.4322, 4.3782),
    (0.0, 4.3782, -4.5927, 4.8553),
    (0.0, 8.4893, -4.9265, 5.1494),
    (0.0, 5.1494, -5.7452, 5.874),
    (0.0, 8.9157, -5.4823, 6.3162),
    (0.0, 6.3162, -5.423, 10.7611),
    (0.0, 10.7611, -5.7843, 4.3667),
    (0.0, 4.3667, -5.3594, 3.5772),
    (0.0, 8.8055, -2.6587, 3.1404),
    (0.0, 3.1404, -3.0543, 2.6455),
    (0.0, 8.3126, -3.4494, 3.989),
    (0.0, 3.989, -3.5015, 2.0774),
)
"""Per conv (stem first): the range of its input and of its output, for the int8 graph (``onnx_model(int8=True)``).
The minimum and maximum (:func:`calibration_ranges`, rounded to 4 decimals) over the 46 faces YuNet finds and the
gate passes in photos that are in no evaluation set (some show people who are: Obama, Biden): dlib's ``scenes``,
face_recognition's ``knn_examples/test`` and its loose photos (``tests/unit/test_face_resnet.py`` recomputes them)."""


WEIGHT_STEPS = U8S8_STEPS
"""Weights are int8 in -63..63 (:data:`infra.onnx_proto.U8S8_STEPS`): with full-range weights ONNX Runtime's kernels on
x86 CPUs without VNNI could saturate; with 7 bits the descriptor is the same on every CPU."""


def _uint8_affine(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (uint8) mapping ``[lo, hi]`` (widened to hold 0) onto 0..255, as 0-d tensors."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return np.array(scale, np.float32), np.array(min(255, max(0, round(-lo / scale))), np.uint8)


def _int8_conv(c: Conv, io_range: tuple[float, ...]) -> dict[str, np.ndarray]:
    """``QLinearConv``'s constants for ``c``: input and output scale and zero point (``xs xz``, ``ys yz``) over
    ``io_range``, weights int8 (:data:`WEIGHT_STEPS`) per output channel (``wq ws wz``), bias int32 on the input x
    weight scale (``bq``)."""
    (xs, xz), (ys, yz) = _uint8_affine(*io_range[:2]), _uint8_affine(*io_range[2:])
    filters = c.weight.shape[0]
    ws = (np.maximum(np.abs(c.weight).max(axis=1), 1e-12) / WEIGHT_STEPS).astype(np.float32)
    wq = np.clip(np.rint(c.weight / ws[:, None]), -WEIGHT_STEPS, WEIGHT_STEPS).astype(np.int8)
    wq = wq.reshape(filters, -1, c.k, c.k)
    bq = np.rint(c.bias.ravel() / (xs * ws)).astype(np.int32)
    return {"xs": xs, "xz": xz, "wq": wq, "ws": ws, "wz": np.zeros(filters, np.int8), "ys": ys, "yz": yz, "bq": bq}


class ResnetFileError(CheckoutGuardError, ValueError):
    """The model file is not dlib's face recognition ResNet v1 as this module knows it."""


@dataclass(frozen=True)
class Conv:
    weight: np.ndarray
    """(filters, in_channels * kh * kw), the following affine layer folded in."""
    bias: np.ndarray
    """(filters, 1)."""
    k: int
    stride: int
    pad: int


def _int(b: bytes, o: int) -> tuple[int, int]:
    """dlib's integer encoding: a control byte (low nibble: byte count, 0x80: negative), then little-endian bytes."""
    ctrl = b[o]
    n = ctrl & 0x0F
    v = int.from_bytes(b[o + 1 : o + 1 + n], "little")
    return (-v if ctrl & 0x80 else v), o + 1 + n


def _tensor(b: bytes, o: int) -> tuple[np.ndarray, int]:
    """A serialised dlib tensor (version 2: num_samples, k, nr, nc, then raw float32 LE) at ``o``."""
    version, o = _int(b, o)
    if version != 2:
        raise ResnetFileError(f"tensor version {version} at {o}")
    dims = []
    for _ in range(4):
        d, o = _int(b, o)
        dims.append(d)
    n = int(np.prod(dims))
    return np.frombuffer(b, dtype="<f4", count=n, offset=o).astype(np.float32), o + 4 * n


def _ints(b: bytes, o: int, count: int) -> list[int]:
    out = []
    for _ in range(count):
        v, o = _int(b, o)
        out.append(v)
    return out


LAYER = re.compile(rb"\x01[\x04-\x0c](con_4|affine_|fc_2|avg_pool_2|max_pool_2)")


def load_weights(source: Path | bytes) -> tuple[list[Conv], np.ndarray]:
    """Convs (stem first, affine folded in) and the 256x128 final linear layer from dlib's model file (its path or
    its bytes)."""
    b = source.read_bytes() if isinstance(source, Path) else source
    file_name = source.name if isinstance(source, Path) else "the model file"
    convs: list[tuple[np.ndarray, list[int]]] = []
    affines: list[np.ndarray] = []
    fc = None
    pos = 0
    while (m := LAYER.search(b, pos)) is not None:  # from the end of the last tensor: never inside weights
        name, o = m.group(1), m.end()
        pos = o
        if name in (b"avg_pool_2", b"max_pool_2"):
            continue
        if name == b"fc_2":
            outputs, inputs = _ints(b, o, 2)
            params, pos = _tensor(b, _int(b, _int(b, o)[1])[1])
            if (outputs, inputs) != (128, 256) or params.size != 256 * 128:
                raise ResnetFileError("unexpected final layer")
            fc = params.reshape(256, 128)
            continue
        params, pos = _tensor(b, o)
        if name == b"con_4":
            filters, nr, nc, sy, sx, py, px, _, f, c, kh, kw = _ints(b, pos, 12)
            same = filters == f and nr == nc == kh == kw and sy == sx and py == px
            if not (same and params.size == f * c * kh * kw + f):
                raise ResnetFileError(f"unexpected conv layout at {m.start()}")
            convs.append((params, [f, c, kh, sy, py]))
        else:
            affines.append(params)
    expected = [32] + [c for c in BLOCKS for _ in range(2)]
    if [spec[0] for _, spec in convs] != expected or len(affines) != len(convs) or fc is None:
        raise ResnetFileError(f"{file_name} is not dlib's face recognition ResNet v1 (29 convs, 29 affines, fc)")
    out = []
    for (params, (f, c, k, stride, pad)), affine in zip(convs, affines, strict=True):
        if affine.size != 2 * f:
            raise ResnetFileError("affine layer size does not match its conv")
        gamma, beta = affine[:f, None], affine[f:, None]
        weight = params[: f * c * k * k].reshape(f, c * k * k) * gamma
        bias = params[f * c * k * k :].reshape(f, 1) * gamma + beta
        out.append(Conv(np.ascontiguousarray(weight), np.ascontiguousarray(bias), k, stride, pad))
    return out, np.ascontiguousarray(fc)


def onnx_model(
    convs: list[Conv],
    fc: np.ndarray,
    int8: bool = False,
    ranges: tuple[tuple[float, ...], ...] = INT8_RANGES,
    probes: bool = False,
) -> bytes:
    """The network as an ONNX model (opset 13; any number of faces per run), built here from the dlib weights so
    ONNX Runtime (or OpenCV's DNN module) runs it: their convolutions are several times faster on one core than
    dlib's BLAS-less ones.

    ``int8``: every convolution as ``QLinearConv`` (weights in 7 bits per output channel, symmetric; input and output
    uint8 over ``ranges``), the rest in float32: ~2.6x less CPU in ONNX Runtime, a descriptor within ~0.05 of the
    float one (median ~0.04; distances between faces, ~0.3-1.0, each within ~0.02 of its float value).
    ``probes``: every convolution's input and output are graph outputs too, after the descriptor
    (for :func:`calibration_ranges`)."""
    nodes: list[bytes] = []
    inits: list[bytes] = []
    conv_io: list[str] = []

    def conv(src: str, i: int, size: int, relu_next: bool = False) -> tuple[str, int]:
        conv_io.extend((src, f"conv{i}"))
        c = convs[i]
        k = c.k
        if int8:
            # a ReLU follows: negative outputs become 0 anyway, so the uint8 steps all go to [0, hi]
            io_range = (*ranges[i][:2], 0.0, ranges[i][3]) if relu_next else ranges[i]
            inits.extend(tensor_proto(f"{key}{i}", value) for key, value in _int8_conv(c, io_range).items())
            nodes.append(node("QuantizeLinear", [src, f"xs{i}", f"xz{i}"], f"conv{i}_in_q"))
            names = [f"conv{i}_in_q", *(f"{key}{i}" for key in ("xs", "xz", "wq", "ws", "wz", "ys", "yz", "bq"))]
            nodes.append(
                node("QLinearConv", names, f"conv{i}_q", kernel_shape=[k, k], strides=[c.stride] * 2, pads=[c.pad] * 4)
            )
            nodes.append(node("DequantizeLinear", [f"conv{i}_q", f"ys{i}", f"yz{i}"], f"conv{i}"))
        else:
            inits.append(tensor_proto(f"w{i}", c.weight.reshape(c.weight.shape[0], -1, k, k)))
            inits.append(tensor_proto(f"b{i}", c.bias.ravel()))
            nodes.append(
                node(
                    "Conv",
                    [src, f"w{i}", f"b{i}"],
                    f"conv{i}",
                    kernel_shape=[k, k],
                    strides=[c.stride] * 2,
                    pads=[c.pad] * 4,
                )
            )
        return f"conv{i}", (size + 2 * c.pad - k) // c.stride + 1

    def relu(src: str) -> str:
        nodes.append(node("Relu", [src], f"{src}_relu"))
        return f"{src}_relu"

    def pad_to(src: str, shape: tuple[int, int], target: tuple[int, int]) -> str:
        """Zero-pad channels and the bottom/right edge up to ``target`` (channels, side): dlib's ``add``."""
        if shape == target:
            return src
        pads = np.array([0, 0, 0, 0, 0, target[0] - shape[0], target[1] - shape[1], target[1] - shape[1]])
        inits.append(tensor_proto(f"{src}_pads", pads.astype(np.int64)))
        nodes.append(node("Pad", [src, f"{src}_pads"], f"{src}_padded"))
        return f"{src}_padded"

    x, size = conv("input", 0, CHIP, relu_next=True)
    nodes.append(node("MaxPool", [relu(x)], "pool0", kernel_shape=[3, 3], strides=[2, 2]))
    x, size, channels = "pool0", (size - 3) // 2 + 1, convs[0].weight.shape[0]
    for b, down in enumerate(DOWN):
        y, ysize = conv(x, 1 + 2 * b, size, relu_next=True)
        y, ysize = conv(relu(y), 2 + 2 * b, ysize)
        skip, ssize = x, size
        if down:
            nodes.append(node("AveragePool", [x], f"avg{b}", kernel_shape=[2, 2], strides=[2, 2]))
            skip, ssize = f"avg{b}", (size - 2) // 2 + 1
        out_ch = convs[2 + 2 * b].weight.shape[0]
        target = (max(out_ch, channels), max(ysize, ssize))
        y, skip = pad_to(y, (out_ch, ysize), target), pad_to(skip, (channels, ssize), target)
        nodes.append(node("Add", [y, skip], f"add{b}"))
        x, size, channels = relu(f"add{b}"), target[1], target[0]
    nodes.append(node("GlobalAveragePool", [x], "gap"))
    nodes.append(node("Flatten", ["gap"], "flat", axis=1))
    inits.append(tensor_proto("fc", fc))
    nodes.append(node("MatMul", ["flat", "fc"], "descriptor"))
    outputs = [value_info("descriptor", ("faces", 128))]
    outputs += [value_info(name, ("faces", "c", "h", "w")) for name in (conv_io if probes else [])]
    return model_bytes("dlib_face_resnet_v1", nodes, inits, [value_info("input", ("faces", 3, CHIP, CHIP))], outputs)


def input_planes(chips: list[np.ndarray]) -> np.ndarray:
    """The network's input for 150x150 RGB uint8 chips: dlib's ``input_rgb_image`` scaling, as (n, 3, 150, 150)."""
    for chip in chips:
        if chip.shape != (CHIP, CHIP, 3):
            raise ValueError(f"chip must be {CHIP}x{CHIP}x3, got {chip.shape}")
    x = ((np.stack(chips).astype(np.float32) - INPUT_MEAN) * np.float32(1 / 256.0)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def calibration_ranges(convs: list[Conv], fc: np.ndarray, chips: list[np.ndarray]) -> tuple[tuple[float, ...], ...]:
    """Per conv, the minimum and maximum of its input and of its output in the float network over ``chips`` (150x150
    RGB uint8): what :data:`INT8_RANGES` holds for its calibration faces."""
    session = ort.session(onnx_model(convs, fc, probes=True))
    values = session.run(None, {"input": input_planes(chips)})[1:]
    lows_highs = [(float(v.min()), float(v.max())) for v in values]
    return tuple((*lows_highs[2 * i], *lows_highs[2 * i + 1]) for i in range(len(convs)))


class FaceResnet:
    """The descriptor network; ``descriptor(chip)`` equals dlib's ``compute_face_descriptor(chip)``.

    ``backend``: ``ort`` (ONNX Runtime on one thread, ~1.45x faster on one core, :mod:`jobs.faces.ort`) or
    ``opencv`` (OpenCV's DNN module; kept to check the two agree). ``onnx_sha256``: refuse a generated graph whose
    hash differs (:class:`jobs.faces.weights.WeightsError`). With ``int8`` the descriptor is close to dlib's, not
    equal."""

    def __init__(
        self, source: Path | bytes, backend: str = "ort", onnx_sha256: str | None = None, int8: bool = False
    ) -> None:
        """``int8``: the graph with int8 convolutions (:func:`onnx_model`), ONNX Runtime only."""
        if int8 and backend != "ort":
            raise ValueError("the int8 graph runs on ONNX Runtime only")
        model = onnx_model(*load_weights(source), int8=int8)
        if onnx_sha256 is not None:
            model = weights.verified_model(model, onnx_sha256, "dlib_face_resnet_v1 (generated ONNX)")
        if backend == "ort":
            self._session = ort.session(model)
            self._run = self._ort
        elif backend == "opencv":
            import cv2

            self.net = cv2.dnn.readNetFromONNX(np.frombuffer(model, dtype=np.uint8))
            self._run = self._opencv
        else:
            raise ValueError(f"unknown backend {backend!r}: ort or opencv")

    def _ort(self, x: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input": x})[0]

    def _opencv(self, x: np.ndarray) -> np.ndarray:
        self.net.setInput(x)
        return self.net.forward()

    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        """128 float32 from a 150x150 RGB uint8 chip (dlib's aligned face chip)."""
        return self.descriptors([chip])[0]

    def descriptors(self, chips: list[np.ndarray]) -> np.ndarray:
        """(n, 128) float32 for n chips in one run: the same values as one by one, ~20% less CPU for five faces."""
        return self._run(input_planes(chips)).reshape(len(chips), 128).astype(np.float32)
