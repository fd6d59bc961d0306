"""Fishr: match the per-domain variances of the classifier's per-sample gradients.

Rame, Dancette, Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution
Generalization", ICML 2022, arXiv:2109.02934. Reference (semantics only; no code copied):
facebookresearch/DomainBed `domainbed/algorithms.py` class `Fishr`, `domainbed/lib/misc.py`
(`MovingAverage`, `l2_between_dicts`) and `domainbed/hparams_registry.py`, read at commit 22002ea.

One step, as DomainBed's `Fishr.update` (m training domains, head = dropout then a linear layer
W (C×D), b (C)):

1. one forward of the concatenated domain minibatches: z = dropout(featurizer(x)) (the input of
   the linear layer), logits = W z + b; nll = CE over the pooled batch (as ERM);
2. per-sample gradients of ℓ_i = CE(logits_i, y_i) (each sample's own loss, not divided by N:
   DomainBed runs BackPACK's BatchGrad on the *sum* of the per-sample losses) w.r.t. [W | b]:
       ∇ℓ_i = g_i ⊗ [z_i, 1],   g_i = softmax(logits_i) − onehot(y_i);
3. per domain e with n_e samples, the biased (÷ n_e) variance of each of the C·(D+1) entries:
       v_e = (1/n_e) Σ_i (∇ℓ_i − mean_e ∇ℓ)²;
4. an exponential moving average per domain, DomainBed's `MovingAverage` with the 1/(1 − ema)
   correction: s_e ← ema·s_e + (1 − ema)·v_e (s_e starts at 0, is stored detached, and survives
   checkpoints as the buffer `ema_variance`), and the step uses ṽ_e = s_e / (1 − ema), so the
   gradient reaching v_e does not shrink with ema;
5. penalty = (1/m) Σ_e mean_k (ṽ_e,k − v̄_k)², v̄ = (1/m) Σ_e ṽ_e; the mean runs over the
   C·(D+1) entries (`l2_between_dicts` is a mean of squares, not a squared norm);
6. objective = nll + w·penalty, w = 0 while update_count < `penalty_anneal_iters`, then λ; Adam
   is re-created at update_count == `penalty_anneal_iters` (`PenaltyAlgorithm`); one Adam step on
   objective (+ the backbone's auxiliary loss). The penalty is differentiated through z and the
   softmax (DomainBed's `create_graph=True`), so it trains the featurizer and the classifier.

The EMA is updated at every step, the warm-up included, as in DomainBed.

Checked once against DomainBed's computation re-run with BackPACK 1.7.1 (5 steps across the
anneal switch, unequal domain sizes): penalties and parameters agree to float32 rounding.

Deviations from DomainBed (the same numbers up to rounding unless said otherwise):
- per-sample gradients in closed form instead of BackPACK (no dependency), and the variance as
  (1/n)Σ(g²)ᵀ[z,1]² − ((1/n)Σ gᵀ[z,1])²: two (C×n)·(n×(D+1)) matmuls instead of an n×C×(D+1)
  tensor. That expanded form cancels, so steps 2-5 run in float64 with autocast off (DomainBed:
  centred, float32); the penalty is returned in float32 and the EMA state is kept in float32;
- the EMA state is a buffer (DomainBed: plain attributes, lost on resume; its first-update
  special case equals starting from zeros);
- during the warm-up (w = 0) the penalty is computed without a graph: its gradient is exactly
  zero there (a non-finite penalty no longer turns the warm-up step into NaN, as 0·NaN does);
- Adam is also re-created when `penalty_anneal_iters` = 0 (DomainBed skips it): a fresh Adam
  replaces an unused one, which changes nothing;
- the logged "loss" is the nll (DomainBed logs the objective as "loss"; here "objective").
  `lambda` is `lambda_` (a Python keyword); `update_count` is a 0-d buffer (DomainBed: shape (1,)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import AlgorithmHParams, DomainBatch
from dgbench.algorithms.penalty_base import Auxiliary, PenaltyAlgorithm, full_precision
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.errors import ConfigError
from dgbench.hparams import IntUniform, LogUniform, Uniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class FishrHParams(AlgorithmHParams):
    """DomainBed's Fishr hparams: the shared ones plus the penalty weight, its warm-up and the EMA."""

    lambda_: float = hparam(1e3, LogUniform(1, 4), "penalty weight λ after the warm-up (DomainBed `lambda`)")
    penalty_anneal_iters: int = hparam(
        1500,
        IntUniform(0, 5000),
        "updates with penalty weight 0 before λ applies; Adam is re-created at the switch",
    )
    ema: float = hparam(
        0.95, Uniform(0.90, 0.99), "decay of the per-domain moving average of the gradient variances"
    )


def logit_gradients(logits: Tensor, y: Tensor) -> Tensor:
    """∂CE(logits_i, y_i)/∂logits_i for every sample i: softmax(logits_i) − onehot(y_i), (n, C).

    The per-sample gradient w.r.t. a linear layer's weight is its outer product with the layer's
    input, and w.r.t. the bias it is this row itself."""
    return torch.softmax(logits, dim=-1) - F.one_hot(y, logits.shape[-1]).to(logits.dtype)


def head_gradient_variance(z: Tensor, logits: Tensor, y: Tensor) -> Tensor:
    """Biased variance over the batch of the per-sample CE gradients w.r.t. [W | b], (C, D + 1).

    Entry (c, k) is (1/n) Σ_i (G_ick − mean_i G_ick)² with G_i = g_i ⊗ [z_i, 1], computed as the
    second moment minus the squared mean, without forming G. Differentiable in z and logits; the
    expansion cancels, so call it in float64.
    """
    g = logit_gradients(logits, y)
    inputs = F.pad(z, (0, 1), value=1.0)  # the bias is a weight on a constant input 1
    n = len(z)
    second_moment = (g * g).t() @ (inputs * inputs) / n
    mean = g.t() @ inputs / n
    return second_moment - mean * mean


def variance_distance(variances: Tensor) -> Tensor:
    """(1/m) Σ_e mean_k (v_e,k − v̄_k)² for per-domain variances (m, ...), v̄ their mean over e."""
    return (variances - variances.mean(dim=0, keepdim=True)).pow(2).mean()


@ALGORITHMS.register("fishr", FishrHParams)
class Fishr(PenaltyAlgorithm):
    """Fishr with DomainBed semantics; see the module docstring."""

    paper: ClassVar[str] = (
        "Rame, Dancette, Cord, Fishr: Invariant Gradient Variances for Out-of-Distribution "
        "Generalization, ICML 2022, arXiv:2109.02934"
    )
    reference: ClassVar[str] = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:Fishr"
    warmup_weight: ClassVar[float] = 0.0  # DomainBed's Fishr: no penalty before the anneal step

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        if not 0.0 <= cfg.ema < 1.0:
            raise ConfigError(f"algorithm.ema must be in [0, 1) (it divides by 1 - ema), got {cfg.ema}")
        super().__init__(backbone, num_classes, num_domains, cfg)
        shape = (num_domains, num_classes, backbone.n_outputs + 1)
        self.register_buffer("ema_variance", torch.zeros(shape))  # s_e, uncorrected, per domain

    def penalty_lambda(self) -> float:
        return float(self.cfg.lambda_)

    def anneal_iters(self) -> int | None:
        return int(self.cfg.penalty_anneal_iters)

    def losses(self, batches: Sequence[DomainBatch]) -> tuple[Tensor, Tensor, Auxiliary]:
        if len(batches) != self.num_domains:
            raise ValueError(f"Fishr keeps a moving average per domain: expected {self.num_domains} batches")
        y = torch.cat([y for _, y in batches])
        dropout, linear = self.classifier
        z = dropout(self.featurizer(torch.cat([x for x, _ in batches])))
        auxiliary = auxiliary_loss(self)
        logits = linear(z)
        nll = F.cross_entropy(logits, y)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.penalty_weight() != 0.0):
            penalty = self.variance_penalty(z, logits, y, [len(x) for x, _ in batches])
        return nll, penalty, auxiliary

    def variance_penalty(self, z: Tensor, logits: Tensor, y: Tensor, sizes: list[int]) -> Tensor:
        """Steps 3-5: per-domain variances, their EMA (updating `ema_variance`), the distance."""
        ema = float(self.cfg.ema)
        with full_precision(z.device):
            pairs = zip(z.double().split(sizes), logits.double().split(sizes), y.split(sizes), strict=True)
            variances = torch.stack([head_gradient_variance(*pair) for pair in pairs])
            state = ema * self.ema_variance.double() + (1.0 - ema) * variances
            self.ema_variance.copy_(state.detach())
            return variance_distance(state / (1.0 - ema)).float()
