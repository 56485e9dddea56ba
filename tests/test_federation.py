"""A federation end to end over a real Mosquitto: agents in separate processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import broker_settings, recording, running_aggregator, spawn, weighted_mean

from agent.client import BasicClient
from broker.process import MosquittoBroker
from common.config import AggregatorConfig
from fedhive.demo.task import make_model

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _agent_config(tmp_path: Path, broker: MosquittoBroker, project: str) -> Path:
    path = tmp_path / "config_agent.json"
    path.write_text(
        json.dumps(
            {
                "model_path": str(tmp_path / "agents"),
                "aggr_ip": broker.host,
                "reg_port": str(broker.port),
                "token": None,
                "agent_name": "agent",
                "project": project,
                "aggregator": "a1",
                "heartbeat_interval": 1.0,
                "base_model": {
                    "model_fn": "make_model",
                    "model_fn_src": "fedhive.demo.task",
                    "model_format": "PyTorch",
                    "model_name": "digits-cnn",
                },
            }
        )
    )
    return path


def test_three_agent_processes_three_rounds_weighted_mean_then_late_joiner(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: an aggregator whose global models travel in 16 KiB chunks, so the late joiner
    # must fetch the chunks of a retained manifest it subscribed to after they went out.
    settings = broker_settings(mosquitto, chunk_size=16 * 1024)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
    )
    agent_cfg = _agent_config(tmp_path, mosquitto, project_name)
    rounds = 3
    with running_aggregator(config) as service, recording(settings, project_name, "a1") as rec:
        procs = [
            spawn(
                [
                    "-m",
                    "fedhive.demo.agent",
                    "--config",
                    str(agent_cfg),
                    "--index",
                    str(i),
                    "--agents",
                    "3",
                    "--rounds",
                    str(rounds),
                ],
                tmp_path / f"agent{i}.log",
            )
            for i in range(3)
        ]
        try:
            from agent.admin import AdminAgent

            # Execute: wait for all three agents, then upload the base model.
            _wait(lambda: service.engine.active == 3, "3 agents online")
            AdminAgent(config_file=agent_cfg, timeout=30).initialize()
            for r in range(1, rounds + 1):
                rec.wait_for_global(r, timeout=90)
            for proc in procs:
                assert proc.wait(60) == 0, (tmp_path / "agent0.log").read_text()[-2000:]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()

        # Assert: each global model is the sample-weighted mean of that round's local models.
        for r in range(1, rounds + 1):
            message, global_model = rec.globals[r]
            local = rec.locals[r]
            assert sorted(local) == ["agent0", "agent1", "agent2"]
            assert sorted(c.agent for c in message.contributors) == sorted(local)
            sizes = {w for w, _ in local.values()}
            assert len(sizes) == 3, "unequal sample counts make weighting observable"
            expected = weighted_mean(local)
            for name, value in expected.items():
                got = global_model[name]
                assert got.dtype == next(iter(local.values()))[1][name].dtype
                np.testing.assert_allclose(
                    got.astype(np.float64),
                    value,
                    rtol=0,
                    atol=1e-6,
                    err_msg=f"round {r} tensor {name}",
                )
            # An equal-weight mean would differ: the test can tell the two apart.
            equal = weighted_mean({k: (1.0, t) for k, (_, t) in local.items()})
            assert any(
                np.abs(equal[n] - expected[n]).max() > 1e-6
                for n in expected
                if expected[n].dtype.kind == "f"
            )

        # Execute: an agent connecting after round 3 starts from the current model.
        late = BasicClient(config_file=agent_cfg, agent_name="late", model_timeout=30)
        try:
            late.set_bm_obj(make_model())
            model = late.wait_for_sg_model()
            state = {k: v.numpy() for k, v in model.state_dict().items()}
        finally:
            late.disconnect()
        _, current = rec.globals[rounds]
        assert late.current_round == rounds
        for name, value in current.items():
            np.testing.assert_array_equal(state[name], value)
        base = {k: v.numpy() for k, v in make_model().state_dict().items()}
        assert any(not np.array_equal(base[k], current[k]) for k in current)


def _wait(predicate: object, what: str, timeout: float = 60.0) -> None:
    import threading

    done = threading.Event()
    # Poll the aggregator's state from this thread: it lives in another event loop.
    for _ in range(int(timeout / 0.05)):
        if predicate():  # type: ignore[operator]
            return
        done.wait(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
