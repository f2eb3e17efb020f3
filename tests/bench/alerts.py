"""``make bench`` stages for alerts (called from tests/bench/run.py).

1. **alert delivery** -- a backlog of alerts (each with a JPEG snapshot) drained by the alert sender
   process to two channels that each take ``latency_ms`` to answer: a local SMTP server and the local
   Webex API server, both in their own processes. Alerts/s = alerts delivered on *both* channels per
   second, from the first delivery to the last (goal >= 200/s at 50 ms).
   With ``cases``, the case service (``jobs.cases.service``) runs beside the sender on the same alerts: the
   delivery rate against the run without it (issue: no change), cases opened per second, and then one
   signed ``DISMISS`` per case, verdicts applied per second.
2. **transaction -> e-mail** -- live transactions with a high share of fraud patterns through the real
   scoring job and the alert sender to the stack's SMTP server: the time from a blocked transaction's
   event time to the SMTP server accepting its mail (the ledger's delivery time). The job waits up to
   ``job.face_deadline_ms`` for a face observation first, so the goal is p95 <= 2 s + that deadline.

Both run on isolated topics (``bench-alerts<run>.``) and clean them up afterwards.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import httpx
import psutil
import typer
from confluent_kafka import KafkaException
from PIL import Image
from pydantic import SecretStr

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.commands import signed_headers
from infra.clients.control_topics import read_control_topics
from infra.launcher import Child, spawn, start_scoring_job, wait_for
from infra.local import smtp as local_smtp
from infra.local.webex import free_port
from infra.processes import stop_child, stop_children
from infra.settings import Settings
from infra.stack import ensure_topics
from schemas.records import Alert, BotCommand, Case
from schemas.topics import ALERTS, ALL_TOPICS, CASES, COMMANDS, TRANSACTIONS

TOKEN, ROOM = "bench-token", "room-bench"
BENCH_PERSON = "bench@checkout-guard.test"
"""The allow-listed person the verdicts of the cases stage come from."""


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ledger_rows(path: Path) -> list[tuple[str, str, int]]:
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute("SELECT alert_id, channel, at_ms FROM deliveries WHERE state='sent'").fetchall()
    except sqlite3.OperationalError:
        return []


def _bench_settings(base: Settings, tag: str, webex_port: int, smtp_port: int | None) -> Settings:
    run = f"bench-alerts{tag}{time.strftime('%H%M%S')}{uuid.uuid4().hex[:4]}"
    settings = base.isolated(run, base.stack_dir / "bench" / run / "checkpoints")
    work = base.stack_dir / "bench" / run
    smtp = settings.smtp.model_copy(
        update={"to_addresses": f"{run}@checkout-guard.test"} | ({"port": smtp_port} if smtp_port else {})
    )
    return settings.model_copy(
        update={
            "smtp": smtp,
            "webex": settings.webex.model_copy(
                update={"base_url": f"http://127.0.0.1:{webex_port}/v1", "bot_token": SecretStr(TOKEN), "room_id": ROOM}
            ),
            "alerts": settings.alerts.model_copy(update={"ledger_path": work / "ledger.sqlite3"}),
        }
    )


def _start_webex(settings: Settings, port: int, latency_ms: float) -> Child:
    child = spawn(
        "infra.local.webex",
        settings,
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--latency-ms",
        str(latency_ms),
        name="bench-local-webex",
    )

    def ready() -> bool:
        try:
            return (
                httpx.get(
                    f"http://127.0.0.1:{port}/v1/people/me", timeout=2, headers={"Authorization": f"Bearer {TOKEN}"}
                ).status_code
                == 200
            )
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 30, what="the local Webex server")
    except BaseException:
        stop_child(child)
        raise
    return child


def _cpu_s(child: Child) -> float:
    """CPU seconds (user + system) a child has used so far."""
    try:
        times = psutil.Process(child.proc.pid).cpu_times()
        return times.user + times.system
    except psutil.Error:
        return float("nan")


def _cleanup(settings: Settings, children: list[Child]) -> None:
    """Stop every child and all it started (``infra.processes``: even those that left its process group),
    then drop the run's topics and files."""
    stop_children(children)
    admin = kafka_clients.admin(settings)  # kept alive until the deletes are confirmed
    for future in admin.delete_topics([t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS]).values():
        with contextlib.suppress(KafkaException):
            future.result(30)
    shutil.rmtree(settings.alerts.ledger_path.parent, ignore_errors=True)  # the run's ledger, mails, checkpoints


def _latest_cases(settings: Settings) -> dict[str, Case]:
    """The latest version of every case on the run's cases topic."""
    cases: dict[str, Case] = {}

    def keep(_topic: str, _key: bytes | None, value: bytes | None) -> None:
        if value:
            case = Case.decode(value)
            cases[case.case_id] = case

    read_control_topics(settings, keep, timeout_s=60.0, specs=(CASES,))
    return cases


def _cases_until(settings: Settings, done: Callable[[dict[str, Case]], bool], timeout_s: float) -> dict[str, Case]:
    deadline = time.monotonic() + timeout_s
    while True:
        cases = _latest_cases(settings)
        if done(cases) or time.monotonic() > deadline:
            return cases
        time.sleep(1.0)


def _verdicts(settings: Settings, cases: dict[str, Case]) -> dict:
    """One signed ``DISMISS`` per case, produced as fast as Kafka takes them; verdicts/s from the first command
    to the last case the case service updated."""
    key = settings.webex.command_signing_key.get_secret_value() if settings.webex.command_signing_key else ""
    producer = kafka_clients.producer(settings, kafka_clients.IDEMPOTENT, linger_ms=5)
    topic = COMMANDS.full_name(settings.kafka.topic_prefix)
    start = clock.now_ms()
    for n, case_id in enumerate(cases):
        command = BotCommand(f"bench-verdict-{n}", clock.now_ms(), "DISMISS", BENCH_PERSON, f"{case_id} bench")
        producer.produce(
            topic, key=command.command_id.encode(), value=command.encode(), headers=signed_headers(command, key)
        )
        producer.poll(0)
    producer.flush(30)
    decided = _cases_until(settings, lambda c: sum(x.state == "dismissed" for x in c.values()) >= len(cases), 600)
    done = [c for c in decided.values() if c.state == "dismissed"]
    last = max((c.updated_at for c in done), default=start)
    return {"verdicts": len(done), "verdicts_per_s": len(done) / max((last - start) / 1000, 1e-3)}


def alert_delivery(
    base: Settings, alerts: int = 3000, latency_ms: float = 50.0, split: bool = False, cases: bool = False
) -> dict:
    """Alerts/s delivered to both channels when each answers in ``latency_ms``; ``split``: one sender
    process per channel (``CG_ALERTS__CHANNELS=email`` / ``=webex``) instead of one for both; ``cases``: the
    case service runs too (then cases opened/s and, after the deliveries, verdicts applied/s)."""
    webex_port, smtp_port = free_port(), free_port()
    settings = _bench_settings(base, "c" if cases else "d", webex_port, smtp_port)
    if cases:
        settings = settings.model_copy(
            update={
                "webex": settings.webex.model_copy(
                    update={"command_signing_key": SecretStr(uuid.uuid4().hex), "allowed_people": BENCH_PERSON}
                )
            }
        )
    ensure_topics(settings)
    mail = settings.stack_dir / "bench" / settings.kafka.topic_prefix.rstrip(".") / "mail"
    children: list[Child] = []
    try:
        children.append(_start_webex(settings, webex_port, latency_ms))
        children.append(
            spawn(
                "infra.local.smtp",
                settings,
                f"--mail-dir={mail}",
                "--port",
                str(smtp_port),
                "--latency-ms",
                str(latency_ms),
                name="bench-local-smtp",
            )
        )
        wait_for(lambda: local_smtp.healthy("127.0.0.1", smtp_port), 30, what="the local SMTP server")
        out = io.BytesIO()
        Image.new("RGB", (640, 480), (90, 120, 150)).save(out, format="JPEG")
        from infra.clients.image_store import ImageStore

        ref = ImageStore.from_settings(settings).put("checkout", "bench-snapshot", out.getvalue())
        producer = kafka_clients.producer(settings, linger_ms=5)
        topic = ALERTS.full_name(settings.kafka.topic_prefix)
        now = clock.now_ms()
        for i in range(alerts):
            alert = Alert(
                alert_id=f"blocked:bench-{i}",
                kind="BLOCKED_TRANSACTION",
                severity="high",
                event_time=now,
                store_id=f"S{i % 8:03d}",
                lane_id=f"L{i % 6:02d}",
                transaction_id=f"bench-{i}",
                amount=100.0 + i,
                currency="EUR",
                outcome="BLOCK",
                risk_score=90,
                reasons=("return_exceeds_sale", "model_score>=900"),
                snapshot_ref=ref,
                summary="bench",
            )
            producer.produce(topic, key=alert.alert_id.encode(), value=alert.encode())
            producer.poll(0)
        producer.flush(30)
        if cases:
            children.append(spawn("jobs.cases.service", settings, name="bench-case-service"))
        if split:
            for channel in ("email", "webex"):
                own = settings.model_copy(update={"alerts": settings.alerts.model_copy(update={"channels": channel})})
                children.append(spawn("sinks.alerts.sender", own, name=f"bench-alert-sender-{channel}"))
        else:
            children.append(spawn("sinks.alerts.sender", settings, name="bench-alert-sender"))
        ledger = settings.alerts.ledger_path
        wait_for(lambda: _ledger_rows(ledger), 120, interval=0.05, what="the first delivery")
        wait_for(lambda: len(_ledger_rows(ledger)) >= 2 * alerts, 600, interval=0.2, what="every delivery")
        rows = _ledger_rows(ledger)
        done_at: dict[str, int] = {}
        for alert_id, _channel, at_ms in rows:
            done_at[alert_id] = max(done_at.get(alert_id, 0), at_ms)
        first, last = min(at for _, _, at in rows), max(done_at.values())
        cpu_ms = {c.name: round(_cpu_s(c) * 1000 / alerts, 2) for c in children}
        webex_messages = len(httpx.get(f"http://127.0.0.1:{webex_port}/_local/messages", timeout=30).json()["items"])
        mails = len(list(mail.glob("*.eml")))
        case_figures: dict = {}
        if cases:
            opened = _cases_until(settings, lambda c: len(c) >= alerts, 300)
            times = [c.opened_at for c in opened.values()]
            span_s = (max(times) - min(times)) / 1000 if times else 0.0
            case_figures = {
                "cases": len(opened),
                "cases_per_s": len(opened) / max(span_s, 1e-3),
                **_verdicts(settings, opened),
            }
        return {
            "alerts": alerts,
            "channel_latency_ms": latency_ms,
            "alerts_per_s": alerts / ((last - first) / 1000),
            "seconds": (last - first) / 1000,
            "webex_messages": webex_messages,
            "mails": mails,
            "concurrency_per_channel": settings.alerts.concurrency,
            "cpu_ms_per_alert": cpu_ms,
            "split": split,
            "with_cases": cases,
            **case_figures,
            "load_average_1m": psutil.getloadavg()[0],
            "cpus": psutil.cpu_count(),
        }
    finally:
        _cleanup(settings, children)


def transaction_to_email(base: Settings, rate: float = 20.0, seconds: int = 30, fraud_share: float = 0.3) -> dict:
    """Event time of a blocked transaction -> its mail accepted by the stack's SMTP server, live."""
    from infra.local.pos_generator import PosGenerator

    webex_port = free_port()
    settings = _bench_settings(base, "l", webex_port, None)
    settings = settings.model_copy(update={"job": settings.job.model_copy(update={"starting_offsets": "latest"})})
    ensure_topics(settings)
    children: list[Child] = []
    try:
        children.append(_start_webex(settings, webex_port, 0.0))
        children.append(start_scoring_job(settings, name="bench-alerts-job"))
        children.append(spawn("sinks.alerts.sender", settings, name="bench-alert-sender-live"))
        producer = kafka_clients.producer(settings, linger_ms=0)
        topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
        gen = PosGenerator(seed=11, stores=4, customers=300, fraud_share=fraud_share, tx_per_second=rate, diurnal=False)
        ledger = settings.alerts.ledger_path

        def send(count: int, sent: dict[str, int]) -> None:
            t0 = time.perf_counter()
            for n in range(count):
                delay = t0 + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                tx = replace(next(gen), event_time=clock.now_ms())
                producer.produce(topic, key=f"{tx.store_id}/{tx.lane_id}", value=tx.encode())
                producer.poll(0)
                sent[tx.transaction_id] = tx.event_time
            producer.flush(10)

        warm: dict[str, int] = {}
        deadline = time.monotonic() + 180
        while not _ledger_rows(ledger) and time.monotonic() < deadline:  # until the job runs and blocks something
            send(int(rate), warm)
        sent: dict[str, int] = {}
        send(int(rate * seconds), sent)
        settle = settings.job.face_deadline_ms / 1000 + 15
        time.sleep(settle)
        latencies = []
        for alert_id, channel, at_ms in _ledger_rows(ledger):
            tx_id = alert_id.removeprefix("blocked:")
            if channel == "email" and tx_id in sent:
                latencies.append(at_ms - sent[tx_id])
        return {
            "rate": rate,
            "seconds": seconds,
            "transactions": len(sent),
            "emails": len(latencies),
            "face_deadline_ms": settings.job.face_deadline_ms,
            "p50_ms": _percentile(latencies, 50),
            "p95_ms": _percentile(latencies, 95),
            "max_ms": max(latencies, default=float("nan")),
        }
    finally:
        _cleanup(settings, children)


def report_rows(results: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "delivery" in results:
        d = results["delivery"]
        rows.append(
            (
                f"alerts delivered, both channels at {d['channel_latency_ms']:.0f} ms, one sender (alerts/s)",
                f"{d['alerts_per_s']:,.0f}",
                ">= 200",
            )
        )
        sender_ms = d["cpu_ms_per_alert"].get("bench-alert-sender", float("nan"))
        rows.append(
            (
                "alert sender CPU per alert, both channels (ms) -> alerts/s per core",
                f"{sender_ms:.2f} -> {1000 / sender_ms:,.0f}",
                "",
            )
        )
    if "delivery_split" in results:
        d = results["delivery_split"]
        rows.append(
            ("alerts delivered, one sender process per channel (alerts/s)", f"{d['alerts_per_s']:,.0f}", ">= 200")
        )
    if "delivery_cases" in results:
        d = results["delivery_cases"]
        plain = results.get("delivery", {}).get("alerts_per_s")
        ratio = f" = {d['alerts_per_s'] / plain:.2f}x without" if plain else ""
        rows.append(
            ("alerts delivered with the case service running (alerts/s)", f"{d['alerts_per_s']:,.0f}{ratio}", "1.0x")
        )
        rows.append(
            (
                f"cases opened / verdicts applied per s ({d.get('cases', 0)} cases)",
                f"{d.get('cases_per_s', float('nan')):,.0f} / {d.get('verdicts_per_s', float('nan')):,.0f}",
                "",
            )
        )
    if "to_email" in results:
        e = results["to_email"]
        rows.append(
            (
                f"transaction -> e-mail p50/p95 ({e['emails']} mails, face wait {e['face_deadline_ms']} ms)",
                f"{e['p50_ms']:.0f} / {e['p95_ms']:.0f}",
                f"p95 <= {2000 + e['face_deadline_ms']}",
            )
        )
    return rows


def bench_for_make(base: Settings) -> dict:
    return {
        "delivery": alert_delivery(base),
        "delivery_split": alert_delivery(base, split=True),
        "delivery_cases": alert_delivery(base, cases=True),
        "to_email": transaction_to_email(base),
    }


def main(
    stage: Annotated[str, typer.Argument(help="delivery, split, cases, email or all.")] = "all",
) -> None:
    """The alert stages of ``make bench``: STAGE is delivery, split, cases, email or all (the default); prints JSON
    and the report rows."""
    import json

    from infra.settings import get_settings

    s = get_settings()
    stages = {
        "delivery": lambda: {"delivery": alert_delivery(s)},
        "split": lambda: {"delivery_split": alert_delivery(s, split=True)},
        "cases": lambda: {"delivery": alert_delivery(s), "delivery_cases": alert_delivery(s, cases=True)},
        "email": lambda: {"to_email": transaction_to_email(s)},
    }
    result = stages[stage]() if stage in stages else bench_for_make(s)
    print(json.dumps(result, indent=2))
    for row in report_rows(result):
        print(" | ".join(row))


if __name__ == "__main__":
    typer.run(main)
