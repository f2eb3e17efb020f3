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
