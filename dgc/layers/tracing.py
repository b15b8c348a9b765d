"""Tracing concerns: whether a forward is being recorded (TorchScript trace, ``torch.export``,
``torch.compile``) or only costed (``dgc.count_cost``), the scripted kernels a TorchScript
trace records as calls, and the dgc operators an eval layer records instead of its kernels
(``dgc.layers.shipped``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch import nn

if TYPE_CHECKING:
    from dgc.layers.dynamic_group_conv import DynamicGroupConv2d


_COSTING: ContextVar[bool] = ContextVar("dgc_costing", default=False)


def tracing() -> bool:
    """True while TorchScript tracing, torch.export or torch.compile records the forward."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@contextmanager
def costing() -> Iterator[None]:
    """While dgc counts a model's cost (``dgc.count_cost``) or builds one to cost
    (``dgc.on_meta``): no layer times its kernels or settles a choice, and the native kernels
    stand aside; the counting forward is one zero sample, often on the meta device, whose
    timings would cost more than the count and mean nothing. (A flag, not a torch dispatch
    mode: torch imports its compiler, about 2 s, at a dispatch mode's first call.)"""
    token = _COSTING.set(True)
    try:
        yield
    finally:
        _COSTING.reset(token)


def is_costing() -> bool:
    """True inside ``costing()``."""
    return _COSTING.get()


def traceable(fn: Callable) -> Callable:
    """``fn``, or its TorchScript-compiled version while ``torch.jit.trace`` records a forward.

    The kernels derive sizes from the batch (groups = B*heads, row offsets): traced as Python
    they would be frozen at the example's batch size, and ``search export``'s TorchScript
    would fail at any other. A scripted call is recorded as a call, with its sizes computed at
    run time.
    """
    return _scripted(fn) if torch.jit.is_tracing() else fn


@functools.cache
def _scripted(fn: Callable) -> Callable:
    return torch.jit.script(fn)


def record_dgc_eval(layer: DynamicGroupConv2d, x: Tensor) -> Tensor:
    """What a trace records of an eval DGC layer: one ``torch.ops.dgc.dynamic_group_conv_eval``
    call (registered by ``dgc.layers.shipped``), which runs the eager eval forward wherever
    the program runs. (B, C, H, W) -> (B, O, H', W')."""
    bn = layer.norm if isinstance(layer.norm, nn.BatchNorm2d) else None
    norm = (None,) * 4 if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    gate = layer.gate
    return torch.ops.dgc.dynamic_group_conv_eval(
        x,
        layer.weight,
        gate.fc1_weight,
        gate.fc2_weight,
        gate.fc2_bias,
        *norm,
        layer.n_inactive,
        [layer.stride, layer.padding, layer.dilation],
        layer.saliency == "mask",
        bn.eps if bn is not None else 0.0,
    )  # (B, O, H', W')


def record_group_conv_eval(bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor) -> Tensor:
    """What a trace records of an eval ``PreactGroupConv2d`` (``bn``, ReLU, ``conv``): one
    ``torch.ops.dgc.preact_group_conv_eval`` call. (B, C, H, W) -> (B, O, H', W')."""
    return torch.ops.dgc.preact_group_conv_eval(
        x,
        conv.weight,
        bn.running_mean,
        bn.running_var,
        bn.weight,
        bn.bias,
        [conv.stride[0], conv.padding[0], conv.groups],
        bn.eps,
    )  # (B, O, H', W')
