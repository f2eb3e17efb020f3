"""Small builders shared by the test tiers: readable transactions with sensible defaults."""

from __future__ import annotations

import io
import tarfile
from dataclasses import replace
from typing import Any

import numpy as np

from infra.settings import Settings
from jobs.scoring.face_similarity import EMBEDDING_LENGTHS
from schemas.records import FaceObservation, LineItem, PosTransaction

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z

FACE_LEN = EMBEDDING_LENGTHS.get(Settings().faces.embedder, 128)
"""Values per embedding of the configured embedder (768 for the default ``fused3``): what every watchlist entry,
observation and buyer face of a test must have to be taken."""
OTHER_FACE_LEN = 128 if FACE_LEN == 768 else 768
"""The length of another embedder's embeddings (128 for ``sface``/``dlib``, 768 for ``fused3``): refused."""


def face_vector(rng: np.random.Generator, spread: float = 0.1, length: int = FACE_LEN) -> list[float]:
    """A random face embedding of ``length`` values (default: the configured embedder's), float32 values so that it
    survives Avro's floats exactly."""
    return [float(x) for x in rng.normal(0, spread, length).astype(np.float32)]


def sale(
    tx_id: str,
    *,
    at_s: float = 0,
    store: str = "store-001",
    lane: str = "lane-01",
    amount: float = 25.0,
    card: str | None = "card-A",
    category: str = "grocery",
    **extra: Any,
) -> PosTransaction:
    return PosTransaction(
        transaction_id=tx_id,
        event_time=T0 + int(at_s * 1000),
        store_id=store,
        lane_id=lane,
        kind="SALE",
        amount=amount,
        currency="USD",
        card_token=card,
        cashier_id="cashier-1",
        items=(LineItem(sku=f"sku-{category}", category=category, quantity=1, unit_price=amount),),
        **extra,
    )


def return_of(tx_id: str, original: str | None, **kw: Any) -> PosTransaction:
    return replace(sale(tx_id, **kw), kind="RETURN", original_transaction_id=original)


def java_bytes(value: Any) -> bytes:
    """Bytes collected from a Flink job arrive as a list of signed Java bytes."""
    return value if isinstance(value, bytes) else bytes(b & 0xFF for b in value)


def checkout_face(
    tx_id: str,
    *,
    at: int = T0,
    status: str = "NO_MATCH",
    embedding: list[float] | None = None,
    trigger: str = "CHECKOUT",
    observation_id: str | None = None,
    store: str = "store-001",
    lane: str = "lane-01",
) -> FaceObservation:
    """The checkout camera's face observation for a transaction (no image reference without a face)."""
    return FaceObservation(
        observation_id=observation_id or f"checkout:{tx_id}",
        event_time=at,
        camera_serial=f"Q2MV-{store}-{lane}",
        store_id=store,
        lane_id=lane,
        transaction_id=tx_id,
        trigger=trigger,
        status=status,
        embedding=embedding,
        image_ref=f"checkout/{tx_id}.jpg" if status != "NO_FACE" else None,
    )


def tgz(files: dict[str, bytes]) -> bytes:
    """A .tgz archive (as a registry serves a package) holding ``files`` by member name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ReadToEndConsumer:
    """A Kafka consumer of every partition read to its end (5 records, 5 committed): what the offset questions of
    :mod:`infra.clients.topic_replay` ask of one."""

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, 5

    def committed(self, parts: list[Any], timeout: float) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition(tp.topic, tp.partition, 5) for tp in parts]

    def close(self) -> None:
        pass


def partitions_led(count: int, leader: int = 1) -> dict[int, Any]:
    """A listed topic's ``partitions``: ``count`` partitions, each with ``leader`` (-1: none) and no error."""
    from confluent_kafka.admin import PartitionMetadata

    out = {}
    for p in range(count):
        meta = PartitionMetadata()
        meta.id, meta.leader, meta.replicas, meta.isrs = p, leader, [leader], [leader]
        out[p] = meta
    return out


def fake_cluster(monkeypatch: Any, topics: dict[str, Any]) -> None:
    """:mod:`infra.clients.topic_replay` against a cluster listing ``topics`` (name -> metadata with ``error`` and
    ``partitions``), its consumers :class:`ReadToEndConsumer`."""
    from types import SimpleNamespace

    from infra.clients import topic_replay

    monkeypatch.setattr(topic_replay, "_consumer", lambda _kafka: ReadToEndConsumer())
    monkeypatch.setattr(topic_replay.kafka_clients, "consumer", lambda *_a: ReadToEndConsumer())
    monkeypatch.setattr(
        topic_replay.kafka_clients, "cluster_metadata", lambda *_a, **_k: SimpleNamespace(topics=topics)
    )
