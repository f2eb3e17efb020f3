"""An int8 copy of a watchlist's search matrix that says, exactly, which rows can lie within a radius of a probe.

Why: a watchlist search is one matrix-vector product, and at 100k enrolled faces the float32 matrix (51 MB for 128
values a face) no longer fits this machine's last-level cache: memory traffic is the cost (~2.4 ms a probe on one
core here). The same rows in int8 take a quarter of the bytes, and ONNX Runtime's ``MatMulInteger`` (uint8 probe x
int8 rows, VNNI where the CPU has it; :data:`ROW_STEPS` where it has not) reads them in ~0.3 ms.

It misses no row. Each row ``e`` is kept as ``s q`` (``q`` int8, ``s`` the row's own scale) with its rounding
error ``|e - s q|`` measured once; the probe ``p`` as ``t r`` likewise. Then

    |e.p - s t (q.r)| <= |e - s q| |p| + |s q| |p - t r|

so ``|e|^2 - 2 (s t q.r + bound) + |p|^2`` never exceeds the true squared distance. Rows whose lower bound is
within the radius are *candidates*; the caller measures those again in float32 and keeps what really is within:
the rows a float32 pass over the whole matrix would keep (up to the last bit of float32 rounding, which a product
over gathered rows sums in another order than one over the whole matrix).
"""

from __future__ import annotations

import numpy as np

from infra.onnx_proto import U8S8_STEPS, model_bytes, node, session, tensor_proto, value_info

_ZERO = 128
"""The probe's zero point: ``MatMulInteger`` runs fastest with uint8 probes and int8 rows (u8s8)."""
ROW_STEPS = U8S8_STEPS
"""Rows take -63..63, not -127..127 (:data:`infra.onnx_proto.U8S8_STEPS`): on x86 CPUs without VNNI (Haswell to
Skylake, AMD Zen 2/3) a saturated product would come out too small, and the bound would drop a true match."""
_SLACK = 1e-4
"""Relative margin on the bound for rounding in the arithmetic that applies it (|e|^2 + |p|^2 scale)."""


def quantise_rows(matrix: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``matrix`` as integers in -steps..steps (int8) and its own scale (float32; 1 for a zero row):
    one row with large values cannot coarsen the others."""
    top = np.abs(matrix).max(axis=1) if matrix.size else np.zeros(len(matrix), np.float32)
    scales = np.where(top > 0, top / np.float32(steps), np.float32(1.0)).astype(np.float32)
    q = np.rint(matrix / scales[:, None])
    np.clip(q, -steps, steps, out=q)
    return q.astype(np.int8), scales


class Int8Rows:
    """The rows of ``matrix`` (float32, n x d) in int8, and the facts the bound needs."""

    def __init__(self, matrix: np.ndarray, norms: np.ndarray) -> None:
        """``norms``: each row's squared norm, as the caller computed it (the lower bound uses the same)."""
        rows, dim = matrix.shape
        finite = np.isfinite(matrix)
        clean = matrix if finite.all() else np.where(finite, matrix, np.float32(0.0))
        self._broken = np.flatnonzero(~finite.all(axis=1) | ~np.isfinite(norms))
        """Rows with a non-finite value (checked entries have none): always candidates, so that the float32 pass
        meets them exactly as a search without this copy would."""
        q, self._scales = quantise_rows(clean, ROW_STEPS)
        approx = q * self._scales[:, None]
        # float32 below: each pass over 100k rows is half the bytes of float64; _SLACK covers its rounding
        self._approx_norm = np.sqrt(np.einsum("ij,ij->i", approx, approx, dtype=np.float64)).astype(np.float32)
        approx -= clean
        # rounded up a little: the float32 copy must not understate the error
        self._error = (np.sqrt(np.einsum("ij,ij->i", approx, approx, dtype=np.float64)) * (1 + 1e-6)).astype(np.float32)
        self._low_norms = (norms.astype(np.float64) * (1.0 - _SLACK)).astype(np.float32)
        self._dim = dim
        self._session = session(
            model_bytes(
                "watchlist_int8",
                [node("MatMulInteger", ["probe", "rows", "zero"], "dots")],
                [tensor_proto("rows", q.T), tensor_proto("zero", np.array(_ZERO, dtype=np.uint8))],
                [value_info("probe", (1, dim), elem_type=2)],
                [value_info("dots", (1, rows), elem_type=6)],
            )
        )

    def dots(self, probe_steps: np.ndarray) -> np.ndarray:
        """The exact integer products of every row with ``probe_steps`` (-127..127), as ONNX Runtime computes them."""
        shifted = (probe_steps.astype(np.int16) + _ZERO).astype(np.uint8).reshape(1, self._dim)
        return self._session.run(None, {"probe": shifted})[0][0]

    def candidates(self, probe: np.ndarray, radius_squared: float) -> np.ndarray:
        """Indexes of the rows that may be within ``sqrt(radius_squared)`` of ``probe`` (every row that is, and some
        that are not: measure them again)."""
        r, t = quantise_rows(probe.reshape(1, -1), 127)
        scale = float(t[0])
        probe_error = float(np.linalg.norm(probe.astype(np.float64) - r[0].astype(np.float64) * scale))
        probe_norm = float(np.linalg.norm(probe.astype(np.float64)))
        squared = float(probe.astype(np.float64) @ probe.astype(np.float64))
        # the largest e.p can be: s_e t (q.r) + |e - s_e q| |p| + |s_e q| |p - t r|; then |e|^2 - 2 that, in place
        high = self.dots(r[0]).astype(np.float32)
        high *= self._scales
        high *= np.float32(scale)
        high += self._error * np.float32(probe_norm * (1 + 1e-6))
        high += self._approx_norm * np.float32(probe_error * (1 + 1e-6))
        high *= np.float32(-2.0)
        high += self._low_norms
        rows = np.flatnonzero(high <= np.float32(radius_squared - squared * (1.0 - _SLACK)))
        return np.union1d(rows, self._broken) if self._broken.size else rows
