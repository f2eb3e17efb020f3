"""Amazon Fraud Detector training CSV -> PosTransaction, and the bookkeeping of a resumable replay.

Pure functions and small classes, no Kafka: ``producers.pos replay-csv`` wires them to a producer.

Bad rows: a row that cannot be read (not UTF-8, oversized, refused by ``csv``) or mapped (wrong
types, NaN or infinite amounts, ids with path characters) costs that row only: :func:`transaction_of`
raises its :class:`InvalidRecord`, whatever went wrong, and :func:`row_dead_letter` is its dead letter,
with the row's bytes and the id ``<file name>:<line>``; the rest of the file is replayed.

Row order: rows are replayed in ``EVENT_TIMESTAMP`` order (a stable sort, so rows with equal
timestamps keep their file order; rows whose timestamp cannot be parsed sort last and are then
reported as unmappable). A row's *index* is its position in that order.

Resuming: the state file (one per CSV path) remembers the file's sha256 and the index of the last row
such that it and every row before it were acknowledged by Kafka (or skipped as unmappable). It is
written only from acknowledgements, atomically and durably (fsync of the file, rename, fsync of its folder), so a
replay killed at any moment, or stopped by a power cut, restarts after that row with no row skipped. Rows
acknowledged after the last write are sent again; that is harmless because everything downstream is idempotent by
``transaction_id``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from infra.clock import now_ms
from infra.durable import make_dirs_durably, replace_durably
from schemas.afd_csv import CsvRow, file_sha256, row_to_transaction, source_bytes
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.records import DeadLetter, PosTransaction, dead_letter

STAGE = "csv_replay"


class ReplayStateError(CheckoutGuardError, ValueError):
    """The state file does not belong to this CSV (content changed) or cannot be read."""


# ---------------------------------------------------------------------------- mapping


def transaction_of(row: CsvRow, now_ms: int = 0, max_future_skew_ms: int = 0) -> PosTransaction:
    """The row's transaction; :class:`InvalidRecord` for any row that has none -- even an exception the
    mapping did not anticipate, which must cost that row and not the file.

    With ``now_ms`` (the wall clock), a row stamped more than ``max_future_skew_ms`` after it is
    ``invalid_timestamp``, as the scoring job would find it: a replay paced by event time waited for it
    (a typo year, 2099 for 2019: decades divided by the time scale) before the job refused it anyway."""
    try:
        tx = row_to_transaction(row.data)
    except InvalidRecord:
        raise
    except Exception as exc:
        raise InvalidRecord("invalid", f"cannot map the row: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if now_ms and tx.event_time - now_ms > max_future_skew_ms:
        raise InvalidRecord(
            "invalid_timestamp",
            f"EVENT_TIMESTAMP is {(tx.event_time - now_ms) / 1000:.0f} s after the wall clock "
            f"(at most {max_future_skew_ms / 1000:.0f} s allowed, CG_JOB__MAX_FUTURE_SKEW_MS)",
        )
    return tx


def file_label(path: Path) -> str:
    """``path``'s file name as text that encodes: bytes of the name that are not UTF-8 (a Latin-1 ``café``,
    held by Python as surrogates) are written ``\\xe9``. It names the file in dead-letter ids, the state and
    the output; the name itself, surrogates and all, crashed the first dead letter's encoding."""
    return path.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def row_dead_letter(csv_name: str, row: CsvRow, error: InvalidRecord, failed_at: int) -> DeadLetter:
    """The dead letter of a row that cannot be replayed. Its id ``<file name>:<line>`` is stable across
    reruns, so a resumed replay that sends it again replaces it downstream; the key is the row's
    ``EVENT_ID`` when it has one."""
    event_id = row.data.get("EVENT_ID")
    return dead_letter(
        topic=csv_name,
        partition=-1,
        offset=row.line,
        key=event_id.encode("utf-8", "surrogateescape") if isinstance(event_id, str) and event_id else None,
        value=source_bytes(row),
        error=error,
        stage=STAGE,
        failed_at=failed_at,
        dead_letter_id=f"{csv_name}:{row.line}",
    )


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
    """``<stack_dir>/replay/<stem>-<hash of the resolved path>.state.json``: keyed by the name alone, a second
    ``transactions.csv`` from another folder was refused as "another version" of the first, and ``--from-start``
    wiped the first one's progress. A state saved before under the name alone (``<stem>.state.json``) is still
    the file's when it records this content, so a replay started before the change resumes where it stopped."""
    folder = stack_dir / "replay"
    digest = hashlib.sha256(os.fsencode(csv_path.resolve())).hexdigest()[:12]
    path = folder / f"{csv_path.stem}-{digest}.state.json"
    by_name = folder / f"{csv_path.stem}.state.json"
    if path.exists() or not by_name.exists():
        return path
    try:
        state = load_state(by_name)
    except ReplayStateError:
        return path  # unreadable, so whose it was cannot be told: this file keeps its own
    return by_name if state is not None and state.sha256 == file_sha256(csv_path) else path


_STATE_FIELDS = ("csv", "sha256", "total_rows", "last_acked_index", "updated_at")


def load_state(path: Path) -> ReplayState | None:
    """The saved progress, None without a file; :class:`ReplayStateError` naming the file and what is wrong with it
    for one that is not a state this module wrote (hand-edited, cut short, not a file): such a state, its fields of
    the wrong kind, crashed the replay with a traceback (a text ``sha256``, a ``last_acked_index`` of ``"3"``) or
    resumed at the wrong row (a negative index counted from the end)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON
        raise ReplayStateError(f"cannot read replay state {path}: {exc}") from exc
    problem = _state_problem(data)
    if problem is not None:
        raise ReplayStateError(f"invalid replay state {path}: {problem} (fix it, or use --from-start)")
    return ReplayState(**data)


def _state_problem(data: Any) -> str | None:
    """What keeps ``data`` (parsed JSON) from being a :class:`ReplayState`; None when nothing does."""
    if not isinstance(data, dict):
        return f"expected a JSON object, not {type(data).__name__}"
    if sorted(data) != sorted(_STATE_FIELDS):
        return f"expected the fields {', '.join(_STATE_FIELDS)}, not {', '.join(map(str, data)) or 'none'}"
    for name in ("csv", "updated_at"):
        if not isinstance(data[name], str):
            return f"{name} must be a string, not {data[name]!r}"
    sha256 = data["sha256"]
    if not (isinstance(sha256, str) and len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        return f"sha256 must be 64 hex digits, not {sha256!r}"
    total, last = data["total_rows"], data["last_acked_index"]
    if not (type(total) is int and total >= 0):
        return f"total_rows must be a whole number of at least 0, not {total!r}"
    if not (type(last) is int and -1 <= last < total):
        return f"last_acked_index must be a whole number from -1 to total_rows - 1 ({total - 1}), not {last!r}"
    return None


def save_state(path: Path, state: ReplayState) -> None:
    """Replace the state durably (:func:`infra.durable.replace_durably`): a crash or power cut leaves the old state or
    the new one, never half, and never an older one than a resumed replay was told (its rows sent a second time)."""
    make_dirs_durably(path.parent)  # a first state lost with its new folder sent every row again
    replace_durably(path, json.dumps(asdict(state), indent=2))


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


Send = Callable[[bytes, bytes, Callable[[Any, Any], None]], None]
"""``send(key, value, on_delivery)``: produce one record to the dead-letter topic."""


class DeadLetterRows:
    """Sends each bad row's dead letter; the row counts as done (settles the watermark) only once Kafka
    has its dead letter, so one whose dead letter failed is sent again on resume."""

    def __init__(
        self,
        csv_name: str,
        watermark: AckWatermark,
        checkpoint: Checkpoint,
        send: Send,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._name, self._send, self._clock = csv_name, send, clock
        self._watermark, self._checkpoint = watermark, checkpoint
        self.sent = self.failed = 0
        self.errors: list[str] = []
        """The first few distinct delivery errors of dead letters."""

    def send(self, index: int, row: CsvRow, error: InvalidRecord) -> None:
        """Dead-letter row ``index`` (its position in replay order)."""
        dl = row_dead_letter(self._name, row, error, self._clock())

        def delivered(err: object, _msg: object) -> None:
            if err is None:
                self._watermark.settle(index)
                self._checkpoint.maybe_save()
            else:
                self.failed += 1
                text = str(err)
                if len(self.errors) < 5 and text not in self.errors:
                    self.errors.append(text)

        self._send(dl.dead_letter_id.encode(), dl.encode(), delivered)
        self.sent += 1
