"""``make run``'s live view (infra/demo.py) outlives Kafka or OpenSearch going away: it says which one is
unreachable and where, and shows figures again once it answers. Fake Kafka consumer and OpenSearch client."""

from __future__ import annotations

import io
import logging

import pytest
from confluent_kafka import KafkaError, KafkaException
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import NotFoundError
from rich.console import Console

from infra.demo import Outages, snapshot, topic_sizes
from infra.launcher import Supervisor
from infra.settings import KafkaSettings, OpenSearchSettings, Settings


class Partition:
    pass


class Topic:
    def __init__(self, partitions: int) -> None:
        self.partitions = {p: Partition() for p in range(partitions)}


class Metadata:
    def __init__(self, topics: dict[str, int]) -> None:
        self.topics = {name: Topic(n) for name, n in topics.items()}


class FakeConsumer:
    """Topics with their partitions' (low, high) watermarks; ``down`` makes every call fail as librdkafka does."""

    def __init__(self, marks: dict[str, list[tuple[int, int] | None]]) -> None:
        self.marks, self.down = marks, False

    def _fail(self, code: int) -> None:
        if self.down:
            raise KafkaException(KafkaError(code))

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Metadata:
        self._fail(KafkaError._TRANSPORT)
        return Metadata({name: len(parts) for name, parts in self.marks.items()})

    def get_watermark_offsets(self, tp, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        self._fail(KafkaError._ALL_BROKERS_DOWN)
        mark = self.marks[tp.topic][tp.partition]
        if mark is None:
            raise KafkaException(KafkaError(KafkaError.LEADER_NOT_AVAILABLE))
        return mark


class FakeOpenSearch:
    def __init__(self) -> None:
        self.error: Exception | None = None

    def search(self, index: str, body: dict) -> dict:
        if self.error is not None:
            raise self.error
        if "aggs" in body:
            return {
                "aggregations": {
                    "o": {"buckets": [{"key": "BLOCK", "doc_count": 3, "a": {"value": 120.5}}]},
                    "lat": {"values": {"50.0": 40.0, "99.0": 90.0}},
                }
            }
        return {"hits": {"hits": [{"_source": {"event_time": 0, "summary": "velocity at store-001"}}]}}


SETTINGS = Settings(
    kafka=KafkaSettings(bootstrap_servers="broker-1:9092", topic_prefix="t."),
    opensearch=OpenSearchSettings(url="http://search:9200"),
)


def render(consumer: FakeConsumer, client: FakeOpenSearch, outages: Outages) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(snapshot(SETTINGS, consumer, client, Supervisor(), outages))  # type: ignore[arg-type]
    return console.export_text()


@pytest.fixture
def outages() -> Outages:
    return Outages(logging.getLogger("test.demo"))


def test_topic_sizes_sum_every_partition_and_skip_one_without_a_leader() -> None:
    consumer = FakeConsumer({"t.transactions": [(0, 5), (2, 4), None], "t.alerts": []})
    sizes = topic_sizes(consumer, ["t.transactions", "t.alerts", "t.missing"])  # type: ignore[arg-type]
    assert sizes == {"t.transactions": 7, "t.alerts": 0, "t.missing": 0}


def test_topic_sizes_raise_when_kafka_does_not_answer() -> None:
    consumer = FakeConsumer({"t.transactions": [(0, 5)]})
    consumer.down = True
    with pytest.raises(KafkaException):
        topic_sizes(consumer, ["t.transactions"])  # type: ignore[arg-type]


def test_kafka_going_away_is_shown_and_the_view_carries_on_when_it_is_back(
    outages: Outages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="test.demo")
    consumer, client = FakeConsumer({"t.transactions": [(0, 1234)]}), FakeOpenSearch()
    consumer.down = True
    away = render(consumer, client, outages)
    assert "Kafka unreachable at broker-1:9092, waiting" in away
    assert "BLOCK" in away, "what OpenSearch holds is still shown"
    consumer.down = False
    back = render(consumer, client, outages)
    assert "unreachable" not in back and "1,234" in back
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Kafka unreachable at broker-1:9092, waiting", "Kafka at broker-1:9092 answers again"]


def test_opensearch_going_away_is_shown_and_the_view_carries_on_when_it_is_back(outages: Outages) -> None:
    consumer, client = FakeConsumer({"t.transactions": [(0, 7)]}), FakeOpenSearch()
    client.error = OpenSearchConnectionError("N/A", "Connection refused", ConnectionRefusedError())
    away = render(consumer, client, outages)
    assert "OpenSearch unreachable at http://search:9200, waiting" in away
    assert "Kafka unreachable" not in away
    client.error = None
    back = render(consumer, client, outages)
    assert "unreachable" not in back and "velocity at store-001" in back


def test_a_missing_index_is_an_empty_table_not_an_outage(outages: Outages) -> None:
    client = FakeOpenSearch()
    client.error = NotFoundError(404, "index_not_found_exception", {})
    text = render(FakeConsumer({}), client, outages)
    assert "unreachable" not in text and not outages.since


def test_both_away_are_both_named(outages: Outages) -> None:
    consumer, client = FakeConsumer({}), FakeOpenSearch()
    consumer.down = True
    client.error = OpenSearchConnectionError("N/A", "timed out", TimeoutError())
    text = render(consumer, client, outages)
    assert "Kafka unreachable at broker-1:9092" in text and "OpenSearch unreachable at http://search:9200" in text
