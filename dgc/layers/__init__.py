"""DGC layers, the injectable convolution factory and the deactivation schedule."""

from __future__ import annotations

from dgc.layers.conv import ConvFactory
from dgc.layers.conv import ConvLayer
from dgc.layers.conv import make_conv_factory
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.dynamic_group_conv import SaliencyGate
from dgc.layers.schedule import GateSchedule
from dgc.layers.schedule import inactive_channels

__all__ = [
    "ConvFactory",
    "ConvLayer",
    "DynamicGroupConv2d",
    "GateSchedule",
    "SaliencyGate",
    "inactive_channels",
    "make_conv_factory",
]
