"""RoundEngine: pure round logic (threshold maths, outcomes, aggregation, method switch)."""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from typing import ClassVar

import numpy as np
import pytest

from aggregator.engine import Outcome, RoundEngine
from aggregator.strategies import RoundAccumulator, Strategy
from aggregator.strategies.fedavg import FedAvg
from common.codec import Array, ModelSpec, Tensors
from common.errors import ConfigError, StrategyError
from common.messages import AckStatus, AgentState, PresenceState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _LastAccumulator(RoundAccumulator):
    def __init__(self) -> None:
        self.models: list[dict[str, Array]] = []

    def add(self, tensors: Tensors, num_samples: float) -> None:
        self.models.append({k: np.array(v) for k, v in tensors.items()})

    @property
    def count(self) -> int:
        return len(self.models)

    def result(self) -> dict[str, Array]:
        return self.models[-1]


class LastModel(Strategy):
    """A test strategy: the round's result is the last model received."""

    name: ClassVar[str] = "last"

    def begin(self, reference: Tensors) -> RoundAccumulator:
        return _LastAccumulator()


def base_model() -> dict[str, Array]:
    return {
        "w": np.zeros((2, 3), dtype=np.float32),
        "b": np.zeros(3, dtype=np.float64),
        "n": np.zeros(2, dtype=np.int64),
    }


def local_model(seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((2, 3)).astype(np.float32),
        "b": rng.standard_normal(3),
        "n": rng.integers(0, 100, 2).astype(np.int64),
    }


def make_engine(
    *, agents: int = 3, threshold: float = 1.0, strategy: Strategy | None = None
) -> RoundEngine:
    engine = RoundEngine(strategy=strategy or FedAvg(), threshold=threshold, clock=FakeClock())
    base = base_model()
    engine.set_model(base, round=0, spec=ModelSpec.from_tensors(base))
    for i in range(agents):
        engine.agent_seen(f"a{i}")
    return engine


# ------------------------------------------------------------------ threshold maths
def reference_needed(threshold: str, active: int) -> int:
    """The rule on the decimal threshold, in exact rational arithmetic."""
    return max(1, math.ceil(Fraction(threshold) * active))


@pytest.mark.parametrize(
    ("threshold", "active", "expected"),
    [
        ("0.1", 30, 3),  # 0.1 * 30 == 3.0000000000000004 in floats
        ("0.7", 10, 7),  # 0.7 * 10 == 7.000000000000001 in floats
        ("0.3", 10, 3),
        ("0.29", 100, 29),  # 0.29 * 100 == 28.999999999999996 in floats
        ("0.57", 100, 57),  # 0.57 * 100 == 56.99999999999999 in floats
        ("0.500000000001", 2, 2),  # just above 1: the 1e-9 trick said 1
        ("1", 3, 3),
        ("0.5", 3, 2),
        ("0.34", 3, 2),
        ("0.33", 3, 1),
        ("0.5", 0, 1),
        ("0.01", 1, 1),
    ],
)
def test_needed_is_exact(threshold: str, active: int, expected: int) -> None:
    # Prepare
    engine = make_engine(agents=active, threshold=float(threshold))

    # Execute
    needed = engine.needed

    # Assert
    assert engine.active == active
    assert needed == expected == reference_needed(threshold, active)


def test_needed_matches_rational_reference_on_a_grid() -> None:
    # Prepare
    engine = make_engine(agents=0)
    wrong: list[tuple[str, int, int]] = []

    # Execute
    for active in range(101):
        engine.agent_seen(f"g{active}")  # one more active agent each step
        for percent in range(1, 101):
            threshold = str(percent / 100)
            engine.threshold = float(threshold)
            if engine.needed != reference_needed(threshold, active + 1):
                wrong.append((threshold, active + 1, engine.needed))

    # Assert
    assert wrong == []


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_threshold_out_of_range_is_a_config_error(bad: float) -> None:
    # Prepare
    engine = make_engine()

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\]"):
        engine.threshold = bad
    assert engine.threshold == 1.0


def test_active_follows_online_and_offline() -> None:
    # Prepare
    engine = make_engine(agents=4, threshold=0.5)

    # Execute
    engine.agent_seen("a1", online=False)
    engine.agent_seen("a2", online=False)
    after_two_left = (engine.active, engine.needed)
    engine.agent_seen("a1", online=True)
    engine.agent_seen("new")

    # Assert
    assert after_two_left == (2, 1)
    assert (engine.active, engine.needed) == (4, 2)


def test_active_honours_the_agent_timeout() -> None:
    # Prepare
    clock = FakeClock()
    engine = RoundEngine(strategy=FedAvg(), clock=clock, agent_timeout=30)
    engine.agent_seen("a0")
    clock.now += 20
    engine.agent_seen("a1")

    # Execute
    clock.now += 15  # a0 silent for 35 s, a1 for 15 s

    # Assert
    assert engine.active == 1
    engine.agent_timeout = 0  # 0 disables the timeout
    assert engine.active == 2


def timed_engine(
    *, agents: int = 3, timeout: float = 3.0, max_agents: int = 0
) -> tuple[RoundEngine, FakeClock]:
    clock = FakeClock()
    engine = RoundEngine(
        strategy=FedAvg(), clock=clock, agent_timeout=timeout, max_agents=max_agents
    )
    for i in range(agents):
        engine.agent_seen(f"a{i}")
    return engine, clock


@pytest.mark.parametrize("seed", range(5))
def test_the_active_count_always_matches_every_agents_presence(seed: int) -> None:
    # Prepare: an engine whose active count is read after every event (so it is reused
    # whenever it may be), and a random stream of statuses, heartbeats, silences and settings.
    rng = random.Random(seed)
    engine, clock = timed_engine(agents=6, timeout=3.0, max_agents=4)
    states = [AgentState.ONLINE, AgentState.OFFLINE, AgentState.LOST]
    counts: list[tuple[int, int]] = []

    # Execute
    for _ in range(400):
        name = f"a{rng.randrange(8)}"
        match rng.randrange(6):
            case 0:
                engine.agent_status(name, rng.choice(states))
            case 1 | 2:
                engine.heartbeat(name)
            case 3:
                clock.now += rng.uniform(0, 2)
            case 4:
                engine.max_agents = rng.randrange(7)
                engine.admit_waiting()
            case _:
                engine.agent_timeout = rng.choice([0.0, 1.5, 3.0])
        truth = sum(p is PresenceState.ACTIVE for p in engine.presences().values())
        counts.append((engine.active, truth))

    # Assert: the count is exact after every event, and the stream did move it around.
    assert all(active == truth for active, truth in counts), counts
    assert len({truth for _, truth in counts}) >= 3


def test_silent_agent_times_out_and_comes_back_with_a_heartbeat() -> None:
    # Prepare
    engine, clock = timed_engine(agents=3)
    clock.now += 2
    engine.heartbeat("a0")
    engine.heartbeat("a1")

    # Execute
    clock.now += 1.5  # a2 silent for 3.5 s
    timed_out = (engine.presence("a2"), engine.active, engine.needed)
    engine.heartbeat("a2")

    # Assert
    assert timed_out == (PresenceState.TIMEOUT, 2, 2)
    assert (engine.presence("a2"), engine.active, engine.needed) == (PresenceState.ACTIVE, 3, 3)


def test_lost_connection_counts_until_the_timeout() -> None:
    # Prepare: the last will arrives right after a heartbeat.
    engine, clock = timed_engine(agents=2, timeout=3.0)
    engine.agent_status("a1", AgentState.LOST)

    # Execute / Assert: the heartbeats decide, not the will alone.
    assert engine.presence("a1") is PresenceState.ACTIVE
    clock.now += 3.1
    engine.heartbeat("a0")
    assert engine.presence("a1") is PresenceState.TIMEOUT
    assert engine.active == 1
    engine.agent_status("a1", AgentState.ONLINE)  # it reconnected
    assert engine.presence("a1") is PresenceState.ACTIVE


def test_without_timeout_a_lost_connection_is_offline_at_once() -> None:
    engine, _ = timed_engine(agents=2, timeout=0)
    engine.agent_status("a1", AgentState.LOST)
    assert engine.presence("a1") is PresenceState.OFFLINE
    assert (engine.active, engine.needed) == (1, 1)


def test_goodbye_is_offline_at_once_and_heartbeats_after_it_are_ignored() -> None:
    engine, _ = timed_engine(agents=2)
    engine.agent_seen("a1", online=False)
    assert engine.heartbeat("a1") is None
    assert engine.heartbeat("stranger") is None
    assert engine.presence("a1") is PresenceState.OFFLINE
    assert engine.presence("stranger") is None
    assert engine.active == 1


def test_agent_over_max_agents_is_rejected_and_not_counted() -> None:
    # Prepare
    engine, _ = timed_engine(agents=3, max_agents=3)

    # Execute
    record = engine.agent_seen("a3")
    again = engine.agent_seen("a3")  # a repeated online status changes nothing

    # Assert
    assert record.rejected
    assert again.rejected
    assert engine.presence("a3") is PresenceState.REJECTED
    assert (engine.active, engine.needed) == (3, 3)
    assert not engine.admitted("a3")
    assert engine.admitted("a0")
    assert not engine.admitted("never-announced")  # with a limit, only admitted agents


def test_admitted_agent_keeps_its_place_across_a_reconnect() -> None:
    engine, _ = timed_engine(agents=3, max_agents=3)
    engine.agent_status("a0", AgentState.LOST)
    engine.agent_seen("a3")  # a newcomer while a0 is within its grace
    engine.agent_seen("a0")
    assert engine.presence("a0") is PresenceState.ACTIVE
    assert engine.presence("a3") is PresenceState.REJECTED


def test_timed_out_agent_frees_its_place_and_is_rejected_if_taken() -> None:
    # Prepare
    engine, clock = timed_engine(agents=2, max_agents=2)
    clock.now += 4
    engine.heartbeat("a0")  # a1 is TIMEOUT now

    # Execute
    newcomer = engine.agent_seen("a2")
    back = engine.heartbeat("a1")

    # Assert
    assert not newcomer.rejected
    assert back is not None
    assert back.rejected
    assert engine.presence("a1") is PresenceState.REJECTED


def test_raising_max_agents_admits_the_waiting_agents_oldest_first() -> None:
    # Prepare
    engine, clock = timed_engine(agents=1, max_agents=1)
    clock.now += 1
    engine.agent_seen("b")
    clock.now += 1
    engine.agent_seen("c")
    engine.agent_seen("d", online=False)

    # Execute
    engine.max_agents = 2
    first = engine.admit_waiting()
    engine.max_agents = 0
    rest = engine.admit_waiting()

    # Assert
    assert (first, rest) == (["b"], ["c"])
    assert engine.active == 3


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_max_agents_must_be_a_non_negative_integer(bad: object) -> None:
    engine, _ = timed_engine()
    with pytest.raises(ConfigError, match="max_agents"):
        engine.max_agents = bad  # type: ignore[assignment]


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_agent_timeout_must_be_non_negative(bad: float) -> None:
    engine, _ = timed_engine()
    with pytest.raises(ConfigError, match="agent timeout"):
        engine.agent_timeout = bad
    assert engine.agent_timeout == 3.0


def test_next_strategy_is_visible_until_the_round_opens() -> None:
    engine = make_engine(agents=1)
    engine.set_strategy(LastModel())
    assert engine.next_strategy is not None
    assert engine.strategy.name == "fedavg"
    engine.submit("a0", round=1, num_samples=1, tensors=local_model(0))
    engine.complete()
    assert engine.next_strategy is None
    assert engine.strategy.name == "last"


# ------------------------------------------------------------------ aggregation
def test_weighted_fedavg_equals_an_independent_weighted_mean() -> None:
    # Prepare
    engine = make_engine(agents=3)
    models = [local_model(i) for i in range(3)]
    weights = [10.0, 25.0, 65.0]

    # Execute
    outcomes = [
        engine.submit(f"a{i}", round=1, num_samples=w, tensors=m)
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]
    result = engine.complete()

    # Assert
    assert [o.status for o in outcomes] == [AckStatus.ACCEPTED] * 3
    for name in ("w", "b"):
        expected = sum(
            w * m[name].astype(np.float64) for m, w in zip(models, weights, strict=True)
        ) / sum(weights)
        assert result.model[name].dtype == models[0][name].dtype
        np.testing.assert_allclose(result.model[name], expected, rtol=1e-6, atol=1e-6)
    assert result.round == 1
    assert result.method == "fedavg"
    assert [c.agent for c in result.contributors] == ["a0", "a1", "a2"]
    assert [c.num_samples for c in result.contributors] == weights


def test_integer_tensors_round_half_to_even() -> None:
    # Prepare
    engine = make_engine(agents=2)
    first, second = local_model(0), local_model(1)
    first["n"] = np.array([1, 2], dtype=np.int64)
    second["n"] = np.array([2, 3], dtype=np.int64)  # means 1.5 and 2.5

    # Execute
    engine.submit("a0", round=1, num_samples=1, tensors=first)
    engine.submit("a1", round=1, num_samples=1, tensors=second)
    result = engine.complete()

    # Assert
    assert result.model["n"].dtype == np.int64
    assert result.model["n"].tolist() == [2, 2]


def test_completion_opens_the_next_round_from_the_result() -> None:
    # Prepare
    engine = make_engine(agents=1)
    engine.submit("a0", round=1, num_samples=3, tensors=local_model(0))

    # Execute
    result = engine.complete()

    # Assert
    assert (engine.model_round, engine.round, engine.collected) == (1, 2, 0)
    assert engine.model is not None
    np.testing.assert_array_equal(engine.model["w"], result.model["w"])
    assert engine.submit("a0", round=2, num_samples=1, tensors=local_model(1)).status is (
        AckStatus.ACCEPTED
    )


def test_ready_once_threshold_is_met() -> None:
    # Prepare
    engine = make_engine(agents=3, threshold=0.6)

    # Execute
    engine.submit("a0", round=1, num_samples=1, tensors=local_model(0))
    ready_after_one = engine.ready()
    engine.submit("a1", round=1, num_samples=1, tensors=local_model(1))

    # Assert
    assert engine.needed == 2
    assert ready_after_one is False
    assert engine.ready() is True


def test_complete_below_threshold_without_force_raises() -> None:
    # Prepare
    engine = make_engine(agents=3)
    engine.submit("a0", round=1, num_samples=1, tensors=local_model(0))

    # Execute / Assert
    with pytest.raises(StrategyError, match="round 1 has 1 of 3 models"):
        engine.complete()
    assert (engine.round, engine.collected) == (1, 1)


def test_forced_completion_with_one_of_three() -> None:
    # Prepare
    engine = make_engine(agents=3)
    model = local_model(0)
    engine.submit("a0", round=1, num_samples=4, tensors=model)

    # Execute
    result = engine.complete(force=True)

    # Assert
    assert [c.agent for c in result.contributors] == ["a0"]
    np.testing.assert_array_equal(result.model["w"], model["w"])
    assert engine.round == 2


@pytest.mark.parametrize("force", [False, True])
def test_complete_without_models_raises(force: bool) -> None:
    # Prepare
    engine = make_engine(agents=3)

    # Execute / Assert
    with pytest.raises(StrategyError, match="round 1 has no model yet"):
        engine.complete(force=force)
    assert engine.round == 1


def test_complete_before_any_base_model_raises() -> None:
    # Prepare
    engine = RoundEngine(strategy=FedAvg())

    # Execute / Assert
    with pytest.raises(StrategyError, match="no round is open"):
        engine.complete(force=True)


def test_set_strategy_applies_from_the_next_round() -> None:
    # Prepare
    engine = make_engine(agents=2)
    m0, m1 = local_model(0), local_model(1)
    engine.submit("a0", round=1, num_samples=1, tensors=m0)

    # Execute
    engine.set_strategy(LastModel())
    engine.submit("a1", round=1, num_samples=3, tensors=m1)
    first = engine.complete()
    engine.submit("a0", round=2, num_samples=1, tensors=m0)
    engine.submit("a1", round=2, num_samples=3, tensors=m1)
    second = engine.complete()

    # Assert
    assert first.method == "fedavg"
    np.testing.assert_allclose(first.model["b"], (m0["b"] + 3 * m1["b"]) / 4, rtol=1e-12)
    assert second.method == "last"
    np.testing.assert_array_equal(second.model["b"], m1["b"])
    assert engine.strategy.name == "last"


# ------------------------------------------------------------------ failures are data
def submit_ok(engine: RoundEngine, agent: str, seed: int = 0) -> Outcome:
    return engine.submit(agent, round=engine.round, num_samples=2, tensors=local_model(seed))


def bad_models() -> list[tuple[str, dict[str, Array], str]]:
    good = local_model(9)
    nan = dict(good, w=good["w"].copy())
    nan["w"][0, 1] = np.nan
    inf = dict(good, b=good["b"].copy())
    inf["b"][2] = -np.inf
    return [
        ("missing", {k: v for k, v in good.items() if k != "b"}, "missing tensor 'b'"),
        ("extra", dict(good, extra=np.zeros(1)), "unexpected tensor 'extra'"),
        ("renamed", {"W": good["w"], "b": good["b"], "n": good["n"]}, "missing tensor 'w'"),
        ("shape", dict(good, w=np.zeros((3, 2), np.float32)), r"tensor 'w': expected \(2, 3\)"),
        ("dtype", dict(good, w=good["w"].astype(np.float64)), "float32, got .* float64"),
        ("int-dtype", dict(good, n=good["n"].astype(np.int32)), "int64, got .* int32"),
        ("nan", nan, "tensor 'w' has a non-finite value"),
        ("inf", inf, "tensor 'b' has a non-finite value"),
    ]


@pytest.mark.parametrize(
    ("label", "tensors", "reason"), bad_models(), ids=[b[0] for b in bad_models()]
)
def test_bad_model_is_rejected_and_nothing_collected_is_lost(
    label: str, tensors: dict[str, Array], reason: str
) -> None:
    # Prepare
    engine = make_engine(agents=3)
    first = local_model(0)
    engine.submit("a0", round=1, num_samples=1, tensors=first)

    # Execute
    outcome = engine.submit("a1", round=1, num_samples=1, tensors=tensors)

    # Assert
    assert outcome.status is AckStatus.REJECTED
    assert outcome.reason is not None
    assert re.search(reason, outcome.reason), outcome.reason
    assert engine.contributors == ["a0"]
    assert engine.counters.rejected == 1
    result = engine.complete(force=True)
    np.testing.assert_array_equal(result.model["w"], first["w"])


@pytest.mark.parametrize("num_samples", [float("nan"), float("inf"), -1.0])
def test_bad_sample_count_is_rejected(num_samples: float) -> None:
    # Prepare
    engine = make_engine(agents=2)
    submit_ok(engine, "a0")

    # Execute
    outcome = engine.submit("a1", round=1, num_samples=num_samples, tensors=local_model(1))

    # Assert
    assert outcome.status is AckStatus.REJECTED
    assert outcome.reason is not None
    assert "sample count" in outcome.reason
    assert engine.contributors == ["a0"]


def test_stale_model_is_counted_not_collected() -> None:
    # Prepare
    engine = make_engine(agents=1)
    submit_ok(engine, "a0")
    engine.complete()
    submit_ok(engine, "a0", seed=1)  # round 2

    # Execute
    outcome = engine.submit("a0", round=1, num_samples=1, tensors=local_model(2))

    # Assert
    assert outcome == Outcome(AckStatus.STALE, "round 1 is over (collecting round 2)")
    assert engine.collected == 1
    assert engine.counters.stale == 1


def test_future_round_is_rejected_as_unknown() -> None:
    # Prepare
    engine = make_engine(agents=2)
    submit_ok(engine, "a0")

    # Execute
    outcome = engine.submit("a1", round=5, num_samples=1, tensors=local_model(1))

    # Assert
    assert outcome == Outcome(AckStatus.REJECTED, "unknown round 5 (collecting round 1)")
    assert engine.contributors == ["a0"]


def test_duplicate_replaces_nothing() -> None:
    # Prepare
    engine = make_engine(agents=2)
    first = local_model(0)
    engine.submit("a0", round=1, num_samples=1, tensors=first)

    # Execute
    outcome = engine.submit("a0", round=1, num_samples=100, tensors=local_model(1))

    # Assert
    assert outcome.status is AckStatus.DUPLICATE
    assert outcome.reason == "already have a0's model for round 1"
    assert engine.collected == 1
    result = engine.complete(force=True)
    np.testing.assert_array_equal(result.model["w"], first["w"])
    assert result.contributors[0].num_samples == 1


def test_submission_before_base_model_is_rejected() -> None:
    # Prepare
    engine = RoundEngine(strategy=FedAvg())

    # Execute
    outcome = engine.submit("a0", round=1, num_samples=1, tensors=local_model(0))

    # Assert
    assert outcome == Outcome(AckStatus.REJECTED, "no base model yet: nothing to train from")
    assert engine.counters.rejected == 1


def test_counters_count_each_outcome() -> None:
    # Prepare
    engine = make_engine(agents=3)
    bad = dict(local_model(0), w=np.zeros((1, 1), np.float32))

    # Execute
    submit_ok(engine, "a0")
    submit_ok(engine, "a1")
    engine.submit("a0", round=1, num_samples=1, tensors=local_model(3))  # duplicate
    engine.submit("a2", round=0, num_samples=1, tensors=local_model(3))  # stale
    engine.submit("a2", round=1, num_samples=1, tensors=bad)  # rejected
    engine.submit("a2", round=2, num_samples=1, tensors=local_model(3))  # rejected

    # Assert
    c = engine.counters
    assert (c.accepted, c.duplicate, c.stale, c.rejected) == (2, 1, 1, 2)


def test_counters_restart_with_each_round() -> None:
    # Prepare
    engine = make_engine(agents=1)
    submit_ok(engine, "a0")

    # Execute
    engine.complete()

    # Assert
    c = engine.counters
    assert (c.accepted, c.duplicate, c.stale, c.rejected) == (0, 0, 0, 0)


def test_blocker_reports_a_round_with_only_zero_weight_models() -> None:
    # Prepare
    engine = make_engine(agents=1)

    # Execute
    outcome = engine.submit("a0", round=1, num_samples=0, tensors=local_model(0))

    # Assert
    assert outcome.status is AckStatus.ACCEPTED
    assert engine.blocker() == "no model with a positive sample count"
    assert engine.ready() is False
    with pytest.raises(StrategyError, match="no model with a positive sample count"):
        engine.complete(force=True)
    assert engine.collected == 1
