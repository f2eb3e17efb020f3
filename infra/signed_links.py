"""Short-lived signed links to a case's two images, for viewers that cannot log in.

Webex fetches the images of an adaptive card itself, without the dashboard's login, so the card's image
URLs carry their own permission: ``?exp=<unix s>&sig=<HMAC>`` over the case id, which image and the
expiry, under ``CG_ALERTS__IMAGE_LINK_KEY`` (shared by the alert sender, which signs, and the dashboard,
which verifies). A link opens exactly one image of one case until it expires; it opens no page, no
other image and no verdict. Without a key the links are plain and need the dashboard login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlencode

from infra import clock

SIGNING_DOMAIN = "checkout-guard.case-image.v1"
"""Prefix of the signed text, so a signature made for anything else (a bot command) never opens an image."""
IMAGE_PATH = "/images/"
"""Where a case's images hang below its case page: ``<case link>/images/live`` or ``/images/reference``."""


def _signature(key: str, case_id: str, which: str, expires_s: int) -> str:
    text = f"{SIGNING_DOMAIN}\n{case_id}\n{which}\n{expires_s}".encode()
    digest = hmac.new(key.encode(), text, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def image_link(case_link: str, case_id: str, which: str, key: str | None, now_s: float, ttl_s: float) -> str:
    """The URL of image ``which`` of the case at ``case_link``: signed to expire ``ttl_s`` after ``now_s``
    when there is a key, plain (login needed) when there is none."""
    url = f"{case_link}{IMAGE_PATH}{which}"
    if not key:
        return url
    expires_s = int(now_s + ttl_s)
    return f"{url}?{urlencode({'exp': expires_s, 'sig': _signature(key, case_id, which, expires_s)})}"


def verify_image_link(
    key: str | None, case_id: str, which: str, exp: str | None, sig: str | None, now_s: float
) -> bool:
    """Whether ``exp``/``sig`` (the link's query) open image ``which`` of ``case_id`` now: signed under
    ``key`` and not expired. Constant-time; ``False`` for anything malformed."""
    if not key or not exp or not sig or not clock.ascii_digits(exp) or len(exp) > 12:
        return False
    expires_s = int(exp)
    if expires_s < now_s:
        return False
    return hmac.compare_digest(_signature(key, case_id, which, expires_s).encode(), sig.encode())
