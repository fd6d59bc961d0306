"""Fishr (dgbench.algorithms.fishr) against float64 re-derivations of DomainBed's `Fishr`.

The references below compute per-sample gradients the slow way (autograd, one sample at a time,
in DomainBed's layout: flattened weight then bias), the biased centred variance per domain, the
`MovingAverage` recursion with its 1/(1 − ema) correction and the mean-of-squares distance, so a
mistake in the closed form, the centring, the divisor, the EMA or the reduction shows up as a
number. Tiny CPU models: a linear featurizer and the dropout + linear head.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.algorithms.fishr import Fishr, FishrHParams, head_gradient_variance, logit_gradients
from dgbench.backbones import Featurizer
from dgbench.checkpoint import load_checkpoint, save_checkpoint
from dgbench.errors import ConfigError
from dgbench.hparams import IntUniform, LogUniform, Uniform, sample_hparams, search_space
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, SIZES = 5, 4, 3, 3, (5, 7, 6)
pytestmark = pytest.mark.algorithm("fishr")


def make(cls=Fishr, cfg_cls=FishrHParams, seed: int = 0, **hparams):
    torch.manual_seed(seed)
    cfg = cfg_cls(**{"lr": 1e-2, **hparams})
    algorithm = cls(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, cfg)
    algorithm.train()
    return algorithm


def make_batches(sizes=SIZES, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def per_sample_gradients(z: Tensor, weight: Tensor, bias: Tensor, y: Tensor, graph: bool = False) -> Tensor:
    """(n, C·D + C): autograd gradient of each sample's own CE w.r.t. (weight, bias), one at a time."""
    rows = []
    for zi, yi in zip(z, y, strict=True):
        loss = F.cross_entropy(F.linear(zi[None], weight, bias), yi[None])
        dw, db = torch.autograd.grad(loss, [weight, bias], create_graph=graph)
        rows.append(torch.cat([dw.flatten(), db]))
    return torch.stack(rows)


def reference_penalty(grads: list[Tensor], states: list[Tensor], ema: float) -> tuple[Tensor, list[Tensor]]:
    """DomainBed's penalty from per-domain per-sample gradients and the per-domain EMA states."""
    new_states, corrected = [], []
    for g, state in zip(grads, states, strict=True):
        variance = ((g - g.mean(dim=0, keepdim=True)) ** 2).mean(dim=0)
        new_state = ema * state + (1 - ema) * variance
        new_states.append(new_state.detach())
        corrected.append(new_state / (1 - ema))
    mean = sum(corrected) / len(corrected)
    penalty = sum(((c - mean) ** 2).mean() for c in corrected) / len(corrected)
    return penalty, new_states


def to_domainbed_layout(ema_variance: Tensor) -> list[Tensor]:
    """Our (m, C, D + 1) buffer as DomainBed's per-domain vectors [weight.flatten(), bias]."""
    return [torch.cat([v[:, :-1].flatten(), v[:, -1]]).double() for v in ema_variance]


# --- registration and hparams ----------------------------------------------------------------


def test_registered_with_domainbeds_defaults_and_search_spaces():
    entry = ALGORITHMS.get("fishr")
    assert entry.obj is Fishr and entry.config is FishrHParams
    defaults = {f.name: f.default for f in dataclasses.fields(FishrHParams)}
    space = search_space(FishrHParams)
    assert (defaults["lambda_"], space["lambda_"]) == (1e3, LogUniform(1, 4))
    assert (defaults["penalty_anneal_iters"], space["penalty_anneal_iters"]) == (1500, IntUniform(0, 5000))
    assert (defaults["ema"], space["ema"]) == (0.95, Uniform(0.90, 0.99))
    shared = {"lr", "weight_decay", "batch_size", "dropout"}
    assert set(space) - {"lambda_", "penalty_anneal_iters", "ema"} == shared
    assert Fishr.paper.endswith("arXiv:2109.02934") and Fishr.reference.endswith("algorithms.py:Fishr")
    # int(r.uniform(0., 5000.)) as DomainBed: an int, drawn like a plain uniform
    assert IntUniform(0, 5000).sample(np.random.RandomState(3)) == int(
        np.random.RandomState(3).uniform(0, 5000)
    )
    for seed in range(1, 6):
        value = sample_hparams(FishrHParams, seed, 0)["penalty_anneal_iters"]
        assert isinstance(value, int) and 0 <= value < 5000


def test_rejects_an_ema_of_one_and_a_wrong_number_of_domains():
    with pytest.raises(ConfigError, match="ema"):
        make(ema=1.0)
    with pytest.raises(ValueError, match="3 batches"):
        make().update(make_batches()[:2])


# --- per-sample gradients and their variance --------------------------------------------------


def test_logit_gradients_give_the_autograd_per_sample_gradients_of_the_head():
    g = torch.Generator().manual_seed(0)
    z, weight, bias = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 4), (3, 4), (3,)))
    y = torch.tensor([0, 2, 1, 1, 0, 2])

    def loss(w: Tensor, b: Tensor, zi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(zi[None], w, b), yi[None])

    dw, db = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        weight, bias, z, y
    )
    rows = logit_gradients(F.linear(z, weight, bias), y)
    torch.testing.assert_close(rows[:, :, None] * z[:, None, :], dw, rtol=1e-12, atol=1e-14)  # g_i ⊗ z_i
    torch.testing.assert_close(rows, db, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_head_gradient_variance_is_the_biased_centred_variance_of_per_sample_gradients(offset):
    # offset: features far from zero, where the uncentred expansion cancels most (float64 copes)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64) + offset
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) / (1 + offset)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    expected = per_sample_gradients(z, weight, bias, y).var(dim=0, unbiased=False)
    variance = head_gradient_variance(z, F.linear(z, weight, bias), y)
    assert variance.shape == (3, 5)
    torch.testing.assert_close(variance[:, :-1].flatten(), expected[:12], rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(variance[:, -1], expected[12:], rtol=1e-9, atol=1e-15)


# --- one step, the EMA and the penalty -------------------------------------------------------


def test_loss_penalty_and_ema_state_match_a_float64_hand_computation_over_steps():
    """Unequal domain sizes, dropout, a warm-up step (weight 0, EMA still updated), then λ."""
    ema, lam = 0.9, 3.0
    algorithm = make(dropout=0.5, ema=ema, lambda_=lam, penalty_anneal_iters=1)
    states = [torch.zeros(CLASSES * HIDDEN + CLASSES, dtype=torch.float64) for _ in range(DOMAINS)]
    for step in range(3):
        batches = make_batches(seed=10 + step)
        x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        params = {k: v.detach().double() for k, v in algorithm.named_parameters()}
        torch.manual_seed(step)  # the head's dropout mask, the only random draw of the step
        with torch.no_grad():
            mask = algorithm.classifier[0](torch.ones(len(x), HIDDEN)).double()
        z = F.linear(x.double(), params["featurizer.model.weight"], params["featurizer.model.bias"]) * mask
        weight = params["classifier.1.weight"].requires_grad_()
        bias = params["classifier.1.bias"].requires_grad_()
        nll = F.cross_entropy(F.linear(z, weight, bias), y).detach()
        pairs = zip(z.split(SIZES), y.split(SIZES), strict=True)
        grads = [per_sample_gradients(zd, weight, bias, yd) for zd, yd in pairs]
        penalty, states = reference_penalty(grads, states, ema)

        torch.manual_seed(step)
        metrics = algorithm.update(batches)
        weight_t = 0.0 if step < 1 else lam
        assert metrics["loss"] == pytest.approx(float(nll), rel=1e-6)
        assert metrics["penalty"] == pytest.approx(float(penalty), rel=1e-5)
        assert metrics["objective"] == pytest.approx(float(nll) + weight_t * float(penalty), rel=1e-5)
        for ours, expected in zip(to_domainbed_layout(algorithm.ema_variance), states, strict=True):
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-9)


def test_identical_domains_give_a_zero_penalty():
    """Zero up to float32 rounding of the features: the featurizer sees the domains as one batch,
    and a CPU's convolution kernels may round the same image differently at another position in
    it (seen on an AMD EPYC: a penalty of 7e-20, variances equal to 1e-7 relative)."""
    algorithm = make(lambda_=5.0, penalty_anneal_iters=0)
    rounding = 8 * torch.finfo(torch.float32).eps  # relative error of a float32 feature, generously
    for step in range(3):
        batch = make_batches(sizes=(6,), seed=step)[0]
        penalty = float(algorithm.update([batch] * DOMAINS)["penalty"])
        variances = algorithm.ema_variance.double() / (1 - algorithm.cfg.ema)
        assert 0 <= penalty <= rounding**2 * float(variances.pow(2).mean())
        for v in algorithm.ema_variance:
            torch.testing.assert_close(v, algorithm.ema_variance[0], rtol=rounding, atol=0)
    assert algorithm.ema_variance.abs().sum() > 0


def test_penalty_gradient_reaches_featurizer_and_classifier_like_autograd_through_per_sample_gradients():
    """DomainBed differentiates the penalty through BackPACK's per-sample gradients
    (create_graph=True): through the softmax and the head's input z into the featurizer."""
    ema = 0.8
    algorithm = make(ema=ema, lambda_=1.0, penalty_anneal_iters=0).double()
    algorithm.update([(x.double(), y) for x, y in make_batches(seed=5)])  # a non-zero EMA state
    batches = [(x.double(), y) for x, y in make_batches(seed=6)]
    states = to_domainbed_layout(algorithm.ema_variance)
    params = dict(algorithm.named_parameters())

    z = algorithm.featurizer(torch.cat([x for x, _ in batches]))
    y = torch.cat([y for _, y in batches])
    weight, bias = params["classifier.1.weight"], params["classifier.1.bias"]
    grads = [
        per_sample_gradients(zd, weight, bias, yd, graph=True)
        for zd, yd in zip(z.split(SIZES), y.split(SIZES), strict=True)
    ]
    expected, _ = reference_penalty(grads, states, ema)
    expected_grads = torch.autograd.grad(expected, list(params.values()))

    _, penalty, _ = algorithm.losses(batches)
    ours = torch.autograd.grad(penalty, list(params.values()))
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for name, a, b in zip(params, ours, expected_grads, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=name)


def test_autocast_keeps_the_variances_in_full_precision():
    algorithm = make(lambda_=2.0, penalty_anneal_iters=0)
    batches = make_batches()
    y = torch.cat([y for _, y in batches])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = algorithm.featurizer(torch.cat([x for x, _ in batches]))
        logits = algorithm.classifier(z)
        state = algorithm.ema_variance.clone()
        low = algorithm.variance_penalty(z, logits, y, list(SIZES))
    assert z.dtype == logits.dtype == torch.bfloat16 and algorithm.ema_variance.dtype == torch.float32
    low_state = algorithm.ema_variance.clone()
    algorithm.ema_variance.copy_(state)
    with torch.no_grad():
        full = algorithm.variance_penalty(z.double(), logits.double(), y, list(SIZES))
    assert float(low) == float(full) and torch.equal(low_state, algorithm.ema_variance)


# --- annealing, the Adam reset, weight 0 and checkpoints ----------------------------------------


def test_weight_zero_then_lambda_with_a_single_adam_reset_and_the_ema_updated_throughout():
    algorithm = make(lambda_=7.0, penalty_anneal_iters=3)
    made = []
    original = algorithm.make_optimizer
    algorithm.make_optimizer = lambda *a, **k: made.append(int(algorithm.update_count)) or original(*a, **k)
    weights = []
    for step in range(6):
        before_opt, before_ema = algorithm.optimizer, algorithm.ema_variance.clone()
        weights.append(algorithm.penalty_weight())
        metrics = algorithm.update(make_batches(seed=step))
        assert metrics["penalty"] > 0 and not torch.equal(before_ema, algorithm.ema_variance)
        assert metrics["objective"] == pytest.approx(
            float(metrics["loss"] + weights[-1] * metrics["penalty"]), rel=1e-6
        )
        assert (algorithm.optimizer is not before_opt) == (step == 3)
        adam_steps = int(next(iter(algorithm.optimizer.state.values()))["step"])
        assert adam_steps == (step + 1 if step < 3 else step - 2)
    assert weights == [0.0, 0.0, 0.0, 7.0, 7.0, 7.0]
    assert made == [3] and int(algorithm.update_count) == 6


@pytest.mark.parametrize(
    "hparams", [{"lambda_": 0.0, "penalty_anneal_iters": 0}, {"penalty_anneal_iters": 10}]
)
def test_zero_penalty_weight_steps_equal_erm_steps(hparams):
    """λ = 0, and the warm-up (weight 0 before penalty_anneal_iters): ERM, dropout mask included."""
    algorithm = make(weight_decay=0.5, dropout=0.5, **hparams)
    erm = make(ERM, ERMHParams, weight_decay=0.5, dropout=0.5)
    erm.load_state_dict({k: v for k, v in algorithm.state_dict().items() if k in erm.state_dict()})
    for step in range(3):
        batches = make_batches(seed=step)
        torch.manual_seed(step)
        metrics = algorithm.update(batches)
        torch.manual_seed(step)
        assert metrics["loss"] == pytest.approx(float(erm.update(batches)["loss"]), rel=1e-6)
        assert metrics["objective"] == metrics["loss"]
    for (key, p), (erm_key, q) in zip(algorithm.named_parameters(), erm.named_parameters(), strict=True):
        assert key == erm_key
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(algorithm.classifier[1].weight, make().classifier[1].weight)


def test_checkpoint_resume_across_the_adam_reset_keeps_the_ema_and_is_bit_identical(tmp_path):
    hparams = {"lambda_": 10.0, "penalty_anneal_iters": 2, "dropout": 0.1}
    steps = [make_batches(seed=s) for s in range(5)]
    original = make(**hparams)
    original.update(steps[0])
    assert original.ema_variance.abs().sum() > 0 and "ema_variance" in original.state_dict()
    save_checkpoint(tmp_path / "ckpt.pt", original, step=0)
    expected = [original.update(b) for b in steps[1:]]
    resumed = make(seed=3, **hparams)
    load_checkpoint(tmp_path / "ckpt.pt", resumed, torch.device("cpu"))
    resumed.train()
    assert [resumed.update(b) for b in steps[1:]] == expected
    for key, value in original.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
