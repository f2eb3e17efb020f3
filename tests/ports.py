"""Free local ports for processes a test starts, chosen below the kernel's ephemeral range.

A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, which every outgoing connection
(Kafka and OpenSearch clients, a browser) draws its local port from too: in the seconds between choosing a
port and the started process binding it, a connection could take it ("Address already in use", a process
without its endpoint). Below the range only a listener can hold a port, and the bind check sees that.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

LOWEST = 20_000


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral ports (Linux's default where the file is unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port_block(size: int) -> int:
    """A base port with ``size`` free ports from it, all below the ephemeral range."""
    top = ephemeral_range()[0] - size
    for base in random.sample(range(LOWEST, top), min(400, top - LOWEST)):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + size):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {size} free ports between {LOWEST} and {top + size}")


def free_port() -> int:
    """One free port below the ephemeral range."""
    return free_port_block(1)
