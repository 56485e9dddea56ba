"""NumPy adapter: a model is a ``dict[str, np.ndarray]``."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np

from common.adapters._checks import check_names, check_tensor
from common.codec import Array, Tensors, dtype_name
from common.errors import CodecError, InvalidModelError


def _arrays(model: Any) -> Mapping[str, Array]:
    if not isinstance(model, Mapping):
        raise InvalidModelError(f"a NumPy model is a dict of arrays, got {type(model).__name__}")
    for name, value in model.items():
        if not isinstance(name, str) or not isinstance(value, np.ndarray):
            raise InvalidModelError(
                f"a NumPy model maps names to arrays; entry {name!r} is a {type(value).__name__}"
            )
    return model


class NumpyAdapter:
    """The model is a mutable mapping of names to arrays."""

    framework: str = "numpy"

    def to_numpy(self, model: Mapping[str, Array]) -> dict[str, Array]:
        """Contiguous copies of every array (a snapshot: later training does not change it)."""
        out: dict[str, Array] = {}
        for name, value in _arrays(model).items():
            try:
                dtype_name(value.dtype)
            except CodecError as exc:
                raise CodecError(f"tensor {name!r}: {exc}") from None
            out[name] = np.array(value, order="C", copy=True)
        return out

    def load_numpy(
        self, model: MutableMapping[str, Array], tensors: Tensors
    ) -> MutableMapping[str, Array]:
        """Replace every entry of ``model`` with a copy of ``tensors[name]`` in its own dtype.

        Copies, because decoded arrays are views into a receive buffer. Raises
        ModelMismatchError (nothing changed) on missing/extra names, shapes or dtype kinds.
        """
        current = _arrays(model)
        check_names(current, tensors)
        for name, value in current.items():
            check_tensor(
                name, tuple(int(s) for s in value.shape), dtype_name(value.dtype), tensors[name]
            )
        for name in list(current):
            model[name] = np.array(tensors[name], dtype=model[name].dtype, order="C", copy=True)
        return model
