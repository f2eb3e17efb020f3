"""Camera benchmarks: snapshot round trips against the local camera, and the face stage's throughput.

``cameras(settings)`` returns the numbers (``make bench`` can call it); ``python -m tests.bench.cameras``
prints them. Measured in one run so the ratios are comparable:

- snapshot round trips/s (generateSnapshot + poll until the JPEG) with ``workers`` concurrent clients,
  and their p50/p95 latency, with the local camera's "not ready" poll but no rate limit;
- face analysis of one 640x480 frame with a face (p50/p95 ms, one thread);
- face stage end to end on Kafka: a backlog of checkout transactions -> observations/s.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import typer
from rich.console import Console

from infra import clock
from infra.clients import kafka as kafka_clients
from infra.clients.meraki import MerakiClient, camera_for_lane
from infra.local.camera import LocalCameraServer, load_people
from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack import ensure_topics, up
from jobs.faces.stage import FaceStageRunner, build_stage
from schemas.records import FaceObservation, PosTransaction
from schemas.topics import FACE_OBSERVATIONS, TRANSACTIONS

console = Console(stderr=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def snapshot_round_trips(settings: Settings, seconds: float, workers: int) -> dict:
    client = MerakiClient.from_settings(settings)
    serials = [camera_for_lane(settings, "store-001", f"lane-{i:02d}") for i in range(1, 9)]
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.snapshot(serials[i % len(serials)])
            with lock:
                latencies.append((time.perf_counter() - t0) * 1000)

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers)))
    client.close()
    return {
        "snapshots_per_s": len(latencies) / (time.monotonic() - started),
        "workers": workers,
        "p50_ms": _pct(latencies, 0.5),
        "p95_ms": _pct(latencies, 0.95),
    }


def face_analysis(settings: Settings, camera: LocalCameraServer, frames: int) -> dict:
    from jobs.faces.engine import FaceEngine

    engine = FaceEngine(settings.faces)
    scene = camera.camera.scene
    now = clock.now_ms()
    person = sorted(scene.people)[0]
    scene.add_visit(person, "store-bench", "lane-01", now - 60_000, now - 30_000, now + 600_000)
    client = MerakiClient.from_settings(settings)
    image = client.snapshot(camera_for_lane(settings, "store-bench", "lane-01"), now - 10_000).image
    client.close()
    times = []
    for _ in range(frames):
        t0 = time.perf_counter()
        faces = engine.analyse(image)
        times.append((time.perf_counter() - t0) * 1000)
    return {"frames": frames, "p50_ms": _pct(times, 0.5), "p95_ms": _pct(times, 0.95), "faces_found": len(faces)}


def face_stage_throughput(settings: Settings, camera: LocalCameraServer, count: int) -> dict:
    """A backlog of ``count`` transactions (each with a shopper at its lane) through the running stage."""
    scene = camera.camera.scene
    people = sorted(scene.people)
    now = clock.now_ms()
    producer = kafka_clients.producer(settings, kafka_clients.IDEMPOTENT, linger_ms=5)
    topic = TRANSACTIONS.full_name(settings.kafka.topic_prefix)
    for i in range(count):
        lane = f"lane-{i % 8 + 1:02d}"
        pay = now - 30_000 + i * 10
        scene.add_visit(people[i % len(people)], "store-bench", lane, pay - 5_000, pay, pay + 2_000, visit_id=f"b{i}")
        tx = PosTransaction(f"bench-{uuid.uuid4().hex[:8]}-{i}", pay, "store-bench", lane, "SALE", 9.99, "USD")
        producer.produce(topic, tx.encode(), key=f"store-bench/{lane}".encode())
    producer.flush(30)
    consumer = kafka_clients.consumer(settings, f"bench-{uuid.uuid4().hex}", auto_offset_reset="earliest")
    consumer.subscribe([FACE_OBSERVATIONS.full_name(settings.kafka.topic_prefix)])
    stage, client = build_stage(settings)
    runner = FaceStageRunner(settings, stage)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    statuses: dict[str, int] = {}
    deadline = started + 600
    try:
        while sum(statuses.values()) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                status = FaceObservation.decode(msg.value()).status
                statuses[status] = statuses.get(status, 0) + 1
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(60)
        consumer.close()
        client.close()
    return {
        "observations": sum(statuses.values()),
        "observations_per_s": sum(statuses.values()) / elapsed,
        "statuses": statuses,
        "snapshot_workers": settings.cameras.snapshot_workers,
        "analysis_workers": settings.cameras.analysis_workers,
    }


def cameras(
    base: Settings | None = None, seconds: float = 10.0, workers: int = 8, frames: int = 30, backlog: int = 200
) -> dict:
    """All camera measurements in one run (own topics, own local camera on a free port)."""
    base = base or get_settings()
    up(base)
    run_id = time.strftime("%H%M%S") + uuid.uuid4().hex[:4]
    settings = base.isolated(f"benchcam{run_id}", base.stack_dir / "bench" / run_id / "checkpoints")
    settings = settings.model_copy(
        update={
            "cameras": settings.cameras.model_copy(
                update={
                    "local_port": _free_port(),
                    "local_rate_limit_per_s": 1e6,
                    "poll_interval_s": 0.05,
                    "face_stage_offset_reset": "earliest",
                    "mqtt_topic_prefix": f"benchcam{run_id}",
                }
            )
        }
    )
    ensure_topics(settings)
    from infra.local.camera import default_photo_dirs

    camera = LocalCameraServer(settings, publish=False, people=load_people(default_photo_dirs(settings))).start()
    try:
        console.print(f"[bold]cameras 1/3[/]: snapshot round trips, {workers} clients for {seconds:.0f} s")
        snaps = snapshot_round_trips(settings, seconds, workers)
        console.print(f"[bold]cameras 2/3[/]: face analysis of a 640x480 frame x{frames}")
        analysis = face_analysis(settings, camera, frames)
        console.print(f"[bold]cameras 3/3[/]: face stage on Kafka, backlog of {backlog} checkouts")
        stage = face_stage_throughput(settings, camera, backlog)
    finally:
        camera.stop()
        from schemas.topics import ALL_TOPICS

        admin = kafka_clients.admin(settings)  # kept alive until the deletes are done
        futures = admin.delete_topics(
            [t.full_name(settings.kafka.topic_prefix) for t in ALL_TOPICS], operation_timeout=10
        )
        for future in futures.values():
            future.exception(30)  # wait: the request dies with the client otherwise
    return {"run": run_id, "snapshots": snaps, "face_analysis": analysis, "face_stage": stage}


def main(
    seconds: Annotated[float, typer.Option(help="Duration of the snapshot stage.")] = 10.0,
    workers: Annotated[int, typer.Option(help="Concurrent snapshot clients.")] = 8,
    backlog: Annotated[int, typer.Option(help="Checkout transactions for the face stage stage.")] = 200,
) -> None:
    """Snapshot round trips/s against the local camera, face analysis time, face stage observations/s."""
    results = cameras(seconds=seconds, workers=workers, backlog=backlog)
    s, a, f = results["snapshots"], results["face_analysis"], results["face_stage"]
    console.print(
        f"snapshot round trips: {s['snapshots_per_s']:.1f}/s with {s['workers']} clients "
        f"(p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms)"
    )
    console.print(f"face analysis of a 640x480 frame: p50 {a['p50_ms']:.0f} ms, p95 {a['p95_ms']:.0f} ms")
    console.print(f"face stage: {f['observations_per_s']:.1f} observations/s ({f['statuses']})")
    out = REPO_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"cameras-{results['run']}.json"
    path.write_text(json.dumps(results, indent=2))
    console.print(f"results written to {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    typer.run(main)
