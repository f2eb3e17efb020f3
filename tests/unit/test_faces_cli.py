"""Faces CLI: detect prints one JSON line per image, compare gives similarity and decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.faces.cli import app
from schemas.errors import CheckoutGuardError
from tests.builders import FACE_LEN

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
IMAGES = FACES / "face_recognition" / "test_images"
pytestmark = pytest.mark.skipif(not FACES.is_dir(), reason="shared face photos (../shared/data/faces) absent")
runner = CliRunner()


def test_detect_prints_a_json_line_per_image_with_boxes_quality_and_embeddings(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture")
    result = runner.invoke(
        app,
        [
            "detect",
            "--embedding",
            str(FACES / "face_recognition" / "two_people.jpg"),
            str(FACES / "no_face" / "dogs.jpg"),
            str(bad),
        ],
    )
    assert result.exit_code == 1, result.output  # one image could not be decoded: its line says so, and the exit
    two, dogs, broken = (json.loads(line) for line in result.output.splitlines())
    assert len(two["faces"]) == 2 and all(len(f["embedding"]) == FACE_LEN and f["passed"] for f in two["faces"])
    assert set(two["faces"][0]) >= {"box", "quality", "passed", "reject_reason", "embedding"}
    assert dogs["faces"] == [] and broken == {"image": str(bad), "error": "not_an_image", "faces": []}
    plain = runner.invoke(app, ["detect", str(FACES / "face_recognition" / "two_people.jpg")])
    assert plain.exit_code == 0 and all("embedding" not in f for f in json.loads(plain.output)["faces"]), (
        "only if asked"
    )


def test_compare_decides_at_the_configured_threshold():
    same = json.loads(runner.invoke(app, ["compare", str(IMAGES / "obama.jpg"), str(IMAGES / "obama2.jpg")]).output)
    other = json.loads(runner.invoke(app, ["compare", str(IMAGES / "obama.jpg"), str(IMAGES / "biden.jpg")]).output)
    assert same["decision"] == "match" and same["similarity"] >= same["threshold"]
    assert other["decision"] == "no_match" and other["similarity"] < other["threshold"]


def test_compare_without_a_face_says_so_and_fails():
    result = runner.invoke(app, ["compare", str(IMAGES / "obama.jpg"), str(FACES / "no_face" / "white.png")])
    assert result.exit_code == 2 and json.loads(result.output)["decision"] == "no_face"


def test_evaluate_reports_match_rates_over_labelled_folders():
    """One network's report (SFace): rates at the threshold, cross-validated, quality-aware and per template count."""
    train = str(FACES / "face_recognition" / "knn_examples" / "train")
    result = runner.invoke(app, ["evaluate", train, "--no-synthetic", "--embedder", "sface", "--json"])
    report = json.loads(result.output)
    assert report["identities"] == 5 and report["genuine_pairs"] == 4 and report["impostor_pairs"] == 32
    assert report["tmr"] == 1.0 and report["fmr"] == 0.0
    assert report["embedder"] == "sface" and {"quality_aware_threshold", "templates", "at_threshold"} <= set(report)
    cv = report["cross_validated"]
    assert cv["genuine_pairs"] == 4 and cv["impostor_pairs"] == 32 and len(cv["fold_thresholds"]) == cv["folds"]
    assert set(report["roc_on_all_pairs"]) == {"0.001", "0.0001"}


def test_evaluate_fused_also_reports_each_embedder_on_the_same_faces():
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(FACES / "face_recognition" / "knn_examples" / "train"),
            "--no-synthetic",
            "--embedder",
            "fused",
            "--json",
        ],
    )
    report = json.loads(result.output)
    assert report["embedder"] == "fused" and set(report["by_embedder"]) == {"dlib", "sface"}
    for cv in report["by_embedder"].values():
        assert cv["genuine_pairs"] == 4 and cv["impostor_pairs"] == 32 and cv["tmr"] == 1.0


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / ".cache" / "faces-models" / "fr_feature.onnx").is_file(),
    reason="FacePlugin network not fetched (make face-models): fused3 unavailable",
)
def test_evaluate_fused3_reports_the_fusion_each_network_and_each_pair_held_out_only():
    args = ["evaluate", str(FACES / "face_recognition" / "knn_examples" / "train"), "--no-synthetic"]
    result = runner.invoke(app, [*args, "--embedder", "fused3", "--json"])
    report = json.loads(result.output)
    assert set(report["by_embedder"]) == {
        "dlib",
        "sface",
        "faceplugin",
        "sface+dlib",
        "sface+faceplugin",
        "faceplugin+dlib",
        "sface+dlib+faceplugin",
        "sface+dlib+faceplugin concatenated",
        "sface+faceplugin concatenated",
        "fused3 as searched, constants from all pairs",
    }
    for cv in (report["cross_validated"], *report["by_embedder"].values()):
        assert cv["genuine_pairs"] == 4 and cv["impostor_pairs"] == 32 and cv["tmr"] == 1.0
    assert "quality_aware_threshold" not in report and report["not_computed"]
    searched = report["by_embedder"]["fused3 as searched, constants from all pairs"]
    assert report["cross_validated"]["recommended_threshold"] == searched["recommended_threshold"]
    chosen = report["network_choice_cross_validated"]
    assert len(chosen["candidates"]) == 10 and len(chosen["chosen_per_fold"]) == chosen["folds"]
    assert set(chosen["chosen_per_fold"]) <= set(chosen["candidates"]) and chosen["genuine_pairs"] == 4
    # the engine's own scores at match_threshold: a hold-out figure for people its constants were not set on
    fixed = report["at_threshold"]
    assert fixed["threshold"] == report["threshold"] and "held out only for other people" in fixed["scores"]
    assert fixed["genuine_pairs"] == 4 and fixed["impostor_pairs"] == 32
    text = runner.invoke(app, [*args, "--embedder", "fused3"])
    assert text.exit_code == 0 and "not computed" in text.output
    held = runner.invoke(app, [*args, "--embedder", "fused3", "--fixed-threshold"])
    assert held.exit_code == 0 and "scores: fused3 as the engine makes" in held.output


def test_evaluate_counts_an_unreadable_photo_as_unusable_and_goes_on(tmp_path):
    """One empty or corrupt file ended the whole evaluation with an error that named no file."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(FACES / "face_recognition" / "knn_examples" / "train", train)
    (train / "obama" / "empty.jpg").write_bytes(b"")
    (train / "biden" / "notes.png").write_bytes(b"not a picture")
    result = runner.invoke(app, ["evaluate", str(train), "--no-synthetic", "--embedder", "sface", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["identities"] == 5 and report["genuine_pairs"] == 4
    unusable = report["no_usable_face"]
    assert f"{train / 'obama' / 'empty.jpg'} (empty)" in unusable
    assert f"{train / 'biden' / 'notes.png'} (not_an_image)" in unusable


@pytest.mark.parametrize(("content", "kind"), [(b"", "empty"), (b"not a picture", "not_an_image")])
def test_bench_names_a_photo_it_cannot_read(tmp_path, content: bytes, kind: str):
    """A decompression bomb was a PIL traceback; a text file an error without the file's name."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(content)
    result = runner.invoke(app, ["bench", "--photo", str(photo), "--frames", "1"])
    assert isinstance(result.exception, CheckoutGuardError) and str(result.exception).startswith(f"{photo}: {kind}: ")
