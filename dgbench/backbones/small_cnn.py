"""A small CNN for the embedded low-resolution dataset: fast enough for CPU tests and quickstarts.

DomainBed's `MNIST_CNN` layout (four 3x3 convs with padding 1, each followed by ReLU
and GroupNorm(8), then global average pooling) at about a fifth of its multiply-adds:
widths 32-64-64-128 with strides 1-2-1-2 instead of 64-128-128-128 with 1-2-1-1, so CPU
quickstarts and tests stay short. GroupNorm instead of BatchNorm keeps it independent
of the batch and of the BatchNorm policy. Works for any input of at least 8x8 pixels.
`backbone.width` scales every layer (the quickstart sweep uses 0.25: 16x fewer multiply-adds).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dgbench.backbones.base import BackboneConfig, Featurizer
from dgbench.errors import ConfigError
from dgbench.registry import BACKBONES

WIDTHS = (32, 64, 64, 128)
STRIDES = (1, 2, 1, 2)
GROUPS = 8
MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(kw_only=True)
class SmallCNNConfig(BackboneConfig):
    """The small CNN has no pretrained weights; `weights` may still point to a saved state_dict."""

    name: str = "small_cnn"
    width: float = 1.0  # multiplies the channel widths 32-64-64-128 (multiples of GroupNorm's 8 groups)


class SmallCNN(nn.Module):
    """Four conv blocks and a global average pool; output (B, widths[-1])."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width, stride in zip(widths, STRIDES, strict=True):
            layers += [
                nn.Conv2d(in_channels, width, 3, stride=stride, padding=1),
                nn.ReLU(inplace=True),
                nn.GroupNorm(GROUPS, width),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.n_outputs = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_small_cnn(cfg: SmallCNNConfig) -> Featurizer:
    """The small CNN with inputs normalized to [-1, 1]."""
    if cfg.pretrained:
        raise ConfigError(
            "backbone small_cnn has no pretrained weights; set backbone.pretrained=false "
            "(or backbone.weights=PATH for a saved state_dict)"
        )
    widths = tuple(max(GROUPS, round(w * cfg.width / GROUPS) * GROUPS) for w in WIDTHS)
    if cfg.width <= 0:
        raise ConfigError(f"backbone.width must be positive, got {cfg.width}")
    model = SmallCNN(widths=widths)
    return Featurizer(model, model.n_outputs, mean=MEAN_STD, std=MEAN_STD, name=cfg.name)


BACKBONES.register("small_cnn", SmallCNNConfig, build_small_cnn)
