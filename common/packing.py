"""Packing model updates for the wire: optional, per federation (``AggregatorConfig.compression``).

An aggregator announces its setting in its status; its agents pack each update with
:func:`pack_update` and the aggregator unpacks it with :func:`unpack_update`, back to the
model's own dtypes, before validating it against the model spec. Every packed payload says
what it is, so nothing depends on both sides agreeing beforehand:

* ``float16`` / ``bfloat16``: float tensors wider than 2 bytes travel cast to that dtype (half
  the bytes of float32, lossy: ~3 significant digits for float16, ~2 for bfloat16, bfloat16
  keeping float32's range). The frame's meta maps each cast tensor to its own dtype
  (``{"cast": {"fc.weight": "float32"}}``); integer, bool and complex tensors travel as they are.
* ``zlib``: lossless. The frame's bytes are split into ``k`` byte planes (byte ``i`` of every
  ``k``-byte element, ``k`` the widest float itemsize: 4 for float32), since the planes of
  sign and exponent bytes compress well and mantissa bytes hardly at all; each plane is
  deflated (level 1) or stored raw when deflating does not pay (judged on its first 64 KiB)::

      b"FHZ1" | u64 frame length | u8 k | k × (u8 deflated | u64 stored length) | planes

  The receiver refuses a declared length above its limit before allocating, and inflates no
  plane beyond its exact size (no zip bombs).
* ``float16+zlib`` / ``bfloat16+zlib``: both.

Without a setting an update is a plain frame (:func:`common.codec.encode_frame`), which
:func:`unpack_update` decodes as such.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from typing import Any, get_args

import numpy as np

from common.codec import (
    Array,
    Buffer,
    Tensors,
    decode,
    dtype_from_name,
    dtype_name,
    encode_frame,
    new_buffer,
)
from common.config import Compression
from common.errors import CodecError, FrameError

COMPRESSIONS: tuple[str, ...] = get_args(Compression)
ZLIB_MAGIC = b"FHZ1"
_ZLIB_HEADER = struct.Struct("<4sQ")
_PLANE = struct.Struct("<BQ")
_ZLIB_LEVEL = 1
_CAST_KEY = "cast"
#: A plane is deflated when its first _SAMPLE bytes deflate below _WORTH of their size.
_SAMPLE = 64 << 10
_WORTH = 0.95


def _parts(compression: str | None) -> tuple[str | None, bool]:
    """(dtype to cast floats to or None, whether to deflate)."""
    if compression is None:
        return None, False
    if compression not in COMPRESSIONS:
        raise CodecError(f"unknown compression {compression!r}; one of {', '.join(COMPRESSIONS)}")
    cast, _, deflate = compression.partition("+")
    if cast == "zlib":
        return None, True
    return cast, deflate == "zlib"


def pack_update(
    tensors: Tensors,
    compression: str | None,
    meta: Mapping[str, Any] | None = None,
    *,
    inline_max: int = 0,
) -> Buffer:
    """The wire form of an update under ``compression`` (None: a plain frame); a plain frame
    of at most ``inline_max`` bytes comes as ``bytes``, ready to travel inline."""
    cast, deflate = _parts(compression)
    meta_out = dict(meta or {})
    if cast is not None:
        wire = dtype_from_name(cast)
        originals: dict[str, str] = {}
        packed: dict[str, Array] = {}
        for name, value in tensors.items():
            array = np.asarray(value)
            if (array.dtype.kind == "f" or dtype_name(array.dtype) == "bfloat16") and (
                array.dtype.itemsize > wire.itemsize
            ):
                originals[name] = dtype_name(array.dtype)
                array = array.astype(wire)
            packed[name] = array
        tensors = packed
        if originals:
            meta_out[_CAST_KEY] = originals
    if not deflate:
        return encode_frame(tensors, meta_out, bytes_up_to=inline_max)
    frame = memoryview(encode_frame(tensors, meta_out))
    width = max(
        (np.asarray(v).dtype.itemsize for v in tensors.values() if _is_float(np.asarray(v))),
        default=1,
    )
    return _deflate(frame, width)


def _is_float(array: Array) -> bool:
    return array.dtype.kind == "f" or dtype_name(array.dtype) == "bfloat16"


def _planes(frame: memoryview, width: int) -> Array:
    """The frame's bytes as ``width`` rows of byte planes (zero-padded to whole elements)."""
    raw = np.frombuffer(frame, dtype=np.uint8)
    elements = -(-raw.shape[0] // width)
    padded = np.zeros(elements * width, dtype=np.uint8)
    padded[: raw.shape[0]] = raw
    return np.ascontiguousarray(padded.reshape(elements, width).T)


def _deflate(frame: memoryview, width: int) -> bytes:
    planes = _planes(frame, width)
    header = [_ZLIB_HEADER.pack(ZLIB_MAGIC, frame.nbytes), bytes((width,))]
    bodies: list[bytes | memoryview] = []
    for plane in planes:
        data = memoryview(plane)
        packed: bytes | memoryview = data
        sample = data[:_SAMPLE]
        if len(zlib.compress(sample, _ZLIB_LEVEL)) < _WORTH * len(sample):
            deflated = zlib.compress(data, _ZLIB_LEVEL)
            if len(deflated) < len(data):
                packed = deflated
        header.append(_PLANE.pack(packed is not data, len(packed)))
        bodies.append(packed)
    return b"".join([*header, *bodies])


def unpack_update(payload: Buffer, *, max_bytes: int) -> tuple[dict[str, Array], dict[str, Any]]:
    """Tensors (in their own dtypes) and meta of an update packed by :func:`pack_update`, or
    of a plain frame. ``max_bytes``: the largest frame accepted once inflated.

    Raises:
        FrameError / CodecError: a malformed payload, an inflated size over ``max_bytes``, or a
            cast entry that names no float tensor.
    """
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if view.nbytes >= _ZLIB_HEADER.size and bytes(view[:4]) == ZLIB_MAGIC:
        view = _inflate(view, max_bytes)
    tensors, meta = decode(view)
    originals = meta.pop(_CAST_KEY, None)
    if originals is None:
        return tensors, meta
    if not isinstance(originals, dict):
        raise FrameError(f"meta {_CAST_KEY!r} must map tensor names to dtypes")
    for name, original in originals.items():
        if name not in tensors or not isinstance(original, str):
            raise FrameError(f"meta {_CAST_KEY!r} names no tensor {name!r}")
        target = dtype_from_name(original)
        array = tensors[name]
        is_float = array.dtype.kind == "f" or dtype_name(array.dtype) == "bfloat16"
        if not is_float or not (target.kind == "f" or original == "bfloat16"):
            raise FrameError(f"tensor {name!r}: cannot cast {array.dtype} back to {original}")
        tensors[name] = array.astype(target)
    return tensors, meta


def _inflate(view: memoryview, max_bytes: int) -> memoryview:
    _magic, size = _ZLIB_HEADER.unpack_from(view, 0)
    if size > max_bytes:
        raise FrameError(f"packed update inflates to {size} bytes, over the {max_bytes} limit")
    pos = _ZLIB_HEADER.size
    if view.nbytes < pos + 1 or not 1 <= view[pos] <= 16:
        raise FrameError("packed update: bad plane count")
    width = view[pos]
    pos += 1
    if view.nbytes < pos + width * _PLANE.size:
        raise FrameError("packed update: truncated plane table")
    table = [_PLANE.unpack_from(view, pos + i * _PLANE.size) for i in range(width)]
    pos += width * _PLANE.size
    elements = -(-size // width)
    planes = np.empty((width, elements), dtype=np.uint8)
    for i, (deflated, length) in enumerate(table):
        data = view[pos : pos + length]
        if data.nbytes != length:
            raise FrameError(f"packed update: plane {i} is truncated")
        pos += length
        if not deflated:
            if length != elements:
                raise FrameError(f"packed update: stored plane {i} has {length} bytes")
            planes[i] = np.frombuffer(data, dtype=np.uint8)
            continue
        inflater = zlib.decompressobj()
        try:
            plane = inflater.decompress(data, elements + 1)
        except zlib.error as exc:
            raise FrameError(f"packed update: plane {i} does not inflate: {exc}") from exc
        if len(plane) != elements or not inflater.eof:
            raise FrameError(f"packed update: plane {i} does not inflate to {elements} bytes")
        planes[i] = np.frombuffer(plane, dtype=np.uint8)
    if pos != view.nbytes:
        raise FrameError("packed update: bytes after the last plane")
    out = new_buffer(elements * width)
    np.frombuffer(out, dtype=np.uint8).reshape(elements, width)[...] = planes.T
    return out[:size]


__all__ = ["COMPRESSIONS", "ZLIB_MAGIC", "pack_update", "unpack_update"]
