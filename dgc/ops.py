"""Model-wide helpers the training loop calls: pruning progress and the saliency L1 term."""

from __future__ import annotations

import torch
from torch import Tensor
from torch import nn

from dgc.layers.dynamic_group_conv import DynamicGroupConv2d
from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.schedule import PAPER
from dgc.layers.schedule import GateSchedule
from dgc.layers.schedule import inactive_channels
from dgc.layers.self_grouping import SelfGroupingConv2d


def dgc_layers(model: nn.Module) -> list[DynamicGroupConv2d]:
    """All DGC layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, DynamicGroupConv2d)]


def kernel_choices(model: nn.Module) -> dict[str, dict]:
    """Every layer's settled per-shape kernel choices (its ``KernelChoice``), by module and
    attribute name. Each instance times its kernels and the kernels round differently, so a
    training checkpoint carries them: a run resumed from it takes the same kernels and ends
    with the same weights, bit for bit. Plain data (tuples, ints, sizes, dtypes, devices,
    strings): loadable with ``torch.load(weights_only=True)``."""
    return {name: dict(choice.chosen) for name, choice in _choices(model)}


def set_kernel_choices(model: nn.Module, choices: dict[str, dict]) -> None:
    """Settle ``model``'s layers on ``choices`` (from ``kernel_choices``); names that are not
    ``model``'s are ignored."""
    for name, choice in _choices(model):
        choice.chosen.update(choices.get(name, {}))


def set_kernel_patience(model: nn.Module, patience: int | None) -> None:
    """Calls of a new input shape for which ``model``'s layers run their default kernel before
    they time the candidates (``KernelChoice``): 0 times at the first call, so that a warm-up
    settles every shape (a latency probe); None: until the shape has recurred as often as
    timing it costs (the default)."""
    for _, choice in _choices(model):
        choice.patience = patience


def _choices(model: nn.Module) -> list[tuple[str, KernelChoice]]:
    return [
        (f"{name}.{attr}" if name else attr, value)
        for name, m in model.named_modules()
        for attr, value in vars(m).items()
        if isinstance(value, KernelChoice)
    ]


def sg_layers(model: nn.Module) -> list[SelfGroupingConv2d]:
    """All SG-CNN layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, SelfGroupingConv2d)]


def set_progress(model: nn.Module, progress: float, schedule: GateSchedule = PAPER) -> None:
    """Move every pruning operator to training progress ``progress`` (fraction of all
    iterations done). ``schedule`` holds the breakpoints (the paper's by default):

    * DGC layers: the scheduled number of inactive channels (the ramp from ``warmup_end`` to
      ``ramp_end``) is written into their buffers;
    * SG-CNN layers: the self-grouping steps due by ``progress`` run (evenly spread from
      ``warmup_end`` to ``ramp_end``; the rest of the run fine-tunes at the target).

    Raises:
        ValueError: progress outside [0, 1].
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress={progress!r} must be in [0, 1] (iterations done / total)")
    for layer in model.modules():  # one walk per iteration for both operators
        if isinstance(layer, DynamicGroupConv2d):
            layer.set_inactive(
                inactive_channels(progress, layer.in_channels, layer.gate_factor, schedule)
            )
        elif isinstance(layer, SelfGroupingConv2d):
            layer.advance(progress, schedule)


def aux_loss(model: nn.Module) -> Tensor:
    """Sum over DGC layers of their last forward's saliency L1 term (0 if there is none).

    Multiply by the lasso weight (1e-5 in the paper) and add to the task loss.
    """
    terms = [m.last_saliency_loss for m in dgc_layers(model) if m.last_saliency_loss is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def load_dense_weights(model: nn.Module, weights: dict[str, Tensor]) -> int:
    """Start ``model`` from the ``state_dict`` of the dense network of its family: every tensor
    whose name and shape match is copied. A DGC layer's kernel is stored head-major (row
    ``i*O/h + j`` is output ``j`` of head ``i``, which becomes channel ``j*h + i``), so the dense
    kernel is permuted into that layout: each output channel starts from its dense kernel. The
    gates and the DGC layers' own norms keep their initialisation. Returns the tensors copied.

    Raises:
        ValueError: a tensor of both has another shape, or no convolution matches.
    """
    own = model.state_dict()
    clash = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]  # fmt: skip
    if clash:
        raise ValueError(
            f"{len(clash)} tensors have other shapes in this network (first: {clash[0]}); "
            "start a network from the dense variant of its own family"
        )
    heads = {f"{name}.weight": m.heads for name, m in model.named_modules()
             if isinstance(m, DynamicGroupConv2d)}  # fmt: skip
    shared = {}
    for key, value in weights.items():
        if key in own:
            shared[key] = _head_major(value, heads[key]) if key in heads else value
    if not any(v.dim() == 4 for v in shared.values()):
        raise ValueError("no convolution of the checkpoint is in this network")
    model.load_state_dict(shared, strict=False)
    return len(shared)


def _head_major(w: Tensor, heads: int) -> Tensor:
    # w: (O, C, k, k), row o = output channel o  ->  row i*O/h + j = channel j*h + i
    o = w.shape[0]
    return w.reshape(o // heads, heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape)
