"""The DGC layer's convolutions as autograd functions, and their gradients.

Every function here computes, per sample b and head i, ``conv(x[b] * s_bi, W_i)`` over the
kept channels of head i (the others have saliency 0), heads interleaved, and has the
gradients of that per-head formulation (docs/methods.md 1.1). They differ in what they
execute and keep for backward:

* ``GatedGroupConv``: the reference's maths, the heads' gated copies of the input in one conv
  with groups = heads (dense MACs); the gated input is rebuilt in backward, so activation
  memory is one input, not ``heads`` of them.
* ``GatheredGroupConv``: the kept channels only (the MACs the paper counts), by the
  batch-folded grouped conv or, on the CPU, the native kernels (``dgc.layers.native``).
* ``FoldedGroupConv``: each sample's kept saliencies folded into its own copy of the weight
  (zeros for the pruned channels), in the layer's output order: one batched matmul for a 1x1
  layer, one conv with groups = batch otherwise (dense MACs, wide groups). Its backward
  reduces the per-sample weight gradients over the batch: no scatter, no atomics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.saliency import deactivate_bottom_k


class GatedGroupConv(torch.autograd.Function):
    """conv2d over the per-head gated inputs, without keeping them for backward.

    Forward: ``y = conv2d(cat_i(x * s_i), W, groups=h)``. Backward rebuilds the gated input
    (one cheap multiply) instead of saving ``h`` copies of ``x``. The gradients are those of
    the per-head formulation: ``dx = sum_i s_i * dX_i``, ``ds_i = sum_hw x * dX_i``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, sal: Tensor, weight: Tensor, stride: int, padding: int, dilation: int
    ) -> Tensor:
        ctx.conv_args = (stride, padding, dilation, sal.shape[1])
        ctx.save_for_backward(x, sal, weight)
        same = x.dtype == sal.dtype
        dtype = x.dtype if same else torch.promote_types(x.dtype, sal.dtype)
        gated = _gate_into(x, sal, dtype)  # (B, h*C, H, W), freed here
        return F.conv2d(gated, weight, None, stride, padding, dilation, sal.shape[1])

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, sal, weight = ctx.saved_tensors
        stride, padding, dilation, heads = ctx.conv_args
        dtype = grad_out.dtype
        gated = _gate_into(x, sal, dtype)  # (B, h*C, H, W)
        need_in = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_in, g_w = _conv_backward(
            grad_out,
            gated,
            weight.to(dtype),
            (stride, padding, dilation),
            heads,
            (need_in, ctx.needs_input_grad[2]),
        )
        del gated
        grad_x = grad_s = None
        if need_in:
            assert g_in is not None  # asked of the convolution's backward (need_in)
            b, c, h, w = x.shape
            g_in = g_in.view(b, heads, c, h, w)  # (B, h, C, H, W)
            # Broadcast-multiply and reduce over contiguous axes: einsum would permute g_in
            # into a bmm layout first, copying h x input.
            if ctx.needs_input_grad[0]:
                grad_x = (g_in * sal.to(dtype)[..., None, None]).sum(1).to(x.dtype)  # (B, C, H, W)
            if ctx.needs_input_grad[1]:
                grad_s = (g_in * x.to(dtype).unsqueeze(1)).sum((3, 4)).to(sal.dtype)  # (B, h, C)
        grad_w = g_w.to(weight.dtype) if g_w is not None else None
        return grad_x, grad_s, grad_w, None, None, None


class GatheredGroupConv(torch.autograd.Function):
    """The same convolution computed over the kept channels only (``gathered.fold_conv``).

    Per sample b and head i, the K = C - n kept channels are gathered, scaled by their
    saliency and convolved with the matching rows of head i's kernel; the batch is folded into
    the groups of one conv2d (groups = B * heads, the CondConv trick). This executes
    g * C * O * k^2 * H'W' MACs, the count the paper reports, instead of the dense count the
    reference code executes. Gathered inputs and kernels are rebuilt in backward, so only
    ``x``, the kept saliencies, the indices and the weight's row layout (weight-sized) are
    saved. Gradients go back with ``index_add`` on rows (the transpose of the row gathers). On
    the CPU in float32 the forward may run the native direct kernel (``direct``) and the
    backward the native weight and input gradients (``native_backward``), each chosen by the
    layer by measured time per input shape.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        scale: Tensor,
        weight: Tensor,
        index: Tensor,
        stride: int,
        padding: int,
        dilation: int,
        direct: bool,
        native_bwd: bool,
    ) -> Tensor:
        ctx.conv_args, ctx.weight_shape = (stride, padding, dilation), weight.shape
        ctx.native_backward = native_bwd
        rows = G.weight_rows(weight, index.shape[1])  # (h*C, O/h*k^2), reused in backward
        ctx.save_for_backward(x, scale, rows, index)
        if direct:  # the native kernel (CPU, float32): the same sums, another order
            shape = (weight.shape[0], weight.shape[-1])
            return native.direct_conv(x, index, scale, rows, shape, ctx.conv_args)
        return G.fold_conv(x, index, scale, rows, weight.shape[-1], ctx.conv_args)

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None, None, None, None, None, None]:
        x, scale, rows, index = ctx.saved_tensors
        args = (ctx.conv_args, ctx.weight_shape, ctx.native_backward)
        grad_x, grad_scale, grad_w = gathered_backward(x, scale, rows, index, grad_out, *args)
        return grad_x, grad_scale, grad_w, None, None, None, None, None, None


class FoldedGroupConv(torch.autograd.Function):
    """The convolution with per-sample folded weights ``W_eff[b] = W_il * s[b]``: ``W_il`` the
    weight with its rows in the layer's (interleaved) output order, ``s[b]`` the kept
    saliencies of sample b broadcast over each head's outputs. ``W_eff`` (B x weight) is
    rebuilt in backward, not saved. args: (stride, padding, dilation)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, sal: Tensor, weight: Tensor, stride: int, padding: int, dilation: int
    ) -> Tensor:
        ctx.conv_args = (stride, padding, dilation)
        ctx.save_for_backward(x, sal, weight)
        w_eff = _folded_weight(weight, sal)  # (B, O, C, k, k)
        return _folded_conv(x, w_eff, ctx.conv_args)  # (B, O, H', W'), the layer's order

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None, None, None, None]:
        x, sal, weight = ctx.saved_tensors
        b, heads, c = sal.shape
        w_il = _interleaved(weight, heads)  # (O, C, k, k)
        m = sal.repeat(1, weight.shape[0] // heads, 1)[..., None, None]  # (B, O, C, 1, 1)
        w_eff = (w_il * m).to(grad_out.dtype)
        grad_x, g_eff = _folded_conv_backward(grad_out, x.to(grad_out.dtype), w_eff, ctx.conv_args)
        grad_w = grad_s = None
        if ctx.needs_input_grad[2]:  # (O, C, k, k), back in head-major row order
            grad_w = _head_major_rows((g_eff * m).sum(0), heads).to(weight.dtype)
        if ctx.needs_input_grad[1]:  # (B, O, C) -> each head's outputs summed: (B, h, C)
            g_m = (g_eff * w_il).sum((3, 4))
            grad_s = g_m.view(b, -1, heads, c).sum(1).to(sal.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_s, grad_w, None, None, None


def _interleaved(weight: Tensor, heads: int) -> Tensor:
    """The weight's rows in the layer's output order: row j*h + i is head i's output j."""
    o = weight.shape[0]
    return weight.view(heads, o // heads, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def _head_major_rows(w: Tensor, heads: int) -> Tensor:
    """The inverse of ``_interleaved``."""
    o = w.shape[0]
    return w.view(o // heads, heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _folded_weight(weight: Tensor, sal: Tensor) -> Tensor:
    """(B, O, C, k, k): each sample's kept saliencies (B, h, C) times the interleaved weight."""
    heads = sal.shape[1]
    m = sal.repeat(1, weight.shape[0] // heads, 1)  # (B, O, C): row o is head o % h's
    return _interleaved(weight, heads) * m[..., None, None].to(weight.dtype)


def _folded_conv(x: Tensor, w_eff: Tensor, conv: tuple[int, int, int]) -> Tensor:
    """x (B, C, H, W) convolved with each sample's own weight w_eff[b]: (B, O, H', W')."""
    stride, padding, dilation = conv
    b, o, c, k = w_eff.shape[:4]
    w_eff = w_eff.to(x.dtype)
    if k == 1 and padding == 0:  # one batched matmul over (sample)
        xs = x[:, :, ::stride, ::stride] if stride > 1 else x
        y = torch.bmm(w_eff.view(b, o, c), xs.reshape(b, c, -1))  # (B, O, H'W')
        return y.view(b, o, xs.shape[2], xs.shape[3])
    y = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), w_eff.reshape(b * o, c, k, k), None,
                 stride, padding, dilation, b)  # fmt: skip
    return y.view(b, o, y.shape[2], y.shape[3])


def _folded_conv_backward(
    grad_out: Tensor, x: Tensor, w_eff: Tensor, conv: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """(grad of x, grad of w_eff) of ``_folded_conv``."""
    stride, padding, dilation = conv
    b, o, c, k = w_eff.shape[:4]
    if k == 1 and padding == 0:
        xs = x[:, :, ::stride, ::stride] if stride > 1 else x
        g = grad_out.reshape(b, o, -1)  # (B, O, H'W')
        g_eff = torch.bmm(g, xs.reshape(b, c, -1).transpose(1, 2))  # (B, O, C)
        g_xs = torch.bmm(w_eff.view(b, o, c).transpose(1, 2), g).view(xs.shape)  # (B, C, H', W')
        if stride == 1:
            return g_xs, g_eff.view(w_eff.shape)
        grad_x = x.new_zeros(x.shape)
        grad_x[:, :, ::stride, ::stride] = g_xs
        return grad_x, g_eff.view(w_eff.shape)
    g_in, g_w = _conv_backward(
        grad_out.reshape(1, b * o, *grad_out.shape[2:]), x.reshape(1, b * c, *x.shape[2:]),
        w_eff.reshape(b * o, c, k, k), conv, b, (True, True),
    )  # fmt: skip
    assert g_in is not None and g_w is not None
    return g_in.view(x.shape), g_w.view(w_eff.shape)


def gathered_backward(
    x: Tensor,
    scale: Tensor,
    rows: Tensor,
    index: Tensor,
    grad_out: Tensor,
    conv: tuple[int, int, int],
    weight_shape: torch.Size,
    native_backward: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``GatheredGroupConv`` w.r.t. x (B, C, H, W), scale (B, h, K) and the
    weight (O, C, k, k), from the batch-folded grouped conv's backward, or with
    ``native_backward`` from the native kernels: the weight gradient (``native.wgrad_weight``,
    summed in the kernel) and the input and saliency gradients (``native.igrad_fused``, a
    strided layer's by phases; ``native.igrad_planes`` where the batch does not split
    evenly over the threads). oneDNN runs this grouped backward (B*heads groups of K -> O/h
    channels) on narrow layers at a few GMAC/s (docs/benchmarks.md 6.3)."""
    (b, c, h, w), (heads, kept), dtype = x.shape, index.shape[1:], grad_out.dtype
    o, k = weight_shape[0], weight_shape[-1]
    weight_dtype, rows = rows.dtype, rows.to(dtype)  # (h*C, O/h*k^2)
    native_in = native_backward and conv[1] <= k - 1 and k % 2 == 1  # see igrad_planes
    if native_in and native.igrad_fused_balances(b):  # x and scale gradients in one call
        args = (k, conv[1], conv[0])
        grad_x, grad_scale = native.igrad_fused(grad_out, x, index, scale, rows, *args)
        grad_rows = native.wgrad_weight(x, index, scale, grad_out, (o, k), conv)
        grad_w = _rows_to_weight(grad_rows, heads, weight_shape)
        return grad_x, grad_scale, grad_w.to(weight_dtype)
    x_rows, w_rows = G.kept_rows(index, c)  # (B*h*K,) each
    xg = x.to(dtype).reshape(b * c, -1).index_select(0, x_rows)  # (B*h*K, HW), unscaled
    s = scale.to(dtype).reshape(-1, 1)  # (B*h*K, 1)
    if not (native_backward and native_in):  # torch: the input or the weight gradient
        wg = rows.index_select(0, w_rows).view(b, heads, kept, o // heads, k * k)
        wg = wg.transpose(2, 3).reshape(b * o, kept, k, k)  # (B*O, K, k, k)
        # Head-major grad (undo the interleave), batch folded into the channels.
        g_y = grad_out.view(b, o // heads, heads, *grad_out.shape[-2:]).transpose(1, 2)
        g_y = g_y.reshape(1, b * o, *grad_out.shape[-2:])  # (1, B*O, H', W')
        xs = (xg * s).view(1, -1, h, w)  # (1, B*h*K, H, W)
        mask = (not native_in, not native_backward)
        g_xs, g_wg = _conv_backward(g_y, xs, wg, conv, b * heads, mask)
    if native_in:  # (B*h*K, HW) straight from the native kernel
        g_xs = native.igrad_planes(grad_out, index, rows, c, k, conv[1], conv[0], (h, w))
    assert g_xs is not None  # the torch backward made it where the native kernel did not
    g_xs = g_xs.view(-1, h * w)  # (B*h*K, HW), grad of the scaled input
    grad_x = torch.zeros(b * c, h * w, dtype=dtype, device=x.device)
    grad_x.index_add_(0, x_rows, g_xs * s)
    grad_scale = (g_xs * xg).sum(-1).view(b, heads, kept)  # (B, h, K)
    if native_backward:  # (h*C, O/h*k^2), summed in the native kernel
        grad_rows = native.wgrad_weight(x, index, scale, grad_out, (o, k), conv)
        grad_w = _rows_to_weight(grad_rows, heads, weight_shape)
    else:  # (B*O, K, k, k) -> rows (B*h*K, O/h*k^2)
        assert g_wg is not None  # the torch backward made it (mask[1])
        g_rows = g_wg.view(b, heads, o // heads, kept, k * k).transpose(2, 3)
        g_rows = g_rows.reshape(b * heads * kept, -1)
        grad_w = _weight_grad(g_rows, rows, w_rows, heads, weight_shape)
    return grad_x.view_as(x).to(x.dtype), grad_scale.to(scale.dtype), grad_w.to(weight_dtype)


def _weight_grad(
    g_rows: Tensor, rows: Tensor, w_rows: Tensor, heads: int, weight_shape: torch.Size
) -> Tensor:
    """The weight gradient (O, C, k, k) from per-(sample, head, kept channel) rows (B*h*K,
    O/h*k^2) of ``rows``' layout, summed into the head rows ``w_rows`` names."""
    grad_rows = torch.zeros_like(rows).index_add_(0, w_rows, g_rows)  # (h*C, O/h*k^2)
    return _rows_to_weight(grad_rows, heads, weight_shape)


def _rows_to_weight(grad_rows: Tensor, heads: int, weight_shape: torch.Size) -> Tensor:
    """The weight's gradient (O, C, k, k) from its row layout (h*C, O/h*k^2)."""
    o, c, k = weight_shape[0], weight_shape[1], weight_shape[-1]
    return grad_rows.view(heads, c, o // heads, k * k).transpose(1, 2).reshape(weight_shape)


def gated_conv(
    x: Tensor, sal: Tensor, weight: Tensor, stride: int, padding: int, dilation: int
) -> Tensor:
    """Per-head gated inputs, one grouped conv (the reference's maths, no autograd state)."""
    # x: (B, C, H, W), sal: (B, h, C), weight: (O, C, k, k)
    gated = _gate(x, sal)  # (B, h*C, H, W)
    return F.conv2d(gated, weight, None, stride, padding, dilation, sal.shape[1])  # (B, O, H', W')


def masked_conv(
    x: Tensor, sal: Tensor, weight: Tensor, n_inactive: int, heads: int, conv: tuple[int, int, int]
) -> Tensor:
    """The full-width masked conv (dense MACs), heads interleaved: (B, O, H', W')."""
    stride, padding, dilation = conv
    y = gated_conv(x, deactivate_bottom_k(sal, n_inactive), weight, stride, padding, dilation)
    return G.interleave(y, heads)


def _conv_backward(
    grad_out: Tensor,
    inputs: Tensor,
    weight: Tensor,
    conv: tuple,
    groups: int,
    mask: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """(input grad, weight grad) of ``conv2d(inputs, weight, groups=groups)``, bias-free."""
    stride, padding, dilation = conv
    g_in, g_w, _ = torch.ops.aten.convolution_backward(
        grad_out,
        inputs,
        weight,
        None,
        _pair(stride),
        _pair(padding),
        _pair(dilation),
        False,
        [0, 0],
        groups,
        [mask[0], mask[1], False],
    )
    return g_in, g_w


def _gate(x: Tensor, sal: Tensor) -> Tensor:
    b, c, h, w = x.shape
    return (x.unsqueeze(1) * sal[..., None, None]).reshape(b, -1, h, w)  # (B, heads*C, H, W)


def _gate_into(x: Tensor, sal: Tensor, dtype: torch.dtype) -> Tensor:
    """``_gate`` written contiguous by one multiply (no autograd): a broadcast product left to
    choose its own layout comes out head-minor, and the reshape copied it once more."""
    b, c, h, w = x.shape
    out = torch.empty(b, sal.shape[1], c, h, w, dtype=dtype, device=x.device)
    torch.mul(x.unsqueeze(1), sal[..., None, None], out=out)
    return out.view(b, -1, h, w)  # (B, heads*C, H, W)


def _pair(v: int | tuple[int, int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)
