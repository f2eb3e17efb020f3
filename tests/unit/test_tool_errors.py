"""One-shot tools answer bad settings, bad files and services that do not answer with one ``Error:`` line and a
non-zero exit, never a traceback or a wait of minutes (found by a tour of every tool with the stack down)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import ValidationError

import producers.pos as pos
from infra import flink_cluster as fc
from infra.cli import ENTRIES, main, setting_errors
from infra.clients import kafka as kafka_clients
from infra.settings import REPO_ROOT, FaceSettings, FlinkClusterSettings, Settings, get_settings


@pytest.fixture
def fresh_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``get_settings()`` built again from this test's environment, with its own stack dir."""
    monkeypatch.setenv("CG_STACK_DIR", str(tmp_path / "stack"))
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 1) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == code and "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.strip()]
    return line


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CG_KAFKA__BROKERS", "2", "CG_KAFKA__BROKERS: the local Kafka runs 1 or 3 brokers, not 2"),
        ("CG_JOB__PARALLELISM", "abc", "CG_JOB__PARALLELISM: Input should be a valid integer"),
        ("CG_JOB__PARALLELISM", "0", "CG_JOB__PARALLELISM: Input should be greater than or equal to 1"),
        ("CG_KAFKA__BOOTSTRAP_SERVERS", " ", "CG_KAFKA__BOOTSTRAP_SERVERS: no broker given"),
        ("CG_JOB__STARTING_OFFSETS", "abc", "CG_JOB__STARTING_OFFSETS: starting_offsets is earliest, latest or epoch"),
        ("CG_STACK_DIR", "", "CG_STACK_DIR: empty: unset it for the default"),
        ("CG_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:99999", "CG_KAFKA__BOOTSTRAP_SERVERS: 'b2:99999' is not host:port"),
        ("CG_OPENSEARCH__URL", "http://ana:s3cret@127.0.0.1:99999", "CG_OPENSEARCH__URL: not an http:// or https://"),
        ("CG_OPENSEARCH__URL", "ftp://127.0.0.1:9200", "CG_OPENSEARCH__URL: not an http:// or https:// URL"),
        ("CG_CAMERAS__BASE_URL", "https://api.meraki.com:99999/api/v1", "CG_CAMERAS__BASE_URL: not an http://"),
        ("CG_CAMERAS__BASE_URL", "ftp://api.meraki.com/api/v1", "CG_CAMERAS__BASE_URL: not an http://"),
        ("CG_WEBEX__BASE_URL", "http://127.0.0.1:99999/v1", "CG_WEBEX__BASE_URL: not an http:// or https:// URL"),
        ("CG_WEBEX__BASE_URL", "webexapis.com/v1", "CG_WEBEX__BASE_URL: not an http:// or https:// URL"),
        ("CG_METRICS__PROMETHEUS_URL", "http://prom:0", "CG_METRICS__PROMETHEUS_URL: not an http:// or https://"),
        ("CG_METRICS__PROMETHEUS_URL", "file:///etc/passwd", "CG_METRICS__PROMETHEUS_URL: not an http:// or https://"),
        ("CG_MODEL__AWS_ENDPOINT_URL", "http://127.0.0.1:99999", "CG_MODEL__AWS_ENDPOINT_URL: not an http://"),
        ("CG_FACES__AWS_ENDPOINT_URL", "ftp://s3.local:4566", "CG_FACES__AWS_ENDPOINT_URL: not an http://"),
        ("CG_FACES__REKOGNITION_ENDPOINT_URL", "http://rek:0", "CG_FACES__REKOGNITION_ENDPOINT_URL: not an http://"),
        ("CG_ALERTS__SES_ENDPOINT_URL", "localhost:4566", "CG_ALERTS__SES_ENDPOINT_URL: not an http://"),
        ("CG_WEBEX__PUBLIC_URL", "https://bot.example.com:99999", "CG_WEBEX__PUBLIC_URL: not an http:// or https://"),
        ("CG_WEBEX__PUBLIC_URL", "http://bot.example.com", "CG_WEBEX__PUBLIC_URL: must be an https:// URL"),
        ("CG_KAFKA__SECURITY_PROTOCOL", "SASL-SSL", "CG_KAFKA__SECURITY_PROTOCOL: 'SASL-SSL' is not one of PLAINTEXT"),
        ("CG_KAFKA__SASL_MECHANISM", "scram-sha-512", "CG_KAFKA__SASL_MECHANISM: 'scram-sha-512' is not one of PLAIN"),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_variable(fresh_settings, capsys, variable, value, says) -> None:
    fresh_settings.setenv(variable, value)
    line = _one_error(capsys, ["labels", "withdraw", "tx-1"])
    assert line.startswith(f"Error: invalid setting {says}")
    assert line.count(variable) == 1, f"{variable} named more than once: {line}"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CG_JOB__STATE_SHARDS", "0", "Input should be greater than or equal to 1"),  # shard_of divided by 0
        ("CG_METRICS__SCRAPE_INTERVAL_S", "-1", "Input should be greater than 0"),  # scraped every 1 ms
        ("CG_METRICS__SCRAPE_INTERVAL_S", "0", "Input should be greater than 0"),
        ("CG_METRICS__LAG_INTERVAL_S", "0", "Input should be greater than 0"),
        ("CG_FLINK__SLOTS_PER_TASKMANAGER", "0", "Input should be greater than or equal to 1"),
        ("CG_FLINK__METRICS_PORTS", "abc", "metrics_ports is a port or a range low-high within 1..65535"),
        ("CG_FLINK__METRICS_PORTS", "9479-9470", "metrics_ports is a port or a range low-high within 1..65535"),
        ("CG_FLINK__METRICS_PORTS", "9470-70000", "metrics_ports is a port or a range low-high within 1..65535"),
        ("CG_FLINK__METRICS_PORTS", "0", "metrics_ports is a port or a range low-high within 1..65535"),
    ],
)
def test_scale_out_and_metrics_settings_out_of_bounds_are_refused_by_their_variable(
    fresh_settings, variable, value, says
) -> None:
    """They were accepted: 0 shards crash-looped the partitioned job behind a green /healthz."""
    fresh_settings.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        get_settings()
    assert setting_errors(info.value).startswith(f"{variable}: {says}")


def test_metrics_ports_take_one_port_or_a_range() -> None:
    assert FlinkClusterSettings(metrics_ports=" 9470 - 9479 ").metrics_ports == "9470-9479"
    assert FlinkClusterSettings(metrics_ports="9470").metrics_ports == "9470"


def test_a_setting_that_should_be_json_is_one_line_naming_its_variable(fresh_settings, capsys) -> None:
    fresh_settings.setenv("CG_DASHBOARD__USERS", "ana:secret")
    line = _one_error(capsys, ["labels", "withdraw", "tx-1"])
    assert line == "Error: invalid setting CG_DASHBOARD__USERS: not valid JSON"


def test_a_setting_in_the_env_file_that_should_be_json_is_named_by_its_variable(fresh_settings, capsys, tmp_path):
    (tmp_path / "cg.env").write_text('CG_WEBEX__ROOM_STORES={"room": ["s1"]\nCG_DASHBOARD__USERNAME=ana\n')
    fresh_settings.setenv("CG_ENV_FILE", str(tmp_path / "cg.env"))
    line = _one_error(capsys, ["labels", "withdraw", "tx-1"])
    assert line == "Error: invalid setting CG_WEBEX__ROOM_STORES: not valid JSON"


def test_a_bad_setting_never_shows_the_value_given() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(kafka={"brokers": "hunter2"})
    assert "hunter2" not in setting_errors(info.value)
    with pytest.raises(ValidationError) as info:
        Settings(opensearch={"url": "https://ana:hunter2@search.example:99999"})
    assert "hunter2" not in setting_errors(info.value)
    with pytest.raises(ValidationError) as info:
        FaceSettings(embedder="bogus")  # a section built from an option names its own fields
    assert setting_errors(info.value).startswith("FaceSettings.embedder: Input should be")


def test_a_missing_or_folder_photo_is_one_line(fresh_settings, capsys, tmp_path) -> None:
    for path in (tmp_path / "missing.jpg", tmp_path):
        assert _one_error(capsys, ["faces", "compare", str(path), str(path)]).startswith("Error: [Errno")


@pytest.mark.parametrize("args", [["--frames", "0"], ["--enrolled", "-5"]])
def test_faces_bench_refuses_counts_below_one(capsys, args) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["faces", "bench", *args])
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_savepoint_without_a_running_job_is_one_line(fresh_settings, capsys) -> None:
    line = _one_error(capsys, ["upgrade", "savepoint"])
    assert line.startswith("Error: no running scoring job found"), line


def test_a_binary_rule_set_is_one_line(capsys, tmp_path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"\x80\x81\xfe\x00 binary")
    assert _one_error(capsys, ["rules", "validate", str(path)], code=1).endswith(
        "is not UTF-8 text (invalid start byte at byte 0)"
    )


def test_rules_without_a_command_prints_its_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["rules"])
    assert "validate" in capsys.readouterr().out


def test_replay_names_the_option_of_a_bad_partition_list(fresh_settings, capsys) -> None:
    line = _one_error(capsys, ["replay", "run", "transactions", "--partitions", "0,x"], code=2)
    assert line.startswith("Error: --partitions takes partition numbers"), line


class _DownProducer:
    """A producer whose cluster never answers, as librdkafka's does with no broker listening."""

    def __init__(self, _conf: dict) -> None:
        pass

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))

    def poll(self, timeout: float) -> int:
        return 0


def test_pos_replay_with_kafka_down_is_one_line_and_writes_no_state(fresh_settings, capsys, monkeypatch, tmp_path):
    """It waited out librdkafka's five-minute delivery timeout, then left a state file to resume from."""
    monkeypatch.setattr(kafka_clients, "Producer", _DownProducer)
    csv = tmp_path / "small.csv"
    csv.write_text(
        "EVENT_LABEL,EVENT_TIMESTAMP,EVENT_ID,ENTITY_ID,order_price,payment_currency,merchant\n"
        ",2022-11-07T15:51:48Z,e1,c1,10.5,USD,m1\n"
    )
    state = tmp_path / "state.json"
    line = _one_error(capsys, ["pos", "replay-csv", str(csv), "--state-file", str(state), "--no-progress"])
    assert line.startswith(f"Error: Kafka at {Settings().kafka.bootstrap} did not answer within 10 s"), line
    assert not state.exists()
    with pytest.raises(kafka_clients.KafkaUnavailable):
        pos.make_producer(get_settings())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stopping_a_flink_cluster_that_does_not_answer_is_an_error_not_no_job(tmp_path) -> None:
    """``stack flink stop`` said "no job was running" and exit 0 with the JobManager down."""
    settings = Settings(
        stack_dir=tmp_path,
        bind_host="127.0.0.1",
        flink=FlinkClusterSettings(cluster_dir=tmp_path / "cluster", rest_port=_closed_port()),
    )
    assert fc.jobs(settings) == []  # polling while a cluster starts: not answering yet
    with pytest.raises(fc.FlinkClusterError, match="the Flink cluster did not answer at http://127.0.0.1:"):
        fc.stop_with_savepoint(settings, Path("/no/java"))


def test_a_bad_backtest_stream_time_is_a_usage_error_as_in_replay(fresh_settings, capsys) -> None:
    """Both tools read --from-time the same way; a bad one exited 1 here and 2 in replay."""
    argv = ["backtest-stream", "run", "--rules", __file__, "--from-time", "yesterday"]
    assert _one_error(capsys, argv, code=2).startswith("Error: --from-time: not a time: 'yesterday'")


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--from-time", "1969-12-31T23:59:59.999Z", "before 1970-01-01T00:00:00Z"),
        ("--to-time", "9999-12-31T23:30:00-05:00", "after 9999-12-31T23:59:59.999Z"),
    ],
)
def test_a_backtest_stream_time_kafka_cannot_take_is_a_usage_error_as_in_replay(
    fresh_settings, capsys, option: str, value: str, says: str
) -> None:
    """backtest-stream reads times with replay's parser: -1 ms was Kafka's "latest", a year past 9999 a traceback."""
    line = _one_error(capsys, ["backtest-stream", "run", "--rules", __file__, option, value], code=2)
    assert line.startswith(f"Error: {option}: ") and says in line, line


@pytest.mark.parametrize(
    ("offsets", "says"),
    [
        ("5000", "the start offset is past the end of the partition (partition 0: 5,000 > 3,000"),
        ("7:10", "no partition(s) [7]; the topic has [0]"),
    ],
)
def test_a_backtest_stream_range_planning_refuses_is_a_usage_error_as_in_replay(
    fresh_settings, capsys, offsets: str, says: str
) -> None:
    """replay refuses these ranges with exit 2 (a usage error, as the README says); the stream backtest, which
    plans its range the same way, exited 1 for them. Refused before anything of the copy is made."""
    from infra.clients import topic_replay
    from jobs.flink import backtest_stream

    def plan(_kafka, _topic, start, end, partitions=None):
        return topic_replay.resolve_ranges({0: (0, 3000)}, start, end, lambda _ms: {}, partitions)

    made: list[object] = []
    fresh_settings.setattr(topic_replay, "plan", plan)
    fresh_settings.setattr(backtest_stream, "create_copy_topics", lambda *a, **_k: made.append(a))
    with pytest.raises(SystemExit) as exit_:
        main(["backtest-stream", "run", "--rules", __file__, "--from-offsets", offsets])
    err = " ".join(capsys.readouterr().err.split())  # the console wraps a long line
    assert exit_.value.code == 2 and err.startswith(f"Error: {says}") and "Traceback" not in err, err
    assert made == []


def test_a_backtest_stream_name_used_before_is_refused_with_one_error_line_and_exit_2(fresh_settings, capsys) -> None:
    """A name whose run left its checkpoints exited 1 with a bare FileExistsError's message; it is a usage error,
    refused before anything of the copy is made, as replay refuses a range (exit 2)."""
    from jobs.flink import backtest_stream

    made: list[object] = []
    fresh_settings.setattr(backtest_stream, "create_copy_topics", lambda *a, **_k: made.append(a))
    (get_settings().stack_dir / "backtests" / "bt-1" / "checkpoints").mkdir(parents=True)
    line = _one_error(capsys, ["backtest-stream", "run", "--rules", __file__, "--name", "bt-1"], code=2)
    assert line.startswith("Error: a backtest named bt-1 already ran (") and line.endswith("clean it up"), line
    assert made == []
    line = _one_error(capsys, ["backtest-stream", "run", "--rules", __file__, "--name", "checkout"], code=2)
    assert line.startswith("Error: backtest name 'checkout': its indices"), line


def test_backtest_of_a_missing_csv_names_the_csv_before_the_model(fresh_settings, capsys, tmp_path) -> None:
    """With no model trained yet, the missing model used to be reported first."""
    missing = tmp_path / "nope.csv"
    assert _one_error(capsys, ["backtest", str(missing)]) == f"Error: {missing}: no such file"


def test_upgrade_status_names_the_checkpoint_folder_it_found_nothing_in(fresh_settings, capsys) -> None:
    """A wrong CG_STACK_DIR read as "fresh start" and nothing more."""
    with pytest.raises(SystemExit) as exit_:
        main(["upgrade", "status"])
    out = capsys.readouterr().out
    where = get_settings().checkpoint_dir
    assert exit_.value.code == 0 and f"nothing (fresh start: {where} does not exist)" in out, out


def test_upgrade_status_names_the_restore_setting_when_it_is_set(fresh_settings, capsys, tmp_path) -> None:
    """The job resumes from CG_JOB__RESTORE_FROM first; status said "fresh start" beside it."""
    (tmp_path / "savepoint-1").mkdir()
    (tmp_path / "savepoint-1" / "_metadata").write_bytes(b"state")
    fresh_settings.setenv("CG_JOB__RESTORE_FROM", str(tmp_path / "savepoint-1"))
    with pytest.raises(SystemExit) as exit_:
        main(["upgrade", "status"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"resumes from: {tmp_path / 'savepoint-1'} (CG_JOB__RESTORE_FROM" in out, out


def test_upgrade_status_says_a_start_is_refused_when_the_restore_setting_names_no_savepoint(
    fresh_settings, capsys, tmp_path
) -> None:
    """A savepoint the setting still named after the sweep deleted it was shown as what a start resumes from."""
    fresh_settings.setenv("CG_JOB__RESTORE_FROM", str(tmp_path / "savepoint-gone"))
    with pytest.raises(SystemExit) as exit_:
        main(["upgrade", "status"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "a start is refused: CG_JOB__RESTORE_FROM=" in out and "no _metadata" in out, out


def test_topics_tail_answers_a_bad_setting_with_one_line(fresh_settings, capsys) -> None:
    """It was the one console tool left printing a traceback."""
    fresh_settings.setenv("CG_KAFKA__BROKERS", "2")
    line = _one_error(capsys, ["topics", "tail", "transactions"])
    assert line.startswith("Error: invalid setting CG_KAFKA__BROKERS"), line


def test_comparing_with_a_backtest_that_does_not_exist_names_its_index(fresh_settings, capsys, monkeypatch) -> None:
    from opensearchpy.exceptions import NotFoundError

    from infra.clients import opensearch

    class NoIndex:
        class indices:  # noqa: N801 - the client's attribute
            @staticmethod
            def refresh(index: str) -> None:
                if index.startswith("typo"):
                    raise NotFoundError(404, "index_not_found_exception", {})

    monkeypatch.setattr(opensearch, "make_client", lambda *_args, **_kw: NoIndex())
    line = _one_error(capsys, ["backtest-stream", "compare", "checkout-guard", "typo"])
    assert line == "Error: no index typo-transactions: is 'typo' the name of a backtest (or the live prefix)?", line


@pytest.mark.parametrize("service", ["cases", "job", "alerts", "dashboard", "supervise"])
def test_a_bad_setting_at_a_service_start_is_one_line_naming_its_variable(fresh_settings, capsys, service) -> None:
    fresh_settings.setenv("CG_LOG__LEVEL", "verbose")
    line = _one_error(capsys, [service])
    assert line.startswith("Error: invalid setting CG_LOG__LEVEL: 'verbose' is not a log level"), line


@pytest.mark.parametrize("service", ["dashboard", "supervise"])
def test_a_service_setting_that_should_be_json_is_one_line(fresh_settings, capsys, service) -> None:
    fresh_settings.setenv("CG_DASHBOARD__USERS", "ana:secret")
    line = _one_error(capsys, [service])
    assert line == "Error: invalid setting CG_DASHBOARD__USERS: not valid JSON"


@pytest.mark.parametrize("service", ["dashboard", "supervise"])
def test_a_service_with_an_env_file_that_is_missing_is_one_line(fresh_settings, capsys, tmp_path, service) -> None:
    fresh_settings.setenv("CG_ENV_FILE", str(tmp_path / "missing.env"))
    line = _one_error(capsys, [service])
    assert line == f"Error: CG_ENV_FILE={tmp_path / 'missing.env'}: no such file", line


SERVICE_MODULES = sorted(
    entry.module.removesuffix(".__main__") for entry in ENTRIES if entry.module and not entry.one_line_errors
)


STAND_INS = [("producers.shoppers", []), ("infra.local.smtp", ["--mail-dir", "mail"])]
"""Started by ``make run`` with ``python -m`` only: a bad setting was a traceback there until they went through
the services' handling."""


@pytest.mark.parametrize(("module", "args"), [*((module, []) for module in SERVICE_MODULES), *STAND_INS])
def test_a_bad_setting_at_a_service_run_by_python_m_is_one_line_naming_its_variable(tmp_path, module, args) -> None:
    """``python -m <service>`` answers as ``checkout-guard <service>`` does (it was a traceback naming log.level)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("CG_")}
    env |= {"CG_ENV_FILE": "", "CG_STACK_DIR": str(tmp_path / "stack"), "CG_LOG__LEVEL": "verbose"}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("Error: invalid setting CG_LOG__LEVEL: 'verbose' is not a log level"), line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CG_CAMERAS__BASE_URL", ""),  # unset: the local camera
        ("CG_CAMERAS__BASE_URL", "https://api.meraki.com/api/v1"),
        ("CG_WEBEX__BASE_URL", "http://127.0.0.1:8089/v1"),
        ("CG_METRICS__PROMETHEUS_URL", ""),
        ("CG_METRICS__PROMETHEUS_URL", "https://prom.chain.example:9090/"),
        ("CG_OPENSEARCH__URL", "127.0.0.1:9200"),  # the OpenSearch client takes a bare host:port as http
        ("CG_MODEL__AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
        ("CG_FACES__REKOGNITION_ENDPOINT_URL", "https://rekognition.eu-west-1.amazonaws.com"),
        ("CG_ALERTS__SES_ENDPOINT_URL", "http://localhost:4566/"),
        ("CG_WEBEX__PUBLIC_URL", "https://bot.example.com:8443/hook"),
        ("CG_WEBEX__PUBLIC_URL", "http://127.0.0.1:8090"),
    ],
)
def test_a_usable_url_setting_is_taken(fresh_settings, variable, value) -> None:
    fresh_settings.setenv(variable, value)
    get_settings()


@pytest.mark.parametrize(
    "variable", ["CG_MODEL__AWS_ENDPOINT_URL", "CG_FACES__REKOGNITION_ENDPOINT_URL", "CG_ALERTS__SES_ENDPOINT_URL"]
)
def test_a_blank_aws_endpoint_override_is_unset_not_an_endpoint_for_boto3(fresh_settings, variable) -> None:
    """Blank reached boto3 as ``ValueError: Invalid endpoint`` at the first call; it means AWS, as unset does."""
    fresh_settings.setenv(variable, " ")
    section, _, field = variable.removeprefix("CG_").lower().partition("__")
    assert getattr(getattr(get_settings(), section), field) is None
