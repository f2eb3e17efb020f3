"""The dashboard's cases: the queue and figures as pure functions, and the endpoints over a canned index --
a verdict from the case page is the same signed command the case service accepts from the Webex bot, given
only by a logged-in person on the allow-list."""

from __future__ import annotations

import base64
import io
import json
import logging
from typing import Any

import anyio
import pytest
from opensearchpy.exceptions import TransportError
from PIL import Image
from pydantic import SecretStr
from starlette.testclient import TestClient

from infra.command_auth import authenticate_command
from infra.logs import person_tag
from infra.settings import AlertSettings, DashboardSettings, Settings, WebexSettings
from jobs.cases import core
from jobs.cases.core import parse_case_command
from jobs.cases.service import CaseCore, Source
from schemas.errors import InvalidRecord
from schemas.records import MAX_CASE_TEXT, Alert, BotCommand, case_id_for
from sinks.dashboard.app import Dashboard, create_app
from sinks.dashboard.case_routes import MAX_BODY_BYTES
from sinks.dashboard.cases import (
    CaseFilter,
    case_figures,
    case_queue_query,
    percentile,
    public_case,
    shape_queue,
    verdict_command,
)

NOW = 1_800_000_000_000
RID = "0123456789abcdef0123456789abcdef"  # a submission's id, as the case page makes one
MIN = 60_000
CASE = {
    "case_id": "case-0123456789ab",
    "version": 1,
    "state": "open",
    "kind": "WATCHLIST_MATCH",
    "store_id": "S01",
    "alert_id": "watchlist:tx-1",
    "summary": "Possible watch-list match at S01 lane 2",
    "opened_at": NOW - 5 * MIN,
    "updated_at": NOW - 5 * MIN,
    "expires_at": NOW + 24 * 60 * MIN,
    "updated_by": "case-service",
    "notes": [],
    "transaction_id": "tx-1",
    "subject_id": "subj-1",
    "category": "SUSPECT",
    "similarity": 71.5,
    "snapshot_ref": "checkout/tx-1.jpg",
    "reference_image_ref": "watchlist/subj-1.jpg",
}


# ------------------------------------------------------------------ pure


def test_the_queue_query_filters_by_store_state_and_kind_newest_first() -> None:
    body = case_queue_query(CaseFilter(store="S01", state="open", kind=None))
    assert body["query"]["bool"]["filter"] == [{"term": {"store_id": "S01"}}, {"term": {"state": "open"}}]
    assert body["sort"][0] == {"opened_at": "desc"}
    assert "snapshot_ref" not in body["_source"] and "reference_image_ref" not in body["_source"]


def test_a_case_shows_image_urls_never_image_refs() -> None:
    case = public_case(CASE, AlertSettings())
    assert case["images"] == {
        "live": "/cases/case-0123456789ab/images/live",
        "reference": "/cases/case-0123456789ab/images/reference",
    }
    assert "snapshot_ref" not in case and "reference_image_ref" not in case
    assert public_case({**CASE, "reference_image_ref": None}, AlertSettings())["images"] == {
        "live": "/cases/case-0123456789ab/images/live"
    }


def test_the_queue_answer_carries_cases_total_and_filter_counts() -> None:
    answer = {
        "hits": {"total": {"value": 7}, "hits": [{"_source": CASE}]},
        "aggregations": {
            "states": {"buckets": [{"key": "open", "doc_count": 5}, {"key": "dismissed", "doc_count": 2}]}
        },
    }
    shaped = shape_queue(answer, AlertSettings())
    assert shaped["total"] == 7 and shaped["states"] == {"open": 5, "dismissed": 2}
    assert [c["case_id"] for c in shaped["cases"]] == ["case-0123456789ab"] and shaped["kinds"] == {}


def test_nearest_rank_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([30.0], 95) == 30.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 95) == 95.0


def test_figures_count_open_cases_by_age_time_to_verdict_and_shares() -> None:
    cases = [
        {"state": "open", "opened_at": NOW - 5 * MIN},
        {"state": "escalated", "opened_at": NOW - 30 * MIN},
        {"state": "open", "opened_at": NOW - 30 * 60 * MIN},
        {
            "state": "confirmed",
            "kind": "WATCHLIST_MATCH",
            "store_id": "S01",
            "opened_at": NOW - 60 * MIN,
            "decided_at": NOW - 58 * MIN,
        },
        {
            "state": "dismissed",
            "kind": "WATCHLIST_MATCH",
            "store_id": "S01",
            "opened_at": NOW - 60 * MIN,
            "decided_at": NOW - 50 * MIN,
        },
        {
            "state": "dismissed",
            "kind": "WATCHLIST_MATCH",
            "store_id": "S02",
            "opened_at": NOW - 60 * MIN,
            "decided_at": NOW - 40 * MIN,
        },
        {"state": "expired", "kind": "BLOCKED_TRANSACTION", "store_id": "S02", "opened_at": NOW - 3000 * MIN},
    ]
    figures = case_figures(cases, NOW)
    assert figures["open"] == 3
    assert {r["age"]: r["cases"] for r in figures["open_by_age"]} == {
        "< 15 min": 1,
        "15-60 min": 1,
        "1-4 h": 0,
        "4-24 h": 0,
        "> 24 h": 1,
    }
    assert figures["time_to_verdict_s"] == {"p50": 600.0, "p95": 1200.0, "decided": 3}
    kinds = {r["key"]: r for r in figures["by_kind"]}
    assert kinds["WATCHLIST_MATCH"]["confirmed_share"] == pytest.approx(1 / 3)
    assert kinds["BLOCKED_TRANSACTION"] == {
        "key": "BLOCKED_TRANSACTION",
        "confirmed": 0,
        "dismissed": 0,
        "expired": 1,
        "confirmed_share": None,
    }
    assert {r["key"]: r["confirmed_share"] for r in figures["by_store"]} == {"S01": 0.5, "S02": 0.0}


@pytest.mark.parametrize(
    ("verb", "text", "fraud", "argument"),
    [
        ("confirm", "", False, "case-0123456789ab"),
        ("confirm", "", True, "case-0123456789ab fraud"),
        ("dismiss", " not the same person ", False, "case-0123456789ab not the same person"),
        ("escalate", "ignored", False, "case-0123456789ab"),
        ("assign", "guard@example.com", False, "case-0123456789ab guard@example.com"),
        ("note", "spoke to the cashier", False, "case-0123456789ab spoke to the cashier"),
    ],
)
def test_a_verdict_becomes_the_command_the_bot_would_publish(verb: str, text: str, fraud: bool, argument: str) -> None:
    cmd = verdict_command("case-0123456789ab", verb, "guard@example.com", NOW, text=text, fraud=fraud, request_id=RID)
    assert (cmd.verb, cmd.argument, cmd.actor, cmd.source) == (verb.upper(), argument, "guard@example.com", "dashboard")
    parsed = parse_case_command(cmd.verb, cmd.argument)  # the case service's own parser accepts it
    assert parsed.case_id == "case-0123456789ab"


@pytest.mark.parametrize("verb", ["dismiss", "note"])
def test_a_reason_or_note_written_on_several_lines_keeps_its_line_breaks(verb: str) -> None:
    """They were joined into one line before the command was sent, though the case keeps line breaks."""
    text = "left by the side door\n\tthe cashier saw him\r\nsecond visit"
    cmd = verdict_command("case-0123456789ab", verb, "guard@example.com", NOW, text=f"  {text}\n", request_id=RID)
    assert cmd.argument == f"case-0123456789ab {text}"
    assert parse_case_command(cmd.verb, cmd.argument).text == text


@pytest.mark.parametrize(
    ("verb", "text"),
    [("forget", ""), ("assign", ""), ("assign", "two people"), ("note", ""), ("note", "x" * (MAX_CASE_TEXT + 1))],
)
def test_a_verdict_the_service_could_not_apply_is_refused(verb: str, text: str) -> None:
    with pytest.raises(InvalidRecord):
        verdict_command("case-0123456789ab", verb, "guard@example.com", NOW, text=text, request_id=RID)


def test_a_note_of_control_characters_alone_is_refused_at_once() -> None:
    """Published, it was refused by the case service ("needs some text"), and the page waited 30 s for nothing."""
    with pytest.raises(InvalidRecord, match="needs text"):
        verdict_command("case-0123456789ab", "note", "guard@example.com", NOW, text="\x1b\x00\u202e", request_id=RID)


@pytest.mark.parametrize("verb", ["dismiss", "note"])
def test_the_page_takes_as_long_a_reason_or_note_as_the_case_service_keeps(verb: str) -> None:
    """The page refused a note over 500 characters while the case service keeps 1000: one limit now."""
    text = "n" * core.MAX_TEXT
    cmd = verdict_command("case-0123456789ab", verb, "guard@example.com", NOW, text=text, request_id=RID)
    assert parse_case_command(cmd.verb, cmd.argument).text == text
    with pytest.raises(InvalidRecord, match=f"over {core.MAX_TEXT} characters"):
        verdict_command("case-0123456789ab", verb, "guard@example.com", NOW, text=text + "n", request_id=RID)


# ------------------------------------------------------------------ endpoints


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


class CaseIndex:
    """One case in the cases index; nothing anywhere else."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.case: dict[str, Any] = CASE

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        self.bodies.append((index, body))
        if not index.endswith("-cases"):
            return {"hits": {"total": {"value": 0}, "hits": []}, "aggregations": {}}
        term = body.get("query", {}).get("term", {}).get("case_id")
        case = {k: v for k, v in self.case.items() if v is not None}  # a field left out, as a null one reads
        source = {k: v for k, v in case.items() if k in body.get("_source", case)}  # as OpenSearch filters it
        hits = [] if term not in (None, case["case_id"]) else [{"_source": source}]
        return {"hits": {"total": {"value": len(hits)}, "hits": hits}, "aggregations": {}}


class Images:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def get(self, ref: str) -> bytes:
        self.asked.append(ref)
        return jpeg()


KEY = "k" * 32


def served(
    *, allowed: str = "guard@example.com,lead@example.com", key: str | None = KEY
) -> tuple[TestClient, list, Images]:
    settings = Settings().model_copy(
        update={
            "dashboard": DashboardSettings(
                username="guard@example.com", password=SecretStr("pw"), token=SecretStr("tok")
            ),
            "webex": WebexSettings(allowed_people=allowed, command_signing_key=SecretStr(key) if key else None),
        }
    )
    published: list[tuple[BotCommand, list]] = []
    images = Images()
    index = CaseIndex()
    board = Dashboard(settings, client=index, images=images, clock=lambda: NOW / 1000)  # type: ignore[arg-type]
    app = create_app(settings, board, publish=lambda cmd, headers: published.append((cmd, headers)))
    client = TestClient(app, raise_server_exceptions=False)
    client.settings = settings  # type: ignore[attr-defined]
    client.index = index  # type: ignore[attr-defined]
    return client, published, images


GUARD = {"Authorization": "Basic " + base64.b64encode(b"guard@example.com:pw").decode()}
TOKEN = {"Authorization": "Bearer tok"}


def test_the_case_page_and_its_json_show_the_case_and_who_may_decide() -> None:
    client, _, _ = served()
    assert client.get("/cases/case-0123456789ab", headers=GUARD).status_code == 200
    answer = client.get("/api/cases/case-0123456789ab", headers=GUARD).json()
    assert answer["case"]["state"] == "open" and answer["you"] == "guard@example.com"
    assert set(answer["case"]["images"]) == {"live", "reference"} and "snapshot_ref" not in answer["case"]
    assert client.get("/api/cases/case-0123456789ab", headers=TOKEN).json()["you"] is None
    assert client.get("/api/cases/case-ffffffffffff", headers=GUARD).status_code == 404


@pytest.mark.parametrize(
    "case_id", ["case-" + "a" * 300, "x" * 600, "case-0123456789ag", "case-0123456789a", "CASE-0123456789AB", "case-1"]
)
def test_a_case_id_of_the_wrong_shape_is_answered_404_at_once_without_asking_opensearch(case_id: str) -> None:
    """An over-long or malformed id went to OpenSearch unchecked; when OpenSearch rejected it the page read "OpenSearch
    unavailable" (503) and asked again every 3 s, for ever. Now the shared case-id check answers it at once."""
    client, published, images = served()

    def rejecting(index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        raise TransportError(400, "search_phase_execution_exception", "term too long")

    client.index.search = rejecting  # type: ignore[attr-defined]
    answer = client.get(f"/api/cases/{case_id}", headers=GUARD)
    assert answer.status_code == 404 and "twelve hex digits" in answer.json()["error"]
    assert client.get(f"/cases/{case_id}/images/live", headers=GUARD).status_code == 404
    verdict = client.post(f"/api/cases/{case_id}/verdict", json={"verb": "confirm", "request_id": RID}, headers=GUARD)
    assert verdict.status_code == 400 and published == [] and images.asked == []


def test_the_case_page_s_box_keeps_to_the_limit_the_case_service_keeps() -> None:
    """The box said 500 (in the page itself) and the service keeps 1000: the page now reads the one limit from the
    case's JSON, and a note that long (in a script of three UTF-8 bytes a letter) fits the body limit."""
    client, published, _ = served()
    assert client.get("/api/cases/case-0123456789ab", headers=GUARD).json()["max_text"] == core.MAX_TEXT
    page = client.get("/cases/case-0123456789ab", headers=GUARD).text
    assert "maxlength" not in page.lower() and 'id="v-limit"' in page
    assert "body.max_text" in client.get("/static/case.js", headers=GUARD).text
    note = "注" * core.MAX_TEXT
    answer = client.post(
        "/api/cases/case-0123456789ab/verdict", json={"verb": "note", "text": note, "request_id": RID}, headers=GUARD
    )
    assert answer.status_code == 202 and parse_case_command("NOTE", published[0][0].argument).text == note


def test_a_note_with_a_lone_surrogate_is_published_as_a_command_that_encodes() -> None:
    """JSON's ``\\ud800`` (a text cut inside an emoji) reached the command, whose encoding for Kafka failed: a 500."""
    client, published, _ = served()
    body = b'{"verb": "note", "text": "cut \\ud83d here \\ud83d\\ude00", "request_id": "%s"}' % RID.encode()
    headers = {**GUARD, "Content-Type": "application/json"}
    assert client.post("/api/cases/case-0123456789ab/verdict", content=body, headers=headers).status_code == 202
    [(cmd, _)] = published
    assert BotCommand.decode(cmd.encode()).argument == "case-0123456789ab cut \ufffd here \U0001f600"


@pytest.mark.parametrize(
    ("person", "reason"),
    [
        ("bob", "not an e-mail address"),
        ("guard@ex\u0430mple.com", "mixes Cyrillic and Latin"),
        ("gu\u0430rd@x.com", "ASCII"),
    ],
)
def test_an_assignment_to_no_real_address_is_answered_at_once_and_not_published(person: str, reason: str) -> None:
    """A name or a lookalike address was published (202), refused by the case service in the audit only, and the page
    waited 30 s for a change that never came."""
    client, published, _ = served()
    body = {"verb": "assign", "text": person, "request_id": RID}
    answer = client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD)
    assert answer.status_code == 400 and reason in answer.json()["error"] and published == []


def test_an_assignment_to_someone_off_the_allow_list_is_answered_400_at_once_and_not_published() -> None:
    """It was published (202): the case service took it, and the case's owner could not act on it."""
    client, published, _ = served(allowed="guard@example.com")
    body = {"verb": "assign", "text": "lead@example.com", "request_id": RID}
    answer = client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD)
    assert answer.status_code == 400 and published == []
    assert "lead@example.com is not on the allow-list" in answer.json()["error"]
    body = {"verb": "assign", "text": "Guard@Example.com", "request_id": RID}
    assert client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD).status_code == 202


def test_case_images_are_served_by_case_id_and_kind() -> None:
    client, _, images = served()
    live = client.get("/cases/case-0123456789ab/images/live", headers=GUARD)
    reference = client.get("/cases/case-0123456789ab/images/reference", headers=GUARD)
    assert live.headers["content-type"] == reference.headers["content-type"] == "image/jpeg"
    assert images.asked == ["checkout/tx-1.jpg", "watchlist/subj-1.jpg"]
    assert client.get("/cases/case-0123456789ab/images/other", headers=GUARD).status_code == 404


def test_the_queue_rejects_an_unknown_state_and_answers_figures() -> None:
    client, _, _ = served()
    assert client.get("/api/cases?state=bogus", headers=GUARD).status_code == 400
    assert client.get("/api/cases?state=open&store=S01", headers=GUARD).json()["total"] == 1
    figures = client.get("/api/cases/figures?days=7", headers=GUARD).json()
    assert figures["open"] == 1 and figures["days"] == 7


def test_the_queue_shows_undecided_cases_escalated_ones_included_unless_asked_otherwise() -> None:
    client, _, _ = served()
    index: CaseIndex = client.index  # type: ignore[attr-defined]

    def state_filter(query: str) -> list[dict[str, Any]]:
        assert client.get(f"/api/cases{query}", headers=GUARD).status_code == 200
        clauses = index.bodies[-1][1]["query"]["bool"]["filter"]
        return [c for c in clauses if "state" in str(c)]

    assert state_filter("") == [{"terms": {"state": ["open", "escalated"]}}]  # the default queue
    assert state_filter("?state=undecided") == [{"terms": {"state": ["open", "escalated"]}}]
    assert state_filter("?state=escalated") == [{"term": {"state": "escalated"}}]
    assert state_filter("?state=any") == []


def test_a_verdict_is_published_as_a_signed_command_the_case_service_accepts() -> None:
    client, published, _ = served()
    answer = client.post(
        "/api/cases/case-0123456789ab/verdict",
        json={"verb": "dismiss", "text": "other person", "request_id": RID},
        headers=GUARD,
    )
    assert answer.status_code == 202
    [(cmd, headers)] = published
    assert answer.json()["command_id"] == cmd.command_id
    assert (cmd.verb, cmd.argument, cmd.actor) == ("DISMISS", "case-0123456789ab other person", "guard@example.com")
    authenticate_command(cmd, headers, client.settings.webex, NOW)  # type: ignore[attr-defined]


def test_a_verdict_s_log_line_names_the_person_by_tag_and_its_command_keeps_the_address(caplog) -> None:
    """The log line said "DISMISS case-... by guard@example.com": an e-mail address in every log of the dashboard."""
    client, published, _ = served()
    with caplog.at_level(logging.INFO, logger="sinks.dashboard"):
        answer = client.post(
            "/api/cases/case-0123456789ab/verdict",
            json={"verb": "dismiss", "text": "x", "request_id": RID},
            headers=GUARD,
        )
    assert answer.status_code == 202
    assert "guard@example.com" not in caplog.text
    assert f"by {person_tag('guard@example.com')} from the dashboard" in caplog.text
    [(cmd, _)] = published
    assert cmd.actor == "guard@example.com"  # the audit still names who decided


def test_a_note_sent_twice_by_one_submission_is_one_command_the_case_service_applies_once() -> None:
    """A double click on "Add note" posted the note twice, each with a fresh command id, and the case got it twice.
    The page's id of the submission now makes the command id, and the case service applies a command id once."""
    client, published, _ = served()
    service = CaseCore(client.settings)  # type: ignore[attr-defined]
    alert = Alert(
        "watchlist:tx-1", "WATCHLIST_MATCH", "high", NOW - MIN, "S01", "Possible match", transaction_id="tx-1"
    )
    service.on_alert(Source("alerts", 0, 0, b"a", alert.encode()), NOW)
    case_id = case_id_for(alert.alert_id)
    client.index.case = {**CASE, "case_id": case_id}  # type: ignore[attr-defined]
    body = {"verb": "note", "text": "seen at the door", "request_id": RID}
    for _ in range(2):  # the double click
        assert client.post(f"/api/cases/{case_id}/verdict", json=body, headers=GUARD).status_code == 202
    other = {**body, "request_id": "fedcba9876543210fedcba9876543210"}  # the same note again, a new submission
    assert client.post(f"/api/cases/{case_id}/verdict", json=other, headers=GUARD).status_code == 202
    for offset, (command, headers) in enumerate(published, start=1):
        source = Source("commands", 0, offset, command.command_id.encode(), command.encode(), tuple(headers), NOW)
        service.on_command(source, NOW)
    assert [note.text for note in service.book.cases[case_id].notes] == ["seen at the door"] * 2
    assert published[0][0].command_id == published[1][0].command_id != published[2][0].command_id


@pytest.mark.parametrize("request_id", ["short", "x" * 65, "has space 0123456789", 12345678901234567])
def test_a_submission_id_of_another_shape_is_refused(request_id: object) -> None:
    client, published, _ = served()
    body = {"verb": "note", "text": "seen", "request_id": request_id}
    answer = client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD)
    assert answer.status_code == 400 and "request_id" in answer.json()["error"] and published == []


def test_a_verdict_without_a_submission_id_is_refused_as_its_retries_would_each_be_applied() -> None:
    """Without ``request_id`` each try got a fresh command id, so a client retrying after a lost answer had its note
    added (or its verdict tried) once per try; now it is answered 400 saying why, and nothing is published."""
    client, published, _ = served()
    for body in ({"verb": "note", "text": "seen"}, {"verb": "note", "text": "seen", "request_id": None}):
        answer = client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD)
        assert answer.status_code == 400 and "request_id is required" in answer.json()["error"]
    assert published == []
    with pytest.raises(InvalidRecord, match="request_id is required"):
        verdict_command("case-0123456789ab", "note", "guard@example.com", NOW, text="seen", request_id=None)


def test_the_case_page_sends_one_id_per_submission_and_turns_its_buttons_off_while_one_is_on_its_way() -> None:
    client, _, _ = served()
    script = client.get("/static/case.js", headers=GUARD).text
    assert "request_id" in script and "getRandomValues" in script and "if (busy) return;" in script


@pytest.mark.parametrize(
    ("kwargs", "headers", "body", "status"),
    [
        ({}, TOKEN, {"verb": "confirm"}, 403),  # a token reads, never decides: no person to record
        ({"allowed": "someone@else.com"}, GUARD, {"verb": "confirm"}, 403),  # not on the allow-list
        ({"key": None}, GUARD, {"verb": "confirm"}, 503),  # unsigned, the case service would refuse it
        ({}, GUARD, {"verb": "forget"}, 400),
    ],
)
def test_a_verdict_nobody_may_give_publishes_nothing(kwargs: dict, headers: dict, body: dict, status: int) -> None:
    client, published, _ = served(**kwargs)
    assert client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=headers).status_code == status
    assert published == []


@pytest.mark.parametrize("fraud", ["true", 1, "yes"])
def test_a_confirm_as_fraud_not_written_as_a_json_boolean_is_refused_not_sent_as_a_plain_confirm(fraud: object) -> None:
    """``"fraud": "true"`` was read as false: a plain confirm was published (202) and no fraud label came of it."""
    client, published, _ = served()
    body = {"verb": "confirm", "fraud": fraud}
    answer = client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD)
    assert answer.status_code == 400 and "true or false" in answer.json()["error"] and published == []


def test_a_form_post_from_another_site_cannot_decide() -> None:
    client, published, _ = served()
    answer = client.post(
        "/api/cases/case-0123456789ab/verdict", data={"verb": "confirm"}, headers=GUARD
    )  # what a cross-site form sends, with the browser's Basic credentials
    assert answer.status_code == 415 and published == []


@pytest.mark.parametrize(
    ("indexed", "body", "answer"),
    [
        ({"state": "confirmed", "decided_by": "lead@example.com"}, {"verb": "dismiss"}, "already confirmed by lead"),
        ({"state": "expired"}, {"verb": "assign", "text": "lead@example.com"}, "already expired"),
        ({"state": "escalated"}, {"verb": "escalate"}, "already escalated"),
        ({"transaction_id": None}, {"verb": "confirm", "fraud": True}, "no transaction to label as fraud"),
    ],
)
def test_a_verdict_the_case_service_would_refuse_is_answered_at_once_and_not_published(
    indexed: dict, body: dict, answer: str
) -> None:
    """The page got 202 and waited 30 s for a change; the refusal was only in the audit."""
    client, published, _ = served()
    client.index.case = {**CASE, **indexed}  # type: ignore[attr-defined]
    reply = client.post("/api/cases/case-0123456789ab/verdict", json={**body, "request_id": RID}, headers=GUARD)
    assert reply.status_code == 409 and answer in reply.json()["error"] and published == []


@pytest.mark.parametrize(
    ("indexed", "body"),
    [
        ({"state": "confirmed"}, {"verb": "note", "text": "seen again"}),
        ({"state": "escalated"}, {"verb": "confirm", "fraud": True}),
        ({"transaction_id": None}, {"verb": "confirm"}),
    ],
)
def test_a_verdict_the_case_takes_is_still_published(indexed: dict, body: dict) -> None:
    client, published, _ = served()
    client.index.case = {**CASE, **indexed}  # type: ignore[attr-defined]
    body = {**body, "request_id": RID}
    assert client.post("/api/cases/case-0123456789ab/verdict", json=body, headers=GUARD).status_code == 202
    assert len(published) == 1


def test_a_verdict_on_an_unknown_case_publishes_nothing() -> None:
    client, published, _ = served()
    answer = client.post(
        "/api/cases/case-ffffffffffff/verdict", json={"verb": "confirm", "request_id": RID}, headers=GUARD
    )
    assert answer.status_code == 404 and published == []


def post_in_chunks(client: TestClient, chunks: int, chunk: bytes, content_length: int | None = None) -> tuple[int, int]:
    """POST a verdict of ``chunks`` x ``chunk`` straight to the app as a browser's body arrives, in pieces;
    the answer's status and how many bytes the app read."""
    read, answer = 0, {}
    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    headers.append((b"authorization", GUARD["Authorization"].encode()))
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/api/cases/case-0123456789ab/verdict", "raw_path": b"/api/cases/case-0123456789ab/verdict",
        "root_path": "", "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80),
    }  # fmt: skip
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal read, sent
        if sent == chunks:
            await anyio.sleep(3600)  # the client is still sending; never reached when the app stops reading
        sent += 1
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]

    anyio.run(client.app, scope, receive, send)
    return answer["status"], read


def test_an_oversized_verdict_is_refused_without_reading_all_of_it() -> None:
    client, published, _ = served()
    status, read = post_in_chunks(client, 1024, b" " * 1024)  # 1 MiB, no length given
    assert status == 413 and read <= MAX_BODY_BYTES + 1024 and published == []
    status, read = post_in_chunks(client, 1024, b" " * 1024, content_length=1024 * 1024)
    assert status == 413 and read == 0 and published == []
    small = json.dumps({"verb": "escalate", "request_id": RID}).encode()
    assert post_in_chunks(client, 1, small, content_length=len(small))[0] == 202 and len(published) == 1
