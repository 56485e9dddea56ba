"""Framework adapters: lookup by name and type, and round trips through the codec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from common.adapters import FrameworkAdapter, adapter_for, canonical_framework, get_adapter
from common.adapters.numpy_adapter import NumpyAdapter
from common.adapters.torch_adapter import TorchAdapter
from common.codec import Array, decode, dtype_name, encode
from common.errors import CodecError, ConfigError, InvalidModelError, ModelMismatchError

REPO = Path(__file__).resolve().parents[1]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))
        return out


def trained_cnn(seed: int) -> SmallCNN:
    """A CNN whose BatchNorm buffers have moved away from their initial values."""
    torch.manual_seed(seed)
    model = SmallCNN()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 4, 4))
    return model


def through_the_wire(tensors: dict[str, Array]) -> dict[str, Array]:
    return decode(encode(tensors))[0]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# --- lookup -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "framework", "kind"),
    [
        ("pytorch", "pytorch", TorchAdapter),
        ("torch", "pytorch", TorchAdapter),
        ("PyTorch", "pytorch", TorchAdapter),
        (" TORCH ", "pytorch", TorchAdapter),
        ("numpy", "numpy", NumpyAdapter),
        ("np", "numpy", NumpyAdapter),
        ("NumPy", "numpy", NumpyAdapter),
    ],
)
def test_get_adapter_accepts_model_format_spellings(
    name: str, framework: str, kind: type[FrameworkAdapter]
) -> None:
    # Execute
    adapter = get_adapter(name)

    # Assert
    assert isinstance(adapter, kind)
    assert isinstance(adapter, FrameworkAdapter)
    assert adapter.framework == framework
    assert canonical_framework(name) == framework


def test_unknown_model_format_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown model format 'jax'; known: keras, np"):
        get_adapter("jax")


def test_adapter_for_picks_by_type() -> None:
    # Execute / Assert
    assert adapter_for({"w": np.zeros(2)}).framework == "numpy"
    assert adapter_for(nn.Linear(2, 2)).framework == "pytorch"
    with pytest.raises(InvalidModelError, match=r"no adapter for a builtins.list"):
        adapter_for([1, 2])


def test_adapters_package_imports_without_torch() -> None:
    # Prepare: a fresh interpreter where `import torch` fails
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from common.adapters import get_adapter\n"
        "from common.errors import ConfigError\n"
        "assert get_adapter('numpy').framework == 'numpy'\n"
        "try:\n"
        "    get_adapter('torch')\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert "model format 'torch' needs PyTorch" in done.stdout


# --- torch --------------------------------------------------------------------------------------


def test_torch_round_trip_of_a_cnn_with_batchnorm() -> None:
    # Prepare
    source, target = trained_cnn(1), trained_cnn(2)
    adapter = get_adapter("pytorch")

    # Execute
    tensors = adapter.to_numpy(source)
    loaded = adapter.load_numpy(target, through_the_wire(tensors))

    # Assert
    assert loaded is target
    assert list(tensors) == list(source.state_dict())
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= tensors.keys()
    assert tensors["bn.num_batches_tracked"].dtype == np.int64
    assert int(tensors["bn.num_batches_tracked"]) == 3
    assert_same_state(source, target)
    source.eval()
    target.eval()
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(source(x), target(x))


def test_torch_to_numpy_is_a_detached_snapshot() -> None:
    # Prepare
    model = nn.Linear(3, 2)
    tensors = TorchAdapter().to_numpy(model)
    before = tensors["weight"].copy()

    # Execute
    with torch.no_grad():
        model.weight.add_(1.0)

    # Assert
    assert not np.shares_memory(tensors["weight"], model.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["weight"], before)


@pytest.mark.parametrize(
    ("dtype", "wire"), [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
)
def test_torch_half_precision_module_round_trip(dtype: torch.dtype, wire: str) -> None:
    # Prepare
    torch.manual_seed(3)
    source = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(dtype)
    target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(dtype)
    adapter = TorchAdapter()

    # Execute
    tensors = adapter.to_numpy(source)
    adapter.load_numpy(target, through_the_wire(tensors))

    # Assert
    assert {dtype_name(a.dtype) for a in tensors.values()} == {wire}
    assert_same_state(source, target)


def test_torch_bfloat16_bits_survive_exactly() -> None:
    # Prepare: values whose bf16 bit patterns are all distinct, NaN and Inf included
    patterns = np.array([0x3F80, 0xBF80, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8000], dtype=np.uint16)
    bits = torch.from_numpy(patterns.view(np.int16))
    module = nn.Module()
    module.register_buffer("b", bits.view(torch.bfloat16).clone())
    target = nn.Module()
    target.register_buffer("b", torch.zeros(7, dtype=torch.bfloat16))

    # Execute
    exported = TorchAdapter().to_numpy(module)["b"]
    TorchAdapter().load_numpy(target, through_the_wire({"b": exported}))

    # Assert
    assert exported.dtype == ml_dtypes.bfloat16
    assert exported.view(np.int16).tolist() == bits.tolist()
    assert torch.equal(target.get_buffer("b").view(torch.int16), bits)


def test_torch_load_casts_float_precision_to_the_model_dtype() -> None:
    # Prepare
    model = nn.Linear(2, 2)
    tensors = {k: v.astype(np.float64) + 1 for k, v in TorchAdapter().to_numpy(model).items()}

    # Execute
    TorchAdapter().load_numpy(model, tensors)

    # Assert
    assert model.weight.dtype == torch.float32
    np.testing.assert_allclose(model.weight.detach().numpy(), tensors["weight"], rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("bn.running_var"), r"missing 'bn.running_var'"),
        (lambda t: t.update(extra=np.zeros(1)), r"unexpected 'extra'"),
        (
            lambda t: t.update({"fc.weight": np.zeros((3, 9), np.float32)}),
            r"tensor 'fc.weight': the model has shape \(3, 8\) float32, got \(3, 9\) float32",
        ),
        (
            lambda t: t.update({"bn.num_batches_tracked": np.array(3.0)}),
            r"tensor 'bn.num_batches_tracked': the model has dtype int64, got float64",
        ),
    ],
)
def test_torch_load_rejects_a_model_that_does_not_fit(change: object, message: str) -> None:
    # Prepare
    source, target = trained_cnn(1), trained_cnn(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    tensors = TorchAdapter().to_numpy(source)
    change(tensors)  # type: ignore[operator]

    # Execute / Assert
    with pytest.raises(ModelMismatchError, match=message):
        TorchAdapter().load_numpy(target, tensors)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_torch_unsupported_dtype_is_named() -> None:
    # Prepare
    module = nn.Module()
    module.register_buffer("f8", torch.zeros(2, dtype=torch.float8_e4m3fn))

    # Execute / Assert
    with pytest.raises(CodecError, match=r"tensor 'f8': torch dtype torch.float8_e4m3fn"):
        TorchAdapter().to_numpy(module)


# --- numpy --------------------------------------------------------------------------------------


def test_numpy_round_trip_updates_the_dict_in_place() -> None:
    # Prepare
    source = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "n": np.array(7, dtype=np.int64),
        "m": np.array([True, False]),
    }
    target = {k: np.zeros_like(v) for k, v in source.items()}
    adapter = get_adapter("numpy")

    # Execute
    received = through_the_wire(adapter.to_numpy(source))
    loaded = adapter.load_numpy(target, received)

    # Assert
    assert loaded is target
    for name, array in source.items():
        assert target[name].dtype == array.dtype, name
        np.testing.assert_array_equal(target[name], array)
        assert not np.shares_memory(target[name], received[name]), name


def test_numpy_to_numpy_copies() -> None:
    # Prepare
    model = {"w": np.arange(4.0)[::2]}

    # Execute
    out = NumpyAdapter().to_numpy(model)
    model["w"][0] = 99.0

    # Assert
    assert out["w"].flags.c_contiguous
    np.testing.assert_array_equal(out["w"], [0.0, 2.0])


def test_numpy_load_rejects_mismatches_without_changing_anything() -> None:
    # Prepare
    model: dict[str, Array] = {"w": np.zeros((2, 2), np.float32), "n": np.zeros((), np.int64)}

    # Execute / Assert
    with pytest.raises(ModelMismatchError, match=r"missing 'n'; unexpected 'x'"):
        NumpyAdapter().load_numpy(model, {"w": np.ones((2, 2)), "x": np.ones(1)})
    with pytest.raises(ModelMismatchError, match=r"tensor 'w': the model has shape \(2, 2\)"):
        NumpyAdapter().load_numpy(model, {"w": np.ones((2, 3)), "n": np.ones((), np.int64)})
    assert not model["w"].any()


def test_numpy_adapter_rejects_non_array_models() -> None:
    # Execute / Assert
    with pytest.raises(InvalidModelError, match="entry 'w' is a list"):
        NumpyAdapter().to_numpy({"w": [1, 2]})  # type: ignore[dict-item]
