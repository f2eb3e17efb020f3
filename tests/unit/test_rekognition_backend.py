"""Rekognition backend and S3 image store against local servers: moto (server mode) for S3, and
``infra/local/rekognition.py`` for the collection calls moto does not implement."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import boto3
import pytest
from pydantic import SecretStr

from infra.clients.image_store import ImageStore, S3ImageStore
from infra.local.rekognition import LocalRekognition
from infra.settings import FaceSettings, Settings
from jobs.faces.engine import FaceEngine
from jobs.faces.rekognition import RekognitionFaces
from jobs.scoring.face_similarity import similarity

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
IMAGES = FACES / "face_recognition" / "test_images"
needs_faces = pytest.mark.skipif(not IMAGES.is_dir(), reason="shared face photos (../shared/data/faces) absent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def settings(moto_url, tmp_path) -> Settings:
    run = uuid.uuid4().hex[:12]
    faces = FaceSettings(
        image_store="s3",
        backend="rekognition",
        aws_endpoint_url=moto_url,
        aws_region="us-east-1",
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
        checkout_bucket=f"checkout-{run}",
        suspects_bucket=f"suspects-{run}",
    )
    return Settings(stack_dir=tmp_path, faces=faces)


@pytest.fixture
def store(settings) -> S3ImageStore:
    s = ImageStore.from_settings(settings)
    assert isinstance(s, S3ImageStore)
    s.ensure_buckets()
    return s


@pytest.fixture
def rekognition(settings, moto_url):
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    server = LocalRekognition(FaceEngine(FaceSettings()), similarity, s3_client=s3)
    url = server.start()
    faces = RekognitionFaces(settings.faces.model_copy(update={"rekognition_endpoint_url": url}))
    faces.ensure_collection()
    yield faces, server
    server.stop()


def test_s3_store_round_trips_and_finds_by_kind_and_key(store):
    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    assert ref.startswith("s3://") and store.get(ref) == b"\xff\xd8jpeg"
    assert store.find("checkout", "tx-1") == ref
    assert store.find("checkout", "tx-2") is None
    assert store.put("reference", "subj-tx-1", b"r").startswith(f"s3://{store.buckets['reference']}/")


def test_s3_purge_deletes_old_unretained_snapshots_but_keeps_retained_and_references(store):
    old = store.put("checkout", "tx-old", b"a")
    kept = store.put("checkout", "tx-alerted", b"b")
    ref = store.put("reference", "subj-x", b"c")
    store.retain(kept, "alert a-1 subject=subj-x")
    assert store.purge(older_than_ms=0) == 0, "nothing is older than the epoch"
    import time

    assert store.purge(older_than_ms=int(time.time() * 1000) + 60_000) == 1
    assert store.find("checkout", "tx-old") is None and old
    assert store.get(kept) == b"b" and store.get(ref) == b"c"
    assert store.retained() == {kept: "alert a-1 subject=subj-x"}


def test_s3_retained_snapshots_go_after_their_own_longer_period(store):
    old = store.put("checkout", "tx-dismissed", b"a")
    store.retain(old, "subject=- alert=a1")
    import time

    assert store.purge_retained(0) == 0, "nothing is older than the epoch"
    assert store.purge_retained(int(time.time() * 1000) + 60_000) == 1
    assert store.find("checkout", "tx-dismissed") is None and store.retained() == {}


def test_s3_retaining_a_missing_object_is_file_not_found(store):
    with pytest.raises(FileNotFoundError):
        store.retain(f"s3://{store.buckets['checkout']}/checkout/tx-gone", "alert=a9 subject=-")


def test_s3_delete_removes_the_object(store):
    ref = store.put("entrance", "Q2MV-S1-ENTRANCE:7", b"x")
    store.delete(ref)
    assert store.find("entrance", "Q2MV-S1-ENTRANCE:7") is None


@needs_faces
def test_rekognition_indexes_from_s3_matches_the_same_person_and_forgets(store, rekognition):
    faces, server = rekognition
    ref = store.put("reference", "subj-tx-9", (IMAGES / "obama.jpg").read_bytes())
    ids = faces.index("subj-tx-9", ref)
    assert len(ids) == 1
    assert faces.index("subj-tx-9", ref) == ids, "re-enrolling the same subject indexes nothing new"
    match = faces.search((IMAGES / "obama2.jpg").read_bytes())
    assert match is not None and match.subject_id == "subj-tx-9" and match.similarity >= 99.0
    assert faces.search((IMAGES / "biden.jpg").read_bytes()) is None
    assert faces.forget("subj-tx-9") == 1
    assert faces.search((IMAGES / "obama2.jpg").read_bytes()) is None
    assert faces.face_ids("subj-tx-9") == []
    assert {"CreateCollection", "IndexFaces", "ListFaces", "SearchFacesByImage", "DeleteFaces"} <= set(server.calls)


@needs_faces
def test_rekognition_search_without_a_face_is_no_match_not_an_error(rekognition):
    faces, _ = rekognition
    assert faces.search((FACES / "no_face" / "dogs.jpg").read_bytes()) is None


def test_rekognition_errors_carry_the_aws_code(settings, rekognition):
    from jobs.faces.rekognition import RekognitionError

    faces, _ = rekognition
    other = RekognitionFaces(faces.settings.model_copy(update={"rekognition_collection": "missing"}))
    with pytest.raises(RekognitionError) as err:
        other.face_ids("subj-1")
    assert err.value.code == "ResourceNotFoundException"


class _Raising:
    """A Rekognition client whose every call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, op: str):
        def call(**_: object):
            raise self.error

        return call


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def _botocore(name: str) -> Exception:
    from botocore import exceptions as bce

    if name == "EndpointConnectionError":
        return bce.EndpointConnectionError(endpoint_url="https://rekognition.us-east-1.amazonaws.com")
    if name == "ReadTimeoutError":
        return bce.ReadTimeoutError(endpoint_url="https://rekognition.us-east-1.amazonaws.com")
    if name == "ParamValidationError":
        return bce.ParamValidationError(report="Invalid length for parameter Image.Bytes")
    return getattr(bce, name)()


def _code(error: Exception) -> str:
    from botocore.exceptions import ClientError

    return error.response["Error"]["Code"] if isinstance(error, ClientError) else type(error).__name__


@pytest.mark.parametrize(
    ("error", "transient", "setting"),
    [
        (_client_error("ThrottlingException", 400), True, None),
        (_client_error("ProvisionedThroughputExceededException", 400), True, None),
        (_client_error("InternalServerError", 500), True, None),
        (_botocore("EndpointConnectionError"), True, None),
        (_botocore("ReadTimeoutError"), True, None),
        (_client_error("AccessDeniedException", 400), False, "CG_FACES__AWS_ACCESS_KEY_ID"),
        (_client_error("UnrecognizedClientException", 400), False, "CG_FACES__AWS_ACCESS_KEY_ID"),
        (_botocore("NoCredentialsError"), False, "CG_FACES__AWS_ACCESS_KEY_ID"),
        (_client_error("ResourceNotFoundException", 400), False, "CG_FACES__REKOGNITION_COLLECTION"),
        (_client_error("InvalidParameterException", 400), False, None),
        (_client_error("InvalidImageFormatException", 400), False, None),
        (_client_error("ImageTooLargeException", 400), False, None),
        (_botocore("ParamValidationError"), False, None),
    ],
    ids=lambda v: _code(v) if isinstance(v, Exception) else None,
)
def test_rekognition_errors_are_temporary_only_for_throttling_5xx_and_the_way_to_aws(error, transient, setting):
    """Every botocore error but a ClientError counted as temporary (no credentials, a refused parameter: retried
    later, "issue the command again"), and an error of the setup looked like one of the image. Each now says
    whether another try may work, why it failed and, for access and a missing collection, the setting to fix."""
    from jobs.faces.rekognition import RekognitionError

    faces = RekognitionFaces(FaceSettings(backend="rekognition"), client=_Raising(error))
    with pytest.raises(RekognitionError) as err:
        faces.face_ids("subj-1")
    assert err.value.transient is transient
    assert err.value.configuration is (setting is not None)
    assert setting is None or setting in (err.value.setting or "") and setting in str(err.value)
    if not transient:
        assert err.value.reason and err.value.reason != "refused", "a clear reason"


@needs_faces
def test_watchlist_service_with_rekognition_indexes_on_fraud_and_deletes_on_forget(settings, store, rekognition):
    from infra.command_auth import SIGNATURE_HEADER, sign_command
    from infra.settings import WebexSettings
    from jobs.faces.watchlist_service import Source, WatchlistCore
    from schemas.records import AuditEvent, BotCommand
    from schemas.topics import AUDIT

    faces, server = rekognition
    webex = WebexSettings(command_signing_key=SecretStr("test-key"), allowed_people="lp@example.com")
    core = WatchlistCore(settings.model_copy(update={"webex": webex}), store=store, rekognition=faces)
    store.put("checkout", "tx-77", (IMAGES / "obama.jpg").read_bytes())

    def run(verb, arg, cid):
        cmd = BotCommand(command_id=cid, issued_at=1, verb=verb, actor="lp@example.com", argument=arg)
        signature = ((SIGNATURE_HEADER, sign_command(cmd, "test-key")),)
        outs = core.on_command(Source("commands", 0, 0, None, cmd.encode(), signature), 2)
        return next(AuditEvent.decode(o.value) for o in outs if o.topic == AUDIT)

    enrolled = run("FRAUD", "tx-77", "c1")
    assert enrolled.outcome == "DONE" and enrolled.details["rekognition_faces"] == "1"
    assert enrolled.details["image_ref"].startswith("s3://")
    assert faces.search((IMAGES / "obama2.jpg").read_bytes()).subject_id == "subj-tx-77"
    forgot = run("FORGET", "subj-tx-77", "c2")
    assert forgot.details["rekognition_faces_deleted"] == "1" and forgot.details["images_deleted"] == "2"
    assert faces.face_ids("subj-tx-77") == [] and store.find("reference", "subj-tx-77") is None
    assert "DeleteFaces" in server.calls


@pytest.mark.parametrize(
    "subject",
    [
        "subj-tx-1",
        "subj-POS7+00042@store-001",
        "subj-a_2Bb",
        "subj-a+b",
        "subj-a_b@c",
        "s" + "+" * 127,
        "s" + "@_" * 63,
        "subj-" + "@" * 123,
        "sha256-" + "a" * 64 + "+",
    ],
)
def test_every_subject_id_has_a_valid_distinct_external_image_id_that_names_it_again(subject):
    from jobs.faces.rekognition import EXTERNAL_IMAGE_ID_RE, external_image_id, subject_of
    from schemas.identifiers import ID_RE

    assert ID_RE.fullmatch(subject), "a subject id the pipeline accepts"
    external = external_image_id(subject)
    assert EXTERNAL_IMAGE_ID_RE.fullmatch(external), "Rekognition's pattern, 1-255 characters"
    assert subject_of(external) == subject, "named again without a list of subjects, as the face stage searches"
    others = ["subj-tx-1", "subj-POS7+00042@store-001", "subj-a_2Bb", "subj-a+b", "subj-a_b@c", "s" + "+" * 127]
    assert [o for o in others if o != subject and external_image_id(o) == external] == []


def test_a_valid_subject_id_keeps_its_external_image_id_so_existing_collections_still_work():
    from jobs.faces.rekognition import external_image_id

    assert external_image_id("subj-POS7-00042:store-001.a_b") == "subj-POS7-00042:store-001.a_b"
    assert external_image_id("subj-POS7+00042@store-001") == "_subj-POS7_2B00042_40store-001"


def test_forget_deletes_faces_an_earlier_version_indexed_under_a_hashed_external_image_id(one_face):
    import hashlib

    faces, _ = one_face
    subject = "subj-" + "+" * 100
    hashed = "_sha256-" + hashlib.sha256(subject.encode()).hexdigest()
    faces.client.index_faces(CollectionId=faces.collection, Image={"Bytes": _jpeg()}, ExternalImageId=hashed)
    assert faces.search(_jpeg(), (subject,)).subject_id == subject, "still named among known subjects"
    assert len(faces.index(subject, _jpeg())) == 1, "indexed again under an id a search names"
    assert faces.forget(subject) == 2 and faces.client.list_faces(CollectionId=faces.collection)["Faces"] == []


def _one_face_server():
    """The stand-in with an analyser that finds one face in any image (the names are what is tested)."""
    from types import SimpleNamespace

    import numpy as np

    face = SimpleNamespace(passed=True, box=(0, 0, 10, 10), scale=1.0, embedding=np.ones(4))
    return LocalRekognition(SimpleNamespace(analyse=lambda data: [face]), lambda a, b: 100.0)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, "JPEG")
    return buf.getvalue()


def test_the_local_rekognition_refuses_an_external_image_id_outside_the_apis_pattern_as_aws_does(one_face):
    from botocore.exceptions import ClientError

    faces, _ = one_face
    with pytest.raises(ClientError) as err:
        faces.client.index_faces(
            CollectionId=faces.collection, Image={"Bytes": _jpeg()}, ExternalImageId="subj-POS7+00042@store-001"
        )
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert "externalImageId" in err.value.response["Error"]["Message"]
    # through the backend: indexed under the mapped id, found again and deleted by forget
    assert len(faces.index("subj-POS7+00042@store-001", _jpeg())) == 1
    assert faces.search(_jpeg()).subject_id == "subj-POS7+00042@store-001"
    assert faces.forget("subj-POS7+00042@store-001") == 1 and faces.face_ids("subj-POS7+00042@store-001") == []


@pytest.fixture
def one_face():
    """The one-face stand-in and a backend on it (what the stand-in refuses is tested, not the engine)."""
    server = _one_face_server()
    url = server.start()
    faces = RekognitionFaces(
        FaceSettings(
            rekognition_endpoint_url=url,
            aws_region="us-east-1",
            aws_access_key_id=SecretStr("testing"),
            aws_secret_access_key=SecretStr("testing"),
        )
    )
    faces.ensure_collection()
    yield faces, server
    server.stop()


def _image_bytes(fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_the_local_rekognition_refuses_an_image_that_is_not_jpeg_or_png_as_aws_does(one_face, fmt):
    from botocore.exceptions import ClientError

    from jobs.faces.rekognition import RekognitionError

    faces, _ = one_face
    with pytest.raises(ClientError) as err:
        faces.client.search_faces_by_image(CollectionId=faces.collection, Image={"Bytes": _image_bytes(fmt)})
    assert err.value.response["Error"]["Code"] == "InvalidImageFormatException"
    with pytest.raises(RekognitionError) as refused:
        faces.index("subj-1", _image_bytes(fmt))
    assert refused.value.code == "InvalidImageFormatException" and not refused.value.transient
    assert len(faces.index("subj-1", _image_bytes("PNG"))) == 1
    assert faces.search(_image_bytes("JPEG")).subject_id == "subj-1"


def test_the_local_rekognition_refuses_images_over_awss_size_limits(moto_url, settings, store):
    """5 MB as bytes (botocore does not check it: AWS answers ``ValidationException``), 15 MB from S3."""
    from botocore.exceptions import ClientError

    from jobs.faces.rekognition import RekognitionError

    server = _one_face_server()
    server.s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    url = server.start()
    try:
        faces = RekognitionFaces(settings.faces.model_copy(update={"rekognition_endpoint_url": url}))
        faces.ensure_collection()
        jpeg = _image_bytes("JPEG")
        with pytest.raises(ClientError) as err:
            faces.client.index_faces(CollectionId=faces.collection, Image={"Bytes": jpeg + b"\0" * 5 * 1024 * 1024})
        assert err.value.response["Error"]["Code"] == "ValidationException"
        assert "image.bytes" in err.value.response["Error"]["Message"]
        big = jpeg + b"\0" * 15 * 1024 * 1024
        bucket = settings.faces.suspects_bucket
        server.s3.put_object(Bucket=bucket, Key="big.jpg", Body=big)
        with pytest.raises(RekognitionError) as refused:
            faces.index("subj-big", f"s3://{bucket}/big.jpg")
        assert refused.value.code == "ImageTooLargeException"
        server.s3.put_object(Bucket=bucket, Key="fits.jpg", Body=jpeg + b"\0" * 6 * 1024 * 1024)
        assert len(faces.index("subj-fits", f"s3://{bucket}/fits.jpg")) == 1, "from S3, 6 MB is allowed"
    finally:
        server.stop()


def test_the_local_rekognition_refuses_numbers_and_lists_over_the_apis_maxima_as_aws_does(one_face):
    """botocore checks the lower bounds only: past 4096 faces, results or face ids AWS answers ValidationException."""
    from botocore.exceptions import ClientError

    faces, _ = one_face
    client, collection = faces.client, faces.collection
    image = {"Bytes": _image_bytes("JPEG")}
    calls = {
        "maxFaces": lambda: client.search_faces_by_image(CollectionId=collection, Image=image, MaxFaces=4097),
        "faceMatchThreshold": lambda: client.search_faces_by_image(
            CollectionId=collection, Image=image, FaceMatchThreshold=100.5
        ),
        "maxResults": lambda: client.list_faces(CollectionId=collection, MaxResults=4097),
        "faceIds": lambda: client.delete_faces(CollectionId=collection, FaceIds=["f"] * 4097),
    }
    for member, call in calls.items():
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "ValidationException", member
        assert member in err.value.response["Error"]["Message"]
    assert client.search_faces_by_image(CollectionId=collection, Image=image, MaxFaces=4096)["FaceMatches"] == []
    assert client.delete_faces(CollectionId=collection, FaceIds=["f"] * 4096)["DeletedFaces"] == []
