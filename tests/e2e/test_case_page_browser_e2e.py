"""The case queue and the case page in headless Chromium, on the real stack, behind the dashboard's login.

A watch-list subject (with an enrolled reference image) and two watch-list alerts (each with a live
snapshot) are published to private topics; the case service (``jobs.cases.service``) opens a case per alert,
the OpenSearch sink indexes them, and the dashboard (all three real processes) serves them. In Chromium a
guard logs in, finds the first case in the queue, sees the two images side by side and dismisses it; the
second case is dismissed from Webex (a signed command, as the bot publishes it). Both verdicts end as the same
kind of record: the case on ``cases`` and in OpenSearch, and an audit event naming the guard. Screenshots go
to ``.stack/screenshots/`` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from infra import clock
from infra.clients.commands import KafkaCommandPublisher, signed_headers
from infra.clients.control_topics import read_control_topics
from infra.clients.image_store import ImageStore
from infra.clients.opensearch import make_client
from infra.launcher import Child, spawn, wait_for
from infra.metrics import PROCESSES
from infra.settings import REPO_ROOT, Settings
from infra.stack import ensure_topics
from schemas.records import Alert, AuditEvent, BotCommand, Case, WatchlistEntry, case_id_for
from schemas.topics import ALERTS, ALL_TOPICS, AUDIT, CASES, WATCHLIST
from tests.ports import free_port, free_port_block

pytestmark = pytest.mark.e2e

SCREENSHOTS = REPO_ROOT / ".stack" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PHOTOS = REPO_ROOT / ".stack" / "faces" / "face_recognition-1.3.0" / "tests" / "test_images"
GUARD, PASSWORD = "guard@store.example", "e2e pass word"
WAIT_S = 90.0


@dataclass
class Casework:
    settings: Settings
    url: str
    case_ids: tuple[str, str]
    children: dict[str, Child]

    def case(self, case_id: str) -> dict[str, Any] | None:
        try:
            answer = httpx.get(f"{self.url}/api/cases/{case_id}", auth=(GUARD, PASSWORD), timeout=10)
        except httpx.HTTPError:  # the dashboard is still starting
            return None
        return answer.json()["case"] if answer.status_code == 200 else None

    def alive(self) -> bool:
        dead = {name: str(child.log_path) for name, child in self.children.items() if not child.alive}
        assert not dead, f"exited early, see {dead}"
        return True


def produce(settings: Settings, spec, key: str, value: bytes) -> None:
    producer = Producer(dict(settings.kafka.client_config()))
    producer.produce(spec.full_name(settings.kafka.topic_prefix), key=key.encode(), value=value)
    assert producer.flush(15) == 0


@pytest.fixture(scope="module")
def casework(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Casework]:
    if not (PHOTOS / "obama.jpg").exists():
        pytest.skip(f"no face photos at {PHOTOS}: make setup installs them")
    tmp = tmp_path_factory.mktemp("casepage")
    name = f"e2ecasepage{uuid.uuid4().hex[:6]}"
    base = stack.isolated(name, tmp / "checkpoints")
    settings = base.model_copy(
        update={
            "stack_dir": tmp / "stack",  # its own image store and child logs
            "dashboard": base.dashboard.model_copy(
                update={"port": free_port(), "username": GUARD, "password": SecretStr(PASSWORD), "token": None}
            ),
            "webex": base.webex.model_copy(
                update={"allowed_people": GUARD, "command_signing_key": SecretStr(f"e2e-{uuid.uuid4().hex}")}
            ),
            "metrics": base.metrics.model_copy(update={"base_port": free_port_block(len(PROCESSES))}),
        }
    )
    ensure_topics(settings)
    images = ImageStore.from_settings(settings)
    now = clock.now_ms()
    subject = f"{name}-subject"
    reference = images.put("reference", subject, (PHOTOS / "obama2.jpg").read_bytes())
    entry = WatchlistEntry(
        subject_id=subject,
        category="SUSPECT",
        embeddings=[],
        reason="e2e: shoplifting on camera",
        flagged_by=GUARD,
        flagged_at=now,
        reference_image_ref=reference,
    )
    produce(settings, WATCHLIST, subject, entry.encode())
    children: dict[str, Child] = {}
    try:
        children = {
            "case-service": spawn("jobs.cases.service", settings, name=f"{name}-cases"),
            "opensearch-sink": spawn("sinks.opensearch.sink", settings, name=f"{name}-sink"),
            "dashboard": spawn("sinks.dashboard", settings, name=f"{name}-dashboard"),
        }
        case_ids = []
        for n in (1, 2):
            tx = f"{name}-tx-{n}"
            alert = Alert(
                alert_id=f"watchlist:{tx}",
                kind="WATCHLIST_MATCH",
                severity="high",
                event_time=clock.now_ms(),
                store_id="S01",
                summary=f"Possible watch-list match at S01 lane {n}",
                lane_id=f"L{n}",
                transaction_id=tx,
                subject_id=subject,
                category="SUSPECT",
                similarity=70.0 + n,
                snapshot_ref=images.put("checkout", tx, (PHOTOS / "obama.jpg").read_bytes()),
            )
            produce(settings, ALERTS, alert.alert_id, alert.encode())
            case_ids.append(case_id_for(alert.alert_id))
        work = Casework(settings, f"http://127.0.0.1:{settings.dashboard.port}", (case_ids[0], case_ids[1]), children)
        wait_for(lambda: work.alive() and all(work.case(c) for c in case_ids), WAIT_S, interval=1.0, what="both cases")
        yield work
    finally:
        for child in children.values():
            child.stop()
        admin = AdminClient(dict(settings.kafka.client_config()))
        for future in admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]).values():
            with contextlib.suppress(KafkaException):
                future.result(30)
        make_client(settings.opensearch).indices.delete(index=f"{name}-*", ignore_unavailable=True)


def read_all(settings: Settings, spec) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of a private topic, from its start to its end."""
    out: list[tuple[bytes | None, bytes | None]] = []
    read_control_topics(settings, lambda _topic, key, value: out.append((key, value)), specs=(spec,))
    return out


def test_a_guard_dismisses_a_case_on_the_case_page_as_webex_would(casework: Casework) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import expect, sync_playwright

    w = casework
    first, second = w.case_ids
    assert httpx.get(f"{w.url}/cases", timeout=10).status_code == 401  # the login comes first
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                http_credentials={"username": GUARD, "password": PASSWORD}, viewport={"width": 1400, "height": 1000}
            )
            page = context.new_page()
            page.goto(f"{w.url}/cases")
            page.wait_for_selector("body[data-loaded='1']", timeout=30_000)
            page.wait_for_selector(f"tr[data-case='{first}']", timeout=30_000)
            assert page.locator("#kpi-open .value").inner_text() == "2"
            page.screenshot(path=str(SCREENSHOTS / "case-queue.png"), full_page=True)

            page.click(f"tr[data-case='{first}'] a")
            page.wait_for_selector("body[data-loaded='1']", timeout=30_000)
            assert page.locator("td[data-field='state']").inner_text() == "open"
            for box in ("#img-live img", "#img-reference img"):  # the two faces, side by side, really loaded
                try:
                    expect(page.locator(box)).to_have_js_property("complete", True, timeout=30_000)
                    assert page.eval_on_selector(box, "img => img.naturalWidth") > 0  # decoded, not broken
                except Exception:
                    page.screenshot(path=str(SCREENSHOTS / "case-failed.png"), full_page=True)
                    raise AssertionError(page.inner_html(".evidence")) from None
            assert "Deciding as guard@store.example" in page.locator("#decider").inner_text()
            page.screenshot(path=str(SCREENSHOTS / "case-open.png"), full_page=True)

            page.fill("#v-text", "not the same person")
            page.click("button[data-verb='dismiss']")
            page.wait_for_selector("body[data-decided='dismiss']", timeout=60_000)
            assert page.locator("td[data-field='state']").inner_text() == "dismissed"
            assert page.locator("button[data-verb='confirm']").first.is_disabled()
            page.screenshot(path=str(SCREENSHOTS / "case-dismissed.png"), full_page=True)
        finally:
            browser.close()

    # The same verdict from Webex: the signed command the bot publishes for `dismiss <case> <reason>`.
    command = BotCommand(
        command_id=f"webex-msg-{uuid.uuid4().hex}",
        issued_at=clock.now_ms(),
        verb="DISMISS",
        actor=GUARD,
        argument=f"{second} not the same person",
        room_id="room-security",
        source="webex",
    )
    publisher = KafkaCommandPublisher(w.settings)
    try:
        key = w.settings.webex.command_signing_key
        assert key is not None
        publisher(command, signed_headers(command, key.get_secret_value()))
    finally:
        publisher.close()
    wait_for(lambda: w.alive() and (w.case(second) or {}).get("state") == "dismissed", WAIT_S, what="webex dismiss")

    latest = {case.case_id: case for _, value in read_all(w.settings, CASES) if value for case in [Case.decode(value)]}
    by_page, by_webex = latest[first], latest[second]
    for case in (by_page, by_webex):
        assert (case.state, case.verdict, case.updated_by) == ("dismissed", "dismissed", GUARD)
        assert case.verdict_reason == "not the same person" and case.subject_false_matches >= 1
    audits = [AuditEvent.decode(v) for _, v in read_all(w.settings, AUDIT) if v]
    decided = {a.details.get("case_id"): a for a in audits if a.action == "DISMISS" and a.outcome != "FAILED"}
    assert decided[first].actor == decided[second].actor == GUARD
    assert decided[first].command_id.startswith("dashboard-") and decided[second].command_id == command.command_id
    indexed = {c: w.case(c) for c in (first, second)}
    assert {k for k in indexed[first] if indexed[first][k] is not None} == {
        k for k in indexed[second] if indexed[second][k] is not None
    }  # one record shape, whichever way the verdict came
