"""How a search run ends, each with one message: its Pareto front ranked (``conclude``), a stop
by a signal or a spent budget (``report_stop``), or a fault (``report_failure``); and what any
command that reopens a search does first (``replay``: the MLflow writes a hard stop lost)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from search import names as N
from search.config import ExperimentConfig
from search.faults import describe
from search.faults import save_traceback
from search.hypervolume import COMPUTE_EPOCHS
from search.interrupt import Stop
from search.mlflow_ui import front_link
from search.replay import replay_ended
from search.scheduler import stopped_at
from search.searcher import OptunaSearcher
from search.state import SearchState
from search.study import StudyRef
from search.study_links import annotate_studies
from search.tracking import Tracking
from search.tracking_queue import TrackingQueue
from search.tune_runs import TrialRecord
from search.tune_runs import all_records
from search.watch import Ledger
from trainables import metrics as M

log = logging.getLogger(__name__)

#: how long a stopped command waits for the tracking store before keeping its writes on disk
STOP_FLUSH_S = 30.0


def replay(tracking: Tracking, writes: TrackingQueue, records: list[TrialRecord]) -> None:
    """Queue again the MLflow writes a hard stop lost of trials Tune saved as finished."""
    replayed = replay_ended(tracking, writes, records)
    if replayed:
        log.info(
            "%d trial(s) had finished in Tune when a hard stop lost their MLflow writes; their "
            "runs are completed from the trial folders",
            replayed,
        )


def ledger(exp: ExperimentConfig, folder: Path) -> Ledger:
    """What the search spent and found so far (its earlier Tune runs), with its reference
    point (search.json)."""
    objectives = [(o.metric, o.direction) for o in exp.objectives]
    reference = SearchState.load(folder).reference_point
    return Ledger(objectives, reference, exp.trial.epochs).seed(all_records(folder))


def conclude(
    exp: ExperimentConfig,
    state: SearchState,
    tracking: Tracking,
    searcher: OptunaSearcher,
    results: Any,
    folder: Path,
    budget_spent: bool = False,
) -> int:
    """Rank the front and say how the search went (``budget_spent``: a spent budget ended it,
    and the trials it paused stay as they are, to continue if it is raised)."""
    paused = [r for r in results if budget_spent and r.status not in ("TERMINATED", "ERROR")]
    failed_for_good = searcher.conclude(keep={r.trial_id for r in paused})
    if failed_for_good:
        log.info("marked %d Optuna trial(s) that failed as FAIL", failed_for_good)
    if paused:  # a spent budget stopped them: they continue if it is raised
        _log_paused(paused, state)
        results = [r for r in results if r not in paused]
    failed = [r for r in results if r.error is not None or M.TRIAL_ERROR in (r.metrics or {})]
    for r in failed:
        reason = r.error if r.error is not None else r.metrics[M.TRIAL_ERROR]
        log.warning("trial at %s failed: %s", r.path, str(reason).splitlines()[0][:300])
    text = rank(exp, state, tracking, exp.mlflow.register_models, folder)
    pretrained = exp.pretrain.epochs if exp.pretrain is not None else 0
    compute = ledger(exp, folder).epochs_spent + pretrained
    tracking.client.log_metric(state.parent_run_id, COMPUTE_EPOCHS, compute)
    tracking.client.set_terminated(
        state.parent_run_id, "FAILED" if len(failed) == len(results) else "FINISHED"
    )
    stopped = sum(
        stopped_at(r.metrics or {}, exp.trial.epochs) is not None
        for r in results
        if r.error is None
    )
    log.info(
        "\nPareto front of %s (%d finished, %d stopped early, %d failed):\n%s\n\nplot: %s\n%s",
        exp.name,
        len(results) - len(failed) - stopped,
        stopped,
        len(failed),
        text,
        folder / "pareto.png",
        front_link(tracking.uri, tracking.experiment_id, state.parent_run_id),
    )
    return _exit_status(results, failed)


def _log_paused(paused: list[Any], state: SearchState) -> None:
    log.info(
        "%d trial(s) paused when the budget was spent (epochs %s); raise stop.epochs or "
        "stop.time in %s and resume to continue them",
        len(paused),
        ", ".join(str(r.metrics.get(M.EPOCH, 0)) for r in paused),
        state.experiment_file or "the experiment file",
    )


def _exit_status(results: list[Any], failed: list[Any]) -> int:
    """0, or 1 (said why) where every trial failed or none trained."""
    if results and len(failed) == len(results):
        log.error("every trial failed")
        return 1
    if not results:
        log.error(
            "no trial trained: every point the sampler drew was over the budget, could not be "
            "built or is already in the study (see the FAILed and PRUNED Optuna trials' "
            f"user attributes {N.OVER_BUDGET_ATTR}, {N.INVALID_ATTR}, {N.DUPLICATE_OF_ATTR})"
        )
        return 1
    return 0


def rank(
    exp: ExperimentConfig, state: SearchState, tracking: Tracking, register: bool, folder: Path
) -> str:
    """Pareto tags, (registered models,) plot and table of a search; returns the table."""
    from search.results import finalize

    objectives = [(o.metric, o.direction) for o in exp.objectives]
    text = finalize(
        tracking,
        objectives,
        list(exp.space.params),
        folder,  # where it is now: the folder may have been moved since launch
        exp.name if register else None,
        state.num_classes,
        state.input_shape,
    )
    link = front_link(tracking.uri, tracking.experiment_id, state.parent_run_id)
    annotate_studies(tracking, study_ref(state), exp.name, text, link)
    return text


def study_ref(state: SearchState) -> StudyRef:
    return StudyRef(state.optuna_storage, state.study_name)


def report_stop(state: SearchState, writes: TrackingQueue, folder: Path, stop: Stop) -> int:
    """A stop (signal or fault): what was saved, the parent run KILLED (FAILED for a fault),
    and the command that continues."""
    records = all_records(folder)
    done = sum(r.status in ("TERMINATED", "ERROR") for r in records)
    unfinished = [r for r in records if r.status not in ("TERMINATED", "ERROR")]
    paused = [r for r in unfinished if r.metrics.get(M.EPOCH)]  # trained some epochs
    waiting = len(unfinished) - len(paused)
    status = "FAILED" if stop.fault else "KILLED"
    writes.put({"op": "parent_end", "run": state.parent_run_id, "status": status})
    kept = writes.close(timeout=STOP_FLUSH_S)
    epochs = ", ".join(str(r.metrics.get(M.EPOCH, 0)) for r in paused)
    log.warning(
        "\nsearch stopped (%s): %d trial(s) ended, %d to continue from their last "
        "checkpoint%s, %d to start; everything is saved.%s\ncontinue with: python -m "
        "search resume %s",
        stop.fault or stop.signal_name,
        done,
        len(paused),
        f" (epochs {epochs})" if paused else "",
        waiting,
        f" {kept} MLflow write(s) wait in {folder}/tracking_pending.jsonl; resume sends them."
        if kept
        else "",
        folder,
    )
    return 1 if stop.fault else stop.exit_code


def report_failure(
    err: Exception, state: SearchState, writes: TrackingQueue, folder: Path, stop: Stop
) -> int:
    """An error that ended the driver's run: one message, the traceback in a file."""
    cause = describe(err)
    writes.put({"op": "parent_end", "run": state.parent_run_id, "status": "FAILED"})
    writes.close(timeout=5)
    saved = save_traceback(err, folder)
    first = "free space, then continue" if cause.startswith("the disk is full") else "continue"
    log.error(
        "\nthe search stopped: %s. Nothing recorded is lost%s; %s with: python -m search resume %s",
        cause,
        f" (the traceback is in {saved})" if saved else "",
        first,
        folder,
    )
    return 1
