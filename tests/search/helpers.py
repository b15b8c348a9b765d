from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow

#: for the tests' `mlflow server`s: MLflow 3's server starts seven job worker processes
#: (Huey consumers, each importing MLflow) that a search never uses; on two cores they slowed
#: every server start. MLflow's documented switch turns them off.
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict[str, str]:
    return {**os.environ, **NO_SERVER_JOBS}


def server_command(port: int, db: Path, artifacts: Path) -> list[str]:
    """A real `mlflow server` on 127.0.0.1 with one worker process: its default four each
    import MLflow (about 4 CPU seconds apiece) for tests that send a request at a time."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", str(artifacts)]  # fmt: skip


def children(uri: str, experiment: str) -> tuple[object, list]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`dgc_search.kind` = 'search'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    kids = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    return parents[0], kids


def brute_force_front(kids: list) -> set[str]:
    pts = {k.info.run_id: (k.data.metrics["val_accuracy"], k.data.metrics["macs"]) for k in kids}

    # Literal dominance (max accuracy, min MACs), independent of search.pareto.
    def beats(q: tuple, p: tuple) -> bool:
        return q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])

    return {r for r, p in pts.items() if not any(beats(q, p) for s, q in pts.items() if s != r)}
