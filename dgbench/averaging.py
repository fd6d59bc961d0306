"""Weight averaging during training: SWAD, and moving averages (EMA, SMA), for any algorithm.

Each averaged model is evaluated like the trained one and recorded as a series of its own,
`<algorithm> + swad|ema|sma` (in `averaged.jsonl`, see `dgbench.records`), so tables show it as a
row beside the plain algorithm. Averages cover the algorithm's whole floating-point state
(featurizer, head and any buffers); integer buffers (BatchNorm's batch counters, step counters)
take the latest value.

SWAD: Cha, Chun, Lee, Cho, Park, Lee, Park, "SWAD: Domain Generalization by Seeking Flat Minima",
NeurIPS 2021, arXiv:2102.08604; reference: khanrc/swad `domainbed/swad.py` class `LossValley`,
`domainbed/lib/swa_utils.py`, `train_algorithm` in `domainbed/trainer.py` (commit 252190e).
Dense averaging: every training iterate in the window [t_s, t_e] counts once. The window is chosen
from the training-domain validation loss L_k of the live model at each evaluation k (the
`val_loss` metric), evaluations cutting training into segments:

1. Start: the first k whose loss is the minimum of L_k .. L_{k+n_converge-1} (the loss has stopped
   falling); threshold = (1 + tolerance_ratio) · mean(L_k .. L_{k+n_converge-1}). As in the
   reference, the window reaches back from k over the contiguous run of earlier segments whose
   loss is under the threshold, at most n_tolerance − n_converge of them.
2. Each later segment j joins while min(L_j .. L_{j+n_tolerance-1}) ≤ threshold (the look-ahead
   truncated at the end of training); the first j where it fails ends the window (the "dead
   valley"). A run that never converges is averaged over its last segment, as the reference does.
3. BatchNorm statistics of the averaged model are recomputed on `bn_steps` (500) training batches
   when BatchNorm trains (the reference skips this with frozen BatchNorm, as here).

Deviations from the reference code, all in which iterates are averaged, not in the rule:
- the reference averages segment means with equal weight; here every iterate has equal weight
  (the paper's θ = mean of θ_t over the window), which differs only for the shorter first and last
  segments;
- the reference's look-back skips the earliest segment of the under-threshold run and adds the
  converging segment twice when its queue is full (artifacts of its queue indexing): here each
  segment of the run counts once;
- training continues after a dead valley (the reference stops): the plain series of a SWAD run is
  then the same as without SWAD, and only what is averaged stops.

SMA: the uniform average of every iterate from step `sma_start` on (Arpit et al., "Ensemble of
Averages", NeurIPS 2022, arXiv:2110.10832; ERM++, Teterwak et al., arXiv:2304.01973). EMA: the
exponential moving average θ̄ ← d·θ̄ + (1 − d)·θ. Both are evaluated at every checkpoint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

SWAD_BN_STEPS = 500  # training batches for the BatchNorm statistics of the averaged model (reference)


class WeightAverage:
    """Running average of a module's floating-point state.

    Uniform (`decay=None`): each `add` has a weight (a count of iterates) and the result is the
    weighted mean, so merging segment means weighted by their lengths gives the mean of all
    iterates. Exponential (`decay=d`): θ̄ ← d·θ̄ + (1 − d)·θ, the first state copied.
    """

    def __init__(self, decay: float | None = None) -> None:
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"an EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.count = 0
        self.tensors: dict[str, Tensor] = {}

    @torch.no_grad()
    def add(self, state: Mapping[str, Tensor], weight: int = 1) -> None:
        """Fold `state` (a state_dict, or another average's tensors with `weight` = its count) in."""
        if not self.tensors:
            self.tensors = {k: v.detach().clone() for k, v in state.items()}
            self.count = weight
            return
        floats = [k for k, v in self.tensors.items() if v.is_floating_point()]
        share = (1.0 - self.decay) if self.decay is not None else weight / (self.count + weight)
        torch._foreach_lerp_([self.tensors[k] for k in floats], [state[k].detach() for k in floats], share)
        for key, value in self.tensors.items():
            if not value.is_floating_point():
                value.copy_(state[key])
        self.count += weight

    def merge(self, other: WeightAverage) -> None:
        if other.count:
            self.add(other.tensors, other.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "tensors": self.tensors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.tensors = dict(state["tensors"])


@dataclass
class Segment:
    """The iterates between two evaluations: their mean, and the live model's loss at the end."""

    average: WeightAverage
    loss: float
    start_step: int
    end_step: int

    def state_dict(self) -> dict[str, Any]:
        return {
            "average": self.average.state_dict(),
            "loss": self.loss,
            "steps": [self.start_step, self.end_step],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Segment:
        average = WeightAverage()
        average.load_state_dict(state["average"])
        start, end = state["steps"]
        return cls(average, float(state["loss"]), int(start), int(end))


class LossValley:
    """SWAD's window rule over segments, applied online; see the module docstring.

    At most `n_tolerance` segment means are held at a time (the reference's queue), plus the
    running window average.
    """

    def __init__(self, n_converge: int = 3, n_tolerance: int = 6, tolerance_ratio: float = 0.3) -> None:
        if not 1 <= n_converge <= n_tolerance:
            raise ValueError(f"SWAD needs 1 <= n_converge <= n_tolerance, got {n_converge} and {n_tolerance}")
        self.n_converge = n_converge
        self.n_tolerance = n_tolerance
        self.tolerance_ratio = tolerance_ratio
        self.pending: deque[Segment] = deque()  # segments not yet decided on
        self.window = WeightAverage()
        self.threshold: float | None = None  # set when the loss converges
        self.dead = False
        self.start_step: int | None = None
        self.end_step: int | None = None

    @property
    def converged(self) -> bool:
        return self.threshold is not None

    def add(self, segment: Segment) -> None:
        if self.dead:
            return
        self.pending.append(segment)
        if not self.converged:
            self._detect_convergence()
        else:
            while len(self.pending) >= self.n_tolerance:  # the front has its full look-ahead
                if not self._extend():
                    return

    def finish(self) -> WeightAverage:
        """The window's average once training ended (the last segment if the loss never converged)."""
        if not self.converged:
            if not self.pending:
                raise ValueError("SWAD has no segment to average: no evaluation happened")
            last = self.pending[-1]
            self.start_step, self.end_step = last.start_step, last.end_step
            return last.average
        while self.pending and not self.dead:
            self._extend()
        return self.window

    def _detect_convergence(self) -> None:
        while len(self.pending) > self.n_tolerance:  # older ones are out of the look-back's reach
            self.pending.popleft()
        if len(self.pending) < self.n_converge:
            return
        recent = list(self.pending)[-self.n_converge :]
        losses = [s.loss for s in recent]
        if losses.index(min(losses)) != 0:  # the oldest must be the (first) minimum, as np.argmin
            return
        self.threshold = sum(losses) / len(losses) * (1.0 + self.tolerance_ratio)
        before = list(self.pending)[: -self.n_converge]
        start = len(before)
        while start > 0 and before[start - 1].loss <= self.threshold:
            start -= 1
        for segment in before[start:]:
            self._join(segment)
        self.pending = deque(recent)
        self.pending.popleft()
        self._join(recent[0])

    def _extend(self) -> bool:
        """Decide on the front segment: join the window, or close it (dead valley)."""
        ahead = list(self.pending)[: self.n_tolerance]
        assert self.threshold is not None
        if min(s.loss for s in ahead) > self.threshold:
            self.dead = True
            self.pending.clear()
            return False
        self._join(self.pending.popleft())
        return True

    def _join(self, segment: Segment) -> None:
        self.window.merge(segment.average)
        if self.start_step is None:
            self.start_step = segment.start_step
        self.end_step = segment.end_step

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [s.state_dict() for s in self.pending],
            "window": self.window.state_dict(),
            "threshold": self.threshold,
            "dead": self.dead,
            "steps": [self.start_step, self.end_step],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = deque(Segment.from_state(s) for s in state["pending"])
        self.window.load_state_dict(state["window"])
        self.threshold = state["threshold"]
        self.dead = bool(state["dead"])
        self.start_step, self.end_step = state["steps"]


class Averaging:
    """The averaged models of one run (`trainer.swad`, `trainer.ema`, `trainer.sma_start`).

    The trainer calls `after_step` after every update and `after_evaluation` after every
    evaluation; `at_checkpoints` are evaluated at each checkpoint, `at_end` once after training.
    """

    def __init__(
        self,
        algorithm: str,
        swad: LossValley | None = None,
        ema: float | None = None,
        sma_start: int | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.valley = swad
        self.segment = WeightAverage()
        self.segment_start = 0
        self.moving: dict[str, tuple[WeightAverage, int]] = {}
        if ema is not None:
            self.moving["ema"] = (WeightAverage(decay=ema), 0)
        if sma_start is not None:
            self.moving["sma"] = (WeightAverage(), sma_start)

    @property
    def active(self) -> bool:
        return self.valley is not None or bool(self.moving)

    def label(self, kind: str) -> str:
        return f"{self.algorithm} + {kind}"

    def after_step(self, module: nn.Module, step: int) -> None:
        if not self.active:
            return
        state = module.state_dict()
        if self.valley is not None and not self.valley.dead:
            if not self.segment.count:
                self.segment_start = step
            self.segment.add(state)
        for average, start in self.moving.values():
            if step >= start:
                average.add(state)

    def after_evaluation(self, step: int, val_loss: float) -> None:
        if self.valley is None or self.valley.dead or not self.segment.count:
            return
        self.valley.add(Segment(self.segment, val_loss, self.segment_start, step))
        self.segment = WeightAverage()

    def at_checkpoints(self) -> dict[str, WeightAverage]:
        """The moving averages that have started: evaluated with every checkpoint."""
        return {self.label(k): avg for k, (avg, _) in self.moving.items() if avg.count}

    def at_end(self) -> dict[str, WeightAverage]:
        """SWAD's window average, once training ended."""
        return {self.label("swad"): self.valley.finish()} if self.valley is not None else {}

    def swad_window(self) -> dict[str, int | None]:
        assert self.valley is not None
        return {"swad_start_step": self.valley.start_step, "swad_end_step": self.valley.end_step}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: avg.state_dict() for k, (avg, _) in self.moving.items()}
        if self.valley is not None:
            state["swad"] = self.valley.state_dict()
            state["segment"] = {"average": self.segment.state_dict(), "start": self.segment_start}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for kind, (average, _) in self.moving.items():
            average.load_state_dict(state[kind])
        if self.valley is not None:
            self.valley.load_state_dict(state["swad"])
            self.segment.load_state_dict(state["segment"]["average"])
            self.segment_start = int(state["segment"]["start"])


@contextmanager
def swapped_in(module: nn.Module, average: WeightAverage) -> Iterator[None]:
    """Run with `module` holding the averaged state, then restore its own (for evaluation)."""
    own = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict(average.tensors)
    try:
        yield
    finally:
        module.load_state_dict(own)


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, batches: Iterator[Tensor], steps: int = SWAD_BN_STEPS) -> int:
    """Reset the running statistics of the BatchNorm layers that train mode updates and re-estimate
    them as a plain (cumulative) average over `steps` batches passed through `module.predict`.

    Layers a frozen-BatchNorm policy keeps in eval mode are left alone (their statistics never
    changed in training). Returns the number of layers re-estimated.
    """
    was_training = module.training
    module.train()
    layers = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    momenta = {}
    for layer in layers:
        layer.reset_running_stats()
        momenta[layer] = layer.momentum
        layer.momentum = None  # cumulative average over the batches
    try:
        if layers:
            for _ in range(steps):
                module.predict(next(batches))  # type: ignore[operator]
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        module.train(was_training)
    return len(layers)
