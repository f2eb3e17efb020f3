"""OpenSearch contract: which topic goes to which index, the index and alias names, the templates.

Every reader and writer of the indices (the sink, the dashboards, the bot, the demo, backtests) takes
names from here, so an index is spelt once. Pure: no client; the templates are ``index_templates/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.topics import ALERTS, FACE_OBSERVATIONS, SCORED_TRANSACTIONS, TopicSpec

DEFAULT_GROUP_ID = "checkout-guard-opensearch"


TEMPLATE_DIR = Path(__file__).resolve().parent / "index_templates"


PERIOD_FORMATS = {"day": "%Y.%m.%d", "month": "%Y.%m"}
"""Suffix of a period index per ``indices.period``; dots keep the name apart from the kind's underscores."""


@dataclass(frozen=True)
class Route:
    """Where one topic's records go: the index kind (also the template file name), the business key,
    the field that picks the period index, and fields left out unless explicitly wanted."""

    topic: TopicSpec
    kind: str
    id_field: str
    time_field: str = "event_time"
    private_fields: tuple[str, ...] = ()

    def index(self, index_prefix: str) -> str:
        """The read alias of this kind (all its period indices)."""
        return index_name(index_prefix, self.kind)


ROUTES: tuple[Route, ...] = (
    Route(SCORED_TRANSACTIONS, "transactions", "transaction_id"),
    Route(ALERTS, "alerts", "alert_id"),
    Route(FACE_OBSERVATIONS, "face_observations", "observation_id", private_fields=("embedding",)),
)


def default_group_id(topic_prefix: str = "") -> str:
    """``<topic prefix>checkout-guard-opensearch``: sinks of different environments never share a group."""
    return f"{topic_prefix}{DEFAULT_GROUP_ID}"


def index_name(index_prefix: str, kind: str) -> str:
    """``<prefix>-<kind>``, the alias to read (search, count, dashboards); a backtest passes its own prefix."""
    return f"{index_prefix}-{kind}"


def period_index_name(index_prefix: str, kind: str, event_time_ms: int, period: str = "day") -> str:
    """``<prefix>-<kind>-2026.11.22`` (or ``-2026.11``): the index a document of that event time lives in.

    Derived from the record itself, never from the clock, so a replay lands on the same document.
    Raises ``ValueError`` for a time outside years 1..9999 or an unknown period.
    """
    if period not in PERIOD_FORMATS:
        raise ValueError(f"unknown index period {period!r} (day or month)")
    moment = datetime.fromtimestamp(event_time_ms / 1000, tz=UTC)
    return f"{index_name(index_prefix, kind)}-{moment.strftime(PERIOD_FORMATS[period])}"


def load_template(kind: str, index_prefix: str) -> dict[str, Any]:
    """The composable index template ``templates/<kind>.json``, bound to ``<prefix>-<kind>-*`` with the
    read alias ``<prefix>-<kind>``, so an index created by a bulk request joins the alias by itself."""
    body = json.loads((TEMPLATE_DIR / f"{kind}.json").read_text())
    alias = index_name(index_prefix, kind)
    body["index_patterns"] = [f"{alias}-*"]
    body["template"]["aliases"] = {alias: {}}
    return body


def period_of(index: str, index_prefix: str, kind: str) -> tuple[datetime, datetime] | None:
    """``[start, end)`` of the period a period index covers, or ``None`` if ``index`` is not exactly
    ``<prefix>-<kind>-<period>`` (e.g. an index of another prefix that merely starts like ours)."""
    head = f"{index_name(index_prefix, kind)}-"
    if not index.startswith(head):
        return None
    suffix = index[len(head) :]
    for period, fmt in PERIOD_FORMATS.items():
        try:
            start = datetime.strptime(suffix, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        if start.strftime(fmt) != suffix:  # strptime accepts "2026.1.2"; we never write that
            continue
        if period == "day":
            return start, datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return start, start.replace(year=year, month=month)
    return None
