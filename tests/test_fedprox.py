"""FedProx: the squared proximal term (μ/2)·‖w − w_global‖² and its gradient μ·(w − w_global)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from agent.fedprox import FedProx, proximal_term
from common.errors import ConfigError, ModelMismatchError


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))


def test_term_is_zero_at_the_snapshot() -> None:
    model = small_model()
    prox = FedProx(model, mu=0.5)
    assert prox(model).item() == 0.0


def test_term_and_gradient_by_hand() -> None:
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g = torch.tensor([1.0, 0.0, 5.0])

    term = proximal_term([w], [g], mu=0.1)
    term.backward()

    # (0.1 / 2) · (0² + 2² + 2²) = 0.4; the gradient is μ·(w − g).
    assert term.item() == pytest.approx(0.4)
    assert w.grad is not None
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 0.2, -0.2]))


def test_term_follows_the_model_and_ignores_buffers() -> None:
    model = small_model()
    prox = FedProx(model, mu=2.0)
    with torch.no_grad():
        model[0].weight.add_(0.5)  # 6 weights moved by 0.5
        model[1].running_mean.add_(100.0)  # a buffer, not a weight

    assert prox(model).item() == pytest.approx(0.5 * 2.0 * 6 * 0.25)


def test_snapshot_does_not_follow_training() -> None:
    model = small_model()
    prox = FedProx(model, mu=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    opt.step()

    assert prox(model).item() > 0.0


def test_zero_mu_gives_zero() -> None:
    model = small_model()
    prox = FedProx(model, mu=0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert prox(model).item() == 0.0


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_invalid_mu_is_refused(mu: object) -> None:
    with pytest.raises(ConfigError, match="mu must be"):
        FedProx(small_model(), mu=mu)  # type: ignore[arg-type]


def test_a_different_model_is_refused() -> None:
    prox = FedProx(small_model(), mu=0.1)
    with pytest.raises(ModelMismatchError, match="parameters differ"):
        prox(nn.Linear(3, 2))


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ModelMismatchError, match="shapes differ"):
        proximal_term([torch.zeros(2)], [torch.zeros(3)], mu=1.0)
