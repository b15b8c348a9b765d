"""Dynamic Group Convolution layer.

Su, Fang, Kang, Hu, Pietikäinen, Liu, "Dynamic Group Convolution for Accelerating Convolutional
Neural Networks", ECCV 2020 (arXiv 2007.04242). Spec: methods.md 1.1 to 1.4 and 1.7.

Differences from the reference code (all deliberate, none changes the maths):

* The reference convolves all channels (pruned ones are zeros). Here only each sample's kept
  channels are convolved (``dgc.layers.gathered``): in training by the batch-folded grouped
  conv of ``_GatheredGroupConv`` when at most half the channels are kept, in eval by the
  fastest of its equivalent kernels for the input shape (``dgc.layers.kernel_choice``). On
  the CPU one of them is native (``dgc.layers.native``): where it wins, the whole eval
  forward (BN-ReLU, pooling, generators, selection, conv) is one call.
* The reference concatenates ``heads`` gated copies of the input and keeps that tensor alive
  for the backward pass (activation memory ``heads x input``). Here the gathered (or gated)
  input is rebuilt in the backward pass, so only the (shared) post-BN-ReLU input is saved.
* The reference reads the inactive-channel count with ``int(buffer[0])`` on every forward
  (a GPU->CPU sync per layer per step). Here ``set_inactive`` keeps a host-side mirror of the
  buffer, so a forward never synchronises.
* The per-head saliency generators are evaluated for all heads at once with batched matmuls
  instead of a Python loop over heads, and in float32 under autocast.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.kernel_choice import tracing
from dgc.layers.schedule import target_inactive_channels

NARROW_LAYER_CHANNELS = 80
IMPLS = ("auto", "masked", "gather")
SALIENCY_MODES = ("scale", "mask")
# "auto" gathers the kept channels when at most this fraction of them is kept; above it the
# per-sample grouped conv no longer beats one full-width grouped conv (bench/dgc_layer.py).
GATHER_MAX_KEPT = 0.5


def versions(tensors: list[Tensor]) -> list[int]:
    """The tensors' version counters (bumped by every in-place write), -1 for an inference
    tensor (made under ``torch.inference_mode``), which has none: treated as never changing."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [-1 if t.is_inference() else t._version for t in tensors]


def eval_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval BatchNorm2d (running statistics) as per-channel (scale, shift), both (C,)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return scale, shift


def _plain_eval_bn(bn: nn.Module) -> bool:
    """Whether ``bn`` is an eval BatchNorm2d with running statistics and no hooks, which may
    then be applied as its per-channel affine (``eval_affine``) inside a native call."""
    plain = isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None
    return plain and not (bn._forward_hooks or bn._forward_pre_hooks)


def effective_squeeze(in_channels: int, squeeze_rate: int) -> int:
    """Squeeze rate actually used: halved for narrow layers (C < 80), as the authors do."""
    return max(1, squeeze_rate // 2) if in_channels < NARROW_LAYER_CHANNELS else squeeze_rate


class SaliencyGate(nn.Module):
    """One SE-like saliency generator per head, evaluated for all heads in one pass.

    Head i computes ``S_i = ReLU(fc2_i(ReLU(fc1_i(z))))`` with ``fc1_i: C -> C//s'`` (no bias)
    and ``fc2_i: C//s' -> C`` (bias). fc2's bias starts at 1 so that every channel starts with a
    saliency of about 1: the gate is then close to the identity and pruning begins from an
    unbiased ranking rather than from a random one.

    Args:
        channels: input channels C.
        heads: number of heads h.
        hidden: hidden width r = C // s'.
    """

    def __init__(self, channels: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.channels, self.heads, self.hidden = channels, heads, hidden
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, channels))
        self.fc2_weight = nn.Parameter(torch.empty(heads, channels, hidden))
        self.fc2_bias = nn.Parameter(torch.empty(heads, channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-normal with fan_in, as nn.init.kaiming_normal_ does for each head's Linear.
        nn.init.normal_(self.fc1_weight, 0.0, math.sqrt(2.0 / self.channels))
        nn.init.normal_(self.fc2_weight, 0.0, math.sqrt(2.0 / self.hidden))
        nn.init.constant_(self.fc2_bias, 1.0)

    def forward(self, z: Tensor, scale: float = 1.0) -> Tensor:
        # z: (B, C), ``scale * z`` the globally pooled activations (means, or sums with
        # scale 1/HW: a sum is one op where a mean is two). As ReLU is positively homogeneous,
        # fc1 and its ReLU see z and the scale enters fc2's product: the same saliencies.
        # matmul/baddbmm, not einsum: at batch 1 the generator is all overhead, and einsum adds
        # its own on every call.
        hid = torch.matmul(self.fc1_weight, z.t()).relu()  # (h, r, B)
        sal = torch.baddbmm(self.fc2_bias.unsqueeze(-1), self.fc2_weight, hid, alpha=scale)
        return sal.relu().permute(2, 0, 1)  # (B, h, C), non-negative


def deactivate_bottom_k(saliency: Tensor, n_inactive: int) -> Tensor:
    """Zero every saliency at or below the n-th smallest of its head, per sample.

    Ties at the threshold (notably the exact zeros the final ReLU produces) are all removed, so
    at least ``n_inactive`` channels go. The threshold comes from a detached copy; gradients
    reach the generator only through the kept entries.

    Args:
        saliency: (B, h, C) non-negative saliencies.
        n_inactive: channels to deactivate per head, 0 <= n < C.
    """
    if n_inactive <= 0:
        return saliency
    detached = saliency.detach()
    threshold = detached.kthvalue(n_inactive, dim=-1, keepdim=True).values  # (B, h, 1)
    return saliency * (detached > threshold)  # (B, h, C)


class _GatedGroupConv(torch.autograd.Function):
    """conv2d over the per-head gated inputs, without keeping them for backward.

    Forward: ``y = conv2d(cat_i(x * s_i), W, groups=h)``. Backward rebuilds the gated input
    (one cheap multiply) instead of saving ``h`` copies of ``x``. The gradients are those of
    the per-head formulation: ``dx = sum_i s_i * dX_i``, ``ds_i = sum_hw x * dX_i``.
    """

    @staticmethod
    def forward(ctx, x, sal, weight, stride, padding, dilation):  # type: ignore[override]
        ctx.conv_args = (stride, padding, dilation, sal.shape[1])
        ctx.save_for_backward(x, sal, weight)
        return gated_conv(x, sal, weight, stride, padding, dilation)  # gated input freed here

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, sal, weight = ctx.saved_tensors
        stride, padding, dilation, heads = ctx.conv_args
        dtype = grad_out.dtype
        gated = _gate(x, sal).to(dtype)  # (B, h*C, H, W)
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


class _GatheredGroupConv(torch.autograd.Function):
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
    def forward(ctx, x, scale, weight, index, stride, padding, dilation, direct, native_bwd):  # type: ignore[override]
        ctx.conv_args, ctx.weight_shape = (stride, padding, dilation), weight.shape
        ctx.native_backward = native_bwd
        rows = G.weight_rows(weight, index.shape[1])  # (h*C, O/h*k^2), reused in backward
        ctx.save_for_backward(x, scale, rows, index)
        if direct:  # the native kernel (CPU, float32): the same sums, another order
            shape = (weight.shape[0], weight.shape[-1])
            return native.direct_conv(x, index, scale, rows, shape, ctx.conv_args)
        return G.fold_conv(x, index, scale, rows, weight.shape[-1], ctx.conv_args)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, scale, rows, index = ctx.saved_tensors
        args = (ctx.conv_args, ctx.weight_shape, ctx.native_backward)
        grad_x, grad_scale, grad_w = gathered_backward(x, scale, rows, index, grad_out, *args)
        return grad_x, grad_scale, grad_w, None, None, None, None, None, None


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
    """Gradients of ``_GatheredGroupConv`` w.r.t. x (B, C, H, W), scale (B, h, K) and the
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
    g_xs = g_xs.view(-1, h * w)  # (B*h*K, HW), grad of the scaled input
    grad_x = torch.zeros(b * c, h * w, dtype=dtype, device=x.device)
    grad_x.index_add_(0, x_rows, g_xs * s)
    grad_scale = (g_xs * xg).sum(-1).view(b, heads, kept)  # (B, h, K)
    if native_backward:  # (h*C, O/h*k^2), summed in the native kernel
        grad_rows = native.wgrad_weight(x, index, scale, grad_out, (o, k), conv)
        grad_w = _rows_to_weight(grad_rows, heads, weight_shape)
    else:  # (B*O, K, k, k) -> rows (B*h*K, O/h*k^2)
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


class _BatchNormReLU(torch.autograd.Function):
    """Training BatchNorm2d (batch statistics) + ReLU, and the per-plane sums of the output,
    in one native pass (``native.bn_relu_train``); backward in two (the BN's and ReLU's
    gradients, and the sums'). Outputs (y, sums, mean, biased var); the last two, for the
    running statistics, are not differentiable. CPU float32 only (the caller checks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        y, sums, mean, var = native.bn_relu_train(x, weight, bias, eps)
        ctx.save_for_backward(x, mean, torch.rsqrt(var + eps), weight, bias)
        ctx.mark_non_differentiable(mean, var)
        return y, sums, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_sums, _grad_mean, _grad_var):  # type: ignore[override]
        x, mean, invstd, weight, bias = ctx.saved_tensors
        args = (grad_y, grad_sums, x, mean, invstd, weight, bias)
        grad_x, grad_w, grad_b = native.bn_relu_train_backward(*args)
        grad_w = grad_w if ctx.needs_input_grad[1] else None
        grad_b = grad_b if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _update_running_stats(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, n: int) -> None:
    """What ``nn.BatchNorm2d`` does to its buffers in a training forward: the momentum (or,
    for momentum None, cumulative) average of the batch mean and unbiased variance."""
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1.0 - f).add_(mean, alpha=f)
        bn.running_var.mul_(1.0 - f).add_(var, alpha=f * n / max(n - 1, 1))


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


def _pair(v: int | tuple[int, int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class DynamicGroupConv2d(nn.Module):
    """Dynamic group convolution: ``heads`` dense convolutions, each over its own
    sample-dependent subset of the input channels, selected by a saliency generator.

    The layer owns the BN-ReLU that precedes its convolution (pre-activation style). Head i
    keeps, per sample, the input channels whose saliency is above the ``n``-th smallest, scales
    them by that saliency and convolves them into ``out_channels // heads`` outputs; the head
    outputs are interleaved (channel ``j*heads + i`` is output j of head i) so that a following
    group convolution sees every head in every group.

    ``forward`` returns a tensor. The saliency L1 term of the last forward is kept in
    ``last_saliency_loss`` (see ``dgc.aux_loss``). The number of inactive channels lives in the
    persistent buffer ``inactive_channels`` and is set from outside by ``dgc.set_progress``.

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size: k.
        stride, padding, dilation: as in ``nn.Conv2d``.
        heads: h, must divide C and O.
        squeeze_rate: s of the saliency generators (halved when C < 80).
        gate_factor: g, kept fraction of the input channels, in (0, 1].
        saliency: "scale" (the paper: kept channels are multiplied by their saliency) or
            "mask" (a binary mask of the kept channels; the generators learn through a
            straight-through gradient).
        norm: the layer's own BN-ReLU before the gate (the paper); False where the network
            already normalises the input (the block's BN-ReLU is then the only one).
        name: layer name used in error messages.
    """

    # True only in the private eval network of a shipped program (``dgc.program.seal``): no
    # hooks, eval mode, plain BNs, no grad, and its tensors views of the program's buffers,
    # rebuilt as a whole when those change; its eval calls then skip the per-call checks.
    sealed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        heads: int = 4,
        squeeze_rate: int = 16,
        gate_factor: float = 0.25,
        impl: str = "auto",
        saliency: str = "scale",
        norm: bool = True,
        name: str = "DynamicGroupConv2d",
    ) -> None:
        super().__init__()
        _validate(name, in_channels, out_channels, heads, squeeze_rate, gate_factor)
        if impl not in IMPLS:
            raise ValueError(f"{name}: impl={impl!r} must be one of {IMPLS}")
        if saliency not in SALIENCY_MODES:
            raise ValueError(f"{name}: saliency={saliency!r} must be one of {SALIENCY_MODES}")
        self.saliency = saliency
        self.in_channels, self.out_channels, self.kernel_size = (
            in_channels,
            out_channels,
            kernel_size,
        )
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.heads, self.squeeze_rate, self.gate_factor = heads, squeeze_rate, gate_factor
        self.norm = nn.BatchNorm2d(in_channels) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if norm else nn.Identity()
        hidden = in_channels // effective_squeeze(in_channels, squeeze_rate)
        self.gate = SaliencyGate(in_channels, heads, hidden)
        # Rows [i*O/h, (i+1)*O/h) are head i's dense kernel over all C input channels.
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        # Persistent (saved in checkpoints). Its host-side mirror gives forward a Python int
        # without reading the device tensor (a GPU->CPU sync) on every step.
        self.register_buffer("inactive_channels", torch.zeros((), dtype=torch.long))
        self._inactive_host = 0
        self.impl = impl
        # A trace (TorchScript, torch.export) records the eval forward as one dgc operator
        # that runs it eagerly (``dgc.layers.shipped``); False: plain torch operators.
        self.ship_op = True
        # Inference: the kernel chosen per input shape, and the weight in row layout.
        self.kernels = KernelChoice()
        self.register_buffer("eval_rows", torch.empty(0), persistent=False)
        self.register_buffer("eval_taps", torch.empty(0), persistent=False)
        self._rows_version: dict[str, tuple] = {}
        self._offsets: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._plans: dict[tuple, tuple[tuple, native.FusedPlan]] = {}
        self.last_saliency_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each head is an nn.Conv2d(C, O/h) initialised N(0, sqrt(2 / (k^2 * O/h))) by the
        # authors' networks (fan_out of the head, not of the whole layer).
        fan_out = self.kernel_size**2 * self.out_channels // self.heads
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))
        self.gate.reset_parameters()

    @property
    def hidden(self) -> int:
        return self.gate.hidden

    @property
    def target_inactive(self) -> int:
        return target_inactive_channels(self.in_channels, self.gate_factor)

    def set_inactive(self, n: int) -> None:
        """Set the number of deactivated input channels per head (0 <= n < in_channels)."""
        if not 0 <= n < self.in_channels:
            raise ValueError(f"inactive channels n={n} must be in [0, {self.in_channels})")
        if n == self._inactive_host:
            return  # set_progress calls this every step; no device write when nothing changes
        self.inactive_channels.fill_(n)
        self._inactive_host = int(n)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        if not self.inactive_channels.is_meta:
            self._inactive_host = int(self.inactive_channels)  # one sync per load, not per step

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        if not (self.training or torch.is_grad_enabled()):
            y = self._forward_fused(x)  # (B, O, H', W'), or None where it does not apply
            if y is not None:
                return y
        if not self.training and self.ship_op and tracing() and self._fusable(x):
            return self._forward_shipped(x)  # (B, O, H', W'), one recorded operator
        raw, fused = x, self._train_norm_relu(x) if self.training else None
        if fused is None:
            x = self._norm_relu(x)  # (B, C, H, W)
            sal = self._saliency(x)  # (B, h, C), float32 under autocast too
        else:  # the native training BN-ReLU, which pools for the gate too
            x, sums = fused  # (B, C, H, W), (B, C)
            sal = self.gate(sums, 1.0 / (x.shape[2] * x.shape[3]))  # (B, h, C)
        # Kept only when training (the loss needs it); inference and export stay stateless.
        self.last_saliency_loss = sal.mean(dim=(0, 2)).sum() if self.training else None
        # An eval model that a trace or torch.export records (MLflow logs with grad enabled)
        # ships the inference path; eager eval with grad enabled keeps full autograd.
        if torch.is_grad_enabled() and (self.training or not tracing()):
            return self._forward_autograd(x, sal)  # (B, O, H', W')
        raw = None if torch.is_grad_enabled() else raw  # timing whole forwards: eager only
        return self._forward_inference(x, sal, raw)  # (B, O, H', W')

    def _fusable(self, x: Tensor) -> bool:
        """Whether this eval forward may run as one call, the native plan's or the operator a
        trace records (``dgc.layers.shipped``): no autocast, no hooks on the submodules it
        bypasses, and a plain eval BN-ReLU or none. Checked on every eager eval call."""
        if torch.is_autocast_enabled(x.device.type) or self._hooked():
            return False
        m = self._modules
        no_norm = isinstance(m["norm"], nn.Identity) and isinstance(m["act"], nn.Identity)
        return no_norm or self._plain_bn()

    def _forward_shipped(self, x: Tensor) -> Tensor:
        """The eval forward as ``torch.ops.dgc.dynamic_group_conv_eval`` (registered by
        ``dgc.layers.shipped``), which runs this eager forward wherever the program runs."""
        bn = self.norm if isinstance(self.norm, nn.BatchNorm2d) else None
        norm = (None,) * 4 if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        gate = self.gate
        return torch.ops.dgc.dynamic_group_conv_eval(
            x,
            self.weight,
            gate.fc1_weight,
            gate.fc2_weight,
            gate.fc2_bias,
            *norm,
            self._inactive_host,
            [self.stride, self.padding, self.dilation],
            self.saliency == "mask",
            bn.eps if bn is not None else 0.0,
        )  # (B, O, H', W')

    def _forward_fused(self, x: Tensor) -> Tensor | None:
        """Eager inference in one native call (``native.FusedPlan``) where this shape's chosen
        kernel is ``direct``: BN-ReLU, pooling, generators and selection run inside it, so the
        normalised input is never written and no torch op runs between them. None where it
        does not apply (the first call at a shape, tracing, autocast, hooks, another kernel)."""
        return self._run_fused(x, checked=False)  # (B, O, H', W') or None

    def _run_fused(self, x: Tensor, checked: bool) -> Tensor | None:
        """``_forward_fused``; ``checked``: the caller knows the call fusable, as dgc's operator
        does of its layers (``dgc.layers.shipped``: no hooks, a plain BN or none, no trace)."""
        key = self._fused_key(x, checked)
        plan = None if key is None else self._fused_plan(key, x)
        return None if plan is None else plan(x)  # (B, O, H', W')

    def forward_epilogue(
        self,
        x: Tensor,
        bn: nn.Module,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
    ) -> Tensor | None:
        """``act(bn(self(x)) + residual)`` (no ``act``: no ReLU; no ``residual``: none added)
        in the one native call of ``_forward_fused``, the BN, the addition and the ReLU
        applied to each output tile while it is in registers: a ResNet block's eval
        conv-BN(-ReLU) and conv-BN-add-ReLU at batch 1 otherwise ran three more torch ops over
        the output per layer (docs/benchmarks.md 6.1). None where it does not apply: the fused
        forward does not (``_forward_fused``), grad or training, hooks on this layer or on
        ``bn``/``act``, a BN that is not a plain eval one, an ``act`` that is not a ReLU, a
        residual of another shape or kind."""
        if not (self.sealed or self._epilogue_applies(bn, act)):
            return None
        if residual is not None and (
            residual.dtype != torch.float32 or residual.device.type != "cpu"
        ):
            return None
        key = self._fused_key(x, False)
        if key is None:
            return None
        plan = self._fused_plan((*key, id(bn), act is not None), x, bn, act is not None)
        if plan is None or (residual is not None and tuple(residual.shape) != plan.out_shape):
            return None
        return plan(x, residual)  # (B, O, H', W')

    def _epilogue_applies(self, bn: nn.Module, act: nn.Module | None) -> bool:
        """``forward_epilogue``'s checks of the modules: eval without grad, a plain eval BN, a
        plain ReLU or none, no hooks on this layer."""
        if self.training or torch.is_grad_enabled() or not _plain_eval_bn(bn):
            return False
        if self._forward_hooks or self._forward_pre_hooks:
            return False
        return act is None or (
            type(act) is nn.ReLU and not (act._forward_hooks or act._forward_pre_hooks)
        )

    def _fused_key(self, x: Tensor, checked: bool) -> tuple | None:
        """This input's plan key where the fused forward applies to it (this shape's chosen
        kernel is ``direct``; see ``_run_fused``), else None."""
        n = self._inactive_host
        key = (tuple(x.shape), x.dtype, x.device, n)
        if self.kernels.known(key, ("direct",)) is None:
            return None
        if not (checked or self._call_fusable(x)):
            return None
        if not native.supported(x, self.weight, self.dilation):
            return None  # a dispatch mode now (FlopCounterMode): torch's kernels
        return key

    def _call_fusable(self, x: Tensor) -> bool:
        """Whether this call may run fused: not traced and ``_fusable``; for a sealed layer,
        whose modules cannot change, only not under autocast."""
        if self.sealed:
            return not torch.is_autocast_enabled(x.device.type)
        return not tracing() and self._fusable(x)

    def _fused_plan(
        self, key: tuple, x: Tensor, bn: nn.BatchNorm2d | None = None, relu: bool = False
    ) -> native.FusedPlan | None:
        """The native plan for ``key``, rebuilt when a parameter or buffer it reads changed
        (an optimizer step, ``load_state_dict``, ``.to()``); ``bn``, ``relu``: its epilogue
        (``forward_epilogue``)."""
        cached = self._plans.get(key)
        if self.sealed and cached is not None:
            return cached[1]  # a sealed network is rebuilt, never changed (``seal``)
        # Read through the modules' dicts: nn.Module.__getattr__ costs about a microsecond each.
        gate, norm = self._modules["gate"], self._modules["norm"]
        sources = [*self._parameters.values(), *gate._parameters.values()]
        for m in (norm,) if bn is None else (norm, bn):
            sources += [*m._parameters.values(), *m._buffers.values()]
        sources = [t for t in sources if t is not None]
        state = tuple(versions(sources) + [t.data_ptr() for t in sources])
        if cached is not None and cached[0] == state:
            return cached[1]
        args = self._fused_args(x)
        if args is None:
            return None
        epilogue = None if bn is None else (*eval_affine(bn), relu)
        plan = native.FusedPlan(tuple(x.shape), *args, epilogue=epilogue)
        self._plans[key] = (state, plan)
        return plan

    def __getstate__(self) -> dict:
        # Native plans point into this layer's tensors: a copy or an unpickled layer builds
        # its own (pickle and deepcopy of a model that ran eval must work, e.g. for Ray).
        state = dict(super().__getstate__())
        state["_plans"] = {}
        return state

    def _hooked(self) -> bool:
        """Hooks on the submodules the fused forward would bypass. Read through ``_modules``
        (``nn.Module.__getattr__`` costs about a microsecond a name, on every eval call)."""
        modules = self._modules
        for name in ("gate", "norm", "act"):
            m = modules[name]
            if m._forward_hooks or m._forward_pre_hooks:
                return True
        return False

    def _fused_args(self, x: Tensor) -> tuple | None:
        """``native.FusedPlan``'s arguments after the shape, or None where it cannot run."""
        if not native.supported(x, self.weight, self.dilation) or not self._fusable(x):
            return None
        norm = self._norm_affine()
        gate = (self.gate.fc1_weight, self.gate.fc2_weight, self.gate.fc2_bias)
        conv = (self.stride, self.padding, self.dilation)
        mask = self.saliency == "mask"
        rows = self._weight_rows(False)  # shared by the direct kernel and every plan
        return norm, gate, self._inactive_host, mask, self.weight, conv, rows

    def _whole(self, name: str, raw: Tensor) -> Tensor:
        """The whole eval forward from the layer's input with torch kernel ``name``: what a
        torch kernel is timed as when the fused native forward is a candidate."""
        x = self._norm_relu(raw)  # (B, C, H, W)
        sal = self._saliency(x)  # (B, h, C)
        if name == "masked":
            return self._kernel(name, x, sal, sal, sal)  # (B, O, H', W')
        index, scale = G.select_channels(sal, self._inactive_host)  # (B, h, K) each
        return self._kernel(name, x, sal, index, self._kept(scale))  # (B, O, H', W')

    def _norm_affine(self) -> tuple[Tensor, Tensor] | None:
        """The plain eval BN (``_fusable``) as per-channel (scale, shift), None without a
        norm. Computed when a native plan is built; ``_fused_plan`` rebuilds plans when the BN
        changes."""
        bn = self.norm
        return None if isinstance(bn, nn.Identity) else eval_affine(bn)

    def _plain_bn(self) -> bool:
        """Whether the layer's norm is an eval BatchNorm with running statistics and no hooks,
        which may then be applied functionally or inside the native call."""
        return _plain_eval_bn(self._modules["norm"])

    def _kept(self, v: Tensor) -> Tensor:
        """What a kept channel is multiplied by: its saliency ``v`` (the paper), or 1 in
        ``mask`` mode; a pruned one (0) stays 0. The mask passes the gradient of ``v`` divided
        by the largest saliency of its head (straight-through): the forward no longer depends
        on the saliencies' scale, so a plain straight-through gradient let it grow until the
        generators overflowed (measured: non-finite gate outputs by epoch 9 of 30 on digits);
        the scaled one shrinks as the saliencies grow."""
        if self.saliency == "scale":
            return v
        d = v.detach()
        top = d.amax(dim=-1, keepdim=True).clamp_min(1e-6)  # (B, h, 1)
        return (v - d) / top + (d > 0).to(v.dtype)

    def _saliency(self, x: Tensor) -> Tensor:
        """The generators' saliencies. Under autocast they and the selection stay float32:
        bf16 matmuls round differently and the bottom-k would then zero extra channels on ties
        the float32 network does not have (issue #8)."""
        device, scale = x.device.type, 1.0 / (x.shape[2] * x.shape[3])
        if x.is_meta or not torch.is_autocast_enabled(device):
            return self.gate(x.sum(dim=(2, 3)), scale)  # (B, h, C)
        with torch.autocast(device, enabled=False):
            return self.gate(x.float().sum(dim=(2, 3)), scale)  # (B, h, C), float32

    def _train_norm_relu(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The training BN-ReLU and the per-plane sums of its output (the gate's pooling) in
        one native call (``_BatchNormReLU``), with the BN's running statistics updated as
        ``nn.BatchNorm2d`` does; None where it does not apply: not a plain training
        BatchNorm2d + ReLU without hooks, not CPU float32, traced, under autocast, or one
        value per channel (torch's BN then raises its own error)."""
        m = self._modules
        bn, act = m["norm"], m["act"]
        if type(bn) is not nn.BatchNorm2d or type(act) is not nn.ReLU or not bn.training:
            return None
        if self._hooked() or not self._native_training(x) or x.numel() <= x.shape[1]:
            return None
        y, sums, mean, var = _BatchNormReLU.apply(x, bn.weight, bn.bias, bn.eps)
        if bn.track_running_stats and bn.running_mean is not None:
            _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return y, sums  # (B, C, H, W), (B, C)

    def _norm_relu(self, x: Tensor) -> Tensor:
        """The layer's own BN-ReLU. In eval a BatchNorm without hooks is applied functionally:
        ``nn.BatchNorm2d.__call__`` costs about as much again as the normalisation itself on
        the small maps of a CIFAR network (docs/benchmarks.md 6.2)."""
        bn = self.norm
        if not self._plain_bn():
            return self.act(bn(x))  # (B, C, H, W)
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return y.relu_()  # (B, C, H, W)

    def _forward_autograd(self, x: Tensor, sal: Tensor) -> Tensor:
        n, args = self._inactive_host, (self.stride, self.padding, self.dilation)
        gather = self.in_channels - n <= GATHER_MAX_KEPT * self.in_channels
        if n > 0 and (self.impl == "gather" or (self.impl == "auto" and gather)):
            native_ok = self._native_training(x)  # once a step: the choices below need it
            select = native.select_channels if native_ok else G.select_channels
            index, scale = select(sal, n)  # (B, h, K) each
            scale = self._kept(scale)
            if self.kernel_size == 1 and self.padding == 0 and self.stride > 1:
                # A strided 1x1 conv reads every stride-th pixel only: convolve those at
                # stride 1, where the native input gradient runs. oneDNN's batch-folded
                # grouped backward ran DyResNet-20's first downsample at 0.3 GMAC/s (12 ms of
                # a 64-batch step; docs/benchmarks.md 6.3). Autograd scatters the gradient.
                x = x[:, :, :: self.stride, :: self.stride].contiguous()  # (B, C, H', W')
                args = (1, 0, self.dilation)
            direct = native_ok and self._train_forward_native(x, index, scale, args)
            backward = native_ok and self._train_backward_native(x, index, scale, args)
            return _GatheredGroupConv.apply(x, scale, self.weight, index, *args, direct, backward)
        sal = self._kept(deactivate_bottom_k(sal, n))  # (B, h, C), pruned -> 0
        y = _GatedGroupConv.apply(x, sal, self.weight, *args)  # (B, O, H', W'), head-major
        return G.interleave(y, self.heads)

    def _native_training(self, x: Tensor) -> bool:
        """Whether a native kernel may run in this training step: CPU, float32, not traced,
        not under autocast."""
        if tracing() or torch.is_autocast_enabled(x.device.type):
            return False
        return native.supported(x, self.weight, self.dilation)

    def _train_forward_native(
        self, x: Tensor, index: Tensor, scale: Tensor, args: tuple[int, int, int]
    ) -> bool:
        """Whether the training forward convolves with the native kernel rather than the
        batch-folded grouped conv: timed against it once per input shape (CPU, float32, not
        traced or under autocast; the caller checked ``_native_training``). args: (stride,
        padding, dilation) of the convolution as run."""
        key = ("train", tuple(x.shape), x.dtype, self._inactive_host)
        name = self.kernels.known(key, ("fold", "direct"))
        if name is None:
            k = self.kernel_size
            with torch.no_grad():
                rows = G.weight_rows(self.weight.detach(), self.heads)
                inputs = (x, index, scale, rows)
                kernels = {
                    "fold": functools.partial(G.fold_conv, *inputs, k, args),
                    "direct": functools.partial(
                        native.direct_conv, *inputs, (self.out_channels, k), args
                    ),
                }
                self.kernels.run(key, kernels, "fold")
            name = self.kernels.last
        return name == "direct"

    def _train_backward_native(
        self, x: Tensor, index: Tensor, scale: Tensor, args: tuple[int, int, int]
    ) -> bool:
        """Whether the backward runs the native kernels (``direct``: the weight and input
        gradients) rather than the batch-folded grouped conv's backward (``fold``): the whole
        backward timed both ways once per input shape, on a random output gradient (CPU,
        float32, kernel size 1 or 3; the caller checked ``_native_training``). args: (stride,
        padding, dilation) of the convolution as run."""
        if self.kernel_size not in (1, 3):
            return False
        key = ("backward", tuple(x.shape), x.dtype, self._inactive_host)
        name = self.kernels.known(key, ("fold", "direct"))  # the forward's names: one pin
        if name is None:
            k, (stride, padding, dilation) = self.kernel_size, args
            ho, wo = ((n + 2 * padding - k) // stride + 1 for n in x.shape[2:])
            with torch.no_grad():
                rows = G.weight_rows(self.weight.detach(), self.heads)
                grad = torch.randn(x.shape[0], self.out_channels, ho, wo)  # (B, O, H', W')
                inputs = (x.detach(), scale.detach(), rows, index, grad)
                inputs += ((stride, padding, dilation), self.weight.shape)
                kernels = {
                    nm: functools.partial(gathered_backward, *inputs, nm == "direct")
                    for nm in ("fold", "direct")
                }
                self.kernels.run(key, kernels, "fold")
            name = self.kernels.last
        return name == "direct"

    def _forward_inference(self, x: Tensor, sal: Tensor, raw: Tensor | None = None) -> Tensor:
        """No autograd: the fastest kernel for this input shape (see ``KernelChoice``).

        ``raw`` is the layer's input before its BN-ReLU (eager eval without grad): with it the
        candidates are timed as whole forwards, the native fused one among them.

        Once a shape's kernel is chosen, eager calls go straight to it: no candidate table is
        built, only the chosen kernel's weight layout is checked, and the row offsets of the
        gathers come from a per-batch-size cache. At batch 1 the narrow networks spend most of
        their time in such per-call work (docs/benchmarks.md 6.2).
        """
        n = self._inactive_host
        if self.impl == "masked":
            return self._kernel("masked", x, sal, sal, sal, None)  # (B, O, H', W')
        index, scale = G.select_channels(sal, n)  # (B, h, K) each
        scale = self._kept(scale)
        names = ("bmm",) if self.kernel_size == 1 and self.padding == 0 else ("fold", "unfold")
        traced = tracing()
        if not traced and native.supported(x, self.weight, self.dilation):
            names = (*names, "direct")  # a ctypes call: eager only, never in a trace
        if self.impl == "auto":
            names = (*names, "masked")
        key = (tuple(x.shape), x.dtype, x.device, n)
        name = None if traced else self.kernels.known(key, names)
        if name is not None:
            offsets = self._row_offsets(x.shape[0], x.device)
            return self._kernel(name, x, sal, index, scale, offsets)  # (B, O, H', W')
        fused = self._fused_args(raw) if raw is not None and "direct" in names else None
        if fused is None:
            kernels = {
                nm: functools.partial(self._kernel, nm, x, sal, index, scale) for nm in names
            }
        else:  # time whole forwards: the native one skips the torch BN, gate and selection too
            kernels = {nm: functools.partial(self._whole, nm, raw) for nm in names}
            kernels["direct"] = functools.partial(native.FusedPlan(tuple(raw.shape), *fused), raw)
        return self.kernels.run(key, kernels, names[0])  # (B, O, H', W')

    def _kernel(
        self,
        name: str,
        x: Tensor,
        sal: Tensor,
        index: Tensor,
        scale: Tensor,
        offsets: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Run one of the equivalent kernels; all return (B, O, H', W'), heads interleaved."""
        t = G.traceable  # while tracing, scripted kernels keep the batch size dynamic
        args, n, k = (
            (self.stride, self.padding, self.dilation),
            self._inactive_host,
            self.kernel_size,
        )
        if name == "bmm":
            return t(G.bmm_conv)(x, index, scale, self._weight_rows(False), self.stride, offsets)
        if name == "fold":
            return t(G.fold_conv)(x, index, scale, self._weight_rows(False), k, args, offsets)
        if name == "unfold":
            return t(G.unfold_conv)(x, index, scale, self._weight_rows(True), k, args, offsets)
        if name == "direct":
            rows, shape = self._weight_rows(False), (self.out_channels, k)
            return native.direct_conv(x, index, scale, rows, shape, args)
        if self.saliency == "scale":
            return t(masked_conv)(x, sal, self.weight, n, self.heads, args)
        mask = self._kept(deactivate_bottom_k(sal, n))  # (B, h, C) of 0/1
        return t(masked_conv)(x, mask, self.weight, 0, self.heads, args)

    def _row_offsets(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``gathered.row_offsets`` for this batch size, made once per (batch, device)."""
        key = (batch, device)
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = G.row_offsets(batch, self.heads, self.in_channels, device)
            self._offsets[key] = offsets
        return offsets

    def _weight_rows(self, taps_major: bool) -> Tensor:
        """The weight in ``gathered.weight_rows`` layout, rebuilt only when the weight changed.

        Kept in non-persistent buffers so that ``.to()``, tracing and torch.export see them like
        any buffer; a trace or export records the layout current at that time.
        """
        name = "eval_taps" if taps_major else "eval_rows"
        cached, w = getattr(self, name), self.weight
        if tracing():
            return cached if cached.numel() else G.weight_rows(w, self.heads, taps_major)
        version = (*versions([w]), w.data_ptr(), w.dtype, w.device)
        if version != self._rows_version.get(name) or cached.numel() == 0:
            cached = G.weight_rows(w.detach(), self.heads, taps_major)
            setattr(self, name, cached)
            self._rows_version[name] = version
        return cached

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, heads={self.heads}, "
            f"squeeze_rate={self.squeeze_rate}, gate_factor={self.gate_factor}"
        )


def _validate(name: str, cin: int, cout: int, heads: int, squeeze: int, gate: float) -> None:
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{name}: heads={heads!r} must be a positive integer")
    if cin % heads or cout % heads:
        raise ValueError(
            f"{name}: heads={heads} must divide both in_channels={cin} and "
            f"out_channels={cout}; pick a divisor of {math.gcd(cin, cout)}"
        )
    if not 0.0 < gate <= 1.0:
        raise ValueError(
            f"{name}: gate_factor={gate!r} must be in (0, 1] "
            "(it is the kept fraction of input channels)"
        )
    if target_inactive_channels(cin, gate) >= cin:
        raise ValueError(
            f"{name}: gate_factor={gate!r} keeps no channel of in_channels={cin}; "
            f"it must be at least {1.0 / (2 * cin):.4g}"
        )
    if not isinstance(squeeze, int) or squeeze < 1 or cin // effective_squeeze(cin, squeeze) < 1:
        raise ValueError(
            f"{name}: squeeze_rate={squeeze!r} leaves no hidden unit for "
            f"in_channels={cin} (effective squeeze {effective_squeeze(cin, squeeze)}"
            f" must be <= {cin}); use a smaller squeeze_rate"
        )
