"""IRM, VREx, CORAL and MMD (dgbench.algorithms.penalties, penalty_base and the four algorithms)
against closed forms and DomainBed's semantics (facebookresearch/DomainBed `algorithms.py`).

Tiny CPU models: a Linear + ReLU featurizer (no batch-dependent normalisation, so per-domain and
pooled forwards agree) and a linear head, on random data; float64 where a closed form is compared.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.coral import CORAL, CORALHParams
from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.algorithms.irm import IRM, IRMHParams
from dgbench.algorithms.mmd import MMD, MMDHParams
from dgbench.algorithms.penalties import (
    DEFAULT_GAMMAS,
    coral_penalty,
    gaussian_kernel,
    irm_penalty,
    mmd_penalty,
    vrex_penalty,
)
from dgbench.algorithms.vrex import VREx, VRExHParams
from dgbench.backbones import Featurizer
from dgbench.checkpoint import load_checkpoint, save_checkpoint
from dgbench.hparams import IntLogUniform, LogUniform, search_space
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS, BATCH = 5, 7, 3, 3, 6
ALGOS = {"irm": (IRM, IRMHParams), "vrex": (VREx, VRExHParams), "coral": (CORAL, CORALHParams)}
ALGOS["mmd"] = (MMD, MMDHParams)


def make(name: str, seed: int = 0, **hparams):
    cls, config = (ERM, ERMHParams) if name == "erm" else ALGOS[name]
    torch.manual_seed(seed)
    backbone = Featurizer(nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU()), HIDDEN)
    algorithm = cls(backbone, CLASSES, DOMAINS, config(name=name, **{"lr": 1e-2, **hparams}))
    algorithm.train()
    return algorithm


def make_batches(steps: int, seed: int = 1) -> list[list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(BATCH, IN, generator=g) + d, torch.randint(0, CLASSES, (BATCH,), generator=g))
            for d in range(DOMAINS)
        ]
        for _ in range(steps)
    ]


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- CORAL -----------------------------------------------------------------------------------


@pytest.mark.algorithm("coral")
def test_coral_is_zero_for_identical_batches():
    x = randn(9, 4, seed=0)
    assert float(coral_penalty(x, x.clone())) == 0.0


@pytest.mark.algorithm("coral")
def test_coral_matches_numpy_closed_form():
    x, y = randn(6, 3, seed=1), randn(5, 3, seed=2) * 2 + 1
    a, b = x.numpy(), y.numpy()
    mean_term = np.mean((a.mean(0) - b.mean(0)) ** 2)
    cov_term = np.mean((np.cov(a, rowvar=False, ddof=1) - np.cov(b, rowvar=False, ddof=1)) ** 2)
    assert float(coral_penalty(x, y)) == pytest.approx(mean_term + cov_term, rel=1e-12)


# --- MMD -------------------------------------------------------------------------------------


def loop_mmd(x: Tensor, y: Tensor, gamma: float) -> float:
    def k(a: Tensor, b: Tensor) -> float:
        return math.exp(-gamma * sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True)))

    def mean_k(a: Tensor, b: Tensor) -> float:
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


@pytest.mark.algorithm("mmd")
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_mmd_single_gamma_matches_explicit_loops(gamma):
    x, y = randn(5, 3, seed=3), randn(4, 3, seed=4) + 0.5
    assert float(mmd_penalty(x, y, gammas=[gamma])) == pytest.approx(loop_mmd(x, y, gamma), rel=1e-9)


@pytest.mark.algorithm("mmd")
def test_gaussian_kernel_sums_domainbed_bandwidths():
    x, y = randn(3, 2, seed=5), randn(4, 2, seed=6)
    assert DEFAULT_GAMMAS == (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
    d2 = torch.cdist(x, y) ** 2
    expected = sum(torch.exp(-g * d2) for g in DEFAULT_GAMMAS)
    torch.testing.assert_close(gaussian_kernel(x, y), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.algorithm("mmd")
def test_mmd_is_nonnegative_and_zero_for_identical_batches():
    for seed in range(20):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        y = torch.randn(7, 4, generator=torch.Generator().manual_seed(100 + seed)) * 0.3
        assert float(mmd_penalty(x, y)) >= -1e-6
        assert abs(float(mmd_penalty(x, x.clone()))) <= 1e-6
    x = randn(6, 4, seed=7)
    assert float(mmd_penalty(x, x + 1.0)) > 0.1


# --- IRM -------------------------------------------------------------------------------------


def scale_derivative(z: Tensor, y: Tensor) -> Tensor:
    """d/ds CE(s·z, y) at s = 1 in closed form: mean_i (Σ_k softmax(z_i)_k z_ik − z_i,y_i)."""
    return ((z.softmax(-1) * z).sum(-1) - z.gather(1, y[:, None]).squeeze(1)).mean()


def irm_closed_form(z: Tensor, y: Tensor) -> Tensor:
    return scale_derivative(z[0::2], y[0::2]) * scale_derivative(z[1::2], y[1::2])


@pytest.mark.algorithm("irm")
def test_irm_penalty_and_its_gradient_match_the_closed_form():
    z = randn(8, CLASSES, seed=8).requires_grad_()
    y = torch.randint(0, CLASSES, (8,), generator=torch.Generator().manual_seed(9))
    penalty = irm_penalty(z, y)
    expected = irm_closed_form(z, y)
    assert float(penalty.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert abs(float(expected.detach())) > 1e-3  # the example is not trivially zero
    (grad,) = torch.autograd.grad(penalty, z)
    (expected_grad,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def optimal_scale(z: Tensor, y: Tensor) -> float:
    """argmin_s CE(s·z, y) by bisection on the (increasing) derivative."""
    lo, hi = 1e-3, 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if float(scale_derivative(mid * z, y)) > 0:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


@pytest.mark.algorithm("irm")
def test_irm_penalty_is_zero_at_the_optimal_scale_of_each_interleaved_half():
    z = randn(8, CLASSES, seed=10)
    y = z.argmax(1)
    y[[0, 1]] = (y[[0, 1]] + 1) % CLASSES  # one mistake per half, so each optimum is finite
    z[0::2] *= optimal_scale(z[0::2], y[0::2])
    z[1::2] *= optimal_scale(z[1::2], y[1::2])
    assert abs(float(irm_penalty(z, y).detach())) < 1e-12
    assert abs(float(irm_penalty(2 * z, y).detach())) > 1e-4  # away from the optimum it is not zero


# --- VREx ------------------------------------------------------------------------------------


@pytest.mark.algorithm("vrex")
def test_vrex_penalty_is_domainbeds_biased_variance():
    losses = torch.tensor([0.3, 1.1, 0.7, 2.0], dtype=torch.float64)
    assert float(vrex_penalty(losses)) == pytest.approx(float(np.var(losses.numpy())), rel=1e-12)
    assert float(vrex_penalty(losses)) != pytest.approx(float(losses.var(unbiased=True)))
    assert float(vrex_penalty(losses[:1])) == 0.0


@pytest.mark.algorithm("coral", "irm", "mmd", "vrex")
@pytest.mark.parametrize("name", sorted(ALGOS))
def test_penalty_of_a_step_matches_the_per_domain_definition(name):
    algorithm = make(name)
    batches = make_batches(1)[0]
    nll, penalty, _ = (t.detach() if isinstance(t, Tensor) else t for t in algorithm.losses(batches))
    with torch.no_grad():
        logits = [algorithm.predict(x) for x, _ in batches]
        features = [algorithm.featurizer(x) for x, _ in batches]
    risks = torch.stack([F.cross_entropy(z, y) for z, (_, y) in zip(logits, batches, strict=True)])
    pairs = list(itertools.combinations(features, 2))
    expected = {
        "irm": lambda: torch.stack(
            [irm_penalty(z, y) for z, (_, y) in zip(logits, batches, strict=True)]
        ).mean(),
        "vrex": lambda: ((risks - risks.mean()) ** 2).mean(),
        "coral": lambda: sum(coral_penalty(a, b) for a, b in pairs) / len(pairs),
        "mmd": lambda: sum(mmd_penalty(a, b) for a, b in pairs) / len(pairs),
    }[name]()
    assert float(nll) == pytest.approx(float(risks.mean()), rel=1e-6)
    assert float(penalty) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-9)


# --- annealing and the Adam reset ------------------------------------------------------------


@pytest.mark.algorithm("coral", "irm", "mmd", "vrex")
@pytest.mark.parametrize(
    ("name", "hparams", "weights", "reset_at"),
    [
        ("irm", {"irm_lambda": 7.0, "irm_penalty_anneal_iters": 3}, [1.0, 1.0, 1.0, 7.0, 7.0, 7.0], 3),
        ("vrex", {"vrex_lambda": 5.0, "vrex_penalty_anneal_iters": 2}, [1.0, 1.0, 5.0, 5.0, 5.0, 5.0], 2),
        ("irm", {"irm_lambda": 7.0, "irm_penalty_anneal_iters": 0}, [7.0] * 6, 0),
        ("coral", {"mmd_gamma": 0.5}, [0.5] * 6, None),
        ("mmd", {"mmd_gamma": 3.0}, [3.0] * 6, None),
    ],
)
def test_annealing_weights_and_a_single_adam_reset_at_the_switch(name, hparams, weights, reset_at):
    algorithm = make(name, **hparams)
    made = []
    original = algorithm.make_optimizer
    algorithm.make_optimizer = lambda *a, **k: made.append(int(algorithm.update_count)) or original(*a, **k)
    seen_weights = []
    for step, batches in enumerate(make_batches(len(weights))):
        before = algorithm.optimizer
        weight = algorithm.penalty_weight()
        seen_weights.append(weight)
        metrics = algorithm.update(batches)
        assert metrics["objective"] == pytest.approx(
            float(metrics["loss"] + weight * metrics["penalty"]), rel=1e-5
        )
        assert (algorithm.optimizer is not before) == (step == reset_at)
        adam_steps = int(next(iter(algorithm.optimizer.state.values()))["step"])
        assert adam_steps == (step + 1 if reset_at is None or step < reset_at else step - reset_at + 1)
    assert seen_weights == weights
    assert made == ([] if reset_at is None else [reset_at])
    assert int(algorithm.update_count) == len(weights)


@pytest.mark.algorithm("irm", "vrex")
@pytest.mark.parametrize("name", ["irm", "vrex"])
def test_checkpoint_resume_across_the_adam_reset_is_bit_identical(name, tmp_path):
    hparams = {f"{name}_penalty_anneal_iters": 2}
    steps = make_batches(5)
    original = make(name, **hparams)
    original.update(steps[0])
    save_checkpoint(tmp_path / "ckpt.pt", original, step=0)
    expected = [original.update(b) for b in steps[1:]]
    resumed = make(name, seed=3, **hparams)
    load_checkpoint(tmp_path / "ckpt.pt", resumed, torch.device("cpu"))
    resumed.train()
    assert [resumed.update(b) for b in steps[1:]] == expected
    for key, value in original.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# --- weight 0 is ERM -------------------------------------------------------------------------


@pytest.mark.algorithm("coral", "irm", "mmd", "vrex")
@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("irm", {"irm_lambda": 0.0, "irm_penalty_anneal_iters": 0}),
        ("vrex", {"vrex_lambda": 0.0, "vrex_penalty_anneal_iters": 0}),
        ("coral", {"mmd_gamma": 0.0}),
        ("mmd", {"mmd_gamma": 0.0}),
    ],
)
def test_zero_penalty_weight_update_equals_an_erm_update(name, hparams):
    # weight decay makes the Adam step depend on the gradient's scale (sum vs mean of risks)
    algorithm = make(name, weight_decay=0.5, **hparams)
    erm = make("erm", weight_decay=0.5)
    erm.load_state_dict({k: v for k, v in algorithm.state_dict().items() if k != "update_count"})
    for batches in make_batches(2):
        metrics, erm_metrics = algorithm.update(batches), erm.update(batches)
        assert metrics["loss"] == pytest.approx(float(erm_metrics["loss"]), rel=1e-6)
        assert metrics["objective"] == pytest.approx(float(erm_metrics["loss"]), rel=1e-6)
    for (key, p), (erm_key, q) in zip(algorithm.named_parameters(), erm.named_parameters(), strict=True):
        assert key == erm_key
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(algorithm.classifier[1].weight, make(name).classifier[1].weight)


# --- registration and hparams ----------------------------------------------------------------


@pytest.mark.algorithm("coral", "irm", "mmd", "vrex")
def test_registered_with_domainbeds_defaults_and_search_spaces():
    expected = {
        "irm": {
            "irm_lambda": (1e2, LogUniform(-1, 5)),
            "irm_penalty_anneal_iters": (500, IntLogUniform(0, 4, 10)),
        },
        "vrex": {
            "vrex_lambda": (1e1, LogUniform(-1, 5)),
            "vrex_penalty_anneal_iters": (500, IntLogUniform(0, 4, 10)),
        },
        "coral": {"mmd_gamma": (1.0, LogUniform(-1, 1))},
        "mmd": {"mmd_gamma": (1.0, LogUniform(-1, 1))},
    }
    for name, fields in expected.items():
        entry = ALGORITHMS.get(name)
        assert entry.obj is ALGOS[name][0]
        space = search_space(entry.config)
        defaults = {f.name: f.default for f in dataclasses.fields(entry.config)}
        for field, (default, dist) in fields.items():
            assert defaults[field] == default and space[field] == dist, (name, field)
        assert set(space) - set(fields) == {"lr", "weight_decay", "batch_size", "dropout"}
