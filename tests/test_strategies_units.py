"""Unit tests for the aggregation methods: settings, preconditions, weights, rejected inputs,
the integer rule, dtypes, spilling to disk, and the server optimizers' maths by hand."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from aggregator.strategies import INTEGER_RULE, STRATEGIES, create_strategy, settings_of
from aggregator.strategies import fedavg as fedavg_module
from aggregator.strategies import kernels as K
from aggregator.strategies.base import RoundAccumulator
from common.codec import Array
from common.errors import ConfigError, InvalidModelError, ModelMismatchError, StrategyError

#: Settings that make every method runnable on 7 models.
RUNNABLE: dict[str, dict[str, Any]] = {name: {} for name in STRATEGIES}
RUNNABLE.update({"krum": {"f": 1}, "krum_averaging": {"f": 1}, "bulyan": {"f": 1}})
HELD = [
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "krum_averaging",
    "geometric_median",
    "bulyan",
]


def models(n: int = 7, d: int = 5, seed: int = 0) -> list[dict[str, Array]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.normal(size=(d,)).astype(np.float32),
            "b": rng.normal(size=(2, 2)).astype(np.float32),
            "steps": np.array(10 + i, dtype=np.int64),
        }
        for i in range(n)
    ]


def begin(
    method: str, reference: dict[str, Array] | None = None, **params: Any
) -> RoundAccumulator:
    settings = {**RUNNABLE[method], **params}
    return create_strategy(method, settings).begin(reference or models(1)[0])


def aggregate(method: str, batch: list[dict[str, Array]], **params: Any) -> dict[str, Array]:
    acc = begin(method, batch[0], **params)
    for m in batch:
        acc.add(m, 3.0)
    out = acc.result()
    acc.close()
    return out


# ------------------------------------------------------------------ creation and settings
def test_every_issue_method_is_registered() -> None:
    assert set(STRATEGIES) == {
        "fedavg",
        "geometric_median",
        "coordinate_median",
        "krum",
        "krum_averaging",
        "trimmed_mean",
        "bulyan",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
    }


def test_unknown_method_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown aggregation method 'krumm'.*krum_averaging"):
        create_strategy("krumm")


def test_unknown_setting_is_refused_with_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) 'g' for 'krum'; accepted: f"):
        create_strategy("krum", {"g": 1})
    with pytest.raises(ConfigError, match="accepted: none"):
        create_strategy("fedavg", {"lr": 1})


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("krum", {"f": -1}, "'f' must be >= 0"),
        ("krum", {"f": 1.5}, "'f' must be an integer"),
        ("krum", {"f": True}, "'f' must be an integer"),
        ("krum_averaging", {"m": 0}, "'m' must be >= 1"),
        ("bulyan", {"f": -2}, "'f' must be >= 0"),
        ("trimmed_mean", {"trim": -1}, "'trim' must be >= 0"),
        ("geometric_median", {"nu": 0.0}, "'nu' must be > 0"),
        ("geometric_median", {"maxiter": 0}, "'maxiter' must be >= 1"),
        ("geometric_median", {"ftol": -1e-3}, "'ftol' must be >= 0"),
        ("geometric_median", {"nu": float("nan")}, "'nu' must be finite"),
        ("geometric_median", {"max_weight_ratio": 0.5}, "'max_weight_ratio' must be >= 1"),
        (
            "krum_averaging",
            {"uniform_weights": True, "max_weight_ratio": 2.0},
            "uniform_weights or max_weight_ratio",
        ),
        ("krum_averaging", {"uniform_weights": "yes"}, "must be true or false"),
        ("coordinate_median", {"memory_budget_bytes": -1}, "must be >= 0"),
        ("coordinate_median", {"spill_dir": "/no/such/dir"}, "is not a directory"),
        ("fedavgm", {"lr": 0.0}, "'lr' must be > 0"),
        ("fedavgm", {"momentum": 1.0}, "'momentum' must be < 1"),
        ("fedadam", {"beta1": 1.0}, "'beta1' must be < 1"),
        ("fedadam", {"beta2": -0.1}, "'beta2' must be >= 0"),
        ("fedyogi", {"tau": 0.0}, "'tau' must be > 0"),
        ("fedadagrad", {"lr": "0.1"}, "'lr' must be a number"),
    ],
)
def test_invalid_settings_are_refused_at_creation(
    method: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        create_strategy(method, params)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_describe_reports_name_and_every_setting(method: str) -> None:
    described = create_strategy(method).describe()
    assert described["name"] == method
    assert set(described) - {"name"} == set(settings_of(method))


# ------------------------------------------------------------------ preconditions, round stays open
def test_krum_blocks_until_enough_models_then_aggregates() -> None:
    batch = models(7)
    acc = begin("krum", f=2)
    for m in batch[:5]:
        acc.add(m, 1.0)

    assert acc.blocker() == "krum needs n >= 2f+3 = 7 models, has 5"
    with pytest.raises(StrategyError, match=r"krum needs n >= 2f\+3 = 7 models, has 5"):
        acc.result()

    for m in batch[5:]:
        acc.add(m, 1.0)
    assert acc.blocker() is None
    assert acc.result()["w"].shape == (5,)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_empty_round_is_blocked(method: str) -> None:
    acc = begin(method)
    assert acc.blocker() == "no model with a positive sample count"
    with pytest.raises(StrategyError):
        acc.result()


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_closed_accumulator_refuses_models(method: str) -> None:
    acc = begin(method)
    acc.close()
    with pytest.raises(StrategyError, match="closed"):
        acc.add(models(1)[0], 1.0)


# ------------------------------------------------------------------ weights
@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize("count", [-1.0, math.nan, math.inf])
def test_bad_sample_counts_are_rejected(method: str, count: float) -> None:
    acc = begin(method)
    with pytest.raises(InvalidModelError, match="sample count"):
        acc.add(models(1)[0], count)
    assert acc.count == 0


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_zero_sample_count_drops_the_model(method: str) -> None:
    batch = models(8)
    acc = begin(method)
    acc.add({**batch[7], "w": np.full(5, 1e6, dtype=np.float32)}, 0)
    assert acc.count == 0
    for m in batch[:7]:
        acc.add(m, 3.0)

    np.testing.assert_array_equal(acc.result()["w"], aggregate(method, batch[:7])["w"])


def test_weight_cap_and_uniform_weights() -> None:
    np.testing.assert_allclose(K.normalise_weights([1, 1, 100]), np.array([1, 1, 100]) / 102)
    np.testing.assert_allclose(K.normalise_weights([1, 1, 100], max_ratio=2.0), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(K.normalise_weights([1, 2, 100], uniform=True), [1 / 3] * 3)


def test_multi_krum_average_is_weighted_by_sample_counts() -> None:
    batch = [{"w": np.array([float(v)], dtype=np.float32)} for v in (0, 1, 2, 3, 100)]
    acc = begin("krum_averaging", batch[0], f=1, m=2)
    for m, c in zip(batch, [1.0, 3.0, 1.0, 1.0, 1.0], strict=True):
        acc.add(m, c)

    out = acc.result()

    assert acc.selection == (1, 2)  # type: ignore[attr-defined]
    assert out["w"][0] == np.float32(0.75 * 1 + 0.25 * 2)


@pytest.mark.parametrize("method", ["fedavg", "fedadam"])
def test_add_finite_leaves_the_finite_scan_to_its_caller_with_the_same_result(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count FedAvg's whole-tensor finite scans.
    batch = models(5)
    scans: list[int] = []
    scan = fedavg_module.all_finite

    def counting(x: Array) -> bool:
        scans.append(x.size)
        return scan(x)

    monkeypatch.setattr(fedavg_module, "all_finite", counting)
    checked, trusted = begin(method, batch[0]), begin(method, batch[0])

    # Execute
    for m in batch:
        checked.add(m, 3.0)
    by_add = len(scans)
    for m in batch:
        trusted.add_finite(m, 3.0)

    # Assert: add scans every tensor of every model; add_finite (the engine, which checked
    # the values itself) scans none; the results are the same.
    assert by_add == 5 * len(batch[0])
    assert len(scans) == by_add
    a, b = checked.result(), trusted.result()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# ------------------------------------------------------------------ rejected inputs
@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_models_are_rejected_and_leave_no_trace(method: str, bad: float) -> None:
    batch = models(7)
    poisoned = {**batch[0], "w": batch[0]["w"].copy()}
    poisoned["w"][3] = bad
    acc = begin(method)
    acc.add(batch[0], 3.0)

    with pytest.raises(InvalidModelError, match="'w' has NaN or Inf"):
        acc.add(poisoned, 3.0)
    assert acc.count == 1
    for m in batch[1:]:
        acc.add(m, 3.0)

    np.testing.assert_array_equal(acc.result()["w"], aggregate(method, batch)["w"])


@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "change",
    [
        lambda m: {k: v for k, v in m.items() if k != "b"},
        lambda m: {**m, "extra": np.zeros(1, dtype=np.float32)},
        lambda m: {**m, "w": np.zeros(4, dtype=np.float32)},
        lambda m: {**m, "w": m["w"].astype(np.float64)},
    ],
    ids=["missing", "extra", "shape", "dtype"],
)
def test_mismatched_models_are_rejected(method: str, change: Any) -> None:
    batch = models(2)
    acc = begin(method)
    acc.add(batch[0], 1.0)
    with pytest.raises(ModelMismatchError):
        acc.add(change(batch[1]), 1.0)
    assert acc.count == 1


# ------------------------------------------------------------------ integer rule and dtypes
def test_integer_rule_is_documented() -> None:
    assert "half-to-even" in INTEGER_RULE


@pytest.mark.parametrize(
    ("method", "values", "expected"),
    [
        ("fedavg", [1, 2], 2),  # 1.5 → 2
        ("fedavg", [2, 3], 2),  # 2.5 → 2 (half to even)
        ("fedavg", [-3, -2], -2),  # -2.5 → -2
        ("coordinate_median", [1, 2, 3, 4], 2),  # 2.5 → 2
        ("coordinate_median", [1, 2, 4, 5], 3),
        ("trimmed_mean", [0, 5, 6, 100], 6),  # mean(5, 6) = 5.5 → 6
    ],
)
def test_integer_tensors_follow_the_rule(method: str, values: list[int], expected: int) -> None:
    batch = [{"w": np.zeros(2, dtype=np.float32), "n": np.array(v, dtype=np.int32)} for v in values]
    out = aggregate(method, batch)
    assert out["n"].dtype == np.int32
    assert int(out["n"]) == expected


def test_krum_returns_the_chosen_models_integers_exactly() -> None:
    big = 2**60 + 1  # not representable in float64
    batch = [
        {"w": np.array([float(i)], dtype=np.float32), "n": np.array(big + i, dtype=np.int64)}
        for i in (0, 1, 2, 3, 50)
    ]
    out = aggregate("krum", batch, f=1)
    assert int(out["n"]) - big in (0, 1, 2, 3)
    assert int(out["n"]) - big == int(out["w"][0])


def test_bool_tensors_are_voted() -> None:
    batch = [
        {"w": np.zeros(1, dtype=np.float32), "mask": np.array([True, vote])}
        for vote in (True, True, False)
    ]
    for method in ("fedavg", "coordinate_median"):
        out = aggregate(method, batch)
        assert out["mask"].dtype == np.bool_
        np.testing.assert_array_equal(out["mask"], [True, True])


@pytest.mark.parametrize("method", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_outputs_keep_the_input_dtype(method: str, dtype: Any) -> None:
    batch = [{"w": m["w"].astype(dtype), "steps": m["steps"]} for m in models(7)]
    out = aggregate(method, batch)
    assert out["w"].dtype == np.dtype(dtype)
    assert out["steps"].dtype == np.int64


def test_krum_is_bit_identical_for_float64_models() -> None:
    rng = np.random.default_rng(1)
    batch = [{"w": rng.normal(size=3) * (1 + 1e-12)} for _ in range(5)]
    out = aggregate("krum", batch, f=1)
    assert any(np.array_equal(out["w"], m["w"]) for m in batch)


def test_fedavg_averages_complex_tensors() -> None:
    batch = [{"z": np.array([1 + 2j, 3j], dtype=np.complex64)}, {"z": np.array([3, 1j])}]
    batch[1]["z"] = batch[1]["z"].astype(np.complex64)
    out = aggregate("fedavg", batch)
    np.testing.assert_array_equal(out["z"], np.array([2 + 1j, 2j], dtype=np.complex64))


def test_robust_methods_block_on_complex_tensors() -> None:
    batch = [{"z": np.array([1j], dtype=np.complex64)}] * 3
    acc = begin("coordinate_median", batch[0])
    for m in batch:
        acc.add(m, 1.0)
    assert "complex tensors ['z']" in str(acc.blocker())


# ------------------------------------------------------------------ FedAvg folding
def test_fedavg_folds_groups_and_single_models_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(70_000,)).astype(np.float32) for _ in range(19)]
    counts = rng.integers(1, 100, size=19).astype(float)
    expected = (
        np.sum([c * x.astype(np.float64) for c, x in zip(counts, xs, strict=True)], 0)
        / counts.sum()
    ).astype(np.float32)

    for group_bytes in (fedavg_module._GROUP_BYTES, 1):  # groups of 8, then one at a time
        monkeypatch.setattr(fedavg_module, "_GROUP_BYTES", group_bytes)
        acc = create_strategy("fedavg").begin({})
        for x, c in zip(xs, counts, strict=True):
            acc.add({"w": x}, c)
        np.testing.assert_allclose(acc.result()["w"], expected, rtol=1e-6, atol=1e-7)


def test_fedavg_total_weight_counts_kept_models() -> None:
    acc = create_strategy("fedavg").begin({})
    acc.add({"w": np.ones(2, dtype=np.float32)}, 2)
    acc.add({"w": np.ones(2, dtype=np.float32)}, 0)
    acc.add({"w": np.ones(2, dtype=np.float32)}, 5)
    assert acc.total_weight == 7.0  # type: ignore[attr-defined]
    assert acc.count == 2


# ------------------------------------------------------------------ spilling to disk
@pytest.mark.parametrize("method", HELD)
def test_models_beyond_the_memory_budget_spill_to_disk(method: str, tmp_path: Path) -> None:
    batch = models(7, d=3000)
    row_bytes = (3000 + 4) * 4
    expected = aggregate(method, batch)

    acc = begin(method, batch[0], memory_budget_bytes=2 * row_bytes + 100, spill_dir=str(tmp_path))
    for m in batch:
        acc.add(m, 3.0)
    (spill,) = tmp_path.iterdir()

    assert acc.spilled == 5  # type: ignore[attr-defined]
    assert len(os.listdir(spill)) == 5
    out = acc.result()
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name])
        assert type(out[name]) is np.ndarray
    acc.close()
    assert not spill.exists()


def test_zero_budget_spills_everything_and_a_rejected_model_leaves_no_file(
    tmp_path: Path,
) -> None:
    batch = models(3)
    bad = {**batch[2], "w": np.full(5, np.nan, dtype=np.float32)}
    acc = begin("coordinate_median", batch[0], memory_budget_bytes=0, spill_dir=str(tmp_path))
    acc.add(batch[0], 1.0)
    acc.add(batch[1], 1.0)
    with pytest.raises(InvalidModelError):
        acc.add(bad, 1.0)
    (spill,) = tmp_path.iterdir()

    assert acc.spilled == 2  # type: ignore[attr-defined]
    assert len(os.listdir(spill)) == 2
    acc.close()
    assert not spill.exists()


# ------------------------------------------------------------------ Krum / Bulyan details
def test_krum_breaks_exact_ties_by_index() -> None:
    # Equilateral triangle, f = 0: every score is the same; the first model wins.
    pts = [np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([0.5, math.sqrt(3) / 2])]
    d2 = K.sq_distances(np.array([[p @ q for q in pts] for p in pts]))
    d2 = np.round(d2, 12)
    assert list(K.krum_select(d2, 0, 3)) == [0, 1, 2]


def test_krum_excludes_self_by_index_with_duplicate_models() -> None:
    # Two identical models: each one's nearest neighbour is the other, at distance 0.
    d2 = K.sq_distances(np.diag([0.0, 0.0, 1.0, 4.0, 9.0]))
    scores = K.krum_scores(d2, 1)
    assert scores[0] == scores[1] == 1.0  # 0 (the twin) + 1 (model 2), self excluded once


def test_bulyan_selection_keeps_at_most_f_outliers_and_the_trim_removes_them() -> None:
    values = (0.0, 0.1, 0.2, 0.3, 0.4, 9, 10)
    batch = [{"w": np.array([v, -v], dtype=np.float32)} for v in values]
    acc = begin("bulyan", batch[0], f=1)
    for m in batch:
        acc.add(m, 1.0)

    out = acc.result()

    # θ = 5: the last Krum round (0, 9, 10 left) keeps 9; the β = 3 values closest to the
    # median 0.3 of (0.1, 0.2, 0.3, 0.4, 9) are 0.2, 0.3, 0.4.
    assert acc.selection == (1, 2, 3, 4, 5)  # type: ignore[attr-defined]
    np.testing.assert_allclose(out["w"], [0.3, -0.3], rtol=1e-6)


def test_weiszfeld_decreases_the_objective_and_stops_on_ftol() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 4))
    gram = x @ x.T
    alpha = np.full(9, 1 / 9)
    first = K.weiszfeld(gram, alpha, nu=1e-9, maxiter=1, ftol=0)
    many = K.weiszfeld(gram, alpha, nu=1e-9, maxiter=500, ftol=1e-12)
    mean_objective = float(np.sum(np.linalg.norm(x - x.mean(0), axis=1)) / 9)

    assert many.objective <= first.objective <= mean_objective
    assert many.iterations < 500
    np.testing.assert_allclose(many.coeffs.sum(), 1.0)


# ------------------------------------------------------------------ server optimizers
def rounds_of(method: str, params: dict[str, Any], deltas: list[float]) -> list[float]:
    """Run one-parameter rounds where FedAvg's delta is ``delta``; return the new models."""
    strategy = create_strategy(method, params)
    w = 1.0
    out = []
    for delta in deltas:
        acc = strategy.begin({"w": np.array([w]), "steps": np.array(1)})
        acc.add({"w": np.array([w + delta]), "steps": np.array(3)}, 2.0)
        result = acc.result()
        assert int(result["steps"]) == 3  # integers follow FedAvg's rule, no optimizer
        w = float(result["w"][0])
        out.append(w)
    return out


def test_fedavgm_by_hand() -> None:
    got = rounds_of("fedavgm", {"lr": 0.5, "momentum": 0.9}, [0.2, -0.1])
    v1 = 0.2
    w1 = 1.0 + 0.5 * v1
    v2 = 0.9 * v1 - 0.1
    w2 = w1 + 0.5 * v2
    assert got == pytest.approx([w1, w2], rel=1e-12)


def test_fedadam_by_hand() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    got = rounds_of("fedadam", {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}, [0.2, -0.1])
    m1, v1 = 0.1 * 0.2, 0.99 * tau**2 + 0.01 * 0.04
    w1 = 1.0 + lr * m1 / (math.sqrt(v1) + tau)
    m2, v2 = 0.9 * m1 + 0.1 * -0.1, 0.99 * v1 + 0.01 * 0.01
    w2 = w1 + lr * m2 / (math.sqrt(v2) + tau)
    assert got == pytest.approx([w1, w2], rel=1e-12)


def test_fedyogi_by_hand() -> None:
    lr, tau = 0.01, 1e-3
    got = rounds_of("fedyogi", {"lr": lr, "beta1": 0.9, "beta2": 0.99, "tau": tau}, [0.2, -0.01])
    m1 = 0.1 * 0.2
    v1 = tau**2 - 0.01 * 0.04 * np.sign(tau**2 - 0.04)  # v grows towards Δ²
    w1 = 1.0 + lr * m1 / (math.sqrt(v1) + tau)
    m2 = 0.9 * m1 + 0.1 * -0.01
    v2 = v1 - 0.01 * 1e-4 * np.sign(v1 - 1e-4)
    w2 = w1 + lr * m2 / (math.sqrt(v2) + tau)
    assert got == pytest.approx([w1, w2], rel=1e-12)


def test_fedadagrad_by_hand() -> None:
    lr, tau = 0.1, 1e-3
    got = rounds_of("fedadagrad", {"lr": lr, "tau": tau}, [0.2, -0.1])
    v1 = tau**2 + 0.04
    w1 = 1.0 + lr * 0.2 / (math.sqrt(v1) + tau)
    v2 = v1 + 0.01
    w2 = w1 + lr * -0.1 / (math.sqrt(v2) + tau)
    assert got == pytest.approx([w1, w2], rel=1e-12)


def test_server_optimizer_state_moves_only_on_a_result() -> None:
    strategy = create_strategy("fedadam")
    ref = {"w": np.zeros(2, dtype=np.float32)}
    acc = strategy.begin(ref)
    with pytest.raises(StrategyError):
        acc.result()  # nothing to aggregate: no step taken
    assert strategy.rounds == 0  # type: ignore[attr-defined]

    acc.add({"w": np.ones(2, dtype=np.float32)}, 1.0)
    first = acc.result()
    again = acc.result()

    np.testing.assert_array_equal(first["w"], again["w"])
    assert strategy.rounds == 1  # type: ignore[attr-defined]
    with pytest.raises(StrategyError, match="already aggregated"):
        acc.add({"w": np.ones(2, dtype=np.float32)}, 1.0)
