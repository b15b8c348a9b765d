"""The DGC layer's choice among its equivalent kernels, in training and in eval.

Every kernel computes the same convolution of the kept channels (docs/methods.md 1.1), heads
interleaved; they differ in what they execute (``dgc.layers.gathered``, ``dgc.layers.
dgc_autograd``, ``dgc.layers.native``). The layer owns one ``DgcKernels``, the same object on
every device; it settles each input shape's kernel by measured time, once, like
``torch.backends.cudnn.benchmark`` (``KernelChoice``), and a checkpoint carries the choices
(``dgc.kernel_choices``).

Training (grad enabled): the fastest of three formulations for the input shape and kept
fraction, on every device (forward and backward timed together): the gathered conv over the
kept channels only (``GatheredGroupConv``; its forward by the batch-folded grouped conv or the
native kernel, its backward by the grouped conv's or the native gradients, each timed per
shape on the CPU), the masked full-width conv with groups = heads (``GatedGroupConv``), and the
per-sample folded weights (``FoldedGroupConv``). The full-width two read the kept count from
the layer's buffer on the device (``saliency.deactivate_bottom``): what ``torch.compile``
records (they never recompile as the count moves) and what a CUDA graph can capture. Under
deterministic algorithms nothing is timed: the masked formulation on a GPU, on the CPU the
gathered one where at most ``GATHER_MAX_KEPT`` of the channels are kept.

Eval (no grad): the fastest for the shape of ``bmm`` (1x1), ``fold``, ``unfold``, ``direct``
(native, eager only) and, for ``impl="auto"``, the full-width ``masked`` conv. With the layer's
raw input the candidates are timed as whole forwards, the native one being the fused forward
of ``dgc.layers.fused_eval``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.dgc_autograd import FoldedGroupConv
from dgc.layers.dgc_autograd import GatedGroupConv
from dgc.layers.dgc_autograd import GatheredGroupConv
from dgc.layers.dgc_autograd import gathered_backward
from dgc.layers.dgc_autograd import masked_conv
from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.norm import bn_relu
from dgc.layers.saliency import deactivate_bottom
from dgc.layers.saliency import deactivate_bottom_k
from dgc.layers.saliency import kept_scale
from dgc.layers.saliency import saliencies
from dgc.layers.tracing import traceable
from dgc.layers.tracing import tracing

if TYPE_CHECKING:
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d

# Without timing (deterministic algorithms), the CPU gathers the kept channels in training when
# at most this fraction of them is kept; above it the per-sample grouped conv no longer beats
# one full-width grouped conv (bench/dgc_layer.py).
GATHER_MAX_KEPT = 0.5
#: the training formulations that convolve every channel (their shapes never depend on the
#: kept count)
FULL_WIDTH = ("masked", "folded")
#: the gathered formulation's own kernels: pinning one of them pins that formulation
GATHERED_KERNELS = ("fold", "direct")
#: training kernels (formulation, native forward and backward) are timed again when the kept
#: fraction moves by one of this many parts
FORMULATION_BUCKETS = 8
#: the folded formulation makes a weight per sample: a candidate up to this many elements
FOLDED_MAX_ELEMENTS = 1 << 26
Conv = tuple[int, int, int]  # (stride, padding, dilation)


class DgcKernels(KernelChoice):
    """A DGC layer's per-shape kernel choices (see the module docstring) and the calls that run
    them. ``KernelChoice``'s arguments pin or exclude kernels, e.g. ``prefer="direct"``."""

    def __init__(
        self,
        measure: bool | None = None,
        prefer: str | None = None,
        exclude: tuple[str, ...] = (),
        patience: int | None = None,
    ) -> None:
        super().__init__(measure, prefer, exclude, patience)
        self._offsets: dict[tuple, tuple[Tensor, Tensor]] = {}

    # -- training -------------------------------------------------------------------------

    def train(self, layer: DynamicGroupConv2d, x: Tensor, sal: Tensor) -> Tensor:
        """The convolution with autograd: x (B, C, H, W) after the layer's BN-ReLU, sal
        (B, h, C) its saliencies -> (B, O, H', W')."""
        conv = (layer.stride, layer.padding, layer.dilation)
        if tracing():  # torch.compile, export: nothing may depend on the kept count's value
            return full_width(layer, x, sal, conv, self._traced_formulation())
        name = self._formulation(layer, x, sal)
        if name == "gathered":
            return self._gathered(layer, x, sal, conv)  # (B, O, H', W')
        return full_width(layer, x, sal, conv, name)  # (B, O, H', W')

    def _traced_formulation(self) -> str:
        """What a recorded training step runs: the pinned formulation if it is one of the
        full-width ones, else the masked one."""
        return self.prefer if self.prefer in FULL_WIDTH else "masked"

    def _formulation(self, layer: DynamicGroupConv2d, x: Tensor, sal: Tensor) -> str:
        """The training formulation for this step: the layer's ``impl`` where it names one,
        else the fastest for the input shape and kept fraction (forward and backward timed
        once, ``FORMULATION_BUCKETS`` kept fractions apart), else the device's default."""
        n = layer.n_inactive
        if layer.impl != "auto":  # "gather" keeps every channel at n = 0: the masked conv
            return "gathered" if layer.impl == "gather" and n > 0 else "masked"
        names = formulations(layer, x, n)
        if self.prefer in GATHERED_KERNELS:  # a pin of the gathered conv's kernels: as "gather"
            return "gathered" if n > 0 else "masked"
        key = ("formulation", tuple(x.shape), x.dtype, x.device, kept_bucket(layer), n == 0)
        name = self.known(key, names)
        if name is None:
            kernels = {
                nm: functools.partial(self._timed_step, layer, nm, x.detach(), sal.detach())
                for nm in names
            }
            self.run(key, kernels, default_formulation(layer, x, names))
            name = self.last
        assert name is not None
        return name

    def _timed_step(self, layer: DynamicGroupConv2d, name: str, x: Tensor, sal: Tensor) -> Tensor:
        """One forward and backward of formulation ``name`` on copies (the layer's gradients
        and choices are left as they were), a random output gradient: what is timed."""
        x, sal = x.requires_grad_(), sal.requires_grad_()
        conv = (layer.stride, layer.padding, layer.dilation)
        weight = layer.weight.detach().requires_grad_()
        with torch.enable_grad():
            if name == "gathered":
                y = self._gathered(layer, x, sal, conv, weight)
            else:
                y = full_width(layer, x, sal, conv, name, weight)
            y.backward(torch.ones_like(y))
        return y.detach()

    def _gathered(
        self,
        layer: DynamicGroupConv2d,
        x: Tensor,
        sal: Tensor,
        conv: Conv,
        weight: Tensor | None = None,
    ) -> Tensor:
        """The kept channels only (``GatheredGroupConv``), its forward and backward on the
        native kernels where they are timed faster (CPU, float32)."""
        weight = layer.weight if weight is None else weight
        native_ok = native.trains(x, layer.weight, layer.dilation)  # once a step
        select = native.select_channels if native_ok else G.select_channels
        index, scale = select(sal, layer.n_inactive)  # (B, h, K) each
        scale = kept_scale(scale, layer.saliency)
        if layer.kernel_size == 1 and layer.padding == 0 and layer.stride > 1:
            # A strided 1x1 conv reads every stride-th pixel only: convolve those at stride 1,
            # where the native input gradient runs. oneDNN's batch-folded grouped backward ran
            # DyResNet-20's first downsample at 0.3 GMAC/s (12 ms of a 64-batch step;
            # docs/benchmarks.md 6.3). Autograd scatters the gradient.
            x = x[:, :, :: layer.stride, :: layer.stride].contiguous()  # (B, C, H', W')
            conv = (1, 0, layer.dilation)
        direct = native_ok and self._native_forward(layer, x, index, scale, conv)
        backward = native_ok and self._native_backward(layer, x, index, scale, conv)
        return GatheredGroupConv.apply(x, scale, weight, index, *conv, direct, backward)

    def _native_forward(
        self, layer: DynamicGroupConv2d, x: Tensor, index: Tensor, scale: Tensor, conv: Conv
    ) -> bool:
        """Whether the training forward convolves with the native kernel rather than the
        batch-folded grouped conv: timed against it once per input shape (the caller checked
        ``native.trains``). conv: the convolution as run."""
        key = ("train", tuple(x.shape), x.dtype, kept_bucket(layer))
        name = self.known(key, ("fold", "direct"))
        if name is None:
            k = layer.kernel_size
            with torch.no_grad():
                inputs = (x, index, scale, G.weight_rows(layer.weight.detach(), layer.heads))
                kernels = {
                    "fold": functools.partial(G.fold_conv, *inputs, k, conv),
                    "direct": functools.partial(
                        native.direct_conv, *inputs, (layer.out_channels, k), conv
                    ),
                }
                self.run(key, kernels, "fold")
            name = self.last
        return name == "direct"

    def _native_backward(
        self, layer: DynamicGroupConv2d, x: Tensor, index: Tensor, scale: Tensor, conv: Conv
    ) -> bool:
        """Whether the backward runs the native kernels (``direct``: the weight and input
        gradients) rather than the batch-folded grouped conv's backward (``fold``): the whole
        backward timed both ways once per input shape, on a random output gradient (kernel
        size 1 or 3; the caller checked ``native.trains``)."""
        if layer.kernel_size not in (1, 3):
            return False
        key = ("backward", tuple(x.shape), x.dtype, kept_bucket(layer))
        name = self.known(key, ("fold", "direct"))  # the forward's names: one pin
        if name is None:
            k, (stride, padding, _) = layer.kernel_size, conv
            ho, wo = ((n + 2 * padding - k) // stride + 1 for n in x.shape[2:])
            with torch.no_grad():
                rows = G.weight_rows(layer.weight.detach(), layer.heads)
                grad = torch.randn(x.shape[0], layer.out_channels, ho, wo)  # (B, O, H', W')
                inputs = (x.detach(), scale.detach(), rows, index, grad, conv, layer.weight.shape)
                kernels = {
                    nm: functools.partial(gathered_backward, *inputs, nm == "direct")
                    for nm in ("fold", "direct")
                }
                self.run(key, kernels, "fold")
            name = self.last
        return name == "direct"

    # -- eval -------------------------------------------------------------------------------

    def infer(
        self, layer: DynamicGroupConv2d, x: Tensor, sal: Tensor, raw: Tensor | None = None
    ) -> Tensor:
        """No autograd: the fastest kernel for this input shape, (B, O, H', W').

        ``raw`` is the layer's input before its BN-ReLU (eager eval without grad): with it the
        candidates are timed as whole forwards, the native fused one among them. Once a shape's
        kernel is chosen, eager calls go straight to it: no candidate table is built, and the
        row offsets of the gathers come from a per-batch-size cache. At batch 1 the narrow
        networks spend most of their time in such per-call work (docs/benchmarks.md 6.2).
        """
        if layer.impl == "masked":
            return eval_kernel(layer, "masked", x, sal, sal, sal)  # (B, O, H', W')
        index, scale = G.select_channels(sal, layer.n_inactive)  # (B, h, K) each
        scale = kept_scale(scale, layer.saliency)
        traced = tracing()
        names = self._eval_names(layer, x, traced)
        key = (tuple(x.shape), x.dtype, x.device, layer.n_inactive)
        name = None if traced else self.known(key, names)
        if name is not None:
            offsets = self._row_offsets(layer, x.shape[0], x.device)
            return eval_kernel(layer, name, x, sal, index, scale, offsets)  # (B, O, H', W')
        plan = layer.fused.plan_args(layer, raw) if raw is not None and "direct" in names else None
        if plan is None:
            kernels = {
                nm: functools.partial(eval_kernel, layer, nm, x, sal, index, scale) for nm in names
            }
        else:  # whole forwards: the native one skips the torch BN, gate and selection too
            assert raw is not None  # a plan is made from it
            kernels = {nm: functools.partial(self._whole, layer, nm, raw) for nm in names}
            kernels["direct"] = functools.partial(native.FusedPlan(tuple(raw.shape), *plan), raw)
        return self.run(key, kernels, names[0])  # (B, O, H', W')

    def _eval_names(self, layer: DynamicGroupConv2d, x: Tensor, traced: bool) -> tuple[str, ...]:
        """The eval candidates for this call, the default first."""
        one = layer.kernel_size == 1 and layer.padding == 0
        names: tuple[str, ...] = ("bmm",) if one else ("fold", "unfold")
        if not traced and native.supported(x, layer.weight, layer.dilation):
            names = (*names, "direct")  # a ctypes call: eager only, never in a trace
        return (*names, "masked") if layer.impl == "auto" else names

    def _whole(self, layer: DynamicGroupConv2d, name: str, raw: Tensor) -> Tensor:
        """The whole eval forward from the layer's input with torch kernel ``name``: what a
        torch kernel is timed as when the fused native forward is a candidate."""
        x = bn_relu(layer.norm, layer.act, raw)  # (B, C, H, W)
        sal = saliencies(layer.gate, x)  # (B, h, C)
        if name == "masked":
            return eval_kernel(layer, name, x, sal, sal, sal)  # (B, O, H', W')
        index, scale = G.select_channels(sal, layer.n_inactive)  # (B, h, K) each
        return eval_kernel(layer, name, x, sal, index, kept_scale(scale, layer.saliency))

    def _row_offsets(
        self, layer: DynamicGroupConv2d, batch: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """``gathered.row_offsets`` for this batch size, made once per (batch, device)."""
        key = (batch, device)
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = G.row_offsets(batch, layer.heads, layer.in_channels, device)
            self._offsets[key] = offsets
        return offsets


def full_width(
    layer: DynamicGroupConv2d,
    x: Tensor,
    sal: Tensor,
    conv: Conv,
    name: str,
    weight: Tensor | None = None,
) -> Tensor:
    """The masked or folded formulation: every channel convolved, the pruned ones with
    saliency 0 (no shape depends on the kept count); while a trace, torch.compile or a CUDA
    graph records it, the kept count is read from the layer's buffer on the device."""
    weight = layer.weight if weight is None else weight
    if tracing() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        kept = deactivate_bottom(sal, layer.inactive_channels)  # n read on the device
    else:  # eager: the host's n, one kthvalue where the device version sorts and gathers
        kept = deactivate_bottom_k(sal, layer.n_inactive)
    kept = kept_scale(kept, layer.saliency)
    if name == "folded":
        return FoldedGroupConv.apply(x, kept, weight, *conv)  # (B, O, H', W'), in order
    y = GatedGroupConv.apply(x, kept, weight, *conv)  # (B, O, H', W'), head-major
    return G.interleave(y, layer.heads)


def kept_bucket(layer: DynamicGroupConv2d) -> int:
    """The kept fraction in ``FORMULATION_BUCKETS`` parts, rounded up: training kernels are
    timed once per part (the ramp changes the kept count at nearly every step; the kernels'
    relative speed changes with it slowly)."""
    c = layer.in_channels
    return -(-FORMULATION_BUCKETS * (c - layer.n_inactive) // c)


def formulations(layer: DynamicGroupConv2d, x: Tensor, n: int) -> tuple[str, ...]:
    """The candidates: gathered where channels are pruned; folded where a weight per
    sample stays small (``FOLDED_MAX_ELEMENTS``)."""
    names: tuple[str, ...] = ("gathered",) if n > 0 else ()
    names += ("masked",)
    if x.shape[0] * layer.weight.numel() <= FOLDED_MAX_ELEMENTS:
        names += ("folded",)
    return names


def default_formulation(layer: DynamicGroupConv2d, x: Tensor, names: tuple[str, ...]) -> str:
    """Without timing (deterministic algorithms): the masked formulation on a GPU, where
    per-sample gathers and narrow groups are slow; elsewhere the gathered one where at
    most ``GATHER_MAX_KEPT`` of the channels are kept."""
    if x.device.type != "cpu" or "gathered" not in names:
        return "masked"
    gather = layer.in_channels - layer.n_inactive <= GATHER_MAX_KEPT * layer.in_channels
    return "gathered" if gather else "masked"


def eval_kernel(
    layer: DynamicGroupConv2d,
    name: str,
    x: Tensor,
    sal: Tensor,
    index: Tensor,
    scale: Tensor,
    offsets: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run eval kernel ``name``; all return (B, O, H', W'), heads interleaved."""
    t = traceable  # while tracing, scripted kernels keep the batch size dynamic
    conv, k = (layer.stride, layer.padding, layer.dilation), layer.kernel_size
    if name == "bmm":
        return t(G.bmm_conv)(x, index, scale, layer.weight_rows(), layer.stride, offsets)
    if name == "fold":
        return t(G.fold_conv)(x, index, scale, layer.weight_rows(), k, conv, offsets)
    if name == "unfold":
        return t(G.unfold_conv)(x, index, scale, layer.weight_rows(True), k, conv, offsets)
    if name == "direct":
        shape = (layer.out_channels, k)
        return native.direct_conv(x, index, scale, layer.weight_rows(), shape, conv)
    n, heads = layer.n_inactive, layer.heads
    if layer.saliency == "scale":
        return t(masked_conv)(x, sal, layer.weight, n, heads, conv)
    mask = kept_scale(deactivate_bottom_k(sal, n), "mask")  # (B, h, C) of 0/1
    return t(masked_conv)(x, mask, layer.weight, 0, heads, conv)
