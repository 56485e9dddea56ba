"""``fedhive upload-model``: upload the base model described by an agent config."""

from __future__ import annotations

from pathlib import Path

import click

from agent.admin import AdminAgent
from common.errors import FedhiveError


@click.command("upload-model")
@click.option(
    "--config_path",
    "--config-path",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="agent config JSON with a base_model block",
)
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="seconds to wait for an aggregator to confirm",
)
def upload_model(config_path: Path, timeout: float) -> None:
    """Upload the base model and wait until an aggregator confirms it."""
    try:
        sha = AdminAgent(config_file=config_path, timeout=timeout).initialize()
    except FedhiveError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"base model uploaded and confirmed (sha256 {sha})")
