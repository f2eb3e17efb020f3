"""Meraki Dashboard API snapshots, and which camera watches which lane.

:class:`MerakiClient` asks a camera for a snapshot (``POST /devices/{serial}/camera/generateSnapshot``)
at a timestamp or "now", then polls the returned URL until the JPEG is there. It copes with the API's
awkward parts: the URL is not ready at once, a recent timestamp answers ``400 No video for specified
timestamp`` until the footage is stored (retry, optionally fall back to "now"), ``429`` carries a
``Retry-After`` to honour, ``5xx`` are retried -- all inside one overall deadline, so a caller waiting
on a transaction is never held longer than it allowed. Every failure is a :class:`SnapshotError` whose
``kind`` and message say what happened (they end up as ``face: unavailable`` reasons).

The API key can do far more than take snapshots (reboot a device, change a network), so nothing from a
record reaches a URL unchecked: serials must match :data:`schemas.identifiers.SERIAL_RE` and are
escaped as one path segment anyway, the camera map refuses store/lane ids that are not names, and the
snapshot URL the API answers is fetched only from an allow-listed host (``CG_CAMERAS__SNAPSHOT_HOSTS``), as is
every redirect of it.

The same client talks to the real Dashboard (``CG_CAMERAS__BASE_URL=https://api.meraki.com/api/v1``)
and to the local camera (``infra.local.camera``), the default.
"""

from __future__ import annotations

import json
import ssl
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

import httpcore
import httpx

from infra.clients.urls import path_segment
from infra.retry import parse_retry_after
from infra.settings import CameraSettings, Settings, camera_map
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import NAME_RE, SERIAL_RE, check_name, check_serial
from schemas.images import JPEG_MAGIC, image_type

API_KEY_HEADER = "X-Cisco-Meraki-API-Key"
NO_VIDEO = "No video for specified timestamp"
ENTRANCE = "ENTRANCE"
MERAKI_DOMAIN = "meraki.com"
"""Snapshot URLs of the real Dashboard live on other hosts of this domain (the API reference's example
answer is on ``spn4.meraki.com``), so an API base on it allows ``*.meraki.com`` by default."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
"""The Dashboard may redirect an API call to the shard that hosts the organisation (Meraki's own library follows
these, sending the same request again); followed only to the Dashboard's hosts (:func:`api_hosts`). The image host
may redirect a snapshot URL to where the image is stored; followed only to :func:`snapshot_hosts`."""
MAX_REDIRECTS = 3
MAX_API_REPLY_BYTES = 64 * 1024
"""A generateSnapshot reply is a URL and an expiry (or a few errors); a longer one is ``http_error``, unread."""
_INFLATE_STEP = 64 * 1024
"""At most this many decompressed bytes come out of one step of a compressed body's decoding (:func:`_read_body`)."""
_NOT_READY = frozenset({202, 403, 404})
"""What a snapshot URL answers while the image is being stored (S3-style 403/404, or 202)."""
Location = tuple[str, str | None]
"""(store_id, lane_id); lane_id None = the store's entrance."""


# --------------------------------------------------------------------------------------------------
# Camera map


@cache
def _maps(cameras: CameraSettings) -> tuple[dict[tuple[str, str], str], dict[str, str], dict[str, Location]]:
    """The maps as parsed; the settings checked them when they were read (:func:`infra.settings.camera_map`)."""
    lanes = {}
    for key, serial in camera_map(cameras.lane_cameras, lanes=True).items():
        store_id, _, lane_id = key.partition("/")
        lanes[(store_id, lane_id)] = serial
    entrances = camera_map(cameras.entrance_cameras, lanes=False)
    where: dict[str, Location] = {s: k for k, s in lanes.items()}
    where.update({s: (store, None) for store, s in entrances.items()})
    return lanes, entrances, where


def camera_for_lane(settings: Settings, store_id: str, lane_id: str) -> str:
    """Serial of the camera over a checkout lane (explicit map, else ``Q2MV-<store>-<lane>``).

    Ids that are not names (:data:`schemas.identifiers.NAME_RE`) raise ``InvalidRecord`` (``invalid_id``):
    a serial built from ``x/../Q2XX-VICTIM-0001/reboot?`` must never exist.
    """
    check_name(store_id, "store_id")
    check_name(lane_id, "lane_id")
    lanes, _, _ = _maps(settings.cameras)
    return lanes.get((store_id, lane_id)) or f"Q2MV-{store_id}-{lane_id}"


def entrance_camera(settings: Settings, store_id: str) -> str:
    """Serial of a store's entrance camera (explicit map, else ``Q2MV-<store>-ENTRANCE``, which
    :func:`camera_location` takes for an entrance only while no map is set); ``InvalidRecord`` for a store id
    that is not a name."""
    check_name(store_id, "store_id")
    _, entrances, _ = _maps(settings.cameras)
    return entrances.get(store_id) or f"Q2MV-{store_id}-{ENTRANCE}"


def camera_location(settings: Settings, serial: str) -> Location | None:
    """``(store_id, lane_id)`` a camera watches, ``lane_id`` None for an entrance; None if unknown (which
    includes a serial that is no valid serial, or one whose store/lane part is no valid name).

    ``Q2MV-<store>-ENTRANCE`` is an entrance only while no camera map is set (the demo's cameras): an entrance
    camera asks for snapshots by its own events, so with maps, any publisher naming a serial that way would
    have the Dashboard asked for snapshots of a camera no map knows. Unmapped lanes keep their
    ``Q2MV-<store>-<lane>`` (:func:`camera_for_lane`); a lane camera's events ask for nothing by themselves."""
    if not isinstance(serial, str) or SERIAL_RE.fullmatch(serial) is None:
        return None
    lanes, entrances, where = _maps(settings.cameras)
    if serial in where:
        return where[serial]
    if serial.startswith("Q2MV-"):
        rest = serial[len("Q2MV-") :]
        if rest.endswith(f"-{ENTRANCE}") and len(rest) > len(ENTRANCE) + 1:
            if lanes or entrances:
                return None
            return _named(rest[: -len(ENTRANCE) - 1], None)
        store_id, sep, lane_id = rest.rpartition("-lane-")
        if sep and store_id and lane_id:
            return _named(store_id, f"lane-{lane_id}")
    return None


def _named(store_id: str, lane_id: str | None) -> Location | None:
    names = [store_id] if lane_id is None else [store_id, lane_id]
    return (store_id, lane_id) if all(NAME_RE.fullmatch(n) for n in names) else None


def _host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """``host`` equals a pattern, or is a subdomain of a ``*.domain`` pattern (case-insensitive)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def api_hosts(base_url: str) -> tuple[str, ...]:
    """The hosts the API key may be sent to: the API base URL's host, plus ``*.meraki.com`` for a Dashboard on
    meraki.com (its redirects to an organisation's shard, e.g. ``n149.meraki.com``)."""
    host = (httpx.URL(base_url).host or "").lower().rstrip(".")
    hosts = [host] if host else []
    if host == MERAKI_DOMAIN or host.endswith(f".{MERAKI_DOMAIN}"):
        hosts.append(f"*.{MERAKI_DOMAIN}")
    return tuple(hosts)


def snapshot_hosts(cameras: CameraSettings, base_url: str) -> tuple[str, ...]:
    """The hosts a snapshot URL may point at: ``snapshot_hosts`` when set, else :func:`api_hosts` (the local
    camera serves both from one address; the Dashboard's snapshot URLs are on ``*.meraki.com``)."""
    configured = [p.strip().lower().rstrip(".") for p in cameras.snapshot_hosts.split(",") if p.strip()]
    return tuple(configured) if configured else api_hosts(base_url)


# --------------------------------------------------------------------------------------------------
# Snapshots


class SnapshotError(CheckoutGuardError, RuntimeError):
    """No image. ``kind``: invalid_serial | untrusted_url | deadline | no_video | not_ready | rate_limited |
    server_error | http_error | transport | empty | wrong_type | too_large | not_jpeg | unsupported_image."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Snapshot:
    serial: str
    image: bytes
    content_type: str
    requested_ms: int | None
    """The timestamp asked for (None = "now")."""
    fell_back_to_now: bool
    """The camera had no video for ``requested_ms``; this is a snapshot of the moment we gave up."""
    api_calls: int
    polls: int
    elapsed_s: float


def iso_timestamp(epoch_ms: int) -> str:
    """Meraki's timestamp format (ISO 8601, UTC, whole seconds)."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(body: bytes) -> Any:
    """The JSON of an API reply, ``ValueError`` for one that is none: also for one nested so deep that the parser's
    recursion gives up (a RecursionError left the snapshot client with no :class:`SnapshotError`)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _errors(body: bytes) -> str:
    try:
        parsed = _json(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("errors"), list):
        return "; ".join(str(e) for e in parsed["errors"])[:500]
    return str(parsed)[:200]


_IDENTITY = {"Accept-Encoding": "identity"}
"""Asked of every server: JPEG, PNG and a short JSON gain nothing from compression, and a body that is not
compressed is counted as it arrives, its ``Content-Length`` in the same bytes as the size limit."""


def _inflater(encoding: str, what: str) -> Any:
    """A zlib decoder for a body sent ``gzip``/``deflate`` although :data:`_IDENTITY` was asked for, None for
    one not compressed; any other encoding (``br``, ``zstd``, ...) is ``http_error``: nothing else is decoded."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise SnapshotError("http_error", f"{what} came encoded as {encoding[:40]!r}, which is not decoded")


def _content_length(response: httpx.Response, limit: int, what: str) -> None:
    """``http_error`` for a ``Content-Length`` that is no number, ``too_large`` for one past ``limit``: it counts the
    bytes sent, which :func:`_read_body` holds to the same limit."""
    length = response.headers.get("Content-Length", "").strip()
    if length and not (length.isascii() and length.isdigit()):
        raise SnapshotError("http_error", f"{what} came with a Content-Length that is no number: {length[:20]!r}")
    if int(length or 0) > limit:
        raise SnapshotError("too_large", f"{what} of {length} bytes exceeds {limit}")


def _raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body as sent, one network read at a time; a body a transport read whole already (an in-memory one,
    httpx decodes it as it reads) comes as one piece, and no encoding is left on it."""
    if response.is_stream_consumed:
        yield response.content
    else:
        yield from response.iter_raw()


def _read_body(response: httpx.Response, limit: int, budget: _Budget, what: str, doing: str) -> bytes:
    """A streamed body, read raw and never past the deadline: at most ``limit`` bytes as sent and at most ``limit``
    once decompressed, decoded in steps of :data:`_INFLATE_STEP`. httpx's ``iter_bytes`` decodes a whole read at
    once, so one small read of a gzip or deflate body inflated to tens of MB before any size check (and the limit
    compared decoded bytes with a ``Content-Length`` of sent ones). ``too_large`` past the limit, ``http_error`` for
    a body that does not decode; a transport error is raised as is (the caller may fetch it again)."""
    _content_length(response, limit, what)
    consumed = response.is_stream_consumed
    inflate = None if consumed else _inflater(response.headers.get("Content-Encoding", ""), what)
    chunks: list[bytes] = []
    received = size = 0
    try:
        for chunk in _raw_chunks(response):
            received += len(chunk)
            budget.check(doing)
            pieces = [chunk] if inflate is None else _inflated(inflate, chunk)
            for piece in pieces:
                size += len(piece)
                if max(received, size) > limit:
                    raise SnapshotError("too_large", f"{what} exceeds {limit} bytes")
                chunks.append(piece)
    except zlib.error:
        raise SnapshotError("http_error", f"{what} does not decode as its Content-Encoding says") from None
    except httpx.TransportError:
        raise
    except httpx.HTTPError as exc:
        budget.check(doing)
        raise SnapshotError("transport", f"{type(exc).__name__} while {doing}") from None
    if inflate is not None and received and not inflate.eof:
        raise SnapshotError("http_error", f"{what} ends before its compressed data does")
    return b"".join(chunks)


def _inflated(inflate: Any, chunk: bytes) -> Iterator[bytes]:
    """``chunk`` decompressed, at most :data:`_INFLATE_STEP` bytes at a time (the caller stops when over its limit)."""
    while True:
        out = inflate.decompress(chunk, _INFLATE_STEP)
        yield out
        chunk = inflate.unconsumed_tail
        if not chunk and len(out) < _INFLATE_STEP:
            return


class _Budget:
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()

    def check(self, doing: str) -> float:
        left = self.left()
        if left <= 0:
            raise SnapshotError("deadline", f"snapshot deadline passed while {doing}")
        return left


_READ_BY: ContextVar[float | None] = ContextVar("meraki_read_by", default=None)
"""When (``time.monotonic``) the snapshot running in this thread must be done; None outside a snapshot."""


def _bounded(timeout: float | None, timeout_error: type[Exception]) -> float | None:
    """``timeout`` cut to the time the running snapshot has left; ``timeout_error`` once none is left."""
    by = _READ_BY.get()
    if by is None:
        return timeout
    left = by - time.monotonic()
    if left <= 0:
        raise timeout_error("snapshot deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the snapshot's deadline. httpx applies its read
    timeout to each read on its own, so a body that trickles in until just before the deadline and then stalls
    would otherwise hold the snapshot up to ``request_timeout_s`` past it."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, each connection's waits bounded by the deadline (:class:`_DeadlineStream`)."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _deadline_client(cameras: CameraSettings) -> httpx.Client:
    """The pooled client, its connections' waits bounded by the running snapshot's deadline (:class:`_DeadlineBackend`).
    httpx has no public hook for httpcore's network backend, so each of its transports' pools (a proxy's from the
    environment included) gets it; an httpx that keeps it elsewhere fails here, at start, not with snapshots late."""
    client = httpx.Client(
        timeout=cameras.request_timeout_s,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
    )
    for transport in (client._transport, *client._mounts.values()):
        if transport is None:
            continue
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            client.close()
            raise RuntimeError("httpx/httpcore changed: the snapshot client cannot bound its reads by the deadline")
        pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
    return client


def _location(response: httpx.Response, what: str) -> httpx.URL:
    """Where a redirect points, resolved against the request's URL: ``http_error`` without a ``Location``,
    ``untrusted_url`` when it does not parse (the caller then checks the host before anything is sent there)."""
    location = response.headers.get("Location", "").strip()
    if not location:
        raise SnapshotError("http_error", f"{what} HTTP {response.status_code} without a Location")
    try:
        return response.request.url.join(location)
    except (httpx.InvalidURL, ValueError):
        raise SnapshotError("untrusted_url", f"{what} redirected to a URL that does not parse") from None


class MerakiClient:
    """Snapshots through the Dashboard API. Thread-safe (one pooled ``httpx.Client``).

    ``http`` is for tests and custom transports; ``sleep``/``clock`` let a caller observe the waits.
    The API key is sent only to the Dashboard API, never to the snapshot URL (another host), and that URL
    is fetched only from an allowed host (:func:`snapshot_hosts`), as are the redirects of it that are followed.
    """

    def __init__(
        self,
        cameras: CameraSettings,
        base_url: str,
        *,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cameras
        self.base_url = base_url.rstrip("/")
        self._http = http or _deadline_client(cameras)
        self._sleep = sleep
        self._clock = clock
        self._snapshot_hosts = snapshot_hosts(cameras, self.base_url)
        self._api_hosts = api_hosts(self.base_url)
        self._snapshot_schemes = {"https", httpx.URL(self.base_url).scheme}
        """https always; plain http only where the API itself is (the local camera)."""

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: object) -> MerakiClient:
        return cls(settings.cameras, api_base_url(settings), **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MerakiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public ------------------------------------------------------------------------------------

    def snapshot(self, serial: str, timestamp_ms: int | None = None, deadline_s: float | None = None) -> Snapshot:
        """The camera's image at ``timestamp_ms`` (None = now), or :class:`SnapshotError`; a serial that is
        no valid serial is ``invalid_serial`` before any request."""
        try:
            check_serial(serial)
        except InvalidRecord as exc:
            raise SnapshotError("invalid_serial", exc.reason) from None
        started = self._clock()
        budget = _Budget(self.cfg.deadline_s if deadline_s is None else deadline_s, self._clock)
        with self._reads_by(budget):
            return self._snapshot(serial, timestamp_ms, budget, started)

    @contextmanager
    def _reads_by(self, budget: _Budget) -> Iterator[None]:
        """Every network wait of this snapshot (connect, each read and write) ends by its deadline."""
        token = _READ_BY.set(time.monotonic() + budget.left())
        try:
            yield
        finally:
            _READ_BY.reset(token)

    def _snapshot(self, serial: str, timestamp_ms: int | None, budget: _Budget, started: float) -> Snapshot:
        counts = {"api": 0, "polls": 0}
        fell_back = False
        tries = 0
        backoff = self.cfg.no_video_backoff_s
        ts = timestamp_ms
        reserve = budget.left() * self.cfg.fallback_share
        while True:
            try:
                url = self._generate(serial, ts, budget, counts)
                break
            except SnapshotError as exc:
                if exc.kind != "no_video":
                    raise
                tries += 1
                can_fall_back = self.cfg.fallback_to_now and ts is not None
                # The fallback gets its share of the budget: a retry that would wait into it is not made.
                if tries >= self.cfg.no_video_max_tries or (can_fall_back and budget.left() - backoff < reserve):
                    if can_fall_back:
                        ts, fell_back = None, True
                        continue
                    raise
                self._wait(min(backoff, budget.check("waiting for video")), budget)
                backoff = min(backoff * 2, self.cfg.no_video_backoff_s * 8)
        image, content_type = self._fetch(url, budget, counts)
        return Snapshot(
            serial,
            image,
            content_type,
            timestamp_ms,
            fell_back,
            counts["api"],
            counts["polls"],
            self._clock() - started,
        )

    # -- steps -------------------------------------------------------------------------------------

    def _wait(self, seconds: float, budget: _Budget) -> None:
        left = budget.check("waiting")
        if seconds > left:
            self._sleep(max(left, 0.0))
            raise SnapshotError("deadline", f"snapshot deadline passed (needed to wait {seconds:.1f} s more)")
        self._sleep(seconds)

    def _request(
        self, method: str, url: str, budget: _Budget, doing: str, stream: bool = False, **kw: object
    ) -> httpx.Response:
        """One HTTP exchange with 429 (Retry-After) and 5xx retries inside the budget. ``stream``: the
        body of the returned response is not read yet (the caller reads it and closes it)."""
        attempt = 0
        while True:
            left = budget.check(doing)
            timeout = min(self.cfg.request_timeout_s, left)
            try:
                request = self._http.build_request(method, url, timeout=timeout, **kw)  # type: ignore[arg-type]
                # Redirects are followed here, each target checked (never by httpx, which would not check it).
                response = self._http.send(request, stream=stream, follow_redirects=False)
            except httpx.TransportError as exc:
                # A timeout is one too: retried while the deadline allows (it cut the timeout short, it is
                # ``deadline``); one slow connect to the image host no longer ended a snapshot with most of its budget.
                budget.check(doing)
                attempt += 1
                if attempt > 3:
                    raise SnapshotError("transport", f"{type(exc).__name__} while {doing} ({attempt} tries)") from None
                self._wait(0.2 * attempt, budget)
                continue
            if stream and (response.status_code == 429 or response.status_code >= 500):
                response.close()
            if response.status_code == 429:
                self._rate_limited(response, budget)
                continue
            if response.status_code >= 500:
                attempt += 1
                if attempt > 4:
                    raise SnapshotError("server_error", f"HTTP {response.status_code} while {doing}")
                try:
                    self._wait(min(0.25 * 2 ** (attempt - 1), 1.0), budget)
                except SnapshotError as exc:
                    raise SnapshotError("deadline", f"{exc.reason} (after HTTP {response.status_code})") from None
                continue
            return response

    def _rate_limited(self, response: httpx.Response, budget: _Budget) -> None:
        """Wait ``Retry-After`` (capped); a wait longer than the deadline allows fails now, not at the end."""
        left = budget.check("rate limited")
        wait = parse_retry_after(response.headers.get("Retry-After"), 1.0)
        if wait > left:
            raise SnapshotError("rate_limited", f"Retry-After {wait:.1f} s is past the deadline ({left:.1f} s left)")
        self._wait(wait, budget)

    def _generate(self, serial: str, ts: int | None, budget: _Budget, counts: dict[str, int]) -> str:
        body: dict[str, object] = {} if ts is None else {"timestamp": iso_timestamp(ts)}
        url: str | httpx.URL = f"{self.base_url}/devices/{path_segment(serial)}/camera/generateSnapshot"
        for _ in range(MAX_REDIRECTS + 1):
            counts["api"] += 1
            response = self._request(
                "POST",
                str(url),
                budget,
                "requesting a snapshot",
                stream=True,
                json=body,
                headers={
                    API_KEY_HEADER: self.cfg.api_key.get_secret_value(),
                    "Accept": "application/json",
                    **_IDENTITY,
                },
            )
            if response.status_code not in _REDIRECTS:
                break
            response.close()
            url = self._redirect(response)
        else:
            raise SnapshotError("http_error", f"generateSnapshot redirected more than {MAX_REDIRECTS} times")
        reply = self._reply(response, budget)
        if response.status_code in (200, 202):
            try:
                url = _json(reply)["url"]
            except (ValueError, KeyError, TypeError):
                raise SnapshotError("http_error", "generateSnapshot answered without a url") from None
            # The scheme is case-insensitive (RFC 3986): ``HTTPS://`` is https; the URL is fetched as parsed.
            if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
                raise SnapshotError("http_error", "generateSnapshot answered an invalid url")
            return str(self._check_snapshot_url(url))
        detail = _errors(reply)
        if response.status_code == 400 and NO_VIDEO.lower() in detail.lower():
            raise SnapshotError("no_video", NO_VIDEO)
        raise SnapshotError("http_error", f"generateSnapshot HTTP {response.status_code}: {detail}")

    def _reply(self, response: httpx.Response, budget: _Budget) -> bytes:
        """The generateSnapshot reply's body, at most :data:`MAX_API_REPLY_BYTES` (a longer one is ``http_error``:
        no answer of the API is that long) and never past the deadline; then the response is closed."""
        doing = "reading the generateSnapshot reply"
        try:
            return _read_body(response, MAX_API_REPLY_BYTES, budget, "generateSnapshot reply", doing)
        except SnapshotError as exc:
            if exc.kind == "too_large":
                raise SnapshotError("http_error", f"HTTP {response.status_code}: {exc.reason}") from None
            raise
        except httpx.TransportError as exc:
            budget.check(doing)
            raise SnapshotError("transport", f"{type(exc).__name__} while {doing}") from None
        finally:
            response.close()

    def _redirect(self, response: httpx.Response) -> httpx.URL:
        """Where a redirected generateSnapshot goes next, with the API key: only a Dashboard host (:func:`api_hosts`)
        over https (or the API's own scheme), else ``untrusted_url`` naming the host, never the key's destination."""
        target = _location(response, "generateSnapshot")
        if target.scheme not in self._snapshot_schemes or target.userinfo or not target.host:
            raise SnapshotError("untrusted_url", "generateSnapshot redirected to a URL the API key is not sent to")
        if not _host_allowed(target.host, self._api_hosts):
            raise SnapshotError(
                "untrusted_url",
                f"generateSnapshot redirected to host {target.host[:100]!r}, not the Dashboard's: the API key is not "
                "sent there",
            )
        return target

    def _check_snapshot_url(self, url: str | httpx.URL, what: str = "snapshot URL") -> httpx.URL:
        """Refuse a snapshot URL (or a redirect of it, ``what``) we would not fetch: another scheme, credentials in
        it, another host. The reason names the host (not the URL, whose path is a bearer token for the image)."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            raise SnapshotError("untrusted_url", f"{what} does not parse") from None
        if parsed.scheme not in self._snapshot_schemes:
            raise SnapshotError("untrusted_url", f"{what} scheme {parsed.scheme!r} is not allowed")
        if parsed.userinfo:
            raise SnapshotError("untrusted_url", f"{what} carries credentials")
        if not parsed.host or not _host_allowed(parsed.host, self._snapshot_hosts):
            raise SnapshotError(
                "untrusted_url",
                f"{what} host {parsed.host[:100]!r} is not allowed (CG_CAMERAS__SNAPSHOT_HOSTS)",
            )
        return parsed

    def _get_image(self, url: str, budget: _Budget) -> httpx.Response:
        """One poll of the snapshot URL (body not read yet), following the image host's redirects: at most
        :data:`MAX_REDIRECTS`, each target checked as the snapshot URL was (:meth:`_check_snapshot_url`). Without
        the API key, as every request to the image host."""
        target: str | httpx.URL = url
        for _ in range(MAX_REDIRECTS + 1):
            response = self._request(
                "GET", str(target), budget, "waiting for the snapshot image", stream=True, headers=_IDENTITY
            )
            if response.status_code not in _REDIRECTS:
                return response
            response.close()
            target = self._check_snapshot_url(_location(response, "snapshot URL"), "snapshot URL redirect")
        raise SnapshotError("http_error", f"snapshot URL redirected more than {MAX_REDIRECTS} times")

    def _fetch(self, url: str, budget: _Budget, counts: dict[str, int]) -> tuple[bytes, str]:
        cut_off = 0
        for _ in range(self.cfg.poll_max_tries):
            counts["polls"] += 1
            response = self._get_image(url, budget)
            if response.status_code == 200:
                try:
                    return self._image(response, budget)
                except httpx.TransportError as exc:
                    error = type(exc).__name__
                finally:
                    response.close()
                # Cut off mid-body (a read timeout, a reset, fewer bytes than its Content-Length): fetched again like
                # any transport error, at most 3 times and while the deadline allows (past it, ``deadline``).
                budget.check("downloading the snapshot image")
                cut_off += 1
                if cut_off > 3:
                    raise SnapshotError("transport", f"{error} while downloading the snapshot image ({cut_off} tries)")
                self._wait(0.2 * cut_off, budget)
                continue
            response.close()
            if response.status_code not in _NOT_READY:
                raise SnapshotError("http_error", f"snapshot URL HTTP {response.status_code}")
            self._wait(self.cfg.poll_interval_s, budget)
        raise SnapshotError("not_ready", f"snapshot URL not ready after {self.cfg.poll_max_tries} polls")

    def _image(self, response: httpx.Response, budget: _Budget) -> tuple[bytes, str]:
        """The body, read in chunks: never more than ``max_image_bytes``, never past the deadline; a JPEG or PNG (by
        its first bytes, which also give the content type returned), else a :class:`SnapshotError`. A transport error
        while reading it is raised as is (the caller fetches the image again)."""
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            raise SnapshotError("wrong_type", f"snapshot URL answered {content_type or 'no content type'}, no image")
        data = _read_body(
            response, self.cfg.max_image_bytes, budget, "snapshot image", "downloading the snapshot image"
        )
        if not data:
            raise SnapshotError("empty", "snapshot image is empty")
        if content_type in ("image/jpeg", "image/jpg") and not data.startswith(JPEG_MAGIC):
            raise SnapshotError("not_jpeg", "snapshot body is not a JPEG")
        # The images the pipeline uses, by their first bytes: the face stage decodes only JPEG and PNG, so a GIF,
        # WebP or SVG would be stored and then refused by the face engine.
        sniffed = image_type(data)
        if sniffed is not None:
            return data, sniffed
        raise SnapshotError(
            "unsupported_image", f"snapshot image ({content_type}) is not JPEG or PNG, which faces need"
        )


def api_base_url(settings: Settings) -> str:
    """The configured Dashboard API base, or the local camera's."""
    cameras = settings.cameras
    return f"http://127.0.0.1:{cameras.local_port}/api/v1" if cameras.base_url is None else cameras.base_url
