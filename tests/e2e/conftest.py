"""End-to-end tests run against the real local stack (Kafka, OpenSearch, Mosquitto).

The session fixture starts the stack once (``infra.stack.up`` is idempotent: a running stack is
reused) and leaves it running afterwards, so repeated runs and other work share it.
"""

from __future__ import annotations

import pytest

from infra.settings import Settings, get_settings
from infra.stack import up


@pytest.fixture(scope="session", autouse=True)
def stack() -> Settings:
    """The settings of a running, healthy local stack with every topic of ALL_TOPICS created."""
    settings = get_settings()
    up(settings)
    return settings
