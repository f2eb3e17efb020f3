"""The int8 copy of a search matrix (jobs/scoring/int8_rows.py): its candidates hold every row within the radius."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.scoring.int8_rows import ROW_STEPS, Int8Rows, quantise_rows


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


def test_onnx_runtime_products_equal_exact_integer_ones_at_the_extremes():
    """Rows at +-ROW_STEPS and probes at +-127 (shifted to 1 and 255): where a kernel that adds products in pairs in
    int16 would saturate (x86 without VNNI), the products must still be exact."""
    rng = np.random.default_rng(4)
    matrix = np.where(rng.random((300, 128)) < 0.5, -1.0, 1.0).astype(np.float32)
    matrix[0], matrix[1] = 1.0, -1.0
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    q, _ = quantise_rows(matrix, ROW_STEPS)
    assert int(np.abs(q).max()) == ROW_STEPS
    for probe in (np.full(128, 127), np.full(128, -127), rng.choice([-127, 127], 128), rng.integers(-127, 128, 128)):
        r = probe.astype(np.int8)
        np.testing.assert_array_equal(rows.dots(r), q.astype(np.int64) @ r.astype(np.int64))


@pytest.mark.parametrize("coarse_probe", [False, True])
def test_a_row_exactly_at_the_radius_is_a_candidate(coarse_probe):
    """The bound is tested at its edge: each row with the radius set to its own exact distance. A bound missing a
    term, or off by a factor, leaves out the rows whose int8 product overestimates the true one. ``coarse_probe``:
    one large value makes the probe's own int8 steps coarse, so its rounding error matters."""
    rng = np.random.default_rng(6)
    matrix = rng.normal(0, 0.1, (400, 128)).astype(np.float32)
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    probe = (matrix[0] + rng.normal(0, 0.05, 128)).astype(np.float32)
    if coarse_probe:
        probe[5] = 3.0
    exact = np.linalg.norm(matrix.astype(np.float64) - probe.astype(np.float64), axis=1)
    missed = [i for i in range(len(matrix)) if i not in set(rows.candidates(probe, float(exact[i]) ** 2).tolist())]
    assert missed == []


def test_one_row_with_large_values_does_not_coarsen_the_others():
    """Each row has its own int8 scale: a valid but large embedding leaves the others' candidates as they were."""
    rng = np.random.default_rng(8)
    matrix = rng.normal(0, 0.1, (2000, 128)).astype(np.float32)
    probe = (matrix[3] + rng.normal(0, 0.02, 128)).astype(np.float32)
    radius = float(np.sort(np.linalg.norm(matrix - probe, axis=1))[10])
    before = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix)).candidates(probe, radius * radius)
    matrix[77] = 0.0
    matrix[77, 0] = 100.0
    after = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix)).candidates(probe, radius * radius)
    assert set(after.tolist()) == set(before.tolist()) - {77}
    assert len(after) < 40


@pytest.mark.parametrize("rounded", ["row", "probe"])
def test_a_rounding_error_that_points_along_the_other_side_is_covered(rounded):
    """The worst case of each term of the bound, built on purpose: a row whose rounding error points along the probe
    (the product is then off by exactly |e - s q| |p|), or a probe whose rounding error points along the row (off by
    |s q| |p - t r|). With the radius at the row's exact distance, the row must still be a candidate."""
    rng = np.random.default_rng(12)
    steps, t = rng.integers(-40, 41, 128), 0.005
    steps[0] = ROW_STEPS  # the row's largest value: its int8 scale is s = 0.01 whatever the error added elsewhere
    r = rng.integers(-100, 101, 128)
    r[1] = 127  # the probe's largest value: its scale is t
    row, probe = 0.01 * steps.astype(np.float64), t * r.astype(np.float64)
    if rounded == "row":
        along = probe.copy()
        along[0] = 0.0
        row += 0.4 * 0.01 * along / np.abs(along).max()  # within half a step: it rounds back to the same integers
    else:
        along = row.copy()
        along[1] = 0.0
        probe += 0.4 * t * along / np.abs(along).max()
    matrix = np.vstack([row, rng.normal(0, 0.2, (50, 128))]).astype(np.float32)
    probe32 = probe.astype(np.float32)
    rows = Int8Rows(matrix, np.einsum("ij,ij->i", matrix, matrix))
    exact = float(np.linalg.norm(matrix[0].astype(np.float64) - probe32.astype(np.float64)))
    assert 0 in rows.candidates(probe32, exact * exact)
