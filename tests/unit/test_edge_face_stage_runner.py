"""The face stage's Kafka loop: failed deliveries are sent again, bad records are dead letters, and
neither stops the reading for good.

The stage core is real (real transactions parsed, real observations encoded); at the Kafka client
boundary there are two small stand-ins: a consumer handing out ``confluent_kafka.Message``s and a
producer that acknowledges on ``poll`` as librdkafka does, failing the first deliveries with a
message timeout (what a broker down longer than ``message.timeout.ms`` looks like to the stage).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from infra import metrics
from infra.clients.meraki import Snapshot, SnapshotError
from infra.retry import Backoff
from infra.settings import CameraSettings, Settings
from jobs.faces.stage import STAGE, STAGE_ERROR, FaceStage, FaceStageRunner, stall_limit_s
from schemas.records import CameraEvent, DeadLetter, DetectedObject, FaceObservation, PosTransaction
from schemas.topics import CAMERA_EVENTS, DEAD_LETTERS, FACE_OBSERVATIONS, TRANSACTIONS
from tests.builders import partitions_led

TX_TOPIC = TRANSACTIONS.full_name("")


class Consumer:
    """Hands out the given messages in order (none while paused); records pauses and commits."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages, self.paused, self.pauses, self.commits = list(messages), False, 0, {}

    def subscribe(self, topics: list[str], on_assign: Callable, on_revoke: Callable) -> None:
        on_assign(self, self.assignment())

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TX_TOPIC, 0)]

    def poll(self, timeout: float) -> Message | None:
        if self.paused or not self.messages:
            time.sleep(timeout / 10)
            return None
        return self.messages.pop(0)

    def pause(self, _partitions: list) -> None:
        self.paused, self.pauses = True, self.pauses + 1

    def resume(self, _partitions: list) -> None:
        self.paused = False

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def close(self) -> None:
        pass


class Producer:
    """Acknowledges on ``poll``; the first ``failures`` deliveries fail with ``_MSG_TIMED_OUT``."""

    def __init__(self, failures: int) -> None:
        self.failures, self.queued, self.delivered = failures, [], []

    def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Callable) -> None:
        self.queued.append((topic, value, on_delivery))

    def poll(self, _timeout: float) -> int:
        queued, self.queued = self.queued, []
        for topic, value, on_delivery in queued:
            if self.failures > 0:
                self.failures -= 1
                on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
            else:
                self.delivered.append((topic, value))
                on_delivery(None, None)
        return len(queued)

    def flush(self, _timeout: float) -> int:
        self.poll(0)
        return 0


def tx_message(offset: int, tx_id: str, store_id: str = "store-001", age_s: float = 0.0) -> Message:
    now = int(time.time() * 1000)
    value = PosTransaction(tx_id, now - int(age_s * 1000), store_id, "lane-01", "SALE", 12.5, "USD").encode()
    return Message(topic=TX_TOPIC, partition=0, offset=offset, key=b"k", value=value, timestamp=(1, now))


def no_video(asked: list[str]) -> Callable[[str, int | None], Snapshot]:
    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(serial)
        raise SnapshotError("no_video", "No video for specified timestamp")

    return snapshot


def run_until(runner: FaceStageRunner, done: Callable[[], bool], limit_s: float = 15.0) -> dict[str, Any]:
    stop, started = threading.Event(), time.monotonic()

    def tick(_stats: dict) -> None:
        if done() or time.monotonic() - started > limit_s:
            stop.set()

    return runner.run(stop, tick)


def settings() -> Settings:
    return Settings(cameras=CameraSettings(max_in_flight=3, snapshot_workers=2))


def NOTHING(
    _settings: Settings, _since_ms: int, _timeout_s: float, _given_up: threading.Event
) -> list[tuple[str, int]]:
    """A stage started with nothing published before (no face observation to read back)."""
    return []


def delivered(producer: Producer, topic: str, record: type) -> list:
    return [record.decode(value) for t, value in producer.delivered if t == topic.full_name("")]


def test_failed_deliveries_are_sent_again_until_acknowledged_and_reading_resumes() -> None:
    asked: list[str] = []
    stage = FaceStage(settings(), no_video(asked), None, None)  # type: ignore[arg-type]
    consumer, producer = Consumer([tx_message(i, f"tx-{i}") for i in range(10)]), Producer(failures=7)
    runner = FaceStageRunner(
        settings(),
        stage,
        producer=producer,
        consumer=consumer,
        backoff=Backoff(initial_s=0.01, maximum_s=0.05),
        recall=NOTHING,
    )
    stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 10)

    observations = delivered(producer, FACE_OBSERVATIONS, FaceObservation)
    assert sorted(o.observation_id for o in observations) == sorted(f"checkout:tx-{i}" for i in range(10))
    assert consumer.commits == {(TX_TOPIC, 0): 10}, "committed once every observation was acknowledged"
    assert consumer.messages == [] and consumer.pauses >= 1 and not consumer.paused, "paused, then read on"
    assert stats["failed"] == 7 and stats["retried"] == 7 and stats["observations"] == 10
    assert len(asked) == 10, "a failed delivery is sent again, not snapshotted again"


def test_a_record_the_stage_fails_on_is_a_dead_letter_and_the_rest_goes_on() -> None:
    class Buggy(FaceStage):
        """A planning bug for one transaction: the kind of exception no validation foresees."""

        def plan_transaction(self, value: bytes | None, now_ms: int, record_ms: int | None = None) -> list:
            if PosTransaction.decode(value).transaction_id == "tx-bug":  # type: ignore[arg-type]
                raise KeyError("lane map")
            return super().plan_transaction(value, now_ms, record_ms)

    asked: list[str] = []
    stage = Buggy(settings(), no_video(asked), None, None)  # type: ignore[arg-type]
    messages = [
        tx_message(0, "tx-a"),
        tx_message(1, "tx-bug"),
        tx_message(2, "tx-hostile", store_id="x/../Q2XX-VICTIM-0001/reboot?"),
        tx_message(3, "tx-b"),
    ]
    consumer, producer = Consumer(messages), Producer(failures=0)
    stats = run_until(
        FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING),
        lambda: consumer.commits.get((TX_TOPIC, 0)) == 4,
    )

    [dl] = delivered(producer, DEAD_LETTERS, DeadLetter)
    assert (dl.error_kind, dl.reason, dl.stage) == (STAGE_ERROR, "planning failed: KeyError", STAGE)
    assert dl.dead_letter_id == f"{STAGE}:{TX_TOPIC}:0:1", "never the scoring job's own dead-letter id"
    assert dl.payload == messages[1].value()
    observed = [o.transaction_id for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation)]
    assert sorted(observed) == ["tx-a", "tx-b"], "the hostile transaction is skipped (the job dead-letters it)"
    assert asked == ["Q2MV-store-001-lane-01"] * 2
    assert consumer.commits == {(TX_TOPIC, 0): 4} and stats["errors"] == 1


class TopicConsumer(Consumer):
    """Pauses per topic, as confluent_kafka does: a paused topic's messages wait, the others are handed out."""

    def __init__(self, messages: list[Message]) -> None:
        super().__init__(messages)
        self.paused_topics: set[str] = set()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(TX_TOPIC, 0), TopicPartition(CAMERA_EVENTS.full_name(""), 0)]

    def poll(self, timeout: float) -> Message | None:
        for i, msg in enumerate(self.messages):
            if msg.topic() not in self.paused_topics:
                return self.messages.pop(i)
        time.sleep(timeout / 10)
        return None

    def pause(self, partitions: list) -> None:
        self.paused_topics |= {tp.topic for tp in partitions}
        self.pauses += 1

    def resume(self, partitions: list) -> None:
        self.paused_topics -= {tp.topic for tp in partitions}


class NoFaces:
    """A face engine that finds nobody: the runner tests care about what is snapshotted and when."""

    def analyse(self, image: bytes, max_embedded: int | None = None) -> list:
        return []


class NamedStore:
    """An image store that only names where an image would go."""

    def put(self, kind: str, key: str, data: bytes) -> str:
        return f"file://{kind}/{key}"


def test_an_entrance_behind_a_queue_of_slow_checkouts_is_still_photographed_in_time() -> None:
    """A few dozen checkouts (seconds each with the real Dashboard) must not age a new person at the door past
    CG_CAMERAS__ENTRANCE_MAX_LAG_S: scaled down, 20 checkouts of 0.2 s on 2 workers, a 1 s limit."""

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        if at_ms is not None:  # a checkout: footage of the sale, slow
            time.sleep(0.2)
        return Snapshot(serial, b"jpeg", "image/jpeg", at_ms, False, 1, 1, 0.2)

    s = Settings(cameras=CameraSettings(max_in_flight=8, snapshot_workers=2, entrance_max_lag_s=1.0))
    door = "Q2MV-store-001-ENTRANCE"
    now = int(time.time() * 1000)
    person = (DetectedObject(7, "person", 0.1, 0.1, 0.5, 0.9),)
    event = CameraEvent(door, now, f"/merakimv/{door}/raw_detections", "RAW_DETECTIONS", objects=person).encode()
    walk_in = Message(topic=CAMERA_EVENTS.full_name(""), partition=0, offset=0, value=event, timestamp=(1, now))
    consumer = TopicConsumer([*(tx_message(i, f"tx-{i}") for i in range(20)), walk_in])
    producer = Producer(failures=0)
    late = metrics.SKIPPED.labels("face-stage", "entrance_late")
    before = late._value.get()
    runner = FaceStageRunner(
        s, FaceStage(s, snapshot, NoFaces(), NamedStore()), producer=producer, consumer=consumer, recall=NOTHING
    )
    run_until(runner, lambda: len(delivered(producer, FACE_OBSERVATIONS, FaceObservation)) == 21)

    observations = {o.trigger: o for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation)}
    entrance = observations["ENTRANCE"]
    assert entrance.status == "NO_FACE" and entrance.reason == "no face in the snapshot", entrance.reason
    assert late._value.get() == before and consumer.pauses >= 1  # the checkouts were paused, the door was not


def test_a_stream_of_people_at_the_door_does_not_hold_the_checkouts_back() -> None:
    """Entrances count against their own topic's back-pressure, not the transactions': scaled down, 20 new
    people a second at a door (0.3 s pictures on 2 workers) while 10 checkouts wait, with 8 records in flight."""

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        time.sleep(0.01 if at_ms is not None else 0.3)
        return Snapshot(serial, b"jpeg", "image/jpeg", at_ms, False, 1, 1, 0.2)

    door, cameras = "Q2MV-store-001-ENTRANCE", CAMERA_EVENTS.full_name("")

    class Doorway(TopicConsumer):
        """A new person every 50 ms on the camera events; the transactions come after 0.5 s of them."""

        def __init__(self) -> None:
            super().__init__([])
            self.started, self.people, self.checkouts_in = time.monotonic(), 0, False

        def poll(self, timeout: float) -> Message | None:
            elapsed = time.monotonic() - self.started
            if elapsed > 0.5 and not self.checkouts_in:
                self.messages.extend(tx_message(i, f"tx-{i}") for i in range(10))
                self.checkouts_in = True
            if self.people < int(elapsed * 20) and cameras not in self.paused_topics:
                self.people, now = self.people + 1, int(time.time() * 1000)
                person = (DetectedObject(self.people, "person", 0.1, 0.1, 0.5, 0.9),)
                event = CameraEvent(door, now, f"/merakimv/{door}/raw_detections", "RAW_DETECTIONS", objects=person)
                return Message(topic=cameras, partition=0, offset=self.people, value=event.encode(), timestamp=(1, now))
            return super().poll(timeout)

    s = Settings(
        cameras=CameraSettings(max_in_flight=8, snapshot_workers=4, entrance_snapshot_workers=2, entrance_max_lag_s=1.0)
    )
    consumer, producer = Doorway(), Producer(failures=0)
    runner = FaceStageRunner(
        s, FaceStage(s, snapshot, NoFaces(), NamedStore()), producer=producer, consumer=consumer, recall=NOTHING
    )
    checkouts = lambda: [o for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation) if o.trigger == "CHECKOUT"]  # noqa: E731
    run_until(runner, lambda: len(checkouts()) == 10, limit_s=10.0)

    assert len(checkouts()) == 10, f"{len(checkouts())} of 10 checkouts observed while people kept coming in"
    assert consumer.people >= 10 and cameras in {tp.topic for tp in consumer.assignment()}


def test_healthz_turns_stale_when_every_snapshot_worker_is_stuck_and_recovers_once_one_finishes() -> None:
    """Back-pressure paused the consumer while every worker hung on a snapshot, and the loop, turning on, beat the
    heartbeat: /healthz stayed 200 while nothing got done. Now only a finished trigger (or none in flight) beats it."""
    now = [1_000.0]
    release = threading.Event()

    def stuck(serial: str, at_ms: int | None) -> Snapshot:
        release.wait(30)
        raise SnapshotError("timeout", "the camera never answered")

    heartbeat = metrics.Heartbeat(stale_s=60.0, clock=lambda: now[0])
    stage = FaceStage(settings(), stuck, None, None)  # type: ignore[arg-type]
    consumer, producer = Consumer([tx_message(i, f"tx-{i}") for i in range(5)]), Producer(failures=0)
    runner = FaceStageRunner(
        settings(),
        stage,
        producer=producer,
        consumer=consumer,
        heartbeat=heartbeat,
        clock=lambda: now[0],
        recall=NOTHING,
    )
    turns, stop = [0], threading.Event()
    worker = threading.Thread(target=runner.run, args=(stop, lambda _stats: turns.__setitem__(0, turns[0] + 1)))
    worker.start()

    def after_a_few_turns() -> None:
        seen = turns[0]
        deadline = time.monotonic() + 10
        while turns[0] < seen + 5:
            assert time.monotonic() < deadline, "the loop stopped turning"
            time.sleep(0.005)

    try:
        deadline = time.monotonic() + 10
        while not consumer.paused:  # three in flight, two of them on the two stuck workers
            assert time.monotonic() < deadline, "never paused"
            time.sleep(0.005)
        now[0] += stall_limit_s(settings()) - 1
        after_a_few_turns()
        assert heartbeat() == (True, "ok"), "slow, not yet hung"
        now[0] += 2
        after_a_few_turns()
        alive, reason = heartbeat()
        assert not alive, "the loop turns, but nothing finishes"
        assert reason == f"no snapshot finished for {stall_limit_s(settings()) + 1:.0f} s, 3 in flight"
        release.set()
        deadline = time.monotonic() + 10
        while not heartbeat()[0]:
            assert time.monotonic() < deadline, "never healthy again"
            time.sleep(0.005)
    finally:
        release.set()
        stop.set()
        worker.join(30)
    assert not worker.is_alive()


def test_an_idle_face_stage_stays_healthy_however_long_nothing_comes() -> None:
    now = [1_000.0]
    heartbeat = metrics.Heartbeat(stale_s=60.0, clock=lambda: now[0])
    stage = FaceStage(settings(), no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(
        settings(),
        stage,
        producer=Producer(0),
        consumer=Consumer([]),
        heartbeat=heartbeat,
        clock=lambda: now[0],
        recall=NOTHING,
    )
    turns = [0]

    def tick(_stats: dict) -> None:
        turns[0] += 1
        now[0] += 60.0  # a minute a turn: an hour with nothing to do
        assert heartbeat() == (True, "ok")

    stop = threading.Event()
    runner.run(stop, lambda stats: (tick(stats), turns[0] >= 60 and stop.set()))
    assert turns[0] >= 60


class Replay(Consumer):
    """The transaction again (as after a replay) once its first reading was committed."""

    replayed = False
    age_s = 0.0

    def poll(self, timeout: float) -> Message | None:
        if self.commits.get((TX_TOPIC, 0)) == 1 and not self.replayed:
            self.messages, self.replayed = [tx_message(1, "tx-once", age_s=self.age_s), tx_message(2, "tx-other")], True
        return super().poll(timeout)


def snapshots(asked: list[str], outages: int = 0) -> Callable[[str, int | None], Snapshot]:
    """A camera whose first ``outages`` snapshots fail (no video), the others give a picture."""

    def snapshot(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(serial)
        if len(asked) <= outages:
            raise SnapshotError("no_video", "No video for specified timestamp")
        return Snapshot(serial, b"jpeg", "image/jpeg", at_ms, False, 1, 1, 0.2)

    return snapshot


def test_a_transaction_read_again_after_its_observation_was_acknowledged_is_not_snapshotted_again() -> None:
    """A replayed trigger (a restart before its commit, a topic replay) cost a second Meraki snapshot and Rekognition
    search, of a later moment than the sale; now one whose observation Kafka acknowledged is skipped and counted."""
    asked: list[str] = []
    stage = FaceStage(settings(), snapshots(asked), NoFaces(), NamedStore())
    consumer, producer = Replay([tx_message(0, "tx-once")]), Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING)
    replayed = metrics.SKIPPED.labels("face-stage", "replayed")
    before = replayed._value.get()
    stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 3)

    assert len(asked) == 2, "the replayed transaction was snapshotted again"
    observed = [o.observation_id for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation)]
    assert sorted(observed) == ["checkout:tx-once", "checkout:tx-other"], "the first answer is the scoring job's"
    assert stats["replayed"] == 1 and replayed._value.get() == before + 1


def test_a_trigger_sent_again_after_an_outage_answered_it_unavailable_is_snapshotted_again() -> None:
    """An UNAVAILABLE observation (camera or Rekognition away) was remembered as an answer: a transaction sent again
    on purpose once the outage was over got no new snapshot. Only real answers are remembered now."""
    asked: list[str] = []
    stage = FaceStage(settings(), snapshots(asked, outages=1), NoFaces(), NamedStore())
    consumer, producer = Replay([tx_message(0, "tx-once")]), Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING)
    stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 3)

    assert len(asked) == 3, "the transaction sent again after the outage got no new snapshot"
    once = [o.status for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation) if o.transaction_id == "tx-once"]
    assert once == ["UNAVAILABLE", "NO_FACE"] and stats["replayed"] == 0


def test_a_transaction_past_its_lag_limit_read_again_is_answered_again_without_a_snapshot() -> None:
    """Its "not snapshotted: late" UNAVAILABLE is no answer to remember, and the lag rule answers it again."""
    asked: list[str] = []
    late_s = settings().cameras.max_lag_s + 60
    stage = FaceStage(settings(), snapshots(asked), NoFaces(), NamedStore())
    consumer = Replay([tx_message(0, "tx-once", age_s=late_s)])
    consumer.age_s = late_s
    producer = Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING)
    stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 3)

    assert len(asked) == 1, "only tx-other is snapshotted"
    once = [o for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation) if o.transaction_id == "tx-once"]
    assert [o.status for o in once] == ["UNAVAILABLE"] * 2 and all("late" in (o.reason or "") for o in once)
    assert stats["replayed"] == 0


def test_a_trigger_read_again_while_it_is_observed_waits_for_that_observation() -> None:
    """A record read again while its first is still snapshotted takes no second snapshot; it gets the same
    observation (its offset is committed only once that is in Kafka), so the scoring job's join never misses it."""
    asked: list[str] = []
    release = threading.Event()

    def slow(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(serial)
        release.wait(5)
        raise SnapshotError("no_video", "No video for specified timestamp")

    stage = FaceStage(settings(), slow, None, None)  # type: ignore[arg-type]
    consumer, producer = Consumer([tx_message(0, "tx-once"), tx_message(1, "tx-once")]), Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING)

    def done() -> bool:
        if not consumer.messages:
            release.set()  # both records read before the snapshot ends
        return consumer.commits.get((TX_TOPIC, 0)) == 2

    stats = run_until(runner, done)
    assert len(asked) == 1, "snapshotted twice"
    observations = delivered(producer, FACE_OBSERVATIONS, FaceObservation)
    assert [o.observation_id for o in observations] == ["checkout:tx-once"] * 2
    assert stats["observations"] == 2 and consumer.commits == {(TX_TOPIC, 0): 2}


def test_the_memory_of_answered_triggers_is_bounded_in_time_and_count() -> None:
    from jobs.faces.stage import RecentAnswers

    answers = RecentAnswers(window_ms=1_000, limit=2)
    answers.add("checkout:a", 10_000, 10_000)
    assert answers.answered("checkout:a", 10_500) and not answers.answered("checkout:a", 11_001)
    answers.add("checkout:b", 10_000, 10_000)
    answers.add("checkout:c", 10_000, 10_000)
    assert len(answers) == 2 and not answers.answered("checkout:a", 10_000), "the oldest remembered goes first"
    answers.add("checkout:d", 13_000, 13_000)
    assert len(answers) == 1, "pruned past the window"


def test_a_restarted_stage_does_not_snapshot_again_a_trigger_whose_observation_it_published_before() -> None:
    """The memory of answered triggers was the process's: after a restart, every record read again since the last
    commit was snapshotted (a later moment than the sale) and searched again. Now the stage reads back the
    observations it published over the memory's window before its first record."""
    asked: list[str] = []
    asked_since: list[int] = []
    now = int(time.time() * 1000)

    def published(
        _settings: Settings, since_ms: int, _timeout_s: float, _given_up: threading.Event
    ) -> list[tuple[str, int]]:
        asked_since.append(since_ms)
        return [("checkout:tx-once", now)]

    stage = FaceStage(settings(), no_video(asked), None, None)  # type: ignore[arg-type]
    consumer = Consumer([tx_message(0, "tx-once"), tx_message(1, "tx-new")])  # read again after the restart
    producer = Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=published)
    stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 2)

    assert len(asked) == 1, "the trigger answered before the restart was snapshotted again"
    assert [o.observation_id for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation)] == ["checkout:tx-new"]
    assert stats["replayed"] == 1
    window_ms = int(settings().cameras.max_lag_s * 1000) + settings().job.max_future_skew_ms
    assert len(asked_since) == 1 and abs(asked_since[0] - (now - window_ms)) < 5_000, "read back over the window"


HANG = threading.Event()


def _failing(
    _settings: Settings, _since_ms: int, _timeout_s: float, _given_up: threading.Event
) -> list[tuple[str, int]]:
    raise RuntimeError("face_observations: broker down")


def _hanging(
    _settings: Settings, _since_ms: int, _timeout_s: float, _given_up: threading.Event
) -> list[tuple[str, int]]:
    HANG.wait(10)  # ends the reader's thread once the test is over
    return [("checkout:tx-once", int(time.time() * 1000))]


@pytest.mark.parametrize(("recall", "why"), [(_failing, "broker down"), (_hanging, "not done in 0.2 s")])
def test_a_read_back_that_fails_or_takes_too_long_is_a_warning_and_the_stage_snapshots_on(
    caplog, recall: Callable, why: str
) -> None:
    """Reading back the published observations never holds the stage: a failure or a read past its time costs the
    snapshots it would have saved, and says so."""
    HANG.clear()
    asked: list[str] = []
    stage = FaceStage(settings(), no_video(asked), None, None)  # type: ignore[arg-type]
    consumer, producer = Consumer([tx_message(0, "tx-once"), tx_message(1, "tx-new")]), Producer(failures=0)
    runner = FaceStageRunner(
        settings(), stage, producer=producer, consumer=consumer, recall=recall, recall_timeout_s=0.2
    )
    try:
        stats = run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 2)
    finally:
        HANG.set()
    assert len(asked) == 2 and stats["replayed"] == 0, "both snapshotted"
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and "read" in r.getMessage()]
    assert why in warning.getMessage()


def test_the_read_back_takes_only_the_ids_of_the_face_observations_written_within_the_window(monkeypatch) -> None:
    from infra.clients import control_topics
    from jobs.faces.stage import recall_from_kafka

    seen: dict[str, Any] = {}
    face = FaceObservation("checkout:tx-1", 1_000, "Q2XX-AAAA-0001", "store-001", "CHECKOUT", "NO_MATCH")
    records = [replace(face, embedding=[0.25] * 128, image_ref="local://checkout/tx-1").encode(), b"garbage", None]
    records.append(replace(face, observation_id="checkout:tx-3", status="UNAVAILABLE").encode())  # an outage
    records.append(PosTransaction("tx-2", 2_000, "store-001", "lane-01", "SALE", 1.0, "USD").encode())

    def read(settings: Settings, apply: Callable, **kwargs: Any) -> dict:
        seen.update(kwargs)
        for value in records:
            apply(FACE_OBSERVATIONS.full_name(""), b"Q2XX-AAAA-0001", value)
        return {}

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    assert recall_from_kafka(Settings(), 500, 3.0) == [("checkout:tx-1", 1_000)], (
        "an answer's id and time, nothing else"
    )
    assert seen.pop("deadline") <= time.monotonic() + 3.0, "the whole read is bound by the timeout"
    assert seen == {"timeout_s": 3.0, "specs": (FACE_OBSERVATIONS,), "since_ms": 500, "stop": None}


def test_assignments_back_to_back_while_a_read_back_hangs_start_no_second_reader(caplog) -> None:
    """Each assignment started a read back of its own; one given up kept running with its own consumer, so repeated
    rebalances under a slow broker stacked readers. Now the one given up is told to stop, and while it has not, the
    next assignment reads nothing back (a WARNING)."""
    release, calls, told = threading.Event(), [], []

    def hanging(_settings: Settings, _since_ms: int, _timeout_s: float, given_up: threading.Event) -> list:
        calls.append(threading.current_thread())
        release.wait(10)  # a metadata call that does not come back
        told.append(given_up.is_set())
        return []

    stage = FaceStage(settings(), no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(
        settings(), stage, producer=Producer(0), consumer=Consumer([]), recall=hanging, recall_timeout_s=0.1
    )
    try:
        runner._on_assign(Consumer([]), [TopicPartition(TX_TOPIC, 0)])
        runner._on_assign(Consumer([]), [TopicPartition(TX_TOPIC, 1)])
    finally:
        release.set()
    assert len(calls) == 1, "a second reader while the first still runs"
    calls[0].join(2)
    assert told == [True], "the reader given up is told to stop"
    assert any("still stopping" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


class SlowBroker:
    """A Kafka consumer for the read back whose metadata calls each take ``delay_s`` (a slow broker)."""

    def __init__(self, delay_s: float, partitions: int) -> None:
        self.delay_s, self.partitions, self.calls, self.closed = delay_s, partitions, 0, False
        self.reader: threading.Thread | None = None

    def _slow(self) -> None:
        self.calls += 1
        self.reader = threading.current_thread()
        time.sleep(self.delay_s)

    def list_topics(self, topic: str, timeout: float) -> Any:
        from types import SimpleNamespace

        self._slow()
        meta = SimpleNamespace(error=None, partitions=partitions_led(self.partitions))
        return SimpleNamespace(topics={topic: meta})

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self._slow()
        return 0, 10

    def close(self) -> None:
        self.closed = True


def test_a_read_back_given_up_stops_at_its_next_call_and_closes_its_consumer(monkeypatch) -> None:
    """With each metadata call taking its own timeout, one read back given up lived about 5 s x (partitions + 3) with
    its own consumer; now it stops after the call in progress and closes its consumer."""
    from infra.clients import kafka as kafka_clients

    broker = SlowBroker(delay_s=0.2, partitions=12)
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_args, **_kwargs: broker)
    stage = FaceStage(settings(), no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(settings(), stage, producer=Producer(0), consumer=Consumer([]), recall_timeout_s=0.3)
    assert runner.recall() == 0, "given up"
    reader = broker.reader
    assert reader is not None
    reader.join(2)
    assert not reader.is_alive() and broker.closed, "the reader given up still runs with its consumer open"
    assert broker.calls <= 3, f"{broker.calls} metadata calls after it was given up"


class TimingOutBroker(SlowBroker):
    """A slow broker whose metadata calls, like librdkafka's, give up at their timeout (a timeout error)."""

    def _timed(self, timeout: float, delay_s: float) -> None:
        self.calls += 1
        self.reader = threading.current_thread()
        time.sleep(min(delay_s, timeout))
        if delay_s > timeout:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    def _slow(self) -> None:
        pass

    def list_topics(self, topic: str, timeout: float) -> Any:
        self._timed(timeout, 0.6)  # answered, slowly
        return super().list_topics(topic, timeout)

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
        self._timed(timeout, 60.0)  # never answered
        return 0, 10


def test_a_read_back_given_up_ends_by_its_timeout_not_after_the_call_it_is_in(monkeypatch) -> None:
    """Each metadata call had the read back's whole timeout of its own: given up while one ran, the reader went on
    with its consumer to the end of that call, up to the timeout more (two in all). Now each waits only the time left,
    and the reader ends with the wait for it."""
    from infra.clients import kafka as kafka_clients

    broker = TimingOutBroker(delay_s=0.0, partitions=3)
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_args, **_kwargs: broker)
    stage = FaceStage(settings(), no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(settings(), stage, producer=Producer(0), consumer=Consumer([]), recall_timeout_s=1.0)
    assert runner.recall() == 0, "given up"
    given_up_at = time.monotonic()
    reader = broker.reader
    assert reader is not None
    reader.join(3)
    assert not reader.is_alive() and broker.closed
    assert time.monotonic() - given_up_at < 0.4, "the reader ran on past its timeout"


def test_offsets_whose_commit_failed_are_committed_at_the_next_commit_though_nothing_more_comes() -> None:
    """A failed commit (a coordinator moving, a rebalance) said "the next commit carries the same points", but the
    points were already marked committed: on a quiet partition they never were, and a restart read those records
    again (snapshotted again, dead letters sent twice)."""

    class Flaky(Consumer):
        def __init__(self, messages: list[Message]) -> None:
            super().__init__(messages)
            self.failures = 1

        def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
            if self.failures:
                self.failures -= 1
                raise KafkaException(KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
            super().commit(offsets, asynchronous)

    asked: list[str] = []
    stage = FaceStage(settings(), no_video(asked), None, None)  # type: ignore[arg-type]
    consumer, producer = Flaky([tx_message(0, "tx-quiet")]), Producer(failures=0)
    runner = FaceStageRunner(settings(), stage, producer=producer, consumer=consumer, recall=NOTHING)
    run_until(runner, lambda: consumer.commits.get((TX_TOPIC, 0)) == 1, limit_s=5.0)

    assert consumer.failures == 0, "the first commit failed"
    assert consumer.commits == {(TX_TOPIC, 0): 1}, "the failed commit's point was committed after all"


def test_shutdown_with_kafka_down_ends_within_the_stop_timeout_though_the_flush_commit_and_close_hang() -> None:
    """At a stop the stage waited a fixed 15 s for Kafka to take its observations, then for its last offset commit and
    its consumer's close as long as Kafka took: with the brokers down, past the supervisor's stop timeout (20 s by
    default), into its SIGKILL. Only the offsets of the records whose observations Kafka acknowledged are committed."""
    kafka_down = threading.Event()
    flushes: list[float] = []
    committed: list[list[tuple[int, int]]] = []

    class DownProducer(Producer):
        def flush(self, timeout: float) -> int:
            flushes.append(timeout)
            kafka_down.wait(timeout)
            return 1

    class DownConsumer(Consumer):
        def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
            committed.append([(tp.partition, tp.offset) for tp in offsets])
            kafka_down.wait(10)

        def close(self) -> None:
            kafka_down.wait(10)

    config = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0, "max_in_flight": 3, "snapshot_workers": 2},
        kafka={"stop_flush_s": 1.2},
        alerts={"stop_wait_s": 0.2},
    )
    stage = FaceStage(config, no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(config, stage, producer=DownProducer(0), consumer=DownConsumer([]), recall=NOTHING)
    runner.offsets.add((TX_TOPIC, 0), 4, 0)  # its observation acknowledged: its offset may be committed
    runner.offsets.add((TX_TOPIC, 0), 5, 1)  # its observation not acknowledged yet
    stop = threading.Event()
    stop.set()  # SIGTERM before the first poll
    started = time.monotonic()
    try:
        runner.run(stop)
        took = time.monotonic() - started
    finally:
        kafka_down.set()
    assert took < 2.5, f"shutdown took {took:.1f}s, the stop timeout is 2.5s"
    assert flushes == [1.2], "Kafka gets CG_KAFKA__STOP_FLUSH_S, not a fixed 15 s"
    assert committed == [[(0, 5)]], "the acknowledged only"


def test_a_stop_gives_up_a_snapshot_slower_than_the_stop_timeout_and_commits_only_the_records_answered() -> None:
    """At a stop the stage waited for every snapshot under way however long it took: a camera slower than the
    supervisor's stop timeout (``CG_CAMERAS__DEADLINE_S`` is 30 s, the stop timeout 20 s) kept it past its SIGKILL,
    before its last commit. The wait ends before the stop timeout; the record whose snapshot did not finish is not
    committed (it is read again after the restart), the one answered before it is."""
    release, asked = threading.Event(), []

    def camera(serial: str, at_ms: int | None) -> Snapshot:
        asked.append(serial)
        if len(asked) > 1:  # the second checkout's camera does not answer
            release.wait(30)
        raise SnapshotError("no_video", "No video for specified timestamp")

    config = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0, "max_in_flight": 3, "snapshot_workers": 2},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
    )
    stage = FaceStage(config, camera, None, None)  # type: ignore[arg-type]
    consumer, producer = Consumer([tx_message(0, "tx-0"), tx_message(1, "tx-1")]), Producer(failures=0)
    runner = FaceStageRunner(config, stage, producer=producer, consumer=consumer, recall=NOTHING)
    stop, ended = threading.Event(), threading.Event()

    def tick(_stats: dict) -> None:
        if len(asked) == 2 and consumer.commits.get((TX_TOPIC, 0)) == 1:
            stop.set()  # SIGTERM with the second snapshot under way

    def run() -> None:
        runner.run(stop, tick)
        ended.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert stop.wait(10), "the first record was never committed"
        started = time.monotonic()
        assert ended.wait(2.5), "the stop waited for the snapshot past the stop timeout"
        took = time.monotonic() - started
    finally:
        release.set()
        worker.join(30)
    assert took < 2.5 - 0.5, f"the stop took {took:.1f}s: the flush's 0.5 s before the commit's deadline is not kept"
    assert consumer.commits == {(TX_TOPIC, 0): 1}, "the record whose snapshot was given up was committed"
    assert [o.observation_id for o in delivered(producer, FACE_OBSERVATIONS, FaceObservation)] == ["checkout:tx-0"]


def test_a_record_kafka_has_no_room_for_at_a_stop_is_given_up_by_the_stops_deadline_and_not_committed() -> None:
    """What a snapshot finished at the stop gave (here a dead letter) was produced into a local queue full with Kafka
    away, tried again for ever, past the supervisor's SIGKILL. It is given up by the stop's deadline; its record is
    not acknowledged, so not committed, and is read again at the next start."""
    room = threading.Event()

    class FullProducer(Producer):
        def produce(self, topic: str, key: bytes, value: bytes, on_delivery: Callable) -> None:
            if not room.is_set():
                raise BufferError("Local: Queue full")
            super().produce(topic, key, value, on_delivery)

        def poll(self, timeout: float) -> int:
            time.sleep(timeout)
            return super().poll(timeout)

    config = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0, "max_in_flight": 3, "snapshot_workers": 2},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
    )
    stage = FaceStage(config, no_video([]), None, None)  # type: ignore[arg-type]
    consumer = Consumer([])
    runner = FaceStageRunner(config, stage, producer=FullProducer(0), consumer=consumer, recall=NOTHING)
    runner.offsets.add((TX_TOPIC, 0), 3, 1)
    runner._observing = 1
    runner._done.put((tx_message(3, "tx-3"), "checkout:tx-3", RuntimeError("camera")))  # drained at the stop
    stop = threading.Event()
    stop.set()  # SIGTERM before the first poll
    worker = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    started = time.monotonic()
    try:
        worker.start()
        worker.join(6)
        took = time.monotonic() - started
    finally:
        room.set()  # without the fix: lets the stuck stop end
    assert not worker.is_alive() and took < 2.5, f"the stop took {took:.1f}s, the stop timeout is 2.5s"
    assert consumer.commits.get((TX_TOPIC, 0), 3) == 3, "the record whose dead letter was given up was committed"


def test_the_stops_deadline_counts_from_when_the_stop_was_asked_not_from_when_the_loop_got_to_it() -> None:
    """The stage took its stop's deadline (1 s before the supervisor's SIGKILL) when its loop ended: a Kafka call in
    the loop that hung after SIGTERM (a synchronous commit, Kafka down) was not counted, and the last commit and close
    ran that much past the SIGKILL. The deadline counts from when the stop was asked."""
    from infra.processes import StopRequest

    stop = StopRequest()

    class HangingConsumer(Consumer):
        def poll(self, timeout: float) -> Message | None:
            stop.set()  # SIGTERM arrives while the loop waits on Kafka ...
            time.sleep(1.0)  # ... which answers only a second later
            return None

    config = Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0, "max_in_flight": 3, "snapshot_workers": 2},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
    )
    stage = FaceStage(config, no_video([]), None, None)  # type: ignore[arg-type]
    runner = FaceStageRunner(config, stage, producer=Producer(0), consumer=HangingConsumer([]), recall=NOTHING)
    runner.run(stop)
    assert stop.asked_at is not None and runner._exit_by is not None
    late = runner._exit_by - (stop.asked_at + 2.5 - 1.0)
    assert abs(late) < 0.05, f"the stop's last calls end {late:.2f}s after 1 s before the SIGKILL"
