"""The tensor codec: named NumPy arrays <-> one pickle-free byte frame.

Frame layout (little-endian)::

    b"FHT1" | u32 header_len | msgpack header | zero padding to 64 B | raw tensor bytes

The msgpack header is ``{"index": [{"name", "dtype", "shape", "offset", "nbytes"}...],
"meta": {...}}``; ``offset`` is relative to the start of the raw area and each tensor starts
64-byte aligned. ``decode`` returns arrays that are ``np.frombuffer`` views into the buffer it
was given (zero copy; writable when given a ``bytearray``). bfloat16 uses ``ml_dtypes.bfloat16``.
Never pickle, never ``allow_pickle``.

``decode`` trusts nothing it reads: every length, offset, dtype and shape is checked against the
buffer before a view is made, and nothing is allocated from a declared size.

Hot paths use :func:`encode_frame` instead of :func:`encode`: it returns the frame as a buffer
backed by NumPy memory (large allocations get transparent huge pages and no zero fill, ~5× faster
to fill than a fresh ``bytes``), and returns the tensors' own buffer without any copy when they
already live in a frame made by :func:`new_frame` (an aggregate written straight into its frame).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ml_dtypes
import msgpack
import numpy as np
import numpy.typing as npt

from common.errors import CodecError, FrameError, InvalidModelError, ModelMismatchError

Array = npt.NDArray[Any]
Tensors = Mapping[str, Array]
Buffer = bytes | bytearray | memoryview

#: dtype names that may appear on the wire; anything else is a CodecError.
SUPPORTED_DTYPES: tuple[str, ...] = (
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
)

MAGIC = b"FHT1"
#: Every tensor (and the raw area itself) starts at a multiple of this many bytes.
ALIGNMENT = 64
#: Upper bound on the msgpack header, whatever the buffer size.
MAX_HEADER_BYTES = 64 << 20
#: The packed ``meta`` a model frame may carry beyond its spec's index when a receiver bounds
#: the frame's size by the spec (:meth:`ModelSpec.encoded_size_range`).
MAX_META_BYTES = 64 << 10

_PREFIX = struct.Struct("<4sI")
_ZEROS = bytes(ALIGNMENT)
_BFLOAT16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
# bfloat16 has no byte-order variant in ml_dtypes; fedhive only runs on little-endian hosts.
_DTYPES: dict[str, np.dtype[Any]] = {
    name: _BFLOAT16 if name == "bfloat16" else np.dtype(name).newbyteorder("<")
    for name in SUPPORTED_DTYPES
}
_INDEX_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})
_MAX_NDIM = 64  # NumPy's limit
# msgpack limits for the header: generous for metadata, far below anything hostile.
_MAX_STR = 1 << 20
_MAX_BIN = 16 << 20
_MAX_MAP = 1 << 16
_MAX_META_ARRAY = 1 << 16
# check_finite scans in blocks so its boolean temporary stays small.
_FINITE_BLOCK = 1 << 20
#: Elements per BLAS call of the x·x finite check. NumPy holds the GIL for a whole dot product
#: (50M float32: 20 ms alone, over 100 ms on a busy machine): checked in pieces, a large model
#: no longer stalls the event loop of a thread beside it (an aggregator's heartbeats).
_DOT_BLOCK = 1 << 20


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass and is never a size


def _is_shape(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) <= _MAX_NDIM
        and all(_is_int(s) and s >= 0 for s in value)
    )


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_from_name(self.dtype).itemsize

    def describe(self) -> str:
        """``"(10, 10) float32"``: the shape and dtype as error messages show them."""
        return f"{_shape_str(self.shape)} {self.dtype}"


def _spec_of(name: str, array: Array) -> TensorSpec:
    dtype = array.dtype
    try:
        dname = dtype_name(dtype)
    except CodecError:
        dname = str(dtype)
    return TensorSpec(name, dname, tuple(int(s) for s in array.shape))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Names, dtypes and shapes of a model, in order; plus the framework it came from."""

    tensors: tuple[TensorSpec, ...]
    framework: str = "numpy"

    @classmethod
    def from_tensors(cls, tensors: Tensors, framework: str = "numpy") -> ModelSpec:
        specs = []
        for name, value in tensors.items():
            array = np.asarray(value)
            try:
                dname = dtype_name(array.dtype)
            except CodecError as exc:
                raise CodecError(f"tensor {name!r}: {exc}") from None
            specs.append(TensorSpec(name, dname, tuple(int(s) for s in array.shape)))
        return cls(tuple(specs), framework)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def encoded_size_range(self, *, meta_bytes: int = MAX_META_BYTES) -> tuple[int, int]:
        """The smallest and largest length a frame of a model matching this spec can have
        (tensors in any order, at most ``meta_bytes`` of packed meta), so a receiver can refuse
        a declared size that cannot match before it allocates anything."""
        # Offsets are the only header values that depend on the order: count each at the
        # widest msgpack int (9 bytes).
        widest = [
            _Entry(t.name, t.dtype, t.shape, 1 << 63, t.nbytes).to_wire() for t in self.tensors
        ]
        header = len(_pack({"index": widest, "meta": {}}, "header")) + meta_bytes
        raw = sum(t.nbytes for t in self.tensors)
        smallest = _PREFIX.size + raw
        largest = _align(_PREFIX.size + header) + sum(_align(t.nbytes) for t in self.tensors)
        return smallest, largest

    def check(self, tensors: Tensors) -> None:
        """Raise ModelMismatchError naming the first missing/extra/wrong tensor."""
        problems: list[str] = []
        for spec in self.tensors:
            if spec.name not in tensors:
                problems.append(f"missing tensor {spec.name!r} (expected {spec.describe()})")
                continue
            got = _spec_of(spec.name, np.asarray(tensors[spec.name]))
            if got != spec:
                problems.append(
                    f"tensor {spec.name!r}: expected {spec.describe()}, got {got.describe()}"
                )
        known = {spec.name for spec in self.tensors}
        for name, value in tensors.items():
            if name not in known:
                got = _spec_of(name, np.asarray(value))
                problems.append(f"unexpected tensor {name!r} ({got.describe()}) not in the model")
        if problems:
            more = f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""
            raise ModelMismatchError(f"model does not match its spec: {problems[0]}{more}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.tensors
            ],
        }

    @classmethod
    def from_wire(cls, data: Any) -> ModelSpec:
        """Validate and build; raise CodecError on anything malformed."""
        if not isinstance(data, Mapping) or set(data) != {"framework", "tensors"}:
            raise CodecError("model spec must be a map with exactly 'framework' and 'tensors'")
        framework = data["framework"]
        if not isinstance(framework, str) or not framework:
            raise CodecError(f"model spec 'framework' must be a non-empty string: {framework!r}")
        items = data["tensors"]
        if not isinstance(items, list | tuple):
            raise CodecError(f"model spec 'tensors' must be a list, got {type(items).__name__}")
        specs: list[TensorSpec] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or set(item) != {"name", "dtype", "shape"}:
                raise CodecError(
                    f"model spec tensor {i} must be a map with 'name', 'dtype' and 'shape'"
                )
            name, dtype, shape = item["name"], item["dtype"], item["shape"]
            if not isinstance(name, str):
                raise CodecError(f"model spec tensor {i}: name must be a string, got {name!r}")
            if name in seen:
                raise CodecError(f"model spec: duplicate tensor name {name!r}")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise CodecError(f"model spec tensor {name!r}: unsupported dtype {dtype!r}")
            if not _is_shape(shape):
                raise CodecError(
                    f"model spec tensor {name!r}: shape must be a list of non-negative ints, "
                    f"got {shape!r}"
                )
            seen.add(name)
            specs.append(TensorSpec(name, dtype, tuple(shape)))
        return cls(tuple(specs), framework)


#: Wire names of the dtypes seen so far: ``dtype.name`` is a slow property, asked for every
#: tensor of every model sent or received.
_NAMES: dict[Any, str] = {}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire name of ``dtype`` (byte order ignored); CodecError if it cannot travel."""
    try:
        return _NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: not hashable (not a dtype), np.dtype says why
        pass
    dtype = np.dtype(dtype)
    if dtype == _BFLOAT16:
        name = "bfloat16"
    elif dtype.fields is None and dtype.subdtype is None and dtype.name in _DTYPES:
        name = dtype.name
    else:
        raise CodecError(f"dtype {dtype} cannot be sent; supported: {', '.join(SUPPORTED_DTYPES)}")
    if len(_NAMES) < 256:
        _NAMES[dtype] = name
    return name


def dtype_from_name(name: str) -> np.dtype[Any]:
    """The little-endian NumPy dtype for a wire name; CodecError if it is not whitelisted."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CodecError(
            f"unsupported dtype {name!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        ) from None


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    arrays: list[Array]
    entries: list[_Entry]
    header: bytes
    raw_start: int
    size: int


def _pack(obj: Any, what: str) -> bytes:
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"{what} cannot be encoded as msgpack: {exc}") from exc
    return packed


def _unpack(data: Buffer, max_array_len: int) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_str_len=_MAX_STR,
        max_bin_len=_MAX_BIN,
        max_array_len=max_array_len,
        max_map_len=_MAX_MAP,
        max_ext_len=0,
    )


def _plan(tensors: Tensors, meta: Mapping[str, Any] | None) -> _Plan:
    meta_dict = dict(meta or {})
    if not all(isinstance(k, str) for k in meta_dict):
        raise CodecError("meta keys must be strings")
    packed_meta = _pack(meta_dict, "meta")
    try:  # what decode would refuse (non-string keys deeper down, huge items) fails here
        _unpack(packed_meta, _MAX_META_ARRAY)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise CodecError(f"meta would not decode: {exc}") from exc
    arrays: list[Array] = []
    entries: list[_Entry] = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise CodecError(f"tensor names must be strings, got {name!r}")
        array = np.asarray(value)
        try:
            dname = dtype_name(array.dtype)
        except CodecError as exc:
            raise CodecError(f"tensor {name!r}: {exc}") from None
        offset = _align(offset)
        entries.append(_Entry(name, dname, tuple(array.shape), offset, array.nbytes))
        arrays.append(array)
        offset += array.nbytes
    header = _pack({"index": [e.to_wire() for e in entries], "meta": meta_dict}, "header")
    if len(header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    raw_start = _align(_PREFIX.size + len(header))
    return _Plan(arrays, entries, header, raw_start, raw_start + offset)


def encode(tensors: Tensors, meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode named arrays (and msgpack-able ``meta``) into one frame.

    The frame is assembled by one ``bytes.join``: each tensor's memory is copied once, straight
    into the result (non-contiguous or big-endian tensors are first made contiguous and
    little-endian, the only case with a second copy).

    Raises:
        CodecError: a dtype off the whitelist, a non-string name or meta msgpack cannot carry.
    """
    return _join(_plan(tensors, meta))


def _join(plan: _Plan) -> bytes:
    pieces: list[Buffer] = [_PREFIX.pack(MAGIC, len(plan.header)), plan.header]
    position = _PREFIX.size + len(plan.header)
    for array, entry in zip(plan.arrays, plan.entries, strict=True):
        if entry.nbytes == 0:
            continue
        start = plan.raw_start + entry.offset
        pieces.append(_ZEROS[: start - position])
        wire_dtype = _DTYPES[entry.dtype]
        if array.dtype != wire_dtype or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=wire_dtype)
        pieces.append(array.reshape(-1).view(np.uint8).data)
        position = start + entry.nbytes
    pieces.append(_ZEROS[: plan.size - position])
    return b"".join(pieces)


class Segments:
    """A payload made of buffers sent back to back (scatter-gather): the MQTT transport writes
    them with one ``sendmsg`` and never joins them in memory; ``bytes()`` joins them for
    anything that needs one object. The buffers must not change until the message is sent."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, *parts: Buffer) -> None:
        views = tuple(_flat(p) for p in parts)
        self.parts: tuple[memoryview, ...] = tuple(v for v in views if v.nbytes)
        self.nbytes = sum(v.nbytes for v in self.parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


def _flat(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


_B = TypeVar("_B", bytearray, npt.NDArray[np.uint8])


class BufferPool(Generic[_B]):
    """Byte buffers handed out again once nobody uses them any more.

    A buffer nobody but the pool references (a refcount check: the memoryviews and arrays made
    from it, a worker thread copying it, all keep it referenced) is handed out again for the
    same size instead of a new one. A new buffer of tens of MB costs a page fault and a page
    of zeros from the kernel for every 4 KB (2 MB with huge pages) it is first written to:
    glibc maps it anew and unmaps it when it is freed. A federation moves buffers of the same
    few sizes round after round (payloads, uploads, frames, sums): 10 agents × 10M parameters
    spent a third of the aggregator's CPU in the kernel zeroing pages before.

    Sizes from ``min_bytes`` to ``max_bytes`` are pooled, at most ``max_count`` buffers and
    ``max_total`` bytes; buffers are made by ``make(size)`` and kept for the process's life.
    """

    def __init__(
        self,
        make: Callable[[int], _B],
        *,
        min_bytes: int,
        max_bytes: int | None = None,
        max_count: int | None = None,
        max_total: int | None = None,
    ) -> None:
        self._make: Callable[[int], _B] = make
        self._min, self._max = min_bytes, max_bytes
        self._max_count, self._max_total = max_count, max_total
        self._buffers: list[_B] = []
        self._total = 0
        self._lock = threading.Lock()

    def pools(self, size: int) -> bool:
        """Whether buffers of ``size`` bytes are pooled."""
        return self._min <= size and (self._max is None or size <= self._max)

    def take(self, size: int) -> _B:
        """A buffer of ``size`` bytes (old contents, or new): a released one, or a new one."""
        if not self.pools(size):
            return self._make(size)
        with self._lock:
            buffers = self._buffers
            for i in range(len(buffers)):
                # 2: the pool's reference and getrefcount's argument; nobody else has it.
                if len(buffers[i]) == size and sys.getrefcount(buffers[i]) == 2:
                    return buffers[i]
            buffer = self._make(size)
            if (self._max_count is None or len(buffers) < self._max_count) and (
                self._max_total is None or self._total + size <= self._max_total
            ):
                buffers.append(buffer)
                self._total += size
            return buffer


#: NumPy byte buffers of 2–256 MiB (frames, reassembly buffers, sums), at most 1 GiB a process.
#: Smaller ones come cheap from malloc; a larger one (a 1 GB model) is not kept.
_POOL = BufferPool(
    lambda size: np.empty(size, dtype=np.uint8),
    min_bytes=2 << 20,
    max_bytes=256 << 20,
    max_total=1 << 30,
)


def new_raw(size: int) -> npt.NDArray[np.uint8]:
    """An uninitialised, writable uint8 array of ``size`` bytes: one of the pooled buffers that
    nobody references any more, or a new one (see :class:`BufferPool`). Its old contents
    are still there: write every byte before reading."""
    return _POOL.take(size)


def new_zeros(shape: tuple[int, ...], dtype: npt.DTypeLike) -> Array:
    """``np.zeros(shape, dtype)``, in a pooled buffer (:func:`new_raw`) when its size is pooled:
    a new round's sums reuse the last round's pages. A larger one stays ``np.zeros``, whose
    pages cost nothing until written (FedAvg over 2 agents with a 1 GB model never writes its
    2 GB of sums)."""
    wide = np.dtype(dtype)
    size = math.prod(shape) * wide.itemsize
    if not _POOL.pools(size):
        return np.zeros(shape, dtype=wide)
    out = new_raw(size).view(wide).reshape(shape)
    out.fill(0)
    return out


def new_buffer(size: int) -> memoryview:
    """An uninitialised, writable byte buffer of ``size`` bytes in NumPy memory (huge pages for
    large sizes, no zero fill, pooled: :func:`new_raw`): what frames and reassembly buffers
    are made of."""
    return new_raw(size).data


#: madvise(2) advice (Linux 5.14 and later): fault a range in, writable, leaving its bytes as
#: they are. Python 3.11's mmap module does not name it.
_MADV_POPULATE_WRITE = 23
#: Buffers at least this large are worth faulting in ahead of their first writes.
PREFAULT_BYTES = 16 << 20
#: Bytes faulted in per madvise call: the kernel holds the process's memory-map lock for a
#: call, and a thread that maps memory meanwhile (any large malloc) waits for it.
PREFAULT_STEP = 2 << 20


def _find_madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # CDLL: the GIL is released during calls
        madvise = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - not a Unix libc
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _find_madvise() if sys.platform == "linux" else None
_prefaulter: ThreadPoolExecutor | None = None
_prefaulter_lock = threading.Lock()


def _populate(array: npt.NDArray[np.uint8]) -> bool:
    """Fault in the whole pages of ``array``, PREFAULT_STEP bytes at a time (False: the kernel
    cannot)."""
    assert _madvise is not None
    page = mmap.PAGESIZE
    start = -(-array.ctypes.data // page) * page
    end = (array.ctypes.data + array.nbytes) // page * page
    for at in range(start, end, PREFAULT_STEP):
        if _madvise(at, min(PREFAULT_STEP, end - at), _MADV_POPULATE_WRITE) != 0:
            return False
    return True


def prefault(array: npt.NDArray[np.uint8]) -> Future[bool] | None:
    """Start faulting in the pages of a large buffer in a background thread, so that whoever
    writes it first (a reassembler storing chunks on the event loop) does not stop for it.

    The first write to memory a process has not used before costs far more than the copy: on
    this project's 2-core VM, 4 ms per MiB (against 0.2 ms per MiB into pages already there;
    likely the hypervisor backing guest memory on first touch), so a new 200 MB reassembly
    buffer held the event loop ~5 ms per chunk. MADV_POPULATE_WRITE does not change the bytes,
    so chunks may be stored while it runs; pages already there cost nothing. None for small
    buffers and where libc has no madvise; the future's result is False where the kernel does
    not know the advice (before Linux 5.14)."""
    global _prefaulter
    if _madvise is None or array.nbytes < PREFAULT_BYTES:
        return None
    with _prefaulter_lock:
        if _prefaulter is None:
            _prefaulter = ThreadPoolExecutor(1, thread_name_prefix="fedhive-prefault")
    return _prefaulter.submit(_populate, array)


def _frame_plan(specs: list[tuple[str, str, tuple[int, ...]]], meta: Mapping[str, Any]) -> _Plan:
    arrays = [np.empty(0, dtype=_DTYPES[dtype]) for _, dtype, _ in specs]
    entries: list[_Entry] = []
    offset = 0
    for name, dtype, shape in specs:
        offset = _align(offset)
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        entries.append(_Entry(name, dtype, shape, offset, nbytes))
        offset += nbytes
    header = _pack({"index": [e.to_wire() for e in entries], "meta": dict(meta)}, "header")
    raw_start = _align(_PREFIX.size + len(header))
    return _Plan(arrays, entries, header, raw_start, raw_start + offset)


def new_frame(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], meta: Mapping[str, Any] | None = None
) -> tuple[memoryview, dict[str, Array]]:
    """An encoded frame whose tensors are still to be written: the buffer and a writable view
    per tensor (name, wire dtype name, shape). Whatever is written into the views is what
    :func:`decode` reads back; :func:`encode_frame` of the views returns this buffer as is."""
    specs = [(name, dtype_name(dtype_from_name(dt)), tuple(shape)) for name, dt, shape in tensors]
    plan = _frame_plan(specs, meta or {})
    if len(plan.header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(plan.header)} bytes exceeds {MAX_HEADER_BYTES}")
    raw = new_raw(plan.size)
    head = _PREFIX.pack(MAGIC, len(plan.header)) + plan.header
    raw[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    raw[len(head) : plan.raw_start] = 0
    views: dict[str, Array] = {}
    position = plan.raw_start
    for entry in plan.entries:
        start = plan.raw_start + entry.offset
        raw[position:start] = 0  # alignment padding
        dtype = _DTYPES[entry.dtype]
        views[entry.name] = raw[start : start + entry.nbytes].view(dtype).reshape(entry.shape)
        position = start + entry.nbytes
    raw[position:] = 0
    return raw.data, views


def _frame_root(array: Array) -> Array | None:
    """The 1-D uint8 array at the bottom of ``array``'s chain of views, if there is one."""
    base: Any = array
    while True:
        if isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        elif isinstance(base, memoryview):  # decode()'s views: arrays over a memoryview
            base = base.obj
        else:
            break
    if isinstance(base, np.ndarray) and base.dtype == np.uint8 and base.ndim == 1:
        return base
    return None


def _as_frame(plan: _Plan) -> memoryview | None:
    """The buffer the planned tensors already form a frame in (see new_frame), or None."""
    if not plan.arrays:
        return None
    root = _frame_root(plan.arrays[0])
    if root is None or root.shape[0] != plan.size or not root.flags.c_contiguous:
        return None
    address = root.__array_interface__["data"][0]
    for array, entry in zip(plan.arrays, plan.entries, strict=True):
        if entry.nbytes and (
            _frame_root(array) is not root
            or not array.flags.c_contiguous
            or array.dtype != _DTYPES[entry.dtype]
            or array.__array_interface__["data"][0] != address + plan.raw_start + entry.offset
        ):
            return None
    head = _PREFIX.pack(MAGIC, len(plan.header)) + plan.header
    if root[: len(head)].tobytes() != head:
        return None
    return root.data


def frame_of(tensors: Tensors, meta: Mapping[str, Any] | None = None) -> memoryview | None:
    """The buffer ``tensors`` already form a frame in, laid out exactly as :func:`encode_frame`
    would lay them out (with ``meta``), or None."""
    return _as_frame(_plan(tensors, meta))


def encode_frame(
    tensors: Tensors, meta: Mapping[str, Any] | None = None, *, bytes_up_to: int = 0
) -> Buffer:
    """:func:`encode` into a NumPy-backed buffer (fast to fill); no copy at all when the
    tensors are the views of a :func:`new_frame` laid out as this frame would be. A frame of
    at most ``bytes_up_to`` bytes comes as :func:`encode`'s ``bytes`` instead: what a message
    carries inline, which would otherwise copy the buffer into bytes once more.

    Raises:
        CodecError: as :func:`encode`.
    """
    plan = _plan(tensors, meta)
    same = _as_frame(plan)
    if same is not None:
        return same
    if plan.size <= bytes_up_to:
        return _join(plan)
    raw = new_raw(plan.size)
    head = _PREFIX.pack(MAGIC, len(plan.header)) + plan.header
    raw[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    position = len(head)
    for array, entry in zip(plan.arrays, plan.entries, strict=True):
        start = plan.raw_start + entry.offset
        raw[position:start] = 0
        if entry.nbytes:
            target = raw[start : start + entry.nbytes].view(_DTYPES[entry.dtype])
            np.copyto(target.reshape(array.shape), array, casting="unsafe")
        position = start + entry.nbytes
    raw[position:] = 0
    return raw.data


def encoded_size(tensors: Tensors, meta: Mapping[str, Any] | None = None) -> int:
    """The exact length of ``encode(tensors, meta)``, without copying any tensor."""
    return _plan(tensors, meta).size


def _byte_view(buf: Buffer) -> memoryview:
    try:
        view = memoryview(buf)
    except TypeError:
        raise FrameError(f"expected a bytes-like frame, got {type(buf).__name__}") from None
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise FrameError("frame buffer is not contiguous")
    return view.cast("B")


def _parse_header(view: memoryview, header_len: int, max_tensors: int) -> tuple[list[Any], Any]:
    try:
        header = _unpack(
            view[_PREFIX.size : _PREFIX.size + header_len], max(max_tensors, _MAX_META_ARRAY)
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"index", "meta"}:
        raise FrameError("header must be a map with exactly 'index' and 'meta'")
    index, meta = header["index"], header["meta"]
    if not isinstance(index, list):
        raise FrameError(f"header 'index' must be a list, got {type(index).__name__}")
    if not isinstance(meta, dict):
        raise FrameError(f"header 'meta' must be a map, got {type(meta).__name__}")
    if len(index) > max_tensors:
        raise FrameError(f"frame declares {len(index)} tensors, more than the {max_tensors} limit")
    return index, meta


def _parse_entry(i: int, item: Any, raw_len: int) -> _Entry:
    if not isinstance(item, dict) or set(item) != _INDEX_KEYS:
        raise FrameError(
            f"index entry {i} must be a map with exactly {', '.join(sorted(_INDEX_KEYS))}"
        )
    name = item["name"]
    if not isinstance(name, str):
        raise FrameError(f"index entry {i}: name must be a string, got {name!r}")
    dtype, shape, offset, nbytes = item["dtype"], item["shape"], item["offset"], item["nbytes"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise FrameError(f"tensor {name!r}: unsupported dtype {dtype!r}")
    if not _is_shape(shape):
        raise FrameError(
            f"tensor {name!r}: shape must be a list of at most {_MAX_NDIM} non-negative ints, "
            f"got {shape!r}"
        )
    for key, value in (("offset", offset), ("nbytes", nbytes)):
        if not _is_int(value) or value < 0:
            raise FrameError(f"tensor {name!r}: {key} must be a non-negative int, got {value!r}")
    shape_t = tuple(shape)
    needed = math.prod(shape_t) * _DTYPES[dtype].itemsize
    if nbytes != needed:
        raise FrameError(
            f"tensor {name!r}: declared {nbytes} bytes but shape {_shape_str(shape_t)} {dtype} "
            f"needs {needed}"
        )
    if offset % ALIGNMENT:
        raise FrameError(f"tensor {name!r}: offset {offset} is not {ALIGNMENT}-byte aligned")
    if offset + nbytes > raw_len:
        raise FrameError(
            f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie beyond the "
            f"{raw_len}-byte raw area (frame truncated?)"
        )
    return _Entry(name, dtype, shape_t, offset, nbytes)


def _check_layout(entries: list[_Entry]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise FrameError(f"duplicate tensor name {entry.name!r}")
        seen.add(entry.name)
    previous: _Entry | None = None
    for entry in sorted((e for e in entries if e.nbytes), key=lambda e: e.offset):
        if previous is not None and entry.offset < previous.offset + previous.nbytes:
            raise FrameError(f"tensors {previous.name!r} and {entry.name!r} overlap")
        previous = entry


def decode(buf: Buffer, *, max_tensors: int = 100_000) -> tuple[dict[str, Array], dict[str, Any]]:
    """Return (tensors, meta); raise FrameError/CodecError on any malformed input.

    The arrays are views into ``buf`` (read-only for ``bytes``, writable for ``bytearray``);
    keep ``buf`` unchanged while they are in use.
    """
    view = _byte_view(buf)
    size = view.nbytes
    if size < _PREFIX.size:
        raise FrameError(f"frame of {size} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if header_len > size - _PREFIX.size:
        raise FrameError(
            f"header length {header_len} exceeds the {size - _PREFIX.size} bytes after the prefix"
        )
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES} limit")
    raw_start = _align(_PREFIX.size + header_len)
    if raw_start > size:
        raise FrameError(f"frame of {size} bytes ends before its raw area at {raw_start}")
    index, meta = _parse_header(view, header_len, max_tensors)
    entries = [_parse_entry(i, item, size - raw_start) for i, item in enumerate(index)]
    _check_layout(entries)
    tensors: dict[str, Array] = {}
    for entry in entries:
        dtype = _DTYPES[entry.dtype]
        array = np.frombuffer(
            view, dtype=dtype, count=entry.nbytes // dtype.itemsize, offset=raw_start + entry.offset
        ).reshape(entry.shape)
        if entry.dtype == "bool" and entry.nbytes and array.view(np.uint8).max() > 1:
            raise FrameError(f"tensor {entry.name!r}: bool bytes other than 0 and 1")
        tensors[entry.name] = array
    return tensors, meta


def _squares_finite(flat: Array) -> bool:
    """Whether x·x is finite for each block of the 1-D float32/float64 ``flat``: true iff every
    element is, unless the squares overflow. BLAS reads x at memory speed and allocates
    nothing; blocks of :data:`_DOT_BLOCK` let other threads have the GIL in between."""
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, flat.shape[0], _DOT_BLOCK):
            block = flat[start : start + _DOT_BLOCK]
            if not np.isfinite(np.dot(block, block)):
                return False
    return True


def all_finite(array: Array) -> bool:
    """True when no element of ``array`` is NaN or ±Inf (integers always are)."""
    return array.dtype.kind in "iub" or _first_non_finite(array) is None


def _first_non_finite(array: Array) -> tuple[int, Any] | None:
    flat = array.reshape(-1)
    if flat.dtype in (np.float32, np.float64) and _squares_finite(flat):
        return None
    for start in range(0, flat.shape[0], _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        finite = np.isfinite(block)
        if not finite.all():
            i = int(np.argmin(finite))
            return start + i, block[i]
    return None


def check_finite(tensors: Tensors) -> None:
    """Raise InvalidModelError naming the first float tensor with NaN or Inf."""
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fc" and array.dtype != _BFLOAT16:
            continue
        found = _first_non_finite(array)
        if found is not None:
            flat_index, bad = found
            where = tuple(int(i) for i in np.unravel_index(flat_index, array.shape))
            raise InvalidModelError(
                f"tensor {name!r} has a non-finite value ({bad}) at index {_shape_str(where)}"
            )
