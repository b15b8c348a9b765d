"""Gradual channel-deactivation schedule of Dynamic Group Convolution.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020 (arXiv 2007.04242), section on gradual deactivation; spec: docs/methods.md 1.3.

The paper's breakpoints (warm-up to 1/12 of the run, ramp to 3/4) are the default. A
``GateSchedule`` moves them, so that a short run can finish the ramp early and fine-tune at the
target sparsity (and an early-stopping rung can compare pruned networks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUP_END = 1.0 / 12.0
RAMP_END = 3.0 / 4.0


@dataclass(frozen=True)
class GateSchedule:
    """Breakpoints of the deactivation ramp, as fractions of all training iterations.

    Nothing is pruned up to ``warmup_end``; the number of inactive channels then grows
    linearly and reaches the target at ``ramp_end``; the rest of the run fine-tunes.
    """

    warmup_end: float = WARMUP_END
    ramp_end: float = RAMP_END

    def __post_init__(self) -> None:
        w, r = self.warmup_end, self.ramp_end
        if not (math.isfinite(w) and math.isfinite(r) and 0.0 <= w <= r <= 1.0):
            raise ValueError(
                f"gate schedule warmup_end={w!r}, ramp_end={r!r}: need "
                "0 <= warmup_end <= ramp_end <= 1 (fractions of the run)"
            )

    @property
    def is_paper(self) -> bool:
        return (self.warmup_end, self.ramp_end) == (WARMUP_END, RAMP_END)


PAPER = GateSchedule()


def target_inactive_channels(in_channels: int, gate_factor: float) -> int:
    """Number of input channels a DGC head deactivates at the end of the ramp.

    Args:
        in_channels: input channels C of the layer.
        gate_factor: kept fraction g of the input channels, in (0, 1].
    """
    # Python's round is round-half-to-even, exactly as the reference code rounds.
    return round(in_channels * (1.0 - gate_factor))


def inactive_channels(
    progress: float, in_channels: int, gate_factor: float, schedule: GateSchedule = PAPER
) -> int:
    """Number of deactivated input channels at training progress ``progress``.

    Piecewise linear: nothing is pruned during the warm-up (p <= 1/12) so the saliency
    generators learn from the full input first; the count then grows linearly and reaches
    C*(1-g) at p = 3/4 (1.5 * (3/4 - 1/12) = 1), leaving the last quarter of training to
    fine-tune at the target sparsity. ``schedule`` moves the two breakpoints; with the paper's
    it computes exactly the reference code's expression.

    Args:
        progress: fraction of training done, iteration-exact, in [0, 1].
        in_channels: input channels C of the layer.
        gate_factor: kept fraction g of the input channels.
        schedule: the breakpoints (default: the paper's 1/12 and 3/4).
    """
    w, r = schedule.warmup_end, schedule.ramp_end
    if progress >= r:  # before the warm-up test: an empty ramp (w == r) prunes at once
        return target_inactive_channels(in_channels, gate_factor)
    if progress <= w:
        return 0
    if schedule.is_paper:  # the reference code's expression, bit for bit
        return round(in_channels * (1.0 - gate_factor) * 1.5 * (progress - WARMUP_END))
    return round(in_channels * (1.0 - gate_factor) * (progress - w) / (r - w))
