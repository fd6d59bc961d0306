"""SAM: Sharpness-Aware Minimization, with ASAM (adaptive SAM) as an option.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv:2010.01412. ASAM: Kwon, Kim, Park, Choi, "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021,
arXiv:2102.11600.

References (semantics only; no code copied):
- davda54/sam `sam.py` (`SAM.first_step`, `second_step`, `_grad_norm`; commit 3c3afdb) and
  `example/utility/bypass_bn.py` (`disable_running_stats`);
- SAM in DomainBed-style DG code: khanrc/swad `domainbed/algorithms/algorithms.py` class `SAM`
  (commit 252190e), the same class in aailabkaist/UDIM `UDIM_main/domainbed/algorithms/algorithms.py`
  and Wang-pengfei/SAGM; `hparams_registry.py` for `rho`;
- ASAM authors' code SamsungLabs/ASAM `asam.py` (`ASAM.ascent_step`, commit dc9b513) for eta and
  which parameters are rescaled.

One step (DomainBed-style SAM, swad `SAM.update`):
1. pool the domain minibatches; g = ∇_θ CE(f_θ(x), y) at θ (pass 1);
2. ε = ρ·g/‖g‖₂ with one global norm over every trainable parameter; θ ← θ + ε;
3. g_SAM = ∇_θ CE(f_θ(x), y) at θ + ε (pass 2, same batch);
4. θ ← θ (restored), p.grad ← g_SAM, one Adam(lr, weight_decay) step. No LR schedule.

ASAM (`adaptive=True`): with the normalisation operator T_θ, ε = ρ·T²g/‖T g‖₂, so ‖T⁻¹ε‖₂ = ρ.
As in the ASAM authors' code, T = |w| + η elementwise for parameters whose name contains "weight"
and T = 1 for every other parameter (biases, embeddings, ...); η = `asam_eta` = 0.01. davda54's
`adaptive=True` is the special case η = 0 with every parameter rescaled (`sam_epsilon(..., eta=0,
adaptive_mask=None)`). The davda54 README suggests a ~10x larger ρ for ASAM; the search space is
left as SAM's.

The machinery is in small reusable pieces, so other algorithms (UDIM, LoRA + SAM) can wrap their
own losses: `sam_epsilon` (ε from gradients), `perturbed` (apply ε, run, restore θ exactly),
`bn_running_stats_frozen` (BN guard for the perturbed pass) and `sam_gradients` (both passes).

Deliberate deviations from the references:
- ‖g‖ = 0 gives ε = 0 (the step is then exactly an Adam step on g = 0). DomainBed-style SAM has no
  guard and produces NaN; davda54 adds 1e-12 to the norm. Otherwise there is no epsilon in the
  norm, as in DomainBed-style SAM, so ‖ε‖₂ = ρ exactly up to rounding.
- θ is restored from a saved copy (davda54 at 3c3afdb: `p.data = old_p`), not by subtracting ε
  (swad/UDIM SAM: `p.sub_(eps)`), so the base optimizer sees exactly θ.
- BatchNorm: pass 2 normalises with batch statistics exactly as pass 1 does, but updates neither
  the running mean/var nor `num_batches_tracked` (the guard sets `track_running_stats=False` for
  the pass). davda54's `disable_running_stats` sets momentum to 0, which leaves mean/var unchanged
  but still increments `num_batches_tracked` (and its "restore" skips modules whose momentum was
  None). The DG codebases freeze BN instead, where both are no-ops.
- The logged "loss" is the clean loss at θ (comparable with ERM's); swad/UDIM SAM log the loss at
  θ + ε, reported here as "loss_perturbed".
- ASAM is not in the DomainBed-style SAM classes; it is added here with the ASAM authors' T.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgbench.algorithms.base import Algorithm, AlgorithmHParams, DomainBatch, Metrics
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.hparams import Choice, hparam
from dgbench.registry import ALGORITHMS

MaybeTensors = Sequence[Tensor | None]


def asam_mask(named_params: Sequence[tuple[str, nn.Parameter]]) -> list[bool]:
    """Which parameters ASAM rescales by |w| + η: those whose name contains "weight" (ASAM's rule)."""
    return ["weight" in name for name, _ in named_params]


def _scales(
    params: Sequence[Tensor], adaptive: bool, eta: float, adaptive_mask: Sequence[bool] | None
) -> list[Tensor | None]:
    """T per parameter (None = identity)."""
    if not adaptive:
        return [None] * len(params)
    mask = [True] * len(params) if adaptive_mask is None else list(adaptive_mask)
    if len(mask) != len(params):
        raise ValueError(f"adaptive_mask has {len(mask)} entries for {len(params)} parameters")
    return [p.detach().abs().add(eta) if m else None for p, m in zip(params, mask, strict=True)]


def global_grad_norm(grads: MaybeTensors, scales: Sequence[Tensor | None] | None = None) -> Tensor:
    """‖(T ⊙ g)‖₂ over all parameters at once (a norm of per-tensor norms); None grads are skipped.

    Differentiable, and its gradient at g = 0 is 0, not NaN (`torch.linalg.vector_norm`).
    """
    scales = [None] * len(grads) if scales is None else scales
    norms = [
        torch.linalg.vector_norm(g if t is None else t * g)
        for g, t in zip(grads, scales, strict=True)
        if g is not None
    ]
    if not norms:
        raise ValueError("no gradient to take the norm of (every grad is None)")
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


@torch.no_grad()
def sam_epsilon(
    params: Sequence[Tensor],
    grads: MaybeTensors,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    adaptive_mask: Sequence[bool] | None = None,
) -> list[Tensor | None]:
    """SAM's ascent step ε for each parameter (None where the grad is None).

    SAM: ε = ρ·g/‖g‖₂ (one global norm). ASAM: ε = ρ·T²g/‖T g‖₂ with T = |w| + η on the parameters
    selected by `adaptive_mask` (all if None) and T = 1 elsewhere. ‖g‖ = 0 gives ε = 0, no NaN.
    """
    if rho < 0:
        raise ValueError(f"rho must be non-negative, got {rho}")
    scales = _scales(params, adaptive, eta, adaptive_mask)
    norm = global_grad_norm(grads, scales)
    factor = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    eps: list[Tensor | None] = []
    for g, t in zip(grads, scales, strict=True):
        if g is None:
            eps.append(None)
            continue
        e = g * factor.to(g.device)
        eps.append(e if t is None else e * t * t)
    return eps


@contextmanager
def perturbed(params: Sequence[Tensor], eps: MaybeTensors) -> Iterator[None]:
    """Inside the block θ = θ + ε; on exit θ is restored bit-exactly from a saved copy."""
    saved: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            if e is None:
                continue
            saved.append((p, p.detach().clone()))
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, old in saved:
                p.copy_(old)


@contextmanager
def bn_running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their mode but do not touch their running statistics inside the block.

    A layer in training mode still normalises with the batch statistics (as in pass 1), but its
    running mean/var and `num_batches_tracked` are neither updated nor counted; a layer in eval mode
    is unaffected (it uses and never updates its running statistics anyway).
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [m.track_running_stats for m in layers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            m.track_running_stats = value


@dataclass
class SAMGradients:
    """What `sam_gradients` returns: the clean loss, the loss at θ + ε, the SAM gradient and ε."""

    loss: Tensor
    loss_perturbed: Tensor
    grads: list[Tensor | None]
    eps: list[Tensor | None]


def sam_gradients(
    module: nn.Module,
    params: Sequence[Tensor],
    closure: Callable[[], Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.01,
    adaptive_mask: Sequence[bool] | None = None,
) -> SAMGradients:
    """SAM's two passes around any scalar loss `closure()`; θ is unchanged on return.

    Pass 1 at θ (BatchNorm running statistics update as usual), ε from its gradient, pass 2 at
    θ + ε with `bn_running_stats_frozen(module)`. Returns ∇L(θ + ε) for each of `params` (None
    where a parameter does not reach the loss); the caller hands it to its base optimizer.
    """
    params = list(params)
    loss = closure()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    eps = sam_epsilon(params, grads, rho, adaptive, eta, adaptive_mask)
    del grads
    with perturbed(params, eps), bn_running_stats_frozen(module):
        loss_perturbed = closure()
        sam_grads = torch.autograd.grad(loss_perturbed, params, allow_unused=True)
    return SAMGradients(loss.detach(), loss_perturbed.detach(), list(sam_grads), eps)


def assign_grads(params: Sequence[Tensor], grads: MaybeTensors) -> None:
    """p.grad ← g (None stays None, so the optimizer skips that parameter)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.detach()


@dataclass(kw_only=True)
class SAMHParams(AlgorithmHParams):
    """DomainBed hparams plus SAM's radius (swad/UDIM `hparams_registry`: 0.05, choice{.01,.02,.05,.1})."""

    rho: float = hparam(0.05, Choice([0.01, 0.02, 0.05, 0.1]), "SAM neighbourhood radius ρ (‖ε‖₂ = ρ)")
    adaptive: bool = hparam(False, None, "ASAM: ε = ρ·T²g/‖Tg‖ with T = |w| + asam_eta on weights")
    asam_eta: float = hparam(0.01, None, "ASAM's η in T = |w| + η (ASAM authors' default 0.01)")


@ALGORITHMS.register("sam", SAMHParams)
class SAM(Algorithm):
    """ERM's pooled cross-entropy minimised with SAM (or ASAM) around an Adam base step."""

    paper = (
        "Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization for Efficiently Improving "
        "Generalization, ICLR 2021, arXiv:2010.01412; adaptive option (ASAM): Kwon, Kim, Park, Choi, ICML "
        "2021, arXiv:2102.11600"
    )
    reference = "khanrc/swad@252190e domainbed/algorithms/algorithms.py:SAM"

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        self.optimizer = self.make_optimizer()

    def _trainable(self) -> tuple[list[nn.Parameter], list[bool]]:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [p for _, p in named], asam_mask(named)

    def sam_step(self, closure: Callable[[], Tensor]) -> SAMGradients:
        """SAM gradient of `closure()` at the current θ, written into p.grad, then one base step."""
        params, mask = self._trainable()
        result = sam_gradients(
            self, params, closure, self.cfg.rho, self.cfg.adaptive, self.cfg.asam_eta, mask
        )
        self.optimizer.zero_grad(set_to_none=True)
        assign_grads(params, result.grads)
        self.optimizer.step()
        return result

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        result = self.sam_step(lambda: F.cross_entropy(self.predict(x), y) + auxiliary_loss(self))
        return {"loss": result.loss.detach(), "loss_perturbed": result.loss_perturbed.detach()}
