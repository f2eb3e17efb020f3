"""``python -m sinks.dashboard [--host H] [--port P]``: serve the live dashboard until Ctrl-C or SIGTERM.

``python -m sinks.dashboard hash-password``: the password hash of one ``CG_DASHBOARD__USERS`` entry."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated

import typer
from prometheus_client import REGISTRY

from infra import web_server
from infra.logs import LOG_LEVEL_HELP, setup_logging
from infra.metrics import ConsumerLagCollector, Endpoint, serve
from infra.processes import all_done_by, exit_deadline, time_left
from infra.settings import Settings, get_settings
from schemas.errors import InvalidRecord
from schemas.identifiers import check_actor
from sinks.dashboard.app import DashboardConfigError, create_app
from sinks.dashboard.case_routes import FirstVerdictPublisher
from sinks.dashboard.login import hash_password
from sinks.dashboard.outcome_reader import AuditOutcomes

MIN_PASSWORD = 12

log = logging.getLogger("sinks.dashboard")

cli = typer.Typer(add_completion=False, help="Serve the live Checkout Guard dashboard.")


def export_metrics(settings: Settings) -> tuple[ConsumerLagCollector, Endpoint]:
    """/metrics and /healthz of the dashboard, with every consumer group's lag (``cg_consumer_lag``) in
    them: the dashboard is the one reader of Kafka's offsets for the whole deployment, so the lag is
    scraped like any other metric and the pipeline page reads it back from Prometheus. A thread reads it
    (only while metrics are on), so a scrape never waits for Kafka. Returns the collector and the endpoint, to stop at
    the end."""
    collector = ConsumerLagCollector(settings)
    REGISTRY.register(collector)
    if settings.metrics.enabled:
        collector.start()
    return collector, serve(settings, "dashboard")


def close_by(
    deadline: float,
    lag: ConsumerLagCollector,
    endpoint: Endpoint,
    commands: FirstVerdictPublisher,
    outcomes: AuditOutcomes | None = None,
) -> None:
    """After the web server: stop the lag thread, close the metrics endpoint (as the Webex bot closes its own), flush
    the command publisher and end the read of their outcomes, side by side, by ``deadline`` (1 s before the
    supervisor's SIGKILL); what is not done by then is given up with a WARNING. Before, none was closed: the lag
    thread's Kafka read, the endpoint's server (still answering /healthz through the stop) and the producer were cut by
    the process's end."""
    calls: list[tuple[str, Callable[[], object]]] = [
        ("consumer-lag-stop", lambda: lag.stop(time_left(deadline))),
        ("metrics-endpoint-close", endpoint.close),
        ("dashboard-commands-close", lambda: commands.close(time_left(deadline))),
    ]
    if outcomes is not None:
        calls.append(("dashboard-outcomes-close", lambda: outcomes.close(time_left(deadline))))
    for (name, _), done in zip(calls, all_done_by(calls, deadline), strict=True):
        if not done.done():
            log.warning("dashboard: %s not done before the supervisor's stop timeout; given up", name)
        elif (exc := done.exception()) is not None:
            log.warning("dashboard: %s failed at the stop: %s", name, exc)


@cli.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Bind address; defaults to dashboard.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Port; defaults to dashboard.port.")] = None,
    log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    settings = get_settings()
    setup_logging(settings, log_level, "dashboard")
    logging.getLogger("opensearch").setLevel(logging.WARNING)  # one line per request otherwise
    bind_host, bind_port = host or settings.dashboard.host, port or settings.dashboard.port
    commands = FirstVerdictPublisher(settings)
    outcomes = AuditOutcomes(settings)
    try:
        app = create_app(settings, host=bind_host, publish=commands, outcomes=outcomes)
    except DashboardConfigError as exc:
        typer.echo(f"dashboard not started: {exc}", err=True)
        raise typer.Exit(2) from None
    lag, endpoint = export_metrics(settings)
    dashboard = settings.dashboard
    login = "login required" if dashboard.users or dashboard.username or dashboard.token else "no login: loopback only"
    typer.echo(
        f"Checkout Guard dashboard on http://{bind_host}:{bind_port}/ "
        f"(indices {settings.opensearch.index_prefix}-*, {login})"
    )
    # until SIGTERM; the requests still under way are given up 2 s before the supervisor's SIGKILL (uvicorn's lines go
    # through setup_logging's handler: format, masked secrets)
    deadline: float | None = None
    try:
        deadline = web_server.serve(
            app,
            host=bind_host,
            port=bind_port,
            stop_timeout_s=settings.supervisor.stop_timeout_s,
            name="dashboard",
            log_level="warning",
        )
    finally:
        close_by(deadline or exit_deadline(settings.supervisor.stop_timeout_s), lag, endpoint, commands, outcomes)


@cli.command("hash-password")
def hash_password_command(
    person: Annotated[str, typer.Argument(help="the login, as on CG_WEBEX__ALLOWED_PEOPLE (an e-mail address)")],
) -> None:
    """Ask for a password twice (not echoed) and print the CG_DASHBOARD__USERS entry for PERSON."""
    try:
        check_actor(person, "the login name")  # the login is the actor of its verdicts: refused at login otherwise
    except InvalidRecord as exc:
        typer.echo(exc.reason, err=True)
        raise typer.Exit(2) from None
    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < MIN_PASSWORD:
        typer.echo(f"a dashboard password has at least {MIN_PASSWORD} characters", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps({person: hash_password(password)}))


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
