"""Compare GMoE's `SparseMoE` with an independent per-token re-derivation on a DeiT-S-sized layer.

The re-derivation (`naive_moe` in tests/backbones/test_moe.py: float64 router, Python loops for
top-k, batch-prioritised capacity and tutel's load/importance loss) is loaded from the test file,
so the tests and this check share one reference. Prints, per setting, the max abs difference of
the outputs, of the aux loss and of the expert loads, and whether the same tokens were dropped.

    python tools/check_moe.py                 # 2 images x 197 tokens, dim 384, 6 experts (~1 min, 2 cores)
    python tools/check_moe.py --batch 8 --seed 3
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import torch
from timm.layers import Mlp

from dgbench.backbones import moe
from dgbench.backbones.moe import Routing, SparseMoE

TEST_FILE = Path(__file__).resolve().parents[1] / "tests" / "backbones" / "test_moe.py"
# (top_k, capacity_factor, mode, logit scale): the paper's at init (scale 2), a sharper router (as
# after training: skewed loads, drops), tight capacity, and tutel's k = 2
SETTINGS = [
    (1, 1.5, "train", 2.0),
    (1, 1.5, "eval", 2.0),
    (1, 1.0, "train", 30.0),
    (1, 0.5, "train", 2.0),
    (2, 0.75, "eval", 30.0),
]


def load_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gmoe_reference", TEST_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forward_with_routing(layer: SparseMoE, tokens: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """The layer's output and the Routing its forward computed (moe.route wrapped for one call)."""
    original, seen = moe.route, []

    def spy(*args: object, **kwargs: object) -> Routing:
        seen.append(original(*args, **kwargs))  # type: ignore[arg-type]
        return seen[-1]

    moe.route = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            return layer(tokens), seen[-1]
    finally:
        moe.route = original


def compare(
    reference: ModuleType,
    top_k: int,
    capacity_factor: float,
    mode: str,
    scale: float,
    args: argparse.Namespace,
) -> str:
    """One setting: run the layer with a seeded noise draw and the naive loop with the same draw."""
    torch.manual_seed(args.seed)
    layer = SparseMoE(Mlp(384, 1536), 6, top_k, capacity_factor, expert_dropout=0.0).train(mode == "train")
    with torch.no_grad():
        layer.router.log_scale.fill_(math.log(scale))
    tokens = torch.randn(args.batch * 197, 384)
    torch.manual_seed(args.seed + 1)
    out, routing = forward_with_routing(layer, tokens)
    noise = None
    if mode == "train":
        torch.manual_seed(args.seed + 1)
        noise = torch.randn(tokens.shape[0], 6) * (layer.gate_noise / 6)
    naive = reference.naive_moe(layer, tokens, noise)
    metrics = {k.rsplit("/", 1)[1]: v for k, v in layer.metrics().items()}
    dropped = {(t, j) for t, j in (~routing.kept).nonzero().tolist()}
    load_diff = max(abs(metrics[f"load_e{i}"] - naive.loads[i]) for i in range(6))
    out_diff = (out - naive.out).abs().max().item()
    return (
        f"k={top_k} cf={capacity_factor:<4} scale={scale:<4} {mode:5}  out {out_diff:.2e}  "
        f"aux {abs(metrics['aux_loss'] - naive.aux):.2e} (aux={naive.aux:.3g})  loads {load_diff:.1e}  "
        f"dropped {len(dropped)}: {'same tokens' if dropped == naive.dropped else 'DIFFERENT tokens'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images of 197 tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reference = load_reference()
    print(f"SparseMoE vs per-token re-derivation: {args.batch * 197} tokens, dim 384, 6 experts")
    for top_k, capacity_factor, mode, scale in SETTINGS:
        print(compare(reference, top_k, capacity_factor, mode, scale, args))


if __name__ == "__main__":
    main()
