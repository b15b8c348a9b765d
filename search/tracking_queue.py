"""MLflow writes of a search, off the training loop.

The Tune callbacks put what happened to a trial (started, a result, tags, ended) on a queue,
as plain JSON-able operations; one background thread sends them to the tracking store in
order. A write that fails for a reason that can pass (the server is down or restarting, the
SQLite store is locked or its disk is full) is retried, with a growing pause of at most
``MAX_PAUSE_S``, for as long as the search runs: an outage of any length stalls no trial and
loses nothing. The driver flushes the queue before it ranks the trials; what is still unsent
when a command stops is kept in ``<folder>/tracking_pending.jsonl`` and sent first by the next
``resume`` or ``pareto``.

Child runs are found again by their ``ray_trial_id`` tag before one is created, so a write
retried after its answer was lost creates no second run.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from search import names as N
from search.redact import redact
from search.tracking import STATIC_METRICS
from search.tracking import Tracking

log = logging.getLogger(__name__)

PENDING_FILE = "tracking_pending.jsonl"
MAX_PAUSE_S = 10.0
#: MLflow answers that retrying cannot change (the write itself is wrong): logged and dropped
PERMANENT = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_ALREADY_EXISTS",
        "RESOURCE_DOES_NOT_EXIST",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
    }
)


def transient(err: BaseException) -> bool:
    """Whether a failed write may succeed later (everything but MLflow's refusals)."""
    return not (isinstance(err, MlflowException) and err.error_code in PERMANENT)


class RunWriter:
    """Applies one operation to the tracking store (the queue's thread is its only caller)."""

    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self.runs: dict[str, str] = {}  # Ray trial id -> MLflow run id
        self.static: dict[str, dict[str, float]] = {}  # run id -> static metrics as logged

    def apply(self, op: dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "parent_end":
            self.tracking.client.set_terminated(op["run"], op["status"])
            return
        if kind == "parent_metrics":  # the search's own curves (its front's hypervolume)
            metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in op["metrics"]]
            self.tracking.client.log_batch(op["run"], metrics=metrics)
            return
        run_id = self._run(op)
        if run_id is None:
            log.warning("no MLflow run of trial %s to record %s in; skipped", op["trial"], kind)
        elif kind == "metrics":
            self._metrics(run_id, op)
        elif kind == "tags":
            for key, value in op["tags"].items():
                self.tracking.client.set_tag(run_id, key, value)
        elif kind == "text":
            self.tracking.client.log_text(run_id, op["text"], op["file"])
        elif kind == "end":
            self.tracking.client.set_terminated(run_id, op["status"])

    def _run(self, op: dict[str, Any]) -> str | None:
        trial = op["trial"]
        if trial not in self.runs:
            found = self.tracking.find_child(trial)
            if found is None and op["op"] == "child":
                found = self._same_point(op) or self._create(op)
            elif found is not None and op["op"] == "child":  # a resumed trial's run reopens
                self.tracking.client.update_run(found, status="RUNNING")
            if found is None:
                return None
            self.runs[trial] = found
        elif op["op"] == "child":
            self.tracking.client.update_run(self.runs[trial], status="RUNNING")
        return self.runs[trial]

    def _same_point(self, op: dict[str, Any]) -> str | None:
        """The run of the same point under an earlier Ray trial id: a point suggested again at
        resume (Tune never saved it) goes on in its run, under its new id."""
        keys = [k for k in (N.OPTUNA_TRIAL_TAG, N.REFERENCE_TAG, N.PRETRAIN_TAG) if k in op["tags"]]
        if not keys:
            return None
        key = keys[0]
        runs = self.tracking.client.search_runs(
            [self.tracking.experiment_id],
            f"tags.mlflow.parentRunId = '{self.tracking.parent_run_id}' "
            f"and tags.{key} = '{op['tags'][key]}'",
            max_results=1,
        )
        if not runs:
            return None
        run_id = runs[0].info.run_id
        for tag in (N.TRIAL_TAG, "ray_trial_dir"):
            self.tracking.client.set_tag(run_id, tag, op["tags"][tag])
        self.tracking.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, op: dict[str, Any]) -> str:
        client = self.tracking.client
        tags = {"mlflow.parentRunId": self.tracking.parent_run_id or "", **op["tags"]}
        run = client.create_run(self.tracking.experiment_id, run_name=op["name"], tags=tags)
        params = [Param(k, str(v)[:6000]) for k, v in op["params"].items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        client.log_dict(run.info.run_id, op["config"], "trial_config.json")
        return run.info.run_id

    def _metrics(self, run_id: str, op: dict[str, Any]) -> None:
        """Curves every time; static metrics when they are new for the run (a resumed run has
        them already; an SG-CNN model's realised MACs arrive late)."""
        seen = self.static.get(run_id)
        if seen is None:
            logged = self.tracking.client.get_run(run_id).data.metrics
            seen = {k: v for k, v in logged.items() if k in STATIC_METRICS}
        now = {k: float(v) for k, v in op["static"].items()}
        ts = op["metrics"][0][2] if op["metrics"] else int(time.time() * 1000)
        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in op["metrics"]]
        metrics += [Metric(k, v, ts, 0) for k, v in now.items() if seen.get(k) != v]
        if metrics:
            self.tracking.client.log_batch(run_id, metrics=metrics)
        self.static[run_id] = {**seen, **now}


class TrackingQueue:
    """The queue and its sending thread (see the module docstring). ``put`` never blocks."""

    def __init__(self, tracking: Tracking, folder: Path) -> None:
        self.tracking, self.folder = tracking, folder
        self._ops: collections.deque[dict[str, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._failing_since: float | None = None
        self._thread: threading.Thread | None = None
        self.writer = RunWriter(tracking)  # used by the queue's thread only

    def run_of(self, trial_id: str) -> str | None:
        """The MLflow run of a Ray trial id, if the queue has written it already (never
        waits for MLflow)."""
        return self.writer.runs.get(trial_id)

    def start(self) -> TrackingQueue:
        self._load_pending()
        self._thread = threading.Thread(target=self._loop, name="mlflow-writes", daemon=True)
        self._thread.start()
        return self

    def put(self, op: dict[str, Any]) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ops)  # the write being sent stays first until it is done

    def flush(self, timeout: float | None = None, note_every_s: float = 60.0) -> bool:
        """Wait until every queued write is sent (at most ``timeout`` seconds; None: as long as
        it takes, saying every ``note_every_s`` seconds what it waits for)."""
        start = last_note = time.monotonic()
        while len(self):
            now = time.monotonic()
            if timeout is not None and now - start >= timeout:
                return False
            if now - last_note >= note_every_s:
                last_note = now
                log.warning(
                    "waiting for the tracking store %s to take %d queued write(s) "
                    "(Ctrl-C: stop waiting; they are kept for the next resume or pareto)",
                    redact(self.tracking.uri),
                    len(self),
                )
            with self._cond:
                self._cond.wait(0.5)
        return True

    def close(self, timeout: float | None = None) -> int:
        """Flush (at most ``timeout`` seconds), stop the thread, keep what is unsent in
        ``<folder>/tracking_pending.jsonl`` (also when a signal cuts the wait short). Returns
        the number of writes kept."""
        sent = False
        try:
            sent = self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                unsent = list(self._ops)  # the write in flight, if any, is sent again later
                self._ops.clear()
            if self._thread is not None and sent:
                self._thread.join(timeout=5)
            kept = self._keep(unsent)
        return kept

    def _keep(self, unsent: list[dict[str, Any]]) -> int:
        if not unsent:
            return 0
        try:
            with open(self.folder / PENDING_FILE, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(op) + "\n" for op in unsent)
        except OSError as err:
            log.error(
                "%d MLflow write(s) could not be kept in %s (%s); their trials' metrics stay "
                "in the trial folders under %s",
                len(unsent),
                self.folder / PENDING_FILE,
                err.strerror,
                self.folder,
            )
            return 0
        return len(unsent)

    def _load_pending(self) -> None:
        """Queue first what an earlier command could not send."""
        path = self.folder / PENDING_FILE
        if not path.is_file():
            return
        ops = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ops.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipped a damaged line (a write cut off by a stop)", path)
        self._ops.extendleft(reversed(ops))
        path.unlink()
        log.info("sending %d MLflow write(s) kept by an earlier command", len(ops))

    def _loop(self) -> None:
        writer = self.writer
        pause = 0.5
        while True:
            with self._cond:
                while not self._ops and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                op = self._ops[0]
            try:
                writer.apply(op)
            except Exception as err:  # noqa: BLE001  (classified below; the loop must go on)
                if transient(err):
                    self._failing(err)
                    with self._cond:
                        self._cond.wait(pause)
                    pause = min(MAX_PAUSE_S, pause * 2)
                    continue
                log.warning("MLflow refused a write (%s); skipped: %s", op["op"],
                            redact(str(err))[:300])  # fmt: skip
            else:
                pause = 0.5
                self._recovered()
            with self._cond:
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
                self._cond.notify_all()

    def _failing(self, err: Exception) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "the tracking store %s does not take writes (%s); training goes on, the "
                "writes wait in a queue and are retried",
                redact(self.tracking.uri),
                redact(str(err).splitlines()[0] if str(err) else type(err).__name__)[:200],
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "the tracking store takes writes again after %.0f s; %d queued write(s) left",
                time.monotonic() - self._failing_since,
                len(self._ops) - 1,
            )
            self._failing_since = None
