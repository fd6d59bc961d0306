"""ERM: empirical risk minimisation on the pooled training domains.

Vapnik, "Statistical Learning Theory", 1998; as run in DomainBed
(Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021,
arXiv:2007.01434; reference: facebookresearch/DomainBed `domainbed/algorithms.py`
class `ERM`, commit b93c22a). One step: concatenate the per-domain minibatches,
mean cross-entropy over the pooled batch, one Adam step. No LR schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class ERMHParams(AlgorithmHParams):
    """ERM has only the shared DomainBed hparams."""


@ALGORITHMS.register("erm", ERMHParams)
class ERM(Algorithm):
    paper = (
        "Vapnik, Statistical Learning Theory, Wiley 1998; as run in Gulrajani, Lopez-Paz, In Search of "
        "Lost Domain Generalization, ICLR 2021, arXiv:2007.01434"
    )
    reference = "facebookresearch/DomainBed@b93c22a domainbed/algorithms.py:ERM"
    graph_safe = True  # one forward, one backward, one Adam step; nothing read on the host

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        logits = self.predict(x)
        loss = F.cross_entropy(logits, y)
        penalty = self.logit_penalty(logits)
        objective = loss if penalty is None else loss + self.penalty_weight() * penalty
        self.optimizer.zero_grad(set_to_none=True)
        (objective + auxiliary_loss(self)).backward()
        self.optimizer.step()
        if penalty is None:
            return {"loss": loss.detach()}
        return {"loss": loss.detach(), "penalty": penalty.detach()}

    def logit_penalty(self, logits: Tensor) -> Tensor | None:
        """A term on the pooled logits added to the CE (with `penalty_weight`); None for ERM.
        Subclasses that only regularise the logits (SD) override this and nothing else."""
        return None

    def penalty_weight(self) -> float:
        return 0.0
