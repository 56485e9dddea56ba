"""The ``fedhive`` command: one click group per component, gathered here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import click

from agent.cli import upload_model
from aggregator.cli import aggregator_group, sg_aggregator_group
from broker.cli import broker_group
from common.config import Compression
from common.errors import FedhiveError
from fedhive.agent_cli import agent_group
from fedhive.control_cli import add_control_commands
from fedhive.dashboard.cli import dashboard_command
from fedhive.store_cli import add_store_commands


@click.group()
@click.version_option(package_name="fedhive")
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def main(log_level: str) -> None:
    """fedhive: federated learning over MQTT 5 (Mosquitto)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


main.add_command(broker_group)
main.add_command(aggregator_group)
main.add_command(sg_aggregator_group)
# status, round, set; aggregator stop/restart; sg-aggregator status
add_control_commands(main, aggregator_group, sg_aggregator_group)
add_store_commands(main)  # models list/download, metrics
main.add_command(dashboard_command)
main.add_command(agent_group)
main.add_command(upload_model)
# STADLE's docs spell it upload_model.
main.add_command(upload_model, name="upload_model")


@main.command()
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--rounds", default=8, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--epochs",
    default=1,
    show_default=True,
    type=click.IntRange(1, 100),
    help="local epochs per round",
)
@click.option("--method", default="fedavg", show_default=True, help="aggregation method")
@click.option(
    "--aggregators",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="more than 1: an sg-aggregator over that many aggregators, agents spread over them",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="broker host")
@click.option(
    "--port",
    type=int,
    default=None,
    help="use the broker on this port if it answers (default: start one)",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="keep configs and logs here (default: a temporary directory)",
)
@click.option("--timeout", default=300.0, show_default=True, help="seconds before giving up")
@click.option(
    "--compression",
    type=click.Choice(list(get_args(Compression))),
    default=None,
    help="agents send their updates packed: a float16/bfloat16 cast, zlib, or both",
)
def demo(
    agents: int,
    rounds: int,
    epochs: int,
    method: str,
    aggregators: int,
    host: str,
    port: int | None,
    workdir: Path | None,
    timeout: float,
    compression: str | None,
) -> None:
    """Run a whole federation on this machine: broker, aggregator, agents (PyTorch, digits).

    With ``--aggregators N`` (N > 1): an sg-aggregator and N aggregators, the two-level
    federation whose semi-global models are evaluated."""
    from rich.console import Console

    from fedhive.demo.run import DemoOptions, run_demo

    logging.getLogger("fedhive").setLevel(logging.WARNING)  # the progress display speaks
    console = Console()
    try:
        result = run_demo(
            DemoOptions(
                agents=agents,
                rounds=rounds,
                epochs=epochs,
                method=method,
                aggregators=aggregators,
                host=host,
                port=port,
                workdir=workdir,
                timeout=timeout,
                compression=compression,
            ),
            console,
        )
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    final = result.accuracies[-1]
    packed = f" (updates sent {compression})" if compression else ""
    console.print(f"federated accuracy after {rounds} rounds{packed}: {final * 100:.2f}%")
    console.print(
        f"centralized accuracy ({rounds * epochs} epochs): {result.centralized * 100:.2f}%"
    )
    console.print(
        f"difference: {(final - result.centralized) * 100:+.2f} points; "
        f"total {result.seconds:.1f} s"
    )
