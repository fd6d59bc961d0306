"""Surgery on the stage feature maps of CNN backbones: find the stages, tap them, drop channels.

Algorithms that act between the stages of a CNN (DomainDrop's discriminators and channel drop,
feature-statistics mixing, ...) need three things that do not depend on the algorithm:

- `feature_stages`: the stages themselves, from the `feature_info` a timm model (or any model
  that copies timm's convention) publishes: every entry with a reduction of at least 4 whose
  module contains a convolution. For a ResNet that is layer1..layer4 (the stem, at reduction 2,
  is skipped); ViT blocks and Swin layers have no convolution and output token sequences, so
  those backbones have no stages.
- `stage_taps`: a context manager that routes each stage's output through a function while it
  is active. The forward hooks exist only inside the block, so `predict`, `deepcopy` and
  `state_dict` outside it see the plain network.
- Gradient reversal and DomainDrop's channel drop as pure functions of tensors
  (`channel_scores`, `weighted_channel_mask`, `apply_channel_mask`), testable on their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dgbench.errors import ConfigError

MIN_REDUCTION = 4  # stride of the first stage after a ResNet-style stem; smaller ones are stem outputs

StageFn = Callable[[int, Tensor], Tensor]  # (stage index in feature_stages(), map) -> map


class Stage(NamedTuple):
    """One stage: its module path in the model, the module, and the channels of its output."""

    name: str
    module: nn.Module
    channels: int


def backbone_name(featurizer: nn.Module) -> str:
    """The name a featurizer reports (dgbench `Featurizer.name`), else its class name."""
    name = getattr(featurizer, "name", None)
    return str(name) if name not in (None, "?") else type(featurizer).__name__


def feature_stages(featurizer: nn.Module) -> list[Stage]:
    """The convolutional stages of `featurizer.model` (or of `featurizer` itself), input to output.

    Read from `model.feature_info` (timm's list of `{"module", "num_chs", "reduction"}` dicts, or
    a timm `FeatureInfo`): entries with reduction >= 4 whose module contains an `nn.Conv2d`.
    Raises a ConfigError naming the backbone when there is none.
    """
    model = getattr(featurizer, "model", featurizer)
    stages = []
    for entry in _feature_info(model):
        if int(entry.get("reduction", 0)) < MIN_REDUCTION:
            continue
        module = _submodule(model, str(entry["module"]), featurizer)
        if any(isinstance(m, nn.Conv2d) for m in module.modules()):
            stages.append(Stage(str(entry["module"]), module, int(entry["num_chs"])))
    if not stages:
        raise ConfigError(
            f"backbone {backbone_name(featurizer)!r} has no convolutional stage feature maps "
            f"(no timm feature_info entry with reduction >= {MIN_REDUCTION} on a module with a Conv2d); "
            f"stage surgery needs a CNN such as backbone=timm backbone.name=resnet18"
        )
    return stages


def has_feature_stages(featurizer: nn.Module) -> bool:
    """Whether `feature_stages` finds stages (for `BackboneNeed.fits`); never raises."""
    try:
        return bool(feature_stages(featurizer))
    except ConfigError:
        return False


def _feature_info(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # timm FeatureInfo (features_only models) keeps its list in .info
    if not isinstance(info, Sequence):
        return []
    return [dict(entry) for entry in info if isinstance(entry, dict) and "module" in entry]


def _submodule(model: nn.Module, name: str, featurizer: nn.Module) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"backbone {backbone_name(featurizer)!r}: feature_info names module {name!r}, "
            f"which the model does not have"
        ) from None


@contextmanager
def stage_taps(
    featurizer: nn.Module, fn: StageFn, stages: Sequence[int] | None = None
) -> Iterator[list[Stage]]:
    """Inside the block, the output F of stage i is replaced by `fn(i, F)`; hooks go on exit.

    `stages` are indices into `feature_stages(featurizer)` (None: all). `fn` gets the index into
    that full list, so it means the same stage whichever subset is tapped. Every tapped output
    must be a (B, C, H, W) map with the stage's C channels, else a ConfigError names the backbone.
    Yields the tapped stages.
    """
    found = feature_stages(featurizer)
    indices = list(range(len(found))) if stages is None else [int(i) for i in stages]
    bad = [i for i in indices if not 0 <= i < len(found)]
    if bad:
        raise ValueError(f"stage indices {bad} out of range: the backbone has {len(found)} stages")
    handles = []
    try:
        for i in indices:
            hook = _stage_hook(i, found[i], fn, backbone_name(featurizer))
            handles.append(found[i].module.register_forward_hook(hook))
        yield [found[i] for i in indices]
    finally:
        for handle in handles:
            handle.remove()


def _stage_hook(index: int, stage: Stage, fn: StageFn, backbone: str) -> Callable[..., Tensor]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not (isinstance(output, Tensor) and output.ndim == 4 and output.shape[1] == stage.channels):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ConfigError(
                f"backbone {backbone!r}: stage {stage.name!r} outputs {shape}, not a "
                f"(B, {stage.channels}, H, W) feature map; stage surgery needs a channels-first CNN "
                f"such as a timm ResNet"
            )
        return fn(index, output)

    return hook


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by −λ (Ganin & Lempitsky, ICML 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """x in the forward; −λ·grad in the backward, so what follows is trained adversarially."""
    return GradientReversal.apply(x, lambd)


def channel_scores(features: Tensor, weights: Tensor) -> Tensor:
    """How much each channel of each sample speaks for its domain: (B, C, H, W) -> (B, C) in [0, 1].

    `weights` are the classifier rows of the true domains, (B, C) (or one (C,) row for all). As
    DomainDrop: S = F ⊙ w, min-max normalised across channels at every position, averaged over
    H, W, then min-max normalised across channels per sample. A sample whose channels all score
    the same gets NaN (0/0) scores, which `weighted_channel_mask` turns into "drop nothing"; as in
    the reference, so does a sample with one position where all channels of F ⊙ w are equal
    (e.g. all zero after a ReLU; not observed in timm ResNets at 32-96 px).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    w = weights.reshape(-1, features.shape[1], 1, 1).to(features.dtype)
    per_position = _minmax(features * w, dim=1)
    return _minmax(per_position.mean(dim=(2, 3)), dim=1)


def weighted_channel_mask(
    scores: Tensor, drop_fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample 0/1 mask (B, C) dropping ⌊C·p⌋ channels, drawn with probability growing with score.

    Efraimidis–Spirakis weighted sampling without replacement: keys u^(1/s), u ~ U(0, 1), and the
    ⌊C·p⌋ largest keys are dropped. Keys are compared as log(u)/s, which orders them exactly as
    u^(1/s) but cannot underflow to tied zeros for small s. Scores are min-max normalised per
    sample first (a no-op on `channel_scores` output): the lowest channel gets s = 0 and is never
    dropped, and a row of equal scores gives NaN keys and drops nothing, as in the reference. Ties
    at the threshold drop fewer. Draws from `generator`, else torch's global RNG.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
    count = math.floor(scores.shape[1] * drop_fraction)
    if count == 0:
        return torch.ones_like(scores)
    s = _minmax(scores.float(), dim=1)
    device = generator.device if generator is not None else s.device
    u = torch.rand(s.shape, generator=generator, device=device).to(s.device)
    keys = torch.log(u) / s
    threshold = keys.sort(dim=1, descending=True).values[:, count : count + 1]
    dropped = keys > threshold  # NaN compares False: nothing dropped
    return dropped.logical_not().to(scores.dtype)


def apply_channel_mask(features: Tensor, mask: Tensor) -> Tensor:
    """F ⊙ M · numel(M)/ΣM: drop channels, rescaled by one factor for the whole batch (≈ 1/(1−p))."""
    scaled = mask * (mask.numel() / mask.sum())
    return features * scaled.to(features.dtype)[:, :, None, None]


def _minmax(x: Tensor, dim: int) -> Tensor:
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low)
