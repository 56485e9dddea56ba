"""The `fedhive` CLI through click's CliRunner (upload-model against a real Mosquitto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import broker_settings, running_aggregator

from broker.process import MosquittoBroker
from common.config import AggregatorConfig
from fedhive.cli import main

MODEL_SRC = """
import numpy as np

def tiny_model(width=3):
    return {"w": np.ones((2, width), dtype=np.float32), "b": np.zeros(width, dtype=np.float32)}
"""


def _config(tmp_path: Path, broker: MosquittoBroker, project: str) -> Path:
    (tmp_path / "tinymodel.py").write_text(MODEL_SRC)
    path = tmp_path / "config_agent.json"
    path.write_text(
        json.dumps(
            {
                "model_path": "./data/agent",
                "aggr_ip": broker.host,
                "reg_port": str(broker.port),
                "token": "stadle12345",
                "agent_name": "default_agent",
                "project": project,
                "aggregator": "a1",
                "base_model": {
                    "model_fn": "tiny_model",
                    "model_fn_src": "tinymodel",
                    "model_format": "NumPy",
                    "model_name": "tiny",
                    "model_fn_args": {"width": 4},
                },
            }
        )
    )
    return path


@pytest.mark.broker
@pytest.mark.parametrize(
    "args",
    [
        ["upload-model", "--config_path"],
        ["upload-model", "--config-path"],
        ["upload_model", "--config_path"],
    ],
)
def test_upload_model_spellings_reach_the_aggregator(
    args: list[str], mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare
    config = AggregatorConfig(name="a1", project=project_name, broker=broker_settings(mosquitto))
    path = _config(tmp_path, mosquitto, project_name)
    with running_aggregator(config) as service:
        # Execute
        result = CliRunner().invoke(main, [*args, str(path), "--timeout", "20"])
        # Assert
        assert result.exit_code == 0, result.output
        assert "confirmed" in result.output
        assert service.engine.model_round == 0
        assert service.engine.model is not None
        assert service.engine.model["w"].shape == (2, 4)


@pytest.mark.broker
def test_upload_model_without_aggregator_fails_clearly(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    path = _config(tmp_path, mosquitto, project_name)
    result = CliRunner().invoke(
        main, ["upload-model", "--config_path", str(path), "--timeout", "1"]
    )
    assert result.exit_code != 0
    assert "no aggregator" in result.output
    assert project_name in result.output


def test_upload_model_with_bad_model_source_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "config_agent.json"
    path.write_text(json.dumps({"base_model": {"model_fn": "f", "model_fn_src": "nowhere"}}))
    result = CliRunner().invoke(main, ["upload-model", "--config_path", str(path)])
    assert result.exit_code != 0
    assert "nowhere" in result.output


def test_aggregator_refuses_unknown_method() -> None:
    result = CliRunner().invoke(main, ["aggregator", "start", "--method", "nope", "--port", "1"])
    assert result.exit_code != 0
    assert "unknown aggregation method 'nope'" in result.output


def test_aggregator_refuses_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "agg.json"
    path.write_text(json.dumps({"threshold": 1.5, "name": "a/b"}))
    result = CliRunner().invoke(main, ["aggregator", "start", "--config", str(path)])
    assert result.exit_code != 0
    assert "threshold" in result.output
    assert "name" in result.output


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("aggregator", "broker", "demo", "upload-model"):
        assert command in result.output
