"""Is SG-CNN's grouped inference conv faster than the dense conv it replaces?

    python bench/sg_speed.py [--threads 1] [--rounds 7]

For each layer shape (CIFAR ResNet-20's 3x3 convs and ResNet-50's at 224) and compression,
a SelfGroupingConv2d (16 k-means groups, as the release) is pruned to the target by its
self-grouping steps, then timed in eval under ``torch.inference_mode`` against the dense
``nn.Conv2d`` of the same shape: the masked conv (what the release runs), one conv per group
("loop"), all groups padded into one grouped conv ("padded") and the layer itself (the fastest
of the three for the shape, chosen on its first call). Every variant runs round-robin in this
process; the table gives the median time of each and its ratio to dense (< 1: faster).
The weights are random (He init), so the groups are those k-means finds on random filters.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn

from dgc.layers.self_grouping import SelfGroupingConv2d

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

#: (label, channels in, channels out, resolution)
SHAPES = [
    ("r20 s1", 16, 16, 32),
    ("r20 s2", 32, 32, 16),
    ("r20 s3", 64, 64, 8),
    ("r50 3x3 s1", 64, 64, 56),
    ("r50 3x3 s3", 256, 256, 14),
    ("r50 3x3 s4", 512, 512, 7),
]


def time_once(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def bench(cin: int, cout: int, hw: int, compression: float, batch: int, rounds: int) -> dict:
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, 3, 1, 1, bias=False).eval()
    sg = SelfGroupingConv2d(cin, cout, 3, 1, 1, groups=16, compression=compression).eval()
    sg.advance(1.0)
    x = torch.randn(batch, cin, hw, hw)
    fns = {"dense": dense, "masked": sg._masked, "loop": sg._loop, "padded": sg._padded,
           "layer": sg}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)  # warm-up; the layer chooses its kernel here
        reps = max(1, int(0.02 / max(time_once(dense, x), 1e-6)))
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(min(time_once(fn, x) for _ in range(reps)))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["chosen"] = sg.kernels.last
    out["alive"] = float(sg.mask.mean())
    out["groups"] = len(sg.structure().outputs)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--compressions", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    stamp = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"# {stamp} torch {torch.__version__} {platform.processor() or platform.machine()} "
          f"threads {a.threads} | {vars(a)}")  # fmt: skip
    print("| layer | batch | cp | alive | groups | dense (ms) | masked | loop | padded | "
          "layer (chosen) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, cin, cout, hw in SHAPES:
        for batch in a.batches:
            for cp in a.compressions:
                r = bench(cin, cout, hw, cp, batch, a.rounds)
                d = r["dense"]
                print(f"| {label} {cin}->{cout} @{hw} | {batch} | {cp:g} | {r['alive']:.2f} | "
                      f"{r['groups']} | {1e3 * d:.3f} | x{r['masked'] / d:.2f} | "
                      f"x{r['loop'] / d:.2f} | x{r['padded'] / d:.2f} | "
                      f"x{r['layer'] / d:.2f} ({r['chosen']}) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
