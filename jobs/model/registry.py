"""Champion and challenger: which trained models the job scores with, and promotion without a restart.

The models root holds one folder per version plus two pointer files: ``CURRENT`` names the champion
(its score decides) and ``CHALLENGER`` names an optional second model, scored on every transaction
and recorded beside the decision but never deciding. The job's :class:`ModelRegistry` re-reads the
pointers at most every ``model.reload_interval_s`` and swaps models between batches, so ``promote``
takes effect in a running job without a restart. Each pointer is replaced atomically and durably (temp file,
fsync, rename, fsync of the folder): a reader never sees half a name, nor after a power cut an empty one, and the
job reads the two only while no command holds the pointer lock, so never one moved and the other not yet
(:func:`settled_pointers`). A pointer naming a missing or
incompatible artifact is logged and ignored -- the models in use stay -- so a bad promotion never stops
scoring; a challenger that does not load holds back neither the start nor a new champion (it never decides).

The commands change the pointers by compare-and-swap (:func:`swap_pointers`): each reads both pointers first
and writes only if, under an exclusive lock on ``.pointers.lock``, they are still what it read; otherwise it
moves nothing and says what changed meanwhile (exit 2). Two ``promote`` run at once thus swap the models once,
not there and back, with one audit event, and a ``challenger`` set during a ``promote`` is never silently
overwritten: the later command is refused and re-run knowingly.

Commands (``python -m jobs.model.registry ...``, ``make models ARGS=...``): ``status``, ``challenger
VERSION`` (or ``--clear``), ``promote`` (the challenger becomes champion; the old champion becomes the
challenger unless ``--retire``). ``promote`` prints the new champion's evaluation report and records
the change on the ``audit`` topic before it moves a pointer (under the pointer lock, after the check).
``pack OUT.zip`` writes the models a job without this folder scores with (Managed Flink: the application
zip's ``checkout-guard/lib/models.zip``, which ``flink.yaml`` ships to the workers).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from infra.cli import run_tool
from infra.durable import remove_durably, replace_durably
from infra.os_user import os_user
from infra.settings import Settings, get_settings
from jobs.model.fraud_model import LOCK, LocalModel, ModelArtifactError, format_metrics, pointer_lock
from schemas.errors import CheckoutGuardError
from schemas.model_artifact import CHALLENGER, CURRENT, artifact_folders, version_folders

log = logging.getLogger("checkout_guard.models")


def read_pointer(root: Path, name: str) -> str | None:
    """The version a pointer file names, or ``None`` when there is none (or it is empty)."""
    try:
        value = (root / name).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # a folder, no permission, bytes that are not text
        raise ModelArtifactError(f"the pointer {root / name} cannot be read: {exc}") from exc
    return value or None


def write_pointer(root: Path, name: str, version: str | None) -> None:
    """Point ``name`` at ``version`` atomically and durably (fsync before the rename, the folder after: a power cut
    leaves the old name or the new, never an empty pointer); ``None`` removes the pointer."""
    if version is None:
        remove_durably(root / name)
        return
    replace_durably(root / name, version + "\n")


Pointers = tuple[str | None, str | None]
"""(champion, challenger): what ``CURRENT`` and ``CHALLENGER`` name."""


def read_pointers(root: Path) -> Pointers:
    return read_pointer(root, CURRENT), read_pointer(root, CHALLENGER)


def settled_pointers(root: Path, *, wait: bool = False) -> Pointers | None:
    """Both pointers as one command left them, for the job; None while a command is changing them (it holds the
    pointer lock), unless ``wait``. A ``promote`` renames ``CURRENT`` and then ``CHALLENGER``: read between the two,
    they named one model for both roles, so the job dropped the old champion, and read it from disk again a reload
    later (lost, if its folder had gone since). A shared lock, never waited for while scoring: the job looks again
    at its next reload. The models root may be read-only to the job; without a lock file no command ran there, and
    one the job may not open (another user's) leaves the pointers read as before, unlocked, not the job stopped."""
    try:
        lock = (root / LOCK).open("r")
    except OSError:
        return read_pointers(root)
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_SH if wait else fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            return read_pointers(root)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


class PointersChanged(CheckoutGuardError, RuntimeError):
    """Another command moved a pointer between this one's read and its write: nothing was written."""


def _describe(seen: Pointers, now: Pointers) -> str:
    moves = [
        f"{role} {before or '-'} -> {after or '-'}"
        for role, before, after in zip(("champion", "challenger"), seen, now, strict=True)
        if before != after
    ]
    return ", ".join(moves)


def swap_pointers(root: Path, seen: Pointers, to: Pointers, before_write: Callable[[], None] | None = None) -> None:
    """Point (``CURRENT``, ``CHALLENGER``) at ``to`` only if they still name ``seen``, what the command read and
    checked; :class:`PointersChanged` (nothing written, ``before_write`` not called) otherwise. ``before_write``
    (the audit event) runs under the lock, so it is sent only for the change that happens."""
    with pointer_lock(root):
        now = read_pointers(root)
        if now != seen:
            raise PointersChanged(
                f"the models changed while this command ran ({_describe(seen, now)}): nothing was changed "
                "(see status, then run it again if it is still wanted)"
            )
        if before_write is not None:
            before_write()
        if to[0] != now[0]:
            write_pointer(root, CURRENT, to[0])
        if to[1] != now[1]:
            write_pointer(root, CHALLENGER, to[1])


def _swap_or_refuse(root: Path, seen: Pointers, to: Pointers, before_write: Callable[[], None] | None = None) -> None:
    """:func:`swap_pointers`; a change meanwhile is one ``Error:`` line and exit 2: the operator re-runs knowingly."""
    try:
        swap_pointers(root, seen, to, before_write)
    except PointersChanged as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from None


RETRY_MAX_S = 60.0
"""The longest pause before loading pointers that failed again (a version still being copied in is taken
by then; a permanent fault costs a load a minute, not one every interval)."""


class ModelRegistry:
    """The champion and challenger models, following the pointer files (or fixed ones, for tests/backtests)."""

    def __init__(
        self,
        settings: Settings | None,
        *,
        champion: LocalModel | None = None,
        challenger: LocalModel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.champion = champion
        self.challenger = challenger
        self.swaps = 0
        self._next_check = 0.0
        self._failed: tuple[tuple[str | None, str | None] | None, str] | None = None
        """The pointers and the error of the last failed load: logged once."""
        self._retry_s = 0.0
        self._retry_at = 0.0
        """When pointers that failed are loaded again: the pause doubles per failure up to :data:`RETRY_MAX_S`."""
        self._seen: tuple[str | None, str | None] | None = (None, None)
        """The pointers whose models are in use; None while one of them failed to load."""
        if settings is None:  # fixed models: never re-read anything
            self.root: Path | None = None
            self.pinned: tuple[str | None, str | None] = (None, None)
            self.interval = float("inf")
            self._seen = (self._version(champion), self._version(challenger))
            return
        self.root = settings.models_root
        self.pinned = (settings.model.artifact, settings.model.challenger)
        self.interval = settings.model.reload_interval_s
        self.refresh(force=True, strict=True)

    @classmethod
    def fixed(cls, champion: LocalModel, challenger: LocalModel | None = None) -> ModelRegistry:
        return cls(None, champion=champion, challenger=challenger)

    @staticmethod
    def _version(model: LocalModel | None) -> str | None:
        return model.version if model is not None else None

    def wanted(self, *, wait: bool = False) -> tuple[str | None, str | None] | None:
        """(champion, challenger) versions the settings pin or the pointers name now; None while a command is
        changing the pointers (:func:`settled_pointers`), unless ``wait``."""
        assert self.root is not None
        if self.pinned[0] and self.pinned[1]:
            return self.pinned
        pointers = settled_pointers(self.root, wait=wait)
        if pointers is None:
            return None
        return self.pinned[0] or pointers[0], self.pinned[1] or pointers[1]

    def refresh(self, *, force: bool = False, strict: bool = False) -> bool:
        """Follow the pointers if ``reload_interval_s`` has passed; ``True`` when a model changed.

        ``strict`` (at start): a missing champion raises :class:`ModelArtifactError`. Later, a pointer
        naming something unloadable (or unreadable) is logged once and the models in use stay; it is tried
        again after a pause that doubles up to :data:`RETRY_MAX_S`, so a version still being copied in is
        taken once it is whole. The challenger never decides, so one that cannot be loaded holds back neither
        the start nor a new champion: the champion is taken, the challenger in use stays (none at start, or
        when it is the new champion) and the challenger's pointer is tried again the same way."""
        if self.root is None:
            return False
        now = self.clock()
        if not force and now < self._next_check:
            return False
        self._next_check = now + self.interval
        wanted: tuple[str | None, str | None] | None = None
        try:
            wanted = self.wanted(wait=force)
            if wanted is None:
                return False  # a command is moving the pointers: both are read once it is done
            if not force and wanted == self._seen:
                self._failed = None  # back to the models in use: a later failure is news again
                return False
            if not force and self._failed is not None and self._failed[0] == wanted and now < self._retry_at:
                return False  # the same pointers failed: tried again with a growing pause, not every interval
            champion = self._load(wanted[0], self.champion, self.challenger)
            if champion is None:
                raise ModelArtifactError(
                    f"no champion model in {self.root} (make train-default, or jobs.model.train train CSV)"
                )
        except (ModelArtifactError, OSError, ValueError) as exc:
            if strict:
                raise ModelArtifactError(str(exc)) from exc
            self._failure(wanted, exc, now)
            return False
        seen: tuple[str | None, str | None] | None = wanted
        try:
            challenger = self._load_challenger(wanted, champion)
        except (ModelArtifactError, OSError, ValueError) as exc:
            held = self.challenger
            challenger = held if held is not None and held.version != champion.version else None
            self._failure(wanted, exc, now, keeping=(champion, challenger))
            seen = None  # not all the pointers name the models in use: looked at again (after the pause)
        else:
            self._failed = None
        changed = (champion.version, self._version(challenger)) != (
            self._version(self.champion),
            self._version(self.challenger),
        )
        self.champion, self.challenger = champion, challenger
        self._seen = seen
        if changed and not force:
            self.swaps += 1
            log.info("models now: champion %s, challenger %s", champion.version, self._version(challenger))
        return changed

    def _load_challenger(self, wanted: tuple[str | None, str | None], champion: LocalModel) -> LocalModel | None:
        if wanted[1] is None or wanted[1] == wanted[0]:
            return None
        challenger = self._load(wanted[1], self.challenger, self.champion, champion)
        if challenger is not None and challenger.version == champion.version:
            return None  # a copy of the champion under another name: no second model to compare
        return challenger

    def _failure(
        self,
        wanted: tuple[str | None, str | None] | None,
        exc: Exception,
        now: float,
        keeping: tuple[LocalModel | None, LocalModel | None] | None = None,
    ) -> None:
        """Log a failed load once per cause and set when the same pointers are tried again."""
        failed = (wanted, str(exc))
        kept = keeping if keeping is not None else (self.champion, self.challenger)
        if failed != self._failed:  # once per cause, not every interval
            log.warning(
                "model pointers name %s / %s, which cannot be loaded (%s): keeping %s / %s",
                *(wanted or ("?", "?")),
                exc,
                *(self._version(model) for model in kept),
            )
        same = self._failed is not None and self._failed[0] == wanted
        self._retry_s = min(RETRY_MAX_S, 2 * self._retry_s) if same else self.interval
        self._retry_at = now + self._retry_s
        self._failed = failed

    def _load(self, version: str | None, *have: LocalModel | None) -> LocalModel | None:
        """The model the pointer ``version`` names, reusing a loaded one (in either role: a promotion swaps the two
        models in memory, it does not read them from disk again): one loaded from that folder, or of that version.
        A pointer names a folder, which may hold its model under another name (``prod``, a copy): matched by the
        version alone, such a model was read from disk again at a promotion, and lost once its folder had gone."""
        if version is None:
            return None
        for model in have:
            if model is not None and (model.path is not None and model.path.name == version):
                return model
        for model in have:
            if model is not None and model.version == version:
                return model
        assert self.root is not None
        return LocalModel.load(self.root / version)


# --- commands ---------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help="Champion and challenger models: status, set a challenger, promote.")


def _root(models: Path | None) -> Path:
    return models or get_settings().models_root


def load_version(root: Path, version: str) -> LocalModel:
    """The model whose ``model.json`` version is ``version``, whatever its folder in ``root`` is called
    (:func:`version_folders`, shared with the readers outside the job): a pointer may name a copy kept under another
    name. For a reader that holds only the version (the partitioned layout's drift step, from its slots' tallies;
    the SageMaker calibration), so it finds the model the pointers gave the slots. Each folder holding the version
    is tried in turn and the first that loads is used (a warning names each copy that did not: one damaged copy
    must not hide an intact one); :class:`ModelArtifactError` when no folder holds it or none loads."""
    folders = version_folders(root, version)
    if not folders:
        raise ModelArtifactError(f"no version folder in {root} holds model {version}")
    problems: list[tuple[Path, ModelArtifactError]] = []
    for folder in folders:
        try:
            model = LocalModel.load(folder)
        except ModelArtifactError as exc:
            problems.append((folder, exc))
            continue
        for damaged, error in problems:
            log.warning(
                "model %s: the copy in %s does not load (%s); using the copy in %s", version, damaged, error, folder
            )
        return model
    if len(problems) == 1:
        raise problems[0][1]
    raise ModelArtifactError(f"no copy of model {version} in {root} loads: " + "; ".join(str(e) for _, e in problems))


def _check_version(root: Path, version: str) -> LocalModel:
    """A pointer names one version folder directly under ``root`` (never ``.``, ``..`` or a path, which would
    load now and leave ``CURRENT`` unreadable to the job: none is a folder name) holding an artifact the job
    can load; raises :class:`ModelArtifactError` (one ``Error:`` line, exit 1) otherwise."""
    if version not in artifact_folders(root):
        raise ModelArtifactError(f"{version!r} is not a model version in {root} (see: status)")
    try:
        return LocalModel.load(root / version)
    except ModelArtifactError as exc:
        raise ModelArtifactError(f"{version} cannot be loaded: {exc}") from exc


def _loaded_version(root: Path, folder: str | None) -> str | None:
    """The model version (``model.json``'s) in ``folder``, or None when it cannot be loaded."""
    try:
        return LocalModel.load(root / folder).version if folder else None
    except ModelArtifactError:
        return None


def _load_problem(root: Path, folder: str | None, versions: list[str]) -> str:
    """What ``status`` says after a pointer that the job cannot load ('' when it can)."""
    if folder is None:
        return ""
    if folder not in versions:
        return " (MISSING: no such version on disk; the job cannot load it)"
    try:
        LocalModel.load(root / folder)
    except ModelArtifactError as exc:
        return f" (CANNOT BE LOADED: {exc})"
    return ""


@app.command()
def status(models: Annotated[Path | None, typer.Option(help="Models root (default: settings).")] = None) -> None:
    """Which model is champion, which is challenger, and the versions on disk."""
    root = _root(models)
    if not root.is_dir():
        raise ModelArtifactError(f"no models root at {root} (train one: make train / make train-default)")
    champion, challenger = read_pointer(root, CURRENT), read_pointer(root, CHALLENGER)
    typer.echo(f"models root: {root}")
    versions = artifact_folders(root)
    for label, pointer in (("champion:  ", champion), ("challenger:", challenger)):
        typer.echo(f"{label} {pointer or '-'}{_load_problem(root, pointer, versions)}")
    for version in versions:
        typer.echo(f"  {version}")


@app.command()
def challenger(
    version: Annotated[str | None, typer.Argument(help="Model version folder to score beside the champion.")] = None,
    clear: Annotated[bool, typer.Option(help="Stop scoring with a challenger.")] = False,
    models: Annotated[Path | None, typer.Option(help="Models root (default: settings).")] = None,
) -> None:
    """Set (or clear) the challenger; a running job picks it up within ``model.reload_interval_s``."""
    root = _root(models)
    seen = read_pointers(root)
    champion = seen[0]
    if clear:
        if root.is_dir():
            _swap_or_refuse(root, seen, (champion, None))
        typer.echo("challenger cleared")
        return
    if not version:
        raise typer.BadParameter("name a version, or --clear")
    if version == champion:
        raise typer.BadParameter(f"{version} is the champion already; the job scores no challenger equal to it")
    try:
        model = _check_version(root, version)
    except ModelArtifactError as exc:  # the argument names nothing loadable: a usage error, as before
        raise typer.BadParameter(str(exc)) from exc
    if model.version == _loaded_version(root, champion):
        raise typer.BadParameter(
            f"{version} holds the champion's model ({model.version}, a copy); the job scores no challenger equal to it"
        )
    _swap_or_refuse(root, seen, (champion, version))
    typer.echo(f"challenger: {version}")


class AuditNotDelivered(CheckoutGuardError, RuntimeError):
    """The ``MODEL_PROMOTE`` audit event did not reach Kafka: no pointer moved."""


def _audit(settings: Settings, old: str | None, new: str, actor: str, reason: str | None, timeout_s: float) -> None:
    """One ``MODEL_PROMOTE`` audit event, delivered before any pointer moves (raises if it is not)."""
    from infra.clients.kafka import IDEMPOTENT, KafkaUnavailable, TopicError, produce, producer, require_topics
    from schemas.records import AuditEvent
    from schemas.topics import AUDIT

    now = int(time.time() * 1000)
    audit_id = "model-promote:" + hashlib.sha256(f"{old}>{new}@{now}".encode()).hexdigest()[:16]
    event = AuditEvent(
        audit_id=audit_id,
        event_time=now,
        action="MODEL_PROMOTE",
        outcome="DONE",
        actor=actor,
        reason=reason,
        details={"champion": new, "previous": old or ""},
    )
    errors: list[str] = []
    p = producer(settings, IDEMPOTENT)
    try:
        require_topics(p, settings, AUDIT.full_name(settings.kafka.topic_prefix), timeout_s=min(10.0, timeout_s))
    except (KafkaUnavailable, TopicError) as exc:
        raise AuditNotDelivered(f"audit event not sent: {exc}; the models are unchanged") from None
    produce(
        p,
        AUDIT.full_name(settings.kafka.topic_prefix),
        audit_id,
        event.encode(),
        lambda err, _msg: errors.append(str(err)) if err else None,
    )
    if p.flush(timeout_s) or errors:
        raise AuditNotDelivered(
            f"audit event not delivered ({'; '.join(errors) or 'timed out'}): the models are unchanged"
        )


AUDIT_TIMEOUT_S = 15.0
"""How long a change of champion waits for its audit event's delivery, by default."""


def champion_change(
    settings: Settings,
    old: str | None,
    new: str,
    *,
    audit: bool = True,
    reason: str | None = None,
    timeout_s: float = AUDIT_TIMEOUT_S,
) -> Callable[[], None]:
    """The ``before_write`` of :func:`swap_pointers` for a change of champion: its ``MODEL_PROMOTE`` audit event
    (none when not ``audit``). ``promote`` and ``train-default --force`` both move ``CURRENT`` this way."""

    def record() -> None:
        if audit:
            _audit(settings, old, new, os_user(), reason, timeout_s)

    return record


@app.command()
def promote(
    retire: Annotated[bool, typer.Option(help="Drop the old champion instead of keeping it as challenger.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the audit event).")] = None,
    audit: Annotated[bool, typer.Option(help="Record the promotion on the audit topic first.")] = True,
    models: Annotated[Path | None, typer.Option(help="Models root (default: settings).")] = None,
    timeout_s: Annotated[
        float, typer.Option(help="How long to wait for the audit event's delivery.", min=1)
    ] = AUDIT_TIMEOUT_S,
) -> None:
    """Make the challenger the champion; a running job switches within ``model.reload_interval_s``."""
    settings = get_settings()
    root = models or settings.models_root
    seen = read_pointers(root)
    old, new = seen
    if not new:
        raise typer.BadParameter("no challenger to promote (set one: challenger VERSION)")
    model = _check_version(root, new)
    if new == old or model.version == _loaded_version(root, old):
        raise ModelArtifactError(f"the challenger {new} is the champion's model already: nothing to promote")
    typer.echo(format_metrics(model.meta))
    kept = None if retire else old
    record = champion_change(settings, old, new, audit=audit, reason=reason, timeout_s=timeout_s)
    _swap_or_refuse(root, seen, (new, kept), record)
    typer.echo(f"champion: {new} (was {old or '-'}); challenger: {kept or '-'}")


def pack_models(root: Path, out: Path, version: str | None = None) -> Pointers:
    """Write ``out``, a models root for a job that cannot see this one (Managed Flink: ``flink.yaml``'s
    ``pyArchives`` extracts it on each worker where ``CG_MODEL__ARTIFACT_DIR`` points): the pointers and the version
    folders they name, nothing else (no other version, no lock). ``version`` alone as champion, or the root's champion
    and challenger. Each is checked to load here first, so a model the job could not load (other features, damaged)
    is refused before it is deployed, not on the cluster; written whole under a temporary name, then renamed."""
    pointers = (version, None) if version is not None else settled_pointers(root, wait=True)
    assert pointers is not None  # waited for
    if pointers[0] is None:
        raise ModelArtifactError(f"no champion in {root} (CURRENT): promote one, or name one with --version")
    for name in pointers:
        if name is not None:
            _check_version(root, name)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for pointer, name in zip((CURRENT, CHALLENGER), pointers, strict=True):
                if name is None:
                    continue
                archive.writestr(pointer, name + "\n")
                for path in sorted((root / name).rglob("*")):
                    if path.is_file():
                        archive.write(path, f"{name}/{path.relative_to(root / name).as_posix()}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return pointers


@app.command()
def pack(
    out: Annotated[Path, typer.Argument(help="The zip to write: the application zip's checkout-guard/lib/models.zip.")],
    version: Annotated[
        str | None, typer.Option(help="Ship this version alone, as champion (default: the champion and challenger).")
    ] = None,
    models: Annotated[Path | None, typer.Option(help="Models root (default: settings).")] = None,
) -> None:
    """Write the models for a job without this folder (Managed Flink's application zip): pointers and their versions."""
    champion, challenger = pack_models(_root(models), out, version)
    typer.echo(f"{out}: champion {champion}, challenger {challenger or '-'}")


if __name__ == "__main__":
    run_tool(app)
