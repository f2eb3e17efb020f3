"""The state bench (``tests/bench/state.py``) builds the scoring job's state maps directly; these checks
keep that builder equal to what :class:`DecisionCore` itself keeps, at small N, including where the
retention settings expire receipts, buyer faces and customer profiles."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from infra.settings import RulesSettings
from jobs.scoring import features
from tests.bench import state

SHORT = RulesSettings(receipt_retention_days=3, customer_retention_days=4, receipt_face_retention_hours=12)
"""Retentions short enough that a 20-day history expires receipts, faces and profiles."""
FOREVER = RulesSettings(receipt_retention_days=10**6, customer_retention_days=10**6, receipt_face_retention_hours=1e9)


def test_the_built_state_is_the_jobs_at_the_default_retentions():
    res = state.validate(3000)
    assert res["equal"], res["maps"]
    assert res["maps"]["receipts"]["job"] > 2500 and res["maps"]["customers"]["job"] > 100
    assert res["counts"]["faces_kept"] > 0 and res["counts"]["faces_dropped"] > 0


def test_the_built_state_is_the_jobs_where_everything_expires():
    res = state.validate(4000, SHORT, days=20.0, stores=10, return_share=0.15)
    assert res["equal"], res["maps"]
    counts = res["counts"]
    assert counts["receipts_dropped"] > 0 and counts["customers_dropped"] > 0 and counts["faces_dropped"] > 0


def test_a_difference_is_noticed(monkeypatch):
    monkeypatch.setattr(state, "_build_stores", lambda hist, rules, emit: None)
    res = state.validate(1000)
    assert not res["equal"]
    assert res["maps"]["stores"]["keys_differ"] == res["maps"]["stores"]["job"] > 0


@pytest.mark.parametrize("days", [120.0, 400.0])
def test_serialized_entries_load_back_and_sizes_add_up(tmp_path, days):
    hist = state.make_history(state.HistorySpec(transactions=6000, days=days, stores=20))
    built: dict[str, dict] = {}
    every: dict[str, int] = {}

    def emit(name, key, value, kept):
        every[name] = every.get(name, 0) + len(pickle.dumps(value)) + len(key.encode())
        if kept:
            built.setdefault(name, {})[key] = value

    state.build_state(hist, state.RulesSettings(), emit)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "forever").mkdir()
    one = state.serialize_state(hist, state.RulesSettings(), tmp_path / "one")
    two = state.serialize_state(hist, state.RulesSettings(), tmp_path / "two", workers=2)
    assert one == two
    loaded = state.load_maps(tmp_path / "one")
    for name in state.STATE_MAPS:
        assert loaded[name].keys() == built.get(name, {}).keys()
        sizes = one["maps"][name]
        assert sizes["entries"] == len(loaded[name])
        assert sizes["value_bytes"] == sum(len(pickle.dumps(v)) for v in loaded[name].values())
    # "without retention": exact while the history is within the retention, an estimate beyond it
    forever = state.serialize_state(hist, FOREVER, tmp_path / "forever")
    unbounded = sum(m["all_value_bytes"] + m["all_key_bytes"] for m in one["maps"].values())
    exact = sum(m["value_bytes"] + m["key_bytes"] for m in forever["maps"].values())
    assert unbounded == exact if days <= 120 else abs(unbounded / exact - 1) < 0.01


def test_a_buyer_face_adds_a_fixed_size():
    # FACE_LEN BINFLOATs; MARK, TUPLE, MEMOIZE in place of None
    assert state.face_pickle_bytes() == state.FACE_LEN * 9 + 2


def test_the_largest_n_that_fits_memory_and_time():
    gib = 2**30
    assert state.feasible(10_000_000, 0, 2, available=64 * gib) == (10_000_000, None)
    n, why = state.feasible(10_000_000, 0, 2, available=4 * gib)
    assert n == 2_000_000 and "GiB" in (why or "")
    n, why = state.feasible(10_000_000, 180, 2, available=64 * gib, per_tx_s=60e-6)
    assert n == 2_000_000 and "budget" in (why or "")


def _reordered(cls: type) -> type:
    """``cls`` with its fields in reverse order (its methods kept): what a field added or moved makes of a
    constructor called by position."""
    made = {"__init__", "__repr__", "__eq__", "__slots__", "__match_args__", "__hash__", "__getstate__"}
    made |= {"__setstate__", "__dict__", "__weakref__", "__dataclass_fields__", "__dataclass_params__"}
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in vars(cls).items() if k not in made and k not in names}
    specs = []
    for f in reversed(dataclasses.fields(cls)):
        default = (
            dataclasses.field(default_factory=f.default_factory)
            if f.default_factory is not dataclasses.MISSING
            else dataclasses.field(default=f.default)
        )
        specs.append((f.name, f.type, default))
    return dataclasses.make_dataclass(cls.__name__, specs, namespace=kept, slots=True)


def test_the_builder_fills_the_state_classes_by_field_name(monkeypatch):
    hist = state.make_history(state.HistorySpec(transactions=1500, days=10.0, stores=5))

    def build() -> dict[tuple[str, str], dict]:
        out: dict[tuple[str, str], dict] = {}

        def emit(name, key, value, kept):
            out[(name, key)] = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}

        state.build_state(hist, SHORT, emit)
        return out

    before, face = build(), state.face_pickle_bytes()
    for cls in (features.Receipt, features.StoreActivity, features.CustomerProfile):
        monkeypatch.setattr(features, cls.__name__, _reordered(cls))
    assert build() == before
    assert state.face_pickle_bytes() == face
