"""Where snapshots and reference photos live: local files by default, S3 when configured.

Refs are opaque strings (``file:<kind>/<key>`` or ``s3://<bucket>/<kind>/<key>``) that travel in
records instead of image bytes. Checkout/entrance snapshots that matched nobody are biometric data
we have no reason to keep: ``purge`` deletes them after the retention period unless ``retain`` was
called (a match or an alert); ``purge_retained`` deletes the retained ones once their longer period is
over (an innocent shopper's alert snapshot was otherwise kept for ever).
Reference images (enrolled subjects) are never purged, only deleted by ``forget``, from the store their ref
names (:func:`store_holding`): ``CG_FACES__IMAGE_STORE`` or the buckets may have changed since enrolment. A
subject's snapshots, which no record ties to a store, ``forget`` looks for in the current store and in
:func:`former_stores`. Nothing here logs image bytes.

Refs arrive in records (alerts, commands), so a ref is checked before it is used: a local ref names a
known kind and a plain file name in it (no ``..``, no ``/``, nothing absolute: never a path outside the
image folder), an S3 ref one of the configured buckets (``checkout_bucket``, ``suspects_bucket``,
``extra_image_buckets``). Anything else is :class:`InvalidRecord` (``invalid_image_ref``, a ValueError).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from infra.clients import aws
from infra.clock import now_ms
from infra.durable import fsync_dir, make_dirs_durably, replace_durably
from infra.settings import Settings
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import IMAGE_KEY_RE, IMAGE_KINDS

T = TypeVar("T")

KINDS = IMAGE_KINDS
PURGEABLE = ("checkout", "entrance")
_KEY_RE = IMAGE_KEY_RE
"""A file/object name (:data:`~schemas.identifiers.IMAGE_KEY_RE`, the shape records' refs are checked by too)."""
INVALID_REF = "invalid_image_ref"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
"""An S3 bucket name: only such a name is quoted in an error (a ref comes in a record, and may be hostile)."""


def _check(kind: str, key: str) -> None:
    """``InvalidRecord`` unless ``kind`` is known and ``key`` one plain name (the reason never quotes a key:
    it may be a hostile payload, and it is logged)."""
    if kind not in KINDS:
        raise InvalidRecord(INVALID_REF, f"unknown image kind (allowed: {', '.join(KINDS)})")
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise InvalidRecord(INVALID_REF, f"image key is not a plain name (allowed: {_KEY_RE.pattern})")


def safe_key(key: str) -> str:
    """Keys as file/object names: ids that are already safe stay readable, others are %-quoted."""
    if _KEY_RE.fullmatch(key):
        return key
    quoted = quote(key, safe="").replace(".", "%2E")
    if not quoted or len(quoted) > 255:
        raise ValueError("image key empty or too long")
    return quoted


def _marker(path: Path) -> Path:
    """The retention marker of the image at ``path``: ``.<key>.retained`` beside it, or, where that name would pass
    the 255 bytes a file name may have (a key of over 245 characters, which ``retain`` then failed on),
    ``..<sha256 of the key>.retained`` (no key starts with ``.``, so no other key's marker has that name)."""
    name = f".{path.name}.retained"
    if len(os.fsencode(name)) > 255:
        name = f"..{hashlib.sha256(os.fsencode(path.name)).hexdigest()}.retained"
    return path.with_name(name)


class ImageStoreUnavailable(CheckoutGuardError, RuntimeError):
    """A ref names a store these settings cannot reach (a bucket no longer configured, a local image folder that
    is not on this machine): its image cannot be deleted here. The message says where it is and what to set."""


class ImageStoreMissing(ImageStoreUnavailable):
    """A bucket the settings name for the current image store does not exist (S3 ``NoSuchBucket``): every image
    call there fails the same way until ``setting`` is fixed or the bucket created. The message names the bucket and
    the setting (a generic error said neither)."""

    def __init__(self, bucket: str | None, setting: str) -> None:
        named = bucket if bucket and _BUCKET_RE.fullmatch(bucket) else "(not named)"
        super().__init__(f"S3 bucket {named} does not exist (NoSuchBucket): create it, or set {setting} to its name")
        self.bucket, self.setting = bucket, setting


_CURRENT_BUCKET_SETTINGS = {
    "checkout": "CG_FACES__CHECKOUT_BUCKET",
    "entrance": "CG_FACES__CHECKOUT_BUCKET",
    "reference": "CG_FACES__SUSPECTS_BUCKET",
}


def missing_bucket(exc: BaseException, store: ImageStore) -> ImageStoreMissing | None:
    """``exc`` (an S3 call of ``store``) as :class:`ImageStoreMissing` when it is S3's ``NoSuchBucket`` for a bucket
    of ``store``, the current store (S3 names the bucket in the error; both settings when it does not); else None.
    A former bucket's is not: :meth:`S3ImageStore.find` tells it as :class:`ImageStoreUnavailable`."""
    if isinstance(exc, ImageStoreMissing):
        return exc
    response = getattr(exc, "response", None)
    error = response.get("Error", {}) if isinstance(response, dict) else {}
    if error.get("Code") != "NoSuchBucket" or not isinstance(store, S3ImageStore) or not store.settings_of:
        return None
    bucket = error.get("BucketName")
    if bucket in store.settings_of:
        return ImageStoreMissing(bucket, store.settings_of[bucket])
    return ImageStoreMissing(None, " or ".join(sorted(set(store.settings_of.values())))) if bucket is None else None


_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
)


def store_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is the image store being away for now (no connection, a timeout, an S3 5xx or throttling,
    after botocore's own retries), so the same call is worth trying again later; not a missing image, a bad ref, or
    an error S3 will give again (access denied, no such bucket)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _TRANSIENT_S3_CODES
    return False


S3_ATTEMPTS = 4
"""Calls per S3 request in botocore's ``standard`` retry mode (throttling, 5xx and lost connections tried again with
backoff), each bounded by ``CG_FACES__IMAGE_STORE_TIMEOUT_S``; then :func:`store_outage` tells the caller."""


def call_limit_s(timeout_s: float) -> float:
    """The longest one S3 call of the image store takes with ``CG_FACES__IMAGE_STORE_TIMEOUT_S`` = ``timeout_s``
    (:func:`infra.clients.aws.call_limit_s`: 62 s at the default 5 s, past a 60 s ``/healthz`` limit)."""
    return aws.call_limit_s(S3_ATTEMPTS, timeout_s)


_MISSING_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
"""S3's answers for an object that is not there (a HEAD has no body, so only its status: ``404``)."""


class ImageStore:
    """Base: the ref scheme and the factory; subclasses hold the bytes."""

    progress: Callable[[], None] | None = None
    """Called after each S3 call of the store ends, answered or failed (botocore's tries and waits done; the local
    store's file operations call nothing): the watchlist service beats its ``/healthz`` there, so a command of several
    S3 calls, each bounded by :func:`call_limit_s`, is not taken for a hang."""
    give_up_by: Callable[[], float | None] | None = None
    """Once its owner's stop is asked, when an S3 call or a local file operation still under way is given up (the
    watchlist service's exit deadline, ``StopRequest.exit_by``; None before the stop), as its Rekognition calls are
    (:func:`infra.clients.aws.given_up_by`); unset (the face stage, the alert sender, the bot, the dashboard), each call
    is waited for."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageStore:
        faces = settings.faces
        if faces.image_store == "s3":
            return S3ImageStore(settings)
        if faces.image_store == "local":
            return LocalImageStore(settings.stack_dir / "images")
        raise ValueError(f"unknown image store {faces.image_store!r}: local | s3")

    def holds(self, ref: str) -> bool:
        """Whether ``ref`` is of this store (its scheme, and for S3 a bucket it may use)."""
        raise NotImplementedError

    def where(self) -> str:
        """Where this store keeps its images, for an audit reason (no secrets, no keys)."""
        raise NotImplementedError

    def put(self, kind: str, key: str, data: bytes) -> str:
        raise NotImplementedError

    def get(self, ref: str) -> bytes:
        """The image's bytes; ``FileNotFoundError`` when there is no such image (every store alike)."""
        raise NotImplementedError

    def find(self, kind: str, key: str) -> str | None:
        raise NotImplementedError

    def delete(self, ref: str) -> None:
        raise NotImplementedError

    def retain(self, ref: str, reason: str) -> None:
        """Exempt ``ref`` from the purge; ``FileNotFoundError`` when there is no such image."""
        raise NotImplementedError

    def purge(self, older_than_ms: int, keep: frozenset[str] = frozenset()) -> int:
        """Delete un-retained checkout/entrance images written before ``older_than_ms``, but for the refs in ``keep``
        (an alert's snapshot waiting to be retained); how many."""
        raise NotImplementedError

    def purge_retained(self, older_than_ms: int) -> int:
        """Delete retained checkout/entrance images written before ``older_than_ms``; how many."""
        raise NotImplementedError

    def retained(self) -> dict[str, str]:
        """Every retained ref with its reason (``forget`` uses it to find a subject's alert snapshots)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the store holds open (an S3 client's connection pool); files need nothing."""


LOCAL_STORE = "the local image store"
"""Who did not finish, in the words of a local file operation given up at a stop (:func:`local_file_call`)."""


def local_file_call(op: str, call: Callable[[], T], give_up_by: Callable[[], float | None] | None) -> T:
    """``call()``, the file operations ``op`` of the local image store, by the rule of an S3 call
    (:func:`infra.clients.aws.given_up_by`): with ``give_up_by``, in a daemon thread given up at its owner's stop
    deadline (``TransactionGivenUp``). They take milliseconds, but with the image folder on a network mount (NFS, EFS)
    whose server stopped answering each blocks in the kernel until it answers again; in the watchlist service's main
    thread, where neither the SIGTERM's handler nor the stop could run meanwhile, until the supervisor's SIGKILL cut the
    command short. A thread blocked in a system call cannot be stopped: the one given up is left to end with the mount's
    answer or the process (its writes are whole or not at all, :func:`infra.durable.replace_durably`, and its command is
    not committed, so it is done again at the next start)."""
    return aws.given_up_by(call, f"its {op}", give_up_by, LOCAL_STORE)


class LocalImageStore(ImageStore):
    """Files ``<root>/<kind>/<key>`` (mode 0600); a retained image gets a ``.<key>.retained`` marker (a hashed name
    for a long key: :func:`_marker`). Each operation's file system calls go through :func:`local_file_call` (one
    thread per operation, not per call, while :attr:`give_up_by` is set: a fraction of a millisecond, where a put's
    fsyncs take one or more)."""

    PREFIX = "file:"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for kind in KINDS:
            make_dirs_durably(self.root / kind, mode=0o700)  # a first image is not lost with its new folder

    def _call(self, op: str, call: Callable[[], T]) -> T:
        return local_file_call(op, call, self.give_up_by)

    def holds(self, ref: str) -> bool:
        return isinstance(ref, str) and ref.startswith(self.PREFIX)

    def where(self) -> str:
        return "the local image store"

    def _path(self, ref: str) -> Path:
        """The file of ``ref``; ``InvalidRecord`` for anything but ``file:<kind>/<one name>``."""
        if not isinstance(ref, str) or not ref.startswith(self.PREFIX):
            raise InvalidRecord(INVALID_REF, "not a local image ref (file:<kind>/<key>)")
        kind, _, key = ref[len(self.PREFIX) :].partition("/")
        _check(kind, key)
        path = self.root / kind / key
        if path.parent != self.root / kind:  # _check already ensures it; a second lock on the same door
            raise InvalidRecord(INVALID_REF, "image ref leaves its folder")
        return path

    def put(self, kind: str, key: str, data: bytes) -> str:
        """Write atomically and durably (:func:`infra.durable.replace_durably`: temp file, fsync, rename, fsync of the
        folder), its owner's only: a reader never sees half an image, and the ref returned, which records carry once
        their offsets are committed, still names the whole image after a power cut."""
        key = safe_key(key)
        _check(kind, key)
        self._call("put", lambda: replace_durably(self.root / kind / key, data, mode=0o600))
        return f"{self.PREFIX}{kind}/{key}"

    def get(self, ref: str) -> bytes:
        path = self._path(ref)
        return self._call("get", path.read_bytes)

    def find(self, kind: str, key: str) -> str | None:
        key = safe_key(key)
        _check(kind, key)
        return f"{self.PREFIX}{kind}/{key}" if self._call("find", (self.root / kind / key).is_file) else None

    def delete(self, ref: str) -> None:
        """Delete the image and its retention marker, the folder synced after: an image a ``forget`` deleted came back
        after a power cut, and a reference image is never purged."""
        path = self._path(ref)
        self._call("delete", lambda: self._delete(path))

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink(missing_ok=True)
        _marker(path).unlink(missing_ok=True)
        fsync_dir(path.parent)

    def retain(self, ref: str, reason: str) -> None:
        """Mark ``ref`` kept past the plain retention, durably: a marker lost in a power cut let the next purge delete
        the picture of the alert's case after a day, not its retention of days."""
        path = self._path(ref)
        self._call("retain", lambda: self._retain(ref, path, reason))

    @staticmethod
    def _retain(ref: str, path: Path, reason: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"no image at {ref}")
        marker = _marker(path)  # its key in it too: a hashed marker's name does not say it
        replace_durably(marker, json.dumps({"reason": reason, "at": now_ms(), "key": path.name}), mode=0o600)

    def retained(self) -> dict[str, str]:
        return self._call("retained", self._retained)

    def _retained(self) -> dict[str, str]:
        out = {}
        for kind in PURGEABLE:
            for marker in (self.root / kind).glob(".*.retained"):
                try:
                    data = json.loads(marker.read_text())
                except (OSError, ValueError):
                    continue
                if not isinstance(data, dict):
                    continue
                key = data.get("key") if marker.name.startswith("..") else marker.name[1 : -len(".retained")]
                if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or _marker(marker.with_name(key)) != marker:
                    continue  # a hashed marker (:func:`_marker`) names its key inside; one that does not is no marker
                out[f"{self.PREFIX}{kind}/{key}"] = str(data.get("reason", ""))
        return out

    def purge(self, older_than_ms: int, keep: frozenset[str] = frozenset()) -> int:
        """Delete un-retained checkout/entrance images written before ``older_than_ms`` (epoch ms), but ``keep``; the
        removals synced into their folder before it returns, the folder once after its removals (also where one
        fails): unsynced, a purged snapshot (biometric data past its retention) could be back after a power cut, and
        synced per file, a purge of thousands made thousands of folder syncs."""
        return self._call("purge", lambda: self._purge(older_than_ms, keep))

    def _purge(self, older_than_ms: int, keep: frozenset[str]) -> int:
        n = 0
        for kind in PURGEABLE:
            folder, removed = self.root / kind, False
            try:
                for path in folder.iterdir():
                    try:
                        if path.name.startswith("."):
                            if ".tmp" in path.name and path.stat().st_mtime * 1000 < older_than_ms:
                                path.unlink()  # left by a crash mid-write (an image's bytes, too)
                                removed = True
                            continue
                        if _marker(path).exists():
                            continue
                        if f"{self.PREFIX}{kind}/{path.name}" in keep:
                            continue
                        if path.stat().st_mtime * 1000 < older_than_ms:
                            path.unlink()
                            removed = True
                            n += 1
                    except FileNotFoundError:
                        continue
            finally:
                if removed:
                    fsync_dir(folder)
        return n

    def purge_retained(self, older_than_ms: int) -> int:
        return self._call("purge_retained", lambda: self._purge_retained(older_than_ms))

    def _purge_retained(self, older_than_ms: int) -> int:
        n = 0
        for ref in self._retained():
            path = self._path(ref)
            try:
                if path.stat().st_mtime * 1000 < older_than_ms:
                    self._delete(path)
                    n += 1
            except FileNotFoundError:  # the marker outlived its image (a crash between the two deletes)
                _marker(path).unlink(missing_ok=True)
        return n


class S3ImageStore(ImageStore):
    """Checkout/entrance snapshots in the checkout bucket, reference images in the suspects bucket.

    Retention is an object tag ``retained=<reason>``; ``purge`` lists the purgeable prefixes and
    deletes untagged objects older than the cut-off (an S3 lifecycle rule on the same tag is the
    production equivalent, and can be added without code changes).
    """

    def __init__(self, settings: Settings, bucket: str | None = None) -> None:
        """``bucket``: one bucket for every kind (a former bucket :func:`former_stores` searches), else the
        checkout and suspects buckets."""
        from botocore.config import Config

        from infra.clients.aws import aws_client

        f = settings.faces
        self.buckets = {"checkout": f.checkout_bucket, "entrance": f.checkout_bucket, "reference": f.suspects_bucket}
        self.settings_of = {self.buckets[kind]: setting for kind, setting in _CURRENT_BUCKET_SETTINGS.items()}
        """The setting that names each bucket of the current store; none for a former bucket's store."""
        if bucket is not None:
            self.buckets = dict.fromkeys(KINDS, bucket)
            self.settings_of = {}
        self.allowed_buckets = frozenset(
            [*self.buckets.values(), *(b.strip() for b in f.extra_image_buckets.split(",") if b.strip())]
        )
        self.s3 = aws_client(
            "s3",
            region=f.aws_region,
            region_setting="CG_FACES__AWS_REGION",
            endpoint_url=f.aws_endpoint_url,
            access_key_id=f.aws_access_key_id,
            secret_access_key=f.aws_secret_access_key,
            region_required=False,
            config=Config(  # botocore's own 60 s a try held a snapshot, a command or an alert for minutes
                connect_timeout=f.image_store_timeout_s,
                read_timeout=f.image_store_timeout_s,
                retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS},
            ),
        )
        for event in ("after-call.s3", "after-call-error.s3"):  # each call's end, after all its tries: one or the other
            self.s3.meta.events.register(event, self._call_ended)

    def _call_ended(self, **_event: Any) -> None:
        """botocore's hook at the end of each S3 call: :attr:`progress`."""
        if self.progress is not None:
            self.progress()

    def _call(self, op: str, call: Callable[[], Any]) -> Any:
        """``call()``, the S3 call ``op``, which every request of this store makes (but :meth:`ensure_buckets`, for
        test and embedded setups): with :attr:`give_up_by`, given up at its owner's stop deadline
        (``TransactionGivenUp``), as a Rekognition call is. Before, one call under way at a stop (up to
        :func:`call_limit_s`, 62 s) ran on past the supervisor's SIGKILL, which killed the watchlist service
        mid-command instead of the command being given up uncommitted and read again."""
        return aws.given_up_by(call, f"its {op}", self.give_up_by, "S3")

    def _objects(self, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` of ``bucket``, one ListObjectsV2 call a page, each through :meth:`_call` (a
        botocore paginator's would not be)."""
        token: str | None = None
        while True:
            page = self._page(bucket, prefix, token)
            yield from page.get("Contents", [])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _page(self, bucket: str, prefix: str, token: str | None) -> dict[str, Any]:
        extra = {"ContinuationToken": token} if token else {}
        page: dict[str, Any] = self._call(
            "list_objects_v2", lambda: self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, **extra)
        )
        return page

    def holds(self, ref: str) -> bool:
        return isinstance(ref, str) and ref.startswith("s3://") and ref[5:].partition("/")[0] in self.allowed_buckets

    def where(self) -> str:
        return "S3 bucket " + " and ".join(sorted(set(self.buckets.values())))

    def close(self) -> None:
        self.s3.close()

    def ensure_buckets(self) -> None:
        """Create the buckets when missing (embedded/test setups; production provisions them)."""
        existing = {b["Name"] for b in self.s3.list_buckets().get("Buckets", [])}
        for bucket in set(self.buckets.values()) - existing:
            self.s3.create_bucket(Bucket=bucket)

    def _split(self, ref: str) -> tuple[str, str, str]:
        """``(bucket, object key, kind)`` of ``s3://<bucket>/<kind>/<key>``; ``InvalidRecord`` for a bucket
        that is not configured (the store's credentials must not read or delete anyone else's objects)."""
        if not isinstance(ref, str) or not ref.startswith("s3://"):
            raise InvalidRecord(INVALID_REF, "not an S3 image ref (s3://<bucket>/<kind>/<key>)")
        bucket, _, obj = ref[5:].partition("/")
        if bucket not in self.allowed_buckets:
            raise InvalidRecord(INVALID_REF, "image ref names a bucket that is not configured")
        kind, _, key = obj.partition("/")
        _check(kind, key)
        return bucket, obj, kind

    def put(self, kind: str, key: str, data: bytes) -> str:
        key = safe_key(key)
        _check(kind, key)
        bucket = self.buckets[kind]
        obj = f"{kind}/{key}"
        self._call(
            "put_object",
            lambda: self.s3.put_object(Bucket=bucket, Key=obj, Body=data, ServerSideEncryption="AES256"),
        )
        return f"s3://{bucket}/{kind}/{key}"

    def get(self, ref: str) -> bytes:
        """The image's bytes; ``FileNotFoundError`` when there is no such object, as the local store gives, so that a
        missing image fails a command the same way in both (a botocore ``NoSuchKey`` was a ``command_error``). A
        bucket that does not exist stays an S3 error: the image may be elsewhere, not gone."""
        from botocore.exceptions import ClientError

        bucket, obj, _ = self._split(ref)
        try:
            data: bytes = self._call("get_object", lambda: self.s3.get_object(Bucket=bucket, Key=obj)["Body"].read())
            return data
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_OBJECT_CODES:
                raise FileNotFoundError(f"no image at {ref}") from None
            raise

    def find(self, kind: str, key: str) -> str | None:
        from botocore.exceptions import ClientError

        key = safe_key(key)
        _check(kind, key)
        bucket = self.buckets[kind]
        try:
            self._call("head_object", lambda: self.s3.head_object(Bucket=bucket, Key=f"{kind}/{key}"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_OBJECT_CODES:
                self._check_bucket(bucket)
                return None
            raise
        return f"s3://{bucket}/{kind}/{key}"

    def _check_bucket(self, bucket: str) -> None:
        """:class:`ImageStoreUnavailable` when ``bucket`` does not exist. A HEAD has no body, so a missing bucket
        answers it 404 as a missing object does: a former bucket deleted or misnamed was "not there", and a ``forget``
        could be done while the subject's images stayed in the bucket meant. Asked only after a 404."""
        from botocore.exceptions import ClientError

        try:
            self._call("head_bucket", lambda: self.s3.head_bucket(Bucket=bucket))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                if bucket in self.settings_of:  # the current store's: a setting of its own to fix
                    raise ImageStoreMissing(bucket, self.settings_of[bucket]) from None
                named = bucket if _BUCKET_RE.fullmatch(bucket) else "(not a bucket name)"
                raise ImageStoreUnavailable(
                    f"S3 bucket {named} does not exist (NoSuchBucket): set the bucket's right name in "
                    "CG_FACES__EXTRA_IMAGE_BUCKETS (or the checkout and suspects buckets), or take it off once its "
                    "images are known to be gone"
                ) from None
            raise

    def delete(self, ref: str) -> None:
        bucket, obj, _ = self._split(ref)
        self._delete(bucket, obj)

    def _delete(self, bucket: str, obj: str) -> None:
        self._call("delete_object", lambda: self.s3.delete_object(Bucket=bucket, Key=obj))

    def retain(self, ref: str, reason: str) -> None:
        bucket, obj, _ = self._split(ref)
        from botocore.exceptions import ClientError

        tag = re.sub(r"[^A-Za-z0-9 _.:/=+@-]", "_", reason)[:256] or "retained"
        try:
            tagging = {"TagSet": [{"Key": "retained", "Value": tag}]}
            self._call(
                "put_object_tagging", lambda: self.s3.put_object_tagging(Bucket=bucket, Key=obj, Tagging=tagging)
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_OBJECT_CODES:
                raise FileNotFoundError(f"no image at {ref}") from None
            raise

    def purge(self, older_than_ms: int, keep: frozenset[str] = frozenset()) -> int:
        cutoff = datetime.fromtimestamp(older_than_ms / 1000, tz=UTC)
        n = 0
        for kind in PURGEABLE:
            bucket = self.buckets[kind]
            for obj in self._objects(bucket, f"{kind}/"):
                if obj["LastModified"] >= cutoff or f"s3://{bucket}/{obj['Key']}" in keep:
                    continue
                if self._tag(bucket, obj["Key"]) is not None:
                    continue
                self._delete(bucket, obj["Key"])
                n += 1
        return n

    def purge_retained(self, older_than_ms: int) -> int:
        cutoff = datetime.fromtimestamp(older_than_ms / 1000, tz=UTC)
        n = 0
        for bucket, obj, _, modified in self._retained():
            if modified < cutoff:
                self._delete(bucket, obj)
                n += 1
        return n

    def retained(self) -> dict[str, str]:
        return {f"s3://{bucket}/{obj}": reason for bucket, obj, reason, _ in self._retained()}

    def _retained(self) -> list[tuple[str, str, str, datetime]]:
        """(bucket, key, reason, last modified) of every retained checkout/entrance object."""
        out = []
        for kind in PURGEABLE:
            bucket = self.buckets[kind]
            for obj in self._objects(bucket, f"{kind}/"):
                if (reason := self._tag(bucket, obj["Key"])) is not None:
                    out.append((bucket, obj["Key"], reason, obj["LastModified"]))
        return out

    def _tag(self, bucket: str, obj: str) -> str | None:
        """The ``retained`` tag's reason of object ``obj``; None when it has none."""
        got = self._call("get_object_tagging", lambda: self.s3.get_object_tagging(Bucket=bucket, Key=obj))
        return next((t["Value"] for t in got.get("TagSet", []) if t["Key"] == "retained"), None)


def store_holding(
    ref: str, settings: Settings, current: ImageStore, give_up_by: Callable[[], float | None] | None = None
) -> ImageStore:
    """The store that holds ``ref``: ``current`` when the ref is of it, else the other kind of store as
    ``settings`` describe it. After a switch (local to S3, or to another bucket) an entry's reference image is
    still where it was written, and deleting its key in the current store would leave it there.
    :class:`ImageStoreUnavailable` when that store is not reachable from here; ``InvalidRecord`` for no ref. The local
    folder is looked for by :func:`local_file_call` (``give_up_by``: its owner's stop deadline)."""
    if current.holds(ref):
        return current
    if isinstance(ref, str) and ref.startswith(LocalImageStore.PREFIX):
        root = settings.stack_dir / "images"
        local = local_file_call(
            "folder lookup", lambda: LocalImageStore(root) if (root / "reference").is_dir() else None, give_up_by
        )
        if local is None:
            raise ImageStoreUnavailable(
                "the image is in the local image store, whose folder (images/ under CG_STACK_DIR) is not on this "
                "machine: run the service where it is, or delete the file there"
            )
        return local
    if isinstance(ref, str) and ref.startswith("s3://"):
        bucket = ref[5:].partition("/")[0]
        configured = {settings.faces.checkout_bucket, settings.faces.suspects_bucket}
        configured |= set(_extra_buckets(settings))
        if bucket not in configured:
            named = bucket if _BUCKET_RE.fullmatch(bucket) else "(not a bucket name)"  # refs come in records
            raise ImageStoreUnavailable(
                f"the image is in S3 bucket {named}, which is not configured: add it to CG_FACES__EXTRA_IMAGE_BUCKETS"
            )
        return S3ImageStore(settings)
    raise InvalidRecord(INVALID_REF, "not an image ref (file:<kind>/<key> or s3://<bucket>/<kind>/<key>)")


def _extra_buckets(settings: Settings) -> list[str]:
    return [b.strip() for b in settings.faces.extra_image_buckets.split(",") if b.strip()]


def local_former_store(
    settings: Settings, current: ImageStore, give_up_by: Callable[[], float | None] | None = None
) -> LocalImageStore | None:
    """The local image folder as a former store when it is on this machine and ``current`` is not it; a few ``stat``
    calls, so a caller that keeps :func:`former_stores` can ask again for a folder that appeared since. They go through
    :func:`local_file_call` (``give_up_by``: its owner's stop deadline), as the store's own operations do."""
    root = settings.stack_dir / "images"
    if isinstance(current, LocalImageStore):
        return None
    return local_file_call(
        "folder lookup",
        lambda: LocalImageStore(root) if all((root / kind).is_dir() for kind in KINDS) else None,
        give_up_by,
    )


def former_stores(
    settings: Settings, current: ImageStore, give_up_by: Callable[[], float | None] | None = None
) -> list[ImageStore]:
    """The stores besides ``current`` that may hold images written before a switch of ``CG_FACES__IMAGE_STORE`` or
    of the buckets: the local image folder when it is on this machine, and each bucket of
    ``CG_FACES__EXTRA_IMAGE_BUCKETS`` (where a former bucket is kept listed) as a store of every kind. ``forget``
    searches them by key as it searches ``current``: a snapshot is found by its transaction, a retained one by its
    marker, and no record says which store took it. The retention purge sweeps them too. Creating one makes no
    request; the local folder is looked for as :func:`local_former_store` says."""
    stores: list[ImageStore] = []
    if (local := local_former_store(settings, current, give_up_by)) is not None:
        stores.append(local)
    in_use = set(current.buckets.values()) if isinstance(current, S3ImageStore) else set()
    for bucket in dict.fromkeys(_extra_buckets(settings)):
        if bucket not in in_use:
            stores.append(S3ImageStore(settings, bucket=bucket))
    return stores
