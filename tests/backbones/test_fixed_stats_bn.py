"""FixedStatsBatchNorm2d: PyTorch's eval-mode BatchNorm gradients, in the incoming gradient's layout."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from dgbench.backbones import build_backbone
from dgbench.backbones.fixed_stats_bn import (
    FixedStatsBatchNorm2d,
    _FixedStatsBatchNorm,
    use_fixed_stats_kernels,
)

LAYOUTS = [torch.contiguous_format, torch.channels_last]


def layer(dtype: torch.dtype = torch.float64, channels: int = 5) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm layer with non-trivial statistics and affine parameters."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels).to(dtype).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_are_pytorchs_eval_mode_gradients_in_the_gradients_layout(layout):
    bn = layer()
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64).to(memory_format=layout)
    grad = torch.randn(4, 5, 6, 7, dtype=torch.float64).to(memory_format=layout)
    params = [bn.weight, bn.bias]
    x_ref = x.clone().requires_grad_()
    expected = torch.autograd.grad(bn(x_ref), [x_ref, *params], grad)
    x_new = x.clone().requires_grad_()
    out = _FixedStatsBatchNorm.apply(x_new, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    torch.testing.assert_close(out, bn(x), rtol=0, atol=0)  # the forward is PyTorch's
    got = torch.autograd.grad(out, [x_new, *params], grad)
    for name, a, b in zip(["x", "weight", "bias"], got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"grad {n}: {m}")
    assert got[0].is_contiguous(memory_format=layout)


def test_without_affine_parameters_the_input_gradient_is_scaled_by_invstd_alone():
    bn = nn.BatchNorm2d(3, affine=False).double().eval()
    bn.running_var.fill_(4.0 - bn.eps)  # invstd 1/2 (an eps of 0 is refused by some torch versions)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    out = _FixedStatsBatchNorm.apply(x, None, None, bn.running_mean, bn.running_var, bn.eps)
    (grad_x,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(grad_x, torch.full_like(x, 0.5))


def test_the_layer_steps_in_only_where_pytorchs_backward_loses_the_layout():
    """On CPU, in train mode, without gradients: PyTorch's own BatchNorm (checked on CPU here; the
    CUDA branch is tested below where a GPU is present)."""
    bn = layer(torch.float32)
    fixed = copy.deepcopy(bn)
    assert use_fixed_stats_kernels(fixed) == 1 and type(fixed) is FixedStatsBatchNorm2d
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    assert type(fixed(x).grad_fn).__name__ == type(bn(x).grad_fn).__name__  # CPU: PyTorch's backward
    torch.testing.assert_close(fixed(x), bn(x), rtol=0, atol=0)
    fixed.train()
    bn.train()
    torch.testing.assert_close(fixed(x), bn(x))  # train mode: batch statistics, running stats updated
    torch.testing.assert_close(fixed.running_mean, bn.running_mean)


def test_only_plain_batchnorm2d_layers_change_and_their_state_stays():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), BatchNormAct2d(4), nn.BatchNorm1d(4))
    keys = list(model.state_dict())
    tensors = [t.data_ptr() for t in model.state_dict().values()]
    assert use_fixed_stats_kernels(model) == 1
    assert [type(m) for m in model] == [nn.Conv2d, FixedStatsBatchNorm2d, BatchNormAct2d, nn.BatchNorm1d]
    assert list(model.state_dict()) == keys
    assert [t.data_ptr() for t in model.state_dict().values()] == tensors
    assert use_fixed_stats_kernels(model, on=False) == 1 and type(model[1]) is nn.BatchNorm2d


def test_the_frozen_policy_switches_the_kernels_and_the_train_policy_switches_them_back():
    featurizer = build_backbone({"arch": "timm", "name": "resnet10t", "pretrained": False, "bn": "frozen"})
    layers = [m for m in featurizer.modules() if isinstance(m, nn.BatchNorm2d)]
    assert layers and all(type(m) is FixedStatsBatchNorm2d for m in layers)
    featurizer.set_bn_policy("train")
    assert all(type(m) is nn.BatchNorm2d for m in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the layer's own backward runs on CUDA only")
@pytest.mark.parametrize("layout", LAYOUTS)  # PyTorch's reduction has a kernel for each
def test_on_cuda_under_bf16_autocast_it_matches_pytorch_in_the_inputs_layout(layout):
    bn = layer(torch.float32, channels=64).cuda()
    fixed = copy.deepcopy(bn)
    use_fixed_stats_kernels(fixed)
    x = torch.randn(8, 64, 14, 14, device="cuda").to(memory_format=layout).bfloat16().requires_grad_()
    grads = []
    for module in (bn, fixed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad((out.float() ** 2).sum(), [x, module.weight, module.bias]))
        if module is fixed:
            assert type(out.grad_fn).__name__ == "_FixedStatsBatchNormBackward"
    for a, b in zip(grads[0], grads[1], strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    assert grads[1][0].is_contiguous(memory_format=layout)  # returned as computed (no leaf re-layout)
