"""DANN and CDANN: domain-adversarial feature learning with a domain discriminator.

DANN: Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand, Lempitsky,
"Domain-Adversarial Training of Neural Networks", JMLR 17(59), 2016, arXiv:1505.07818.
CDANN: Li, Tian, Gong, Liu, Liu, Zhang, Tao, "Deep Domain Generalization via Conditional
Invariant Adversarial Networks", ECCV 2018. Reference (semantics only; no code copied):
facebookresearch/DomainBed `domainbed/algorithms.py` classes `AbstractDANN`, `DANN`, `CDANN`,
`domainbed/networks.py` class `MLP` and `domainbed/hparams_registry.py`, read at commit 22002ea.

One step, as in DomainBed's `AbstractDANN.update`:

1. `update_count` += 1 (a persistent buffer, so a checkpoint resumes the alternation).
2. z = featurizer(concatenated minibatches). The discriminator input is z (DANN) or
   z + class_embedding(y) (CDANN); the discriminator predicts the index of the domain each
   example came from.
3. disc_loss = cross-entropy of the discriminator (CDANN: class-balanced, each example weighted
   1 / (n_y · C'), C' = largest label in the batch + 1, summed) + grad_penalty · P, where
   P = mean over examples of ||∂ CE_sum / ∂ disc_input||² (the summed, unweighted cross-entropy).
4. If update_count % (1 + d_steps_per_g_step) < d_steps_per_g_step: a discriminator step
   (Adam over the discriminator and class embeddings, lr_d, weight_decay_d, betas (beta1, 0.9))
   on disc_loss. Otherwise a generator step (Adam over featurizer and classifier, lr_g,
   weight_decay_g, betas (beta1, 0.9)) on
   gen_loss = CE(classifier(z), y) + (−lambda_ · disc_loss) + auxiliary_loss.

Metrics and choices (deviations from DomainBed):
- `loss` is the classifier's cross-entropy on the pooled batch in both kinds of step (in a
  discriminator step it is computed without gradient, for the log only); `disc_loss`,
  `grad_penalty` (the unweighted P, 0 when not computed) and `d_step` (1.0 / 0.0) are logged
  too, and `gen_loss` on generator steps. DomainBed logs only `disc_loss` or `gen_loss`.
- When grad_penalty == 0 the penalty's double backward is skipped (its weighted term is exactly
  0 either way); DomainBed always computes it.
- DANN has no class embeddings (DomainBed builds them and hands them to the discriminator's
  optimizer although DANN never uses them; Adam skips parameters without gradient, so training
  is the same).
- The backbone's auxiliary loss (`dgbench.backbones.auxiliary`) is added to the generator loss;
  on discriminator steps it is collected and dropped (the featurizer is not stepped).
- DomainBed's small-image defaults (lr_g = lr_d = 1e-3) are not special-cased, as for `lr` in
  `AlgorithmHParams`; override them on MNIST-like data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, autograd, nn

from dgbench.algorithms.base import FUSED, Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import Choice, IntLogUniform, LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class DANNHParams(AlgorithmHParams):
    """DomainBed's DANN / CDANN hparams (224-px defaults and search)."""

    lambda_: float = hparam(1.0, LogUniform(-2, 2), "weight of −disc_loss in the generator loss")
    lr_g: float = hparam(5e-5, LogUniform(-5, -3.5), "Adam lr of featurizer and classifier")
    lr_d: float = hparam(5e-5, LogUniform(-5, -3.5), "Adam lr of discriminator (and class embeddings)")
    weight_decay_g: float = hparam(0.0, LogUniform(-6, -2), "Adam weight decay of the generator")
    weight_decay_d: float = hparam(0.0, LogUniform(-6, -2), "Adam weight decay of the discriminator")
    d_steps_per_g_step: int = hparam(1, IntLogUniform(0, 3), "discriminator steps per generator step")
    grad_penalty: float = hparam(0.0, LogUniform(-2, 1), "weight of the discriminator input-gradient penalty")
    beta1: float = hparam(0.5, Choice([0.0, 0.5]), "Adam beta1 of both optimizers (beta2 = 0.9)")
    mlp_width: int = hparam(256, IntLogUniform(6, 10), "discriminator MLP width")
    mlp_depth: int = hparam(3, Choice([3, 4, 5]), "discriminator MLP depth (linear layers)")
    mlp_dropout: float = hparam(0.0, Choice([0.0, 0.1, 0.5]), "discriminator MLP dropout")


class DiscriminatorMLP(nn.Module):
    """DomainBed's `networks.MLP`: Linear → Dropout → ReLU, (depth − 2) hidden such blocks, Linear."""

    def __init__(self, n_inputs: int, n_outputs: int, width: int, depth: int, dropout: float) -> None:
        super().__init__()
        self.input = nn.Linear(n_inputs, width)
        self.dropout = nn.Dropout(dropout)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.dropout(self.input(x)))
        for layer in self.hiddens:
            x = F.relu(self.dropout(layer(x)))
        return self.output(x)


class AbstractDANN(Algorithm):
    """Adversarial base of DANN / CDANN; see the module docstring."""

    conditional: ClassVar[bool] = False
    class_balance: ClassVar[bool] = False

    host_buffers = ("update_count",)  # read on the host each step: the discriminator/generator alternation

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        n_features = backbone.n_outputs
        self.discriminator = DiscriminatorMLP(
            n_features, num_domains, int(cfg.mlp_width), int(cfg.mlp_depth), float(cfg.mlp_dropout)
        )
        disc_params = list(self.discriminator.parameters())
        if self.conditional:
            self.class_embeddings = nn.Embedding(num_classes, n_features)
            disc_params += list(self.class_embeddings.parameters())
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        betas = (float(cfg.beta1), 0.9)
        self.disc_opt = torch.optim.Adam(
            disc_params, lr=cfg.lr_d, weight_decay=cfg.weight_decay_d, betas=betas, **FUSED
        )
        self.gen_opt = torch.optim.Adam(
            [*self.featurizer.parameters(), *self.classifier.parameters()],
            lr=cfg.lr_g,
            weight_decay=cfg.weight_decay_g,
            betas=betas,
            **FUSED,
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"disc_opt": self.disc_opt, "gen_opt": self.gen_opt}

    def is_disc_step(self, count: int) -> bool:
        """DomainBed's alternation, on the already incremented counter."""
        d_steps = int(self.cfg.d_steps_per_g_step)
        return count % (1 + d_steps) < d_steps

    def disc_input(self, z: Tensor, y: Tensor) -> Tensor:
        return z + self.class_embeddings(y) if self.conditional else z

    def discriminator_loss(self, disc_input: Tensor, y: Tensor, domains: Tensor) -> tuple[Tensor, Tensor]:
        """(disc_loss including grad_penalty · P, P); `disc_input` must be part of the graph."""
        disc_out = self.discriminator(disc_input)
        if self.class_balance:
            # DomainBed's one_hot(y) has max(y) + 1 columns, its normaliser; kept on the device
            # (one_hot without a class count reads max(y) on the host: a sync on CUDA).
            y_counts = F.one_hot(y, self.num_classes).sum(dim=0)
            weights = 1.0 / (y_counts[y] * (y.max() + 1)).to(disc_out.dtype)
            loss = (weights * F.cross_entropy(disc_out, domains, reduction="none")).sum()
        else:
            loss = F.cross_entropy(disc_out, domains)
        if float(self.cfg.grad_penalty) == 0.0:
            return loss, disc_out.new_zeros(())
        (input_grad,) = autograd.grad(
            F.cross_entropy(disc_out, domains, reduction="sum"), [disc_input], create_graph=True
        )
        penalty = input_grad.pow(2).sum(dim=1).mean(dim=0)
        return loss + self.cfg.grad_penalty * penalty, penalty

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        self.update_count += 1
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        domains = torch.cat(
            [
                torch.full((bx.shape[0],), d, dtype=torch.long, device=bx.device)
                for d, (bx, _) in enumerate(batches)
            ]
        )
        z = self.featurizer(x)
        extra = auxiliary_loss(self)
        disc_loss, penalty = self.discriminator_loss(self.disc_input(z, y), y, domains)

        if self.is_disc_step(int(self.update_count)):
            self.disc_opt.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_opt.step()
            with torch.no_grad():
                classifier_loss = F.cross_entropy(self.classifier(z), y)
            values = torch.stack([classifier_loss, disc_loss.detach(), penalty.detach()]).unbind()
            return {"loss": values[0], "disc_loss": values[1], "grad_penalty": values[2], "d_step": 1.0}

        classifier_loss = F.cross_entropy(self.classifier(z), y)
        gen_loss = classifier_loss + (self.cfg.lambda_ * -disc_loss)
        self.disc_opt.zero_grad(set_to_none=True)
        self.gen_opt.zero_grad(set_to_none=True)
        (gen_loss + extra).backward()
        self.gen_opt.step()
        values = torch.stack([classifier_loss, disc_loss, penalty, gen_loss]).detach().unbind()
        return {
            "loss": values[0],
            "disc_loss": values[1],
            "grad_penalty": values[2],
            "gen_loss": values[3],
            "d_step": 0.0,
        }


@ALGORITHMS.register("dann", DANNHParams)
class DANN(AbstractDANN):
    """Unconditional DANN (DomainBed `DANN`): discriminator on z, plain cross-entropy."""

    paper = (
        "Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand, Lempitsky, "
        "Domain-Adversarial Training of Neural Networks, JMLR 2016, arXiv:1505.07818"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:DANN"


@ALGORITHMS.register("cdann", DANNHParams)
class CDANN(AbstractDANN):
    """Conditional DANN (DomainBed `CDANN`): discriminator on z + class embedding, class-balanced."""

    paper = (
        "Li, Tian, Gong, Liu, Liu, Zhang, Tao, Deep Domain Generalization via Conditional Invariant "
        "Adversarial Networks, ECCV 2018"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:CDANN"

    conditional = True
    class_balance = True
