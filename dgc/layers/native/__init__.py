"""The native CPU kernels of the DGC layer and the DenseNets' group convs, as torch calls.

The kernels are C (``dgc_native.h`` declares them; the sources split by concern: the forward,
the weight and input gradients, the fused eval forward and selection, BatchNorm, pooling),
built on first use and loaded by ``dgc.layers.native.build``. Each wrapper here checks nothing:
the callers ask ``supported`` (or ``trains``, ``pool_supported``) first. Every kernel is an
eager call: a trace, ``torch.export`` or a dispatch mode (``FlopCounterMode``) never sees it.
``threads`` is torch's intra-op thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from dgc.layers.native.build import library
from dgc.layers.native.plans import FusedPlan
from dgc.layers.native.plans import GroupConvPlan
from dgc.layers.native.plans import channel_slice
from dgc.layers.native.plans import group_rows
from dgc.layers.native.plans import out_size
from dgc.layers.native.plans import ptr
from dgc.layers.tracing import is_costing
from dgc.layers.tracing import tracing

__all__ = [
    "FusedPlan",
    "GroupConvPlan",
    "avg_pool2",
    "bn_relu_train",
    "bn_relu_train_backward",
    "channel_slice",
    "direct_conv",
    "group_rows",
    "igrad_fused",
    "igrad_fused_balances",
    "igrad_planes",
    "library",
    "pool_supported",
    "select_channels",
    "supported",
    "trains",
    "wgrad_weight",
]


def supported(x: Tensor, weight: Tensor, dilation: int) -> bool:
    """Whether a native kernel may run this call: float32 CPU tensors, dilation 1, a library,
    and no torch dispatch mode active (``FlopCounterMode``, ``torch.export``'s fake tensors:
    a mode sees torch's operators, never a ctypes call), nor a cost count."""
    ok = x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
    ok = ok and dilation == 1 and not (is_in_torch_dispatch_mode() or is_costing())
    return ok and library() is not None


def trains(x: Tensor, weight: Tensor, dilation: int) -> bool:
    """Whether a native kernel may run in this training step: ``supported``, not traced, not
    under autocast."""
    if tracing() or torch.is_autocast_enabled(x.device.type):
        return False
    return supported(x, weight, dilation)


def pool_supported(x: Tensor) -> bool:
    """Whether ``avg_pool2`` may run on x: a contiguous 4-d float32 CPU tensor, no dispatch
    mode, no cost count, a library."""
    ok = x.dim() == 4 and x.is_contiguous() and x.device.type == "cpu"
    ok = ok and x.dtype == torch.float32 and not (is_in_torch_dispatch_mode() or is_costing())
    return ok and library() is not None


def direct_conv(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    shape: tuple[int, int],
    conv: tuple[int, int, int],
) -> Tensor:
    """The kept-channel convolution of ``gathered.fold_conv`` in one native call.

    Args:
        x: (B, C, H, W) post-BN-ReLU input.
        index: (B, h, K) kept channels per sample and head.
        scale: (B, h, K) what each kept channel is multiplied by.
        rows: the layer's weight (O, C, k, k) as ``gathered.weight_rows(weight, h)``, contiguous.
        shape: (O, k) of that weight.
        conv: (stride, padding, dilation); dilation must be 1.

    Returns:
        (B, O, H', W'), heads interleaved (channel j*h + i is output j of head i).
    """
    lib = library()
    assert lib is not None, "direct_conv called without the native library (check supported)"
    stride, padding, _ = conv
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    o, k = shape
    ho, wo = out_size(h, k, stride, padding), out_size(w, k, stride, padding)
    x, index, scale = x.contiguous(), index.contiguous(), scale.contiguous()
    y = torch.empty(b, o, ho, wo, dtype=x.dtype)
    status = lib.dgc_direct_conv(
        x.data_ptr(), b, c, h, w, index.data_ptr(), scale.data_ptr(), heads, kept,
        rows.data_ptr(), o, k, stride, padding, y.data_ptr(), ho, wo, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc direct_conv: cannot allocate its scratch buffer")
    return y  # (B, O, H', W')


def select_channels(sal: Tensor, n_inactive: int) -> tuple[Tensor, Tensor]:
    """``gathered.select_channels`` with a native selection in place of torch's top-k: the
    same kept channels and scales (ties at the threshold get scale 0), the kept channels in
    channel order rather than by saliency. ``scale`` carries autograd to ``sal`` (a gather).

    Args:
        sal: (B, h, C) non-negative float32 CPU saliencies; n_inactive: 1 <= n < C.

    Returns:
        index (B, h, K) and scale (B, h, K), K = C - n.
    """
    lib = library()
    assert lib is not None, "select_channels called without the native library"
    b, heads, c = sal.shape
    kept = c - n_inactive
    flat = sal.detach().contiguous()
    index = torch.empty(b, heads, kept, dtype=torch.int64)
    alive = torch.empty(b, heads, kept, dtype=sal.dtype)
    status = lib.dgc_select(
        flat.data_ptr(), b * heads, c, n_inactive, index.data_ptr(), alive.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc select: cannot allocate its scratch buffer")
    return index, sal.gather(-1, index) * alive  # (B, h, K) each


def wgrad_weight(
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    grad_out: Tensor,
    shape: tuple[int, int],
    conv: tuple[int, int, int],
) -> Tensor:
    """The weight gradient of ``direct_conv``, in one call, in the weight's row layout.

    Args:
        x, index, scale, shape, conv: as ``direct_conv`` (kernel size 1 or 3).
        grad_out: (B, O, H', W') gradient of its output, heads interleaved.

    Returns:
        (h*C, O/h*k*k), ``gathered.weight_rows``' layout: row (i, c) sums, over the samples
        that keep channel c in head i, the gradient of head i's kernels of channel c (each
        thread into its own accumulator; no per-sample rows are made).
    """
    lib = library()
    assert lib is not None, "wgrad_weight called without the native library (check supported)"
    stride, padding, _ = conv
    b, c, h, w = x.shape
    heads, kept = index.shape[1], index.shape[2]
    o, k = shape
    assert k in (1, 3), f"wgrad_weight: kernel size {k} (1 or 3 only)"
    ho, wo = grad_out.shape[-2:]
    x, index, scale, grad_out = (t.contiguous() for t in (x, index, scale, grad_out))
    grad_rows = torch.empty(heads * c, o // heads * k * k, dtype=x.dtype)
    status = lib.dgc_wgrad_weight(
        x.data_ptr(), b, c, h, w, index.data_ptr(), scale.data_ptr(), heads, kept,
        grad_out.data_ptr(), o, k, stride, padding, ho, wo, grad_rows.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc wgrad_weight: cannot allocate its scratch buffer")
    return grad_rows  # (h*C, O/h*k^2)


def igrad_planes(
    grad_out: Tensor,
    index: Tensor,
    rows: Tensor,
    channels: int,
    k: int,
    padding: int,
    stride: int = 1,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """The input gradient of ``direct_conv`` w.r.t. each kept channel's scaled input plane,
    in one call (the transposed convolution with each channel's own kernels).

    Args:
        grad_out: (B, O, H', W') gradient of its output, heads interleaved.
        index: (B, h, K) kept channels; rows: ``gathered.weight_rows(weight, h)``, contiguous.
        channels: C of the input; k: the (odd) kernel size; padding: at most k - 1.
        stride: the layer's; size: the input's (H, W), needed at stride > 1.

    Returns:
        (B*h*K, H*W): row (b, i, c) is the gradient of sample b's input channel
        ``index[b, i, c]`` as head i scaled it (``index_add`` them, times the scale, into x).
    """
    lib = library()
    assert lib is not None, "igrad_planes called without the native library (check supported)"
    b, o, ho, wo = grad_out.shape
    heads, kept = index.shape[1], index.shape[2]
    if size is None:
        assert stride == 1, "igrad_planes: a strided layer's input size is needed"
        size = (ho + k - 1 - 2 * padding, wo + k - 1 - 2 * padding)
    h, w = size
    grad_out, index = grad_out.contiguous(), index.contiguous()
    planes, ones = _gradient_planes(b, o, heads, grad_out.dtype)
    g_xs = torch.empty(b * heads * kept, h * w, dtype=grad_out.dtype)
    status = lib.dgc_igrad_planes(
        grad_out.data_ptr(), b, o, ho, wo, planes.data_ptr(), ones.data_ptr(), index.data_ptr(),
        heads, kept, rows.data_ptr(), channels, k, padding, stride, g_xs.data_ptr(), h, w,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc igrad_planes: cannot allocate its scratch buffer")
    return g_xs  # (B*h*K, H*W)


def _gradient_planes(b: int, o: int, heads: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The input-gradient kernels' gather of the output gradient: the plane of (sample b, head
    i, output j) is channel j*heads + i, taken whole (scale 1). Both (B, h, O/h)."""
    planes = torch.arange(o).view(o // heads, heads).t().expand(b, -1, -1).contiguous()
    return planes, torch.ones(planes.shape, dtype=dtype)


def igrad_fused_balances(batch: int) -> bool:
    """Whether ``igrad_fused`` (a sample per thread) keeps every thread busy alike."""
    threads = torch.get_num_threads()
    return batch % threads == 0 or batch >= 4 * threads


def igrad_fused(
    grad_out: Tensor,
    x: Tensor,
    index: Tensor,
    scale: Tensor,
    rows: Tensor,
    k: int,
    padding: int,
    stride: int = 1,
) -> tuple[Tensor, Tensor]:
    """The input and saliency gradients of ``direct_conv`` in one call: what
    ``igrad_planes`` followed by the torch ops of ``gathered_backward`` give (the kept planes'
    gradients times their scale, summed into x's channels; their dot products with the kept
    input planes), without the (B*h*K, H*W) intermediates.

    Args:
        grad_out: (B, O, H', W') gradient of the output, heads interleaved.
        x: (B, C, H, W) the convolved (post-BN-ReLU) input, unscaled.
        index, scale: (B, h, K) kept channels and their scale; rows: as ``direct_conv``.
        k: the (odd) kernel size; padding: at most k - 1; stride: the layer's.

    Returns:
        grad_x (B, C, H, W) and grad_scale (B, h, K).
    """
    lib = library()
    assert lib is not None, "igrad_fused called without the native library (check supported)"
    b, o, ho, wo = grad_out.shape
    c, h, w = x.shape[1:]
    heads, kept = index.shape[1], index.shape[2]
    grad_out, x, index, scale = (t.contiguous() for t in (grad_out, x, index, scale))
    planes, ones = _gradient_planes(b, o, heads, grad_out.dtype)
    grad_x = torch.empty(b, c, h, w, dtype=x.dtype)
    grad_scale = torch.empty(b, heads, kept, dtype=x.dtype)
    status = lib.dgc_igrad_fused(
        grad_out.data_ptr(), b, o, ho, wo, planes.data_ptr(), ones.data_ptr(), index.data_ptr(),
        scale.data_ptr(), heads, kept, rows.data_ptr(), c, k, padding, stride, x.data_ptr(), h, w,
        grad_x.data_ptr(), grad_scale.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc igrad_fused: cannot allocate its scratch buffer")
    return grad_x, grad_scale  # (B, C, H, W), (B, h, K)


def bn_relu_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training BatchNorm (batch statistics) + ReLU of x (B, C, H, W) and the per-plane sums
    of the result, in one call. Returns y (B, C, H, W), zsum (B, C), and the batch mean and
    biased variance (C,). weight, bias: the BN's affine parameters (None: 1 and 0)."""
    lib = library()
    assert lib is not None, "bn_relu_train called without the native library (check supported)"
    x = x.contiguous()
    b, c, h, w = x.shape
    y, zsum = torch.empty_like(x), torch.empty(b, c, dtype=x.dtype)
    mean, var = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    wt, bs = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    status = lib.dgc_bn_relu_train(
        x.data_ptr(), b, c, h * w, ptr(wt), ptr(bs), eps, y.data_ptr(), zsum.data_ptr(),
        mean.data_ptr(), var.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc bn_relu_train: cannot allocate its scratch buffer")
    return y, zsum, mean, var


def bn_relu_train_backward(
    grad_y: Tensor,
    grad_zsum: Tensor | None,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``bn_relu_train``'s (y, zsum) w.r.t. x, weight and bias, in two passes
    over x and grad_y. Returns grad_x (B, C, H, W), grad_weight (C,), grad_bias (C,)."""
    lib = library()
    assert lib is not None, "bn_relu_train_backward without the native library"
    b, c, h, w = x.shape
    grad_y, x = grad_y.contiguous(), x.contiguous()
    gz = None if grad_zsum is None else grad_zsum.contiguous()
    wt, bs = (None if t is None else t.detach().contiguous() for t in (weight, bias))
    grad_x = torch.empty_like(x)
    gw, gb = torch.empty(c, dtype=x.dtype), torch.empty(c, dtype=x.dtype)
    status = lib.dgc_bn_relu_train_backward(
        grad_y.data_ptr(), ptr(gz), x.data_ptr(), b, c, h * w, mean.data_ptr(),
        invstd.data_ptr(), ptr(wt), ptr(bs), grad_x.data_ptr(), gw.data_ptr(), gb.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("dgc bn_relu_train_backward: cannot allocate its scratch buffer")
    return grad_x, gw, gb


def avg_pool2(x: Tensor) -> Tensor:
    """``F.avg_pool2d(x, 2, 2)`` of a contiguous float32 CPU (B, C, H, W), bit for bit, in one
    native pass (``dgc_avg_pool2``; the caller checked ``supported``)."""
    b, c, h, w = x.shape
    y = torch.empty(b, c, h // 2, w // 2)  # (B, C, H/2, W/2)
    lib = library()
    assert lib is not None, "avg_pool2 without the native library (check pool_supported)"
    lib.dgc_avg_pool2(x.data_ptr(), y.data_ptr(), b * c, h, w, torch.get_num_threads())
    return y  # (B, C, H/2, W/2)
