"""What the dashboard reads from the store: the same :class:`StoreReader` calls as
``fedhive models`` and ``fedhive metrics``, and the same export formats.

The calls block (database, files): the web layer runs them in its thread pool.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup

from aggregator.store import (
    AggregatorRef,
    MetricPoint,
    MetricSummary,
    ModelInfo,
    ModelNotFoundError,
    StoreError,
    StoreReader,
    summarize,
)
from aggregator.store.database import database_url, sqlite_file
from aggregator.store.export import FORMATS, SUFFIXES, ExportFormat, export_model
from common.messages import ModelKind
from fedhive.dashboard.charts import GLOBAL_LABEL, Highlight, line_chart
from fedhive.store_cli import plot_series

#: What a download may ask for: a stored kind, or the best model.
KINDS = ("global", "sg", "regional", "local", "base", "best")


@dataclass(frozen=True, slots=True)
class Chart:
    key: str
    svg: Markup


@dataclass(frozen=True, slots=True)
class Performance:
    """One aggregator's recorded metrics: charts, per-round summaries and the best model."""

    aggregator: AggregatorRef
    keys: list[str]
    points: list[MetricPoint]
    summaries: list[MetricSummary]
    best: ModelInfo | None
    charts: list[Chart]


@dataclass(frozen=True, slots=True)
class Export:
    """A model written to a temporary file; :meth:`cleanup` removes it once sent."""

    info: ModelInfo
    path: Path
    filename: str
    fmt: ExportFormat

    def cleanup(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)


class NothingRecordedError(StoreError):
    """The store does not exist yet: no aggregator recorded anything there."""


class StoreAccess:
    """Opens the store on first use (it may not exist yet when the dashboard starts) and keeps
    it open.

    Args:
        data_dir: the aggregators' data directory.
        url: a database URL instead of the SQLite file in ``data_dir``.
        best_metric: the metric the best model is ranked by.
    """

    def __init__(self, *, data_dir: Path, url: str | None, best_metric: str) -> None:
        self.data_dir = Path(data_dir)
        self.url = url
        self.best_metric = best_metric
        self._reader: StoreReader | None = None
        self._lock = threading.Lock()

    def reader(self) -> StoreReader:
        """The open store; StoreError while nothing was recorded."""
        with self._lock:
            if self._reader is None:
                db_file = sqlite_file(database_url(self.url, self.data_dir))
                if db_file is not None and not db_file.exists():
                    raise NothingRecordedError(
                        f"nothing recorded yet: no fedhive store at {db_file} (the aggregators' "
                        "--data-dir)"
                    )
                self._reader = StoreReader(
                    data_dir=self.data_dir, url=self.url, best_metric=self.best_metric
                )
            return self._reader

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # ------------------------------------------------------------ queries
    def aggregators(self, project: str) -> list[AggregatorRef]:
        return self.reader().aggregators(project)

    def models(
        self,
        project: str,
        *,
        aggregator: str | None = None,
        kind: str | None = None,
        round: int | None = None,
        agent: str | None = None,
    ) -> list[ModelInfo]:
        """Stored models (newest first), as ``fedhive models list`` filters them."""
        store = self.reader()
        if kind == "best":
            best = self.best(project, aggregator)
            return [] if best is None else [best]
        found = store.list_models(
            project=project,
            aggregator=aggregator,
            kind=ModelKind(kind) if kind else None,
            round=round,
            agent=agent,
        )
        return found[::-1]

    def best(
        self, project: str, aggregator: str | None, metric: str | None = None
    ) -> ModelInfo | None:
        """The best model of ``aggregator`` (None if no model has the metric)."""
        try:
            return self.reader().best_model(project=project, aggregator=aggregator, metric=metric)
        except ModelNotFoundError:
            return None

    def performance(
        self,
        project: str,
        aggregator: str | None,
        metric: str | None = None,
        *,
        charts: bool = True,
    ) -> Performance:
        """Every recorded value of ``aggregator`` (the only one of the project when None),
        with a chart per metric (``charts``)."""
        store = self.reader()
        ref = store.resolve_aggregator(project=project, aggregator=aggregator, role="aggregator")
        points = store.metric_points(project=project, aggregator=ref.name, metric=metric)
        summaries = summarize(points)
        best = self.best(project, ref.name)
        keys = chart_keys(points, metric)
        drawn = [
            Chart(key, line_chart(plot_series(points, summaries, key), title=key,
                                  highlight=_highlight(best, key, summaries)))
            for key in (keys if charts else [])
        ]  # fmt: skip
        return Performance(ref, keys, points, summaries, best, drawn)

    def export(
        self,
        project: str,
        *,
        kind: str,
        fmt: str,
        aggregator: str | None = None,
        round: int | None = None,
        agent: str | None = None,
        metric: str | None = None,
    ) -> Export:
        """One stored model (its bytes checked against their hash) written in format ``fmt``
        to a temporary file, exactly as ``fedhive models download`` writes it."""
        if kind not in KINDS:
            raise StoreError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        if fmt not in FORMATS:
            raise StoreError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if kind == "best" and (round is not None or agent is not None):
            raise StoreError("the best model picks its own round and agent: drop round/agent")
        info, payload = self.reader().get_model(
            "best" if kind == "best" else ModelKind(kind),
            project=project,
            aggregator=aggregator,
            round=round,
            agent=agent,
            metric=metric,
        )
        export_fmt: ExportFormat = next(f for f in FORMATS if f == fmt)
        name = download_name(info, export_fmt, best=kind == "best")
        folder = Path(tempfile.mkdtemp(prefix="fedhive-download-"))
        try:
            path = export_model(payload, export_fmt, folder / name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return Export(info, path, name, export_fmt)


def download_name(info: ModelInfo, fmt: ExportFormat, *, best: bool = False) -> str:
    """``project-aggregator-kind-rN[-agent].suffix`` (``best-`` first for the best model)."""
    parts = [info.project, info.aggregator, info.kind.value, f"r{info.round}"]
    if info.agent:
        parts.append(info.agent)
    if best:
        parts.insert(0, "best")
    return "-".join(parts) + SUFFIXES[fmt]


def chart_keys(points: list[MetricPoint], metric: str | None) -> list[str]:
    """The metrics charted: ``metric``; else the agents' (and model) metrics first, then the
    aggregator's own (duration, bytes)."""
    if metric is not None:
        return [metric]
    shared = sorted({p.key for p in points if p.source != "aggregator"})
    own = sorted({p.key for p in points if p.source == "aggregator"} - set(shared))
    return shared + own


def _highlight(
    best: ModelInfo | None,
    key: str,
    summaries: list[MetricSummary],
) -> Highlight | None:
    """Where the best model sits on the chart of its metric: its agent's line for a local
    model, the global line for a round's model."""
    if best is None or best.metric != key or best.value is None:
        return None
    label = best.agent if best.kind in (ModelKind.LOCAL, ModelKind.REGIONAL) else GLOBAL_LABEL
    if label is None:
        return None
    if label == GLOBAL_LABEL:
        # The global line shows the figure measured on the model, else the agents' mean.
        value = next(
            (s.global_value for s in summaries
             if s.key == key and s.round == best.round and s.global_value is not None),
            best.value,
        )  # fmt: skip
    else:
        value = best.value
    text = f"best model: {best.kind.value} of round {best.round}"
    if best.agent:
        text += f" from {best.agent}"
    text += f" ({key} {best.value:.4g})"
    return Highlight(label, best.round, value, text)


__all__ = [
    "KINDS",
    "Chart",
    "Export",
    "NothingRecordedError",
    "Performance",
    "StoreAccess",
    "chart_keys",
    "download_name",
]
