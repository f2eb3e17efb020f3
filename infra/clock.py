"""The wall clock as the records carry it: epoch milliseconds.

Code that wants a testable clock takes one as a parameter (``clock`` / ``now_ms=None``) and falls back
to this; elapsed time and deadlines use ``time.monotonic`` instead.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Now, in milliseconds since the epoch (UTC)."""
    return time.time_ns() // 1_000_000
