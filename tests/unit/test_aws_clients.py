"""AWS region and credentials: our settings when given, boto3's default chain otherwise (infra/clients/aws.py).

Every test starts from an environment without ``CG_*`` and ``AWS_*`` variables and without AWS config
files, so neither CI's settings nor this machine's AWS profile decide the outcome. No request is sent.
"""

from __future__ import annotations

import os

import pytest
from pydantic import SecretStr

from infra.clients.aws import MissingAwsRegion, aws_client
from infra.clients.image_store import S3ImageStore
from infra.settings import AlertSettings, FaceSettings, ModelSettings, Settings
from jobs.faces.rekognition import RekognitionFaces
from jobs.model.predictors import FraudDetectorPredictor, SageMakerPredictor
from sinks.alerts.mail import SesMailer


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("CG_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait for an instance role here


def _clients(settings: Settings) -> dict[str, object]:
    return {
        "frauddetector": FraudDetectorPredictor(settings, None).client,
        "sagemaker-runtime": SageMakerPredictor(settings, None).client,
        "rekognition": RekognitionFaces(settings.faces).client,
        "s3": S3ImageStore(settings).s3,
        "ses": SesMailer(settings.smtp, settings.alerts.ses_region).client,
    }


def test_no_region_is_forced_by_default():
    settings = Settings()
    assert settings.model.aws_region is None
    assert settings.faces.aws_region is None
    assert settings.alerts.ses_region is None


def test_unset_regions_come_from_boto3s_default_chain(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    clients = _clients(Settings())
    assert {name: c.meta.region_name for name, c in clients.items()} == dict.fromkeys(clients, "eu-north-1")
    # no key pair in the settings: the credentials are the chain's (here the environment's)
    assert {c._request_signer._credentials.access_key for c in clients.values()} == {"from-env"}


def test_the_aws_profile_gives_the_region_too(monkeypatch, tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = ap-southeast-2\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert SesMailer(Settings().smtp).client.meta.region_name == "ap-southeast-2"


def test_explicit_settings_win_over_the_chain(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    keys = {"aws_access_key_id": SecretStr("explicit"), "aws_secret_access_key": SecretStr("explicit-secret")}
    settings = Settings(
        model=ModelSettings(aws_region="us-west-2", **keys),
        faces=FaceSettings(aws_region="us-west-2", **keys),
        alerts=AlertSettings(ses_region="us-west-2"),
    )
    clients = _clients(settings)
    assert {c.meta.region_name for c in clients.values()} == {"us-west-2"}
    creds = {name: c._request_signer._credentials.access_key for name, c in clients.items()}
    assert creds == {**dict.fromkeys(clients, "explicit"), "ses": "from-env"}  # SES has no key settings


def test_no_region_anywhere_fails_with_a_message_naming_the_settings(monkeypatch):
    settings = Settings()
    for build, setting in [
        (lambda: FraudDetectorPredictor(settings, None), "CG_MODEL__AWS_REGION"),
        (lambda: SageMakerPredictor(settings, None), "CG_MODEL__AWS_REGION"),
        (lambda: RekognitionFaces(settings.faces), "CG_FACES__AWS_REGION"),
        (lambda: SesMailer(settings.smtp, settings.alerts.ses_region), "CG_ALERTS__SES_REGION"),
    ]:
        with pytest.raises(MissingAwsRegion) as err:
            build()
        assert setting in str(err.value) and "AWS_DEFAULT_REGION" in str(err.value)
        assert "AWS_REGION" in str(err.value).replace("AWS_DEFAULT_REGION", "")


def test_s3_needs_no_region(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert S3ImageStore(Settings()).s3.meta.region_name == "us-east-1"  # boto3's global S3 endpoint


def test_half_a_key_pair_is_refused():
    with pytest.raises(ValueError, match="CG_FACES__AWS_SECRET_ACCESS_KEY"):
        aws_client(
            "s3",
            region="eu-west-1",
            region_setting="CG_FACES__AWS_REGION",
            access_key_id=SecretStr("only-the-id"),
            region_required=False,
        )
