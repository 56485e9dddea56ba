"""The agent daemon (``fedhive agent run``) and BasicClient across broker restarts, over a real
Mosquitto that the tests stop and start."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from agents_examples.numpy_entry import tiny_model
from agents_examples.running import wait_until
from click.testing import CliRunner
from support import ROOT, broker_settings, python_env, recording, running_aggregator

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient
from aggregator.service import AggregatorService
from broker.process import MosquittoBroker
from common.config import AggregatorConfig
from fedhive.agent_cli import agent_group

ENTRY = ROOT / "tests" / "agents_examples" / "numpy_entry.py"
ROUND_LINE = re.compile(r"fedhive\.agent\.round: daemon: round (\d+) (\w+) in")


def agent_config(tmp_path: Path, broker: MosquittoBroker, project: str) -> Path:
    path = tmp_path / "config_agent.json"
    path.write_text(
        json.dumps(
            {
                "model_path": str(tmp_path / "agent"),
                "aggr_ip": broker.host,
                "reg_port": str(broker.port),
                "token": None,
                "agent_name": "daemon",
                "project": project,
                "aggregator": "a1",
                "heartbeat_interval": 0.5,
                "ack_timeout": 3,
                "base_model": {"model_format": "NumPy"},
            }
        )
    )
    return path


def spawn_daemon(config: Path, log: Path, *params: str) -> subprocess.Popen[bytes]:
    args = ["-m", "fedhive.agent_cli", "run", "--config", str(config), "--entry", f"{ENTRY}:setup"]
    for param in params:
        args += ["-p", param]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=python_env()
        )


def upload_base(broker: MosquittoBroker, project: str) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        timeout=30,
        base_model=BaseModel("tiny", tiny_model(), BaseModelConvFormat.numpy_format),
    ).initialize()


def rounds_logged(log: Path) -> list[tuple[int, str]]:
    return [(int(r), outcome) for r, outcome in ROUND_LINE.findall(log.read_text())]


@pytest.mark.broker
@pytest.mark.slow
def test_daemon_survives_a_broker_restart_mid_round_and_stops_cleanly_on_sigterm(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the daemon trains round r only once the test creates gate/r.
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "1").touch()
    settings = broker_settings(fresh_broker)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
    )
    log = tmp_path / "daemon.log"
    with running_aggregator(config) as service, recording(settings, project_name, "a1") as rec:
        daemon = spawn_daemon(
            agent_config(tmp_path, fresh_broker, project_name), log, f"gate={gate}"
        )
        try:
            wait_until(lambda: service.engine.active == 1, "the daemon online")
            upload_base(fresh_broker, project_name)
            rec.wait_for_global(1, timeout=30)

            # Execute: the broker goes away and comes back while round 2 trains...
            wait_until((gate / "training-2").exists, "the daemon training round 2")
            fresh_broker.stop()
            fresh_broker.start()
            (gate / "2").touch()
            _, round2 = rec.wait_for_global(2, timeout=60)

            # ... then SIGTERM while round 3 trains: that model still goes out, then it exits.
            wait_until((gate / "training-3").exists, "the daemon training round 3")
            daemon.send_signal(signal.SIGTERM)
            (gate / "3").touch()
            _, round3 = rec.wait_for_global(3, timeout=30)
            code = daemon.wait(30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()

    # Assert: rounds 2 and 3 completed without manual action; one line per round; exit 0.
    output = log.read_text()
    assert code == 0, output[-3000:]
    np.testing.assert_array_equal(round2["w"], np.full((2, 3), 2.0, np.float32))
    np.testing.assert_array_equal(round3["w"], np.full((2, 3), 3.0, np.float32))
    logged = rounds_logged(log)
    assert [r for r, _ in logged] == [1, 2, 3], output[-3000:]
    # A model whose acknowledgement was lost in the restart is sent again: a duplicate.
    assert all(outcome in ("accepted", "duplicate") for _, outcome in logged)
    assert "SIGTERM: finishing the round in flight" in output
    assert "done after 3 rounds (stopped)" in output


@pytest.mark.broker
@pytest.mark.slow
def test_daemon_waits_for_the_broker_then_runs_until_its_termination_function(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the broker is down when the daemon starts.
    settings = broker_settings(fresh_broker)
    config_file = agent_config(tmp_path, fresh_broker, project_name)
    log = tmp_path / "daemon.log"
    fresh_broker.stop()
    daemon = spawn_daemon(config_file, log, "rounds=2")
    try:
        wait_until(lambda: "cannot reach the broker" in log.read_text(), "a failed attempt")

        # Execute: the broker comes up; the daemon connects, trains 2 rounds and ends.
        fresh_broker.start()
        config = AggregatorConfig(
            name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
        )
        with running_aggregator(config) as service, recording(settings, project_name, "a1") as rec:
            wait_until(lambda: service.engine.active == 1, "the daemon online")
            upload_base(fresh_broker, project_name)
            code = daemon.wait(60)
            _, last = rec.wait_for_global(2, timeout=10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    # Assert
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert [r for r, _ in rounds_logged(log)] == [1, 2]
    assert "done after 2 rounds (training finished)" in output
    np.testing.assert_array_equal(last["w"], np.full((2, 3), 2.0, np.float32))


def basic_clients(broker: MosquittoBroker, project: str, *names: str) -> list[BasicClient]:
    clients = [
        BasicClient(
            aggregator_ip_address=broker.host,
            reg_port=broker.port,
            agent_name=name,
            project=project,
            aggregator="a1",
            heartbeat_interval=0.5,
            model_timeout=10,
            ack_timeout=5,
        )
        for name in names
    ]
    for client in clients:
        client.set_bm_obj(tiny_model())
    return clients


def restart_and_wait_for_the_aggregator(
    broker: MosquittoBroker, service: AggregatorService, agent: str
) -> None:
    """Stop and start the broker, then wait until the aggregator hears from ``agent`` again.

    A model published before the aggregator has reconnected would be lost: BasicClient does
    not send again (IntegratedClient does, when no acknowledgement comes)."""
    broker.stop()
    broker.start()
    restarted = time.time()
    wait_until(
        lambda: (service.engine.agents[agent].last_seen or 0) > restarted,
        f"the aggregator to hear from {agent} again",
    )


@pytest.mark.broker
def test_basic_client_survives_a_broker_restart_mid_round(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the agent holds the round-0 model (it is "training") when the broker restarts.
    config = AggregatorConfig(
        name="a1", project=project_name, broker=broker_settings(fresh_broker), data_dir=tmp_path
    )
    with running_aggregator(config) as service:
        (client,) = basic_clients(fresh_broker, project_name, "solo")
        try:
            wait_until(lambda: service.engine.active == 1, "the agent online")
            upload_base(fresh_broker, project_name)
            model = client.wait_for_sg_model()

            # Execute
            restart_and_wait_for_the_aggregator(fresh_broker, service, "solo")
            ack = client.send_trained_model({k: v + 1 for k, v in model.items()})
            aggregate = client.wait_for_sg_model()
        finally:
            client.disconnect()

    # Assert: it reconnected, re-announced itself, sent, and got the round's aggregate.
    assert ack is not None
    assert ack.status.value == "accepted"
    assert client.current_round == 1
    np.testing.assert_array_equal(aggregate["w"], np.ones((2, 3), np.float32))


@pytest.mark.broker
def test_a_broker_restart_does_not_close_a_round_early(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: `early` has sent its round-1 model, `late` is training, when the broker restarts.
    config = AggregatorConfig(
        name="a1", project=project_name, broker=broker_settings(fresh_broker), data_dir=tmp_path
    )
    with running_aggregator(config) as service:
        early, late = basic_clients(fresh_broker, project_name, "early", "late")
        try:
            wait_until(lambda: service.engine.active == 2, "both agents online")
            upload_base(fresh_broker, project_name)
            model = early.wait_for_sg_model()
            late.wait_for_sg_model()
            early.send_trained_model({k: v + 1 for k, v in model.items()})

            # Execute
            restart_and_wait_for_the_aggregator(fresh_broker, service, "late")
            ack = late.send_trained_model({k: v + 3 for k, v in model.items()})
            assert ack is not None
            assert ack.status.value == "accepted"  # not stale: the wills did not close round 1
            aggregates = [client.wait_for_sg_model() for client in (early, late)]
        finally:
            early.disconnect()
            late.disconnect()

    # Assert: the round completed with both models.
    for aggregate in aggregates:
        np.testing.assert_array_equal(aggregate["w"], np.full((2, 3), 2.0, np.float32))


def test_agent_run_refuses_a_bad_entry_point(tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "config_agent.json"
    config.write_text(json.dumps({"agent_name": "x"}))

    # Execute
    no_colon = CliRunner().invoke(agent_group, ["run", "--config", str(config), "--entry", "x"])
    missing = CliRunner().invoke(
        agent_group, ["run", "--config", str(config), "--entry", f"{ENTRY}:nope"]
    )
    bad_param = CliRunner().invoke(
        agent_group,
        ["run", "--config", str(config), "--entry", f"{ENTRY}:setup", "-p", "novalue"],
    )

    # Assert
    assert no_colon.exit_code == 1
    assert "expected module:function" in no_colon.output
    assert missing.exit_code == 1
    assert "has no function 'nope'" in missing.output
    assert bad_param.exit_code == 2
    assert "expected KEY=VALUE" in bad_param.output
