"""Native calls planned once per (layer, input shape): the sizes and the parameter tensors
(contiguous, in the kernels' layouts) held, so that a call only allocates its output."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from dgc.layers import gathered as G
from dgc.layers.native.build import ABI
from dgc.layers.native.build import library

_Plan = ABI.structs["FusedPlan"]  # dgc_native.h's FusedPlan, as ctypes lays it out


class FusedPlan:
    """A DGC layer's whole inference forward as one native call, for one input shape.

    The call runs BN-ReLU, channel means, the saliency generators, bottom-n deactivation (ties
    at the threshold go) and the kept-channel convolution, heads interleaved. The plan holds
    the sizes and the (contiguous) parameter tensors, so that a call only allocates its output:
    build it once per (layer, input shape) and again when a parameter changes.

    Args:
        shape: (B, C, H, W) of the layer's input, before its BN-ReLU.
        norm: the BN-ReLU as per-channel (scale, shift), or None (no norm, no ReLU).
        gate: the generators' (fc1 (h, r, C), fc2 (h, C, r), fc2 bias (h, C)).
        n_inactive: channels deactivated per head, 1 <= n < C.
        mask: kept channels multiplied by 1 (``saliency="mask"``), else by their saliency.
        weight: (O, C, k, k).
        conv: (stride, padding, dilation); dilation must be 1.
        rows: ``gathered.weight_rows(weight, heads)`` where the caller keeps it (else made here).
        epilogue: what follows the convolution in the same call, (scale, shift, relu): every
            output v of channel o becomes ``scale[o] * v + shift[o]`` (the eval BN after the
            layer; both None: none), plus the call's residual where given, then ReLU where
            ``relu``. None: the convolution's output as is.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        norm: tuple[Tensor, Tensor] | None,
        gate: tuple[Tensor, Tensor, Tensor],
        n_inactive: int,
        mask: bool,
        weight: Tensor,
        conv: tuple[int, int, int],
        rows: Tensor | None = None,
        epilogue: tuple[Tensor | None, Tensor | None, bool] | None = None,
    ) -> None:
        lib = library()
        assert lib is not None, "FusedPlan without the native library (check supported)"
        self._call = lib.dgc_fused_eval
        stride, padding, _ = conv
        b, c, h, w = shape
        fc1, fc2, b2 = (t.detach() for t in gate)
        fc1, fc2t, b2 = fc1.contiguous(), fc2.transpose(1, 2).contiguous(), b2.contiguous()
        o, k = weight.shape[0], weight.shape[-1]
        if rows is None:
            rows = G.weight_rows(weight.detach(), fc1.shape[0])
        weight = rows.contiguous()
        a, d = (None, None) if norm is None else (t.detach().contiguous() for t in norm)
        ho, wo = out_size(h, k, stride, padding), out_size(w, k, stride, padding)
        self.out_shape = (b, o, ho, wo)
        ea, ec, relu = epilogue or (None, None, False)
        ea, ec = (None if t is None else t.detach().contiguous() for t in (ea, ec))
        self._keep = (fc1, fc2t, b2, weight, a, d, ea, ec)  # the plan points into these
        self._plan = _Plan(
            ptr(a), ptr(d), fc1.data_ptr(), fc2t.data_ptr(), b2.data_ptr(), weight.data_ptr(),
            ptr(ea), ptr(ec),
            b, c, h, w, fc1.shape[1], fc1.shape[0], n_inactive, o, k, stride, padding, ho, wo,
            c, int(mask), torch.get_num_threads(), int(relu),
        )  # fmt: skip
        self._ref = ctypes.byref(self._plan)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) of the planned shape, float32, CPU; contiguous or a channel slice.
        residual: (B, O, H', W') float32 added in the epilogue, before its ReLU, or None."""
        x, xc = channel_slice(x)
        if residual is not None:
            assert residual.shape == self.out_shape and residual.dtype == torch.float32
            residual = residual.contiguous()
        y = torch.empty(self.out_shape)  # (B, O, H', W')
        threads = torch.get_num_threads()
        if threads != self._plan.threads:
            self._plan.threads = threads
        if xc != self._plan.xc:
            self._plan.xc = xc
        if self._call(self._ref, x.data_ptr(), ptr(residual), y.data_ptr()) != 0:
            raise MemoryError("dgc fused_eval: cannot allocate its scratch buffer")
        return y  # (B, O, H', W')


def channel_slice(x: Tensor) -> tuple[Tensor, int]:
    """x (B, C, H, W) as the eval kernels read it, and the channels a sample spans in memory:
    x itself where it is contiguous or a channel slice of a wider contiguous tensor (a
    DenseNet stage's features, ``buffer[:, :C]``), else a contiguous copy."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x, c
    sb, sc, sh, sw = x.stride()
    if sw == 1 and sh == w and sc == h * w and sb % (h * w) == 0 and sb >= c * h * w:
        return x, sb // (h * w)
    return x.contiguous(), c


def out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def group_rows(weight: Tensor, groups: int) -> Tensor:
    """A static group convolution's weight (O, C/g, k, k) in ``direct_conv``'s row layout over
    all C = g * C/g input channels, (g*C, O/g*k*k): row i*C + c holds group i's kernels of
    channel c as (O/g, k*k) where c is one of group i's channels, zeros elsewhere (never read)."""
    o, kg, k, _ = weight.shape
    oh, c = o // groups, groups * kg
    own = weight.reshape(groups, oh, kg, k * k).transpose(1, 2)  # (g, C/g, O/g, k*k)
    rows = weight.new_zeros(groups, groups, kg, oh * k * k)
    diagonal = torch.arange(groups)
    rows[diagonal, diagonal] = own.reshape(groups, kg, oh * k * k)
    return rows.reshape(groups * c, oh * k * k)


class GroupConvPlan:
    """An eval BN-ReLU (or none) followed by a static group convolution, as one native call
    for one input shape (``dgc_group_conv_eval``): the DGC kernel with every sample keeping
    its group's channels. Outputs are grouped as ``nn.Conv2d(groups=g)``'s.

    Args:
        shape: (B, C, H, W) of the input.
        norm: the BN-ReLU as per-channel (scale, shift), or None.
        rows: ``group_rows(weight, groups)``; out_channels, k: the weight's O and kernel size.
        conv: (stride, padding, groups).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        norm: tuple[Tensor, Tensor] | None,
        rows: Tensor,
        out_channels: int,
        k: int,
        conv: tuple[int, int, int],
    ) -> None:
        lib = library()
        assert lib is not None, "GroupConvPlan without the native library (check supported)"
        self._call = lib.dgc_group_conv_eval
        stride, padding, groups = conv
        b, c, h, w = shape
        a, d = (None, None) if norm is None else (t.detach().contiguous() for t in norm)
        rows = rows.detach().contiguous()
        ho, wo = out_size(h, k, stride, padding), out_size(w, k, stride, padding)
        self.out_shape = (b, out_channels, ho, wo)
        self._keep = (a, d, rows)  # the call points into these
        self._head = (b, c, h, w, groups, ptr(a), ptr(d), rows.data_ptr())
        self._tail = (out_channels, k, stride, padding)

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) of the planned shape, float32, CPU; contiguous or a channel slice.
        out: where to write, (B, O, H', W') contiguous or a channel slice (None: a new tensor)."""
        x, xc = channel_slice(x)
        y = torch.empty(self.out_shape) if out is None else out  # (B, O, H', W')
        y, yc = channel_slice(y)
        if y is not out and out is not None:
            raise ValueError("GroupConvPlan: out must be contiguous or a channel slice")
        ho, wo = self.out_shape[2:]
        status = self._call(
            x.data_ptr(), *self._head, *self._tail, y.data_ptr(), ho, wo, xc, yc,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("dgc group_conv_eval: cannot allocate its scratch buffer")
        return y  # (B, O, H', W')
