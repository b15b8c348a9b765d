"""Whole-network speed of DGC against the dense and static-group networks it replaces (issue #7).

    python bench/dgc_speed.py infer  [--device cpu] [--threads 2] [--runs 15] [--consecutive 1]
    python bench/dgc_speed.py train  [--device cpu] [--threads 2] [--runs 8]
    python bench/dgc_speed.py export [--runs 15]
    python bench/dgc_speed.py table bench/out/dgc_speed_infer_cpu_float32*.json

infer   eval mode, no grad, gates fully pruned (set_progress 1.0), random weights and inputs
        (BN statistics from 10 random batches of 8): dense <family>, gc<family> and
        dy<family> at gate 0.25, heads 4, per (family, batch). --cuda-graph replays each
        model's forward as a captured CUDA graph (launch overhead removed).
train   one training step (forward, cross-entropy + 1e-5 * aux loss, backward, SGD step) of
        dense, gc (gate 0.5) and dy at gate 0.25 and 0.5.
export  the DGC network as it ships: eager eval (native kernel where it wins), the two
        TorchScript files that `search export` writes (search.commands.write_export: model.ts
        records dgc's operators, model_portable.ts torch kernels) and the model MLflow logs and
        loads back (dgc.ShippedModel through mlflow.pytorch.log_model / load_model in a
        temporary SQLite store), also with the loaded module's ``validate_inputs`` off (its
        per-call input-structure check skipped); and the dense network eager and through
        MLflow (the loaded pt2 module's own overhead). Outputs are compared with the eager
        model's.

Variants of one (family, batch) are timed round-robin in one process (load drift hits all
alike); each figure is the median of --runs timed calls after two warm-ups. Interleaving calls
of different networks means each call starts with the other networks' weights in the caches;
infer --consecutive N runs each variant N times a round and counts the last N-1 (each network
warm in the caches, as a deployed model serving one request after another). Ratios are
dense time / variant time, so > 1 means faster than dense. Results go to stdout as markdown
and to bench/out/dgc_speed_<mode>_<device>.json with the versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dgc
from dgc.layers.dgc_kernels import DgcKernels

# Every shape timed at its first call (not once it recurs): the warm-up settles the kernels,
# so the timed runs see the steady state (dgc.layers.kernel_choice).
os.environ.setdefault("DGC_KERNEL_TIMING", "first")

# (family, image size, batches); the configurations.
INFER_CASES = [("resnet18", 224, (1, 8)), ("densenet86", 32, (1, 64)), ("resnet20", 32, (1, 64))]
TRAIN_CASES = [("resnet18", 224, (8,)), ("densenet86", 32, (64,)), ("resnet20", 32, (64,))]


def build(
    name: str,
    gate: float | None,
    device: str,
    dtype: torch.dtype,
    size: int = 32,
    measure: bool = True,
) -> torch.nn.Module:
    """``name`` fully pruned, on ``device``, BN calibrated; ``measure=False``: its DGC layers
    take their kernels untimed (a smoke run's)."""
    kwargs = {} if gate is None else {"gate_factor": gate}
    model = dgc.create_model(name, **kwargs)
    if not measure:
        for layer in dgc.dgc_layers(model):
            layer.kernels = DgcKernels(measure=False)
    dgc.set_progress(model, 1.0)  # fully pruned: the network that is deployed
    model = model.to(device=device, dtype=dtype)
    calibrate_bn(model, size, device, dtype)
    return model


def calibrate_bn(model: torch.nn.Module, size: int, device: str, dtype: torch.dtype) -> None:
    """Finite eval outputs for an untrained network, so that outputs can be compared.

    A random saliency generator scales a layer's output by about (1 + c * a) for inputs of
    scale a, so in eval mode (running BN statistics) any mismatch grows quadratically from
    layer to layer and the logits of an untrained DGC network overflow to inf/NaN (train mode
    renormalises per batch and hides it). The generators' output weights are damped (x0.01:
    saliencies stay distinct, near 1) and BN statistics are taken from random batches.
    Speed does not depend on either.
    """
    with torch.no_grad():
        for layer in dgc.dgc_layers(model):
            layer.gate.fc2_weight.mul_(0.01)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(10):  # few images leave channels that never fire: var ~ 0 at eval
            model(torch.randn(8, 3, size, size, device=device, dtype=dtype))


def cuda_graphed(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The eval forward captured once as a CUDA graph (static shapes), replayed per call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture; the DGC kernel choice happens here
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_robin(
    fns: dict[str, Callable[[], object]], runs: int, device: str, consecutive: int = 1
) -> dict[str, float]:
    """Median milliseconds per call, variants interleaved.

    consecutive: calls of one variant in a row per round; above 1 the first of each row is
    not counted, so that each variant is timed with its own weights in the caches (as a
    model serving one request after another runs), not after another network evicted them.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: allocator, oneDNN/cuDNN plans, DGC kernel choice
        fn()
        fn()
    for _ in range(runs):
        for name, fn in fns.items():
            for i in range(consecutive):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if consecutive == 1 or i > 0:
                    times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def infer(a: argparse.Namespace) -> list[dict]:
    rows = []
    for family, size, batches in INFER_CASES:
        models = {
            family: build(family, None, a.device, a.dtype, size).eval(),
            f"gc{family}": build(f"gc{family}", 0.25, a.device, a.dtype, size).eval(),
            f"dy{family}": build(f"dy{family}", 0.25, a.device, a.dtype, size).eval(),
        }
        macs = {k: cost_of(k, 0.25 if k != family else None, size) for k in models}
        for batch in a.batches or batches:
            x = torch.randn(batch, 3, size, size, device=a.device, dtype=a.dtype)
            with torch.inference_mode():
                fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
                if a.cuda_graph:
                    fns = {k: cuda_graphed(m, x) for k, m in models.items()}
                ms = round_robin(fns, a.runs, a.device, a.consecutive)
            rows += table_rows(family, batch, ms, macs)
            print_rows(rows[-len(ms) :])
    return rows


def train(a: argparse.Namespace) -> list[dict]:
    rows = []
    for family, size, batches in TRAIN_CASES:
        variants = {
            family: (family, None),
            f"gc{family} g0.5": (f"gc{family}", 0.5),
            f"dy{family} g0.25": (f"dy{family}", 0.25),
            f"dy{family} g0.5": (f"dy{family}", 0.5),
        }
        macs = {k: cost_of(n, g, size) for k, (n, g) in variants.items()}
        for batch in a.batches or batches:
            x = torch.randn(batch, 3, size, size, device=a.device)
            y = torch.randint(0, 10, (batch,), device=a.device)
            fns = {}
            for key, (name, gate) in variants.items():
                model = build(name, gate, a.device, torch.float32, size).train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                fns[key] = lambda m=model, o=opt: step(m, o, x, y, a)
            ms = round_robin(fns, a.runs, a.device)
            rows += table_rows(family, batch, ms, macs)
            print_rows(rows[-len(ms) :])
    return rows


def step(model, opt, x, y, a: argparse.Namespace) -> None:
    with torch.autocast(a.device, dtype=a.dtype, enabled=a.dtype != torch.float32):
        loss = F.cross_entropy(model(x), y[: x.shape[0]] % model_classes(model))
        loss = loss + 1e-5 * dgc.aux_loss(model).to(loss.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def model_classes(model: torch.nn.Module) -> int:
    return int(getattr(model, "num_classes"))


def export(a: argparse.Namespace) -> list[dict]:
    """Eager eval vs the shipped TorchScript and MLflow model, same inputs, outputs compared;
    and the dense network's own MLflow (torch.export) program against its eager model."""
    rows = []
    for family, size, batches in INFER_CASES:
        torch.manual_seed(0)
        name = f"dy{family}"
        model = build(name, 0.25, "cpu", torch.float32, size).eval()
        dense = build(family, None, "cpu", torch.float32, size).eval()
        tmp = Path(tempfile.mkdtemp())
        write_export_of(model, tmp / "export", size, name)
        paths = {
            "eager eval": model,
            "TorchScript model.ts (search export)": torch.jit.load(str(tmp / "export/model.ts")),
            "TorchScript model_portable.ts": torch.jit.load(str(tmp / "export/model_portable.ts")),
            "MLflow": mlflow_round_trip(model, name, {"gate_factor": 0.25}, size, tmp),
            "MLflow, validate_inputs off": unchecked(
                mlflow_round_trip(model, name, {"gate_factor": 0.25}, size, tmp)
            ),
            "dense eager eval": dense,
            "dense MLflow": mlflow_round_trip(dense, family, {}, size, tmp),
        }
        for batch in a.batches or batches:
            x = finite_input(model, (batch, 3, size, size))
            with torch.inference_mode():
                ref, dense_ref = model(x), dense(x)
                diff = {
                    k: rel_diff(m(x), dense_ref if k.startswith("dense") else ref)
                    for k, m in paths.items()
                }
                ms = round_robin({k: (lambda m=m: m(x)) for k, m in paths.items()}, a.runs, "cpu")
            for key, t in ms.items():
                base = ms["dense eager eval" if key.startswith("dense") else "eager eval"]
                rows.append(
                    {
                        "family": name,
                        "batch": batch,
                        "variant": key,
                        "ms": t,
                        "eager_over_variant": base / t,
                        "max_rel_diff": diff[key],
                    }
                )
            print_rows(rows[-len(ms) :], ratio_key="eager_over_variant")
    return rows


def finite_input(model: torch.nn.Module, shape: tuple[int, ...], tries: int = 20) -> torch.Tensor:
    """A random input whose eval output is finite, for comparing outputs. Even with
    calibrate_bn, about 3% of random 32x32 inputs overflow an untrained DyResNet-20 to NaN
    (on torch's kernels as on the native ones); speed does not depend on the draw."""
    for _ in range(tries):
        x = torch.randn(shape)
        with torch.inference_mode():
            if torch.isfinite(model(x)).all():
                return x
    raise RuntimeError(f"no finite output in {tries} random inputs")


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| over the largest |ref|, finite entries; NaN where only one is NaN."""
    both_nan = out.isnan() & ref.isnan()
    err = (out - ref).abs().masked_fill(both_nan, 0.0)
    return float(err.max()) / float(ref.masked_fill(both_nan, 0.0).abs().max())


def write_export_of(model: torch.nn.Module, out: Path, size: int, name: str) -> None:
    from search.commands import write_export

    write_export(model, out, (3, size, size), {"name": name, "kwargs": {"gate_factor": 0.25}})


def mlflow_round_trip(
    model: torch.nn.Module, name: str, kwargs: dict, size: int, tmp: Path
) -> Callable:
    """``model`` (``dgc.create_model(name, **kwargs)``) as search's Pareto registration logs it
    (pt2 of ``dgc.ShippedModel``, batch-2 example), loaded back."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    with mlflow.start_run():
        example = torch.randn(2, 3, size, size)
        shipped = dgc.ShippedModel(model, name, kwargs, example)  # as search.results logs it
        info = mlflow.pytorch.log_model(shipped, name="model", input_example=example.numpy())
    return mlflow.pytorch.load_model(info.model_uri)


def unchecked(module: torch.nn.Module) -> torch.nn.Module:
    """A loaded ``torch.export`` module without its per-call input-structure check (the
    pytree match its forward pre-hook runs; the program's own shape guards still run)."""
    module.validate_inputs = False
    return module


def cost_of(name: str, gate: float | None, size: int) -> int:
    with dgc.on_meta():
        model = dgc.create_model(name, **({} if gate is None else {"gate_factor": gate}))
    return dgc.count_cost(model, (3, size, size)).macs


def table_rows(family: str, batch: int, ms: dict[str, float], macs: dict[str, int]) -> list[dict]:
    dense = ms[family]
    return [
        {
            "family": family,
            "batch": batch,
            "variant": k,
            "macs": macs[k],
            "ms": t,
            "dense_over_variant": dense / t,
        }
        for k, t in ms.items()
    ]


def print_rows(rows: list[dict], ratio_key: str = "dense_over_variant") -> None:
    for r in rows:
        extra = f" | {r['macs'] / 1e6:.1f} M" if "macs" in r else f" | {r['max_rel_diff']:.2e}"
        print(f"| {r['variant']} | {r['batch']}{extra} | {r['ms']:.2f} | {r[ratio_key]:.2f} |")


def table(paths: list[str]) -> str:
    """One markdown row per (family, batch): each variant's ms and dense/variant ratio.

    Given several runs' files, a cell is the median over runs of the ms and of the ratio,
    with the ratio's range across runs in brackets (the ratios of one run are round-robin).
    """
    runs = [json.loads(Path(path).read_text()) for path in paths]
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for data in runs:
        for r in data["rows"]:
            groups.setdefault((r["family"], r["batch"]), {}).setdefault(r["variant"], []).append(r)
    lines = []
    for (family, batch), variants in groups.items():
        if not lines:
            names = [v.replace(family, "").strip() or "dense" for v in variants]
            lines.append("| network | batch | " + " | ".join(f"{n} ms (x)" for n in names) + " |")
            lines.append("|---|---:|" + "---:|" * len(variants))
        cells = [_cell(rows) for rows in variants.values()]
        lines.append(f"| {family} | {batch} | " + " | ".join(cells) + " |")
    envs = "\n".join(json.dumps(data["env"]) for data in runs)
    return "\n".join(lines) + f"\n\n{envs}"


def _cell(rows: list[dict]) -> str:
    key = "dense_over_variant" if "dense_over_variant" in rows[0] else "eager_over_variant"
    ms = statistics.median(r["ms"] for r in rows)
    ratios = [r[key] for r in rows]
    spread = f", {min(ratios):.2f}-{max(ratios):.2f}" if len(rows) > 1 else ""
    return f"{ms:.2f} ({statistics.median(ratios):.2f}{spread})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["infer", "train", "export", "table"])
    p.add_argument("json", nargs="*", help="table: bench/out/dgc_speed_*.json files to render")
    p.add_argument("--tag", default="", help="suffix of the output file (keeps several runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument(
        "--consecutive",
        type=int,
        default=1,
        help="infer: calls of a variant in a row per round, the first not counted (warm caches)",
    )
    p.add_argument("--batches", type=int, nargs="*", help="override the issue's batch sizes")
    p.add_argument("--families", nargs="*", help="subset of resnet18 densenet86 resnet20")
    p.add_argument("--cuda-graph", action="store_true", help="infer: replay captured CUDA graphs")
    a = p.parse_args()
    if a.mode == "table":
        print(table(a.json))
        return
    a.dtype = getattr(torch, a.dtype)
    torch.set_num_threads(a.threads)
    if a.families:
        global INFER_CASES, TRAIN_CASES
        INFER_CASES = [c for c in INFER_CASES if c[0] in a.families]
        TRAIN_CASES = [c for c in TRAIN_CASES if c[0] in a.families]
    torch.manual_seed(0)
    rows = {"infer": infer, "train": train, "export": export}[a.mode](a)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "threads": a.threads,
        "dtype": str(a.dtype),
        "runs": a.runs,
        "consecutive": a.consecutive,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    tag = f"{a.mode}_{a.device}_{str(a.dtype).split('.')[-1]}{'_graph' if a.cuda_graph else ''}"
    dest = out / f"dgc_speed_{tag}{a.tag}.json"
    dest.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
