"""How long SG-CNN's self-grouping steps take: k-means' nearest centres by ``torch.cdist``
(full distances, as before) against one matrix product (``dgc.layers.self_grouping.nearest``).

    python bench/sg_grouping.py [--models sgresnet50 sgdensenet74] [--rounds 3] [--threads 1]

Each round builds each network afresh (seed 0) and runs all its grouping steps at once
(``dgc.set_progress(model, 1.0)``) with each variant, round-robin in this process; the table
gives the median seconds and the ratio. Both variants give the same masks (checked).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

import dgc
from dgc.layers import self_grouping


def by_cdist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, centres).argmin(1)


def group(name: str, nearest: Callable[..., torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = dgc.create_model(name, num_classes=10)
    original, self_grouping.nearest = self_grouping.nearest, nearest
    try:
        start = time.perf_counter()
        dgc.set_progress(model, 1.0)
        seconds = time.perf_counter() - start
    finally:
        self_grouping.nearest = original
    masks = [b.clone() for n, b in model.named_buffers() if n.endswith(".mask")]
    return seconds, masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["sgresnet50", "sgdensenet74"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"cdist": by_cdist, "matmul": self_grouping.nearest}
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s), {args.rounds} rounds")  # fmt: skip
    print("| model | cdist (s) | matmul (s) | matmul / cdist |\n|---|---|---|---|")
    for name in args.models:
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            masks = {}
            for v, fn in variants.items():
                seconds, masks[v] = group(name, fn)
                times[v].append(seconds)
            same = all(torch.equal(a, b) for a, b in zip(masks["cdist"], masks["matmul"]))
            assert same, f"{name}: the two assignments gave different masks"
        c, m = (statistics.median(times[v]) for v in variants)
        print(f"| {name} | {c:.2f} | {m:.2f} | {m / c:.2f} |")


if __name__ == "__main__":
    main()
