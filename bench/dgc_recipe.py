"""Which ingredients make DGC train well in a search trial's budget: DGC against the static group
conv of equal gate factor (and the dense network), several seeds, by one recipe at a time.

    python bench/dgc_recipe.py --recipe digits [--seeds 0 1 2] [--variants paper recipe ...]
    python bench/dgc_recipe.py --recipe cifar10 --set data.datadir=/tmp/cifar/cifar10-images \\
        --set data.dataset=imagefolder [--variants dense gc-0.5 paper-0.5 ...] [--workers 2]
    python bench/dgc_recipe.py --recipe cifar10 --table      # the table of what has finished
    python bench/dgc_recipe.py --recipe cifar10 ... --jobs distilled-0.5:0 recipe-0.5:0

CIFAR-10's ``recipe-0.5-X`` is the shipped recipe at gate 0.5 with ingredient X taken away,
``recipe-0.5+X`` with X added (ABLATIONS); ``--jobs VARIANT:SEED`` runs those in that order.

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
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import wait
from pathlib import Path
from typing import Any
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and v else v
    return out


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
TEACHER, START, TAUGHT = "_teacher", "_start", "_taught"  # the shared pretraining's roles
NO_DISTILL = {"weight": 0.0}
PAPER_KWARGS = {**PAPER_NET["kwargs"], "gate_init": 1.0}
PAPER_CIFAR = {"model": {"name": "dyresnet20", "kwargs": PAPER_KWARGS}, "pretrain_epochs": 0,
               "gate_schedule": PAPER_RAMP, "distill": NO_DISTILL}  # fmt: skip
CIFAR10: dict[str, dict[str, Any]] = {
    "dense": {"model": {"name": "resnet20", "kwargs": {}}, "pretrain_epochs": 0,
              "distill": NO_DISTILL},
    "gc-0.5": {"model": {"name": "gcresnet20", "gate_factor": 0.5, "kwargs": {}},
               "pretrain_epochs": 0, "distill": NO_DISTILL},
    "gc-0.25": {"model": {"name": "gcresnet20", "gate_factor": 0.25, "kwargs": {}},
                "pretrain_epochs": 0, "distill": NO_DISTILL},
    "paper-0.5": {**PAPER_CIFAR, "model": {**PAPER_CIFAR["model"], "gate_factor": 0.5}},
    "paper-0.25": {**PAPER_CIFAR, "model": {**PAPER_CIFAR["model"], "gate_factor": 0.25}},
    # The recipe as a search with ``pretrain:`` runs it: the dense network of the recipe's
    # pretrain_epochs trained once per seed ("dense-pretrain"), then the start of each DGC run
    # (its remaining epochs); the static group conv trains all the epochs from scratch (it
    # cannot start from the dense network), with the same teacher where the recipe distils.
    "dense-pretrain": {TEACHER: True},
    "recipe-0.5": {"model": {"gate_factor": 0.5}, START: True},
    "recipe-0.25": {"model": {"gate_factor": 0.25}, START: True},
    "gc-recipe-0.5": {"model": {"name": "gcresnet20", "gate_factor": 0.5}, TAUGHT: True},
    "gc-recipe-0.25": {"model": {"name": "gcresnet20", "gate_factor": 0.25}, TAUGHT: True},
}  # fmt: skip
# The recipe plus distillation from its dense start (weight 0.5, temperature 4), both networks
DISTILL = {"distill": {"weight": 0.5, "temperature": 4.0}}
for g in ("0.5", "0.25"):
    CIFAR10[f"distilled-{g}"] = merge(CIFAR10[f"recipe-{g}"], DISTILL)
    CIFAR10[f"gc-distilled-{g}"] = merge(CIFAR10[f"gc-recipe-{g}"], DISTILL)
# The recipe at gate 0.5 with one of its ingredients removed ("-") or one more added ("+");
# with distillation added it is distilled-0.5.
ABLATIONS: dict[str, dict[str, Any]] = {
    "-gate-init": {"model": {"kwargs": {"gate_init": 1.0}}},  # the paper's initialisation
    "-single-norm": {"model": {"kwargs": {"double_norm": True}}},
    "-early-ramp": {"gate_schedule": PAPER_RAMP},
    "-lasso": {"optim": {"lasso": 0.0}},
    "+label-smoothing": {"optim": {"label_smoothing": 0.1}},
    "+finetune": {"optim": {"finetune_lr": 0.1}},  # lr 0.01 after the ramp, cosine to 0
    "+recalibrate-bn": {"recalibrate_bn": 100},
}
CIFAR10 |= {f"recipe-0.5{k}": merge(CIFAR10["recipe-0.5"], v) for k, v in ABLATIONS.items()}
# no dense start: DyResNet-20 trains all 30 epochs from scratch
CIFAR10["recipe-0.5-dense-start"] = {"model": {"gate_factor": 0.5}, TAUGHT: True}

RECIPES = {
    "digits": (ROOT / "experiments" / "digits_dgc_recipe.yaml", DIGITS),
    "cifar10": (ROOT / "experiments" / "cifar10_dgc_recipe.yaml", CIFAR10),
}


def run(recipe: str, variant: str, seed: int, overrides: list[str], out: Path) -> dict[str, Any]:
    """One training run of ``variant`` (in a worker process, one thread)."""
    from trainables.config import TrialConfig
    from trainables.loop import NonFiniteLossError
    from trainables.runner import run_trial

    torch.set_num_threads(1)
    cfg = TrialConfig.model_validate(config(recipe, variant, seed, overrides, out))
    keep = Keep(pretrain_folder(out, seed) if RECIPES[recipe][1][variant].get(TEACHER) else None)
    row: dict[str, Any] = {"variant": variant, "seed": seed}
    try:
        final = run_trial(cfg, keep)
    except NonFiniteLossError as err:  # a diverged run is a result, not a crash
        print(f"{variant} seed {seed}: {err}", flush=True)
        return {**row, "error": str(err)}
    print(f"{variant} seed {seed}: val {final['val_accuracy']:.4f}", flush=True)
    return {**row, "val": final["val_accuracy"], "test": final["test_accuracy"],
            "macs": final["macs"], "params": final["params"], "train_s": round(keep.seconds, 1),
            "curve": keep.curve, "config": cfg.model_dump(mode="json")}  # fmt: skip


def config(recipe: str, variant: str, seed: int, overrides: list[str], out: Path) -> dict:
    """The trial config of ``variant``: the recipe file's trial, the variant's overrides, the
    seed and ``--set``; for the roles of the shared pretraining, its start or teacher."""
    from search.overrides import apply_overrides
    from search.train_cmd import trial_config_from_file
    from trainables.runner import dense_start_config

    path, variants = RECIPES[recipe]
    base = trial_config_from_file(str(path), []).model_dump(mode="json")
    over = {k: v for k, v in variants[variant].items() if not k.startswith("_")}
    cfg = merge(merge(base, over), {"seed": seed, "threads": 1})
    cfg = apply_overrides(cfg, overrides, "--set")
    pre, state = cfg["pretrain_epochs"], str(pretrain_folder(out, seed) / "state.pt")
    role = next((k for k in (TEACHER, START, TAUGHT) if variants[variant].get(k)), None)
    if role == TEACHER:  # the dense network of the first pre epochs, as pretrain_dense trains it
        from trainables.config import TrialConfig

        return dense_start_config(TrialConfig.model_validate(cfg), pre).model_dump(mode="json")
    if role == START:  # the search's form: start from it (its teacher where it distils)
        return {**cfg, "epochs": cfg["epochs"] - pre, "pretrain_epochs": 0, "init_from": state}
    if role == TAUGHT and cfg["distill"]["weight"] > 0:  # every epoch, the same teacher
        return {**cfg, "pretrain_epochs": 0, "distill": {**cfg["distill"], "teacher": state}}
    if role == TAUGHT:  # from scratch for every epoch
        return {**cfg, "pretrain_epochs": 0}
    return cfg


class Keep:
    """The run's validation curve and training time; for the shared pretraining, its
    checkpoint and metrics in ``folder`` (as ``search train --out`` writes them)."""

    def __init__(self, folder: Path | None) -> None:
        self.curve: list[float] = []
        self.seconds = 0.0
        self.folder = folder
        if folder is not None:  # what a pretraining cut short left: started again
            for name in ("metrics.jsonl", "state.pt"):
                (folder / name).unlink(missing_ok=True)

    def report(self, metrics: dict, state: dict | None) -> None:
        from trainables.runner import record_epoch

        self.curve.append(round(metrics["val_accuracy"], 4))
        self.seconds += metrics["epoch_time_s"]
        if self.folder is not None:
            record_epoch(self.folder, metrics, state)


def pretrain_folder(out: Path, seed: int) -> Path:
    """Where the shared pretraining of ``seed`` keeps its checkpoint (beside ``--out``)."""
    return out.parent / f"{out.stem}_pretrain" / f"seed{seed}"


def pretrained(out: Path, seed: int) -> bool:
    """Whether the shared pretraining of ``seed`` has finished (its test accuracy is in)."""
    metrics = pretrain_folder(out, seed) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return bool(lines) and "test_accuracy" in json.loads(lines[-1])


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


def campaign(args: argparse.Namespace, jobs: list[tuple[str, int]], out: Path) -> Iterator[dict]:
    """Run ``jobs`` in order on ``--workers`` processes, each job that needs its seed's shared
    pretraining once that has finished; yields each run's row as it comes in."""
    variants = RECIPES[args.recipe][1]

    def ready(job: tuple[str, int]) -> bool:  # its start or teacher trained, where it has one
        cfg = config(args.recipe, *job, args.overrides, out)
        needs = variants[job[0]].get(START) or cfg["distill"].get("teacher") is not None
        return not needs or pretrained(out, job[1])

    pending, running = list(jobs), set()
    for job in [j for j in pending if variants[j[0]].get(TEACHER) and pretrained(out, j[1])]:
        pending.remove(job)  # trained already (an interrupted campaign, or by hand)
        yield pretrain_row(*job, out)
    with ProcessPoolExecutor(args.workers) as pool:
        while pending or running:
            for job in [j for j in pending if ready(j)][: args.workers - len(running)]:
                pending.remove(job)
                running.add(pool.submit(run, args.recipe, *job, args.overrides, out))
            if not running:
                raise SystemExit(f"{pending} wait for a pretraining that is not among the jobs: "
                                 "add the variant dense-pretrain")  # fmt: skip
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in finished)


def pretrain_row(variant: str, seed: int, out: Path) -> dict[str, Any]:
    """The row of a shared pretraining that finished outside this campaign, from its metrics."""
    lines = (pretrain_folder(out, seed) / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    final = epochs[-1]
    return {"variant": variant, "seed": seed, "val": final["val_accuracy"],
            "test": final["test_accuracy"], "macs": final["macs"], "params": final["params"],
            "train_s": round(sum(e["epoch_time_s"] for e in epochs), 1),
            "curve": [round(e["val_accuracy"], 4) for e in epochs]}  # fmt: skip


def job_arg(text: str) -> tuple[str, int]:
    variant, _, seed = text.rpartition(":")
    if not variant or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give VARIANT:SEED, e.g. recipe-0.5:1")
    return variant, int(seed)


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
    ap.add_argument("--jobs", nargs="+", type=job_arg, metavar="VARIANT:SEED",
                    help="run these, in this order (default: each seed's variants)")  # fmt: skip
    args = ap.parse_args()
    variants = (
        args.variants
        or list(dict.fromkeys(v for v, _ in args.jobs or []))
        or list(RECIPES[args.recipe][1])
    )
    unknown = sorted(set(variants) - set(RECIPES[args.recipe][1]))
    if unknown:
        ap.error(f"unknown variants {unknown}; the {args.recipe} recipe has "
                 f"{sorted(RECIPES[args.recipe][1])}")  # fmt: skip
    out = args.out or ROOT / "bench" / "out" / f"{args.recipe}_recipe.jsonl"
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if not args.table:
        seen = {(r["variant"], r["seed"]) for r in done}
        jobs = args.jobs or [(v, s) for s in args.seeds for v in variants]
        jobs = [job for job in jobs if job not in seen]
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                "torch": torch.__version__}  # fmt: skip
        for row in campaign(args, jobs, out):
            row = {**row, **meta}
            done.append(row)
            with out.open("a") as f:  # each written as soon as it is in
                f.write(json.dumps(row) + "\n")
    table(done, variants)


if __name__ == "__main__":
    main()
