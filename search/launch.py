"""``launch``/``resume``: run a search on Ray Tune with the Optuna searcher, tracked in MLflow."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from search import names as N
from search.actors import trial_class
from search.cluster import check_cluster_reachable
from search.cluster import check_job_paths
from search.cluster import check_resources
from search.cluster import connect_ray
from search.config import ExperimentConfig
from search.mlflow_ui import front_link
from search.overrides import SearchConfigError
from search.preflight import Problem
from search.preflight import run_preflight
from search.pretrain import ensure_pretrained
from search.pretrain import run_config
from search.pretrain import with_init
from search.redact import log_redacted_artifact
from search.redact import redact
from search.references import reference_trials
from search.scheduler import stopped_at
from search.searcher import OptunaSearcher
from search.searcher import StudyRef
from search.state import RESOLVED_FILE
from search.state import STATE_FILE
from search.state import SearchState
from search.state import new_state
from search.state import open_search
from search.study_links import RunFinder
from search.study_links import annotate_studies
from search.tracking import ConsoleProgress
from search.tracking import MlflowTrialLogger
from search.tracking import Tracking
from trainables import metrics as M

log = logging.getLogger(__name__)

TUNE_NAME = "tune"


def launch(exp: ExperimentConfig, source: str, address: str | None = None) -> int:
    """Validate, start (or join) Ray, run the search, rank and register. Returns an exit code."""
    if any(o.metric == M.LATENCY_MS for o in exp.objectives):
        trial = exp.trial.model_copy(update={"measure_latency": True})
        exp = exp.model_copy(update={"trial": trial})
    check_cluster_reachable(address or exp.ray.address)
    report = run_preflight(exp, source)
    log.info("preflight: %s", report.summary(exp.budget.macs))
    for note in report.notes:
        log.warning("%s", note)
    folder = exp.experiment_dir
    if (folder / STATE_FILE).exists():
        raise SearchConfigError(
            f"{folder} already holds a search; continue it with `python -m "
            f"search resume {folder}` or choose another name (nothing "
            "recorded is overwritten)"
        )
    # Everything that can fail before the first trial runs before anything is written.
    connect_ray(exp, address)
    check_job_paths(exp)
    check_resources(exp)
    trainable = _trainable(exp, source)
    folder.mkdir(parents=True, exist_ok=True)
    # Absolute storage_dir in the resolved file: resume and pareto may run from another folder.
    exp = with_init(exp.model_copy(update={"storage_dir": str(folder.parent)}), folder)
    (folder / RESOLVED_FILE).write_text(
        yaml.safe_dump(exp.model_dump(mode="json"), sort_keys=False)
    )
    state = new_state(exp, report.problem, folder)
    tracking = Tracking(state.tracking_uri, state.mlflow_experiment)
    state.parent_run_id = tracking.start_parent(
        exp.name, _parent_params(exp), {**_run_tags(source), N.SEARCH_DIR_TAG: str(folder)}
    )
    log_redacted_artifact(tracking.client, state.parent_run_id, folder / RESOLVED_FILE)
    log_redacted_artifact(tracking.client, state.parent_run_id, source)
    state.save(folder)
    log.info(
        "experiment folder: %s | MLflow: %s (experiment %r, parent run %s)",
        folder,
        redact(state.tracking_uri),
        state.mlflow_experiment,
        state.parent_run_id,
    )
    _pretrain(exp, folder, tracking, state, trainable)
    searcher = _searcher(exp, report.problem, state)
    tuner = _build_tuner(exp, folder, searcher, tracking, trainable)
    return _conclude(exp, state, tracking, searcher, _fit(tuner, tracking, state, folder), folder)


def resume(folder: Path, address: str | None = None) -> int:
    """Continue an interrupted search: finished trials stay, running ones restart from their
    last checkpoint, the study goes on, and no MLflow run is created twice."""
    from optuna.trial import TrialState
    from ray import tune

    folder = folder.resolve()  # Tune's restore takes a URI: a relative path has no scheme
    exp, state, tracking = open_search(folder)
    check_cluster_reachable(address or exp.ray.address)
    connect_ray(exp, address)
    check_resources(exp)
    trainable = _trainable(exp, str(folder / RESOLVED_FILE))
    _pretrain(exp, folder, tracking, state, trainable)
    searcher = _searcher(exp, _problem(state), state)
    if tune.Tuner.can_restore(str(folder / TUNE_NAME)):
        tuner = tune.Tuner.restore(
            str(folder / TUNE_NAME),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
        )
    elif not searcher.study.get_trials(states=[TrialState.COMPLETE]):
        # The launch stopped before Tune saved anything: start Tune on the same study and run.
        log.info(
            "%s has no Tune state yet (the launch stopped before it began); starting it", folder
        )
        tuner = _build_tuner(exp, folder, searcher, tracking, trainable)
    else:
        raise SearchConfigError(
            f"{folder / TUNE_NAME}: Tune's state is missing but the study has finished trials; "
            "the folder was damaged. Nothing is deleted: rank what exists with `python -m "
            f"search pareto {folder}`, or launch a new search under another name"
        )
    tracking.client.update_run(state.parent_run_id, status="RUNNING")
    return _conclude(exp, state, tracking, searcher, _fit(tuner, tracking, state, folder), folder)


def _pretrain(
    exp: ExperimentConfig, folder: Path, tracking: Tracking, state: SearchState, trainable: Any
) -> None:
    """The search's dense network (``pretrain``), trained once; the parent run is marked
    FAILED (KILLED on Ctrl-C) if that stops, and the folder stays resumable."""
    try:
        ensure_pretrained(exp, folder, tracking, trainable)
    except BaseException as err:
        tracking.client.set_terminated(
            state.parent_run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        )
        raise


def _fit(tuner: Any, tracking: Tracking, state: SearchState, folder: Path) -> Any:
    """``tuner.fit()``; if it raises, the parent run is marked FAILED (KILLED on Ctrl-C) rather
    than left RUNNING, and the folder stays resumable."""
    try:
        return tuner.fit()
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.client.set_terminated(state.parent_run_id, status)
        log.error(
            "the search stopped (%s); continue it with `python -m search resume %s`",
            type(err).__name__,
            folder,
        )
        raise


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
        tuple(state.input_size),
    )  # type: ignore[arg-type]
    link = front_link(tracking.uri, tracking.experiment_id, state.parent_run_id)
    annotate_studies(tracking, _study_ref(state), exp.name, text, link)
    return text


def _study_ref(state: SearchState) -> StudyRef:
    return StudyRef(state.optuna_storage, state.study_name)


def _searcher(exp: ExperimentConfig, problem: Problem, state: SearchState) -> OptunaSearcher:
    """The search's searcher; it records each trial's MLflow run on its Optuna trial."""
    runs = RunFinder(state.tracking_uri, state.mlflow_experiment, state.parent_run_id)
    return OptunaSearcher(exp, problem, _study_ref(state), runs)


def _problem(state: SearchState) -> Problem:
    return Problem(state.num_classes, tuple(state.input_size), state.num_stages)  # type: ignore[arg-type]


def _trainable(exp: ExperimentConfig, source: str) -> Any:
    """The trainable with its resources; small datasets decoded once here and shipped to every
    worker through the object store (no shared file system needed)."""
    from ray import tune

    from trainables.data import DatasetError
    from trainables.data import load_splits
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
    exp: ExperimentConfig,
    folder: Path,
    searcher: OptunaSearcher,
    tracking: Tracking,
    trainable: Any,
) -> Any:
    from ray import tune

    objectives = [(o.metric, o.direction) for o in exp.objectives]
    total = exp.num_trials + len(reference_trials(exp))  # references come on top
    callbacks = [MlflowTrialLogger(tracking), ConsoleProgress(total, objectives)]
    config = run_config(exp, folder, TUNE_NAME, callbacks)
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=_scheduler(exp, objectives),
        num_samples=total,
        max_concurrent_trials=exp.concurrency,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
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


def _conclude(
    exp: ExperimentConfig,
    state: SearchState,
    tracking: Tracking,
    searcher: OptunaSearcher,
    results: Any,
    folder: Path,
) -> int:
    orphans = searcher.fail_orphans()
    if orphans:
        log.info("marked %d Optuna trial(s) that never finished as FAIL", orphans)
    failed = [r for r in results if r.error is not None or M.TRIAL_ERROR in (r.metrics or {})]
    for r in failed:
        reason = r.error if r.error is not None else r.metrics[M.TRIAL_ERROR]
        log.warning("trial at %s failed: %s", r.path, str(reason).splitlines()[0][:300])
    text = rank(exp, state, tracking, exp.mlflow.register_models, folder)
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
    if results and len(failed) == len(results):
        log.error("every trial failed")
        return 1
    if not results:
        log.error(
            "no trial trained: every point the sampler drew was over the budget, could not be "
            "built or is already in the study (see the FAILed and PRUNED Optuna trials' "
            "user attributes over_budget, invalid, duplicate_of)"
        )
        return 1
    return 0


def _parent_params(exp: ExperimentConfig) -> dict[str, Any]:
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
