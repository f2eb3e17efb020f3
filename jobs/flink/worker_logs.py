"""The log masking of the project's processes, in the Flink Python worker too: :func:`mask_worker_logs`.

The scoring job's functions run in a Python worker that Flink starts (or embeds, in thread mode), not in a
process of ours: no ``main()`` calls :func:`infra.logs.setup_logging` there, so the job's lines (internal errors,
rejected updates, tracebacks) reached the TaskManager's log without :class:`infra.logs.RedactSecrets`. Each
function's ``open`` calls :func:`mask_worker_logs` first. No PyFlink import: tested without Flink.
"""

from __future__ import annotations

import logging

from infra.logs import QuietClientBodies, RedactSecrets, setup_logging
from infra.settings import Settings

WORKER_PROCESS = "job-worker"
"""The process name of the worker's lines where this module sets up its logging (no handler was there)."""


def mask_worker_logs(settings: Settings) -> None:
    """Mask secrets in every line of this process: the worker's own handlers (PyFlink's, which carry the lines to
    the TaskManager) get :class:`RedactSecrets` and :class:`QuietClientBodies`, each once; a worker without a
    handler gets :func:`setup_logging`'s. Idempotent: every function's ``open`` calls it."""
    root = logging.getLogger()
    if not root.handlers:
        setup_logging(settings, process=WORKER_PROCESS)
        return
    for handler in root.handlers:
        if not any(isinstance(f, QuietClientBodies) for f in handler.filters):
            handler.addFilter(QuietClientBodies())
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
