"""The live dashboard: a Starlette app serving a static page that polls JSON aggregations from OpenSearch.

No build step and nothing from a CDN: the page's charts are drawn by ``static/app.js`` as plain SVG.
Run: ``python -m sinks.dashboard`` (host/port from ``CG_DASHBOARD__HOST`` / ``CG_DASHBOARD__PORT``).
"""
