"""The live dashboard's web app: a static page plus JSON endpoints it polls, read from OpenSearch (and,
for the Models view, the models root's record of which rows trained each model).

Endpoints (each takes ``minutes`` = window length, ``store`` = one store only, ``anchor`` = ``now`` or
``latest``, which ends the window at the newest event so a replay of history shows up too, and ``viewer_zone`` =
the page's browser zone, which the charts' buckets start on where no store's clock is theirs):

- ``GET /api/overview``  totals, current rates, outcomes, time series, latency percentiles, per-store rows
- ``GET /api/alerts``    latest alerts, with a thumbnail URL where the alert has a snapshot
- ``GET /api/faces``     face observations by status over time
- ``GET /api/alerts/{alert_id}/snapshot``  a small JPEG of the alert's snapshot (a stored JPEG or PNG) from the
  ImageStore
- ``GET /api/alerts/{alert_id}``  one alert and the decision on its transaction
- ``GET /alerts/{alert_id}``  the page alert messages (email, Webex) link to
- ``GET /api/config``    refresh period and default window for the page
- ``GET /api/models``    champion and challenger (the versions holding the roles now): each one's score
  distribution (20 bins over 0-1000) and ROC-AUC over the labelled transactions of the window it scored in
  either role (field verdicts from the labels index joined by transaction id), and both over the rows both
  scored (``paired``), with intervals and the numbers of labelled and fraud rows; each model's own training
  rows are left out (``in_training``: how many; null when its artifact is not visible)
- ``GET /api/drift``     latest drift report per model version (score PSI, worst features, alert, rows, hour)
- ``GET /models``        the Models page over those two
- ``GET /api/pipeline``  pipeline health from Prometheus (sinks/dashboard/pipeline.py): targets up, records/s
  per stage, consumer-group lag, dead letters, deliveries, p99 per stage; Prometheus unreachable is a
  200 with ``error`` set (the page says so), never a 500
- ``GET /pipeline``      the pipeline-health page over it
- ``/cases``, ``/cases/{case_id}``, ``/api/cases...``  the case queue, the case page, verdicts and their outcomes
  (sinks/dashboard/case_routes.py)

Snapshots are looked up by alert id (the page never sees or sends image refs) and served only for
alerts, which are the images the face pipeline retains; nothing logs image bytes.

Login (sinks/dashboard/login.py): alert ids are guessable and the snapshots are faces, so with personal logins
(``dashboard.users``), ``dashboard.username``/``password`` or ``dashboard.token`` set every request (pages, JSON,
images, static files) needs HTTP Basic or ``Authorization: Bearer <token>`` (401 with ``WWW-Authenticate``
otherwise; browsers ask for the login once and send it with the page's own requests); only a case image opened
by its signed, short-lived link (the Webex card's) needs none. Without any login, the app refuses to serve
anywhere but a loopback address (``127.0.0.1``, ``localhost``, ``::1``), and answers only requests addressed to one
(``Host``), not a name rebound to it.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from opensearchpy import OpenSearch
from opensearchpy.exceptions import RequestError, TransportError
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from infra.clients.image_store import ImageStore
from infra.clients.opensearch import make_client
from infra.settings import DashboardSettings, Settings
from schemas.errors import CheckoutGuardError
from schemas.images import PIL_FORMATS, image_type
from schemas.indices import index_name
from schemas.model_artifact import artifact_version, read_trained_ids, version_folders
from sinks.dashboard.case_routes import CaseRoutes, Outcomes, Publish
from sinks.dashboard.headers import IMAGE_HEADERS, SecurityHeaders, server_error
from sinks.dashboard.login import LoginBackend, LoginConfigError, _secret
from sinks.dashboard.pipeline import PrometheusApi, prometheus_api, read_pipeline
from sinks.dashboard.queries import (
    ALERT_FIELDS,
    ID_CHUNK,
    LABEL_PAGE,
    MAX_LABELS,
    MODEL_ROLES,
    LabelledRow,
    Window,
    alert_by_id_query,
    alerts_query,
    chart_zone,
    drift_query,
    evaluate_models,
    faces_query,
    labelled_rows,
    labels_page_query,
    labels_summary_query,
    latest_event_query,
    models_query,
    overview_query,
    public_alert,
    scored_by_ids_query,
    shape_alerts,
    shape_distributions,
    shape_drift,
    shape_faces,
    shape_labels_summary,
    shape_overview,
    transaction_by_id_query,
    with_store_times,
    zone_unknown_to_opensearch,
)

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
THUMBNAIL_PX = 240
LARGE_PX = 640
"""``?size=large``: the alert page's picture; still a downscaled copy, never the stored original."""
MAX_SOURCE_PIXELS = 50_000_000
"""Largest stored image decoded for a thumbnail (a 4K frame is 8.3 MP, a phone photo up to 48 MP): a few kB of PNG
can claim billions of pixels, whose decoding would take the dashboard's memory (Pillow itself refuses only past
178 MP, with an error that was a 500)."""
MAX_WINDOW_MINUTES = 60 * 24 * 366
SEARCH_PARAMS = {"ignore_unavailable": "true", "allow_no_indices": "true"}
"""An index family that has no index yet (no face observations so far) answers empty, not 404."""


class Dashboard:
    """Queries behind the endpoints; holds the OpenSearch client and the image store."""

    def __init__(
        self,
        settings: Settings,
        client: OpenSearch | None = None,
        images: ImageStore | None = None,
        clock: Callable[[], float] = time.time,
        prometheus: PrometheusApi | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or make_client(settings.opensearch, timeout_s=10)
        self._images = images
        self.clock = clock
        self.prometheus = prometheus or prometheus_api(settings)
        self._owned_prometheus = prometheus is None
        prefix = settings.opensearch.index_prefix
        self.transactions = index_name(prefix, "transactions")
        self.alerts = index_name(prefix, "alerts")
        self.faces = index_name(prefix, "face_observations")
        self.labels = index_name(prefix, "labels")
        self.drift = index_name(prefix, "model_drift")
        self.max_labels = MAX_LABELS
        self._trained: dict[str, frozenset[str]] = {}
        self._zones_unknown: set[str] = set()  # zone names OpenSearch refused as a chart query's time_zone
        self._zones_lock = threading.Lock()

    def close(self) -> None:
        """Close the Prometheus client this dashboard made (its pooled connection would otherwise outlive the app,
        left to the garbage collector)."""
        if self._owned_prometheus:
            self.prometheus.close()

    @property
    def images(self) -> ImageStore:
        if self._images is None:  # built on first use: S3 needs credentials only if thumbnails are asked for
            self._images = ImageStore.from_settings(self.settings)
        return self._images

    def search(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.client.search(index=index, body=body, params=SEARCH_PARAMS)

    def chart_search(self, index: str, window: Window, query: Callable[[Window], dict[str, Any]]) -> dict[str, Any]:
        """``query`` of ``window`` (one with a date histogram) asked of ``index``. Where OpenSearch refuses the window's
        zone as unknown to its JVM (:func:`zone_unknown_to_opensearch`: its tzdata older than this machine's), the query
        is asked again with the zone's UTC offset at the window's end (:meth:`Window.at_fixed_offset`), and so from then
        on for that name, with one WARNING per name: the charts show, aligned to that offset, where the 400 left the
        page without charts, saying OpenSearch was unavailable, for as long as it refreshed. Any other error is
        raised."""
        zone = window.zone
        if zone is not None and zone in self._zones_unknown:
            return self.search(index, query(window.at_fixed_offset()))
        try:
            return self.search(index, query(window))
        except RequestError as exc:
            if zone is None or not zone_unknown_to_opensearch(exc.info, zone):
                raise
        with self._zones_lock:
            first = zone not in self._zones_unknown
            self._zones_unknown.add(zone)
        if first:
            log.warning(
                "OpenSearch does not know the time zone %r (its Java time zone data is older than this machine's): "
                "the charts' buckets start on its UTC offset at each window's end instead until the dashboard restarts",
                zone,
            )
        return self.search(index, query(window.at_fixed_offset()))

    def window(self, minutes: int, store: str | None, anchor: str, viewer_zone: str | None = None) -> Window:
        """The window of ``minutes`` ending now or at the newest event (``anchor``); ``viewer_zone``: the page's
        browser zone as sent, taken for the charts' buckets only where :func:`chart_zone` checks it."""
        end = int(self.clock() * 1000) + 1
        if anchor == "latest":
            answer = self.search(self.transactions, latest_event_query(store))
            latest = (answer.get("aggregations", {}).get("latest") or {}).get("value")
            if latest is not None:
                end = int(latest) + 1
        start = end - minutes * 60_000
        zone = chart_zone(store, self.settings.alerts, start, end, viewer_zone)  # the clock the charts are shown on
        return Window(start_ms=start, end_ms=end, store=store, zone=zone)

    def overview(self, window: Window) -> dict[str, Any]:
        shaped = shape_overview(self.chart_search(self.transactions, window, overview_query), window)
        return with_store_times(shaped, window.store, self.settings.alerts)

    def latest_alerts(self, window: Window) -> dict[str, Any]:
        answer = self.search(self.alerts, alerts_query(window, self.settings.dashboard.alerts_shown))
        return shape_alerts(answer, self.settings.alerts)

    def face_activity(self, window: Window) -> dict[str, Any]:
        return with_store_times(
            shape_faces(self.chart_search(self.faces, window, faces_query)), window.store, self.settings.alerts
        )

    def models(self, window: Window) -> dict[str, Any]:
        """Both models' score distributions in the window and their ROC-AUC on its labelled transactions."""
        distributions = shape_distributions(self.search(self.transactions, models_query(window)))
        labels, truncated = self.field_labels()
        current = {role: distributions[role]["version"] for role in MODEL_ROLES}
        evaluation = evaluate_models(self.labelled_scored(window, labels), self.trained_ids, current)
        summary = shape_labels_summary(self.search(self.labels, labels_summary_query()))
        shaped = {
            "window": {"start": window.start_ms, "end": window.end_ms, "store": window.store},
            "distributions": distributions,
            "evaluation": evaluation,
            "labels": {**summary, "read": len(labels), "truncated": truncated},
        }
        return with_store_times(shaped, window.store, self.settings.alerts)

    def trained_ids(self, model_version: str | None) -> frozenset[str] | None:
        """The training rows of the local artifact a scored record names, from the models root: the folder whose
        ``model.json`` holds that version, as the registry finds it (a model copied in under another folder name
        scores under its own version); each folder holding the version in turn, the first whose rows are whole (a
        damaged copy does not hide an intact one). Kept once found (a version's rows never change), looked for again
        while they are missing."""
        version = artifact_version(model_version)
        if version is None:
            return None
        if version not in self._trained:
            folders = version_folders(self.settings.models_root, version)
            found = next((ids for f in folders if (ids := read_trained_ids(f)) is not None), None)
            if found is None:
                return None
            self._trained[version] = found
        return self._trained[version]

    def field_labels(self) -> tuple[dict[str, int], bool]:
        """Transaction id -> verdict in force (1 fraud, 0 legitimate), the most recently decided first, at
        most ``max_labels``; and whether there were more."""
        labels: dict[str, int] = {}
        after: list[Any] | None = None
        while len(labels) < self.max_labels:
            size = min(LABEL_PAGE, self.max_labels - len(labels))
            hits = self.search(self.labels, labels_page_query(size, after)).get("hits", {}).get("hits", [])
            for hit in hits:
                source = hit.get("_source") or {}
                tx, label = source.get("transaction_id"), source.get("label")
                if isinstance(tx, str) and label in (0, 1):
                    labels[tx] = int(label)
            if len(hits) < size or not hits[-1].get("sort"):
                return labels, False
            after = hits[-1]["sort"]
        probe = self.search(self.labels, labels_page_query(1, after)).get("hits", {}).get("hits", [])
        return labels, bool(probe)

    def labelled_scored(self, window: Window, labels: dict[str, int]) -> list[LabelledRow]:
        """The window's scored documents of the labelled transactions, looked up by id in chunks."""
        ids, rows = sorted(labels), []
        for start in range(0, len(ids), ID_CHUNK):
            answer = self.search(self.transactions, scored_by_ids_query(window, ids[start : start + ID_CHUNK]))
            rows += labelled_rows(answer.get("hits", {}).get("hits", []), labels)
        return rows

    def model_drift(self, window: Window) -> dict[str, Any]:
        """The latest drift report per model version, its hour on the page's clock as the models view's window end
        (drift is measured over all stores; the clock is the store chosen's, as on the live page)."""
        shaped = shape_drift(self.search(self.drift, drift_query(window)))
        return with_store_times(shaped, window.store, self.settings.alerts)

    def pipeline(self) -> dict[str, Any]:
        """Pipeline health from Prometheus; an unreachable one is an answer with ``error`` set, not a failure."""
        return read_pipeline(self.prometheus, self.settings.metrics.scrape_interval_s, self.clock)

    def downscaled(self, what: str, ref: str, *, large: bool = False) -> bytes | None:
        """The stored image ``ref`` as a small JPEG, or ``None`` when there is none to show."""
        try:
            return thumbnail(self.images.get(ref), LARGE_PX if large else THUMBNAIL_PX)
        except (OSError, ValueError, KeyError, UnidentifiedImageError, BotoCoreError, ClientError) as exc:
            # purged, never stored, neither JPEG nor PNG, too large, or S3 unreachable:
            # a missing thumbnail must not break the page
            log.info("no image for %s (%s)", what, type(exc).__name__)
            return None

    def snapshot_ref(self, alert_id: str) -> str | None:
        hits = self.search(self.alerts, alert_by_id_query(alert_id))["hits"]["hits"]
        return hits[0]["_source"].get("snapshot_ref") if hits else None

    def alert_detail(self, alert_id: str) -> dict[str, Any] | None:
        """One alert and the decision on its transaction (if it has one), for the page alert messages link to."""
        hits = self.search(self.alerts, alert_by_id_query(alert_id, ALERT_FIELDS))["hits"]["hits"]
        if not hits:
            return None
        alert = public_alert(hits[0]["_source"], self.settings.alerts)
        transaction = None
        if alert.get("transaction_id"):
            found = self.search(self.transactions, transaction_by_id_query(alert["transaction_id"]))["hits"]["hits"]
            transaction = found[0]["_source"] if found else None
        return {"alert": alert, "transaction": transaction}


def thumbnail(image: bytes, size: int = THUMBNAIL_PX) -> bytes:
    """A JPEG no larger than ``size`` px on its longer side (snapshots can be full HD), always served as
    ``image/jpeg`` whether the stored image was a JPEG or a PNG. ``ValueError`` for any other stored bytes, which are
    never decoded (see :mod:`schemas.images`), and for an image over :data:`MAX_SOURCE_PIXELS`."""
    if image_type(image) is None:
        raise ValueError("the stored image is neither JPEG nor PNG")
    try:
        opened = Image.open(io.BytesIO(image), formats=PIL_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError("the stored image has too many pixels") from None
    with opened as original:
        if original.width * original.height > MAX_SOURCE_PIXELS:
            raise ValueError("the stored image has too many pixels")
        img = original.convert("RGB")
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=80)
    return out.getvalue()


def _window_args(request: Request, settings: Settings) -> tuple[int, str | None, str, str | None]:
    try:
        minutes = int(request.query_params.get("minutes", settings.dashboard.window_minutes))
    except ValueError:
        minutes = settings.dashboard.window_minutes
    minutes = min(max(minutes, 1), MAX_WINDOW_MINUTES)
    store = request.query_params.get("store") or None
    anchor = "latest" if request.query_params.get("anchor") == "latest" else "now"
    return minutes, store, anchor, request.query_params.get("viewer_zone")


def _page(name: str) -> Response:
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


def _index(_: Request) -> Response:
    return _page("index.html")


def _alert_page(_: Request) -> Response:
    return _page("alert.html")


def _models_page(_: Request) -> Response:
    return _page("models.html")


def _pipeline_page(_: Request) -> Response:
    return _page("pipeline.html")


class _DashboardApi:
    """The endpoints over one ``Dashboard``; a class so each handler stays small. Handlers are sync on
    purpose: Starlette runs them in its thread pool, so a slow OpenSearch does not block the event loop."""

    def __init__(
        self, settings: Settings, board: Dashboard, publish: Publish | None = None, outcomes: Outcomes | None = None
    ) -> None:
        self.settings = settings
        self.board = board
        self.cases = CaseRoutes(board, _page, publish, outcomes)

    def routes(self) -> list[BaseRoute]:
        board = self.board
        return [
            Route("/", _index),
            Route("/api/config", self.config),
            Route("/api/overview", self.json_endpoint(board.overview)),
            Route("/api/alerts", self.json_endpoint(board.latest_alerts)),
            Route("/api/faces", self.json_endpoint(board.face_activity)),
            Route("/api/models", self.json_endpoint(board.models)),
            Route("/api/drift", self.json_endpoint(board.model_drift)),
            Route("/models", _models_page),
            Route("/api/pipeline", self.pipeline),
            Route("/pipeline", _pipeline_page),
            Route("/api/alerts/{alert_id:str}/snapshot", self.snapshot),
            Route("/api/alerts/{alert_id:str}", self.alert_detail),
            Route("/alerts/{alert_id:str}", _alert_page),
            *self.cases.routes(),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]

    def json_endpoint(self, build: Callable[[Window], dict[str, Any]]) -> Callable[[Request], Response]:
        """An endpoint answering ``build`` over the request's window; 503 with the reason if OpenSearch fails."""

        def endpoint(request: Request) -> Response:
            try:
                window = self.board.window(*_window_args(request, self.settings))
                return JSONResponse(build(window), headers={"Cache-Control": "no-store"})
            except TransportError as exc:
                log.warning("OpenSearch query failed: %s %s", type(exc).__name__, getattr(exc, "status_code", ""))
                return JSONResponse({"error": f"OpenSearch unavailable ({type(exc).__name__})"}, status_code=503)

        return endpoint

    def pipeline(self, _: Request) -> Response:
        return JSONResponse(self.board.pipeline(), headers={"Cache-Control": "no-store"})

    def snapshot(self, request: Request) -> Response:
        alert_id = request.path_params["alert_id"]
        try:
            ref = self.board.snapshot_ref(alert_id)
        except TransportError:
            return Response(status_code=503)
        if not ref:
            return Response(status_code=404)
        body = self.board.downscaled(f"alert {alert_id}", ref, large=request.query_params.get("size") == "large")
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type="image/jpeg", headers=IMAGE_HEADERS)  # never by a signed link

    def alert_detail(self, request: Request) -> Response:
        try:
            detail = self.board.alert_detail(request.path_params["alert_id"])
        except TransportError as exc:
            return JSONResponse({"error": f"OpenSearch unavailable ({type(exc).__name__})"}, status_code=503)
        if detail is None:
            return JSONResponse({"error": "no such alert (yet)"}, status_code=404)
        return JSONResponse(detail, headers={"Cache-Control": "no-store"})

    def config(self, _: Request) -> Response:
        dashboard = self.settings.dashboard
        return JSONResponse(
            {
                "refresh_ms": dashboard.refresh_ms,
                "window_minutes": dashboard.window_minutes,
                "index_prefix": self.settings.opensearch.index_prefix,
            }
        )


# --------------------------------------------------------------------------- login


class DashboardConfigError(CheckoutGuardError, ValueError):
    """A dashboard configuration that must not be served (no login off loopback, half a login)."""


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``); anything else is reachable from outside."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(dashboard: DashboardSettings, host: str) -> None:
    """Raise :class:`DashboardConfigError` unless the dashboard may serve on ``host`` as configured."""
    if bool(dashboard.username) != bool(_secret(dashboard.password)):
        raise DashboardConfigError(
            "dashboard login needs both CG_DASHBOARD__USERNAME and CG_DASHBOARD__PASSWORD (or neither)"
        )
    if dashboard.username or dashboard.users or _secret(dashboard.token) or is_loopback(host):
        return
    raise DashboardConfigError(
        f"the dashboard serves face snapshots and will not listen on {host!r} without a login: set "
        "CG_DASHBOARD__USERS (or CG_DASHBOARD__USERNAME and CG_DASHBOARD__PASSWORD) and/or CG_DASHBOARD__TOKEN, "
        "or bind it to 127.0.0.1"
    )


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8050`` -> ``::1``) and the root's trailing dot
    (``localhost.:8050`` -> ``localhost``: the same name, which a browser sends as typed)."""
    host = host_header.strip()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


class LoopbackHostOnly:
    """ASGI middleware for a dashboard without a login: it answers only requests addressed to a loopback name.
    Binding to 127.0.0.1 keeps other machines out, but not a web page in the analyst's own browser that re-points
    its own name at 127.0.0.1 (DNS rebinding) and then reads the JSON and the face snapshots as same-origin; its
    requests carry that name as ``Host``, and get a 403."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_loopback(host_name(Headers(scope=scope).get("host", ""))):
            refusal = PlainTextResponse(
                "without a login this dashboard answers only at 127.0.0.1, localhost or [::1]\n",
                status_code=403,
                headers={"Cache-Control": "no-store"},
            )
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(
    settings: Settings,
    dashboard: Dashboard | None = None,
    *,
    host: str | None = None,
    publish: Publish | None = None,
    outcomes: Outcomes | None = None,
) -> Starlette:
    """The ASGI app, behind the login when one is configured; ``dashboard`` is injectable so tests can
    point it at their own indices. ``host``: the address it will listen on (default ``dashboard.host``);
    ``publish`` and ``outcomes``: the case page's verdicts sent and their outcomes read (:class:`CaseRoutes`);
    raises :class:`DashboardConfigError` where it must not be served without a login."""
    check_exposure(settings.dashboard, host or settings.dashboard.host)
    try:
        backend = LoginBackend(settings.dashboard, settings.alerts)
    except LoginConfigError as exc:
        raise DashboardConfigError(str(exc)) from None
    middleware = [Middleware(SecurityHeaders)]  # outermost: the 401 carries the headers too (a 500: server_error)
    if backend.enabled:
        middleware.append(Middleware(AuthenticationMiddleware, backend=backend, on_error=backend.challenge))
    else:  # open on loopback only (check_exposure): to requests addressed there, not to a rebound name
        middleware.append(Middleware(LoopbackHostOnly))
    api = _DashboardApi(settings, dashboard or Dashboard(settings), publish, outcomes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        api.board.close()

    return Starlette(
        routes=api.routes(), middleware=middleware, exception_handlers={Exception: server_error}, lifespan=lifespan
    )
