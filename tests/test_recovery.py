"""Crash recovery over a real Mosquitto: an aggregator process (and the sg-aggregator process)
killed with SIGKILL mid-round and started again resumes from its store: the same round and
model, the models it had accepted still counted, nothing aggregated twice, and the rounds go on
without a gap or a repeat.

The agents are in-process BasicClients with NumPy models. An upload the aggregator never
acknowledged is not re-sent by the agent by itself: the test has the third agent send its
model only once the restarted aggregator says (in its status) that it resumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import (
    broker_settings,
    peer_on,
    running_aggregator,
    serving,
    spawn,
    weighted_mean,
)

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from aggregator.service import AggregatorService
from aggregator.store import Store, StoreError, StoreReader
from broker.process import MosquittoBroker
from common.codec import Array, decode, encode
from common.config import AggregatorConfig, BrokerSettings, SgAggregatorConfig
from common.exchange import ModelReceiver
from common.messages import (
    AckStatus,
    AggregatorState,
    AggStatusMessage,
    ModelKind,
    ModelMessage,
    SgStatusMessage,
    decode_message,
    encode_message,
)
from common.topics import TopicKind, Topics
from common.transport import InMemoryBus, InMemoryTransport, MqttTransport

HEARTBEAT = 0.5


# ------------------------------------------------------------------ helpers
def base_model() -> dict[str, Array]:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def trained(model: dict[str, Array], delta: float) -> dict[str, Array]:
    return {k: np.asarray(v + delta, dtype=v.dtype) for k, v in model.items()}


@dataclass(frozen=True)
class Published:
    """A model as it crossed the broker: who published it, its envelope, tensors and hash."""

    publisher: str
    message: ModelMessage
    tensors: dict[str, Array]
    sha256: str


@dataclass
class Observer:
    """Follows a project's aggregator and sg-aggregator statuses and every model they publish."""

    settings: BrokerSettings
    project: str
    statuses: dict[str, AggStatusMessage] = field(default_factory=dict)
    sg_status: SgStatusMessage | None = None
    models: list[Published] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(
                    f"timed out waiting for {what}; statuses {self.statuses}, sg {self.sg_status}"
                )

    def published(self, publisher: str) -> list[Published]:
        with self._cond:
            return [p for p in self.models if p.publisher == publisher]

    def model(self, publisher: str, round: int) -> Published:
        self.wait(
            f"{publisher}'s model of round {round}",
            lambda: any(p.message.round == round for p in self.published(publisher)),
        )
        return next(p for p in self.published(publisher) if p.message.round == round)

    async def run(self, started: asyncio.Event) -> None:
        topics = Topics(self.project)
        receiver = ModelReceiver(max_bytes=1 << 30)
        models = [f"{topics.root}/agg/+/model", topics.sg_model()]
        client_id = f"{self.project}.observer"
        async with MqttTransport(settings=self.settings, client_id=client_id) as t:
            await t.subscribe(
                topics.all_agg_status(),
                topics.sg_status(),
                *models,
                *(Topics.chunks(m) for m in models),
            )
            started.set()
            async for incoming in t.messages():
                parsed = topics.parse(incoming.topic)
                if not incoming.payload:
                    continue
                if parsed.chunk:
                    received = receiver.chunk(incoming.payload)
                else:
                    message = decode_message(incoming.payload)
                    if isinstance(message, AggStatusMessage):
                        with self._cond:
                            self.statuses[message.sender] = message
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
                publisher = "sg" if parsed.kind is TopicKind.SG_MODEL else str(parsed.aggregator)
                sha = hashlib.sha256(received.payload).hexdigest()
                with self._cond:
                    self.models.append(Published(publisher, received.message, tensors, sha))
                    self._cond.notify_all()


@contextmanager
def observing(settings: BrokerSettings, project: str) -> Iterator[Observer]:
    observer = Observer(settings, project)
    loop = LoopThread("observer")

    async def start() -> asyncio.Task[None]:
        started = asyncio.Event()
        task = asyncio.create_task(observer.run(started))
        await asyncio.wait_for(started.wait(), 10)
        return task

    task = loop.run(start(), timeout=15)

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        yield observer
    finally:
        loop.run(stop(), timeout=15)
        loop.close()


@contextmanager
def clients(
    broker: MosquittoBroker, project: str, homes: dict[str, str]
) -> Iterator[dict[str, BasicClient]]:
    """One BasicClient per agent (``homes``: agent -> aggregator), connected."""
    made: dict[str, BasicClient] = {}
    try:
        for name, aggregator in homes.items():
            client = BasicClient(
                aggregator_ip_address=broker.host,
                reg_port=broker.port,
                agent_name=name,
                project=project,
                aggregator=aggregator,
                heartbeat_interval=HEARTBEAT,
                model_timeout=60,
                ack_timeout=30,
            )
            made[name] = client
            client.set_bm_obj(base_model())
        yield made
    finally:
        for client in made.values():
            client.disconnect()


def upload_base(broker: MosquittoBroker, project: str, aggregator: str | None) -> None:
    AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        aggregator=aggregator,
        timeout=30,
        base_model=BaseModel("tiny", base_model(), BaseModelConvFormat.numpy_format),
    ).initialize()


def start_process(command: str, config: Path, log: Path) -> Any:
    return spawn(["-m", "fedhive", command, "start", "--config", str(config)], log)


def stop_process(proc: Any) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except Exception:
            proc.kill()
            proc.wait(10)


def logs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
    )


def assert_close(got: dict[str, Array], expected: dict[str, Array], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for name, value in expected.items():
        np.testing.assert_allclose(
            got[name].astype(np.float64), value, rtol=0, atol=1e-6, err_msg=f"{what}: {name}"
        )


def send(client: BasicClient, model: dict[str, Array], samples: float, status: AckStatus) -> None:
    ack = client.send_trained_model(model, num_samples=samples)
    assert ack is not None, "no acknowledgement"
    assert ack.status is status, ack


# ------------------------------------------------------------------ acceptance 2
@pytest.mark.broker
@pytest.mark.slow
def test_killed_aggregator_resumes_the_round_with_the_models_it_had_accepted(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: aggregator a1 as a process of its own (store in tmp_path), three agents.
    settings = broker_settings(mosquitto)
    data_dir = tmp_path / "a1-data"
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=settings,
        data_dir=data_dir,
        threshold=1.0,
        monitor_interval=0.2,
        status_interval=1.0,
    )
    config_path = tmp_path / "a1.json"
    config_path.write_text(config.model_dump_json())
    samples = {"agent0": 10.0, "agent1": 20.0, "agent2": 45.0}
    deltas = {"agent0": 1.0, "agent1": -2.0, "agent2": 4.0}
    sent: dict[int, dict[str, tuple[float, dict[str, Array]]]] = {}
    crash_round = 2

    def local(name: str, round: int, model: dict[str, Array]) -> dict[str, Array]:
        tensors = trained(model, deltas[name] * round)
        sent.setdefault(round, {})[name] = (samples[name], tensors)
        return tensors

    with observing(settings, project_name) as obs:
        aggregator = start_process("aggregator", config_path, tmp_path / "a1-first.log")
        try:
            obs.wait("a1 up", lambda: "a1" in obs.statuses, timeout=60)
            with clients(mosquitto, project_name, dict.fromkeys(samples, "a1")) as agents:
                obs.wait("three agents", lambda: obs.statuses["a1"].active == 3)
                upload_base(mosquitto, project_name, "a1")
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}
                for name, client in agents.items():
                    send(client, local(name, 1, models[name]), samples[name], AckStatus.ACCEPTED)
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}

                # Execute: two of three models of round 2 accepted (each acknowledged, so
                # recorded), then kill -9.
                for name in ("agent0", "agent1"):
                    send(
                        agents[name],
                        local(name, crash_round, models[name]),
                        samples[name],
                        AckStatus.ACCEPTED,
                    )
                aggregator.kill()
                aggregator.wait(10)
                with StoreReader(data_dir=data_dir) as store:
                    ref = store.resolve_aggregator(project=project_name, aggregator="a1")
                    before = [r.round for r in store.rounds(ref)]
                    recorded = store.list_models(kind=ModelKind.LOCAL, round=crash_round)
                restarted = time.time()
                aggregator = start_process("aggregator", config_path, tmp_path / "a1-again.log")
                obs.wait(
                    "a1 resumed in round 2 with two models",
                    lambda: (
                        obs.statuses["a1"].ts >= restarted
                        and obs.statuses["a1"].state is AggregatorState.ACTIVE
                        and obs.statuses["a1"].round == crash_round
                        and obs.statuses["a1"].collected == 2
                        and obs.statuses["a1"].active == 3
                    ),
                    timeout=60,
                )
                resumed = obs.statuses["a1"]
                # agent0's model again: already counted.
                send(
                    agents["agent0"],
                    sent[crash_round]["agent0"][1],
                    samples["agent0"],
                    AckStatus.DUPLICATE,
                )
                # The third arrives (its first upload of round 2: sent after the restart).
                send(
                    agents["agent2"],
                    local("agent2", crash_round, models["agent2"]),
                    samples["agent2"],
                    AckStatus.ACCEPTED,
                )
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}
                # Two more rounds: the numbering goes on.
                for round in (crash_round + 1, crash_round + 2):
                    for name, client in agents.items():
                        send(
                            client,
                            local(name, round, models[name]),
                            samples[name],
                            AckStatus.ACCEPTED,
                        )
                    models = {name: c.wait_for_sg_model() for name, c in agents.items()}
            last = crash_round + 2
            obs.model("a1", last)
        finally:
            stop_process(aggregator)
        published = obs.published("a1")

    with StoreReader(data_dir=data_dir) as store:
        ref = store.resolve_aggregator(project=project_name, aggregator="a1")
        rounds = store.rounds(ref)

    # Assert: the crash came after round 1 and both accepted models of round 2 were recorded.
    assert before == [1], logs(tmp_path)
    assert sorted(m.agent or "" for m in recorded) == ["agent0", "agent1"]
    # ...and the resumed round waited for all three agents instead of completing with two.
    assert (resumed.model_round, resumed.needed) == (1, 3)
    # Round 2 completed with all three: the global is their weighted mean.
    round2 = next(p for p in published if p.message.round == crash_round)
    assert sorted(c.agent for c in round2.message.contributors) == sorted(samples)
    assert_close(round2.tensors, weighted_mean(sent[crash_round]), "global model of round 2")
    assert round2.message.num_samples == sum(samples.values())
    # Every round once, in order, in the store and on the broker: round 1's model was served
    # again after the restart (the same bytes), no round aggregated twice, no gap.
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert dict(rounds[1].contributors) == samples
    assert [r.model_sha256 for r in rounds] == [
        next(p.sha256 for p in published if p.message.round == r.round) for r in rounds
    ]
    by_round: dict[int, set[str]] = {}
    for p in published:
        by_round.setdefault(p.message.round, set()).add(p.sha256)
    assert sorted(by_round) == [0, 1, 2, 3, 4]
    assert all(len(shas) == 1 for shas in by_round.values()), by_round
    for r in (1, 3, 4):
        model = next(p for p in published if p.message.round == r)
        assert_close(model.tensors, weighted_mean(sent[r]), f"global model of round {r}")
    again = (tmp_path / "a1-again.log").read_text()
    assert "resumed from the store: model of round 1, round 2 open with 2 model(s)" in again


# ------------------------------------------------------------------ the sg-aggregator
@pytest.mark.broker
@pytest.mark.slow
def test_killed_sg_aggregator_resumes_with_the_regional_results_it_had(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: the sg-aggregator as a process; aggregators a1 (two agents) and a2 (one).
    settings = broker_settings(mosquitto)
    sg_data = tmp_path / "sg-data"
    sg_config = SgAggregatorConfig(
        project=project_name,
        broker=settings,
        data_dir=sg_data,
        monitor_interval=0.2,
        status_interval=0.5,
    )
    sg_path = tmp_path / "sg.json"
    sg_path.write_text(sg_config.model_dump_json())
    homes = {"x1": "a1", "x2": "a1", "y1": "a2"}
    samples = {"x1": 5.0, "x2": 15.0, "y1": 30.0}
    sent: dict[str, tuple[float, dict[str, Array]]] = {}

    def aggregator(name: str) -> AggregatorConfig:
        return AggregatorConfig(
            name=name,
            project=project_name,
            broker=settings,
            sg_aggregator="sg",
            data_dir=tmp_path / f"{name}-data",
            monitor_interval=0.2,
            status_interval=0.5,
        )

    with observing(settings, project_name) as obs:
        sg = start_process("sg-aggregator", sg_path, tmp_path / "sg-first.log")
        try:
            obs.wait("sg up", lambda: obs.sg_status is not None, timeout=60)
            with (
                running_aggregator(aggregator("a1")),
                running_aggregator(aggregator("a2")),
                clients(mosquitto, project_name, homes) as agents,
            ):
                obs.wait(
                    "agents at both aggregators",
                    lambda: (
                        obs.statuses.get("a1") is not None
                        and obs.statuses["a1"].active == 2
                        and obs.statuses.get("a2") is not None
                        and obs.statuses["a2"].active == 1
                    ),
                )
                upload_base(mosquitto, project_name, None)
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}
                for name, client in agents.items():
                    send(client, trained(models[name], 1.0), samples[name], AckStatus.ACCEPTED)
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}

                # Execute: a1's regional result of round 2 reaches the sg-aggregator; kill -9.
                for k, name in enumerate(("x1", "x2")):
                    sent[name] = (samples[name], trained(models[name], 2.0 + k))
                    send(agents[name], sent[name][1], samples[name], AckStatus.ACCEPTED)
                obs.wait(
                    "a1's regional result of round 2",
                    lambda: (
                        obs.sg_status is not None
                        and obs.sg_status.round == 2
                        and obs.sg_status.regional_from == ["a1"]
                    ),
                )
                sg.kill()
                sg.wait(10)
                restarted = time.time()
                sg = start_process("sg-aggregator", sg_path, tmp_path / "sg-again.log")
                obs.wait(
                    "the sg-aggregator resumed in round 2 with a1's result",
                    lambda: (
                        obs.sg_status is not None
                        and obs.sg_status.ts >= restarted
                        and obs.sg_status.state is AggregatorState.ACTIVE
                        and obs.sg_status.round == 2
                        and obs.sg_status.regional_from == ["a1"]
                    ),
                    timeout=60,
                )
                # a2's agent sends; a2's regional result completes the round.
                sent["y1"] = (samples["y1"], trained(models["y1"], -3.0))
                send(agents["y1"], sent["y1"][1], samples["y1"], AckStatus.ACCEPTED)
                models = {name: c.wait_for_sg_model() for name, c in agents.items()}
            sg_model2 = obs.model("sg", 2)
        finally:
            stop_process(sg)
        sg_models = obs.published("sg")

    with StoreReader(data_dir=sg_data) as store:
        ref = store.resolve_aggregator(project=project_name, role="sg")
        rounds = store.rounds(ref)

    # Assert: SG round 2 combined a1's recovered result with a2's: the weighted mean of all
    # three agents' models, listing all three; each SG round once.
    assert_close(sg_model2.tensors, weighted_mean(sent), "SG model 2")
    assert sorted(c.agent for c in sg_model2.message.contributors) == sorted(homes)
    assert sg_model2.message.num_samples == sum(samples.values())
    for name in homes:
        np.testing.assert_array_equal(models[name]["w"], sg_model2.tensors["w"])
    assert [r.round for r in rounds] == [1, 2], logs(tmp_path)
    assert dict(rounds[1].contributors) == {"a1": 20.0, "a2": 30.0}
    by_round: dict[int, set[str]] = {}
    for p in sg_models:
        by_round.setdefault(p.message.round, set()).add(p.sha256)
    assert sorted(by_round) == [0, 1, 2]
    assert all(len(shas) == 1 for shas in by_round.values()), by_round
    assert (
        "resumed from the store: SG model 1, round 2 open with 1 regional result(s)"
        in (tmp_path / "sg-again.log").read_text()
    )


# ------------------------------------------------------------------ in memory (no broker)
async def test_restarted_in_memory_counts_recorded_models_once(tmp_path: Path) -> None:
    # Prepare: a1 (threshold 1.0, store in tmp_path) with three agents; x and y send round 1.
    bus = InMemoryBus()
    config = AggregatorConfig(
        name="a1", project="mem", data_dir=tmp_path, monitor_interval=0.05, resume_grace=0.3
    )
    models = {name: trained(base_model(), d) for name, d in (("x", 1.0), ("y", 2.0), ("z", 7.0))}
    weights = {"x": 1.0, "y": 3.0, "z": 6.0}
    async with peer_on(bus, "mem") as peer:
        async with serving(config, bus) as first:
            await peer.online("x", "y", "z")
            await peer.base(base_model())
            await peer.until(lambda: first.engine.active == 3 and first.engine.round == 1, "base")
            for name in ("x", "y"):
                await peer.local(name, 1, models[name], weights[name])
            await peer.until(lambda: len(peer.acks("y")) == 1, "y's ack")

        # Execute: another aggregator process over the same store; x sends again, z first.
        async with serving(config, bus) as second:
            resumed = (second.engine.round, second.engine.collected, second.status().blocker)
            await peer.local("x", 1, models["x"], weights["x"])
            await peer.local("z", 1, models["z"], weights["z"])
            await peer.until(lambda: len(second.results) == 1, "round 1 complete")
            result = second.results[0]

    # Assert: resumed in round 1 with x and y, waiting for its agents; x's model again was a
    # duplicate; round 1 is the weighted mean of all three, recorded once.
    assert resumed[:2] == (1, 2)
    assert "resumed from the store" in str(resumed[2])
    assert peer.acks("x") == [AckStatus.ACCEPTED, AckStatus.DUPLICATE]
    assert peer.acks("z") == [AckStatus.ACCEPTED]
    assert [c.agent for c in result.contributors] == ["x", "y", "z"]
    assert_close(
        result.model, weighted_mean({n: (weights[n], models[n]) for n in models}), "round 1"
    )
    with StoreReader(data_dir=tmp_path) as store:
        [round1] = store.rounds(store.resolve_aggregator(project="mem"))
        [best] = store.list_models(kind=ModelKind.LOCAL, agent="z")
    assert round1.contributors == (("x", 1.0), ("y", 3.0), ("z", 6.0))
    assert round1.bytes_in == 3 * best.size
    assert [m.round for m in peer.on(Topics("mem").agg_model("a1"))] == [0, 0, 1]


async def test_a_failing_store_stops_the_aggregator_before_it_acknowledges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the store cannot record local models.
    def broken(*_args: object, **_kwargs: object) -> None:
        raise StoreError("disk full")

    monkeypatch.setattr(Store, "record_local", broken)
    bus = InMemoryBus()
    config = AggregatorConfig(name="a1", project="mem", data_dir=tmp_path, monitor_interval=0.05)
    service = AggregatorService(config=config, transport=InMemoryTransport(bus=bus), persist=True)
    async with peer_on(bus, "mem") as peer:
        ready = asyncio.Event()
        task = asyncio.create_task(service.run(ready=ready))
        await asyncio.wait_for(ready.wait(), 5)
        await peer.online("x")
        await peer.base(base_model())
        await peer.until(lambda: service.engine.round == 1, "the base model")

        # Execute
        await peer.local("x", 1, trained(base_model(), 1.0), 1.0)
        with pytest.raises(StoreError, match="cannot record x's model of round 1: disk full"):
            await asyncio.wait_for(task, 10)

    # Assert: nothing acknowledged, nothing aggregated.
    assert peer.acks("x") == []
    assert not service.results


async def test_restarted_aggregator_under_an_sg_resends_its_sealed_regional_result(
    tmp_path: Path,
) -> None:
    # Prepare: g1 under sg-aggregator "sg"; SG model 0, two local models, the regional result.
    bus = InMemoryBus()
    topics = Topics("mem")
    config = AggregatorConfig(
        name="a1",
        project="mem",
        sg_aggregator="sg",
        data_dir=tmp_path,
        monitor_interval=0.05,
        chunk_timeout=0.1,
    )
    base = encode(base_model())
    base_sha = hashlib.sha256(base).hexdigest()

    def sg_model(round: int, tensors: dict[str, Array]) -> bytes:
        message = ModelMessage(
            project="mem", sender="sg", kind=ModelKind.SG, round=round, data=encode(tensors),
            base_sha=base_sha,
        )  # fmt: skip
        return encode_message(message)

    async with peer_on(bus, "mem") as peer:
        await peer.transport.subscribe(topics.agg_regional("a1"))
        async with serving(config, bus) as first:
            await peer.online("x", "y")
            await peer.transport.publish(topics.sg_model(), sg_model(0, base_model()), retain=True)
            await peer.until(lambda: first.engine.active == 2 and first.engine.round == 1, "SG 0")
            for name, delta in (("x", 1.0), ("y", 3.0)):
                await peer.local(name, 1, trained(base_model(), delta), delta)
            await peer.until(lambda: len(peer.on(topics.agg_regional("a1"))) == 1, "regional")

        # Execute: restarted, it is still sealed; the sg-aggregator's status lacks its result.
        async with serving(config, bus) as second:
            sealed = second.status()
            status = SgStatusMessage(
                project="mem", sender="sg", state=AggregatorState.ACTIVE, round=1,
                model_round=0, method="fedavg", threshold=1.0, aggregator_timeout=5.0, alive=1,
                counted=1, needed=1, collected=0, base_sha=base_sha,
            )  # fmt: skip
            await peer.transport.publish(topics.sg_status(), encode_message(status), retain=True)
            await peer.until(lambda: len(peer.on(topics.agg_regional("a1"))) == 2, "resent")
            await peer.local("x", 1, trained(base_model(), 5.0), 1.0)
            await peer.until(lambda: len(peer.acks("x")) == 2, "x's late model")
            await peer.transport.publish(
                topics.sg_model(), sg_model(1, trained(base_model(), 2.5)), retain=True
            )
            await peer.until(lambda: second.engine.round == 2, "SG model 1 adopted")

    # Assert: sealed in round 1 after the restart; the same regional result went out again;
    # a model for the sealed round was stale; the adopted SG model is in the store.
    assert (sealed.round, sealed.regional_round, sealed.collected) == (1, 1, 0)
    first_sent, again = peer.on(topics.agg_regional("a1"))
    assert again.data == first_sent.data
    assert (again.round, again.num_samples, again.base_sha) == (1, 4.0, base_sha)
    assert [c.agent for c in again.contributors] == ["x", "y"]
    assert peer.acks("x") == [AckStatus.ACCEPTED, AckStatus.STALE]
    with StoreReader(data_dir=tmp_path) as store:
        info, payload = store.get_model(ModelKind.SG)
        [regional] = store.list_models(kind=ModelKind.REGIONAL)
    assert info.round == 1
    assert_close(decode(payload)[0], trained(base_model(), 2.5), "the adopted SG model")
    assert regional.round == 1
