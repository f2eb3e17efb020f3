"""Decisions: indicators + model score + face result -> approve / review / block, with reasons.

Seed 001's scheme: weighted indicators add up to a 0-100 risk; block at >= ``block_at`` (85),
review at >= ``review_at``. The reasons are the indicators that contributed, heaviest first, so an
analyst (and the alert e-mail) can say *why*.

The weights, model score bands and face rules are one versioned YAML rule set
(``jobs/scoring/rulesets/default.yaml``), validated by :meth:`RuleSet.from_yaml`. Its version is stamped on
every decision. At run time a new rule set is published to the compacted ``rules`` topic
(``python -m jobs.scoring.rules publish FILE.yaml``) and the job swaps it in without a restart.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from infra.clock import now_ms
from infra.os_user import os_user
from infra.settings import RulesSettings, Settings
from schemas.errors import CheckoutGuardError

DEFAULT_RULESET = Path(__file__).resolve().parent / "rulesets" / "default.yaml"

KNOWN_INDICATORS: frozenset[str] = frozenset(
    {
        # seed 001
        "no_photo_verification",
        "customer_mismatch",
        "suspicious_timing",
        "high_value_item",
        "return_without_receipt",
        # jobs/scoring/features.py
        "return_exceeds_sale",
        "return_unknown_receipt",
        "return_currency_mismatch",
        "velocity_exceeded",
        "amount_above_norm",
        "cross_store_return",
        "store_return_burst",
        "new_store_for_customer",
        "first_seen",
        "unknown_currency",
        # jobs/scoring/scorer.py: the returner's face against the buyer's
        "buyer_face_mismatch",
    }
)
"""Indicators a weight may name: a typo in a rule file must fail validation, not silently score 0."""
MEASURED_INDICATORS: frozenset[str] = frozenset(
    {
        # jobs/scoring/features.py
        "seconds_since_sale",
        "store_returns_in_window",
        "velocity",
        "amount_zscore",
        # jobs/scoring/scorer.py
        "buyer_face_similarity",
    }
)
"""Indicators that carry a measure, not a flag: no weight names them (the model reads all but the last)."""
INDICATOR_NAMES: frozenset[str] = KNOWN_INDICATORS | MEASURED_INDICATORS
"""Every indicator a decision may carry: the OpenSearch transactions template maps each of these, and no other, as a
double (``schemas/index_templates/transactions.json``; a unit test keeps the two equal)."""
FACE_INDICATORS: tuple[str, ...] = ("buyer_face_mismatch",)
"""Indicators drawn from the same lane snapshot as the watchlist match. With it they are one piece of evidence,
not two (a snapshot of the wrong person gives a suspect match and a returner who is not the buyer at once), so
only the heaviest of them counts towards the risk."""
NO_FACE_INDICATORS: tuple[str, ...] = ("no_photo_verification",)
"""The indicators ``face.unavailable_return_indicator`` may name (or null, for none): those that say a return had no
usable face. Any other is computed from the transaction and means something else (``return_unknown_receipt``,
``velocity_exceeded``, ``buyer_face_mismatch``: the face evidence of a returner who is not the buyer): named there,
a camera outage raised it, a false reason for the alert and the analyst, and ``buyer_face_mismatch`` counted the
outage as face evidence. Its points are ``weights.no_photo_verification``."""
FACE_STATUSES = frozenset({"UNAVAILABLE", "NO_FACE"})
"""The face statuses ``face.unavailable_statuses`` may list: those that mean "no usable face". ``NO_MATCH`` and
``MATCHED`` are a face seen; with ``MATCHED`` listed a suspect's match on a return raised the "no face" indicator
too, and the two together could block on the face alone, with a false reason."""
_NEVER_PRODUCED_STATUSES = frozenset({"UNKNOWN", "REJECTED"})
"""Statuses once accepted in ``unavailable_statuses`` that no face stage gives: left out of a published rule set
(they never applied), refused in a file."""


class RuleSetError(CheckoutGuardError, ValueError):
    """A rule set that cannot be used; the message names the offending key."""


MAX_RULESET_BYTES = 256 * 1024
"""The largest rule set file taken (the default is about 3 KB). PyYAML reads about 100 KB a second on a busy core:
without a bound a 10 MB file took seconds to minutes and hundreds of MB to refuse, and it could never be published
(Kafka's message limit is about 1 MB)."""

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict = 2, 4, 4


def _shown(value: Any) -> str:
    """``repr(value)`` cut short for a message. YAML aliases share one list many times over (``*lol`` nine times in
    each of nine levels): a full repr of such a value expands it, and took minutes and gigabytes."""
    return _SHOWN.repr(value)


MAX_VERSION_CHARS = 128
"""The longest ``version`` taken from a file or ``CG_RULES__VERSION``. It is stamped on every decision and indexed
as a keyword: one over Lucene's 32 766-byte term made OpenSearch refuse every scored transaction, and a line break
or terminal escape in it went into every log line and report naming the rule set."""

_THRESHOLDS = ("block_at", "review_at")
"""The thresholds ``CG_RULES__*`` may override."""


def _overridden_version(version: str, changed: Mapping[str, int]) -> str:
    """The file's ``version`` with the thresholds that replaced the file's: ``2026.12.05-1+block_at=70``."""
    return version + "".join(f"+{key}={value}" for key, value in changed.items())


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping, at any depth, naming it and its lines:
    safe_load keeps the last copy, so a second ``weights:`` block silently replaced every weight."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        twice: list[str] = []
        seen: set[int] = set()
        todo: list[tuple[yaml.Node, str]] = [(root, "")]
        while todo:  # a loop, not recursion: aliases may make the tree a graph
            node, path = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                todo.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = loader.construct_object(key_node)
                    name = f"{path}.{key}" if path else str(key)
                    line = key_node.start_mark.line + 1
                    if key in first:
                        lines = f"line {line}" if first[key] == line else f"lines {first[key]} and {line}"
                        twice.append(f"{name} is given twice ({lines}); keep one")
                    first.setdefault(key, line)
                    todo.append((value_node, name))
        if twice:
            raise RuleSetError("invalid rule set: " + "; ".join(sorted(twice)))
        return loader.construct_document(root)
    finally:
        loader.dispose()


@dataclass(frozen=True)
class FaceResult:
    """What the face stage found for a transaction; ``UNAVAILABLE`` until that stage exists/answers."""

    status: str = "UNAVAILABLE"
    subject_id: str | None = None
    category: str | None = None
    similarity: float | None = None
    matcher: str | None = None
    """Which engine matched (``local``: the job's watchlist search; ``rekognition``: the face stage's search of the
    collection); ``similarity`` is on that engine's scale."""


@dataclass(frozen=True)
class ModelResult:
    """A fraud model's answer: score 0-1000 (``None`` = no model), which model answered, call time.

    ``challenger_*`` is the second model's answer for the same transaction: recorded beside the
    decision so the two can be compared on live traffic, never read by the rules."""

    score: int | None = None
    version: str | None = None
    time_ms: int = 0
    challenger_score: int | None = None
    challenger_version: str | None = None


@dataclass(frozen=True)
class RuleSet:
    version: str
    block_at: int
    review_at: int
    weights: dict[str, int] = field(default_factory=dict)
    model_bands: tuple[tuple[int, int], ...] = ()
    """(model score at least, points), highest score first; the first band reached counts."""
    watchlist_suspect_points: int = 60
    """Points of a suspect face match. With the :data:`FACE_INDICATORS`' weights below ``block_at`` unless
    ``match_alone_may_block``: a match is evidence for a person to weigh, so face evidence alone makes REVIEW;
    with other indicators it may reach BLOCK."""
    match_alone_may_block: bool = False
    """Explicit opt-in to rule sets where face evidence alone reaches ``block_at`` (refused otherwise). Not for the
    weight of ``unavailable_return_indicator``: a camera outage alone never blocks, whatever this says."""
    unavailable_statuses: frozenset[str] = frozenset({"UNAVAILABLE", "NO_FACE"})
    unavailable_return_indicator: str | None = "no_photo_verification"
    """Indicator raised on a return whose face status is one of ``unavailable_statuses``."""
    description: str = ""

    @classmethod
    def default(cls) -> RuleSet:
        return cls.load(DEFAULT_RULESET)

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        """The rule set in the file ``path``; a :class:`RuleSetError` names the file."""
        text = rule_set_text(path)
        try:
            return cls.from_yaml(text)
        except RuleSetError as exc:
            raise RuleSetError(f"{path}: {exc}") from None

    @classmethod
    def from_settings(cls, rules: RulesSettings) -> RuleSet:
        """The rule set file named in the settings (the bundled default otherwise); ``version``,
        ``block_at`` and ``review_at`` in the settings win only when set (``CG_RULES__*``; unset = ``None``).

        A threshold that differs from the file's changes the version too, unless ``version`` is set: the file's
        version is read as naming the file's rules, so ``2026.12.05-1`` with block_at 70 becomes
        ``2026.12.05-1+block_at=70``. A value refused is reported under its ``CG_RULES__*`` name."""
        base = cls.load(rules.ruleset_file or DEFAULT_RULESET)
        changed = {k: v for k in _THRESHOLDS if (v := getattr(rules, k)) is not None and v != getattr(base, k)}
        if not changed and rules.version is None:
            return base
        data = base.to_dict()
        data["thresholds"].update(changed)
        names = {f"thresholds.{k}": f"CG_RULES__{k.upper()}" for k in changed}
        if rules.version is not None:
            data["version"] = rules.version
            names["version"] = "CG_RULES__VERSION"
            return cls.from_dict(data, names=names)
        # the suffix is ours, not the file's: the file's version was checked, the stamp may be longer
        return replace(cls.from_dict(data, names=names), version=_overridden_version(base.version, changed))

    @classmethod
    def from_yaml(cls, text: str, published: bool = False) -> RuleSet:
        """A rule set file's text, checked. ``published``: read back from the rules topic, where the checks of
        the time it was published hold (a key given twice: the last; an unquoted version: as text), so that a rule
        set published before the stricter checks is not dropped at a restart for the file's."""
        if not published and len(text.encode("utf-8", "surrogatepass")) > MAX_RULESET_BYTES:
            raise RuleSetError(f"a rule set is at most {MAX_RULESET_BYTES // 1024} KiB")
        try:
            data = yaml.safe_load(text) if published else _load_yaml(text)
        except yaml.YAMLError as exc:
            raise RuleSetError(f"not valid YAML: {exc}") from None
        except RecursionError:  # PyYAML composes and constructs nested nodes recursively
            raise RuleSetError("not a rule set: YAML nested too deeply") from None
        return cls.from_dict(data, published=published)

    @classmethod
    def from_dict(cls, data: Any, names: Mapping[str, str] | None = None, published: bool = False) -> RuleSet:
        """Validate a parsed rule set; every problem found is reported at once, by key (``names`` renames a key in
        the messages: ``thresholds.block_at`` is ``CG_RULES__BLOCK_AT`` when the value came from there)."""
        names = names or {}
        errors: list[str] = []
        if not isinstance(data, dict):
            raise RuleSetError("a rule set must be a mapping with version, thresholds, weights, model_bands, face")
        unknown = set(data) - {"version", "description", "thresholds", "weights", "model_bands", "face"}
        if unknown:
            errors.append(f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
        raw_version = data.get("version")
        if published and isinstance(raw_version, int | float | date):  # bool too: `version: yes` was "True"
            raw_version = str(raw_version)  # as the publish of its time stamped it
        version = _version(raw_version, names.get("version", "version"), errors, published)
        block_at, review_at = _thresholds(data, errors, names)
        weights = _weights(data, errors)
        bands = _model_bands(data, errors, published)
        suspect, alone, statuses, indicator = _face(data, errors, published)
        description = _description(data.get("description"), published, errors)
        face_points = {"face.watchlist_suspect_points": suspect} | {
            f"weights.{name}": weights.get(name) for name in FACE_INDICATORS
        }
        given = data.get("weights")
        # customer_mismatch's weight where the file gives buyer_face_mismatch none (see _weights): say so, or a rule
        # set that makes a card mismatch alone block is refused over a key the file does not have
        inherited = "buyer_face_mismatch" in weights and not (
            isinstance(given, dict) and "buyer_face_mismatch" in given
        )
        block_name = names.get("thresholds.block_at", "thresholds.block_at")
        for key, points in face_points.items():
            if points is not None and block_at is not None and points >= block_at and not alone:
                errors.append(
                    f"{key} ({points}) >= {block_name} ({block_at}): face evidence alone would block; keep it "
                    "below block_at (face evidence alone then makes REVIEW) or set face.match_alone_may_block: true"
                    + (
                        " (not in the file: it takes customer_mismatch's weight; give buyer_face_mismatch its own)"
                        if inherited and key == "weights.buyer_face_mismatch"
                        else ""
                    )
                )
        no_photo = weights.get(indicator) if statuses and isinstance(indicator, str) else None
        if no_photo is not None and block_at is not None and no_photo >= block_at:
            errors.append(  # no opt-in: match_alone_may_block is about a face seen, and a camera may fail everywhere
                f"weights.{indicator} ({no_photo}) >= {block_name} ({block_at}): a camera outage alone (no usable "
                "face on a return) would block every return; keep it below block_at (no photo alone then makes "
                "REVIEW at most)"
            )
        if not errors and not published:
            errors.extend(_never_reviews(weights, bands, suspect, names.get("thresholds.review_at"), review_at))
        if errors:
            raise RuleSetError("invalid rule set: " + "; ".join(errors))
        assert version is not None and block_at is not None and review_at is not None and suspect is not None
        return cls(
            version=version,
            block_at=block_at,
            review_at=review_at,
            weights=weights,
            model_bands=tuple(bands),
            watchlist_suspect_points=suspect,
            match_alone_may_block=alone,
            unavailable_statuses=frozenset(statuses),
            unavailable_return_indicator=indicator,
            description=description,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "description": self.description,
            "thresholds": {"block_at": self.block_at, "review_at": self.review_at},
            "weights": dict(self.weights),
            "model_bands": [{"score": s, "points": p} for s, p in self.model_bands],
            "face": {
                "watchlist_suspect_points": self.watchlist_suspect_points,
                "match_alone_may_block": self.match_alone_may_block,
                "unavailable_statuses": sorted(self.unavailable_statuses),
                "unavailable_return_indicator": self.unavailable_return_indicator,
            },
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def rule_set_text(path: Path) -> str:
    """A rule set file's text; :class:`RuleSetError` naming the file when it cannot be read as UTF-8 or is larger
    than :data:`MAX_RULESET_BYTES` (not read beyond that)."""
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_RULESET_BYTES + 1)
        if len(raw) > MAX_RULESET_BYTES:
            raise RuleSetError(f"rule set {path} is larger than {MAX_RULESET_BYTES // 1024} KiB")
        return raw.decode("utf-8")
    except OSError as exc:
        raise RuleSetError(f"cannot read rule set {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise RuleSetError(f"rule set {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _mapping(data: dict, key: str, errors: list[str]) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(f"{key}: must be a mapping")
        return {}
    return value


def _int(
    data: dict,
    key: str,
    lo: int,
    hi: int,
    errors: list[str],
    where: str,
    default: int | None = None,
    name: str | None = None,
) -> int | None:
    """``data[key]`` if an integer ``lo..hi``; else an error for ``name`` (``where`` + ``key`` by default)."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        errors.append(f"{name or where + key}: required, an integer {lo}..{hi} (got {_shown(value)})")
        return None
    return value


# --- rule set sections: each checks its part of the parsed YAML and appends what is wrong to ``errors`` ----------


def _version(value: Any, name: str, errors: list[str], published: bool = False) -> str | None:
    """``version``: a string as written. YAML reads an unquoted ``1.10`` as the number 1.1 (``1.10`` and ``1.1``
    would be stamped alike) and ``2026-12-06`` as a date, so only a string is taken; and one line of at most
    :data:`MAX_VERSION_CHARS` printable characters, unless ``published`` (what the rules topic holds stands)."""
    if isinstance(value, str) and value.strip():
        version = value.strip()
        if not published and (len(version) > MAX_VERSION_CHARS or not version.isprintable()):
            errors.append(
                f"{name}: at most {MAX_VERSION_CHARS} printable characters on one line (got {len(version)} "
                f"characters{'' if version.isprintable() else ', with a line break or control character'})"
            )
            return None
        return version
    if value is None or isinstance(value, str):
        errors.append(f"{name}: required, a non-empty string")
    else:
        if isinstance(value, int | float) and not isinstance(value, bool):
            read = f"the number {value} (unquoted, 1.10 reads as 1.1)"
        elif isinstance(value, date):
            read = f"the date {value}"
        else:
            read = f"a {type(value).__name__}"
        errors.append(f"{name}: YAML reads it as {read}, not text: put the version in quotes")
    return None


def _description(value: Any, published: bool, errors: list[str]) -> str:
    """``description``: text, or nothing. A published rule set's other value is shown cut short (see
    :func:`_shown`): ``str()`` of an aliased list expands it."""
    if value is None or isinstance(value, str):
        return (value or "").strip()
    if published:
        return _shown(value)
    errors.append("description: text (put it in quotes or use `description: >`)")
    return ""


def _thresholds(data: dict, errors: list[str], names: Mapping[str, str]) -> tuple[int | None, int | None]:
    """``thresholds``: block_at and review_at (``None`` where invalid); review must be below block. A value from
    the environment is named by its variable (``names``)."""
    thresholds = _mapping(data, "thresholds", errors)
    block_name = names.get("thresholds.block_at")
    review_name = names.get("thresholds.review_at")
    block_at = _int(thresholds, "block_at", 1, 100, errors, "thresholds.", name=block_name)
    review_at = _int(thresholds, "review_at", 1, 100, errors, "thresholds.", name=review_name)
    extra = set(thresholds) - {"block_at", "review_at"}
    if extra:
        errors.append(f"thresholds: unknown key(s) {', '.join(sorted(map(str, extra)))}")
    if block_at is not None and review_at is not None and review_at >= block_at:
        errors.append(
            f"thresholds: {review_name or 'review_at'} ({review_at}) must be below {block_name or 'block_at'} "
            f"({block_at})"
        )
    return block_at, review_at


def _never_reviews(
    weights: Mapping[str, int],
    bands: list[tuple[int, int]],
    suspect: int | None,
    name: str | None,
    review_at: int | None,
) -> list[str]:
    """An error when no transaction could ever reach ``review_at``: every indicator firing at once, the highest
    model band and the heaviest face evidence (as :func:`decide` adds them up) stay below it. Such a rule set
    approves everything and alerts on nothing (weights left out, or put under another key by mistake). Checked
    on a file and on publish, not on a rule set read back from the topic: the job keeps what was published."""
    if review_at is None or suspect is None:
        return []
    face = max([suspect, *(weights.get(n, 0) for n in FACE_INDICATORS)])
    most = sum(w for n, w in weights.items() if n not in FACE_INDICATORS) + max((p for _, p in bands), default=0)
    if most + face >= review_at:
        return []
    return [
        f"no transaction can reach {name or 'thresholds.review_at'} ({review_at}): every weight, the highest model "
        f"band and the face points together give {most + face}, so everything would be approved"
    ]


def _weights(data: dict, errors: list[str]) -> dict[str, int]:
    """``weights``: points per known indicator; the valid ones only."""
    weights_in = _mapping(data, "weights", errors)
    weights: dict[str, int] = {}
    for name in weights_in:
        if name not in KNOWN_INDICATORS:
            errors.append(f"weights.{name}: unknown indicator (known: {', '.join(sorted(KNOWN_INDICATORS))})")
            continue
        value = _int(weights_in, name, 0, 100, errors, "weights.")
        if value is not None:
            weights[str(name)] = value
    if "buyer_face_mismatch" not in weights and "customer_mismatch" in weights:
        # A rule set written before the face's mismatch had its own name weighed it as customer_mismatch:
        # without this, a published older rule set would score a returner who is not the buyer 0.
        weights["buyer_face_mismatch"] = weights["customer_mismatch"]
    return weights


def _model_bands(data: dict, errors: list[str], published: bool = False) -> list[tuple[int, int]]:
    """``model_bands``: (score, points), highest score first; scores distinct, points not falling as scores rise.
    No bands is ``[]`` (or no key, as for ``weights``): a ``false``, ``0`` or ``{}`` (a typo, a wrong type) quietly
    turned the model score's points off, so it is refused, unless ``published`` (the job keeps what it ran)."""
    bands: list[tuple[int, int]] = []
    raw_bands = data.get("model_bands")
    if raw_bands is None:
        raw_bands = []
    elif not isinstance(raw_bands, list):
        if not (published and not raw_bands):
            errors.append(f"model_bands: must be a list of {{score, points}}, [] for none (got {_shown(raw_bands)})")
        raw_bands = []
    for i, band in enumerate(raw_bands):
        if not isinstance(band, dict) or set(band) != {"score", "points"}:
            errors.append(f"model_bands[{i}]: must be {{score: 0-1000, points: 0-100}}")
            continue
        score = _int(band, "score", 0, 1000, errors, f"model_bands[{i}].")
        points = _int(band, "points", 0, 100, errors, f"model_bands[{i}].")
        if score is not None and points is not None:
            bands.append((score, points))
    bands.sort(reverse=True)
    if len({s for s, _ in bands}) != len(bands):
        errors.append("model_bands: two bands with the same score")
    if any(p_hi < p_lo for (_, p_hi), (_, p_lo) in zip(bands, bands[1:], strict=False)):
        errors.append("model_bands: a higher score must not give fewer points")
    return bands


FACE_KEYS = {
    "watchlist_suspect_points",
    "match_alone_may_block",
    "unavailable_statuses",
    "unavailable_return_indicator",
}


def _face(data: dict, errors: list[str], published: bool = False) -> tuple[int | None, bool, list[str], str | None]:
    """``face``: watchlist suspect points, whether a match alone may block, the statuses that count as
    "no face" (``published``: without those no face stage gives), and the indicator they raise."""
    face = _mapping(data, "face", errors)
    unknown_face = set(face) - FACE_KEYS
    if unknown_face:
        errors.append(f"face: unknown key(s) {', '.join(sorted(map(str, unknown_face)))}")
    suspect = _int(face, "watchlist_suspect_points", 0, 100, errors, "face.", default=60)
    alone = face.get("match_alone_may_block", False)
    if not isinstance(alone, bool):
        errors.append("face.match_alone_may_block: true or false")
        alone = False
    statuses = face.get("unavailable_statuses", ["UNAVAILABLE", "NO_FACE"])
    if published and isinstance(statuses, list):
        statuses = [s for s in statuses if not (isinstance(s, str) and s in _NEVER_PRODUCED_STATUSES)]
    if not isinstance(statuses, list) or not all(isinstance(s, str) and s in FACE_STATUSES for s in statuses):
        errors.append(
            f"face.unavailable_statuses: a list of {', '.join(sorted(FACE_STATUSES))} (the statuses without a "
            "usable face; MATCHED and NO_MATCH are a face seen)"
        )
        statuses = []
    indicator = face.get("unavailable_return_indicator", "no_photo_verification")
    allowed = f"{', '.join(NO_FACE_INDICATORS)}, or null for none"
    if indicator is not None and not (isinstance(indicator, str) and indicator in KNOWN_INDICATORS):
        errors.append(f"face.unavailable_return_indicator: unknown indicator {_shown(indicator)} (allowed: {allowed})")
    elif indicator is not None and indicator not in NO_FACE_INDICATORS:
        errors.append(
            f"face.unavailable_return_indicator: {indicator} does not say a return had no usable face (allowed: "
            f"{allowed}): a camera outage would raise it, a false reason; give no_photo_verification the points "
            "in weights"
        )
    return suspect, alone, statuses, indicator


@dataclass(frozen=True)
class Decision:
    outcome: str
    risk_score: int
    reasons: tuple[str, ...]


def decide(
    tx: dict[str, Any], indicators: dict[str, float], model: ModelResult, face_result: FaceResult, rules: RuleSet
) -> Decision:
    """Combine everything known about a transaction into one outcome with its reasons (every indicator that
    fired; of the face evidence, a suspect match and :data:`FACE_INDICATORS`, only the heaviest adds to the
    risk: they come from one snapshot)."""
    unavailable = face_result.status in rules.unavailable_statuses
    if tx["kind"] == "RETURN" and rules.unavailable_return_indicator and unavailable:
        indicators[rules.unavailable_return_indicator] = 1.0
    points: list[tuple[int, str]] = []
    face: list[tuple[int, str]] = []  # one snapshot's evidence: only the heaviest counts
    weights = rules.weights
    for name, value in indicators.items():
        weight = weights.get(name)
        if weight and value >= 1.0:
            (face if name in FACE_INDICATORS else points).append((weight, name))
    if model.score is not None:
        for at_least, pts in rules.model_bands:
            if model.score >= at_least:
                if pts:
                    points.append((pts, f"model_score>={at_least}"))
                break
    if face_result.status == "MATCHED" and face_result.category == "SUSPECT" and rules.watchlist_suspect_points:
        face.append((rules.watchlist_suspect_points, "watchlist_suspect"))
    risk = min(100, sum(p for p, _ in points) + max((p for p, _ in face), default=0))
    points = sorted(points + face, key=lambda p: (-p[0], p[1]))
    if risk >= rules.block_at:
        outcome = "BLOCK"
    elif risk >= rules.review_at:
        outcome = "REVIEW"
    else:
        outcome = "APPROVE"
    return Decision(outcome=outcome, risk_score=risk, reasons=tuple(name for _, name in points))


# --- the rules topic --------------------------------------------------------------------------


def update_record(rules: RuleSet, yaml_text: str, published_by: str, published_at: int | None = None):
    """The ``RuleSetUpdate`` for a validated rule set (the original text, comments included)."""
    from schemas.records import RuleSetUpdate

    return RuleSetUpdate(
        version=rules.version,
        yaml=yaml_text,
        published_by=published_by,
        published_at=published_at if published_at is not None else now_ms(),
    )


def from_update(value: bytes) -> RuleSet:
    """A ``RuleSetUpdate`` from the rules topic -> validated rule set (raises RuleSetError / DecodeError)."""
    from schemas.records import RuleSetUpdate

    update = RuleSetUpdate.decode(value)
    rules = RuleSet.from_yaml(update.yaml, published=True)
    if rules.version != update.version:
        raise RuleSetError(f"update says version {update.version!r} but its YAML says {rules.version!r}")
    return rules


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Versioned rule sets: validate and publish to the rules topic."
)


@app.command()
def validate(file: Path) -> None:
    """Check a rule set file and print it as the job will read it once published (CG_RULES__VERSION, BLOCK_AT and
    REVIEW_AT override only the file the job starts with, not a published rule set). A file that cannot be read
    or is invalid: one Error line, exit 1."""
    # A RuleSetError is a tool's bad input: run_tool prints it as one ``Error: ...`` line, exit 1 (2 is for usage).
    typer.echo(RuleSet.load(file).to_yaml())


@app.command()
def publish(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    by: Annotated[str | None, typer.Option(help="Who publishes (default: the OS user, else uid:<n>).")] = None,
) -> None:
    """Validate FILE and publish it to the compacted rules topic (key "active"): the job switches to it. An invalid
    FILE: one Error line, exit 1, and nothing is sent (a FILE that does not exist: exit 2)."""
    from infra.settings import get_settings

    text = rule_set_text(file)
    try:
        rules = RuleSet.from_yaml(text)
    except RuleSetError as exc:
        raise RuleSetError(f"{file}: {exc}") from None
    try:
        topic = publish_rules(get_settings(), rules, text, by or os_user())
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"published rule set {rules.version} to {topic}")


def publish_rules(settings: Settings, rules: RuleSet, text: str, by: str, timeout_s: float = 30.0) -> str:
    """Send a validated rule set to the rules topic (key ``active``) and wait for Kafka's ack. The topic must
    exist: an operator's principal writes to ``rules`` only; an admin creates the topics."""
    from infra.clients import kafka as kafka_clients
    from schemas.topics import RULES

    topic = RULES.full_name(settings.kafka.topic_prefix)
    producer = kafka_clients.producer(settings, kafka_clients.IDEMPOTENT)
    kafka_clients.require_topics(producer, settings, topic)
    failures: list[str] = []
    producer.produce(
        topic,
        key=b"active",
        value=update_record(rules, text, by).encode(),
        on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s) or failures:
        raise RuntimeError(f"publish failed: {failures or f'not acknowledged within {timeout_s:.0f} s'}")
    return topic


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
