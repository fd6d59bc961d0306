"""LoRA groups on the fused qkv projection of timm ViTs, and PEGO's orthogonal regulariser.

A LoRA group (Hu et al., "Learn to Preserve and Diversify", ECCV 2024) is N low-rank adapters
on the same frozen projection, summed: for a target slice t of the fused `attn.qkv` Linear
(q, k or v rows), t(x) = W_t x + Σ_i Bᵗᵢ Aᵗᵢ x, with Aᵗᵢ ∈ ℝ^{r×in} (kaiming_uniform, a = √5) and
Bᵗᵢ ∈ ℝ^{out×r} (zeros), no α/r scaling and no dropout, as in JudgingH/PEGO
`domainbed/networks/lora.py` (`_LoRA_qkv_timm`, commit fb8700b). With N = 1 it is plain LoRA.

The surgery is kept apart from any algorithm, so LoRA combines with any of them (LoRA + SAM):
`add_lora_group` wraps every fused qkv Linear of a ViT and freezes the ViT, `merge_lora_group`
folds the adapters back into plain Linear layers (same function, no inference overhead), and
`orthogonality_terms` / `orthogonal_regularizer` give PEGO's penalty.

Shapes: the N adapters of a target are stored stacked, A as (N, r, in) and B as (N, out, r), so
the forward is one rank-N·r product (Σ_i Bᵢ Aᵢ = [B₁ … B_N][A₁; …; A_N]) and the penalty is a
few batched matmuls. Weights follow PyTorch's Linear layout (out × in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("q", "k", "v")  # row blocks of the fused qkv weight, in timm's order


class LoRAGroupQKV(nn.Module):
    """A frozen fused qkv Linear plus a group of N rank-r LoRA adapters on some of its slices.

    In eval mode and without autograd (evaluation under `torch.no_grad()` / inference mode) the
    forward uses a cached merged weight W + Σ_i ΔWᵢ: one Linear, like the model without LoRA.
    The cache is rebuilt whenever a LoRA factor or the base weight may have changed (their
    storage or autograd version counter differs: optimizer steps, `load_state_dict`, `.to()`),
    and dropped by `train()` and `_apply`. Training, and any forward that records gradients,
    uses the unmerged low-rank path, whose backward never forms a dense weight gradient.

    Args:
        qkv: the fused projection, `Linear(in, 3·d)` with rows [q; k; v]; it is frozen.
        num_modules: N, the adapters in the group.
        rank: r, the rank of each adapter.
        targets: the slices that get adapters (PEGO: q and v).
        merge_in_eval: use the cached merged weight for no-grad eval forwards.
    """

    def __init__(
        self,
        qkv: nn.Linear,
        num_modules: int,
        rank: int,
        targets: Sequence[str] = ("q", "v"),
        merge_in_eval: bool = True,
    ) -> None:
        super().__init__()
        _check_group(qkv, num_modules, rank, targets)
        self.base = qkv.requires_grad_(False)
        self.num_modules = num_modules
        self.rank = rank
        self.targets = tuple(targets)
        self.merge_in_eval = merge_in_eval
        self.dim = qkv.out_features // 3  # rows per slice
        factory = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.lora_A = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(num_modules, rank, qkv.in_features, **factory)) for t in targets}
        )
        self.lora_B = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(num_modules, self.dim, rank, **factory)) for t in targets}
        )
        self._merged: Tensor | None = None
        self._merged_key: tuple[Any, ...] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A like nn.Linear's default (kaiming_uniform, a = √5, fan_in = in) per adapter; B = 0."""
        for t in self.targets:
            for a in self.lora_A[t]:  # each (r, in) slice on its own: fan_in = in, not N·r·in
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[t])
        self.invalidate_cache()

    def rows(self, target: str) -> slice:
        """Rows of the fused weight that belong to `target`."""
        start = TARGETS.index(target) * self.dim
        return slice(start, start + self.dim)

    def frozen_weight(self, target: str) -> Tensor:
        """W_t, the pretrained (out × in) weight of one slice."""
        return self.base.weight[self.rows(target)]

    def delta_weights(self) -> dict[str, Tensor]:
        """ΔWᵢ = Bᵢ Aᵢ per target, stacked as (N, out, in); differentiable."""
        return {t: torch.matmul(self.lora_B[t], self.lora_A[t]) for t in self.targets}

    def merged_weight(self) -> Tensor:
        """W + Σ_i ΔWᵢ on the adapted slices (the weight of an equivalent plain Linear).

        Always in the parameters' precision: under a bf16 autocast the product would be rounded
        to bf16 and cached, and later fp32 forwards would see that error.
        """
        weight = self.base.weight.clone()
        with torch.autocast(weight.device.type, enabled=False):
            for t in self.targets:
                weight[self.rows(t)] += _stacked_b(self.lora_B[t]) @ _stacked_a(self.lora_A[t])
        return weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merge_in_eval and not self.training and not torch.is_grad_enabled():
            return F.linear(x, self._cached_merged_weight(), self.base.bias)
        out = self.base(x)
        for t in self.targets:
            # Σ_i Bᵢ(Aᵢx) as one rank-N·r product; in place on the fresh output of the frozen Linear.
            delta = F.linear(F.linear(x, _stacked_a(self.lora_A[t])), _stacked_b(self.lora_B[t]))
            out[..., self.rows(t)] += delta
        return out

    def invalidate_cache(self) -> None:
        """Drop the merged weight; the next no-grad eval forward rebuilds it."""
        self._merged = None
        self._merged_key = None

    def train(self, mode: bool = True) -> LoRAGroupQKV:
        self.invalidate_cache()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> LoRAGroupQKV:
        self.invalidate_cache()  # .to(), .half(), ...: the cached tensor is not a buffer and would not follow
        return super()._apply(fn, recurse)

    def _cached_merged_weight(self) -> Tensor:
        key = self._state_key()
        if self._merged is None or key != self._merged_key:
            with torch.no_grad():
                self._merged = self.merged_weight()
            self._merged_key = key
        return self._merged

    def _state_key(self) -> tuple[Any, ...]:
        """Identifies the current values of every tensor the merged weight is made of.

        An in-place change (optimizer step, `copy_` in `load_state_dict`) bumps the version
        counter; replacing `.data` changes the storage pointer.
        """
        tensors = [self.base.weight, *self.lora_A.values(), *self.lora_B.values()]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"in={self.base.in_features}, out={self.base.out_features}, num_modules={self.num_modules}, "
            f"rank={self.rank}, targets={','.join(self.targets)}, merge_in_eval={self.merge_in_eval}"
        )


def _stacked_a(a: Tensor) -> Tensor:
    """(N, r, in) → (N·r, in): [A₁; …; A_N]."""
    return a.reshape(-1, a.shape[-1])


def _stacked_b(b: Tensor) -> Tensor:
    """(N, out, r) → (out, N·r): [B₁ … B_N], so _stacked_b(B) @ _stacked_a(A) = Σ_i Bᵢ Aᵢ."""
    return b.permute(1, 0, 2).reshape(b.shape[1], -1)


def _check_group(qkv: nn.Module, num_modules: int, rank: int, targets: Sequence[str]) -> None:
    if not isinstance(qkv, nn.Linear) or qkv.out_features % 3:
        raise TypeError(f"expected a fused qkv nn.Linear(in, 3·d), got {qkv!r}")
    if num_modules < 1 or rank < 1:
        raise ValueError(f"num_modules and rank must be >= 1, got {num_modules} and {rank}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct names among {TARGETS}, got {tuple(targets)}")


def fused_qkv_attentions(model: nn.Module) -> list[nn.Module]:
    """timm `Attention` modules of `model` whose `qkv` is a plain fused Linear (or already a LoRA group).

    Only timm's standard `Attention` qualifies: its forward calls `self.qkv(x)`, so the Linear can
    be swapped. Attention classes that read `qkv.weight` directly (EVA, BEiT with separate q/v
    biases) are left out on purpose.
    """
    from timm.layers import Attention

    return [
        m
        for m in model.modules()
        if type(m) is Attention
        and isinstance(m.qkv, nn.Linear | LoRAGroupQKV)
        and (m.qkv.out_features if isinstance(m.qkv, nn.Linear) else m.qkv.base.out_features) % 3 == 0
    ]


def is_vit_with_fused_qkv(featurizer: nn.Module) -> bool:
    """Whether LoRA groups fit: a timm VisionTransformer whose every block has a fused qkv Linear.

    `featurizer` is a dgbench Featurizer (its `.model` is inspected) or the model itself.
    """
    from timm.models.vision_transformer import VisionTransformer

    model = getattr(featurizer, "model", featurizer)
    if not isinstance(model, VisionTransformer) or len(model.blocks) == 0:
        return False
    found = {id(m) for m in fused_qkv_attentions(model)}
    return all(id(getattr(block, "attn", None)) in found for block in model.blocks)


def add_lora_group(
    vit: nn.Module,
    num_modules: int,
    rank: int,
    targets: Sequence[str] = ("q", "v"),
    merge_in_eval: bool = True,
) -> list[LoRAGroupQKV]:
    """Freeze every parameter of `vit`, then wrap each fused `attn.qkv` in a `LoRAGroupQKV`.

    Afterwards only the LoRA factors of `vit` train. Returns the new layers in block order.

    Raises:
        ValueError: `vit` has no timm Attention with a fused qkv Linear, or already has LoRA.
    """
    attentions = fused_qkv_attentions(vit)
    if not attentions:
        raise ValueError(f"{type(vit).__name__} has no timm Attention with a fused qkv Linear to adapt")
    if any(isinstance(m.qkv, LoRAGroupQKV) for m in attentions):
        raise ValueError("the model already carries LoRA groups; merge them first (merge_lora_group)")
    vit.requires_grad_(False)
    layers = []
    for attention in attentions:
        attention.qkv = LoRAGroupQKV(attention.qkv, num_modules, rank, targets, merge_in_eval)
        layers.append(attention.qkv)
    return layers


@torch.no_grad()
def merge_lora_group(vit: nn.Module) -> int:
    """Replace every `LoRAGroupQKV` in `vit` by a frozen plain Linear with the merged weight.

    The model computes the same function (up to float rounding) at the cost of the original ViT.
    Returns the number of layers merged.
    """
    merged = 0
    for attention in fused_qkv_attentions(vit):
        group = attention.qkv
        if not isinstance(group, LoRAGroupQKV):
            continue
        linear = nn.Linear(
            group.base.in_features,
            group.base.out_features,
            bias=group.base.bias is not None,
            device=group.base.weight.device,
            dtype=group.base.weight.dtype,
        )
        linear.weight.copy_(group.merged_weight())
        if group.base.bias is not None:
            linear.bias.copy_(group.base.bias)
        attention.qkv = linear.requires_grad_(False)
        merged += 1
    return merged


def lora_group_layers(module: nn.Module) -> list[LoRAGroupQKV]:
    """Every `LoRAGroupQKV` inside `module`, in module order."""
    return [m for m in module.modules() if isinstance(m, LoRAGroupQKV)]


def preserve_term(weight: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Σ_i ‖W ΔWᵢᵀ‖₁ (entrywise L1): each adapter's rows against the pretrained rows.

    W ΔWᵢᵀ = W Aᵢᵀ Bᵢᵀ is formed as (W Aᵢᵀ) Bᵢᵀ, so no ΔWᵢ is materialised.

    Shape: weight (out, in), a (N, r, in), b (N, out, r) → scalar.
    """
    w_at = torch.matmul(weight, a.transpose(1, 2))  # (N, out, r) = W Aᵢᵀ
    return torch.matmul(w_at, b.transpose(1, 2)).abs().sum()  # (N, out, out) = W ΔWᵢᵀ


def diversify_term(a: Tensor, b: Tensor) -> Tensor:
    """Σ_{i<j} ‖ΔWᵢ ΔWⱼᵀ‖₁ (entrywise L1): every pair of adapters in the group.

    ΔWᵢ ΔWⱼᵀ = Bᵢ (Aᵢ Aⱼᵀ) Bⱼᵀ, an r × r product in the middle. Zero for N = 1 (no pairs).

    Shape: a (N, r, in), b (N, out, r) → scalar.
    """
    i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1, device=a.device)
    gram = torch.matmul(a[i], a[j].transpose(1, 2))  # (P, r, r) = Aᵢ Aⱼᵀ
    return torch.matmul(torch.matmul(b[i], gram), b[j].transpose(1, 2)).abs().sum()  # (P, out, out)


def orthogonality_terms(layers: Iterable[LoRAGroupQKV]) -> tuple[Tensor, Tensor]:
    """PEGO's "preserve" and "diversify" sums over every layer and adapted slice, in fp32.

    Preserve = Σ_layers Σ_t Σ_i ‖W_t ΔWᵗᵢᵀ‖₁, diversify = Σ_layers Σ_t Σ_{i<j} ‖ΔWᵗᵢ ΔWᵗⱼᵀ‖₁,
    t over the adapted slices (q and v for PEGO). Computed with autocast off: these are sums of
    hundreds of thousands of absolute values, which bf16 would round at the 1e-2 level.
    """
    preserve: list[Tensor] = []
    diversify: list[Tensor] = []
    for layer in layers:
        with torch.autocast(layer.base.weight.device.type, enabled=False):
            for t in layer.targets:
                a, b = _at_least_fp32(layer.lora_A[t]), _at_least_fp32(layer.lora_B[t])
                preserve.append(preserve_term(_at_least_fp32(layer.frozen_weight(t)), a, b))
                diversify.append(diversify_term(a, b))
    if not preserve:
        raise ValueError("no LoRAGroupQKV layer given: nothing to regularise")
    return torch.stack(preserve).sum(), torch.stack(diversify).sum()


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def orthogonal_regularizer(layers: Iterable[LoRAGroupQKV]) -> Tensor:
    """L_o = Σ_blocks Σ_i [‖W_q ΔW_qⁱᵀ‖₁ + ‖W_v ΔW_vⁱᵀ‖₁ + Σ_{j>i}(‖ΔW_qⁱ ΔW_qʲᵀ‖₁ + ‖ΔW_vⁱ ΔW_vʲᵀ‖₁)].

    PEGO's penalty before its weight λ (reference/algorithms.md §7.2): entrywise L1 of row inner
    products between each adapter and the frozen weight, and between adapters of the same group.
    """
    preserve, diversify = orthogonality_terms(layers)
    return preserve + diversify
