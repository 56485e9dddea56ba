"""FedAvg: the sample-weighted mean, folded in as models arrive (O(P) memory).

The running sum is float64, so folding one float32 model moves 4 B in and 16 B of accumulator
(read and write) per parameter. Folding a group of up to ``_GROUP`` arrived models in one pass
over the accumulator cuts that to 4 + 16/k bytes: pending models are held by reference (the
caller of ``add`` keeps no reference it relies on) and folded when the group is full, when it
holds more than ``_GROUP_BYTES`` and more than the accumulator would take (twice a float32
model), or at ``result()``. Memory stays O(P) whatever the number of models.

``result()`` writes the mean straight into the frame it will travel in (``codec.new_frame``),
block by block: no float64 copy of the model, no separate encode. A round whose models all
fit one group (say 2 agents with a 1 GB model) never allocates the float64 sum at all, and
writes the mean over the first model's own frame when it has the output's layout (the models
are the accumulator's to use up): the round then needs no memory beyond the models it got.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies.base import RoundAccumulator, Strategy, check_weight, round_back
from common.codec import Array, Tensors, all_finite, dtype_name, frame_of, new_frame, new_zeros
from common.errors import InvalidModelError, ModelMismatchError, StrategyError

_GROUP = 8
_GROUP_BYTES = 512 << 20
# (group × block) float64 temporaries (2 MiB) stay in cache.
_BLOCK = 1 << 15


def fold_group(acc: Array, xs: Sequence[Array], weights: Sequence[float]) -> None:
    """acc += Σ_k weights_k · xs_k, with ``acc`` float64 (complex128 for complex data).

    One pass over ``acc`` in cache-sized blocks; each block of the group is cast into a
    float64 scratch and reduced with one BLAS matrix-vector product.
    """
    flat_acc = acc.reshape(-1)
    for start, stop, total in _weighted_blocks(acc.dtype, flat_acc.shape[0], xs, weights):
        flat_acc[start:stop] += total


def _weighted_blocks(
    wide: np.dtype[Any], n: int, xs: Sequence[Array], weights: Sequence[float]
) -> Iterator[tuple[int, int, Array]]:
    """(start, stop, Σ_k weights_k · xs_k[start:stop]) in ``wide`` for cache-sized blocks; the
    block array is reused: use it before the next one is made."""
    flats = [x.reshape(-1) for x in xs]
    w = np.asarray(weights, dtype=np.float64)
    scratch = np.empty((len(flats), min(_BLOCK, n)), dtype=wide)
    total = np.empty(min(_BLOCK, n), dtype=wide)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        if flats:
            block = scratch[:, : stop - start]
            for i, x in enumerate(flats):
                np.copyto(block[i], x[start:stop], casting="unsafe")
            np.matmul(w, block, out=total[: stop - start])
        else:
            total[: stop - start] = 0
        yield start, stop, total[: stop - start]


def fold_weighted(acc: Array, x: Array, weight: float) -> None:
    """acc += weight * x, with ``acc`` float64 and ``x`` any numeric dtype, in blocks."""
    fold_group(acc, [x], [weight])


class FedAvgAccumulator(RoundAccumulator):
    """Running float64 sums per tensor; the first model fixes the names and shapes."""

    def __init__(self) -> None:
        self._sums: dict[str, Array] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._pending: list[tuple[dict[str, Array], float]] = []
        self._pending_bytes = 0
        self._total = 0.0
        self._count = 0
        self._closed = False
        self._folded = False  # whether the float64 sums hold anything (else they are untouched)

    def add(self, tensors: Tensors, num_samples: float) -> None:
        self._add(tensors, num_samples, finite=False)

    def add_finite(self, tensors: Tensors, num_samples: float) -> None:
        self._add(tensors, num_samples, finite=True)

    def _add(self, tensors: Tensors, num_samples: float, *, finite: bool) -> None:
        if self._closed:
            raise StrategyError("fedavg: the round's accumulator is closed")
        w = check_weight(num_samples)
        if w == 0:
            return
        model = {name: np.asarray(x) for name, x in tensors.items()}
        self._check(model, finite=finite)
        if not self._sums:
            for name, x in model.items():
                wide = np.complex128 if x.dtype.kind == "c" else np.float64
                self._sums[name] = new_zeros(x.shape, wide)
                self._dtypes[name] = x.dtype
        self._pending.append((model, w))
        self._pending_bytes += sum(x.nbytes for x in model.values())
        self._total += w
        self._count += 1
        # Holding models costs memory; folding them costs the float64 sum (twice a float32
        # model) once: fold when the group is full or holds more than both.
        wide_bytes = sum(acc.nbytes for acc in self._sums.values())
        if len(self._pending) >= _GROUP or self._pending_bytes > max(_GROUP_BYTES, wide_bytes):
            self._fold()

    def _check(self, model: dict[str, Array], *, finite: bool = False) -> None:
        if self._sums:
            if model.keys() != self._sums.keys():
                missing = sorted(self._sums.keys() - model.keys())
                extra = sorted(model.keys() - self._sums.keys())
                raise ModelMismatchError(f"tensor names differ: missing {missing}, extra {extra}")
            for name, x in model.items():
                if x.shape != self._sums[name].shape or x.dtype != self._dtypes[name]:
                    raise ModelMismatchError(
                        f"tensor {name!r} is {x.dtype}{list(x.shape)}, "
                        f"expected {self._dtypes[name]}{list(self._sums[name].shape)}"
                    )
        if finite:
            return
        for name, x in model.items():
            if not all_finite(x):
                raise InvalidModelError(f"tensor {name!r} has NaN or Inf values")

    def _fold(self) -> None:
        if not self._pending:
            return
        weights = [w for _, w in self._pending]
        for name, acc in self._sums.items():
            fold_group(acc, [model[name] for model, _ in self._pending], weights)
        self._pending.clear()
        self._pending_bytes = 0
        self._folded = True

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    @property
    def dtypes(self) -> dict[str, np.dtype[Any]]:
        """The input dtype of each tensor (the result is cast back to it)."""
        return dict(self._dtypes)

    def blocker(self) -> str | None:
        if self._closed:
            return "the round's accumulator is closed"
        return super().blocker()

    def mean(self) -> dict[str, Array]:
        """Σ α_i x_i per tensor in float64 (complex128 for complex tensors), before casting."""
        reason = self.blocker()
        if reason is not None:
            raise StrategyError(f"fedavg cannot aggregate: {reason}")
        self._fold()
        means = {name: acc / self._total for name, acc in self._sums.items()}
        for name, m in means.items():
            if not all_finite(m):
                raise StrategyError(f"fedavg cannot aggregate: tensor {name!r} overflowed")
        return means

    def result(self) -> dict[str, Array]:
        """The mean in the input dtypes, as the views of a frame (``codec.new_frame``) it was
        written into block by block: ``codec.encode_frame`` of it copies nothing."""
        reason = self.blocker()
        if reason is not None:
            raise StrategyError(f"fedavg cannot aggregate: {reason}")
        out = self._reusable_frame()
        if out is None:
            _, out = new_frame(
                (name, dtype_name(self._dtypes[name]), acc.shape)
                for name, acc in self._sums.items()
            )
        else:
            self._closed = True  # the first model is overwritten by the mean: no second result
        weights = [w for _, w in self._pending]
        for name, acc in self._sums.items():
            flat_out = out[name].reshape(-1)
            flat_acc = acc.reshape(-1)
            xs = [model[name] for model, _ in self._pending]
            for start, stop, total in _weighted_blocks(acc.dtype, flat_acc.shape[0], xs, weights):
                if self._folded:
                    total += flat_acc[start:stop]
                total /= self._total
                if not all_finite(total):
                    raise StrategyError(f"fedavg cannot aggregate: tensor {name!r} overflowed")
                flat_out[start:stop] = round_back(total, self._dtypes[name])
        return out

    def _reusable_frame(self) -> dict[str, Array] | None:
        """The first pending model, if the mean can be written over it: nothing was folded
        yet (every model is still pending), and its tensors are a writable frame laid out as
        the result's would be. Each block is read before it is written, so this is safe."""
        if self._folded or not self._pending:
            return None
        first = self._pending[0][0]
        model = {name: first[name] for name in self._sums}
        if not all(x.flags.writeable and x.dtype == self._dtypes[n] for n, x in model.items()):
            return None
        return model if frame_of(model) is not None else None

    def close(self) -> None:
        self._closed = True
        self._pending.clear()
        self._sums.clear()


class FedAvg(Strategy):
    """Weighted mean by sample counts (McMahan et al. 2017); streaming."""

    name: ClassVar[str] = "fedavg"

    def begin(self, reference: Tensors) -> FedAvgAccumulator:
        return FedAvgAccumulator()
