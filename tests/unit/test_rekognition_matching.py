"""Matching with the Rekognition backend: the face stage searches each usable face in the collection, against
the local Rekognition stand-in (``infra/local/rekognition.py``) through the real boto3 client.

The face analyser is a fake that needs no photos: every bright square of a picture on a black background is a
face, its mean colour its embedding. So a picture can hold several faces, a crop holds the one it was cut around,
and two colours are "the same person" as closely as they are alike.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps
from pydantic import SecretStr

from infra.clients.image_store import LocalImageStore
from infra.clients.meraki import Snapshot
from infra.local.rekognition import LocalRekognition
from infra.settings import FaceSettings, Settings
from jobs.faces.rekognition import RekognitionError, RekognitionFaces, search_faces
from jobs.faces.stage import FaceStage
from schemas.records import FaceObservation, PosTransaction
from tests.builders import FACE_LEN

RED, DARK_RED, GREEN, BLUE = (220, 30, 30), (205, 30, 30), (30, 220, 30), (30, 30, 220)


class SquareFaces:
    """Bright squares are faces (split by dark columns): box, a quality of 0.9, and the mean
    colour (0-1) as embedding, padded to the configured embedder's length for the stage's observation. Like the
    engine (and Rekognition), it looks at the picture turned as its EXIF orientation says."""

    def analyse(self, data: bytes, max_embedded: int | None = None) -> list:
        try:
            rgb = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), dtype=np.float32)
        except Exception as exc:  # the engine's ValueError for bytes that are no image
            raise ValueError("unreadable") from exc
        bright = rgb.max(axis=2) > 100
        cols = bright.any(axis=0)
        faces, x = [], 0
        while x < len(cols):
            if not cols[x]:
                x += 1
                continue
            start = x
            while x < len(cols) and cols[x]:
                x += 1
            rows = np.where(bright[:, start:x].any(axis=1))[0]
            box = (start, int(rows[0]), x, int(rows[-1]) + 1)
            colour = rgb[box[1] : box[3], box[0] : box[2]].reshape(-1, 3).mean(axis=0) / 255
            embedding = np.zeros(FACE_LEN, dtype=np.float32)
            embedding[:3] = colour
            faces.append(SimpleNamespace(passed=True, box=box, scale=1.0, quality=0.9, embedding=embedding))
        return faces  # left to right, not largest first: the largest must be chosen by size


def colour_similarity(a, b) -> float:
    """Our 0-100 scale for the stand-in: the same colour 60 (~100 on its Rekognition scale), 10/255 apart ~56
    (still >= 99 there), a different colour far below."""
    return 60.0 - 100.0 * float(np.linalg.norm(np.asarray(a)[:3] - np.asarray(b)[:3]))


def picture(*squares: tuple[tuple[int, int, int], int, int]) -> bytes:
    """A 400x200 black JPEG with squares (colour, left, size)."""
    img = Image.new("RGB", (400, 200))
    for colour, left, size in squares:
        img.paste(colour, (left, 40, left + size, 40 + size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return out.getvalue()


STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
"""How a camera stores an upright picture it tags with EXIF orientation 3, 6 or 8 (viewers turn it back)."""


def rotated(upright: bytes, orientation: int) -> bytes:
    """``upright`` as a rotated camera's JPEG: its pixels stored turned, the EXIF orientation tag saying how to
    show them."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.open(io.BytesIO(upright)).transpose(STORED_TURN[orientation]).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def _settings(url: str, **update) -> FaceSettings:
    return FaceSettings(
        backend="rekognition",
        rekognition_endpoint_url=url,
        aws_region="us-east-1",
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
        **update,
    )


@pytest.fixture
def server():
    server = LocalRekognition(SquareFaces(), colour_similarity)
    url = server.start()
    yield server, url
    server.stop()


@pytest.fixture
def collection(server) -> RekognitionFaces:
    faces = RekognitionFaces(_settings(server[1]), timeout_s=5)
    faces.ensure_collection()
    faces.index("subj-red", picture((RED, 50, 60)))
    faces.index("subj-POS7+1@s1", picture((DARK_RED, 50, 60)))  # a subject id written escaped in AWS
    faces.index("subj-blue", picture((BLUE, 50, 60)))
    return faces


# --- the stand-in answers SearchFacesByImage as AWS does ---------------------------------------------------------


def test_the_stand_in_searches_the_largest_face_sorted_most_similar_first_above_the_threshold(collection) -> None:
    image = {"Bytes": picture((GREEN, 20, 30), (RED, 150, 80))}  # the green face is smaller
    resp = collection.client.search_faces_by_image(CollectionId=collection.collection, Image=image)
    sims = [m["Similarity"] for m in resp["FaceMatches"]]
    names = [m["Face"]["ExternalImageId"] for m in resp["FaceMatches"]]
    assert names == ["subj-red", "_subj-POS7_2B1_40s1"] and sims == sorted(sims, reverse=True)
    assert all(s >= 80 for s in sims), "80 is the API's default FaceMatchThreshold"
    box = resp["SearchedFaceBoundingBox"]
    assert (box["Left"], box["Top"], box["Width"], box["Height"]) == pytest.approx((0.375, 0.2, 0.2, 0.4), abs=0.01)
    strict = collection.client.search_faces_by_image(
        CollectionId=collection.collection, Image=image, FaceMatchThreshold=99.99, MaxFaces=5
    )
    assert [m["Face"]["ExternalImageId"] for m in strict["FaceMatches"]] == ["subj-red"]


def test_the_stand_in_indexes_the_largest_faces_up_to_max_faces_as_aws_does(server) -> None:
    faces = RekognitionFaces(_settings(server[1]), timeout_s=5)
    faces.ensure_collection()
    group = picture((GREEN, 20, 30), (RED, 150, 80))  # found left to right: the small green face first
    resp = faces.client.index_faces(CollectionId=faces.collection, Image={"Bytes": group}, MaxFaces=1)
    [record] = resp["FaceRecords"]
    assert record["Face"]["BoundingBox"]["Width"] == pytest.approx(0.2, abs=0.01), "the larger (red) face"
    [unindexed] = resp["UnindexedFaces"]
    assert unindexed["Reasons"] == ["EXCEEDS_MAX_FACES"]
    assert unindexed["FaceDetail"]["BoundingBox"]["Width"] == pytest.approx(0.075, abs=0.01)
    # through the backend (MaxFaces=1): the subject in front is enrolled, not the face behind them
    faces = RekognitionFaces(_settings(server[1], rekognition_collection="enrolled"), timeout_s=5)
    faces.ensure_collection()
    faces.index("subj-front", group)
    assert faces.search(picture((RED, 50, 60))).subject_id == "subj-front"
    assert faces.search(picture((GREEN, 50, 60))) is None


def test_the_stand_in_answers_an_image_without_a_face_with_invalid_parameter_as_aws_does(collection) -> None:
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as err:
        collection.client.search_faces_by_image(CollectionId=collection.collection, Image={"Bytes": picture()})
    assert err.value.response["Error"]["Code"] == "InvalidParameterException"
    assert collection.search(picture()) is None  # the backend: no face, no match


# --- search_faces: each usable face, cropped -----------------------------------------------------------------------


def test_each_usable_face_is_searched_on_its_own_crop_and_the_best_match_wins(server, collection) -> None:
    """SearchFacesByImage searches only the largest face of what it is sent: a smaller face (the blue one) is
    found only because each face is sent cropped."""
    image = picture((GREEN, 20, 90), (BLUE, 250, 50))
    faces = SquareFaces().analyse(image)
    before = server[0].calls.count("SearchFacesByImage")
    found = search_faces(collection, image, faces)
    assert found.match is not None and found.match.subject_id == "subj-blue" and found.failed is None
    assert found.match.similarity >= 99
    assert server[0].calls.count("SearchFacesByImage") - before == 2
    assert search_faces(collection, picture((GREEN, 20, 90)), SquareFaces().analyse(picture((GREEN, 20, 90)))) == (
        type(found)(None, None)
    )


def test_an_escaped_external_image_id_is_mapped_back_to_its_subject(collection) -> None:
    strict = RekognitionFaces(collection.settings.model_copy(update={"rekognition_match_threshold": 99.99}))
    strict.client = collection.client
    image = picture((DARK_RED, 100, 60))
    assert search_faces(strict, image, SquareFaces().analyse(image)).match.subject_id == "subj-POS7+1@s1"


def test_a_subject_id_too_long_to_escape_is_matched_by_a_search_without_a_list_of_subjects(collection) -> None:
    """A sale id with many ``+`` or ``@`` passes 255 characters escaped: it was hashed, and the face stage and
    ``checkout <tx>`` (which search without a list of subjects) never named the subject of a match."""
    from jobs.faces.rekognition import EXTERNAL_IMAGE_ID_RE

    subject = "subj-" + "+@" * 61 + "1"
    collection.index(subject, picture((GREEN, 50, 60)))
    listed = collection.client.list_faces(CollectionId=collection.collection)["Faces"]
    assert all(EXTERNAL_IMAGE_ID_RE.fullmatch(f["ExternalImageId"]) for f in listed)
    image = picture((GREEN, 100, 60))
    found = search_faces(collection, image, SquareFaces().analyse(image))
    assert found.match is not None and found.match.subject_id == subject


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_face_in_an_exif_rotated_jpeg_is_cropped_where_it_was_found_and_matched(collection, orientation) -> None:
    """The face box is of the picture turned as EXIF says (where the engine finds faces): the crop was cut from
    the stored, unturned pixels, held no face, and the watch-listed face went unmatched."""
    image = rotated(picture((RED, 250, 50)), orientation)
    faces = SquareFaces().analyse(image)
    assert [f.box for f in faces] == [(250, 40, 300, 90)], "the box in the upright picture"
    found = search_faces(collection, image, faces)
    assert found.failed is None and found.match is not None and found.match.subject_id == "subj-red"


class Throttled:
    def __init__(self, code: str = "ThrottlingException", transient: bool = True) -> None:
        self.calls = 0
        self.code, self.transient = code, transient

    def search(self, image, subjects=()):
        self.calls += 1
        raise RekognitionError(self.code, "x", self.transient)


def test_throttling_stops_the_search_of_the_snapshot_and_is_a_failure_not_no_match() -> None:
    image = picture((GREEN, 20, 60), (BLUE, 250, 60))
    throttled = Throttled()
    found = search_faces(throttled, image, SquareFaces().analyse(image))
    assert (found.match, found.failed, throttled.calls) == (None, "ThrottlingException", 1)
    refused = Throttled("InvalidImageFormatException", transient=False)
    assert search_faces(refused, image, SquareFaces().analyse(image)).failed == "InvalidImageFormatException"
    assert refused.calls == 2  # an error of that crop alone: the other face is still tried


def test_access_denied_or_a_missing_collection_is_not_tried_per_face_and_is_logged_once_naming_the_setting(
    server, caplog
) -> None:
    """Access denied (or a collection that does not exist) was tried again for each of up to 4 faces of every
    snapshot, each call failing the same way, and nothing said which setting to fix. The first refusal now ends
    the snapshot's search (still a failure, not "no match"), and one ERROR names the setting."""
    missing = RekognitionFaces(_settings(server[1], rekognition_collection="no-such-collection"), timeout_s=5)
    image = picture((GREEN, 10, 60), (BLUE, 110, 60), (RED, 210, 60), (DARK_RED, 310, 60))
    faces = SquareFaces().analyse(image)
    before = server[0].calls.count("SearchFacesByImage")
    with caplog.at_level("ERROR", logger="jobs.faces.rekognition"):
        outcomes = [search_faces(missing, image, faces) for _ in range(3)]
    assert {(o.match, o.failed) for o in outcomes} == {(None, "ResourceNotFoundException")}
    assert server[0].calls.count("SearchFacesByImage") - before == 3, "one call per snapshot, not one per face"
    (logged,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "CG_FACES__REKOGNITION_COLLECTION" in logged.getMessage()
    denied = Throttled("AccessDeniedException", transient=False)
    assert search_faces(denied, image, faces).failed == "AccessDeniedException" and denied.calls == 1


# --- the face stage ---------------------------------------------------------------------------------------------


def _stage(tmp_path: Path, image: bytes, collection) -> FaceStage:
    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        return Snapshot(serial, image, "image/jpeg", at_ms, False, 1, 2, 0.1)

    return FaceStage(Settings(), snapshot, SquareFaces(), LocalImageStore(tmp_path / "images"), collection=collection)


def _observe(stage: FaceStage) -> FaceObservation:
    now = int(time.time() * 1000)
    tx = PosTransaction("tx-rk-1", now, "store-001", "lane-01", "SALE", 12.5, "USD").encode()
    return stage.observe(stage.plan_transaction(tx, now)[0], now)


def test_the_stage_reports_the_rekognition_match_with_subject_and_similarity(tmp_path, collection) -> None:
    obs = _observe(_stage(tmp_path, picture((GREEN, 20, 90), (RED, 250, 50)), collection))
    assert (obs.status, obs.subject_id, obs.matcher, obs.category) == ("MATCHED", "subj-red", "rekognition", None)
    assert 99 <= obs.similarity <= 100 and obs.image_ref and len(obs.embedding) == FACE_LEN
    assert obs.embedding[:3] == pytest.approx([g / 255 for g in GREEN], abs=0.02)  # the largest face's, as before
    assert FaceObservation.decode(obs.encode()) == obs


def test_the_stage_reports_a_searched_face_without_a_match_as_no_match_by_rekognition(tmp_path, collection) -> None:
    obs = _observe(_stage(tmp_path, picture((GREEN, 20, 90)), collection))
    assert (obs.status, obs.subject_id, obs.similarity, obs.matcher) == ("NO_MATCH", None, None, "rekognition")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rekognition_that_is_down_makes_the_match_unavailable_not_no_match_and_the_stage_goes_on(tmp_path) -> None:
    down = RekognitionFaces(_settings(f"http://127.0.0.1:{_closed_port()}"), timeout_s=1)
    stage = _stage(tmp_path, picture((RED, 20, 60)), down)
    started = time.monotonic()
    obs = _observe(stage)
    assert time.monotonic() - started < 20, "botocore's 4 tries, each bounded by the timeout"
    assert (obs.status, obs.matcher, obs.subject_id) == ("UNAVAILABLE", "rekognition", None)
    assert obs.reason.startswith("Rekognition search failed: ") and obs.image_ref and obs.embedding


def test_the_local_backend_stage_searches_nothing_and_leaves_the_match_to_the_job(tmp_path) -> None:
    obs = _observe(_stage(tmp_path, picture((RED, 20, 60)), None))
    assert (obs.status, obs.matcher, obs.subject_id) == ("NO_MATCH", None, None)


def test_the_stage_builds_a_collection_only_for_the_rekognition_backend() -> None:
    from jobs.faces.stage import collection_of

    assert collection_of(Settings()) is None
    built = collection_of(Settings(faces=_settings("http://127.0.0.1:9")))
    assert isinstance(built, RekognitionFaces)
    assert built.client.meta.config.read_timeout == Settings().faces.rekognition_search_timeout_s


# --- checkout <tx> ----------------------------------------------------------------------------------------------


def test_checkout_inspect_with_rekognition_names_the_match_and_the_engine(tmp_path, collection) -> None:
    from jobs.faces.checkout_inspect import CheckoutInspector

    image = picture((RED, 100, 60))
    doc = {"store_id": "store-001", "lane_id": "lane-01", "event_time": 1_800_000_000_000}
    watchlist = SimpleNamespace(category=lambda s, at_ms=None: "SUSPECT" if s == "subj-red" else None)

    def inspector(collection_) -> CheckoutInspector:
        return CheckoutInspector(
            Settings(),
            lookup=lambda tx: doc,
            snapshot=lambda serial, timestamp_ms: Snapshot(serial, image, "image/jpeg", timestamp_ms, False, 1, 1, 0.1),
            engine=SquareFaces(),
            watchlist_loader=lambda: watchlist,
            store=LocalImageStore(tmp_path / "images"),
            collection=collection_,
        )

    reply = inspector(collection)("tx-9")
    assert "**suspect** `subj-red`" in reply and "similar by Rekognition)" in reply
    down = RekognitionFaces(_settings(f"http://127.0.0.1:{_closed_port()}"), timeout_s=1)
    assert "Rekognition unavailable" in inspector(down)("tx-9")
