"""UDIM invariants (reference/algorithms.md §4.4) on tiny CPU models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dgbench.algorithms.sam import SAM, SAMHParams, global_grad_norm
from dgbench.algorithms.udim import (
    UDIM,
    UDIMHParams,
    inconsistency_terms,
    linear_per_sample_grads,
    normalize_perturbation,
)
from dgbench.errors import ConfigError
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("udim")


class TinyConv(nn.Module):
    """Conv -> (BatchNorm2d) -> tanh -> global average pool; images (B, 3, 4, 4)."""

    def __init__(self, bn: bool = False, width: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        if bn:
            layers.append(nn.BatchNorm2d(width))
        layers += [nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.n_outputs = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CLASSES = 3


def _batches(seed: int, n_domains: int = 2, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
        for _ in range(n_domains)
    ]


def _udim(seed: int = 0, bn: bool = False, total_steps: int | None = 4, **hp) -> UDIM:
    torch.manual_seed(seed)
    cfg = UDIMHParams(**{"lr": 1e-2, "warmup_ratio": 2, **hp})
    algorithm = UDIM(TinyConv(bn=bn), CLASSES, 2, cfg)
    algorithm.total_steps = total_steps
    return algorithm


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def _pooled(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_registered_with_reference_defaults():
    entry = ALGORITHMS.get("udim")
    assert entry.obj is UDIM and entry.config is UDIMHParams
    cfg = UDIMHParams()
    assert (cfg.rho, cfg.perturb_size, cfg.inconsistency_weight, cfg.warmup_ratio) == (0.05, 10.0, 1.0, 5)
    assert cfg.rho_s is None and cfg.perturb_norm == "sample" and cfg.domain_wise and not cfg.batch_stats_bn
    with pytest.raises(ConfigError, match="perturb_norm"):
        UDIM(TinyConv(), CLASSES, 2, UDIMHParams(perturb_norm="pixel"))


def test_per_sample_classifier_grads_match_closed_form_autograd_and_torch_func():
    torch.manual_seed(1)
    head = nn.Linear(4, CLASSES)
    h = torch.randn(6, 4)
    y = torch.randint(0, CLASSES, (6,))
    grad_w, grad_b = linear_per_sample_grads(h, head(h), y)
    p = torch.softmax(head(h), dim=1)
    residual = p - F.one_hot(y, CLASSES).float()
    torch.testing.assert_close(grad_w, torch.einsum("bk,bd->bkd", residual, h), rtol=0, atol=0)
    torch.testing.assert_close(grad_b, residual, rtol=0, atol=0)
    for i in range(len(h)):  # autograd, one sample at a time (BackPACK's BatchGrad of a summed CE)
        gw, gb = torch.autograd.grad(
            F.cross_entropy(head(h[i : i + 1]), y[i : i + 1], reduction="sum"), list(head.parameters())
        )
        torch.testing.assert_close(grad_w[i], gw)
        torch.testing.assert_close(grad_b[i], gb)
    params = dict(head.named_parameters())

    def loss_one(prm, hi, yi):
        return F.cross_entropy(functional_call(head, prm, (hi[None],)), yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, h, y)
    torch.testing.assert_close(grad_w, per_sample["weight"])
    torch.testing.assert_close(grad_b, per_sample["bias"])


def _reference_penalty(clean, pert):
    """The reference's computation, written out: Fishr over {origin, synthetic} + the norm term."""
    var_o, var_s, norm = [], [], 0.0
    for o, s in zip(clean, pert, strict=True):
        o, s = o.flatten(1), s.flatten(1)
        mean_o = o.mean(0, keepdim=True)
        var_o.append(((o - mean_o) ** 2).mean(0))
        var_s.append(((s - mean_o) ** 2).mean(0))  # centred at the origin mean, as the code
        norm = norm + (s**2).sum(1).mean() / s.shape[1]  # BatchL2Grad mean / parameter size
    v_o, v_s = torch.cat(var_o), torch.cat(var_s)
    v_bar = (v_o + v_s) / 2
    return (((v_o - v_bar) ** 2).mean() + ((v_s - v_bar) ** 2).mean()) / 2, norm


def test_inconsistency_terms_equal_the_reference_penalty():
    torch.manual_seed(2)
    clean = [torch.randn(5, 3, 4), torch.randn(5, 3)]
    pert = [torch.randn(5, 3, 4) * 2, torch.randn(5, 3) + 1]
    var_term, norm_term = inconsistency_terms(clean, pert)
    ref_var, ref_norm = _reference_penalty(clean, pert)
    torch.testing.assert_close(var_term, ref_var)
    torch.testing.assert_close(norm_term, ref_norm)
    assert var_term > 0
    same_var, _ = inconsistency_terms(clean, [c.clone() for c in clean])
    assert same_var.item() == 0.0


def test_inconsistency_gradient_matches_torch_func_per_sample_grads():
    """∇_θ L_inc through the closed form equals ∇_θ through torch.func per-sample gradients."""
    algorithm = _udim(3)
    x, y = _pooled(_batches(3))
    x_pert = x + 0.3 * torch.randn_like(x)
    params = list(algorithm.parameters())
    var_term, norm_term = algorithm.inconsistency([x], [x_pert], [y])
    ours = torch.autograd.grad(var_term + norm_term, params)

    head = algorithm.classifier[-1]
    head_params = dict(head.named_parameters())

    def loss_one(prm, hi, yi):
        return F.cross_entropy(functional_call(head, prm, (hi[None],)), yi[None])

    h = algorithm.classifier[:-1](algorithm.featurizer(torch.cat([x, x_pert])))
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(head_params, h, torch.cat([y, y]))
    n = len(x)
    g = [per_sample["weight"], per_sample["bias"]]
    ref_var, ref_norm = _reference_penalty([t[:n] for t in g], [t[n:] for t in g])
    torch.testing.assert_close(var_term, ref_var)
    torch.testing.assert_close(norm_term, ref_norm)
    theirs = torch.autograd.grad(ref_var + ref_norm, params)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(a.abs().sum() > 0 for a in ours[:2])  # it reaches the featurizer


def test_perturbation_normalisation_per_sample_and_per_batch_column():
    torch.manual_seed(4)
    g = torch.randn(6, 3, 4, 4)
    g[2] = 0.0
    sample = normalize_perturbation(g, "sample")
    norms = sample.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5]], torch.ones(5))
    assert torch.equal(sample[2], torch.zeros_like(sample[2]))  # zero gradient: no perturbation, no NaN
    batch = normalize_perturbation(g, "batch")
    torch.testing.assert_close(batch.norm(dim=0), torch.ones(3, 4, 4))  # the code's F.normalize(dim=0)


@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_crafted_batch_ascends_loss_plus_gradient_norm(mode):
    algorithm = _udim(5, perturb_size=0.7, perturb_norm=mode, rho_s=0.3)
    x, y = _pooled(_batches(5))
    params, mask = algorithm._trainable()
    crafted = algorithm.craft(x, y, params, mask)
    # independent double backprop of J = ℓ + ρ_s‖∇_θ ℓ‖
    x_var = x.clone().requires_grad_(True)
    loss = F.cross_entropy(algorithm.predict(x_var), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    objective = loss + 0.3 * torch.sqrt(sum((gi**2).sum() for gi in g))
    (gx,) = torch.autograd.grad(objective, x_var)
    delta = crafted.x_perturbed - x
    if mode == "sample":
        torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((len(x),), 0.7))
        expected = 0.7 * gx / gx.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        torch.testing.assert_close(delta.norm(dim=0), torch.full(x.shape[1:], 0.7))
        expected = 0.7 * gx / gx.norm(dim=0, keepdim=True)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(crafted.objective, objective.detach())
    # ε_θ is SAM's ε on the clean batch
    g_plain = torch.autograd.grad(F.cross_entropy(algorithm.predict(x), y), params)
    norm = global_grad_norm(g_plain)
    for e, gi in zip(crafted.eps, g_plain, strict=True):
        torch.testing.assert_close(e, algorithm.cfg.rho * gi / norm)
    # the gradient-norm term matters: with ρ_s = 0 the direction is ∇ₓℓ alone
    algorithm.cfg.rho_s = 0.0
    assert not torch.allclose(algorithm.craft(x, y, params, mask).x_perturbed, crafted.x_perturbed)


def test_warmup_is_plain_sam_then_the_phase_switches():
    udim = _udim(6, total_steps=10, warmup_ratio=5)  # W = 2
    torch.manual_seed(6)
    sam = SAM(TinyConv(), CLASSES, 2, SAMHParams(lr=1e-2))
    sam.load_state_dict(udim.state_dict(), strict=False)
    phases = []
    for step in range(2):
        phases.append(udim.update(_batches(step))["udim_phase"])
        sam.update(_batches(step))
        _assert_same_params(udim, sam)
    metrics = udim.update(_batches(2))
    sam.update(_batches(2))
    assert phases == [0.0, 0.0] and metrics["udim_phase"] == 1.0 and "inconsistency" in metrics
    assert any(not torch.equal(p, q) for p, q in zip(udim.parameters(), sam.parameters(), strict=True))
    assert int(udim.step_count) == 3
    fallback = _udim(total_steps=None)
    assert fallback.warmup_steps() == 5001 // 2  # `fallback_total_steps` while the trainer has not set it


def test_lambda_zero_udim_step_equals_a_sam_step():
    udim = _udim(7, inconsistency_weight=0.0, perturb_size=3.0)
    udim.step_count.fill_(udim.warmup_steps())  # past the warm-up
    torch.manual_seed(7)
    sam = SAM(TinyConv(), CLASSES, 2, SAMHParams(lr=1e-2))
    sam.load_state_dict(udim.state_dict(), strict=False)
    for step in range(2):
        metrics = udim.update(_batches(step))
        sam.update(_batches(step))
        assert metrics["udim_phase"] == 1.0
        _assert_same_params(udim, sam)  # bit-exact on CPU


def test_lambda_changes_the_step():
    a = _udim(8, inconsistency_weight=0.0)
    b = _udim(8, inconsistency_weight=1.0)
    for algorithm in (a, b):
        algorithm.step_count.fill_(algorithm.warmup_steps())
        algorithm.update(_batches(8))
    assert any(not torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_zero_perturbation_has_exactly_zero_variance_term():
    algorithm = _udim(9, perturb_size=0.0)
    algorithm.step_count.fill_(algorithm.warmup_steps())
    metrics = algorithm.update(_batches(9))
    assert metrics["inconsistency_var"] == 0.0 and metrics["inconsistency_norm"] > 0
    x, y = _pooled(_batches(9))
    params = list(algorithm.parameters())
    var_term, _ = algorithm.inconsistency([x], [x.clone()], [y])
    assert var_term.item() == 0.0
    grads_var = torch.autograd.grad(var_term, params, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads_var)


def test_bn_running_stats_are_updated_only_by_the_crafting_pass():
    algorithm = _udim(10, bn=True)
    algorithm.train()
    algorithm.step_count.fill_(algorithm.warmup_steps())
    reference = copy.deepcopy(algorithm.featurizer)
    x, _ = _pooled(_batches(10))
    reference(x)  # one train-mode forward at θ on the pooled batch
    algorithm.update(_batches(10))
    bn, bn_ref = algorithm.featurizer.net[1], reference.net[1]
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)


def test_batch_statistics_bn_option_applies_only_in_the_udim_phase():
    algorithm = _udim(11, bn=True, batch_stats_bn=True)
    bn = algorithm.featurizer.net[1]
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(3.0)
    x, _ = _pooled(_batches(11))
    algorithm.eval()
    with_running_stats = algorithm.predict(x)
    algorithm.step_count.fill_(algorithm.warmup_steps())
    batch_stats = algorithm.predict(x)
    assert not torch.allclose(batch_stats, with_running_stats)
    reference = copy.deepcopy(algorithm)
    reference.featurizer.net[1].train()
    torch.testing.assert_close(batch_stats, super(UDIM, reference).predict(x))  # train-mode normalisation
    assert not bn.training and bn.track_running_stats  # flags restored
    algorithm.train()
    algorithm.update(_batches(11))
    assert int(bn.num_batches_tracked) == 0  # running stats neither used nor updated in the UDIM phase
    assert torch.all(bn.running_mean == 0.5) and torch.all(bn.running_var == 3.0)
    off = _udim(11, bn=True)
    off.eval()
    off.step_count.fill_(off.warmup_steps())
    torch.testing.assert_close(off.predict(x), super(UDIM, off).predict(x))


def test_step_counter_is_checkpointed_and_resume_is_exact():
    algorithm = _udim(12, total_steps=6, warmup_ratio=3)  # W = 2: the run below crosses the switch
    algorithm.update(_batches(0))
    state = copy.deepcopy(algorithm.state_dict())
    optimizer_state = copy.deepcopy(algorithm.optimizer_state())
    assert int(state["step_count"]) == 1
    for step in range(1, 4):
        algorithm.update(_batches(step))

    resumed = _udim(99, total_steps=6, warmup_ratio=3)
    resumed.load_state_dict(state)
    resumed.load_optimizer_state(optimizer_state)
    phases = [resumed.update(_batches(step))["udim_phase"] for step in range(1, 4)]
    assert phases == [0.0, 1.0, 1.0]
    _assert_same_params(algorithm, resumed)
    assert int(resumed.step_count) == 4
