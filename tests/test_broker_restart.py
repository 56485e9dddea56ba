"""Reliability over a real Mosquitto (issue 8, acceptance 4): the broker killed mid-round and
started again, a component cut off while messages are published for it (persistent sessions),
an agent whose connection flaps.

A test proxy (:class:`FlakyLink`) stands between one component and the broker: ``cut()``
closes its connections abruptly (the broker publishes its last will) and refuses new ones until
``restore()``, as a network failure would, while everything else stays connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import broker_settings, running_aggregator, weighted_mean

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from broker.process import MosquittoBroker
from common.codec import Array
from common.config import AggregatorConfig, BrokerSettings
from common.errors import FedhiveError
from common.messages import (
    AgentState,
    AgentStatusMessage,
    AggStatusMessage,
    ModelMessage,
    decode_message,
)
from common.topics import Topics
from common.transport import MqttTransport

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _base() -> dict[str, Array]:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.zeros(3, dtype=np.float32),
        "steps": np.array(0, dtype=np.int64),
    }


def _trained(k: float) -> dict[str, Array]:
    return {name: np.asarray(v * k + k, v.dtype) for name, v in _base().items()}


class FlakyLink:
    """A TCP proxy to the broker that a test can cut and restore."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = LoopThread("flaky-link")
        self._up = True
        self._links: set[asyncio.StreamWriter] = set()
        self._server = self._loop.run(self._serve(), timeout=10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._links -= {writer, up_writer}
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()  # one side gone: the other goes too

    def cut(self) -> None:
        """Close every connection without a goodbye and refuse new ones."""

        def cut() -> None:
            self._up = False
            for writer in list(self._links):
                writer.transport.abort()

        self._loop.loop.call_soon_threadsafe(cut)

    def restore(self) -> None:
        def restore() -> None:
            self._up = True

        self._loop.loop.call_soon_threadsafe(restore)

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._links):
                writer.transport.abort()
            await self._server.wait_closed()

        self._loop.run(close(), timeout=10)
        self._loop.close()


@contextmanager
def flaky_link(broker: MosquittoBroker) -> Iterator[FlakyLink]:
    link = FlakyLink(broker.host, broker.port)
    try:
        yield link
    finally:
        link.close()


class Observer:
    """Watches a project's statuses and local models from its own connection to the broker."""

    def __init__(self, settings: BrokerSettings, project: str) -> None:
        self.topics = Topics(project)
        self.seen: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._loop = LoopThread("observer")
        self._task = self._loop.run(self._start(settings), timeout=15)

    async def _start(self, settings: BrokerSettings) -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(self._run(settings, started))
        await asyncio.wait_for(started.wait(), 10)
        return task

    async def _run(self, settings: BrokerSettings, started: asyncio.Event) -> None:
        t = self.topics
        async with MqttTransport(settings=settings) as transport:
            await transport.subscribe(f"{t.root}/agents/+/status", f"{t.root}/agg/+/status")
            await transport.subscribe(f"{t.root}/agg/+/local/+")
            started.set()
            async for incoming in transport.messages():
                with contextlib.suppress(FedhiveError):
                    message = decode_message(incoming.payload) if incoming.payload else None
                    with self._cond:
                        self.seen.append((incoming.topic, message))
                        self._cond.notify_all()

    def count(self, match: Callable[[Any], bool]) -> int:
        with self._cond:
            return sum(1 for _, m in self.seen if match(m))

    def wait_for(self, match: Callable[[Any], bool], timeout: float, *, at_least: int = 1) -> None:
        with self._cond:
            if not self._cond.wait_for(
                lambda: sum(1 for _, m in self.seen if match(m)) >= at_least, timeout
            ):
                raise TimeoutError(f"not seen {at_least} within {timeout} s")

    def close(self) -> None:
        async def stop() -> None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

        self._loop.run(stop(), timeout=15)
        self._loop.close()


@contextmanager
def observing(settings: BrokerSettings, project: str) -> Iterator[Observer]:
    observer = Observer(settings, project)
    try:
        yield observer
    finally:
        observer.close()


def _online(agent: str) -> Callable[[Any], bool]:
    return lambda m: (
        isinstance(m, AgentStatusMessage) and m.sender == agent and m.state is AgentState.ONLINE
    )


def _lost(agent: str) -> Callable[[Any], bool]:
    return lambda m: (
        isinstance(m, AgentStatusMessage)
        and m.sender == agent
        and m.state is not (AgentState.ONLINE)
    )


def _aggregator_status(active: bool) -> Callable[[Any], bool]:
    return lambda m: isinstance(m, AggStatusMessage) and (m.state.value == "ACTIVE") == active


def _upload_admin(broker: MosquittoBroker, project: str) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        timeout=30,
        base_model=BaseModel("tiny", _base(), BaseModelConvFormat.numpy_format),
    ).initialize()


def _agents(
    port: int | list[int], host: str, project: str, n: int, **extra: Any
) -> list[BasicClient]:
    ports = port if isinstance(port, list) else [port] * n
    clients = []
    for i in range(n):
        client = BasicClient(
            agent_name=f"agent{i}",
            aggregator_ip_address=host,
            reg_port=ports[i],
            project=project,
            aggregator="a1",
            model_timeout=60,
            **extra,
        )
        client.set_bm_obj(_base())
        clients.append(client)
    return clients


def _assert_weighted_mean(
    model: dict[str, Array], sent: dict[str, tuple[float, dict[str, Array]]]
) -> None:
    for name, value in weighted_mean(sent).items():
        np.testing.assert_allclose(np.asarray(model[name], np.float64), value, atol=1e-5)


@pytest.mark.timeout(180)
def test_broker_killed_mid_round_loses_no_accepted_model(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: an aggregator and three agents; two models of round 1 accepted.
    settings = broker_settings(fresh_broker, reconnect_max_delay=0.5)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
    )
    with running_aggregator(config) as service:
        _upload_admin(fresh_broker, project_name)
        clients = _agents(fresh_broker.port, fresh_broker.host, project_name, 3)
        try:
            for client in clients:
                client.wait_for_sg_model()
            sent = {f"agent{i}": (10.0 * (i + 1), _trained(i + 1)) for i in range(3)}
            for i in (0, 1):
                ack = clients[i].send_trained_model(
                    sent[f"agent{i}"][1], {"accuracy": 0.5}, num_samples=sent[f"agent{i}"][0]
                )
                assert ack is not None
                assert ack.status.value == "accepted"
            assert service.engine.collected == 2

            # Execute: kill -9 (no database save: retained messages and sessions are gone)
            # and start it again on the same port.
            fresh_broker.kill()
            fresh_broker.start()
            # Every component reconnects and says so (statuses published after the restart).
            with observing(settings, project_name) as seen:
                seen.wait_for(_aggregator_status(active=True), 60)
                for i in range(3):
                    seen.wait_for(_online(f"agent{i}"), 60)
            ack = clients[2].send_trained_model(
                sent["agent2"][1], {"accuracy": 0.5}, num_samples=sent["agent2"][0]
            )
            round1 = clients[0].wait_for_sg_model()
            # ... and the next round works too.
            again = {f"agent{i}": (5.0, _trained(10 + i)) for i in range(3)}
            for client in clients[1:]:
                client.wait_for_sg_model()
            for i, client in enumerate(clients):
                client.send_trained_model(again[f"agent{i}"][1], {"accuracy": 0.6}, num_samples=5)
            round2 = clients[0].wait_for_sg_model()
        finally:
            for client in clients:
                client.disconnect()

        # Assert: the round completed with all three models, the two accepted before the crash
        # included, weighted by their samples; round 2 followed.
        assert ack is not None
        assert ack.status.value == "accepted"
        assert [sorted(c.agent for c in r.contributors) for r in service.results] == [
            ["agent0", "agent1", "agent2"],
            ["agent0", "agent1", "agent2"],
        ]
        _assert_weighted_mean(round1, sent)
        _assert_weighted_mean(round2, again)
        assert "InternalError" not in service.rejections


@pytest.mark.timeout(180)
def test_a_local_model_sent_while_the_aggregator_is_away_is_delivered(
    mosquitto: MosquittoBroker,
    project_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the aggregator reaches the broker through a link the test can cut.
    caplog.set_level(logging.INFO, logger="fedhive")
    direct = broker_settings(mosquitto)
    with flaky_link(mosquitto) as link, observing(direct, project_name) as seen:
        settings = BrokerSettings(host="127.0.0.1", port=link.port, reconnect_max_delay=0.5)
        config = AggregatorConfig(
            name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
        )
        with running_aggregator(config) as service, ThreadPoolExecutor(1) as pool:
            _upload_admin(mosquitto, project_name)
            clients = _agents(mosquitto.port, mosquitto.host, project_name, 2)
            try:
                for client in clients:
                    client.wait_for_sg_model()
                sent = {f"agent{i}": (10.0 * (i + 1), _trained(i + 1)) for i in range(2)}
                first = clients[0].send_trained_model(sent["agent0"][1], num_samples=10)

                # Execute: the aggregator's connection drops (its will says it is gone) and
                # stays down while agent1 sends its model; then it comes back.
                link.cut()
                seen.wait_for(_aggregator_status(active=False), 30)
                pending = pool.submit(
                    clients[1].send_trained_model, sent["agent1"][1], num_samples=20
                )
                seen.wait_for(
                    lambda m: isinstance(m, ModelMessage) and m.sender == "agent1", 30
                )  # at the broker, queued in the aggregator's session
                assert not pending.done()
                link.restore()
                second = pending.result(timeout=60)
                model = clients[0].wait_for_sg_model()
            finally:
                for client in clients:
                    client.disconnect()

    # Assert: delivered from the resumed session, accepted, and the round completed with both.
    assert first is not None
    assert first.status.value == "accepted"
    assert second is not None
    assert second.status.value == "accepted"
    assert any("session resumed" in r.getMessage() for r in caplog.records), "no resumed session"
    assert [sorted(c.agent for c in r.contributors) for r in service.results] == [
        ["agent0", "agent1"]
    ]
    _assert_weighted_mean(model, sent)


@pytest.mark.timeout(180)
def test_a_flapping_agent_is_counted_once(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: three agents, the third behind a link that keeps failing; with an agent timeout
    # its lost connections do not take it out of the round (its heartbeats decide).
    direct = broker_settings(mosquitto)
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=direct,
        data_dir=tmp_path / "agg",
        agent_timeout=30,
    )
    with (
        flaky_link(mosquitto) as link,
        observing(direct, project_name) as seen,
        running_aggregator(config) as service,
    ):
        _upload_admin(mosquitto, project_name)
        ports = [mosquitto.port, mosquitto.port, link.port]
        clients = _agents(ports, mosquitto.host, project_name, 3, heartbeat_interval=0.5)
        try:
            for client in clients:
                client.wait_for_sg_model()
            active: list[int] = []

            def flap(times: int) -> None:
                for _ in range(times):
                    onlines = seen.count(_online("agent2"))
                    losts = seen.count(_lost("agent2"))
                    link.cut()
                    seen.wait_for(_lost("agent2"), 30, at_least=losts + 1)  # its will
                    link.restore()
                    seen.wait_for(_online("agent2"), 30, at_least=onlines + 1)  # back
                    active.append(service.engine.active)

            # Execute: it flaps, sends its model, flaps again; the others send theirs.
            flap(3)
            sent = {f"agent{i}": (float(i + 1), _trained(i + 1)) for i in range(3)}
            acks = [clients[2].send_trained_model(sent["agent2"][1], num_samples=3)]
            flap(2)
            assert service.engine.collected == 1
            for i in (0, 1):
                acks.append(clients[i].send_trained_model(sent[f"agent{i}"][1], num_samples=i + 1))
            model = clients[0].wait_for_sg_model()
        finally:
            for client in clients:
                client.disconnect()

    # Assert: three agents, never more, each model counted once, weighted as sent.
    assert active == [3] * 5
    assert all(a is not None and a.status.value == "accepted" for a in acks), acks
    assert [sorted(c.agent for c in r.contributors) for r in service.results] == [
        ["agent0", "agent1", "agent2"]
    ]
    _assert_weighted_mean(model, sent)


@pytest.mark.timeout(180)
def test_an_upload_the_broker_lost_is_sent_again(
    fresh_broker: MosquittoBroker,
    project_name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the aggregator behind a link the test can cut; agent0's model accepted.
    caplog.set_level(logging.INFO, logger="fedhive")
    direct = broker_settings(fresh_broker)
    with flaky_link(fresh_broker) as link, observing(direct, project_name) as seen:
        settings = BrokerSettings(host="127.0.0.1", port=link.port, reconnect_max_delay=0.5)
        config = AggregatorConfig(
            name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
        )
        with running_aggregator(config) as service, ThreadPoolExecutor(1) as pool:
            _upload_admin(fresh_broker, project_name)
            clients = _agents(fresh_broker.port, fresh_broker.host, project_name, 2)
            try:
                for client in clients:
                    client.wait_for_sg_model()
                sent = {f"agent{i}": (10.0 * (i + 1), _trained(i + 1)) for i in range(2)}
                first = clients[0].send_trained_model(sent["agent0"][1], num_samples=10)

                # Execute: agent1's model reaches the broker while the aggregator is away, and
                # the broker dies (kill -9) before it could deliver it; all come back.
                link.cut()
                seen.wait_for(_aggregator_status(active=False), 30)
                pending = pool.submit(
                    clients[1].send_trained_model, sent["agent1"][1], num_samples=20
                )
                seen.wait_for(lambda m: isinstance(m, ModelMessage) and m.sender == "agent1", 30)
                fresh_broker.kill()
                fresh_broker.start()
                link.restore()
                second = pending.result(timeout=60)
                model = clients[0].wait_for_sg_model()
            finally:
                for client in clients:
                    client.disconnect()

    # Assert: agent1 sent it again once the aggregator was back; it was taken once.
    again = [
        r for r in caplog.records if "agent1: sending the model of round 1 again" in r.getMessage()
    ]
    assert len(again) == 1
    assert first is not None
    assert first.status.value == "accepted"
    assert second is not None
    assert second.status.value == "accepted"
    assert [sorted(c.agent for c in r.contributors) for r in service.results] == [
        ["agent0", "agent1"]
    ]
    _assert_weighted_mean(model, sent)
