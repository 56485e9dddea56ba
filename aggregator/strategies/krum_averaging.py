"""Multi-Krum: the weighted mean of the m best Krum-scored models (default m = n − f).

Needs n >= 2f+3 and 1 <= m <= n − f. With f = 0 and m = n it is FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from aggregator.strategies import kernels
from aggregator.strategies.held import (
    DEFAULT_MEMORY_BUDGET,
    HeldAccumulator,
    Storage,
    WeightedHeldStrategy,
    Weighting,
)
from aggregator.strategies.params import int_setting, optional_int_setting
from common.codec import Array, Tensors


class KrumAveragingAccumulator(HeldAccumulator):
    def __init__(
        self,
        method: str,
        reference: Tensors,
        storage: Storage,
        *,
        f: int,
        m: int | None,
        weighting: Weighting,
    ) -> None:
        super().__init__(method, reference, storage)
        self.f = f
        self.m = m
        self.weighting = weighting
        #: Indices (in order of arrival) of the models the last result() averaged.
        self.selection: tuple[int, ...] = ()

    def _requirement(self, n: int) -> str | None:
        reason = kernels.krum_requirement(n, self.f, self.method)
        if reason is None and self.m is not None and self.m > n - self.f:
            need = self.m + self.f
            reason = f"{self.method} with m = {self.m} needs n >= m+f = {need} models, has {n}"
        return reason

    def _aggregate(self) -> dict[str, Array]:
        m = self.count - self.f if self.m is None else self.m
        chosen = np.sort(kernels.krum_select(self._sq_distances(), self.f, m))
        self.selection = tuple(int(i) for i in chosen)
        alpha = self.weighting.alpha([self._weights[i] for i in self.selection])
        return self._combination(self.selection, alpha)


class KrumAveraging(WeightedHeldStrategy):
    """Average the ``m`` models with the best Krum scores, weighted by sample counts.

    Settings: ``f`` (int >= 0, default 1); ``m`` (int >= 1, default None: n − f);
    ``uniform_weights`` (default False) or ``max_weight_ratio`` (>= 1: cap each weight at that
    multiple of the median weight).
    """

    name: ClassVar[str] = "krum_averaging"

    def __init__(
        self,
        *,
        f: int = 1,
        m: int | None = None,
        uniform_weights: bool = False,
        max_weight_ratio: float | None = None,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__(
            uniform_weights=uniform_weights,
            max_weight_ratio=max_weight_ratio,
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=spill_dir,
        )
        self.f = int_setting(self.name, "f", f, minimum=0)
        self.m = optional_int_setting(self.name, "m", m, minimum=1)

    def settings(self) -> dict[str, Any]:
        return {"f": self.f, "m": self.m, **super().settings()}

    def begin(self, reference: Tensors) -> KrumAveragingAccumulator:
        return KrumAveragingAccumulator(
            self.name, reference, self.storage, f=self.f, m=self.m, weighting=self.weighting
        )
