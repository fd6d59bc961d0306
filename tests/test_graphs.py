"""A training step captured as a CUDA graph (dgbench.graphs): same trajectory as the eager steps,
its capture's warm-up steps leave no trace, and what cannot be captured is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dgbench.algorithms.erm import ERM, ERMHParams
from dgbench.backbones import Featurizer
from dgbench.errors import DGBenchError
from dgbench.graphs import GraphedStep, saved_state
from dgbench.registry import ALGORITHMS

IN, HIDDEN, CLASSES, DOMAINS = 5, 4, 3, 3
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def make_erm(device: str = "cpu") -> ERM:
    torch.manual_seed(0)
    cfg = ERMHParams(lr=1e-2)
    return ERM(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, cfg).to(device).train()


def batches(seed: int, device: str = "cpu") -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(4, IN, generator=g).to(device) + d,
            torch.randint(0, CLASSES, (4,), generator=g).to(device),
        )
        for d in range(DOMAINS)
    ]


def state(algorithm: ERM) -> list[Tensor]:
    """Every parameter and buffer, and every tensor of the optimizer's state."""
    optimizer = [v for s in algorithm.optimizer.state.values() for v in s.values()]
    return [t.detach().clone() for t in [*algorithm.state_dict().values(), *optimizer]]


def test_steps_taken_inside_saved_state_leave_a_fresh_run_as_it_was():
    """The capture's warm-up steps, undone: the next step is the run's first, bit for bit."""
    warmed, fresh = make_erm(), make_erm()
    with saved_state(warmed):
        for seed in range(3):
            warmed.update(batches(seed))
    assert warmed.update(batches(7))["loss"] == fresh.update(batches(7))["loss"]
    for a, b in zip(state(warmed), state(fresh), strict=True):
        assert torch.equal(a, b)


def test_saved_state_puts_a_resumed_optimizer_back():
    algorithm = make_erm()
    for seed in range(2):
        algorithm.update(batches(seed))
    before = state(algorithm)
    with saved_state(algorithm):
        for seed in range(3):
            algorithm.update(batches(10 + seed))
        assert not any(torch.equal(a, b) for a, b in zip(before, state(algorithm), strict=True))
    for a, b in zip(before, state(algorithm), strict=True):
        assert torch.equal(a, b)


def test_an_algorithm_that_does_not_declare_its_step_capturable_is_refused():
    entry = ALGORITHMS.get("mixup")
    algorithm = entry.obj(Featurizer(nn.Linear(IN, HIDDEN), HIDDEN), CLASSES, DOMAINS, entry.config())
    with pytest.raises(DGBenchError, match=r"Mixup .*graph_safe.*trainer.cuda_graph=false"):
        GraphedStep(algorithm, batches(0), None)


def test_an_optimizer_whose_fresh_state_is_not_zeros_is_refused():
    algorithm = make_erm()
    algorithm.optimizer = torch.optim.SGD(algorithm.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(DGBenchError, match=r"ERM.optimizer is SGD.*Adam or AdamW"):
        GraphedStep(algorithm, batches(0), None)


def test_a_step_that_cannot_be_captured_is_named_with_the_switch(monkeypatch):
    def unavailable():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", unavailable)
    with pytest.raises(DGBenchError, match=r"capturing ERM's .* set trainer.cuda_graph=false.*not permitted"):
        GraphedStep(make_erm(), batches(0), None)


@needs_cuda
def test_a_replayed_step_follows_the_eager_trajectory():
    """Four steps on four different batches: the same losses and weights as eager steps (fp32)."""
    eager, graphed_erm = make_erm("cuda"), make_erm("cuda")
    step = GraphedStep(graphed_erm, batches(0, "cuda"), None)
    for seed in range(4):
        expected = eager.update(batches(seed, "cuda"))["loss"]
        assert step(batches(seed, "cuda"))["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    for a, b in zip(eager.parameters(), graphed_erm.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert eager.optimizer.state_dict()["state"].keys() == graphed_erm.optimizer.state_dict()["state"].keys()


@needs_cuda
def test_a_replayed_step_refuses_a_batch_of_another_shape():
    step = GraphedStep(make_erm("cuda"), batches(0, "cuda"), None)
    other = [(x[:2], y[:2]) for x, y in batches(1, "cuda")]
    with pytest.raises(DGBenchError, match=r"captured \(4, 5\), got \(2, 5\)"):
        step(other)


def test_only_declared_algorithms_are_captured():
    """graph_safe is opt-in: ERM and what inherits its step (SD) declare it; nothing else does yet."""
    declared = {name for name in ALGORITHMS.names() if ALGORITHMS.get(name).obj.graph_safe}
    assert declared == {"erm", "sd"}
