"""The GPU check of DGC's training and inference cost against the dense networks (issue #25):
one script, one markdown file, under 8 minutes on one H100.

    python bench/gpu_check.py --out gpu_check.md             # on a CUDA machine
    python bench/gpu_check.py --smoke --out smoke.md         # the CPU, small sizes (CI)

Sections (dense time / DGC time: > 1 means DGC is faster):

1. Per-layer forward + backward of every training formulation (gathered, masked, folded) and
   of the dense conv, over the DGC layer shapes of ResNet-20 and DenseNet-86 (gate 0.25, fully
   pruned), float32 and bfloat16 autocast.
2. The whole training step (forward, cross-entropy + lasso, backward, SGD with momentum) of
   DyResNet-20, DyDenseNet-86 and DyResNet-18 against their dense networks at batch 64 and
   256: eager (the layers' measured choice of formulation), compiled (``torch.compile``) and
   compiled with CUDA graphs (``mode="reduce-overhead"``), float32 and bf16 autocast.
3. Inference (eval, no grad) at batch 1, 64 and 256, eager and replayed as a CUDA graph.
4. The ten CUDA kernels that take the most time in the slowest training case (profiler).

Variants of one case are timed round-robin in one process (bench/dgc_speed.round_robin);
compilation is not timed. A case that would pass ``--budget-s`` is skipped and says so. Every
table carries the device, driver, torch, CUDA and cuDNN versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dgc_speed

import dgc
from dgc.layers.dgc_kernels import DgcKernels
from dgc.layers.dynamic_group_conv import DynamicGroupConv2d

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

FORMULATIONS = ("gathered", "masked", "folded")
# (C, O, k, stride, H) of the DGC layers of ResNet-20 (3x3 blocks, 1x1 downsamples) and
# DenseNet-86 (the 1x1 bottlenecks: C grows by the growth rate, O = 4 x growth)
LAYERS = {
    "resnet20": [
        (16, 16, 3, 1, 32),
        (16, 32, 3, 2, 32),
        (32, 32, 3, 1, 16),
        (16, 32, 1, 2, 32),
        (32, 64, 3, 2, 16),
        (64, 64, 3, 1, 8),
        (32, 64, 1, 2, 16),
    ],
    "densenet86": [
        (48, 32, 1, 1, 32),
        (152, 32, 1, 1, 32),
        (240, 64, 1, 1, 16),
        (464, 64, 1, 1, 16),
        (800, 128, 1, 1, 8),
        (1248, 128, 1, 1, 8),
    ],
}
NETWORKS = [("resnet20", 32), ("densenet86", 32), ("resnet18", 224)]


class Budget:
    """The seconds left; cases that would start after the deadline are skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.deadline


def environment(device: str) -> str:
    parts = [
        f"date {datetime.date.today().isoformat()}",
        f"torch {torch.__version__}",
        f"Python {platform.python_version()}",
    ]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        parts += [
            f"device {props.name}",
            f"CUDA {torch.version.cuda}",
            f"cuDNN {torch.backends.cudnn.version()}",
            f"driver {driver()}",
        ]
    else:
        parts += [
            f"device CPU ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} threads"
        ]
    return ", ".join(parts)


def driver() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def layer_rows(a: argparse.Namespace, budget: Budget) -> list[str]:
    """Section 1: per-layer forward + backward of each formulation and the dense conv."""
    rows = [
        "| network | C->O k s H | dtype | dense ms | "
        + " | ".join(f"{f} ms (dense/{f})" for f in FORMULATIONS)
        + " |",
        "|---|---|---|---:|" + "---:|" * len(FORMULATIONS),
    ]
    for net, shapes in LAYERS.items():
        for c, o, k, stride, h in shapes[: a.max_layers]:
            if not budget.left():
                rows.append(f"| {net} | {c}->{o} k{k} s{stride} {h} | skipped: time budget |")
                continue
            x = torch.randn(a.layer_batch, c, h, h, device=a.device)
            for dtype in a.dtypes:
                fns = {"dense": dense_step(c, o, k, stride, x, a.device, dtype)}
                for f in FORMULATIONS:
                    fns[f] = layer_step(c, o, k, stride, x, f, a.device, dtype)
                ms = dgc_speed.round_robin(fns, a.runs, a.device)
                cells = [f"{ms[f]:.2f} ({ms['dense'] / ms[f]:.2f})" for f in FORMULATIONS]
                rows.append(
                    f"| {net} | {c}->{o} k{k} s{stride} {h} | {name_of(dtype)} | "
                    f"{ms['dense']:.2f} | " + " | ".join(cells) + " |"
                )
    return rows


def layer_step(
    c: int,
    o: int,
    k: int,
    stride: int,
    x: torch.Tensor,
    formulation: str,
    device: str,
    dtype: torch.dtype,
) -> Callable[[], None]:
    layer = DynamicGroupConv2d(c, o, k, stride, k // 2, heads=4, gate_factor=0.25).to(device)
    layer.train().set_inactive(layer.target_inactive)
    layer.kernels = DgcKernels(measure=device == "cuda", prefer=formulation)
    return forward_backward(layer, x, device, dtype)


def dense_step(
    c: int, o: int, k: int, stride: int, x: torch.Tensor, device: str, dtype: torch.dtype
) -> Callable[[], None]:
    conv = torch.nn.Sequential(
        torch.nn.BatchNorm2d(c),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c, o, k, stride, k // 2, bias=False),
    ).to(device)
    return forward_backward(conv, x, device, dtype)


def forward_backward(
    module: torch.nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype
) -> Callable[[], None]:
    """One timed call: ``module``'s forward under autocast and its backward, on a copy of x."""
    xg = x.clone().requires_grad_()

    def step() -> None:
        with autocast(device, dtype):
            y = module(xg)
        y.float().sum().backward()

    return step


def train_rows(a: argparse.Namespace, budget: Budget) -> tuple[list[str], tuple | None]:
    """Section 2: whole training steps; returns the rows and the slowest DGC case."""
    rows = [
        "| network | batch | dtype | mode | dense ms | DGC ms | dense / DGC |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    worst: tuple | None = None
    for family, size in NETWORKS[: a.max_networks]:
        size = min(size, a.max_size)
        for batch in a.train_batches:
            for dtype in a.dtypes:
                for mode in a.modes:
                    if not budget.left():
                        rows.append(
                            f"| dy{family} | {batch} | {name_of(dtype)} | {mode} | "
                            "skipped: time budget | | |"
                        )
                        continue
                    ms = time_training(family, size, batch, dtype, mode, a)
                    ratio = ms["dense"] / ms["dgc"]
                    rows.append(
                        f"| dy{family} | {batch} | {name_of(dtype)} | {mode} | "
                        f"{ms['dense']:.1f} | {ms['dgc']:.1f} | {ratio:.2f} |"
                    )
                    if mode == "eager" and (worst is None or ratio < worst[0]):
                        worst = (ratio, family, size, batch, dtype)
    return rows, worst


def time_training(
    family: str, size: int, batch: int, dtype: torch.dtype, mode: str, a: argparse.Namespace
) -> dict[str, float]:
    x = torch.randn(batch, 3, size, size, device=a.device)
    y = torch.randint(0, 10, (batch,), device=a.device)
    fns = {}
    for key, name, gate in (("dense", family, None), ("dgc", f"dy{family}", 0.25)):
        model = built(name, gate, size, a).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step_model = compiled(model, mode)
        fns[key] = lambda m=model, s=step_model, o=opt: train_step(m, s, o, x, y, dtype, a.device)
    return dgc_speed.round_robin(fns, a.runs, a.device)


def built(name: str, gate: float | None, size: int, a: argparse.Namespace) -> torch.nn.Module:
    """The network as timed; in a smoke run its DGC layers take their default kernels
    untimed (the smoke checks that the script runs, its times mean nothing)."""
    return dgc_speed.build(name, gate, a.device, torch.float32, size, measure=not a.smoke)


def compiled(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "eager":
        return model
    return torch.compile(model, mode="reduce-overhead" if mode == "cuda graph" else None)  # type: ignore[return-value]


def train_step(
    model: torch.nn.Module,
    step_model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    device: str,
) -> None:
    with autocast(device, dtype):
        loss = F.cross_entropy(step_model(x).float(), y % model.num_classes)
        loss = loss + 1e-5 * dgc.aux_loss(model).to(loss.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def infer_rows(a: argparse.Namespace, budget: Budget) -> list[str]:
    """Section 3: eval forwards, eager and (CUDA) replayed as a graph."""
    rows = [
        "| network | batch | mode | dense ms | DGC ms | dense / DGC |",
        "|---|---:|---|---:|---:|---:|",
    ]
    modes = ["eager", "cuda graph"] if a.device == "cuda" else ["eager"]
    for family, size in NETWORKS[: a.max_networks]:
        size = min(size, a.max_size)
        models = {
            "dense": built(family, None, size, a).eval(),
            "dgc": built(f"dy{family}", 0.25, size, a).eval(),
        }
        for batch in a.infer_batches:
            x = torch.randn(batch, 3, size, size, device=a.device)
            for mode in modes:
                if not budget.left():
                    rows.append(f"| dy{family} | {batch} | {mode} | skipped: time budget | | |")
                    continue
                with torch.inference_mode():
                    fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
                    if mode == "cuda graph":
                        fns = {k: dgc_speed.cuda_graphed(m, x) for k, m in models.items()}
                    ms = dgc_speed.round_robin(fns, a.runs, a.device)
                rows.append(
                    f"| dy{family} | {batch} | {mode} | {ms['dense']:.2f} | "
                    f"{ms['dgc']:.2f} | {ms['dense'] / ms['dgc']:.2f} |"
                )
    return rows


def profile_rows(worst: tuple | None, a: argparse.Namespace) -> list[str]:
    """Section 4: the top kernels of the slowest eager training case."""
    if worst is None:
        return ["no training case was timed"]
    ratio, family, size, batch, dtype = worst
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    x = torch.randn(batch, 3, size, size, device=a.device)
    y = torch.randint(0, 10, (batch,), device=a.device)
    model = built(f"dy{family}", 0.25, size, a).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        train_step(model, model, opt, x, y, dtype, a.device)
    activities = [ProfilerActivity.CUDA] if a.device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(3):
            train_step(model, model, opt, x, y, dtype, a.device)
        dgc_speed.sync(a.device)
    key = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=10)
    head = f"dy{family}, batch {batch}, {name_of(dtype)}, eager (dense / DGC {ratio:.2f}), 3 steps:"
    return [head, "", "```", table.strip(), "```"]


def name_of(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the markdown file to write")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: CI checks that it runs")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip cases after this")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args(argv)
    a.device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    a.dtypes = [torch.float32, torch.bfloat16] if a.device == "cuda" else [torch.float32]
    a.modes = ["eager", "compiled", "cuda graph"] if a.device == "cuda" else ["eager"]
    if a.smoke:
        a.runs = min(a.runs, 2)
        a.layer_batch, a.max_layers, a.max_networks, a.max_size = 4, 1, 1, 16
        a.train_batches, a.infer_batches = [4], [1, 4]
    else:
        a.layer_batch, a.max_layers, a.max_networks, a.max_size = 64, 99, 3, 224
        a.train_batches, a.infer_batches = [64, 256], [1, 64, 256]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    budget = Budget(a.budget_s)
    torch.manual_seed(0)
    if a.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per case, as a trial's loop
    started = time.monotonic()
    lines = [
        f"# GPU check ({'smoke, CPU' if a.smoke else a.device})",
        "",
        environment(a.device),
        "",
    ]
    lines += ["## 1. Per layer, forward + backward (gate 0.25)", "", *layer_rows(a, budget), ""]
    rows, worst = train_rows(a, budget)
    lines += ["## 2. Training step (gate 0.25)", "", *rows, ""]
    lines += ["## 3. Inference (gate 0.25)", "", *infer_rows(a, budget), ""]
    lines += ["## 4. Top kernels of the slowest training case", "", *profile_rows(worst, a), ""]
    lines.append(f"Took {time.monotonic() - started:.0f} s.")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
