"""The algorithm contract (DomainBed's, typed) and the hparams every algorithm shares.

An `Algorithm` receives one `(x, y)` minibatch per training domain, already on the
device, does one training step with the optimizer(s) it owns, and returns the
scalars it wants logged. It never touches files, devices or loaders: the trainer
does. Checkpointing goes through `nn.Module.state_dict` plus `optimizer_state`, so an
algorithm with extra optimizers or counters only has to list them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dgbench.hparams import Choice, IntLogUniform, LogUniform, hparam

DomainBatch = tuple[Tensor, Tensor]


@dataclass(kw_only=True)
class AlgorithmHParams:
    """Hyper-parameters shared by DomainBed algorithms (defaults and search as DomainBed, 224-px)."""

    name: str = "?"
    lr: float = hparam(5e-5, LogUniform(-5, -3.5), "Adam learning rate")
    weight_decay: float = hparam(0.0, LogUniform(-6, -2), "Adam weight decay")
    batch_size: int = hparam(32, IntLogUniform(3, 5.5), "images per training domain per step")
    dropout: float = hparam(0.0, Choice([0.0, 0.1, 0.5]), "dropout before the linear head")


class Algorithm(nn.Module):
    """Base class: a featurizer, a linear head, and `update` / `predict`.

    Args:
        backbone: featurizer module with an `n_outputs` attribute.
        num_classes: number of classes of the task.
        num_domains: number of training domains (length of `batches` in `update`).
        cfg: the algorithm's hparams (its registered dataclass, or a DictConfig of it).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_domains = num_domains
        self.featurizer = backbone
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(backbone.n_outputs, num_classes))
        self.total_steps: int | None = None  # set by the trainer before the first update

    def update(self, batches: Sequence[DomainBatch]) -> dict[str, float]:
        """One training step on one minibatch per training domain; returns metrics (with "loss")."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """Logits for a batch of images."""
        return self.classifier(self.featurizer(x))

    def make_optimizer(self, params: Any = None) -> torch.optim.Optimizer:
        """DomainBed's optimizer: Adam over all parameters, no schedule."""
        return torch.optim.Adam(
            self.parameters() if params is None else params,
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
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
