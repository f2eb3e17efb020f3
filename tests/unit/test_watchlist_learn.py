"""The watchlist service learns from confirmed cases: ``LEARN <subject> <ref>`` adds a template, up to the cap;
case verbs are left to the case service."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

from infra.clients.image_store import LocalImageStore
from infra.command_auth import SIGNATURE_HEADER, sign_command
from infra.settings import CasesSettings, FaceSettings, Settings, WebexSettings
from jobs.faces.engine import FaceEngine
from jobs.faces.rekognition import RekognitionFaces
from jobs.faces.watchlist_service import Source, WatchlistCore
from schemas.records import AuditEvent, BotCommand, DeadLetter, WatchlistEntry
from schemas.topics import AUDIT, DEAD_LETTERS, WATCHLIST
from tests.builders import FACE_LEN
from tests.unit.test_watchlist_service import FACES, needs_faces

NOW = 1_800_000_000_000
KEY = "unit-test-command-signing-key"
_ENGINE: FaceEngine | None = None


@pytest.fixture
def core(tmp_path) -> WatchlistCore:
    global _ENGINE
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people="lp@example.com")
    settings = Settings(stack_dir=tmp_path, webex=webex, cases=CasesSettings(max_templates=2))
    _ENGINE = _ENGINE or FaceEngine(settings.faces)
    return WatchlistCore(settings, engine=_ENGINE)


def signed(verb: str, arg: str, cid: str, offset: int = 1) -> Source:
    cmd = BotCommand(command_id=cid, issued_at=NOW - 1000, verb=verb, actor="lp@example.com", argument=arg)
    return Source("commands", 0, offset, cid.encode(), cmd.encode(), ((SIGNATURE_HEADER, sign_command(cmd, KEY)),))


def only(outs, topic):
    return [o for o in outs if o.topic == topic]


def photo(name: str) -> bytes:
    return (FACES / "face_recognition" / "test_images" / name).read_bytes()


@needs_faces
def test_a_confirmed_sighting_becomes_another_template_until_the_cap(core) -> None:
    core.store.put("checkout", "tx-1", photo("obama.jpg"))
    core.on_command(signed("FRAUD", "tx-1", "c1"), NOW)
    sighting = core.store.put("checkout", "tx-2", photo("obama2.jpg"))
    outs = core.on_command(signed("LEARN", f"subj-tx-1 {sighting}", "learn:case-1", 2), NOW)
    (wl,) = only(outs, WATCHLIST)
    entry = WatchlistEntry.decode(wl.value)
    assert len(entry.embeddings) == 2 and entry.flagged_by == "lp@example.com"
    (audit,) = [AuditEvent.decode(o.value) for o in only(outs, AUDIT)]
    assert (audit.action, audit.outcome, audit.details["templates"]) == ("LEARN", "DONE", "2")
    assert core.on_command(signed("LEARN", f"subj-tx-1 {sighting}", "learn:case-1", 2), NOW) == []  # replay
    full = core.on_command(signed("LEARN", f"subj-tx-1 {sighting}", "learn:case-2", 3), NOW)
    assert not only(full, WATCHLIST)
    assert AuditEvent.decode(only(full, AUDIT)[0].value).outcome == "UNCHANGED"


def test_learning_for_a_subject_not_on_the_watchlist_fails(core) -> None:
    outs = core.on_command(signed("LEARN", "subj-nobody local://checkout/x.jpg", "learn:case-9"), NOW)
    (dl,) = only(outs, DEAD_LETTERS)
    assert DeadLetter.decode(dl.value).error_kind == "unknown_subject"
    assert AuditEvent.decode(only(outs, AUDIT)[0].value).outcome == "FAILED"


def test_case_verbs_are_left_to_the_case_service_even_when_forged(core) -> None:
    forged = BotCommand(command_id="x", issued_at=NOW, verb="CONFIRM", actor="lp@example.com", argument="case-1")
    assert core.on_command(Source("commands", 0, 5, b"x", forged.encode(), ()), NOW) == []


@needs_faces
def test_an_entry_expires_after_the_setting_unless_renewed(core) -> None:
    core.store.put("checkout", "tx-1", photo("obama.jpg"))
    (wl,) = only(core.on_command(signed("FRAUD", "tx-1", "c1"), NOW), WATCHLIST)
    entry = WatchlistEntry.decode(wl.value)
    year = int(core.settings.faces.watchlist_expire_days * 86_400_000)
    assert entry.expires_at == NOW - 1000 + year
    assert core.expire(entry.expires_at - 1) == []
    renewal = core.on_command(signed("RENEW", "subj-tx-1", "c2", 2), NOW + 10_000)
    (renewed,) = [WatchlistEntry.decode(o.value) for o in only(renewal, WATCHLIST)]
    assert renewed.expires_at == NOW + 10_000 + year and len(renewed.embeddings) == 1
    (audit,) = [AuditEvent.decode(o.value) for o in only(renewal, AUDIT)]
    assert (audit.action, audit.outcome, audit.actor) == ("RENEW", "DONE", "lp@example.com")
    assert core.expire(entry.expires_at) == [], "renewed: not expired at the old date"
    outs = core.expire(renewed.expires_at)
    assert [(o.key, o.value) for o in only(outs, WATCHLIST)] == [(b"subj-tx-1", None)]
    (gone,) = [AuditEvent.decode(o.value) for o in only(outs, AUDIT)]
    assert (gone.action, gone.outcome, gone.actor) == ("EXPIRE", "DONE", "watchlist-service")
    assert core.store.find("reference", "subj-tx-1") is None, "expiry removes every trace, as forget does"
    assert core.expire(renewed.expires_at + 1) == []


def test_renewing_a_subject_not_on_the_watchlist_fails(core) -> None:
    outs = core.on_command(signed("RENEW", "subj-nobody", "c9"), NOW)
    assert DeadLetter.decode(only(outs, DEAD_LETTERS)[0].value).error_kind == "unknown_subject"


@needs_faces
def test_an_expiry_that_cannot_reach_the_image_store_is_audited_and_retried_not_fatal(core, monkeypatch) -> None:
    core.store.put("checkout", "tx-1", photo("obama.jpg"))
    (wl,) = only(core.on_command(signed("FRAUD", "tx-1", "c1"), NOW), WATCHLIST)
    due = WatchlistEntry.decode(wl.value).expires_at
    real_delete = core.store.delete

    def unreachable(ref: str) -> None:
        raise OSError("store unreachable")

    monkeypatch.setattr(core.store, "delete", unreachable)
    outs = core.expire(due)
    assert only(outs, WATCHLIST) == []
    (failed,) = [AuditEvent.decode(o.value) for o in only(outs, AUDIT)]
    assert (failed.action, failed.outcome) == ("EXPIRE", "FAILED") and "OSError" in (failed.reason or "")
    monkeypatch.setattr(core.store, "delete", real_delete)
    outs = core.expire(due + 1)  # the next purge
    assert [(o.key, o.value) for o in only(outs, WATCHLIST)] == [(b"subj-tx-1", None)]
    assert core.store.find("reference", "subj-tx-1") is None


class _Collection:
    """A Rekognition client keeping ``FaceId -> ExternalImageId`` and the bytes each face was indexed from."""

    def __init__(self) -> None:
        self.faces: dict[str, str] = {}
        self.images: dict[str, bytes] = {}

    def list_faces(self, CollectionId: str, MaxResults: int, NextToken: str | None = None) -> dict:  # noqa: N803
        return {"Faces": [{"FaceId": f, "ExternalImageId": e} for f, e in self.faces.items()]}

    def index_faces(self, CollectionId: str, Image: dict, ExternalImageId: str, **_: object) -> dict:  # noqa: N803
        face = f"face-{len(self.faces) + 1}"
        self.faces[face], self.images[face] = ExternalImageId, Image["Bytes"]
        return {"FaceRecords": [{"Face": {"FaceId": face}}]}


class _TwoPeople:
    """A 640x480 sighting: a bystander's large face left, the subject's smaller face right; the subject's embedding
    is the enrolled one."""

    embedder = "sface"
    SUBJECT, BYSTANDER = [0.1] * FACE_LEN, [-0.1] * FACE_LEN

    def face(self, box: tuple[int, int, int, int], embedding: list[float]) -> SimpleNamespace:
        return SimpleNamespace(box=box, scale=1.0, passed=True, quality=0.9, embedding=np.array(embedding))

    def best_face(self, data: bytes) -> SimpleNamespace:
        return self.face((300, 100, 400, 200), self.SUBJECT)

    def analyse(self, data: bytes) -> list[SimpleNamespace]:
        return [self.face((20, 20, 260, 260), self.BYSTANDER), self.face((440, 200, 520, 280), self.SUBJECT)]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(buf, "JPEG")
    return buf.getvalue()


def test_with_rekognition_a_confirmed_sighting_adds_the_subjects_face_to_the_collection(tmp_path) -> None:
    """Rekognition's ``index`` kept an indexed subject as it was, so ``LEARN`` added nothing to the collection the
    face stage matches in (audited DONE all the same); and the template was the sighting's largest face, which
    with Rekognition, that matches every face of a snapshot, may be a bystander's."""
    collection = _Collection()
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people="lp@example.com")
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex, faces=FaceSettings(backend="rekognition")),
        engine=_TwoPeople(),  # type: ignore[arg-type]
        store=LocalImageStore(tmp_path / "images"),
        rekognition=RekognitionFaces(FaceSettings(backend="rekognition"), client=collection),
    )
    core.store.put("checkout", "tx-1", _jpeg())
    core.on_command(signed("FRAUD", "tx-1", "c1"), NOW)
    assert list(collection.faces.values()) == ["subj-tx-1"]
    sighting = core.store.put("checkout", "tx-2", _jpeg())
    outs = core.on_command(signed("LEARN", f"subj-tx-1 {sighting}", "learn:case-1", 2), NOW)
    assert AuditEvent.decode(only(outs, AUDIT)[0].value).outcome == "DONE"
    assert list(collection.faces.values()) == ["subj-tx-1", "subj-tx-1"], "the sighting is in the collection"
    with Image.open(io.BytesIO(collection.images["face-2"])) as crop:
        assert crop.size == (161, 161), "the subject's face cropped (80 px box, half a box around it), not the picture"
    (learned,) = [WatchlistEntry.decode(o.value) for o in only(outs, WATCHLIST)]
    assert learned.embeddings[1] == pytest.approx(_TwoPeople.SUBJECT), "the subject's face, not the bystander's"


def test_with_rekognition_a_rotated_sighting_is_cropped_around_the_subjects_face_as_the_engine_saw_it(tmp_path) -> None:
    """A camera's JPEG stored turned with an EXIF orientation: the engine finds the faces in the picture turned
    upright, so the subject's face must be cut from that. Cut from the stored pixels, the indexed crop held the
    wrong part of the picture (or a sliver of it), not the subject's face."""
    collection = _Collection()
    webex = WebexSettings(command_signing_key=SecretStr(KEY), allowed_people="lp@example.com")
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, webex=webex, faces=FaceSettings(backend="rekognition")),
        engine=_TwoPeople(),  # type: ignore[arg-type]
        store=LocalImageStore(tmp_path / "images"),
        rekognition=RekognitionFaces(FaceSettings(backend="rekognition"), client=collection),
    )
    core.store.put("checkout", "tx-1", _jpeg())
    core.on_command(signed("FRAUD", "tx-1", "c1"), NOW)
    upright = Image.new("RGB", (640, 480), (90, 90, 90))
    upright.paste((200, 40, 40), (440, 200, 520, 280))  # the subject's face, where _TwoPeople finds it
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: stored turned the other way
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    sighting = core.store.put("checkout", "tx-2", buf.getvalue())
    outs = core.on_command(signed("LEARN", f"subj-tx-1 {sighting}", "learn:case-1", 2), NOW)
    assert AuditEvent.decode(only(outs, AUDIT)[0].value).outcome == "DONE"
    with Image.open(io.BytesIO(collection.images["face-2"])) as crop:
        assert crop.size == (161, 161)
        centre = np.asarray(crop.convert("RGB"))[60:100, 60:100].reshape(-1, 3).mean(axis=0)
    assert centre == pytest.approx((200, 40, 40), abs=12), "the subject's face in the middle of the crop"
