"""Loading a local weights file into a featurizer, with errors that say what does not fit.

Files are read with `torch.load(weights_only=True)`: a checkpoint cannot run code. A
file may hold a raw state_dict or wrap it under "state_dict" or "model"; a "module."
(DistributedDataParallel) or "model." (a saved dgbench Featurizer) prefix is stripped.
Classifier-head tensors the featurizer lacks (`fc.`, `head.`, `classifier.`) are
skipped, since heads are the algorithm's; any other mismatch is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dgbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc.", "head.", "classifier.")
WRAPPER_KEYS = ("state_dict", "model")
STRIP_PREFIXES = ("module.", "model.")
MAX_LISTED = 10
COUNTERS = ("num_batches_tracked",)  # BatchNorm step counters: not weights, absent from old checkpoints


def load_weights(
    model: nn.Module, path: str | Path, *, key: str = "backbone.weights", what: str = ""
) -> list[str]:
    """Load the state_dict in `path` into `model` (strict, up to head tensors).

    Args:
        model: the network to fill (for a Featurizer, its `.model`).
        path: the weights file.
        key: the config key the path came from, named in errors.
        what: a description of the model, named in errors (e.g. "backbone timm:resnet50").

    Returns:
        The classifier-head keys of the file that were skipped.
    """
    state = read_state_dict(path, key=key)
    own = model.state_dict()
    state = strip_prefixes(state, own.keys())
    skipped = [k for k in state if k not in own and k.startswith(HEAD_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in skipped}
    for k in own:  # fill counters an older checkpoint lacks, as torchvision's loader does
        if k not in state and k.endswith(COUNTERS):
            state[k] = own[k]
    problems = describe_mismatch(state, own)
    if problems:
        target = f" {what}" if what else ""
        raise ConfigError(
            f"{key}={str(path)!r} does not fit the model{target}: {problems}. "
            f"Check that the backbone (backbone.name) is the architecture the file was saved from, "
            f"and that the file holds the featurizer's state_dict (torch.save(model.state_dict(), PATH))."
        )
    model.load_state_dict(state, strict=True)
    if skipped:
        log.info(
            "%s: skipped %d classifier-head tensor(s) the featurizer has no place for: %s",
            path,
            len(skipped),
            _listing(skipped),
        )
    return skipped


def read_state_dict(path: str | Path, *, key: str = "backbone.weights") -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped from a "state_dict"/"model" entry if needed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{key}={str(path)!r}: no such file ({file.resolve()}); "
            f"set {key} to an existing state_dict file or remove it"
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{key}={str(path)!r}: cannot read {file} as a weights-only torch file ({reason}); "
            f"save plain tensors with torch.save(model.state_dict(), PATH)"
        ) from exc
    return _unwrap(obj, file, key)


def strip_prefixes(state: Mapping[str, Tensor], own_keys: Any) -> dict[str, Tensor]:
    """Drop a prefix every key of the file shares and no key of the model has."""
    own = list(own_keys)
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in out) and not any(k.startswith(prefix) for k in own):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def describe_mismatch(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    """A one-paragraph account of missing, unexpected and mis-shaped keys; empty if all fit."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) [{_listing(missing)}]")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) [{_listing(unexpected)}]")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) [{_listing(shapes)}]")
    return "; ".join(parts)


def _unwrap(obj: Any, file: Path, key: str) -> dict[str, Tensor]:
    """Accept a raw state_dict or one nested under a wrapper key."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, Mapping):
        for wrapper in WRAPPER_KEYS:
            if isinstance(obj.get(wrapper), Mapping):
                return _unwrap(obj[wrapper], file, key)
        listed = _listing([str(k) for k in obj])
        found = f"a dict with keys [{listed}]" if obj else "an empty dict"
    else:
        found = type(obj).__name__
    raise DataError(
        f"{key}={str(file)!r}: expected a state_dict (name -> tensor), or one under "
        f"{' or '.join(repr(w) for w in WRAPPER_KEYS)}, found {found}"
    )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")
