"""Tests of broker/: config rendering, the Mosquitto process, health checks and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

import broker.process
from broker.cli import broker_group
from broker.health import broker_answers
from broker.process import (
    DEFAULT_TEMPLATE,
    BrokerState,
    MosquittoBroker,
    find_free_port,
    render_config,
)
from common.errors import BrokerError, ConfigError

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20  # the transport's default chunk size
WAIT_S = 5.0  # generous on a shared 2-core machine; a healthy broker answers in milliseconds


# -- helpers -------------------------------------------------------------------------------------


def _client(broker: MosquittoBroker) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        protocol=aiomqtt.ProtocolVersion.V5,
        identifier=f"test-{uuid.uuid4().hex[:8]}",
    )


async def _publish_retained(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    async with _client(broker) as client:
        # QoS 1: publish() returns after the PUBACK, so the broker holds the message.
        await client.publish(topic, payload, qos=1, retain=True)


async def _first_message(broker: MosquittoBroker, topic: str) -> Any:
    async with _client(broker) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(WAIT_S):
            async for message in client.messages:
                return message
    raise AssertionError("unreachable: the message iterator ended")


def _port_is_free(host: str, port: int) -> bool:
    """Tell whether a server could listen on the port: no listener is left on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Closed connections linger in TIME_WAIT; servers (mosquitto too) bind over them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _bad_template(tmp_path: Path) -> Path:
    template = tmp_path / "bad.conf"
    text = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    template.write_text(text + "\nbogus_directive 1\n", encoding="utf-8")
    return template


# -- rendering (no broker) -----------------------------------------------------------------------


def test_rendered_config_contains_port_and_data_paths(tmp_path: Path) -> None:
    text = render_config(port=18999, data_dir=tmp_path, bind_address="127.0.0.2")

    lines = text.splitlines()
    assert "listener 18999 127.0.0.2" in lines
    assert f"persistence_location {tmp_path}" in lines
    assert f"log_dest file {tmp_path / 'mosquitto.log'}" in lines
    assert "max_packet_size 2000000" in lines
    assert "allow_anonymous true" in lines
    assert not re.search(r"@[A-Z_]+@", text)


def test_repo_root_config_is_the_package_template() -> None:
    assert (REPO / "mosquitto.conf").resolve() == DEFAULT_TEMPLATE.resolve()


def test_render_config_rejects_unknown_placeholder_and_missing_port(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.conf"
    unknown.write_text("listener @PORT@\nmax_keepalive @KEEPALIVE@\n", encoding="utf-8")
    no_port = tmp_path / "no_port.conf"
    no_port.write_text("listener 1883\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="@KEEPALIVE@"):
        render_config(port=1883, data_dir=tmp_path, template=unknown)
    with pytest.raises(ConfigError, match="@PORT@"):
        render_config(port=1883, data_dir=tmp_path, template=no_port)
    with pytest.raises(ConfigError, match="1-65535"):
        render_config(port=70000, data_dir=tmp_path)


def test_misuse_raises_clear_errors(tmp_path: Path) -> None:
    fresh = MosquittoBroker(data_dir=tmp_path)

    with pytest.raises(BrokerError, match="never started"):
        fresh.stop()
    with pytest.raises(BrokerError, match="new"):
        fresh.kill()
    with pytest.raises(BrokerError, match="never started"):
        fresh.restart()
    with pytest.raises(ConfigError, match="IP address"):
        MosquittoBroker(data_dir=tmp_path, bind_address="localhost:1883")


def test_missing_mosquitto_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker.process, "_MOSQUITTO_FALLBACKS", ())

    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        MosquittoBroker(data_dir=tmp_path)


def test_broker_answers_false_for_closed_port() -> None:
    port = find_free_port()

    assert broker_answers("127.0.0.1", port, timeout=1.0) is False


def test_broker_answers_false_for_silent_listener() -> None:
    # Something holds the port but never speaks MQTT: the CONNACK wait must time out.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        assert broker_answers("127.0.0.1", server.getsockname()[1], timeout=0.3) is False


# -- a real broker -------------------------------------------------------------------------------


@pytest.mark.broker
async def test_retained_message_round_trip(mosquitto: MosquittoBroker, project_name: str) -> None:
    topic = f"fedhive/v1/{project_name}/base"
    # One chunk of the largest size the transport sends must fit under max_packet_size.
    payload = b"\x01" * (CHUNK + 512)

    await _publish_retained(mosquitto, topic, payload)
    message = await _first_message(mosquitto, topic)

    assert message.payload == payload
    assert message.retain is True
    assert mosquitto.state is BrokerState.RUNNING
    assert f"listener {mosquitto.port} 127.0.0.1" in mosquitto.config_path.read_text()


@pytest.mark.broker
def test_broker_advertises_max_packet_size(mosquitto: MosquittoBroker) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    connacks: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, props: connacks.append((reason, props))

    client.connect(mosquitto.host, mosquitto.port)
    try:
        while not connacks:
            assert client.loop(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS
    finally:
        client.disconnect()
        client.loop(timeout=0.1)

    reason, props = connacks[0]
    assert not reason.is_failure
    assert props.MaximumPacketSize == 2_000_000


@pytest.mark.broker
def test_broker_answers_for_running_broker(mosquitto: MosquittoBroker) -> None:
    assert broker_answers(mosquitto.host, mosquitto.port)
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"


@pytest.mark.broker
def test_stop_is_clean(fresh_broker: MosquittoBroker) -> None:
    process_id = fresh_broker.pid
    assert process_id is not None

    fresh_broker.stop()

    assert fresh_broker.state is BrokerState.STOPPED
    assert not fresh_broker.is_alive()
    assert fresh_broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(process_id, 0)
    assert _port_is_free(fresh_broker.host, fresh_broker.port)
    assert not broker_answers(fresh_broker.host, fresh_broker.port, timeout=1.0)
    fresh_broker.stop()  # stopping again is harmless


@pytest.mark.broker
def test_start_twice_raises(fresh_broker: MosquittoBroker) -> None:
    with pytest.raises(BrokerError, match="already running"):
        fresh_broker.start()


@pytest.mark.broker
@pytest.mark.parametrize("how", ["kill_after_save", "stop"])
async def test_restart_keeps_retained_message(
    fresh_broker: MosquittoBroker, project_name: str, how: str
) -> None:
    topic = f"fedhive/v1/{project_name}/agg/a1/status"
    port = fresh_broker.port
    await _publish_retained(fresh_broker, topic, b"ACTIVE")

    if how == "kill_after_save":
        # A crash keeps only what was saved: force a save, then die without saving again.
        fresh_broker.save_database()
        fresh_broker.kill()
    else:
        fresh_broker.stop()  # SIGTERM saves the database on the way out
    assert not fresh_broker.is_alive()
    fresh_broker.restart()
    message = await _first_message(fresh_broker, topic)

    assert fresh_broker.port == port
    assert message.payload == b"ACTIVE"
    assert message.retain is True


@pytest.mark.broker
def test_context_manager_starts_and_stops(tmp_path: Path) -> None:
    with MosquittoBroker(data_dir=tmp_path) as running:
        assert broker_answers(running.host, running.port)

    assert running.state is BrokerState.STOPPED
    assert not running.is_alive()


@pytest.mark.broker
def test_taken_free_port_is_replaced(
    mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone takes the port we picked before mosquitto binds it: pick another, once more.
    picks = iter([mosquitto.port, find_free_port()])
    monkeypatch.setattr(broker.process, "find_free_port", lambda host: next(picks))

    with MosquittoBroker(data_dir=tmp_path) as second:
        assert second.port != mosquitto.port
        assert broker_answers(second.host, second.port)


@pytest.mark.broker
def test_bad_template_raises_with_mosquitto_complaint(tmp_path: Path) -> None:
    bad = MosquittoBroker(data_dir=tmp_path / "data", config_template=_bad_template(tmp_path))

    with pytest.raises(BrokerError, match="bogus_directive") as caught:
        bad.start()

    assert "Unknown configuration variable" in str(caught.value)
    assert bad.state is BrokerState.STOPPED
    assert not bad.is_alive()


@pytest.mark.broker
def test_taken_port_raises(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    second = MosquittoBroker(data_dir=tmp_path, port=mosquitto.port)

    with pytest.raises(BrokerError, match=f"port {mosquitto.port} on 127.0.0.1 is taken"):
        second.start()

    assert broker_answers(mosquitto.host, mosquitto.port)


# -- CLI -----------------------------------------------------------------------------------------


@pytest.mark.broker
def test_cli_check(mosquitto: MosquittoBroker) -> None:
    runner = CliRunner()
    closed = find_free_port()

    up = runner.invoke(broker_group, ["check", "--port", str(mosquitto.port)])
    down = runner.invoke(broker_group, ["check", "--port", str(closed), "--timeout", "1"])
    as_json = runner.invoke(broker_group, ["check", "--port", str(mosquitto.port), "--json"])

    assert up.exit_code == 0, up.output
    assert "answers" in up.output
    assert down.exit_code == 1
    assert "no broker answers" in down.output
    assert json.loads(as_json.output) == {
        "host": "127.0.0.1",
        "port": mosquitto.port,
        "answers": True,
    }


def test_cli_start_reports_bad_template(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        broker_group,
        ["start", "--config", str(_bad_template(tmp_path)), "--data-dir", str(tmp_path / "d")],
    )

    assert result.exit_code == 1
    assert "bogus_directive" in result.output


@pytest.mark.broker
def test_cli_start_runs_until_sigterm(tmp_path: Path) -> None:
    port = find_free_port()
    command = [sys.executable, "-m", "broker.cli", "start", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    lines: queue.Queue[str | None] = queue.Queue()

    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(target=lambda: [*map(lines.put, stdout), lines.put(None)])
        reader.start()
        try:
            first = lines.get(timeout=30)
            assert first is not None
            assert f"listening on mqtt://127.0.0.1:{port}" in first
            assert broker_answers("127.0.0.1", port)

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(timeout=10)

    rest = []
    while (line := lines.get_nowait()) is not None:
        rest.append(line)
    assert "broker stopped" in "".join(rest)
    assert not broker_answers("127.0.0.1", port, timeout=1.0)
    assert _port_is_free("127.0.0.1", port)


@pytest.mark.broker
def test_mosquitto_runs_with_malloc_settings_that_keep_freed_memory_mapped(
    fresh_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare / Execute: the fixture's broker started with our environment.
    assert fresh_broker.pid is not None
    environ = Path(f"/proc/{fresh_broker.pid}/environ").read_bytes().split(b"\0")

    # Assert: glibc's tunables reached mosquitto, so a 1 MiB chunk's buffer comes from the
    # heap and freed memory is not trimmed back to the kernel after every message. (glibc
    # cuts the variable after the first tunable as it parses it; all of them apply: a
    # program freeing and allocating 3 MiB buffers took 300 000 page faults without them,
    # 1 500 with them.)
    tunables = [e for e in environ if e.startswith(b"GLIBC_TUNABLES=")]
    assert len(tunables) == 1
    first = broker.process.MALLOC_TUNABLES.split(":")[0]
    assert tunables[0].split(b":")[0] == b"GLIBC_TUNABLES=" + first.encode()
    assert "glibc.malloc.trim_threshold=" in broker.process._broker_env()["GLIBC_TUNABLES"]
    # Tunables the user set come after ours (the later setting wins).
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert broker.process._broker_env()["GLIBC_TUNABLES"] == (
        f"{broker.process.MALLOC_TUNABLES}:glibc.malloc.arena_max=2"
    )
