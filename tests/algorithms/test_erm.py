"""ERM (dgbench.algorithms.erm) against DomainBed's `ERM.update`, written out by hand.

Tiny CPU model (a linear featurizer and the linear head) on random data with domain batches of
unequal size, so the mean over the pooled batch differs from the mean of the per-domain means.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.backbones import Featurizer
from dgbench.hparams import Choice, IntLogUniform, LogUniform, search_space
from dgbench.registry import ALGORITHMS

pytestmark = pytest.mark.algorithm("erm")

IN, HIDDEN, CLASSES, DOMAINS = 5, 4, 3, 3


def make(seed: int = 0, **hparams) -> ERM:
    torch.manual_seed(seed)
    cfg = ERMHParams(**{"lr": 1e-2, **hparams})
    algorithm = ERM(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, cfg)
    algorithm.train()
    return algorithm


def make_batches(seed: int, sizes: tuple[int, ...] = (2, 5, 9)) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, IN, generator=g) + d, torch.randint(0, CLASSES, (n,), generator=g))
        for d, n in enumerate(sizes)
    ]


def test_registered_with_domainbeds_shared_hparams_only():
    entry = ALGORITHMS.get("erm")
    assert entry.obj is ERM and entry.config is ERMHParams
    cfg = ERMHParams()
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.dropout) == (5e-5, 0.0, 32, 0.0)
    assert search_space(ERMHParams) == {
        "lr": LogUniform(-5, -3.5),
        "weight_decay": LogUniform(-6, -2),
        "batch_size": IntLogUniform(3, 5.5),
        "dropout": Choice([0.0, 0.1, 0.5]),
    }
    assert {f.name for f in dataclasses.fields(ERMHParams)} == {
        "name",
        "lr",
        "weight_decay",
        "batch_size",
        "dropout",
    }


def test_steps_are_adam_on_the_mean_cross_entropy_of_the_pooled_batch():
    """Each update: concatenate the domains, mean CE over all examples, one step of one persistent
    Adam(lr, weight_decay) (its state carries over: no re-creation, no schedule)."""
    wd = 1e-2
    algorithm = make(weight_decay=wd)
    reference = make(weight_decay=wd)  # same seed: the same initial weights
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=wd)
    for step in range(3):
        batches = make_batches(step)
        x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        loss = F.cross_entropy(reference.predict(x), y)
        per_domain = torch.stack([F.cross_entropy(reference.predict(xd), yd) for xd, yd in batches]).mean()
        assert not torch.allclose(loss, per_domain)  # the example tells the two means apart
        adam.zero_grad()
        loss.backward()
        adam.step()

        metrics = algorithm.update(batches)
        assert metrics == {"loss": pytest.approx(float(loss.detach()), rel=1e-6)}
        for (name, p), q in zip(algorithm.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
