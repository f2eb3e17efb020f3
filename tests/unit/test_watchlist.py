"""Watchlist search: nearest embedding over all subjects, threshold decision, tombstones."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from infra.settings import FaceSettings
from jobs.faces.engine import FaceEngine
from jobs.scoring import watchlist as watchlist_module
from jobs.scoring.face_similarity import (
    FUSED3_PARTS,
    FUSED3_WEIGHTS,
    PREFILTER_SIMILARITY,
    check_embedding,
    distance,
    similarity,
)
from jobs.scoring.watchlist import Match, Watchlist, prefilter
from schemas.errors import InvalidRecord

FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason="shared face photos (../shared/data/faces) absent")


@pytest.fixture(autouse=True, params=["float32", "int8"])
def search_path(request, monkeypatch):
    """Every test twice: with the float32 matrix alone (small watchlists), and with the int8 copy read first (what
    watchlists of ``INT8_FROM_ROWS`` faces and more do): the answers must be the same."""
    if request.param == "int8":
        monkeypatch.setattr(watchlist_module, "INT8_FROM_ROWS", 1)
    return request.param


SFACE = FaceSettings(embedder="sface")
"""A one-network watchlist (128 values, plain Euclidean distance), what most tests' unit vectors and thresholds are
made for; the default embedder's (``fused3``, 768 values, summed distances) has tests of its own below."""


def entry(subject: str, embeddings, category: str = "SUSPECT") -> dict:
    return {
        "subject_id": subject,
        "category": category,
        "embeddings": [list(map(float, e)) for e in embeddings],
        "reason": "test",
        "flagged_by": "t@example.com",
        "flagged_at": 1,
    }


def unit(rng, n=1):
    v = rng.normal(0, 1, (n, 128)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_empty_watchlist_matches_nobody():
    assert Watchlist(SFACE).search(np.zeros(128)) is None


def test_threshold_comes_from_the_faces_settings_whole_settings_or_an_override():
    from infra.settings import Settings

    assert Watchlist(Settings()).threshold == Settings().faces.match_threshold
    assert Watchlist(FaceSettings(match_threshold=70)).threshold == 70
    assert Watchlist(SFACE, threshold=60).threshold == 60


def test_search_returns_the_subject_of_the_nearest_embedding_across_several_per_subject():
    rng = np.random.default_rng(0)
    w = Watchlist(SFACE, threshold=52)
    a, b = unit(rng, 3), unit(rng, 2)
    w.upsert(entry("subj-a", a))
    w.upsert(entry("subj-b", b, "VIP"))
    m = w.search(b[1] + 0.001)
    assert m == Match("subj-b", "VIP", m.similarity) and m.similarity > 99
    assert w.search(a[2]).subject_id == "subj-a"
    assert w.search(unit(rng)[0]) is None, "an unrelated face is below the threshold"


def test_threshold_is_inclusive_and_configurable():
    base = np.zeros(128, np.float32)
    probe = base.copy()
    probe[0] = 0.576  # similarity exactly 52
    w = Watchlist(SFACE, threshold=52)
    w.upsert(entry("s", [base]))
    assert w.search(probe) is not None
    assert Watchlist(SFACE, threshold=52.1).search(probe) is None


def test_upsert_replaces_and_remove_forgets():
    rng = np.random.default_rng(1)
    e1, e2 = unit(rng), unit(rng)
    w = Watchlist(SFACE, threshold=52)
    w.upsert(entry("s", e1))
    w.upsert(entry("s", e2, "VIP"))
    assert len(w) == 1 and w.search(e1[0]) is None and w.search(e2[0]).category == "VIP"
    w.remove("s")
    w.remove("s")  # a replayed tombstone is harmless
    assert w.search(e2[0]) is None and "s" not in w and w.get("s") is None


@pytest.mark.parametrize("embedder", ["sface", "fused3"])
def test_an_entry_expired_at_the_time_given_matches_nothing_and_the_nearest_live_subject_matches_instead(embedder):
    """The watchlist service tombstones an expired entry; while it is down the entry stays here, and a lapsed
    listing went on matching (and alerting) until it came back."""
    rng = np.random.default_rng(12)
    faces, dim = (unit, 128) if embedder == "sface" else (fused3, 768)
    e = faces(rng)[0]
    w = Watchlist(FaceSettings(embedder=embedder), threshold=50)
    w.upsert({**entry("subj-old", [e]), "expires_at": 1_000})
    w.upsert({**entry("subj-new", [e + rng.normal(0, 0.001, dim).astype(np.float32)], "VIP"), "expires_at": 5_000})
    w.upsert({**entry("subj-far", faces(rng)), "expires_at": 9_000})
    assert w.search(e).subject_id == "subj-old"  # no time given: every entry, as before
    assert w.search(e, at_ms=999).subject_id == "subj-old"
    found = w.search(e, at_ms=1_000)  # expired at its expires_at, as the service reckons it
    assert (found.subject_id, found.category) == ("subj-new", "VIP") and found.similarity > 90
    assert w.search(e, at_ms=5_000) is None  # subj-far is live but no match
    assert w.search(e, at_ms=9_000) is None  # none live
    assert (w.category("subj-old"), w.category("subj-old", 999), w.category("subj-old", 1_000)) == (
        "SUSPECT",
        "SUSPECT",
        None,
    )
    assert "subj-old" in w  # held (the tombstone decides that), only not matched


def test_an_entry_without_expires_at_lapses_at_flagged_at_plus_the_configured_lifetime_also_after_pickling():
    rng = np.random.default_rng(13)
    e = unit(rng)[0]
    w = Watchlist(FaceSettings(embedder="sface", watchlist_expire_days=1), threshold=50)
    w.upsert(entry("subj-v1", [e]))  # written before v2: flagged_at 1, no expires_at
    day = 86_400_000
    for watchlist in (w, pickle.loads(pickle.dumps(w))):
        assert watchlist.search(e, at_ms=day).subject_id == "subj-v1"
        assert watchlist.search(e, at_ms=day + 1) is None and watchlist.category("subj-v1", day + 1) is None


def test_watchlist_survives_pickling_for_operator_state():
    rng = np.random.default_rng(2)
    e = unit(rng, 2)
    w = Watchlist(SFACE, threshold=52)
    w.upsert(entry("s", e))
    copy = pickle.loads(pickle.dumps(w))
    assert copy.search(e[1]).subject_id == "s" and copy.get("s")["embeddings"][0] == pytest.approx(e[0].tolist())


def test_concurrent_updates_and_searches_do_not_break_the_index():
    rng = np.random.default_rng(3)
    vecs = unit(rng, 200)
    w = Watchlist(SFACE, threshold=52)
    errors = []

    def writer():
        for i, v in enumerate(vecs):
            w.upsert(entry(f"s{i}", [v]))
            if i % 3 == 0:
                w.remove(f"s{i}")

    def reader():
        try:
            for v in vecs:
                m = w.search(v)
                assert m is None or m.subject_id.startswith("s")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(w) == 200 - 67
    assert w.search(vecs[1]).subject_id == "s1" and w.search(vecs[3]) is None


@needs_faces
def test_real_faces_pick_the_right_subject_among_several():
    """Enroll one photo of each of several people; another photo of each finds that person."""
    engine = FaceEngine(FaceSettings())  # the default embedder, fused3
    w = Watchlist(FaceSettings())
    people = sorted(p for p in (FACES / "dlib" / "johns").iterdir() if p.is_dir())
    probes = {}
    for person in people:
        photos = sorted(person.glob("*.jpg"))
        w.upsert(entry(f"subj-{person.name}", [engine.best_face(photos[0].read_bytes()).embedding]))
        probes[person.name] = engine.best_face(photos[-1].read_bytes()).embedding
    for name, probe in probes.items():
        assert w.search(probe).subject_id == f"subj-{name}"
    stranger = engine.best_face((FACES / "face_recognition" / "test_images" / "biden.jpg").read_bytes())
    assert w.search(stranger.embedding) is None


# --- unusable embeddings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        [float("nan")] * 128,
        [float("inf")] + [0.0] * 127,
        [0.1, 0.2, 0.3],
        [0.0] * 256,  # reshaped into two "embeddings" before
        [1e30] * 128,  # finite, but its squared norm overflows float32
    ],
    ids=["nan", "inf", "3_values", "256_values", "huge"],
)
def test_an_entry_with_an_unusable_embedding_is_refused_and_changes_nothing(bad):
    rng = np.random.default_rng(4)
    good = unit(rng)
    w = Watchlist(SFACE, threshold=52)
    w.upsert(entry("s", good))
    with pytest.raises(InvalidRecord) as err:
        w.upsert(entry("s", [good[0], bad]))
    assert err.value.kind == "invalid_embedding" and "embeddings[1]" in err.value.reason
    assert w.search(good[0]).subject_id == "s", "the subject as it was"
    assert w.search(unit(rng)[0]) is None, "nobody else matches"


def test_a_nan_entry_cannot_make_everyone_match_even_if_it_got_in():
    w = Watchlist(SFACE, threshold=52)
    w.upsert(entry("s", unit(np.random.default_rng(5))))
    w._entries["s"]["embeddings"][0, 0] = np.nan  # as if accepted before embeddings were checked
    w._dirty = True
    assert w.search(unit(np.random.default_rng(6))[0]) is None


@pytest.mark.parametrize("probe", [[float("nan")] * 128, [0.1, 0.2, 0.3], [float("-inf")] * 128])
def test_a_probe_that_is_not_a_face_descriptor_is_refused_not_matched(probe):
    w = Watchlist(SFACE, threshold=0)  # threshold 0: anything that returned would be a match
    w.upsert(entry("s", unit(np.random.default_rng(7))))
    with pytest.raises(InvalidRecord) as err:
        w.search(probe)
    assert err.value.kind == "invalid_embedding"


def test_an_entry_without_embeddings_is_kept_and_matches_nobody():
    """A subject only another backend (a Rekognition collection) can match."""
    w = Watchlist(SFACE, threshold=0)
    w.upsert({**entry("subj-r", []), "embeddings": []})
    assert "subj-r" in w and w.search(unit(np.random.default_rng(8))[0]) is None


@pytest.mark.parametrize("changes", [{"subject_id": "../../x"}, {"subject_id": ""}, {"category": "BOSS"}])
def test_an_entry_with_a_bad_subject_id_or_category_is_refused(changes):
    w = Watchlist(SFACE, threshold=52)
    with pytest.raises(InvalidRecord):
        w.upsert({**entry("s", unit(np.random.default_rng(9))), **changes})
    assert len(w) == 0


def test_similarity_of_non_finite_embeddings_is_zero_and_different_lengths_raise():
    a = [0.1] * 128
    assert similarity(a, a) == 100.0
    assert similarity([float("nan")] * 128, a) == 0.0
    assert similarity(a, [float("inf")] + [0.1] * 127) == 0.0
    with pytest.raises(ValueError, match="different lengths"):
        similarity(a, [0.1])  # numpy would broadcast it


def test_check_embedding_names_the_problem():
    assert check_embedding([0.0] * 128) == [0.0] * 128
    for bad, words in (([0.0] * 3, "128 or 768 values, got 3"), ("x" * 128, "list of numbers"), ([None] * 128, "NaN")):
        with pytest.raises(InvalidRecord) as err:
            check_embedding(bad, "embedding")
        assert err.value.kind == "invalid_embedding" and words in err.value.reason


def fused3(rng, n=1) -> np.ndarray:
    """``n`` embeddings shaped like ``fused3`` ones: each network's part a random direction at norm 0.546, weighted."""
    parts = []
    for name, length in FUSED3_PARTS:
        v = rng.normal(0, 1, (n, length))
        parts.append(0.546 * FUSED3_WEIGHTS[name] * v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.concatenate(parts, axis=1).astype(np.float32)


def test_a_fused3_watchlist_holds_768_value_embeddings_and_refuses_other_lengths():
    rng = np.random.default_rng(3)
    w = Watchlist(FaceSettings(embedder="fused3"))
    with pytest.raises(InvalidRecord, match="768 values, got 128") as err:
        w.upsert(entry("s1", unit(rng)))
    assert err.value.kind == "invalid_embedding" and "s1" not in w
    with pytest.raises(InvalidRecord, match="128 values, got 768"):
        Watchlist(FaceSettings(embedder="sface")).upsert(entry("s1", fused3(rng)))
    enrolled = fused3(rng)
    w.upsert(entry("s1", enrolled))
    assert w.search(enrolled[0]).subject_id == "s1"
    with pytest.raises(InvalidRecord, match="768 values, got 128"):
        w.search(unit(rng)[0])
    with pytest.raises(ValueError, match="evaluate"):
        Watchlist(FaceSettings(embedder="fused"))


def test_the_two_step_search_matches_only_past_the_sface_cut_and_otherwise_by_the_summed_distance():
    rng = np.random.default_rng(4)
    w = Watchlist(FaceSettings(embedder="fused3"), threshold=50)
    enrolled = fused3(rng, 300)
    for i, e in enumerate(enrolled):
        w.upsert(entry(f"s{i}", [e]))
    start, end, radius = prefilter("fused3")
    assert (start, end) == (128, 256) and radius == pytest.approx(
        FUSED3_WEIGHTS["sface"] * 1.2 * (1 - PREFILTER_SIMILARITY / 100)
    )
    direction = unit(rng)[0]
    for factor, matches in ((0.95, True), (1.05, False)):
        probe = enrolled[7].copy()  # dlib's and FacePlugin's features the same; SFace's moved by factor * radius
        probe[start:end] += factor * radius * direction
        full = similarity(probe, enrolled[7])
        assert full > 60  # a one-step search would match either probe
        found = w.search(probe)
        assert (found is not None) is matches
        if found is not None:
            assert found.subject_id == "s7" and found.similarity == pytest.approx(full, abs=0.01)
    for i in rng.integers(0, 300, 20):  # near an enrolled face: the nearest of all, as a full search finds it
        probe = enrolled[i] + rng.normal(0, 0.002, 768).astype(np.float32)
        best = int(np.argmin(distance(enrolled, probe)))
        assert w.search(probe) == Match(f"s{best}", "SUSPECT", round(similarity(probe, enrolled[best]), 2))
    copy = pickle.loads(pickle.dumps(w))
    assert copy.embedder == "fused3" and copy.search(enrolled[3]).subject_id == "s3"


def test_the_fused3_distance_is_the_sum_of_the_three_networks_distances():
    rng = np.random.default_rng(6)
    a, b = fused3(rng, 2)
    b[128:256] = a[128:256] + rng.normal(0, 0.01, 128)  # SFace's features near: past the first step's cut
    parts = [np.linalg.norm(a[s] - b[s]) for s in (slice(0, 128), slice(128, 256), slice(256, 768))]
    assert distance(a, b) == pytest.approx(sum(parts), rel=1e-6)
    assert similarity(a, b) == pytest.approx(100 * (1 - sum(parts) / 1.2) if sum(parts) < 1.2 else 0.0, abs=1e-4)
    assert distance(a[:128], b[:128]) == pytest.approx(np.linalg.norm(a[:128] - b[:128]), rel=1e-6)  # one network
    w = Watchlist(FaceSettings(embedder="fused3"), threshold=0)
    w.upsert(entry("s1", [a]))
    assert w.search(b).similarity == pytest.approx(round(similarity(a, b), 2), abs=0.01)


def test_the_second_step_ranks_by_the_summed_distance_not_the_euclidean_one():
    """Two faces past the first step: one differs only in dlib's part by 0.3 (sum 0.3, Euclidean 0.3), the other in
    dlib's and FacePlugin's parts by 0.2 each (sum 0.4, Euclidean 0.28). The summed distance picks the first."""
    rng = np.random.default_rng(8)
    probe = fused3(rng)[0]
    one, other = probe.copy(), probe.copy()
    one[:128] += 0.3 * unit(rng)[0]
    other[:128] += 0.2 * unit(rng)[0]
    fp = rng.normal(0, 1, 512)
    other[256:] += (0.2 * fp / np.linalg.norm(fp)).astype(np.float32)
    assert np.linalg.norm(other - probe) < np.linalg.norm(one - probe) and distance(one, probe) < distance(other, probe)
    w = Watchlist(FaceSettings(embedder="fused3"), threshold=0)
    w.upsert(entry("s-one", [one]))
    w.upsert(entry("s-other", [other]))
    found = w.search(probe)
    assert found.subject_id == "s-one" and found.similarity == pytest.approx(100 * (1 - 0.3 / 1.2), abs=0.02)


@pytest.mark.parametrize("embedder", ["sface", "fused3"])
def test_a_large_watchlist_answers_the_same_with_its_int8_copy_as_in_float32(embedder, search_path):
    """Thousands of enrolled faces, probes near some of them (matches at several distances), strangers and the
    enrolled faces themselves: the int8 first read changes no answer, neither the subject nor its similarity (an
    identical face is 100 both ways)."""
    if search_path == "int8":
        pytest.skip("builds both paths itself")
    from jobs.faces.cli import fused3_like

    rng = np.random.default_rng(11)
    n = 3000
    if embedder == "fused3":
        faces, spreads = fused3_like(rng, n), (0.001, 0.004, 0.008)
        strangers = fused3_like(np.random.default_rng(12), 40)
    else:
        faces = rng.normal(0, 1, (n, 128)).astype(np.float32)
        faces /= np.linalg.norm(faces, axis=1, keepdims=True)
        faces *= np.float32(0.4)  # within the match threshold's reach (distance 0.59): matches and misses both
        spreads, strangers = (0.005, 0.03, 0.05), rng.normal(0, 0.04, (40, 128)).astype(np.float32)
    picks = rng.integers(0, n, 3 * 40)
    noise = rng.normal(0, 1, (len(picks), faces.shape[1])).astype(np.float32) * np.repeat(spreads, 40)[:, None]
    probes = np.vstack([faces[picks] + noise.astype(np.float32), strangers, faces[:20]])
    answers = {}
    for name, from_rows in (("float32", 10**9), ("int8", 1)):
        watch = Watchlist(FaceSettings(embedder=embedder), int8_from_rows=from_rows)
        for i in range(n):
            watch.upsert({"subject_id": f"s{i}", "category": "SUSPECT", "embeddings": faces[i : i + 1]})
        answers[name] = [watch.search(p) for p in probes]
        assert (watch._coarse is not None) == (name == "int8")
    matched = sum(m is not None for m in answers["float32"])
    assert 0.3 * len(probes) < matched < len(probes)  # both answers occur
    assert answers["int8"] == answers["float32"]
    assert all(m is not None and m.similarity == 100.0 for m in answers["int8"][-20:])


def test_with_the_int8_copy_a_nan_row_gives_the_answers_it_gives_without():
    """A non-finite row (an entry that got in unchecked) is always measured again, so the search answers as the
    float32 one does (which never reports it as a match), also for a probe identical to another subject's face."""
    rng = np.random.default_rng(9)
    faces = unit(rng, 3)
    answers = []
    for from_rows in (10**9, 1):
        w = Watchlist(SFACE, threshold=52, int8_from_rows=from_rows)
        w.upsert(entry("bad", faces[:1]))
        w.upsert(entry("real", faces[1:2]))
        w._entries["bad"]["embeddings"][0, 0] = np.nan
        w._dirty = True
        answers.append((w.search(faces[1]), w.search(faces[2])))
        assert (w._coarse is not None) == (from_rows == 1)
    assert answers[0] == answers[1]


def test_a_threshold_of_zero_matches_the_nearest_subject_with_the_int8_copy_too():
    rng = np.random.default_rng(10)
    faces = unit(rng, 4)
    for from_rows in (10**9, 1):
        w = Watchlist(SFACE, threshold=0, int8_from_rows=from_rows)
        for k in range(3):
            w.upsert(entry(f"s{k}", faces[k : k + 1]))
        nearest = min(range(3), key=lambda k: float(np.linalg.norm(faces[k] + faces[3])))
        assert w.search(-faces[3]).subject_id == f"s{nearest}"
