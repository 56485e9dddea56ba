"""The load benchmark's code path in CI (issue 8, acceptance 5, scaled down): bench/load.py
with 50 agents in 2 processes, 1 s heartbeats, 2 rounds; every round completes with all 50."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import ROOT, python_env

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_every_round_completes_with_every_agent() -> None:
    # Execute: the benchmark starts its own broker, aggregator and agent processes.
    done = subprocess.run(
        [
            *(sys.executable, str(ROOT / "bench" / "load.py")),
            *("--agents", "50", "--processes", "2", "--rounds", "2"),
        ],
        capture_output=True,
        env=python_env(),
        timeout=280,
        check=False,
    )

    # Assert: one JSON line; all rounds complete with all 50 agents, every upload accepted.
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["all_complete"] is True
    assert result["contributors"] == [50, 50]
    assert result["acks_accepted"] == 100
    assert len(result["round_s"]) == 2
    assert result["broker_cpu_s"] >= 0
