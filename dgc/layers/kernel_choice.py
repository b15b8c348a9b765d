"""Per-shape choice between equivalent kernels, by measured time, made once and cached.

The fastest way to run a DGC layer's kept-channel convolution depends on its shape (batch,
channels, resolution, kernel size) and on the machine: on the CPU the native direct conv on
most layers, a batch-folded grouped conv on wide early layers at larger batches, a batched
matmul on some 1x1 layers, and the full-width masked conv where most channels are kept. Like
``torch.backends.cudnn.benchmark``, each candidate is timed a few times at a new input shape
and the fastest kept; later forwards at that shape run it directly. Unlike cuDNN's benchmark,
a shape is timed only once it recurs: its default kernel runs until it has run as often as
timing would cost (one warm-up and ``TIMED_RUNS`` runs of each candidate), the ski-rental
rule, so that a shape seen only a few times (a step of the gate ramp, an epoch's last partial
batch, a short trial) never pays for its timing, and no shape costs more than about twice the
better of timing it at first sight and never timing it.
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

from dgc.layers.tracing import is_costing
from dgc.layers.tracing import tracing

TIMED_RUNS = 3

R = TypeVar("R")  # what the kernels return: a tensor, or a tuple of them (the backward's)


class KernelChoice:
    """Remembers, per input shape, which of a set of equivalent kernels is fastest.

    Args:
        measure: time the candidates (False: always take the default). None: unless the
            environment says ``DGC_KERNEL_TIMING=0`` (read when the choice is made;
            ``DGC_KERNEL_TIMING=first`` makes the default patience 0).
        prefer: run this kernel wherever it is a candidate (pins the choice, e.g. for
            reproducible outputs or tests).
        exclude: kernels never run (e.g. ``("direct",)``: the torch kernels only).
        patience: calls of a new key that run its default before the candidates are timed;
            None: ``patience(number of candidates)``, 0: time at the first call.
    """

    def __init__(
        self,
        measure: bool | None = None,
        prefer: str | None = None,
        exclude: tuple[str, ...] = (),
        patience: int | None = None,
    ) -> None:
        timing = os.environ.get("DGC_KERNEL_TIMING", "1")
        if measure is None:
            measure = timing != "0"
        if patience is None and timing == "first":  # the benchmarks: warm-ups settle shapes
            patience = 0
        self.measure, self.prefer, self.exclude = measure, prefer, tuple(exclude)
        self.patience = patience
        self.chosen: dict[Hashable, str] = {}
        self.times: dict[Hashable, dict[str, float]] = {}  # median seconds per candidate
        self.seen: dict[Hashable, int] = {}  # calls of the keys not settled yet
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

        While a trace or export records the forward, a dispatch mode sees its operators
        (``FlopCounterMode``) or dgc counts a cost (``costing``), nothing is timed and nothing
        settled (the timing runs would be recorded or counted too): the fastest of these
        kernels as timed for that shape in eager mode (an eager-only kernel such as the native
        one cannot be recorded or seen), else the last one run, else ``default``.
        """
        kernels = {k: f for k, f in kernels.items() if k not in self.exclude}
        default = default if default in kernels else next(iter(kernels))
        if self.prefer in kernels:
            name = self.prefer
        elif tracing() or is_costing() or is_in_torch_dispatch_mode():
            name = self._traceable_choice(key, kernels, default)
        else:
            name = self.chosen.get(key) or self._settle(key, kernels, default)
        self.last = name
        return kernels[name]()

    def _settle(
        self, key: Hashable, kernels: Mapping[str, Callable[[], object]], default: str
    ) -> str:
        """The kernel for a call at a key not settled yet: ``default`` until the key has been
        called ``patience`` times, then the fastest (kept from then on)."""
        timed = self.measure and len(kernels) > 1
        # Deterministic algorithms asked for: no timing, whose outcome varies by run.
        if not timed or torch.are_deterministic_algorithms_enabled():
            self.chosen[key] = default
            return default
        wait = patience(len(kernels)) if self.patience is None else self.patience
        calls = self.seen.get(key, 0)
        if calls < wait:
            self.seen[key] = calls + 1
            return default
        self.seen.pop(key, None)
        self.chosen[key] = self._fastest(key, kernels)
        return self.chosen[key]

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


def patience(candidates: int) -> int:
    """Calls of a new key that run the default kernel before its candidates are timed: what
    the timing costs (one warm-up and ``TIMED_RUNS`` runs of each), counted in calls of the
    default, taken as about as fast as the others."""
    return (1 + TIMED_RUNS) * candidates


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
