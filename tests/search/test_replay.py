"""Trials Tune saved as finished whose MLflow writes a hard stop lost, completed from their
folders on a real SQLite MLflow store (the e2e form: test_faults.py's Ctrl-C/SIGKILL test)."""

from __future__ import annotations

import json
from pathlib import Path

from search.replay import replay_ended
from search.tracking import Tracking
from search.tracking_queue import TrackingQueue
from search.tune_runs import TrialRecord

CONFIG = {"model": {"name": "dyresnet8", "heads": 2}, "epochs": 3,
          "tags": {"optuna_trial": 0}}  # fmt: skip


def _trial_folder(root: Path, trial_id: str, epochs: int) -> TrialRecord:
    """A trial folder as Tune writes it: params.json, one result.json line per epoch, the
    checkpoints; a last line cut off by the stop."""
    folder = root / f"trial_{trial_id}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(CONFIG))
    results = [
        {"epoch": e, "val_accuracy": 0.5 + e / 10, "macs": 1000.0, "trial_id": trial_id}
        for e in range(1, epochs + 1)
    ]
    lines = [json.dumps(r) for r in results]
    (folder / "result.json").write_text("\n".join(lines) + '\n{"epoch": 4, "val_acc')
    for e in range(1, epochs + 1):
        (folder / f"checkpoint_{e - 1:06d}").mkdir()
    return TrialRecord(trial_id, "TERMINATED", results[-1], str(folder), None, CONFIG["tags"])


def _history(tracking: Tracking, run_id: str) -> list[int]:
    return sorted(m.step for m in tracking.client.get_metric_history(run_id, "val_accuracy"))


def test_a_finished_trial_whose_writes_were_lost_gets_its_run_once(tmp_path, mlflow_db):
    tracking = Tracking(mlflow_db, "x")
    tracking.start_parent("x", {}, {})
    lost = _trial_folder(tmp_path / "tune", "aaaa", 3)  # no run at all
    half = _trial_folder(tmp_path / "tune", "bbbb", 3)  # its run open after epoch 1
    running = TrialRecord("cccc", "RUNNING", {}, str(tmp_path / "tune" / "trial_cccc"))
    writes = TrackingQueue(tracking, tmp_path).start()
    writes.put({"op": "child", "trial": "bbbb", "name": "trial-1",
                "tags": {"ray_trial_id": "bbbb", "ray_trial_dir": "", "optuna_trial": "1"},
                "params": {}, "config": {}})  # fmt: skip
    writes.put({"op": "metrics", "trial": "bbbb", "metrics": [["val_accuracy", 0.6, 1, 1],
                ["epoch", 1, 1, 1]], "static": {}})  # fmt: skip
    writes.flush()

    assert replay_ended(tracking, writes, [lost, half, running]) == 2
    assert writes.close() == 0
    runs = {r.data.tags["ray_trial_id"]: r for r in tracking.children()}
    assert set(runs) == {"aaaa", "bbbb"}  # nothing for the trial Tune had not finished
    for trial_id, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert _history(tracking, run.info.run_id) == [1, 2, 3]  # every epoch, once
        assert run.data.tags["checkpoint"].endswith("checkpoint_000002")
        assert run.data.metrics["macs"] == 1000.0
    assert runs["aaaa"].data.params["model.heads"] == "2"

    again = TrackingQueue(tracking, tmp_path).start()  # a second resume: nothing to do
    assert replay_ended(tracking, again, [lost, half, running]) == 0
    again.close()
    assert all(_history(tracking, r.info.run_id) == [1, 2, 3] for r in tracking.children())
