"""numpy's BLAS on one thread in the processes that analyse faces and search watchlists.

Why: numpy's OpenBLAS starts a thread per core, and after each product its threads spin, waiting for the next
one. Where the face stage or a Flink Python worker already has its core (one task slot per core, ONNX Runtime and
OpenCV on one thread each), those spinning threads take the CPU the networks need: measured on one core, a search
of a 100k-face ``fused3`` watchlist between frames doubled the CPU time of the next frame's analysis (~30 -> ~67 ms)
and the search itself cost more (5.5 -> 4.9 ms on one thread). The watchlist's matrix-vector products are bound by
memory bandwidth, so more threads gain little there anyway.
"""

from __future__ import annotations

from functools import cache

from threadpoolctl import threadpool_limits


@cache
def one_blas_thread() -> None:
    """Limit every BLAS library loaded in this process (numpy's OpenBLAS) to one thread, once per process."""
    threadpool_limits(limits=1, user_api="blas")
