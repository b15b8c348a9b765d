"""MLflow runs of trials that ended in Tune while their writes were lost.

The tracking queue keeps what it could not send when a command stops
(``tracking_pending.jsonl``), but a hard stop of the driver (SIGKILL, a power cut) loses the
queue with the process. A trial that Tune had saved as ended may then have no MLflow run, or
an open one (RUNNING, without its last epochs, tags and end), and Tune never reports it again:
it would be missing from every front. ``replay_ended`` puts those writes on the queue again,
read from the trial's own folder (``params.json``, ``result.json``, its checkpoints), through
the same callback that wrote them first. ``resume`` and ``pareto`` call it; epochs already
logged are not logged twice, and a run that ended is left alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search import names as N
from search.tracking import MlflowTrialLogger
from search.tracking import Tracking
from search.tracking_queue import TrackingQueue
from search.tune_runs import TrialRecord
from trainables import metrics as M


@dataclass(frozen=True)
class _Checkpoint:
    path: str


@dataclass(frozen=True)
class SavedTrial:
    """A trial as its folder keeps it: what ``MlflowTrialLogger`` reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    path: str
    last_result: dict[str, Any]
    checkpoint: _Checkpoint | None


def replay_ended(tracking: Tracking, writes: TrackingQueue, records: list[TrialRecord]) -> int:
    """Queue the lost writes of every trial Tune saved as finished (TERMINATED) whose MLflow
    run is missing or still RUNNING; returns how many trials were replayed. One query finds
    the runs; only an open run's epochs are read."""
    ended = [r for r in records if r.status == "TERMINATED"]
    if not ended:
        return 0
    runs = {run.data.tags.get(N.TRIAL_TAG): run for run in tracking.children()}
    logger = MlflowTrialLogger(writes)
    replayed = 0
    for record in ended:
        run = runs.get(record.trial_id)
        if run is not None and run.info.status != "RUNNING":
            continue
        trial = saved_trial(record)
        if trial is None:
            continue
        logged = set()
        if run is not None:
            history = tracking.client.get_metric_history(run.info.run_id, M.EPOCH)
            logged = {m.step for m in history}
        for result in results_of(Path(record.path)):
            if int(result.get(M.EPOCH, 0)) not in logged:
                logger.on_trial_result(0, [], trial, result)
        logger.on_trial_complete(0, [], trial)
        replayed += 1
    return replayed


def saved_trial(record: TrialRecord) -> SavedTrial | None:
    """The trial of ``record`` from its folder; None if the folder lacks its config."""
    folder = Path(record.path)
    try:
        config = json.loads((folder / "params.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    checkpoints = sorted(folder.glob("checkpoint_*"))
    checkpoint = _Checkpoint(str(checkpoints[-1])) if checkpoints else None
    return SavedTrial(record.trial_id, config, str(folder), record.metrics, checkpoint)


def results_of(folder: Path) -> list[dict[str, Any]]:
    """The results Tune saved for a trial, oldest first (a line cut off by a stop is skipped)."""
    out = []
    try:
        lines = (folder / "result.json").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
