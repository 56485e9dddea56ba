"""``fedhive dashboard``: the web dashboard of one project.

With ``--broker-data-dir`` (the directory of ``fedhive broker init``) the dashboard takes the
project, the admin account for the broker and the admin password to log in from its
``credentials.json``; without it, ``--token`` (or ``FEDHIVE_DASHBOARD_TOKEN``) is the password
and the broker is reached as ``--user`` / ``--password``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from common.config import DEFAULT_BROKER_PORT, BrokerSettings
from common.errors import ConfigError
from fedhive.dashboard.settings import DEFAULT_ADMIN, DEFAULT_DATA_DIR, DashboardSettings

log = logging.getLogger("fedhive.dashboard")


def build_settings(
    *,
    broker_host: str,
    broker_port: int,
    broker_data_dir: Path | None,
    project: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    data_dir: Path,
    db_url: str | None,
    best_metric: str,
    timeout: float,
    secure_cookies: bool,
) -> DashboardSettings:
    """The settings the options describe; ConfigError names what is wrong."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "db_url": db_url,
        "best_metric": best_metric,
        "request_timeout": timeout,
        "secure_cookies": secure_cookies,
    }
    if token:
        values["token"] = token
    if project:
        values["project"] = project
    if broker_data_dir is not None:
        if user:
            values["admin_user"] = user
        settings = DashboardSettings.from_credentials(
            broker_data_dir, host=broker_host, port=broker_port, **values
        )
        if project and project != settings.project:
            raise ConfigError(
                f"{broker_data_dir} holds the credentials of project "
                f"{settings.project}, not {project}"
            )
        return settings
    broker = BrokerSettings(
        host=broker_host, port=broker_port, username=user or None, password=password or None
    )
    return DashboardSettings.create(broker=broker, admin_user=user or DEFAULT_ADMIN, **values)


@click.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--broker-host", default="127.0.0.1", show_default=True, envvar="FEDHIVE_HOST",
    help="the MQTT broker",
)  # fmt: skip
@click.option(
    "--broker-port", default=DEFAULT_BROKER_PORT, show_default=True,
    type=click.IntRange(1, 65535), envvar="FEDHIVE_PORT",
)  # fmt: skip
@click.option(
    "--broker-data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="FEDHIVE_BROKER_DATA_DIR",
    help="`fedhive broker init`'s directory: project, admin account and password from there",
)
@click.option("--project", default=None, envvar="FEDHIVE_PROJECT", help="default: 'default'")
@click.option("--user", default=None, envvar="FEDHIVE_USER", help="admin user (broker user name)")
@click.option("--password", default=None, envvar="FEDHIVE_PASSWORD", help="broker password")
@click.option(
    "--token",
    default=None,
    envvar="FEDHIVE_DASHBOARD_TOKEN",
    help="a password for the dashboard (and API bearer token) besides the admin password",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DATA_DIR,
    show_default=True,
    envvar="FEDHIVE_DATA_DIR",
    help="the aggregators' data directory (SQLite store and model blobs)",
)
@click.option("--db-url", default=None, envvar="FEDHIVE_DB_URL", help="database URL of the store")
@click.option("--best-metric", default="accuracy", show_default=True)
@click.option(
    "--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
    help="seconds to wait for an aggregator's answer",
)  # fmt: skip
@click.option("--secure-cookies", is_flag=True, help="session cookie over HTTPS only")
def dashboard_command(
    host: str,
    port: int,
    broker_host: str,
    broker_port: int,
    broker_data_dir: Path | None,
    project: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    data_dir: Path,
    db_url: str | None,
    best_metric: str,
    timeout: float,
    secure_cookies: bool,
) -> None:
    """Serve the web dashboard: overview, aggregation management, performance, settings,
    models (log in with the admin password or the token)."""
    try:
        settings = build_settings(
            broker_host=broker_host, broker_port=broker_port, broker_data_dir=broker_data_dir,
            project=project, user=user, password=password, token=token, data_dir=data_dir,
            db_url=db_url, best_metric=best_metric, timeout=timeout,
            secure_cookies=secure_cookies,
        )  # fmt: skip
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if host not in ("127.0.0.1", "localhost", "::1") and not secure_cookies:
        log.warning(
            "serving on %s without --secure-cookies: put it behind TLS (a reverse proxy) "
            "before it leaves this machine",
            host,
        )
    try:  # the web stack is imported only when the dashboard runs
        from fedhive.dashboard.app import create_app
        from fedhive.dashboard.server import serve
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"the dashboard needs {exc.name}: pip install fastapi uvicorn jinja2 "
            "python-multipart itsdangerous"
        ) from exc
    click.echo(
        f"fedhive dashboard for project {settings.project} on http://{host}:{port} "
        f"(broker {settings.broker.host}:{settings.broker.port}, store {settings.data_dir})"
    )
    serve(create_app(settings), host=host, port=port)


__all__ = ["build_settings", "dashboard_command"]
