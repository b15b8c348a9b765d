"""Eval and train-step time of this checkout's DGC networks against an older checkout's, in one
process, round-robin (same weights, gates fully pruned, float32, 2 threads).

    git archive <old-commit> dgc | tar -x -C /tmp/old && mv /tmp/old/dgc /tmp/old/dgc_old
    grep -rl dgc /tmp/old/dgc_old | xargs sed -i 's/from dgc\\./from dgc_old./g; \\
        s/"dgc::/"dgc_old::/g; s/torch\\.ops\\.dgc\\./torch.ops.dgc_old./g; \\
        s/from dgc import/from dgc_old import/g; s/Library("dgc"/Library("dgc_old"/g'
    PYTHONPATH=/tmp/old python bench/dgc_before_after.py [--runs 10] [--modes eval train] \\
        [--models dyresnet18 ...] [--batches 1 ...] [--gate 0.25] [--with-dense]

--models also takes the dense networks (resnet18, densenet86, resnet20), eval only: a change
to code they share (the DenseNet transitions, 6.1) timed in both.

(The operator and library renames let both checkouts register dgc's operator, from commit
c917bdf on.)

Prints before/after milliseconds and the speed-up (before / after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import dgc_old
import torch
import torch.nn.functional as F

import dgc

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

CASES = [
    ("dyresnet18", 224, 1),
    ("dyresnet18", 224, 8),
    ("dydensenet86", 32, 1),
    ("dydensenet86", 32, 64),
    ("dyresnet20", 32, 1),
    ("dyresnet20", 32, 64),
]
TRAIN = [("dyresnet18", 224, 8), ("dydensenet86", 32, 64), ("dyresnet20", 32, 64)]


def pair(name: str, gate: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    kwargs = {"gate_factor": gate} if name.startswith("dy") else {}  # a dense one: none
    new = dgc.create_model(name, **kwargs)
    old = dgc_old.create_model(name, **kwargs)
    old.load_state_dict(new.state_dict())
    dgc.set_progress(new, 1.0)
    dgc_old.set_progress(old, 1.0)
    return old, new


def timed(fns: dict, runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(runs):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model, lib, opt, x, y):
    loss = F.cross_entropy(model(x), y) + 1e-5 * lib.aux_loss(model)
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--modes", nargs="+", choices=("eval", "train"), default=["eval", "train"])
    p.add_argument("--models", nargs="+", help="only these networks (default: all)")
    p.add_argument("--gate", type=float, default=0.25, help="the DGC networks' gate factor")
    p.add_argument("--batches", nargs="+", type=int, help="only these batch sizes (default: all)")
    p.add_argument(
        "--with-dense",
        action="store_true",
        help="eval: the dense network in the round too, as bench/dgc_speed.py infer times it "
        "(its weights evict the DGC networks' from the caches), and the ratios dense / before "
        "and dense / after",
    )
    a = p.parse_args()
    cases = [c for c in CASES if not a.models or c[0] in a.models]
    # a dense network named (--models densenet86): its DGC variant's sizes and batches
    cases += [(n[2:], s, b) for n, s, b in CASES if a.models and n[2:] in a.models]
    cases = [c for c in cases if not a.batches or c[2] in a.batches]
    train = [c for c in TRAIN if not a.models or c[0] in a.models]
    train = [c for c in train if not a.batches or c[2] in a.batches]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"| network (g {a.gate}) | batch | mode | before ms | after ms | speed-up |")
    print("|---|---:|---|---:|---:|---:|")
    for name, size, batch in cases if "eval" in a.modes else []:
        old, new = (m.eval() for m in pair(name, a.gate))
        x = torch.randn(batch, 3, size, size)
        fns = {"before": lambda: old(x), "after": lambda: new(x)}
        if a.with_dense:
            dense = dgc.create_model(name.removeprefix("dy")).eval()
            fns["dense"] = lambda: dense(x)
        with torch.inference_mode():
            ms = timed(fns, a.runs)
        extra = ""
        if a.with_dense:
            extra = f" (dense {ms['dense']:.1f} ms: {ms['dense'] / ms['before']:.2f} -> "
            extra += f"{ms['dense'] / ms['after']:.2f})"
        print(
            f"| {name} | {batch} | eval | {ms['before']:.1f} | {ms['after']:.1f} | "
            f"{ms['before'] / ms['after']:.2f}{extra} |",
            flush=True,
        )
    for name, size, batch in train if "train" in a.modes else []:
        old, new = (m.train() for m in pair(name, a.gate))
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        o1, o2 = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (old, new))
        fns = {
            "before": lambda: train_step(old, dgc_old, o1, x, y),
            "after": lambda: train_step(new, dgc, o2, x, y),
        }
        ms = timed(fns, max(3, a.runs // 2))
        print(
            f"| {name} | {batch} | train step | {ms['before']:.0f} | {ms['after']:.0f} | "
            f"{ms['before'] / ms['after']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
