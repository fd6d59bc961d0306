"""GroupDRO: minimise the worst-domain risk with online exponentiated-gradient domain weights.

Sagawa, Koh, Hashimoto, Liang, "Distributionally Robust Neural Networks for Group Shifts: On the
Importance of Regularization for Worst-Case Generalization", ICLR 2020, arXiv:1911.08731
(Algorithm 1), with the training domains as the groups. Reference: facebookresearch/DomainBed
`domainbed/algorithms.py` class `GroupDRO` and `domainbed/hparams_registry.py` (`groupdro_eta`),
read at commit 22002ea.

One step, as in DomainBed's `GroupDRO.update`:

1. For each training domain d, in the order the trainer passes them, a forward of that domain's
   minibatch alone (so BatchNorm sees per-domain batch statistics, as in DomainBed) and its mean
   cross-entropy L_d.
2. q_d ← q_d · exp(η · L_d) with L_d detached, then q ← q / Σ q (the exponentiated-gradient
   ascent step of Algorithm 1, on the simplex).
3. The robust loss Σ_d q_d L_d, with the *updated* q, is differentiated; one Adam step.

`q` is a persistent buffer of the algorithm (`state_dict` key `q`), so a checkpoint resumes with
the weights the run had reached.

Metrics and choices:
- `loss` is the mean of the per-domain losses, (1/D) Σ_d L_d: the quantity ERM logs when domain
  batches have equal size, so runs of different algorithms compare. DomainBed logs the robust
  loss under `loss`; here it is `robust_loss`. `q0`, `q1`, ... are the weights after the update.
- q starts at 1/D in `__init__`. DomainBed registers an empty buffer and fills it with ones at the
  first update; after the first normalisation the two coincide exactly up to rounding of the
  common factor, and a fixed-size buffer loads from a checkpoint into a freshly built instance
  (DomainBed's empty buffer does not).
- The backbone's auxiliary loss (`dgbench.backbones.auxiliary`) is collected after each domain's
  forward and its mean over the domains is added to the robust loss: it is the backbone's own
  regulariser, not a per-domain risk, so it is not reweighted by q.
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
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class GroupDROHParams(AlgorithmHParams):
    """DomainBed's GroupDRO hparams: the shared ones plus the step size of the weights q."""

    groupdro_eta: float = hparam(
        1e-2, LogUniform(-3, -1), "step size η of the domain weights: q_d ← q_d·exp(η·L_d), normalised"
    )


@ALGORITHMS.register("groupdro", GroupDROHParams)
class GroupDRO(Algorithm):
    """GroupDRO with DomainBed semantics; see the module docstring."""

    paper = (
        "Sagawa, Koh, Hashimoto, Liang, Distributionally Robust Neural Networks for Group Shifts: On the "
        "Importance of Regularization for Worst-Case Generalization, ICLR 2020, arXiv:1911.08731"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:GroupDRO"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()
        self.register_buffer("q", torch.full((num_domains,), 1.0 / num_domains))

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        if len(batches) != self.q.numel():
            raise ValueError(f"GroupDRO was built for {self.q.numel()} domains, got {len(batches)} batches")
        losses: list[Tensor] = []
        auxiliary: list[Tensor | float] = []
        for x, y in batches:
            losses.append(F.cross_entropy(self.predict(x), y))
            auxiliary.append(auxiliary_loss(self))
        domain_losses = torch.stack(losses)
        self.update_weights(domain_losses.detach())
        robust_loss = torch.dot(domain_losses, self.q.to(domain_losses.dtype))
        extra = sum(auxiliary) / len(auxiliary)
        self.optimizer.zero_grad(set_to_none=True)
        (robust_loss + extra).backward()
        self.optimizer.step()

        values = torch.cat([domain_losses.detach().mean()[None], robust_loss.detach()[None], self.q]).unbind()
        metrics = {"loss": values[0], "robust_loss": values[1]}
        metrics.update({f"q{d}": value for d, value in enumerate(values[2:])})
        return metrics

    @torch.no_grad()
    def update_weights(self, domain_losses: Tensor) -> None:
        """q ← q·exp(η·L) / Σ q·exp(η·L), in place (DomainBed's order of operations)."""
        self.q.mul_(torch.exp(self.cfg.groupdro_eta * domain_losses.to(self.q.dtype)))
        self.q.div_(self.q.sum())
