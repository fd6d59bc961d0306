"""The training metrics of the steps since the last checkpoint, read back once per checkpoint.

`Algorithm.update` may return its metrics as device scalars (`loss.detach()`) rather than floats:
a float costs a device sync every step (see `dgbench.devices`). The meter keeps what each step
returned and turns it into floats in one transfer when the trainer writes a record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

from dgbench.algorithms.base import Metrics


class StepMeter:
    """Per-step metrics since the last `clear()`, with the step each came from."""

    def __init__(self) -> None:
        self._steps: list[int] = []
        self._metrics: list[dict[str, float | Tensor]] = []

    def add(self, step: int, metrics: Metrics) -> None:
        """Keep one step's metrics as they are now.

        Tensors are detached (a kept loss must not keep its graph alive) and copied: a metric may
        be a view of state the next steps change in place (a buffer, a parameter), and it is read
        only at the checkpoint. The copy is queued on the device like any op, so it costs no sync.
        """
        self._steps.append(step)
        self._metrics.append(
            {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        )

    def __len__(self) -> int:
        return len(self._steps)

    def read(self) -> dict[int, dict[str, float]]:
        """Every kept step's metrics as floats, by step (one device sync for all of them)."""
        tensors = [v for metrics in self._metrics for v in metrics.values() if isinstance(v, Tensor)]
        floats = iter(_to_floats(tensors))
        return {
            step: {key: next(floats) if isinstance(v, Tensor) else float(v) for key, v in metrics.items()}
            for step, metrics in zip(self._steps, self._metrics, strict=True)
        }

    def clear(self) -> None:
        self._steps.clear()
        self._metrics.clear()


def mean_metrics(values: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each metric's mean over the steps that reported it."""
    values = list(values)
    keys = dict.fromkeys(key for metrics in values for key in metrics)
    return {key: float(np.mean([m[key] for m in values if key in m])) for key in keys}


def _to_floats(tensors: list[Tensor]) -> list[float]:
    if not tensors:
        return []
    device = tensors[0].device
    return torch.stack([t.double().reshape(()).to(device) for t in tensors]).tolist()
