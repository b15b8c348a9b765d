"""The DGC layer's kept-channel kernels on single layer shapes, against the dense conv (issue #7).

    python bench/dgc_kernels.py [--runs 20] [--threads 2]

For each (batch, C, O, size, k, stride) at heads 4 and gate 0.25: the torch kernels of
``dgc.layers.gathered`` (fold, unfold), the native direct convolution (``dgc.layers.native``)
and the dense ``F.conv2d`` over all channels, on the same post-BN-ReLU input and random
saliencies, round-robin in one process (median of --runs). Prints microseconds and the
GMAC/s each reaches (the kept-channel kernels execute 1/4 of the dense MACs). The native
output is checked against ``fold_conv`` first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dgc.layers import gathered as G
from dgc.layers import native

sys.path.insert(0, str(Path(__file__).parent))
from dgc_speed import round_robin

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

SHAPES = [  # (batch, C, O, size, k, stride): layers of DyResNet-20, DyResNet-18, a downsample
    (1, 16, 16, 32, 3, 1),
    (1, 32, 32, 16, 3, 1),
    (1, 64, 64, 8, 3, 1),
    (64, 16, 16, 32, 3, 1),
    (64, 64, 64, 8, 3, 1),
    (1, 64, 64, 56, 3, 1),
    (1, 512, 512, 7, 3, 1),
    (8, 64, 64, 56, 3, 1),
    (1, 16, 32, 32, 1, 2),
]
HEADS, KEPT = 4, 0.25


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if native.library() is None:
        sys.exit("the native kernel could not be built here (see the warning above)")
    print("| batch, C, O, size, k, stride | fold us | unfold us | direct us | dense us |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for b, c, o, hw, k, s in SHAPES:
        x, w = torch.randn(b, c, hw, hw).relu(), torch.randn(o, c, k, k)
        index, scale = G.select_channels(torch.rand(b, HEADS, c), c - int(c * KEPT))
        rows, taps = G.weight_rows(w, HEADS), G.weight_rows(w, HEADS, True)
        conv = (s, k // 2, 1)
        with torch.inference_mode():
            ref = G.fold_conv(x, index, scale, rows, k, conv)
            out = native.direct_conv(x, index, scale, rows, (o, k), conv)
            assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5  # order of summation
            fns = {
                "fold": lambda: G.fold_conv(x, index, scale, rows, k, conv),
                "unfold": lambda: G.unfold_conv(x, index, scale, taps, k, conv),
                "direct": lambda: native.direct_conv(x, index, scale, rows, (o, k), conv),
                "dense": lambda: F.conv2d(x, w, None, s, k // 2),
            }
            ms = round_robin(fns, a.runs, "cpu")
        dense_macs = b * o * c * k * k * ref.shape[2] * ref.shape[3]
        cells = []
        for name, t in ms.items():
            macs = dense_macs * (1.0 if name == "dense" else KEPT)
            cells.append(f"{t * 1e3:.0f} ({macs / t / 1e6:.3g})")
        print(f"| {b}, {c}, {o}, {hw}, {k}, {s} | " + " | ".join(cells) + " |", flush=True)
    print("cells: median microseconds (GMAC/s)")


if __name__ == "__main__":
    main()
