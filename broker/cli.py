"""``fedhive broker ...``: secure a project's broker, run Mosquitto in the foreground, or check
that one answers.

The root CLI adds :data:`broker_group` with ``add_command``; ``python -m broker.cli`` runs the
group on its own.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click

from broker.health import probe_connack
from broker.process import BrokerState, MosquittoBroker, TLSListener, reload_broker
from broker.security import (
    CREDENTIALS_FILE,
    ProjectCredentials,
    Role,
    SecurityFiles,
    add_agent,
    init_project,
    load_credentials,
    read_agent_names,
    remove_agent,
    security_files,
)
from common.config import DEFAULT_AGGREGATOR
from common.errors import FedhiveError

__all__ = ["broker_group"]

DEFAULT_DATA_DIR = Path("fedhive-data") / "broker"
DEFAULT_TLS_PORT = 8883

_F = TypeVar("_F", bound=Callable[..., Any])


def _data_dir_option(help_text: str) -> Callable[[_F], _F]:
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help=help_text,
    )


@click.group("broker")
def broker_group() -> None:
    """Secure, run and check the Mosquitto (MQTT 5) broker fedhive talks through."""


@broker_group.command("start")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port [default: free]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind to.")
@click.option(
    "--config",
    "template",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Config template with @PORT@ etc. [default: the repo's mosquitto.conf]",
)
@_data_dir_option("Directory for the rendered config, database, log (and `init`'s files).")
@click.option(
    "--secure",
    is_flag=True,
    help="Require logins and apply the ACL (and TLS) that `broker init` wrote into --data-dir.",
)
@click.option(
    "--tls-port",
    type=click.IntRange(1, 65535),
    default=DEFAULT_TLS_PORT,
    show_default=True,
    help="TLS listener port (with --secure, when init made certificates).",
)
@click.option(
    "--tls-host", default=None, help="Address the TLS listener binds to [default: --host]"
)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Start-up seconds.")
def start_command(
    port: int | None,
    host: str,
    template: Path | None,
    data_dir: Path,
    secure: bool,
    tls_port: int,
    tls_host: str | None,
    timeout: float,
) -> None:
    """Start mosquitto and stay in the foreground until Ctrl-C or SIGTERM, then stop it."""
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    previous_int = signal.getsignal(signal.SIGINT)
    broker: MosquittoBroker | None = None
    try:
        files: SecurityFiles | None = None
        tls: TLSListener | None = None
        if secure:
            files = security_files(data_dir)
            tls = files.tls_listener(port=tls_port, bind_address=tls_host)
        broker = MosquittoBroker(
            port=port,
            data_dir=data_dir,
            bind_address=host,
            config_template=template,
            password_file=files.password_file if files else None,
            acl_file=files.acl_file if files else None,
            tls=tls,
        )
        broker.start(timeout=timeout)
        report = [f"broker listening on {broker.url} (pid {broker.pid})"]
        if files is not None:
            report.append(
                f"  secured: project {files.project}, logins required, ACL {files.acl_file}"
            )
            if broker.tls_url is not None:
                report.append(f"  TLS    {broker.tls_url} (clients verify it with {files.ca_cert})")
        elif (data_dir / CREDENTIALS_FILE).exists():
            report.append("  ANONYMOUS: this data directory holds credentials; --secure uses them")
        report.append(f"  config {broker.config_path}")
        report.append(f"  log    {broker.log_path}")
        report.append("Ctrl-C or SIGTERM stops it.")
        # One write: a SIGTERM right after the first line must not cut the report short.
        click.echo("\n".join(report))
        sys.stdout.flush()  # a supervising script may be waiting for the lines above
        code = broker.wait()
        raise click.ClickException(
            f"mosquitto exited by itself with code {code}; last lines:\n{broker.log_tail()}"
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through _raise_stop
        click.echo("stopping broker...")
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        # A second Ctrl-C/SIGTERM must not abandon mosquitto (it runs in its own session):
        # stop() is bounded by its own timeout and SIGKILL.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if broker is not None and broker.state is BrokerState.RUNNING:
                was_alive = broker.is_alive()
                broker.stop(timeout=timeout)  # also reaps a mosquitto that died by itself
                if was_alive:
                    click.echo("broker stopped")
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            signal.signal(signal.SIGINT, previous_int)


@broker_group.command("check")
@click.option("--host", default="127.0.0.1", show_default=True, help="Broker address.")
@click.option("--port", type=click.IntRange(1, 65535), default=1883, show_default=True)
@click.option("--timeout", type=float, default=2.0, show_default=True, help="Seconds to wait.")
@click.option("--username", default=None, help="Log in as this user (a secured broker).")
@click.option(
    "--password",
    envvar="FEDHIVE_BROKER_PASSWORD",
    default=None,
    help="Password for --username [env: FEDHIVE_BROKER_PASSWORD, which keeps it out of `ps`].",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a sentence.")
@click.pass_context
def check_command(
    ctx: click.Context,
    host: str,
    port: int,
    timeout: float,
    username: str | None,
    password: str | None,
    as_json: bool,
) -> None:
    """Exit 0 if an MQTT 5 broker accepts a connection at HOST:PORT, else 1."""
    reason = probe_connack(host, port, timeout, username=username, password=password)
    answers = reason is not None and not reason.is_failure
    # A secured broker refuses an anonymous (or wrong) login: it is up, but not usable so.
    refused = str(reason) if reason is not None and reason.is_failure else None
    if as_json:
        report: dict[str, Any] = {"host": host, "port": port, "answers": answers}
        if refused is not None:
            report["refused"] = refused
        click.echo(json.dumps(report))
    elif answers:
        click.echo(f"broker at {host}:{port} answers")
    elif refused is not None:
        who = f"user {username!r}" if username else "an anonymous client"
        click.echo(f"broker at {host}:{port} refused {who}: {refused}", err=True)
    else:
        click.echo(f"no broker answers at {host}:{port}", err=True)
    ctx.exit(0 if answers else 1)


@broker_group.command("init")
@click.option("--project", required=True, help="Project whose topics the ACL covers.")
@_data_dir_option("The broker's data directory (what `broker start --data-dir` uses).")
@click.option("--agents", default="", help="Agents to enrol, comma-separated (a1,a2).")
@click.option(
    "--agents-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Agent enrolment list: one name a line, '#' comments.",
)
@click.option(
    "--aggregators",
    default=DEFAULT_AGGREGATOR,
    show_default=True,
    help="Aggregator names, comma-separated.",
)
@click.option("--sg-aggregator", "sg_aggregators", multiple=True, help="SG aggregator name.")
@click.option(
    "--admin",
    "admins",
    multiple=True,
    default=("admin",),
    show_default=True,
    help="Admin user name; repeat for admin tools that run at the same time.",
)
@click.option("--tls", is_flag=True, help="Also create a development CA and server certificate.")
@click.option(
    "--tls-hostname",
    "hostnames",
    multiple=True,
    help="Name or address clients reach the broker by, for the certificate (repeatable) "
    "[default: localhost and 127.0.0.1].",
)
@click.option("--force", is_flag=True, help="Replace existing credentials (all passwords change).")
@click.option("--show-secrets", is_flag=True, help="Also print the admin password(s).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def init_command(
    project: str,
    data_dir: Path,
    agents: str,
    agents_file: Path | None,
    aggregators: str,
    sg_aggregators: tuple[str, ...],
    admins: tuple[str, ...],
    tls: bool,
    hostnames: tuple[str, ...],
    force: bool,
    show_secrets: bool,
    as_json: bool,
) -> None:
    """Create a project's broker users, password file and ACL (and TLS files) in --data-dir.

    Passwords go to credentials.json (mode 0600) only; hand each component its own (an agent's
    is its config's "token"). Then run `broker start --secure` with the same --data-dir.
    """
    try:
        names = _split(agents)
        if agents_file is not None:
            names += read_agent_names(agents_file)
        credentials = init_project(
            data_dir,
            project=project,
            agents=names,
            aggregators=_split(aggregators),
            sg_aggregators=sg_aggregators,
            admins=admins,
            tls=tls,
            hostnames=hostnames or None,
            force=force,
        )
        files = security_files(data_dir)
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    admin_passwords = {name: credentials.account(name).password for name in admins}
    if as_json:
        report = _files_report(files, credentials)
        if show_secrets:
            report["admin_passwords"] = admin_passwords
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"broker security for project {project} written to {files.data_dir}")
    click.echo(f"  credentials   {files.credentials_file}  (mode 0600: every password)")
    click.echo(f"  password file {files.password_file}")
    click.echo(f"  ACL           {files.acl_file}")
    if files.ca_cert is not None:
        click.echo(f"  CA            {files.ca_cert}  (clients: tls.ca_file)")
        click.echo(f"  server cert   {files.server_cert}")
    click.echo("users (each logs in with its name; agents with their agent name):")
    for role in Role:
        click.echo(f"  {role.value + 's':15}{', '.join(credentials.names(role)) or '(none)'}")
    if show_secrets:
        for name, password in admin_passwords.items():
            click.echo(f"password of {name}: {password}")
    else:
        click.echo(f"passwords: in {files.credentials_file} (or rerun with --show-secrets)")
    click.echo(f"start it: fedhive broker start --secure --data-dir {data_dir}")


@broker_group.command("add-agent")
@click.argument("name")
@click.option("--project", default=None, help="Check that --data-dir belongs to this project.")
@_data_dir_option("The broker's data directory (where `broker init` wrote).")
@click.option("--show-secrets", is_flag=True, help="Also print the agent's token (password).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def add_agent_command(
    name: str, project: str | None, data_dir: Path, show_secrets: bool, as_json: bool
) -> None:
    """Enrol agent NAME: a password for it, and a reload of the running broker if there is one."""
    try:
        add_agent(data_dir, name, project=project)
        files = security_files(data_dir)
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    pid = reload_broker(data_dir)
    _report_change(files, name, "enrolled", pid, show_secrets=show_secrets, as_json=as_json)


@broker_group.command("remove-agent")
@click.argument("name")
@click.option("--project", default=None, help="Check that --data-dir belongs to this project.")
@_data_dir_option("The broker's data directory (where `broker init` wrote).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def remove_agent_command(name: str, project: str | None, data_dir: Path, as_json: bool) -> None:
    """Revoke agent NAME: its password stops working once the broker reloads."""
    try:
        remove_agent(data_dir, name, project=project)
        files = security_files(data_dir)
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    pid = reload_broker(data_dir)
    _report_change(files, name, "removed", pid, show_secrets=False, as_json=as_json)


def _report_change(
    files: SecurityFiles,
    name: str,
    change: str,
    pid: int | None,
    *,
    show_secrets: bool,
    as_json: bool,
) -> None:
    credentials = load_credentials(files.data_dir)
    if as_json:
        report: dict[str, Any] = {
            "project": files.project,
            "agent": name,
            change: True,
            "reloaded_pid": pid,
            "credentials": str(files.credentials_file),
        }
        if show_secrets and change == "enrolled":
            report["agent_config"] = credentials.agent_config_entries(name, ca_file=files.ca_cert)
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"agent {name} {change} in project {files.project} ({files.password_file})")
    if pid is not None:
        click.echo(f"running broker (pid {pid}) reloaded its password file")
    else:
        click.echo("no running broker found for this data directory: (re)start it to apply")
    if change == "enrolled":
        if show_secrets:
            entries = credentials.agent_config_entries(name, ca_file=files.ca_cert)
            click.echo("agent config keys: " + json.dumps(entries))
        else:
            click.echo(f"its token (password): in {files.credentials_file} (or --show-secrets)")


def _files_report(files: SecurityFiles, credentials: ProjectCredentials) -> dict[str, Any]:
    return {
        "project": files.project,
        "data_dir": str(files.data_dir),
        "credentials": str(files.credentials_file),
        "password_file": str(files.password_file),
        "acl_file": str(files.acl_file),
        "ca_file": str(files.ca_cert) if files.ca_cert else None,
        "server_cert": str(files.server_cert) if files.server_cert else None,
        "users": {role.value: credentials.names(role) for role in Role},
    }


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (systemd, docker stop, kill) ends the foreground wait exactly like Ctrl-C.
    raise KeyboardInterrupt


if __name__ == "__main__":
    broker_group()
