"""Face detection, quality gate and 128-d embeddings with dlib, offline (pure: no Kafka, no Flink).

Pipeline per image: decode (refusing empty, corrupt, oversized or non-image bytes) -> downscale to
<= 480p (HOG cost grows with pixels) -> pad tight crops / upsample small images so HOG's 80 px window
fits -> HOG frontal detector -> 5-point landmarks (the 68-point model is non-commercial) -> aligned
150x150 chip -> quality gate (size, blur, pose) -> ResNet descriptor for faces that pass.

Model files come from the ``face_recognition_models`` package, located with ``importlib.resources``
(that package's own loader imports ``pkg_resources``); nothing is downloaded at run time.
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

import dlib
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from infra.settings import FaceSettings
from schemas.errors import CheckoutGuardError

CHIP_SIZE = 150
CHIP_PADDING = 0.25


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
    """128 float32, only when passed."""
    scale: float = 1.0
    """Analysed pixels per original pixel (box / scale = box in the original image)."""
    sharpness: float = 0.0
    pose_asymmetry: float = 0.0


def model_path(name: str) -> Path:
    """Path of a model file shipped in ``face_recognition_models``."""
    ref = resources.files("face_recognition_models") / "models" / name
    path = Path(str(ref))
    if not path.is_file():
        raise FileNotFoundError(f"face model {name} missing: install face-recognition-models")
    return path


@cache
def _models() -> tuple[object, object, object]:
    """Detector, 5-point predictor and ResNet, loaded once per process (≈ 0.3 s, 30 MB)."""
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(str(model_path("shape_predictor_5_face_landmarks.dat"))),
        dlib.face_recognition_model_v1(str(model_path("dlib_face_recognition_resnet_model_v1.dat"))),
    )


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
            img = Image.open(io.BytesIO(data))
            if img.format not in ("JPEG", "PNG"):
                raise ImageError("wrong_type", f"{img.format} is not JPEG or PNG")
            w, h = original = img.size
            if w * h > settings.max_image_pixels:
                raise ImageError("too_large", f"{w}x{h} pixels > {settings.max_image_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", _fit(w, h, settings))
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                original = (h, w)  # EXIF orientation rotates by 90 degrees: axes swap
            return ImageOps.exif_transpose(img).convert("RGB"), original
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("not_an_image", type(exc).__name__) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", type(exc).__name__) from None


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


_MODEL_LOCK = threading.Lock()
"""dlib's models are shared per process and not documented as thread-safe (nor do they release the GIL):
one analysis at a time per process; scale out with processes."""


class FaceEngine:
    """Analyses images; models load once per process and are shared by all engines."""

    def __init__(self, settings: FaceSettings) -> None:
        self.settings = settings
        self._detector, self._predictor, self._resnet = _models()

    def analyse(self, image: bytes) -> list[DetectedFace]:
        """All faces found in JPEG/PNG bytes, largest first. Raises ``ImageError`` on unusable bytes."""
        return self._finish(self._candidates(*self._prepare(image)), only_best=False)

    def best_face(self, image: bytes) -> DetectedFace | None:
        """The largest face that passed the gate (the person standing at the lane); only it is embedded."""
        faces = self._finish(self._candidates(*self._prepare(image)), only_best=True)
        return next((f for f in faces if f.passed), None)

    def analyse_array(self, rgb: np.ndarray, scale: float = 1.0) -> list[DetectedFace]:
        """Faces in an RGB uint8 array already at analysis size."""
        return self._finish(self._candidates(rgb, scale), only_best=False)

    def _prepare(self, image: bytes) -> tuple[np.ndarray, float]:
        img, (w0, h0) = decode_image(image, self.settings)
        aw, ah = _fit(w0, h0, self.settings)
        if (aw, ah) != img.size:
            img = img.resize((aw, ah), Image.Resampling.BILINEAR)
        return np.asarray(img), aw / w0

    def _finish(self, candidates: list[tuple[DetectedFace, np.ndarray]], only_best: bool) -> list[DetectedFace]:
        """Embed the passing faces (or just the first passing one)."""
        out = []
        for face, chip in candidates:
            if face.passed and not (only_best and any(f.passed for f in out)):
                with _MODEL_LOCK:
                    vec = np.asarray(self._resnet.compute_face_descriptor(chip), dtype=np.float32)
                face = replace(face, embedding=vec)
            out.append(face)
        return out

    def _candidates(self, rgb: np.ndarray, scale: float) -> list[tuple[DetectedFace, np.ndarray]]:
        """Detected faces with their gate result and aligned chip (not yet embedded), largest first."""
        s = self.settings
        h, w = rgb.shape[:2]
        pad = 0
        work = rgb
        if max(h, w) < s.pad_crops_below_px:
            # tight crops: HOG needs context around the face, so frame it in its own edge pixels
            pad = max(h, w) // 2
            work = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        upsample = 1 if max(h, w) < s.upsample_below_px else 0
        with _MODEL_LOCK:
            rects = self._detector(np.ascontiguousarray(work), upsample)
            found = [self._one(work, r, pad, w, h, scale) for r in rects]
        return sorted(found, key=lambda fc: (fc[0].box[2] - fc[0].box[0]) * (fc[0].box[3] - fc[0].box[1]), reverse=True)

    def _one(
        self, work: np.ndarray, rect: object, pad: int, w: int, h: int, scale: float
    ) -> tuple[DetectedFace, np.ndarray]:
        s = self.settings
        shape = self._predictor(work, rect)
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        box = (
            max(0, rect.left() - pad),
            max(0, rect.top() - pad),
            min(w, rect.right() - pad),
            min(h, rect.bottom() - pad),
        )
        chip = dlib.get_face_chip(work, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
        gray = chip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        sharp = laplacian_variance(gray)
        asym = pose_asymmetry(points)
        side = min(rect.right() - rect.left(), rect.bottom() - rect.top())
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
        ), chip
