"""Invariance penalties of the DomainBed baselines, as pure functions of tensors.

Semantics follow facebookresearch/DomainBed `domainbed/algorithms.py` (classes `IRM`, `VREx`,
`AbstractMMD`; read at commit 22002ea, unchanged in these parts up to b93c22a); no code copied.
Every function is differentiable and has no state; the algorithms that use them are in `irm.py`,
`vrex.py`, `coral.py` and `mmd.py`, their shared step in `penalty_base.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# DomainBed's `AbstractMMD.gaussian_kernel` default: a sum of RBF kernels over 7 bandwidths.
DEFAULT_GAMMAS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def irm_penalty(logits: Tensor, y: Tensor) -> Tensor:
    """IRMv1 penalty of one domain, DomainBed's unbiased two-sample estimate.

    With a dummy classifier scale s (a scalar at 1.0) and the batch split into its even-indexed
    rows A = logits[0::2] and odd-indexed rows B = logits[1::2] (DomainBed interleaves; it does
    not cut the batch into a first and a second half):

        penalty = ∂/∂s CE(s·A, y_A) |_{s=1} · ∂/∂s CE(s·B, y_B) |_{s=1}

    The product of the two independent half-batch gradients is an unbiased estimate of
    ‖∇_s CE‖² (Arjovsky et al. 2019, Sec. 3.1 and App. D). The gradients are built with
    `create_graph=True`, so the penalty is differentiable w.r.t. the logits. A batch of one
    image leaves B empty and gives NaN, as in DomainBed.
    """
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    with torch.enable_grad():
        loss_a = F.cross_entropy(logits[0::2] * scale, y[0::2])
        loss_b = F.cross_entropy(logits[1::2] * scale, y[1::2])
        (grad_a,) = torch.autograd.grad(loss_a, [scale], create_graph=True)
        (grad_b,) = torch.autograd.grad(loss_b, [scale], create_graph=True)
    return (grad_a * grad_b).sum()


def vrex_penalty(losses: Tensor) -> Tensor:
    """V-REx penalty: the biased variance of the per-domain risks R_1..R_m.

        penalty = (1/m) Σ_e (R_e − R̄)²,   R̄ = (1/m) Σ_e R_e

    DomainBed's `((losses - mean) ** 2).mean()`, i.e. `losses.var(unbiased=False)`: divided by m,
    not m − 1. Zero for a single domain.
    """
    return ((losses - losses.mean()) ** 2).mean()


def coral_penalty(x: Tensor, y: Tensor) -> Tensor:
    """Deep CORAL distance between two feature batches x (n, d) and y (m, d), as DomainBed's.

        penalty = mean_k (μ_x − μ_y)_k² + mean_{k,l} (C_x − C_y)_{kl}²

    with μ the feature means and C = (X − μ)ᵀ(X − μ) / (n − 1) the unbiased covariances. Both
    terms are element *means* (d and d² entries), not the ‖·‖²_F / 4d² of Sun & Saenko (2016);
    DomainBed adds the mean term. A batch of one image divides by zero (inf/NaN), as in DomainBed.
    """
    mean_x = x.mean(0, keepdim=True)
    mean_y = y.mean(0, keepdim=True)
    cent_x = x - mean_x
    cent_y = y - mean_y
    cov_x = (cent_x.t() @ cent_x) / (len(x) - 1)
    cov_y = (cent_y.t() @ cent_y) / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances D_ij = ‖x_i‖² + ‖y_j‖² − 2 x_i·y_j, clamped at 1e-30.

    DomainBed's `my_cdist`: the expanded form (one matmul), clamped from below so rounding never
    makes a distance negative.
    """
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    distances = torch.addmm(y_norm.transpose(-2, -1), x, y.transpose(-2, -1), alpha=-2) + x_norm
    return distances.clamp_min(1e-30)


def gaussian_kernel(x: Tensor, y: Tensor, gammas: Sequence[float] = DEFAULT_GAMMAS) -> Tensor:
    """Multi-bandwidth RBF kernel matrix K_ij = Σ_γ exp(−γ‖x_i − y_j‖²), shape (n, m).

    DomainBed's `gaussian_kernel` (a sum, not a mean, over γ; distances from `squared_distances`).
    """
    distances = squared_distances(x, y)
    kernel = torch.zeros_like(distances)
    for gamma in gammas:
        kernel = kernel + torch.exp(distances * -gamma)
    return kernel


def mmd_penalty(x: Tensor, y: Tensor, gammas: Sequence[float] = DEFAULT_GAMMAS) -> Tensor:
    """Biased (V-statistic) squared MMD between two feature batches with `gaussian_kernel`:

        MMD² = mean_ij K(x_i, x_j) + mean_ij K(y_i, y_j) − 2 mean_ij K(x_i, y_j)

    Diagonal terms included, as in DomainBed's `AbstractMMD.mmd`; ≥ 0 up to rounding, 0 when
    the two batches are identical.
    """
    kxx = gaussian_kernel(x, x, gammas).mean()
    kyy = gaussian_kernel(y, y, gammas).mean()
    kxy = gaussian_kernel(x, y, gammas).mean()
    return kxx + kyy - 2 * kxy


def mean_pairwise_penalty(features: Sequence[Tensor], penalty: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Mean of `penalty(f_i, f_j)` over the m(m − 1)/2 domain pairs i < j (DomainBed's
    `AbstractMMD.update`); a zero tensor when there is a single domain."""
    terms = [
        penalty(features[i], features[j]) for i in range(len(features)) for j in range(i + 1, len(features))
    ]
    if not terms:
        return features[0].new_zeros(())
    return torch.stack(terms).sum() / len(terms)
