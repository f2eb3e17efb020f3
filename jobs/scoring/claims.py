"""Which receipt each transaction id was decided under: an id names one transaction.

The receipt step drops a transaction delivered twice, but it only knows the ids filed under its own
receipt. A record that reuses an id under another receipt (a return naming another sale than the one it
was first sent with, a sale resent as a return, a POS that reuses ids) went on to be decided again:
its scored record replaced the first one in OpenSearch (both are filed under the transaction id), its
alert could be taken for the first one's, and on the way the face join, which holds transactions by
id, dropped the first one if it was still waiting for its face. The first transaction to claim an id
keeps it for the receipt's retention (event time, as the receipt's own duplicate check); a later one
under another receipt is a dead letter, ``duplicate_transaction_id``. A record reusing an id under the
*same* receipt with other content is found by the receipt itself (:class:`jobs.scoring.features.Receipt` keeps a
digest per id) and is a ``conflicting_transaction`` dead letter; an identical copy is a redelivery, dropped.

Checked where a transaction is held by its id, just before the face join, on both layouts: it has
been counted in the receipt's, the store's and the profiles' history by then (the POS did send it),
and it is not decided. Pure logic; the job persists :attr:`IdClaims.claimed` as a state map.
"""

from __future__ import annotations

import heapq
from typing import Any

from schemas.errors import InvalidRecord

CLAIMS = "claims"
"""The state map (its MapState name on both layouts): transaction id -> :data:`Claim`."""
DUPLICATE_ID = "duplicate_transaction_id"
"""Dead-letter kind of a transaction whose id another receipt's transaction claimed first."""

CONFLICTING_ID = "conflicting_transaction"
"""Dead-letter kind of a record under the receipt of a transaction with its id, but with other content (amount,
currency, kind, store, customer, time or original id): not a redelivered copy, and not decided. Permanent: sent
again, the same bytes meet the same first transaction."""

Claim = int | tuple[str, int]
"""One claim as kept and persisted: the event time (ms) alone when the receipt key is the transaction's own id (a sale,
most transactions: no second copy of the id in every claim), else (receipt key, event time). State saved before
2026-12-06 holds only pairs, and reads the same."""


def _held(tx_id: str, claim: Claim) -> tuple[str, int]:
    """(receipt key, event time) of ``tx_id``'s claim, whichever shape it is kept in."""
    return (tx_id, claim) if isinstance(claim, int) else claim


class IdConflict(InvalidRecord):
    """A record whose transaction id names another transaction already: not decided. It carries the transaction for
    its dead letter (where no source record is at hand: the partitioned layout's receipt and gather steps), and the
    state writes made before it was found (``writes``), for the caller to persist all the same."""

    def __init__(self, kind: str, reason: str, tx: dict[str, Any]) -> None:
        super().__init__(kind, reason)
        self.tx = tx
        self.writes: list[tuple[str, str, Any]] = []


class DuplicateTransaction(IdConflict):
    """A transaction whose id another receipt's transaction holds."""

    def __init__(self, reason: str, tx: dict[str, Any]) -> None:
        super().__init__(DUPLICATE_ID, reason, tx)


class ConflictingTransaction(IdConflict):
    """A record with the id of a transaction already filed under the same receipt, but other content."""

    def __init__(self, reason: str, tx: dict[str, Any]) -> None:
        super().__init__(CONFLICTING_ID, reason, tx)


class IdClaims:
    """Transaction id -> the receipt it was decided under and when (event time), kept ``retention_ms``."""

    def __init__(self, retention_ms: int) -> None:
        self.retention_ms = retention_ms
        self.claimed: dict[str, Claim] = {}
        self._by_time: list[tuple[int, str]] = []

    def restore(self, claimed: dict[str, Claim]) -> None:
        self.claimed = dict(claimed)
        self._by_time = [(_held(tx_id, claim)[1], tx_id) for tx_id, claim in self.claimed.items()]
        heapq.heapify(self._by_time)

    def claim(self, tx: dict[str, Any], receipt: str) -> list[tuple[str, str, Claim | None]]:
        """Claim ``tx``'s id for ``receipt``: the state writes, or :class:`DuplicateTransaction` when a transaction of
        another receipt holds it (within the retention before ``tx``'s own time)."""
        tx_id, at = tx["transaction_id"], tx["event_time"]
        kept = self.claimed.get(tx_id)
        held = None if kept is None else _held(tx_id, kept)
        if held is not None and held[0] != receipt and held[1] >= at - self.retention_ms:
            raise DuplicateTransaction(
                f"transaction id {tx_id[:128]!r} was taken by an earlier transaction on receipt {held[0][:128]!r};"
                f" this {str(tx.get('kind')).lower()} on receipt {receipt[:128]!r} is not decided",
                tx,
            )
        since = max(at, held[1]) if held is not None and held[0] == receipt else at
        claim: Claim = since if receipt == tx_id else (receipt, since)
        self.claimed[tx_id] = claim
        heapq.heappush(self._by_time, (since, tx_id))
        return [(CLAIMS, tx_id, claim)]

    def expire(self, newest_ms: int) -> list[tuple[str, str, Claim | None]]:
        """Claims older than the retention before ``newest_ms`` (event time): their removal writes."""
        cutoff = newest_ms - self.retention_ms
        writes: list[tuple[str, str, Claim | None]] = []
        heap = self._by_time
        while heap and heap[0][0] < cutoff:
            at, tx_id = heapq.heappop(heap)
            held = self.claimed.get(tx_id)
            if held is not None and _held(tx_id, held)[1] == at:
                del self.claimed[tx_id]
                writes.append((CLAIMS, tx_id, None))
        if len(heap) > 2 * len(self.claimed) + 64:  # stale items of ids claimed again
            self.restore(self.claimed)
        return writes
