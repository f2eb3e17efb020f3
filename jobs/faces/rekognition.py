"""The second face backend: an Amazon Rekognition collection through boto3 (as seed 000 used).

Enrolled faces are indexed with ``ExternalImageId = subject id``, so a search answers with our subject
ids and ``forget`` can find every face of a subject. Images go by S3 object when they are already in
the checkout/suspects buckets (``s3://`` refs of the S3 image store), else as bytes (<= 5 MB).
Rekognition's similarity is its own 0-100 scale; its threshold is ``faces.rekognition_match_threshold``
(AWS advises >= 99 plus human review for public-safety uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.settings import FaceSettings
from schemas.errors import CheckoutGuardError

MAX_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class CollectionMatch:
    subject_id: str
    similarity: float
    face_id: str


class RekognitionError(CheckoutGuardError, RuntimeError):
    """A Rekognition call failed; ``code`` is the AWS error code (e.g. ``InvalidParameterException``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


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

    def __init__(self, settings: FaceSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.collection = settings.rekognition_collection
        if client is None:
            from infra.clients.aws import aws_client

            client = aws_client(
                "rekognition",
                region=settings.aws_region,
                region_setting="CG_FACES__AWS_REGION",
                endpoint_url=settings.rekognition_endpoint_url or settings.aws_endpoint_url,
                access_key_id=settings.aws_access_key_id,
                secret_access_key=settings.aws_secret_access_key,
            )
        self.client = client

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise RekognitionError(err.get("Code", "Unknown"), err.get("Message", "")) from None

    def ensure_collection(self) -> None:
        try:
            self._call("create_collection", CollectionId=self.collection)
        except RekognitionError as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise

    def face_ids(self, subject_id: str) -> list[str]:
        """Every face of the collection indexed for ``subject_id`` (ListFaces, all pages)."""
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"CollectionId": self.collection, "MaxResults": 1000}
            if token:
                kwargs["NextToken"] = token
            page = self._call("list_faces", **kwargs)
            out += [f["FaceId"] for f in page.get("Faces", []) if f.get("ExternalImageId") == subject_id]
            token = page.get("NextToken")
            if not token:
                return out

    def index(self, subject_id: str, image: bytes | str) -> list[str]:
        """Index the largest face of ``image`` for ``subject_id``; idempotent (an indexed subject is kept)."""
        existing = self.face_ids(subject_id)
        if existing:
            return existing
        resp = self._call(
            "index_faces",
            CollectionId=self.collection,
            Image=_image(image),
            ExternalImageId=subject_id,
            MaxFaces=1,
            QualityFilter="AUTO",
            DetectionAttributes=[],
        )
        faces = [r["Face"]["FaceId"] for r in resp.get("FaceRecords", [])]
        if not faces:
            raise RekognitionError("NoFaceIndexed", "no face passed Rekognition's quality filter")
        return faces

    def search(self, image: bytes | str) -> CollectionMatch | None:
        """Best match of the largest face in ``image`` at or above the Rekognition threshold."""
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
        return CollectionMatch(
            best["Face"].get("ExternalImageId", ""), float(best["Similarity"]), best["Face"]["FaceId"]
        )

    def forget(self, subject_id: str) -> int:
        """Delete every face of ``subject_id``; returns how many were deleted."""
        ids = self.face_ids(subject_id)
        for i in range(0, len(ids), 4096):
            self._call("delete_faces", CollectionId=self.collection, FaceIds=ids[i : i + 4096])
        return len(ids)
