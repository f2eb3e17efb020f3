"""What the live dashboard asks OpenSearch, and how the answers become the page's JSON.

Pure functions (no client): the request bodies are built from a :class:`Window` and the answers are
reshaped into small, chart-ready structures, so both are unit-tested without a cluster. Everything is
an aggregation over the sink's read aliases, except the latest alerts and the Models view's label
join: the verdicts in force are read from the labels index (the most recently decided first, at most
:data:`MAX_LABELS`), the window's scored documents of those transactions are looked up by id, and
ROC-AUC is computed here (:func:`roc_auc`, the Mann-Whitney statistic; sinks do not import the
model code in ``jobs``) for the champion and the challenger side by side.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from infra.settings import AlertSettings
from schemas.model_artifact import id_digest, is_fallback, model_of
from sinks.alerts.message import store_time

OUTCOMES = ("APPROVE", "REVIEW", "BLOCK")
FACE_STATUSES = ("MATCHED", "NO_MATCH", "NO_FACE", "UNAVAILABLE")
LATENCY_FIELDS = ("ttdf_ms", "proc_time_ms", "model_time_ms")
PERCENTS = (50.0, 95.0, 99.0)
RATE_WINDOW_MS = 5 * 60 * 1000
"""Current rates are measured over the last five minutes of the window."""
INTERVALS_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
TARGET_BUCKETS = 60
STORES_SHOWN = 100
"""Store rows of the overview, the busiest first; the stores past them are reported as ``stores_more``."""
STORE_PICKER_SIZE = 1000
"""Store ids offered by the store picker; more are reported as ``all_stores_more``."""
CARDINALITY_EXACT = 40_000
"""``precision_threshold`` of the store counts: exact up to this many stores (OpenSearch's maximum)."""
CURRENCIES_SHOWN = 200
"""Currencies per money figure: more than ISO 4217 lists, so no currency is ever cut off."""
MONEY_DECIMALS = 4
"""Money figures are rounded to the largest minor unit ISO 4217 has (CLF, UYW; KWD, BHD, OMR have 3): the float
sum's noise goes, no currency's smallest unit does (cents would drop a fils of every dinar figure)."""
ALERT_FIELDS = (
    "alert_id",
    "kind",
    "severity",
    "event_time",
    "store_id",
    "lane_id",
    "transaction_id",
    "amount",
    "currency",
    "outcome",
    "risk_score",
    "reasons",
    "subject_id",
    "category",
    "similarity",
    "match_threshold",
    "snapshot_ref",
    "summary",
)
"""What the live page's alert list and an alert's page show. ``subject_id`` is the watch-list id the face matched
(``subj-<tx>`` or one the enrolment gave): it names nobody, and a forget leaves it, as on the case page."""


@dataclass(frozen=True)
class Window:
    """The event-time range ``[start_ms, end_ms)`` the page shows, optionally one store only; ``zone``: the IANA zone
    (or UTC offset) whose clock the charts' buckets start on (:func:`chart_zone`: the store's, else the viewer's, a
    name checked against this machine's zones), None for UTC's."""

    start_ms: int
    end_ms: int
    store: str | None = None
    zone: str | None = None

    @property
    def interval_s(self) -> int:
        """The smallest bucket width giving at most ~60 buckets, so charts stay legible at any range."""
        span_s = max(1, (self.end_ms - self.start_ms) // 1000)
        return next((i for i in INTERVALS_S if span_s / i <= TARGET_BUCKETS), INTERVALS_S[-1])

    def filters(self, start_ms: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {
                "range": {
                    "event_time": {
                        "gte": self.start_ms if start_ms is None else start_ms,
                        "lt": self.end_ms,
                        "format": "epoch_millis",
                    }
                }
            }
        ]
        if self.store:
            out.append({"term": {"store_id": self.store}})
        return out

    def histogram(self, **sub_aggs: Any) -> dict[str, Any]:
        """A date histogram over the whole window, empty buckets included, so the x axis is continuous. With a
        ``zone`` OpenSearch starts the buckets on that clock (``time_zone``: whole intervals from its midnight, so a
        6 h bucket starts at 00, 06, 12 and 18 there; a day with a DST change keeps those starts, the bucket holding
        the change an hour short or long); before, always on UTC's, 19:00 in New York and 05:30 in Kolkata. The
        bounds are given as they are: OpenSearch rounds them by the same rule, gaps and repeated hours included,
        where a UTC rounding here put the first bucket a whole interval early on such a clock."""
        histogram: dict[str, Any] = {
            "field": "event_time",
            "fixed_interval": f"{self.interval_s}s",
            "min_doc_count": 0,
            "extended_bounds": {"min": self.start_ms, "max": self.end_ms - 1},
        }
        if self.zone:
            histogram["time_zone"] = self.zone
        return {"date_histogram": histogram, **({"aggs": sub_aggs} if sub_aggs else {})}

    def at_fixed_offset(self) -> Window:
        """This window with its named zone replaced by the UTC offset that zone keeps at the window's end
        (:func:`zone_offset`), as for a machine zone the system does not name: for a name OpenSearch does not know.
        Buckets before a DST change in the window then start an hour off that zone's hours."""
        return replace(self, zone=zone_offset(self.zone, self.end_ms)) if self.zone else self


def _percentiles(field: str) -> dict[str, Any]:
    return {"percentiles": {"field": field, "percents": list(PERCENTS)}}


def _outcomes() -> dict[str, Any]:
    return {"terms": {"field": "outcome", "size": len(OUTCOMES)}}


def _currencies() -> dict[str, Any]:
    return {"terms": {"field": "currency", "size": CURRENCIES_SHOWN}}


def _money(where: dict[str, Any]) -> dict[str, Any]:
    """The amounts of the transactions ``where`` selects, summed per currency: a scored transaction has no
    amount in one reference currency, so a sum over USD, EUR and GBP together would mean nothing."""
    return {
        "filter": where,
        "aggs": {"currencies": {**_currencies(), "aggs": {"amount": {"sum": {"field": "amount"}}}}},
    }


def _sales() -> dict[str, Any]:
    """Revenue = sales that were not blocked (as the saved "Revenue" panel), per currency."""
    return _money({"bool": {"filter": [{"term": {"kind": "SALE"}}], "must_not": [{"term": {"outcome": "BLOCK"}}]}})


def _prevented() -> dict[str, Any]:
    """Value prevented = amounts of blocked transactions (seed 001), per currency."""
    return _money({"term": {"outcome": "BLOCK"}})


def _store_count() -> dict[str, Any]:
    return {"cardinality": {"field": "store_id", "precision_threshold": CARDINALITY_EXACT}}


def _store_picker() -> dict[str, Any]:
    """Every store's id for the picker, over all time (a store is picked before its window is known), and how
    many stores there are, so the picker can say how many it could not list."""
    return {
        "global": {},
        "aggs": {"ids": {"terms": {"field": "store_id", "size": STORE_PICKER_SIZE}}, "count": _store_count()},
    }


def _picker(agg: dict[str, Any] | None) -> dict[str, Any]:
    """``all_stores`` (sorted) and ``all_stores_more``: the stores the picker could not list."""
    ids = sorted(_buckets((agg or {}).get("ids")))
    return {"all_stores": ids, "all_stores_more": _more(ids, (agg or {}).get("ids"), (agg or {}).get("count"))}


def _more(shown: list[str], terms: dict[str, Any] | None, count: dict[str, Any] | None) -> int:
    """How many stores a ``terms`` aggregation left out: the store count minus those shown, at least one when
    the aggregation says it left documents out."""
    left = max(0, int((count or {}).get("value") or 0) - len(shown))
    return max(left, 1) if int((terms or {}).get("sum_other_doc_count") or 0) > 0 else left


def latest_event_query(store: str | None = None) -> dict[str, Any]:
    """The newest event time (to anchor the window at the data, e.g. while a replay of history runs)."""
    query: dict[str, Any] = {"term": {"store_id": store}} if store else {"match_all": {}}
    return {"size": 0, "query": query, "aggs": {"latest": {"max": {"field": "event_time"}}}}


def overview_query(window: Window) -> dict[str, Any]:
    return {
        "size": 0,
        "track_total_hits": True,
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {
            "outcomes": _outcomes(),
            "currencies": _currencies(),
            "sales": _sales(),
            "prevented": _prevented(),
            "recent": {
                "filter": {"range": {"event_time": {"gte": window.end_ms - RATE_WINDOW_MS}}},
                "aggs": {"outcomes": _outcomes()},
            },
            **{f"latency_{field}": _percentiles(field) for field in LATENCY_FIELDS},
            "series": window.histogram(
                outcomes=_outcomes(), sales=_sales(), prevented=_prevented(), ttdf=_percentiles("ttdf_ms")
            ),
            "store_count": _store_count(),
            "stores": {
                "terms": {"field": "store_id", "size": STORES_SHOWN, "order": [{"_count": "desc"}, {"_key": "asc"}]},
                "aggs": {
                    "outcomes": _outcomes(),
                    "sales": _sales(),
                    "prevented": _prevented(),
                    "ttdf": _percentiles("ttdf_ms"),
                },
            },
            "stores_all": _store_picker(),
        },
    }


def alerts_query(window: Window, size: int) -> dict[str, Any]:
    return {
        "size": size,
        "track_total_hits": True,
        "sort": [{"event_time": {"order": "desc"}}, {"alert_id": {"order": "desc"}}],
        "_source": list(ALERT_FIELDS),
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {"kinds": {"terms": {"field": "kind", "size": 10}}},
    }


TRANSACTION_FIELDS = (
    "transaction_id",
    "event_time",
    "store_id",
    "lane_id",
    "cashier_id",
    "kind",
    "original_transaction_id",
    "amount",
    "currency",
    "item_count",
    "product_category",
    "outcome",
    "risk_score",
    "reasons",
    "indicators",
    "model_score",
    "model_version",
    "challenger_score",
    "challenger_version",
    "rules_version",
    "face_status",
    "face_subject_id",
    "face_category",
    "face_similarity",
    "ttdf_ms",
)
"""What an alert's page shows of its transaction: the decision and its grounds, no card or customer keys."""


def alert_by_id_query(alert_id: str, fields: tuple[str, ...] = ("snapshot_ref",)) -> dict[str, Any]:
    return {"size": 1, "_source": list(fields), "query": {"term": {"alert_id": alert_id}}}


def transaction_by_id_query(transaction_id: str) -> dict[str, Any]:
    return {"size": 1, "_source": list(TRANSACTION_FIELDS), "query": {"term": {"transaction_id": transaction_id}}}


def faces_query(window: Window) -> dict[str, Any]:
    return {
        "size": 0,
        "track_total_hits": True,
        "query": {"bool": {"filter": window.filters()}},
        "aggs": {
            "statuses": {"terms": {"field": "status", "size": len(FACE_STATUSES)}},
            "categories": {
                "filter": {"term": {"status": "MATCHED"}},
                "aggs": {"by": {"terms": {"field": "category", "size": 5}}},
            },
            "series": window.histogram(statuses={"terms": {"field": "status", "size": len(FACE_STATUSES)}}),
        },
    }


# ----------------------------------------------------------------------------- answers -> page JSON


def _buckets(agg: dict[str, Any] | None) -> dict[str, int]:
    return {str(b["key"]): int(b["doc_count"]) for b in (agg or {}).get("buckets", [])}


def _counts(agg: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, int]:
    found = _buckets(agg)
    return {key: found.get(key, 0) for key in keys} | {k: v for k, v in found.items() if k not in keys}


def _amounts(agg: dict[str, Any] | None, currencies: list[str]) -> dict[str, float]:
    """Money per currency: every currency of the window in its order (0 where this figure has none), then any
    other this figure has. Never one number over several currencies."""
    found = {
        str(b["key"]): round(float((b.get("amount") or {}).get("value") or 0.0), MONEY_DECIMALS)
        for b in ((agg or {}).get("currencies") or {}).get("buckets", [])
    }
    return {c: found.get(c, 0.0) for c in currencies} | {c: v for c, v in found.items() if c not in currencies}


def _pcts(agg: dict[str, Any] | None) -> dict[str, float | None]:
    values = (agg or {}).get("values") or {}
    out: dict[str, float | None] = {}
    for pct in PERCENTS:
        value = values.get(str(pct), values.get(f"{pct:.1f}"))
        out[f"p{int(pct)}"] = None if value is None else round(float(value), 1)
    return out


def _total(answer: dict[str, Any]) -> int:
    total = answer.get("hits", {}).get("total", 0)
    return int(total["value"] if isinstance(total, dict) else total)


def shape_overview(answer: dict[str, Any], window: Window) -> dict[str, Any]:
    aggs = answer.get("aggregations", {})
    outcomes = _counts(aggs.get("outcomes"), OUTCOMES)
    total = _total(answer)
    recent = _counts((aggs.get("recent") or {}).get("outcomes"), OUTCOMES)
    recent_total = sum(recent.values())
    rate_minutes = min(RATE_WINDOW_MS, window.end_ms - window.start_ms) / 60_000
    currencies = list(_buckets(aggs.get("currencies")))  # the most transactions first
    stores = (aggs.get("stores") or {}).get("buckets", [])  # the busiest STORES_SHOWN

    def money(agg: dict[str, Any] | None) -> dict[str, float]:
        return _amounts(agg, currencies)

    return {
        "window": {
            "start": window.start_ms,
            "end": window.end_ms,
            "interval_s": window.interval_s,
            "store": window.store,
        },
        "currencies": currencies,
        "totals": {
            "transactions": total,
            "revenue": money(aggs.get("sales")),
            "value_prevented": money(aggs.get("prevented")),
            **{outcome.lower(): outcomes[outcome] for outcome in OUTCOMES},
        },
        "rates": {
            "per_minute": round(recent_total / rate_minutes, 2) if rate_minutes > 0 else 0.0,
            "block_rate": round(recent["BLOCK"] / recent_total, 4) if recent_total else 0.0,
            "review_rate": round(recent["REVIEW"] / recent_total, 4) if recent_total else 0.0,
            "minutes": round(rate_minutes, 2),
        },
        "outcomes": outcomes,
        "latency": {field: _pcts(aggs.get(f"latency_{field}")) for field in LATENCY_FIELDS},
        "series": [
            {
                "t": int(b["key"]),
                "count": int(b["doc_count"]),
                **_counts(b.get("outcomes"), OUTCOMES),
                "revenue": money(b.get("sales")),
                "prevented": money(b.get("prevented")),
                **_pcts(b.get("ttdf")),
            }
            for b in (aggs.get("series") or {}).get("buckets", [])
        ],
        "stores": sorted(
            (
                {
                    "store_id": str(b["key"]),
                    "count": int(b["doc_count"]),
                    **_counts(b.get("outcomes"), OUTCOMES),
                    "revenue": money(b.get("sales")),
                    "prevented": money(b.get("prevented")),
                    "ttdf_p99": _pcts(b.get("ttdf"))["p99"],
                }
                for b in stores
            ),
            key=lambda row: row["store_id"],
        ),
        "stores_more": {
            "stores": _more([str(b["key"]) for b in stores], aggs.get("stores"), aggs.get("store_count")),
            "transactions": int((aggs.get("stores") or {}).get("sum_other_doc_count") or 0),
        },
        **_picker(aggs.get("stores_all")),
    }


SNAPSHOT_URL = "/api/alerts/{alert_id}/snapshot"


def public_alert(source: dict[str, Any], alerts: AlertSettings) -> dict[str, Any]:
    """An alert for the page: a thumbnail URL where it has a snapshot, never the image ref itself, and
    ``local_time``, its time as its message gives it (in its store's zone, ``alerts``' zones; None without a time or
    for one no date holds): a guard who opens a page from the message reads the same time, where the pages gave it
    in UTC, hours off. ``event_time`` stays as it was."""
    out = dict(source)
    ref = out.pop("snapshot_ref", None)
    out["thumbnail"] = SNAPSHOT_URL.format(alert_id=out["alert_id"]) if ref else None
    out["local_time"] = store_time(out.get("event_time"), out.get("store_id"), alerts)
    return out


def shape_alerts(answer: dict[str, Any], alerts: AlertSettings) -> dict[str, Any]:
    """Latest alerts, newest first (each with its ``local_time``: :func:`public_alert`)."""
    rows = [public_alert(hit.get("_source", {}), alerts) for hit in answer.get("hits", {}).get("hits", [])]
    return {"total": _total(answer), "kinds": _buckets(answer.get("aggregations", {}).get("kinds")), "alerts": rows}


def one_clock(store: str | None, alerts: AlertSettings) -> bool:
    """Whether the charts of ``store`` (None: every store) have one store-local clock: a store chosen, or a chain
    whose stores all keep ``CG_ALERTS__TIMEZONE`` (no ``CG_ALERTS__STORE_TIMEZONES`` entry says otherwise)."""
    return bool(store) or all(zone == alerts.timezone for zone in alerts.store_timezones.values())


def chart_zone(
    store: str | None, alerts: AlertSettings, start_ms: int, end_ms: int, viewer: object = None
) -> str | None:
    """The zone the charts' buckets of ``store`` (None: every store) over ``[start_ms, end_ms)`` start on
    (:meth:`Window.histogram`): that of the one clock they are shown on (:func:`one_clock`; the store's zone as
    :func:`store_time` takes it), so their starts read as whole hours there; without ``CG_ALERTS__TIMEZONE``, the
    machine's zone (:func:`machine_zone`). Where they have no one clock (a chain across zones, no store chosen) the
    page shows them in the viewer's browser zone, which it sends as ``viewer``: that zone where :func:`viewer_zone`
    takes it (before, always UTC's hours: 6 h buckets from 04:30 and 10:30 in Adelaide), else None, UTC's hours."""
    if not one_clock(store, alerts):
        return viewer_zone(viewer)
    return alerts.zone_of(store) or machine_zone(start_ms, end_ms)


VIEWER_ZONE_MAX = 64
"""Longest viewer zone looked at: twice IANA's longest name (``America/Argentina/ComodRivadavia``, 32)."""
ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*")
"""What an IANA zone name is written with (``America/Port-au-Prince``, ``Etc/GMT+5``)."""
NO_PLACE_ZONES = frozenset({"localtime", "posixrules", "Factory"})
"""Files of a zoneinfo folder that name no place: this machine's own zone, a template, tzdata's placeholder;
OpenSearch knows none of them."""


@functools.cache
def known_zones() -> frozenset[str]:
    """The IANA zones this machine knows (zoneinfo's list: the system's database, else the tzdata package)."""
    return frozenset(available_timezones()) - NO_PLACE_ZONES


def viewer_zone(name: object) -> str | None:
    """``name``, the zone a page's browser says it is in (``viewer_zone``), where it is an IANA zone this machine
    knows, as written (``Australia/Adelaide``); else None. Nothing else of a request reaches a query: the name is
    only looked up, never parsed or opened as a path. An unknown name (a browser's tzdata newer than this machine's,
    Chrome's ``Etc/Unknown``) or any other text is not refused: the charts' buckets start on UTC's hours, as before,
    and their ticks keep their minutes; a 400 would leave the page without charts and stop its refreshing, for where
    the buckets start."""
    if not isinstance(name, str) or len(name) > VIEWER_ZONE_MAX or not ZONE_NAME.fullmatch(name):
        return None
    return name if name in known_zones() else None


def machine_offset(at_ms: int) -> str:
    """This machine's UTC offset at ``at_ms`` as OpenSearch takes a zone: ``+05:30``, ``-08:00``; UTC's at a time no
    date holds (a window anchored at an out-of-range event)."""
    try:
        offset = datetime.fromtimestamp(at_ms / 1000).astimezone().utcoffset()
    except (OverflowError, OSError, ValueError):
        offset = None
    return _offset_text(offset)


def zone_offset(name: str, at_ms: int) -> str:
    """The UTC offset the zone ``name`` keeps at ``at_ms``, as OpenSearch takes a zone (``-07:00``): what the charts'
    buckets start on where OpenSearch does not know the name (:func:`zone_unknown_to_opensearch`); UTC's where this
    machine cannot say either."""
    try:
        offset = datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(ZoneInfo(name)).utcoffset()
    except (ZoneInfoNotFoundError, OverflowError, OSError, ValueError):
        offset = None
    return _offset_text(offset)


def _offset_text(offset: timedelta | None) -> str:
    minutes = round(offset.total_seconds() / 60) if offset is not None else 0
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


UNKNOWN_ZONE = "Unknown time-zone ID: "
"""How Java's ``ZoneId.of`` refuses a region it has no rules for (``ZoneRulesException``), which OpenSearch gives as
the reason of the error's ``caused_by`` (``zone_rules_exception``) under its 400."""
ERROR_DEPTH = 8
"""Levels of an error answer looked through: OpenSearch nests a cause or two (``caused_by``, ``root_cause``)."""


def zone_unknown_to_opensearch(info: object, zone: str, depth: int = ERROR_DEPTH) -> bool:
    """Whether ``info``, the JSON of an OpenSearch 400 answer to a chart query, says that OpenSearch's JVM has no rules
    for ``zone``, the ``time_zone`` the query gave (a reason ``Unknown time-zone ID: <zone>`` at any depth of the error:
    a ``zone_rules_exception`` under the ``x_content_parse_exception`` of the ``date_histogram``'s ``time_zone``, or
    as an ``illegal_argument_exception``'s text): Python's zone list and Java's tzdata are updated apart, so a name one
    lists (``America/Ciudad_Juarez``, 2022) may be unknown to the other. Any other refusal is not this one."""
    if depth <= 0:
        return False
    if isinstance(info, dict):
        reason = info.get("reason")
        if isinstance(reason, str) and reason.endswith(UNKNOWN_ZONE + zone):
            return True
        return any(zone_unknown_to_opensearch(value, zone, depth - 1) for value in info.values())
    if isinstance(info, list):
        return any(zone_unknown_to_opensearch(value, zone, depth - 1) for value in info)
    return False


LOCALTIME = Path("/etc/localtime")
"""Where the system names its zone: a link into its zoneinfo folder (``.../zoneinfo/Europe/Berlin``)."""
DAY_MS = 86_400_000


def machine_zone(start_ms: int, end_ms: int, localtime: Path | None = None) -> str:
    """This machine's zone over ``[start_ms, end_ms)`` as OpenSearch takes it: its IANA name where the system's link
    names one (:func:`localtime_name`; ``localtime``: that link, :data:`LOCALTIME` by default) and that zone gives the
    UTC offset of this process's own clock all through the window (at its start, its end and each day between: ``TZ``
    may set another zone), so buckets across a DST change start on its hours on both sides; else its offset at the
    window's end (:func:`machine_offset`), which aligns the buckets before a change an hour off."""
    name = localtime_name(LOCALTIME if localtime is None else localtime)
    if name is not None and keeps_local_offsets(name, start_ms, end_ms):
        return name
    return machine_offset(end_ms)


def localtime_name(localtime: Path) -> str | None:
    """The zone the link ``localtime`` names, as tzlocal reads it: its target's path past ``/zoneinfo/``
    (``/usr/share/zoneinfo/Europe/Berlin``: ``Europe/Berlin``), the link itself first, then where its links end;
    None where it is no link (a copied file) or names no zone this machine lists (:func:`known_zones`)."""
    try:
        targets = (os.readlink(localtime), os.path.realpath(localtime))
    except (OSError, ValueError):
        return None
    for target in targets:
        _, found, name = target.rpartition("/zoneinfo/")
        if found and name in known_zones():
            return name
    return None


def keeps_local_offsets(name: str, start_ms: int, end_ms: int) -> bool:
    """Whether the zone ``name`` gives the UTC offset of this process's clock at ``start_ms``, ``end_ms`` and each day
    between (a zone's offsets hold for weeks at least: a day apart misses no difference; about 400 points at most)."""
    try:
        zone = ZoneInfo(name)
        step = max(DAY_MS, (end_ms - start_ms) // 400)
        for at_ms in (*range(start_ms, end_ms, step), end_ms):
            moment = datetime.fromtimestamp(at_ms / 1000, tz=UTC)
            if moment.astimezone().utcoffset() != moment.astimezone(zone).utcoffset():
                return False
    except (ZoneInfoNotFoundError, OverflowError, OSError, ValueError):
        return False
    return True


def with_store_times(shaped: dict[str, Any], store: str | None, alerts: AlertSettings) -> dict[str, Any]:
    """``shaped`` (an overview, the face activity, the models view or the drift rows) with its times as the alert
    messages give them (:func:`store_time`: the store's zone, named), where the page has one such clock
    (:func:`one_clock`): each chart point's ``local`` (its bucket's start), each drift row's ``local_hour`` (its hour's
    start) and the window's ``local_end``; as it was otherwise, a chain across zones with no store chosen, which the
    page shows in the viewer's own zone, named. The live and models pages thus read one clock: before, the charts,
    then the models page's window end and drift hours, were in UTC while the alert list and the case pages gave store
    times. ``t``, ``hour_start`` and ``end`` stay epoch ms."""
    if not one_clock(store, alerts):
        return shaped

    def at(time_ms: object) -> str | None:
        return store_time(time_ms, store, alerts)

    out = dict(shaped)
    if isinstance(series := shaped.get("series"), list):
        out["series"] = [{**p, "local": at(p.get("t"))} for p in series]
    if isinstance(drift := shaped.get("models"), list):
        out["models"] = [{**row, "local_hour": at(row.get("hour_start"))} for row in drift]
    if isinstance(window := shaped.get("window"), dict):
        out["window"] = {**window, "local_end": at(window.get("end"))}
    return out


def shape_faces(answer: dict[str, Any]) -> dict[str, Any]:
    aggs = answer.get("aggregations", {})
    return {
        "total": _total(answer),
        "statuses": _counts(aggs.get("statuses"), FACE_STATUSES),
        "matches_by_category": _buckets((aggs.get("categories") or {}).get("by")),
        "series": [
            {"t": int(b["key"]), **_counts(b.get("statuses"), FACE_STATUSES)}
            for b in (aggs.get("series") or {}).get("buckets", [])
        ],
    }


# ----------------------------------------------------------------------------- models: champion and challenger

SCORE_MAX = 1000
SCORE_BIN = 50
"""Score histograms: 20 bins of 50 over 0-1000 (a score of 1000 counts in the last bin)."""
MODEL_ROLES: dict[str, tuple[str, str]] = {
    "champion": ("model_score", "model_version"),
    "challenger": ("challenger_score", "challenger_version"),
}
"""Role -> (score field, version field) on a scored transaction. Only the champion decides."""
VERSIONS_SHOWN = 10
LABEL_PAGE = 5_000
MAX_LABELS = 20_000
"""Labels joined per request, the most recently decided first; more is reported as ``truncated``."""
ID_CHUNK = 5_000
"""Transaction ids per ``terms`` lookup of scored documents (below ``index.max_result_window``)."""
Z95 = 1.959964


def models_query(window: Window) -> dict[str, Any]:
    """Score distributions over the window (and store) per model version in each role: a fixed-width
    histogram each, empty bins included, with count/mean and its newest row's time; and the newest scored
    record's versions (who holds each role now). A version's scores do not depend on its role, so a version's
    figures pool both."""
    histogram = {
        "interval": SCORE_BIN,
        "min_doc_count": 0,
        "extended_bounds": {"min": 0, "max": SCORE_MAX - SCORE_BIN},
    }
    aggs: dict[str, Any] = {}
    for role, (score, version) in MODEL_ROLES.items():
        aggs[f"{role}_versions"] = {
            "terms": {"field": version, "size": VERSIONS_SHOWN},
            "aggs": {
                "histogram": {"histogram": {"field": score, **histogram}},
                "stats": {"stats": {"field": score}},
                "latest": {"max": {"field": "event_time"}},
            },
        }
    # The newest scored record names the roles' holders now (no challenger version on it: none now).
    versions = [version for _, version in MODEL_ROLES.values()]
    aggs["newest"] = {"top_hits": {"size": 1, "sort": [{"event_time": {"order": "desc"}}], "_source": versions}}
    aggs["stores_all"] = _store_picker()
    return {"size": 0, "track_total_hits": True, "query": {"bool": {"filter": window.filters()}}, "aggs": aggs}


def labels_page_query(size: int, search_after: list[Any] | None = None) -> dict[str, Any]:
    """One page of the verdicts in force (transaction id and label), the most recently decided first."""
    body: dict[str, Any] = {
        "size": size,
        "_source": ["transaction_id", "label"],
        "query": {"bool": {"filter": [{"terms": {"label": [0, 1]}}]}},
        "sort": [{"decided_at": {"order": "desc"}}, {"transaction_id": {"order": "asc"}}],
        "track_total_hits": False,
    }
    if search_after is not None:
        body["search_after"] = search_after
    return body


def labels_summary_query() -> dict[str, Any]:
    """All verdicts in force: how many, how many fraud, per source."""
    return {
        "size": 0,
        "track_total_hits": True,
        "query": {"bool": {"filter": [{"terms": {"label": [0, 1]}}]}},
        "aggs": {
            "fraud": {"filter": {"term": {"label": 1}}},
            "sources": {
                "terms": {"field": "source", "size": 10},
                "aggs": {"fraud": {"filter": {"term": {"label": 1}}}},
            },
        },
    }


def scored_by_ids_query(window: Window, transaction_ids: list[str]) -> dict[str, Any]:
    """The scored documents of these transactions inside the window (and store), scores and versions only."""
    fields = ["transaction_id", *(field for pair in MODEL_ROLES.values() for field in pair)]
    return {
        "size": len(transaction_ids),
        "_source": fields,
        "query": {"bool": {"filter": [*window.filters(), {"terms": {"transaction_id": transaction_ids}}]}},
    }


def _holder(newest: str | None, latest: dict[str, float]) -> str | None:
    """The model holding the champion's role now: the newest record's, unless that record is a fallback answer
    (the remote champion failed on it): then the model that answered last not as a fallback, if any did."""
    if newest is None or not is_fallback(newest):
        return None if newest is None else model_of(newest)
    return max(latest, key=lambda model: (latest[model], model)) if latest else model_of(newest)


def shape_distributions(answer: dict[str, Any]) -> dict[str, Any]:
    """Per role: the model that holds it now (the newest scored record's; for the champion, the newest that is
    not a remote backend's fallback answer), and that model's rows, mean score and count in each of the 20 bins
    over every row it scored in the window, as champion, as challenger or as a fallback (after a promotion, one
    model's figures are never mixed with another's, and a fallback's rows are its model's, not a model of their
    own); ``fallback_rows``: how many of them were fallback answers; ``versions``: the versions that held the
    role in the window, by rows (a fallback's under its own name)."""
    aggs = answer.get("aggregations", {})
    bins = SCORE_MAX // SCORE_BIN
    counts: dict[str, list[int]] = {}
    rows: dict[str, int] = {}
    sums: dict[str, float] = {}
    fallback: dict[str, int] = {}
    latest: dict[str, float] = {}
    """The newest row of each model that decided not as a fallback."""
    for role in MODEL_ROLES:
        for bucket in (aggs.get(f"{role}_versions") or {}).get("buckets", []):
            version = str(bucket["key"])
            model = model_of(version)
            slots = counts.setdefault(model, [0] * bins)
            for b in (bucket.get("histogram") or {}).get("buckets", []):
                slot = min(max(int(float(b["key"]) // SCORE_BIN), 0), bins - 1)  # 1000 joins the last bin
                slots[slot] += int(b["doc_count"])
            stats = bucket.get("stats") or {}
            n = int(stats.get("count") or 0)
            rows[model] = rows.get(model, 0) + n
            sums[model] = sums.get(model, 0.0) + float(stats.get("sum") or 0.0)
            if is_fallback(version):
                fallback[model] = fallback.get(model, 0) + n
            elif role == "champion" and (at := (bucket.get("latest") or {}).get("value")) is not None:
                latest[model] = max(latest.get(model, float(at)), float(at))
    out: dict[str, Any] = {
        "scored": _total(answer),
        "bin_width": SCORE_BIN,
        "bins": [n * SCORE_BIN for n in range(bins)],
        **_picker(aggs.get("stores_all")),
    }
    hits = ((aggs.get("newest") or {}).get("hits") or {}).get("hits") or []
    newest = (hits[0].get("_source") or {}) if hits else {}
    for role, (_, field) in MODEL_ROLES.items():
        found = newest.get(field)  # None: no challenger now, so no rows
        held = _holder(found, latest) if role == "champion" else None if found is None else model_of(found)
        n = rows.get(held, 0) if held is not None else 0
        out[role] = {
            "version": held,
            "rows": n,
            "fallback_rows": fallback.get(held, 0) if held is not None else 0,
            "mean": round(sums[held] / n, 1) if held is not None and n else None,
            "versions": _buckets(aggs.get(f"{role}_versions")),
            "counts": counts.get(held, [0] * bins) if held is not None else [0] * bins,
        }
    return out


def roc_auc(scores: list[float], labels: list[int]) -> float | None:
    """ROC-AUC by the Mann-Whitney U statistic (ties count half): the chance that a random fraud row scores
    above a random legitimate one. ``None`` unless both classes are present."""
    positives = sum(1 for y in labels if y == 1)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, start = 0.0, 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        average_rank = (start + end) / 2 + 1  # ranks start+1 .. end+1 share their mean
        rank_sum += average_rank * sum(1 for i in order[start : end + 1] if labels[i] == 1)
        start = end + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auc_interval(auc: float, positives: int, negatives: int) -> tuple[float, float]:
    """A 95 % interval for an AUC from Hanley & McNeil's (1982) standard error: wide when either class is
    small, which is the point of showing it. The error is taken at the AUC held half a row of the smaller
    class (``1 / (2 * min(positives, negatives))``) inside (0, 1): at 0 or 1 the formula's error is 0, and a
    perfect ranking of 1 fraud row among 3 (a 1-in-4 chance at random) claimed certainty."""
    edge = 1 / (2 * min(positives, negatives))
    a = min(max(auc, edge), 1 - edge)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    half = Z95 * math.sqrt(max(variance, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


@dataclass(frozen=True)
class LabelledRow:
    """One labelled scored transaction: the field verdict and what each model said."""

    transaction_id: str
    label: int
    scores: dict[str, int | None]
    versions: dict[str, str | None]


def labelled_rows(hits: list[dict[str, Any]], labels: dict[str, int]) -> list[LabelledRow]:
    """Scored documents joined to their verdicts (documents without a verdict are left out)."""
    rows = []
    for hit in hits:
        source = hit.get("_source") or {}
        tx = source.get("transaction_id")
        if tx not in labels:
            continue
        rows.append(
            LabelledRow(
                transaction_id=tx,
                label=labels[tx],
                scores={role: _score(source.get(score)) for role, (score, _) in MODEL_ROLES.items()},
                versions={role: source.get(version) for role, (_, version) in MODEL_ROLES.items()},
            )
        )
    return rows


def _score(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


TrainedIds = Callable[[str | None], frozenset[str] | None]
"""A scored record's model version -> the digests of that model's training rows, None when unknown
(a remote backend, or an artifact that did not record them)."""


def _scored_by(rows: list[LabelledRow], model: str | None) -> list[tuple[LabelledRow, float, bool]]:
    """The labelled rows ``model`` scored, in either role or as a fallback, with its score and whether it was a
    fallback answer."""
    if model is None:
        return []
    out = []
    for row in rows:
        for role in MODEL_ROLES:
            score, version = row.scores[role], row.versions[role]
            if version is not None and model_of(version) == model and score is not None:
                out.append((row, float(score), is_fallback(version)))
                break
    return out


def _figure(scored: list[tuple[LabelledRow, float]]) -> dict[str, Any]:
    labels = [row.label for row, _ in scored]
    auc = roc_auc([score for _, score in scored], labels)
    fraud = sum(labels)
    low, high = auc_interval(auc, fraud, len(labels) - fraud) if auc is not None else (None, None)
    return {
        "rows": len(scored),
        "fraud": fraud,
        "auc": _rounded(auc),
        "auc_low": _rounded(low),
        "auc_high": _rounded(high),
    }


def evaluate_models(
    rows: list[LabelledRow], trained: TrainedIds | None = None, current: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """ROC-AUC, with its interval, of the model in each role (``current``: the models that hold the roles now,
    as :func:`shape_distributions` finds them; by default each role's most frequent model among ``rows``) over
    the labelled rows it scored, as champion, as challenger or as a fallback (``fallback_rows`` of them): after a
    promotion the figures stay one model's each, and a fallback's rows are its model's. ``paired``: both models
    over the rows both scored, the only like-for-like comparison when the challenger came later or went away
    within the window. Given ``trained``, a model's own training rows are left out of its figures (``in_training``
    counts them; None when its training rows are not known here) and out of the paired ones for both: a
    challenger trained on the field labels would otherwise be judged on the answers it learnt. Each model is
    looked up once."""
    if current is None:
        current = {}
        for role in MODEL_ROLES:
            seen: dict[str, int] = {}
            for row in rows:
                if (version := row.versions[role]) is not None and row.scores[role] is not None:
                    seen[model_of(version)] = seen.get(model_of(version), 0) + 1
            current[role] = min(seen, key=lambda v: (-seen[v], v)) if seen else None
    known = {v: trained(v) for v in set(current.values()) if v is not None} if trained is not None else {}
    out: dict[str, Any] = {"labelled": len(rows), "fraud": sum(row.label for row in rows)}
    kept: dict[str, dict[str, float]] = {}
    for role in MODEL_ROLES:
        version = current.get(role)
        scored = _scored_by(rows, version)
        ids = known.get(version) if version is not None else None
        fitted = {row.transaction_id for row, _, _ in scored if ids and id_digest(row.transaction_id) in ids}
        scored = [answer for answer in scored if answer[0].transaction_id not in fitted]
        kept[role] = {row.transaction_id: score for row, score, _ in scored}
        out[role] = {
            "version": version,
            **_figure([(row, score) for row, score, _ in scored]),
            "fallback_rows": sum(1 for *_, fell_back in scored if fell_back),
            "in_training": None if ids is None else len(fitted),
        }
    champion, challenger = (kept[role] for role in MODEL_ROLES)
    both = [row for row in rows if row.transaction_id in champion and row.transaction_id in challenger]
    if current.get("champion") == current.get("challenger"):
        both = []
    paired: dict[str, Any] = {"rows": len(both), "fraud": sum(row.label for row in both)}
    for role in MODEL_ROLES:
        figure = _figure([(row, kept[role][row.transaction_id]) for row in both])
        paired.update(
            {f"{role}_auc": figure["auc"], f"{role}_auc_low": figure["auc_low"], f"{role}_auc_high": figure["auc_high"]}
        )
    out["paired"] = paired
    return out


def shape_labels_summary(answer: dict[str, Any]) -> dict[str, Any]:
    aggs = answer.get("aggregations", {})
    return {
        "total": _total(answer),
        "fraud": int((aggs.get("fraud") or {}).get("doc_count") or 0),
        "sources": {
            str(b["key"]): {"total": int(b["doc_count"]), "fraud": int((b.get("fraud") or {}).get("doc_count") or 0)}
            for b in (aggs.get("sources") or {}).get("buckets", [])
        },
    }


# ----------------------------------------------------------------------------- models: drift

DRIFT_MODELS = 10
WORST_FEATURES = 5
PSI_MODERATE, PSI_SIGNIFICANT = 0.1, 0.25
"""The usual reading of a population stability index: < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant."""
DRIFT_FIELDS = (
    "report_id",
    "model_version",
    "hour_start",
    "rows",
    "late_rows",
    "score_psi",
    "feature_psi",
    "worst_feature",
    "worst_psi",
    "alert",
    "reference_rows",
    "created_at",
)
HOUR_MS = 3_600_000


def drift_query(window: Window) -> dict[str, Any]:
    """Per model version (newest report first): its latest report up to the window's end, and how many
    hourly reports overlapping the window there are and how many of them alerted. Drift is measured over
    all stores, so the store filter does not apply."""
    in_window = {"range": {"hour_start": {"gte": window.start_ms - HOUR_MS + 1, "lt": window.end_ms}}}
    return {
        "size": 0,
        "query": {"range": {"hour_start": {"lt": window.end_ms, "format": "epoch_millis"}}},
        "aggs": {
            "models": {
                "terms": {"field": "model_version", "size": DRIFT_MODELS, "order": {"newest": "desc"}},
                "aggs": {
                    "newest": {"max": {"field": "hour_start"}},
                    "latest": {
                        "top_hits": {
                            "size": 1,
                            "sort": [{"hour_start": {"order": "desc"}}],
                            "_source": list(DRIFT_FIELDS),
                        }
                    },
                    "in_window": {"filter": in_window, "aggs": {"alerts": {"filter": {"term": {"alert": True}}}}},
                },
            }
        },
    }


def psi_band(value: float | None) -> str:
    if value is None:
        return "unknown"
    return "significant" if value > PSI_SIGNIFICANT else "moderate" if value >= PSI_MODERATE else "stable"


def shape_drift(answer: dict[str, Any]) -> dict[str, Any]:
    """One row per model version: its latest report with the worst features (highest PSI first)."""
    rows = []
    for bucket in ((answer.get("aggregations") or {}).get("models") or {}).get("buckets", []):
        hits = ((bucket.get("latest") or {}).get("hits") or {}).get("hits") or []
        if not hits:
            continue
        report = hits[0].get("_source") or {}
        features = {name: float(v) for name, v in (report.get("feature_psi") or {}).items() if _finite(v)}
        worst = sorted(features.items(), key=lambda item: (-item[1], item[0]))[:WORST_FEATURES]
        in_window = bucket.get("in_window") or {}
        score_psi = float(report["score_psi"]) if _finite(report.get("score_psi")) else None
        rows.append(
            {
                "model_version": str(bucket["key"]),
                "report_id": report.get("report_id"),
                "hour_start": report.get("hour_start"),
                "rows": report.get("rows"),
                "late_rows": report.get("late_rows"),
                "reference_rows": report.get("reference_rows"),
                "score_psi": score_psi,
                "score_band": psi_band(score_psi),
                "worst": [{"feature": name, "psi": round(value, 4), "band": psi_band(value)} for name, value in worst],
                "alert": bool(report.get("alert")),
                "created_at": report.get("created_at"),
                "hours_in_window": int(in_window.get("doc_count") or 0),
                "alerts_in_window": int((in_window.get("alerts") or {}).get("doc_count") or 0),
            }
        )
    return {"models": rows, "thresholds": {"moderate": PSI_MODERATE, "significant": PSI_SIGNIFICANT}}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
