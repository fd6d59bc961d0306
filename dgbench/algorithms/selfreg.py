"""SelfReg: self-supervised contrastive regularisation between same-class examples.

Kim, Yoo, Park, Kim, Lee, Kim, "SelfReg: Self-supervised Contrastive Regularization for Domain
Generalization", ICCV 2021, arXiv:2104.09841. Reference: facebookresearch/DomainBed
`domainbed/algorithms.py` class `SelfReg`, read at commit 22002ea (DomainBed's
`hparams_registry.py` declares no SelfReg-specific hparams; the constants below are its
hard-coded ones).

One step, as in DomainBed's `SelfReg.update`:

1. λ ~ Beta(0.5, 0.5) from NumPy's global generator.
2. The pooled batch is sorted by label, so each class is a contiguous interval.
3. One forward: features f = featurizer(x), logits o = classifier(f), projections
   p = cdpl(f), cdpl a 3-layer MLP (Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN) with hidden
   width n_outputs when n_outputs == 2048 and 2·n_outputs otherwise.
4. Per class interval, two permutations π₂, π₃ from torch's global generator (`torch.randperm`),
   so every example is paired with examples of its own class. o₂ = o[π₂], p₂ = p[π₂];
   o₃ = λ·o[π₂] + (1 − λ)·o[π₃], p₃ likewise.
5. reg = λ·(MSE(o, o₂) + 0.3·MSE(f, p₂)) + (1 − λ)·(MSE(o, o₃) + 0.3·MSE(f, p₃)), MSE the mean
   over elements. As in DomainBed, the feature terms compare the *unprojected* features f with
   the shuffled *projections*.
6. objective = CE(o, y) + C·reg with C = min(CE.item(), 1) (DomainBed's weight: the CE value,
   capped at 1, detached; here a clamp of the detached CE on the device, the same float32 value
   without a host read); one Adam step over the featurizer, head and cdpl.

Randomness comes only from NumPy's and torch's global generators, which the trainer seeds and
checkpoints, so a resumed run draws the same λ and pairs.

Choices:
- DomainBed's weight of the regulariser is C = min(CE, 1), not a weight that grows linearly with
  the step (the SelfReg authors' own code); this follows DomainBed.
- The sort by label is stable (`torch.sort(stable=True)`); DomainBed's default sort does not fix
  the order of equal labels. The class intervals are those of DomainBed (one draw of two
  permutations per interval, in label order).
- The backbone's auxiliary loss is added to the objective.
- Metrics: `loss` is the CE part, `penalty` is reg (before C), `reg_weight` is C. DomainBed logs
  the whole objective as `loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.devices import to_device
from dgbench.registry import ALGORITHMS

FEATURE_WEIGHT = 0.3  # DomainBed's weight of the feature terms
BETA_ALPHA = 0.5  # λ ~ Beta(0.5, 0.5)


@dataclass(kw_only=True)
class SelfRegHParams(AlgorithmHParams):
    """SelfReg has only the shared DomainBed hparams (DomainBed's registry declares none)."""


def projection_head(n_features: int) -> nn.Sequential:
    """DomainBed's `cdpl`: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN, back to n_features."""
    hidden = n_features if n_features == 2048 else 2 * n_features
    return nn.Sequential(
        nn.Linear(n_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, n_features),
        nn.BatchNorm1d(n_features),
    )


def class_interval_ends(sorted_y: Tensor) -> list[int]:
    """Ends of the same-label runs of a sorted label vector, as DomainBed computes them (its first
    run is compared with label 0, so an empty first interval appears when no label 0 is present)."""
    ends: list[int] = []
    previous = 0
    for i, value in enumerate(sorted_y.tolist()):
        if value != previous:
            ends.append(i)
            previous = value
    ends.append(len(sorted_y))
    return ends


def within_class_permutations(
    ends: Sequence[int], generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Two index vectors that permute each interval [start, end) within itself; per interval, the
    first permutation is drawn before the second (DomainBed's order)."""
    first: list[Tensor] = []
    second: list[Tensor] = []
    start = 0
    for end in ends:
        first.append(torch.randperm(end - start, generator=generator) + start)
        second.append(torch.randperm(end - start, generator=generator) + start)
        start = end
    return torch.cat(first), torch.cat(second)


def selfreg_regulariser(
    logits: Tensor, features: Tensor, projections: Tensor, index2: Tensor, index3: Tensor, lam: float
) -> Tensor:
    """λ·(MSE(o, o₂) + 0.3·MSE(f, p₂)) + (1 − λ)·(MSE(o, o₃) + 0.3·MSE(f, p₃)); see the module docstring."""
    logits2, proj2 = logits[index2], projections[index2]
    logits3 = lam * logits2 + (1 - lam) * logits[index3]
    proj3 = lam * proj2 + (1 - lam) * projections[index3]
    individual = F.mse_loss(logits, logits2) + FEATURE_WEIGHT * F.mse_loss(features, proj2)
    mixed = F.mse_loss(logits, logits3) + FEATURE_WEIGHT * F.mse_loss(features, proj3)
    return lam * individual + (1 - lam) * mixed


@ALGORITHMS.register("selfreg", SelfRegHParams)
class SelfReg(Algorithm):
    """SelfReg with DomainBed semantics; see the module docstring."""

    paper = (
        "Kim, Yoo, Park, Kim, Lee, Kim, SelfReg: Self-supervised Contrastive Regularization for Domain "
        "Generalization, ICCV 2021, arXiv:2104.09841"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:SelfReg"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.cdpl = projection_head(backbone.n_outputs)
        self.optimizer = self.make_optimizer()

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        lam = float(np.random.beta(BETA_ALPHA, BETA_ALPHA))
        y, order = torch.sort(y, stable=True)
        x = x[order]

        features = self.featurizer(x)
        logits = self.classifier(features)
        projections = self.cdpl(features)
        index2, index3 = within_class_permutations(class_interval_ends(y))
        index2, index3 = to_device(index2, y.device), to_device(index3, y.device)  # no host wait on CUDA
        reg = selfreg_regulariser(logits, features, projections, index2, index3, lam)

        loss = F.cross_entropy(logits, y)
        # DomainBed's min(CE.item(), 1), kept on the device: the same float32 weight, no host read.
        scale = loss.detach().clamp(max=1.0)
        objective = loss + scale * reg
        self.optimizer.zero_grad(set_to_none=True)
        (objective + auxiliary_loss(self)).backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "penalty": reg.detach(), "reg_weight": scale}
