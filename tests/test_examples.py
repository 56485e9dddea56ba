"""The examples' code paths on tiny generated data of the right shapes: the CIFAR-10 loader and
its non-IID skew, and one federated round of the CIFAR-10 VGG16 example (BasicClient and
IntegratedClient variants) driven by the seed's config_agent.json shape, unchanged."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from agents_examples.cifar_files import write_batch, write_fake_cifar10
from agents_examples.running import started, wait_until
from click.testing import CliRunner
from support import ROOT, broker_settings, recording, running_aggregator, weighted_mean

from agent.client import BasicClient
from agent.integrated import IntegratedClient
from broker.process import MosquittoBroker
from common.config import AggregatorConfig
from fedhive.cli import main

CIFAR = ROOT / "examples" / "cifar10"


@pytest.fixture
def cifar_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's directory on sys.path, as when its scripts run from there."""
    monkeypatch.syspath_prepend(str(CIFAR))


pytestmark = pytest.mark.usefixtures("cifar_example")


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar10_loader_reads_the_python_batch_files(tmp_path: Path) -> None:
    # Prepare: generated batches, one image with a known pixel layout
    from cifar10_data import load_cifar10, read_batch

    folder = write_fake_cifar10(tmp_path, per_batch=12, test=10)
    image = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    image[0, 1, 2] = (10, 20, 30)  # row 1, column 2: red 10, green 20, blue 30
    write_batch(folder / "known", image, [7], "known")

    # Execute
    data = load_cifar10(tmp_path)  # the parent of cifar-10-batches-py also works
    images, labels = read_batch(folder / "known")

    # Assert
    assert data.x_train.shape == (60, 32, 32, 3)
    assert data.x_train.dtype == np.uint8
    assert data.y_train.shape == (60,)
    assert data.x_test.shape == (10, 32, 32, 3)
    assert data.y_test.tolist() == list(range(10))
    assert tuple(images[0, 1, 2]) == (10, 20, 30)
    assert images[0].sum() == 60
    assert labels.tolist() == [7]


def test_cifar10_batch_files_cannot_run_code(tmp_path: Path) -> None:
    from cifar10_data import read_batch

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match=r"system is not allowed"):
        read_batch(path)


def test_the_non_iid_skew_keeps_sel_count_of_the_subset_and_def_count_of_the_rest() -> None:
    from cifar10_data import CLASS_SUBSETS, CLASSES, skewed_indices

    labels = np.tile(np.arange(10), 20)  # 20 samples of every class, interleaved

    keep = skewed_indices(labels, CLASS_SUBSETS[1], sel_count=1.0, def_count=0.25)

    counts = dict(zip(CLASSES, np.bincount(labels[keep], minlength=10).tolist(), strict=True))
    assert counts == {c: 20 if c in ("bird", "cat", "deer") else 5 for c in CLASSES}
    # The first ones of each class in file order, as the seed takes them.
    assert keep[labels[keep] == 0].tolist() == [0, 10, 20, 30, 40]
    assert sorted(sum(CLASS_SUBSETS, ())) == sorted(CLASSES)
    with pytest.raises(ValueError, match="unknown CIFAR-10 classes"):
        skewed_indices(labels, ("lion",), sel_count=1.0, def_count=0.1)


def test_the_training_augmentation_keeps_shapes() -> None:
    from cifar10_data import augment

    x = torch.randn(5, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)


@pytest.mark.broker
@pytest.mark.slow
def test_cifar10_one_round_from_the_seed_config_with_both_client_variants(
    fresh_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Prepare: the seed's config as shipped, pointed at this broker (its own: the config
    # names neither project nor aggregator, so the defaults "default" and "aggr1" apply).
    import basic_client_agent
    import integrated_client_agent
    from cifar10_data import CLASS_SUBSETS, agent_loaders, load_cifar10

    seed_config = json.loads((CIFAR / "config_agent.json").read_text())
    assert set(seed_config) == {"model_path", "aggr_ip", "reg_port", "token", "base_model"}
    assert set(seed_config["base_model"]) == {
        "model_fn",
        "model_fn_src",
        "model_format",
        "model_name",
    }
    workdir = tmp_path / "cifar10"
    workdir.mkdir()
    config_path = workdir / "config_agent.json"
    config_path.write_text(
        json.dumps(
            {**seed_config, "aggr_ip": fresh_broker.host, "reg_port": str(fresh_broker.port)}
        )
    )
    shutil.copy(CIFAR / "vgg.py", workdir / "vgg.py")  # model_fn_src "vgg": next to the config
    data = load_cifar10(write_fake_cifar10(workdir / "data", per_batch=8, test=10))
    basic_train, test_loader = agent_loaders(
        data, CLASS_SUBSETS[0], sel_count=1.0, def_count=0.5, batch_size=16
    )
    integrated_train, _ = agent_loaders(
        data, CLASS_SUBSETS[1], sel_count=1.0, def_count=0.25, batch_size=16
    )
    settings = broker_settings(fresh_broker)
    aggregator = AggregatorConfig(broker=settings, data_dir=tmp_path / "agg")

    with (
        running_aggregator(aggregator) as service,
        recording(settings, "default", "aggr1") as rec,
    ):
        basic = BasicClient(config_file=config_path, agent_name="basic", model_timeout=120)
        integrated = IntegratedClient(config_file=config_path, agent_name="integrated")
        integrated_client_agent.configure(
            integrated, integrated_train, test_loader, epochs=1, round_to_exit=1
        )
        basic_errors: list[BaseException] = []
        basic_metrics: dict[str, float] = {}

        def run_basic() -> None:
            try:
                basic_metrics.update(
                    basic_client_agent.run(basic, basic_train, test_loader, epochs=2, send_every=2)
                )
            except BaseException as exc:
                basic_errors.append(exc)
            finally:
                basic.disconnect()

        wait_until(lambda: service.engine.active == 2, "both agents online")
        # Execute: `fedhive upload-model --config_path` builds VGG16 from the seed config...
        result = CliRunner().invoke(
            main, ["upload-model", "--config_path", str(config_path), "--timeout", "60"]
        )
        assert result.exit_code == 0, result.output
        # ... and both example variants train one round on the generated images.
        basic_thread = threading.Thread(target=run_basic)
        basic_thread.start()
        with started([integrated]) as errors:
            _, global_model = rec.wait_for_global(1, timeout=120)
            wait_until(lambda: integrated.training_finalized, "the IntegratedClient to finish")
        basic_thread.join(60)

    # Assert: one round with both models, weighted by their sample counts.
    assert errors == []
    assert basic_errors == []
    local = rec.locals[1]
    assert sorted(local) == ["basic", "integrated"]
    assert local["basic"][0] == len(basic_train.dataset)  # type: ignore[arg-type]
    assert local["integrated"][0] == len(integrated_train.dataset)  # type: ignore[arg-type]
    expected = weighted_mean(local)
    assert "features.1.num_batches_tracked" in expected  # BatchNorm counters travel too
    for name, value in expected.items():
        np.testing.assert_allclose(
            global_model[name].astype(np.float64), value, rtol=0, atol=1e-6, err_msg=name
        )
    assert set(basic_metrics) == {"accuracy", "loss_training", "loss_valid"}
    assert integrated.training_count == 1
    assert set(integrated.last_metrics) >= {"accuracy", "loss_training", "loss_test"}
    assert basic.current_round == integrated.current_round == 1


@pytest.mark.broker
def test_the_cifar10_daemon_entry_point_configures_a_client(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: what `fedhive agent run --entry integrated_client_agent:setup -p ...` calls
    from integrated_client_agent import setup

    write_fake_cifar10(tmp_path / "data", per_batch=4, test=4)
    client = IntegratedClient(
        aggregator_ip_address=mosquitto.host,
        reg_port=mosquitto.port,
        project=project_name,
        agent_name="entry",
    )

    # Execute: set up from string parameters, then a start() that may run no round
    setup(client, data=str(tmp_path / "data"), subset="2", def_count="0.5", round_to_exit="5")
    client.maximum_rounds = 0
    client.start()

    # Assert: training function and model were registered (start() checks both)
    assert client.training_finalized
    assert client.training_count == 0
