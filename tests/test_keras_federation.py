"""A Keras federation end to end: the Keras digits example's IntegratedClient code path on
generated 8×8 images, the base model uploaded with `fedhive upload-model`, the same
(framework-agnostic) aggregator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from agents_examples.metrics import recording_metrics
from agents_examples.running import started, wait_until
from click.testing import CliRunner
from support import ROOT, broker_settings, recording, running_aggregator, weighted_mean

from agent.cli import upload_model
from agent.integrated import IntegratedClient
from broker.process import MosquittoBroker
from common.adapters import get_adapter
from common.config import AggregatorConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
pytest.importorskip("keras", reason="Keras 3 is not installed")

EXAMPLE = ROOT / "examples" / "keras_digits"

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    # BasicClient hands out copy.deepcopy(model); for Keras that saves the model to an
    # in-memory .h5 file, where Keras calls np.array() on a TensorFlow variable whose
    # __array__ predates NumPy 2's copy keyword.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's directory on sys.path, as when its scripts run from there."""
    monkeypatch.syspath_prepend(str(EXAMPLE))


def agent_config(tmp_path: Path, broker: MosquittoBroker, project: str) -> Path:
    """The example's config, pointed at the test broker and the example's model file."""
    config = json.loads((EXAMPLE / "config_agent.json").read_text())
    config.update(aggr_ip=broker.host, reg_port=str(broker.port), project=project)
    config["aggregator"] = "a1"
    config["heartbeat_interval"] = 0.5
    config["model_timeout"] = 60
    config["base_model"]["model_fn_src"] = str(EXAMPLE / "keras_digits_model.py")
    path = tmp_path / "config_agent.json"
    path.write_text(json.dumps(config))
    return path


def generated_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((count, 8, 8, 1), dtype=np.float32)
    return x, rng.integers(0, 10, size=count).astype(np.int64)


@pytest.mark.usefixtures("example")
def test_three_keras_agents_three_rounds_global_is_the_weighted_mean(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the example's functions, three agents with 16, 24 and 32 generated images.
    from keras_digits_agent import configure
    from keras_digits_model import make_model

    settings = broker_settings(mosquitto)
    config_path = agent_config(tmp_path, mosquitto, project_name)
    clients = [IntegratedClient(config_file=config_path, agent_name=f"keras{i}") for i in range(3)]
    test_data = generated_digits(20, seed=99)
    for i, client in enumerate(clients):
        configure(client, generated_digits(16 + 8 * i, seed=i), test_data, epochs=1, rounds=3)
    aggregator = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
    )

    with (
        running_aggregator(aggregator) as service,
        recording(settings, project_name, "a1") as rec,
        recording_metrics(settings, project_name, "a1") as sent,
        started(clients) as errors,
    ):
        # Execute: the admin uploads the base model named by the config (model_format Keras).
        wait_until(lambda: service.engine.active == 3, "3 agents online")
        result = CliRunner().invoke(upload_model, ["--config_path", str(config_path)])
        assert result.exit_code == 0, result.output
        for r in (1, 2, 3):
            rec.wait_for_global(r, timeout=90)
        for client in clients:
            wait_until(lambda c=client: c.training_finalized, f"{client.agent_name} to finish")

    # Assert: each global model is the sample-weighted mean of that round's local models.
    assert errors == []
    for r in (1, 2, 3):
        message, global_model = rec.globals[r]
        local = rec.locals[r]
        assert sorted(local) == ["keras0", "keras1", "keras2"]
        assert message.framework == "keras"
        assert sorted(w for w, _ in local.values()) == [16.0, 24.0, 32.0]
        expected = weighted_mean(local)
        assert "digits_cnn" not in " ".join(expected)  # names are relative to the model
        assert "batch_normalization/moving_mean" in expected
        for name, value in expected.items():
            got = global_model[name]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got.astype(np.float64), value, rtol=0, atol=1e-6)
        for name in ("keras0", "keras1", "keras2"):
            metrics = sent.sent[(r, name)].metrics
            assert set(metrics) == {
                "sg_accuracy",
                "sg_loss_valid",
                "loss_training",
                "accuracy",
                "loss_valid",
                "accuracy_test",
                "loss_test",
            }
    # The models really trained: the last aggregate differs from the base model.
    base = get_adapter("keras").to_numpy(make_model())
    assert sorted(base) == sorted(rec.globals[3][1])
    assert any(not np.array_equal(base[k], rec.globals[3][1][k]) for k in base)
    assert all(c.federated_training_round == 3 for c in clients)


@pytest.mark.usefixtures("example")
def test_the_keras_daemon_entry_point_configures_a_client(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: what `fedhive agent run --entry keras_digits_agent:setup -p ...` calls
    from keras_digits_agent import setup

    client = IntegratedClient(
        config_file=agent_config(tmp_path, mosquitto, project_name), agent_name="entry"
    )

    # Execute: set up from string parameters (scikit-learn's digits), then a start() that
    # may run no round
    setup(client, index="1", agents="3", rounds="2")
    client.maximum_rounds = 0
    client.start()

    # Assert: training function and model were registered (start() checks both)
    assert client.training_finalized
