"""The contract every registered algorithm meets, checked for each name in `ALGORITHMS.names()`.

A tiny setup runs each algorithm: small_cnn at width 0.25 (or the algorithm's own small
backbone when it declares a `BackboneNeed`), 16-px random images, 4 images per domain and 3
training domains, default hparams. For every algorithm:

- `update` returns a dict of real numbers with a finite "loss", for 3 consecutive steps;
- every trainable parameter (`requires_grad=True`) has a non-zero gradient after the updates
  or has changed, except those the algorithm declares untouched (see below);
- a backbone layer's auxiliary loss (`dgbench.backbones.auxiliary`, e.g. GMoE's load balancing)
  reaches the parameters: the algorithm adds it to the loss it differentiates;
- `predict` in eval mode returns finite (B, num_classes) logits, is deterministic and leaves the
  state_dict as it was (evaluation between checkpoints must not perturb training);
- `optimizers()` is non-empty and optimizes only the algorithm's own parameters, each one fused
  (`dgbench.algorithms.base.FUSED`: one kernel for all parameters);
- a checkpoint (`dgbench.checkpoint.save_checkpoint` / `load_checkpoint`: state_dict, the
  `optimizers()` states and the RNGs) restored into a freshly built instance continues
  bit-identically: same metrics, same state_dict, same optimizer states.

Hook for intentionally untouched parameters: an algorithm class may set

    frozen_parameter_names: tuple[str, ...] = ("featurizer.model.stem.*",)

`fnmatch` patterns over `named_parameters()` names of trainable parameters that `update` leaves
alone on purpose (a class attribute, or a property when it depends on the config). Parameters
with `requires_grad=False` need no declaration. A pattern that matches no parameter fails the
test, so the declaration cannot go stale.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from numbers import Real
from typing import Any

import pytest
import torch
from torch import Tensor

from dgbench.algorithms.base import Algorithm
from dgbench.backbones import Featurizer, build_backbone
from dgbench.backbones.auxiliary import AuxiliaryLayer
from dgbench.checkpoint import load_checkpoint, save_checkpoint
from dgbench.components import load_components
from dgbench.registry import ALGORITHMS

load_components()
NAMES = ALGORITHMS.names()

NUM_CLASSES, NUM_DOMAINS, BATCH, RESOLUTION, STEPS = 6, 3, 4, 16, 3
BACKBONE = {"arch": "small_cnn", "width": 0.25}


def backbone_for(name: str) -> Featurizer:
    need = ALGORITHMS.get(name).obj.backbone_need
    return build_backbone(need.small if need is not None else BACKBONE)


def build(name: str, seed: int = 0, backbone: Featurizer | None = None) -> Algorithm:
    torch.manual_seed(seed)
    entry = ALGORITHMS.get(name)
    has_name = "name" in {f.name for f in dataclasses.fields(entry.config)}
    cfg = entry.config(name=name) if has_name else entry.config()
    algorithm = entry.obj(backbone or backbone_for(name), NUM_CLASSES, NUM_DOMAINS, cfg)
    algorithm.train()
    return algorithm


class AuxiliaryProbe(AuxiliaryLayer):
    """Passes images through unchanged; its only loss is an auxiliary one, 10·(w − 1)²."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.record(10 * (self.w - 1) ** 2 if self.training else None, {"w": self.w})
        return x


def make_steps(steps: int, seed: int = 0) -> list[list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (
                torch.randn(BATCH, 3, RESOLUTION, RESOLUTION, generator=g),
                torch.randint(0, NUM_CLASSES, (BATCH,), generator=g),
            )
            for _ in range(NUM_DOMAINS)
        ]
        for _ in range(steps)
    ]


def check_metrics(metrics: Any) -> dict[str, float]:
    assert isinstance(metrics, dict) and "loss" in metrics, metrics
    for key, value in metrics.items():
        assert isinstance(key, str), key
        if isinstance(value, Tensor):  # a device scalar the trainer reads at checkpoints: no graph kept
            assert value.ndim == 0 and value.is_floating_point() and not value.requires_grad, (key, value)
        else:
            assert isinstance(value, Real) and not isinstance(value, bool), (key, value)
    assert math.isfinite(metrics["loss"]), metrics
    return {k: float(v) for k, v in metrics.items()}


def snapshot(algorithm: Algorithm) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in algorithm.state_dict().items()}


def assert_same_tree(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested state (tensors bit-identical, everything else ==)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", NAMES)
def test_updates_are_finite_and_train_every_parameter(name):
    algorithm = build(name)
    before = {n: p.detach().clone() for n, p in algorithm.named_parameters()}
    for batches in make_steps(STEPS):
        check_metrics(algorithm.update(batches))

    patterns = tuple(getattr(algorithm, "frozen_parameter_names", ()))
    trainable = [n for n, p in algorithm.named_parameters() if p.requires_grad]
    for pattern in patterns:
        assert any(fnmatch.fnmatchcase(n, pattern) for n in trainable), f"stale pattern {pattern!r}"
    untouched = []
    for n, p in algorithm.named_parameters():
        if not p.requires_grad or any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            continue
        has_grad = p.grad is not None and bool(p.grad.detach().abs().sum() > 0)
        if not has_grad and torch.equal(p.detach(), before[n]):
            untouched.append(n)
    assert not untouched, f"{name}: trainable parameters neither changed nor got a gradient: {untouched}"


@pytest.mark.parametrize("name", NAMES)
def test_updates_add_the_backbones_auxiliary_loss(name):
    """The probe's parameter influences nothing but its auxiliary loss: it only gets a gradient
    (or moves) if the algorithm adds `auxiliary_loss` to what it differentiates."""
    backbone = backbone_for(name)
    backbone.probe = AuxiliaryProbe()
    backbone.register_forward_pre_hook(lambda module, args: (module.probe(args[0]),))
    algorithm = build(name, backbone=backbone)
    for batches in make_steps(STEPS):
        algorithm.update(batches)
    w = backbone.probe.w
    moved = (w.grad is not None and float(w.grad) != 0.0) or float(w.detach()) != 0.0
    assert moved, f"{name}: the backbone's auxiliary loss never reached its parameter"


@pytest.mark.parametrize("name", NAMES)
def test_predict_is_pure_and_shaped(name):
    algorithm = build(name)
    algorithm.update(make_steps(1)[0])
    algorithm.eval()
    x = torch.randn(5, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(7))
    state = snapshot(algorithm)
    with torch.no_grad():
        logits = algorithm.predict(x)
        again = algorithm.predict(x)
    assert logits.shape == (5, NUM_CLASSES) and torch.isfinite(logits).all()
    assert torch.equal(logits, again)
    assert_same_tree(snapshot(algorithm), state, f"{name}.state_dict after predict")


@pytest.mark.parametrize("name", NAMES)
def test_optimizers_step_every_parameter_in_one_fused_kernel(name):
    """torch's default Adam loops over the parameters in Python on CPU; `FUSED` steps 2.4-9x faster."""
    optimizers = build(name).optimizers()
    unfused = [key for key, opt in optimizers.items() if not all(g["fused"] for g in opt.param_groups)]
    assert not unfused, f"{name}: optimizers {unfused} are not fused; pass **FUSED (dgbench.algorithms.base)"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_laid_out_as_their_parameters_under_channels_last(name):
    """The fused Adam kernels on CUDA refuse a gradient whose strides differ from its parameter's
    (found on an H100: AND-mask's averaged gradients were contiguous for channels_last conv
    weights). The CPU kernels accept it, so the layout itself is checked here."""
    algorithm = build(name).to(memory_format=torch.channels_last)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in make_steps(1)[0]]
    algorithm.update(batches)
    with_grad = [(n, p) for n, p in algorithm.named_parameters() if p.grad is not None]
    trains_a_conv = any(p.ndim == 4 and p.requires_grad for p in algorithm.parameters())
    assert with_grad and (not trains_a_conv or any(p.ndim == 4 for _, p in with_grad)), "nothing checked"
    wrong = [n for n, p in with_grad if p.grad.stride() != p.stride()]
    assert not wrong, f"{name}: gradients laid out unlike their parameters: {wrong}"


@pytest.mark.parametrize("name", NAMES)
def test_buffers_read_on_the_host_stay_on_the_cpu(name, host_reads):
    """A step counter that decides a host-side branch (DANN's alternation, a penalty's warm-up,
    a learning-rate step) is a host buffer: it survives `.to()` on the CPU, in the state_dict
    under its name, so reading it never makes the host wait for the GPU."""
    algorithm = build(name)
    steps = make_steps(2)
    algorithm.update(steps[0])
    buffers = {b.data_ptr(): n for n, b in algorithm.named_buffers() if b.numel()}
    with host_reads() as reads:
        algorithm.update(steps[1])
    read = {buffers.get(args[0].data_ptr()) for op, args in reads.reads if op == "aten::_local_scalar_dense"}
    not_host = sorted(read - {None} - set(algorithm.host_buffers))
    assert not not_host, f"{name}: host reads of device buffers {not_host}: add them to host_buffers"
    state = {k: v.clone() for k, v in algorithm.state_dict().items()}
    moved = algorithm.to("meta")  # a device that is not the CPU, as CUDA would be
    for buffer in algorithm.host_buffers:
        kept = dict(moved.named_buffers())[buffer]
        assert kept.device.type == "cpu" and torch.equal(kept, state[buffer]), buffer
    assert all(p.device.type == "meta" for p in moved.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_continues_identically(name, tmp_path):
    steps = make_steps(STEPS)
    original = build(name)
    optimizers = original.optimizers()
    assert optimizers, f"{name}: optimizers() is empty, so no optimizer state would be checkpointed"
    own = {id(p) for p in original.parameters()}
    for key, optimizer in optimizers.items():
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in own]
        assert not foreign, f"{name}: optimizer {key!r} holds {len(foreign)} tensors outside parameters()"

    check_metrics(original.update(steps[0]))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, original, step=0)
    expected = [check_metrics(original.update(batches)) for batches in steps[1:]]

    resumed = build(name, seed=1)  # different initial weights and RNG state: all must come from the file
    assert load_checkpoint(path, resumed, torch.device("cpu")) == 0
    resumed.train()
    got = [check_metrics(resumed.update(batches)) for batches in steps[1:]]

    assert got == expected
    assert_same_tree(snapshot(resumed), snapshot(original), f"{name}.state_dict")
    assert_same_tree(resumed.optimizer_state(), original.optimizer_state(), f"{name}.optimizer_state")
