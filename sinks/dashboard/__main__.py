"""``python -m sinks.dashboard [--host H] [--port P]``: serve the live dashboard until Ctrl-C."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
import uvicorn
from prometheus_client import REGISTRY

from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.metrics import ConsumerLagCollector, Endpoint, serve
from infra.settings import Settings, get_settings
from sinks.dashboard.app import DashboardConfigError, create_app

cli = typer.Typer(add_completion=False, help="Serve the live Checkout Guard dashboard.")


def export_metrics(settings: Settings) -> Endpoint:
    """/metrics and /healthz of the dashboard, with every consumer group's lag (``cg_consumer_lag``) in
    them: the dashboard is the one reader of Kafka's offsets for the whole deployment, so the lag is
    scraped like any other metric and the pipeline page reads it back from Prometheus."""
    REGISTRY.register(ConsumerLagCollector(settings))
    return serve(settings, "dashboard")


@cli.command()
def main(
    host: Annotated[str | None, typer.Option(help="Bind address; defaults to dashboard.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Port; defaults to dashboard.port.")] = None,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, "dashboard")
    logging.getLogger("opensearch").setLevel(logging.WARNING)  # one line per request otherwise
    bind_host, bind_port = host or settings.dashboard.host, port or settings.dashboard.port
    try:
        app = create_app(settings, host=bind_host)
    except DashboardConfigError as exc:
        typer.echo(f"dashboard not started: {exc}", err=True)
        raise typer.Exit(2) from None
    export_metrics(settings)
    login = "login required" if settings.dashboard.username or settings.dashboard.token else "no login: loopback only"
    typer.echo(
        f"Checkout Guard dashboard on http://{bind_host}:{bind_port}/ "
        f"(indices {settings.opensearch.index_prefix}-*, {login})"
    )
    uvicorn.run(app, host=bind_host, port=bind_port, log_level="warning")


if __name__ == "__main__":
    cli()
