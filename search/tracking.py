"""MLflow tracking from the driver: one parent run per search, one child run per trial.

All writes happen in the driver process (a Tune ``Callback`` puts them on a queue that a
background thread sends, ``search.tracking_queue``), so workers need no access to the tracking
server and a slow or absent server never holds up training. Child runs are found again by their
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
from typing import TYPE_CHECKING
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.entities import RunStatus
from ray.tune import Callback

from search import names as N
from search.actors import actor_repr
from search.overrides import SearchConfigError
from search.redact import redact
from search.scheduler import stopped_at
from trainables import metrics as M

if TYPE_CHECKING:
    from search.interrupt import Stop
    from search.tracking_queue import TrackingQueue
    from search.watch import Ledger

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
    """Tune callback: a child run per trial with params, per-epoch metrics, status and
    checkpoint, written by the tracking queue's thread (``search.tracking_queue``), never in
    the training loop. A trial the run leaves unfinished (a stop) is tagged ``interrupted``."""

    def __init__(self, writes: TrackingQueue, stop: Stop | None = None) -> None:
        self.writes: TrackingQueue | None = writes
        self.stop = stop
        self.started: set[str] = set()
        self.ended: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks with the experiment; a restore is given a new logger.
        return {"writes": None, "started": set(), "ended": set(), "stop": None}

    def _put(self, trial: Any, op: str, **fields: Any) -> None:
        if self.writes is None:
            return
        if trial.trial_id not in self.started:  # first contact in this process
            self.started.add(trial.trial_id)
            self.writes.put(child_op(trial))
        if op != "child":
            self.writes.put({"op": op, "trial": trial.trial_id, **fields})

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.discard(trial.trial_id)  # (re)started: its run is (re)opened
        self.ended.discard(trial.trial_id)
        self._put(trial, "tags", tags={N.STATUS_TAG: "running"})

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get(M.FINAL_REPEAT):  # logged already (or replayed from the trial's folder)
            return
        ts, step = int(time.time() * 1000), int(result.get(M.EPOCH, 0))
        curves = [
            [k, float(result[k]), ts, step]
            for k in LOGGED_METRICS
            if isinstance(result.get(k), (int, float))
        ]
        static = {k: float(v) for k, v in result.items()
                  if k in STATIC_METRICS and isinstance(v, (int, float))}  # fmt: skip
        self._put(trial, "metrics", metrics=curves, static=static)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        if M.TRIAL_ERROR in result:  # a deterministic failure, reported rather than raised
            self._failed(trial, result.get(M.TRIAL_ERROR_TEXT) or result[M.TRIAL_ERROR])
            return
        tags = {}
        if trial.checkpoint is not None:
            tags[N.CHECKPOINT_TAG] = trial.checkpoint.path
        stopped = stopped_at(result, int(trial.config.get("epochs", 0)))
        if stopped is not None:  # keeps its per-epoch metrics; never ranked on the front
            tags[N.STOPPED_TAG] = str(stopped)
        tags[N.STATUS_TAG] = "finished" if stopped is None else "stopped"
        self._put(trial, "tags", tags=tags)
        self._put(trial, "end", status=RunStatus.to_string(RunStatus.FINISHED))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)
        self._failed(trial, error_text(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Trials the run leaves unfinished (a stop): their runs end KILLED, tagged
        ``interrupted`` (``paused`` by a spent budget); ``resume`` reopens them."""
        spent = self.stop is not None and not self.stop.interrupted and self.stop.budget
        for trial in trials:
            if trial.trial_id in self.started and trial.trial_id not in self.ended:
                self._put(trial, "tags", tags={N.STATUS_TAG: "paused" if spent else "interrupted"})
                self._put(trial, "end", status=RunStatus.to_string(RunStatus.KILLED))

    def _failed(self, trial: Any, text: str) -> None:
        text = redact(text)
        # The text itself: Ray's error file lives in a session folder that is deleted later.
        self._put(trial, "text", text=text or "(no error text)", file="error.txt")
        tags = {N.STATUS_TAG: "failed", N.ERROR_TAG: error_line(text)[:500]}
        self._put(trial, "tags", tags=tags)
        self._put(trial, "end", status=RunStatus.to_string(RunStatus.FAILED))
        log.warning(
            "trial %s failed: %s (full text: artifact error.txt of its MLflow run)",
            trial.trial_id,
            error_line(text)[:300],
        )


def child_op(trial: Any) -> dict[str, Any]:
    """The queue operation that finds or creates a trial's child run (and reopens it)."""
    tags = trial.config.get("tags", {})
    number, reference = tags.get(N.OPTUNA_TRIAL_TAG, ""), tags.get(N.REFERENCE_TAG)
    pretrain = tags.get(N.PRETRAIN_TAG)
    return {
        "op": "child",
        "trial": trial.trial_id,
        "name": N.trial_label(tags),
        "tags": {
            N.TRIAL_TAG: trial.trial_id,
            "ray_trial_dir": str(trial.path or ""),
            **_kind_tags(number, reference, pretrain),
            N.OPERATOR_TAG: _operator(trial.config),
        },
        "params": flat_params(trial.config),
        "config": trial.config,
    }


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
    its objectives, the trials still running, the front so far and, with a ledger
    (``search.watch``, kept by a callback listed before this one), the front's hypervolume and
    the epochs spent."""

    def __init__(
        self, total: int, objectives: list[tuple[str, str]], ledger: Ledger | None = None
    ) -> None:
        self.total, self.objectives, self.ledger = total, objectives, ledger
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
            "[%d/%d] %s done: %s | %d running | front so far (%d): %s%s",
            self._count(), self.total, actor_repr(trial.config, trial.trial_id), shown,
            _running(trials, trial), len(front),
            " ".join("(" + ", ".join(_short(v) for v in p) + ")" for p in front), self._spent(),
        )  # fmt: skip

    def _spent(self) -> str:
        """`` | hypervolume 0.6123 | 48 epochs spent`` (empty without a ledger)."""
        if self.ledger is None:
            return ""
        volume = self.ledger.hypervolume()
        shown = "" if volume is None else f" | hypervolume {volume:.4f}"
        return f"{shown} | {self.ledger.epochs_spent} epochs spent"

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
