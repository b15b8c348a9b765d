"""Which ingredients make DGC train well in a short budget: DGC against the static group conv of
equal gate factor, several seeds, on digits (or any dataset a trial config can read).

    python bench/dgc_recipe.py [--seeds 0 1 2] [--variants paper early-ramp ...] [--workers 2]

Every variant is a set of trial-config overrides on experiments/digits_dgc_recipe.yaml's
``trial:`` (dyresnet8, gate 0.5, digits, 30 epochs in all, pretraining included). Runs go to
``--workers`` processes of one torch thread each, interleaved by seed so variants see the same
machine load. Prints and writes (JSON) the mean and spread of the validation and test accuracy
per variant; a run whose loss diverged is counted as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "digits_dgc_recipe.yaml"

# The recipe file's trial is the shipped recipe; every variant overrides it. "paper" is the
# authors' recipe (their network and schedule, no pretraining); the others add one ingredient
# to it at a time, then combine.
PAPER_NET = {"kwargs": {"double_norm": True, "gate_shortcut": True, "saliency": "scale"}}
PAPER_RAMP = {"warmup_end": 1 / 12, "ramp_end": 0.75, "unit": "fraction"}
EARLY_RAMP = {"warmup_end": 1, "ramp_end": 10, "unit": "epochs"}
VARIANTS: dict[str, dict[str, Any]] = {
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


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run(variant: str, seed: int) -> dict[str, Any]:
    """One training run of ``variant`` (in a worker process, one thread)."""
    from search.train_cmd import trial_config_from_file
    from trainables.config import TrialConfig
    from trainables.loop import NonFiniteLossError
    from trainables.runner import run_trial

    torch.set_num_threads(1)
    base = trial_config_from_file(str(RECIPE), []).model_dump(mode="json")
    cfg = merge(merge(base, VARIANTS[variant]), {"seed": seed, "threads": 1})

    class Keep:
        def report(self, metrics: dict, state: dict | None) -> None:
            pass

    try:
        final = run_trial(TrialConfig.model_validate(cfg), Keep())
    except NonFiniteLossError as err:  # a diverged run is a result, not a crash
        print(f"{variant} seed {seed}: {err}", flush=True)
        return {"variant": variant, "seed": seed, "error": str(err)}
    print(f"{variant} seed {seed}: val {final['val_accuracy']:.4f}", flush=True)
    return {"variant": variant, "seed": seed, "val": final["val_accuracy"],
            "test": final["test_accuracy"], "macs": final["macs"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "dgc_recipe.json")
    args = ap.parse_args()
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run, *zip(*jobs)))
    table = {}
    for v in args.variants:
        mine = [r for r in rows if r["variant"] == v and "error" not in r]
        if not mine:
            print(f"{v:24s} every run diverged")
            continue
        val, test = [r["val"] for r in mine], [r["test"] for r in mine]
        table[v] = {
            "val_mean": statistics.mean(val),
            "val_min": min(val),
            "val_max": max(val),
            "test_mean": statistics.mean(test),
            "macs": mine[0]["macs"],
            "seeds": len(mine),
            "diverged": sum(r["variant"] == v and "error" in r for r in rows),
        }
        t = table[v]
        print(f"{v:24s} val {100 * t['val_mean']:.2f}% ({100 * t['val_min']:.2f}-"
              f"{100 * t['val_max']:.2f})  test {100 * t['test_mean']:.2f}%  "
              f"{t['macs'] / 1e6:.3f} M MACs", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
            "torch": torch.__version__, "seeds": args.seeds}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
