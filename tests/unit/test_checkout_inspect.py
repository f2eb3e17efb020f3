"""``checkout <tx>``: a fresh snapshot of the lane camera at the transaction time, compared now.

Against the local camera (a real HTTP server speaking the Dashboard API, rendering real photos) and
the real face engine; the transaction lookup and the watchlist are given directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, closing

import pytest

from infra.clients.image_store import ImageStore
from infra.clients.meraki import camera_for_lane
from infra.local.camera import LocalCameraControl
from infra.settings import Settings
from jobs.faces.checkout_inspect import CheckoutInspector
from jobs.faces.engine import FaceEngine
from jobs.faces.stage import inspection_image_key
from jobs.scoring.watchlist import Watchlist
from tests.builders import FACE_LEN, OTHER_FACE_LEN
from tests.unit.test_meraki_client import camera_settings, people, running  # noqa: F401 - fixture

STORE = "store-inspect"


@pytest.fixture
def world(people, tmp_path):  # noqa: F811 - the fixture imported above
    settings = camera_settings().model_copy(update={"stack_dir": tmp_path})
    camera = running(settings, people)
    try:
        yield settings, camera, people
    finally:
        camera.stop()


@pytest.fixture
def closer() -> Iterator[ExitStack]:
    """Closes what a test opened (the camera control client, the inspector's camera client) when it ends."""
    with ExitStack() as stack:
        yield stack


def _enrolled(settings: Settings, engine: FaceEngine, person: str, photos) -> Watchlist:
    watchlist = Watchlist(settings)
    embedding = engine.best_face(photos[person][-1].read_bytes()).embedding
    watchlist.upsert(
        {
            "subject_id": f"subj-{person}",
            "category": "SUSPECT",
            "embeddings": [embedding.tolist()],
            "reference_image_ref": None,
            "reason": "t",
            "flagged_by": "t",
            "flagged_at": int(time.time() * 1000),  # listed now: an entry of 1970 has lapsed long since
            "source_transaction_id": None,
        }
    )
    return watchlist


def test_checkout_compares_the_face_at_that_lane_and_time_with_the_watchlist(world, closer: ExitStack) -> None:
    settings, camera, photos = world
    suspect, other = sorted(photos)[:2]
    engine = FaceEngine(settings.faces)
    watchlist = _enrolled(settings, engine, suspect, photos)
    control = closer.enter_context(closing(LocalCameraControl(camera.base_url)))
    now = int(time.time() * 1000)
    control.add_visit(suspect, STORE, "lane-01", now - 30_000, now - 5_000, now + 30_000)
    control.add_visit(other, STORE, "lane-02", now - 30_000, now - 5_000, now + 30_000)
    docs = {
        "tx-s": {"store_id": STORE, "lane_id": "lane-01", "event_time": now - 5_000},
        "tx-o": {"store_id": STORE, "lane_id": "lane-02", "event_time": now - 5_000},
        "tx-late": {"store_id": STORE, "lane_id": "lane-03", "event_time": now - 5_000},
    }
    inspect = closer.enter_context(
        CheckoutInspector(settings, lookup=docs.get, engine=engine, watchlist_loader=lambda: watchlist)
    )

    reply = inspect("tx-s")
    assert f"matches **suspect** `subj-{suspect}`" in reply and f"store {STORE} lane lane-01" in reply
    kept = ImageStore.from_settings(settings).find("checkout", inspection_image_key("tx-s"))
    assert kept, "the fresh snapshot is kept, where no `fraud` finds it"
    assert "matches nobody" in inspect("tx-o")
    assert "do not know" in inspect("tx-unknown")
    control.set_fault(camera_for_lane(settings, STORE, "lane-03"), "never_ready")
    assert "no snapshot from camera" in inspect("tx-late")


def test_a_document_whose_ids_are_no_names_is_answered_without_asking_any_camera(tmp_path) -> None:
    asked: list[str] = []

    def snapshot(serial: str, **_: object) -> object:
        asked.append(serial)
        raise AssertionError("no camera may be asked")

    settings = Settings(stack_dir=tmp_path)
    docs = {"tx-x": {"store_id": "x/../Q2XX-VICTIM-0001/reboot?", "lane_id": "lane-01", "event_time": 1}}
    with CheckoutInspector(
        settings, lookup=docs.get, snapshot=snapshot, engine=object(), store=object(), watchlist_loader=lambda: None
    ) as inspect:
        reply = inspect("tx-x")
    assert "no camera I may ask" in reply and not asked


def test_one_unusable_watchlist_entry_leaves_the_others_in_the_inspectors_watchlist(monkeypatch):
    from infra.clients import control_topics
    from jobs.faces.checkout_inspect import load_watchlist
    from schemas.records import WatchlistEntry

    def entry(subject: str, values: int) -> bytes:
        return WatchlistEntry(subject, "SUSPECT", [[0.01] * values], "test", "lp@example.com", 1, None, None).encode()

    def read(_settings, apply, specs=()):
        apply("watchlist", b"subj-old", entry("subj-old", OTHER_FACE_LEN))  # another embedder's: refused, not fatal
        apply("watchlist", b"subj-new", entry("subj-new", FACE_LEN))

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    watchlist = load_watchlist(Settings())
    assert watchlist.subjects() == ["subj-new"]


def test_an_image_store_that_fails_still_gets_the_comparison_answered_and_says_the_picture_was_not_kept() -> None:
    """S3 away or a full disk: the follow-up reply was lost (the bot only logged a traceback); the comparison is the
    answer, and it says the picture was not kept."""
    from infra.clients.meraki import Snapshot

    class Away:
        def put(self, kind: str, key: str, data: bytes) -> str:
            raise OSError("no space left on device")

    class NoFace:
        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            return []

    def snapshot(serial: str, timestamp_ms: int | None = None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff" + bytes(64), "image/jpeg", timestamp_ms, False, 1, 1, 0.1)

    docs = {"tx-1": {"store_id": STORE, "lane_id": "lane-01", "event_time": 1_800_000_000_000}}
    inspect = CheckoutInspector(
        Settings(),
        lookup=docs.get,
        snapshot=snapshot,
        engine=NoFace(),
        store=Away(),
        watchlist_loader=lambda: pytest.fail("no face, nothing to compare"),
    )
    reply = inspect("tx-1")
    assert reply.startswith(f"Transaction `tx-1` at store {STORE} lane lane-01: fresh snapshot taken, no usable face")
    assert reply.endswith("The picture was not kept (image store: OSError).")


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"lane_id": "lane-01", "event_time": 1}, "store_id"),
        ({"store_id": "store-001", "event_time": 1}, "lane_id"),
        ({"store_id": "store-001", "lane_id": "lane-01"}, "event_time"),
        ({"store_id": "store-001", "lane_id": "lane-01", "event_time": "yesterday"}, "event_time"),
        ({}, "store_id, lane_id, event_time"),
    ],
)
def test_a_document_without_its_store_lane_or_time_is_answered_not_a_key_error(tmp_path, doc: dict, says: str) -> None:
    """A KeyError there ended the command with a traceback: the bot's follow-up reply never came."""

    def snapshot(serial: str, **_: object) -> object:
        raise AssertionError("no camera may be asked")

    with CheckoutInspector(
        Settings(stack_dir=tmp_path),
        lookup={"tx-x": doc}.get,
        snapshot=snapshot,
        engine=object(),
        store=object(),
        watchlist_loader=lambda: None,
    ) as inspect:
        reply = inspect("tx-x")
    assert reply == f"Transaction `tx-x` is indexed without its {says}: I cannot tell which camera to ask."


@pytest.mark.parametrize("of_the_sale", [True, False])
def test_a_match_in_the_reply_comes_with_its_threshold_and_the_advice_to_compare_the_faces(of_the_sale: bool) -> None:
    """The reply named a subject with a bare "68.8% similar": no threshold to read it against, and no word that a
    match is a lead for a person to check, not a verdict, which every alert and the case page say."""
    import numpy as np

    from infra.clients.meraki import Snapshot
    from jobs.faces.checkout_inspect import FACE_MATCH_CAVEAT
    from jobs.faces.engine import DetectedFace
    from jobs.scoring.watchlist import Match

    class OneFace:
        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            return [DetectedFace((0, 0, 80, 80), 0.9, True, None, np.zeros(FACE_LEN, dtype=np.float32))]

    class Kept:
        def put(self, kind: str, key: str, data: bytes) -> str:
            return f"file:{kind}/{key}"

    class Listed:
        def search(self, embedding: object, at_ms: int | None = None) -> Match:
            return Match("subj-tx-1", "SUSPECT", 68.83)

    def snapshot(serial: str, timestamp_ms: int | None = None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff" + bytes(64), "image/jpeg", timestamp_ms, not of_the_sale, 1, 1, 0.1)

    settings = Settings()
    docs = {"tx-2": {"store_id": STORE, "lane_id": "lane-01", "event_time": 1_800_000_000_000}}
    inspect = CheckoutInspector(
        settings, lookup=docs.get, snapshot=snapshot, engine=OneFace(), store=Kept(), watchlist_loader=Listed
    )
    reply = inspect("tx-2")
    assert "matches **suspect** `subj-tx-1` (68.8% similar)" in reply
    assert f"(the match threshold is {settings.faces.match_threshold:.1f})" in reply
    assert reply.endswith(FACE_MATCH_CAVEAT)
    assert ("This is not the buyer's picture" in reply) is not of_the_sale


def test_the_reply_names_no_entry_lapsed_by_now_and_writes_a_vip_as_the_alerts_do() -> None:
    """The bot's ``checkout`` searched the watch-list it read whole, lapsed entries too (the watchlist service
    tombstones them, and may be away), and named a VIP "**vip**"."""
    import numpy as np

    from infra.clients.meraki import Snapshot
    from jobs.faces.engine import DetectedFace

    probe = np.random.default_rng(5).normal(size=FACE_LEN).astype(np.float32)
    probe /= np.linalg.norm(probe)

    class OneFace:
        def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
            return [DetectedFace((0, 0, 80, 80), 0.9, True, None, probe)]

    class Kept:
        def put(self, kind: str, key: str, data: bytes) -> str:
            return f"file:{kind}/{key}"

    def snapshot(serial: str, timestamp_ms: int | None = None) -> Snapshot:
        return Snapshot(serial, b"\xff\xd8\xff" + bytes(64), "image/jpeg", timestamp_ms, False, 1, 1, 0.1)

    docs = {"tx-3": {"store_id": STORE, "lane_id": "lane-01", "event_time": 1_800_000_000_000}}
    now = int(time.time() * 1000)
    for expires_at, named in ((now + 86_400_000, True), (now - 1, False)):
        listed = Watchlist(Settings())
        listed.upsert(
            {
                "subject_id": "subj-v1",
                "category": "VIP",
                "embeddings": [probe.tolist()],
                "reference_image_ref": None,
                "reason": "t",
                "flagged_by": "t",
                "flagged_at": now - 1000,
                "expires_at": expires_at,
                "source_transaction_id": None,
            }
        )
        inspect = CheckoutInspector(
            Settings(),
            lookup=docs.get,
            snapshot=snapshot,
            engine=OneFace(),
            store=Kept(),
            watchlist_loader=lambda listed=listed: listed,
        )
        reply = inspect("tx-3")
        assert ("`subj-v1`" in reply) is named, reply
        assert ("matches **VIP** `subj-v1`" in reply) is named, reply
