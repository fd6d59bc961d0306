"""Mixup (inter-domain): train on convex combinations of minibatches from two domains.

Yan, Song, Li, Zou, Ren, "Improve Unsupervised Domain Adaptation with Mixup Training",
arXiv:2001.00677, 2020 (and Wang et al., arXiv:1912.01805), as run in DomainBed.
Reference: facebookresearch/DomainBed `domainbed/algorithms.py` class `Mixup`,
`domainbed/lib/misc.py` `random_pairs_of_minibatches` and `domainbed/hparams_registry.py`
(`mixup_alpha`), read at commit 22002ea.

One step, as in DomainBed's `Mixup.update`:

1. Pairs of domains from `random_pairs_of_minibatches` (`dgbench.algorithms.pairs`): a random
   permutation of the D domains, each paired with the next cyclically (D pairs), both minibatches
   truncated to the shorter one.
2. For each pair (i, j): λ ~ Beta(α, α), one λ per pair; x = λ·x_i + (1 − λ)·x_j; one forward;
   λ·CE(f(x), y_i) + (1 − λ)·CE(f(x), y_j).
3. The sum over pairs divided by D (the number of pairs), one Adam step.

Randomness, as DomainBed draws it: the permutation from torch's global CPU generator
(`torch.randperm`), λ from NumPy's global generator (`np.random.beta`). The trainer seeds both
and saves them in every checkpoint, so a resumed run draws the same pairs and the same λ.

Choices:
- The backbone's auxiliary loss is collected after each pair's forward; the mean over pairs is
  added to the objective (the objective is itself a mean over pairs).
- `loss` is DomainBed's logged objective; no other metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.algorithms.pairs import random_pairs_of_minibatches
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class MixupHParams(AlgorithmHParams):
    """DomainBed's Mixup hparams: the shared ones plus the Beta concentration."""

    mixup_alpha: float = hparam(0.2, LogUniform(-1, 1), "α of the mixing weight λ ~ Beta(α, α), one per pair")


def mix(x_i: Tensor, x_j: Tensor, lam: float) -> Tensor:
    """λ·x_i + (1 − λ)·x_j (DomainBed's expression)."""
    return lam * x_i + (1 - lam) * x_j


def mixup_loss(logits: Tensor, y_i: Tensor, y_j: Tensor, lam: float) -> Tensor:
    """λ·CE(logits, y_i) + (1 − λ)·CE(logits, y_j), each CE the batch mean."""
    return lam * F.cross_entropy(logits, y_i) + (1 - lam) * F.cross_entropy(logits, y_j)


@ALGORITHMS.register("mixup", MixupHParams)
class Mixup(Algorithm):
    """Inter-domain Mixup with DomainBed semantics; see the module docstring."""

    paper = (
        "Yan, Song, Li, Zou, Ren, Improve Unsupervised Domain Adaptation with Mixup Training, preprint "
        "2020, arXiv:2001.00677"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:Mixup"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()

    def sample_lambda(self) -> float:
        """λ ~ Beta(α, α) from NumPy's global generator, as DomainBed draws it."""
        alpha = float(self.cfg.mixup_alpha)
        return float(np.random.beta(alpha, alpha))

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        objective: Tensor | float = 0.0
        extra: Tensor | float = 0.0
        for (x_i, y_i), (x_j, y_j) in random_pairs_of_minibatches(batches):
            lam = self.sample_lambda()
            objective = objective + mixup_loss(self.predict(mix(x_i, x_j, lam)), y_i, y_j, lam)
            extra = extra + auxiliary_loss(self)
        assert isinstance(objective, Tensor)  # at least one pair
        objective = objective / len(batches)
        extra = extra / len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        (objective + extra).backward()
        self.optimizer.step()
        return {"loss": objective.detach()}
