"""The scoring core's counts and timings (:class:`jobs.scoring.stats.JobStats`) as the job's Flink metrics.

:class:`JobMetrics` is made in ``DecideStep.open`` on the operator's metric group and :meth:`JobMetrics.report`
runs after each call (a batch, a timer, a control record): a handful of calls into Flink per batch, never
per record. Everything sits under the group ``checkout_guard``; Flink's Prometheus reporter (port
``CG_METRICS__BASE_PORT`` + 0) names them ``flink_taskmanager_job_task_operator_checkout_guard_...``:

- ``..._outcome_decisions{outcome="APPROVE|REVIEW|BLOCK"}`` decisions made;
- ``..._kind_records_in{kind="transaction|face_observation"}`` input records taken;
- ``..._reason_dead_letters{reason="<dead-letter kind>"}`` records dead-lettered;
- ``..._reason_observed_only{reason="warm_up"}`` transactions before ``CG_JOB__DECIDE_FROM`` that only built state;
- ``..._status_late_faces{status="matched|no_match|no_face|unavailable"}`` checkout faces that came after their
  transaction was decided without one (a face deadline shorter than the cameras need);
- ``..._map_face_memory_evicted{map="decided_without_face"}`` transactions forgotten before a late face could
  come because the late-face memory (``CG_JOB__LATE_FACE_MEMORY_MAX``) was full;
- ``..._model_call_us_p50`` / ``_p99``: wall time of the recent model calls (one per batch), microseconds;
- ``..._face_wait_ms_p50`` / ``_p99``: how long recent transactions waited for their face (0 until one did).

(Flink counters reach Prometheus as gauges of the running total: ``rate()`` works on them all the same.)

Why the timings are percentiles computed here and *set*: in PyFlink 2.2's thread mode ``gauge(name, fn)``
registers a Java gauge that calls ``fn`` back into the embedded interpreter from whichever thread reads it
(the reporter's HTTP thread on a scrape, not the operator's), and ``distribution`` is a Java gauge holding
the last value given to ``update`` — so that is what we set, at most once per ``interval_s``. In process
mode ``distribution`` is a Beam distribution the Prometheus reporter cannot show (not a number) while
``gauge`` is read by the Python worker itself at each bundle, so there a plain gauge holds the value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from jobs.scoring.stats import FACE_OBSERVATION, TRANSACTION, Increments, JobStats, RecentWindow
from schemas.records import OUTCOME_WORDS

GROUP = "checkout_guard"
LABELS = {
    "decisions": "outcome",
    "records_in": "kind",
    "dead_letters": "reason",
    "observed_only": "reason",
    "late_faces": "status",
    "face_memory_evicted": "map",
}
"""Counter family -> the label (Flink key group) that tells its values apart."""
KNOWN = {"decisions": tuple(OUTCOME_WORDS), "records_in": (TRANSACTION, FACE_OBSERVATION)}
"""Label values registered at start, so their series exist (at 0) before the first record."""
TIMINGS = (("model_call_us", 1000.0), ("face_wait_ms", 1.0))
"""Gauge name prefix and its scale from the window's milliseconds."""
QUANTILES = (50, 99)


class SetGauge:
    """A gauge of a whole number set from the operator's thread (see the module doc for the two modes)."""

    def __init__(self, group: Any, name: str, thread_mode: bool) -> None:
        self.value = 0
        if thread_mode:
            self._java = group.distribution(name)  # a Java-side gauge of the last update: nothing calls back
        else:
            self._java = None
            group.gauge(name, lambda: self.value)

    def set(self, value: int) -> None:
        self.value = value
        if self._java is not None:
            self._java.update(value)


class JobMetrics:
    """Pushes a :class:`JobStats`' increase to Flink counters and its recent percentiles to gauges."""

    def __init__(
        self,
        group: Any,
        thread_mode: bool = True,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = group.add_group(GROUP)
        self.increments = Increments()
        self.counters: dict[tuple[str, str], Any] = {}
        for family, values in KNOWN.items():
            for value in values:
                self._counter(family, value)
        self.gauges = {
            f"{prefix}_p{q}": SetGauge(self.root, f"{prefix}_p{q}", thread_mode)
            for prefix, _ in TIMINGS
            for q in QUANTILES
        }
        self.interval_s, self.clock = interval_s, clock
        self.next_at = float("-inf")
        self.seen: dict[str, int] = {prefix: 0 for prefix, _ in TIMINGS}
        """How many samples of each timing the gauges were last computed from (``RecentWindow.added``)."""

    def _counter(self, family: str, value: str) -> Any:
        counter = self.counters.get((family, value))
        if counter is None:
            counter = self.counters[(family, value)] = self.root.add_group(LABELS[family], value).counter(family)
        return counter

    def report(self, stats: JobStats) -> None:
        """After each call: counters by their increase; the percentiles when new samples came and the
        last computation is ``interval_s`` old (sorting the window is the one non-trivial cost, so samples
        of the last interval before the job goes idle show at its next call)."""
        for family, value, grown in self.increments.since_last(stats):
            self._counter(family, value).inc(grown)
        now = self.clock()
        if now < self.next_at:
            return
        windows = (stats.model_ms, stats.face_wait_ms)
        done = [self._set_percentiles(prefix, scale, w) for (prefix, scale), w in zip(TIMINGS, windows, strict=True)]
        if any(done):
            self.next_at = now + self.interval_s

    def _set_percentiles(self, prefix: str, scale: float, window: RecentWindow) -> bool:
        """Set the gauges of one timing if it has new samples; whether it had."""
        if window.added == self.seen[prefix]:
            return False
        self.seen[prefix] = window.added
        values = window.percentiles(*QUANTILES)
        if values is None:
            return False
        for q, value in zip(QUANTILES, values, strict=True):
            self.gauges[f"{prefix}_p{q}"].set(round(value * scale))
        return True
