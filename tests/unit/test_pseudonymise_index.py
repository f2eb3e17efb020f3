"""Pseudonymising customer keys already indexed: which documents change, into what, and that running it
again changes nothing (the upgrade step for indices written before the sink hashed e-mail keys)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from schemas.indices import SCORED_ROUTE, indexed_customer_key, is_indexed_customer_key
from sinks.opensearch import sink
from sinks.opensearch.pseudonymise import summary
from sinks.opensearch.sink import (
    PseudonymiseReport,
    migrate_legacy_index,
    pseudonymise,
    pseudonymise_hit,
    pseudonymise_indexed_keys,
    raw_customer_key_query,
)

SECRET = "s3cret"
ALICE = "email:alice.smith@example.com"


def hit(key: str | None, doc_id: str = "tx-1", index: str = "cg-transactions-2026.11.22") -> dict[str, Any]:
    source: dict[str, Any] = {"transaction_id": doc_id, "event_time": 1_795_305_600_000, "amount": 1.0}
    if key is not None:
        source["customer_key"] = key
    return {"_index": index, "_id": doc_id, "_source": source, "_seq_no": 7, "_primary_term": 2}


def test_an_indexed_email_key_becomes_the_keyed_hash_the_sink_writes_now() -> None:
    action = pseudonymise_hit(hit(ALICE), SCORED_ROUTE, SECRET)
    assert action is not None
    assert action["_source"]["customer_key"] == indexed_customer_key(ALICE, SECRET)
    assert "alice" not in json.dumps(action) and "example.com" not in json.dumps(action)
    # the same document in the same index, only if nobody wrote it since it was read
    assert (action["_op_type"], action["_index"], action["_id"]) == ("index", "cg-transactions-2026.11.22", "tx-1")
    assert (action["if_seq_no"], action["if_primary_term"]) == (7, 2)
    assert action["_source"]["amount"] == 1.0  # the rest of the document is kept


def test_without_a_secret_the_indexed_email_key_is_removed() -> None:
    action = pseudonymise_hit(hit(ALICE), SCORED_ROUTE, None)
    assert action is not None and "customer_key" not in action["_source"]
    assert action["_source"]["transaction_id"] == "tx-1"


def test_pseudonymising_twice_changes_nothing_the_second_time() -> None:
    for key in ("token:tok_9", "id:cust-42", "anon:tx-7", indexed_customer_key(ALICE, SECRET), None):
        assert pseudonymise_hit(hit(key), SCORED_ROUTE, SECRET) is None, key
    first = pseudonymise_hit(hit(ALICE), SCORED_ROUTE, SECRET)
    assert first is not None
    again = {**hit(None), "_source": first["_source"]}
    assert pseudonymise_hit(again, SCORED_ROUTE, SECRET) is None  # a hash is not hashed again
    assert pseudonymise_hit(again, SCORED_ROUTE, "another secret") is None
    assert is_indexed_customer_key("phone-hmac:abc") and not is_indexed_customer_key("phone:+1-555")


def test_the_scan_query_skips_pseudonymous_and_hashed_keys() -> None:
    query = raw_customer_key_query(SCORED_ROUTE)["query"]["bool"]
    assert query["should"] == [{"exists": {"field": "customer_key"}}]
    skipped = {json.dumps(clause, sort_keys=True) for clause in query["must_not"]}
    for kind in ("token", "id", "anon"):
        assert json.dumps({"prefix": {"customer_key": f"{kind}:"}}, sort_keys=True) in skipped
    assert json.dumps({"wildcard": {"customer_key": "*-hmac:*"}}, sort_keys=True) in skipped


def test_the_sinks_own_write_path_and_the_rewrite_agree() -> None:
    source = {"customer_key": ALICE}
    assert pseudonymise(source, SCORED_ROUTE, SECRET) is True
    assert source == {"customer_key": indexed_customer_key(ALICE, SECRET)}


class FakeCluster:
    """A client for the index listing only; scan and bulk are replaced in the sink module."""

    def __init__(self, docs: dict[str, list[dict[str, Any]]], legacy: bool = False) -> None:
        self.indices = self
        self.docs = docs
        self.legacy = legacy
        self.refreshed: list[str] = []
        self.deleted: list[str] = []

    def get_settings(self, index: str, **_: Any) -> dict[str, Any]:
        head = index.rstrip("*")
        return {n: {"settings": {"index": {"creation_date": "0"}}} for n in self.docs if n.startswith(head)}

    def exists(self, index: str) -> bool:
        return index in self.docs or (self.legacy and index == "cg-transactions")

    def exists_alias(self, name: str) -> bool:
        return not self.legacy

    def refresh(self, index: str) -> None:
        self.refreshed.append(index)

    def delete(self, index: str) -> None:
        self.deleted.append(index)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeCluster, list[dict[str, Any]]]]:
    docs = {
        "cg-transactions-2026.11.21": [hit(ALICE, "a", "cg-transactions-2026.11.21"), hit("token:t", "b")],
        "cg-transactions-2026.11.22": [hit("email:bob@example.com", "c", "cg-transactions-2026.11.22")],
        "cg-alerts-2026.11.22": [hit(ALICE, "d", "cg-alerts-2026.11.22")],  # no customer key field in its route
        "cg-transactions": [hit(ALICE, "e", "cg-transactions")],  # a legacy single index, when there is one
    }
    fake = FakeCluster(docs)
    written: list[dict[str, Any]] = []

    def scan(_client: Any, index: str, **_: Any) -> Iterator[dict[str, Any]]:
        yield from docs[index]

    def streaming_bulk(_client: Any, actions: Iterable[dict[str, Any]], **_: Any) -> Iterator[tuple[bool, Any]]:
        for action in actions:
            written.append(action)
            conflict = action["_id"] == "c" and len(written) == 2  # the sink wrote "c" meanwhile, this once
            yield (False, {"index": {"status": 409}}) if conflict else (True, {"index": {"status": 200}})

    monkeypatch.setattr(sink, "scan", scan)
    monkeypatch.setattr(sink, "streaming_bulk", streaming_bulk)
    yield fake, written


def test_every_transactions_index_of_the_prefix_is_rewritten_and_counted(cluster: Any) -> None:
    fake, written = cluster
    report = pseudonymise_indexed_keys(fake, "cg", SECRET)
    assert [(a["_index"], a["_id"]) for a in written] == [
        ("cg-transactions-2026.11.21", "a"),
        ("cg-transactions-2026.11.22", "c"),
    ]
    assert report.found == {"cg-transactions-2026.11.21": 1, "cg-transactions-2026.11.22": 1}
    assert report.rewritten == {"cg-transactions-2026.11.21": 1}
    assert report.changed_meanwhile == {"cg-transactions-2026.11.22": 1}
    text, complete = summary(report, dry_run=False, hashed=True)
    assert not complete and "hashed the customer key of 1 of 2 document(s)" in text and "run again" in text
    assert "alice" not in text and "bob" not in text


def test_a_dry_run_counts_and_writes_nothing(cluster: Any) -> None:
    fake, written = cluster
    fake.legacy = True
    report = pseudonymise_indexed_keys(fake, "cg", None, dry_run=True)
    assert written == [] and fake.refreshed == []
    assert sum(report.found.values()) == 3 and report.found["cg-transactions"] == 1
    text, complete = summary(report, dry_run=True, hashed=False)
    assert complete and text.startswith("would remove (no CG_INDICES__CUSTOMER_KEY_SECRET) the customer key of 3")


def test_the_legacy_single_index_is_pseudonymised_as_it_is_moved(cluster: Any) -> None:
    fake, written = cluster
    fake.legacy = True
    assert migrate_legacy_index(fake, SCORED_ROUTE, "cg", "day", SECRET) == 1
    assert written[0]["_source"]["customer_key"] == indexed_customer_key(ALICE, SECRET)
    assert fake.deleted == ["cg-transactions"]
    summary_ok = summary(PseudonymiseReport(), dry_run=False, hashed=True)
    assert summary_ok == ("hashed the customer key of 0 of 0 document(s)", True)


def _bulk_answering(
    statuses: dict[str, int], written: list[dict[str, Any]]
) -> Any:  # a streaming_bulk that raises as the real one does when told to
    from opensearchpy.helpers import BulkIndexError

    def streaming_bulk(_client: Any, actions: Iterable[dict[str, Any]], **kwargs: Any) -> Iterator[tuple[bool, Any]]:
        for action in actions:
            status = statuses.get(action["_id"], 201)
            error = {"type": "mapper_parsing_exception" if status == 400 else "es_rejected_execution_exception"}
            item = {"index": {"_id": action["_id"], "status": status, **({"error": error} if status >= 300 else {})}}
            if status >= 300 and kwargs.get("raise_on_error", True):
                raise BulkIndexError("1 document(s) failed to index.", [item])
            if status < 300:
                written.append(action)
            yield status < 300, item

    return streaming_bulk


def test_a_legacy_document_opensearch_refuses_is_counted_and_the_move_goes_on(
    cluster: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One document of the old single index that today's mapping refuses (400) raised BulkIndexError at every
    start: the sink crashed and was restarted for ever. It is logged by id and counted; the rest is moved."""
    fake, _ = cluster
    fake.legacy = True
    fake.docs["cg-transactions"] = [hit(ALICE, "bad", "cg-transactions"), hit("token:t", "good", "cg-transactions")]
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(sink, "streaming_bulk", _bulk_answering({"bad": 400}, written))
    with caplog.at_level("WARNING", logger="sinks.opensearch.sink"):
        assert migrate_legacy_index(fake, SCORED_ROUTE, "cg", "day", SECRET) == 1
    assert [a["_id"] for a in written] == ["good"] and fake.deleted == ["cg-transactions"]
    assert any("refused 1 document(s)" in r.getMessage() and "bad" in r.getMessage() for r in caplog.records)
    assert all("alice" not in r.getMessage() for r in caplog.records)


def test_a_legacy_move_the_cluster_throttles_is_retried_and_keeps_the_old_index(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opensearchpy.exceptions import TransportError

    fake, _ = cluster
    fake.legacy = True
    monkeypatch.setattr(sink, "streaming_bulk", _bulk_answering({"e": 429}, []))
    with pytest.raises(TransportError):  # the sink's start retries TransportError with backoff
        migrate_legacy_index(fake, SCORED_ROUTE, "cg", "day", SECRET)
    assert fake.deleted == []
