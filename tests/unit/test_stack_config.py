"""What the local stack and the job are started with: bound to the configured host, logins when asked
for, OpenSearch's disk watermarks on."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from infra import stack
from infra.settings import Settings
from infra.stack import Endpoints, StackError, StackPaths

SASL = {
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_username": "checkout-guard",
    "sasl_password": "client-secret",
}


PORTS = {"bootstrap_servers": "127.0.0.1:9092", "controller_port": 9093}
"""The default ports, spelled out: CI runs with others in CG_KAFKA__* and Settings() would read them."""


def _settings(tmp_path: Path, **update: object) -> Settings:
    update["kafka"] = {**PORTS, **dict(update.get("kafka") or {})}
    return Settings(stack_dir=tmp_path, bind_host="127.0.0.2", **update)


def _properties(settings: Settings, admin_password: str | None = None) -> dict[str, str]:
    text = stack._kafka_properties(settings, StackPaths.of(settings), Endpoints.of(settings), admin_password)
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_kafka_listens_on_the_bind_host_and_advertises_the_client_address(tmp_path: Path) -> None:
    props = _properties(_settings(tmp_path))
    assert props["listeners"] == "PLAINTEXT://127.0.0.2:9092,CONTROLLER://127.0.0.2:9093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"


def test_every_kafka_listener_asks_for_a_login_when_the_clients_log_in(tmp_path: Path) -> None:
    props = _properties(_settings(tmp_path, kafka=SASL), admin_password="stack-admin-secret")
    assert props["listeners"] == "SASL_PLAINTEXT://127.0.0.2:9092,CONTROLLER://127.0.0.2:9093"
    assert props["listener.security.protocol.map"] == "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512,PLAIN"
    assert props["listener.name.controller.sasl.enabled.mechanisms"] == "PLAIN"
    assert "stack-admin-secret" in props["listener.name.controller.plain.sasl.jaas.config"]
    assert "client-secret" not in "\n".join(props.values()), "the clients' password is the broker's business only"


def test_the_local_kafka_serves_scram_over_plaintext_only(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="SCRAM"):
        _properties(_settings(tmp_path, kafka={**SASL, "security_protocol": "SASL_SSL"}), admin_password="x")
    with pytest.raises(StackError, match="SCRAM"):
        _properties(_settings(tmp_path, kafka={**SASL, "sasl_mechanism": "PLAIN"}), admin_password="x")


def test_opensearch_binds_to_the_bind_host_and_keeps_its_disk_watermarks(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    cmd = stack._opensearch_command(StackPaths.of(settings), Endpoints.of(settings))
    assert "-Enetwork.host=127.0.0.2" in cmd
    assert "-Ecluster.routing.allocation.disk.threshold_enabled=false" not in cmd
    assert "-Ecluster.routing.allocation.disk.threshold_enabled=true" in cmd
    assert "-Ecluster.routing.allocation.disk.watermark.flood_stage=1gb" in cmd


def test_mqtt_health_check_logs_in_when_a_login_is_set() -> None:
    anonymous = stack._mqtt_connect_packet("cg-health", None)
    assert anonymous == b"\x10\x15\x00\x04MQTT\x04\x02\x00\x0a\x00\x09cg-health"
    packet = stack._mqtt_connect_packet("cg-health", ("camera", "p" * 200))
    remaining = 10 + (2 + 9) + (2 + 6) + (2 + 200)  # header, client id, username, password
    assert packet[:3] == bytes([0x10, (remaining % 128) | 0x80, remaining // 128])  # 2-byte length past 127
    assert packet[10] == 0xC2  # username and password flags on a clean session
    assert packet.endswith(b"\x00\x06camera\x00\xc8" + b"p" * 200)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto is not installed (make setup)")
def test_mosquitto_refuses_anonymous_clients_when_a_login_is_set(tmp_path: Path) -> None:
    settings = _settings(tmp_path, mqtt={"username": "camera", "password": "mqtt-secret"})
    paths = StackPaths.of(settings)
    access = stack._mosquitto_access(settings, paths)
    assert access == f"allow_anonymous false\npassword_file {paths.mosquitto_passwords}\n"
    stored = paths.mosquitto_passwords.read_text()
    assert stored.startswith("camera:$") and "mqtt-secret" not in stored, "hashed, not the password"
    assert stat.S_IMODE(os.stat(paths.mosquitto_passwords).st_mode) == 0o600
    assert stack._mosquitto_access(_settings(tmp_path), paths) == "allow_anonymous true\n"
    assert not paths.mosquitto_passwords.exists()


def test_a_running_service_started_with_other_logins_is_named(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    paths = StackPaths.of(settings)
    paths.conf.mkdir(parents=True)
    paths.kafka_properties.write_text(_properties_text(settings))
    assert stack._security_drift("kafka", settings, paths) is None
    drift = stack._security_drift("kafka", _settings(tmp_path, kafka=SASL), paths)
    assert drift is not None and "make down" in drift
    paths.kafka_properties.write_text("# Generated by infra/stack.py on every start\n")  # an older generator's
    assert stack._security_drift("kafka", settings, paths) is None


def _properties_text(settings: Settings) -> str:
    return stack._kafka_properties(settings, StackPaths.of(settings), Endpoints.of(settings))


def test_the_job_binds_every_flink_server_to_the_bind_host() -> None:
    from jobs.flink.job import flink_options

    try:
        options = flink_options(Settings(bind_host="127.0.0.2"), None)
    except StackError:
        pytest.skip("the Flink Kafka connector is not installed (make setup)")
    for key in ("jobmanager.bind-host", "taskmanager.bind-host", "rest.bind-address"):
        assert options[key] == "127.0.0.2", key  # jobmanager.bind-host: the BLOB server, 0.0.0.0 without it
    assert options["rest.address"] == options["taskmanager.host"] == "127.0.0.2"


def test_the_job_refuses_process_mode_whose_beam_servers_would_listen_everywhere() -> None:
    from jobs.flink.job import flink_options

    process = {"python_execution_mode": "process"}
    with pytest.raises(ValueError, match="every interface"):
        flink_options(Settings(job=process), None)
    try:
        assert flink_options(Settings(job=process, bind_host="0.0.0.0"), None)["rest.address"] == "127.0.0.1"
    except StackError:
        pytest.skip("the Flink Kafka connector is not installed (make setup)")


@pytest.mark.parametrize("mode", ["Process", "PROCESS", "Thread", "threads", ""])
def test_an_execution_mode_other_than_thread_or_process_is_a_settings_error(mode: str) -> None:
    """PyFlink runs anything but exactly ``thread`` in process mode: a misspelling must not start it."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="python_execution_mode"):
        Settings(job={"python_execution_mode": mode})


def test_the_bind_host_guard_takes_every_mode_but_thread_for_process_mode() -> None:
    from jobs.flink.job import _check_execution_mode

    loopback = Settings(bind_host="127.0.0.1")
    _check_execution_mode(loopback)  # thread: nothing to refuse
    unchecked = loopback.model_copy(  # a value that bypassed validation (model_copy does not validate)
        update={"job": loopback.job.model_copy(update={"python_execution_mode": "Process"})}
    )
    with pytest.raises(ValueError, match="CG_JOB__PYTHON_EXECUTION_MODE=Process .* every interface"):
        _check_execution_mode(unchecked)


def test_a_service_whose_port_was_taken_while_it_started_is_started_again_and_other_failures_are_not(monkeypatch):
    calls: list[str] = []
    failures = [
        "kafka exited during start-up; end of kafka.log:\nCaused by: java.net.BindException: Address already in use"
    ]

    def start_once(svc, *_args):
        calls.append(svc)
        if failures:
            raise stack.StackError(failures.pop())

    monkeypatch.setattr(stack, "_start_once", start_once)
    monkeypatch.setattr(stack.time, "sleep", lambda _s: None)
    stack._start_and_wait("kafka", None, None, None)
    assert calls == ["kafka", "kafka"]  # the port was free again: started on the second try
    failures[:] = ["opensearch exited during start-up; end of opensearch.log:\nOutOfMemoryError"]
    with pytest.raises(stack.StackError, match="OutOfMemoryError"):
        stack._start_and_wait("opensearch", None, None, None)
    failures[:] = ["Address already in use"] * (stack.BIND_RETRIES + 1)
    with pytest.raises(stack.StackError, match="Address already in use"):
        stack._start_and_wait("kafka", None, None, None)  # held for good: the error, after the retries


def test_the_local_mosquitto_drops_a_payload_the_camera_bridge_would_refuse_as_oversized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho reads a whole MQTT 3.1.1 packet (up to 256 MB) into memory before the bridge can refuse it as oversized,
    and MQTT 3.1.1 cannot tell the broker a limit: the broker must drop it."""
    settings = _settings(tmp_path, job={"max_message_bytes": 12_345})
    paths = StackPaths.of(settings)
    monkeypatch.setattr(stack.shutil, "which", lambda *_a, **_k: "/usr/sbin/mosquitto")
    monkeypatch.setattr(stack, "_spawn", lambda *_a, **_k: None)
    stack._start_mosquitto(settings, paths, Endpoints.of(settings))
    assert "message_size_limit 12345" in paths.mosquitto_conf.read_text().splitlines()
