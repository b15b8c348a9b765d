"""CondenseNet-style DenseNet with injected 1x1 convolutions (DyDenseNet).

Huang et al., "CondenseNet" (arXiv 1711.09224) topology as used by Su et al. (arXiv
2007.04242): per-stage growth, bottleneck 1x1 conv (the replaceable one), BN-ReLU-3x3 group
conv, "fully dense" 2x2 average-pool transitions (no conv, no compression), no max-pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch import nn

from dgc.layers import native
from dgc.layers.conv import ConvLayer
from dgc.layers.conv import StageValue
from dgc.layers.conv import make_conv_factory
from dgc.layers.conv import pop_options
from dgc.layers.group_conv import PreactGroupConv2d
from dgc.layers.tracing import tracing
from dgc.models.common import init_weights
from dgc.registry import register_family


class DenseLayer(nn.Module):
    """[x, conv3x3_G(BN-ReLU(conv1x1(x)))]: appends ``growth`` channels."""

    def __init__(
        self,
        in_channels: int,
        growth: int,
        bottleneck: int,
        group_3x3: int,
        conv_layer: ConvLayer,
        stage: int,
        name: str,
    ) -> None:
        super().__init__()
        mid = bottleneck * growth
        self.growth = growth
        if mid % group_3x3 or growth % group_3x3:
            raise ValueError(
                f"{name}.conv2: group_3x3={group_3x3} must divide bottleneck*growth="
                f"{mid} and growth={growth}"
            )
        self.conv1 = conv_layer(
            in_channels, mid, 1, 1, 0, stage=stage, preact=True, name=f"{name}.conv1"
        )
        # BN-ReLU-conv3x3 with groups: nn.Sequential's modules, a native eval kernel
        self.conv2 = PreactGroupConv2d(mid, growth, 3, 1, 1, groups=group_3x3)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        new = self.conv2(self.conv1(x))  # (B, growth, H, W)
        return torch.cat([x, new], dim=1)  # (B, C + growth, H, W)

    def grow(self, features: Tensor, c: int) -> None:
        """The forward without its concatenation, in eval without grad: writes the new
        channels of ``features[:, :c]`` into ``features[:, c:c+growth]``."""
        new = self.conv1(features[:, :c])  # (B, bottleneck*growth, H, W)
        self.conv2.forward_into(new, features[:, c : c + self.growth])


class DenseNet(nn.Module):
    """Generic CondenseNet-style DenseNet.

    Args:
        stages: dense layers per stage.
        growth: growth rate per stage.
        conv_layer: factory of the 1x1 convolutions (see ``dgc.layers.conv``).
        bottleneck: 1x1 output width as a multiple of the growth.
        group_3x3: groups of the 3x3 convolution.
        num_classes: classifier outputs.
        in_chans: input channels.
        stem_stride: 1 for CIFAR, 2 for ImageNet.
    """

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        conv_layer: ConvLayer,
        bottleneck: int = 4,
        group_3x3: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        channels = 2 * growth[0]
        self.num_stages = len(stages)
        self.stem = nn.Conv2d(in_chans, channels, 3, stem_stride, 1, bias=False)
        blocks: list[nn.Module] = []
        for i, (depth, k) in enumerate(zip(stages, growth)):
            if i > 0:
                blocks.append(nn.AvgPool2d(2, 2))  # transition: pool only, channels kept
            for j in range(depth):
                blocks.append(
                    DenseLayer(
                        channels + j * k,
                        k,
                        bottleneck,
                        group_3x3,
                        conv_layer,
                        i,
                        f"features.{len(blocks)}",
                    )
                )
            channels += depth * k
        self.features = nn.Sequential(*blocks)
        self.num_classes, self.num_features = num_classes, channels
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)
        nn.init.zeros_(self.classifier.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        # x: (B, in_chans, H, W)
        x = self.stem(x)  # (B, 2*growth[0], H/r, W/r)
        if self.training or torch.is_grad_enabled() or self._hooked():
            return self.features(x)  # (B, num_features, H/r, W/r)
        if torch.compiler.is_compiling():  # torch.export, torch.compile: functional graphs
            return self.features(x)
        return self._features_in_place(x)  # (B, num_features, H/r, W/r)

    def _features_in_place(self, x: Tensor) -> Tensor:
        """``self.features(x)`` in eval without grad, each stage's dense layers writing their
        new channels into one (B, C_out, H, W) tensor: the concatenations copied every earlier
        feature map again at every layer (docs/benchmarks.md 6.1, fifth round).
        A TorchScript trace records it as it runs (slices and copies); ``torch.export``, which
        would turn each in-place write into a copy of the whole tensor, records the
        concatenations (``forward_features``)."""
        modules = list(self.features)
        i = 0
        while i < len(modules):
            stage = _dense_run(modules, i)
            if not stage:
                x = _transition(modules[i], x)  # (B, C, H/2, W/2)
                i += 1
                continue
            b, c, h, w = x.shape
            features = x.new_empty(b, c + sum(layer.growth for layer in stage), h, w)
            features[:, :c] = x
            for layer in stage:
                layer.grow(features, c)
                c += layer.growth
            x = features  # (B, C_out, H, W)
            i += len(stage)
        return x

    def _hooked(self) -> bool:
        """Hooks on the modules whose calls ``_features_in_place`` bypasses."""
        bypassed = [self.features, *self.features]
        bypassed += [m.conv2 for m in self.features if isinstance(m, DenseLayer)]
        return any(m._forward_hooks or m._forward_pre_hooks for m in bypassed)

    def forward_head(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.norm(x)))  # (B, num_features, 1, 1)
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _dense_run(modules: list[nn.Module], i: int) -> list[DenseLayer]:
    """The dense layers from ``modules[i]`` up to the next transition (none if it is one)."""
    stage = []
    for m in modules[i:]:
        if not isinstance(m, DenseLayer):
            break
        stage.append(m)
    return stage


def _transition(pool: nn.Module, x: Tensor) -> Tensor:
    """A transition in eval without grad (``_features_in_place``, which checked the hooks): the
    native 2x2 average pool, equal to torch's to the bit and 3-7x faster on a CPU
    DenseNet-86's maps (torch's NCHW pool: 7.9 ms at batch 64, docs/benchmarks.md 6.1),
    where it applies; else the module."""
    plain = type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2))
    plain = plain and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
    plain = plain and not pool.ceil_mode and pool.divisor_override is None
    if plain and not tracing() and native.pool_supported(x):
        return native.avg_pool2(x)  # (B, C, H/2, W/2)
    return pool(x)  # (B, C, H/2, W/2)


def _densenet(
    kind: str,
    stages: Sequence[int],
    growth: Sequence[int],
    stem_stride: int,
    heads: StageValue = 4,
    gate_factor: StageValue = 0.25,
    squeeze_rate: StageValue = 16,
    **kwargs: Any,
) -> DenseNet:
    options = pop_options(kwargs)
    conv = make_conv_factory(kind, len(stages), heads, gate_factor, squeeze_rate, **options)
    return DenseNet(stages, growth, conv, stem_stride=stem_stride, **kwargs)


@register_family("densenet86")
def densenet86(kind: str, **kwargs: Any) -> DenseNet:
    """CIFAR DenseNet-86 (stages 14-14-14, growth 8-16-32); DGC variant = DyDenseNet-86."""
    kwargs.setdefault("num_classes", 10)
    return _densenet(kind, (14, 14, 14), (8, 16, 32), 1, **kwargs)


@register_family("densenet74")
def densenet74(kind: str, **kwargs: Any) -> DenseNet:
    """ImageNet DenseNet-74 (CondenseNet-74 topology, stages 4-6-8-10-8, growth 8-...-128)."""
    return _densenet(kind, (4, 6, 8, 10, 8), (8, 16, 32, 64, 128), 2, **kwargs)
