"""The README's upgrade order ("Upgrade readers before writers") names every process that decodes a record type
it lists, before that type's writer: a reader left out is upgraded last, and dead-letters every record of the new
version as ``unknown_schema`` meanwhile (the watchlist service, left out, let alert snapshots be purged)."""

from __future__ import annotations

import re

from infra.settings import REPO_ROOT
from schemas.indices import ROUTES

SERVICES = {
    "sinks/opensearch/": "the OpenSearch sink",
    "sinks/alerts/": "the alert sender",
    "jobs/cases/": "the case service",
    "jobs/faces/watchlist_service.py": "the watchlist service",
    "jobs/faces/stage.py": "the face stage",
    "jobs/scoring/": "the scoring job",
}
"""Where each process's code lives (the first matching prefix), as the README names it."""
NOT_READERS = {"jobs/model/train.py": "decodes what its own in-process scorer has just encoded, never a topic"}
WRITERS = {"Alert": "the scoring job", "FaceObservation": "the face stage", "ScoredTransaction": "the scoring job"}
DECODES = re.compile(r'\b(\w+)\.decode\(|codec\("(\w+)"\)|Projection, "(\w+)"')
"""A record type's ``Record.decode``, its ``codec(...)`` (also the writers', which are then readers of their own
records: harmless) and a :class:`schemas.codec.Projection`."""


def _paragraph() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("Upgrade readers before writers")
    return " ".join(text[start : text.index("\n\n", start)].split())


def _readers(record_type: str) -> set[str]:
    readers = set()
    for path in sorted(REPO_ROOT.glob("*/**/*.py")):
        rel = path.relative_to(REPO_ROOT).as_posix()
        if not rel.startswith(("jobs/", "sinks/", "producers/")) or rel in NOT_READERS:
            continue
        found = {name for match in DECODES.finditer(path.read_text(encoding="utf-8")) for name in match.groups()}
        if record_type in found or (
            rel == "sinks/opensearch/sink.py" and record_type in {r.topic.record_type for r in ROUTES}
        ):
            service = next((name for prefix, name in SERVICES.items() if rel.startswith(prefix)), None)
            assert service is not None, f"{rel} decodes {record_type}: name its process in SERVICES and the README"
            readers.add(service)
    return readers


def test_the_upgrade_order_names_every_reader_of_each_versioned_record_before_its_writer() -> None:
    paragraph = _paragraph()
    listed = re.findall(r"(\w+) v\d+", paragraph[: paragraph.index(")")])
    assert set(listed) == set(WRITERS), "each record type the paragraph lists needs its writer in WRITERS"
    for record_type, writer in WRITERS.items():
        readers = _readers(record_type)
        for reader in readers - {writer}:
            assert reader in paragraph, f"{reader} reads {record_type} but is not in the upgrade order"
            assert paragraph.index(reader) < paragraph.index(writer), f"{reader} must come before {writer}"


def test_the_watchlist_service_is_a_reader_of_alerts() -> None:
    assert "the watchlist service" in _readers("Alert")
