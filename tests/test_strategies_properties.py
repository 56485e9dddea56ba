"""Property tests for the aggregation methods (AGGREGATION.md): permutation invariance,
translation equivariance, unanimity, bounds, reductions, oracles, preconditions."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.strategies import create_strategy
from aggregator.strategies import kernels as K
from aggregator.strategies.base import RoundAccumulator
from common.codec import Array
from common.errors import StrategyError

PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Every aggregation rule (server optimizers are covered by their own reductions).
RULES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "coordinate_median": {},
    "trimmed_mean": {"trim": 1},
    "krum": {"f": 1},
    "krum_averaging": {"f": 1},
    "geometric_median": {"maxiter": 50},
    "bulyan": {"f": 1},
}
#: Sorted per coordinate or selected: bit-identical whatever the arrival order.
EXACT_UNDER_PERMUTATION = {"coordinate_median", "trimmed_mean", "krum", "bulyan"}
#: Return input values, so a shift by an exactly representable vector is exact too.
EXACT_UNDER_TRANSLATION = {"coordinate_median", "krum"}


def aggregate(
    method: str,
    models: Sequence[Mapping[str, Array]],
    weights: Sequence[float] | None = None,
    reference: Mapping[str, Array] | None = None,
    **params: Any,
) -> tuple[dict[str, Array], RoundAccumulator]:
    strategy = create_strategy(method, params)
    acc = strategy.begin(dict(reference if reference is not None else models[0]))
    for i, m in enumerate(models):
        acc.add(m, 1.0 if weights is None else weights[i])
    out = acc.result()
    acc.close()
    return out, acc


def random_models(
    seed: int, n: int, d: int, *, quantum: float = 0.0
) -> tuple[list[dict[str, Array]], dict[str, Array]]:
    """A reference plus n perturbed copies; continuous (no ties) unless ``quantum`` > 0, which
    rounds every value to a multiple of it (so that shifts by multiples are exact)."""
    rng = np.random.default_rng(seed)

    def draw(x: Array) -> Array:
        return (np.round(x / quantum) * quantum if quantum else x).astype(np.float32)

    ref = draw(rng.normal(0, 1, d))
    models = [{"w": draw(ref + rng.normal(0, 0.1, d))} for _ in range(n)]
    return models, {"w": ref}


seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(7, 11)  # bulyan with f = 1 needs 7
dims = st.integers(1, 9)


# ------------------------------------------------------------------ permutation invariance
@PROPS
@given(seed=seeds, n=sizes, d=dims, method=st.sampled_from(sorted(RULES)))
def test_permutation_invariance(seed: int, n: int, d: int, method: str) -> None:
    models, ref = random_models(seed, n, d)
    weights = list(np.random.default_rng(seed).integers(1, 50, n).astype(float))
    perm = np.random.default_rng(seed + 1).permutation(n)

    a, _ = aggregate(method, models, weights, ref, **RULES[method])
    b, _ = aggregate(
        method, [models[i] for i in perm], [weights[i] for i in perm], ref, **RULES[method]
    )

    if method in EXACT_UNDER_PERMUTATION:
        np.testing.assert_array_equal(a["w"], b["w"])
    else:
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ translation equivariance
@PROPS
@given(
    seed=seeds,
    n=sizes,
    d=dims,
    shift=st.floats(-100, 100, allow_nan=False),
    method=st.sampled_from(sorted(RULES)),
)
def test_translation_equivariance(seed: int, n: int, d: int, shift: float, method: str) -> None:
    # Values and shifts on a 2^-12 grid: the translated models are exact, so distances and
    # selections are identical and only the final float64 → float32 rounding differs.
    q = 2.0**-12
    models, ref = random_models(seed, n, d, quantum=q)
    t = (np.round(np.random.default_rng(seed).normal(0, 1, d) * shift / q) * q).astype(np.float32)
    moved = [{"w": m["w"] + t} for m in models]

    a, _ = aggregate(method, models, None, ref, **RULES[method])
    b, _ = aggregate(method, moved, None, {"w": ref["w"] + t}, **RULES[method])

    scale = float(np.abs(t).max()) + float(np.abs(models[0]["w"]).max())
    np.testing.assert_allclose(b["w"], a["w"] + t, rtol=0, atol=4e-7 * scale)
    if method in EXACT_UNDER_TRANSLATION:
        np.testing.assert_array_equal(b["w"], a["w"] + t)


# ------------------------------------------------------------------ unanimity
@PROPS
@given(
    x=hnp.arrays(np.float32, st.integers(1, 6), elements=st.floats(-1e6, 1e6, width=32)),
    n=sizes,
    method=st.sampled_from(sorted(RULES)),
)
def test_unanimity_returns_the_common_model_exactly(x: Array, n: int, method: str) -> None:
    models = [{"w": x.copy(), "steps": np.array(7, dtype=np.int64)} for _ in range(n)]
    out, _ = aggregate(method, models, list(range(1, n + 1)), None, **RULES[method])
    np.testing.assert_array_equal(out["w"], x)
    assert out["w"].dtype == np.float32
    assert out["steps"] == 7


# ------------------------------------------------------------------ bounds
@PROPS
@given(seed=seeds, n=sizes, d=dims, method=st.sampled_from(sorted(RULES)))
def test_aggregate_lies_between_coordinate_min_and_max(
    seed: int, n: int, d: int, method: str
) -> None:
    models, ref = random_models(seed, n, d)
    stack = np.stack([m["w"] for m in models])

    out, _ = aggregate(method, models, None, ref, **RULES[method])

    assert np.all(out["w"] >= stack.min(axis=0))
    assert np.all(out["w"] <= stack.max(axis=0))


@PROPS
@given(
    stack=hnp.arrays(
        np.float32,
        st.tuples(st.integers(5, 9), st.integers(1, 5)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    f=st.integers(0, 1),
)
def test_krum_returns_one_of_its_inputs(stack: Array, f: int) -> None:
    models = [{"w": row} for row in stack]
    out, acc = aggregate("krum", models, None, {"w": np.zeros_like(stack[0])}, f=f)
    (chosen,) = acc.selection  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out["w"], stack[chosen])


# ------------------------------------------------------------------ reductions
@PROPS
@given(seed=seeds, n=st.integers(1, 9), d=dims)
def test_trimmed_mean_without_trimming_is_the_mean(seed: int, n: int, d: int) -> None:
    models, ref = random_models(seed, n, d)
    out, _ = aggregate("trimmed_mean", models, None, ref, trim=0)
    expected = np.mean(np.stack([m["w"] for m in models]).astype(np.float64), axis=0)
    np.testing.assert_allclose(out["w"], expected.astype(np.float32), rtol=1e-7, atol=1e-7)


@PROPS
@given(seed=seeds, n=st.integers(3, 9), d=dims)
def test_multi_krum_with_m_equal_n_is_fedavg(seed: int, n: int, d: int) -> None:
    models, ref = random_models(seed, n, d)
    weights = list(np.random.default_rng(seed).integers(1, 100, n).astype(float))

    multi, _ = aggregate("krum_averaging", models, weights, ref, f=0, m=n)
    avg, _ = aggregate("fedavg", models, weights, ref)

    np.testing.assert_allclose(multi["w"], avg["w"], rtol=1e-6, atol=1e-7)


@PROPS
@given(
    rounds=st.lists(
        st.lists(
            hnp.arrays(np.float32, 3, elements=st.floats(-(2.0**100), 2.0**100, width=32)),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=3,
    ),
    counts=st.lists(st.integers(1, 10**6), min_size=4, max_size=4),
)
def test_fedavgm_with_lr_1_and_no_momentum_is_fedavg_bit_for_bit(
    rounds: list[list[Array]], counts: list[int]
) -> None:
    fedavg = create_strategy("fedavg")
    fedavgm = create_strategy("fedavgm", {"lr": 1.0, "momentum": 0.0})
    global_model = {"w": np.zeros(3, dtype=np.float32)}
    for models in rounds:
        a, b = fedavg.begin(global_model), fedavgm.begin(global_model)
        for x, c in zip(models, counts, strict=False):
            a.add({"w": x}, c)
            b.add({"w": x}, c)
        expected = a.result()
        np.testing.assert_array_equal(b.result()["w"], expected["w"])
        global_model = expected


# ------------------------------------------------------------------ oracles
@PROPS
@given(
    stack=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 12), st.integers(1, 20)),
        # np.median adds the two middle values in float32: keep clear of overflow
        elements=st.floats(-(2.0**100), 2.0**100, width=32),
    )
)
def test_coordinate_median_is_bit_identical_to_np_median(stack: Array) -> None:
    out, _ = aggregate("coordinate_median", [{"w": row} for row in stack])
    np.testing.assert_array_equal(out["w"], np.median(stack, axis=0))
    assert out["w"].dtype == np.float32


def test_coordinate_median_kernel_matches_np_median_across_chunks() -> None:
    rows = np.random.default_rng(3).normal(size=(10, 5000)).astype(np.float32)
    np.testing.assert_array_equal(K.coordinate_median(list(rows), chunk=777), np.median(rows, 0))


def test_coordinate_median_does_not_overflow_where_np_median_does() -> None:
    big = np.float32(3e38)
    out = K.coordinate_median([np.array([big]), np.array([big])])
    assert out[0] == big


def direct_sq_distances(stack: Array) -> Array:
    x = stack.astype(np.float64)
    return np.array([[np.sum((a - b) ** 2) for b in x] for a in x])


def assert_close_to_direct(stack: Array, reference: Array) -> None:
    d2 = K.pairwise_sq_distances(list(stack), reference)
    direct = direct_sq_distances(stack)
    scale = direct.max() if direct.max() > 0 else 1.0
    np.testing.assert_allclose(d2, direct, rtol=1e-6, atol=1e-12 * scale)
    assert np.all(d2 >= 0)
    np.testing.assert_array_equal(np.diag(d2), 0)
    np.testing.assert_array_equal(d2, d2.T)


@PROPS
@given(
    seed=seeds,
    n=st.integers(2, 8),
    d=st.integers(1, 300),
    weight_scale=st.sampled_from([1.0, 1e2, 1e4]),
    update_scale=st.sampled_from([1.0, 1e-3, 1e-5]),
)
def test_gram_distances_match_direct_distances(
    seed: int, n: int, d: int, weight_scale: float, update_scale: float
) -> None:
    rng = np.random.default_rng(seed)
    reference = (rng.normal(size=d) * weight_scale).astype(np.float32)
    updates = rng.normal(size=(n, d)) * weight_scale * update_scale
    stack = (reference + updates).astype(np.float32)
    assert_close_to_direct(stack, reference)


def test_gram_distances_survive_updates_small_relative_to_the_weights() -> None:
    # Weights ~1e3, updates ~1e-2: the naive ‖a‖²+‖b‖²−2a·b on raw float32 weights is useless.
    rng = np.random.default_rng(0)
    reference = (rng.normal(size=4096) * 1e3).astype(np.float32)
    stack = (reference + rng.normal(size=(6, 4096)) * 1e-2).astype(np.float32)
    sq = np.einsum("ij,ij->i", stack, stack)
    naive = sq[:, None] + sq[None, :] - 2 * (stack @ stack.T)
    direct = direct_sq_distances(stack)
    off = ~np.eye(6, dtype=bool)
    assert np.max(np.abs(naive - direct)[off] / direct[off]) > 0.1  # the trap is real

    assert_close_to_direct(stack, reference)


def test_geometric_median_matches_the_one_dimensional_median() -> None:
    # In 1-D the geometric median of an odd number of points is their median.
    values = np.array([[0.0], [1.0], [2.0], [10.0], [100.0]], dtype=np.float32)
    out, acc = aggregate("geometric_median", [{"w": v} for v in values], maxiter=200, ftol=0)
    assert abs(float(out["w"][0]) - 2.0) < 1e-3
    assert acc.trace is not None  # type: ignore[attr-defined]


# ------------------------------------------------------------------ preconditions
@pytest.mark.parametrize(
    ("method", "params", "n", "message"),
    [
        ("krum", {"f": 2}, 6, "krum needs n >= 2f+3 = 7 models, has 6"),
        ("krum_averaging", {"f": 1}, 4, "krum_averaging needs n >= 2f+3 = 5 models, has 4"),
        ("krum_averaging", {"f": 1, "m": 5}, 5, "m = 5 needs n >= m+f = 6 models, has 5"),
        ("bulyan", {"f": 1}, 6, "bulyan needs n >= 4f+3 = 7 models, has 6"),
        ("trimmed_mean", {"trim": 2}, 4, "trimmed_mean needs n > 2·trim = 4 models, has 4"),
    ],
)
def test_preconditions_block_and_raise(
    method: str, params: dict[str, Any], n: int, message: str
) -> None:
    models, ref = random_models(0, n, 3)
    acc = create_strategy(method, params).begin(ref)
    for m in models:
        acc.add(m, 1.0)

    assert acc.blocker() is not None
    assert message in str(acc.blocker())
    with pytest.raises(StrategyError, match=re.escape(message)):
        acc.result()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d2: K.krum_scores(d2, 2), "krum needs n >= 2f"),
        (lambda d2: K.krum_select(d2, 0, 0), "1 <= m <= n - f"),
        (lambda d2: K.bulyan_select(d2, 1), "bulyan needs n >= 4f"),
    ],
)
def test_kernels_raise_on_preconditions(call: Any, message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        call(np.zeros((5, 5)))


def test_trimmed_mean_kernel_refuses_trimming_everything() -> None:
    with pytest.raises(StrategyError, match="trimmed_mean needs"):
        K.trimmed_mean([np.zeros(3)] * 4, 2)
