"""DANN / CDANN: generator gradient, alternation, conditional input, gradient penalty."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dgbench.algorithms.dann import CDANN, DANN, DANNHParams
from dgbench.backbones import build_backbone

NUM_CLASSES, NUM_DOMAINS, BATCH, RES = 4, 3, 5, 16


def make(cls=DANN, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = DANNHParams(name=cls.__name__.lower(), **overrides)
    algorithm = cls(build_backbone({"arch": "small_cnn", "width": 0.25}), NUM_CLASSES, NUM_DOMAINS, cfg)
    algorithm.train()
    return algorithm


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, 3, RES, RES, generator=g), torch.randint(0, NUM_CLASSES, (BATCH,), generator=g))
        for _ in range(NUM_DOMAINS)
    ]


def pooled(bs):
    x = torch.cat([x for x, _ in bs])
    y = torch.cat([y for _, y in bs])
    d = torch.cat([torch.full((x.shape[0],), i) for i, (x, _) in enumerate(bs)])
    return x, y, d


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return any(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters())


@pytest.mark.algorithm("dann", "cdann")
@pytest.mark.parametrize("cls", [DANN, CDANN])
def test_generator_gradient_is_classifier_minus_lambda_disc_gradient(cls):
    lam = 0.7
    algorithm = make(cls, lambda_=lam, grad_penalty=0.3)
    reference = copy.deepcopy(algorithm)
    bs = batches()
    metrics = algorithm.update(bs)  # update_count 1 with d_steps_per_g_step 1: generator step
    assert metrics["d_step"] == 0.0

    x, y, d = pooled(bs)
    gen_params = [*reference.featurizer.parameters(), *reference.classifier.parameters()]
    z = reference.featurizer(x)
    cls_loss = F.cross_entropy(reference.classifier(z), y)
    disc_loss, _ = reference.discriminator_loss(reference.disc_input(z, y), y, d)
    g_cls = torch.autograd.grad(cls_loss, gen_params, retain_graph=True, allow_unused=True)
    g_disc = torch.autograd.grad(disc_loss, gen_params, allow_unused=True)
    got = [*algorithm.featurizer.parameters(), *algorithm.classifier.parameters()]
    for p, gc, gd in zip(got, g_cls, g_disc, strict=True):
        gc = torch.zeros_like(p) if gc is None else gc
        gd = torch.zeros_like(p) if gd is None else gd
        torch.testing.assert_close(p.grad, gc - lam * gd, rtol=1e-4, atol=1e-6)
    assert metrics["gen_loss"] == pytest.approx(cls_loss.item() - lam * disc_loss.item(), rel=1e-5)
    assert any(gd is not None and gd.abs().sum() > 0 for gd in g_disc)  # the domain term is present


@pytest.mark.algorithm("dann")
@pytest.mark.parametrize("d_steps", [1, 3])
def test_alternation_is_exact(d_steps):
    algorithm = make(d_steps_per_g_step=d_steps, lr_g=1e-2, lr_d=1e-2)
    for count in range(1, 9):
        disc_before, gen_before = params(algorithm.discriminator), params(algorithm.featurizer)
        metrics = algorithm.update(batches(count))
        expect_disc = count % (1 + d_steps) < d_steps
        assert int(algorithm.update_count) == count
        assert metrics["d_step"] == float(expect_disc), count
        assert changed(disc_before, algorithm.discriminator) == expect_disc, count
        assert changed(gen_before, algorithm.featurizer) == (not expect_disc), count


@pytest.mark.algorithm("dann")
def test_update_count_is_a_buffer():
    algorithm = make()
    assert "update_count" in dict(algorithm.named_buffers())
    assert set(algorithm.optimizers()) == {"disc_opt", "gen_opt"}


@pytest.mark.algorithm("dann", "cdann")
@pytest.mark.parametrize("cls", [DANN, CDANN])
def test_discriminator_input_includes_class_embedding_for_cdann(cls):
    algorithm = make(cls)
    seen = []
    algorithm.discriminator.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    bs = batches()
    x, y, _ = pooled(bs)
    with torch.no_grad():
        z = copy.deepcopy(algorithm).featurizer(x)
    algorithm.update(bs)
    expected = z + algorithm.class_embeddings.weight.detach()[y] if cls is CDANN else z
    torch.testing.assert_close(seen[0], expected)
    assert hasattr(algorithm, "class_embeddings") == (cls is CDANN)
    if cls is CDANN:  # the embeddings are trained by the discriminator step
        before = params(algorithm.class_embeddings)
        algorithm.update(batches(1))  # update_count 2: discriminator step
        assert changed(before, algorithm.class_embeddings)


@pytest.mark.algorithm("cdann")
@pytest.mark.parametrize("top_missing", [0, 2])
def test_cdann_disc_loss_is_class_balanced(top_missing):
    """DomainBed normalises by one_hot(y)'s width, max(y) + 1, also when the top classes are absent."""
    algorithm = make(CDANN)
    x, y, d = pooled(batches())
    y = y % (NUM_CLASSES - top_missing)
    z = algorithm.featurizer(x)
    inp = algorithm.disc_input(z, y)
    loss, _ = algorithm.discriminator_loss(inp, y, d)
    ce = F.cross_entropy(algorithm.discriminator(inp), d, reduction="none")
    n_y = torch.stack([(y == label).sum() for label in y]).float()
    torch.testing.assert_close(loss, (ce / (n_y * (int(y.max()) + 1))).sum())


def hand_input_gradient(mlp, inp, domains):
    """∂ Σ_i CE_i / ∂ input, back-propagated by hand through Linear-ReLU layers (no dropout)."""
    layers = [mlp.input, *mlp.hiddens]
    acts, h = [], inp
    for layer in layers:
        pre = h @ layer.weight.T + layer.bias
        acts.append(pre)
        h = pre.clamp_min(0)
    logits = h @ mlp.output.weight.T + mlp.output.bias
    g = logits.softmax(dim=1) - F.one_hot(domains, logits.shape[1]).to(logits.dtype)
    g = g @ mlp.output.weight
    for layer, pre in zip(reversed(layers), reversed(acts), strict=True):
        g = (g * (pre > 0).to(g.dtype)) @ layer.weight
    return g


@pytest.mark.algorithm("dann")
def test_gradient_penalty_zero_when_off_and_matches_hand_computation():
    x, y, d = pooled(batches())
    off = make(grad_penalty=0.0)
    with torch.no_grad():
        z = off.featurizer(x)
    loss0, penalty0 = off.discriminator_loss(z.clone().requires_grad_(), y, d)
    assert float(penalty0) == 0.0
    torch.testing.assert_close(loss0, F.cross_entropy(off.discriminator(z), d))

    weight = 2.5
    on = make(grad_penalty=weight)
    with torch.no_grad():
        z = on.featurizer(x)
        hand = hand_input_gradient(on.discriminator, z, d).pow(2).sum(dim=1).mean()
    loss, penalty = on.discriminator_loss(z.clone().requires_grad_(), y, d)
    assert float(hand) > 0
    torch.testing.assert_close(penalty, hand, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        loss, F.cross_entropy(on.discriminator(z), d) + weight * hand, rtol=1e-5, atol=1e-7
    )
    # the penalty is differentiated (create_graph): it changes the discriminator's gradient
    w = on.discriminator.input.weight
    (g_with,) = torch.autograd.grad(loss, [w], retain_graph=True)
    (g_plain,) = torch.autograd.grad(F.cross_entropy(on.discriminator(z), d), [w])
    assert not torch.allclose(g_with, g_plain)
