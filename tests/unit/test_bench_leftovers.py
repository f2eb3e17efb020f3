"""``make bench`` fails when it left processes running (tests/bench/run.py), without hiding a failure of its own."""

from __future__ import annotations

import pytest

from infra.processes import MARKER
from tests.bench import run
from tests.bench.run import LEFT_RUNNING_EXIT, bench_processes, exit_status


def test_a_bench_that_succeeded_but_left_processes_exits_non_zero() -> None:
    assert exit_status(None, ["4242 java -cp flink"]) == LEFT_RUNNING_EXIT
    assert exit_status(SystemExit(0), ["4242 java"]) == LEFT_RUNNING_EXIT
    assert exit_status(SystemExit(None), ["4242 java"]) == LEFT_RUNNING_EXIT


def test_nothing_left_keeps_the_exit_as_it_was() -> None:
    assert exit_status(None, []) is None
    assert exit_status(SystemExit(0), []) is None


def test_a_bench_that_failed_keeps_its_own_failure() -> None:
    assert exit_status(SystemExit(1), ["4242 java"]) is None
    assert exit_status(RuntimeError("stage failed"), ["4242 java"]) is None
    assert exit_status(KeyboardInterrupt(), ["4242 java"]) is None


class FakeReaper:
    left: list[str] = []

    def __init__(self, **_: object) -> None:
        pass

    def finish(self) -> list[str]:
        return self.left


@pytest.mark.parametrize(("left", "code"), [(["4242 java"], LEFT_RUNNING_EXIT), ([], 0)])
def test_the_bench_exits_with_the_status_for_what_it_left(monkeypatch, left: list[str], code: int) -> None:
    monkeypatch.setenv(MARKER, "unit-test")  # restored afterwards: the bench sets its own
    monkeypatch.setattr(run, "Reaper", FakeReaper)
    monkeypatch.setattr(FakeReaper, "left", left)
    with pytest.raises(SystemExit) as exc, bench_processes():
        raise SystemExit(0)  # as Typer ends a run that succeeded
    assert exc.value.code == code


def test_an_error_in_the_bench_propagates_even_with_processes_left(monkeypatch) -> None:
    monkeypatch.setenv(MARKER, "unit-test")
    monkeypatch.setattr(run, "Reaper", FakeReaper)
    monkeypatch.setattr(FakeReaper, "left", ["4242 java"])
    with pytest.raises(RuntimeError, match="stage failed"), bench_processes():
        raise RuntimeError("stage failed")


def test_the_bench_cleanup_deletes_its_index_templates_as_well_as_its_indices(monkeypatch, tmp_path) -> None:
    """``make bench`` deleted its ``bench<run>-*`` indices but left the templates ``install_templates`` made."""
    from types import SimpleNamespace

    from infra.settings import Settings
    from schemas.indices import ROUTES

    requests: list[tuple[str, str]] = []
    indices = SimpleNamespace(
        delete=lambda index, ignore_unavailable: requests.append(("delete_index", index)),
        delete_index_template=lambda name: requests.append(("delete_template", name)),
    )
    admin = SimpleNamespace(delete_topics=lambda topics: requests.append(("delete_topics", ",".join(topics))))
    monkeypatch.setattr(run, "make_client", lambda _settings: SimpleNamespace(indices=indices))
    monkeypatch.setattr(run.kafka_clients, "admin", lambda _settings: admin)
    settings = Settings(stack_dir=tmp_path).isolated("bench1200ab", tmp_path / "checkpoints")

    run._cleanup(settings)

    assert ("delete_index", "bench1200ab-*") in requests
    templates = sorted(name for what, name in requests if what == "delete_template")
    assert templates == sorted(route.index("bench1200ab") for route in ROUTES)
    assert all(name.startswith("bench1200ab-") for name in templates), "its own templates only"
