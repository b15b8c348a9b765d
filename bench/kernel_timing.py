"""What the DGC layers' kernel timing costs a short trial: untimed, timed at a shape's first
call (as ``torch.backends.cudnn.benchmark``) and timed once the shape recurs (the default).

    python bench/kernel_timing.py [--rounds 3] [--threads 1]

Trains two digits trials with ``trainables.runner.run_trial`` (no Ray, no MLflow), each under
the three ``DGC_KERNEL_TIMING`` settings in turn, round-robin in one process, one thread as a
search trial with ``resources: {cpu: 1}`` has: the smoke search's trial on all of digits'
training split (DyResNet-8, 2 epochs, batch 128, the paper's ramp) and the quickstart's DGC
trial (6 epochs, batch 64, its early ramp, without the dense warm start). Prints each run's
seconds and validation accuracy, the median per setting, and its ratio to the default.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Any

import torch

from trainables.config import TrialConfig
from trainables.runner import run_trial

TRIALS: dict[str, dict[str, Any]] = {
    "smoke": {
        "epochs": 2,
        "seed": 7,
        "model": {"name": "dyresnet8"},
        "optim": {"lr": 0.05},
        "data": {"batch_size": 128, "val_size": 300},
    },
    "quickstart": {
        "epochs": 6,
        "seed": 7,
        "model": {"name": "dyresnet8", "gate_factor": 0.5, "kwargs": {"double_norm": False}},
        "optim": {"lr": 0.05},
        "data": {"batch_size": 64, "val_size": 300},
        "gate_schedule": {"warmup_end": 0.5, "ramp_end": 3, "unit": "epochs"},
    },
}
#: DGC_KERNEL_TIMING values: the default ("1": once a shape recurs) first
SETTINGS = {"recurring (default)": "1", "first call": "first", "untimed": "0"}


class _Last:
    """A trial's reporter that keeps nothing but the last metrics."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.metrics = metrics


def _run(trial: dict[str, Any], setting: str) -> tuple[float, float]:
    os.environ["DGC_KERNEL_TIMING"] = setting  # read when the model's layers are made
    start = time.perf_counter()
    final = run_trial(TrialConfig.model_validate(trial), _Last())
    return time.perf_counter() - start, float(final["val_accuracy"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} thread(s)"
    )
    _run(TRIALS["smoke"], "0")  # warm-up: imports, the native library, the dataset cache
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        for trial, cfg in TRIALS.items():
            for name, setting in SETTINGS.items():
                seconds, acc = _run(cfg, setting)
                times.setdefault((trial, name), []).append(seconds)
                print(f"round {r + 1}  {trial:10s}  {name:20s}  {seconds:6.1f} s  val {acc:.4f}")
    print(f"\n{'trial':10s}  {'timing':20s}  median s  x default")
    for trial in TRIALS:
        base = statistics.median(times[(trial, "recurring (default)")])
        for name in SETTINGS:
            m = statistics.median(times[(trial, name)])
            print(f"{trial:10s}  {name:20s}  {m:8.1f}  {m / base:9.2f}")


if __name__ == "__main__":
    main()
