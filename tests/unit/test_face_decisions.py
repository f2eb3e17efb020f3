"""Decisions that use the checkout face: buyer-vs-returner check and watchlist alerts."""

import numpy as np

from infra.settings import Settings
from jobs.scoring.face_join import Seen
from jobs.scoring.rules import FaceResult
from jobs.scoring.scorer import Scorer, ScoringState
from schemas.codec import codec
from tests.builders import T0, face_vector, return_of, sale

rng = np.random.default_rng(7)
BUYER = tuple(face_vector(rng))  # the configured embedder's length
STRANGER = tuple(face_vector(rng))


def decide(scorer: Scorer, state: ScoringState, tx, camera: Seen):
    env = scorer.parse(tx.encode(), None, "transactions", 0, 0, T0 + 30 * 86_400_000)
    env, _ = scorer.observe(env, state)
    rows, _ = scorer.decide_batch([env], seen=[camera], state=state)
    return rows


def camera(embedding, tx_id: str, face: FaceResult | None = None) -> Seen:
    return Seen(face or FaceResult("NO_MATCH"), embedding, f"checkout/{tx_id}.jpg", f"checkout:{tx_id}", T0)


def scored(rows) -> dict:
    return codec("ScoredTransaction").decode(rows[0][2])


def alerts(rows) -> list[dict]:
    return [codec("Alert").decode(v) for t, _, v in rows if t.endswith("alerts")]


def test_return_by_someone_other_than_the_buyer_is_blocked_even_with_the_same_card():
    scorer, state = Scorer(Settings()), ScoringState()
    decide(scorer, state, sale("t1", store="store-A", amount=300), camera(BUYER, "t1"))
    rows = decide(scorer, state, return_of("r1", "t1", at_s=900, store="store-B", amount=300), camera(STRANGER, "r1"))
    out = scored(rows)
    assert out["outcome"] == "BLOCK"
    assert "buyer_face_mismatch" in out["reasons"] and "cross_store_return" in out["reasons"]
    assert out["indicators"]["buyer_face_similarity"] < Settings().faces.match_threshold
    [alert] = alerts(rows)
    assert alert["kind"] == "BLOCKED_TRANSACTION" and alert["snapshot_ref"] == "checkout/r1.jpg"


def test_return_by_the_buyer_themself_is_not_flagged_as_a_mismatch():
    scorer, state = Scorer(Settings()), ScoringState()
    decide(scorer, state, sale("t1", store="store-A", amount=300), camera(BUYER, "t1"))
    out = scored(
        decide(scorer, state, return_of("r1", "t1", at_s=86_400 * 3, store="store-A", amount=300), camera(BUYER, "r1"))
    )
    assert "buyer_face_mismatch" not in out["reasons"]
    assert out["indicators"]["buyer_face_similarity"] == 100.0


def test_suspect_at_checkout_raises_a_watchlist_alert_with_the_snapshot():
    scorer, state = Scorer(Settings()), ScoringState()
    face = FaceResult("MATCHED", "subj-t0", "SUSPECT", 91.5)
    rows = decide(scorer, state, sale("t9", amount=40), camera(BUYER, "t9", face))
    out = scored(rows)
    assert out["face_status"] == "MATCHED" and "watchlist_suspect" in out["reasons"]
    kinds = {a["kind"]: a for a in alerts(rows)}
    assert kinds["WATCHLIST_MATCH"]["alert_id"] == "watchlist:checkout:t9:subj-t0"
    assert kinds["WATCHLIST_MATCH"]["snapshot_ref"] == "checkout/t9.jpg"
    assert out["outcome"] == "REVIEW" and "BLOCKED_TRANSACTION" not in kinds, "a face match alone never blocks"


def test_suspect_at_the_entrance_raises_suspect_entered_and_a_vip_a_notification():
    scorer = Scorer(Settings())
    obs = {
        "observation_id": "entrance:Q2MV-store-A-ENTRANCE:42",
        "event_time": T0,
        "store_id": "store-A",
        "lane_id": None,
        "image_ref": "entrance/x.jpg",
    }
    [(_, key, value)] = scorer.entrance(obs, FaceResult("MATCHED", "subj-1", "SUSPECT", 88.0))
    alert = codec("Alert").decode(value)
    assert key == b"watchlist:entrance:Q2MV-store-A-ENTRANCE:42:subj-1"
    assert alert["kind"] == "SUSPECT_ENTERED" and "entered" in alert["summary"]
    [(_, _, value)] = scorer.entrance(obs, FaceResult("MATCHED", "subj-2", "VIP", 90.0))
    assert codec("Alert").decode(value)["kind"] == "VIP_ARRIVED"
    assert scorer.entrance(obs, FaceResult("NO_MATCH")) == []
