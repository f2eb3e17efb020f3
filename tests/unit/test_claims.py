"""An id names one transaction: a later one under another receipt is refused, for the receipt's retention."""

from __future__ import annotations

import pickle

import pytest

from infra.settings import Settings
from jobs.model.train import observe_all
from jobs.scoring.claims import CLAIMS, DUPLICATE_ID, DuplicateTransaction, IdClaims
from tests.builders import T0, return_of, sale

DAY = 86_400_000


def _tx(tx_id: str, at: int) -> dict:
    return {"transaction_id": tx_id, "event_time": at, "kind": "RETURN"}


def test_an_id_claimed_under_one_receipt_is_refused_under_another_and_taken_again_under_its_own():
    claims = IdClaims(10 * DAY)
    assert claims.claim(_tx("t1", T0), "t1") == [(CLAIMS, "t1", T0)]
    with pytest.raises(DuplicateTransaction) as err:
        claims.claim(_tx("t1", T0 + DAY), "s9")
    assert (
        err.value.kind == DUPLICATE_ID and "receipt 's9'" in err.value.reason and err.value.tx["transaction_id"] == "t1"
    )
    assert claims.claim(_tx("t1", T0 + DAY), "t1") == [(CLAIMS, "t1", T0 + DAY)]


def test_a_claim_under_the_transactions_own_id_keeps_only_its_time():
    claims = IdClaims(10 * DAY)
    tx_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    [(_, _, own)] = claims.claim(_tx(tx_id, T0), tx_id)  # a sale: filed under its own id
    [(_, _, other)] = claims.claim(_tx("r1", T0), tx_id)  # a return: under its sale's
    assert len(pickle.dumps(own, 4)) == len(pickle.dumps(T0, 4)), "the id is the map's key: no second copy"
    assert other == (tx_id, T0)


def test_claims_saved_as_pairs_by_an_older_job_still_hold_after_a_restore():
    claims = IdClaims(10 * DAY)
    claims.restore({"t1": ("t1", T0), "r1": ("s1", T0 + DAY)})
    with pytest.raises(DuplicateTransaction) as err:
        claims.claim(_tx("t1", T0 + DAY), "s9")
    assert "receipt 't1'" in err.value.reason
    with pytest.raises(DuplicateTransaction) as err:
        claims.claim(_tx("r1", T0 + DAY), "r1")
    assert "receipt 's1'" in err.value.reason
    assert claims.claim(_tx("r1", T0 + 2 * DAY), "s1") == [(CLAIMS, "r1", ("s1", T0 + 2 * DAY))]
    assert claims.expire(T0 + 10 * DAY + 1) == [(CLAIMS, "t1", None)]
    assert claims.expire(T0 + 12 * DAY + 1) == [(CLAIMS, "r1", None)] and claims.claimed == {}


def test_claims_expire_after_the_retention_and_survive_a_restore():
    claims = IdClaims(10 * DAY)
    claims.claim(_tx("old", T0), "old")
    claims.claim(_tx("new", T0 + 5 * DAY), "new")
    restored = IdClaims(10 * DAY)
    restored.restore(dict(claims.claimed))
    assert restored.expire(T0 + 10 * DAY) == []
    assert restored.expire(T0 + 10 * DAY + 1) == [(CLAIMS, "old", None)]
    assert set(restored.claimed) == {"new"}
    restored.claim(_tx("old", T0 + 11 * DAY), "elsewhere")  # free again


def test_a_history_rejects_a_row_reusing_an_earlier_rows_id_under_another_receipt_as_the_job_does():
    """Training and backtests build features by the job's own path: the reused row is left out with its reason."""
    rows = [sale("s1", amount=50), return_of("s1", "s0", at_s=600, amount=50), sale("s2", at_s=700)]
    history = observe_all(rows, Settings())
    assert [tx["transaction_id"] for tx, _ in history.items] == ["s1", "s2"]
    [(ident, reason)] = history.rejected
    assert ident == "s1" and "taken by an earlier transaction on receipt 's1'" in reason


def test_a_history_rejects_a_row_with_an_earlier_rows_id_and_other_content_under_its_receipt_as_the_job_does():
    rows = [sale("s1", amount=50), sale("s1", amount=55), sale("s1", amount=50), sale("s2", at_s=700)]
    history = observe_all(rows, Settings())
    assert [tx["transaction_id"] for tx, _ in history.items] == ["s1", "s2"] and history.duplicates == 1
    [(ident, reason)] = history.rejected
    assert ident == "s1" and "another amount;" in reason
