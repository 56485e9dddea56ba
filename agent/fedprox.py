"""FedProx (Li et al. 2020) for PyTorch agents: the proximal term (μ/2)·‖w − w_global‖².

Added to the local loss, it keeps local training near the model the round started from::

    prox = FedProx(model, mu=0.01)        # snapshot of the global weights, at the round's start
    for x, y in loader:
        loss = criterion(model(x), y) + prox(model)
        ...

The norm is squared, as in the paper (Flower's framework docstring writes the unsquared norm;
its gradient would not be μ·(w − w_global)). Only trainable parameters count: buffers such as
BatchNorm statistics are not weights to pull back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from common.errors import ConfigError, ModelMismatchError


def _check_mu(mu: float) -> float:
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
        raise ConfigError(f"fedprox: mu must be a finite number >= 0, got {mu!r}")
    return float(mu)


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor], mu: float
) -> torch.Tensor:
    """(μ/2)·Σ‖w − w_global‖² over matching tensors; differentiable in ``params``."""
    mu = _check_mu(mu)
    pairs = list(zip(params, global_params, strict=True))
    if not pairs:
        return torch.zeros(())
    total = torch.zeros((), dtype=pairs[0][0].dtype, device=pairs[0][0].device)
    for w, g in pairs:
        if w.shape != g.shape:
            raise ModelMismatchError(f"fedprox: shapes differ: {list(w.shape)} vs {list(g.shape)}")
        total = total + torch.sum((w - g.detach()) ** 2)
    return 0.5 * mu * total


class FedProx:
    """The proximal term against a snapshot of ``model``'s trainable parameters.

    Create it when a round starts (after loading the global model); call it with the model
    being trained to get the penalty to add to the loss.
    """

    def __init__(self, model: nn.Module, *, mu: float) -> None:
        self.mu = _check_mu(mu)
        self._global = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def __call__(self, model: nn.Module) -> torch.Tensor:
        current = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if current.keys() != self._global.keys():
            missing = sorted(self._global.keys() - current.keys())
            extra = sorted(current.keys() - self._global.keys())
            raise ModelMismatchError(
                f"fedprox: parameters differ from the snapshot: missing {missing}, extra {extra}"
            )
        names = list(self._global)
        return proximal_term((current[n] for n in names), (self._global[n] for n in names), self.mu)
