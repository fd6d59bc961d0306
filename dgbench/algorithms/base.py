"""The algorithm contract (DomainBed's, typed) and the hparams every algorithm shares.

An `Algorithm` receives one `(x, y)` minibatch per training domain, already on the
device, does one training step with the optimizer(s) it owns, and returns the
scalars it wants logged. It never touches files, devices or loaders: the trainer
does. Checkpointing goes through `nn.Module.state_dict` plus `optimizer_state`, so an
algorithm with extra optimizers or counters only has to list them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dgbench.errors import ConfigError
from dgbench.hparams import Choice, IntLogUniform, LogUniform, hparam

DomainBatch = tuple[Tensor, Tensor]
# What `update` returns: floats or scalar tensors. A detached tensor (`loss.detach()`) spares the
# device sync of `.item()`; the trainer reads every step's metrics at the next checkpoint.
Metrics = dict[str, float | Tensor]
# Optimizers step all parameters in one fused kernel (CPU and CUDA): the same update as torch's
# default (a Python loop over the parameters on CPU) up to float rounding, and its Adam step is
# 2.4-9x faster on 2 CPU cores (`tools/bench_optimizer.py`). A checkpoint keeps the setting it
# was made with.
FUSED: dict[str, Any] = {"fused": True}
SMALL_IMAGE_PX = 64  # inputs up to this size (embedded 32 px, MNIST 28 px) get `BackboneNeed.small`


@dataclass(frozen=True)
class BackboneNeed:
    """The backbone family an algorithm works on, and the backbones it runs on by default.

    An algorithm that changes the network (LoRA on attention, drop layers between stages) only
    fits some backbones. When the user picks no backbone, the trainer uses `paper` (the
    backbone of the paper) or, for small images, `small`; an explicit backbone that does not
    fit is refused with `family` and `examples` in the message.
    """

    family: str  # what fits, in words: "a ViT with a fused qkv projection (timm VisionTransformer)"
    fits: Callable[[nn.Module], bool]  # on the built featurizer
    paper: Mapping[str, Any]  # backbone config (arch, name, ...) of the paper
    small: Mapping[str, Any]  # backbone config for images of at most SMALL_IMAGE_PX
    examples: tuple[str, ...] = field(default=())  # overrides that fit, for the error message

    def default_for(self, image_size: int) -> dict[str, Any]:
        return dict(self.small if image_size <= SMALL_IMAGE_PX else self.paper)

    def check(self, featurizer: nn.Module, algorithm: str) -> None:
        """Raise a ConfigError naming the backbones that fit when `featurizer` does not."""
        if self.fits(featurizer):
            return
        name = getattr(featurizer, "name", type(featurizer).__name__)
        examples = "; ".join([*self.examples, _override(self.paper), _override(self.small)])
        raise ConfigError(
            f"algorithm={algorithm} needs {self.family}, but backbone {name!r} is not one. "
            f"Leave the backbone unset for the algorithm's default, or choose one that fits: {examples}"
        )


def _override(config: Mapping[str, Any], prefix: str = "backbone") -> str:
    """`{arch: timm, kwargs: {img_size: 32}}` -> `backbone=timm ++backbone.kwargs.img_size=32`
    (`++`: a dict's keys are added or replaced)."""
    parts = []
    for key, value in config.items():
        if key == "arch":
            parts.append(f"{prefix}={value}")
        elif isinstance(value, Mapping):
            parts.append(_override(value, f"++{prefix.lstrip('+')}.{key}"))
        else:
            parts.append(f"{prefix}.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


@dataclass(kw_only=True)
class AlgorithmHParams:
    """Hyper-parameters shared by DomainBed algorithms (defaults and search as DomainBed, 224-px).

    `dataset_defaults` replaces defaults on some datasets, as DomainBed's `hparams_registry` does
    (`{"pacs": {"num_lora": 2}}`); explicit overrides still win, and the hparams_seed search
    draws from the same distributions.
    """

    dataset_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    name: str = "?"
    lr: float = hparam(5e-5, LogUniform(-5, -3.5), "Adam learning rate")
    weight_decay: float = hparam(0.0, LogUniform(-6, -2), "Adam weight decay")
    batch_size: int = hparam(32, IntLogUniform(3, 5.5), "images per training domain per step")
    dropout: float = hparam(0.0, Choice([0.0, 0.1, 0.5]), "dropout before the linear head")


class Algorithm(nn.Module):
    """Base class: a featurizer, a linear head, and `update` / `predict`.

    Losses add `auxiliary_loss(network)` (dgbench.backbones.auxiliary) for the forward they
    differentiate, so backbones with a training term of their own (GMoE) work with every algorithm.
    An algorithm that only fits some backbones says so in `backbone_need`.

    Args:
        backbone: featurizer module with an `n_outputs` attribute.
        num_classes: number of classes of the task.
        num_domains: number of training domains (length of `batches` in `update`).
        cfg: the algorithm's hparams (its registered dataclass, or a DictConfig of it).
    """

    backbone_need: ClassVar[BackboneNeed | None] = None  # None: any featurizer fits
    # For the README's algorithm table (`python tools/algorithm_table.py`): the paper as
    # "Authors, Title, Venue Year" with an arXiv id when there is one, and the reference code as
    # "owner/repo@commit path:Class". A plugin fills both in.
    paper: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    # Buffers that stay CPU tensors wherever the model is moved: step counters whose value decides
    # a host-side branch (an alternation, a warm-up, a learning-rate step). Reading a CUDA buffer
    # (`int(t)`) waits for every kernel queued so far; a CPU one is a memory read. They stay in the
    # state_dict under their names, and a checkpoint from any device loads into them.
    host_buffers: ClassVar[tuple[str, ...]] = ()
    # The update can be captured as one CUDA graph and replayed (`dgbench.graphs`, trainer.cuda_graph):
    # fixed shapes, no host reads of device values, no host-side state that changes between steps,
    # Adam or AdamW optimizers. Off unless an algorithm declares it; a subclass inherits it.
    graph_safe: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__()
        if self.backbone_need is not None:
            self.backbone_need.check(backbone, getattr(cfg, "name", type(self).__name__))
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.featurizer = backbone
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(backbone.n_outputs, num_classes))
        self.total_steps: int | None = None  # set by the trainer before the first update

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        """One training step on one minibatch per training domain; returns metrics (with "loss")."""
        raise NotImplementedError

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Algorithm:
        """`nn.Module._apply` (behind `.to()`, `.cuda()`, ...), then `host_buffers` put back as they were."""
        kept = {name: self._buffers[name] for name in self.host_buffers}
        super()._apply(fn, recurse)
        self._buffers.update(kept)
        return self

    def predict(self, x: Tensor) -> Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.featurizer(x))

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        """DomainBed's optimizer: Adam over all parameters, no schedule (fused: see `FUSED`)."""
        return torch.optim.Adam(
            self.parameters() if params is None else params,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            **FUSED,
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer whose state must survive a checkpoint; override if there are several."""
        optimizer = getattr(self, "optimizer", None)
        return {"optimizer": optimizer} if optimizer is not None else {}

    def optimizer_state(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers().items()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state[name])
