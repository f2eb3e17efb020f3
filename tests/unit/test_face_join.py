"""The face join: transactions wait for their checkout face up to a deadline; either may come first."""

from dataclasses import dataclass

import pytest

from infra.settings import Settings
from jobs.scoring.face_join import (
    DECIDED,
    EARLY_FACES,
    LATE_FIELDS,
    PENDING,
    FaceJoin,
    Seen,
    check_observation,
    late_face_ttl_ms,
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


def test_a_late_unavailable_answer_does_not_replace_the_face_held_for_its_transaction():
    """A transaction sent again (a replay) makes the face stage answer UNAVAILABLE ("late") under the same id; when
    the real face waited for its transaction, that answer replaced it and the transaction was decided faceless."""
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    assert join.on_observation("t1", seen("MATCHED", at=100)) == (None, [(EARLY_FACES, "t1", seen("MATCHED", at=100))])
    assert join.on_observation("t1", seen("UNAVAILABLE", embedding=None, at=200)) == (None, [])
    ready, _ = join.on_transaction(env("t1"), now_ms=300)
    assert ready is not None and ready.seen.face.status == "MATCHED"
    # the other way round, a real face replaces an UNAVAILABLE one held
    join.on_observation("t2", seen("UNAVAILABLE", embedding=None))
    join.on_observation("t2", seen("NO_MATCH"))
    ready, _ = join.on_transaction(env("t2"), now_ms=300)
    assert ready is not None and ready.seen.face.status == "NO_MATCH"


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


def light_env(tx_id: str):
    return ({"transaction_id": tx_id, "event_time": 0, "kind": "SALE"}, {}, 0)


class CountingDict(dict):
    """A join map that counts the entries read: a whole-map scan counts them all."""

    touched = 0

    def _count(self, n: int = 1) -> None:
        CountingDict.touched += n

    def get(self, key, default=None):
        self._count()
        return super().get(key, default)

    def __getitem__(self, key):
        self._count()
        return super().__getitem__(key)

    def __contains__(self, key):
        self._count()
        return super().__contains__(key)

    def pop(self, key, *default):
        self._count()
        return super().pop(key, *default)

    def __iter__(self):
        self._count(len(self))
        return super().__iter__()

    def items(self):
        self._count(len(self))
        return super().items()

    def values(self):
        self._count(len(self))
        return super().values()

    def keys(self):
        self._count(len(self))
        return super().keys()


def test_forgetting_remembered_transactions_touches_only_those_that_expire():
    """Late faces fill the memory exactly when the cameras lag; a timer that scanned it whole would cost
    rate x TTL per firing. 20 000 remembered, then 50 timer firings that each release one and forget one."""
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    for i in range(20_000):
        join.on_transaction(light_env(f"old-{i}"), now_ms=i)
        join.due(now_ms=4000 + i)
    assert len(join.decided) == 20_000
    join.decided = CountingDict(join.decided)
    CountingDict.touched = 0
    forgotten = 0
    for k in range(50):
        now = 64_000 + k  # old-k was released at 4000 + k: remembered until 64 000 + k
        join.on_transaction(light_env(f"new-{k}"), now_ms=now - 4000)
        _, writes = join.due(now_ms=now)
        forgotten += sum(1 for name, key, value in writes if name == DECIDED and value is None)
    assert forgotten == 50 and len(join.decided) == 20_000
    assert CountingDict.touched <= 4 * 50  # a few reads per entry released or forgotten, not 20 000 per firing


def test_the_late_face_memory_is_capped_and_forgets_the_oldest_first():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000, late_max=3)
    writes = []
    for i in range(5):
        join.on_transaction(light_env(f"t{i}"), now_ms=i)
        writes += join.due(now_ms=4000 + i)[1]
    assert sorted(join.decided) == ["t2", "t3", "t4"] and join.evicted == 2
    assert (DECIDED, "t0", None) in writes and (DECIDED, "t1", None) in writes
    ready, _ = join.on_observation("t4", seen(at=5000))
    assert ready is not None and ready.late  # the newest is still matched as a late face


def test_a_restored_memory_over_the_cap_is_cut_at_the_next_timer_oldest_first():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000, late_max=2)
    decided = {f"t{i}": (light_env(f"t{i}"), 60_000 + i) for i in (3, 1, 2, 0)}  # MapState order is no order
    join.restore({}, {}, decided)
    _, writes = join.due(now_ms=10_000)
    assert sorted(join.decided) == ["t2", "t3"] and writes == [(DECIDED, "t0", None), (DECIDED, "t1", None)]
    assert join.due(now_ms=60_002) == ([], [(DECIDED, "t2", None)])


def test_state_without_the_late_face_memory_restores_empty():
    """A savepoint taken before the memory existed has no ``decided_without_face`` map."""
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.restore({"t1": (env("t1"), 5000)}, {})
    assert join.decided == {} and join.next_deadline() == 5000
    ready, _ = join.due(now_ms=5000)
    assert [r.env[0]["transaction_id"] for r in ready] == ["t1"] and "t1" in join.decided


def test_remembered_transactions_keep_a_timer_so_they_go_when_traffic_stops():
    join = FaceJoin(deadline_ms=4000, early_ttl_ms=60_000)
    join.on_transaction(env("t1"), now_ms=1000)
    join.due(now_ms=5000)
    assert join.pending == {} and join.next_deadline() == 65_000  # remembered until 65 000 (whole seconds)
    assert join.due(now_ms=65_000)[1] == [(DECIDED, "t1", None)] and join.next_deadline() is None
    join.on_observation("t2", seen(at=1500))  # an early face: kept until 61 500, its timer at 62 000
    assert join.next_deadline() == 62_000


def test_a_transaction_is_remembered_only_as_long_as_its_face_can_still_come():
    cameras = {"max_lag_s": 60, "deadline_s": 30}
    assert late_face_ttl_ms(Settings(cameras=cameras)) == 95_000  # + 5 s for analysis and Kafka
    assert late_face_ttl_ms(Settings()) == 600_000  # never longer than CG_JOB__EARLY_FACE_TTL_MS


def test_the_gather_step_restores_state_with_and_without_the_late_face_memory():
    from jobs.scoring.partitioned import GatherStep

    old = GatherStep(Settings())
    old.restore({PENDING: {"t1": (env("t1"), 5000)}})  # a savepoint from before the memory
    assert old.join.decided == {} and old.join.next_deadline() == 5000
    new = GatherStep(Settings())
    new.restore({DECIDED: {"t2": (light_env("t2"), 70_000)}})
    assert new.join.next_deadline() == 70_000
    assert new.due(now_ms=70_000) == [] and new.flush() == {DECIDED: {"t2": None}}


@dataclass
class FakeMatch:
    subject_id: str
    category: str
    similarity: float


class OneSubjectWatchlist:
    """Matches exactly one embedding: enough to check how a match changes the face result."""

    def search(self, embedding, at_ms=None):
        return FakeMatch("subj-7", "SUSPECT", 97.123) if list(embedding) == [1.0, 0.0] else None

    def category(self, subject_id, at_ms=None):
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


@pytest.mark.parametrize(
    ("field", "value"), [("early_face_ttl_ms", -1), ("late_face_memory_max", -1), ("late_face_memory_max", 10**8)]
)
def test_face_memory_settings_out_of_bounds_are_settings_errors(field: str, value: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        Settings(job={field: value})
