"""The one OpenSearch client factory: URL, credentials and TLS from settings, no retries of its own."""

from __future__ import annotations

from opensearchpy import OpenSearch

from infra.settings import OpenSearchSettings


def make_client(settings: OpenSearchSettings, timeout_s: float = 30.0) -> OpenSearch:
    """An OpenSearch client that does not retry on its own: the sink's backoff decides when to retry."""
    auth = None
    if settings.username and settings.password:
        auth = (settings.username, settings.password.get_secret_value())
    return OpenSearch(
        hosts=[settings.url],
        http_auth=auth,
        verify_certs=settings.verify_certs,
        timeout=timeout_s,
        max_retries=0,
        retry_on_timeout=False,
    )
