"""Checks shared by the adapters before anything is loaded into a model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from common.codec import Array, dtype_name
from common.errors import CodecError, ModelMismatchError

#: dtypes that may be cast into one another on load (precision changes, never kind changes).
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
_SHOWN = 5


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


def check_names(model_names: Iterable[str], tensors: Mapping[str, Any]) -> None:
    """ModelMismatchError naming missing and unexpected tensors, if any."""
    expected = list(model_names)
    known = set(expected)
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in known]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if extra:
        problems.append(f"unexpected {_listed(extra)}")
    if problems:
        raise ModelMismatchError(f"tensors do not match the model: {'; '.join(problems)}")


def check_tensor(name: str, shape: tuple[int, ...], dtype: str, array: Array) -> None:
    """ModelMismatchError unless ``array`` fits a model tensor of ``shape`` and ``dtype``."""
    try:
        got = dtype_name(array.dtype)
    except CodecError:
        got = str(array.dtype)
    got_shape = tuple(int(s) for s in array.shape)
    if got_shape != shape:
        raise ModelMismatchError(
            f"tensor {name!r}: the model has shape {shape} {dtype}, got {got_shape} {got}"
        )
    if got != dtype and not (got in FLOAT_DTYPES and dtype in FLOAT_DTYPES):
        raise ModelMismatchError(f"tensor {name!r}: the model has dtype {dtype}, got {got}")
