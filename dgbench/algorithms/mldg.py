"""MLDG: meta-learning for domain generalisation, first-order, as in DomainBed.

Li, Yang, Song, Hospedales, "Learning to Generalize: Meta-Learning for Domain Generalization",
AAAI 2018, arXiv:1710.03463 (Algorithm 1, Eq. 3), in the first-order form (FOMAML, Finn et al.
2017) DomainBed implements. Reference: facebookresearch/DomainBed `domainbed/algorithms.py` class
`MLDG`, `domainbed/lib/misc.py` `random_pairs_of_minibatches` / `split_meta_train_test` and
`domainbed/hparams_registry.py` (`mldg_beta`, `n_meta_test`), read at commit 22002ea.

One step, as in DomainBed's `MLDG.update`, with D training domains:

1. G ← 0 for every trainable parameter.
2. For each (meta-train i, meta-test j) pair of `random_pairs_of_minibatches` (a random
   permutation of the domains, i paired with the next domain cyclically, D pairs, both batches
   truncated to the shorter one):
   a. from θ, one step of a *freshly created* Adam (lr, weight_decay) on L_i = CE(f_θ(x_i), y_i):
      θ' = θ − lr·ĝ/(|ĝ| + ε) elementwise, ĝ = ∇L_i(θ) + weight_decay·θ (Adam's first step:
      its bias corrections cancel; not an SGD step of size lr);
   b. G += ∇L_i(θ) / D;
   c. G += β·∇_θ' L_j(θ') / D: the meta-test gradient at θ' applied to θ, the first-order
      approximation (no derivative through the inner step).
3. One step of the outer Adam with gradient G at θ.

`loss` is DomainBed's logged objective, Σ_pairs (L_i + β·L_j) / D, computed from the per-pair
values in DomainBed's order. The metrics add `meta_train_loss` and `meta_test_loss`, the means of
L_i(θ) and L_j(θ') over the pairs.

Implementation (no semantic change): DomainBed deep-copies the network and builds a fresh inner
Adam for every pair. Here the model itself plays the clone: θ, every `state_dict` tensor of the
featurizer and classifier (parameters and persistent buffers), is copied into a persistent
snapshot; a fresh Adam over the model's own trainable parameters takes the inner step; the
meta-test gradient is taken with `torch.autograd.grad`; then every snapshotted tensor is copied
back. G is kept in separate accumulators and installed as `.grad` before the outer step. The
inner Adam is discarded after each pair, as DomainBed's is, so it holds no state to checkpoint;
`state_dict()` holds θ and `optimizers()` the outer Adam, so a checkpoint resumes exactly.
Because the clone's buffers are discarded in DomainBed, the network's own buffers never change
during MLDG training (BatchNorm running statistics keep their initial values when BN is in train
mode); restoring the snapshot reproduces that.

Deviations and choices:
- Only parameters with `requires_grad=True` receive G and are stepped. DomainBed gives every
  parameter a zero-initialised gradient, so a parameter no loss reaches still gets Adam's
  weight-decay and momentum updates; here too, as long as it is trainable.
- The pairing draws its permutation with `torch.randperm` from torch's global CPU generator, as
  DomainBed does; the trainer seeds it and saves it in checkpoints.
- `n_meta_test` (default 0, not searched): 0 keeps the `random_pairs_of_minibatches` pairing of
  DomainBed's published MLDG results; k ≥ 1 selects `split_meta_train_test` with k meta-test
  domains, which DomainBed adopted later (issue #94) with `n_meta_test` 2, searched over
  {1, 2}. Both divide G and the objective by D, as DomainBed does.
- The backbone's auxiliary loss is added to L_i (inner step and G) and to L_j (meta-test
  gradient) of the forward it comes from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.algorithms.pairs import BatchPair, random_pairs_of_minibatches, split_meta_train_test
from dgbench.algorithms.snapshot import copy_state, network_state
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import LogUniform, hparam
from dgbench.registry import ALGORITHMS


@dataclass(kw_only=True)
class MLDGHParams(AlgorithmHParams):
    """DomainBed's MLDG hparams: the shared ones plus the meta-test weight β."""

    mldg_beta: float = hparam(1.0, LogUniform(-1, 1), "weight β of the meta-test loss L_j(θ')")
    n_meta_test: int = hparam(
        0,
        None,
        "0: pair each domain with the next of a random permutation (DomainBed's published MLDG); "
        "k ≥ 1: k meta-test domains per step (DomainBed's later split_meta_train_test)",
    )


@ALGORITHMS.register("mldg", MLDGHParams)
class MLDG(Algorithm):
    """First-order MLDG with DomainBed semantics; see the module docstring."""

    paper = (
        "Li, Yang, Song, Hospedales, Learning to Generalize: Meta-Learning for Domain Generalization, "
        "AAAI 2018, arXiv:1710.03463"
    )
    reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:MLDG"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()
        self._theta: list[Tensor] = []  # snapshot of θ during update (not in state_dict)

    def pairs(self, batches: Sequence[DomainBatch]) -> list[BatchPair]:
        """This step's (meta-train, meta-test) pairs, drawn from torch's global CPU generator."""
        if int(self.cfg.n_meta_test) > 0:
            return split_meta_train_test(batches, int(self.cfg.n_meta_test))
        return random_pairs_of_minibatches(batches)

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        num_batches = len(batches)
        beta = float(self.cfg.mldg_beta)
        params = [p for p in self.parameters() if p.requires_grad]
        network = self.network_state()
        theta = self._snapshot(network)
        meta_grad = [torch.zeros_like(p) for p in params]
        train_losses: list[Tensor] = []
        test_losses: list[Tensor] = []

        for (x_i, y_i), (x_j, y_j) in self.pairs(batches):
            inner_optimizer = self.make_optimizer(params)  # fresh, as DomainBed's per pair
            loss_i = F.cross_entropy(self.predict(x_i), y_i)
            inner_optimizer.zero_grad(set_to_none=True)
            (loss_i + auxiliary_loss(self)).backward()
            inner_optimizer.step()  # the model now holds θ'
            with torch.no_grad():
                for g, p in zip(meta_grad, params, strict=True):
                    if p.grad is not None:
                        g.add_(p.grad / num_batches)

            loss_j = F.cross_entropy(self.predict(x_j), y_j)
            grads_j = torch.autograd.grad(loss_j + auxiliary_loss(self), params, allow_unused=True)
            with torch.no_grad():
                for g, g_j in zip(meta_grad, grads_j, strict=True):
                    if g_j is not None:
                        g.add_(beta * g_j / num_batches)
            self._restore(network, theta)
            train_losses.append(loss_i.detach().float())
            test_losses.append(loss_j.detach().float())

        for p, g in zip(params, meta_grad, strict=True):
            p.grad = g
        self.optimizer.step()

        train, test = torch.stack(train_losses).double(), torch.stack(test_losses).double()
        return {
            "loss": (train + beta * test).sum() / num_batches,
            "meta_train_loss": train.mean(),
            "meta_test_loss": test.mean(),
        }

    def network_state(self) -> list[Tensor]:
        """θ: the featurizer's and classifier's state_dict tensors (see `network_state`)."""
        return network_state(self.featurizer, self.classifier)

    def _snapshot(self, network: list[Tensor]) -> list[Tensor]:
        """Copy θ into the persistent snapshot (reallocated only when shapes or devices change)."""
        self._theta = copy_state(self._theta, network)
        return self._theta

    @staticmethod
    @torch.no_grad()
    def _restore(network: list[Tensor], theta: list[Tensor]) -> None:
        """Every θ tensor back to its snapshot (the clone is discarded, as DomainBed's deepcopy)."""
        torch._foreach_copy_(network, theta)
