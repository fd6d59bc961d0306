"""SAM / ASAM invariants (reference/algorithms.md §3.4) on tiny CPU models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.algorithms.sam import (
    SAM,
    SAMHParams,
    asam_mask,
    bn_running_stats_frozen,
    perturbed,
    sam_epsilon,
    sam_gradients,
)
from dgbench.hparams import Choice, sample_hparams, search_space
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("sam")


class TinyNet(nn.Module):
    """Linear -> (BatchNorm1d) -> tanh featurizer with the `n_outputs` the algorithms need."""

    def __init__(self, d_in: int = 6, d_out: int = 5, bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        if bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        self.n_outputs = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batches(seed: int, n_domains: int = 2, n: int = 4, d_in: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))
        for _ in range(n_domains)
    ]


def _pair(cls_a, cfg_a, cls_b, cfg_b, bn: bool = False, seed: int = 0, classes: int = 3):
    """Two algorithms with bit-identical initial weights."""
    torch.manual_seed(seed)
    a = cls_a(TinyNet(bn=bn), classes, 2, cfg_a)
    b = cls_b(TinyNet(bn=bn), classes, 2, cfg_b)
    b.load_state_dict(a.state_dict(), strict=False)
    return a, b


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_registered_with_reference_hparams():
    entry = ALGORITHMS.get("sam")
    assert entry.obj is SAM and entry.config is SAMHParams
    cfg = SAMHParams()
    assert cfg.rho == 0.05 and cfg.adaptive is False and cfg.asam_eta == 0.01
    assert search_space(SAMHParams)["rho"] == Choice([0.01, 0.02, 0.05, 0.1])
    assert sample_hparams(SAMHParams, 3, 0)["rho"] in (0.01, 0.02, 0.05, 0.1)


def test_rho_zero_is_bit_exactly_an_erm_adam_step():
    erm, sam = _pair(
        ERM, ERMHParams(lr=1e-2, weight_decay=1e-3), SAM, SAMHParams(lr=1e-2, weight_decay=1e-3, rho=0.0)
    )
    for step in range(3):
        batches = _batches(step)
        erm.update(batches)
        sam.update(batches)
        _assert_same_params(erm, sam)
    assert torch.equal(
        erm.optimizer.state_dict()["state"][0]["exp_avg_sq"],
        sam.optimizer.state_dict()["state"][0]["exp_avg_sq"],
    )


def test_rho_positive_differs_from_erm():
    erm, sam = _pair(ERM, ERMHParams(lr=1e-2), SAM, SAMHParams(lr=1e-2, rho=0.5))
    erm.update(_batches(0))
    sam.update(_batches(0))
    assert any(not torch.equal(p, q) for p, q in zip(erm.parameters(), sam.parameters(), strict=True))


def test_epsilon_has_global_norm_rho_and_the_gradient_direction():
    torch.manual_seed(1)
    params = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]
    grads = [torch.randn_like(p) for p in params]
    grads[2] = None  # a parameter without gradient is skipped, not perturbed
    eps = sam_epsilon(params, grads, rho=0.07)
    assert eps[2] is None
    flat_eps = torch.cat([e.flatten() for e in eps if e is not None])
    flat_g = torch.cat([g.flatten() for g in grads if g is not None])
    assert torch.linalg.vector_norm(flat_eps).item() == pytest.approx(0.07, rel=1e-6)
    torch.testing.assert_close(flat_eps, 0.07 * flat_g / flat_g.norm())


def test_asam_epsilon_has_norm_rho_in_the_scaled_metric():
    torch.manual_seed(2)
    named = [
        ("layer.weight", torch.randn(4, 3)),
        ("layer.bias", torch.randn(4)),
        ("bn.weight", torch.randn(4)),
    ]
    params = [p for _, p in named]
    grads = [torch.randn_like(p) for p in params]
    mask = asam_mask(named)
    assert mask == [True, False, True]
    eta, rho = 0.01, 0.5
    eps = sam_epsilon(params, grads, rho, adaptive=True, eta=eta, adaptive_mask=mask)
    scales = [p.abs() + eta if m else torch.ones_like(p) for p, m in zip(params, mask, strict=True)]
    scaled = torch.cat([(e / t).flatten() for e, t in zip(eps, scales, strict=True)])
    assert scaled.norm().item() == pytest.approx(rho, rel=1e-6)  # ‖T⁻¹ε‖ = ρ
    tg = torch.cat([(t * g).flatten() for t, g in zip(scales, grads, strict=True)])
    expected = (
        torch.cat([(t * t * g).flatten() for t, g in zip(scales, grads, strict=True)]) * rho / tg.norm()
    )
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps]), expected)
    # davda54's adaptive SAM: eta = 0, every parameter scaled by |w|: ε = ρ w² g / ‖|w| g‖.
    eps0 = sam_epsilon(params, grads, rho, adaptive=True, eta=0.0)
    wg = torch.cat([(p.abs() * g).flatten() for p, g in zip(params, grads, strict=True)])
    expected0 = (
        torch.cat([(p * p * g).flatten() for p, g in zip(params, grads, strict=True)]) * rho / wg.norm()
    )
    torch.testing.assert_close(torch.cat([e.flatten() for e in eps0]), expected0)


def test_quadratic_sam_gradient_matches_closed_form():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(5, dtype=torch.float64)
    holder = nn.Module()
    holder.theta = nn.Parameter(torch.randn(5, dtype=torch.float64))
    theta0 = holder.theta.detach().clone()
    rho = 0.3
    out = sam_gradients(holder, [holder.theta], lambda: 0.5 * holder.theta @ a @ holder.theta, rho)
    ag = a @ theta0
    torch.testing.assert_close(out.grads[0], a @ (theta0 + rho * ag / ag.norm()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.eps[0].norm(), torch.tensor(rho, dtype=torch.float64))
    assert torch.equal(holder.theta.detach(), theta0)  # θ restored exactly


def test_perturbed_restores_parameters_bit_exactly():
    p = nn.Parameter(torch.tensor([0.1, 1e8, -3.3]))
    before = p.detach().clone()
    with perturbed([p], [torch.tensor([1e-9, 1.0, 0.7])]):
        assert not torch.equal(p.detach(), before)
    assert torch.equal(p.detach(), before)


def test_lr_zero_leaves_parameters_exactly_unchanged():
    torch.manual_seed(4)
    sam = SAM(TinyNet(), 3, 2, SAMHParams(lr=0.0, rho=0.5))
    before = copy.deepcopy(sam.state_dict())
    sam.update(_batches(0))
    for name, value in sam.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_base_optimizer_receives_the_gradient_at_the_perturbed_point():
    torch.manual_seed(5)
    sam = SAM(TinyNet(), 3, 2, SAMHParams(lr=1e-2, rho=0.2))
    reference = copy.deepcopy(sam)
    batches = _batches(1)
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference.predict(x), y), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g, strict=True):
            p.add_(0.2 * gi / norm)
    expected = torch.autograd.grad(F.cross_entropy(reference.predict(x), y), params)
    sam.update(batches)  # Adam keeps p.grad after its step
    for p, e in zip(sam.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_bn_running_stats_change_only_in_the_first_pass():
    erm, sam = _pair(ERM, ERMHParams(lr=1e-2), SAM, SAMHParams(lr=1e-2, rho=0.5), bn=True)
    erm.train()
    sam.train()
    batches = _batches(6)
    erm.update(batches)  # one train-mode forward at θ: what SAM's pass 1 does
    sam.update(batches)
    bn_erm, bn_sam = erm.featurizer.net[1], sam.featurizer.net[1]
    assert int(bn_sam.num_batches_tracked) == 1
    assert torch.equal(bn_sam.running_mean, bn_erm.running_mean)
    assert torch.equal(bn_sam.running_var, bn_erm.running_var)
    assert bn_sam.track_running_stats  # the guard restored the flag


def test_bn_guard_keeps_batch_statistics_but_freezes_running_stats():
    torch.manual_seed(7)
    bn = nn.BatchNorm1d(4).train()
    model = nn.Sequential(nn.Linear(3, 4), bn)
    x = torch.randn(8, 3)
    expected = model(x)  # updates the running stats once
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    with bn_running_stats_frozen(model):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # still batch statistics
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count


def _zero_gradient_batches():
    # Two classes, zero classifier, identical inputs with opposite labels: p = (½, ½) and the
    # per-sample residuals p − e_y cancel exactly, so every gradient is exactly 0.
    x = torch.randn(1, 6)
    return [(x, torch.tensor([0])), (x.clone(), torch.tensor([1]))]


def test_zero_gradient_gives_no_nan_and_moves_as_erm():
    hp = {"lr": 1e-2, "weight_decay": 0.1}
    erm, sam = _pair(ERM, ERMHParams(**hp), SAM, SAMHParams(**hp, rho=0.05), classes=2)
    for model in (erm, sam):
        nn.init.zeros_(model.classifier[1].weight)
        nn.init.zeros_(model.classifier[1].bias)
        # identical features by construction (tanh of the bias): a CPU's matmul kernels may round
        # two identical rows of a batch differently (6e-8 apart on an AMD EPYC), and SAM scales
        # even a 1e-8 gradient up to a step of norm rho
        nn.init.zeros_(model.featurizer.net[0].weight)
    batches = _zero_gradient_batches()
    params, _ = sam._trainable()
    x = torch.cat([x for x, _ in batches])
    out = sam_gradients(sam, params, lambda: F.cross_entropy(sam.predict(x), torch.tensor([0, 1])), 0.05)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in out.grads)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in out.eps)
    metrics = sam.update(batches)
    erm.update(batches)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    assert all(torch.isfinite(p).all() for p in sam.parameters())
    _assert_same_params(erm, sam)  # weight decay still moves the parameters, as in ERM
