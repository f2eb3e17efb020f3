"""The local Kafka's shape: where each of three nodes listens, what every client is given to bootstrap
from, each node's server.properties, and the quorum probe's wire format."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from infra import stack
from infra.kafka_cluster import (
    DESCRIBE_QUORUM,
    KafkaNode,
    describe_quorum_request,
    kafka_nodes,
    quorum_leader,
    quorum_voters,
    topic_config,
)
from infra.settings import KafkaSettings, Settings
from infra.stack import Endpoints, StackPaths


def _settings(tmp_path: Path, **kafka: object) -> Settings:
    ports = {"bootstrap_servers": "127.0.0.1:9092", "controller_port": 9093}  # CI sets others in CG_KAFKA__*
    return Settings(stack_dir=tmp_path, bind_host="127.0.0.2", kafka=KafkaSettings.model_validate({**ports, **kafka}))


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_one_address_gives_three_nodes_on_ports_two_apart() -> None:
    nodes = kafka_nodes("127.0.0.1:9092", 9093, 3)
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 9092, 9093),
        (2, 9094, 9095),
        (3, 9096, 9097),
    ]
    assert quorum_voters(nodes) == "1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"


def test_three_addresses_are_taken_as_given() -> None:
    nodes = kafka_nodes("PLAINTEXT://127.0.0.1:4001, 127.0.0.1:5002,127.0.0.1:6003", 7000, 3)
    assert [n.address for n in nodes] == ["127.0.0.1:4001", "127.0.0.1:5002", "127.0.0.1:6003"]
    assert [n.controller_port for n in nodes] == [7000, 7002, 7004]


def test_one_node_is_the_first_address_as_before() -> None:
    assert kafka_nodes("127.0.0.1:9092,other:9092", 9093, 1) == (KafkaNode(1, "127.0.0.1", 9092, 9093),)


@pytest.mark.parametrize(
    ("bootstrap", "controller", "brokers", "why"),
    [
        ("127.0.0.1:9092", 9093, 2, "1 or 3"),
        ("127.0.0.1:1,127.0.0.1:2", 9093, 3, "one bootstrap address or 3"),
        ("127.0.0.1:9092", 9094, 3, "coincide"),  # node 2's client port is node 1's controller port
        ("127.0.0.1", 9093, 3, "no port"),
    ],
)
def test_a_cluster_that_cannot_run_is_refused(bootstrap: str, controller: int, brokers: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        kafka_nodes(bootstrap, controller, brokers)


def test_a_cluster_size_other_than_one_or_three_is_not_a_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 or 3"):
        _settings(tmp_path, brokers=2)


def test_every_client_bootstraps_from_all_three_brokers(tmp_path: Path) -> None:
    three = _settings(tmp_path, brokers=3).kafka
    everyone = "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert three.client_config()["bootstrap.servers"] == everyone
    assert three.java_client_config()["bootstrap.servers"] == everyone  # the job's Kafka connector
    one = _settings(tmp_path, bootstrap_servers="broker-a:9092,broker-b:9092").kafka
    assert one.client_config()["bootstrap.servers"] == "broker-a:9092,broker-b:9092", "production lists unchanged"


def test_the_stack_checks_and_shows_all_six_ports_of_three_brokers(tmp_path: Path) -> None:
    ep = Endpoints.of(_settings(tmp_path, brokers=3))
    assert sorted(p for _, p in ep.ports("kafka")) == list(range(9092, 9098))
    assert ep.address("kafka").startswith("127.0.0.1:9092, 127.0.0.1:9094, 127.0.0.1:9096 (controllers :9093")


def test_each_of_three_nodes_gets_its_own_id_ports_and_data_dir_and_the_same_quorum(tmp_path: Path) -> None:
    settings = _settings(tmp_path, brokers=3)
    paths, ep = StackPaths.of(settings), Endpoints.of(settings)
    props = [_props(stack._kafka_properties(settings, paths, ep, node=node)) for node in ep.kafka_nodes]
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert [p["listeners"] for p in props] == [
        f"PLAINTEXT://127.0.0.2:{9092 + 2 * i},CONTROLLER://127.0.0.2:{9093 + 2 * i}" for i in range(3)
    ]
    assert [p["advertised.listeners"] for p in props] == [f"PLAINTEXT://127.0.0.1:{9092 + 2 * i}" for i in range(3)]
    assert [p["log.dirs"] for p in props] == [str(paths.data(f"kafka-{i}")) for i in (1, 2, 3)]
    assert {p["controller.quorum.voters"] for p in props} == {"1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"}


def test_three_nodes_replicate_everything_three_times_with_two_in_sync(tmp_path: Path) -> None:
    settings = _settings(tmp_path, brokers=3)
    ep = Endpoints.of(settings)
    props = _props(stack._kafka_properties(settings, StackPaths.of(settings), ep, node=ep.kafka_nodes[1]))
    for key in ("default.replication.factor", "offsets.topic.replication.factor"):
        assert props[key] == "3", key
    assert props["transaction.state.log.replication.factor"] == "3"
    assert props["min.insync.replicas"] == props["transaction.state.log.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"
    assert topic_config(3) == {"min.insync.replicas": "2"}


def test_one_node_keeps_its_config_of_one_replica(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    text = stack._kafka_properties(settings, StackPaths.of(settings), Endpoints.of(settings))
    props = _props(text)
    assert props["node.id"] == "1" and props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["log.dirs"] == str(StackPaths.of(settings).data("kafka"))
    assert props["default.replication.factor"] == props["min.insync.replicas"] == "1"
    assert text.endswith("auto.create.topics.enable=false\n") and "unclean" not in text
    assert topic_config(1) == {}


def test_a_node_started_with_other_logins_is_named_by_its_own_config(tmp_path: Path) -> None:
    settings = _settings(tmp_path, brokers=3)
    paths, ep = StackPaths.of(settings), Endpoints.of(settings)
    paths.conf.mkdir(parents=True)
    node = ep.kafka_nodes[2]
    paths.node_properties("kafka-3").write_text(stack._kafka_properties(settings, paths, ep, node=node))
    assert stack._security_drift("kafka-3", settings, paths) is None
    sasl = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"}
    drift = stack._security_drift("kafka-3", _settings(tmp_path, brokers=3, **sasl), paths)
    assert drift is not None and "make down" in drift


def test_the_quorum_request_is_a_framed_describe_quorum_v0_for_the_metadata_log() -> None:
    frame = describe_quorum_request(7, "probe")
    size, api_key, version, correlation = struct.unpack(">ihhi", frame[:12])
    assert size == len(frame) - 4
    assert (api_key, version, correlation) == (DESCRIBE_QUORUM, 0, 7)
    assert frame[12:14] == b"\x00\x05" and frame[14:19] == b"probe" and frame[19] == 0  # client id, no tags
    assert b"\x13__cluster_metadata\x02\x00\x00\x00\x00" in frame  # compact name (18 + 1), one partition: 0


def _response(correlation: int, error: int, leader: int) -> bytes:
    """A DescribeQuorum v0 response laid out as the protocol spec says (header v1, compact arrays)."""
    partition = struct.pack(">ihiiq", 0, error, leader, 4, 120) + b"\x01\x01\x00"  # no voters, no observers
    topic = b"\x13__cluster_metadata" + b"\x02" + partition + b"\x00"
    return struct.pack(">i", correlation) + b"\x00" + struct.pack(">h", 0) + b"\x02" + topic + b"\x00"


def test_the_quorum_leader_is_read_from_the_response() -> None:
    assert quorum_leader(_response(7, 0, 2), 7) == 2
    assert quorum_leader(_response(7, 0, -1), 7) is None, "no leader elected yet"
    assert quorum_leader(_response(7, 6, 2), 7) is None, "a partition error is no answer"
    with pytest.raises(ValueError):
        quorum_leader(_response(8, 0, 2), 7)
    with pytest.raises(ValueError):
        quorum_leader(_response(7, 0, 2)[:12], 7)
