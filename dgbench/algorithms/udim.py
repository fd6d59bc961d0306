"""UDIM: Unknown Domain Inconsistency Minimization.

Shin, Kim, Kim, Moon, "Unknown Domain Inconsistency Minimization for Domain Generalization",
ICLR 2024 (OpenReview; arXiv:2403.07329). Reference code (semantics only; no code copied):
aailabkaist/UDIM `UDIM_main/` (reference/algorithms.md pins commit 808f1b2; the stored copy read
for this port is eb1fb65): `domainbed/algorithms/algorithms.py` class `IADA_DG_FINAL`
(`sam_update`, `iada_update`, `update`), `domainbed/iada/iada_final.py` class `IADA_FINAL`
(`set_closure`, `perturb_instances`, `sam_compute_grad`, `_get_grads`, `_get_grads_var`,
`_compute_distance_grads_var`, `_grads_norm_syn`, `inconsistency_compute_grad`, `merge_grad`,
`step`), `train_all.py` / `domainbed/trainer.py` (`warmup_train`, `main_train`: the schedule),
`domainbed/hparams_registry.py` and `bash/udim_pacs_mdg.sh` (values used).

Schedule. The first W = total_steps // warmup_ratio updates are plain SAM steps (`SAM.update`,
ρ = `rho`); every later update is a UDIM step. With DomainBed's 5001 steps and ratio 5, W = 1000:
steps 0..999 SAM, 1000..5000 UDIM, as `train_all.py` runs `warmup_train(n_steps // ratio)` then
`main_train(start_steps=n_steps // ratio)`. The step counter is the buffer `step_count`, so it is
checkpointed with the model and a resumed run switches at the same step. `total_steps` is the
attribute the trainer sets before the first update (base `Algorithm.total_steps`); while it is None
(an algorithm used outside the trainer) the hparam `fallback_total_steps` (5001) stands in.

One UDIM step (`IADA_FINAL.step`, pixel mode), x = the pooled domain minibatches, y their labels:
1. Craft the unknown domain. x̃ ← x (requires grad); ℓ = CE(f_θ(x̃), y) (mean);
   g = ∇_θ ℓ with create_graph; ε_θ = ρ·g/‖g‖ (SAM's ε on clean data, since x̃ = x here);
   J = ℓ + ρ_s·‖g‖₂ (global norm over all trainable parameters); x̃ = x + ρ_x·n(∇ₓJ) (double
   backprop). n = per-sample unit norm (paper, default) or `F.normalize(dim=0)` (code); see below.
2. SAM gradient on clean data: g_SAM = ∇_θ CE(f_{θ+ε_θ}(x), y); θ restored.
3. Inconsistency at θ, per source domain d (`domain_wise`, the code's multi-source mode): forward
   [x_d; x̃_d] with labels [y_d; y_d]; per-sample gradients of the last linear layer (W, b) of the
   per-sample CE ℓ_i, in closed form ∇_W ℓ_i = (p_i − e_{y_i}) h_iᵀ, ∇_b ℓ_i = p_i − e_{y_i}
   (h = the linear layer's input, after dropout), kept in the graph (the code's BackPACK
   `BatchGrad`/`BatchL2Grad` with create_graph). With o = clean rows, s = perturbed rows:
   V_o = mean_i (g_i^o − m_o)², M_s = mean_i (g_i^s − m_o)² (centred at the *clean* mean m_o, as
   the code), L_var = ½ Σ_{o,s} mean_j (v_j − v̄_j)² = ¼·mean_j (V_o,j − M_s,j)² over the
   concatenated W and b coordinates (Fishr's penalty for two groups), L_norm = Σ_{P∈{W,b}}
   mean_{i∈s} ‖∇_P ℓ(x̃_i)‖² / |P|. L_inc = Σ_d (L_var,d + L_norm,d).
4. p.grad = g_SAM + λ·∇_θ L_inc (reaching every parameter through the features); one Adam step.

BatchNorm (default, the backbone's BN policy applies): in a UDIM step only the crafting forward
(pass 1, on clean x) may update running statistics, like SAM's pass 1; the SAM and inconsistency
passes run under `bn_running_stats_frozen`. With the DomainBed frozen-BN policy all of this is moot.

Code vs paper, and the choices made here (reference/algorithms.md §4.6):
- Perturbation normalisation: the paper's x̃ = x + ρ_x·∇ₓJ/‖∇ₓJ‖ is per instance
  (`perturb_norm=sample`, default). The code normalises along the batch axis
  (`F.normalize(grad, dim=0)`: for each (c, h, w) the column over the pooled batch has norm ρ_x),
  available as `perturb_norm=batch`. The two differ greatly in size: with batch normalisation
  Σ_i ‖x̃_i − x_i‖² = ρ_x²·C·H·W, i.e. a per-sample RMS norm of ρ_x·√(CHW/B). For 224-px images and
  B = 48 (the code's run) ρ_x = 10 in batch mode is a per-sample norm of ≈ 560, while ρ_x = 10 in
  sample mode is 10: the default ρ_x = 10 (from `udim_pacs_mdg.sh`) was tuned for batch mode.
- Test-time BatchNorm: at the start of its UDIM phase the code strips every BN layer's running
  statistics (functorch `replace_all_batch_norm_modules_`), so BN normalises with the current
  batch's statistics from then on, at evaluation too: transductive test-time adaptation that
  frozen-BN baselines do not get. Off by default; `batch_stats_bn=true` reproduces it (during the
  UDIM phase every BN layer uses batch statistics in `update` and `predict`, its running statistics
  kept but neither used nor updated). This changes the evaluation protocol: predictions then
  depend on the evaluation batch (its composition and size; a batch of one may fail).
- ρ in the UDIM phase: the code hard-codes 0.05 (`LinearScheduler(max_value=0.05, min_value=0.05)`)
  for both ε_θ and ρ_s and ignores the `rho` hparam there; here ε_θ uses `rho` in both phases and
  ρ_s = `rho_s`, which by default follows `rho` (the code's ρ_s is the same scheduler value as ρ;
  its registry's `rho_s` entry is unused). With default hparams the values equal the code's.
- Warm-up → UDIM switch: the code reloads the warm-up checkpoint with the best training-domain
  validation accuracy (`eval_best.pt`, weights and Adam state) before the UDIM phase. An algorithm
  here does no model selection and touches no files, so the UDIM phase continues from the last
  warm-up iterate and its Adam state. The code's constant LR "scheduler" is a no-op and omitted.
- Per-source-domain chunks are the real per-domain minibatches (the code slices the pooled batch
  into `len // num_domains` equal chunks: the same when the domain batches are equal).
- Not ported: the style-perturbation mode (`advstyle`, which never applies its perturbation in the
  code), the single-source mode (`is_single`, which both released scripts set by mistake), the
  debugging image dump, and the `alpha` hparam (only used by an analysis routine).
- ASAM (`adaptive=true`) applies to ε_θ in both phases; the code uses plain SAM (adaptive=False).
- Logged "loss" is the clean CE at θ from the crafting pass; the code logs J (as "loss") and
  L_inc. Here "udim_objective" = J, "inconsistency" = L_inc (+ its two terms), "loss_perturbed" =
  CE at θ + ε_θ, "udim_phase" = 0 in warm-up and 1 after.
- Hparam defaults follow `udim_pacs_mdg.sh` (ρ_x 10, λ 1, warm-up ratio 5) and the registry (ρ
  0.05, choice{0.01, 0.02, 0.05, 0.1}). The script's lr 3e-5, weight decay 1e-4, dropout 0.5,
  ResNet-18 and PACS batch size 16 are left to the shared DomainBed defaults and configs. The code
  has no search space for ρ_x or λ; the ones here are reasoned: ρ_x over decades 1..1000 (sample
  mode needs larger values than batch mode, see above), λ around the code's 0.5 and 1.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dgbench.algorithms.base import DomainBatch, Metrics
from dgbench.algorithms.sam import (
    SAM,
    SAMHParams,
    assign_grads,
    bn_running_stats_frozen,
    global_grad_norm,
    perturbed,
    sam_epsilon,
)
from dgbench.backbones.auxiliary import auxiliary_loss
from dgbench.errors import ConfigError
from dgbench.hparams import Choice, enum_choice, hparam
from dgbench.registry import ALGORITHMS


class PerturbNorm(str, enum.Enum):
    """How ∇ₓJ is normalised: per sample (paper) or along the batch axis (reference code)."""

    sample = "sample"
    batch = "batch"


def normalize_perturbation(grad: Tensor, mode: PerturbNorm | str) -> Tensor:
    """Unit-norm direction from ∇ₓJ: per sample over (C, H, W), or per (C, H, W) over the batch.

    A zero vector stays zero (norms are clamped at 1e-12, as `F.normalize`).
    """
    mode = PerturbNorm(mode)
    if mode is PerturbNorm.sample:
        return F.normalize(grad.reshape(len(grad), -1), p=2.0, dim=1, eps=1e-12).reshape(grad.shape)
    return F.normalize(grad, p=2.0, dim=0, eps=1e-12)


def linear_per_sample_grads(h: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of CE(Wh_i + b, y_i) w.r.t. (W, b): ((B, K, D), (B, K)), differentiable.

    ∇_W ℓ_i = (p_i − e_{y_i}) h_iᵀ and ∇_b ℓ_i = p_i − e_{y_i}, with p_i = softmax(logits_i).
    Computed in at least float32, so that the variances stay meaningful under bf16 autocast.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    h, logits = h.to(dtype), logits.to(dtype)
    residual = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return residual.unsqueeze(2) * h.unsqueeze(1), residual


def inconsistency_terms(clean: Sequence[Tensor], perturbed_grads: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(L_var, L_norm) from per-sample gradients (one (B, ...) tensor per parameter, same order).

    L_var = ¼·mean_j (V_o,j − M_s,j)² over all parameters' coordinates, where V_o is the clean
    per-coordinate variance and M_s the perturbed second moment about the *clean* mean;
    L_norm = Σ_P mean_{i∈s} ‖g_i,P‖² / |P|.
    """
    diffs = []
    norm_term = torch.zeros((), device=clean[0].device)
    for o, s in zip(clean, perturbed_grads, strict=True):
        o, s = o.flatten(1), s.flatten(1)
        mean_o = o.mean(dim=0, keepdim=True)
        var_o = (o - mean_o).pow(2).mean(dim=0)
        moment_s = (s - mean_o).pow(2).mean(dim=0)
        diffs.append(var_o - moment_s)
        norm_term = norm_term + s.pow(2).sum(dim=1).mean() / s.shape[1]
    var_term = 0.25 * torch.cat(diffs).pow(2).mean()
    return var_term, norm_term


@contextmanager
def batch_statistics_bn(module: nn.Module) -> Iterator[None]:
    """Every BatchNorm in `module` normalises with the current batch's statistics, in train and eval
    mode, and neither uses nor updates its running statistics (the reference's stripped BN)."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in layers]
    for m in layers:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(layers, saved, strict=True):
            m.training, m.track_running_stats = training, track


@dataclass
class Crafted:
    """Output of `UDIM.craft`: the crafted batch, SAM's ε_θ, ℓ and J at the clean batch."""

    x_perturbed: Tensor
    eps: list[Tensor | None]
    loss: Tensor
    objective: Tensor


@dataclass(kw_only=True)
class UDIMHParams(SAMHParams):
    """SAM's hparams (ρ for the warm-up and for ε_θ) plus UDIM's."""

    perturb_size: float = hparam(
        10.0, Choice([1.0, 10.0, 100.0, 1000.0]), "ρ_x: size of the data perturbation x̃ − x (code: syn_lr)"
    )
    perturb_norm: str = hparam(
        "sample", None, "'sample': normalise ∇ₓJ per sample (paper); 'batch': along the batch axis (code)"
    )
    inconsistency_weight: float = hparam(
        1.0, Choice([0.1, 0.5, 1.0, 2.0]), "λ: weight of the inconsistency loss (code: worst_weight)"
    )
    rho_s: float | None = hparam(None, None, "ρ_s: coefficient of ‖∇_θ ℓ‖ in J; None = rho (as the code)")
    warmup_ratio: int = hparam(5, None, "SAM warm-up for the first total_steps // warmup_ratio steps")
    fallback_total_steps: int = hparam(5001, None, "run length when the trainer has not set total_steps")
    domain_wise: bool = hparam(True, None, "inconsistency per source domain, summed (code's multi-source)")
    batch_stats_bn: bool = hparam(
        False, None, "UDIM phase: BN uses batch statistics, at evaluation too (code; changes the protocol)"
    )


@ALGORITHMS.register("udim", UDIMHParams)
class UDIM(SAM):
    """SAM warm-up, then SAM on clean data plus λ·(domain-wise) inconsistency to a crafted domain."""

    paper = (
        "Shin, Kim, Kim, Moon, Unknown Domain Inconsistency Minimization for Domain Generalization, ICLR "
        "2024, arXiv:2403.07329"
    )
    reference = "aailabkaist/UDIM@eb1fb65 UDIM_main/domainbed/algorithms/algorithms.py:IADA_DG_FINAL"

    host_buffers = ("step_count",)  # read on the host each step: the warm-up phase

    def __init__(self, backbone: nn.Module, num_classes: int, num_domains: int, cfg: Any) -> None:
        super().__init__(backbone, num_classes, num_domains, cfg)
        if int(cfg.warmup_ratio) < 1:
            raise ConfigError(f"algorithm.warmup_ratio must be >= 1, got {cfg.warmup_ratio}")
        if cfg.perturb_size < 0:
            raise ConfigError(f"algorithm.perturb_size must be >= 0, got {cfg.perturb_size}")
        if not isinstance(self.classifier[-1], nn.Linear):
            raise ConfigError("UDIM needs a classifier whose last module is nn.Linear")
        self.perturb_norm = enum_choice(PerturbNorm, cfg.perturb_norm, "algorithm.perturb_norm")
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))

    def warmup_steps(self) -> int:
        total = self.total_steps if self.total_steps is not None else self.cfg.fallback_total_steps
        return int(total) // int(self.cfg.warmup_ratio)

    def in_udim_phase(self) -> bool:
        return int(self.step_count) >= self.warmup_steps()

    def _bn_context(self) -> Any:
        return batch_statistics_bn(self) if self.cfg.batch_stats_bn else nullcontext()

    def predict(self, x: Tensor) -> Tensor:
        if self.cfg.batch_stats_bn and self.in_udim_phase():
            with batch_statistics_bn(self):
                return super().predict(x)
        return super().predict(x)

    def update(self, batches: Sequence[DomainBatch]) -> Metrics:
        if self.in_udim_phase():
            with self._bn_context():
                metrics = self.udim_step(batches)
            metrics["udim_phase"] = 1.0
        else:
            metrics = super().update(batches)
            metrics["udim_phase"] = 0.0
        self.step_count += 1
        return metrics

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(input of the last linear layer, logits)."""
        h = self.classifier[:-1](self.featurizer(x))
        return h, self.classifier[-1](h)

    def inconsistency(
        self, xs: Sequence[Tensor], xs_perturbed: Sequence[Tensor], ys: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(L_var, L_norm) summed over the given groups (one group per domain, or one pooled)."""
        var_total = norm_total = torch.zeros((), device=xs[0].device)
        for x, x_pert, y in zip(xs, xs_perturbed, ys, strict=True):
            h, logits = self._head(torch.cat([x, x_pert]))
            grad_w, grad_b = linear_per_sample_grads(h, logits, torch.cat([y, y]))
            n = len(x)
            var_term, norm_term = inconsistency_terms([grad_w[:n], grad_b[:n]], [grad_w[n:], grad_b[n:]])
            var_total = var_total + var_term
            norm_total = norm_total + norm_term
        return var_total, norm_total

    def craft(self, x: Tensor, y: Tensor, params: Sequence[Tensor], mask: Sequence[bool]) -> Crafted:
        """Step 1: x̃ = x + ρ_x·n(∇ₓJ), J = CE(f_θ(x), y) + ρ_s‖∇_θ CE‖₂ (double backprop); ε_θ."""
        cfg = self.cfg
        rho_s = cfg.rho if cfg.rho_s is None else cfg.rho_s
        x_var = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(self._head(x_var)[1], y)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        eps = sam_epsilon(params, grads, cfg.rho, cfg.adaptive, cfg.asam_eta, mask)
        objective = loss + rho_s * global_grad_norm(grads)
        (x_grad,) = torch.autograd.grad(objective, x_var)
        direction = normalize_perturbation(x_grad, self.perturb_norm)
        x_perturbed = (x.detach() + cfg.perturb_size * direction).detach()
        return Crafted(x_perturbed, eps, loss.detach(), objective.detach())

    def udim_step(self, batches: Sequence[DomainBatch]) -> dict[str, float]:
        cfg = self.cfg
        weight = float(cfg.inconsistency_weight)
        params, mask = self._trainable()
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])

        # 1. Craft x̃ from ∇ₓ[ℓ + ρ_s‖∇_θ ℓ‖] at x̃ = x; ε_θ from the same (clean) gradient.
        crafted = self.craft(x, y, params, mask)
        x_perturbed, eps = crafted.x_perturbed, crafted.eps

        # 2. SAM gradient on clean data at θ + ε_θ.
        with perturbed(params, eps), bn_running_stats_frozen(self):
            loss_perturbed = F.cross_entropy(self._head(x)[1], y) + auxiliary_loss(self)
            sam_grads = torch.autograd.grad(loss_perturbed, params, allow_unused=True)

        # 3. Inconsistency between clean and crafted samples at θ, per source domain.
        sizes = [len(xb) for xb, _ in batches]
        if cfg.domain_wise:
            groups = (x.split(sizes), x_perturbed.split(sizes), y.split(sizes))
        else:
            groups = ([x], [x_perturbed], [y])
        with bn_running_stats_frozen(self), torch.set_grad_enabled(weight != 0):
            var_term, norm_term = self.inconsistency(*groups)
            inc = var_term + norm_term
            if weight != 0:
                inc_grads = torch.autograd.grad(inc, params, allow_unused=True)
                total = [_combine(s, i, weight) for s, i in zip(sam_grads, inc_grads, strict=True)]
            else:
                total = list(sam_grads)

        # 4. One base (Adam) step on g_SAM + λ·∇L_inc.
        self.optimizer.zero_grad(set_to_none=True)
        assign_grads(params, total)
        self.optimizer.step()
        return {
            "loss": crafted.loss.detach(),
            "loss_perturbed": loss_perturbed.detach(),
            "udim_objective": crafted.objective.detach(),
            "inconsistency": inc.detach(),
            "inconsistency_var": var_term.detach(),
            "inconsistency_norm": norm_term.detach(),
        }


def _combine(sam_grad: Tensor | None, inc_grad: Tensor | None, weight: float) -> Tensor | None:
    if inc_grad is None:
        return sam_grad
    if sam_grad is None:
        return weight * inc_grad
    return sam_grad + weight * inc_grad
