"""One trial from config to final metrics, shared by the Ray trainable and ``search train``.

Randomness is a pure function of (seed, epoch): the model is initialised from ``seed`` and each
epoch's batch order and augmentation come from a generator seeded with (seed, epoch). A run
resumed from an end-of-epoch checkpoint therefore continues exactly as the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Protocol

import torch
from torch import nn

import dgc
from trainables import metrics as M
from trainables.config import DistillParams
from trainables.config import GateScheduleParams
from trainables.config import TrialConfig
from trainables.data import DeviceLoader
from trainables.data import Splits
from trainables.data import imagenet_loaders
from trainables.data import load_splits
from trainables.datasets import Split
from trainables.loop import Criterion
from trainables.loop import EpochStats
from trainables.loop import Schedule
from trainables.loop import evaluate
from trainables.loop import make_optimizer
from trainables.loop import recalibrate_bn
from trainables.loop import train_one_epoch

log = logging.getLogger(__name__)

#: the checkpoint file of a trial (Tune checkpoints, `search train --out`).
STATE_FILE = "state.pt"


class Reporter(Protocol):
    """Receives every epoch's metrics, and a checkpoint state when one is due."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None: ...


@dataclass
class Loaders:
    train: Any
    val: Any
    test: Any
    num_classes: int
    input_size: tuple[int, int, int]


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but no CUDA device is visible")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def build_loaders(
    cfg: TrialConfig, device: torch.device, splits: Splits | None, workers: int
) -> Loaders:
    d, cl = cfg.data, cfg.channels_last and device.type == "cuda"
    if d.dataset == "imagenet":
        tr, va, te, classes = imagenet_loaders(
            d, d.workers if d.workers is not None else workers, cl
        )
        return Loaders(tr, va, te, classes, (3, 224, 224))
    s = splits or load_splits(d)
    augment = d.augment if d.augment is not None else d.dataset != "digits"

    def mk(split: Split, batch_size: int, train: bool) -> DeviceLoader:
        return DeviceLoader(split, batch_size, device, s.mean, s.std, augment and train, train, cl)

    return Loaders(
        mk(s.train, d.batch_size, True),
        mk(s.val, d.eval_batch_size, False),
        mk(s.test, d.eval_batch_size, False),
        s.num_classes,
        (s.in_chans, s.image_size, s.image_size),
    )


def build_model(cfg: TrialConfig, num_classes: int, in_chans: int) -> nn.Module:
    return dgc.create_model(
        cfg.model.name, num_classes=num_classes, in_chans=in_chans, **cfg.model.arch_kwargs()
    )


def cap_gpu_memory(device: torch.device, share: float | None) -> float | None:
    """Cap this process's CUDA memory at ``share`` of the device (0 < share < 1), turn on
    cuDNN's autotuning for the fixed-shape training loop; returns the cap, or None."""
    if device.type != "cuda":
        return None
    torch.backends.cudnn.benchmark = True  # one batch shape: the last partial one is dropped
    if share is None or not 0 < share < 1:
        return None
    torch.cuda.set_per_process_memory_fraction(share)  # "cuda": the device Ray assigned
    return share


def compiled(model: nn.Module, mode: bool | str) -> nn.Module:
    """``model`` as the training step runs it: itself, or ``torch.compile``d in ``mode``."""
    if mode is False:
        return model
    # torch.compile's stubs type its result as a callable; for a module it is an nn.Module
    # (OptimizedModule)
    return torch.compile(model, mode=None if mode in (True, "default") else str(mode))  # type: ignore[return-value]


#: inputs of at most this many pixels are costed on the CPU (``trial_cost``)
CPU_COSTED_PIXELS = 64 * 64


def trial_cost(cfg: TrialConfig, num_classes: int, input_size: tuple[int, int, int]) -> dgc.Cost:
    """Analytic cost of the trial's model. Small inputs (digits, CIFAR) build and count it on
    the CPU, where a DyResNet-20 takes about 50 ms against 150 ms on the meta device (whose
    Python meta kernels cost more than the arithmetic); larger ones on the meta device (no
    weights allocated). The global random state is left as it was."""
    on_cpu = input_size[1] * input_size[2] <= CPU_COSTED_PIXELS
    # on the CPU the weights' initialisation draws from the global generator: forked
    with torch.random.fork_rng(devices=[]) if on_cpu else dgc.on_meta():
        model = build_model(cfg, num_classes, input_size[0])
    return dgc.count_cost(model, input_size)


def realised_cost(
    model: nn.Module, target: dgc.Cost, input_size: tuple[int, int, int]
) -> dict[str, float]:
    """For SG-CNN models, the target MACs and, once every self-grouping step has run, the
    realised MACs and parameters (counted on the trained masks); nothing for other models."""
    layers = dgc.sg_layers(model)
    if not layers:
        return {}
    out: dict[str, float] = {M.TARGET_MACS: target.macs}
    if all(layer.grouped for layer in layers):
        realised = dgc.count_cost(model, input_size)
        out |= {M.MACS: realised.macs, M.PARAMS: realised.params}
    return out


def measure_latency(
    model: nn.Module, input_size: tuple[int, int, int], device: torch.device, runs: int = 30
) -> float:
    """Median batch-1 inference latency (ms) on ``device``, gates at their target sparsity.

    Measured on a copy before training: the executed path depends only on the architecture and
    the number of inactive channels, not on the weights. The copy is sealed as the network of
    the program that search logs and exports is (``dgc.program.seal``), so the latency is that
    of the model that ships, not of the eager model's per-call checks.
    """
    import copy
    import statistics
    import time

    from dgc.program import seal

    probe = seal(copy.deepcopy(model).eval())
    dgc.set_progress(probe, 1.0)
    dgc.set_kernel_patience(probe, 0)  # the warm-up settles the kernels: their steady state
    x = torch.randn(1, *input_size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(runs + 5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            probe(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


@dataclass
class Training:
    """Everything one trial's epochs need, built once (``prepare``)."""

    cfg: TrialConfig
    model: nn.Module
    step_model: nn.Module  # ``model``, or its compiled form that the training steps call
    data: Loaders
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    criterion: Criterion
    teacher: nn.Module | None
    cost: dgc.Cost
    latency: float | None
    share: float | None
    pre: int  # the epochs that trained the dense start
    start_epoch: int


def run_trial(
    cfg: TrialConfig,
    reporter: Reporter,
    resume: dict[str, Any] | None = None,
    splits: Splits | None = None,
    threads: int | None = None,
    gpu_share: float | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` to the end (from ``resume`` if given), reporting every epoch.

    ``gpu_share``: the fraction of the GPU the trial was given (Ray's ``gpu`` resource); below
    1 the trial caps its CUDA memory at that fraction, so that one trial's peak cannot take
    its neighbours' memory, and reports the cap."""
    if resume and resume["epoch"] >= cfg.epochs and "metrics" in resume:
        final = {**resume["metrics"], M.FINAL_REPEAT: True}  # trained to the end already
        reporter.report(final, None)  # (Tune's saved state was older than this checkpoint)
        return final
    run = prepare(cfg, resume, splits, threads, gpu_share)
    metrics: dict[str, Any] = {}
    for epoch in range(run.start_epoch, cfg.epochs):
        metrics, stats = train_epoch(run, epoch)
        due = epoch + 1 == cfg.epochs or (epoch + 1) % cfg.checkpoint_every == 0
        state = checkpoint_state(run.model, run.optimizer, metrics, stats, cfg) if due else None
        if state is not None and run.teacher is not None and teaches(cfg):
            state["teacher"] = run.teacher.state_dict()  # the trial's own: kept for a resume
        reporter.report(metrics, state)
    return metrics


def prepare(
    cfg: TrialConfig,
    resume: dict[str, Any] | None,
    splits: Splits | None,
    threads: int | None,
    gpu_share: float | None,
) -> Training:
    """Threads, device, data, network (its dense start or ``init_from``, or ``resume``'s
    weights), cost, latency, GPU share, optimizer, schedules and teacher of a trial."""
    threads = cfg.threads or threads
    if threads:  # else torch's own count (a caller's setting, or its default) stays
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    device = pick_device(cfg.device)
    share = cap_gpu_memory(device, gpu_share)
    torch.manual_seed(cfg.seed)
    pre = pretrain_epochs(cfg)
    if pre and splits is None and cfg.data.dataset != "imagenet":
        splits = load_splits(cfg.data)  # decoded once, for the pretraining and this network
    data = build_loaders(cfg, device, splits, threads)
    model = build_model(cfg, data.num_classes, data.input_size[0]).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cost = trial_cost(cfg, data.num_classes, data.input_size)  # before any training: it can fail
    latency = measure_latency(model, data.input_size, device) if cfg.measure_latency else None
    optimizer = make_optimizer(model, cfg.optim)
    own = cfg.epochs - pre  # the epochs this network trains; its schedules span them
    schedule = Schedule(
        cfg.optim, len(data.train), own, cfg.data.dataset, cfg.gate_schedule.resolve(own)
    )
    dense: dict[str, Any] | None = None  # the trial's own pretrained dense network
    if pre and not resume:
        dense = pretrain_dense(cfg, model, splits, threads)
    elif cfg.init_from and not resume:
        init_weights_from(model, cfg.init_from)
    teacher = build_teacher(cfg, data, device, dense if not resume else resume.get("teacher"))
    start_epoch = restore(resume, model, optimizer) if resume else pre
    return Training(
        cfg, model, compiled(model, cfg.compile), data, optimizer, schedule,
        Criterion(cfg.optim, teacher, cfg.distill), teacher,
        cost, latency, share, pre, start_epoch,
    )  # fmt: skip


def train_epoch(run: Training, epoch: int) -> tuple[dict[str, Any], EpochStats]:
    """Train epoch ``epoch`` of ``run`` and evaluate it (the test set after the last); returns
    its metrics and the training loop's statistics."""
    cfg, model = run.cfg, run.model
    gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
    step = (epoch - run.pre) * len(run.data.train)
    batches = run.data.train.epoch(gen)
    stats = train_one_epoch(
        run.step_model, batches, run.optimizer, run.schedule, step, cfg.bf16, run.criterion
    )
    last = epoch + 1 == cfg.epochs
    if last and cfg.recalibrate_bn:
        recalibrate_bn(model, run.data.train.epoch(gen), cfg.recalibrate_bn)
    val_acc, val_loss = evaluate(model, run.data.val.epoch(), cfg.bf16)
    metrics = {
        M.EPOCH: epoch + 1,
        M.TRAIN_LOSS: stats.loss,
        M.VAL_ACCURACY: val_acc,
        M.VAL_LOSS: val_loss,
        M.MACS: run.cost.macs,
        M.PARAMS: run.cost.params,
        M.EPOCH_TIME_S: stats.seconds,
        M.IMAGES_PER_S: stats.images / stats.seconds,
        M.GATE_PROGRESS: stats.progress,
    }
    if run.latency is not None:
        metrics[M.LATENCY_MS] = run.latency
    if run.share is not None:
        metrics[M.GPU_MEMORY_FRACTION] = run.share
    metrics.update(realised_cost(model, run.cost, run.data.input_size))
    if last:
        metrics[M.TEST_ACCURACY], metrics[M.TEST_LOSS] = evaluate(
            model, run.data.test.epoch(), cfg.bf16
        )
    return metrics, stats


def pretrain_epochs(cfg: TrialConfig) -> int:
    """The epochs of ``cfg`` that train the dense network first: for DGC and SG-CNN models,
    whose kernels have the dense conv's shape, as their start; for any model whose teacher it
    is (``distill`` without a teacher of its own). The others train every epoch themselves."""
    warm = dgc.model_kind(cfg.model.name) in PRETRAINED_KINDS
    return cfg.pretrain_epochs if warm or teaches(cfg) else 0


def teaches(cfg: TrialConfig) -> bool:
    """Whether the trial's own pretrained dense network is its distillation teacher."""
    d = cfg.distill
    return d.weight > 0 and d.teacher is None and not cfg.init_from and cfg.pretrain_epochs > 0


def build_teacher(
    cfg: TrialConfig, data: Loaders, device: torch.device, state: dict[str, Any] | None
) -> nn.Module | None:
    """The dense teacher of ``cfg.distill`` (None: no distillation), in eval mode: from
    ``state`` (a checkpoint state of the trial's own pretrained network), else from the
    checkpoint file ``distill.teacher`` or, failing that, ``init_from``."""
    d = cfg.distill
    if d.weight == 0:
        return None
    dense_cfg = cfg.model_copy(
        update={"model": cfg.model.variant(dgc.variant_of(cfg.model.name, "dense"))}
    )
    teacher = build_model(dense_cfg, data.num_classes, data.input_size[0])
    path = d.teacher or cfg.init_from
    weights = state if state is not None else load_state(path) if path else None
    if weights is None:
        raise ValueError(cfg.teacher_missing() or "distill: no teacher to load")
    teacher.load_state_dict(weights.get("model", weights))
    return teacher.to(device).eval().requires_grad_(False)


#: operators that can start from their family's dense network (``dgc.load_dense_weights``)
PRETRAINED_KINDS = ("dynamic", "selfgroup")


def pretrain_dense(
    cfg: TrialConfig, model: nn.Module, splits: Splits | None, threads: int | None
) -> dict[str, Any]:
    """Train the family's dense network for ``cfg.pretrain_epochs`` epochs by the same recipe,
    start ``model`` from it (``dgc.load_dense_weights``) where its kind can, and return the
    dense network's checkpoint state (its teacher, where ``cfg`` distils)."""

    class Last:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {}

        def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
            self.state = state or self.state
            log.info("pretraining epoch %d: val_accuracy %.4f", metrics[M.EPOCH],
                     metrics[M.VAL_ACCURACY])  # fmt: skip

    dense = dense_start_config(cfg, cfg.pretrain_epochs)
    last = Last()
    log.info("pretraining %s for %d epochs", dense.model.name, dense.epochs)
    run_trial(dense, last, splits=splits, threads=threads)
    if dgc.model_kind(cfg.model.name) in PRETRAINED_KINDS:
        dgc.load_dense_weights(model, last.state["model"])
    return last.state


def dense_start_config(cfg: TrialConfig, epochs: int) -> TrialConfig:
    """The trial that trains the dense network ``cfg`` starts from: ``cfg``'s recipe for
    ``epochs`` epochs, with no start of its own and no gate schedule (it has no gates)."""
    dense = cfg.model.variant(dgc.variant_of(cfg.model.name, "dense"))
    update = {"model": dense, "epochs": epochs, "pretrain_epochs": 0, "init_from": None,
              "measure_latency": False, "gate_schedule": GateScheduleParams(),
              "distill": DistillParams(), "recalibrate_bn": 0}  # fmt: skip
    return TrialConfig.model_validate(cfg.model_copy(update=update).model_dump())


def init_weights_from(model: nn.Module, path: str) -> int:
    """``dgc.load_dense_weights`` from the checkpoint at ``path`` (``weights_only=True``)."""
    state = load_state(path)
    try:
        n = dgc.load_dense_weights(model, state.get("model", state))
    except ValueError as err:
        raise ValueError(f"init_from={path}: {err}") from err
    log.info("initialised %d of %d tensors from %s", n, len(model.state_dict()), path)
    return n


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: dict[str, Any],
    stats: Any,
    cfg: TrialConfig,
) -> dict[str, Any]:
    """Everything needed to continue exactly, and the epoch's ``metrics`` (a resume at the end
    reports them again); loadable with ``torch.load(weights_only=True)``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": metrics[M.EPOCH],
        "metrics": metrics,
        "iteration": stats.iteration,
        "gate_progress": stats.progress,
        "torch_rng": torch.get_rng_state(),
        "config": cfg.model_dump(mode="json"),
        "kernels": dgc.kernel_choices(model),  # a resumed run takes the same kernels
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint state into the model and optimiser; returns the epoch to start at."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    dgc.set_kernel_choices(model, state.get("kernels", {}))  # absent before 2026-11-23
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("resumed at epoch %d (iteration %d)", state["epoch"], state["iteration"])
    return int(state["epoch"])


def save_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def record_epoch(folder: Path, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """An epoch as ``search train --out`` keeps it: its metrics appended to ``metrics.jsonl``,
    its checkpoint (where the epoch made one) in ``state.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if state is not None:
        save_state(state, folder / STATE_FILE)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
