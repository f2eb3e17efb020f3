"""The scoring job hands Flink's Kafka connector Java client properties: a SASL login is a JAAS config
naming the connector's (shaded) login module, never librdkafka's ``sasl.username``/``sasl.password``."""

from __future__ import annotations

import zipfile

import pytest

from infra.settings import Settings
from infra.stack import StackError, flink_connector_jars
from jobs.flink.job import SHADED_KAFKA, _startup, kafka_properties, sink_options, source_options

SASL = Settings(
    kafka={
        "bootstrap_servers": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "job-user",
        "sasl_password": "s3cret",
    }
)


def test_source_and_sink_log_in_with_the_jaas_config_of_the_shaded_client() -> None:
    jaas = (
        f"{SHADED_KAFKA}org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="job-user" password="s3cret";'
    )
    for options in (source_options(SASL, "t", "g", {}), sink_options(SASL, "t")):
        assert options["properties.security.protocol"] == "SASL_PLAINTEXT"
        assert options["properties.sasl.mechanism"] == "SCRAM-SHA-512"
        assert options["properties.sasl.jaas.config"] == jaas
        assert "properties.sasl.username" not in options and "properties.sasl.password" not in options


def test_without_sasl_the_connector_gets_the_connection_only() -> None:
    plain = Settings(kafka={"bootstrap_servers": "127.0.0.1:9092"})  # not CI's CG_KAFKA__* ports
    assert kafka_properties(plain) == {
        "properties.bootstrap.servers": "127.0.0.1:9092",
        "properties.security.protocol": "PLAINTEXT",
    }


def test_the_login_module_named_exists_in_the_installed_connector_jar() -> None:
    try:
        jars = flink_connector_jars(Settings())
    except StackError:
        pytest.skip("the Flink Kafka connector is not installed (make setup)")
    module = kafka_properties(SASL)["properties.sasl.jaas.config"].split(" ", 1)[0]
    entry = module.replace(".", "/") + ".class"
    assert any(entry in zipfile.ZipFile(jar).namelist() for jar in jars), entry


def test_the_start_setting_becomes_the_connectors_startup_mode() -> None:
    def startup(value: str) -> dict[str, str]:
        return _startup(Settings(job={"starting_offsets": value}))

    assert startup("1764547200000") == {
        "scan.startup.mode": "timestamp",
        "scan.startup.timestamp-millis": "1764547200000",
    }
    assert startup("latest") == {"scan.startup.mode": "latest-offset"}
    assert startup("earliest") == {"scan.startup.mode": "group-offsets", "properties.auto.offset.reset": "earliest"}
