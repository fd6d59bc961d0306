"""LoRA-group surgery and PEGO's orthogonal regulariser (reference/algorithms.md §7.2, §7.5).

CPU only, on timm's tiny `test_vit` (dim 64, 6 blocks) at 32 px with a random init.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from dgbench.backbones.lora import (
    LoRAGroupQKV,
    add_lora_group,
    is_vit_with_fused_qkv,
    lora_group_layers,
    merge_lora_group,
    orthogonal_regularizer,
    orthogonality_terms,
)

# Merged (W + ΣBA) vs unmerged (Wx + ΣB(Ax)) differ only by fp32 summation order: logits of order 1
# agree to ~1e-6; 1e-5 absolute + 1e-5 relative leaves a 10x margin.
MERGE_ATOL = MERGE_RTOL = 1e-5


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = timm.create_model(
        "test_vit", pretrained=False, num_classes=0, img_size=32, patch_size=4, dynamic_img_size=True
    )
    return vit.eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(layers: list[LoRAGroupQKV], seed: int = 2, scale: float = 0.05) -> None:
    """Give every B (and A) random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    for layer in layers:
        for params in (layer.lora_A, layer.lora_B):
            for p in params.values():
                p.add_(scale * torch.randn(p.shape, generator=g))


def naive_terms(layers: list[LoRAGroupQKV]) -> tuple[float, float]:
    """§7.2 written out: explicit ΔW = B A per module, explicit loops, float64, slices by hand."""
    preserve = diversify = 0.0
    for layer in layers:
        weight = layer.base.weight.detach().double()
        d = weight.shape[0] // 3
        frozen = {"q": weight[:d], "v": weight[2 * d :]}
        for t in ("q", "v"):
            n = layer.lora_A[t].shape[0]
            deltas = [
                layer.lora_B[t][i].detach().double() @ layer.lora_A[t][i].detach().double() for i in range(n)
            ]
            for i in range(n):
                preserve += torch.abs(frozen[t] @ deltas[i].T).sum().item()
                for j in range(i + 1, n):
                    diversify += torch.abs(deltas[i] @ deltas[j].T).sum().item()
    return preserve, diversify


def test_init_output_equals_frozen_backbone():
    plain = tiny_vit()
    vit = copy.deepcopy(plain)
    add_lora_group(vit, num_modules=3, rank=2)
    x = images()
    vit.train(), plain.train()
    assert torch.equal(vit(x), plain(x))  # B = 0: the unmerged path adds exact zeros
    vit.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(vit(x), plain(x))  # merged W + 0 = W


def test_surgery_freezes_the_vit_and_adds_only_factors():
    vit = tiny_vit()
    original = {id(p) for p in vit.parameters()}
    layers = add_lora_group(vit, num_modules=2, rank=3)
    assert len(layers) == len(vit.blocks) and lora_group_layers(vit) == layers
    assert all(isinstance(b.attn.qkv, LoRAGroupQKV) for b in vit.blocks)
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in original for p in trainable)
    assert not any(p.requires_grad for p in vit.parameters() if id(p) in original)
    assert {p.shape for p in trainable} == {torch.Size([2, 3, 64]), torch.Size([2, 64, 3])}
    with pytest.raises(ValueError, match="already carries LoRA"):
        add_lora_group(vit, 2, 3)


def test_regularizer_and_its_gradient_are_zero_at_init():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=4, rank=2)
    reg = orthogonal_regularizer(layers)
    assert reg.item() == 0.0
    reg.backward()
    for layer in layers:
        for p in [*layer.lora_A.values(), *layer.lora_B.values()]:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0  # sign(0) = 0


def test_regularizer_matches_naive_rederivation():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=3, rank=2)
    perturb(layers)
    preserve, diversify = orthogonality_terms(layers)
    want_preserve, want_diversify = naive_terms(layers)
    assert want_preserve > 0 and want_diversify > 0
    assert preserve.item() == pytest.approx(want_preserve, rel=1e-5)
    assert diversify.item() == pytest.approx(want_diversify, rel=1e-5)
    assert orthogonal_regularizer(layers).item() == pytest.approx(want_preserve + want_diversify, rel=1e-5)


def test_regularizer_is_fp32_under_bf16_autocast():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=2, rank=2)
    perturb(layers)
    exact = orthogonal_regularizer(layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = orthogonal_regularizer(layers)
    assert inside.dtype == torch.float32 and torch.equal(inside, exact)


def test_single_module_has_no_diversity_term():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=1, rank=4)
    perturb(layers)
    preserve, diversify = orthogonality_terms(layers)
    assert preserve.item() > 0 and diversify.item() == 0.0
    assert preserve.item() == pytest.approx(naive_terms(layers)[0], rel=1e-5)


def test_only_q_and_v_rows_are_adapted():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=2, rank=2)
    perturb(layers)
    tokens = torch.randn(2, 5, 64)
    for layer in layers:
        d = layer.dim
        change = (layer.merged_weight() - layer.base.weight).detach()
        assert torch.count_nonzero(change[d : 2 * d]) == 0  # k rows
        assert torch.count_nonzero(change[:d]) > 0 and torch.count_nonzero(change[2 * d :]) > 0
        with torch.no_grad():
            layer.train()
            assert torch.equal(layer(tokens)[..., d : 2 * d], layer.base(tokens)[..., d : 2 * d])


def test_merge_lora_group_gives_the_same_logits_with_plain_linears():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=3, rank=2, merge_in_eval=False)
    perturb(layers)
    x = images()
    with torch.no_grad():
        unmerged = vit(x)
        merged_vit = copy.deepcopy(vit)
        assert merge_lora_group(merged_vit) == len(layers)
        merged = merged_vit(x)
    assert not lora_group_layers(merged_vit)
    assert all(type(b.attn.qkv) is nn.Linear for b in merged_vit.blocks)
    assert sum(p.numel() for p in merged_vit.parameters()) == sum(p.numel() for p in tiny_vit().parameters())
    assert not torch.equal(unmerged, tiny_vit()(x))  # the adapters do change the function
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def test_eval_cache_matches_unmerged_and_follows_updates():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=2, rank=2)
    perturb(layers)
    x = images()

    def unmerged() -> torch.Tensor:
        with torch.enable_grad():  # a forward that records gradients never uses the cache
            return vit(x).detach()

    vit.eval()
    with torch.no_grad():
        cached = vit(x)
    assert all(layer._merged is not None for layer in layers)  # the cached path was taken
    torch.testing.assert_close(cached, unmerged(), atol=MERGE_ATOL, rtol=MERGE_RTOL)

    perturb(layers, seed=3)  # an in-place update while still in eval mode
    with torch.no_grad():
        after = vit(x)
    assert not torch.allclose(after, cached, atol=1e-3)
    torch.testing.assert_close(after, unmerged(), atol=MERGE_ATOL, rtol=MERGE_RTOL)

    state = copy.deepcopy(vit.state_dict())
    perturb(layers, seed=4)
    vit.load_state_dict(state)  # load_state_dict copies in place
    with torch.no_grad(), torch.inference_mode():
        torch.testing.assert_close(vit(x), after, atol=MERGE_ATOL, rtol=MERGE_RTOL)

    layers[0].lora_B["q"].data = torch.zeros_like(layers[0].lora_B["q"])  # storage replaced
    with torch.no_grad():
        torch.testing.assert_close(vit(x), unmerged(), atol=MERGE_ATOL, rtol=MERGE_RTOL)

    vit.train()
    assert all(layer._merged is None for layer in layers)  # train() drops the cached weights
    assert not any(k.endswith("_merged") for k in vit.state_dict())


def test_eval_cache_built_under_autocast_holds_the_exact_merged_weight():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=4, rank=4)
    perturb(layers)
    vit.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        vit(images())  # the trainer evaluates under autocast: the cache is built here
    for layer in layers:
        assert layer._merged.dtype == torch.float32
        assert torch.equal(layer._merged, layer.merged_weight())  # not a bf16-rounded ΔW


def test_other_targets_adapt_only_their_rows():
    vit = tiny_vit()
    layers = add_lora_group(vit, num_modules=2, rank=2, targets=("k",))
    perturb(layers)
    d = layers[0].dim
    change = (layers[0].merged_weight() - layers[0].base.weight).detach()
    assert torch.count_nonzero(change[:d]) == 0 and torch.count_nonzero(change[2 * d :]) == 0
    assert torch.count_nonzero(change[d : 2 * d]) > 0
    with pytest.raises(ValueError, match="targets"):
        add_lora_group(tiny_vit(), 2, 2, targets=("o",))


def test_fits_only_vits_with_a_fused_qkv():
    assert is_vit_with_fused_qkv(tiny_vit())
    assert not is_vit_with_fused_qkv(timm.create_model("resnet18", pretrained=False, num_classes=0))
    with pytest.raises(ValueError, match="fused qkv"):
        add_lora_group(timm.create_model("resnet18", pretrained=False, num_classes=0), 2, 2)
