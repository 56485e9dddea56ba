"""Framework adapters: a model of some framework <-> named NumPy arrays.

Every adapter exposes the whole model state (PyTorch: parameters *and* buffers; Keras: trainable
and non-trainable weights) as
``dict[str, np.ndarray]`` for :mod:`common.codec`, and loads such a dict back in place.
Framework modules are imported only when an adapter for them is asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from common.codec import Array, Tensors
from common.errors import ConfigError, InvalidModelError


@runtime_checkable
class FrameworkAdapter(Protocol):
    """Converts one framework's models to and from named NumPy arrays."""

    #: The canonical model_format name ("pytorch", "keras", "numpy").
    framework: str

    def to_numpy(self, model: Any) -> dict[str, Array]:
        """The model's whole state as contiguous CPU arrays, in the model's order."""
        ...

    def load_numpy(self, model: Any, tensors: Tensors) -> Any:
        """Load ``tensors`` into ``model`` in place and return it; ModelMismatchError if unfit."""
        ...


_ALIASES = {
    "pytorch": "pytorch",
    "torch": "pytorch",
    "numpy": "numpy",
    "np": "numpy",
    "keras": "keras",
    "tf": "keras",
    "tensorflow": "keras",
}
#: The canonical model_format names that have an adapter today.
FRAMEWORKS: tuple[str, ...] = ("keras", "numpy", "pytorch")


def canonical_framework(name: str) -> str:
    """The canonical name of a model_format spelling (case-insensitive); ConfigError if unknown."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ConfigError(f"unknown model format {name!r}; known: {', '.join(sorted(_ALIASES))}")
    return _ALIASES[key]


def get_adapter(name: str) -> FrameworkAdapter:
    """The adapter for a model_format name ("pytorch", "torch", "keras", "tf", "numpy"...)."""
    framework = canonical_framework(name)
    if framework == "numpy":
        from common.adapters.numpy_adapter import NumpyAdapter

        return NumpyAdapter()
    if framework == "pytorch":
        try:
            from common.adapters.torch_adapter import TorchAdapter
        except ModuleNotFoundError as exc:
            if exc.name != "torch":
                raise
            raise ConfigError(
                f"model format {name!r} needs PyTorch: pip install 'fedhive[torch]'"
            ) from exc
        return TorchAdapter()
    try:
        from common.adapters.keras_adapter import KerasAdapter
    except ModuleNotFoundError as exc:
        if exc.name not in ("keras", "tensorflow"):
            raise
        raise ConfigError(
            f"model format {name!r} needs Keras 3 with TensorFlow: "
            "pip install 'fedhive[tensorflow]'"
        ) from exc
    return KerasAdapter()


def adapter_for(model: Any) -> FrameworkAdapter:
    """The adapter for ``model`` by its type; InvalidModelError if no adapter fits."""
    if isinstance(model, Mapping):
        return get_adapter("numpy")
    torch = sys.modules.get("torch")  # a torch model implies torch is already imported
    if torch is not None and isinstance(model, torch.nn.Module):
        return get_adapter("pytorch")
    keras = sys.modules.get("keras")  # likewise for Keras (tf.keras is Keras 3 itself)
    if keras is not None and isinstance(model, keras.layers.Layer):
        return get_adapter("keras")
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    raise InvalidModelError(
        f"no adapter for a {kind}; expected a torch.nn.Module, a Keras model or a dict of "
        "NumPy arrays"
    )


__all__ = ["FRAMEWORKS", "FrameworkAdapter", "adapter_for", "canonical_framework", "get_adapter"]
