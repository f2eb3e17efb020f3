"""Labels from the field on the real stack: verdicts published with the labels CLI (one by one, from a
chargeback file, a correction and a withdrawal) are read back from the compacted ``labels`` topic and
joined to the transactions read from the ``transactions`` topic, so ``train``'s history carries them.

Runs on its own topic prefix (``Settings.isolated``), so the topics hold exactly what the test wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

import producers.labels as labels_cli
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.model.labels import apply_labels, read_labels, transactions_from_topic
from jobs.model.train import observe_all
from producers.pos import produce
from schemas.records import PosTransaction
from schemas.topics import ALL_TOPICS
from tests.builders import sale

pytestmark = pytest.mark.e2e


@pytest.fixture
def isolated(stack: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Topics of this test's own; the labels CLI publishes to them."""
    settings = stack.isolated(f"lb{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints")
    ensure_topics(settings)
    monkeypatch.setattr(labels_cli, "get_settings", lambda: settings)
    yield settings
    admin = AdminClient(settings.kafka.client_config())
    names = [spec.full_name(settings.kafka.topic_prefix) for spec in ALL_TOPICS]
    for future in admin.delete_topics(names, operation_timeout=10).values():
        future.exception(30)


def cli(*args: str) -> None:
    result = CliRunner().invoke(labels_cli.app, list(args))
    assert result.exit_code == 0, result.output


def test_published_labels_are_joined_to_the_transactions_of_the_topic(isolated: Settings, tmp_path: Path) -> None:
    settings = isolated
    run = uuid.uuid4().hex[:8]
    ids = {name: f"lb-{run}-{name}" for name in ("a", "b", "c", "d", "e", "f")}
    # Produced out of event-time order, on several lanes (so several partitions).
    txs = [
        sale(ids[name], at_s=at_s, lane=f"lane-0{n % 3 + 1}", card=f"card-{n}")
        for n, (name, at_s) in enumerate([("c", 30), ("a", 10), ("f", 60), ("b", 20), ("e", 50), ("d", 40)])
    ]
    stats = produce(settings, txs, progress=False)
    assert stats.ok and stats.acked == len(txs), stats.errors

    # From the CLI: a verdict, then its correction; a verdict later withdrawn.
    cli("publish", ids["a"], "fraud", "--by", "ana@store.test", "--reason", "stolen card", "--case", f"case-{run}")
    cli("publish", ids["d"], "fraud")
    cli("publish", ids["e"], "fraud")
    cli("publish", ids["e"], "legit", "--reason", "customer identified")
    cli("withdraw", ids["d"])
    # From a chargeback file: two good rows, one for a transaction the history does not have, one bad row.
    missing = f"lb-{run}-missing"
    chargebacks = tmp_path / "chargebacks.csv"
    chargebacks.write_text(
        "transaction_id,label,reason,decided_at\n"
        f"{ids['b']},legit,refund accepted,2026-01-02T00:00:00Z\n"
        f"{ids['c']},fraud,4837 no cardholder authorization,\n"
        f"{missing},fraud,,\n"
        "not/an id,fraud,,\n"
    )
    cli("import", str(chargebacks))

    found = read_labels(settings)
    verdicts = {tx: label.label for tx, label in found.by_transaction.items()}
    assert verdicts == {ids["a"]: 1, ids["b"]: 0, ids["c"]: 1, ids["e"]: 0, missing: 1}
    assert found.withdrawn == {ids["d"]} and found.replaced == 2 and found.undecodable == 0
    a = found.by_transaction[ids["a"]]
    assert (a.source, a.decided_by, a.reason, a.case_id) == ("cli", "ana@store.test", "stolen card", f"case-{run}")
    assert found.by_transaction[ids["c"]].source == "chargeback"

    history = transactions_from_topic(settings)
    assert history.undecodable == 0
    assert [tx.transaction_id for tx in history.transactions] == [ids[n] for n in "abcdef"], "event-time order"
    assert history.transactions == sorted(txs, key=lambda tx: tx.event_time)

    labelled, join = apply_labels(history.transactions, found)
    assert {tx.transaction_id: tx.label for tx in labelled if isinstance(tx, PosTransaction)} == {
        ids["a"]: 1,
        ids["b"]: 0,
        ids["c"]: 1,
        ids["d"]: None,
        ids["e"]: 0,
        ids["f"]: None,
    }
    assert (join.joined, join.fraud, join.legit, join.newly_labelled) == (4, 2, 2, 4)
    assert join.unmatched == [missing]

    # What `train` then learns from: the job's own history, with the field verdicts on it.
    observed = observe_all(labelled, settings)
    assert not observed.rejected
    assert {tx["transaction_id"]: tx.get("label") for tx, _ in observed.items} == {
        tx.transaction_id: tx.label for tx in labelled
    }
