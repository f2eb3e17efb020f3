"""How a face match reads for people -- its similarity, its threshold and its watch-list category: the alert
messages, the watch-list alerts' summaries (the scoring job's, which the dashboard shows) and the Webex bot's replies
alike. Here, at the bottom, so all give one match the same figure and words.
"""

from __future__ import annotations

import math
from decimal import ROUND_DOWN, Decimal

TENTH = Decimal("0.1")


def similarity_text(similarity: float) -> str:
    """``similarity`` (0-100) to one decimal, cut, not rounded: ``99.96`` reads ``99.9``, and only a perfect match
    reads ``100.0``. Rounded, a near match read as a perfect one (and every figure a little above what it was),
    overstating the evidence a person is asked to weigh."""
    value = float(similarity)
    if not math.isfinite(value) or abs(value) >= 1e15:  # nothing to cut (or no decimal left to cut)
        return f"{value:.1f}"
    return f"{Decimal(repr(value)).quantize(TENTH, rounding=ROUND_DOWN):f}"


def threshold_text(threshold: float, by_rekognition: bool = False) -> str:
    """The threshold a face match was taken at, as ``checkout <tx>``'s replies and the alert messages give it beside
    the similarity: ``the match threshold is 50.9``, or ``Rekognition's match threshold is 99.0`` (each engine on its
    own 0-100 scale: 68.8 is a clear local match, 99.1 a bare Rekognition one). Cut to a tenth like
    :func:`similarity_text`, so a similarity at or above its threshold never reads below it."""
    scale = "Rekognition's match threshold" if by_rekognition else "the match threshold"
    return f"{scale} is {similarity_text(threshold)}"


CATEGORY_WORDS: dict[str, str] = {"SUSPECT": "suspect", "VIP": "VIP"}
"""A watch-list category as the headlines write it ("Possible suspect ...", "Possible VIP ..."): lower-cased, a face
match read "similar to vip subj-..."."""


def category_words(category: str) -> str:
    """A watch-list category in words (:data:`CATEGORY_WORDS`); one not known as it came."""
    return CATEGORY_WORDS.get(category.upper(), category)
