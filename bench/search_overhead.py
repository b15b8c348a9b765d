"""Framework overhead of a search: the same trials inside Ray Tune + Optuna + MLflow, and bare.

    python bench/search_overhead.py [--trials 4] [--epochs 20]

Runs experiments/smoke.yaml with ``--trials`` sequential trials (concurrency 1, 1 CPU and one
torch thread each) of ``--epochs`` epochs, then trains the very same trial configs (read back
from MLflow) with ``trainables.runner.run_trial`` in this process, one thread, no Ray, no
Optuna, no MLflow. Reports per-trial wall time in the search (MLflow child run start to end),
bare time, and the fixed costs of a search (Ray start, preflight + finalisation).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import ray
import torch

from search.cluster import connect_ray
from search.config import load_experiment
from search.launch import launch
from trainables.config import TrialConfig
from trainables.runner import run_trial

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "smoke.yaml"


class _Quiet:
    def report(self, metrics, state) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exp = load_experiment(
        SMOKE,
        [
            f"storage_dir={tmp}",
            f"mlflow.tracking_uri={uri}",
            f"num_trials={a.trials}",
            "concurrency=1",
            "trial.threads=1",
            f"trial.epochs={a.epochs}",
            "trial.checkpoint_every=1",
            "trial.data.train_subset=null",  # every training image, as measured
        ],
    )
    t0 = time.perf_counter()
    connect_ray(exp, None)
    t_ray = time.perf_counter() - t0
    t1 = time.perf_counter()
    assert launch(exp, str(SMOKE)) == 0
    t_launch = time.perf_counter() - t1
    ray.shutdown()
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("smoke").experiment_id
    parent = client.search_runs([experiment_id], "tags.`dgc_search.kind` = 'search'")[0]
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    in_search, bare = [], []
    for run in runs:
        in_search.append((run.info.end_time - run.info.start_time) / 1000)
        cfg = TrialConfig.model_validate(
            json.loads(
                Path(client.download_artifacts(run.info.run_id, "trial_config.json")).read_text()
            )
        )
        t = time.perf_counter()
        run_trial(cfg, _Quiet(), threads=1)
        bare.append(time.perf_counter() - t)
    per_trial = statistics.mean(in_search) - statistics.mean(bare)
    fixed = t_launch - sum(in_search)
    print(
        f"# {datetime.date.today()} torch {torch.__version__} ray {ray.__version__} "
        f"{platform.machine()} {a.trials} trials x {a.epochs} epochs, concurrency 1, 1 thread"
    )
    print("| quantity | seconds |\n|---|---:|")
    for name, v in [
        ("Ray local cluster start", t_ray),
        ("launch() wall (preflight, fit, finalise)", t_launch),
        ("mean trial wall inside the search", statistics.mean(in_search)),
        ("mean bare trial (run_trial, no Ray/Optuna/MLflow)", statistics.mean(bare)),
        ("overhead per trial", per_trial),
        (
            "per-search fixed cost outside trials (preflight, scheduling, Pareto, "
            "model logging/registration)",
            fixed,
        ),
    ]:
        print(f"| {name} | {v:.2f} |")
    print(
        f"\noverhead per trial = {per_trial:.2f} s = {100 * per_trial / 60:.1f}% of a 60-second "
        f"trial ({100 * per_trial / statistics.mean(bare):.1f}% of these "
        f"{statistics.mean(bare):.0f}-second trials)"
    )


if __name__ == "__main__":
    main()
