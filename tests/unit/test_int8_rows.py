"""The int8 copy of a search matrix (jobs/scoring/int8_rows.py): its candidates hold every row within the radius."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.scoring.int8_rows import Int8Rows


def _within(matrix: np.ndarray, probe: np.ndarray, radius: float) -> set[int]:
    squared = np.sum((matrix.astype(np.float64) - probe.astype(np.float64)) ** 2, axis=1)
    return set(np.flatnonzero(squared <= radius * radius).tolist())


@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_every_row_within_the_radius_is_a_candidate_and_few_others_are(scale):
    rng = np.random.default_rng(1)
    matrix = (rng.normal(0, 1, (2000, 128)) * scale).astype(np.float32)
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    for k in range(30):
        probe = (matrix[k * 7] + rng.normal(0, 0.6, 128) * scale).astype(np.float32)
        distances = np.linalg.norm(matrix - probe, axis=1)
        radius = float(np.sort(distances)[20])  # about 20 rows within: and rows just past the edge
        want = _within(matrix, probe, radius)
        got = set(rows.candidates(probe, radius * radius).tolist())
        assert want <= got
        assert len(got) <= 2 * len(want) + 10  # a bound, not the whole matrix


def test_an_outlier_value_that_sets_the_int8_scale_still_misses_no_row():
    """One huge value makes the int8 steps coarse for every other row: the bound grows with it, nothing is lost."""
    rng = np.random.default_rng(2)
    matrix = rng.normal(0, 0.1, (500, 64)).astype(np.float32)
    matrix[17, 3] = 40.0
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    for k in range(20):
        probe = (matrix[k] + rng.normal(0, 0.02, 64)).astype(np.float32)
        radius = float(np.sort(np.linalg.norm(matrix - probe, axis=1))[3])
        assert _within(matrix, probe, radius) <= set(rows.candidates(probe, radius * radius).tolist())


def test_a_zero_probe_and_a_zero_row_are_handled():
    matrix = np.zeros((10, 16), np.float32)
    matrix[1] = 0.5
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    probe = np.zeros(16, np.float32)
    assert {0, *range(2, 10)} <= set(rows.candidates(probe, 0.01).tolist())
    assert 1 not in rows.candidates(probe, 0.01)
    assert set(rows.candidates(probe, 1.0 + 16 * 0.25).tolist()) == set(range(10))
