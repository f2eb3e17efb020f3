"""``make bench`` stage: what the OpenSearch sink's face read costs (:func:`sinks.opensearch.sink.keep_faces`).

Before each bulk request the sink reads, with one ``mget``, the face fields of the indexed documents of the batch's
scored transactions decided without a face, so that a re-decision without one keeps the first decision's face. In
normal traffic many transactions have none (``face_status`` ``UNAVAILABLE``: no camera at the lane, an online order),
so nearly every batch pays that round trip. This stage measures it against the running local stack's OpenSearch,
under an index prefix of its own (``benchs<run>``: its indices and templates are deleted at the end).

Batches of N scored transactions made from the POS generator's and turned into bulk actions by the sink's own
:func:`~sinks.opensearch.sink.to_actions`: half of them re-decisions of a document indexed (with a face) before the
timing starts, half new, and across both halves half of them without a face. Each batch is written either (A) by
the sink's bulk round alone (:func:`~sinks.opensearch.sink.bulk_once`), as before, or (B) by ``keep_faces`` and then
the same bulk round; rounds of A, B, B, A after one untimed batch of each, so the drift of this shared machine falls
on both alike, and every timed batch has ids of its own. Figures: docs/s of A and B (medians), B / A per round
(median, lowest, highest) and the face read's own time per batch.

Alone (the local stack up): ``python -m tests.bench.sink --batch 500 --rounds 8``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer
from confluent_kafka import Message
from opensearchpy import OpenSearch
from opensearchpy.exceptions import NotFoundError

from infra.clients.opensearch import make_client
from infra.local.pos_generator import PosGenerator
from infra.settings import REPO_ROOT, Settings, get_settings
from jobs.scoring.features import customer_key
from schemas.indices import ROUTES
from schemas.records import PosTransaction, ScoredTransaction
from schemas.topics import SCORED_TRANSACTIONS
from sinks.opensearch.sink import IndexAction, bulk_once, install_templates, keep_faces, to_actions
from tests.bench.table import print_rows

ORDER = ("A", "B", "B", "A")
"""One round: A is the bulk write alone, B the face read and the same bulk write."""
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Batch:
    """One batch of scored transactions and, for its re-decisions, the first decisions indexed before any timing."""

    first: list[ScoredTransaction]
    records: list[ScoredTransaction]


def face_of(n: int) -> dict[str, Any]:
    """The face fields of a decision made with a camera: one in ten a watch-list match, the rest no match."""
    if n % 10 == 0:
        return dict(
            face_status="MATCHED",
            face_subject_id=f"subj-{n % 97}",
            face_category="SUSPECT",
            face_similarity=0.62,
            face_matcher="local",
        )
    return dict(
        face_status="NO_MATCH", face_subject_id=None, face_category=None, face_similarity=None, face_matcher=None
    )


NO_FACE: dict[str, Any] = dict(
    face_status="UNAVAILABLE", face_subject_id=None, face_category=None, face_similarity=None, face_matcher=None
)


def decided(tx: PosTransaction, n: int, face: dict[str, Any]) -> ScoredTransaction:
    """``tx`` as the scoring job's decision (the fields its ``scored_record`` fills); fraud blocked, the rest
    approved with a low score."""
    fraud = tx.label == 1
    risk = 85 if fraud else (n * 37) % 40
    return ScoredTransaction(
        transaction_id=tx.transaction_id,
        event_time=tx.event_time,
        store_id=tx.store_id,
        lane_id=tx.lane_id,
        cashier_id=tx.cashier_id,
        kind=tx.kind,
        original_transaction_id=tx.original_transaction_id,
        amount=tx.amount,
        currency=tx.currency,
        item_count=sum(item.quantity for item in tx.items),
        product_category=tx.product_category or (tx.items[0].category if tx.items else None),
        customer_id=tx.customer_id,
        customer_key=customer_key(tx.to_avro()),
        card_bin=tx.card_bin,
        billing_state=tx.billing_state,
        billing_country=tx.billing_country,
        outcome="BLOCK" if fraud else "APPROVE",
        risk_score=risk,
        reasons=("amount_zscore", "high_value_item") if fraud else (),
        indicators={"amount_zscore": 3.1 if fraud else 0.4, "high_value_item": 1.0 if fraud else 0.0},
        model_score=risk * 10,
        model_version="gbm-bench",
        rules_version="builtin-v1",
        label=tx.label,
        ingest_time=tx.event_time + 30,
        decided_at=tx.event_time + 80,
        proc_time_ms=30,
        model_time_ms=2,
        ttdf_ms=80,
        **face,
    )


def build_batches(count: int, size: int, seed: int = 31, customers: int = 50_000) -> list[Batch]:
    """``count`` batches of ``size`` transactions, ids all different. In each, position i is a re-decision when
    i is even (decided again an hour later: a job started without state) and new otherwise, and has no face when
    i // 2 is even: a quarter of each kind, interleaved. A re-decision's first decision always had a face."""
    gen = PosGenerator(seed=seed, stores=8, customers=customers, tx_per_second=200, diurnal=False)
    batches = []
    n = 0
    for _ in range(count):
        first, records = [], []
        for i in range(size):
            tx, n = next(gen), n + 1
            face = NO_FACE if (i // 2) % 2 == 0 else face_of(n + 1)
            if i % 2 == 0:
                earlier = decided(tx, n, face_of(n))
                first.append(earlier)
                records.append(replace(earlier, decided_at=earlier.decided_at + HOUR_MS, rules_version="v2", **face))
            else:
                records.append(decided(tx, n, face))
        batches.append(Batch(first=first, records=records))
    return batches


def batch_actions(
    records: Sequence[ScoredTransaction],
    *,
    index_prefix: str,
    topic_prefix: str = "",
    period: str = "day",
    customer_key_secret: str | None = None,
) -> list[IndexAction]:
    """The sink's bulk actions for ``records`` as read from ``processed_transactions`` (:func:`to_actions`)."""
    topic = SCORED_TRANSACTIONS.full_name(topic_prefix)
    messages = [
        Message(topic=topic, partition=0, offset=n, key=r.transaction_id.encode(), value=r.encode())
        for n, r in enumerate(records)
    ]
    actions, dead = to_actions(
        messages,
        index_prefix=index_prefix,
        topic_prefix=topic_prefix,
        period=period,
        customer_key_secret=customer_key_secret,
    )
    if dead:
        raise ValueError(f"the sink refused {len(dead)} bench record(s): {dead[0].error_kind} {dead[0].reason}")
    return actions


def summarise(runs: Sequence[dict], batch: int) -> dict:
    """Medians per side, and B / A per round (the docs/s of its two B batches against its two A batches)."""
    rounds = [runs[k : k + len(ORDER)] for k in range(0, len(runs) - len(ORDER) + 1, len(ORDER))]
    ratios = [_rate(block, "B") / _rate(block, "A") for block in rounds]
    reads = [r["read_s"] * 1000 for r in runs if r["side"] == "B"]
    kept = [r["faces_kept"] for r in runs if r["side"] == "B"]
    return {
        "batch": batch,
        "rounds": len(rounds),
        "runs": list(runs),
        "median_per_s": {side: statistics.median(r["per_s"] for r in runs if r["side"] == side) for side in "AB"},
        "ratio_per_round": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "read_ms_median": statistics.median(reads),
        "faces_kept_median": statistics.median(kept),
        "faces_kept_expected": sum(1 for i in range(batch) if i % 2 == 0 and (i // 2) % 2 == 0),
    }


def _rate(block: Sequence[dict], side: str) -> float:
    mine = [r for r in block if r["side"] == side]
    return sum(r["docs"] for r in mine) / sum(r["seconds"] for r in mine)


def report_rows(results: dict) -> list[tuple[str, str, str]]:
    per_s = results["median_per_s"]
    return [
        (
            f"sink bulk write with the face read / without (median of {results['rounds']} A-B-B-A rounds)",
            f"{results['ratio_median']:.3f} ({results['ratio_min']:.3f}-{results['ratio_max']:.3f})",
            "",
        ),
        (
            f"  docs/s without / with the face read (medians, batches of {results['batch']})",
            f"{per_s['A']:,.0f} / {per_s['B']:,.0f}",
            "",
        ),
        ("  face read (mget) per batch (ms, median)", f"{results['read_ms_median']:.1f}", ""),
        (
            "  faces kept per batch (median / expected)",
            f"{results['faces_kept_median']:.0f} / {results['faces_kept_expected']}",
            "",
        ),
    ]


def timed_write(client: OpenSearch, actions: list[IndexAction], side: str, max_docs: int) -> dict:
    """Write one batch as the sink does (B: ``keep_faces`` first); its docs/s. Raises when OpenSearch did not take
    it whole: a retried or refused batch is not the figure asked for."""
    t0 = time.perf_counter()
    kept = keep_faces(client, actions) if side == "B" else 0
    t_read = time.perf_counter()
    result = bulk_once(client, actions, max_docs)
    seconds = time.perf_counter() - t0
    if result.retry or result.rejected or result.acknowledged != len(actions):
        raise RuntimeError(
            f"OpenSearch took {result.acknowledged}/{len(actions)} documents "
            f"({len(result.rejected)} refused, {len(result.retry)} to retry: {result.problem})"
        )
    return {
        "side": side,
        "docs": len(actions),
        "seconds": seconds,
        "per_s": len(actions) / seconds,
        "read_s": t_read - t0,
        "faces_kept": kept,
    }


def sink_face_read(base: Settings, batch: int = 500, rounds: int = 8) -> dict:
    """Rounds of A, B, B, A batches of ``batch`` scored transactions (after one untimed A and B); see the module."""
    if batch < 4 or rounds < 1:
        raise ValueError("a batch of at least 4 and at least one round")
    client = make_client(base.opensearch)
    if not client.ping():
        raise RuntimeError(f"OpenSearch at {base.opensearch.url} does not answer: start the local stack (make up)")
    run_id = time.strftime("%H%M%S") + uuid.uuid4().hex[:4]
    prefix, period = f"benchs{run_id}", base.indices.period
    secret = base.indices.customer_key_secret
    key_secret = secret.get_secret_value() if secret else None
    sides = ["A", "B", *(ORDER * rounds)]
    batches = build_batches(len(sides), batch)

    def actions(records: Sequence[ScoredTransaction]) -> list[IndexAction]:
        return batch_actions(records, index_prefix=prefix, period=period, customer_key_secret=key_secret)

    max_docs = base.opensearch.bulk_max_docs
    try:
        install_templates(client, prefix, period)
        first = actions([r for b in batches for r in b.first])
        for k in range(0, len(first), max_docs):
            timed_write(client, first[k : k + max_docs], "A", max_docs)
        client.indices.refresh(index=f"{prefix}-*")
        runs = [timed_write(client, actions(b.records), side, max_docs) for side, b in zip(sides, batches, strict=True)]
    finally:
        delete_prefix(client, prefix)
    return {"run": run_id, **summarise(runs[2:], batch)}


def delete_prefix(client: OpenSearch, prefix: str) -> None:
    """Delete the indices under ``prefix`` and the index templates :func:`install_templates` made for it (one per
    route, named like its alias): deleting the indices alone leaves the templates behind, one set per run."""
    client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
    for route in ROUTES:
        with contextlib.suppress(NotFoundError):
            client.indices.delete_index_template(name=route.index(prefix))


app = typer.Typer(add_completion=False)


@app.command()
def main(
    batch: Annotated[int, typer.Option(help="Scored transactions per batch (the sink's bulk request).")] = 500,
    rounds: Annotated[
        int, typer.Option(help="Rounds of batches written without, with, with, without the face read.")
    ] = 8,
) -> None:
    """Only the sink's face-read stage of ``make bench``: prints its rows, writes bench-results/sink-<run>.json."""
    results = sink_face_read(get_settings(), batch=batch, rounds=rounds)
    print_rows(f"OpenSearch sink face read {results['run']}", report_rows(results))
    out = REPO_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"sink-{results['run']}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results written to {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    app()
