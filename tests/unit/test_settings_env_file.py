"""Settings from a ``.env`` file: read by ``get_settings()`` only, environment variables win."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import launcher
from infra import settings as settings_module
from infra.settings import REPO_ROOT, Settings, SettingsFileError, env_file, get_settings


@pytest.fixture(autouse=True)
def no_cg_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Neither CI's ``CG_*`` variables nor a cached settings object from another test."""
    for name in [n for n in os.environ if n.startswith("CG_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_get_settings_reads_the_env_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv = tmp_path / "store.env"
    dotenv.write_text(
        "# a store's production settings\n"
        "CG_KAFKA__BOOTSTRAP_SERVERS=b-1.msk.example:9096\n"
        "CG_LOG__FORMAT=json\n"
        "CG_LOG__LEVEL=warning\n"
        "AWS_DEFAULT_REGION=eu-central-1\n"  # not a setting: ignored, not an error
        "CG_SETUP__BROWSER=no\n"  # read by install.sh, not by the settings: ignored too
    )
    monkeypatch.setenv("CG_ENV_FILE", str(dotenv))
    settings = get_settings()
    assert settings.kafka.bootstrap_servers == "b-1.msk.example:9096"
    assert (settings.log.format, settings.log.level) == ("json", "warning")
    assert "AWS_DEFAULT_REGION" not in os.environ
    assert Settings().kafka.bootstrap_servers == "127.0.0.1:9092"  # a Settings() built directly ignores the file

    monkeypatch.setenv("CG_LOG__LEVEL", "debug")
    get_settings.cache_clear()
    settings = get_settings()
    assert (settings.log.format, settings.log.level) == ("json", "debug")


def test_which_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_file() == REPO_ROOT / ".env"  # the repo root's, whatever the working directory
    (tmp_path / "other.env").write_text("CG_KAFKA__TOPIC_PREFIX=x.\n")
    monkeypatch.setenv("CG_ENV_FILE", str(tmp_path / "other.env"))
    assert env_file() == tmp_path / "other.env"
    assert get_settings().kafka.topic_prefix == "x."
    monkeypatch.setenv("CG_ENV_FILE", "")
    assert env_file() is None
    monkeypatch.setenv("CG_ENV_FILE", os.devnull)  # not a regular file, but a file to read
    get_settings.cache_clear()
    assert env_file() == Path(os.devnull) and get_settings().kafka.topic_prefix == ""


def test_a_named_env_file_that_is_missing_a_folder_or_not_text_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped CG_ENV_FILE left every setting at its default (Kafka on 127.0.0.1) without a word."""
    (tmp_path / "binary.env").write_bytes(b"CG_LOG__LEVEL=\xff\xfe\x00debug\n")
    for path, says in (
        (tmp_path / "missing.env", "no such file"),
        (tmp_path, "a folder"),
        (tmp_path / "binary.env", "not UTF-8 text"),
    ):
        monkeypatch.setenv("CG_ENV_FILE", str(path))
        get_settings.cache_clear()
        with pytest.raises(SettingsFileError, match=f"^CG_ENV_FILE={path}: {says}"):
            get_settings()


def test_the_env_file_is_git_ignored() -> None:
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize("named", ["", "store.env"])
def test_a_started_process_has_its_parents_settings_not_another_env_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    """A process started by ``checkout-guard supervise`` (or ``make run``) got every setting its parent had, but
    read the repo root's ``.env`` for those left unset: with CG_ENV_FILE empty ("no file") or naming another file,
    a dashboard login, a camera API or a model there reached the services while the supervisor ran without it."""
    (tmp_path / ".env").write_text("CG_DASHBOARD__TOKEN=from-the-repo-file\nCG_MODEL__AFD_MODEL_ID=left-over\n")
    (tmp_path / "store.env").write_text("CG_KAFKA__TOPIC_PREFIX=store.\n")
    monkeypatch.setattr(settings_module, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("CG_ENV_FILE", str(tmp_path / named) if named else "")
    parent = get_settings().model_copy(update={"stack_dir": tmp_path / "stack"})
    assert parent.dashboard.token is None and parent.model.afd_model_id is None

    started: dict[str, dict[str, str]] = {}
    real_popen = subprocess.Popen

    def popen(args: list[str], **kwargs: object) -> subprocess.Popen:
        started["env"] = kwargs["env"]  # type: ignore[assignment]
        return real_popen(["true"])

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    launcher.spawn("sinks.dashboard", parent, name="dashboard").proc.wait()
    for name in [n for n in os.environ if n.startswith("CG_")]:
        monkeypatch.delenv(name)
    for name, value in started["env"].items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    child = get_settings()
    assert (child.dashboard.token, child.model.afd_model_id) == (None, None), "nothing from the repo root's .env"
    assert child == parent, "the child's settings are its parent's"
