"""Scale-out over a real Mosquitto: several aggregators under one sg-aggregator.

Acceptance (issue 5): the SG model is the sample-weighted mean over every agent's model (not an
equal-weight mean of aggregators); a killed aggregator stops counting after the aggregator
timeout and its auto-assigned agents re-home to the live one; a late agent at either aggregator
starts from the current SG model. Plus unit tests of the liveness bookkeeping and the regional
round in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from support import ROOT, broker_settings, running_aggregator, spawn, weighted_mean

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from agent.session import AgentSession
from aggregator.engine import RoundEngine, wide_spec, widen
from aggregator.service import AggregatorService
from aggregator.sg import AggregatorTracker, SgAggregatorService
from aggregator.strategies import create_strategy
from broker.process import MosquittoBroker
from common.codec import Array, ModelSpec, decode, encode
from common.config import AgentConfig, AggregatorConfig, BrokerSettings, SgAggregatorConfig
from common.errors import FedhiveError
from common.exchange import ModelReceiver
from common.messages import (
    AckMessage,
    AckStatus,
    AgentState,
    AgentStatusMessage,
    AggAgentsMessage,
    AggregatorLiveness,
    AggregatorState,
    AggStatusMessage,
    Contributor,
    ModelKind,
    ModelMessage,
    SgStatusMessage,
    decode_message,
    encode_message,
)
from common.topics import TopicKind, Topics
from common.transport import InMemoryBus, InMemoryTransport, MqttTransport
from fedhive.cli import main

AGENT_SCRIPT = ROOT / "tests" / "agents" / "numpy_agent.py"
SHAPE = (4, 5)


# ------------------------------------------------------------------ helpers
def base_model(rows: int = SHAPE[0], cols: int = SHAPE[1]) -> dict[str, Array]:
    return {"w": np.zeros((rows, cols), dtype=np.float32), "b": np.zeros(cols, dtype=np.float32)}


def upload_base(broker: MosquittoBroker, project: str, model: dict[str, Array]) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        timeout=30,
        base_model=BaseModel("tiny", model, BaseModelConvFormat.numpy_format),
    ).initialize()


def sg_config(broker: MosquittoBroker, project: str, **settings: Any) -> SgAggregatorConfig:
    values: dict[str, Any] = {"monitor_interval": 0.2, "status_interval": 0.5, **settings}
    return SgAggregatorConfig(project=project, broker=broker_settings(broker), **values)


def aggregator_config(
    server: MosquittoBroker, project: str, name: str, **settings: Any
) -> AggregatorConfig:
    return AggregatorConfig(
        name=name,
        project=project,
        broker=settings.pop("broker", broker_settings(server)),
        sg_aggregator="sg",
        monitor_interval=0.2,
        status_interval=0.5,
        **settings,
    )


@contextmanager
def running_sg(config: SgAggregatorConfig) -> Iterator[SgAggregatorService]:
    """An SgAggregatorService serving in a background event loop until the block ends."""
    loop = LoopThread("sg-aggregator")
    service = SgAggregatorService(config=config)
    ready = threading.Event()

    async def serve() -> None:
        started = asyncio.Event()
        task = asyncio.create_task(service.run(ready=started))
        await started.wait()
        ready.set()
        await task

    future = asyncio.run_coroutine_threadsafe(serve(), loop.loop)
    try:
        if not ready.wait(15):
            raise RuntimeError(f"sg-aggregator did not start: {future}")
        yield service
    finally:
        loop.loop.call_soon_threadsafe(service.stop)
        future.result(15)
        loop.close()


@dataclass
class Federation:
    """Everything that crosses the broker for one project: local models (with the aggregator
    they went to), SG models, each aggregator's models, the latest statuses."""

    settings: BrokerSettings
    project: str
    locals: dict[int, dict[str, tuple[float, dict[str, Array]]]] = field(default_factory=dict)
    local_to: dict[int, dict[str, str]] = field(default_factory=dict)
    sg: dict[int, tuple[ModelMessage, dict[str, Array], float]] = field(default_factory=dict)
    models: dict[str, dict[int, dict[str, Array]]] = field(default_factory=dict)
    statuses: dict[str, AggStatusMessage] = field(default_factory=dict)
    tables: dict[str, AggAgentsMessage] = field(default_factory=dict)  # the agent tables
    sg_status: SgStatusMessage | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"timed out waiting for {what}; statuses: {self.statuses}; sg: {self.sg_status}"
                )

    def active_agents(self, aggregator: str) -> set[str]:
        table = self.tables.get(aggregator)
        if table is None:
            return set()
        return {a.name for a in table.agents if a.state.value == "ACTIVE"}

    async def run(self, started: asyncio.Event) -> None:
        topics = Topics(self.project)
        receiver = ModelReceiver(max_bytes=1 << 30)
        root = topics.root
        async with MqttTransport(
            settings=self.settings, client_id=f"{self.project}.federation-recorder"
        ) as t:
            await t.subscribe(
                f"{root}/agg/+/local/#",
                f"{root}/agg/+/model",
                f"{root}/agg/+/model/chunk",
                topics.all_agg_status(),
                topics.all_agg_agents(),
                topics.sg_model(),
                Topics.chunks(topics.sg_model()),
                topics.sg_status(),
            )
            started.set()
            async for incoming in t.messages():
                try:
                    parsed = topics.parse(incoming.topic)
                    if parsed.chunk:
                        received = receiver.chunk(incoming.payload)
                    elif not incoming.payload:
                        continue
                    else:
                        message = decode_message(incoming.payload)
                        received = None
                        if isinstance(message, AggStatusMessage):
                            with self._cond:
                                self.statuses[message.sender] = message
                                self._cond.notify_all()
                            continue
                        if isinstance(message, AggAgentsMessage):
                            with self._cond:
                                self.tables[message.sender] = message
                                self._cond.notify_all()
                            continue
                        if isinstance(message, SgStatusMessage):
                            with self._cond:
                                self.sg_status = message
                                self._cond.notify_all()
                            continue
                        assert isinstance(message, ModelMessage)
                        received = receiver.announce(incoming.topic, message)
                    if received is None:
                        continue
                    tensors, _ = decode(bytearray(received.payload))
                except FedhiveError:
                    continue
                m = received.message
                where = topics.parse(received.topic)
                with self._cond:
                    if m.kind is ModelKind.LOCAL:
                        self.locals.setdefault(m.round, {})[m.sender] = (m.num_samples, tensors)
                        assert where.aggregator is not None
                        self.local_to.setdefault(m.round, {})[m.sender] = where.aggregator
                    elif m.kind is ModelKind.SG:
                        self.sg.setdefault(m.round, (m, tensors, time.monotonic()))
                    elif where.kind is TopicKind.AGG_MODEL and where.aggregator is not None:
                        self.models.setdefault(where.aggregator, {})[m.round] = tensors
                    self._cond.notify_all()


@contextmanager
def recording(settings: BrokerSettings, project: str) -> Iterator[Federation]:
    federation = Federation(settings, project)
    loop = LoopThread("federation-recorder")

    async def start() -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(federation.run(started))
        await asyncio.wait_for(started.wait(), 10)
        return task

    task = loop.run(start(), timeout=15)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        yield federation
    finally:
        loop.run(stop(), timeout=15)
        loop.close()


def agent_process(
    broker: MosquittoBroker, project: str, name: str, aggregator: str, log_dir: Path, *args: str
) -> Any:
    return spawn(
        [
            str(AGENT_SCRIPT),
            "--host", broker.host,
            "--port", str(broker.port),
            "--project", project,
            "--aggregator", aggregator,
            "--name", name,
            "--heartbeat", "0.5",
            *args,
        ],
        log_dir / f"{name}.log",
    )  # fmt: skip


def stop(proc: Any) -> None:
    """End a child process: SIGTERM (an aggregator says goodbye), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def logs(log_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(log_dir.glob("*.log"))
    )


def assert_close(got: dict[str, Array], expected: dict[str, Array], what: str) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(
            np.asarray(got[name], dtype=np.float64), value, rtol=0, atol=1e-6, err_msg=what
        )


# ------------------------------------------------------------------ acceptance 1
@pytest.mark.broker
@pytest.mark.slow
def test_sg_model_is_the_sample_weighted_mean_of_every_agent_across_aggregators(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: 2 aggregators × 3 agent processes with unequal sample counts and updates.
    settings = broker_settings(mosquitto)
    rounds = 3
    samples = {f"agent{k}": 5.0 + 7.0 * k + (20.0 if k % 2 else 0.0) for k in range(6)}
    home = {f"agent{k}": f"a{k % 2 + 1}" for k in range(6)}
    procs: list[Any] = []
    with (
        recording(settings, project_name) as fed,
        running_sg(sg_config(mosquitto, project_name)) as sg,
        running_aggregator(aggregator_config(mosquitto, project_name, "a1")),
        running_aggregator(aggregator_config(mosquitto, project_name, "a2")),
    ):
        try:
            for k, name in enumerate(samples):
                procs.append(
                    agent_process(
                        mosquitto, project_name, name, home[name], tmp_path,
                        "--rounds", str(rounds), "--samples", str(samples[name]),
                        "--delta", str(0.25 + 0.5 * k), "--shape", *map(str, SHAPE),
                    )
                )  # fmt: skip
            fed.wait(
                "3 active agents at each aggregator",
                lambda: all(len(fed.active_agents(a)) == 3 for a in ("a1", "a2")),
            )

            # Execute: upload the base model; the agents train 3 rounds.
            upload_base(mosquitto, project_name, base_model())
            fed.wait(f"SG model {rounds}", lambda: rounds in fed.sg, timeout=90)
            for proc in procs:
                assert proc.wait(60) == 0, logs(tmp_path)
        finally:
            for proc in procs:
                stop(proc)
        fed.wait(
            "both aggregators serving the last SG model",
            lambda: all(rounds in fed.models.get(a, {}) for a in ("a1", "a2")),
        )

    # Assert: every SG model is the weighted mean over all six local models of its round.
    assert [r.round for r in sg.results] == list(range(1, rounds + 1))
    assert [bool(r.model) for r in sg.results] == [False] * (rounds - 1) + [True]  # bounded
    for r in range(1, rounds + 1):
        local = fed.locals[r]
        assert sorted(local) == sorted(samples)
        assert {fed.local_to[r][a] for a in local} == {"a1", "a2"}
        message, model, _ = fed.sg[r]
        assert sorted(c.agent for c in message.contributors) == sorted(samples)
        assert message.num_samples == pytest.approx(sum(samples.values()))
        assert all(model[n].dtype == np.float32 for n in model)
        expected = weighted_mean(local)
        assert_close(model, expected, f"SG model {r}")
        # The test tells the right answer from the two wrong ones: an equal-weight mean of
        # the agents, and an equal-weight mean of the two regional means.
        equal = weighted_mean({k: (1.0, t) for k, (_, t) in local.items()})
        regions = {
            a: weighted_mean({k: v for k, v in local.items() if home[k] == a}) for a in ("a1", "a2")
        }
        by_aggregator = {n: (regions["a1"][n] + regions["a2"][n]) / 2 for n in expected}
        for wrong in (equal, by_aggregator):
            assert max(np.abs(wrong[n] - expected[n]).max() for n in expected) > 1e-3
        # Both aggregators hand the same SG model to their agents.
        for aggregator in ("a1", "a2"):
            for name, value in model.items():
                np.testing.assert_array_equal(fed.models[aggregator][r][name], value)
        # The SG layer weighted each region by its sample total.
        regionals = {c.agent: c.num_samples for c in sg.results[r - 1].contributors}
        assert regionals == {
            a: pytest.approx(sum(w for k, w in samples.items() if home[k] == a))
            for a in ("a1", "a2")
        }


# ------------------------------------------------------------------ acceptance 2
@pytest.mark.broker
@pytest.mark.slow
def test_killed_aggregator_stops_counting_after_the_timeout_and_its_agents_rehome(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the sg-aggregator here, two aggregator processes, six auto-assigned agents
    # (each held at a gate of its own until the test lets it send a round).
    timeout = 4.0
    settings = broker_settings(mosquitto)
    configs = {}
    for name in ("a1", "a2"):
        path = tmp_path / f"{name}.json"
        cfg = aggregator_config(mosquitto, project_name, name)
        path.write_text(cfg.model_dump_json())
        configs[name] = path
    agents = [f"agent{k}" for k in range(6)]
    samples = {name: 10.0 + 3.0 * k for k, name in enumerate(agents)}
    gates = {name: tmp_path / "gates" / name for name in agents}
    for gate in gates.values():
        gate.mkdir(parents=True)

    def open_gate(names: list[str], round: int) -> None:
        for name in names:
            (gates[name] / str(round)).touch()

    aggregators: dict[str, Any] = {}
    procs: list[Any] = []
    with (
        recording(settings, project_name) as fed,
        running_sg(sg_config(mosquitto, project_name, aggregator_timeout=timeout)) as sg,
    ):
        try:
            for name, path in configs.items():
                aggregators[name] = spawn(
                    ["-m", "fedhive", "aggregator", "start", "--config", str(path)],
                    tmp_path / f"{name}.log",
                )
            fed.wait(
                "both aggregators up",
                lambda: all(
                    fed.statuses.get(a) is not None
                    and fed.statuses[a].state is AggregatorState.WAITING_BASE
                    for a in ("a1", "a2")
                ),
                timeout=30,
            )
            for k, name in enumerate(agents):
                procs.append(
                    agent_process(
                        mosquitto, project_name, name, "auto", tmp_path,
                        "--rounds", "3", "--samples", str(samples[name]),
                        "--delta", str(1.0 + k), "--gate", str(gates[name]),
                        "--rehome-timeout", "1.5", "--ack-timeout", "5",
                        "--shape", *map(str, SHAPE),
                    )
                )  # fmt: skip
                # One at a time, so each sees the counts the ones before it made.
                fed.wait(
                    f"{k + 1} agents placed",
                    lambda n=k + 1: len(fed.active_agents("a1") | fed.active_agents("a2")) == n,
                )
            at = {a: sorted(fed.active_agents(a)) for a in ("a1", "a2")}
            assert [len(at["a1"]), len(at["a2"])] == [3, 3], at

            upload_base(mosquitto, project_name, base_model())
            open_gate(agents, 1)
            fed.wait("SG model 1", lambda: 1 in fed.sg)
            # Round 2: a1's agents send, a1's regional result reaches the sg-aggregator.
            open_gate(at["a1"], 2)
            fed.wait(
                "a1's regional result of round 2",
                lambda: (
                    fed.sg_status is not None
                    and fed.sg_status.round == 2
                    and fed.sg_status.regional_from == ["a1"]
                ),
            )

            # Execute: kill -9 a2 mid-round.
            aggregators["a2"].kill()
            killed = time.monotonic()
            aggregators["a2"].wait(10)
            fed.wait("SG model 2", lambda: 2 in fed.sg, timeout=timeout + 20)
            completed = fed.sg[2][2]
            # a2's agents re-home to a1 and train round 3 there with everyone else.
            fed.wait("six agents at a1", lambda: len(fed.active_agents("a1")) == 6)
            open_gate(at["a2"], 2)
            open_gate(agents, 3)
            fed.wait("SG model 3", lambda: 3 in fed.sg, timeout=60)
            for proc in procs:
                assert proc.wait(60) == 0, logs(tmp_path)
            sg_status = sg.status()
        finally:
            for proc in [*procs, *aggregators.values()]:
                stop(proc)

    # Assert: SG round 2 waited for the aggregator timeout, then completed with a1 alone.
    assert completed - killed >= timeout - 0.3, completed - killed
    assert completed - killed < timeout + 10
    message2, model2, _ = fed.sg[2]
    assert sorted(c.agent for c in message2.contributors) == at["a1"]
    assert [c.agent for c in sg.results[1].contributors] == ["a1"]
    assert_close(
        model2, weighted_mean({a: fed.locals[2][a] for a in at["a1"]}), "SG model 2 (a1 only)"
    )
    # Round 3: every agent took part, all through a1.
    message3, model3, _ = fed.sg[3]
    assert sorted(c.agent for c in message3.contributors) == agents
    assert set(fed.local_to[3].values()) == {"a1"}
    assert_close(model3, weighted_mean(fed.locals[3]), "SG model 3")
    states = {a.name: a.state for a in sg_status.aggregators}
    assert states["a2"] is AggregatorLiveness.GONE
    assert states["a1"] in (AggregatorLiveness.ALIVE, AggregatorLiveness.IDLE)
    assert sg_status.alive == 1
    for name in at["a2"]:
        log = (tmp_path / f"{name}.log").read_text()
        assert "re-homing to a1" in log
        assert f"{name}: sent round 3 to a1: accepted" in log


# ------------------------------------------------------------------ acceptance 3
@pytest.mark.broker
@pytest.mark.slow
def test_late_agent_at_either_aggregator_and_a_late_aggregator_start_from_the_sg_model(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: models bigger than one chunk, so late joiners must ask for the chunks of a
    # retained manifest (and regional results travel chunked too).
    settings = broker_settings(mosquitto, chunk_size=16 * 1024)
    shape = (64, 128)
    sg_cfg = sg_config(mosquitto, project_name).model_copy(update={"broker": settings})
    with (
        recording(settings, project_name) as fed,
        running_sg(sg_cfg),
        running_aggregator(aggregator_config(mosquitto, project_name, "a1", broker=settings)),
        running_aggregator(aggregator_config(mosquitto, project_name, "a2", broker=settings)),
    ):
        procs = [
            agent_process(
                mosquitto, project_name, f"agent{k}", f"a{k + 1}", tmp_path,
                "--rounds", "2", "--samples", str(10 + 20 * k), "--delta", str(k + 1.0),
                "--shape", *map(str, shape),
            )
            for k in range(2)
        ]  # fmt: skip
        try:
            fed.wait(
                "an agent at each aggregator",
                lambda: all(len(fed.active_agents(a)) == 1 for a in ("a1", "a2")),
            )
            upload_base(mosquitto, project_name, base_model(*shape))
            fed.wait("SG model 2", lambda: 2 in fed.sg, timeout=60)
            for proc in procs:
                assert proc.wait(60) == 0, logs(tmp_path)
        finally:
            for proc in procs:
                stop(proc)
        _, current, _ = fed.sg[2]
        assert_close(current, weighted_mean(fed.locals[2]), "SG model 2")

        # Execute: a third aggregator starts late; a late agent joins each aggregator.
        a3 = aggregator_config(mosquitto, project_name, "a3", broker=settings)
        with running_aggregator(a3) as late_aggregator:
            fed.wait("a3 at SG model 2", lambda: 2 in fed.models.get("a3", {}), timeout=30)
            assert late_aggregator.engine.round == 3
            got: dict[str, tuple[int | None, dict[str, Array]]] = {}
            for aggregator in ("a1", "a2", "a3"):
                late = BasicClient(
                    aggregator_ip_address=mosquitto.host,
                    reg_port=mosquitto.port,
                    agent_name=f"late-{aggregator}",
                    project=project_name,
                    aggregator=aggregator,
                    chunk_size=16 * 1024,
                    model_timeout=30,
                )
                try:
                    late.set_bm_obj(base_model(*shape))
                    model = late.wait_for_sg_model()
                    got[aggregator] = (late.current_round, model)
                finally:
                    late.disconnect()

            # `fedhive status` shows the SG layer above the aggregator; `fedhive sg-aggregator
            # status --json` is the SG status itself, once it lists a3 (the SG status goes out
            # at most every monitor interval).
            fed.wait(
                "the SG status listing a3",
                lambda: fed.sg_status is not None
                and "a3" in {a.name for a in fed.sg_status.aggregators},
                timeout=10,
            )
            conn = [
                "--host", mosquitto.host, "--port", str(mosquitto.port),
                "--project", project_name, "--timeout", "10",
            ]  # fmt: skip
            shown = CliRunner().invoke(main, ["status", *conn, "--aggregator", "a3"])
            sg_json = CliRunner().invoke(main, ["sg-aggregator", "status", *conn, "--json"])

    # Assert: every late agent starts from the current SG model (round 2), bit for bit.
    for aggregator, (round, model) in got.items():
        assert round == 2, aggregator
        for name, value in current.items():
            np.testing.assert_array_equal(model[name], value, err_msg=aggregator)
    assert not np.array_equal(current["w"], base_model(*shape)["w"])
    assert shown.exit_code == 0, shown.output
    assert shown.output.index("SG round") < shown.output.index("Current round")
    assert "Aggregators alive" in shown.output
    assert "Regional results" in shown.output
    assert sg_json.exit_code == 0, sg_json.output
    sg_status = SgStatusMessage.model_validate(json.loads(sg_json.stdout))
    assert (sg_status.round, sg_status.model_round) == (3, 2)
    assert {a.name for a in sg_status.aggregators} == {"a1", "a2", "a3"}
    assert sg_status.alive == 3


# ------------------------------------------------------------------ units
def status(name: str, state: AggregatorState, active: int, **extra: Any) -> AggStatusMessage:
    return AggStatusMessage(
        project="p",
        sender=name,
        state=state,
        round=1,
        method="fedavg",
        threshold=1.0,
        agent_timeout=0.0,
        max_agents=0,
        max_rounds=0,
        active=active,
        needed=max(1, active),
        collected=0,
        **extra,
    )


def test_tracker_counts_a_lost_aggregator_until_the_timeout_from_its_will() -> None:
    # Prepare
    now = [100.0]
    tracker = AggregatorTracker(timeout=5.0, clock=lambda: now[0])
    tracker.update(status("g1", AggregatorState.ACTIVE, 3))
    tracker.update(status("g2", AggregatorState.ACTIVE, 0))
    tracker.update(status("g3", AggregatorState.INACTIVE, 2, paused=True))

    # Execute: g1 dies (its will: INACTIVE, no agents) two seconds later.
    now[0] = 102.0
    tracker.update(status("g1", AggregatorState.INACTIVE, 0))
    lost = tracker.states()
    counted_lost = tracker.counted("g1")
    now[0] = 107.5
    late = {n: tracker.liveness(n) for n in ("g1", "g2", "g3")}

    # Assert
    assert lost == {
        "g1": AggregatorLiveness.LOST,
        "g2": AggregatorLiveness.IDLE,
        "g3": AggregatorLiveness.PAUSED,
    }
    assert counted_lost  # it had agents: its result is still waited for
    assert not tracker.counted("g1")
    assert late["g1"] is AggregatorLiveness.GONE
    assert late["g2"] is AggregatorLiveness.GONE  # silent for longer than the timeout
    rows, omitted = tracker.table(limit=2)
    assert omitted == 1
    assert [r.name for r in rows] == ["g1", "g2"]  # the most recently heard first


def test_tracker_a_restarted_aggregator_counts_again() -> None:
    # Prepare
    now = [0.0]
    tracker = AggregatorTracker(timeout=1.0, clock=lambda: now[0])
    tracker.update(status("g1", AggregatorState.ACTIVE, 2))
    tracker.update(status("g1", AggregatorState.INACTIVE, 0))
    now[0] = 5.0
    assert tracker.liveness("g1") is AggregatorLiveness.GONE

    # Execute
    tracker.update(status("g1", AggregatorState.ACTIVE, 1))

    # Assert
    assert tracker.liveness("g1") is AggregatorLiveness.ALIVE
    assert tracker.counted("g1")


def test_sealed_round_is_exact_float64_and_later_models_are_stale() -> None:
    # Prepare: float32 models whose weighted mean is not representable in float32.
    engine = RoundEngine(strategy=create_strategy("fedavg"))
    base = {"w": np.zeros(3, dtype=np.float32), "n": np.zeros(2, dtype=np.int64)}
    engine.set_model(base, round=0, spec=ModelSpec.from_tensors(base))
    for agent in ("x", "y", "z"):
        engine.agent_seen(agent)
    models = {
        "x": (1.0, {"w": np.array([0.1, 0.2, 0.3], np.float32), "n": np.array([1, 2])}),
        "y": (2.0, {"w": np.array([0.7, 0.5, 0.9], np.float32), "n": np.array([2, 5])}),
    }
    for agent, (w, tensors) in models.items():
        assert engine.submit(agent, round=1, num_samples=w, tensors=tensors).status is (
            AckStatus.ACCEPTED
        )

    # Execute
    result = engine.seal(force=True)
    late = engine.submit("z", round=1, num_samples=1.0, tensors=models["x"][1])

    # Assert: float64, unrounded (integers too), and the round stays open but closed.
    expected = weighted_mean(models)
    assert result.model["w"].dtype == np.float64
    np.testing.assert_allclose(result.model["w"], expected["w"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(result.model["n"], [5 / 3, 4.0], rtol=0, atol=1e-15)
    assert engine.sealed
    assert engine.round == 1
    assert not engine.ready()
    assert late.status is AckStatus.STALE
    assert "regional result" in (late.reason or "")
    # The SG model of round 1 opens round 2.
    engine.set_model(base, round=1, spec=ModelSpec.from_tensors(base))
    assert not engine.sealed
    assert engine.round == 2


def test_sg_fedavg_over_regional_means_equals_the_global_weighted_mean() -> None:
    # Prepare: two regions of float32 agents, sealed into float64 regional means.
    rng = np.random.default_rng(0)
    base = {"w": np.zeros((3, 4), dtype=np.float32), "n": np.zeros(2, dtype=np.int32)}
    spec = ModelSpec.from_tensors(base)
    regions: dict[str, dict[str, tuple[float, dict[str, Array]]]] = {
        region: {
            f"{region}-{i}": (
                float(rng.integers(1, 100)),
                {
                    "w": rng.normal(size=(3, 4)).astype(np.float32),
                    "n": rng.integers(0, 9, size=2).astype(np.int32),
                },
            )
            for i in range(count)
        }
        for region, count in (("g1", 3), ("g2", 2))
    }
    sg = RoundEngine(strategy=create_strategy("fedavg"))
    sg.set_model(widen(base), round=0, spec=wide_spec(spec))

    # Execute
    for region, models in regions.items():
        engine = RoundEngine(strategy=create_strategy("fedavg"))
        engine.set_model(base, round=0, spec=spec)
        for agent, (w, tensors) in models.items():
            engine.submit(agent, round=1, num_samples=w, tensors=tensors)
        regional = engine.seal(force=True)
        total = sum(c.num_samples for c in regional.contributors)
        assert sg.submit(region, round=1, num_samples=total, tensors=regional.model).status is (
            AckStatus.ACCEPTED
        )
    combined = sg.complete(force=True).model

    # Assert
    everyone = {k: v for models in regions.values() for k, v in models.items()}
    expected = weighted_mean(everyone)
    np.testing.assert_allclose(combined["w"], expected["w"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(combined["n"], expected["n"], rtol=0, atol=0.5)


async def test_auto_agent_picks_the_least_loaded_aggregator_and_rehomes_when_it_is_gone() -> None:
    # Prepare: three aggregators' retained statuses on an in-memory bus; g3 is gone.
    bus = InMemoryBus()
    topics = Topics("p")

    async def publish(status: AggStatusMessage) -> None:
        await admin.publish(topics.agg_status(status.sender), encode_message(status), retain=True)

    def announced() -> AgentStatusMessage:
        message = decode_message(bus.retained[topics.agent_status("x")].payload)
        assert isinstance(message, AgentStatusMessage)
        return message

    async def until(predicate: Callable[[], bool], what: str) -> None:
        for _ in range(100):
            if predicate():
                return
            await asyncio.sleep(0.05)  # a polling period
        raise AssertionError(f"timed out waiting for {what}")

    config = AgentConfig(agent_name="x", project="p", aggregator="auto", rehome_timeout=0.3)
    async with InMemoryTransport(bus=bus) as admin:
        await publish(status("g1", AggregatorState.ACTIVE, 3))
        await publish(status("g2", AggregatorState.WAITING_BASE, 1))
        await publish(status("g3", AggregatorState.INACTIVE, 0))
        session = AgentSession(config=config, transport=InMemoryTransport(bus=bus))
        async with session:
            # Execute / Assert: it picks g2 (fewest agents) and announces itself there.
            await until(lambda: session.aggregator == "g2", "a pick")
            assert announced().aggregator == "g2"
            assert announced().state is AgentState.ONLINE

            # g2's will: after rehome_timeout the agent moves to g1, the only live one.
            await publish(status("g2", AggregatorState.INACTIVE, 0))
            gone = time.monotonic()
            await until(lambda: session.aggregator == "g1", "re-homing")
            assert time.monotonic() - gone >= 0.3
            assert announced().aggregator == "g1"

            # An admin pausing g1 is no reason to leave it.
            await publish(status("g1", AggregatorState.INACTIVE, 3, paused=True))
            await publish(status("g2", AggregatorState.ACTIVE, 0))
            await asyncio.sleep(0.8)
            assert session.aggregator == "g1"
        # Its goodbye names the aggregator it was with; its will names none (it may move).
        assert announced().state is AgentState.OFFLINE
        assert announced().aggregator == "g1"
        will = decode_message(session._status(AgentState.LOST))
        assert isinstance(will, AgentStatusMessage)
        assert will.aggregator is None


async def test_sg_layer_runs_a_robust_method_over_regional_models_and_rejects_stale_ones() -> None:
    # Prepare: an sg-aggregator on an in-memory bus, with the coordinate-wise median at the SG
    # layer; three aggregators whose regional results travel as float64.
    bus = InMemoryBus()
    topics = Topics("p")
    config = SgAggregatorConfig(
        project="p", method="coordinate_median", monitor_interval=0.05, aggregator_timeout=5
    )
    sg = SgAggregatorService(config=config, transport=InMemoryTransport(bus=bus))
    base = {"w": np.zeros(3, dtype=np.float32), "n": np.zeros(2, dtype=np.int64)}
    got: list[tuple[str, Any]] = []

    async def collect(transport: InMemoryTransport) -> None:
        async for incoming in transport.messages():
            if incoming.payload:
                got.append((incoming.topic, decode_message(incoming.payload)))

    async def until(predicate: Callable[[], bool], what: str) -> None:
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.02)  # a polling period
        raise AssertionError(f"timed out waiting for {what}: {got}")

    def sg_models() -> list[ModelMessage]:
        return [m for t, m in got if t == topics.sg_model() and isinstance(m, ModelMessage)]

    def regional(name: str, round: int, w: list[float], n: list[float]) -> bytes:
        tensors = {"w": np.array(w, dtype=np.float64), "n": np.array(n, dtype=np.float64)}
        return encode_message(
            ModelMessage(
                project="p",
                sender=name,
                kind=ModelKind.REGIONAL,
                round=round,
                num_samples=10.0,
                data=encode(tensors),
                contributors=[Contributor(agent=f"{name}-x", num_samples=10.0)],
                base_sha=base_sha,
            )
        )

    ready = asyncio.Event()
    server = asyncio.create_task(sg.run(ready=ready))
    await ready.wait()
    async with InMemoryTransport(bus=bus) as admin:
        await admin.subscribe(topics.sg_model(), f"{topics.root}/agg/+/inbox")
        collector = asyncio.create_task(collect(admin))
        payload = encode(base)
        base_sha = hashlib.sha256(payload).hexdigest()
        for name in ("g1", "g2", "g3"):
            await admin.publish(
                topics.agg_status(name),
                encode_message(status(name, AggregatorState.ACTIVE, 2)),
                retain=True,
            )
        await admin.publish(
            topics.base(),
            encode_message(
                ModelMessage(
                    project="p", sender="admin", kind=ModelKind.BASE, round=0, data=payload
                )
            ),
            retain=True,
        )
        await until(lambda: len(sg_models()) == 1, "SG model 0")

        # Execute: three regional results of round 1, then one for round 0 (stale).
        rows = {"g1": ([0.0, 5.0, 1.0], [1, 2]), "g2": ([1.0, 0.0, 2.0], [3, 4]),
                "g3": ([9.0, 1.0, 3.0], [2, 9])}  # fmt: skip
        for name, (w, n) in rows.items():
            await admin.publish(topics.agg_regional(name), regional(name, 1, w, n))
        await until(lambda: len(sg_models()) == 2, "SG model 1")
        await admin.publish(topics.agg_regional("g1"), regional("g1", 1, [0, 0, 0], [0, 0]))
        await until(
            lambda: any(isinstance(m, AckMessage) and m.status is AckStatus.STALE for _, m in got),
            "a stale ack",
        )
        sg.stop()
        await server
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector

    # Assert: SG model 0 is the base; SG model 1 is the coordinate-wise median, in the base dtypes.
    first, second = sg_models()
    assert (first.round, first.base_sha, first.kind) == (0, base_sha, ModelKind.SG)
    assert first.data == payload
    assert second.round == 1
    assert second.method == "coordinate_median"
    assert sorted(c.agent for c in second.contributors) == ["g1-x", "g2-x", "g3-x"]
    assert second.data is not None
    model, _ = decode(second.data)
    assert model["w"].dtype == np.float32
    assert model["n"].dtype == np.int64
    np.testing.assert_array_equal(model["w"], [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(model["n"], [2, 4])
    acks = [(t, m) for t, m in got if isinstance(m, AckMessage)]
    assert [m.status for _, m in acks] == [AckStatus.ACCEPTED] * 3 + [AckStatus.STALE]
    assert acks[-1][0] == topics.agg_inbox("g1")


async def test_aggregator_under_sg_seals_rounds_into_exact_regional_results() -> None:
    # Prepare: an aggregator under sg-aggregator "sg" on an in-memory bus.
    bus = InMemoryBus()
    topics = Topics("p")
    config = AggregatorConfig(
        name="g1", project="p", sg_aggregator="sg", monitor_interval=0.05, chunk_timeout=0.1
    )
    service = AggregatorService(config=config, transport=InMemoryTransport(bus=bus))
    base_sha = "ab" * 32
    got: list[tuple[str, Any]] = []

    async def collect(transport: InMemoryTransport) -> None:
        async for incoming in transport.messages():
            if incoming.payload:
                got.append((incoming.topic, decode_message(incoming.payload)))

    async def until(predicate: Callable[[], bool], what: str) -> None:
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.02)  # a polling period
        raise AssertionError(f"timed out waiting for {what}: {got}")

    def on(topic: str) -> list[Any]:
        return [m for t, m in got if t == topic]

    def model(kind: ModelKind, sender: str, round: int, w: list[float], **extra: Any) -> bytes:
        tensors = {"w": np.array(w, dtype=np.float32)}
        return encode_message(
            ModelMessage(
                project="p", sender=sender, kind=kind, round=round, data=encode(tensors), **extra
            )
        )

    def sg_status(**fields: Any) -> bytes:
        values: dict[str, Any] = {
            "state": AggregatorState.ACTIVE, "method": "fedavg", "threshold": 1.0,
            "aggregator_timeout": 5.0, "alive": 1, "counted": 1, "needed": 1, "collected": 0,
            "base_sha": base_sha, **fields,
        }  # fmt: skip
        return encode_message(SgStatusMessage(project="p", sender="sg", **values))

    ready = asyncio.Event()
    server = asyncio.create_task(service.run(ready=ready))
    await ready.wait()
    async with InMemoryTransport(bus=bus) as sg:
        await sg.subscribe(
            topics.agg_regional("g1"), topics.agg_model("g1"), f"{topics.root}/agents/+/inbox"
        )
        collector = asyncio.create_task(collect(sg))
        # Execute: SG model 0, then two agents' models of round 1 and a late third one.
        await sg.publish(
            topics.sg_model(),
            model(ModelKind.SG, "sg", 0, [0, 0], base_sha=base_sha),
            retain=True,
        )
        await until(lambda: service.engine.round == 1, "SG model 0 taken")
        for agent in ("x", "y"):
            await sg.publish(
                topics.agent_status(agent),
                encode_message(
                    AgentStatusMessage(
                        project="p", sender=agent, state=AgentState.ONLINE, aggregator="g1"
                    )
                ),
                retain=True,
            )
        await until(lambda: service.engine.active == 2, "two agents")
        for agent, w, n in (("x", [1.0, 0.1], 1.0), ("y", [2.0, 0.7], 2.0)):
            await sg.publish(
                topics.agg_local("g1", agent),
                model(ModelKind.LOCAL, agent, 1, w, num_samples=n),
            )
        await until(lambda: len(on(topics.agg_regional("g1"))) == 1, "the regional result")
        await sg.publish(topics.agg_local("g1", "z"), model(ModelKind.LOCAL, "z", 1, [5, 5]))
        await until(lambda: len(on(topics.agent_inbox("z"))) == 1, "z's ack")
        # The SG status (republished every so often) lacks g1's result: after 3 chunk timeouts
        # it is sent again.
        for _ in range(20):
            await sg.publish(topics.sg_status(), sg_status(round=1, model_round=0), retain=True)
            if len(on(topics.agg_regional("g1"))) == 2:
                break
            await asyncio.sleep(0.05)  # the SG status period
        assert len(on(topics.agg_regional("g1"))) == 2
        await sg.publish(
            topics.sg_model(),
            model(ModelKind.SG, "sg", 1, [1.5, 0.5], base_sha=base_sha),
            retain=True,
        )
        await until(lambda: service.engine.round == 2, "SG model 1 taken")
        status_after = service.status()
        service.stop()
        await server
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector

    # Assert: the regional result is the unrounded float64 weighted mean with its total.
    regional = on(topics.agg_regional("g1"))[0]
    assert regional.kind is ModelKind.REGIONAL
    assert (regional.round, regional.num_samples, regional.base_sha) == (1, 3.0, base_sha)
    assert sorted(c.agent for c in regional.contributors) == ["x", "y"]
    tensors, _ = decode(regional.data)
    assert tensors["w"].dtype == np.float64
    x, y = (np.array(w, np.float32).astype(np.float64) for w in ([1.0, 0.1], [2.0, 0.7]))
    np.testing.assert_allclose(tensors["w"], (x * 1.0 + y * 2.0) / 3, rtol=0, atol=1e-15)
    # The late model was stale; the aggregator served SG models 0 and 1 to its agents.
    ack = on(topics.agent_inbox("z"))[0]
    assert isinstance(ack, AckMessage)
    assert ack.status is AckStatus.STALE
    served = [m.round for m in on(topics.agg_model("g1"))]
    assert served == [0, 1]
    assert status_after.sg_aggregator == "sg"
    assert status_after.regional_round is None
    assert service.results[0].model["w"].dtype == np.float64
