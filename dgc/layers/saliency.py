"""DGC's saliency generators and the selection of the kept channels from their output.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV 2020
(arXiv 2007.04242); docs/methods.md 1.1 and 1.2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

SALIENCY_MODES = ("scale", "mask")


class SaliencyGate(nn.Module):
    """One SE-like saliency generator per head, evaluated for all heads in one pass.

    Head i computes ``S_i = ReLU(fc2_i(ReLU(fc1_i(z))))`` with ``fc1_i: C -> C//s'`` (no bias)
    and ``fc2_i: C//s' -> C`` (bias). fc2's bias starts at 1 so that every channel starts with a
    saliency of about 1: the gate is then close to the identity and pruning begins from an
    unbiased ranking rather than from a random one.

    Args:
        channels: input channels C.
        heads: number of heads h.
        hidden: hidden width r = C // s'.
        init_scale: fc2's initial weights are Kaiming's times this (1: the paper's; below 1
            the untrained saliencies spread less about 1).
    """

    def __init__(self, channels: int, heads: int, hidden: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.channels, self.heads, self.hidden = channels, heads, hidden
        self.init_scale = init_scale
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, channels))
        self.fc2_weight = nn.Parameter(torch.empty(heads, channels, hidden))
        self.fc2_bias = nn.Parameter(torch.empty(heads, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-normal with fan_in, as nn.init.kaiming_normal_ does for each head's Linear.
        nn.init.normal_(self.fc1_weight, 0.0, math.sqrt(2.0 / self.channels))
        nn.init.normal_(self.fc2_weight, 0.0, self.init_scale * math.sqrt(2.0 / self.hidden))
        nn.init.constant_(self.fc2_bias, 1.0)

    def forward(self, z: Tensor, scale: float = 1.0) -> Tensor:
        # z: (B, C), ``scale * z`` the globally pooled activations (means, or sums with
        # scale 1/HW: a sum is one op where a mean is two). As ReLU is positively homogeneous,
        # fc1 and its ReLU see z and the scale enters fc2's product: the same saliencies.
        # matmul/baddbmm, not einsum: at batch 1 the generator is all overhead, and einsum adds
        # its own on every call.
        hid = torch.matmul(self.fc1_weight, z.t()).relu()  # (h, r, B)
        if scale == 1.0:  # no alpha: its backward would scale both products' gradients
            sal = torch.baddbmm(self.fc2_bias.unsqueeze(-1), self.fc2_weight, hid)
        else:
            sal = torch.baddbmm(self.fc2_bias.unsqueeze(-1), self.fc2_weight, hid, alpha=scale)
        return sal.relu().permute(2, 0, 1)  # (B, h, C), non-negative


def saliencies(gate: SaliencyGate, x: Tensor) -> Tensor:
    """The generators' saliencies (B, h, C) of x (B, C, H, W). Under autocast they and the
    selection stay float32: bf16 matmuls round differently and the bottom-k would then zero
    extra channels on ties the float32 network does not have (issue #8)."""
    device = x.device.type
    if x.is_meta or not torch.is_autocast_enabled(device):
        return gate(x.mean(dim=(2, 3)))  # (B, h, C)
    with torch.autocast(device, enabled=False):
        return gate(x.float().mean(dim=(2, 3)))  # (B, h, C), float32


def deactivate_bottom_k(saliency: Tensor, n_inactive: int) -> Tensor:
    """Zero every saliency at or below the n-th smallest of its head, per sample.

    Ties at the threshold (notably the exact zeros the final ReLU produces) are all removed, so
    at least ``n_inactive`` channels go. The threshold comes from a detached copy; gradients
    reach the generator only through the kept entries.

    Args:
        saliency: (B, h, C) non-negative saliencies.
        n_inactive: channels to deactivate per head, 0 <= n < C.
    """
    if n_inactive <= 0:
        return saliency
    detached = saliency.detach()
    threshold = detached.kthvalue(n_inactive, dim=-1, keepdim=True).values  # (B, h, 1)
    return saliency * (detached > threshold)  # (B, h, C)


def deactivate_bottom(saliency: Tensor, n_inactive: Tensor) -> Tensor:
    """``deactivate_bottom_k`` with n held in a tensor (the layer's ``inactive_channels``
    buffer): the same channels zeroed, but nothing depends on n's value on the host, so the
    shapes and the code are the same for every n (no host synchronisation, no recompilation
    as the schedule moves, a step that a CUDA graph can capture).

    The threshold is the n-th smallest saliency, read from the sorted saliencies with a -1
    in front (for n = 0, which keeps every channel: saliencies are non-negative).

    Args:
        saliency: (B, h, C) non-negative saliencies.
        n_inactive: a 0-dim integer tensor on the saliencies' device, 0 <= n < C.
    """
    detached = saliency.detach()
    b, h, _ = detached.shape
    lowest = F.pad(detached.sort(-1).values, (1, 0), value=-1.0)  # (B, h, C+1), ascending
    threshold = lowest.gather(-1, n_inactive.view(1, 1, 1).expand(b, h, 1))  # (B, h, 1)
    return saliency * (detached > threshold)  # (B, h, C)


def kept_scale(v: Tensor, mode: str) -> Tensor:
    """What a kept channel is multiplied by: its saliency ``v`` (``mode="scale"``, the paper),
    or 1 (``"mask"``); a pruned one (0) stays 0. The mask passes the gradient of ``v`` divided
    by the largest saliency of its head (straight-through): the forward no longer depends on
    the saliencies' scale, so a plain straight-through gradient let it grow until the
    generators overflowed (measured: non-finite gate outputs by epoch 9 of 30 on digits); the
    scaled one shrinks as the saliencies grow."""
    if mode == "scale":
        return v
    d = v.detach()
    top = d.amax(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, h, 1)
    return (v - d) / top + (d > 0).to(v.dtype)
