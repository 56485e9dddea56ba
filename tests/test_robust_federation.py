"""Issue 3, end to end over the broker: 2 of 8 agents send sign-flipped, 100x scaled models.

Robust methods keep the global model's digits accuracy within 3 points of the attack-free run;
FedAvg collapses (the control). Agents are BasicClients in threads with a NumPy softmax model.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import broker_settings, running_aggregator

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient
from broker.process import MosquittoBroker
from common.codec import Array
from common.config import AggregatorConfig
from fedhive.demo.task import load_digits_split, shard

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENTS, ATTACKERS, ROUNDS = 8, 2, 5


def _base() -> dict[str, Array]:
    rng = np.random.default_rng(0)
    return {
        "W": (rng.standard_normal((64, 10)) * 0.01).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }


def _train(model: dict[str, Array], x: Array, y: Array, steps: int = 30) -> dict[str, Array]:
    """Full-batch gradient descent on softmax cross-entropy."""
    w, b = model["W"].astype(np.float64), model["b"].astype(np.float64)
    onehot = np.eye(10)[y]
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(y)
        w -= 0.5 * x.T @ grad
        b -= 0.5 * grad.sum(0)
    return {"W": w.astype(np.float32), "b": b.astype(np.float32)}


def _accuracy(model: dict[str, Array], x: Array, y: Array) -> float:
    return float(((x @ model["W"] + model["b"]).argmax(1) == y).mean())


def _federate(
    broker: MosquittoBroker,
    project: str,
    method: str,
    params: dict[str, Any],
    attackers: int,
    tmp_path: Path,
) -> float:
    split = load_digits_split()
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    x_test, y_test = flat(split.x_test).astype(np.float64), split.y_test
    config = AggregatorConfig(
        name="a1",
        project=project,
        broker=broker_settings(broker),
        method=method,
        method_params=params,
        data_dir=tmp_path / project,
    )
    common = {
        "aggregator_ip_address": broker.host,
        "reg_port": broker.port,
        "project": project,
        "aggregator": "a1",
        "model_timeout": 60,
    }
    online = threading.Barrier(AGENTS + 1, timeout=60)

    def agent(i: int) -> None:
        x, y = shard(split, i, AGENTS)
        x = flat(x).astype(np.float64)
        with BasicClient(agent_name=f"agent{i}", **common) as client:
            client.set_bm_obj(_base())
            online.wait()
            model = client.wait_for_sg_model()
            for _ in range(ROUNDS):
                local = _train(model, x, y)
                if i < attackers:  # sign-flipped, 100x scaled
                    local = {k: (-100 * v).astype(v.dtype) for k, v in local.items()}
                client.send_trained_model(
                    local, {"accuracy": _accuracy(local, x, y)}, num_samples=len(y)
                )
                model = client.wait_for_sg_model()

    with running_aggregator(config) as service, ThreadPoolExecutor(AGENTS) as pool:
        futures = [pool.submit(agent, i) for i in range(AGENTS)]
        online.wait()
        AdminAgent(
            aggregator_ip_address=broker.host,
            reg_port=broker.port,
            project=project,
            timeout=30,
            base_model=BaseModel("softmax", _base(), BaseModelConvFormat.numpy_format),
        ).initialize()
        for f in futures:
            f.result(timeout=120)
        assert len(service.results) == ROUNDS
        assert all(len(r.contributors) == AGENTS for r in service.results)
        assert {r.method for r in service.results} == {method}
        return _accuracy(service.results[-1].model, x_test, y_test)


def test_robust_methods_resist_sign_flip_attack_and_fedavg_collapses(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the attack-free reference.
    clean = _federate(mosquitto, f"{project_name}_clean", "fedavg", {}, 0, tmp_path)
    assert clean > 0.85
    # Execute / Assert: each robust method under attack stays within 3 points.
    robust = {
        "krum_averaging": {"f": ATTACKERS},
        "geometric_median": {},
        "coordinate_median": {},
    }
    for method, params in robust.items():
        acc = _federate(mosquitto, f"{project_name}_{method}", method, params, ATTACKERS, tmp_path)
        assert abs(acc - clean) <= 0.03, f"{method}: {acc:.3f} vs attack-free {clean:.3f}"
    # The control: FedAvg under the same attack collapses.
    attacked = _federate(mosquitto, f"{project_name}_fedavg", "fedavg", {}, ATTACKERS, tmp_path)
    assert attacked < clean - 0.5, f"fedavg under attack: {attacked:.3f}"
