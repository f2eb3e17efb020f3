"""Headers every dashboard answer carries (pages, JSON, images, static files, the 401 and a 500 too).

The pages show faces and carry one-click verdict buttons, so the browser is told: run only the dashboard's own
scripts (a value that slipped past escaping cannot load or run anything), never show a page inside another
site's frame (clickjacking a Confirm), never guess a content type, and send no referrer elsewhere. Face
images are ``no-store``: a browser must not keep a shopper's face in its disk cache, where it would outlive a
``forget``, and ``Cross-Origin-Resource-Policy: same-origin`` unless opened by a signed link: no other site can
embed one to probe which alerts and cases exist.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Inline ``style`` attributes stay allowed (the charts' bar widths and colours); inline scripts do not."""
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
IMAGE_CACHE = "no-store"
"""``Cache-Control`` of every face image (alert snapshots, a case's live and reference images)."""
LINKED_IMAGE_HEADERS = {"Cache-Control": IMAGE_CACHE}
"""A case image opened by its signed link: mail clients and Webex show it from their own origin, so it stays
embeddable anywhere (whoever holds the link may see that one image anyway)."""
IMAGE_HEADERS = {**LINKED_IMAGE_HEADERS, "Cross-Origin-Resource-Policy": "same-origin"}
"""A face image served under the analyst's login: only the dashboard's own pages may embed it. Another site could
otherwise put ``<img src=".../api/alerts/<guess>/snapshot">`` in a logged-in analyst's browser and learn from its
load or error whether that alert or case exists."""


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP answer that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def server_error(_request: Request, _exc: Exception) -> Response:
    """The 500, with :data:`SECURITY_HEADERS` of its own: Starlette sends it from its error handler, outside every
    middleware, :class:`SecurityHeaders` included. Starlette still raises the exception on, so the server logs it."""
    return PlainTextResponse(
        "Internal Server Error\n", status_code=500, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"}
    )
