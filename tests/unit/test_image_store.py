"""Image stores: refs, private files, retention purge that keeps retained and reference images, and refs
from records that must not reach outside the image folder or the configured buckets (S3 on moto)."""

from __future__ import annotations

import os
import socket
import stat
import time
import uuid

import pytest
from pydantic import SecretStr

from infra.clients.image_store import ImageStore, LocalImageStore, S3ImageStore
from infra.settings import FaceSettings, Settings
from schemas.errors import InvalidRecord
from tests.unit.durability import DiskOrder


@pytest.fixture
def store(tmp_path) -> LocalImageStore:
    s = ImageStore.from_settings(Settings(stack_dir=tmp_path))
    assert isinstance(s, LocalImageStore) and s.root == tmp_path / "images"
    return s


def _age(store: LocalImageStore, ref: str, seconds: float) -> None:
    path = store._path(ref)
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_put_get_find_round_trip_with_private_files(store):
    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    assert store.get(ref) == b"\xff\xd8jpeg"
    assert store.find("checkout", "tx-1") == ref
    assert store.find("entrance", "tx-1") is None
    assert stat.S_IMODE(store._path(ref).stat().st_mode) == 0o600


def test_a_stored_image_survives_a_power_cut_before_any_record_points_at_it(store, disk_order: DiskOrder) -> None:
    """Written with no fsync, a snapshot whose ref a committed record already carried could be empty or missing
    after a power cut: its bytes are now synced before the rename, and its folder after it, before put returns."""
    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    assert disk_order.replaced_durably(store._path(ref)), disk_order.calls
    assert store.get(ref) == b"\xff\xd8jpeg" and stat.S_IMODE(store._path(ref).stat().st_mode) == 0o600
    assert [p.name for p in (store.root / "checkout").iterdir()] == ["tx-1"]  # no temporary file left


def test_keys_that_are_not_file_names_are_quoted_not_escaped_from_the_folder(store):
    ref = store.put("checkout", "../../etc/passwd", b"x")
    assert store.find("checkout", "../../etc/passwd") == ref
    assert store._path(ref).parent == store.root / "checkout"
    with pytest.raises(ValueError):
        store.get("file:checkout/../secret")
    with pytest.raises(ValueError):
        store.put("selfie", "k", b"x")


def test_purge_deletes_old_unretained_snapshots_only(store):
    old = store.put("checkout", "tx-old", b"a")
    alerted = store.put("checkout", "tx-alerted", b"b")
    fresh = store.put("entrance", "cam:1", b"c")
    reference = store.put("reference", "subj-tx-old", b"d")
    for ref in (old, alerted, reference):
        _age(store, ref, 48 * 3600)
    store.retain(alerted, "alert=a1 subject=subj-x")
    cutoff = int((time.time() - 24 * 3600) * 1000)
    assert store.purge(cutoff) == 1
    assert store.find("checkout", "tx-old") is None
    assert store.get(alerted) == b"b" and store.get(fresh) == b"c" and store.get(reference) == b"d"
    assert store.retained() == {alerted: "alert=a1 subject=subj-x"}
    assert store.purge(cutoff) == 0, "purging again finds nothing"


def test_a_purged_snapshot_does_not_come_back_after_a_power_cut(store, disk_order: DiskOrder) -> None:
    """The purge removed snapshots without syncing their folder: after a power cut a shopper's face, past its
    retention, could be there again (and a crash's leftover temporary image with it)."""
    ref = store.put("checkout", "tx-old", b"a")
    _age(store, ref, 48 * 3600)
    leftover = store.root / "entrance" / ".cam:1.tmp-1-abcd"
    leftover.write_bytes(b"half an image")
    t = time.time() - 48 * 3600
    os.utime(leftover, (t, t))
    disk_order.calls.clear()
    assert store.purge(int((time.time() - 24 * 3600) * 1000)) == 1
    assert disk_order.removed_durably(store._path(ref)), disk_order.calls
    assert disk_order.removed_durably(leftover), disk_order.calls
    assert store.find("checkout", "tx-old") is None and not leftover.exists()


def test_a_large_purge_syncs_each_folder_once_and_every_removal_survives_a_power_cut(
    store, disk_order: DiskOrder
) -> None:
    """The purge synced the folder once per removed image: thousands of folder syncs for a large purge."""
    refs = [store.put(kind, f"old-{i}", b"a") for kind in ("checkout", "entrance") for i in range(5)]
    for ref in refs:
        _age(store, ref, 48 * 3600)
    disk_order.calls.clear()
    assert store.purge(int((time.time() - 24 * 3600) * 1000)) == 10
    assert all(disk_order.removed_durably(store._path(ref)) for ref in refs), disk_order.calls
    synced = [c[1] for c in disk_order.calls if c[0] == "fsync"]
    assert sorted(synced) == sorted(os.path.realpath(store.root / k) for k in ("checkout", "entrance")), synced


def test_retained_snapshots_go_after_their_own_longer_period(store):
    """An innocent shopper's alert snapshot was kept for ever: only forget of a subject ever deleted one."""
    old = store.put("checkout", "tx-dismissed", b"a")
    recent = store.put("checkout", "tx-recent", b"c")
    reference = store.put("reference", "subj-tx-dismissed", b"d")
    for ref in (old, reference):
        _age(store, ref, 100 * 86_400)
    store.retain(old, "subject=- alert=a1")
    store.retain(recent, "subject=subj-x alert=a3")
    cutoff = int((time.time() - 90 * 86_400) * 1000)
    assert store.purge(cutoff) == 0, "the plain purge keeps what is retained"
    assert store.purge_retained(cutoff) == 1
    assert store.find("checkout", "tx-dismissed") is None
    assert set(store.retained()) == {recent}, "the marker went with its image"
    assert store.get(reference) == b"d", "reference images are never purged"


def test_a_retained_snapshot_stays_retained_after_a_power_cut(store, disk_order: DiskOrder) -> None:
    """The retention marker was written with no fsync: lost in a power cut, the next purge deleted the alert's
    snapshot after CG_FACES__SNAPSHOT_RETENTION_HOURS, not CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS."""
    ref = store.put("checkout", "tx-alerted", b"b")
    store.retain(ref, "alert=a1 subject=subj-x")
    marker = store._path(ref).with_name(".tx-alerted.retained")
    assert disk_order.replaced_durably(marker), disk_order.calls
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600 and store.retained() == {ref: "alert=a1 subject=subj-x"}


def test_a_snapshot_with_a_key_near_255_characters_can_be_retained_and_purged_with_its_marker(store) -> None:
    """``.<key>.retained`` passed the 255 bytes a file name may have for a key of over 245 characters: ``retain``
    failed (ENAMETOOLONG), and the case's snapshot went with the plain 24 h purge."""
    key = "tx-" + "k" * 252
    ref = store.put("checkout", key, b"jpeg")
    store.retain(ref, "alert=a1 subject=-")
    assert store.retained() == {ref: "alert=a1 subject=-"}
    future = int(time.time() * 1000) + 60_000
    assert store.purge(future) == 0, "the plain purge keeps what is retained"
    assert store.find("checkout", key) == ref
    assert store.purge_retained(future) == 1
    assert store.find("checkout", key) is None and store.retained() == {}
    assert [p.name for p in (store.root / "checkout").iterdir()] == [], "the marker went with its image"


def test_a_retention_marker_written_before_keys_were_kept_in_it_is_still_read(store) -> None:
    ref = store.put("checkout", "tx-old", b"jpeg")
    (store.root / "checkout" / ".tx-old.retained").write_text('{"reason": "alert=a0 subject=-", "at": 1}')
    assert store.retained() == {ref: "alert=a0 subject=-"}
    assert store.purge(int(time.time() * 1000) + 60_000) == 0


def test_retaining_a_missing_image_is_an_error(store):
    with pytest.raises(FileNotFoundError):
        store.retain("file:checkout/tx-gone", "alert=a9 subject=-")
    assert store.retained() == {}


def test_delete_removes_image_and_its_retention_marker(store):
    ref = store.put("checkout", "tx-2", b"a")
    store.retain(ref, "alert=a2 subject=-")
    store.delete(ref)
    store.delete(ref)  # idempotent
    assert store.find("checkout", "tx-2") is None and store.retained() == {}


def test_a_deleted_image_does_not_come_back_after_a_power_cut(store, disk_order: DiskOrder) -> None:
    """A forget's delete did not sync the folder: after a power cut the subject's image could be there again, and a
    reference image is never purged."""
    ref = store.put("reference", "subj-x", b"d")
    disk_order.calls.clear()
    store.delete(ref)
    assert disk_order.removed_durably(store.root / "reference" / "subj-x"), disk_order.calls
    assert [c for c in disk_order.calls if c[0] == "fsync"] == [
        ("fsync", os.path.realpath(store.root / "reference"), "")
    ]
    assert store.find("reference", "subj-x") is None


def test_the_store_s_new_folders_survive_a_power_cut_with_the_first_image(tmp_path, disk_order: DiskOrder) -> None:
    """The image folders were made without syncing their parents: a power cut could take a new folder and the first
    image put in it, whose ref records already carried."""
    store = ImageStore.from_settings(Settings(stack_dir=tmp_path))
    assert isinstance(store, LocalImageStore)
    assert disk_order.made_durably(store.root), disk_order.calls
    for kind in ("checkout", "entrance", "reference"):
        assert disk_order.made_durably(store.root / kind), disk_order.calls
        assert stat.S_IMODE((store.root / kind).stat().st_mode) == 0o700


def test_unknown_store_kind_is_a_configuration_error(tmp_path):
    settings = Settings(stack_dir=tmp_path)
    bad = settings.model_copy(update={"faces": settings.faces.model_copy(update={"image_store": "ftp"})})
    with pytest.raises(ValueError):
        ImageStore.from_settings(bad)


@pytest.mark.parametrize(
    "ref",
    [
        "file:checkout/../secret",
        "file:checkout/..",
        "file:/etc/passwd",
        "file:checkout//etc/passwd",
        "file:reference/x/../../../etc/passwd",
        "file:checkout/.hidden",
        "file:checkout/tx-1\n",  # ``$`` would accept a trailing newline
        "file:checkout/a\\..\\..\\b",
        "file:checkout/a\x00b",
        "file:checkout/",
        "file:../images/checkout/tx-1",
        "/etc/passwd",
        "s3://checkout-guard-checkout/checkout/tx-1",
    ],
)
def test_a_local_ref_that_leaves_the_image_folder_is_an_invalid_record(store, ref: str) -> None:
    store.put("checkout", "tx-1", b"x")
    for use in (store.get, store.delete, lambda r: store.retain(r, "alert=a1")):
        with pytest.raises(InvalidRecord) as err:
            use(ref)
        assert err.value.kind == "invalid_image_ref" and ref not in err.value.reason
    assert store.get("file:checkout/tx-1") == b"x", "nothing was deleted"


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


def _s3_settings(moto_url: str, tmp_path, **faces: object) -> Settings:
    run = uuid.uuid4().hex[:12]
    return Settings(
        stack_dir=tmp_path,
        faces=FaceSettings(
            image_store="s3",
            aws_endpoint_url=moto_url,
            aws_access_key_id=SecretStr("testing"),
            aws_secret_access_key=SecretStr("testing"),
            checkout_bucket=f"checkout-{run}",
            suspects_bucket=f"suspects-{run}",
            **faces,  # type: ignore[arg-type]
        ),
    )


def test_an_s3_ref_in_a_bucket_that_is_not_configured_is_refused_before_any_request(moto_url, tmp_path) -> None:
    store = ImageStore.from_settings(_s3_settings(moto_url, tmp_path))
    assert isinstance(store, S3ImageStore)
    store.ensure_buckets()
    victim = f"victim-{uuid.uuid4().hex[:12]}"
    store.s3.create_bucket(Bucket=victim)
    store.s3.put_object(Bucket=victim, Key="checkout/tx-1", Body=b"someone else's")
    ref = store.put("checkout", "tx-1", b"ours")
    assert store.get(ref) == b"ours"
    for use in (store.get, store.delete, lambda r: store.retain(r, "alert=a1")):
        with pytest.raises(InvalidRecord) as err:
            use(f"s3://{victim}/checkout/tx-1")
        assert err.value.kind == "invalid_image_ref"
    assert store.s3.get_object(Bucket=victim, Key="checkout/tx-1")["Body"].read() == b"someone else's"
    with pytest.raises(InvalidRecord):
        store.get(ref.replace("/checkout/tx-1", "/checkout/../reference/x"))
    older = ImageStore.from_settings(_s3_settings(moto_url, tmp_path, extra_image_buckets=f" {victim} ,other"))
    assert older.get(f"s3://{victim}/checkout/tx-1") == b"someone else's", "an extra bucket is allowed"


def test_getting_a_missing_image_is_file_not_found_in_both_stores_and_a_missing_bucket_is_not(
    moto_url, tmp_path
) -> None:
    """S3 gave botocore's ``NoSuchKey`` where the local store gives ``FileNotFoundError``: the same missing image
    failed a command ``command_error`` with S3 and ``missing_image`` with files."""
    from botocore.exceptions import ClientError

    local = ImageStore.from_settings(Settings(stack_dir=tmp_path))
    s3 = ImageStore.from_settings(_s3_settings(moto_url, tmp_path))
    assert isinstance(s3, S3ImageStore)
    s3.ensure_buckets()
    for store in (local, s3):
        ref = store.put("checkout", "tx-1", b"x")
        store.delete(ref)
        with pytest.raises(FileNotFoundError):
            store.get(ref)
    gone = S3ImageStore(_s3_settings(moto_url, tmp_path), bucket=f"gone-{uuid.uuid4().hex[:12]}")
    with pytest.raises(ClientError):
        gone.get(f"s3://{gone.buckets['checkout']}/checkout/tx-1")


def test_finding_in_a_bucket_that_does_not_exist_is_the_store_unavailable_not_an_image_not_there(
    moto_url, tmp_path
) -> None:
    """A HEAD of an object in a bucket that no longer exists is a bare 404, as for a missing object: ``find`` said
    "not there" of a former bucket deleted or misnamed, where it cannot search at all."""
    from infra.clients.image_store import ImageStoreUnavailable

    store = S3ImageStore(_s3_settings(moto_url, tmp_path), bucket=(gone := f"gone-{uuid.uuid4().hex[:12]}"))
    with pytest.raises(ImageStoreUnavailable, match=f"{gone} does not exist"):
        store.find("checkout", "tx-1")
    store.s3.create_bucket(Bucket=gone)
    assert store.find("checkout", "tx-1") is None
    assert store.find("checkout", "tx-1") is None and store.put("checkout", "tx-1", b"x") == store.find(
        "checkout", "tx-1"
    )


def test_the_purge_keeps_the_snapshots_it_is_told_to_keep_in_both_stores(moto_url, tmp_path) -> None:
    """The snapshot of an alert waiting for S3 to retain it is not retained yet: the purge must be able to spare it."""
    local = ImageStore.from_settings(Settings(stack_dir=tmp_path))
    s3 = ImageStore.from_settings(_s3_settings(moto_url, tmp_path))
    assert isinstance(s3, S3ImageStore)
    s3.ensure_buckets()
    for store in (local, s3):
        waiting, other = store.put("checkout", "tx-1", b"an alert's"), store.put("entrance", "tx-2", b"nobody's")
        assert store.purge(int(time.time() * 1000) + 60_000, keep=frozenset({waiting})) == 1
        assert store.find("checkout", "tx-1") == waiting and store.find("entrance", "tx-2") is None, other


def test_each_s3_try_of_the_image_store_is_bounded_by_its_setting_not_botocores_60_s(tmp_path) -> None:
    """botocore's default is 60 s to connect and 60 s to read, 5 tries: an S3 that did not answer held a snapshot, a
    command or an alert for minutes, past the ``/healthz`` limits."""
    settings = _s3_settings("http://127.0.0.1:9", tmp_path, image_store_timeout_s=2.5)  # no request is made
    config = S3ImageStore(settings).s3.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.5, 2.5)
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert FaceSettings().image_store_timeout_s == 5.0


def test_an_s3_call_under_way_at_its_owners_stop_is_given_up_by_the_stops_deadline_and_waited_for_without_one(
    tmp_path,
) -> None:
    """The watchlist service gave its Rekognition calls up at the stop's deadline, not its S3 calls: one of up to 62 s
    ran on past the supervisor's SIGKILL. With ``give_up_by`` set every S3 call of the store (the purge's listing
    pages among them) is given up by that deadline, as a Rekognition call is; unset, each is waited for."""
    import threading
    from datetime import UTC, datetime

    from infra.clients.transactional import TransactionGivenUp

    released = threading.Event()
    then = datetime(2026, 1, 1, tzinfo=UTC)
    first = {"Contents": [{"Key": "checkout/tx-1", "LastModified": then}], "IsTruncated": True}
    pages = {None: {**first, "NextContinuationToken": "p2"}}
    pages["p2"] = {"Contents": [{"Key": "checkout/tx-2", "LastModified": then}], "IsTruncated": False}
    listed: list[tuple[object, object]] = []

    class S3:
        def list_objects_v2(self, **kwargs: object) -> dict:
            listed.append((kwargs["Prefix"], kwargs.get("ContinuationToken")))
            return pages[kwargs.get("ContinuationToken")] if kwargs["Prefix"] == "checkout/" else {}  # type: ignore[index]

        def get_object_tagging(self, **_kwargs: object) -> dict:
            return {"TagSet": [{"Key": "retained", "Value": "alert=a-1"}]}

        def delete_object(self, **_kwargs: object) -> dict:
            released.wait(4.0)  # S3 does not answer (botocore's tries and waits: up to 62 s)
            return {}

    faces = FaceSettings(image_store="s3", aws_endpoint_url="http://127.0.0.1:9")
    store = S3ImageStore(Settings(stack_dir=tmp_path, faces=faces))
    store.s3 = S3()
    bucket = faces.checkout_bucket
    assert set(store.retained()) == {f"s3://{bucket}/checkout/tx-1", f"s3://{bucket}/checkout/tx-2"}
    assert listed == [("checkout/", None), ("checkout/", "p2"), ("entrance/", None)], "every page is read"
    asked_at = time.monotonic()
    store.give_up_by = lambda: asked_at + 0.3  # the stop asked: its deadline
    try:
        with pytest.raises(TransactionGivenUp, match="S3 did not finish its delete_object"):
            store.delete(f"s3://{bucket}/checkout/tx-1")
        took = time.monotonic() - asked_at
        assert took < 1.0, f"given up after {took:.1f} s, past the stop's deadline"
        store.give_up_by = None
        released.set()
        store.delete(f"s3://{bucket}/checkout/tx-1")  # no stop: waited for
    finally:
        released.set()


class StuckMount:
    """The image folder on a network mount (NFS, EFS) whose server stopped answering: once :attr:`stuck` is set, every
    file system call on a path in it blocks, as it does in the kernel, until :attr:`released` (or 4 s); ``on_block``
    is called as the first one blocks (a SIGTERM arriving meanwhile). Every such call takes its path through
    ``__fspath__``, which is where it is held here."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: object, on_block: object = None) -> None:
        import threading
        from pathlib import PurePath

        self.root = str(root)
        self.stuck, self.released, self.blocked = threading.Event(), threading.Event(), threading.Event()
        self.on_block = on_block
        real = PurePath.__fspath__

        def fspath(path: PurePath) -> str:
            named = real(path)
            if self.stuck.is_set() and (named == self.root or named.startswith(self.root + os.sep)):
                if not self.blocked.is_set():
                    self.blocked.set()
                    if callable(self.on_block):
                        self.on_block()
                self.released.wait(4.0)
            return named

        monkeypatch.setattr(PurePath, "__fspath__", fspath)


LOCAL_OPS = {
    "put": lambda s: s.put("checkout", "tx-2", b"new"),
    "get": lambda s: s.get("file:checkout/tx-1"),
    "find": lambda s: s.find("checkout", "tx-1"),
    "delete": lambda s: s.delete("file:checkout/tx-1"),
    "retain": lambda s: s.retain("file:checkout/tx-1", "alert=a-2"),
    "retained": lambda s: s.retained(),
    "purge": lambda s: s.purge(int(time.time() * 1000) + 60_000),
    "purge_retained": lambda s: s.purge_retained(int(time.time() * 1000) + 60_000),
}
"""Every operation of the local store, on an image ``tx-1`` retained for alert ``a-1``."""


@pytest.mark.parametrize("op", list(LOCAL_OPS))
def test_a_local_file_operation_stuck_on_a_network_mount_at_its_owners_stop_is_given_up_by_the_stops_deadline(
    store, monkeypatch, op: str
) -> None:
    """The local store's file operations were not given up at a stop as the S3 store's calls are: with the image folder
    on a network mount whose server went away, one blocked in the kernel (in the watchlist service's main thread, the
    SIGTERM's handler with it) until the supervisor's SIGKILL. With ``give_up_by`` each is now given up by that
    deadline (``TransactionGivenUp``), its thread left blocked until the mount answers."""
    from infra.clients.transactional import TransactionGivenUp

    store.retain(store.put("checkout", "tx-1", b"\xff\xd8jpeg"), "alert=a-1")
    mount = StuckMount(monkeypatch, store.root)
    asked_at = time.monotonic()
    store.give_up_by = lambda: asked_at + 0.3  # the stop asked: its deadline
    mount.stuck.set()
    try:
        with pytest.raises(TransactionGivenUp, match=f"the local image store did not finish its {op} before"):
            LOCAL_OPS[op](store)
        took = time.monotonic() - asked_at
        assert took < 1.0, f"given up after {took:.1f} s, past the stop's deadline"
        assert mount.blocked.is_set() and not mount.released.is_set()
    finally:
        mount.stuck.clear()
        mount.released.set()  # the mount answers: the operation given up ends on its own


def test_a_local_file_operation_is_waited_for_without_a_stop_deadline(store, monkeypatch) -> None:
    """Unset ``give_up_by`` (the face stage, the alert sender, the bot, the dashboard): a slow file operation is
    waited for, and answers."""
    import threading

    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    mount = StuckMount(monkeypatch, store.root)
    mount.stuck.set()
    started = time.monotonic()
    threading.Timer(0.2, mount.released.set).start()
    assert store.get(ref) == b"\xff\xd8jpeg"
    assert mount.blocked.is_set() and time.monotonic() - started >= 0.2


def test_the_local_stores_operations_work_as_before_while_no_stop_is_asked(store) -> None:
    """With ``give_up_by`` set and no stop asked (the watchlist service as it runs), each file operation is run and
    answered as without it."""
    store.give_up_by = lambda: None
    ref = store.put("checkout", "tx-1", b"\xff\xd8jpeg")
    assert store.get(ref) == b"\xff\xd8jpeg" and store.find("checkout", "tx-1") == ref
    with pytest.raises(FileNotFoundError):
        store.get("file:checkout/tx-9")
    store.retain(ref, "alert=a-1")
    assert store.retained() == {ref: "alert=a-1"}
    assert store.purge(int(time.time() * 1000) + 60_000) == 0
    assert store.purge_retained(int(time.time() * 1000) + 60_000) == 1
    assert store.find("checkout", "tx-1") is None and store.retained() == {}
    with pytest.raises(InvalidRecord):
        store.delete("file:checkout/../x")
