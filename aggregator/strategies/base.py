"""The small interface every aggregation method implements.

A :class:`Strategy` is configured once (from the aggregator config) and may keep state across
rounds (server optimizers do). Each round the round engine calls :meth:`Strategy.begin` with the
current global model and gets a :class:`RoundAccumulator`; it feeds every accepted local model to
:meth:`RoundAccumulator.add` as it arrives, asks :meth:`RoundAccumulator.blocker` whether the
method can run on what it holds, and calls :meth:`RoundAccumulator.result` to aggregate.
The maths live in pure functions (``kernels``); these classes only orchestrate them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from common.codec import Array, Tensors
from common.errors import InvalidModelError

#: The rule for integer and bool tensors (e.g. BatchNorm ``num_batches_tracked``): the weighted
#: mean computed in float64, rounded half-to-even, cast back to the tensor's dtype. Robust methods
#: apply their rule to the integers as float64 values and round the same way.
INTEGER_RULE = "weighted mean in float64, rounded half-to-even, cast back to the input dtype"


def is_float(array: Array) -> bool:
    """True for tensors that are averaged as floats (float16/bfloat16/32/64)."""
    return array.dtype.kind == "f" or array.dtype.name == "bfloat16"


def round_back(values: Array, dtype: np.dtype[Any]) -> Array:
    """Cast a float64 aggregate back to ``dtype`` following :data:`INTEGER_RULE`.

    Always an ndarray, also for 0-d tensors (where NumPy arithmetic yields scalars).
    """
    if dtype.kind in "iub":
        return np.asarray(np.rint(values).astype(dtype))
    return np.asarray(np.asarray(values).astype(dtype))


def check_weight(num_samples: float) -> float:
    """Validate a sample count: finite and >= 0 (0 drops the model)."""
    w = float(num_samples)
    if not np.isfinite(w) or w < 0:
        raise InvalidModelError(f"sample count must be finite and >= 0, got {num_samples!r}")
    return w


class RoundAccumulator(ABC):
    """Holds (or folds) the local models of one round."""

    @abstractmethod
    def add(self, tensors: Tensors, num_samples: float) -> None:
        """Take one validated local model; the caller keeps no reference it relies on.
        Non-finite values raise InvalidModelError, and the model leaves no trace."""

    def add_finite(self, tensors: Tensors, num_samples: float) -> None:
        """:meth:`add` for a model whose values the caller has checked are all finite (the
        round engine does): a method that would scan the whole model again for them need
        not (FedAvg). By default, :meth:`add`."""
        self.add(tensors, num_samples)

    @property
    @abstractmethod
    def count(self) -> int:
        """How many models (with a positive weight) were added."""

    def blocker(self) -> str | None:
        """Why the method cannot aggregate what it holds now, or None when it can."""
        return None if self.count > 0 else "no model with a positive sample count"

    @abstractmethod
    def result(self) -> dict[str, Array]:
        """The aggregate, in the input dtypes; raises StrategyError when :meth:`blocker` says so."""

    def close(self) -> None:  # noqa: B027 - optional hook: release memory maps / spill files
        """Release what the accumulator holds."""


class Strategy(ABC):
    """An aggregation method with its settings."""

    name: ClassVar[str]

    @abstractmethod
    def begin(self, reference: Tensors) -> RoundAccumulator:
        """Open a round whose local models were trained from ``reference``."""

    def describe(self) -> dict[str, Any]:
        """Name and settings, for status messages and round records."""
        return {"name": self.name}


def as_float64_copy(tensors: Mapping[str, Array]) -> dict[str, Array]:
    return {k: np.asarray(v, dtype=np.float64).copy() for k, v in tensors.items()}
