"""BatchNorm as the DGC layer and the group convs use it: an eval BN as a per-channel affine
(applied inside a native call), and the training BN-ReLU of a DGC layer with the gate's pooling
in one native pass."""

from __future__ import annotations

from typing import Any
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

from dgc.layers import native


def eval_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval BatchNorm2d (running statistics) as per-channel (scale, shift), both (C,)."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None  # the callers checked plain_eval_bn(bn)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def plain_eval_bn(bn: nn.Module) -> TypeGuard[nn.BatchNorm2d]:
    """Whether ``bn`` is an eval BatchNorm2d with running statistics and no hooks, which may
    then be applied functionally or as its per-channel affine (``eval_affine``) inside a
    native call."""
    plain = isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None
    return plain and not (bn._forward_hooks or bn._forward_pre_hooks)


def hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has forward hooks, which a fused call would bypass (a loop, not
    ``any()`` over a generator: this runs on every eager eval call)."""
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    return False


def bn_relu(bn: nn.Module, act: nn.Module, x: Tensor) -> Tensor:
    """``act(bn(x))``. A plain eval BatchNorm is applied functionally: ``nn.BatchNorm2d.
    __call__`` costs about as much again as the normalisation itself on the small maps of a
    CIFAR network (docs/benchmarks.md 6.2)."""
    if not plain_eval_bn(bn):
        return act(bn(x))  # (B, C, H, W)
    y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return y.relu_()  # (B, C, H, W)


def native_bn_relu_train(bn: nn.BatchNorm2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """The training BN-ReLU of x (B, C, H, W) and the per-plane sums of its output (the gate's
    pooling) in one native call, with the BN's running statistics updated as
    ``nn.BatchNorm2d`` does. The caller checked ``native_bn_relu_applies``."""
    y, sums, mean, var = BatchNormReLU.apply(x, bn.weight, bn.bias, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return y, sums  # (B, C, H, W), (B, C)


def native_bn_relu_applies(bn: nn.Module, act: nn.Module, x: Tensor) -> TypeGuard[nn.BatchNorm2d]:
    """Whether ``native_bn_relu_train`` computes ``act(bn(x))``: a plain training BatchNorm2d
    and ReLU, and more than one value per channel (torch's BN then raises its own error). The
    caller checks hooks and that the step may run natively (``native.trains``)."""
    plain = type(bn) is nn.BatchNorm2d and type(act) is nn.ReLU and bn.training
    return plain and x.numel() > x.shape[1]


class BatchNormReLU(torch.autograd.Function):
    """Training BatchNorm2d (batch statistics) + ReLU, and the per-plane sums of the output,
    in one native pass (``native.bn_relu_train``); backward in two (the BN's and ReLU's
    gradients, and the sums'). Outputs (y, sums, mean, biased var); the last two, for the
    running statistics, are not differentiable. CPU float32 only (the caller checks)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y, sums, mean, var = native.bn_relu_train(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, torch.rsqrt(var + eps), weight, bias)
        ctx.mark_non_differentiable(mean, var)
        return y, sums, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_y: Tensor, grad_sums: Tensor, _grad_mean: Tensor, _grad_var: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        x, mean, invstd, weight, bias = ctx.saved_tensors
        args = (grad_y, grad_sums, x, mean, invstd, weight, bias)
        grad_x, weight_grad, bias_grad = native.bn_relu_train_backward(*args)
        grad_w = weight_grad if ctx.needs_input_grad[1] else None
        grad_b = bias_grad if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training forward: the momentum (or,
    for momentum None, cumulative) average of the batch mean and unbiased variance."""
    count, running_mean, running_var = bn.num_batches_tracked, bn.running_mean, bn.running_var
    assert count is not None and running_mean is not None and running_var is not None  # tracked
    with torch.no_grad():
        count.add_(1)
        f = 1.0 / float(count) if bn.momentum is None else bn.momentum
        running_mean.mul_(1.0 - f).add_(mean, alpha=f)
        running_var.mul_(1.0 - f).add_(var, alpha=f * n / max(n - 1, 1))
