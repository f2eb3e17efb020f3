"""The versioned YAML rule set: loading, round trip, validation, decisions and rules-topic updates."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from infra.settings import RulesSettings
from jobs.scoring.rules import (
    DEFAULT_RULESET,
    FaceResult,
    ModelResult,
    RuleSet,
    RuleSetError,
    decide,
    from_update,
    update_record,
)
from jobs.scoring.rules import app as rules_cli
from schemas.records import RuleSetUpdate
from tests.builders import return_of, sale


def _default_dict() -> dict:
    return yaml.safe_load(DEFAULT_RULESET.read_text())


def test_default_rule_set_is_seed_001s_scheme():
    rules = RuleSet.default()
    assert (rules.block_at, rules.review_at) == (85, 50)
    for name in (
        "no_photo_verification",
        "customer_mismatch",
        "suspicious_timing",
        "high_value_item",
        "return_without_receipt",
    ):
        assert rules.weights[name] > 0
    assert rules.model_bands[0][0] > rules.model_bands[-1][0]
    assert rules.version and rules.version != "builtin-v1"


def test_rule_set_round_trips_through_yaml():
    rules = RuleSet.default()
    assert RuleSet.from_yaml(rules.to_yaml()) == rules


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.pop("version"), "version: required"),
        (lambda d: d["thresholds"].update(block_at=150), "thresholds.block_at"),
        (lambda d: d["thresholds"].update(review_at=90), "review_at (90) must be below block_at (85)"),
        (lambda d: d["weights"].update(customer_missmatch=40), "weights.customer_missmatch: unknown indicator"),
        (lambda d: d["weights"].update(high_value_item="a lot"), "weights.high_value_item"),
        (lambda d: d["model_bands"].append({"score": 1200, "points": 5}), "model_bands[4].score"),
        (lambda d: d["model_bands"].append({"score": 300, "points": 70}), "higher score must not give fewer points"),
        (lambda d: d["face"].update(unavailable_statuses=["ASLEEP"]), "face.unavailable_statuses"),
        (lambda d: d.update(weigths={}), "unknown key(s): weigths"),
    ],
)
def test_invalid_rule_sets_are_refused_with_the_offending_key(change, message):
    data = _default_dict()
    change(data)
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_yaml(yaml.safe_dump(data))
    assert message in str(err.value)


@pytest.mark.parametrize("bands", [False, 0, {}, "", {"score": 900, "points": 50}])
def test_model_bands_that_are_not_a_list_are_refused_not_read_as_no_bands(bands):
    """``false``, ``0`` and ``{}`` were read as no bands: a typo turned the model score's points off unseen."""
    data = _default_dict()
    data["model_bands"] = bands
    with pytest.raises(RuleSetError, match=r"model_bands: must be a list of \{score, points\}, \[\] for none"):
        RuleSet.from_yaml(yaml.safe_dump(data))
    if not bands:  # a rule set published before this check stands: the job keeps what it ran
        assert RuleSet.from_yaml(yaml.safe_dump(data), published=True).model_bands == ()


@pytest.mark.parametrize("bands", [[], None])
def test_an_empty_list_or_no_model_bands_means_none(bands):
    data = _default_dict()
    data["model_bands"] = bands
    assert RuleSet.from_yaml(yaml.safe_dump(data)).model_bands == ()


def test_a_rule_set_under_which_nothing_can_reach_review_is_refused_on_file_and_publish_but_kept_when_read_back():
    data = _default_dict()
    data["weights"], data["model_bands"] = {}, []
    data["face"]["watchlist_suspect_points"] = 0
    text = yaml.safe_dump(data)
    with pytest.raises(RuleSetError, match=r"no transaction can reach thresholds.review_at \(50\).* give 0"):
        RuleSet.from_yaml(text)
    assert RuleSet.from_yaml(text, published=True).weights == {}  # published before this check: the job keeps it
    data["model_bands"] = [{"score": 900, "points": 50}]  # the model alone can send a transaction to review
    assert RuleSet.from_yaml(yaml.safe_dump(data)).review_at == 50


def test_malformed_yaml_is_refused_clearly():
    with pytest.raises(RuleSetError, match="not valid YAML"):
        RuleSet.from_yaml("version: [unclosed")
    with pytest.raises(RuleSetError, match="must be a mapping"):
        RuleSet.from_yaml("- just\n- a list\n")


def test_every_shipped_rule_set_loads():
    shipped = sorted(DEFAULT_RULESET.parent.glob("*.yaml"))
    assert DEFAULT_RULESET in shipped
    for path in shipped:
        assert RuleSet.load(path).version


def _line(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t + "weights:\n  velocity_exceeded: 80\n",
            lambda t: f"weights is given twice (lines {_line(t, 'weights:')} and {len(t.splitlines()) + 1})",
        ),
        (
            lambda t: t.replace("  velocity_exceeded: 40\n", "  velocity_exceeded: 40\n  velocity_exceeded: 4\n"),
            lambda t: (
                "weights.velocity_exceeded is given twice "
                f"(lines {_line(t, '  velocity_exceeded: 40')} and {_line(t, '  velocity_exceeded: 40') + 1})"
            ),
        ),
        (
            lambda t: t.replace("{score: 950, points: 60}", "{score: 950, points: 60, points: 6}"),
            lambda t: f"model_bands[0].points is given twice (line {_line(t, '  - {score: 950, points: 60}')})",
        ),
    ],
    ids=["a second weights block", "a weight twice", "a key twice in a band"],
)
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(edit, message):
    """YAML keeps the last copy: a second ``weights:`` block replaced every weight, and validate said nothing."""
    text = DEFAULT_RULESET.read_text()
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_yaml(edit(text))
    assert message(text) in str(err.value)


@pytest.mark.parametrize(
    "written,read",
    [("1.10", "the number 1.1"), ("1.20", "the number 1.2"), ("3", "the number 3"), ("2026-12-06", "the date")],
)
def test_a_version_yaml_reads_as_a_number_or_a_date_is_refused_with_a_hint_to_quote_it(written, read):
    """``1.10`` was stamped ``1.1``, as was ``1.1`` (two rule sets, one version); a date was "required"."""
    text = re.sub(r"^version: .*$", f"version: {written}", DEFAULT_RULESET.read_text(), count=1, flags=re.M)
    with pytest.raises(RuleSetError, match=f"version: YAML reads it as {read}.*put the version in quotes"):
        RuleSet.from_yaml(text)
    quoted = text.replace(f"version: {written}", f'version: "{written}"')
    assert RuleSet.from_yaml(quoted).version == written


def test_a_version_that_is_not_one_short_line_is_refused_in_a_file_and_from_the_environment(tmp_path):
    """It is stamped on every decision and indexed as a keyword: 40 000 characters made OpenSearch refuse every
    scored transaction, and a line break split every log line naming it."""
    for version, what in (("v" * 40_000, "got 40000 characters"), ("2026.12.06-1\x1b[2J", "control character")):
        default = DEFAULT_RULESET.read_text()
        text = default.replace(re.search(r"^version: .*$", default, flags=re.M)[0], f"version: {json.dumps(version)}")
        with pytest.raises(RuleSetError, match=f"version: at most 128 printable characters.*{re.escape(what)}"):
            RuleSet.from_yaml(text)
        with pytest.raises(RuleSetError, match="CG_RULES__VERSION: at most 128"):
            RuleSet.from_settings(RulesSettings(version=version))
        assert RuleSet.from_yaml(text, published=True).version == version, "what the topic holds stands"
    long = "2026.12.06-1 store trial " + "x" * 103
    text = re.sub(r"^version: .*$", f'version: "{long}"', DEFAULT_RULESET.read_text(), count=1, flags=re.M)
    assert RuleSet.from_yaml(text).version == long
    (tmp_path / "long.yaml").write_text(text)
    tuned = RuleSet.from_settings(RulesSettings(ruleset_file=tmp_path / "long.yaml", block_at=90, review_at=40))
    assert tuned.version == f"{long}+block_at=90+review_at=40", "the stamp's suffix is not the file's version"


def test_a_rule_set_published_before_the_stricter_checks_still_runs_after_a_restart():
    """The rules topic keeps what an older publish accepted (``version: 7``, a key twice): a restarted job that
    refused it would silently run its file's thresholds again."""
    text = re.sub(r"^version: .*$", "version: 7", DEFAULT_RULESET.read_text(), count=1, flags=re.M)
    text = text.replace("  block_at: 85", "  block_at: 80\n  block_at: 70")
    with pytest.raises(RuleSetError):
        RuleSet.from_yaml(text)  # publish and validate refuse it now
    update = RuleSetUpdate(version="7", yaml=text, published_at=0, published_by="ops")
    restored = from_update(update.encode())
    assert (restored.version, restored.block_at) == ("7", 70)
    yes = text.replace("version: 7", "version: yes")  # YAML 1.1's true, stamped "True" then
    assert from_update(RuleSetUpdate(version="True", yaml=yes, published_at=0, published_by="ops").encode())


def test_explicit_settings_override_the_file_and_defaults_do_not():
    assert RuleSet.from_settings(RulesSettings()) == RuleSet.default()
    tuned = RuleSet.from_settings(RulesSettings(block_at=90, version="store-trial"))
    assert (tuned.block_at, tuned.version, tuned.weights) == (90, "store-trial", RuleSet.default().weights)


def test_a_threshold_from_the_environment_gives_the_rule_set_a_version_of_its_own():
    """The file's version was stamped on decisions made with other thresholds: two rule sets, one version."""
    default = RuleSet.default()
    tuned = RuleSet.from_settings(RulesSettings(block_at=70, review_at=20))
    assert (tuned.block_at, tuned.review_at, tuned.weights) == (70, 20, default.weights)
    assert tuned.version == f"{default.version}+block_at=70+review_at=20"
    assert RuleSet.from_settings(RulesSettings(review_at=40)).version == f"{default.version}+review_at=40"
    assert RuleSet.from_settings(RulesSettings(block_at=default.block_at)) == default, "the file's own value"
    assert from_update(update_record(tuned, tuned.to_yaml(), "tester").encode()) == tuned


def test_a_threshold_from_the_environment_that_is_refused_is_named_by_its_variable():
    """It was reported as the YAML's ``thresholds.block_at``, which the file does not say."""
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_settings(RulesSettings(block_at=55))
    assert "CG_RULES__BLOCK_AT (55): face evidence alone would block" in str(err.value)
    assert "thresholds.block_at" not in str(err.value)
    with pytest.raises(RuleSetError, match=r"CG_RULES__REVIEW_AT \(90\) must be below block_at \(85\)"):
        RuleSet.from_settings(RulesSettings(review_at=90))
    # Out of range, the settings refuse it at start; the rule set still checks a copy that skipped them.
    with pytest.raises(RuleSetError, match=r"CG_RULES__BLOCK_AT: required, an integer 1..100 \(got 150\)"):
        RuleSet.from_settings(RulesSettings.model_construct(block_at=150))


def test_weights_bands_and_face_rules_come_from_the_rule_set():
    rules = RuleSet.default()
    tx = sale("t1").to_avro()
    assert decide(tx, {}, ModelResult(score=960), FaceResult(), rules).reasons == ("model_score>=950",)
    assert decide(tx, {}, ModelResult(score=599), FaceResult(), rules).reasons == ()
    suspect = FaceResult(status="MATCHED", category="SUSPECT", subject_id="s1", similarity=99.0)
    assert decide(tx, {}, ModelResult(), suspect, rules).outcome == "REVIEW"
    assert decide(tx, {}, ModelResult(score=960), suspect, rules).outcome == "BLOCK"
    ret = return_of("r1", None).to_avro()
    assert "no_photo_verification" in decide(ret, {}, ModelResult(), FaceResult(status="NO_FACE"), rules).reasons
    assert "no_photo_verification" not in decide(ret, {}, ModelResult(), FaceResult(status="UNKNOWN"), rules).reasons
    strict = RuleSet.from_dict({**rules.to_dict(), "weights": {**rules.weights, "return_without_receipt": 90}})
    assert decide(ret, {"return_without_receipt": 1.0}, ModelResult(), FaceResult(), strict).outcome == "BLOCK"


def test_a_rule_set_where_a_face_match_alone_would_block_is_refused_unless_explicitly_allowed():
    data = RuleSet.default().to_dict()
    data["face"] = {**data["face"], "watchlist_suspect_points": 90}
    with pytest.raises(RuleSetError, match="face evidence alone would block"):
        RuleSet.from_dict(data)
    data["face"]["match_alone_may_block"] = True
    allowed = RuleSet.from_dict(data)
    suspect = FaceResult(status="MATCHED", category="SUSPECT", subject_id="s1", similarity=99.0)
    assert decide(sale("t1").to_avro(), {}, ModelResult(), suspect, allowed).outcome == "BLOCK"


@pytest.mark.parametrize("status", ["MATCHED", "NO_MATCH", "UNKNOWN", "REJECTED"])
def test_only_statuses_without_a_usable_face_count_as_no_photo(status):
    """With MATCHED listed, a suspect's match on a return also raised no_photo_verification: 65 + 20 blocked on the
    face alone (match_alone_may_block false) with a false reason. UNKNOWN and REJECTED no face stage gives."""
    data = RuleSet.default().to_dict()
    data["face"] = {**data["face"], "watchlist_suspect_points": 65}
    data["face"]["unavailable_statuses"] = ["UNAVAILABLE", "NO_FACE", status]
    with pytest.raises(RuleSetError, match=r"face.unavailable_statuses: a list of NO_FACE, UNAVAILABLE"):
        RuleSet.from_dict(data)
    rules = RuleSet.from_dict({**data, "face": {**data["face"], "unavailable_statuses": ["UNAVAILABLE", "NO_FACE"]}})
    suspect = FaceResult(status="MATCHED", category="SUSPECT", subject_id="s1", similarity=99.0)
    decision = decide(return_of("r1", "t1").to_avro(), {}, ModelResult(), suspect, rules)
    assert (decision.outcome, decision.reasons) == ("REVIEW", ("watchlist_suspect",))


def test_a_published_rule_set_listing_a_status_no_face_stage_gives_still_loads_without_it():
    data = RuleSet.default().to_dict()
    data["face"]["unavailable_statuses"] = ["UNAVAILABLE", "NO_FACE", "UNKNOWN", "REJECTED"]
    rules = RuleSet.from_yaml(yaml.safe_dump(data), published=True)
    assert rules.unavailable_statuses == {"UNAVAILABLE", "NO_FACE"}
    data["face"]["unavailable_statuses"] = ["UNAVAILABLE", "MATCHED"]
    with pytest.raises(RuleSetError, match="face.unavailable_statuses"):
        RuleSet.from_yaml(yaml.safe_dump(data), published=True)


@pytest.mark.parametrize("published", [False, True])
def test_a_rule_set_where_a_camera_outage_alone_would_block_every_return_is_refused_even_with_the_opt_in(published):
    """``no_photo_verification`` at or above block_at blocked every return while a lane camera was down, with no
    other evidence; unlike a face match, no opt-in allows it."""
    data = RuleSet.default().to_dict()
    data["weights"]["no_photo_verification"] = 85
    data["face"]["match_alone_may_block"] = True
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_yaml(yaml.safe_dump(data), published=published)
    assert "weights.no_photo_verification (85) >= thresholds.block_at (85): a camera outage alone" in str(err.value)
    with pytest.raises(RuleSetError, match=r"CG_RULES__BLOCK_AT \(20\): a camera outage alone"):
        RuleSet.from_settings(RulesSettings(block_at=20, review_at=10))
    data["weights"]["no_photo_verification"] = 84
    rules = RuleSet.from_yaml(yaml.safe_dump(data), published=published)
    decision = decide(return_of("r1", None).to_avro(), {}, ModelResult(), FaceResult(status="UNAVAILABLE"), rules)
    assert (decision.outcome, decision.reasons) == ("REVIEW", ("no_photo_verification",))
    data["face"]["unavailable_statuses"] = []  # no status raises it: its weight blocks nothing
    data["weights"]["no_photo_verification"] = 90
    assert RuleSet.from_yaml(yaml.safe_dump(data), published=published).weights["no_photo_verification"] == 90


@pytest.mark.parametrize("published", [False, True])
@pytest.mark.parametrize(
    "indicator,message",
    [
        ("no_such_indicator", "face.unavailable_return_indicator: unknown indicator 'no_such_indicator'"),
        ("velocity_exceeded", "face.unavailable_return_indicator: velocity_exceeded does not say a return had no"),
        ("return_unknown_receipt", "return_unknown_receipt does not say a return had no usable face"),
        ("buyer_face_mismatch", "buyer_face_mismatch does not say a return had no usable face"),
    ],
)
def test_a_no_photo_indicator_that_is_unknown_or_says_something_else_is_refused(indicator, message, published):
    """Any known indicator was taken: a camera outage on a return then raised ``velocity_exceeded`` (a false reason),
    or ``buyer_face_mismatch`` (face evidence of a returner who is not the buyer) with no face seen at all."""
    data = RuleSet.default().to_dict()
    data["face"]["unavailable_return_indicator"] = indicator
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_yaml(yaml.safe_dump(data), published=published)
    assert message in str(err.value) and "allowed: no_photo_verification, or null for none" in str(err.value)
    data["face"]["unavailable_return_indicator"] = None  # none: a return without a face raises nothing
    off = RuleSet.from_yaml(yaml.safe_dump(data), published=published)
    assert decide(return_of("r1", None).to_avro(), {}, ModelResult(), FaceResult(status="NO_FACE"), off).reasons == ()


def test_a_suspect_match_and_a_returner_who_is_not_the_buyer_are_one_piece_of_face_evidence():
    """Both come from the same lane snapshot: summed (60 + 40) a snapshot of the wrong person blocked a return
    by itself, whatever the card said."""
    rules = RuleSet.default()
    suspect = FaceResult(status="MATCHED", category="SUSPECT", subject_id="s1", similarity=99.0)
    ret = return_of("r1", "t1").to_avro()
    face_only = decide(ret, {"buyer_face_mismatch": 1.0}, ModelResult(), suspect, rules)
    assert (face_only.outcome, face_only.risk_score) == ("REVIEW", 60)
    assert face_only.reasons == ("watchlist_suspect", "buyer_face_mismatch"), "both are named"
    with_card = decide(ret, {"buyer_face_mismatch": 1.0, "customer_mismatch": 1.0}, ModelResult(), suspect, rules)
    assert (with_card.outcome, with_card.risk_score) == ("BLOCK", 100), "another card is evidence of its own"
    data = rules.to_dict()
    data["weights"] = {**data["weights"], "buyer_face_mismatch": 85}
    with pytest.raises(RuleSetError, match=r"weights.buyer_face_mismatch \(85\) >= thresholds.block_at"):
        RuleSet.from_dict(data)


def test_a_rule_set_from_before_the_face_mismatch_had_its_name_weighs_it_as_customer_mismatch():
    """A published older rule set (no buyer_face_mismatch weight) scored a returner who is not the buyer 0."""
    data = RuleSet.default().to_dict()
    del data["weights"]["buyer_face_mismatch"]
    data["weights"]["customer_mismatch"] = 35
    older = RuleSet.from_dict(data)
    seen = FaceResult(status="NO_MATCH")
    decision = decide(return_of("r1", "t1").to_avro(), {"buyer_face_mismatch": 1.0}, ModelResult(), seen, older)
    assert decision.reasons == ("buyer_face_mismatch",) and decision.risk_score == 35


def test_a_card_mismatch_that_blocks_alone_is_refused_naming_the_face_weight_it_lends_and_how_to_fix_it():
    """A manager's ``customer_mismatch: 90`` without buyer_face_mismatch was refused over a key the file does not
    have; giving the face's mismatch its own weight is the way out."""
    data = RuleSet.default().to_dict()
    del data["weights"]["buyer_face_mismatch"]
    data["weights"]["customer_mismatch"] = 90
    with pytest.raises(RuleSetError, match="not in the file: it takes customer_mismatch's weight; give"):
        RuleSet.from_dict(data)
    data["weights"]["buyer_face_mismatch"] = 40
    strict = RuleSet.from_dict(data)
    ret = return_of("r1", "t1").to_avro()
    assert decide(ret, {"customer_mismatch": 1.0}, ModelResult(), FaceResult(), strict).outcome == "BLOCK"
    face_only = decide(ret, {"buyer_face_mismatch": 1.0}, ModelResult(), FaceResult(status="NO_MATCH"), strict)
    assert (face_only.outcome, face_only.risk_score) == ("APPROVE", 40)


def test_rules_topic_update_carries_the_validated_yaml():
    text = DEFAULT_RULESET.read_text()
    record = update_record(RuleSet.from_yaml(text), text, "analyst@example.com", published_at=123)
    data = record.encode()
    assert RuleSetUpdate.decode(data) == record
    assert from_update(data) == RuleSet.default()
    forged = RuleSetUpdate(version="other", yaml=text, published_at=1, published_by="x").encode()
    with pytest.raises(RuleSetError, match="version"):
        from_update(forged)


def _console(capsys, *args: str) -> tuple[int, str, str]:
    """``checkout-guard rules ...`` as the console (and ``python -m``, via ``run_tool``) runs it."""
    from infra.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["rules", *args])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


@pytest.mark.parametrize("command", ["validate", "publish"])
def test_an_invalid_rule_set_file_is_one_error_line_and_exit_1_before_touching_kafka(tmp_path, capsys, command):
    """Both exited 2, the code of a wrong command line; the README says a bad file exits 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_RULESET.read_text().replace("block_at: 85", "block_at: 20"))
    code, out, err = _console(capsys, command, str(bad))
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"Error: {bad}: invalid rule set: ") and "review_at (50) must be below block_at (20)" in err


def test_publishing_a_file_that_does_not_exist_is_a_usage_error(tmp_path) -> None:
    res = CliRunner().invoke(rules_cli, ["publish", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_publishing_to_a_cluster_without_the_rules_topic_names_it_and_sends_nothing(monkeypatch) -> None:
    """An operator's tool creates no topics: it said 'Unknown topic or partition' once the send failed."""
    from types import SimpleNamespace

    from infra.clients import kafka as kafka_clients
    from infra.settings import KafkaSettings, Settings
    from jobs.scoring.rules import DEFAULT_RULESET, RuleSet, publish_rules

    sent: list[str] = []
    fake = SimpleNamespace(
        list_topics=lambda topic=None, timeout=-1: SimpleNamespace(topics={}),
        poll=lambda timeout=0: 0,
        produce=lambda topic, **kwargs: sent.append(topic),
    )
    monkeypatch.setattr(kafka_clients, "producer", lambda *a, **k: fake)
    text = DEFAULT_RULESET.read_text()
    settings = Settings(kafka=KafkaSettings(topic_prefix="unit."))
    with pytest.raises(kafka_clients.TopicMissing, match="no topic unit.rules on Kafka at .*created by an admin"):
        publish_rules(settings, RuleSet.from_yaml(text), text, "tester")
    assert sent == []


def test_publishing_without_by_as_a_user_the_system_cannot_name_records_the_user_id(
    tmp_path, monkeypatch, user_without_name
) -> None:
    """``getpass.getuser()`` raised (no passwd entry, no USER): the command died with a traceback."""
    from jobs.scoring import rules

    published: list[str] = []
    monkeypatch.setattr(rules, "publish_rules", lambda settings, ruleset, text, by: published.append(by) or "rules")
    res = CliRunner().invoke(rules_cli, ["publish", str(DEFAULT_RULESET)])
    assert res.exit_code == 0, res.output
    assert published == [user_without_name]


def _alias_bomb(levels: int) -> str:
    """YAML aliases nine times over per level: 9**levels items once expanded, a few hundred bytes as text."""
    lines = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(lines) + "]"


@pytest.mark.parametrize("published", [False, True])
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda text: text + "face_extra: " + "[" * 5000 + "]" * 5000 + "\n", "YAML nested too deeply"),
        (lambda text: text.replace("high_value_item: 15", f"high_value_item: {_alias_bomb(6)}"), "high_value_item"),
        (lambda text: text.replace("[UNAVAILABLE, NO_FACE]", "[[UNAVAILABLE]]"), "face.unavailable_statuses"),
        (lambda text: text.replace("indicator: no_photo_verification", "indicator: [x]"), "unknown indicator"),
    ],
)
def test_a_hostile_or_malformed_rule_set_is_one_short_error(change, message, published):
    """Deep nesting raised RecursionError, a list where a name belongs TypeError (tracebacks, not an Error line), and
    an aliased value was expanded into its message: 9**9 items took minutes and gigabytes. The rules topic is read
    back the same way at every start."""
    with pytest.raises(RuleSetError) as err:
        RuleSet.from_yaml(change(DEFAULT_RULESET.read_text()), published=published)
    assert message in str(err.value) and len(str(err.value)) < 2000


def test_a_description_that_is_not_text_is_refused_in_a_file_and_shown_short_when_published():
    """``str()`` of an aliased list expanded it in a rule set otherwise valid."""
    text = re.sub(
        r"^description: >\n(  .*\n)+", f"description: {_alias_bomb(6)}\n", DEFAULT_RULESET.read_text(), flags=re.M
    )
    with pytest.raises(RuleSetError, match="description: text"):
        RuleSet.from_yaml(text)
    assert len(RuleSet.from_yaml(text, published=True).description) < 2000


def test_a_rule_set_file_over_the_size_limit_is_refused_without_reading_it_all(tmp_path, capsys):
    """A 10 MB file (a long comment) took seconds to accept and could never be published; 5 MB of bands a minute."""
    from jobs.scoring.rules import MAX_RULESET_BYTES

    big = tmp_path / "big.yaml"
    big.write_text(DEFAULT_RULESET.read_text() + "# " + "x" * MAX_RULESET_BYTES + "\n")
    code, out, err = _console(capsys, "validate", str(big))
    assert code == 1 and out == "" and err == f"Error: rule set {big} is larger than 256 KiB\n"
    with pytest.raises(RuleSetError, match="at most 256 KiB"):
        RuleSet.from_yaml(big.read_text())


@pytest.mark.parametrize(
    "rules, named",
    [
        (RulesSettings(block_at=55), "CG_RULES__BLOCK_AT (55): face evidence alone would block"),
        (RulesSettings(ruleset_file=DEFAULT_RULESET.with_name("missing.yaml")), "cannot read rule set"),
    ],
)
def test_the_job_refuses_to_start_with_a_rule_set_its_workers_would_refuse(tmp_path, monkeypatch, caplog, rules, named):
    """Each worker builds the settings' rule set when its step opens: refused there, the step failed and Flink's
    restart strategy started it again without end, deciding nothing, the reason only in the workers' log."""
    from infra.settings import JobSettings, ModelSettings, Settings
    from jobs.flink import job

    monkeypatch.setattr(job, "setup_logging", lambda *a: None)
    monkeypatch.setattr(job, "_without_worker_pool_server", lambda: None)
    monkeypatch.setattr(job, "submitted_to_cluster", lambda: False)
    monkeypatch.setattr(job, "beside_cluster_job", lambda *a: None)

    def built(*_args: object) -> None:
        raise AssertionError("the job must not be built")

    monkeypatch.setattr(job, "start_point", built)
    settings = Settings(
        stack_dir=tmp_path / "stack",
        job=JobSettings(checkpoint_dir=tmp_path / "checkpoints"),
        model=ModelSettings(backend="none"),
        rules=rules,
    )
    with pytest.raises(SystemExit) as refused, caplog.at_level("ERROR"):
        job.main(settings)
    assert refused.value.code == 2
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("refusing to start: ") and named in line
