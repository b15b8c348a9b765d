"""Dynamic Group Convolution layer.

Su, Fang, Kang, Hu, Pietikäinen, Liu, "Dynamic Group Convolution for Accelerating Convolutional
Neural Networks", ECCV 2020 (arXiv 2007.04242). Spec: docs/methods.md 1.1 to 1.4 and 1.7.

The layer holds the parameters, validates them and says, in ``forward``, which path runs and
why; the paths live beside it: the saliency generators (``dgc.layers.saliency``), the autograd
functions (``dgc.layers.dgc_autograd``), the per-shape choice of training and eval kernels
(``dgc.layers.dgc_kernels``), the fused native eval (``dgc.layers.fused_eval``) and what a trace
records (``dgc.layers.tracing``). docs/internals.md draws the layout.

Differences from the reference code (all deliberate, none changes the maths):

* The reference convolves all channels (pruned ones are zeros). Here only each sample's kept
  channels are convolved (``dgc.layers.gathered``): in training by the gathered conv when at
  most half the channels are kept, in eval by the fastest of its equivalent kernels for the
  input shape. On the CPU one of them is native (``dgc.layers.native``): where it wins, the
  whole eval forward (BN-ReLU, pooling, generators, selection, conv) is one call.
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

import math
from typing import Any

import torch
from torch import Tensor
from torch import nn

from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.dgc_kernels import DgcKernels
from dgc.layers.fused_eval import FusedEval
from dgc.layers.fused_eval import FusesEpilogue
from dgc.layers.fused_eval import fusable
from dgc.layers.norm import bn_relu
from dgc.layers.norm import hooked
from dgc.layers.norm import native_bn_relu_applies
from dgc.layers.norm import native_bn_relu_train
from dgc.layers.plan_cache import PlanCache
from dgc.layers.saliency import SALIENCY_MODES
from dgc.layers.saliency import SaliencyGate
from dgc.layers.saliency import saliencies
from dgc.layers.schedule import target_inactive_channels
from dgc.layers.tracing import record_dgc_eval
from dgc.layers.tracing import tracing

NARROW_LAYER_CHANNELS = 80
IMPLS = ("auto", "masked", "gather")


def effective_squeeze(in_channels: int, squeeze_rate: int) -> int:
    """Squeeze rate actually used: halved for narrow layers (C < 80), as the authors do."""
    return max(1, squeeze_rate // 2) if in_channels < NARROW_LAYER_CHANNELS else squeeze_rate


class DynamicGroupConv2d(nn.Module, FusesEpilogue):
    """Dynamic group convolution: ``heads`` dense convolutions, each over its own
    sample-dependent subset of the input channels, selected by a saliency generator.

    The layer owns the BN-ReLU that precedes its convolution (pre-activation style). Head i
    keeps, per sample, the input channels whose saliency is above the ``n``-th smallest, scales
    them by that saliency and convolves them into ``out_channels // heads`` outputs; the head
    outputs are interleaved (channel ``j*heads + i`` is output j of head i) so that a following
    group convolution sees every head in every group.

    ``forward`` returns a tensor. The saliency L1 term of the last forward is kept in
    ``last_saliency_loss`` (see ``dgc.aux_loss``). The number of inactive channels lives in the
    persistent buffer ``inactive_channels``, mirrored on the host in ``n_inactive``, and is set
    from outside by ``dgc.set_progress`` (``set_inactive``).

    Args:
        in_channels: C.
        out_channels: O.
        kernel_size: k.
        stride, padding, dilation: as in ``nn.Conv2d``.
        heads: h, must divide C and O.
        squeeze_rate: s of the saliency generators (halved when C < 80).
        gate_factor: g, kept fraction of the input channels, in (0, 1].
        impl: "auto" (the kernels by measured time), "masked" (always the full-width conv) or
            "gather" (always the kept channels only).
        saliency: "scale" (the paper: kept channels are multiplied by their saliency) or
            "mask" (a binary mask of the kept channels; the generators learn through a
            straight-through gradient).
        norm: the layer's own BN-ReLU before the gate (the paper); False where the network
            already normalises the input (the block's BN-ReLU is then the only one).
        gate_init: the scale of the generators' initial fc2 weights (``SaliencyGate``).
        name: layer name used in error messages.
    """

    # True only in the private eval network of a shipped program (``dgc.program.seal``): no
    # hooks, eval mode, plain BNs, no grad, and its tensors views of the program's buffers,
    # rebuilt as a whole when those change; its eval calls then skip the per-call checks.
    sealed = False
    # Registered buffers (``nn.Module.__getattr__`` finds them; annotated for the type checker).
    inactive_channels: Tensor
    eval_rows: Tensor
    eval_taps: Tensor

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
        gate_init: float = 1.0,
        name: str = "DynamicGroupConv2d",
    ) -> None:
        super().__init__()
        _validate(name, in_channels, out_channels, heads, squeeze_rate, gate_factor)
        if not gate_init > 0:
            raise ValueError(f"{name}: gate_init={gate_init!r} must be > 0 (1: the paper's)")
        _validate_choice(name, "impl", impl, IMPLS)
        _validate_choice(name, "saliency", saliency, SALIENCY_MODES)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.impl, self.saliency = dilation, impl, saliency
        self.heads, self.squeeze_rate, self.gate_factor = heads, squeeze_rate, gate_factor
        self.norm: nn.Module = nn.BatchNorm2d(in_channels) if norm else nn.Identity()
        self.act: nn.Module = nn.ReLU(inplace=True) if norm else nn.Identity()
        hidden = in_channels // effective_squeeze(in_channels, squeeze_rate)
        self.gate = SaliencyGate(in_channels, heads, hidden, gate_init)
        # Rows [i*O/h, (i+1)*O/h) are head i's dense kernel over all C input channels.
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        # Persistent (saved in checkpoints). Its host-side mirror ``n_inactive`` gives forward a
        # Python int without reading the device tensor (a GPU->CPU sync) on every step.
        self.register_buffer("inactive_channels", torch.zeros((), dtype=torch.long))
        self.n_inactive = 0
        # A trace (TorchScript, torch.export) records the eval forward as one dgc operator
        # that runs it eagerly (``dgc.layers.shipped``); False: plain torch operators.
        self.ship_op = True
        self.kernels = DgcKernels()  # the kernel chosen per input shape, training and eval
        self.fused = FusedEval()  # native eval plans per input shape
        # The weight in the gathered kernels' row layouts, rebuilt when the weight changes.
        # Buffers, so that ``.to()``, tracing and torch.export see them like any buffer.
        self.register_buffer("eval_rows", torch.empty(0), persistent=False)
        self.register_buffer("eval_taps", torch.empty(0), persistent=False)
        self._rows = PlanCache()
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
        if n == self.n_inactive:
            return  # set_progress calls this every step; no device write when nothing changes
        self.inactive_channels.fill_(n)
        self.n_inactive = int(n)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if not self.inactive_channels.is_meta:
            self.n_inactive = int(self.inactive_channels)  # one sync per load, not per step

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, O, H', W')
        if not (self.training or torch.is_grad_enabled()):
            # Eager eval without grad: the whole forward in one native call, where this
            # shape's chosen kernel is the native one and nothing it bypasses has hooks.
            y = self.fused.run(self, x)  # (B, O, H', W'), or None where it does not apply
            if y is not None:
                return y
        if not self.training and self.ship_op and tracing() and fusable(self, x):
            # A trace or export of the eval model records one dgc operator, which runs this
            # eager forward (native kernels and kernel choice included) wherever it is loaded.
            return record_dgc_eval(self, x)  # (B, O, H', W')
        z, sal = self._normalise_and_gate(x)  # (B, C, H, W), (B, h, C)
        # Kept only when training (the loss needs it); inference and export stay stateless.
        self.last_saliency_loss = sal.mean(dim=(0, 2)).sum() if self.training else None
        if torch.is_grad_enabled() and (self.training or not tracing()):
            # Training, or eager eval with grad: autograd through the chosen training kernels.
            return self.kernels.train(self, z, sal)  # (B, O, H', W')
        # No grad (or an eval trace with grad, as MLflow logs): the eval kernels, timed as
        # whole forwards from x where the eager call has it.
        return self.kernels.infer(self, z, sal, None if torch.is_grad_enabled() else x)

    def forward_epilogue(
        self,
        x: Tensor,
        bn: nn.Module,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
    ) -> Tensor | None:
        """``act(bn(self(x)) + residual)`` (no ``act``: no ReLU; no ``residual``: none added)
        in the one native call of the fused eval, the BN, the addition and the ReLU applied to
        each output tile while it is in registers: a ResNet block's eval conv-BN(-ReLU) and
        conv-BN-add-ReLU at batch 1 otherwise ran three more torch ops over the output per
        layer (docs/benchmarks.md 6.2). None where it does not apply: the fused forward does
        not, grad or training, hooks on this layer or on ``bn``/``act``, a BN that is not a
        plain eval one, an ``act`` that is not a ReLU, a residual of another shape or kind."""
        return self.fused.epilogue(self, x, bn, act, residual)  # (B, O, H', W') or None

    def _normalise_and_gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The layer's BN-ReLU of x and the saliencies (B, h, C) of the result. In a CPU
        float32 training step both come from one native pass (``norm.BatchNormReLU``, which
        pools for the gate too) where the BN and ReLU are plain and nothing has hooks."""
        m = self._modules
        norm, act = m["norm"], m["act"]
        assert norm is not None and act is not None  # registered in __init__
        if self.training and native_bn_relu_applies(norm, act, x):
            gate = m["gate"]
            assert gate is not None
            if not hooked(gate, norm, act) and native.trains(x, self.weight, self.dilation):
                z, sums = native_bn_relu_train(norm, x)  # (B, C, H, W), (B, C)
                return z, self.gate(sums, 1.0 / (x.shape[2] * x.shape[3]))  # (B, h, C)
        z = bn_relu(norm, act, x)  # (B, C, H, W)
        return z, saliencies(self.gate, z)  # (B, h, C), float32 under autocast too

    def weight_rows(self, taps_major: bool = False) -> Tensor:
        """The weight in ``gathered.weight_rows`` layout, rebuilt only when the weight changed.
        A trace or export records the layout current at that time."""
        name = "eval_taps" if taps_major else "eval_rows"
        if tracing():
            cached = getattr(self, name)
            return cached if cached.numel() else G.weight_rows(self.weight, self.heads, taps_major)

        def build() -> Tensor:
            rows = G.weight_rows(self.weight.detach(), self.heads, taps_major)
            setattr(self, name, rows)
            return rows

        rows = self._rows.get(name, lambda: [self.weight], build)
        assert rows is not None
        return rows

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, heads={self.heads}, "
            f"squeeze_rate={self.squeeze_rate}, gate_factor={self.gate_factor}"
        )


def _validate_choice(name: str, field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: {field}={value!r} must be one of {choices}")


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
