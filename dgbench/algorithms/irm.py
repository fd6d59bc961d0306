"""IRM: Invariant Risk Minimization (IRMv1).

Arjovsky, Bottou, Gulrajani, Lopez-Paz, "Invariant Risk Minimization", arXiv:1907.02893, 2019.
Reference (semantics only; no code copied): facebookresearch/DomainBed `domainbed/algorithms.py`
class `IRM` and `domainbed/hparams_registry.py` (read at commit 22002ea; unchanged at b93c22a).

One step, as DomainBed's `IRM.update`:
1. one forward of the concatenated domain minibatches, logits split back per domain;
2. nll = mean over domains of CE_e; penalty = mean over domains of `irm_penalty` (the product of
   ∂CE/∂s at s = 1 on the even- and odd-indexed halves of the domain's batch);
3. objective = nll + w·penalty, w = 1.0 while update_count < `irm_penalty_anneal_iters`, then
   `irm_lambda`; at update_count == `irm_penalty_anneal_iters` Adam is re-created (DomainBed's
   reset for the jump in gradient scale), see `penalty_base`;
4. one Adam step on objective (+ the backbone's auxiliary loss). No LR schedule.

Deviations: the logged "loss" is the nll (DomainBed: the objective, here "objective"; DomainBed's
"nll" is this "loss"). `update_count` is a 0-d int64 buffer (DomainBed: shape (1,)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dgbench.algorithms.base import AlgorithmHParams, DomainBatch
from dgbench.algorithms.penalties import irm_penalty
from dgbench.algorithms.penalty_base import Auxiliary, PenaltyAlgorithm
from dgbench.hparams import IntLogUniform, LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class IRMHParams(AlgorithmHParams):
    """DomainBed's IRM hparams: the shared ones plus the penalty weight and its warm-up."""

    irm_lambda: float = hparam(1e2, LogUniform(-1, 5), "IRM penalty weight λ after the warm-up")
    irm_penalty_anneal_iters: int = hparam(
        500,
        IntLogUniform(0, 4, base=10),
        "updates with penalty weight 1.0 before λ applies; Adam is re-created at the switch",
    )


@ALGORITHMS.register("irm", IRMHParams)
class IRM(PenaltyAlgorithm):
    """IRMv1 with DomainBed semantics; see the module docstring."""

    paper = (
        "Arjovsky, Bottou, Gulrajani, Lopez-Paz, Invariant Risk Minimization, preprint 2019, arXiv:1907.02893"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:IRM"

    def penalty_lambda(self) -> float:
        return float(self.cfg.irm_lambda)

    def anneal_iters(self) -> int | None:
        return int(self.cfg.irm_penalty_anneal_iters)

    def losses(self, batches: Sequence[DomainBatch]) -> tuple[Tensor, Tensor, Auxiliary]:
        logits, auxiliary = self.pooled_logits(batches)
        pairs = list(zip(logits, (y for _, y in batches), strict=True))
        nll = torch.stack([F.cross_entropy(z, y) for z, y in pairs]).mean()
        penalty = torch.stack([irm_penalty(z.float(), y) for z, y in pairs]).mean()
        return nll, penalty, auxiliary
