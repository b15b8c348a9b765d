"""Kept-channel kernels of the DGC layer: selection, gathers and the convolutions that execute
only the MACs the paper counts.

Every kernel here computes, per sample b and head i, ``conv(x[b, S_bi] * s_bi, W_i[:, S_bi])``
where ``S_bi`` are the K kept channels of head i and ``s_bi`` their saliencies, then interleaves
the heads' outputs (channel ``j*heads + i`` is output j of head i). They differ in how the work
is laid out:

* ``fold``: the batch folded into the groups of one conv2d (groups = B*heads), with per-sample
  kernels (timm's CondConv trick).
* ``unfold``: im2col of the kept channels and one batched matmul over (sample, head) pairs,
  reading the kernels through a transposed view (no copy of the gathered kernels). It wins
  where feature maps are small and kernels large (the last stages of an ImageNet network).
* ``bmm``: 1x1 convolutions as one batched matmul over (sample, head) pairs.

Gathers use ``index_select`` on rows (a contiguous copy per kept channel), much cheaper on CPU
than the expanded ``gather`` the layer used before (bench/dgc_before_after.py). Kernels read
the weight in a head-major row layout, ``(heads*C, O/heads*k*k)`` (see ``weight_rows``), so that
gathering a kept channel's kernel columns is one row copy.
"""

from __future__ import annotations

from typing import Optional
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def select_channels(sal: Tensor, n_inactive: int) -> tuple[Tensor, Tensor]:
    """Kept channels and their saliencies, with one top-k over (B, heads, C).

    Equal to zeroing every saliency at or below the ``n``-th smallest of its head (docs/methods.md
    1.1): the (K+1)-th largest value is that threshold, so kept entries equal to it (ties,
    notably exact zeros) get saliency 0 and contribute nothing.

    Args:
        sal: (B, h, C) non-negative saliencies.
        n_inactive: channels to deactivate per head, 0 <= n < C (0: every channel, in order,
            with its saliency).

    Returns:
        index (B, h, K) and scale (B, h, K), K = C - n. ``scale`` carries autograd to ``sal``.
    """
    if n_inactive == 0:
        index = torch.arange(sal.shape[-1], device=sal.device).expand(sal.shape)  # (B, h, C)
        return index, sal
    kept = sal.shape[-1] - n_inactive
    values, index = sal.topk(kept + 1, dim=-1, sorted=True)  # (B, h, K+1), descending
    top = values[..., :kept]  # (B, h, K); topk's values carry the gradient to ``sal``
    alive = top.detach() > values[..., kept:].detach()  # strict: ties at the threshold go
    return index[..., :kept], top * alive  # (B, h, K) each


def weight_rows(weight: Tensor, heads: int, taps_major: bool = False) -> Tensor:
    """(O, C, k, k) head kernels as rows: row ``i*C + c`` holds head i's kernels of input
    channel c, flattened as (O/h, k*k), or as (k*k, O/h) when ``taps_major`` (for ``unfold``)."""
    o, c, kh, kw = weight.shape
    w = weight.view(heads, o // heads, c, kh * kw).transpose(1, 2)  # (h, C, O/h, k^2)
    if taps_major:
        w = w.transpose(2, 3)  # (h, C, k^2, O/h)
    return w.reshape(heads * c, -1)  # (h*C, O/h*k^2)


def row_offsets(
    batch: int, heads: int, channels: int, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """What turns a kept-channel ``index`` (B, h, K) into row numbers: (B, 1, 1) sample offsets
    into a (B*C)-row input and (1, h, 1) head offsets into ``weight_rows``. A layer caches them
    per batch size in eager inference (two ``arange`` fewer per kernel call)."""
    sample = torch.arange(batch, device=device).mul_(channels).view(batch, 1, 1)
    head = torch.arange(heads, device=device).mul_(channels).view(1, heads, 1)
    return sample, head


def kept_rows(
    index: Tensor, channels: int, offsets: Optional[Tuple[Tensor, Tensor]] = None
) -> Tuple[Tensor, Tensor]:
    """Row numbers of the kept channels in the input (sample-major) and in ``weight_rows``
    (head-major): (B*h*K,) each."""
    if offsets is None:
        offsets = row_offsets(index.shape[0], index.shape[1], channels, index.device)
    return (index + offsets[0]).view(-1), (index + offsets[1]).view(-1)


def fold_conv(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    kernel_size: int,
    conv: Tuple[int, int, int],
    offsets: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Kept channels only, batch folded into the groups of one conv2d: (B, O, H', W').

    The saliency scales the smaller of the two operands: the kernels when a kept channel's
    kernel (O/h*k^2 values) is smaller than its feature map (H*W), else the inputs.
    """
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    per = rows.shape[1]  # O/h * k^2
    k2 = kernel_size * kernel_size
    o_h = per // k2
    x_rows, w_rows = kept_rows(index, c, offsets)  # (B*h*K,) each
    xg = x.reshape(b * c, -1).index_select(0, x_rows)  # (B*h*K, HW)
    wg = rows.index_select(0, w_rows).view(b, heads, kept, o_h, k2)  # (B, h, K, O/h, k^2)
    wg_t = wg.transpose(2, 3)  # (B, h, O/h, K, k^2), a view
    wk = torch.empty(
        b * heads * o_h, kept, kernel_size, kernel_size, dtype=x.dtype, device=x.device
    )
    wk.view(b, heads, o_h, kept, k2).copy_(wg_t)  # (B*O, K, k, k), the transpose
    if per < h * w:  # saliency on the (smaller) kernels
        wk.mul_(
            scale.view(b, heads, 1, kept, 1).expand(-1, -1, o_h, -1, -1).reshape(-1, kept, 1, 1)
        )
    else:  # saliency on the (smaller) inputs
        xg = xg * scale.reshape(-1, 1)
    stride, padding, dilation = conv
    y = F.conv2d(xg.view(1, -1, h, w), wk, None, stride, padding, dilation, b * heads)
    return interleave(y.view(b, heads * o_h, y.shape[2], y.shape[3]), heads)  # (B, O, H', W')


def unfold_conv(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    taps: Tensor,
    kernel_size: int,
    conv: Tuple[int, int, int],
    offsets: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """Kept channels only, as im2col + one bmm over (sample, head): (B, O, H', W').

    ``taps`` is the weight in ``weight_rows(..., taps_major=True)`` layout, so a kept channel's
    k*k taps of O/h outputs are one row, and the gathered rows are the bmm's transposed operand.
    """
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    stride, padding, dilation = conv
    x_rows, w_rows = kept_rows(index, c, offsets)  # (B*h*K,) each
    xg = x.reshape(b * c, -1).index_select(0, x_rows)  # (B*h*K, HW)
    xg = xg * scale.reshape(-1, 1)  # saliency-scaled
    cols = F.unfold(xg.view(b, -1, h, w), kernel_size, dilation, padding, stride)  # (B, hKk^2, L)
    ho = (h + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1
    wg = taps.index_select(0, w_rows).view(b * heads, kept * kernel_size * kernel_size, -1)
    y = torch.bmm(wg.transpose(1, 2), cols.view(b * heads, wg.shape[1], -1))  # (B*h, O/h, L)
    return interleave(y.view(b, -1, ho, y.shape[-1] // ho), heads)  # (B, O, H', W')


def bmm_conv(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    stride: int,
    offsets: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """A 1x1 unpadded conv over the kept channels, one bmm over (sample, head): (B, O, H', W')."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]  # a strided 1x1 conv reads every stride-th pixel
    b, c, h, w = x.shape
    heads, kept = index.shape[1:]
    x_rows, w_rows = kept_rows(index, c, offsets)  # (B*h*K,) each
    xg = x.reshape(b * c, -1).index_select(0, x_rows).view(b * heads, kept, h * w)  # (B*h, K, HW)
    wg = rows.index_select(0, w_rows).view(b * heads, kept, -1)  # (B*h, K, O/h)
    wg = wg * scale.reshape(b * heads, kept, 1)  # saliency on the (small) kernels
    y = torch.bmm(wg.transpose(1, 2), xg)  # (B*h, O/h, HW)
    return interleave(y.view(b, -1, h, w), heads)  # (B, O, H, W)


def interleave(y: Tensor, heads: int) -> Tensor:
    """Head-major channels (head i's outputs contiguous) -> channel ``j*heads + i``."""
    b, o, h, w = y.shape
    return y.view(b, heads, o // heads, h, w).transpose(1, 2).reshape(b, o, h, w)
