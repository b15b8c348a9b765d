"""A network's eval forward as one registered operator, for the programs that ship (the
MLflow model, ``search export``'s ``model.ts``).

``torch.export`` (MLflow's pt2 format) records a network operator by operator, and the module
that ``torch.export.load(...).module()`` rebuilds runs each of them from Python. On a small
network at batch 1 that cost more than the convolutions (DyResNet-20's logged model ran at
0.69x the eager model's speed, docs/benchmarks.md 6.4), and what makes the eager DenseNets
fast, each stage's features written in place, cannot be recorded at all (export's
functionalisation turns every in-place write into a copy of the whole tensor).

``ShippedModel(model, name, kwargs, example)`` exports (and traces) as a single call,
``torch.ops.dgc.model_eval(x, packed, spec)``: the operator builds the eager network once
around the program's own tensors (``dgc.create_model(name, **kwargs)``, then
``load_state_dict(..., assign=True)`` of views: no copies, so in-place updates are seen) and
runs its eval forward, native kernels and per-shape kernel choices included: the loaded
program runs the eager model's code and gives its outputs (docs/benchmarks.md 6.4 times
it). A process loading it must ``import dgc`` first (``torch.export.load`` and
``torch.jit.load`` otherwise report the unknown operator) and have a dgc whose
``create_model(name, **kwargs)`` has the same ``state_dict`` keys and shapes (a mismatch is
``load_state_dict``'s error, naming them, on the first call). The program's ``state_dict``
holds the packed tensors; search logs the named ``state_dict`` beside it
(``dgc/weights.pt``).
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict

import torch
from torch import Tensor
from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.group_conv import PreactGroupConv2d
from dgc.layers.plan_cache import versions
from dgc.registry import create_model

OP_NAME = "dgc::model_eval"
CACHED_MODELS = 16


class ShippedModel(nn.Module):
    """``model``'s eval forward as one ``dgc::model_eval`` call, for ``torch.export``.

    The ``state_dict`` tensors are packed into one flat buffer per dtype (``tensors_float32``,
    ...): the module that ``torch.export.load`` rebuilds fetches each attribute from Python on
    every call (a DenseNet-86 has 680 tensors), two cost nothing. The operator's network takes
    its tensors as views of those buffers. ``model`` is put in eval mode.

    Args:
        model: a network made by ``dgc.create_model(name, **kwargs)`` (its ``state_dict``
            keys must be those of such a network).
        name, kwargs: how to make it again (num_classes, in_chans and the recipe's settings).
        example: an input (batch of any size) to learn the output's shape from.
    """

    def __init__(self, model: nn.Module, name: str, kwargs: dict, example: Tensor) -> None:
        super().__init__()
        state = model.state_dict()
        dtypes = sorted({t.dtype for t in state.values()}, key=str)
        layout = []
        for i, dtype in enumerate(dtypes):
            group = [(key, t) for key, t in state.items() if t.dtype == dtype]
            offset = 0
            for key, t in group:
                layout.append([key, i, offset, list(t.shape)])
                offset += t.numel()
            packed = torch.cat([t.detach().reshape(-1) for _, t in group])
            self.register_buffer(f"tensors_{str(dtype).removeprefix('torch.')}", packed)
        with torch.no_grad():
            out = model.eval()(example)
        spec = {"name": name, "kwargs": kwargs, "layout": layout, "out": list(out.shape[1:])}
        self.spec = json.dumps(spec, sort_keys=True)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, *input_size)
        packed = list(self._buffers.values())  # one flat tensor per dtype
        return torch.ops.dgc.model_eval(x, packed, self.spec)  # (B, *out)


class _Models:
    """Eager networks by their packed tensors and spec (LRU, thread-safe). A cached network
    holds its tensors, so their addresses stay theirs while it lives; it is sealed (``seal``),
    so an in-place write to the packed tensors (a new version) builds it again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._models: OrderedDict[tuple, tuple[tuple, nn.Module]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, packed: list[Tensor], spec: str) -> nn.Module:
        # Keyed by the tensors; the spec (tens of kB, a new str on every call) is compared.
        key = tuple((t.data_ptr(), t.numel(), t.dtype, t.device) for t in packed)
        state = (spec, versions(packed))
        with self._lock:
            cached = self._models.get(key)
            if cached is not None and cached[0] == state:
                self._models.move_to_end(key)
                return cached[1]
        model = _build(packed, spec)
        with self._lock:
            self._models[key] = (state, model)
            self._models.move_to_end(key)
            if len(self._models) > self.size:
                self._models.popitem(last=False)
        return model


_MODELS = _Models(CACHED_MODELS)


def _build(packed: list[Tensor], spec: str) -> nn.Module:
    """The eval network of ``spec`` whose parameters and buffers are views of ``packed``."""
    s = json.loads(spec)
    state = {}
    for key, group, offset, shape in s["layout"]:
        flat = packed[group]
        state[key] = flat[offset : offset + math.prod(shape)].view(shape)
    with torch.inference_mode(False):  # its own buffers keep version counters
        model = create_model(s["name"], **s["kwargs"])
        model.load_state_dict(state, strict=True, assign=True)
    return seal(model.eval().to(packed[0].device))


def seal(model: nn.Module) -> nn.Module:
    """Mark ``model``'s DGC layers and native group convs sealed: their eval calls skip the
    checks an eager network needs on every call (hooks, training mode, BN kind, parameter
    versions: 15-20 us a layer, a third of DyResNet-20's forward at batch 1 on the CPU,
    docs/benchmarks.md 6.1) and keep only the autocast one. Only for a network nobody else
    holds, run without grad: ``_build``'s, whose tensors are views of the program's buffers
    and which ``_Models`` builds again when those change."""
    for m in model.modules():
        if isinstance(m, (DynamicGroupConv2d, PreactGroupConv2d)):
            m.sealed = True
    return model


def model_eval(x: Tensor, packed: list[Tensor], spec: str) -> Tensor:
    """The eval forward of the network that ``spec`` names, around ``packed``."""
    model = _MODELS.get(packed, spec)
    with torch.no_grad():
        return model(x)


SCHEMA = "model_eval(Tensor x, Tensor[] packed, str spec) -> Tensor"
# A plain kernel for every backend (CompositeExplicitAutograd), as dgc.layers.shipped's.
_LIB = torch.library.Library("dgc", "FRAGMENT")  # kept alive: it owns the registration
_LIB.define(SCHEMA)
_LIB.impl("model_eval", model_eval, "CompositeExplicitAutograd")


@torch.library.register_fake(OP_NAME, lib=_LIB)
def _(x: Tensor, packed: list[Tensor], spec: str) -> Tensor:
    out = json.loads(spec)["out"]
    return x.new_empty(x.shape[0], *out)  # (B, *out)
