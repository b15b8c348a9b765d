"""ResNet with injected convolutions: ImageNet ResNet-18/34/50 and CIFAR ResNet-8/20/32/56.

He et al., "Deep Residual Learning for Image Recognition" (arXiv 1512.03385); the DGC variant
follows Su et al. (arXiv 2007.04242), ``dyresnet18``: every 3x3 block conv and every 1x1
downsample conv is replaceable; the stem and the classifier stay dense. A DGC layer brings its
own BN-ReLU, so a DGC block normalises twice before each conv, as in the authors' network.
ResNet-50 is torchvision's v1.5 bottleneck network (stride on the 3x3 conv), SG-CNN's baseline;
all three convs of a bottleneck and its 1x1 downsample conv are replaceable (SG-CNN leaves the
downsample dense, as its release does). ``width_mult`` scales every stage width (DyNet's thinner
backbones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch import nn

from dgc.layers.conv import ConvLayer
from dgc.layers.conv import StageValue
from dgc.layers.conv import make_conv_factory
from dgc.layers.conv import pop_options
from dgc.layers.fused_eval import FusesEpilogue
from dgc.models.common import init_weights
from dgc.registry import register_family


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        conv_layer: ConvLayer,
        stage: int,
        name: str,
    ) -> None:
        super().__init__()
        self.conv1 = conv_layer(
            in_channels, planes, 3, stride, 1, stage=stage, preact=False, name=f"{name}.conv1"
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(
            planes, planes, 3, 1, 1, stage=stage, preact=False, name=f"{name}.conv2"
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(
                conv_layer(
                    in_channels,
                    planes,
                    1,
                    stride,
                    0,
                    stage=stage,
                    preact=False,
                    name=f"{name}.downsample.0",
                    shortcut=True,
                ),
                nn.BatchNorm2d(planes),
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W)
        shortcut = _shortcut(self.downsample, x)  # (B, P, H/s, W/s)
        out = conv_bn(self.conv1, self.bn1, x, self.act1)  # (B, P, H/s, W/s)
        return conv_bn(self.conv2, self.bn2, out, self.act2, shortcut)  # (B, P, H/s, W/s)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN plus shortcut, then ReLU;
    ``planes * 4`` output channels."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        conv_layer: ConvLayer,
        stage: int,
        name: str,
    ) -> None:
        super().__init__()
        out = planes * self.expansion

        def conv(
            cin: int, cout: int, k: int, s: int, part: str, shortcut: bool = False
        ) -> nn.Module:
            return conv_layer(cin, cout, k, s, k // 2, stage=stage, preact=False,
                              name=f"{name}.{part}", shortcut=shortcut)  # fmt: skip

        self.conv1, self.bn1 = conv(in_channels, planes, 1, 1, "conv1"), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride, "conv2"), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, out, 1, 1, "conv3"), nn.BatchNorm2d(out)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                conv(in_channels, out, 1, stride, "downsample.0", shortcut=True),
                nn.BatchNorm2d(out),
            )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W)
        shortcut = _shortcut(self.downsample, x)  # (B, 4P, H/s, W/s)
        out = conv_bn(self.conv1, self.bn1, x, self.act)  # (B, P, H, W)
        out = conv_bn(self.conv2, self.bn2, out, self.act)  # (B, P, H/s, W/s)
        return conv_bn(self.conv3, self.bn3, out, self.act, shortcut)  # (B, 4P, H/s, W/s)


def conv_bn(
    conv: nn.Module,
    bn: nn.Module,
    x: Tensor,
    act: nn.Module | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(bn(conv(x)) + residual)`` (``act``, ``residual`` None: left out). A conv that
    ``FusesEpilogue`` (a DGC layer in eval without grad) may run it all as one native call;
    every other conv, and a DGC layer where that does not apply, module by module."""
    if isinstance(conv, FusesEpilogue):
        y = conv.forward_epilogue(x, bn, act, residual)  # (B, O, H', W') or None
        if y is not None:
            return y
    y = bn(conv(x))  # (B, O, H', W')
    if residual is not None:
        y = y + residual
    return y if act is None else act(y)


def _shortcut(downsample: nn.Sequential | None, x: Tensor) -> Tensor:
    """The block's shortcut: x, or its (conv, BN) downsample, whose conv may take the BN in
    (``conv_bn``) unless the Sequential itself has hooks, which calling its modules would skip."""
    if downsample is None:
        return x
    if downsample._forward_hooks or downsample._forward_pre_hooks:
        return downsample(x)
    return conv_bn(downsample[0], downsample[1], x)


class ResNet(nn.Module):
    """Generic ResNet over BasicBlocks or Bottlenecks.

    Args:
        layers: blocks per stage.
        widths: planes per stage (a Bottleneck outputs 4x its planes).
        conv_layer: factory of the replaceable convolutions (see ``dgc.layers.conv``).
        num_classes: classifier outputs.
        in_chans: input channels.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv).
        block: "basic" or "bottleneck".
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        conv_layer: ConvLayer,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        block: str = "basic",
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block={block!r} is unknown; choose one of {sorted(BLOCKS)}")
        block_cls = BLOCKS[block]
        expansion = getattr(block_cls, "expansion", 1)
        self.num_classes, self.num_features = num_classes, widths[-1] * expansion
        self.num_stages = len(layers)
        self.stem = _make_stem(stem, in_chans, widths[0])
        stages, channels = [], widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = [
                block_cls(
                    channels if j == 0 else width * expansion,
                    width,
                    1 if (i == 0 or j > 0) else 2,
                    conv_layer,
                    i,
                    f"stages.{i}.{j}",
                )
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            channels = width * expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        # x: (B, in_chans, H, W)
        return self.stages(self.stem(x))  # (B, num_features, H/r, W/r)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class ImageNetStem(nn.Sequential):
    """The 7x7/2 conv, BN, ReLU and 3x3/2 max-pool, run in channels-last layout on a CPU tensor
    in eval mode.

    oneDNN's 7x7 convolution over 3 input channels and PyTorch's CPU max-pool are both much
    faster in channels-last layout: the stem runs about 1.7-2.4x faster on 2 CPU threads at
    batch 1 and 8 (``bench/dgc_profile.py stem``, docs/benchmarks.md 6.1). The stem is the
    same in every variant, so in NCHW it capped every dense/DGC ratio of issue #7.
    Training keeps NCHW (the max-pool backward is no faster in channels-last). Eval with grad
    enabled (torch.export, which MLflow logs with) takes the channels-last path too, so the
    exported program records it. The output is NCHW again, for the convolutions that follow;
    values agree to float rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, 3, H, W)
        if x.device.type != "cpu" or x.dim() != 4 or self.training:
            return super().forward(x)  # (B, C, H/4, W/4)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))  # (B, C, H/4, W/4)
        return y.contiguous()  # (B, C, H/4, W/4), NCHW


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _make_stem(kind: str, in_chans: int, width: int) -> nn.Sequential:
    if kind == "imagenet":
        return ImageNetStem(
            nn.Conv2d(in_chans, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    if kind == "cifar":
        return nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
    raise ValueError(f"stem={kind!r} is unknown; choose 'imagenet' or 'cifar'")


def _resnet(
    kind: str,
    layers: Sequence[int],
    widths: Sequence[int],
    stem: str,
    default_gate: float,
    heads: StageValue = 4,
    gate_factor: StageValue | None = None,
    squeeze_rate: StageValue = 16,
    width_mult: float = 1.0,
    **kwargs: Any,
) -> ResNet:
    if gate_factor is None:
        # The paper's DyResNet-18 keeps 45%; a static group conv needs 1/G, so it defaults to 1/2.
        gate_factor = default_gate if kind == "dynamic" else 0.5
    if not 0.0 < width_mult <= 8.0:
        raise ValueError(f"width_mult={width_mult!r} must be in (0, 8]")
    widths = [max(1, round(w * width_mult)) for w in widths]
    options = pop_options(kwargs)
    conv = make_conv_factory(kind, len(layers), heads, gate_factor, squeeze_rate, **options)
    return ResNet(layers, widths, conv, stem=stem, **kwargs)


IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


@register_family("resnet18")
def resnet18(kind: str, **kwargs: Any) -> ResNet:
    """ImageNet ResNet-18; DGC variant as the paper's (heads 4, gate 0.45, squeeze 16)."""
    return _resnet(kind, (2, 2, 2, 2), IMAGENET_WIDTHS, "imagenet", 0.45, **kwargs)


@register_family("resnet34")
def resnet34(kind: str, **kwargs: Any) -> ResNet:
    """ImageNet ResNet-34."""
    return _resnet(kind, (3, 4, 6, 3), IMAGENET_WIDTHS, "imagenet", 0.45, **kwargs)


@register_family("resnet50")
def resnet50(kind: str, **kwargs: Any) -> ResNet:
    """ImageNet ResNet-50 (bottlenecks, torchvision v1.5): SG-CNN's ImageNet baseline,
    4.09 G MACs and 25.55 M parameters by its counter (``count_cost(rules="sgcnn")``)."""
    return _resnet(kind, (3, 4, 6, 3), IMAGENET_WIDTHS, "imagenet", 0.45, block="bottleneck",
                   **kwargs)  # fmt: skip


def _cifar_resnet(kind: str, depth: int, **kwargs: Any) -> ResNet:
    n = (depth - 2) // 6
    kwargs.setdefault("num_classes", 10)
    return _resnet(
        kind,
        (n, n, n),
        kwargs.pop("widths", CIFAR_WIDTHS),
        "cifar",
        0.5,
        **kwargs,
    )


@register_family("resnet8")
def resnet8(kind: str, **kwargs: Any) -> ResNet:
    """CIFAR-style ResNet-8 (one block per stage): the quick, small-data network."""
    return _cifar_resnet(kind, 8, **kwargs)


@register_family("resnet20")
def resnet20(kind: str, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-20 (16-32-64 widths, 1x1 projection shortcuts)."""
    return _cifar_resnet(kind, 20, **kwargs)


@register_family("resnet32")
def resnet32(kind: str, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-32."""
    return _cifar_resnet(kind, 32, **kwargs)


@register_family("resnet56")
def resnet56(kind: str, **kwargs: Any) -> ResNet:
    """CIFAR ResNet-56."""
    return _cifar_resnet(kind, 56, **kwargs)
