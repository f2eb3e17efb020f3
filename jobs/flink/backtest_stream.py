"""Backtest in the stream: a second copy of the scoring job, with another rule set and/or model, over a
replayed range of the live transactions, into its own index -- then a report of what changed.

Inputs: the baseline's transactions topic and its transactions index (the live job's, or any
settings' prefixes), a candidate rule set file (YAML, ``jobs/scoring/rulesets/``) and/or model artifact.
Outputs: topics ``<name>.*`` and indices ``<name>-*`` of the copy (kept to explore; ``cleanup NAME``
removes them) and a report -- outcome changes (baseline x candidate outcome counts), a sample of the
transactions that changed, precision/recall of BLOCK and BLOCK+REVIEW against ``label`` where the
transactions carry one -- printed and written to ``<stack dir>/backtests/<name>/report.{json,md}``.

How: the copy gets ``Settings.isolated(name)`` (own topics, index prefix, consumer group,
checkpoints) with the candidate's rule set file and model; the rule set -- the candidate's, else the live
job's (the last on the live ``rules`` topic), so a model-only run changes the model only -- is also published
to the copy's own ``rules`` topic before it starts, as a live rule change would be. The range is replayed
(:mod:`producers.replay`) into the copy's transactions topic -- by default ONE partition, so the copy
reads the records in exactly the merged timestamp order whatever its speed (the job scores in one
operator anyway, so one partition costs no throughput) -- and the copy's own OpenSearch sink indexes
its decisions. The copy is done when its consumer group committed (on a checkpoint) everything the
replay wrote and the sink committed everything the copy decided. The comparison is over the transactions
replayed (read back from the copy's transactions topic), so those only the baseline decided count too.

The copy rebuilds its state (receipts, customer habits) from the replayed range only, and sees no face
results (``face_deadline_ms=0``). The report separates decisions whose *inputs* differ (indicators,
e.g. a return whose sale lies before the range) from changes the candidate version made.

Run: ``python -m jobs.flink.backtest_stream run --rules my-rules.yaml --from-time 2026-11-22T06:00:00Z``;
``compare BASELINE_PREFIX CANDIDATE_PREFIX`` recomputes a report from two indices.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from confluent_kafka.admin import NewTopic
from opensearchpy import OpenSearch
from opensearchpy.helpers import scan
from rich.console import Console
from rich.table import Table

from infra.clients import kafka as kafka_clients
from infra.settings import Settings, get_settings
from jobs.scoring.rules import RuleSet, RuleSetError
from jobs.scoring.rules import publish_rules as publish_rule_set
from schemas.errors import CheckoutGuardError
from schemas.indices import ROUTES, index_name
from schemas.money import money
from schemas.topics import ALL_TOPICS, RULES, SCORED_TRANSACTIONS, TRANSACTIONS

console = Console()
errors = Console(stderr=True)

OUTCOMES = ("APPROVE", "REVIEW", "BLOCK")
FLAGS: dict[str, frozenset[str]] = {"BLOCK": frozenset({"BLOCK"}), "BLOCK+REVIEW": frozenset({"BLOCK", "REVIEW"})}
"""What counts as "flagged as fraud" for precision and recall."""
FIELDS = (
    "transaction_id",
    "kind",
    "store_id",
    "amount",
    "currency",
    "outcome",
    "risk_score",
    "reasons",
    "indicators",
    "model_score",
    "model_version",
    "rules_version",
    "label",
)
"""Document fields the comparison reads."""
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,60}$")


class NameRefused(CheckoutGuardError, ValueError):
    """A backtest name ``run`` or ``cleanup`` will not take (:func:`check_name`, or a name a run already used): a
    usage error, refused before anything is made, as replay refuses a range."""


def check_name(settings: Settings, name: str) -> None:
    """:class:`NameRefused` unless ``name`` may name a backtest's copy: lowercase letters, digits, ``-`` and ``_``
    (it names indices), not the live index prefix nor a dash-prefix of it (``checkout`` would have written
    into, and cleaned up, ``checkout-guard-*``), no name under a live index family (``checkout-guard-alerts-v2``:
    its indices matched the live ``checkout-guard-alerts-*`` template, with the live alias and the same priority
    as the copy's own, which OpenSearch refuses, so the copy's sink died mid-run), and no name whose topics
    (``<name>.*``) are live ones (``store1`` under the live topic prefix ``store1.`` would have replayed into, and
    cleaned up, the live topics)."""
    if not NAME_RE.match(name):
        raise NameRefused(f"backtest name {name!r}: lowercase letters, digits, '-' and '_' (it names indices)")
    live = settings.opensearch.index_prefix
    if f"{live}-".startswith(f"{name}-"):
        raise NameRefused(f"backtest name {name!r}: its indices ({name}-*) would take in the live ones ({live}-*)")
    taken = [route.kind for route in ROUTES if f"{name}-".startswith(f"{index_name(live, route.kind)}-")]
    if taken:
        raise NameRefused(
            f"backtest name {name!r}: its indices ({name}-*) fall under the live {index_name(live, taken[0])}-*, "
            "whose template would give them the live read alias (or refuse the copy's own templates)"
        )
    live_topics = {spec.full_name(settings.kafka.topic_prefix) for spec in ALL_TOPICS}
    if live_topics & {spec.full_name(f"{name}.") for spec in ALL_TOPICS}:
        raise NameRefused(
            f"backtest name {name!r}: its topics ({name}.*) are the live ones "
            f"(topic prefix {settings.kafka.topic_prefix!r})"
        )


# ---------------------------------------------------------------------------- pure: the comparison


@dataclass(frozen=True)
class Detection:
    """How well one version's flags find the labelled fraud (``None`` where undefined: nothing flagged /
    no fraud among the labelled)."""

    labelled: int
    positives: int
    flagged: int
    true_positives: int
    precision: float | None
    recall: float | None


def detection(docs: Iterable[dict[str, Any]], flagged_outcomes: frozenset[str]) -> Detection:
    """Precision and recall of ``outcome in flagged_outcomes`` against ``label`` (1 fraud, 0 legit);
    documents without a label are left out."""
    labelled = positives = flagged = tp = 0
    for doc in docs:
        label = doc.get("label")
        if label is None:
            continue
        labelled += 1
        is_fraud, is_flagged = label == 1, doc.get("outcome") in flagged_outcomes
        positives += is_fraud
        flagged += is_flagged
        tp += is_fraud and is_flagged
    return Detection(
        labelled, positives, flagged, tp, tp / flagged if flagged else None, tp / positives if positives else None
    )


@dataclass
class Report:
    baseline: str
    candidate: str
    compared: int
    """Transactions decided by both versions (the comparison, precision and recall are over these)."""
    only_baseline: int | None
    """Decided by the baseline, not by the candidate: a copy that did not finish. ``None``: not known (the
    replayed transactions were not read, so the baseline was looked up by the candidate's decisions only)."""
    only_candidate: int
    confusion: dict[str, dict[str, int]]
    """baseline outcome -> candidate outcome -> transactions."""
    changed: int
    """Transactions whose outcome differs."""
    risk_changed: int
    inputs_differ: int
    """Transactions whose indicators differ: state or input, not the version (see the module docstring)."""
    changed_same_inputs: int
    """Outcome changes with identical indicators: what the candidate version itself changed."""
    input_changes: dict[str, int]
    """Indicator -> transactions on which its value differs between the two (why inputs differ)."""
    versions: dict[str, dict[str, list[str]]]
    """side -> {"rules": [...], "model": [...]} as stamped on the decisions."""
    outcomes: dict[str, dict[str, int]]
    """side -> outcome -> transactions."""
    detection: dict[str, dict[str, Detection]]
    """side -> "BLOCK" / "BLOCK+REVIEW" -> precision and recall."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Some transactions that changed, biggest change first."""
    created_at: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    """How the run was made (range, rule set file, model, timings)."""
    replayed: int | None = None
    """Transactions replayed into the copy (distinct ids); ``None``: not known."""
    refused: int | None = None
    """Records replayed into the copy that the job dead-letters (:class:`Replayed`): not counted in ``replayed``;
    ``None``: not known."""
    undecided: int | None = None
    """Replayed transactions in neither index: ``replayed - compared - only_baseline - only_candidate``."""
    notes: list[str] = field(default_factory=list)
    """What makes the comparison incomplete or unfair, shown first (a copy that did not finish, say)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)


def _severity(outcome: str | None) -> int:
    return OUTCOMES.index(outcome) if outcome in OUTCOMES else -1


def _decision(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "outcome": doc["outcome"],
        "risk_score": doc.get("risk_score"),
        "reasons": list(doc.get("reasons") or []),
        "model_score": doc.get("model_score"),
    }


def _versions(docs: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    rules, models = set(), set()
    for d in docs:
        rules.add(str(d.get("rules_version")))
        models.add(str(d.get("model_version")))
    return {"rules": sorted(rules), "model": sorted(models)}


MODEL_FEATURES = "model_features"
"""An input change the documents only show through the model: the same model version scored the
transaction differently, so its profile features (customer and linked identities' velocity and amounts,
kept in state but not written on the record) differed."""


def input_differences(b: dict[str, Any], c: dict[str, Any]) -> list[str]:
    """What the two decisions of one transaction were made on differently: the indicators that differ,
    and :data:`MODEL_FEATURES` when the same model version gave another score."""
    b_ind, c_ind = b.get("indicators") or {}, c.get("indicators") or {}
    keys = [k for k in set(b_ind) | set(c_ind) if b_ind.get(k) != c_ind.get(k)]
    if b.get("model_version") == c.get("model_version") and b.get("model_score") != c.get("model_score"):
        keys.append(MODEL_FEATURES)
    return keys


@dataclass(frozen=True)
class Replayed:
    """What the copy's transactions topic holds (:func:`transaction_ids`)."""

    ids: frozenset[str]
    """The ids of the transactions the job takes (the checks it makes of a record alone pass)."""
    refused: int
    """Records the job dead-letters instead: bytes that are no transaction, or one its checks refuse (an id that is a
    path, a 500 000-character card token, a negative amount). Replayed, but nothing either version could decide."""


def compare(
    baseline: Iterable[dict[str, Any]],
    candidate: Iterable[dict[str, Any]],
    baseline_name: str = "baseline",
    candidate_name: str = "candidate",
    sample_size: int = 25,
    replayed: Replayed | Collection[str] | None = None,
) -> Report:
    """Compare two versions' decisions on the same transactions (documents keyed by ``transaction_id``).
    ``replayed``: the ids of the transactions both were given, to count those that neither decided (with the records
    the job refuses, when it is a :class:`Replayed`)."""
    refused = replayed.refused if isinstance(replayed, Replayed) else None
    replayed = replayed.ids if isinstance(replayed, Replayed) else replayed
    base = {d["transaction_id"]: d for d in baseline}
    cand = {d["transaction_id"]: d for d in candidate}
    common = sorted(set(base) & set(cand))
    only_base = [base[t] for t in set(base) - set(cand)]
    confusion = {b: dict.fromkeys(OUTCOMES, 0) for b in OUTCOMES}
    changed: list[tuple[dict, dict]] = []
    risk_changed = inputs_differ = changed_same = 0
    input_changes: Counter[str] = Counter()
    for tx_id in common:
        b, c = base[tx_id], cand[tx_id]
        confusion.setdefault(b["outcome"], dict.fromkeys(OUTCOMES, 0))
        confusion[b["outcome"]][c["outcome"]] = confusion[b["outcome"]].get(c["outcome"], 0) + 1
        differ = input_differences(b, c)
        same_inputs = not differ
        inputs_differ += not same_inputs
        input_changes.update(differ)
        risk_changed += b.get("risk_score") != c.get("risk_score")
        if b["outcome"] != c["outcome"]:
            changed.append((b, c))
            changed_same += same_inputs
    changed.sort(
        key=lambda bc: (-abs(_severity(bc[1]["outcome"]) - _severity(bc[0]["outcome"])), bc[0]["transaction_id"])
    )
    samples = [
        {
            "transaction_id": b["transaction_id"],
            "kind": b.get("kind"),
            "store_id": b.get("store_id"),
            "amount": b.get("amount"),
            "currency": b.get("currency"),
            "label": b.get("label"),
            "baseline": _decision(b),
            "candidate": _decision(c),
            "same_inputs": not input_differences(b, c),
        }
        for b, c in changed[:sample_size]
    ]
    sides = {"baseline": [base[t] for t in common], "candidate": [cand[t] for t in common]}
    only_candidate = len(set(cand) - set(base))
    undecided = None if replayed is None else len(set(replayed) - set(base) - set(cand))
    notes = []
    if only_base:
        fraud = sum(d.get("label") == 1 for d in only_base)
        notes.append(
            f"{len(only_base):,} transactions ({fraud:,} labelled fraud) were decided by the baseline and not by "
            f"the candidate: did the copy finish? The outcomes, precision and recall leave them out."
        )
    if replayed is not None and (unknown := len(set(cand) - set(replayed))):
        notes.append(
            f"{unknown:,} transactions the candidate decided are not among the {len(set(replayed)):,} replayed: "
            "the replayed set is incomplete, so the counts of those only in one index are not reliable."
        )
    if undecided:
        # Of the replayed only, so the figures add up to them: a candidate decision outside the replayed set has
        # its own note above, and counted here too it made the sum overshoot.
        replayed_ids = set(replayed or ())
        compared_replayed = len(replayed_ids.intersection(common))
        in_one_replayed = len(replayed_ids & (set(base) ^ set(cand)))
        notes.append(
            f"{undecided:,} of the {len(replayed_ids):,} replayed transactions are in neither index "
            f"({compared_replayed:,} compared + {in_one_replayed:,} only in one): neither decided "
            f"them (the job refused them for when they came: too_late) or their decisions are not indexed yet."
        )
    return Report(
        baseline=baseline_name,
        candidate=candidate_name,
        compared=len(common),
        only_baseline=len(only_base),
        only_candidate=only_candidate,
        confusion=confusion,
        changed=len(changed),
        risk_changed=risk_changed,
        inputs_differ=inputs_differ,
        changed_same_inputs=changed_same,
        input_changes=dict(input_changes.most_common()),
        versions={side: _versions(docs) for side, docs in sides.items()},
        outcomes={
            side: {o: n for o, n in sorted(Counter(d["outcome"] for d in docs).items())} for side, docs in sides.items()
        },
        detection={
            side: {name: detection(docs, flags) for name, flags in FLAGS.items()} for side, docs in sides.items()
        },
        samples=samples,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        replayed=None if replayed is None else len(set(replayed)),
        refused=refused,
        undecided=undecided,
        notes=notes,
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _count(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


def _refused(report: Report) -> str:
    """`` (and N records the job refuses)`` after the replayed count, when there were some."""
    return f" (and {report.refused:,} records the job refuses)" if report.refused else ""


RULES_FROM = {
    "file": "the candidate's file",
    "live": "the live job's rules topic",
    "settings": "its settings (the live rules topic holds none)",
}


def versions_line(report: Report) -> str:
    """Which rule sets and models each side's decisions carry (and where the copy's rule set came from)."""

    def side(name: str) -> str:
        v = report.versions.get(name, {})
        return f"rule set {', '.join(v.get('rules', [])) or '-'}, model {', '.join(v.get('model', [])) or '-'}"

    source = RULES_FROM.get(report.meta.get("rules_from", ""))
    return (
        f"Versions: baseline {side('baseline')}; candidate {side('candidate')}"
        + (f" (the copy's rule set from {source})" if source else "")
        + "."
    )


def _amount(sample: Mapping[str, Any]) -> str:
    """A changed transaction's amount with its currency's decimals (two for all showed 1500 JPY as 1,500.00)."""
    currency = sample["currency"] or ""
    return f"{money(sample['amount'] or 0, currency)} {currency}"


def report_tables(report: Report) -> list[Table]:
    """The report as rich tables: outcome changes, detection, changed transactions."""
    confusion = Table(title=f"outcomes: {report.baseline} (rows) x {report.candidate} (columns)")
    confusion.add_column("baseline \\ candidate")
    for o in OUTCOMES:
        confusion.add_column(o, justify="right")
    confusion.add_column("total", justify="right")
    for b in report.confusion:
        row = report.confusion[b]
        confusion.add_row(b, *(f"{row.get(c, 0):,}" for c in OUTCOMES), f"{sum(row.values()):,}")
    confusion.caption = (
        f"{report.compared:,} compared, {report.changed:,} changed "
        f"({report.changed_same_inputs:,} with the same inputs), {report.inputs_differ:,} with "
        f"other inputs, {_count(report.only_baseline)} only in baseline, "
        f"{report.only_candidate:,} only in candidate, of {_count(report.replayed)} replayed{_refused(report)}"
    )
    if report.input_changes:
        confusion.caption += "; inputs differ by " + ", ".join(f"{k} ({v:,})" for k, v in report.input_changes.items())
    quality = Table(title=f"detection against labels (the {report.compared:,} transactions both decided)")
    for column in ("version", "rules / model", "flagged as", "labelled", "fraud", "flagged", "precision", "recall"):
        quality.add_column(column, justify="right" if column in ("labelled", "fraud", "flagged") else "left")
    for side, name in (("baseline", report.baseline), ("candidate", report.candidate)):
        v = report.versions.get(side, {})
        label = f"{', '.join(v.get('rules', []))} / {', '.join(v.get('model', []))}"
        for flag, d in report.detection.get(side, {}).items():
            quality.add_row(
                name,
                label,
                flag,
                f"{d.labelled:,}",
                f"{d.positives:,}",
                f"{d.flagged:,}",
                _pct(d.precision),
                _pct(d.recall),
            )
    samples = Table(title=f"changed transactions (first {len(report.samples)} of {report.changed:,})")
    for column in ("transaction", "kind", "amount", "label", "baseline", "candidate", "candidate reasons"):
        samples.add_column(column)
    for s in report.samples:
        samples.add_row(
            s["transaction_id"],
            str(s["kind"]),
            _amount(s),
            "" if s["label"] is None else str(s["label"]),
            f"{s['baseline']['outcome']} {s['baseline']['risk_score']}",
            f"{s['candidate']['outcome']} {s['candidate']['risk_score']}",
            ", ".join(s["candidate"]["reasons"]),
        )
    return [confusion, quality, samples]


def report_markdown(report: Report) -> str:
    """The report as markdown (for a pull request or a ticket)."""
    lines = [
        f"# Backtest: {report.candidate} vs {report.baseline}",
        "",
        f"{report.created_at}: {report.compared:,} transactions compared, {report.changed:,} changed "
        f"outcome ({report.changed_same_inputs:,} with the same inputs, i.e. by the candidate version), "
        f"{report.inputs_differ:,} decided on other inputs, {report.risk_changed:,} with another risk score; "
        f"{_count(report.only_baseline)} only in the baseline, {report.only_candidate:,} only in the candidate, "
        f"of {_count(report.replayed)} transactions replayed{_refused(report)}.",
        "",
        versions_line(report),
        "",
        *(line for note in report.notes for line in (f"> **Warning:** {note}", "")),
        *(
            ["Inputs differ by indicator: " + ", ".join(f"{k} ({v:,})" for k, v in report.input_changes.items()), ""]
            if report.input_changes
            else []
        ),
        "## Outcomes (baseline rows x candidate columns)",
        "",
        "| baseline \\ candidate | " + " | ".join(OUTCOMES) + " | total |",
        "|---|" + "---:|" * (len(OUTCOMES) + 1),
    ]
    for b, row in report.confusion.items():
        lines.append(f"| {b} | " + " | ".join(f"{row.get(c, 0):,}" for c in OUTCOMES) + f" | {sum(row.values()):,} |")
    lines += [
        "",
        "## Detection against labels",
        "",
        f"Over the {report.compared:,} transactions both versions decided.",
        "",
        "| version | rules / model | flagged as | labelled | fraud | flagged | precision | recall |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for side, name in (("baseline", report.baseline), ("candidate", report.candidate)):
        v = report.versions.get(side, {})
        for flag, d in report.detection.get(side, {}).items():
            lines.append(
                f"| {name} | {', '.join(v.get('rules', []))} / {', '.join(v.get('model', []))} | {flag} | "
                f"{d.labelled:,} | {d.positives:,} | {d.flagged:,} | {_pct(d.precision)} | {_pct(d.recall)} |"
            )
    lines += [
        "",
        f"## Changed transactions (first {len(report.samples)} of {report.changed:,})",
        "",
        "| transaction | kind | amount | label | baseline | candidate | candidate reasons | same inputs |",
        "|---|---|---:|---|---|---|---|---|",
    ]
    for s in report.samples:
        lines.append(
            f"| {s['transaction_id']} | {s['kind']} | {_amount(s)} | "
            f"{'' if s['label'] is None else s['label']} | "
            f"{s['baseline']['outcome']} {s['baseline']['risk_score']} | "
            f"{s['candidate']['outcome']} {s['candidate']['risk_score']} | "
            f"{', '.join(s['candidate']['reasons'])} | {'yes' if s['same_inputs'] else 'no'} |"
        )
    if report.meta:
        lines += ["", "## Run", "", "```json", json.dumps(report.meta, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def run_meta(directory: Path) -> dict[str, Any]:
    """The run details (``meta``) of the report in ``directory``; ``{}`` without a readable one. A report
    computed again keeps them: the range, rule set and model are known only to the run."""
    try:
        meta = json.loads((directory / "report.json").read_text(encoding="utf-8")).get("meta")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_report(report: Report, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    as_json, as_md = directory / "report.json", directory / "report.md"
    as_json.write_text(report.to_json() + "\n")
    as_md.write_text(report_markdown(report))
    return as_json, as_md


# ---------------------------------------------------------------------------- OpenSearch


def candidate_documents(client: OpenSearch, index_prefix: str) -> Iterator[dict[str, Any]]:
    """Every decision in ``<prefix>-transactions``."""
    for hit in scan(client, index=index_name(index_prefix, "transactions"), query={"_source": list(FIELDS)}, size=1000):
        yield hit["_source"]


def documents_by_id(client: OpenSearch, index_prefix: str, ids: list[str], chunk: int = 1000) -> Iterator[dict]:
    """The decisions in ``<prefix>-transactions`` for ``ids`` (an ids query: the alias spans period indices)."""
    index = index_name(index_prefix, "transactions")
    for i in range(0, len(ids), chunk):
        part = ids[i : i + chunk]
        page = client.search(
            index=index, body={"query": {"ids": {"values": part}}, "size": len(part), "_source": list(FIELDS)}
        )
        for hit in page["hits"]["hits"]:
            yield hit["_source"]


def compare_indices(
    settings: Settings,
    baseline_prefix: str,
    candidate_prefix: str,
    sample_size: int = 25,
    replayed: Replayed | Collection[str] | Callable[[], Replayed | Collection[str] | None] | None = None,
) -> Report:
    """Report on the ``replayed`` transactions in both indices (or a function that reads them, called once both
    indices are found). Without them, on every transaction in the candidate's index against the same ones in
    the baseline's: those only the baseline decided are then not known (``only_baseline`` is ``None``, and a
    note says so)."""
    from opensearchpy.exceptions import NotFoundError

    from infra.clients.opensearch import make_client

    client = make_client(settings.opensearch, timeout_s=60)
    for prefix in (baseline_prefix, candidate_prefix):
        index = index_name(prefix, "transactions")
        try:
            client.indices.refresh(index=index)
        except NotFoundError:
            raise CheckoutGuardError(
                f"no index {index}: is {prefix!r} the name of a backtest (or the live prefix)?"
            ) from None
    if callable(replayed):  # after the indices are found: a mistyped name is told as such, not as a Kafka error
        replayed = replayed()
    candidate = list(candidate_documents(client, candidate_prefix))
    ids = replayed.ids if isinstance(replayed, Replayed) else replayed
    wanted = sorted(ids) if ids is not None else [d["transaction_id"] for d in candidate]
    baseline = list(documents_by_id(client, baseline_prefix, wanted))
    report = compare(baseline, candidate, baseline_prefix, candidate_prefix, sample_size, replayed)
    if replayed is None:
        report.only_baseline = None
        report.notes.append(
            f"the replayed transactions are not known ({replayed_topic(candidate_prefix)} is gone, or retention "
            "deleted some of its records): the baseline "
            "was looked up by the candidate's decisions only, so those only the baseline decided are not counted."
        )
    return report


def replayed_topic(name: str) -> str:
    """The backtest copy's transactions topic: it holds exactly what the run replayed."""
    return TRANSACTIONS.full_name(f"{name}.")


def transaction_ids(values: Iterable[bytes | None], max_bytes: int) -> Replayed:
    """The ids of the transaction records ``values`` that the job takes, and how many it refuses: each is checked as
    the job checks a record alone (:func:`~jobs.scoring.validation.parse_transaction`, messages up to ``max_bytes``,
    ``CG_JOB__MAX_MESSAGE_BYTES``), without the bound on a future event time (the copy read them at another time).
    A record that decodes but that the job dead-letters was counted as replayed and, decided by neither version,
    reported as missing from both indices; its id, looked up in the baseline index, could be a megabyte."""
    from jobs.scoring.validation import parse_transaction
    from schemas.errors import InvalidRecord

    ids: set[str] = set()
    refused = 0
    for value in values:
        try:
            ids.add(parse_transaction(value, 0, max_bytes)["transaction_id"])
        except InvalidRecord:  # DecodeError too
            refused += 1
    return Replayed(frozenset(ids), refused)


def replayed_transactions(settings: Settings, name: str) -> Replayed | None:
    """The transactions replayed into backtest ``name`` (read back from :func:`replayed_topic` by
    :func:`transaction_ids`); ``None`` when they are not all there: the topic does not exist (cleaned up, or ``name``
    is no backtest) or retention deleted some of its records (the copies keep their original, old timestamps) before
    or while they were read, which would have compared a part, or nothing, as if it were the whole (an ``earliest``
    reset skipped what went mid-read without a word). A topic the broker answers with an error raises
    ``TopicUnavailable`` with its words: not knowing why, the comparison would be made on the wrong set."""
    from infra.clients.topic_replay import Bound, RangeError, plan, read_range_records

    topic = replayed_topic(name)
    try:
        ranges = plan(settings.kafka, topic, Bound(), Bound())
    except RangeError:
        return None
    if any(r.low > 0 for r in ranges):
        return None
    deleted: dict[int, int] = {}
    read = read_range_records(settings.kafka, topic, ranges, "backtest-ids", deleted=deleted)
    ids = transaction_ids((m.value() for m in read), settings.job.max_message_bytes)  # reads it all: see ``deleted``
    return None if any(deleted.values()) else ids


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Candidate:
    """What the copy runs: a rule set file and/or a model (artifact folder and/or version)."""

    rules_file: Path | None = None
    model_dir: Path | None = None
    model_version: str | None = None


def candidate_settings(settings: Settings, name: str, candidate: Candidate) -> Settings:
    """The copy's settings: isolated under ``name``, the candidate's rule set and model, no face join,
    every replayed transaction decided (``decide_from=0``: an operator's ``CG_JOB__DECIDE_FROM`` would leave
    part of the range undecided, as the offline backtest ignores it too), and no metrics endpoints: the copy's
    job and sink took the live ``scoring-job`` and ``opensearch-sink`` ports and names, so Prometheus could
    scrape replayed decisions as live ones, and a restarted live process found its port taken (its supervisor
    then read the copy's health as its own). The run's end is read from Kafka's offsets, not from metrics. Nor does
    the copy train the default model (``auto_train`` off): it shares the live models folder unless given one, and
    at its start it could replace the live champion (an earlier synthetic default) with the audit event sent to
    the copy's own ``audit`` topic."""
    check_name(settings, name)
    copy = settings.isolated(
        name,
        settings.stack_dir / "backtests" / name / "checkpoints",
        face_deadline_ms=0,
        starting_offsets="earliest",
        decide_from=0,
    )
    rules = (
        copy.rules.model_copy(
            update={"ruleset_file": candidate.rules_file, "version": None, "block_at": None, "review_at": None}
        )
        if candidate.rules_file
        else copy.rules
    )
    model = copy.model.model_copy(update={"auto_train": False})  # the copy reads models, never trains or replaces one
    if candidate.model_dir is not None or candidate.model_version is not None:
        model = model.model_copy(
            update={"artifact_dir": candidate.model_dir or model.artifact_dir, "artifact": candidate.model_version}
        )
    metrics = copy.metrics.model_copy(update={"enabled": False})
    return copy.model_copy(update={"rules": rules, "model": model, "metrics": metrics})


def create_copy_topics(settings: Settings, transactions_partitions: int) -> None:
    """The copy's topics; its transactions topic with ``transactions_partitions`` partitions (made first,
    since ``ensure_topics`` leaves an existing topic alone) and no time retention: the copies keep their old
    timestamps, so the topic's retention would delete them at once, and they are the record of what was replayed
    (:func:`replayed_transactions`) until ``cleanup``. A topic exists by ``kafka_clients.listed_topic``, as for every
    tool: one listed as unknown is made, and not waited for as listed; nor is one listed that the broker answers with
    an error or with a partition without a leader (``topic_replay.topic_unusable``): the ``TimeoutError`` names it."""
    from infra.clients.topic_replay import topic_unusable
    from infra.launcher import wait_for
    from infra.stack import ensure_topics

    name = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    with kafka_clients.admin_session(settings) as admin:
        if kafka_clients.listed_topic(kafka_clients.cluster_metadata(admin, settings), name) is None:
            topic = NewTopic(
                name,
                num_partitions=transactions_partitions,
                replication_factor=1,
                config={**TRANSACTIONS.config, "retention.ms": "-1"},
            )
            for fut in admin.create_topics([topic], request_timeout=30).values():
                fut.result()
        ensure_topics(settings)
        # A created topic may take a moment to be listed by every broker; the rules publish checks that it is.
        names = sorted(spec.full_name(settings.kafka.topic_prefix) for spec in ALL_TOPICS)
        not_ready: list[str] = []

        def ready() -> bool:
            listing = kafka_clients.cluster_metadata(admin, settings)
            not_ready.clear()
            for n in names:
                topic = kafka_clients.listed_topic(listing, n)
                why = f"topic {n} not listed" if topic is None else topic_unusable(n, topic)
                if why is not None:
                    not_ready.append(str(why))
            return not not_ready

        try:
            wait_for(ready, 30, what="the copy's topics to be listed, each partition with a leader")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {'; '.join(not_ready)}") from None


ControlReader = Callable[[Settings, Callable[[str, bytes | None, bytes | None], object]], object]
"""Calls ``apply(topic, key, value)`` for each record of the rules topic up to its end (the shape of
:func:`infra.clients.control_topics.read_control_topics` for ``specs=(RULES,)``)."""


@dataclass(frozen=True)
class CopyRules:
    """The rule set the copy runs and where it comes from."""

    rules: RuleSet
    text: str | None
    """Published to the copy's own rules topic; ``None``: the copy runs its settings' rule set."""
    source: Literal["file", "live", "settings"]
    """The candidate's file, the live job's (its rules topic), or the settings' (the live topic holds none)."""


def live_rule_set(settings: Settings, read: ControlReader) -> tuple[RuleSet, str] | None:
    """The rule set the live job runs and its text: the last record of the live rules topic with a valid rule
    set (the job skips a bad one or a tombstone and keeps the one before); ``None`` when there is none."""
    from schemas.codec import codec

    updates = codec(RULES.record_type)
    found: list[tuple[RuleSet, str]] = []

    def apply(_topic: str, _key: bytes | None, value: bytes | None) -> None:
        if value is None:
            return
        try:
            text = updates.decode(value)["yaml"]
            found.append((RuleSet.from_yaml(text, published=True), text))
        except Exception:  # noqa: BLE001 - as the job (DecisionCore.apply_control): a record it cannot use is skipped
            pass

    read(settings, apply)
    return found[-1] if found else None


def copy_rules(
    settings: Settings, copy: Settings, candidate: Candidate, read: ControlReader | None = None
) -> CopyRules:
    """The rule set the copy runs: the candidate's file, else the live job's (``read`` from its rules topic),
    so a model-only backtest does not blame the model for another rule set; the copy's settings' rule set
    when the live topic holds none (the live job then runs its own settings', which may differ: the report
    says so)."""
    if candidate.rules_file is not None:
        rules = RuleSet.load(candidate.rules_file)  # a bad file fails here, before the copy's topics exist
        return CopyRules(rules, candidate.rules_file.read_text(encoding="utf-8"), "file")
    if read is None:
        from functools import partial

        from infra.clients.control_topics import read_control_topics

        read = partial(read_control_topics, specs=(RULES,))
    live = live_rule_set(settings, read)
    if live is not None:
        return CopyRules(*live, "live")
    return CopyRules(RuleSet.from_settings(copy.rules), None, "settings")


def version_notes(report: Report) -> list[str]:
    """Where the decisions carry versions the run did not mean to compare: the side the candidate leaves alone
    (the rule set of a model-only run, the model of a rules-only one) differs, or the live rules topic held no
    rule set. From the run's ``meta``; none without it."""
    meta, base, cand = report.meta, report.versions.get("baseline", {}), report.versions.get("candidate", {})
    if not meta:
        return []
    notes = []
    if meta.get("rules_from") == "settings":
        notes.append(
            f"the live rules topic holds no rule set: the copy ran its settings' rule set {meta.get('rules_version')}"
            f" (the baseline's decisions carry {', '.join(base.get('rules', [])) or 'none'})."
        )
    if not meta.get("rules_file") and base.get("rules") != cand.get("rules"):
        notes.append(
            f"the candidate changes the model only, but its decisions carry rule set "
            f"{', '.join(cand.get('rules', []))} and the baseline's {', '.join(base.get('rules', []))}: "
            f"outcome changes mix the model and the rule sets."
        )
    if meta.get("model") is None and meta.get("model_dir") is None and base.get("model") != cand.get("model"):
        notes.append(
            f"the candidate changes the rule set only, but its decisions carry model "
            f"{', '.join(cand.get('model', []))} and the baseline's {', '.join(base.get('model', []))}: "
            f"outcome changes mix the rule set and the models."
        )
    return notes


def wait_until_done(copy: Settings, children: list, timeout_s: float, quiet_s: float) -> None:
    """Until the copy committed all its input and the sink all the copy's output, and that stays so. A topic the
    broker answers for with an error (no leader, not authorised) is a ``RuntimeError`` saying so: it was taken for
    one with nothing to read, and the backtest compared before the copy had decided anything. A copy topic that does
    not exist (deleted during the run) is not finished either: the ``TimeoutError`` at ``timeout_s`` names it."""
    from infra.clients.topic_replay import TopicUnavailable, caught_up, high_watermarks
    from schemas.indices import default_group_id

    prefix = copy.kafka.topic_prefix
    tx_topic, scored_topic = TRANSACTIONS.full_name(prefix), SCORED_TRANSACTIONS.full_name(prefix)
    deadline = time.monotonic() + timeout_s
    stable_since, last = None, None
    with console.status("waiting for the job copy and its sink to finish the range") as status:
        while True:
            for child in children:
                if not child.alive:
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}; see {child.log_path}")
            try:
                done = caught_up(copy.kafka, copy.consumer_group, tx_topic) and caught_up(
                    copy.kafka, default_group_id(prefix), scored_topic
                )
                now_ends = high_watermarks(copy.kafka, scored_topic)
                missing = [] if done else [t for t in (tx_topic, scored_topic) if not high_watermarks(copy.kafka, t)]
            except TopicUnavailable as exc:
                raise RuntimeError(f"cannot tell whether the job copy finished the range: {exc}") from None
            if done and now_ends == last:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= quiet_s:
                    return
            else:
                stable_since = None
            last = now_ends
            gone = f"; topic {', '.join(missing)} does not exist (deleted during the run?)" if missing else ""
            status.update(f"waiting for the job copy: {sum(now_ends.values()):,} decisions so far{gone}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the backtest did not finish in {timeout_s:.0f}s{gone} (logs: {children[0].log_path})"
                )
            time.sleep(1.0)


def range_notes(ranges: Iterable[Any]) -> list[str]:
    """Replay's warnings for a range that falls short of the one asked for (:func:`topic_replay.range_warnings`),
    as report notes; ``ranges`` are ``PartitionRange``s or their dicts in a report's ``meta`` (``compare`` keeps
    them), an unreadable one is left out."""
    from infra.clients.topic_replay import PartitionRange, range_warnings

    resolved = []
    for r in ranges:
        try:
            resolved.append(r if isinstance(r, PartitionRange) else PartitionRange(**r))
        except TypeError:  # not a range this version wrote
            continue
    return [f"the replayed range is not the one asked for: {w}" for w in range_warnings(resolved)]


def deleted_notes(deleted: Mapping[Any, Any] | None) -> list[str]:
    """A report note for the offsets of the range retention deleted from the live topic while they were replayed
    (per partition; a report's ``meta`` keeps them with the partitions as text), or none."""
    from infra.clients.topic_replay import deleted_warning

    try:
        counts = {int(p): int(n) for p, n in (deleted or {}).items()}
    except (AttributeError, TypeError, ValueError):  # not what this version wrote
        return []
    lost = deleted_warning(counts, "offset(s) of the range", "were not replayed")
    return [] if lost is None else [f"the replayed range is not the one asked for: {lost}"]


def run_backtest(
    settings: Settings,
    name: str,
    candidate: Candidate,
    start,
    end,
    partitions: Iterable[int] | None = None,
    copy_partitions: int = 1,
    rate: float = 0,
    timeout_s: float = 1800,
    progress: bool = True,
    sample_size: int = 25,
) -> tuple[Report, Path]:
    """Run the copy over the baseline's range ``[start, end)`` (``producers.replay.Bound``s), compare it with
    the baseline's index, write the report; returns it and its folder. The copy's job and sink are stopped
    at the end; its topics and index stay. Where the range falls short of the one asked for (offsets retention
    deleted, a window it may have cut, offsets not written yet) replay's warnings are printed before the run and
    open the report's notes. A range planning refuses (a start offset past a partition's end, a partition the
    topic does not have, no topic) raises :class:`RangeError` before anything is made, as replay refuses it."""
    from infra.clients.topic_replay import plan, replay
    from infra.launcher import spawn, start_scoring_job

    copy = candidate_settings(settings, name, candidate)
    out_dir = settings.stack_dir / "backtests" / name
    if copy.checkpoint_dir.exists():
        raise NameRefused(f"a backtest named {name} already ran ({out_dir}); pick another name or clean it up")
    source = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    target = TRANSACTIONS.full_name(copy.kafka.topic_prefix)
    ranges = plan(settings.kafka, source, start, end, partitions)  # a range it refuses: nothing done yet
    model_version = None
    if candidate.model_dir is not None or candidate.model_version is not None:
        from jobs.model.fraud_model import LocalModel

        model_version = LocalModel.from_settings(copy).version  # a missing artifact fails here, not in the job
    picked = copy_rules(settings, copy, candidate)
    shortfalls = range_notes(ranges)
    for note in shortfalls:  # before the run: it takes minutes, and the operator may stop it
        errors.print(f"warning: {note}", style="bold red", markup=False, highlight=False)
    create_copy_topics(copy, copy_partitions)
    if picked.text is not None:  # on the copy's own rules topic, as a live rule change would be
        publish_rule_set(copy, picked.rules, picked.text, "backtest")
    copy.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    children = [start_scoring_job(copy, name=f"{name}-job"), spawn("sinks.opensearch.sink", copy, name=f"{name}-sink")]
    try:
        stats = replay(settings.kafka, source, copy.kafka, target, ranges, rate=rate, progress=progress)
        if not stats.ok:
            raise RuntimeError(f"the replay lost records: {stats.failed} failed ({'; '.join(stats.errors)})")
        for note in deleted_notes(stats.deleted):  # retention deleted them from the live topic mid-copy
            errors.print(f"warning: {note}", style="bold red", markup=False, highlight=False)
            shortfalls.append(note)
        wait_until_done(copy, children, timeout_s, quiet_s=3 * copy.job.checkpoint_interval_ms / 1000)
    finally:
        for child in children:
            child.stop()
    replayed = replayed_transactions(settings, name)
    report = compare_indices(
        settings, settings.opensearch.index_prefix, copy.opensearch.index_prefix, sample_size, replayed
    )
    report.meta = {
        "name": name,
        "source_topic": source,
        "copy_topic": target,
        "copy_partitions": copy_partitions,
        "range": [asdict(r) for r in ranges],
        "replayed": stats.acked,
        "deleted_while_replayed": {str(p): n for p, n in stats.deleted.items()},
        "rules_file": str(candidate.rules_file) if candidate.rules_file else None,
        "rules_version": picked.rules.version,
        "rules_from": picked.source,
        "model_dir": str(candidate.model_dir) if candidate.model_dir else None,
        "model": model_version,
        "seconds": round(time.monotonic() - started, 1),
    }
    report.notes = shortfalls + report.notes + version_notes(report)
    write_report(report, out_dir)
    return report, out_dir


def compare_again(
    settings: Settings,
    baseline_prefix: str,
    candidate_prefix: str,
    sample_size: int = 25,
    read_replayed: Callable[[Settings, str], Replayed | Collection[str] | None] = replayed_transactions,
) -> tuple[Report, Path]:
    """Recompute the report of the backtest ``candidate_prefix`` over the transactions it replayed
    (``read_replayed``, from its topic) and write it over the old one, keeping the run's details
    (:func:`run_meta`); returns it and its folder."""
    out_dir = settings.stack_dir / "backtests" / candidate_prefix
    report = compare_indices(
        settings, baseline_prefix, candidate_prefix, sample_size, lambda: read_replayed(settings, candidate_prefix)
    )
    report.meta = run_meta(out_dir)
    shortfalls = range_notes(report.meta.get("range") or ()) + deleted_notes(report.meta.get("deleted_while_replayed"))
    report.notes = shortfalls + report.notes + version_notes(report)
    write_report(report, out_dir)
    return report, out_dir


def cleanup(settings: Settings, name: str) -> tuple[list[str], list[str]]:
    """Delete a backtest's topics (``<name>.*``), its indices (``<name>-<kind>*`` of the sink's kinds only), the index
    templates its sink installed (``<name>-<kind>``: left behind, every backtest added its own for good) and its
    checkpoints (so the name can run again); its report stays. A topic listed as unknown does not exist
    (``kafka_clients.listed_topic``): it is not asked to be deleted, which the broker would refuse."""
    from infra.clients.opensearch import make_client

    check_name(settings, name)
    with kafka_clients.admin_session(settings) as admin:
        listing = kafka_clients.cluster_metadata(admin, settings)
        copies = [t.full_name(f"{name}.") for t in ALL_TOPICS]
        topics = [t for t in copies if kafka_clients.listed_topic(listing, t) is not None]
        if topics:
            for fut in admin.delete_topics(topics, request_timeout=30).values():
                fut.result()
    client = make_client(settings.opensearch)
    patterns = ",".join(f"{index_name(name, route.kind)}*" for route in ROUTES)
    indices = sorted(client.indices.get(index=patterns, params={"allow_no_indices": "true"}))
    if indices:
        client.indices.delete(index=",".join(indices))
    for template in (index_name(name, route.kind) for route in ROUTES):
        if client.indices.exists_index_template(name=template):
            client.indices.delete_index_template(name=template)
    shutil.rmtree(settings.stack_dir / "backtests" / name / "checkpoints", ignore_errors=True)
    return topics, indices


# ---------------------------------------------------------------------------- CLI

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Backtest a rule set / model version in the stream against the live decisions.",
)


def _print(report: Report, out_dir: Path | None = None) -> None:
    for table in report_tables(report):
        console.print(table)
    console.print(versions_line(report), markup=False, highlight=False)
    for note in report.notes:
        console.print(f"warning: {note}", style="bold red", markup=False, highlight=False)
    if out_dir is not None:
        console.print(f"report: {out_dir / 'report.md'} and {out_dir / 'report.json'}", highlight=False)


@app.command("run")
def run_command(
    rules: Annotated[Path | None, typer.Option(help="Candidate rule set (YAML).", exists=True, dir_okay=False)] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Candidate model artifact folder (with CURRENT).", exists=True, file_okay=False)
    ] = None,
    model: Annotated[str | None, typer.Option(help="Candidate model version (folder under the artifact dir).")] = None,
    name: Annotated[str | None, typer.Option(help="Names the copy's topics/indices; default bt-<UTC time>.")] = None,
    from_offsets: Annotated[str | None, typer.Option(help="Start offset: N or P:N,P:N.")] = None,
    to_offsets: Annotated[str | None, typer.Option(help="End offset (exclusive): N or P:N,P:N.")] = None,
    from_time: Annotated[str | None, typer.Option(help="Start time (ISO-8601, epoch ms or now).")] = None,
    to_time: Annotated[str | None, typer.Option(help="End time (exclusive).")] = None,
    copy_partitions: Annotated[
        int, typer.Option(help="Partitions of the copy's transactions topic (1 = the merged order exactly).", min=1)
    ] = 1,
    rate: Annotated[float, typer.Option(help="Replay at most this many records per second; 0 = no cap.", min=0)] = 0,
    timeout_s: Annotated[float, typer.Option(help="Give up after this long.")] = 1800,
    samples: Annotated[int, typer.Option(help="Changed transactions listed in the report.")] = 25,
) -> None:
    """Replay a range of the live transactions through a job copy with the candidate, then compare."""
    from infra.clients.topic_replay import RangeError, bounds

    if rules is None and model_dir is None and model is None:
        errors.print("nothing to test: give --rules and/or --model-dir / --model", style="red")
        raise typer.Exit(2)
    settings = get_settings()
    name = name or f"bt-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    try:
        start, end = bounds(from_offsets, to_offsets, from_time, to_time)
    except (RangeError, ValueError) as exc:  # a bad option: a usage error, as replay's
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        report, out_dir = run_backtest(
            settings,
            name,
            Candidate(rules, model_dir, model),
            start,
            end,
            copy_partitions=copy_partitions,
            rate=rate,
            timeout_s=timeout_s,
            sample_size=samples,
        )
    except RangeError as exc:  # planning refused the range (only planning raises it): a usage error, as replay's
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except NameRefused as exc:  # a name used before (or not a backtest name): a usage error too, nothing made yet
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (RuleSetError, ValueError, TimeoutError, RuntimeError) as exc:
        errors.print(str(exc), style="red", markup=False, highlight=False)
        raise typer.Exit(1) from None
    _print(report, out_dir)


@app.command("compare")
def compare_command(
    baseline_prefix: Annotated[str, typer.Argument(help="Index prefix of the baseline (e.g. checkout-guard).")],
    candidate_prefix: Annotated[str, typer.Argument(help="Index prefix of the candidate (the backtest name).")],
    samples: int = 25,
) -> None:
    """Recompute a report from two indices (e.g. after the copy ran longer)."""
    report, out_dir = compare_again(get_settings(), baseline_prefix, candidate_prefix, samples)
    _print(report, out_dir)


@app.command("cleanup")
def cleanup_command(name: Annotated[str, typer.Argument(help="The backtest's name.")]) -> None:
    """Delete a backtest's topics, indices and checkpoints (the report stays)."""
    settings = get_settings()
    try:
        check_name(settings, name)
    except ValueError as exc:
        errors.print(f"not a backtest name: {exc}", style="red", markup=False)
        raise typer.Exit(2) from None
    topics, indices = cleanup(settings, name)
    console.print(f"deleted {len(topics)} topic(s) and {len(indices)} index(es) of {name}", highlight=False)


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
