"""The DGC layer's and the DenseNets' BN-ReLU-group conv's eval forwards as registered
operators, for the programs that ship.

A TorchScript trace or ``torch.export`` records torch operators; a ctypes call into the native
kernel, or a layer's per-shape kernel choice, cannot be recorded. So an eval
``DynamicGroupConv2d`` that is being traced records one call to
``torch.ops.dgc.dynamic_group_conv_eval`` instead of its torch kernels (a
``PreactGroupConv2d``: ``torch.ops.dgc.preact_group_conv_eval``), and that operator runs the
eager eval forward: BN-ReLU, gate, selection and the fastest kernel for the input shape (the
native one where it wins), chosen when the program first sees that shape, at whatever batch
size it runs. The program's layers then run the eager model's code (docs/benchmarks.md 6.4
measures the programs against the eager model). ``search export``'s ``model.ts`` and the
MLflow model record the whole network as one operator instead (``dgc.program``); these serve
any other trace or export of a dgc model.

The operators are registered by ``import dgc``: a process loading such a program must import
``dgc`` first (``torch.jit.load`` and ``torch.export.load`` otherwise report the unknown op).
A trace of plain torch operators, loadable without ``dgc`` and slower, is still available:
set ``ship_op = False`` on every module that has it before tracing (``search export`` writes
both, as ``model.ts`` and ``model_portable.ts``).

Per call an operator finds the eager layer built around the tensors it receives: an LRU
cache keyed by their storage addresses holds those layers (and so keeps their tensors alive:
up to ``CACHED_LAYERS`` layers' parameters after a program is dropped); a cached layer
checks its tensors' versions itself, so an in-place parameter update rebuilds its plan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
from typing import Generic
from typing import TypeVar
from typing import cast

import torch
from torch import Tensor
from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.group_conv import PreactGroupConv2d
from dgc.layers.saliency import SaliencyGate

OP_NAME = "dgc::dynamic_group_conv_eval"
CACHED_LAYERS = 512

if TYPE_CHECKING:  # typing.Unpack is Python 3.11+; the package supports 3.10
    from typing import Unpack

    # The tensors an operator receives: the weight first, then the others (optional: None).
    Tensors = tuple[Tensor, Unpack[tuple[Tensor | None, ...]]]
    # The DGC operator's: weight, fc1, fc2, fc2 bias, then the BN's mean, var, weight, bias.
    DgcTensors = tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None
    ]
    # The group conv operator's: weight, then the BN's mean, var, weight and bias.
    GroupConvTensors = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]
T = TypeVar("T", bound="Tensors")
M = TypeVar("M", bound=nn.Module)


class _Layers(Generic[T, M]):
    """Eager layers by the storages of their tensors and their settings (LRU, thread-safe),
    built by ``rebuild(tensors, settings)``.

    A cached layer holds its tensors, so no other tensor can reuse their addresses while the
    entry lives; the weight's (first tensor's) shape, dtype and device are part of the key."""

    def __init__(self, size: int, rebuild: Callable[[T, tuple], M]) -> None:
        self.size, self._rebuild = size, rebuild
        self._layers: OrderedDict[tuple, M] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tensors: T, settings: tuple) -> M:
        weight = tensors[0]
        key = (*[None if t is None else t.data_ptr() for t in tensors], *settings)
        key = (*key, weight.shape, weight.dtype, weight.device)
        with self._lock:
            layer = self._layers.get(key)
            if layer is not None:
                self._layers.move_to_end(key)
                return layer
        with torch.inference_mode(False):  # its own buffers keep version counters
            layer = self._rebuild(tensors, settings)  # outside the lock: builds no native plan
        with self._lock:
            layer = self._layers.setdefault(key, layer)
            if len(self._layers) > self.size:
                self._layers.popitem(last=False)
        return layer


def _layer_around(tensors: DgcTensors, settings: tuple) -> DynamicGroupConv2d:
    """An eval DGC layer whose parameters and buffers are ``tensors`` themselves (not copies)."""
    weight, fc1, fc2, b2, mean, var, bn_w, bn_b = tensors
    n, stride, padding, dilation, mask, eps = settings
    o, c, k, _ = weight.shape
    heads, hidden = fc1.shape[0], fc1.shape[1]
    layer = DynamicGroupConv2d(
        c, o, k, stride, padding, dilation, heads=heads, squeeze_rate=1,
        saliency="mask" if mask else "scale", norm=mean is not None,
    )  # fmt: skip
    layer.gate = SaliencyGate(c, heads, hidden)
    _tensors(layer.gate).update(fc1_weight=fc1, fc2_weight=fc2, fc2_bias=b2)
    _tensors(layer)["weight"] = weight
    if mean is not None:
        assert isinstance(layer.norm, nn.BatchNorm2d)  # norm=True above
        _bn_around(layer.norm, (mean, var, bn_w, bn_b), eps)
    layer.n_inactive = n
    layer.inactive_channels.fill_(n)
    return layer.eval().to(weight.device)


def _bn_around(bn: nn.BatchNorm2d, tensors: tuple[Tensor | None, ...], eps: float) -> None:
    """Make ``bn``'s statistics and affine parameters ``tensors`` (mean, var, weight, bias)."""
    mean, var, weight, bias = tensors
    bn._buffers.update(running_mean=mean, running_var=var)
    _tensors(bn).update(weight=weight, bias=bias)
    bn.affine, bn.eps = weight is not None, eps


def _tensors(module: nn.Module) -> dict[str, Tensor | None]:
    """``module._parameters``, into which these layers put the program's tensors as they are:
    plain tensors where torch declares ``nn.Parameter`` (no copy, no ``requires_grad``)."""
    return cast("dict[str, Tensor | None]", module._parameters)


_LAYERS = _Layers(CACHED_LAYERS, _layer_around)

SCHEMA = (
    "dynamic_group_conv_eval(Tensor x, Tensor weight, Tensor fc1_weight, Tensor fc2_weight, "
    "Tensor fc2_bias, Tensor? bn_mean, Tensor? bn_var, Tensor? bn_weight, Tensor? bn_bias, "
    "SymInt n_inactive, SymInt[] conv, bool mask, float eps) -> Tensor"
)


def dynamic_group_conv_eval(
    x: Tensor,
    weight: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc2_bias: Tensor,
    bn_mean: Tensor | None,
    bn_var: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    n_inactive: int,
    conv: list[int],
    mask: bool,
    eps: float,
) -> Tensor:
    """``DynamicGroupConv2d``'s eval forward: (B, C, H, W) -> (B, O, H', W')."""
    tensors = (weight, fc1_weight, fc2_weight, fc2_bias, bn_mean, bn_var, bn_weight, bn_bias)
    layer = _LAYERS.get(tensors, (n_inactive, *conv, mask, eps))
    y = layer.fused.run(layer, x, checked=True)  # the native call, once this shape's choice is made
    if y is not None:
        return y  # (B, O, H', W')
    with torch.no_grad():
        return layer(x)  # (B, O, H', W')


# A plain kernel for every backend (CompositeExplicitAutograd): the dispatcher calls it
# directly. Registered with torch.library.custom_op, whose Python autograd and backend
# wrappers run on every call, the operator cost 15 us a layer more than the eager layer, this
# kernel 3-4 us (bench/dgc_profile.py shipped, DyResNet-20 at batch 1: 20 such layers in a
# forward of 1.3-2 ms). No autograd formula: the programs that record it are eval programs.
_LIB = torch.library.Library("dgc", "DEF")  # kept alive: it owns the registration
_LIB.define(SCHEMA)
_LIB.impl("dynamic_group_conv_eval", dynamic_group_conv_eval, "CompositeExplicitAutograd")


@torch.library.register_fake(OP_NAME, lib=_LIB)
def _(
    x: Tensor, weight: Tensor, fc1_weight: Tensor, fc2_weight: Tensor, fc2_bias: Tensor, *args: Any
) -> Tensor:
    # The output's shape only: (B, O, H', W'). args: the BN's four tensors, n, conv, ...
    stride, padding, dilation = args[5]
    k = weight.shape[-1]
    span = dilation * (k - 1) + 1
    ho = (x.shape[2] + 2 * padding - span) // stride + 1
    wo = (x.shape[3] + 2 * padding - span) // stride + 1
    return x.new_empty(x.shape[0], weight.shape[0], ho, wo)


GROUP_SCHEMA = (
    "preact_group_conv_eval(Tensor x, Tensor weight, Tensor bn_mean, Tensor bn_var, "
    "Tensor? bn_weight, Tensor? bn_bias, SymInt[] conv, float eps) -> Tensor"
)


def _group_conv_around(tensors: GroupConvTensors, settings: tuple) -> PreactGroupConv2d:
    """An eval ``PreactGroupConv2d`` whose parameters and buffers are ``tensors`` themselves."""
    weight, mean, var, bn_w, bn_b = tensors
    stride, padding, groups, eps = settings
    o, cg, k, _ = weight.shape
    module = PreactGroupConv2d(cg * groups, o, k, stride, padding, groups)
    bn = module[0]
    assert isinstance(bn, nn.BatchNorm2d)  # PreactGroupConv2d's first module
    _bn_around(bn, (mean, var, bn_w, bn_b), eps)
    _tensors(module[2])["weight"] = weight
    return module.eval().to(weight.device)


_GROUP_CONVS = _Layers(CACHED_LAYERS, _group_conv_around)


def preact_group_conv_eval(
    x: Tensor,
    weight: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    conv: list[int],
    eps: float,
) -> Tensor:
    """``PreactGroupConv2d``'s eval forward: (B, C, H, W) -> (B, O, H', W'); conv: (stride,
    padding, groups)."""
    module = _GROUP_CONVS.get((weight, bn_mean, bn_var, bn_weight, bn_bias), (*conv, eps))
    with torch.no_grad():
        return module(x)  # (B, O, H', W')


_LIB.define(GROUP_SCHEMA)
_LIB.impl("preact_group_conv_eval", preact_group_conv_eval, "CompositeExplicitAutograd")


@torch.library.register_fake("dgc::preact_group_conv_eval", lib=_LIB)
def _(x: Tensor, weight: Tensor, *args: Any) -> Tensor:
    # The output's shape only: (B, O, H', W'). args: the BN's four tensors, conv, eps.
    stride, padding, _ = args[4]
    k = weight.shape[-1]
    ho = (x.shape[2] + 2 * padding - k) // stride + 1
    wo = (x.shape[3] + 2 * padding - k) // stride + 1
    return x.new_empty(x.shape[0], weight.shape[0], ho, wo)
