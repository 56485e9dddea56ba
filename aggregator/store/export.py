"""Stored models (our codec frames) as files other tools read.

* ``pytorch``: a ``state_dict`` of plain tensors saved with ``torch.save``; read it with
  ``torch.load(path, weights_only=True)`` and ``model.load_state_dict(...)``. bfloat16 stays
  bfloat16.
* ``npz``: named arrays (``np.load(path)``, no pickle); bfloat16, which has no ``.npy`` type,
  is widened to float32 (exactly).
* ``keras``: the same npz, keyed by variable path in the model's order. A Keras
  ``.weights.h5`` file encodes the model's layer structure, which the aggregator never sees;
  load this one with ``model.set_weights([f[k] for k in f.files])``.
* ``msgpack``: the stored frame itself (``common.codec.decode`` reads it).

Every file is written to a temporary name next to the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import ml_dtypes
import numpy as np

from aggregator.store.errors import StoreError
from common.codec import Array, Buffer, decode

if TYPE_CHECKING:
    import torch

ExportFormat = Literal["pytorch", "keras", "npz", "msgpack"]
FORMATS: tuple[ExportFormat, ...] = ("pytorch", "keras", "npz", "msgpack")
#: The file name ending each format is usually given.
SUFFIXES: dict[ExportFormat, str] = {
    "pytorch": ".pt",
    "keras": ".keras.npz",
    "npz": ".npz",
    "msgpack": ".msgpack",
}

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def npz_arrays(tensors: Mapping[str, Array]) -> dict[str, Array]:
    """The arrays as ``.npy`` can hold them: bfloat16 widened to float32."""
    return {
        name: np.asarray(a, dtype=np.float32) if a.dtype == _BFLOAT16 else np.asarray(a)
        for name, a in tensors.items()
    }


def write_npz(tensors: Mapping[str, Array], out: IO[bytes]) -> None:
    """``np.savez`` without its keyword clashes: any tensor name is a member name."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in npz_arrays(tensors).items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def torch_state_dict(tensors: Mapping[str, Array]) -> dict[str, torch.Tensor]:
    """Plain CPU tensors (owning their memory) by name, in the model's order."""
    import torch

    state: dict[str, torch.Tensor] = {}
    for name, array in tensors.items():
        if array.dtype == _BFLOAT16:
            state[name] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(np.array(array, copy=True, order="C"))
    return state


def export_model(payload: Buffer, fmt: str, path: Path) -> Path:
    """Write the stored frame ``payload`` to ``path`` in format ``fmt``; returns ``path``.

    Raises:
        StoreError: an unknown format, or PyTorch missing for ``pytorch``.
        CodecError: the payload is not a valid frame.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "msgpack":
        with _atomic(path) as out:
            out.write(payload)
        return path
    tensors, _meta = decode(payload)
    if fmt == "pytorch":
        try:
            import torch
        except ModuleNotFoundError as exc:
            raise StoreError("the pytorch format needs PyTorch: pip install torch") from exc
        state = torch_state_dict(tensors)
        with _atomic(path) as out:
            torch.save(state, out)
        return path
    with _atomic(path) as out:
        write_npz(tensors, out)
    return path


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[IO[Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
