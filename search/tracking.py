"""MLflow tracking from the driver: one parent run per search, one child run per trial.

All writes happen in the driver process (a Tune ``Callback``), so a SQLite store never sees two
writers and workers need no access to the tracking server. Child runs are found again by their
``ray_trial_id`` tag, so a resumed search never creates a run twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.entities import RunStatus
from ray.tune import Callback

from search import names as N
from search.actors import actor_repr
from search.overrides import SearchConfigError
from search.redact import redact
from search.scheduler import stopped_at
from trainables import metrics as M

log = logging.getLogger(__name__)

LOGGED_METRICS = (
    M.EPOCH,
    M.TRAIN_LOSS,
    M.VAL_ACCURACY,
    M.VAL_LOSS,
    M.TEST_ACCURACY,
    M.TEST_LOSS,
    M.EPOCH_TIME_S,
    M.IMAGES_PER_S,
    M.GATE_PROGRESS,
)
#: properties of the network, the same every epoch: logged once per run (step 0), not as curves
STATIC_METRICS = (M.MACS, M.PARAMS, M.LATENCY_MS, M.TARGET_MACS)


def default_tracking_uri() -> str:
    """The one default of every command: $MLFLOW_TRACKING_URI, else ./mlflow.db (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def existing_store(uri: str) -> str:
    """``uri``, after checking that a SQLite store is there: a command that only reads must not
    leave an empty mlflow.db behind (MLflow creates one on first contact)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SearchConfigError(
                f"no MLflow store at {path} (tracking URI {uri}); run the command in the folder "
                "you launched from, or pass --tracking-uri"
            )
    return uri


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block only (it is process-global).
    ``set_tracking_uri`` also exports MLFLOW_TRACKING_URI; the environment is restored too."""
    previous, previous_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


class Tracking:
    """The client, the MLflow experiment and the search's parent run."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str | None = None) -> None:
        self.uri, self.experiment_name = uri, experiment
        self.client = mlflow.MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment)
        )
        self.parent_run_id = parent_run_id

    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(
            run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )
        self.parent_run_id = run.info.run_id
        return run.info.run_id

    def children(self) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}'",
            max_results=50_000,
        )

    def find_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
            f"and tags.{N.TRIAL_TAG} = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if key == "tags":
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, path + "."))
        else:
            out[path] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class MlflowTrialLogger(Callback):
    """Tune callback: child run per trial with params, per-epoch metrics, status, checkpoint."""

    def __init__(self, tracking: Tracking) -> None:
        self.spec = (tracking.uri, tracking.experiment_name, tracking.parent_run_id)
        self._tracking: Tracking | None = tracking
        self.runs: dict[str, str] = {}
        self.static: dict[str, dict[str, float]] = {}  # run -> static metrics as logged

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; the client reconnects after a restore.
        return {"spec": self.spec, "_tracking": None, "runs": {}, "static": {}}

    @property
    def tracking(self) -> Tracking:
        if self._tracking is None:
            self._tracking = Tracking(*self.spec)
        return self._tracking

    def _run_id(self, trial: Any) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        run_id = self.tracking.find_child(trial.trial_id) or self._create(trial)
        self.runs[trial.trial_id] = run_id
        return run_id

    def _create(self, trial: Any) -> str:
        tags = trial.config.get("tags", {})
        number, reference = tags.get(N.OPTUNA_TRIAL_TAG, ""), tags.get(N.REFERENCE_TAG)
        pretrain = tags.get(N.PRETRAIN_TAG)
        client = self.tracking.client
        run = client.create_run(
            self.tracking.experiment_id,
            run_name=N.trial_label(tags),
            tags={
                "mlflow.parentRunId": self.tracking.parent_run_id,
                N.TRIAL_TAG: trial.trial_id,
                "ray_trial_dir": str(trial.path or ""),
                **_kind_tags(number, reference, pretrain),
                N.OPERATOR_TAG: _operator(trial.config),
            },
        )
        params = flat_params(trial.config)
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        client.log_dict(run.info.run_id, trial.config, "trial_config.json")
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tracking.client.set_tag(self._run_id(trial), "status", "running")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        ts, step = int(time.time() * 1000), int(result.get(M.EPOCH, 0))
        run_id = self._run_id(trial)
        keys = list(LOGGED_METRICS) + self._changed_static(run_id, result)
        metrics = [
            Metric(k, float(result[k]), ts, 0 if k in STATIC_METRICS else step)
            for k in keys
            if isinstance(result.get(k), (int, float))
        ]
        self.tracking.client.log_batch(run_id, metrics=metrics)

    def _changed_static(self, run_id: str, result: dict) -> list[str]:
        """Static metrics not logged yet with their current value: all on a run's first result
        (none on a resumed run's), and an SG-CNN model's realised MACs once it has them."""
        seen = self.static.get(run_id)
        if seen is None:  # first result this driver sees: a resumed run has them logged
            seen = dict(self.tracking.client.get_run(run_id).data.metrics)
        now = {k: float(v) for k, v in result.items()
               if k in STATIC_METRICS and isinstance(v, (int, float))}  # fmt: skip
        self.static[run_id] = {**{k: v for k, v in seen.items() if k in STATIC_METRICS}, **now}
        return [k for k, v in now.items() if seen.get(k) != v]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        result = trial.last_result or {}
        if M.TRIAL_ERROR in result:  # a deterministic failure, reported rather than raised
            self._failed(trial, run_id, result.get(M.TRIAL_ERROR_TEXT) or result[M.TRIAL_ERROR])
            return
        if trial.checkpoint is not None:
            self.tracking.client.set_tag(run_id, N.CHECKPOINT_TAG, trial.checkpoint.path)
        stopped = stopped_at(result, int(trial.config.get("epochs", 0)))
        if stopped is not None:  # keeps its per-epoch metrics; never ranked on the front
            self.tracking.client.set_tag(run_id, N.STOPPED_TAG, str(stopped))
        self.tracking.client.set_tag(run_id, "status", "finished" if stopped is None else "stopped")
        self.tracking.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial, self._run_id(trial), error_text(trial))

    def _failed(self, trial: Any, run_id: str, text: str) -> None:
        text = redact(text)
        self.tracking.client.set_tag(run_id, "status", "failed")
        # The text itself: Ray's error file lives in a session folder that is deleted later.
        self.tracking.client.log_text(run_id, text or "(no error text)", "error.txt")
        self.tracking.client.set_tag(run_id, "error", error_line(text)[:500])
        self.tracking.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        log.warning(
            "trial %s failed: %s (full text: artifact error.txt of run %s)",
            trial.trial_id,
            error_line(text)[:300],
            run_id,
        )


def _operator(config: dict[str, Any]) -> str:
    import dgc

    return dgc.model_kind(str(config.get("model", {}).get("name", "")))


def _kind_tags(number: object, reference: str | None, pretrain: str | None) -> dict[str, str]:
    if pretrain:
        return {N.PRETRAIN_TAG: pretrain}
    return {N.REFERENCE_TAG: reference} if reference else {N.OPTUNA_TRIAL_TAG: str(number)}


def error_text(trial: Any) -> str:
    """The traceback Ray wrote for a failed trial ('' if there is none)."""
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


def error_line(text: str) -> str:
    """The exception line of a traceback: its last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _short(v: object) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4f}" if abs(v) < 10 else f"{v / 1e6:.3f}M"


class ConsoleProgress(Callback):
    """One line per finished trial (the driver's log, which the Ray dashboard's Jobs page shows
    for a submitted job): the count, the trial's label and Tune id (as its Ray actor's repr),
    its objectives, the trials still running and the front so far."""

    def __init__(self, total: int, objectives: list[tuple[str, str]]) -> None:
        self.total, self.objectives = total, objectives
        self.done: list[tuple[float, ...]] = []
        self.failed = self.stopped = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from search.pareto import pareto_ranks

        r = trial.last_result or {}
        if M.TRIAL_ERROR in r:
            self._failed(trial, f"{r[M.TRIAL_ERROR]}; not retried: it would fail again")
            return
        stopped = stopped_at(r, int(trial.config.get("epochs", 0)))
        shown = ", ".join(f"{m}={_short(r.get(m))}" for m, _ in self.objectives)
        if stopped is not None:
            self.stopped += 1
            log.info(
                "[%d/%d] %s stopped early at epoch %d (dominated at that rung): %s",
                self._count(), self.total, actor_repr(trial.config, trial.trial_id), stopped,
                shown,
            )  # fmt: skip
            return
        self.done.append(tuple(float(r.get(m, "nan")) for m, _ in self.objectives))
        ranks = pareto_ranks(self.done, [d for _, d in self.objectives])
        front = sorted(p for p, k in zip(self.done, ranks) if k == 1)
        log.info(
            "[%d/%d] %s done: %s | %d running | front so far (%d): %s",
            self._count(), self.total, actor_repr(trial.config, trial.trial_id), shown,
            _running(trials, trial), len(front),
            " ".join("(" + ", ".join(_short(v) for v in p) + ")" for p in front),
        )  # fmt: skip

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial, error_line(error_text(trial)))

    def _count(self) -> int:
        return len(self.done) + self.failed + self.stopped

    def _failed(self, trial: Any, reason: str) -> None:
        self.failed += 1
        log.warning(
            "[%d/%d] %s FAILED (%s)",
            self._count(),
            self.total,
            actor_repr(trial.config, trial.trial_id),
            redact(reason)[:300],
        )


def _running(trials: list, trial: Any) -> int:
    """The trials Tune is running, but ``trial``, which is ending."""
    return sum(1 for t in trials if t is not trial and getattr(t, "status", "") == "RUNNING")
