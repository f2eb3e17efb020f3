"""The wall clock as the records carry it: epoch milliseconds.

Code that wants a testable clock takes one as a parameter (``clock`` / ``now_ms=None``) and falls back
to this; elapsed time and deadlines use ``time.monotonic`` instead.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Now, in milliseconds since the epoch (UTC)."""
    return time.time_ns() // 1_000_000


def is_epoch_ms(value: int) -> bool:
    """13-14 digits (2001-09-09 .. 5138): a time in seconds, or a date like 20230105, would read as January 1970."""
    return 10**12 <= value < 10**14


def ascii_digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes superscripts and other scripts' digits, which ``int``
    then refuses with a traceback instead of the caller's one-line error."""
    return text.isascii() and text.isdigit()


def is_epoch_ms_text(text: str) -> bool:
    """``text`` is epoch milliseconds written out (:func:`ascii_digits`, :func:`is_epoch_ms`); no more than 14
    digits are read, so a string of thousands costs nothing."""
    return ascii_digits(text) and len(text) <= 14 and is_epoch_ms(int(text))
