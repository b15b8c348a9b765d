"""Searches that need their own processes: a driver killed mid-way (with the local cluster it
started) and resumed, in the README's form (``resume runs/<name>``), under MO-ASHA; a two-node
Ray cluster joined with --address; a real `mlflow server` as the tracking server. (A resume
killed in turn: tests/search/test_faults.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import optuna
import pytest

from search.config import load_experiment
from search.launch import launch
from search.state import SearchState
from search.tracking import tracking_uri
from tests.helpers import REPO
from tests.search.helpers import brute_force_front
from tests.search.helpers import children
from tests.search.helpers import server_command
from tests.search.helpers import server_env

pytestmark = pytest.mark.e2e
SMOKE = str(REPO / "experiments" / "smoke.yaml")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "search", *args]


def _ended(uri: str, name: str) -> int:
    try:
        return sum(k.info.status == "FINISHED" for k in children(uri, name)[1])
    except Exception:  # noqa: BLE001 (store not created yet)
        return 0


def test_mo_asha_search_stops_trials_and_resumes_after_driver_sigkill(tmp_path, mlflow_db):
    uri = mlflow_db
    sets = [
        "--set",
        f"mlflow.tracking_uri={uri}",
        "--set",
        "name=moasha",
        "--set",
        "num_trials=8",
        "--set",
        "trial.epochs=4",
        "--set",
        "scheduler={name: mo-asha, grace_period: 1, reduction_factor: 3}",
        "--set",
        "trial.gate_schedule={warmup_end: 0.25, ramp_end: 1, unit: epochs}",
    ]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(
            _cli("launch", SMOKE, *sets),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
        deadline = time.time() + 400
        while _ended(uri, "moasha") < 3 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    folder = tmp_path / "runs" / "moasha"
    assert (folder / "tune" / "mo_asha.json").is_file()
    client = mlflow.MlflowClient(uri)

    def histories() -> dict[str, int]:
        return {
            k.data.tags["ray_trial_id"]: len(client.get_metric_history(k.info.run_id, "epoch"))
            for k in children(uri, "moasha")[1]
            if "stopped_at_epoch" in k.data.tags
        }

    stopped_before = histories()
    out = subprocess.run(
        _cli("resume", "runs/moasha"), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, kids = children(uri, "moasha")
    ids = [k.data.tags["ray_trial_id"] for k in kids]
    assert len(kids) == 8 and len(set(ids)) == 8, ids
    assert all(k.info.status == "FINISHED" for k in kids)
    stopped = [k for k in kids if "stopped_at_epoch" in k.data.tags]
    full = [k for k in kids if "stopped_at_epoch" not in k.data.tags]
    assert stopped and full, "with 8 trials and rungs at epochs 1 and 3 some must stop"
    after = histories()
    for tid, n in stopped_before.items():  # stopped before the kill: not restarted
        assert after[tid] == n
    for k in stopped:
        epoch = int(k.data.tags["stopped_at_epoch"])
        assert epoch in (1, 3) and k.data.tags["status"] == "stopped"
        assert k.data.tags["pareto"] == "false" and "pareto_rank" not in k.data.tags
        assert [m.step for m in client.get_metric_history(k.info.run_id, "val_accuracy")] == list(
            range(1, epoch + 1)
        )  # per-epoch metrics kept, up to the rung
    for k in full:
        assert k.data.metrics["epoch"] == 4 and "pareto_rank" in k.data.tags
    assert {k.info.run_id for k in full if k.data.tags["pareto"] == "true"} == brute_force_front(
        full
    )
    state = SearchState.load(folder)
    study = optuna.load_study(study_name="moasha", storage=state.optuna_storage)
    by_id = {
        t.user_attrs["ray_trial_id"]: t for t in study.trials if "ray_trial_id" in t.user_attrs
    }
    for k in stopped:
        t = by_id[k.data.tags["ray_trial_id"]]
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["stopped_at_epoch"] == int(k.data.tags["stopped_at_epoch"])
    for k in full:
        assert by_id[k.data.tags["ray_trial_id"]].state == optuna.trial.TrialState.COMPLETE
    assert "stopped early" in out.stdout + out.stderr


def test_search_through_address_on_a_two_node_cluster(tmp_path, mlflow_db):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        uri = mlflow_db
        out = subprocess.run(
            _cli(
                "launch",
                SMOKE,
                "--address",
                cluster.address,
                "--set",
                f"storage_dir={tmp_path}",
                "--set",
                f"mlflow.tracking_uri={uri}",
                "--set",
                "num_trials=2",
                "--set",
                "trial.epochs=1",
            ),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        cluster.shutdown()
    nodes = set()
    for result in (tmp_path / "smoke" / "tune").glob("trial_*/result.json"):
        nodes |= {json.loads(line)["node_id"] for line in result.read_text().splitlines()}
    assert len(nodes) == 2  # trials really ran on both nodes
    assert len(children(uri, "smoke")[1]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_logs_to_a_real_mlflow_server(ray_2cpu, tmp_path, empty_store):
    port = _free_port()
    shutil.copyfile(empty_store, tmp_path / "server.db")
    server = subprocess.Popen(
        server_command(port, tmp_path / "server.db", tmp_path / "artifacts"),
        stdout=open(tmp_path / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=server_env(),
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline, up = time.time() + 120, False
        while not up and time.time() < deadline:
            try:
                up = urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert up, (tmp_path / "server.log").read_text()[-3000:]  # the server really came up
        exp = load_experiment(
            SMOKE,
            [f"storage_dir={tmp_path}", f"mlflow.tracking_uri={uri}", "num_trials=2",
             "trial.epochs=1"],
        )  # fmt: skip
        assert launch(exp, SMOKE) == 0
        _, kids = children(uri, "smoke")
        assert len(kids) == 2 and all("val_accuracy" in k.data.metrics for k in kids)
        front = [k for k in kids if k.data.tags.get("pareto") == "true"]
        alias = mlflow.MlflowClient(uri).get_run(front[0].info.run_id).data.tags["registered_alias"]
        with tracking_uri(uri):
            model = mlflow.pytorch.load_model(f"models:/smoke@{alias}", map_location="cpu")
        import torch

        assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
        assert list((tmp_path / "artifacts").rglob("*")), "artifacts went through the server"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
