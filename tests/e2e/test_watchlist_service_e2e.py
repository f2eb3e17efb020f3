"""Watchlist service on the real Kafka: fraud -> entry + audit, failures -> audit + dead letter,
alert -> snapshot retained, an unsigned forget -> refused (dead letter ``unauthorized``), forget ->
tombstone + images gone + audit; a SIGKILL/restart adds nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from infra.clients.image_store import ImageStore
from infra.command_auth import SIGNATURE_HEADER, sign_command
from infra.launcher import spawn, wait_for
from infra.settings import Settings
from infra.stack import ensure_topics
from schemas.records import Alert, AuditEvent, BotCommand, DeadLetter, WatchlistEntry
from schemas.topics import ALERTS, AUDIT, COMMANDS, COMPACTION_MARKER, DEAD_LETTERS, WATCHLIST
from tests.builders import FACE_LEN

pytestmark = pytest.mark.e2e

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
PHOTO = FACES / "face_recognition" / "test_images" / "obama.jpg"
SIGNING_KEY = "e2e-command-signing-key"


class TopicReader:
    """Reads a topic from the beginning (committed records only), accumulating across calls; the compaction
    markers its owner appends (one per start, then one an hour) are counted in ``markers``, not kept."""

    def __init__(self, settings: Settings, spec) -> None:
        self.topic = spec.full_name(settings.kafka.topic_prefix)
        self.consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        parts = self.consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.markers = 0

    def poll(self, seconds: float = 0.5) -> list[tuple[bytes | None, bytes | None]]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            if msg.key() == COMPACTION_MARKER and msg.value() is None:
                self.markers += 1
            else:
                self.records.append((msg.key(), msg.value()))
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def settings(stack: Settings, tmp_path) -> Settings:
    name = f"wl{uuid.uuid4().hex[:8]}"
    s = stack.isolated(name, tmp_path / "checkpoints")
    webex = s.webex.model_copy(
        update={"command_signing_key": SecretStr(SIGNING_KEY), "allowed_people": "lp@example.com,dpo@example.com"}
    )
    s = s.model_copy(update={"stack_dir": tmp_path, "webex": webex})  # images and logs of this test only
    ensure_topics(s)
    return s


def _produce(settings: Settings, spec, key: str, value: bytes, headers: list | None = None) -> None:
    producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
    producer.produce(spec.full_name(settings.kafka.topic_prefix), key=key.encode(), value=value, headers=headers or [])
    assert producer.flush(10) == 0


def _command(
    settings: Settings, verb: str, arg: str, actor: str = "lp@example.com", key: str | None = SIGNING_KEY
) -> str:
    """A command as the bot publishes it (signed with ``key``; ``None``: unsigned, as any other writer)."""
    cid = uuid.uuid4().hex
    cmd = BotCommand(command_id=cid, issued_at=int(time.time() * 1000), verb=verb, actor=actor, argument=arg)
    headers = [(SIGNATURE_HEADER, sign_command(cmd, key))] if key is not None else []
    _produce(settings, COMMANDS, cid, cmd.encode(), headers)
    return cid


def _audits(reader: TopicReader) -> dict[str, AuditEvent]:
    return {e.audit_id: e for e in (AuditEvent.decode(v) for _, v in reader.poll())}


@pytest.mark.skipif(not PHOTO.is_file(), reason="shared face photos (../shared/data/faces) absent")
def test_fraud_then_forget_through_kafka(settings: Settings):
    store = ImageStore.from_settings(settings)
    tx, later_tx = f"tx-{uuid.uuid4().hex[:8]}", f"tx-{uuid.uuid4().hex[:8]}"
    store.put("checkout", tx, PHOTO.read_bytes())
    later = store.put("checkout", later_tx, PHOTO.read_bytes())
    subject = f"subj-{tx}"
    watch, audit, dead = (TopicReader(settings, s) for s in (WATCHLIST, AUDIT, DEAD_LETTERS))
    service = spawn("jobs.faces.watchlist_service", settings, name="watchlist-service-e2e")
    try:
        fraud = _command(settings, "FRAUD", tx)
        missing = _command(settings, "FRAUD", "tx-never-seen")

        def enrolled():
            return [WatchlistEntry.decode(v) for k, v in watch.poll() if k == subject.encode() and v]

        (entry,) = wait_for(enrolled, 60, what="watchlist entry")
        assert entry.category == "SUSPECT" and entry.flagged_by == "lp@example.com"
        assert len(entry.embeddings[0]) == FACE_LEN and store.get(entry.reference_image_ref) == PHOTO.read_bytes()
        audits = wait_for(
            lambda: (a := _audits(audit)) and {f"command:{fraud}", f"command:{missing}"} <= a.keys() and a,
            30,
            what="audit of both commands",
        )
        assert audits[f"command:{fraud}"].outcome == "DONE" and audits[f"command:{fraud}"].action == "ENROLL"
        assert audits[f"command:{missing}"].outcome == "FAILED"
        letters = wait_for(lambda: [DeadLetter.decode(v) for _, v in dead.poll()], 30, what="dead letter")
        assert [d.error_kind for d in letters] == ["unknown_transaction"]

        alert = Alert(
            alert_id=f"a-{later_tx}",
            kind="WATCHLIST_MATCH",
            severity="HIGH",
            event_time=int(time.time() * 1000),
            store_id="S1",
            summary="suspect at lane 2",
            subject_id=subject,
            snapshot_ref=later,
            transaction_id=later_tx,
        )
        _produce(settings, ALERTS, alert.alert_id, alert.encode())
        wait_for(lambda: f"retain:{alert.alert_id}" in _audits(audit), 30, what="retain audit")
        assert store.retained() == {later: f"subject={subject} alert={alert.alert_id}"}

        # anyone may write to `commands`: an unsigned or wrongly signed forget is refused, never applied
        _command(settings, "FORGET", subject, key=None)
        _command(settings, "FORGET", subject, key="guessed")
        refused = wait_for(
            lambda: (
                (r := [d for _, v in dead.poll() if (d := DeadLetter.decode(v)).error_kind == "unauthorized"])
                and len(r) == 2
                and r
            ),
            30,
            what="two unauthorized dead letters",
        )
        assert {BotCommand.decode(d.payload).verb for d in refused} == {"FORGET"}
        assert store.find("reference", subject) is not None and (subject.encode(), None) not in watch.poll()

        forget = _command(settings, "FORGET", subject, actor="dpo@example.com")
        wait_for(lambda: (subject.encode(), None) in watch.poll(), 30, what="tombstone")
        forgot = wait_for(lambda: _audits(audit).get(f"command:{forget}"), 30, what="forget audit")
        assert forgot.outcome == "DONE" and forgot.actor == "dpo@example.com"
        assert store.find("reference", subject) is None and store.find("checkout", tx) is None
        assert store.find("checkout", later_tx) is None, "the retained alert snapshot of the subject is gone too"

        # crash and restart: committed offsets mean nothing is processed (or published) twice
        n_audit, n_watch = len(audit.poll()), len(watch.poll())
        service.kill()
        service.proc.wait(10)
        service = spawn("jobs.faces.watchlist_service", settings, name="watchlist-service-e2e")
        again = _command(settings, "FORGET", subject)
        wait_for(lambda: f"command:{again}" in _audits(audit), 60, what="audit after restart")
        assert _audits(audit)[f"command:{again}"].outcome == "UNCHANGED"
        assert len(audit.poll(2)) == n_audit + 1, "only the new command was audited after the restart"
        assert len(watch.poll()) == n_watch + 1, "only its (harmless) tombstone was added"
        assert watch.markers >= 1, "the service keeps the topic compacting (a marker at each start)"

        # offsets reset (consumer group deleted): every command is read again, none is carried out twice
        service.stop()
        admin = AdminClient(settings.kafka.client_config())
        group = f"{settings.kafka.topic_prefix}{settings.faces.service_group}"
        admin.delete_consumer_groups([group])[group].result(30)
        n_audit, n_watch, n_dead = len(audit.poll()), len(watch.poll()), len(dead.poll())
        service = spawn("jobs.faces.watchlist_service", settings, name="watchlist-service-e2e")
        last = _command(settings, "FRAUD", "tx-still-unknown")
        wait_for(lambda: f"command:{last}" in _audits(audit), 60, what="audit after the offset reset")
        assert len(audit.poll(2)) == n_audit + 1 and len(watch.poll()) == n_watch
        assert len(dead.poll()) == n_dead + 1, "only the new failing command was dead-lettered"
    finally:
        service.stop()
        for r in (watch, audit, dead):
            r.close()


@pytest.mark.skipif(not PHOTO.is_file(), reason="shared face photos (../shared/data/faces) absent")
def test_fraud_and_forget_with_s3_images_and_the_rekognition_backend(settings: Settings):
    """The service process configured for S3 (moto server) and Rekognition (local JSON-protocol server)."""
    import socket

    import boto3
    from moto.server import ThreadedMotoServer
    from pydantic import SecretStr

    from infra.local.rekognition import LocalRekognition
    from infra.settings import FaceSettings
    from jobs.faces.engine import FaceEngine
    from jobs.faces.rekognition import RekognitionFaces
    from jobs.scoring.face_similarity import similarity

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    s3_url = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    rek = LocalRekognition(FaceEngine(FaceSettings()), similarity, s3)
    faces = settings.faces.model_copy(
        update={
            "backend": "rekognition",
            "image_store": "s3",
            "aws_region": "us-east-1",
            "aws_endpoint_url": s3_url,
            "rekognition_endpoint_url": rek.start(),
            "aws_access_key_id": SecretStr("k"),
            "aws_secret_access_key": SecretStr("s"),
        }
    )
    settings = settings.model_copy(update={"faces": faces})
    store = ImageStore.from_settings(settings)
    store.ensure_buckets()
    tx = f"tx-{uuid.uuid4().hex[:8]}"
    store.put("checkout", tx, PHOTO.read_bytes())
    subject = f"subj-{tx}"
    collection = RekognitionFaces(faces)
    watch, audit = TopicReader(settings, WATCHLIST), TopicReader(settings, AUDIT)
    service = spawn("jobs.faces.watchlist_service", settings, name="watchlist-service-rek-e2e")
    try:
        fraud = _command(settings, "FRAUD", tx)
        done = wait_for(lambda: _audits(audit).get(f"command:{fraud}"), 90, what="enroll audit")
        assert done.outcome == "DONE", done.reason
        assert done.details["rekognition_faces"] == "1" and done.details["image_ref"].startswith("s3://")
        assert len(collection.face_ids(subject)) == 1
        (entry,) = [WatchlistEntry.decode(v) for k, v in watch.poll() if k == subject.encode() and v]
        assert store.get(entry.reference_image_ref) == PHOTO.read_bytes()

        forget = _command(settings, "FORGET", subject)
        gone = wait_for(lambda: _audits(audit).get(f"command:{forget}"), 60, what="forget audit")
        assert gone.details["rekognition_faces_deleted"] == "1"
        assert (subject.encode(), None) in watch.poll()
        assert collection.face_ids(subject) == []
        assert store.find("reference", subject) is None and store.find("checkout", tx) is None
        assert {"IndexFaces", "DeleteFaces"} <= set(rek.calls)
    finally:
        service.stop()
        watch.close()
        audit.close()
        rek.stop()
        moto.stop()
