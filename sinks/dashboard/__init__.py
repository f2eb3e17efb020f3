"""The live dashboard: a Starlette app serving a static page that polls JSON aggregations from OpenSearch.

No build step and nothing from a CDN: the charts are drawn as plain SVG by ``static/common.js`` (shared
toolkit and controls), ``static/app.js`` (the live page, ``/``) and ``static/models.js`` (``/models``:
champion vs challenger score distributions and ROC-AUC on field labels, and model drift).
Run: ``python -m sinks.dashboard`` (host/port from ``CG_DASHBOARD__HOST`` / ``CG_DASHBOARD__PORT``).
Off loopback it needs a login: ``CG_DASHBOARD__USERNAME``/``CG_DASHBOARD__PASSWORD`` (HTTP Basic) and/or
``CG_DASHBOARD__TOKEN`` (``Authorization: Bearer``); see ``app.py``.
"""
