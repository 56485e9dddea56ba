"""Round control and Aggregation Management over a real Mosquitto: heartbeats and the agent
timeout, the threshold, complete-round, switching the method, stop/restart, max agents and max
rounds, all driven through the ``fedhive`` CLI (click's CliRunner) and checked against the
aggregator's retained status (``fedhive status --json``) and the models that cross the broker."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from support import (
    ROOT,
    broker_settings,
    peer_on,
    recording,
    running_aggregator,
    serving,
    spawn,
)

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from agent.control import ControlClient
from aggregator import outbox
from aggregator.service import AggregatorService
from broker.process import MosquittoBroker
from common.chunking import iter_chunk_frames
from common.codec import Array, encode
from common.config import AggregatorConfig, BrokerSettings
from common.errors import (
    AgentRejectedError,
    AggregatorInactiveError,
    FedhiveError,
    FedhiveTimeoutError,
    RejectedError,
    TrainingFinishedError,
)
from common.exchange import prepare_model_message
from common.messages import (
    AckMessage,
    AckStatus,
    AgentState,
    AgentStatusMessage,
    AggregatorState,
    AggStatusMessage,
    ControlCommand,
    ControlReply,
    ControlRequest,
    ModelKind,
    ModelMessage,
    PresenceState,
    Refusal,
    decode_message,
    encode_message,
)
from common.topics import Topics
from common.transport import InMemoryBus, InMemoryTransport, MqttTransport
from fedhive.cli import main
from fedhive.control_cli import EXIT_NO_ANSWER, EXIT_REFUSED

AGENT_SCRIPT = ROOT / "tests" / "agents" / "numpy_agent.py"
HEARTBEAT = 0.5


# ------------------------------------------------------------------ helpers
def base_model() -> dict[str, Array]:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def plus(delta: float) -> dict[str, Array]:
    return {k: np.asarray(v + delta, v.dtype) for k, v in base_model().items()}


def aggregator_config(broker: MosquittoBroker, project: str, **settings: Any) -> AggregatorConfig:
    return AggregatorConfig(
        name="a1",
        project=project,
        broker=broker_settings(broker),
        monitor_interval=0.2,
        status_interval=1.0,
        **settings,
    )


def upload_base(broker: MosquittoBroker, project: str) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        aggregator="a1",
        timeout=30,
        base_model=BaseModel("tiny", base_model(), BaseModelConvFormat.numpy_format),
    ).initialize()


def make_client(broker: MosquittoBroker, project: str, name: str) -> BasicClient:
    client = BasicClient(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        agent_name=name,
        project=project,
        aggregator="a1",
        heartbeat_interval=HEARTBEAT,
        model_timeout=30,
        ack_timeout=10,
    )
    client.set_bm_obj(base_model())
    return client


@contextmanager
def clients(broker: MosquittoBroker, project: str, *names: str) -> Iterator[list[BasicClient]]:
    made: list[BasicClient] = []
    try:
        for name in names:
            made.append(make_client(broker, project, name))
        yield made
    finally:
        for client in made:
            client.disconnect()


def cli(
    broker: MosquittoBroker,
    project: str,
    *args: str,
    timeout: float = 10,
    tail: tuple[str, ...] = (),
) -> Any:
    """``fedhive ARGS --host ... --project P --aggregator a1 TAIL`` through CliRunner."""
    connection = [
        "--host",
        broker.host,
        "--port",
        str(broker.port),
        "--project",
        project,
        "--timeout",
        str(timeout),
    ]
    if "--aggregator" not in args:
        connection += ["--aggregator", "a1"]
    return CliRunner().invoke(main, [*args, *connection, *tail])


def cli_json(broker: MosquittoBroker, project: str, *args: str) -> dict[str, Any]:
    result = cli(broker, project, *args, "--json")
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def status_json(broker: MosquittoBroker, project: str) -> dict[str, Any]:
    """``fedhive status --json``, parsed and checked against the message schema."""
    data = cli_json(broker, project, "status")
    AggStatusMessage.model_validate(data)  # the JSON is the status itself
    return data


def status_until(
    broker: MosquittoBroker,
    project: str,
    what: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 10,
) -> dict[str, Any]:
    """``fedhive status --json`` until ``predicate`` holds (the status is republished within
    a monitor tick of a change)."""
    deadline = time.monotonic() + timeout
    while True:
        status = status_json(broker, project)
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last status: {status}")
        threading.Event().wait(0.1)  # a polling period between CLI calls


def agent_states(status: dict[str, Any] | AggStatusMessage) -> dict[str, str]:
    if isinstance(status, AggStatusMessage):
        return {a.name: a.state.value for a in status.agents}
    return {a["name"]: a["state"] for a in status["agents"]}


class StatusWatch:
    """Follows the aggregator's retained status from a background loop."""

    def __init__(self, settings: BrokerSettings, project: str) -> None:
        self._settings = settings
        self._project = project
        self._cond = threading.Condition()
        self.latest: AggStatusMessage | None = None

    async def run(self, started: asyncio.Event) -> None:
        control = ControlClient(settings=self._settings, project=self._project, aggregator="a1")
        async with control:
            started.set()
            async for status in control.statuses():
                with self._cond:
                    self.latest = status
                    self._cond.notify_all()

    def wait(
        self, what: str, predicate: Callable[[AggStatusMessage], bool], timeout: float = 30
    ) -> AggStatusMessage:
        """The first status (the current one included) for which ``predicate`` holds."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.latest is not None and predicate(self.latest), timeout
            )
            if not ok:
                raise AssertionError(f"timed out waiting for {what}; last status: {self.latest}")
            assert self.latest is not None
            return self.latest


@contextmanager
def watching(settings: BrokerSettings, project: str) -> Iterator[StatusWatch]:
    watch = StatusWatch(settings, project)
    loop = LoopThread("status-watch")

    async def start() -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(watch.run(started))
        await asyncio.wait_for(started.wait(), 10)
        return task

    task = loop.run(start(), timeout=15)

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        yield watch
    finally:
        loop.run(stop(), timeout=15)
        loop.close()


def in_thread(func: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``func`` in a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(func())
        except BaseException as exc:  # handed to the test thread
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def agent_process(
    broker: MosquittoBroker, project: str, name: str, log_dir: Path, *args: str
) -> Any:
    return spawn(
        [
            str(AGENT_SCRIPT),
            "--host",
            broker.host,
            "--port",
            str(broker.port),
            "--project",
            project,
            "--aggregator",
            "a1",
            "--name",
            name,
            "--heartbeat",
            str(HEARTBEAT),
            *args,
        ],
        log_dir / f"{name}-{time.monotonic_ns()}.log",
    )


def logs(log_dir: Path) -> str:
    files = sorted(log_dir.glob("*.log"))
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in files)


# ------------------------------------------------------------------ acceptance 1
@pytest.mark.broker
@pytest.mark.slow
def test_killed_agent_times_out_the_round_completes_without_it_and_it_comes_back(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: three agent processes; agent2 "trains" for a minute so it dies mid-round.
    timeout = 3.0
    config = aggregator_config(mosquitto, project_name, threshold=1.0, agent_timeout=timeout)
    settings = broker_settings(mosquitto)
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "1").touch()
    procs: list[Any] = []
    with (
        running_aggregator(config) as service,
        recording(settings, project_name, "a1") as rec,
        watching(settings, project_name) as watch,
    ):
        try:
            for i in range(2):
                procs.append(
                    agent_process(
                        mosquitto, project_name, f"agent{i}", tmp_path,
                        "--rounds", "2", "--train-seconds", "0.2", "--gate", str(gate),
                    )
                )  # fmt: skip
            victim = agent_process(
                mosquitto, project_name, "agent2", tmp_path, "--rounds", "1",
                "--train-seconds", "60",
            )  # fmt: skip
            watch.wait("3 active agents", lambda s: s.active == 3, timeout=60)
            upload_base(mosquitto, project_name)
            uploaded = time.time()
            watch.wait("2 of 3 models of round 1", lambda s: s.round == 1 and s.collected == 2)
            # agent2 has trained (main thread asleep) for longer than the agent timeout: the
            # heartbeats from its background loop keep it ACTIVE.
            training = watch.wait(
                "a status from past the agent timeout",
                lambda s: s.ts >= uploaded + timeout + 1.0,
                timeout=timeout + 10,
            )

            # Execute: kill -9 the agent that is still training.
            victim.kill()
            killed = time.monotonic()
            victim.wait(10)
            gone = watch.wait(
                "agent2 TIMEOUT",
                lambda s: agent_states(s).get("agent2") == PresenceState.TIMEOUT.value,
                timeout=timeout + 10,
            )
            detected = time.monotonic() - killed
            print(f"agent2 TIMEOUT {detected:.2f} s after kill -9 (timeout {timeout} s)")
            round1, _ = rec.wait_for_global(1, timeout=10)
            during_timeout = status_json(mosquitto, project_name)

            # Execute: restart it; it is ACTIVE again and takes part in round 2.
            procs.append(
                agent_process(
                    mosquitto, project_name, "agent2", tmp_path, "--rounds", "1",
                    "--train-seconds", "0.2",
                )
            )  # fmt: skip
            back = watch.wait(
                "agent2 ACTIVE again",
                lambda s: agent_states(s).get("agent2") == PresenceState.ACTIVE.value,
            )
            after_return = status_json(mosquitto, project_name)
            (gate / "2").touch()
            round2, _ = rec.wait_for_global(2, timeout=30)
            for proc in procs:
                assert proc.wait(30) == 0, logs(tmp_path)
        finally:
            for proc in [*procs, victim]:
                if proc.poll() is None:
                    proc.kill()
        results = list(service.results)

    # Assert: heartbeats went on while agent2 trained.
    assert agent_states(training)["agent2"] == PresenceState.ACTIVE.value
    assert (training.round, training.collected, training.needed) == (1, 2, 3)
    # Assert: TIMEOUT within timeout + one heartbeat interval (plus the observer's slack),
    # and not before the heartbeats ran out: the will alone does not end an agent's turn.
    assert timeout - 2 * HEARTBEAT <= detected <= timeout + HEARTBEAT + 0.3, detected
    assert (gone.active, gone.needed) == (2, 2)
    assert sorted(c.agent for c in round1.contributors) == ["agent0", "agent1"]
    assert [r.round for r in results] == [1, 2]
    # ... and `fedhive status --json` says the same.
    assert during_timeout["state"] == "ACTIVE"
    assert during_timeout["round"] == 2
    assert (during_timeout["active"], during_timeout["needed"]) == (2, 2)
    assert agent_states(during_timeout) == {
        "agent0": "ACTIVE",
        "agent1": "ACTIVE",
        "agent2": "TIMEOUT",
    }
    rows = {a["name"]: a for a in during_timeout["agents"]}
    assert rows["agent2"]["last_heartbeat"] >= timeout
    assert rows["agent0"]["last_heartbeat"] < timeout
    assert rows["agent0"]["last_round"] == 1
    assert rows["agent2"]["last_round"] is None
    # The returning agent counts again and contributes in the next round.
    assert (back.active, back.needed) == (3, 3)
    assert (after_return["active"], after_return["needed"]) == (3, 3)
    assert agent_states(after_return)["agent2"] == "ACTIVE"
    assert sorted(c.agent for c in round2.contributors) == ["agent0", "agent1", "agent2"]


# ------------------------------------------------------------------ acceptance 2
@pytest.mark.broker
def test_round_complete_aggregates_the_one_model_collected_and_opens_the_next_round(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: threshold 1.0, three agents, one model collected.
    config = aggregator_config(mosquitto, project_name, threshold=1.0)
    settings = broker_settings(mosquitto)
    with (
        running_aggregator(config) as service,
        recording(settings, project_name, "a1") as rec,
        clients(mosquitto, project_name, "c0", "c1", "c2") as agents,
    ):
        upload_base(mosquitto, project_name)
        for agent in agents:
            agent.wait_for_sg_model()
        ack = agents[0].send_trained_model(plus(2.0), num_samples=5)
        before = status_until(mosquitto, project_name, "1 collected", lambda s: s["collected"] == 1)

        # Execute
        reply = cli_json(mosquitto, project_name, "round", "complete")
        message, model = rec.wait_for_global(1, timeout=10)
        after = status_until(mosquitto, project_name, "round 2", lambda s: s["round"] == 2)
        again = cli(mosquitto, project_name, "round", "complete")
        results = list(service.results)

    # Assert: the one model is the aggregate; round 2 is open and waits for all three.
    assert ack is not None
    assert ack.status is AckStatus.ACCEPTED
    assert (before["round"], before["collected"], before["needed"], before["active"]) == (
        1,
        1,
        3,
        3,
    )
    assert reply["ok"] is True
    assert reply["command"] == "complete_round"
    assert "round 1 aggregated" in reply["detail"]
    assert reply["status"]["round"] == 2
    assert [c.agent for c in message.contributors] == ["c0"]
    for name, value in plus(2.0).items():
        np.testing.assert_array_equal(model[name], value)
    assert [(r.round, len(r.contributors)) for r in results] == [(1, 1)]
    assert after["state"] == "ACTIVE"
    assert (after["round"], after["collected"], after["needed"], after["active"]) == (2, 0, 3, 3)
    assert after["model_round"] == 1
    assert agent_states(after) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
    assert {a["name"]: a["last_round"] for a in after["agents"]} == {
        "c0": 1,
        "c1": None,
        "c2": None,
    }
    # A second complete-round has nothing to aggregate: refused with the reason.
    assert again.exit_code == EXIT_REFUSED
    assert "round 2 has no model yet" in again.output


@pytest.mark.broker
def test_control_commands_fail_clearly_for_strangers_and_without_an_aggregator(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    config = aggregator_config(mosquitto, project_name)
    with running_aggregator(config):
        # Execute
        stranger = cli(mosquitto, project_name, "aggregator", "stop", "--user", "mallory")
        stranger_json = cli(
            mosquitto, project_name, "set", "threshold", "0.5", "--user", "eve", "--json"
        )
        waiting = cli(mosquitto, project_name, "round", "complete")
        state = status_json(mosquitto, project_name)
    nobody = cli(mosquitto, project_name, "round", "complete", "--aggregator", "nobody", timeout=1)
    no_status = cli(mosquitto, project_name, "status", "--aggregator", "nobody", timeout=1)

    # Assert: refusals exit 1 with the reason; silence exits 3 naming the aggregator.
    assert stranger.exit_code == EXIT_REFUSED
    assert "'mallory' is not an admin" in stranger.output
    assert stranger_json.exit_code == EXIT_REFUSED
    assert json.loads(stranger_json.stdout)["ok"] is False
    assert waiting.exit_code == EXIT_REFUSED
    assert "WAITING_BASE" in waiting.output
    assert state["state"] == "WAITING_BASE"
    assert nobody.exit_code == EXIT_NO_ANSWER
    assert "no aggregator 'nobody' answered within 1 s" in nobody.output
    assert no_status.exit_code == EXIT_NO_ANSWER
    assert "no status from aggregator 'nobody'" in no_status.output


@pytest.mark.broker
def test_control_plane_answers_malformed_requests_and_keeps_replies_on_reply_topics(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare
    config = aggregator_config(mosquitto, project_name)
    settings = broker_settings(mosquitto)
    topics = Topics(project_name)
    reply_topic = topics.agg_reply("a1")
    loop = LoopThread("raw-admin")

    async def exchange() -> list[tuple[str, bytes | None, ControlReply]]:
        got: list[tuple[str, bytes | None, ControlReply]] = []
        async with MqttTransport(settings=settings, client_id=f"{project_name}.raw") as t:
            await t.subscribe(f"{reply_topic}/#", reply_topic, topics.agg_model("a1"))
            # garbage, on the caller's reply sub-topic
            await t.publish(
                topics.agg_control("a1"),
                b"\x00garbage",
                correlation=b"c1",
                response_topic=f"{reply_topic}/me",
            )
            # a valid request asking for the reply on the model topic: answered on agg_reply
            request = ControlRequest(
                project=project_name,
                sender="admin",
                command=ControlCommand.SET_THRESHOLD,
                value=0.5,
            )
            await t.publish(
                topics.agg_control("a1"),
                encode_message(request),
                correlation=b"c2",
                response_topic=topics.agg_model("a1"),
            )
            messages = t.messages()
            while len(got) < 2:
                incoming = await asyncio.wait_for(anext(messages), 10)
                reply = decode_message(incoming.payload)
                assert isinstance(reply, ControlReply), incoming.topic
                got.append((incoming.topic, incoming.correlation, reply))
        return got

    with running_aggregator(config) as service:
        # Execute
        try:
            got = loop.run(exchange(), timeout=30)
        finally:
            loop.close()
        threshold = service.engine.threshold

    # Assert
    (topic1, corr1, bad), (topic2, corr2, good) = got
    assert (topic1, corr1, bad.ok) == (f"{reply_topic}/me", b"c1", False)
    assert bad.reason is not None
    assert "invalid control request" in bad.reason or "not a msgpack" in bad.reason
    assert (topic2, corr2, good.ok) == (reply_topic, b"c2", True)
    assert threshold == 0.5


# ------------------------------------------------------------------ acceptance 3
@pytest.mark.broker
def test_set_method_during_a_round_applies_from_the_next_round(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare
    config = aggregator_config(mosquitto, project_name, threshold=1.0)
    settings = broker_settings(mosquitto)
    with (
        running_aggregator(config) as service,
        recording(settings, project_name, "a1") as rec,
        clients(mosquitto, project_name, "c0", "c1", "c2") as agents,
    ):
        upload_base(mosquitto, project_name)
        for agent in agents:
            agent.wait_for_sg_model()

        # Execute: switch during round 1.
        reply = cli_json(mosquitto, project_name, "set", "method", "geometric_median")
        during = status_json(mosquitto, project_name)
        for i, agent in enumerate(agents):
            agent.send_trained_model(plus(float(i)), num_samples=1)
        round1, _ = rec.wait_for_global(1, timeout=10)
        for agent in agents:
            agent.wait_for_sg_model()
        after = status_until(mosquitto, project_name, "round 2", lambda s: s["round"] == 2)
        # Round 2 with an outlier: the geometric median stays with the majority.
        for agent, delta in zip(agents, (1.0, 1.0, 100.0), strict=True):
            agent.send_trained_model(plus(delta), num_samples=1)
        round2, model2 = rec.wait_for_global(2, timeout=20)
        results = list(service.results)

    # Assert: round 1 keeps fedavg, round 2 is aggregated with geometric_median.
    assert reply["ok"] is True
    assert reply["status"]["method"] == "fedavg"
    assert reply["status"]["next_method"] == "geometric_median"
    assert (during["method"], during["next_method"]) == ("fedavg", "geometric_median")
    assert round1.method == "fedavg"
    assert (after["method"], after["next_method"], after["round"]) == ("geometric_median", None, 2)
    assert round2.method == "geometric_median"
    assert [(r.round, r.method) for r in results] == [(1, "fedavg"), (2, "geometric_median")]
    # fedavg of round 1 is +1 (mean of 0, 1, 2); round 2's inputs are +2, +2, +101 from there.
    assert float(np.abs(model2["w"] - 2.0).max()) < 1.0  # a mean would be 35


@pytest.mark.broker
def test_set_commands_change_counts_at_once_and_refuse_bad_values(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: three agents, two models collected, threshold 1.0.
    config = aggregator_config(mosquitto, project_name, threshold=1.0)
    settings = broker_settings(mosquitto)
    with (
        running_aggregator(config),
        recording(settings, project_name, "a1") as rec,
        clients(mosquitto, project_name, "c0", "c1", "c2") as agents,
    ):
        upload_base(mosquitto, project_name)
        for agent in agents:
            agent.wait_for_sg_model()
        for agent in agents[:2]:
            agent.send_trained_model(plus(1.0))

        # Execute
        timeout = cli_json(mosquitto, project_name, "set", "timeout", "7.5")
        max_agents = cli_json(mosquitto, project_name, "set", "max-agents", "5")
        threshold = cli_json(mosquitto, project_name, "set", "threshold", "0.5")
        round1, _ = rec.wait_for_global(1, timeout=10)
        after = status_until(mosquitto, project_name, "round 2", lambda s: s["round"] == 2)
        bad_threshold = cli(mosquitto, project_name, "set", "threshold", "1.5")
        bad_timeout = cli(mosquitto, project_name, "set", "timeout", tail=("--", "-1"))
        bad_method = cli(mosquitto, project_name, "set", "method", "nope")
        bad_param = cli(mosquitto, project_name, "set", "method", "krum", "--param", "nope=1")
        human = cli(mosquitto, project_name, "set", "threshold", "1")
        view = cli(mosquitto, project_name, "status")

    # Assert: the lower threshold made round 1 ready at once (2 of 3 collected).
    assert timeout["status"]["agent_timeout"] == 7.5
    assert max_agents["status"]["max_agents"] == 5
    assert threshold["status"]["threshold"] == 0.5
    assert sorted(c.agent for c in round1.contributors) == ["c0", "c1"]
    assert (after["threshold"], after["agent_timeout"], after["max_agents"]) == (0.5, 7.5, 5)
    assert (after["round"], after["needed"], after["active"]) == (2, 2, 3)
    assert bad_threshold.exit_code == EXIT_REFUSED
    assert "threshold must be in (0, 1]" in bad_threshold.output
    assert bad_timeout.exit_code == EXIT_REFUSED
    assert "agent timeout must be >= 0" in bad_timeout.output
    assert bad_method.exit_code == EXIT_REFUSED
    assert "unknown aggregation method 'nope'" in bad_method.output
    assert bad_param.exit_code == EXIT_REFUSED
    assert "'nope'" in bad_param.output
    assert human.exit_code == 0, human.output
    assert "threshold 0.5 -> 1" in human.output
    assert view.exit_code == 0, view.output
    for text in ("Current round", "Models needed", "Models collected", "c0", "ACTIVE"):
        assert text in view.output


# ------------------------------------------------------------------ acceptance 4
@pytest.mark.broker
def test_stop_refuses_uploads_agents_wait_and_restart_continues_the_round(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare: two agents, threshold 1.0; c0's model for round 1 is in.
    config = aggregator_config(mosquitto, project_name, threshold=1.0)
    settings = broker_settings(mosquitto)
    with (
        running_aggregator(config) as service,
        recording(settings, project_name, "a1") as rec,
        clients(mosquitto, project_name, "c0", "c1") as (c0, c1),
    ):
        upload_base(mosquitto, project_name)
        for agent in (c0, c1):
            agent.wait_for_sg_model()
        c0.send_trained_model(plus(1.0), num_samples=1)

        # Execute: stop.
        stopped = cli(mosquitto, project_name, "aggregator", "stop")
        inactive = status_json(mosquitto, project_name)
        with pytest.raises(AggregatorInactiveError) as refused:
            c1.send_trained_model(plus(3.0), num_samples=1)
        raw_ack = _raw_upload(settings, project_name, "c1")
        # Both agents wait: c0 for round 1's model, c1 for the restart (to send again).
        cpu = time.process_time()
        waiter0, got0 = in_thread(c0.wait_for_sg_model)
        waiter1, got1 = in_thread(c1.wait_for_sg_model)
        waiter0.join(1.5)
        waiter1.join(0.1)
        still_waiting = waiter0.is_alive() and waiter1.is_alive()
        cpu_while_waiting = time.process_time() - cpu

        # Execute: restart; c1 gets the same model back, trains and sends again.
        restarted = cli(mosquitto, project_name, "aggregator", "restart")
        waiter1.join(10)
        retry_round = c1.current_round
        resent = c1.send_trained_model(plus(3.0), num_samples=1)
        round1, model1 = rec.wait_for_global(1, timeout=10)
        waiter0.join(10)
        after = status_until(mosquitto, project_name, "round 2", lambda s: s["round"] == 2)
        results = list(service.results)

    # Assert: the refusal and the INACTIVE status.
    assert stopped.exit_code == 0, stopped.output
    assert "stopped (INACTIVE) in round 1" in stopped.output
    assert inactive["state"] == "INACTIVE"
    assert (inactive["round"], inactive["collected"]) == (1, 1)
    assert "stopped by admin 'admin'" in inactive["blocker"]
    assert isinstance(refused.value, RejectedError)
    assert "not operational" in refused.value.reason
    assert raw_ack.status is AckStatus.REJECTED
    assert raw_ack.refusal is Refusal.INACTIVE
    assert raw_ack.reason is not None
    assert "INACTIVE" in raw_ack.reason
    assert still_waiting
    assert cpu_while_waiting < 0.75, "waiting agents must not busy-loop"
    # The same round continued and completed with both models.
    assert restarted.exit_code == 0, restarted.output
    assert "restarted (ACTIVE) in round 1" in restarted.output
    assert got1
    assert isinstance(got1[0], dict)
    assert retry_round == 0  # the same model again, to train from
    assert resent is not None
    assert resent.status is AckStatus.ACCEPTED
    assert sorted(c.agent for c in round1.contributors) == ["c0", "c1"]
    np.testing.assert_allclose(model1["w"], plus(2.0)["w"])
    assert got0
    assert isinstance(got0[0], dict)
    assert [r.round for r in results] == [1]
    assert (after["state"], after["round"], after["collected"]) == ("ACTIVE", 2, 0)


def _raw_upload(settings: BrokerSettings, project: str, agent: str) -> AckMessage:
    """An upload straight onto the broker (no client-side checks); returns the ack."""
    topics = Topics(project)
    loop = LoopThread("raw-upload")

    async def upload() -> AckMessage:
        async with MqttTransport(settings=settings, client_id=f"{project}.raw.{agent}") as t:
            await t.subscribe(topics.agent_inbox(agent))
            message = ModelMessage(
                project=project,
                sender=agent,
                kind=ModelKind.LOCAL,
                round=1,
                data=bytes(encode(plus(5.0))),
            )
            await t.publish(topics.agg_local("a1", agent), encode_message(message))
            messages = t.messages()
            while True:
                incoming = await asyncio.wait_for(anext(messages), 10)
                ack = decode_message(incoming.payload)
                if isinstance(ack, AckMessage):
                    return ack

    try:
        return loop.run(upload(), timeout=20)
    finally:
        loop.close()


# ------------------------------------------------------------------ acceptance 5
@pytest.mark.broker
def test_agent_over_max_agents_is_refused_with_a_typed_error(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare
    config = aggregator_config(mosquitto, project_name, max_agents=3)
    with (
        running_aggregator(config),
        clients(mosquitto, project_name, "c0", "c1", "c2") as admitted,
    ):
        upload_base(mosquitto, project_name)
        for agent in admitted:
            agent.wait_for_sg_model()

        # Execute: a fourth agent.
        with clients(mosquitto, project_name, "c3") as (fourth,):
            with pytest.raises(AgentRejectedError) as waited:
                fourth.wait_for_sg_model(timeout=10)
            full = status_until(
                mosquitto, project_name, "c3 listed", lambda s: "c3" in agent_states(s)
            )
            # Raising the limit admits the waiting agent.
            raised = cli_json(mosquitto, project_name, "set", "max-agents", "4")
            fourth.wait_for_sg_model(timeout=10)
            roomy = status_json(mosquitto, project_name)

    # Assert
    assert "max_agents 3" in waited.value.reason
    assert isinstance(waited.value, RejectedError)
    assert (full["max_agents"], full["active"], full["needed"]) == (3, 3, 3)
    assert agent_states(full) == {
        "c0": "ACTIVE",
        "c1": "ACTIVE",
        "c2": "ACTIVE",
        "c3": "REJECTED",
    }
    assert raised["ok"] is True
    assert fourth.current_round == 0
    assert (roomy["max_agents"], roomy["active"]) == (4, 4)
    assert agent_states(roomy)["c3"] == "ACTIVE"


# ------------------------------------------------------------------ max_rounds
@pytest.mark.broker
def test_after_max_rounds_agents_are_told_training_is_finished(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    # Prepare
    config = aggregator_config(mosquitto, project_name, max_rounds=2)
    with running_aggregator(config), clients(mosquitto, project_name, "c0") as (c0,):
        upload_base(mosquitto, project_name)
        model = c0.wait_for_sg_model()

        # Execute: two rounds, then one more wait and one more send.
        for _ in range(2):
            c0.send_trained_model({k: v + 1 for k, v in model.items()})
            model = c0.wait_for_sg_model()
        last_round = c0.current_round
        with pytest.raises(TrainingFinishedError) as waited:
            c0.wait_for_sg_model(timeout=10)
        with pytest.raises(TrainingFinishedError) as sent:
            c0.send_trained_model(model)
        finished = status_json(mosquitto, project_name)
        complete = cli(mosquitto, project_name, "round", "complete")

    # Assert
    assert last_round == 2
    assert "completed 2 rounds" in waited.value.reason
    assert "training is finished" in sent.value.reason
    assert (finished["state"], finished["model_round"], finished["max_rounds"]) == (
        AggregatorState.FINISHED.value,
        2,
        2,
    )
    assert complete.exit_code == EXIT_REFUSED
    assert "FINISHED" in complete.output


# ------------------------------------------------------------------ status view
@pytest.mark.broker
def test_status_watch_prints_one_json_line_per_update(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    config = aggregator_config(mosquitto, project_name)
    with running_aggregator(config):
        upload_base(mosquitto, project_name)
        # Execute: the periodic republish (status_interval 1 s) brings updates.
        result = cli(mosquitto, project_name, "status", "--watch", "--json", "--updates", "2")
        view = cli(mosquitto, project_name, "status", "--watch", "--updates", "1")

    # Assert
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    assert all(line["state"] == "ACTIVE" and line["round"] == 1 for line in lines)
    assert view.exit_code == 0, view.output
    assert "Models collected" in view.output


@pytest.mark.broker
def test_control_client_times_out_naming_the_aggregator(
    mosquitto: MosquittoBroker, project_name: str
) -> None:
    settings = broker_settings(mosquitto)
    loop = LoopThread("control")

    async def ask() -> None:
        async with ControlClient(settings=settings, project=project_name, aggregator="x") as c:
            await c.request(ControlCommand.STOP, timeout=0.5)

    try:
        with pytest.raises(FedhiveTimeoutError, match=r"no aggregator 'x' answered within 0\.5 s"):
            loop.run(ask(), timeout=10)
    finally:
        loop.close()
    assert issubclass(FedhiveTimeoutError, FedhiveError)


# ------------------------------------------------------------------ in memory (no broker)
async def test_monitor_and_control_plane_on_an_in_memory_bus() -> None:
    """The heartbeat monitor and the control plane without a broker: a silent agent turns
    TIMEOUT by the clock, stop/restart flip the state, a stranger is refused."""
    # Prepare: an aggregator and an agent that announces itself once and then falls silent.
    bus = InMemoryBus()
    config = AggregatorConfig(
        name="a1", project="mem", agent_timeout=0.3, monitor_interval=0.05, status_interval=0.2
    )
    service = AggregatorService(config=config, transport=InMemoryTransport(bus=bus))
    ready = asyncio.Event()
    serving = asyncio.create_task(service.run(ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    settings = BrokerSettings()
    try:
        async with InMemoryTransport(bus=bus) as agent:
            online = AgentStatusMessage(
                project="mem", sender="quiet", state=AgentState.ONLINE, aggregator="a1"
            )
            await agent.publish(
                Topics("mem").agent_status("quiet"), encode_message(online), retain=True
            )
        admin = ControlClient(
            settings=settings, project="mem", aggregator="a1", transport=InMemoryTransport(bus=bus)
        )
        eve = ControlClient(
            settings=settings,
            project="mem",
            aggregator="a1",
            sender="eve",
            transport=InMemoryTransport(bus=bus),
        )
        async with admin, eve:
            # Execute
            timed_out = None
            async for status in admin.statuses(timeout=5):
                if agent_states(status).get("quiet") == "TIMEOUT":
                    timed_out = status
                    break
            stopped = await admin.request(ControlCommand.STOP, timeout=2)
            refused = await eve.request(ControlCommand.RESTART, timeout=2)
            restarted = await admin.request("restart", timeout=2)
            bad = await admin.request(ControlCommand.SET_THRESHOLD, 0, timeout=2)
    finally:
        service.stop()
        await asyncio.wait_for(serving, 10)

    # Assert
    assert timed_out is not None
    assert (timed_out.active, timed_out.needed) == (0, 1)
    assert stopped.ok
    assert stopped.status is not None
    assert stopped.status.state is AggregatorState.INACTIVE
    assert not refused.ok
    assert refused.reason == "'eve' is not an admin of aggregator 'a1': only admins may control it"
    assert restarted.ok
    assert restarted.status is not None
    assert restarted.status.state is AggregatorState.WAITING_BASE
    assert not bad.ok
    assert bad.reason is not None
    assert "threshold must be in (0, 1]" in bad.reason


class HeldModels(InMemoryTransport):
    """An aggregator's transport that hands a model it publishes to the bus at once but
    confirms the publish only when ``release`` is set, once ``hold`` is: a broker still busy
    fanning the model out, as it is when the agents' next uploads come in."""

    def __init__(self, *, bus: InMemoryBus, topic: str) -> None:
        super().__init__(bus=bus)
        self.topic = topic
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def publish(self, topic: str, payload: Any, **options: Any) -> None:
        await super().publish(topic, payload, **options)
        if topic == self.topic and self.hold:
            self.held.set()
            await self.release.wait()


async def test_uploads_of_the_next_round_are_taken_while_the_new_model_is_confirmed() -> None:
    # Prepare: one agent x (threshold 1.0: each of its models completes a round); the broker's
    # confirmation of every model after the base is held back.
    bus = InMemoryBus()
    topics = Topics("mem")
    held = HeldModels(bus=bus, topic=topics.agg_model("a1"))
    config = AggregatorConfig(name="a1", project="mem", monitor_interval=0.05)
    async with peer_on(bus, "mem") as peer, serving(config, bus, transport=held, persist=False):
        await peer.online("x")
        await peer.base(base_model())
        await peer.until(lambda: len(peer.on(topics.agg_model("a1"))) == 1, "model 0")
        held.hold = True

        # Execute: x's round-1 model completes round 1; model 1 reaches x, its publish is not
        # confirmed yet; x sends round 2, which completes round 2 as well.
        await peer.local("x", 1, plus(1.0), 1.0)
        await asyncio.wait_for(held.held.wait(), 5)
        await peer.local("x", 2, plus(2.0), 1.0)
        await peer.until(lambda: len(peer.acks("x")) == 2, "x's round-2 ack")
        models_while_held = [m.round for m in peer.on(topics.agg_model("a1"))]
        held.release.set()
        await peer.until(lambda: len(peer.on(topics.agg_model("a1"))) == 3, "model 2")

    # Assert: round 2's model was taken while model 1 waited for its confirmation; model 2 was
    # announced only after model 1's publish ended, so the models went out in order.
    assert peer.acks("x") == [AckStatus.ACCEPTED, AckStatus.ACCEPTED]
    assert models_while_held == [0, 1]
    assert [m.round for m in peer.on(topics.agg_model("a1"))] == [0, 1, 2]


async def test_fast_rounds_share_a_status_per_tick_and_a_new_state_goes_out_at_once() -> None:
    # Prepare: one agent x (threshold 1.0: each of its models completes a round), six rounds
    # at most, a monitor tick far longer than the test; a watcher records every status.
    bus = InMemoryBus()
    topics = Topics("mem")
    config = AggregatorConfig(name="a1", project="mem", monitor_interval=30.0, max_rounds=6)
    statuses: list[AggStatusMessage] = []

    async def watch(transport: InMemoryTransport) -> None:
        async for incoming in transport.messages():
            if incoming.payload:
                message = decode_message(incoming.payload)
                assert isinstance(message, AggStatusMessage)
                statuses.append(message)

    async with (
        InMemoryTransport(bus=bus) as watcher,
        peer_on(bus, "mem") as peer,
        serving(config, bus, persist=False),
    ):
        await watcher.subscribe(topics.agg_status("a1"))
        watching = asyncio.create_task(watch(watcher))
        await peer.online("x")
        await peer.base(base_model())

        # Execute: six rounds in quick succession.
        def has_model(n: int) -> bool:
            return any(m.round == n for m in peer.on(topics.agg_model("a1")))

        for r in range(1, 7):
            await peer.until(functools.partial(has_model, r - 1), f"model {r - 1}")
            await peer.local("x", r, plus(float(r)), 1.0)
        await peer.until(
            lambda: any(s.state is AggregatorState.FINISHED for s in statuses), "FINISHED"
        )
        watching.cancel()

    # Assert: the five rounds that only moved the round on waited for the tick (no status of
    # rounds 2-6 while ACTIVE); the last model made the aggregator FINISHED, shown at once.
    active_rounds = [s.round for s in statuses if s.state is AggregatorState.ACTIVE]
    assert not set(active_rounds) & {2, 3, 4, 5, 6}, active_rounds
    assert (statuses[-1].state, statuses[-1].model_round) == (AggregatorState.FINISHED, 6)


class BatchRecorder(InMemoryTransport):
    """An aggregator's transport that records what it publishes together (``publish_all``)."""

    def __init__(self, *, bus: InMemoryBus) -> None:
        super().__init__(bus=bus)
        self.batches: list[list[str]] = []

    async def publish_all(self, messages: Sequence[tuple[str, bytes]]) -> None:
        self.batches.append([topic for topic, _ in messages])
        await super().publish_all(messages)


async def test_acks_wait_while_uploads_wait_then_go_out_together() -> None:
    # Prepare: four agents online (threshold 1.0: three uploads leave the round open), model 0
    # out; the aggregator's batched publishes are recorded.
    bus = InMemoryBus()
    topics = Topics("mem")
    recorder = BatchRecorder(bus=bus)
    config = AggregatorConfig(name="a1", project="mem", monitor_interval=0.05)
    async with peer_on(bus, "mem") as peer, serving(config, bus, transport=recorder, persist=False):
        await peer.online("w", "x", "y", "z")
        await peer.base(base_model())
        await peer.until(lambda: len(peer.on(topics.agg_model("a1"))) == 1, "model 0")

        # Execute: three uploads reach the aggregator before it takes the first (the
        # in-memory bus delivers each without a turn of the event loop).
        for agent in ("x", "y", "z"):
            await peer.local(agent, 1, plus(1.0), 1.0)
        await peer.until(lambda: all(peer.acks(a) for a in "xyz"), "three acks")

    # Assert: no ack went out while uploads waited; the three went out in one batch.
    assert [peer.acks(a) for a in "xyz"] == [[AckStatus.ACCEPTED]] * 3
    assert recorder.batches == [[topics.agent_inbox(a) for a in ("x", "y", "z")]]


async def test_the_ack_of_a_chunked_upload_goes_out_once_it_is_handled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: acks would wait a minute for others; models of 8 KB travel in 1 KB chunks; two
    # agents online, so x's upload leaves the round open.
    monkeypatch.setattr(outbox, "ACK_DELAY", 60.0)
    bus = InMemoryBus()
    topics = Topics("mem")
    config = AggregatorConfig(name="a1", project="mem", broker=BrokerSettings(chunk_size=1024))
    big = {"w": np.zeros(2048, dtype=np.float32)}
    async with peer_on(bus, "mem") as peer, serving(config, bus, persist=False):
        await peer.online("x", "y")
        await peer.base(big)
        await peer.until(lambda: len(peer.on(topics.agg_model("a1"))) == 1, "model 0")

        # Execute: x's upload as an envelope and its chunks (handled beside the consumer).
        payload = encode({"w": big["w"] + 1})
        message, manifest = prepare_model_message(
            payload, chunk_size=1024, project="mem", sender="x", kind=ModelKind.LOCAL,
            round=1, num_samples=1.0, metrics={},
        )  # fmt: skip
        assert manifest is not None
        assert manifest.count == 9
        topic = topics.agg_local("a1", "x")
        await peer.transport.publish(topic, encode_message(message))
        for frame in iter_chunk_frames(payload, manifest):
            await peer.transport.publish(Topics.chunks(topic), frame)

        # Assert: the ack came once the model was folded, not after the delay (no other
        # message came that would have sent it).
        await peer.until(lambda: bool(peer.acks("x")), "x's ack")
    assert peer.acks("x") == [AckStatus.ACCEPTED]
