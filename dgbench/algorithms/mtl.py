"""MTL: marginal transfer learning, a classifier of (features, embedding of the domain's marginal).

Blanchard, Deshmukh, Dogan, Lee, Scott, "Domain Generalization by Marginal Transfer Learning",
JMLR 22(2), 2021, arXiv:1711.07910; as a neural network in DomainBed. Reference (semantics only;
no code copied): facebookresearch/DomainBed `domainbed/algorithms.py` class `MTL` and
`domainbed/hparams_registry.py` (`mtl_ema`), read at commit 22002ea.

The classifier sees each example's features f(x) next to an embedding μ of the distribution its
domain draws from (the paper's kernel mean embedding of P_X, here the mean feature). One step, as
in DomainBed's `MTL.update`:

1. For each training domain d, in the order the trainer passes them, a forward of that domain's
   minibatch alone: f = dropout(featurizer(x_d)).
2. Its embedding e_d = ema · mean_batch(f) + (1 − ema) · E[d], where E is the per-domain
   embedding memory (ema = `mtl_ema`; note that ema weights the *current* batch). The gradient
   flows through the current batch's mean; E[d] is a constant. E[d] ← e_d (detached).
3. L_d = CE(classifier([f, e_d]), y_d), the embedding repeated for every example.
4. objective = Σ_d L_d (a sum, as DomainBed), one Adam step over featurizer and classifier.

`predict(x)` uses the batch's own mean feature as the embedding, classifier([f, mean_batch(f)]):
it is transductive. The trainer evaluates one domain's split at a time, so the batch is a sample
of that domain (of `trainer.eval_batch_size`, 256; DomainBed evaluates batches of 64), and a
prediction depends on the other images of its batch.

Fit to dgbench's base class and deviations from DomainBed:
- The classifier is one `nn.Linear(2·n_features, num_classes)`; the `dropout` hparam drops the
  featurizer's outputs *before* the mean and the concatenation (`self.dropout`). That is where
  DomainBed's `resnet_dropout` acts (inside its featurizer), so the embedding is the mean of the
  dropped-out features as in DomainBed; the base class's head (dropout, then a linear layer on
  n_features) does not fit a 2·n_features input.
- DomainBed overwrites the embedding with standard normal noise (`.normal_()` on it, in training
  and in `predict`), so its classifier gets no information from the embedding, the EMA memory is
  written but never read, and predictions are random (DomainBed issue #159, open). That is
  degenerate; the paper's and DomainBed's evident intent, the embedding itself, is used here.
- `loss` is the mean of the per-domain cross-entropies (ERM's quantity for equal batch sizes);
  `objective` is the differentiated sum, which DomainBed logs as `loss`.
- E is a persistent buffer (`state_dict` key `embeddings`, zeros at start as in DomainBed), so a
  checkpoint resumes it. The mean and the EMA are computed in fp32 under autocast.
- The backbone's auxiliary loss is collected after each domain's forward and its mean over the
  domains is added to the objective (it is the backbone's own regulariser, not a per-domain risk).
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
from dgbench.hparams import Choice, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class MTLHParams(AlgorithmHParams):
    """DomainBed's MTL hparams: the shared ones plus the EMA weight of the domain embeddings."""

    mtl_ema: float = hparam(
        0.99,
        Choice([0.5, 0.9, 0.99, 1.0]),
        "weight of the current batch's mean feature in a domain's embedding: "
        "e_d = ema·mean(f) + (1−ema)·e_d (1.0: no memory)",
    )


def ema_embedding(features: Tensor, memory: Tensor, ema: float) -> Tensor:
    """ema · mean over the batch of `features` + (1 − ema) · `memory`, in fp32; differentiable in
    `features` only."""
    return ema * features.float().mean(dim=0) + (1.0 - ema) * memory.detach().float()


@ALGORITHMS.register("mtl", MTLHParams)
class MTL(Algorithm):
    """Marginal transfer learning with DomainBed semantics; see the module docstring."""

    paper = (
        "Blanchard, Deshmukh, Dogan, Lee, Scott, Domain Generalization by Marginal Transfer "
        "Learning, JMLR 2021, arXiv:1711.07910"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:MTL"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        n_features = backbone.n_outputs
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(2 * n_features, num_classes)  # input: [features, embedding]
        self.register_buffer("embeddings", torch.zeros(num_domains, n_features))
        self.optimizer = self.make_optimizer()

    def features(self, x: Tensor) -> Tensor:
        return self.dropout(self.featurizer(x))

    def head(self, features: Tensor, embedding: Tensor) -> Tensor:
        """Logits of classifier([features, embedding]), one embedding (n,) for the whole batch."""
        repeated = embedding.to(features.dtype).expand(features.shape[0], -1)
        return self.classifier(torch.cat([features, repeated], dim=1))

    def predict(self, x: Tensor) -> Tensor:
        features = self.features(x)
        return self.head(features, features.float().mean(dim=0))

    def domain_logits(self, x: Tensor, domain: int) -> Tensor:
        """Training logits of one domain's minibatch; moves E[domain] to this step's embedding."""
        features = self.features(x)
        embedding = ema_embedding(features, self.embeddings[domain], float(self.cfg.mtl_ema))
        with torch.no_grad():
            self.embeddings[domain].copy_(embedding.detach())
        return self.head(features, embedding)

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        if len(batches) != self.embeddings.shape[0]:
            raise ValueError(
                f"MTL was built for {self.embeddings.shape[0]} domains, got {len(batches)} batches"
            )
        losses: list[Tensor] = []
        auxiliary: list[Tensor | float] = []
        for domain, (x, y) in enumerate(batches):
            losses.append(F.cross_entropy(self.domain_logits(x, domain), y))
            auxiliary.append(auxiliary_loss(self))
        domain_losses = torch.stack(losses)
        objective = domain_losses.sum()
        self.optimizer.zero_grad(set_to_none=True)
        (objective + sum(auxiliary) / len(auxiliary)).backward()
        self.optimizer.step()
        values = torch.stack([domain_losses.detach().mean(), objective.detach()]).unbind()
        return {"loss": values[0], "objective": values[1]}
