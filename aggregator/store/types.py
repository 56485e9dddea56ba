"""What the store hands out: plain frozen records (never ORM rows), the retention setting and
the best-model rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from aggregator.store.errors import StoreError
from common.messages import ModelKind

#: Which local models outlive their round: every one, none, or those of the last K rounds.
Retention = Literal["all", "none"] | int


def parse_retention(value: str | int) -> Retention:
    """``"all"``, ``"none"`` or a round count K ≥ 0 (as an int or its decimal text)."""
    if isinstance(value, bool):
        raise StoreError(f"retention must be 'all', 'none' or a round count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise StoreError(f"retention must keep >= 0 rounds, got {value}")
        return value
    text = value.strip().lower()
    if text == "all":
        return "all"
    if text == "none":
        return "none"
    if text.isascii() and text.isdecimal():
        return int(text)
    raise StoreError(f"retention must be 'all', 'none' or a round count, got {value!r}")


def lower_is_better(metric: str) -> bool:
    """Losses (``loss`` and every ``loss_*`` key) are better lower; everything else higher."""
    return metric == "loss" or metric.startswith("loss_")


@dataclass(frozen=True, slots=True)
class MetricRule:
    """How models are ranked: by ``metric``, higher or lower better."""

    metric: str = "accuracy"
    higher_is_better: bool = True

    @classmethod
    def for_metric(cls, metric: str, higher_is_better: bool | None = None) -> MetricRule:
        """The rule for ``metric``; the direction defaults to :func:`lower_is_better`."""
        if higher_is_better is None:
            higher_is_better = not lower_is_better(metric)
        return cls(metric, higher_is_better)

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` strictly beats ``than`` (anything beats None)."""
        if than is None:
            return True
        return value > than if self.higher_is_better else value < than

    def sort_key(self, value: float) -> float:
        """Ascending sort puts the best first."""
        return -value if self.higher_is_better else value


class Contributor(Protocol):
    """What :meth:`Store.complete_round` needs of each contributor (the engine's
    ``Contribution`` fits)."""

    @property
    def agent(self) -> str: ...

    @property
    def num_samples(self) -> float: ...


@dataclass(frozen=True, slots=True)
class AggregatorRef:
    """An aggregator's row, as :meth:`Store.ensure_aggregator` returns it."""

    id: int
    project: str
    name: str
    role: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One stored model (its bytes are read separately)."""

    id: int
    project: str
    aggregator: str
    kind: ModelKind
    round: int
    agent: str | None
    num_samples: float
    sha256: str
    size: int
    framework: str
    created: float
    #: Retention removed its bytes.
    pruned: bool = False
    #: For the best model: the metric it was ranked by and its value.
    metric: str | None = None
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        return data


@dataclass(frozen=True, slots=True)
class RecoveredLocal:
    """A local model accepted in the open round before a restart."""

    agent: str
    num_samples: float
    metrics: Mapping[str, float]
    payload: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class SealedRound:
    """The open round of an aggregator under an sg-aggregator whose regional result was
    produced (and recorded) but whose SG model had not arrived: it takes no more models."""

    round: int
    payload: bytes
    sha256: str
    method: str
    #: (contributor, sample count) in the order they were counted.
    contributors: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class RecoveredState:
    """Where an aggregator stood: its current model and the open round's accepted models."""

    #: The current model's round (0: the base model) and bytes: the last global (or SG) model
    #: it produced, the last SG model it adopted from its sg-aggregator, or the base model.
    model_round: int
    model_kind: ModelKind
    model_payload: bytes
    model_sha256: str
    framework: str
    #: None when the aggregator joined its federation after round 0 (it adopted a later SG
    #: model first) and never saw the base model.
    base_sha256: str | None
    #: The round being collected (``model_round + 1``).
    open_round: int
    #: Accepted local models of the open round, in the order they were accepted.
    locals: tuple[RecoveredLocal, ...]
    #: The method and contributors (name, sample count) of the round that produced the current
    #: model; none for the base model and for adopted SG models.
    method: str | None = None
    contributors: tuple[tuple[str, float], ...] = ()
    #: The open round's regional result, when it was already produced (no locals then).
    sealed: SealedRound | None = None


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One value: an agent's (``source`` agent), the aggregator's own (``aggregator``), or one
    measured on the round's result model (``model``)."""

    round: int
    key: str
    source: str
    agent: str | None
    value: float
    #: The sample count of the model the value belongs to (agents' values), for weighting.
    weight: float | None = None


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """One metric in one completed round: mean/min/max over its values and the global figure
    (measured on the round's model if recorded, else the sample-weighted mean of the agents)."""

    round: int
    key: str
    source: str
    count: int
    mean: float
    min: float
    max: float
    global_value: float | None
    values: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["global"] = data.pop("global_value")
        data["values"] = dict(self.values)
        return data


def check_metrics(metrics: Mapping[str, float], *, key_length: int) -> dict[str, float]:
    """Finite floats under string keys of at most ``key_length`` characters; StoreError if not."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        # What the wire format admits (common.messages.Metrics), so an accepted model is
        # always recordable: an empty name too.
        if not isinstance(key, str) or len(key) > key_length:
            raise StoreError(f"metric name must be at most {key_length} characters, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StoreError(f"metric {key!r} must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise StoreError(f"metric {key!r} is not finite: {value!r}")
        out[key] = number
    return out
