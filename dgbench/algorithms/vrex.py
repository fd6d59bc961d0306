"""V-REx: Variance Risk Extrapolation.

Krueger, Caballero, Jacobsen, Zhang, Binas, Zhang, Le Priol, Courville, "Out-of-Distribution
Generalization via Risk Extrapolation (REx)", ICML 2021, arXiv:2003.00688. Reference (semantics
only; no code copied): facebookresearch/DomainBed `domainbed/algorithms.py` class `VREx` and
`domainbed/hparams_registry.py` (read at commit 22002ea; unchanged at b93c22a).

One step, as DomainBed's `VREx.update`:
1. one forward of the concatenated domain minibatches, logits split back per domain;
2. R_e = CE_e per domain; nll = mean_e R_e; penalty = `vrex_penalty` = mean_e (R_e − nll)²
   (biased variance, as DomainBed);
3. objective = nll + w·penalty, w = 1.0 while update_count < `vrex_penalty_anneal_iters`, then
   `vrex_lambda`; Adam is re-created at update_count == `vrex_penalty_anneal_iters` (DomainBed
   does so "like IRM"), see `penalty_base`;
4. one Adam step on objective (+ the backbone's auxiliary loss). No LR schedule.

Deviations: the logged "loss" is nll, the mean per-domain risk (DomainBed logs the objective as
"loss", and as "nll" only the *last* domain's CE, a leftover of its loop). The per-domain risks
stay on the model's device (DomainBed gathers them into a CPU tensor); the values are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dgbench.algorithms.base import AlgorithmHParams, DomainBatch
from dgbench.algorithms.penalties import vrex_penalty
from dgbench.algorithms.penalty_base import Auxiliary, PenaltyAlgorithm
from dgbench.hparams import IntLogUniform, LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class VRExHParams(AlgorithmHParams):
    """DomainBed's VREx hparams: the shared ones plus the penalty weight and its warm-up."""

    vrex_lambda: float = hparam(1e1, LogUniform(-1, 5), "V-REx variance weight λ after the warm-up")
    vrex_penalty_anneal_iters: int = hparam(
        500,
        IntLogUniform(0, 4, base=10),
        "updates with penalty weight 1.0 before λ applies; Adam is re-created at the switch",
    )


@ALGORITHMS.register("vrex", VRExHParams)
class VREx(PenaltyAlgorithm):
    """V-REx with DomainBed semantics; see the module docstring."""

    paper = (
        "Krueger, Caballero, Jacobsen, Zhang, Binas, Zhang, Le Priol, Courville, Out-of-Distribution "
        "Generalization via Risk Extrapolation (REx), ICML 2021, arXiv:2003.00688"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:VREx"

    def penalty_lambda(self) -> float:
        return float(self.cfg.vrex_lambda)

    def anneal_iters(self) -> int | None:
        return int(self.cfg.vrex_penalty_anneal_iters)

    def losses(self, batches: Sequence[DomainBatch]) -> tuple[Tensor, Tensor, Auxiliary]:
        logits, auxiliary = self.pooled_logits(batches)
        risks = torch.stack(
            [F.cross_entropy(z, y).float() for z, (_, y) in zip(logits, batches, strict=True)]
        )
        return risks.mean(), vrex_penalty(risks), auxiliary
