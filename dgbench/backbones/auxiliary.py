"""Loss terms and metrics that a backbone's layers produce during a training forward.

Some architectures train with a term of their own next to the algorithm's objective: a sparse
mixture-of-experts layer adds a load-balancing loss and reports how it routed. Such a layer
derives from `AuxiliaryLayer` and calls `record` in its forward; the algorithm adds
`auxiliary_loss(network)` to the loss it differentiates, and the trainer logs
`auxiliary_metrics(network)` after each update. Algorithms therefore need no knowledge of the
backbone, and any algorithm combines with any such backbone (GMoE + Fish, GMoE + SAM).

A layer keeps only its latest forward: an algorithm that runs several forwards per step (SAM's
two passes) adds the term of the forward whose loss it differentiates, never a sum of stale ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class AuxiliaryLayer(nn.Module):
    """A layer whose training forward yields a loss term for the algorithm and metrics for the log."""

    def __init__(self) -> None:
        super().__init__()
        self.metric_prefix = type(self).__name__.lower()  # surgery functions set e.g. "moe/block8"
        self._pending_loss: Tensor | None = None
        self._metrics: dict[str, Tensor] = {}

    def record(self, loss: Tensor | None, metrics: Mapping[str, Tensor]) -> None:
        """Keep this forward's loss term (replacing an unclaimed older one) and its metrics."""
        self._pending_loss = loss
        self._metrics = {key: value.detach() for key, value in metrics.items()}

    def pop_loss(self) -> Tensor | None:
        """The latest forward's loss term, once: a second call returns None until the next forward."""
        loss, self._pending_loss = self._pending_loss, None
        return loss

    def metric_tensors(self) -> dict[str, Tensor]:
        """The latest forward's metrics as device scalars, keyed `<metric_prefix>/<name>` (no device sync)."""
        prefix = self.metric_prefix
        return {f"{prefix}/{name}": value.float().reshape(()) for name, value in self._metrics.items()}

    def metrics(self) -> dict[str, float]:
        """`metric_tensors()` as floats (one device sync)."""
        tensors = self.metric_tensors()
        values = torch.stack(list(tensors.values())).tolist() if tensors else []
        return dict(zip(tensors, values, strict=True))


def auxiliary_layers(network: nn.Module) -> list[AuxiliaryLayer]:
    return [m for m in network.modules() if isinstance(m, AuxiliaryLayer)]


def auxiliary_loss(network: nn.Module) -> Tensor | float:
    """Sum of the loss terms the network's layers recorded in their latest training forward.

    0.0 when there are none (plain backbones), so `loss + auxiliary_loss(net)` is always valid.
    Each term is handed out once.
    """
    terms = [t for layer in auxiliary_layers(network) if (t := layer.pop_loss()) is not None]
    if not terms:
        return 0.0
    return torch.stack([t.float() for t in terms]).sum()


def auxiliary_metrics(network: nn.Module) -> dict[str, Tensor]:
    """The metrics every auxiliary layer of `network` recorded in its latest forward, as device scalars."""
    merged: dict[str, Tensor] = {}
    for layer in auxiliary_layers(network):
        merged.update(layer.metric_tensors())
    return merged
