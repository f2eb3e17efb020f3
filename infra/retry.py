"""Retrying, in one place: the ``Retry-After`` parser, the jittered backoff, and a tenacity-based
"call again on a retriable error, honour Retry-After, within a deadline" helper.

- :func:`parse_retry_after` reads an HTTP ``Retry-After`` header (delta-seconds or an HTTP date), never
  more than a cap: a server (or anyone in between) must not be able to park a client for hours.
- :class:`Backoff` is exponential with equal jitter, for loops that schedule their own retries (the
  OpenSearch sink's bulk retries, the alert sender's per-channel queue, ...).
- :func:`call_with_retries` runs a call until it succeeds, the error is not retriable, the attempts are
  used up or the next wait would pass the deadline; it then raises the call's own last error.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

T = TypeVar("T")


RETRY_AFTER_MAX_S = 60.0
"""Default cap of a ``Retry-After`` wait: long enough for any rate limit we meet (Meraki, Webex: seconds),
short enough that a hostile or broken header ("86400", a date next year) cannot stop a channel."""


def parse_retry_after(
    value: str | None,
    default: float,
    *,
    maximum_s: float = RETRY_AFTER_MAX_S,
    now: Callable[[], float] = time.time,
) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (``"7"``; fractions are accepted) or
    an HTTP date (``"Wed, 21 Oct 2026 07:28:00 GMT"``; one already past = 0). Missing, empty, negative,
    non-finite or unparseable -> ``default``. The result is never more than ``maximum_s`` (pass the
    caller's remaining deadline to wait no longer than it allows) and never negative. ``now``: wall
    clock (epoch seconds) for the date form."""
    seconds = _retry_after(value, default, now)
    cap = maximum_s if maximum_s >= 0 else 0.0  # NaN or negative: no wait at all
    return min(seconds, cap) if seconds >= 0 else 0.0  # a NaN or negative default: 0


def _retry_after(value: str | None, default: float, now: Callable[[], float]) -> float:
    if value is None or not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else default
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return default
    if when.tzinfo is None:  # "-0000" or an asctime date: HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    try:
        return max(0.0, when.timestamp() - now())
    except (OverflowError, ValueError, OSError):
        return default


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter: wait n lies in [cap/2, cap], cap = min(max, initial * 2**n).

    Bounded so a long outage is still probed every ``maximum_s``; jittered so several clients do not hit
    a recovering service in step.
    """

    initial_s: float = 0.5
    maximum_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        cap = min(self.maximum_s, self.initial_s * 2 ** min(max(attempt, 0), 30))
        return cap / 2 + (rng or random).uniform(0, cap / 2)


def call_with_retries(
    call: Callable[[], T],
    *,
    retriable: Callable[[BaseException], bool],
    wait: Callable[[int], float],
    attempts: int | None = None,
    deadline_s: float | None = None,
    retry_after: Callable[[BaseException], float | None] | None = None,
    maximum_s: float = math.inf,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    before_sleep: Callable[[BaseException, int, float], object] | None = None,
) -> T:
    """``call()``, called again while it raises an error ``retriable`` accepts.

    The wait before retry n (0 = the first retry) is ``retry_after(error)`` when that gives a value (the
    server's ``Retry-After``), else ``wait(n)`` -- e.g. ``Backoff(...).delay`` -- and never more than
    ``maximum_s``. It stops after ``attempts`` calls (None = no limit) or when the next wait would end
    past ``deadline_s`` from now (None = no deadline), and then raises the last error itself, as it also
    does at once for an error that is not retriable. ``before_sleep(error, attempts_so_far, seconds)``
    is called before each wait (to log or count). ``sleep`` (default ``time.sleep``) may raise to abandon
    the retries; ``clock`` (default ``time.monotonic``) measures the deadline.
    """
    now = clock if clock is not None else time.monotonic

    def next_wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        hint = retry_after(error) if retry_after is not None and error is not None else None
        seconds = wait(state.attempt_number - 1) if hint is None else hint
        return max(0.0, min(maximum_s, seconds))

    stops: list[Callable[[RetryCallState], bool]] = []
    if attempts is not None:
        stops.append(stop_after_attempt(max(1, attempts)))
    if deadline_s is not None:
        end = now() + deadline_s
        stops.append(lambda state: now() + (state.upcoming_sleep or 0.0) > end)

    def announce(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        assert before_sleep is not None and error is not None
        before_sleep(error, state.attempt_number, state.upcoming_sleep)

    retrying = Retrying(
        retry=retry_if_exception(retriable),
        wait=next_wait,
        stop=lambda state: any(stop(state) for stop in stops),
        sleep=sleep if sleep is not None else time.sleep,
        before_sleep=announce if before_sleep is not None else None,
        reraise=True,
    )
    return retrying(call)
