"""Update packing (``AggregatorConfig.compression``): round trips, what each setting keeps, and
payloads that lie about themselves; then a federation whose agents send float16 updates."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from support import broker_settings, running_aggregator

from agent.admin import AdminAgent, BaseModel, BaseModelConvFormat
from agent.session import AgentSession
from broker.process import MosquittoBroker
from common.codec import decode, encode, encode_frame
from common.config import AgentConfig, AggregatorConfig
from common.errors import CodecError, FrameError
from common.packing import COMPRESSIONS, ZLIB_MAGIC, pack_update, unpack_update


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": (rng.standard_normal((64, 33)) * 0.1).astype(np.float32),
        "w64": rng.standard_normal(17),
        "h": rng.standard_normal(9).astype(np.float16),
        "bf": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
        "steps": np.array(41, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "z": np.array([1 + 2j], dtype=np.complex64),
    }


@pytest.mark.parametrize("compression", [None, *COMPRESSIONS])
def test_every_packing_unpacks_to_the_original_dtypes(compression: str | None) -> None:
    # Prepare
    original = model()

    # Execute
    packed = pack_update(original, compression)
    tensors, meta = unpack_update(packed, max_bytes=1 << 20)

    # Assert: same names, shapes and dtypes; lossless settings exact, casts within their digits.
    assert meta == {}
    assert tensors.keys() == original.keys()
    for name, array in original.items():
        assert tensors[name].dtype == array.dtype
        assert tensors[name].shape == array.shape
    lossy = compression is not None and compression != "zlib"
    # Never cast: no wider than 2 bytes, or not float.
    for name in ("h", "bf", "steps", "mask", "z"):
        np.testing.assert_array_equal(tensors[name], original[name])
    for name in ("w", "w64"):
        if lossy:
            rtol = 1e-2 if compression and compression.startswith("bfloat16") else 1e-3
            np.testing.assert_allclose(tensors[name], original[name], rtol=rtol, atol=1e-3)
        else:
            np.testing.assert_array_equal(tensors[name], original[name])


def test_sizes_shrink_as_documented() -> None:
    # float32 weights: casts halve them; zlib only helps where bytes repeat (sign/exponent).
    weights = {"w": np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 0.05}
    plain = encode_frame(weights).nbytes
    sizes = {c: memoryview(pack_update(weights, c)).nbytes / plain for c in COMPRESSIONS}
    assert 0.49 < sizes["float16"] < 0.51
    assert 0.49 < sizes["bfloat16"] < 0.51
    assert sizes["zlib"] < 0.95
    assert sizes["float16+zlib"] < sizes["float16"]
    assert sizes["bfloat16+zlib"] < sizes["bfloat16"]


def test_a_plain_frame_unpacks_as_itself() -> None:
    original = model()
    tensors, meta = unpack_update(encode(original, {"k": 1}), max_bytes=1 << 20)
    assert meta == {"k": 1}
    for name, array in original.items():
        np.testing.assert_array_equal(tensors[name], array)


@pytest.mark.parametrize("compression", [None, "float16"])
def test_a_frame_small_enough_to_travel_inline_comes_as_bytes(compression: str | None) -> None:
    # Prepare
    original = model()
    size = memoryview(pack_update(original, compression)).nbytes

    # Execute: the limit at the frame's size, and one byte below it.
    inline = pack_update(original, compression, inline_max=size)
    framed = pack_update(original, compression, inline_max=size - 1)

    # Assert: the same frame, as bytes (what an inline message carries) or as a buffer.
    assert isinstance(inline, bytes)
    assert isinstance(framed, memoryview)
    assert inline == bytes(framed)


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(CodecError, match="unknown compression 'lz4'"):
        pack_update(model(), "lz4")


def test_a_deflated_update_may_not_inflate_beyond_the_limit() -> None:
    # Prepare: 1 MB of zeros deflates to almost nothing.
    packed = pack_update({"w": np.zeros(250_000, np.float32)}, "zlib")

    # Execute / Assert: refused from its declared size, before anything is allocated.
    assert len(packed) < 10_000
    with pytest.raises(FrameError, match="over the 100000 limit"):
        unpack_update(packed, max_bytes=100_000)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-10],  # truncated
        lambda b: b + b"x",  # trailing bytes
        lambda b: b[:12] + bytes([0]) + b[13:],  # zero planes
        lambda b: b[:4] + struct.pack("<Q", struct.unpack_from("<Q", b, 4)[0] + 8) + b[12:],
    ],
)
def test_damaged_deflated_updates_are_refused(damage: object) -> None:
    packed = bytes(pack_update(model(), "zlib"))
    assert packed.startswith(ZLIB_MAGIC)
    with pytest.raises(FrameError):
        unpack_update(damage(packed), max_bytes=1 << 20)  # type: ignore[operator]


def test_a_cast_entry_must_name_a_float_tensor() -> None:
    frame = encode({"steps": np.arange(3)}, {"cast": {"steps": "float32"}})
    with pytest.raises(FrameError, match="cannot cast int64 back to float32"):
        unpack_update(frame, max_bytes=1 << 20)
    frame = encode({"w": np.zeros(3, np.float16)}, {"cast": {"ghost": "float32"}})
    with pytest.raises(FrameError, match="names no tensor 'ghost'"):
        unpack_update(frame, max_bytes=1 << 20)


@pytest.mark.broker
async def test_agents_send_float16_updates_when_the_federation_says_so(
    fresh_broker: MosquittoBroker, project_name: str, tmp_path: Path
) -> None:
    # Prepare: a two-chunk model, two agents, compression float16 announced by the aggregator.
    base = {"w": np.random.default_rng(1).standard_normal(400_000, dtype=np.float32)}
    config = AggregatorConfig(
        name="a1",
        project=project_name,
        broker=broker_settings(fresh_broker),
        data_dir=tmp_path,
        store=False,
        compression="float16",
    )

    async def train(session: AgentSession, delta: float) -> dict[str, np.ndarray]:
        model = await session.wait_model(after=None, timeout=30)
        local = {k: v + np.float32(delta) for k, v in model.tensors.items()}
        ack = await session.submit(
            local, round=1, num_samples=1.0, metrics={}, framework="numpy", ack_timeout=30
        )
        assert ack is not None
        assert ack.status.value == "accepted"
        return (await session.wait_model(after=0, timeout=30)).tensors

    # Execute
    with running_aggregator(config) as service:
        async with contextlib.AsyncExitStack() as stack:
            sessions = [
                await stack.enter_async_context(
                    AgentSession(
                        config=AgentConfig(
                            agent_name=name,
                            aggr_ip=fresh_broker.host,
                            reg_port=fresh_broker.port,
                            project=project_name,
                            aggregator="a1",
                        )
                    )
                )
                for name in ("h0", "h1")
            ]
            deadline = time.monotonic() + 30
            while service.engine.active < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            admin = AdminAgent(
                aggregator_ip_address=fresh_broker.host,
                reg_port=fresh_broker.port,
                project=project_name,
                timeout=30,
                base_model=BaseModel("half", base, BaseModelConvFormat.numpy_format),
            )
            await asyncio.to_thread(admin.initialize)
            got = await asyncio.gather(train(sessions[0], 1.0), train(sessions[1], 3.0))

    # Assert: the mean of the float16-rounded updates, back in float32.
    halves = [(base["w"] + np.float32(d)).astype(np.float16).astype(np.float64) for d in (1, 3)]
    expected = ((halves[0] + halves[1]) / 2).astype(np.float32)
    for tensors in got:
        assert tensors["w"].dtype == np.float32
        np.testing.assert_array_equal(tensors["w"], expected)
    assert decode(encode(got[0]))[0]["w"].dtype == np.float32
