"""Keras 3 adapter (TensorFlow backend or any other): ``model.weights`` <-> NumPy arrays.

Tensor names are the variables' Keras 3 paths (``Variable.path``), made independent of the
process that built the model, so every instance of one architecture names its tensors alike:

* the model's own name is dropped where Keras puts it in front (``sequential/dense/kernel`` →
  ``dense/kernel``; a functional model or a ``copy.deepcopy`` of a model has no such prefix);
* Keras's automatic per-process name counters are undone: under one parent, the layers whose
  names differ only in a ``_<n>`` suffix are numbered again in the order of the model's
  weights (``dense_4``, ``dense_7`` → ``dense``, ``dense_1``), as a fresh process would name them.

So the admin's base model, an agent's model and the copy :class:`~agent.client.BasicClient`
hands out agree on every name, whatever else the process built before. ``model.weights`` holds
the trainable and non-trainable weights (BatchNorm moving statistics included), not optimizer
or metric state, nor random-seed state. Dtypes are kept: each array travels in its
variable's dtype and loads back into it.

Imported only when a Keras model is used, so fedhive runs without TensorFlow installed.
"""

from __future__ import annotations

import re
from typing import Any

import keras
import ml_dtypes
import numpy as np

from common.adapters._checks import check_names, check_tensor
from common.codec import Array, Tensors, dtype_name
from common.errors import CodecError, InvalidModelError

_COUNTER = re.compile(r"_\d+$")


def _variables(model: Any) -> list[Any]:
    if not isinstance(model, keras.layers.Layer):
        raise InvalidModelError(f"expected a Keras model or layer, got {type(model).__name__}")
    weights = list(model.weights)
    if not weights:
        raise InvalidModelError(
            f"Keras model {model.name!r} has no weights yet: build it first "
            "(give it an Input, or call it once on data)"
        )
    return weights


def tensor_names(model: Any) -> list[str]:
    """The process-independent tensor name of every weight of ``model``, in its order."""
    return _canonical_paths(model.name, [str(v.path) for v in _variables(model)])


def _canonical_paths(model_name: str, paths: list[str]) -> list[str]:
    prefix = f"{model_name}/"
    if paths and all(p.startswith(prefix) for p in paths):
        paths = [p[len(prefix) :] for p in paths]
    # (canonical parent, raw segment) -> canonical segment; per canonical parent and base name,
    # how many raw segments took that base so far.
    renamed: dict[tuple[str, str], str] = {}
    taken: dict[tuple[str, str], int] = {}
    out: list[str] = []
    for path in paths:
        parent = ""
        for segment in path.split("/"):
            key = (parent, segment)
            if key not in renamed:
                base = _COUNTER.sub("", segment) or segment
                n = taken.get((parent, base), 0)
                taken[(parent, base)] = n + 1
                renamed[key] = base if n == 0 else f"{base}_{n}"
            parent = f"{parent}/{renamed[key]}" if parent else renamed[key]
        out.append(parent)
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        raise InvalidModelError(f"Keras variables share the path(s) {dup}: name their layers")
    return out


def _numpy_dtype(variable: Any) -> np.dtype[Any]:
    name = str(variable.dtype)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class KerasAdapter:
    """A Keras 3 model (``keras.Model`` or any built ``keras.layers.Layer``)."""

    framework: str = "keras"

    def to_numpy(self, model: Any) -> dict[str, Array]:
        """Every weight as a contiguous copy in its own dtype, named as the module says."""
        variables = _variables(model)
        names = _canonical_paths(model.name, [str(v.path) for v in variables])
        out: dict[str, Array] = {}
        for name, variable in zip(names, variables, strict=True):
            # Variable.numpy(), not np.asarray(variable): TF's __array__ predates NumPy 2's
            # copy keyword and warns.
            array = np.array(variable.numpy(), dtype=_numpy_dtype(variable), order="C", copy=True)
            try:
                dtype_name(array.dtype)
            except CodecError as exc:
                raise CodecError(f"tensor {name!r}: {exc}") from None
            out[name] = array
        return out

    def load_numpy(self, model: Any, tensors: Tensors) -> Any:
        """Assign ``tensors`` to the model's weights in place and return the model.

        Each array is cast to its variable's dtype (float precisions may differ, other dtypes
        must match). Raises ModelMismatchError, before anything is assigned, on missing or
        unexpected names, a shape or a dtype kind that does not fit.
        """
        variables = _variables(model)
        names = _canonical_paths(model.name, [str(v.path) for v in variables])
        check_names(names, tensors)
        for name, variable in zip(names, variables, strict=True):
            check_tensor(
                name,
                tuple(int(s) for s in variable.shape),
                dtype_name(_numpy_dtype(variable)),
                np.asarray(tensors[name]),
            )
        for name, variable in zip(names, variables, strict=True):
            variable.assign(np.asarray(tensors[name], dtype=_numpy_dtype(variable)))
        return model
