"""`fedhive models list|download` and `fedhive metrics` through click's CliRunner, on a store
filled by a small real federation of the demo CNN (two agents, two rounds, SQLite)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from support import broker_settings, running_aggregator, spawn

from agent.admin import AdminAgent
from aggregator.store import Store, StoreReader
from aggregator.store.export import export_model
from broker.process import MosquittoBroker
from common.adapters import get_adapter
from common.codec import Array, decode, encode
from common.config import AggregatorConfig
from common.messages import ModelKind
from fedhive.cli import main
from fedhive.demo.task import evaluate, load_digits_split, make_model, shard, train
from fedhive.store_cli import (
    EXIT_CORRUPT,
    EXIT_STORE_ERROR,
    metrics_command,
    models_group,
    plot_metrics,
)

AGENTS = ("agent0", "agent1")
ROUNDS = 2


@dataclass(frozen=True)
class Contrib:
    agent: str
    num_samples: float


@dataclass(frozen=True)
class Federation:
    data_dir: Path
    globals: dict[int, dict[str, Array]]
    locals: dict[tuple[int, str], dict[str, Array]]
    accuracy: dict[tuple[int, str], float]


def weighted_mean(models: Mapping[str, tuple[float, Mapping[str, Array]]]) -> dict[str, Array]:
    weights = np.array([w for w, _ in models.values()], dtype=np.float64)
    first = next(iter(models.values()))[1]
    out: dict[str, Array] = {}
    for name, like in first.items():
        stack = np.stack([np.asarray(t[name], dtype=np.float64) for _, t in models.values()])
        mean = np.tensordot(weights / weights.sum(), stack, axes=1)
        out[name] = (np.rint(mean) if like.dtype.kind in "iub" else mean).astype(like.dtype)
    return out


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """Two agents train the demo CNN for two rounds; everything goes through the store."""
    torch.set_num_threads(1)
    data_dir = tmp_path_factory.mktemp("fedhive-data")
    split = load_digits_split()
    adapter = get_adapter("pytorch")
    state = adapter.to_numpy(make_model())
    fed = Federation(data_dir, {0: state}, {}, {})
    with Store(data_dir=data_dir) as store:
        agg = store.ensure_aggregator("default", "aggr1")
        store.record_base(agg, encode(state), framework="pytorch")
        for rnd in range(1, ROUNDS + 1):
            sent: dict[str, tuple[float, dict[str, Array]]] = {}
            for i, agent in enumerate(AGENTS):
                model = adapter.load_numpy(make_model(), fed.globals[rnd - 1])
                x, y = shard(split, i, len(AGENTS))
                loss = train(model, x[:300], y[:300], seed=10 * rnd + i)
                acc, _ = evaluate(model, split.x_test, split.y_test)
                tensors = adapter.to_numpy(model)
                store.record_local(
                    agg,
                    round=rnd,
                    agent=agent,
                    num_samples=300 + 100 * i,
                    metrics={"accuracy": acc, "loss_training": loss},
                    payload=encode(tensors),
                )
                sent[agent] = (300.0 + 100 * i, tensors)
                fed.locals[rnd, agent] = tensors
                fed.accuracy[rnd, agent] = acc
            fed.globals[rnd] = weighted_mean(sent)
            store.complete_round(
                agg,
                round=rnd,
                payload=encode(fed.globals[rnd]),
                contributors=[Contrib(a, w) for a, (w, _) in sent.items()],
                method="fedavg",
                threshold=1.0,
                started=float(rnd),
                completed=rnd + 0.25,
                bytes_in=1000 * rnd,
                bytes_out=500,
            )
    return fed


def invoke(command: object, *args: str | Path) -> Result:
    return CliRunner().invoke(command, [str(a) for a in args])  # type: ignore[arg-type]


def data_args(fed: Federation | Path) -> list[str]:
    return ["--data-dir", str(fed.data_dir if isinstance(fed, Federation) else fed)]


def assert_same(tensors: Mapping[str, object], expected: Mapping[str, Array]) -> None:
    assert list(tensors) == list(expected)
    for name, value in expected.items():
        got = tensors[name]
        array = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        np.testing.assert_array_equal(array, value, err_msg=name)


# ============================================================================== models list
def test_models_list_table_and_json(federation: Federation) -> None:
    table = invoke(models_group, "list", *data_args(federation))
    result = invoke(models_group, "list", *data_args(federation), "--kind", "local", "--json")

    assert table.exit_code == 0, table.output
    assert "global" in table.output
    assert "agent1" in table.output
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["round"], r["agent"], r["kind"]) for r in rows] == [
        (rnd, agent, "local") for rnd in (1, 2) for agent in AGENTS
    ]
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in rows)


def test_models_list_filters_round_and_best(federation: Federation) -> None:
    result = invoke(models_group, "list", *data_args(federation), "--round", "2", "--json")
    best = invoke(models_group, "list", *data_args(federation), "--kind", "best", "--json")

    assert {(r["kind"], r["round"]) for r in json.loads(result.output)} == {
        ("local", 2),
        ("global", 2),
    }
    [row] = json.loads(best.output)
    assert (row["metric"], row["value"]) == ("accuracy", max(federation.accuracy.values()))


# ============================================================================== download
@pytest.mark.parametrize("fmt", ["pytorch", "npz", "keras", "msgpack"])
def test_download_global_in_each_format(federation: Federation, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"model.{fmt}"

    result = invoke(models_group, "download", *data_args(federation), "--format", fmt, "-o", out)

    assert result.exit_code == 0, result.output
    assert "global model of round 2" in result.output
    expected = federation.globals[ROUNDS]
    if fmt == "pytorch":
        state = torch.load(out, weights_only=True)
        make_model().load_state_dict(state, strict=True)
        assert_same(state, expected)
    elif fmt == "msgpack":
        assert_same(decode(out.read_bytes())[0], expected)
    else:
        with np.load(out) as npz:
            assert_same({k: npz[k] for k in npz.files}, expected)


def test_download_a_local_model_and_the_base(federation: Federation, tmp_path: Path) -> None:
    local = invoke(
        models_group,
        "download",
        *data_args(federation),
        "--kind",
        "local",
        "--round",
        "1",
        "--agent",
        "agent1",
        "--format",
        "npz",
        "-o",
        tmp_path / "local.npz",
    )
    base = invoke(
        models_group,
        "download",
        *data_args(federation),
        "--kind",
        "base",
        "--format",
        "pytorch",
        "-o",
        tmp_path / "base.pt",
    )

    assert local.exit_code == 0, local.output
    with np.load(tmp_path / "local.npz") as npz:
        assert_same({k: npz[k] for k in npz.files}, federation.locals[1, "agent1"])
    assert base.exit_code == 0, base.output
    assert_same(torch.load(tmp_path / "base.pt", weights_only=True), federation.globals[0])


def test_download_best_pytorch_has_the_recorded_accuracy(
    federation: Federation, tmp_path: Path
) -> None:
    # Execute: download the best model and read it into the example model.
    out = tmp_path / "best.pt"
    result = invoke(
        models_group, "download", *data_args(federation), "--kind", "best", "--format", "pytorch",
        "-o", out,
    )  # fmt: skip
    model = make_model()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)

    # Assert: it is the best local model, and it scores exactly the accuracy recorded for it.
    assert result.exit_code == 0, result.output
    (rnd, agent), recorded = max(federation.accuracy.items(), key=lambda kv: kv[1])
    assert f"round {rnd} from {agent}" in result.output
    split = load_digits_split()
    assert evaluate(model, split.x_test, split.y_test)[0] == recorded


@pytest.mark.broker
@pytest.mark.slow
def test_a_real_aggregator_records_the_best_model_for_download(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    """Acceptance 3 end to end: the aggregator writes the store while two demo agents (each
    reporting the accuracy of its trained model on its own shard) train the demo CNN."""
    # Prepare: aggregator a1 persisting in tmp_path; the demo's agent config.
    data_dir = tmp_path / "agg"
    config = AggregatorConfig(
        name="a1", project=project_name, broker=broker_settings(mosquitto), data_dir=data_dir
    )
    agent_config = tmp_path / "config_agent.json"
    agent_config.write_text(
        json.dumps(
            {
                "model_path": str(tmp_path / "agents"),
                "aggr_ip": mosquitto.host,
                "reg_port": str(mosquitto.port),
                "agent_name": "agent",
                "project": project_name,
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
    rounds, agents = 2, 2
    with running_aggregator(config) as service:
        procs = [
            spawn(
                ["-m", "fedhive.demo.agent", "--config", str(agent_config), "--index", str(i),
                 "--agents", str(agents), "--rounds", str(rounds)],
                tmp_path / f"agent{i}.log",
            )
            for i in range(agents)
        ]  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while service.engine.active < agents:  # polled from this thread: it has no loop
                assert time.monotonic() < deadline, "the demo agents did not come online"
                threading.Event().wait(0.05)
            AdminAgent(config_file=agent_config, timeout=30).initialize()
            for proc in procs:
                assert proc.wait(120) == 0, (tmp_path / "agent0.log").read_text()[-2000:]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        # Execute: list and download the best model while the aggregator still runs.
        listed = invoke(
            models_group, "list", *data_args(data_dir), "--project", project_name, "--kind",
            "best", "--json",
        )  # fmt: skip
        out = tmp_path / "f.pt"
        result = invoke(
            main, "models", "download", "--kind", "best", "--format", "pytorch", "-o", out,
            *data_args(data_dir), "--project", project_name,
        )  # fmt: skip

    # Assert: the file loads into the example model, and the model scores exactly the
    # accuracy its agent recorded, computed the way the agent computed it.
    assert listed.exit_code == 0, listed.output
    assert result.exit_code == 0, result.output
    [best] = json.loads(listed.output)
    assert (best["kind"], best["metric"]) == ("local", "accuracy")
    assert [r.round for r in service.results] == list(range(1, rounds + 1))
    model = make_model()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x, y = shard(load_digits_split(), int(best["agent"].removeprefix("agent")), agents)
    assert evaluate(model, x, y)[0] == best["value"]
    with StoreReader(data_dir=data_dir) as store:
        ref = store.resolve_aggregator(project=project_name)
        assert [r.round for r in store.rounds(ref)] == list(range(1, rounds + 1))
        accuracies = [
            p.value
            for p in store.metric_points(project=project_name, metric="accuracy")
            if p.source == "agent"
        ]
    assert len(accuracies) == rounds * agents
    assert best["value"] == max(accuracies)


def test_download_refuses_ambiguity_and_unknowns(federation: Federation, tmp_path: Path) -> None:
    out = tmp_path / "x.npz"
    ambiguous = invoke(
        models_group, "download", *data_args(federation), "--kind", "local", "--format", "npz",
        "-o", out,
    )  # fmt: skip
    missing = invoke(
        models_group, "download", *data_args(federation), "--kind", "sg", "--format", "npz",
        "-o", out,
    )  # fmt: skip
    no_store = invoke(
        models_group, "download", *data_args(tmp_path / "nowhere"), "--format", "npz", "-o", out
    )

    assert ambiguous.exit_code == EXIT_STORE_ERROR
    assert "several local models of round 2 (agent0, agent1)" in ambiguous.output
    assert missing.exit_code == EXIT_STORE_ERROR
    assert "no sg aggregator" in missing.output
    assert no_store.exit_code == EXIT_STORE_ERROR
    assert "no fedhive store" in no_store.output
    assert not out.exists()


def test_a_corrupted_blob_fails_the_download(federation: Federation, tmp_path: Path) -> None:
    # Prepare: a copy of the store whose latest global model has one byte flipped.
    data_dir = tmp_path / "data"
    shutil.copytree(federation.data_dir, data_dir)
    with Store(data_dir=data_dir) as store:
        sha = store.list_models(kind=ModelKind.GLOBAL, round=ROUNDS)[0].sha256
        path = store.blobs.path(sha)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))
    out = tmp_path / "g.pt"

    result = invoke(
        models_group, "download", *data_args(data_dir), "--format", "pytorch", "-o", out
    )

    assert result.exit_code == EXIT_CORRUPT
    assert f"corrupted blob {sha}" in result.output
    assert "sha256 mismatch" in result.output
    assert not out.exists()


def test_a_pruned_model_is_reported(tmp_path: Path) -> None:
    with Store(data_dir=tmp_path, keep_local="none") as store:
        agg = store.ensure_aggregator("default", "aggr1")
        store.record_base(agg, encode({"w": np.zeros(2, np.float32)}), framework="numpy")
        store.record_local(
            agg, round=1, agent="a", num_samples=1, metrics={},
            payload=encode({"w": np.ones(2, np.float32)}),
        )  # fmt: skip
        store.complete_round(
            agg, round=1, payload=encode({"w": np.full(2, 0.5, np.float32)}),
            contributors=[Contrib("a", 1)], method="fedavg", threshold=1.0, started=0.0,
            completed=1.0, bytes_in=0, bytes_out=0,
        )  # fmt: skip

    result = invoke(
        models_group, "download", "--data-dir", tmp_path, "--kind", "local", "--format", "npz",
        "-o", tmp_path / "a.npz",
    )  # fmt: skip

    assert result.exit_code == EXIT_STORE_ERROR
    assert "pruned by the retention setting" in result.output


# ============================================================================== metrics
def test_metrics_table(federation: Federation) -> None:
    result = invoke(metrics_command, *data_args(federation))

    assert result.exit_code == 0, result.output
    for word in ("accuracy", "loss_training", "duration", "bytes_in", "global"):
        assert word in result.output


def test_metrics_json(federation: Federation) -> None:
    result = invoke(metrics_command, *data_args(federation), "--metric", "accuracy", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["project"], data["aggregator"]) == ("default", "aggr1")
    rows = data["metrics"]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        values = [federation.accuracy[row["round"], a] for a in AGENTS]
        assert row["values"] == dict(zip(AGENTS, values, strict=True))
        assert (row["min"], row["max"]) == (min(values), max(values))
        assert row["global"] == pytest.approx((300 * values[0] + 400 * values[1]) / 700)


def test_metrics_plot(federation: Federation, tmp_path: Path) -> None:
    png = tmp_path / "m.png"

    result = invoke(metrics_command, *data_args(federation), "--metric", "accuracy", "--plot", png)

    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


def test_plot_has_one_line_per_series(federation: Federation) -> None:
    with StoreReader(data_dir=federation.data_dir) as store:
        points = store.metric_points()
        summaries = store.metrics()

    one = plot_metrics(points, summaries, metric="accuracy")
    every = plot_metrics(points, summaries, metric=None)
    own = plot_metrics(points, summaries, metric="duration")

    [ax] = one.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [*AGENTS, "global"]  # one per agent and one for the global model
    assert [np.size(line.get_xdata()) for line in ax.get_lines()] == [ROUNDS] * 3
    assert [a.get_title() for a in every.axes] == ["accuracy", "loss_training"]
    assert all(len(a.get_lines()) == 3 for a in every.axes)
    assert [line.get_label() for line in own.axes[0].get_lines()] == ["aggregator"]


def test_metrics_without_data(tmp_path: Path) -> None:
    with Store(data_dir=tmp_path) as store:
        store.ensure_aggregator("default", "aggr1")

    result = invoke(metrics_command, "--data-dir", tmp_path, "--json")

    assert result.exit_code == EXIT_STORE_ERROR
    assert "no metrics recorded for aggregator default/aggr1" in result.output


# ============================================================================== export
def test_export_keeps_bfloat16_for_pytorch_and_widens_it_for_npz(tmp_path: Path) -> None:
    bf16 = np.array([1.5, -2.25, 3.0], dtype=ml_dtypes.bfloat16)
    payload = encode({"w": bf16, "n": np.array(7, np.int64), "odd/name.x": np.ones(1, np.uint16)})

    export_model(payload, "pytorch", tmp_path / "m.pt")
    export_model(payload, "npz", tmp_path / "m.npz")

    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["w"].dtype == torch.bfloat16
    assert state["w"].float().tolist() == [1.5, -2.25, 3.0]
    assert state["n"].item() == 7
    with np.load(tmp_path / "m.npz") as npz:
        assert npz.files == ["w", "n", "odd/name.x"]
        assert npz["w"].dtype == np.float32
        assert npz["w"].tolist() == [1.5, -2.25, 3.0]
