"""Fish: gradient matching by a first-order inter-domain meta step.

Shi, Seely, Torr, Siddharth, Hannun, Usunier, Synnaeve, "Gradient Matching for Domain
Generalization", ICLR 2022, arXiv:2104.09937 (Algorithm 1). Reference: DomainBed
(facebookresearch/DomainBed `domainbed/algorithms.py` class `Fish`, contributed by the
first author; read at commit 22002ea, whose line numbers are cited below as L<n>), with
`domainbed/networks.py` `WholeFish` and `domainbed/lib/misc.py` `ParamDict`. The authors'
WILDS code is YugeTen/fish `src/main.py` `train_fish` (commit 333efa2).

One step, as in DomainBed's `Fish.update` (L160-177):

1. θ̃ ← θ: every `state_dict` entry of the network, parameters *and* buffers
   (`create_clone`, L143-145: a fresh `WholeFish` loaded with `network.state_dict()`).
2. For each training domain, in the order the trainer passes them (environment order), one
   inner step on θ̃ with that domain's own minibatch: `loss_i = CE(f_θ̃(x_i), y_i)`,
   zero_grad, backward, Adam step (L163-167). The inner optimizer is Adam over θ̃'s
   parameters with the algorithm's `lr` and `weight_decay`.
3. θ ← θ + meta_lr·(θ̃ − θ) over every `state_dict` entry (`Fish.fish`, L154-158, and
   `reset_weights`, L175). `ParamDict` applies the arithmetic to every key, so BatchNorm
   running statistics are interpolated like the weights, and the integer
   `num_batches_tracked` is computed in floating point and truncated toward zero when
   `load_state_dict` copies it back into the int64 buffer.
4. The logged `loss` is the loss of the *last* inner step only (L177: the loop variable).

What persists across steps. DomainBed re-creates `network_inner` *and* `optimizer_inner`
in `create_clone`, which `update` calls every step (L161), but the new Adam immediately
loads `optimizer_inner_state` (L151-152), the inner optimizer's `state_dict()` saved at the
end of the previous step (L169). Parameters map by position, so Adam's `exp_avg`,
`exp_avg_sq` and `step` (hence its bias correction) carry over for the whole run; in effect
there is one inner Adam whose parameters are reset to θ before every inner loop. Only θ̃'s
*values* are fresh each step. The outer `self.optimizer` (L136-140) is created but never
stepped, so no gradient is ever applied to θ directly.

Implementation (no semantic change): DomainBed deep-copies the whole network every step,
which rebuilds (and for a pretrained backbone re-loads) it. Here the model itself plays θ̃
during the inner loop: θ is copied (`torch._foreach_copy_`) into a persistent snapshot, the
inner Adam (`inner_optimizer`, over the model's own parameters, persistent like DomainBed's
reloaded one) steps the model, and the meta update writes θ + meta_lr·(θ̃ − θ) back into the
model in place, with the same floating-point operations as `ParamDict`. Memory is the same
as DomainBed's (which keeps `network_inner` alive between steps); `state_dict()` holds θ only
and `optimizers()` the inner Adam, so a checkpoint resumes exactly.

Deviations and choices:
- No outer optimizer (DomainBed's is dead state: never stepped, its state stays empty).
- `shuffle_domains=True` permutes the domains every step, as the paper's Algorithm 1 does;
  the default keeps DomainBed's fixed order. The permutation is drawn from a generator seeded
  with `seed_hash(order_seed, update_count)`, two int64 buffers in the `state_dict`
  (`order_seed` is `torch.initial_seed()` at construction, i.e. the run's training seed), so
  it draws nothing from the global RNGs and a resumed run sees the same orders.
- The metrics add `inner_loss_mean` (mean of the S inner losses) to DomainBed's `loss`.
- Non-persistent buffers are not part of `state_dict`, so, as in DomainBed, they are not
  interpolated. Boolean buffers (none in common backbones) keep θ̃'s value: `ParamDict`
  arithmetic is undefined for them.
- The paper writes the inner step as plain SGD (θ̃ ← θ̃ − α∇L_i) and says nothing of
  optimizer state; the WILDS code samples `meta_steps` domains per step, uses
  meta_lr / meta_steps, and reloads the inner optimizer state only if `reload_inner_optim`
  (and not across epochs). dgbench follows DomainBed: Adam, all domains, meta_lr undivided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.algorithms.snapshot import copy_state, network_state
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import Choice, hparam, seed_hash
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class FishHParams(AlgorithmHParams):
    """DomainBed's Fish hparams: the shared ones plus the meta step size."""

    meta_lr: float = hparam(
        0.5, Choice([0.05, 0.1, 0.5]), "meta step ε: θ ← θ + ε(θ̃ − θ) after the inner loop"
    )
    shuffle_domains: bool = hparam(
        False, None, "permute the inner-loop domain order every step (paper); false: fixed (DomainBed)"
    )


@ALGORITHMS.register("fish", FishHParams)
class Fish(Algorithm):
    """Fish with DomainBed semantics; see the module docstring."""

    paper = (
        "Shi, Seely, Torr, Siddharth, Hannun, Usunier, Synnaeve, Gradient Matching for Domain "
        "Generalization, ICLR 2022, arXiv:2104.09937"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:Fish"

    host_buffers = ("update_count", "order_seed")  # read on the host each step: the seeded domain order

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.inner_optimizer = self.make_optimizer()
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("order_seed", torch.tensor(torch.initial_seed() & (2**63 - 1)))
        self._theta: list[Tensor] = []  # snapshot of θ during update (not in state_dict)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"inner_optimizer": self.inner_optimizer}

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        network = self.network_state()
        theta = self._snapshot(network)
        losses = []
        for i in self.domain_order(len(batches)):
            x, y = batches[i]
            loss = F.cross_entropy(self.predict(x), y)
            self.inner_optimizer.zero_grad(set_to_none=True)
            (loss + auxiliary_loss(self)).backward()
            self.inner_optimizer.step()
            losses.append(loss.detach().float())
        self._meta_step(network, theta, float(self.cfg.meta_lr))
        self.update_count += 1
        values = torch.stack(losses)
        return {"loss": values[-1], "inner_loss_mean": values.double().mean()}

    def network_state(self) -> list[Tensor]:
        """θ: the featurizer's and classifier's state_dict tensors (see `network_state`)."""
        return network_state(self.featurizer, self.classifier)

    def domain_order(self, num_batches: int) -> list[int]:
        """Inner-loop order of this step: environment order, or a seeded permutation."""
        if not self.cfg.shuffle_domains:
            return list(range(num_batches))
        seed = seed_hash(int(self.order_seed), int(self.update_count))
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(num_batches, generator=generator).tolist()

    def _snapshot(self, network: list[Tensor]) -> list[Tensor]:
        """Copy θ into the persistent snapshot (reallocated only when shapes or devices change)."""
        self._theta = copy_state(self._theta, network)
        return self._theta

    @staticmethod
    @torch.no_grad()
    def _meta_step(network: list[Tensor], theta: list[Tensor], meta_lr: float) -> None:
        """network (holding θ̃) ← θ + meta_lr·(θ̃ − θ), with ParamDict's operations and casts."""
        inner = [t for t in network if t.is_floating_point() or t.is_complex()]
        start = [s for s, t in zip(theta, network, strict=True) if t.is_floating_point() or t.is_complex()]
        if inner:
            torch._foreach_sub_(inner, start)  # θ̃ − θ
            torch._foreach_mul_(inner, meta_lr)  # ε(θ̃ − θ)
            torch._foreach_add_(inner, start)  # θ + ε(θ̃ − θ)
        for s, t in zip(theta, network, strict=True):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                continue
            # Integer buffers (num_batches_tracked): float arithmetic, truncated by the copy, as
            # DomainBed's ParamDict result is when load_state_dict copies it into the int64 buffer.
            t.copy_(s + meta_lr * (t - s))
