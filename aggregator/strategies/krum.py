"""Krum (Blanchard et al. 2017): the model closest to its n−f−2 nearest neighbours.

Unweighted; needs n >= 2f+3 (refused otherwise, never silently accepted). The output is the
selected model itself, bit-identical; its integer tensors come with it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aggregator.strategies import kernels
from aggregator.strategies.held import DEFAULT_MEMORY_BUDGET, HeldAccumulator, HeldStrategy, Storage
from aggregator.strategies.params import int_setting
from common.codec import Array, Tensors


class KrumAccumulator(HeldAccumulator):
    def __init__(self, method: str, reference: Tensors, storage: Storage, *, f: int) -> None:
        super().__init__(method, reference, storage)
        self.f = f
        #: Indices (in order of arrival) of the model(s) the last result() chose.
        self.selection: tuple[int, ...] = ()

    def _requirement(self, n: int) -> str | None:
        return kernels.krum_requirement(n, self.f, self.method)

    def _aggregate(self) -> dict[str, Array]:
        best = int(kernels.krum_select(self._sq_distances(), self.f, 1)[0])
        self.selection = (best,)
        return self._selected(best)


class Krum(HeldStrategy):
    """Select the model with the smallest Krum score.

    Settings: ``f`` (int >= 0, default 1): Byzantine models tolerated; a round needs
    n >= 2f+3 models.
    """

    name: ClassVar[str] = "krum"

    def __init__(
        self,
        *,
        f: int = 1,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__(memory_budget_bytes=memory_budget_bytes, spill_dir=spill_dir)
        self.f = int_setting(self.name, "f", f, minimum=0)

    def settings(self) -> dict[str, Any]:
        return {"f": self.f, **super().settings()}

    def begin(self, reference: Tensors) -> KrumAccumulator:
        return KrumAccumulator(self.name, reference, self.storage, f=self.f)
