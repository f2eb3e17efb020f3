"""An int8 copy of a watchlist's search matrix that says, exactly, which rows can lie within a radius of a probe.

Why: a watchlist search is one matrix-vector product, and at 100k enrolled faces the float32 matrix (51 MB for 128
values a face) no longer fits a CPU's last-level cache: memory traffic is the cost (~2.4 ms a probe on one core).
The same rows in int8 take a quarter of the bytes, and ONNX Runtime's ``MatMulInteger`` (uint8 probe x int8 rows,
VNNI where the CPU has it) reads them in ~0.3 ms.

It stays exact. Each row ``e`` is kept as ``s * q`` (``q`` int8, one scale ``s`` for the matrix) with its rounding
error ``|e - s q|`` measured once; the probe ``p`` as ``t * r`` likewise. Then

    |e.p - s t (q.r)| <= |e - s q| |p| + |s q| |p - t r|

so ``|e|^2 - 2 (s t q.r + bound) + |p|^2`` never exceeds the true squared distance. Rows whose lower bound is
within the radius are *candidates*; the caller measures those again in float32 and keeps what really is within:
the same rows, and the same nearest row, as a float32 pass over the whole matrix would give.
"""

from __future__ import annotations

import numpy as np

from infra.onnx_proto import model_bytes, node, session, tensor_proto, value_info

_ZERO = 128
"""The probe's zero point: ``MatMulInteger`` runs fastest with uint8 probes and int8 rows (u8s8)."""
_SLACK = 1e-4
"""Relative margin on the bound for float32 rounding in the arithmetic that applies it (|e|^2 + |p|^2 scale)."""


def _int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """``values`` as int8 (-127..127) and the scale that maps them back (symmetric, one for all)."""
    top = float(np.abs(values).max()) if values.size else 0.0
    scale = top / 127.0 if top > 0 else 1.0
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8), scale


class Int8Rows:
    """The rows of ``matrix`` (float32, n x d) in int8, and the float32 facts the bound needs."""

    def __init__(self, matrix: np.ndarray, norms: np.ndarray) -> None:
        """``norms``: each row's squared norm, as the caller computed it (the lower bound uses the same)."""
        rows, dim = matrix.shape
        finite = np.isfinite(matrix)
        clean = matrix if finite.all() else np.where(finite, matrix, np.float32(0.0))
        self._broken = np.flatnonzero(~finite.all(axis=1) | ~np.isfinite(norms))
        """Rows with a non-finite value (checked entries have none): always candidates, so that the float32 pass
        meets them exactly as a search without this copy would."""
        q, self._scale = _int8(clean)
        approx = q.astype(np.float32) * np.float32(self._scale)
        self._error = np.linalg.norm(clean - approx, axis=1).astype(np.float32)
        self._approx_norm = np.linalg.norm(approx, axis=1).astype(np.float32)
        self._norms = norms
        self._slack = np.float32(_SLACK) * norms
        self._dim = dim
        self._session = session(
            model_bytes(
                "watchlist_int8",
                [node("MatMulInteger", ["probe", "rows", "zero"], "dots")],
                [
                    tensor_proto("rows", np.ascontiguousarray(q.T)),
                    tensor_proto("zero", np.array(_ZERO, dtype=np.uint8)),
                ],
                [value_info("probe", (1, dim), elem_type=2)],
                [value_info("dots", (1, rows), elem_type=6)],
            )
        )

    def candidates(self, probe: np.ndarray, radius_squared: float) -> np.ndarray:
        """Indexes of the rows that may be within ``sqrt(radius_squared)`` of ``probe`` (every row that is, and some
        that are not: measure them again)."""
        r, t = _int8(probe)
        dots = self._session.run(None, {"probe": (r.astype(np.int16) + _ZERO).astype(np.uint8).reshape(1, self._dim)})
        probe_error = float(np.linalg.norm(probe - r.astype(np.float32) * np.float32(t)))
        probe_norm = float(np.linalg.norm(probe))
        squared = float(probe @ probe)
        # |e|^2 - 2 (the largest e.p can be), in place; with |p|^2 a lower bound of |e - p|^2, less the slack
        low = dots[0][0].astype(np.float32)
        low *= np.float32(self._scale * t)
        low += self._error * np.float32(probe_norm)
        low += self._approx_norm * np.float32(probe_error)
        low *= np.float32(-2.0)
        low += self._norms
        low -= self._slack
        rows = np.flatnonzero(low <= np.float32(radius_squared - squared * (1.0 - _SLACK)))
        return np.union1d(rows, self._broken) if self._broken.size else rows
