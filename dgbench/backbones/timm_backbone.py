"""Any timm model as a featurizer: `backbone=timm backbone.name=<timm model name>`.

The model is created with `num_classes=0`, so its forward returns pooled features. Names
are checked against timm's registry before anything is built or downloaded, so a typo
fails at once with the closest names, and `pretrained=true` on a model timm has no
weights for fails instead of silently training from a random init.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from dgbench.backbones.base import BackboneConfig, Featurizer
from dgbench.errors import ConfigError, DataError
from dgbench.registry import BACKBONES

REMOTE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm resolves these itself
FETCH_ERROR_MODULES = ("huggingface_hub", "httpx", "requests", "urllib3")


@dataclass(kw_only=True)
class TimmConfig(BackboneConfig):
    """A timm model; `name` is any `timm.list_models()` name, optionally with a `.tag`."""

    name: str = "resnet18"
    # Extra keyword arguments of timm.create_model, e.g. {img_size: 32, patch_size: 4,
    # dynamic_img_size: true} for a ViT on small images, or {drop_path_rate: 0.1}.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Keep the pretrained head as a projection: CLIP image towers then output their projected
    # embedding (512-d for ViT-B/16) instead of the pooled 768-d token.
    projection: bool = False


def build_timm(cfg: TimmConfig) -> Featurizer:
    """Create the timm model (without a head unless `projection`) and wrap it with its normalization."""
    model = create_timm_model(cfg.name, pretrained=cfg.pretrained, projection=cfg.projection, **cfg.kwargs)
    return timm_featurizer(model, cfg.name, projection=cfg.projection)


def timm_featurizer(model: nn.Module, name: str, projection: bool = False) -> Featurizer:
    """Wrap a timm model with the normalization its pretrained config expects."""
    data_cfg = resolve_data_config({}, model=model)
    width = int(model.num_classes) if projection else timm_n_outputs(model)
    return Featurizer(model, width, mean=data_cfg["mean"], std=data_cfg["std"], name=name)


def create_timm_model(name: str, pretrained: bool, projection: bool = False, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained, num_classes=0, **kwargs)` with config-level errors.

    With `projection` the model keeps its pretrained head (timm's default `num_classes`).
    """
    check_timm_name(name, pretrained)
    if projection:
        pretrained_cfg = get_pretrained_cfg(name)
        if pretrained_cfg is None or not pretrained_cfg.num_classes:
            raise ConfigError(
                f"backbone.projection=true: timm model {name!r} has no pretrained head to keep "
                f"(CLIP image towers such as vit_base_patch16_clip_224.openai have one)"
            )
    else:
        kwargs = {**kwargs, "num_classes": 0}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained and _is_fetch_error(exc):
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(
                f"could not fetch pretrained weights for backbone.name={name!r} "
                f"({type(exc).__name__}: {reason}); without network access set backbone.pretrained=false "
                f"(random init) or backbone.weights=PATH (a local state_dict); "
                f"HF_HUB_OFFLINE=1 makes this fail fast instead of retrying"
            ) from exc
        raise


def check_timm_name(name: str, pretrained: bool) -> None:
    """Raise a ConfigError for an unknown model, an unknown tag, or missing pretrained weights."""
    if name.startswith(REMOTE_PREFIXES):
        return
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"backbone.name={name!r} is not a timm model{hint}. "
            f"List models with python -c \"import timm; print(timm.list_models('*{arch[:8]}*'))\""
        )
    try:
        pretrained_cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        pretrained_cfg = None
    if tag and pretrained_cfg is None:
        raise ConfigError(
            f"backbone.name={name!r}: timm has no tag {tag!r} for {arch}; tags with weights: {_tags(arch)}"
        )
    if pretrained and not (pretrained_cfg and pretrained_cfg.has_weights):
        raise ConfigError(
            f"backbone.name={name!r} has no pretrained weights in timm "
            f"(tags with weights: {_tags(arch)}); "
            f"set backbone.pretrained=false for a random init or backbone.weights=PATH"
        )


def timm_n_outputs(model: nn.Module) -> int:
    """Width of the pooled output with `num_classes=0`.

    Models with a pre-logits layer after pooling (MobileNetV3, MambaOut, ...) output
    `head_hidden_size`, not `num_features`; timm sets `head_hidden_size` on those.
    """
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise ConfigError(
            f"timm model {type(model).__name__} reports neither head_hidden_size nor num_features"
        )
    return int(width)


def _tags(arch: str) -> str:
    return ", ".join(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")) or "(none)"


def _is_fetch_error(exc: BaseException) -> bool:
    """Network, hub and file-system failures, as opposed to bugs in model construction."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or module in FETCH_ERROR_MODULES


BACKBONES.register("timm", TimmConfig, build_timm)
