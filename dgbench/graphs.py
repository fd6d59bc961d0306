"""A training step replayed as one CUDA graph: the host launches one graph, not hundreds of kernels.

An eager step costs the host a few microseconds per kernel it launches (dispatch, autograd
bookkeeping, the Python around it). When the GPU runs those kernels faster than the host can
queue them, the GPU waits; a captured graph is launched with one call and runs the same kernels.

What the step must be to be captured (an algorithm says so with `Algorithm.graph_safe`): fixed
shapes, no host reads of device values, no host-side state that changes from step to step (a
counter that picks a branch, a learning-rate schedule), and Adam-like optimizers, whose fresh
state is zeros. Capturing runs the step a few times first, on a side stream (it allocates the
optimizer state and lets cudnn autotune), so the model's and optimizers' state is saved before and
put back after: the first replay is the run's next step, as it would have been in eager mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from dgbench.algorithms.base import Algorithm, DomainBatch, Metrics
from dgbench.errors import DGBenchError

WARMUP_STEPS = 3  # PyTorch's advice before a capture: a few eager runs on a side stream
ZERO_INITIALISED = (torch.optim.Adam, torch.optim.AdamW)  # a fresh state of these is all zeros


class GraphedStep:
    """`algorithm.update` captured once on `batches`' shapes; each call copies the new batches into
    the captured inputs and replays it.

    The metrics it returns are the graph's outputs: the next call overwrites them (the trainer's
    `StepMeter` copies each step's).
    """

    def __init__(
        self, algorithm: Algorithm, batches: Sequence[DomainBatch], dtype: torch.dtype | None
    ) -> None:
        if not algorithm.graph_safe:
            raise DGBenchError(
                f"{type(algorithm).__name__} does not declare its update capturable as a CUDA graph "
                f"(Algorithm.graph_safe); set trainer.cuda_graph=false"
            )
        for name, optimizer in algorithm.optimizers().items():
            if not isinstance(optimizer, ZERO_INITIALISED):
                raise DGBenchError(
                    f"{type(algorithm).__name__}.{name} is {type(optimizer).__name__}; a captured step "
                    f"needs Adam or AdamW (their fresh state is zeros); set trainer.cuda_graph=false"
                )
        self.algorithm = algorithm
        self.inputs = [(x.clone(), y.clone()) for x, y in batches]
        try:
            self.graph = torch.cuda.CUDAGraph()
            self.outputs = self._capture(dtype)
        except RuntimeError as error:
            raise DGBenchError(
                f"capturing {type(algorithm).__name__}'s training step as a CUDA graph failed: its update "
                f"or its backbone does what a graph cannot hold (a host read of a device value, a shape "
                f"that changes); set trainer.cuda_graph=false. The error: {error}"
            ) from error

    def __call__(self, batches: Sequence[DomainBatch]) -> Metrics:
        for (x_in, y_in), (x, y) in zip(self.inputs, batches, strict=True):
            if x.shape != x_in.shape or y.shape != y_in.shape:
                raise DGBenchError(
                    f"a captured training step needs the same batch shapes every step: captured "
                    f"{tuple(x_in.shape)}, got {tuple(x.shape)}; set trainer.cuda_graph=false"
                )
            x_in.copy_(x, non_blocking=True)
            y_in.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.outputs

    def _capture(self, dtype: torch.dtype | None) -> Metrics:
        # autocast's cache of cast weights must be off: a cached cast would outlive the capture
        autocast = torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else nullcontext()
        with saved_state(self.algorithm), capturable(self.algorithm):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    with autocast:
                        self.algorithm.update(self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph), autocast:
                outputs = self.algorithm.update(self.inputs)
        return outputs


@contextmanager
def saved_state(algorithm: Algorithm) -> Iterator[None]:
    """Put the algorithm's tensors and its optimizers' state back as they were on entry, in place
    (a captured graph holds their addresses). A parameter with no optimizer state on entry gets
    zeros: Adam's fresh state, which its first step would have made."""
    tensors = [(t, t.clone()) for t in algorithm.state_dict().values()]
    optimizer_state = [
        (optimizer, {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()})
        for optimizer in algorithm.optimizers().values()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, saved in tensors:
                tensor.copy_(saved)
            for optimizer, before in optimizer_state:
                for param, state in optimizer.state.items():
                    for key, value in state.items():
                        if not isinstance(value, Tensor):
                            continue
                        if param in before:
                            value.copy_(before[param][key])
                        else:
                            value.zero_()


@contextmanager
def capturable(algorithm: Algorithm) -> Iterator[None]:
    """Optimizers flagged `capturable` while a graph is captured (torch refuses to capture a step
    otherwise); fused Adam runs the same kernel either way, and the flag is put back after."""
    groups = [g for o in algorithm.optimizers().values() for g in o.param_groups]
    flags = [g.get("capturable", False) for g in groups]
    for group in groups:
        group["capturable"] = True
    try:
        yield
    finally:
        for group, flag in zip(groups, flags, strict=True):
            group["capturable"] = flag
