"""What an identifier may look like, checked where it enters the pipeline.

Identifiers travel into URL paths (Meraki serials are built from store and lane ids), object keys,
index ids and Webex cards. Escaping at every use is still required; the strict patterns here make
sure a hostile id is a dead letter at the edge instead of a path an API key is sent to.
"""

from __future__ import annotations

import re

from schemas.errors import InvalidRecord

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Store, lane, cashier and camera-serial parts: letters, digits, ``-`` and ``_``, at most 64."""
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
"""Transaction, receipt, customer, subject and case ids: no ``/``, ``?``, ``#``, ``%``, spaces or
controls; at most 128; the first character alphanumeric (so never ``.`` or ``..``)."""
ALERT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,511}")
"""An alert id: the characters of :data:`ID_RE`, but up to 512, since the scoring job builds it from other ids
(``blocked:<transaction>``, ``watchlist:entrance:<serial>:<oid>:<time>:<subject>``: up to about 320)."""
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""A Meraki camera serial (``Q2MV-ABCD-1234``) or one the project builds from store and lane names."""


def check(value: object, field: str, pattern: re.Pattern[str] = ID_RE) -> str:
    """``value`` if it is a string matching ``pattern`` entirely; else :class:`InvalidRecord` ``invalid_id``.

    The reason names the field and the length, never the value itself (it may be a hostile payload
    and it is logged).
    """
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        size = len(value) if isinstance(value, str) else 0
        shown = type(value).__name__ if not isinstance(value, str) else f"{size}-character string"
        raise InvalidRecord("invalid_id", f"{field} is not a valid identifier ({shown}; allowed: {pattern.pattern})")
    return value


def check_name(value: object, field: str) -> str:
    """A store/lane/cashier name (see :data:`NAME_RE`)."""
    return check(value, field, NAME_RE)


def check_serial(value: object, field: str = "camera serial") -> str:
    """A camera serial (see :data:`SERIAL_RE`)."""
    return check(value, field, SERIAL_RE)
