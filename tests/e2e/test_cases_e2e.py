"""Cases on the real Kafka, with the real watchlist service beside the case service: an alert opens one case
(with the live snapshot and the enrolled reference image); a signed ``confirm`` from an allowed person closes
it, audits it, adds the sighting as a template and publishes no fraud label; a ``dismiss`` records the false
match; a forged ``confirm`` changes nothing; an unanswered case expires; a restart repeats nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.clients.image_store import ImageStore
from infra.launcher import spawn, wait_for
from infra.settings import Settings
from infra.stack import ensure_topics
from schemas.records import Alert, AuditEvent, Case, DeadLetter, WatchlistEntry, case_id_for
from schemas.topics import ALERTS, AUDIT, CASES, DEAD_LETTERS, LABELS, WATCHLIST
from tests.e2e.test_watchlist_service_e2e import TopicReader, _command, _produce

pytestmark = pytest.mark.e2e

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces" / "face_recognition" / "test_images"
SIGNING_KEY = "e2e-command-signing-key"
GUARD = "lp@example.com"


def isolated(stack: Settings, tmp_path: Path, **cases: object) -> Settings:
    s = stack.isolated(f"cases{uuid.uuid4().hex[:8]}", tmp_path / "checkpoints")
    webex = s.webex.model_copy(update={"command_signing_key": SecretStr(SIGNING_KEY), "allowed_people": GUARD})
    s = s.model_copy(
        update={"stack_dir": tmp_path, "webex": webex, "cases": s.cases.model_copy(update=cases)}
    )  # images and logs of this test only
    ensure_topics(s)
    return s


def alert(alert_id: str, subject: str, snapshot: str, tx: str) -> Alert:
    return Alert(
        alert_id=alert_id,
        kind="WATCHLIST_MATCH",
        severity="HIGH",
        event_time=int(time.time() * 1000),
        store_id="S1",
        summary="Possible suspect at lane 2",
        lane_id="lane-2",
        transaction_id=tx,
        subject_id=subject,
        category="SUSPECT",
        similarity=0.91,
        snapshot_ref=snapshot,
    )


def latest_cases(reader: TopicReader) -> dict[str, list[Case]]:
    out: dict[str, list[Case]] = {}
    for _key, value in reader.poll():
        if value is not None:
            case = Case.decode(value)
            out.setdefault(case.case_id, []).append(case)
    return out


def audits(reader: TopicReader) -> dict[str, AuditEvent]:
    return {e.audit_id: e for e in (AuditEvent.decode(v) for _, v in reader.poll())}


@pytest.mark.skipif(not (FACES / "obama2.jpg").is_file(), reason="shared face photos (../shared/data/faces) absent")
def test_alert_case_verdicts_and_their_effects_through_kafka(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, tmp_path)
    store = ImageStore.from_settings(settings)
    tx, seen_tx, seen2_tx = (f"tx-{uuid.uuid4().hex[:8]}" for _ in range(3))
    subject = f"subj-{tx}"
    store.put("checkout", tx, (FACES / "obama.jpg").read_bytes())
    sighting = store.put("checkout", seen_tx, (FACES / "obama2.jpg").read_bytes())
    sighting2 = store.put("checkout", seen2_tx, (FACES / "obama3.jpg").read_bytes())
    watch, cases, audit, dead, labels = (
        TopicReader(settings, s) for s in (WATCHLIST, CASES, AUDIT, DEAD_LETTERS, LABELS)
    )
    watchlist = spawn("jobs.faces.watchlist_service", settings, name="watchlist-service-e2e")
    service = None
    try:
        _command(settings, "FRAUD", tx)
        (entry,) = wait_for(
            lambda: [WatchlistEntry.decode(v) for k, v in watch.poll() if k == subject.encode() and v],
            90,
            what="the subject enrolled",
        )
        service = spawn("jobs.cases.service", settings, name="case-service-e2e")
        first = alert(f"watchlist:{seen_tx}:{subject}", subject, sighting, seen_tx)
        second = alert(f"watchlist:{seen2_tx}:{subject}", subject, sighting2, seen2_tx)
        third = alert(f"watchlist:tx-x:{subject}", subject, sighting2, "tx-x")
        for a in (first, first, second, third):  # the first alert delivered twice
            _produce(settings, ALERTS, a.alert_id, a.encode())
        ids = [case_id_for(a.alert_id) for a in (first, second, third)]
        opened = wait_for(lambda: (c := latest_cases(cases)) and set(ids) <= c.keys() and c, 90, what="three cases")
        time.sleep(1)
        assert [len(v) for v in latest_cases(cases).values()] == [1, 1, 1], "a redelivered alert opened no case"
        case = opened[ids[0]][0]
        assert (case.state, case.snapshot_ref, case.reference_image_ref) == (
            "open",
            sighting,
            entry.reference_image_ref,
        )
        assert (case.subject_id, case.transaction_id, case.similarity) == (subject, seen_tx, 0.91)

        confirm = _command(settings, "CONFIRM", ids[0])
        dismiss = _command(settings, "DISMISS", f"{ids[1]} different person")
        forged = _command(settings, "CONFIRM", ids[2], key="guessed")
        done = wait_for(
            lambda: (a := audits(audit)) and {f"case:{confirm}", f"case:{dismiss}"} <= a.keys() and a,
            60,
            what="audits of the verdicts",
        )
        assert (done[f"case:{confirm}"].action, done[f"case:{confirm}"].outcome) == ("CONFIRM", "DONE")
        assert done[f"case:{confirm}"].actor == GUARD and done[f"case:{confirm}"].subject_id == subject
        assert done[f"case:{dismiss}"].details["subject_false_matches"] == "1"
        now = latest_cases(cases)
        assert (now[ids[0]][-1].state, now[ids[0]][-1].version, now[ids[0]][-1].owner) == ("confirmed", 2, GUARD)
        assert (now[ids[1]][-1].state, now[ids[1]][-1].subject_false_matches) == ("dismissed", 1)
        assert now[ids[1]][-1].verdict_reason == "different person"

        learned = wait_for(
            lambda: [
                e
                for k, v in watch.poll()
                if k == subject.encode() and v and len((e := WatchlistEntry.decode(v)).embeddings) == 2
            ],
            90,
            what="the confirmed sighting as a second template",
        )
        assert learned[0].reference_image_ref == entry.reference_image_ref
        assert audits(audit)[f"command:learn:{ids[0]}"].action == "LEARN"

        unauthorized = wait_for(
            lambda: [d for _, v in dead.poll() if (d := DeadLetter.decode(v)).stage == "case_service"],
            30,
            what="the forged confirm dead-lettered",
        )
        assert [d.error_kind for d in unauthorized] == ["unauthorized"]
        (refusal,) = [a for a in audits(audit).values() if a.details.get("claimed_command_id") == forged]
        assert (refusal.outcome, refusal.actor, refusal.action) == ("FAILED", "unverified", "CONFIRM")
        assert [c.state for c in latest_cases(cases)[ids[2]]] == ["open"], "a forged confirm changed nothing"
        assert labels.poll(1) == [], "a face-match confirmation publishes no fraud label"

        # a restart replays nothing: the same alert again opens no case, the same command changes nothing
        n_cases = len(cases.poll())
        service.stop()
        service = spawn("jobs.cases.service", settings, name="case-service-e2e")
        _produce(settings, ALERTS, first.alert_id, first.encode())
        fraud = _command(settings, "CONFIRM", f"{ids[2]} fraud")
        wait_for(lambda: f"case:{fraud}" in audits(audit), 60, what="the fraud confirmation after the restart")
        assert len(cases.poll(2)) == n_cases + 1, "only the new verdict wrote a case version"
        (label_key, label_value) = wait_for(labels.poll, 30, what="the fraud label")[0]
        assert label_key == b"tx-x" and label_value is not None
        # ... and it is what the next `jobs.model.train --labels-from-topic` reads and joins by transaction id
        from jobs.model.labels import read_labels

        in_force = read_labels(settings).by_transaction
        assert in_force["tx-x"].label == 1 and in_force["tx-x"].source == "case"
    finally:
        for process in (service, watchlist):
            if process is not None:
                process.stop()
        for r in (watch, cases, audit, dead, labels):
            r.close()


def test_an_unanswered_case_expires(stack: Settings, tmp_path: Path) -> None:
    settings = isolated(stack, tmp_path, expire_after_s=3.0, expiry_interval_s=0.5)
    cases, audit = TopicReader(settings, CASES), TopicReader(settings, AUDIT)
    service = spawn("jobs.cases.service", settings, name="case-service-e2e")
    try:
        lonely = alert(f"watchlist:tx-1:subj-{uuid.uuid4().hex[:6]}", "subj-x", "local://checkout/none.jpg", "tx-1")
        _produce(settings, ALERTS, lonely.alert_id, lonely.encode())
        case_id = case_id_for(lonely.alert_id)
        versions = wait_for(
            lambda: (v := latest_cases(cases).get(case_id, [])) and v[-1].state == "expired" and v, 60, what="expiry"
        )
        assert [c.state for c in versions] == ["open", "expired"]
        assert versions[-1].decided_at is not None and versions[-1].decided_at >= versions[0].expires_at
        assert audits(audit)[f"case-expire:{case_id}"].action == "EXPIRE"
    finally:
        service.stop()
        cases.close()
        audit.close()


def test_a_signed_card_press_decides_the_case_and_a_forged_one_changes_nothing(stack: Settings, tmp_path: Path) -> None:
    """The real bot (in-process, its commands to Kafka) behind the local Webex API; the case service decides."""
    import json

    import httpx

    from infra.clients.commands import KafkaCommandPublisher
    from infra.local.webex import BackgroundServer, LocalWebexServer, person_id, sign
    from jobs.bot.webex_bot import WEBHOOK_PATH, WebexBot
    from sinks.alerts.message import case_card

    secret, room = "e2e-webhook-secret", "room-security"
    cases, audit = None, None
    service = None
    with LocalWebexServer("e2e-token") as webex:
        settings = isolated(stack, tmp_path)
        settings = settings.model_copy(
            update={
                "webex": settings.webex.model_copy(
                    update={
                        "base_url": webex.url,
                        "bot_token": SecretStr("e2e-token"),
                        "webhook_secret": SecretStr(secret),
                    }
                )
            }
        )
        publisher = KafkaCommandPublisher(settings)
        bot = WebexBot(settings, publish=publisher, inspect_checkout=lambda tx: tx, status_text=lambda: "ok")
        server = BackgroundServer(bot.app, name="bot").start()
        try:
            for name, resource in (("bot", "messages"), ("bot-cards", "attachmentActions")):
                webex.state.webhooks.append(
                    {
                        "id": f"hook-{name}",
                        "name": name,
                        "targetUrl": server.base + WEBHOOK_PATH,
                        "resource": resource,
                        "event": "created",
                        "filter": None,
                        "secret": secret,
                        "created": "now",
                    }
                )
            cases, audit = TopicReader(settings, CASES), TopicReader(settings, AUDIT)
            service = spawn("jobs.cases.service", settings, name="case-service-e2e")
            pressed = alert("watchlist:tx-p:subj-p", "subj-p", "local://checkout/p.jpg", "tx-p")
            forged_on = alert("watchlist:tx-f:subj-p", "subj-p", "local://checkout/f.jpg", "tx-f")
            for a in (pressed, forged_on):
                _produce(settings, ALERTS, a.alert_id, a.encode())
            ids = [case_id_for(a.alert_id) for a in (pressed, forged_on)]
            wait_for(lambda: set(ids) <= latest_cases(cases).keys(), 60, what="two cases")
            cards = [
                bot.client.send_card(room, "case", case_card(a.to_avro(), settings.alerts))["id"]
                for a in (pressed, forged_on)
            ]

            [delivery] = webex.press(cards[0], GUARD, {"verb": "dismiss", "case_id": ids[0]})
            assert delivery["status"] == 200
            decided = wait_for(
                lambda: (v := latest_cases(cases)[ids[0]]) and v[-1].state == "dismissed" and v, 60, what="the verdict"
            )
            assert decided[-1].updated_by == GUARD and decided[-1].subject_false_matches == 1
            assert audits(audit)[f"case:{delivery['message_id']}"].action == "DISMISS"

            # a forged press: a callback for a real press, signed with a guess, changes nothing
            webex.state.webhooks.clear()
            webex.press(cards[1], GUARD, {"verb": "confirm", "case_id": ids[1]})
            [action_id] = [a for a, act in webex.state.actions.items() if act["messageId"] == cards[1]]
            body = json.dumps(
                {
                    "resource": "attachmentActions",
                    "event": "created",
                    "data": {"id": action_id, "roomId": room, "personId": person_id(GUARD)},
                }
            ).encode()
            forged = httpx.post(
                server.base + WEBHOOK_PATH, content=body, headers={"X-Spark-Signature": sign(body, "guess")}
            )
            assert forged.status_code == 403
            time.sleep(3)
            assert [c.state for c in latest_cases(cases)[ids[1]]] == ["open"], "a forged press changed the case"
        finally:
            if service is not None:
                service.stop()
            server.stop()
            bot.close()
            publisher.close()
            for reader in (cases, audit):
                if reader is not None:
                    reader.close()


def test_the_audit_replay_at_start_reads_back_only_to_the_retention_horizon(stack: Settings, tmp_path: Path) -> None:
    """``read_control_topics(since_ms=...)`` on the real broker: records written before the horizon are not
    read, those after it are, and a partition with nothing newer is skipped (what the case service's start
    relies on to read ``audit`` only as far back as retention)."""
    from confluent_kafka import Producer

    from infra.clients.control_topics import read_control_topics

    settings = isolated(stack, tmp_path)
    topic = AUDIT.full_name(settings.kafka.topic_prefix)
    now = int(time.time() * 1000)
    producer = Producer(settings.kafka.client_config())
    for i, age_days in enumerate((40, 35, 2, 1)):
        producer.produce(topic, key=f"k{i}".encode(), value=b"v", partition=0, timestamp=now - age_days * 86_400_000)
    producer.flush(30)
    seen: list[bytes] = []
    read_control_topics(settings, lambda _t, k, _v: seen.append(k), specs=(AUDIT,), since_ms=now - 30 * 86_400_000)
    assert seen == [b"k2", b"k3"]
    seen.clear()
    read_control_topics(settings, lambda _t, k, _v: seen.append(k), specs=(AUDIT,))
    assert seen == [b"k0", b"k1", b"k2", b"k3"]
    seen.clear()
    read_control_topics(settings, lambda _t, k, _v: seen.append(k), specs=(AUDIT,), since_ms=now + 60_000)
    assert seen == []
