"""Forward+backward time and memory of one DGC layer against the reference formulation.

    python bench/dgc_layer.py [--channels 256] [--size 16] [--batch 64] [--heads 4] [--runs 20]

Three variants, same shapes, all in float32 on the CPU (or --device cuda):
  dgc-gather dgc.DynamicGroupConv2d, gathered path: only the kept channels are convolved
             (per-sample grouped conv), gathers rebuilt in backward; "auto" picks it when
             at most 40% of the channels are kept
  dgc-masked dgc.DynamicGroupConv2d, masked path: one full-width grouped conv over the gated
             input, which is rebuilt in backward instead of saved
  reference  the authors' formulation: a Python loop of per-head SE gates, per-head gated
             copies of the input concatenated to (B, heads*C, H, W), one grouped conv
  dense      BN-ReLU-Conv2d, the dense layer DGC replaces
Timing interleaves the variants round-robin in one process (fair under load drift on a
shared machine); memory is measured for each variant in its own subprocess so that peak RSS
is its own. "saved" is the bytes of
the distinct tensors autograd keeps for backward (activation memory, excluding parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import dgc

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")


class ReferenceDGC(nn.Module):
    """The reference repository's layer structure, re-expressed (per-head loop + concat)."""

    def __init__(
        self, cin: int, cout: int, k: int, pad: int, heads: int, squeeze: int, gate: float
    ) -> None:
        super().__init__()
        self.norm, self.heads, self.pad, self.cin, self.gate = (
            nn.BatchNorm2d(cin),
            heads,
            pad,
            cin,
            gate,
        )
        r = cin // (squeeze // 2 if cin < 80 else squeeze)
        self.fc1 = nn.ModuleList(nn.Linear(cin, r, bias=False) for _ in range(heads))
        self.fc2 = nn.ModuleList(nn.Linear(r, cin) for _ in range(heads))
        self.convs = nn.ModuleList(
            nn.Conv2d(cin, cout // heads, k, 1, pad, bias=False) for _ in range(heads)
        )
        self.n_inact = round(cin * (1 - gate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(x))
        z = F.adaptive_avg_pool2d(x, 1).flatten(1)
        gated, lasso = [], 0.0
        for i in range(self.heads):
            s = F.relu(self.fc2[i](F.relu(self.fc1[i](z))))
            lasso = lasso + s.mean()
            s_c = s.clone()
            t = s.detach().topk(self.n_inact, 1, largest=False).values.max(1, keepdim=True).values
            s_c[s.detach().le(t)] = 0
            gated.append(x * s_c[:, :, None, None])
        w = torch.cat([c.weight for c in self.convs], 0)
        y = F.conv2d(torch.cat(gated, 1), w, None, 1, self.pad, 1, self.heads)
        b, o, h, w_ = y.shape
        self.lasso = lasso
        return y.view(b, self.heads, o // self.heads, h, w_).transpose(1, 2).reshape(b, o, h, w_)


def build(variant: str, a: argparse.Namespace) -> nn.Module:
    if variant.startswith("dgc"):
        impl = variant.partition("-")[2] or "auto"
        layer = dgc.DynamicGroupConv2d(
            a.channels, a.channels, 3, 1, 1, heads=a.heads, gate_factor=a.gate, impl=impl
        )
        layer.set_inactive(layer.target_inactive)
        return layer
    if variant == "reference":
        return ReferenceDGC(a.channels, a.channels, 3, 1, a.heads, 16, a.gate)
    return nn.Sequential(
        nn.BatchNorm2d(a.channels),
        nn.ReLU(),
        nn.Conv2d(a.channels, a.channels, 3, 1, 1, bias=False),
    )


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    params = {p.data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(seen.values())


def step(layer: nn.Module, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    layer(x).sum().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def setup(variant: str, a: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    dev = torch.device(a.device)
    x = torch.randn(a.batch, a.channels, a.size, a.size, device=dev, requires_grad=True)
    return build(variant, a).to(dev).train(), x


def memory_one(variant: str, a: argparse.Namespace) -> dict:
    """Run in a fresh process: peak RSS growth over a few steps, and saved activation bytes."""
    layer, x = setup(variant, a)
    step(layer, x)  # first step allocates the gradients and warms the allocator
    layer.zero_grad(set_to_none=False)
    rss0 = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark (Linux)
    for _ in range(3):
        step(layer, x)
    peak = (_rss_kib("VmHWM") - rss0) * 1024
    return {"saved_mb": saved_bytes(layer, x) / 2**20, "peak_rss_increase_mb": peak / 2**20}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def timing(variants: tuple[str, ...], a: argparse.Namespace) -> dict[str, list[float]]:
    """Round-robin over the variants so that machine load drifts hit all of them alike."""
    setups = {v: setup(v, a) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(a.warmup + a.runs):
        for v, (layer, x) in setups.items():
            t = step(layer, x)
            if i >= a.warmup:
                times[v].append(t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--gate", type=float, default=0.25)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(memory_one(a.variant, a)))
        return
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads {torch.get_num_threads()}, device {a.device}; C={a.channels}->{a.channels} "
        f"3x3, {a.size}x{a.size}, batch {a.batch}, heads {a.heads}, gate {a.gate}"
    )
    variants = ("dgc-gather", "dgc-masked", "reference", "dense")
    times = timing(variants, a)
    print(
        "| variant | median fwd+bwd (ms) | min (ms) | saved activations (MiB) "
        "| peak RSS over steady state (MiB) |"
    )
    print("|---|---|---|---|---|")
    for v in variants:
        out = subprocess.run(
            [sys.executable, __file__, "--variant", v, *sys.argv[1:]],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        m = json.loads(out)
        print(
            f"| {v} | {1e3 * statistics.median(times[v]):.1f} | {1e3 * min(times[v]):.1f} | "
            f"{m['saved_mb']:.1f} | {m['peak_rss_increase_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
