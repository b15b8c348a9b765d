"""``launch``/``resume``: run a search on Ray Tune with the Optuna searcher, tracked in MLflow.

A search ends in one of three ways, each with one message (``search.conclude``): its Pareto
front (exit 0; 1 if every trial failed or none trained); a stop by Ctrl-C (130) or SIGTERM
(143), after which ``resume`` continues it (``search.interrupt``); or a fault such as a full disk
(1), with what happened and the command that continues. Nothing recorded is lost in any of them.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

from search import names as N
from search.actors import trial_class
from search.budget import Budget
from search.budget import BudgetCallback
from search.cluster import check_cluster_reachable
from search.cluster import check_job_paths
from search.cluster import check_resources
from search.cluster import connect_ray
from search.conclude import conclude
from search.conclude import ledger
from search.conclude import replay
from search.conclude import report_failure
from search.conclude import report_stop
from search.conclude import study_ref
from search.config import ExperimentConfig
from search.edits import apply_edits
from search.edits import launched_from
from search.edits import resolved
from search.endpoints import check_database_url
from search.endpoints import check_tracking_server
from search.faults import FaultWatch
from search.hypervolume import describe_reference
from search.hypervolume import reference_point
from search.integrity import check_folder
from search.integrity import check_parent_run
from search.integrity import check_tracking_store
from search.interrupt import DrainCallback
from search.interrupt import DrainScheduler
from search.interrupt import Stop
from search.lock import SearchLock
from search.overrides import SearchConfigError
from search.preflight import Problem
from search.preflight import Report
from search.preflight import run_preflight
from search.pretrain import TUNE_NAME as PRETRAIN_RUN
from search.pretrain import ensure_pretrained
from search.pretrain import run_config
from search.redact import log_redacted_artifact
from search.redact import redact
from search.references import reference_trials
from search.searcher import OptunaSearcher
from search.state import RESOLVED_FILE
from search.state import STATE_FILE
from search.state import SearchState
from search.state import load_search
from search.state import new_state
from search.state import write_resolved
from search.tracking import ConsoleProgress
from search.tracking import MlflowTrialLogger
from search.tracking import Tracking
from search.tracking import default_tracking_uri
from search.tracking_queue import TrackingQueue
from search.tune_repair import StateBackup
from search.tune_repair import repair_checkpoints_of
from search.tune_repair import repair_saves
from search.tune_repair import restore_missing_checkpoints
from search.tune_runs import FIRST
from search.tune_runs import Parts
from search.tune_runs import TrialRecord
from search.tune_runs import all_records
from search.tune_runs import can_restore
from search.tune_runs import next_segment
from search.tune_runs import restore
from search.tune_runs import segments
from search.watch import WatchCallback

log = logging.getLogger(__name__)

TUNE_NAME = FIRST


def launch(
    exp: ExperimentConfig,
    source: str,
    address: str | None = None,
    overrides: list[str] | None = None,
) -> int:
    """Validate, start (or join) Ray, run the search, rank and register. Returns an exit code."""
    folder = exp.experiment_dir
    exp = resolved(exp, folder)
    check_cluster_reachable(address or exp.ray.address)
    report = run_preflight(exp, source, address=address)
    log.info("preflight: %s", report.summary(exp.budget.macs))
    log.info("%s", describe_reference(exp, report))
    for note in report.notes:
        log.warning("%s", note)
    check_tracking_server(exp.mlflow.tracking_uri or default_tracking_uri(), "launch again")
    stop = Stop()
    stop.install()
    try:
        with SearchLock(folder, "launch again under another name, or resume that search"):
            if (folder / STATE_FILE).exists():
                raise SearchConfigError(
                    f"{folder} already holds a search; continue it with `python -m "
                    f"search resume {folder}` or choose another name (nothing "
                    "recorded is overwritten)"
                )
            return _launch(exp, source, address, overrides or [], report, stop)
    finally:
        stop.restore()


def _launch(
    exp: ExperimentConfig,
    source: str,
    address: str | None,
    overrides: list[str],
    report: Report,
    stop: Stop,
) -> int:
    # Everything that can fail before the first trial runs before anything is written.
    folder, problem = exp.experiment_dir, report.problem
    connect_ray(exp, address)
    stop.install()  # ray.init set its own SIGTERM handler
    check_job_paths(exp)
    check_resources(exp)
    trainable = _trainable(exp, source)
    write_resolved(folder, exp)
    state = new_state(exp, problem, folder, launched_from(exp, source, overrides, folder),
                      overrides)  # fmt: skip
    state.reference_point = reference_point(exp, report)
    tracking = _start_tracking(exp, state, source, folder)
    searcher = _searcher(exp, problem, state, stop)
    searcher.study
    state.save(folder)
    log.info(
        "experiment folder: %s | MLflow: %s (experiment %r, parent run %s)",
        folder,
        redact(state.tracking_uri),
        state.mlflow_experiment,
        state.parent_run_id,
    )
    return _run(exp, state, tracking, folder, trainable, searcher, stop, [])


def _start_tracking(
    exp: ExperimentConfig, state: SearchState, source: str, folder: Path
) -> Tracking:
    """The MLflow experiment and the search's parent run (its id goes into ``state``)."""
    from mlflow.exceptions import MlflowException

    try:
        tracking = Tracking(state.tracking_uri, state.mlflow_experiment)
        state.parent_run_id = tracking.start_parent(
            exp.name,
            _parent_params(exp, state),
            {**_run_tags(source), N.SEARCH_DIR_TAG: str(folder)},
        )
        log_redacted_artifact(tracking.client, state.parent_run_id, folder / RESOLVED_FILE)
        log_redacted_artifact(tracking.client, state.parent_run_id, source)
    except MlflowException as err:
        raise SearchConfigError(
            f"the tracking store {redact(state.tracking_uri)} failed before the search began "
            f"({redact(str(err)).splitlines()[0][:200]}); launch again once it answers "
            "(nothing was trained)"
        ) from err
    return tracking


def resume(folder: Path, address: str | None = None) -> int:
    """Continue a stopped search: finished trials stay, stopped ones continue from their last
    checkpoint, a point suggested but never started is suggested again, the study goes on,
    and no MLflow run is created twice. Damaged state is refused before anything runs."""
    folder = folder.resolve()  # Tune's restore takes a URI: a relative path has no scheme
    SearchState.load(folder)  # a search folder (the lock must not create one)
    stop = Stop()
    stop.install()
    try:
        with SearchLock(folder, f"run `python -m search resume {folder}` again"):
            return _resume(folder, address, stop)
    finally:
        stop.restore()


def _resume(folder: Path, address: str | None, stop: Stop) -> int:
    exp, state = load_search(folder)  # again, under the lock
    exp = apply_edits(exp, state, folder)
    check_cluster_reachable(address or exp.ray.address)
    # The driver only: a missing folder is damage, which check_folder names with its remedy.
    check_database_url(
        state.optuna_storage, "optuna_storage", str(folder / STATE_FILE), sqlite_folder=False
    )
    check_tracking_server(state.tracking_uri, f"`python -m search resume {folder}`")
    check_tracking_store(state, folder)
    runs = [folder / PRETRAIN_RUN, *segments(folder)]
    repair_saves(runs)  # Tune's state files a full disk cut short (search.tune_repair)
    records = check_folder(folder, state)
    restore_missing_checkpoints(records)  # ones a killed driver's last save still names
    repair_checkpoints_of(folder / PRETRAIN_RUN)
    tracking = Tracking(state.tracking_uri, state.mlflow_experiment, state.parent_run_id)
    check_parent_run(tracking, state, folder)
    connect_ray(exp, address)
    stop.install()  # ray.init set its own SIGTERM handler
    check_job_paths(exp)
    check_resources(exp)
    trainable = _trainable(exp, str(folder / RESOLVED_FILE))
    searcher = _searcher(exp, _problem(state), state, stop)
    _check_tune_state(searcher, records, folder)
    again = searcher.reconcile({r.trial_id: (r.status, r.metrics) for r in records})
    if again:
        log.info("%d point(s) suggested before the stop, never started, are suggested again", again)
    write_resolved(folder, exp)  # with the edits resume applied, if any
    tracking.client.update_run(state.parent_run_id, status="RUNNING")
    return _run(exp, state, tracking, folder, trainable, searcher, stop, records)


def _check_tune_state(searcher: OptunaSearcher, records: list, folder: Path) -> None:
    from optuna.trial import TrialState

    if not records and searcher.study.get_trials(states=[TrialState.COMPLETE]):
        raise SearchConfigError(
            f"{folder / TUNE_NAME}: Tune's state is missing but the study has finished trials; "
            "the folder was damaged. Nothing is deleted: rank what exists with `python -m "
            f"search pareto {folder}`, or launch a new search under another name"
        )


def _run(
    exp: ExperimentConfig,
    state: SearchState,
    tracking: Tracking,
    folder: Path,
    trainable: Any,
    searcher: OptunaSearcher,
    stop: Stop,
    records: list[TrialRecord],
) -> int:
    """Train (pretraining, then the Tune runs), then conclude, or say how it stopped.
    ``records``: the trials as Tune saved them before this command (none at launch)."""
    writes = TrackingQueue(tracking, folder).start()
    replay(tracking, writes, records)
    searcher.run_of = writes.run_of
    try:
        trained = _train(exp, folder, trainable, searcher, writes, stop)
    except KeyboardInterrupt:  # a third signal, or one outside a Tune run
        trained = False
    except Exception as err:  # noqa: BLE001  (one message and the resume command, no traceback)
        return report_failure(err, state, writes, folder, stop)
    if not trained or stop.interrupted:
        return report_stop(state, writes, folder, stop)
    try:
        writes.flush()
        writes.close()
        records = all_records(folder)
        return conclude(exp, state, tracking, searcher, records, folder, stop.budget is not None)
    except KeyboardInterrupt:
        kept = writes.close(timeout=0)
        log.warning(
            "stopped (%s) after training, before ranking%s; rank the search with `python -m "
            "search pareto %s`",
            stop.signal_name,
            f" ({kept} MLflow write(s) kept for it)" if kept else "",
            folder,
        )
        return stop.exit_code


def _train(
    exp: ExperimentConfig,
    folder: Path,
    trainable: Any,
    searcher: OptunaSearcher,
    writes: TrackingQueue,
    stop: Stop,
) -> bool:
    """The pretraining and the Tune runs; False if a signal or a fault ended them (a spent
    budget ends them too, and the search is ranked)."""
    if not ensure_pretrained(exp, folder, _parts(exp, writes, stop), trainable):
        return False
    budget = Budget(exp.stop, ledger(exp, folder), folder)
    spent = budget.spent()
    if spent is not None:
        log.info("budget spent already: %s; raise it in the experiment file to go on", spent)
        stop.budget = spent  # nothing runs: no drain to announce
        return True
    runs = segments(folder)
    if runs and can_restore(runs[-1]):
        restore(runs[-1], trainable, _parts(exp, writes, stop, searcher, budget)).fit()
        if stop.requested:
            return not stop.interrupted
    remaining = searcher.remaining()
    if remaining > 0 and not searcher.gave_up:
        name = runs[-1].name if runs and not can_restore(runs[-1]) else next_segment(folder)
        if name != FIRST:
            log.info("%d more trial(s) (num_trials was raised): Tune run %s", remaining, name)
        parts = _parts(exp, writes, stop, searcher, budget)
        tuner = _build_tuner(exp, folder, parts, trainable, name, remaining)
        tuner.fit()
    budget.save(force=True)
    return not stop.interrupted


def _parts(
    exp: ExperimentConfig,
    writes: TrackingQueue,
    stop: Stop,
    searcher: OptunaSearcher | None = None,
    budget: Budget | None = None,
) -> Parts:
    """A Tune run's scheduler and callbacks (the search's, with its budget and ledger, or the
    pretraining's without a searcher)."""
    callbacks: list[Any] = [MlflowTrialLogger(writes, stop), DrainCallback(stop), FaultWatch(stop),
                            StateBackup()]  # fmt: skip
    scheduler = None
    if searcher is not None:
        objectives = [(o.metric, o.direction) for o in exp.objectives]
        total = exp.num_trials + len(reference_trials(exp))  # references come on top
        ledger = budget.ledger if budget is not None else None
        if budget is not None:  # the ledger's keeper first: the others read it
            parent = writes.tracking.parent_run_id or ""
            callbacks += [
                WatchCallback(budget.ledger, writes, parent),
                BudgetCallback(budget, stop),
            ]
        callbacks.append(ConsoleProgress(total, objectives, ledger))
        scheduler = _scheduler(exp, objectives)
    return Parts(
        scheduler=DrainScheduler(scheduler, stop, budget),
        callbacks=callbacks,
        max_failures=exp.max_failures,
        searcher=searcher,
        concurrency=exp.concurrency,
        stop=stop,
    )


def _searcher(
    exp: ExperimentConfig, problem: Problem, state: SearchState, stop: Stop
) -> OptunaSearcher:
    """The search's searcher. It records each trial's MLflow run on its Optuna trial, as the
    tracking queue knows it (``_run`` connects them): a lookup that never waits for MLflow."""
    return OptunaSearcher(exp, problem, study_ref(state), stop=stop)


def _problem(state: SearchState) -> Problem:
    return Problem(state.num_classes, state.input_shape, state.num_stages)


def _trainable(exp: ExperimentConfig, source: str) -> Any:
    """The trainable with its resources; small datasets decoded once here and shipped to every
    worker through the object store (no shared file system needed)."""
    from ray import tune

    from trainables.data import load_splits
    from trainables.datasets import DatasetError
    from trainables.trainable import train_dgc as fn

    resources = {"cpu": exp.resources.cpu, "gpu": exp.resources.gpu}
    if exp.trial.data.dataset == "imagenet":  # workers read datadir; it must exist on all
        return trial_class(tune.with_resources(fn, resources))
    try:
        splits = load_splits(exp.trial.data)
    except DatasetError as err:  # e.g. a file with an image suffix that is not an image
        raise SearchConfigError(f"{source}: trial.data: {err}") from err
    return trial_class(tune.with_resources(tune.with_parameters(fn, splits=splits), resources))


def _build_tuner(
    exp: ExperimentConfig, folder: Path, parts: Parts, trainable: Any, name: str, num_samples: int
) -> Any:
    from ray import tune

    tune_config = tune.TuneConfig(
        search_alg=parts.searcher,
        scheduler=parts.scheduler,
        num_samples=num_samples,
        max_concurrent_trials=parts.concurrency,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    config = run_config(exp, folder, name, parts.callbacks)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=config)


def _scheduler(exp: ExperimentConfig, objectives: list[tuple[str, str]]) -> Any:
    """The experiment's early-stopping scheduler; None keeps Tune's FIFO (every trial runs to
    its last epoch)."""
    from search.scheduler import MoAshaScheduler

    s = exp.scheduler
    if s is None:
        return None
    return MoAshaScheduler(objectives, exp.trial.epochs, s.grace_period, s.reduction_factor)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _parent_params(exp: ExperimentConfig, state: SearchState) -> dict[str, Any]:
    import optuna
    import ray
    import torch

    return {
        "model": exp.trial.model.name,
        "dataset": exp.trial.data.dataset,
        "epochs": exp.trial.epochs,
        "num_trials": exp.num_trials,
        "sampler": exp.sampler.name,
        "objectives": json.dumps([o.model_dump() for o in exp.objectives]),
        "budget_macs": exp.budget.macs,
        "hypervolume_reference": json.dumps(
            None
            if state.reference_point is None
            else dict(zip((o.metric for o in exp.objectives), state.reference_point))
        ),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
    }


def _run_tags(source: str) -> dict[str, str]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {
        "git_sha": sha,
        "experiment_file": str(Path(source).resolve()),
        N.KIND_TAG: "search",
    }
