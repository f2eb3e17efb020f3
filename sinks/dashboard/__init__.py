"""The live dashboard: a Starlette app serving a static page that polls JSON aggregations from OpenSearch.

No build step and nothing from a CDN: the page's charts are drawn by ``static/app.js`` as plain SVG.
Run: ``python -m sinks.dashboard`` (host/port from ``CG_DASHBOARD__HOST`` / ``CG_DASHBOARD__PORT``).
Off loopback it needs a login: ``CG_DASHBOARD__USERNAME``/``CG_DASHBOARD__PASSWORD`` (HTTP Basic) and/or
``CG_DASHBOARD__TOKEN`` (``Authorization: Bearer``); see ``app.py``.
"""
