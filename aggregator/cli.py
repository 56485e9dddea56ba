"""``fedhive aggregator ...`` and ``fedhive sg-aggregator ...``: run an aggregator, or the
sg-aggregator that combines several aggregators' regional results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from aggregator.service import AggregatorService
from aggregator.sg import SgAggregatorService
from common.config import (
    DEFAULT_DATA_DIR,
    AggregatorConfig,
    SgAggregatorConfig,
    load_settings,
    parse_settings,
)
from common.errors import FedhiveError


@click.group("aggregator")
def aggregator_group() -> None:
    """Run and manage aggregators."""


@click.group("sg-aggregator")
def sg_aggregator_group() -> None:
    """Run the sg-aggregator (semi-global models over several aggregators)."""


async def serve(service: AggregatorService | SgAggregatorService) -> None:
    """Run ``service`` until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on every platform
            loop.add_signal_handler(sig, service.stop)
    await service.run()


_F = TypeVar("_F", bound=Callable[..., Any])


def store_options(func: _F) -> _F:
    """``--data-dir``, ``--db-url`` and ``--keep-local`` (each overrides the config)."""
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="the store's directory: SQLite database and model blobs "
            f"(default {DEFAULT_DATA_DIR})",
        ),
        click.option(
            "--db-url",
            help="keep the store's records in this database (postgresql://user@host/db) "
            "instead of SQLite; model blobs stay in --data-dir",
        ),
        click.option(
            "--keep-local",
            help="contributed models whose bytes are kept once their round completed: all, "
            "none, or a number K of last rounds",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@aggregator_group.command("start")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="aggregator config JSON",
)
@click.option("--name", help="aggregator name (overrides the config)")
@click.option("--project", help="project name (overrides the config)")
@click.option("--method", help="aggregation method, e.g. fedavg (overrides the config)")
@click.option("--threshold", type=float, help="fraction of active agents needed per round")
@click.option(
    "--agent-timeout", type=float, help="seconds without a heartbeat before an agent is TIMEOUT"
)
@click.option("--max-agents", type=int, help="agents that may connect at once (0: no limit)")
@click.option("--max-rounds", type=int, help="stop after this many rounds (0: no limit)")
@click.option(
    "--sg-aggregator",
    help="send regional results to this sg-aggregator and serve its SG models",
)
@store_options
@click.option("--host", help="broker host (overrides the config)")
@click.option("--port", type=int, help="broker port (overrides the config)")
def start(
    config_path: Path | None,
    name: str | None,
    project: str | None,
    method: str | None,
    threshold: float | None,
    agent_timeout: float | None,
    max_agents: int | None,
    max_rounds: int | None,
    sg_aggregator: str | None,
    data_dir: Path | None,
    db_url: str | None,
    keep_local: str | None,
    host: str | None,
    port: int | None,
) -> None:
    """Start an aggregator and serve until interrupted.

    Every accepted model and completed round is recorded in its store (``--data-dir``, or
    PostgreSQL at ``--db-url``); started again, even after a crash, it resumes from there.
    While it runs, ``fedhive status``, ``fedhive round complete``, ``fedhive set ...`` and
    ``fedhive aggregator stop|restart`` steer it."""
    try:
        overrides = {
            "name": name,
            "project": project,
            "method": method,
            "threshold": threshold,
            "agent_timeout": agent_timeout,
            "max_agents": max_agents,
            "max_rounds": max_rounds,
            "sg_aggregator": sg_aggregator,
            "data_dir": data_dir,
            "db_url": db_url,
            "keep_local": keep_local,
        }
        config = _load(AggregatorConfig, config_path, overrides, host, port)
        logging.getLogger("fedhive").setLevel(config.log_level)
        service = AggregatorService(config=config)
        asyncio.run(serve(service))
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc


@sg_aggregator_group.command("start")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="sg-aggregator config JSON",
)
@click.option("--name", help="sg-aggregator name (overrides the config)")
@click.option("--project", help="project name (overrides the config)")
@click.option(
    "--method",
    help="how regional results are combined: fedavg (sample-weighted), or a robust method",
)
@click.option("--threshold", type=float, help="fraction of live aggregators needed per round")
@click.option(
    "--aggregator-timeout",
    type=float,
    help="seconds an aggregator may be gone before rounds go on without it",
)
@store_options
@click.option("--host", help="broker host (overrides the config)")
@click.option("--port", type=int, help="broker port (overrides the config)")
def sg_start(
    config_path: Path | None,
    name: str | None,
    project: str | None,
    method: str | None,
    threshold: float | None,
    aggregator_timeout: float | None,
    data_dir: Path | None,
    db_url: str | None,
    keep_local: str | None,
    host: str | None,
    port: int | None,
) -> None:
    """Start the sg-aggregator and serve until interrupted.

    It combines the regional results of every aggregator started with ``--sg-aggregator``
    (or ``sg_aggregator`` in its config) into the semi-global model they all serve. Its
    rounds are recorded in its store; started again, even after a crash, it resumes there."""
    try:
        overrides = {
            "name": name,
            "project": project,
            "method": method,
            "threshold": threshold,
            "aggregator_timeout": aggregator_timeout,
            "data_dir": data_dir,
            "db_url": db_url,
            "keep_local": keep_local,
        }
        config = _load(SgAggregatorConfig, config_path, overrides, host, port)
        logging.getLogger("fedhive").setLevel(config.log_level)
        asyncio.run(serve(SgAggregatorService(config=config)))
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc


_C = TypeVar("_C", AggregatorConfig, SgAggregatorConfig)


def _load(
    model: type[_C],
    config_path: Path | None,
    overrides: dict[str, Any],
    host: str | None,
    port: int | None,
) -> _C:
    """The config file (or the defaults) with the command-line overrides."""
    if config_path is not None:
        config = load_settings(model, config_path, **overrides)
    else:
        config = parse_settings(model, {k: v for k, v in overrides.items() if v is not None})
    if host is not None or port is not None:
        broker = config.broker.model_copy(
            update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
        )
        config = config.model_copy(update={"broker": broker})
    return config
