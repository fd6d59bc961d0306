"""MTL and SagNet (dgbench.algorithms.mtl / sagnet) against hand computations in float64.

Tiny CPU models: a linear featurizer and linear heads, on random data. Optimizers are swapped for
plain SGD where a test re-derives a whole step, so the expected parameters are θ − η·∇.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.mtl import MTL, MTLHParams
from dgbench.algorithms.sagnet import SagNet, SagNetHParams, randomize, uniform_cross_entropy
from dgbench.backbones import Featurizer
from dgbench.errors import ConfigError
from dgbench.hparams import Choice, LogUniform
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, LR, EPS = 5, 4, 3, 3, 1e-2, 1e-5


def make(cls, cfg_cls, seed: int = 0, hidden: int = HIDDEN, **hparams):
    torch.manual_seed(seed)
    cfg = cfg_cls(**{"lr": LR, **hparams})
    algorithm = cls(Featurizer(nn.Linear(IN, hidden), hidden), CLASSES, DOMAINS, cfg)
    algorithm.train()
    return algorithm


def make_batches(sizes=(6, 5, 7), seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def double_params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().double().clone().requires_grad_() for k, v in module.named_parameters()}


def sgd(params: dict[str, Tensor], loss: Tensor, names: list[str]) -> dict[str, Tensor]:
    """θ − LR·∇θ loss for `names` (the others unchanged), as new float64 leaves."""
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    out = dict(params)
    for n, g in zip(names, grads, strict=True):
        out[n] = (params[n] - LR * g).detach().requires_grad_()
    return out


def assert_params(module: nn.Module, expected: dict[str, Tensor]) -> None:
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach().double(), expected[name].detach(), rtol=1e-5, atol=1e-6)


class FixedMask(nn.Module):
    """A deterministic stand-in for the dropout module: multiplies features by a fixed vector."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, z: Tensor) -> Tensor:
        return z * self.mask


MASK = torch.tensor([2.0, 0.0, 2.0, 2.0])


@pytest.mark.algorithm("mtl", "sagnet")
def test_registered_with_domainbeds_hparams():
    assert {"mtl", "sagnet"} <= set(ALGORITHMS.names())
    fields = {f.name: f for f in dataclasses.fields(MTLHParams)}
    assert MTLHParams().mtl_ema == 0.99
    assert fields["mtl_ema"].metadata["search"] == Choice([0.5, 0.9, 0.99, 1.0])
    fields = {f.name: f for f in dataclasses.fields(SagNetHParams)}
    assert SagNetHParams().sag_w_adv == 0.1
    assert fields["sag_w_adv"].metadata["search"] == LogUniform(-2, 1)
    assert MTL.reference.endswith("algorithms.py:MTL") and SagNet.reference.endswith("algorithms.py:SagNet")


# --- MTL ----------------------------------------------------------------------------------------


@pytest.mark.algorithm("mtl")
def test_mtl_embedding_memory_follows_the_ema_formula():
    """E_d ← ema·mean(dropout(f(x_d))) + (1 − ema)·E_d, per domain, over two updates; the mean is
    over the features *after* dropout (a fixed mask stands in for it)."""
    ema = 0.9
    mtl = make(MTL, MTLHParams, mtl_ema=ema)
    mtl.dropout = FixedMask(MASK)
    expected = np.zeros((DOMAINS, HIDDEN))
    assert torch.equal(mtl.embeddings, torch.zeros(DOMAINS, HIDDEN))
    for step in range(2):
        batches = make_batches(seed=step)
        w = mtl.featurizer.model.weight.detach().double().numpy()
        b = mtl.featurizer.model.bias.detach().double().numpy()
        for d, (x, _) in enumerate(batches):
            features = (x.double().numpy() @ w.T + b) * MASK.double().numpy()
            expected[d] = ema * features.mean(axis=0) + (1 - ema) * expected[d]
        mtl.update(batches)
        np.testing.assert_allclose(mtl.embeddings.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert "embeddings" in mtl.state_dict()  # a persistent buffer: checkpoints resume it


@pytest.mark.algorithm("mtl")
def test_mtl_predict_is_the_classifier_of_features_and_their_batch_mean():
    mtl = make(MTL, MTLHParams)
    mtl.update(make_batches())
    mtl.eval()
    x = make_batches(seed=5)[2][0]
    with torch.no_grad():
        logits = mtl.predict(x)
        mtl.embeddings.normal_()  # the memory is for training only
        again = mtl.predict(x)
    w, b = (t.detach().double() for t in (mtl.featurizer.model.weight, mtl.featurizer.model.bias))
    features = x.double() @ w.T + b
    inputs = torch.cat([features, features.mean(0).expand(len(x), -1)], dim=1)
    expected = inputs @ mtl.classifier.weight.detach().double().T + mtl.classifier.bias.detach().double()
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits, again)
    assert mtl.classifier.in_features == 2 * HIDDEN


@pytest.mark.algorithm("mtl")
def test_mtl_step_descends_the_summed_domain_losses_through_the_current_mean():
    """One SGD step equals θ − η·∇ Σ_d CE(classifier([f_d, ema·mean(f_d) + (1−ema)·E_d]), y_d), with
    E_d a constant: the loss is a sum over domains, the gradient flows through the batch mean."""
    ema = 0.5
    mtl = make(MTL, MTLHParams, mtl_ema=ema)
    with torch.no_grad():
        mtl.embeddings.copy_(torch.randn(DOMAINS, HIDDEN, generator=torch.Generator().manual_seed(3)))
    mtl.optimizer = torch.optim.SGD(mtl.parameters(), lr=LR)
    batches = make_batches()
    memory = mtl.embeddings.double().clone()
    params = double_params(mtl)

    losses: list[Tensor] = []
    for d, (x, y) in enumerate(batches):
        f = x.double() @ params["featurizer.model.weight"].T + params["featurizer.model.bias"]
        e = ema * f.mean(0) + (1 - ema) * memory[d]
        logits = torch.cat([f, e.expand(len(x), -1)], 1) @ params["classifier.weight"].T
        losses.append(F.cross_entropy(logits + params["classifier.bias"], y))
    expected = sgd(params, torch.stack(losses).sum(), list(params))
    losses = [loss.detach() for loss in losses]

    metrics = mtl.update(batches)
    assert_params(mtl, expected)
    assert metrics["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    assert metrics["objective"] == pytest.approx(float(torch.stack(losses).sum()), rel=1e-5)


@pytest.mark.algorithm("mtl")
def test_mtl_without_memory_trains_on_the_logits_it_predicts():
    """mtl_ema = 1: a domain's training embedding is its batch mean, i.e. what `predict` uses."""
    mtl = make(MTL, MTLHParams, mtl_ema=1.0)
    x, _ = make_batches()[1]
    with torch.no_grad():
        torch.testing.assert_close(mtl.domain_logits(x, 1), mtl.predict(x))


@pytest.mark.algorithm("mtl")
def test_mtl_rejects_a_different_number_of_domains():
    with pytest.raises(ValueError, match="3 domains"):
        make(MTL, MTLHParams).update(make_batches()[:2])


# --- SagNet -------------------------------------------------------------------------------------


def stats(v: np.ndarray) -> tuple[float, float]:
    """(mean, unbiased variance) of a 1-D array."""
    return float(v.mean()), float(v.var(ddof=1))


def hand_randomize(z: np.ndarray, what: str, alpha: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Loops over samples (and channels of an (N, C, *spatial) map): statistics over the features
    of an (N, C) row, or over the spatial positions of each channel."""
    rows = z.reshape(z.shape[0], z.shape[1], -1) if z.ndim > 2 else z[:, None, :]
    out = np.empty_like(rows)
    for i in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            mu, var = stats(rows[i, c])
            mu_p, var_p = stats(rows[perm[i], c])
            if what == "style":
                content = (rows[i, c] - mu) / np.sqrt(var + EPS)
                mu, var = alpha[i] * mu + (1 - alpha[i]) * mu_p, alpha[i] * var + (1 - alpha[i]) * var_p
            else:
                content = (rows[perm[i], c] - mu_p) / np.sqrt(var_p + EPS)
            out[i, c] = content * np.sqrt(var + EPS) + mu
    return out.reshape(z.shape)


def draws(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g), torch.randperm(n, generator=g)


@pytest.mark.algorithm("sagnet")
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 5)])
def test_randomize_style_mixes_statistics_and_keeps_content(shape):
    z = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3 + 1
    alpha, perm = draws(shape[0], 1)
    out = randomize(z, "style", alpha, perm)
    expected = hand_randomize(z.numpy(), "style", alpha.double().numpy(), perm.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # the per-sample normalised content is kept; α = 1 gives the input back
    flat = lambda t: t.reshape(shape[0], shape[1], -1) if t.dim() > 2 else t  # noqa: E731
    norm = lambda t: (flat(t) - flat(t).mean(-1, keepdim=True)) / flat(t).std(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(norm(out), norm(z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(randomize(z, "style", torch.ones(shape[0]), perm), z)


@pytest.mark.algorithm("sagnet")
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 5)])
def test_randomize_content_swaps_content_and_keeps_style(shape):
    z = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    alpha, perm = draws(shape[0], 3)
    out = randomize(z, "content", alpha, perm)
    expected = hand_randomize(z.numpy(), "content", alpha.double().numpy(), perm.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.algorithm("sagnet")
def test_randomize_content_is_differentiable_only_through_the_samples_own_style():
    """z'_i = n_p(i)·√(σ²_i + ε) + μ_i with n_p(i) a constant: ∂(w·z'_i)/∂z_j = 0 for j ≠ i and, for
    j = i, (w·n_p(i))·(z_i − μ_i) / ((C − 1)·√(σ²_i + ε)) + Σw / C."""
    n, c = 5, 4
    z = torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    alpha, perm = draws(n, 5)
    weights = torch.randn(n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (grad,) = torch.autograd.grad((randomize(z, "content", alpha, perm) * weights).sum(), z)

    zn = z.detach().numpy()
    expected = np.zeros((n, c))
    for i in range(n):
        mu, var = stats(zn[i])
        mu_p, var_p = stats(zn[perm[i]])
        content = (zn[perm[i]] - mu_p) / np.sqrt(var_p + EPS)
        w = weights[i].numpy()
        expected[i] = (w @ content) * (zn[i] - mu) / ((c - 1) * np.sqrt(var + EPS)) + w.sum() / c
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def torch_randomize(z: Tensor, what: str, alpha: Tensor, perm: Tensor) -> Tensor:
    """The randomisation written out for (N, C) float64 tensors (differentiable)."""
    mu = z.mean(1, keepdim=True)
    var = ((z - mu) ** 2).sum(1, keepdim=True) / (z.shape[1] - 1)
    content = (z - mu) / torch.sqrt(var + EPS)
    a = alpha.double()[:, None]
    if what == "style":
        mu, var = a * mu + (1 - a) * mu[perm], a * var + (1 - a) * var[perm]
    else:
        content = content[perm].detach()
    return content * torch.sqrt(var + EPS) + mu


@pytest.mark.algorithm("sagnet")
def test_sagnet_step_is_content_then_style_then_adversary():
    """Whole update with SGD optimizers and fixed draws, against a float64 re-derivation:
    1. f, c ← − η∇ CE(c(style_rand(f(x))), y);  2. s ← − η∇ CE(s(content_rand(f(x))), y) with the new f;
    3. f ← − η∇ w·(−mean log_softmax(s(content_rand(f(x))))) with the new s, the sign DomainBed uses."""
    w_adv = 0.7
    sag = make(SagNet, SagNetHParams, sag_w_adv=w_adv)
    sag.dropout = FixedMask(MASK)
    sag.optimizer_f = torch.optim.SGD(sag.featurizer.parameters(), lr=LR)
    sag.optimizer_c = torch.optim.SGD(sag.classifier.parameters(), lr=LR)
    sag.optimizer_s = torch.optim.SGD(sag.style_classifier.parameters(), lr=LR)
    batches = make_batches()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    mixes = [draws(len(x), seed) for seed in (10, 11, 12)]
    queue = list(mixes)
    sag.mixing = lambda n, device: queue.pop(0)

    p = double_params(sag)
    f_names = ["featurizer.model.weight", "featurizer.model.bias"]
    c_names, s_names = (
        ["classifier.weight", "classifier.bias"],
        ["style_classifier.weight", "style_classifier.bias"],
    )

    def features(q):
        return (x.double() @ q[f_names[0]].T + q[f_names[1]]) * MASK.double()

    def head(q, names, z):
        return z @ q[names[0]].T + q[names[1]]

    loss_c = F.cross_entropy(head(p, c_names, torch_randomize(features(p), "style", *mixes[0])), y)
    p = sgd(p, loss_c, f_names + c_names)
    loss_s = F.cross_entropy(head(p, s_names, torch_randomize(features(p).detach(), "content", *mixes[1])), y)
    p = sgd(p, loss_s, s_names)
    style_logits = head(p, s_names, torch_randomize(features(p), "content", *mixes[2]))
    loss_adv = w_adv * -(F.log_softmax(style_logits, 1).mean())
    expected = sgd(p, loss_adv, f_names)

    metrics = sag.update(batches)
    assert not queue
    assert_params(sag, expected)
    assert metrics["loss"] == pytest.approx(loss_c.item(), rel=1e-5)
    assert metrics["loss_s"] == pytest.approx(loss_s.item(), rel=1e-5)
    assert metrics["loss_adv"] == pytest.approx(loss_adv.item(), rel=1e-5)
    assert metrics["loss_adv"] >= w_adv * np.log(CLASSES) - 1e-6  # CE against uniform ≥ log K


@pytest.mark.algorithm("sagnet")
def test_uniform_cross_entropy_is_zero_gradient_at_uniform_and_pushes_towards_it():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.3, 0.3]], requires_grad=True)
    loss = uniform_cross_entropy(logits)
    assert loss.item() == pytest.approx(-(F.log_softmax(logits, 1)).mean().item())
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad[1], torch.zeros(3))  # uniform prediction: a minimum
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent lowers the top logit, raises the lowest


@pytest.mark.algorithm("sagnet")
def test_zero_adversarial_weight_gives_the_featurizer_no_style_gradient():
    """With sag_w_adv = 0 the featurizer's update is the same whatever the style head is (its
    step-3 gradient is exactly zero, Adam still steps as in DomainBed); with a positive weight
    the style head changes it."""
    batches = make_batches()

    def featurizer_after(w_adv: float, style_seed: int) -> tuple[list[Tensor], list[Tensor]]:
        sag = make(SagNet, SagNetHParams, sag_w_adv=w_adv)
        torch.manual_seed(style_seed)
        nn.init.normal_(sag.style_classifier.weight)
        torch.manual_seed(99)
        sag.update(batches)
        params = list(sag.featurizer.parameters())
        return [q.detach().clone() for q in params], [q.grad.clone() for q in params]

    (a, grad_a), (b, _) = featurizer_after(0.0, 1), featurizer_after(0.0, 2)
    for pa, pb, g in zip(a, b, grad_a, strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(g, torch.zeros_like(g))
    (c, grad_c), (d, _) = featurizer_after(0.5, 1), featurizer_after(0.5, 2)
    assert any(not torch.equal(pc, pd) for pc, pd in zip(c, d, strict=True))
    assert any(g.abs().sum() > 0 for g in grad_c)


@pytest.mark.algorithm("sagnet")
def test_sagnet_predict_is_the_content_head_without_randomisation():
    sag = make(SagNet, SagNetHParams)
    sag.update(make_batches())
    sag.eval()
    x = make_batches(seed=3)[0][0]
    rng = torch.get_rng_state()
    with torch.no_grad():
        logits = sag.predict(x)
    assert torch.equal(torch.get_rng_state(), rng)  # no draws: nothing is randomised
    torch.testing.assert_close(logits, sag.classifier(sag.featurizer(x)).detach())


@pytest.mark.algorithm("sagnet")
def test_sagnet_optimizers_split_the_parameters_and_randomise_in_fp32():
    sag = make(SagNet, SagNetHParams)
    groups = {
        name: {id(q) for g in opt.param_groups for q in g["params"]} for name, opt in sag.optimizers().items()
    }
    assert groups == {
        "optimizer_f": {id(q) for q in sag.featurizer.parameters()},
        "optimizer_c": {id(q) for q in sag.classifier.parameters()},
        "optimizer_s": {id(q) for q in sag.style_classifier.parameters()},
    }
    assert set().union(*groups.values()) == {id(q) for q in sag.parameters()}
    z = torch.randn(4, HIDDEN).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sag.randomized(z, "style").dtype == torch.float32
    with pytest.raises(ConfigError, match="at least 2 features"):
        make(SagNet, SagNetHParams, hidden=1)
