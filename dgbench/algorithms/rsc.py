"""RSC: Representation Self-Challenging, mute the features the true class leans on most.

Huang, Wang, Xing, Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020,
arXiv:2007.02454. Reference (semantics only, no code copied): facebookresearch/DomainBed
`domainbed/algorithms.py` class `RSC` and `domainbed/hparams_registry.py` (`rsc_f_drop_factor`,
`rsc_b_drop_factor`), read at commit 22002ea.

One step on the pooled batch (x, y) of all training domains, as DomainBed's `RSC.update`, with
f = rsc_f_drop_factor, b = rsc_b_drop_factor, h the linear head and P_q the linear-interpolation
percentile (NumPy's default, `torch.quantile(..., interpolation="linear")`):

1. z = features(x), p = h(z).
2. g = ∂(Σ_i p_i[y_i]) / ∂z: per sample, the gradient of its true-class logit (Eq. 1).
3. Feature mask, per sample i: keep z_ij iff g_ij < P_{1−f}(g_i·). About the top f fraction of
   each sample's gradient entries is muted; an entry equal to the threshold is muted (Eq. 2).
4. s = softmax(p)[y], s̃ = softmax(h(z ⊙ m_f))[y]; the confidence drop δ_i = s_i − s̃_i.
   Batch selection: sample i keeps all its features iff δ_i < P_{1−b}(δ), so the feature mask is
   applied only to the (about) top-b fraction of samples by confidence drop (Sec. 3.3).
5. m = m_f ∨ m_b; loss = CE(h(z ⊙ m), y) (no rescaling of the kept features); one Adam step.
   The masks are constants: gradients flow through z ⊙ m into the featurizer and through h.

DomainBed's formula does not reduce to ERM at f = b = 0: the percentile is then the maximum,
and `<` still mutes each sample's largest-gradient entries in the sample(s) with the largest
confidence drop. f = b = 1 mutes every feature of every sample. The step draws nothing at random
(dropout apart), so resume is exact.

Deviations from DomainBed:
- `features` = dropout(featurizer(x)) is computed once and h is the head's linear layer: dgbench
  keeps the `dropout` hparam in the head (`nn.Sequential(Dropout, Linear)`) while DomainBed's
  ResNet applies it at the end of the featurizer, so the three head evaluations of a step see the
  same dropped features, as in DomainBed. A head other than dgbench's (Dropout, Linear) is used
  whole, with its dropout, if any, redrawn per evaluation.
- Percentiles run on the device with `torch.quantile` (DomainBed: `np.percentile` on the CPU),
  computed in float64 and rounded to fp32 as NumPy does for fp32 input, so ties at an integer rank
  fall as in DomainBed; g is cast to fp32 under autocast, softmaxes are in fp32.
- Metrics: `loss` is the CE of the unmuted predictions p (what ERM logs), `rsc_loss` the CE that
  is differentiated (DomainBed logs it as `loss`), `challenged` the fraction of samples masked.
  The backbone's auxiliary loss is added to the objective.
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
from dgbench.errors import ConfigError
from dgbench.hparams import Uniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class RSCHParams(AlgorithmHParams):
    """DomainBed's RSC hparams: the shared ones plus the two drop factors."""

    rsc_f_drop_factor: float = hparam(
        1 / 3, Uniform(0, 0.5), "f: per sample, mute features whose gradient is at or above P_(1-f)"
    )
    rsc_b_drop_factor: float = hparam(
        1 / 3, Uniform(0, 0.5), "b: mute only samples whose confidence drop is at or above P_(1-b)"
    )


def percentile(values: Tensor, factor: float, dim: int | None = None) -> Tensor:
    """`np.percentile(values, (1 − factor)·100, axis=dim)` as DomainBed calls it on fp32 data:
    rank and linear interpolation in float64, the result rounded to fp32. The rounding matters
    when the rank is an integer (f = 1/3 with 10 features): the threshold is then exactly an
    entry, which `<` mutes."""
    q = (1.0 - factor) * 100 / 100  # DomainBed's percent, as NumPy turns it back into a fraction
    threshold = torch.quantile(values.double(), q, dim=dim, keepdim=dim is not None, interpolation="linear")
    return threshold.float()


def feature_keep_mask(grad: Tensor, f_drop: float) -> Tensor:
    """(B, D) bool, True where grad_ij < the (1 − f_drop) percentile of row i (Eq. 2)."""
    grad = grad.float()
    return grad < percentile(grad, f_drop, dim=1)


def sample_keep_mask(drop: Tensor, b_drop: float) -> Tensor:
    """(B, 1) bool, True for samples whose confidence drop is below the (1 − b_drop) percentile."""
    drop = drop.float()
    return (drop < percentile(drop, b_drop))[:, None]


def true_class_probability(logits: Tensor, y: Tensor) -> Tensor:
    return F.softmax(logits.float(), dim=1).gather(1, y[:, None])[:, 0]


@ALGORITHMS.register("rsc", RSCHParams)
class RSC(Algorithm):
    """RSC with DomainBed semantics; see the module docstring."""

    paper = (
        "Huang, Wang, Xing, Huang, Self-Challenging Improves Cross-Domain Generalization, "
        "ECCV 2020, arXiv:2007.02454"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:RSC"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        for key in ("rsc_f_drop_factor", "rsc_b_drop_factor"):
            if not 0.0 <= float(getattr(cfg, key)) <= 1.0:
                raise ConfigError(f"algorithm.{key} must be in [0, 1], got {getattr(cfg, key)}")
        self.optimizer = self.make_optimizer()

    def split_head(self) -> tuple[nn.Module, nn.Module]:
        """(what runs once on the features, what runs on each masked version): the head's dropout
        and its linear layer for dgbench's head, else nothing and the whole head."""
        head = self.classifier
        if isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[0], nn.Dropout):
            return head[0], head[1]
        return nn.Identity(), head

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        dropout, head = self.split_head()
        z = dropout(self.featurizer(x))
        logits = head(z)

        grad = autograd.grad(logits.gather(1, y[:, None]).sum(), z)[0]
        keep_f = feature_keep_mask(grad, self.cfg.rsc_f_drop_factor)
        with torch.no_grad():
            drop = true_class_probability(logits, y) - true_class_probability(head(z * keep_f.to(z.dtype)), y)
        keep_b = sample_keep_mask(drop, self.cfg.rsc_b_drop_factor)
        keep = keep_f | keep_b

        rsc_loss = F.cross_entropy(head(z * keep.to(z.dtype)), y)
        self.optimizer.zero_grad(set_to_none=True)
        (rsc_loss + auxiliary_loss(self)).backward()
        self.optimizer.step()

        with torch.no_grad():
            loss = F.cross_entropy(logits, y)
            challenged = (~keep_b).float().mean()
            values = torch.stack([loss.float(), rsc_loss.detach().float(), challenged]).unbind()
        return dict(zip(("loss", "rsc_loss", "challenged"), values, strict=True))
