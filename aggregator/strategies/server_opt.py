"""Server optimizers over the FedAvg aggregate: FedAvgM (Hsu et al. 2019), FedAdam, FedYogi,
FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

Each round, Δ = FedAvg(models) − reference (float64, per tensor), the model the round started
from. An optimizer turns Δ into a step using state it keeps across rounds in the Strategy
object (momentum m, second moment v); the new model is reference + step, computed as
avg + (step − Δ) so that a step equal to Δ (FedAvgM with lr 1, momentum 0) returns FedAvg's
result bit for bit. State is committed only when a round's result is produced. Integer and bool
tensors follow FedAvg's rule (:data:`~aggregator.strategies.base.INTEGER_RULE`), no optimizer.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import numpy as np

from aggregator.strategies.base import RoundAccumulator, Strategy, is_float, round_back
from aggregator.strategies.fedavg import FedAvgAccumulator
from aggregator.strategies.params import float_setting, fraction_setting
from common.codec import Array, Tensors, all_finite
from common.errors import StrategyError

State = dict[str, Array]


class ServerOptimizer(Strategy):
    """FedAvg followed by an optimizer step on the aggregate delta; a variant overrides
    :meth:`step`."""

    def __init__(self, *, lr: float) -> None:
        self.lr = float_setting(self.name, "lr", lr, gt=0.0)
        self._state: dict[str, State] = {}
        #: Rounds aggregated so far (the optimizer's step count).
        self.rounds = 0

    @abstractmethod
    def step(self, delta: Array, state: State) -> tuple[Array, State]:
        """The step for one tensor and its new state; ``state`` is {} on the first round."""

    def settings(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings()}

    def begin(self, reference: Tensors) -> ServerOptimizerAccumulator:
        return ServerOptimizerAccumulator(self, reference)

    def apply(self, means: dict[str, Array], reference: Tensors) -> dict[str, Array]:
        """New float64 tensors from FedAvg's means; commits the optimizer state."""
        out: dict[str, Array] = {}
        states: dict[str, State] = {}
        for name, avg in means.items():
            ref = reference.get(name)
            if ref is None or ref.shape != avg.shape:
                raise StrategyError(f"{self.name}: reference model has no tensor {name!r} like it")
            if not is_float(ref):
                out[name] = avg
                continue
            delta = avg - np.asarray(ref, dtype=np.float64)
            state = self._state.get(name, {})
            if any(v.shape != delta.shape for v in state.values()):
                state = {}  # the model changed shape: start afresh
            step, states[name] = self.step(delta, state)
            out[name] = avg + (step - delta)
            if not all_finite(out[name]):
                raise StrategyError(f"{self.name}: the step for tensor {name!r} is not finite")
        self._state = states
        self.rounds += 1
        return out


class ServerOptimizerAccumulator(RoundAccumulator):
    """FedAvg's streaming accumulator; the optimizer runs once, at the first result()."""

    def __init__(self, optimizer: ServerOptimizer, reference: Tensors) -> None:
        self._optimizer = optimizer
        self._reference = reference
        self._fedavg = FedAvgAccumulator()
        self._result: dict[str, Array] | None = None

    def add(self, tensors: Tensors, num_samples: float) -> None:
        self._require_open()
        self._fedavg.add(tensors, num_samples)

    def add_finite(self, tensors: Tensors, num_samples: float) -> None:
        self._require_open()
        self._fedavg.add_finite(tensors, num_samples)

    def _require_open(self) -> None:
        if self._result is not None:
            raise StrategyError(f"{self._optimizer.name}: the round was already aggregated")

    @property
    def count(self) -> int:
        return self._fedavg.count

    @property
    def total_weight(self) -> float:
        return self._fedavg.total_weight

    def blocker(self) -> str | None:
        return self._fedavg.blocker()

    def result(self) -> dict[str, Array]:
        if self._result is None:
            new = self._optimizer.apply(self._fedavg.mean(), self._reference)
            dtypes = self._fedavg.dtypes
            self._result = {name: round_back(x, dtypes[name]) for name, x in new.items()}
        return {name: x.copy() for name, x in self._result.items()}

    def close(self) -> None:
        self._fedavg.close()


class FedAvgM(ServerOptimizer):
    """Server momentum: v ← momentum·v + Δ; step = lr·v.

    Settings: ``lr`` (> 0, default 1.0), ``momentum`` (in [0, 1), default 0.9). lr 1 with
    momentum 0 is FedAvg exactly.
    """

    name: ClassVar[str] = "fedavgm"

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(lr=lr)
        self.momentum = fraction_setting(self.name, "momentum", momentum)

    def settings(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}

    def step(self, delta: Array, state: State) -> tuple[Array, State]:
        v = delta if "v" not in state else self.momentum * state["v"] + delta
        return self.lr * v, {"v": v}


class AdaptiveOptimizer(ServerOptimizer):
    """m ← β1·m + (1−β1)·Δ; v from :meth:`second_moment`; step = lr·m / (√v + τ).

    m starts at 0 and v at τ² (Reddi et al.: v₋₁ ≥ τ²); no bias correction, as in the paper.
    """

    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr=lr)
        self.beta1 = fraction_setting(self.name, "beta1", beta1)
        self.beta2 = fraction_setting(self.name, "beta2", beta2)
        self.tau = float_setting(self.name, "tau", tau, gt=0.0)

    def settings(self) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau}

    @abstractmethod
    def second_moment(self, v: Array, delta_sq: Array) -> Array:
        """The new v from the previous v and Δ²."""

    def step(self, delta: Array, state: State) -> tuple[Array, State]:
        m0 = state.get("m", np.zeros_like(delta))
        v0 = state.get("v", np.full_like(delta, self.tau**2))
        m = self.beta1 * m0 + (1.0 - self.beta1) * delta
        v = self.second_moment(v0, delta * delta)
        return self.lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}


class FedAdam(AdaptiveOptimizer):
    """v ← β2·v + (1−β2)·Δ².

    Settings: ``lr`` (default 0.1), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-3).
    """

    name: ClassVar[str] = "fedadam"

    def __init__(
        self, *, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)

    def second_moment(self, v: Array, delta_sq: Array) -> Array:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(AdaptiveOptimizer):
    """v ← v − (1−β2)·Δ²·sign(v − Δ²).

    Settings: ``lr`` (default 0.01), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-3).
    """

    name: ClassVar[str] = "fedyogi"

    def __init__(
        self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, tau=tau)

    def second_moment(self, v: Array, delta_sq: Array) -> Array:
        v_new: Array = v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)
        return v_new


class FedAdagrad(AdaptiveOptimizer):
    """v ← v + Δ².

    Settings: ``lr`` (default 0.1), ``beta1`` (0.0: m = Δ), ``tau`` (1e-3).
    """

    name: ClassVar[str] = "fedadagrad"

    def __init__(self, *, lr: float = 0.1, beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau)

    def settings(self) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "tau": self.tau}

    def second_moment(self, v: Array, delta_sq: Array) -> Array:
        return v + delta_sq
