"""Two builds of the native kernel sources, A and B, timed round-robin in one process on
DyResNet-20's training layer shapes (batch 64): the forward (direct_conv), the fused input and
saliency gradients (igrad_fused) and the weight gradient (wgrad_weight).

    python bench/dgc_native_ab.py OLD_DIR NEW_DIR [--gate 0.5] [--kernels fwd igrad wgrad]
    # e.g. OLD_DIR from an earlier commit (its one direct_conv.c, or the split sources):
    mkdir -p /tmp/old && git archive d054e87 dgc/layers/native | tar -x -C /tmp/old
    python bench/dgc_native_ab.py /tmp/old/dgc/layers/native dgc/layers/native

A source is a folder: every ``*.c`` in it is compiled into one library, with its headers.

Both builds are called through this checkout's ctypes wrappers (dgc.layers.native), so a
kernel is compared only where both sources export its function with this checkout's
signature: ``dgc_wgrad_weight`` exists from the commit that added it (earlier sources had
``dgc_wgrad_rows``, per-channel rows), so wgrad needs two sources from then on. Each layer
shape runs
both builds' kernels on the same random inputs (random kept channels and scales, gate
``--gate``, 4 heads); printed per shape: median ms of 15 round-robin calls, A/B (> 1: B is
faster) and the largest relative difference of the outputs; then the totals over the
network's layers (each shape times how often it occurs).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dgc.layers import gathered as G
from dgc.layers import native
from dgc.layers.native import build

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

# (C, O, H, k, stride) of DyResNet-20's DGC layers as run in training (a strided 1x1 runs at
# stride 1 on the pixels it reads), and how many of each.
SHAPES = {
    (16, 16, 32, 3, 1): 7,
    (16, 32, 32, 3, 2): 1,
    (32, 32, 16, 3, 1): 5,
    (16, 32, 16, 1, 1): 1,
    (32, 64, 16, 3, 2): 1,
    (64, 64, 8, 3, 1): 5,
    (32, 64, 8, 1, 1): 1,
}
BATCH, HEADS, RUNS = 64, 4, 15


TIMED = {"fwd": "dgc_direct_conv", "igrad": "dgc_igrad_fused", "wgrad": "dgc_wgrad_weight"}


def load(source: str, out: Path, which: list[str]) -> ctypes.CDLL:
    """The library built from the ``*.c`` files of folder ``source`` with the package's flags,
    the timed functions' signatures taken from this checkout's (an older source may lack its
    other functions)."""
    files = sorted(str(f) for f in Path(source).glob("*.c"))
    if not files:
        raise SystemExit(f"{source}: no C sources there (give the folder that holds them)")
    subprocess.run(["cc", *build.FLAGS, *files, "-o", str(out), "-lm"], check=True)
    lib, ours = ctypes.CDLL(str(out)), native.library()
    for kernel in which:
        name = TIMED[kernel]
        if not hasattr(lib, name):
            raise SystemExit(f"{source} has no {name}: leave {kernel!r} out (--kernels)")
        getattr(lib, name).argtypes = getattr(ours, name).argtypes
        getattr(lib, name).restype = getattr(ours, name).restype
    return lib


def kernels(c: int, o: int, h: int, k: int, stride: int, gate: float) -> dict:
    pad = k // 2
    x, weight = torch.relu(torch.randn(BATCH, c, h, h)), torch.randn(o, c, k, k) * 0.1
    kept = c - round(c * (1 - gate))
    index, scale = G.select_channels(torch.rand(BATCH, HEADS, c), c - kept)
    rows = G.weight_rows(weight, HEADS).contiguous()
    grad = torch.randn(BATCH, o, (h + 2 * pad - k) // stride + 1, (h + 2 * pad - k) // stride + 1)
    conv = (stride, pad, 1)
    return {
        "fwd": lambda: native.direct_conv(x, index, scale, rows, (o, k), conv),
        "igrad": lambda: native.igrad_fused(grad, x, index, scale, rows, k, pad, stride),
        "wgrad": lambda: native.wgrad_weight(x, index, scale, grad, (o, k), conv),
    }


def as_tuple(out: object) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("a", help="folder of sources A (the baseline)")
    p.add_argument("b", help="folder of sources B")
    p.add_argument("--gate", type=float, default=0.5)
    p.add_argument("--kernels", nargs="+", choices=("fwd", "igrad", "wgrad"), default=None)
    a = p.parse_args()
    which = a.kernels or ["fwd", "igrad", "wgrad"]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    libs = {"A": load(a.a, tmp / "a.so", which), "B": load(a.b, tmp / "b.so", which)}
    totals = {(tag, n): 0.0 for tag in libs for n in which}
    for (c, o, h, k, stride), count in SHAPES.items():
        fns = kernels(c, o, h, k, stride, a.gate)
        times = {(tag, n): [] for tag in libs for n in which}
        outs = {}
        for rep in range(RUNS + 2):  # two warm-ups, then round-robin
            for tag, lib in libs.items():
                native.library = lambda lib=lib: lib
                for n in which:
                    t0 = time.perf_counter()
                    out = fns[n]()
                    if rep >= 2:
                        times[(tag, n)].append(time.perf_counter() - t0)
                    outs[(tag, n)] = as_tuple(out)
        line = f"C{c} O{o} H{h} k{k} s{stride} x{count}:"
        for n in which:
            ms = {tag: statistics.median(times[(tag, n)]) * 1e3 for tag in libs}
            diff = max(
                float((p_ - q).abs().max() / q.abs().max().clamp_min(1e-12))
                for p_, q in zip(outs[("B", n)], outs[("A", n)])
            )
            ratio = ms["A"] / ms["B"]
            line += f"  {n} A {ms['A']:.2f} B {ms['B']:.2f} (A/B {ratio:.2f}, diff {diff:.0e})"
            for tag in libs:
                totals[(tag, n)] += ms[tag] * count
        print(line, flush=True)
    for n in which:
        ta, tb = totals[("A", n)], totals[("B", n)]
        print(f"total {n}: A {ta:.1f} ms  B {tb:.1f} ms  A/B {ta / tb:.3f}")


if __name__ == "__main__":
    main()
