"""A DGC layer's whole eval forward as one native call (``native.FusedPlan``).

Where a layer's chosen eval kernel for an input shape is the native one (``direct``), an eager
eval call without grad runs BN-ReLU, pooling, the saliency generators, the selection and the
kept-channel convolution inside one call, so the normalised input is never written and no torch
op runs between them; optionally also the BN, residual addition and ReLU that follow the layer
in a ResNet block (``epilogue``), applied to each output tile while it is in registers. It
steps aside (returns None) wherever the call would not compute the layer's modules as they are:
the first call at a shape (not yet timed), tracing, autocast, hooks on the modules it bypasses,
a norm that is not a plain eval BatchNorm, another dtype or device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch import nn

from dgc.layers import native
from dgc.layers.norm import eval_affine
from dgc.layers.norm import hooked
from dgc.layers.norm import plain_eval_bn
from dgc.layers.plan_cache import PlanCache
from dgc.layers.tracing import tracing

if TYPE_CHECKING:
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d

# ``native.FusedPlan``'s arguments after the shape: norm (scale, shift) or None, the gate's
# (fc1, fc2, fc2 bias), n_inactive, mask, weight, conv (stride, padding, dilation), rows.
PlanArgs = tuple[
    tuple[Tensor, Tensor] | None,
    tuple[Tensor, Tensor, Tensor],
    int,
    bool,
    Tensor,
    tuple[int, int, int],
    Tensor,
]


class FusedEval:
    """A layer's native eval plans, one per (input shape, epilogue), each rebuilt when a
    parameter or buffer it reads changes (an optimizer step, ``load_state_dict``, ``.to()``)."""

    def __init__(self) -> None:
        self.plans = PlanCache()

    def run(self, layer: DynamicGroupConv2d, x: Tensor, checked: bool = False) -> Tensor | None:
        """The layer's eval forward of x (B, C, H, W) in one native call, or None where it does
        not apply. ``checked``: the caller knows the call fusable, as dgc's operator does of
        its layers (``dgc.layers.shipped``: no hooks, a plain BN or none, no trace)."""
        key = self._key(layer, x, checked)
        plan = None if key is None else self._plan(layer, key, x)
        return None if plan is None else plan(x)  # (B, O, H', W')

    def epilogue(
        self,
        layer: DynamicGroupConv2d,
        x: Tensor,
        bn: nn.Module,
        act: nn.Module | None,
        residual: Tensor | None,
    ) -> Tensor | None:
        """``act(bn(layer(x)) + residual)`` in the one call of ``run`` (see
        ``DynamicGroupConv2d.forward_epilogue``), or None where it does not apply."""
        if not (layer.sealed or _epilogue_applies(layer, bn, act)):
            return None
        if residual is not None and (
            residual.dtype != torch.float32 or residual.device.type != "cpu"
        ):
            return None
        key = self._key(layer, x, False)
        if key is None:
            return None
        plan = self._plan(layer, (*key, id(bn), act is not None), x, bn, act is not None)
        if plan is None or (residual is not None and tuple(residual.shape) != plan.out_shape):
            return None
        return plan(x, residual)  # (B, O, H', W')

    def plan_args(self, layer: DynamicGroupConv2d, x: Tensor) -> PlanArgs | None:
        """``native.FusedPlan``'s arguments after the shape, or None where it cannot run."""
        if not native.supported(x, layer.weight, layer.dilation) or not fusable(layer, x):
            return None
        bn = layer.norm
        if isinstance(bn, nn.Identity):
            norm = None
        else:
            assert isinstance(bn, nn.BatchNorm2d)  # fusable: a plain eval BN where not Identity
            norm = eval_affine(bn)
        gate = (layer.gate.fc1_weight, layer.gate.fc2_weight, layer.gate.fc2_bias)
        conv = (layer.stride, layer.padding, layer.dilation)
        mask = layer.saliency == "mask"
        rows = layer.weight_rows()  # shared by the direct kernel and every plan
        return norm, gate, layer.n_inactive, mask, layer.weight, conv, rows

    def _key(self, layer: DynamicGroupConv2d, x: Tensor, checked: bool) -> tuple | None:
        """This input's plan key where the fused forward applies to it (this shape's chosen
        kernel is ``direct``), else None."""
        key = (tuple(x.shape), x.dtype, x.device, layer.n_inactive)
        if layer.kernels.known(key, ("direct",)) is None:
            return None
        if not (checked or _call_fusable(layer, x)):
            return None
        if not native.supported(x, layer.weight, layer.dilation):
            return None  # a dispatch mode now (FlopCounterMode): torch's kernels
        return key

    def _plan(
        self,
        layer: DynamicGroupConv2d,
        key: tuple,
        x: Tensor,
        bn: nn.Module | None = None,
        relu: bool = False,
    ) -> native.FusedPlan | None:
        """The native plan for ``key``; ``bn``, ``relu``: its epilogue, a plain eval
        BatchNorm2d (``epilogue`` checked it, or the layer is sealed)."""

        def sources() -> list[Tensor | None]:
            # Read through the modules' dicts: nn.Module.__getattr__ costs about a
            # microsecond each, on every eval call.
            gate, norm = layer._modules["gate"], layer._modules["norm"]
            assert gate is not None and norm is not None  # registered by the layer
            tensors: list[Tensor | None] = [*layer._parameters.values(), *gate._parameters.values()]
            for m in (norm,) if bn is None else (norm, bn):
                tensors += [*m._parameters.values(), *m._buffers.values()]
            return tensors

        def build() -> native.FusedPlan | None:
            args = self.plan_args(layer, x)
            if args is None:
                return None
            assert bn is None or isinstance(bn, nn.BatchNorm2d)
            epilogue = None if bn is None else (*eval_affine(bn), relu)
            return native.FusedPlan(tuple(x.shape), *args, epilogue=epilogue)

        return self.plans.get(key, sources, build, sealed=layer.sealed)


def fusable(layer: DynamicGroupConv2d, x: Tensor) -> bool:
    """Whether this eval forward may run as one call, the native plan's or the operator a trace
    records (``dgc.layers.shipped``): no autocast, no hooks on the submodules it bypasses, and
    a plain eval BN-ReLU or none. Checked on every eager eval call."""
    m = layer._modules
    gate, norm, act = m["gate"], m["norm"], m["act"]
    assert gate is not None and norm is not None and act is not None  # registered by the layer
    if torch.is_autocast_enabled(x.device.type) or hooked(gate, norm, act):
        return False
    no_norm = isinstance(norm, nn.Identity) and isinstance(act, nn.Identity)
    return no_norm or plain_eval_bn(norm)


def _call_fusable(layer: DynamicGroupConv2d, x: Tensor) -> bool:
    """Whether this call may run fused: not traced and ``fusable``; for a sealed layer, whose
    modules cannot change, only not under autocast."""
    if layer.sealed:
        return not torch.is_autocast_enabled(x.device.type)
    return not tracing() and fusable(layer, x)


def _epilogue_applies(layer: DynamicGroupConv2d, bn: nn.Module, act: nn.Module | None) -> bool:
    """``epilogue``'s checks of the modules: eval without grad, a plain eval BN, a plain ReLU or
    none, no hooks on the layer."""
    if layer.training or torch.is_grad_enabled() or not plain_eval_bn(bn):
        return False
    if hooked(layer):
        return False
    return act is None or (type(act) is nn.ReLU and not hooked(act))


class FusesEpilogue:
    """A convolution that can take what follows it in a ResNet block, its BN and optionally a
    residual addition and ReLU, into its own eval call (``dgc.models.resnet.conv_bn``)."""

    def forward_epilogue(
        self,
        x: Tensor,
        bn: nn.Module,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
    ) -> Tensor | None:
        """``act(bn(self(x)) + residual)``, or None where this call cannot fuse them."""
        raise NotImplementedError
