"""The case queue, the case page and the case figures: what the dashboard shows of the human-verification
workflow, read from the ``cases`` index (one document per case, its latest version, written by the
OpenSearch sink from the compacted ``cases`` topic that ``jobs.cases.service`` keeps).

A verdict given on the case page is not written here: the dashboard publishes the same signed
:class:`~schemas.records.BotCommand` the Webex bot publishes for ``confirm <case>`` (source ``dashboard``,
actor the logged-in person), and the case service applies it, so a verdict from the dashboard and one
from Webex are one record with one audit trail.

Everything here is pure (query bodies, shaping, figures, the command) and unit-tested without OpenSearch.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.settings import AlertSettings
from schemas.errors import InvalidRecord
from schemas.identifiers import check_address
from schemas.records import CASE_VERBS, MAX_CASE_TEXT, BotCommand, case_text, well_formed
from sinks.alerts.message import store_time

CASE_STATES = ("open", "escalated", "confirmed", "dismissed", "expired")
PENDING_STATES = ("open", "escalated")
"""States a person still has to act on."""
UNDECIDED, ANY = "undecided", "any"
QUEUE_STATES = (UNDECIDED, ANY, *CASE_STATES)
"""The queue's state filter: one state, ``undecided`` (every pending state), or ``any``."""
DEFAULT_QUEUE_STATE = UNDECIDED
"""What the queue shows unless asked otherwise: every case still waiting for a verdict, escalated ones too
(an escalated case still needs a verdict and still expires; the "open cases" figure counts it)."""
QUEUE_SIZE = 200
FIGURES_SIZE = 5000
"""Cases read for the figures (the newest first); the answer says when there were more."""
AGE_BUCKETS_MS: tuple[tuple[str, float], ...] = (
    ("< 15 min", 15 * 60_000),
    ("15-60 min", 60 * 60_000),
    ("1-4 h", 4 * 3_600_000),
    ("4-24 h", 24 * 3_600_000),
    ("> 24 h", math.inf),
)
"""Open-case age buckets of the figures panel: an alert should be looked at within minutes."""
IMAGE_KINDS = {"live": "snapshot_ref", "reference": "reference_image_ref"}
"""``/cases/{id}/images/{which}``: the live snapshot of the alert and the subject's enrolled reference."""
VERDICT_VERBS = frozenset(verb.lower() for verb in CASE_VERBS)
MAX_TEXT = MAX_CASE_TEXT
"""Longest reason or note accepted from the page: what the case service keeps (the page's box says so too)."""
CASE_FIELDS = (
    "case_id",
    "version",
    "state",
    "kind",
    "store_id",
    "alert_id",
    "summary",
    "opened_at",
    "updated_at",
    "expires_at",
    "updated_by",
    "decided_at",
    "decided_by",
    "owner",
    "verdict",
    "verdict_reason",
    "notes",
    "lane_id",
    "transaction_id",
    "subject_id",
    "category",
    "similarity",
    "subject_false_matches",
    "fraud_label",
)
"""What the page may see: the image refs stay on the server (images are fetched by case id)."""
CASE_SOURCE = (*CASE_FIELDS, *IMAGE_KINDS.values())
"""What one case's lookup reads: the page's fields and the image refs, which tell which images it has."""


@dataclass(frozen=True, slots=True)
class CaseFilter:
    """The queue's filters; ``None`` = any."""

    store: str | None = None
    state: str | None = None
    kind: str | None = None

    def clauses(self) -> list[dict[str, Any]]:
        state = None if self.state in (UNDECIDED, ANY) else self.state
        pairs = (("store_id", self.store), ("state", state), ("kind", self.kind))
        out: list[dict[str, Any]] = [{"term": {field: value}} for field, value in pairs if value]
        if self.state == UNDECIDED:
            out.append({"terms": {"state": list(PENDING_STATES)}})
        return out


def case_queue_query(case_filter: CaseFilter, size: int = QUEUE_SIZE) -> dict[str, Any]:
    """The newest cases matching the filter, with counts per state/kind/store for the filter menus."""
    return {
        "size": size,
        "track_total_hits": True,
        "_source": list(CASE_FIELDS),
        "query": {"bool": {"filter": case_filter.clauses()}},
        "sort": [{"opened_at": "desc"}, {"case_id": "asc"}],
        "aggs": {
            "states": {"terms": {"field": "state", "size": len(CASE_STATES)}},
            "kinds": {"terms": {"field": "kind", "size": 20}},
            "stores": {"terms": {"field": "store_id", "size": 200}},
        },
    }


def case_by_id_query(case_id: str, fields: Sequence[str] = CASE_SOURCE) -> dict[str, Any]:
    return {"size": 1, "_source": list(fields), "query": {"term": {"case_id": case_id}}}


def figures_query(store: str | None, since_ms: int, size: int = FIGURES_SIZE) -> dict[str, Any]:
    """The cases opened since ``since_ms`` (and every one still pending, however old), newest first."""
    window = {"range": {"opened_at": {"gte": since_ms}}}
    pending = {"terms": {"state": list(PENDING_STATES)}}
    clauses: list[dict[str, Any]] = [{"bool": {"should": [window, pending], "minimum_should_match": 1}}]
    if store:
        clauses.append({"term": {"store_id": store}})
    return {
        "size": size,
        "track_total_hits": True,
        "_source": ["state", "kind", "store_id", "opened_at", "decided_at"],
        "query": {"bool": {"filter": clauses}},
        "sort": [{"opened_at": "desc"}],
    }


CASE_TIMES = ("opened_at", "updated_at", "decided_at", "expires_at")
"""A case's times (epoch ms), each given in its store's zone as well (``local_times``)."""


def public_case(source: dict[str, Any], alerts: AlertSettings) -> dict[str, Any]:
    """A case document as the page sees it: the allowed fields, plus which images it has (by URL), and its times as
    its alert's message gives them, in its store's zone (``alerts``' zones): ``local_times`` (each of
    :data:`CASE_TIMES` it has -> text) and each note's ``local_time``. The pages gave them in UTC, hours off the
    message that links the case page; the epoch-ms fields stay as they were."""
    case = {field: source.get(field) for field in CASE_FIELDS if field in source}
    case_id = str(source.get("case_id") or "")
    case["images"] = {
        which: f"/cases/{case_id}/images/{which}" for which, ref in IMAGE_KINDS.items() if source.get(ref)
    }
    store = case.get("store_id")
    times = {field: store_time(case.get(field), store, alerts) for field in CASE_TIMES}
    case["local_times"] = {field: text for field, text in times.items() if text is not None}
    notes = case.get("notes")
    if isinstance(notes, list):
        case["notes"] = [
            {**note, "local_time": store_time(note.get("at"), store, alerts)} if isinstance(note, dict) else note
            for note in notes
        ]
    return case


def _buckets(answer: dict[str, Any], name: str) -> dict[str, int]:
    agg = (answer.get("aggregations") or {}).get(name) or {}
    return {str(b.get("key")): int(b.get("doc_count", 0)) for b in agg.get("buckets", [])}


def shape_queue(answer: dict[str, Any], alerts: AlertSettings) -> dict[str, Any]:
    hits = answer.get("hits") or {}
    total = hits.get("total") or {}
    return {
        "cases": [public_case(h.get("_source") or {}, alerts) for h in hits.get("hits", [])],
        "total": int(total.get("value", 0)) if isinstance(total, dict) else int(total or 0),
        "states": _buckets(answer, "states"),
        "kinds": _buckets(answer, "kinds"),
        "stores": _buckets(answer, "stores"),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values): a figure a person can check by hand."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def case_figures(cases: Iterable[dict[str, Any]], now_ms: int, *, truncated: bool = False) -> dict[str, Any]:
    """Open cases by age, time to verdict p50/p95, and the share confirmed vs dismissed per alert kind and
    per store. ``confirmed`` counts a fraud confirmation too; expired cases count in neither share (no one
    decided them) but are reported per kind, since unanswered alerts are what a manager must see."""
    ages = Counter[str]()
    to_verdict: list[float] = []
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    by_store: dict[str, Counter[str]] = defaultdict(Counter)
    pending = 0
    for case in cases:
        state, opened = case.get("state"), case.get("opened_at")
        if not isinstance(opened, int | float):
            continue
        if state in PENDING_STATES:
            pending += 1
            age = max(0.0, now_ms - opened)
            ages[next(label for label, bound in AGE_BUCKETS_MS if age < bound)] += 1
            continue
        kind, store = str(case.get("kind") or "?"), str(case.get("store_id") or "?")
        by_kind[kind][str(state)] += 1
        by_store[store][str(state)] += 1
        decided = case.get("decided_at")
        if state in ("confirmed", "dismissed") and isinstance(decided, int | float) and decided >= opened:
            to_verdict.append((decided - opened) / 1000)

    def shares(counts: dict[str, Counter[str]]) -> list[dict[str, Any]]:
        rows = []
        for key in sorted(counts):
            c = counts[key]
            decided = c["confirmed"] + c["dismissed"]
            rows.append(
                {
                    "key": key,
                    "confirmed": c["confirmed"],
                    "dismissed": c["dismissed"],
                    "expired": c["expired"],
                    "confirmed_share": c["confirmed"] / decided if decided else None,
                }
            )
        return rows

    return {
        "open": pending,
        "open_by_age": [{"age": label, "cases": ages[label]} for label, _ in AGE_BUCKETS_MS],
        "time_to_verdict_s": {
            "p50": percentile(to_verdict, 50),
            "p95": percentile(to_verdict, 95),
            "decided": len(to_verdict),
        },
        "by_kind": shares(by_kind),
        "by_store": shares(by_store),
        "truncated": truncated,
    }


REFUSAL_FIELDS = ("case_id", "state", "transaction_id", "decided_by", "decided_at")
"""What :func:`refused_now` reads of the indexed case before a verdict is published."""


def refused_now(case: Mapping[str, Any], command: BotCommand) -> str | None:
    """Why the case service would refuse ``command`` on the indexed ``case`` as it stands (the answer to give at
    once, nothing published), or None. The service refused these only in the audit: the page waited 30 s for a
    change that never came. A decided case takes notes only; an escalated one is escalated already; a case
    without a transaction has none to label as fraud."""
    verb, state, case_id = command.verb, str(case.get("state") or ""), str(case.get("case_id") or "")
    if verb != "NOTE" and state and state not in PENDING_STATES:
        by = f" by {case['decided_by']}" if case.get("decided_by") else ""
        return f"{case_id} is already {state}{by}: nothing was sent (add a note if you see it differently)"
    if verb == "ESCALATE" and state == "escalated":
        return f"{case_id} is already escalated: nothing was sent"
    if verb == "CONFIRM" and (command.argument or "").split()[1:] == ["fraud"] and not case.get("transaction_id"):
        return f"{case_id} has no transaction to label as fraud: nothing was sent (Confirm confirms it without a label)"
    return None


REQUEST_ID_RE = re.compile(r"[A-Za-z0-9-]{16,64}")
"""A case page's submission id: 16-64 letters, digits and ``-`` (the page sends 32 random hex digits)."""
REQUEST_ID_RULE = (
    f"16 to 64 letters, digits and - ({REQUEST_ID_RE.pattern}), one per submission and the same when it is sent again"
)


DASHBOARD_COMMAND_PREFIX = "dashboard-"
COMMAND_ID_RE = re.compile(rf"{DASHBOARD_COMMAND_PREFIX}[0-9a-f]{{32}}")
"""The command id of a verdict given on the case page (:func:`command_id_for`): the prefix and 32 hex digits."""


def command_id_for(case_id: str, actor: str, request_id: object) -> str:
    """The command id of a verdict: the same for every send of one submission (``request_id``, made by the page for
    each press), so the case service, which applies a command id once, applies a double click or a resend once;
    derived with the case and the person, so nobody else's submission can take its id. :class:`InvalidRecord`
    ``bad_command`` without one (a fresh id at each try would let a client's retries each be applied) or for one of
    another shape."""
    if request_id is None:
        raise InvalidRecord("bad_command", f"request_id is required: {REQUEST_ID_RULE}")
    if not isinstance(request_id, str) or REQUEST_ID_RE.fullmatch(request_id) is None:
        raise InvalidRecord("bad_command", f"request_id is {REQUEST_ID_RULE}")
    digest = hashlib.sha256("\n".join((case_id, actor.lower(), request_id)).encode()).hexdigest()
    return f"{DASHBOARD_COMMAND_PREFIX}{digest[:32]}"


def verdict_command(
    case_id: str,
    verb: str,
    actor: str,
    now_ms: int,
    *,
    text: str | None = None,
    fraud: object = False,
    unlisted_owner: Callable[[str], str | None] = lambda _: None,
    request_id: object,
) -> BotCommand:
    """The command a verdict on the case page becomes: the same verb and argument the Webex bot would
    publish for ``confirm <case> [fraud]``, ``dismiss <case> [reason]``, ``escalate <case>``,
    ``assign <case> <person>`` or ``note <case> <text>``. :class:`InvalidRecord` ``bad_command`` for anything
    else (an unknown verb, a missing or malformed person, a missing note, text over :data:`MAX_TEXT`, ``fraud`` not a
    bool: ``"true"`` was read as false, a plain confirm, or a person ``unlisted_owner`` says cannot own a case).
    ``request_id``: the page's id of one submission (:func:`command_id_for`, required), so a second send of it is one
    command."""
    if fraud is not None and not isinstance(fraud, bool):
        raise InvalidRecord("bad_command", "fraud is true or false (JSON), nothing else")
    verb = verb.strip().lower()
    if verb not in VERDICT_VERBS:
        raise InvalidRecord("bad_command", f"{verb!r} is not a verdict (one of {', '.join(sorted(VERDICT_VERBS))})")
    text = well_formed(text or "").strip()  # a note's or a reason's line breaks are kept: the case page shows them
    if len(text) > MAX_TEXT:
        raise InvalidRecord("bad_command", f"text over {MAX_TEXT} characters")
    if verb == "assign":  # a name, a lookalike address: the case service refused it in the audit only
        unlisted = unlisted_owner(check_address(text))  # one off the allow-list could not act on the case
        if unlisted:
            raise InvalidRecord("bad_command", unlisted)
    if verb == "note" and not case_text(text):  # the case service would keep nothing, and refuse it unseen
        raise InvalidRecord("bad_command", "a note needs text (control characters are left out)")
    if verb == "confirm":
        words = [case_id, "fraud"] if fraud else [case_id]
    elif verb == "escalate":
        words = [case_id]
    else:
        words = [case_id, text] if text else [case_id]
    return BotCommand(
        command_id=command_id_for(case_id, actor, request_id),
        issued_at=now_ms,
        verb=verb.upper(),
        actor=actor,
        argument=" ".join(words),
        room_id=None,
        source="dashboard",
    )
