"""numpy's BLAS runs on one thread once a face engine or a job's watchlist is set up (infra/threads.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info

from infra.threads import one_blas_thread


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_one_blas_thread_limits_numpys_blas_to_one_thread() -> None:
    import numpy  # noqa: F401  (loads its BLAS)

    if not _blas_threads():
        pytest.skip("this numpy loads no BLAS library threadpoolctl can see")
    one_blas_thread()
    assert _blas_threads() and set(_blas_threads()) == {1}


def _blas_threads_after(setup: str) -> str:
    """BLAS thread counts, printed by a fresh process that started with BLAS on two threads and then ran ``setup``."""
    code = (
        "import numpy\n"
        "from threadpoolctl import threadpool_info, threadpool_limits\n"
        "threadpool_limits(limits=2, user_api='blas')\n"
        f"{setup}\n"
        "print(sorted({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip()


def test_the_scoring_jobs_watchlist_setup_limits_blas_in_its_worker() -> None:
    """In a fresh process (a Flink Python worker), building the job's watchlist leaves BLAS on one thread."""
    setup = "from infra.settings import Settings\nfrom jobs.flink.operator import _watchlist\n_watchlist(Settings())"
    assert _blas_threads_after(setup) in ("[1]", "[]")


def test_a_face_engine_limits_blas_in_its_process() -> None:
    """The face stage, the watchlist service and the checkout inspector each build a face engine: building one
    leaves BLAS on one thread."""
    setup = (
        "from infra.settings import FaceSettings\nfrom jobs.faces.engine import FaceEngine\n"
        "FaceEngine(FaceSettings(detector='hog', embedder='dlib'))"
    )
    assert _blas_threads_after(setup) in ("[1]", "[]")
