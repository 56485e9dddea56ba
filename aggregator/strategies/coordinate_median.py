"""Coordinate-wise median (Yin et al. 2018): unweighted, chunked over the parameters."""

from __future__ import annotations

from typing import ClassVar

from aggregator.strategies import kernels
from aggregator.strategies.held import HeldAccumulator, HeldStrategy
from common.codec import Array, Tensors


class CoordinateMedianAccumulator(HeldAccumulator):
    def _aggregate(self) -> dict[str, Array]:
        return self._coordinatewise(kernels.coordinate_median)


class CoordinateMedian(HeldStrategy):
    """Per coordinate, the median of the models (even n: mean of the two middle values)."""

    name: ClassVar[str] = "coordinate_median"

    def begin(self, reference: Tensors) -> CoordinateMedianAccumulator:
        return CoordinateMedianAccumulator(self.name, reference, self.storage)
