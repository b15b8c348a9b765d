"""Where a network's eval forward spends its time, and what torch.compile changes (issue #7).

    python bench/dgc_profile.py profile dyresnet18 --batch 1 --size 224
    python bench/dgc_profile.py profile dyresnet20 --batch 64 --train
    python bench/dgc_profile.py trainkernel dyresnet18 --batch 8 --size 224 --runs 6
    python bench/dgc_profile.py compile resnet20 --batches 1 64
    python bench/dgc_profile.py stem resnet18 --size 224 --batches 1 8 --runs 20
    python bench/dgc_profile.py shipped dyresnet20 --batches 1 64 --runs 100
    python bench/dgc_profile.py bntrain dyresnet20 --batch 64 --runs 20
    python bench/dgc_profile.py coldhot dyresnet18 --batch 1 --size 224 --runs 20
    python bench/dgc_profile.py pool densenet86 --batches 1 64 --runs 20
    python bench/dgc_profile.py keepall dyresnet8 --threads 1 --runs 200

profile  torch.profiler (CPU) over 5 eval forwards after 3 warm-ups, gates fully pruned, --gate
         (0.25) for gc/dy models: the top ops by self CPU time, in ms per forward. --train:
         training steps instead (bench/dgc_speed.py's step: forward, loss, backward, SGD).
trainkernel  training steps of a DGC network whose layers all run the `fold` forward and
         backward (torch's batch-folded grouped conv) against the same network with the
         measured per-shape choices (fold or the native kernels, forward and backward timed
         apart), round-robin, and how many layers each choice gave the native kernels.
stem     the ImageNet stem (7x7 conv, BN, ReLU, max-pool) of ``model`` in inference, NCHW
         (nn.Sequential's forward) against the channels-last path the model runs
         (dgc.models.resnet.ImageNetStem), round-robin, outputs compared; --batches.
shipped  what the MLflow model pays: the eval network, eager, against its torch.export
         program loaded back (torch.export.save / load, as MLflow's pt2 format), exported as
         is and as dgc.ShippedModel (the network as one operator: what search logs), and a
         sealed copy of the eager network (dgc.program.seal: what that operator runs),
         round-robin under inference_mode; and every DGC layer called eagerly against dgc's
         operator with the same tensors (the operator's dispatch and cached-layer lookup),
         summed over layers.
bntrain  the training BN-ReLU of every DGC layer's input shape: torch's BatchNorm2d + ReLU
         against the layer's native pass, forward and forward + backward, with torch's eval
         BN and a plane sum for scale, round-robin; microseconds per call.
coldhot  every DGC layer's eval call timed inside the network's forward and again at once
         after it (its weights then in the caches), summed per forward, and the rest of the
         forward (what is not a DGC layer).
pool     the DenseNet's transitions (model: densenet86) at --batches: torch's NCHW 2x2
         average pool, channels-last with its copies, and dgc's native pass, round-robin.
keepall  DyResNet-8 on digits whose first-stage layers keep every channel, against one with
         an inactive channel in each (model: ignored; --threads 1 as a latency trial).
compile  eager and torch.compile(dynamic=False) eval forwards of the dense network and its DGC
         variant, round-robin (bench/dgc_speed.py's timing), and the ratio compiled dense /
         compiled DGC.

Random weights with BN statistics from random batches (bench/dgc_speed.py's ``build``);
float32, 2 threads by default.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

import dgc

sys.path.insert(0, str(Path(__file__).parent))
from dgc_speed import build
from dgc_speed import round_robin
from dgc_speed import step

from dgc.layers.dgc_kernels import DgcKernels

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

FORWARDS = 5


def gate_of(name: str, gate: float) -> float | None:
    return gate if name.startswith(("dy", "gc")) else None


def profile(a: argparse.Namespace) -> None:
    model = build(a.model, gate_of(a.model, a.gate), "cpu", torch.float32, a.size)
    x = torch.randn(a.batch, 3, a.size, a.size)
    if a.train:
        run, unit = train_step(model.train(), x), "step"
    else:
        model.eval()
        run, unit = lambda: model(x), "forward"
    with torch.inference_mode(not a.train):
        for _ in range(3):
            run()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(FORWARDS):
                run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / FORWARDS
    print(f"{a.model} b{a.batch} {a.size}px: {total:.1f} ms self CPU per {unit}")
    print(f"| op | ms per {unit} | calls per {unit} |\n|---|---:|---:|")
    for e in events[: a.top]:
        ms = e.self_cpu_time_total / 1e3 / FORWARDS
        print(f"| {e.key} | {ms:.2f} | {e.count // FORWARDS} |")


def train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``model`` on ``x`` (bench/dgc_speed.py's step, float32)."""
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    args = argparse.Namespace(device="cpu", dtype=torch.float32)
    return lambda: step(model, opt, x, y, args)


def trainkernel(a: argparse.Namespace) -> None:
    x = torch.randn(a.batch, 3, a.size, a.size)
    models, fns = {}, {}
    for name, prefer in (("fold", "fold"), ("measured", None)):
        torch.manual_seed(0)
        models[name] = build(
            a.model, gate_of(a.model, a.gate), "cpu", torch.float32, a.size
        ).train()
        for layer in dgc.dgc_layers(models[name]):
            layer.kernels = DgcKernels(prefer=prefer)
        fns[name] = train_step(models[name], x)
    ms = round_robin(fns, a.runs, "cpu")
    layers = dgc.dgc_layers(models["measured"])
    native = {
        part: sum(
            any(k[0] == part and v == "direct" for k, v in layer.kernels.chosen.items())
            for layer in layers
        )
        for part in ("train", "backward")
    }
    print(
        f"{a.model} b{a.batch} train step: fold {ms['fold']:.1f} ms, measured choice "
        f"{ms['measured']:.1f} ms (native forward in {native['train']}, native backward in "
        f"{native['backward']} of {len(layers)} layers); "
        f"fold / measured = {ms['fold'] / ms['measured']:.3f}"
    )


def bntrain(a: argparse.Namespace) -> None:
    """Training BN-ReLU of each DGC layer's input shape at --batch: torch's BatchNorm2d + ReLU
    (forward, and forward + backward), the DGC layer's native pass, and for scale torch's eval
    BN and a plane sum, round-robin (--runs)."""
    from dgc.layers.norm import BatchNormReLU

    model = build(a.model, gate_of(a.model, a.gate), "cpu", torch.float32, a.size).train()
    shapes: dict[tuple, int] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, i: shapes.__setitem__(tuple(i[0].shape), shapes.get(tuple(i[0].shape), 0) + 1)
        )
        for layer in dgc.dgc_layers(model)
    ]
    with torch.no_grad():
        model(torch.randn(a.batch, 3, a.size, a.size))
    for h in hooks:
        h.remove()
    print(
        "| input shape | layers | torch fwd us | native fwd us | torch fwd+bwd us "
        "| native fwd+bwd us | eval BN us | sum us |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, count in shapes.items():
        bn = torch.nn.BatchNorm2d(shape[1])
        x = torch.randn(shape).requires_grad_()
        g = torch.randn(shape)
        w, b = bn.weight, bn.bias

        def torch_fb() -> None:
            torch.relu(bn(x)).backward(g)

        def native_fb() -> None:
            y, sums, _, _ = BatchNormReLU.apply(x, w, b, bn.eps)
            torch.autograd.backward([y, sums], [g, torch.zeros_like(sums)])

        fns = {
            "torch": lambda: torch.relu(bn(x.detach())),
            "native": lambda: BatchNormReLU.apply(x.detach(), w.detach(), b.detach(), bn.eps),
            "torch_fb": torch_fb,
            "native_fb": native_fb,
            "eval": lambda: torch.nn.functional.batch_norm(
                x.detach(), bn.running_mean, bn.running_var, w.detach(), b.detach()
            ),
            "sum": lambda: x.detach().sum((2, 3)),
        }
        ms = round_robin(fns, a.runs, "cpu")
        cells = " | ".join(f"{1e3 * ms[k]:.0f}" for k in fns)
        print(f"| {shape} | {count} | {cells} |")


def coldhot(a: argparse.Namespace) -> None:
    """Each DGC layer's eval call inside a forward (its weights wherever the rest of the
    network left them) against the same call repeated at once (weights in the caches),
    summed over the layers, per forward; --runs forwards after 3 warm-ups."""
    model = build(a.model, gate_of(a.model, a.gate), "cpu", torch.float32, a.size).eval()
    acc = {"in the forward": 0.0, "repeated at once": 0.0}

    def timed_twice(forward: Callable) -> Callable:
        def run(x: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            y = forward(x)
            t1 = time.perf_counter()
            forward(x)
            acc["in the forward"] += t1 - t0
            acc["repeated at once"] += time.perf_counter() - t1
            return y

        return run

    for layer in dgc.dgc_layers(model):
        layer.forward = timed_twice(layer.forward)
    x = torch.randn(a.batch, 3, a.size, a.size)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        acc.update({k: 0.0 for k in acc})
        t0 = time.perf_counter()
        for _ in range(a.runs):
            model(x)
        rest = time.perf_counter() - t0 - sum(acc.values())
    cells = ", ".join(f"{k} {1e3 * v / a.runs:.2f} ms" for k, v in acc.items())
    print(
        f"{a.model} b{a.batch}: DGC layers per forward: {cells}; the rest of the forward "
        f"(not DGC layers) {1e3 * rest / a.runs:.2f} ms"
    )


def compile_(a: argparse.Namespace) -> None:
    models = {
        "dense": build(a.model, None, "cpu", torch.float32, a.size).eval(),
        "dgc": build("dy" + a.model, 0.25, "cpu", torch.float32, a.size).eval(),
    }
    for batch in a.batches:
        x = torch.randn(batch, 3, a.size, a.size)
        fns = {}
        with torch.no_grad():
            for name, m in models.items():
                m(x)
                t0 = time.time()
                compiled = torch.compile(m, dynamic=False)
                compiled(x)
                print(f"compile {name} b{batch}: {time.time() - t0:.0f} s", flush=True)
                fns[name] = lambda m=m: m(x)
                fns[f"{name} compiled"] = lambda c=compiled: c(x)
            ms = round_robin(fns, a.runs, "cpu")
        cells = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
        ratio = ms["dense compiled"] / ms["dgc compiled"]
        print(f"{a.model} b{batch}: {cells}; compiled dense / compiled DGC = {ratio:.2f}")


def stem(a: argparse.Namespace) -> None:
    model = dgc.create_model(a.model).eval()
    for batch in a.batches:
        x = torch.randn(batch, 3, a.size, a.size)
        with torch.inference_mode():
            nchw = torch.nn.Sequential.forward(model.stem, x)
            assert torch.equal(nchw, model.stem(x))
            fns = {
                "NCHW": lambda: torch.nn.Sequential.forward(model.stem, x),
                "channels-last": lambda: model.stem(x),
            }
            ms = round_robin(fns, a.runs, "cpu")
        cells = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
        print(f"{a.model} stem b{batch} {a.size}px: {cells}; outputs equal")


def shipped(a: argparse.Namespace) -> None:
    import tempfile

    gate = gate_of(a.model, a.gate)
    model = build(a.model, gate, "cpu", torch.float32, a.size).eval()
    example = torch.randn(2, 3, a.size, a.size)
    batch = ({0: torch.export.Dim("batch", min=1)},)
    fns = {"eager": model}
    seal = getattr(dgc.program, "seal", None)  # absent from an older checkout (before/after)
    if seal is not None:
        fns["eager, sealed"] = seal(copy.deepcopy(model))  # what the program's operator runs
    with tempfile.TemporaryDirectory() as tmp:
        shipped = []  # what search logs; absent from an older checkout (before/after)
        if hasattr(dgc, "ShippedModel"):
            kwargs = {} if gate is None else {"gate_factor": gate}
            shipped = [("pt2 ShippedModel", dgc.ShippedModel(model, a.model, kwargs, example))]
        for name, module in [("pt2 as is", model), *shipped]:
            path = Path(tmp) / f"{len(fns)}.pt2"
            torch.export.save(torch.export.export(module, (example,), dynamic_shapes=batch), path)
            fns[name] = torch.export.load(path).module()
    for b in a.batches:
        x = torch.randn(b, 3, a.size, a.size)
        with torch.inference_mode():
            ms = round_robin({k: (lambda f=f: f(x)) for k, f in fns.items()}, a.runs, "cpu")
            ms_layers = layer_calls(model, x, a.runs)
        cells = ", ".join(f"{k} {v:.3f} ms ({ms['eager'] / v:.2f})" for k, v in ms.items())
        print(f"{a.model} b{b}: {cells}  (eager / path)")
        print(
            f"  its {ms_layers['n']} DGC layers, summed: eager {ms_layers['eager']:.3f} ms, "
            f"operator {ms_layers['operator']:.3f} ms "
            f"({(ms_layers['operator'] - ms_layers['eager']) / ms_layers['n'] * 1e3:.1f} us "
            "a layer more)"
        )


def layer_calls(model: torch.nn.Module, x: torch.Tensor, runs: int) -> dict:
    """Each DGC layer on its own input: the eager call against dgc's operator, round-robin."""
    inputs = {}
    layers = dgc.dgc_layers(model)
    hooks = [m.register_forward_pre_hook(lambda m, i: inputs.setdefault(m, i[0])) for m in layers]
    model(x)
    for h in hooks:
        h.remove()
    op = torch.ops.dgc.dynamic_group_conv_eval.default
    calls = []  # the operator's arguments as DynamicGroupConv2d._forward_shipped passes them,
    # built here so that the mode also runs against older checkouts (before/after)
    for m in layers:
        bn = m.norm if isinstance(m.norm, torch.nn.BatchNorm2d) else None
        norm = (None,) * 4 if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        args = (inputs[m], m.weight, m.gate.fc1_weight, m.gate.fc2_weight, m.gate.fc2_bias, *norm,
                m.n_inactive, [m.stride, m.padding, m.dilation], m.saliency == "mask",
                0.0 if bn is None else bn.eps)  # fmt: skip
        calls.append((m, inputs[m], args))
    fns = {
        "eager": lambda: [m(i) for m, i, _ in calls],
        "operator": lambda: [op(*args) for _, _, args in calls],
    }
    return {**round_robin(fns, runs, "cpu"), "n": len(calls)}


def pool(a: argparse.Namespace) -> None:
    """The DenseNet's 2x2 average-pool transitions at their input shapes: torch's NCHW pool,
    torch's channels-last pool with the copies there and back, and dgc's native pass."""
    import torch.nn.functional as F

    from dgc.layers import native

    model = dgc.create_model(a.model).eval()
    shapes = []
    hooks = [
        m.register_forward_pre_hook(lambda m, i: shapes.append(tuple(i[0].shape[1:])))
        for m in model.features
        if isinstance(m, torch.nn.AvgPool2d)
    ]
    with torch.no_grad():
        model.features(model.stem(torch.randn(1, 3, a.size, a.size)))  # module by module
    for h in hooks:
        h.remove()
    for b in a.batches:
        for shape in shapes:
            x = torch.randn(b, *shape)
            fns = {
                "torch": lambda: F.avg_pool2d(x, 2, 2),
                "channels-last + copies": lambda: F.avg_pool2d(
                    x.contiguous(memory_format=torch.channels_last), 2, 2
                ).contiguous(),
                "native": lambda: native.avg_pool2(x),
            }
            equal = torch.equal(fns["native"](), fns["torch"]())
            with torch.inference_mode():
                ms = round_robin(fns, a.runs, "cpu")
            cells = ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
            print(f"{a.model} transition ({b}, {', '.join(map(str, shape))}): {cells}; "
                  f"native bit-equal: {equal}")  # fmt: skip


KEEPALL = {"keeps all in stage 1": (0.979, 0.962, 0.216), "one inactive": (0.94, 0.94, 0.216)}


def keepall(a: argparse.Namespace) -> None:
    """DyResNet-8 on digits (1x8x8, heads 2, batch 1, eval) whose first-stage layers keep every
    channel (gate factors 0.979, 0.962, 0.216: no inactive channel after rounding) against
    one with an inactive channel in each (0.94, 0.94, 0.216), round-robin; and each network's
    inactive channels and settled kernels per layer. Run against an older dgc (PYTHONPATH)
    to time the code before a change."""
    models = {}
    for name, gates in KEEPALL.items():
        torch.manual_seed(0)
        model = dgc.create_model(
            "dyresnet8", num_classes=10, in_chans=1, gate_factor=list(gates), heads=2
        )
        dgc.set_progress(model, 1.0)
        models[name] = model.eval()
    x = torch.randn(1, 1, 8, 8)
    with torch.inference_mode():
        ms = round_robin({k: (lambda m=m: m(x)) for k, m in models.items()}, a.runs, "cpu")
    print(", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    for k, m in models.items():
        cells = [(m_.in_channels, m_.n_inactive, m_.kernels.last) for m_ in dgc.dgc_layers(m)]
        print(f"  {k}: (C, inactive, kernel) per layer {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "mode",
        choices=[
            "profile",
            "compile",
            "stem",
            "trainkernel",
            "shipped",
            "bntrain",
            "coldhot",
            "pool",
            "keepall",
        ],
    )
    p.add_argument("model", help="profile: any dgc name; compile: the dense family name")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true", help="profile: training steps")
    p.add_argument("--gate", type=float, default=0.25, help="gate factor of gc/dy models")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    modes = {
        "profile": profile,
        "compile": compile_,
        "stem": stem,
        "trainkernel": trainkernel,
        "shipped": shipped,
        "bntrain": bntrain,
        "coldhot": coldhot,
        "pool": pool,
        "keepall": keepall,
    }
    modes[a.mode](a)


if __name__ == "__main__":
    main()
