"""The step shared by DomainBed's penalty baselines (IRM, VREx, CORAL, MMD).

Each of these minimises, with one Adam step per update,

    objective = nll + w_t · penalty,   nll = (1/m) Σ_e CE_e   (mean of the m per-domain risks)

and differs only in the penalty and in how the network is run (one pooled forward for IRM and
VREx, one forward per domain for CORAL and MMD, as in DomainBed). `PenaltyAlgorithm` owns the
Adam optimizer, the `update_count` buffer (in the state_dict, so a resumed run sees the same
schedule) and the annealing schedule of DomainBed's IRM and VREx:

- w_t = `warmup_weight` (1.0 in DomainBed) while update_count < anneal_iters, then w_t = λ;
- at the update where update_count == anneal_iters, Adam is re-created from scratch (moments and
  step count dropped) before the backward: DomainBed's "Reset Adam, because it doesn't like the
  sharp jump in gradient magnitudes". With anneal_iters = 0 that happens at the first update,
  where it is a no-op on an unused optimizer, as in DomainBed. A subclass without annealing
  (CORAL, MMD) returns None from `anneal_iters()` and uses λ from the first step.

Metrics: "loss" is the nll (the mean per-domain CE; with equal per-domain batch sizes it equals
ERM's pooled CE, so the two are comparable), "penalty" the unweighted penalty and "objective"
nll + w_t·penalty. DomainBed's IRM and VREx log the objective as "loss".

Reference: facebookresearch/DomainBed `domainbed/algorithms.py` classes `IRM`, `VREx`,
`AbstractMMD` (read at commit 22002ea; these classes are unchanged at b93c22a).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.algorithms.penalties import mean_pairwise_penalty
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import LogUniform, hparam

Auxiliary = Tensor | float


def full_precision(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast off: penalties built from feature statistics (covariances, distances by
    expansion) lose everything to cancellation in bfloat16; DomainBed computes them in fp32."""
    return torch.autocast(device_type=device.type, enabled=False)


class PenaltyAlgorithm(Algorithm):
    """Per-domain CE + w_t·penalty with an optional warm-up; see the module docstring.

    Subclasses implement `losses` and `penalty_lambda`, and `anneal_iters` if they anneal.
    """

    warmup_weight: ClassVar[float] = 1.0  # w_t before anneal_iters (DomainBed IRM/VREx: 1.0)

    host_buffers = ("update_count",)  # read on the host each step: the warm-up and the Adam reset

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))

    def penalty_lambda(self) -> float:
        """λ, the penalty weight after the warm-up."""
        raise NotImplementedError

    def anneal_iters(self) -> int | None:
        """Updates run with `warmup_weight` before λ applies; None: no warm-up, no Adam reset."""
        return None

    def penalty_weight(self) -> float:
        """w_t at the current `update_count`."""
        anneal = self.anneal_iters()
        if anneal is None or int(self.update_count) >= anneal:
            return float(self.penalty_lambda())
        return float(self.warmup_weight)

    def losses(self, batches: Sequence[DomainBatch]) -> tuple[Tensor, Tensor, Auxiliary]:
        """(nll, penalty, auxiliary loss of the forwards differentiated) for this step."""
        raise NotImplementedError

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        weight = self.penalty_weight()
        nll, penalty, auxiliary = self.losses(batches)
        objective = nll + weight * penalty
        anneal = self.anneal_iters()
        if anneal is not None and int(self.update_count) == anneal:
            self.optimizer = self.make_optimizer()  # DomainBed's Adam reset at the switch to λ
        self.optimizer.zero_grad(set_to_none=True)
        (objective + auxiliary).backward()
        self.optimizer.step()
        self.update_count += 1
        values = torch.stack([t.detach().float() for t in (nll, penalty, objective)]).unbind()
        return dict(zip(("loss", "penalty", "objective"), values, strict=True))

    # Forwards, as DomainBed runs them.

    def pooled_logits(self, batches: Sequence[DomainBatch]) -> tuple[list[Tensor], Auxiliary]:
        """One forward over the concatenated domains, split back per domain (IRM, VREx)."""
        logits = self.predict(torch.cat([x for x, _ in batches]))
        return list(logits.split([len(x) for x, _ in batches])), auxiliary_loss(self)

    def per_domain_features(self, batches: Sequence[DomainBatch]) -> tuple[list[Tensor], Auxiliary]:
        """One featurizer forward per domain (CORAL, MMD). A backbone's auxiliary loss is taken
        after each forward (a layer keeps only its latest) and averaged over the domains, as
        the per-domain CE is."""
        features: list[Tensor] = []
        auxiliary: Auxiliary = 0.0
        for x, _ in batches:
            features.append(self.featurizer(x))
            auxiliary = auxiliary + auxiliary_loss(self)
        return features, auxiliary / len(batches)


@dataclass(kw_only=True)
class FeatureMatchingHParams(AlgorithmHParams):
    """DomainBed's CORAL/MMD hparams: the shared ones plus `mmd_gamma`."""

    mmd_gamma: float = hparam(
        1.0,
        LogUniform(-1, 1),
        "penalty weight λ on the mean pairwise feature distance (DomainBed's name; not a kernel width)",
    )


class FeatureMatchingAlgorithm(PenaltyAlgorithm):
    """DomainBed's `AbstractMMD`: per-domain CE + mmd_gamma · mean over domain pairs i < j of
    `feature_penalty(features_i, features_j)`, with one featurizer forward per domain and no
    warm-up. The penalty runs in fp32 with autocast off (`full_precision`)."""

    @staticmethod
    def feature_penalty(x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def penalty_lambda(self) -> float:
        return float(self.cfg.mmd_gamma)

    def losses(self, batches: Sequence[DomainBatch]) -> tuple[Tensor, Tensor, Auxiliary]:
        features, auxiliary = self.per_domain_features(batches)
        nll = torch.stack(
            [F.cross_entropy(self.classifier(f), y) for f, (_, y) in zip(features, batches, strict=True)]
        ).mean()
        with full_precision(features[0].device):
            penalty = mean_pairwise_penalty([f.float() for f in features], self.feature_penalty)
        return nll, penalty, auxiliary
