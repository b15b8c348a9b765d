"""Networks; importing this module registers every recipe."""

from __future__ import annotations

from dgc.models.densenet import DenseNet
from dgc.models.resnet import ResNet

__all__ = ["DenseNet", "ResNet"]
