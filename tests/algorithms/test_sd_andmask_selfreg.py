"""SD, AND-mask and SelfReg (dgbench.algorithms.sd / andmask / selfreg) against hand computations.

Tiny CPU models: a linear featurizer and the linear head, on random data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dgbench.algorithms.andmask import ANDMask, ANDMaskHParams, and_mask, masked_mean_gradient
from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.algorithms.sd import SD, SDHParams, sd_penalty
from dgbench.algorithms.selfreg import (
    SelfReg,
    SelfRegHParams,
    class_interval_ends,
    selfreg_regulariser,
    within_class_permutations,
)
from dgbench.backbones import Featurizer
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, LR = 5, 4, 3, 3, 1e-2


def make(cls, cfg_cls, seed: int = 0, **hparams):
    torch.manual_seed(seed)
    algorithm = cls(
        Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, cfg_cls(**{"lr": LR, **hparams})
    )
    algorithm.train()
    return algorithm


def make_batches(sizes=(6, 6, 6), seed: int = 1) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def params_of(algorithm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in algorithm.named_parameters()}


def test_registered():
    for name in ("sd", "andmask", "selfreg"):
        assert name in ALGORITHMS.names()


# --- SD -----------------------------------------------------------------------------------------


@pytest.mark.algorithm("sd")
def test_sd_with_zero_weight_is_an_erm_step():
    sd, erm = make(SD, SDHParams, sd_reg=0.0), make(ERM, ERMHParams)
    erm.load_state_dict(sd.state_dict())
    batches = make_batches()
    sd.update(batches)
    erm.update(batches)
    for name, value in params_of(erm).items():
        torch.testing.assert_close(params_of(sd)[name], value, rtol=0, atol=1e-7)


@pytest.mark.algorithm("sd")
def test_sd_penalty_and_metrics_follow_the_formula():
    sd = make(SD, SDHParams, sd_reg=0.5)
    batches = make_batches()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    with torch.no_grad():
        logits = sd.predict(x)
    expected_penalty = float((logits.numpy().astype(np.float64) ** 2).mean())
    assert float(sd_penalty(logits)) == pytest.approx(expected_penalty, rel=1e-6)
    metrics = sd.update(batches)
    assert metrics["penalty"] == pytest.approx(expected_penalty, rel=1e-6)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)


@pytest.mark.algorithm("sd")
def test_sd_penalty_changes_the_step():
    a, b = make(SD, SDHParams, sd_reg=0.0), make(SD, SDHParams, sd_reg=1.0)
    batches = make_batches()
    a.update(batches)
    b.update(batches)
    assert not torch.equal(a.classifier[1].weight, b.classifier[1].weight)


# --- AND-mask -----------------------------------------------------------------------------------


@pytest.mark.algorithm("andmask")
def test_and_mask_matches_numpy():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(4, 7, 5, generator=g)
    grads[1, 0, 0] = 0.0
    for tau in (0.0, 0.3, 0.5, 0.75, 1.0):
        arr = grads.numpy()
        mask = (np.abs(np.sign(arr).mean(axis=0)) >= tau).astype(np.float32)
        expected = mask * arr.mean(axis=0) / (1e-10 + mask.mean())
        np.testing.assert_array_equal(and_mask(grads, tau).numpy(), mask)
        np.testing.assert_allclose(masked_mean_gradient(grads, tau).numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.algorithm("andmask")
def test_and_mask_tau_one_drops_exactly_the_disagreeing_components():
    grads = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.5, -1.0, 2.0],
            [2.0, -1.0, -3.0, 0.0, -4.0, 1.0],
            [0.5, -3.0, 1.0, 1.0, -2.0, -1.0],
        ]
    )
    expected_mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # signs agree in 0, 1, 4 only
    assert torch.equal(and_mask(grads, 1.0), expected_mask)
    expected = expected_mask * grads.mean(0) / 0.5
    torch.testing.assert_close(masked_mean_gradient(grads, 1.0), expected)


@pytest.mark.algorithm("andmask")
def test_andmask_tau_zero_gives_erm_gradient_on_equal_batches():
    andmask, erm = make(ANDMask, ANDMaskHParams, tau=0.0), make(ERM, ERMHParams)
    erm.load_state_dict(andmask.state_dict())
    batches = make_batches()
    andmask.update(batches)
    erm.update(batches)
    for (name, p), q in zip(andmask.named_parameters(), erm.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.algorithm("andmask")
def test_andmask_writes_the_masked_gradient():
    andmask = make(ANDMask, ANDMaskHParams, tau=1.0)
    batches = make_batches()
    params = list(andmask.parameters())
    per_domain = []
    for x, y in batches:
        loss = F.cross_entropy(andmask.predict(x), y)
        per_domain.append(torch.autograd.grad(loss, params))
    metrics = andmask.update(batches)
    for i, p in enumerate(params):
        stacked = torch.stack([g[i] for g in per_domain])
        torch.testing.assert_close(p.grad, masked_mean_gradient(stacked, 1.0))
    assert math.isfinite(metrics["loss"])


# --- SelfReg ------------------------------------------------------------------------------------


@pytest.mark.algorithm("selfreg")
def test_selfreg_pairs_keep_classes():
    g = torch.Generator().manual_seed(5)
    for labels in ([2, 0, 1, 1, 0, 2, 2, 1], [3, 1, 1, 3, 2], [0, 0, 0]):
        y, _ = torch.sort(torch.tensor(labels), stable=True)
        ends = class_interval_ends(y)
        index2, index3 = within_class_permutations(ends, generator=g)
        for index in (index2, index3):
            assert sorted(index.tolist()) == list(range(len(y)))
            assert torch.equal(y[index], y)


@pytest.mark.algorithm("selfreg")
def test_selfreg_intervals_as_domainbed():
    assert class_interval_ends(torch.tensor([0, 0, 1, 2, 2])) == [2, 3, 5]
    assert class_interval_ends(torch.tensor([1, 1, 3])) == [0, 2, 3]  # DomainBed's empty first run


@pytest.mark.algorithm("selfreg")
def test_selfreg_regulariser_zero_for_identical_pairs_and_matches_formula():
    g = torch.Generator().manual_seed(6)
    logits, feats = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)
    identity = torch.arange(6)
    # λ·a + (1 − λ)·a equals a only up to rounding
    assert float(selfreg_regulariser(logits, feats, feats.clone(), identity, identity, 0.3)) == pytest.approx(
        0, abs=1e-12
    )

    proj = torch.randn(6, 4, generator=g)
    i2, i3 = torch.tensor([1, 0, 2, 4, 5, 3]), torch.tensor([0, 1, 2, 5, 3, 4])
    lam = 0.3
    o3 = lam * logits[i2] + (1 - lam) * logits[i3]
    p3 = lam * proj[i2] + (1 - lam) * proj[i3]
    expected = lam * (((logits - logits[i2]) ** 2).mean() + 0.3 * ((feats - proj[i2]) ** 2).mean()) + (
        1 - lam
    ) * (((logits - o3) ** 2).mean() + 0.3 * ((feats - p3) ** 2).mean())
    torch.testing.assert_close(selfreg_regulariser(logits, feats, proj, i2, i3, lam), expected)


@pytest.mark.algorithm("selfreg")
def test_selfreg_update_metrics_and_projection_head():
    selfreg = make(SelfReg, SelfRegHParams)
    assert selfreg.cdpl[0].out_features == 2 * HIDDEN and selfreg.cdpl[-1].num_features == HIDDEN
    batches = make_batches()
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    with torch.no_grad():
        ce = float(F.cross_entropy(selfreg.predict(x), y))
    metrics = {k: float(v) for k, v in selfreg.update(batches).items()}
    assert metrics["loss"] == pytest.approx(ce, rel=1e-5)  # CE is invariant to the label sort
    assert metrics["reg_weight"] == pytest.approx(min(ce, 1.0), rel=1e-5)
    assert metrics["penalty"] > 0
