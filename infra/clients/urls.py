"""URL pieces every HTTP client builds the same way."""

from __future__ import annotations

from urllib.parse import quote


def path_segment(value: object) -> str:
    """``value`` as exactly one URL path segment: every reserved character escaped, dots too, so no
    value can add a segment, climb one (``..``), start a query or be read as another route."""
    if not isinstance(value, str) or not value:
        raise ValueError("an id in the request path is empty or not a string")
    return quote(value, safe="").replace(".", "%2E")
