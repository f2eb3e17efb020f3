"""A local HTTP server speaking Rekognition's JSON protocol, for the collection calls moto lacks.

moto 5.2 implements Rekognition's CompareFaces, DetectLabels/Text and the async face search, but not
CreateCollection, IndexFaces, ListFaces, SearchFacesByImage or DeleteFaces. This server answers those
as documented (``POST /``, ``X-Amz-Target: RekognitionService.<Op>``, ``application/x-amz-json-1.1``,
errors as HTTP 400 ``{"__type": ..., "Message": ...}``), so the real boto3 client is exercised.
Faces are found and compared by the engine and similarity the caller hands in (the project's dlib
engine in the tests: infra never imports a stage); its similarity is mapped onto a Rekognition-like
scale (logistic, our match threshold 52 -> ~99) — the numbers are this server's, not AWS's model.
``S3Object`` images are read from the S3 endpoint given (moto in server mode in the tests).
``CollectionId`` and ``ExternalImageId`` are checked against the API's patterns as AWS does (botocore does not):
``ValidationException`` otherwise. Images must be JPEG or PNG, as at AWS: ``InvalidImageFormatException`` otherwise;
at most 5 MB as ``Bytes`` (``ValidationException``) and 15 MB from S3 (``ImageTooLargeException``). Numbers and
lists over the API's maxima that botocore lets through (``MaxFaces`` 4096, ``MaxResults`` 4096, 4096 ``FaceIds``)
are ``ValidationException`` too.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np
from PIL import Image

from schemas.errors import CheckoutGuardError
from schemas.images import image_type

MAX_IMAGE_BYTES = 5 * 1024 * 1024
"""The API's limit on ``Image.Bytes`` (5 MB; botocore does not check it): ``ValidationException`` past it."""
MAX_S3_IMAGE_BYTES = 15 * 1024 * 1024
"""An ``S3Object`` image may be larger (15 MB): ``ImageTooLargeException`` past it."""


class _Fail(CheckoutGuardError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


PATTERNS = {
    "CollectionId": ("collectionId", re.compile(r"[a-zA-Z0-9_.\-]{1,255}")),
    "ExternalImageId": ("externalImageId", re.compile(r"[a-zA-Z0-9_.\-:]{1,255}")),
}
"""The API's constraints on names (API_IndexFaces, API_CreateCollection): member, pattern with its length."""


MAXIMA = {
    ("SearchFacesByImage", "MaxFaces"): ("maxFaces", 4096),
    ("SearchFacesByImage", "FaceMatchThreshold"): ("faceMatchThreshold", 100),
    ("ListFaces", "MaxResults"): ("maxResults", 4096),
    ("DeleteFaces", "FaceIds"): ("faceIds", 4096),
}
"""The API's upper bounds that botocore does not check (it checks the lower ones): (operation, field) -> member,
maximum value (of a number) or length (of a list)."""


def _bounds(op: str, req: dict[str, Any]) -> None:
    """AWS's answer to a number or list over the API's maximum: ``ValidationException``, before anything else."""
    for (operation, field), (member, maximum) in MAXIMA.items():
        value = req.get(field) if operation == op else None
        if value is None:
            continue
        if isinstance(value, list):
            if len(value) > maximum:
                raise _Fail(
                    "ValidationException",
                    f"1 validation error detected: Value at '{member}' failed to satisfy constraint: "
                    f"Member must have length less than or equal to {maximum}",
                )
        elif float(value) > maximum:
            raise _Fail(
                "ValidationException",
                f"1 validation error detected: Value '{value}' at '{member}' failed to satisfy constraint: "
                f"Member must have value less than or equal to {maximum}",
            )


def _validate(req: dict[str, Any]) -> None:
    """AWS's answer to a name outside its pattern: ``ValidationException`` (HTTP 400), before anything else."""
    for field, (member, pattern) in PATTERNS.items():
        value = req.get(field)
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            raise _Fail(
                "ValidationException",
                f"1 validation error detected: Value at '{member}' failed to satisfy constraint: "
                f"Member must satisfy regular expression pattern: {pattern.pattern}",
            )


def rekognition_scale(sim: float) -> float:
    """This server's similarity: our 0-100 similarity squashed so that 52 -> ~99.4, 45 -> 50."""
    return round(100.0 / (1.0 + math.exp(-(sim - 45.0) / 1.4)), 4)


def _ratio_box(box: tuple[int, int, int, int], w: float, h: float) -> dict[str, float]:
    return {"Left": box[0] / w, "Top": box[1] / h, "Width": (box[2] - box[0]) / w, "Height": (box[3] - box[1]) / h}


class FaceAnalyser(Protocol):
    """What this stand-in needs of a face engine: faces with ``passed``, ``box`` and ``embedding``;
    ``ValueError`` for an image it cannot read."""

    def analyse(self, data: bytes) -> list[Any]: ...


class LocalRekognition:
    def __init__(
        self, engine: FaceAnalyser, similarity: Callable[[Any, Any], float], s3_client: Any | None = None
    ) -> None:
        self.engine = engine
        self.similarity = similarity
        self.s3 = s3_client
        self.collections: dict[str, dict[str, dict[str, Any]]] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- operations -------------------------------------------------------------------------------
    def _bytes(self, image: dict[str, Any]) -> bytes:
        """The image's bytes, refused as AWS refuses them (an image the engine reads would otherwise pass here and fail
        there): over 5 MB as bytes, over 15 MB from S3, neither JPEG nor PNG (``InvalidImageFormatException``)."""
        if "Bytes" in image:
            data = base64.b64decode(image["Bytes"])
            if len(data) > MAX_IMAGE_BYTES:
                raise _Fail(
                    "ValidationException",
                    "1 validation error detected: Value at 'image.bytes' failed to satisfy constraint: "
                    f"Member must have length less than or equal to {MAX_IMAGE_BYTES}",
                )
        elif "S3Object" in image and self.s3 is not None:
            obj = image["S3Object"]
            try:
                data = self.s3.get_object(Bucket=obj["Bucket"], Key=obj["Name"])["Body"].read()
            except Exception as exc:  # noqa: BLE001 - any S3 failure is Rekognition's InvalidS3ObjectException
                raise _Fail("InvalidS3ObjectException", f"Unable to get object metadata from S3: {exc}") from None
            if len(data) > MAX_S3_IMAGE_BYTES:
                raise _Fail("ImageTooLargeException", "Image size is too large.")
        else:
            raise _Fail("InvalidParameterException", "Image must have Bytes or S3Object")
        if image_type(data) is None:
            raise _Fail("InvalidImageFormatException", "Request has invalid image format")
        return data

    def _faces(self, image: dict[str, Any]):
        """Passing faces, each with its box as ratios of the image size (as Rekognition reports boxes)."""
        data = self._bytes(image)
        try:
            faces = [f for f in self.engine.analyse(data) if f.passed]
            w, h = Image.open(io.BytesIO(data)).size
        except ValueError:  # the engine's unreadable-image error
            raise _Fail("InvalidImageFormatException", "Request has invalid image format") from None
        return [(f, _ratio_box(f.box, w * f.scale, h * f.scale)) for f in faces]

    def _collection(self, cid: str) -> dict[str, dict[str, Any]]:
        if cid not in self.collections:
            raise _Fail("ResourceNotFoundException", f"The collection id: {cid} does not exist")
        return self.collections[cid]

    @staticmethod
    def _public(face: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in face.items() if k != "_embedding"}

    def CreateCollection(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: N802 - AWS operation names
        cid = req["CollectionId"]
        if cid in self.collections:
            raise _Fail("ResourceAlreadyExistsException", f"The collection id: {cid} already exists")
        self.collections[cid] = {}
        return {
            "StatusCode": 200,
            "CollectionArn": f"aws:rekognition:us-east-1:000000000000:collection/{cid}",
            "FaceModelVersion": "7.0",
        }

    def IndexFaces(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        """As AWS: with more faces than ``MaxFaces`` (at most 100 are indexed), the largest are indexed and the
        smaller ones are answered in ``UnindexedFaces`` (``EXCEEDS_MAX_FACES``), whatever order the engine found
        them in: enrolling a picture with a small face behind the subject indexes the subject."""
        _validate(req)  # also when called directly, not only through the server
        col = self._collection(req["CollectionId"])
        found = sorted(self._faces(req["Image"]), key=lambda fb: fb[1]["Width"] * fb[1]["Height"], reverse=True)
        keep = min(int(req.get("MaxFaces", 100)), 100)
        faces, left_out = found[:keep], found[keep:]
        image_id = str(uuid.uuid4())
        records = []
        for f, box in faces:
            face = {
                "FaceId": str(uuid.uuid4()),
                "ImageId": image_id,
                "Confidence": 99.9,
                "BoundingBox": box,
                "_embedding": f.embedding,
            }
            if req.get("ExternalImageId"):
                face["ExternalImageId"] = req["ExternalImageId"]
            col[face["FaceId"]] = face
            records.append({"Face": self._public(face), "FaceDetail": {"Confidence": 99.9}})
        unindexed = [
            {"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": {"BoundingBox": box, "Confidence": 99.9}}
            for _, box in left_out
        ]
        return {"FaceRecords": records, "FaceModelVersion": "7.0", "UnindexedFaces": unindexed}

    def ListFaces(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        col = self._collection(req["CollectionId"])
        ids = sorted(col)
        start = int(req.get("NextToken") or 0)
        size = int(req.get("MaxResults", 1000))
        out: dict[str, Any] = {
            "Faces": [self._public(col[i]) for i in ids[start : start + size]],
            "FaceModelVersion": "7.0",
        }
        if start + size < len(ids):
            out["NextToken"] = str(start + size)
        return out

    def SearchFacesByImage(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        """As AWS: only the largest face of the image is searched (its box is ``SearchedFaceBoundingBox``), matches
        at or above ``FaceMatchThreshold`` (80 unless given; 0-100) come most similar first, at most ``MaxFaces``;
        an image without a face is ``InvalidParameterException``."""
        _bounds("SearchFacesByImage", req)  # also when called directly, not only through the server
        col = self._collection(req["CollectionId"])
        threshold = float(req.get("FaceMatchThreshold", 80.0))
        if not 0.0 <= threshold <= 100.0:
            raise _Fail("ValidationException", "Value at 'faceMatchThreshold' failed to satisfy constraint: 0-100")
        faces = self._faces(req["Image"])
        if not faces:
            raise _Fail("InvalidParameterException", "There are no faces in the image. Should be at least 1.")
        probe, box = max(faces, key=lambda fb: fb[1]["Width"] * fb[1]["Height"])
        matches: list[dict[str, Any]] = []
        for face in col.values():
            sim = rekognition_scale(self.similarity(np.asarray(face["_embedding"]), probe.embedding))
            if sim >= threshold:
                matches.append({"Similarity": sim, "Face": self._public(face)})
        matches.sort(key=lambda m: m["Similarity"], reverse=True)
        return {
            "SearchedFaceBoundingBox": box,
            "SearchedFaceConfidence": 99.9,
            "FaceMatches": matches[: int(req.get("MaxFaces", 4096))],
            "FaceModelVersion": "7.0",
        }

    def DeleteFaces(self, req: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        col = self._collection(req["CollectionId"])
        deleted = [i for i in req["FaceIds"] if col.pop(i, None) is not None]
        return {"DeletedFaces": deleted, "UnsuccessfulFaceDeletions": []}

    # --- HTTP ---------------------------------------------------------------------------------------
    def handle(self, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
        service, _, op = target.partition(".")
        if service != "RekognitionService" or not hasattr(self, op) or not op[:1].isupper():
            return 400, {"__type": "UnknownOperationException", "Message": f"unknown operation {target}"}
        with self._lock:
            self.calls.append(op)
            try:
                req = json.loads(body or b"{}")
                _validate(req)
                _bounds(op, req)
                return 200, getattr(self, op)(req)
            except _Fail as fail:
                return 400, {"__type": fail.code, "Message": fail.message}

    def start(self) -> str:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, payload = outer.handle(self.headers.get("X-Amz-Target", ""), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
