"""Hypervolume of the found front against epochs trained: full training vs MO-ASHA.

    python bench/mo_asha.py [--seeds 0 1 2] [--trials 16] [--out bench/out/mo_asha]

Runs experiments/digits_mo_asha.yaml (dyresnet8 on digits, the quickstart space, 12 epochs,
rungs at epochs 2 and 6) once per seed with the scheduler and once without it (``scheduler:
null``), round-robin in one process on one local Ray cluster, same sampler, seed and trial count.
Every epoch a trial finishes is an event (its MLflow ``epoch`` metric timestamp); after each
event, the hypervolume of the front of the trials that have run to their last epoch so far
(validation accuracy vs MACs, reference point 0 % accuracy and REF_MACS) is computed with
Optuna's hypervolume (the one behind ``optuna.visualization.plot_hypervolume_history``).
Writes a JSON of the curves and docs/img/mo_asha_hypervolume.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import optuna
import ray
import torch
from optuna._hypervolume import compute_hypervolume

from search.config import load_experiment
from search.launch import launch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "digits_mo_asha.yaml"
REF_MACS = 0.8e6  # above every point of the space (dense dyresnet8 is 0.79 M)


def run_search(seed: int, mode: str, trials: int, out: Path) -> str:
    name = f"hv-{mode}-s{seed}-{datetime.datetime.now():%H%M%S}"  # a rerun is a new search
    sets = [
        f"name={name}",
        f"storage_dir={out / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        "mlflow.register_models=false",
        f"num_trials={trials}",
        f"sampler.seed={seed}",
        f"trial.seed={seed}",
    ]
    if mode == "full":
        sets.append("scheduler=null")
    elif mode != "mo-asha":  # mo-asha-rf<N>
        sets.append(f"scheduler.reduction_factor={mode.removeprefix('mo-asha-rf')}")
    exp = load_experiment(EXPERIMENT, sets)
    if launch(exp, str(EXPERIMENT)) != 0:
        raise SystemExit(f"{name} failed")
    return name


def curve(uri: str, name: str, epochs: int) -> dict:
    """(epochs trained so far, hypervolume) after every epoch event of the search."""
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = [
        r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    ]
    events = []  # (time, run id, epoch)
    finals = {}
    for r in runs:
        for m in client.get_metric_history(r.info.run_id, "epoch"):
            events.append((m.timestamp, r.info.run_id, int(m.value)))
        if r.data.metrics.get("epoch") == epochs and "stopped_at_epoch" not in r.data.tags:
            finals[r.info.run_id] = (-r.data.metrics["val_accuracy"], r.data.metrics["macs"])
    events.sort()
    xs, hvs, done = [], [], []
    for i, (_, run_id, epoch) in enumerate(events, start=1):
        if epoch == epochs and run_id in finals:
            done.append(finals[run_id])
        xs.append(i)
        hvs.append(hypervolume(done))
    stopped = sum("stopped_at_epoch" in r.data.tags for r in runs)
    return {"epochs": xs, "hypervolume": hvs, "trials": len(runs), "stopped": stopped}


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Of (-accuracy, MACs) points, both minimised, against (0, REF_MACS); in accuracy x M MACs."""
    if not points:
        return 0.0
    loss = np.array([(a, m / 1e6) for a, m in points])
    return float(compute_hypervolume(loss, np.array([0.0, REF_MACS / 1e6])))


def summary(full: dict, asha: dict) -> dict:
    """Epochs and hypervolume of both, and where MO-ASHA reached full training's final one."""
    target = full["hypervolume"][-1]
    reach = next((x for x, h in zip(asha["epochs"], asha["hypervolume"]) if h >= target), None)
    return {
        "full_epochs": full["epochs"][-1],
        "full_hv": target,
        "asha_epochs": asha["epochs"][-1],
        "asha_hv": asha["hypervolume"][-1],
        "asha_stopped": asha["stopped"],
        "epochs_to_full_hv": reach,
        "share_of_full_epochs": None if reach is None else reach / full["epochs"][-1],
        "asha_final_hv_share": asha["hypervolume"][-1] / target,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"full": "C0", "mo-asha": "C3", "mo-asha-rf2": "C2", "mo-asha-rf4": "C1"}
    names = {"full": "full training", "mo-asha": "MO-ASHA (rf 3)"}
    for i, r in enumerate(results.values()):
        for mode in (m for m in r if not m.startswith("summary")):
            c = r[mode]
            ax.step(c["epochs"], c["hypervolume"], where="post", c=colors.get(mode, "C4"),
                    alpha=0.8, lw=1.2, label=None if i else names.get(
                        mode, mode.replace("mo-asha-rf", "MO-ASHA (rf ") + ")"))  # fmt: skip
    ax.set(xlabel="epochs trained by all trials so far", ylabel="hypervolume (accuracy x M MACs)",
           title="digits, dyresnet8, 16 trials: front hypervolume vs compute")  # fmt: skip
    tops = [h for r in results.values() for m, c in r.items() if not m.startswith("summary")
            for h in c["hypervolume"] if h > 0]  # fmt: skip
    ax.set_ylim(0.95 * min(tops), 1.01 * max(tops))  # the first front point jumps from 0
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "mo_asha")
    ap.add_argument(
        "--extra-rf",
        type=int,
        nargs="*",
        default=[],
        help="also run MO-ASHA with these reduction factors (the recipe's is 3)",
    )
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["full", "mo-asha"],
        help="searches to run again; the other curves are kept from --out's mo_asha.json",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    epochs = load_experiment(EXPERIMENT).trial.epochs
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    saved = args.out / "mo_asha.json"
    kept = json.loads(saved.read_text())["results"] if saved.is_file() else {}
    results: dict = {}
    for seed in args.seeds:  # round-robin: full and MO-ASHA alternate
        results[seed] = {k: v for k, v in kept.get(str(seed), {}).items() if "summary" not in k}
        modes = ["full", "mo-asha", *(f"mo-asha-rf{rf}" for rf in args.extra_rf)]
        for mode in modes:
            if mode in args.modes or mode not in results[seed]:
                name = run_search(seed, mode, args.trials, args.out)
                results[seed][mode] = curve(uri, name, epochs)
        for mode in modes[1:]:
            results[seed][f"summary {mode}"] = summary(results[seed]["full"], results[seed][mode])
            print(seed, mode, json.dumps(results[seed][f"summary {mode}"]), flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "command": "python bench/mo_asha.py " + " ".join(
            f"--seeds {' '.join(map(str, args.seeds))} --trials {args.trials}".split()),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
    (args.out / "mo_asha.json").write_text(json.dumps({"meta": meta, "results": results}))
    plot(results, ROOT / "docs" / "img" / "mo_asha_hypervolume.png")


if __name__ == "__main__":
    main()
