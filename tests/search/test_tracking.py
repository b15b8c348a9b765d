"""The console progress of a search and the MLflow logger's writes, driven by hand with plain
trial records."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from search.tracking import ConsoleProgress
from search.tracking import MlflowTrialLogger

OBJECTIVES = [("val_accuracy", "max"), ("macs", "min")]


def _trial(tid: str, number: int = 0, **result: object) -> SimpleNamespace:
    config = {"epochs": 6, "tags": {"optuna_trial": number}}
    return SimpleNamespace(
        trial_id=tid, last_result=result, error_file=None, config=config, status="RUNNING"
    )


def test_progress_counts_trials_and_shows_the_front_so_far(caplog, tmp_path):
    progress = ConsoleProgress(4, OBJECTIVES)
    with caplog.at_level(logging.INFO, logger="search.tracking"):
        a, b, c = _trial("a", 0, val_accuracy=0.9, macs=400000), _trial("b", 1), _trial("c", 2)
        progress.on_trial_complete(0, [a, b, c], a)  # b and c still run
        b.last_result = {"val_accuracy": 0.8, "macs": 200000}
        progress.on_trial_complete(0, [b, c], b)
        c.last_result = {"val_accuracy": 0.7, "macs": 300000}  # dominated
        progress.on_trial_complete(0, [c], c)
        error = tmp_path / "error.txt"
        error.write_text("Traceback ...\nRuntimeError: worker died at postgresql://u:pw@h/db\n")
        ref = SimpleNamespace(
            trial_id="d", error_file=str(error), config={"tags": {"reference": "dense"}}
        )
        progress.on_trial_error(0, [ref], ref)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "[1/4] trial-0 (a) done: val_accuracy=0.9000, macs=0.400M | 2 running | "
        "front so far (1): (0.9000, 0.400M)"
    )
    assert lines[1].endswith("1 running | front so far (2): (0.8000, 0.200M) (0.9000, 0.400M)")
    assert lines[2].startswith("[3/4] trial-2 (c) done") and "(0.7000" not in lines[2]
    assert lines[3] == (
        "[4/4] ref-dense (d) FAILED (RuntimeError: worker died at postgresql://u:***@h/db)"
    )


def test_a_stopped_trial_is_counted_and_shown_but_never_joins_the_front(caplog):
    progress = ConsoleProgress(3, OBJECTIVES)
    with caplog.at_level(logging.INFO, logger="search.tracking"):
        progress.on_trial_complete(0, [], _trial("a", 0, epoch=6, val_accuracy=0.5, macs=400000))
        progress.on_trial_complete(0, [], _trial("b", 1, epoch=2, val_accuracy=0.9, macs=100000))
        progress.on_trial_complete(0, [], _trial("c", 2, epoch=6, val_accuracy=0.6, macs=300000))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == (
        "[2/3] trial-1 (b) stopped early at epoch 2 (dominated at that rung): "
        "val_accuracy=0.9000, macs=0.100M"
    )
    assert lines[2].endswith("front so far (1): (0.6000, 0.300M)") and progress.stopped == 1


def test_a_reported_deterministic_failure_counts_as_failed(caplog):
    progress = ConsoleProgress(2, OBJECTIVES)
    with caplog.at_level(logging.INFO, logger="search.tracking"):
        progress.on_trial_complete(0, [], _trial("a", 0, trial_error="NonFiniteLossError: nan"))
        progress.on_trial_complete(0, [], _trial("b", 1, val_accuracy=0.9, macs=400000))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("[1/2] trial-0 (a) FAILED (NonFiniteLossError: nan; not retried")
    assert lines[1].startswith("[2/2] trial-1 (b) done") and progress.failed == 1


class _Writes:
    """Collects what the logger would send (``TrackingQueue.put``'s operations)."""

    def __init__(self) -> None:
        self.ops: list[dict] = []

    def put(self, op: dict) -> None:
        self.ops.append(op)


def test_a_repeated_final_report_is_not_logged_twice():
    writes = _Writes()
    logger = MlflowTrialLogger(writes)  # type: ignore[arg-type]
    trial = _trial("t1")
    trial.path = ""
    final = {"epoch": 6, "val_accuracy": 0.9, "macs": 1e6}
    logger.on_trial_result(0, [trial], trial, final)
    logger.on_trial_result(0, [trial], trial, {**final, "final_repeat": True})
    metrics = [op for op in writes.ops if op["op"] == "metrics"]
    assert len(metrics) == 1 and ["epoch", 6.0] == metrics[0]["metrics"][0][:2]
