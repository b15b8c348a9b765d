"""Model-wide helpers the training loop calls: gate progress and the saliency L1 term."""

from __future__ import annotations

import torch
from torch import Tensor
from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.schedule import PAPER
from dgc.layers.schedule import GateSchedule
from dgc.layers.schedule import inactive_channels


def dgc_layers(model: nn.Module) -> list[DynamicGroupConv2d]:
    """All DGC layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, DynamicGroupConv2d)]


def set_progress(model: nn.Module, progress: float, schedule: GateSchedule = PAPER) -> None:
    """Write the scheduled number of inactive channels for training progress ``progress``
    (fraction of all iterations done) into every DGC layer's buffer; ``schedule`` holds the
    ramp's breakpoints (the paper's by default).

    Raises:
        ValueError: progress outside [0, 1].
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress!r} must be in [0, 1] (iterations done / total)")
    for layer in dgc_layers(model):
        layer.set_inactive(
            inactive_channels(progress, layer.in_channels, layer.gate_factor, schedule)
        )


def aux_loss(model: nn.Module) -> Tensor:
    """Sum over DGC layers of their last forward's saliency L1 term (0 if there is none).

    Multiply by the lasso weight (1e-5 in the paper) and add to the task loss.
    """
    terms = [m.last_saliency_loss for m in dgc_layers(model) if m.last_saliency_loss is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
