"""MO-ASHA against full training at the same compute: the front's hypervolume against epochs.

    python bench/mo_asha.py [--setups digits operators] [--seeds 0 1 2 3 4]
                            [--out bench/out/mo_asha]

For each setup and seed, round-robin in one process on one local Ray cluster:

- **full**: the setup's ``--trials`` trials trained to their last epoch, no scheduler;
- **MO-ASHA**: the setup's MO-ASHA scheduler with the budget full training spent
  (``stop.epochs`` = trials x epochs), and as many trials as that budget allows
  (``num_trials`` = the budget: never the limit).

Same sampler and seed, no reference trials, one fixed hypervolume reference point per setup.
The curve is the search's own: the parent MLflow run's ``hypervolume_by_epochs`` (the front's
hypervolume, validation accuracy against MACs, after every trial that ends, at step = epochs
spent by all trials; ``search/watch.py``). Setups: ``digits`` is
experiments/digits_mo_asha.yaml (the quickstart space over DyResNet-8, 16 trials of 12 epochs,
rungs at epochs 2 and 6); ``operators`` is experiments/digits_operators.yaml (DGC, SG-CNN and
DyNet ResNet-8s, 12 trials of 6 epochs) with MO-ASHA at epoch 2, reduction factor 3. Writes a
JSON of the curves and docs/img/mo_asha_hypervolume.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import optuna
import ray
import torch

from search import names as N
from search.__main__ import QUIET_ENV
from search.config import load_experiment
from search.hypervolume import HYPERVOLUME_BY_EPOCHS
from search.launch import launch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
#: setup: (experiment file, trials of full training, overrides of both modes, MO-ASHA's)
SETUPS: dict[str, tuple[Path, int, list[str], list[str]]] = {
    "digits": (
        EXPERIMENTS / "digits_mo_asha.yaml",
        16,
        ["hypervolume.reference={macs: 800000}"],  # above every point (dense is 0.79 M)
        [],  # the file's: grace period 2, reduction factor 3
    ),
    "operators": (
        EXPERIMENTS / "digits_operators.yaml",
        12,
        ["references=null", "hypervolume.reference={macs: 800000}"],
        ["scheduler={name: mo-asha, grace_period: 2, reduction_factor: 3}"],
    ),
}


def run_search(setup: str, seed: int, mode: str, out: Path, extra: list[str]) -> str:
    """One search of ``setup`` (``mode`` full or mo-asha, ``extra`` overrides of MO-ASHA's);
    returns its name."""
    path, trials, both, asha = SETUPS[setup]
    sets = list(both)
    if mode == "full":
        sets += [f"num_trials={trials}", "scheduler=null"]
    else:
        budget = trials * load_experiment(path).trial.epochs
        sets += [f"num_trials={budget}", f"stop={{epochs: {budget}}}", *asha, *extra]
    return launch_search(path, f"{setup}-{mode}", seed, out, sets)


def launch_search(path: Path, label: str, seed: int, out: Path, sets: list[str]) -> str:
    """Launch the experiment file ``path`` with ``sets`` as a new search named after
    ``label``, ``seed`` and the time, its folder and MLflow store under ``out``, no model
    registered; returns its name (a failed search ends the bench)."""
    name = f"{label}-s{seed}-{datetime.datetime.now():%H%M%S}"  # a rerun: a new search
    sets = [
        f"name={name}",
        f"storage_dir={out / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "mlflow.register_models=false",
        f"sampler.seed={seed}",
        f"trial.seed={seed}",
        *sets,
    ]
    for key, value in QUIET_ENV.items():  # the console of `python -m search launch`
        os.environ.setdefault(key, value)
    if launch(load_experiment(path, sets), str(path)) != 0:
        raise SystemExit(f"{name} failed")
    return name


def curve(uri: str, name: str) -> dict[str, Any]:
    """The search's hypervolume after every trial that ended, against the epochs spent, and
    how many trials it started and its scheduler stopped."""
    client = mlflow.MlflowClient(uri)
    parent = parent_run(client, name)
    runs = client.search_runs([parent.info.experiment_id])
    history = client.get_metric_history(parent.info.run_id, HYPERVOLUME_BY_EPOCHS)
    points = sorted((m.step, m.value) for m in history)
    kids = [r for r in runs if r.info.run_id != parent.info.run_id]
    return {
        "epochs": [s for s, _ in points],
        "hypervolume": [v for _, v in points],
        "trials": len(kids),
        "stopped": sum(N.STOPPED_TAG in r.data.tags for r in kids),
    }


def run_meta(command: str) -> dict[str, Any]:
    """Where and how a bench of searches ran: date, machine, versions, command, commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "command": command,
        "commit": commit,
    }


def parent_run(client: mlflow.MlflowClient, name: str) -> Any:
    """The parent MLflow run of the search ``name`` (its experiment's "search" run)."""
    experiment = client.get_experiment_by_name(name)
    where = f"tags.`{N.KIND_TAG}` = 'search'"
    return client.search_runs([experiment.experiment_id], where)[0]


def summary(full: dict[str, Any], asha: dict[str, Any]) -> dict[str, Any]:
    """Both searches' epochs and final hypervolume, and the epochs MO-ASHA took to reach full
    training's final hypervolume (None: never)."""
    target = full["hypervolume"][-1]
    reach = next((x for x, h in zip(asha["epochs"], asha["hypervolume"]) if h >= target), None)
    return {
        "full_epochs": full["epochs"][-1],
        "full_hv": target,
        "asha_epochs": asha["epochs"][-1],
        "asha_hv": asha["hypervolume"][-1],
        "asha_trials": asha["trials"],
        "asha_stopped": asha["stopped"],
        "epochs_to_full_hv": reach,
        "share_of_full_epochs": None if reach is None else reach / full["epochs"][-1],
    }


def _at(c: dict[str, Any], epochs: float) -> float:
    """A curve's hypervolume once ``epochs`` were spent (0 before its first point)."""
    return max((h for x, h in zip(c["epochs"], c["hypervolume"]) if x <= epochs), default=0.0)


MODES = (("full", "C0", "full training"), ("mo-asha", "C3", "MO-ASHA"))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(results)
    fig, axes = plt.subplots(1, len(setups), figsize=(6.5 * len(setups), 4.2), squeeze=False)
    for ax, setup in zip(axes[0], setups):
        for i, seed in enumerate(results[setup]):
            for mode, color, label in MODES:
                c = results[setup][seed].get(mode)
                if c:
                    ax.step(c["epochs"], c["hypervolume"], where="post", c=color, alpha=0.75,
                            lw=1.2, label=None if i else label)  # fmt: skip
        curves = [r[m] for r in results[setup].values() for m in ("full", "mo-asha") if m in r]
        half = max(c["epochs"][-1] for c in curves) / 2  # the first points jump from 0: the
        mid = [_at(c, half) for c in curves]  # y axis starts at the curves' halfway values
        top = max(c["hypervolume"][-1] for c in curves)
        ax.set_ylim(min(mid) - 0.01 * top, 1.01 * top)
        ax.set(xlabel="epochs trained by all trials so far", ylabel="hypervolume of the front",
               title=f"{setup}: {len(results[setup])} seeds, same epoch budget")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mo_asha")
    ap.add_argument(
        "--asha-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the MO-ASHA searches (a variant of the scheduler)",
    )
    ap.add_argument(
        "--full-from",
        type=Path,
        metavar="JSON",
        help="reuse the full-training curves of an earlier mo_asha.json (no scheduler is "
        "involved in them) instead of running them again",
    )
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "mo_asha_hypervolume.png")
    args = ap.parse_args()
    kept = json.loads(args.full_from.read_text())["results"] if args.full_from else {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    results: dict[str, Any] = {}
    for setup in args.setups:
        results[setup] = {}
        for seed in args.seeds:  # round-robin: full training and MO-ASHA alternate
            r = {"full": kept[setup][str(seed)]["full"]} if kept else {}
            for m in ("mo-asha",) if kept else ("full", "mo-asha"):
                r[m] = curve(uri, run_search(setup, seed, m, args.out, args.asha_set))
            r["summary"] = summary(r["full"], r["mo-asha"])
            results[setup][seed] = r
            print(setup, seed, json.dumps(r["summary"]), flush=True)
    meta = run_meta(" ".join(["python bench/mo_asha.py", *sys.argv[1:]]))
    for setup, by_seed in results.items():
        shares = [s["summary"]["share_of_full_epochs"] for s in by_seed.values()]
        meta[f"{setup} mean share (never reached counts as 1)"] = statistics.mean(
            1.0 if x is None else x for x in shares
        )
    (args.out / "mo_asha.json").write_text(json.dumps({"meta": meta, "results": results}))
    plot(results, args.plot)


if __name__ == "__main__":
    main()
