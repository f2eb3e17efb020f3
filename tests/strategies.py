"""Hypothesis strategies for records that are valid against their Avro schema and hostile in every value.

A producer that passes the schema can still send an empty or a 200 000-character string, a terminal escape, a
right-to-left override or emoji, NaN and infinities, a time of 0, -2^63 or the year 292 million, a union's every
branch, an empty or a huge array or map. Every consumer must take such a record or refuse it with its dead-letter
exception, never raise anything else (the consumer would restart on the same record for ever). These strategies
are built from the ``.avsc`` files themselves, so a field added to a schema is generated too.

Two shapes: :func:`records` (every field hostile: what gets past the decoder) and :func:`mutated` (a valid record
with a few fields made hostile: what gets past the first checks and reaches the code behind them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hypothesis import strategies as st

from schemas.codec import latest_versions

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
HUGE_TEXT = 200_000
"""The longest string drawn: under the job's 256 KiB record limit (``CG_JOB__MAX_MESSAGE_BYTES``) in one-byte
characters, so a record holding one still reaches the code behind the size check."""
BIG_TEXT = 4_097
"""The longest string of a wholly hostile record (:func:`records`), whose every string may be that long: huge ones
(:data:`HUGE_TEXT`) come in a few fields at a time (:func:`mutated`), as more of them are past the record limit."""
HUGE_ITEMS = 2_000
"""The most elements of a huge array or map (copies of one element: cheap to draw, costly to mishandle)."""

HOSTILE_CHARS = ("x", "\x00", "\x1b", "\r\n", "\u202e", "\u200b", "😀", "é", " ", "<", "&", "%", "/", "\ufeff")
HOSTILE_TEXTS = (
    "",
    " ",
    "\t\n",
    "\x00",
    "\x1b[2J\x1b[31mred",
    "c\r\nBcc: thief@evil.test",
    "\u202etxt.exe",
    "\u200b",
    "😀" * 3,
    "👨‍👩‍👧‍👦",
    "e\u0301" * 4,
    "../../etc/passwd",
    "a/b?c#d%2e",
    "<@all> *bold* [x](http://evil.test)",
    "=cmd|' /C calc'!A0",
    "NaN",
    "null",
    "-0",
    "\ud7ff\ue000\uffff",
)
PLAUSIBLE_TEXTS = (
    "store-001",
    "lane-01",
    "tx-1",
    "a-1",
    "subj-tx-1",
    "Q2MV-store-001-lane-01",
    "checkout:tx-1",
    "SALE",
    "RETURN",
    "card",
    "USD",
    "EUR",
    "SUSPECT",
    "VIP",
    "CHECKOUT",
    "ENTRANCE",
    "MATCHED",
    "high",
    "Home & Garden",
    "guard@example.com",
    "josé@exämple.de",
    "203.0.113.7, 10.0.0.2",
    "[2001:db8::1]:443",
    "unknown, 10.0.0.2",
    "model-v1",
    "velocity_exceeded",
    "case-0123456789ab",
)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))
HOSTILE_DOUBLES = (
    -0.0,
    0.0,
    5e-324,
    -5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e12,
    1e15,
    -1.0,
    0.5,
    25.0,
    100.0,
)
HOSTILE_FLOATS = (-0.0, 0.0, 3.4028234663852886e38, -3.4028234663852886e38, -1.0, 1e-45, 0.1)
"""Avro ``float`` values: 32-bit, so the largest finite one is about 3.4e38."""


def hostile_text(max_size: int = HUGE_TEXT) -> st.SearchStrategy[str]:
    """Empty, blank, control characters, RTL and zero-width marks, emoji, markup, path tricks, a huge run of one
    character (up to ``max_size``), arbitrary text, and the plausible ids and labels a valid record holds."""
    sizes = [n for n in (65, 129, 255, 257, 513, 1025, 4097, 70_000, max_size) if n <= max_size]
    huge = st.builds(lambda ch, n: (ch * n)[:n], st.sampled_from(HOSTILE_CHARS), st.sampled_from(sizes))
    return st.one_of(
        st.sampled_from(HOSTILE_TEXTS),
        st.sampled_from(PLAUSIBLE_TEXTS),
        st.builds(lambda a, b: a + b, st.sampled_from(PLAUSIBLE_TEXTS), st.sampled_from(HOSTILE_TEXTS)),
        huge,
        st.text(max_size=24),
    )


def hostile_doubles() -> st.SearchStrategy[float]:
    """NaN and the infinities (a third of the draws), the ends of a double, -0.0, and any double."""
    return st.one_of(st.sampled_from(NON_FINITE), st.sampled_from(HOSTILE_DOUBLES), st.floats())


def hostile_floats() -> st.SearchStrategy[float]:
    """The same for an Avro ``float`` (32-bit)."""
    return st.one_of(st.sampled_from(NON_FINITE), st.sampled_from(HOSTILE_FLOATS), st.floats(width=32))


def hostile_longs(now_ms: int) -> st.SearchStrategy[int]:
    """Epoch-ms times and counts: 0, negative, the ends of a long, far past and far future, and around ``now_ms``."""
    edges = (0, -1, 1, LONG_MIN, LONG_MAX, INT_MAX, 10**13, 10**15, 10**18, 253_402_300_800_000, -62_135_596_800_001)
    return st.one_of(
        st.sampled_from(edges),
        st.sampled_from((now_ms, now_ms - 1, now_ms + 1, now_ms + 10**9, now_ms - 86_400_000, now_ms + 400_000)),
        st.integers(now_ms - 10**9, now_ms + 10**6),
        st.integers(LONG_MIN, LONG_MAX),
    )


def hostile_ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from((0, -1, 1, 2, INT_MIN, INT_MAX, 10**6)), st.integers(INT_MIN, INT_MAX))


def hostile_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from((b"", b"\x00", b"\xff\xfe", b"\xc3\x01" + b"\x00" * 8)),
        st.binary(max_size=32),
        st.builds(lambda n: b"\xff" * n, st.sampled_from((1025, 70_000))),
    )


def _sized(element: st.SearchStrategy[Any], small: st.SearchStrategy[Any] | None) -> st.SearchStrategy[list[Any]]:
    """Empty, a few, or (with ``small``, the element's strategy without huge values) a huge run of copies of one."""
    few = st.lists(element, min_size=1, max_size=4)
    if small is None:
        return st.one_of(st.just([]), few)
    many = st.builds(lambda one, n: [one] * n, small, st.sampled_from((129, 769, HUGE_ITEMS)))
    return st.one_of(st.just([]), few, many)


class _Builder:
    """Strategies for the types of one schema (named types resolved as the schema defines them). Strings up to
    ``max_text``; a builder that is not ``small`` also draws huge arrays and maps, of copies of one small element
    (a huge array of huge strings is past any record limit, and slow)."""

    def __init__(self, now_ms: int, max_text: int, small: bool = False, named: dict[str, Any] | None = None) -> None:
        self.now_ms, self.max_text, self.small = now_ms, max_text, small
        self.named: dict[str, Any] = {} if named is None else named
        self._smaller: _Builder | None = None

    def smaller(self) -> _Builder | None:
        """The builder of a huge collection's one element (``None`` where this one is small already)."""
        if self.small:
            return None
        if self._smaller is None:
            self._smaller = _Builder(self.now_ms, 64, small=True, named=self.named)
        return self._smaller

    def of(self, schema: Any, namespace: str = "") -> st.SearchStrategy[Any]:
        if isinstance(schema, list):
            return st.one_of([self.of(branch, namespace) for branch in schema])
        if isinstance(schema, str):
            return self._primitive(schema, namespace)
        kind = schema["type"]
        if kind == "record":
            self._name(schema, namespace)
            inner = schema.get("namespace", namespace)
            fields = {f["name"]: self.of(f["type"], inner) for f in schema["fields"]}
            return st.fixed_dictionaries(fields)
        if kind == "enum":
            self._name(schema, namespace)
            return st.sampled_from(schema["symbols"])
        if kind == "fixed":
            self._name(schema, namespace)
            return st.binary(min_size=schema["size"], max_size=schema["size"])
        smaller = self.smaller()
        if kind == "array":
            small = smaller.of(schema["items"], namespace) if smaller else None
            return _sized(self.of(schema["items"], namespace), small)
        if kind == "map":
            values = self.of(schema["values"], namespace)
            keys = st.one_of(st.sampled_from(PLAUSIBLE_TEXTS), hostile_text(min(self.max_text, 1025)))
            few = st.dictionaries(keys, values, min_size=1, max_size=4)
            if smaller is None:
                return st.one_of(st.just({}), few)
            many = st.builds(
                lambda v, n: {f"k{i}": v for i in range(n)},
                smaller.of(schema["values"], namespace),
                st.sampled_from((129, HUGE_ITEMS)),
            )
            return st.one_of(st.just({}), few, many)
        return self.of(kind, namespace)  # {"type": "long", "logicalType": ...}

    def _name(self, schema: dict[str, Any], namespace: str) -> None:
        name = schema["name"]
        self.named[name] = schema
        self.named[f"{schema.get('namespace', namespace)}.{name}".lstrip(".")] = schema

    def _primitive(self, name: str, namespace: str) -> st.SearchStrategy[Any]:
        simple: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
            "null": lambda: st.none(),
            "boolean": st.booleans,
            "int": hostile_ints,
            "long": lambda: hostile_longs(self.now_ms),
            "float": hostile_floats,
            "double": hostile_doubles,
            "bytes": hostile_bytes,
            "string": lambda: hostile_text(self.max_text),
        }
        if name in simple:
            return simple[name]()
        schema = self.named.get(name) or self.named[f"{namespace}.{name}"]
        return st.deferred(lambda: self.of(schema, namespace))


def _schema(record_type: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(latest_versions()[record_type].text)
    return parsed


def field_strategies(record_type: str, now_ms: int, max_text: int = BIG_TEXT) -> dict[str, st.SearchStrategy[Any]]:
    """A hostile value's strategy per field of ``record_type`` (its newest schema), strings up to ``max_text``."""
    schema = _schema(record_type)
    builder = _Builder(now_ms, max_text)
    builder.of(schema)  # names every named type it defines, nested ones too
    namespace = schema.get("namespace", "")
    return {f["name"]: builder.of(f["type"], namespace) for f in schema["fields"]}


def records(
    record_type: str,
    now_ms: int,
    fields: Mapping[str, st.SearchStrategy[Any]] | None = None,
    max_text: int = BIG_TEXT,
) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of ``record_type`` (its newest schema) that the codec encodes, every value hostile, strings up to
    ``max_text``; ``fields`` replaces the strategies of the fields it names (to keep an id plausible, say, so the
    record gets further)."""
    return st.fixed_dictionaries({**field_strategies(record_type, now_ms, max_text), **(fields or {})})


def mutated(
    record_type: str,
    valid: Mapping[str, Any] | st.SearchStrategy[Mapping[str, Any]],
    now_ms: int,
    most: int = 3,
    focus: Sequence[str] = (),
) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` (a record of ``record_type`` as a dict, or a strategy of them) with 1 to ``most`` of its fields
    replaced by hostile values of their type, strings up to :data:`HUGE_TEXT`: past the checks a wholly hostile
    record fails first. ``focus``: the fields to choose from (default: all), those a handler sends on, say, so few
    examples find what it does with them."""
    hostile = field_strategies(record_type, now_ms, HUGE_TEXT)
    names = list(focus) or list(hostile)
    bases = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        record = dict(draw(bases))
        for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=most, unique=True)):
            record[name] = draw(hostile[name])
        return record

    return build()


def hostile_records(
    record_type: str,
    valid: Mapping[str, Any] | st.SearchStrategy[Mapping[str, Any]],
    now_ms: int,
    fields: Mapping[str, st.SearchStrategy[Any]] | None = None,
    focus: Sequence[str] = (),
) -> st.SearchStrategy[dict[str, Any]]:
    """Either shape: a wholly hostile record (with ``fields`` kept plausible), or ``valid`` with a few hostile
    fields (among ``focus`` when given); the valid one itself now and then, so a test sees its handler take
    something."""
    bases = valid if isinstance(valid, st.SearchStrategy) else st.just(dict(valid))
    return st.one_of(
        records(record_type, now_ms, fields),
        mutated(record_type, bases, now_ms, focus=focus),
        mutated(record_type, bases, now_ms, most=1, focus=focus),
        bases.map(dict),
    )
