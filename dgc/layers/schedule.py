"""Gradual channel-deactivation schedule of Dynamic Group Convolution.

Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks",
ECCV 2020 (arXiv 2007.04242), section on gradual deactivation; spec: methods.md 1.3.
"""

from __future__ import annotations

WARMUP_END = 1.0 / 12.0
RAMP_END = 3.0 / 4.0


def target_inactive_channels(in_channels: int, gate_factor: float) -> int:
    """Number of input channels a DGC head deactivates at the end of the ramp.

    Args:
        in_channels: input channels C of the layer.
        gate_factor: kept fraction g of the input channels, in (0, 1].
    """
    # Python's round is round-half-to-even, exactly as the reference code rounds.
    return round(in_channels * (1.0 - gate_factor))


def inactive_channels(progress: float, in_channels: int, gate_factor: float) -> int:
    """Number of deactivated input channels at training progress ``progress``.

    Piecewise linear: nothing is pruned during the warm-up (p <= 1/12) so the saliency
    generators learn from the full input first; the count then grows linearly and reaches
    C*(1-g) at p = 3/4 (1.5 * (3/4 - 1/12) = 1), leaving the last quarter of training to
    fine-tune at the target sparsity.

    Args:
        progress: fraction of training done, iteration-exact, in [0, 1].
        in_channels: input channels C of the layer.
        gate_factor: kept fraction g of the input channels.
    """
    if progress <= WARMUP_END:
        return 0
    if progress >= RAMP_END:
        return target_inactive_channels(in_channels, gate_factor)
    return round(in_channels * (1.0 - gate_factor) * 1.5 * (progress - WARMUP_END))
