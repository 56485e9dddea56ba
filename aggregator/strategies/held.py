"""Holding every model of a round, in bounded memory, for the robust methods.

Robust rules (median, Krum, geometric median...) need all models of a round at once. Each
model's float tensors are flattened into one vector, in the reference model's tensor order
(float32; float64 when the model has a float64 tensor, so nothing is rounded). Up to
``memory_budget_bytes`` the vectors live in memory; beyond it, further models spill to
``np.memmap`` files in a private temporary directory that :meth:`HeldModels.close` removes.
Kernels then walk the vectors in chunks over the parameters, so aggregation adds O(n · chunk).

Integer and bool tensors (BatchNorm ``num_batches_tracked``) are kept apart, as copies, and
never enter distances; each method applies its own rule to them as float64 values and rounds
back (:data:`~aggregator.strategies.base.INTEGER_RULE`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.strategies import kernels
from aggregator.strategies.base import (
    RoundAccumulator,
    Strategy,
    check_weight,
    is_float,
    round_back,
)
from aggregator.strategies.params import (
    bool_setting,
    float_setting,
    int_setting,
    optional_str_setting,
)
from common.codec import Array, Tensors
from common.errors import ConfigError, InvalidModelError, ModelMismatchError, StrategyError

#: Held models beyond this many bytes spill to disk (100 models of 10M float32 fit).
DEFAULT_MEMORY_BUDGET = 4 << 30

_COPY_BLOCK = 1 << 16


@dataclass(frozen=True, slots=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """Where each float tensor lives in the flat vector; the other tensors apart."""

    floats: tuple[TensorSlot, ...]
    others: tuple[TensorSlot, ...]
    unsupported: tuple[str, ...]
    size: int
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, reference: Tensors) -> FlatLayout:
        floats: list[TensorSlot] = []
        others: list[TensorSlot] = []
        unsupported: list[str] = []
        offset = 0
        wide = False
        for name, x in reference.items():
            size = int(x.size)
            if is_float(x):
                floats.append(TensorSlot(name, tuple(x.shape), x.dtype, offset, size))
                offset += size
                wide = wide or x.dtype == np.float64
            elif x.dtype.kind in "iub":
                others.append(TensorSlot(name, tuple(x.shape), x.dtype, 0, size))
            else:
                unsupported.append(name)
        dtype = np.dtype(np.float64 if wide else np.float32)
        return cls(tuple(floats), tuple(others), tuple(unsupported), offset, dtype)

    def check(self, tensors: Tensors) -> None:
        """Raise ModelMismatchError unless ``tensors`` has the reference's names/shapes/dtypes."""
        expected = {s.name for s in self.floats} | {s.name for s in self.others}
        expected |= set(self.unsupported)
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))
            extra = sorted(set(tensors) - expected)
            raise ModelMismatchError(f"tensor names differ: missing {missing}, extra {extra}")
        for slot in (*self.floats, *self.others):
            x = tensors[slot.name]
            if tuple(x.shape) != slot.shape or x.dtype != slot.dtype:
                raise ModelMismatchError(
                    f"tensor {slot.name!r} is {x.dtype}{list(x.shape)}, "
                    f"expected {slot.dtype}{list(slot.shape)}"
                )

    def flatten_into(self, tensors: Tensors, out: Array, *, check_finite: bool = True) -> None:
        """Copy the float tensors into ``out``; InvalidModelError on a NaN/Inf (in cache)."""
        for slot in self.floats:
            src = np.asarray(tensors[slot.name]).reshape(-1)
            dst = out[slot.offset : slot.offset + slot.size]
            for s in range(0, slot.size, _COPY_BLOCK):
                block = dst[s : s + _COPY_BLOCK]
                np.copyto(block, src[s : s + _COPY_BLOCK], casting="unsafe")
                if check_finite and not np.isfinite(block).all():
                    raise InvalidModelError(f"tensor {slot.name!r} has NaN or Inf values")

    def flatten(self, tensors: Tensors) -> Array:
        out = np.empty(self.size, dtype=self.dtype)
        self.flatten_into(tensors, out, check_finite=False)
        return out

    def unflatten(self, flat: Array) -> dict[str, Array]:
        """Float tensors from a flat vector (any float dtype), cast back to their dtypes."""
        return {
            s.name: round_back(flat[s.offset : s.offset + s.size].reshape(s.shape), s.dtype)
            for s in self.floats
        }


@dataclass(frozen=True, slots=True)
class Storage:
    """Where held models live: memory up to ``memory_budget_bytes`` (None: no limit), then disk."""

    memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET
    spill_dir: str | None = None

    @classmethod
    def checked(cls, method: str, memory_budget_bytes: Any, spill_dir: Any) -> Storage:
        budget = None
        if memory_budget_bytes is not None:
            budget = int_setting(method, "memory_budget_bytes", memory_budget_bytes, minimum=0)
        directory = optional_str_setting(method, "spill_dir", spill_dir)
        if directory is not None and not os.path.isdir(directory):
            raise ConfigError(f"{method}: spill_dir {directory!r} is not a directory")
        return cls(budget, directory)


@dataclass(frozen=True, slots=True)
class Weighting:
    """How the weighted robust rules (multi-Krum, RFA) turn sample counts into weights."""

    uniform_weights: bool = False
    max_weight_ratio: float | None = None

    @classmethod
    def checked(cls, method: str, uniform_weights: Any, max_weight_ratio: Any) -> Weighting:
        uniform = bool_setting(method, "uniform_weights", uniform_weights)
        ratio = None
        if max_weight_ratio is not None:
            ratio = float_setting(method, "max_weight_ratio", max_weight_ratio, ge=1.0)
            if uniform:
                raise ConfigError(f"{method}: set uniform_weights or max_weight_ratio, not both")
        return cls(uniform, ratio)

    def alpha(self, weights: Sequence[float] | Array) -> Array:
        return kernels.normalise_weights(
            weights, uniform=self.uniform_weights, max_ratio=self.max_weight_ratio
        )


class HeldModels:
    """The flat vectors, sample counts and integer tensors of the models added so far."""

    def __init__(self, layout: FlatLayout, storage: Storage) -> None:
        self.layout = layout
        self.rows: list[Array] = []
        self.weights: list[float] = []
        self.others: list[dict[str, Array]] = []
        self._storage = storage
        self._bytes_in_memory = 0
        self._spill_path: str | None = None
        self._cleanup: weakref.finalize[Any, Any] | None = None

    @property
    def spilled(self) -> int:
        """How many held models live in memory-mapped files."""
        return sum(isinstance(r, np.memmap) for r in self.rows)

    def add(self, tensors: Tensors, weight: float) -> None:
        self.layout.check(tensors)
        row = self._new_row()
        try:
            self.layout.flatten_into(tensors, row)
        except BaseException:
            self._discard(row)
            raise
        others = {s.name: np.array(tensors[s.name], copy=True) for s in self.layout.others}
        self._bytes_in_memory += sum(x.nbytes for x in others.values())
        self.rows.append(row)
        self.weights.append(weight)
        self.others.append(others)

    def _new_row(self) -> Array:
        nbytes = self.layout.size * self.layout.dtype.itemsize
        budget = self._storage.memory_budget_bytes
        if nbytes == 0 or budget is None or self._bytes_in_memory + nbytes <= budget:
            self._bytes_in_memory += nbytes
            return np.empty(self.layout.size, dtype=self.layout.dtype)
        if self._spill_path is None:
            self._spill_path = tempfile.mkdtemp(prefix="fedhive-held-", dir=self._storage.spill_dir)
            # Removes the files even if close() is never called.
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._spill_path, True)
        path = os.path.join(self._spill_path, f"model-{len(self.rows)}.bin")
        return np.memmap(path, dtype=self.layout.dtype, mode="w+", shape=(self.layout.size,))

    def _discard(self, row: Array) -> None:
        if isinstance(row, np.memmap):
            if row.filename is not None:
                os.remove(row.filename)  # unlinking a mapped file is fine on POSIX
        else:
            self._bytes_in_memory -= row.nbytes

    def close(self) -> None:
        self.rows.clear()
        self.others.clear()
        self.weights.clear()
        self._bytes_in_memory = 0
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
            self._spill_path = None


class HeldAccumulator(RoundAccumulator):
    """Holds the round's models; a method overrides :meth:`_aggregate` (and its requirement)."""

    def __init__(self, method: str, reference: Tensors, storage: Storage) -> None:
        self.method = method
        self._order = tuple(reference)
        self._layout = FlatLayout.of(reference)
        self._reference = self._layout.flatten(reference)
        self._held = HeldModels(self._layout, storage)
        self._closed = False

    # ----------------------------------------------------------------- RoundAccumulator
    def add(self, tensors: Tensors, num_samples: float) -> None:
        # Held models are checked for finiteness while they are copied in (no extra pass), so
        # add_finite stays add.
        if self._closed:
            raise StrategyError(f"{self.method}: the round's accumulator is closed")
        w = check_weight(num_samples)
        if w == 0:
            return
        self._held.add(tensors, w)

    @property
    def count(self) -> int:
        return len(self._held.rows)

    @property
    def spilled(self) -> int:
        return self._held.spilled

    def blocker(self) -> str | None:
        if self._closed:
            return "the round's accumulator is closed"
        if self._layout.unsupported:
            names = list(self._layout.unsupported)
            return f"{self.method} cannot aggregate complex tensors {names}"
        return super().blocker() or self._requirement(self.count)

    def result(self) -> dict[str, Array]:
        reason = self.blocker()
        if reason is not None:
            raise StrategyError(reason)
        parts = self._aggregate()
        return {name: parts[name] for name in self._order}

    def close(self) -> None:
        self._closed = True
        self._held.close()

    # ----------------------------------------------------------------- for the methods
    def _requirement(self, n: int) -> str | None:
        """Why the method cannot run on n models, or None."""
        return None

    @abstractmethod
    def _aggregate(self) -> dict[str, Array]:
        """The aggregate of the held models (the blocker has been checked)."""

    @property
    def _rows(self) -> list[Array]:
        return self._held.rows

    @property
    def _weights(self) -> list[float]:
        return self._held.weights

    def _sq_distances(self) -> Array:
        return kernels.pairwise_sq_distances(self._rows, self._reference)

    def _other_rows(self, name: str, indices: Sequence[int]) -> list[Array]:
        return [self._held.others[i][name].reshape(-1).astype(np.float64) for i in indices]

    def _selected(self, index: int) -> dict[str, Array]:
        """Model ``index`` as it was added (bit-identical)."""
        parts = self._layout.unflatten(self._rows[index])
        parts.update({s.name: self._held.others[index][s.name].copy() for s in self._layout.others})
        return parts

    def _combination(self, indices: Sequence[int], coeffs: Array) -> dict[str, Array]:
        """Σ coeffs_k · model_{indices_k}, in float64, cast back to the input dtypes."""
        rows = [self._rows[i] for i in indices]
        parts = self._layout.unflatten(kernels.weighted_sum(rows, coeffs))
        for s in self._layout.others:
            values = kernels.weighted_sum(self._other_rows(s.name, indices), coeffs)
            parts[s.name] = round_back(values.reshape(s.shape), s.dtype)
        return parts

    def _coordinatewise(
        self, rule: Callable[[list[Array]], Array], indices: Sequence[int] | None = None
    ) -> dict[str, Array]:
        """Apply a per-coordinate rule to the float vectors and to each integer tensor."""
        chosen = range(self.count) if indices is None else indices
        parts = self._layout.unflatten(rule([self._rows[i] for i in chosen]))
        for s in self._layout.others:
            values = rule(self._other_rows(s.name, chosen))
            parts[s.name] = round_back(values.reshape(s.shape), s.dtype)
        return parts


class HeldStrategy(Strategy):
    """A method that needs all models of a round; settings shared by all of them."""

    def __init__(
        self,
        *,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | None = None,
    ) -> None:
        self.storage = Storage.checked(self.name, memory_budget_bytes, spill_dir)

    def settings(self) -> dict[str, Any]:
        return {
            "memory_budget_bytes": self.storage.memory_budget_bytes,
            "spill_dir": self.storage.spill_dir,
        }

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings()}


class WeightedHeldStrategy(HeldStrategy):
    """A held method whose final average is weighted by (optionally capped) sample counts."""

    def __init__(
        self,
        *,
        uniform_weights: bool = False,
        max_weight_ratio: float | None = None,
        memory_budget_bytes: int | None = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | None = None,
    ) -> None:
        super().__init__(memory_budget_bytes=memory_budget_bytes, spill_dir=spill_dir)
        self.weighting = Weighting.checked(self.name, uniform_weights, max_weight_ratio)

    def settings(self) -> dict[str, Any]:
        return {
            "uniform_weights": self.weighting.uniform_weights,
            "max_weight_ratio": self.weighting.max_weight_ratio,
            **super().settings(),
        }
