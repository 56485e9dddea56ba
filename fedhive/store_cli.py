"""Model management and performance tracking from the store (the aggregator need not run).

``fedhive models list [--kind K] [--round N] [--agent A] [--json]``,
``fedhive models download --kind global|sg|local|regional|best|base [--round N] [--agent A]
--format pytorch|keras|npz|msgpack -o FILE`` and
``fedhive metrics [--metric M] [--json] [--plot FILE.png]``. Each reads the store in
``--data-dir`` (the SQLite default) or at ``--db-url`` (PostgreSQL); ``--project`` and
``--aggregator`` may be left out while only one fits. Exit codes: 1 for a store error (nothing
recorded, no such model, a pruned model...), 4 for a model whose stored bytes fail their hash.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from aggregator.store import (
    CorruptBlobError,
    MetricPoint,
    MetricSummary,
    ModelInfo,
    StoreError,
    StoreReader,
    summarize,
)
from aggregator.store.export import FORMATS, export_model
from common.config import DEFAULT_DATA_DIR as AGGREGATOR_DATA_DIR
from common.errors import CodecError
from common.messages import ModelKind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXIT_STORE_ERROR = 1
EXIT_CORRUPT = 4
#: The aggregator's data directory by default (``AggregatorConfig.data_dir``).
DEFAULT_DATA_DIR = AGGREGATOR_DATA_DIR
KINDS = ("global", "sg", "regional", "local", "base", "best")

_F = TypeVar("_F", bound=Callable[..., Any])


class StoreProblemError(click.ClickException):
    """The store could not answer (nothing recorded, no such model, database unreachable)."""

    exit_code = EXIT_STORE_ERROR


class CorruptModelError(click.ClickException):
    """A stored model's bytes do not match their hash: never served."""

    exit_code = EXIT_CORRUPT


def store_options(func: _F) -> _F:
    """``--data-dir``, ``--db-url``, ``--project``, ``--aggregator``; the command receives an
    opened ``store`` and ``project``/``aggregator`` (None when left out)."""
    options = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=DEFAULT_DATA_DIR,
            show_default=True,
            envvar="FEDHIVE_DATA_DIR",
            help="the aggregator's data directory (SQLite store and model blobs)",
        ),
        click.option(
            "--db-url",
            default=None,
            envvar="FEDHIVE_DB_URL",
            help="database URL (postgresql://user@host/db); default: SQLite in --data-dir",
        ),
        click.option(
            "--project", default=None, envvar="FEDHIVE_PROJECT", help="default: the only one"
        ),
        click.option(
            "--aggregator",
            default=None,
            envvar="FEDHIVE_AGGREGATOR",
            help="aggregator name (default: the only one)",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, data_dir: Path, db_url: str | None, **kwargs: Any) -> Any:
        with _domain_errors():
            store = StoreReader(data_dir=data_dir, url=db_url)
        with store, _domain_errors():
            return func(*args, store=store, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _domain_errors() -> Iterator[None]:
    """Store and codec errors become click errors with their message (and exit code)."""
    try:
        yield
    except CorruptBlobError as exc:
        raise CorruptModelError(str(exc)) from exc
    except (StoreError, CodecError) as exc:
        raise StoreProblemError(str(exc)) from exc


# ================================================================================== models
@click.group("models")
def models_group() -> None:
    """List and download stored models (global, sg, local, base, best)."""


@models_group.command("list")
@store_options
@click.option("--kind", type=click.Choice(KINDS), default=None, help="only this kind")
@click.option("--round", "round_", type=click.IntRange(min=0), default=None, help="only round N")
@click.option("--agent", default=None, help="only this agent's models")
@click.option("--metric", default=None, help="rank --kind best by this metric")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def list_models(
    store: StoreReader,
    project: str | None,
    aggregator: str | None,
    kind: str | None,
    round_: int | None,
    agent: str | None,
    metric: str | None,
    as_json: bool,
) -> None:
    """List stored models, oldest first (pruned ones are marked)."""
    if kind == "best":
        models = [store.best_model(project=project, aggregator=aggregator, metric=metric)]
    else:
        models = store.list_models(
            project=project,
            aggregator=aggregator,
            kind=ModelKind(kind) if kind else None,
            round=round_,
            agent=agent,
        )
    if as_json:
        click.echo(json.dumps([m.to_json() for m in models], indent=2))
        return
    console = _console()
    if not models:
        console.print("no stored model matches")
        return
    console.print(_models_table(models))


def _console() -> Console:
    """The terminal's width on a terminal; wide enough for whole rows when piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _models_table(models: Sequence[ModelInfo]) -> Table:
    table = Table(title="stored models")
    for column in ("aggregator", "kind", "round", "agent", "samples", "size", "framework"):
        table.add_column(
            column, justify="right" if column in ("round", "samples", "size") else "left"
        )
    table.add_column("sha256")
    table.add_column("note")
    for m in models:
        note = "pruned" if m.pruned else ""
        if m.metric is not None:
            note = f"best {m.metric}={m.value:.6g}"
        table.add_row(
            f"{m.project}/{m.aggregator}",
            m.kind.value,
            str(m.round),
            m.agent or "",
            f"{m.num_samples:g}",
            _size(m.size),
            m.framework,
            m.sha256[:12],
            note,
        )
    return table


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


@models_group.command("download")
@store_options
@click.option("--kind", type=click.Choice(KINDS), default="global", show_default=True)
@click.option("--round", "round_", type=click.IntRange(min=0), default=None, help="default: latest")
@click.option("--agent", default=None, help="the agent (for --kind local)")
@click.option("--metric", default=None, help="rank --kind best by this metric (default accuracy)")
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), required=True, help="file format to write"
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="file to write",
)
def download(
    store: StoreReader,
    project: str | None,
    aggregator: str | None,
    kind: str,
    round_: int | None,
    agent: str | None,
    metric: str | None,
    fmt: str,
    output: Path,
) -> None:
    """Write one stored model to a file (its bytes are checked against their hash first)."""
    if kind == "best" and (round_ is not None or agent is not None):
        raise click.UsageError("--kind best picks its own round and agent: drop --round/--agent")
    info, payload = store.get_model(
        "best" if kind == "best" else ModelKind(kind),
        project=project,
        aggregator=aggregator,
        round=round_,
        agent=agent,
        metric=metric,
    )
    export_model(payload, fmt, output)
    what = f"{info.kind.value} model of round {info.round}"
    if info.agent:
        what += f" from {info.agent}"
    if info.metric is not None:
        what = f"best model by {info.metric} ({info.value:.6g}): {what}"
    click.echo(f"wrote {what} of {info.project}/{info.aggregator} as {fmt} to {output}")


# ================================================================================== metrics
@click.command("metrics")
@store_options
@click.option("--metric", default=None, help="only this metric (default: all)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="write a PNG chart: the metric over rounds per agent and for the global model",
)
def metrics_command(
    store: StoreReader,
    project: str | None,
    aggregator: str | None,
    metric: str | None,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Per-round mean/min/max of each metric (agents' and the aggregator's own)."""
    ref = store.resolve_aggregator(project=project, aggregator=aggregator, role="aggregator")
    points = store.metric_points(project=ref.project, aggregator=ref.name, metric=metric)
    if not points:
        which = f"metric {metric!r}" if metric else "metrics"
        raise StoreProblemError(
            f"no {which} recorded for aggregator {ref.project}/{ref.name} in a completed round"
        )
    summaries = summarize(points)
    if plot is not None:
        try:
            figure = plot_metrics(points, summaries, metric=metric)
        except ModuleNotFoundError as exc:
            raise StoreProblemError("--plot needs matplotlib: pip install matplotlib") from exc
        figure.savefig(plot, format="png", dpi=100)
    if as_json:
        data = {
            "project": ref.project,
            "aggregator": ref.name,
            "metrics": [s.to_json() for s in summaries],
        }
        click.echo(json.dumps(data, indent=2))
        return
    console = _console()
    console.print(_metrics_table(f"{ref.project}/{ref.name}", summaries))
    if plot is not None:
        console.print(f"chart written to {plot}")


def _metrics_table(title: str, summaries: Sequence[MetricSummary]) -> Table:
    table = Table(title=f"metrics of {title}")
    table.add_column("round", justify="right")
    table.add_column("metric")
    table.add_column("source")
    for column in ("n", "mean", "min", "max", "global"):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            str(s.round),
            s.key,
            s.source,
            str(s.count),
            f"{s.mean:.6g}",
            f"{s.min:.6g}",
            f"{s.max:.6g}",
            "" if s.global_value is None else f"{s.global_value:.6g}",
        )
    return table


def plot_keys(points: Sequence[MetricPoint], metric: str | None) -> list[str]:
    """The metrics a chart shows: ``metric``, else every agent metric (else every metric)."""
    if metric is not None:
        return [metric]
    keys = sorted({p.key for p in points if p.source != "aggregator"})
    return keys or sorted({p.key for p in points})


def plot_series(
    points: Sequence[MetricPoint], summaries: Sequence[MetricSummary], key: str
) -> dict[str, tuple[list[int], list[float]]]:
    """Label -> (rounds, values) for one metric: one series per agent and ``global`` (or the
    ``aggregator``'s own series for its metrics)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for p in points:
        if p.key != key or p.source == "model":
            continue
        label = p.agent if p.source == "agent" and p.agent else p.source
        rounds, values = series.setdefault(label, ([], []))
        rounds.append(p.round)
        values.append(p.value)
    glob = [s for s in summaries if s.key == key and s.global_value is not None]
    if glob:
        series["global"] = ([s.round for s in glob], [float(s.global_value or 0.0) for s in glob])
    return series


def plot_metrics(
    points: Sequence[MetricPoint], summaries: Sequence[MetricSummary], *, metric: str | None
) -> Figure:
    """A figure with one chart per metric and one line per series (each agent, and the global
    model); no pyplot, so no global state and no display is needed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    keys = plot_keys(points, metric)
    figure = Figure(figsize=(8, 3.2 * len(keys)), layout="constrained")
    axes = figure.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        for label, (rounds, values) in plot_series(points, summaries, key).items():
            style: dict[str, Any] = {"marker": "o", "markersize": 3, "linewidth": 1.2}
            if label == "global":
                style = {"marker": "s", "linewidth": 2.5, "color": "black"}
            ax.plot(rounds, values, label=label, **style)
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    return figure


def add_store_commands(group: click.Group) -> None:
    """Attach ``models`` and ``metrics`` to the ``fedhive`` root group."""
    group.add_command(models_group)
    group.add_command(metrics_command)
