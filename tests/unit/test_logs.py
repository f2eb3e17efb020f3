"""One logging set-up for every process (infra/logs.py): the fields of a line, text and JSON, the level
from the settings or ``--log-level``, idempotence, and secrets masked."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from pydantic import SecretStr, ValidationError

from infra import durable, logs
from infra.cli import main, setting_errors
from infra.logs import REDACTED, redact, setup_logging
from infra.settings import LogSettings, Settings
from sinks.dashboard.pipeline import PrometheusApi

TEXT_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z]+) (?P<process>[\w-]+)\[(?P<pid>\d+)\] "
    r"(?P<logger>[\w.]+): (?P<message>.*)$"
)


@pytest.fixture(autouse=True)
def root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The root logger as each test found it afterwards; settings from defaults, not CI's ``CG_*``."""
    for name in [n for n in os.environ if n.startswith("CG_")]:
        monkeypatch.delenv(name)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def ours(root: logging.Logger) -> list[logging.Handler]:
    return [h for h in root.handlers if getattr(h, "_checkout_guard", False)]


def test_a_text_line_has_time_level_process_logger_and_message(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(), process="face-stage")
    logging.getLogger("jobs.faces.stage").info("snapshots %d", 12)
    [line] = capsys.readouterr().err.splitlines()
    fields = TEXT_LINE.match(line)
    assert fields, line
    assert fields["level"] == "INFO" and fields["process"] == "face-stage" and fields["pid"] == str(os.getpid())
    assert fields["logger"] == "jobs.faces.stage" and fields["message"] == "snapshots 12"


def test_json_lines_parse_and_carry_the_same_fields(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(log=LogSettings(format="json")), process="sink")
    log = logging.getLogger("sinks.opensearch.sink")
    log.warning("indexed %d, café", 3)
    try:
        raise ValueError("bad document")
    except ValueError:
        log.exception("bulk failed")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert {k: first[k] for k in ("level", "process", "pid", "logger", "message")} == {
        "level": "WARNING",
        "process": "sink",
        "pid": os.getpid(),
        "logger": "sinks.opensearch.sink",
        "message": "indexed 3, café",
    }
    assert "exception" not in first
    assert second["level"] == "ERROR" and second["message"] == "bulk failed"
    assert "ValueError: bad document" in second["exception"] and "Traceback" in second["exception"]


def test_the_level_comes_from_the_settings_and_log_level_overrides_it(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(Settings(), process="p")
    assert root_logger.level == logging.INFO  # the default
    setup_logging(Settings(log=LogSettings(level="warning")), process="p")
    assert root_logger.level == logging.WARNING
    logging.getLogger("t").info("not shown")
    assert capsys.readouterr().err == ""
    setup_logging(Settings(log=LogSettings(level="warning")), level="debug", process="p")  # --log-level debug
    assert root_logger.level == logging.DEBUG
    logging.getLogger("t").debug("shown")
    assert capsys.readouterr().err.endswith("t: shown\n")
    with pytest.raises(typer.BadParameter):
        setup_logging(Settings(), level="loud", process="p")
    assert root_logger.level == logging.DEBUG and len(ours(root_logger)) == 1  # nothing changed


def test_idempotent_and_replaces_what_basic_config_installed(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = logging.StreamHandler(io.StringIO())  # what logging.basicConfig() puts on the root logger
    root_logger.addHandler(earlier)
    others = [h for h in root_logger.handlers if h is not earlier and h not in ours(root_logger)]  # pytest's stay
    noisy = logging.getLogger("opensearch")
    noisy_level = noisy.level
    setup_logging(Settings(), process="p")
    setup_logging(Settings(log=LogSettings(format="json")), process="p")
    assert earlier not in root_logger.handlers and len(ours(root_logger)) == 1
    assert all(h in root_logger.handlers for h in others)
    assert noisy.level == noisy_level  # third-party loggers left alone
    logging.getLogger("t").info("once")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"] == "once" and earlier.stream.getvalue() == ""


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("GET /v1/rooms Authorization: Bearer eyJhbGciOi.x-y_z", "eyJhbGciOi.x-y_z"),
        ("headers {'Authorization': 'Bearer NjM0ZmE3', 'Accept': 'json'}", "NjM0ZmE3"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("headers {'X-Cisco-Meraki-API-Key': '6bec40cf957de430a6f1f2baa056b99a4fac9ea0'}", "6bec40cf957de430a6"),
        ("X-Cisco-Meraki-API-Key: 6bec40cf957de430", "6bec40cf957de430"),
        ("POST https://idp/token?grant_type=x&password=hunter2&user=a", "hunter2"),
        ("form client_id=a&access_token=abc.def&x=1", "abc.def"),
        ('sasl.jaas.config ... password="s3cret";', "s3cret"),
        ("url https://h/snap?token=T0K3N", "T0K3N"),
        ("HTTP Request: GET http://admin:pr0m-pw@prom:9090/api/v1/query", "pr0m-pw"),
    ],
)
def test_redact_masks_the_secret(text: str, secret: str) -> None:
    clean = redact(text)
    assert secret not in clean and REDACTED in clean


def test_redact_leaves_ordinary_messages_alone() -> None:
    for text in ("bearer of bad news", "token bucket refilled: 5", "password reset for store-001", "x=1&y=2"):
        assert redact(text) == text


def test_no_secret_reaches_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(Settings(), process="bot")
    log = logging.getLogger("jobs.bot.webex_bot")
    log.info("calling with %s", {"Authorization": "Bearer sekrit-token"})
    try:
        raise RuntimeError("GET https://api/x?token=sekrit-token failed")
    except RuntimeError:
        log.exception("webex call failed")
    setup_logging(Settings(log=LogSettings(format="json")), process="bot")
    try:
        raise RuntimeError("GET https://api/x?token=sekrit-token failed")
    except RuntimeError:
        log.exception("webex call failed")
    err = capsys.readouterr().err
    assert "sekrit-token" not in err
    assert err.count(REDACTED) == 5  # the message; each traceback's source line and exception line


def test_the_password_of_a_login_in_a_url_never_reaches_a_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpx logs every request's URL at INFO: a ``CG_METRICS__PROMETHEUS_URL`` with ``user:password@`` put the
    password in the dashboard's log at each pipeline query."""
    # other processes' entry points quieten httpx (other tests run them): as the dashboard starts, it is not
    monkeypatch.setattr(logging.getLogger("httpx"), "level", logging.NOTSET)
    setup_logging(Settings(), process="dashboard")
    answer = {"status": "success", "data": {"resultType": "vector", "result": []}}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    api = PrometheusApi("http://admin:pr0m-pw@prom.example:9090", transport=transport)
    try:
        api.query("up")
    finally:
        api.close()
    err = capsys.readouterr().err
    assert "prom.example:9090/api/v1/query" in err, "httpx's line is there ..."
    assert "pr0m-pw" not in err and f"admin:{REDACTED}@prom.example" in err, "... without the password"


def test_debug_leaves_out_the_request_bodies_of_the_aws_sdk_and_the_opensearch_client(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--log-level DEBUG`` logged botocore's and opensearch-py's whole requests: a Fraud Detector call's e-mail
    and IP (Rekognition's face image, SES's alert mail likewise), OpenSearch's documents with their card tokens."""
    import boto3
    from botocore.awsrequest import AWSResponse
    from opensearchpy import Connection

    # the sinks' entry points quieten the client's logger (other tests run them): as a process starts, it is not
    monkeypatch.setattr(logging.getLogger("opensearch"), "level", logging.NOTSET)

    setup_logging(Settings(), level="DEBUG", process="watchlist")
    client = boto3.client(
        "frauddetector",
        region_name="eu-west-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="not-a-real-secret-key",
    )

    class Body:
        def stream(self, **_kw: object) -> Iterator[bytes]:
            yield b"{}"

    client.meta.events.register("before-send.*", lambda request, **_kw: AWSResponse(request.url, 200, {}, Body()))
    client.get_event_prediction(
        detectorId="d",
        eventId="tx-1",
        eventTypeName="t",
        eventTimestamp="2026-01-01T00:00:00Z",
        entities=[{"entityType": "customer", "entityId": "unknown"}],
        eventVariables={"email_address": "mule@example.com", "ip_address": "203.0.113.9"},
    )
    hit = '{"customer_key": "token:tok_4242", "transaction_id": "tx-1"}'
    Connection().log_request_success("POST", "http://os:9200/t/_search", "/t/_search", b"{}", 200, hit, 0.01)
    logging.getLogger("jobs.faces.watchlist_service").debug("ours at DEBUG")
    err = capsys.readouterr().err
    assert "mule@example.com" not in err and "203.0.113.9" not in err and "tok_4242" not in err
    assert "ours at DEBUG" in err and "opensearch: POST http://os:9200/t/_search [status:200" in err


def test_an_unknown_log_level_is_a_settings_error_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CG_LOG__LEVEL", "verbose")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith("CG_LOG__LEVEL: 'verbose' is not a log level: one of CRITICAL")
    monkeypatch.setenv("CG_LOG__LEVEL", "debug")  # any case, as setup_logging takes it
    assert Settings().log.level == "debug"


@pytest.mark.parametrize("service", ["cases", "alerts", "sink"])
def test_an_unknown_log_level_option_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], service: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([service, "--log-level", "loud"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert "Invalid value for '--log-level': 'loud' is not a log level: one of CRITICAL" in err


def test_a_person_tag_is_keyed_so_a_list_of_likely_addresses_does_not_tell_whose_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tag was ``person-`` + 8 hex digits of the address's plain SHA-256: anyone with the log and a list of the
    staff's addresses could hash each and name the person. It is an HMAC now, keyed per deployment."""
    address = "Jane.Doe@store.test "
    plain = "person-" + hashlib.sha256(b"jane.doe@store.test").hexdigest()[:8]
    keyed = "person-" + hmac.new(b"k" * 32, b"jane.doe@store.test", hashlib.sha256).hexdigest()[:8]
    monkeypatch.setattr(logs, "_PERSON_TAG_KEY", logs._PersonTagKey())
    setup_logging(Settings(stack_dir=tmp_path, log=LogSettings(person_tag_key=SecretStr("k" * 32))))
    assert logs.person_tag(address) == keyed != plain
    assert logs.tag_addresses("<jane.doe@store.test>: mailbox full") == f"<{keyed}>: mailbox full"
    setup_logging(Settings(stack_dir=tmp_path, log=LogSettings(person_tag_key=SecretStr("another deployment"))))
    assert logs.person_tag(address) not in (keyed, plain)
    assert not (tmp_path / logs.PERSON_TAG_KEY_FILE).exists()  # a key set: none generated


def test_without_a_key_set_one_is_generated_once_kept_private_and_tags_stay_the_same_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(stack_dir=tmp_path, log=LogSettings(person_tag_key=SecretStr("  ")))  # blank: unset
    assert settings.log.person_tag_key is None
    tags = []
    with caplog.at_level(logging.DEBUG):
        for _process in range(2):  # a process, then the same one restarted (or another of the deployment)
            monkeypatch.setattr(logs, "_PERSON_TAG_KEY", logs._PersonTagKey())
            setup_logging(settings, process="alert-sender")
            tags.append(logs.person_tag("jane@store.test"))
    kept = tmp_path / logs.PERSON_TAG_KEY_FILE
    key = kept.read_text().strip()
    assert tags[0] == tags[1] == "person-" + hmac.new(key.encode(), b"jane@store.test", hashlib.sha256).hexdigest()[:8]
    assert len(key) == 64 and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert key not in caplog.text
    assert not durable.create_once(kept, "a racing process's key")  # the first one made stays
    assert durable.kept_secret(kept) == key


def test_a_key_file_that_cannot_be_made_leaves_a_key_of_the_process_with_a_warning_not_a_failed_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "secrets").write_text("a file where the folder should be")
    monkeypatch.setattr(logs, "_PERSON_TAG_KEY", logs._PersonTagKey())
    setup_logging(Settings(stack_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="infra.logs"):
        first = logs.person_tag("jane@store.test")
        assert logs.person_tag("jane@store.test") == first and first.startswith("person-")
    [warning] = [r.getMessage() for r in caplog.records if r.name == "infra.logs"]
    assert "could be neither read nor made" in warning and "CG_LOG__PERSON_TAG_KEY" in warning
