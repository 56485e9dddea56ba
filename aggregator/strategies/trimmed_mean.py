"""Coordinate-wise trimmed mean (Yin et al. 2018): unweighted; needs 0 <= 2·trim < n."""

from __future__ import annotations

from typing import Any, ClassVar

from aggregator.strategies import kernels
from aggregator.strategies.held import DEFAULT_MEMORY_BUDGET, HeldAccumulator, HeldStrategy, Storage
from aggregator.strategies.params import int_setting
from common.codec import Array, Tensors


class TrimmedMeanAccumulator(HeldAccumulator):
    def __init__(self, method: str, reference: Tensors, storage: Storage, *, trim: int) -> None:
        super().__init__(method, reference, storage)
        self.trim = trim

    def _requirement(self, n: int) -> str | None:
        return kernels.trim_requirement(n, self.trim)

    def _aggregate(self) -> dict[str, Array]:
        return self._coordinatewise(lambda rows: kernels.trimmed_mean(rows, self.trim))


class TrimmedMean(HeldStrategy):
    """Per coordinate, drop the ``trim`` largest and ``trim`` smallest values, average the rest.

    Settings: ``trim`` (int >= 0, default 1): values dropped at each end; a round needs more
    than 2·trim models.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(
        self,
        *,
        trim: int = 1,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__(memory_budget_bytes=memory_budget_bytes, spill_dir=spill_dir)
        self.trim = int_setting(self.name, "trim", trim, minimum=0)

    def settings(self) -> dict[str, Any]:
        return {"trim": self.trim, **super().settings()}

    def begin(self, reference: Tensors) -> TrimmedMeanAccumulator:
        return TrimmedMeanAccumulator(self.name, reference, self.storage, trim=self.trim)
