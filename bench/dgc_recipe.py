"""Which ingredients make DGC train well in a search trial's budget: DGC against the static group
conv of equal gate factor (and the dense network), several seeds, by one recipe at a time.

    python bench/dgc_recipe.py --recipe digits [--seeds 0 1 2] [--variants paper recipe ...]
    python bench/dgc_recipe.py --recipe cifar10 --set data.datadir=/tmp/cifar/cifar10-images \\
        --set data.dataset=imagefolder [--variants dense gc-0.5 paper-0.5 ...] [--workers 2]
    python bench/dgc_recipe.py --recipe cifar10 --table      # the table of what has finished

Every variant is a set of trial-config overrides on the recipe file's ``trial:``
(experiments/digits_dgc_recipe.yaml, experiments/cifar10_dgc_recipe.yaml: the shipped recipe),
then ``--set`` (the machine's data folder). Runs go to ``--workers`` processes of one torch
thread each, interleaved by seed so variants see the same machine load. Each finished run is
appended to ``--out`` (JSON lines: accuracies, MACs, training seconds, the validation curve);
runs already there are not run again, so an interrupted campaign resumes where it stopped.
Prints the mean and spread of the validation and test accuracy per variant; a run whose loss
diverged is counted as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# The digits recipe file's trial is its shipped recipe; "paper" is the authors' recipe (their
# network and schedule, no pretraining); the others add one ingredient to it at a time.
PAPER_NET = {"kwargs": {"double_norm": True, "gate_shortcut": True, "saliency": "scale"}}
PAPER_RAMP = {"warmup_end": 1 / 12, "ramp_end": 0.75, "unit": "fraction"}
EARLY_RAMP = {"warmup_end": 1, "ramp_end": 10, "unit": "epochs"}
DIGITS: dict[str, dict[str, Any]] = {
    "gc": {"model": {"name": "gcresnet8"}},  # trains all 30 epochs (no dense start)
    "paper": {"model": PAPER_NET, "pretrain_epochs": 0, "gate_schedule": PAPER_RAMP},
    "early-ramp": {"model": PAPER_NET, "pretrain_epochs": 0, "gate_schedule": EARLY_RAMP},
    "mask": {"model": {"kwargs": {**PAPER_NET["kwargs"], "saliency": "mask"}},
             "pretrain_epochs": 0, "gate_schedule": EARLY_RAMP},
    "single-norm": {"model": {"kwargs": {**PAPER_NET["kwargs"], "double_norm": False}},
                    "pretrain_epochs": 0, "gate_schedule": EARLY_RAMP},
    "dense-shortcut": {"model": {"kwargs": {**PAPER_NET["kwargs"], "gate_shortcut": False}},
                       "pretrain_epochs": 0, "gate_schedule": EARLY_RAMP},
    "pretrain10": {"model": PAPER_NET, "pretrain_epochs": 10, "gate_schedule": EARLY_RAMP},
    "recipe": {},  # pretrain 10 + single norm + early ramp: experiments/digits_dgc_recipe.yaml
    "recipe-paper-ramp": {"gate_schedule": PAPER_RAMP},
}  # fmt: skip

# CIFAR-10, ResNet-20 family: the references and the paper's recipe spelled out in full (so
# they do not move with the recipe file), then the file's recipe ("recipe-*") and its static
# group conv by the same recipe ("gc-recipe-*").
PAPER_CIFAR = {"model": {"name": "dyresnet20", **PAPER_NET}, "pretrain_epochs": 0,
               "gate_schedule": PAPER_RAMP}  # fmt: skip
CIFAR10: dict[str, dict[str, Any]] = {
    "dense": {"model": {"name": "resnet20", "kwargs": {}}, "pretrain_epochs": 0},
    "gc-0.5": {"model": {"name": "gcresnet20", "gate_factor": 0.5, "kwargs": {}},
               "pretrain_epochs": 0},
    "gc-0.25": {"model": {"name": "gcresnet20", "gate_factor": 0.25, "kwargs": {}},
                "pretrain_epochs": 0},
    "paper-0.5": {**PAPER_CIFAR, "model": {**PAPER_CIFAR["model"], "gate_factor": 0.5}},
    "paper-0.25": {**PAPER_CIFAR, "model": {**PAPER_CIFAR["model"], "gate_factor": 0.25}},
    "recipe-0.5": {"model": {"gate_factor": 0.5}},
    "recipe-0.25": {"model": {"gate_factor": 0.25}},
    "gc-recipe-0.5": {"model": {"name": "gcresnet20", "gate_factor": 0.5, "kwargs": {}}},
    "gc-recipe-0.25": {"model": {"name": "gcresnet20", "gate_factor": 0.25, "kwargs": {}}},
}  # fmt: skip

RECIPES = {
    "digits": (ROOT / "experiments" / "digits_dgc_recipe.yaml", DIGITS),
    "cifar10": (ROOT / "experiments" / "cifar10_dgc_recipe.yaml", CIFAR10),
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and v else v
    return out


def run(recipe: str, variant: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """One training run of ``variant`` (in a worker process, one thread)."""
    from search.overrides import apply_overrides
    from search.train_cmd import trial_config_from_file
    from trainables.config import TrialConfig
    from trainables.loop import NonFiniteLossError
    from trainables.runner import run_trial

    torch.set_num_threads(1)
    path, variants = RECIPES[recipe]
    base = trial_config_from_file(str(path), []).model_dump(mode="json")
    cfg = merge(merge(base, variants[variant]), {"seed": seed, "threads": 1})
    cfg = apply_overrides(cfg, overrides, "--set")

    class Keep:
        def __init__(self) -> None:
            self.curve: list[float] = []
            self.seconds = 0.0

        def report(self, metrics: dict, state: dict | None) -> None:
            self.curve.append(round(metrics["val_accuracy"], 4))
            self.seconds += metrics["epoch_time_s"]

    keep = Keep()
    row: dict[str, Any] = {"variant": variant, "seed": seed}
    try:
        final = run_trial(TrialConfig.model_validate(cfg), keep)
    except NonFiniteLossError as err:  # a diverged run is a result, not a crash
        print(f"{variant} seed {seed}: {err}", flush=True)
        return {**row, "error": str(err)}
    print(f"{variant} seed {seed}: val {final['val_accuracy']:.4f}", flush=True)
    return {**row, "val": final["val_accuracy"], "test": final["test_accuracy"],
            "macs": final["macs"], "params": final["params"], "train_s": round(keep.seconds, 1),
            "curve": keep.curve, "config": cfg}  # fmt: skip


def table(rows: list[dict], variants: list[str]) -> dict[str, dict]:
    """Mean and spread per variant, printed; diverged runs counted apart."""
    out = {}
    for v in variants:
        mine = [r for r in rows if r["variant"] == v and "error" not in r]
        if not mine:
            continue
        val, test = [r["val"] for r in mine], [r["test"] for r in mine]
        t = out[v] = {
            "val_mean": statistics.mean(val), "val_min": min(val), "val_max": max(val),
            "test_mean": statistics.mean(test), "macs": mine[0]["macs"], "seeds": len(mine),
            "train_s": statistics.mean(r.get("train_s", 0.0) for r in mine),
            "diverged": sum(r["variant"] == v and "error" in r for r in rows),
        }  # fmt: skip
        print(f"{v:20s} val {100 * t['val_mean']:.2f}% ({100 * t['val_min']:.2f}-"
              f"{100 * t['val_max']:.2f})  test {100 * t['test_mean']:.2f}%  "
              f"{t['macs'] / 1e6:.3f} M MACs  {t['train_s']:.0f} s  seeds {t['seeds']}",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", help="default: all of the recipe's")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a trial-config override for every run")  # fmt: skip
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, help="default: bench/out/<recipe>_recipe.jsonl")
    ap.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = ap.parse_args()
    variants = args.variants or list(RECIPES[args.recipe][1])
    unknown = sorted(set(variants) - set(RECIPES[args.recipe][1]))
    if unknown:
        ap.error(f"unknown variants {unknown}; the {args.recipe} recipe has "
                 f"{sorted(RECIPES[args.recipe][1])}")  # fmt: skip
    out = args.out or ROOT / "bench" / "out" / f"{args.recipe}_recipe.jsonl"
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table:
        seen = {(r["variant"], r["seed"]) for r in done}
        jobs = [(v, s) for s in args.seeds for v in variants if (v, s) not in seen]
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                "torch": torch.__version__}  # fmt: skip
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(run, args.recipe, v, s, args.overrides) for v, s in jobs]
            for future in as_completed(futures):  # each written as soon as it is in
                row = {**future.result(), **meta}
                done.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    table(done, variants)


if __name__ == "__main__":
    main()
