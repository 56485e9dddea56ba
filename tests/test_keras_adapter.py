"""The Keras 3 adapter: names by variable path, round trips through the codec, dtypes kept."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras", reason="TensorFlow/Keras 3 is not installed")
pytest.importorskip("tensorflow", reason="TensorFlow is not installed")

from common.adapters import FrameworkAdapter, adapter_for, canonical_framework, get_adapter  # noqa: E402
from common.adapters.keras_adapter import KerasAdapter, tensor_names  # noqa: E402
from common.codec import Array, decode, encode  # noqa: E402
from common.config import BaseModelSettings  # noqa: E402
from common.errors import InvalidModelError, ModelMismatchError  # noqa: E402

pytestmark = [
    # copy.deepcopy of a Keras model saves it to an in-memory .h5 file, where Keras calls
    # np.array() on a TensorFlow variable whose __array__ predates NumPy 2's copy keyword.
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
]

REPO = Path(__file__).resolve().parents[1]


def small_cnn(dense_dtype: str = "float32") -> Any:
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, dtype=dense_dtype),
        ]
    )


def trained(model: Any, seed: int) -> Any:
    """Moves every weight, the BatchNorm moving statistics included."""
    rng = np.random.default_rng(seed)
    model.compile(optimizer="sgd", loss="mse")
    x = rng.normal(size=(8, 6, 6, 1)).astype(np.float32)
    y = rng.normal(size=(8, 3)).astype(np.float32)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    return model


def weights(model: Any) -> list[Array]:
    return [np.asarray(v.numpy()) for v in model.weights]


def through_the_wire(tensors: dict[str, Array]) -> dict[str, Array]:
    return decode(encode(tensors))[0]


@pytest.mark.parametrize("name", ["keras", "Keras", "tf", "tensorflow", "TensorFlow"])
def test_model_format_spellings_give_the_keras_adapter(name: str) -> None:
    adapter = get_adapter(name)
    assert isinstance(adapter, KerasAdapter)
    assert isinstance(adapter, FrameworkAdapter)
    assert adapter.framework == canonical_framework(name) == "keras"
    assert get_adapter(BaseModelSettings(model_format=name).model_format).framework == "keras"


def test_adapter_for_recognises_keras_models() -> None:
    assert adapter_for(small_cnn()).framework == "keras"
    assert adapter_for(keras.layers.Dense(2)).framework == "keras"


def test_round_trip_through_the_codec_into_a_second_instance() -> None:
    # Prepare: two instances of one architecture, different weights
    source, target = trained(small_cnn(), 1), trained(small_cnn(), 2)
    adapter = get_adapter("keras")

    # Execute
    tensors = through_the_wire(adapter.to_numpy(source))
    returned = adapter.load_numpy(target, tensors)

    # Assert: every weight (moving statistics too) arrived, in its dtype; names are paths
    assert returned is target
    assert list(tensors) == [
        "conv2d/kernel",
        "conv2d/bias",
        "batch_normalization/gamma",
        "batch_normalization/beta",
        "batch_normalization/moving_mean",
        "batch_normalization/moving_variance",
        "dense/kernel",
        "dense/bias",
    ]
    for got, want in zip(weights(target), weights(source), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert not np.allclose(weights(source)[4], 0.0), "the moving mean moved"


def test_names_do_not_depend_on_what_the_process_built_before() -> None:
    # Prepare: Keras numbers automatic names per process (sequential_3/dense_7/...)
    first, second = small_cnn(), small_cnn()
    inputs = keras.Input((4,))
    inner = keras.Sequential([keras.layers.Dense(2), keras.layers.Dense(2)])
    functional = keras.Model(inputs, keras.layers.Dense(1)(inner(inputs)))

    # Execute / Assert: the same names for both instances, for a deepcopy, and nested paths
    assert [v.path for v in first.weights] != [v.path for v in second.weights]
    assert tensor_names(first) == tensor_names(second) == tensor_names(copy.deepcopy(second))
    assert tensor_names(functional) == [
        "sequential/dense/kernel",
        "sequential/dense/bias",
        "sequential/dense_1/kernel",
        "sequential/dense_1/bias",
        "dense/kernel",
        "dense/bias",
    ]


def test_dtypes_are_kept_float64_and_bfloat16() -> None:
    # Prepare
    adapter = get_adapter("keras")
    source = small_cnn(dense_dtype="float64")
    half = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16")])

    # Execute
    tensors = through_the_wire(adapter.to_numpy(source))
    half_tensors = through_the_wire(adapter.to_numpy(half))
    adapter.load_numpy(half, {k: np.asarray(v) + 1 for k, v in half_tensors.items()})

    # Assert
    assert tensors["dense/kernel"].dtype == np.float64
    assert tensors["conv2d/kernel"].dtype == np.float32
    assert half_tensors["dense/kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert half.weights[1].numpy().dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(half.weights[1].numpy().astype(np.float32), np.ones(2))


def test_a_different_architecture_is_refused_and_nothing_changes() -> None:
    # Prepare
    adapter = get_adapter("keras")
    target = small_cnn()
    before = weights(target)
    tensors = adapter.to_numpy(small_cnn())
    wider = {**tensors, "dense/bias": np.zeros(4, np.float32)}
    missing = {k: v for k, v in tensors.items() if k != "dense/bias"}
    ints = {**tensors, "dense/bias": np.zeros(3, np.int32)}

    # Execute / Assert
    with pytest.raises(ModelMismatchError, match=r"'dense/bias'.*shape \(3,\).*got \(4,\)"):
        adapter.load_numpy(target, wider)
    with pytest.raises(ModelMismatchError, match="missing 'dense/bias'"):
        adapter.load_numpy(target, missing)
    with pytest.raises(ModelMismatchError, match="dtype float32, got int32"):
        adapter.load_numpy(target, ints)
    for got, want in zip(weights(target), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_unbuilt_model_or_a_foreign_object_is_invalid() -> None:
    adapter = get_adapter("keras")
    with pytest.raises(InvalidModelError, match="no weights yet"):
        adapter.to_numpy(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(InvalidModelError, match="expected a Keras model"):
        adapter.to_numpy({"w": np.zeros(2)})


def test_the_keras_format_without_tensorflow_is_a_clear_config_error() -> None:
    # Prepare: a fresh interpreter where `import keras` fails
    script = (
        "import sys; sys.modules['keras'] = None\n"
        "from common.adapters import get_adapter\n"
        "from common.errors import ConfigError\n"
        "try:\n"
        "    get_adapter('tf')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert "model format 'tf' needs Keras 3 with TensorFlow" in done.stdout
