"""The tracking queue on a real SQLite MLflow store: writes in order, a trial's run found again,
and what a stopped command could not send kept and sent by the next one."""

from __future__ import annotations

from search.tracking import Tracking
from search.tracking_queue import PENDING_FILE
from search.tracking_queue import TrackingQueue
from search.tracking_queue import transient


def _child(trial: str, number: int) -> dict:
    return {
        "op": "child",
        "trial": trial,
        "name": f"trial-{number}",
        "tags": {"ray_trial_id": trial, "ray_trial_dir": "", "optuna_trial": str(number)},
        "params": {"model.heads": "4"},
        "config": {"model": {"heads": 4}},
    }


def _metrics(trial: str, epoch: int) -> dict:
    return {"op": "metrics", "trial": trial, "metrics": [["val_accuracy", 0.5 + epoch / 10,
            1000 + epoch, epoch]], "static": {"macs": 123.0}}  # fmt: skip


def test_writes_a_stopped_command_kept_are_sent_by_the_next(tmp_path, mlflow_db):
    tracking = Tracking(mlflow_db, "x")
    tracking.start_parent("x", {}, {})
    stopped = TrackingQueue(tracking, tmp_path)  # its thread never ran: nothing was sent
    for op in (_child("a", 0), _metrics("a", 1), _metrics("a", 2)):
        stopped.put(op)
    assert stopped.close(timeout=0) == 3 and (tmp_path / PENDING_FILE).is_file()
    assert tracking.children() == []

    later = TrackingQueue(tracking, tmp_path).start()
    later.put(_metrics("a", 3))  # after what the earlier command kept
    later.put({"op": "end", "trial": "a", "status": "FINISHED"})
    assert later.close() == 0 and not (tmp_path / PENDING_FILE).exists()
    (run,) = tracking.children()
    history = tracking.client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3] and run.info.status == "FINISHED"
    assert run.data.metrics["macs"] == 123.0
    assert later.run_of("a") == run.info.run_id


def test_a_point_suggested_again_goes_on_in_its_run(tmp_path, mlflow_db):
    tracking = Tracking(mlflow_db, "x")
    tracking.start_parent("x", {}, {})
    queue = TrackingQueue(tracking, tmp_path).start()
    queue.put(_child("old-id", 7))
    queue.put(_child("new-id", 7))  # Optuna trial 7 again, under a new Ray trial id
    queue.close()
    (run,) = tracking.children()
    assert run.data.tags["ray_trial_id"] == "new-id" and queue.run_of("new-id") == run.info.run_id


def test_only_mlflows_refusals_are_not_retried():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    assert transient(MlflowException("API request failed: Connection refused"))
    assert transient(OSError(28, "No space left on device"))
    assert not transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
