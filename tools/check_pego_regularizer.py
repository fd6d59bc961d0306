"""Check PEGO's orthogonal regulariser against an independent numpy re-derivation.

Builds a ViT-B-shaped LoRA group (12 fused qkv Linear(768, 2304) layers, N adapters of rank r on
q and v) with random frozen weights, kaiming A and random B, then computes L_o of
reference/algorithms.md §7.2 twice:

- `dgbench.backbones.lora.orthogonality_terms` (torch, fp32, factored products (W Aᵀ)Bᵀ and
  B(A Aᵀ)Bᵀ) and its autograd gradient;
- here, in float64 numpy, with explicit ΔWᵢ = Bᵢ Aᵢ matrices, explicit loops over blocks, slices,
  modules and pairs, and the L1 gradient written out by hand: for P = X Yᵀ, ∂‖P‖₁/∂X = sign(P) Y
  and ∂‖P‖₁/∂Y = sign(P)ᵀ X; then ∂/∂Bᵢ = (∂/∂ΔWᵢ) Aᵢᵀ and ∂/∂Aᵢ = Bᵢᵀ (∂/∂ΔWᵢ).

Prints the relative differences (‖torch − numpy‖₂ / ‖numpy‖₂) and exits 1 if one exceeds its
tolerance. GRADIENT_NOTE: the L1 gradient is sign(P)-weighted, and entries of P within fp32 rounding
of zero can take the other sign in float64, each flip moving the gradient by 2·|row|; so the fp32
gradient agrees to ~1e-4 relative, not to fp32 precision (with --float64 both sides agree to ~1e-15).

    python tools/check_pego_regularizer.py                  # N = 4, r = 4 (reference defaults)
    python tools/check_pego_regularizer.py --num-lora 2     # PACS setting
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import nn

from dgbench.backbones.lora import LoRAGroupQKV, orthogonality_terms

SLICES = {"q": 0, "v": 2}  # row block of each adapted slice in the fused [q; k; v] weight


def build_layers(blocks: int, dim: int, num_lora: int, rank: int, b_scale: float) -> list[LoRAGroupQKV]:
    """Random ViT-B-like qkv projections with trained-looking (non-zero) adapters."""
    layers = []
    for _ in range(blocks):
        layer = LoRAGroupQKV(nn.Linear(dim, 3 * dim), num_lora, rank, targets=tuple(SLICES))
        with torch.no_grad():
            for b in layer.lora_B.values():
                b.normal_(0.0, b_scale)
        layers.append(layer)
    return layers


def numpy_reference(layers: list[LoRAGroupQKV]) -> tuple[float, float, dict[str, np.ndarray]]:
    """Preserve and diversify sums and the gradient of their total, per parameter name."""
    preserve = diversify = 0.0
    grads: dict[str, np.ndarray] = {}
    for block, layer in enumerate(layers):
        weight = layer.base.weight.detach().double().numpy()
        d = weight.shape[0] // 3
        for t, k in SLICES.items():
            w = weight[k * d : (k + 1) * d]
            a = [x.detach().double().numpy() for x in layer.lora_A[t]]
            b = [x.detach().double().numpy() for x in layer.lora_B[t]]
            deltas = [b[i] @ a[i] for i in range(len(a))]
            d_delta = [np.zeros_like(x) for x in deltas]  # ∂L/∂ΔWᵢ
            for i in range(len(deltas)):
                p = w @ deltas[i].T
                preserve += np.abs(p).sum()
                d_delta[i] += np.sign(p).T @ w
                for j in range(i + 1, len(deltas)):
                    p = deltas[i] @ deltas[j].T
                    diversify += np.abs(p).sum()
                    d_delta[i] += np.sign(p) @ deltas[j]
                    d_delta[j] += np.sign(p).T @ deltas[i]
            grads[f"{block}.A.{t}"] = np.stack([b[i].T @ d_delta[i] for i in range(len(a))])
            grads[f"{block}.B.{t}"] = np.stack([d_delta[i] @ a[i].T for i in range(len(a))])
    return float(preserve), float(diversify), grads


def torch_result(layers: list[LoRAGroupQKV]) -> tuple[float, float, dict[str, np.ndarray]]:
    preserve, diversify = orthogonality_terms(layers)
    (preserve + diversify).backward()
    grads = {}
    for block, layer in enumerate(layers):
        for t in SLICES:
            grads[f"{block}.A.{t}"] = layer.lora_A[t].grad.double().numpy()
            grads[f"{block}.B.{t}"] = layer.lora_B[t].grad.double().numpy()
    return preserve.item(), diversify.item(), grads


def relative(x: np.ndarray | float, ref: np.ndarray | float) -> float:
    return float(np.linalg.norm(np.asarray(x) - ref) / max(np.linalg.norm(ref), 1e-300))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-lora", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--b-scale", type=float, default=0.01, help="std of the random B entries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5, help="largest relative difference of L_o accepted")
    parser.add_argument(
        "--grad-tol", type=float, default=1e-3, help="same for the gradient (see GRADIENT_NOTE)"
    )
    parser.add_argument("--float64", action="store_true", help="run the torch side in float64 as well")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    layers = build_layers(args.blocks, args.dim, args.num_lora, args.rank, args.b_scale)
    if args.float64:
        layers = [layer.double() for layer in layers]
    t_pre, t_div, t_grads = torch_result(layers)
    n_pre, n_div, n_grads = numpy_reference(layers)
    diffs = {
        "preserve": (relative(t_pre, n_pre), args.tol),
        "diversify": (relative(t_div, n_div), args.tol),
        "total": (relative(t_pre + t_div, n_pre + n_div), args.tol),
        "gradient (all A, B)": (
            relative(
                np.concatenate([t_grads[k].ravel() for k in n_grads]),
                np.concatenate([n_grads[k].ravel() for k in n_grads]),
            ),
            args.grad_tol,
        ),
    }
    print(
        f"ViT-B-shaped group: {args.blocks} blocks, dim {args.dim}, N={args.num_lora}, r={args.rank}, "
        f"B ~ N(0, {args.b_scale}^2)"
    )
    print(f"torch {'float64' if args.float64 else 'fp32':7s}: preserve {t_pre:.9g}  diversify {t_div:.9g}")
    print(f"numpy float64: preserve {n_pre:.9g}  diversify {n_div:.9g}")
    failed = []
    for name, (value, tol) in diffs.items():
        print(f"relative difference, {name}: {value:.3e} (tol {tol:g})")
        if not value <= tol:
            failed.append(name)
    print(f"FAIL: {', '.join(failed)}" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
