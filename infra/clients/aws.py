"""boto3 clients built one way: region and credentials from our settings when they are given, otherwise
boto3's own default chain.

Region: the setting (``CG_MODEL__AWS_REGION``, ``CG_FACES__AWS_REGION``, ``CG_ALERTS__SES_REGION``) when
set, else what boto3 resolves: ``AWS_DEFAULT_REGION``, then the ``region`` of the profile in
``~/.aws/config`` (``AWS_PROFILE``, ``AWS_CONFIG_FILE``). boto3 reads neither ``AWS_REGION`` nor the
instance metadata for the region. A service that needs a region and gets none fails at start with
:class:`MissingAwsRegion` naming the setting, not with botocore's ``NoRegionError`` on the first call.

Credentials: the pair of settings (``…__AWS_ACCESS_KEY_ID`` and ``…__AWS_SECRET_ACCESS_KEY``) when both are
set, else boto3's chain: environment, shared credentials/config files (profiles, SSO, assume-role), the
container (ECS/EKS) and instance (EC2 IMDS) roles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import SecretStr

from schemas.errors import CheckoutGuardError

T = TypeVar("T")


class MissingAwsRegion(CheckoutGuardError, ValueError):
    """A service that needs an AWS region and neither the setting nor boto3's chain gave one."""


def standard_retry_wait_s(attempts: int) -> float:
    """The longest botocore's ``standard`` retry mode waits between the ``attempts`` tries of one call:
    ``rand * min(2^i, 20)`` s, raised by an ``x-amz-retry-after`` answer by 5 s at most (22 s for 4 tries)."""
    return sum(min(2**i, 20) + 5 for i in range(attempts - 1))


def call_limit_s(attempts: int, timeout_s: float) -> float:
    """The longest one botocore call takes in ``standard`` retry mode with ``attempts`` tries whose connect and read
    each time out after ``timeout_s``: every try timing out twice (connecting, reading) plus the waits between them.
    What a ``/healthz`` limit must outlast, so that a call waiting out its timeouts never gets a process restarted."""
    return attempts * 2 * timeout_s + standard_retry_wait_s(attempts)


def given_up_by(call: Callable[[], T], what: str, give_up_by: Callable[[], float | None] | None, whose: str) -> T:
    """``call()``, one botocore call of ``whose`` (its tries and botocore's waits between them, up to
    :func:`call_limit_s`, about a minute). With ``give_up_by`` (its owner's stop deadline once the stop is asked, None
    before: the watchlist service's) from a daemon thread, given up at that deadline, 1 s before the supervisor's
    SIGKILL (:func:`infra.clients.transactional.bounded`: ``TransactionGivenUp`` naming ``whose`` and ``what``), so the
    service gives its command up uncommitted instead of being killed in it; unset, waited for here. One rule for every
    AWS client that has it, Rekognition's calls and the S3 image store's, and for the local image store's file
    operations (:func:`infra.clients.image_store.local_file_call`: ``whose`` the words of several)."""
    if give_up_by is None:
        return call()
    from infra.clients.transactional import bounded  # here: it loads the Kafka client

    return bounded(call, what, give_up_by, "-".join(whose.lower().split()) + "-call", whose=whose)


def aws_session(
    region: str | None,
    access_key_id: SecretStr | None = None,
    secret_access_key: SecretStr | None = None,
    *,
    credentials_setting: str = "",
) -> Any:
    """A boto3 session: explicit region and key pair when set, boto3's default chain for what is not."""
    import boto3

    if (access_key_id is None) != (secret_access_key is None):
        raise ValueError(
            f"set both {credentials_setting}AWS_ACCESS_KEY_ID and {credentials_setting}AWS_SECRET_ACCESS_KEY, "
            "or neither (then boto3's default credential chain applies)"
        )
    creds: dict[str, str] = {}
    if access_key_id is not None and secret_access_key is not None:
        creds = {
            "aws_access_key_id": access_key_id.get_secret_value(),
            "aws_secret_access_key": secret_access_key.get_secret_value(),
        }
    return boto3.session.Session(region_name=region or None, **creds)


def aws_client(
    service: str,
    *,
    region: str | None,
    region_setting: str,
    endpoint_url: str | None = None,
    access_key_id: SecretStr | None = None,
    secret_access_key: SecretStr | None = None,
    config: Any = None,
    region_required: bool = True,
) -> Any:
    """A boto3 client of ``service``. ``region_setting`` is the ``CG_*`` variable named when no region
    resolves; ``region_required=False`` for S3, which boto3 serves from its global endpoint without one."""
    prefix = region_setting.rsplit("__", 1)[0] + "__"
    session = aws_session(region, access_key_id, secret_access_key, credentials_setting=prefix)
    if region_required and not session.region_name:
        raise MissingAwsRegion(
            f"{service}: no AWS region. Set {region_setting}, or AWS_DEFAULT_REGION, or `region` in the AWS "
            "profile (~/.aws/config); boto3 does not read AWS_REGION"
        )
    return session.client(service, endpoint_url=endpoint_url, config=config)
