"""Model drift: how far each event-time hour of the model's inputs and scores is from its training data.

The figure is the **population stability index** (PSI) of a distribution binned as in training:
``PSI = sum over bins of (a - e) * ln(a / e)``, with ``e`` the training proportion of a bin and ``a``
the hour's. The usual reading: **< 0.1** stable, **0.1-0.25** a moderate shift worth a look, **> 0.25**
a significant shift (the model now sees data unlike what it learnt from; its scores, and the
false-positive rates the 0-1000 calibration promises, no longer hold). For small differences PSI is
about chi-square / rows, so an hour of ``n`` rows and ``k`` bins shows ~``(k - 1) / n`` from sampling
alone: hours below a minimum of rows never alert.

Pieces, pure numpy (the job wires them; no Kafka, no Flink):

* :func:`reference_profile` — at training time, per feature: bin edges at the training rows'
  quantiles (numeric) or the most frequent codes (categorical, plus "other"), missing values (NaN)
  in a bin of their own, and the expected proportion of every bin; the same for the 0-1000 score.
  JSON-able: ``train`` stores it in the artifact's ``model.json``.
* :class:`DriftMonitor` — in the scoring job: bins every scored batch into counters of its event-time
  hour (vectorised: one comparison per bin edge across all columns, one ``bincount`` per batch), closes
  an hour once the event time has moved past it, and returns one ``ModelDrift`` report per closed hour.
* :class:`DriftEpisodes` — which figures are past the setting since when: one alert per crossing (an
  episode), not one per hour it lasts, and an optional reminder.
* :func:`drift_alert` — the ``MODEL_DRIFT`` alert of a report whose PSI crossed the setting.

Features that are functions of the event time itself (:data:`TIME_FEATURES`: hour of day, weekday)
are left out: within one hour they are constant, so their hourly PSI is large by construction.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from infra.clock import now_ms as wall_now_ms
from schemas.records import ALL_STORES, AlertAvro, ModelDriftAvro

ModelDriftRecord = ModelDriftAvro
"""A drift report as the dict the ``ModelDrift`` codec writes (topic ``model_drift``, key ``report_id``)."""

HOUR_MS = 3_600_000
PROFILE_VERSION = 1
SCORE = "score"
"""The name the score goes by in a report's reasons and an alert's summary."""
TIME_FEATURES: tuple[str, ...] = ("hour_utc", "day_of_week", "hour", "hour_local", "weekday")
"""Features left out of a profile by default: constant within an hour, so hourly PSI means nothing."""
MISSING, OTHER = 0, 1
"""Bin 0 of every column holds missing values (NaN); bin 1 of a categorical one its rare codes."""

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+-]")


# --------------------------------------------------------------------------------------------------
# PSI and the training reference


def psi(expected: Sequence[float] | np.ndarray, actual_counts: Sequence[int] | np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of observed bin counts against the expected bin proportions.

    ``sum((a - e) * ln(a / e))`` with ``a`` the observed proportions; both sides are floored at ``eps``
    so an empty bin on either side gives a large but finite term. 0 for identical distributions and
    for no observations; < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant.
    """
    e = np.asarray(expected, dtype=np.float64)
    counts = np.asarray(actual_counts, dtype=np.float64)
    if e.shape != counts.shape:
        raise ValueError(f"expected {e.shape[0]} bins, got {counts.shape[0]} counts")
    total = counts.sum()
    if total <= 0:
        return 0.0
    a = np.maximum(counts / total, eps)
    e = np.maximum(e, eps)
    return float(np.sum((a - e) * np.log(a / e)))


def _proportions(counts: np.ndarray, rows: int) -> list[float]:
    return [float(c) / rows for c in counts] if rows else [0.0] * len(counts)


def _numeric_column(values: np.ndarray, bins: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.quantile(finite, quantiles)) if finite.size else np.empty(0)
    edges = _split_point_masses(finite, edges, bins)
    column: dict[str, Any] = {"kind": "numeric", "edges": [float(v) for v in edges]}
    counts = np.bincount(_bin_numeric(values, edges), minlength=len(edges) + 2)
    column["expected"] = _proportions(counts, len(values))
    return column


def _split_point_masses(finite: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """``edges`` with a bin of its own for each edge value that holds at least one bin's share of the rows.

    A bin runs from its edge up to the next one (``edges[k] <= v < edges[k + 1]``), so a value repeated on many
    rows -- the 0 of a 0/1 indicator that is mostly 0, or of one never set in training -- took every quantile,
    and one bin held it with everything above it: ``return_without_receipt`` going from 1 % to 40 % of an hour
    moved no bin, and its PSI stayed 0. A second edge just above such a value (the next float) puts what lies
    above it, up to the next edge, in a bin of its own: above the last edge that bin holds the values past the
    training rows' (empty in training); below another edge it is added only where training rows lie there."""
    extra = []
    for k, edge in enumerate(edges):
        if np.count_nonzero(finite == edge) * bins < finite.size:
            continue  # an ordinary quantile: its bin holds a range of values
        above = float(np.nextafter(edge, math.inf))
        last = k + 1 == len(edges)
        if not math.isfinite(above) or not (last or np.any((finite > edge) & (finite < edges[k + 1]))):
            continue
        extra.append(above)
    return np.unique(np.concatenate([edges, extra])) if extra else edges


def _categorical_column(values: np.ndarray, bins: int) -> dict[str, Any]:
    present = values[~np.isnan(values)]
    codes, counts = np.unique(present, return_counts=True)
    top = np.sort(codes[np.lexsort((codes, -counts))][:bins])  # most frequent first, ties by code
    column: dict[str, Any] = {"kind": "categorical", "values": [float(v) for v in top]}
    binned = np.bincount(_bin_categorical(values, top), minlength=len(top) + 2)
    column["expected"] = _proportions(binned, len(values))
    return column


def _bin_numeric(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: 0 = NaN, then 1 + the interval of ``edges`` (``v < edges[0]`` is 1)."""
    idx = np.searchsorted(edges, values, side="right") + 1
    idx[np.isnan(values)] = MISSING
    return idx


def _bin_categorical(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Bin of each value: 0 = NaN, 1 = a code not among ``codes`` (sorted), 2 + its position otherwise."""
    if codes.size == 0:
        return np.where(np.isnan(values), MISSING, OTHER)
    pos = np.minimum(np.searchsorted(codes, values), codes.size - 1)
    idx = np.where(codes[pos] == values, pos + 2, OTHER)
    idx[np.isnan(values)] = MISSING
    return idx


def reference_profile(
    feature_names: Sequence[str],
    x: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    bins: int = 10,
    *,
    categorical: Sequence[str] = (),
    skip: Sequence[str] = TIME_FEATURES,
) -> dict[str, Any]:
    """The training data's distributions, for :class:`DriftMonitor` (JSON-able, for ``model.json``).

    ``x`` holds the training rows in ``feature_names`` order and ``scores`` their 0-1000 scores (best
    out-of-fold ones: a boosted model's scores on its own training rows are sharper than on new data).
    A numeric feature gets up to ``bins`` quantile bins (fewer where values repeat); one named in
    ``categorical`` (hashed codes) gets its ``bins`` most frequent codes plus "other"; both get a bin
    for NaN. Features named in ``skip`` are left out.
    """
    x = np.asarray(x, dtype=np.float64)
    names = list(feature_names)
    if x.ndim != 2 or x.shape[1] != len(names):
        raise ValueError(f"x must be rows x {len(names)} features, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("a reference profile needs training rows")
    if bins < 1:
        raise ValueError("bins must be >= 1")
    score_values = np.asarray(scores, dtype=np.float64)
    if score_values.shape != (x.shape[0],):
        raise ValueError(f"one score per row: {x.shape[0]} rows, {score_values.shape} scores")
    cats, skipped = set(categorical), set(skip)
    features: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        if name in skipped:
            continue
        column = _categorical_column(x[:, j], bins) if name in cats else _numeric_column(x[:, j], bins)
        features[name] = column
    return {
        "version": PROFILE_VERSION,
        "bins": bins,
        "rows": int(x.shape[0]),
        "feature_names": names,
        "features": features,
        SCORE: _numeric_column(score_values, bins),
    }


# --------------------------------------------------------------------------------------------------
# The monitor


class _Hour:
    """Counters of one open event-time hour: every column's bins side by side, then the score's."""

    __slots__ = ("counts", "rows", "start")

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.rows = 0
        self.counts = np.zeros(size, dtype=np.int64)


class _Column:
    __slots__ = ("categorical", "cuts", "expected", "index", "name", "offset", "size")

    def __init__(self, name: str, index: int, spec: dict[str, Any], offset: int) -> None:
        self.name, self.index, self.offset = name, index, offset
        self.categorical = spec.get("kind") == "categorical"
        self.cuts = np.asarray(spec["values"] if self.categorical else spec["edges"], dtype=np.float64)
        self.expected = np.asarray(spec["expected"], dtype=np.float64)
        self.size = len(self.cuts) + 2
        if self.cuts.ndim != 1 or self.expected.ndim != 1 or len(self.expected) != self.size:
            raise ValueError(f"reference of {name}: {len(self.expected)} proportions for {self.size} bins")
        # a NaN would win every max() and hide a real alert; a negative or zero-sum one would raise a false one
        if not np.isfinite(self.cuts).all() or (np.diff(self.cuts) <= 0).any():
            raise ValueError(f"reference of {name}: bin edges (codes) must be finite and rising")
        if not (np.isfinite(self.expected).all() and (self.expected >= 0).all()):
            raise ValueError(f"reference of {name}: a proportion is negative or not finite")
        if abs(float(self.expected.sum()) - 1.0) > 1e-6:
            raise ValueError(f"reference of {name}: proportions sum to {self.expected.sum():.6g}, not 1")


class _Binner:
    """Bins of every column of a batch at once: one comparison per edge (or code) across all numeric
    (categorical) columns, instead of a ``searchsorted`` per strided column (3x slower on ~250-row batches).

    Numeric: ``1 + #(edges <= v)`` (``searchsorted(side="right")``), edges padded with +inf; categorical:
    ``2 +`` the position of the matching code, else 1, codes padded with NaN (equal to nothing); NaN: 0.
    Each bin comes out shifted by its column's offset in the hour's counters."""

    def __init__(self, columns: Sequence[_Column]) -> None:
        numeric = [c for c in columns if not c.categorical]
        categorical = [c for c in columns if c.categorical]
        self.num_index = np.array([c.index for c in numeric], dtype=np.intp)
        self.num_edges = self._padded([c.cuts for c in numeric], math.inf)
        self.num_top = np.array([len(c.cuts) for c in numeric], dtype=np.int64)
        self.num_offset = np.array([c.offset + 1 for c in numeric], dtype=np.int64)
        self.cat_index = np.array([c.index for c in categorical], dtype=np.intp)
        self.cat_codes = self._padded([c.cuts for c in categorical], math.nan)
        self.cat_offset = np.array([c.offset for c in categorical], dtype=np.int64)

    @staticmethod
    def _padded(rows: list[np.ndarray], fill: float) -> np.ndarray:
        """One row per column, one column per edge/code position: ``edges[k]`` of every column at once."""
        width = max((len(r) for r in rows), default=0)
        out = np.full((width, len(rows)), fill)
        for j, r in enumerate(rows):
            out[: len(r), j] = r
        return out

    def bins(self, x: np.ndarray) -> list[np.ndarray]:
        parts = []
        if self.num_index.size:
            values = x[:, self.num_index]
            above = np.count_nonzero(values >= self.num_edges[:, None, :], axis=0)
            idx = np.minimum(above, self.num_top) + self.num_offset  # +inf also passes the padding
            np.putmask(idx, np.isnan(values), self.num_offset - 1)
            parts.append(idx)
        if self.cat_index.size:
            values = x[:, self.cat_index]
            idx = np.full(values.shape, OTHER, dtype=np.int64)
            for k, codes in enumerate(self.cat_codes):
                np.putmask(idx, values == codes, k + 2)
            idx[np.isnan(values)] = MISSING
            parts.append(idx + self.cat_offset)
        return parts


@dataclass(frozen=True, slots=True)
class HourTally:
    """One batch's drift counters, by event-time hour (index ``event_time // 1 h``): ``(counts, rows)``,
    the counts laid out as the monitor's (every column's bins side by side, then the score's)."""

    model_version: str
    newest_ms: int
    """The batch's newest event time: moves the merging monitor's watermark."""
    hours: dict[int, tuple[np.ndarray, int]]


class DriftMonitor:
    """Hourly feature and score distributions of the scored transactions, and their PSI reports.

    Each row counts in the hour of its event time (``floor(event_time / 1 h)``). An hour is closed, and
    its report returned, once the newest event time seen is ``grace_ms`` past its end (0: as soon as a
    row of a later hour arrives); so at most two hours are open. A row for an hour already closed is
    not counted in any distribution: it is added to the ``late_rows`` of the next report.

    Not thread-safe; one per scoring operator. Parallel scoring subtasks each see only their keys: there,
    each slot :meth:`tally`-s its batches and one monitor :meth:`merge`-s the tallies and reports.
    """

    def __init__(
        self,
        reference: dict[str, Any],
        model_version: str,
        *,
        psi_alert: float,
        min_rows: int,
        grace_ms: int = 0,
        now_ms: Callable[[], int] = wall_now_ms,
    ) -> None:
        if not 0 <= grace_ms < HOUR_MS:
            raise ValueError("grace_ms must be at least 0 and under an hour")
        self.model_version = model_version
        self.psi_alert, self.min_rows, self.grace_ms = psi_alert, min_rows, grace_ms
        self._now_ms = now_ms
        try:
            self.reference_rows = int(reference.get("rows", 0))
            names = list(reference.get("feature_names") or reference["features"])
            position = {name: j for j, name in enumerate(names)}
            self.width = len(names)
            self._columns: list[_Column] = []
            offset = 0
            for name, spec in reference["features"].items():
                column = _Column(name, position[name], spec, offset)
                self._columns.append(column)
                offset += column.size
            self._score = _Column(SCORE, -1, reference[SCORE], offset)
        # a damaged model.json: no monitor for that model, and the caller says why
        except (AttributeError, KeyError, OverflowError, TypeError) as exc:
            raise ValueError(f"damaged drift reference of model {model_version}: {exc!r}") from exc
        self._size = offset + self._score.size
        self._binner = _Binner(self._columns)
        self._open: dict[int, _Hour] = {}
        self._watermark: int | None = None
        """Newest event time seen less the grace: every hour ending at or before it is closed."""
        self._late = 0

    @property
    def open_hours(self) -> list[int]:
        """Start (epoch ms) of each open hour, oldest first."""
        return sorted(h * HOUR_MS for h in self._open)

    def observe(
        self, event_times_ms: Sequence[int] | np.ndarray, x: np.ndarray, scores: Sequence[int | None] | np.ndarray
    ) -> list[ModelDriftRecord]:
        """Count a scored batch (rows of ``x`` in the reference's feature order, ``None`` = no score);
        the reports of the hours it closes, oldest first."""
        tally = self.tally(event_times_ms, x, scores)
        return self.merge(tally) if tally is not None else []

    def tally(
        self, event_times_ms: Sequence[int] | np.ndarray, x: np.ndarray, scores: Sequence[int | None] | np.ndarray
    ) -> HourTally | None:
        """A batch's counters by event-time hour, leaving the open hours alone (None for no rows): what a
        slot of the parallel job sends to the one monitor that reports (:meth:`merge`)."""
        times = np.asarray(event_times_ms, dtype=np.int64)
        n = times.shape[0]
        if n == 0:
            return None
        x = np.asarray(x, dtype=np.float64)
        score_values = np.asarray(scores, dtype=np.float64)
        if x.shape != (n, self.width) or score_values.shape != (n,):
            raise ValueError(f"{n} event times need {n} x {self.width} features and {n} scores")
        hours = times // HOUR_MS
        score_bins = _bin_numeric(score_values, self._score.cuts) + self._score.offset
        bins = np.column_stack([*self._binner.bins(x), score_bins])
        first, last = int(hours.min()), int(hours.max())
        if first == last:  # the usual batch: one hour
            counted = {first: (np.bincount(bins.ravel(), minlength=self._size), n)}
        else:
            distinct, slot = np.unique(hours, return_inverse=True)
            flat = (slot.reshape(-1, 1) * self._size + bins).ravel()
            per_hour = np.bincount(flat, minlength=len(distinct) * self._size).reshape(len(distinct), self._size)
            rows = np.bincount(slot, minlength=len(distinct))
            counted = {int(h): (per_hour[k], int(rows[k])) for k, h in enumerate(distinct.tolist())}
        return HourTally(self.model_version, int(times.max()), counted)

    def merge(self, tally: HourTally, time_ms: int | None = None) -> list[ModelDriftRecord]:
        """Add a tally (this monitor's own, or a parallel slot's); the reports of the hours then closed.
        An hour already closed gets no counts: its rows go to the next report's ``late_rows``. Time moves
        to ``time_ms`` (the parallel job's watermark: every slot's rows up to it are in) or, without it,
        to the tally's newest event."""
        if tally.model_version != self.model_version:
            raise ValueError(f"a tally of model {tally.model_version} for the monitor of {self.model_version}")
        counted = False
        for hour, (counts, rows) in tally.hours.items():
            if self._watermark is not None and (hour + 1) * HOUR_MS <= self._watermark:
                self._late += rows
                continue
            opened = self._hour(hour)
            opened.counts += counts
            opened.rows += rows
            counted = True
        if time_ms is not None:
            return self.close_until(time_ms)
        return self.close_until(tally.newest_ms) if counted else []

    @property
    def watermark(self) -> int | None:
        """Every hour ending at or before it is closed (reported, or never opened)."""
        return self._watermark

    def resume(self, watermark_ms: int) -> None:
        """Hours ending at or before ``watermark_ms`` were reported by an earlier monitor of this version."""
        self._watermark = watermark_ms if self._watermark is None else max(self._watermark, watermark_ms)

    def close_until(self, newest_ms: int) -> list[ModelDriftRecord]:
        """Close the hours that an event at ``newest_ms`` closes (another monitor's traffic moved time on:
        after a promotion, no more tallies of this model's version come to close them)."""
        newest = newest_ms - self.grace_ms
        watermark = self._watermark = newest if self._watermark is None else max(self._watermark, newest)
        return self._close(lambda hour: (hour + 1) * HOUR_MS <= watermark)

    def flush(self) -> list[ModelDriftRecord]:
        """Close every open hour (shutdown, tests); later rows for them count as late."""
        if self._open:
            last_end = (max(self._open) + 1) * HOUR_MS
            self._watermark = last_end if self._watermark is None else max(self._watermark, last_end)
        return self._close(lambda hour: True)

    def _hour(self, hour: int) -> _Hour:
        opened = self._open.get(hour)
        if opened is None:
            opened = self._open[hour] = _Hour(hour * HOUR_MS, self._size)
        return opened

    def _close(self, due: Callable[[int], bool]) -> list[ModelDriftRecord]:
        reports = []
        for hour in sorted(self._open):
            if due(hour):
                reports.append(self._report(self._open.pop(hour)))
        return reports

    def _report(self, hour: _Hour) -> ModelDriftRecord:
        counts = hour.counts
        feature_psi = {c.name: round(psi(c.expected, counts[c.offset : c.offset + c.size]), 6) for c in self._columns}
        score_psi = round(psi(self._score.expected, counts[self._score.offset :]), 6)
        worst = max(feature_psi, key=lambda name: feature_psi[name], default=None)
        worst_psi = feature_psi[worst] if worst is not None else 0.0
        late, self._late = self._late, 0
        return {
            "report_id": drift_id(self.model_version, hour.start),
            "model_version": self.model_version,
            "hour_start": hour.start,
            "rows": hour.rows,
            "late_rows": late,
            "score_psi": score_psi,
            "feature_psi": feature_psi,
            "worst_feature": worst,
            "worst_psi": worst_psi,
            "alert": hour.rows >= self.min_rows and max(score_psi, worst_psi) >= self.psi_alert,
            "reference_rows": self.reference_rows,
            "created_at": self._now_ms(),
        }


def drift_id(model_version: str, hour_start: int) -> str:
    """``drift:<model_version>:<hour_start ms>``: the report's key and its alert's id (a valid id, at most
    128 characters, the same for the same hour however often it is made)."""
    return f"drift:{_ID_UNSAFE.sub('_', model_version)[:100]}:{hour_start}"


class RetiredVersions:
    """Versions whose monitor went (a promotion, an eviction), with the time up to which their hours are
    reported: a rollback's new monitor of that version resumes there, so an hour is never reported twice
    (one ``drift:<version>:<hour>`` id, one report; a second would overwrite the first downstream)."""

    LIMIT = 64

    def __init__(self) -> None:
        self.until: dict[str, int] = {}

    def retire(self, version: str, monitor: DriftMonitor) -> None:
        if monitor.watermark is not None:
            self.until[version] = monitor.watermark
            while len(self.until) > self.LIMIT:
                del self.until[next(iter(self.until))]

    def revive(self, version: str, monitor: DriftMonitor | None) -> DriftMonitor | None:
        """``monitor`` (new, of ``version``) with the hours its predecessor reported closed: later rows are late."""
        until = self.until.pop(version, None)
        if monitor is not None and until is not None:
            monitor.resume(until)
        return monitor


IDLE_WITHOUT_REMINDERS_MS = 24 * HOUR_MS
"""How long :class:`DriftMerge` keeps a silent version's open drift episodes when reminders are off."""


def idle_after_ms(remind_ms: int) -> int:
    """Event time without a tally of a model version after which the partitioned layout's drift step removes its open
    episodes: the reminder interval (``CG_MODEL__DRIFT_REMIND_HOURS``). A figure's last alert is no later than its
    version's last tally, so once it has been silent that long, a rollback's drift still past the setting is due its
    reminder anyway: alerted as a new crossing instead, no alert is added or lost. Without reminders (0),
    :data:`IDLE_WITHOUT_REMINDERS_MS`, so that the state stays bounded (a rollback after it alerts once more).
    A fixed day before, whatever the reminder: with reminders every 72 h a rollback after a day alerted 2 days early."""
    return remind_ms if remind_ms > 0 else IDLE_WITHOUT_REMINDERS_MS


class DriftMerge:
    """The partitioned layout's model-drift reports. Each decide slot sees only its receipts, so each
    tallies its decisions per event-time hour (:meth:`DriftMonitor.tally`) and the tallies
    meet here, in one subtask: an hour gets one report of all its rows, as in the single layout (whose id,
    ``drift:<version>:<hour>``, then names one thing). Hours close by the job's watermark (every slot's
    tallies up to it have arrived) less the grace, so a slot running ahead of another makes nothing late.
    A monitor per model version: a promotion reaches the slots at slightly different moments.

    The merge does not know the roles (only a slot's champion tallies), so a version's open drift episodes go once
    no tally of it came for :attr:`idle_ms` of event time (as the other versions' tallies tell it) and its hours are
    reported: a retired version's stayed in the step's state for ever. The clock is the tallies' event time, not the
    watermark, which jumps to the end of time when a bounded replay ends; episodes restored from a checkpoint count
    from the first tally after the restart. A version kept as challenger that long and then rolled back alerts a
    drift still under way once more, as the reminder due by then would (:func:`idle_after_ms`)."""

    MAX_VERSIONS = 4
    """Monitors kept beyond those with open hours: the least recently used idle ones go first."""

    def __init__(self, monitor_of: Callable[[str], DriftMonitor | None], episodes: DriftEpisodes) -> None:
        self.idle_ms = idle_after_ms(episodes.remind_ms)
        """Event time without a tally of a version after which its open drift episodes are removed."""
        self.episodes = episodes
        """Which figures are past the setting: one alert per crossing (the drift step keeps them in Flink state)."""
        self.monitor_of = monitor_of
        """A version's :class:`jobs.model.drift.DriftMonitor` (None: that model has no reference)."""
        self.monitors: dict[str, DriftMonitor | None] = {}
        """By version, the most recently used last."""
        self.retired = RetiredVersions()
        self.last_tally: dict[str, int] = {}
        """By version, the newest event time of its tallies (in memory; a restored episode's clock starts anew)."""

    def on_tallies(
        self, tallies: Iterable[HourTally], watermark_ms: int
    ) -> list[tuple[ModelDriftRecord, AlertAvro | None]]:
        """Count the tallies; the reports (with their alerts) of the hours that close by ``watermark_ms``."""
        reports: list[ModelDriftRecord] = []
        for tally in tallies:
            version = tally.model_version
            monitor = self.monitors.pop(version) if version in self.monitors else self._monitor(version)
            self.monitors[version] = monitor
            self.last_tally[version] = max(self.last_tally.get(version, tally.newest_ms), tally.newest_ms)
            if monitor is not None:
                reports += monitor.merge(tally, watermark_ms)
        reports += self._close(watermark_ms)
        self._evict()
        alerted = self._alerted(reports)
        self._forget_idle()
        return alerted

    def _forget_idle(self) -> None:
        """Remove the episodes (a change to ``None``, for state) of the versions without a tally for
        :attr:`idle_ms` whose hours are all reported; after the reports, so their last hours still count."""
        if not self.last_tally:
            return
        now = max(self.last_tally.values())
        for version in self.episodes.open:
            self.last_tally.setdefault(version, now)  # restored from a checkpoint: counts from here
        idle = set()
        for version, last in list(self.last_tally.items()):
            monitor = self.monitors.get(version)
            if now - last >= self.idle_ms and (monitor is None or not monitor.open_hours):
                idle.add(version)
                del self.last_tally[version]
        if idle:
            self.episodes.keep_only(set(self.episodes.open) - idle)

    def _monitor(self, version: str) -> DriftMonitor | None:
        return self.retired.revive(version, self.monitor_of(version))

    def _evict(self) -> None:
        for version in list(self.monitors):
            if len(self.monitors) <= self.MAX_VERSIONS:
                return
            monitor = self.monitors[version]
            if monitor is None or not monitor.open_hours:
                del self.monitors[version]
                if monitor is not None:
                    self.retired.retire(version, monitor)

    def on_watermark(self, watermark_ms: int) -> list[tuple[ModelDriftRecord, AlertAvro | None]]:
        """The reports of the hours that close by ``watermark_ms`` (a timer at :meth:`due`)."""
        return self._alerted(self._close(watermark_ms))

    def due(self) -> list[int]:
        """When the open hours close: each one's end plus the grace (event time, for timers)."""
        return sorted({h + HOUR_MS + m.grace_ms for m in self.monitors.values() if m is not None for h in m.open_hours})

    def _close(self, watermark_ms: int) -> list[ModelDriftRecord]:
        """Every version's hours (another version's too: after a promotion no tally of it comes to close them)."""
        return [r for m in self.monitors.values() if m is not None for r in m.close_until(watermark_ms)]

    def _alerted(self, reports: list[ModelDriftRecord]) -> list[tuple[ModelDriftRecord, AlertAvro | None]]:
        reports.sort(key=lambda r: r["hour_start"])
        return with_alerts(reports, self.episodes)


# --------------------------------------------------------------------------------------------------
# The alert


def drifting(report: ModelDriftRecord, threshold: float, limit: int | None = 5) -> list[tuple[str, float]]:
    """``(name, PSI)`` of the score and the features at or above ``threshold``, highest first."""
    found = [(name, value) for name, value in report["feature_psi"].items() if value >= threshold]
    if report["score_psi"] >= threshold:
        found.append((SCORE, report["score_psi"]))
    found.sort(key=lambda item: (-item[1], item[0]))
    return found[:limit]


EpisodeEntry = dict[str, list[int]]
"""A model version's open episodes: figure (``score`` or a feature) -> ``[first hour past, last alerted hour]``
(hour starts, epoch ms). What the job keeps in Flink state, one entry per version."""


class DriftEpisodes:
    """Which figures of each model version are past the setting, since which hour: the alert goes out when a
    figure crosses it (an episode starts), not every hour it stays above (a drift of days alerted hourly).

    A figure's episode ends with the first hour of at least ``min_rows`` rows where it is below the setting; it
    crossing again starts a new one. An hour of fewer rows says nothing, so it neither alerts nor ends one.
    ``remind_ms`` (0: never): an alert again for a figure still past the setting that long after its last one.
    The job keeps the episodes in Flink state (:meth:`restore`, :meth:`drain_changes`), checkpointed with the
    offsets, so a restart neither forgets an open episode (and alerts it again) nor loses a crossing."""

    def __init__(self, psi_alert: float, min_rows: int = 1, remind_ms: int = 0) -> None:
        self.psi_alert, self.min_rows, self.remind_ms = psi_alert, min_rows, remind_ms
        self.open: dict[str, EpisodeEntry] = {}
        self._changed: dict[str, EpisodeEntry | None] = {}

    def restore(self, entries: dict[str, Any]) -> None:
        """The episodes a checkpoint kept (by model version); an unreadable entry is left out (logged by no one:
        at worst a drift still past the setting alerts once more)."""
        self.open = {}
        for version, entry in entries.items():
            try:
                self.open[version] = {str(name): [int(start), int(last)] for name, (start, last) in entry.items()}
            except (AttributeError, TypeError, ValueError):
                continue

    def drain_changes(self) -> dict[str, EpisodeEntry | None]:
        """The versions whose episodes changed since the last call (``None``: none open any more), for state."""
        changed, self._changed = self._changed, {}
        return changed

    def keep_only(self, versions: Collection[str]) -> None:
        """Forget the episodes of every version not in ``versions`` (the champion and challenger: the versions that
        may report again, a rollback's too), each a change to ``None``, so the checkpoint forgets it as well: a
        retired version's open episodes stayed in state for ever."""
        for version in [v for v in self.open if v not in versions]:
            del self.open[version]
            self._changed[version] = None

    def alert(self, report: ModelDriftRecord) -> AlertAvro | None:
        """The report's alert: where a figure crossed the setting (or is due a reminder), else None."""
        if report["rows"] < self.min_rows:
            return None
        version, hour = report["model_version"], report["hour_start"]
        before = self.open.get(version, {})
        above = {name for name, _ in drifting(report, self.psi_alert, limit=None)}
        now = {name: list(before.get(name, [hour, hour])) for name in above}
        started = sorted(above - before.keys())
        reminded = [
            name for name in sorted(above & before.keys()) if self.remind_ms and hour - now[name][1] >= self.remind_ms
        ]
        for name in reminded:
            now[name][1] = hour
        if now != before:
            self._changed[version] = now or None
            if now:
                self.open[version] = now
            else:
                self.open.pop(version, None)
        if not started and not reminded:
            return None
        since = min(now[name][0] for name in reminded) if reminded and not started else None
        return drift_alert(report, self.psi_alert, since=since)


def with_alerts(
    reports: Iterable[ModelDriftRecord], episodes: DriftEpisodes
) -> list[tuple[ModelDriftRecord, AlertAvro | None]]:
    """Each report with its alert where a figure crossed the setting (an episode starts) or is due a
    reminder, else None (also while it stays above: see :class:`DriftEpisodes`)."""
    out: list[tuple[ModelDriftRecord, AlertAvro | None]] = []
    for report in reports:
        alert = episodes.alert(report)  # also for a report below the setting: it ends episodes
        out.append((report, alert if report["alert"] else None))
    return out


def drift_alert(report: ModelDriftRecord, psi_alert: float = 0.25, *, since: int | None = None) -> AlertAvro:
    """The ``MODEL_DRIFT`` alert of a report (``alert`` true): id ``drift:<model_version>:<hour_start>``,
    severity ``warning``, store ``all`` (:data:`~schemas.records.ALL_STORES`), event time the hour's start; its
    reasons are the names (``score`` and features) whose PSI reached ``psi_alert`` (the setting), highest first, and
    its summary gives the score's PSI and the worst features'. ``since``: a reminder, of a drift past the setting
    since that hour."""
    names = drifting(report, psi_alert) or drifting(report, 0.0, limit=3)
    features = [(name, value) for name, value in names if name != SCORE]
    if not features and report["worst_feature"] is not None:
        features = [(report["worst_feature"], report["worst_psi"])]
    worst = ", ".join(f"{name} {value:.2f}" for name, value in features) or "none"
    hour = _hour_text(report["hour_start"])
    return {
        "alert_id": drift_id(report["model_version"], report["hour_start"]),
        "kind": "MODEL_DRIFT",
        "severity": "warning",
        "event_time": report["hour_start"],
        "store_id": ALL_STORES,
        "lane_id": None,
        "transaction_id": None,
        "amount": None,
        "currency": None,
        "outcome": None,
        "risk_score": None,
        "reasons": [name for name, _ in names],
        "subject_id": None,
        "category": None,
        "similarity": None,
        "snapshot_ref": None,
        "transaction_kind": None,
        "matcher": None,
        "match_threshold": None,
        "observation_id": None,
        "summary": (
            f"Fraud model {report['model_version']} drifts from its training data in the hour from {hour} "
            f"({report['rows']} transactions): score PSI {report['score_psi']:.2f}; worst features {worst} "
            f"(this alert's threshold: PSI {psi_alert:g})"
            + (f"; a reminder: past the threshold since {_hour_text(since)}" if since is not None else "")
        ),
    }


def _hour_text(hour_start: int) -> str:
    return datetime.fromtimestamp(hour_start / 1000, tz=UTC).strftime("%Y-%m-%d %H:00 UTC")


# --------------------------------------------------------------------------------------------------
# Micro-benchmark (``make bench`` calls it)


def bench_observe(rows: int = 100_000, batch: int = 250, features: int = 40, seed: int = 0) -> float:
    """Rows per second :meth:`DriftMonitor.observe` takes in batches of ``batch`` rows of ``features``
    columns (a quarter of them categorical, 5 % NaN), event times 0.1 s apart (so it closes hours too)."""
    rng = np.random.default_rng(seed)
    names = [f"f{j}" for j in range(features)]
    categorical = names[: features // 4]

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, features))
        x[:, : features // 4] = rng.integers(0, 50, size=(n, features // 4))
        x[rng.random(size=x.shape) < 0.05] = math.nan
        return x, rng.integers(0, 1001, size=n).astype(np.float64)

    reference = reference_profile(names, *sample(20_000), categorical=categorical)
    monitor = DriftMonitor(reference, "bench", psi_alert=0.25, min_rows=200, now_ms=lambda: 0)
    x, scores = sample(rows)
    times = 1_700_000_000_000 + np.arange(rows, dtype=np.int64) * 100
    batches = [(times[i : i + batch], x[i : i + batch], scores[i : i + batch]) for i in range(0, rows, batch)]
    start = time.perf_counter()
    for t, xb, sb in batches:
        monitor.observe(t, xb, sb)
    monitor.flush()
    return rows / (time.perf_counter() - start)


def _bench_main() -> None:
    """Measure DriftMonitor.observe on synthetic rows and print rows per second."""
    print(f"DriftMonitor.observe: {bench_observe():,.0f} rows/s")


if __name__ == "__main__":
    import typer

    typer.run(_bench_main)
