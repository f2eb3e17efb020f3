"""The live dashboard against the real local OpenSearch, in headless Chromium.

Scored transactions (champion and challenger scores), alerts (one with a snapshot in an ImageStore),
face observations, field labels and model drift reports are indexed into a private index prefix
through the sink's own code (templates, period indices, bulk actions); the app is served by uvicorn
on a free port; Chromium loads the live page and the Models page, waits until the charts are drawn,
and screenshots are kept in ``.stack/screenshots/`` (git-ignored) for a human to look at.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import Message
from opensearchpy import OpenSearch
from PIL import Image, ImageDraw

from infra.clients.image_store import LocalImageStore
from infra.clients.opensearch import make_client
from infra.settings import Settings, get_settings
from schemas.records import Alert, FaceObservation, Label, ModelDrift, Record, ScoredTransaction, make_label
from schemas.topics import ALERTS, FACE_OBSERVATIONS, LABELS, MODEL_DRIFT, SCORED_TRANSACTIONS
from sinks.dashboard.app import Dashboard, create_app
from sinks.opensearch.sink import bulk_once, install_templates, to_actions
from tests.ports import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".stack" / "screenshots"
FACE_PHOTO = REPO / ".." / "shared" / "data" / "faces" / "face_recognition" / "test_images" / "obama.jpg"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STORES = ("S01", "S02", "S03", "S04")
CHAMPION, CHALLENGER = "gbm-20261101-aaaa1111", "gbm-20261120-bbbb2222"
HOUR_MS = 3_600_000


@dataclass
class Indexed:
    """What was indexed, so the test can state what the page must show."""

    transactions: list[ScoredTransaction]
    alerts: list[Alert]
    faces: list[FaceObservation]
    labels: list[Label]
    drift: list[ModelDrift]

    def count(self, outcome: str, store: str | None = None) -> int:
        return sum(1 for t in self.transactions if t.outcome == outcome and store in (None, t.store_id))

    @property
    def value_prevented(self) -> dict[str, float]:
        """Per currency: amounts in different currencies are never added up."""
        out: dict[str, float] = {}
        for t in self.transactions:
            if t.outcome == "BLOCK":
                out[t.currency] = out.get(t.currency, 0.0) + t.amount
        return {currency: round(amount, 2) for currency, amount in out.items()}


def snapshot_jpeg() -> bytes:
    """A real face photo when the shared data is there; otherwise a drawn stand-in (the page only shows it)."""
    if FACE_PHOTO.exists():
        return FACE_PHOTO.read_bytes()
    img = Image.new("RGB", (640, 480), (90, 110, 140))
    ImageDraw.Draw(img).ellipse((220, 120, 420, 360), fill=(225, 190, 160))
    out = io.BytesIO()
    img.save(out, format="JPEG")
    return out.getvalue()


def is_fraud(t: ScoredTransaction) -> bool:
    """The ground truth the seeded field labels tell: blocked sales, and every other review."""
    return t.outcome == "BLOCK" or (t.outcome == "REVIEW" and int(t.transaction_id[-1]) % 2 == 0)


CHALLENGER_LOADED_MIN = 42
"""The challenger was loaded this many minutes ago: the rows before (about 1 in 6 of the window) have no
challenger score, and the newest row names it, so the page finds it holding the role now."""


def model_scores(rng: random.Random, fraud: bool, with_challenger: bool) -> dict[str, Any]:
    """Champion and challenger scores; the challenger separates better."""
    champion = min(1000, max(0, round(rng.gauss(650 if fraud else 320, 190))))
    challenger = min(1000, max(0, round(rng.gauss(820 if fraud else 240, 150))))
    return {
        "model_score": champion,
        "model_version": CHAMPION,
        "challenger_score": challenger if with_challenger else None,
        "challenger_version": CHALLENGER if with_challenger else None,
    }


def make_labels(transactions: list[ScoredTransaction], now_ms: int) -> list[Label]:
    """A verdict for every third transaction, and one for a transaction the window does not hold."""
    labels = [
        make_label(
            transaction_id=t.transaction_id,
            label=int(is_fraud(t)),
            source=("case", "chargeback", "cli")[n % 3],
            decided_at=now_ms - n * 1000,
            decided_by="analyst@store.example",
        )
        for n, t in enumerate(transactions[::3])
    ]
    return [*labels, make_label(transaction_id="tx-from-last-year", label=1, source="chargeback", decided_at=now_ms)]


def make_drift(now_ms: int) -> list[ModelDrift]:
    """Three hourly reports per model: the champion stable, the challenger drifting in the latest hour."""
    hour = now_ms - now_ms % HOUR_MS - HOUR_MS
    out = []
    for version, psis in ((CHAMPION, (0.03, 0.05, 0.04)), (CHALLENGER, (0.06, 0.12, 0.32))):
        for back, score_psi in zip((2, 1, 0), psis, strict=True):
            start = hour - back * HOUR_MS
            features = {"amount": score_psi * 1.3, "velocity_24h": score_psi * 0.8, "items": 0.01, "card_bin": 0.002}
            worst = max(features, key=lambda name: features[name])
            out.append(
                ModelDrift(
                    report_id=f"drift:{version}:{start}",
                    model_version=version,
                    hour_start=start,
                    rows=780 + back,
                    late_rows=3 if back == 0 else 0,
                    score_psi=score_psi,
                    feature_psi=features,
                    worst_feature=worst,
                    worst_psi=features[worst],
                    alert=max(score_psi, features[worst]) >= 0.25,
                    reference_rows=340,
                    created_at=start + HOUR_MS + 300_000,
                )
            )
    return out


def make_data(now_ms: int, images: LocalImageStore) -> Indexed:
    rng = random.Random(7)
    score_rng = random.Random(11)
    transactions = []
    for i in range(240):
        outcome = rng.choices(("APPROVE", "REVIEW", "BLOCK"), weights=(80, 12, 8))[0]
        event_time = now_ms - rng.randint(30_000, 50 * 60_000)
        ttdf = rng.randint(20, 120) + (400 if i % 37 == 0 else 0)
        fraud = outcome == "BLOCK" or (outcome == "REVIEW" and i % 2 == 0)
        transactions.append(
            ScoredTransaction(
                transaction_id=f"tx-{i:05d}",
                event_time=event_time,
                store_id=STORES[i % 4],
                lane_id=f"L{i % 5}",
                kind="RETURN" if i % 19 == 0 else "SALE",
                amount=round(rng.uniform(5, 900), 2),
                currency="EUR" if i % 10 == 3 else "USD",  # mostly USD: USD first, EUR listed beside it
                item_count=1 + i % 4,
                customer_key=f"card:{i % 60}",
                outcome=outcome,
                risk_score={"APPROVE": 10, "REVIEW": 60, "BLOCK": 92}[outcome],
                reasons=("high_value_item",) if outcome != "APPROVE" else (),
                rules_version="builtin-v1",
                ingest_time=event_time + 5,
                decided_at=event_time + ttdf,
                proc_time_ms=ttdf - 8,
                model_time_ms=6,
                ttdf_ms=ttdf,
                billing_state=("CA", "NY", "TX")[i % 3],
                billing_country="US",
                **model_scores(score_rng, fraud, event_time >= now_ms - CHALLENGER_LOADED_MIN * 60_000),
            )
        )
    blocked = [t for t in transactions if t.outcome == "BLOCK"]
    ref = images.put("checkout", blocked[0].transaction_id, snapshot_jpeg())
    alerts = [
        Alert(
            alert_id=f"alert-{t.transaction_id}",
            kind="BLOCKED_TRANSACTION",
            severity="high",
            event_time=t.event_time,
            store_id=t.store_id,
            lane_id=t.lane_id,
            transaction_id=t.transaction_id,
            amount=t.amount,
            currency=t.currency,
            outcome="BLOCK",
            risk_score=t.risk_score,
            reasons=t.reasons,
            snapshot_ref=ref if n == 0 else None,
            summary=f"Blocked {t.transaction_id} at {t.store_id}: {t.amount:.2f} {t.currency}",
        )
        for n, t in enumerate(sorted(blocked, key=lambda t: -t.event_time))
    ]
    faces = [
        FaceObservation(
            observation_id=f"checkout:{t.transaction_id}",
            event_time=t.event_time,
            camera_serial=f"Q2MV-{t.store_id}",
            store_id=t.store_id,
            lane_id=t.lane_id,
            transaction_id=t.transaction_id,
            trigger="CHECKOUT",
            status=("MATCHED" if n % 9 == 0 else "NO_MATCH" if n % 3 else "NO_FACE"),
            category="SUSPECT" if n % 9 == 0 else None,
            similarity=91.0 if n % 9 == 0 else None,
            quality=0.8,
        )
        for n, t in enumerate(transactions[:120])
    ]
    return Indexed(transactions, alerts, faces, make_labels(transactions, now_ms), make_drift(now_ms))


def index_all(client: OpenSearch, prefix: str, data: Indexed) -> None:
    """Through the sink's own path: Avro bytes -> to_actions -> bulk into the period indices."""
    batch: list[Message] = []
    for spec, records in (
        (SCORED_TRANSACTIONS, data.transactions),
        (ALERTS, data.alerts),
        (FACE_OBSERVATIONS, data.faces),
    ):
        records_: list[Record] = list(records)
        batch += [
            Message(topic=spec.full_name(""), partition=0, offset=n, value=r.encode()) for n, r in enumerate(records_)
        ]
    batch += [
        Message(
            topic=LABELS.full_name(""), partition=0, offset=n, key=label.transaction_id.encode(), value=label.encode()
        )
        for n, label in enumerate(data.labels)
    ]
    batch += [
        Message(topic=MODEL_DRIFT.full_name(""), partition=0, offset=n, key=r.report_id.encode(), value=r.encode())
        for n, r in enumerate(data.drift)
    ]
    actions, dead = to_actions(batch, index_prefix=prefix)
    assert dead == []
    result = bulk_once(client, actions)
    assert (result.acknowledged, result.retry, result.rejected) == (len(actions), [], [])
    client.indices.refresh(index=f"{prefix}-*")


@dataclass
class Served:
    url: str
    data: Indexed
    settings: Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = get_settings()
    client = make_client(base.opensearch, timeout_s=30)
    try:
        client.info()
    except Exception as exc:
        pytest.skip(f"OpenSearch at {base.opensearch.url} not reachable ({type(exc).__name__})")
    tmp = tmp_path_factory.mktemp("dashboard")
    prefix = f"dash{uuid.uuid4().hex[:10]}"
    settings = base.isolated(prefix, tmp / "checkpoints")
    images = LocalImageStore(tmp / "images")
    install_templates(client, prefix)
    data = make_data(int(time.time() * 1000), images)
    index_all(client, prefix, data)

    port = free_port()
    app = create_app(settings, Dashboard(settings, images=images))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "dashboard did not start"
        time.sleep(0.05)
    try:
        yield Served(f"http://127.0.0.1:{port}", data, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        client.indices.delete(index=f"{prefix}-*", ignore_unavailable=True)
        for kind in ("transactions", "alerts", "face_observations", "labels", "model_drift"):
            client.indices.delete_index_template(name=f"{prefix}-{kind}", ignore=[404])


def test_api_reports_what_was_indexed(served: Served) -> None:
    data = served.data
    overview = httpx.get(f"{served.url}/api/overview", params={"minutes": 60}, timeout=30).json()
    assert overview["totals"]["transactions"] == len(data.transactions)
    assert overview["outcomes"] == {o: data.count(o) for o in ("APPROVE", "REVIEW", "BLOCK")}
    assert overview["currencies"] == ["USD", "EUR"]
    prevented = overview["totals"]["value_prevented"]
    assert {c: v for c, v in prevented.items() if v} == pytest.approx(data.value_prevented, abs=0.01)
    assert [s["store_id"] for s in overview["stores"]] == list(STORES)
    assert overview["stores_more"] == {"stores": 0, "transactions": 0}
    assert sum(p["count"] for p in overview["series"]) == len(data.transactions)
    assert overview["latency"]["ttdf_ms"]["p99"] > overview["latency"]["ttdf_ms"]["p50"] > 0

    one = httpx.get(f"{served.url}/api/overview", params={"minutes": 60, "store": "S02"}, timeout=30).json()
    assert one["totals"]["transactions"] == sum(1 for t in data.transactions if t.store_id == "S02")
    assert one["all_stores"] == list(STORES) and one["all_stores_more"] == 0

    alerts = httpx.get(f"{served.url}/api/alerts", params={"minutes": 60}, timeout=30).json()
    assert alerts["total"] == len(data.alerts)
    assert alerts["alerts"][0]["alert_id"] == data.alerts[0].alert_id  # newest first
    assert "snapshot_ref" not in alerts["alerts"][0]
    with_snapshot = [a for a in alerts["alerts"] if a["thumbnail"]]
    assert [a["alert_id"] for a in with_snapshot] == [data.alerts[0].alert_id]
    thumb = httpx.get(served.url + with_snapshot[0]["thumbnail"], timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 240
    assert httpx.get(f"{served.url}/api/alerts/{data.alerts[1].alert_id}/snapshot", timeout=30).status_code == 404

    faces = httpx.get(f"{served.url}/api/faces", params={"minutes": 60}, timeout=30).json()
    assert faces["statuses"]["MATCHED"] == sum(1 for f in data.faces if f.status == "MATCHED")
    assert faces["matches_by_category"] == {"SUSPECT": faces["statuses"]["MATCHED"]}


def test_window_anchored_at_the_latest_event_shows_replayed_history(served: Served) -> None:
    # Five minutes ending now hold almost nothing; five minutes ending at the newest event hold data.
    latest = max(t.event_time for t in served.data.transactions)
    anchored = httpx.get(f"{served.url}/api/overview", params={"minutes": 5, "anchor": "latest"}, timeout=30).json()
    assert anchored["window"]["end"] == latest + 1
    assert anchored["totals"]["transactions"] == sum(
        1 for t in served.data.transactions if t.event_time > latest - 5 * 60_000
    )


def test_page_renders_charts_with_data_in_headless_chromium(served: Served) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import expect, sync_playwright

    data = served.data
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{served.url}/?minutes=60", wait_until="networkidle")
            page.wait_for_selector("body[data-renders]", state="attached", timeout=30_000)  # the first render
            thumbs = page.locator("img.thumb")
            for n in range(thumbs.count()):  # every thumbnail loaded
                expect(thumbs.nth(n)).to_have_js_property("complete", True, timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

            assert errors == []
            kpi = page.inner_text("#kpi-transactions .value").replace(",", "").replace("\u202f", "")
            assert int(kpi) == len(data.transactions)
            assert page.locator("#chart-outcomes rect.bar").count() >= 20
            assert page.locator("#chart-donut path.slice").count() == 3
            assert page.locator("#chart-sales path.line").count() == 4  # revenue and prevented, USD and EUR
            assert page.inner_text("#kpi-revenue .value").endswith(" USD")
            assert "EUR" in page.inner_text("#kpi-revenue .more")
            assert page.locator("#chart-latency path.line").count() == 3
            assert page.locator("#chart-stores rect.bar").count() >= len(STORES) * 2
            assert page.locator("#store-table tbody tr").count() == len(STORES)
            assert page.locator("#chart-faces rect.bar").count() >= 10
            shown = min(len(data.alerts), served.settings.dashboard.alerts_shown)
            assert page.locator("#alerts .alert").count() == shown
            assert page.eval_on_selector("img.thumb", "img => img.naturalWidth") > 0
            assert page.locator("#status.error").count() == 0

            # Focusing on one store redraws every panel for that store only.
            # Wait for the render made for that store (its status line names it), not for any render: the
            # page refreshes itself every few seconds, and one of those may land between click and wait.
            page.click("#store-table tbody tr:nth-child(3)")
            expect(page.locator("#status")).to_have_text(re.compile(rf"^store {re.escape(STORES[2])} "), timeout=30_000)
            kpi = page.inner_text("#kpi-transactions .value").replace(",", "").replace("\u202f", "")
            assert int(kpi) == sum(1 for t in data.transactions if t.store_id == STORES[2])
            assert page.input_value("#store") == STORES[2]
            renders = page.get_attribute("body", "data-renders")
            # the counter only grows: another value is a later render
            page.wait_for_selector(f'body:not([data-renders="{renders}"])', state="attached", timeout=30_000)
            kpi = page.inner_text("#kpi-transactions .value").replace(",", "").replace("\u202f", "")
            assert int(kpi) == sum(1 for t in data.transactions if t.store_id == STORES[2])  # and it stays so
            assert page.locator("#chart-stores rect.bar").count() <= 3
            page.screenshot(path=str(SCREENSHOTS / "dashboard-store.png"), full_page=True)
        finally:
            browser.close()


def test_every_page_renders_under_its_content_security_policy_in_headless_chromium(served: Served) -> None:
    """The other browser tests run under the CSP too; this one checks every page against it: each page must
    render (its own marker set, its images loaded) with no script error and
    no "Refused to ..." report, which an inline script, an inline handler or a foreign resource would give."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import sync_playwright

    alert = served.data.alerts[0]
    pages = {
        "/?minutes=60": "body[data-renders]",
        "/models?minutes=60": "body[data-renders]",
        "/pipeline?minutes=60": "body[data-renders]",
        "/cases": "body[data-loaded]",
        f"/alerts/{alert.alert_id}": "body[data-loaded]",
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            for path, rendered in pages.items():
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                problems: list[str] = []
                page.on("pageerror", lambda exc, problems=problems: problems.append(f"error: {exc}"))
                page.on(
                    "console",
                    lambda msg, problems=problems: (
                        problems.append(msg.text)
                        if "Content Security Policy" in msg.text or "Refused to" in msg.text
                        else None
                    ),
                )
                page.goto(f"{served.url}{path}", wait_until="networkidle")
                page.wait_for_selector(rendered, state="attached", timeout=30_000)
                page.wait_for_load_state("networkidle")
                assert problems == [], f"{path}: {problems}"
                page.close()
        finally:
            browser.close()


def test_alert_page_that_messages_link_to_shows_the_alert_its_decision_and_snapshot(served: Served) -> None:
    alert = served.data.alerts[0]
    detail = httpx.get(f"{served.url}/api/alerts/{alert.alert_id}", timeout=30).json()
    assert detail["alert"]["alert_id"] == alert.alert_id
    assert detail["alert"]["thumbnail"] == f"/api/alerts/{alert.alert_id}/snapshot"
    assert detail["transaction"]["transaction_id"] == alert.transaction_id
    assert detail["transaction"]["outcome"] == "BLOCK"
    assert not {"customer_key", "card_bin", "customer_id"} & set(detail["transaction"])
    assert httpx.get(f"{served.url}/api/alerts/no-such-alert", timeout=30).status_code == 404
    large = httpx.get(f"{served.url}/api/alerts/{alert.alert_id}/snapshot", params={"size": "large"}, timeout=30)
    assert 240 < max(Image.open(io.BytesIO(large.content)).size) <= 640

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{served.url}/?minutes=60", wait_until="networkidle")
            page.wait_for_selector("body[data-renders]", state="attached", timeout=30_000)
            page.click("#alerts a.alert >> nth=0")  # the newest alert card leads to its page
            page.wait_for_selector("body[data-loaded='1']", state="attached", timeout=30_000)
            assert page.url == f"{served.url}/alerts/{alert.alert_id}"
            expect(page.locator("img.snapshot")).to_have_js_property("complete", True, timeout=30_000)
            assert page.eval_on_selector("img.snapshot", "img => img.naturalWidth") > 240
            assert page.inner_text('#tx-facts td[data-field="outcome"]') == "BLOCK"
            assert page.inner_text('#alert-facts td[data-field="transaction"]') == alert.transaction_id
            page.screenshot(path=str(SCREENSHOTS / "alert.png"), full_page=True)
        finally:
            browser.close()


def pairwise_auc(scores: list[int], labels: list[int]) -> float:
    """ROC-AUC by its definition (every fraud/legit pair, ties half), to check the dashboard's figure."""
    pos = [x for x, y in zip(scores, labels, strict=True) if y]
    neg = [x for x, y in zip(scores, labels, strict=True) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def expected_evaluation(data: Indexed) -> dict[str, Any]:
    by_id = {t.transaction_id: t for t in data.transactions}
    joined = [(by_id[label.transaction_id], label.label) for label in data.labels if label.transaction_id in by_id]
    challenged = [(t, y) for t, y in joined if t.challenger_score is not None]
    return {
        "labelled": len(joined),
        "fraud": sum(y for _, y in joined),
        "champion_rows": len(joined),
        "champion_auc": pairwise_auc([t.model_score or 0 for t, _ in joined], [y for _, y in joined]),
        "challenger_rows": len(challenged),
        "challenger_auc": pairwise_auc([t.challenger_score or 0 for t, _ in challenged], [y for _, y in challenged]),
        # every transaction the challenger scored, the champion scored too: those are the rows both scored
        "paired_champion_auc": pairwise_auc([t.model_score or 0 for t, _ in challenged], [y for _, y in challenged]),
    }


def test_models_api_compares_champion_and_challenger_on_the_labelled_transactions(served: Served) -> None:
    data, want = served.data, expected_evaluation(served.data)
    models = httpx.get(f"{served.url}/api/models", params={"minutes": 60}, timeout=30).json()
    dist = models["distributions"]
    assert dist["scored"] == len(data.transactions)
    assert dist["champion"]["versions"] == {CHAMPION: len(data.transactions)}
    challenged = sum(1 for t in data.transactions if t.challenger_score is not None)
    assert dist["challenger"]["versions"] == {CHALLENGER: challenged}
    assert sum(dist["champion"]["counts"]) == len(data.transactions)
    assert sum(dist["challenger"]["counts"]) == challenged
    for n, start in enumerate(dist["bins"]):  # each bin holds exactly the scores in [start, start + 50)
        inside = sum(
            1
            for t in data.transactions
            if start <= (t.model_score or 0) < start + 50 or (n == 19 and t.model_score == 1000)
        )
        assert dist["champion"]["counts"][n] == inside

    ev = models["evaluation"]
    assert (ev["labelled"], ev["fraud"]) == (want["labelled"], want["fraud"])
    assert ev["champion"]["rows"] == want["champion_rows"] and ev["challenger"]["rows"] == want["challenger_rows"]
    assert ev["champion"]["auc"] == pytest.approx(want["champion_auc"], abs=1e-4)
    assert ev["challenger"]["auc"] == pytest.approx(want["challenger_auc"], abs=1e-4)
    assert ev["challenger"]["auc"] > ev["champion"]["auc"]  # the seeded challenger separates better
    assert ev["paired"]["rows"] == want["challenger_rows"]
    assert ev["paired"]["champion_auc"] == pytest.approx(want["paired_champion_auc"], abs=1e-4)
    assert ev["paired"]["challenger_auc"] == pytest.approx(want["challenger_auc"], abs=1e-4)
    assert models["labels"] == {
        "total": len(data.labels),
        "fraud": sum(label.label for label in data.labels),
        "sources": models["labels"]["sources"],
        "read": len(data.labels),
        "truncated": False,
    }

    one = httpx.get(f"{served.url}/api/models", params={"minutes": 60, "store": "S02"}, timeout=30).json()
    in_store = {t.transaction_id for t in data.transactions if t.store_id == "S02"}
    assert one["distributions"]["scored"] == len(in_store)
    assert one["evaluation"]["labelled"] == sum(1 for label in data.labels if label.transaction_id in in_store)

    drift = httpx.get(f"{served.url}/api/drift", params={"minutes": 60}, timeout=30).json()
    rows = {m["model_version"]: m for m in drift["models"]}
    assert set(rows) == {CHAMPION, CHALLENGER}
    latest = max(r.hour_start for r in data.drift)
    assert rows[CHALLENGER]["hour_start"] == latest and rows[CHALLENGER]["alert"] is True
    assert rows[CHALLENGER]["score_psi"] == pytest.approx(0.32) and rows[CHALLENGER]["score_band"] == "significant"
    assert rows[CHALLENGER]["worst"][0]["feature"] == "amount"
    assert rows[CHAMPION]["alert"] is False and rows[CHAMPION]["score_band"] == "stable"


def test_models_page_renders_distributions_auc_and_drift_in_headless_chromium(served: Served, tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM}: make setup installs it only when apt can (CG_SETUP__BROWSER)")
    from playwright.sync_api import sync_playwright

    want = expected_evaluation(served.data)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{served.url}/?minutes=60", wait_until="networkidle")
            page.wait_for_selector("body[data-renders]", state="attached", timeout=30_000)
            # the link carries the window once the page has read its controls (syncNav); a click before
            # that (a loaded machine) follows the bare href and never reaches "?minutes="
            page.wait_for_selector('#nav-models[href*="minutes="]', state="attached", timeout=30_000)
            page.click("#nav-models")  # the live page links to the Models page, window kept
            page.wait_for_url("**/models?*", timeout=30_000)
            assert "minutes=60" in page.url
            page.wait_for_selector("body[data-renders]", state="attached", timeout=30_000)  # the Models page's
            shot = tmp_path / "models.png"
            page.screenshot(path=str(shot), full_page=True)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, SCREENSHOTS / "models.png")

            assert errors == []
            assert page.locator("#status.error").count() == 0
            assert page.inner_text("#kpi-champion .value") == CHAMPION
            assert page.inner_text("#kpi-challenger .value") == CHALLENGER
            assert page.locator("#chart-scores rect.bar[data-series=champion]").count() >= 8
            assert page.locator("#chart-scores rect.bar[data-series=challenger]").count() >= 8
            assert page.locator("#score-table tbody tr").count() == 2
            assert page.locator("#chart-auc rect.bar").count() == 2
            auc = page.locator('#auc-table tr[data-row="ROC-AUC"]')
            assert auc.locator("td[data-role=champion]").inner_text() == f"{want['champion_auc']:.3f}"
            assert auc.locator("td[data-role=challenger]").inner_text() == f"{want['challenger_auc']:.3f}"
            paired = page.locator('#auc-table tr[data-row="ROC-AUC, rows both scored"]')
            assert paired.locator("td[data-role=champion]").inner_text() == f"{want['paired_champion_auc']:.3f}"
            rows = page.locator('#auc-table tr[data-row="labelled rows"]')
            assert rows.locator("td[data-role=champion]").inner_text() == str(want["champion_rows"])
            assert page.locator("#drift-table tbody tr").count() == 2
            assert page.locator("#drift-table tbody tr.alerting").count() == 1
            assert page.inner_text("#drift-table tbody tr.alerting td:first-child") == CHALLENGER
            assert page.locator("#drift-table tr.alerting .psi.significant").count() >= 2
            assert page.is_hidden("#drift-none")
        finally:
            browser.close()
