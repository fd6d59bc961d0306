"""AND-mask: keep only the gradient components whose sign agrees across training domains.

Parascandolo, Neitz, Orvieto, Gresele, Schölkopf, "Learning explanations that are hard to vary",
ICLR 2021, arXiv:2009.00329. Reference: facebookresearch/DomainBed `domainbed/algorithms.py`
class `ANDMask` (its `update` and `mask_grads`) and `domainbed/hparams_registry.py` (`tau`), read
at commit 22002ea.

One step, as in DomainBed's `ANDMask.update`:

1. For each training domain d, a forward of that domain's minibatch alone and the gradient g_d of
   its mean cross-entropy with respect to every trainable parameter.
2. Per parameter tensor, elementwise: mask = |mean_d sign(g_d)| ≥ τ; the gradient is
   mask · mean_d g_d / (1e-10 + mean(mask)) (rescaled by the kept fraction of that tensor).
3. That gradient is written into `.grad`; one Adam step.

With τ = 0 every component is kept and the gradient is the plain mean of the per-domain
gradients (ERM's gradient when the domain batches have equal size); with τ = 1 exactly the
components on which all domains agree in sign (and none is zero) are kept.

Choices:
- The backbone's auxiliary loss (`dgbench.backbones.auxiliary`) is the backbone's own
  regulariser, not a domain risk: its gradient, averaged over the domains' forwards, is added
  after masking, unmasked.
- Trainable parameters that a domain's loss does not reach get a zero gradient for that domain.
- `loss` is the mean of the per-domain CE losses (DomainBed's metric); no penalty is logged.
- The masked gradient (stacked per-domain gradients, so laid out contiguously) is copied into its
  parameter's layout: fused Adam on CUDA refuses a channels_last weight with a contiguous gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import Uniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class ANDMaskHParams(AlgorithmHParams):
    """DomainBed's ANDMask hparams: the shared ones plus the agreement threshold τ."""

    tau: float = hparam(1.0, Uniform(0.5, 1.0), "keep a component when |mean over domains of its sign| ≥ τ")


def and_mask(grads: Tensor, tau: float) -> Tensor:
    """The float mask |mean_d sign(grads[d])| ≥ τ for gradients stacked on dim 0 (one per domain)."""
    return (torch.sign(grads).mean(dim=0).abs() >= tau).to(grads.dtype)


def masked_mean_gradient(grads: Tensor, tau: float) -> Tensor:
    """mask · mean_d grads[d] / (1e-10 + mean(mask)), DomainBed's `mask_grads` for one tensor."""
    mask = and_mask(grads, tau)
    return mask * grads.mean(dim=0) * (1.0 / (1e-10 + mask.sum() / mask.numel()))


def _gradients(loss: Tensor | float, params: list[nn.Parameter], retain_graph: bool) -> list[Tensor]:
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@ALGORITHMS.register("andmask", ANDMaskHParams)
class ANDMask(Algorithm):
    """AND-mask with DomainBed semantics; see the module docstring."""

    paper = (
        "Parascandolo, Neitz, Orvieto, Gresele, Schölkopf, Learning explanations that are hard to vary, "
        "ICLR 2021, arXiv:2009.00329"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:ANDMask"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        params = [p for p in self.parameters() if p.requires_grad]
        per_domain: list[list[Tensor]] = []
        auxiliary: list[list[Tensor]] = []
        losses: list[Tensor] = []
        for x, y in batches:
            loss = F.cross_entropy(self.predict(x), y)
            extra = auxiliary_loss(self)
            has_extra = isinstance(extra, Tensor) and extra.requires_grad
            per_domain.append(_gradients(loss, params, retain_graph=has_extra))
            if has_extra:
                auxiliary.append(_gradients(extra, params, retain_graph=False))
            losses.append(loss.detach())

        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for i, param in enumerate(params):
                grad = masked_mean_gradient(torch.stack([g[i] for g in per_domain]), self.cfg.tau)
                if auxiliary:
                    grad = grad + torch.stack([a[i] for a in auxiliary]).sum(0) / len(batches)
                param.grad = torch.empty_like(param).copy_(grad)  # the param's strides: fused Adam needs them
        self.optimizer.step()
        return {"loss": torch.stack(losses).mean().detach()}
