"""The tensor codec: round trips per dtype, zero copy, and rejection of malformed frames."""

from __future__ import annotations

import contextlib
import math
import mmap
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import codec
from common.codec import (
    SUPPORTED_DTYPES,
    Array,
    BufferPool,
    ModelSpec,
    TensorSpec,
    check_finite,
    decode,
    dtype_from_name,
    dtype_name,
    encode,
    encoded_size,
    new_buffer,
    new_raw,
    new_zeros,
)
from common.errors import CodecError, FrameError, InvalidModelError, ModelMismatchError

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample(dtype: str, shape: tuple[int, ...] = (2, 3)) -> Array:
    """A small array of ``dtype`` with distinct, non-trivial values."""
    n = int(np.prod(shape))
    if dtype == "bool":
        return np.asarray(np.arange(n) % 2 == 0, dtype=np.bool_).reshape(shape)
    if dtype.startswith("complex"):
        return (np.arange(n) - 1.5j * np.arange(n)).astype(dtype).reshape(shape)
    if dtype.startswith("int"):
        return (np.arange(n) - n // 2).astype(dtype).reshape(shape)
    values = np.arange(n) * 1.5 if dtype_from_name(dtype).kind in "fV" else np.arange(n) * 7
    return values.astype(dtype_from_name(dtype)).reshape(shape)


def raw_frame(header: Any, raw: bytes = b"", *, header_len: int | None = None) -> bytes:
    """A frame built by hand around ``header`` (any msgpack-able object)."""
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    start = len(packed) + 8
    pad = -start % 64
    length = len(packed) if header_len is None else header_len
    return b"FHT1" + struct.pack("<I", length) + packed + bytes(pad) + raw


def entry(name: Any = "w", dtype: Any = "float32", shape: Any = (2,), **over: Any) -> Any:
    item: dict[str, Any] = {
        "name": name,
        "dtype": dtype,
        "shape": list(shape),
        "offset": 0,
        "nbytes": math.prod(shape) * 4,
    }
    item.update(over)
    return item


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_round_trip_every_whitelisted_dtype(dtype: str) -> None:
    # Prepare
    original = sample(dtype)

    # Execute
    tensors, meta = decode(encode({"t": original}))

    # Assert
    assert meta == {}
    assert dtype_name(tensors["t"].dtype) == dtype
    assert tensors["t"].shape == (2, 3)
    np.testing.assert_array_equal(tensors["t"], original)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (1, 1, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "bool", "complex128"])
def test_round_trip_scalars_and_empty_arrays(shape: tuple[int, ...], dtype: str) -> None:
    # Prepare
    tensors = {"before": sample("float64"), "x": sample(dtype, shape), "after": sample("uint8")}

    # Execute
    decoded, _ = decode(encode(tensors))

    # Assert
    assert list(decoded) == ["before", "x", "after"]
    assert decoded["x"].shape == shape
    assert dtype_name(decoded["x"].dtype) == dtype
    for name, array in tensors.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_non_contiguous_and_big_endian_inputs_round_trip() -> None:
    # Prepare
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tensors = {
        "transposed": base.T,
        "strided": base[::2, ::3],
        "reversed": base[::-1],
        "big_endian": np.arange(5, dtype=">i4"),
        "big_endian_strided": np.arange(12, dtype=">f8").reshape(3, 4)[:, 1::2],
    }

    # Execute
    decoded, _ = decode(encode(tensors))

    # Assert
    for name, array in tensors.items():
        assert decoded[name].dtype.byteorder in "<|=", name
        assert decoded[name].flags.c_contiguous, name
        np.testing.assert_array_equal(decoded[name], array)


def test_meta_round_trips() -> None:
    # Prepare
    meta = {"round": 7, "num_samples": 12.5, "metrics": {"loss": 0.25}, "tags": ["a", "b"]}

    # Execute
    _, decoded_meta = decode(encode({"w": sample("float32")}, meta))

    # Assert
    assert decoded_meta == meta


def test_encoded_size_matches_encode_and_tensors_are_aligned() -> None:
    # Prepare
    tensors = {f"t{i}": sample(d, (i + 1,)) for i, d in enumerate(SUPPORTED_DTYPES)}

    # Execute
    frame = encode(tensors, {"round": 1})
    decoded, _ = decode(frame)

    # Assert
    assert encoded_size(tensors, {"round": 1}) == len(frame)
    base = np.frombuffer(frame, np.uint8).__array_interface__["data"][0]
    for name, array in decoded.items():
        assert (array.__array_interface__["data"][0] - base) % 64 == 0, name


def test_decode_is_zero_copy_and_writable_over_a_bytearray() -> None:
    # Prepare
    buf = bytearray(encode({"w": sample("float32"), "b": sample("bfloat16")}))
    whole = np.frombuffer(buf, dtype=np.uint8)

    # Execute
    tensors, _ = decode(buf)
    tensors["w"][0, 0] = 99.0
    again, _ = decode(buf)

    # Assert
    assert np.shares_memory(tensors["w"], whole)
    assert np.shares_memory(tensors["b"], whole)
    assert again["w"][0, 0] == 99.0


def test_decode_over_bytes_is_read_only_view() -> None:
    # Prepare
    frame = encode({"w": sample("int16")})

    # Execute
    tensors, _ = decode(frame)

    # Assert
    assert np.shares_memory(tensors["w"], np.frombuffer(frame, np.uint8))
    assert not tensors["w"].flags.writeable


def test_decode_accepts_a_memoryview_slice() -> None:
    # Prepare
    frame = encode({"w": sample("float64")})
    padded = b"xx" + frame + b"yy"

    # Execute
    tensors, _ = decode(memoryview(padded)[2 : 2 + len(frame)])

    # Assert
    np.testing.assert_array_equal(tensors["w"], sample("float64"))


def _arrays_of(dtype: np.dtype[Any]) -> st.SearchStrategy[Array]:
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
    return hnp.arrays(dtype, shapes)


_plain = [np.dtype(d) for d in SUPPORTED_DTYPES if d != "bfloat16"]
_any_array = st.one_of(
    st.sampled_from(_plain).flatmap(_arrays_of),
    st.sampled_from(_plain).map(lambda d: d.newbyteorder(">")).flatmap(_arrays_of),
    _arrays_of(np.dtype(np.uint16)).map(lambda a: a.view(BF16)),
)


@settings(max_examples=60, deadline=None)
@given(tensors=st.dictionaries(st.text(max_size=12), _any_array, max_size=5))
def test_round_trip_property(tensors: dict[str, Array]) -> None:
    # Execute
    decoded, _ = decode(encode(tensors))

    # Assert: the same names, shapes, dtype names and bit patterns (NaN payloads included)
    assert list(decoded) == list(tensors)
    for name, array in tensors.items():
        wire = dtype_from_name(dtype_name(array.dtype))
        assert decoded[name].dtype == wire
        assert decoded[name].shape == array.shape
        assert decoded[name].tobytes() == np.ascontiguousarray(array, dtype=wire).tobytes()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_frames_decode_or_raise_codec_error(data: st.DataObject) -> None:
    # Prepare
    frame = bytearray(encode({"a": sample("float32"), "b": sample("bool"), "c": sample("int8")}))
    position = data.draw(st.integers(0, len(frame) - 1))
    frame[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))

    # Execute / Assert: never anything but a CodecError
    with contextlib.suppress(CodecError):
        decode(bytes(frame[:cut]))


# --- encode errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.array(["a", "b"]),
        np.array([object()], dtype=object),
        np.array([1], dtype="datetime64[s]"),
        np.zeros(2, dtype=[("x", "f4")]),
        np.zeros(2, dtype=np.longdouble),
    ],
)
def test_encode_rejects_dtypes_off_the_whitelist(value: Array) -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match=r"tensor 'bad': dtype .* cannot be sent"):
        encode({"ok": sample("float32"), "bad": value})


def test_encode_rejects_meta_msgpack_cannot_carry() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="meta"):
        encode({"w": sample("float32")}, {"when": object()})
    with pytest.raises(CodecError, match="meta"):
        encode({"w": sample("float32")}, {"nested": {1: "int key"}})


def test_dtype_from_name_rejects_unknown_names() -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match="unsupported dtype 'float128'"):
        dtype_from_name("float128")


# --- decode errors ----------------------------------------------------------------------------


def test_bad_magic_is_rejected() -> None:
    # Prepare
    frame = b"XXXX" + encode({"w": sample("float32")})[4:]

    # Execute / Assert
    with pytest.raises(FrameError, match=r"bad magic b'XXXX', expected b'FHT1'"):
        decode(frame)


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_frame_shorter_than_prefix_is_rejected(cut: int) -> None:
    # Prepare
    frame = encode({"w": sample("float32")})[:cut]

    # Execute / Assert
    with pytest.raises(FrameError, match="shorter than its 8-byte prefix"):
        decode(frame)


def test_truncated_raw_area_is_rejected() -> None:
    # Prepare
    frame = encode({"w": sample("float32", (10, 10))})

    # Execute / Assert
    with pytest.raises(FrameError, match=r"tensor 'w': bytes 0\.\.400 lie beyond the 399-byte"):
        decode(frame[:-1])


def test_truncated_header_is_rejected() -> None:
    # Prepare
    frame = encode({"w": sample("float32")})

    # Execute / Assert
    with pytest.raises(FrameError, match=r"header length .* exceeds the 12 bytes after the prefix"):
        decode(frame[:20])


def test_header_length_beyond_buffer_is_rejected() -> None:
    # Prepare
    frame = raw_frame({"index": [], "meta": {}}, header_len=0xFFFFFFFF)

    # Execute / Assert
    with pytest.raises(FrameError, match="header length 4294967295 exceeds"):
        decode(frame)


def test_header_length_over_the_cap_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(codec, "MAX_HEADER_BYTES", 8)
    frame = raw_frame({"index": [], "meta": {"pad": "x" * 100}})

    # Execute / Assert
    with pytest.raises(FrameError, match="exceeds the 8 limit"):
        decode(frame)


def test_declared_nbytes_must_match_shape_and_dtype() -> None:
    # Prepare
    frame = raw_frame({"index": [entry("fc.weight", shape=(10, 10), nbytes=4000)], "meta": {}})

    # Execute / Assert
    with pytest.raises(
        FrameError, match=r"tensor 'fc.weight': declared 4000 bytes but shape \(10, 10\) float32"
    ):
        decode(frame + bytes(4000))


def test_huge_declared_sizes_are_rejected_without_allocating() -> None:
    # Prepare: 2**30 x 2**30 float64 (8 EiB) with a consistent nbytes, over a tiny buffer
    huge = entry("huge", "float64", (1 << 30, 1 << 30), nbytes=1 << 63)
    frame = raw_frame({"index": [huge], "meta": {}}, b"\0" * 64)
    tracemalloc.start()

    # Execute
    try:
        with pytest.raises(
            FrameError, match=r"tensor 'huge': bytes 0\.\.9223372036854775808 lie beyond"
        ):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 100,
        b"FHT1",
        b"FHT1\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1" + bytes(64),  # 0xc1 is never valid msgpack
        b"FHT1\x03\x00\x00\x00\x92\x01\x02" + bytes(64),  # a list, not a map
        b"FHT1\x02\x00\x00\x00\x81\x01" + bytes(64),  # truncated map
        bytes(range(256)) * 4,
    ],
)
def test_garbage_is_rejected_with_frame_error(garbage: bytes) -> None:
    # Execute / Assert
    with pytest.raises(FrameError):
        decode(garbage)


def test_invalid_msgpack_header_is_named() -> None:
    # Prepare
    frame = b"FHT1\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1" + bytes(64)

    # Execute / Assert
    with pytest.raises(FrameError, match="header is not valid msgpack"):
        decode(frame)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2], "header must be a map with exactly 'index' and 'meta'"),
        ({"index": []}, "header must be a map with exactly 'index' and 'meta'"),
        ({"index": [], "meta": {}, "x": 1}, "header must be a map with exactly"),
        ({"index": {}, "meta": {}}, "header 'index' must be a list, got dict"),
        ({"index": [], "meta": []}, "header 'meta' must be a map, got list"),
        ({"index": [5], "meta": {}}, "index entry 0 must be a map with exactly"),
        ({"index": [{"name": "w"}], "meta": {}}, "index entry 0 must be a map with exactly"),
        ({"index": [entry(name=7)], "meta": {}}, "index entry 0: name must be a string, got 7"),
        ({"index": [entry(dtype="object")], "meta": {}}, "tensor 'w': unsupported dtype 'object'"),
        ({"index": [entry(dtype=3)], "meta": {}}, "tensor 'w': unsupported dtype 3"),
        ({"index": [entry(shape=(-1,))], "meta": {}}, r"tensor 'w': shape must be a list"),
        ({"index": [{**entry(), "shape": "ab"}], "meta": {}}, r"tensor 'w': shape must be a list"),
        ({"index": [{**entry(), "shape": [True]}], "meta": {}}, "shape must be a list"),
        ({"index": [{**entry(), "shape": [1.0]}], "meta": {}}, "shape must be a list"),
        ({"index": [entry(shape=(1,) * 65)], "meta": {}}, "shape must be a list of at most 64"),
        ({"index": [entry(offset="0")], "meta": {}}, "tensor 'w': offset must be a non-negative"),
        ({"index": [entry(offset=-64)], "meta": {}}, "tensor 'w': offset must be a non-negative"),
        ({"index": [entry(nbytes=None)], "meta": {}}, "tensor 'w': nbytes must be a non-negative"),
        ({"index": [entry(nbytes=True)], "meta": {}}, "tensor 'w': nbytes must be a non-negative"),
        ({"index": [entry(offset=4)], "meta": {}}, "tensor 'w': offset 4 is not 64-byte aligned"),
        ({"index": [entry(), entry()], "meta": {}}, "duplicate tensor name 'w'"),
        (
            {"index": [entry("a", shape=(32,)), entry("b", offset=64)], "meta": {}},
            "tensors 'a' and 'b' overlap",
        ),
    ],
)
def test_wrong_types_in_header_are_rejected(header: Any, message: str) -> None:
    # Prepare
    frame = raw_frame(header, bytes(256))

    # Execute / Assert
    with pytest.raises(FrameError, match=message):
        decode(frame)


def test_non_string_map_keys_and_ext_types_are_rejected() -> None:
    # Prepare
    int_keys = raw_frame({"index": [], "meta": {1: 2}})
    ext = raw_frame({"index": [], "meta": {"x": msgpack.ExtType(5, b"abc")}})

    # Execute / Assert
    with pytest.raises(FrameError, match="header is not valid msgpack: int is not allowed"):
        decode(int_keys)
    with pytest.raises(FrameError, match=r"header is not valid msgpack: .*max_ext_len"):
        decode(ext)


def test_tensor_count_limit() -> None:
    # Prepare
    frame = encode({f"t{i}": sample("uint8", (1,)) for i in range(5)})

    # Execute / Assert
    assert len(decode(frame, max_tensors=5)[0]) == 5
    with pytest.raises(FrameError, match="declares 5 tensors, more than the 4 limit"):
        decode(frame, max_tensors=4)


def test_bool_bytes_other_than_zero_and_one_are_rejected() -> None:
    # Prepare
    frame = bytearray(encode({"mask": np.array([True, False, True])}))
    frame[-2] = 7

    # Execute / Assert
    with pytest.raises(FrameError, match="tensor 'mask': bool bytes other than 0 and 1"):
        decode(frame)


def test_non_buffer_input_is_rejected() -> None:
    # Execute / Assert
    with pytest.raises(FrameError, match="expected a bytes-like frame, got str"):
        decode("FHT1")  # type: ignore[arg-type]


# --- ModelSpec ----------------------------------------------------------------------------------


def _model() -> dict[str, Array]:
    return {
        "fc.weight": sample("float32", (10, 10)),
        "fc.bias": sample("float32", (10,)),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
        "emb": sample("bfloat16", (4, 2)),
    }


def test_model_spec_from_tensors_describes_names_dtypes_shapes_in_order() -> None:
    # Execute
    spec = ModelSpec.from_tensors(_model(), "pytorch")

    # Assert
    assert spec.framework == "pytorch"
    assert spec.tensors == (
        TensorSpec("fc.weight", "float32", (10, 10)),
        TensorSpec("fc.bias", "float32", (10,)),
        TensorSpec("bn.num_batches_tracked", "int64", ()),
        TensorSpec("emb", "bfloat16", (4, 2)),
    )
    assert spec.nbytes == 400 + 40 + 8 + 16


def test_model_spec_check_accepts_a_matching_model() -> None:
    # Prepare
    spec = ModelSpec.from_tensors(_model())

    # Execute / Assert (no exception)
    spec.check(decode(encode(_model()))[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("fc.bias"), r"missing tensor 'fc.bias' \(expected \(10,\) float32\)"),
        (
            lambda m: m.update(extra=np.zeros(3, np.float16)),
            r"unexpected tensor 'extra' \(\(3,\) float16\) not in the model",
        ),
        (
            lambda m: m.update({"fc.weight": np.zeros((10, 5), np.float32)}),
            r"tensor 'fc.weight': expected \(10, 10\) float32, got \(10, 5\) float32",
        ),
        (
            lambda m: m.update({"fc.weight": np.zeros((10, 10), np.float64)}),
            r"tensor 'fc.weight': expected \(10, 10\) float32, got \(10, 10\) float64",
        ),
        (
            lambda m: m.update({"emb": np.zeros((4, 2), np.float16)}),
            r"tensor 'emb': expected \(4, 2\) bfloat16, got \(4, 2\) float16",
        ),
        (
            lambda m: m.update({"fc.bias": np.zeros(10, "U1")}),
            r"tensor 'fc.bias': expected \(10,\) float32, got \(10,\) <U1",
        ),
    ],
)
def test_model_spec_check_names_the_mismatch(change: Any, message: str) -> None:
    # Prepare
    spec = ModelSpec.from_tensors(_model())
    model = _model()
    change(model)

    # Execute / Assert
    with pytest.raises(ModelMismatchError, match=message):
        spec.check(model)


def test_model_spec_check_counts_further_differences() -> None:
    # Prepare
    spec = ModelSpec.from_tensors(_model())

    # Execute / Assert
    with pytest.raises(ModelMismatchError, match=r"missing tensor 'fc.weight'.*and 4 more"):
        spec.check({"other": np.zeros(1)})


def test_model_spec_wire_round_trip() -> None:
    # Prepare
    spec = ModelSpec.from_tensors(_model(), "pytorch")

    # Execute
    wire = msgpack.unpackb(msgpack.packb(spec.to_wire()))

    # Assert
    assert ModelSpec.from_wire(wire) == spec


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "model spec must be a map"),
        ({"tensors": []}, "model spec must be a map"),
        ({"framework": "", "tensors": []}, "'framework' must be a non-empty string"),
        ({"framework": "np", "tensors": {}}, "'tensors' must be a list, got dict"),
        ({"framework": "np", "tensors": [["w", "float32", [1]]]}, "tensor 0 must be a map"),
        (
            {"framework": "np", "tensors": [{"name": 1, "dtype": "float32", "shape": []}]},
            "tensor 0: name must be a string",
        ),
        (
            {"framework": "np", "tensors": [{"name": "w", "dtype": "float8", "shape": []}]},
            "tensor 'w': unsupported dtype 'float8'",
        ),
        (
            {"framework": "np", "tensors": [{"name": "w", "dtype": "int8", "shape": [-2]}]},
            r"tensor 'w': shape must be a list of non-negative ints, got \[-2\]",
        ),
        (
            {"framework": "np", "tensors": [{"name": "w", "dtype": "int8", "shape": []}] * 2},
            "duplicate tensor name 'w'",
        ),
    ],
)
def test_model_spec_from_wire_rejects_malformed_data(data: Any, message: str) -> None:
    # Execute / Assert
    with pytest.raises(CodecError, match=message):
        ModelSpec.from_wire(data)


# --- check_finite -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_tensor_and_index(dtype: str, bad: float) -> None:
    # Prepare
    array = np.zeros((2, 3), dtype=dtype_from_name(dtype))
    array[1, 2] = bad

    # Execute / Assert
    with pytest.raises(InvalidModelError, match=r"tensor 'layer.w' has a non-finite .*\(1, 2\)"):
        check_finite({"ok": sample("float32"), "layer.w": array})


def test_check_finite_covers_complex_and_scalars() -> None:
    # Execute / Assert
    with pytest.raises(InvalidModelError, match=r"tensor 'z' has a non-finite value \(.*nan"):
        check_finite({"z": np.array([1 + 1j, complex(0, np.nan)])})
    with pytest.raises(InvalidModelError, match=r"tensor 's' .* at index \(\)"):
        check_finite({"s": np.array(np.inf, dtype=np.float32)})


def test_check_finite_scans_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(codec, "_FINITE_BLOCK", 4)
    array = np.zeros(11, dtype=np.float32)
    array[9] = np.nan

    # Execute / Assert
    with pytest.raises(InvalidModelError, match=r"at index \(9,\)"):
        check_finite({"w": array})


def test_the_squares_check_reads_a_large_tensor_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: BLAS dot products of at most 8 elements; their sizes are recorded. NumPy holds
    # the GIL for a whole dot product: one over a 200 MB model stalled a thread beside it.
    monkeypatch.setattr(codec, "_DOT_BLOCK", 8)
    sizes: list[int] = []
    dot = np.dot

    def recording(a: Array, b: Array) -> Any:
        sizes.append(a.shape[0])
        return dot(a, b)

    monkeypatch.setattr(np, "dot", recording)
    array = np.ones(30, dtype=np.float32)

    # Execute: a finite tensor, then one with Inf in its last piece.
    codec.check_finite({"w": array})
    whole = list(sizes)
    array[29] = np.inf
    with pytest.raises(InvalidModelError, match=r"at index \(29,\)"):
        codec.check_finite({"w": array})

    # Assert: four pieces of at most 8 elements, and the Inf in the last one was found.
    assert whole == [8, 8, 8, 6]
    assert codec.all_finite(np.ones(30, dtype=np.float32))
    assert not codec.all_finite(array)


def test_check_finite_accepts_finite_and_ignores_integers() -> None:
    # Prepare
    tensors = {
        "w": sample("float32"),
        "b": sample("bfloat16"),
        "n": np.array(np.iinfo(np.int64).max),
        "m": np.array([True]),
        "e": np.zeros((0, 3), np.float16),
    }

    # Execute / Assert (no exception)
    check_finite(tensors)


# ------------------------------------------------------------------ pooled buffers
def _address(buffer: memoryview | np.ndarray) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)


def test_a_large_buffer_nobody_holds_is_handed_out_again_and_one_in_use_is_not() -> None:
    # Prepare: a pooled-size buffer, and views of it held the ways callers hold them.
    size = (4 << 20) + 123
    first = new_buffer(size)
    where = _address(first)
    tensor = np.frombuffer(first, dtype=np.uint8)[8:]
    del first

    # Execute / Assert: while a NumPy view of it lives, a new buffer is another one; once
    # every view is gone, the same memory comes back (its pages already mapped).
    second = new_buffer(size)
    assert _address(second) != where
    del tensor
    third = new_buffer(size)
    assert _address(third) == where
    # Reused as it is, not a fresh mapping (which the kernel would hand out zeroed).
    third[-1] = 0xA5
    del third
    third = new_buffer(size)
    assert _address(third) == where
    assert third[-1] == 0xA5
    # A different size, or a size outside the pooled range, never gets it.
    del third
    assert _address(new_buffer(size + 1)) != where
    small = new_raw(1 << 10)
    assert _address(new_raw(1 << 10)) != _address(small)
    del second


def test_pooled_zeros_start_at_zero_in_a_reused_buffer_and_large_ones_stay_lazy() -> None:
    # Prepare: a pooled buffer full of garbage, then released.
    shape = (1 << 19,)  # 4 MiB of float64
    dirty = new_raw(8 << 19)
    dirty[:] = 0xFF
    where = _address(dirty)
    del dirty

    # Execute
    sums = new_zeros(shape, np.float64)

    # Assert: the same memory, cleared.
    assert _address(sums.view(np.uint8)) == where
    assert sums.shape == shape
    assert sums.dtype == np.float64
    assert not sums.any()
    # Beyond the pooled sizes: NumPy's own zeros (calloc: pages appear when written).
    big = new_zeros((40 << 20,), np.float64)
    assert big.base is None


def test_a_buffer_pool_keeps_its_limits() -> None:
    # Prepare: at most 2 pooled buffers of 10–100 bytes.
    pool = BufferPool(bytearray, min_bytes=10, max_bytes=100, max_count=2)

    # Execute: three held at once, then all released.
    held = [pool.take(50) for _ in range(3)]
    ids = [id(b) for b in held]
    del held
    again = [pool.take(50) for _ in range(3)]

    # Assert: the first two come back, the third was never kept; sizes outside the range are
    # never pooled.
    assert [id(b) for b in again[:2]] == ids[:2]
    assert len(pool._buffers) == 2
    assert not pool.pools(9)
    assert not pool.pools(101)
    assert pool.pools(100)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(codec._madvise is None, reason="no madvise(2) here")
def test_prefault_brings_a_new_buffers_pages_in_without_changing_its_bytes() -> None:
    # Prepare: 64 MiB of new memory (a fresh mapping: no pages yet) with bytes written at both
    # ends and in the middle, as chunks stored before the background thread gets there would be.
    size = 64 << 20
    mapping = mmap.mmap(-1, size)
    array = np.frombuffer(mapping, dtype=np.uint8)
    marks = {0: 7, size // 2: 11, size - 1: 13}
    for at, value in marks.items():
        array[at] = value
    before = _rss_bytes()

    # Execute
    future = codec.prefault(array)
    assert future is not None
    populated = future.result(timeout=60)

    # Assert: the pages are resident now (unless the kernel has no MADV_POPULATE_WRITE), and
    # what was written is still there.
    if populated:
        assert _rss_bytes() - before >= size * 3 // 4
    assert {at: int(array[at]) for at in marks} == marks
    assert codec.prefault(np.empty(codec.PREFAULT_BYTES - 1, dtype=np.uint8)) is None
    del array
    mapping.close()
