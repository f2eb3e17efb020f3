"""The face join: transactions wait for their checkout face up to a deadline; either may come first."""

from dataclasses import dataclass

import pytest

from jobs.scoring.face_join import (
    DECIDED,
    EARLY_FACES,
    LATE_FIELDS,
    PENDING,
    FaceJoin,
    Seen,
    check_observation,
    observation_result,
    seen_from,
)
from jobs.scoring.rules import FaceResult
from tests.builders import sale


def env(tx_id: str):
    return (sale(tx_id).to_avro(), {}, 0)


def seen(status: str = "NO_MATCH", embedding=(0.1, 0.2), at: int = 0) -> Seen:
    return Seen(FaceResult(status), embedding, "img-1", "checkout:t1", at)


def test_transaction_waits_for_its_face_and_is_released_when_it_arrives():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    ready, writes = join.on_transaction(env("t1"), now_ms=1000)
    assert ready is None
    assert writes == [(PENDING, "t1", (env("t1"), 5000))]
    assert join.next_deadline() == 5000

    ready, writes = join.on_observation("t1", seen())
    assert ready is not None and ready.seen.face.status == "NO_MATCH"
    assert writes == [(PENDING, "t1", None)]
    assert join.next_deadline() is None


def test_transaction_goes_ahead_with_face_unavailable_after_the_deadline():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.on_transaction(env("t1"), now_ms=1000)
    assert join.due(now_ms=4999) == ([], [])
    ready, writes = join.due(now_ms=5000)
    assert [r.env[0]["transaction_id"] for r in ready] == ["t1"]
    assert ready[0].seen.face.status == "UNAVAILABLE"
    assert writes[0] == (PENDING, "t1", None) and writes[1][:2] == (DECIDED, "t1")


def test_a_face_after_the_deadline_is_released_late_with_its_decided_transaction_not_parked_as_early():
    """Real footage takes up to minutes to be stored: the face must not vanish in the early faces."""
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.on_transaction(env("t1"), now_ms=1000)
    join.due(now_ms=5000)
    ready, writes = join.on_observation("t1", seen(at=20_000))
    assert ready is not None and ready.late and ready.waited_ms is None and join.early == {}
    assert ready.env[0] == {k: sale("t1").to_avro()[k] for k in LATE_FIELDS}  # trimmed to what an alert names
    assert writes == [(DECIDED, "t1", None)] and join.decided == {}


def test_a_decided_transaction_is_remembered_for_the_early_face_ttl_only():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.on_transaction(env("t1"), now_ms=1000)
    join.due(now_ms=5000)
    assert join.due(now_ms=64_999) == ([], [])
    assert join.due(now_ms=65_000) == ([], [(DECIDED, "t1", None)]) and join.decided == {}
    ready, _ = join.on_observation("t1", seen(at=70_000))
    assert ready is None and "t1" in join.early  # as any face without its transaction


def test_face_seen_before_its_transaction_is_kept_until_the_transaction_comes():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    ready, writes = join.on_observation("t1", seen(at=1000))
    assert ready is None and writes[0][:2] == (EARLY_FACES, "t1")
    ready, writes = join.on_transaction(env("t1"), now_ms=2000)
    assert ready is not None and ready.seen.embedding == (0.1, 0.2)
    assert writes == [(EARLY_FACES, "t1", None)]


def test_early_faces_expire_so_state_stays_bounded():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.on_observation("t1", seen(at=1000))
    _, writes = join.due(now_ms=61_000)
    assert writes == [(EARLY_FACES, "t1", None)]
    assert join.early == {}


def test_without_a_face_stage_transactions_are_released_at_once():
    join = FaceJoin(deadline_ms=0, early_ttl_ms=60_000)
    ready, writes = join.on_transaction(env("t1"), now_ms=1000)
    assert ready is not None and ready.seen.face.status == "UNAVAILABLE" and writes == []


@dataclass
class FakeMatch:
    subject_id: str
    category: str
    similarity: float


class OneSubjectWatchlist:
    """Matches exactly one embedding: enough to check how a match changes the face result."""

    def search(self, embedding):
        return FakeMatch("subj-7", "SUSPECT", 97.123) if list(embedding) == [1.0, 0.0] else None

    def category(self, subject_id):
        return "SUSPECT" if subject_id == "subj-7" else None


def test_watchlist_match_upgrades_a_found_face_to_matched():
    obs = {"observation_id": "checkout:t1", "status": "NO_MATCH", "embedding": [1.0, 0.0], "image_ref": "r"}
    face = observation_result(obs, OneSubjectWatchlist())
    assert face == FaceResult("MATCHED", "subj-7", "SUSPECT", 97.12, "local")
    assert seen_from(obs, face, 5).embedding == (1.0, 0.0)
    other = dict(obs, embedding=[0.0, 1.0])
    assert observation_result(other, OneSubjectWatchlist()) == FaceResult("NO_MATCH")
    assert observation_result(dict(obs, status="NO_FACE", embedding=None), OneSubjectWatchlist()).status == "NO_FACE"


def test_a_match_the_stage_found_in_rekognition_is_taken_and_named_by_the_watchlist_without_a_local_search():
    obs = {"status": "MATCHED", "matcher": "rekognition", "subject_id": "subj-7", "similarity": 99.617}
    obs["embedding"] = [0.0, 1.0]  # matches nobody locally: the stage's match is the match
    assert observation_result(obs, OneSubjectWatchlist()) == FaceResult(
        "MATCHED", "subj-7", "SUSPECT", 99.62, "rekognition"
    )
    assert observation_result(dict(obs, subject_id="subj-gone"), OneSubjectWatchlist()) == FaceResult("NO_MATCH")
    assert observation_result(dict(obs, subject_id=None), OneSubjectWatchlist()) == FaceResult("NO_MATCH")
    searched = dict(obs, status="NO_MATCH", subject_id=None, similarity=None, embedding=[1.0, 0.0])
    assert observation_result(searched, OneSubjectWatchlist()) == FaceResult("NO_MATCH")  # no second opinion
    assert observation_result(dict(searched, status="UNAVAILABLE"), OneSubjectWatchlist()) == FaceResult("UNAVAILABLE")


def test_an_observation_with_an_unknown_matcher_or_a_similarity_outside_0_to_100_is_refused():
    from schemas.errors import InvalidRecord

    base = {"observation_id": "checkout:t1", "camera_serial": "Q2MV-S1-L1", "store_id": "store-001"}
    base |= {"trigger": "CHECKOUT", "status": "MATCHED", "subject_id": "subj-7", "matcher": "rekognition"}
    assert check_observation(dict(base, similarity=99.6)) is not None
    for bad in ({"matcher": "other"}, {"similarity": float("nan")}, {"similarity": 101.0}, {"similarity": -1.0}):
        with pytest.raises(InvalidRecord) as err:
            check_observation(dict(base, **bad))
        assert err.value.kind == "invalid_field"
