"""Bulyan (El Mhamdi et al. 2018): Krum selection, then a coordinate-wise trimmed average.

θ = n − 2f models are chosen by Krum repeated on the shrinking set (distances computed once);
then per coordinate the mean of the β = θ − 2f values closest to the median. Unweighted; needs
n >= 4f+3.
"""

from __future__ import annotations

from typing import Any, ClassVar

from aggregator.strategies import kernels
from aggregator.strategies.held import DEFAULT_MEMORY_BUDGET, HeldAccumulator, HeldStrategy, Storage
from aggregator.strategies.params import int_setting
from common.codec import Array, Tensors


class BulyanAccumulator(HeldAccumulator):
    def __init__(self, method: str, reference: Tensors, storage: Storage, *, f: int) -> None:
        super().__init__(method, reference, storage)
        self.f = f
        #: Indices (in order of arrival) of the θ models the last result() kept.
        self.selection: tuple[int, ...] = ()

    def _requirement(self, n: int) -> str | None:
        return kernels.bulyan_requirement(n, self.f)

    def _aggregate(self) -> dict[str, Array]:
        chosen = kernels.bulyan_select(self._sq_distances(), self.f)
        self.selection = tuple(sorted(int(i) for i in chosen))
        return self._coordinatewise(
            lambda rows: kernels.bulyan_coordinates(rows, self.f), self.selection
        )


class Bulyan(HeldStrategy):
    """Bulyan over Krum.

    Settings: ``f`` (int >= 0, default 1): Byzantine models tolerated; a round needs
    n >= 4f+3 models.
    """

    name: ClassVar[str] = "bulyan"

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

    def begin(self, reference: Tensors) -> BulyanAccumulator:
        return BulyanAccumulator(self.name, reference, self.storage, f=self.f)
