"""Dynamic convolution kernels (DyNet).

Zhang, Zhang, Wang, Zhong, "DyNet: Dynamic Convolution for Accelerating Convolutional Neural
Networks", arXiv 2004.10694; spec: docs/methods.md 3. No official code exists, and
docs/methods.md 3.2 marks the mechanism [unverified]. What is built here, with the simplest
reading of each unverified detail made a setting:

* Each output channel o gets a kernel fused per sample from ``kernels`` (g_t) fixed kernels,
  ``w_o(x) = sum_j eta_oj(x) W_(o*g_t+j)``, with coefficients predicted per output channel from
  the globally pooled input: ``eta = sigmoid(FC(GAP(x)))``, one FC (``hidden=0``, the simplest
  reading; ``hidden=r`` inserts an FC-ReLU of width r), sigmoid (``coefficient="sigmoid"``;
  ``"softmax"`` normalises over the g_t kernels instead, as DY-CNN does).
* FLOPs fall because the network around the layer is thinner (the recipes' ``width_mult``), not
  because of the layer itself.
* Training path (``_mixed``): convolve with all g_t kernels, then mix the output maps with eta.
  Inference path (``_fused``): fuse the kernels per sample first, then one conv with the batch
  folded into the groups (the CondConv trick). The two are equal; eval picks the faster one per
  shape.
* The cost counts everything the inference path does per sample (the paper may not): pooling,
  the coefficient FC(s) and activations, the kernel fusion and the conv.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.tracing import tracing

COEFFICIENTS = ("sigmoid", "softmax")


class DynamicKernelConv2d(nn.Module):
    """Convolution whose kernel is fused per sample from ``kernels`` fixed kernels (DyNet).

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as ``nn.Conv2d`` (no bias).
        kernels: fixed kernels g_t per output channel.
        hidden: 0 for one FC C_in -> C_out*g_t; r > 0 for FC C_in -> r, ReLU, FC r -> C_out*g_t.
        coefficient: "sigmoid" (per coefficient) or "softmax" (over each channel's g_t kernels).
        name: the layer's name in its network (errors).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        kernels: int = 4,
        hidden: int = 0,
        coefficient: str = "sigmoid",
        name: str = "",
    ) -> None:
        super().__init__()
        _validate(name, kernels, hidden, coefficient)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.kernels, self.hidden, self.coefficient = kernels, hidden, coefficient
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels * kernels, in_channels, k, k))
        width = hidden or in_channels
        self.reduce = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU()) if hidden else None
        self.coeff = nn.Linear(width, out_channels * kernels)
        self.choice = KernelChoice()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He fan_out for the fused kernel: at the start eta ~ 1/2 (sigmoid) or 1/g (softmax),
        # so each fixed kernel is scaled for the fused sum to have the dense conv's variance.
        fan_out = self.kernel_size**2 * self.out_channels
        eta = 0.5 if self.coefficient == "sigmoid" else 1.0 / self.kernels
        std = math.sqrt(2.0 / fan_out) / (eta * math.sqrt(self.kernels))
        nn.init.normal_(self.weight, 0.0, std)
        nn.init.zeros_(self.coeff.bias)

    def coefficients(self, x: Tensor) -> Tensor:
        """eta: (B, O, g_t), from the pooled input, in float32 (under autocast too)."""
        z = x.float().mean((2, 3))  # (B, C)
        plain = x.device.type in ("cpu", "cuda")  # no autocast on the meta device (costing)
        with torch.autocast(x.device.type, enabled=False) if plain else contextlib.nullcontext():
            if self.reduce is not None:
                z = self.reduce(z)  # (B, r)
            logits = self.coeff(z).view(-1, self.out_channels, self.kernels)  # (B, O, g_t)
            return logits.sigmoid() if self.coefficient == "sigmoid" else logits.softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        eta = self.coefficients(x).to(x.dtype)  # (B, O, g_t)
        # A trace records _mixed: _fused's batch-folded groups would be fixed at the traced batch
        if self.training or torch.is_grad_enabled() or tracing():
            return self._mixed(x, eta)  # (B, O, H', W')
        return self.choice.run(
            (tuple(x.shape), x.dtype, x.device.type),
            {"mixed": lambda: self._mixed(x, eta), "fused": lambda: self._fused(x, eta)},
            "fused",
        )

    def _mixed(self, x: Tensor, eta: Tensor) -> Tensor:
        """All fixed kernels convolved, their output maps mixed by eta (training path)."""
        y = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)  # (B, O*g, ..)
        y = y.view(y.shape[0], self.out_channels, self.kernels, *y.shape[-2:])  # (B, O, g, H', W')
        return torch.einsum("bogij,bog->boij", y, eta)  # (B, O, H', W')

    def _fused(self, x: Tensor, eta: Tensor) -> Tensor:
        """Kernels fused per sample, then one conv with the batch folded into the groups."""
        b, c, h, w = x.shape
        k = self.kernel_size
        bank = self.weight.to(x.dtype).view(self.out_channels, self.kernels, c * k * k)
        fused = torch.einsum("bog,ogf->bof", eta, bank)  # (B, O, C*k*k)
        y = F.conv2d(
            x.reshape(1, b * c, h, w),
            fused.reshape(b * self.out_channels, c, k, k),
            None,
            self.stride,
            self.padding,
            groups=b,
        )  # (1, B*O, H', W')
        return y.view(b, self.out_channels, *y.shape[-2:])  # (B, O, H', W')

    def cost_macs(self, in_hw: int, out_hw: int) -> float:
        """Per sample: pooling C*HW, coefficient FC(s) with bias and activations, fusion
        g_t*O*C*k^2, and the conv O*C*k^2*H'W'."""
        c, o, g, k2 = self.in_channels, self.out_channels, self.kernels, self.kernel_size**2
        pool = c * in_hw
        width = self.hidden or c
        reduce = (c * self.hidden + self.hidden + self.hidden) if self.hidden else 0
        predict = width * o * g + o * g + o * g  # FC, bias, sigmoid/softmax per coefficient
        fusion = g * o * c * k2
        return pool + reduce + predict + fusion + o * c * k2 * out_hw

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, kernels={self.kernels}, "
            f"hidden={self.hidden}, coefficient={self.coefficient}"
        )


def _validate(name: str, kernels: int, hidden: int, coefficient: str) -> None:
    if kernels < 1:
        raise ValueError(f"{name}: kernels={kernels!r} must be at least 1")
    if hidden < 0:
        raise ValueError(f"{name}: coeff_hidden={hidden!r} must be 0 (one FC) or a width >= 1")
    if coefficient not in COEFFICIENTS:
        raise ValueError(f"{name}: coefficient={coefficient!r} is unknown; choose {COEFFICIENTS}")
