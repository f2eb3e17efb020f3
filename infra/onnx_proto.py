"""The few ONNX protobuf fields this project writes and reads, without the ``onnx`` package, and its one way of
running a model (:func:`session`).

Why: the face models are built or rewritten in memory from hash-checked weight files (:mod:`jobs.faces.resnet`,
:mod:`jobs.faces.ort`), and the watchlist builds its int8 search from enrolled faces (:mod:`jobs.scoring.int8_rows`);
a handful of wire-format fields is all that takes, and one dependency fewer is one pin fewer next to numpy 1.26
(which PyFlink holds us to). Field numbers are onnx.proto's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

U8S8_STEPS = 63
"""The largest int8 magnitude for the int8 side of ONNX Runtime's uint8 x int8 products (``MatMulInteger``,
``QLinearConv``): on x86 CPUs without VNNI its kernels add pairs of products in int16 (``VPMADDUBSW``), and
2 x 255 x 127 = 64,770 would saturate at 32,767, where 2 x 255 x 63 = 32,130 cannot (its ``reduce_range``): results
are then the same on every CPU."""

DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64}
"""ONNX TensorProto data types this module can decode, to numpy."""


def session(model: bytes) -> Any:
    """An ONNX Runtime CPU session on one thread (scale out with processes, as for OpenCV), warnings off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class Field(NamedTuple):
    number: int
    value: int | bytes
    """The varint, or the payload of a length-delimited (or fixed-size) field."""
    raw: bytes
    """The whole field as encoded (key included): written back unchanged when not rewritten."""


def varint(v: int) -> bytes:
    """Base-128 varint; a negative number as its 64-bit two's complement (protobuf's int64)."""
    v = v + (1 << 64) if v < 0 else v
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _read_varint(b: bytes, o: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if o >= len(b):
            raise ValueError("truncated protobuf varint")
        byte = b[o]
        o += 1
        v |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return v, o


def fields(b: bytes) -> Iterator[Field]:
    """The top-level fields of one protobuf message, in order."""
    o = 0
    while o < len(b):
        start = o
        key, o = _read_varint(b, o)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, o = _read_varint(b, o)
        elif wire == 2:
            n, o = _read_varint(b, o)
            value, o = b[o : o + n], o + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, o = b[o : o + n], o + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if o > len(b):
            raise ValueError("truncated protobuf field")
        yield Field(number, value, b[start:o])


def field(number: int, value: bytes | int | str) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes/str/sub-messages."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


_KINDS = {np.dtype(v): k for k, v in DTYPES.items()}


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """ONNX TensorProto: dims (1), data_type (2: a type of :data:`DTYPES`), name (8), raw_data (9)."""
    if array.dtype not in _KINDS:
        raise ValueError(f"tensor {name!r}: {array.dtype} is not one of {sorted(str(d) for d in _KINDS)}")
    kind = _KINDS[array.dtype]
    dims = b"".join(field(1, int(d)) for d in array.shape)
    return dims + field(2, kind) + field(8, name) + field(9, array.astype(array.dtype.newbyteorder("<")).tobytes())


def read_tensor(b: bytes) -> tuple[str, np.ndarray]:
    """Name and value of a TensorProto stored as raw_data, float_data (as older exporters write float constants)
    or empty, of a type in :data:`DTYPES`."""
    name, dims, kind, raw, floats = "", [], 0, b"", b""
    for f in fields(b):
        if f.number == 1:  # dims: unpacked varints, or one packed run
            if isinstance(f.value, int):
                dims.append(f.value)
            else:
                o = 0
                while o < len(f.value):
                    d, o = _read_varint(f.value, o)
                    dims.append(d)
        elif f.number == 2:
            kind = int(f.value)
        elif f.number == 8:
            name = bytes(f.value).decode()
        elif f.number == 9:
            raw = bytes(f.value)
        elif f.number == 4:  # float_data: packed, or one fixed32 per field; little-endian either way
            floats += bytes(f.value)
        elif f.number in (5, 6, 7, 10, 11, 13):  # other typed data fields are not read here
            raise ValueError(f"tensor stored without raw_data (field {f.number})")
    if kind not in DTYPES or (floats and (kind != 1 or raw)):
        raise ValueError(f"tensor {name!r} of unsupported data type {kind}, or float_data where it cannot be")
    raw = raw or floats
    dtype = np.dtype(DTYPES[kind]).newbyteorder("<")
    return name, np.frombuffer(raw, dtype=dtype).astype(DTYPES[kind]).reshape(dims)


def node(op: str, inputs: list[str], output: str, **attrs: int | list[int]) -> bytes:
    """ONNX NodeProto: input (1), output (2), name (3), op_type (4), attribute (5: name 1, i 3, ints 8, type 20)."""
    body = b"".join(field(1, i) for i in inputs) + field(2, output) + field(3, output) + field(4, op)
    for key, value in attrs.items():
        if isinstance(value, int):
            attr = field(1, key) + field(3, value) + field(20, 2)
        else:
            attr = field(1, key) + b"".join(field(8, v) for v in value) + field(20, 7)
        body += field(5, attr)
    return body


class Node(NamedTuple):
    op: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, int]
    """Integer attributes."""
    floats: dict[str, float]
    """Float attributes (other attribute kinds are not read)."""


def read_node(b: bytes) -> Node:
    op, inputs, outputs, ints, floats = "", [], [], {}, {}
    for f in fields(b):
        if f.number == 1:
            inputs.append(bytes(f.value).decode())
        elif f.number == 2:
            outputs.append(bytes(f.value).decode())
        elif f.number == 4:
            op = bytes(f.value).decode()
        elif f.number == 5:
            attr = {a.number: a.value for a in fields(bytes(f.value))}
            if attr.get(20) == 2:  # INT
                ints[bytes(attr[1]).decode()] = _signed(int(attr.get(3, 0)))
            elif attr.get(20) == 1:  # FLOAT: f (2), a little-endian fixed32
                floats[bytes(attr[1]).decode()] = float(np.frombuffer(bytes(attr.get(2, bytes(4))), "<f4")[0])
    return Node(op, inputs, outputs, ints, floats)


def _signed(v: int) -> int:
    """int64 from its varint (negative numbers are encoded as 10-byte two's complement)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def value_info(name: str, shape: tuple[int | str, ...], elem_type: int = 1) -> bytes:
    """ValueInfoProto of a tensor: name (1), type (2) -> tensor_type (1) -> elem_type (1), shape (2) -> dim (1)
    -> dim_value (1) or dim_param (2, a symbolic size)."""
    dims = b"".join(field(1, field(2 if isinstance(d, str) else 1, d)) for d in shape)
    return field(1, name) + field(2, field(1, field(1, elem_type) + field(2, dims)))


def read_value_info(b: bytes) -> tuple[str, int, list[int | str]]:
    """Name, element type and shape (ints, or names of symbolic sizes) of a tensor ValueInfoProto."""
    name, elem, shape = "", 0, []
    for f in fields(b):
        if f.number == 1:
            name = bytes(f.value).decode()
        elif f.number == 2:
            tensor = next((t for t in fields(bytes(f.value)) if t.number == 1), None)
            if tensor is None:
                raise ValueError(f"{name!r} is not a tensor")
            for t in fields(bytes(tensor.value)):
                if t.number == 1:
                    elem = int(t.value)
                elif t.number == 2:
                    for dim in fields(bytes(t.value)):
                        d = next(fields(bytes(dim.value)), None)
                        shape.append("" if d is None else int(d.value) if d.number == 1 else bytes(d.value).decode())
    return name, elem, shape


def model_bytes(
    name: str, nodes: list[bytes], initializers: list[bytes], inputs: list[bytes], outputs: list[bytes], opset: int = 13
) -> bytes:
    """ModelProto: ir_version (1: 7), producer_name (2), graph (7: node 1, name 2, initializer 5, input 11, output 12)
    and the default domain's opset (8)."""
    graph = (
        b"".join(field(1, n) for n in nodes)
        + field(2, name)
        + b"".join(field(5, t) for t in initializers)
        + b"".join(field(11, v) for v in inputs)
        + b"".join(field(12, v) for v in outputs)
    )
    return field(1, 7) + field(2, "checkout-guard") + field(7, graph) + field(8, field(1, "") + field(2, opset))
