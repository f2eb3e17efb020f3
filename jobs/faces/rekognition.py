"""The second face backend: an Amazon Rekognition collection through boto3 (as seed 000 used).

What it does in the pipeline: the watchlist service indexes each enrolled face here and deletes a subject's
faces on forget or expiry; the face stage (and ``checkout <tx>``) searches each usable face of a snapshot here
(:func:`search_faces`: SearchFacesByImage on the face cropped out of the picture) and reports the subject it
found, which the scoring job takes as the match instead of searching the embedding itself.

Enrolled faces are indexed with ``ExternalImageId`` = the subject id (:func:`external_image_id`), so a
search answers with our subject ids and ``forget`` can find every face of a subject. Images go by S3
object when they are already in the checkout/suspects buckets (``s3://`` refs of the S3 image store),
else as bytes (<= 5 MB; a larger enrolment picture goes as its face cropped). Rekognition's similarity is its
own 0-100 scale; its threshold is ``faces.rekognition_match_threshold`` (AWS advises >= 99 plus human review for
public-safety uses).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infra.clients import aws
from infra.settings import FaceSettings
from schemas.errors import CheckoutGuardError

log = logging.getLogger("jobs.faces.rekognition")

MAX_BYTES = 5 * 1024 * 1024
EXTERNAL_IMAGE_ID_RE = re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")
"""What Rekognition accepts as ``ExternalImageId`` (API_Face: pattern ``[a-zA-Z0-9_.\\-:]+``, 1-255 characters).
botocore does not check the pattern: AWS answers ``ValidationException``."""
_ESCAPED = re.compile(r"_([0-9A-F]{2})")
_ENCODED = "_:"
"""Prefix of a subject id written in base32 (:func:`external_image_id`). An escaped id goes on with the subject id's
first character, always alphanumeric, so the two never meet."""
_LEGACY_HASHED = re.compile(r"_sha256-[0-9a-f]{64}")
"""What earlier versions wrote for an id too long to escape: not reversible, so still found by :func:`subject_of`
among known subjects, and still deleted by ``forget``."""
ATTEMPTS = 4
"""Calls per request in botocore's ``standard`` retry mode: throttling, 5xx and connection errors are tried again
with jittered exponential backoff, then the error is the caller's (bounded: a command never waits long)."""
RETRY_WAIT_S = aws.standard_retry_wait_s(ATTEMPTS)
"""The longest botocore's ``standard`` mode waits between the tries of one call (22 s for 4 tries)."""
TRANSIENT_CODES = frozenset(
    {"ThrottlingException", "ProvisionedThroughputExceededException", "LimitExceededException", "RequestTimeout"}
)
"""Codes worth another try later (with any 5xx or 429); every other code is given again for the same call."""
CREDENTIALS = (
    "CG_FACES__AWS_ACCESS_KEY_ID / CG_FACES__AWS_SECRET_ACCESS_KEY (else boto3's credential chain) and their IAM policy"
)
COLLECTION_SETTING = "CG_FACES__REKOGNITION_COLLECTION"
CONFIGURATION_ERRORS: dict[str, tuple[str, str]] = {
    "AccessDeniedException": ("access denied: the AWS credentials may not make this Rekognition call", CREDENTIALS),
    "UnrecognizedClientException": ("AWS does not know the access key id", CREDENTIALS),
    "InvalidSignatureException": ("the secret access key does not match the access key id", CREDENTIALS),
    "NoCredentialsError": ("no AWS credentials found", CREDENTIALS),
    "PartialCredentialsError": ("incomplete AWS credentials", CREDENTIALS),
    "ResourceNotFoundException": (
        "the collection does not exist (the watchlist service creates it when it starts)",
        COLLECTION_SETTING,
    ),
}
"""Errors of the setup, not of an image (reason, setting to check): every call fails the same way until the
setting is fixed, so one is logged once as an ERROR naming the setting and a snapshot's other faces are not tried."""
REFUSALS: dict[str, str] = {
    "InvalidParameterException": "a parameter Rekognition refuses (for a search: no face in the image)",
    "ValidationException": "a parameter outside the API's pattern or limits",
    "ParamValidationError": "a parameter botocore refuses before sending it",
    "InvalidImageFormatException": "an image Rekognition cannot read (JPEG or PNG only)",
    "ImageTooLargeException": "an image over Rekognition's limits (5 MB as bytes, 15 MB from S3)",
    "InvalidS3ObjectException": "an S3 object Rekognition cannot read (missing, or not allowed)",
}
"""Errors of one request, given again for it (reason)."""


def external_image_id(subject_id: str) -> str:
    """The ``ExternalImageId`` of ``subject_id``: the id itself when Rekognition accepts it (every id of an
    existing collection, so its faces are still found), else ``_`` + the id with ``_`` and every refused
    character (``+``, ``@``) written ``_XX`` (hex). One that would pass 255 characters so (many ``+`` or ``@``) is
    ``_:`` + its UTF-8 in base32 (207 characters at most, for the 128 of a subject id). Every form names the subject
    again (:func:`subject_of`), as the face stage and ``checkout <tx>`` search without a list of subjects."""
    if EXTERNAL_IMAGE_ID_RE.fullmatch(subject_id):
        return subject_id
    escaped = "_" + "".join(
        c if c != "_" and EXTERNAL_IMAGE_ID_RE.fullmatch(c) else f"_{ord(c):02X}" for c in subject_id
    )
    if EXTERNAL_IMAGE_ID_RE.fullmatch(escaped):
        return escaped
    encoded = _ENCODED + base64.b32encode(subject_id.encode()).decode().rstrip("=")
    if not EXTERNAL_IMAGE_ID_RE.fullmatch(encoded):
        raise ValueError(f"a subject id of {len(subject_id)} characters has no ExternalImageId (at most 128)")
    return encoded


def _legacy_external_image_id(subject_id: str) -> str | None:
    """The ``_sha256-<hex>`` earlier versions indexed ``subject_id``'s faces under, when it was too long to escape."""
    if external_image_id(subject_id).startswith(_ENCODED):
        return "_sha256-" + hashlib.sha256(subject_id.encode()).hexdigest()
    return None


def subject_of(external_id: str, subjects: tuple[str, ...] = ()) -> str | None:
    """The subject id an ``ExternalImageId`` stands for (:func:`external_image_id` reversed); an earlier version's
    hashed one is found among ``subjects`` only, else None (as is one that decodes to no text)."""
    if not external_id.startswith("_"):
        return external_id
    if _LEGACY_HASHED.fullmatch(external_id):
        return next((s for s in subjects if _legacy_external_image_id(s) == external_id), None)
    if external_id.startswith(_ENCODED):
        data = external_id[len(_ENCODED) :]
        try:
            return base64.b32decode(data + "=" * (-len(data) % 8)).decode()
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            return None
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), external_id[1:])


@dataclass(frozen=True)
class CollectionMatch:
    subject_id: str
    similarity: float
    face_id: str


class RekognitionError(CheckoutGuardError, RuntimeError):
    """A Rekognition call failed; ``code`` is the AWS error code (e.g. ``InvalidParameterException``), or botocore's
    exception name. ``transient``: throttling, a 5xx or no connection (botocore already tried again), worth another
    try later; anything else fails the same way again. ``reason`` says why in words; ``setting`` names what to fix
    when the setup is wrong (:data:`CONFIGURATION_ERRORS`: access denied, bad credentials, a missing collection)."""

    def __init__(self, code: str, message: str, transient: bool = False) -> None:
        self.code = code
        self.transient = transient
        self.reason, setting = CONFIGURATION_ERRORS.get(code, (REFUSALS.get(code, ""), ""))
        if not self.reason:
            self.reason = "not answered, worth another try later" if transient else "refused"
        self.setting: str | None = setting or None
        super().__init__(f"{code}: {self.reason}" + (f"; check {setting}" if setting else "") + f" ({message})")

    @property
    def configuration(self) -> bool:
        """Every call fails this way until a setting is fixed (not only this image's)."""
        return self.setting is not None


def _connection_trouble(exc: Exception) -> bool:
    """A botocore error of the way to AWS (no connection, a timeout, a cut answer, credentials not fetched in
    time): another try later may work. The others (no credentials, a parameter botocore refuses) are the same on
    every try."""
    from botocore import exceptions as bce

    away = (
        bce.ConnectionError,
        bce.HTTPClientError,
        bce.IncompleteReadError,
        bce.CredentialRetrievalError,
        bce.MetadataRetrievalError,
    )
    return isinstance(exc, away)


def call_limit_s(timeout_s: float) -> float:
    """The longest one Rekognition call takes when each try's connect and read time out after ``timeout_s``: every
    try timing out twice (connecting, reading) plus :data:`RETRY_WAIT_S`."""
    return aws.call_limit_s(ATTEMPTS, timeout_s)


def _image(image: bytes | str) -> dict[str, Any]:
    if isinstance(image, str):
        if not image.startswith("s3://"):
            raise ValueError("image refs must be s3:// refs; pass bytes for local images")
        bucket, _, key = image[5:].partition("/")
        return {"S3Object": {"Bucket": bucket, "Name": key}}
    if len(image) > MAX_BYTES:
        raise ValueError(f"image of {len(image)} bytes exceeds Rekognition's 5 MB byte limit")
    return {"Bytes": image}


class RekognitionFaces:
    """One collection = the watchlist's index at AWS."""

    def __init__(self, settings: FaceSettings, client: Any | None = None, timeout_s: float | None = None) -> None:
        """``timeout_s``: connect and read timeout of each try (botocore's 60 s when ``None``); the face stage and the
        watchlist service pass ``faces.rekognition_search_timeout_s`` so a hanging endpoint costs a snapshot or a
        command seconds, not minutes (:func:`call_limit_s`)."""
        self.settings = settings
        self.collection = settings.rekognition_collection
        if client is None:
            from botocore.config import Config

            from infra.clients.aws import aws_client

            client = aws_client(
                "rekognition",
                region=settings.aws_region,
                region_setting="CG_FACES__AWS_REGION",
                endpoint_url=settings.rekognition_endpoint_url or settings.aws_endpoint_url,
                access_key_id=settings.aws_access_key_id,
                secret_access_key=settings.aws_secret_access_key,
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": ATTEMPTS},  # max_attempts: retries, 1 more
                    **({"connect_timeout": timeout_s, "read_timeout": timeout_s} if timeout_s else {}),
                ),
            )
        self.client = client
        self._reported: set[str] = set()
        """Configuration errors logged since the last call that worked: each is logged once, not per face."""
        self._lock = threading.Lock()
        self.progress: Callable[[], None] | None = None
        """Called after each call, answered or failed: the watchlist service beats its ``/healthz`` there, so a
        command of several bounded calls (ListFaces pages, then IndexFaces or DeleteFaces) is not taken for a hang."""
        self.give_up_by: Callable[[], float | None] | None = None
        """Once its owner's stop is asked, when a call still under way is given up (the watchlist service's exit
        deadline, ``StopRequest.exit_by``; None before the stop); unset (the face stage), each call is waited for."""

    def _request(self, op: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The client's ``op``; with :attr:`give_up_by`, from a daemon thread waited for until it ends or, once the
        stop is asked, until that deadline (:func:`infra.clients.aws.given_up_by`, as the S3 image store's), then
        :class:`~infra.clients.transactional.TransactionGivenUp`: botocore's tries and its waits between them (up to
        :func:`call_limit_s`, about a minute) ran on past the supervisor's SIGKILL, which cut the command short instead
        of the service giving it up, uncommitted, and closing."""
        request = functools.partial(getattr(self.client, op), **kwargs)
        resp: dict[str, Any] = aws.given_up_by(request, f"its {op}", self.give_up_by, "Rekognition")
        return resp

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp: dict[str, Any] = self._request(op, kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = err.get("Code", "Unknown")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = status >= 500 or status == 429 or code in TRANSIENT_CODES
            error = RekognitionError(code, err.get("Message", ""), transient)
        except BotoCoreError as exc:  # botocore's retries are spent, or it did not send the request at all
            error = RekognitionError(type(exc).__name__, str(exc), transient=_connection_trouble(exc))
        else:
            if self._reported:
                with self._lock:
                    self._reported.clear()
            return resp
        finally:
            if self.progress is not None:
                self.progress()
        if error.configuration:
            with self._lock:
                first = error.code not in self._reported
                self._reported.add(error.code)
            if first:
                log.error(
                    "Rekognition %s failed, and every call will until the setting is fixed: %s (collection %s; "
                    "logged once, until a call works)",
                    op,
                    error,
                    self.collection,
                )
        raise error from None

    def ensure_collection(self) -> None:
        try:
            self._call("create_collection", CollectionId=self.collection)
        except RekognitionError as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise

    def face_ids(self, subject_id: str, legacy: bool = False) -> list[str]:
        """Every face of the collection indexed for ``subject_id`` (ListFaces, all pages); ``legacy``: those indexed
        under the ``_sha256-<hex>`` of an earlier version too (``forget`` deletes them; a search cannot name them, so
        they do not keep ``index`` from indexing the subject again)."""
        external = {external_image_id(subject_id)}
        former = _legacy_external_image_id(subject_id) if legacy else None
        if former:
            external.add(former)
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"CollectionId": self.collection, "MaxResults": 1000}
            if token:
                kwargs["NextToken"] = token
            page = self._call("list_faces", **kwargs)
            out += [f["FaceId"] for f in page.get("Faces", []) if f.get("ExternalImageId") in external]
            token = page.get("NextToken")
            if not token:
                return out

    def index(self, subject_id: str, image: bytes | str, another: bool = False) -> list[str]:
        """Index the largest face of ``image`` for ``subject_id``; idempotent (an indexed subject is kept), unless
        ``another``: a confirmed sighting (``LEARN``) adds a face to those the subject has (the ids of the new ones)."""
        existing = [] if another else self.face_ids(subject_id)
        if existing:
            return existing
        resp = self._call(
            "index_faces",
            CollectionId=self.collection,
            Image=_image(image),
            ExternalImageId=external_image_id(subject_id),
            MaxFaces=1,
            QualityFilter="AUTO",
            DetectionAttributes=[],
        )
        faces = [r["Face"]["FaceId"] for r in resp.get("FaceRecords", [])]
        if not faces:
            raise RekognitionError("NoFaceIndexed", "no face passed Rekognition's quality filter")
        return faces

    def search(self, image: bytes | str, subjects: tuple[str, ...] = ()) -> CollectionMatch | None:
        """Best match of the largest face in ``image`` at or above the Rekognition threshold (``subjects``: the
        known subject ids, to name a hashed ``ExternalImageId``)."""
        try:
            resp = self._call(
                "search_faces_by_image",
                CollectionId=self.collection,
                Image=_image(image),
                MaxFaces=1,
                FaceMatchThreshold=self.settings.rekognition_match_threshold,
                QualityFilter="AUTO",
            )
        except RekognitionError as exc:
            if exc.code == "InvalidParameterException":  # Rekognition's answer to "no face in the image"
                return None
            raise
        matches = resp.get("FaceMatches") or []
        if not matches:
            return None
        best = max(matches, key=lambda m: m["Similarity"])
        subject = subject_of(best["Face"].get("ExternalImageId", ""), subjects)
        if not subject:
            return None  # a face indexed by someone else, or one no known subject hashes to
        return CollectionMatch(subject, float(best["Similarity"]), best["Face"]["FaceId"])

    def forget(self, subject_id: str) -> int:
        """Delete every face of ``subject_id``; returns how many were deleted."""
        ids = self.face_ids(subject_id, legacy=True)
        for i in range(0, len(ids), 4096):
            self._call("delete_faces", CollectionId=self.collection, FaceIds=ids[i : i + 4096])
        return len(ids)


class CollectionLike(Protocol):
    def search(self, image: bytes | str, subjects: tuple[str, ...] = ()) -> CollectionMatch | None: ...


CROP_MARGIN = 0.5
"""Context kept around a face box when it is cropped for a search, as a share of the box's width and height:
Rekognition detects the face again in what it is sent, and needs some head and background around it."""
MAX_SEARCHED_FACES = 4
"""Usable faces of one snapshot searched at most (largest first): one SearchFacesByImage call each."""


def search_limit_s(timeout_s: float) -> float:
    """The longest :func:`search_faces` of one snapshot takes when each try's connect and read time out after
    ``timeout_s``: :data:`MAX_SEARCHED_FACES` calls of :func:`call_limit_s` each (a call answered at its last try is no
    failure, so the next face is searched after it)."""
    return MAX_SEARCHED_FACES * call_limit_s(timeout_s)


def face_crop(image: bytes, box: tuple[int, int, int, int], scale: float = 1.0) -> bytes:
    """JPEG bytes of the face at ``box`` (pixels of the analysed image, ``scale`` analysed pixels per original
    pixel, as :class:`jobs.faces.engine.DetectedFace` gives them) with :data:`CROP_MARGIN` around it. The crop
    holds that face alone, or it and what overlaps it: SearchFacesByImage searches only the largest face of an
    image, so each face of a snapshot is sent on its own. The box is of the picture turned as its EXIF orientation
    says (the engine detects faces there), so it is cut from that: cut from the stored pixels of a phone's or
    camera's rotated JPEG, the crop held no face and a watch-listed face went unmatched."""
    from PIL import Image

    from jobs.faces.engine import upright  # here: importing the engine loads OpenCV and dlib

    with Image.open(io.BytesIO(image)) as stored:
        img = upright(stored)
        left, top, right, bottom = (v / scale for v in box)
        mx, my = (right - left) * CROP_MARGIN, (bottom - top) * CROP_MARGIN
        area = (
            max(0, int(left - mx)),
            max(0, int(top - my)),
            min(img.width, int(right + mx) + 1),
            min(img.height, int(bottom + my) + 1),
        )
        out = io.BytesIO()
        img.convert("RGB").crop(area).save(out, "JPEG", quality=95)
        return out.getvalue()


@dataclass(frozen=True)
class SearchOutcome:
    """What the collection said about a snapshot's faces: the best match (``None``: no face matched at the
    threshold), or ``failed`` (the error code) when a search failed and no other face matched."""

    match: CollectionMatch | None = None
    failed: str | None = None


def search_faces(collection: CollectionLike, image: bytes, faces: Sequence[Any]) -> SearchOutcome:
    """Search each usable face (``passed``, ``box``, ``scale``) of ``image``, largest first and at most
    :data:`MAX_SEARCHED_FACES`, in the collection; the best match across them. A face Rekognition does not find
    again in its crop is no match (:meth:`RekognitionFaces.search`). After a transient failure (throttling, an
    outage: botocore's bounded retries are spent) or an error of the setup (access denied, a missing collection:
    :attr:`RekognitionError.configuration`) the rest are not tried: they would wait, or fail, the same again. A match
    found before a failure still counts; without one, the outcome is ``failed``, never "no match"."""
    usable = sorted(
        (f for f in faces if f.passed), key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), reverse=True
    )
    best: CollectionMatch | None = None
    failed: str | None = None
    for face in usable[:MAX_SEARCHED_FACES]:
        try:
            match = collection.search(face_crop(image, face.box, getattr(face, "scale", 1.0)))
        except RekognitionError as exc:
            failed = exc.code
            if exc.transient or exc.configuration:
                break
            continue
        except (ValueError, OSError) as exc:  # a crop over 5 MB, or one PIL cannot read or write
            failed = type(exc).__name__
            continue
        if match is not None and (best is None or match.similarity > best.similarity):
            best = match
    return SearchOutcome(best, None if best is not None else failed)
