"""The whole face loop on the real stack with the local camera: flag a shopper with ``fraud <tx>``,
see them matched when they come back (at the entrance and at a lane), a VIP announced, strangers
left alone, ``forget`` leaving no trace, and a late snapshot not holding a decision past its deadline.

Pieces: local camera (MV Sense MQTT + snapshot API) -> camera bridge -> face stage -> scoring job
(PyFlink, watchlist as broadcast state) <- watchlist service <- commands; OpenSearch sink; the case service,
which opens one case, with the live snapshot and the enrolled reference image, for the lane's match.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from infra.clients.control_topics import read_control_topics
from infra.clients.image_store import ImageStore
from infra.clients.meraki import camera_for_lane
from infra.clients.opensearch import make_client
from infra.command_auth import SIGNATURE_HEADER, sign_command
from infra.launcher import start_scoring_job, wait_for
from infra.local.camera import LocalCameraControl, LocalCameraServer
from infra.settings import Settings
from jobs.cases.service import CaseService
from jobs.faces.stage import run_face_stage
from jobs.faces.watchlist_service import WatchlistService
from producers.camera_bridge import CameraBridge
from schemas.indices import index_name
from schemas.records import Alert, BotCommand, Case, PosTransaction, ScoredTransaction, WatchlistEntry, case_id_for
from schemas.topics import ALERTS, CASES, COMMANDS, SCORED_TRANSACTIONS, TRANSACTIONS, WATCHLIST
from sinks.opensearch.sink import run_sink
from tests.e2e.camera_helpers import TopicReader, delete_topics, face_camera_settings
from tests.unit.faces_data import people_or_skip

pytestmark = pytest.mark.e2e

DEADLINE_MS = 8000
SIGNING_KEY = "e2e-command-signing-key"
OFFICER = "security@store.example"


class Store:
    """Drives shoppers through the local camera and the POS, and reads what the pipeline made of them."""

    def __init__(self, settings: Settings, camera: LocalCameraServer) -> None:
        self.settings = settings
        self.prefix = settings.kafka.topic_prefix
        self.control = LocalCameraControl(camera.base_url)
        self.producer = Producer({**settings.kafka.client_config(), "enable.idempotence": True})
        self.reader = TopicReader(
            settings, *(t.full_name(self.prefix) for t in (SCORED_TRANSACTIONS, ALERTS, WATCHLIST))
        )
        self.store_id = f"store-{uuid.uuid4().hex[:6]}"

    def pay(self, person: str, lane: str, enter_in_s: float = -20.0, pay_in_s: float = -2.0) -> str:
        """A visit (entering ``enter_in_s`` from now) and the transaction at the pay time."""
        now = int(time.time() * 1000)
        pay_ms = now + int(pay_in_s * 1000)
        self.control.add_visit(person, self.store_id, lane, now + int(enter_in_s * 1000), pay_ms, pay_ms + 20_000)
        time.sleep(max(0.0, pay_ms / 1000 - time.time()))
        tx = PosTransaction(
            f"tx-{uuid.uuid4().hex[:10]}", pay_ms, self.store_id, lane, "SALE", 30.0, "USD", card_token=f"card-{person}"
        )
        self.producer.produce(TRANSACTIONS.full_name(self.prefix), tx.encode(), key=f"{self.store_id}/{lane}".encode())
        assert self.producer.flush(10) == 0
        return tx.transaction_id

    def command(self, verb: str, argument: str) -> None:
        """What the bot publishes for an allow-listed officer: the command, signed."""
        cmd = BotCommand(f"cmd-{uuid.uuid4().hex}", int(time.time() * 1000), verb, OFFICER, argument)
        self.producer.produce(
            COMMANDS.full_name(self.prefix),
            cmd.encode(),
            key=cmd.command_id.encode(),
            headers=[(SIGNATURE_HEADER, sign_command(cmd, SIGNING_KEY))],
        )
        assert self.producer.flush(10) == 0

    def _decoded(self):
        scored, alerts, watchlist = {}, {}, {}
        for topic, key, value in self.reader.seen:
            if topic.endswith(SCORED_TRANSACTIONS.name):
                s = ScoredTransaction.decode(value)
                scored[s.transaction_id] = s
            elif topic.endswith(ALERTS.name):
                a = Alert.decode(value)
                alerts[a.alert_id] = a
            else:
                watchlist[key.decode()] = WatchlistEntry.decode(value) if value is not None else None
        return scored, alerts, watchlist

    def wait(self, done, timeout_s: float = 120.0):
        self.reader.until(lambda _: done(*self._decoded()), timeout_s)
        return self._decoded()


def opened_cases(settings: Settings) -> dict[str, Case]:
    """The latest version of every case on the (private) cases topic."""
    cases: dict[str, Case] = {}

    def keep(_topic: str, _key: bytes | None, value: bytes | None) -> None:
        if value:
            case = Case.decode(value)
            cases[case.case_id] = case

    read_control_topics(settings, keep, specs=(CASES,))
    return cases


@pytest.fixture
def store(stack, tmp_path):
    people = people_or_skip()
    settings = face_camera_settings(stack, tmp_path)
    webex = settings.webex.model_copy(update={"command_signing_key": SecretStr(SIGNING_KEY), "allowed_people": OFFICER})
    settings = settings.model_copy(
        update={"job": settings.job.model_copy(update={"face_deadline_ms": DEADLINE_MS}), "webex": webex}
    )
    camera = LocalCameraServer(settings, people=people).start()
    stop = threading.Event()
    service = WatchlistService(settings)
    cases = CaseService(settings)
    threads = [
        threading.Thread(target=CameraBridge(settings).run, args=(stop,), daemon=True),
        threading.Thread(target=run_face_stage, args=(settings, stop), daemon=True),
        threading.Thread(target=service.run, daemon=True),
        threading.Thread(target=cases.run, daemon=True),
        threading.Thread(target=run_sink, args=(settings, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    job = start_scoring_job(settings, name=f"{settings.consumer_group}-job")
    shop = Store(settings, camera)
    try:
        yield settings, camera, shop
    finally:
        job.stop()
        service.stop()
        cases.stop()
        stop.set()
        for t in threads:
            t.join(30)
        camera.stop()
        shop.reader.close()
        shop.control.close()
        make_client(settings.opensearch).indices.delete(
            index=f"{settings.opensearch.index_prefix}-*", ignore_unavailable=True
        )
        delete_topics(settings)


def test_flagged_shopper_is_recognised_vip_announced_others_left_alone_and_forget_leaves_no_trace(store):
    settings, camera, shop = store
    people = sorted(camera.camera.scene.people)
    assert len(people) >= 2, people
    suspect, vip = people[0], people[1]
    stranger = people[2] if len(people) > 2 else None

    # First visits: faces seen, nobody on the watchlist yet.
    tx_suspect = shop.pay(suspect, "lane-01")
    tx_vip = shop.pay(vip, "lane-02")
    scored, _, _ = shop.wait(lambda s, a, w: {tx_suspect, tx_vip} <= set(s), timeout_s=240)
    assert scored[tx_suspect].face_status == "NO_MATCH" and scored[tx_vip].face_status == "NO_MATCH"

    # Security flags them (what `fraud <tx>` / `vip <tx>` in Webex produce).
    shop.command("FRAUD", tx_suspect)
    shop.command("VIP", tx_vip)
    subject, vip_subject = f"subj-{tx_suspect}", f"subj-{tx_vip}"
    _, _, watchlist = shop.wait(lambda s, a, w: w.get(subject) and w.get(vip_subject))
    assert watchlist[subject].category == "SUSPECT" and watchlist[vip_subject].category == "VIP"
    time.sleep(3)  # the job's broadcast side takes the new entries

    # They come back: entrance, then a lane. A stranger shops too.
    back = shop.pay(suspect, "lane-03", enter_in_s=0.5, pay_in_s=6.0)
    vip_back = shop.pay(vip, "lane-04", enter_in_s=0.5, pay_in_s=6.0)
    other = shop.pay(stranger, "lane-05", enter_in_s=0.5, pay_in_s=6.0) if stranger else None
    wanted = {back, vip_back} | ({other} if other else set())
    scored, alerts, _ = shop.wait(
        lambda s, a, w: (
            wanted <= set(s)
            and any(x.kind == "SUSPECT_ENTERED" for x in a.values())
            and any(x.kind == "VIP_ARRIVED" for x in a.values())
        ),
        timeout_s=180,
    )
    assert (scored[back].face_status, scored[back].face_subject_id) == ("MATCHED", subject)
    # A face match is evidence for a person to weigh: alone it makes REVIEW and an alert, never a block.
    assert scored[back].outcome in ("REVIEW", "BLOCK") and "watchlist_suspect" in scored[back].reasons
    assert scored[back].outcome == "REVIEW" or set(scored[back].reasons) - {"watchlist_suspect"}, scored[back].reasons
    assert f"watchlist:checkout:{back}:{subject}" in alerts
    # ... and one case for a person to decide, with the live snapshot beside the enrolled reference image.
    case_id = case_id_for(f"watchlist:checkout:{back}:{subject}")
    opened = wait_for(lambda: opened_cases(settings).get(case_id), 60, interval=1.0, what=f"case {case_id}")
    assert (opened.state, opened.subject_id, opened.transaction_id) == ("open", subject, back)
    assert opened.snapshot_ref and opened.reference_image_ref == watchlist[subject].reference_image_ref
    face_cases = [c for c in opened_cases(settings).values() if c.transaction_id == back and c.kind == opened.kind]
    assert face_cases == [opened]  # one match case (a block for other reasons adds a BLOCKED_TRANSACTION case)
    entered = [a for a in alerts.values() if a.kind == "SUSPECT_ENTERED"]
    assert {a.subject_id for a in entered} == {subject} and entered[0].store_id == shop.store_id
    assert {a.subject_id for a in alerts.values() if a.kind == "VIP_ARRIVED"} == {vip_subject}
    assert scored[vip_back].face_category == "VIP" and scored[vip_back].outcome != "BLOCK"
    if other:
        assert scored[other].face_status == "NO_MATCH"
        assert not [a for a in alerts.values() if a.transaction_id == other]

    # forget: tombstone, reference image gone, and the suspect is a stranger again.
    reference = watchlist[subject].reference_image_ref
    assert ImageStore.from_settings(settings).get(reference)
    shop.command("FORGET", subject)
    shop.wait(lambda s, a, w: subject in w and w[subject] is None)
    with pytest.raises((FileNotFoundError, KeyError)):
        ImageStore.from_settings(settings).get(reference)
    time.sleep(3)
    again = shop.pay(suspect, "lane-06")
    scored, alerts, _ = shop.wait(lambda s, a, w: again in s)
    assert scored[again].face_status == "NO_MATCH"
    assert not [a for a in alerts.values() if a.transaction_id == again]
    client = make_client(settings.opensearch)
    faces = index_name(settings.opensearch.index_prefix, "face_observations")
    client.indices.refresh(index=faces)
    hits = client.search(index=faces, body={"size": 100, "query": {"exists": {"field": "embedding"}}})
    assert hits["hits"]["total"]["value"] == 0, "no embedding in any index"
    assert client.count(index=faces)["count"] > 0
    # The sink carries the forget out in the indices: no face observation of the subject or of its enrolment
    # sale is left, and its alerts keep the decision but not the snapshot.
    of_subject = {"bool": {"should": [{"term": {"subject_id": subject}}, {"term": {"transaction_id": tx_suspect}}]}}

    def subject_faces() -> int:
        client.indices.refresh(index=faces)
        return client.count(index=faces, body={"query": of_subject})["count"]

    wait_for(lambda: subject_faces() == 0, 60, interval=1.0, what=f"{subject}'s face observations deleted")
    alerts_index = index_name(settings.opensearch.index_prefix, "alerts")
    client.indices.refresh(index=alerts_index)
    kept = client.search(index=alerts_index, body={"size": 100, "query": {"term": {"subject_id": subject}}})
    assert not [h["_id"] for h in kept["hits"]["hits"] if h["_source"].get("snapshot_ref")]

    # A lane camera whose snapshot never becomes ready: the decision still comes by the deadline.
    camera_serial = camera_for_lane(settings, shop.store_id, "lane-07")
    shop.control.set_fault(camera_serial, "never_ready")
    late = shop.pay(vip, "lane-07")
    scored, _, _ = shop.wait(lambda s, a, w: late in s, timeout_s=60)
    assert scored[late].face_status == "UNAVAILABLE"
    assert scored[late].decided_at - scored[late].ingest_time <= DEADLINE_MS + 3000
