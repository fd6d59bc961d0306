"""Checkpoints for resume: model, optimizers, step and every RNG the training loop draws from.

Batches and augmentations are functions of (seed, step) (see `dgbench.data.loaders`),
so restoring the global RNGs (dropout, algorithm-internal sampling) and the step is
all a resumed run needs to continue bit-for-bit on CPU.
"""

from __future__ import annotations

import ast
import io
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dgbench.algorithms.base import Algorithm
from dgbench.atomic import atomic_write_bytes
from dgbench.errors import DGBenchError

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


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Any) -> None: ...


def save_checkpoint(
    path: Path,
    algorithm: Algorithm,
    step: int,
    extras: Mapping[str, Stateful] = {},
    write: Callable[[Path, bytes], None] = atomic_write_bytes,
) -> None:
    """Write the state after `step` atomically (temp file + rename).

    `extras` are more objects the loop keeps across steps (weight averages), by name. The state
    is serialised before this returns; `write` puts the bytes on disk (the trainer's writes in the
    background: `dgbench.atomic.BackgroundWrites`).
    """
    payload = {
        "step": step,
        "model": algorithm.state_dict(),
        "optimizers": algorithm.optimizer_state(),
        "rng": rng_state(),
        "extras": {name: extra.state_dict() for name, extra in extras.items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write(path, buffer.getvalue())


def load_checkpoint(
    path: Path, algorithm: Algorithm, device: torch.device, extras: Mapping[str, Stateful] = {}
) -> int:
    """Restore `algorithm`, `extras` and the RNGs from `path`; returns the step it was saved after."""
    payload = torch.load(path, map_location=device, weights_only=True)
    algorithm.load_state_dict(payload["model"])
    algorithm.load_optimizer_state(payload["optimizers"])
    saved = payload.get("extras", {})
    for name, extra in extras.items():
        if name not in saved:
            raise DGBenchError(
                f"{path} holds no {name!r} state (saved by a run with other settings); "
                f"delete the checkpoint to restart the run"
            )
        extra.load_state_dict(saved[name])
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
