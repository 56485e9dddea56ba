"""Robustness: 20 honest updates + 5 attackers, d = 1e4 (AGGREGATION.md).

R = ‖aggregate − honest mean‖ / honest spread, where the honest spread is the RMS distance of
the honest models to their mean, sqrt(mean_i ‖x_i − x̄_h‖²): R ≈ 1 means "as far off as a
typical honest model". Robust rules must keep R ≤ 0.6 whatever the attack and its scale; Krum
returns one honest model bit for bit; multi-Krum averages exactly the honest set; FedAvg (the
control) is dragged along with the attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from aggregator.strategies import create_strategy
from common.codec import Array

D = 10_000
HONEST = 20
ATTACKERS = 5


@dataclass(frozen=True)
class Round:
    reference: Array
    models: list[Array]  # attackers interleaved with honest models
    honest: list[int]  # indices of the honest models in ``models``

    @property
    def honest_mean(self) -> Array:
        return np.mean([self.models[i].astype(np.float64) for i in self.honest], axis=0)

    @property
    def spread(self) -> float:
        mean = self.honest_mean
        return float(np.sqrt(np.mean([np.sum((self.models[i] - mean) ** 2) for i in self.honest])))

    def deviation(self, aggregate: Array) -> float:
        return float(np.linalg.norm(aggregate.astype(np.float64) - self.honest_mean)) / self.spread


Attack = Callable[[np.random.Generator, Array, Array, float], list[Array]]


def sign_flip(rng: np.random.Generator, w0: Array, mean: Array, scale: float) -> list[Array]:
    return [w0 - scale * (mean - w0)] * ATTACKERS


def gaussian(rng: np.random.Generator, w0: Array, mean: Array, scale: float) -> list[Array]:
    # λ times the honest per-coordinate noise (σ = 0.01).
    return [mean + rng.normal(0, 0.01 * scale, D) for _ in range(ATTACKERS)]


def model_replacement(
    rng: np.random.Generator, w0: Array, mean: Array, scale: float
) -> list[Array]:
    # Boosted update γ(X − G) + G towards a target X as far from G as the honest update.
    target = w0 + rng.normal(0, 1, D) * np.linalg.norm(mean - w0) / np.sqrt(D)
    return [w0 + scale * (target - w0)] * ATTACKERS


ATTACKS: dict[str, tuple[Attack, float]] = {
    "sign_flip_x100": (sign_flip, 100.0),
    "gaussian_1e4": (gaussian, 1e4),
    "model_replacement_1e4": (model_replacement, 1e4),
}


def make_round(attack: Attack, scale: float, seed: int = 7) -> Round:
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0, 1, D).astype(np.float32)
    direction = rng.normal(0, 0.05, D)  # the honest clients agree on an update direction
    honest = [(w0 + direction + rng.normal(0, 0.01, D)).astype(np.float32) for _ in range(HONEST)]
    mean = np.mean(np.array(honest, dtype=np.float64), axis=0)
    bad = [x.astype(np.float32) for x in attack(rng, w0.astype(np.float64), mean, scale)]
    order = rng.permutation(HONEST + ATTACKERS)  # attackers anywhere in arrival order
    pool = honest + bad
    models = [pool[i] for i in order]
    return Round(w0, models, [pos for pos, i in enumerate(order) if i < HONEST])


def run(method: str, rnd: Round, **params: Any) -> tuple[Array, Any]:
    acc = create_strategy(method, params).begin({"w": rnd.reference})
    for x in rnd.models:
        acc.add({"w": x}, 100.0)
    out = acc.result()["w"]
    acc.close()
    return out, acc


ROBUST: dict[str, dict[str, Any]] = {
    "coordinate_median": {},
    "trimmed_mean": {"trim": ATTACKERS},
    "geometric_median": {},
    "bulyan": {"f": ATTACKERS},
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("method", sorted(ROBUST))
def test_robust_rules_stay_near_the_honest_mean(method: str, attack: str) -> None:
    fn, scale = ATTACKS[attack]
    rnd = make_round(fn, scale)

    out, _ = run(method, rnd, **ROBUST[method])

    assert rnd.deviation(out) <= 0.6


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_krum_returns_one_honest_model_bit_for_bit(attack: str) -> None:
    fn, scale = ATTACKS[attack]
    rnd = make_round(fn, scale)

    out, acc = run("krum", rnd, f=ATTACKERS)

    (chosen,) = acc.selection
    assert chosen in rnd.honest
    np.testing.assert_array_equal(out, rnd.models[chosen])


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_multi_krum_averages_exactly_the_honest_set(attack: str) -> None:
    fn, scale = ATTACKS[attack]
    rnd = make_round(fn, scale)

    out, acc = run("krum_averaging", rnd, f=ATTACKERS)

    assert sorted(acc.selection) == sorted(rnd.honest)
    assert rnd.deviation(out) < 1e-5


def test_fedavg_is_dragged_along_by_the_attack_scale() -> None:
    small, _ = run("fedavg", rnd_small := make_round(gaussian, 25.0))
    large, _ = run("fedavg", rnd_large := make_round(gaussian, 1e4))

    r_small, r_large = rnd_small.deviation(small), rnd_large.deviation(large)

    assert r_large >= 100 * r_small
    assert r_large > 100  # far outside the honest cloud


@pytest.mark.parametrize("method", sorted(ROBUST))
def test_robust_rules_are_insensitive_to_the_attack_scale(method: str) -> None:
    rounds = [make_round(sign_flip, 1.0), make_round(sign_flip, 100.0)]

    r = [rnd.deviation(run(method, rnd, **ROBUST[method])[0]) for rnd in rounds]

    assert max(r) <= 0.6
    assert max(r) <= 2 * min(r)


def test_geometric_median_with_capped_weights_resists_inflated_sample_counts() -> None:
    rnd = make_round(model_replacement, 1e4)
    attackers = set(range(len(rnd.models))) - set(rnd.honest)
    counts = [1e9 if i in attackers else 100.0 for i in range(len(rnd.models))]

    def aggregate(**params: Any) -> Array:
        acc = create_strategy("geometric_median", params).begin({"w": rnd.reference})
        for x, c in zip(rnd.models, counts, strict=True):
            acc.add({"w": x}, c)
        return acc.result()["w"]

    assert rnd.deviation(aggregate()) > 1  # the lying counts win without a cap
    # Capped at 2× the median count, the attackers still hold a third of the weight.
    assert rnd.deviation(aggregate(max_weight_ratio=2.0)) <= 1.0
    assert rnd.deviation(aggregate(uniform_weights=True)) <= 0.6
