"""The convolution injected into the networks: dense, static group, dynamic group (DGC),
self-grouping (SG-CNN) or dynamic kernels (DyNet).

A network asks its ``ConvFactory`` for every convolution it wants replaceable (DenseNet's 1x1
bottleneck convs; ResNet's 3x3 block convs and 1x1 downsample convs), passing the stage index
(so ``heads``, ``gate_factor`` and ``squeeze_rate`` may differ per stage), whether the network
wants a pre-activated conv (BN-ReLU-conv, DenseNet style) and the layer name (for errors).
Every operator is a kind here, so every network family gets all of them without new classes;
``SETTINGS`` says which settings each kind takes (DGC's are ignored by the other kinds, as
before; the SG-CNN and DyNet settings are refused by kinds that do not use them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol

from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.dynamic_kernel import DynamicKernelConv2d
from dgc.layers.self_grouping import SelfGroupingConv2d

CONV_KINDS = ("dense", "group", "dynamic", "selfgroup", "dynet")
#: the settings only one operator takes: refused by the other kinds
OWN_SETTINGS = {
    "selfgroup": ("compression", "sg_groups", "sg_steps", "group_mask"),
    "dynet": ("kernels", "coeff_hidden", "coefficient"),
}

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
    if isinstance(value, bool):
        raise TypeError(f"{field}={value!r} must be a number or one number per stage")
    if isinstance(value, (int, float)):
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
        gate_init: the scale of the saliency generators' initial fc2 weights relative to
            Kaiming's (1.0, the paper: untrained saliencies spread about 1 +- 0.7, some zero);
            small values (0.1) start every saliency near 1, so that an untrained gate neither
            scales nor zeroes the signal, while still ranking the channels.
        double_norm: a DGC layer in a block that already normalises its input (ResNet) adds
            its own BN-ReLU (paper: the input is normalised twice) or uses the block's only.
    """

    gate_shortcut: bool = True
    saliency: str = "scale"
    double_norm: bool = True
    gate_init: float = 1.0


@dataclass(frozen=True)
class OperatorSettings:
    """Settings of the SG-CNN and DyNet kinds (per stage where a tuple).

    Args:
        compression: SG-CNN target fraction of connections pruned per stage.
        sg_groups: SG-CNN k-means clusters per layer, per stage (the release: 16).
        sg_steps: SG-CNN self-grouping steps (None: one per 10 points of compression).
        group_mask: SG-CNN group connectivity rule, "common" or the release's "first".
        kernels: DyNet fixed kernels per output channel g_t, per stage.
        coeff_hidden: DyNet coefficient predictor hidden width (0: one FC).
        coefficient: DyNet coefficient activation, "sigmoid" or "softmax".
    """

    compression: tuple[float, ...]
    sg_groups: tuple[int, ...]
    kernels: tuple[int, ...]
    sg_steps: int | None = None
    group_mask: str = "common"
    coeff_hidden: int = 0
    coefficient: str = "sigmoid"


def pop_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the conv factory's keywords (``DgcOptions`` and the SG-CNN and DyNet settings) out
    of a recipe's keyword arguments."""
    names = (*DgcOptions.__dataclass_fields__, *OperatorSettings.__dataclass_fields__)
    return {k: kwargs.pop(k) for k in names if k in kwargs}


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
    operators: OperatorSettings | None = None

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
        if self.kind in OWN_SETTINGS and not shortcut:
            conv = self._operator(in_channels, out_channels, kernel_size, stride, padding,
                                  stage, name)  # fmt: skip
            return _preactivated(conv, in_channels) if preact else conv
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
                gate_init=o.gate_init,
                name=name,
            )
        if self.kind != "group":  # dense, or the shortcut of an operator that leaves it dense
            groups = 1
        else:
            groups = _static_groups(name, in_channels, out_channels, self.gate_factor[stage])
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        )
        return _preactivated(conv, in_channels) if preact else conv

    def _operator(
        self, cin: int, cout: int, k: int, stride: int, padding: int, stage: int, name: str
    ) -> nn.Module:
        s = self.operators
        assert s is not None
        if self.kind == "selfgroup":
            return SelfGroupingConv2d(
                cin, cout, k, stride, padding, groups=s.sg_groups[stage],
                compression=s.compression[stage], steps=s.sg_steps, group_mask=s.group_mask,
                name=name,
            )  # fmt: skip
        return DynamicKernelConv2d(
            cin, cout, k, stride, padding, kernels=s.kernels[stage], hidden=s.coeff_hidden,
            coefficient=s.coefficient, name=name,
        )  # fmt: skip


def make_conv_factory(
    kind: str,
    num_stages: int,
    heads: StageValue = 4,
    gate_factor: StageValue = 0.25,
    squeeze_rate: StageValue = 16,
    gate_shortcut: bool = True,
    saliency: str = "scale",
    double_norm: bool = True,
    gate_init: float = 1.0,
    **operator: object,
) -> ConvFactory:
    """Validate the kind and expand per-stage settings into a ``ConvFactory``. The three
    ``DgcOptions`` are ignored by the kinds other than "dynamic"; ``operator`` holds the
    ``OperatorSettings`` keywords, refused by the kinds that do not use them.

    SG-CNN defaults: compression 0.5, 16 groups; DyNet: 4 kernels.
    """
    if kind not in CONV_KINDS:
        raise ValueError(f"conv kind={kind!r} is unknown; choose one of {CONV_KINDS}")
    allowed = OWN_SETTINGS.get(kind, ())
    foreign = sorted(k for k in operator if k not in allowed)
    if foreign:
        owner = {s: k for k, names in OWN_SETTINGS.items() for s in names}
        bad = foreign[0]
        if bad not in owner:
            raise TypeError(f"unexpected keyword argument {bad!r}")
        raise ValueError(
            f"{bad}={operator[bad]!r} is a setting of the {owner[bad]!r} operator (models "
            f"{KIND_PREFIX[owner[bad]]}...), but this model's operator is {kind!r}; remove it"
        )
    o = dict(operator)
    return ConvFactory(
        kind,
        per_stage("heads", heads, num_stages),
        per_stage("gate_factor", gate_factor, num_stages),
        per_stage("squeeze_rate", squeeze_rate, num_stages),
        DgcOptions(gate_shortcut, saliency, double_norm, gate_init),
        OperatorSettings(
            per_stage("compression", o.pop("compression", 0.5), num_stages),  # type: ignore[arg-type]
            per_stage("sg_groups", o.pop("sg_groups", 16), num_stages),  # type: ignore[arg-type]
            per_stage("kernels", o.pop("kernels", 4), num_stages),  # type: ignore[arg-type]
            **o,  # type: ignore[arg-type]
        ),
    )


def _preactivated(conv: nn.Module, in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True), conv)


KIND_PREFIX = {"dense": "", "dynamic": "dy", "group": "gc", "selfgroup": "sg", "dynet": "dn"}


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
