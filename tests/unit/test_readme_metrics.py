"""The metrics the README documents are the ones the code serves, both ways: an operator who builds an alert or a
panel from the README must find its series, and every series served must be explained there."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from infra import metrics
from jobs.flink import job_metrics
from schemas.codec import latest_versions

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The README's text under ``### title`` up to the next heading."""
    start = README.index(f"### {title}\n")
    end = README.index("\n#", start + 4)
    return README[start:end]


def served_process_metrics() -> set[str]:
    """Every name ``infra.metrics`` exposes, as a scrape shows it (a counter with ``_total``)."""
    names = {metrics.CONSUMER_LAG, metrics.LAG_READ_OK, metrics.LAG_AGE}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(f"{value._name}_total")
        elif isinstance(value, Gauge | Histogram):
            names.add(value._name)
    return names


def test_the_readme_names_every_process_metric_served_and_no_other() -> None:
    documented = set(re.findall(r"\bcg_[a-z_]+\b", section("Metrics and health of every process")))
    assert documented == served_process_metrics()
    assert set(re.findall(r"\bcg_[a-z_]+\b", README)) <= served_process_metrics(), "a name elsewhere in the README"


def test_the_readme_names_every_scoring_job_metric_served_and_no_other() -> None:
    text = section("The scoring job's metrics")
    documented = set(re.findall(r"^- `([a-z_]+)\{([a-z]+)=", text, re.MULTILINE))
    assert documented == {(f"{label}_{family}", label) for family, label in job_metrics.LABELS.items()}
    timings = set(re.findall(r"^- `([a-z_]+)_p50` / `_p99`", text, re.MULTILINE))
    assert timings == {prefix for prefix, _ in job_metrics.TIMINGS}
    assert job_metrics.QUANTILES == (50, 99)


def documented_kinds(process: str, metric: str) -> set[str]:
    """The ``kind`` values the README lists for ``metric`` in ``process``'s bullet."""
    line = next(
        line for line in section("Metrics and health of every process").splitlines() if f"**{process}**" in line
    )
    values = re.search(rf"`{metric}\{{kind=([a-z_|]+)\}}`", line)
    assert values is not None, f"{process}: {metric} lists no kinds"
    return set(values.group(1).split("|"))


def test_the_readme_lists_every_kind_of_input_the_watchlist_service_counts() -> None:
    """The service counts every command by its verb (the case service's ones and ``unknown`` too), alerts, and
    ``invalid``: an operator summing the README's kinds missed the case verbs."""
    verb = next(f for f in latest_versions()["BotCommand"].parsed["fields"] if f["name"] == "verb")
    counted = {symbol.lower() for symbol in verb["type"]["symbols"]} | {"alert", "invalid"}
    assert documented_kinds("watchlist-service", "cg_records_in_total") == counted
