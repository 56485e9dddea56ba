"""Bytes on the wire: a round moves every model once per transfer, no more (issue 9).

A real federation (a broker of the test's own, an aggregator, three agents) trains two rounds of
a model ten chunks long. The broker's socket reads and writes (/proc/PID/io rchar + wchar, as
``bench/round_overhead.py`` counts them) must stay within 5% of the model bytes times the number
of transfers: an accidental re-send or a double encode adds a whole model and fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import broker_settings, running_aggregator

import aggregator.service
from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.session import AgentSession
from aggregator.service import AggregatorService
from broker.process import MosquittoBroker
from common.codec import Tensors, encode_frame
from common.config import AgentConfig, AggregatorConfig
from common.messages import AckMessage, ModelMessage, decode_message
from common.transport import MqttTransport

pytestmark = pytest.mark.broker

AGENTS = 3
ROUNDS = 2
PARAMS = 2_500_000  # 10 MB: ten 1 MiB chunks; statuses, acks and heartbeats are < 1% of it


def _broker_io(broker: MosquittoBroker) -> int:
    """Bytes the broker process read and wrote so far (sockets, and its small log)."""
    fields = dict(
        line.split(": ") for line in Path(f"/proc/{broker.pid}/io").read_text().splitlines()
    )
    return int(fields["rchar"]) + int(fields["wchar"])


def _transfers(agents: int, rounds: int) -> int:
    """Model passes through the broker, counted at both of its sockets: the base (admin in,
    aggregator out), model 0 (1 in, one out per agent), then per round every agent's model
    (in and out) and the new model (1 in, one out per agent)."""
    return 2 + (1 + agents) + rounds * (2 * agents + 1 + agents)


async def _online_agents(
    stack: contextlib.AsyncExitStack,
    service: AggregatorService,
    broker: MosquittoBroker,
    project: str,
    **settings: Any,
) -> list[AgentSession]:
    """AGENTS agent sessions of aggregator a1, once it counts them all as active."""
    sessions = [
        await stack.enter_async_context(
            AgentSession(
                config=AgentConfig(
                    agent_name=f"agent{i}",
                    aggr_ip=broker.host,
                    reg_port=broker.port,
                    project=project,
                    aggregator="a1",
                    **settings,
                )
            )
        )
        for i in range(AGENTS)
    ]
    deadline = time.monotonic() + 30
    while service.engine.active < AGENTS:
        assert time.monotonic() < deadline, "agents did not come online"
        await asyncio.sleep(0.05)
    return sessions


async def _upload_base(broker: MosquittoBroker, project: str, name: str, base: Tensors) -> None:
    admin = AdminAgent(
        aggregator_ip_address=broker.host,
        reg_port=broker.port,
        project=project,
        timeout=60,
        base_model=BaseModel(name, base, BaseModelConvFormat.numpy_format),
    )
    await asyncio.to_thread(admin.initialize)


async def _one_round(session: AgentSession, samples: float = 1.0) -> AckMessage:
    """Wait for the first model, send it back unchanged; the aggregator's ack."""
    model = await session.wait_model(after=None, timeout=60)
    ack = await session.submit(
        model.tensors,
        round=model.round + 1,
        num_samples=samples,
        metrics={},
        framework="numpy",
        ack_timeout=60,
    )
    assert ack is not None
    return ack


async def _train(session: AgentSession, delta: float) -> None:
    after: int | None = None
    for _ in range(ROUNDS):
        model = await session.wait_model(after=after, timeout=60)
        after = model.round
        local = {k: v + np.float32(delta) for k, v in model.tensors.items()}
        ack = await session.submit(
            local, round=after + 1, num_samples=1.0, metrics={}, framework="numpy", ack_timeout=60
        )
        assert ack is not None
        assert ack.status.value == "accepted"
    await session.wait_model(after=after, timeout=60)


async def test_a_round_moves_each_model_once_per_transfer(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: heartbeats rare, no store: the model transfers are nearly all the traffic.
    settings = broker_settings(fresh_broker)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path, store=False
    )
    base = {"w": np.random.default_rng(0).standard_normal(PARAMS, dtype=np.float32)}
    model_bytes = encode_frame(base).nbytes
    with running_aggregator(config) as service:
        async with contextlib.AsyncExitStack() as stack:
            sessions = await _online_agents(
                stack, service, fresh_broker, project_name, heartbeat_interval=60
            )
            before = _broker_io(fresh_broker)

            # Execute: upload the base model, train two rounds.
            await _upload_base(fresh_broker, project_name, "wire", base)
            await asyncio.gather(*(_train(s, 0.1 * (i + 1)) for i, s in enumerate(sessions)))
            moved = _broker_io(fresh_broker) - before

    # Assert: every transfer happened once, and nothing else of size did.
    expected = model_bytes * _transfers(AGENTS, ROUNDS)
    assert [r.round for r in service.results] == [1, 2]
    assert expected <= moved <= 1.05 * expected, (
        f"{moved} bytes moved for {expected} bytes of model transfers (ratio "
        f"{moved / expected:.3f})"
    )


async def test_a_model_for_agents_lists_a_bounded_number_of_contributors(
    mosquitto: MosquittoBroker,
    project_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a listing bound of 2 and three agents (the bound is 256: every agent decodes
    # every model, so a model listing all n contributors made a round O(n^2)).
    monkeypatch.setattr(aggregator.service, "MAX_LISTED_CONTRIBUTORS", 2)
    settings = broker_settings(mosquitto)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path, store=False
    )
    base = {"w": np.zeros(10, np.float32)}
    with running_aggregator(config) as service:
        async with contextlib.AsyncExitStack() as stack:
            sessions = await _online_agents(stack, service, mosquitto, project_name)

            # Execute: one round, each agent weighing 1, 2 and 3 samples.
            await _upload_base(mosquitto, project_name, "listed", base)
            await asyncio.gather(*(_one_round(s, i + 1.0) for i, s in enumerate(sessions)))
            got = await sessions[0].wait_model(after=0, timeout=60)

    # Assert: two listed, one counted, and the sample total covers all three.
    assert got.round == 1
    assert len(got.message.contributors) == 2
    assert got.message.contributors_omitted == 1
    assert got.message.num_samples == 6.0
    assert len(service.results[0].contributors) == AGENTS  # the aggregator knows them all


@pytest.mark.parametrize(("budget", "pulled"), [(8 << 20, False), (2 << 20, True)])
async def test_uploads_within_an_agents_share_of_the_receive_budget_are_pushed(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path, budget: int, pulled: bool
) -> None:
    # Prepare: three agents and a 2.5 MB model (three chunks). With an 8 MiB budget each
    # agent's share (2.67 MiB) holds an upload: its chunks follow the announcement at once.
    # With 2 MiB they do not: the aggregator asks for them in turn.
    settings = broker_settings(mosquitto)
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=settings,
        data_dir=tmp_path,
        store=False,
        receive_budget=budget,
    )
    base = {"w": np.zeros(625_000, np.float32)}
    with running_aggregator(config) as service:
        async with contextlib.AsyncExitStack() as stack:
            sessions = await _online_agents(
                stack, service, mosquitto, project_name, heartbeat_interval=60
            )
            watcher = await stack.enter_async_context(MqttTransport(settings=settings))
            await watcher.subscribe(f"fedhive/v1/{project_name}/agg/a1/local/+")

            # Execute: one round.
            await _upload_base(mosquitto, project_name, "push", base)
            acks = await asyncio.gather(*(_one_round(s) for s in sessions))
            offered = service.status().push_limit
            messages = watcher.messages()
            envelopes = [
                decode_message((await asyncio.wait_for(anext(messages), 10)).payload)
                for _ in range(AGENTS)
            ]

    # Assert: the status offers each active agent its share; uploads within it came pushed,
    # larger ones pulled; the round completed either way.
    assert offered == budget // AGENTS
    assert [ack.status.value for ack in acks] == ["accepted"] * AGENTS
    assert [isinstance(m, ModelMessage) and m.transfer is not None for m in envelopes] == [
        True
    ] * AGENTS
    assert [bool(getattr(m, "pull", None)) for m in envelopes] == [pulled] * AGENTS
    assert [r.round for r in service.results] == [1]
