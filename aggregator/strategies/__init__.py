"""Aggregation methods, one per module, behind :class:`~aggregator.strategies.base.Strategy`.

Streaming (O(P) memory): ``fedavg`` and the server optimizers ``fedavgm``, ``fedadam``,
``fedyogi``, ``fedadagrad``. Holding all models of a round (memory budget, spill to disk):
``coordinate_median``, ``trimmed_mean``, ``krum``, ``krum_averaging``, ``geometric_median``,
``bulyan``. The maths live in :mod:`aggregator.strategies.kernels`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from aggregator.strategies.base import INTEGER_RULE, RoundAccumulator, Strategy
from aggregator.strategies.bulyan import Bulyan
from aggregator.strategies.coordinate_median import CoordinateMedian
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.geometric_median import GeometricMedian
from aggregator.strategies.krum import Krum
from aggregator.strategies.krum_averaging import KrumAveraging
from aggregator.strategies.server_opt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from aggregator.strategies.trimmed_mean import TrimmedMean
from common.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        CoordinateMedian,
        TrimmedMean,
        Krum,
        KrumAveraging,
        GeometricMedian,
        Bulyan,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
    )
}


def settings_of(name: str) -> tuple[str, ...]:
    """The settings method ``name`` accepts (its keyword-only constructor parameters)."""
    parameters = inspect.signature(STRATEGIES[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def create_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build the strategy ``name`` with ``params``; ConfigError names what is wrong."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(f"unknown aggregation method {name!r}; known: {known}") from None
    given = dict(params or {})
    accepted = settings_of(name)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(map(repr, unknown))} for {name!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    try:
        return cls(**given)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters for {name!r}: {exc}") from exc


__all__ = [
    "INTEGER_RULE",
    "STRATEGIES",
    "RoundAccumulator",
    "Strategy",
    "create_strategy",
    "settings_of",
]
