"""Serving a service's web app (the Webex bot's webhook, the dashboard) with uvicorn, stopped within the supervisor's
stop timeout.

Why not ``uvicorn.run``: its stop on SIGTERM waited for every request under way, and for the work a request hands to a
thread after its answer (the bot's command), as long as they took (a Kafka publish with Kafka down, a camera that does
not answer): uvicorn's own time limit cancels the request, but a thread's work is waited for all the same. Then it
raised the SIGTERM again with the handler it found, the default one, so the process died of it before the service's
own closes ran. Here the server runs in a daemon thread; the main thread waits for the stop (timed at the signal's
arrival, :func:`infra.processes.stop_on_signals`), asks the server to stop, waits for it until
:data:`CLOSE_SHARE_S` before the stop's deadline and gives up what is still under way, with a WARNING; the caller's
closes then get the rest, up to :data:`infra.settings.EXIT_MARGIN_S` before the SIGKILL.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn

from infra.logs import UVICORN
from infra.processes import StopRequest, exit_deadline, stop_on_signals, time_left
from infra.settings import EXIT_MARGIN_S
from schemas.errors import CheckoutGuardError

log = logging.getLogger(__name__)

CLOSE_SHARE_S = 1.0
"""What the service's closes after the web server (its Kafka producer, its clients) keep of the stop's time: the server
stops this long before the stop's deadline, or is given up then."""
TICK_S = 0.2
"""How often the main thread looks whether the server ended on its own (it could not take its port)."""


class ServerFailed(CheckoutGuardError, RuntimeError):
    """The web server ended without a stop being asked (its port taken, its app's start failed)."""


def serve(app: Any, *, host: str, port: int, stop_timeout_s: float, name: str, **options: Any) -> float:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT, then stop the server by :data:`CLOSE_SHARE_S` before the
    stop's deadline (:func:`infra.processes.exit_deadline`: 1 s before the SIGKILL ``stop_timeout_s`` after the
    signal), giving up the requests and their work still under way. Returns that deadline, for the caller's closes.
    :class:`ServerFailed` when the server ends by itself. ``options`` go to :class:`uvicorn.Config`."""
    stop = StopRequest()
    stop_on_signals(stop, (signal.SIGTERM, signal.SIGINT))
    drain_s = max(stop_timeout_s - EXIT_MARGIN_S - CLOSE_SHARE_S, TICK_S)
    # uvicorn's own cut-off, whole seconds (it cancels the requests: their threads' work is given up by the join below)
    cut_off = max(int(drain_s), 1)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=cut_off, **{**UVICORN, **options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"{name}-web", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(TICK_S):
        pass
    if not stop.is_set():
        raise ServerFailed(f"{name}: the web server on {host}:{port} stopped by itself (see the lines above)")
    deadline = exit_deadline(stop_timeout_s, stop.asked_at)
    server.should_exit = True
    thread.join(time_left(deadline - CLOSE_SHARE_S))
    if thread.is_alive():
        log.warning(
            "%s: requests (or the work they started) still under way %.1f s after the stop was asked are given up, "
            "before the supervisor's stop timeout",
            name,
            drain_s,
        )
    return deadline
