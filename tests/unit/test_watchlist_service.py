"""Watchlist service decisions (no Kafka): enroll, forget, retain, purge, failures -> audit + dead letter.
Commands are signed as the bot signs them; tests/unit/test_watchlist_auth.py covers the refusals."""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from infra.clients.image_store import LocalImageStore
from infra.command_auth import SIGNATURE_HEADER, authenticate_command, sign_command
from infra.settings import Settings, WebexSettings
from jobs.faces.engine import FaceEngine
from jobs.faces.stage import INSPECTION, checkout_image_key, inspection_image_key
from jobs.faces.watchlist_service import Source, WatchlistCore, retain_reason, retained_subject
from schemas.records import Alert, AuditEvent, BotCommand, DeadLetter, WatchlistEntry, input_headers
from schemas.topics import AUDIT, DEAD_LETTERS, WATCHLIST
from tests.builders import FACE_LEN

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="shared face photos (../shared/data/faces) absent")
NOW = 1_800_000_000_000
KEY = "unit-test-command-signing-key"
ALLOWED = "lp@example.com,dpo@example.com"
_ENGINE = None


@pytest.fixture
def core(tmp_path) -> WatchlistCore:
    global _ENGINE
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    settings = Settings(stack_dir=tmp_path, webex=webex)
    _ENGINE = _ENGINE or FaceEngine(settings.faces)
    return WatchlistCore(settings, engine=_ENGINE)


def command(verb: str, arg: str | None, cid: str = "c1", actor: str = "lp@example.com") -> Source:
    """The command as the bot publishes it: signed with the shared key."""
    cmd = BotCommand(command_id=cid, issued_at=NOW - 5000, verb=verb, actor=actor, argument=arg)
    headers = ((SIGNATURE_HEADER, sign_command(cmd, KEY)),)
    return Source("commands", 0, int(cid.strip("c") or 0), cid.encode(), cmd.encode(), headers)


def by_topic(outs):
    return {spec.name: [o for o in outs if o.topic == spec] for spec in (WATCHLIST, AUDIT, DEAD_LETTERS)}


def audit_of(outs) -> AuditEvent:
    (out,) = by_topic(outs)["audit"]
    return AuditEvent.decode(out.value)


def blank_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(buf, "JPEG")
    return buf.getvalue()


@needs_faces
def test_fraud_command_enrolls_the_face_of_the_transaction_snapshot(core):
    photo = (FACES / "face_recognition" / "test_images" / "obama.jpg").read_bytes()
    core.store.put("checkout", "tx-1", photo)
    outs = core.on_command(command("FRAUD", " tx-1 "), NOW)
    topics = by_topic(outs)
    (wl,) = topics["watchlist"]
    entry = WatchlistEntry.decode(wl.value)
    assert wl.key == b"subj-tx-1" and entry.subject_id == "subj-tx-1" and entry.category == "SUSPECT"
    assert len(entry.embeddings) == 1 and len(entry.embeddings[0]) == FACE_LEN
    assert entry.flagged_by == "lp@example.com" and entry.flagged_at == NOW - 5000
    assert entry.source_transaction_id == "tx-1" and core.store.get(entry.reference_image_ref) == photo
    assert entry.reference_image_ref == core.store.find("reference", "subj-tx-1")
    audit = audit_of(outs)
    assert (audit.action, audit.outcome, audit.subject_id) == ("ENROLL", "DONE", "subj-tx-1")
    assert audit.actor == "lp@example.com" and audit.command_id == "c1"
    assert not topics["dead_letters"]
    again = core.on_command(command("FRAUD", "tx-1", cid="c2"), NOW)
    assert not by_topic(again)["watchlist"] and audit_of(again).outcome == "UNCHANGED"
    vip = core.on_command(command("VIP", "tx-1", cid="c3"), NOW)
    assert WatchlistEntry.decode(by_topic(vip)["watchlist"][0].value).category == "VIP"
    assert audit_of(vip).details["previous_category"] == "SUSPECT"


def test_fraud_on_an_unknown_transaction_is_audited_and_dead_lettered(core):
    outs = core.on_command(command("FRAUD", "tx-missing"), NOW)
    topics = by_topic(outs)
    assert not topics["watchlist"]
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("unknown_transaction")
    (dl,) = topics["dead_letters"]
    letter = DeadLetter.decode(dl.value)
    assert letter.error_kind == "unknown_transaction" and letter.dead_letter_id == "commands:0:1"
    assert BotCommand.decode(letter.payload).argument == "tx-missing"


def test_a_failed_command_dead_letter_keeps_its_signature_so_a_redrive_is_still_the_bots(core):
    src = command("FRAUD", "tx-missing")
    (dl,) = by_topic(core.on_command(src, NOW))["dead_letters"]
    kept = input_headers(dl.headers)
    assert kept == tuple(src.headers)
    cmd = BotCommand.decode(DeadLetter.decode(dl.value).payload)
    authenticate_command(cmd, kept, core.settings.webex, NOW)  # the re-driven copy verifies


def test_fraud_without_a_face_in_the_snapshot_fails_with_no_face(core):
    core.store.put("checkout", "tx-2", blank_jpeg())
    outs = core.on_command(command("VIP", "tx-2"), NOW)
    assert audit_of(outs).outcome == "FAILED" and audit_of(outs).subject_id == "subj-tx-2"
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "no_face"
    core.store.put("checkout", "tx-3", b"\xff\xd8 truncated")
    outs = core.on_command(command("VIP", "tx-3", cid="c2"), NOW)
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "bad_image"


def test_missing_argument_and_garbage_commands_are_dead_lettered(core):
    assert audit_of(core.on_command(command("FORGET", "  "), NOW)).reason.startswith("missing_argument")
    outs = core.on_command(Source("commands", 0, 9, None, b"garbage"), NOW)
    assert [o.topic for o in outs] == [DEAD_LETTERS]
    assert core.on_command(command("STATUS", None), NOW) == [], "other verbs are not ours"


@needs_faces
def test_forget_removes_entry_images_and_alert_snapshots_of_the_subject(core):
    photo = (FACES / "face_recognition" / "test_images" / "obama.jpg").read_bytes()
    core.store.put("checkout", "tx-1", photo)
    core.on_command(command("FRAUD", "tx-1"), NOW)
    later = core.store.put("checkout", "tx-9", photo)
    other = core.store.put("checkout", "tx-10", photo)
    alert = Alert(
        alert_id="a-1",
        kind="WATCHLIST_MATCH",
        severity="HIGH",
        event_time=NOW,
        store_id="S1",
        summary="suspect at lane",
        subject_id="subj-tx-1",
        snapshot_ref=later,
    )
    retained = core.on_alert(Source("alerts", 0, 0, b"a-1", alert.encode()), NOW)
    assert audit_of(retained).action == "RETAIN" and core.store.retained() == {later: "subject=subj-tx-1 alert=a-1"}
    outs = core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    (tomb,) = by_topic(outs)["watchlist"]
    assert tomb.key == b"subj-tx-1" and tomb.value is None
    audit = audit_of(outs)
    assert (audit.action, audit.outcome, audit.details["images_deleted"]) == ("FORGET", "DONE", "3")
    assert core.store.find("reference", "subj-tx-1") is None and core.store.find("checkout", "tx-1") is None
    assert core.store.find("checkout", "tx-9") is None and core.store.get(other) == photo
    again = core.on_command(command("FORGET", "subj-tx-1", cid="c6"), NOW)
    assert audit_of(again).outcome == "UNCHANGED" and by_topic(again)["watchlist"][0].value is None


def test_alerts_without_snapshot_change_nothing_and_bad_refs_are_reported(core):
    plain = Alert(
        alert_id="a-2", kind="BLOCKED_TRANSACTION", severity="LOW", event_time=NOW, store_id="S1", summary="x"
    )
    assert core.on_alert(Source("alerts", 0, 1, None, plain.encode()), NOW) == []
    bad = Alert(
        alert_id="a-3",
        kind="BLOCKED_TRANSACTION",
        severity="LOW",
        event_time=NOW,
        store_id="S1",
        summary="x",
        snapshot_ref="s3://elsewhere/checkout/x",
    )
    outs = core.on_alert(Source("alerts", 0, 2, None, bad.encode()), NOW)
    assert audit_of(outs).outcome == "FAILED" and by_topic(outs)["dead_letters"]
    gone = Alert(
        alert_id="a-4",
        kind="BLOCKED_TRANSACTION",
        severity="LOW",
        event_time=NOW,
        store_id="S1",
        summary="x",
        snapshot_ref="file:checkout/tx-purged",
    )
    outs = core.on_alert(Source("alerts", 0, 3, None, gone.encode()), NOW)
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "missing_image"


def test_purge_is_audited_with_the_count(core):
    assert isinstance(core.store, LocalImageStore)
    ref = core.store.put("checkout", "tx-old", b"x")
    t = time.time() - 3 * 24 * 3600
    os.utime(core.store._path(ref), (t, t))
    outs = core.purge(int(time.time() * 1000))
    assert audit_of(outs).action == "PURGE" and audit_of(outs).details["deleted"] == "1"
    assert core.purge(int(time.time() * 1000)) == []


def test_an_alert_snapshot_goes_after_its_own_longer_period(core):
    """A blocked sale's or a dismissed match's snapshot (an innocent shopper's face) was kept for ever."""
    assert isinstance(core.store, LocalImageStore)
    enrol(core, "subj-tx-1")
    refs = []
    for n, (subject, age_days) in enumerate((("subj-tx-1", 93), (None, 93), (None, 89))):
        refs.append(ref := core.store.put("checkout", f"tx-sighting-{n}", b"x"))
        alert = Alert(
            alert_id=f"a-{n}",
            kind="WATCHLIST_MATCH" if subject else "BLOCKED_TRANSACTION",
            severity="HIGH",
            event_time=NOW,
            store_id="S1",
            summary="x",
            subject_id=subject,
            snapshot_ref=ref,
        )
        core.on_alert(Source("alerts", 0, n, None, alert.encode()), NOW)
        t = time.time() - age_days * 86_400
        os.utime(core.store._path(ref), (t, t))
    audit = audit_of(core.purge(int(time.time() * 1000)))
    assert (audit.action, audit.details["deleted"], audit.details["alert_snapshots_deleted"]) == ("PURGE", "0", "2")
    assert list(core.store.retained()) == [refs[2]]


def embedding_of(embedder: str) -> list[float]:
    """An embedding :func:`jobs.faces.engine.embedder_of` takes for ``embedder``'s (each network's part at its norm,
    weighted as the engine concatenates them), so the purge's re-embedding leaves an entry of it alone."""
    import numpy as np

    from jobs.faces.engine import PART_DIM, PARTS, SFACE_SCALE, WEIGHTS

    parts = []
    for part in PARTS[embedder]:
        norm = 1.4 if part == "dlib" else SFACE_SCALE
        parts.append(np.full(PART_DIM[part], norm / np.sqrt(PART_DIM[part])) * WEIGHTS.get(embedder, {}).get(part, 1.0))
    return [float(v) for v in np.concatenate(parts).astype(np.float32)]


def enrol(core: WatchlistCore, subject: str) -> None:
    """``subject`` on the watchlist as the service reads it back from its topic (no face photos needed; its
    embedding the configured embedder's, so the purge's re-embedding leaves it alone)."""
    entry = WatchlistEntry(
        subject_id=subject,
        category="SUSPECT",
        embeddings=[embedding_of(core.engine.embedder)],
        reason="test",
        flagged_by="lp@example.com",
        flagged_at=NOW - 86_400_000,
        reference_image_ref=core.store.put("reference", subject, b"reference photo"),
        source_transaction_id=subject.removeprefix("subj-"),
    )
    core.load(subject.encode(), entry.encode())


def sighting(subject: str, ref: str, alert_id: str = "a-1") -> Alert:
    return Alert(
        alert_id=alert_id,
        kind="WATCHLIST_MATCH",
        severity="HIGH",
        event_time=NOW - 60_000,
        store_id="S1",
        summary="suspect at lane",
        subject_id=subject,
        snapshot_ref=ref,
    )


def test_an_alert_of_a_forgotten_subject_read_after_the_forget_has_its_snapshot_deleted_not_retained(core):
    """``commands`` and ``alerts`` are read in no fixed order, and the job may score a match before it reads the
    tombstone: such an alert's snapshot (the forgotten subject's face) was retained for the alert's 92 days."""
    enrol(core, "subj-tx-1")
    core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    late = core.store.put("checkout", "tx-9", b"the subject at a lane")
    outs = core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", late).encode()), NOW)
    audit = audit_of(outs)
    assert (audit.audit_id, audit.action, audit.outcome, audit.subject_id) == (
        "retain:a-1",
        "PURGE",
        "DONE",
        "subj-tx-1",
    )
    assert audit.details["image_ref"] == late and not by_topic(outs)["dead_letters"]
    assert core.store.retained() == {} and core.store.find("checkout", "tx-9") is None
    assert core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", late).encode()), NOW) == []
    enrol(core, "subj-tx-2")  # an enrolled subject's alert is retained as before
    kept = core.store.put("checkout", "tx-10", b"the other subject")
    assert (
        audit_of(core.on_alert(Source("alerts", 0, 1, b"a-2", sighting("subj-tx-2", kept, "a-2").encode()), NOW)).action
        == "RETAIN"
    )
    assert core.store.retained() == {kept: "subject=subj-tx-2 alert=a-2"}


def test_forget_deletes_the_bots_checkout_pictures_of_the_enrolment_sale_and_fraud_cannot_enrol_them(core):
    """``checkout <tx>`` stores its own picture of the sale (the buyer's face): forget left it, and under the old key
    ``<tx>-inspect`` (a transaction id too) ``fraud tx-1-inspect`` enrolled the forgotten face again."""
    enrol(core, "subj-tx-1")
    core.store.put("checkout", checkout_image_key("tx-1"), b"the face stage's snapshot of the sale")
    core.store.put("checkout", inspection_image_key("tx-1"), b"checkout tx-1: footage of the sale")
    core.store.put("checkout", "tx-1-inspect", b"the same, stored before the key changed")
    live = core.store.put("checkout", inspection_image_key("tx-1", False), b"checkout tx-1: whoever stands there now")
    outs = core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    assert audit_of(outs).details["images_deleted"] == "4"  # the reference image and the three of the sale
    for key in ("tx-1", inspection_image_key("tx-1"), "tx-1-inspect"):
        assert core.store.find("checkout", key) is None, key
    assert core.store.get(live), "a live view is not the buyer's picture: purged with the other snapshots"
    core.store.put("checkout", inspection_image_key("tx-2"), b"checkout tx-2: footage of the sale")
    refused = core.on_command(command("FRAUD", f"tx-2{INSPECTION}", cid="c6"), NOW)
    assert audit_of(refused).outcome == "FAILED" and not by_topic(refused)["watchlist"]


def test_the_bots_checkout_is_audited_inspect_with_its_actor_and_transaction_once(core):
    """``checkout <tx>`` takes a picture of the sale's lane, keeps it and searches the watchlist with its face: that
    left only the ``commands`` record (7 d), where every enrolment, forget and sighting learnt is on ``audit``."""
    outs = core.on_command(command("CHECKOUT", "tx-9", cid="c9"), NOW)
    topics = by_topic(outs)
    assert topics["watchlist"] == [] and topics["dead_letters"] == []
    audit = audit_of(outs)
    assert (audit.audit_id, audit.action, audit.outcome) == ("command:c9", "INSPECT", "DONE")
    assert (audit.actor, audit.command_id, audit.transaction_id) == ("lp@example.com", "c9", "tx-9")
    assert audit.subject_id is None and "picture" in (audit.reason or "")
    assert core.on_command(command("CHECKOUT", "tx-9", cid="c9"), NOW) == [], "a replay is audited once"
    assert core.on_command(command("STATUS", None, cid="c10"), NOW) == [], "status processes no face"


def test_a_long_transaction_id_keeps_the_subject_in_the_retention_marker() -> None:
    """An S3 tag keeps 256 characters: with the alert id first, a 74-character id cut the subject off, so forget
    missed the subject's sightings."""
    tx = "t" * 128
    reason = retain_reason(f"watch:S1:subj-{tx}:{tx}:lane-1:1800000000000", f"subj-{tx}")
    assert retained_subject(reason[:256]) == f"subj-{tx}"
    assert retained_subject(retain_reason("a-1", None)) is None


def test_an_input_already_audited_is_skipped_when_replayed(core):
    first = core.on_command(command("FORGET", "subj-nobody", cid="c7"), NOW)
    assert audit_of(first).outcome == "UNCHANGED"
    assert core.on_command(command("FORGET", "subj-nobody", cid="c7"), NOW) == []
    fresh = WatchlistCore(core.settings, engine=core.engine)
    fresh.load_audit(b"command:c7")  # what the service reads back from the audit topic at startup
    assert fresh.on_command(command("FORGET", "subj-nobody", cid="c7"), NOW) == []


def test_startup_replay_rebuilds_the_known_subjects(core):
    entry = WatchlistEntry(
        subject_id="subj-a",
        category="VIP",
        embeddings=[[0.0] * FACE_LEN],
        reason="r",
        flagged_by="x",
        flagged_at=1,
        source_transaction_id="a",
    )
    core.load(b"subj-a", entry.encode())
    assert core.entries["subj-a"]["category"] == "VIP"
    core.load(b"subj-a", None)
    assert "subj-a" not in core.entries


def test_a_watchlist_record_that_does_not_decode_is_left_out_of_the_startup_replay_not_raised(core, caplog):
    """Raised out of the replay, it stopped every start of the service (the supervisor's restarts read it again, and
    no command was carried out); the entry read before for that key stays."""
    entry = WatchlistEntry(
        subject_id="subj-a",
        category="VIP",
        embeddings=[[0.0] * FACE_LEN],
        reason="r",
        flagged_by="x",
        flagged_at=1,
        source_transaction_id="a",
    )
    core.load(b"subj-a", entry.encode())
    core.load(b"subj-a", b"\x00not avro")
    core.load(b"\xff\xfe", entry.encode())
    core.load(b"subj-b", entry.encode()[:-3])
    assert core.entries == {"subj-a": {"category": "VIP", "source_transaction_id": "a"}}
    assert core.records["subj-a"] == entry
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 3 and left_out[0].startswith("watchlist record subj-a left out: it does not decode")


@needs_faces
def test_an_entry_of_another_embedder_is_enrolled_again_from_its_reference_image(tmp_path) -> None:
    """After CG_FACES__EMBEDDER changes (or its default does), the old entries would never match: the purge
    sweep re-embeds each from its reference image, once, audited; one without a usable image fails once."""
    import numpy as np

    from infra.settings import FaceSettings
    from jobs.faces.engine import embedder_of

    settings = Settings(stack_dir=tmp_path, faces=FaceSettings(embedder="sface"))
    core = WatchlistCore(settings, engine=FaceEngine(settings.faces), store=LocalImageStore(tmp_path / "images"))
    photo = (FACES / "face_recognition" / "test_images" / "obama.jpg").read_bytes()
    reference = core.store.put("reference", "subj-tx-1", photo)
    dlib_like = [[0.12] * 128, [0.11] * 128]  # norm ~1.36 / ~1.24: dlib's, with a learned template
    old = WatchlistEntry("subj-tx-1", "SUSPECT", dlib_like, "fraud", "lp@example.com", NOW, reference, "tx-1")
    broken = WatchlistEntry("subj-tx-2", "SUSPECT", [[0.12] * 128], "fraud", "lp@example.com", NOW, None, "tx-2")
    for entry in (old, broken):
        core.load(entry.subject_id.encode(), entry.encode())

    outs = core.reembed(NOW)
    [again] = [WatchlistEntry.decode(o.value) for o in by_topic(outs)["watchlist"]]
    assert again.subject_id == "subj-tx-1" and len(again.embeddings) == 1
    assert embedder_of(np.asarray(again.embeddings[0])) == "sface"
    assert (again.reference_image_ref, again.flagged_by, again.reason) == (reference, "lp@example.com", "fraud")
    audits = {a.subject_id: a for a in (AuditEvent.decode(o.value) for o in by_topic(outs)["audit"])}
    assert audits["subj-tx-1"].outcome == "DONE" and audits["subj-tx-1"].details["templates_dropped"] == "1"
    assert audits["subj-tx-2"].outcome == "FAILED" and "no_reference" in audits["subj-tx-2"].reason
    assert core.reembed(NOW + 1) == [], "done once; the failure is not audited again"


@needs_faces
def test_an_entry_without_embeddings_is_enrolled_from_its_reference_image_so_it_can_match(tmp_path) -> None:
    """An entry without embeddings never matches with the local backend, yet the re-embedding left it alone while
    ``LEARN`` added templates to it: it is enrolled from its reference image like an entry of another embedder."""
    import numpy as np

    from infra.settings import FaceSettings
    from jobs.faces.engine import embedder_of

    settings = Settings(stack_dir=tmp_path, faces=FaceSettings(embedder="sface"))
    core = WatchlistCore(settings, engine=FaceEngine(settings.faces), store=LocalImageStore(tmp_path / "images"))
    photo = (FACES / "face_recognition" / "test_images" / "obama.jpg").read_bytes()
    reference = core.store.put("reference", "subj-tx-1", photo)
    empty = WatchlistEntry("subj-tx-1", "SUSPECT", [], "fraud", "lp@example.com", NOW, reference, "tx-1")
    core.load(b"subj-tx-1", empty.encode())

    outs = core.reembed(NOW)
    [again] = [WatchlistEntry.decode(o.value) for o in by_topic(outs)["watchlist"]]
    assert len(again.embeddings) == 1 and embedder_of(np.asarray(again.embeddings[0])) == "sface"
    [audit] = [AuditEvent.decode(o.value) for o in by_topic(outs)["audit"]]
    assert (audit.action, audit.outcome, audit.details["templates_dropped"]) == ("REEMBED", "DONE", "0")
    assert core.reembed(NOW + 1) == [], "enrolled: nothing more to do"


def test_an_image_store_outage_is_retried_and_a_missing_s3_image_fails_once(tmp_path) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from infra.settings import FaceSettings

    settings = Settings(stack_dir=tmp_path, faces=FaceSettings(embedder="sface"))

    class Store:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def holds(self, ref: str) -> bool:
            return True

        def get(self, ref: str) -> bytes:
            raise self.error

    entry = WatchlistEntry("subj-tx-3", "SUSPECT", [[0.12] * 128], "fraud", "lp@example.com", NOW, "s3://b/r/k", "tx-3")
    outage = WatchlistCore(
        settings, engine=FaceEngine(settings.faces), store=Store(EndpointConnectionError(endpoint_url="x"))
    )  # type: ignore[arg-type]
    outage.load(b"subj-tx-3", entry.encode())
    assert outage.reembed(NOW) == [], "nothing audited: tried again at the next sweep"
    gone = ClientError({"Error": {"Code": "NoSuchKey", "Message": "gone"}}, "GetObject")
    missing = WatchlistCore(settings, engine=outage.engine, store=Store(gone))  # type: ignore[arg-type]
    missing.load(b"subj-tx-3", entry.encode())
    [failed] = [AuditEvent.decode(o.value) for o in missing.reembed(NOW)]
    assert failed.outcome == "FAILED" and "missing_image" in failed.reason
    assert missing.reembed(NOW + 1) == []


def test_an_s3_timeout_reading_a_reference_image_or_sighting_is_an_outage_not_a_missing_image(tmp_path) -> None:
    """botocore's timeouts are OSErrors: a timeout reading the reference image failed the re-enrolment for good
    (``missing_image``, never tried again, the entry never matching), and one reading a sighting failed ``LEARN``
    ``missing_image``, as if the image were gone."""
    from botocore.exceptions import ReadTimeoutError

    class TimingOut(LocalImageStore):
        def get(self, ref: str) -> bytes:
            raise ReadTimeoutError(endpoint_url="https://s3.example")

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    store = TimingOut(tmp_path / "images")
    core = WatchlistCore(Settings(stack_dir=tmp_path, webex=webex), engine=_SightingEngine(), store=store)  # type: ignore[arg-type]
    ref = store.put("reference", "subj-tx-3", b"the subject's face")
    entry = WatchlistEntry("subj-tx-3", "SUSPECT", [[0.12] * 4], "fraud", "lp@example.com", NOW, ref, "tx-3")
    core.load(b"subj-tx-3", entry.encode())
    assert core.reembed(NOW) == [], "nothing audited: tried again at the next sweep"
    assert "reembed-failed:subj-tx-3:sface" not in core.done
    sighting_ref = store.put("checkout", "tx-9", b"the subject at a lane")
    learn = audit_of(core.on_command(command("LEARN", f"subj-tx-3 {sighting_ref}", cid="c3"), NOW))
    assert learn.outcome == "FAILED" and learn.reason.startswith("command_error"), learn.reason


def test_the_watchlist_topic_gets_a_compaction_marker_once_a_segment(core) -> None:
    """A segment rolls only on a write: on a quiet topic a forgotten subject's entry (embeddings included) stayed
    readable from offset 0 until the next enrolment, since the forget's tombstone sat in the open segment."""
    from schemas.topics import COMPACTION_MARKER, HOUR_MS

    [marker] = [o for o in core.purge(NOW) if o.topic == WATCHLIST]
    assert (marker.key, marker.value) == (COMPACTION_MARKER, None)
    assert not [o for o in core.purge(NOW + HOUR_MS - 1) if o.topic == WATCHLIST], "once per segment.ms"
    assert [o.key for o in core.purge(NOW + HOUR_MS) if o.topic == WATCHLIST] == [COMPACTION_MARKER]
    core.load(COMPACTION_MARKER, None)  # read back like any tombstone: a key that never had an entry
    assert COMPACTION_MARKER.decode() not in core.entries


class _Engine:
    """Every image has one good face (the Rekognition tests need no photo)."""

    embedder = "sface"

    def best_face(self, data: bytes):
        from types import SimpleNamespace

        return SimpleNamespace(quality=0.9, embedding=[0.1] * FACE_LEN)


class _FailingRekognition:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def index(self, subject: str, image: object) -> list[str]:
        raise self.error

    def forget(self, subject: str) -> int:
        raise self.error


@pytest.mark.parametrize(
    ("code", "transient", "kind"),
    [
        ("ValidationException", False, "rekognition_refused"),
        ("AccessDeniedException", False, "rekognition_refused"),
        ("ThrottlingException", True, "rekognition_unavailable"),
    ],
)
def test_a_rekognition_error_fails_the_command_and_the_next_command_still_runs(tmp_path, code, transient, kind):
    """An AWS code outside a short list was raised out of on_command: the service stopped and, replaying the same
    command at every restart, never reached the commands behind it (a forget among them)."""
    from jobs.faces.rekognition import RekognitionError

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    rekognition = _FailingRekognition(RekognitionError(code, "no", transient))
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=LocalImageStore(tmp_path / "images"),
        rekognition=rekognition,  # type: ignore[arg-type]
    )
    core.store.put("checkout", "POS7+00042@store-001", blank_jpeg())
    outs = core.on_command(command("FRAUD", "POS7+00042@store-001", cid="c1"), NOW)
    assert not by_topic(outs)["watchlist"]
    audit = audit_of(outs)
    assert (audit.outcome, audit.reason.split(":")[0]) == ("FAILED", kind)
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == kind
    assert core.store.find("reference", "subj-POS7+00042@store-001") is None, "no reference image left behind"
    assert "subj-POS7+00042@store-001" not in core.records

    core.load(b"subj-tx-5", WatchlistEntry("subj-tx-5", "SUSPECT", [[0.1] * FACE_LEN], "r", "x", 1).encode())
    forgot = core.on_command(command("FORGET", "subj-tx-5", cid="c2"), NOW)
    assert audit_of(forgot).outcome == "FAILED" and not by_topic(forgot)["watchlist"]
    assert "subj-tx-5" in core.records, "still enrolled, not half forgotten: a new forget finishes it"
    rekognition.forget = lambda subject: 1  # type: ignore[method-assign]
    again = core.on_command(command("FORGET", "subj-tx-5", cid="c3"), NOW)
    assert audit_of(again).outcome == "DONE" and by_topic(again)["watchlist"][0].value is None
    assert "subj-tx-5" not in core.records


def test_a_rekognition_call_given_up_at_the_stop_is_raised_not_audited_as_a_failed_command(tmp_path):
    """A call given up at the stop's deadline is no failure of the command: audited FAILED and dead-lettered, it was
    done for (issue it again); raised, its command stays uncommitted and the next start carries it out. An expiry given
    up so is not marked failed either: the next start's purge expires the entry."""
    from infra.clients.transactional import TransactionGivenUp

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=LocalImageStore(tmp_path / "images"),
        rekognition=_FailingRekognition(TransactionGivenUp("Rekognition did not finish its list_faces")),  # type: ignore[arg-type]
    )
    core.store.put("checkout", "POS7+00042@store-001", blank_jpeg())
    with pytest.raises(TransactionGivenUp):
        core.on_command(command("FRAUD", "POS7+00042@store-001", cid="c1"), NOW)
    assert "subj-POS7+00042@store-001" not in core.records
    core.load(b"subj-tx-5", WatchlistEntry("subj-tx-5", "SUSPECT", [[0.1] * FACE_LEN], "r", "x", 1).encode())
    with pytest.raises(TransactionGivenUp):
        core.on_command(command("FORGET", "subj-tx-5", cid="c2"), NOW)
    with pytest.raises(TransactionGivenUp):
        core.expire(NOW + 10**15)
    assert "subj-tx-5" in core.records, "still enrolled: the forget and the expiry are carried out again"


class _GivingUpStore(LocalImageStore):
    """A local store whose calls named in ``given_up`` are given up at the stop, as an S3 call under way then is."""

    given_up: frozenset[str] = frozenset()

    def _maybe_given_up(self, call: str) -> None:
        from infra.clients.transactional import TransactionGivenUp

        if call in self.given_up:
            raise TransactionGivenUp(f"S3 did not finish its {call} before the supervisor's stop timeout")

    def find(self, kind: str, key: str) -> str | None:
        self._maybe_given_up("find")
        return super().find(kind, key)

    def get(self, ref: str) -> bytes:
        self._maybe_given_up("get")
        return super().get(ref)

    def delete(self, ref: str) -> None:
        self._maybe_given_up("delete")
        super().delete(ref)

    def retain(self, ref: str, reason: str) -> None:
        self._maybe_given_up("retain")
        super().retain(ref, reason)

    def purge(self, older_than_ms: int, keep: frozenset[str] = frozenset()) -> int:
        self._maybe_given_up("purge")
        return super().purge(older_than_ms, keep)


def _forget(core: WatchlistCore) -> object:
    enrol(core, "subj-tx-1")
    return core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)


def _retain(core: WatchlistCore) -> object:
    enrol(core, "subj-tx-1")
    ref = core.store.put("checkout", "tx-9", b"the subject at a lane")
    return core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", ref).encode()), NOW)


def _drop_forgottens_snapshot(core: WatchlistCore) -> object:
    ref = core.store.put("checkout", "tx-9", b"the subject at a lane")
    return core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", ref).encode()), NOW)


def _change_category(core: WatchlistCore) -> object:
    former = core.store.put("reference", "an-earlier-key", b"reference photo")
    entry = WatchlistEntry("subj-tx-1", "SUSPECT", [[0.1] * 4], "r", "x", NOW, former, "tx-1")
    core.load(b"subj-tx-1", entry.encode())
    core.store.put("checkout", "tx-1", blank_jpeg())
    return core.on_command(command("VIP", "tx-1"), NOW)


def _enrol_refused_by_rekognition(core: WatchlistCore) -> object:
    from jobs.faces.rekognition import RekognitionError

    core.rekognition = _FailingRekognition(RekognitionError("ValidationException", "no", False))  # type: ignore[assignment]
    core.store.put("checkout", "tx-1", blank_jpeg())
    return core.on_command(command("FRAUD", "tx-1"), NOW)


def _reembed(core: WatchlistCore) -> object:
    ref = core.store.put("reference", "subj-tx-1", b"reference photo")
    core.load(b"subj-tx-1", WatchlistEntry("subj-tx-1", "SUSPECT", [[0.1] * 4], "r", "x", NOW, ref, "tx-1").encode())
    return core.purge(NOW)


@pytest.mark.parametrize(
    ("given_up", "act"),
    [
        ("find", _forget),  # looking for the subject's images
        ("delete", _forget),  # deleting them
        ("retain", _retain),  # an alert's snapshot
        ("delete", _drop_forgottens_snapshot),  # an alert's snapshot of a forgotten subject
        ("delete", _change_category),  # the former reference image of a subject enrolled again
        ("delete", _enrol_refused_by_rekognition),  # the reference image of an enrolment that failed
        ("purge", lambda core: core.purge(NOW)),  # the retention sweep
        ("get", _reembed),  # the reference image of an entry of another embedder
    ],
)
def test_an_image_store_call_given_up_at_the_stop_is_raised_never_audited_or_swept_past(tmp_path, given_up, act):
    """An S3 call under way at a stop is given up at the stop's deadline (``TransactionGivenUp``) as a Rekognition call
    is, so that its command, alert or sweep is not committed and the next start does it again. Caught as any store
    error, it was audited ``FAILED`` and dead-lettered (done for: issue it again), or the sweep went on to the next
    store and published what it had."""
    from infra.clients.transactional import TransactionGivenUp

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    store = _GivingUpStore(tmp_path / "images")
    core = WatchlistCore(Settings(stack_dir=tmp_path, webex=webex), engine=_Engine(), store=store)  # type: ignore[arg-type]
    store.given_up = frozenset({given_up})
    with pytest.raises(TransactionGivenUp):
        act(core)


def test_any_other_failure_of_a_command_is_audited_and_dead_lettered_not_raised(tmp_path):
    class BrokenStore(LocalImageStore):
        def find(self, kind: str, key: str) -> str | None:
            raise ConnectionError("image store down")

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=BrokenStore(tmp_path / "images"),
    )
    outs = core.on_command(command("FRAUD", "tx-1"), NOW)
    assert audit_of(outs).outcome == "FAILED" and audit_of(outs).reason.startswith("command_error: ConnectionError")
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "command_error"


def test_with_the_rekognition_backend_an_entry_of_another_embedder_is_still_enrolled_again(tmp_path) -> None:
    """Matching is local with either backend: re-embedding was off for Rekognition, so after an embedder change its
    entries never matched again."""
    import numpy as np

    from infra.settings import FaceSettings
    from jobs.faces.engine import SFACE_SCALE, embedder_of

    class SFaceEngine(_Engine):
        def best_face(self, data: bytes):
            from types import SimpleNamespace

            return SimpleNamespace(quality=0.9, embedding=[SFACE_SCALE / np.sqrt(128)] * 128)

    settings = Settings(stack_dir=tmp_path, faces=FaceSettings(embedder="sface", backend="rekognition"))
    core = WatchlistCore(
        settings,
        engine=SFaceEngine(),  # type: ignore[arg-type]
        store=LocalImageStore(tmp_path / "images"),
        rekognition=_FailingRekognition(AssertionError("the collection keeps its own faces")),  # type: ignore[arg-type]
    )
    reference = core.store.put("reference", "subj-tx-1", blank_jpeg())
    old = WatchlistEntry("subj-tx-1", "SUSPECT", [[0.12] * 128], "fraud", "lp@example.com", NOW, reference, "tx-1")
    core.load(b"subj-tx-1", old.encode())
    [again] = [WatchlistEntry.decode(o.value) for o in by_topic(core.reembed(NOW))["watchlist"]]
    assert embedder_of(np.asarray(again.embeddings[0])) == "sface"


class _Indexing:
    """A Rekognition client whose collection keeps the image each face was indexed from; ``fail`` raises from
    IndexFaces (an error of no AWS kind)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.images: list[bytes] = []
        self.fail = fail

    def list_faces(self, **_: object) -> dict:
        return {"Faces": []}

    def index_faces(self, Image: dict, ExternalImageId: str, **_: object) -> dict:  # noqa: N803
        if self.fail is not None:
            raise self.fail
        if len(Image["Bytes"]) > 5 * 1024 * 1024:
            raise AssertionError("Rekognition refuses image bytes over 5 MB")
        self.images.append(Image["Bytes"])
        return {"FaceRecords": [{"Face": {"FaceId": f"face-{len(self.images)}"}}]}


class _BoxedEngine(_Engine):
    def best_face(self, data: bytes):
        from types import SimpleNamespace

        return SimpleNamespace(quality=0.9, embedding=[0.1] * FACE_LEN, box=(100, 100, 200, 200), scale=0.25)


def test_an_enrolment_over_rekognitions_5_mb_indexes_the_face_and_a_failed_one_leaves_no_reference_image(tmp_path):
    """With local images and the Rekognition backend a snapshot over 5 MB (a camera may send 8) failed every
    enrolment with a ValueError, and only a Rekognition error removed the reference image already written: the
    picture of someone not enrolled stayed, where only a forget ever deletes reference images."""
    import numpy as np

    from infra.settings import FaceSettings
    from jobs.faces.rekognition import RekognitionFaces

    noise = np.random.default_rng(0).integers(0, 255, (2400, 3200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    big = buf.getvalue()
    assert 5 * 1024 * 1024 < len(big) <= FaceSettings().max_image_bytes

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    faces = FaceSettings(backend="rekognition")
    for client, outcome in ((_Indexing(), "DONE"), (_Indexing(fail=RuntimeError("boom")), "FAILED")):
        root = tmp_path / outcome
        core = WatchlistCore(
            Settings(stack_dir=root, webex=webex, faces=faces),
            engine=_BoxedEngine(),  # type: ignore[arg-type]
            store=LocalImageStore(root / "images"),
            rekognition=RekognitionFaces(faces, client=client),
        )
        core.store.put("checkout", "tx-1", big)
        outs = core.on_command(command("FRAUD", "tx-1"), NOW)
        assert audit_of(outs).outcome == outcome, audit_of(outs).reason
        if outcome == "DONE":
            (indexed,) = client.images
            with Image.open(io.BytesIO(indexed)) as crop:
                assert crop.size == (801, 801), "the enrolled face (400 px in the original) with half a box around it"
        else:
            assert audit_of(outs).reason.startswith("command_error: RuntimeError")
            assert core.store.find("reference", "subj-tx-1") is None, "no reference image of someone not enrolled"
            assert "subj-tx-1" not in core.records


@pytest.fixture(scope="module")
def moto_url():
    """An S3 (moto) server for the image store switched to."""
    from moto.server import ThreadedMotoServer

    from tests.unit.test_image_store import _free_port

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=(port := _free_port()))
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _switched(moto_url: str, tmp_path: Path, **faces: object) -> Settings:
    """Settings of a deployment whose image store is now S3 (fresh buckets), signed commands as ``core``'s."""
    from tests.unit.test_image_store import _s3_settings

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    return Settings(stack_dir=tmp_path, faces=_s3_settings(moto_url, tmp_path, **faces).faces, webex=webex)


def _enrolled(settings: Settings, ref: str) -> WatchlistCore:
    from infra.clients.image_store import S3ImageStore

    store = S3ImageStore(settings)
    store.ensure_buckets()
    core = WatchlistCore(settings, engine=object(), store=store)  # type: ignore[arg-type]  # forget needs no engine
    entry = WatchlistEntry("subj-tx-1", "SUSPECT", [[0.1] * 4], "fraud", "lp@example.com", NOW, ref, "tx-1")
    core.load(b"subj-tx-1", entry.encode())
    return core


def test_forget_after_a_switch_to_s3_deletes_the_reference_image_from_the_local_store_it_was_written_to(
    moto_url, tmp_path
):
    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    outs = core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    audit = audit_of(outs)
    assert (audit.outcome, audit.details["images_deleted"]) == ("DONE", "1")
    assert local.find("reference", "subj-tx-1") is None, "the biometric image stayed in the old store"


def test_forget_of_a_reference_image_in_a_bucket_no_longer_configured_is_failed_not_done_until_it_is(
    moto_url, tmp_path
):
    from infra.clients.image_store import S3ImageStore

    old = S3ImageStore(_switched(moto_url, tmp_path))
    old.ensure_buckets()
    ref = old.put("reference", "subj-tx-1", b"the subject's face")
    old_bucket = ref.split("/")[2]
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    outs = core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_unavailable")
    assert old_bucket in audit.reason and "CG_FACES__EXTRA_IMAGE_BUCKETS" in audit.reason
    assert by_topic(outs)["watchlist"] == [] and by_topic(outs)["dead_letters"]
    assert old.get(ref) == b"the subject's face" and "subj-tx-1" in core.records, "still enrolled: issue it again"
    configured = _enrolled(_switched(moto_url, tmp_path, extra_image_buckets=old_bucket), ref)
    again = configured.on_command(command("FORGET", "subj-tx-1", cid="c6", actor="dpo@example.com"), NOW)
    assert audit_of(again).outcome == "DONE" and old.find("reference", "subj-tx-1") is None


def test_forget_after_switches_deletes_the_subjects_snapshots_from_the_local_store_and_a_former_bucket(
    moto_url, tmp_path
):
    """After a switch to S3 (or to another bucket) forget looked for the enrolment snapshot, the bot's pictures of the
    sale and the alert snapshots only in the current store: the copies in the old one stayed after the erasure."""
    from infra.clients.image_store import S3ImageStore

    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    enrolment = local.put("checkout", checkout_image_key("tx-1"), b"the sale")
    local_alert = local.put("checkout", "tx-9", b"the subject at a lane")
    local.retain(local_alert, retain_reason("a-1", "subj-tx-1"))
    someone_else = local.put("checkout", "tx-10", b"another shopper")
    local.retain(someone_else, retain_reason("a-2", None))
    old = S3ImageStore(_switched(moto_url, tmp_path))
    old.ensure_buckets()
    old_bucket = old.buckets["checkout"]
    inspection = old.put("checkout", inspection_image_key("tx-1"), b"checkout tx-1: footage of the sale")
    old_alert = old.put("checkout", "tx-11", b"the subject at another lane")
    old.retain(old_alert, retain_reason("a-3", "subj-tx-1"))
    core = _enrolled(_switched(moto_url, tmp_path, extra_image_buckets=old_bucket), ref)
    outs = core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    audit = audit_of(outs)
    assert (audit.outcome, audit.details["images_deleted"]) == ("DONE", "5"), audit.reason
    assert local.find("reference", "subj-tx-1") is None and local.find("checkout", "tx-1") is None
    assert local.retained() == {someone_else: "subject=- alert=a-2"}, "the subject's alert snapshot stayed"
    for gone in (inspection, old_alert):
        key = gone.rsplit("/", 1)[1]
        assert old.find("checkout", key) is None, f"{gone} stayed in the former bucket"
    assert local.get(someone_else) == b"another shopper" and enrolment.startswith("file:")


def test_the_retention_purge_after_switches_deletes_old_snapshots_in_the_local_store_and_a_former_bucket(
    moto_url, tmp_path
):
    """The purge swept the current store only: after a switch to S3, or to other buckets, the snapshots that matched
    nobody and the alert snapshots past their period stayed in the old store for ever."""
    from infra.clients.image_store import S3ImageStore

    local = LocalImageStore(tmp_path / "images")
    local_snapshot = local.put("checkout", "tx-1", b"a shopper")
    local_alert = local.put("checkout", "tx-2", b"a shopper an alert named")
    local.retain(local_alert, retain_reason("a-1", None))
    reference = local.put("reference", "subj-tx-0", b"an enrolled face")
    old = S3ImageStore(_switched(moto_url, tmp_path))
    old.ensure_buckets()
    old_snapshot = old.put("entrance", "e-1", b"a shopper at the door")
    old_alert = old.put("checkout", "tx-3", b"another shopper an alert named")
    old.retain(old_alert, retain_reason("a-2", None))
    settings = _switched(moto_url, tmp_path, extra_image_buckets=f"{old.buckets['checkout']},gone-{NOW}")
    current = S3ImageStore(settings)
    current.ensure_buckets()
    core = WatchlistCore(settings, engine=_Engine(), store=current)  # type: ignore[arg-type]
    day = 86_400_000
    audit = audit_of(core.purge(int(time.time() * 1000) + 2 * day))
    assert (audit.details["deleted"], audit.details["alert_snapshots_deleted"]) == ("2", "0")
    assert "gone-" in audit.details["not_swept"], "a bucket that cannot be swept is named, the others are swept"
    assert local.find("checkout", "tx-1") is None and old.find("entrance", "e-1") is None, "kept past retention"
    assert local.retained() == {local_alert: "subject=- alert=a-1"} and list(old.retained()) == [old_alert]
    audit = audit_of(core.purge(int(time.time() * 1000) + 93 * day))
    assert (audit.details["deleted"], audit.details["alert_snapshots_deleted"]) == ("0", "2")
    assert local.retained() == {} and old.retained() == {}, "alert snapshots kept past their period"
    assert local.get(reference) == b"an enrolled face", "reference images are never purged"
    assert local_snapshot.startswith("file:") and old_snapshot.startswith("s3://")


def test_alert_snapshots_taken_before_a_switch_are_retained_or_deleted_in_the_store_they_are_in(moto_url, tmp_path):
    """An alert's snapshot was retained, or deleted for a forgotten subject, through the current store only: a
    snapshot in the old store failed bad_ref, and the forgotten subject's face stayed there."""
    from infra.clients.image_store import S3ImageStore

    local = LocalImageStore(tmp_path / "images")
    kept = local.put("checkout", "tx-9", b"the subject at a lane")
    old = S3ImageStore(_switched(moto_url, tmp_path))
    old.ensure_buckets()
    late = old.put("checkout", "tx-10", b"a forgotten subject at a lane")
    core = _enrolled(_switched(moto_url, tmp_path, extra_image_buckets=old.buckets["checkout"]), "")
    outs = core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", kept).encode()), NOW)
    assert (audit_of(outs).action, audit_of(outs).outcome) == ("RETAIN", "DONE"), audit_of(outs).reason
    assert local.retained() == {kept: "subject=subj-tx-1 alert=a-1"}, "purged as if no alert named it"
    outs = core.on_alert(Source("alerts", 0, 1, b"a-2", sighting("subj-tx-2", late, "a-2").encode()), NOW)
    assert (audit_of(outs).action, audit_of(outs).outcome) == ("PURGE", "DONE"), audit_of(outs).reason
    assert old.find("checkout", "tx-10") is None, "the forgotten subject's face stayed in the former bucket"
    elsewhere = "s3://former-bucket/checkout/tx-11"
    outs = core.on_alert(Source("alerts", 0, 2, b"a-3", sighting("subj-tx-2", elsewhere, "a-3").encode()), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_unavailable")
    assert "former-bucket" in audit.reason and "CG_FACES__EXTRA_IMAGE_BUCKETS" in audit.reason, "says what to set"
    hostile = "s3://x\nFORGET done/checkout/tx-12"  # a ref comes in a record: only a bucket name is quoted
    outs = core.on_alert(Source("alerts", 0, 3, b"a-4", sighting("subj-tx-1", hostile, "a-4").encode()), NOW)
    assert "FORGET" not in audit_of(outs).reason and "(not a bucket name)" in audit_of(outs).reason


def test_a_change_of_category_after_a_switch_deletes_the_former_reference_image_in_the_old_store(moto_url, tmp_path):
    """``vip <tx>`` of a suspect enrolled before a switch to S3 wrote a new reference image there and replaced the
    entry naming the old one: the image in the old store was named by nothing any more and stayed for ever."""
    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    core.engine = _Engine()  # type: ignore[assignment]
    core.store.put("checkout", "tx-1", b"the sale")
    outs = core.on_command(command("VIP", "tx-1", cid="c5"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "DONE", audit.reason
    assert local.find("reference", "subj-tx-1") is None, "the former reference image stayed in the local store"
    assert audit.details["previous_image_ref_deleted"] == ref
    (entry,) = [WatchlistEntry.decode(o.value) for o in by_topic(outs)["watchlist"]]
    assert entry.category == "VIP" and entry.reference_image_ref == core.store.find("reference", "subj-tx-1")


def test_a_change_of_category_whose_former_image_delete_fails_leaves_no_new_reference_image(
    moto_url, tmp_path, monkeypatch
):
    """The command failed with the entry unchanged, but the new reference image it had written stayed in the current
    store, named by no entry: a second biometric image of the subject."""
    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    core.engine = _Engine()  # type: ignore[assignment]
    core.store.put("checkout", "tx-1", b"the sale")

    def away(self: LocalImageStore, ref: str) -> None:
        raise PermissionError("the old store refuses")

    monkeypatch.setattr(LocalImageStore, "delete", away)
    outs = core.on_command(command("VIP", "tx-1", cid="c5"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_unavailable"), audit.reason
    assert "was deleted; the entry is unchanged" in audit.reason and by_topic(outs)["watchlist"] == []
    assert core.store.find("reference", "subj-tx-1") is None, "the new reference image stayed, named by no entry"
    assert local.get(ref) == b"the subject's face" and core.records["subj-tx-1"].reference_image_ref == ref
    monkeypatch.undo()
    assert audit_of(core.on_command(command("VIP", "tx-1", cid="c6"), NOW)).outcome == "DONE", "issued again"
    assert local.find("reference", "subj-tx-1") is None and core.store.find("reference", "subj-tx-1") is not None


def test_a_forget_whose_image_delete_fails_leaves_the_rekognition_faces_says_what_is_left_and_finishes_later(
    tmp_path,
):
    """forget deleted the Rekognition faces before the images: S3 failing on an image left the subject on the
    watchlist but gone from Rekognition (matched by one index, forgotten by the other), and the audit said nothing
    of what was done."""

    class FlakyStore(LocalImageStore):
        down = True

        def delete(self, ref: str) -> None:
            if self.down and ref.startswith("file:checkout/"):
                raise ConnectionError("S3 is away")
            super().delete(ref)

    class Collection:
        faces = 2

        def forget(self, subject: str) -> int:
            deleted, self.faces = self.faces, 0
            return deleted

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    store = FlakyStore(tmp_path / "images")
    collection = Collection()
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=store,
        rekognition=collection,  # type: ignore[arg-type]
    )
    enrol(core, "subj-tx-1")
    snapshot = store.put("checkout", "tx-1", b"the sale")
    failed = audit_of(core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW))
    assert failed.outcome == "FAILED" and failed.reason.startswith("image_store_unavailable")
    assert collection.faces == 2, "gone from Rekognition while still on the watchlist"
    assert f"left: {snapshot}, its Rekognition faces, its watchlist entry" in failed.reason
    assert "subj-tx-1" in core.records and store.find("reference", "subj-tx-1") is None
    store.down = False
    done = audit_of(core.on_command(command("FORGET", "subj-tx-1", cid="c6", actor="dpo@example.com"), NOW))
    assert (done.outcome, done.details["rekognition_faces_deleted"]) == ("DONE", "2")
    assert store.find("checkout", "tx-1") is None and "subj-tx-1" not in core.records


def test_an_entry_enrolled_before_a_switch_to_s3_is_enrolled_again_from_its_reference_image_in_the_local_store(
    moto_url, tmp_path
):
    """Re-embedding read the reference image in the current store only: after a switch to S3 every entry enrolled
    before it failed for good as missing_image and never matched again."""
    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    core.engine = _Engine()  # type: ignore[assignment]
    core.load(b"subj-tx-1", replace(core.records["subj-tx-1"], embeddings=[[0.12] * 128]).encode())
    elsewhere = WatchlistEntry("subj-tx-2", "VIP", [[0.12] * 128], "vip", "lp@example.com", NOW, "s3://old/reference/k")
    core.load(b"subj-tx-2", elsewhere.encode())
    outs = core.reembed(NOW)
    audit = audit_of(outs)  # one: subj-tx-2's bucket is not configured, a setting to fix, so it waits, not failed
    assert audit.outcome == "DONE", audit.reason
    (entry,) = [WatchlistEntry.decode(o.value) for o in by_topic(outs)["watchlist"]]
    assert len(entry.embeddings) == 1 and entry.embeddings[0] == pytest.approx([0.1] * FACE_LEN)
    assert entry.reference_image_ref == ref


def test_a_change_of_category_after_a_switch_whose_rekognition_indexing_fails_leaves_no_new_reference_image(
    moto_url, tmp_path
):
    """``vip <tx>`` of a suspect enrolled before a switch wrote the new reference image in the current store, and when
    IndexFaces then failed the command failed with the entry naming the old image: the new one stayed, named by
    nothing, and no forget or expiry ever deleted it."""
    from jobs.faces.rekognition import RekognitionError

    local = LocalImageStore(tmp_path / "images")
    ref = local.put("reference", "subj-tx-1", b"the subject's face")
    core = _enrolled(_switched(moto_url, tmp_path), ref)
    core.engine = _Engine()  # type: ignore[assignment]
    core.rekognition = _FailingRekognition(RekognitionError("ThrottlingException", "slow down", True))  # type: ignore[assignment]
    core.store.put("checkout", "tx-1", b"the sale")
    outs = core.on_command(command("VIP", "tx-1", cid="c5"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("rekognition_unavailable"), audit.reason
    assert core.store.find("reference", "subj-tx-1") is None, "the new reference image stayed, named by no entry"
    assert local.get(ref) == b"the subject's face" and core.records["subj-tx-1"].reference_image_ref == ref
    assert core.records["subj-tx-1"].category == "SUSPECT" and by_topic(outs)["watchlist"] == []


def test_a_failed_change_of_category_in_the_same_store_keeps_the_image_its_entry_names(tmp_path):
    """The new reference image is written under the subject's key: in the store the entry names it is that same
    image, which a failed change must not delete."""
    from jobs.faces.rekognition import RekognitionError

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    store = LocalImageStore(tmp_path / "images")
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=store,
        rekognition=_FailingRekognition(RekognitionError("ThrottlingException", "slow down", True)),  # type: ignore[arg-type]
    )
    ref = store.put("reference", "subj-tx-1", b"the subject's face")
    entry = WatchlistEntry("subj-tx-1", "SUSPECT", [[0.1] * FACE_LEN], "fraud", "lp@example.com", NOW, ref, "tx-1")
    core.load(b"subj-tx-1", entry.encode())
    store.put("checkout", "tx-1", b"the sale")
    assert audit_of(core.on_command(command("VIP", "tx-1", cid="c5"), NOW)).outcome == "FAILED"
    assert store.find("reference", "subj-tx-1") == ref == core.records["subj-tx-1"].reference_image_ref


def test_a_failed_indexing_whose_new_image_cannot_be_deleted_is_still_failed_for_rekognitions_error(tmp_path, caplog):
    """When deleting the new reference image after a failed IndexFaces failed too, that error replaced Rekognition's:
    the audit and dead letter named the image store, not the cause. The cause stays, and the image left is said too."""
    import logging

    from jobs.faces.rekognition import RekognitionError

    class Undeletable(LocalImageStore):
        def delete(self, ref: str) -> None:
            raise PermissionError("read-only")

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    store = Undeletable(tmp_path / "images")
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex),
        engine=_Engine(),  # type: ignore[arg-type]
        store=store,
        rekognition=_FailingRekognition(RekognitionError("ThrottlingException", "slow down", True)),  # type: ignore[arg-type]
    )
    store.put("checkout", checkout_image_key("tx-1"), b"the sale")
    with caplog.at_level(logging.WARNING, logger="jobs.faces.watchlist_service"):
        outs = core.on_command(command("FRAUD", "tx-1", cid="c5"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("rekognition_unavailable"), audit.reason
    assert "not deleted (PermissionError) and stays" in audit.reason
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "rekognition_unavailable"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "subj-tx-1" in r.getMessage()]
    assert warned and all("the sale" not in r.getMessage() for r in caplog.records)


class _SightingEngine(_Engine):
    def analyse(self, data: bytes):
        from types import SimpleNamespace

        return [SimpleNamespace(passed=True, quality=0.9, embedding=[0.2] * FACE_LEN, box=(1, 1, 9, 9), scale=1.0)]


def test_fraud_and_learn_after_switches_find_the_sale_and_the_sighting_in_the_former_stores(moto_url, tmp_path):
    """``fraud <tx>`` / ``vip <tx>`` looked for the sale's snapshot, and ``LEARN`` read the confirmed sighting, in the
    current store only: after a switch of the image store or its bucket a sale or sighting taken before it was
    "no checkout snapshot" (unknown_transaction) or missing_image, though forget finds them there."""
    from infra.clients.image_store import S3ImageStore

    local = LocalImageStore(tmp_path / "images")
    local.put("checkout", checkout_image_key("tx-1"), b"the sale, before the switch to S3")
    sighting_ref = local.put("checkout", "tx-9", b"the subject at a lane, before the switch")
    old = S3ImageStore(_switched(moto_url, tmp_path))
    old.ensure_buckets()
    old.put("checkout", checkout_image_key("tx-2"), b"another sale, in the former bucket")
    settings = _switched(moto_url, tmp_path, extra_image_buckets=old.buckets["checkout"])
    current = S3ImageStore(settings)
    current.ensure_buckets()
    core = WatchlistCore(settings, engine=_SightingEngine(), store=current)  # type: ignore[arg-type]
    for cid, tx in (("c1", "tx-1"), ("c2", "tx-2")):
        outs = core.on_command(command("FRAUD", tx, cid=cid), NOW)
        assert audit_of(outs).outcome == "DONE", audit_of(outs).reason
        (entry,) = [WatchlistEntry.decode(o.value) for o in by_topic(outs)["watchlist"]]
        assert entry.reference_image_ref == current.find("reference", f"subj-{tx}"), "written in the current store"
    outs = core.on_command(command("LEARN", f"subj-tx-1 {sighting_ref}", cid="c3"), NOW)
    assert audit_of(outs).outcome == "DONE", audit_of(outs).reason
    assert len(core.records["subj-tx-1"].embeddings) == 2
    unknown = audit_of(core.on_command(command("FRAUD", "tx-3", cid="c4"), NOW))
    assert unknown.outcome == "FAILED" and unknown.reason.startswith("unknown_transaction"), unknown.reason
    elsewhere = audit_of(core.on_command(command("LEARN", "subj-tx-1 s3://gone-bucket/checkout/tx-5", cid="c5"), NOW))
    assert (
        elsewhere.reason.startswith("image_store_unavailable") and "CG_FACES__EXTRA_IMAGE_BUCKETS" in elsewhere.reason
    )


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_sighting_or_sale_snapshot_that_is_gone_fails_missing_image_with_either_store(kind, moto_url, tmp_path):
    """S3's ``NoSuchKey`` on reading a confirmed sighting (``LEARN``) or a sale's snapshot found a moment before (then
    purged) failed the command ``command_error``, where the local store's missing file was ``missing_image``."""
    from infra.clients.image_store import ImageStore, S3ImageStore

    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people=ALLOWED)
    settings = _switched(moto_url, tmp_path) if kind == "s3" else Settings(stack_dir=tmp_path, webex=webex)
    store = ImageStore.from_settings(settings)
    if isinstance(store, S3ImageStore):
        store.ensure_buckets()
    core = WatchlistCore(settings, engine=_SightingEngine(), store=store)  # type: ignore[arg-type]
    enrol(core, "subj-tx-1")
    sighting_ref = store.put("checkout", "tx-9", b"the subject at a lane")
    store.delete(sighting_ref)
    outs = core.on_command(command("LEARN", f"subj-tx-1 {sighting_ref}", cid="c3"), NOW)
    assert audit_of(outs).reason.startswith("missing_image"), audit_of(outs).reason
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "missing_image"
    sale = store.put("checkout", checkout_image_key("tx-2"), b"the sale")
    store.delete(sale)
    store.find = lambda kind, key: sale  # type: ignore[method-assign]  # found, then purged before the read
    outs = core.on_command(command("FRAUD", "tx-2", cid="c4"), NOW)
    assert audit_of(outs).reason.startswith("missing_image"), audit_of(outs).reason
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "missing_image"


def test_fraud_fails_image_store_unavailable_when_a_former_store_cannot_be_searched(moto_url, tmp_path, monkeypatch):
    """A sale not in the current store may be in a former bucket that S3 cannot reach now: not an unknown sale."""
    from infra.clients.image_store import S3ImageStore

    settings = _switched(moto_url, tmp_path, extra_image_buckets=f"gone-{NOW}")
    current = S3ImageStore(settings)
    current.ensure_buckets()
    found = S3ImageStore.find

    def away(self: S3ImageStore, kind: str, key: str) -> str | None:
        if self.buckets[kind] == f"gone-{NOW}":
            raise ConnectionError("S3 is away")
        return found(self, kind, key)

    monkeypatch.setattr(S3ImageStore, "find", away)
    core = WatchlistCore(settings, engine=_Engine(), store=current)  # type: ignore[arg-type]
    audit = audit_of(core.on_command(command("VIP", "tx-1"), NOW))
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_unavailable"), audit.reason
    assert f"gone-{NOW}" in audit.reason


def test_a_former_bucket_that_no_longer_exists_cannot_be_searched_so_fraud_and_forget_are_not_done(moto_url, tmp_path):
    """S3 answers a HEAD in a bucket that does not exist with a bare 404: the former bucket was searched and "had
    nothing", and ``fraud <tx>`` said unknown_transaction of a sale that may be in the bucket meant."""
    settings = _switched(moto_url, tmp_path, extra_image_buckets=(gone := f"gone-{NOW}-x"))
    core = _enrolled(settings, "")
    core.engine = _Engine()  # type: ignore[assignment]
    audit = audit_of(core.on_command(command("VIP", "tx-2", cid="c4"), NOW))
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_unavailable"), audit.reason
    assert gone in audit.reason
    forget = audit_of(core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW))
    assert forget.outcome == "FAILED" and forget.reason.startswith("image_store_unavailable"), forget.reason
    assert "subj-tx-1" in core.records, "still enrolled: a forget is done only once every store was searched"


def test_a_local_image_folder_made_after_the_start_is_searched_by_forget_and_swept_without_a_restart(
    moto_url, tmp_path
):
    """The former stores were fixed at their first use: ``.stack/images`` made after that (a local stage run on this
    machine) was neither searched by ``forget`` nor swept until the service restarted, and a forget was done with
    the subject's snapshot left there."""
    core = _enrolled(_switched(moto_url, tmp_path), "")
    core.engine = _Engine()  # type: ignore[assignment]
    core.purge(int(time.time() * 1000))
    assert core.former() == []
    local = LocalImageStore(tmp_path / "images")
    sale = local.put("checkout", checkout_image_key("tx-1"), b"the sale, written locally after the start")
    old = local.put("checkout", "tx-old", b"someone who matched nobody")
    os.utime(local._path(old), (time.time() - 48 * 3600,) * 2)
    audits = [AuditEvent.decode(o.value) for o in core.purge(int(time.time() * 1000)) if o.topic == AUDIT]
    (purged,) = [a for a in audits if a.action == "PURGE"]
    assert purged.details["deleted"] == "1" and local.find("checkout", "tx-old") is None
    forget = audit_of(core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW))
    assert (forget.outcome, forget.details["images_deleted"]) == ("DONE", "1"), forget.reason
    assert local.find("checkout", checkout_image_key("tx-1")) is None, f"{sale} stayed after the forget"
    assert len(core.former()) == 1, "the folder is added once, not at every call"


def test_a_command_of_several_slow_s3_calls_keeps_healthz_alive_each_call_being_progress(
    moto_url, tmp_path, monkeypatch
):
    """``/healthz``'s limit outlasts one S3 call, but only Rekognition's calls beat it: a ``forget`` with the S3
    image store makes many (the reference image, the snapshots by key in the current and a former bucket, the
    retained ones), each bounded, together past the limit, and the supervisor restarted a service only waiting for S3.
    Each S3 call that ends, of any store the command reaches, is progress now."""
    from infra.clients import aws
    from infra.clients.image_store import S3ImageStore
    from infra.metrics import Heartbeat
    from jobs.faces.watchlist_service import WatchlistService

    now = [0.0]
    alive: list[bool] = []
    svc = WatchlistService.__new__(WatchlistService)
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])

    def slow(**_event: object) -> None:  # every S3 call takes 40 s, under the limit alone
        alive.append(svc.heartbeat()[0])
        now[0] += 40.0

    real = aws.aws_client

    def slowed(*args: object, **kwargs: object) -> object:
        client = real(*args, **kwargs)  # type: ignore[arg-type]
        client.meta.events.register("before-call.s3", slow)
        return client

    monkeypatch.setattr(aws, "aws_client", slowed)
    settings = _switched(moto_url, tmp_path, extra_image_buckets="old-a")
    current = S3ImageStore(settings)
    current.ensure_buckets()
    current.s3.create_bucket(Bucket="old-a")
    core = WatchlistCore(settings, engine=_Engine(), store=current)  # type: ignore[arg-type]
    enrol(core, "subj-tx-1")
    core.progress = svc.heartbeat.beat
    now[0], alive[:] = 0.0, []
    svc.heartbeat.beat()
    forget = audit_of(core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW))
    assert forget.outcome == "DONE", forget.reason
    assert len(alive) >= 3 and all(alive), alive
    assert svc.heartbeat()[0], "stale after the last call"
    core.close()

    svc.core, svc._store_problem = core, "image store unreachable"  # the service wires its beat there
    svc._watch_image_stores()
    now[0] += 100.0
    assert core.progress is not None
    core.progress()
    assert svc.heartbeat() == (True, "degraded: image store unreachable")


def test_the_former_buckets_clients_are_built_once_across_sweeps_and_forgets_and_closed_with_the_core(
    moto_url, tmp_path, monkeypatch
):
    """Each retention sweep (and each forget) built a new S3 client per former bucket and never closed it: one more
    connection pool every ``retention_purge_interval_s`` for as long as the service ran."""
    from infra.clients import aws
    from infra.clients.image_store import S3ImageStore

    settings = _switched(moto_url, tmp_path, extra_image_buckets="old-a,old-b")
    current = S3ImageStore(settings)
    current.ensure_buckets()
    for bucket in ("old-a", "old-b"):
        current.s3.create_bucket(Bucket=bucket)
    made: list[object] = []
    closed: list[object] = []
    real = aws.aws_client

    def counted(*args: object, **kwargs: object) -> object:
        client = real(*args, **kwargs)  # type: ignore[arg-type]
        close = client.close
        client.close = lambda: (closed.append(client), close())[1]
        made.append(client)
        return client

    monkeypatch.setattr(aws, "aws_client", counted)
    core = WatchlistCore(settings, engine=_Engine(), store=current)  # type: ignore[arg-type]
    enrol(core, "subj-tx-1")
    day = 86_400_000
    for sweep in range(3):
        core.purge(int(time.time() * 1000) + sweep * day)
    assert audit_of(
        core.on_command(command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com"), NOW)
    ).outcome == ("DONE")
    assert audit_of(core.on_command(command("FRAUD", "tx-2", cid="c6"), NOW)).outcome == "FAILED"  # no such sale
    assert len(made) == 2, "one client per former bucket, kept across sweeps"
    core.close()
    assert closed == made, "the former buckets' clients were left open"
    assert current.find("checkout", "tx-2") is None, "the injected store stays its owner's, open"


def test_an_alert_snapshot_s3_refuses_for_good_is_a_failure_and_one_s3_cannot_reach_now_is_read_again(tmp_path):
    """Any S3 error but a missing image was raised out of the service: one S3 gives again (access denied) stopped it
    at every restart, for good. That one now fails the alert (audited, dead-lettered) and the service goes on; an
    outage (here deleting a forgotten subject's snapshot) leaves the alert undone, to be read again."""
    from botocore.exceptions import ClientError, ConnectTimeoutError

    class RefusingStore(LocalImageStore):
        def retain(self, ref: str, reason: str) -> None:
            raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Tag")

        def delete(self, ref: str) -> None:
            raise ConnectTimeoutError(endpoint_url="https://s3.example")

    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=_Engine(), store=RefusingStore(tmp_path / "images"))  # type: ignore[arg-type]
    enrol(core, "subj-tx-1")
    kept = core.store.put("checkout", "tx-9", b"the subject at a lane")
    outs = core.on_alert(Source("alerts", 0, 0, b"a-1", sighting("subj-tx-1", kept).encode()), NOW)
    assert audit_of(outs).outcome == "FAILED" and audit_of(outs).reason == "image_store_error: ClientError"
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "image_store_error"
    from jobs.faces.watchlist_service import StoreAway

    with pytest.raises(StoreAway):
        core.on_alert(Source("alerts", 0, 1, b"a-2", sighting("subj-tx-2", kept, "a-2").encode()), NOW)
    assert "retain:a-2" not in core.done, "undone, so read again"


def test_a_current_bucket_that_does_not_exist_fails_commands_and_alerts_naming_the_bucket_setting(moto_url, tmp_path):
    """A missing checkout bucket (S3 NoSuchBucket) failed ``fraud <tx>`` as a bare ``command_error`` and an alert's
    retain as ``image_store_error: ClientError``: neither said which bucket, nor what to set."""
    from infra.clients.image_store import S3ImageStore

    switched = _switched(moto_url, tmp_path)
    gone = f"gone-{NOW}-checkout"
    settings = switched.model_copy(update={"faces": switched.faces.model_copy(update={"checkout_bucket": gone})})
    store = S3ImageStore(settings)  # no bucket created: the checkout bucket is misnamed
    core = WatchlistCore(settings, engine=object(), store=store)  # type: ignore[arg-type]
    outs = core.on_command(command("FRAUD", "tx-1"), NOW)
    audit = audit_of(outs)
    assert audit.outcome == "FAILED" and audit.reason.startswith("image_store_missing"), audit.reason
    assert gone in audit.reason and "CG_FACES__CHECKOUT_BUCKET" in audit.reason
    (dl,) = by_topic(outs)["dead_letters"]
    letter = DeadLetter.decode(dl.value)
    assert letter.error_kind == "image_store_missing" and "CG_FACES__CHECKOUT_BUCKET" in letter.reason
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", NOW, "S1", "suspect", snapshot_ref=f"s3://{gone}/checkout/tx-1")
    outs = core.on_alert(Source("alerts", 0, 3, b"a-1", alert.encode(), ()), NOW)
    retain = audit_of(outs)
    assert retain.outcome == "FAILED" and retain.reason.startswith("image_store_missing"), retain.reason
    assert "CG_FACES__CHECKOUT_BUCKET" in retain.reason
    assert DeadLetter.decode(by_topic(outs)["dead_letters"][0].value).error_kind == "image_store_missing"


def _purge_warnings(core, caplog) -> list:
    """The WARNING-or-worse lines of one retention sweep of ``core``."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jobs.faces.watchlist_service"):
        core.purge(NOW)
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_checkout_bucket_is_logged_once_by_the_purge_as_an_error_naming_it_and_its_setting(
    moto_url, tmp_path, caplog
):
    """The retention sweep logged a missing bucket as ``purging ... failed (NoSuchBucket)``, a WARNING at every sweep
    that named neither the missing bucket nor what to set; now one ERROR does, until it changes or a sweep works."""
    import logging
    from types import SimpleNamespace

    from infra.clients.image_store import S3ImageStore

    settings = _switched(moto_url, tmp_path)
    store = S3ImageStore(settings)  # its buckets not created
    bucket = store.buckets["checkout"]
    core = WatchlistCore(settings, engine=SimpleNamespace(embedder="sface"), store=store)  # type: ignore[arg-type]

    def sweep() -> list[logging.LogRecord]:
        return _purge_warnings(core, caplog)

    [error] = sweep()
    assert error.levelno == logging.ERROR, error.getMessage()
    assert bucket in error.getMessage() and "CG_FACES__CHECKOUT_BUCKET" in error.getMessage()
    assert sweep() == [], "logged again at the next sweep"
    store.ensure_buckets()
    assert sweep() == []
    store.s3.delete_bucket(Bucket=bucket)
    [again] = sweep()
    assert again.levelno == logging.ERROR and bucket in again.getMessage(), "gone again after a sweep worked"


def test_a_missing_former_bucket_is_logged_once_by_the_purge_as_an_error_naming_it_and_its_setting(
    moto_url, tmp_path, caplog
):
    """A bucket of CG_FACES__EXTRA_IMAGE_BUCKETS that does not exist was a WARNING naming only the error's type at
    every sweep; now, as for the current store's buckets, one ERROR names the bucket and the setting, until it changes
    or a sweep there works."""
    import logging
    import uuid
    from types import SimpleNamespace

    from infra.clients.image_store import S3ImageStore

    former = f"former-{uuid.uuid4().hex[:12]}"
    settings = _switched(moto_url, tmp_path, extra_image_buckets=former)
    store = S3ImageStore(settings)
    store.ensure_buckets()  # the current store's buckets are there
    core = WatchlistCore(settings, engine=SimpleNamespace(embedder="sface"), store=store)  # type: ignore[arg-type]

    def sweep() -> list[logging.LogRecord]:
        return _purge_warnings(core, caplog)

    [error] = sweep()
    assert error.levelno == logging.ERROR, error.getMessage()
    assert former in error.getMessage() and "CG_FACES__EXTRA_IMAGE_BUCKETS" in error.getMessage()
    assert sweep() == [], "logged again at the next sweep"
    store.s3.create_bucket(Bucket=former)
    assert sweep() == []
    store.s3.delete_bucket(Bucket=former)
    [again] = sweep()
    assert again.levelno == logging.ERROR and former in again.getMessage(), "gone again after a sweep worked"


@pytest.mark.parametrize(
    "alert_id",
    ["", "x\r\nBcc: thief@evil.test", "a" * 600],
    ids=["empty", "header_injection", "over_512"],
)
def test_an_alert_whose_id_the_sender_refuses_is_dead_lettered_and_its_snapshot_not_retained(core, alert_id):
    """Its audit id is made from the alert id: every alert with an empty one (a record of zeros decodes as one) was
    ``retain:``, so after the first the others were skipped as done, and their snapshots went unretained unsaid."""
    enrol(core, "subj-tx-1")
    ref = core.store.put("checkout", "tx-9", b"the subject at a lane")
    outs = core.on_alert(Source("alerts", 0, 3, b"k", sighting("subj-tx-1", ref, alert_id).encode()), NOW)
    (letter,) = (DeadLetter.decode(o.value) for o in by_topic(outs)["dead_letters"])
    assert letter.error_kind == "invalid_id" and "alert_id" in letter.reason and "thief" not in letter.reason
    assert by_topic(outs)["audit"] == [] and core.store.retained() == {}


def test_an_alert_over_the_message_size_limit_is_dead_lettered_oversized_and_audits_nothing(core):
    """Its audit event copies its ids: one of ~1 MB (a subject id) was past Kafka's producer limit, failed every
    publish, and the service, restarted, read the same alert again."""
    ref = core.store.put("checkout", "tx-9", b"the subject at a lane")
    big = sighting("s" * (core.settings.job.max_message_bytes + 1), ref).encode()
    outs = core.on_alert(Source("alerts", 0, 4, b"k", big), NOW)
    (letter,) = (DeadLetter.decode(o.value) for o in by_topic(outs)["dead_letters"])
    assert letter.error_kind == "oversized" and str(len(big)) in letter.reason
    assert by_topic(outs)["audit"] == [] and core.store.find("checkout", "tx-9") is not None
