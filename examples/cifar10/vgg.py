"""VGG for 32×32 CIFAR-10 images (the seed's ``vgg.py``): ``VGG("VGG16")`` or ``VGG16()``.

The config's ``base_model`` block names it: ``"model_fn": "VGG16", "model_fn_src": "vgg"``.
"""

from __future__ import annotations

import torch
from torch import nn

#: Output channels of each 3×3 convolution; "M" is a 2×2 max-pool.
_SPECS = {
    "VGG11": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "VGG13": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "VGG16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "VGG19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}
CONFIGS: dict[str, list[str]] = {name: spec.split() for name, spec in _SPECS.items()}


class VGG(nn.Module):
    """Convolutions with BatchNorm and ReLU, five max-pools (32 → 1), one linear classifier."""

    def __init__(self, vgg_name: str = "VGG16", num_classes: int = 10) -> None:
        super().__init__()
        self.features = self._make_layers(CONFIGS[vgg_name])
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(out.view(out.size(0), -1))  # type: ignore[no-any-return]

    @staticmethod
    def _make_layers(config: list[str]) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_channels = int(item)
                layers += [
                    nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                in_channels = out_channels
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
        return nn.Sequential(*layers)


def VGG16(num_classes: int = 10) -> VGG:  # noqa: N802 - the seed config's model_fn is "VGG16"
    """The base model of the CIFAR-10 example (seeded: every process builds the same one)."""
    torch.manual_seed(0)
    return VGG("VGG16", num_classes)
