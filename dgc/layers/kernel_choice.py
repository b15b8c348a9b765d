"""Per-shape choice between equivalent kernels, by measured time, made once and cached.

The fastest way to run a DGC layer's kept-channel convolution depends on its shape (batch,
channels, resolution, kernel size) and on the machine: on the CPU the native direct conv on
most layers, a batch-folded grouped conv on wide early layers at larger batches, a batched
matmul on some 1x1 layers, and the full-width masked conv where most channels are kept. Like
``torch.backends.cudnn.benchmark``, the first forward at a new input shape times each
candidate a few times and keeps the fastest; later forwards at that shape run it directly.
The kernels round differently, so two instances may differ in the last bits; under
``torch.use_deterministic_algorithms(True)`` nothing is timed and each shape takes its
default kernel, and ``dgc.kernel_choices`` carries a run's choices in its checkpoint.
The cache belongs to the layer (no global state).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from dgc.layers.tracing import tracing

TIMED_RUNS = 3

R = TypeVar("R")  # what the kernels return: a tensor, or a tuple of them (the backward's)


class KernelChoice:
    """Remembers, per input shape, which of a set of equivalent kernels is fastest.

    Args:
        measure: time the candidates (False: always take the default). None: unless the
            environment says ``DGC_KERNEL_TIMING=0`` (read when the choice is made).
        prefer: run this kernel wherever it is a candidate (pins the choice, e.g. for
            reproducible outputs or tests).
        exclude: kernels never run (e.g. ``("direct",)``: the torch kernels only).
    """

    def __init__(
        self, measure: bool | None = None, prefer: str | None = None, exclude: tuple[str, ...] = ()
    ) -> None:
        if measure is None:
            measure = os.environ.get("DGC_KERNEL_TIMING", "1") != "0"
        self.measure, self.prefer, self.exclude = measure, prefer, tuple(exclude)
        self.chosen: dict[Hashable, str] = {}
        self.times: dict[Hashable, dict[str, float]] = {}  # median seconds per candidate
        self.last: str | None = None

    def known(self, key: Hashable, names: tuple[str, ...]) -> str | None:
        """The kernel already settled for ``key`` among ``names`` (``prefer`` first), else None.

        The fast path of eager calls: no candidate table is built when this answers."""
        name = self.prefer if self.prefer in names else self.chosen.get(key)
        if name not in names or name in self.exclude:
            return None
        self.last = name
        return name

    def run(self, key: Hashable, kernels: Mapping[str, Callable[[], R]], default: str) -> R:
        """Run the kernel chosen for ``key``, choosing it first if the shape is new.

        While a trace or export records the forward, or a dispatch mode sees its operators
        (``FlopCounterMode``), nothing is timed and nothing settled (the timing runs would be
        recorded or counted too): the fastest of these kernels as timed for that shape in
        eager mode (an eager-only kernel such as the native one cannot be recorded or seen),
        else the last one run, else ``default``.
        """
        kernels = {k: f for k, f in kernels.items() if k not in self.exclude}
        default = default if default in kernels else next(iter(kernels))
        if self.prefer in kernels:
            name = self.prefer
        elif tracing() or is_in_torch_dispatch_mode():
            name = self._traceable_choice(key, kernels, default)
        else:
            chosen = self.chosen.get(key)
            if chosen is None:
                timed = self.measure and len(kernels) > 1
                # Deterministic algorithms asked for: no timing, whose outcome varies by run.
                timed = timed and not torch.are_deterministic_algorithms_enabled()
                chosen = self._fastest(key, kernels) if timed else default
                self.chosen[key] = chosen
            name = chosen
        self.last = name
        return kernels[name]()

    def _traceable_choice(
        self, key: Hashable, kernels: Mapping[str, Callable[[], object]], default: str
    ) -> str:
        key = _concrete(key)  # a trace sees sizes as tensors; the eager keys hold ints
        timed = self.times.get(key, {}) if _hashable(key) else {}
        timed = {k: t for k, t in timed.items() if k in kernels}
        if timed:
            return min(timed, key=timed.__getitem__)
        last = self.last
        return last if last is not None and last in kernels else default

    def _fastest(self, key: Hashable, kernels: Mapping[str, Callable[[], object]]) -> str:
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for name, kernel in kernels.items():  # warm-up (allocator, oneDNN/cuDNN plans)
            _timed(kernel)
        for _ in range(TIMED_RUNS):  # round-robin, so drifting load hits all alike
            for name, kernel in kernels.items():
                times[name].append(_timed(kernel))
        medians = {name: statistics.median(t) for name, t in times.items()}
        if _hashable(key):
            self.times[key] = medians
        return min(medians, key=medians.__getitem__)


def _concrete(key: object) -> object:
    """``key`` with 0-dim tensors (the sizes a trace reports) replaced by Python ints."""
    if isinstance(key, tuple):
        return tuple(_concrete(k) for k in key)
    if isinstance(key, Tensor) and key.dim() == 0 and not key.is_floating_point():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return int(key)
    return key


def _timed(kernel: Callable[[], object]) -> float:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()  # time this kernel, not the work queued before it
    start = time.perf_counter()
    kernel()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _hashable(key: Hashable) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
