"""The backbone config, the `Featurizer` wrapper and `build_backbone`.

A backbone maps normalized images `(B, 3, H, W)` to features `(B, n_outputs)`; the
classifier head belongs to the algorithm. Every registered backbone is built through
`build_backbone`, so the `weights` file and the BatchNorm policy work the same way for
timm models, the small CNN and plugins.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgbench.backbones.fixed_stats_bn import use_fixed_stats_kernels
from dgbench.backbones.weights import load_weights
from dgbench.errors import ConfigError
from dgbench.hparams import enum_choice
from dgbench.registry import BACKBONES

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BNPolicy(str, enum.Enum):
    """What BatchNorm layers do in training mode.

    `frozen` keeps every BatchNorm layer in eval mode (running statistics fixed, as in
    the DomainBed 2020 results); its affine parameters still train.
    """

    train = "train"
    frozen = "frozen"


@dataclass(kw_only=True)
class BackboneConfig:
    """Config keys shared by every backbone (`backbone.<key>=...`)."""

    arch: str = "?"  # registry key (set by the registry)
    name: str = "?"  # model name, recorded in results (the timm model name for arch=timm)
    pretrained: bool = False  # load the architecture's pretrained weights
    weights: str | None = None  # local state_dict file; takes precedence over `pretrained`
    bn: BNPolicy = BNPolicy.train  # 'frozen': BatchNorm stays in eval mode (DomainBed 2020)


class Featurizer(nn.Module):
    """A feature extractor with the metadata the trainer and algorithms need.

    Attributes:
        model: the wrapped network; `forward` returns `model(x)` of shape (B, n_outputs).
        n_outputs: feature dimension, the input size of the classifier head.
        mean, std: per-channel input normalization the model expects.
        name: model name, recorded in results.
        bn: the BatchNorm policy, re-applied on every `train()` call.
    """

    def __init__(
        self,
        model: nn.Module,
        n_outputs: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        name: str = "?",
        bn: BNPolicy | str = BNPolicy.train,
    ) -> None:
        super().__init__()
        self.model = model
        self.n_outputs = int(n_outputs)
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        self.name = name
        self.set_bn_policy(bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def set_bn_policy(self, bn: BNPolicy | str) -> Featurizer:
        """Switch the BatchNorm policy and apply it to the current mode at once.

        `frozen` also gives the plain BatchNorm2d layers a backward that keeps channels_last on
        CUDA (`FixedStatsBatchNorm2d`: same parameters, buffers and state_dict keys).
        """
        self.bn = coerce_bn_policy(bn)
        use_fixed_stats_kernels(self.model, on=self.bn is BNPolicy.frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Featurizer:
        """Set the mode, then put BatchNorm back in eval mode if the policy is `frozen`.

        Overriding `train` (rather than freezing once) matters: every `model.train()`
        call by a trainer or algorithm would otherwise unfreeze the statistics again.
        """
        super().train(mode)
        if self.bn is BNPolicy.frozen:
            for module in self.batchnorm_modules():
                module.eval()
        return self

    def batchnorm_modules(self) -> Iterator[_BatchNorm]:
        """All BatchNorm layers (nn.BatchNorm*d, SyncBatchNorm, timm's BatchNormAct2d, ...)."""
        return (m for m in self.modules() if isinstance(m, _BatchNorm))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_outputs={self.n_outputs}, bn={self.bn.value}"

    @classmethod
    def wrap(cls, model: nn.Module, name: str = "?") -> Featurizer:
        """Wrap a plugin's plain module, which must say its `n_outputs`."""
        if not hasattr(model, "n_outputs"):
            raise TypeError(
                f"backbone {name!r} returned {type(model).__name__} without an `n_outputs` attribute; "
                "return a dgbench.backbones.Featurizer or set `n_outputs` on the module"
            )
        mean = getattr(model, "mean", IMAGENET_MEAN)
        std = getattr(model, "std", IMAGENET_STD)
        return cls(model, model.n_outputs, mean=mean, std=std, name=name)


def build_backbone(cfg: Any) -> Featurizer:
    """Build the featurizer `cfg` describes: registry lookup, weights file, BatchNorm policy.

    `cfg` is the `backbone` node of the composed config (a DictConfig), a config dataclass
    or a plain mapping. A `weights` file replaces the pretrained weights, so the download is
    skipped when both are set.
    """
    arch = _get(cfg, "arch")
    if arch in (None, "?"):
        raise ConfigError(
            f"backbone.arch is not set; choose a backbone preset (backbone=resnet50) or an arch "
            f"(backbone=timm backbone.name=<timm model>). Known archs: {', '.join(BACKBONES.names())}"
        )
    entry = BACKBONES.get(str(arch))
    config = coerce_config(cfg, entry.config)
    if config.weights and config.pretrained:
        log.info("backbone.weights is set: loading %s instead of the pretrained weights", config.weights)
        config = dataclasses.replace(config, pretrained=False)
    built = entry.obj(config)
    featurizer = built if isinstance(built, Featurizer) else Featurizer.wrap(built, name=config.name)
    if config.weights:
        load_weights(featurizer.model, config.weights, what=f"backbone {config.arch}:{config.name}")
    return featurizer.set_bn_policy(config.bn)


def coerce_config(cfg: Any, config_cls: type) -> Any:
    """Turn a DictConfig, dataclass or mapping into `config_cls`, rejecting unknown keys."""
    if isinstance(cfg, config_cls):
        return cfg
    if isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True)
    elif dataclasses.is_dataclass(cfg):
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    elif isinstance(cfg, Mapping):
        values = dict(cfg)
    else:
        raise TypeError(f"backbone config must be a DictConfig, dataclass or mapping, got {type(cfg)!r}")
    assert isinstance(values, dict)
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) for backbone arch {values.get('arch')!r}: "
            f"{', '.join('backbone.' + k for k in unknown)}; valid keys: {', '.join(known)}"
        )
    if "bn" in values:
        values["bn"] = coerce_bn_policy(values["bn"])
    return config_cls(**values)


def coerce_bn_policy(value: Any) -> BNPolicy:
    """`BNPolicy` from an enum or its string value, with the valid values in the error."""
    return enum_choice(BNPolicy, value, "backbone.bn", "a BatchNorm policy")


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping | DictConfig):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"featurizer {what} must have 3 channels, got {values!r}")
    return out  # type: ignore[return-value]
