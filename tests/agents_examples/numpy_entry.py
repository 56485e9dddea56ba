"""A daemon entry point for tests: a NumPy dict model, "trained" by adding a delta.

``fedhive agent run --entry /path/numpy_entry.py:setup -p gate=DIR -p delta=1 -p samples=10``

With ``gate``, training for round r writes ``DIR/training-r`` and then waits until the test
creates ``DIR/r``, so a test knows the agent is mid-round and decides when it finishes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.integrated import IntegratedClient

Model = dict[str, np.ndarray[Any, Any]]


def tiny_model() -> Model:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def setup(client: IntegratedClient, **params: str) -> None:
    gate = Path(params["gate"]) if "gate" in params else None
    delta = float(params.get("delta", "1"))
    rounds = int(params["rounds"]) if "rounds" in params else None

    def train(model: Model, data: Any, **kwargs: Any) -> tuple[Model, float]:
        target = (client.current_round or 0) + 1
        if gate is not None:
            (gate / f"training-{target}").touch()
            opened = threading.Event()
            while not (gate / str(target)).exists():
                opened.wait(0.05)  # held here until the test opens the gate
        return {k: np.asarray(v + delta, dtype=v.dtype) for k, v in model.items()}, 0.5

    def validate(model: Model, data: Any, **kwargs: Any) -> tuple[float, float]:
        return float(model["w"].mean()), 1.0

    def judge_termination(**kwargs: Any) -> bool:
        if rounds is not None and client.federated_training_round >= rounds:
            client.stop_model_exchange_routine()
            return False
        return True

    client.num_samples = float(params.get("samples", "10"))
    client.set_training_function(train, None)
    client.set_cross_validation_function(validate, None)
    client.set_termination_function(judge_termination)
    client.set_bm_obj(tiny_model())
