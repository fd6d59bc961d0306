"""SagNet: style-agnostic networks, content and style heads with style and content randomisation.

Nam, Lee, Park, Yoon, Yoo, "Reducing Domain Gap by Reducing Style Bias", CVPR 2021,
arXiv:1910.11645 (Algorithm 1). Reference (semantics only; no code copied):
facebookresearch/DomainBed `domainbed/algorithms.py` class `SagNet` and
`domainbed/hparams_registry.py` (`sag_w_adv`), read at commit 22002ea.

Randomisation (`randomize`), on the featurizer's output z of shape (N, C) as in DomainBed. Each
sample's "style" is the mean μ and the unbiased variance σ² of its C features; its "content" is
the normalised vector n = (z − μ) / √(σ² + ε), ε = 1e-5. With α ~ U(0, 1) per sample and a
random permutation p of the batch:
- style randomisation keeps n_i and mixes the style: z'_i = n_i · √(σ'²_i + ε) + μ'_i with
  μ'_i = α_i μ_i + (1 − α_i) μ_p(i), σ'²_i = α_i σ²_i + (1 − α_i) σ²_p(i);
- content randomisation keeps the style and swaps the content: z'_i = n_p(i) · √(σ²_i + ε) + μ_i,
  with n_p(i) a constant (no gradient through the swapped content).
For an (N, C, *spatial) map the same formulas hold per (sample, channel) over the spatial
positions (DomainBed's 4-D branch, the paper's setting); `SagNet` only calls it on (N, C).

One step (three optimizers, Adam each: featurizer f, content head c, style head s):
1. content: L_c = CE(c(style_randomize(f(x))), y) on the pooled domains; step f and c.
2. style: L_s = CE(s(content_randomize(f(x))), y), with f as updated in 1; step s only.
3. adversary: L_adv = sag_w_adv · (−mean over examples and classes of log_softmax(s(
   content_randomize(f(x))))), with s as updated in 2: the cross-entropy of the style head
   against the uniform distribution, which f minimises so that the style statistics stop
   predicting the class; step f only.
Every step runs the featurizer anew (new dropout masks, BatchNorm statistics), as DomainBed.
`predict(x)` = c(dropout(f(x))), without randomisation.

Why the pooled (N, C) vector: DomainBed applies `randomize` to the featurizer's output, so the
"per-channel statistics" are per-sample statistics over the feature dimension: one mean and one
variance per sample, not per channel. That is not degenerate: no NaN for C ≥ 2 (checked at
construction), not a no-op (it rescales and shifts each feature vector, and the style head can
read μ_i and σ_i), but a much coarser style than the paper's channel-wise statistics of a
spatial map inside a ResNet (randomised after layer3, then two copies of layer4). That split
needs a backbone-specific cut and a second copy of the network's tail; it cannot be done the
same way for every backbone (ViTs, linear featurizers), and DomainBed itself kept the pooled
version so that every algorithm gets the same network. dgbench follows DomainBed.

Deviations from DomainBed and choices:
- The `dropout` hparam drops the featurizer's outputs before the randomisation (`self.dropout`,
  where DomainBed's `resnet_dropout` acts); both heads are plain linear layers.
- Step 2 runs the featurizer without gradient: DomainBed back-propagates L_s into f and discards
  that gradient (f's gradients are zeroed before step 3), so parameters are the same.
- The randomisation runs in fp32 with autocast off (a variance and a division by it).
- With sag_w_adv = 0 f gets a zero gradient in step 3, and Adam still takes that step (moments,
  weight decay), as in DomainBed; the step count of f's optimizer is two per update.
- The backbone's auxiliary loss is added to L_c (the step that trains f for the task); the terms
  of the other two forwards are dropped, so f is regularised once per update.
- Metrics: `loss` = L_c (the content head's cross-entropy on the pooled training domains, under
  style randomisation; DomainBed's `loss_c`), `loss_s` = L_s, `loss_adv` = the weighted L_adv
  (as DomainBed's `loss_adv`).
- The random draws are DomainBed's: per `randomize` call, α = `torch.rand(N, 1)` then
  `torch.randperm(N)`, on the CPU generator, also in content mode where α is unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.algorithms.penalty_base import full_precision
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.devices import to_device
from dgbench.errors import ConfigError
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS

EPS = 1e-5  # DomainBed's ε in √(σ² + ε)


@dataclass(kw_only=True)
class SagNetHParams(AlgorithmHParams):
    """DomainBed's SagNet hparams: the shared ones plus the weight of the adversarial loss."""

    sag_w_adv: float = hparam(
        0.1, LogUniform(-2, 1), "weight of the featurizer's adversarial loss against the style head"
    )


def randomize(
    z: Tensor, what: Literal["style", "content"], alpha: Tensor, perm: Tensor, eps: float = EPS
) -> Tensor:
    """Style or content randomisation of `z` (N, C) or (N, C, *spatial); see the module docstring.

    `alpha` (N,) are the style mixing weights (unused for content), `perm` (N,) the partners.
    """
    shape = z.shape
    flat = z.reshape(shape[0], shape[1], -1) if z.dim() > 2 else z
    weight = alpha.to(flat.dtype).reshape(-1, *([1] * (flat.dim() - 1)))
    mean = flat.mean(dim=-1, keepdim=True)
    var = flat.var(dim=-1, keepdim=True)
    content = (flat - mean) / (var + eps).sqrt()
    if what == "style":
        mean = weight * mean + (1 - weight) * mean[perm]
        var = weight * var + (1 - weight) * var[perm]
    elif what == "content":
        content = content[perm].detach()
    else:
        raise ValueError(f"randomize: what={what!r}, expected 'style' or 'content'")
    return (content * (var + eps).sqrt() + mean).reshape(shape)


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """−mean over examples and classes of log_softmax(logits): CE against the uniform label
    distribution (DomainBed's adversarial loss before its weight), in fp32."""
    return -F.log_softmax(logits.float(), dim=1).mean()


@ALGORITHMS.register("sagnet", SagNetHParams)
class SagNet(Algorithm):
    """SagNet with DomainBed semantics; see the module docstring."""

    paper = (
        "Nam, Lee, Park, Yoon, Yoo, Reducing Domain Gap by Reducing Style Bias, CVPR 2021, arXiv:1910.11645"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:SagNet"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        n_features = backbone.n_outputs
        if n_features < 2:
            raise ConfigError(
                f"algorithm=sagnet needs at least 2 features (their variance is the style); "
                f"the backbone has n_outputs={n_features}"
            )
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(n_features, num_classes)  # the content head
        self.style_classifier = nn.Linear(n_features, num_classes)
        self.optimizer_f = self.make_optimizer(self.featurizer.parameters())
        self.optimizer_c = self.make_optimizer(self.classifier.parameters())
        self.optimizer_s = self.make_optimizer(self.style_classifier.parameters())

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "optimizer_f": self.optimizer_f,
            "optimizer_c": self.optimizer_c,
            "optimizer_s": self.optimizer_s,
        }

    def features(self, x: Tensor) -> Tensor:
        return self.dropout(self.featurizer(x))

    def predict(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def mixing(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(α, permutation) of one `randomize` call, drawn as DomainBed draws them."""
        alpha = torch.rand(n, 1).reshape(n)
        perm = torch.randperm(n)
        return to_device(alpha, device), to_device(perm, device)  # pinned, queued: no host wait on CUDA

    def randomized(self, z: Tensor, what: Literal["style", "content"]) -> Tensor:
        with full_precision(z.device):
            return randomize(z.float(), what, *self.mixing(z.shape[0], z.device))

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])

        # 1. content: the content head on style-randomised features trains f and c.
        loss_c = F.cross_entropy(self.classifier(self.randomized(self.features(x), "style")), y)
        self.optimizer_f.zero_grad(set_to_none=True)
        self.optimizer_c.zero_grad(set_to_none=True)
        (loss_c + auxiliary_loss(self)).backward()
        self.optimizer_f.step()
        self.optimizer_c.step()

        # 2. style: the style head on content-randomised features; f's gradient would be discarded.
        with torch.no_grad():
            z = self.features(x)
        auxiliary_loss(self)  # not differentiated: drop this forward's term
        loss_s = F.cross_entropy(self.style_classifier(self.randomized(z, "content")), y)
        self.optimizer_s.zero_grad(set_to_none=True)
        loss_s.backward()
        self.optimizer_s.step()

        # 3. adversary: f makes the (updated) style head's prediction uniform.
        style_logits = self.style_classifier(self.randomized(self.features(x), "content"))
        auxiliary_loss(self)
        loss_adv = float(self.cfg.sag_w_adv) * uniform_cross_entropy(style_logits)
        self.optimizer_f.zero_grad(set_to_none=True)
        loss_adv.backward()
        self.optimizer_f.step()

        values = torch.stack([loss_c.detach().float(), loss_s.detach().float(), loss_adv.detach()]).unbind()
        return {"loss": values[0], "loss_s": values[1], "loss_adv": values[2]}
