"""The backtest comparison (jobs/flink/backtest_stream.py): outcome changes, changed transactions, precision/recall."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml

from infra.clients import opensearch
from infra.settings import Settings
from jobs.flink.backtest_stream import (
    FLAGS,
    Candidate,
    Replayed,
    candidate_settings,
    compare,
    compare_again,
    compare_indices,
    copy_rules,
    detection,
    report_markdown,
    report_tables,
    run_backtest,
    transaction_ids,
    version_notes,
    write_report,
)
from jobs.scoring.rules import RuleSet, update_record
from schemas.records import PosTransaction, RuleSetUpdate
from schemas.topics import RULES
from tests.builders import fake_cluster, partitions_led


def _doc(
    tx: str,
    outcome: str,
    risk: int,
    label: int | None,
    indicators: dict | None = None,
    rules: str = "r1",
    model: str = "m1",
) -> dict:
    return {
        "transaction_id": tx,
        "kind": "SALE",
        "store_id": "store-001",
        "amount": 10.0,
        "currency": "USD",
        "outcome": outcome,
        "risk_score": risk,
        "reasons": ["velocity_exceeded"] if risk else [],
        "indicators": indicators or {"velocity_exceeded": 1.0},
        "model_score": 100,
        "model_version": model,
        "rules_version": rules,
        "label": label,
    }


BASELINE = [
    _doc("t1", "APPROVE", 10, 0),
    _doc("t2", "REVIEW", 60, 1),
    _doc("t3", "BLOCK", 90, 1),
    _doc("t4", "REVIEW", 55, 0),
    _doc("t5", "APPROVE", 20, 1),
    _doc("t6", "APPROVE", 0, None),
    _doc("t7", "BLOCK", 95, 1),
]
CANDIDATE = [
    _doc("t1", "APPROVE", 10, 0, rules="r2"),
    _doc("t2", "BLOCK", 60, 1, rules="r2"),
    _doc("t3", "BLOCK", 90, 1, rules="r2"),
    _doc("t4", "BLOCK", 55, 0, rules="r2"),
    _doc("t5", "BLOCK", 70, 1, indicators={"velocity_exceeded": 1.0, "amount_above_norm": 1.0}, rules="r2"),
    _doc("t6", "APPROVE", 0, None, rules="r2"),
    _doc("t8", "APPROVE", 0, 0, rules="r2"),
]


class FakeSearch:
    """An OpenSearch client over ``{index prefix: documents}``: refresh, ids queries and a one-page scroll."""

    def __init__(self, docs: dict[str, list[dict]]) -> None:
        self.docs = {f"{prefix}-transactions": {d["transaction_id"]: d for d in ds} for prefix, ds in docs.items()}
        self.indices = self

    def refresh(self, index: str) -> None:
        assert index in self.docs, index

    def search(self, index: str, body: dict, **_scroll) -> dict:
        found = self.docs[index]
        ids = body.get("query", {}).get("ids", {}).get("values")
        hits = [found[i] for i in ids if i in found] if ids is not None else list(found.values())
        return {
            "hits": {"hits": [{"_source": d} for d in hits]},
            "_scroll_id": "s1",
            "_shards": {"total": 1, "successful": 1},
        }

    def scroll(self, body: dict, **_kw) -> dict:
        return {"hits": {"hits": []}}

    def clear_scroll(self, body: dict, **_kw) -> None:
        pass


REPLAYED = {f"t{i}" for i in range(1, 10)}
"""What the copy's transactions topic held: t7 only the baseline decided, t8 only the candidate, t9 neither."""


def test_outcome_changes_are_counted_baseline_by_candidate():
    report = compare(BASELINE, CANDIDATE)
    assert report.compared == 6 and report.only_baseline == 1 and report.only_candidate == 1
    assert report.confusion["APPROVE"] == {"APPROVE": 2, "REVIEW": 0, "BLOCK": 1}
    assert report.confusion["REVIEW"] == {"APPROVE": 0, "REVIEW": 0, "BLOCK": 2}
    assert report.confusion["BLOCK"] == {"APPROVE": 0, "REVIEW": 0, "BLOCK": 1}
    assert sum(sum(row.values()) for row in report.confusion.values()) == report.compared
    assert report.changed == 3 and report.risk_changed == 1
    assert report.inputs_differ == 1 and report.changed_same_inputs == 2
    assert report.input_changes == {"amount_above_norm": 1}
    assert report.outcomes["baseline"] == {"APPROVE": 3, "BLOCK": 1, "REVIEW": 2}
    assert report.outcomes["candidate"] == {"APPROVE": 2, "BLOCK": 4}
    assert report.versions == {
        "baseline": {"rules": ["r1"], "model": ["m1"]},
        "candidate": {"rules": ["r2"], "model": ["m1"]},
    }


def test_changed_transactions_are_listed_biggest_change_first():
    report = compare(BASELINE, CANDIDATE, sample_size=2)
    assert [s["transaction_id"] for s in report.samples] == ["t5", "t2"]
    first = report.samples[0]
    assert first["baseline"]["outcome"] == "APPROVE" and first["candidate"]["outcome"] == "BLOCK"
    assert first["same_inputs"] is False and report.samples[1]["same_inputs"] is True


def test_precision_and_recall_count_only_labelled_transactions():
    report = compare(BASELINE, CANDIDATE)
    base, cand = report.detection["baseline"], report.detection["candidate"]
    # Labelled in both: t1..t5 (t6 has no label; t7 and t8 are not in both): fraud t2, t3, t5.
    assert (base["BLOCK"].labelled, base["BLOCK"].positives) == (5, 3)
    assert (base["BLOCK"].flagged, base["BLOCK"].true_positives) == (1, 1)
    assert base["BLOCK"].precision == 1.0 and base["BLOCK"].recall == pytest.approx(1 / 3)
    both = base["BLOCK+REVIEW"]
    assert both.precision == pytest.approx(2 / 3) and both.recall == pytest.approx(2 / 3)
    assert cand["BLOCK"].precision == pytest.approx(3 / 4) and cand["BLOCK"].recall == 1.0


def test_precision_and_recall_are_undefined_rather_than_zero_without_flags_or_fraud():
    nothing_flagged = detection([_doc("a", "APPROVE", 0, 1)], FLAGS["BLOCK"])
    assert nothing_flagged.precision is None and nothing_flagged.recall == 0.0
    no_fraud = detection([_doc("a", "BLOCK", 90, 0), _doc("b", "BLOCK", 90, None)], FLAGS["BLOCK"])
    assert no_fraud.recall is None and no_fraud.precision == 0.0 and no_fraud.labelled == 1


def test_the_report_renders_as_markdown_and_json():
    report = compare(BASELINE, CANDIDATE)
    text = report_markdown(report)
    assert "| REVIEW | 0 | 0 | 2 | 2 |" in text
    assert "| candidate | r2 / m1 | BLOCK | 5 | 3 | 4 | 75.0% | 100.0% |" in text
    data = json.loads(report.to_json())
    assert data["confusion"]["APPROVE"]["BLOCK"] == 1
    assert data["detection"]["baseline"]["BLOCK"]["recall"] == pytest.approx(1 / 3)


def test_changed_transactions_show_their_amount_with_the_currencys_decimals():
    """Two decimals for every currency: 1500 JPY read 1,500.00 and 12.345 KWD read 12.35, a fils off."""
    from io import StringIO

    from rich.console import Console

    priced = {"t2": (1500.0, "JPY"), "t4": (12.345, "KWD"), "t5": (1234.5, "EUR")}  # the changed ones

    def with_prices(docs: list[dict]) -> list[dict]:
        return [d | dict(zip(("amount", "currency"), priced[d["transaction_id"]], strict=True)) for d in docs]

    changed = [d for d in BASELINE if d["transaction_id"] in priced]
    report = compare(with_prices(changed), with_prices([d for d in CANDIDATE if d["transaction_id"] in priced]))
    text = report_markdown(report)
    assert "| 1,500 JPY |" in text and "| 12.345 KWD |" in text and "| 1,234.50 EUR |" in text
    console = Console(file=StringIO(), width=250)
    console.print(report_tables(report)[-1])
    shown = console.file.getvalue()
    assert "1,500 JPY" in shown and "12.345 KWD" in shown and "1,234.50 EUR" in shown and ".00 JPY" not in shown


def test_the_copy_is_isolated_and_runs_the_candidate(tmp_path):
    rules = tmp_path / "candidate.yaml"
    live = Settings(stack_dir=tmp_path)
    copy = candidate_settings(live, "bt-1", Candidate(rules_file=rules, model_version="gbm-x"))
    assert copy.kafka.topic_prefix == "bt-1." and copy.opensearch.index_prefix == "bt-1"
    assert copy.job.consumer_group == "bt-1" and copy.checkpoint_dir == tmp_path / "backtests" / "bt-1" / "checkpoints"
    assert copy.rules.ruleset_file == rules and copy.model.artifact == "gbm-x"
    assert copy.job.face_deadline_ms == 0
    with pytest.raises(ValueError, match="backtest name"):
        candidate_settings(live, "Has Spaces", Candidate(rules_file=rules))


def test_the_copy_decides_the_whole_range_whatever_the_operators_decide_from(tmp_path):
    """The copy inherited CG_JOB__DECIDE_FROM: the range before it built state only and was never compared."""
    live = Settings(stack_dir=tmp_path, job={"decide_from": 1_795_000_000_000})
    assert candidate_settings(live, "bt-1", Candidate(model_version="gbm-x")).job.decide_from == 0


def test_the_copy_serves_no_metrics_on_the_live_processes_ports(tmp_path):
    """Its job and sink took the live scoring-job and opensearch-sink ports and names: Prometheus scraped
    replayed decisions as live ones, or a restarted live process could not bind its endpoint."""
    live = Settings(stack_dir=tmp_path)
    copy = candidate_settings(live, "bt-1", Candidate())
    assert live.metrics.enabled and not copy.metrics.enabled
    assert copy.to_env()["CG_METRICS__ENABLED"] == "False"  # what the copy's child processes are started with


def test_the_copy_never_trains_or_replaces_a_model_in_the_live_models_folder(tmp_path):
    """The copy shares the live models folder unless given one; training the default at its start could replace the
    live champion (an earlier synthetic default), the audit event going to the copy's own audit topic."""
    live = Settings(stack_dir=tmp_path)
    assert live.model.auto_train
    assert not candidate_settings(live, "bt-1", Candidate()).model.auto_train
    assert candidate_settings(live, "bt-1", Candidate()).to_env()["CG_MODEL__AUTO_TRAIN"] == "False"


@pytest.mark.parametrize("name", ["checkout", "checkout-guard"])
def test_a_backtest_name_that_takes_in_the_live_indices_is_refused(tmp_path, name: str):
    """cleanup deleted <name>-*: 'checkout' took every live checkout-guard-* index with it."""
    with pytest.raises(ValueError, match="would take in the live ones"):
        candidate_settings(Settings(stack_dir=tmp_path), name, Candidate(rules_file=tmp_path / "r.yaml"))
    assert candidate_settings(Settings(stack_dir=tmp_path), "checkout-guard2", Candidate()).opensearch.index_prefix


@pytest.mark.parametrize("name", ["checkout-guard-alerts", "checkout-guard-alerts-v2", "checkout-guard-transactions-x"])
def test_a_backtest_name_under_a_live_index_family_is_refused(tmp_path, name: str):
    """``checkout-guard-alerts-v2-transactions-2026.11.22`` matched the live ``checkout-guard-alerts-*`` template:
    the copy's own template (same priority) was refused, so its sink died mid-run, or its decisions would have
    joined the live ``checkout-guard-alerts`` alias."""
    with pytest.raises(ValueError, match="fall under the live checkout-guard-"):
        candidate_settings(Settings(stack_dir=tmp_path), name, Candidate(rules_file=tmp_path / "r.yaml"))
    assert candidate_settings(Settings(stack_dir=tmp_path), "checkout-guard-bt1", Candidate()).opensearch.index_prefix


def test_a_backtest_name_whose_topics_are_the_live_ones_is_refused_by_run_and_cleanup(tmp_path):
    """Under the live topic prefix ``store1.``, ``store1`` replayed into the live topics and cleanup deleted them."""
    from jobs.flink.backtest_stream import cleanup

    live = Settings(stack_dir=tmp_path, kafka={"topic_prefix": "store1."})
    with pytest.raises(ValueError, match="are the live ones"):
        candidate_settings(live, "store1", Candidate(rules_file=tmp_path / "r.yaml"))
    with pytest.raises(ValueError, match="are the live ones"):
        cleanup(live, "store1")  # refused before any client is made
    assert candidate_settings(live, "store2", Candidate()).kafka.topic_prefix == "store2."


def test_cleanup_deletes_only_the_copys_own_indices_templates_topics_and_checkpoints(tmp_path, monkeypatch):
    """The name may run again after it (the refusal said 'clean it up', but the checkpoints stayed)."""
    import contextlib
    from types import SimpleNamespace

    from infra.clients import kafka as kafka_clients
    from infra.clients import opensearch
    from jobs.flink.backtest_stream import cleanup

    asked: list[str] = []
    deleted: list[str] = []
    templates = {"bt-1-transactions", "bt-1-alerts", "checkout-guard-transactions", "bt-10-transactions"}
    indices = SimpleNamespace(
        get=lambda index, params: asked.append(index) or {"bt-1-transactions-2026.11.22": {}},
        delete=lambda index: deleted.append(index),
        exists_index_template=lambda name: name in templates,
        delete_index_template=lambda name: templates.remove(name),
    )
    monkeypatch.setattr(opensearch, "make_client", lambda _settings: SimpleNamespace(indices=indices))
    admin = SimpleNamespace(delete_topics=lambda topics, request_timeout: {})
    monkeypatch.setattr(kafka_clients, "admin_session", lambda _settings: contextlib.nullcontext(admin))
    monkeypatch.setattr(kafka_clients, "cluster_metadata", lambda *_a, **_k: SimpleNamespace(topics={}))
    checkpoints = tmp_path / "backtests" / "bt-1" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "backtests" / "bt-1" / "report.md").write_text("kept")
    assert cleanup(Settings(stack_dir=tmp_path), "bt-1") == ([], ["bt-1-transactions-2026.11.22"])
    [patterns] = asked
    assert all(p.startswith("bt-1-") and p.endswith("*") for p in patterns.split(",")) and "bt-1-*" not in patterns
    assert deleted == ["bt-1-transactions-2026.11.22"]
    assert templates == {"checkout-guard-transactions", "bt-10-transactions"}, "its own templates only"
    assert not checkpoints.exists() and (tmp_path / "backtests" / "bt-1" / "report.md").exists()


def test_comparing_again_keeps_the_runs_details(tmp_path, monkeypatch):
    """``compare NAME`` wrote its report over the run's with no meta: range, rule set and model were lost."""
    monkeypatch.setattr(
        opensearch, "make_client", lambda *_a, **_k: FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    )
    settings = Settings(stack_dir=tmp_path)
    run = compare(BASELINE, CANDIDATE, "checkout-guard", "bt-1")
    run.meta = {"name": "bt-1", "range": [{"partition": 0, "start": 12, "end": 20}], "rules_version": "r2"}
    write_report(run, tmp_path / "backtests" / "bt-1")
    report, out_dir = compare_again(settings, "checkout-guard", "bt-1", read_replayed=lambda *_: REPLAYED)
    assert out_dir == tmp_path / "backtests" / "bt-1" and report.compared == 6
    assert report.meta == run.meta == json.loads((out_dir / "report.json").read_text())["meta"]
    assert '"rules_version": "r2"' in (out_dir / "report.md").read_text()
    assert compare_again(settings, "checkout-guard", "bt-1", 1, lambda *_: REPLAYED)[0].meta == run.meta  # again


def test_a_range_retention_cut_is_warned_about_before_the_run_and_in_the_report(tmp_path, monkeypatch, capsys):
    """The stream backtest planned its range as replay does but kept quiet about the offsets retention deleted:
    its report compared a part of the range as if it were the whole."""
    from infra import launcher
    from infra.clients import topic_replay
    from jobs.flink import backtest_stream

    cut = [topic_replay.PartitionRange(0, 10, 80, 10, 100, gone=6), topic_replay.PartitionRange(1, 0, 50, 0, 50)]
    monkeypatch.setattr(topic_replay, "plan", lambda *_a, **_k: cut)
    stats = topic_replay.ReplayStats(acked=120, sent=120, deleted={1: 3})  # and 3 deleted mid-copy
    monkeypatch.setattr(topic_replay, "replay", lambda *_a, **_k: stats)
    monkeypatch.setattr(launcher, "start_scoring_job", lambda *_a, **_k: SimpleNamespace(stop=lambda: None))
    monkeypatch.setattr(launcher, "spawn", lambda *_a, **_k: SimpleNamespace(stop=lambda: None))
    for quiet in ("create_copy_topics", "publish_rule_set", "wait_until_done"):
        monkeypatch.setattr(backtest_stream, quiet, lambda *_a, **_k: None)
    monkeypatch.setattr(backtest_stream, "replayed_transactions", lambda *_a: REPLAYED)
    monkeypatch.setattr(
        opensearch, "make_client", lambda *_a, **_k: FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    )
    (rules_file := tmp_path / "cand.yaml").write_text(_published("cand-1", 65)[1])
    settings = Settings(stack_dir=tmp_path)
    report, out_dir = run_backtest(settings, "bt-1", Candidate(rules_file=rules_file), None, None)
    warning = "6 offset(s) of the range are gone (deleted by retention) and cannot be replayed (partition 0: 6"
    err = " ".join(capsys.readouterr().err.split())
    assert warning in err
    assert report.notes[0].startswith("the replayed range is not the one asked for: 6 offset(s) of the range are")
    assert warning in (out_dir / "report.md").read_text()
    mid_copy = (
        "the replayed range is not the one asked for: 3 offset(s) of the range were deleted by retention while being"
        " read (partition 1: 3) and were not replayed"
    )
    assert report.notes[1] == mid_copy and mid_copy.split(": ", 1)[1] in err
    again, _ = compare_again(settings, "checkout-guard", "bt-1", read_replayed=lambda *_: REPLAYED)
    assert again.notes[:2] == report.notes[:2]  # compare keeps them: the range and the loss are in the run's details


def test_comparing_without_a_run_report_has_no_run_details(tmp_path, monkeypatch):
    monkeypatch.setattr(
        opensearch, "make_client", lambda *_a, **_k: FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    )
    report, out_dir = compare_again(Settings(stack_dir=tmp_path), "checkout-guard", "bt-1", 25, lambda *_: REPLAYED)
    assert report.meta == {} and "## Run" not in (out_dir / "report.md").read_text()


def test_transactions_only_the_baseline_decided_count_and_warn_when_the_replay_is_known(monkeypatch):
    """The baseline was fetched by the candidate's ids: a copy that missed transactions looked complete."""
    search = FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    monkeypatch.setattr(opensearch, "make_client", lambda *_a, **_k: search)
    report = compare_indices(Settings(), "checkout-guard", "bt-1", replayed=REPLAYED)
    assert (report.replayed, report.compared, report.only_baseline, report.only_candidate) == (9, 6, 1, 1)
    assert report.undecided == 1 and report.detection["baseline"]["BLOCK"].labelled == 5
    finished, neither = report.notes
    assert finished.startswith("1 transactions (1 labelled fraud) were decided by the baseline and not by the")
    assert neither.startswith("1 of the 9 replayed transactions are in neither index (6 compared + 2 only in one)")
    text = report_markdown(report)
    assert f"> **Warning:** {finished}" in text and "1 only in the baseline" in text and "of 9 transactions" in text


def test_the_in_neither_index_figures_count_only_replayed_transactions():
    """A candidate decision outside the replayed set (warned of in its own note) was added to "only in one" too,
    so 6 compared + 3 only in one + 1 in neither made 10 of 9 replayed."""
    stray = [*CANDIDATE, _doc("t99", "APPROVE", 0, 0, rules="r2")]
    report = compare(BASELINE, stray, replayed=REPLAYED)
    _finished, outside, neither = report.notes
    assert outside.startswith("1 transactions the candidate decided are not among the 9 replayed")
    assert neither.startswith("1 of the 9 replayed transactions are in neither index (6 compared + 2 only in one)")


def test_a_complete_copy_has_no_warning():
    both = [d for d in BASELINE if d["transaction_id"] != "t7"]
    report = compare(both, both, replayed=[d["transaction_id"] for d in both])
    assert report.notes == [] and report.undecided == 0 and report.only_baseline == 0
    assert "Warning" not in report_markdown(report)


def test_without_the_replayed_transactions_only_the_baseline_is_unknown_not_zero(monkeypatch):
    search = FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    monkeypatch.setattr(opensearch, "make_client", lambda *_a, **_k: search)
    report = compare_indices(Settings(), "checkout-guard", "bt-1")
    assert report.compared == 6 and report.only_baseline is None and report.replayed is None
    [note] = report.notes
    assert note.startswith("the replayed transactions are not known (bt-1.transactions is gone, or retention")
    assert "unknown only in the baseline" in report_markdown(report)


def test_a_replayed_set_retention_has_thinned_is_not_known_rather_than_compared_as_the_whole(monkeypatch):
    """The copies keep their old timestamps: within days retention deletes them, and an empty set compared
    nothing without a word."""
    from infra.clients import topic_replay
    from jobs.flink import backtest_stream

    kept = [PosTransaction("t9", 1_795_000_000_000, "store-001", "1", "SALE", 5.0, "USD").encode()]

    class Record:
        def __init__(self, value: bytes) -> None:
            self._value = value

        def value(self) -> bytes:
            return self._value

    for low, expected in ((0, Replayed(frozenset({"t9"}), 0)), (4, None)):
        ranges = [topic_replay.PartitionRange(0, low, 5, low, 5)]
        monkeypatch.setattr(topic_replay, "plan", lambda *_a, ranges=ranges, **_k: ranges)
        monkeypatch.setattr(topic_replay, "read_range_records", lambda *_a, **_k: [Record(v) for v in kept])
        assert backtest_stream.replayed_transactions(Settings(), "bt-1") == expected

    def deleted_while_read(*_a, deleted: dict[int, int] | None = None, **_k):
        """Retention deletes two records between the plan (low 0) and their read: an ``earliest`` reset skipped
        them, and the thinned set was compared as the whole."""
        if deleted is not None:
            deleted[0] = 2
        return [Record(v) for v in kept]

    monkeypatch.setattr(topic_replay, "plan", lambda *_a, **_k: [topic_replay.PartitionRange(0, 0, 5, 0, 5)])
    monkeypatch.setattr(topic_replay, "read_range_records", deleted_while_read)
    assert backtest_stream.replayed_transactions(Settings(), "bt-1") is None
    report = compare(BASELINE, CANDIDATE, replayed=["t1"])  # the candidate decided more than the set holds
    assert any(n.startswith("6 transactions the candidate decided are not among the 1 replayed") for n in report.notes)


def test_the_replayed_ids_are_read_from_the_records_and_an_undecodable_one_has_none():
    records = [PosTransaction(f"t{i}", 1_795_000_000_000 + i, "store-001", "1", "SALE", 5.0, "USD") for i in (1, 2)]
    values = [r.encode() for r in records] + [records[0].encode(), b"not avro", None]
    assert transaction_ids(values, 1 << 20) == Replayed(frozenset({"t1", "t2"}), 2)


def test_a_replayed_record_the_job_dead_letters_is_counted_refused_not_replayed_and_not_looked_up(monkeypatch):
    """It decodes, but the job refuses it: counted as replayed, it was reported as in neither index ("did the copy
    finish?"), and its id, be it a megabyte, was asked of the baseline index."""
    sales = [PosTransaction(f"t{i}", 1_795_000_000_000, "store-001", "1", "SALE", 5.0, "USD") for i in range(1, 9)]
    hostile = [
        replace(sales[0], transaction_id="x" * 500_000),
        replace(sales[0], transaction_id="t9", store_id="../../etc"),
        replace(sales[0], transaction_id="t10", card_token="t" * 500_000),
        replace(sales[0], transaction_id="t11", amount=-5.0),
    ]
    read = transaction_ids([*(t.encode() for t in sales + hostile), b"not avro"], 1 << 20)
    assert read == Replayed(frozenset(REPLAYED - {"t9"}), 5)
    asked: list[str] = []

    class Recording(FakeSearch):
        def search(self, index: str, body: dict, **_scroll) -> dict:
            asked.extend(body.get("query", {}).get("ids", {}).get("values", []))
            return super().search(index, body, **_scroll)

    search = Recording({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    monkeypatch.setattr(opensearch, "make_client", lambda *_a, **_k: search)
    report = compare_indices(Settings(), "checkout-guard", "bt-1", replayed=read)
    assert sorted(asked) == sorted(REPLAYED - {"t9"})
    assert (report.replayed, report.refused, report.undecided, report.compared) == (8, 5, 0, 6)
    assert not any("in neither index" in note for note in report.notes)
    assert "of 8 transactions replayed (and 5 records the job refuses)." in report_markdown(report)


def _published(version: str, block_at: int) -> tuple[bytes, str]:
    """A rules topic record of a valid rule set, and its text."""
    data = RuleSet.default().to_dict()
    data["version"], data["thresholds"]["block_at"] = version, block_at
    text = yaml.safe_dump(data, sort_keys=False)
    return update_record(RuleSet.from_yaml(text), text, "operator").encode(), text


def _rules_topic(*values: bytes | None):
    """A fake reader of the live rules topic holding ``values``, in order."""

    def read(settings: Settings, apply) -> dict:
        for value in values:
            apply(RULES.full_name(settings.kafka.topic_prefix), b"active", value)
        return {}

    return read


def test_a_model_only_backtest_runs_the_live_jobs_rule_set(tmp_path):
    """Without --rules the copy ran the operator's settings (default.yaml), not the live job's published one."""
    live = Settings(stack_dir=tmp_path)
    copy = candidate_settings(live, "bt-1", Candidate(model_version="gbm-x"))
    first, _ = _published("live-1", 80)
    second, text = _published("live-2", 70)
    bad = RuleSetUpdate(version="x", yaml="thresholds: 1", published_at=0, published_by="operator").encode()
    deep = RuleSetUpdate(version="y", yaml="[" * 5000 + "]" * 5000, published_at=0, published_by="x").encode()
    records = _rules_topic(first, second, bad, None, b"junk", deep)  # the job skips each of the last four
    picked = copy_rules(live, copy, Candidate(model_version="gbm-x"), records)
    assert (picked.source, picked.rules.version, picked.rules.block_at, picked.text) == ("live", "live-2", 70, text)


def test_without_a_live_rule_set_the_copy_runs_its_settings_rule_set_and_the_report_says_so(tmp_path):
    live = Settings(stack_dir=tmp_path, rules={"block_at": 77})
    copy = candidate_settings(live, "bt-1", Candidate(model_version="gbm-x"))
    picked = copy_rules(live, copy, Candidate(model_version="gbm-x"), _rules_topic())
    assert picked.source == "settings" and picked.text is None and picked.rules.block_at == 77
    report = compare(BASELINE, [dict(d, rules_version="r1") for d in CANDIDATE])
    report.meta = {"rules_file": None, "rules_version": picked.rules.version, "rules_from": "settings", "model": "m2"}
    [note] = version_notes(report)
    assert note.startswith(
        f"the live rules topic holds no rule set: the copy ran its settings' rule set {picked.rules.version}"
    )
    assert "(the copy's rule set from its settings (the live rules topic holds none))" in report_markdown(report)


def test_a_candidate_rule_set_file_is_run_without_reading_the_live_topic(tmp_path):
    _, text = _published("cand-1", 65)
    (rules_file := tmp_path / "cand.yaml").write_text(text)
    live = Settings(stack_dir=tmp_path)
    candidate = Candidate(rules_file=rules_file)

    def unread(*_args) -> dict:
        raise AssertionError("the live rules topic was read")

    picked = copy_rules(live, candidate_settings(live, "bt-1", candidate), candidate, unread)
    assert (picked.source, picked.rules.version, picked.text) == ("file", "cand-1", text)


def test_the_report_warns_when_the_side_the_candidate_leaves_alone_differs():
    """compare blamed the candidate model for the rule set's thresholds (r1 live, r2 in the copy)."""
    model_only = compare(BASELINE, CANDIDATE)
    model_only.meta = {"rules_file": None, "rules_from": "live", "model": "m2"}
    [note] = version_notes(model_only)
    assert note.startswith("the candidate changes the model only, but its decisions carry rule set r2 and the")
    rules_only = compare(BASELINE, CANDIDATE)
    rules_only.meta = {"rules_file": "cand.yaml", "rules_from": "file", "model": None, "model_dir": None}
    assert version_notes(rules_only) == [] and version_notes(compare(BASELINE, CANDIDATE)) == []
    rules_only.versions["candidate"]["model"] = ["m2"]
    assert version_notes(rules_only)[0].startswith("the candidate changes the rule set only, but its decisions")
    assert (
        "Versions: baseline rule set r1, model m1; candidate rule set r2, model m1 (the copy's rule set from the"
        in (report_markdown(model_only))
    )


def test_waiting_for_the_copy_says_the_brokers_error_for_a_topic_it_answers_with_one(tmp_path, monkeypatch):
    """A copy topic without a leader (or not authorised) was taken for one with nothing to read: the backtest went
    on to compare before the copy had decided anything."""
    from confluent_kafka import KafkaError

    from jobs.flink.backtest_stream import wait_until_done

    error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    copy = candidate_settings(Settings(stack_dir=tmp_path), "bt-1", Candidate(rules_file=tmp_path / "r.yaml"))
    topics = {
        name: SimpleNamespace(error=error, partitions={})
        for name in ("bt-1.transactions", "bt-1.processed_transactions")
    }
    fake_cluster(monkeypatch, topics)
    with pytest.raises(RuntimeError, match="cannot tell whether the job copy finished the range: topic bt-1"):
        wait_until_done(copy, [], timeout_s=5, quiet_s=0)


def test_a_copy_topic_that_does_not_exist_is_not_finished_and_the_wait_times_out_naming_it(tmp_path, monkeypatch):
    """A topic that does not exist has no partitions, so ``caught_up`` said "yes" (all of none read): the backtest
    compared at once, before the copy had decided anything."""
    from infra.clients import topic_replay
    from jobs.flink import backtest_stream
    from jobs.flink.backtest_stream import wait_until_done

    clock = SimpleNamespace(now=1000.0)
    clock.monotonic = lambda: clock.now
    clock.sleep = lambda s: setattr(clock, "now", clock.now + s)
    copy = candidate_settings(Settings(stack_dir=tmp_path), "bt-1", Candidate(rules_file=tmp_path / "r.yaml"))
    topics = {"bt-1.transactions": SimpleNamespace(error=None, partitions=partitions_led(1))}
    monkeypatch.setattr(backtest_stream, "time", clock)
    fake_cluster(monkeypatch, topics)  # the copy's transactions topic read to its end: 5 records, 5 committed
    assert not topic_replay.caught_up(Settings().kafka, "g", "bt-1.processed_transactions")
    child = SimpleNamespace(alive=True, log_path=tmp_path / "bt-1-job.log")
    with pytest.raises(TimeoutError) as raised:
        wait_until_done(copy, [child], timeout_s=30, quiet_s=0)
    assert str(raised.value).startswith(
        "the backtest did not finish in 30s; topic bt-1.processed_transactions does not exist (deleted during the run?)"
    )
    assert 1030 < clock.now < 1032, "it waited its time limit, no longer"


class _ErrorRecord:
    """What a consumer hands back for a partition the broker refuses to serve."""

    def __init__(self, code: int) -> None:
        self.code = code

    def error(self):
        from confluent_kafka import KafkaError

        return KafkaError(self.code)

    def partition(self) -> int:
        return 0

    def offset(self) -> None:
        return None


class _RefusedReads:
    """A consumer of the copy's transactions topic: every read answered with the broker's error."""

    def __init__(self, code: int) -> None:
        self.code = code

    def assign(self, _parts) -> None:
        pass

    def consume(self, _n: int, _timeout: float) -> list[_ErrorRecord]:
        return [_ErrorRecord(self.code)]

    def position(self, parts) -> list[SimpleNamespace]:
        return [SimpleNamespace(offset=0) for _ in parts]

    def get_watermark_offsets(self, *_a, **_k) -> tuple[int, int]:
        return 0, 5

    def unassign(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("listed", [True, False], ids=["listed-in-error", "refused-on-read"])
def test_a_copy_topic_the_broker_refuses_when_read_back_stops_run_and_compare_with_its_words(
    tmp_path, monkeypatch, capsys, listed: bool
):
    """Read back for the comparison, a copy topic the broker answers with an error (listed with it, or refusing the
    read itself) ended ``compare`` with a traceback and ``run`` with the client's error object: both now stop with
    the broker's words, exit 1 and no report."""
    from confluent_kafka import KafkaError

    from infra import launcher
    from infra.cli import main
    from infra.clients import topic_replay
    from jobs.flink import backtest_stream

    refused = KafkaError.TOPIC_AUTHORIZATION_FAILED
    copy_error = KafkaError(refused) if listed else None
    topics = {
        "transactions": SimpleNamespace(error=None, partitions=partitions_led(1)),
        "bt-1.transactions": SimpleNamespace(error=copy_error, partitions={} if listed else partitions_led(1)),
    }
    settings = Settings(stack_dir=tmp_path)
    monkeypatch.setattr(backtest_stream, "get_settings", lambda: settings)
    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: _RefusedReads(refused))
    monkeypatch.setattr(topic_replay, "assigned_consumer", lambda *_a, **_k: _RefusedReads(refused))
    monkeypatch.setattr(topic_replay.kafka_clients, "cluster_metadata", lambda *_a: SimpleNamespace(topics=topics))
    monkeypatch.setattr(topic_replay, "replay", lambda *_a, **_k: topic_replay.ReplayStats(acked=5, sent=5))
    monkeypatch.setattr(launcher, "start_scoring_job", lambda *_a, **_k: SimpleNamespace(stop=lambda: None))
    monkeypatch.setattr(launcher, "spawn", lambda *_a, **_k: SimpleNamespace(stop=lambda: None))
    for quiet in ("create_copy_topics", "publish_rule_set", "wait_until_done"):
        monkeypatch.setattr(backtest_stream, quiet, lambda *_a, **_k: None)
    monkeypatch.setattr(
        opensearch, "make_client", lambda *_a, **_k: FakeSearch({"checkout-guard": BASELINE, "bt-1": CANDIDATE})
    )
    (rules_file := tmp_path / "cand.yaml").write_text(_published("cand-1", 65)[1])
    for args in (["run", "--rules", str(rules_file), "--name", "bt-1"], ["compare", "checkout-guard", "bt-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(["backtest-stream", *args])  # the console, as python -m runs it too (infra.cli.run_tool)
        err = " ".join(capsys.readouterr().err.split())
        assert exit_.value.code == 1, err
        assert "topic bt-1.transactions" in err and "the broker answered Broker: Topic authorization failed" in err
        assert "Traceback" not in err and "KafkaError{" not in err
    assert not (tmp_path / "backtests" / "bt-1" / "report.json").exists()
