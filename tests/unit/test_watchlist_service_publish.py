"""The watchlist service rides out a broker that is away: a failed transaction is retried or aborted and
redone; the input's offset is committed afterwards, without blocking."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from infra.processes import StopRequest
from jobs.faces import watchlist_service
from jobs.faces.watchlist_service import Out, WatchlistService
from schemas.topics import AUDIT


class FlakyTransactions:
    """A transactional producer whose first transactions fail as a restarting broker makes them fail."""

    def __init__(self, failures: list[KafkaError]) -> None:
        self.failures = failures
        self.calls: list[str] = []
        self.committed: list[list[bytes]] = []
        self._open: list[bytes] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")
        self._open = []

    def produce(self, topic: str, key: bytes, value: bytes | None) -> None:
        self._open.append(key)

    def send_offsets_to_transaction(self, offsets, metadata, timeout: float) -> None:
        raise AssertionError("blocks for good when the group coordinator restarts (librdkafka 5456)")

    def commit_transaction(self, timeout: float) -> None:
        self.calls.append("commit")
        if self.failures:
            raise KafkaException(self.failures.pop(0))
        self.committed.append(self._open)

    def abort_transaction(self, timeout: float) -> None:
        self.calls.append("abort")
        self._open = []


class Group:
    def __init__(self) -> None:
        self.commits: list[list] = []

    def consumer_group_metadata(self) -> object:
        return object()

    def commit(self, offsets: list, asynchronous: bool) -> None:
        assert asynchronous, "a commit must not block while the coordinator is away"
        self.commits.append(offsets)


def service(producer: FlakyTransactions) -> WatchlistService:
    svc = WatchlistService.__new__(WatchlistService)
    svc.producer, svc.consumer, svc.prefix, svc._stop = producer, Group(), "", StopRequest()
    svc.settings = watchlist_service.Settings()
    return svc


def test_a_transaction_failing_while_the_broker_restarts_is_retried_and_lands_once_then_its_offset(
    monkeypatch,
) -> None:
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    timed_out = KafkaError(KafkaError._TIMED_OUT, "coordinator away", retriable=True)
    abortable = KafkaError(KafkaError._STATE, "needs abort", txn_requires_abort=True)
    producer = FlakyTransactions([timed_out, abortable])
    svc = service(producer)
    svc._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    assert producer.committed == [[b"a-1"]], "the outputs landed once"
    assert producer.calls == ["begin", "commit", "commit", "abort", "begin", "commit"]
    assert svc.consumer.commits == [["offset"]], "the offset moves after the outputs, once"


def test_a_fatal_error_is_not_retried(monkeypatch) -> None:
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    producer = FlakyTransactions([KafkaError(KafkaError._FENCED, "fenced", fatal=True)])
    svc = service(producer)
    with pytest.raises(KafkaException):
        svc._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    assert producer.committed == [] and svc.consumer.commits == []


def test_a_long_start_up_read_keeps_the_service_alive_and_goes_on_while_records_come(monkeypatch) -> None:
    """A year of audit takes longer to read than any fixed deadline: the read must fail only when records stop
    coming, and /healthz must not call the service hung while it reads (its supervisor would restart it, and the
    restart would read it all again)."""
    from infra.clients import control_topics
    from infra.metrics import Heartbeat

    now = [0.0]
    svc = WatchlistService.__new__(WatchlistService)
    svc.settings, svc._stop = watchlist_service.Settings(), StopRequest()
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    calls: list[dict] = []

    def read(_settings, apply, **kwargs) -> dict:
        calls.append(kwargs)
        for _ in range(600):  # ten minutes of records, one a second
            now[0] += 1.0
            apply(AUDIT.full_name(""), b"command:c1", b"v")
            assert svc.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of reading"
        return {}

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    read_keys: list[bytes | None] = []
    assert svc.replay(AUDIT, lambda key, _value: read_keys.append(key)) == 600 == len(read_keys)
    assert calls[0]["stall_s"] is not None and calls[0]["timeout_s"] < svc.heartbeat.stale_s


class _Message:
    def __init__(self, topic: str, offset: int, value: bytes, partition: int = 0) -> None:
        self._topic, self._offset, self._value, self._partition = topic, offset, value, partition

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return b"a-1"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list:
        return []

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_800_000_000_000)


class _Log(Group):
    """A consumer over a few records: ``seek`` rewinds to an offset, as confluent-kafka's does; stops the service
    once it has nothing left to give."""

    def __init__(self, svc: WatchlistService, records: list[_Message]) -> None:
        super().__init__()
        self.svc, self.records, self.position, self.seeks = svc, records, 0, []
        self.callbacks: dict = {}

    def subscribe(self, topics: list[str], **callbacks) -> None:
        self.callbacks = callbacks

    def poll(self, timeout: float) -> _Message | None:
        if self.position >= len(self.records):
            self.svc._stop.set()
            return None
        self.position += 1
        return self.records[self.position - 1]

    def seek(self, where) -> None:
        self.seeks.append(where.offset)
        self.position = next(i for i, m in enumerate(self.records) if m.offset() == where.offset)

    def close(self) -> None:
        pass


def _reading_one_alert(svc, core, alert, monkeypatch, consumer=None) -> None:
    """Wire ``svc`` to read ``alert`` (offset 7 of ``alerts``) and nothing else, with ``core`` and 1 ms S3 backoffs."""
    from infra.metrics import Heartbeat
    from infra.retry import Backoff

    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    monkeypatch.setattr(WatchlistService, "STORE_BACKOFF", Backoff(initial_s=0.001, maximum_s=0.001), raising=False)
    svc.producer.init_transactions = lambda _timeout: None
    svc.producer.poll = lambda _timeout: 0
    svc.core, svc.heartbeat, svc._next_purge, svc._held = core, Heartbeat(), float("inf"), {}
    svc._processing = watchlist_service.metrics.PROCESSING_SECONDS.labels(watchlist_service.PROCESS)
    svc.topics = {"alerts": core.on_alert}
    svc.consumer = (consumer or _Log)(svc, [_Message("alerts", 7, alert.encode())])
    monkeypatch.setattr(svc, "replay", lambda _spec, _apply: 0, raising=False)


def test_an_s3_outage_while_an_alert_snapshot_is_retained_is_waited_out_not_fatal(tmp_path, monkeypatch) -> None:
    """S3 away (no connection, a timeout, a 503) while an alert's snapshot was retained raised out of the service:
    it stopped, and at every restart by the supervisor read the same alert and stopped again for as long as S3 was
    away. Now the alert is read again after a backoff, nothing committed meanwhile, and retained once S3 is back."""
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from infra.clients.image_store import LocalImageStore
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore, retain_reason
    from schemas.records import Alert

    outage = [
        EndpointConnectionError(endpoint_url="https://s3.example"),
        ReadTimeoutError(endpoint_url="https://s3.example"),
        ClientError({"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Tag"),
    ]

    class AwayStore(LocalImageStore):
        def retain(self, ref: str, reason: str) -> None:
            if outage:
                raise outage.pop(0)
            super().retain(ref, reason)

    store = AwayStore(tmp_path / "images")
    snapshot = store.put("checkout", "tx-9", b"a shopper at a lane")
    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=object(), store=store)  # type: ignore[arg-type]
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect", snapshot_ref=snapshot)
    producer = FlakyTransactions([])
    svc = service(producer)
    _reading_one_alert(svc, core, alert, monkeypatch)
    svc.run()
    assert svc.consumer.seeks == [7, 7, 7], "read again after each failure, from the alert itself"
    assert store.retained() == {snapshot: retain_reason("a-1", None)}, "the snapshot was left to the purge"
    assert producer.committed == [[b"retain:a-1"]], "one RETAIN, once S3 was back"
    assert [o[0].offset for o in svc.consumer.commits] == [8], "the offset moves only once the alert is retained"
    assert svc._store_problem is None and f"retain:{alert.alert_id}" in core.done


def test_readyz_stops_naming_the_image_store_once_a_rebalance_takes_the_waiting_alerts_partition(
    tmp_path, monkeypatch
) -> None:
    """An alert waiting for S3 set "image store unreachable", cleared only by an alert this instance processed: after
    a rebalance took the alert's partition (its new owner reads it), /readyz stayed 503 until another alert came."""
    from botocore.exceptions import EndpointConnectionError
    from confluent_kafka import TopicPartition

    from infra.clients.image_store import LocalImageStore
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore
    from schemas.records import Alert

    class AwayStore(LocalImageStore):
        def retain(self, ref: str, reason: str) -> None:
            raise EndpointConnectionError(endpoint_url="https://s3.example")

    readiness: list[tuple[bool, str]] = []

    class Rebalanced(_Log):
        """The alert meets S3 away once; the next poll revokes its partition (as confluent-kafka does, from inside
        ``poll``), then the service idles with nothing to read."""

        def poll(self, timeout: float) -> _Message | None:
            if self.seeks and self.records:
                readiness.append(svc.heartbeat.ready())
                self.records = []
                if "on_revoke" in self.callbacks:
                    self.callbacks["on_revoke"](self, [TopicPartition("alerts", 0)])
                return None
            if not self.records and len(readiness) == 1:
                readiness.append(svc.heartbeat.ready())  # the loop beat once more while idle
            return super().poll(timeout)

    store = AwayStore(tmp_path / "images")
    snapshot = store.put("checkout", "tx-9", b"a shopper at a lane")
    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=object(), store=store)  # type: ignore[arg-type]
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect", snapshot_ref=snapshot)
    producer = FlakyTransactions([])
    svc = service(producer)
    _reading_one_alert(svc, core, alert, monkeypatch, Rebalanced)
    svc.run()
    assert readiness == [(False, "image store unreachable"), (True, "ok")]
    assert svc._held == {} and producer.committed == [], "nothing done here: the new owner retains it"


def test_the_purge_due_while_an_alert_waits_for_s3_keeps_that_alerts_snapshot(tmp_path, monkeypatch) -> None:
    """A sweep due while an alert waited for S3 to come back deleted the alert's snapshot when it was already past
    the retention (not retained yet): once S3 was back the alert failed missing_image and its case had no picture."""
    import os
    import time
    from types import SimpleNamespace

    from botocore.exceptions import EndpointConnectionError

    from infra.clients.image_store import LocalImageStore
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore, retain_reason
    from schemas.records import Alert

    svc = service(FlakyTransactions([]))

    class AwayStore(LocalImageStore):
        away = 1

        def retain(self, ref: str, reason: str) -> None:
            if self.away:
                self.away -= 1
                svc._next_purge = 0.0  # the sweep falls due while the alert waits
                raise EndpointConnectionError(endpoint_url="https://s3.example")
            super().retain(ref, reason)

    store = AwayStore(tmp_path / "images")
    snapshot = store.put("checkout", "tx-9", b"a shopper at a lane, two days ago")
    other = store.put("checkout", "tx-8", b"someone who matched nobody, two days ago")
    for ref in (snapshot, other):
        os.utime(store._path(ref), (time.time() - 48 * 3600,) * 2)
    settings = Settings(stack_dir=tmp_path)
    core = WatchlistCore(settings, engine=SimpleNamespace(embedder="sface"), store=store)  # type: ignore[arg-type]
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect", snapshot_ref=snapshot)
    svc.settings = settings
    _reading_one_alert(svc, core, alert, monkeypatch)
    svc.run()
    assert store.find("checkout", "tx-8") is None, "the sweep ran while the alert waited"
    assert store.retained() == {snapshot: retain_reason("a-1", None)}, "the sweep deleted the alert's snapshot"
    assert f"retain:{alert.alert_id}" in core.done and svc._held == {}


def test_slow_metadata_calls_before_the_first_record_keep_the_service_alive(monkeypatch) -> None:
    """Each of the start-up read's metadata calls (partitions, end and start offsets) may take its full timeout: with
    a few of them before the first record, /healthz went stale and the supervisor restarted the service."""
    from infra.clients import control_topics
    from infra.metrics import Heartbeat

    now = [0.0]
    svc = WatchlistService.__new__(WatchlistService)
    svc.settings, svc._stop = watchlist_service.Settings(), StopRequest()
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])

    def read(_settings, _apply, **kwargs) -> dict:
        for _ in range(4):  # four metadata calls of 30 s each, no record yet
            now[0] += 30.0
            kwargs.get("beat", lambda: None)()
            assert svc.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of metadata calls"
        return {}

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    assert svc.replay(AUDIT, lambda _key, _value: None) == 0


def test_a_commit_retried_while_kafka_is_away_keeps_healthz_alive_and_readyz_naming_kafka(monkeypatch) -> None:
    """Each commit try waits up to 30 s: four unbeaten ones took /healthz past its 60 s to 503, and the supervisor
    restarted a service that was only waiting for Kafka (the README: an outage is ``degraded``, never a restart)."""
    from infra.metrics import Heartbeat

    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    now = [0.0]
    heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    timed_out = KafkaError(KafkaError._TIMED_OUT, "coordinator away", retriable=True)
    seen: list[tuple[tuple[bool, str], tuple[bool, str]]] = []

    class SlowCommits(FlakyTransactions):
        def commit_transaction(self, timeout: float) -> None:
            seen.append((heartbeat(), heartbeat.ready()))  # what a probe asking now is told
            if self.failures:
                now[0] += timeout
            super().commit_transaction(timeout)

    producer = SlowCommits([timed_out] * 4)
    svc = service(producer)
    svc.heartbeat = heartbeat
    svc._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    assert producer.committed == [[b"a-1"]]
    assert [alive for (alive, _), _ in seen] == [True] * 5, seen
    assert seen[-1][1] == (False, "Kafka unreachable")


class _Collection:
    """A Rekognition client whose CreateCollection gives ``errors`` first, then works."""

    def __init__(self, errors: list[Exception], seen: list) -> None:
        self.errors, self.seen, self.collection, self.created = errors, seen, "cg-faces", 0
        self.progress: Any = None

    def ensure_collection(self) -> None:
        self.seen.append(self)
        try:
            if self.errors:
                raise self.errors.pop(0)
            self.created += 1
        finally:  # as the real client: after each call, answered or failed
            if self.progress is not None:
                self.progress()


def _rekognition_service(tmp_path, monkeypatch, errors: list[Exception]):
    """A service with the Rekognition backend, whose client is :class:`_Collection`, reading nothing."""
    from infra.metrics import Heartbeat
    from infra.retry import Backoff
    from infra.settings import FaceSettings, Settings
    from jobs.faces.watchlist_service import WatchlistCore

    clients: list[_Collection] = []
    monkeypatch.setattr(watchlist_service, "RekognitionFaces", lambda _faces, **_kwargs: _Collection(errors, clients))
    core = WatchlistCore(
        Settings(stack_dir=tmp_path, faces=FaceSettings(backend="rekognition")),
        engine=object(),  # type: ignore[arg-type]
    )
    svc = service(FlakyTransactions([]))
    readiness: list[tuple[bool, str]] = []
    svc.heartbeat = Heartbeat()
    monkeypatch.setattr(WatchlistService, "COLLECTION_BACKOFF", Backoff(initial_s=0.001, maximum_s=0.001))
    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: readiness.append(svc.heartbeat.ready()))
    svc.producer.init_transactions = lambda _timeout: None
    svc.producer.poll = lambda _timeout: 0
    svc.core, svc._next_purge, svc._held, svc.topics = core, float("inf"), {}, {}
    svc.consumer = _Log(svc, [])
    monkeypatch.setattr(svc, "replay", lambda _spec, _apply: 0, raising=False)
    return svc, core, readiness


def test_rekognition_refusing_the_collection_at_the_start_is_waited_out_with_readyz_saying_so(
    tmp_path, monkeypatch
) -> None:
    """CreateCollection throttled or failing with a 5xx at the start stopped the service for good (it was called
    while the service was built, before /readyz could say anything); now it is tried again after a backoff."""
    from jobs.faces.rekognition import RekognitionError

    errors: list[Exception] = [
        RekognitionError("ThrottlingException", "slow down", transient=True),
        RekognitionError("InternalServerError", "boom", transient=True),
    ]
    svc, core, readiness = _rekognition_service(tmp_path, monkeypatch, errors)
    assert core.collection_pending, "nothing is called while the service is built"
    svc.run()
    assert isinstance(core.rekognition, _Collection) and core.rekognition.created == 1
    assert len(core.rekognition.seen) == 3 and not core.collection_pending
    assert readiness and set(readiness) == {(False, "Rekognition unreachable")}
    assert svc.heartbeat.ready() == (True, "ok"), "ready once the collection is there"


def test_readyz_keeps_saying_rekognition_unreachable_between_collection_tries_until_one_works(
    tmp_path, monkeypatch
) -> None:
    """The beat after each failed CreateCollection cleared "Rekognition unreachable" until the backoff's pause set it
    again (/readyz flickered ready between tries); now only a call that worked clears it."""
    from jobs.faces.rekognition import RekognitionError

    errors: list[Exception] = [RekognitionError("ThrottlingException", "slow down", transient=True)] * 3
    svc, core, _ = _rekognition_service(tmp_path, monkeypatch, errors)
    svc._watch_rekognition()
    assert isinstance(core.rekognition, _Collection)
    after_call: list[tuple[bool, str]] = []
    beat = core.rekognition.progress
    assert beat is not None, "the service beats after each Rekognition call"

    def beat_and_look() -> None:
        beat()
        after_call.append(svc.heartbeat.ready())

    core.rekognition.progress = beat_and_look
    svc.run()
    assert len(after_call) == 4 and core.rekognition.created == 1
    assert after_call[1:] == [(False, "Rekognition unreachable")] * 3, "cleared by a failed call's beat"
    assert svc.heartbeat.ready() == (True, "ok"), "ready once the collection is there"


def test_a_collection_setup_error_no_wait_heals_stops_the_service_saying_why(tmp_path, monkeypatch, caplog) -> None:
    import logging

    from jobs.faces.rekognition import RekognitionError

    denied = RekognitionError("AccessDeniedException", "not allowed")
    svc, core, _ = _rekognition_service(tmp_path, monkeypatch, [denied])
    with caplog.at_level(logging.ERROR, logger="jobs.faces.watchlist_service"), pytest.raises(RekognitionError):
        svc.run()
    assert isinstance(core.rekognition, _Collection) and len(core.rekognition.seen) == 1, "not tried again"
    [line] = [r.getMessage() for r in caplog.records if r.name == "jobs.faces.watchlist_service"]
    assert "stopping" in line and "AccessDeniedException" in line and "CG_FACES__AWS_ACCESS_KEY_ID" in line


def test_readyz_keeps_naming_the_image_store_while_another_partitions_alert_still_waits(tmp_path, monkeypatch) -> None:
    """An alert done on one partition cleared "image store unreachable" while an alert of another partition was still
    waiting for S3 (/readyz said ready, then unready again at that alert's next read)."""
    from botocore.exceptions import EndpointConnectionError

    from infra.clients.image_store import LocalImageStore
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore
    from schemas.records import Alert

    store_back = [False]

    class AwayStore(LocalImageStore):
        def retain(self, ref: str, reason: str) -> None:
            if ref == waiting and not store_back[0]:  # its bucket's S3 endpoint is away; the other's is not
                raise EndpointConnectionError(endpoint_url="https://s3.example")
            super().retain(ref, reason)

    store = AwayStore(tmp_path / "images")
    waiting = store.put("checkout", "tx-9", b"a shopper at lane 9")
    done = store.put("checkout", "tx-8", b"a shopper at lane 8")
    alerts = [
        Alert(f"a-{tx}", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect", snapshot_ref=ref)
        for tx, ref in ((9, waiting), (8, done))
    ]
    readiness: list[tuple[bool, str]] = []

    class TwoPartitions(_Log):
        """Partition 1's alert meets S3 away; partition 0's alert is read next and done; then S3 is back and the
        waiting alert is read again."""

        def poll(self, timeout: float) -> _Message | None:
            if self.position:
                readiness.append(svc.heartbeat.ready())
            if self.position == 2:
                store_back[0] = True
            return super().poll(timeout)

        def seek(self, where) -> None:
            self.seeks.append((where.partition, where.offset))

    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=object(), store=store)  # type: ignore[arg-type]
    producer = FlakyTransactions([])
    svc = service(producer)
    _reading_one_alert(svc, core, alerts[0], monkeypatch)
    svc.consumer = TwoPartitions(
        svc,
        [
            _Message("alerts", 7, alerts[0].encode(), partition=1),
            _Message("alerts", 3, alerts[1].encode(), partition=0),
            _Message("alerts", 7, alerts[0].encode(), partition=1),
        ],
    )
    svc.run()
    assert svc.consumer.seeks == [(1, 7)]
    assert readiness[:2] == [(False, "image store unreachable")] * 2, "partition 1's alert still waited"
    assert readiness[2:] == [(True, "ok")], "ready once no alert waits"
    assert producer.committed == [[b"retain:a-8"], [b"retain:a-9"]] and svc._held == {}


def test_the_watchlist_services_rekognition_calls_time_out_in_seconds_within_the_healthz_limit(tmp_path) -> None:
    """The service built its Rekognition client with botocore's 60 s connect and read timeouts: one CreateCollection,
    IndexFaces or ListFaces to an endpoint that does not answer outlasted /healthz's 60 s, and the supervisor restarted
    the service while an alert waited minutes. Now each try times out as the face stage's do."""
    from infra.metrics import Heartbeat
    from infra.settings import FaceSettings, Settings
    from jobs.faces.rekognition import ATTEMPTS, call_limit_s
    from jobs.faces.watchlist_service import WatchlistCore, health_limit_s

    faces = FaceSettings(backend="rekognition", aws_region="eu-west-1", rekognition_search_timeout_s=3.0)
    settings = Settings(stack_dir=tmp_path, faces=faces)
    core = WatchlistCore(settings, engine=object())  # type: ignore[arg-type]
    assert core.rekognition is not None
    config = core.rekognition.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3.0, 3.0)
    assert config.retries == {"mode": "standard", "total_max_attempts": ATTEMPTS}, "max_attempts are retries: 5 tries"
    default = Heartbeat().stale_s
    assert health_limit_s(settings, default) > call_limit_s(3.0), "one bounded call outlasted /healthz"
    assert health_limit_s(settings, default) == default, "3 s tries fit the usual 60 s"
    slow = Settings(stack_dir=tmp_path, faces=faces.model_copy(update={"rekognition_search_timeout_s": 20.0}))
    assert health_limit_s(slow, default) > call_limit_s(20.0)
    assert health_limit_s(Settings(stack_dir=tmp_path), default) == default, "the local backend makes no such call"


def test_one_s3_call_that_waits_out_its_timeouts_keeps_healthz_alive_with_the_local_backend(tmp_path) -> None:
    """Only Rekognition's calls raised the /healthz limit: with the local face backend and the S3 image store, one S3
    call that did not answer (4 tries, each timing out connecting and reading at 5 s, botocore's waits between) took
    62 s, past the 60 s, and the supervisor restarted a service that was only waiting for S3."""
    from infra.clients.aws import standard_retry_wait_s
    from infra.clients.image_store import S3ImageStore
    from infra.metrics import Heartbeat
    from infra.settings import FaceSettings, Settings
    from jobs.faces.watchlist_service import health_limit_s

    default = Heartbeat().stale_s
    for timeout_s in (FaceSettings().image_store_timeout_s, 30.0):
        faces = FaceSettings(image_store="s3", aws_endpoint_url="http://127.0.0.1:9", image_store_timeout_s=timeout_s)
        settings = Settings(stack_dir=tmp_path, faces=faces)
        assert settings.faces.backend == "local"
        config = S3ImageStore(settings).s3.meta.config  # the client the service calls S3 with (no request is made)
        tries = config.retries["total_max_attempts"]
        longest = tries * (config.connect_timeout + config.read_timeout) + standard_retry_wait_s(tries)
        assert health_limit_s(settings, default) > longest > default, timeout_s


def test_a_command_of_several_slow_rekognition_calls_keeps_healthz_alive(tmp_path) -> None:
    """A forget lists the subject's faces (page by page), then deletes them: each call bounded, but together longer
    than /healthz's 60 s, which took the service for hung. Each call that ends now counts as progress."""
    from infra.metrics import Heartbeat
    from infra.settings import FaceSettings
    from jobs.faces.rekognition import RekognitionFaces

    now = [0.0]
    svc = service(FlakyTransactions([]))
    svc.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    seen: list[tuple[bool, str]] = []

    class SlowCollection:
        def list_faces(self, **kwargs) -> dict:
            seen.append(svc.heartbeat())
            now[0] += 40.0
            more = {"NextToken": "page-2"} if "NextToken" not in kwargs else {}
            return {"Faces": [{"FaceId": f"f-{len(seen)}", "ExternalImageId": "subj-tx-1"}], **more}

        def delete_faces(self, **_kwargs) -> dict:
            seen.append(svc.heartbeat())
            now[0] += 40.0
            return {}

    from types import SimpleNamespace

    rekognition = RekognitionFaces(FaceSettings(backend="rekognition"), client=SlowCollection())
    svc.core = SimpleNamespace(rekognition=rekognition)
    svc._store_problem = None
    svc._watch_rekognition()
    assert rekognition.forget("subj-tx-1") == 2
    assert [alive for alive, _ in seen] == [True] * 3, seen
    assert svc.heartbeat()[0], "stale after the last call"


def test_a_transaction_commit_hanging_on_kafka_at_a_stop_is_given_up_by_the_stops_deadline_uncommitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM came while a transaction's commit waited on Kafka (down): the commit waited its 30 s, past the
    supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM), and so did the consumer's close after
    it. Both are given up 1 s before the SIGKILL, counted from the SIGTERM, and the input's offset is not committed."""
    import threading
    import time

    released = threading.Event()
    closed: list[bool] = []
    stopped_at: list[float] = []

    class HangingCommit(FlakyTransactions):
        def init_transactions(self, timeout: float) -> None:
            pass

        def poll(self, timeout: float) -> int:
            return 0

        def commit_transaction(self, timeout: float) -> None:
            stopped_at.append(time.monotonic())
            svc.stop()  # SIGTERM arrives while the commit waits on Kafka ...
            released.wait(4.0)  # ... which does not answer

    class OneRecord(Group):
        def __init__(self) -> None:
            super().__init__()
            self.records = [_Message("commands", 3, b"v")]

        def subscribe(self, topics: list[str], **callbacks: Any) -> None:
            pass

        def poll(self, timeout: float) -> _Message | None:
            return self.records.pop() if self.records else None

        def close(self) -> None:
            released.wait(4.0)  # the close waits on Kafka too
            closed.append(True)

    class Core:
        rekognition = None
        entries: dict = {}

        def load(self, _key: bytes | None, _value: bytes | None) -> None:
            pass

        load_audit = load

        def ensure_collection(self) -> None:
            pass

        def close(self) -> None:
            pass

    svc = service(HangingCommit([]))
    svc.settings = _stop_settings()
    svc.consumer = OneRecord()
    svc.core, svc.heartbeat, svc._next_purge, svc._held = Core(), None, float("inf"), {}  # type: ignore[assignment]
    svc._processing = watchlist_service.metrics.PROCESSING_SECONDS.labels(watchlist_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: [Out(AUDIT, b"a-1", b"v")]}
    svc.replay = lambda _spec, _apply: 0  # type: ignore[method-assign]
    try:
        svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung calls end now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert svc.consumer.commits == [], "the input of a transaction given up was committed"
    assert not closed, "the consumer's close waits on Kafka: it is given up, not waited for"
    assert any(r.levelname == "WARNING" and "given up" in r.getMessage() for r in caplog.records)


class _OneRecord(Group):
    """A consumer of one command (whose value is a secret) whose close raises ``close_error`` (None: none)."""

    def __init__(self, close_error: Exception | None = None) -> None:
        super().__init__()
        self.records = [_Message("commands", 3, b"secret-record-value")]
        self.close_error = close_error

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def poll(self, timeout: float) -> _Message | None:
        return self.records.pop() if self.records else None

    def close(self) -> None:
        if self.close_error is not None:
            raise self.close_error


class _IdleCore:
    """A watchlist core with nothing to load, no collection to make, nothing to close."""

    rekognition = None
    entries: dict = {}

    def load(self, _key: bytes | None, _value: bytes | None) -> None:
        pass

    load_audit = load

    def ensure_collection(self) -> None:
        pass

    def close(self) -> None:
        pass


class _StopProducer(FlakyTransactions):
    """The stop tests' producer: nothing to initialise or poll; what is produced is recorded in ``calls``."""

    def init_transactions(self, timeout: float) -> None:
        pass

    def produce(self, topic: str, key: bytes, value: bytes | None, **_headers: Any) -> None:
        super().produce(topic, key, value)

    def poll(self, timeout: float) -> int:
        return 0


def _stop_settings(**fields: Any) -> Any:
    """The stop tests' settings (and ``fields``): the supervisor's SIGKILL 2.5 s after the SIGTERM, so a call under
    way is given up by 1.5 s, the other stop waits short."""
    from infra.settings import Settings

    return Settings(
        supervisor={"stop_timeout_s": 2.5},
        cameras={"bridge_stop_grace_s": 1.0},
        kafka={"stop_flush_s": 0.5},
        alerts={"stop_wait_s": 0.2},
        **fields,
    )


def _forget_at_a_stop(settings: Any, core: Any, producer: FlakyTransactions) -> WatchlistService:
    """A service over ``core`` whose one input is a DPO's forget, its image stores' and Rekognition's calls watched
    as at a start."""
    from tests.unit.test_watchlist_service import NOW, command

    svc = service(producer)
    svc.settings = settings
    svc.consumer = _OneRecord()
    svc.core, svc.heartbeat, svc._next_purge, svc._held = core, None, float("inf"), {}
    svc._processing = watchlist_service.metrics.PROCESSING_SECONDS.labels(watchlist_service.PROCESS)
    forget = command("FORGET", "subj-tx-1", cid="c5", actor="dpo@example.com")
    svc.topics = {"commands": lambda _src, _now: core.on_command(forget, NOW)}
    svc.replay = lambda _spec, _apply: 0  # type: ignore[method-assign]
    svc._watch_rekognition()
    svc._watch_image_stores()
    return svc


def test_a_rekognition_call_under_way_at_a_stop_is_given_up_by_the_stops_deadline_its_command_uncommitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM came while a command's Rekognition call (a forget's ListFaces) waited on AWS: with botocore's tries and
    waits that is up to a minute, and the supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after the SIGTERM) cut
    it short. The call is now given up 1 s before the SIGKILL, nothing is published, and the command's offset is not
    committed: the next start reads it again."""
    import threading
    import time

    from infra.settings import FaceSettings
    from jobs.faces.rekognition import RekognitionFaces

    released = threading.Event()
    stopped_at: list[float] = []

    class HangingRekognition:
        def list_faces(self, **_kwargs: Any) -> dict:
            stopped_at.append(time.monotonic())
            svc.stop()  # SIGTERM arrives while the call waits on AWS ...
            released.wait(4.0)  # ... which does not answer (botocore's tries and waits)
            return {"Faces": []}

    rekognition = RekognitionFaces(FaceSettings(backend="rekognition"), client=HangingRekognition())

    core = _IdleCore()
    core.rekognition = rekognition  # type: ignore[assignment]
    producer = _StopProducer([])
    svc = service(producer)
    svc.settings = _stop_settings()
    svc.consumer = _OneRecord()
    svc.core, svc.heartbeat, svc._next_purge, svc._held = core, None, float("inf"), {}  # type: ignore[assignment]
    svc._processing = watchlist_service.metrics.PROCESSING_SECONDS.labels(watchlist_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: [Out(AUDIT, b"a-1", str(rekognition.forget("subj-1")).encode())]}
    svc.replay = lambda _spec, _apply: 0  # type: ignore[method-assign]
    svc._watch_rekognition()
    try:
        with caplog.at_level("WARNING"):
            svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung call ends now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert producer.calls == [] and svc.consumer.commits == [], "a command given up was published or committed"
    assert any(r.levelname == "WARNING" and "Rekognition did not finish" in r.getMessage() for r in caplog.records)


def test_an_s3_call_under_way_at_a_stop_is_given_up_by_the_stops_deadline_its_command_uncommitted(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came while a ``forget``'s S3 call (looking for the subject's reference image) waited on S3: 4 tries of
    5 s connect and 5 s read and botocore's waits between, up to 62 s, and only Rekognition's calls were given up at
    the stop, so the supervisor's SIGKILL cut the service short mid-command. The S3 call is now given up as a
    Rekognition call is, 1 s before the SIGKILL: nothing is published, and the command's offset is not committed."""
    import threading
    import time

    from pydantic import SecretStr

    from infra.clients.image_store import S3ImageStore
    from jobs.faces.watchlist_service import WatchlistCore
    from tests.unit.test_watchlist_service import ALLOWED, KEY

    released = threading.Event()
    stopped_at: list[float] = []

    class HangingS3:
        def head_object(self, **_kwargs: Any) -> dict:
            stopped_at.append(time.monotonic())
            svc.stop()  # SIGTERM arrives while the call waits on S3 ...
            released.wait(4.0)  # ... which does not answer (botocore's tries and waits)
            return {}

        def __getattr__(self, _op: str) -> Any:
            return lambda **_kwargs: {}  # every other call answers at once: nothing there

    settings = _stop_settings(
        stack_dir=tmp_path,
        faces={"image_store": "s3", "aws_endpoint_url": "http://127.0.0.1:9"},
        webex={"command_signing_key": SecretStr(KEY), "allowed_people": ALLOWED},
    )
    store = S3ImageStore(settings)
    store.s3 = HangingS3()
    core = WatchlistCore(settings, engine=object(), store=store)  # type: ignore[arg-type]  # forget needs no engine
    producer = _StopProducer([])
    svc = _forget_at_a_stop(settings, core, producer)
    try:
        with caplog.at_level("WARNING"):
            svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung call ends now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert producer.calls == [] and svc.consumer.commits == [], "a command given up was published or committed"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("S3 did not finish its head_object" in message for message in warned), warned


def test_a_local_image_stores_file_operation_stuck_at_a_stop_is_given_up_by_the_stops_deadline_its_command_uncommitted(
    tmp_path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came while a ``forget`` looked for the subject's reference image in the local image store, its folder on
    a network mount (NFS, EFS) whose server stopped answering: the file system call blocked in the service's main
    thread, where only the S3 store's calls were given up at the stop, so the supervisor's SIGKILL cut the service
    short mid-command. The file operation is now given up as an S3 call is, 1 s before the SIGKILL: nothing is
    published, and the command's offset is not committed."""
    import time

    from pydantic import SecretStr

    from jobs.faces.watchlist_service import WatchlistCore
    from tests.unit.test_image_store import StuckMount
    from tests.unit.test_watchlist_service import ALLOWED, KEY

    settings = _stop_settings(
        stack_dir=tmp_path, webex={"command_signing_key": SecretStr(KEY), "allowed_people": ALLOWED}
    )
    core = WatchlistCore(settings, engine=object())  # type: ignore[arg-type]  # forget needs no engine
    stopped_at: list[float] = []

    def sigterm() -> None:
        stopped_at.append(time.monotonic())
        svc.stop()

    mount = StuckMount(monkeypatch, tmp_path / "images", on_block=sigterm)
    producer = _StopProducer([])
    svc = _forget_at_a_stop(settings, core, producer)
    mount.stuck.set()  # the mount stops answering; SIGTERM arrives while the forget waits on it
    try:
        with caplog.at_level("WARNING"):
            svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        mount.stuck.clear()
        mount.released.set()  # the mount answers again
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert producer.calls == [] and svc.consumer.commits == [], "a command given up was published or committed"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("the local image store did not finish its find" in message for message in warned), warned


@pytest.mark.parametrize("lookup", ["former", "store_of"])
def test_a_look_for_the_local_image_folder_stuck_at_a_stop_is_given_up_by_the_stops_deadline(
    tmp_path, monkeypatch, lookup: str
) -> None:
    """With the S3 image store, a ``forget`` and the retention sweep look for the local image folder (a former store)
    and a local reference image's folder (the store its ref names), a few ``stat`` calls: on a network mount that
    stopped answering they blocked as the store's own file operations did. Once the stop is asked they are given up by
    its deadline too."""
    import time

    from infra.clients.image_store import KINDS, S3ImageStore
    from infra.clients.transactional import TransactionGivenUp
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore
    from tests.unit.test_image_store import StuckMount

    settings = Settings(stack_dir=tmp_path, faces={"image_store": "s3", "aws_endpoint_url": "http://127.0.0.1:9"})
    for kind in KINDS:
        (tmp_path / "images" / kind).mkdir(parents=True)
    core = WatchlistCore(settings, engine=object(), store=S3ImageStore(settings))  # type: ignore[arg-type]
    asked_at = time.monotonic()
    core.give_up_store_calls_by(lambda: asked_at + 0.3)  # the stop asked: its deadline
    mount = StuckMount(monkeypatch, tmp_path / "images")
    mount.stuck.set()
    try:
        with pytest.raises(TransactionGivenUp, match="the local image store did not finish"):
            core.former() if lookup == "former" else core.store_of("file:reference/subj-1")
        took = time.monotonic() - asked_at
        assert took < 1.0, f"given up after {took:.1f} s, past the stop's deadline"
        assert mount.blocked.is_set()
    finally:
        mount.stuck.clear()
        mount.released.set()


@pytest.mark.parametrize("failing", ["commit", "close"])
def test_a_kafka_error_after_the_stop_is_one_warning_and_a_clean_exit_with_the_input_uncommitted(
    failing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The brokers went away at the stop: the transaction's commit (or the consumer's close) failed with a Kafka error,
    which ended the service with a traceback and exit 1. Once the stop is asked it is one WARNING, no record in it, and
    the service returns (exit 0) with the input not committed, read again at the next start."""
    gone = KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down"))

    class GoneAtStop(FlakyTransactions):
        def init_transactions(self, timeout: float) -> None:
            pass

        def poll(self, timeout: float) -> int:
            return 0

        def commit_transaction(self, timeout: float) -> None:
            svc.stop()  # SIGTERM, and the brokers go away
            if failing == "commit":
                raise gone

    svc = service(GoneAtStop([]))
    svc.consumer = _OneRecord(gone if failing == "close" else None)
    svc.core, svc.heartbeat, svc._next_purge, svc._held = _IdleCore(), None, float("inf"), {}  # type: ignore[assignment]
    svc._processing = watchlist_service.metrics.PROCESSING_SECONDS.labels(watchlist_service.PROCESS)
    svc.topics = {"commands": lambda _src, _now: [Out(AUDIT, b"a-1", b"secret-record-value")]}
    svc.replay = lambda _spec, _apply: 0  # type: ignore[method-assign]
    with caplog.at_level("WARNING"):
        svc.run()  # returns: no traceback, exit 0
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "_TRANSPORT" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert warnings[0].exc_info is None and "secret" not in warnings[0].getMessage()
    if failing == "commit":
        assert svc.consumer.commits == [], "the input of a transaction that failed was committed"


@pytest.mark.parametrize("hanging", ["replay", "init_transactions"])
def test_a_stop_during_the_start_ends_a_start_up_call_hanging_on_kafka_by_the_stops_deadline(
    hanging: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came while a start-up call waited on Kafka (down): a start-up read of a topic (up to 30 s per metadata
    call) or the producer's ``init_transactions`` (30 s) ran on past the supervisor's SIGKILL. Both now end 1 s before
    it, counted from the SIGTERM, as the loop's Kafka calls do, and the read is told of the stop."""
    import threading
    import time

    from infra.clients import control_topics

    released = threading.Event()
    stopped_at: list[float] = []
    reads: list[dict] = []

    def sigterm_and_hang() -> None:
        stopped_at.append(time.monotonic())
        svc.stop()
        released.wait(4.0)  # Kafka does not answer

    def read(_settings, _apply, **kwargs) -> dict:
        reads.append(kwargs)
        if hanging == "replay":
            sigterm_and_hang()
        return {}

    class HangingStart(FlakyTransactions):
        def init_transactions(self, timeout: float) -> None:
            if hanging == "init_transactions":
                sigterm_and_hang()

    monkeypatch.setattr(control_topics, "read_control_topics", read)
    svc = service(HangingStart([]))
    svc.settings = _stop_settings()
    svc.consumer = _OneRecord()
    svc.core, svc.heartbeat, svc._next_purge, svc._held = _IdleCore(), None, float("inf"), {}  # type: ignore[assignment]
    svc.topics = {}
    try:
        svc.run()
        took = time.monotonic() - stopped_at[0]
    finally:
        released.set()  # the hung calls end now
    assert took < 1.7, f"the stop took {took:.1f}s; the SIGKILL comes 2.5 s after the SIGTERM, its last calls by 1.5 s"
    assert reads and all(kwargs["stop"] is svc._stop for kwargs in reads), "the read is not told of the stop"
    assert any(r.levelname == "WARNING" and "given up" in r.getMessage() for r in caplog.records)


def test_a_failing_close_after_the_loops_own_error_is_a_warning_and_the_loops_error_is_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No stop asked: the loop died of its own error, then the consumer's close failed too, and the close's error was
    raised from ``finally``, hiding the one that said why the service died. The loop's error is now raised, the close's
    is one WARNING naming its type and Kafka code, never its words."""
    died = KafkaException(KafkaError(KafkaError._FATAL, "producer fenced"))

    class Dying(_OneRecord):
        def poll(self, timeout: float) -> _Message | None:
            raise died

    class Started(FlakyTransactions):
        def init_transactions(self, timeout: float) -> None:
            pass

        def poll(self, timeout: float) -> int:
            return 0

    svc = service(Started([]))
    svc.consumer = Dying(KafkaException(KafkaError(KafkaError._TRANSPORT, "secret-record-value")))
    svc.core, svc.heartbeat, svc._next_purge, svc._held = _IdleCore(), None, float("inf"), {}  # type: ignore[assignment]
    svc.topics = {}
    svc.replay = lambda _spec, _apply: 0  # type: ignore[method-assign]
    with caplog.at_level("WARNING"), pytest.raises(KafkaException) as raised:
        svc.run()
    assert raised.value is died, f"the close's error hid the loop's: {raised.value!r}"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "KafkaException _TRANSPORT" in warnings[0].getMessage(), warnings
    assert "secret" not in warnings[0].getMessage() and warnings[0].exc_info is None


def test_a_failing_close_with_no_loop_error_and_no_stop_is_still_raised() -> None:
    """Nothing else explains the end: the close's own error is raised, as before."""
    svc = service(FlakyTransactions([]))
    svc.consumer = _OneRecord(KafkaException(KafkaError(KafkaError._TRANSPORT, "all brokers down")))
    svc.core = _IdleCore()  # type: ignore[assignment]
    with pytest.raises(KafkaException):
        svc._close()


def test_a_stop_that_cuts_a_start_up_read_short_is_an_info_line_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM came during a start-up read: the read stopped at its next call, nothing lost (it is read again at the
    next start), yet the stop logged a WARNING as if Kafka work had been given up. It is now one INFO line; the
    producer is not started."""
    from types import SimpleNamespace

    from infra.clients import kafka as kafka_clients

    class Reader:
        def list_topics(self, topic: str, timeout: float) -> SimpleNamespace:
            svc.stop()  # SIGTERM while the broker answers
            return SimpleNamespace(
                topics={topic: SimpleNamespace(error=None, partitions={0: SimpleNamespace(id=0, error=None, leader=1)})}
            )

        def close(self) -> None:
            pass

    class NotStarted(FlakyTransactions):
        def init_transactions(self, timeout: float) -> None:
            raise AssertionError("the producer was started after the stop")

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: Reader())
    svc = service(NotStarted([]))
    svc.consumer = _OneRecord()
    svc.core, svc.heartbeat, svc._next_purge, svc._held = _IdleCore(), None, float("inf"), {}  # type: ignore[assignment]
    svc.topics = {}
    with caplog.at_level("INFO"):
        svc.run()
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert any(
        r.levelname == "INFO" and "start-up read stopped by the stop request" in r.getMessage() for r in caplog.records
    )


def test_a_start_up_read_failing_with_its_own_timeout_error_is_raised_not_waited_on_for_ever() -> None:
    """A start-up read that stalls fails with a ``TimeoutError`` ("not read to their end"): the bounded wait took it for
    its own poll's timeout and, no stop asked, went round again for ever instead of failing the service; once the stop
    was asked it took it for the stop's deadline. The call's own error is now raised at once."""
    import threading

    from infra.clients import transactional

    def stalled() -> None:
        raise TimeoutError("control topics not read to their end (no record for 30s)")

    raised: list[BaseException] = []

    def wait() -> None:
        try:
            transactional.bounded(stalled, "the start-up read of audit", lambda: None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(2.0)
    assert not waiter.is_alive(), "the read's TimeoutError was waited on for ever"
    assert type(raised[0]) is TimeoutError and "not read to their end" in str(raised[0])


def test_a_kafka_error_given_up_at_the_stop_or_retried_is_logged_by_type_and_code_never_its_words(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker's text can echo the values it refuses: the close's failure after the loop's error was named by type and
    Kafka code only, but a stop's give-up and a retried publish logged the error's whole text. All three now name it
    the same way, by type and code."""
    from infra.clients import transactional

    monkeypatch.setattr(watchlist_service.time, "sleep", lambda _s: None)
    echoed = KafkaError(KafkaError._TRANSPORT, "refused record key=secret-card-token", txn_requires_abort=True)
    with caplog.at_level("WARNING"):
        transactional.given_up_at_stop("watchlist service", KafkaException(echoed))
        transactional.given_up_at_stop("watchlist service", BufferError("Local: Queue full secret-card-token"))
        transactional.close_failed("watchlist service", KafkaException(echoed), False, RuntimeError("died"))
        service(FlakyTransactions([echoed]))._publish([Out(AUDIT, b"a-1", b"v")], ["offset"])
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 4, said
    assert all("secret" not in line for line in said), said
    assert "Kafka failed (KafkaException _TRANSPORT)" in said[0], said[0]
    assert "(BufferError)" in said[1], said[1]
    assert all("KafkaException _TRANSPORT" in line for line in said[2:]), said


def test_a_consumer_error_is_logged_by_its_kafka_code_never_the_brokers_words(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer error was logged with its whole text, which can echo a value; it is named by its code only, as the
    service's other Kafka warnings are."""
    from infra.clients.image_store import LocalImageStore
    from infra.settings import Settings
    from jobs.faces.watchlist_service import WatchlistCore
    from schemas.records import Alert

    class Failing(_Message):
        def error(self) -> KafkaError:  # type: ignore[override]
            return KafkaError(KafkaError._TRANSPORT, "fetch refused: key=secret-card-token")

    class Erring(_Log):
        def __init__(self, svc: WatchlistService, records: list[_Message]) -> None:
            super().__init__(svc, [Failing("alerts", 6, b"")])

    core = WatchlistCore(Settings(stack_dir=tmp_path), engine=object(), store=LocalImageStore(tmp_path / "i"))  # type: ignore[arg-type]
    alert = Alert("a-1", "WATCHLIST_MATCH", "HIGH", 1_800_000_000_000, "S1", "suspect")
    svc = service(FlakyTransactions([]))
    _reading_one_alert(svc, core, alert, monkeypatch, Erring)
    with caplog.at_level("WARNING"):
        svc.run()
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["consumer error: KafkaError _TRANSPORT"], said
