"""Faces CLI: ``detect`` images to JSON lines, ``compare`` two images, ``evaluate`` labelled folders,
``bench`` the engine and the watchlist. ``python -m jobs.faces --help``.

Embeddings are biometric data: ``detect`` prints them only because it is asked to, to stdout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from infra.settings import FaceSettings, get_settings
from jobs.faces.engine import DetectedFace, FaceEngine, ImageError
from jobs.scoring.face_similarity import distance_to_similarity, similarity

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _settings() -> FaceSettings:
    return get_settings().faces


def face_json(face: DetectedFace, with_embedding: bool = True) -> dict:
    out = {
        "box": list(face.box),
        "quality": face.quality,
        "passed": face.passed,
        "reject_reason": face.reject_reason,
        "sharpness": face.sharpness,
        "pose_asymmetry": face.pose_asymmetry,
    }
    if with_embedding:
        out["embedding"] = None if face.embedding is None else [round(float(v), 6) for v in face.embedding]
    return out


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG files")],
    embedding: Annotated[bool, typer.Option(help="include the 128-d embedding of passing faces")] = True,
) -> None:
    """One JSON line per image: faces (box in analysed-image pixels, quality, gate result, embedding)."""
    engine = FaceEngine(_settings())
    for path in images:
        line: dict = {"image": str(path)}
        try:
            faces = engine.analyse(path.read_bytes())
            line["scale"] = faces[0].scale if faces else None
            line["faces"] = [face_json(f, embedding) for f in faces]
        except (ImageError, OSError) as exc:
            line["error"] = getattr(exc, "kind", type(exc).__name__)
            line["faces"] = []
        typer.echo(json.dumps(line))


@app.command()
def compare(a: Path, b: Path) -> None:
    """Similarity (0-100) of the best face of each image and the decision at the configured threshold."""
    settings = _settings()
    engine = FaceEngine(settings)
    fa, fb = engine.best_face(a.read_bytes()), engine.best_face(b.read_bytes())
    if fa is None or fb is None:
        missing = [str(p) for p, f in ((a, fa), (b, fb)) if f is None]
        typer.echo(json.dumps({"similarity": None, "decision": "no_face", "no_usable_face_in": missing}))
        raise typer.Exit(2)
    sim = similarity(fa.embedding, fb.embedding)
    decision = "match" if sim >= settings.match_threshold else "no_match"
    typer.echo(json.dumps({"similarity": round(sim, 2), "threshold": settings.match_threshold, "decision": decision}))


def labelled_embeddings(roots: list[Path], engine: FaceEngine) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Best-face embeddings of every image in ``<root>/<identity>/`` folders; also the files with none."""
    labels, files, vectors, missed = [], [], [], []
    for root in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                face = engine.best_face(path.read_bytes())
                if face is None:
                    missed.append(str(path))
                    continue
                labels.append(f"{root.name}/{folder.name}")
                files.append(str(path))
                vectors.append(face.embedding)
    return labels, files, np.array(vectors, dtype=np.float32), missed


def pair_scores(labels: list[str], vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarities of all same-identity (genuine) and different-identity (impostor) pairs."""
    d = np.sqrt(np.maximum(0.0, ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)))
    sims = distance_to_similarity(d)
    lab = np.array(labels)
    iu = np.triu_indices(len(labels), k=1)
    same = lab[iu[0]] == lab[iu[1]]
    return sims[iu][same], sims[iu][~same]


@app.command()
def evaluate(
    roots: Annotated[list[Path], typer.Argument(help="folders holding <identity>/<images> sub-folders")],
    threshold: Annotated[float | None, typer.Option(help="default: settings faces.match_threshold")] = None,
) -> None:
    """True-match and false-match rates over all same/different-identity pairs of labelled folders."""
    settings = _settings()
    thr = settings.match_threshold if threshold is None else threshold
    labels, _, vectors, missed = labelled_embeddings(roots, FaceEngine(settings))
    genuine, impostor = pair_scores(labels, vectors)
    pct = [0, 1, 5, 50, 95, 99, 100]
    report = {
        "images": len(labels) + len(missed),
        "identities": len(set(labels)),
        "no_usable_face": missed,
        "genuine_pairs": int(genuine.size),
        "impostor_pairs": int(impostor.size),
        "threshold": thr,
        "tmr": round(float((genuine >= thr).mean()), 4),
        "fmr": round(float((impostor >= thr).mean()), 5),
        "genuine_similarity_pct": dict(zip(pct, np.percentile(genuine, pct).round(1).tolist(), strict=True)),
        "impostor_similarity_pct": dict(zip(pct, np.percentile(impostor, pct).round(1).tolist(), strict=True)),
        "sweep": [
            {
                "threshold": t,
                "tmr": round(float((genuine >= t).mean()), 4),
                "fmr": round(float((impostor >= t).mean()), 5),
            }
            for t in (45, 50, 52, 55, 58, 60, 62, 65)
        ],
    }
    typer.echo(json.dumps(report, indent=1))


def _frame_640x480(face_photo: bytes) -> bytes:
    """A camera-like 640x480 JPEG with the photo's face region placed on a plain background."""
    from PIL import Image

    img = Image.open(io.BytesIO(face_photo)).convert("RGB")
    img.thumbnail((320, 320))
    frame = Image.new("RGB", (640, 480), (92, 96, 104))
    frame.paste(img, (160, 80))
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=90)
    return out.getvalue()


def _pin_threads(cpus: set[int]) -> None:
    """CPU affinity for every thread of this process (``sched_setaffinity`` sets one thread's)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def bench_faces(photo: Path | None = None, frames: int = 30, enrolled: int = 100_000) -> dict[str, float]:
    """Snapshot -> match on one core for a 640x480 frame, and watchlist probe time at ``enrolled`` faces."""
    from jobs.scoring.watchlist import Watchlist

    settings = _settings()
    engine = FaceEngine(settings)
    rng = np.random.default_rng(7)
    out: dict[str, float] = {}
    if photo is not None:
        frame = _frame_640x480(photo.read_bytes())
    else:
        frame = io.BytesIO()
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(frame, "JPEG")
        frame = frame.getvalue()
    watch = Watchlist(settings)
    vectors = rng.normal(0.0, 0.09, (enrolled, 128)).astype(np.float32)
    for i in range(enrolled):
        watch.upsert({"subject_id": f"s{i}", "category": "SUSPECT", "embeddings": vectors[i : i + 1]})
    watch.search(vectors[0])  # builds the matrix once
    engine.analyse(frame)
    times, cpu = [], []
    # "On one core": pin the process while timing, so neither dlib's threads nor anything else in
    # this process can borrow the second core (process CPU time would count them, too).
    affinity = os.sched_getaffinity(0)
    _pin_threads({min(affinity)})  # every thread: dlib's workers exist already
    try:
        for _ in range(frames):
            t0, c0 = time.perf_counter(), time.process_time()
            face = engine.best_face(frame)
            if face is not None:
                watch.search(face.embedding)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        _pin_threads(affinity)
    times.sort()
    # CPU time is what a core spends per frame; wall time adds waiting when the machine is shared
    out["snapshot_to_match_cpu_p50_ms"] = round(1000 * statistics.median(cpu), 1)
    out["snapshot_to_match_p50_ms"] = round(1000 * statistics.median(times), 1)
    out["snapshot_to_match_p95_ms"] = round(1000 * times[min(len(times) - 1, int(0.95 * len(times)))], 1)
    out["snapshots_per_s_per_core"] = round(len(times) / sum(times), 2)
    out["face_found"] = float(face is not None)
    probes = vectors[rng.integers(0, enrolled, 200)] + rng.normal(0, 0.01, (200, 128)).astype(np.float32)
    t0 = time.perf_counter()
    for p in probes:
        watch.search(p)
    out[f"watchlist_probe_ms_{enrolled // 1000}k"] = round(1000 * (time.perf_counter() - t0) / len(probes), 3)
    return out


def default_bench_photo(settings) -> Path | None:
    """A real face for the bench frame: the shared test data, else the sdist photos ``make setup`` unpacks."""
    from infra.settings import REPO_ROOT

    for path in (
        REPO_ROOT / ".." / "shared" / "data" / "faces" / "face_recognition" / "test_images" / "obama.jpg",
        settings.stack_dir / "faces" / "face_recognition-1.3.0" / "tests" / "test_images" / "obama.jpg",
    ):
        if path.is_file():
            return path
    return None


def bench_for_make(settings) -> dict[str, float]:
    """The ``make bench`` faces stage (tests/bench/run.py calls this)."""
    return bench_faces(default_bench_photo(settings))


def bench_report_rows(res: dict[str, float]) -> list[tuple[str, str, str]]:
    """Rows (measure, value, goal) for the ``make bench`` table."""
    return [
        (
            "face JPEG->match p50/p95, 640x480, one thread (ms)",
            f"{res['snapshot_to_match_p50_ms']:.0f} / {res['snapshot_to_match_p95_ms']:.0f}",
            "p95 <= 150",
        ),
        ("face JPEG->match CPU time per frame, p50 (ms)", f"{res['snapshot_to_match_cpu_p50_ms']:.0f}", ""),
        ("face analyses/s per core", f"{res['snapshots_per_s_per_core']:.1f}", ""),
        ("watchlist probe, 100k enrolled faces (ms)", f"{res['watchlist_probe_ms_100k']:.2f}", "<= 5"),
    ]


@app.command()
def bench(
    photo: Annotated[Path | None, typer.Option(help="face photo placed into a 640x480 frame (default: noise)")] = None,
    frames: Annotated[int, typer.Option(help="timed frames")] = 30,
    enrolled: Annotated[int, typer.Option(help="random embeddings enrolled in the watchlist")] = 100_000,
) -> None:
    """Timings as one JSON object (run on an otherwise idle core for meaningful numbers)."""
    typer.echo(json.dumps(bench_faces(photo, frames, enrolled)))


if __name__ == "__main__":
    sys.exit(app())
