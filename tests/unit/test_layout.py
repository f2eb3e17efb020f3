"""The layout's promise, checked on the source: imports only point down, and nothing imports in a circle.

Layers, bottom up: ``schemas`` (contracts) < ``infra`` (settings, clients, stand-ins, the stack) <
the stages ``producers``, ``jobs``, ``sinks``, which never import each other. Inside ``jobs`` the pure
decision logic (``jobs.scoring``) is the floor the model, the faces, the bot and the Flink wiring stand
on, and only ``jobs.flink`` may touch PyFlink. Every import counts, also one inside a function: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from infra.settings import REPO_ROOT

PACKAGES = ("schemas", "infra", "producers", "jobs", "sinks")
STAGES = {"producers", "jobs", "sinks"}
LAYER = {"schemas": 0, "infra": 1, "producers": 2, "jobs": 2, "sinks": 2}
JOBS_LAYER = {"scoring": 0, "model": 1, "faces": 1, "bot": 2, "flink": 2}
"""Sub-layers of ``jobs``: a package may import its own and lower ones only."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (``a.b.c`` may be a name inside module ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Every import of the module: project modules (resolved) and third-party top-level names."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            out.add(_resolve(name) or name.split(".")[0])
    out.discard(module)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _violation(source: str, target: str) -> str | None:
    top, target_top = source.split(".")[0], target.split(".")[0]
    if target_top not in LAYER:
        return None
    if LAYER[target_top] > LAYER[top]:
        return "imports upward"
    if top in STAGES and target_top in STAGES and top != target_top:
        return "imports another stage"
    mine, theirs = source.split(".")[1:2], target.split(".")[1:2]
    if top == target_top == "jobs" and mine and theirs and {mine[0], theirs[0]} <= JOBS_LAYER.keys():
        high, low = JOBS_LAYER[theirs[0]], JOBS_LAYER[mine[0]]
        if high > low or (high == low and mine != theirs):
            return f"jobs.{mine[0]} imports jobs.{theirs[0]} (sideways or upward)"
    return None


def test_no_module_imports_upward_or_across_stages() -> None:
    bad = sorted(
        f"{source} -> {target}: {why}"
        for source, targets in GRAPH.items()
        for target in targets
        if (why := _violation(source, target))
    )
    assert not bad, "\n".join(bad)


def test_only_the_flink_wiring_imports_pyflink() -> None:
    users = sorted(m for m, targets in GRAPH.items() if "pyflink" in targets and not m.startswith("jobs.flink"))
    assert not users, f"PyFlink outside jobs/flink: {users}"


def test_the_decision_logic_loads_without_flink_or_dlib() -> None:
    heavy = {"pyflink", "dlib", "lightgbm", "catboost"}
    found = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("jobs.scoring") for t in ts & heavy)
    assert not found, "\n".join(found)


def test_no_import_cycles() -> None:
    project = {m: {t for t in targets if t in MODULES} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(project[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(project):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("infra")))
def test_infra_product_modules_import_no_stage(module: str) -> None:
    assert not {t.split(".")[0] for t in GRAPH[module]} & STAGES, GRAPH[module]


def test_the_checker_sees_a_violation() -> None:
    """The rules above would catch the layout this replaced (so they cannot pass vacuously)."""
    assert _violation("producers.webex_bot", "jobs.checkout_inspect") == "imports another stage"
    assert _violation("schemas.records", "infra.settings") == "imports upward"
    assert _violation("jobs.scoring.scorer", "jobs.faces.engine")
    assert _violation("jobs.model.predictors", "jobs.flink.job")
    assert _violation("jobs.flink.job", "jobs.scoring.rules") is None
    assert len(MODULES) > 50
    assert "pyflink" in GRAPH["jobs.flink.job"]
    assert any(t.startswith("jobs.scoring") for m, ts in GRAPH.items() if m.startswith("jobs.flink") for t in ts)
