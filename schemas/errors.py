"""The project's exceptions: one base, and the one for records the pipeline cannot use.

Every error the project raises on purpose derives from :class:`CheckoutGuardError`, so a caller can
tell ours from a library's. :class:`InvalidRecord` carries the dead-letter ``kind`` and ``reason``:
whatever stage meets a bad record raises it, and :func:`schemas.records.dead_letter` turns it into
the dead letter.
"""

from __future__ import annotations


class CheckoutGuardError(Exception):
    """Base of every exception the project raises on purpose."""


class InvalidRecord(CheckoutGuardError, ValueError):
    """A record the pipeline cannot use; ``kind`` is the dead-letter error kind."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
