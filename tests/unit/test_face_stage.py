"""The face stage's core: what it snapshots, and what it observes in real rendered camera frames.

Frames come from the local camera's renderer (real face photos in a 640x480 scene) and are analysed
by the real face engine; the snapshot function is the seam (the Meraki client has its own tests).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from infra import metrics
from infra.clients.image_store import LocalImageStore
from infra.clients.meraki import MerakiClient, Snapshot, SnapshotError
from infra.local.camera import Presence, render
from infra.settings import CameraSettings, FaceSettings, Settings
from jobs.faces.rekognition import ATTEMPTS as REKOGNITION_ATTEMPTS
from jobs.faces.stage import CHECKOUT, ENTRANCE, EntranceTracker, FaceStage, OffsetTracker, Trigger, stall_limit_s
from schemas.records import CameraEvent, DetectedObject, FaceObservation, PosTransaction
from tests.builders import FACE_LEN
from tests.unit.faces_data import people_or_skip

LANE = "Q2MV-store-001-lane-01"


def test_entrance_tracker_reports_an_oid_once_per_window() -> None:
    t = EntranceTracker(window_ms=10_000)
    assert t.new_oids("cam", 1_000, [1, 2])[0] == [1, 2]
    assert t.new_oids("cam", 2_000, [1, 2, 3])[0] == [3]
    assert t.new_oids("other", 2_000, [1])[0] == [1]  # oids are per camera
    assert t.new_oids("cam", 11_500, [1])[0] == []  # seen at 2_000: still within the window
    assert t.new_oids("cam", 30_000, [1])[0] == [1]  # unseen for longer than the window: a new visit


def test_offsets_commit_only_up_to_the_first_unfinished_record() -> None:
    o = OffsetTracker()
    tp = ("transactions", 0)
    o.add(tp, 10, 1)
    o.add(tp, 11, 2)
    o.add(tp, 12, 0)  # nothing to do for this record (an invalid transaction)
    o.add(tp, 13, 1)
    assert o.to_commit() == {tp: 10}
    o.done(tp, 11)
    o.done(tp, 13)
    assert o.to_commit() == {}  # 10 still pending
    o.done(tp, 10)
    assert o.to_commit() == {tp: 11}  # 11 waits for its second observation
    o.done(tp, 11)
    assert o.to_commit() == {tp: 14}
    assert o.in_flight == 0


@pytest.fixture(scope="module")
def people() -> dict[str, tuple[Path, ...]]:
    return people_or_skip()


@pytest.fixture(scope="module")
def engine():
    from jobs.faces.engine import FaceEngine

    return FaceEngine(Settings().faces)


def _stage(tmp_path: Path, engine, snapshot) -> FaceStage:
    settings = Settings(cameras=CameraSettings(entrance_oid_window_s=60))
    return FaceStage(settings, snapshot, engine, LocalImageStore(tmp_path / "images"))


def _frame_of(people: dict, person: str | None, photo_index: int = 0):
    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        t = at_ms or int(time.time() * 1000)
        seen = (
            []
            if person is None
            else [Presence("v", person, str(people[person][photo_index]), serial, "store-001", "lane-01", 0, 1, 7)]
        )
        return Snapshot(serial, render(serial, t, seen), "image/jpeg", at_ms, False, 1, 2, 0.1)

    return snapshot


def _tx(event_time: int) -> bytes:
    return PosTransaction("tx-face-1", event_time, "store-001", "lane-01", "SALE", 12.5, "USD").encode()


def test_a_checkout_is_snapshotted_at_the_transaction_time_on_its_lane_camera(tmp_path, engine, people) -> None:
    asked: list[tuple[str, int | None]] = []
    snap = _frame_of(people, None)
    stage = _stage(tmp_path, engine, lambda s, at: asked.append((s, at)) or snap(s, at))
    now = int(time.time() * 1000)
    [trigger] = stage.plan_transaction(_tx(now - 500), now)
    assert (trigger.kind, trigger.serial, trigger.at_ms) == (CHECKOUT, LANE, now - 500)
    assert trigger.observation_id == "checkout:tx-face-1"
    assert stage.plan_transaction(b"not avro", now) == []  # the scoring job dead-letters bad transactions


def test_the_person_at_the_lane_is_observed_with_an_embedding_of_their_face(tmp_path, engine, people) -> None:
    from jobs.scoring.face_similarity import similarity

    person = next(n for n, photos in people.items() if len(photos) >= 2)
    other = next(n for n in people if n != person)
    stage = _stage(tmp_path, engine, _frame_of(people, person, 0))
    now = int(time.time() * 1000)
    [trigger] = stage.plan_transaction(_tx(now), now)
    obs = stage.observe(trigger, now)
    assert obs.status == "NO_MATCH" and obs.transaction_id == "tx-face-1" and obs.lane_id == "lane-01"
    assert obs.quality and 0 < obs.quality <= 1 and len(obs.embedding) == FACE_LEN
    assert obs.image_ref and stage.store.get(obs.image_ref).startswith(b"\xff\xd8")
    same = engine.best_face(people[person][1].read_bytes())
    different = engine.best_face(people[other][0].read_bytes())
    threshold = Settings().faces.match_threshold
    emb = np.asarray(obs.embedding, dtype=np.float32)
    assert similarity(emb, same.embedding) >= threshold > similarity(emb, different.embedding)
    assert FaceObservation.decode(obs.encode()) == obs


def test_an_empty_lane_is_no_face_with_the_reason(tmp_path, engine, people) -> None:
    stage = _stage(tmp_path, engine, _frame_of(people, None))
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert obs.status == "NO_FACE" and obs.reason == "no face in the snapshot" and obs.embedding is None


@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (SnapshotError("not_ready", "snapshot URL not ready after 30 polls"), "snapshot not_ready"),
        (SnapshotError("deadline", "snapshot deadline passed"), "snapshot deadline"),
        (ConnectionResetError("boom"), "snapshot failed: ConnectionResetError"),
    ],
)
def test_a_failed_snapshot_is_unavailable_with_the_reason(tmp_path, engine, failure, words) -> None:
    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        raise failure

    stage = _stage(tmp_path, engine, snapshot)
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert obs.status == "UNAVAILABLE" and words in obs.reason


@pytest.mark.parametrize("body", [b"\xff\xd8\xff\xe0" + bytes(5000), b"\xff\xd8\xff" + b"garbage" * 10])
def test_a_corrupt_image_is_unavailable_not_a_crash(tmp_path, engine, body: bytes) -> None:
    stage = _stage(tmp_path, engine, lambda s, at: Snapshot(s, body, "image/jpeg", at, False, 1, 1, 0.1))
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert obs.status == "UNAVAILABLE" and obs.reason.startswith("image unusable")


def test_a_transaction_too_old_to_matter_is_not_snapshotted(tmp_path, engine) -> None:
    stage = _stage(tmp_path, engine, lambda s, at: pytest.fail("must not snapshot"))
    now = int(time.time() * 1000)
    old = now - 3600_000
    obs = stage.observe(stage.plan_transaction(_tx(old), now)[0], now)
    assert obs.status == "UNAVAILABLE" and "late" in obs.reason


def test_a_new_person_at_the_entrance_triggers_one_snapshot_of_now(tmp_path, engine, people) -> None:
    person = next(iter(people))
    stage = _stage(tmp_path, engine, _frame_of(people, person))
    now = int(time.time() * 1000)

    def event(serial: str, *oids: int, at: int = now) -> bytes:
        objs = tuple(DetectedObject(o, "person", 0.1, 0.1, 0.5, 0.9) for o in oids)
        return CameraEvent(serial, at, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=objs).encode()

    [trigger] = stage.plan_camera_event(event("Q2MV-store-001-ENTRANCE", 42))
    assert (trigger.kind, trigger.at_ms, trigger.store_id, trigger.lane_id) == (ENTRANCE, None, "store-001", None)
    assert trigger.observation_id == f"entrance:Q2MV-store-001-ENTRANCE:42:{now}"
    assert stage.plan_camera_event(event("Q2MV-store-001-ENTRANCE", 42, at=now + 500)) == []
    assert stage.plan_camera_event(event(LANE, 43)) == []  # lane cameras are triggered by checkouts
    obs = stage.observe(trigger, now)
    assert obs.trigger == ENTRANCE and obs.status == "NO_MATCH" and obs.transaction_id is None
    assert obs.image_ref and "entrance" in obs.image_ref


def test_a_garbage_camera_event_is_invalid() -> None:
    from schemas.errors import InvalidRecord

    stage = FaceStage(Settings(), lambda s, at: None, None, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRecord) as err:
        stage.plan_camera_event(b"\x00garbage")
    assert err.value.kind == "not_avro"
    assert Trigger(ENTRANCE, "c", "s", None, 1, None, oid=5).image_key() == ("entrance", "c:5:1")


def test_a_camera_event_over_the_size_limit_is_dead_lettered_oversized_and_asks_for_no_snapshot() -> None:
    """Written to Kafka past the bridge, 20 000 people in one event were 20 000 snapshots of the door."""
    from schemas.errors import InvalidRecord

    stage = FaceStage(Settings(), lambda s, at: pytest.fail("must not snapshot"), None, None)  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    serial = "Q2MV-store-001-ENTRANCE"
    people = tuple(DetectedObject(oid, "person", 0.1, 0.1, 0.5, 0.9) for oid in range(20_000))
    value = CameraEvent(serial, now, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=people).encode()
    assert len(value) > Settings().job.max_message_bytes
    with pytest.raises(InvalidRecord) as err:
        stage.plan_camera_event(value, now)
    assert err.value.kind == "oversized" and str(len(value)) in err.value.reason


def test_an_entrance_event_naming_thousands_of_people_asks_for_at_most_the_cap_and_leaves_the_rest_for_later(
    caplog,
) -> None:
    """About 5 000 people fit under the size limit: as many snapshots of the door. The first 50 (the default) are
    taken; the others stay new, so the next event that names them photographs them, and nobody is photographed twice."""
    stage = FaceStage(Settings(), lambda s, at: pytest.fail("must not snapshot"), None, None)  # type: ignore[arg-type]
    assert Settings().cameras.entrance_max_new_people == 50
    now = int(time.time() * 1000)
    serial = "Q2MV-store-001-ENTRANCE"
    people = tuple(DetectedObject(oid, "person", 0.1, 0.1, 0.5, 0.9) for oid in range(5_000))
    value = CameraEvent(serial, now, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=people).encode()
    assert len(value) <= Settings().job.max_message_bytes
    first = stage.plan_camera_event(value, now)
    assert [t.oid for t in first] == list(range(50))
    assert "5000 new people: 50 photographed" in caplog.text
    later = CameraEvent(serial, now + 500, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=people[:60])
    assert [t.oid for t in stage.plan_camera_event(later.encode(), now + 500)] == list(range(50, 60))


@pytest.mark.parametrize("event_time", [0, -1, -(2**63)])
def test_a_camera_event_dated_at_or_before_1970_is_dead_lettered_invalid_timestamp(event_time: int) -> None:
    """As a transaction so dated is: taken, its observation carried that time on to the job and the sink."""
    from schemas.errors import InvalidRecord

    stage = FaceStage(Settings(), lambda s, at: pytest.fail("must not snapshot"), None, None)  # type: ignore[arg-type]
    serial = "Q2MV-store-001-ENTRANCE"
    person = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)
    value = CameraEvent(serial, event_time, f"/merakimv/{serial}/raw_detections", "RAW_DETECTIONS", objects=person)
    with pytest.raises(InvalidRecord) as err:
        stage.plan_camera_event(value.encode(), int(time.time() * 1000))
    assert err.value.kind == "invalid_timestamp"


HOSTILE_STORE = "x/../Q2XX-VICTIM-0001/reboot?"


def test_a_transaction_with_path_characters_in_its_ids_is_skipped_and_reaches_no_camera(tmp_path) -> None:
    """The real Meraki client behind the stage; MockTransport records every request it makes."""
    requests: list[httpx.Request] = []

    def dashboard(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(404, json={"errors": ["Device not found"]})

    settings = Settings(cameras=CameraSettings(deadline_s=2.0))
    client = MerakiClient(
        settings.cameras, "http://cam.test/api/v1", http=httpx.Client(transport=httpx.MockTransport(dashboard))
    )
    stage = FaceStage(settings, client.snapshot, None, LocalImageStore(tmp_path / "images"))  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    for store, lane in [(HOSTILE_STORE, "lane-01"), ("store-001", "../../organizations/1/admins"), ("store-001", "")]:
        tx = PosTransaction("tx-hostile", now, store, lane, "SALE", 12.5, "USD").encode()
        assert stage.plan_transaction(tx, now) == []  # the scoring job dead-letters it
    hostile = Trigger(CHECKOUT, f"Q2MV-{HOSTILE_STORE}-lane-01", "s", "l", now, now, transaction_id="tx-hostile")
    obs = stage.observe(hostile, now)  # a serial that slipped past planning still never becomes a request
    assert obs.status == "UNAVAILABLE" and obs.reason.startswith("snapshot invalid_serial")
    assert requests == []
    stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert [r.url.raw_path for r in requests] == [b"/api/v1/devices/Q2MV-store-001-lane-01/camera/generateSnapshot"]


def test_a_camera_event_from_a_serial_that_is_no_serial_is_invalid() -> None:
    from schemas.errors import InvalidRecord

    stage = FaceStage(Settings(), lambda s, at: pytest.fail("must not snapshot"), None, None)  # type: ignore[arg-type]
    serial = f"Q2MV-{HOSTILE_STORE}-ENTRANCE"
    event = CameraEvent(
        serial, 1, "/merakimv/x/raw_detections", "RAW_DETECTIONS", objects=(DetectedObject(1, "person", 0, 0, 1, 1),)
    )
    with pytest.raises(InvalidRecord) as err:
        stage.plan_camera_event(event.encode())
    assert err.value.kind == "invalid_id"


def test_an_engine_failure_of_any_kind_is_unavailable_not_an_exception(tmp_path) -> None:
    class Broken:
        """An engine returning a malformed face (no box): a bug, not an image problem."""

        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            return [type("Face", (), {"passed": True, "box": None, "quality": 0.9, "embedding": [0.0] * 128})()]

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff\xe0" + bytes(64), "image/jpeg", at_ms, False, 1, 1, 0.1)

    stage = FaceStage(Settings(), snapshot, Broken(), LocalImageStore(tmp_path / "images"))
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert obs.status == "UNAVAILABLE" and obs.reason == "face analysis failed: TypeError"
    assert obs.observation_id == "checkout:tx-face-1"


def test_an_entrance_event_from_a_backlog_is_not_photographed_now(tmp_path) -> None:
    """Two hours behind (a restart, an outage): a snapshot of the door now would show someone else."""
    stage = _stage(tmp_path, None, lambda s, at: pytest.fail("must not snapshot"))
    now = int(time.time() * 1000)
    old = now - 2 * 3600_000
    objs = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)
    event = CameraEvent("Q2MV-store-001-ENTRANCE", old, "/merakimv/x/raw_detections", "RAW_DETECTIONS", objects=objs)
    [trigger] = stage.plan_camera_event(event.encode())
    late = metrics.SKIPPED.labels("face-stage", "entrance_late")
    before = late._value.get()
    obs = stage.observe(trigger, now)
    assert obs.status == "UNAVAILABLE" and obs.reason == "not snapshotted: 7200 s late (limit 10 s)"
    assert obs.event_time == old and obs.image_ref is None
    assert late._value.get() == before + 1  # counted, not only in the observation's reason


@pytest.mark.parametrize("lag", [0, -5])
def test_an_entrance_lag_limit_that_would_drop_every_entrance_is_a_settings_error(lag: float) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="entrance_max_lag_s"):
        Settings(cameras={"entrance_max_lag_s": lag})


def test_the_same_oid_back_after_the_window_is_a_new_sighting_with_its_own_ids(tmp_path) -> None:
    """Its observation, image and alert must not overwrite the first sighting's (nor be deduplicated away)."""
    from jobs.scoring.rules import FaceResult
    from jobs.scoring.scorer import Scorer

    stage = _stage(tmp_path, None, lambda s, at: pytest.fail("not needed"))
    door, t0 = "Q2MV-store-001-ENTRANCE", 1_800_000_000_000
    objs = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)

    def sighting(at: int) -> Trigger:
        event = CameraEvent(door, at, f"/merakimv/{door}/raw_detections", "RAW_DETECTIONS", objects=objs)
        [trigger] = stage.plan_camera_event(event.encode(), at)
        return trigger

    first, again = sighting(t0), sighting(t0 + 11 * 60_000)  # the window is 60 s here
    assert first.observation_id != again.observation_id and first.image_key() != again.image_key()
    face = FaceResult("MATCHED", "subj-a", "SUSPECT", 99.0)
    alerts = [
        Scorer.watchlist_alert(t.event_time, "store-001", None, face, None, t.observation_id, None)
        for t in (first, again)
    ]
    assert alerts[0]["alert_id"] != alerts[1]["alert_id"]


def test_a_checkout_picture_of_now_is_flagged_and_kept_where_no_enrollment_finds_it(tmp_path) -> None:
    """No footage of the sale: the camera's picture of "now" shows whoever stands at the lane then, so it is
    marked as such and ``fraud <tx>`` (which looks up ``checkout_image_key(tx)``) cannot enroll that person."""
    from jobs.faces.stage import checkout_image_key

    class OneFace:
        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            face = {"passed": True, "box": (0, 0, 10, 10), "quality": 0.9, "embedding": [0.5] * FACE_LEN}
            return [type("Face", (), face)()]

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff\xe0now", "image/jpeg", at_ms, True, 8, 2, 24.0)

    stage = FaceStage(Settings(), snapshot, OneFace(), LocalImageStore(tmp_path / "images"))
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now - 25_000), now)[0], now)
    assert obs.snapshot_of_now and obs.status == "NO_MATCH" and "snapshot of now" in obs.reason
    assert FaceObservation.decode(obs.encode()).snapshot_of_now
    assert stage.store.get(obs.image_ref) == b"\xff\xd8\xff\xe0now"  # kept: alerts may show it
    assert stage.store.find("checkout", checkout_image_key("tx-face-1")) is None
    assert checkout_image_key("tx-face-1") == "tx-face-1"  # footage of the sale: where enrollment looks


def test_a_snapshot_of_a_crowd_embeds_only_the_face_it_reports(tmp_path) -> None:
    """200 usable faces in one frame: the stage sends one embedding (the largest face's), so the engine must not
    spend ~30 ms of a core on each of the others while an analysis slot waits."""

    class Crowd:
        embedded = 0

        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            faces = []
            for i in range(200):  # largest first, as the engine gives them
                side = 300 - i
                embed = max_embedded is None or i < max_embedded
                Crowd.embedded += embed
                face = {"passed": True, "box": (0, 0, side, side), "quality": 0.9, "scale": 1.0}
                face["embedding"] = [float(side)] * FACE_LEN if embed else None
                faces.append(type("Face", (), face)())
            return faces

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff\xe0crowd", "image/jpeg", at_ms, False, 1, 1, 0.1)

    stage = FaceStage(Settings(), snapshot, Crowd(), LocalImageStore(tmp_path / "images"))
    now = int(time.time() * 1000)
    obs = stage.observe(stage.plan_transaction(_tx(now), now)[0], now)
    assert obs.status == "NO_MATCH" and obs.embedding == [300.0] * FACE_LEN
    assert Crowd.embedded == 1


def test_the_stall_limit_covers_a_whole_snapshot_deadline_and_with_rekognition_its_search() -> None:
    """The face stage is called hung only after the longest one trigger may take: never during a slow snapshot."""
    local = stall_limit_s(Settings(cameras=CameraSettings(deadline_s=45.0)))
    assert local > 45.0
    remote = stall_limit_s(Settings(cameras=CameraSettings(deadline_s=45.0), faces=FaceSettings(backend="rekognition")))
    assert remote >= local + REKOGNITION_ATTEMPTS * FaceSettings().rekognition_search_timeout_s


def test_the_stall_limit_with_rekognition_counts_botocores_waits_between_tries_like_the_watchlist_service() -> None:
    """The stall limit added 4 x 2 x the search timeout and left out botocore's waits between tries (up to 22 s),
    so a search that waited out every try and backoff could take the stage for hung; it now counts one call's longest
    as the watchlist service's ``/healthz`` does (:func:`call_limit_s`)."""
    from jobs.faces.rekognition import RETRY_WAIT_S, call_limit_s

    for timeout_s in (1.0, 5.0, 20.0):
        faces = FaceSettings(backend="rekognition", rekognition_search_timeout_s=timeout_s)
        local = stall_limit_s(Settings(cameras=CameraSettings(deadline_s=45.0)))
        remote = stall_limit_s(Settings(cameras=CameraSettings(deadline_s=45.0), faces=faces))
        assert remote - local >= call_limit_s(timeout_s), (timeout_s, remote - local)
        assert remote - local >= REKOGNITION_ATTEMPTS * 2 * timeout_s + RETRY_WAIT_S


def test_the_stall_limit_with_rekognition_covers_every_face_one_snapshot_searches_not_one_search() -> None:
    """One trigger searches each usable face of its snapshot (up to ``MAX_SEARCHED_FACES``), one SearchFacesByImage
    call each, and a call answered only at its last try (its longest, :func:`call_limit_s`) is no failure, so the next
    is made: the stall limit counted one call, and a snapshot of a few faces whose searches each answered late took the
    stage for hung (``/healthz`` 503) and got it restarted mid-trigger. It now counts what one trigger can take."""
    import io
    from types import SimpleNamespace

    from PIL import Image

    from jobs.faces.rekognition import call_limit_s, search_faces

    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 90, 90)).save(buf, "JPEG")
    faces = [SimpleNamespace(passed=True, box=(10 + 100 * i, 10, 90 + 100 * i, 90), scale=1.0) for i in range(6)]

    class LateCollection:
        def __init__(self, timeout_s: float) -> None:
            self.timeout_s, self.spent = timeout_s, 0.0

        def search(self, image: bytes | str, subjects: tuple[str, ...] = ()) -> None:
            self.spent += call_limit_s(self.timeout_s)  # answered at its last try: no match
            return None

    for timeout_s in (1.0, 5.0):
        collection = LateCollection(timeout_s)
        assert search_faces(collection, buf.getvalue(), faces).failed is None
        spent = collection.spent
        cameras = CameraSettings(deadline_s=45.0)
        local = stall_limit_s(Settings(cameras=cameras))
        faces_settings = FaceSettings(backend="rekognition", rekognition_search_timeout_s=timeout_s)
        remote = stall_limit_s(Settings(cameras=cameras, faces=faces_settings))
        assert remote - local >= spent > call_limit_s(timeout_s), (timeout_s, remote - local, spent)


def test_one_s3_snapshot_write_that_waits_out_its_timeouts_does_not_take_the_stage_for_hung(tmp_path) -> None:
    """With the S3 image store, a trigger's write of its snapshot is one S3 call: 4 tries, each timing out connecting
    and reading at ``CG_FACES__IMAGE_STORE_TIMEOUT_S``, botocore's waits between (62 s at the default 5 s). The stall
    limit left it to its 30 s margin, so one write that did not answer after a slow snapshot took the stage for hung;
    it now adds that call's longest, whatever the face backend, as the watchlist service's ``/healthz`` does."""
    from infra.clients.aws import standard_retry_wait_s
    from infra.clients.image_store import S3ImageStore

    cameras = CameraSettings(deadline_s=45.0)
    for backend in ("local", "rekognition"):
        for timeout_s in (FaceSettings().image_store_timeout_s, 30.0):
            local = FaceSettings(backend=backend, image_store_timeout_s=timeout_s)
            s3 = {"image_store": "s3", "aws_endpoint_url": "http://127.0.0.1:9"}
            faces = FaceSettings(backend=backend, image_store_timeout_s=timeout_s, **s3)
            settings = Settings(stack_dir=tmp_path, cameras=cameras, faces=faces)
            config = S3ImageStore(settings).s3.meta.config  # the client the stage writes with (no request is made)
            tries = config.retries["total_max_attempts"]
            longest = tries * (config.connect_timeout + config.read_timeout) + standard_retry_wait_s(tries)
            without = stall_limit_s(Settings(stack_dir=tmp_path, cameras=cameras, faces=local))
            assert stall_limit_s(settings) >= without + longest, (backend, timeout_s)


def test_an_entrance_event_dated_in_the_future_is_invalid_and_leaves_the_oid_memory_as_it_was() -> None:
    """A camera clock hours ahead, or a publisher naming a far-future time: such an event stopped the oid memory
    forgetting (it grew with every person for good) and hid that oid's real sighting, which was taken for one seen."""
    from schemas.errors import InvalidRecord

    stage = FaceStage(Settings(), lambda s, at: pytest.fail("must not snapshot"), None, None)  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    objs = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)

    def event(at: int) -> bytes:
        return CameraEvent(
            "Q2MV-store-001-ENTRANCE", at, "/merakimv/x/raw_detections", "RAW_DETECTIONS", objects=objs
        ).encode()

    with pytest.raises(InvalidRecord) as err:
        stage.plan_camera_event(event(now + 24 * 3600_000))
    assert err.value.kind == "invalid_timestamp" and "86400 s after the wall clock" in err.value.reason
    [trigger] = stage.plan_camera_event(event(now))  # the person at the door now is still new
    assert trigger.oid == 7
    assert stage.plan_camera_event(event(now + 60_000)) == []  # within the skew: the same person


def test_an_entrance_event_from_a_camera_clock_ahead_is_late_by_when_it_was_read_not_fresh_for_longer(tmp_path) -> None:
    """A camera 4 minutes ahead gave a lag of minus 4 minutes: its backlog was photographed "now", minutes late."""
    asked: list[str] = []
    stage = _stage(tmp_path, None, lambda s, at: asked.append(s) or pytest.fail("must not snapshot"))
    now = 1_800_000_000_000
    objs = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)
    door = "Q2MV-store-001-ENTRANCE"
    ahead = CameraEvent(door, now + 240_000, "/merakimv/x/raw_detections", "RAW_DETECTIONS", objects=objs)
    [trigger] = stage.plan_camera_event(ahead.encode(), now)  # no record time: from when it was read
    obs = stage.observe(trigger, now + 11_000)
    assert obs.status == "UNAVAILABLE" and obs.reason == "not snapshotted: 11 s late (limit 10 s)"
    assert obs.event_time == now + 240_000, "the event keeps its own time (and ids)"
    [trigger] = stage.plan_camera_event(replace_oid(ahead, 8).encode(), now, record_ms=now - 60_000)  # 1 min in Kafka
    assert stage.observe(trigger, now + 1_000).reason == "not snapshotted: 61 s late (limit 10 s)"
    assert asked == []


def test_an_on_time_entrance_event_is_still_photographed(tmp_path) -> None:
    """The clock ahead is measured from when the record was taken, which never refuses an event that is fresh."""
    asked: list[int] = []

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(len(asked))
        raise SnapshotError("deadline", "asked")

    stage = _stage(tmp_path, None, snapshot)
    now = 1_800_000_000_000
    objs = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)
    for i, (event_ms, record_ms) in enumerate([(now, now + 50), (now + 2_000, now + 50), (now - 3_000, None)]):
        event = CameraEvent("Q2MV-store-001-ENTRANCE", event_ms, "/x", "RAW_DETECTIONS", objects=objs)
        [trigger] = stage.plan_camera_event(replace_oid(event, i).encode(), now + 100, record_ms)
        assert stage.observe(trigger, now + 5_000).reason == "snapshot deadline: asked", (event_ms, record_ms)
    assert len(asked) == 3


def replace_oid(event: CameraEvent, oid: int) -> CameraEvent:
    from dataclasses import replace

    return replace(event, objects=tuple(replace(o, oid=oid) for o in event.objects))


def test_a_transaction_from_a_pos_clock_ahead_is_late_by_when_it_was_read_not_fresh_for_longer(tmp_path) -> None:
    """A POS clock 4 minutes ahead took 4 minutes off the lag: a transaction past its 10 minutes was snapshotted."""
    stage = _stage(tmp_path, None, lambda s, at: pytest.fail("must not snapshot"))
    now = 1_800_000_000_000
    limit_s = 600
    [trigger] = stage.plan_transaction(_tx(now + 240_000), now)  # no record time: from when it was read
    obs = stage.observe(trigger, now + (limit_s + 1) * 1000)
    assert obs.status == "UNAVAILABLE" and obs.reason == f"not snapshotted: {limit_s + 1} s late (limit {limit_s} s)"
    assert (obs.event_time, trigger.at_ms) == (now + 240_000, now + 240_000), "its own time, and the video's"
    [trigger] = stage.plan_transaction(_tx(now + 240_000), now, record_ms=now - 420_000)  # 7 min in Kafka
    assert stage.observe(trigger, now + 181_000).reason == f"not snapshotted: 601 s late (limit {limit_s} s)"


def test_an_on_time_transaction_is_still_snapshotted(tmp_path) -> None:
    """The clock ahead is measured from when the record was taken, which never refuses a transaction that is fresh."""
    asked: list[int | None] = []

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(at_ms)
        raise SnapshotError("deadline", "asked")

    stage = _stage(tmp_path, None, snapshot)
    now = 1_800_000_000_000
    for event_ms, record_ms in [(now, now + 50), (now + 240_000, now + 50), (now - 3_000, None)]:
        [trigger] = stage.plan_transaction(_tx(event_ms), now + 100, record_ms)
        assert stage.observe(trigger, now + 590_000).reason == "snapshot deadline: asked", (event_ms, record_ms)
    assert asked == [now, now + 240_000, now - 3_000]
