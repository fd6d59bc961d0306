"""θ as a list of live tensors, and a reusable copy of it: the basis of first-order meta-updates.

Fish and MLDG take inner steps on the network itself and then combine or restore θ. Doing that on
the live state tensors, with one persistent copy reused every step, replaces DomainBed's per-step
deepcopy of the whole network (allocation, and a new optimizer object each time).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def network_state(*modules: nn.Module) -> list[Tensor]:
    """θ: the modules' state_dict tensors (parameters and persistent buffers), each tensor once,
    in state_dict order; the live tensors, not copies."""
    tensors: list[Tensor] = []
    seen: set[int] = set()
    for module in modules:
        for value in module.state_dict(keep_vars=True).values():
            if isinstance(value, Tensor) and id(value) not in seen:
                seen.add(id(value))
                tensors.append(value)
    return tensors


@torch.no_grad()
def copy_state(storage: list[Tensor], network: list[Tensor]) -> list[Tensor]:
    """Copy θ into `storage` and return it, reallocated only if shapes, dtypes or devices changed."""
    fits = len(storage) == len(network) and all(
        s.shape == t.shape and s.dtype == t.dtype and s.device == t.device
        for s, t in zip(storage, network, strict=True)
    )
    if not fits:
        storage = [torch.empty_like(t, memory_format=torch.preserve_format) for t in network]
    torch._foreach_copy_(storage, network)
    return storage
