"""The convolution injected into the networks: dense, static group, or dynamic group.

A network asks its ``ConvFactory`` for every convolution it wants replaceable (DenseNet's 1x1
bottleneck convs; ResNet's 3x3 block convs and 1x1 downsample convs), passing the stage index
(so ``heads``, ``gate_factor`` and ``squeeze_rate`` may differ per stage), whether the network
wants a pre-activated conv (BN-ReLU-conv, DenseNet style) and the layer name (for errors).
Other operators (SG-CNN's learned groups, DyNet's dynamic kernels) plug in as new kinds here
without new network classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d

CONV_KINDS = ("dense", "group", "dynamic")

StageValue = float | int | Sequence[float] | Sequence[int]


class ConvLayer(Protocol):
    """What a network calls to build one of its replaceable convolutions."""

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        stage: int,
        preact: bool,
        name: str,
        shortcut: bool = False,
    ) -> nn.Module: ...


def per_stage(field: str, value: StageValue, num_stages: int) -> tuple:
    """Expand a scalar to one value per stage, or check a per-stage list has the right length."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * num_stages
    values = tuple(value)
    if len(values) != num_stages:
        raise ValueError(
            f"{field}={list(values)!r} has {len(values)} values but the network has "
            f"{num_stages} stages; give one value or one per stage"
        )
    return values


@dataclass(frozen=True)
class DgcOptions:
    """Design choices of the DGC networks, each defaulting to the paper (Su et al. 2020):

    Args:
        gate_shortcut: the 1x1 projection shortcuts are DGC layers too (paper) or dense.
        saliency: kept channels scaled by their saliency ("scale", paper) or a binary mask
            ("mask", straight-through gradient to the saliency generators).
        double_norm: a DGC layer in a block that already normalises its input (ResNet) adds
            its own BN-ReLU (paper: the input is normalised twice) or uses the block's only.
    """

    gate_shortcut: bool = True
    saliency: str = "scale"
    double_norm: bool = True


def pop_options(kwargs: dict[str, object]) -> dict[str, object]:
    """Take the ``DgcOptions`` keywords out of a recipe's keyword arguments."""
    return {k: kwargs.pop(k) for k in DgcOptions.__dataclass_fields__ if k in kwargs}


@dataclass(frozen=True)
class ConvFactory:
    """Builds the replaceable convolutions of a network.

    Args:
        kind: "dense" (nn.Conv2d), "group" (static group conv with groups = 1/gate_factor, the
            same MACs as DGC at that gate factor) or "dynamic" (DynamicGroupConv2d).
        heads, gate_factor, squeeze_rate: one value per stage (see ``per_stage``).
    """

    kind: str
    heads: tuple[int, ...]
    gate_factor: tuple[float, ...]
    squeeze_rate: tuple[int, ...]
    options: DgcOptions = DgcOptions()

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        stage: int,
        preact: bool,
        name: str,
        shortcut: bool = False,
    ) -> nn.Module:
        o = self.options
        if self.kind == "dynamic" and (o.gate_shortcut or not shortcut):
            return DynamicGroupConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                heads=self.heads[stage],
                squeeze_rate=self.squeeze_rate[stage],
                gate_factor=self.gate_factor[stage],
                saliency=o.saliency,
                norm=preact or o.double_norm,
                name=name,
            )
        if self.kind == "dynamic":  # an ungated shortcut: the dense conv
            return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        groups = (
            1
            if self.kind == "dense"
            else _static_groups(name, in_channels, out_channels, self.gate_factor[stage])
        )
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        if not preact:
            return conv
        return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True), conv)


def make_conv_factory(
    kind: str,
    num_stages: int,
    heads: StageValue = 4,
    gate_factor: StageValue = 0.25,
    squeeze_rate: StageValue = 16,
    gate_shortcut: bool = True,
    saliency: str = "scale",
    double_norm: bool = True,
) -> ConvFactory:
    """Validate the kind and expand per-stage settings into a ``ConvFactory``; the last three
    are ``DgcOptions`` (ignored by the dense and static group kinds)."""
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind={kind!r} is unknown; choose one of {CONV_KINDS}")
    return ConvFactory(
        kind,
        per_stage("heads", heads, num_stages),
        per_stage("gate_factor", gate_factor, num_stages),
        per_stage("squeeze_rate", squeeze_rate, num_stages),
        DgcOptions(gate_shortcut, saliency, double_norm),
    )


def _static_groups(name: str, cin: int, cout: int, gate_factor: float) -> int:
    if not 0.0 < gate_factor <= 1.0:
        raise ValueError(f"{name}: gate_factor={gate_factor!r} must be in (0, 1]")
    groups = round(1.0 / gate_factor)
    if not math.isclose(groups * gate_factor, 1.0, rel_tol=1e-6):
        raise ValueError(
            f"{name}: gate_factor={gate_factor!r} has no static group conv of equal "
            "MACs; it must be 1/G for an integer G (e.g. 0.5, 0.25, 0.125)"
        )
    if cin % groups or cout % groups:
        raise ValueError(
            f"{name}: groups={groups} (= 1/gate_factor) must divide in_channels={cin}"
            f" and out_channels={cout}"
        )
    return groups
