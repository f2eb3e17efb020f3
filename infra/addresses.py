"""``CG_BIND_HOST`` read once: which bind hosts mean every interface, where a client on this host reaches a
listener bound to one, and how a host goes into ``host:port`` and URLs.

Each module that listens or asks a listener (the metrics endpoints, the local Prometheus, the Flink cluster and
the scoring job's mini-cluster) takes the rule from here: written out in each, the copies drifted, and an IPv6
bind host (``::1``) gave ``http://::1:8081``, which is no URL. Every ``host:port`` the stack writes (Kafka's
listeners and quorum, the bootstrap list, the addresses it reports) is :func:`host_port`'s.
"""

from __future__ import annotations

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
"""Bind hosts meaning every interface (``::`` is bound dual-stack): a client on this host asks them at 127.0.0.1."""


def is_wildcard(bind_host: str) -> bool:
    """Whether a listener bound to ``bind_host`` takes connections on every interface."""
    return bind_host in WILDCARD_HOSTS


def client_host(bind_host: str) -> str:
    """Where a client on this host reaches a listener bound to ``bind_host``, bare (a socket's or Flink's
    address): a wildcard at 127.0.0.1, any other host as it is."""
    return "127.0.0.1" if is_wildcard(bind_host) else bind_host


def bracketed(host: str) -> str:
    """``host`` as the host part of ``host:port`` or a URL: an IPv6 address in brackets (``[::1]:9490``;
    without them the port reads as part of the address)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def url_host(bind_host: str) -> str:
    """Where a client on this host asks a listener bound to ``bind_host``, as a URL's host (``[::1]`` for ``::1``)."""
    return bracketed(client_host(bind_host))


def reporter_host(bind_host: str) -> str:
    """The host Flink's Prometheus reporter (``BoundPrometheusReporter``) binds, for the Flink cluster and the job's
    mini-cluster alike: ``bind_host``, an empty one as ``0.0.0.0`` (Java reads an empty host as loopback)."""
    return bind_host or "0.0.0.0"


def host_port(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host in brackets (``[::1]:9092``): ``::1:9092`` is itself an IPv6 address, so
    Kafka's listeners and quorum voters and Prometheus read the port into the host, or refuse it."""
    return f"{bracketed(host)}:{port}"


def split_host_port(address: str, default_host: str = "127.0.0.1") -> tuple[str, str]:
    """``host:port`` (a ``scheme://`` in front ignored) as the bare host (``::1`` for ``[::1]:9092``, which a
    socket takes; ``default_host`` when none is given) and the port's text, unchecked."""
    host, _, port = address.strip().split("://", 1)[-1].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or default_host, port
