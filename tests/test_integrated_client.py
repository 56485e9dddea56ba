"""IntegratedClient over a real Mosquitto: fedhive runs the loop around the user's functions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agents_examples.metrics import recording_metrics
from agents_examples.running import started, wait_until
from support import broker_settings, recording, running_aggregator, weighted_mean

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.integrated import IntegratedClient, sample_count
from broker.process import MosquittoBroker
from common.codec import Array
from common.config import AggregatorConfig
from common.errors import ConfigError

pytestmark = pytest.mark.broker

Model = dict[str, Array]


def base_model() -> Model:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def make_client(broker: MosquittoBroker, project: str, name: str) -> IntegratedClient:
    return IntegratedClient(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        agent_name=name,
        project=project,
        aggregator="a1",
        heartbeat_interval=0.5,
        model_timeout=30,
        ack_timeout=10,
    )


def upload(broker: MosquittoBroker, project: str, model: Any, kind: str) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        timeout=30,
        base_model=BaseModel("tiny", model, kind),
    ).initialize()


def aggregator(broker: MosquittoBroker, project: str, tmp_path: Path) -> AggregatorConfig:
    return AggregatorConfig(
        name="a1", project=project, broker=broker_settings(broker), data_dir=tmp_path / "agg"
    )


def test_three_clients_run_three_rounds_stop_by_termination_and_send_what_functions_returned(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: three agents with unequal data; every function records what it returned.
    settings = broker_settings(mosquitto)
    returned: dict[str, list[tuple[str, float, float]]] = {}
    termination_calls: dict[str, list[tuple[int, int, int]]] = {}
    clients = [make_client(mosquitto, project_name, f"agent{i}") for i in range(3)]
    for i, client in enumerate(clients):
        name = client.agent_name
        returned[name] = []
        termination_calls[name] = []
        data = np.zeros((10 * (i + 1), 4), dtype=np.float32)  # 10, 20, 30 samples

        def train(
            model: Model, data: Any, *, delta: float, log: list[Any] = returned[name]
        ) -> tuple[Model, float]:
            trained = {k: np.asarray(v + delta, v.dtype) for k, v in model.items()}
            loss = 0.25 * delta + len(log)
            log.append(("train", loss, 0.0))
            return trained, loss

        def evaluate(
            model: Model, data: Any, *, role: str, log: list[Any] = returned[name]
        ) -> tuple[np.float32, float]:
            figures = (np.float32(model["w"].mean() / 10), float(model["b"].sum()) + len(log))
            log.append((role, float(figures[0]), figures[1]))
            return figures

        def judge_termination(**kwargs: Any) -> bool:
            me: IntegratedClient = kwargs["client"]
            kwargs["calls"].append(
                (kwargs["training_count"], kwargs["sg_arrival_count"], me.federated_training_round)
            )
            if me.federated_training_round >= kwargs["round_to_exit"]:
                me.stop_model_exchange_routine()
                return False
            return True

        client.set_training_function(train, data, delta=float(i + 1))
        client.set_cross_validation_function(evaluate, data, role="validate")
        client.set_testing_function(evaluate, data, role="test")
        client.set_termination_function(
            judge_termination, round_to_exit=3, client=client, calls=termination_calls[name]
        )
        client.set_bm_obj(base_model())

    config = aggregator(mosquitto, project_name, tmp_path)
    with (
        running_aggregator(config) as service,
        recording(settings, project_name, "a1") as rec,
        recording_metrics(settings, project_name, "a1") as sent,
        started(clients) as errors,
    ):
        # Execute: once all three are online, the admin uploads the base model.
        wait_until(lambda: service.engine.active == 3, "3 agents online")
        upload(mosquitto, project_name, base_model(), BaseModelConvFormat.numpy_format)
        for r in (1, 2, 3):
            rec.wait_for_global(r, timeout=60)
        sent_models = sent.wait_for(9)
        for client in clients:
            wait_until(lambda c=client: c.training_finalized, f"{client.agent_name} to finish")

    # Assert: three rounds, then each stopped by its termination function, cleanly.
    assert errors == []
    assert sorted(sent_models) == [(r, f"agent{i}") for r in (1, 2, 3) for i in range(3)]
    for i, client in enumerate(clients):
        name = client.agent_name
        # Three SG models trained from, then the final aggregate, waited for before leaving.
        assert (client.training_count, client.sg_arrival_count) == (3, 4)
        assert client.federated_training_round == 3
        for tensor, value in rec.globals[3][1].items():
            np.testing.assert_array_equal(client.sg_model[tensor], value)
        # Live counts before every round, and the round number the seed's example reads.
        assert termination_calls[name] == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)]
        # Per round: validate(SG), train, validate(local), test(local), in that order.
        calls = returned[name]
        assert [c[0] for c in calls] == ["validate", "train", "validate", "test"] * 3
        for r in (1, 2, 3):
            sg_val, trained, local_val, tested = calls[4 * (r - 1) : 4 * r]
            expected = {
                "sg_accuracy": sg_val[1],
                "sg_loss_valid": sg_val[2],
                "loss_training": trained[1],
                "accuracy": local_val[1],
                "loss_valid": local_val[2],
                "accuracy_test": tested[1],
                "loss_test": tested[2],
            }
            assert sent_models[(r, name)].metrics == pytest.approx(expected, abs=0, rel=1e-12)
            assert sent_models[(r, name)].num_samples == 10 * (i + 1)
        assert client.last_metrics == sent_models[(3, name)].metrics
    for r in (1, 2, 3):
        _, global_model = rec.globals[r]
        expected_model = weighted_mean(rec.locals[r])
        for tensor, value in expected_model.items():
            np.testing.assert_allclose(global_model[tensor], value, rtol=0, atol=1e-6)
    assert 4 not in rec.locals


def test_stop_while_waiting_for_a_model_ends_start_cleanly(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: no base model is ever uploaded, so the client waits for one.
    client = make_client(mosquitto, project_name, "waiter")
    client.set_training_function(lambda m, d: (m, 0.0), None)
    client.set_bm_obj(base_model())
    config = aggregator(mosquitto, project_name, tmp_path)
    with running_aggregator(config) as service, started([client]) as errors:
        wait_until(lambda: service.engine.active == 1, "the agent online")

        # Execute
        began = time.monotonic()
        client.stop_model_exchange_routine()
        wait_until(lambda: client.training_finalized, "start() to return", timeout=10)

    # Assert: within about one wait slice, nothing trained, no error.
    assert time.monotonic() - began < client.wait_slice + 2
    assert errors == []
    assert (client.training_count, client.sg_arrival_count) == (0, 0)


def test_maximum_rounds_and_termination_with_named_parameters(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: a termination function that takes the live counts by name (no **kwargs) and
    # never ends the loop itself; the seed's `maximum_rounds` attribute ends it after 2.
    seen: list[tuple[int, int, str]] = []

    def judge_termination(training_count: int, sg_arrival_count: int, tag: str) -> bool:
        seen.append((training_count, sg_arrival_count, tag))
        return True

    client = make_client(mosquitto, project_name, "solo")
    client.set_training_function(
        lambda m, d: ({k: v + 1 for k, v in m.items()}, 0.0), (np.zeros((7, 2)), np.zeros(7))
    )
    client.set_termination_function(judge_termination, tag="x", training_count=99)
    client.set_bm_obj(base_model())
    client.maximum_rounds = 2
    config = aggregator(mosquitto, project_name, tmp_path)
    settings = broker_settings(mosquitto)
    with (
        running_aggregator(config) as service,
        recording_metrics(settings, project_name, "a1") as sent,
        started([client]) as errors,
    ):
        wait_until(lambda: service.engine.active == 1, "the agent online")
        upload(mosquitto, project_name, base_model(), BaseModelConvFormat.numpy_format)
        wait_until(lambda: client.training_finalized, "start() to return")

    # Assert: the live counts replace a registered value of the same name; no validation
    # function, so only the training loss travels; (x, y) data count 7 samples.
    assert errors == []
    assert seen == [(0, 0, "x"), (1, 1, "x")]
    assert client.training_count == 2
    assert sent.sent[(2, "solo")].metrics == {"loss_training": 0.0}
    assert sent.sent[(2, "solo")].num_samples == 7


def test_start_needs_a_training_function_and_a_model(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    client = make_client(mosquitto, project_name, "lazy")
    try:
        with pytest.raises(ConfigError, match="set_training_function"):
            client.start()
        client.set_training_function(lambda m, d: (m, 0.0), None)
        with pytest.raises(ConfigError, match=r"set_bm_obj\(model\) before start\(\)"):
            client.start()
    finally:
        client.disconnect()


@pytest.mark.parametrize(
    ("data", "count"),
    [
        (np.zeros((5, 3)), 5),
        ((np.zeros((6, 2)), np.zeros(6)), 6),
        ([1, 2, 3, 4], 4),
        (None, None),
        (object(), None),
    ],
)
def test_sample_count(data: Any, count: int | None) -> None:
    assert sample_count(data) == count


def test_sample_count_of_a_torch_data_loader() -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(9, 2)), batch_size=4)
    assert sample_count(loader) == 9


def test_the_model_is_built_from_the_config_when_none_is_set(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: model_fn in a file next to the config, called with model_fn_args
    (tmp_path / "tiny_model.py").write_text(
        "import numpy as np\n\n\n"
        "def build(width):\n"
        "    return {'w': np.zeros((2, width), dtype=np.float32)}\n"
    )
    config_path = tmp_path / "config_agent.json"
    config_path.write_text(
        json.dumps(
            {
                "aggr_ip": mosquitto.host,
                "reg_port": str(mosquitto.port),
                "agent_name": "built",
                "project": project_name,
                "aggregator": "a1",
                "base_model": {
                    "model_fn": "build",
                    "model_fn_src": "tiny_model",
                    "model_fn_args": {"width": 5},
                    "model_format": "NumPy",
                },
            }
        )
    )
    client = IntegratedClient(config_file=config_path)
    client.set_training_function(lambda m, d: ({"w": m["w"] + 1}, 0.0), None)
    client.maximum_rounds = 1
    config = aggregator(mosquitto, project_name, tmp_path)
    with running_aggregator(config) as service, started([client]) as errors:
        wait_until(lambda: service.engine.active == 1, "the agent online")

        # Execute: the admin's base model has the shape the config's model_fn builds
        upload(mosquitto, project_name, {"w": np.zeros((2, 5), np.float32)}, "NumPy")
        wait_until(lambda: client.training_finalized, "start() to return")

    # Assert: one round trained from the built model; the final aggregate came back
    assert errors == []
    assert client.training_count == 1
    np.testing.assert_array_equal(client.sg_model["w"], np.ones((2, 5), np.float32))
