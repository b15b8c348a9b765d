"""TPE's options on a conditional space with a MACs budget: the front's hypervolume after N
trials, and how many points the sampler proposed over the budget.

    python bench/sampler_choice.py [--seeds 0 1 2] [--out bench/out/sampler_choice]

experiments/digits_operators.yaml (DGC, SG-CNN and DyNet ResNet-8s on digits, a conditional
space: each operator's parameters exist only where ``model.name`` selects it; 12 trials of 6
epochs, no reference trials) with ``budget.macs`` 0.5 M (the space spans about 0.18-0.83 M),
round-robin per seed in one process on one local Ray cluster:

- **default**: Optuna 5's TPE as the search builds it (multivariate, constant liar, no
  groups); an over-budget point is PRUNED with its violation set by ``Trial.set_constraint``;
- **group**: ``sampler.group: true``, TPE modelling each group of parameters that appear
  together on its own;
- **no-constraint**: the default, but an over-budget point is PRUNED with its ``over_budget``
  user attribute only (``set_constraint`` switched off in this process): how TPE learned the
  budget before Optuna 5's constraints.

The hypervolume is the search's own (the parent MLflow run's ``hypervolume`` after every trial
that ends; reference point 0 % accuracy and the budget). Over-budget proposals are counted in
the Optuna study.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow
import optuna
import ray

from search import names as N
from search.hypervolume import HYPERVOLUME
from search.state import SearchState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mo_asha import launch_search
from mo_asha import parent_run
from mo_asha import run_meta

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "digits_operators.yaml"
BUDGET = 0.5e6
MODES = {"default": [], "group": ["sampler.group=true"], "no-constraint": []}


@contextmanager
def constraints(on: bool):
    """Optuna's ``Trial.set_constraint`` as it is, or a no-op (the searcher's only call)."""
    if on:
        yield
        return
    with mock.patch.object(optuna.Trial, "set_constraint", lambda self, key, value: None):
        yield


def run_search(seed: int, mode: str, out: Path) -> str:
    sets = ["references=null", f"budget={{macs: {BUDGET}}}", *MODES[mode]]
    with constraints(mode != "no-constraint"):
        return launch_search(EXPERIMENT, mode, seed, out, sets)


def outcome(uri: str, out: Path, name: str) -> dict[str, Any]:
    """Hypervolume after every trial that ended; the study's proposals over the budget."""
    client = mlflow.MlflowClient(uri)
    parent = parent_run(client, name)
    history = sorted((m.step, m.value) for m in
                     client.get_metric_history(parent.info.run_id, HYPERVOLUME))  # fmt: skip
    state = SearchState.load(out / "runs" / name)
    study = optuna.load_study(study_name=state.study_name, storage=state.optuna_storage)
    over = [t for t in study.trials if t.user_attrs.get(N.OVER_BUDGET_ATTR)]
    return {
        "trials": [s for s, _ in history],
        "hypervolume": [v for _, v in history],
        "over_budget_proposals": len(over),
        "proposals": len(study.trials),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sampler_choice")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{args.out / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    results: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:  # round-robin: the modes alternate within a seed
        results[seed] = {}
        for mode in args.modes:
            results[seed][mode] = outcome(uri, args.out, run_search(seed, mode, args.out))
            r = results[seed][mode]
            over = f"over budget {r['over_budget_proposals']} of {r['proposals']}"
            print(seed, mode, f"hv {r['hypervolume'][-1]:.4f}", over, flush=True)
    meta = run_meta(
        "python bench/sampler_choice.py "
        f"--seeds {' '.join(map(str, args.seeds))} --modes {' '.join(args.modes)}"
    )
    for mode in args.modes:
        meta[f"{mode} mean final hv"] = statistics.mean(
            results[s][mode]["hypervolume"][-1] for s in args.seeds
        )
    (args.out / "sampler_choice.json").write_text(json.dumps({"meta": meta, "results": results}))


if __name__ == "__main__":
    main()
