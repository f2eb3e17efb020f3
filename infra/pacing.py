"""Pacing a sender to a rate (the POS producer, topic replays)."""

from __future__ import annotations


class TokenBucket:
    """Paces to ``rate`` per second on an absolute schedule, so sleep overshoot never accumulates
    (no drift); after a stall it catches up by at most ``burst`` tokens rather than flooding."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.interval = 1.0 / rate
        self._slack = max(1.0, burst if burst is not None else rate / 10) * self.interval
        self._next: float | None = None

    def reserve(self, now: float) -> float:
        """Take one token; returns how many seconds to wait before using it."""
        due = now if self._next is None else max(self._next, now - self._slack)
        self._next = due + self.interval
        return due - now if due > now else 0.0
