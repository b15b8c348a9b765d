"""Training throughput of the device-resident pipeline vs a torchvision DataLoader, and the
accuracy of DGC against its dense and static-group baselines after a short schedule.

    tar xzf ../shared/data/cifar10/cifar10-images-jpeg.tar.gz -C /tmp
    python bench/cifar_pipeline.py throughput --datadir /tmp/cifar10-images [--subset 10000]
    python bench/cifar_pipeline.py accuracy   --datadir /tmp/cifar10-images [--epochs 3]

throughput: one epoch on a ``--subset`` of the training images, batch 64, for each model, fed
(a) by ``DeviceLoader`` (uint8 cache on the device, batched crop/flip) and (b) by torchvision's
``ImageFolder`` + ``DataLoader`` with per-sample RandomCrop/Flip/ToTensor/Normalize
(``--workers`` processes). "data share" = time to produce the epoch's batches alone divided by
the training epoch time.
accuracy: ``search train``'s loop (TrialConfig) on the same subset for each variant; validation
is 5,000 images carved from the training set, test is the official 10,000.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from trainables.config import DataParams
from trainables.config import OptimParams
from trainables.config import TrialConfig
from trainables.data import DeviceLoader
from trainables.data import load_splits
from trainables.loop import Schedule
from trainables.loop import make_optimizer
from trainables.loop import train_one_epoch
from trainables.runner import build_model
from trainables.runner import run_trial
from trainables.runner import trial_cost


def torchvision_loader(root: str, subset: int, workers: int, stats) -> torch.utils.data.DataLoader:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(*stats)]
    )
    ds = datasets.ImageFolder(f"{root}/train", tf)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:subset]
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx.tolist()),
        64,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
    )


def timed_epoch(name: str, batches_fn, n_batches: int) -> tuple[float, float]:
    """(train seconds, data-only seconds) for one epoch of ``name``."""
    torch.manual_seed(0)
    model = build_model(TrialConfig(model={"name": name, "gate_factor": 0.5}), 10, 3)
    sched = Schedule(OptimParams(lr=0.05), n_batches, 1)
    t0 = time.perf_counter()
    for _ in batches_fn():
        pass
    data_s = time.perf_counter() - t0
    stats = train_one_epoch(model, batches_fn(), make_optimizer(model, sched.optim), sched, 0)
    return stats.seconds, data_s


def throughput(a: argparse.Namespace) -> None:
    params = DataParams(
        dataset="imagefolder", datadir=a.datadir, val_size=5000, train_subset=a.subset
    )
    s = load_splits(params)
    dev = DeviceLoader(s.train, 64, torch.device("cpu"), s.mean, s.std, augment=True, train=True)
    tv = torchvision_loader(a.datadir, a.subset, a.workers, (s.mean, s.std))
    print(header(a))
    print(
        "| model (gate 0.5) | pipeline | images/s (train) | epoch (s) | data only (s) "
        "| data share |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name in a.models:
        for label, fn, n in [
            ("device-resident uint8", lambda: dev.epoch(torch.Generator()), len(dev)),
            (f"torchvision DataLoader ({a.workers} workers)", lambda: iter(tv), len(tv)),
        ]:
            train_s, data_s = timed_epoch(name, fn, n)
            print(
                f"| {name} | {label} | {n * 64 / train_s:.0f} | {train_s:.1f} | {data_s:.2f} | "
                f"{100 * data_s / train_s:.1f}% |",
                flush=True,
            )


#: experiments/digits_dgc_recipe.yaml scaled to a run of any length: a third of the epochs
#: train the dense network, the DGC network prunes over the first half of the rest (after a
#: 1/20 warm-up), the layers use the block's BN-ReLU only.
RECIPE = {"gate_schedule": {"warmup_end": 0.05, "ramp_end": 0.5}}
RECIPE_MODEL = {"kwargs": {"double_norm": False}}


def accuracy(a: argparse.Namespace) -> None:
    print(header(a))
    print("| model | MACs (M) | params (M) | val acc | test acc | train time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in a.variants:
        name, _, recipe = variant.partition("+")  # "dyresnet20+recipe": the digits recipe
        cfg = TrialConfig.model_validate(
            {
                **(RECIPE if recipe else {}),
                **({"pretrain_epochs": max(1, round(a.epochs / 3))} if recipe else {}),
                "epochs": a.epochs,
                "seed": a.seed,
                "model": {"name": name, "gate_factor": 0.5, **(RECIPE_MODEL if recipe else {})},
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
        cost = trial_cost(cfg, 10, (3, 32, 32))
        t0 = time.perf_counter()
        final = run_trial(cfg, _Quiet())
        print(
            f"| {variant} | {cost.macs / 1e6:.2f} | {cost.params / 1e6:.3f} | "
            f"{final['val_accuracy']:.4f} | {final['test_accuracy']:.4f} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )


class _Quiet:
    def report(self, metrics, state) -> None:
        pass


def header(a: argparse.Namespace) -> str:
    return (
        f"# {datetime.date.today()} torch {torch.__version__} {platform.machine()} "
        f"threads {torch.get_num_threads()} | {vars(a)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["throughput", "accuracy"])
    p.add_argument("--datadir", required=True, help="CIFAR-10 ImageFolder (train/, test/)")
    p.add_argument("--subset", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["dyresnet20", "dydensenet86"])
    p.add_argument("--variants", nargs="+", default=["dyresnet20", "resnet20", "gcresnet20"])
    a = p.parse_args()
    throughput(a) if a.what == "throughput" else accuracy(a)


if __name__ == "__main__":
    main()
