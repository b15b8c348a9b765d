"""Dense, static group, DGC, SG-CNN and DyNet ResNet-20s on the real CIFAR-10: one recipe, one
schedule, about the same MACs; validation and test accuracy, MACs and measured inference time.

    tar xzf ../shared/data/cifar10/cifar10-images-jpeg.tar.gz -C /tmp/cifar
    python bench/operators_cifar.py --datadir /tmp/cifar/cifar10-images --subset 8000 --epochs 6

Every variant trains with ``trainables.runner.run_trial`` (the trainable's loop): batch 64,
SGD lr 0.05 with Nesterov momentum, cosine schedule, the paper's pruning schedule (DGC's ramp and
SG-CNN's self-grouping steps from 1/12 to 3/4 of training, then fine-tuning). Validation is
5,000 images held out of the training set, test the official 10,000. After training, the
inference time of the trained networks is measured round-robin in this process (eval mode,
``torch.inference_mode``): median batch-1 latency and the time of a batch of 256 images.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Any

import torch

from trainables.config import TrialConfig
from trainables.runner import build_model
from trainables.runner import run_trial
from trainables.runner import trial_cost

#: about 21 M MACs each (the dense ResNet-20 has 41.0 M)
VARIANTS: dict[str, dict[str, Any]] = {
    "resnet20": {"name": "resnet20"},
    "gcresnet20": {"name": "gcresnet20", "gate_factor": 0.5},
    "dyresnet20": {"name": "dyresnet20", "gate_factor": 0.5, "heads": 4},
    "sgresnet20": {"name": "sgresnet20", "compression": 0.5, "sg_groups": 16},
    "dnresnet20": {"name": "dnresnet20", "kernels": 4, "width_mult": 0.7},
}


class _Last:
    """Keeps the last checkpoint state the trial reports (the trained weights)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.state = state or self.state
        print(f"  epoch {metrics['epoch']}: val {metrics['val_accuracy']:.4f}", flush=True)


def config(a: argparse.Namespace, model: dict[str, Any]) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "epochs": a.epochs,
            "seed": a.seed,
            "model": model,
            "optim": {"lr": 0.05},
            "data": {
                "dataset": "imagefolder",
                "datadir": a.datadir,
                "val_size": 5000,
                "train_subset": a.subset,
                "batch_size": 64,
            },
        }
    )


def timed(model: torch.nn.Module, x: torch.Tensor, runs: int) -> list[float]:
    with torch.inference_mode():
        model(x)  # warm-up (and the kernel choice at this shape)
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            out.append(time.perf_counter() - t0)
    return out


def inference_times(models: dict[str, torch.nn.Module], rounds: int) -> dict[str, tuple]:
    """Median batch-1 latency (ms) and batch-256 time (ms) per model, round-robin."""
    one, big = torch.randn(1, 3, 32, 32), torch.randn(256, 3, 32, 32)
    lat: dict[str, list[float]] = {n: [] for n in models}
    thr: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            lat[name] += timed(model, one, 20)
            thr[name] += timed(model, big, 2)
    return {n: (1e3 * statistics.median(lat[n]), 1e3 * statistics.median(thr[n])) for n in models}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datadir", required=True, help="CIFAR-10 ImageFolder (train/, test/)")
    p.add_argument("--subset", type=int, default=8000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the timing")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args()
    stamp = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"# {stamp} torch {torch.__version__} {platform.machine()} "
          f"threads {torch.get_num_threads()} | {vars(a)}", flush=True)  # fmt: skip
    rows, models = {}, {}
    for variant in a.variants:
        cfg = config(a, VARIANTS[variant])
        target = trial_cost(cfg, 10, (3, 32, 32))
        print(f"{variant}: training ({target.macs / 1e6:.2f} M MACs before training)", flush=True)
        last, t0 = _Last(), time.perf_counter()
        final = run_trial(cfg, last)
        seconds = time.perf_counter() - t0
        model = build_model(cfg, 10, 3)
        model.load_state_dict(last.state["model"])
        models[variant] = model.eval()
        rows[variant] = (final, seconds)
    torch.set_num_threads(1)
    times = inference_times(models, a.rounds)
    print("\n| model | MACs (M) | params (M) | val acc | test acc | train (s) |"
          " batch-1 latency (ms) | batch-256 (ms) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant, (final, seconds) in rows.items():
        lat, thr = times[variant]
        print(f"| {variant} | {final['macs'] / 1e6:.2f} | {final['params'] / 1e6:.3f} | "
              f"{final['val_accuracy']:.4f} | {final['test_accuracy']:.4f} | {seconds:.0f} | "
              f"{lat:.2f} | {thr:.1f} |")  # fmt: skip
    print("\n(inference: 1 torch thread, medians over the round-robin; ratios to resnet20:)")
    base = times.get("resnet20")
    if base:
        for variant, (lat, thr) in times.items():
            print(f"  {variant}: latency x{lat / base[0]:.2f}, batch-256 x{thr / base[1]:.2f}")


if __name__ == "__main__":
    main()
