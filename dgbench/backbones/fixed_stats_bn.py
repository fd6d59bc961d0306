"""BatchNorm with fixed statistics whose affine parameters still train (the `frozen` policy).

DomainBed 2020 trains ResNets with every BatchNorm layer in eval mode: normalised by its running
statistics, scaled and shifted by a weight and bias that keep learning. PyTorch's eval-mode
backward on CUDA (`batch_norm_elementwise_backward_eval`) allocates the input's gradient
contiguous whatever the layout of the input, so under channels_last every layer's gradient is
written across the grain by a slow strided kernel, then copied back to channels_last by the layer
below (cudnn's convolution backward wants its incoming gradient channels_last). On an H100 that
was about 15 of the 35 ms of GPU time of an ERM ResNet-50 step (53 layers, 3 x 32 images at
224 px, bf16; `tools/bench_step.py`: a strided elementwise kernel 8.0 ms and a copy 6.6 ms, 53
calls each).

`FixedStatsBatchNorm2d` computes the same gradients in the layout of the incoming gradient:
grad_x = grad · w / sqrt(var + eps) in one kernel (in float32, rounded once to the gradient's
dtype), and grad_w, grad_b from the same reductions PyTorch uses (on CUDA the same kernel,
`batch_norm_backward_reduce`). Its forward is PyTorch's. It only steps in on CUDA, where the
layer is in eval mode and a gradient is wanted; under `torch.compile` PyTorch's own layer runs
(inductor fuses it anyway), and on CPU too: there PyTorch's backward keeps the layout, and the
sums written out below made an ERM step 7-8% slower (ResNet-18 / ResNet-50, 112 px, 2 cores).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _FixedStatsBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
    ) -> Tensor:
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.eps)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else weight * invstd
            grad_x = torch.empty_like(grad)  # the gradient's layout, not contiguous
            torch.mul(grad, _per_channel(scale, x), out=grad_x)  # float32 product, rounded once
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            sum_dy, sum_dy_xmu = _channel_sums(grad, x, mean, invstd, weight)
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def _channel_sums(
    grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per channel: sum(grad) and sum(grad · (x - mean)), accumulated in float32 or wider. Off CUDA
    (reached only by calling the function directly: the layer keeps PyTorch's kernels there) the
    sums are written out, the definition the tests hold the backward to."""
    if grad.is_cuda:  # PyTorch's own fused reduction (what its BatchNorm backward calls)
        # input_g=True: the sums themselves (PyTorch's eval-mode backward asks for grad_w and grad_b,
        # which the kernel forms as sum_dy_xmu * invstd and sum_dy, as below). The weight tells its
        # non-channels_last kernel that bf16 inputs come with float32 statistics.
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            grad, x, mean, invstd, weight, True, False, False
        )
        return sum_dy, sum_dy_xmu
    dims = [0, *range(2, x.dim())]
    wide = torch.promote_types(grad.dtype, torch.float32)
    centred = x.to(wide) - _per_channel(mean.to(wide), x)
    return grad.sum(dims, dtype=wide), (grad.to(wide) * centred).sum(dims)


def _per_channel(values: Tensor, x: Tensor) -> Tensor:
    """Per-channel `values` shaped to broadcast over `x` (N, C, ...)."""
    return values.view((1, -1) + (1,) * (x.dim() - 2))


class FixedStatsBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose eval-mode backward keeps the gradient's layout (see the module doc).

    Same parameters, buffers and state_dict keys as `nn.BatchNorm2d`; `use_fixed_stats_kernels`
    turns a model's plain BatchNorm2d layers into these in place.
    """

    def forward(self, x: Tensor) -> Tensor:
        wanted = torch.is_grad_enabled() and (
            x.requires_grad or (self.weight is not None and self.weight.requires_grad)
        )
        if (
            not x.is_cuda
            or self.weight is None  # see _channel_sums: PyTorch's kernel needs the weight's dtype
            or self.training
            or not wanted
            or self.running_var is None
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)
        self._check_input_dim(x)
        return _FixedStatsBatchNorm.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps
        )


def use_fixed_stats_kernels(model: nn.Module, on: bool = True) -> int:
    """Turn every plain `nn.BatchNorm2d` of `model` into a `FixedStatsBatchNorm2d` (or back, `on=False`),
    keeping its parameters and buffers; returns how many layers changed. Subclasses with a forward
    of their own (timm's BatchNormAct2d) are left as they are."""
    old, new = (nn.BatchNorm2d, FixedStatsBatchNorm2d) if on else (FixedStatsBatchNorm2d, nn.BatchNorm2d)
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed
