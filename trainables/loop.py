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
from dgc.layers.schedule import GateSchedule
from trainables.config import DistillParams
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
    #: the deactivation ramp (``GateScheduleParams.resolve``; the paper's by default)
    gate: GateSchedule = PAPER

    @property
    def total(self) -> int:
        return self.iters_per_epoch * self.epochs

    def lr(self, it: int) -> float:
        o, t = self.optim, it / self.total
        ramp_end = self.gate.ramp_end
        if o.finetune_lr is not None and t >= ramp_end and ramp_end < 1:
            # the low-lr fine-tune of the pruned network: a cosine from finetune_lr * lr
            done = (t - ramp_end) / (1 - ramp_end)
            return o.lr * o.finetune_lr * 0.5 * (1.0 + math.cos(math.pi * done))
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


class Criterion:
    """The training loss of a batch: cross-entropy (with the recipe's label smoothing), the
    DGC layers' lasso term, and distillation from ``teacher`` (``DistillParams``): the teacher
    sees the same augmented batch, in eval mode, without grad.

    Args:
        optim: the recipe's label smoothing and lasso weight.
        teacher: the dense network that teaches, or None (the distillation weight is then 0).
        distill: the distillation's weight and temperature.
    """

    def __init__(
        self,
        optim: OptimParams,
        teacher: nn.Module | None = None,
        distill: DistillParams | None = None,
    ) -> None:
        self.optim, self.teacher = optim, teacher
        self.distill = distill if teacher is not None and distill is not None else None
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)  # (B, classes)
        o = self.optim
        loss = F.cross_entropy(logits.float(), y, label_smoothing=o.label_smoothing)
        if self.distill is not None and self.distill.weight > 0:
            assert self.teacher is not None
            with torch.no_grad():
                target = self.teacher(x).float()  # (B, classes)
            w, t = self.distill.weight, self.distill.temperature
            kd = F.kl_div(F.log_softmax(logits.float() / t, 1), F.log_softmax(target / t, 1),
                          reduction="batchmean", log_target=True)  # fmt: skip
            loss = (1 - w) * loss + w * t * t * kd
        return loss + o.lasso * dgc.aux_loss(model).to(loss.device)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    start_it: int,
    bf16: bool = True,
    criterion: Criterion | None = None,
) -> EpochStats:
    """One pass: per iteration, set the gate progress and the lr, step on the loss
    (``criterion``; by default cross-entropy + lasso)."""
    model.train()
    t0, it, images = time.perf_counter(), start_it, 0
    device = next(model.parameters()).device
    check_every = 1 if device.type == "cpu" else 25  # a finiteness check syncs the GPU
    total = torch.zeros((), device=device)
    gate = schedule.gate
    criterion = criterion or Criterion(schedule.optim)
    for x, y in batches:
        dgc.set_progress(model, schedule.progress(it), gate)
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(it)
        with autocast(device, bf16):
            loss = criterion(model, x, y)
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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], count: int) -> int:
    """Measure every BatchNorm's running statistics again, as the plain average over ``count``
    training batches of the network as it now is (training mode, no gradient); returns the
    batches used. The momentum averages otherwise still hold the earlier networks of the
    pruning ramp."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]  # noqa: SLF001 (torch's BatchNorms have no public base)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    used = 0
    for (x, _), used in zip(batches, range(1, count + 1)):
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return used


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
