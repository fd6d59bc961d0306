"""GroupDRO, Mixup and MLDG (dgbench.algorithms.groupdro / mixup / mldg) against hand computations.

Tiny CPU models: a linear featurizer (optionally followed by BatchNorm1d) and the linear head, on
random data. The hand computations use `torch.func.functional_call` on copies of the weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.algorithms.groupdro import GroupDRO, GroupDROHParams
from dgbench.algorithms.mixup import Mixup, MixupHParams, mix, mixup_loss
from dgbench.algorithms.mldg import MLDG, MLDGHParams
from dgbench.algorithms.pairs import cyclic_pair_indices, random_pairs_of_minibatches, split_meta_train_test
from dgbench.backbones import Featurizer
from dgbench.hparams import LogUniform, search_space
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, LR = 5, 4, 3, 3, 1e-2


def make(cls, cfg_cls, seed: int = 0, bn: bool = False, **hparams):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, HIDDEN)]
    if bn:
        layers.append(nn.BatchNorm1d(HIDDEN))
    algorithm = cls(
        Featurizer(nn.Sequential(*layers), HIDDEN), CLASSES, DOMAINS, cfg_cls(**{"lr": LR, **hparams})
    )
    algorithm.train()
    return algorithm


def make_batches(sizes=(6, 6, 6), seed: int = 1, shift: tuple[float, ...] = (0.0, 1.0, 2.0)) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + s, torch.randint(0, CLASSES, (n,), generator=g))
        for n, s in zip(sizes, shift, strict=True)
    ]


def params_of(algorithm) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in algorithm.named_parameters()}


def functional_predict(algorithm, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits of the linear featurizer + linear head at `params` (no BN, no dropout)."""
    h = F.linear(x, params["featurizer.model.0.weight"], params["featurizer.model.0.bias"])
    return F.linear(h, params["classifier.1.weight"], params["classifier.1.bias"])


def adam_first_step(
    params: dict[str, Tensor], grads: dict[str, Tensor], lr: float, wd: float
) -> dict[str, Tensor]:
    """The first step of a freshly created torch Adam (default betas, eps), written out."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = {}
    for k, p in params.items():
        g = grads[k] + wd * p
        m, v = (1 - b1) * g, (1 - b2) * g * g
        out[k] = p - (lr / (1 - b1)) * m / (v.sqrt() / (1 - b2) ** 0.5 + eps)
    return out


# ---------------------------------------------------------------- registration and search spaces


@pytest.mark.algorithm("groupdro", "mixup", "mldg")
def test_registered_with_domainbed_hparams():
    for name, cls, cfg_cls in [
        ("groupdro", GroupDRO, GroupDROHParams),
        ("mixup", Mixup, MixupHParams),
        ("mldg", MLDG, MLDGHParams),
    ]:
        entry = ALGORITHMS.get(name)
        assert entry.obj is cls and entry.config is cfg_cls
    assert GroupDROHParams().groupdro_eta == 1e-2
    assert search_space(GroupDROHParams)["groupdro_eta"] == LogUniform(-3, -1)
    assert MixupHParams().mixup_alpha == 0.2
    assert search_space(MixupHParams)["mixup_alpha"] == LogUniform(-1, 1)
    assert MLDGHParams().mldg_beta == 1.0 and MLDGHParams().n_meta_test == 0
    space = search_space(MLDGHParams)
    assert space["mldg_beta"] == LogUniform(-1, 1) and "n_meta_test" not in space
    for cfg_cls in (GroupDROHParams, MixupHParams, MLDGHParams):
        cfg = cfg_cls()
        assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.dropout) == (5e-5, 0.0, 32, 0.0)


# ---------------------------------------------------------------- pairing


@pytest.mark.algorithm("mixup", "mldg")
def test_random_pairs_are_a_cyclic_pairing_of_a_seeded_permutation():
    sizes = (3, 5, 4, 6)
    batches = [(torch.full((n, 1), float(d)), torch.full((n,), d)) for d, n in enumerate(sizes)]
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3)).tolist()
    pairs = random_pairs_of_minibatches(batches, torch.Generator().manual_seed(3))
    got = [(int(yi[0]), int(yj[0])) for (_, yi), (_, yj) in pairs]
    assert got == [(perm[k], perm[(k + 1) % 4]) for k in range(4)] == cyclic_pair_indices(perm)
    assert sorted(i for i, _ in got) == sorted(j for _, j in got) == [0, 1, 2, 3]
    for ((xi, yi), (xj, yj)), (i, j) in zip(pairs, got, strict=True):
        n = min(sizes[i], sizes[j])
        assert len(xi) == len(yi) == len(xj) == len(yj) == n
        assert torch.equal(xi, batches[i][0][:n]) and torch.equal(xj, batches[j][0][:n])

    # Without a generator: torch's global RNG, so a saved and restored RNG state replays the pairs.
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = [(int(yi[0]), int(yj[0])) for (_, yi), (_, yj) in random_pairs_of_minibatches(batches)]
    torch.set_rng_state(state)
    again = [(int(yi[0]), int(yj[0])) for (_, yi), (_, yj) in random_pairs_of_minibatches(batches)]
    torch.manual_seed(11)
    expected = cyclic_pair_indices(torch.randperm(4).tolist())
    assert first == again == expected


@pytest.mark.algorithm("mldg")
def test_split_meta_train_test():
    batches = [(torch.full((2, 1), float(d)), torch.full((2,), d)) for d in range(4)]
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(5)).tolist()
    pairs = split_meta_train_test(batches, 2, torch.Generator().manual_seed(5))
    got = [(int(yi[0]), int(yj[0])) for (_, yi), (_, yj) in pairs]
    assert got == [(perm[0], perm[2]), (perm[1], perm[3])]
    with pytest.raises(ValueError):
        split_meta_train_test(batches, 4)


# ---------------------------------------------------------------- GroupDRO


@pytest.mark.algorithm("groupdro")
def test_groupdro_q_stays_on_the_simplex_and_moves_toward_the_worst_domain():
    eta = 0.5
    algorithm = make(GroupDRO, GroupDROHParams, groupdro_eta=eta)
    assert "q" in algorithm.state_dict() and torch.equal(algorithm.q, torch.full((DOMAINS,), 1 / DOMAINS))
    batches = make_batches(shift=(0.0, 0.0, 6.0))  # domain 2 is far off: the highest loss
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(algorithm.predict(x), y) for x, y in batches])
    worst = int(losses.argmax())
    expected_q = torch.exp(eta * losses) / torch.exp(eta * losses).sum()  # from uniform q

    metrics = algorithm.update(batches)
    torch.testing.assert_close(algorithm.q, expected_q, rtol=1e-6, atol=1e-7)
    assert int(algorithm.q.argmax()) == worst and float(algorithm.q[worst]) > 1 / DOMAINS
    assert metrics["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
    assert metrics["robust_loss"] == pytest.approx(float(losses @ expected_q), rel=1e-6)
    assert [metrics[f"q{d}"] for d in range(DOMAINS)] == pytest.approx(expected_q.tolist(), rel=1e-6)

    for step in range(20):
        algorithm.update(make_batches(seed=step + 2, shift=(0.0, 0.0, 6.0)))
        assert float(algorithm.q.sum()) == pytest.approx(1.0, abs=1e-6) and bool((algorithm.q >= 0).all())


@pytest.mark.algorithm("groupdro")
def test_groupdro_eta_zero_keeps_q_uniform_and_equals_erm():
    groupdro = make(GroupDRO, GroupDROHParams, groupdro_eta=0.0, weight_decay=1e-3)
    erm = make(ERM, ERMHParams, weight_decay=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(groupdro.parameters(), erm.parameters(), strict=True))
    for step in range(3):
        batches = make_batches(seed=step)  # equal domain sizes: pooled mean = mean of domain means
        m_dro, m_erm = groupdro.update(batches), erm.update(batches)
        torch.testing.assert_close(groupdro.q, torch.full((DOMAINS,), 1 / DOMAINS), rtol=0, atol=1e-7)
        assert m_dro["loss"] == pytest.approx(float(m_erm["loss"]), rel=1e-6)
        assert m_dro["robust_loss"] == pytest.approx(float(m_erm["loss"]), rel=1e-6)
    for (name, a), b in zip(groupdro.named_parameters(), erm.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.algorithm("groupdro")
def test_groupdro_q_resumes_from_the_state_dict():
    algorithm = make(GroupDRO, GroupDROHParams, groupdro_eta=0.5)
    algorithm.update(make_batches(shift=(0.0, 0.0, 6.0)))
    fresh = make(GroupDRO, GroupDROHParams, seed=1, groupdro_eta=0.5)
    fresh.load_state_dict(algorithm.state_dict())
    assert torch.equal(fresh.q, algorithm.q) and not torch.equal(fresh.q, torch.full((DOMAINS,), 1 / DOMAINS))


# ---------------------------------------------------------------- Mixup


@pytest.mark.algorithm("mixup")
def test_mixup_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, CLASSES, generator=g)
    y_i, y_j = torch.randint(0, CLASSES, (7,), generator=g), torch.randint(0, CLASSES, (7,), generator=g)
    logp = logits.log_softmax(1)
    nll_i, nll_j = -logp[torch.arange(7), y_i].mean(), -logp[torch.arange(7), y_j].mean()
    torch.testing.assert_close(mixup_loss(logits, y_i, y_j, 0.3), 0.3 * nll_i + 0.7 * nll_j)
    torch.testing.assert_close(
        mixup_loss(logits, y_i, y_j, 1.0), F.cross_entropy(logits, y_i), rtol=0, atol=0
    )
    assert torch.equal(mix(torch.ones(2), torch.zeros(2), 0.25), torch.full((2,), 0.25))


@pytest.mark.algorithm("mixup")
def test_mixup_draws_lambda_from_numpy_beta():
    algorithm = make(Mixup, MixupHParams, mixup_alpha=0.7)
    np.random.seed(4)
    drawn = [algorithm.sample_lambda() for _ in range(3)]
    np.random.seed(4)
    assert drawn == [float(np.random.beta(0.7, 0.7)) for _ in range(3)]


@pytest.mark.algorithm("mixup")
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_mixup_update_equals_the_hand_mixed_objective(monkeypatch, lam):
    algorithm = make(Mixup, MixupHParams, weight_decay=1e-3)
    monkeypatch.setattr(algorithm, "sample_lambda", lambda: lam)
    batches = make_batches(sizes=(4, 6, 5))
    theta = params_of(algorithm)
    torch.manual_seed(7)
    order = cyclic_pair_indices(torch.randperm(DOMAINS).tolist())

    reference = make(Mixup, MixupHParams, weight_decay=1e-3)  # same seed, same weights
    objective = 0.0
    for i, j in order:
        n = min(len(batches[i][0]), len(batches[j][0]))
        (x_i, y_i), (x_j, y_j) = (
            (batches[i][0][:n], batches[i][1][:n]),
            (batches[j][0][:n], batches[j][1][:n]),
        )
        logits = functional_predict(
            reference, dict(reference.named_parameters()), lam * x_i + (1 - lam) * x_j
        )
        logp = logits.log_softmax(1)
        ce_i, ce_j = -logp[torch.arange(n), y_i].mean(), -logp[torch.arange(n), y_j].mean()
        objective = objective + (ce_i if lam == 1.0 else lam * ce_i + (1 - lam) * ce_j)
    objective = objective / DOMAINS
    reference.optimizer.zero_grad()
    objective.backward()
    reference.optimizer.step()

    torch.manual_seed(7)
    metrics = algorithm.update(batches)
    assert metrics["loss"] == pytest.approx(float(objective.detach()), rel=1e-6)
    for (name, a), b in zip(algorithm.named_parameters(), reference.parameters(), strict=True):
        assert not torch.equal(a, theta[name])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- MLDG


@pytest.mark.algorithm("mldg")
def test_mldg_beta_zero_is_one_adam_step_on_the_mean_meta_train_loss():
    algorithm = make(MLDG, MLDGHParams, mldg_beta=0.0, weight_decay=1e-3)
    batches = make_batches()  # equal sizes: every domain is meta-train once, untruncated
    theta = {k: v.requires_grad_() for k, v in params_of(algorithm).items()}
    loss = sum(F.cross_entropy(functional_predict(algorithm, theta, x), y) for x, y in batches) / DOMAINS
    names = list(theta)
    grads = dict(zip(names, torch.autograd.grad(loss, [theta[k] for k in names]), strict=True))
    expected = adam_first_step({k: v.detach() for k, v in theta.items()}, grads, LR, 1e-3)

    metrics = algorithm.update(batches)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    for name, p in algorithm.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.algorithm("mldg")
def test_mldg_gradient_is_the_first_order_formula():
    beta, wd = 0.7, 1e-2
    algorithm = make(MLDG, MLDGHParams, mldg_beta=beta, weight_decay=wd)
    batches = make_batches(sizes=(4, 6, 5))
    theta = {k: v.detach() for k, v in params_of(algorithm).items()}
    names = list(theta)

    def grad_at(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(functional_predict(algorithm, leaves, x), y)
        return loss.detach(), dict(
            zip(names, torch.autograd.grad(loss, [leaves[k] for k in names]), strict=True)
        )

    torch.manual_seed(5)
    order = cyclic_pair_indices(torch.randperm(DOMAINS).tolist())
    meta_grad = {k: torch.zeros_like(v) for k, v in theta.items()}
    objective = 0.0
    for i, j in order:
        n = min(len(batches[i][0]), len(batches[j][0]))
        loss_i, g_i = grad_at(theta, batches[i][0][:n], batches[i][1][:n])
        theta_prime = adam_first_step(theta, g_i, LR, wd)  # a fresh Adam's step, not SGD
        loss_j, g_j = grad_at(theta_prime, batches[j][0][:n], batches[j][1][:n])
        for k in names:
            meta_grad[k] += (g_i[k] + beta * g_j[k]) / DOMAINS
        objective += float(loss_i) + beta * float(loss_j)
    expected = adam_first_step(theta, meta_grad, LR, wd)

    torch.manual_seed(5)
    metrics = algorithm.update(batches)
    assert metrics["loss"] == pytest.approx(objective / DOMAINS, rel=1e-6)
    for name, p in algorithm.named_parameters():
        torch.testing.assert_close(p.grad, meta_grad[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # β matters: the same step without the meta-test term gives another gradient.
    plain = make(MLDG, MLDGHParams, mldg_beta=0.0, weight_decay=wd)
    torch.manual_seed(5)
    plain.update(batches)
    assert not torch.allclose(plain.classifier[1].weight.grad, algorithm.classifier[1].weight.grad)


@pytest.mark.algorithm("mldg")
def test_mldg_leaves_buffers_as_domainbed_clone_does_and_supports_meta_test_split():
    algorithm = make(MLDG, MLDGHParams, bn=True)
    buffers = {k: v.clone() for k, v in algorithm.named_buffers()}
    algorithm.update(make_batches())
    for k, v in algorithm.named_buffers():
        assert torch.equal(v, buffers[k]), k  # the clone's BN statistics are discarded
    split = make(MLDG, MLDGHParams, n_meta_test=1)
    assert len(split.pairs(make_batches())) == DOMAINS - 1
    assert len(make(MLDG, MLDGHParams).pairs(make_batches())) == DOMAINS
    assert math.isfinite(split.update(make_batches())["loss"])
