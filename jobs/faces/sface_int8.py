"""SFace with its pointwise convolutions and its classifier in int8 (``CG_FACES__SFACE_INT8``; always in ``fused3``).

Why: SFace is a MobileNet-like network whose time on one core goes to twelve 1x1 convolutions (64 to 1024 channels)
and a 50176 x 128 classifier (25 MB of float32 weights read per face). Those as ``QLinearConv`` and
``MatMulInteger`` run in ~8.5 instead of ~14.5 ms of one core per face (a CPU with VNNI; less gain without it), the
features at cosine >= 0.99 of the float ones on the calibration faces. ONNX Runtime's own static quantiser was
measured and gave far less (16.3 -> 13.6 ms): it quantises the per-channel ``PRelu`` slopes' ``Mul`` around every
layer; here the ``PRelu`` arithmetic, the depthwise convolutions and the first layers stay in float, as they are.

Each quantised convolution gets its batch norm folded in; weights are 7 bits per output channel, symmetric
(no int16 saturation on CPUs without VNNI, as for dlib's, :data:`jobs.faces.resnet.WEIGHT_STEPS`), bias int32 on
input x weight scale; activations uint8 over :data:`SFACE_INT8_RANGES`, the float network's minimum and maximum of
each tensor on 46 faces of photos in no evaluation set (recomputed by :func:`calibration_ranges` in the tests).
The classifier's input is quantised the same way; its int32 products are scaled back to float exactly (no output
quantisation). The graph is written with :mod:`infra.onnx_proto` and its SHA-256 pinned
(:data:`jobs.faces.weights.SFACE_INT8_SHA256`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from infra import onnx_proto as pb
from jobs.faces import ort
from jobs.faces.resnet import WEIGHT_STEPS, _uint8_affine

MIN_WEIGHTS = 4096
"""Pointwise convolutions with at least this many weights are quantised (conv_3 to conv_14); the others cost little."""
CLASSIFIER_INPUT = "flatten_254"

SFACE_INT8_RANGES: dict[str, tuple[float, float]] = {
    "conv_3_dw_relu": (-6.3512, 17.3547),
    "conv_3_batchnorm": (-11.3775, 12.0628),
    "conv_4_dw_relu": (-5.2565, 13.1133),
    "conv_4_batchnorm": (-12.3671, 9.5266),
    "conv_5_dw_relu": (-7.389, 13.1801),
    "conv_5_batchnorm": (-7.4197, 8.2935),
    "conv_6_dw_relu": (-3.5664, 13.9961),
    "conv_6_batchnorm": (-9.7027, 11.7255),
    "conv_7_dw_relu": (-6.2228, 12.2892),
    "conv_7_batchnorm": (-6.419, 9.4814),
    "conv_8_dw_relu": (-4.7872, 14.3358),
    "conv_8_batchnorm": (-8.7202, 9.2187),
    "conv_9_dw_relu": (-5.4976, 13.0443),
    "conv_9_batchnorm": (-7.787, 9.8598),
    "conv_10_dw_relu": (-6.0148, 15.7242),
    "conv_10_batchnorm": (-8.1932, 10.7963),
    "conv_11_dw_relu": (-3.5887, 15.0228),
    "conv_11_batchnorm": (-7.7747, 11.3174),
    "conv_12_dw_relu": (-3.52, 15.7869),
    "conv_12_batchnorm": (-9.8205, 12.2451),
    "conv_13_dw_relu": (-4.4929, 14.1464),
    "conv_13_batchnorm": (-7.3176, 8.693),
    "conv_14_dw_relu": (-1.2679, 13.3166),
    "conv_14_batchnorm": (-8.0027, 6.7173),
    "flatten_254": (-0.7763, 0.7719),
}
"""Minimum and maximum of each quantised tensor (the convolutions' inputs, their batch norms' outputs, the
classifier's input) in the float network over the calibration faces (see the module docstring)."""


class Quantised(NamedTuple):
    """A pointwise convolution and the batch norm after it, replaced by one ``QLinearConv``."""

    conv: pb.Node
    norm: pb.Node


def _graph(model: bytes) -> tuple[list[pb.Field], list[pb.Field]]:
    top = list(pb.fields(model))
    return top, list(pb.fields(bytes(next(f.value for f in top if f.number == 7))))


def quantised(model: bytes) -> tuple[list[Quantised], dict[str, np.ndarray]]:
    """The convolutions of SFace's float graph to quantise (1x1, one group, :data:`MIN_WEIGHTS` or more weights, a
    batch norm reading their output and nothing else), and the graph's constants."""
    _, graph = _graph(model)
    consts = dict(pb.read_tensor(bytes(f.value)) for f in graph if f.number == 5)
    nodes = [pb.read_node(bytes(f.value)) for f in graph if f.number == 1]
    readers: dict[str, list[pb.Node]] = {}
    for n in nodes:
        for name in n.inputs:
            readers.setdefault(name, []).append(n)
    found = []
    for n in nodes:
        if n.op != "Conv" or n.ints.get("group", 1) != 1 or len(n.inputs) != 2:
            continue
        weight = consts[n.inputs[1]]
        if weight.shape[2:] != (1, 1) or weight.size < MIN_WEIGHTS:
            continue
        after = readers.get(n.outputs[0], [])
        if len(after) != 1 or after[0].op != "BatchNormalization":
            raise ValueError(f"SFace graph not as expected: {n.outputs[0]} is not read by one batch norm only")
        found.append(Quantised(n, after[0]))
    if len(found) != 12:
        raise ValueError(f"SFace graph not as expected: {len(found)} pointwise convolutions to quantise, not 12")
    return found, consts


def probed_tensors(model: bytes) -> list[str]:
    """The tensors whose ranges :data:`SFACE_INT8_RANGES` holds, in graph order."""
    convs, _ = quantised(model)
    return [name for q in convs for name in (q.conv.inputs[0], q.norm.outputs[0])] + [CLASSIFIER_INPUT]


def calibration_ranges(model: bytes, chips: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Minimum and maximum of each :func:`probed_tensors` in SFace's float ``model`` over ``chips`` (112x112 RGB
    uint8, as ``SfaceEmbedder`` takes them): what :data:`SFACE_INT8_RANGES` holds for its calibration faces."""
    names = probed_tensors(model)
    top, graph = _graph(model)
    probes = b"".join(
        pb.field(12, pb.value_info(name, ("n", "c", "h", "w")[: 2 if name == CLASSIFIER_INPUT else 4]))
        for name in names
    )
    probed = b"".join(pb.field(7, b"".join(f.raw for f in graph) + probes) if f.number == 7 else f.raw for f in top)
    session = ort.session(probed)
    blob = np.stack(chips).transpose(0, 3, 1, 2).astype(np.float32)
    values = session.run(names, {ort.SFACE_INPUT: blob})
    return {name: (round(float(v.min()), 4), round(float(v.max()), 4)) for name, v in zip(names, values, strict=True)}


def int8_model(model: bytes, ranges: dict[str, tuple[float, float]] | None = None) -> bytes:
    """SFace's float ``model`` (:func:`jobs.faces.ort.sface_float_model`) with its pointwise convolutions and its
    classifier in int8 over ``ranges`` (default :data:`SFACE_INT8_RANGES`); deterministic, so its hash can be
    pinned."""
    ranges = ranges or SFACE_INT8_RANGES
    convs, consts = quantised(model)
    by_output = {q.conv.outputs[0]: q for q in convs}
    folded_norms = {q.norm.outputs[0] for q in convs}
    top, graph = _graph(model)
    nodes: list[bytes] = []
    added: dict[str, np.ndarray] = {}
    scales: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def quantise(x: str) -> tuple[np.ndarray, np.ndarray]:
        if x not in scales:
            scales[x] = _uint8_affine(*ranges[x])
            added[f"{x}_s"], added[f"{x}_z"] = scales[x]
            nodes.append(pb.field(1, pb.node("QuantizeLinear", [x, f"{x}_s", f"{x}_z"], f"{x}_q")))
        return scales[x]

    for f in (f for f in graph if f.number == 1):
        n = pb.read_node(bytes(f.value))
        if n.op == "BatchNormalization" and n.outputs[0] in folded_norms:
            continue
        if n.op == "Conv" and n.outputs[0] in by_output:
            nodes += _qlinear_conv(by_output[n.outputs[0]], consts, quantise, ranges, added)
        elif n.op == "Gemm" and n.inputs[0] == CLASSIFIER_INPUT:
            nodes += _integer_classifier(n, consts, quantise, added)
        else:
            nodes.append(f.raw)
    used = {i for raw in nodes for i in pb.read_node(bytes(next(pb.fields(raw)).value)).inputs}
    out = b""
    for f in graph:
        if f.number == 5:
            out += f.raw if ort._name(f) in used else b""
        elif f.number != 1:
            out += f.raw
    out += b"".join(nodes) + b"".join(pb.field(5, pb.tensor_proto(k, v)) for k, v in added.items())
    return b"".join(pb.field(7, out) if f.number == 7 else f.raw for f in top)


def _qlinear_conv(q: Quantised, consts, quantise, ranges, added: dict[str, np.ndarray]) -> list[bytes]:
    """``Conv`` + ``BatchNormalization`` as ``QLinearConv`` (the norm folded into weights and bias) + dequantise."""
    gamma, beta, mean, var = (consts[i].astype(np.float64) for i in q.norm.inputs[1:5])
    k = gamma / np.sqrt(var + q.norm.floats.get("epsilon", 1e-5))
    weight = consts[q.conv.inputs[1]].astype(np.float64) * k[:, None, None, None]
    bias = beta - mean * k
    x, y = q.conv.inputs[0], q.norm.outputs[0]
    xs, xz = quantise(x)
    ys, yz = _uint8_affine(*ranges[y])
    ws = (np.maximum(np.abs(weight).reshape(len(weight), -1).max(axis=1), 1e-12) / WEIGHT_STEPS).astype(np.float32)
    added[f"{y}_wq"] = np.clip(np.rint(weight / ws[:, None, None, None]), -WEIGHT_STEPS, WEIGHT_STEPS).astype(np.int8)
    added[f"{y}_ws"], added[f"{y}_wz"] = ws, np.zeros(len(weight), np.int8)
    added[f"{y}_ys"], added[f"{y}_yz"] = ys, yz
    added[f"{y}_bq"] = np.rint(bias / (np.float64(xs) * ws)).astype(np.int32)
    inputs = [f"{x}_q", f"{x}_s", f"{x}_z", *(f"{y}_{key}" for key in ("wq", "ws", "wz", "ys", "yz", "bq"))]
    return [
        pb.field(1, pb.node("QLinearConv", inputs, f"{y}_q", kernel_shape=[1, 1])),
        pb.field(1, pb.node("DequantizeLinear", [f"{y}_q", f"{y}_ys", f"{y}_yz"], y)),
    ]


def _integer_classifier(gemm: pb.Node, consts, quantise, added: dict[str, np.ndarray]) -> list[bytes]:
    """The classifier ``Gemm`` (``x W^T + b``) as ``MatMulInteger`` on the quantised input and 7-bit weights per
    output feature, its int32 sums scaled back to float."""
    x, weight, bias = gemm.inputs[0], consts[gemm.inputs[1]], consts[gemm.inputs[2]]
    plain = gemm.floats.get("alpha", 1.0) == 1.0 and gemm.floats.get("beta", 1.0) == 1.0
    if gemm.ints.get("transB") != 1 or gemm.ints.get("transA", 0) != 0 or not plain:
        raise ValueError("SFace graph not as expected: a classifier Gemm other than x W^T + b")
    xs, xz = quantise(x)
    ws = (np.maximum(np.abs(weight).max(axis=1), 1e-12) / WEIGHT_STEPS).astype(np.float32)
    added["classifier_wq"] = np.ascontiguousarray(
        np.clip(np.rint(weight / ws[:, None]), -WEIGHT_STEPS, WEIGHT_STEPS).astype(np.int8).T
    )
    added["classifier_scale"] = (np.float32(xs) * ws).astype(np.float32)
    added["classifier_bias"] = bias.astype(np.float32)
    y = gemm.outputs[0]
    return [
        pb.field(1, pb.node("MatMulInteger", [f"{x}_q", "classifier_wq", f"{x}_z"], f"{y}_sums")),
        pb.field(1, pb.node("Cast", [f"{y}_sums"], f"{y}_sums_float", to=1)),
        pb.field(1, pb.node("Mul", [f"{y}_sums_float", "classifier_scale"], f"{y}_scaled")),
        pb.field(1, pb.node("Add", [f"{y}_scaled", "classifier_bias"], y)),
    ]
