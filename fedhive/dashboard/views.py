"""Shapes shared by the pages and the JSON API: the live overview, stored models and metrics,
control requests, and the small formatting helpers the templates use."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field

from aggregator.store import MetricPoint, MetricSummary, ModelInfo
from common.messages import AggStatusMessage, ControlCommand, ControlReply, SgStatusMessage
from fedhive.dashboard.live import LiveSnapshot


class OverviewOut(BaseModel):
    """What the broker says now: every aggregator's status and the SG layer's."""

    project: str
    connected: bool = Field(description="whether the dashboard is connected to the broker")
    error: str | None = Field(default=None, description="why it is not, if it is not")
    server_time: float = Field(description="the server's clock (epoch s), to age statuses by")
    aggregators: list[AggStatusMessage]
    sg: SgStatusMessage | None = None


AgentsShown = Literal["all", "none"] | str


def overview(project: str, snap: LiveSnapshot, *, agents: AgentsShown = "all") -> OverviewOut:
    """The snapshot as the API shows it; ``agents``: whose agent tables to include (``all``,
    ``none`` or one aggregator's name), so a page's stream carries only what it shows."""
    statuses = list(snap.aggregators.values())
    if agents != "all":
        statuses = [
            s if s.sender == agents else s.model_copy(update={"agents": []}) for s in statuses
        ]
    return OverviewOut(
        project=project,
        connected=snap.connected,
        error=snap.error,
        server_time=snap.now,
        aggregators=statuses,
        sg=snap.sg,
    )


class ModelOut(BaseModel):
    """One stored model (its bytes are downloaded separately)."""

    id: int
    project: str
    aggregator: str
    kind: str
    round: int
    agent: str | None
    num_samples: float
    sha256: str
    size: int
    framework: str
    created: float
    pruned: bool
    metric: str | None = Field(default=None, description="best model: the metric ranked by")
    value: float | None = Field(default=None, description="best model: its value")

    @classmethod
    def of(cls, info: ModelInfo) -> ModelOut:
        return cls.model_validate(info.to_json())


class MetricSummaryOut(BaseModel):
    """One metric in one completed round: mean/min/max of the values and the global figure."""

    model_config = ConfigDict(populate_by_name=True)

    round: int
    key: str
    source: str
    count: int
    mean: float
    min: float
    max: float
    global_value: float | None = Field(default=None, alias="global")
    values: dict[str, float]

    @classmethod
    def of(cls, summary: MetricSummary) -> MetricSummaryOut:
        return cls.model_validate(summary.to_json())


class MetricPointOut(BaseModel):
    """One recorded value: an agent's, the aggregator's own, or measured on the round's model."""

    round: int
    key: str
    source: str
    agent: str | None
    value: float

    @classmethod
    def of(cls, point: MetricPoint) -> MetricPointOut:
        return cls(
            round=point.round,
            key=point.key,
            source=point.source,
            agent=point.agent,
            value=point.value,
        )


class MetricsOut(BaseModel):
    project: str
    aggregator: str
    summaries: list[MetricSummaryOut]
    points: list[MetricPointOut]
    best: ModelOut | None = None


class ControlIn(BaseModel):
    """A control request, as ``fedhive round complete`` / ``set ...`` / ``aggregator stop``
    send it."""

    model_config = ConfigDict(extra="forbid")

    command: ControlCommand
    value: float | int | str | None = Field(
        default=None,
        description="threshold (0, 1], timeout seconds, method name or max agents",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="set_method's settings")


class ControlOut(BaseModel):
    """The aggregator's answer (``ok`` false: refused, with the reason)."""

    aggregator: str
    reply: ControlReply


# ------------------------------------------------------------------ formatting
def ago(seconds: float | None) -> str:
    """``4.2 s ago``, ``3 min ago``, ``2.5 h ago``; ``-`` for None."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def num(value: float) -> str:
    """Six significant digits, as the pages' script writes numbers."""
    return f"{value:.6g}"


def seconds_setting(value: float) -> str:
    if value == 0:
        return "disabled"
    return "never" if math.isinf(value) else f"{value:.6g} s"


def limit(value: int) -> str:
    return str(value) if value else "no limit"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def input_number(value: float) -> str:
    """A number for an ``<input type=number>`` (blank for infinity)."""
    return f"{value:g}" if math.isfinite(value) else ""


def when(epoch: float) -> str:
    """A stored timestamp, UTC."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def query(**params: Any) -> str:
    """A URL query string of the parameters that are set."""
    return urlencode({k: v for k, v in params.items() if v is not None and v != ""})


FILTERS = {
    "num": num,
    "input_number": input_number,
    "when": when,
    "ago": ago,
    "size": size,
    "seconds_setting": seconds_setting,
    "limit": limit,
    "number": number,
}

__all__ = [
    "FILTERS",
    "ControlIn",
    "ControlOut",
    "MetricPointOut",
    "MetricSummaryOut",
    "MetricsOut",
    "ModelOut",
    "OverviewOut",
    "ago",
    "overview",
]
