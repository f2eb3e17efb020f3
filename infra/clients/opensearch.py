"""The one OpenSearch client factory: URL, credentials and TLS from settings, no retries of its own.

Logins: HTTP Basic (``CG_OPENSEARCH__USERNAME``/``PASSWORD``, the local stack or a domain's internal users), or
AWS SigV4 (``CG_OPENSEARCH__AWS_SIGV4``, for Amazon OpenSearch Service with IAM access): every request signed
with boto3's credentials, which refresh themselves (an ECS task role's rotate hourly).
"""

from __future__ import annotations

from typing import Any

from opensearchpy import OpenSearch, Urllib3AWSV4SignerAuth

from infra.settings import OpenSearchSettings
from schemas.errors import CheckoutGuardError


class OpenSearchConfigError(CheckoutGuardError, ValueError):
    """OpenSearch login settings that cannot work (SigV4 without a region or credentials)."""


def sigv4_auth(settings: OpenSearchSettings, session: Any = None) -> Urllib3AWSV4SignerAuth:
    """opensearch-py's SigV4 signer over boto3's default credential chain (``session``: a boto3 session)."""
    import boto3

    if not settings.aws_region:
        raise OpenSearchConfigError("CG_OPENSEARCH__AWS_SIGV4 needs CG_OPENSEARCH__AWS_REGION (the domain's region)")
    credentials = (session or boto3.Session()).get_credentials()
    if credentials is None:
        raise OpenSearchConfigError("CG_OPENSEARCH__AWS_SIGV4: no AWS credentials found in boto3's default chain")
    return Urllib3AWSV4SignerAuth(credentials, settings.aws_region, settings.aws_service)


def make_client(settings: OpenSearchSettings, timeout_s: float = 30.0) -> OpenSearch:
    """An OpenSearch client that does not retry on its own: the sink's backoff decides when to retry."""
    auth: Any = None
    if settings.aws_sigv4:
        auth = sigv4_auth(settings)
    elif settings.username and settings.password:
        auth = (settings.username, settings.password.get_secret_value())
    return OpenSearch(
        hosts=[settings.url],
        http_auth=auth,
        verify_certs=settings.verify_certs,
        timeout=timeout_s,
        max_retries=0,
        retry_on_timeout=False,
    )


RETRIABLE_ERROR_TYPES = frozenset(
    {
        "cluster_block_exception",  # read-only index after a disk watermark: the cluster's trouble, not the doc's
        "index_not_found_exception",  # index deleted while auto-create is off: reinstalled before the retry
        "es_rejected_execution_exception",
        "unavailable_shards_exception",
    }
)


def is_retriable(status: Any, error_type: str | None) -> bool:
    """Whether a bulk item's failure is worth retrying: 429, 5xx and the cluster's own trouble
    (:data:`RETRIABLE_ERROR_TYPES`, whatever their status: a write block is 403 or 429) are; other 4xx reject the
    document for good. One rule for every bulk writer: the sink's, and the forget's, which must not take a
    blocked write for done."""
    if not isinstance(status, int):
        return True
    return status == 429 or status >= 500 or error_type in RETRIABLE_ERROR_TYPES
