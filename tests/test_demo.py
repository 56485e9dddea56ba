"""`fedhive demo` with its defaults: a real federation whose accuracy matches centralized."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from fedhive.demo.run import DemoOptions, run_demo

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_defaults_reach_centralized_accuracy(tmp_path: Path) -> None:
    # Execute: the defaults of `fedhive demo` (3 agent processes, 8 rounds).
    options = DemoOptions(workdir=tmp_path)
    with (tmp_path / "out.txt").open("w") as out:
        result = run_demo(options, Console(file=out))
    # Assert: every round produced a global model; the final one is within 3 points.
    assert len(result.accuracies) == options.rounds
    assert result.accuracies[-1] > 0.9
    assert abs(result.accuracies[-1] - result.centralized) <= 0.03, result


@pytest.mark.timeout(300)  # two whole demos on a shared machine
def test_demo_with_two_aggregators_reaches_the_accuracy_of_one(tmp_path: Path) -> None:
    # Execute: the same federation (agents, shards, seeds) with one aggregator, then with an
    # sg-aggregator over two aggregators (the agents spread over them in turn).
    with (tmp_path / "out.txt").open("w") as out:
        one = run_demo(DemoOptions(workdir=tmp_path / "one"), Console(file=out))
        two = run_demo(DemoOptions(workdir=tmp_path / "two", aggregators=2), Console(file=out))
    # Assert: every round produced an SG model; the final accuracy is within 3 points of the
    # single-aggregator run (FedAvg over the SG layer is the same weighted mean).
    assert len(two.accuracies) == DemoOptions().rounds
    assert two.accuracies[-1] > 0.9
    assert abs(two.accuracies[-1] - one.accuracies[-1]) <= 0.03, (one, two)
    logs = (tmp_path / "two" / "sg-aggregator.log").read_text()
    assert "SG round 8 aggregated with fedavg from 2 regional results (3 agents)" in logs
