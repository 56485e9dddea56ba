"""The aggregator rejects bad local models with one clear log line each, keeps serving, and
completes the round with the valid ones (over a real Mosquitto)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
from support import broker_settings, recording, running_aggregator, weighted_mean

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.client import BasicClient, LoopThread
from broker.process import MosquittoBroker
from common.codec import Array, encode
from common.config import AggregatorConfig
from common.messages import (
    AckMessage,
    AckStatus,
    ModelKind,
    ModelMessage,
    decode_message,
    encode_message,
)
from common.topics import Topics
from common.transport import MqttTransport

pytestmark = pytest.mark.broker


def _base() -> dict[str, Array]:
    return {
        "w": np.arange(12, dtype=np.float32).reshape(4, 3),
        "b": np.zeros(3, dtype=np.float32),
        "steps": np.array(0, dtype=np.int64),
    }


def _local(
    project: str,
    sender: str,
    round: int,
    tensors: dict[str, Array] | None = None,
    data: bytes | None = None,
) -> bytes:
    payload = data if data is not None else encode(tensors or _base())
    return encode_message(
        ModelMessage(
            project=project,
            sender=sender,
            kind=ModelKind.LOCAL,
            round=round,
            num_samples=5,
            data=bytes(payload),
        )
    )


def test_bad_models_are_rejected_and_the_round_completes(
    mosquitto: MosquittoBroker, project_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger="fedhive")
    settings = broker_settings(mosquitto)
    config = AggregatorConfig(
        name="a1", project=project_name, broker=settings, data_dir=tmp_path / "agg"
    )
    common = {
        "aggregator_ip_address": mosquitto.host,
        "reg_port": mosquitto.port,
        "project": project_name,
        "aggregator": "a1",
        "model_timeout": 30,
    }
    topics = Topics(project_name)
    wrong_names = {**_base(), "extra": np.zeros(1, np.float32)}
    wrong_shape = {**_base(), "w": np.zeros((3, 4), np.float32)}
    wrong_dtype = {**_base(), "w": np.zeros((4, 3), np.float64)}
    with_nan = {**_base(), "b": np.array([0.0, np.nan, 1.0], np.float32)}
    bad = [
        ("garbage", b"\x00\xffgarbage that is not msgpack", "not a msgpack envelope"),
        ("names", _local(project_name, "evil", 1, wrong_names), "extra"),
        ("shape", _local(project_name, "evil", 1, wrong_shape), "got (3, 4)"),
        ("dtype", _local(project_name, "evil", 1, wrong_dtype), "float64"),
        ("nan", _local(project_name, "evil", 1, with_nan), "non-finite"),
        ("round", _local(project_name, "evil", 7), "unknown round 7"),
        ("sender", _local(project_name, "agent0", 1), "does not match"),
        (
            "frame",
            # As long as a frame of the model (a shorter one is refused before decoding).
            _local(project_name, "evil", 1, data=b"FHT1\x00\x00\x10\x00" + b"trunc" * 20),
            "cannot decode",
        ),
    ]

    with running_aggregator(config) as service, recording(settings, project_name, "a1") as rec:
        AdminAgent(
            aggregator_ip_address=mosquitto.host,
            reg_port=mosquitto.port,
            project=project_name,
            timeout=30,
            base_model=BaseModel("tiny", _base(), BaseModelConvFormat.numpy_format),
        ).initialize()
        good = [BasicClient(agent_name=f"agent{i}", **common) for i in range(2)]
        try:
            for client in good:
                client.set_bm_obj(_base())
                client.wait_for_sg_model()
            before = len([r for r in caplog.records if r.levelno >= logging.WARNING])

            # Execute: the hostile publisher sends every bad message, then collects its acks.
            acks = _publish_bad(settings, topics, [payload for _, payload, _ in bad])
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            warnings = warnings[before:]
            # ... and one good agent sends twice: a duplicate, acknowledged as such.
            first = {k: np.asarray(v + 1, v.dtype) for k, v in _base().items()}
            second = {k: np.asarray(v + 3, v.dtype) for k, v in _base().items()}
            ack0 = good[0].send_trained_model(first, {"accuracy": 0.5}, num_samples=10)
            dup = good[0].send_trained_model(second, {"accuracy": 0.5}, num_samples=10)
            ack1 = good[1].send_trained_model(second, {"accuracy": 0.7}, num_samples=30)
            message, global_model = rec.wait_for_global(1, timeout=30)
            stale = good[1].send_trained_model(second, {"accuracy": 0.7}, num_samples=30)
        finally:
            for client in good:
                client.disconnect()

        # Assert: one clear line per bad message, naming what was wrong.
        assert len(warnings) == len(bad), warnings
        for (what, _, needle), line in zip(bad, warnings, strict=True):
            assert needle in line, f"{what}: {line}"
        # Every bad message whose envelope was readable got a rejection ack with the reason.
        assert [a.status for a in acks] == [AckStatus.REJECTED] * 6
        assert all(a.reason for a in acks)
        assert ack0 is not None
        assert ack0.status is AckStatus.ACCEPTED
        assert dup is not None
        assert dup.status is AckStatus.DUPLICATE
        assert ack1 is not None
        assert ack1.status is AckStatus.ACCEPTED
        assert stale is not None
        assert stale.status is AckStatus.STALE
        # The round completed with exactly the two valid models, weighted 10 : 30.
        assert sorted(c.agent for c in message.contributors) == ["agent0", "agent1"]
        expected = weighted_mean({"agent0": (10, first), "agent1": (30, second)})
        for name, value in expected.items():
            np.testing.assert_allclose(global_model[name].astype(np.float64), value, atol=1e-6)
        assert service.engine.round == 2


def _publish_bad(settings: object, topics: Topics, payloads: list[bytes]) -> list[AckMessage]:
    """Publish raw payloads on the evil agent's local topic; return the acks it receives."""
    loop = LoopThread("evil")

    async def attack() -> list[AckMessage]:
        acks: list[AckMessage] = []
        async with MqttTransport(settings=settings, client_id=f"{topics.project}.evil") as t:  # type: ignore[arg-type]
            await t.subscribe(topics.agent_inbox("evil"), topics.agent_inbox("agent0"))
            for payload in payloads:
                await t.publish(topics.agg_local("a1", "evil"), payload)
            messages = t.messages()
            while len(acks) < 6:
                incoming = await asyncio.wait_for(anext(messages), 10)
                ack = decode_message(incoming.payload)
                assert isinstance(ack, AckMessage)
                acks.append(ack)
            # The sender-mismatch message must not have produced an ack to agent0.
            with_timeout = asyncio.wait_for(anext(messages), 0.5)
            with pytest.raises(TimeoutError):
                await with_timeout
        return acks

    try:
        return loop.run(attack(), timeout=30)
    finally:
        loop.close()
