"""Self-grouping convolution (SG-CNN).

Guo, Wu, Kittler, Feng, "Self-grouping Convolutional Neural Networks", Neural Networks 132
(2020), arXiv 2009.13803; spec: docs/methods.md 2.1 to 2.4 (from QingbeiGuo/SG-CNN).

A masked convolution whose filters organise themselves into groups during training. One
self-grouping step (``regroup``) clusters the filters by their importance vectors (the L1 of
each input-channel kernel slice), thresholds the cluster centroids at a cumulative percentile
of the layer and lets every filter of a cluster read the same subset of input channels. The
compression is reached in ``steps`` such steps, driven by ``dgc.set_progress`` like DGC's ramp.

Differences from the released code:

* The release never leaves the masked conv, so it is no faster than the dense one (its issue
  #1). After the last step this layer runs a real "diverse group" convolution in eval: each
  group gathers its own input subset and runs a dense conv on it (``_grouped``), equal in output
  to the masked conv; the fastest of the equivalent kernels is chosen per shape.
* The mask is kept per (filter, input channel), not per weight: pruning is channel-level in the
  release too, so this is the same mask without the k x k copies.
* ``group_mask="common"`` (default): a cluster's connectivity is tested against the channels all
  its members still read, so after a step every member of a cluster reads exactly one subset
  (what the paper describes, and what a real grouped conv needs). The release tests it against
  the mask of the cluster's first member only (``group_mask="first"``), so members whose earlier
  masks differ can end a step with different subsets. Both only ever shrink masks, and both are
  identical on the first step.
* k-means runs in torch with a generator seeded by the layer name and the step, so a run is
  deterministic given the seed (sklearn's ``KMeans(init="random", n_init=10, max_iter=300)``
  otherwise); an empty cluster keeps its centroid (sklearn relocates it), and a layer with fewer
  filters than ``groups`` uses one cluster per filter (sklearn refuses).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

from dgc.layers.kernel_choice import KernelChoice
from dgc.layers.plan_cache import PlanCache
from dgc.layers.schedule import PAPER
from dgc.layers.schedule import GateSchedule
from dgc.layers.tracing import tracing

GROUP_MASKS = ("common", "first")
#: the equivalent eval kernels of a grouped layer (methods ``_<name>``)
KERNELS = ("masked", "loop", "padded")
KMEANS_INITS = 10
KMEANS_ITERS = 300
KMEANS_TOL = 1e-4  # sklearn's default: relative to the mean per-feature variance


def nearest(x: Tensor, centres: Tensor) -> Tensor:
    """The nearest centre of each row of ``x`` (N, D) among ``centres`` (k, D): the argmin of
    ``|c|^2 - 2 x.c``, one matrix product (``|x|^2`` is the same for every centre; the full
    distances of ``torch.cdist`` took three quarters of a ResNet-50's grouping)."""
    return torch.addmm((centres * centres).sum(1), x, centres.t(), alpha=-2).argmin(1)  # (N,)


def kmeans(
    x: Tensor, k: int, generator: torch.Generator, n_init: int = KMEANS_INITS
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means with random initial centres (k distinct rows), best of ``n_init``.

    Args:
        x: (N, D) points.
        k: clusters, 1 <= k <= N.
        generator: seeds the initial centres.

    Returns:
        (centroids (k, D), labels (N,)).
    """
    n = x.shape[0]
    tol = KMEANS_TOL * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(n_init):
        centres = x[torch.randperm(n, generator=generator)[:k].to(x.device)]  # (k, D)
        for _ in range(KMEANS_ITERS):
            labels = nearest(x, centres)  # (N,)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1).to(x.dtype)
            new = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= tol:
                break
        labels = nearest(x, centres)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    assert best is not None
    return best[1], best[2]


def self_group_step(
    weight: Tensor,
    mask: Tensor,
    groups: int,
    percent: float,
    generator: torch.Generator,
    group_mask: str = "common",
) -> tuple[Tensor, Tensor]:
    """One self-grouping step of one layer (docs/methods.md 2.2).

    Args:
        weight: (O, C, k, k) kernel.
        mask: (O, C) channel-level mask of 0/1.
        groups: clusters g (at most O are used).
        percent: cumulative pruning percentile cp in [0, 100].
        group_mask: "common" or "first" (see the module docstring).

    Returns:
        (the new mask (O, C), the cluster of each filter (O,)).
    """
    w = weight.detach().double()
    m = mask.detach().double()
    v = (w.abs().sum((2, 3)) * m) if w.dim() == 4 else (w.abs() * m)  # (O, C) importance
    centroids, labels = kmeans(v, min(groups, v.shape[0]), generator)  # (g, C), (O,)
    u = centroids[labels] * m  # (O, C): pruned entries count as zeros (cumulative)
    tau = torch.quantile(u.flatten(), percent / 100.0)  # numpy's linear interpolation
    new = torch.zeros_like(m)
    for d in labels.unique():
        members = (labels == d).nonzero().squeeze(1)
        ref = m[members].amin(0) if group_mask == "common" else m[members[0]]  # (C,)
        keep = (centroids[d] * ref > tau).double()  # (C,)
        new[members] = keep * m[members]
    return new.to(mask.dtype), labels


@dataclass(frozen=True)
class Groups:
    """The diverse group structure of a final mask: filters with one input subset each."""

    outputs: list[Tensor]  # per group: its filters (output channels)
    inputs: list[Tensor]  # per group: the input channels its filters read
    order: Tensor  # (O,) position of each output channel in cat(outputs)
    padded_in: Tensor  # (G * n_max,) input index per padded slot
    padded_out: Tensor  # (O,) slot in the (G * o_max) padded output of each channel
    n_max: int  # the largest input subset (at least 1: an empty group reads a zero kernel)
    o_max: int  # the largest group


def diverse_groups(mask: Tensor) -> Groups:
    """Group the filters by identical rows of ``mask`` (O, C); each row is one input subset."""
    rows, inverse = torch.unique(mask > 0, dim=0, return_inverse=True)  # (G, C), (O,)
    outputs = [(inverse == g).nonzero().squeeze(1) for g in range(rows.shape[0])]
    inputs = [row.nonzero().squeeze(1) for row in rows]
    order = torch.empty_like(inverse)
    order[torch.cat(outputs)] = torch.arange(len(inverse), device=mask.device)
    n_max = max(1, max(len(i) for i in inputs))
    o_max = max(len(o) for o in outputs)
    # Padded layout: group g reads slots g*n_max.. (its inputs, then channel 0 as filler with a
    # zero kernel) and writes slots g*o_max.. (its filters, then unused slots).
    pad_in = torch.zeros(len(inputs), n_max, dtype=torch.long, device=mask.device)
    pad_out = torch.empty_like(inverse)
    for g, (i, o) in enumerate(zip(inputs, outputs)):
        pad_in[g, : len(i)] = i
        pad_out[o] = g * o_max + torch.arange(len(o), device=mask.device)
    return Groups(outputs, inputs, order, pad_in.flatten(), pad_out, n_max, o_max)


class SelfGroupingConv2d(nn.Module):
    """Masked convolution that self-groups its filters in steps (SG-CNN).

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as ``nn.Conv2d`` (no bias).
        groups: k-means clusters per step (the release's ``--group_num``, 16).
        compression: target fraction of the connections pruned, in [0, 1) (cp / 100).
        steps: self-grouping steps to reach it; step i prunes to ``compression * i / steps``.
            None: one step per 10 points of compression (rounded up), as the release (10, 20,
            ... %); none at compression 0.
        group_mask: "common" (default) or "first" (the release's rule), see the module doc.
        seed: mixed with the layer name and the step into the k-means seed.
        name: the layer's name in its network (errors, seeding).
    """

    # Registered buffers (``nn.Module.__getattr__`` finds them; annotated for the type checker).
    mask: Tensor
    steps_done: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        groups: int = 16,
        compression: float = 0.5,
        steps: int | None = None,
        group_mask: str = "common",
        seed: int = 0,
        name: str = "",
    ) -> None:
        super().__init__()
        _validate(name, groups, compression, steps, group_mask)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.groups, self.compression, self.group_mask = groups, compression, group_mask
        # compression 0: no step, one group that reads everything (the dense conv)
        self.steps = steps if steps is not None else math.ceil(round(compression * 10, 6))
        self.seed, self.name = seed, name
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("mask", torch.ones(out_channels, in_channels))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._steps_done = 0  # host mirror: reading the buffer would sync a GPU every step
        self._groups: Groups | None = None
        self._packed = PlanCache()  # eval kernels, per dtype and device
        self.kernels = KernelChoice()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_out = self.kernel_size**2 * self.out_channels
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / fan_out))

    @property
    def grouped(self) -> bool:
        """True once every step is done: the mask is final and the diverse groups exist."""
        return self._steps_done >= self.steps

    def step_percent(self, step: int) -> float:
        """Cumulative pruning percentile of step ``step`` (1-based)."""
        return 100.0 * self.compression * step / self.steps

    def step_due(self, progress: float, schedule: GateSchedule = PAPER) -> int:
        """Steps due by ``progress``: evenly spread from ``warmup_end`` to ``ramp_end``
        (both included; all at once when they coincide, the release's G scheme)."""
        w, r = schedule.warmup_end, schedule.ramp_end
        if progress < w:
            return 0
        if self.steps == 1 or progress >= r:
            return self.steps
        return min(self.steps, 1 + math.floor((progress - w) / (r - w) * (self.steps - 1) + 1e-9))

    def advance(self, progress: float, schedule: GateSchedule = PAPER) -> None:
        """Run every self-grouping step that ``progress`` has made due."""
        for _ in range(self._steps_done, self.step_due(progress, schedule)):
            self.regroup()

    @torch.no_grad()
    def regroup(self) -> None:
        """One self-grouping step to the next step's percentile."""
        step = self._steps_done + 1
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(self.name.encode()) + step) % 2**63
        )
        if self.compression > 0:  # a 0th percentile would still cut the smallest entries
            new, _ = self_group_step(
                self.weight, self.mask, self.groups, self.step_percent(step), gen, self.group_mask
            )
            self.mask.copy_(new)
        self.steps_done.fill_(step)
        self._steps_done, self._groups = step, None
        self._packed.clear()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.steps_done.device.type != "meta":
            self._steps_done, self._groups = int(self.steps_done), None
            self._packed.clear()

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W)
        if self.training or not self.grouped or torch.is_grad_enabled():
            return self._masked(x)  # (B, O, H', W')
        key = (x.shape, x.dtype, x.device.type)
        chosen = self.kernels.chosen.get(key)
        if chosen is not None and not tracing():  # the common case, without the closures
            return getattr(self, f"_{chosen}")(x)
        kernels = {name: functools.partial(getattr(self, f"_{name}"), x) for name in KERNELS}
        return self.kernels.run(key, kernels, "loop")  # (B, O, H', W')

    def _masked(self, x: Tensor) -> Tensor:
        if self.grouped and not torch.is_grad_enabled():  # eval: the masked kernel is cached
            w = self._packed_kernels(x.dtype)[2]
        else:
            w = (self.weight * self.mask[:, :, None, None].to(self.weight.dtype)).to(x.dtype)
        return F.conv2d(x, w, None, self.stride, self.padding)  # (B, O, H', W')

    def structure(self) -> Groups:
        """The diverse groups of the final mask (computed once per mask)."""
        if self._groups is None:
            self._groups = diverse_groups(self.mask)
        return self._groups

    def _packed_kernels(self, dtype: torch.dtype) -> tuple[list[Tensor], Tensor, Tensor]:
        """Per-group kernels, the padded grouped kernel and the masked kernel, rebuilt when the
        weight or the mask changes."""
        g = self.structure()

        def build() -> tuple[list[Tensor], Tensor, Tensor]:
            w = self.weight.detach().to(dtype)
            per_group = [w[o][:, i] for o, i in zip(g.outputs, g.inputs)]
            k = self.kernel_size
            padded = w.new_zeros(len(g.inputs) * g.o_max, g.n_max, k, k)
            for d, kernel in enumerate(per_group):
                padded[d * g.o_max : d * g.o_max + kernel.shape[0], : kernel.shape[1]] = kernel
            masked = w * self.mask[:, :, None, None].to(dtype)
            return per_group, padded, masked

        packed = self._packed.get((dtype, id(g)), lambda: [self.weight, self.mask], build)
        assert packed is not None
        return packed

    def _loop(self, x: Tensor) -> Tensor:
        """One dense conv per group over its own input subset."""
        g, (kernels, _, _) = self.structure(), self._packed_kernels(x.dtype)
        outs = []
        for o, i, w in zip(g.outputs, g.inputs, kernels):
            if len(i) == 0:  # a group that reads nothing outputs zeros
                outs.append(x.new_zeros(x.shape[0], len(o), *self._out_hw(x)))
                continue
            xi = x.index_select(1, i)  # (B, n_d, H, W)
            outs.append(F.conv2d(xi, w, None, self.stride, self.padding))  # (B, o_d, H', W')
        return torch.cat(outs, 1).index_select(1, g.order)  # (B, O, H', W')

    def _padded(self, x: Tensor) -> Tensor:
        """All groups as one grouped conv: inputs gathered (overlaps duplicated) and padded to
        the largest subset, kernels zero-padded to the largest group."""
        g, (_, w, _) = self.structure(), self._packed_kernels(x.dtype)
        xg = x.index_select(1, g.padded_in)  # (B, G*n_max, H, W)
        y = F.conv2d(xg, w, None, self.stride, self.padding, groups=len(g.inputs))
        return y.index_select(1, g.padded_out)  # (B, G*o_max, H', W') -> (B, O, H', W')

    def _out_hw(self, x: Tensor) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (x.shape[-2] + 2 * p - k) // s + 1, (x.shape[-1] + 2 * p - k) // s + 1

    def alive_connections(self) -> float:
        """Connections (filter, input channel) the layer computes: realised once grouped, the
        target ``(1 - compression) * O * C`` before (unknown until the clustering has run)."""
        if self.grouped and self.mask.device.type != "meta":
            return float(self.mask.sum())
        return (1.0 - self.compression) * self.out_channels * self.in_channels

    def cost_macs(self, in_hw: int, out_hw: int) -> float:
        """MACs per sample: k^2 * H'W' per alive connection."""
        return self.alive_connections() * self.kernel_size**2 * out_hw

    def cost_params(self) -> int:
        """Parameters the grouped layer keeps: k^2 per alive connection."""
        return int(self.alive_connections() * self.kernel_size**2)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"compression={self.compression}, steps={self.steps}, group_mask={self.group_mask}"
        )


def _validate(
    name: str, groups: int, compression: float, steps: int | None, group_mask: str
) -> None:
    if groups < 1:
        raise ValueError(f"{name}: sg_groups={groups!r} must be at least 1")
    if not 0.0 <= compression < 1.0:
        raise ValueError(
            f"{name}: compression={compression!r} must be in [0, 1) (the fraction of "
            "connections pruned, e.g. 0.7 for the paper's Conv-70)"
        )
    if steps is not None and steps < 1:
        raise ValueError(f"{name}: sg_steps={steps!r} must be at least 1")
    if group_mask not in GROUP_MASKS:
        raise ValueError(f"{name}: group_mask={group_mask!r} is unknown; choose {GROUP_MASKS}")
