"""The OpenSearch sink in a thread of the test process, for e2e tests that read what the job decided."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from infra.clients.opensearch import make_client
from infra.launcher import wait_for
from infra.settings import Settings
from schemas.indices import index_name
from sinks.opensearch.sink import run_sink


@contextmanager
def sink_running(settings: Settings, timeout_s: float = 60.0) -> Iterator[None]:
    """The sink runs (its transactions index created) for the block; then it stops and the test's indices
    (``<index prefix>-*``) are deleted."""
    stop = threading.Event()
    sink = threading.Thread(target=run_sink, args=(settings, stop), daemon=True)
    sink.start()
    client = make_client(settings.opensearch)
    try:
        wait_for(
            lambda: client.indices.exists(index=index_name(settings.opensearch.index_prefix, "transactions")),
            timeout=timeout_s,
            what="the sink to create its index",
        )
        yield
    finally:
        stop.set()
        sink.join(30)
        client.indices.delete(index=f"{settings.opensearch.index_prefix}-*", ignore_unavailable=True)
