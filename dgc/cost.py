"""MACs and parameters by the DGC authors' counting rules (docs/methods.md 1.7), or SG-CNN's (2.4).

One forward pass of a 1-sample zero input under hooks; each hooked module adds its count. The
DGC rules (``rules="dgc"``, the default, used for every front):

* Conv2d: C_in * C_out * k^2 * H' * W' / groups; Linear: weight + bias elements (per sample);
* ReLU: elements of its input; AvgPool/MaxPool: C * H' * W' * k^2; AdaptiveAvgPool: C * H * W;
* BatchNorm, Dropout, Flatten, Identity: no ops, parameters counted;
* DynamicGroupConv2d, analytically at the target gate factor: BN-ReLU (C*H*W), global pool
  (C*H*W), per head fc1 (C*r), ReLU (r), fc2 (r*C + C), ReLU (C), gating (C, one op per
  channel), and the head convolutions g * C * O * k^2 * H' * W';
* SelfGroupingConv2d (SG-CNN): k^2 * H'W' per alive (filter, input channel) connection, the
  grouped conv it runs; params k^2 per alive connection. Before its last self-grouping step the
  connections are not known yet: the target ``(1 - compression)`` share is counted;
* DynamicKernelConv2d (DyNet): pooling, coefficient prediction, kernel fusion and the conv.

SG-CNN's rules (``rules="sgcnn"``, its ``torchsummary.py``): ReLU and pooling 0; BN 0 MACs and
0 params; a masked conv adds one MAC per alive filter and 2 params per alive filter (its BN);
unmasked convs (the stem and shortcut projections, which SG-CNN never masks) count in full,
without their BN. A dense network counts as SG-CNN's unpruned baseline: ResNet-50 at 224 gives
4.09 G MACs and 25.55 M parameters.

MACs are accumulated as floats and truncated once at the end, as the authors' counter does, so
fractional gate factors give the same totals. Build the model under ``on_meta()`` to cost a
configuration without allocating or initialising any weight.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Protocol
from typing import TypeGuard
from typing import runtime_checkable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.self_grouping import SelfGroupingConv2d
from dgc.layers.tracing import costing

RULES = ("dgc", "sgcnn")
#: layer-name parts of the convolutions SG-CNN leaves unmasked (and unpruned)
SG_UNMASKED = ("stem", "downsample")
_NO_OP = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)
Hook = Callable[[nn.Module, tuple, torch.Tensor], None]


@runtime_checkable
class CountsMacs(Protocol):
    """A layer that counts its own MACs per sample (SG-CNN's, DyNet's)."""

    def cost_macs(self, in_hw: int, out_hw: int) -> float: ...


@runtime_checkable
class CountsParams(Protocol):
    """A layer that counts its own parameters (SG-CNN's: the connections it keeps)."""

    def cost_params(self) -> int: ...


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    macs: float
    params: int
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    """Totals and the per-layer costs (one entry per counted call, in execution order)."""

    macs: int
    params: int
    layers: list[LayerCost] = field(repr=False)


def count_cost(model: nn.Module, input_size: Sequence[int], rules: str = "dgc") -> Cost:
    """Count MACs and parameters of ``model`` for one input of ``input_size`` (C, H, W), by
    the DGC authors' ``rules="dgc"`` or SG-CNN's ``rules="sgcnn"``.

    Raises:
        TypeError: a leaf module with parameters has no counting rule.
        ValueError: unknown rules.
    """
    if rules not in RULES:
        raise ValueError(f"rules={rules!r} is unknown; choose one of {RULES}")
    rows: list[LayerCost] = []
    hook = _hook if rules == "dgc" else _sg_hook
    leaves = [("", model)] if _analytic(model) or not list(model.children()) else _counted(model)
    handles = [m.register_forward_hook(hook(name, rows)) for name, m in leaves]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), costing():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Cost(int(sum(r.macs for r in rows)), sum(r.params for r in rows), rows)


@contextmanager
def on_meta() -> Iterator[None]:
    """Build models to cost under this: on the meta device (no weight allocated), with the
    random fills skipped (a meta tensor has no values, and torch's meta ``normal_`` takes
    milliseconds a call: most of a DGC network's build time)."""
    with torch.device("meta"), costing(), _MetaFillsSkipped():
        yield


class _MetaFillsSkipped(TorchFunctionMode):
    """Passes every torch function through, except a random fill of a meta tensor (returned
    as it is). A function mode: a dispatch mode's first call imports torch's compiler."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _FILLS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


#: random fills: tensor methods and the ``nn.init`` functions that hand themselves to a mode
_FILLS = frozenset(
    (torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.uniform_)
    + (nn.init.trunc_normal_, nn.init.kaiming_normal_, nn.init.kaiming_uniform_)
)


def _counted(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if _analytic(child) or not list(child.children()):
            out.append((path, child))
        else:
            out.extend(_counted(child, path + "."))
    return out


def _analytic(m: nn.Module) -> bool:
    """A layer that counts itself (``cost_macs``/``cost_params``), or a DGC layer."""
    return isinstance(m, (DynamicGroupConv2d, CountsMacs))


def _hook(name: str, rows: list[LayerCost]) -> Hook:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        if isinstance(module, CountsParams):
            params = module.cost_params()
        else:
            params = sum(p.numel() for p in module.parameters())
        rows.append(
            LayerCost(
                name, type(module).__name__, _macs(module, x, output), params, tuple(output.shape)
            )
        )

    return hook


def _sg_hook(name: str, rows: list[LayerCost]) -> Hook:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        macs, params = _sg_cost(name, module, x, output)
        rows.append(LayerCost(name, type(module).__name__, macs, params, tuple(output.shape)))

    return hook


def _sg_cost(name: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """SG-CNN's counter (docs/methods.md 2.4) for one module."""
    if isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return 0.0, 0
    macs = _macs(m, x, y)
    params = (
        m.cost_params() if isinstance(m, CountsParams) else sum(p.numel() for p in m.parameters())
    )
    if not _masked(m, name):
        return macs, params
    alive = _alive_filters(m)
    return macs + alive, params + 2 * alive


def _masked(m: nn.Module, name: str) -> TypeGuard[SelfGroupingConv2d | nn.Conv2d]:
    """A convolution SG-CNN masks: every SG layer, and the convs not named in SG_UNMASKED."""
    return isinstance(m, SelfGroupingConv2d) or (
        isinstance(m, nn.Conv2d) and not any(part in name for part in SG_UNMASKED)
    )


def _alive_filters(m: SelfGroupingConv2d | nn.Conv2d) -> int:
    if isinstance(m, SelfGroupingConv2d) and m.grouped and m.mask.device.type != "meta":
        return int((m.mask.sum(1) > 0).sum())
    return int(m.out_channels)


def _macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if isinstance(m, DynamicGroupConv2d):
        return dgc_macs(m, x.shape[-2] * x.shape[-1], y.shape[-2] * y.shape[-1])
    if isinstance(m, CountsMacs):
        return m.cost_macs(x.shape[-2] * x.shape[-1], y.shape[-2] * y.shape[-1])
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return m.in_channels * m.out_channels * k * y.shape[-2] * y.shape[-1] / m.groups
    if isinstance(m, nn.Linear):
        per_row = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        return per_row * (x.numel() // m.in_features)
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Sigmoid)):
        return x.numel()
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        return y.numel() * k * k
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return x.numel()
    if isinstance(m, _NO_OP) or not any(True for _ in m.parameters()):
        return 0
    raise TypeError(f"no MAC counting rule for {type(m).__name__}")


def dgc_macs(layer: DynamicGroupConv2d, in_hw: int, out_hw: int) -> float:
    """Analytic MACs of one DGC layer at its target gate factor (per sample)."""
    c, o, h, r = layer.in_channels, layer.out_channels, layer.heads, layer.hidden
    relu = isinstance(layer.act, nn.ReLU)  # False: the block's BN-ReLU only (double_norm)
    pre = (2 if relu else 1) * c * in_hw  # BN-ReLU's ReLU, then the global average pool
    gates = h * (c * r + r + r * c + c + c + c)  # fc1, ReLU, fc2 (+bias), ReLU, gating
    per_head_conv = c * (o // h) * layer.kernel_size**2 * out_hw * layer.gate_factor
    return pre + gates + h * per_head_conv
