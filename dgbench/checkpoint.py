"""Checkpoints for resume: model, optimizers, step and every RNG the training loop draws from.

Batches and augmentations are functions of (seed, step) (see `dgbench.data.loaders`),
so restoring the global RNGs (dropout, algorithm-internal sampling) and the step is
all a resumed run needs to continue bit-for-bit on CPU.
"""

from __future__ import annotations

import ast
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgbench.algorithms.base import Algorithm
from dgbench.atomic import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, algorithm: Algorithm, step: int) -> None:
    """Write the state after `step` atomically (temp file + rename)."""
    payload = {
        "step": step,
        "model": algorithm.state_dict(),
        "optimizers": algorithm.optimizer_state(),
        "rng": rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, algorithm: Algorithm, device: torch.device) -> int:
    """Restore `algorithm` and the RNGs from `path`; returns the step it was saved after."""
    payload = torch.load(path, map_location=device, weights_only=True)
    algorithm.load_state_dict(payload["model"])
    algorithm.load_optimizer_state(payload["optimizers"])
    rng = payload["rng"]
    rng["torch"] = rng["torch"].cpu()
    if "cuda" in rng:
        rng["cuda"] = [s.cpu() for s in rng["cuda"]]
    set_rng_state(rng)
    return int(payload["step"])


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    # weights_only loading accepts tensors and plain containers, not numpy arrays.
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["cached"])
