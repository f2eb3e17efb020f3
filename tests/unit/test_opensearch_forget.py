"""``forget`` in OpenSearch: which audit records forget, what a forget deletes and strips in the indices, that
doing it twice changes nothing, that a forgotten subject's face is not indexed again, and the sink's retry."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from confluent_kafka import Message, TopicPartition
from opensearchpy.exceptions import ConnectionError as OpenSearchConnectionError
from opensearchpy.exceptions import RequestError
from opensearchpy.serializer import JSONSerializer

from infra.metrics import Heartbeat
from infra.retry import Backoff
from infra.settings import OpenSearchSettings, Settings
from jobs.cases.service import SERVICE_ACTOR as CASE_SERVICE_ACTOR
from schemas.indices import CASES_ROUTE, ROUTES
from schemas.records import WATCHLIST_SERVICE_ACTOR, Alert, AuditEvent, FaceObservation
from schemas.topics import AUDIT
from sinks.opensearch.forget import Forget, Forgotten, erase_action, erase_forgotten, forget_of, sighting_key
from sinks.opensearch.sink import OpenSearchSink, to_actions
from tests.builders import partitions_led
from tests.unit.test_process_metrics import ConfirmingProducer, SinkConsumer

PREFIX = "cg"
ROUTE = {route.kind: route for route in ROUTES}
SUBJECT, SALE = "subj-tx-9", "tx-9"


def audit(
    action: str = "FORGET",
    outcome: str = "DONE",
    subject: str | None = SUBJECT,
    tx: str | None = SALE,
    actor: str | None = None,
) -> bytes:
    """An audit event as its service writes it: an entry's expiry by the watchlist service, a forget by a person."""
    return AuditEvent(
        audit_id=f"command:c-{action}",
        event_time=1_700_000_000_000,
        action=action,
        outcome=outcome,
        actor=actor or (WATCHLIST_SERVICE_ACTOR if action == "EXPIRE" else "sec@example.com"),
        subject_id=subject,
        transaction_id=tx,
    ).encode()


def observation(observation_id: str, subject: str | None = None, tx: str | None = None) -> FaceObservation:
    return FaceObservation(
        observation_id=observation_id,
        event_time=1_700_000_000_000,
        camera_serial="Q2MV-S1-L2",
        store_id="S1",
        trigger="CHECKOUT" if tx else "ENTRANCE",
        status="MATCHED" if subject else "NO_MATCH",
        transaction_id=tx,
        subject_id=subject,
        similarity=80.0 if subject else None,
        image_ref=f"checkout/{observation_id}.jpg",
        embedding=[0.1, 0.2],
    )


def face_alert(alert_id: str, subject: str) -> Alert:
    return Alert(
        alert_id=alert_id,
        kind="SUSPECT_ENTERED",
        severity="high",
        event_time=1_700_000_000_000,
        store_id="S1",
        summary="suspect entered",
        subject_id=subject,
        category="SUSPECT",
        similarity=80.0,
        snapshot_ref=f"entrance/{alert_id}.jpg",
    )


# --------------------------------------------------------------------------- which audit records forget


def test_forget_and_expiry_done_or_unchanged_forget_and_nothing_else_does() -> None:
    assert forget_of(audit()) == Forget(SUBJECT, SALE, "command:c-FORGET")
    assert forget_of(audit("EXPIRE", tx=None)) == Forget(SUBJECT, SALE, "command:c-EXPIRE")  # subj-<tx> names it
    assert forget_of(audit(outcome="UNCHANGED")) is not None  # found already forgotten: still erased here
    assert forget_of(audit(outcome="FAILED")) is None  # the subject stays enrolled
    # the case service's expiry of a face case nobody decided: the subject stays enrolled, its faces stay
    assert forget_of(audit("EXPIRE", actor=CASE_SERVICE_ACTOR)) is None
    for action in ("ENROLL", "RETAIN", "PURGE", "LEARN", "RENEW"):
        assert forget_of(audit(action)) is None, action
    assert forget_of(audit(subject=None)) is None
    assert forget_of(b"not avro") is None and forget_of(None) is None
    assert forget_of(audit(subject="manual-7", tx=None)) == Forget("manual-7", None, "command:c-FORGET")


# --------------------------------------------------------------------------- what a forget does in the indices


class FakeCluster:
    """Indices in memory, searched through aliases, enough of the client for ``scan`` and ``streaming_bulk``:
    ``terms``, ``exists`` and ``bool`` (``filter``, ``should`` with ``minimum_should_match``) queries."""

    class _Transport:
        serializer = JSONSerializer()

    transport = _Transport()

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str], dict[str, Any]] = {}
        self.meta: dict[tuple[str, str], dict[str, int]] = {}
        self.refreshed: list[str] = []
        self.fail_bulk: list[Exception] = []
        self.created: dict[str, dict[str, Any]] = {}
        """Indices created explicitly (the sink's memory of sightings), with their body."""
        self.closed: set[str] = set()
        """Closed indices: a search through their alias fails unless told to ignore them, as OpenSearch's."""
        self.indices = self
        self.cat = _Cat(self)

    def put(self, index: str, doc_id: str, source: dict[str, Any], version: int = 1) -> None:
        seq = self.meta.get((index, doc_id), {}).get("_seq_no", -1) + 1
        self.docs[(index, doc_id)] = dict(source)
        self.meta[(index, doc_id)] = {"_seq_no": seq, "_primary_term": 1, "_version": version}

    def refresh(self, index: str, **_: Any) -> None:
        self.refreshed.append(index)

    def exists(self, index: str, **_: Any) -> bool:
        return index in self.created

    def create(self, index: str, body: dict[str, Any], **_: Any) -> None:
        self.created[index] = body

    def _matches(self, query: dict[str, Any], source: dict[str, Any]) -> bool:
        ((kind, body),) = query.items()
        if kind == "terms":
            ((name, values),) = body.items()
            return source.get(name) in values
        if kind == "exists":
            return source.get(body["field"]) is not None
        if kind == "term":
            ((name, value),) = body.items()
            return source.get(name) == value
        if kind == "range":
            ((name, bounds),) = body.items()
            value, tests = source.get(name), {"lt": int.__lt__, "lte": int.__le__, "gt": int.__gt__}
            return isinstance(value, int) and all(tests[op](value, bound) for op, bound in bounds.items())
        assert kind == "bool", kind
        if not all(self._matches(q, source) for q in body.get("filter", [])):
            return False
        should = body.get("should", [])
        return sum(self._matches(q, source) for q in should) >= body.get("minimum_should_match", 0)

    def search(self, body: dict[str, Any], index: str, **kwargs: Any) -> dict[str, Any]:
        closed = sorted(name for name in self.closed if name.startswith(f"{index}-"))
        if closed and not kwargs.get("ignore_unavailable"):
            raise RequestError(400, "index_closed_exception", {"error": {"index": closed[0]}})
        hits = []
        for (name, doc_id), source in sorted(self.docs.items()):
            if name in self.closed:
                continue
            if name.startswith(f"{index}-") and self._matches(body["query"], source):
                meta = dict(self.meta[(name, doc_id)])
                if not kwargs.get("version"):
                    meta.pop("_version")
                hits.append({"_index": name, "_id": doc_id, "_source": dict(source), **meta})
        return {"_scroll_id": "s1", "_shards": {"total": 1, "successful": 1, "skipped": 0}, "hits": {"hits": hits}}

    def scroll(self, **_: Any) -> dict[str, Any]:
        return {"_scroll_id": "s1", "_shards": {"total": 1, "successful": 1, "skipped": 0}, "hits": {"hits": []}}

    def clear_scroll(self, **_: Any) -> None:
        pass

    def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self.fail_bulk:
            raise self.fail_bulk.pop(0)
        lines = [json.loads(line) for line in body.splitlines() if line]
        items = []
        while lines:
            ((op, meta),) = lines.pop(0).items()
            key = (meta["_index"], meta["_id"])
            if op == "delete":
                status = 200 if self.docs.pop(key, None) is not None else 404
                items.append({op: {"_index": key[0], "_id": key[1], "status": status}})
                continue
            source, current = lines.pop(0), self.meta.get(key)
            stale = current is not None and (
                ("if_seq_no" in meta and meta["if_seq_no"] != current["_seq_no"])
                or ("version" in meta and meta["version"] < current["_version"])
            )
            if stale:
                items.append({op: {"_index": key[0], "_id": key[1], "status": 409}})
                continue
            self.put(key[0], key[1], source, meta.get("version", 1))
            items.append({op: {"_index": key[0], "_id": key[1], "status": 200}})
        return {"errors": True, "items": items}


class _Cat:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def indices(self, index: str, **kwargs: Any) -> list[dict[str, str]]:
        assert kwargs.get("expand_wildcards") == "closed" and index.endswith("-*")
        names = {name for name, _ in self.cluster.docs} | self.cluster.closed
        return [
            {"index": n, "status": "close"} for n in sorted(names & self.cluster.closed) if n.startswith(index[:-1])
        ]


def indexed(cluster: FakeCluster, record: Any, kind: str) -> None:
    """Index ``record`` as the sink does (without embeddings)."""
    topic = ROUTE[kind].topic.full_name("")
    actions, dead = to_actions(
        [Message(topic=topic, partition=0, offset=0, value=record.encode())], index_prefix=PREFIX
    )
    assert dead == [] and len(actions) == 1
    cluster.put(actions[0].op["_index"], actions[0].doc_id, actions[0].op["_source"])


def populated() -> FakeCluster:
    cluster = FakeCluster()
    indexed(cluster, observation("entrance:1", subject=SUBJECT), "face_observations")
    indexed(cluster, observation("checkout:tx-9", tx=SALE), "face_observations")  # the enrolment sale's buyer
    indexed(cluster, observation("checkout:tx-20", subject=SUBJECT, tx="tx-20"), "face_observations")
    indexed(cluster, observation("checkout:tx-21", subject="subj-other", tx="tx-21"), "face_observations")
    indexed(cluster, observation("checkout:tx-22", tx="tx-22"), "face_observations")
    indexed(cluster, face_alert("alert-1", SUBJECT), "alerts")
    indexed(cluster, face_alert("alert-2", "subj-other"), "alerts")
    cases = "cg-cases-all"
    case = {"case_id": "case-1", "subject_id": SUBJECT, "snapshot_ref": "a.jpg", "reference_image_ref": "r.jpg"}
    cluster.put(cases, "case-1", {**case, "verdict": "confirmed"}, version=41)
    cluster.put(cases, "case-2", {**case, "case_id": "case-2", "subject_id": "subj-other"}, version=42)
    return cluster


def test_a_forget_deletes_the_subjects_face_observations_and_its_enrolment_sales_and_keeps_others() -> None:
    cluster = populated()
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    left = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert left == {"checkout:tx-21", "checkout:tx-22"}
    assert report.deleted == {"face_observations": 3} and report.problem is None
    assert "cg-face_observations" in cluster.refreshed  # what was indexed a moment ago is found too


def test_a_forget_strips_the_face_fields_of_the_subjects_alerts_and_cases_and_keeps_the_decision() -> None:
    cluster = populated()
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    alert_1 = next(s for (i, d), s in cluster.docs.items() if d == "alert-1")
    assert "snapshot_ref" not in alert_1
    assert (alert_1["subject_id"], alert_1["category"], alert_1["similarity"]) == (SUBJECT, "SUSPECT", 80.0)
    case_1 = cluster.docs[("cg-cases-all", "case-1")]
    assert case_1 == {"case_id": "case-1", "subject_id": SUBJECT, "verdict": "confirmed"}
    assert cluster.meta[("cg-cases-all", "case-1")]["_version"] == 41  # the cases topic's next record still wins
    assert next(s for (i, d), s in cluster.docs.items() if d == "alert-2")["snapshot_ref"] == "entrance/alert-2.jpg"
    assert cluster.docs[("cg-cases-all", "case-2")]["snapshot_ref"] == "a.jpg"
    assert report.stripped == {"alerts": 1, "cases": 1}


def local_sightings(cluster: FakeCluster) -> None:
    """Sightings matched by the scoring job (the local backend, the default): the face stage's observations say
    ``NO_MATCH`` and name nobody; the alerts and the decided transaction name the subject."""
    indexed(cluster, observation("checkout:tx-30", tx="tx-30"), "face_observations")  # matched at a checkout
    indexed(cluster, observation("entrance:Q2:7:1"), "face_observations")  # matched at an entrance
    indexed(cluster, observation("checkout:tx-31", tx="tx-31"), "face_observations")  # its alert gone with retention
    checkout = Alert(
        alert_id="watchlist:checkout:tx-30:" + SUBJECT,
        kind="WATCHLIST_MATCH",
        severity="high",
        event_time=1_700_000_000_000,
        store_id="S1",
        summary="suspect at checkout",
        transaction_id="tx-30",
        subject_id=SUBJECT,
        category="SUSPECT",
        similarity=71.0,
        snapshot_ref="checkout/checkout:tx-30.jpg",
    )
    indexed(cluster, checkout, "alerts")
    entrance = face_alert("watchlist:entrance:Q2:7:1:" + SUBJECT, SUBJECT)
    indexed(cluster, dataclasses.replace(entrance, snapshot_ref="checkout/entrance:Q2:7:1.jpg"), "alerts")
    scored = {"transaction_id": "tx-31", "event_time": 1_700_000_000_000, "face_subject_id": SUBJECT}
    cluster.put("cg-transactions-2023.11.14", "tx-31", scored)


def test_a_forget_deletes_the_sightings_the_job_matched_to_the_subject_whose_observations_name_nobody() -> None:
    """With the local backend the face stage's observation of a sighting is ``NO_MATCH`` without a subject (the job
    matches): a forget by ``subject_id`` left the subject's sightings, image ref and embedding, until retention."""
    cluster = populated()
    local_sightings(cluster)
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    left = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert left == {"checkout:tx-21", "checkout:tx-22"}
    assert report.deleted == {"face_observations": 6} and report.problem is None
    assert cluster.docs[("cg-transactions-2023.11.14", "tx-31")]["face_subject_id"] == SUBJECT  # the decision stays


def test_a_sighting_the_job_matched_to_a_subject_enrolled_again_after_its_forget_stays() -> None:
    cluster = populated()
    local_sightings(cluster)
    lifted = {SUBJECT: 1_600_000_000_000}  # enrolled again before these sightings
    erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)], lifted=lifted)  # type: ignore[arg-type]
    left = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert {"checkout:tx-30", "entrance:Q2:7:1", "checkout:tx-31"} <= left  # the new entry's sightings


def test_a_round_that_could_not_delete_every_face_observation_strips_nothing_so_its_repeat_finds_them() -> None:
    """The alerts' image refs find the job's matched sightings: stripped in a round whose deletes failed, the
    repeated round could no longer find the entrance sighting."""

    class BusyOnce(FakeCluster):
        busy = True

        def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            lines = [json.loads(line) for line in body.splitlines() if line]
            if self.busy and any("delete" in line for line in lines):
                self.busy = False
                rejected = {"status": 503, "error": {"type": "unavailable_shards_exception"}}
                items = [{"delete": {**line["delete"], **rejected}} for line in lines if "delete" in line]
                return {"errors": True, "items": items}
            return super().bulk(body, *args, **kwargs)

    cluster = BusyOnce()
    template = populated()
    cluster.docs, cluster.meta = template.docs, template.meta
    local_sightings(cluster)
    first = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert first.problem is not None and first.stripped == {}
    again = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert again.problem is None
    left = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert left == {"checkout:tx-21", "checkout:tx-22"}


def test_forgetting_twice_changes_nothing_the_second_time() -> None:
    cluster = populated()
    erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    before = dict(cluster.docs), dict(cluster.meta)
    again = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert again.total() == 0 and (dict(cluster.docs), dict(cluster.meta)) == before


def test_a_document_written_between_scan_and_strip_is_left_to_the_newer_write() -> None:
    hit = {"_index": "cg-alerts-2023.11.14", "_id": "a", "_source": {"subject_id": SUBJECT, "snapshot_ref": "x"}}
    action = erase_action({**hit, "_seq_no": 4, "_primary_term": 2}, ROUTE["alerts"])
    assert action is not None and (action["if_seq_no"], action["if_primary_term"]) == (4, 2)
    assert action["_source"] == {"subject_id": SUBJECT}
    keyed = erase_action({**hit, "_index": "cg-cases-all", "_version": 7}, CASES_ROUTE)
    assert keyed is not None and (keyed["version"], keyed["version_type"]) == (7, "external_gte")
    assert erase_action({**hit, "_source": {"subject_id": SUBJECT}}, ROUTE["alerts"]) is None


# --------------------------------------------------------------------------- a forgotten face does not come back


def test_a_forgotten_subjects_face_observation_read_after_the_forget_is_not_indexed() -> None:
    forgotten = Forgotten()
    forgotten.add(Forget(SUBJECT, SALE))
    topic = ROUTE["face_observations"].topic.full_name("")
    batch = [
        Message(topic=topic, partition=0, offset=n, value=o.encode())
        for n, o in enumerate(
            [observation("e:1", subject=SUBJECT), observation("c:9", tx=SALE), observation("c:5", tx="tx-5")]
        )
    ]
    alerts = ROUTE["alerts"].topic.full_name("")
    batch.append(Message(topic=alerts, partition=0, offset=0, value=face_alert("alert-3", SUBJECT).encode()))
    actions, dead = to_actions(batch, index_prefix=PREFIX, include_private=True, forgotten=forgotten)
    assert dead == [] and [a.doc_id for a in actions] == ["c:5", "alert-3"]
    assert "snapshot_ref" not in actions[1].op["_source"] and actions[1].op["_source"]["subject_id"] == SUBJECT
    assert forgotten.take_counts() == (2, 1) and forgotten.take_counts() == (0, 0)


class AuditConsumer(SinkConsumer):
    def assignment(self) -> list[TopicPartition]:
        return [*super().assignment(), TopicPartition(AUDIT.full_name(""), 0)]


class _Sink:
    """A sink on ``cluster`` with a consumer and producer that need no Kafka."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.sink = OpenSearchSink(
            Settings(),
            index_prefix=PREFIX,
            client=cluster,  # type: ignore[arg-type]
            backoff=Backoff(initial_s=0.001, maximum_s=0.002),
        )
        self.consumer = AuditConsumer()
        self.sink._consumer, self.sink._producer = self.consumer, ConfirmingProducer()  # type: ignore[assignment]


def test_the_sink_carries_out_a_forget_read_on_audit_and_retries_an_outage_before_committing() -> None:
    cluster = populated()
    cluster.fail_bulk.append(OpenSearchConnectionError("N/A", "connection refused", OSError("refused")))
    wrapped = _Sink(cluster)
    late = observation("entrance:2", subject=SUBJECT)  # replayed in the same batch, after the forget was made
    batch = [
        Message(topic=ROUTE["face_observations"].topic.full_name(""), partition=0, offset=5, value=late.encode()),
        Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit()),
    ]
    wrapped.sink._process(batch)
    faces = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert faces == {"checkout:tx-21", "checkout:tx-22"}
    assert wrapped.sink.stats.retries == 1 and wrapped.sink.stats.erased == 5 and wrapped.sink.stats.forgets == 1
    assert wrapped.sink.stats.forgotten_on_write == 1
    assert SUBJECT in wrapped.sink.forgotten.subjects
    committed = {(tp.topic, tp.offset) for tp in wrapped.consumer.commits[-1]}
    assert (AUDIT.full_name(""), 4) in committed  # only once the forget was done


def test_the_sink_commits_past_the_transaction_marker_that_ends_audit_so_its_lag_reaches_zero() -> None:
    """The watchlist service writes ``audit`` in Kafka transactions: each ends with a commit marker the consumer
    steps over (its position moves past it) but never hands out. Committing the last record + 1 left the sink's
    group one behind on ``audit`` for good; the position is committed instead, unless a record of that partition
    already read waits for the next batch (then the position is past a record not yet processed)."""
    wrapped = _Sink(FakeCluster())
    topic = AUDIT.full_name("")
    record = audit("ENROLL", subject="subj-new", tx="new")  # not a forget: nothing to erase
    wrapped.consumer.positions[(topic, 0)] = 4  # the record at 2, its transaction's marker at 3
    wrapped.sink._process([Message(topic=topic, partition=0, offset=2, value=record)])
    assert [(tp.topic, tp.offset) for tp in wrapped.consumer.commits[-1]] == [(topic, 4)]

    wrapped.consumer.positions[(topic, 0)] = 8  # 6 is read and held for the next batch, 7 its marker
    wrapped.sink._carry = [Message(topic=topic, partition=0, offset=6, value=record)]
    wrapped.sink._process([Message(topic=topic, partition=0, offset=4, value=record)])
    assert [(tp.topic, tp.offset) for tp in wrapped.consumer.commits[-1]] == [(topic, 5)]


def test_the_sink_reads_every_forget_on_audit_before_indexing() -> None:
    wrapped = _Sink(FakeCluster())
    records = [audit(), audit("ENROLL", subject="subj-new", tx="new"), audit(subject="subj-x", tx=None)]

    def read(settings: Settings, apply: Any, timeout_s: float, specs: tuple[Any, ...], **_: Any) -> None:
        assert specs == (AUDIT,)
        for value in records:
            apply(AUDIT.full_name(""), b"k", value)

    wrapped.sink._load_forgotten(read)
    assert wrapped.sink.forgotten.subjects == {SUBJECT, "subj-x"}
    assert wrapped.sink.forgotten.transactions == {SALE, "x"}
    assert AUDIT.full_name("") in wrapped.sink.topics


def test_a_long_read_of_audit_at_start_keeps_the_sink_alive_and_is_not_cut_off_by_a_fixed_timeout() -> None:
    """A year of audit events takes longer to read than any fixed timeout: the read must go on while records
    come, and /healthz must not call the sink hung meanwhile (its supervisor would restart it, for ever)."""
    now = [0.0]
    wrapped = _Sink(FakeCluster())
    wrapped.sink.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])
    calls: list[dict[str, Any]] = []

    def read(settings: Settings, apply: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        for n in range(600):  # ten minutes of records, one a second
            now[0] += 1.0
            apply(AUDIT.full_name(""), b"k", audit(subject=f"subj-{n}", tx=None) if n % 100 == 0 else None)
            assert wrapped.sink.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of reading"

    wrapped.sink._load_forgotten(read)
    assert len(wrapped.sink.forgotten) == 6 and len(calls) == 1
    assert calls[0]["stall_s"] is not None and calls[0]["timeout_s"] < wrapped.sink.heartbeat.stale_s


def test_slow_metadata_calls_before_the_first_forget_keep_the_sink_alive() -> None:
    """The audit read's metadata calls (partitions, end and start offsets) may each take their full timeout: with a
    few of them before the first record, /healthz went stale and the supervisor restarted the sink."""
    now = [0.0]
    wrapped = _Sink(FakeCluster())
    wrapped.sink.heartbeat = Heartbeat(stale_s=60.0, clock=lambda: now[0])

    def read(settings: Settings, apply: Any, **kwargs: Any) -> None:
        for _ in range(4):  # four metadata calls of 20 s each, no record yet
            now[0] += 20.0
            kwargs.get("beat", lambda: None)()
            assert wrapped.sink.heartbeat()[0], f"/healthz stale after {now[0]:.0f} s of metadata calls"

    wrapped.sink._load_forgotten(read)


def test_an_audit_topic_the_cluster_does_not_list_is_no_forget_yet_not_a_crash(monkeypatch: Any) -> None:
    """A sink on a bare prefix has forgotten nobody: the read's ``KeyError`` for a topic the listing left out escaped
    the retry loop and stopped the sink at start (only a topic listed as unknown was let through)."""
    from types import SimpleNamespace

    from infra.clients import kafka as kafka_clients

    class NoAudit:
        def list_topics(self, topic: str, timeout: float) -> Any:
            return SimpleNamespace(topics={})

        def close(self) -> None:
            pass

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: NoAudit())
    wrapped = _Sink(FakeCluster())
    wrapped.sink._load_forgotten()
    assert len(wrapped.sink.forgotten) == 0 and wrapped.sink.stats.retries == 0


def test_a_read_error_that_only_reads_like_a_missing_topic_is_retried_not_taken_for_no_forget(monkeypatch: Any) -> None:
    """The sink took any error whose text held "UNKNOWN_TOPIC" for a missing ``audit`` (no forget to apply): an
    unknown topic id, a transient error of a topic that exists, started it with no forgets read, so the faces of
    forgotten subjects were indexed again. A missing topic is told by its type (``ControlTopicMissing``)."""
    from confluent_kafka import KafkaError, KafkaException

    wrapped = _Sink(FakeCluster())
    calls: list[int] = []

    def read(settings: Settings, apply: Any, **_: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_ID))
        apply(AUDIT.full_name(""), b"k", audit())

    wrapped.sink._load_forgotten(read)
    assert len(calls) == 2 and wrapped.sink.stats.retries == 1
    assert SUBJECT in wrapped.sink.forgotten.subjects


def test_an_audit_topic_deleted_after_it_was_listed_is_no_forget_yet(monkeypatch: Any) -> None:
    """Its partition's end answered UNKNOWN_TOPIC_OR_PART: judged missing by that code, not by a message's words."""
    from types import SimpleNamespace

    from confluent_kafka import KafkaError, KafkaException

    from infra.clients import control_topics
    from infra.clients import kafka as kafka_clients

    wrapped = _Sink(FakeCluster())

    class Deleted:
        def list_topics(self, topic: str, timeout: float) -> Any:
            return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=partitions_led(1))})

        def get_watermark_offsets(self, _tp: Any, timeout: float) -> tuple[int, int]:
            if wrapped.sink.stats.retries:  # read again: it was not taken for missing, and would be for ever
                wrapped.sink._stop.set()
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))

        def close(self) -> None:
            pass

    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: Deleted())
    monkeypatch.setattr(
        control_topics, "end_offset", lambda reader, topic, p, *_a, **_k: reader.get_watermark_offsets(p, 0)
    )
    wrapped.sink._load_forgotten()
    assert len(wrapped.sink.forgotten) == 0 and wrapped.sink.stats.retries == 0


class _SlowTopic:
    """A consumer of one partition of ``count`` records that hands out one record per ``poll`` and lets a second
    pass on the test's clock per poll: a long log read as fast as it comes."""

    def __init__(self, topic: str, count: int, now: list[float]) -> None:
        self.topic, self.count, self.now, self.next = topic, count, now, 0

    def list_topics(self, topic: str, timeout: float) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=partitions_led(1))})

    def get_watermark_offsets(self, _tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, self.count

    def assign(self, _partitions: list[TopicPartition]) -> None:
        pass

    def poll(self, _timeout: float) -> Message | None:
        self.now[0] += 1.0
        if self.next >= self.count:
            return None
        self.next += 1
        return Message(topic=self.topic, partition=0, offset=self.next - 1, value=b"v")

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.next) for p in partitions]

    def close(self) -> None:
        pass


def test_a_control_topic_read_with_stall_s_goes_to_its_end_however_long_while_records_keep_coming(
    monkeypatch: Any,
) -> None:
    import pytest

    from infra.clients import control_topics
    from infra.clients import kafka as kafka_clients

    now = [0.0]
    topic = AUDIT.full_name(Settings().kafka.topic_prefix)
    monkeypatch.setattr(control_topics.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(kafka_clients, "consumer", lambda *_a, **_k: _SlowTopic(topic, 300, now))
    read: list[bytes | None] = []
    last = control_topics.read_control_topics(
        Settings(), lambda _t, _k, v: read.append(v), timeout_s=20.0, specs=(AUDIT,), stall_s=20.0
    )
    assert len(read) == 300 and last == {(topic, 0): 299}  # 300 s of reading, never 20 s without a record
    with pytest.raises(TimeoutError):  # without stall_s the read is cut off at timeout_s, as before
        control_topics.read_control_topics(Settings(), lambda *_: None, timeout_s=20.0, specs=(AUDIT,))


def test_a_scroll_lost_mid_scan_is_not_taken_for_a_forget_done() -> None:
    """Only a missing index means nothing to forget: a scroll OpenSearch lost between two pages (a restart, its
    keep-alive past) left documents unread, and taking it for done committed the forget with faces left."""
    import pytest
    from opensearchpy.exceptions import NotFoundError

    class LosesScroll(FakeCluster):
        def scroll(self, **_: Any) -> dict[str, Any]:
            raise NotFoundError(404, "search_context_missing_exception", {})

    lost, full = LosesScroll(), populated()
    lost.docs, lost.meta = full.docs, full.meta
    with pytest.raises(NotFoundError):
        erase_forgotten(lost, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]

    class NoIndex(FakeCluster):
        def search(self, body: dict[str, Any], index: str, **kwargs: Any) -> dict[str, Any]:
            raise NotFoundError(404, "index_not_found_exception", {})

    report = erase_forgotten(NoIndex(), PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert report.problem is None and report.total() == 0


def test_a_scan_some_shard_failed_is_repeated_not_a_crash() -> None:
    class ShardFails(FakeCluster):
        def search(self, body: dict[str, Any], index: str, **kwargs: Any) -> dict[str, Any]:
            answer = super().search(body, index, **kwargs)
            answer["_shards"] = {"total": 2, "successful": 1, "skipped": 0, "failed": 1}
            return answer

    cluster, full = ShardFails(), populated()
    cluster.docs, cluster.meta = full.docs, full.meta
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert report.problem is not None and report.problem.startswith("scan incomplete")


def test_a_forget_whose_write_back_a_write_block_refused_is_repeated_not_taken_for_done() -> None:
    """A write block (``index.blocks.write``, a read-only index: 403 ``cluster_block_exception``) refuses the
    stripped alerts and cases while deletes of face observations still pass: taken for a permanent refusal, the
    forget was committed as done with the subject's image refs left in the indices."""

    class WriteBlocked(FakeCluster):
        def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            lines = [json.loads(line) for line in body.splitlines() if line]
            if any("index" in line for line in lines):
                items = [
                    {
                        "index": {
                            "_index": meta["_index"],
                            "_id": meta["_id"],
                            "status": 403,
                            "error": {
                                "type": "cluster_block_exception",
                                "reason": "blocked by: [FORBIDDEN/8/index write]",
                            },
                        }
                    }
                    for line in lines
                    for op, meta in line.items()
                    if op == "index"
                ]
                return {"errors": True, "items": items}
            return super().bulk(body, *args, **kwargs)

    cluster, full = WriteBlocked(), populated()
    cluster.docs, cluster.meta = full.docs, full.meta
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert report.problem == "403 cluster_block_exception"
    assert cluster.docs[("cg-cases-all", "case-1")]["snapshot_ref"] == "a.jpg"  # still there: to be repeated


def test_a_closed_period_index_is_skipped_and_named_and_the_forget_goes_on(caplog: Any) -> None:
    """A closed index under the read alias failed every forget's search (400 ``index_closed_exception``): the
    forget was retried for ever. It is skipped, named in a WARNING (never the subject), and the rest is erased."""
    cluster = populated()
    closed_alerts = "cg-alerts-2023.10.01"
    cluster.put(closed_alerts, "alert-old", {"subject_id": SUBJECT, "snapshot_ref": "entrance/old.jpg"})
    cluster.closed.add(closed_alerts)
    with caplog.at_level(logging.WARNING, logger="sinks.opensearch.forget"):
        report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert report.problem is None and report.failed == 0
    assert report.deleted == {"face_observations": 3} and report.stripped == {"alerts": 1, "cases": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and closed_alerts in warnings[0] and SUBJECT not in warnings[0]
    assert cluster.docs[(closed_alerts, "alert-old")]["snapshot_ref"] == "entrance/old.jpg"  # not reachable


def sale_alert(alert_id: str, tx: str) -> Alert:
    """The alert of a blocked sale: no subject yet, the buyer's snapshot (the face later enrolled from it)."""
    return Alert(
        alert_id=alert_id,
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=1_700_000_000_000,
        store_id="S1",
        summary="blocked",
        transaction_id=tx,
        snapshot_ref=f"checkout/{tx}.jpg",
    )


def test_a_forget_strips_the_image_refs_of_the_enrolment_sales_alert_and_case_too() -> None:
    """The Webex eraser deletes the messages of the sale the subject was enrolled from; the sale's alert and case
    kept their snapshot_ref in the indices, as only documents with the subject's subject_id were stripped."""
    cluster = populated()
    indexed(cluster, sale_alert("alert-sale", SALE), "alerts")
    indexed(cluster, sale_alert("alert-other-sale", "tx-22"), "alerts")
    case = {"case_id": "case-sale", "transaction_id": SALE, "snapshot_ref": "checkout/tx-9.jpg", "verdict": "open"}
    cluster.put("cg-cases-all", "case-sale", case, version=50)
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    by_id = {doc_id: source for (_, doc_id), source in cluster.docs.items()}
    assert "snapshot_ref" not in by_id["alert-sale"] and by_id["alert-sale"]["transaction_id"] == SALE
    assert by_id["case-sale"] == {"case_id": "case-sale", "transaction_id": SALE, "verdict": "open"}
    assert by_id["alert-other-sale"]["snapshot_ref"] == "checkout/tx-22.jpg"
    assert report.stripped == {"alerts": 2, "cases": 2}

    forgotten = Forgotten()  # and one read after the forget goes in without it
    forgotten.add(Forget(SUBJECT, SALE))
    topic = ROUTE["alerts"].topic.full_name("")
    late = Message(topic=topic, partition=0, offset=1, value=sale_alert("alert-sale-2", SALE).encode())
    actions, _ = to_actions([late], index_prefix=PREFIX, forgotten=forgotten)
    assert "snapshot_ref" not in actions[0].op["_source"]


def test_a_forget_whose_write_backs_opensearch_refuses_for_good_is_dead_lettered_not_reported_done() -> None:
    """A write-back refused per document (400: a mapping the stripped document no longer fits) was only logged and
    the forget counted as carried out. It is now counted as incomplete and its audit record dead-lettered
    ``forget_incomplete`` with the refused ids and OpenSearch's reason; the batch still goes on (no retry for ever)."""
    from schemas.errors import FORGET_INCOMPLETE, is_retryable
    from schemas.records import DeadLetter

    class RefusesWriteBacks(FakeCluster):
        def bulk(self, body: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
            lines = [json.loads(line) for line in body.splitlines() if line]
            if not any("index" in line for line in lines):
                return super().bulk(body, *args, **kwargs)
            error = {"type": "mapper_parsing_exception", "reason": "failed to parse"}
            items = [
                {"index": {"_index": meta["_index"], "_id": meta["_id"], "status": 400, "error": error}}
                for line in lines
                for op, meta in line.items()
                if op == "index"
            ]
            return {"errors": True, "items": items}

    cluster, full = RefusesWriteBacks(), populated()
    cluster.docs, cluster.meta = full.docs, full.meta
    wrapped = _Sink(cluster)
    wrapped.sink._process([Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit())])
    stats = wrapped.sink.stats
    assert stats.forgets_incomplete == 1 and stats.dead_lettered == 1
    letters = [DeadLetter.decode(value) for _, value in wrapped.sink._producer.sent]  # type: ignore[union-attr]
    assert [(d.error_kind, d.offset) for d in letters] == [(FORGET_INCOMPLETE, 3)]
    assert "cg-cases-all/case-1: 400 mapper_parsing_exception: failed to parse" in letters[0].reason
    assert not is_retryable(FORGET_INCOMPLETE)  # a re-drive would publish the audit event again
    assert (AUDIT.full_name(""), 4) in {(tp.topic, tp.offset) for tp in wrapped.consumer.commits[-1]}


T0 = 1_700_000_000_000
HOUR = 3_600_000


def audit_at(action: str, at_ms: int, subject: str = SUBJECT) -> bytes:
    return AuditEvent(
        audit_id=f"command:c-{action}-{at_ms}",
        event_time=at_ms,
        action=action,
        outcome="DONE",
        actor="sec@example.com",
        subject_id=subject,
        transaction_id=SALE,
    ).encode()


def test_an_enrolment_read_before_the_forget_it_follows_still_lifts_it() -> None:
    """The forget and the enrolment after it may sit on different audit partitions, the enrolment read first: it
    was then ignored (the subject not yet forgotten), and the subject's new entry stayed forgotten for good."""
    import dataclasses

    forgotten = Forgotten()
    forgotten.enrol(SUBJECT, T0 + 2 * HOUR)  # read first, from another partition
    forgotten.add(forget_of(audit_at("FORGET", T0 + HOUR)))  # type: ignore[arg-type]
    route = ROUTE["face_observations"]
    old = dataclasses.asdict(observation("e:old", subject=SUBJECT))
    new = {**old, "observation_id": "e:new", "event_time": T0 + 3 * HOUR}
    assert forgotten.erases(route, old) and not forgotten.erases(route, new)
    assert forgotten.enrolled_at == {SUBJECT: T0 + 2 * HOUR}


def test_a_subject_enrolled_again_after_its_forget_is_indexed_again_from_that_enrolment_on() -> None:
    """A subject id enrolled again after a forget stayed forgotten for good in the sink: its new face
    observations were never indexed and its alerts lost their image refs. A forget applies to what came before
    it; an enrolment after it lifts it (as the Webex eraser does); a forget after that applies again."""
    import dataclasses

    forgotten = Forgotten()
    forgotten.add(forget_of(audit_at("FORGET", T0 + HOUR)))  # type: ignore[arg-type]
    forgotten.enrol(SUBJECT, T0)  # an enrolment before the forget lifts nothing
    route = ROUTE["face_observations"]
    old = dataclasses.asdict(observation("e:old", subject=SUBJECT))
    new = {**old, "observation_id": "e:new", "event_time": T0 + 3 * HOUR}
    assert forgotten.erases(route, old) and forgotten.erases(route, new)
    forgotten.enrol(SUBJECT, T0 + 2 * HOUR)
    assert forgotten.erases(route, old) and not forgotten.erases(route, new)
    alert = {"subject_id": SUBJECT, "event_time": T0 + 3 * HOUR, "snapshot_ref": "entrance/a.jpg"}
    assert not forgotten.scrub(ROUTE["alerts"], alert) and alert["snapshot_ref"] == "entrance/a.jpg"
    forgotten.add(forget_of(audit_at("FORGET", T0 + 4 * HOUR)))  # type: ignore[arg-type]
    assert forgotten.erases(route, new) and forgotten.scrub(ROUTE["alerts"], alert)

    # in the sink: the enrolment read on audit after the forget; the new entry's observation goes in
    cluster = populated()
    cluster.put("cg-face_observations-2023.11.15", "e:new", {"subject_id": SUBJECT, "event_time": T0 + 3 * HOUR})
    wrapped = _Sink(cluster)
    topic = AUDIT.full_name("")
    later = dataclasses.replace(observation("e:later", subject=SUBJECT), event_time=T0 + 5 * HOUR)
    wrapped.sink._process(
        [
            Message(topic=topic, partition=0, offset=3, value=audit_at("FORGET", T0 + HOUR)),
            Message(topic=topic, partition=0, offset=4, value=audit_at("ENROLL", T0 + 2 * HOUR)),
            Message(topic=route.topic.full_name(""), partition=0, offset=9, value=later.encode()),
        ]
    )
    faces = {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}
    assert {"e:new", "e:later"} <= faces and "entrance:1" not in faces  # the old entry's faces went
    assert wrapped.sink.stats.forgotten_on_write == 0


# --------------------------------------------------------------------------- a late sighting of a forgotten subject


def _messages(kind: str, records: list[Any], first_offset: int = 20) -> list[Message]:
    topic = ROUTE[kind].topic.full_name("")
    return [Message(topic=topic, partition=0, offset=first_offset + n, value=r.encode()) for n, r in enumerate(records)]


def _faces(cluster: FakeCluster) -> set[str]:
    return {doc_id for (index, doc_id) in cluster.docs if "-face_observations-" in index}


def test_a_sighting_the_job_matched_read_after_the_forget_is_not_indexed() -> None:
    """With the local backend the observation of a sighting names nobody: one read after the forget (a lagging
    ``face_observations`` partition, a replay) was indexed until its retention, image ref and all. The forget's alerts
    and decisions named it: the sink remembers their image refs and transactions and leaves it out."""
    cluster = populated()
    local_sightings(cluster)
    for doc_id in ("checkout:tx-30", "entrance:Q2:7:1", "checkout:tx-31"):  # not read yet: the partition lags
        cluster.docs = {key: doc for key, doc in cluster.docs.items() if key[1] != doc_id}
    wrapped = _Sink(cluster)
    wrapped.sink._process([Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit())])
    late = [
        observation("checkout:tx-30", tx="tx-30"),
        observation("entrance:Q2:7:1"),
        observation("checkout:tx-31", tx="tx-31"),
    ]
    wrapped.sink._process(_messages("face_observations", [*late, observation("checkout:tx-50", tx="tx-50")]))
    assert _faces(cluster) == {"checkout:tx-21", "checkout:tx-22", "checkout:tx-50"}
    assert wrapped.sink.stats.forgotten_on_write == 3


def test_a_sighting_indexed_before_the_alert_or_decision_naming_its_forgotten_subject_is_deleted_when_it_comes() -> (
    None
):
    """After the forget the topics are read in no fixed order (a group reset, a lagging partition): an observation read
    before the alert or decision that names its subject was indexed; it goes when that comes, and a replay of it stays
    out."""
    from tests.unit.test_opensearch_sink import scored

    cluster = FakeCluster()
    wrapped = _Sink(cluster)
    wrapped.sink._process([Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit())])
    entrance, checkout = observation("entrance:Q2:8:1"), observation("checkout:tx-40", tx="tx-40")
    wrapped.sink._process(
        _messages("face_observations", [entrance, checkout, observation("checkout:tx-41", tx="tx-41")])
    )
    assert _faces(cluster) == {"entrance:Q2:8:1", "checkout:tx-40", "checkout:tx-41"}  # nothing names them yet
    alert = dataclasses.replace(
        face_alert("watchlist:entrance:Q2:8:1:" + SUBJECT, SUBJECT), snapshot_ref=entrance.image_ref
    )
    decided = scored("tx-40", face_status="MATCHED", face_subject_id=SUBJECT, face_category="SUSPECT")
    wrapped.sink._process(_messages("alerts", [alert]) + _messages("transactions", [decided]))
    assert _faces(cluster) == {"checkout:tx-41"}
    assert "snapshot_ref" not in next(s for (_, d), s in cluster.docs.items() if d == alert.alert_id)
    wrapped.sink._process(_messages("face_observations", [entrance, checkout], first_offset=40))  # a replay
    assert _faces(cluster) == {"checkout:tx-41"}


def test_sightings_are_remembered_while_a_copy_of_the_observation_is_read_not_for_a_subject_enrolled_again() -> None:
    from sinks.opensearch.forget import SIGHTING_MEMORY_MS

    # face_observations' day of retention and its hour's segment, twice: a replay late in it copies it for as long
    assert SIGHTING_MEMORY_MS == 2 * 25 * HOUR
    forgotten = Forgotten()
    forgotten.add(forget_of(audit_at("FORGET", T0 + HOUR)))  # type: ignore[arg-type]
    forgotten.enrol(SUBJECT, T0 + 2 * HOUR)
    alerts, faces = ROUTE["alerts"], ROUTE["face_observations"]
    before = {"subject_id": SUBJECT, "event_time": T0, "snapshot_ref": "entrance/old.jpg", "transaction_id": None}
    after = {**before, "event_time": T0 + 3 * HOUR, "snapshot_ref": "entrance/new.jpg"}
    assert forgotten.note_sighting(alerts, before, T0 + 4 * HOUR) and not forgotten.note_sighting(
        alerts, after, T0 + 4 * HOUR
    )
    assert forgotten.take_learnt() == {"image_ref": ["entrance/old.jpg"]} and forgotten.take_learnt() == {}
    sighting = {"observation_id": "e:1", "event_time": T0, "image_ref": "entrance/old.jpg"}
    assert forgotten.erases(faces, sighting) and not forgotten.erases(
        faces, {**sighting, "image_ref": "entrance/new.jpg"}
    )
    forgotten.prune_sightings(T0 + 4 * HOUR + SIGHTING_MEMORY_MS - 1)
    assert forgotten.erases(faces, sighting)
    forgotten.prune_sightings(T0 + 4 * HOUR + SIGHTING_MEMORY_MS)
    assert not forgotten.erases(faces, sighting) and forgotten.sightings == {}


def test_a_restarted_sink_finds_the_sightings_of_recent_forgets_again_in_the_indices(monkeypatch: Any) -> None:
    """What the sink had learnt went with its restart: the decisions and alerts of a subject forgotten in the last two
    days name its sightings' transactions again (a forget's strip took the alerts' image refs)."""
    from sinks.opensearch import sink as sink_module
    from sinks.opensearch.forget import SIGHTING_MEMORY_MS

    cluster = populated()
    local_sightings(cluster)
    erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    monkeypatch.setattr(sink_module.clock, "now_ms", lambda: T0 + HOUR)
    wrapped = _Sink(cluster)
    wrapped.sink.forgotten.add(Forget(SUBJECT, SALE, "command:c-1", T0))
    wrapped.sink.forgotten.add(Forget("subj-long-ago", None, "command:c-0", T0 + HOUR - 2 * SIGHTING_MEMORY_MS - 1))
    wrapped.sink._recall_sightings()
    assert wrapped.sink.forgotten.sightings == {
        sighting_key("transaction_id", "tx-30"): T0 + HOUR + SIGHTING_MEMORY_MS,
        sighting_key("transaction_id", "tx-31"): T0 + HOUR + SIGHTING_MEMORY_MS,
    }
    wrapped.sink._process(_messages("face_observations", [observation("checkout:tx-30", tx="tx-30")]))
    assert "checkout:tx-30" not in _faces(cluster)


def test_finding_the_sightings_of_recent_forgets_at_start_is_retried_while_a_shard_does_not_answer(
    monkeypatch: Any,
) -> None:
    from opensearchpy.helpers import ScanError

    from sinks.opensearch import sink as sink_module

    calls: list[int] = []

    def flaky(*_: Any, **__: Any) -> dict[str, list[str]]:
        calls.append(1)
        if len(calls) == 1:
            raise ScanError("s1", "1 of 2 shards failed")
        return {"transaction_id": ["tx-30"]}

    monkeypatch.setattr(sink_module, "matched_sightings", flaky)
    monkeypatch.setattr(sink_module.clock, "now_ms", lambda: T0 + HOUR)
    wrapped = _Sink(FakeCluster())
    wrapped.sink.forgotten.add(Forget(SUBJECT, SALE, "command:c-1", T0))
    wrapped.sink._recall_sightings()
    assert len(calls) == 2 and set(wrapped.sink.forgotten.sightings) == {sighting_key("transaction_id", "tx-30")}


def test_a_copy_of_a_sighting_replayed_late_in_the_topics_retention_is_still_left_out() -> None:
    """A replay (``producers.replay``) may copy a sighting's observation into ``face_observations`` until the original
    is past its 25 h, and the copy is read for 25 h more: remembered 25 h, a copy replayed then was indexed."""
    forgotten = Forgotten()
    forgotten.add(Forget(SUBJECT, None, "command:c-1", T0))
    faces = ROUTE["face_observations"]
    sighting = {"observation_id": "e:1", "event_time": T0, "image_ref": "entrance/e1.jpg", "transaction_id": None}
    forgotten.remember({"image_ref": ["entrance/e1.jpg"]}, T0)  # the forget found it; the original is read until 25 h
    forgotten.prune_sightings(T0 + 26 * HOUR)
    assert forgotten.drops(faces, sighting, T0 + 26 * HOUR)  # a copy made at 24 h, read at 26 h
    forgotten.prune_sightings(T0 + 75 * HOUR)
    assert forgotten.erases(faces, sighting)  # that copy renewed it: a copy of the copy is read until 75 h
    forgotten.prune_sightings(T0 + 76 * HOUR)
    assert not forgotten.erases(faces, sighting)


def test_a_restarted_sink_still_leaves_out_an_entrance_sighting_of_a_subject_forgotten_before_the_restart() -> None:
    """The forget stripped the image ref from the subject's entrance alert, and only that image ref names the
    sighting (no transaction): what the sink had learnt went with a restart, and an observation of it read after the
    restart (a lagging partition, a replay) was indexed until its retention. The sink's own index keeps it now."""
    cluster = populated()
    local_sightings(cluster)
    for doc_id in ("checkout:tx-30", "entrance:Q2:7:1"):  # not read yet: the partition lags
        cluster.docs = {key: doc for key, doc in cluster.docs.items() if key[1] != doc_id}
    _Sink(cluster).sink._process([Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit())])
    memory = {key: doc for key, doc in cluster.docs.items() if key[0] == "cg-forgotten_sightings-all"}
    assert sighting_key("image_ref", "checkout/entrance:Q2:7:1.jpg") in {doc_id for _, doc_id in memory}
    assert "entrance:Q2:7:1" not in json.dumps(sorted(memory.items()))  # digests, not the image refs

    restarted = _Sink(cluster)  # a forget of long ago: nothing to find again in the indices
    restarted.sink.forgotten.add(Forget(SUBJECT, SALE, "command:c-1", T0))
    restarted.sink._recall_sightings()
    late = [observation("entrance:Q2:7:1"), observation("checkout:tx-30", tx="tx-30"), observation("entrance:9")]
    restarted.sink._process(_messages("face_observations", late))
    assert _faces(cluster) == {"checkout:tx-21", "checkout:tx-22", "entrance:9"}
    assert restarted.sink.stats.forgotten_on_write == 2


def test_the_sinks_own_index_is_created_with_the_configured_replicas() -> None:
    """It was created with 0 replicas whatever the cluster: a production domain that lost a node lost it."""
    cluster = FakeCluster()
    settings = Settings(opensearch=OpenSearchSettings(replicas=2))  # CG_OPENSEARCH__REPLICAS=2
    sink = OpenSearchSink(settings, index_prefix=PREFIX, client=cluster)  # type: ignore[arg-type]
    sink.forgotten.remember({"image_ref": ["entrance/1.jpg"]}, T0)
    assert sink._save_sightings() is None
    created = cluster.created["cg-forgotten_sightings-all"]
    assert created["settings"]["index"]["number_of_replicas"] == 2
    assert created["mappings"]["dynamic"] == "strict" and "cg-forgotten_sightings" in created["aliases"]


def test_the_sinks_memory_of_sightings_is_read_while_due_and_deleted_from_its_index_after() -> None:
    from sinks.opensearch.forget import load_sightings, prune_saved_sightings, save_sightings

    cluster = FakeCluster()
    assert load_sightings(cluster, PREFIX, T0) == {}  # type: ignore[arg-type]  # no index yet
    assert save_sightings(cluster, PREFIX, {"a": T0 + HOUR, "b": T0 + 2 * HOUR}) is None  # type: ignore[arg-type]
    assert "cg-forgotten_sightings" in cluster.created["cg-forgotten_sightings-all"]["aliases"]
    assert load_sightings(cluster, PREFIX, T0 + HOUR) == {"b": T0 + 2 * HOUR}  # type: ignore[arg-type]
    assert prune_saved_sightings(cluster, PREFIX, T0 + HOUR) == 1  # type: ignore[arg-type]
    assert {doc_id for _, doc_id in cluster.docs} == {"b"}
    forgotten = Forgotten()
    forgotten.restore({"b": T0 + 2 * HOUR, "c": T0}, T0 + HOUR)
    assert forgotten.sightings == {"b": T0 + 2 * HOUR} and forgotten.take_unsaved() == {}


# --------------------------------------------------------------------------- a sighting whose snapshot was not stored


def unstored(observation_id: str, tx: str | None = None) -> FaceObservation:
    """A sighting's observation whose snapshot could not be stored: no image ref (its face data and embedding still)."""
    return dataclasses.replace(observation(observation_id, tx=tx), image_ref=None)


def sighting_alert(sighting: FaceObservation, at_lane: bool = False) -> Alert:
    """The job's alert of a matched entrance or lane-view sighting without an image: no snapshot, no transaction, the
    observation it was matched on (Alert v6), the id the job builds."""
    seen_as = f"{sighting.observation_id}:now" if at_lane else sighting.observation_id
    alert = face_alert(f"watchlist:{seen_as}:{SUBJECT}", SUBJECT)
    kind = "SUSPECT_AT_LANE" if at_lane else "SUSPECT_ENTERED"
    return dataclasses.replace(alert, kind=kind, snapshot_ref=None, observation_id=sighting.observation_id)


ENTRANCE_UNSTORED = unstored("entrance:Q2:9:5:1700000000000")
LANE_UNSTORED = unstored("checkout:tx-60", tx="tx-60")  # a live view at the lane after sale tx-60: not its buyer


def test_a_forget_deletes_a_matched_sighting_whose_snapshot_was_not_stored_by_the_observation_its_alert_names() -> None:
    """No image ref, and no transaction on its alert (an entrance, a lane's live view): nothing named the sighting
    once the job matched it, and the forget left its observation indexed (face data, embedding when indexed) until
    its retention. The alert names the observation now, and keeps naming it after the strip (no face in an id)."""
    from sinks.opensearch.forget import matched_sightings

    cluster = populated()
    for sighting in (ENTRANCE_UNSTORED, LANE_UNSTORED):
        indexed(cluster, sighting, "face_observations")
    indexed(cluster, sighting_alert(ENTRANCE_UNSTORED), "alerts")
    indexed(cluster, sighting_alert(LANE_UNSTORED, at_lane=True), "alerts")
    report = erase_forgotten(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert _faces(cluster) == {"checkout:tx-21", "checkout:tx-22"}
    assert report.sightings["observation_id"] == ["checkout:tx-60", "entrance:Q2:9:5:1700000000000"]
    # a restarted sink finds them again in the alerts (_recall_sightings), though the strip took the image refs
    again = matched_sightings(cluster, PREFIX, [Forget(SUBJECT, SALE)])  # type: ignore[arg-type]
    assert again["observation_id"] == ["checkout:tx-60", "entrance:Q2:9:5:1700000000000"]


def test_a_late_sighting_without_an_image_is_deleted_or_left_out_by_its_alerts_observation_even_after_a_restart() -> (
    None
):
    """After the forget: an observation read before the alert naming its subject is deleted when that comes, one read
    after it is left out, and so is a copy read after a restart (the sink's memory holds the observation's digest)."""
    cluster = FakeCluster()
    wrapped = _Sink(cluster)
    wrapped.sink._process([Message(topic=AUDIT.full_name(""), partition=0, offset=3, value=audit())])
    wrapped.sink._process(_messages("face_observations", [ENTRANCE_UNSTORED]))
    assert _faces(cluster) == {ENTRANCE_UNSTORED.observation_id}  # nothing names it yet
    alerts = [sighting_alert(ENTRANCE_UNSTORED), sighting_alert(LANE_UNSTORED, at_lane=True)]
    wrapped.sink._process(_messages("alerts", alerts))
    assert _faces(cluster) == set()
    wrapped.sink._process(_messages("face_observations", [LANE_UNSTORED], first_offset=40))
    assert _faces(cluster) == set() and wrapped.sink.stats.forgotten_on_write == 1
    saved = {doc_id for index, doc_id in cluster.docs if index == "cg-forgotten_sightings-all"}
    assert sighting_key("observation_id", "checkout:tx-60") in saved and not any(":" in key for key in saved)

    restarted = _Sink(cluster)
    restarted.sink.forgotten.add(Forget(SUBJECT, SALE, "command:c-1", T0))
    restarted.sink._recall_sightings()
    restarted.sink._process(_messages("face_observations", [ENTRANCE_UNSTORED, LANE_UNSTORED], first_offset=60))
    assert _faces(cluster) == set() and restarted.sink.stats.forgotten_on_write == 2
