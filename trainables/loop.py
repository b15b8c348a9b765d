"""The DGC training step, one epoch of it, and evaluation. No Ray here: unit-testable."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

import dgc
from dgc.layers.schedule import PAPER
from trainables.config import OptimParams


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Schedule:
    """Per-iteration learning-rate factor and gate progress over the whole run."""

    optim: OptimParams
    iters_per_epoch: int
    epochs: int
    dataset: str = "cifar10"  # only picks the default multistep milestones
    #: the deactivation ramp's (warmup_end, ramp_end) as fractions of the run
    gate_fractions: tuple[float, float] = (PAPER.warmup_end, PAPER.ramp_end)

    @property
    def total(self) -> int:
        return self.iters_per_epoch * self.epochs

    def lr(self, it: int) -> float:
        o, t = self.optim, it / self.total
        warm = o.warmup_epochs * self.iters_per_epoch
        factor = min(1.0, (it + 1) / warm) if warm > 0 else 1.0
        if o.schedule == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * t))
        elif o.schedule == "multistep":  # at epoch boundaries, as the authors
            epoch = it // self.iters_per_epoch
            factor *= o.gamma ** sum(epoch >= m for m in self.milestones)
        return o.lr * factor

    @property
    def milestones(self) -> tuple[int, ...]:
        """The multistep epochs: the configured ones, else the authors' for the dataset."""
        if self.optim.milestones is not None:
            return tuple(self.optim.milestones)
        if self.dataset == "imagenet":
            return tuple(range(30, self.epochs, 30))
        return tuple(sorted({math.ceil(0.5 * self.epochs), math.ceil(0.75 * self.epochs)}))

    def progress(self, it: int) -> float:
        """Fraction of iterations done before step ``it``, as the authors compute it."""
        return it / self.total

    @property
    def gate(self) -> dgc.GateSchedule:
        """The deactivation ramp's breakpoints for this run (paper's by default)."""
        warmup_end, ramp_end = self.gate_fractions
        return dgc.GateSchedule(warmup_end, ramp_end)


@dataclass(frozen=True)
class EpochStats:
    loss: float
    images: int
    seconds: float
    progress: float
    iteration: int


def make_optimizer(model: nn.Module, o: OptimParams) -> torch.optim.SGD:
    """SGD, Nesterov momentum; weight decay on every parameter, as the authors do."""
    return torch.optim.SGD(
        model.parameters(),
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    start_it: int,
    bf16: bool = True,
) -> EpochStats:
    """One pass: per iteration, set the gate progress and the lr, step on CE + lasso."""
    model.train()
    t0, it, images = time.perf_counter(), start_it, 0
    device = next(model.parameters()).device
    check_every = 1 if device.type == "cpu" else 25  # a finiteness check syncs the GPU
    total = torch.zeros((), device=device)
    gate = schedule.gate
    for x, y in batches:
        dgc.set_progress(model, schedule.progress(it), gate)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(it)
        with autocast(device, bf16):
            logits = model(x)  # (B, classes)
            loss = F.cross_entropy(
                logits.float(), y, label_smoothing=schedule.optim.label_smoothing
            )
            loss = loss + schedule.optim.lasso * dgc.aux_loss(model).to(loss.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(y)
        images, it = images + len(y), it + 1
        if (it - start_it) % check_every == 0:
            _check_finite(total, it, schedule.lr(it - 1))
    _check_finite(total, it, schedule.lr(max(it - 1, 0)))
    # Evaluate the network at the epoch's end: with a ramp that ends at an epoch boundary, the
    # validation after that epoch sees the target sparsity.
    dgc.set_progress(model, schedule.progress(it), gate)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return EpochStats(
        float(total) / max(images, 1), images, time.perf_counter() - t0, schedule.progress(it), it
    )


def _check_finite(total: Tensor, it: int, lr: float) -> None:
    if not torch.isfinite(total):
        raise NonFiniteLossError(
            f"training loss became {float(total)} by iteration {it} (lr={lr:.4g}); the trial is "
            "stopped rather than reported. Lower optim.lr, add optim.warmup_epochs, or check "
            "the data normalisation"
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], bf16: bool = True
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over all batches."""
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    n = 0
    for x, y in batches:
        with autocast(device, bf16):
            logits = model(x).float()
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits, y, reduction="sum")
        n += len(y)
    return float(correct) / max(n, 1), float(loss) / max(n, 1)
