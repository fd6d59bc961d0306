"""DomainDrop: suppress domain-sensitive channels, found by adversarial per-stage domain discriminators.

Guo, Qi, Shi, "DomainDrop: Suppressing Domain-Sensitive Channels for Domain Generalization",
ICCV 2023, arXiv:2308.10285. Reference: lingeringlight/DomainDrop, commit a2d9607
(`train_domain.py`, `models/resnet_domain.py`, `models/LayerDiscriminator.py`,
`models/FilterDropout.py`, `loss/KL_Loss.py`, `optimizer/optimizer_helper.py`); semantics only,
no code copied. The surgery (stage taps, gradient reversal, channel scores and masks) lives in
`dgbench.backbones.stages`.

Model: the backbone's conv stages F_1..F_L (ResNet layer1..layer4), each with a domain
discriminator D_l(F) = Linear(GAP(GRL_λ(F))) → S source-domain logits. One step:

1. Pool the S domain minibatches; the list index is the domain label d. If the KL loss is on,
   duplicate the batch: x ← [x; x] (identical pixels; the copies get independent masks).
2. Draw l* uniformly among `stages`; with probability `layer_prob` DomainDrop acts at l*.
3. Forward. At every stage, D_l sees F_l before any drop. At l*: per sample, channel scores from
   F_l ⊙ w_{d} (w_d = D_l's detached weight row of the sample's domain), drop ⌊C·p⌋ channels by
   weighted sampling (keys u^(1/s)), rescale by numel(M)/ΣM.
4. L = CE(z, y) + domain_weight · mean_l CE(D_l, d) + kl_weight · KL_sym(z₁, z₂) + auxiliary,
   KL_sym = ½[KL(σ(z₁/T)‖σ(z₂/T)) + KL(σ(z₂/T)‖σ(z₁/T))], elementwise mean over B×K, no T².
5. One SGD step (momentum 0.9, nesterov, weight decay) on everything, discriminators included.

Eval (`predict`) is the plain network: no masks, no discriminators.

Deviations from the reference:
- DomainBed protocol: one minibatch of `batch_size` per training domain (the reference draws 64
  from a shuffled ConcatDataset of the sources), training-domain validation, no source-val early
  choice of epoch and no "whole target domain" test set. The reference's protocol is not reproduced.
- Iterations, not epochs: lr ×0.1 once int(lr_decay_at · total_steps) updates are done (the
  reference: StepLR at epoch int(0.8·50) = 40). Outside the trainer (total_steps unset) no decay.
  `optimizer=adam` is DomainBed's Adam(lr, weight_decay) without schedule: run it with
  `algorithm.optimizer=adam algorithm.lr=5e-5 algorithm.weight_decay=0`.
- Random draws (stage, coin, u) use torch's global RNG, which the trainer seeds and checkpoints,
  instead of numpy/random/torch, so a resumed run continues bit-identically. The coin is
  `rand < layer_prob` (reference `<=`), so 0 and 1 mean never and always.
- Keys compare as log(u)/s: the order of u^(1/s), without underflow to tied zero keys.
- Default batch_size is DomainBed's 32 per domain (96 pooled, 192 duplicated); the reference
  used 64 pooled (about 21 per domain for 3 sources).
- The unused stem discriminator D₀ of the reference is not built. The GRL is applied to the map
  before pooling, as the reference does.
- As the reference, `stages` (its `--discriminator_layers`) only restricts where channels drop:
  every stage keeps its discriminator and its term in the domain loss.
- Metrics: "loss" is the classification CE (comparable with ERM's "loss"), "total_loss" the
  objective that is differentiated, plus "domain_loss", "domain_acc", "kl_loss" and
  "dropped_stage" (1-based stage number, −1 for no drop).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import FUSED, Algorithm, AlgorithmHParams, BackboneNeed, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.backbones.stages import (
    apply_channel_mask,
    backbone_name,
    channel_scores,
    feature_stages,
    grad_reverse,
    has_feature_stages,
    stage_taps,
    weighted_channel_mask,
)
from dgbench.errors import ConfigError
from dgbench.hparams import Choice, LogUniform, enum_choice, hparam
from dgbench.registry import ALGORITHMS

SGD_MOMENTUM = 0.9  # reference optimizer_helper: SGD(momentum=.9, nesterov=True)
LR_DECAY = 0.1  # reference StepLR gamma


class OptimizerKind(str, enum.Enum):
    sgd = "sgd"  # the reference: SGD, momentum 0.9, nesterov, one ×0.1 step at lr_decay_at
    adam = "adam"  # DomainBed: Adam(lr, weight_decay), no schedule


@dataclass(kw_only=True)
class DomainDropHParams(AlgorithmHParams):
    """The reference's PACS defaults (train.sh). Searches over the method's knobs are dgbench's choice."""

    lr: float = hparam(0.002, LogUniform(-3.5, -2), "SGD learning rate (reference 0.002); 5e-5 for adam")
    weight_decay: float = hparam(5e-4, LogUniform(-6, -2), "weight decay (reference SGD 5e-4); 0 for adam")
    optimizer: str = hparam("sgd", None, "'sgd' (reference, with the lr step) or 'adam' (DomainBed)")
    lr_decay_at: float = hparam(0.8, None, "sgd: lr ×0.1 after this fraction of total_steps; >= 1: never")
    drop_fraction: float = hparam(0.33, Choice([0.2, 0.33, 0.5]), "p: ⌊C·p⌋ channels dropped per sample")
    layer_prob: float = hparam(0.8, Choice([0.5, 0.8, 1.0]), "probability that a step drops at all")
    grl_lambda: float = hparam(0.25, Choice([0.1, 0.25, 0.5, 1.0]), "λ of the gradient reversal layers")
    domain_weight: float = hparam(1.0, None, "weight of the mean per-stage domain cross-entropy")
    kl_weight: float = hparam(1.5, Choice([0.5, 1.0, 1.5, 2.0]), "weight of the dual consistency KL; 0: off")
    kl_temperature: float = hparam(5.0, Choice([1.0, 5.0, 10.0]), "T of the consistency KL")
    stages: list[int] | None = hparam(  # noqa: RUF009  (a field(default=None) with help text)
        None, None, "1-based stages where channels may drop (ResNet layer1..4 = 1..4); None: all"
    )


def symmetric_kl(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """½[KL(σ(a/T)‖σ(b/T)) + KL(σ(b/T)‖σ(a/T))], each an elementwise mean over B×K (no T²)."""
    log_a = F.log_softmax(a / temperature, dim=-1)
    log_b = F.log_softmax(b / temperature, dim=-1)
    a_b = F.kl_div(log_b, log_a, reduction="none", log_target=True).mean()
    b_a = F.kl_div(log_a, log_b, reduction="none", log_target=True).mean()
    return (a_b + b_a) / 2


@ALGORITHMS.register("domaindrop", DomainDropHParams)
class DomainDrop(Algorithm):
    """Adversarial per-stage domain discriminators that pick which channels to drop; see module doc."""

    paper = (
        "Guo, Qi, Shi, DomainDrop: Suppressing Domain-Sensitive Channels for Domain Generalization, ICCV "
        "2023, arXiv:2308.10285"
    )
    reference = "lingeringlight/DomainDrop@a2d9607 train_domain.py:Trainer"

    backbone_need = BackboneNeed(
        family="a CNN with stage feature maps (timm ResNet, EfficientNet, ...)",
        fits=has_feature_stages,
        paper={"arch": "timm", "name": "resnet18.tv_in1k", "pretrained": True, "bn": "train"},
        small={"arch": "timm", "name": "test_resnet", "pretrained": False, "bn": "train"},
        examples=(
            "backbone=resnet18 backbone.bn=train",
            "backbone=resnet50 backbone.bn=train",
            "backbone=efficientnet_lite0",
        ),
    )

    host_buffers = ("update_count",)  # read on the host each step: the learning-rate step

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer_kind = enum_choice(OptimizerKind, cfg.optimizer, "algorithm.optimizer")
        if not 0.0 <= cfg.drop_fraction < 1.0:
            raise ConfigError(f"algorithm.drop_fraction must be in [0, 1), got {cfg.drop_fraction}")
        stages = feature_stages(backbone)
        self.drop_stages = _drop_stages(cfg.stages, len(stages), backbone)  # 0-based
        self.discriminators = nn.ModuleList(nn.Linear(s.channels, num_domains) for s in stages)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))  # drives the lr step
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_kind is OptimizerKind.adam:
            return self.make_optimizer()
        wd = self.cfg.weight_decay
        return torch.optim.SGD(
            self.parameters(), lr=self.cfg.lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=wd, **FUSED
        )

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        d = torch.cat([torch.full_like(y, i) for i, (_, y) in enumerate(batches)])
        consistency = self.cfg.kl_weight != 0
        if consistency:  # two views of each image, differing only by their masks
            x, y, d = torch.cat([x, x]), torch.cat([y, y]), torch.cat([d, d])
        drop_at = self.draw_drop_stage()
        logits, domain_logits = self.forward_train(x, d, drop_at)

        class_loss = F.cross_entropy(logits, y)
        domain_loss = torch.stack([F.cross_entropy(z, d) for z in domain_logits]).mean()
        kl_loss = (
            symmetric_kl(*logits.chunk(2), self.cfg.kl_temperature)
            if consistency
            else class_loss.new_zeros(())
        )
        loss = class_loss + auxiliary_loss(self)
        if self.cfg.domain_weight != 0:
            loss = loss + self.cfg.domain_weight * domain_loss
        if consistency:
            loss = loss + self.cfg.kl_weight * kl_loss

        self.set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.update_count += 1

        with torch.no_grad():
            domain_acc = torch.stack([(z.argmax(1) == d).float().mean() for z in domain_logits]).mean()
            values = torch.stack([class_loss, loss, domain_loss, domain_acc, kl_loss]).unbind()
        names = ("loss", "total_loss", "domain_loss", "domain_acc", "kl_loss")
        return {**dict(zip(names, values, strict=True)), "dropped_stage": float(_stage_number(drop_at))}

    def draw_drop_stage(self) -> int | None:
        """l* ~ U(stages), kept with probability layer_prob (global RNG); None: no drop this step."""
        choice = self.drop_stages[int(torch.randint(len(self.drop_stages), ()))]
        return choice if float(torch.rand(())) < self.cfg.layer_prob else None

    def forward_train(self, x: Tensor, d: Tensor, drop_at: int | None) -> tuple[Tensor, list[Tensor]]:
        """Class logits and per-stage domain logits, dropping channels at stage `drop_at` (0-based)."""
        domain_logits: list[Tensor] = []

        def tap(i: int, f: Tensor) -> Tensor:
            domain_logits.append(self.discriminate(i, f))
            return self.drop_channels(i, f, d) if i == drop_at else f

        with stage_taps(self.featurizer, tap):
            logits = self.classifier(self.featurizer(x))
        return logits, domain_logits

    def discriminate(self, stage: int, f: Tensor) -> Tensor:
        """D_l(F) = Linear(GAP(GRL_λ(F))): trains D_l, and pushes the backbone to fool it."""
        return self.discriminators[stage](grad_reverse(f, self.cfg.grl_lambda).mean(dim=(2, 3)))

    def drop_channels(self, stage: int, f: Tensor, d: Tensor) -> Tensor:
        """Drop ⌊C·p⌋ channels per sample, likelier the more they tell D_l the sample's domain."""
        weights = self.discriminators[stage].weight.detach()[d]  # (B, C): rows of the true domains
        scores = channel_scores(f.detach().float(), weights.float())
        return apply_channel_mask(f, weighted_channel_mask(scores, self.cfg.drop_fraction))

    def set_lr(self) -> None:
        """The reference's StepLR in iterations: ×0.1 from update int(lr_decay_at·total_steps) on."""
        lr = float(self.cfg.lr)
        if self.optimizer_kind is OptimizerKind.sgd and self.total_steps is not None:
            if int(self.update_count) >= int(self.cfg.lr_decay_at * self.total_steps):
                lr *= LR_DECAY
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def _drop_stages(numbers: Sequence[int] | None, count: int, backbone: nn.Module) -> list[int]:
    """0-based indices of the 1-based `algorithm.stages` (None: all), checked against the backbone."""
    if numbers is None:
        return list(range(count))
    chosen = [int(n) for n in numbers]
    if not chosen or any(not 1 <= n <= count for n in chosen):
        names = ", ".join(f"{i + 1}={s.name}" for i, s in enumerate(feature_stages(backbone)))
        raise ConfigError(
            f"algorithm.stages={list(numbers)}: backbone {backbone_name(backbone)!r} has stages {names}; "
            f"give a non-empty list of those numbers, or null for all"
        )
    return sorted(set(n - 1 for n in chosen))


def _stage_number(index: int | None) -> int:
    return -1 if index is None else index + 1
