"""Amazon Fraud Detector training CSV -> PosTransaction, and the bookkeeping of a resumable replay.

Pure functions and small classes, no Kafka: ``producers.pos replay-csv`` wires them to a producer.

Row order: rows are replayed in ``EVENT_TIMESTAMP`` order (a stable sort, so rows with equal
timestamps keep their file order; rows whose timestamp cannot be parsed sort last and are then
reported as unmappable). A row's *index* is its position in that order.

Resuming: the state file remembers the file's sha256 and the index of the last row such that it and
every row before it were acknowledged by Kafka (or skipped as unmappable). It is written only from
acknowledgements and atomically, so a replay killed at any moment restarts after that row with no
row skipped. Rows acknowledged after the last write are sent again; that is harmless because
everything downstream is idempotent by ``transaction_id``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.errors import CheckoutGuardError


class ReplayStateError(CheckoutGuardError, ValueError):
    """The state file does not belong to this CSV (content changed) or cannot be read."""


# ---------------------------------------------------------------------------- mapping


# ---------------------------------------------------------------------------- reading and ordering


# ---------------------------------------------------------------------------- resume bookkeeping


@dataclass(frozen=True)
class ReplayState:
    csv: str
    sha256: str
    total_rows: int
    last_acked_index: int
    """Index (in replay order) of the last row that, with every row before it, is acknowledged or
    skipped; -1 when none is."""
    updated_at: str


def default_state_file(stack_dir: Path, csv_path: Path) -> Path:
    return stack_dir / "replay" / f"{csv_path.stem}.state.json"


def load_state(path: Path) -> ReplayState | None:
    if not path.exists():
        return None
    try:
        return ReplayState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ReplayStateError(f"cannot read replay state {path}: {exc}") from exc


def save_state(path: Path, state: ReplayState) -> None:
    """Write tmp + fsync + rename, so a crash leaves the old state or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(asdict(state), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resume_index(state: ReplayState | None, sha256: str) -> int:
    """Replay-order index of the first row still to send."""
    if state is None:
        return 0
    if state.sha256 != sha256:
        raise ReplayStateError(
            f"the replay state is for another version of {state.csv} (sha256 {state.sha256[:12]}..., "
            f"file now {sha256[:12]}...); use --from-start to replay it from the beginning"
        )
    return state.last_acked_index + 1


class AckWatermark:
    """The contiguous prefix of settled rows. Acknowledgements arrive out of order (several
    partitions), and a row whose delivery failed never settles, so the watermark never passes it."""

    def __init__(self, start: int) -> None:
        self._next = start
        self._ahead: set[int] = set()

    @property
    def last(self) -> int:
        """Index of the last row of the settled prefix (``start - 1`` when none)."""
        return self._next - 1

    def settle(self, index: int) -> None:
        """Row ``index`` was acknowledged or skipped."""
        if index < self._next:
            return
        self._ahead.add(index)
        while self._next in self._ahead:
            self._ahead.remove(self._next)
            self._next += 1


class Checkpoint:
    """Saves the watermark to the state file, at most every ``interval_s`` (plus a final save)."""

    def __init__(
        self,
        path: Path,
        csv_name: str,
        sha256: str,
        total_rows: int,
        watermark: AckWatermark,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.watermark = watermark
        self._meta = (csv_name, sha256, total_rows)
        self._interval = interval_s
        self._clock = clock
        self._saved: int | None = None
        self._saved_at = -math.inf

    def save(self) -> None:
        last = self.watermark.last
        if last == self._saved:
            return
        csv_name, sha256, total = self._meta
        save_state(
            self.path, ReplayState(csv_name, sha256, total, last, datetime.now(UTC).isoformat(timespec="milliseconds"))
        )
        self._saved, self._saved_at = last, self._clock()

    def maybe_save(self) -> None:
        if self.watermark.last != self._saved and self._clock() - self._saved_at >= self._interval:
            self.save()
