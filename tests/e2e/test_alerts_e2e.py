"""Alerts end to end on the real local stack: Kafka -> the alert sender process -> the stack's SMTP server
and the local Webex API server; and the Webex bot -> Kafka ``commands``.

The sender is killed with SIGKILL halfway and restarted while Webex answers 429/500: afterwards every
alert is in the Webex room exactly once with its snapshot, and in the mailbox exactly once. (The room is a
direct one, which the bot may list to find a post that had no answer; in a group space Webex refuses that,
and such a post is sent again: see tests/unit/test_alert_channels.py. A mail the
SMTP server accepted in the instant before the kill, before the ledger could record it, is sent again --
SMTP cannot be asked -- with the same Message-ID, and the mailbox keeps it once, as de-duplicating
mailboxes do; the test checks that no mail the ledger had recorded was sent again and that at most the
sends in flight were.)
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from opensearchpy.exceptions import NotFoundError
from PIL import Image
from pydantic import SecretStr

from infra.clients.commands import KafkaCommandPublisher
from infra.clients.image_store import ImageStore
from infra.clients.opensearch import make_client
from infra.launcher import spawn, wait_for
from infra.local.smtp import duplicates, mail_dir
from infra.local.webex import BackgroundServer, LocalWebexServer
from infra.settings import Settings
from infra.stack import ensure_topics
from jobs.bot.webex_bot import WEBHOOK_PATH, WebexBot
from schemas.indices import period_index_name
from schemas.records import Alert, AuditEvent, BotCommand, DeadLetter, ScoredTransaction
from schemas.topics import ALERTS, ALL_TOPICS, AUDIT, COMMANDS, DEAD_LETTERS
from sinks.alerts.sender import default_group_id
from sinks.opensearch.sink import install_templates, to_document

pytestmark = pytest.mark.e2e

TOKEN, ROOM = "e2e-bot-token", "room-e2e-alerts"


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (seed % 256, 80, 160)).save(out, format="JPEG")
    return out.getvalue()


def mail_files(directory: Path, address: str) -> list[Path]:
    """Files of the mails the stack's SMTP server kept for ``address`` (other tests share the directory)."""
    needle = f"Delivered-To: {address}\r\n".encode()
    found = []
    for path in directory.glob("*.eml"):
        with path.open("rb") as fh:
            if needle in fh.read(4096):
                found.append(path)
    return found


def mails_to(directory: Path, address: str) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        for path in mail_files(directory, address)
    ]


def sent_count(settings: Settings, channel: str) -> int:
    """Deliveries the sender's ledger has confirmed (a cheap progress probe while it runs)."""
    try:
        with sqlite3.connect(settings.alerts.ledger_path, timeout=5) as db:
            query = "SELECT count(*) FROM deliveries WHERE channel=? AND state='sent'"
            return db.execute(query, (channel,)).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def read_topic(settings: Settings, topic: str, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"e2e-read-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out.append((msg.key(), msg.value()))
    finally:
        consumer.close()
    return out


@pytest.fixture
def webex() -> Iterator[LocalWebexServer]:
    with LocalWebexServer(TOKEN) as server:
        yield server


@pytest.fixture
def isolated(stack: Settings, tmp_path: Path, webex: LocalWebexServer) -> Iterator[Callable[[str], Settings]]:
    """Settings of the test's own: topics and indices under ``<name>.``/``<name>``, the local Webex server,
    its own mail recipient and ledger; topics and indices are deleted afterwards."""
    made: list[Settings] = []

    def make(name: str) -> Settings:
        settings = stack.isolated(name, tmp_path / "checkpoints")
        settings = settings.model_copy(
            update={
                "webex": settings.webex.model_copy(
                    update={"base_url": webex.url, "bot_token": SecretStr(TOKEN), "room_id": ROOM}
                ),
                "smtp": settings.smtp.model_copy(update={"to_addresses": f"{name}@checkout-guard.test"}),
                "alerts": settings.alerts.model_copy(
                    update={
                        "retry_initial_s": 0.2,
                        "retry_max_s": 1.0,
                        "ledger_path": tmp_path / f"{name}-ledger.sqlite3",
                        "webex_cards": False,  # one message per alert here: the case cards are tested on their own
                    }
                ),
            }
        )
        ensure_topics(settings)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        for path in mail_files(mail_dir(settings.stack_dir), settings.smtp.to_addresses):
            path.unlink(missing_ok=True)  # the stack's mailbox is the demo's too
        admin = AdminClient(settings.kafka.client_config())
        for future in admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]).values():
            with contextlib.suppress(KafkaException):
                future.result(30)
        client = make_client(settings.opensearch)
        prefix = settings.opensearch.index_prefix
        client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
        with contextlib.suppress(NotFoundError):
            for template in client.indices.get_index_template(name=f"{prefix}-*")["index_templates"]:
                client.indices.delete_index_template(name=template["name"])


def test_each_alert_is_one_mail_and_one_webex_message_with_its_snapshot_across_a_kill_and_a_webex_outage(
    isolated: Callable[[str], Settings], webex: LocalWebexServer, request: pytest.FixtureRequest
) -> None:
    name = f"e2ealerts{uuid.uuid4().hex[:6]}"
    settings = isolated(name)
    store = ImageStore.from_settings(settings)
    refs: list[str] = []
    request.addfinalizer(lambda: [store.delete(r) for r in refs])  # the shared image store
    n = 1000
    images: dict[str, bytes] = {}
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    topic = ALERTS.full_name(settings.kafka.topic_prefix)
    for i in range(n):
        tx = f"{name}-tx-{i}"
        ref = None
        if i % 2 == 0:  # half with a snapshot, half without
            images[f"blocked:{tx}"] = jpeg(i)
            ref = store.put("checkout", tx, images[f"blocked:{tx}"])
            refs.append(ref)
        alert = Alert(
            alert_id=f"blocked:{tx}",
            kind="BLOCKED_TRANSACTION",
            severity="high",
            event_time=int(time.time() * 1000),
            store_id="S001",
            lane_id=f"L{i % 8:02d}",
            transaction_id=tx,
            amount=100.0 + i,
            currency="EUR",
            outcome="BLOCK",
            risk_score=90,
            reasons=("return_exceeds_sale",),
            snapshot_ref=ref,
            summary=f"Blocked {tx}",
        )
        producer.produce(topic, key=alert.alert_id.encode(), value=alert.encode())
        if i == n // 2:  # the same alert again (a replayed upstream): still one notification
            producer.produce(
                topic,
                key=b"blocked:" + f"{name}-tx-0".encode(),
                value=Alert(
                    alert_id=f"blocked:{name}-tx-0",
                    kind="BLOCKED_TRANSACTION",
                    severity="high",
                    event_time=0,
                    store_id="S001",
                    summary="dup",
                ).encode(),
            )
    producer.produce(topic, key=b"garbage", value=b"not an alert")
    assert producer.flush(30) == 0

    mailbox, address = mail_dir(settings.stack_dir), f"{name}@checkout-guard.test"
    webex.state.add_room(ROOM, "direct")  # the bot may list it: a resend after a 500 or the kill finds the post
    webex.state.latency_s = 0.01
    webex.state.fail((429, 500, 503), seconds=6, retry_after=1)
    sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender-1")
    try:
        wait_for(lambda: sent_count(settings, "email") >= n // 4, 120, interval=0.02, what="a quarter of the mails")
        sender.kill(signal.SIGKILL)
        sender.proc.wait(10)
        with sqlite3.connect(settings.alerts.ledger_path) as db:
            mailed = {
                row[0] for row in db.execute("SELECT alert_id FROM deliveries WHERE channel='email' AND state='sent'")
            }
        at_kill = (len(mails_to(mailbox, address)), len(webex.state.bot_messages(ROOM)))
        assert at_kill[0] < n, "the kill came too late to test a restart midway"
        sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender-2")
        try:
            wait_for(
                lambda: len(webex.state.bot_messages(ROOM)) >= n and len(mails_to(mailbox, address)) >= n,
                240,
                interval=0.2,
                what=f"{n} Webex messages and {n} mails",
            )
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}: {len(webex.state.bot_messages(ROOM))} Webex messages, {len(mails_to(mailbox, address))} mails"
            ) from None
        time.sleep(3)  # anything still arriving now would be a duplicate
    finally:
        sender.stop()

    assert webex.state.requests.get("429", 0) > 0 and webex.state.requests.get("500", 0) > 0

    posted = webex.state.bot_messages(ROOM)
    by_alert = Counter(m["markdown"].rsplit("`", 2)[-2] for m in posted)
    assert len(by_alert) == n and set(by_alert.values()) == {1}, by_alert.most_common(3)
    for message in posted:
        alert_id = message["markdown"].rsplit("`", 2)[-2]
        if alert_id in images:
            assert webex.state.file_bytes(message["files"][0]) == images[alert_id]
        else:
            assert "files" not in message

    mails = mails_to(mailbox, address)
    per_alert = Counter(m["X-Checkout-Guard-Alert"] for m in mails)
    assert len(per_alert) == n and set(per_alert.values()) == {1}, "exactly one mail per alert in the mailbox"
    # What the mailbox de-duplicated by Message-ID: only sends in flight at the kill, none the ledger had.
    ids = {m["Message-ID"]: m["X-Checkout-Guard-Alert"] for m in mails}
    doubled = {ids[i] for i in duplicates(mailbox) if i in ids}
    assert not doubled & mailed, f"mails the ledger had recorded were sent again: {sorted(doubled & mailed)[:5]}"
    assert len(doubled) <= settings.alerts.concurrency, "more doubles than sends that can be in flight at a kill"
    for mail in mails:
        attached = [p.get_content() for p in mail.walk() if p.get_content_maintype() == "image"]
        assert attached == (
            [images[mail["X-Checkout-Guard-Alert"]]] if mail["X-Checkout-Guard-Alert"] in images else []
        )

    dead_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
    letters = [DeadLetter.decode(v) for _, v in read_topic(settings, dead_topic)]
    # Produced again if the kill came before its offset was committed: same key, so one dead letter by id.
    assert {(d.dead_letter_id, d.stage, d.payload) for d in letters} == {
        (f"{topic}:{letters[0].partition}:{letters[0].offset}", "alert-sender", b"not an alert")
    }

    consumer = Consumer({**settings.kafka.client_config(), "group.id": default_group_id(settings)})
    try:
        parts = [TopicPartition(topic, p) for p in range(ALERTS.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in committed}
    finally:
        consumer.close()
    assert committed == ends, "every alert is done, so every offset is committed"
    print(
        f"at the kill: {at_kill[0]} mails ({len(mailed)} in the ledger), {at_kill[1]} Webex messages; "
        f"doubled mails {len(doubled)}; Webex answers {webex.state.requests}"
    )


def test_an_alert_a_channel_keeps_refusing_is_dead_lettered_while_the_other_channel_delivers(
    isolated: Callable[[str], Settings], webex: LocalWebexServer
) -> None:
    name = f"e2edead{uuid.uuid4().hex[:6]}"
    settings = isolated(name)
    settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"max_attempts": 2})})
    webex.state.fail((409,))  # a refusal spends attempts (a 5xx means "down": it waits)
    producer = Producer(settings.kafka.client_config())
    alert = Alert(
        alert_id=f"blocked:{name}",
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=0,
        store_id="S002",
        summary="x",
    )
    producer.produce(ALERTS.full_name(settings.kafka.topic_prefix), key=alert.alert_id.encode(), value=alert.encode())
    producer.flush(10)
    sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender")
    try:
        dead_topic = DEAD_LETTERS.full_name(settings.kafka.topic_prefix)
        [(_, value)] = wait_for(lambda: read_topic(settings, dead_topic, 2), 60, what="the dead letter")
    finally:
        sender.stop()
    letter = DeadLetter.decode(value)
    assert letter.error_kind == "delivery_failed" and "webex failed 2 times" in letter.reason
    assert Alert.decode(letter.payload).alert_id == alert.alert_id  # replayable as it was
    assert len(mails_to(mail_dir(settings.stack_dir), f"{name}@checkout-guard.test")) == 1
    assert webex.state.bot_messages(ROOM) == []

    # Webex is back: re-driving the dead letter delivers the alert to Webex only; the ledger keeps the
    # mail from going out twice, also when the re-drive is run a second time.
    webex.state.heal()
    sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender-2")
    try:
        for run in range(2):
            redrive = spawn("producers.redrive", settings, "--stage", "alert-sender", name=f"{name}-redrive-{run}")
            assert redrive.proc.wait(60) == 0, redrive.log_path.read_text()[-2000:]
        wait_for(lambda: webex.state.bot_messages(ROOM), 60, what="the re-driven alert in the Webex room")
        time.sleep(3)
    finally:
        sender.stop()
    assert len(webex.state.bot_messages(ROOM)) == 1
    assert len(mails_to(mail_dir(settings.stack_dir), f"{name}@checkout-guard.test")) == 1


def test_bot_commands_reach_kafka_once_and_forged_or_unallowed_ones_never(
    isolated: Callable[[str], Settings], webex: LocalWebexServer
) -> None:
    name = f"e2ebot{uuid.uuid4().hex[:6]}"
    settings = isolated(name)
    settings = settings.model_copy(
        update={
            "webex": settings.webex.model_copy(
                update={
                    "webhook_secret": SecretStr("e2e-secret"),
                    "allowed_rooms": "room-security",
                    "command_signing_key": SecretStr("e2e-signing-key"),
                }
            )
        }
    )
    # What `checkout` answers from by default: the transaction's decision and face result in OpenSearch.
    client = make_client(settings.opensearch)
    install_templates(client, settings.opensearch.index_prefix)
    scored = ScoredTransaction(
        transaction_id=f"{name}-tx-9",
        event_time=int(time.time() * 1000),
        store_id="S003",
        lane_id="L04",
        kind="SALE",
        amount=250.0,
        currency="EUR",
        item_count=1,
        customer_key="card:x",
        outcome="BLOCK",
        risk_score=95,
        reasons=("watchlist_suspect",),
        rules_version="v1",
        ingest_time=0,
        decided_at=0,
        proc_time_ms=0,
        model_time_ms=0,
        ttdf_ms=0,
        face_status="MATCHED",
        face_subject_id="subj-tx-1",
        face_category="SUSPECT",
        face_similarity=91.5,
    )
    client.index(
        index=period_index_name(settings.opensearch.index_prefix, "transactions", scored.event_time),
        id=scored.transaction_id,
        body=to_document(scored.to_avro()),
        refresh=True,
    )
    publisher = KafkaCommandPublisher(settings)
    bot = WebexBot(settings, publish=publisher)
    server = BackgroundServer(bot.app, name="bot").start()
    try:
        webex.state.webhooks.append(
            {
                "id": "hook-1",
                "name": "bot",
                "targetUrl": server.base + WEBHOOK_PATH,
                "resource": "messages",
                "event": "created",
                "filter": None,
                "secret": "e2e-secret",
                "created": "now",
            }
        )
        [ok] = webex.say("room-security", "guard@store.test", "Checkout Guard fraud tx-1")
        webex.say("room-lobby", "visitor@store.test", "Checkout Guard fraud tx-2")
        webex.state.webhooks[0]["secret"] = "an-attacker-guess"  # forged signatures from here on
        [forged] = webex.say("room-security", "guard@store.test", "forget subj-tx-1")
        assert (ok["status"], forged["status"]) == (200, 403)
        webex.state.webhooks[0]["secret"] = "e2e-secret"
        webex.say("room-lobby", "visitor@store.test", "status")  # reveals watchlist data: allow-list only
        webex.say("room-security", "guard@store.test", "status")
        webex.say("room-security", "guard@store.test", f"checkout {name}-tx-9")
        wait_for(lambda: len(webex.state.bot_messages()) >= 5, 30, what="five replies")
    finally:
        server.stop()
        bot.close()
        publisher.close()
    records = read_topic(settings, COMMANDS.full_name(settings.kafka.topic_prefix), timeout=5)
    commands = [(k.decode(), BotCommand.decode(v)) for k, v in records]
    assert sorted((c.verb, c.argument or "", c.room_id) for _, c in commands) == [
        ("CHECKOUT", f"{name}-tx-9", "room-security"),
        ("FRAUD", "tx-1", "room-security"),
        ("STATUS", "", "room-security"),
    ]
    commands.sort(key=lambda kc: kc[1].verb != "FRAUD")
    assert commands[0][0] == ok["message_id"] == commands[0][1].command_id
    replies = [m["markdown"] for m in webex.state.bot_messages()]
    assert any("Pipeline healthy" in r for r in replies), replies
    assert any(r.startswith("Sorry, changes to the watchlist") for r in replies)
    assert any(r.startswith("Sorry, `status` answers only") for r in replies), replies
    assert any(
        "blocked (risk 95)" in r and "face matches **suspect** `subj-tx-1` (91.5% similar)" in r for r in replies
    ), replies


def test_a_rate_limited_webex_does_not_hold_up_email(
    isolated: Callable[[str], Settings], webex: LocalWebexServer
) -> None:
    name = f"e2eslow{uuid.uuid4().hex[:6]}"
    settings = isolated(name)
    webex.state.fail((429,), seconds=8, retry_after=4)
    producer = Producer(settings.kafka.client_config())
    n = 50
    for i in range(n):
        alert = Alert(
            alert_id=f"blocked:{name}-{i}",
            kind="BLOCKED_TRANSACTION",
            severity="high",
            event_time=int(time.time() * 1000),
            store_id="S004",
            summary="x",
        )
        producer.produce(
            ALERTS.full_name(settings.kafka.topic_prefix), key=alert.alert_id.encode(), value=alert.encode()
        )
    producer.flush(10)
    address = f"{name}@checkout-guard.test"
    sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender")
    try:
        wait_for(lambda: len(mails_to(mail_dir(settings.stack_dir), address)) >= n, 60, what="every mail")
        assert webex.state.bot_messages(ROOM) == [], "Webex is still rate limited, yet e-mail is all through"
        wait_for(lambda: len(webex.state.bot_messages(ROOM)) >= n, 60, what="Webex after the rate limit")
    finally:
        sender.stop()
    assert webex.state.requests["429"] >= 1
    assert len(webex.state.bot_messages(ROOM)) == n


def test_a_forgotten_subjects_alert_messages_and_cards_are_taken_back_from_webex(
    isolated: Callable[[str], Settings], webex: LocalWebexServer
) -> None:
    name = f"e2eerase{uuid.uuid4().hex[:6]}"
    settings = isolated(name)
    settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"webex_cards": True})})
    source, subject, now = f"{name}-tx-source", f"subj-{name}-tx-source", int(time.time() * 1000)
    alerts = [  # the sale the subject was enrolled from, a later match of the subject, someone else's match
        Alert(f"blocked:{source}", "BLOCKED_TRANSACTION", "high", now - 60_000, "S005", "x", transaction_id=source),
        Alert(f"suspect:{name}-1", "WATCHLIST_MATCH", "high", now, "S005", "x", subject_id=subject),
        Alert(f"suspect:{name}-2", "WATCHLIST_MATCH", "high", now, "S005", "x", subject_id=f"subj-{name}-other"),
    ]
    producer = Producer(settings.kafka.client_config())
    for alert in alerts:
        producer.produce(
            ALERTS.full_name(settings.kafka.topic_prefix), key=alert.alert_id.encode(), value=alert.encode()
        )
    assert producer.flush(10) == 0
    sender = spawn("sinks.alerts.sender", settings, name=f"{name}-sender")
    try:
        wait_for(lambda: len(webex.state.bot_messages(ROOM)) >= 6, 60, what="three alerts and their case cards")
        forget = AuditEvent(
            audit_id=f"forget:{subject}",
            event_time=int(time.time() * 1000),
            action="FORGET",
            outcome="DONE",
            actor="guard@example.com",
            subject_id=subject,
            transaction_id=source,
        )
        audit_topic = AUDIT.full_name(settings.kafka.topic_prefix)
        producer.produce(audit_topic, key=forget.audit_id.encode(), value=forget.encode())
        assert producer.flush(10) == 0
        wait_for(lambda: len(webex.state.bot_messages(ROOM)) <= 2, 60, what="the forgotten subject's messages gone")
        erased = wait_for(
            lambda: [
                e for _, v in read_topic(settings, audit_topic, 2) if (e := AuditEvent.decode(v)).action == "ERASE"
            ],
            30,
            what="the ERASE audit event",
        )
    finally:
        sender.stop()
    left = webex.state.bot_messages(ROOM)
    assert len(left) == 2 and all(f"suspect:{name}-2" in m["markdown"] or m.get("parentId") for m in left)
    assert {m.get("parentId") for m in left} - {None} == {m["id"] for m in left if not m.get("parentId")}
    [event] = erased
    assert event.details["webex_messages_deleted"] == "4" and event.details["subjects"] == subject
