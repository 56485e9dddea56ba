"""Chunked transfer: manifests, chunk frames and reassembly, down to a 300 MB model."""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import Any

import blake3
import numpy as np
import pytest

from common.chunking import (
    CHUNK_HEADER_SIZE,
    DEFAULT_CHUNK_SIZE,
    ChunkFrame,
    Manifest,
    Reassembler,
    iter_chunk_frames,
    make_manifest,
    parse_chunk_frame,
)
from common.codec import Array, decode, encode
from common.errors import ConfigError, FrameError

PAYLOAD = bytes(range(256)) * 10 + b"tail"  # 2564 bytes: 10 chunks of 256 and one of 4
CHUNK = 256


def chunks_of(payload: bytes, manifest: Manifest) -> list[ChunkFrame]:
    return [parse_chunk_frame(f) for f in iter_chunk_frames(payload, manifest)]


def wire(**over: Any) -> dict[str, Any]:
    data = make_manifest(PAYLOAD, CHUNK).to_wire()
    data.update(over)
    return data


# --- manifests ----------------------------------------------------------------------------------


def test_make_manifest_describes_the_payload() -> None:
    # Execute
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Assert
    assert manifest.total_bytes == len(PAYLOAD)
    assert manifest.chunk_size == CHUNK
    assert manifest.count == 11
    assert manifest.blake3 == blake3.blake3(PAYLOAD).hexdigest()
    assert len(manifest.transfer_id) == 32
    assert make_manifest(PAYLOAD, CHUNK).transfer_id != manifest.transfer_id
    assert make_manifest(PAYLOAD).chunk_size == DEFAULT_CHUNK_SIZE


@pytest.mark.parametrize("chunk_size", [0, -1, 1 << 32, 1.5])
def test_make_manifest_rejects_bad_chunk_sizes(chunk_size: Any) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="chunk_size must be an int"):
        make_manifest(PAYLOAD, chunk_size)


def test_manifest_wire_round_trip() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Execute
    again = Manifest.from_wire(manifest.to_wire(), max_bytes=len(PAYLOAD))

    # Assert
    assert again == manifest


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "manifest must be a map with exactly"),
        ({**wire(), "extra": 1}, "manifest must be a map with exactly"),
        ({k: v for k, v in wire().items() if k != "blake3"}, "manifest must be a map"),
        (wire(transfer_id="A" * 32), "transfer_id must be 32 lowercase hex chars"),
        (wire(transfer_id="ab"), "transfer_id must be 32 lowercase hex chars"),
        (wire(transfer_id=12), "transfer_id must be 32 lowercase hex chars"),
        (wire(blake3="0" * 63), "blake3 must be 64 lowercase hex chars"),
        (wire(total_bytes="2564"), "total_bytes must be a non-negative int, got '2564'"),
        (wire(total_bytes=-1), "total_bytes must be a non-negative int"),
        (wire(chunk_size=True), "chunk_size must be a non-negative int, got True"),
        (wire(count=11.0), "count must be a non-negative int, got 11.0"),
        (wire(chunk_size=0, count=0), "chunk_size 0 outside 1..4294967295"),
        (wire(chunk_size=1 << 32, count=1), "chunk_size 4294967296 outside"),
        (wire(count=10), "count 10 but 2564 bytes in chunks of 256 make 11"),
        (wire(count=12), "count 12 but 2564 bytes in chunks of 256 make 11"),
        (wire(total_bytes=1 << 40, count=1 << 32), "exceed the 1000000-byte limit"),
    ],
)
def test_manifest_from_wire_rejects_malformed_data(data: Any, message: str) -> None:
    # Execute / Assert
    with pytest.raises(FrameError, match=message):
        Manifest.from_wire(data, max_bytes=1_000_000)


def test_oversize_manifest_is_rejected_before_allocating() -> None:
    # Prepare: 1 TiB declared; only the check may run
    data = wire(total_bytes=1 << 40, chunk_size=1, count=1 << 40)
    tracemalloc.start()

    # Execute
    try:
        with pytest.raises(FrameError, match="1099511627776 bytes exceed the 1048576-byte limit"):
            Reassembler(Manifest.from_wire(data, max_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert peak < 1 << 20


# --- chunk frames -------------------------------------------------------------------------------


def test_chunk_frames_carry_header_and_slices() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Execute
    frames = list(iter_chunk_frames(PAYLOAD, manifest))
    parsed = [parse_chunk_frame(f) for f in frames]

    # Assert
    assert len(frames) == 11
    assert all(f.startswith(b"FHC1") for f in frames)
    assert [len(f) - CHUNK_HEADER_SIZE for f in frames] == [256] * 10 + [4]
    assert [c.index for c in parsed] == list(range(11))
    assert {(c.transfer_id, c.count) for c in parsed} == {(manifest.transfer_id, 11)}
    assert [c.offset for c in parsed] == [256 * i for i in range(11)]
    assert b"".join(bytes(c.data) for c in parsed) == PAYLOAD


def test_chunk_frames_for_chosen_indices() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Execute
    parsed = [parse_chunk_frame(f) for f in iter_chunk_frames(PAYLOAD, manifest, [10, 3])]

    # Assert
    assert [(c.index, c.offset, bytes(c.data)) for c in parsed] == [
        (10, 2560, b"tail"),
        (3, 768, PAYLOAD[768:1024]),
    ]


@pytest.mark.parametrize("index", [-1, 11, True, "1"])
def test_chunk_frames_reject_indices_outside_the_transfer(index: Any) -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Execute / Assert
    with pytest.raises(FrameError, match="chunk index"):
        list(iter_chunk_frames(PAYLOAD, manifest, [index]))


def test_chunk_frames_reject_a_payload_the_manifest_does_not_describe() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)

    # Execute / Assert
    with pytest.raises(FrameError, match="payload is 2563 bytes but the manifest says 2564"):
        list(iter_chunk_frames(PAYLOAD[:-1], manifest))


def test_parse_chunk_frame_is_a_view_of_the_frame() -> None:
    # Prepare
    frame = next(iter_chunk_frames(PAYLOAD, make_manifest(PAYLOAD, CHUNK)))

    # Execute
    chunk = parse_chunk_frame(frame)

    # Assert
    assert chunk.data.obj is frame


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: b"FHCX" + f[4:], r"bad chunk magic b'FHCX', expected b'FHC1'"),
        (lambda f: f[:39], "chunk frame of 39 bytes is shorter than its 40-byte header"),
        (lambda f: b"", "chunk frame of 0 bytes"),
        (lambda f: f[:-1], "chunk 0 declares 256 data bytes but carries 255"),
        (lambda f: f + b"x", "chunk 0 declares 256 data bytes but carries 257"),
        (
            lambda f: f[:20] + struct.pack("<I", 11) + f[24:],
            "chunk index 11 not below its count 11",
        ),
        (lambda f: f[:24] + struct.pack("<I", 0) + f[28:], "chunk index 0 not below its count 0"),
    ],
)
def test_parse_chunk_frame_rejects_malformed_frames(mutate: Any, message: str) -> None:
    # Prepare
    frame = next(iter_chunk_frames(PAYLOAD, make_manifest(PAYLOAD, CHUNK)))

    # Execute / Assert
    with pytest.raises(FrameError, match=message):
        parse_chunk_frame(mutate(frame))


# --- reassembly ---------------------------------------------------------------------------------


def test_shuffled_chunks_reassemble_with_duplicates_ignored() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)
    chunks = chunks_of(PAYLOAD, manifest)
    arrivals = chunks + chunks[:4]  # the first four arrive twice
    random.Random(7).shuffle(arrivals)
    reassembler = Reassembler(Manifest.from_wire(manifest.to_wire(), max_bytes=1 << 20))

    # Execute
    done = [reassembler.add(c) for c in arrivals]

    # Assert
    first_arrival: dict[int, int] = {}
    for position, chunk in enumerate(arrivals):
        first_arrival.setdefault(chunk.index, position)
    last_new = max(first_arrival.values())
    assert done == [False] * last_new + [True] * (len(arrivals) - last_new)
    assert reassembler.complete
    assert reassembler.received == 11
    assert reassembler.missing() == []
    assert reassembler.result() == PAYLOAD


def test_duplicate_with_other_bytes_is_ignored() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)
    chunks = chunks_of(PAYLOAD, manifest)
    reassembler = Reassembler(manifest)
    reassembler.add(chunks[2])
    forged = ChunkFrame(manifest.transfer_id, 2, 11, 512, memoryview(bytes(256)))

    # Execute
    result = reassembler.add(forged)

    # Assert
    assert result is False
    assert reassembler.received == 1
    for chunk in chunks:
        reassembler.add(chunk)
    assert reassembler.result() == PAYLOAD


def test_missing_lists_the_absent_indices() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)
    chunks = chunks_of(PAYLOAD, manifest)
    reassembler = Reassembler(manifest)

    # Execute
    for i in (0, 2, 3, 7, 10):
        reassembler.add(chunks[i])

    # Assert
    assert reassembler.missing() == [1, 4, 5, 6, 8, 9]
    assert not reassembler.complete
    with pytest.raises(FrameError, match=r"incomplete: 6 of 11 chunks missing \(first: \[1, 4,"):
        reassembler.result()


def test_flipped_byte_in_a_chunk_fails_the_digest() -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)
    frames = [bytearray(f) for f in iter_chunk_frames(PAYLOAD, manifest)]
    frames[5][CHUNK_HEADER_SIZE + 17] ^= 0x01
    reassembler = Reassembler(manifest)
    for frame in frames:
        reassembler.add(parse_chunk_frame(frame))

    # Execute / Assert
    with pytest.raises(FrameError, match=f"transfer {manifest.transfer_id}: blake3 mismatch"):
        reassembler.result()


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (
            ChunkFrame("0" * 32, 0, 11, 0, memoryview(PAYLOAD[:256])),
            "chunk of transfer 0000.* given to transfer",
        ),
        (
            ChunkFrame("{tid}", 0, 12, 0, memoryview(PAYLOAD[:256])),
            "says 12 chunks, manifest says 11",
        ),
        (ChunkFrame("{tid}", 1, 11, 0, memoryview(PAYLOAD[:256])), "chunk 1 at offset 0 with 256"),
        (ChunkFrame("{tid}", 10, 11, 2560, memoryview(b"tail!")), "chunk 10 at offset 2560 with 5"),
        (ChunkFrame("{tid}", 3, 11, 768, memoryview(b"")), "expected offset 768 with 256"),
    ],
)
def test_chunks_that_do_not_fit_the_transfer_are_rejected(chunk: ChunkFrame, message: str) -> None:
    # Prepare
    manifest = make_manifest(PAYLOAD, CHUNK)
    if chunk.transfer_id == "{tid}":
        chunk = ChunkFrame(manifest.transfer_id, chunk.index, chunk.count, chunk.offset, chunk.data)
    reassembler = Reassembler(manifest)

    # Execute / Assert
    with pytest.raises(FrameError, match=message):
        reassembler.add(chunk)
    assert reassembler.received == 0


def test_empty_payload_is_complete_at_once() -> None:
    # Prepare
    manifest = make_manifest(b"", CHUNK)

    # Execute
    reassembler = Reassembler(Manifest.from_wire(manifest.to_wire(), max_bytes=0))

    # Assert
    assert manifest.count == 0
    assert list(iter_chunk_frames(b"", manifest)) == []
    assert reassembler.complete
    assert reassembler.result() == b""


def test_result_is_writable_for_zero_copy_decode() -> None:
    # Prepare
    frame = encode({"w": np.arange(1000, dtype=np.float32)})
    manifest = make_manifest(frame, 512)
    reassembler = Reassembler(manifest)
    for chunk in chunks_of(frame, manifest):
        reassembler.add(chunk)

    # Execute
    buffer = reassembler.result()
    tensors, _ = decode(buffer)

    # Assert
    assert not memoryview(buffer).readonly
    assert tensors["w"].flags.writeable
    assert np.shares_memory(tensors["w"], np.frombuffer(buffer, np.uint8))
    np.testing.assert_array_equal(tensors["w"], np.arange(1000, dtype=np.float32))


@pytest.mark.slow
def test_300_mb_model_survives_shuffled_1_mib_chunks() -> None:
    # Prepare: 75M float32 (300 MB) plus a few small tensors
    model: dict[str, Array] = {
        "big": np.arange(75_000_000, dtype=np.float32),
        "bias": np.linspace(-1, 1, 1000, dtype=np.float32),
        "steps": np.array(42, dtype=np.int64),
    }
    payload = encode(model, {"round": 3})
    manifest = Manifest.from_wire(make_manifest(payload).to_wire(), max_bytes=1 << 30)
    order = list(range(manifest.count))
    random.Random(1).shuffle(order)
    reassembler = Reassembler(manifest)

    # Execute: frames are produced and consumed one at a time, in shuffled order
    for frame in iter_chunk_frames(payload, manifest, order):
        reassembler.add(parse_chunk_frame(frame))
    tensors, meta = decode(reassembler.result())

    # Assert
    assert manifest.count == -(-len(payload) // (1 << 20))
    assert meta == {"round": 3}
    assert tensors.keys() == model.keys()
    for name, array in model.items():
        assert np.array_equal(tensors[name], array), name
