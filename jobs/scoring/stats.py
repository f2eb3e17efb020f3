"""What the scoring core did, as counts and recent timings, for the job's metrics (pure: no Flink).

The scoring path adds to one :class:`JobStats` as it goes (a counter increment per decision, one timing
per model call); the Flink operator reads the increase after each call (:class:`Increments`) and hands it
to Flink's metric group in a few calls per batch (:mod:`jobs.flink.job_metrics`), so nothing is pushed
into the JVM per record. Label values are bounded sets: outcomes, record kinds, dead-letter kinds.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator

TRANSACTION, FACE_OBSERVATION = "transaction", "face_observation"
"""Kinds of input record (``records_in``'s ``kind``)."""
WINDOW = 2048
"""Samples kept per timing: the percentiles describe the most recent ones."""


class RecentWindow:
    """The last ``size`` samples of a timing; percentiles over them, computed when asked."""

    __slots__ = ("samples", "added")

    def __init__(self, size: int = WINDOW) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self.added = 0
        """Samples ever added: tells a reader whether anything new came since it last looked."""

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.added += 1

    def extend(self, values: Iterable[float]) -> None:
        batch = list(values)
        self.samples.extend(batch)
        self.added += len(batch)

    def percentiles(self, *qs: float) -> tuple[float, ...] | None:
        """Nearest-rank percentiles (0-100) of the samples, in the order asked; ``None`` without samples."""
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        last = len(ordered) - 1
        return tuple(ordered[min(last, max(0, round(q / 100 * last)))] for q in qs)


class JobStats:
    """Totals since the job's scoring core was made, and its recent timings.

    ``outcomes``: decisions by outcome (``APPROVE``, ``REVIEW``, ``BLOCK``); ``records_in``: input records
    by kind (:data:`TRANSACTION`, :data:`FACE_OBSERVATION`); ``dead_letters``: by dead-letter kind;
    ``model_ms``: wall time of each model call (one per batch of decisions); ``face_wait_ms``: how long
    each transaction waited in the job for its face observation (0 when the face came first)."""

    def __init__(self, window: int = WINDOW) -> None:
        self.outcomes: Counter[str] = Counter()
        self.records_in: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.observed_only: Counter[str] = Counter()
        """Transactions that built state and were not decided, by why (``warm_up``: before ``job.decide_from``)."""
        self.late_faces: Counter[str] = Counter()
        """Checkout faces that came after their transaction was decided without one, by status (``matched``, ...):
        many mean the face deadline is shorter than the cameras need."""
        self.face_memory_evicted: Counter[str] = Counter()
        """Entries of a face join map forgotten before their time because it was full, by map
        (``decided_without_face``): their faces, if they come, are no longer matched as late faces."""
        self.model_ms = RecentWindow(window)
        self.face_wait_ms = RecentWindow(window)

    def count_records(self, total: int, transactions: int) -> None:
        """One batch of input records, ``transactions`` of them from the transactions topic."""
        if transactions:
            self.records_in[TRANSACTION] += transactions
        if total > transactions:
            self.records_in[FACE_OBSERVATION] += total - transactions

    def totals(self) -> Iterator[tuple[str, str, int]]:
        """``(family, label value, total)`` of every count: family ``decisions``, ``records_in``,
        ``dead_letters``, ``observed_only``, ``late_faces`` or ``face_memory_evicted``."""
        for family, counts in (
            ("decisions", self.outcomes),
            ("records_in", self.records_in),
            ("dead_letters", self.dead_letters),
            ("observed_only", self.observed_only),
            ("late_faces", self.late_faces),
            ("face_memory_evicted", self.face_memory_evicted),
        ):
            for value, total in counts.items():
                yield family, value, total


class Increments:
    """What the totals of a :class:`JobStats` grew by since the last call: Flink's counters take increments."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, str], int] = {}

    def since_last(self, stats: JobStats) -> list[tuple[str, str, int]]:
        """``(family, label value, increase)`` of every count that grew, and remember the new totals."""
        out = []
        sent = self.sent
        for family, value, total in stats.totals():
            key = (family, value)
            grown = total - sent.get(key, 0)
            if grown:
                out.append((family, value, grown))
                sent[key] = total
        return out
