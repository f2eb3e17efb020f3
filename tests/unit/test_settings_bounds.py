"""A number that means nothing (a negative timeout, zero tries, an infinite interval) is a settings error at start
that names its variable: such values were taken without a word, some quietly changed to another value (a bulk of
0 documents became 1, 0 Hz became 0.1), others failed later, per record or in Flink with a Java trace."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infra.cli import setting_errors
from infra.settings import Settings

REFUSED = [
    ("CG_OPENSEARCH__BULK_MAX_DOCS", "0"),
    ("CG_CAMERAS__LOCAL_PUBLISH_HZ", "0.05"),
    ("CG_CAMERAS__LOCAL_PUBLISH_HZ", "inf"),
    ("CG_JOB__BUNDLE_SIZE", "0"),
    ("CG_JOB__BUNDLE_TIME_MS", "-1"),
    ("CG_JOB__BUFFER_TIMEOUT_MS", "-1"),
    ("CG_JOB__CHECKPOINT_INTERVAL_MS", "0"),
    ("CG_JOB__BATCH_SIZE", "0"),
    ("CG_JOB__EVENT_IDLE_MS", "0"),
    ("CG_JOB__STALE_STATE_RETENTION_HOURS", "-1"),
    ("CG_JOB__STALE_STATE_RETENTION_HOURS", "nan"),
    ("CG_CAMERAS__POLL_MAX_TRIES", "-1"),
    ("CG_CAMERAS__POLL_MAX_TRIES", "0"),
    ("CG_CAMERAS__DEADLINE_S", "inf"),
    ("CG_CAMERAS__SNAPSHOT_WORKERS", "0"),
    ("CG_SMTP__TIMEOUT_S", "-1"),
    ("CG_SMTP__TIMEOUT_S", "inf"),
    ("CG_WEBEX__TIMEOUT_S", "0"),
    ("CG_MODEL__READ_TIMEOUT_S", "-0.5"),
    ("CG_MODEL__RETRIES", "-1"),
    ("CG_ALERTS__MAX_ATTEMPTS", "0"),
    ("CG_ALERTS__RETRY_MAX_S", "inf"),
    ("CG_KAFKA__DEAD_LETTER_RETENTION_DAYS", "inf"),
    ("CG_INDICES__ALERTS_RETENTION_DAYS", "-1"),
    ("CG_CASES__EXPIRY_INTERVAL_S", "0"),
    ("CG_FACES__MAX_IMAGE_BYTES", "0"),
    ("CG_FACES__MATCH_THRESHOLD", "200"),
    ("CG_FACES__MATCH_THRESHOLD", "-1"),
    ("CG_FACES__MATCH_THRESHOLD", "nan"),
    ("CG_FACES__DETECTOR_MIN_SCORE", "1.5"),
    ("CG_FACES__TARGET_FMR", "-0.1"),
]


@pytest.mark.parametrize(("variable", "value"), REFUSED)
def test_a_meaningless_number_is_a_settings_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith(f"{variable}: ")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CG_OPENSEARCH__BULK_MAX_DOCS", "1"),
        ("CG_CAMERAS__LOCAL_PUBLISH_HZ", "0.1"),
        ("CG_JOB__BUFFER_TIMEOUT_MS", "0"),
        ("CG_JOB__BATCH_TIME_MS", "0"),
        ("CG_JOB__FACE_DEADLINE_MS", "0"),
        ("CG_JOB__STALE_STATE_RETENTION_HOURS", "0"),
        ("CG_MODEL__RETRIES", "0"),
        ("CG_INDICES__ALERTS_RETENTION_DAYS", "0"),
        ("CG_CAMERAS__NO_VIDEO_BACKOFF_S", "0"),
    ],
)
def test_the_smallest_meaningful_values_are_taken_as_given(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The documented edges (0 = off, send at once, keep forever, no retry) stay settings."""
    monkeypatch.setenv(variable, value)
    section, name = variable.removeprefix("CG_").lower().split("__")
    assert float(getattr(getattr(Settings(), section), name)) == float(value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CG_RULES__VELOCITY_WINDOW_S", "-600"),
        ("CG_RULES__VELOCITY_WINDOW_S", "0"),
        ("CG_RULES__VELOCITY_LIMIT", "0"),
        ("CG_RULES__HIGH_VALUE_AMOUNT", "0"),
        ("CG_RULES__HIGH_VALUE_AMOUNT", "inf"),
        ("CG_RULES__AMOUNT_ZSCORE", "inf"),
        ("CG_RULES__AMOUNT_ZSCORE", "nan"),
        ("CG_RULES__AMOUNT_ZSCORE", "-1"),
        ("CG_RULES__SUSPICIOUS_TIMING_S", "-1"),
        ("CG_RULES__STORE_RETURN_WINDOW_S", "0"),
        ("CG_RULES__STORE_RETURN_LIMIT", "0"),
        ("CG_RULES__RECEIPT_RETENTION_DAYS", "0"),
        ("CG_RULES__RECEIPT_FACE_RETENTION_HOURS", "0"),
        ("CG_RULES__RECEIPT_FACE_RETENTION_HOURS", "nan"),
        ("CG_RULES__CUSTOMER_RETENTION_DAYS", "0"),
        ("CG_RULES__BLOCK_AT", "150"),
        ("CG_RULES__REVIEW_AT", "0"),
    ],
)
def test_a_meaningless_rule_threshold_is_a_settings_error_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The indicators' thresholds and retentions were taken as given: a negative window never counted, a limit of 0
    flagged every transaction, a retention of 0 forgot every receipt at once; block_at/review_at out of the rule
    set's 1-100 failed only in the scoring job, inside Flink."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith(f"{variable}: ")


def test_review_at_not_below_block_at_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CG_RULES__BLOCK_AT", "60")
    monkeypatch.setenv("CG_RULES__REVIEW_AT", "60")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith("CG_RULES__REVIEW_AT: 60 is not below CG_RULES__BLOCK_AT (60)")
    monkeypatch.setenv("CG_RULES__REVIEW_AT", "59")
    assert (Settings().rules.block_at, Settings().rules.review_at) == (60, 59)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CG_RULES__VELOCITY_WINDOW_S", "1"),
        ("CG_RULES__VELOCITY_LIMIT", "1"),
        ("CG_RULES__AMOUNT_ZSCORE", "0.5"),
        ("CG_RULES__RECEIPT_RETENTION_DAYS", "1"),
        ("CG_RULES__RECEIPT_FACE_RETENTION_HOURS", "0.5"),
        ("CG_RULES__BLOCK_AT", "100"),
        ("CG_RULES__REVIEW_AT", "1"),
    ],
)
def test_the_smallest_and_largest_rule_thresholds_are_taken_as_given(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert float(getattr(Settings().rules, variable.removeprefix("CG_RULES__").lower())) == float(value)


def test_a_stop_grace_not_below_the_supervisor_stop_timeout_is_a_settings_error_naming_both_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor's SIGKILL came before the camera bridge had saved the records Kafka had not taken (lost), or
    before the shoppers had reported theirs: a grace as long as the stop timeout was taken without a word."""
    monkeypatch.setenv("CG_SUPERVISOR__STOP_TIMEOUT_S", "8")
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "0.1")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith(
        "CG_CAMERAS__BRIDGE_STOP_GRACE_S: 10 is not below CG_SUPERVISOR__STOP_TIMEOUT_S (8): "
    )
    monkeypatch.setenv("CG_KAFKA__STOP_FLUSH_S", "8")
    with pytest.raises(ValidationError) as refused:
        Settings()
    flush = setting_errors(refused.value).split("; lower it or raise CG_SUPERVISOR__STOP_TIMEOUT_S; ")[1]
    assert flush.startswith("CG_KAFKA__STOP_FLUSH_S: 8 is not below CG_SUPERVISOR__STOP_TIMEOUT_S (8): ")
    monkeypatch.setenv("CG_CAMERAS__BRIDGE_STOP_GRACE_S", "7.9")
    monkeypatch.setenv("CG_KAFKA__STOP_FLUSH_S", "6.8")  # with the alert sender's 0.1 s, 1 s below the stop timeout
    settings = Settings()
    assert (settings.cameras.bridge_stop_grace_s, settings.kafka.stop_flush_s) == (7.9, 6.8)


def test_an_alert_sender_stop_wait_not_below_the_supervisor_stop_timeout_is_a_settings_error_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender waited a fixed 15 s for its sends under way, whatever the stop timeout: with 12 s the supervisor's
    SIGKILL came first, and the sends that went through were not in the ledger and were sent again on restart."""
    monkeypatch.setenv("CG_SUPERVISOR__STOP_TIMEOUT_S", "12")
    monkeypatch.setenv("CG_CAMERAS__BRIDGE_STOP_GRACE_S", "6")
    monkeypatch.setenv("CG_KAFKA__STOP_FLUSH_S", "0.5")
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "15")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith("CG_ALERTS__STOP_WAIT_S + CG_KAFKA__STOP_FLUSH_S: 15 + 0.5 ")
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "10.4")
    assert Settings().alerts.stop_wait_s == 10.4


def test_the_alert_sender_stop_wait_and_its_kafka_flush_together_not_below_the_stop_timeout_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After its stop wait the sender also waited up to 5 s for Kafka to acknowledge its dead letters: a stop wait
    below the stop timeout but within 5 s of it was taken, and the supervisor's SIGKILL came mid-flush, before the
    offsets of the alerts done were committed."""
    monkeypatch.setenv("CG_SUPERVISOR__STOP_TIMEOUT_S", "12")
    monkeypatch.setenv("CG_CAMERAS__BRIDGE_STOP_GRACE_S", "6")
    monkeypatch.setenv("CG_KAFKA__STOP_FLUSH_S", "4")
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "8")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value) == (
        "CG_ALERTS__STOP_WAIT_S + CG_KAFKA__STOP_FLUSH_S: 8 + 4 = 12 is not below CG_SUPERVISOR__STOP_TIMEOUT_S (12) "
        "less the 1 s its last offset commit ends before the SIGKILL (11): the supervisor's SIGKILL would come before "
        "the alert sender records the sends under way (sent again on restart), Kafka acknowledges what it produced "
        "at the stop and it commits the alerts done; lower them or raise CG_SUPERVISOR__STOP_TIMEOUT_S"
    )
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "6.9")
    assert Settings().alerts.stop_wait_s == 6.9


def test_an_alert_sender_stop_within_a_second_of_the_stop_timeout_is_refused_as_its_last_commit_gets_no_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's last offset commit is given up 1 s before the supervisor's SIGKILL: a stop wait and a Kafka flush
    that together came within that second of the stop timeout were taken, and the commit then got no time at all, so
    the alerts done since the last commit were read again at every restart."""
    monkeypatch.setenv("CG_SUPERVISOR__STOP_TIMEOUT_S", "12")
    monkeypatch.setenv("CG_CAMERAS__BRIDGE_STOP_GRACE_S", "6")
    monkeypatch.setenv("CG_KAFKA__STOP_FLUSH_S", "4")
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "7.5")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert setting_errors(refused.value).startswith(
        "CG_ALERTS__STOP_WAIT_S + CG_KAFKA__STOP_FLUSH_S: 7.5 + 4 = 11.5 is not below CG_SUPERVISOR__STOP_TIMEOUT_S "
        "(12) less the 1 s its last offset commit ends before the SIGKILL (11): "
    )
    monkeypatch.setenv("CG_ALERTS__STOP_WAIT_S", "6.9")
    assert Settings().alerts.stop_wait_s == 6.9


def test_the_default_stop_graces_fit_the_default_stop_timeout() -> None:
    """The defaults start: a sender's stop wait and Kafka flush together stay below the supervisor's SIGKILL."""
    settings = Settings()
    assert settings.alerts.stop_wait_s + settings.kafka.stop_flush_s < settings.supervisor.stop_timeout_s - 1
