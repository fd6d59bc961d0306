"""Host-to-device traffic that does not stall the device.

On CUDA a blocking copy from host memory (`tensor.to("cuda")`, `torch.tensor(..., device="cuda")`)
and every read of a device value (`.item()`, `.tolist()`, `int(t)`) wait until all the kernels
already queued have run. Done once per training step, that leaves the GPU idle while the host
prepares the next step; without them the host runs ahead and queues the next batch's kernels
behind the current step's. So the fast data path copies its small per-batch tensors
asynchronously from pinned memory, and the trainer reads metrics at checkpoints only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """`tensor` on `device`; a host tensor bound for CUDA is copied asynchronously, through pinned memory.

    PyTorch keeps the pinned block from being reused until the queued copy has run, so the
    caller may drop or reuse `tensor` at once.
    """
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (a no-op on the CPU, whose ops run as they are called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
