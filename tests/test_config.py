"""Settings: STADLE's agent config JSON loads unchanged; bad settings are ConfigErrors naming
the field or the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import (
    DEFAULT_BROKER_PORT,
    AgentConfig,
    AggregatorConfig,
    BrokerSettings,
    SgAggregatorConfig,
    load_settings,
    parse_settings,
)
from common.errors import ConfigError

STADLE_AGENT_CONFIG: dict[str, Any] = {
    "model_path": "./data/agent",
    "aggr_ip": "localhost",
    "reg_port": "8765",
    "token": "stadle12345",
    "agent_name": "default_agent",
    "base_model": {
        "model_fn": "VGG16",
        "model_fn_src": "vgg",
        "model_format": "PyTorch",
        "model_name": "PyTorch-VGG-Model",
    },
}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_stadle_agent_config_loads_unchanged(tmp_path: Path) -> None:
    # Prepare
    path = write_json(tmp_path / "config_agent.json", STADLE_AGENT_CONFIG)

    # Execute
    config = load_settings(AgentConfig, path)

    # Assert
    assert config.model_path == Path("./data/agent")
    assert config.aggr_ip == "localhost"
    assert config.reg_port == 8765
    assert config.token == "stadle12345"
    assert config.agent_name == "default_agent"
    assert config.base_model.model_fn == "VGG16"
    assert config.base_model.model_fn_src == "vgg"
    assert config.base_model.model_format == "PyTorch"
    assert config.base_model.model_name == "PyTorch-VGG-Model"


@pytest.mark.parametrize("port", ["8765", " 8765 ", 8765])
def test_reg_port_as_string_or_int(port: object) -> None:
    # Prepare / Execute
    config = parse_settings(AgentConfig, {**STADLE_AGENT_CONFIG, "reg_port": port})

    # Assert
    assert config.reg_port == 8765


def test_broker_mapping_uses_stadle_keys() -> None:
    # Prepare
    config = parse_settings(AgentConfig, STADLE_AGENT_CONFIG)

    # Execute
    broker = config.broker()

    # Assert
    assert isinstance(broker, BrokerSettings)
    assert (broker.host, broker.port) == ("localhost", 8765)
    assert broker.username == "default_agent"
    assert broker.password == "stadle12345"


def test_broker_mapping_prefers_an_explicit_username() -> None:
    # Prepare
    config = parse_settings(AgentConfig, {**STADLE_AGENT_CONFIG, "username": "edge-7"})

    # Execute
    broker = config.broker()

    # Assert
    assert broker.username == "edge-7"
    assert broker.password == "stadle12345"


def test_broker_mapping_carries_fedhive_keys() -> None:
    # Prepare
    config = parse_settings(AgentConfig, {"chunk_size": 4096, "keepalive": 120})

    # Execute
    broker = config.broker()

    # Assert
    assert (broker.chunk_size, broker.keepalive) == (4096, 120)
    assert broker.port == DEFAULT_BROKER_PORT
    assert broker.password is None


def test_keyword_overrides_win_unless_none(tmp_path: Path) -> None:
    # Prepare
    path = write_json(tmp_path / "agent.json", STADLE_AGENT_CONFIG)

    # Execute
    config = load_settings(AgentConfig, path, agent_name="edge1", aggr_ip=None)

    # Assert
    assert config.agent_name == "edge1"
    assert config.aggr_ip == "localhost"


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (AgentConfig, {"reg_port": 0}, "reg_port"),
        (AgentConfig, {"reg_port": "0"}, "reg_port"),
        (AgentConfig, {"reg_port": 65536}, "reg_port"),
        (AgentConfig, {"reg_port": "http"}, "reg_port"),
        (AgentConfig, {"keepalive": 5}, "keepalive"),
        (AgentConfig, {"base_model": "vgg"}, "base_model"),
        (AggregatorConfig, {"threshold": 1.5}, "threshold"),
        (AggregatorConfig, {"threshold": 0}, "threshold"),
        (AggregatorConfig, {"threshold": float("nan")}, "threshold"),
        (AggregatorConfig, {"broker": {"port": 0}}, r"broker\.port"),
        (AggregatorConfig, {"broker": {"max_inflight": 50}}, r"broker\.max_inflight"),
        (AggregatorConfig, {"agent_timeout": -1}, "agent_timeout"),
        (AggregatorConfig, {"max_agents": -1}, "max_agents"),
        (AggregatorConfig, {"monitor_interval": 0}, "monitor_interval"),
        (AggregatorConfig, {"admins": ["ok", "a/b"]}, "admins"),
    ],
)
def test_bad_value_names_the_field(model: type[Any], data: dict[str, Any], field: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=rf"invalid settings in test\.json:\n  {field}: "):
        parse_settings(model, data, source="test.json")


@pytest.mark.parametrize("model", [AgentConfig, AggregatorConfig])
def test_unknown_key_names_the_key(model: type[Any]) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="  aggr_port: Extra inputs are not permitted"):
        parse_settings(model, {"aggr_port": 1})


@pytest.mark.parametrize("name", ["a/b", "a#", "a+b", "+", "#", "", "name\n", "x" * 65])
def test_invalid_agent_name_is_rejected(name: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=r"agent_name: Value error, invalid agent name"):
        parse_settings(AgentConfig, {**STADLE_AGENT_CONFIG, "agent_name": name})


@pytest.mark.parametrize(
    ("model", "field", "kind"),
    [
        (AgentConfig, "project", "project"),
        (AgentConfig, "aggregator", "aggregator"),
        (AggregatorConfig, "name", "aggregator"),
        (AggregatorConfig, "project", "project"),
    ],
)
def test_invalid_topic_names_are_rejected(model: type[Any], field: str, kind: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=rf"{field}: Value error, invalid {kind} name 'a/b'"):
        parse_settings(model, {field: "a/b"})


def test_invalid_name_on_assignment_is_rejected() -> None:
    # Prepare
    config = AgentConfig()

    # Execute / Assert
    with pytest.raises(ValueError, match="invalid agent name"):
        config.agent_name = "a/b"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "nope.json"

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.json"):
        load_settings(AgentConfig, path)


def test_directory_names_the_file(tmp_path: Path) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match=rf"cannot read config file {tmp_path}"):
        load_settings(AgentConfig, tmp_path)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"agent_name": "caf\xe9"}')

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"cannot read config file .*latin1\.json"):
        load_settings(AgentConfig, path)


@pytest.mark.parametrize("text", ["{", "{'agent_name': 'x'}", "", "[1,]"])
def test_invalid_json_names_the_file(tmp_path: Path, text: str) -> None:
    # Prepare
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"config file .*broken\.json is not valid JSON"):
        load_settings(AgentConfig, path)


@pytest.mark.parametrize("data", [[STADLE_AGENT_CONFIG], "agent", 1, None])
def test_non_object_json_names_the_file(tmp_path: Path, data: Any) -> None:
    # Prepare
    path = write_json(tmp_path / "list.json", data)

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"config file .*list\.json must hold a JSON object"):
        load_settings(AgentConfig, path)


def test_bad_value_in_file_names_file_and_field(tmp_path: Path) -> None:
    # Prepare
    path = write_json(tmp_path / "agent.json", {**STADLE_AGENT_CONFIG, "reg_port": 0})

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"invalid settings in .*agent\.json:\n  reg_port: "):
        load_settings(AgentConfig, path)


def test_aggregator_config_defaults_are_valid() -> None:
    # Prepare / Execute
    config = parse_settings(AggregatorConfig, {})

    # Assert
    assert (config.name, config.method, config.threshold) == ("aggr1", "fedavg", 1.0)
    assert config.broker.max_inflight == 16
    assert config.admins == ["admin"]
    assert (config.agent_timeout, config.max_agents, config.max_rounds) == (0.0, 0, 0)


def test_agent_config_auto_aggregator() -> None:
    # Prepare / Execute
    auto = parse_settings(AgentConfig, {"aggregator": "auto", "rehome_timeout": 2.5})
    named = parse_settings(AgentConfig, {"aggregator": "a1"})

    # Assert
    assert auto.auto_aggregator
    assert auto.rehome_timeout == 2.5
    assert not named.auto_aggregator
    with pytest.raises(ConfigError, match="rehome_timeout"):
        parse_settings(AgentConfig, {"rehome_timeout": 0})


def test_no_aggregator_may_be_named_auto() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="name: Value error, 'auto' is reserved"):
        parse_settings(AggregatorConfig, {"name": "auto"})


def test_aggregator_under_an_sg_aggregator() -> None:
    # Prepare / Execute
    config = parse_settings(AggregatorConfig, {"sg_aggregator": "sg"})

    # Assert
    assert config.sg_aggregator == "sg"
    assert parse_settings(AggregatorConfig, {}).sg_aggregator is None
    with pytest.raises(ConfigError, match="sg_aggregator: Value error, invalid sg-aggregator"):
        parse_settings(AggregatorConfig, {"sg_aggregator": "a/b"})


def test_sg_aggregator_config_defaults_and_bounds() -> None:
    # Prepare / Execute
    config = parse_settings(SgAggregatorConfig, {})

    # Assert
    assert (config.name, config.method, config.threshold) == ("sg", "fedavg", 1.0)
    assert config.aggregator_timeout > config.status_interval
    for bad in ({"threshold": 0}, {"aggregator_timeout": 0}, {"project": "a/b"}, {"x": 1}):
        with pytest.raises(ConfigError):
            parse_settings(SgAggregatorConfig, bad)
