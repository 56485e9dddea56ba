"""PyTorch adapter: the whole ``state_dict()`` (parameters and buffers) <-> NumPy arrays.

Imported only when a PyTorch model is used, so fedhive runs without torch installed.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_dtypes
import numpy as np
import torch

from common.adapters._checks import check_names, check_tensor
from common.codec import Array, Tensors
from common.errors import CodecError, InvalidModelError

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_WIRE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.complex64: "complex64",
    torch.complex128: "complex128",
}
for _name in ("uint16", "uint32", "uint64"):  # torch >= 2.3
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _WIRE_NAMES[getattr(torch, _name)] = _name


def _wire_name(name: str, tensor: torch.Tensor) -> str:
    try:
        return _WIRE_NAMES[tensor.dtype]
    except KeyError:
        raise CodecError(f"tensor {name!r}: torch dtype {tensor.dtype} cannot be sent") from None


def _state(model: Any) -> dict[str, torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise InvalidModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidModelError(
                f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor"
            )
    return dict(state)


def _to_array(name: str, tensor: torch.Tensor) -> Array:
    _wire_name(name, tensor)  # the codec's whitelist: fail here, not at encode
    if tensor.layout != torch.strided:
        raise CodecError(f"tensor {name!r}: {tensor.layout} tensors cannot be sent")
    t = tensor.detach().resolve_conj().resolve_neg()
    on_cpu = t.device.type == "cpu"
    if not on_cpu:
        t = t.cpu()  # already a copy
    # bfloat16 has no NumPy dtype in torch: move its bit pattern through int16.
    is_bf16 = t.dtype == torch.bfloat16
    array = t.view(torch.int16).numpy().view(_BFLOAT16) if is_bf16 else t.numpy()
    # On the CPU .numpy() shares the parameter's memory: copy so the snapshot stays put.
    return np.array(array, order="C", copy=True if on_cpu else None)


def _to_tensor(array: Array, like: torch.Tensor) -> torch.Tensor:
    if not array.flags.c_contiguous or not array.dtype.isnative:
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    is_bf16 = array.dtype == _BFLOAT16
    source = array.view(np.int16) if is_bf16 else array
    with warnings.catch_warnings():
        # Decoded arrays over a bytes frame are read-only; the tensor is only read by
        # load_state_dict (copied into the parameter), never written.
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )
        tensor = torch.from_numpy(source)
    if is_bf16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(device=like.device, dtype=like.dtype)


class TorchAdapter:
    """A ``torch.nn.Module``, through its whole ``state_dict()``."""

    framework: str = "pytorch"

    def to_numpy(self, model: torch.nn.Module) -> dict[str, Array]:
        """Every state_dict entry (buffers included) as a detached contiguous CPU copy."""
        return {name: _to_array(name, t) for name, t in _state(model).items()}

    def load_numpy(self, model: torch.nn.Module, tensors: Tensors) -> torch.nn.Module:
        """Load ``tensors`` into ``model`` in place (``load_state_dict(strict=True)``).

        Each array becomes a tensor of the model's own dtype and device; float precisions may
        differ, other dtypes must match. Raises ModelMismatchError, before anything is loaded,
        on missing or unexpected names, a shape or a dtype kind that does not fit.
        """
        state = _state(model)
        check_names(state, tensors)
        for name, target in state.items():
            check_tensor(
                name, tuple(target.shape), _wire_name(name, target), np.asarray(tensors[name])
            )
        new_state = {
            name: _to_tensor(np.asarray(tensors[name]), target) for name, target in state.items()
        }
        model.load_state_dict(new_state, strict=True)
        return model
