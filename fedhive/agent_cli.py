"""``fedhive agent``: the agent daemon for edge devices.

``fedhive agent run --config config_agent.json --entry module:function`` runs an
IntegratedClient defined by the entry point (see :mod:`agent.daemon`); also runnable as
``python -m fedhive.agent_cli run ...``. ``examples/fedhive-agent.service`` is a systemd unit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from common.errors import FedhiveError

#: The daemon's own loggers and the one line per round: shown unless --quiet.
_DAEMON_LOGGERS = ("fedhive.daemon", "fedhive.agent.round", "fedhive.transport")


def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        params[key] = value
    return params


def _configure_logging(verbose: bool, quiet: bool) -> None:
    if not logging.getLogger().handlers:  # not already set up by `fedhive --log-level`
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    if verbose:
        logging.getLogger("fedhive").setLevel(logging.DEBUG)
        return
    # The rest of fedhive speaks at WARNING; the daemon's lines and one line per round at INFO.
    logging.getLogger("fedhive").setLevel(logging.WARNING)
    # aiomqtt warns whenever more than 10 publishes are pending; a model upload keeps 16 in
    # flight on purpose (common/transport.py), so those lines would flood the log.
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    for name in _DAEMON_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


@click.group("agent")
def agent_group() -> None:
    """Run a federated-learning agent (the daemon for edge devices)."""


@agent_group.command("run")
@click.option(
    "--config",
    "--config_path",
    "config",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="agent config JSON (STADLE keys plus fedhive's)",
)
@click.option(
    "--entry",
    required=True,
    help="module:function that sets up the IntegratedClient: function(client, **params)",
)
@click.option("--agent-name", "--agent_name", default=None, help="overrides the config's")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="a keyword argument (a string) for the entry function; repeatable",
)
@click.option("--verbose", is_flag=True, help="log everything fedhive says")
@click.option("--quiet", is_flag=True, help="warnings and errors only (no line per round)")
def run_agent(
    config: Path,
    entry: str,
    agent_name: str | None,
    params: tuple[str, ...],
    verbose: bool,
    quiet: bool,
) -> None:
    """Run an IntegratedClient until its termination function ends it, or forever.

    Reconnects across broker and aggregator restarts and trains from the current SG model.
    SIGTERM/SIGINT: the round in flight finishes and sends its model, then the agent exits 0.
    """
    from agent.daemon import AgentDaemon

    _configure_logging(verbose, quiet)
    daemon = AgentDaemon(
        config_file=config,
        entry=entry,
        params=_parse_params(params),
        overrides={"agent_name": agent_name} if agent_name else {},
    )
    try:
        code = daemon.run()
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    if code:
        sys.exit(code)


if __name__ == "__main__":
    agent_group()
