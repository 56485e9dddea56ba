"""A long training holds a bounded amount of memory: the aggregator's record of completed rounds
keeps one model, not one per round (issue 9: bounded memory)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from support import peer_on, serving

import aggregator.engine
from aggregator.engine import RoundResult, RoundResults
from common.codec import Array
from common.config import AggregatorConfig
from common.topics import Topics
from common.transport import InMemoryBus

MIB = 1 << 20


def _result(round: int) -> RoundResult:
    return RoundResult(
        round=round,
        model={"w": np.full(4, float(round), np.float32)},
        contributors=(),
        method="fedavg",
        started=0.0,
        completed=1.0,
    )


def test_round_results_keep_the_newest_model_and_a_bounded_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    monkeypatch.setattr(aggregator.engine, "RESULTS_KEPT", 3)
    results = RoundResults()

    # Execute
    for r in range(1, 6):
        results.append(_result(r))

    # Assert: rounds 3-5 remain; only round 5 still has its model.
    assert [r.round for r in results] == [3, 4, 5]
    assert [r.model for r in results][:2] == [{}, {}]
    np.testing.assert_array_equal(results[-1].model["w"], np.full(4, 5.0, np.float32))
    assert [r.method for r in results] == ["fedavg"] * 3


async def test_an_aggregator_holds_one_model_however_many_rounds_it_completes() -> None:
    # Prepare: one agent x (threshold 1.0: each of its models completes a round), a 1 MiB model.
    bus = InMemoryBus()
    topics = Topics("mem")
    config = AggregatorConfig(name="a1", project="mem", monitor_interval=0.05)
    model: dict[str, Array] = {"w": np.zeros(MIB // 4, np.float32)}
    warmup, rounds = 3, 10
    tracemalloc.start()  # from the start: what the warm-up allocated is traced when it is freed
    try:
        async with peer_on(bus, "mem") as peer, serving(config, bus, persist=False) as service:
            await peer.online("x")
            await peer.base(model)

            async def round_trip(r: int) -> None:
                if r:
                    await peer.local("x", r, {"w": model["w"] + r}, 1.0)
                await peer.until(
                    lambda: any(m.round == r for m in peer.on(topics.agg_model("a1"))),
                    f"model {r}",
                )
                peer.got.clear()  # the test's own copies of the models do not count

            # Execute: a few rounds to warm up, then the measured ones.
            for r in range(warmup + 1):
                await round_trip(r)
            before = tracemalloc.get_traced_memory()[0]
            for r in range(warmup + 1, warmup + rounds + 1):
                await round_trip(r)
            grown = tracemalloc.get_traced_memory()[0] - before
            results = list(service.results)
    finally:
        tracemalloc.stop()

    # Assert: ten rounds of a 1 MiB model left the aggregator's memory where it was, within
    # half a model (keeping every round's model: 10 MiB more); the record still lists every round.
    assert grown < model["w"].nbytes // 2, f"traced memory grew by {grown / MIB:.1f} MiB"
    assert [r.round for r in results] == list(range(1, warmup + rounds + 1))
    assert [bool(r.model) for r in results] == [False] * (warmup + rounds - 1) + [True]
